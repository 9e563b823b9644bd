"""pytest-benchmark: fastformer's dropout + residual + LayerNorm block against torch eager (see conftest.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from fastformer.benchmarks import common

import fastformer

SHAPES = [(4096, 768), (16384, 4096)] if torch.cuda.is_available() else [(128, 768), (512, 1024)]
P = 0.1


def _ring(rows: int, n: int, dev: torch.device, dtype: torch.dtype) -> common.Ring:
    """(x, residual, weight 1, bias 0, output gradient) sets; unit weight and zero bias make every output row
    normalised, which the checks test."""

    def make():
        x, r = (torch.randn(rows, n, device=dev, dtype=dtype, requires_grad=True) for _ in range(2))
        w = torch.ones(n, device=dev, dtype=dtype, requires_grad=True)
        b = torch.zeros(n, device=dev, dtype=dtype, requires_grad=True)
        return x, r, w, b, torch.randn(rows, n, device=dev, dtype=dtype)

    return common.rotating(make)


def _call(block: Callable, mode: str) -> Callable:
    """The timed call of ``mode``: the block's (output, residual sum), or the gradients of its four inputs."""
    if mode == "fwd":

        def fwd(x, r, w, b, _g):
            with torch.no_grad():
                return block(x, r, w, b)

        return fwd

    def fwd_bwd(x, r, w, b, g):
        return torch.autograd.grad(block(x, r, w, b), (x, r, w, b), (g, g))

    return fwd_bwd


def _check(result, mode: str, rows: int, n: int) -> None:
    if mode == "fwd+bwd":
        assert [tuple(g.shape) for g in result] == [(rows, n), (rows, n), (n,), (n,)]
        assert all(torch.isfinite(g).all() for g in result)
        return
    out, s = result
    assert out.shape == s.shape == (rows, n)
    assert torch.isfinite(out).all() and torch.isfinite(s).all()
    rows_mean, rows_var = out.float().mean(-1), out.float().var(-1, unbiased=False)
    torch.testing.assert_close(rows_mean, torch.zeros_like(rows_mean), atol=2e-2, rtol=0)
    torch.testing.assert_close(rows_var, torch.ones_like(rows_var), atol=2e-2, rtol=0)


def _eager(x, r, w, b):
    s = F.dropout(x, P) + r
    return F.layer_norm(s, (x.shape[-1],), w, b), s


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_fastformer(timed, backend, shape, mode, dev, dtype):
    def block(x, r, w, b):
        return fastformer.dropout_add_layer_norm(x, r, w, b, dropout_p=P, backend=backend)

    _check(timed(_call(block, mode), _ring(*shape, dev, dtype)), mode, *shape)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_torch_eager(timed, shape, mode, dev, dtype):
    _check(timed(_call(_eager, mode), _ring(*shape, dev, dtype)), mode, *shape)
