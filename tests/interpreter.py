"""Triton's interpreter without the work whose result it never uses.

Three things the interpreter (Triton 3.8, 3.9) does on every kernel call or operation change nothing in what
a kernel computes or raises; together they took about half of the interpreter tests' time. Each is skipped
only where that is so, and the kernels run exactly as before:

- On every call of a @triton.jit helper from inside a kernel it patches triton.language again
  (``_patch_lang``: ``inspect.getmembers`` over the language modules), although the kernel's launch patched
  the same modules and that patch is still in place: 30-45% of the time (the 4100-channel lm_step tiling
  case 47 -> 27 s, ``lmfused.check --cpu`` 46 -> 31 s). :func:`skip_nested_language_patching` skips it
  while the running launch's patch covers the helper's language modules.
- Every integer ``+``, ``-`` and ``*`` narrower than 64 bits is recomputed in int64 and compared with the
  type's range (``binary_op_sanitize_overflow_impl``), and the result goes to ``device_assert``, which
  returns without looking at it unless the interpreter's options say ``debug`` (they never do: its
  builder's options are the defaults). About 30% of the time left. :func:`skip_unread_overflow_checks`
  skips the computation when ``debug`` is off; with ``debug`` on, the check runs as before.
- ``_get_np_dtype`` builds a table of 19 dtypes on each of its (hundreds of thousands of) calls; the answer
  depends only on the scalar type. :func:`remember_numpy_dtypes` keeps each answer.
"""

from __future__ import annotations

import inspect


def install_interpreter_speedups() -> list[str]:
    """Install the three skips above; returns the names of those installed (an interpreter unlike the one
    described above keeps its own behaviour where it differs)."""
    installers = (skip_nested_language_patching, skip_unread_overflow_checks, remember_numpy_dtypes)
    return [install.__name__ for install in installers if install()]


def _interpreter():
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except Exception:  # noqa: BLE001 - no Triton, or no interpreter: nothing to speed up
        return None, None
    return tl, interpreter


def skip_nested_language_patching() -> bool:
    """Install the nested-patch skip; returns False (and changes nothing) when this Triton's interpreter is
    not the one described above."""
    tl, interpreter = _interpreter()
    patch_lang = getattr(interpreter, "_patch_lang", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if patch_lang is None or scope_type is None or executor is None:
        return False
    if getattr(patch_lang, "skips_nested", False):
        return True
    launch = {"patched": None}  # the language modules (ids) the running launch has patched, else None
    modules_of = {}  # function -> the ids of its language modules (a function keeps its globals)

    def language_modules(fn) -> frozenset[int]:  # the modules _patch_lang patches for fn
        found = modules_of.get(fn)
        if found is None:
            found = frozenset(
                id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)
            )
            modules_of[fn] = found
        return found

    def patch_once(fn):
        wanted = language_modules(fn)
        patched = launch["patched"]
        if patched is not None and wanted <= patched:
            return scope_type()  # a helper called by the running kernel: nothing left to patch
        scope = patch_lang(fn)
        launch["patched"] = wanted if patched is None else patched | wanted
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


def skip_unread_overflow_checks() -> bool:
    """Install the overflow-check skip on the interpreter's semantic object (compiled kernels use others);
    returns False when its check or its ``device_assert`` is not the one described above."""
    tl, interpreter = _interpreter()
    semantic = getattr(interpreter, "interpreter_semantic", None)
    check = getattr(semantic, "binary_op_sanitize_overflow_impl", None)
    if check is None or not hasattr(semantic, "device_assert"):
        return False
    if getattr(check, "skips_unread", False):
        return True
    device_assert = inspect.getsource(type(semantic).device_assert)
    if "if not self.builder.options.debug:\n            return" not in device_assert:
        return False  # a device_assert that may read the condition without debug

    def check_if_read(lhs, rhs, binary_op):
        if semantic.builder.options.debug:
            return check(lhs, rhs, binary_op)
        # What the check asserts before computing anything, so that a kernel raises where it raised.
        if lhs.type.scalar.int_bitwidth >= 64 or not semantic.builder.options.sanitize_overflow:
            return None
        assert lhs.type.scalar == rhs.type.scalar, (
            f"expected matching operand types, got {lhs.type.scalar} and {rhs.type.scalar}"
        )
        assert lhs.type.scalar.is_int(), f"expected integer type, got {lhs.type.scalar}"
        return None

    check_if_read.skips_unread = True
    semantic.binary_op_sanitize_overflow_impl = check_if_read
    return True


def remember_numpy_dtypes() -> bool:
    """Install the memo of ``_get_np_dtype``; returns False when the interpreter has none."""
    tl, interpreter = _interpreter()
    numpy_dtype = getattr(interpreter, "_get_np_dtype", None)
    if numpy_dtype is None:
        return False
    if getattr(numpy_dtype, "remembers", False):
        return True
    known = {}

    def remembered(tt_dtype):
        scalar = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
        if isinstance(scalar, tl.pointer_type):  # (pointer types are not hashable)
            return numpy_dtype(scalar)
        try:
            return known[scalar]
        except KeyError:
            known[scalar] = found = numpy_dtype(scalar)
            return found
        except TypeError:  # not hashable: not a dtype the table holds, the original says what it does
            return numpy_dtype(tt_dtype)

    remembered.remembers = True
    remembered.original = numpy_dtype
    interpreter._get_np_dtype = remembered
    return True
