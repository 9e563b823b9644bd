"""Attention in pure PyTorch: the reference math (which the tests reuse) and the backend for CPU.

:func:`attention_reference` materialises the (B, H, Sq, Sk) scores and is differentiable; the torch backend's
forward is that function, and its backward is the explicit FlashAttention-style math from the saved lse. The
varlen layout runs sequence by sequence with the varlen dropout rows, so every backend drops the same elements.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import torch
from torch import Tensor

from fastformer.ops import dropout
from fastformer.ops.attention.op import AttentionArgs


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
        keep = dropout.keep_mask(int(seed), rows, sk if dropout_stride is None else dropout_stride, dropout_p, sk)
        prob = prob * keep.to(work) * (1.0 / (1.0 - dropout_p))
    out = (prob @ vf).transpose(1, 2).to(q.dtype)
    if not return_lse:
        return out
    lse = torch.where(empty, torch.full_like(l_sum, float("inf")), m + torch.log(l_sum))
    return out, lse.squeeze(-1).float()


def _sequences(a: AttentionArgs) -> Iterator[tuple[slice, slice, Tensor | None]]:
    """(query rows, key rows, dropout rows or None) of each packed sequence of a varlen call."""
    cu_q, cu_k = a.cu_seqlens_q, a.cu_seqlens_k
    spans = zip(*(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()), strict=True)
    for q0, q1, k0, k1 in spans:
        rows = varlen_dropout_rows(a.h, a.total_q, q0, q1 - q0, a.q.device) if a.dropout_p > 0 else None
        yield slice(q0, q1), slice(k0, k1), rows


def fwd(a: AttentionArgs) -> tuple[Tensor, Tensor]:
    seed = int(a.seed) if a.seed is not None else None
    kw = dict(causal=a.causal, softmax_scale=a.scale, return_lse=True)
    kw.update(dropout_p=a.dropout_p, seed=seed, dropout_stride=a.drop_stride)
    if not a.varlen:
        out, lse = attention_reference(a.q, a.k, a.v, key_padding_mask=a.key_padding_mask, **kw)
        return out.contiguous(), lse.contiguous()
    out = torch.zeros_like(a.q)
    lse = torch.full(a.lse_shape, float("inf"), dtype=torch.float32, device=a.q.device)
    for qs, ks, rows in _sequences(a):
        o, lse_b = attention_reference(a.q[None, qs], a.k[None, ks], a.v[None, ks], dropout_rows=rows, **kw)
        out[qs] = o[0]
        lse[:, qs] = lse_b[0]
    return out, lse


def _bwd_dense(a: AttentionArgs, do: Tensor, out: Tensor, lse: Tensor, rows: Tensor | None, stride: int) -> tuple:
    """Explicit FlashAttention-style backward math in fp32 from the saved lse; dense (B, S, H, D) layout."""
    q, k, v, p = a.q, a.k, a.v, a.dropout_p
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    f = torch.float32
    qf, dof, of = (t.to(f).transpose(1, 2) for t in (q, do, out))  # (B, H, Sq, D)
    kf = k.to(f).transpose(1, 2).repeat_interleave(g, dim=1)  # (B, H, Sk, D)
    vf = v.to(f).transpose(1, 2).repeat_interleave(g, dim=1)
    s = (qf @ kf.transpose(-1, -2)) * a.scale
    vis = visible(sq, sk, a.causal, a.key_padding_mask, q.device)
    if vis is not None:
        s = s.masked_fill(~vis, float("-inf"))
    prob = torch.exp(s - lse[..., None])  # rows with lse = +inf give 0
    dp = dof @ vf.transpose(-1, -2)
    if p > 0.0:
        keep = dropout.keep_mask(dropout.seed_int(a.seed), rows, stride, p, sk).to(f) * (1.0 / (1.0 - p))
        dv = (prob * keep).transpose(-1, -2) @ dof
        dp = dp * keep
    else:
        dv = prob.transpose(-1, -2) @ dof
    delta = (dof * of).sum(-1, keepdim=True)
    ds = prob * (dp - delta)
    dq = (ds @ kf) * a.scale
    dk = (ds.transpose(-1, -2) @ qf) * a.scale
    dk = dk.view(b, hkv, g, sk, d).sum(2)
    dv = dv.view(b, hkv, g, sk, d).sum(2)
    return (
        dq.transpose(1, 2).to(q.dtype).contiguous(),
        dk.transpose(1, 2).to(k.dtype).contiguous(),
        dv.transpose(1, 2).to(v.dtype).contiguous(),
    )


def bwd(a: AttentionArgs, dout: Tensor, out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if not a.varlen:
        rows = dense_dropout_rows(a.batch, a.h, a.q.shape[1], a.q.device) if a.dropout_p > 0 else None
        return _bwd_dense(a, dout, out, lse, rows, a.drop_stride)
    dq, dk, dv = torch.zeros_like(a.q), torch.zeros_like(a.k), torch.zeros_like(a.v)
    for qs, ks, rows in _sequences(a):
        seq = dict(q=a.q[None, qs], k=a.k[None, ks], v=a.v[None, ks])
        one = dataclasses.replace(a, **seq, key_padding_mask=None, cu_seqlens_q=None, cu_seqlens_k=None)
        dq_b, dk_b, dv_b = _bwd_dense(one, dout[None, qs], out[None, qs], lse[None, :, qs], rows, a.drop_stride)
        dq[qs], dk[ks], dv[ks] = dq_b[0], dk_b[0], dv_b[0]
    return dq, dk, dv
