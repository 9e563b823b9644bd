"""Counter-based dropout shared by every op and backend: the Philox scheme, seeds and kernel arguments.

Dropout decisions form a logical (rows, n) matrix: LayerNorm's rows of N, the feed-forward layer's (tokens,
out features), attention's (flat lse row, key) with n = drop_stride. One Philox4x32-10 call gives 128 random bits,
so it decides four consecutive columns: element (row, col) uses word ``col % 4`` of

    philox(counter = row * ceil(n / 4) + col // 4, key = seed)

with counter (lo32, hi32, 0, 0) and key (lo32(seed), hi32(seed)), the four output words in Random123's order
(``tl.randint4x``'s), and is kept when ``word >> 8 >= threshold24(p)``. The same scheme lives in
kernels/dropout.py (Triton) and csrc/dropout.cuh (CUDA C++), so every backend draws the same mask; backward
regenerates it instead of storing it, and backends can be compared element for element. Counters are int64.

The torch backend draws its masks from torch's own generator by default (``torch.rand`` on a generator seeded
with the call's seed, regenerated the same way in backward): about 2.5x cheaper on a CPU than emulating Philox
with int64 tensor ops, statistically the same dropout, but not the fused kernels' elements. Inside
``with fastformer.exact_dropout():`` (or with ``FASTFORMER_EXACT_DROPOUT=1``) it emulates the Philox scheme
instead, bit for bit, so a torch-backend call drops exactly what a Triton or CUDA call with that seed drops.
The choice travels with the seed (bit 62 set: torch's generator), so a backward, a recomputation or a compiled
graph always regenerates the mask its forward drew, whatever the setting is by then.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import torch

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def check_p(p: float, name: str = "dropout_p") -> float:
    """``p`` as a float in [0, 1); TypeError/ValueError naming ``name`` otherwise."""
    if not isinstance(p, (int, float)) or isinstance(p, bool):
        raise TypeError(f"{name} must be a float, got {type(p).__name__}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p}")
    return float(p)


TORCH_RNG = 1 << 62  # seed bit: the torch backend draws this call's masks from torch's generator, not Philox

# A plain list (not a ContextVar), as fastformer.backends' stack, so that torch.compile traces it without a break.
_EXACT: list[bool] = []


@contextlib.contextmanager
def exact_dropout(enabled: bool = True) -> Iterator[None]:
    """Inside the block, the torch backend drops exactly the elements the fused kernels drop for the same seed
    (the Philox emulation, slower on a CPU); outside it, torch's generator. Fused backends always use Philox."""
    _EXACT.append(bool(enabled))
    try:
        yield
    finally:
        _EXACT.pop()


def exact() -> bool:
    """Whether new seeds ask the torch backend for the bit-exact Philox masks (innermost block, then environment)."""
    if _EXACT:
        return _EXACT[-1]
    return os.environ.get("FASTFORMER_EXACT_DROPOUT", "0").strip().lower() not in ("", "0", "false", "no")


def new_seed(p: float) -> torch.Tensor | None:
    """A fresh seed drawn from torch's default CPU generator, or None when there is no dropout.

    Values lie in [0, 2**62), with :data:`TORCH_RNG` added unless :func:`exact` is on. The seed is a CPU int64
    scalar tensor so that it can flow through custom ops and torch.compile without a device sync; launchers
    read it on the host.
    """
    if p == 0.0:
        return None
    seed = torch.randint(0, 2**62, (), dtype=torch.int64)
    return seed if exact() else seed | TORCH_RNG


def uses_torch_rng(seed: torch.Tensor | int | None) -> bool:
    """Whether the torch backend draws this seed's masks from torch's generator (else the Philox emulation)."""
    return bool(seed_int(seed) & TORCH_RNG)


def threshold16(p: float) -> int:
    """Keep threshold on 16 random bits (torch-generator masks): P(keep) = 1 - threshold / 2**16 ~= 1 - p."""
    return int(round(p * (1 << 16)))


