"""Attention in pure PyTorch: the reference math (which the tests reuse) and the backend for CPU.

On a CPU, fp32/fp16/bf16 calls without dropout run torch's own fused flash-attention kernel
(``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward, which also give the logsumexp): tiled,
multithreaded, never materialising the (Sq, Sk) scores. Everything else (dropout, float64, CUDA tensors)
materialises the scores in one buffer, worked on in place, with the explicit FlashAttention-style backward from
the saved lse. Varlen runs sequence by sequence. Dropout masks come from torch's generator, or, under
``exact_dropout``, from the Philox emulation with the dense or varlen dropout rows, so that every backend drops the
same elements. :func:`attention_reference` is the plain differentiable math the tests compare every backend with.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import torch
from torch import Tensor

from fastformer.ops import dropout
from fastformer.ops.attention.op import AttentionArgs, lastdim


def visible(sq: int, sk: int, causal: bool, mask: Tensor | None, device: torch.device) -> Tensor | None:
    """(B or 1, 1, Sq, Sk) bool: which keys each query may attend to, or None for all."""
    vis = None
    if causal:
        i = torch.arange(sq, device=device)[:, None]
        j = torch.arange(sk, device=device)[None, :]
        vis = (j <= i + (sk - sq))[None, None]
    if mask is not None:
        km = (mask != 0)[:, None, None, :]
        vis = km if vis is None else vis & km
    return vis


def dense_dropout_rows(b: int, h: int, sq: int, device: torch.device) -> Tensor:
    """(B, H, Sq) int64 dropout row ids of the dense layout, the flat lse index (b*H + h)*Sq + i."""
    return torch.arange(b * h * sq, device=device, dtype=torch.int64).view(b, h, sq)


def varlen_dropout_rows(h: int, total_q: int, q0: int, sq: int, device: torch.device) -> Tensor:
    """(1, H, sq) dropout row ids of one varlen sequence starting at packed row q0: h*total_q + q0 + i."""
    hh = torch.arange(h, device=device, dtype=torch.int64)[:, None]
    i = torch.arange(sq, device=device, dtype=torch.int64)[None, :]
    return (hh * total_q + q0 + i)[None]


def _keep(seed: int, rows: Tensor, stride: int, p: float, sk: int) -> Tensor:
    """(*rows.shape, sk) bool keep mask of the dropout rows ``rows`` (see :mod:`fastformer.ops.dropout`)."""
    if dropout.uses_torch_rng(seed):
        # one torch stream per call; a varlen sequence's stream is offset by its first dropout row
        first = int(rows.reshape(-1)[0]) if rows.numel() else 0
        return dropout.torch_keep(seed + first * _GOLDEN, (*rows.shape, sk), p, rows.device)
    return dropout.keep_mask(seed, rows, stride, p, sk)


_GOLDEN = 0x9E3779B9  # spreads the per-sequence stream offsets of varlen dropout


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    dropout_rows: Tensor | None = None,
    dropout_stride: int | None = None,
    upcast: bool = True,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Plain, differentiable attention that materialises the (B, H, Sq, Sk) scores.

    q: (B, Sq, H, D); k, v: (B, Sk, Hkv, D). Computes in fp32 (float64 for float64 inputs) unless
    ``upcast=False``, in which case it stays in q's dtype (the "torch in the same dtype" of the 2x rule).
    Rows with no visible key give 0 and lse = +inf. Dropout uses ``seed``, the (B, H, Sq) ``dropout_rows``
    (default: :func:`dense_dropout_rows`) and the dropout row length ``dropout_stride`` (default: Sk).
    Returns out (B, Sq, H, D) in q's dtype [, lse (B, H, Sq) fp32].
    """
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    work = q.dtype if (not upcast or q.dtype == torch.float64) else torch.float32
    qf = q.to(work).transpose(1, 2)  # (B, H, Sq, D)
    kf = k.to(work).transpose(1, 2).repeat_interleave(h // hkv, dim=1)  # (B, H, Sk, D)
    vf = v.to(work).transpose(1, 2).repeat_interleave(h // hkv, dim=1)
    s = (qf @ kf.transpose(-1, -2)) * scale  # (B, H, Sq, Sk)
    vis = visible(sq, sk, causal, key_padding_mask, q.device)
    if vis is not None:
        s = s.masked_fill(~vis, float("-inf"))
    m = s.detach().amax(dim=-1, keepdim=True) if sk > 0 else s.new_full((b, h, sq, 1), float("-inf"))
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    l_sum = e.sum(dim=-1, keepdim=True)
    empty = l_sum == 0
    prob = e / torch.where(empty, torch.ones_like(l_sum), l_sum)
    if dropout_p > 0.0:
        if seed is None:
            raise ValueError("attention_reference: dropout_p > 0 needs a seed")
        rows = dense_dropout_rows(b, h, sq, q.device) if dropout_rows is None else dropout_rows
        keep = _keep(int(seed), rows, sk if dropout_stride is None else dropout_stride, dropout_p, sk)
        prob = prob * keep.to(work) * (1.0 / (1.0 - dropout_p))
    out = (prob @ vf).transpose(1, 2).to(q.dtype)
    if not return_lse:
        return out
    lse = torch.where(empty, torch.full_like(l_sum, float("inf")), m + torch.log(l_sum))
    return out, lse.squeeze(-1).float()


_FLASH_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _flash_ok(a: AttentionArgs) -> bool:
    """Whether torch's CPU flash kernel serves this call (it has no dropout; float64 stays on the reference)."""
    return a.q.device.type == "cpu" and a.dropout_p == 0.0 and a.q.dtype in _FLASH_DTYPES and not a.no_pairs


def _hide_padded(k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """(B, Hkv, Sk, D) k and v with padded keys' rows zeroed: a probability of 0 times a NaN or inf there would
    still be NaN (and an additive -inf bias on a NaN score too), so masked-out keys must not reach the products."""
    if mask is None:
        return k, v
    pad = ~mask[:, None, :, None]  # (B, 1, Sk, 1)
    return k.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0)


def _flash_inputs(a: AttentionArgs) -> tuple[Tensor, Tensor, Tensor, Tensor | None, bool, Tensor | None]:
    """(q, k, v) as (B, H, S, D) views (k, v repeated per query head under GQA), the additive mask or None,
    is_causal, and the (B or 1, 1, Sq) rows with no visible key or None; for one dense (B, S, H, D) call."""
    # (B, H, S, D) views; the kernel misreads a strided head dimension, so those are copied once
    q, k, v = (lastdim(t).transpose(1, 2) for t in (a.q, a.k, a.v))
    k, v = _hide_padded(k, v, a.key_padding_mask)
    if a.group > 1:
        k, v = k.repeat_interleave(a.group, dim=1), v.repeat_interleave(a.group, dim=1)
    sq, sk = q.shape[2], k.shape[2]
    causal = a.causal and sq > 1  # one bottom-right aligned query (a decoding step) sees every key
    if a.key_padding_mask is None and (not causal or sq == sk):
        return q, k, v, None, causal, None  # torch's top-left causal is ours when Sq == Sk
    vis = visible(sq, sk, causal, a.key_padding_mask, q.device)  # (B or 1, 1, Sq or 1, Sk)
    bias = torch.zeros(vis.shape, dtype=q.dtype, device=q.device).masked_fill_(~vis, float("-inf"))
    return q, k, v, bias, False, ~vis.any(-1)


def _flash_fwd(a: AttentionArgs) -> tuple[Tensor, Tensor]:
    q, k, v, bias, causal, dead = _flash_inputs(a)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=bias, scale=a.scale
    )
    out = out.transpose(1, 2)  # (B, Sq, H, D): the kernel writes this layout
    if dead is not None:  # rows with no visible key: 0 and lse = +inf, as every backend gives
        lse = lse.masked_fill(dead, float("inf"))
        out = out.masked_fill(dead.transpose(1, 2)[..., None], 0.0)
    return out.contiguous(), lse.float().contiguous()


def _flash_bwd(a: AttentionArgs, dout: Tensor, out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v, bias, causal, _ = _flash_inputs(a)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        lastdim(dout).transpose(1, 2), q, k, v, out.transpose(1, 2), lse, 0.0, causal, attn_mask=bias, scale=a.scale
    )  # (B, H, S, D) views of (B, S, H, D) storage; rows with lse = +inf contribute nothing
    if a.group > 1:
        b, _, sk, d = dk.shape
        dk, dv = (t.reshape(b, a.hkv, a.group, sk, d).sum(2) for t in (dk, dv))
    return tuple(t.transpose(1, 2).contiguous() for t in (dq, dk, dv))


def _sequences(a: AttentionArgs) -> Iterator[tuple[slice, slice, Tensor | None]]:
    """(query rows, key rows, dropout rows or None) of each packed sequence of a varlen call."""
    cu_q, cu_k = a.cu_seqlens_q, a.cu_seqlens_k
    spans = zip(*(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()), strict=True)
    for q0, q1, k0, k1 in spans:
        rows = varlen_dropout_rows(a.h, a.total_q, q0, q1 - q0, a.q.device) if a.dropout_p > 0 else None
        yield slice(q0, q1), slice(k0, k1), rows


def fwd(a: AttentionArgs) -> tuple[Tensor, Tensor]:
    flash = _flash_ok(a)
    if not a.varlen:
        if flash:
            return _flash_fwd(a)
        rows = dense_dropout_rows(a.batch, a.h, a.q.shape[1], a.q.device) if a.dropout_p > 0 else None
        return _fwd_dense(a, rows, a.drop_stride)
    out = torch.zeros_like(a.q)
    lse = torch.full(a.lse_shape, float("inf"), dtype=torch.float32, device=a.q.device)
    for qs, ks, rows in _sequences(a):
        one = _one(a, qs, ks)
        if one.no_pairs:
            continue  # no key (or no query): zeros and lse = +inf, as allocated
        o, lse_b = _flash_fwd(one) if flash else _fwd_dense(one, rows, a.drop_stride)
        out[qs] = o[0]
        lse[:, qs] = lse_b[0]
    return out, lse


def _scores(a: AttentionArgs, f: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(q, k, v) as (B, H, S, D) in ``f`` (k, v repeated per query head) and the scaled scores (B, H, Sq, Sk), -inf
    where a key is not visible; dense layout."""
    qf = a.q.to(f).transpose(1, 2)  # (B, H, Sq, D)
    kf, vf = _hide_padded(a.k.to(f).transpose(1, 2), a.v.to(f).transpose(1, 2), a.key_padding_mask)
    kf, vf = kf.repeat_interleave(a.group, dim=1), vf.repeat_interleave(a.group, dim=1)  # (B, H, Sk, D)
    s = torch.matmul(qf, kf.transpose(-1, -2)).mul_(a.scale)
    vis = visible(qf.shape[2], kf.shape[2], a.causal, a.key_padding_mask, a.q.device)
    if vis is not None:
        s.masked_fill_(~vis, float("-inf"))
    return qf, kf, vf, s


def _probs_(s: Tensor, lse: Tensor) -> Tensor:
    """exp(s - lse) in place of the scores: rows with lse = +inf (no visible key) give 0."""
    return s.sub_(lse[..., None]).exp_()


def _fwd_dense(a: AttentionArgs, rows: Tensor | None, stride: int) -> tuple[Tensor, Tensor]:
    """The materialised forward of the torch backend (dropout, float64, CUDA tensors); dense layout, in fp32
    (float64 for float64), working in place on the one (B, H, Sq, Sk) buffer."""
    f = torch.promote_types(a.q.dtype, torch.float32)
    _, _, vf, s = _scores(a, f)
    lse = torch.logsumexp(s, dim=-1)  # (B, H, Sq); -inf where no key is visible
    lse.masked_fill_(torch.isneginf(lse), float("inf"))
    prob = _probs_(s, lse)
    if a.dropout_p > 0.0:
        prob.masked_fill_(~_keep(dropout.seed_int(a.seed), rows, stride, a.dropout_p, s.shape[-1]), 0.0)
        out = torch.matmul(prob, vf).mul_(1.0 / (1.0 - a.dropout_p))
    else:
        out = torch.matmul(prob, vf)
    return out.transpose(1, 2).to(a.q.dtype).contiguous(), lse.float()


def _bwd_dense(a: AttentionArgs, do: Tensor, out: Tensor, lse: Tensor, rows: Tensor | None, stride: int) -> tuple:
    """Explicit FlashAttention-style backward math in fp32 (float64 for float64) from the saved lse; dense
    (B, S, H, D) layout."""
    p = a.dropout_p
    b, sk, d = a.batch, a.k.shape[1], a.d
    f = torch.promote_types(a.q.dtype, torch.float32)
    qf, kf, vf, s = _scores(a, f)
    dof, of = (t.to(f).transpose(1, 2) for t in (do, out))  # (B, H, Sq, D)
    if f == torch.float64:  # the saved lse is fp32: recompute it at full precision from the materialised scores
        lse = torch.logsumexp(s, dim=-1)
        lse = lse.masked_fill(torch.isneginf(lse), float("inf"))
    prob = _probs_(s, lse)
    dp = torch.matmul(dof, vf.transpose(-1, -2))  # (B, H, Sq, Sk)
    if p > 0.0:
        dropped, c = ~_keep(dropout.seed_int(a.seed), rows, stride, p, sk), 1.0 / (1.0 - p)
        dv = torch.matmul(prob.masked_fill(dropped, 0.0).transpose(-1, -2), dof).mul_(c)
        dp.masked_fill_(dropped, 0.0).mul_(c)
    else:
        dv = torch.matmul(prob.transpose(-1, -2), dof)
    delta = (dof * of).sum(-1, keepdim=True)
    ds = dp.sub_(delta).mul_(prob)
    dq = torch.matmul(ds, kf).mul_(a.scale)
    dk = torch.matmul(ds.transpose(-1, -2), qf).mul_(a.scale)
    dk = dk.view(b, a.hkv, a.group, sk, d).sum(2)
    dv = dv.view(b, a.hkv, a.group, sk, d).sum(2)
    return (
        dq.transpose(1, 2).to(a.q.dtype).contiguous(),
        dk.transpose(1, 2).to(a.k.dtype).contiguous(),
        dv.transpose(1, 2).to(a.v.dtype).contiguous(),
    )


def _one(a: AttentionArgs, qs: slice, ks: slice) -> AttentionArgs:
    """One sequence of a varlen call as a dense call of batch 1."""
    seq = dict(q=a.q[None, qs], k=a.k[None, ks], v=a.v[None, ks])
    sq, sk = qs.stop - qs.start, ks.stop - ks.start
    return dataclasses.replace(
        a, **seq, key_padding_mask=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=sq, max_seqlen_k=sk
    )


def bwd(a: AttentionArgs, dout: Tensor, out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    flash = _flash_ok(a)
    if not a.varlen:
        if flash:
            return _flash_bwd(a, dout, out, lse)
        rows = dense_dropout_rows(a.batch, a.h, a.q.shape[1], a.q.device) if a.dropout_p > 0 else None
        return _bwd_dense(a, dout, out, lse, rows, a.drop_stride)
    dq, dk, dv = torch.zeros_like(a.q), torch.zeros_like(a.k), torch.zeros_like(a.v)
    for qs, ks, rows in _sequences(a):
        one, seq = _one(a, qs, ks), (dout[None, qs], out[None, qs], lse[None, :, qs])
        if flash and not one.no_pairs:
            dq_b, dk_b, dv_b = _flash_bwd(one, *seq)
        else:
            dq_b, dk_b, dv_b = _bwd_dense(one, *seq, rows, a.drop_stride)
        dq[qs], dk[ks], dv[ks] = dq_b[0], dk_b[0], dv_b[0]
    return dq, dk, dv
