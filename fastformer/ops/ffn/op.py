"""The feed-forward custom ops: argument object, the algorithm every backend runs, custom ops and autograd.

A ``linear`` is a feed-forward block without a second layer: :class:`FFNArgs` carries the first layer, an
optional second one (``w2`` None for a linear) and the epilogue settings. The forward and backward below are
written once over each backend's two primitives (``gemm`` and ``grad_pre``, see the package docstring); the
custom ops ``fastformer::linear_fwd`` / ``linear_bwd`` (no second layer) and ``ffn_fwd`` / ``ffn_bwd`` are the
same functions registered under two names, so profiles and graphs still tell the two apart.

Inputs are 2-D: x (M, K). The forward returns ``(out, pre)`` with the first layer's pre-activation ``pre``
(M, d_ff) when it is saved for backward, else an empty placeholder; backward recomputes it when absent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from fastformer.ops import _custom

ACTIVATIONS: tuple[str | None, ...] = (None, "gelu", "gelu_tanh", "relu")
# activation name as carried through the custom-op schema (a str, so None becomes "none") -> kernel code
ACT_CODE = {"none": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}


class Epilogue(NamedTuple):
    """What a GEMM applies after ``+ bias`` (forward), or whose derivative it applies (backward)."""

    act: str = "none"  # a key of ACT_CODE
    dropout_p: float = 0.0
    seed: Tensor | None = None  # Philox seed when dropout_p > 0; the mask of the (M, N) output's (row, col)


PLAIN = Epilogue()  # a plain GEMM (bias only)


@dataclass(frozen=True)
class FFNArgs(_custom.OpArgs):
    """What the forward and backward custom ops share (x and the gradients come in front of these)."""

    OP = "ffn"

    w1: Tensor  # first layer: (out, in), or (in, out) when in_out
    b1: Tensor | None  # (out,) or None
    w2: Tensor | None  # second layer, in the same layout; None for a single linear
    b2: Tensor | None
    activation: str  # after the first layer: "none", "gelu", "gelu_tanh" or "relu"
    in_out: bool  # weights stored (in, out) as GPT-2 Conv1D, else (out, in) as nn.Linear
    dropout_p: float  # dropout after the activation: the Philox mask of the (tokens, d_ff) matrix
    seed: Tensor | None  # Philox seed (CPU int64 scalar) when dropout_p > 0
    backend: str

    def kn(self, w: Tensor) -> Tensor:
        """A weight as a (in, out) view: no copy in either layout."""
        return w if self.in_out else w.t()

    def out_features(self, w: Tensor) -> int:
        return w.shape[1] if self.in_out else w.shape[0]

    @property
    def epilogue(self) -> Epilogue:
        """The first layer's activation and dropout."""
        return Epilogue(self.activation, self.dropout_p, self.seed)

    @property
    def needs_pre(self) -> bool:
        """Whether backward reads the pre-activation: for act'(pre), or for h = dropout(act(pre)) of a second layer."""
        return self.w2 is not None or self.activation != "none"

    @property
    def has_epilogue(self) -> bool:
        """Whether the gradient reaching the first layer's output differs from d(pre)."""
        return self.activation != "none" or self.dropout_p > 0


def forward(a: FFNArgs, x: Tensor, save_pre: bool) -> tuple[Tensor, Tensor | None]:
    """(out, pre or None): the first GEMM with bias, activation and dropout fused, then the second layer."""
    impl = a.impl()
    h, pre = impl.gemm(x, a.kn(a.w1), x.dtype, a.b1, a.epilogue, save_pre)
    if a.w2 is None:
        return h, pre
    return impl.gemm(h, a.kn(a.w2), x.dtype, a.b2)[0], pre


def _weight_grad(impl, a: FFNArgs, inp: Tensor, g: Tensor, w: Tensor) -> Tensor:
    """d(w) for the layer ``out = inp @ kn(w)`` receiving gradient ``g``, in ``w``'s layout."""
    return (impl.gemm(inp.t(), g, w.dtype) if a.in_out else impl.gemm(g.t(), inp, w.dtype))[0]


def _bias_grad(g: Tensor, b: Tensor | None, x: Tensor) -> Tensor:
    """fp32-accumulated column sums; custom-op outputs may not be None: an empty for an absent bias."""
    return g.sum(0, dtype=torch.float32).to(x.dtype) if b is not None else x.new_empty(0)


