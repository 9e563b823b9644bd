"""The study's results as a terminal table, a one-paragraph conclusion, ``report.md``, ``study.json`` and plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fastformer.study import plots

JSON_NAME, REPORT_NAME = "study.json", "report.md"
# nats below the token-frequency loss that show a model uses the context (BERT gets a little below it without: a
# tenth of its targets are shown unmasked)
USES_CONTEXT = 0.3


def _num(v: Any, fmt: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, fmt) if isinstance(v, (int, float)) else str(v)


def _si(v: float | None) -> str:
    """3 significant digits with a k/M/G suffix."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def rows(result: dict) -> list[tuple[str, str, str]]:
    """(metric, GPT, BERT) rows shared by the terminal table and the Markdown report."""
    g, b = result["models"]["gpt"], result["models"]["bert"]
    n_classes = len(result["corpus"]["classes"])
    out = [
        ("parameters", _si(g["parameters"]), _si(b["parameters"])),
        ("FLOPs per token, forward", _si(g["flops_per_token"]["forward"]), _si(b["flops_per_token"]["forward"])),
        (
            "pretraining tokens",
            _si(g["pretrain"]["tokens_seen"]),
            _si(b["pretrain"]["tokens_seen"]),
        ),
        (
            "held-out loss, start -> end",
            f"{g['val_start']['loss']:.2f} -> {g['val_final']['loss']:.2f}",
            f"{b['val_start']['loss']:.2f} -> {b['val_final']['loss']:.2f}",
        ),
        (
            "held-out loss of token frequencies alone",
            _num(result["unigram_loss"], ".2f"),
            _num(result["unigram_loss"], ".2f"),
        ),
        ("held-out perplexity (GPT)", _num(g["val_final"]["perplexity"], ".1f"), "-"),
        (
            "next-token / masked-token accuracy",
            _num(g["val_final"]["accuracy"]),
            _num(b["val_final"]["masked_accuracy"]),
        ),
        ("next-sentence accuracy (chance 0.5)", "-", _num(b["val_final"]["nsp_accuracy"])),
        (
            f"fine-tuned accuracy, {n_classes} classes (majority {result['majority_baseline']:.3f})",
            _num(g["finetune_accuracy"]),
            _num(b["finetune_accuracy"]),
        ),
    ]
    for backend, per in result["efficiency"].items():
        out += [
            (
                f"training tokens/s [{backend}]",
                _si(per["gpt"]["train_tokens_per_s"]),
                _si(per["bert"]["train_tokens_per_s"]),
            ),
            (
                f"inference ms per sequence [{backend}]",
                _num(per["gpt"]["inference_ms_per_sequence"], ".2f"),
                _num(per["bert"]["inference_ms_per_sequence"], ".2f"),
            ),
            (f"generation tokens/s, KV cache [{backend}]", _si(per["gpt"]["generation_tokens_per_s"]), "-"),
        ]
        if result["environment"]["device"] == "cuda":
            out.append(
                (
                    f"peak GPU memory MiB, training [{backend}]",
                    _num(per["gpt"]["peak_memory_mib"], ".0f"),
                    _num(per["bert"]["peak_memory_mib"], ".0f"),
                )
            )
    return out


def equivalence_line(eq: dict, device: str) -> str:
    if not eq.get("ran"):
        return f"fused-vs-torch equivalence check: not run ({eq.get('why_not')})"
    where = "Triton's CPU interpreter" if device == "cpu" else f"the {eq['backend']} kernels"
    verdict = "same losses" if eq["equal"] else "LOSSES DIFFER"
    diffs = ", ".join(f"{k.upper()} {m['max_rel_diff']:.1e}" for k, m in eq["models"].items())
    weights = max(m["max_weight_diff"] for m in eq["models"].values())
    label = "a correctness check, not a speed figure" if device == "cpu" else "a correctness check"
    return (
        f"fused-vs-torch equivalence ({where}, toy size, {eq['steps']} training steps per model): {verdict} "
        f"(largest relative loss difference {diffs}, tolerance {eq['tolerance']:.0e}; weights afterwards within "
        f"{weights:.1e}) -- {label}"
    )


def _learned(m: dict, unigram: float) -> str:
    """How the held-out loss moved, and where it ended against predicting by token frequencies alone."""
    start, end = m["val_start"]["loss"], m["val_final"]["loss"]
    verb = "fell" if end < 0.9 * start else "barely moved"
    if end < unigram - USES_CONTEXT:
        where = f"well below the {unigram:.2f} of token frequencies alone: it uses the context"
    elif end < unigram - 0.05:
        where = f"a little below the {unigram:.2f} of token frequencies alone"
    elif end <= unigram + 0.05:
        where = f"about the {unigram:.2f} of token frequencies alone"
    else:
        where = f"still above the {unigram:.2f} of token frequencies alone"
    return f"{verb} from {start:.2f} to {end:.2f}, {where}"


