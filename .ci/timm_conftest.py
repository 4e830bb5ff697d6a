"""conftest.py for timm's own model tests (tests/test_models.py from the source distribution of the installed
timm), run on lmfused's models by .ci/timm_model_tests.sh.

Importing lmfused.models registers the lm_* models in timm's registry before test_models.py lists models at
collection; then only the tests parametrized with an lm_* model are kept (the others are reported as
deselected). Skips are timm's own.
"""

import lmfused.models  # noqa: F401  (registers the lm_* models with timm)


def pytest_collection_modifyitems(config, items):
    kept, deselected = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        name = callspec.params.get("model_name", "") if callspec is not None else ""
        (kept if isinstance(name, str) and name.startswith("lm_") else deselected).append(item)
    config.hook.pytest_deselected(items=deselected)
    items[:] = kept
