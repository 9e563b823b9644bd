"""The feed-forward block in pure PyTorch: the reference math, and the backend for CPU (fp32 intermediates).

The backend's GEMMs compute in fp32 (float64 for float64) through ``addmm`` (bias fused) and round their results
to the requested dtype; d(pre) stays fp32 between the GEMMs of backward, where torch's own activation backward
kernels apply act'(pre), and h is rounded to the input dtype as the forward's was. The references compute in
the input's dtype and are differentiable (tests call them on float64 copies).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastformer.ops import dropout
from fastformer.ops.ffn.op import PLAIN, Epilogue


def act_fn(pre: Tensor, activation: str | None) -> Tensor:
    """Apply ``activation`` (None, "gelu", "gelu_tanh", "relu") elementwise."""
    if activation in (None, "none"):
        return pre
    if activation == "gelu":
        return F.gelu(pre)
    if activation == "gelu_tanh":
        return F.gelu(pre, approximate="tanh")
    if activation == "relu":
        return torch.relu(pre)
    raise ValueError(f"activation: unknown activation {activation!r}")


def _act_backward(g: Tensor, pre: Tensor, activation: str) -> Tensor:
    """``g * act'(pre)`` through torch's own fused backward kernels."""
    if activation in ("gelu", "gelu_tanh"):
        return torch.ops.aten.gelu_backward(g, pre, approximate="none" if activation == "gelu" else "tanh")
    if activation == "relu":
        return torch.where(pre > 0, g, 0.0)
    raise ValueError(f"activation: unknown activation {activation!r}")


def _act_dropout(pre: Tensor, activation: str | None, p: float, seed: Tensor | int | None) -> Tensor:
    """dropout(act(pre)) on (rows, cols), the mask of dropout rows 0 .. rows-1 with row length cols."""
    y = act_fn(pre, activation)
    return dropout.apply(y, seed, p) if p > 0 else y


def linear_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    weight_layout: str = "out_in",
    dropout_p: float = 0.0,
    seed: int | None = None,
) -> Tensor:
    """Plain differentiable torch math in ``x``'s dtype: ``dropout(act(x @ W^T + b))``; x: (..., in).

    ``weight`` is (out, in), or (in, out) with ``weight_layout="in_out"``. The dropout mask is the one every
    backend draws for ``seed`` (no dropout when it is None).
    """
    x2 = x.reshape(-1, x.shape[-1])
    pre = x2 @ (weight if weight_layout == "in_out" else weight.t())
    if bias is not None:
        pre = pre + bias
    y = _act_dropout(pre, activation, dropout_p if seed is not None else 0.0, seed)
    return y.view(*x.shape[:-1], y.shape[-1])


def feed_forward_reference(x, w1, b1, w2, b2, activation="gelu", dropout_p=0.0, seed=None, weight_layout="out_in"):
    """Plain differentiable torch math: ``dropout(act(x @ W1^T + b1)) @ W2^T + b2`` (b1, b2 may be None).

    Arguments as for :func:`linear_reference`; returns a tensor in ``x``'s dtype.
    """
    h = linear_reference(x, w1, b1, activation, weight_layout, dropout_p, seed)
    return linear_reference(h, w2, b2, None, weight_layout)


def gemm(
    a: Tensor, b: Tensor, out_dtype: torch.dtype, bias: Tensor | None = None, epi: Epilogue = PLAIN, store_pre=False
) -> tuple[Tensor, Tensor | None]:
    """(dropout(act(a @ b + bias)), a @ b + bias when store_pre else None), computed in fp32 (or float64)."""
    f = torch.promote_types(a.dtype, torch.float32)
    a32, b32 = _as(a, f), _as(b, f)
    pre = torch.addmm(_as(bias, f), a32, b32) if bias is not None else a32 @ b32
    y = _act_dropout(pre, *epi)
    return _as(y, out_dtype), _as(pre, out_dtype) if store_pre else None


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without the call when it is one already (a decode step's GEMMs are microseconds)."""
    return t if t.dtype == dtype else t.to(dtype)


def grad_pre(dy: Tensor, w_t: Tensor | None, pre: Tensor | None, epi: Epilogue, want_h: bool) -> tuple:
    """(fp32 d(pre) = (dy @ w_t or dy) * act'(pre) * keep/(1-p), h = dropout(act(pre)) in pre's dtype or None)."""
    f = torch.promote_types(dy.dtype, torch.float32)
    g = dy.to(f)
    if w_t is not None:
        g = g @ w_t.to(f)
    pre32 = pre.to(f) if pre is not None else None  # None only without an activation
    if epi.act != "none":
        g = _act_backward(g, pre32, epi.act)
    if epi.dropout_p > 0:
        g = dropout.apply(g, epi.seed, epi.dropout_p)
    return g, _act_dropout(pre32, *epi).to(pre.dtype) if want_h else None
