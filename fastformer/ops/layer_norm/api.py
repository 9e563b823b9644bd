"""LayerNorm's public functions and their input checks: ``layer_norm`` and ``dropout_add_layer_norm``."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from fastformer import backends, utils
from fastformer.ops import _custom, dropout
from fastformer.ops.layer_norm.op import LayerNormArgs, layer_norm_fwd, run_fwd

MAX_TRITON_N = 65536  # a row must fit in one Triton block (kernels/layer_norm.py)


def _check_normalized_shape(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    """``normalized_shape`` as a tuple of ints: an int or a list/tuple (``torch.Size``) of ints, as ``F.layer_norm``
    takes it; TypeError naming it for anything else (a float, None, a str, a bool, a sequence of non-ints)."""
    dims = normalized_shape if isinstance(normalized_shape, (list, tuple)) else (normalized_shape,)
    try:
        if any(isinstance(d, bool) for d in dims):
            raise TypeError
        return tuple(operator.index(d) for d in dims)  # ints (numpy's too), not floats or strs
    except TypeError:
        got = type(normalized_shape).__name__
        if dims is normalized_shape:
            got += f" of {', '.join(sorted({type(d).__name__ for d in dims}))}"
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got {got}") from None


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
    shape = _check_normalized_shape(normalized_shape)
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"normalized_shape must be non-empty with positive sizes, got {shape}")
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
    if not 0.0 <= eps < math.inf:  # (no math.isinf: eps may be a SymFloat under torch.compile(dynamic=True))
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
    # the kernels read weight and bias as flat unit-stride vectors (a no-op for the usual contiguous parameters)
    weight, bias = (t.contiguous() if t is not None else None for t in (weight, bias))
    a = LayerNormArgs(weight, bias, n, float(eps), p, dropout.new_seed(p), name)
    return _custom.invoke(layer_norm_fwd, run_fwd, a, x, residual)


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
    dropout_p: float = 0.0,
    eps: float = 1e-5,
    training: bool = True,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """``s = dropout(x, dropout_p) + residual; out = LayerNorm(s)`` over the last dimension, in one kernel.

    x, residual: (..., N); weight, bias: (N,) or None. Returns ``(out, s)``: pre-LN blocks carry ``s``
    forward as the residual stream, post-LN blocks use ``out``. Dropout (only when ``training``) is drawn
    in-kernel from a seed; backward regenerates the mask instead of storing it.
    """
    utils.check_float(x, "x", (*utils.FLOAT_DTYPES, torch.float64))
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension")
    p = dropout.check_p(dropout_p)
    shape = _validate(x, (x.shape[-1],), weight, bias, eps, residual)
    y, s, _, _ = _run(x, residual, weight, bias, shape, eps, p, backend, training)
    if residual is None and not (training and p > 0):
        return y, x
    return y, s
