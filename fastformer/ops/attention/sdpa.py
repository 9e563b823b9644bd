"""``scaled_dot_product_attention``: a drop-in for torch's SDPA on (B, H, S, D) tensors that runs what it can on the
fused kernel (key-padding masks and bottom-right-compatible causal) and hands everything else to torch."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from fastformer import utils
from fastformer.ops.attention.api import attention

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