def _efficiency_sentence(result: dict) -> str:
    eff, env = result["efficiency"], result["environment"]
    first = eff[next(iter(eff))]
    speeds = (
        f"GPT trained at {_si(first['gpt']['train_tokens_per_s'])} tokens/s and BERT at "
        f"{_si(first['bert']['train_tokens_per_s'])} (at matched size they cost about the same FLOPs per token)"
    )
    if env["device"] == "cpu":
        return (
            f"On this CPU the {result['setup']['train_backend']} backend did all the work: {speeds}; GPT generated "
            f"{_si(first['gpt']['generation_tokens_per_s'])} tokens/s with its KV cache."
        )
    fused = result["setup"]["fused_backend"]
    if fused not in eff or "torch" not in eff:
        return f"On {env['device_name']}: {speeds}."
    ratio = {k: eff[fused][k]["train_tokens_per_s"] / eff["torch"][k]["train_tokens_per_s"] for k in ("gpt", "bert")}
    gen = eff[fused]["gpt"]["generation_tokens_per_s"] / eff["torch"]["gpt"]["generation_tokens_per_s"]
    return (
        f"On {env['device_name']} the fused {fused} kernels trained GPT {ratio['gpt']:.2f}x and BERT "
        f"{ratio['bert']:.2f}x as fast as the torch backend on the same weights, and generated {gen:.2f}x as fast."
    )


def conclusion(result: dict) -> str:
    """One paragraph that says what the numbers show, and how much weight they bear."""
    g, b = result["models"]["gpt"], result["models"]["bert"]
    setup, unigram, base = result["setup"], result["unigram_loss"], result["majority_baseline"]
    size = setup["preset"]
    acc = {"GPT": g["finetune_accuracy"], "BERT": b["finetune_accuracy"]}
    best = max(acc, key=acc.get)
    beat = [k for k, v in acc.items() if v > base]
    if len(beat) == 2:
        tuned = f"both learned the task, {best} more"
    elif beat:
        tuned = f"only {beat[0]} learned the task"
    else:
        tuned = "neither learned the task (too few steps)"
    why = ""
    if b["val_final"]["loss"] > unigram - USES_CONTEXT > g["val_final"]["loss"]:
        why = (
            " A masked position has no input of its own, so BERT must learn to attend before it can beat token "
            "frequencies, while GPT already predicts from the token it reads: BERT needs more steps to get going."
        )
    nsp = b["val_final"]["nsp_accuracy"]
    noise = 2 * math.sqrt(0.25 / result["data"]["eval_rows"])  # two standard deviations of a coin's hit rate
    nsp_words = f"{nsp:.3f}, at chance" if abs(nsp - 0.5) < noise else f"{nsp:.3f}"
    eq = result["equivalence"]
    check = ""
    if eq.get("ran"):
        check = " The fused kernels reproduced the torch backend's losses." if eq["equal"] else (
            " The fused kernels did NOT reproduce the torch backend's losses: see the equivalence check."
        )  # fmt: skip
    return (
        f"GPT and BERT of matched size ({_si(g['parameters'])} and {_si(b['parameters'])} parameters: "
        f"{size['n_layer']} layers, width {size['d_model']}, {size['n_head']} heads) pretrained from the same seed on "
        f"the same text for the same {_si(g['pretrain']['tokens_seen'])} tokens ({setup['steps']} steps of "
        f"{size['batch']} x {size['seqlen']}). GPT's held-out next-token loss {_learned(g, unigram)} (perplexity "
        f"{g['val_final']['perplexity']:.1f}, next-token accuracy {g['val_final']['accuracy']:.3f}); BERT's "
        f"masked-token loss {_learned(b, unigram)} (masked-token accuracy {b['val_final']['masked_accuracy']:.3f}; "
        f"next-sentence accuracy {nsp_words}).{why} Fine-tuned on the same examples to tell "
        f"{result['corpus']['task']}, GPT's last-token head reached {acc['GPT']:.3f} and BERT's [CLS] head "
        f"{acc['BERT']:.3f} on held-out text, against {base:.3f} for always answering the most frequent class: "
        f"{tuned}. {_efficiency_sentence(result)}{check} A short run of a small model is a smoke test of the "
        "comparison, not its verdict: a few points either way are within seed-to-seed noise, and a larger --preset "
        "with more --steps on a GPU gives numbers that bear weight."
    )


