"""Pieces the patched ``transformers`` forwards share: fused projections and LayerNorms that step aside for
anything they cannot serve exactly, the activation table, and the original forwards.

A projection runs on :func:`fastformer.linear` only when its module is exactly ``nn.Linear`` or ``Conv1D`` with
no hooks: a PEFT/LoRA wrapper, a quantized layer or a hooked module is called as a module instead, so adapters
and hooks keep working. The parameters are always read from the model's own modules, never copied.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.activations import GELUActivation, GELUTanh, NewGELUActivation
from transformers.pytorch_utils import Conv1D

from fastformer import utils
from fastformer.ops.ffn import linear
from fastformer.ops.layer_norm import dropout_add_layer_norm, layer_norm

# transformers' activation modules and the epilogue each one computes (erf GELU; tanh GELU; ReLU)
ACTIVATIONS: dict[type, str] = {GELUActivation: "gelu", NewGELUActivation: "gelu_tanh", GELUTanh: "gelu_tanh"}
ACTIVATIONS[nn.ReLU] = "relu"

# (class, attribute) -> the function transformers defined there, recorded before any patch replaces it
PRISTINE: dict[tuple[type, str], Callable] = {}


def remember(cls: type, name: str) -> None:
    """Record ``cls.name`` as the original, once (a class patched in place keeps its first recorded function)."""
    PRISTINE.setdefault((cls, name), cls.__dict__[name])


def original(module: nn.Module, name: str) -> Callable:
    """The unpatched function ``name`` of ``module``'s class: the one its nearest patched ancestor had."""
    for cls in type(module).__mro__:
        fn = PRISTINE.get((cls, name))
        if fn is not None:
            return fn
    raise AttributeError(f"fastformer: no original {name} recorded for {type(module).__name__}")


def backend_of(module: nn.Module) -> str | None:
    """The backend ``patch(..., backend=)`` pinned on this module, else None (use_backend / env / auto)."""
    return getattr(module, "_fastformer_backend", None)


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` does more than its class's forward: hooks, or a forward set on the instance
    (as accelerate's device-placement hooks do)."""
    return bool(module._forward_hooks or module._forward_pre_hooks) or "forward" in module.__dict__


def act_name(act: Any) -> str | None:
    """The fused epilogue equal to ``act`` (a transformers activation module), or None."""
    return ACTIVATIONS.get(type(act))


def fusable(x: Tensor, weight: Tensor | None) -> bool:
    """Whether the fused ops take ``x`` with ``weight`` as torch would (same dtype, or mixed under autocast).

    float64 and other mixes go to torch, which gives the results (or raises the errors) the model always did.
    """
    if x.dtype not in utils.FLOAT_DTYPES or (weight is not None and weight.device != x.device):
        return False
    return weight is None or weight.dtype == x.dtype or utils.autocast_dtype(x) is not None


def project(mod: nn.Module, x: Tensor, act: Any = None, dropout_p: float = 0.0, backend: str | None = None) -> Tensor:
    """``dropout(act(mod(x)))``: x (..., in) -> (..., out); one fused GEMM when ``mod`` is a plain Linear/Conv1D.

    ``act`` is the model's activation module (None for none); ``dropout_p`` is 0 outside training.
    """
    name = act_name(act) if act is not None else None
    if (act is None or name is not None) and not has_hooks(mod) and type(mod) in (nn.Linear, Conv1D):
        if fusable(x, mod.weight):
            layout = "in_out" if type(mod) is Conv1D else "out_in"
            return linear(x, mod.weight, mod.bias, name, dropout_p=dropout_p, weight_layout=layout, backend=backend)
    y = mod(x)
    if act is not None:
        y = act(y)
    return F.dropout(y, dropout_p) if dropout_p > 0 else y


def plain_layer_norm(ln: nn.Module, x: Tensor) -> bool:
    """Whether ``ln`` is an ``nn.LayerNorm`` over the last dimension the fused kernel can stand in for."""
    return (
        isinstance(ln, nn.LayerNorm)
        and type(ln).forward in (nn.LayerNorm.forward, layer_norm_forward)
        and len(ln.normalized_shape) == 1
        and not has_hooks(ln)
        and fusable(x, ln.weight)
    )


def _autocast_fp32(x: Tensor) -> Tensor:
    # autocast runs LayerNorm in float32 (its fp32 op list); the custom ops are invisible to autocast
    return x.float() if utils.autocast_dtype(x) is not None else x


def add_layer_norm(
    ln: nn.Module, x: Tensor, residual: Tensor, dropout_p: float, training: bool, backend: str | None
) -> tuple[Tensor, Tensor]:
    """``s = dropout(x) + residual; (ln(s), s)`` in one kernel; x, residual: (..., N) -> two (..., N) tensors."""
    if residual.dtype != x.dtype:  # e.g. a bf16 projection (autocast) onto an fp32 residual stream
        dtype = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(dtype), residual.to(dtype)
    x, residual = _autocast_fp32(x), _autocast_fp32(residual)
    if plain_layer_norm(ln, x):
        p = dropout_p if training else 0.0
        return dropout_add_layer_norm(
            x, residual, ln.weight, ln.bias, dropout_p=p, eps=ln.eps, training=training, backend=backend
        )
    s = F.dropout(x, dropout_p, training=training) + residual
    return ln(s), s


def apply_layer_norm(ln: nn.Module, x: Tensor, backend: str | None) -> Tensor:
    """``ln(x)`` on the fused kernel when ``ln`` is a plain LayerNorm; x: (..., N) -> (..., N)."""
    x = _autocast_fp32(x) if isinstance(ln, nn.LayerNorm) else x
    if plain_layer_norm(ln, x):
        return layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps, backend=backend)
    return ln(x)


def layer_norm_forward(self: nn.LayerNorm, input: Tensor) -> Tensor:
    """``nn.LayerNorm.forward`` on the fused kernel (input (..., N) -> (..., N)); torch for what it cannot serve."""
    x = _autocast_fp32(input)
    if len(self.normalized_shape) == 1 and fusable(x, self.weight):
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, backend=backend_of(self))
    return original(self, "forward")(self, input)
