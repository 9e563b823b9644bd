"""Counter-based dropout masks shared by every backend.

An element with flat index ``i`` is kept when ``philox(seed, i) >> 8 >= threshold24(p)``, where
``philox`` is Philox4x32-10 with counter (lo32(i), hi32(i), 0, 0) and key (lo32(seed), hi32(seed)),
taking the first output word: exactly what ``tl.randint`` computes. Triton, CUDA C++ and this
pure-torch version therefore draw the same mask, so backward regenerates it instead of storing it,
and backends can be compared element for element.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def threshold24(p: float) -> int:
    """Keep threshold on 24 random bits: P(keep) = 1 - threshold / 2**24 ~= 1 - p."""
    return int(round(p * (1 << 24)))


def philox_uint32(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """First output word of Philox4x32-10 for each int64 offset, as int64 values in [0, 2**32)."""
    offsets = offsets.to(torch.int64)
    c0, c1 = offsets & _M32, (offsets >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        # int64 products wrap modulo 2**64 (two's complement), so one multiply yields both 32-bit halves
        # of the full 32x32-bit product: bits 32..63 after the shift and mask, bits 0..31 after the mask
        prod_b, prod_a = c2 * _ROUND_B, c0 * _ROUND_A
        c0, c2 = ((prod_b >> 32) & _M32) ^ c1 ^ k0, ((prod_a >> 32) & _M32) ^ c3 ^ k1
        c1, c3 = prod_b & _M32, prod_a & _M32
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0


def keep_mask(seed: int, offsets: torch.Tensor, p: float) -> torch.Tensor:
    """Boolean keep mask for elements at flat ``offsets`` (same shape as ``offsets``)."""
    return (philox_uint32(seed, offsets) >> 8) >= threshold24(p)
