"""Helpers shared by every op: input checks, launch settings, device queries, raw pointers for fastformer._C."""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# dtype codes understood by fastformer._C (csrc/common.cuh: enum class DType)
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


# a constant, not a cached call: torch.compile traces backend selection on every call
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _HAS_TRITON


def interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Number of streaming multiprocessors; a small stand-in under the interpreter (programs run serially)."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def row_settings(n_cols: int, elem_bytes: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for kernels that hold whole rows of ``n_cols`` in registers.

    Narrow rows are packed several to a program so each program still moves ~16 KiB. BLOCK_N is at least 4: a
    dropout tile covers whole groups of 4 columns (kernels/dropout.py).
    """
    block_n = max(4, next_pow2(n_cols))
    block_m = max(1, min(16, 4096 // block_n))
    tile_bytes = block_m * block_n * elem_bytes
    num_warps = max(1, min(16, tile_bytes // 2048))
    return block_m, block_n, next_pow2(num_warps)


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """autocast's low-precision dtype when autocast is enabled on ``t``'s device, else None."""
    kind = t.device.type
    if kind == "meta" or not torch.amp.is_autocast_available(kind):
        return None  # meta tensors (shape inference) and devices autocast does not know
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def autocast_args(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Floating tensors cast to autocast's dtype when it is on, as ``F.linear`` and SDPA are under autocast.

    Custom ops are invisible to autocast, so the matmul-like ops call this on their inputs themselves.
    """
    ref = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    dtype = autocast_dtype(ref) if ref is not None else None
    if dtype is None:
        return list(tensors)
    return [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors]


def check_tensor(t: object, name: str) -> None:
    """TypeError naming ``name`` unless ``t`` is a tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_device(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    """ValueError unless ``t`` is on ``ref``'s device."""
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must be on one device")


def check_float(t: torch.Tensor, name: str, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> None:
    """TypeError naming ``name`` unless ``t`` is a tensor of one of ``dtypes``."""
    check_tensor(t, name)
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have a floating dtype ({allowed}), got {str(t.dtype).replace('torch.', '')}")


def check_like(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    """TypeError/ValueError unless ``t`` shares ``ref``'s dtype and device."""
    check_tensor(t, name)
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")
    check_device(t, name, ref, ref_name)


def stream_handle(device: torch.device) -> int:
    """The raw cudaStream_t of torch's current stream on ``device``, as an int for fastformer._C."""
    return torch.cuda.current_stream(device).cuda_stream


def ptr(t: torch.Tensor | None) -> int:
    """The raw device address of ``t`` for fastformer._C, 0 for an absent tensor."""
    return 0 if t is None else t.data_ptr()


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """``input_precision`` of ``tl.dot``: tf32 for fp32 inputs on a GPU where torch allows it, else ieee.

    16-bit inputs ignore it; the interpreter computes in full precision either way.
    """
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def autotune_enabled() -> bool:
    """Whether Triton kernels autotune: on a GPU unless ``FASTFORMER_AUTOTUNE=0`` (quick checks, CUDA graphs)."""
    return not interpreting() and os.environ.get("FASTFORMER_AUTOTUNE", "1") != "0"


_AUTOTUNED: dict[tuple[str, str], object] = {}


def autotuned(name: str, kernel: object, configs: Callable[[], list], key: list[str], prune: Callable | None = None):
    """``kernel`` wrapped once in ``triton.autotune`` and cached under ``name`` (one tuner per launch site).

    ``configs`` builds the candidate ``triton.Config`` list; ``prune`` is an ``early_config_prune`` hook.
    """
    cache_key = (name, ",".join(key))
    if cache_key not in _AUTOTUNED:
        import triton

        extra = {"prune_configs_by": {"early_config_prune": prune}} if prune is not None else {}
        _AUTOTUNED[cache_key] = triton.autotune(configs(), key=key, **extra)(kernel)
    return _AUTOTUNED[cache_key]


def tma_capable(device: torch.device) -> bool:
    """Whether Triton kernels on ``device`` may use tensor descriptors (TMA): sm_90 or newer, or the interpreter
    (which emulates them, so CPU tests cover the descriptor code path)."""
    if interpreting():
        return True
    if device.type != "cuda":
        return False
    return _major(device.index if device.index is not None else torch.cuda.current_device()) >= 9


@functools.cache
def _major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def tma_aligned(*tensors: torch.Tensor | None) -> bool:
    """Whether every given tensor can back a tensor descriptor: 16-byte aligned base, unit last stride and every
    other stride a multiple of 16 bytes (TMA's rules), so any sub-block offset by whole rows stays aligned."""
    for t in tensors:
        if t is None:
            continue
        elem = t.element_size()
        if t.data_ptr() % 16 or t.stride(-1) != 1 or any(s * elem % 16 for s in t.stride()[:-1]):
            return False
    return True


def _descriptor_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:  # noqa: ARG001
    return torch.empty(size, dtype=torch.int8, device="cpu" if interpreting() else "cuda")


def ensure_tma_allocator() -> None:
    """Give Triton an allocator for the scratch of device-side tensor descriptors (``tl.make_tensor_descriptor``),
    unless the caller has set one: Triton's default refuses every allocation. Per context, so call it per launch."""
    import triton
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_descriptor_scratch)
