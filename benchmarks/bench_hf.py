"""Drop-in benchmark: transformers GPT-2 and BERT as they are, compiled, patched by fastformer, patched + compiled.

Rows (bf16 autocast over fp32 weights for training, AdamW step included; bf16 weights for inference):

- train gpt2: GPT-2 124M (``GPT2LMHeadModel``), batch 8 x 1024 tokens, no padding;
- train bert: BERT-base MLM (``BertForMaskedLM``), batch 32 x 512 with lengths drawn uniformly from [64, 512]
  (about 44% padding, as in real sentence-pair data), 15% of the real tokens predicted;
- infer bert: ``BertModel`` forward on the same padded batch.

Providers on identical weights and inputs: ``eager`` (transformers' default, ``attn_implementation="sdpa"``),
``compile`` (``torch.compile`` of it), ``patched`` (``fastformer.patch``: fused attention, which runs the padded
BERT batch unpadded, fused residual + dropout + LayerNorm and feed-forward) and ``patched+compile``. Reported: ms
per step, real (non-padding) tokens per second, speedup over eager and peak memory above the weights and
optimizer state. Without a GPU, ``--quick`` runs tiny models on the torch backend (a smoke test of the wiring);
compiled providers run on GPUs only, and not with ``--quick`` (compiling GPT-2 twice takes longer than the
GPU check gives a benchmark).
"""

from __future__ import annotations

import copy
import gc
from collections.abc import Callable
from typing import Any

import torch
from fastformer.benchmarks import common

import fastformer


def _model(kind: str, dev: torch.device) -> torch.nn.Module:
    import transformers

    big = dev.type == "cuda"
    if kind == "gpt2":
        cfg = transformers.GPT2Config(**({} if big else common.TINY_GPT), bos_token_id=0, eos_token_id=0)
        cls = transformers.GPT2LMHeadModel
    else:
        cfg = transformers.BertConfig(**({} if big else common.TINY_BERT))
        cls = transformers.BertForMaskedLM if kind == "train bert" else transformers.BertModel
    torch.manual_seed(0)
    return cls._from_config(cfg, attn_implementation="sdpa").to(dev)


def _batch(kind: str, vocab: int, batch: int, seqlen: int, dev: torch.device) -> tuple[dict, int]:
    """(inputs, real tokens)."""
    g = torch.Generator().manual_seed(0)
    if kind == "gpt2":
        ids = torch.randint(0, vocab, (batch, seqlen), generator=g)
        return dict(input_ids=ids.to(dev), labels=ids.to(dev)), batch * seqlen
    lengths = torch.randint(min(64, seqlen), seqlen + 1, (batch,), generator=g)
    mask = (torch.arange(seqlen)[None] < lengths[:, None]).long()
    ids = torch.randint(1, vocab, (batch, seqlen), generator=g) * mask
    inputs = dict(input_ids=ids, attention_mask=mask)
    if kind == "train bert":
        inputs["labels"] = torch.where((torch.rand(batch, seqlen, generator=g) < 0.15) & (mask == 1), ids, -100)
    return {k: v.to(dev) for k, v in inputs.items()}, int(lengths.sum())


def _providers(base: torch.nn.Module, compiled: bool) -> dict[str, Callable[[], torch.nn.Module]]:
    """Name -> a function building that provider's model from a copy of ``base`` (built one at a time)."""
    out: dict[str, Callable[[], torch.nn.Module]] = {
        "eager": lambda: copy.deepcopy(base),
        "patched": lambda: fastformer.patch(copy.deepcopy(base)),
    }
    if compiled:
        out["compile"] = lambda: torch.compile(copy.deepcopy(base))
        out["patched+compile"] = lambda: torch.compile(fastformer.patch(copy.deepcopy(base)))
    return out


def bench_task(kind: str, args: Any, dev: torch.device) -> list[dict[str, Any]]:
    """One task ("gpt2", "train bert", "infer bert") over every provider."""
    on_gpu = dev.type == "cuda"
    train = kind != "infer bert"
    shape = (8, 1024) if kind == "gpt2" else (32, 512)
    if not on_gpu:
        shape = (2, 64)
    elif args.quick:
        shape = (shape[0] // 2, shape[1])
    base = _model(kind, dev)
    amp = getattr(torch, args.dtype)
    if not train:
        base = base.to(amp).eval()
    inputs, tokens = _batch(kind, base.config.vocab_size, *shape, dev)
    providers = _providers(base, on_gpu and not args.quick and not args.no_compile)
    task = ("train gpt2" if kind == "gpt2" else kind) + f" B{shape[0]} S{shape[1]}"
    rows, eager_ms = [], None
    for name, build in providers.items():
        model = build()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=on_gpu) if train else None

        def infer(model: torch.nn.Module = model) -> None:
            with torch.no_grad():
                model(**inputs)

        step = common.train_step(model, opt, inputs, amp, dev.type) if train else infer

        try:
            iters = (3 if args.quick else 10) if on_gpu else 2
            ms = common.time_ms(step, warmup=2 if on_gpu else 1, iters=iters)
            mem = common.peak_mem_mb(step)
        except Exception as e:  # noqa: BLE001 - a failing provider is reported, not fatal
            rows.append({"task": task, "provider": name, "error": str(e)[:160]})
            print(rows[-1], flush=True)
            continue
        finally:
            del model, opt, step  # free this provider's weights and optimizer state before the next one
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()
        eager_ms = ms if name == "eager" else eager_ms
        row = {
            "task": task,
            "provider": name,
            "ms": ms,
            "tokens_per_s": tokens / ms * 1e3,
            "vs_eager": eager_ms / ms if eager_ms else None,
            "peak_mem_mb": mem,
        }
        rows.append({k: v for k, v in row.items() if v is not None})
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = common.parser(__doc__.splitlines()[0], "hf").parse_args(argv)
    dev = common.device()
    rows = []
    for kind in ("gpt2", "train bert", "infer bert"):
        rows += bench_task(kind, args, dev)
    # one bar group per task (its name carries the batch shape), each provider against transformers as it is
    return common.finish("hf", rows, args, plot=common.PlotSpec(baseline=("eager",)))


if __name__ == "__main__":
    main()
