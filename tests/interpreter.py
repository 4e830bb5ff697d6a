"""Triton's interpreter without its redundant work on nested @triton.jit calls.

On every call of a @triton.jit helper from inside a kernel, the interpreter (Triton 3.8, 3.9) patches
triton.language again (``_patch_lang``: ``inspect.getmembers`` over the language modules), although the
kernel's launch patched the same modules and that patch is still in place; the nested patch changes
nothing and is never undone. It took 30-45% of the interpreter tests' time (in the suite: the 4100-channel
lm_step tiling case 47 -> 27 s, ``lmfused.check --cpu`` 46 -> 31 s, the batch-norm opcheck 31 -> 21 s).
:func:`skip_nested_language_patching` skips it while the running launch's patch covers the helper's
language modules; the kernels run exactly as before.
"""

from __future__ import annotations

import inspect


def skip_nested_language_patching() -> bool:
    """Install the skip; returns False (and changes nothing) when this Triton's interpreter is not the one
    described above."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except Exception:  # noqa: BLE001 - no Triton, or no interpreter: nothing to speed up
        return False
    patch_lang = getattr(interpreter, "_patch_lang", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if patch_lang is None or scope_type is None or executor is None:
        return False
    if getattr(patch_lang, "skips_nested", False):
        return True
    launch = {"patched": None}  # the language modules (ids) the running launch has patched, else None

    def language_modules(fn) -> set[int]:  # the modules _patch_lang patches for fn
        return {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}

    def patch_once(fn):
        wanted = language_modules(fn)
        patched = launch["patched"]
        if patched is not None and wanted <= patched:
            return scope_type()  # a helper called by the running kernel: nothing left to patch
        scope = patch_lang(fn)
        if patched is None:
            launch["patched"] = wanted  # the launch's own patch (GridExecutor.__call__ calls it first)
        else:
            patched |= wanted
        return scope

    run_launch = executor.__call__

    def launch_kernel(self, *args, **kwargs):
        launch["patched"] = None
        try:
            return run_launch(self, *args, **kwargs)
        finally:
            launch["patched"] = None

    patch_once.skips_nested = True
    interpreter._patch_lang = patch_once
    executor.__call__ = launch_kernel
    return True
