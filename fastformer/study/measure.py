"""Efficiency probes, text samples, and the fused-vs-torch equivalence check.

Speed is timed per backend on the same trained weights: training tokens/s, inference latency per sequence,
KV-cache generation tokens/s, peak GPU memory. On a CPU only the torch backend is timed: the fused kernels run there
only in Triton's interpreter, which executes a kernel one program at a time in Python. The equivalence check runs
both backends from the same initial weights on the same batches and compares the losses step by step; on a CPU it is
the interpreter and is a correctness check, never a speed figure.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
from tokenizers import Tokenizer
from torch import nn

import fastformer
from fastformer.backends import device_reason
from fastformer.models import GPT
from fastformer.study.config import Preset
from fastformer.study.data import Batch, StudyData, bert_batch, gpt_batch, mask_tokens, spread, to_device
from fastformer.study.models import build
from fastformer.study.tokenizer import CLS, EOS, MASK, SEP, SPECIALS
from fastformer.study.train import optimizer, running, step_loss, sync, update

# the equivalence check's model: as small as the kernels allow, so that the interpreter finishes in seconds
CHECK = Preset("check", 2, 32, 2, 16, 2, 256, 0, 0, 0, 0, 1e-3, 1e-3, 2, 0.0)


def _median_s(fn: Callable[[], object], device: torch.device, reps: int = 5) -> float:
    """Median seconds of ``fn()`` over ``reps`` calls after one warm-up call."""
    fn()  # warm-up: autotuning, CUDA graph capture, allocator growth
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def inference_ms_per_sequence(model: nn.Module, batch: Batch, device: torch.device, backend: str) -> float:
    """Median forward time of one batch divided by its rows (eval mode, no gradients)."""
    model.eval()
    b = to_device(batch, device)
    b.pop("labels", None)
    b.pop("next_sentence_label", None)

    def forward() -> None:
        with running(device, backend):
            model(**b)

    seconds = _median_s(forward, device)
    model.train()
    return 1e3 * seconds / b["input_ids"].shape[0]


def generation_tokens_per_s(
    gpt: GPT, prompts: torch.Tensor, new_tokens: int, device: torch.device, backend: str
) -> float:
    """Greedy KV-cache decoding speed: new tokens per second over all rows (prompt processing included)."""
    ids = prompts.to(device)

    def generate() -> None:
        with running(device, backend):
            gpt.generate(ids, new_tokens)

    return ids.shape[0] * new_tokens / _median_s(generate, device, reps=3)


def train_probe(
    kind: str, model: nn.Module, data: StudyData, p: Preset, device: torch.device, backend: str, steps: int = 6
) -> dict:
    """Training speed and peak memory of a copy of ``model`` on ``backend``, over ``steps`` steps after a warm-up.

    Used on a GPU, where the backend not used for pretraining is timed too; the trained weights stay untouched.
    Peak memory counts what training adds to what was allocated before: the copy's weights, gradients, optimizer
    state and activations."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    probe = copy.deepcopy(model).train()
    opt = optimizer(probe, p.lr, device)
    gen = torch.Generator().manual_seed(0)
    stream, T = data.train_stream, data.seqlen
    batches = [
        gpt_batch(stream, T, p.batch, gen) if kind == "gpt" else bert_batch(stream, T, p.batch, data.vocab_size, gen)
        for _ in range(steps + 1)
    ]
    tokens, seconds = 0, 0.0
    for i, batch in enumerate(batches):
        b = to_device(batch, device)
        sync(device)
        t0 = time.perf_counter()
        with running(device, backend):
            loss, _ = step_loss(kind, probe, b)
        update(probe, opt, loss)
        sync(device)
        if i > 0:  # the first step autotunes
            seconds += time.perf_counter() - t0
            tokens += b["input_ids"].numel()
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
    return {"train_tokens_per_s": tokens / seconds, "peak_memory_mib": peak}


