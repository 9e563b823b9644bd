"""GPT-2 on fastformer's fused ops.

Pre-LayerNorm blocks built from ``fastformer.nn`` modules, learned positions, gelu_tanh MLP, LM head tied to
the token embedding (or its own ``lm_head`` with ``tie_word_embeddings=False``). Each residual add is fused with
the LayerNorm that follows it (``DropoutAddLayerNorm``), so the block interface carries two tensors: the sublayer
output ``x`` still to be added, and the residual stream. KV-cache decoding comes from
:class:`~fastformer.models.generation.GenerationMixin`.

    r_0 = drop(wte + wpe)                      h = ln_1(r)            (first block's fused add)
    r  += drop(attn(h));  h = ln_2(r)          one fused op
    r  += drop(mlp(h));   h = next ln_1(r)     one fused op (ln_f after the last block)

Parameter names follow the modules (``attn.qkv``, ``attn.out_proj``, ``mlp.fc1``, ``mlp.fc2``), every projection
an ``nn.Linear`` in (out, in) layout; :mod:`fastformer.models.loading` maps and transposes HF's Conv1D weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fastformer import utils
from fastformer.models.config import GPTConfig
from fastformer.models.generation import GenerationMixin, KVCache
from fastformer.models.inputs import check_config, check_ids, check_labels, check_mask, check_ranges
from fastformer.models.loading import HFLoadable
from fastformer.models.outputs import CausalLMOutput
from fastformer.nn.attention import KVHook, MultiheadSelfAttention
from fastformer.nn.ffn import FeedForward
from fastformer.nn.layer_norm import DropoutAddLayerNorm
from fastformer.ops.ffn import linear


class Block(nn.Module):
    """Pre-LN transformer block taking (sublayer output to add, residual stream) and returning the same pair."""

    def __init__(self, config: GPTConfig, in_pdrop: float) -> None:
        super().__init__()
        C, eps, be = config.n_embd, config.layer_norm_epsilon, config.backend
        # dropout on the incoming x: embd_pdrop for the first block, resid_pdrop after
        self.ln_1 = DropoutAddLayerNorm(C, in_pdrop, eps, backend=be)
        self.attn = MultiheadSelfAttention(C, config.n_head, causal=True, dropout_p=config.attn_pdrop, backend=be)
        self.ln_2 = DropoutAddLayerNorm(C, config.resid_pdrop, eps, backend=be)
        self.mlp = FeedForward(C, config.d_ff, config.act, backend=be)

    def forward(
        self, x: Tensor, residual: Tensor | None, mask: Tensor | None = None, kv_cache: KVHook | None = None
    ) -> tuple[Tensor, Tensor]:
        """x, residual: (B, T, C) (residual None before the first block) -> (mlp output, residual)."""
        h, residual = self.ln_1(x, residual)  # h = LN(residual += drop(x))
        a = self.attn(h, mask, kv_cache=kv_cache)  # (B, T, C)
        h, residual = self.ln_2(a, residual)
        return self.mlp(h), residual


class GPT(HFLoadable, GenerationMixin, nn.Module):
    """GPT-2 language model. ``forward(input_ids, labels=None, attention_mask=None) -> CausalLMOutput``."""

    config_class = GPTConfig

    def __init__(self, config: GPTConfig) -> None:
        check_config(config, GPTConfig)
        super().__init__()
        self.config = config
        be = config.backend
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.n_positions, config.n_embd),
                h=nn.ModuleList(
                    [Block(config, config.embd_pdrop if i == 0 else config.resid_pdrop) for i in range(config.n_layer)]
                ),
                ln_f=DropoutAddLayerNorm(config.n_embd, config.resid_pdrop, config.layer_norm_epsilon, backend=be),
            )
        )
        if not config.tie_word_embeddings:  # an untied head: its own (vocab_size, C) matrix
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch's output projection by 1/sqrt(number of residual adds)
        for name, p in self.named_parameters():
            if name.endswith(("attn.out_proj.weight", "mlp.fc2.weight")):
                nn.init.normal_(p, mean=0.0, std=config.initializer_range / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def lm_head_weight(self) -> Tensor:
        """The LM head (vocab_size, C): the token embedding when tied, else ``lm_head.weight``."""
        return self.transformer.wte.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; the position table is left out by default (it costs no FLOPs per token)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def hidden_states(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        cache: KVCache | None = None,
        pos: int | Tensor = 0,
        check_values: bool = True,
    ) -> Tensor:
        """input_ids: (B, T) -> final normalized hidden states (B, T, C).

        attention_mask: (B, T), 0/False at padding. Without a cache, padding keys are masked and positions are
        0..T-1 (as transformers' forward). With a cache, the new tokens are written at cache slots pos..pos+T-1,
        their mask is recorded there, padding keys stay masked in every later step, and each token's position is
        the number of real tokens before it in its row (transformers' generate: cumsum(mask) - 1), so a
        left-padded prompt is positioned as if it were alone.
        ``check_values=False`` skips the vocabulary range check (a host sync), for ids the model itself produced or
        already checked.
        """
        cfg = self.config
        static = isinstance(pos, Tensor)  # a device-side position: one token per row (see KVCache)
        limit = cfg.n_positions if cache is None else 1 if static else min(cfg.n_positions, cache.max_len) - pos
        device = self.transformer.wte.weight.device
        check_ids(input_ids, "input_ids", cfg.vocab_size if check_values else None, limit, device)
        mask = check_mask(attention_mask, "attention_mask", input_ids)
        T = input_ids.shape[1]
        if cache is None:
            positions = torch.arange(T, device=input_ids.device)  # (T,)
        else:
            if static and mask is not None:
                raise ValueError("attention_mask: not supported with a device-side pos (one real token per row)")
            positions = cache.mark(pos, T, mask)  # (B, T)
            # keys to attend: with an int pos the cache hands back [0, pos + T) and the block masks causally, plus
            # the padding recorded so far; with a device-side pos the cache hands back its own key mask
            mask = cache.valid[:, : pos + T] if cache.padded and not static else None  # (B, pos + T)
        x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)  # (B, T, C)
        x = x.to(utils.autocast_dtype(x) or x.dtype)
        residual = None
        ckpt = cfg.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.transformer.h):
            if ckpt:
                x, residual = checkpoint(block, x, residual, mask, use_reentrant=False)
            else:
                x, residual = block(x, residual, mask, cache.layer(i, pos) if cache is not None else None)
        h, _ = self.transformer.ln_f(x, residual)
        return h  # (B, T, C)

    def forward(
        self, input_ids: Tensor, labels: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> CausalLMOutput:
        """input_ids, labels, attention_mask: (B, T). Returns CausalLMOutput(logits (B, T, V), loss).

        The loss is Hugging Face's: logits at t predict labels at t + 1; labels equal to -100 are ignored.
        """
        cfg = self.config
        # every input is checked before the first kernel: input_ids here, the mask in hidden_states
        check_ids(input_ids, "input_ids", None, cfg.n_positions, self.transformer.wte.weight.device)
        ranges = [(input_ids, "input_ids", cfg.vocab_size, None)]
        if labels is not None:
            shape = tuple(input_ids.shape)
            expected = f"shape {shape} (like input_ids)"
            check_labels(labels, "labels", input_ids, cfg.vocab_size, (shape,), expected, check_values=False)
            ranges.append((labels, "labels", cfg.vocab_size, -100))
        check_ranges(*ranges)  # both value checks in one host sync
        h = self.hidden_states(input_ids, attention_mask, check_values=False)  # (B, T, C)
        logits = linear(h, self.lm_head_weight, backend=cfg.backend)  # (B, T, V)
        loss = None
        if labels is not None:
            # shift the labels, not the logits: a (B, T-1, V) slice would be copied, and its gradient zero-filled
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # (B, T)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten().long(), ignore_index=-100)
        return CausalLMOutput(logits=logits, loss=loss)
