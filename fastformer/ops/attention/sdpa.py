"""``scaled_dot_product_attention``: a drop-in for torch's SDPA that runs what it can on the fused kernel (key-padding
masks and bottom-right-compatible causal on (B, H, S, D) tensors), hands every other valid call to torch and refuses
invalid input with its own checks."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from fastformer import backends, utils
from fastformer.ops import dropout
from fastformer.ops.attention.api import attention, fused_head_dim_reason

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


_DTYPES = (*utils.FLOAT_DTYPES, torch.float64)


def _broadcast(a: list[int], b: list[int]) -> list[int] | None:
    """The broadcast of two shapes (as torch's matmul broadcasts batch dimensions), or None if they do not."""
    n = max(len(a), len(b))
    a, b = [1] * (n - len(a)) + a, [1] * (n - len(b)) + b
    if any(x != y and x != 1 and y != 1 for x, y in zip(a, b)):
        return None
    return [y if x == 1 else x for x, y in zip(a, b)]


def _check_inputs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> None:
    """TypeError (type, dtype) or ValueError (shape, device, value) naming the argument, for every call torch's SDPA
    does not take as valid, before anything runs. Valid: query (..., L, E), key (..., S, E), value (..., S, Ev) of
    one floating dtype and device; leading dimensions that broadcast (with ``enable_gqa`` the key and value heads,
    dimension -3, must divide the query heads); attn_mask bool, float32 or query's dtype, broadcastable to the
    attention weights (..., L, S)."""
    qkv = (("query", query), ("key", key), ("value", value))
    for name, t in qkv:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
    utils.check_float(query, "query", _DTYPES)
    for name, t in qkv[1:]:
        if t.dtype != query.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but query has {query.dtype}; they must match")
        if t.device != query.device:
            # (the short names as fastformer.attention words it: k is on meta but q is on cpu)
            raise ValueError(f"{name[0]} is on {t.device} but q is on {query.device}: {name} must be on query's device")
    for name, t in qkv:
        if t.dim() < 2:
            raise ValueError(f"{name} must be at least 2-D (..., seqlen, head_dim), got shape {tuple(t.shape)}")
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"key: head dimension {key.shape[-1]} does not match query's {query.shape[-1]}")
    if value.shape[-2] != key.shape[-2]:
        raise ValueError(
            f"value has sequence length {value.shape[-2]} but key has {key.shape[-2]} (value {tuple(value.shape)}, "
            f"key {tuple(key.shape)}); they must match"
        )
    if not isinstance(enable_gqa, (bool, torch.SymBool)):
        raise TypeError(f"enable_gqa must be a bool, got {type(enable_gqa).__name__}")
    lead = {name: list(t.shape[:-2]) for name, t in qkv}
    if enable_gqa:
        if min(t.dim() for _, t in qkv) < 3:
            raise ValueError("enable_gqa needs query, key and value with a heads dimension (..., heads, seqlen, dim)")
        hq = query.shape[-3]
        for name, t in qkv[1:]:
            h = t.shape[-3]
            if h != hq and (h == 0 or hq % h != 0):
                raise ValueError(f"{name}: number of heads ({h}) must divide query's ({hq}) with enable_gqa")
            lead[name][-1] = hq  # torch repeats each key/value head for its group of query heads
    qk = _broadcast(lead["query"], lead["key"])
    if qk is None:
        raise ValueError(
            f"key's leading dimensions {tuple(key.shape[:-2])} do not broadcast with query's {tuple(query.shape[:-2])}"
            + ("" if enable_gqa else " (fewer key heads than query heads need enable_gqa=True)")
        )
    if _broadcast(qk, lead["value"]) is None:
        raise ValueError(
            f"value's leading dimensions {tuple(value.shape[:-2])} do not broadcast with those of query and key "
            f"{tuple(qk)}"
        )
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            raise TypeError(
                f"attn_mask must be bool (True = attend) or an additive float mask in float32 or query's dtype "
                f"({query.dtype}), got {attn_mask.dtype}"
            )
        if attn_mask.device != query.device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {query.device}; they must match")
        weights = (*qk, query.shape[-2], key.shape[-2])
        if _broadcast(list(attn_mask.shape), list(weights)) != list(weights):
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to the attention weights' shape "
                f"{weights} (..., L, S)"
            )
    dropout.check_p(dropout_p)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float, torch.SymFloat))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not isinstance(is_causal, (bool, torch.SymBool)):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")


def _autocast(*tensors):
    """As torch's autocast casts SDPA's inputs: floating tensors other than float64 to autocast's dtype, when it is
    on for the query's device (so that the dtype checks see what torch would)."""
    dtype = utils.autocast_dtype(tensors[0]) if isinstance(tensors[0], torch.Tensor) else None
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in utils.FLOAT_DTYPES else t for t in tensors)


def _unfused(query, key, value, attn_mask, is_causal: bool) -> str | None:
    """Why the fused kernel does not take this valid call, or None."""
    d = query.shape[-1]
    if query.dtype not in utils.FLOAT_DTYPES:
        return f"{str(query.dtype).replace('torch.', '')} is not fused"
    if (why := fused_head_dim_reason(d)) is not None:
        return why
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
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``.

    Bool key-padding masks broadcastable to (B, 1, 1, Sk) and ``is_causal`` on (B, H, S, D) tensors run on the fused
    kernel (the transposed views are passed without copies). Any other valid mask, layout, rank, broadcast, dtype or
    option is computed by torch SDPA: with a one-time warning under ``auto``, silently under the ``torch`` backend,
    and never under a named fused backend (``triton``, ``cuda``), which raises :class:`~fastformer.BackendError`
    saying why. Input torch's SDPA does not take as valid (a non-tensor, non-floating or mismatched dtypes, tensors on
    different devices, fewer than 2 dimensions, mismatched head dims or key/value lengths, leading dimensions or an
    ``attn_mask`` that do not broadcast, ``enable_gqa`` head counts that do not divide) raises fastformer's own
    TypeError or ValueError naming the argument before anything runs, as does a ``dropout_p`` outside [0, 1).
    """
    query, key, value, attn_mask = _autocast(query, key, value, attn_mask)
    _check_inputs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if attn_mask is not None and attn_mask.dim() < 2:  # broadcastable as documented, but torch indexes dim -2
        attn_mask = attn_mask.reshape((1,) * (2 - attn_mask.dim()) + tuple(attn_mask.shape))
    kwargs = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    args = (query, key, value)
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return _sdpa_fallback("only 4-D (B, H, S, D) tensors are fused", *args, **kwargs)
    b, h, _, _ = query.shape
    hkv, sk = key.shape[1], key.shape[2]
    if key.shape != value.shape or key.shape[0] != b or hkv == 0 or h % hkv != 0 or (h != hkv != 1 and not enable_gqa):
        why = "broadcast batch or head dimensions, or a value head dimension other than the query's, are not fused"
        return _sdpa_fallback(why, *args, **kwargs)
    why = _unfused(query, key, value, attn_mask, is_causal)
    if why is not None:
        return _sdpa_fallback(why, *args, **kwargs)
    mask = None
    if attn_mask is not None:
        m = attn_mask
        if m.dtype != torch.bool:
            return _sdpa_fallback("a non-boolean attn_mask is not fused", *args, **kwargs)
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
