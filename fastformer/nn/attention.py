"""Multi-head self-attention on the fused kernel: one QKV projection, fused attention, output projection."""

from __future__ import annotations

import torch
from torch import nn

from fastformer.ops.attention import attention


class MultiheadSelfAttention(nn.Module):
    """Self-attention with ``n_heads`` query heads sharing ``n_kv_heads`` key/value heads (GQA; default MHA).

    Parameters: ``qkv`` is one ``nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * head_dim)`` whose output
    columns are [q heads | k heads | v heads], and ``out_proj`` is ``nn.Linear(d_model, d_model)``.
    The q, k and v handed to the kernel are strided views of the projection (no copies).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        causal: bool = False,
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads <= 0 or d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be a positive multiple of n_heads ({n_heads})")
        if n_kv_heads <= 0 or n_heads % n_kv_heads != 0:
            raise ValueError(f"n_kv_heads ({n_kv_heads}) must divide n_heads ({n_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.causal, self.dropout = causal, dropout
        self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(
        self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None, backend: str | None = None
    ) -> torch.Tensor:
        """x: (B, T, d_model); key_padding_mask: (B, T) True/1 = real token. Returns (B, T, d_model)."""
        b, t, _ = x.shape
        h, hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv(x).view(b, t, h + 2 * hkv, hd)  # (B, T, H + 2 Hkv, hs)
        q, k, v = qkv.split([h, hkv, hkv], dim=2)  # (B, T, H, hs), (B, T, Hkv, hs) x2: strided views
        y = attention(
            q,
            k,
            v,
            causal=self.causal,
            key_padding_mask=key_padding_mask,
            dropout_p=self.dropout if self.training else 0.0,
            backend=backend,
        )  # (B, T, H, hs)
        return self.out_proj(y.reshape(b, t, self.d_model))

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
            f"causal={self.causal}, dropout={self.dropout}"
        )
