"""``attn_implementation="fastformer"``: the attention function and the mask function ``transformers`` calls.

The mask function returns what the fused kernel needs and nothing more, as ``transformers``' flash-attention masks
do: ``None`` when no key is padded, else the (batch, kv_len) bool key-padding mask (True = attend). Causality is
the module's (``is_causal`` argument, else ``module.is_causal``), aligned bottom-right, which is what
``transformers``' causal masks mean whenever query and key positions end together; every other pattern (static
caches, packed ``position_ids``, sliding windows, custom mask functions) gets the materialized 4-D mask, which the
attention function hands to the model's original implementation.

The attention function runs :func:`fastformer.attention` (or :func:`fastformer.attention_varlen` on packed
``cu_seq_lens_*`` batches) on transposed views of ``transformers``' (batch, heads, seq, dim) tensors, without
copies. Anything the fused kernel cannot serve (``output_attentions``, ``head_mask``, a 4-D mask, soft-capping,
an unsupported head dim or dtype) runs the model's original attention for that call, with a one-time warning.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastformer import utils
from fastformer.ops.attention import attention, attention_varlen
from fastformer.ops.attention.api import fused_head_dim_reason

# options the fused kernel has no equivalent for; any of them set (not None) sends the call to the original code
UNSUPPORTED_KWARGS = ("head_mask", "softcap", "sliding_window", "s_aux", "position_bias")
_WARNED: set[str] = set()


def warn_once(reason: str) -> None:
    """One warning per distinct reason per process (``_WARNED.clear()`` re-arms them)."""
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"fastformer: {reason}; running the model's original attention for this call", stacklevel=3)


def collecting() -> dict[str, Any]:
    """What ``transformers`` is recording in this forward (``output_attentions`` / ``output_hidden_states``), by key.

    The model-level ``output_*`` flags (call or config) reach the layers only as this collector, read by the
    hooks ``transformers`` puts on them: GPT-2, for one, pops ``output_attentions`` before its layers.
    """
    capturing = sys.modules.get("transformers.utils.output_capturing")
    var = getattr(capturing, "_active_collector", None)
    if var is None:
        return {}
    if torch.compiler.is_compiling() and not getattr(var, "compiling", False):
        return {}  # dynamo cannot trace a ContextVar read; transformers sets a traceable copy when it collects
    return var.get() or {}


def wants_attentions(kwargs: dict[str, Any]) -> bool:
    """Whether this forward returns attention weights (``output_attentions=True`` in the call or the config)."""
    return bool(kwargs.get("output_attentions")) or "attentions" in collecting()


def _key_padding(mask: Any, q: Tensor, k: Tensor) -> bool:
    return (
        isinstance(mask, Tensor)
        and mask.dim() == 2
        and mask.dtype == torch.bool
        and mask.shape == (q.shape[0], k.shape[2])
    )


def _why_not(q: Tensor, k: Tensor, v: Tensor, mask: Any, kwargs: dict[str, Any]) -> str | None:
    """Why the fused kernel cannot serve this call, or None. q: (B, H, Sq, D); k, v: (B, Hkv, Sk, D)."""
    if wants_attentions(kwargs):
        return "output_attentions=True needs the attention weights, which the fused kernel never forms"
    for name in UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            return f"{name} is not supported by the fused kernel"
    packed = kwargs.get("cu_seq_lens_q") is not None
    if packed and (mask is not None or q.shape[0] != 1 or kwargs.get("cu_seq_lens_k") is None):
        return "a packed batch (cu_seq_lens_q) with a mask or a batch size other than 1"
    if mask is not None and not _key_padding(mask, q, k):
        return "a 4-D or custom attention mask (the fused kernel takes key padding and causality only)"
    if q.dtype not in utils.FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype} (fused attention takes float16, bfloat16 and float32)"
    d = q.shape[-1]
    if v.shape[-1] != d or k.shape[-1] != d:
        return f"head dimensions of q, k and v differ ({d}, {k.shape[-1]}, {v.shape[-1]})"
    if (why := fused_head_dim_reason(d)) is not None:
        return why
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        return "a number of key/value heads that does not divide the query heads"
    return None


def attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """The ``AttentionInterface`` function: query (B, H, Sq, D), key/value (B, Hkv, Sk, D) -> ((B, Sq, H, D), None).

    ``attention_mask`` is what :func:`fastformer_mask` made: None or a (B, Sk) bool key-padding mask. A packed
    batch (B = 1) comes with ``cu_seq_lens_q/k`` and ``max_length_q/k`` in ``kwargs`` and runs varlen.
    """
    causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    reason = _why_not(query, key, value, attention_mask, kwargs)
    if reason is not None:
        warn_once(reason)
        return _fallback(module, query, key, value, attention_mask, dropout, scaling, causal, kwargs)
    backend = getattr(module, "_fastformer_backend", None)
    # (B, H, S, D) -> (B, S, H, D): transformers' tensors are transposed views of (B, S, H, D) projections (or a
    # cache), so these are strided views with a unit-stride last dimension, which the kernel reads in place
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is not None:
        cu_k = kwargs["cu_seq_lens_k"]
        max_q = int(kwargs.get("max_length_q") or q.shape[1])
        max_k = int(kwargs.get("max_length_k") or k.shape[1])
        out = attention_varlen(
            q[0], k[0], v[0], cu_q, cu_k, max_q, max_k,
            causal=causal, softmax_scale=scaling, dropout_p=dropout, backend=backend,
        )  # fmt: skip
        return out.unsqueeze(0), None
    out = attention(
        q, k, v, causal=causal, key_padding_mask=attention_mask, softmax_scale=scaling, dropout_p=dropout,
        backend=backend,
    )  # fmt: skip
    return out, None


# ---- fallback: the model's own attention ----------------------------------------------------------------------


def _eager_reference(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, scaling: float | None = None,
    dropout: float = 0.0, **_: Any,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """softmax(q kᵀ · scale + mask) v, for modules whose modeling file has no ``eager_attention_forward``."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    weights = torch.matmul(query, key.transpose(2, 3)) * scale
    if mask is not None:
        weights = weights + mask
    weights = F.dropout(weights.softmax(dim=-1).to(value.dtype), p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _eager_for(module: nn.Module) -> Callable[..., tuple[Tensor, Tensor | None]]:
    """The ``eager_attention_forward`` of the modeling file that defines ``module``'s class (or a parent's)."""
    for cls in type(module).__mro__:
        fn = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if fn is not None:
            return fn
    return _eager_reference


def _param_dtype(module: nn.Module, fallback: torch.dtype) -> torch.dtype:
    # transformers builds eager masks in the model's dtype (that of the embeddings), not autocast's
    p = next((p for p in module.parameters() if p.is_floating_point()), None)
    return fallback if p is None else p.dtype


def _packed_mask(cu: Tensor, total: int, causal: bool) -> Tensor:
    """(1, 1, N, N) bool: token i attends to j in the same packed sequence (and j <= i when causal)."""
    pos = torch.arange(total, device=cu.device)
    seq = torch.searchsorted(cu[1:].to(torch.int64), pos, right=True)
    mask = seq[:, None] == seq[None, :]
    if causal:
        mask &= pos[None, :] <= pos[:, None]
    return mask[None, None]


def _fallback_mask(
    module: nn.Module, impl: str, q: Tensor, k: Tensor, mask: Any, causal: bool, kwargs: dict[str, Any]
) -> Any:
    """The mask ``transformers`` would have handed ``impl`` for the same call."""
    from transformers import masking_utils as mu

    dtype = _param_dtype(module, q.dtype)
    padding = mask is None or _key_padding(mask, q, k)
    if padding and kwargs.get("cu_seq_lens_q") is not None and q.shape[0] == 1:
        packed = _packed_mask(kwargs["cu_seq_lens_q"], q.shape[2], causal)
        mask = packed if mask is None else packed & mask[:, None, None, :]
    elif padding:
        build = mu.eager_mask if impl == "eager" else mu.sdpa_mask
        return build(
            batch_size=q.shape[0], q_length=q.shape[2], kv_length=k.shape[2], q_offset=k.shape[2] - q.shape[2],
            mask_function=mu.causal_mask_function if causal else mu.bidirectional_mask_function,
            attention_mask=mask, allow_is_causal_skip=causal, allow_is_bidirectional_skip=not causal,
            dtype=dtype, config=getattr(module, "config", None), device=q.device,
        )  # fmt: skip
    if impl == "eager" and isinstance(mask, Tensor) and mask.dtype == torch.bool:
        # eager adds the mask to the scores: True/False must become 0/-inf-like, as transformers' eager_mask does
        mask = torch.where(mask, torch.zeros((), dtype=dtype, device=mask.device), torch.finfo(dtype).min)
    return mask


def _fallback(
    module: nn.Module, q: Tensor, k: Tensor, v: Tensor, mask: Any, dropout: float, scaling: float | None,
    causal: bool, kwargs: dict[str, Any],
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """Run the attention the model had before (``patch`` records it), else eager when weights are wanted, else SDPA."""
    impl = getattr(module, "_fastformer_original_attn", None)
    if impl in (None, "fastformer"):  # attn_implementation="fastformer" from the start: what returns weights if asked
        impl = "eager" if wants_attentions(kwargs) else "sdpa"
    mask = _fallback_mask(module, impl, q, k, mask, causal, kwargs)
    kwargs = {n: t for n, t in kwargs.items() if not n.startswith(("cu_seq_lens_", "max_length_"))}
    if impl == "eager" and getattr(module, "reorder_and_upcast_attn", False):
        return module._upcast_and_reordered_attn(q, k, v, mask)  # GPT-2's fp32-upcast eager variant
    fn = _eager_for(module)
    if impl != "eager":
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        fn = ALL_ATTENTION_FUNCTIONS[impl] if impl in ALL_ATTENTION_FUNCTIONS else fn
    # eager functions ignore is_causal (their mask carries causality); SDPA reads it as transformers would
    return fn(module, q, k, v, mask, dropout=dropout, scaling=scaling, is_causal=causal, **kwargs)


# ---- the mask function ----------------------------------------------------------------------------------------


def fastformer_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: Any = 0,
    mask_function: Callable | None = None,
    attention_mask: Tensor | None = None,
    local_size: int | None = None,
    **kwargs: Any,
) -> Tensor | None:
    """The ``AttentionMaskInterface`` function: None (nothing padded), (B, kv_length) bool, or a 4-D bool mask.

    ``attention_mask`` is the 2-D padding mask ``transformers`` prepared (True = real token). The compact forms
    are returned only for plain causal or bidirectional masks whose query positions end where the keys end (so
    bottom-right causal alignment is exact); anything else is materialized by ``transformers``' ``sdpa_mask``.
    """
    from transformers import masking_utils as mu

    fn = mu.causal_mask_function if mask_function is None else mask_function
    plain = fn is mu.causal_mask_function or fn is mu.bidirectional_mask_function
    # sizes are ints, or SymInts under torch.compile's dynamic shapes (a static cache's offset is a tensor)
    ints = all(isinstance(x, (int, torch.SymInt)) for x in (q_offset, kv_offset, q_length, kv_length))
    aligned = ints and kv_offset == 0 and (fn is mu.bidirectional_mask_function or q_offset + q_length == kv_length)
    fits = attention_mask is None or (attention_mask.dim() == 2 and attention_mask.shape[-1] == kv_length)
    if not (plain and aligned and fits and local_size is None):
        return mu.sdpa_mask(
            batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
            mask_function=fn, attention_mask=attention_mask, local_size=local_size, allow_is_causal_skip=False,
            allow_is_bidirectional_skip=False, **{n: kwargs[n] for n in ("use_vmap", "device") if n in kwargs},
        )  # fmt: skip
    if attention_mask is None:
        return None
    mask = attention_mask.to(torch.bool)
    # a mask with nothing padded is dropped (one host read, as transformers' SDPA masks do); not while tracing
    if not torch.compiler.is_compiling() and bool(mask.all()):
        return None
    return mask
