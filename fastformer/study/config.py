"""What a study run is: model presets, the user's options, and the one error type that means "bad input"."""

from __future__ import annotations

from dataclasses import dataclass


class StudyError(Exception):
    """Bad input (corpus, preset, device, backend, output directory): the CLI prints it on one line, exit code 2."""


@dataclass(frozen=True)
class Preset:
    """One matched size: GPT and BERT get the same layers, width, heads, sequence length and vocabulary."""

    name: str
    n_layer: int
    d_model: int
    n_head: int
    seqlen: int  # tokens per training sequence, and the models' position table
    batch: int  # sequences per optimizer step, for both models
    vocab: int  # BPE vocabulary requested from the tokenizer trainer (a small corpus may give fewer)
    steps: int  # pretraining steps per model
    quick_steps: int
    finetune_steps: int
    quick_finetune_steps: int
    lr: float  # peak AdamW learning rate in pretraining
    finetune_lr: float
    finetune_batch: int  # a classification row is one sequence, so fine-tuning takes more of them per step
    dropout: float  # one rate for every dropout in both models


PRESETS: dict[str, Preset] = {
    # CPU-sized. The quick tiny run (400 steps, 3 passes over the standard-library text) is what gets both models
    # past the plateau where they predict token frequencies and ignore the context (BERT's masked tokens need
    # attention for that, GPT's next token does not): with much fewer steps, fine-tuning starts from features that
    # say nothing about the text. No dropout: at this budget it only slows learning down.
    "tiny": Preset("tiny", 2, 64, 2, 64, 16, 1024, 1000, 400, 300, 200, 3e-3, 2e-3, 32, 0.0),
    "small": Preset("small", 4, 128, 4, 128, 16, 4096, 2000, 400, 400, 150, 1e-3, 1e-3, 32, 0.0),
    # BERT-base / GPT-2-small shapes, for a GPU
    "base": Preset("base", 12, 768, 12, 256, 32, 16384, 3000, 300, 500, 150, 3e-4, 1e-4, 32, 0.1),
}


@dataclass
class Options:
    """Everything ``fastformer compare`` takes; None means "the default for this device"."""

    quick: bool = False
    corpus: str | None = None  # a UTF-8 text file or a directory of them; None = the Python standard library
    device: str | None = None  # "cpu" or "cuda"; None = cuda when a GPU is present
    preset: str | None = None  # a key of PRESETS; None = tiny on CPU, small on a GPU
    steps: int | None = None  # pretraining steps per model; fine-tuning steps scale with it
    finetune_steps: int | None = None  # overrides the scaled fine-tuning steps (tests use it)
    backend: str = "auto"  # what trains: auto = the fused kernels on a GPU, the torch backend on a CPU
    out: str = "fastformer-compare"
    seed: int = 0
    equivalence_steps: int = 3  # fused-vs-torch correctness run (0 = skip)
    progress: bool = True  # tqdm bars


def resolve_preset(options: Options, device: str) -> Preset:
    """The preset named in ``options`` (or this device's default), as a StudyError if unknown."""
    name = options.preset or ("small" if device == "cuda" else "tiny")
    if name not in PRESETS:
        raise StudyError(f"--preset {name}: unknown preset; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def step_counts(options: Options, preset: Preset) -> tuple[int, int]:
    """(pretraining steps, fine-tuning steps) for this run."""
    full = preset.quick_steps if options.quick else preset.steps
    tune = preset.quick_finetune_steps if options.quick else preset.finetune_steps
    steps = full if options.steps is None else options.steps
    if steps < 1:
        raise StudyError(f"--steps {steps}: must be at least 1")
    if options.finetune_steps is not None:
        tune = options.finetune_steps
    elif options.steps is not None:  # keep the preset's ratio of fine-tuning to pretraining
        tune = max(1, round(tune * steps / full))
    if tune < 1:
        raise StudyError(f"fine-tuning steps {tune}: must be at least 1")
    return steps, tune
