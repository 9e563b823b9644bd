"""Fused forwards for ``transformers``' GPT-2 modules (``GPT2Block``, ``GPT2Attention``, ``GPT2MLP``).

GPT-2 is pre-LN: ``h = x + attn(ln_1(x)); out = h + mlp(ln_2(h))``. Patched, a block runs ln_1 on the fused
LayerNorm, the attention's output projection with its residual dropout in the GEMM epilogue, the residual add and
ln_2 in one kernel (which also returns ``h``), and the MLP as one fused feed-forward (bias + GELU epilogue, its
dropout in the second GEMM's epilogue). ``Conv1D`` weights, stored (in, out), are read in place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from transformers.cache_utils import Cache, EncoderDecoderCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gpt2 import modeling_gpt2 as hf
from transformers.pytorch_utils import Conv1D
from transformers.utils.deprecation import deprecate_kwarg

from fastformer.hf.layers import (
    act_name,
    add_layer_norm,
    apply_layer_norm,
    backend_of,
    fusable,
    has_hooks,
    original,
    project,
)
from fastformer.ops.ffn import feed_forward


@deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
def block_forward(
    self: hf.GPT2Block,
    hidden_states: Tensor,
    cache: Cache | None = None,
    attention_mask: Tensor | None = None,
    encoder_hidden_states: Tensor | None = None,
    encoder_attention_mask: Tensor | None = None,
    use_cache: bool | None = False,
    **kwargs: Any,
) -> Tensor:
    """hidden_states (B, S, E) -> (B, S, E); a block with cross-attention inputs runs the original code."""
    if encoder_hidden_states is not None:
        fn = original(self, "forward")
        return fn(
            self,
            hidden_states,
            cache,
            attention_mask,
            encoder_hidden_states,
            encoder_attention_mask,
            use_cache,
            **kwargs,
        )
    be = backend_of(self)
    x = apply_layer_norm(self.ln_1, hidden_states, be)
    attn_output, _ = self.attn(x, cache=cache, attention_mask=attention_mask, use_cache=use_cache, **kwargs)
    # attn_output already went through the residual dropout (fused into c_proj): add and normalise in one kernel
    x, hidden_states = add_layer_norm(self.ln_2, attn_output, hidden_states, 0.0, self.training, be)
    return hidden_states + self.mlp(x)


@deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
def attention_forward(
    self: hf.GPT2Attention,
    hidden_states: Tensor,
    cache: Cache | None = None,
    attention_mask: Tensor | None = None,
    encoder_hidden_states: Tensor | None = None,
    encoder_attention_mask: Tensor | None = None,
    output_attentions: bool | None = False,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """Self-attention: hidden_states (B, S, E) -> ((B, S, E), weights or None); cross-attention is the original."""
    impl = self.config._attn_implementation
    if (
        encoder_hidden_states is not None
        or self.is_cross_attention
        or (impl == "eager" and self.reorder_and_upcast_attn)
    ):
        return original(self, "forward")(
            self, hidden_states, cache, attention_mask, encoder_hidden_states, encoder_attention_mask,
            output_attentions, **kwargs,
        )  # fmt: skip
    be = backend_of(self)
    qkv = project(self.c_attn, hidden_states, backend=be)  # (B, S, 3E)
    shape = (*qkv.shape[:-1], -1, self.head_dim)
    # (B, H, S, hd) transposed views of the projection, as transformers lays them out for its attention functions
    q, k, v = (t.view(shape).transpose(1, 2) for t in qkv.split(self.split_size, dim=2))
    if cache is not None:
        current = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        k, v = current.update(k, v, self.layer_idx, kwargs=kwargs)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(impl, hf.eager_attention_forward)
    p_attn = self.attn_dropout.p if self.training else 0.0
    out, weights = attend(self, q, k, v, attention_mask, dropout=p_attn, scaling=self.scaling, **kwargs)
    out = out.reshape(*out.shape[:-2], -1)  # (B, S, E)
    p = self.resid_dropout.p if self.training else 0.0
    return project(self.c_proj, out, dropout_p=p, backend=be), weights


def _plain(mod: nn.Module, x: Tensor) -> bool:
    return type(mod) is Conv1D and not has_hooks(mod) and fusable(x, mod.weight)


def mlp_forward(self: hf.GPT2MLP, hidden_states: Tensor) -> Tensor:
    """hidden_states (B, S, E) -> (B, S, E): ``dropout(c_proj(act(c_fc(x))))`` as one fused feed-forward."""
    be, act = backend_of(self), act_name(self.act)
    p = self.dropout.p if self.training else 0.0
    fused = act is not None and _plain(self.c_fc, hidden_states) and _plain(self.c_proj, hidden_states)
    if fused and p == 0.0:
        c_fc, c_proj = self.c_fc, self.c_proj
        return feed_forward(
            hidden_states, c_fc.weight, c_fc.bias, c_proj.weight, c_proj.bias, act, weight_layout="in_out", backend=be
        )
    # with output dropout (or an adapter on a layer): two projections, the dropout in the second one's epilogue
    return project(self.c_proj, project(self.c_fc, hidden_states, act=self.act, backend=be), dropout_p=p, backend=be)


def tables() -> tuple[dict[type, dict[str, Callable]], type, tuple[type, ...]]:
    """The methods to patch per class, the ``PreTrainedModel`` class and the attention classes."""
    methods = {
        hf.GPT2Block: {"forward": block_forward},
        hf.GPT2Attention: {"forward": attention_forward},
        hf.GPT2MLP: {"forward": mlp_forward},
    }
    return methods, hf.GPT2PreTrainedModel, (hf.GPT2Attention,)
