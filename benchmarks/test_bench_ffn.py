"""pytest-benchmark: fastformer's feed-forward block (Linear -> GELU -> Linear) against torch eager (see
conftest.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from fastformer.benchmarks import common

import fastformer

# (tokens, d_model); the hidden layer is 4 * d_model
SHAPES = [(4096, 768), (16384, 1024)] if torch.cuda.is_available() else [(256, 256), (512, 768)]


def _ring(tokens: int, d: int, dev: torch.device, dtype: torch.dtype) -> common.Ring:
    """(x, w1, b1, w2, b2, output gradient) sets."""

    def make():
        x = torch.randn(tokens, d, device=dev, dtype=dtype, requires_grad=True)
        w1 = (torch.randn(4 * d, d, device=dev, dtype=dtype) / d**0.5).requires_grad_()
        b1 = (0.1 * torch.randn(4 * d, device=dev, dtype=dtype)).requires_grad_()
        w2 = (torch.randn(d, 4 * d, device=dev, dtype=dtype) / (4 * d) ** 0.5).requires_grad_()
        b2 = (0.1 * torch.randn(d, device=dev, dtype=dtype)).requires_grad_()
        return x, w1, b1, w2, b2, torch.randn(tokens, d, device=dev, dtype=dtype)

    return common.rotating(make)


def _eager(x, w1, b1, w2, b2):
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def _call(ffn: Callable, mode: str) -> Callable:
    """The timed call of ``mode``: the block's output, or the gradients of its five inputs."""
    if mode == "fwd":

        def fwd(*inputs):
            with torch.no_grad():
                return ffn(*inputs[:5])

        return fwd

    def fwd_bwd(*inputs):
        return torch.autograd.grad(ffn(*inputs[:5]), inputs[:5], inputs[5])

    return fwd_bwd


def _check(ffn: Callable, ring: common.Ring, result, mode: str) -> None:
    """Shapes and finiteness of the timed result; the output on the first set against fp32 eager."""
    params = ring.sets[0][:5]
    if mode == "fwd+bwd":
        assert [g.shape for g in result] == [p.shape for p in params]
        assert all(torch.isfinite(g).all() for g in result)
        return
    assert result.shape == params[0].shape and torch.isfinite(result).all()
    with torch.no_grad():
        want = _eager(*(p.float() for p in params))
        got = ffn(*params).float()
    tol = 1e-4 if params[0].dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_fastformer(timed, backend, shape, mode, dev, dtype):
    def ffn(x, w1, b1, w2, b2):
        return fastformer.feed_forward(x, w1, b1, w2, b2, "gelu", backend=backend)

    ring = _ring(*shape, dev, dtype)
    _check(ffn, ring, timed(_call(ffn, mode), ring), mode)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_torch_eager(timed, shape, mode, dev, dtype):
    ring = _ring(*shape, dev, dtype)
    _check(_eager, ring, timed(_call(_eager, mode), ring), mode)
