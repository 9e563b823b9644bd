"""pytest-benchmark: fastformer's attention against torch SDPA and an eager softmax(QK^T)V (see conftest.py)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from fastformer.benchmarks import common

import fastformer

# (batch, seqlen, heads, head dim, causal)
SHAPES = (
    [(8, 1024, 16, 128, True), (2, 4096, 16, 128, False)]
    if torch.cuda.is_available()
    else [(2, 128, 4, 64, True), (1, 256, 4, 64, False)]
)


def _id(shape: tuple) -> str:
    b, s, h, d, causal = shape
    return f"B{b}-S{s}-H{h}-D{d}" + ("-causal" if causal else "")


def _ring(b: int, s: int, h: int, d: int, dev: torch.device, dtype: torch.dtype) -> common.Ring:
    """(q, k, v, output gradient) sets in fastformer's (B, S, H, D) layout, then the same values in SDPA's
    (B, H, S, D)."""

    def make():
        native = [torch.randn(b, s, h, d, device=dev, dtype=dtype, requires_grad=True) for _ in range(4)]
        native[3].requires_grad_(False)
        return *native, *(t.detach().transpose(1, 2).contiguous().requires_grad_(t.requires_grad) for t in native)

    return common.rotating(make)


def _eager(q, k, v, causal: bool):
    """softmax(QK^T / sqrt(d))V, (B, H, S, D)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s = q.shape[-2]
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return scores.softmax(-1) @ v


def _sdpa(q, k, v, causal: bool):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _call(attn: Callable, causal: bool, mode: str, bhsd: bool) -> Callable:
    """The timed call of ``mode`` on a ring set (its (B, H, S, D) half when ``bhsd``): the output, or dQ, dK, dV."""

    def pick(inputs):
        return inputs[4:] if bhsd else inputs[:4]

    if mode == "fwd":

        def fwd(*inputs):
            q, k, v, _ = pick(inputs)
            with torch.no_grad():
                return attn(q, k, v, causal)

        return fwd

    def fwd_bwd(*inputs):
        q, k, v, g = pick(inputs)
        return torch.autograd.grad(attn(q, k, v, causal), (q, k, v), g)

    return fwd_bwd


def _check(attn: Callable, ring: common.Ring, result, shape: tuple, bhsd: bool) -> None:
    """Shapes and finiteness of the timed result; the output on the first set against fp32 eager attention."""
    b, s, h, d, causal = shape
    want_shape = (b, h, s, d) if bhsd else (b, s, h, d)
    outs = result if isinstance(result, tuple) else (result,)
    assert all(tuple(o.shape) == want_shape and torch.isfinite(o).all() for o in outs)
    q, k, v = ring.sets[0][4:7]
    with torch.no_grad():
        want = _eager(q.float(), k.float(), v.float(), causal)
        got = attn(q, k, v, causal) if bhsd else attn(*ring.sets[0][:3], causal).transpose(1, 2)
    tol = 2e-4 if q.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_fastformer(timed, backend, shape, mode, dev, dtype):
    def attn(q, k, v, causal):
        return fastformer.attention(q, k, v, causal=causal, backend=backend)

    ring = _ring(*shape[:4], dev, dtype)
    _check(attn, ring, timed(_call(attn, shape[4], mode, bhsd=False), ring), shape, bhsd=False)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("attn", [_sdpa, _eager], ids=["torch-sdpa", "torch-eager"])
def test_torch(timed, attn, shape, mode, dev, dtype):
    ring = _ring(*shape[:4], dev, dtype)
    _check(attn, ring, timed(_call(attn, shape[4], mode, bhsd=True), ring), shape, bhsd=True)
