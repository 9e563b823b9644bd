"""``fastformer inspect``: every Triton launch of the launchers, compiled for a GPU as the JIT would, with no GPU.

For a set of representative problems (GPT-2 and BERT training steps, d=128 long-sequence attention, decoding,
the GPT-2 feed-forward, LayerNorm at three widths) the launches are recorded (:mod:`.capture`), expanded over
every config the autotuner may try on the arch plus the untuned defaults, compiled with Triton's compiler and
read (:mod:`.compile`): matrix-instruction lowering, registers, spills, shared memory, TMA, and instructions
per iteration of the hot loop. ``--check`` exits non-zero on what a Hopper-grade kernel must not do:
a spill, shared memory above the device's limit, a matmul kernel not on ``wgmma`` (sm_90), a failed compile.
Next to them, when nvcc is there, the CUDA C++ kernels of fastformer._C for the same arch (:mod:`.sass`: registers,
local memory, HMMA/HGMMA, global access widths), whose local memory ``--check`` also fails on; ``--cuda`` prints
only those, for every arch built.

    fastformer inspect [--arch sm_90|sm_80] [--json FILE] [--check] [--only TEXT] [--cuda | --no-cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

COLUMNS = ("kernel", "status", "config", "grid", "mma", "regs", "stack", "spill_ops", "smem", "tma", "loop")


def inspect_arch(arch: int, only: str | None = None, workers: int | None = None) -> list[dict[str, Any]]:
    """One row per (launch, config) of every representative problem whose name contains ``only``."""
    from fastformer.inspect import capture, compile

    scenarios = {k: v for k, v in capture.SCENARIOS.items() if only is None or only in k}
    launches = capture.capture(arch, scenarios)
    jobs = [compile.job(launch, arch) for launch in launches]
    facts = compile.compile_all(jobs, workers)
    rows = []
    for launch, j in zip(launches, jobs, strict=True):
        config = " ".join(f"{k.removeprefix('BLOCK_').removeprefix('num_')}={v}" for k, v in launch.config.items())
        row = dict(scenario=launch.scenario, kernel=launch.kernel, status=launch.status, config=config)
        rows.append(dict(row, grid=launch.grid[0] * launch.grid[1] * launch.grid[2], **facts[compile.key(j)]))
    return rows


def problems(rows: list[dict[str, Any]], arch: int) -> list[str]:
    """What ``--check`` fails on, one line each; pruned configs are never launched and are not judged."""
    from fastformer.inspect.capture import DEVICES

    out = []
    launched = {(r["scenario"], r["kernel"]) for r in rows}
    untuned = {(r["scenario"], r["kernel"]) for r in rows if r["status"] == "default"}
    out += [f"{s}: {k}: no untuned default launch in the table" for s, k in sorted(launched - untuned)]
    for r in rows:
        if r["status"] == "pruned":
            continue
        where = f"{r['scenario']}: {r['kernel']} [{r['status']} {r['config']}]"
        if "error" in r:
            out.append(f"{where}: does not compile: {r['error']}")
            continue
        if r["stack"] or r["spill_ops"]:
            out.append(f"{where}: spills ({r['stack']} B of local memory, {r['spill_ops']} LDL/STL)")
        if r["smem"] > DEVICES[arch].smem:
            out.append(f"{where}: {r['smem']} B of shared memory > the device's {DEVICES[arch].smem}")
        if arch >= 90 and r["dot"] and r["mma"] != "wgmma":
            out.append(f"{where}: matmul lowered to {r['mma']}, not wgmma")
    return sorted(set(out))


def print_table(rows: list[dict[str, Any]]) -> None:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in COLUMNS}
    scenario = None
    for r in rows:
        if r["scenario"] != scenario:
            scenario = r["scenario"]
            print(f"\n{scenario}\n  " + "  ".join(c.ljust(widths[c]) for c in COLUMNS))
        print("  " + "  ".join(str(r[c]).ljust(widths[c]) for c in COLUMNS))


def cuda_table(arch: str, only: str) -> tuple[str, list[str]] | None:
    """(the SASS table of fastformer._C's kernels for ``arch``, their local-memory problems), or None when nvcc or
    cuobjdump is missing or the build has no code for the arch."""
    from fastformer import _build
    from fastformer.inspect import sass

    tool = sass.find_cuobjdump()
    if _build.find_nvcc() is None or tool is None:
        return None
    binary = _build.jit_build()
    if arch not in sass.archs_in(binary, tool):
        return None
    found = sass.kernels(binary, arch, tool, only)
    return sass.table(arch, found), [f"CUDA {arch} {p}" for p in sass.spills(found)]


def inspect_cuda(only: str, check: bool) -> int:
    """Print every fastformer._C kernel's registers, local memory, global access widths and tensor-core matmuls, per
    arch it was built for; 1 under ``check`` when one uses local memory, 2 when it cannot be built here."""
    from fastformer import _build
    from fastformer.inspect import sass

    tool = sass.find_cuobjdump()
    if _build.find_nvcc() is None or tool is None:
        print("fastformer inspect --cuda: needs nvcc (to build fastformer._C) and cuobjdump", file=sys.stderr)
        return 2
    binary = _build.jit_build()
    found_any = []
    for arch in sorted(sass.archs_in(binary, tool)):
        found = sass.kernels(binary, arch, tool, only)
        if found:
            print(sass.table(arch, found) + "\n")
        found_any += [f"{arch} {p}" for p in sass.spills(found)]
    for p in found_any:
        print(f"PROBLEM {p}")
    return 1 if check and found_any else 0


def main(argv: list[str] | None = None) -> int:
    # the module docstring is reStructuredText: its double backticks are markup, not text for a terminal
    description = __doc__.split("\n\n")[0].replace("``", "")
    parser = argparse.ArgumentParser(prog="fastformer inspect", description=description)
    parser.add_argument("--arch", choices=("sm_90", "sm_80"), default="sm_90", help="target GPU architecture")
    parser.add_argument("--json", metavar="FILE", help="also write every row as JSON")
    parser.add_argument("--check", action="store_true", help="exit 1 on spills, smem overflow, non-wgmma matmuls")
    parser.add_argument("--only", metavar="TEXT", help="only the problems whose name contains TEXT")
    parser.add_argument("--workers", type=int, help="compile processes (default: one per core)")
    parser.add_argument(
        "--cuda", action="store_true", help="instead: the SASS of the CUDA C++ kernels in fastformer._C (needs nvcc)"
    )
    parser.add_argument("--no-cuda", action="store_true", help="leave out the CUDA C++ kernels' table")
    args = parser.parse_args(argv)
    if args.cuda:
        return inspect_cuda(args.only or "", args.check)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # the interpreter replaces Triton's compiler: inspect in a process that never had it switched on
        if "triton" in sys.modules:
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            cmd = [sys.executable, "-m", "fastformer", "inspect", *(argv if argv is not None else sys.argv[2:])]
            return subprocess.run(cmd, env=env).returncode
        os.environ.pop("TRITON_INTERPRET")
    arch = int(args.arch.removeprefix("sm_"))
    rows = inspect_arch(arch, args.only, args.workers)
    print_table(rows)
    found = problems(rows, arch)
    cuda = None if args.no_cuda else cuda_table(args.arch, args.only or "")
    if cuda is not None:
        print(f"\nCUDA C++ kernels (fastformer._C)\n{cuda[0]}")
        found += cuda[1]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "rows": rows, "problems": found, "cuda": cuda and cuda[0]}, f, indent=1)
    print(f"\n{len(rows)} (launch, config) rows, {len({(r['kernel'], r['config']) for r in rows})} kernel variants")
    for p in found:
        print(f"PROBLEM {p}")
    return 1 if args.check and found else 0
