"""LayerNorm in pure PyTorch: the reference math, and the backend for CPU and for every dtype torch serves.

fp32 rows go through torch's own fused kernels (``native_layer_norm`` and its backward), which also give
fp32 statistics; other dtypes compute in fp32 (float64 for float64) with explicit formulas.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastformer.ops import dropout
from fastformer.ops.layer_norm.op import LayerNormArgs


def layer_norm_reference(
    s: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd) of LayerNorm over the last dimension of (M, N) rows, computed in ``s``'s dtype."""
    mean = s.mean(dim=1)
    d = s - mean[:, None]
    rstd = torch.rsqrt((d * d).mean(dim=1) + eps)
    y = d * rstd[:, None]
    if weight is not None:
        y = y * weight.to(s.dtype)
    if bias is not None:
        y = y + bias.to(s.dtype)
    return y, mean, rstd


def fwd(a: LayerNormArgs, x2: Tensor, r2: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    compute = torch.promote_types(x2.dtype, torch.float32)
    m, n = x2.shape
    s = x2.to(compute)
    if a.dropout_p > 0:
        s = dropout.apply(s, a.seed, a.dropout_p)
    if r2 is not None:
        s = s + r2.to(compute)
    s_out = x2.new_empty(0)
    if a.stores_s(r2):
        # normalise the rounded sum: it is what backward reloads
        s_out = s.to(x2.dtype)
        s = s_out.to(compute)
    w, b = a.w, a.b
    if s.dtype == torch.float32:
        # torch's own fused kernel (fp32 statistics for fp32 input on every device): the fast CPU path
        w32 = w.float() if w is not None else None
        b32 = b.float() if b is not None else None
        y, mean, rstd = torch.native_layer_norm(s, (n,), w32, b32, a.eps)
        return y.to(x2.dtype), s_out, mean.view(m), rstd.view(m)
    y, mean, rstd = layer_norm_reference(s, w, b, a.eps)
    return y.to(x2.dtype), s_out, mean.float(), rstd.float()


def bwd(
    a: LayerNormArgs, dy2: Tensor, dso2: Tensor | None, s2: Tensor, mean: Tensor, rstd: Tensor, has_res: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    compute = torch.promote_types(s2.dtype, torch.float32)
    m, n = s2.shape
    dy = dy2.to(compute)
    w = a.w
    if s2.dtype == torch.float32:
        w32 = w.float() if w is not None else None
        b32 = a.b.float() if a.b is not None else None
        ds, dw, db = torch.ops.aten.native_layer_norm_backward(
            dy, s2, (n,), mean.view(m, 1), rstd.view(m, 1), w32, b32, [True, w is not None, b32 is not None]
        )
    else:
        xhat = (s2.to(compute) - mean.to(compute)[:, None]) * rstd.to(compute)[:, None]
        g = dy * w.to(compute) if w is not None else dy
        mean_gx, mean_g = (xhat * g).mean(dim=1, keepdim=True), g.mean(dim=1, keepdim=True)
        ds = (g - (xhat * mean_gx + mean_g)) * rstd.to(compute)[:, None]
        dw = (dy * xhat).sum(0) if w is not None else None
        db = dy.sum(0) if a.bias is not None else None
    if dso2 is not None:
        ds = ds + dso2.to(compute)
    dx = dropout.apply(ds, a.seed, a.dropout_p) if a.dropout_p > 0 else ds
    # dresidual is ds: a fresh tensor, copied only where dx is ds too (outputs of a custom op must not alias)
    dres = (ds.to(s2.dtype, copy=dx is ds)) if has_res else s2.new_empty(0)
    dw = dw.to(w.dtype) if w is not None else s2.new_empty(0)
    db = db.to(w.dtype if w is not None else s2.dtype) if a.bias is not None else s2.new_empty(0)
    return dx.to(s2.dtype), dres, dw, db
