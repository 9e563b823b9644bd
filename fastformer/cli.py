"""The ``fastformer`` command: ``info``, ``bench <op>``, ``build``, ``inspect``, ``compare`` and ``demo``."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys

BENCHES = ("layer_norm", "attention", "ffn", "models", "hf")


def info() -> None:
    """Print versions, the device, which backends work and whether fastformer._C is built."""
    import torch

    import fastformer
    from fastformer import _build, _ext, backends

    nvcc = _build.find_nvcc()
    nvcc_version = "not found"
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        nvcc_version = out[-1] if out else nvcc
    triton_version = "not installed"
    if importlib.util.find_spec("triton"):
        import triton

        triton_version = triton.__version__
    import numpy

    rows = [
        ("fastformer", fastformer.__version__),
        ("python", platform.python_version()),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda})"),
        ("triton", triton_version),
        ("numpy", numpy.__version__),
        ("nvcc", nvcc_version),
        ("ninja", shutil.which("ninja") or "not found"),
        ("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no CUDA device)"),
        ("fastformer._C", "built" if _ext.is_built() else "not built (built on first use when nvcc and a GPU exist)"),
    ]
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for name, why in backends.status(device).items():
            rows.append((f"backend {name} on {device}", "ok" if why is None else f"no: {why}"))
    rows.append(("backend in force", backends.selected()))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")


def _bench_help() -> str:
    """``fastformer bench --help``: the benchmarks, each with its docstring's first line, and the shared options."""
    import ast
    from pathlib import Path

    from fastformer.benchmarks import common

    here = Path(common.__file__).resolve().parent
    listing = [
        f"  {n:<11} {(ast.get_docstring(ast.parse((here / f'bench_{n}.py').read_text())) or '').splitlines()[0]}"
        for n in BENCHES
    ]
    listing.append(f"  {'all':<11} every one in turn (--json/--csv/--plot files get each benchmark's name added)")
    p = common.parser("Run a benchmark; NAME is one of:\n" + "\n".join(listing))
    p.prog = "fastformer bench NAME"
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = "Every benchmark takes these options; fastformer bench NAME --help lists NAME's own too."
    return p.format_help()


def bench(name: str | None, argv: list[str]) -> None:
    """Run benchmark ``name`` (or all of them) with the options ``argv``; without a name, print the list."""
    asks_help = any(a in ("-h", "--help") for a in argv)
    if name is None or (name == "all" and asks_help):
        if not asks_help:
            print("usage: fastformer bench NAME [options]", file=sys.stderr)
            print(f"fastformer bench: error: NAME is required ({', '.join(BENCHES)} or all)", file=sys.stderr)
            sys.exit(2)
        print(_bench_help())
        sys.exit(0)
    if name != "all":
        importlib.import_module(f"fastformer.benchmarks.bench_{name}").main(argv)
        return
    outputs = ("--json", "--csv", "--plot")
    for n in BENCHES:
        # one file per benchmark: out.csv -> out.layer_norm.csv (options as "--csv FILE" or "--csv=FILE")
        args = list(argv)
        for i, a in enumerate(args):
            flag, eq, value = a.partition("=")
            if flag in outputs and eq:
                args[i] = f"{flag}={_bench_file(value, n)}"
            elif a in outputs and i + 1 < len(args):
                args[i + 1] = _bench_file(args[i + 1], n)
        importlib.import_module(f"fastformer.benchmarks.bench_{n}").main(args)


def _bench_file(path: str, name: str) -> str:
    root, ext = os.path.splitext(path)
    return f"{root}.{name}{ext}"


def _interpret_triton_on_cpu(device: str | None) -> None:
    """Without a GPU the fused (Triton) kernels can only run in Triton's CPU interpreter, which must be chosen
    before triton is first imported; with a GPU, Triton stays on the GPU."""
    import torch

    if device != "cuda" and not torch.cuda.is_available() and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def compare(args: argparse.Namespace) -> None:
    """The GPT-vs-BERT study (fastformer.study); bad input is one line on stderr and exit code 2."""
    _interpret_triton_on_cpu(args.device)
    from fastformer import study

    options = study.Options(
        quick=args.quick,
        corpus=args.corpus,
        device=args.device,
        preset=args.preset,
        steps=args.steps,
        backend=args.backend,
        out=args.out,
        seed=args.seed,
        progress=not args.no_progress,
    )
    try:
        study.run_study(options)
    except study.StudyError as e:
        print(f"fastformer compare: error: {e}", file=sys.stderr)
        sys.exit(2)


