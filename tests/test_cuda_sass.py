"""The machine code (SASS) of the CUDA kernels: the LayerNorm moves rows in 16-byte accesses, the attention runs
on the tensor cores, nothing spills (issue 13).

Runs on the CPU, in CI: builds fastformer._C with fastformer._build (into the per-user cache that `make test` fills,
so usually without compiling) and disassembles its LayerNorm cubins with cuobjdump: the CUDA toolkit's next to
nvcc, else the copy in Triton's package (where fastformer.inspect finds it). Skipped only when nvcc is absent.

For every LayerNorm kernel of each built arch among sm_80 and sm_90:

- nothing in local memory: STACK:0 and LOCAL:0 in ``cuobjdump -res-usage`` (where spills go) and no LDL/STL;
- no global atomics (the dweight/dbias partials are reduced in a fixed order);
- a main-path kernel, which is every kernel not tagged ``Scalar4`` (the element-wise path csrc/layer_norm.cu takes
  only when n or an address rules out 16-byte packs), moves its rows in 16 bytes: it has LDG.E.128 and STG.E.128,
  no global access narrower than 32 bits (one half or bfloat16 element), and 32-bit global accesses only for the
  per-row fp32 statistics: a forward kernel loads nothing 32-bit and stores at most 4 (mean and rstd, allowing the
  compiler to duplicate them), a backward kernel stores nothing 32-bit and loads at most 4 (mean and rstd);
- forward and backward each have a main-path kernel for float, half and bfloat16.

For the attention kernels of each arch: the forward, dK/dV and dQ kernels of every (dtype, head dim) instantiation
(fp16 and bf16, 64 and 128) have HMMA (mma.sync), fill shared memory with LDGSTS (cp.async) and read it with LDSM
(ldmatrix); in sm_90a code (cuobjdump calls it sm_90) the wgmma forwards of each have HGMMA, fed by LDGSTS or by
UTMALDG (TMA); no attention kernel uses local memory (stack frame, spills, LDL/STL).

The registers of every kernel are printed (pytest -s) and are part of any failure message. The helpers take any
binary (an extension, an object file, a cubin), so a candidate kernel can be checked without installing it.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from fastformer import _build
from fastformer.inspect.sass import DTYPES, Kernel, archs_in, find_cuobjdump, kernels, spills, table

ARCHS = ["sm_80", "sm_90"]
MAX_STAT_ACCESSES = 4  # 32-bit global accesses a main-path kernel may make: mean and rstd, possibly duplicated


def problems(found: list[Kernel]) -> list[str]:
    """What is wrong with a set of LayerNorm kernels of one arch (see the module docstring); empty when all is well."""
    if not found:
        return ["no LayerNorm kernel found"]
    out = spills(found)
    for k in found:
        if k.regs < 0 or k.stack < 0:
            out.append(f"{k.name}: no resource usage reported by cuobjdump -res-usage")
        if k.atomics:
            out.append(f"{k.name}: {k.atomics} global atomics")
        if not k.main_path:
            continue
        for op in ("LDG", "STG"):
            if not k.count(op, 128):
                out.append(f"{k.name}: no 16-byte {op} (widths {k.widths(op)})")
            narrow = sum(n for (o, b), n in k.accesses.items() if o == op and b < 32)
            if narrow:
                out.append(f"{k.name}: {narrow} {op} narrower than 32 bits: element accesses (widths {k.widths(op)})")
        # the fp32 statistics are the only 32-bit accesses: stored by the forward, loaded by the backward
        stat_op, other_op = ("STG", "LDG") if k.direction == "fwd" else ("LDG", "STG")
        if k.count(other_op, 32) or k.count(other_op, 64):
            out.append(f"{k.name}: {other_op} of 32/64 bits: only row data can be (widths {k.widths(other_op)})")
        if k.count(stat_op, 32) + k.count(stat_op, 64) > MAX_STAT_ACCESSES:
            out.append(f"{k.name}: more 32/64-bit {stat_op} than mean and rstd need (widths {k.widths(stat_op)})")
    for direction in ("fwd", "bwd"):
        for dtype in DTYPES.values():
            if not any(k.main_path and k.direction == direction and k.parts and k.parts[1] == dtype for k in found):
                out.append(f"no main-path (16-byte) {direction} kernel for {dtype}")
    return out


@pytest.fixture(scope="module")
def built() -> tuple[Path, str, set[str]]:
    """(fastformer._C, cuobjdump, the archs it has SASS for)."""
    if _build.find_nvcc() is None:
        pytest.skip("nvcc not found: fastformer._C cannot be built here (set CUDA_HOME or put nvcc on PATH)")
    tool = find_cuobjdump()
    assert tool, "cuobjdump not found: neither next to nvcc nor in Triton's package (triton/backends/nvidia/bin)"
    binary = _build.jit_build()
    return binary, tool, archs_in(binary, tool)


def _read(built, arch: str, only: str) -> tuple[list[Kernel], str]:
    """The kernels of `arch` whose names contain `only`, and their table (printed; skipped when not built)."""
    binary, tool, have = built
    if arch not in have:
        pytest.skip(f"{binary.name} has no {arch} code (FASTFORMER_CUDA_ARCHS={';'.join(_build.archs())})")
    found = kernels(binary, arch, tool, only=only)
    report = table(arch, found)
    print("\n" + report)
    return found, report


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_norm_kernels_move_rows_in_16_bytes_without_spills(built, arch):
    found, report = _read(built, arch, "layer_norm")
    wrong = problems(found)
    assert not wrong, "\n".join(wrong) + "\n\n" + report


def test_inspect_cuda_prints_each_kernel(built, capsys):
    """``fastformer inspect --cuda`` lists every LayerNorm kernel per built arch by its source name, with registers
    and access widths, and ``--check`` passes for them (no local memory)."""
    from fastformer import inspect

    _, _, have = built
    assert inspect.main(["--cuda", "--only", "layer_norm", "--check"]) == 0
    out = capsys.readouterr().out
    for arch in set(ARCHS) & have:
        for kernel in ("layer_norm_fwd_rows_kernel<half, Vec16>", "layer_norm_bwd_rows_kernel<float, Vec16>"):
            assert re.search(rf"^{arch}\s+{re.escape(kernel)}\s+\d+\s+0\s+\d+\s+none\s+LDG .*128b", out, re.M), out


ATTENTION_KERNELS = ("attn_fwd_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel")


def attention_problems(found: list[Kernel], wgmma: bool) -> list[str]:
    """What is wrong with the attention kernels of one arch (see the module docstring); empty when all is well.
    ``wgmma``: the arch's code is sm_90a, whose forward also has a wgmma kernel."""
    out = spills(found)
    by_name = {(k.parts[0], k.parts[1], k.parts[2]): k for k in found if k.parts}
    wanted = [(name, "HMMA", ("LDGSTS", "LDSM")) for name in ATTENTION_KERNELS]
    if wgmma:  # operands through descriptors, not ldmatrix; copied by cp.async or by the TMA unit
        wanted += [("attn_fwd_wgmma_kernel", "HGMMA", ("LDGSTS",)), ("attn_fwd_tma_kernel", "HGMMA", ("UTMALDG",))]
    for name, mma, tiles in wanted:
        for dtype in ("half", "bfloat16"):
            for d in ("D64", "D128"):
                k = by_name.get((name, dtype, d))
                if k is None:
                    out.append(f"{name}<{dtype}, {d}> missing")
                    continue
                if not k.mma[mma]:
                    out.append(f"{k.name}: no {mma}: not on the tensor cores")
                for op in tiles:
                    if not k.tiles[op]:
                        out.append(f"{k.name}: no {op}")
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_kernels_use_tensor_cores_without_spills(built, arch):
    found, report = _read(built, arch, "attention")
    wrong = attention_problems(found, wgmma=arch == "sm_90" and "90a" in _build.archs())
    assert not wrong, "\n".join(wrong) + "\n\n" + report


def test_wgmma_pipelines_are_not_serialised():
    """ptxas -v on the sm_90a attention: no C7514 ("wgmma.mma_async instructions are serialized"), which ptxas reports
    when it cannot prove that registers an in-flight wgmma writes are left alone (it then waits after every wgmma,
    and the TMA forward's overlap of one tile's P V with the next tile's softmax is gone)."""
    nvcc = _build.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    src = _build.source_dir()
    cmd = [nvcc, "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-gencode", "arch=compute_90a,code=sm_90a"]
    cmd += ["-DFF_HAVE_SM90A", "-Xptxas", "-v", f"-I{src}", "-cubin", "-o", os.devnull, str(src / "attention.cu")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = proc.stdout + proc.stderr
    assert "attn_fwd_tma_kernel" in report, "ptxas -v printed nothing about the TMA forward"
    serialised = [line for line in report.splitlines() if "C7514" in line]
    assert not serialised, "\n".join(serialised)
