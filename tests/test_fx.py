"""torch.fx: the fused ops are graph leaves, so the zoo traces (torch.fx.symbolic_trace), torchvision's
create_feature_extractor and timm's feature extraction (FX included) work on it, and a torchvision detection
model trains on an lmfused backbone."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.fx
from torch import nn

import lmfused
from lmfused.models import create_model
from lmfused.nn import LMStep
from tests.conftest import import_or_skip


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def called_functions(graph_module: torch.fx.GraphModule) -> list[str]:
    return [
        getattr(n.target, "__name__", str(n.target))
        for n in graph_module.graph.nodes
        if n.op == "call_function"
    ]


def blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if getattr(m, "is_lm_block", False)]


def feature_modules(model: nn.Module) -> list[str]:
    return [info["module"] for info in model.feature_info]


# ----------------------------------------------------------------------------------------------------------
# torch.fx.symbolic_trace
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, size, kwargs", [
    ("lm_resnet20", 16, {}),
    ("lm_resnet20", 16, {"per_channel_k": True, "lm": False}),
    ("lm_resnet50", 32, {}),
])  # fmt: skip
def test_symbolic_trace_eval_is_the_eager_model(name, size, kwargs, monkeypatch):
    """One op node per block (the update), the norms as modules, the stem's feature module called; the graph
    computes the eager model's output (bitwise that of the eager model with the norms unfused, as in the
    graph)."""
    torch.manual_seed(0)
    model = create_model(name, **kwargs).eval()
    graph = torch.fx.symbolic_trace(model)
    functions = called_functions(graph)
    assert functions.count("lm_step") == len(blocks(model))
    assert not {"batch_norm_lm_step", "batch_norm_relu"} & set(functions)
    modules = {n.target for n in graph.graph.nodes if n.op == "call_module"}
    assert feature_modules(model)[0] in modules  # the stem's map: a call of the module feature_info names
    x = images(2, size)
    with torch.no_grad():
        fused = model(x)
        monkeypatch.setenv("LMFUSED_FUSE_BN", "0")
        assert torch.equal(graph(x), model(x))
        torch.testing.assert_close(graph(x), fused, rtol=1e-5, atol=1e-5)


def test_symbolic_trace_without_the_gradient_pass_through(monkeypatch):
    """LMFUSED_GRADIENT_PASSTHROUGH=0: the steps' lm_step calls stay leaves (the switch acts when the graph
    runs: the shortcut is then u itself)."""
    monkeypatch.setenv("LMFUSED_GRADIENT_PASSTHROUGH", "0")
    monkeypatch.setenv("LMFUSED_FUSE_BN", "0")
    torch.manual_seed(0)
    model = create_model("lm_resnet20").eval()
    graph = torch.fx.symbolic_trace(model)
    functions = called_functions(graph)
    assert functions.count("lm_step") == len(blocks(model))
    x = images(2, 16)
    with torch.no_grad():
        assert torch.equal(graph(x), model(x))


@pytest.mark.parametrize("library, name", [("torchvision", "resnet18"), ("timm", "resnet18d")])
def test_symbolic_trace_of_converted_models(library, name, monkeypatch):
    """A torchvision or timm ResNet converted by lmfused.convert_to_lm traces as the zoo does."""
    torch.manual_seed(0)
    if library == "timm":
        model = import_or_skip("timm").create_model(name)
    else:
        model = getattr(import_or_skip("torchvision.models"), name)()
    model = lmfused.convert_to_lm(model, k_init=(-0.1, 0.0)).eval()
    graph = torch.fx.symbolic_trace(model)
    assert called_functions(graph).count("lm_step") == len(blocks(model))
    monkeypatch.setenv("LMFUSED_FUSE_BN", "0")
    x = images(2, 32)
    with torch.no_grad():
        assert torch.equal(graph(x), model(x))


def test_symbolic_trace_train_is_the_eager_model(monkeypatch):
    """A training graph (per-sample stochastic depth, noise, per-channel k) draws what the eager model draws
    from the same seed, gives the same gradients, and updates the running statistics as it does, step after
    step (num_batches_tracked included)."""
    torch.manual_seed(0)
    model = create_model("lm_resnet20", survival_prob=0.7, noise_std=0.1, per_channel_k=True).train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # the cumulative average: its momentum comes from num_batches_tracked
    eager = copy.deepcopy(model)
    graph = torch.fx.symbolic_trace(model)
    monkeypatch.setenv("LMFUSED_FUSE_BN", "0")  # the graph's norms are modules
    for step in range(2):
        outputs = []
        for net in (graph, eager):
            net.zero_grad()
            torch.manual_seed(10 + step)
            out = net(images(4, 16, seed=step))
            out.square().mean().backward()
            outputs.append(out)
        torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    grads = {n: p.grad for n, p in eager.named_parameters()}
    assert all(g is not None for g in grads.values())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-6, atol=1e-7, msg=name)
    for (name, ours), theirs in zip(model.named_buffers(), eager.buffers(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7, msg=name)


def test_symbolic_trace_refuses_batch_mode_stochastic_depth():
    model = create_model("lm_resnet20", survival_prob=0.8, sd_mode="batch").train()
    with pytest.raises(RuntimeError, match="sd_mode"):
        torch.fx.symbolic_trace(model)
    torch.fx.symbolic_trace(model.eval())  # evaluation draws nothing


def test_traced_step_checks_its_arguments_when_the_graph_runs():
    """The op is a leaf, not a weakened copy: its argument checks run on the tensors the graph gets."""

    class Step(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.step = LMStep()

        def forward(self, u, u_prev, f):
            return self.step(u, u_prev, f)

    graph = torch.fx.symbolic_trace(Step())
    u = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(graph(u, u, u), Step()(u, u, u))
    with pytest.raises(ValueError, match="u_prev: expected shape"):
        graph(u, u[:1], u)
    with pytest.raises(ValueError, match="f: expected shape"):
        graph(u, u, u[:, :2])


# ----------------------------------------------------------------------------------------------------------
# torchvision's create_feature_extractor, timm's feature classes
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, size", [("lm_resnet20", 16), ("lm_resnet50", 32)])
def test_torchvision_create_feature_extractor(name, size, monkeypatch):
    """The maps of every feature_info module, as forward_intermediates gives them; train and eval graphs
    have the same nodes (no warning); the training extractor's backward reaches every parameter it uses."""
    feature_extraction = import_or_skip("torchvision.models.feature_extraction")
    torch.manual_seed(0)
    model = create_model(name).eval()
    nodes = {module: str(i) for i, module in enumerate(feature_modules(model))}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_nodes, eval_nodes = feature_extraction.get_graph_node_names(model)
        extractor = feature_extraction.create_feature_extractor(model, nodes)
    assert train_nodes == eval_nodes and not [w for w in caught if "train mode" in str(w.message)]
    x = images(2, size)
    monkeypatch.setenv("LMFUSED_FUSE_BN", "0")
    with torch.no_grad():
        maps = list(extractor(x).values())
        expected = model.forward_intermediates(x, intermediates_only=True)
    assert len(maps) == len(expected) == len(nodes)
    for got, want in zip(maps, expected, strict=True):
        assert torch.equal(got, want)
    extractor.train()
    sum(m.square().mean() for m in extractor(x).values()).backward()
    assert all(p.grad is not None for p in extractor.parameters())


