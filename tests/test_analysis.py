"""Tests of lmfused.analysis (transport analysis, LM coefficients, the deep DAE demo) and the analyze CLI.

Known answers throughout: closed-form Gaussian entropies and W2 distances, the optimal Gaussian DAE, the
truncation order of the LM scheme against its modified equation. Small stand-in models that follow the model
protocol (``is_lm_block`` blocks returning ``(u_next, u_shortcut)`` inside ``is_lm_stage`` stages) keep
these tests independent of the zoo; the tests at the end run the same checks on the real zoo.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import lmfused
import lmfused.models
from lmfused import analyze
from lmfused.analysis import (
    FlowRecorder,
    FlowState,
    analyze_flow,
    dae,
    deep_gaussian_dae_covariances,
    find_lm_blocks,
    gaussian_dae_entropy_drop,
    gaussian_dae_map,
    gaussian_entropy,
    gaussian_entropy_of_cov,
    gaussian_fit,
    gaussian_w2,
    group_trajectories,
    lm_coefficients,
    modified_equation_coefficients,
    psd_sqrtm,
    transport_metrics,
)
from tests.conftest import import_or_skip

F64 = torch.float64
LOG_2_PI_E = math.log(2 * math.pi * math.e)

# ----------------------------------------------------------------------------------------------------------
# Stand-in models following the protocol
# ----------------------------------------------------------------------------------------------------------


class StandInStep(nn.Module):
    """Holds k like lmfused.nn.LMStep: (1 - k) u + k u_prev + f through the fused op."""

    def __init__(self, channels: int | None, k: float = -0.05) -> None:
        super().__init__()
        self.k = nn.Parameter(torch.full((channels or 1,), k))

    def forward(self, u, u_prev, f):
        return lmfused.lm_step(u, u_prev, f, self.k)


class StandInBlock(nn.Module):
    is_lm_block = True

    def __init__(self, cin: int, cout: int, stride: int = 1, *, lm: bool = True, per_channel: bool = False):
        super().__init__()
        self.branch = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout)
        )
        self.proj = nn.Conv2d(cin, cout, 1, stride) if (cin != cout or stride != 1) else None
        self.step = StandInStep(cout if per_channel else None) if lm and self.proj is None else None

    def forward(self, u, u_prev=None):
        shortcut = u if self.proj is None else self.proj(u)
        f = self.branch(u)
        if self.step is None or u_prev is None:
            return shortcut + f, shortcut
        return self.step(shortcut, u_prev, f), shortcut


class StandInStage(nn.Sequential):
    is_lm_stage = True

    def forward(self, u):
        u_prev = None
        for block in self:
            u, u_prev = block(u, u_prev)
        return u


class StandInNet(nn.Module):
    """Stem 3 -> 8 channels, stage of 3 blocks at 8, stage of 2 blocks at 16 (stride 2), linear head."""

    def __init__(self, *, lm: bool = True, per_channel: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        kw = dict(lm=lm, per_channel=per_channel)
        self.layer1 = StandInStage(*(StandInBlock(8, 8, **kw) for _ in range(3)))
        self.layer2 = StandInStage(StandInBlock(8, 16, 2, **kw), StandInBlock(16, 16, **kw))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(x.mean((2, 3)))


def stand_in(seed: int = 0, **kw) -> StandInNet:
    torch.manual_seed(seed)
    return StandInNet(**kw).eval()


def real_zoo():
    """lmfused.models once it provides create_model; skip before."""
    if not hasattr(lmfused.models, "create_model"):
        pytest.skip("the model zoo (lmfused.models.create_model) is not available yet")
    return lmfused.models


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ----------------------------------------------------------------------------------------------------------
# FlowRecorder
# ----------------------------------------------------------------------------------------------------------


def test_recorder_leaves_outputs_unchanged_and_removes_hooks():
    model = stand_in()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        with FlowRecorder(model) as rec:
            got = model(x)
        assert hook_count(model) == 0
        again = model(x)
    assert torch.equal(got, expected) and torch.equal(again, expected)
    trajectories = rec.trajectories()
    assert sorted(trajectories) == [0, 1]
    assert [s.depth for s in trajectories[0]] == [0, 1, 2, 3]
    assert [s.depth for s in trajectories[1]] == [0, 1, 2]
    assert [s.name for s in trajectories[0]] == ["layer1.0", "layer1.0", "layer1.1", "layer1.2"]
    assert trajectories[0][0].is_input and not trajectories[0][1].is_input
    with torch.no_grad():
        stem = model.stem(x)
        assert torch.equal(trajectories[0][0].tensor, stem)
        assert torch.equal(trajectories[1][0].tensor, model.layer1(stem))  # stage input = previous output
        assert torch.equal(trajectories[1][-1].tensor, model.layer2(model.layer1(stem)))
    assert trajectories[1][1].tensor.shape == (4, 16, 4, 4)


def test_recorder_keeps_copies_passes_and_gradients():
    model = stand_in()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with FlowRecorder(model, device="cpu") as rec:
        model(x).sum().backward()  # recording does not get in autograd's way
        model(2 * x)
    assert x.grad is not None
    assert all(not s.tensor.requires_grad for s in rec.states)
    first, last = rec.trajectories(0), rec.trajectories()
    with torch.no_grad():
        assert torch.equal(first[0][0].tensor, model.stem(x)) and torch.equal(
            last[0][0].tensor, model.stem(2 * x)
        )
    snapshot = last[1][-1].tensor.clone()
    last[1][-1].tensor.add_(1.0)  # a record is its own copy...
    assert not torch.equal(last[1][-1].tensor, snapshot)
    with pytest.raises(IndexError, match="pass_index"):
        rec.trajectories(2)
    rec.clear()
    assert rec.trajectories() == {}


def test_recorder_rejects_models_without_blocks():
    with pytest.raises(ValueError, match="model: no module with is_lm_block"):
        FlowRecorder(nn.Sequential(nn.Linear(2, 2)))


def test_find_lm_blocks_groups_blocks_outside_stages_by_parent():
    blocks = nn.Sequential(StandInBlock(4, 4), StandInBlock(4, 4))
    wrapper = nn.Module()
    wrapper.a, wrapper.b = blocks, nn.Sequential(StandInBlock(4, 4))
    found = [(b.name, b.stage, b.index) for b in find_lm_blocks(wrapper)]
    assert found == [("a.0", 0, 0), ("a.1", 0, 1), ("b.0", 1, 0)]


# ----------------------------------------------------------------------------------------------------------
# Transport metrics on hand-made trajectories
# ----------------------------------------------------------------------------------------------------------


def make_states(tensors, stage=0):
    """A stage trajectory: tensors[0] is the stage input, tensors[n] the output of block n - 1."""
    return [
        FlowState(f"s{stage}.{max(i - 1, 0)}", stage, max(i - 1, 0), i == 0, t, 1)
        for i, t in enumerate(tensors)
    ]


def test_transport_metrics_known_answers():
    torch.manual_seed(0)
    u0 = torch.randn(64, 3, 4, 4, dtype=F64)
    a = torch.randn(1, 3, 4, 4, dtype=F64)  # the same step for every sample: a pure translation
    d = a.numel()
    states = make_states([u0, u0 + a, u0 + 2 * a, u0 + a, u0 + a + 2 * a.flip(1)])
    rows = transport_metrics(states)
    assert [r["block"] for r in rows] == [0, 1, 2, 3] and [r["depth"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["displacement"] == pytest.approx(a.norm().item() / math.sqrt(d), rel=1e-12)
    assert rows[0]["kinetic_energy"] == pytest.approx(0.5 * a.pow(2).mean().item(), rel=1e-12)
    assert rows[0]["cosine"] is None  # no previous velocity
    assert rows[1]["cosine"] == pytest.approx(1.0)  # straight on
    assert rows[2]["cosine"] == pytest.approx(-1.0)  # straight back
    cos = nn.functional.cosine_similarity(2 * a.flip(1).flatten(), -a.flatten(), dim=0).item()
    assert rows[3]["cosine"] == pytest.approx(cos)
    # A translation moves the Gaussian fit's mean only (shrinkage depends on centred data): W2 = |mean shift|.
    assert rows[0]["w2"] == pytest.approx(a.mean((2, 3)).norm().item(), rel=1e-9)
    assert rows[0]["entropy"] == pytest.approx(gaussian_entropy(u0.mean((2, 3))), rel=1e-12)
    assert rows[0]["shape"] == [3, 4, 4]


def test_transport_metrics_shape_changes_and_gaps():
    u0 = torch.randn(8, 2, 4, 4)
    wide = torch.randn(8, 5, 2, 2)
    rows = transport_metrics(make_states([u0, wide, wide + 1.0]))
    assert rows[0]["displacement"] is None and rows[0]["w2"] is None and rows[0]["entropy"] is not None
    assert rows[1]["displacement"] == pytest.approx(1.0) and rows[1]["cosine"] is None
    gap = make_states([u0, u0 + 1, u0 + 2])
    rows = transport_metrics([gap[0], gap[2]])  # block 0's output missing
    assert rows[0]["displacement"] is None and rows[0]["w2"] is None
    # Recorder, states and trajectories are interchangeable sources.
    states = make_states([u0, u0 + 1, u0 + 3])
    assert transport_metrics(states) == transport_metrics(group_trajectories(states))


def test_transport_metrics_on_a_recorded_model():
    model = stand_in()
    with torch.no_grad(), FlowRecorder(model) as rec:
        model(torch.randn(16, 3, 8, 8))
    rows = transport_metrics(rec)
    assert [(r["stage"], r["block"]) for r in rows] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    assert rows[3]["displacement"] is None  # layer2.0 changes the shape
    assert all(r["displacement"] > 0 and r["kinetic_energy"] > 0 for i, r in enumerate(rows) if i != 3)
    assert rows[4]["cosine"] is None and -1 <= rows[1]["cosine"] <= 1
    assert all(math.isfinite(r["entropy"]) for r in rows)


# ----------------------------------------------------------------------------------------------------------
# Gaussian entropy, W2, matrix square roots
# ----------------------------------------------------------------------------------------------------------


def random_cov(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=F64)
    return a @ a.T + 0.3 * torch.eye(d, dtype=F64)


def gaussian_samples(mean, cov, m: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(m, cov.shape[0], generator=g, dtype=F64)
    return mean + z @ torch.linalg.cholesky(cov).T


@pytest.mark.parametrize("shrinkage", ["ledoit-wolf", None])
def test_gaussian_entropy_converges_to_the_analytic_value(shrinkage):
    cov = random_cov(4, 1)
    analytic = 0.5 * (4 * LOG_2_PI_E + torch.logdet(cov).item())
    x = gaussian_samples(torch.ones(4, dtype=F64), cov, 40_000, 2)
    assert gaussian_entropy(x, shrinkage=shrinkage) == pytest.approx(analytic, abs=0.03)
    assert gaussian_entropy_of_cov(cov) == pytest.approx(analytic, rel=1e-12)


def test_gaussian_entropy_shrinkage():
    x = torch.randn(10, 32)  # fewer samples than dimensions: the sample covariance is singular
    assert gaussian_entropy(x, shrinkage=None) == -math.inf
    assert math.isfinite(gaussian_entropy(x))  # Ledoit-Wolf keeps it well conditioned
    # Full shrinkage is the isotropic Gaussian of the same total variance.
    _, cov = gaussian_fit(x, shrinkage=None)
    iso = 0.5 * 32 * (LOG_2_PI_E + math.log(torch.trace(cov).item() / 32))
    assert gaussian_entropy(x, shrinkage=1.0) == pytest.approx(iso, rel=1e-10)
    assert gaussian_entropy(torch.zeros(5, 3)) == -math.inf  # degenerate data
    # 1-D: 0.5 log(2 pi e var), float32 input computed in float64.
    y = torch.tensor([[0.0], [2.0]])
    assert gaussian_entropy(y) == pytest.approx(0.5 * (LOG_2_PI_E + math.log(1.0)))


def test_gaussian_entropy_validates():
    with pytest.raises(ValueError, match="x: expected samples of shape"):
        gaussian_entropy(torch.randn(10))
    with pytest.raises(ValueError, match="x: expected samples of shape"):
        gaussian_entropy(torch.randn(1, 3))
    with pytest.raises(ValueError, match="shrinkage"):
        gaussian_entropy(torch.randn(10, 2), shrinkage="oas")
    with pytest.raises(ValueError, match="shrinkage"):
        gaussian_entropy(torch.randn(10, 2), shrinkage=1.5)
    with pytest.raises(TypeError, match="x: expected a tensor or array"):
        gaussian_entropy("not data")


def test_gaussian_w2_hand_computed_cases():
    cov = random_cov(3, 3)
    m1, m2 = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, -1.0, 3.5])
    # Same covariance: the mean distance.
    assert gaussian_w2(m1, cov, m2, cov) == pytest.approx((m1 - m2).norm().item(), rel=1e-6)
    # Commuting (diagonal) covariances: sqrt(|dm|^2 + sum (sqrt a - sqrt b)^2).
    a, b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.0])
    expected = math.sqrt((m1 - m2).pow(2).sum().item() + (a.sqrt() - b.sqrt()).pow(2).sum().item())
    assert gaussian_w2(m1, torch.diag(a), m2, torch.diag(b)) == pytest.approx(expected, rel=1e-10)
    # 1-D: sqrt((m1 - m2)^2 + (s1 - s2)^2).
    assert gaussian_w2([0.5], [[4.0]], [-1.0], [[0.49]]) == pytest.approx(math.sqrt(1.5**2 + 1.3**2))
    # Symmetric, zero on the diagonal, numpy inputs accepted.
    c2 = random_cov(3, 4)
    assert gaussian_w2(m1, cov, m2, c2) == pytest.approx(gaussian_w2(m2, c2, m1, cov), rel=1e-9)
    assert gaussian_w2(m1.numpy(), cov.numpy(), m1.numpy(), cov.numpy()) == pytest.approx(0.0, abs=1e-6)


def test_gaussian_w2_against_scipy_for_non_commuting_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    c1, c2 = random_cov(4, 5).numpy(), random_cov(4, 6).numpy()
    root = linalg.sqrtm(c2)
    cross = np.real(linalg.sqrtm(root @ c1 @ root))
    expected = math.sqrt(np.trace(c1) + np.trace(c2) - 2 * np.trace(cross))
    assert gaussian_w2(np.zeros(4), c1, np.zeros(4), c2) == pytest.approx(expected, rel=1e-8)


def test_gaussian_w2_validates():
    eye = torch.eye(2)
    with pytest.raises(ValueError, match="cov1: expected a square"):
        gaussian_w2(torch.zeros(2), torch.zeros(2, 3), torch.zeros(2), eye)
    with pytest.raises(ValueError, match="cov2: expected shape"):
        gaussian_w2(torch.zeros(2), eye, torch.zeros(3), torch.eye(3))
    with pytest.raises(ValueError, match="mu2: expected a mean vector of shape"):
        gaussian_w2(torch.zeros(2), eye, torch.zeros(3), eye)
    with pytest.raises(ValueError, match="mu1"):
        gaussian_w2(torch.zeros(2, 1), eye, torch.zeros(2), eye)


def test_psd_sqrtm():
    cov = random_cov(5, 7)
    root = psd_sqrtm(cov)
    assert torch.allclose(root @ root, cov, atol=1e-10) and torch.allclose(root, root.T)
    v = torch.randn(4, 1, dtype=F64)
    nearly = v @ v.T - 1e-15 * torch.eye(4, dtype=F64)  # PSD up to round-off: negative eigenvalues clamp
    root = psd_sqrtm(nearly)
    assert torch.isfinite(root).all() and torch.allclose(root @ root, v @ v.T, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------
# The Gaussian DAE: closed form against transported samples and a trained linear DAE
# ----------------------------------------------------------------------------------------------------------


def test_gaussian_dae_closed_form():
    cov = random_cov(3, 8)
    sigma = 0.9
    a = gaussian_dae_map(cov, sigma)
    expected = cov @ torch.linalg.inv(cov + sigma**2 * torch.eye(3, dtype=F64))
    assert torch.allclose(a, expected, atol=1e-12)
    eig = torch.linalg.eigvalsh(cov)
    drop = gaussian_dae_entropy_drop(cov, sigma)
    assert drop == pytest.approx(-torch.log(eig / (eig + sigma**2)).sum().item(), rel=1e-12)
    assert drop == pytest.approx(
        gaussian_entropy_of_cov(cov) - gaussian_entropy_of_cov(a @ cov @ a.T), rel=1e-9
    )
    # Transported samples: the entropy falls by the closed-form drop.
    x = gaussian_samples(torch.zeros(3, dtype=F64), cov, 40_000, 9)
    after = gaussian_entropy(x @ a.T, shrinkage=None)
    assert gaussian_entropy(x, shrinkage=None) - after == pytest.approx(drop, abs=0.02)
    # A linear DAE trained on (x + sigma eps, x) converges to the closed-form map.
    trained = dae.fit_linear_dae(x, sigma, generator=torch.Generator().manual_seed(10))
    assert torch.allclose(trained, a, atol=0.02)
    assert gaussian_dae_entropy_drop(cov, 0.0) == 0.0
    with pytest.raises(ValueError, match="sigma"):
        gaussian_dae_map(cov, -1.0)
    with pytest.raises(ValueError, match="cov: expected a square"):
        gaussian_dae_entropy_drop(torch.ones(3), 1.0)


def test_deep_gaussian_dae_lowers_entropy_and_tends_to_the_backward_heat_flow():
    cov = torch.diag(torch.tensor([3.0, 1.5], dtype=F64))
    sigma = 0.5
    entropies = [gaussian_entropy_of_cov(c) for c in deep_gaussian_dae_covariances(cov, sigma, 8)]
    assert all(np.diff(entropies) < 0)  # every step lowers the entropy
    shallow = entropies[0] - gaussian_dae_entropy_drop(cov, sigma)
    assert entropies[-1] < shallow  # the deep DAE transports further than the shallow one
    # T -> infinity: dx/dt = grad log p_t(x), whose Gaussian solution has cov_t = cov - 2 t I at t = sigma^2.
    limit = deep_gaussian_dae_covariances(cov, sigma, 4000)[-1]
    assert torch.allclose(limit, cov - 2 * sigma**2 * torch.eye(2, dtype=F64), atol=2e-3)
    with pytest.raises(ValueError, match="steps"):
        deep_gaussian_dae_covariances(cov, sigma, 0)


def test_dae_demo_shows_entropy_falling_and_deep_converging_faster(tmp_path, capsys):
    assert dae.main(["--steps", "4", "--iters", "150", "--seed", "0", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "closed form" in printed and "iterations to reach" in printed
    result = json.loads((tmp_path / "dae.json").read_text())
    transport = result["transport"]
    closed, fitted = transport["deep_closed_form"], transport["deep_fitted"]
    assert len(closed) == len(fitted) == 5
    assert all(np.diff(closed) < 0) and all(np.diff(fitted) < 0)
    assert fitted == pytest.approx(
        closed, abs=0.05
    )  # linear DAEs fitted to the samples follow the closed form
    assert transport["shallow_transported"][1] == pytest.approx(transport["shallow_closed_form"][1], abs=0.01)
    training = result["training"]
    shallow, deep = training["shallow"], training["deep"]
    assert shallow["losses"][0] == pytest.approx(deep["losses"][0], rel=1e-6)  # both start at the identity
    assert deep["windows"][-1][2] < 0.95 * shallow["windows"][-1][2]
    assert all(d[2] <= s[2] for d, s in zip(deep["windows"][1:], shallow["windows"][1:], strict=True))
    assert deep["iterations_to_shallow_final"] < 0.8 * shallow["iterations_to_shallow_final"]
    if _has_matplotlib():
        assert (tmp_path / "dae.png").stat().st_size > 0


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_iterations_to_reach():
    assert dae.iterations_to_reach([5, 4, 3, 2, 1], 3.0, 1) == 3
    assert dae.iterations_to_reach([5, 4, 3, 2, 1], 2.5, 2) == 4  # mean of (3, 2)
    assert dae.iterations_to_reach([5, 4], 1.0, 1) is None


# ----------------------------------------------------------------------------------------------------------
# LM coefficients and the modified equation (Lu et al., ICML 2018)
# ----------------------------------------------------------------------------------------------------------


def test_modified_equation_coefficients_values():
    assert modified_equation_coefficients(0.0) == (1.0, 0.5)  # ResNet (forward Euler): u' + dt/2 u'' = f
    assert modified_equation_coefficients(-0.5, dt=2.0) == pytest.approx((4.0, 3.0))
    assert modified_equation_coefficients(1.0) == (0.5, 0.0)
    assert modified_equation_coefficients(-1.0)[0] == math.inf
    dt_eff, inertia = modified_equation_coefficients(torch.tensor([0.0, -0.5]))
    assert torch.equal(dt_eff, torch.tensor([1.0, 2.0], dtype=F64))
    assert torch.equal(inertia, torch.tensor([0.5, 1.5], dtype=F64))
    with pytest.raises(ValueError, match="dt"):
        modified_equation_coefficients(0.0, dt=0.0)


def lte_slopes(k: float, lam: float, inertia=None) -> tuple[float, float]:
    """Slopes (in log dt) of the local truncation error of one LM step on u' = lam u.

    One step of lm_step from exact values u(-dt), u(0) of (a) the slow solution exp(r t) of the modified
    equation u' + c u'' = lam u / (1 + k) (c from modified_equation_coefficients, or ``inertia(dt)``), and
    (b) the solution exp(lam t / (1 + k)) of the plain ODE (1 + k) u' = lam u; the error is |u_1 - u(dt)|.
    """
    dts = np.array([0.1, 0.05, 0.025, 0.0125, 0.00625])
    errors: dict[str, list[float]] = {"modified": [], "plain": []}
    k_t = torch.tensor([k])  # k = -0.25 is exact in float32
    for dt in dts:
        dt_eff, c = modified_equation_coefficients(k, dt)
        c = inertia(dt) if inertia is not None else c
        g = lam * dt_eff / dt  # the right-hand side lam / (1 + k)
        r = (-1 + math.sqrt(1 + 4 * c * g)) / (2 * c)  # the root of c r^2 + r - g = 0 that tends to g
        for key, rate in (("modified", r), ("plain", lam / (1 + k))):
            u0 = torch.tensor([[1.0]], dtype=F64)
            u_prev = torch.tensor([[math.exp(-rate * dt)]], dtype=F64)
            dt_scale = torch.tensor([dt], dtype=F64)  # the step: scale * f with f = lam u
            u1 = lmfused.lm_step(u0, u_prev, lam * u0, k_t, scale=dt_scale, backend="reference")
            errors[key].append(abs(u1.item() - math.exp(rate * dt)))
    slope = {key: np.polyfit(np.log(dts), np.log(e), 1)[0] for key, e in errors.items()}
    return slope["modified"], slope["plain"]


def test_lm_step_matches_its_modified_equation_to_higher_order():
    # Against the modified equation the one-step error is (1 + k) dt^3/6 u''' = O(dt^3); against the plain
    # ODE it is (1 - k) dt^2/2 u'' = O(dt^2). A wrong u'' coefficient leaves an O(dt^2) error.
    k, lam = -0.25, 1.0
    modified, plain = lte_slopes(k, lam)
    assert modified > 2.8 and plain < 2.2
    wrong_sign, _ = lte_slopes(k, lam, inertia=lambda dt: (1 + k) * dt / (2 * (1 + k)))  # (1+k) for (1-k)
    assert wrong_sign < 2.2
    unscaled, _ = lte_slopes(k, lam, inertia=lambda dt: (1 - k) * dt / 2)  # missing the 1 / (1 + k)
    assert unscaled < 2.2


def test_lm_coefficients_report():
    model = stand_in()
    with torch.no_grad():
        model.layer1[1].step.k.fill_(-0.5)
    rows = lm_coefficients(model, dt=2.0)
    assert [(r["name"], r["stage"], r["block"]) for r in rows] == [
        ("layer1.0", 0, 0),
        ("layer1.1", 0, 1),
        ("layer1.2", 0, 2),
        ("layer2.0", 1, 0),
        ("layer2.1", 1, 1),
    ]
    assert rows[3]["k"] is None and rows[3]["dt_eff"] is None  # projection block: no k
    assert rows[1]["k"] == pytest.approx(-0.5) and rows[1]["channels"] == 1 and rows[1]["k_std"] == 0.0
    assert rows[1]["dt_eff"] == pytest.approx(4.0) and rows[1]["inertia"] == pytest.approx(3.0)
    assert rows[1]["zero_stable"] is True
    per_channel = stand_in(per_channel=True)
    with torch.no_grad():
        per_channel.layer1[1].step.k.copy_(torch.linspace(-1.5, 0.5, 8))
    row = lm_coefficients(per_channel)[1]
    assert row["channels"] == 8 and row["k_min"] == pytest.approx(-1.5) and row["k_max"] == pytest.approx(0.5)
    assert row["k"] == pytest.approx(-0.5) and row["zero_stable"] is False
    assert all(r["k"] is None for r in lm_coefficients(stand_in(lm=False)))


def test_analyze_flow_merges_coefficients_and_keeps_mode():
    model = stand_in().train()
    rows = analyze_flow(model, torch.randn(8, 3, 8, 8))
    assert model.training
    assert rows[1]["k"] == pytest.approx(-0.05) and rows[1]["displacement"] is not None
    assert {"entropy", "w2", "dt_eff", "inertia"} <= set(rows[0])


# ----------------------------------------------------------------------------------------------------------
# The analyze CLI
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def stand_in_zoo(monkeypatch):
    def build(name, num_classes=None):
        if name != "tiny":
            raise analyze.UsageError(f"--model: unknown model {name!r}")
        return stand_in()

    monkeypatch.setattr(analyze, "build_model", build)


def test_cli_writes_table_json_and_plot(stand_in_zoo, tmp_path, capsys):
    model = stand_in()
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    out = tmp_path / "out"
    argv = ["--model", "tiny", "--batch-size", "6", "--image-size", "8", "--out", str(out)]
    assert analyze.main([*argv, "--checkpoint", str(tmp_path / "ckpt.pt")]) == 0
    printed = capsys.readouterr().out
    assert "layer1.1" in printed and "entropy" in printed and "W2" in printed
    report = json.loads((out / "analysis.json").read_text())
    assert report["model"] == "tiny" and report["checkpoint"] == "ckpt.pt" and len(report["blocks"]) == 5
    assert report["blocks"][1]["k"] == pytest.approx(-0.05)
    if _has_matplotlib():
        assert (out / "analysis.png").stat().st_size > 0
    torch.save(model.state_dict(), tmp_path / "bare.pt")  # a bare state dict loads too
    assert (
        analyze.main(["--model", "tiny", "--batch-size", "4", "--checkpoint", str(tmp_path / "bare.pt")]) == 0
    )


def test_cli_digits(stand_in_zoo, capsys):
    pytest.importorskip("sklearn")
    assert (
        analyze.main(["--model", "tiny", "--data", "digits", "--batch-size", "8", "--image-size", "16"]) == 0
    )
    x = analyze.load_batch("digits", 8, 16, seed=1)
    assert x.shape == (8, 3, 16, 16) and abs(x.mean().item()) < 1e-5


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "nope"], "unknown model"),
        (["--model", "tiny", "--batch-size", "1"], "--batch-size"),
        (["--model", "tiny", "--data", "cifar"], "--data"),
        (["--model", "tiny", "--checkpoint", "missing.pt"], "--checkpoint: no such file"),
        (
            ["--model", "tiny", "--device", "nodevice"],
            "--device",
        ),
        (["--model", "tiny", "--image-size", "0"], "--image-size"),
    ],
)
def test_cli_bad_arguments_exit_2(stand_in_zoo, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        analyze.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_checkpoint_mismatch_exit_2(stand_in_zoo, tmp_path, capsys):
    torch.save({"model": {"bogus": torch.zeros(1)}}, tmp_path / "bad.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    for name in ("bad.pt", "junk.pt"):
        with pytest.raises(SystemExit) as exit_info:
            analyze.main(["--model", "tiny", "--checkpoint", str(tmp_path / name)])
        assert exit_info.value.code == 2
        assert "--checkpoint" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# The real zoo (runs once lmfused.models provides create_model)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lm", [True, False])
def test_zoo_model_recorder_and_metrics(lm):
    zoo = real_zoo()
    torch.manual_seed(0)
    model = zoo.create_model("lm_resnet20", lm=lm).eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        with FlowRecorder(model) as rec:
            got = model(x)
    assert torch.equal(got, expected) and hook_count(model) == 0
    assert {stage: len(states) for stage, states in rec.trajectories().items()} == {0: 4, 1: 4, 2: 4}
    rows = analyze_flow(model, x)
    assert len(rows) == 9 and all(r["entropy"] is not None for r in rows)
    ks = [r["k"] for r in rows]
    if lm:  # a stage's first block takes the plain step; the others learn k
        assert all(k is None for k in ks[::3]) and all(k is not None for i, k in enumerate(ks) if i % 3)
    else:
        assert all(k is None for k in ks)


def test_zoo_cli_end_to_end(tmp_path, capsys):
    zoo = real_zoo()
    torch.manual_seed(0)
    torch.save({"model": zoo.create_model("lm_resnet20").state_dict()}, tmp_path / "ckpt.pt")
    argv = ["--model", "lm_resnet20", "--batch-size", "4", "--image-size", "16", "--out", str(tmp_path / "o")]
    assert analyze.main([*argv, "--checkpoint", str(tmp_path / "ckpt.pt")]) == 0
    assert len(json.loads((tmp_path / "o" / "analysis.json").read_text())["blocks"]) == 9
    with pytest.raises(SystemExit) as exit_info:
        analyze.main(["--model", "no_such_model"])
    assert exit_info.value.code == 2
    assert "no_such_model" in capsys.readouterr().err


def test_converted_torchvision_resnet():
    torchvision = import_or_skip("torchvision")
    model = lmfused.convert_to_lm(torchvision.models.resnet18()).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        with FlowRecorder(model) as rec:
            got = model(x)
    assert torch.equal(got, expected)
    assert [len(states) for states in rec.trajectories().values()] == [3, 3, 3, 3]
    assert len(transport_metrics(rec)) == 8 and len(lm_coefficients(model)) == 8
