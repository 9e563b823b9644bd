"""BERT on fastformer's fused ops: BertModel, BertForPreTraining, BertForMaskedLM, BertForSequenceClassification.

Post-LayerNorm encoder blocks built from ``fastformer.nn`` modules (``h = LN(h + drop(sublayer(h)))``, one fused
op per sublayer), learned positions plus token-type embeddings, a tanh pooler over the first token.

With an ``attention_mask`` the encoder runs unpadded: padding is dropped once, from the token ids
(``unpad_input``); the embeddings and every layer work on the packed (N, C) real tokens, attention with
``attention_varlen``, and outputs are scattered back to (B, S, ...) at the end (``pad_input``; padding
positions hold zeros, where transformers returns hidden states computed for the padding tokens). A padded batch
therefore costs work in proportion to its real tokens. The MLM head also runs on packed tokens, so labels at
padding positions are ignored.

Forward keyword names match ``transformers`` so that a tokenizer's output can be passed as ``**batch``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fastformer import utils
from fastformer.models.config import BertConfig
from fastformer.models.inputs import check_config, check_ids, check_labels, check_mask, check_ranges, is_integer
from fastformer.models.loading import HFLoadable
from fastformer.models.outputs import (
    BertForPreTrainingOutput,
    BertModelOutput,
    MaskedLMOutput,
    SequenceClassifierOutput,
)
from fastformer.nn.attention import MultiheadSelfAttention
from fastformer.nn.ffn import FeedForward
from fastformer.nn.layer_norm import DropoutAddLayerNorm, LayerNorm
from fastformer.ops.attention import pad_input, unpad_input
from fastformer.ops.ffn import linear

OptT = Tensor | None  # an optional (B, S) input of the transformers-style forward


class Packing(NamedTuple):
    """Where the real tokens of a padded (B, S) batch sit once packed into (N, ...)."""

    indices: Tensor  # (N,) flat positions in B * S
    cu_seqlens: Tensor  # (B + 1,) int32 prefix sums of the sequence lengths
    max_seqlen: int
    batch: int
    seqlen: int

    def pad(self, x: Tensor) -> Tensor:
        """(N, ...) -> (B, S, ...) with zeros at padding positions."""
        return pad_input(x, self.indices, self.batch, self.seqlen)


class BertLayer(nn.Module):
    """Post-LN block built from ``fastformer.nn`` modules: h = LN1(h + drop(attn(h))); h = LN2(h + drop(ffn(h)))."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        C, eps, p, be = config.hidden_size, config.layer_norm_eps, config.hidden_dropout_prob, config.backend
        heads, p_attn = config.num_attention_heads, config.attention_probs_dropout_prob
        self.attn = MultiheadSelfAttention(C, heads, dropout_p=p_attn, backend=be)  # HF's query, key, value fused
        self.ln_1 = DropoutAddLayerNorm(C, p, eps, backend=be)
        self.ffn = FeedForward(C, config.intermediate_size, config.act, backend=be)
        self.ln_2 = DropoutAddLayerNorm(C, p, eps, backend=be)

    def forward(self, h: Tensor, cu_seqlens: Tensor | None = None, max_seqlen: int = 0) -> Tensor:
        """h: (N, C) packed tokens with cu_seqlens, else (B, S, C) without padding -> same shape."""
        a = self.attn(h, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        h, _ = self.ln_1(a, h)
        h, _ = self.ln_2(self.ffn(h), h)
        return h


def _init_weights(module: nn.Module, std: float) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        with torch.no_grad():
            module.weight[module.padding_idx].zero_()


class BertModel(HFLoadable, nn.Module):
    """The BERT encoder. ``forward(input_ids, attention_mask, token_type_ids, position_ids) -> BertModelOutput``."""

    config_class = BertConfig

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True) -> None:
        check_config(config, BertConfig)
        super().__init__()
        self.config = config
        C = config.hidden_size
        self.wte = nn.Embedding(config.vocab_size, C, padding_idx=config.pad_token_id)
        self.wpe = nn.Embedding(config.max_position_embeddings, C)
        self.wtt = nn.Embedding(config.type_vocab_size, C)  # token types (segment A / B)
        self.ln_emb = LayerNorm(C, eps=config.layer_norm_eps, backend=config.backend)
        self.h = nn.ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])
        self.pooler = nn.Linear(C, C) if add_pooling_layer else None
        self.apply(lambda m: _init_weights(m, config.initializer_range))

    def check_inputs(
        self,
        input_ids: Tensor,
        attention_mask: OptT = None,
        token_type_ids: OptT = None,
        position_ids: OptT = None,
        check_values: bool = True,
    ) -> Tensor | None:
        """Check the forward's inputs (value ranges too unless ``check_values=False``); the mask as bool or None."""
        cfg = self.config
        check_ids(input_ids, "input_ids", None, cfg.max_position_embeddings, self.wte.weight.device)
        mask = check_mask(attention_mask, "attention_mask", input_ids)
        B, S = input_ids.shape
        if S == 0:  # the pooler and every [CLS] head read the first position
            raise ValueError("input_ids: sequence length must be at least 1 ([CLS]), got shape (batch, 0)")
        extra = [(name, ids, n) for name, ids, n in (("token_type_ids", token_type_ids, cfg.type_vocab_size),
                 ("position_ids", position_ids, cfg.max_position_embeddings)) if ids is not None]  # fmt: skip
        for name, ids, _ in extra:
            check_ids(ids, name, None, device=input_ids.device, device_of="input_ids")
            if ids.shape not in ((B, S), (1, S)):
                raise ValueError(f"{name} must have shape {(B, S)} or {(1, S)}, got {tuple(ids.shape)}")
        if check_values:  # one host sync, last, once every type, shape and device is known to be right
            check_ranges(*((ids, name, n, None) for name, ids, n in (("input_ids", input_ids, cfg.vocab_size), *extra)))
        return mask

    def encode(
        self,
        input_ids: Tensor,
        attention_mask: OptT = None,
        token_type_ids: OptT = None,
        position_ids: OptT = None,
        check_values: bool = True,
    ) -> tuple[Tensor, Packing | None]:
        """Final hidden states, packed (N, C) with their Packing when attention_mask is given, else (B, S, C).
        ``check_values=False``: the inputs' value ranges were checked already (``check_inputs``)."""
        cfg = self.config
        mask = self.check_inputs(input_ids, attention_mask, token_type_ids, position_ids, check_values)
        B, S = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(S, device=input_ids.device)
        position_ids = position_ids.expand(B, S)
        token_type_ids = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids.expand(B, S)
        packing = None
        if mask is not None:
            # pack the real tokens first: the embeddings and every layer see (N, ...) only
            input_ids, indices, cu_seqlens, max_seqlen = unpad_input(input_ids, mask)  # (N,)
            packing = Packing(indices, cu_seqlens, int(max_seqlen), B, S)
            position_ids, token_type_ids = position_ids.reshape(-1)[indices], token_type_ids.reshape(-1)[indices]
        x = self.wte(input_ids) + self.wtt(token_type_ids) + self.wpe(position_ids)  # (N, C) or (B, S, C)
        x = x.to(utils.autocast_dtype(x) or x.dtype)
        h = F.dropout(self.ln_emb(x), cfg.hidden_dropout_prob, self.training)
        cu = packing.cu_seqlens if packing is not None else None
        max_len = packing.max_seqlen if packing is not None else 0
        ckpt = cfg.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.h:
            h = checkpoint(layer, h, cu, max_len, use_reentrant=False) if ckpt else layer(h, cu, max_len)
        return h, packing

    def pool(self, hidden: Tensor) -> Tensor:
        """hidden: (B, S, C) -> tanh(dense(hidden[:, 0])): (B, C)."""
        if self.pooler is None:
            raise ValueError("this BertModel was built with add_pooling_layer=False")
        w, b = self.pooler.weight, self.pooler.bias
        return torch.tanh(linear(hidden[:, 0], w, b, backend=self.config.backend))

    def forward(
        self, input_ids: Tensor, attention_mask: OptT = None, token_type_ids: OptT = None, position_ids: OptT = None
    ) -> BertModelOutput:
        """input_ids and the optional (B, S) tensors -> last_hidden_state (B, S, C), pooler_output (B, C)."""
        h, packing = self.encode(input_ids, attention_mask, token_type_ids, position_ids)
        h = packing.pad(h) if packing is not None else h  # (B, S, C)
        return BertModelOutput(last_hidden_state=h, pooler_output=self.pool(h) if self.pooler is not None else None)


