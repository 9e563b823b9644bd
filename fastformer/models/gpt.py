"""GPT-2 on fastformer's fused ops.

Pre-LayerNorm blocks, learned positions, gelu_tanh MLP, LM head tied to the token embedding. Each
residual add is fused with the LayerNorm that follows it (``dropout_add_layer_norm``), so the block
interface carries two tensors: the sublayer output ``x`` still to be added, and the residual stream.

    r_0 = drop(wte + wpe)                      h = ln_1(r)            (first block's fused add)
    r  += drop(attn(h));  h = ln_2(r)          one fused op
    r  += drop(mlp(h));   h = next ln_1(r)     one fused op (ln_f after the last block)

Parameter names follow nanoGPT (and so Hugging Face's GPT2LMHeadModel), with every projection an
``nn.Linear`` in (out, in) layout; :mod:`fastformer.models.loading` transposes HF's Conv1D weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fastformer.models.config import GPTConfig, autocast_dtype, check_ids, check_mask
from fastformer.models.loading import HFLoadable
from fastformer.ops.attention import attention
from fastformer.ops.ffn import feed_forward, linear
from fastformer.ops.layer_norm import dropout_add_layer_norm


@dataclass
class CausalLMOutput:
    logits: Tensor  # (B, T, vocab_size)
    loss: Tensor | None = None  # mean next-token cross-entropy over labels != -100


class KVCache:
    """Preallocated keys and values for every layer, ``k[i]``, ``v[i]``: (B, max_len, nh, hs).

    Positions are written either by a Python int ``pos`` (any number of new tokens; attention then reads the
    slice [0, pos + T) with causal masking), or by a one-element device tensor ``pos`` (one new token per row;
    attention reads the whole cache with ``valid`` as its key mask). The second form has static shapes and no
    host values, so a decoding step can be captured once as a CUDA graph and replayed.
    """

    def __init__(self, config: GPTConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (config.n_layer, batch, max_len, config.n_head, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch, max_len, device=device, dtype=torch.bool)  # (B, max_len) written keys
        self.max_len = max_len

    def mark(self, pos: int | Tensor, T: int) -> None:
        """Record that positions pos .. pos + T - 1 are about to be written (once per step, before the layers)."""
        if isinstance(pos, Tensor):
            self.valid.index_fill_(1, pos, True)
        else:
            self.valid[:, pos : pos + T] = True

    def update(self, layer: int, pos: int | Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Store (B, T, nh, hs) keys/values at pos..; return the keys and values to attend to and their mask."""
        if isinstance(pos, Tensor):
            self.k[layer].index_copy_(1, pos, k)
            self.v[layer].index_copy_(1, pos, v)
            return self.k[layer], self.v[layer], self.valid  # (B, max_len, nh, hs) x2, (B, max_len)
        T = k.shape[1]
        self.k[layer, :, pos : pos + T] = k
        self.v[layer, :, pos : pos + T] = v
        return self.k[layer, :, : pos + T], self.v[layer, :, : pos + T], None  # (B, pos + T, nh, hs)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v projections in one GEMM
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(
        self, h: Tensor, mask: Tensor | None = None, cache: KVCache | None = None, layer: int = 0, pos: int | Tensor = 0
    ) -> Tensor:
        """h: (B, T, C) normalized input; mask: (B, T) bool key padding; cache/pos: decoding state (see KVCache)."""
        cfg = self.config
        B, T, C = h.shape
        qkv = linear(h, self.c_attn.weight, self.c_attn.bias, backend=cfg.backend)  # (B, T, 3C)
        q, k, v = qkv.view(B, T, 3, cfg.n_head, cfg.head_dim).unbind(2)  # each (B, T, nh, hs), strided views
        causal = True
        if cache is not None:
            k, v, mask = cache.update(layer, pos, k, v)
            causal = mask is None  # a single new query may see every written key
        p = cfg.attn_pdrop if self.training else 0.0
        # causal aligns bottom-right, so T new queries see the pos cached keys plus their own prefix
        y = attention(q, k, v, causal=causal, key_padding_mask=mask, dropout_p=p, backend=cfg.backend)  # (B, T, nh, hs)
        y = y.reshape(B, T, C)
        return linear(y, self.c_proj.weight, self.c_proj.bias, backend=cfg.backend)  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.c_fc = nn.Linear(config.n_embd, config.d_ff)
        self.c_proj = nn.Linear(config.d_ff, config.n_embd)

    def forward(self, h: Tensor) -> Tensor:
        """h: (B, T, C) -> (B, T, C); bias and activation are fused into the first GEMM."""
        w1, b1, w2, b2 = (self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias)
        return feed_forward(h, w1, b1, w2, b2, self.config.act, backend=self.config.backend)


