"""`fastformer inspect` in CI: every Triton launch of the representative problems, compiled for sm_90 as the JIT
would specialise it (no GPU needed), must lower its matmuls to wgmma, never spill, and fit shared memory; the CUDA
C++ kernels of fastformer._C are listed next to them and must not use local memory either."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from fastformer.inspect import compile as inspect_compile
from fastformer.inspect import problems


def test_sm90_kernels_are_hopper_grade(tmp_path):
    out = tmp_path / "inspect.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real compiler, not the interpreter
    cmd = [sys.executable, "-m", "fastformer", "inspect", "--arch", "sm_90", "--check", "--json", str(out)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert out.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["problems"] == [], "\n".join(report["problems"])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = report["rows"]
    kernels = {r["kernel"] for r in rows}
    assert {"attention_fwd_kernel", "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel", "linear_kernel"} <= kernels
    assert {"layer_norm_fwd_kernel", "layer_norm_bwd_kernel", "act_grad_kernel"} <= kernels
    matmuls = [r for r in rows if r["dot"] and r["status"] != "pruned"]
    assert matmuls and all(r["mma"] == "wgmma" and r["loop"] > 0 for r in matmuls)
    from fastformer import _build

    if _build.find_nvcc() is not None:  # the CUDA C++ kernels next to them, with their tensor-core instructions
        assert "CUDA C++ kernels (fastformer._C)" in run.stdout
        assert report["cuda"] and "attn_fwd_tma_kernel<half, D128>" in report["cuda"] and "HGMMA" in report["cuda"]


def test_checks_catch_each_kind_of_problem():
    ok = dict(scenario="s", kernel="k", status="tried", config="M=64", error=None, mma="wgmma", regs=128, stack=0)
    ok.update(spill_ops=0, smem=1024, tma=False, loop=100, dot=True)
    ok.pop("error")
    default = dict(ok, status="default")
    assert problems([ok, default], 90) == []
    bad = [dict(ok, stack=16, spill_ops=4), dict(ok, smem=300_000), dict(ok, mma="mma.sync"), dict(ok, error="x")]
    found = problems([*bad, default], 90)
    assert [any(word in p for p in found) for word in ("spills", "shared memory", "not wgmma", "does not compile")] == [
        True
    ] * 4
    assert problems([dict(ok, mma="mma.sync"), default], 80) == []  # sm_80 has no wgmma
    assert problems([dict(ok, stack=64, status="pruned"), default], 90) == []  # never launched
    assert "no untuned default" in problems([ok], 90)[0]


def test_loop_body_counts_the_largest_backward_branch():
    sass = "\n".join(
        f"        /*{a:04x}*/                   {ins} ;"
        for a, ins in enumerate(
            ["MOV R1, R2", "IADD R3, R3, 1", "FFMA R4, R4, R5, R6", "@P0 BRA 0x1", "EXIT", "BRA 0x5"]
        )
    )
    assert inspect_compile._loop_body(sass) == 3  # instructions 1..3; the trailing self-branch is not a loop
