"""LayerNorm, optionally fused with dropout and a residual add: validation, custom ops, launchers.

Three layers, as for every op in fastformer:

1. ``layer_norm`` / ``dropout_add_layer_norm``: validate, pick the backend, draw the dropout seed.
2. ``torch.ops.fastformer.layer_norm_fwd`` / ``layer_norm_bwd``: custom ops with fake kernels and
   autograd, so ``torch.compile(fullgraph=True)`` traces callers without a graph break.
3. ``_FWD[backend]`` / ``_BWD[backend]``: Triton (kernels/layer_norm.py), CUDA C++ (csrc/layer_norm.cu)
   and the pure-torch reference.

Inputs are viewed as (M, N) rows with N = prod(normalized_shape). Statistics are fp32 in every backend.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fastformer import backends, utils
from fastformer.ops._dropout import keep_mask, threshold24

MAX_TRITON_N = 65536  # a row must fit in one Triton block


def _rows(t: Tensor, n: int) -> Tensor:
    """(M, n) view of ``t`` with unit column stride; copies only when no such view exists."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


def _row_stride(t2: Tensor) -> int:
    return t2.stride(0) if t2.shape[0] > 1 else t2.shape[1]


# ---------------------------------------------------------------------------------------------------------------------
# backends: each forward returns (y, s, mean, rstd) for 2-D rows; s is an empty tensor when s == x
# ---------------------------------------------------------------------------------------------------------------------


def _torch_fwd(x2, r2, w, b, eps, p, seed):
    compute = torch.promote_types(x2.dtype, torch.float32)
    m, n = x2.shape
    s = x2.to(compute)
    if p > 0:
        keep = keep_mask(int(seed), torch.arange(m * n, device=x2.device).view(m, n), p)
        s = torch.where(keep, s * (1.0 / (1.0 - p)), 0.0)
    if r2 is not None:
        s = s + r2.to(compute)
    s_out = x2.new_empty(0)
    if r2 is not None or p > 0:
        s_out = s.to(x2.dtype)
        s = s_out.to(compute)
    if s.dtype == torch.float32:
        # torch's own fused kernel (fp32 statistics for fp32 input on every device): the fast CPU path
        w32 = w.float() if w is not None else None
        b32 = b.float() if b is not None else None
        y, mean, rstd = torch.native_layer_norm(s, (n,), w32, b32, eps)
        return y.to(x2.dtype), s_out, mean.view(m), rstd.view(m)
    mean = s.mean(dim=1)
    d = s - mean[:, None]
    rstd = torch.rsqrt((d * d).mean(dim=1) + eps)
    y = d * rstd[:, None]
    if w is not None:
        y = y * w.to(compute)
    if b is not None:
        y = y + b.to(compute)
    return y.to(x2.dtype), s_out, mean.float(), rstd.float()


def _torch_bwd(dy2, dso2, s2, w, mean, rstd, p, seed, has_res, has_b):
    compute = torch.promote_types(s2.dtype, torch.float32)
    m, n = s2.shape
    dy = dy2.to(compute)
    if s2.dtype == torch.float32:
        w32 = w.float() if w is not None else None
        ds, dw, _ = torch.ops.aten.native_layer_norm_backward(
            dy, s2, (n,), mean.view(m, 1), rstd.view(m, 1), w32, None, [True, w is not None, False]
        )
    else:
        xhat = (s2.to(compute) - mean.to(compute)[:, None]) * rstd.to(compute)[:, None]
        g = dy * w.to(compute) if w is not None else dy
        mean_gx, mean_g = (xhat * g).mean(dim=1, keepdim=True), g.mean(dim=1, keepdim=True)
        ds = (g - (xhat * mean_gx + mean_g)) * rstd.to(compute)[:, None]
        dw = (dy * xhat).sum(0) if w is not None else None
    if dso2 is not None:
        ds = ds + dso2.to(compute)
    dx = ds
    if p > 0:
        keep = keep_mask(int(seed), torch.arange(m * n, device=s2.device).view(m, n), p)
        dx = torch.where(keep, ds * (1.0 / (1.0 - p)), 0.0)
    dres = ds.to(s2.dtype, copy=True) if has_res else s2.new_empty(0)  # must not alias dx
    dw = dw.to(w.dtype) if w is not None else s2.new_empty(0)
    db = dy.sum(0).to(w.dtype if w is not None else s2.dtype) if has_b else s2.new_empty(0)
    return dx.to(s2.dtype), dres, dw, db


