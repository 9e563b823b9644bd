"""The machine code (SASS) of the CUDA LayerNorm kernels: rows move in 16-byte accesses, nothing spills (issue 13).

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

The registers of every kernel are printed (pytest -s) and are part of any failure message. The helpers take any
binary (an extension, an object file, a cubin), so a candidate kernel can be checked without installing it.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fastformer import _build

ARCHS = ["sm_80", "sm_90"]
DTYPES = {"f": "float", "6__half": "half", "13__nv_bfloat16": "bfloat16"}
MAX_STAT_ACCESSES = 4  # 32-bit global accesses a main-path kernel may make: mean and rstd, possibly duplicated

_NAME = re.compile(r"(layer_norm_(?:fwd|bwd)\w*?_kernel)I(f|6__half|13__nv_bfloat16)(NS0_5Vec16|NS0_7Scalar4)?")
# a global load or store: the opcode and its modifiers (LDGSTS, LDGDEPBAR are other instructions)
_GLOBAL = re.compile(r"(?<![\w.])(LDG|STG)((?:\.[A-Z0-9_]+)*)(?=\s)")
_LOCAL = re.compile(r"(?<![\w.])(?:LDL|STL)(?:\.[A-Z0-9_]+)*(?=\s)")
_ATOMIC = re.compile(r"(?<![\w.])(?:ATOMG|RED|ATOM)(?:\.[A-Z0-9_]+)*(?=\s)")
_INSTR = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", re.M)


@dataclass
class Kernel:
    """One LayerNorm kernel of one arch: its resource usage and global memory instructions by direction and width."""

    mangled: str
    regs: int
    stack: int
    local: int
    instructions: int
    accesses: collections.Counter = field(default_factory=collections.Counter)  # ("LDG" | "STG", bits) -> count
    local_ops: int = 0
    atomics: int = 0

    @property
    def parts(self) -> tuple[str, str, str] | None:
        """(kernel, dtype, access tag: 'Vec16', 'Scalar4' or '') from the mangled name, None if it does not parse."""
        m = _NAME.search(self.mangled)
        if m is None:
            return None
        return m.group(1), DTYPES[m.group(2)], (m.group(3) or "")[5:]

    @property
    def name(self) -> str:
        p = self.parts
        return f"{p[0]}<{p[1]}{', ' + p[2] if p[2] else ''}>" if p else self.mangled

    @property
    def direction(self) -> str:
        return "fwd" if "_fwd" in self.name else "bwd" if "_bwd" in self.name else "?"

    @property
    def main_path(self) -> bool:
        """Every kernel but the declared scalar path must move its rows in 16-byte accesses."""
        return "Scalar4" not in self.mangled

    def count(self, op: str, bits: int) -> int:
        return self.accesses[(op, bits)]

    def widths(self, op: str) -> str:
        return " ".join(f"{b}b:{n}" for (o, b), n in sorted(self.accesses.items()) if o == op) or "-"


def _width(mods: str) -> int:
    parts = set(mods.split("."))
    for token, bits in (("128", 128), ("64", 64), ("U16", 16), ("S16", 16), ("U8", 8), ("S8", 8)):
        if token in parts:
            return bits
    return 32


def _field(usage: str, name: str) -> int:
    """A number of a kernel's ``cuobjdump -res-usage`` line (REG:40 STACK:0 ...), -1 when absent."""
    m = re.search(rf"\b{name}:(\d+)", usage)
    return int(m.group(1)) if m else -1


def find_cuobjdump() -> str | None:
    """The CUDA toolkit's cuobjdump next to nvcc (the real nvcc, behind any wrapper), else Triton's copy."""
    nvcc = _build.find_nvcc()
    if nvcc:
        for d in {Path(nvcc).parent, Path(os.path.realpath(nvcc)).parent}:
            if (d / "cuobjdump").is_file():
                return str(d / "cuobjdump")
    spec = importlib.util.find_spec("triton")
    if spec and spec.submodule_search_locations:
        tool = Path(list(spec.submodule_search_locations)[0]) / "backends" / "nvidia" / "bin" / "cuobjdump"
        if tool.is_file():
            return str(tool)
    return None


