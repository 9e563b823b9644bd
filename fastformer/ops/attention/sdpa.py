"""``scaled_dot_product_attention``: a drop-in for torch's SDPA on (B, H, S, D) tensors that runs what it can on the
fused kernel (key-padding masks and bottom-right-compatible causal) and hands everything else to torch."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from fastformer import backends, utils
from fastformer.ops.attention.api import attention

_SDPA_WARNED: set[str] = set()


def _sdpa_fallback(reason: str, *args, **kwargs) -> torch.Tensor:
    """torch's SDPA for a call the fused kernel does not take: a BackendError under a named fused backend (never a
    silent fallback), silently under the torch backend (torch's SDPA is its path), else with a one-time warning."""
    name = backends.selected()
    if name in ("triton", "cuda"):
        raise backends.BackendError(f"scaled_dot_product_attention: backend {name!r} cannot serve this call: {reason}")
    if name == "auto" and reason not in _SDPA_WARNED:
        _SDPA_WARNED.add(reason)
        warnings.warn(f"fastformer.scaled_dot_product_attention: {reason}; computing it with torch SDPA", stacklevel=3)
    return F.scaled_dot_product_attention(*args, **kwargs)


def _torch_rejects(query, key, value, enable_gqa: bool) -> bool:
    """Whether torch's SDPA raises for these tensors (its error, not ours, is the answer)."""
    b, h, _, d = query.shape
    hkv = key.shape[1]
    return (
        key.dtype != query.dtype
        or value.dtype != query.dtype
        or key.shape != value.shape
        or key.shape[0] != b
        or key.shape[-1] != d
        or (h != hkv and not enable_gqa)
        or hkv == 0
        or h % hkv != 0
    )


def _unfused(query, key, value, attn_mask, is_causal: bool) -> str | None:
    """Why the fused kernel does not take this valid call, or None."""
    d = query.shape[-1]
    if query.dtype not in utils.FLOAT_DTYPES:
        return f"{str(query.dtype).replace('torch.', '')} is not fused"
    if d % 8 != 0 or not 8 <= d <= 256:
        return f"head dimension {d} is not fused (a multiple of 8 in [8, 256])"
    if any(t.stride(-1) != 1 for t in (query, key, value)):
        return "a strided last dimension is not fused"
    if is_causal and attn_mask is not None:
        return "is_causal together with attn_mask is not fused"
    if is_causal and query.shape[2] != key.shape[2]:
        return "is_causal with seqlen_q != seqlen_k is top-left aligned in torch"
    return None


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
    transposed views are passed without copies). Any other valid mask, layout, dtype or option is computed by
    torch SDPA: with a one-time warning under ``auto``, silently under the ``torch`` backend, and never under a named
    fused backend (``triton``, ``cuda``), which raises :class:`~fastformer.BackendError` saying why. Input that torch
    rejects gets torch's own error.
    """
    kwargs = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    args = (query, key, value)
    if not all(isinstance(t, torch.Tensor) for t in args) or any(t.dim() < 2 for t in args):
        return F.scaled_dot_product_attention(*args, **kwargs)  # torch's own errors
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return _sdpa_fallback("only 4-D (B, H, S, D) tensors are fused", *args, **kwargs)
    if _torch_rejects(query, key, value, enable_gqa):
        return F.scaled_dot_product_attention(*args, **kwargs)  # torch raises for what it rejects
    b, sk = query.shape[0], key.shape[2]
    why = _unfused(query, key, value, attn_mask, is_causal)
    if why is not None:
        return _sdpa_fallback(why, *args, **kwargs)
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
