"""The two models at matched size, their classification heads, and what they cost per token.

Both are built with ``backend=None``, so the backend is chosen around each call with ``fastformer.use_backend``:
one model object can then be timed with the torch backend and with the fused one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastformer.models import GPT, BertConfig, BertForPreTraining, BertForSequenceClassification, GPTConfig
from fastformer.ops.ffn import linear
from fastformer.study.config import Preset
from fastformer.study.tokenizer import EOS


def gpt_config(p: Preset, vocab_size: int) -> GPTConfig:
    return GPTConfig(
        vocab_size=vocab_size, n_positions=p.seqlen, n_embd=p.d_model, n_layer=p.n_layer, n_head=p.n_head,
        embd_pdrop=p.dropout, attn_pdrop=p.dropout, resid_pdrop=p.dropout, bos_token_id=EOS, eos_token_id=EOS,
    )  # fmt: skip


def bert_config(p: Preset, vocab_size: int, num_labels: int = 2) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size, hidden_size=p.d_model, num_hidden_layers=p.n_layer, num_attention_heads=p.n_head,
        intermediate_size=4 * p.d_model, max_position_embeddings=p.seqlen, type_vocab_size=2,
        hidden_dropout_prob=p.dropout, attention_probs_dropout_prob=p.dropout, num_labels=num_labels,
    )  # fmt: skip


def build(kind: str, p: Preset, vocab_size: int, seed: int) -> nn.Module:
    """A fresh GPT (next-token) or BertForPreTraining (masked tokens + next sentence), initialised from ``seed``."""
    torch.manual_seed(seed)
    return GPT(gpt_config(p, vocab_size)) if kind == "gpt" else BertForPreTraining(bert_config(p, vocab_size))


class GPTClassifier(nn.Module):
    """A pretrained GPT with a linear head on the hidden state of the last token.

    A causal model has read the whole text only at its last position, so that is where the class is read (as
    transformers' GPT2ForSequenceClassification does). The rows have no padding, so the last position is the last
    real token: a word of the text, whose state was trained to predict the next word in context (an appended
    <|endoftext|> would be a poor place, since pretraining taught it that the next document ignores the context).
    """

    def __init__(self, gpt: GPT, num_labels: int) -> None:
        super().__init__()
        self.gpt = gpt
        self.head = nn.Linear(gpt.config.n_embd, num_labels)
        nn.init.normal_(self.head.weight, std=gpt.config.initializer_range)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """input_ids: (B, T) -> (logits (B, num_labels), mean cross-entropy or None)."""
        h = self.gpt.hidden_states(input_ids)[:, -1]  # (B, C)
        logits = linear(h, self.head.weight, self.head.bias)  # (B, num_labels)
        loss = nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return logits, loss


class BertClassifier(nn.Module):
    """BertForSequenceClassification ([CLS] -> pooler -> linear) whose encoder and pooler come from pretraining."""

    def __init__(self, bert: BertForPreTraining, num_labels: int) -> None:
        super().__init__()
        cfg = BertConfig(**{**bert.config.to_dict(), "num_labels": num_labels})
        self.model = BertForSequenceClassification(cfg)
        self.model.bert.load_state_dict(bert.bert.state_dict())

    def forward(self, input_ids: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """input_ids: (B, T) -> (logits (B, num_labels), mean cross-entropy or None)."""
        out = self.model(input_ids, labels=labels)
        return out.logits, out.loss


def classifier(kind: str, pretrained: nn.Module, num_labels: int, seed: int) -> nn.Module:
    """The fine-tuning model for ``kind``; the new head is initialised from ``seed`` for both kinds."""
    torch.manual_seed(seed)
    if kind == "gpt":
        return GPTClassifier(pretrained, num_labels)  # type: ignore[arg-type]
    return BertClassifier(pretrained, num_labels)  # type: ignore[arg-type]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(model: nn.Module, seqlen: int) -> dict[str, float]:
    """Forward and training (3x forward) FLOPs per token, counted as nanoGPT and the PaLM paper do.

    2 FLOPs per weight of every matrix a token passes through (the layers' projections and the output head over the
    vocabulary; embeddings are lookups), plus attention's two (T x d) products per layer: 2 * 2 * T * d. Attention
    is counted in full, though a causal kernel skips the masked half; per-sequence heads (pooler, NSP) are left out.
    """
    if isinstance(model, GPT):
        layers, vocab_head, extra = model.transformer.h, model.lm_head_weight, 0
        d, n_layer = model.config.n_embd, model.config.n_layer
    else:
        layers, vocab_head = model.bert.h, model.bert.wte.weight
        extra = model.mlm.dense.weight.numel()  # the MLM head's transform before the vocabulary projection
        d, n_layer = model.config.hidden_size, model.config.num_hidden_layers
    matmul = sum(m.weight.numel() for m in layers.modules() if isinstance(m, nn.Linear)) + vocab_head.numel() + extra
    forward = 2.0 * matmul + 4.0 * n_layer * seqlen * d
    return {"forward": forward, "train": 3.0 * forward}