@torch.no_grad()
def generation_samples(
    gpt: GPT, tok: Tokenizer, data: StudyData, device: torch.device, backend: str, seed: int, n: int = 3
) -> list[dict]:
    """GPT continues the opening words of ``n`` held-out passages (top-k sampling with a fixed seed, KV cache)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    new = min(32, data.seqlen - 8)
    samples = []
    for p in spread(data.val, n):
        prompt = torch.tensor([[EOS, *p.ids[:6]]], device=device)
        with running(device, backend):
            out = gpt.generate(prompt, new, do_sample=True, top_k=20, temperature=0.8, generator=gen)
        samples.append(
            {"prompt": tok.decode(p.ids[:6]).strip(), "continuation": tok.decode(out[0, prompt.shape[1] :].tolist())}
        )
    return samples


def _word_position(tok: Tokenizer, ids: list[int]) -> int:
    """The position of the longest whole word (one token: a leading space, letters only, and the next token starts
    a new word), the most telling one to mask."""
    best, best_len = len(ids) // 2, 0
    pieces = [tok.decode([t]) for t in ids] + [" "]
    for i, piece in enumerate(pieces[:-1]):
        whole = piece.startswith(" ") and piece[1:].isalpha() and not pieces[i + 1][:1].isalpha()
        if whole and len(piece) > best_len:
            best, best_len = i, len(piece)
    return best


@torch.no_grad()
def fill_mask_samples(
    bert: nn.Module, tok: Tokenizer, data: StudyData, device: torch.device, backend: str, n: int = 3
) -> list[dict]:
    """BERT's top-3 guesses for one masked word in the first sentence of ``n`` held-out passages."""
    bert.eval()
    samples = []
    for p in spread(data.val, n):
        sentence = p.ids[: p.starts[1]] if len(p.starts) > 1 else p.ids
        pos = _word_position(tok, sentence)
        masked = [*sentence[:pos], MASK, *sentence[pos + 1 :]]
        ids = torch.tensor([[CLS, *masked, SEP]], device=device)
        with running(device, backend):
            logits = bert(ids).prediction_logits[0, pos + 1].float()  # +1: [CLS]
        logits[: len(SPECIALS)] = float("-inf")  # a word, not a control token
        top = logits.topk(3).indices.tolist()
        samples.append(
            {
                "text": tok.decode(sentence[:pos]).strip() + " [MASK]" + tok.decode(sentence[pos + 1 :]),
                "answer": tok.decode([sentence[pos]]).strip(),
                "guesses": [tok.decode([t]).strip() for t in top],
            }
        )
    bert.train()
    return samples


def _check_batch(kind: str, gen: torch.Generator) -> Batch:
    """Random tokens for the equivalence check (its subject is the arithmetic, not language); BERT's second row is
    padded, so the unpadded (varlen) attention path runs too."""
    B, T, V = CHECK.batch, CHECK.seqlen, CHECK.vocab
    ids = torch.randint(len(SPECIALS), V, (B, T), generator=gen)
    if kind == "gpt":
        return dict(input_ids=ids, labels=ids)
    ids[:, 0] = CLS
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, T - 4 :] = 0
    corrupted, labels = mask_tokens(ids.masked_fill(attention_mask == 0, 0), V, gen)
    return dict(
        input_ids=corrupted,
        attention_mask=attention_mask,
        labels=labels,
        next_sentence_label=torch.randint(2, (B,), generator=gen),
    )


def equivalence(device: torch.device, fused: str, steps: int, seed: int) -> dict:
    """Train a tiny GPT and BERT for ``steps`` steps with the torch backend and with ``fused`` from the same
    weights on the same batches; report both loss sequences and the largest difference."""
    why_not = device_reason(fused, device)
    if why_not is not None:
        return {"ran": False, "why_not": why_not}
    # fp32 everywhere: the interpreter computes in full precision, and on a GPU tf32 is off unless torch allows it
    tolerance = 1e-4 if device.type == "cpu" else 1e-3
    result: dict = {"ran": True, "backend": fused, "steps": steps, "tolerance": tolerance, "models": {}}
    t0 = time.perf_counter()
    for kind in ("gpt", "bert"):
        losses: dict[str, list[float]] = {}
        weights: dict[str, list[torch.Tensor]] = {}
        for backend in ("torch", fused):
            model = build(kind, CHECK, CHECK.vocab, seed).to(device)
            opt = optimizer(model, CHECK.lr, device)
            gen = torch.Generator().manual_seed(seed)
            losses[backend] = []
            for _ in range(steps):
                b = to_device(_check_batch(kind, gen), device)
                # exact_dropout: were dropout on, the torch backend would drop the elements the kernels drop
                with fastformer.use_backend(backend), fastformer.exact_dropout():
                    loss, _ = step_loss(kind, model, b)
                update(model, opt, loss)
                losses[backend].append(loss.item())
            weights[backend] = [w.detach().float().cpu() for w in model.parameters()]
        diff = max(abs(a - b) / max(1.0, abs(a)) for a, b in zip(losses["torch"], losses[fused]))
        # the weights after the updates: different code, so they differ in the last bits, but no more
        weight_diff = max(float((a - b).abs().max()) for a, b in zip(weights["torch"], weights[fused]))
        result["models"][kind] = {
            "losses": losses,
            "max_rel_diff": diff,
            "max_weight_diff": weight_diff,
            "equal": diff <= tolerance,
        }
    result["seconds"] = time.perf_counter() - t0
    result["equal"] = all(m["equal"] for m in result["models"].values())
    return result
