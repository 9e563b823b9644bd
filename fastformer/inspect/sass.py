"""The machine code (SASS) of fastformer._C's kernels, read with cuobjdump: registers, local memory, global access
widths and tensor-core instructions per kernel (``fastformer inspect --cuda``; tests/test_cuda_sass.py checks them).

cuobjdump is the CUDA toolkit's next to nvcc, else the copy in Triton's package. The helpers take any binary (an
extension, an object file, a cubin), so a candidate kernel can be read without installing it.
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

from fastformer import _build

DTYPES = {"f": "float", "6__half": "half", "13__nv_bfloat16": "bfloat16"}

# after a kernel template's mangled name: its dtype and (LayerNorm) its access tag or (attention) its head dim
_TEMPLATE = re.compile(r"_kernelI(f|6__half|13__nv_bfloat16)(NS0_5Vec16|NS0_7Scalar4)?(?:Li(\d+)E)?")
# a global load or store: the opcode and its modifiers (LDGSTS, LDGDEPBAR are other instructions)
_GLOBAL = re.compile(r"(?<![\w.])(LDG|STG)((?:\.[A-Z0-9_]+)*)(?=\s)")
_LOCAL = re.compile(r"(?<![\w.])(?:LDL|STL)(?:\.[A-Z0-9_]+)*(?=\s)")
_ATOMIC = re.compile(r"(?<![\w.])(?:ATOMG|RED|ATOM)(?:\.[A-Z0-9_]+)*(?=\s)")
_MMA = re.compile(r"(?<![\w.])(HMMA|HGMMA)(?=[.\s])")  # tensor-core matmuls: mma.sync (sm_80+), wgmma (sm_90a)
# tile movement: cp.async global -> shared, ldmatrix, TMA tensor loads
_ASYNC = re.compile(r"(?<![\w.])(LDGSTS|LDSM|UTMALDG)(?=[.\s])")
_INSTR = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", re.M)


@dataclass
class Kernel:
    """One kernel of one arch: its resource usage, global memory instructions by direction and width, and matmuls."""

    mangled: str
    regs: int
    stack: int
    local: int
    instructions: int
    accesses: collections.Counter = field(default_factory=collections.Counter)  # ("LDG" | "STG", bits) -> count
    local_ops: int = 0
    atomics: int = 0
    mma: collections.Counter = field(default_factory=collections.Counter)  # "HMMA" | "HGMMA" -> count
    tiles: collections.Counter = field(default_factory=collections.Counter)  # "LDGSTS" | "LDSM" | "UTMALDG" -> count

    @property
    def parts(self) -> tuple[str, str, str] | None:
        """(kernel, dtype, tag) from the mangled name, None if it does not parse; the tag is LayerNorm's access path
        ('Vec16', 'Scalar4'), attention's head dim ('D64', 'D128') or ''."""
        m = _TEMPLATE.search(self.mangled)
        if m is None:
            return None
        # the name is the source name whose mangled length prefix (decimal digits) says where it starts
        end = m.start() + len("_kernel")
        # innermost name first; a hash may run into the prefix's digits
        for d in reversed(list(re.finditer(r"\d+", self.mangled[: m.start()]))):
            if d.group().endswith(str(end - d.end())):
                tag = (m.group(2) or "")[5:] or (f"D{m.group(3)}" if m.group(3) else "")
                return self.mangled[d.end() : end], DTYPES[m.group(1)], tag
        return None

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


def kernels(binary: Path, arch: str, tool: str, only: str = "") -> list[Kernel]:
    """The kernels of `arch` in `binary` whose names contain `only`, with their resource usage, global memory
    instructions and matmuls."""
    with tempfile.TemporaryDirectory() as tmp:
        # disassemble only the cubins of the wanted source when the binary names them (attention's SASS is large)
        elves = [e for e in re.findall(r"ELF file\s+\d+:\s+(\S+)", _run([tool, "-lelf", str(binary)]))
                 if only in e and f".{arch}." in e]  # fmt: skip
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
        if only not in mangled:
            continue
        body = _INSTR.findall(block)
        k = Kernel(mangled, *(_field(res.get(mangled, ""), f) for f in ("REG", "STACK", "LOCAL")), len(body))
        for ins in body:
            if m := _GLOBAL.search(ins):
                k.accesses[(m.group(1), _width(m.group(2)))] += 1
            k.local_ops += bool(_LOCAL.search(ins))
            k.atomics += bool(_ATOMIC.search(ins))
            if m := _MMA.search(ins):
                k.mma[m.group(1)] += 1
            if m := _ASYNC.search(ins):
                k.tiles[m.group(1)] += 1
        kernels.append(k)
    return kernels


def table(arch: str, found: list[Kernel]) -> str:
    """One line per kernel: registers, stack, instructions, global access widths and tensor-core matmuls."""
    rows = [
        f"{arch:6s} {'kernel':44s} {'regs':>4s} {'stack':>5s} {'instrs':>6s}  mma  global loads / stores (bits:count)"
    ]
    for k in sorted(found, key=lambda k: k.name):
        mma = " ".join(f"{op}:{n}" for op, n in sorted(k.mma.items())) or "none"
        rows.append(f"{arch:6s} {k.name:44s} {k.regs:4d} {k.stack:5d} {k.instructions:6d}  {mma}  "
                    f"LDG {k.widths('LDG')} / STG {k.widths('STG')}")  # fmt: skip
    return "\n".join(rows)


def spills(found: list[Kernel]) -> list[str]:
    """The kernels that use local memory (spills or a stack frame), one line each."""
    return [f"{k.name}: local memory: STACK {k.stack} LOCAL {k.local}, {k.local_ops} LDL/STL"
            for k in found if k.stack > 0 or k.local > 0 or k.local_ops]  # fmt: skip