class Block(nn.Module):
    """Pre-LN transformer block taking (sublayer output to add, residual stream) and returning the same pair."""

    def __init__(self, config: GPTConfig, in_pdrop: float) -> None:
        super().__init__()
        self.config = config
        self.in_pdrop = in_pdrop  # dropout on the incoming x: embd_pdrop for the first block, resid_pdrop after
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(
        self,
        x: Tensor,
        residual: Tensor | None,
        mask: Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        pos: int | Tensor = 0,
    ) -> tuple[Tensor, Tensor]:
        """x, residual: (B, T, C) (residual None before the first block) -> (mlp output, residual)."""
        cfg, training = self.config, self.training
        p_in, p = (self.in_pdrop, cfg.resid_pdrop) if training else (0.0, 0.0)
        eps = cfg.layer_norm_epsilon
        ln_1, ln_2 = self.ln_1, self.ln_2
        h, residual = dropout_add_layer_norm(x, residual, ln_1.weight, ln_1.bias, dropout_p=p_in, eps=eps, backend=cfg.backend)
        a = self.attn(h, mask, cache, layer, pos)  # (B, T, C)
        h, residual = dropout_add_layer_norm(a, residual, ln_2.weight, ln_2.bias, dropout_p=p, eps=eps, backend=cfg.backend)
        return self.mlp(h), residual


class GPT(HFLoadable, nn.Module):
    """GPT-2 language model. ``forward(input_ids, labels=None, attention_mask=None) -> CausalLMOutput``."""

    config_class = GPTConfig

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.n_positions, config.n_embd),
                h=nn.ModuleList(
                    [Block(config, config.embd_pdrop if i == 0 else config.resid_pdrop) for i in range(config.n_layer)]
                ),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
            )
        )
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch's output projection by 1/sqrt(number of residual adds)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=config.initializer_range / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def lm_head_weight(self) -> Tensor:
        """The LM head is tied to the token embedding: (vocab_size, C)."""
        return self.transformer.wte.weight

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
        """input_ids: (B, T) -> final normalized hidden states (B, T, C); with a cache, positions start at pos.

        ``check_values=False`` skips the vocabulary range check (a host sync), for ids the model itself produced.
        """
        cfg = self.config
        static = isinstance(pos, Tensor)  # a device-side position: one token per row (see KVCache)
        limit = cfg.n_positions if cache is None else 1 if static else min(cfg.n_positions, cache.max_len) - pos
        check_ids(input_ids, "input_ids", cfg.vocab_size if check_values else None, limit)
        mask = check_mask(attention_mask, "attention_mask", input_ids)
        if mask is not None and cache is not None:
            raise ValueError("attention_mask: padding masks are not supported together with a KV cache")
        T = input_ids.shape[1]
        positions = pos if static else torch.arange(pos, pos + T, device=input_ids.device)  # (T,)
        if cache is not None:
            cache.mark(pos, T)
        x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)  # (B, T, C)
        x = x.to(autocast_dtype(x))
        residual = None
        ckpt = cfg.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.transformer.h):
            if ckpt:
                x, residual = checkpoint(block, x, residual, mask, use_reentrant=False)
            else:
                x, residual = block(x, residual, mask, cache, i, pos)
        ln_f, p = self.transformer.ln_f, cfg.resid_pdrop if self.training else 0.0
        h, _ = dropout_add_layer_norm(
            x, residual, ln_f.weight, ln_f.bias, dropout_p=p, eps=cfg.layer_norm_epsilon, backend=cfg.backend
        )
        return h  # (B, T, C)

    def forward(
        self, input_ids: Tensor, labels: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> CausalLMOutput:
        """input_ids, labels, attention_mask: (B, T). Returns CausalLMOutput(logits (B, T, V), loss).

        The loss is Hugging Face's: logits at t predict labels at t + 1; labels equal to -100 are ignored.
        """
        h = self.hidden_states(input_ids, attention_mask)  # (B, T, C)
        logits = linear(h, self.lm_head_weight, backend=self.config.backend)  # (B, T, V)
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels must have shape {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
            shifted = logits[:, :-1].float()  # (B, T-1, V)
            loss = F.cross_entropy(shifted.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(logits=logits, loss=loss)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``max_len`` tokens."""
        w = self.transformer.wte.weight
        return KVCache(self.config, batch, max_len, w.device, dtype or autocast_dtype(w))

    @torch.no_grad()
    def step(self, input_ids: Tensor, cache: KVCache, pos: int | Tensor, check_values: bool = True) -> Tensor:
        """Run (B, T) new tokens at positions pos.. through the cache; returns last-position logits (B, V).

        ``pos`` an int: any T; ``pos`` a (1,) int64 tensor on the model's device: T = 1, static shapes."""
        h = self.hidden_states(input_ids, cache=cache, pos=pos, check_values=check_values)  # (B, T, C)
        return linear(h[:, -1], self.lm_head_weight, backend=self.config.backend)  # (B, V)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        do_sample: bool = False,
        generator: torch.Generator | None = None,
        static: bool | None = None,
    ) -> Tensor:
        """Extend (B, T) prompts by up to ``max_new_tokens`` tokens -> (B, T + n). See ``models.generation``."""
        from fastformer.models.generation import generate

        args = (temperature, top_k, top_p, eos_token_id, do_sample, generator, static)
        return generate(self, input_ids, max_new_tokens, *args)