def torch_keep(seed: torch.Tensor | int | None, shape: tuple[int, ...], p: float, device: torch.device) -> torch.Tensor:
    """Boolean keep mask of ``shape`` from torch's generator on ``device`` seeded with ``seed``.

    Each full-range 64-bit draw gives four 16-bit uniforms (one generator call per four elements: about 3.5x
    cheaper than ``torch.rand`` on a CPU and 5x cheaper than ``F.dropout``'s bernoulli); an element is kept when
    its uniform is at least :func:`threshold16`, so the dropout rate is ``p`` to within 2**-17.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(seed_int(seed) % (1 << 64))
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None, generator=gen)
    u16 = words.view(torch.int16)[:n]  # uniform over int16: u + 2**15 is uniform over [0, 2**16)
    return (u16 >= threshold16(p) - (1 << 15)).view(shape)


def seed_int(seed: torch.Tensor | int | None) -> int:
    """The seed as a Python int (0 when there is none)."""
    return 0 if seed is None else int(seed)


def threshold24(p: float) -> int:
    """Keep threshold on 24 random bits: P(keep) = 1 - threshold / 2**24 ~= 1 - p."""
    return int(round(p * (1 << 24)))


def kernel_args(p: float, seed: torch.Tensor | int | None) -> tuple[int, int, float]:
    """(seed, 24-bit threshold, keep scale 1/(1-p)) as every Triton and CUDA kernel takes them."""
    return seed_int(seed), threshold24(p), 1.0 / (1.0 - p)


def philox4x32_10(c0, c1, c2, c3, k0, k1) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of counter words (c0, c1, c2, c3) and key words (k0, k1): int64 tensors (or ints) holding
    uint32 values; returns the four output words as int64 tensors with values in [0, 2**32)."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & _M32 for c in (c0, c1, c2, c3))
    k0, k1 = k0 & _M32, k1 & _M32
    for _ in range(10):
        # int64 products wrap modulo 2**64 (two's complement), so one multiply yields both 32-bit halves
        # of the full 32x32-bit product: bits 32..63 after the shift and mask, bits 0..31 after the mask
        prod_b, prod_a = c2 * _ROUND_B, c0 * _ROUND_A
        c0, c2 = ((prod_b >> 32) & _M32) ^ c1 ^ k0, ((prod_a >> 32) & _M32) ^ c3 ^ k1
        c1, c3 = prod_b & _M32, prod_a & _M32
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def philox4x32(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """All four output words for each int64 counter (lo32, hi32, 0, 0) and key ``seed``: shape (*counters.shape, 4),
    int64 values in [0, 2**32); what ``tl.randint4x(seed, counters)`` computes."""
    counters = counters.to(torch.int64)
    zero = torch.zeros_like(counters)
    return torch.stack(philox4x32_10(counters, counters >> 32, zero, zero, seed, seed >> 32), dim=-1)


def philox_uint32(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """First output word of Philox4x32-10 for each int64 counter, as int64 values in [0, 2**32)."""
    return philox4x32(seed, offsets)[..., 0]


def keep_mask(seed: int, rows: torch.Tensor, n: int, p: float, cols: int | None = None) -> torch.Tensor:
    """Boolean keep mask of columns 0 .. cols-1 (default n) of the dropout rows ``rows`` (int64 row ids) in a
    matrix of row length ``n``: shape (*rows.shape, cols). Each group of four columns costs one Philox call."""
    cols = n if cols is None else cols
    groups = (cols + 3) // 4
    rows = rows.to(torch.int64)
    counters = rows[..., None] * ((n + 3) // 4) + torch.arange(groups, dtype=torch.int64, device=rows.device)
    words = philox4x32(seed, counters).reshape(*rows.shape, 4 * groups)[..., :cols]
    return (words >> 8) >= threshold24(p)


def apply(t: torch.Tensor, seed: torch.Tensor | int | None, p: float) -> torch.Tensor:
    """Dropout of (rows, cols) ``t``, kept values scaled by 1/(1-p); dropped elements are 0 even where ``t`` is inf
    or NaN, as in the kernels. The mask is torch's (:func:`torch_keep`) when the seed says so, else the Philox mask
    of dropout rows 0 .. rows-1 with row length ``cols``."""
    rows, cols = t.shape
    if uses_torch_rng(seed):
        keep = torch_keep(seed, (rows, cols), p, t.device)
    else:
        keep = keep_mask(seed_int(seed), torch.arange(rows, dtype=torch.int64, device=t.device), cols, p)
    return torch.where(keep, t, 0.0).mul_(1.0 / (1.0 - p))