@pytest.mark.parametrize("feature_cls", ["getter", "fx", "list", "dict", "hook"])
def test_timm_features_only_classes(feature_cls, monkeypatch):
    """timm's feature classes, its FX one ("fx", FeatureGraphNet) included, give the maps of the default
    ("getter", forward_intermediates) and carry the model's cfg as timm's own features_only models do."""
    timm = import_or_skip("timm")
    monkeypatch.setenv("LMFUSED_FUSE_BN", "0")  # the unfused norms: bitwise one function for every class
    x = images(2, 32)
    with torch.no_grad():
        torch.manual_seed(0)
        default = timm.create_model("lm_resnet50", features_only=True, out_indices=(0, 2, 4)).eval()
        torch.manual_seed(0)
        features = timm.create_model(
            "lm_resnet50", features_only=True, out_indices=(0, 2, 4), feature_cls=feature_cls
        ).eval()
        got = features(x)
        got = list(got.values()) if isinstance(got, dict) else got
        assert [m.shape[1] for m in got] == features.feature_info.channels() == [64, 512, 2048]
        for ours, theirs in zip(got, default(x), strict=True):
            assert torch.equal(ours, theirs)
    cfg = features.pretrained_cfg
    assert features.default_cfg is cfg and cfg["architecture"] == "lm_resnet50"
    assert cfg["input_size"] == (3, 224, 224) and "num_classes" not in cfg  # as timm's features cfg
    if feature_cls == "fx":
        assert "lm_step" in called_functions(features.graph_module)


