"""Attention on the CUDA C++ tensor-core kernels of csrc/attention.cu (fastformer._C): fp16/bf16, head dims 64 and
128, sm_80 and later (``api._why_not`` refuses anything else with the reason).

The forward has two kernels: mma.sync (sm_80 and later) and wgmma (sm_90a). The wgmma forward has run only in the
host emulation so far, so it is opt-in: ``FASTFORMER_CUDA_WGMMA=1`` on an sm_90 GPU with a build holding sm_90a code
(the default ``FASTFORMER_CUDA_ARCHS``) until a recorded GPU run shows it correct and faster.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import Tensor

from fastformer import _ext, utils
from fastformer.ops import dropout
from fastformer.ops.attention.op import AttentionArgs, lastdim

HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16)


def reason(q: Tensor) -> str | None:
    """Why the CUDA kernels cannot take q (and k, v like it), or None."""
    if q.dtype not in DTYPES:
        return f"the CUDA attention kernels take float16 or bfloat16, got {q.dtype}"
    if q.shape[-1] not in HEAD_DIMS:
        return f"the CUDA attention kernels take head dimension 64 or 128, got {q.shape[-1]} (Triton takes it)"
    if q.is_cuda and torch.cuda.get_device_capability(q.device) < (8, 0):
        return "the CUDA attention kernels need compute capability 8.0 or newer (mma.sync m16n8k16, cp.async)"
    return None


def use_wgmma(q: Tensor) -> bool:
    """Whether the forward runs the sm_90a (wgmma) kernel for q: see the module docstring."""
    if os.environ.get("FASTFORMER_CUDA_WGMMA", "0") != "1" or not q.is_cuda:
        return False
    return torch.cuda.get_device_capability(q.device) == (9, 0) and _ext.load().has_sm90a()


def aligned(t: Tensor) -> Tensor:
    """``t``, or a contiguous copy when the kernels' 16-byte copies cannot read it in place: a base address that is
    not 16-byte aligned or a stride (of a dimension longer than 1, head dimension excepted) not a multiple of 8."""
    t = lastdim(t)
    if t.data_ptr() % 16 == 0 and all(s % 8 == 0 for n, s in zip(t.shape[:-1], t.stride()[:-1]) if n > 1):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _ptrs(*tensors: Tensor | None) -> list[int]:
    return [utils.ptr(t) for t in tensors]


def _inputs(a: AttentionArgs) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The mask as bytes (a bool view, no copy) and cu_seqlens as int32, as the kernels read them."""
    mask8 = a.key_padding_mask.view(torch.uint8) if a.key_padding_mask is not None else None
    return mask8, *(t.to(torch.int32) if t is not None else None for t in (a.cu_seqlens_q, a.cu_seqlens_k))


def _tail(a: AttentionArgs, inputs: tuple, more_strides: list[int]) -> tuple:
    """The arguments both launchers take after their tensors, in the flat form csrc/ops.h documents: the
    :func:`_inputs` pointers (the caller keeps them alive), dims, strides (q, k, v, lse, mask, then
    ``more_strides``), flags, dropout and dtype (the stream goes last, after the forward's kernel choice)."""
    tokens = (a.q.shape[0], a.k.shape[0]) if a.varlen else (a.q.shape[1], a.k.shape[1])
    dims = [a.batch, a.h, a.hkv, a.sq, a.sk, a.d, a.drop_stride, int(a.varlen), *tokens]
    strides = [*a.strides(a.q, a.k, a.v), *a.lse_strides(), *a.mask_strides(inputs[0]), *more_strides]
    seed, thresh, _ = dropout.kernel_args(a.dropout_p, a.seed)
    flags = (bool(a.causal), float(a.scale), seed, float(a.dropout_p), thresh)
    return *_ptrs(*inputs), dims, strides, *flags, utils.DTYPE_CODE[a.q.dtype]


def _prepared(a: AttentionArgs) -> AttentionArgs:
    return dataclasses.replace(a, q=aligned(a.q), k=aligned(a.k), v=aligned(a.v))


def fwd(a: AttentionArgs) -> tuple[Tensor, Tensor]:
    a = _prepared(a)
    out = torch.zeros(a.q.shape, dtype=a.q.dtype, device=a.q.device)
    lse = a.lse_empty().fill_(float("inf"))  # rows outside every sequence (varlen) stay empty
    if a.no_rows:
        return out, lse
    inputs = _inputs(a)
    stream = utils.stream_handle(a.q.device)
    _ext.load().attention_fwd(
        *_ptrs(a.q, a.k, a.v, out, lse), *_tail(a, inputs, a.strides(out)), use_wgmma(a.q), stream
    )
    return out, lse


def bwd(a: AttentionArgs, dout: Tensor, out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    a, out, dout = _prepared(a), aligned(out), aligned(dout)
    dq, dk, dv = (torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (a.q, a.k, a.v))
    if a.no_pairs:
        return dq, dk, dv
    delta = torch.zeros_like(lse)
    tensors, inputs = (dout, a.q, a.k, a.v, out, lse, delta, dq, dk, dv), _inputs(a)
    stream = utils.stream_handle(a.q.device)
    _ext.load().attention_bwd(*_ptrs(*tensors), *_tail(a, inputs, a.strides(dout, out, dq, dk, dv)), stream)
    return dq, dk, dv
