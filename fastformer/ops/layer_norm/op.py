"""The LayerNorm custom ops: argument object, ``fastformer::layer_norm_fwd`` / ``layer_norm_bwd``, autograd.

Inputs are viewed as (M, N) rows with N = prod(normalized_shape); statistics are fp32 in every backend.
The forward returns ``(y, s, mean, rstd)`` where ``s = dropout(x) + residual`` is stored only when it
differs from ``x`` (else an empty placeholder); backward normalises ``s`` (or ``x``) again from the saved
statistics and regenerates the dropout mask from the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fastformer import utils
from fastformer.ops import _custom


@dataclass(frozen=True)
class LayerNormArgs(_custom.OpArgs):
    """What the forward and backward custom ops share (the activations come in front of these)."""

    OP = "layer_norm"

    weight: Tensor | None  # normalized_shape, or None
    bias: Tensor | None  # normalized_shape, or None
    n: int  # N = prod(normalized_shape): the row length
    eps: float  # added to the variance
    dropout_p: float  # dropout on x before the residual add
    seed: Tensor | None  # Philox seed (CPU int64 scalar) when dropout_p > 0
    backend: str

    @property
    def w(self) -> Tensor | None:
        """The weight as a flat (N,) vector."""
        return self.weight.reshape(-1) if self.weight is not None else None

    @property
    def b(self) -> Tensor | None:
        return self.bias.reshape(-1) if self.bias is not None else None

    def stores_s(self, residual: Tensor | None) -> bool:
        """Whether the residual sum differs from x, and so is an output of its own."""
        return residual is not None or self.dropout_p > 0


def rows(t: Tensor, n: int) -> Tensor:
    """(M, n) view of ``t`` with unit column stride; copies only when no such view exists."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


def row_stride(t2: Tensor | None) -> int:
    """Row stride of a 2-D view as the kernels take it (0 for an absent tensor)."""
    if t2 is None:
        return 0
    return t2.stride(0) if t2.shape[0] > 1 else t2.shape[1]


def partial_rows(m: int, block_m: int, device: torch.device) -> int:
    """Programs in a persistent backward grid, one fp32 dW/dB partial row each: enough to fill the GPU."""
    return max(1, min(utils.cdiv(m, block_m), 4 * utils.sm_count(device)))


