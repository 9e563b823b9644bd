"""Training loops (pretraining and fine-tuning) and the held-out evaluations, with tqdm bars.

Both models get the same optimizer (AdamW, gradient clipping at 1; a linear warm-up, then cosine decay to a tenth in
pretraining and a constant rate in the short fine-tuning) and the same number of steps on the same text. Only the
time of the training steps themselves is counted in tokens/s: batch preparation and evaluations are outside it.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import fastformer
from fastformer.study.data import Batch, ClassificationSet, StudyData, bert_batch, gpt_batch, to_device

EVAL_CHUNK = 64  # rows per forward pass in evaluations: bounds memory on a large preset


@dataclass
class Curve:
    """Training loss at every step and validation loss at a few steps; x in steps and in tokens seen."""

    step: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)  # the loss minimised (BERT: masked tokens + next sentence)
    parts: dict[str, list[float]] = field(default_factory=dict)  # BERT: "mlm" and "nsp" separately
    val_step: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)  # GPT: next token; BERT: masked tokens


@contextlib.contextmanager
def running(device: torch.device, backend: str) -> Iterator[None]:
    """Ops on ``backend``; bf16 autocast on a GPU (as one trains there), fp32 on a CPU.

    Autocast's cast cache is off: generation captures its decoding step as a CUDA graph, which a cached cast made
    outside the capture would break; the models use each weight once per forward, so the cache saves nothing."""
    amp = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda", cache_enabled=False)
    with fastformer.use_backend(backend), amp:
        yield


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def optimizer(model: nn.Module, lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases or LayerNorm weights), as nanoGPT does."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # the fused AdamW is one kernel per step instead of a dozen per parameter, on CPU and GPU alike
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), fused=device.type in ("cpu", "cuda"))


def lr_at(step: int, steps: int, peak: float, decay: bool = True) -> float:
    """Linear warm-up over the first 10% of steps, then cosine decay to peak / 10 (or constant: ``decay=False``)."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return peak * (step + 1) / warmup
    if not decay:
        return peak
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def step_loss(kind: str, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
    """The training loss and its parts (BERT: masked-token and next-sentence terms)."""
    out = model(**batch)
    if kind == "bert":
        return out.loss, {"mlm": out.mlm_loss.item(), "nsp": out.nsp_loss.item()}
    return out.loss, {}


def update(model: nn.Module, opt: torch.optim.Optimizer, loss: Tensor) -> None:
    """One optimizer step on ``loss``, gradients clipped to norm 1."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="step", disable=not progress, dynamic_ncols=True, leave=True)


@torch.no_grad()
def evaluate(kind: str, model: nn.Module, batch: Batch, device: torch.device, backend: str) -> dict[str, float]:
    """Held-out metrics. GPT: loss, perplexity, next-token accuracy (over real next tokens). BERT: masked-token loss
    and accuracy (over the masked positions), next-sentence loss and accuracy."""
    was_training = model.training
    model.eval()
    n = batch["input_ids"].shape[0]
    sums = dict(loss=0.0, hits=0.0, targets=0.0, nsp_loss=0.0, nsp_hits=0.0)
    with running(device, backend):
        for i in range(0, n, EVAL_CHUNK):
            b = to_device({k: v[i : i + EVAL_CHUNK] for k, v in batch.items()}, device)
            out = model(**b)
            if kind == "gpt":
                logits, targets = out.logits[:, :-1].float(), b["labels"][:, 1:]
            else:
                logits, targets = out.prediction_logits.float(), b["labels"]
                nsp = out.seq_relationship_logits.float()
                sums["nsp_loss"] += nn.functional.cross_entropy(nsp, b["next_sentence_label"], reduction="sum").item()
                sums["nsp_hits"] += (nsp.argmax(-1) == b["next_sentence_label"]).sum().item()
            keep = targets != -100
            sums["loss"] += nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum").item()
            sums["hits"] += (logits[keep].argmax(-1) == targets[keep]).sum().item()
            sums["targets"] += keep.sum().item()
    model.train(was_training)
    loss = sums["loss"] / max(1.0, sums["targets"])
    if kind == "gpt":
        return {"loss": loss, "perplexity": math.exp(loss), "accuracy": sums["hits"] / max(1.0, sums["targets"])}
    return {
        "loss": loss,
        "masked_accuracy": sums["hits"] / max(1.0, sums["targets"]),
        "nsp_loss": sums["nsp_loss"] / n,
        "nsp_accuracy": sums["nsp_hits"] / n,
    }


def pretrain(
    kind: str,
    model: nn.Module,
    data: StudyData,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    device: torch.device,
    backend: str,
    val_batch: Batch,
    progress: bool = True,
) -> dict:
    """Pretrain ``model`` (GPT: next token; BERT: masked tokens + next sentence) for ``steps`` steps.

    Returns the curve, the held-out metrics before and after, the tokens seen, and training tokens/s over the timed
    steps (all but the first, which pays for one-time set-up such as autotuning)."""
    opt = optimizer(model, lr, device)
    gen = torch.Generator().manual_seed(seed)  # the same seed for both models' data
    T, tokens = data.seqlen, batch * data.seqlen  # every row is full: no padding
    curve, timed_tokens, timed_s, ema = Curve(), 0, 0.0, None
    val_every = max(1, steps // 8)
    model.train()
    bar = _bar(steps, f"pretrain {kind.upper():4}", progress)
    start = evaluate(kind, model, val_batch, device, backend)
    for step in range(steps):
        if step % val_every == 0:
            curve.val_step.append(step)
            at = start if step == 0 else evaluate(kind, model, val_batch, device, backend)
            curve.val_loss.append(at["loss"])
        stream = data.train_stream
        b = gpt_batch(stream, T, batch, gen) if kind == "gpt" else bert_batch(stream, T, batch, data.vocab_size, gen)
        b = to_device(b, device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        sync(device)
        t0 = time.perf_counter()
        with running(device, backend):
            loss, parts = step_loss(kind, model, b)
        update(model, opt, loss)
        value = loss.item()  # synchronises
        if step > 0 or steps == 1:
            timed_s += time.perf_counter() - t0
            timed_tokens += tokens
        ema = value if ema is None else 0.9 * ema + 0.1 * value
        curve.step.append(step + 1)
        curve.tokens.append((step + 1) * tokens)
        curve.loss.append(value)
        for name, v in parts.items():
            curve.parts.setdefault(name, []).append(v)
        bar.set_postfix_str(f"loss {ema:.3f}", refresh=False)
        bar.update()
    bar.close()
    final = evaluate(kind, model, val_batch, device, backend)
    curve.val_step.append(steps)
    curve.val_loss.append(final["loss"])
    return {
        "curve": curve,
        "val_start": start,
        "val_final": final,
        "tokens_seen": steps * tokens,
        "train_seconds": timed_s,
        "train_tokens_per_s": timed_tokens / timed_s if timed_s > 0 else float("nan"),
    }


@torch.no_grad()
def accuracy(kind: str, model: nn.Module, dataset: ClassificationSet, device: torch.device, backend: str) -> float:
    """Classification accuracy of ``model`` on every row of ``dataset``."""
    model.eval()
    hits = 0
    with running(device, backend):
        for i in range(0, len(dataset), EVAL_CHUNK):
            b = to_device(dataset.rows(kind, torch.arange(i, min(i + EVAL_CHUNK, len(dataset)))), device)
            logits, _ = model(b["input_ids"])
            hits += (logits.argmax(-1) == b["labels"]).sum().item()
    model.train()
    return hits / max(1, len(dataset))


def majority_baseline(train: ClassificationSet, test: ClassificationSet) -> float:
    """Accuracy on ``test`` of always answering the most frequent class of ``train``."""
    majority = torch.bincount(train.labels).argmax()
    return (test.labels == majority).float().mean().item()


def finetune(
    kind: str,
    model: nn.Module,
    train_set: ClassificationSet,
    test_set: ClassificationSet,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    device: torch.device,
    backend: str,
    progress: bool = True,
) -> dict:
    """Fine-tune every weight of ``model`` on the classification task; held-out accuracy at the end.

    The learning rate warms up, then stays: a run this short has no time to anneal (it measured better)."""
    model.to(device).train()
    opt = optimizer(model, lr, device)
    order = torch.Generator().manual_seed(seed + 2)  # the same windows in the same order for GPT and BERT
    curve, ema = Curve(), None
    bar = _bar(steps, f"finetune {kind.upper():4}", progress)
    for step in range(steps):
        b = to_device(train_set.rows(kind, torch.randint(len(train_set), (batch,), generator=order)), device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, decay=False)
        with running(device, backend):
            _, loss = model(**b)
        update(model, opt, loss)
        value = loss.item()
        ema = value if ema is None else 0.9 * ema + 0.1 * value
        curve.step.append(step + 1)
        curve.loss.append(value)
        bar.set_postfix_str(f"loss {ema:.3f}", refresh=False)
        bar.update()
    bar.close()
    return {"curve": curve, "test_accuracy": accuracy(kind, model, test_set, device, backend)}
