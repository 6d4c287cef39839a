"""Telling a failure of ``torch.compile`` from a failure of the step it compiles.

The first compiled step both compiles and runs. When the compiler fails (Dynamo cannot trace
the model, Inductor cannot lower or build it, no C++ compiler or Triton) the engine trains
eagerly instead, with a warning. Everything else (out of memory, a shape mismatch in the
model, which Dynamo reports as ``TorchRuntimeError`` while tracing) is the step's own error and
is raised as it is: training eagerly would only hit it again, reported as something else.
"""

from __future__ import annotations

import warnings

import torch


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions it wraps (``__cause__``, ``__context__``, ``inner_exception``)."""
    seen: list[BaseException] = []
    todo = [err]
    while todo:
        e = todo.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [e.__cause__, e.__context__, getattr(e, "inner_exception", None)]
    return seen


def _compiler_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(the compiler's exception types, those among them that carry the model's own error)."""
    from torch._dynamo import exc as dynamo
    from torch._inductor import exc as inductor

    names = ("OperatorIssue", "SubgraphLoweringException", "InvalidCxxCompiler")
    names += ("CppWrapperCodegenError", "CppCompileError")
    failed = (
        dynamo.TorchDynamoException,
        *(getattr(inductor, n) for n in names if hasattr(inductor, n)),
    )
    own = tuple(
        getattr(dynamo, n)
        for n in ("TorchRuntimeError", "ObservedException", "UserError")
        if hasattr(dynamo, n)
    )
    return failed, own


def is_compiler_error(err: BaseException) -> bool:
    """Whether ``err``, raised by a compiled step, is the compiler failing (fall back to eager
    mode) rather than the step itself (out of memory, a bug or a shape error: re-raise)."""
    if any(isinstance(e, (torch.OutOfMemoryError, MemoryError)) for e in _chain(err)):
        return False
    try:
        failed, own = _compiler_types()
    except ImportError:  # a build without Dynamo: nothing it raises is the compiler's
        return False
    return isinstance(err, failed) and not isinstance(err, own)


def compile_or_eager(net: torch.nn.Module) -> torch.nn.Module | None:
    """``torch.compile(net)``, or None (with :func:`warn_unavailable`) where it cannot be set up
    (no compiler, an unsupported platform)."""
    try:
        return torch.compile(net)
    except Exception as err:
        warn_unavailable(err, stacklevel=4)
        return None


def warn_unavailable(err: BaseException, stacklevel: int = 3) -> None:
    warnings.warn(
        f"torch.compile is unavailable ({type(err).__name__}: {str(err)[:200]}); "
        "training without it",
        stacklevel=stacklevel,
    )
