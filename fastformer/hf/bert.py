"""Fused forwards for ``transformers``' BERT modules, and RoBERTa's (its modeling file repeats BERT's modules).

BERT is post-LN: ``h = LN(x + dropout(dense(attn(x)))); out = LN(h + dropout(W2 act(W1 h)))``. Patched, each
``*SelfOutput`` / ``*Output`` runs its dense layer as a fused GEMM and dropout + residual add + LayerNorm as one
kernel, and a layer's feed-forward runs as one fused feed-forward (bias + GELU epilogue).

The encoder runs a padded batch unpadded: with ``attn_implementation="fastformer"`` its mask is a (B, S) key-padding
mask, so it packs the real tokens once (``unpad_input``) into transformers' packed layout (1, N, E), runs every
layer on them (attention as ``attention_varlen`` on ``cu_seq_lens_*``, everything else per token), and scatters
the result back (``pad_input``): work is in proportion to real tokens, and outputs at padding positions are 0.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

from fastformer.hf.attention import UNSUPPORTED_KWARGS, collecting
from fastformer.hf.layers import (
    PRISTINE,
    act_name,
    add_layer_norm,
    backend_of,
    fusable,
    has_hooks,
    original,
    project,
)
from fastformer.ops.attention import pad_input, unpad_input
from fastformer.ops.ffn import feed_forward


def output_forward(self: nn.Module, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
    """``*SelfOutput`` / ``*Output``: ``LN(dropout(dense(hidden_states)) + input_tensor)``, (..., in) -> (..., E)."""
    be = backend_of(self)
    h = project(self.dense, hidden_states, backend=be)
    return add_layer_norm(self.LayerNorm, h, input_tensor, self.dropout.p, self.training, be)[0]


def intermediate_forward(self: nn.Module, hidden_states: Tensor) -> Tensor:
    """``*Intermediate``: ``act(dense(hidden_states))``, the activation in the GEMM epilogue; (..., E) -> (..., F)."""
    return project(self.dense, hidden_states, act=self.intermediate_act_fn, backend=backend_of(self))


def _unmodified(module: nn.Module, patched: Callable) -> bool:
    # the module still computes what transformers defined (its forward is the original or ours), no hooks on it
    fn = type(module).forward
    known = fn is patched or any(PRISTINE.get((c, "forward")) is fn for c in type(module).__mro__)
    return known and not has_hooks(module)


def _plain_linear(mod: nn.Module, x: Tensor) -> bool:
    return type(mod) is nn.Linear and not has_hooks(mod) and fusable(x, mod.weight)


def feed_forward_chunk(self: nn.Module, attention_output: Tensor) -> Tensor:
    """``*Layer.feed_forward_chunk``: ``output(intermediate(x), x)`` as one fused FFN plus one fused add + LN."""
    inter, out, x = self.intermediate, self.output, attention_output
    act = act_name(getattr(inter, "intermediate_act_fn", None))
    if (
        act is not None
        and _unmodified(inter, intermediate_forward)
        and _unmodified(out, output_forward)
        and _plain_linear(inter.dense, x)
        and _plain_linear(out.dense, x)
    ):
        be = backend_of(self)
        w1, w2 = inter.dense, out.dense
        h = feed_forward(x, w1.weight, w1.bias, w2.weight, w2.bias, act, backend=be)
        return add_layer_norm(out.LayerNorm, h, x, out.dropout.p, self.training, be)[0]
    return original(self, "feed_forward_chunk")(self, attention_output)


def _can_unpad(self: nn.Module, hidden_states: Tensor, mask: Any, kwargs: dict[str, Any]) -> bool:
    return (
        isinstance(mask, Tensor)
        and mask.dim() == 2
        and mask.dtype == torch.bool
        and mask.shape == hidden_states.shape[:2]
        and self.config._attn_implementation == "fastformer"
        and not torch.compiler.is_compiling()  # packing has data-dependent shapes
        and kwargs.get("cu_seq_lens_q") is None
        and not any(kwargs.get(n) is not None for n in UNSUPPORTED_KWARGS)
        and not kwargs.get("output_attentions")
        and not collecting()  # the hooks recording hidden states / attentions must see (B, S, E) tensors
    )


def encoder_forward(
    self: nn.Module,
    hidden_states: Tensor,
    attention_mask: Tensor | None = None,
    encoder_hidden_states: Tensor | None = None,
    encoder_attention_mask: Tensor | None = None,
    cache: Any = None,
    use_cache: bool | None = None,
    **kwargs: Any,
) -> BaseModelOutputWithPastAndCrossAttentions:
    """``*Encoder``: hidden_states (B, S, E) -> (B, S, E); a padded batch runs unpadded (outputs 0 at padding)."""
    if encoder_hidden_states is None and cache is None and _can_unpad(self, hidden_states, attention_mask, kwargs):
        batch, seqlen = attention_mask.shape
        x, indices, cu_seqlens, max_seqlen = unpad_input(hidden_states, attention_mask)
        packed = dict(kwargs, cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens)
        packed.update(max_length_q=max_seqlen, max_length_k=max_seqlen)
        x = x.unsqueeze(0)  # (1, N, E): transformers' packed layout, which the attention modules reshape per head
        for layer in self.layer:
            x = layer(x, None, None, encoder_attention_mask=None, cache=None, **packed)
        out = pad_input(x[0], indices, batch, seqlen)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=out, cache=None)
    return original(self, "forward")(
        self, hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, cache, use_cache, **kwargs
    )


def tables(hf: ModuleType, prefix: str) -> tuple[dict[type, dict[str, Callable]], type, tuple[type, ...]]:
    """For the modeling module ``hf`` whose classes are named ``{prefix}Layer`` etc.: the methods to patch per class,
    the ``PreTrainedModel`` class and the attention classes."""
    cls = lambda name: getattr(hf, prefix + name)
    methods = {
        cls("SelfOutput"): {"forward": output_forward},
        cls("Output"): {"forward": output_forward},
        cls("Intermediate"): {"forward": intermediate_forward},
        cls("Layer"): {"feed_forward_chunk": feed_forward_chunk},
        cls("Encoder"): {"forward": encoder_forward},
    }
    return methods, cls("PreTrainedModel"), (cls("SelfAttention"), cls("CrossAttention"))
