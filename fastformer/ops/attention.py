"""Fused attention: dense (batch, seq, heads, dim) and packed variable-length, forward and backward.

Layers (as for every op): the public functionals validate inputs and pick a backend; two custom ops,
``fastformer::attention_fwd`` and ``fastformer::attention_bwd``, carry fake kernels and autograd; the
launchers ``_triton_*``, ``_cuda_*`` and ``_torch_*`` do the work. The pure-PyTorch math lives once, in
:func:`attention_reference` (forward) and :func:`_torch_bwd` (backward), and the tests reuse it.

Conventions shared by every backend:

- ``causal`` with seqlen_q != seqlen_k is aligned bottom-right: query i sees keys j <= i + Sk - Sq
  (per sequence in the varlen layout).
- A query row that sees no key outputs 0, its logsumexp is stored as +inf so backward gets P = 0.
- ``lse`` (fp32, natural log) is (B, H, Sq) dense and (H, total_q) varlen. Its flat index is the row id
  ``r``: dense ``r = (b*H + h)*Sq + i``; varlen ``r = h*total_q + cu_seqlens_q[b] + i``.
- Dropout keeps P[r, j] by the shared Philox stream (fastformer/ops/_dropout.py) at element offset
  ``r * Sk + j`` (dense) or ``r * max_seqlen_k + j`` (varlen), so Triton, CUDA C++ and torch drop the
  same elements for the same seed. Kept probabilities are scaled by 1/(1-p).
- Backward uses no atomics (each dK/dV tile has one owner that loops over its GQA group), so every backend is
  deterministic: reruns are bitwise equal, and there is no separate ``deterministic`` switch.
- Triton forward with few query rows (<= 16, e.g. decoding with a KV cache) and long keys splits the keys
  across programs (split-KV) and combines the partial results; the output and lse are those of the plain path.
- On GPU the Triton kernels are autotuned per (head dim, seqlen bucket, flags); ``FASTFORMER_AUTOTUNE=0`` uses
  one heuristic config per kernel instead.
"""

from __future__ import annotations

import math
import os
import warnings
import weakref

import torch
import torch.nn.functional as F

from fastformer import backends, utils
from fastformer.ops import dropout as _dropout

__all__ = [
    "attention",
    "attention_varlen",
    "scaled_dot_product_attention",
    "unpad_input",
    "pad_input",
    "attention_reference",
]

_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------------------