class MLMHead(nn.Module):
    """dense -> activation -> LayerNorm -> decoder tied to the word embedding, plus an output bias."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        if not config.tie_word_embeddings:  # transformers would use cls.predictions.decoder.{weight,bias}
            raise ValueError("tie_word_embeddings: an MLM decoder untied from the word embedding is not supported")
        self.config = config
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.ln = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, backend=config.backend)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, h: Tensor, decoder_weight: Tensor) -> Tensor:
        """h: (..., C), decoder_weight: the word embedding (V, C) -> (..., V) logits."""
        cfg = self.config
        h = self.ln(linear(h, self.dense.weight, self.dense.bias, cfg.act, backend=cfg.backend))
        return linear(h, decoder_weight, self.bias, backend=cfg.backend)


class _BertTask(HFLoadable, nn.Module):
    """A ``BertModel`` as ``bert`` plus a task head; ``forward`` takes the keywords of transformers' Bert* heads."""

    config_class = BertConfig

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True) -> None:
        check_config(config, BertConfig)
        super().__init__()
        self.config = config
        self.bert = BertModel(config, add_pooling_layer)

    def _init_heads(self) -> None:
        self.apply(lambda m: _init_weights(m, self.config.initializer_range))

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        labels: Tensor | None = None,
        **targets: Tensor | None,
    ) -> Any:
        """input_ids and the optional (B, S) tensors as for ``BertModel``; ``labels`` and ``targets`` as the head
        documents. Returns the head's output dataclass. Every input and target is checked before the first kernel."""
        self.bert.check_inputs(input_ids, attention_mask, token_type_ids, position_ids)
        if labels is not None or targets:
            self.check_targets(input_ids, labels, **targets)
        h, packing = self.bert.encode(input_ids, attention_mask, token_type_ids, position_ids, check_values=False)
        return self.head(h, packing, labels, **targets)

    def check_targets(self, input_ids: Tensor, labels: Tensor | None) -> None:
        """ValueError/TypeError naming a target the head cannot score (input_ids already checked)."""
        if labels is not None:
            self.check_token_labels(input_ids, labels)

    def check_token_labels(self, input_ids: Tensor, labels: Tensor) -> None:
        """MLM labels: token ids of input_ids' shape, -100 where a position is not scored."""
        shape = tuple(input_ids.shape)
        check_labels(labels, "labels", input_ids, self.config.vocab_size, (shape,), f"the shape of input_ids {shape}")

    def pooled(self, h: Tensor, packing: Packing | None) -> Tensor:
        """The pooler output (B, C) of the final hidden states (packed or not)."""
        return self.bert.pool(packing.pad(h) if packing is not None else h)

    def mlm_logits(self, h: Tensor, packing: Packing | None, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """MLM logits (B, S, V) and mean cross-entropy over labels != -100, computed on the packed tokens."""
        logits = self.mlm(h, self.bert.wte.weight)  # (N, V) or (B, S, V)
        loss = None
        if labels is not None:
            shape = (packing.batch, packing.seqlen) if packing is not None else h.shape[:2]
            if labels.shape != shape:
                raise ValueError(f"labels must have the shape of input_ids {tuple(shape)}, got {tuple(labels.shape)}")
            flat = (labels.flatten()[packing.indices] if packing is not None else labels.flatten()).long()
            loss = F.cross_entropy(logits.flatten(0, -2).float(), flat, ignore_index=-100)
        return (packing.pad(logits) if packing is not None else logits), loss


class BertForPreTraining(_BertTask):
    """Masked-LM and next-sentence heads; loss = MLM cross-entropy + NSP cross-entropy."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.mlm = MLMHead(config)
        self.nsp = nn.Linear(config.hidden_size, 2)
        self._init_heads()

    def check_targets(
        self, input_ids: Tensor, labels: Tensor | None, next_sentence_label: Tensor | None = None
    ) -> None:
        super().check_targets(input_ids, labels)
        if next_sentence_label is not None:
            B = input_ids.shape[0]
            check_labels(next_sentence_label, "next_sentence_label", input_ids, 2, ((B,), (B, 1)), f"shape ({B},)")

    def head(
        self, h: Tensor, packing: Packing | None, labels: Tensor | None, next_sentence_label: Tensor | None = None
    ) -> BertForPreTrainingOutput:
        """labels: (B, S) token ids with -100 where not masked; next_sentence_label: (B,) 0 = B follows A."""
        nsp_logits = linear(self.pooled(h, packing), self.nsp.weight, self.nsp.bias, backend=self.config.backend)
        logits, mlm_loss = self.mlm_logits(h, packing, labels)  # (B, S, V)
        nsp_loss = None
        if next_sentence_label is not None:
            nsp_loss = F.cross_entropy(nsp_logits.float(), next_sentence_label.flatten().long())
        loss = mlm_loss if nsp_loss is None else nsp_loss if mlm_loss is None else mlm_loss + nsp_loss
        return BertForPreTrainingOutput(
            loss=loss,
            prediction_logits=logits,  # (B, S, V)
            seq_relationship_logits=nsp_logits,  # (B, 2)
            mlm_loss=mlm_loss,
            nsp_loss=nsp_loss,
        )


class BertForMaskedLM(_BertTask):
    """BERT encoder (no pooler) with the masked-LM head."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config, add_pooling_layer=False)
        self.mlm = MLMHead(config)
        self._init_heads()

    def head(self, h: Tensor, packing: Packing | None, labels: Tensor | None) -> MaskedLMOutput:
        """labels: (B, S) with -100 at positions that are not scored. Returns logits (B, S, V) and loss."""
        logits, loss = self.mlm_logits(h, packing, labels)
        return MaskedLMOutput(loss=loss, logits=logits)


class BertForSequenceClassification(_BertTask):
    """Pooled output -> dropout -> linear classifier; loss chosen by ``config.problem_type`` as in transformers."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self._init_heads()

    def problem_type(self, labels: Tensor) -> str:
        """config.problem_type, else as transformers infers it from num_labels and the labels' dtype."""
        cfg = self.config
        if cfg.problem_type is not None:
            return cfg.problem_type
        if cfg.num_labels == 1:
            return "regression"
        return "single_label_classification" if is_integer(labels.dtype) else "multi_label_classification"

    def check_targets(self, input_ids: Tensor, labels: Tensor | None) -> None:
        if labels is None:
            return
        utils.check_tensor(labels, "labels")
        B, n = input_ids.shape[0], self.config.num_labels
        kind = self.problem_type(labels)
        if kind == "single_label_classification":
            check_labels(labels, "labels", input_ids, n, ((B,), (B, 1)), f"shape ({B},) for {kind}")
            return
        if labels.dtype.is_complex:
            raise TypeError(f"labels must be real for {kind}, got dtype {labels.dtype}")
        squeezed = tuple(d for d in labels.shape if d != 1)
        if kind == "regression" and squeezed != tuple(d for d in (B, n) if d != 1):
            raise ValueError(f"labels must have shape ({B}, {n}) (or without its size-1 dims) for regression, "
                             f"got {tuple(labels.shape)}")  # fmt: skip
        if kind == "multi_label_classification" and tuple(labels.shape) != (B, n):
            raise ValueError(f"labels must have shape ({B}, {n}) for {kind}, got {tuple(labels.shape)}")
        utils.check_device(labels, "labels", input_ids, "input_ids")

    def head(self, h: Tensor, packing: Packing | None, labels: Tensor | None) -> SequenceClassifierOutput:
        """labels: (B,) class ids, (B,) / (B, 1) floats for regression, or (B, num_labels) multi-hot floats."""
        cfg = self.config
        p = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout_prob
        pooled = F.dropout(self.pooled(h, packing), p, self.training)  # (B, C)
        logits = linear(pooled, self.classifier.weight, self.classifier.bias, backend=cfg.backend)  # (B, num_labels)
        loss = None
        if labels is not None:
            kind = self.problem_type(labels)
            if kind == "regression":
                loss = F.mse_loss(logits.float().squeeze(), labels.float().squeeze())
            elif kind == "single_label_classification":
                loss = F.cross_entropy(logits.float(), labels.flatten().long())
            else:
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        return SequenceClassifierOutput(loss=loss, logits=logits)
