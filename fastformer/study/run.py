"""The study from start to end: check the input, pretrain, evaluate, measure, fine-tune, report.

Everything is checked before any work starts, and every file is written to a staging directory first and moved into
``--out`` only when the whole run has succeeded: a bad input or a crash leaves ``--out`` as it was.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import fastformer
from fastformer.backends import available_backends, device_reason
from fastformer.study import measure, report
from fastformer.study.config import Options, Preset, StudyError, resolve_preset, step_counts
from fastformer.study.corpus import Corpus, load_corpus
from fastformer.study.data import (
    StudyData,
    bert_eval_set,
    build_data,
    classification_set,
    gpt_eval_set,
    spread,
    unigram_loss,
)
from fastformer.study.models import build, classifier, flops_per_token, n_params
from fastformer.study.tokenizer import EOS, load_or_train
from fastformer.study.train import finetune, majority_baseline, pretrain

KINDS = ("gpt", "bert")
EVAL_ROWS = 64  # held-out rows in each pretraining evaluation


@dataclass
class Plan:
    """The checked options: what runs where."""

    device: torch.device
    preset: Preset
    steps: int
    finetune_steps: int
    train_backend: str  # what pretraining and fine-tuning run on
    fused: str  # the fused backend compared with torch (timed on a GPU, equivalence-checked everywhere)
    out: Path


def _device(options: Options) -> torch.device:
    name = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise StudyError(f"--device {name}: unknown device; choose cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise StudyError("--device cuda: no CUDA GPU is available to torch on this machine")
    return torch.device(name)


def _backends(options: Options, device: torch.device) -> tuple[str, str]:
    """(training backend, fused backend to compare with torch)."""
    if options.backend not in ("auto", *fastformer.BACKENDS):
        raise StudyError(f"--backend {options.backend}: unknown backend; choose auto, {', '.join(fastformer.BACKENDS)}")
    fused_ok = [b for b in ("triton", "cuda") if b in available_backends(device)]
    if options.backend == "auto":
        # a GPU trains on the fused kernels; a CPU on the torch backend, its fast path
        train = fused_ok[0] if device.type == "cuda" and fused_ok else "torch"
    else:
        why = device_reason(options.backend, device)
        if why is not None:
            raise StudyError(f"--backend {options.backend}: cannot run on {device.type}: {why}")
        train = options.backend
    fused = train if train != "torch" else (fused_ok[0] if fused_ok else "triton")
    return train, fused


def _out_dir(options: Options) -> Path:
    out = Path(options.out)
    if out.exists() and not out.is_dir():
        raise StudyError(f"--out {out}: exists and is not a directory")
    return out


def plan(options: Options) -> Plan:
    """Check every option (StudyError on the first bad one) before any work starts."""
    device = _device(options)
    preset = resolve_preset(options, device.type)
    steps, tune = step_counts(options, preset)
    train, fused = _backends(options, device)
    return Plan(device, preset, steps, tune, train, fused, _out_dir(options))


def _staging(out: Path) -> Path:
    """A fresh directory on the same file system as ``out`` (so the final moves are renames)."""
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    try:
        return Path(tempfile.mkdtemp(prefix=f".{out.name or 'out'}-staging-", dir=parent))
    except OSError as e:
        raise StudyError(f"--out {out}: cannot write in {parent} ({e.strerror or e})") from None


def _publish(staging: Path, out: Path) -> None:
    """Move every staged file into ``out``: each move is an atomic rename."""
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(staging.iterdir()):
        os.replace(f, out / f.name)


def _explain(p: Plan, options: Options) -> list[str]:
    """What runs where, said before anything runs."""
    size = p.preset
    lines = [
        f"== fastformer compare: GPT vs BERT on {p.device.type}, preset {size.name} ({size.n_layer} layers, width "
        f"{size.d_model}, {size.n_head} heads, {size.seqlen}-token sequences), {p.steps} pretraining + "
        f"{p.finetune_steps} fine-tuning steps each, seed {options.seed}",
    ]
    if p.device.type == "cpu" and p.train_backend != "torch":
        lines.append(
            f"   training: the {p.train_backend} backend through Triton's CPU interpreter, as asked: very slow, and "
            "its timings are not speed figures (the CPU's fast path is --backend torch)"
        )
    elif p.device.type == "cpu":
        lines.append("   training and every speed figure: the torch backend (PyTorch ops, fp32), the CPU's fast path")
        if options.equivalence_steps:
            lines.append(
                "   fused kernels: Triton's CPU interpreter, only in a short equivalence check at a toy size "
                "(same losses as torch?); interpreter timings are not speed figures"
            )
    else:
        lines.append(f"   training: the {p.train_backend} backend, bf16 autocast; speed timed for torch and {p.fused}")
    return lines


def _cpu_name() -> str:
    """The processor's model name (Linux), else what platform knows, else "cpu"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _environment(p: Plan) -> dict:
    import tokenizers
    import triton

    name = torch.cuda.get_device_name(p.device) if p.device.type == "cuda" else _cpu_name()
    return {
        "fastformer": fastformer.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "tokenizers": tokenizers.__version__,
        "device": p.device.type,
        "device_name": name,
        "cpu_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _efficiency(p: Plan, models: dict, data: StudyData, val: dict, pre: dict) -> dict:
    """Speed per backend on the pretrained weights: torch on every device, the fused backend on a GPU too."""
    rows = {}
    cpu = p.device.type == "cpu"
    backends = [p.train_backend] if cpu else list(dict.fromkeys([p.train_backend, "torch", p.fused]))
    prompts = torch.tensor([[EOS, *v.ids[:8]] for v in spread([v for v in data.val if len(v.ids) >= 8], 4)])
    new = min(32, p.preset.seqlen - prompts.shape[1])
    for backend in backends:
        rows[backend] = {}
        for kind in KINDS:
            model = models[kind]
            if cpu:  # the pretraining run is this backend's training measurement
                row = {"train_tokens_per_s": pre[kind]["train_tokens_per_s"], "peak_memory_mib": None}
            else:
                row = measure.train_probe(kind, model, data, p.preset, p.device, backend)
            batch = {k: v[: p.preset.batch] for k, v in val[kind].items()}  # one training-sized batch
            row["inference_ms_per_sequence"] = measure.inference_ms_per_sequence(model, batch, p.device, backend)
            if kind == "gpt":
                row["generation_tokens_per_s"] = measure.generation_tokens_per_s(model, prompts, new, p.device, backend)
            rows[backend][kind] = row
    return rows


def run_study(options: Options) -> dict:
    """Run the study described by ``options``; write the report to ``options.out``; return every number."""
    t_start = time.perf_counter()
    p = plan(options)
    for line in _explain(p, options):
        print(line, flush=True)
    phases: dict[str, float] = {}
    clock = [time.perf_counter()]

    def phase(name: str) -> None:
        now = time.perf_counter()
        phases[name] = now - clock[0]
        clock[0] = now

    corpus: Corpus = load_corpus(options.corpus, options.quick)
    print(
        f"   corpus: {corpus.source}: {len(corpus.documents)} documents, {corpus.n_chars:,} characters, "
        f"{corpus.n_sentences:,} sentences; fine-tuning task: {corpus.task}",
        flush=True,
    )
    phase("corpus")
    staging = _staging(p.out)
    try:
        result = _study(p, options, corpus, staging, phase)
        result["timing"] = {"phases_s": phases, "study_s": time.perf_counter() - t_start}
        report.write(result, staging)
        _publish(staging, p.out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report.print_summary(result, p.out)
    return result


def _study(p: Plan, options: Options, corpus: Corpus, staging: Path, phase: Callable[[str], None]) -> dict:
    """Everything after the corpus is loaded; files go to ``staging``."""
    tok, cached = load_or_train(corpus, p.preset.vocab, p.out, staging)
    data = build_data(corpus, tok, p.preset.seqlen)
    T, n_classes = p.preset.seqlen, len(data.classes)
    train_set, test_set = classification_set(data.train, n_classes, T), classification_set(data.val, n_classes, T)
    if len(set(test_set.labels.tolist())) < 2 or len(set(train_set.labels.tolist())) < 2:
        raise StudyError(f"{corpus.source}: too small: the held-out text does not cover two classes")
    if data.val_stream.ids.numel() < 2 * T or data.train_stream.ids.numel() < 8 * T:
        raise StudyError(f"{corpus.source}: too small for {T}-token sequences")
    phase("tokenizer")
    seed, size = options.seed, p.preset
    val = {
        "gpt": gpt_eval_set(data.val_stream, T, EVAL_ROWS),
        "bert": bert_eval_set(data.val_stream, T, EVAL_ROWS, data.vocab_size, seed),
    }
    models, pre = {}, {}
    for kind in KINDS:
        models[kind] = build(kind, size, data.vocab_size, seed).to(p.device)
        pre[kind] = pretrain(
            kind, models[kind], data, p.steps, size.batch, size.lr, seed, p.device, p.train_backend, val[kind],
            options.progress,
        )  # fmt: skip
        phase(f"pretrain_{kind}")
    samples = {
        "generation": measure.generation_samples(models["gpt"], tok, data, p.device, p.train_backend, seed),
        "fill_mask": measure.fill_mask_samples(models["bert"], tok, data, p.device, p.train_backend),
    }
    efficiency = _efficiency(p, models, data, val, pre)
    phase("samples_and_speed")
    steps = options.equivalence_steps
    equivalence = measure.equivalence(p.device, p.fused, steps, seed) if steps > 0 else {"ran": False, "why_not": "off"}
    phase("equivalence")
    tuned = {}
    for kind in KINDS:
        head = classifier(kind, models[kind], n_classes, seed).to(p.device)
        tuned[kind] = finetune(
            kind, head, train_set, test_set, p.finetune_steps, size.finetune_batch, size.finetune_lr, seed, p.device,
            p.train_backend, options.progress,
        )  # fmt: skip
        phase(f"finetune_{kind}")
    return {
        "environment": _environment(p),
        "setup": {
            "preset": asdict(size),
            "quick": options.quick,
            "steps": p.steps,
            "finetune_steps": p.finetune_steps,
            "seed": seed,
            "train_backend": p.train_backend,
            "fused_backend": p.fused,
            "explain": _explain(p, options),
        },
        "corpus": {
            "source": corpus.source,
            "sha256": corpus.digest(),
            "documents": len(corpus.documents),
            "characters": corpus.n_chars,
            "sentences": corpus.n_sentences,
            "classes": data.classes,
            "task": corpus.task,
        },
        "tokenizer": {"vocab_size": data.vocab_size, "from_cache": cached},
        "data": {
            "train_passages": len(data.train),
            "val_passages": len(data.val),
            "train_tokens": data.train_stream.ids.numel(),
            "val_tokens": data.val_stream.ids.numel(),
            "eval_rows": EVAL_ROWS,
            "finetune_train_examples": len(train_set),
            "finetune_test_examples": len(test_set),
        },
        "models": {
            kind: {
                "parameters": n_params(models[kind]),
                "flops_per_token": flops_per_token(models[kind], size.seqlen),
                "pretrain": {k: v for k, v in pre[kind].items() if k not in ("curve", "val_start", "val_final")},
                "curve": asdict(pre[kind]["curve"]),
                "val_start": pre[kind]["val_start"],
                "val_final": pre[kind]["val_final"],
                "finetune_curve": asdict(tuned[kind]["curve"]),
                "finetune_accuracy": tuned[kind]["test_accuracy"],
            }
            for kind in KINDS
        },
        "majority_baseline": majority_baseline(train_set, test_set),
        "unigram_loss": unigram_loss(data.train_stream, data.val_stream, data.vocab_size),
        "samples": samples,
        "efficiency": efficiency,
        "equivalence": equivalence,
    }