def _dropout_args(p: float, seed: Tensor | None) -> tuple[int, int, float]:
    return (int(seed), threshold24(p), 1.0 / (1.0 - p)) if p > 0 else (0, 0, 1.0)


def _triton_fwd(x2, r2, w, b, eps, p, seed):
    from fastformer.kernels.layer_norm import layer_norm_fwd_kernel

    m, n = x2.shape
    store_s = r2 is not None or p > 0
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    s_out = torch.empty((m, n) if store_s else (0,), dtype=x2.dtype, device=x2.device)
    mean = torch.empty(m, dtype=torch.float32, device=x2.device)
    rstd = torch.empty_like(mean)
    block_m, block_n, warps = utils.row_settings(n, x2.element_size())
    seed_i, thresh, keep_scale = _dropout_args(p, seed)
    layer_norm_fwd_kernel[(utils.cdiv(m, block_m),)](
        x2, r2, w, b, y, s_out, mean, rstd,
        _row_stride(x2), _row_stride(r2) if r2 is not None else 0, m, n, eps, seed_i, thresh, keep_scale,
        HAS_RESIDUAL=r2 is not None, HAS_WEIGHT=w is not None, HAS_BIAS=b is not None,
        HAS_DROPOUT=p > 0, STORE_S=store_s, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )  # fmt: skip
    return y, s_out, mean, rstd


def _partials(m: int, block_m: int, n: int, device: torch.device) -> int:
    """Programs in the persistent backward grid: enough to fill the GPU, never more than row blocks."""
    return max(1, min(utils.cdiv(m, block_m), 4 * utils.sm_count(device)))


def _triton_bwd(dy2, dso2, s2, w, mean, rstd, p, seed, has_res, has_b):
    from fastformer.kernels.layer_norm import layer_norm_bwd_kernel

    m, n = s2.shape
    dev = s2.device
    block_m, block_n, warps = utils.row_settings(n, s2.element_size())
    grid = _partials(m, block_m, n, dev)
    dx = torch.empty((m, n), dtype=s2.dtype, device=dev)
    dres = torch.empty((m, n) if has_res else (0,), dtype=s2.dtype, device=dev)
    dw_part = torch.empty((grid, n), dtype=torch.float32, device=dev) if w is not None else None
    db_part = torch.empty((grid, n), dtype=torch.float32, device=dev) if has_b else None
    seed_i, thresh, keep_scale = _dropout_args(p, seed)
    layer_norm_bwd_kernel[(grid,)](
        dy2, dso2, s2, w, mean, rstd, dx, dres if has_res else None, dw_part, db_part,
        _row_stride(dy2), _row_stride(dso2) if dso2 is not None else 0, _row_stride(s2),
        m, n, grid, seed_i, thresh, keep_scale,
        HAS_DS_OUT=dso2 is not None, HAS_DRES=has_res, HAS_WEIGHT=w is not None, HAS_DROPOUT=p > 0,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )  # fmt: skip
    return dx, dres, *_reduce_partials(dw_part, db_part, w, s2)


def _reduce_partials(dw_part, db_part, w, s2):
    # custom-op outputs may not alias each other: a fresh empty tensor for each absent gradient
    wdtype = w.dtype if w is not None else s2.dtype
    dw = dw_part.sum(0).to(wdtype) if dw_part is not None else s2.new_empty(0)
    db = db_part.sum(0).to(wdtype) if db_part is not None else s2.new_empty(0)
    return dw, db


def _ptr(t: Tensor | None) -> int:
    return t.data_ptr() if t is not None else 0


def _cuda_fwd(x2, r2, w, b, eps, p, seed):
    from fastformer import _ext

    m, n = x2.shape
    store_s = r2 is not None or p > 0
    # the kernel reads weight and bias in x's dtype: cast the two short vectors, never the activations
    w = w.to(x2.dtype) if w is not None else None
    b = b.to(x2.dtype) if b is not None else None
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    s_out = torch.empty((m, n) if store_s else (0,), dtype=x2.dtype, device=x2.device)
    mean = torch.empty(m, dtype=torch.float32, device=x2.device)
    rstd = torch.empty_like(mean)
    seed_i, thresh, _ = _dropout_args(p, seed)
    _ext.load().layer_norm_fwd(
        x2.data_ptr(), _ptr(r2), _ptr(w), _ptr(b), y.data_ptr(), s_out.data_ptr() if store_s else 0,
        mean.data_ptr(), rstd.data_ptr(), m, n, _row_stride(x2), _row_stride(r2) if r2 is not None else 0,
        eps, seed_i, p, thresh, utils.DTYPE_CODE[x2.dtype], utils.stream_handle(x2.device),
    )  # fmt: skip
    return y, s_out, mean, rstd