def _check_head_dim(d: int, name: str = "q") -> None:
    if d % 8 != 0 or not 8 <= d <= 256:
        raise ValueError(f"{name}: head dimension {d} is not supported; it must be a multiple of 8 in [8, 256]")


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank: int) -> None:
    utils.check_float(q, "q")
    utils.check_like(k, "k", q, "q")
    utils.check_like(v, "v", q, "q")
    layout = "(batch, seqlen, nheads, headdim)" if rank == 4 else "(total_tokens, nheads, headdim)"
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        if t.dim() != rank:
            raise ValueError(f"{name} must be {rank}-D {layout}, got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if rank == 4 and k.shape[0] != q.shape[0]:
        raise ValueError(f"k: batch size {k.shape[0]} does not match q's {q.shape[0]}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k: head dimension {k.shape[-1]} does not match q's {q.shape[-1]}")
    h, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or h % hkv != 0:
        raise ValueError(f"k: number of kv heads ({hkv}) must divide the number of query heads ({h})")
    _check_head_dim(q.shape[-1])


def _check_scale(softmax_scale: float | None, d: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    return float(softmax_scale)


def _check_mask(mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"key_padding_mask must be bool or integer (True/1 = attend), got {mask.dtype}")
    if mask.device != q.device:
        raise ValueError(f"key_padding_mask is on {mask.device} but q is on {q.device}")
    if mask.shape != (k.shape[0], k.shape[1]):
        raise ValueError(
            f"key_padding_mask must have shape (batch, seqlen_k) = ({k.shape[0]}, {k.shape[1]}), "
            f"got {tuple(mask.shape)}"
        )
    return mask if mask.dtype == torch.bool else mask != 0


# ----------------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------------


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ · scale) v over each head, fused (the S×S matrix is never stored).

    Args:
        q: (B, Sq, H, D); k, v: (B, Sk, Hkv, D) with H % Hkv == 0 (GQA/MQA). Any strides with the last
            dimension contiguous are used in place (e.g. views of a packed (B, S, 3, H, D) projection).
        causal: query i sees keys j <= i + Sk - Sq (bottom-right aligned).
        key_padding_mask: (B, Sk) bool or integer, True/1 = attend.
        softmax_scale: defaults to 1/sqrt(D).
        dropout_p: dropout on the attention probabilities, in [0, 1).
        backend: "triton", "cuda", "torch" or "auto" (see fastformer.backends).

    Returns:
        (B, Sq, H, D) in q's dtype. Rows that see no key are 0 (and get zero gradient).
    """
    q, k, v = utils.autocast_args(q, k, v)
    _check_qkv(q, k, v, rank=4)
    mask = _check_mask(key_padding_mask, q, k)
    scale = _check_scale(softmax_scale, q.shape[-1])
    p = _dropout.check_p(dropout_p)
    causal = bool(causal)
    name = backends.select("attention", q.device, backend)
    seed = _dropout.new_seed(p)
    out, _ = torch.ops.fastformer.attention_fwd(
        q, k, v, mask, None, None, seed, q.shape[1], k.shape[1], causal, scale, p, name
    )
    return out


def _check_cu(cu: torch.Tensor, name: str, q: torch.Tensor) -> None:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be 1-D of length batch + 1, got shape {tuple(cu.shape)}")
    if cu.device != q.device:
        raise ValueError(f"{name} is on {cu.device} but q is on {q.device}")


# cu_seqlens tensors already checked, with their version counter and the bounds they were checked against:
# a model passes one tensor through every layer, so its values are read back once per forward, not per layer
# (keyed by id with a weak reference: a WeakKeyDictionary would compare tensors with ==)
_CHECKED_CU: dict[int, tuple[weakref.ref, tuple[int, int, int]]] = {}


def _check_cu_values(cu: torch.Tensor, name: str, total: int, max_seqlen: int, max_name: str) -> None:
    # one small host read; skipped while tracing (torch.compile) where values are unknown
    if torch.compiler.is_compiling() or cu.numel() < 2:
        if cu.numel() == 1 and not torch.compiler.is_compiling() and int(cu[0]) != 0:
            raise ValueError(f"{name}[0] must be 0")
        return
    key = (cu._version, total, max_seqlen)
    seen = _CHECKED_CU.get(id(cu))
    if seen is not None and seen[0]() is cu and seen[1] == key:
        return
    lens = cu[1:] - cu[:-1]
    first, last, lo, hi = torch.stack([cu[0], cu[-1], lens.min(), lens.max()]).tolist()
    if first != 0 or lo < 0:
        raise ValueError(f"{name} must start at 0 and be non-decreasing")
    if last > total:
        raise ValueError(f"{name}[-1] = {last} exceeds the {total} packed tokens")
    if hi > max_seqlen:
        raise ValueError(f"{max_name} = {max_seqlen} is smaller than the longest sequence ({hi}) in {name}")
    _CHECKED_CU[id(cu)] = (weakref.ref(cu, lambda _, i=id(cu): _CHECKED_CU.pop(i, None)), key)


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention over a batch of packed sequences of different lengths (no padding is computed).

    Args:
        q: (total_q, H, D); k, v: (total_k, Hkv, D); sequence b occupies rows
            cu_seqlens_q[b]:cu_seqlens_q[b+1] of q and cu_seqlens_k[b]:cu_seqlens_k[b+1] of k and v.
        cu_seqlens_q, cu_seqlens_k: (B + 1,) int32/int64 prefix sums starting at 0.
        max_seqlen_q, max_seqlen_k: upper bounds of the sequence lengths (sizes the launch grid).
        causal: per sequence, bottom-right aligned as in :func:`attention`.

    Returns:
        (total_q, H, D); rows past cu_seqlens_q[-1] are 0.
    """
    q, k, v = utils.autocast_args(q, k, v)
    _check_qkv(q, k, v, rank=3)
    _check_cu(cu_seqlens_q, "cu_seqlens_q", q)
    _check_cu(cu_seqlens_k, "cu_seqlens_k", q)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), got "
            f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}"
        )
    for val, nm in ((max_seqlen_q, "max_seqlen_q"), (max_seqlen_k, "max_seqlen_k")):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise ValueError(f"{nm} must be a non-negative int, got {val!r}")
    _check_cu_values(cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q, "max_seqlen_q")
    _check_cu_values(cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k, "max_seqlen_k")
    scale = _check_scale(softmax_scale, q.shape[-1])
    p = _dropout.check_p(dropout_p)
    name = backends.select("attention_varlen", q.device, backend)
    seed = _dropout.new_seed(p)
    out, _ = torch.ops.fastformer.attention_fwd(
        q, k, v, None, cu_seqlens_q, cu_seqlens_k, seed, max_seqlen_q, max_seqlen_k, bool(causal), scale, p, name
    )
    return out


