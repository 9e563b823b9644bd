"""The report's three PNG figures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never open a window, work on a headless machine

import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen before pyplot is imported

COLORS = {"gpt": "tab:blue", "bert": "tab:orange"}
LABELS = {"gpt": "GPT", "bert": "BERT"}


def _smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average, as the progress bars show it."""
    out, ema = [], None
    for v in values:
        ema = v if ema is None else weight * ema + (1 - weight) * v
        out.append(ema)
    return out


def loss_curves(result: dict, path: Path) -> None:
    """Pretraining (training loss smoothed, held-out loss as dots) and fine-tuning loss of both models."""
    fig, (pre, tune) = plt.subplots(1, 2, figsize=(11, 4))
    for kind, m in result["models"].items():
        c = m["curve"]
        # BERT minimises masked-token + next-sentence loss; its masked-token part is what the held-out dots measure
        train = c["parts"]["mlm"] if kind == "bert" else c["loss"]
        pre.plot(c["step"], _smooth(train), color=COLORS[kind], label=f"{LABELS[kind]} training (smoothed)")
        pre.plot(c["val_step"], c["val_loss"], "o--", color=COLORS[kind], label=f"{LABELS[kind]} held-out")
        f = m["finetune_curve"]
        tune.plot(f["step"], _smooth(f["loss"], 0.8), color=COLORS[kind], label=LABELS[kind])
    pre.axhline(result["unigram_loss"], color="gray", ls=":", label="token frequencies alone")
    pre.set(title="Pretraining: GPT next-token, BERT masked-token loss", xlabel="step", ylabel="cross-entropy")
    n = len(result["corpus"]["classes"])
    tune.set(title=f"Fine-tuning: which of {n} classes a passage is from", xlabel="step", ylabel="cross-entropy")
    for ax in (pre, tune):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def accuracy_bars(result: dict, path: Path) -> None:
    """Held-out accuracies after pretraining and after fine-tuning, with the majority-class baseline."""
    gpt, bert = result["models"]["gpt"], result["models"]["bert"]
    names = ["GPT\nnext token", "BERT\nmasked token", "BERT\nnext sentence", "GPT\nfine-tuned", "BERT\nfine-tuned"]
    values = [
        gpt["val_final"]["accuracy"],
        bert["val_final"]["masked_accuracy"],
        bert["val_final"]["nsp_accuracy"],
        gpt["finetune_accuracy"],
        bert["finetune_accuracy"],
    ]
    colors = [COLORS["gpt"], COLORS["bert"], COLORS["bert"], COLORS["gpt"], COLORS["bert"]]
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar(names, values, color=colors)
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.axhline(result["majority_baseline"], color="gray", ls="--", label="most frequent class (fine-tuning task)")
    ax.axhline(0.5, color="gray", ls=":", label="chance for next sentence")
    ax.set(ylim=(0, 1), ylabel="held-out accuracy", title="Accuracy on held-out passages")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _si(v: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def throughput_bars(result: dict, path: Path) -> None:
    """Training tokens/s, inference latency and generation tokens/s per backend and model."""
    eff = result["efficiency"]
    backends = list(eff)
    panels = [
        ("train_tokens_per_s", "training tokens/s (higher is better)", ("gpt", "bert")),
        ("inference_ms_per_sequence", "inference ms per sequence (lower is better)", ("gpt", "bert")),
        ("generation_tokens_per_s", "GPT generation tokens/s, KV cache (higher is better)", ("gpt",)),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (key, title, kinds) in zip(axes, panels):
        width = 0.7 / len(kinds)
        for j, kind in enumerate(kinds):
            xs = [i + (j - (len(kinds) - 1) / 2) * width for i in range(len(backends))]
            ys = [eff[b][kind].get(key) or 0.0 for b in backends]
            bars = ax.bar(xs, ys, width, color=COLORS[kind], label=LABELS[kind])
            ax.bar_label(bars, labels=[_si(y) for y in ys], fontsize=8)
        ax.set_xticks(range(len(backends)), [f"{b} backend" for b in backends])
        ax.set_xlim(-0.6, len(backends) - 0.4)
        ax.margins(y=0.15)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8, loc="lower right")
    env = result["environment"]
    if env["device"] == "cpu":
        fig.suptitle(
            "CPU: the torch backend only. Fused kernels are timed on a GPU; on a CPU they run in Triton's interpreter "
            "(a correctness check, not a speed figure).",
            fontsize=9,
        )
    else:
        fig.suptitle(f"{env['device_name']}: torch backend vs fused kernels, same weights", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(result: dict, out: Path) -> list[str]:
    """Write the three figures into ``out``; returns their file names."""
    figures = {"loss_curves.png": loss_curves, "accuracy.png": accuracy_bars, "throughput.png": throughput_bars}
    for name, draw in figures.items():
        draw(result, out / name)
    return list(figures)
