"""Helpers shared by every op: input checks, launch settings, device queries, dropout seeds."""

from __future__ import annotations

import functools
import importlib.util
import os

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

    Narrow rows are packed several to a program so each program still moves ~16 KiB.
    """
    block_n = next_pow2(n_cols)
    block_m = max(1, min(16, 4096 // block_n))
    tile_bytes = block_m * block_n * elem_bytes
    num_warps = max(1, min(16, tile_bytes // 2048))
    return block_m, block_n, next_pow2(num_warps)


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """autocast's low-precision dtype when autocast is enabled on ``t``'s device, else None."""
    kind = t.device.type
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


def check_float(t: torch.Tensor, name: str, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> None:
    """TypeError naming ``name`` unless ``t`` is a tensor of one of ``dtypes``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have a floating dtype ({allowed}), got {str(t.dtype).replace('torch.', '')}")


def check_like(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    """TypeError/ValueError unless ``t`` shares ``ref``'s dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must be on one device")


def check_dropout_p(p: float, name: str = "dropout_p") -> float:
    if not isinstance(p, (int, float)) or isinstance(p, bool):
        raise TypeError(f"{name} must be a float, got {type(p).__name__}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p}")
    return float(p)


def dropout_seed(p: float) -> torch.Tensor | None:
    """A fresh Philox seed drawn from torch's default CPU generator, or None when there is no dropout.

    The seed is a CPU int64 scalar tensor so that it can flow through custom ops and torch.compile
    without a device sync; kernels read it on the host at launch.
    """
    if p == 0.0:
        return None
    return torch.randint(0, 2**62, (), dtype=torch.int64)


def stream_handle(device: torch.device) -> int:
    """The raw cudaStream_t of torch's current stream on ``device``, as an int for fastformer._C."""
    return torch.cuda.current_stream(device).cuda_stream