def demo() -> None:
    """The main job: info, then the quick GPT-vs-BERT study, then the LayerNorm microbenchmark."""
    import torch

    _interpret_triton_on_cpu(None)
    info()
    print()
    compare(_parser().parse_args(["compare", "--quick"]))
    print()
    quick = [] if torch.cuda.is_available() else ["--quick"]
    print(f"== the LayerNorm microbenchmark: fastformer bench layer_norm {' '.join(quick)}".rstrip())
    bench("layer_norm", quick)


def _add_compare(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "compare",
        help="GPT vs BERT: pretrain, fine-tune and time both at matched size; writes a report",
        description="Pretrain a GPT (next token) and a BERT (masked tokens + next sentence) of matched size on the "
        "same text, fine-tune both on the same classification task, time them per backend, and write a Markdown "
        "report, JSON and plots. Default text: the installed Python standard library's docstrings and comments.",
    )
    c.add_argument("--quick", action="store_true", help="few steps, for a CPU (what make demo runs)")
    c.add_argument("--corpus", metavar="FILE|DIR", help="your own UTF-8 text (a DIR's subdirectories become classes)")
    c.add_argument("--device", metavar="cpu|cuda", help="default: cuda when a GPU is present")
    c.add_argument("--preset", metavar="tiny|small|base", help="model size (default: tiny on CPU, small on GPU)")
    c.add_argument("--steps", type=int, metavar="N", help="pretraining steps per model (fine-tuning scales with it)")
    c.add_argument(
        "--backend", default="auto", metavar="auto|torch|triton|cuda", help="what trains (auto: fused on GPU)"
    )
    c.add_argument("--out", default="fastformer-compare", metavar="DIR", help="report directory (default: %(default)s)")
    c.add_argument("--seed", type=int, default=0, help="one seed for both models' weights and data order")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")


def _parser() -> argparse.ArgumentParser:
    description = "fastformer: fused Transformer kernels. Commands: info, bench, build, inspect, compare and demo."
    parser = argparse.ArgumentParser(prog="fastformer", description=description)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, device, backends, extension status")
    # no -h of its own: `bench NAME --help` reaches that benchmark's parser, and bench() answers `bench --help`
    b = sub.add_parser(
        "bench",
        add_help=False,
        usage="fastformer bench NAME [options]",
        help="run a microbenchmark (extra arguments go to it; try --help after the name)",
    )
    b.add_argument("name", nargs="?", choices=(*BENCHES, "all"), metavar="NAME")
    sub.add_parser("build", help="build fastformer._C into the per-user cache (needs nvcc)")
    # its own options (and --help) are parsed by fastformer.inspect
    sub.add_parser("inspect", add_help=False, help="compile every Triton launch for sm_90/sm_80: resources, no GPU")
    _add_compare(sub)
    sub.add_parser("demo", help="info, the quick GPT-vs-BERT study and the LayerNorm benchmark")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.cmd not in ("bench", "inspect"):  # before running anything
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from fastformer import backends

    try:
        backends.selected()  # a bad FASTFORMER_BACKEND is one line and exit code 2, not a traceback later
    except ValueError as e:
        parser.error(str(e))
    if args.cmd == "info":
        info()
    elif args.cmd == "bench":
        bench(args.name, rest)
    elif args.cmd == "build":
        from fastformer import _build

        print(_build.jit_build(verbose=True))
    elif args.cmd == "demo":
        demo()
    elif args.cmd == "compare":
        compare(args)
    elif args.cmd == "inspect":
        from fastformer import inspect

        sys.exit(inspect.main(rest))


if __name__ == "__main__":
    main(sys.argv[1:])