def _table(result: dict) -> list[str]:
    body = rows(result)
    w0 = max(len(r[0]) for r in body)
    w1 = max(8, *(len(r[1]) for r in body))
    lines = [f"{'':{w0}}  {'GPT':>{w1}}  {'BERT':>{w1}}"]
    lines += [f"{m:{w0}}  {gv:>{w1}}  {bv:>{w1}}" for m, gv, bv in body]
    return lines


def print_summary(result: dict, out: Path) -> None:
    setup, env = result["setup"], result["environment"]
    print()
    print(f"== GPT vs BERT on {env['device']} ({env['device_name']}), preset {setup['preset']['name']}")
    for line in _table(result):
        print(line)
    print(equivalence_line(result["equivalence"], env["device"]))
    for s in result["samples"]["generation"][:2]:
        print(f"GPT continues  {s['prompt']!r} -> {s['continuation']!r}")
    for s in result["samples"]["fill_mask"][:2]:
        print(f"BERT fills     {s['text']!r}: {', '.join(s['guesses'])} (answer {s['answer']!r})")
    print()
    print(result["conclusion"])
    print(f"\nstudy: {result['timing']['study_s']:.0f} s; report: {out / REPORT_NAME}, numbers: {out / JSON_NAME}, ")
    print(f"plots: {', '.join(str(out / f) for f in result['files']['plots'])}")


def markdown(result: dict) -> str:
    setup, env, corpus, data = result["setup"], result["environment"], result["corpus"], result["data"]
    lines = [
        "# GPT vs BERT: accuracy and efficiency",
        "",
        f"fastformer {env['fastformer']}, torch {env['torch']}, triton {env['triton']}, python {env['python']}, "
        f"{env['device']} ({env['device_name']}, {env['cpu_threads']} CPU threads), {env['date']}.",
        "",
        "## What ran where",
        "",
        *(f"- {line.strip(' =')}" for line in setup["explain"]),
        f"- corpus: {corpus['source']}: {corpus['documents']} documents, {corpus['characters']:,} characters, "
        f"{corpus['sentences']:,} sentences (sha256 {corpus['sha256'][:16]})",
        f"- fine-tuning task: {corpus['task']}; {data['finetune_train_examples']} training and "
        f"{data['finetune_test_examples']} held-out windows of {setup['preset']['seqlen'] - 2} tokens",
        f"- tokenizer: byte-level BPE, {result['tokenizer']['vocab_size']} tokens"
        f"{' (from the cache)' if result['tokenizer']['from_cache'] else ' (trained for this run)'}",
        f"- held out: {data['val_passages']} of {data['val_passages'] + data['train_passages']} passages (every "
        "eighth); every accuracy below is measured on them",
        "",
        "## Results",
        "",
        "| metric | GPT | BERT |",
        "|---|---:|---:|",
        *(f"| {m} | {g} | {b} |" for m, g, b in rows(result)),
        "",
        equivalence_line(result["equivalence"], env["device"]) + ".",
        "",
        "## Conclusion",
        "",
        result["conclusion"],
        "",
        "## Samples",
        "",
        "GPT, top-k sampling (k = 20, temperature 0.8) with the KV cache, from the opening words of held-out passages:",
        "",
        *(f"- **{s['prompt']}** {s['continuation']}" for s in result["samples"]["generation"]),
        "",
        "BERT, top-3 guesses for one masked word of a held-out sentence:",
        "",
        *(
            f"- {s['text']} -> {', '.join(s['guesses'])} (answer: {s['answer']})"
            for s in result["samples"]["fill_mask"]
        ),
        "",
        "## Plots",
        "",
        *(f"![{f}]({f})" for f in result["files"]["plots"]),
        "",
        f"Every number is in `{JSON_NAME}`. Time: {result['timing']['study_s']:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in result['timing']['phases_s'].items())}).",
        "",
    ]
    return "\n".join(lines)


def _finite(x: Any) -> Any:
    """NaN and infinities become null, so that the JSON parses everywhere (strict JSON has no NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def write(result: dict, out: Path) -> None:
    """Add the conclusion to ``result`` and write plots, ``report.md`` and ``study.json`` into ``out``."""
    result["conclusion"] = conclusion(result)
    result["files"] = {"report": REPORT_NAME, "json": JSON_NAME, "plots": plots.write_all(result, out)}
    (out / REPORT_NAME).write_text(markdown(result))
    (out / JSON_NAME).write_text(json.dumps(_finite(result), indent=1, allow_nan=False) + "\n")
