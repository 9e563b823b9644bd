"""The ``fastformer`` command: ``info``, ``bench <op>``, ``build``, ``inspect`` and ``demo``."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys

BENCHES = ("layer_norm", "attention", "ffn", "models")


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


def bench(name: str, argv: list[str]) -> None:
    names = BENCHES if name == "all" else (name,)
    for n in names:
        importlib.import_module(f"fastformer.benchmarks.bench_{n}").main(argv)


def demo() -> None:
    """The main job: info, then the GPT-vs-BERT study (fused vs torch), then the LayerNorm microbenchmark."""
    import torch

    if not torch.cuda.is_available() and "triton" not in sys.modules:
        # no GPU: the fused (Triton) path runs in Triton's CPU interpreter, which must be chosen before import
        os.environ.setdefault("TRITON_INTERPRET", "1")

    info()
    print()
    from fastformer import study

    study.run_study(quick=not torch.cuda.is_available())
    print()
    bench("layer_norm", ["--quick"] if not torch.cuda.is_available() else [])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fastformer", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, device, backends, extension status")
    b = sub.add_parser("bench", help="run a microbenchmark (extra arguments go to it; try --help after the name)")
    b.add_argument("name", choices=(*BENCHES, "all"))
    sub.add_parser("build", help="build fastformer._C into the per-user cache (needs nvcc)")
    # its own options (and --help) are parsed by fastformer.inspect
    sub.add_parser("inspect", add_help=False, help="compile every Triton launch for sm_90/sm_80: resources, no GPU")
    sub.add_parser("demo", help="info, the GPT-vs-BERT study and the LayerNorm benchmark")
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "info":
        info()
    elif args.cmd == "bench":
        bench(args.name, rest)
    elif args.cmd == "build":
        from fastformer import _build

        print(_build.jit_build(verbose=True))
    elif args.cmd == "demo":
        demo()
    elif args.cmd == "inspect":
        from fastformer import inspect

        sys.exit(inspect.main(rest))
    if rest and args.cmd != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")


if __name__ == "__main__":
    main(sys.argv[1:])
