"""README.md runs as written: its Python blocks run on the CPU, the modules and make targets its commands
name exist, and the pages it links to are there."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from tests.conftest import import_or_skip

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def test_readme_is_short():
    assert len(README.splitlines()) <= 200


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_blocks_run(index):
    code = _blocks("python")[index]
    if re.search(r"^import torchvision", code, flags=re.MULTILINE):
        import_or_skip("torchvision")
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})


def test_commands_name_what_exists():
    commands = "\n".join(_blocks("bash"))
    modules = set(re.findall(r"python -m ([\w.]+)", commands + README)) | set(
        re.findall(r"-m ([\w.]+)", commands)
    )
    modules -= {"pip"}
    assert {"lmfused.train", "lmfused.info", "lmfused.check"} <= modules
    for module in sorted(modules):
        assert importlib.util.find_spec(module) is not None, module
    makefile = (ROOT / "Makefile").read_text()
    for target in set(re.findall(r"^make (\w[\w-]*)", commands, flags=re.MULTILINE)) | {
        "cuda-emulated",
        "cuda-sass",
    }:
        assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.MULTILINE), target


def test_linked_pages_exist():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    assert links
    for link in links:
        assert (ROOT / link).is_file(), link
