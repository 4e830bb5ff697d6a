#!/usr/bin/env bash
# timm's own model tests on the lm_* models: tests/test_models.py from the source distribution of the installed
# timm (fetched, never copied into this repository), with .ci/timm_conftest.py as its conftest, which
# imports lmfused (registering the models with timm) and keeps the tests parametrized with an lm_* model.
# Usage: .ci/timm_model_tests.sh [PYTHON] [pytest arguments...]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
shift || true
case $python in */*) python="$(cd "$(dirname "$python")" && pwd)/$(basename "$python")" ;; esac  # we cd below
version=$("$python" -c "import timm; print(timm.__version__)")
dir=build/timm-tests
rm -rf "$dir"
mkdir -p "$dir"
"$python" -m pip download -q --no-binary :all: --no-deps "timm==$version" -d "$dir"
# Only its tests and its pytest configuration (markers): the installed timm is the one tested.
tar -xzf "$dir/timm-$version.tar.gz" -C "$dir" --strip-components=1 "timm-$version/tests" "timm-$version/pyproject.toml"
cp .ci/timm_conftest.py "$dir/conftest.py"
cd "$dir"
# One thread: on a busy 2-core machine OpenMP's spinning threads cost more than they give (user time 35 s
# against 186 s with the default threads, for the same tests).
OMP_NUM_THREADS=1 "$python" -m pytest -q -rs -p no:cacheprovider -W ignore::pytest.PytestUnknownMarkWarning tests/test_models.py "$@"
