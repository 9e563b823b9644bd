"""Backend discovery and selection.

Every op in fastformer has three implementations:

- ``triton``: Triton kernels. Runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1``
  was set before triton was imported (that is how CI tests the kernels).
- ``cuda``: CUDA C++ kernels from the torch-free extension ``fastformer._C``. CUDA tensors only.
- ``torch``: the pure-PyTorch reference. Always available; the CPU path.

The backend for a call is chosen in this order: the op's ``backend=`` argument, then the innermost
``with fastformer.use_backend(name):`` block, then the ``FASTFORMER_BACKEND`` environment variable,
then ``auto``. A backend named explicitly that cannot serve the call raises :class:`BackendError`
saying why; ``auto`` picks the first fused backend that can serve a CUDA call and the torch path for
everything else.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch

from fastformer import utils

BACKENDS: tuple[str, ...] = ("triton", "cuda", "torch")
_CHOICES = (*BACKENDS, "auto")

# A plain list (not a ContextVar) so that torch.compile can trace `selected()` without a graph break.
_STACK: list[str] = []


class BackendError(RuntimeError):
    """An explicitly requested backend cannot serve this call."""


def _check_name(name: str, what: str) -> str:
    if name not in _CHOICES:
        raise ValueError(f"{what}: unknown backend {name!r}; expected one of {', '.join(_CHOICES)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the block on backend ``name`` (one of triton, cuda, torch, auto)."""
    _STACK.append(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _STACK.pop()


def selected(requested: str | None = None) -> str:
    """The backend name in force for a call: argument, then context, then environment, then 'auto'."""
    if requested is not None:
        return _check_name(requested, "backend")
    if _STACK:
        return _STACK[-1]
    env = os.environ.get("FASTFORMER_BACKEND")
    if env:
        return _check_name(env.strip().lower(), "FASTFORMER_BACKEND")
    return "auto"


def device_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device`` at all, or None if it can."""
    if name == "torch":
        return None
    if name == "triton":
        if not utils.triton_available():
            return "triton is not installed"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and utils.interpreting():
            return None
        return f"triton needs a CUDA tensor (got {device.type}; set TRITON_INTERPRET=1 to interpret on CPU)"
    if name == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors (got {device.type})"
        from fastformer import _ext

        return _ext.unavailable_reason()
    raise ValueError(f"unknown backend {name!r}")


def select(
    op: str,
    device: torch.device,
    requested: str | None = None,
    why_not: Callable[[str], str | None] | None = None,
    prefer: tuple[str, ...] = ("triton", "cuda"),
) -> str:
    """Pick the backend for one call of ``op`` on ``device``.

    ``why_not(name)`` lets an op refuse a backend for this call (a dtype or shape it does not
    support) by returning the reason; None means it can serve the call.
    """
    name = selected(requested)

    def reason(b: str) -> str | None:
        return device_reason(b, device) or (why_not(b) if why_not is not None else None)

    if name != "auto":
        why = reason(name)
        if why is not None:
            raise BackendError(f"{op}: backend {name!r} cannot serve this call: {why}")
        return name
    if device.type == "cuda":
        for b in prefer:
            if reason(b) is None:
                return b
    return "torch"


def status(device: torch.device | str | None = None) -> dict[str, str | None]:
    """Map each backend to None if it can run on ``device`` (default: cuda if present, else cpu), else why not."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return {b: device_reason(b, device) for b in BACKENDS}


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of the backends that can run on ``device`` (default: cuda if present, else cpu)."""
    return [b for b, why in status(device).items() if why is None]
