"""Token data for the three tasks: GPT next-token windows, BERT masked-token + next-sentence pairs, labelled windows.

Each document's sentences are packed greedily into passages of at most ``seqlen - 3`` tokens. Every eighth passage
is held out: no model trains on it, and every validation and test number is measured on held-out text only. The
passages of each split are then run together into a stream (documents separated by ``<|endoftext|>``), and every
training row is a full ``seqlen``-token slice of it, for both models: GPT's window and BERT's ``[CLS] A [SEP] B
[SEP]`` have no padding, so both models see exactly ``steps x batch x seqlen`` tokens, and BERT runs its dense
attention path (an unpadded batch needs no variable-length attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from torch import Tensor

from fastformer.study.corpus import Corpus
from fastformer.study.tokenizer import CLS, EOS, MASK, SEP, SPECIALS, sentence_texts

HOLD_OUT_EVERY = 8
Batch = dict[str, Tensor]


@dataclass
class Passage:
    ids: list[int]  # token ids, no special tokens
    starts: list[int]  # where each sentence begins in ids (starts[0] == 0)
    label: int | None  # class id, or None for unlabelled text
    doc: int  # index of its document


@dataclass
class Stream:
    """Passages run together, with ``<|endoftext|>`` between documents."""

    ids: Tensor  # (N,) token ids
    doc: Tensor  # (N,) the document each token comes from
    starts: Tensor  # (S,) positions where a sentence begins, ascending

    @classmethod
    def of(cls, passages: list[Passage]) -> Stream:
        ids: list[int] = []
        doc: list[int] = []
        starts: list[int] = []
        for i, p in enumerate(passages):
            if i > 0 and p.doc != passages[i - 1].doc:
                ids.append(EOS)
                doc.append(passages[i - 1].doc)
            starts += [len(ids) + s for s in p.starts]
            ids += p.ids
            doc += [p.doc] * len(p.ids)
        return cls(torch.tensor(ids, dtype=torch.long), torch.tensor(doc), torch.tensor(starts, dtype=torch.long))


@dataclass
class StudyData:
    train: list[Passage]
    val: list[Passage]
    train_stream: Stream
    val_stream: Stream
    classes: list[str]
    seqlen: int
    vocab_size: int


def build_data(corpus: Corpus, tok: Tokenizer, seqlen: int) -> StudyData:
    """Tokenize the corpus, pack passages, hold out every eighth, and run each split together."""
    cap = seqlen - 3
    encoded = iter(tok.encode_batch(sentence_texts(corpus)))
    class_id = {c: i for i, c in enumerate(corpus.classes)}
    train: list[Passage] = []
    val: list[Passage] = []
    for di, doc in enumerate(corpus.documents):
        label = class_id.get(doc.label) if doc.label is not None else None
        passages = [Passage([], [], label, di)]
        for _ in doc.sentences:
            ids = next(encoded).ids
            for piece in (ids[i : i + cap] for i in range(0, len(ids), cap)):  # an over-long sentence in pieces
                if len(passages[-1].ids) + len(piece) > cap:
                    passages.append(Passage([], [], label, di))
                passages[-1].starts.append(len(passages[-1].ids))
                passages[-1].ids += piece
        for p in passages:
            if p.ids:  # a global count, so that held-out passages are spread over documents and classes
                (val if (len(train) + len(val)) % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1 else train).append(p)
    return StudyData(train, val, Stream.of(train), Stream.of(val), list(corpus.classes), seqlen, tok.get_vocab_size())


def spread(passages: list[Passage], n: int) -> list[Passage]:
    """``n`` passages evenly spaced through the list, so that a fixed sample covers every part of the corpus."""
    step = max(1, len(passages) // max(1, n))
    return passages[::step][:n]


def _randint(high: int, gen: torch.Generator) -> int:
    return int(torch.randint(high, (1,), generator=gen))


def unigram_loss(train: Stream, val: Stream, vocab_size: int) -> float:
    """Held-out cross-entropy of predicting every (non-special) token by its training frequency alone: the loss a
    model reaches before it uses any context, and the plateau both models start by falling to."""
    counts = torch.bincount(train.ids, minlength=vocab_size).double()[len(SPECIALS) :] + 1  # add-one: no log(0)
    logp = (counts / counts.sum()).log()
    targets = val.ids[val.ids >= len(SPECIALS)] - len(SPECIALS)
    return float(-logp[targets].mean())


# ---- GPT: next-token prediction


def gpt_batch(stream: Stream, seqlen: int, batch: int, gen: torch.Generator) -> Batch:
    """``batch`` random windows of ``seqlen`` tokens (labels = inputs: the model shifts them)."""
    starts = torch.randint(0, stream.ids.numel() - seqlen, (batch,), generator=gen)
    ids = torch.stack([stream.ids[s : s + seqlen] for s in starts.tolist()])  # (B, T)
    return dict(input_ids=ids, labels=ids)


def gpt_eval_set(stream: Stream, seqlen: int, n: int) -> Batch:
    """Up to ``n`` non-overlapping windows from the start of a held-out stream (a fixed set)."""
    n = min(n, stream.ids.numel() // seqlen)
    ids = stream.ids[: n * seqlen].view(n, seqlen)
    return dict(input_ids=ids, labels=ids)


# ---- BERT: masked tokens + next sentence


def mask_tokens(ids: Tensor, vocab_size: int, gen: torch.Generator, rate: float = 0.15) -> tuple[Tensor, Tensor]:
    """BERT's corruption: ``rate`` of the non-special tokens are targets; of those 80% become [MASK], 10% a random
    token, 10% stay. Returns (corrupted ids, labels with -100 at non-targets)."""
    maskable = ids >= len(SPECIALS)
    chosen = (torch.rand(ids.shape, generator=gen) < rate) & maskable
    # at least one target per row, so every row contributes to the loss
    first = maskable.float().argmax(dim=1)
    empty = ~chosen.any(dim=1) & maskable.any(dim=1)
    chosen[empty, first[empty]] = True
    labels = ids.masked_fill(~chosen, -100)
    roll = torch.rand(ids.shape, generator=gen)
    random_ids = torch.randint(len(SPECIALS), vocab_size, ids.shape, generator=gen)
    out = torch.where(chosen & (roll < 0.8), torch.full_like(ids, MASK), ids)
    out = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, out)
    return out, labels


def _pair(stream: Stream, span: int, gen: torch.Generator) -> tuple[Tensor, Tensor, int]:
    """(segment A, segment B, NSP label), ``span`` tokens together. A starts at a sentence and ends at one where
    possible; B is the text that follows (label 0) or, half the time, as many tokens from a sentence of another
    document (label 1), so that length gives nothing away."""
    n = stream.ids.numel()
    starts = stream.starts[stream.starts <= n - span]
    s = int(starts[_randint(starts.numel(), gen)])
    margin = max(1, span // 8)
    inner = stream.starts[(stream.starts >= s + margin) & (stream.starts <= s + span - margin)]
    cut = int(inner[_randint(inner.numel(), gen)]) if inner.numel() else s + span // 2
    a, b_len = stream.ids[s:cut], span - (cut - s)
    if float(torch.rand(1, generator=gen)) < 0.5:
        return a, stream.ids[cut : cut + b_len], 0
    for _ in range(10):  # a few tries for another document (a one-document corpus has none)
        r = int(starts[_randint(starts.numel(), gen)])
        if int(stream.doc[r]) != int(stream.doc[s]):
            return a, stream.ids[r : r + b_len], 1
    return a, stream.ids[cut : cut + b_len], 0


def bert_batch(stream: Stream, seqlen: int, batch: int, vocab_size: int, gen: torch.Generator) -> Batch:
    """``batch`` rows of [CLS] A [SEP] B [SEP], exactly ``seqlen`` tokens each, masked, with next-sentence labels."""
    rows, types, nsp = [], [], []
    for _ in range(batch):
        a, b, label = _pair(stream, seqlen - 3, gen)
        rows.append(torch.cat([torch.tensor([CLS]), a, torch.tensor([SEP]), b, torch.tensor([SEP])]))
        types.append(torch.tensor([0] * (a.numel() + 2) + [1] * (b.numel() + 1)))
        nsp.append(label)
    corrupted, labels = mask_tokens(torch.stack(rows), vocab_size, gen)
    return dict(
        input_ids=corrupted,
        token_type_ids=torch.stack(types),
        labels=labels,
        next_sentence_label=torch.tensor(nsp),
    )


def bert_eval_set(stream: Stream, seqlen: int, n: int, vocab_size: int, seed: int) -> Batch:
    """``n`` pairs from a held-out stream, masked once with a fixed seed: the same for every evaluation."""
    return bert_batch(stream, seqlen, n, vocab_size, torch.Generator().manual_seed(seed + 1))


# ---- the downstream task: which class a window of text comes from


@dataclass
class ClassificationSet:
    gpt_ids: Tensor  # (N, T - 1): <|endoftext|> window; the head reads the window's last token
    bert_ids: Tensor  # (N, T): [CLS] window [SEP]; the head reads [CLS]
    labels: Tensor  # (N,)

    def __len__(self) -> int:
        return self.labels.numel()

    def rows(self, kind: str, index: Tensor) -> Batch:
        return dict(input_ids=(self.gpt_ids if kind == "gpt" else self.bert_ids)[index], labels=self.labels[index])


def classification_set(passages: list[Passage], n_classes: int, seqlen: int) -> ClassificationSet:
    """Non-overlapping windows of ``seqlen - 2`` tokens from each class's passages run together, framed as each
    model was pretrained: GPT reads a document start, BERT a [CLS] ... [SEP] pair."""
    width = seqlen - 2
    windows, labels = [], []
    for c in range(n_classes):
        ids = torch.tensor([t for p in passages if p.label == c for t in p.ids], dtype=torch.long)
        n = ids.numel() // width
        windows.append(ids[: n * width].view(n, width))
        labels += [c] * n
    w = torch.cat(windows)  # (N, width)
    col = torch.full((w.shape[0], 1), 0, dtype=torch.long)
    return ClassificationSet(
        gpt_ids=torch.cat([col + EOS, w], dim=1),
        bert_ids=torch.cat([col + CLS, w, col + SEP], dim=1),
        labels=torch.tensor(labels, dtype=torch.long),
    )


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
