"""The feed-forward public functions and their input checks: ``linear`` and ``feed_forward``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastformer import backends, utils
from fastformer.ops import _custom, dropout
from fastformer.ops.ffn.op import ACTIVATIONS, FFNArgs, ops, run_fwd

_LAYOUTS = ("out_in", "in_out")
_DTYPES = (*utils.FLOAT_DTYPES, torch.float64)  # float64 on the torch backend only


def _why_not(backend: str, x: Tensor) -> str | None:
    """Why ``backend`` cannot serve this call, or None: the torch backend serves every float dtype."""
    if backend == "torch":
        return None
    if x.dtype == torch.float64:
        return "float64 is served by the torch backend only"
    if backend == "triton" and x.dtype == torch.bfloat16 and x.device.type == "cpu":
        return "the Triton interpreter computes bfloat16 wrongly (test bfloat16 on a GPU)"
    return None


def check_activation(activation: str | None) -> str:
    """The activation as the custom ops carry it ("none" for None); TypeError/ValueError naming it otherwise."""
    if activation is not None and not isinstance(activation, str):
        raise TypeError(f"activation must be None or a str, got {type(activation).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    return "none" if activation is None else activation


def _check_layout(weight_layout: str) -> bool:
    if weight_layout not in _LAYOUTS:
        raise ValueError(f"weight_layout must be one of {_LAYOUTS}, got {weight_layout!r}")
    return weight_layout == "in_out"


def _check_weight(w, name: str, x: Tensor, in_features: int, in_out: bool, x_name: str = "x.shape[-1]") -> int:
    """Checks a weight against ``x`` (dtype, device) and ``in_features``; returns its out_features."""
    utils.check_float(w, name, _DTYPES)
    utils.check_like(w, name, x, "x")
    if w.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(w.shape)}")
    w_in, w_out = (w.shape[0], w.shape[1]) if in_out else (w.shape[1], w.shape[0])
    if w_in != in_features:
        layout = "(in_features, out_features)" if in_out else "(out_features, in_features)"
        raise ValueError(
            f"{name} has in_features {w_in} (shape {tuple(w.shape)} read as {layout}) but {x_name} is "
            f"{in_features}; in_features mismatch"
        )
    return w_out


def _check_bias(b, name: str, x: Tensor, out_features: int) -> None:
    if b is None:
        return
    utils.check_float(b, name, _DTYPES)
    utils.check_like(b, name, x, "x")
    if b.dim() != 1 or b.shape[0] != out_features:
        raise ValueError(f"{name} must have shape ({out_features},), got {tuple(b.shape)}")


def _run(op: str, names: tuple[str, str], settings: tuple, x: Tensor, *layers: Tensor | None) -> Tensor:
    """Checks, backend choice and the custom op for one layer (w1, b1) or two (w1, b1, w2, b2).

    ``names`` names the first layer's tensors in error messages; ``settings`` is
    (activation, dropout_p, weight_layout, recompute, backend).
    """
    activation, dropout_p, weight_layout, recompute, backend = settings
    x, *layers = utils.autocast_args(x, *layers)
    utils.check_float(x, "x", _DTYPES)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., in_features)")
    in_out = _check_layout(weight_layout)
    act = check_activation(activation)
    p = dropout.check_p(dropout_p, "dropout_p")
    two_layers = len(layers) == 4  # feed_forward: w2 is required (None is a TypeError naming it, not a linear)
    w1, b1, w2, b2 = (*layers, None, None)[:4]
    d_ff = _check_weight(w1, names[0], x, x.shape[-1], in_out)
    _check_bias(b1, names[1], x, d_ff)
    d_out = d_ff
    if two_layers:
        d_out = _check_weight(w2, "w2", x, d_ff, in_out, x_name="w1's out_features (d_ff)")
        _check_bias(b2, "b2", x, d_out)
    x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # (M, K); -1 cannot be inferred when K = 0
    name = backends.select(op, x.device, backend, lambda b: _why_not(b, x))
    # nothing to compute on empty problems: the reference handles every degenerate shape
    if x2.numel() == 0 or d_ff == 0 or d_out == 0:
        name = "torch"
    # the kernels read a bias with unit stride (a no-op for the usual contiguous parameter)
    b1, b2 = (b.contiguous() if b is not None else None for b in (b1, b2))
    a = FFNArgs(w1, b1, w2, b2, act, in_out, p, dropout.new_seed(p), name)
    out, _ = _custom.invoke(ops(a)[0], run_fwd, a, x2, a.needs_pre and not recompute)
    return out.view(*x.shape[:-1], d_out)


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    *,
    dropout_p: float = 0.0,
    weight_layout: str = "out_in",
    recompute: bool = False,
    backend: str | None = None,
) -> Tensor:
    """``dropout(act(x @ W^T + b))`` with the bias, activation and dropout fused into the GEMM.

    Args:
        x: (..., in_features).
        weight: (out_features, in_features) (``nn.Linear``), or (in_features, out_features) with
            ``weight_layout="in_out"`` (GPT-2 ``Conv1D``), read through strides without a copy.
        bias: (out_features,) or None.
        activation: None, "gelu" (erf), "gelu_tanh" (GPT-2 gelu_new) or "relu".
        dropout_p: dropout after the activation, in [0, 1) (pass 0 in eval mode); element (row, col) of the
            (rows, out_features) output uses the shared Philox mask of that matrix (fastformer/ops/dropout.py).
        recompute: do not keep the pre-activation for backward; recompute it there with one GEMM.
        backend: "triton", "cuda", "torch" or "auto" (default: see :mod:`fastformer.backends`).

    Returns:
        (..., out_features) in ``x``'s dtype (autocast's dtype when autocast is on, as for ``F.linear``).
    """
    settings = (activation, dropout_p, weight_layout, recompute, backend)
    return _run("linear", ("weight", "bias"), settings, x, weight, bias)


def feed_forward(
    x: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    activation: str | None = "gelu",
    dropout_p: float = 0.0,
    *,
    recompute: bool = False,
    weight_layout: str = "out_in",
    backend: str | None = None,
) -> Tensor:
    """The Transformer feed-forward block ``dropout(act(x @ W1^T + b1)) @ W2^T + b2``.

    ``x``: (..., d_model); ``w1``: (d_ff, d_model), ``b1``: (d_ff,) or None; ``w2``: (d_out, d_ff), required (for one
    layer use :func:`linear`), ``b2``: (d_out,) or None (``nn.Linear`` layout; with ``weight_layout="in_out"`` the
    transposes, as GPT-2 ``Conv1D``).
    ``dropout_p`` drops the hidden activation (pass 0 in eval mode); ``recompute=True`` keeps only ``x`` for
    backward and recomputes the (..., d_ff) pre-activation there. ``activation`` and ``backend`` are as for
    :func:`linear`. Returns (..., d_out) in ``x``'s dtype.
    """
    settings = (activation, dropout_p, weight_layout, recompute, backend)
    return _run("feed_forward", ("w1", "b1"), settings, x, w1, b1, w2, b2)
