"""Autoregressive decoding with a preallocated KV cache: greedy, temperature, top-k and nucleus sampling.

The prompt runs through the model once (prefill, causal attention over T tokens); each later step
feeds one token per sequence, whose query attends to every cached key (``attention`` with seqlen_q = 1).
Prompts of different lengths are left-padded with an ``attention_mask``: the cache records which keys are padding
and masks them in the prefill and in every step, and positions skip the padding, so each row decodes as it would
alone (and as transformers' ``generate`` does).
On CUDA the step has static shapes (the whole cache, masked to the written positions) and is captured
once as a CUDA graph. Greedy decoding is deterministic and matches Hugging Face ``generate``.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fastformer import utils
from fastformer.models.inputs import check_mask
from fastformer.ops.ffn import linear


class KVCache:
    """Preallocated keys and values for every layer, ``k[i]``, ``v[i]``: (B, max_len, nh, hs).

    Slots are written either by a Python int ``pos`` (any number of new tokens; attention then reads the
    slice [0, pos + T) with causal masking, and ``valid`` as a key mask once some key is padding), or by a
    one-element device tensor ``pos`` (one new token per row; attention reads the whole cache with ``valid`` as
    its key mask). The second form has static shapes and no host values, so a decoding step can be captured once
    as a CUDA graph and replayed.
    """

    def __init__(self, shape: tuple[int, int, int, int, int], device: torch.device, dtype: torch.dtype) -> None:
        """shape: (n_layer, batch, max_len, n_head, head_dim)."""
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        batch, self.max_len = shape[1], shape[2]
        self.valid = torch.zeros(batch, self.max_len, device=device, dtype=torch.bool)  # (B, max_len) real keys
        self.slots = torch.arange(self.max_len, device=device)  # (max_len,)
        self.padded = False  # some written key is padding: int-pos steps must mask keys too

    def mark(self, pos: int | Tensor, T: int, mask: Tensor | None = None) -> Tensor:
        """Record that slots pos .. pos + T - 1 are about to be written (once per step, before the layers), ``mask``
        (B, T) False where a new token is padding. Returns the new tokens' positions (B, T): the number of real
        tokens before each in its row (0 at padding)."""
        if isinstance(pos, Tensor):  # T = 1 real token per row; static shapes, no host values
            before = self.valid & (self.slots < pos)  # (B, max_len)
            self.valid.index_fill_(1, pos, True)
            return before.sum(-1, keepdim=True)  # (B, 1)
        if mask is None:
            mask = torch.ones(self.valid.shape[0], T, device=self.valid.device, dtype=torch.bool)
        else:
            self.padded = True
        before = self.valid[:, :pos].sum(-1, keepdim=True)  # (B, 1)
        self.valid[:, pos : pos + T] = mask
        return (before + mask.cumsum(-1) - 1).clamp_min(0)  # (B, T)

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

    def layer(self, layer: int, pos: int | Tensor) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor | None]]:
        """The ``kv_cache`` hook of one attention layer (see ``fastformer.nn.MultiheadSelfAttention``)."""
        return lambda k, v: self.update(layer, pos, k, v)


def filter_logits(
    logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    """Scale (B, V) logits by 1/temperature, then keep the top_k largest and the smallest set of tokens whose
    probability reaches top_p; everything else becomes -inf. Returns (B, V) float32."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p; the first always stays
        drop = probs.cumsum(-1) - probs >= top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def next_token(
    logits: Tensor,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick one token per row of (B, V) logits: argmax when not sampling, else a draw from the filtered softmax."""
    if not do_sample:
        return logits.argmax(dim=-1)  # (B,)
    probs = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


def _check_type(value: Any, name: str, kind: type | tuple[type, ...], expected: str) -> None:
    """TypeError naming ``name`` unless ``value`` is a ``kind`` (a bool is not a number here)."""
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")


def _check_args(
    input_ids: Tensor,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> None:
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a non-empty (batch, seqlen) tensor, got {shape}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    _check_type(temperature, "temperature", numbers.Real, "a number > 0")
    if top_k is not None:
        _check_type(top_k, "top_k", numbers.Integral, "a positive int or None")
    if top_p is not None:
        _check_type(top_p, "top_p", numbers.Real, "a number in (0, 1] or None")
    if eos_token_id is not None:
        _check_type(eos_token_id, "eos_token_id", numbers.Integral, "an int token id or None")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


class DecodeStep:
    """One decoding step with static shapes: a (B, 1) token at a device-side position, through the whole cache.

    On CUDA the step is captured once as a CUDA graph and replayed, so a token costs one graph launch instead
    of a few hundred kernel launches from Python; elsewhere (and if capture fails) it runs eagerly.
    """

    def __init__(self, model: GenerationMixin, cache: KVCache, batch: int, graph: bool) -> None:
        dev = cache.k.device
        self.model, self.cache, self.graph = model, cache, None
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        # warm-up and capture write this scratch slot, which generation never uses (the last token needs no step)
        self.pos = torch.full((1,), cache.max_len - 1, dtype=torch.long, device=dev)
        if graph and dev.type == "cuda":
            try:
                self._capture(dev)
            except RuntimeError as e:  # an op that cannot be captured: run eagerly, correctly, and say so
                warnings.warn(f"generate: CUDA graph capture failed, decoding eagerly ({e})", stacklevel=3)
                self.graph = None
            cache.valid[:, -1] = False

    def _run(self) -> Tensor:
        return self.model.step(self.token, self.cache, self.pos, check_values=False)  # (B, V)

    def _capture(self, dev: torch.device) -> None:
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):  # autotuning and lazy initialisation must happen outside the capture
                self._run()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._run()

    def __call__(self, token: Tensor, pos: int) -> Tensor:
        """token: (B, 1) at position pos -> logits (B, V) for the next one (valid until the next call)."""
        self.token.copy_(token)
        self.pos.fill_(pos)
        if self.graph is None:
            return self._run()
        self.graph.replay()
        return self.logits


class GenerationMixin:
    """KV-cache decoding for a causal LM. The model provides ``config`` (``n_layer``, ``n_head``, ``head_dim``,
    ``n_positions``), ``hidden_states(input_ids, attention_mask, cache=, pos=, check_values=)`` and
    ``lm_head_weight``."""

    config: Any
    training: bool

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache for ``batch`` sequences of up to ``max_len`` tokens."""
        w = self.lm_head_weight
        cfg = self.config
        dtype = dtype or utils.autocast_dtype(w) or w.dtype
        return KVCache((cfg.n_layer, batch, max_len, cfg.n_head, cfg.head_dim), w.device, dtype)

    @torch.no_grad()
    def step(
        self,
        input_ids: Tensor,
        cache: KVCache,
        pos: int | Tensor,
        check_values: bool = True,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Run (B, T) new tokens at cache slots pos.. through the cache; returns last-position logits (B, V).

        ``pos`` an int: any T; ``pos`` a (1,) int64 tensor on the model's device: T = 1, static shapes.
        ``attention_mask``: (B, T), 0 where a new token is padding (int ``pos`` only)."""
        h = self.hidden_states(input_ids, attention_mask, cache=cache, pos=pos, check_values=check_values)  # (B, T, C)
        return linear(h[:, -1], self.lm_head_weight, backend=self.config.backend)  # (B, V)

    @torch.inference_mode()  # no_grad's bookkeeping (version counters, views) costs a decode step a few percent
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
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Extend (B, T) prompts by up to ``max_new_tokens`` tokens; returns (B, T + n).

        ``attention_mask``: (B, T), 0 at padding; prompts of different lengths are padded on the left (the last
        position of every row must be a real token), and each row then decodes as it would alone.
        Sequences that emitted ``eos_token_id`` are padded with it afterwards, and decoding stops as soon as
        every sequence has finished (so n may be smaller than max_new_tokens), as Hugging Face does.
        ``static``: decode with static shapes (:class:`DecodeStep`, a CUDA graph on GPU); default on CUDA only.
        """
        _check_args(input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, generator)
        B, T = input_ids.shape
        limit = self.config.n_positions
        if T + max_new_tokens > limit:
            raise ValueError(f"input_ids length {T} + max_new_tokens {max_new_tokens} exceeds n_positions {limit}")
        mask = check_mask(attention_mask, "attention_mask", input_ids)
        if mask is not None and not bool(mask[:, -1].all()):
            raise ValueError("attention_mask: generate needs left padding; the last position of a row is padding")
        if max_new_tokens == 0:
            return input_ids
        if mask is not None and bool(mask.all()):
            mask = None  # no padding: the unmasked path
        static = input_ids.is_cuda if static is None else static
        was_training = self.training
        self.eval()
        try:
            cache = self.new_cache(B, T + max_new_tokens)
            decode = DecodeStep(self, cache, B, graph=True) if static and max_new_tokens > 1 else None
            logits = self.step(input_ids, cache, 0, attention_mask=mask)  # (B, V): the prompt in one pass, checked
            out = [input_ids]
            finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
            for i in range(max_new_tokens):
                nxt = next_token(logits, do_sample, temperature, top_k, top_p, generator)  # (B,)
                if eos_token_id is not None:
                    nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
                    finished |= nxt == eos_token_id
                out.append(nxt[:, None])
                if i == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
                    break
                pos = T + i
                if decode is not None:
                    logits = decode(nxt[:, None], pos)
                else:
                    logits = self.step(nxt[:, None], cache, pos, check_values=False)  # our own ids need no check
            return torch.cat(out, dim=1)
        finally:
            self.train(was_training)