# ----------------------------------------------------------------------------------------------------------
# A torchvision detection model on an lmfused backbone
# ----------------------------------------------------------------------------------------------------------


class FeaturesWithFPN(nn.Module):
    """What torchvision's BackboneWithFPN builds, around any body returning the four stage maps."""

    def __init__(self, body: nn.Module, in_channels: list[int], out_channels: int) -> None:
        super().__init__()
        ops = import_or_skip("torchvision.ops")
        pools = import_or_skip("torchvision.ops.feature_pyramid_network")
        self.body = body
        self.fpn = ops.FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=pools.LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        maps = self.body(x)
        maps = maps if isinstance(maps, dict) else {str(i): m for i, m in enumerate(maps)}
        return self.fpn(maps)


def detection_backbone(kind: str) -> nn.Module:
    """An FPN of 32 channels over the four stage maps of LM-ResNet-50 (stochastic depth on), built the way
    ``kind`` names."""
    layers = {f"layer{i + 1}": str(i) for i in range(4)}
    channels = [256, 512, 1024, 2048]
    if kind == "timm features_only":
        timm = import_or_skip("timm")
        body = timm.create_model(
            "lm_resnet50", features_only=True, out_indices=(1, 2, 3, 4), drop_path_rate=0.2
        )
        return FeaturesWithFPN(body, channels, 32)
    model = create_model("lm_resnet50", survival_prob=0.8, num_classes=0)
    if kind == "BackboneWithFPN":  # torchvision's own: its IntermediateLayerGetter runs the model's children
        backbone_utils = import_or_skip("torchvision.models.detection.backbone_utils")
        return backbone_utils.BackboneWithFPN(model, layers, channels, 32)
    feature_extraction = import_or_skip("torchvision.models.feature_extraction")
    return FeaturesWithFPN(feature_extraction.create_feature_extractor(model, layers), channels, 32)


# Stochastic depth samples in training only: torchvision notes that the train and eval graphs differ.
@pytest.mark.filterwarnings("ignore:The nodes obtained by tracing the model in train mode:UserWarning")
@pytest.mark.parametrize("kind", ["BackboneWithFPN", "create_feature_extractor", "timm features_only"])
def test_faster_rcnn_trains_on_an_lm_backbone(kind):
    """torchvision's Faster R-CNN with an FPN over LM-ResNet-50: a training step's losses are finite and
    every backbone parameter, k included, gets a gradient; then it detects in eval mode."""
    detection = import_or_skip("torchvision.models.detection")
    heads = import_or_skip("torchvision.models.detection.faster_rcnn")
    torch.manual_seed(0)
    backbone = detection_backbone(kind)
    detector = detection.FasterRCNN(
        backbone,
        min_size=64,
        max_size=64,
        rpn_batch_size_per_image=16,
        rpn_pre_nms_top_n_train=64,
        rpn_post_nms_top_n_train=32,
        box_batch_size_per_image=16,
        box_head=heads.TwoMLPHead(32 * 7 * 7, 64),
        box_predictor=heads.FastRCNNPredictor(64, 3),
    ).train()
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])},
        {
            "boxes": torch.tensor([[10.0, 8.0, 30.0, 60.0], [0.0, 0.0, 20.0, 20.0]]),
            "labels": torch.tensor([2, 1]),
        },
    ]
    losses = detector(list(images(2, 64)), targets)
    assert set(losses) >= {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    used = list(backbone.named_parameters())
    assert [n for n, p in used if p.grad is None] == []
    k = [p for n, p in used if n.endswith(".k")]
    assert len(k) == 16 - 4 and all(torch.isfinite(g.grad).all() for g in k)
    detector.eval()
    with torch.no_grad():
        detections = detector(list(images(1, 64, seed=3)))
    assert set(detections[0]) == {"boxes", "labels", "scores"}