def _cuda_bwd(dy2, dso2, s2, w, mean, rstd, p, seed, has_res, has_b):
    from fastformer import _ext

    m, n = s2.shape
    dev = s2.device
    # the kernel indexes rows densely
    dy2, s2 = dy2.contiguous(), s2.contiguous()
    dso2 = dso2.contiguous() if dso2 is not None else None
    wc = w.to(s2.dtype) if w is not None else None
    grid = _partials(m, 1, n, dev)
    dx = torch.empty((m, n), dtype=s2.dtype, device=dev)
    dres = torch.empty((m, n) if has_res else (0,), dtype=s2.dtype, device=dev)
    dw_part = torch.zeros((grid, n), dtype=torch.float32, device=dev) if w is not None else None
    db_part = torch.zeros((grid, n), dtype=torch.float32, device=dev) if has_b else None
    seed_i, thresh, _ = _dropout_args(p, seed)
    _ext.load().layer_norm_bwd(
        dy2.data_ptr(), _ptr(dso2), s2.data_ptr(), _ptr(wc), mean.data_ptr(), rstd.data_ptr(), dx.data_ptr(),
        dres.data_ptr() if has_res else 0, _ptr(dw_part), _ptr(db_part), m, n, grid, seed_i, p, thresh,
        utils.DTYPE_CODE[s2.dtype], utils.stream_handle(dev),
    )  # fmt: skip
    return dx, dres, *_reduce_partials(dw_part, db_part, w, s2)


_FWD = {"triton": _triton_fwd, "cuda": _cuda_fwd, "torch": _torch_fwd}
_BWD = {"triton": _triton_bwd, "cuda": _cuda_bwd, "torch": _torch_bwd}


# ---------------------------------------------------------------------------------------------------------------------
# custom ops
# ---------------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastformer::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    n: int,
    eps: float,
    p: float,
    seed: Tensor | None,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x2 = _rows(x, n)
    r2 = _rows(residual, n) if residual is not None else None
    w = weight.reshape(-1) if weight is not None else None
    b = bias.reshape(-1) if bias is not None else None
    y, s, mean, rstd = _FWD[backend](x2, r2, w, b, eps, p, seed)
    stored = residual is not None or p > 0  # else s is an empty placeholder, as in the fake below
    return y.view(x.shape), s.view(x.shape) if stored else s, mean, rstd


@_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, n, eps, p, seed, backend):
    m = x.numel() // n
    s = x.new_empty(x.shape) if residual is not None or p > 0 else x.new_empty(0)
    return x.new_empty(x.shape), s, x.new_empty(m, dtype=torch.float32), x.new_empty(m, dtype=torch.float32)


