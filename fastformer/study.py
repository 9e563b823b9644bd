"""The demo study: GPT vs BERT, each trained with and without fastformer's fused kernels.

A tiny GPT learns next-byte prediction and a tiny BERT learns masked-byte prediction on a small built-in
English corpus (byte-level tokens, no downloads). Each model trains twice from the same seed: once on the
pure-PyTorch backend and once on the fused backend (Triton on a GPU; on a CPU, Triton's interpreter, which
is slow, so the CPU run uses few steps and tiny models). Reported per run: final training loss, held-out
accuracy (next-byte for GPT, masked-byte for BERT), training tokens per second and peak memory (GPU only).

    python -c "from fastformer.study import run_study; run_study()"
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from fastformer.models.bert import BertForMaskedLM
from fastformer.models.config import BertConfig, GPTConfig
from fastformer.models.gpt import GPT

CORPUS = """\
A transformer reads a sequence of tokens and turns each one into a vector. Every layer lets each position look \
at the others through attention, then passes the result through a small feed-forward network. Between the two \
sits a normalisation step that keeps the numbers in a healthy range, and a residual path that carries the input \
around each block so that deep stacks still train.
Two families grew from this design. The decoder family, of which GPT is the best known, reads left to right and \
learns to guess the next token; a causal mask hides the future from every position. The encoder family, of which \
BERT is the classic example, reads the whole sentence at once and learns to fill in words that were hidden from \
it. Decoders write text; encoders understand it, and feed classifiers, search engines and sentence embeddings.
On a graphics processor most of the time goes to three places. The first is attention, where a naive program \
builds a square table of scores for every pair of positions and writes it to memory, then reads it back to \
normalise it and again to mix the values. A fused kernel instead walks over blocks of keys, keeps a running \
maximum and a running sum, and never stores the square table at all. Memory then grows with the length of the \
sequence rather than with its square, and the same trick runs backwards for the gradients.
The second place is the feed-forward block: a matrix product, a bias, a smooth activation such as the Gaussian \
error linear unit, and a second product. Done step by step, the wide intermediate activation crosses memory \
several times. Fused, the bias and the activation happen while the product is still in registers.
The third is normalisation with its residual add and dropout. Each of these is cheap in arithmetic but costs a \
full trip through memory, so doing them in one pass saves time even though no multiplication is avoided.
Encoders bring one more problem: batches of sentences have different lengths, and the short ones are padded. A \
padded token costs as much as a real one unless the program removes it. Packing the real tokens together, \
running every layer on the packed rows, and scattering the result back at the end makes the cost follow the \
real text instead of the longest sentence in the batch.
None of this changes what the model computes. The same weights give the same answers, up to rounding, whether \
the kernels are fused or not, and a model trained one way can be loaded and used the other way. The only thing \
that should change is how long the work takes and how much memory it needs.
"""

MASK_ID = 256  # byte tokens are 0..255; BERT's [MASK] is one more
VOCAB = 257


def _data(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The corpus as byte ids, split 90% / 10% into training and held-out text."""
    ids = torch.tensor(list(CORPUS.encode("utf-8")), dtype=torch.long, device=device)
    cut = int(0.9 * ids.numel())
    return ids[:cut], ids[cut:]


def _windows(data: torch.Tensor, batch: int, seqlen: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, data.numel() - seqlen, (batch,), generator=gen)
    return torch.stack([data[s : s + seqlen] for s in starts.tolist()])  # (B, T)


