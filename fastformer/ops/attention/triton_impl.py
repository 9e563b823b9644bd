"""Attention on the Triton kernels of kernels/attention.py (CUDA tensors, or CPU under the interpreter).

Launch settings (autotuning, heuristic configs, the split-KV policy) live in ``triton_tuning``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastformer import utils
from fastformer.kernels.attention import (
    attention_bwd_preprocess_kernel,
    attention_fwd_combine_kernel,
    attention_fwd_kernel,
)
from fastformer.ops import dropout
from fastformer.ops.attention import triton_tuning as tuning
from fastformer.ops.attention.op import AttentionArgs, lastdim

_LOG2E = 1.4426950408889634


def _with_strides(a: AttentionArgs, *tensors: Tensor) -> tuple:
    """Each q/k/v-shaped tensor followed by its (batch, seq, head) strides, as the kernels take them."""
    return tuple(x for t in tensors for x in (t, *a.bsh(t)))


def _tail(a: AttentionArgs, scale: float) -> tuple:
    """The arguments every main kernel takes after its tensors: mask, cu_seqlens, sizes, scale and dropout."""
    # q stands in for absent optional pointers; it is never read (the matching flag is off)
    mask, cu_q, cu_k = (t if t is not None else a.q for t in (a.key_padding_mask, a.cu_seqlens_q, a.cu_seqlens_k))
    sizes = (a.h, a.group, a.sq, a.sk, a.d, scale)
    bucket = tuning.seq_bucket(max(a.sq, a.sk))
    drop = dropout.kernel_args(a.dropout_p, a.seed)
    return mask, *a.mask_strides(a.key_padding_mask), cu_q, cu_k, *sizes, *drop, a.drop_stride, bucket


def _flags(a: AttentionArgs) -> dict:
    return dict(
        IS_CAUSAL=a.causal,
        HAS_MASK=a.key_padding_mask is not None,
        IS_VARLEN=a.varlen,
        HAS_DROPOUT=a.dropout_p > 0.0,
        BLOCK_D=max(16, utils.next_pow2(a.d)),
        DOT_PREC=utils.dot_precision(a.q.dtype, a.q.device),
    )


def _use_tma(a: AttentionArgs) -> bool:
    """Whether the forward streams K/V through tensor descriptors: sm_90+ (or the interpreter) and K/V laid out
    as TMA requires (see ``utils.tma_aligned``); the descriptors need a scratch allocator on the GPU."""
    if not (utils.tma_capable(a.q.device) and utils.tma_aligned(a.q, a.k, a.v)):
        return False
    utils.ensure_tma_allocator()
    return True


def fwd(a: AttentionArgs) -> tuple[Tensor, Tensor]:
    a = a.lastdim()
    q = a.q
    if a.varlen:  # packed rows past cu_seqlens_q[-1] belong to no sequence and are never written: 0
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        lse = a.lse_empty().fill_(float("inf"))
    else:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = a.lse_empty()
    if a.no_rows:
        return out, lse.fill_(float("inf"))
    head, tail, flags = _with_strides(a, q, a.k, a.v), _tail(a, a.scale * _LOG2E), _flags(a)
    use_tma, n_split = _use_tma(a), tuning.num_splits(a, q.device)
    # the split-KV forward gathers its query rows with pointers, which warp specialisation cannot take
    flags.update(USE_TMA=use_tma, WARP_SPEC=n_split == 1 and tuning.warp_spec_ok(a, use_tma))
    if n_split > 1:
        return _fwd_split(a, n_split, head, tail, flags, out, lse)

    def grid(meta):
        return (utils.cdiv(a.sq, meta["BLOCK_M"]) * a.batch * a.h,)

    meta = tuning.launch_meta("fwd", a, flags["BLOCK_D"], flags["WARP_SPEC"])
    tuning.kernel("fwd")[grid](
        *head, *_with_strides(a, out), lse, *a.lse_strides(), *tail, 128, 0, 0, IS_SPLIT=False, **flags, **meta
    )
    return out, lse


def _fwd_split(a: AttentionArgs, n_split: int, head: tuple, tail: tuple, flags: dict, out: Tensor, lse: Tensor):
    """Split-KV forward for decoding: partial results per key split, then one combine pass."""
    split_len = utils.cdiv(utils.cdiv(a.sk, n_split), 128) * 128
    n_split = utils.cdiv(a.sk, split_len)
    rows = a.batch * a.h * a.sq
    o_part = torch.empty((n_split, rows, a.d), dtype=torch.float32, device=out.device)
    l_part = torch.empty((n_split, rows), dtype=torch.float32, device=out.device)
    # Out and Lse are the (splits, B, H, Sq, D) and (splits, B, H, Sq) fp32 partials: (b, s, h) and (b, h) strides
    parts = (o_part, a.h * a.sq * a.d, a.d, a.sq * a.d, l_part, a.h * a.sq, a.sq)
    meta = tuning.split_meta(flags["BLOCK_D"], a.q.element_size())
    # one program per (batch, kv head, split, tile of the group * Sq rows (query head, position))
    grid = (utils.cdiv(a.group * a.sq, meta["BLOCK_M"]) * n_split * a.batch * a.hkv,)
    attention_fwd_kernel[grid](*head, *parts, *tail, split_len, rows * a.d, rows, IS_SPLIT=True, **flags, **meta)
    block_r, block_d = tuning.combine_tiles(rows, flags["BLOCK_D"], out.device)
    combine = (o_part, l_part, *_with_strides(a, out), lse, n_split, rows, a.h, a.sq, a.d)
    grid = (utils.cdiv(rows, block_r), utils.cdiv(a.d, block_d))
    attention_fwd_combine_kernel[grid](*combine, BLOCK_M=block_r, BLOCK_D=block_d)
    return out, lse


def bwd(a: AttentionArgs, dout: Tensor, out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    a, out, dout = a.lastdim(), lastdim(out), lastdim(dout)
    make = torch.zeros if a.varlen or a.no_pairs else torch.empty  # varlen: tokens in no sequence get 0
    dq, dk, dv = (make(t.shape, dtype=t.dtype, device=t.device) for t in (a.q, a.k, a.v))
    if a.no_pairs:
        return dq, dk, dv
    delta = torch.empty_like(lse)
    flags = _flags(a)
    bd = flags["BLOCK_D"]
    pre_bm = 32 if utils.interpreting() else 64
    cu_q = a.cu_seqlens_q if a.varlen else a.q
    pre = (*_with_strides(a, out, dout), delta, *a.lse_strides(), cu_q, a.h, a.sq, a.d)
    grid = (utils.cdiv(a.sq, pre_bm) * a.batch * a.h,)
    attention_bwd_preprocess_kernel[grid](*pre, IS_VARLEN=a.varlen, BLOCK_M=pre_bm, BLOCK_D=bd)
    stats, tail = (lse, delta, *a.lse_strides()), _tail(a, a.scale)

    def grid_kv(meta):
        return (utils.cdiv(a.sk, meta["BLOCK_N"]) * a.batch * a.hkv,)

    def grid_q(meta):
        return (utils.cdiv(a.sq, meta["BLOCK_M"]) * a.batch * a.h,)

    kv_side, q_side = _with_strides(a, a.k, a.v), _with_strides(a, a.q, dout)
    if not torch.are_deterministic_algorithms_enabled():
        # 5 matmuls: the dK/dV programs also add dS K into an fp32 dQ (atomics, so the sum's order varies)
        dq_acc = torch.zeros(a.q.shape, dtype=torch.float32, device=a.q.device)
        dkdv = (*kv_side, *_with_strides(a, dk, dv, dq_acc), *q_side, *stats, *tail)
        meta = tuning.launch_meta("dkdv_atomic", a, bd)
        tuning.kernel("dkdv_atomic")[grid_kv](*dkdv, ATOMIC_DQ=True, **flags, **meta)
        return torch.mul(dq_acc, a.scale, out=dq), dk, dv
    # deterministic, 7 matmuls: the dK/dV programs, then dQ programs that recompute S and dP (dq is not read here)
    dkdv = (*kv_side, *_with_strides(a, dk, dv, dq), *q_side, *stats, *tail)
    tuning.kernel("dkdv")[grid_kv](*dkdv, ATOMIC_DQ=False, **flags, **tuning.launch_meta("dkdv", a, bd))
    dq_meta = tuning.launch_meta("dq", a, bd)
    tuning.kernel("dq")[grid_q](*q_side, *_with_strides(a, dq), *stats, *kv_side, *tail, **flags, **dq_meta)
    return dq, dk, dv