def backward(a: FFNArgs, dy: Tensor, x: Tensor, pre: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dw1, db1, dw2, db2); the second layer's are empty without one."""
    impl = a.impl()
    w1 = a.kn(a.w1)
    if not a.needs_pre:
        pre = None
    elif pre.numel() == 0:  # recompute=True: one extra GEMM, rounded to x's dtype as a saved one is
        pre = impl.gemm(x, w1, x.dtype, a.b1)[0]
    if a.w2 is None:
        g = impl.grad_pre(dy, None, pre, a.epilogue, False)[0] if a.has_epilogue else dy
        second = (x.new_empty(0), x.new_empty(0))
    else:
        # d(pre) from dh = dy @ W2 (act' and the mask fused where the backend can), with h rebuilt alongside
        g, h = impl.grad_pre(dy, a.kn(a.w2).t(), pre, a.epilogue, True)
        second = (_weight_grad(impl, a, h, dy, a.w2), _bias_grad(dy, a.b2, x))
    dx = impl.gemm(g, w1.t(), x.dtype)[0]
    return dx, _weight_grad(impl, a, x, g, a.w1), _bias_grad(g, a.b1, x), *second


def run_fwd(a: FFNArgs, x: Tensor, save_pre: bool) -> tuple[Tensor, Tensor]:
    """(out, pre or an empty placeholder): the forward custom ops' body, also called directly in plain inference."""
    out, pre = forward(a, x, save_pre)
    return out, pre if pre is not None else x.new_empty(0)


def _ffn_fwd(x: Tensor, save_pre: bool, *rest) -> tuple[Tensor, Tensor]:
    return run_fwd(FFNArgs(*rest), x, save_pre)


def _ffn_fwd_fake(x: Tensor, save_pre: bool, *rest) -> tuple[Tensor, Tensor]:
    a = FFNArgs(*rest)
    d_ff = a.out_features(a.w1)
    d_out = d_ff if a.w2 is None else a.out_features(a.w2)
    return x.new_empty((x.shape[0], d_out)), x.new_empty((x.shape[0], d_ff) if save_pre else (0,))


def _ffn_bwd(dy: Tensor, x: Tensor, pre: Tensor, *rest) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return backward(FFNArgs(*rest), dy, x, pre)


def _ffn_bwd_fake(_dy: Tensor, x: Tensor, _pre: Tensor, *rest) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    a = FFNArgs(*rest)
    like = [t.new_empty(t.shape) if t is not None else x.new_empty(0) for t in (a.w1, a.b1, a.w2, a.b2)]
    return x.new_empty(x.shape), *like


def _setup_context(ctx, inputs, output) -> None:
    (x, _save_pre), a = _custom.split(inputs, FFNArgs)
    _custom.save(ctx, a, x, output[1])


def _backward(ctx, dy, _dpre):
    (x, pre), a = _custom.load(ctx)
    dx, dw1, db1, dw2, db2 = _custom.call(ops(a)[1], dy, x, pre, *a.values())
    grads = {"w1": dw1, "b1": db1, "w2": dw2, "b2": db2}
    return dx, None, *a.grads(**{k: g for k, g in grads.items() if getattr(a, k) is not None})


def _register(stem: str) -> tuple[torch.library.CustomOpDef, torch.library.CustomOpDef]:
    fwd = _custom.define(f"{stem}_fwd", "Tensor x, bool save_pre", FFNArgs, "(Tensor, Tensor)", _ffn_fwd)
    fwd.register_fake(_ffn_fwd_fake)
    returns = "(Tensor, Tensor, Tensor, Tensor, Tensor)"
    bwd = _custom.define(f"{stem}_bwd", "Tensor dy, Tensor x, Tensor pre", FFNArgs, returns, _ffn_bwd)
    bwd.register_fake(_ffn_bwd_fake)
    _custom.register_autograd(fwd, _backward, _setup_context)
    return fwd, bwd


_OPS = {stem: _register(stem) for stem in ("linear", "ffn")}


def ops(a: FFNArgs) -> tuple[torch.library.CustomOpDef, torch.library.CustomOpDef]:
    """(forward, backward) custom ops of a call: ``linear_*`` without a second layer, else ``ffn_*``."""
    return _OPS["linear" if a.w2 is None else "ffn"]