def _mask(ids: torch.Tensor, gen: torch.Generator, rate: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style corruption: ``rate`` of positions become [MASK]; labels are -100 elsewhere."""
    chosen = torch.rand(ids.shape, generator=gen).to(ids.device) < rate
    chosen[:, 0] |= ~chosen.any(dim=1)  # at least one target per row
    return ids.masked_fill(chosen, MASK_ID), ids.masked_fill(~chosen, -100)


def _sizes(device: torch.device, quick: bool) -> dict[str, int]:
    if device.type == "cuda":
        return dict(d=256, layers=4, heads=4, seqlen=128, batch=32, steps=150 if quick else 400)
    # Triton's interpreter costs ~1 s per tiny training step: one 32-token tile per GEMM keeps it at that
    return dict(d=32, layers=2, heads=2, seqlen=16, batch=2, steps=12 if quick else 40)


def _model(kind: str, size: dict[str, int], backend: str) -> torch.nn.Module:
    torch.manual_seed(0)
    d, n, h, t = size["d"], size["layers"], size["heads"], size["seqlen"]
    if kind == "gpt":
        cfg = GPTConfig(vocab_size=VOCAB, n_positions=t, n_embd=d, n_layer=n, n_head=h, backend=backend)
        return GPT(cfg)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=d, num_hidden_layers=n, num_attention_heads=h, intermediate_size=4 * d,
        max_position_embeddings=t, type_vocab_size=1, pad_token_id=0, backend=backend,
    )  # fmt: skip
    return BertForMaskedLM(cfg)


def _batch(kind: str, data: torch.Tensor, size: dict[str, int], gen: torch.Generator) -> dict[str, torch.Tensor]:
    ids = _windows(data, size["batch"], size["seqlen"], gen)
    if kind == "gpt":
        return dict(input_ids=ids, labels=ids)
    corrupted, labels = _mask(ids, gen)
    return dict(input_ids=corrupted, labels=labels)


@torch.no_grad()
def _accuracy(kind: str, model: torch.nn.Module, data: torch.Tensor, size: dict[str, int]) -> float:
    """Next-byte accuracy (GPT) or masked-byte accuracy (BERT) on held-out windows, same windows every run."""
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    t = size["seqlen"]
    windows = 64 if data.device.type == "cuda" else 16
    starts = torch.linspace(0, data.numel() - t, windows).long().tolist()
    ids = torch.stack([data[s : s + t] for s in starts])  # (N, T)
    if kind == "gpt":
        pred = model(ids).logits[:, :-1].argmax(-1)
        acc = (pred == ids[:, 1:]).float().mean().item()
    else:
        corrupted, labels = _mask(ids, gen)
        pred = model(corrupted).logits.argmax(-1)
        keep = labels != -100
        acc = (pred[keep] == labels[keep]).float().mean().item()
    model.train()
    return acc


def _train(kind: str, backend: str, size: dict[str, int], device: torch.device) -> dict[str, Any]:
    train_data, eval_data = _data(device)
    model = _model(kind, size, backend).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2 if device.type == "cpu" else 1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    amp = dict(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, t0 = [], 0.0
    for step in range(size["steps"]):
        if step == 1:  # the first step pays for compilation / autotuning
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
        batch = _batch(kind, train_data, size, gen)
        with torch.autocast(**amp):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    elapsed = time.perf_counter() - t0
    timed_steps = max(1, size["steps"] - 1)
    with torch.autocast(**amp):
        acc = _accuracy(kind, model, eval_data, size)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "model": kind,
        "backend": backend,
        "steps": size["steps"],
        "final_loss": sum(losses[-3:]) / len(losses[-3:]),
        "accuracy": acc,
        "tokens_per_s": timed_steps * size["batch"] * size["seqlen"] / elapsed if elapsed > 0 else float("nan"),
        "peak_mem_mb": peak,
    }


def _print_table(rows: list[dict[str, Any]], device: torch.device) -> None:
    print(f"== GPT vs BERT, torch vs fused backend, on {device} (byte-level, built-in corpus)")
    head = f"{'model':>5}  {'backend':>7}  {'steps':>5}  {'loss':>7}  {'accuracy':>8}  {'tokens/s':>9}  {'peak MiB':>8}"
    print(head)
    for r in rows:
        mem = f"{r['peak_mem_mb']:.0f}" if r["peak_mem_mb"] is not None else "-"
        print(
            f"{r['model']:>5}  {r['backend']:>7}  {r['steps']:>5}  {r['final_loss']:7.3f}  {r['accuracy']:8.3f}  "
            f"{r['tokens_per_s']:9.0f}  {mem:>8}"
        )
    print("accuracy: next-byte (gpt) / masked-byte (bert) on held-out text; the fused rows should track torch's.")


def run_study(device: str | torch.device | None = None, steps: int | None = None, quick: bool = False) -> dict:
    """Train GPT and BERT with the torch and the fused backend; print a table and return the rows.

    device: default cuda if available, else cpu (where the fused backend is Triton's interpreter, which
    needs TRITON_INTERPRET=1 set before triton is imported). steps: training steps per run (default by
    device and ``quick``).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = _sizes(device, quick)
    if steps is not None:
        size["steps"] = steps
    fused = "triton"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        print("TRITON_INTERPRET is not set: the CPU study runs the torch backend only")
        fused = None
    rows = []
    for kind in ("gpt", "bert"):
        for backend in ("torch", fused):
            if backend is not None:
                rows.append(_train(kind, backend, size, device))
    _print_table(rows, device)
    return {"device": str(device), "sizes": size, "rows": rows}


if __name__ == "__main__":
    run_study(quick=True)
