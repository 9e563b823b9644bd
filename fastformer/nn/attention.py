"""Multi-head self-attention on the fused ops: one QKV projection, fused attention, output projection."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from fastformer import utils
from fastformer.nn._checks import check_int
from fastformer.ops import dropout
from fastformer.ops.attention import attention, attention_varlen
from fastformer.ops.ffn import linear

# a layer's KV-cache hook: stores the new (B, T, Hkv, hs) keys and values, returns what to attend to and its mask
KVHook = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor | None]]


class MultiheadSelfAttention(nn.Module):
    """Self-attention with ``n_heads`` query heads sharing ``n_kv_heads`` key/value heads (GQA; default MHA).

    Parameters: ``qkv`` is one ``nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * head_dim)`` whose output
    columns are [q heads | k heads | v heads], and ``out_proj`` is ``nn.Linear(d_model, d_model)``; both run on
    ``fastformer.linear``. The q, k and v handed to the kernel are strided views of the projection (no copies).

    Args:
        d_model: model width; a multiple of ``n_heads``.
        n_heads, n_kv_heads: query heads and key/value heads (``n_kv_heads`` divides ``n_heads``; None = MHA).
        causal: query i sees keys j <= i (bottom-right aligned with a KV cache).
        dropout_p: dropout on the attention probabilities while training, in [0, 1).
        bias: whether both projections have a bias.
        backend: fixed backend for this module (default: the ambient selection).
        device, dtype: of the parameters, as for ``torch.nn`` modules.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        causal: bool = False,
        dropout_p: float = 0.0,
        bias: bool = True,
        *,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        d_model, n_heads = check_int(d_model, "d_model"), check_int(n_heads, "n_heads")
        n_kv_heads = n_heads if n_kv_heads is None else check_int(n_kv_heads, "n_kv_heads")
        if d_model <= 0 or n_heads <= 0 or d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be a positive multiple of n_heads ({n_heads})")
        if n_kv_heads <= 0 or n_heads % n_kv_heads != 0:
            raise ValueError(f"n_kv_heads ({n_kv_heads}) must divide n_heads ({n_heads})")
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.causal, self.dropout_p, self.backend = causal, dropout.check_p(dropout_p), backend
        width = (n_heads + 2 * n_kv_heads) * self.head_dim
        self.qkv = nn.Linear(d_model, width, bias=bias, device=device, dtype=dtype)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias, device=device, dtype=dtype)

    def forward(
        self,
        x: Tensor,
        key_padding_mask: Tensor | None = None,
        *,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int = 0,
        kv_cache: KVHook | None = None,
    ) -> Tensor:
        """x: (B, T, d_model) -> (B, T, d_model), or packed (N, d_model) -> (N, d_model) with ``cu_seqlens``.

        key_padding_mask: (B, T) True/1 = real token. cu_seqlens/max_seqlen: (B + 1,) prefix sums of the packed
        sequence lengths and the longest (see ``fastformer.attention_varlen``). kv_cache: a hook that stores the new
        keys/values and returns those to attend to, with a key mask or None (``KVCache.layer``).
        """
        utils.check_tensor(x, "x")
        if cu_seqlens is not None:
            if x.dim() != 2:
                raise ValueError(f"x must be 2-D (total_tokens, d_model) with cu_seqlens, got shape {tuple(x.shape)}")
            for name, given in (("key_padding_mask", key_padding_mask), ("kv_cache", kv_cache)):
                if given is not None:
                    raise ValueError(f"{name} cannot be combined with cu_seqlens (the packed path would ignore it)")
        elif x.dim() != 3:
            raise ValueError(f"x must be 3-D (batch, seqlen, d_model) without cu_seqlens, got shape {tuple(x.shape)}")
        if kv_cache is not None and not callable(kv_cache):
            raise TypeError(f"kv_cache must be None or a callable hook (KVCache.layer), got {type(kv_cache).__name__}")
        h, hkv, be = self.n_heads, self.n_kv_heads, self.backend
        qkv = linear(x, self.qkv.weight, self.qkv.bias, backend=be)  # (..., (H + 2 Hkv) hs)
        q, k, v = qkv.unflatten(-1, (h + 2 * hkv, self.head_dim)).split([h, hkv, hkv], dim=-2)  # strided views
        p = self.dropout_p if self.training else 0.0
        if cu_seqlens is not None:
            n = max_seqlen
            y = attention_varlen(q, k, v, cu_seqlens, cu_seqlens, n, n, causal=self.causal, dropout_p=p, backend=be)
        else:
            causal, mask = self.causal, key_padding_mask
            if kv_cache is not None:
                k, v, cache_mask = kv_cache(k, v)  # (B, S, Hkv, hs): the cached keys and the new ones
                if cache_mask is not None:  # a single new query may see every written key
                    causal, mask = False, cache_mask
            y = attention(q, k, v, causal=causal, key_padding_mask=mask, dropout_p=p, backend=be)  # (B, T, H, hs)
        return linear(y.flatten(-2), self.out_proj.weight, self.out_proj.bias, backend=be)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
            f"causal={self.causal}, dropout_p={self.dropout_p}, backend={self.backend}"
        )
