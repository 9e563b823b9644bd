"""The Triton dropout helpers (kernels/dropout.py) against the torch reference (fastformer/ops/dropout.py)."""

import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICE
from fastformer.kernels.dropout import dropout_keep, philox4x32

from fastformer.ops import dropout

SEEDS = [0, 7, 2**62 + 12345]


@triton.jit
def _store_words(OUT, r0, r1, r2, r3, N: tl.constexpr):
    # word w of counter i at OUT[i, w]
    words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (N, 4)).to(tl.int64) & 0xFFFFFFFF
    tl.store(OUT + tl.arange(0, N)[:, None] * 4 + tl.arange(0, 4)[None, :], words)


@triton.jit
def _words_kernel(C, OURS, TRITONS, seed, N: tl.constexpr):
    # (N, 4) words of philox4x32 and of tl.randint4x for N int64 counters
    c = tl.load(C + tl.arange(0, N))
    r0, r1, r2, r3 = philox4x32(seed, c)
    _store_words(OURS, r0, r1, r2, r3, N)
    r0, r1, r2, r3 = tl.randint4x(seed, c)
    _store_words(TRITONS, r0, r1, r2, r3, N)


@triton.jit
def _keep_kernel(ROWS, OUT, seed, col0, n, thresh, M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.load(ROWS + tl.arange(0, M))
    keep = dropout_keep(seed, rows, col0, n, thresh, BLOCK_N)
    tl.store(OUT + tl.arange(0, M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :], keep.to(tl.int8))


@pytest.mark.parametrize("seed", SEEDS)
def test_triton_philox_is_randint4x_and_the_reference(seed):
    counters = torch.tensor([0, 1, 5, 2**31 + 3, 2**32, 2**40 + 7, 2**62, 2**63 - 1], dtype=torch.int64, device=DEVICE)
    ours, tritons = (torch.empty(8, 4, dtype=torch.int64, device=DEVICE) for _ in range(2))
    _words_kernel[(1,)](counters, ours, tritons, seed, N=8)
    ref = dropout.philox4x32(seed, counters.cpu())
    assert torch.equal(ours.cpu(), ref)
    assert torch.equal(tritons.cpu(), ref)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("col0,n,block_n", [(0, 7, 8), (8, 30, 16), (96, 130, 32), (0, 4, 4)])
def test_triton_dropout_tile_matches_reference(seed, col0, n, block_n):
    p = 0.4
    rows = torch.tensor([0, 1, 2, 3, 17, 2**31 + 1, 2**33 + 5, 999], dtype=torch.int64, device=DEVICE)
    out = torch.empty(8, block_n, dtype=torch.int8, device=DEVICE)
    _keep_kernel[(1,)](rows, out, seed, col0, n, dropout.threshold24(p), M=8, BLOCK_N=block_n)
    ref = dropout.keep_mask(seed, rows.cpu(), n, p, col0 + block_n)[:, col0:]
    assert torch.equal(out.cpu().bool(), ref)