def _run(cmd: list[str], cwd: str | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def archs_in(binary: Path, tool: str) -> set[str]:
    """The SASS archs a binary holds (sm_XX of its ELF entries)."""
    return set(re.findall(r"\bsm_\d+", _run([tool, "-lelf", str(binary)])))


def layer_norm_kernels(binary: Path, arch: str, tool: str) -> list[Kernel]:
    """The LayerNorm kernels of `arch` in `binary`, with their resource usage and global memory instructions."""
    with tempfile.TemporaryDirectory() as tmp:
        # disassemble only the LayerNorm cubins when the binary names them (attention's SASS is far larger)
        elves = [e for e in re.findall(r"ELF file\s+\d+:\s+(\S+)", _run([tool, "-lelf", str(binary)]))
                 if "layer_norm" in e and f".{arch}." in e]  # fmt: skip
        targets: list[list[str]] = []
        for elf in elves:
            _run([tool, "-xelf", elf, str(binary)], cwd=tmp)
            targets.append([str(Path(tmp) / elf)])
        if not targets:
            targets = [["-arch", arch, str(binary)]]
        usage = "".join(_run([tool, "-res-usage", *t]) for t in targets)
        sass = "".join(_run([tool, "-sass", *t]) for t in targets)
    res = {m.group(1): m.group(2) for m in re.finditer(r"Function (\S+):\s*\n\s*(REG:.*)", usage)}
    kernels = []
    for block in re.split(r"\n\s*Function : ", sass)[1:]:
        mangled = block.split("\n", 1)[0].strip()
        if "layer_norm" not in mangled:
            continue
        body = _INSTR.findall(block)
        k = Kernel(mangled, *(_field(res.get(mangled, ""), f) for f in ("REG", "STACK", "LOCAL")), len(body))
        for ins in body:
            if m := _GLOBAL.search(ins):
                k.accesses[(m.group(1), _width(m.group(2)))] += 1
            k.local_ops += bool(_LOCAL.search(ins))
            k.atomics += bool(_ATOMIC.search(ins))
        kernels.append(k)
    return kernels


def problems(kernels: list[Kernel]) -> list[str]:
    """What is wrong with a set of LayerNorm kernels of one arch (see the module docstring); empty when all is well."""
    out = []
    if not kernels:
        return ["no LayerNorm kernel found"]
    for k in kernels:
        if k.regs < 0 or k.stack < 0:
            out.append(f"{k.name}: no resource usage reported by cuobjdump -res-usage")
        if k.stack > 0 or k.local > 0 or k.local_ops:
            out.append(f"{k.name}: local memory (spills): STACK {k.stack} LOCAL {k.local}, {k.local_ops} LDL/STL")
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
            if not any(k.main_path and k.direction == direction and k.parts and k.parts[1] == dtype for k in kernels):
                out.append(f"no main-path (16-byte) {direction} kernel for {dtype}")
    return out


def table(arch: str, kernels: list[Kernel]) -> str:
    rows = [f"{arch:6s} {'kernel':44s} {'regs':>4s} {'stack':>5s} {'instrs':>6s}  global loads / stores (bits:count)"]
    for k in sorted(kernels, key=lambda k: k.name):
        rows.append(f"{arch:6s} {k.name:44s} {k.regs:4d} {k.stack:5d} {k.instructions:6d}  "
                    f"LDG {k.widths('LDG')} / STG {k.widths('STG')}")  # fmt: skip
    return "\n".join(rows)


@pytest.fixture(scope="module")
def built() -> tuple[Path, str, set[str]]:
    """(fastformer._C, cuobjdump, the archs it has SASS for)."""
    if _build.find_nvcc() is None:
        pytest.skip("nvcc not found: fastformer._C cannot be built here (set CUDA_HOME or put nvcc on PATH)")
    tool = find_cuobjdump()
    assert tool, "cuobjdump not found: neither next to nvcc nor in Triton's package (triton/backends/nvidia/bin)"
    binary = _build.jit_build()
    return binary, tool, archs_in(binary, tool)


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_norm_kernels_move_rows_in_16_bytes_without_spills(built, arch):
    binary, tool, have = built
    if arch not in have:
        pytest.skip(f"{binary.name} has no {arch} code (FASTFORMER_CUDA_ARCHS={';'.join(_build.archs())})")
    kernels = layer_norm_kernels(binary, arch, tool)
    report = table(arch, kernels)
    print("\n" + report)
    found = problems(kernels)
    assert not found, "\n".join(found) + "\n\n" + report