@torch.library.custom_op("fastformer::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(
    dy: Tensor,
    ds_out: Tensor | None,
    s: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    n: int,
    p: float,
    seed: Tensor | None,
    has_residual: bool,
    has_bias: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    w = weight.reshape(-1) if weight is not None else None
    dso2 = _rows(ds_out, n) if ds_out is not None else None
    dx, dres, dw, db = _BWD[backend](_rows(dy, n), dso2, _rows(s, n), w, mean, rstd, p, seed, has_residual, has_bias)
    wshape = weight.shape if weight is not None else s.shape[s.dim() - _trailing(s, n) :]
    return (
        dx.view(s.shape),
        dres.view(s.shape) if has_residual else dres,
        dw.view(wshape) if weight is not None else dw,
        db.view(wshape) if has_bias else db,
    )


def _trailing(t: Tensor, n: int) -> int:
    """How many trailing dimensions of ``t`` multiply to ``n`` (the normalized dimensions)."""
    k, prod = 0, 1
    while prod < n and k < t.dim():
        k += 1
        prod *= t.shape[-k]
    return max(k, 1)


@_layer_norm_bwd.register_fake
def _(dy, ds_out, s, weight, mean, rstd, n, p, seed, has_residual, has_bias, backend):
    wdtype = weight.dtype if weight is not None else s.dtype
    wshape = weight.shape if weight is not None else s.shape[s.dim() - _trailing(s, n) :]
    return (
        s.new_empty(s.shape),
        s.new_empty(s.shape) if has_residual else s.new_empty(0),
        s.new_empty(wshape, dtype=wdtype) if weight is not None else s.new_empty(0),
        s.new_empty(wshape, dtype=wdtype) if has_bias else s.new_empty(0),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, residual, weight, bias, n, eps, p, seed, backend = inputs
    _, s, mean, rstd = output
    stored = residual is not None or p > 0
    ctx.save_for_backward(s if stored else x, weight, mean, rstd, seed)
    ctx.n, ctx.p, ctx.backend = n, p, backend
    ctx.has_residual, ctx.has_bias, ctx.stored = residual is not None, bias is not None, stored


def _backward(ctx, dy, ds_out, _dmean, _drstd):
    s, weight, mean, rstd, seed = ctx.saved_tensors
    if not ctx.stored:  # the residual-sum output was an empty placeholder
        ds_out = None
    dx, dres, dw, db = _layer_norm_bwd(
        dy, ds_out, s, weight, mean, rstd, ctx.n, ctx.p, seed, ctx.has_residual, ctx.has_bias, ctx.backend
    )
    return (
        dx,
        dres if ctx.has_residual else None,
        dw if weight is not None else None,
        db if ctx.has_bias else None,
        None,
        None,
        None,
        None,
        None,
    )


_layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------------------------------


def _validate(
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    residual: Tensor | None = None,
) -> tuple[int, ...]:
    allowed = (*utils.FLOAT_DTYPES, torch.float64)
    utils.check_float(x, "input", allowed)
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    shape = tuple(int(d) for d in normalized_shape)
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"normalized_shape must be non-empty with positive sizes, got {tuple(normalized_shape)}")
    if x.dim() < len(shape) or tuple(x.shape[-len(shape) :]) != shape:
        raise ValueError(f"normalized_shape {shape} does not match the trailing dimensions of input {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        utils.check_float(t, name, allowed)
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (normalized_shape), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but input is on {x.device}")
    if residual is not None:
        utils.check_like(residual, "residual", x, "x")
        if residual.shape != x.shape:
            raise ValueError(f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not eps >= 0 or math.isinf(eps):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    return shape


def _why_not(x: Tensor, n: int, name: str) -> str | None:
    if x.dtype == torch.float64 and name != "torch":
        return "float64 is served by the torch backend only"
    if name == "triton":
        if x.dtype == torch.bfloat16 and x.device.type == "cpu":
            return "the Triton interpreter computes bfloat16 wrongly"
        if n > MAX_TRITON_N:
            return f"rows longer than {MAX_TRITON_N} do not fit one Triton block (use cuda or torch)"
    return None


def _run(x, residual, weight, bias, shape, eps, p, backend, training):
    n = math.prod(shape)
    p = p if training else 0.0
    name = backends.select("layer_norm", x.device, backend, lambda b: _why_not(x, n, b))
    return _layer_norm_fwd(x, residual, weight, bias, n, float(eps), p, utils.dropout_seed(p), name)


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> Tensor:
    """LayerNorm over the trailing ``normalized_shape`` dimensions; the contract of ``F.layer_norm``.

    input: (..., *normalized_shape); weight, bias: normalized_shape or None. Returns input's shape and dtype.
    Weight and bias may be in a wider dtype than input (as under autocast); the output keeps input's dtype.
    """
    shape = _validate(input, normalized_shape, weight, bias, eps)
    return _run(input, None, weight, bias, shape, eps, 0.0, backend, False)[0]


def dropout_add_layer_norm(
    x: Tensor,
    residual: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    p: float = 0.0,
    eps: float = 1e-5,
    training: bool = True,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """``s = dropout(x, p) + residual; out = LayerNorm(s)`` over the last dimension, in one kernel.

    x, residual: (..., N); weight, bias: (N,) or None. Returns ``(out, s)``: pre-LN blocks carry ``s``
    forward as the residual stream, post-LN blocks use ``out``. Dropout (only when ``training``) is drawn
    in-kernel from a seed; backward regenerates the mask instead of storing it.
    """
    utils.check_float(x, "x", (*utils.FLOAT_DTYPES, torch.float64))
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension")
    p = utils.check_dropout_p(p, "p")
    shape = _validate(x, (x.shape[-1],), weight, bias, eps, residual)
    y, s, _, _ = _run(x, residual, weight, bias, shape, eps, p, backend, training)
    if residual is None and not (training and p > 0):
        return y, x
    return y, s