def unpad_input(x: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Drop the padding tokens of a batch.

    Args:
        x: (B, S, ...) padded batch.
        attention_mask: (B, S) bool or integer, True/1 = real token.

    Returns:
        x_unpad (total, ...), indices (total,) int64 into the flattened (B*S) tokens, cu_seqlens (B + 1,)
        int32 and max_seqlen (int). Differentiable with respect to ``x``.
    """
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
        raise TypeError(f"attention_mask must be bool or integer, got {attention_mask.dtype}")
    if x.dim() < 2 or attention_mask.shape != x.shape[:2]:
        raise ValueError(
            f"attention_mask must have shape {tuple(x.shape[:2])} (batch, seqlen) of x, "
            f"got {tuple(attention_mask.shape)}"
        )
    if attention_mask.device != x.device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but x is on {x.device}")
    keep = attention_mask != 0
    seqlens = keep.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    max_seqlen = int(seqlens.max()) if seqlens.numel() else 0
    x_unpad = x.flatten(0, 1).index_select(0, indices)
    return x_unpad, indices, cu_seqlens, max_seqlen


def pad_input(x_unpad: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of :func:`unpad_input`: scatter (total, ...) back to (batch, seqlen, ...) with zeros at padding."""
    if indices.dim() != 1 or indices.shape[0] != x_unpad.shape[0]:
        raise ValueError(
            f"indices must be 1-D with one entry per row of x_unpad ({x_unpad.shape[0]}), "
            f"got shape {tuple(indices.shape)}"
        )
    out = x_unpad.new_zeros((batch * seqlen, *x_unpad.shape[1:]))
    return out.index_copy(0, indices, x_unpad).view(batch, seqlen, *x_unpad.shape[1:])


_SDPA_WARNED: set[str] = set()


def _sdpa_fallback(reason: str, *args, **kwargs) -> torch.Tensor:
    if reason not in _SDPA_WARNED:
        _SDPA_WARNED.add(reason)
        warnings.warn(f"fastformer.scaled_dot_product_attention: {reason}; computing it with torch SDPA", stacklevel=3)
    return F.scaled_dot_product_attention(*args, **kwargs)


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` on (B, H, S, D) tensors.

    Bool key-padding masks broadcastable to (B, 1, 1, Sk) and ``is_causal`` run on the fused kernel (the
    transposed views are passed without copies). Any other mask, layout or option is computed by torch
    SDPA, with a one-time warning, never an error of ours.
    """
    kwargs = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    args = (query, key, value)
    if not all(isinstance(t, torch.Tensor) for t in args) or query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return F.scaled_dot_product_attention(*args, **kwargs)
    b, h, sq, d = query.shape
    hkv, sk = key.shape[1], key.shape[2]
    if (
        query.dtype not in utils.FLOAT_DTYPES
        or key.dtype != query.dtype
        or value.dtype != query.dtype
        or key.shape != value.shape
        or key.shape[0] != b
        or key.shape[-1] != d
        or (h != hkv and not enable_gqa)
        or hkv == 0
        or h % hkv != 0
        or d % 8 != 0
        or not 8 <= d <= 256
        or any(t.stride(-1) != 1 for t in args)
        or (is_causal and attn_mask is not None)
    ):
        # torch raises for what it rejects and computes the rest
        return F.scaled_dot_product_attention(*args, **kwargs)
    if is_causal and sq != sk:
        return _sdpa_fallback("is_causal with seqlen_q != seqlen_k is top-left aligned in torch", *args, **kwargs)
    mask = None
    if attn_mask is not None:
        m = attn_mask
        if m.dtype != torch.bool:
            return _sdpa_fallback("a non-boolean attn_mask is not fused", *args, **kwargs)
        if m.dim() > 4 or m.device != query.device:
            return _sdpa_fallback("this attn_mask shape is not fused", *args, **kwargs)
        shape = (1,) * (4 - m.dim()) + tuple(m.shape)
        if shape[1] != 1 or shape[2] != 1 or shape[3] != sk or shape[0] not in (1, b):
            return _sdpa_fallback("only key-padding masks broadcastable to (B, 1, 1, Sk) are fused", *args, **kwargs)
        mask = m.reshape(shape[0], sk).expand(b, sk)
    return attention(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        causal=is_causal,
        key_padding_mask=mask,
        softmax_scale=scale,
        dropout_p=dropout_p,
    ).transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------------------
# reference math (torch backend, tests)
# ----------------------------------------------------------------------------------------------------------------------


def _visible(sq: int, sk: int, causal: bool, mask: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
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


def dense_dropout_offsets(b: int, h: int, sq: int, sk: int, device: torch.device) -> torch.Tensor:
    """(B, H, Sq, Sk) int64 Philox offsets of the dense layout: ((b*H + h)*Sq + i)*Sk + j."""
    return torch.arange(b * h * sq * sk, device=device, dtype=torch.int64).view(b, h, sq, sk)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    seed: int | None = None,
    dropout_offsets: torch.Tensor | None = None,
    upcast: bool = True,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain, differentiable attention that materialises the (B, H, Sq, Sk) scores.

    q: (B, Sq, H, D); k, v: (B, Sk, Hkv, D). Computes in fp32 (float64 for float64 inputs) unless
    ``upcast=False``, in which case it stays in q's dtype (the "torch in the same dtype" of the 2x rule).
    Rows with no visible key give 0 and lse = +inf. Dropout uses ``seed`` and ``dropout_offsets``
    (default: :func:`dense_dropout_offsets`). Returns out (B, Sq, H, D) in q's dtype [, lse (B, H, Sq) fp32].
    """
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    work = q.dtype if (not upcast or q.dtype == torch.float64) else torch.float32
    qf = q.to(work).transpose(1, 2)  # (B, H, Sq, D)
    kf = k.to(work).transpose(1, 2).repeat_interleave(h // hkv, dim=1)  # (B, H, Sk, D)
    vf = v.to(work).transpose(1, 2).repeat_interleave(h // hkv, dim=1)
    s = (qf @ kf.transpose(-1, -2)) * scale  # (B, H, Sq, Sk)
    vis = _visible(sq, sk, causal, key_padding_mask, q.device)
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
        offs = dense_dropout_offsets(b, h, sq, sk, q.device) if dropout_offsets is None else dropout_offsets
        keep = _dropout.keep_mask(int(seed), offs, dropout_p)
        prob = prob * keep.to(work) * (1.0 / (1.0 - dropout_p))
    out = (prob @ vf).transpose(1, 2).to(q.dtype)
    if not return_lse:
        return out
    lse = torch.where(empty, torch.full_like(l_sum, float("inf")), m + torch.log(l_sum))
    return out, lse.squeeze(-1).float()


def _seq_spans(cu_q: torch.Tensor, cu_k: torch.Tensor) -> list[tuple[int, int, int, int]]:
    return list(zip(*(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()), strict=True))


def _varlen_offsets(h: int, total_q: int, q0: int, sq: int, sk: int, max_k: int, device: torch.device) -> torch.Tensor:
    """(1, H, sq, sk) Philox offsets of the varlen layout: (h*total_q + q0 + i)*max_seqlen_k + j."""
    hh = torch.arange(h, device=device, dtype=torch.int64)[:, None, None]
    i = torch.arange(sq, device=device, dtype=torch.int64)[None, :, None]
    j = torch.arange(sk, device=device, dtype=torch.int64)[None, None, :]
    return ((hh * total_q + q0 + i) * max_k + j)[None]


def _torch_fwd(q, k, v, mask, cu_q, cu_k, seed, max_q, max_k, causal, scale, p):
    seed_i = int(seed) if seed is not None else None
    if cu_q is None:
        out, lse = attention_reference(
            q,
            k,
            v,
            causal=causal,
            key_padding_mask=mask,
            softmax_scale=scale,
            dropout_p=p,
            seed=seed_i,
            return_lse=True,
        )
        return out.contiguous(), lse.contiguous()
    total_q, h, _ = q.shape
    out = torch.zeros_like(q)
    lse = torch.full((h, total_q), float("inf"), dtype=torch.float32, device=q.device)
    for q0, q1, k0, k1 in _seq_spans(cu_q, cu_k):
        offs = _varlen_offsets(h, total_q, q0, q1 - q0, k1 - k0, max_k, q.device) if p > 0 else None
        o, lse_b = attention_reference(
            q[None, q0:q1],
            k[None, k0:k1],
            v[None, k0:k1],
            causal=causal,
            softmax_scale=scale,
            dropout_p=p,
            seed=seed_i,
            dropout_offsets=offs,
            return_lse=True,
        )
        out[q0:q1] = o[0]
        lse[:, q0:q1] = lse_b[0]
    return out, lse


def _torch_bwd_dense(do, q, k, v, out, lse, mask, causal, scale, p, seed, offs):
    """Explicit FlashAttention-style backward math in fp32 from the saved lse; dense (B, S, H, D) layout."""
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    f = torch.float32
    qf, dof, of = (t.to(f).transpose(1, 2) for t in (q, do, out))  # (B, H, Sq, D)
    kf = k.to(f).transpose(1, 2).repeat_interleave(g, dim=1)  # (B, H, Sk, D)
    vf = v.to(f).transpose(1, 2).repeat_interleave(g, dim=1)
    s = (qf @ kf.transpose(-1, -2)) * scale
    vis = _visible(sq, sk, causal, mask, q.device)
    if vis is not None:
        s = s.masked_fill(~vis, float("-inf"))
    prob = torch.exp(s - lse[..., None])  # rows with lse = +inf give 0
    dp = dof @ vf.transpose(-1, -2)
    if p > 0.0:
        keep = _dropout.keep_mask(seed, offs, p).to(f) * (1.0 / (1.0 - p))
        dv = (prob * keep).transpose(-1, -2) @ dof
        dp = dp * keep
    else:
        dv = prob.transpose(-1, -2) @ dof
    delta = (dof * of).sum(-1, keepdim=True)
    ds = prob * (dp - delta)
    dq = (ds @ kf) * scale
    dk = (ds.transpose(-1, -2) @ qf) * scale
    dk = dk.view(b, hkv, g, sk, d).sum(2)
    dv = dv.view(b, hkv, g, sk, d).sum(2)
    return (
        dq.transpose(1, 2).to(q.dtype).contiguous(),
        dk.transpose(1, 2).to(k.dtype).contiguous(),
        dv.transpose(1, 2).to(v.dtype).contiguous(),
    )


def _torch_bwd(do, q, k, v, out, lse, mask, cu_q, cu_k, seed, max_q, max_k, causal, scale, p):
    seed_i = int(seed) if seed is not None else 0
    if cu_q is None:
        offs = dense_dropout_offsets(q.shape[0], q.shape[2], q.shape[1], k.shape[1], q.device) if p > 0 else None
        return _torch_bwd_dense(do, q, k, v, out, lse, mask, causal, scale, p, seed_i, offs)
    total_q, h, _ = q.shape
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for q0, q1, k0, k1 in _seq_spans(cu_q, cu_k):
        offs = _varlen_offsets(h, total_q, q0, q1 - q0, k1 - k0, max_k, q.device) if p > 0 else None
        a, b_, c = _torch_bwd_dense(
            do[None, q0:q1],
            q[None, q0:q1],
            k[None, k0:k1],
            v[None, k0:k1],
            out[None, q0:q1],
            lse[None, :, q0:q1],
            None,
            causal,
            scale,
            p,
            seed_i,
            offs,
        )
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = a[0], b_[0], c[0]
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------------------
# Triton launchers
# ----------------------------------------------------------------------------------------------------------------------


def _lastdim(t: torch.Tensor) -> torch.Tensor:
    # kernels index the head dimension with unit stride; anything else is copied once
    return t if t.stride(-1) == 1 else t.contiguous()


def _dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    if dtype == torch.float32 and (device.type != "cuda" or not torch.backends.cuda.matmul.allow_tf32):
        return "ieee"
    return "tf32"


class _Problem:
    """Shapes and strides of one call in the form every launcher needs: batch/head/seq strides as
    (b, s, h) triples (varlen: b-stride 0, sequence starts come from cu_seqlens)."""

    def __init__(self, q, k, cu_q, max_q, max_k):
        self.varlen = cu_q is not None
        if self.varlen:
            self.batch = cu_q.numel() - 1
            self.h, self.d = q.shape[1], q.shape[2]
            self.hkv = k.shape[1]
            self.total_q = q.shape[0]
        else:
            self.batch, _, self.h, self.d = q.shape
            self.hkv = k.shape[2]
        self.sq, self.sk = max_q, max_k
        self.group = self.h // self.hkv

    def bsh(self, t: torch.Tensor) -> tuple[int, int, int]:
        """(batch, seq, head) strides of a q/k/v-shaped tensor."""
        if self.varlen:
            return 0, t.stride(0), t.stride(1)
        return t.stride(0), t.stride(1), t.stride(2)

    def lse_strides(self) -> tuple[int, int]:
        return (0, self.total_q) if self.varlen else (self.h * self.sq, self.sq)

    def drop_stride(self) -> int:
        return self.sk


# Autotune candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) shared by sm80 and sm90; the ones that do not fit
# the device's shared memory or would spill their fp32 accumulators at this head dim are pruned before timing.
_FWD_CONFIGS = ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 2))
_BWD_CONFIGS = ((64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (32, 32, 4, 2))


def _smem_limit() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "shared_memory_per_block_optin", 99 * 1024))


def _fits(kind: str, bm: int, bn: int, warps: int, stages: int, bd: int, elem: int, limit: int) -> bool:
    threads = 32 * warps
    if kind == "fwd":  # q tile resident, K and V tiles pipelined; acc (bm, bd) fp32 in registers
        smem = (bm * bd + stages * 2 * bn * bd) * elem
        regs = bm * bd // threads
    else:  # k, v resident, q and dO tiles pipelined, P/dS staged; dk/dv or dq accumulators in registers
        smem = (2 * bn * bd + stages * 2 * bm * bd) * elem + bm * bn * 4
        regs = 2 * max(bm, bn) * bd // threads
    return smem <= limit and regs <= 128


def _configs(kind: str) -> list:
    import triton

    table = _FWD_CONFIGS if kind == "fwd" else _BWD_CONFIGS
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in table]


def _prune(kind: str):
    def prune(configs, named_args, **kwargs):
        bd = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
        elem, limit = named_args["Q"].element_size(), _smem_limit()
        keep = [
            c
            for c in configs
            if _fits(kind, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, bd, elem, limit)
        ]
        return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]

    return prune


_TUNED: dict[str, object] = {}


def _autotune_enabled() -> bool:
    # FASTFORMER_AUTOTUNE=0 uses one heuristic config per kernel (no tuning runs: quick checks, CUDA graphs)
    return not utils.interpreting() and os.environ.get("FASTFORMER_AUTOTUNE", "1") != "0"


def _kernel(kind: str):
    """The jitted kernel, wrapped in an autotuner on GPU (one fixed config under the interpreter)."""
    from fastformer.kernels import attention as K

    base = {"fwd": K._attn_fwd, "dkdv": K._attn_bwd_dkdv, "dq": K._attn_bwd_dq}[kind]
    if not _autotune_enabled():
        return base
    if kind not in _TUNED:
        import triton

        group = "fwd" if kind == "fwd" else "bwd"
        _TUNED[kind] = triton.autotune(
            _configs(group),
            key=["BLOCK_D", "seq_bucket", "IS_CAUSAL", "HAS_MASK", "HAS_DROPOUT", "IS_VARLEN"],
            prune_configs_by={"early_config_prune": _prune(group)},
        )(base)
    return _TUNED[kind]


# one fixed launch configuration under the interpreter: big tiles mean fewer, cheaper numpy steps
_INTERP_BLOCK = {"BLOCK_M": 32, "BLOCK_N": 32}


def _seq_bucket(n: int) -> int:
    return min(utils.next_pow2(max(n, 1)), 8192)


# heuristic configs in order of preference when not autotuning; the first that fits is used
_FIXED_FWD = ((128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 1))
_FIXED_BWD = ((64, 64, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2), (16, 32, 4, 1))


def _launch_meta(kind: str, bd: int, elem: int) -> dict:
    """Launch settings when not autotuning: the interpreter's config, or a heuristic one on GPU."""
    if utils.interpreting():
        return dict(_INTERP_BLOCK)
    if _autotune_enabled():
        return {}
    table = _FIXED_FWD if kind == "fwd" else _FIXED_BWD
    limit = _smem_limit()
    fits = [c for c in table if _fits(kind, *c, bd, elem, limit)]
    bm, bn, w, st = fits[0] if fits else table[-1]
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}


# split-KV decoding: used when there are few query rows (<= _SPLIT_MAX_Q), at least _SPLIT_MIN_KEYS keys, and
# too few query tiles to fill the GPU
_SPLIT_MAX_Q = 16
_SPLIT_MIN_KEYS = 512


def _num_splits(pr: _Problem, device: torch.device) -> int:
    if pr.varlen or pr.sq > _SPLIT_MAX_Q or pr.sk < _SPLIT_MIN_KEYS:
        return 1
    programs = pr.batch * pr.h  # one query tile per (batch, head)
    target = 2 * utils.sm_count(device)
    if programs >= target:
        return 1
    return max(1, min(utils.cdiv(target, programs), utils.cdiv(pr.sk, 256)))


def _triton_fwd(q, k, v, mask, cu_q, cu_k, seed, max_q, max_k, causal, scale, p):
    q, k, v = _lastdim(q), _lastdim(k), _lastdim(v)
    pr = _Problem(q, k, cu_q, max_q, max_k)
    if pr.varlen:  # packed rows past cu_seqlens_q[-1] belong to no sequence and are never written: 0
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        lse = _lse_empty(q, pr).fill_(float("inf"))
    else:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = _lse_empty(q, pr)
    if q.numel() == 0 or pr.batch == 0 or pr.sq == 0:
        return out, lse.fill_(float("inf"))
    dummy = q  # stands in for absent optional pointers; never read (the matching flag is off)
    smb, smk = (mask.stride(0), mask.stride(1)) if mask is not None else (0, 0)
    slb, slh = pr.lse_strides()
    head = (
        q,
        k,
        v,
        mask if mask is not None else dummy,
        cu_q if cu_q is not None else dummy,
        cu_k if cu_k is not None else dummy,
        int(seed) if seed is not None else 0,
    )
    qkv_strides = (*pr.bsh(q), *pr.bsh(k), *pr.bsh(v))
    sizes = (
        pr.h,
        pr.group,
        pr.sq,
        pr.sk,
        pr.d,
        scale * _LOG2E,
        _dropout.threshold24(p),
        1.0 / (1.0 - p),
        pr.drop_stride(),
        _seq_bucket(max(pr.sq, pr.sk)),
    )
    flags = dict(
        IS_CAUSAL=causal,
        HAS_MASK=mask is not None,
        IS_VARLEN=pr.varlen,
        HAS_DROPOUT=p > 0.0,
        BLOCK_D=max(16, utils.next_pow2(pr.d)),
        DOT_PREC=_dot_precision(q.dtype, q.device),
    )
    n_split = _num_splits(pr, q.device)
    if n_split == 1:

        def grid(meta):
            return (utils.cdiv(pr.sq, meta["BLOCK_M"]) * pr.batch * pr.h,)

        _kernel("fwd")[grid](
            *head[:3],
            out,
            lse,
            *head[3:],
            *qkv_strides,
            *pr.bsh(out),
            slb,
            slh,
            smb,
            smk,
            *sizes,
            128,
            0,
            0,
            IS_SPLIT=False,
            **flags,
            **_launch_meta("fwd", flags["BLOCK_D"], q.element_size()),
        )
        return out, lse
    return _triton_fwd_split(pr, n_split, head, qkv_strides, (smb, smk), sizes, flags, out, lse)


def _triton_fwd_split(pr, n_split, head, qkv_strides, mask_strides, sizes, flags, out, lse):
    """Split-KV forward for decoding: partial results per key split, then one combine pass."""
    from fastformer.kernels import attention as K

    split_len = utils.cdiv(utils.cdiv(pr.sk, n_split), 128) * 128
    n_split = utils.cdiv(pr.sk, split_len)
    rows = pr.batch * pr.h * pr.sq
    o_part = torch.empty((n_split, rows, pr.d), dtype=torch.float32, device=out.device)
    l_part = torch.empty((n_split, rows), dtype=torch.float32, device=out.device)
    block_m = 16
    # K/V tiles of block_n x BLOCK_D, pipelined: keep them within shared memory for wide rows and fp32
    row_bytes = flags["BLOCK_D"] * head[0].element_size()
    block_n = 32 if utils.interpreting() or row_bytes > 256 else (128 if row_bytes <= 128 else 64)
    launch = {} if utils.interpreting() else {"num_warps": 4, "num_stages": 3 if row_bytes <= 256 else 2}
    part_strides = (pr.h * pr.sq * pr.d, pr.d, pr.sq * pr.d)  # (b, s, h) of a (B, H, Sq, D) block
    K._attn_fwd[(utils.cdiv(pr.sq, block_m) * n_split * pr.batch * pr.h,)](
        *head[:3],
        o_part,
        l_part,
        *head[3:],
        *qkv_strides,
        *part_strides,
        pr.h * pr.sq,
        pr.sq,
        *mask_strides,
        *sizes,
        split_len,
        rows * pr.d,
        rows,
        IS_SPLIT=True,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        **flags,
        **launch,
    )
    block_r = 16
    K._attn_fwd_combine[(utils.cdiv(rows, block_r),)](
        o_part,
        l_part,
        out,
        lse,
        *pr.bsh(out),
        n_split,
        rows,
        pr.h,
        pr.sq,
        pr.d,
        BLOCK_M=block_r,
        BLOCK_D=flags["BLOCK_D"],
    )
    return out, lse


def _lse_empty(q: torch.Tensor, pr: _Problem) -> torch.Tensor:
    shape = (pr.h, pr.total_q) if pr.varlen else (pr.batch, pr.h, pr.sq)
    return torch.empty(shape, dtype=torch.float32, device=q.device)


def _triton_bwd(do, q, k, v, out, lse, mask, cu_q, cu_k, seed, max_q, max_k, causal, scale, p):
    from fastformer.kernels import attention as K

    q, k, v, out, do = (_lastdim(t) for t in (q, k, v, out, do))
    pr = _Problem(q, k, cu_q, max_q, max_k)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0 or k.numel() == 0 or pr.batch == 0 or pr.sq == 0 or pr.sk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if pr.varlen:
        # tokens past cu_seqlens[-1] belong to no sequence; their gradient is 0
        dq.zero_()
        dk.zero_()
        dv.zero_()
    delta = torch.empty_like(lse)
    dummy = q
    smb, smk = (mask.stride(0), mask.stride(1)) if mask is not None else (0, 0)
    seed_v = int(seed) if seed is not None else 0
    slb, slh = pr.lse_strides()
    bd = max(16, utils.next_pow2(pr.d))
    pre_bm = 32 if utils.interpreting() else 64
    K._attn_bwd_preprocess[(utils.cdiv(pr.sq, pre_bm) * pr.batch * pr.h,)](
        out,
        do,
        delta,
        cu_q if cu_q is not None else dummy,
        *pr.bsh(out),
        *pr.bsh(do),
        slb,
        slh,
        pr.h,
        pr.sq,
        pr.d,
        IS_VARLEN=pr.varlen,
        BLOCK_M=pre_bm,
        BLOCK_D=bd,
    )
    common = dict(
        IS_CAUSAL=causal,
        HAS_MASK=mask is not None,
        IS_VARLEN=pr.varlen,
        HAS_DROPOUT=p > 0.0,
        BLOCK_D=bd,
        DOT_PREC=_dot_precision(q.dtype, q.device),
        **_launch_meta("bwd", bd, q.element_size()),
    )
    ptrs = (
        q,
        k,
        v,
        do,
        lse,
        delta,
        mask if mask is not None else dummy,
        cu_q if cu_q is not None else dummy,
        cu_k if cu_k is not None else dummy,
        seed_v,
    )
    strides = (*pr.bsh(q), *pr.bsh(k), *pr.bsh(v), *pr.bsh(do), slb, slh, smb, smk)
    sizes = (
        pr.h,
        pr.group,
        pr.sq,
        pr.sk,
        pr.d,
        scale,
        _dropout.threshold24(p),
        1.0 / (1.0 - p),
        pr.drop_stride(),
        _seq_bucket(max(pr.sq, pr.sk)),
    )

    def grid_kv(meta):
        return (utils.cdiv(pr.sk, meta["BLOCK_N"]) * pr.batch * pr.hkv,)

    _kernel("dkdv")[grid_kv](*ptrs, dk, dv, *strides, *pr.bsh(dk), *pr.bsh(dv), *sizes, **common)

    def grid_q(meta):
        return (utils.cdiv(pr.sq, meta["BLOCK_M"]) * pr.batch * pr.h,)

    _kernel("dq")[grid_q](*ptrs, dq, *strides, *pr.bsh(dq), *sizes, **common)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------------------
# CUDA C++ launchers
# ----------------------------------------------------------------------------------------------------------------------


def _cuda_prep(mask, cu_q, cu_k):
    # the kernels read the mask as bytes (a bool view, no copy) and cu_seqlens as int32
    mask8 = mask.view(torch.uint8) if mask is not None else None
    cu_q32 = cu_q.to(torch.int32) if cu_q is not None else None
    cu_k32 = cu_k.to(torch.int32) if cu_k is not None else None
    return mask8, cu_q32, cu_k32


def _cuda_args(q, k, v, mask, pr: _Problem) -> tuple[list[int], list[int]]:
    """(dims, strides) as the flat int lists csrc/ops.h documents."""
    smb, smk = (mask.stride(0), mask.stride(1)) if mask is not None else (0, 0)
    dims = [pr.batch, pr.h, pr.hkv, pr.sq, pr.sk, pr.d, pr.drop_stride(), int(pr.varlen)]
    strides = [*pr.bsh(q), *pr.bsh(k), *pr.bsh(v), *pr.lse_strides(), smb, smk]
    return dims, strides


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _cuda_fwd(q, k, v, mask, cu_q, cu_k, seed, max_q, max_k, causal, scale, p):
    from fastformer import _ext

    q, k, v = _lastdim(q), _lastdim(k), _lastdim(v)
    pr = _Problem(q, k, cu_q, max_q, max_k)
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = _lse_empty(q, pr).fill_(float("inf"))  # rows outside every sequence (varlen) stay empty
    if q.numel() == 0 or pr.batch == 0 or pr.sq == 0:
        return out, lse
    mask8, cu_q32, cu_k32 = _cuda_prep(mask, cu_q, cu_k)
    dims, strides = _cuda_args(q, k, v, mask8, pr)
    _ext.load().attention_fwd(
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        out.data_ptr(),
        lse.data_ptr(),
        _ptr(mask8),
        _ptr(cu_q32),
        _ptr(cu_k32),
        dims,
        strides + [*pr.bsh(out)],
        bool(causal),
        float(scale),
        int(seed) if seed is not None else 0,
        float(p),
        _dropout.threshold24(p),
        utils.DTYPE_CODE[q.dtype],
        utils.stream_handle(q.device),
    )
    return out, lse


def _cuda_bwd(do, q, k, v, out, lse, mask, cu_q, cu_k, seed, max_q, max_k, causal, scale, p):
    from fastformer import _ext

    q, k, v, out, do = (_lastdim(t) for t in (q, k, v, out, do))
    pr = _Problem(q, k, cu_q, max_q, max_k)
    dq, dk, dv = (torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    if q.numel() == 0 or k.numel() == 0 or pr.batch == 0 or pr.sq == 0 or pr.sk == 0:
        return dq, dk, dv
    delta = torch.zeros_like(lse)
    mask8, cu_q32, cu_k32 = _cuda_prep(mask, cu_q, cu_k)
    dims, strides = _cuda_args(q, k, v, mask8, pr)
    grad_strides = [*pr.bsh(do), *pr.bsh(out), *pr.bsh(dq), *pr.bsh(dk), *pr.bsh(dv)]
    _ext.load().attention_bwd(
        do.data_ptr(),
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        out.data_ptr(),
        lse.data_ptr(),
        delta.data_ptr(),
        dq.data_ptr(),
        dk.data_ptr(),
        dv.data_ptr(),
        _ptr(mask8),
        _ptr(cu_q32),
        _ptr(cu_k32),
        dims,
        strides + grad_strides,
        bool(causal),
        float(scale),
        int(seed) if seed is not None else 0,
        float(p),
        _dropout.threshold24(p),
        utils.DTYPE_CODE[q.dtype],
        utils.stream_handle(q.device),
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------------------------------------


_FWD = {"triton": _triton_fwd, "cuda": _cuda_fwd, "torch": _torch_fwd}
_BWD = {"triton": _triton_bwd, "cuda": _cuda_bwd, "torch": _torch_bwd}


@torch.library.custom_op("fastformer::attention_fwd", mutates_args=())
def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    seed: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
    dropout_p: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) for dense q (B, Sq, H, D) or, with cu_seqlens, packed q (total_q, H, D)."""
    return _FWD[backend](
        q,
        k,
        v,
        key_padding_mask,
        cu_seqlens_q,
        cu_seqlens_k,
        seed,
        max_seqlen_q,
        max_seqlen_k,
        causal,
        scale,
        dropout_p,
    )


@attention_fwd.register_fake
def _(
    q,
    k,
    v,
    key_padding_mask,
    cu_seqlens_q,
    cu_seqlens_k,
    seed,
    max_seqlen_q,
    max_seqlen_k,
    causal,
    scale,
    dropout_p,
    backend,
):
    out = q.new_empty(q.shape)
    if cu_seqlens_q is not None:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("fastformer::attention_bwd", mutates_args=())
def attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    seed: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
    dropout_p: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from the saved out and lse (FlashAttention-2 style; S×S is recomputed blockwise)."""
    return _BWD[backend](
        dout, q, k, v, out, lse, key_padding_mask, cu_seqlens_q, cu_seqlens_k, seed,
        max_seqlen_q, max_seqlen_k, causal, scale, dropout_p,
    )  # fmt: skip


@attention_bwd.register_fake
def _(
    dout,
    q,
    k,
    v,
    out,
    lse,
    key_padding_mask,
    cu_seqlens_q,
    cu_seqlens_k,
    seed,
    max_seqlen_q,
    max_seqlen_k,
    causal,
    scale,
    dropout_p,
    backend,
):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, cu_q, cu_k, seed, max_q, max_k, causal, scale, p, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, cu_q, cu_k, seed)
    ctx.meta = (max_q, max_k, causal, scale, p, backend)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, mask, cu_q, cu_k, seed = ctx.saved_tensors
    max_q, max_k, causal, scale, p, backend = ctx.meta
    dq, dk, dv = torch.ops.fastformer.attention_bwd(
        dout, q, k, v, out, lse, mask, cu_q, cu_k, seed, max_q, max_k, causal, scale, p, backend
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)