def fwd_buffers(x2: Tensor, store_s: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Empty (y, s or a (0,) placeholder, mean, rstd) for (M, N) rows; statistics in fp32."""
    m, n = x2.shape
    mean = torch.empty(m, dtype=torch.float32, device=x2.device)
    y, s = torch.empty_like(x2, memory_format=torch.contiguous_format), x2.new_empty((m, n) if store_s else (0,))
    return y, s, mean, torch.empty_like(mean)


def bwd_buffers(a: LayerNormArgs, s2: Tensor, has_res: bool, grid: int) -> tuple:
    """(dx, dres or None, zeroed fp32 dW and dB partial rows (grid, N) or None) for the backward kernels."""
    m, n = s2.shape
    dx = torch.empty((m, n), dtype=s2.dtype, device=s2.device)
    dres = torch.empty_like(dx) if has_res else None
    dw_part = s2.new_zeros((grid, n), dtype=torch.float32) if a.weight is not None else None
    db_part = s2.new_zeros((grid, n), dtype=torch.float32) if a.bias is not None else None
    return dx, dres, dw_part, db_part


def reduce_partials(a: LayerNormArgs, dw_part: Tensor | None, db_part: Tensor | None, s2: Tensor) -> tuple:
    """(dw, db) from the per-program partial rows; custom-op outputs may not alias: a fresh empty for each absent."""
    wdtype = a.weight.dtype if a.weight is not None else s2.dtype
    dw = dw_part.sum(0).to(wdtype) if dw_part is not None else s2.new_empty(0)
    db = db_part.sum(0).to(wdtype) if db_part is not None else s2.new_empty(0)
    return dw, db


def _param_shape(s: Tensor, a: LayerNormArgs) -> torch.Size:
    """normalized_shape: the weight's shape, or the trailing dimensions of ``s`` that multiply to N."""
    if a.weight is not None:
        return a.weight.shape
    k, prod = 0, 1
    while prod < a.n and k < s.dim():
        k += 1
        prod *= s.shape[-k]
    return s.shape[s.dim() - max(k, 1) :]


def run_fwd(a: LayerNormArgs, x: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, s, mean, rstd): the forward custom op's body, also called directly in plain inference."""
    r2 = rows(residual, a.n) if residual is not None else None
    y, s, mean, rstd = a.impl().fwd(a, rows(x, a.n), r2)
    return y.view(x.shape), s.view(x.shape) if a.stores_s(residual) else s, mean, rstd


def _layer_norm_fwd_fake(x: Tensor, residual: Tensor | None, *rest) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    a = LayerNormArgs(*rest)
    m = x.numel() // a.n
    s = x.new_empty(x.shape) if a.stores_s(residual) else x.new_empty(0)
    return x.new_empty(x.shape), s, x.new_empty(m, dtype=torch.float32), x.new_empty(m, dtype=torch.float32)


def _layer_norm_bwd(dy, ds_out, s, mean, rstd, has_residual, *rest) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    a = LayerNormArgs(*rest)
    dso2 = rows(ds_out, a.n) if ds_out is not None else None
    dx, dres, dw, db = a.impl().bwd(a, rows(dy, a.n), dso2, rows(s, a.n), mean, rstd, has_residual)
    shape = _param_shape(s, a)
    return (
        dx.view(s.shape),
        dres.view(s.shape) if has_residual else dres,
        dw.view(shape) if a.weight is not None else dw,
        db.view(shape) if a.bias is not None else db,
    )


def _layer_norm_bwd_fake(_dy, _ds_out, s, _mean, _rstd, has_residual, *rest) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    a = LayerNormArgs(*rest)
    shape = _param_shape(s, a)
    wdtype = a.weight.dtype if a.weight is not None else s.dtype
    return (
        s.new_empty(s.shape),
        s.new_empty(s.shape) if has_residual else s.new_empty(0),
        s.new_empty(shape, dtype=wdtype) if a.weight is not None else s.new_empty(0),
        s.new_empty(shape, dtype=wdtype) if a.bias is not None else s.new_empty(0),
    )


def _layer_norm_fwd(x: Tensor, residual: Tensor | None, *rest) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return run_fwd(LayerNormArgs(*rest), x, residual)


_FWD_RETURNS = "(Tensor, Tensor, Tensor, Tensor)"
layer_norm_fwd = _custom.define(
    "layer_norm_fwd", "Tensor x, Tensor? residual", LayerNormArgs, _FWD_RETURNS, _layer_norm_fwd
)
layer_norm_fwd.register_fake(_layer_norm_fwd_fake)
layer_norm_bwd = _custom.define(
    "layer_norm_bwd",
    "Tensor dy, Tensor? ds_out, Tensor s, Tensor mean, Tensor rstd, bool has_residual",
    LayerNormArgs,
    "(Tensor, Tensor, Tensor, Tensor)",
    _layer_norm_bwd,
)
layer_norm_bwd.register_fake(_layer_norm_bwd_fake)


def _setup_context(ctx, inputs, output) -> None:
    (x, residual), a = _custom.split(inputs, LayerNormArgs)
    _, s, mean, rstd = output
    ctx.stored, ctx.has_residual = a.stores_s(residual), residual is not None
    _custom.save(ctx, a, s if ctx.stored else x, mean, rstd)


def _backward(ctx, dy, ds_out, _dmean, _drstd):
    (s, mean, rstd), a = _custom.load(ctx)
    ds_out = ds_out if ctx.stored else None  # else the residual-sum output was an empty placeholder
    dx, dres, dw, db = _custom.call(layer_norm_bwd, dy, ds_out, s, mean, rstd, ctx.has_residual, *a.values())
    return (
        dx,
        dres if ctx.has_residual else None,
        *a.grads(weight=dw if a.weight is not None else None, bias=db if a.bias is not None else None),
    )


_custom.register_autograd(layer_norm_fwd, _backward, _setup_context)
