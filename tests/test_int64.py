"""Issue 12, large tensors: every Triton kernel indexes in int64 wherever an offset can pass 2**31 elements.

CPU part (no GPU, no large allocation). Triton types a kernel's integer arguments by value: a Python int
>= 2**31 arrives as i64, a smaller one as i32, and a product of i32 values is computed in 32 bits. Whether a large
tensor is addressed correctly therefore depends on the kernel casting to int64 before it multiplies (or on the
launcher passing pre-multiplied offsets as Python ints). This file checks it on the launches themselves:

1. the launchers run on meta tensors of large problems (2**32 to 2**39 elements: many batches of 2**23 elements,
   one sequence whose rows pass 2**31, packed varlen batches, 4M-row LayerNorms, 2**33-element FFN activations,
   split-KV and split-K with their policies forced to reach large workspaces) while ``fastformer.inspect.capture``
   fakes the device and records every launch: its scenario builders, sm_90 with every autotune candidate the
   prune hooks keep plus the untuned default, sm_80 (the pointer paths) with the untuned defaults;
2. each launch is specialised as the JIT would (``fastformer.inspect.compile.job``: Triton's own binder, so i32
   or i64 per argument value) and lowered to TTIR, where every integer's width is fixed (the later stages
   lower it as it is);
3. an interval analysis runs over the TTIR with that launch's own values: its integer arguments, its grid (the
   range of each program id), ``tl.arange`` bounds, constants, and the contents of the index tensors it loads
   (cu_seqlens); loops give their induction variables the range of their bounds. An i32 addition, subtraction,
   multiplication, shift or truncation whose exact result leaves the int32 range is an overflow, reported when
   its value reaches an address (a ``tt.addptr`` offset; a tensor descriptor's shape, strides or coordinates) or
   a dropout element index (the counter entering kernels/dropout.py's Philox), with the kernel, the source line
   (and the helper call chain) and the operands' ranges.

The checker is itself tested on a kernel written here that multiplies ``program_id * stride`` in int32: it must
be caught at exactly those lines, and the same kernel with ``program_id(0).to(tl.int64)`` must pass.

GPU part (``gpu`` marker, skipped without one): attention (causal, bf16; many batches whose last starts past 2**31
elements, and one sequence whose rows pass 2**31), LayerNorm (plain and with a residual) on (M, N) tensors with
M * N > 2**31, and ``linear`` with bias + GELU whose output passes 2**31 elements, on backend="triton"; sampled rows
(first, middle, last) are compared with a float64 reference computed on just those rows. Peak memory about 18 GB.

Run as a script (``python tests/test_int64.py [--json FILE]``, without TRITON_INTERPRET) it prints each kernel's
verdict and the overflows found; the tests run it once in a subprocess, as test_inspect.py runs ``fastformer
inspect``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import fastformer

INT32_MAX = (1 << 31) - 1
# every kernel the launchers run (kernels/*.py); test_every_kernel_is_checked keeps the list complete
KERNELS = (
    "attention_fwd_kernel",
    "attention_fwd_combine_kernel",
    "attention_bwd_preprocess_kernel",
    "attention_bwd_dkdv_kernel",
    "attention_bwd_dq_kernel",
    "layer_norm_fwd_kernel",
    "layer_norm_bwd_kernel",
    "linear_kernel",
    "splitk_reduce_kernel",
    "act_grad_kernel",
)
# kernels known to index in int32 where an offset can pass 2**31: name -> reason (a strict xfail each)
KNOWN_INT32: dict[str, str] = {}
ARCHS = (90, 80)  # sm_90: tensor descriptors and warp specialisation; sm_80: the pointer paths


# ----------------------------------------------------------------------------------------------------------------
# TTIR: a small reader for the textual IR Triton prints, enough for integer dataflow
# ----------------------------------------------------------------------------------------------------------------

_VALUE = r"%[\w$.\-]+(?:#\d+)?"
_SHAPE_OPS = {
    "tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape", "tt.trans", "tt.join", "tt.split", "tt.cat",
    "ttg.convert_layout", "tt.unsplat",
}  # fmt: skip
_OVERFLOWING = {"arith.addi", "arith.subi", "arith.muli", "arith.shli", "arith.trunci", "arith.index_cast"}
# ops whose integer operands are addresses (or describe them) even without a tt.addptr
_ADDRESS_OPS = {
    "tt.make_tensor_descriptor", "tt.descriptor_load", "tt.descriptor_store", "tt.descriptor_gather",
    "tt.descriptor_scatter", "tt.descriptor_reduce", "tt.make_tensor_ptr", "tt.advance",
}  # fmt: skip


@dataclass
class Op:
    name: str  # e.g. "arith.muli"; "func.arg", "scf.for.iv", "scf.for.arg", "block.arg" for region values
    results: list[str]
    operands: list[str]
    types: list[str]  # result types, or "" where a result's type is that of its first input (inputs)
    body: str  # the op's text without its location
    loc: str  # its location expression
    inputs: list[list[str]] = field(default_factory=list)  # per result: the values it may take (regions)


def _elem(ty: str) -> str:
    """The element type of a scalar or tensor type."""
    ty = ty.strip()
    if ty.startswith("tensor<") and ty.endswith(">"):
        ty = re.sub(r"^(?:\d+x)+", "", ty[len("tensor<") : -1])
    return ty


def _bits(ty: str) -> int | None:
    """Width of an integer type (or a tensor of integers), None for anything else."""
    m = re.fullmatch(r"i(\d+)", _elem(ty))
    return int(m.group(1)) if m else None


def _split_top(text: str, sep: str = ",") -> list[str]:
    """``text`` split at ``sep`` outside <>, (), [] and {}."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "<([{"
        depth -= ch in ">)]}"
        if ch == sep and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [*parts, cur.strip()] if cur.strip() else parts


def _strip_loc(line: str) -> tuple[str, str]:
    """(the line without its trailing ``loc(...)``, the location expression)."""
    i = line.rfind(" loc(")
    if i < 0 or not line.rstrip().endswith(")"):
        return line, ""
    return line[:i].rstrip(), line[i + len(" loc(") : line.rstrip().rfind(")")]


def _result_types(name: str, body: str) -> list[str]:
    """Result types of a one-line op from its trailing type signature."""
    if " : " not in body:
        return ["i1"] if name.startswith("arith.cmp") else [""]
    sig = body.rsplit(" : ", 1)[1].strip()
    if name.startswith("arith.cmp"):
        return ["i1"]
    if " -> " in sig:
        sig = sig.rsplit(" -> ", 1)[1]
    elif " to " in sig:
        sig = sig.split(" to ", 1)[1]
    types = _split_top(sig.strip("()"))
    if name == "tt.addptr":
        return types[:1]
    if name == "tt.load":  # the pointee of the pointer (tensor) type
        m = re.search(r"!tt\.ptr<([^>]*)>", types[0])
        return [m.group(1) if m else ""]
    return types[-1:] if len(types) > 1 and name in ("arith.select",) else types


def _result_names(lhs: str) -> list[str]:
    names = []
    for part in _split_top(lhs):
        m = re.fullmatch(r"(%[\w$.\-]+)(?::(\d+))?", part.strip())
        if not m:
            raise ValueError(f"cannot read results {lhs!r}")
        names += [m.group(1)] if m.group(2) is None else [f"{m.group(1)}#{i}" for i in range(int(m.group(2)))]
    return names


class _Scopes:
    """SSA names by region: MLIR's printer reuses a name in sibling regions (two inlined copies of a helper in two
    loops), so each definition gets a unique key and a use resolves to the innermost enclosing definition."""

    def __init__(self) -> None:
        self.stack: list[dict[str, str]] = [{}]
        self.used: set[str] = set()

    def define(self, name: str) -> str:
        key, n = name, 0
        while key in self.used:
            n += 1
            key = f"{name}@{n}"
        self.used.add(key)
        self.stack[-1][name] = key
        return key

    def use(self, name: str) -> str:
        return next((s[name] for s in reversed(self.stack) if name in s), name)

    def uses(self, text: str) -> list[str]:
        return [self.use(v) for v in re.findall(_VALUE, text)]


def parse_ttir(text: str) -> tuple[list[Op], dict[str, str]]:
    """The ops of the (single) kernel function in TTIR ``text``, in order, and the module's location aliases.

    Values that regions produce (loop-carried values, scf.if / reduce results, block arguments) list what flows
    into them in ``Op.inputs``: a loop's initial values and what its body yields, each branch's yield.
    """
    ops: list[Op] = []
    aliases: dict[str, str] = {}
    owners: list[Op | None] = []  # the op owning each open region (None: the module, the function)
    names = _Scopes()

    def open_region(owner: Op | None) -> None:
        owners.append(owner)
        names.stack.append({})

    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("//"):
            continue
        if line.startswith("#loc"):
            name, _, expr = line.partition(" = ")
            aliases[name] = expr[len("loc(") : -1]
            continue
        if line.startswith("module"):
            open_region(None)
            continue
        if line.startswith("tt.func"):
            open_region(None)
            header = line.split(") attributes", 1)[0]
            for name, ty in re.findall(rf"({_VALUE}): ([^\s{{,)]+(?:<[^>]*>)?)", header):
                ops.append(Op("func.arg", [names.define(name)], [], [ty], "", ""))
            continue
        if line.startswith("^"):  # a block label: its arguments are reduce/scan combiner inputs or cf block values
            owner = owners[-1] if owners else None
            for name, ty in re.findall(rf"({_VALUE}): ([^\s,)]+)", line):
                ins = [list(owner.operands)] if owner is not None and owner.name in ("tt.reduce", "tt.scan") else [[]]
                ops.append(Op("block.arg", [names.define(name)], [], [ty], "", "", ins))
            continue
        if line.startswith("}"):
            names.stack.pop()
            if line.startswith("} else {") or line.startswith("} do {"):  # the owner's next region
                names.stack.append({})
                continue
            owner = owners.pop()
            if owner is not None and owner.name in ("tt.reduce", "tt.scan") and "->" in line:
                sig = _strip_loc(line)[0].rsplit("->", 1)[1].strip().strip("()")
                owner.types = _split_top(sig)
            continue
        body, loc = _strip_loc(line)
        if line.startswith("scf.yield") or line.startswith("scf.condition"):
            owner = owners[-1] if owners else None
            values = names.uses(body.split(" : ")[0].split(")", 1)[-1] if "condition" in body else body.split(" : ")[0])
            for i, v in enumerate(values if owner is not None else []):
                if i < len(owner.inputs):
                    owner.inputs[i].append(v)
            continue
        lhs, eq, rhs = body.partition(" = ")
        if not eq or not lhs.startswith("%") or "(" in lhs:
            lhs, rhs = "", body
        m = re.match(r'"?([\w.]+)"?', rhs)
        name = m.group(1) if m else rhs.split()[0]
        if name == "scf.for":
            f = re.match(rf"scf\.for ({_VALUE}) = ({_VALUE}) to ({_VALUE}) step ({_VALUE})", rhs)
            iv, lb, ub, step = f.groups()
            lb, ub, step = names.use(lb), names.use(ub), names.use(step)
            pairs = re.findall(rf"({_VALUE}) = ({_VALUE})", rhs.split("iter_args", 1)[1]) if "iter_args" in rhs else []
            inits = [names.use(x) for _, x in pairs]
            results = [names.define(r) for r in _result_names(lhs)] if lhs else []
            loop = Op("scf.for", results, [lb, ub, step, *inits], [""] * len(results), rhs, loc, [[x] for x in inits])
            open_region(loop)
            ops.append(Op("scf.for.iv", [names.define(iv)], [lb, ub, step], [""], rhs, loc, [[lb, ub]]))
            # the loop-carried values take the same inputs as the loop's results: the inits, then the yields
            ops.append(Op("scf.for.arg", [names.define(a) for a, _ in pairs], [], [""] * len(pairs), rhs, loc))
            ops[-1].inputs = loop.inputs
            ops.append(loop)
            continue
        operands = names.uses(rhs)
        results = [names.define(r) for r in _result_names(lhs)] if lhs else []
        if rhs.endswith("{"):  # scf.if, scf.while, tt.reduce, tt.scan, ...: results take what the regions yield
            op = Op(name, results, operands, [""] * len(results), rhs, loc, [[] for _ in results])
            if name in ("tt.reduce", "tt.scan"):
                op.inputs = [[x] for x in operands]
            ops.append(op)
            open_region(op)
            continue
        types = _result_types(name, rhs) if results else []
        types = types * len(results) if len(types) == 1 else types  # tt.split: one type for both halves
        ops.append(Op(name, results, operands, types, rhs, loc))
    return ops, aliases


# ----------------------------------------------------------------------------------------------------------------
# intervals
# ----------------------------------------------------------------------------------------------------------------

Interval = tuple[int, int]


def _full(bits: int) -> Interval:
    return (0, 1) if bits == 1 else (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)


def _fits(iv: Interval, bits: int) -> bool:
    lo, hi = _full(bits)
    return lo <= iv[0] and iv[1] <= hi


def _join(ivs: list[Interval]) -> Interval | None:
    ivs = [iv for iv in ivs if iv is not None]
    return (min(lo for lo, _ in ivs), max(hi for _, hi in ivs)) if ivs else None


def _corners(f: Callable[[int, int], int], a: Interval, b: Interval) -> Interval:
    vals = [f(x, y) for x in a for y in b]
    return min(vals), max(vals)


def _div(x: int, y: int) -> int:  # C division (arith.divsi truncates toward zero)
    q = abs(x) // abs(y)
    return q if (x >= 0) == (y > 0) else -q


def _transfer(op: Op, args: list[Interval | None], bits: int, env: dict) -> Interval | None:
    """The exact (unwrapped) range of ``op``'s result, given its operands' ranges; None when not an integer."""
    name, full = op.name, _full(bits)
    a = args[0] if args else None
    b = args[1] if len(args) > 1 else None
    if name == "arith.constant":
        m = re.match(r"arith\.constant (?:dense<)?(-?\d+|true|false)\b", op.body)
        if not m:
            return full
        v = {"true": 1, "false": 0}.get(m.group(1))
        v = int(m.group(1)) if v is None else v
        return (v, v)
    if name == "tt.get_program_id":
        n = env["grid"]["xyz".index(op.body.split()[1])]
        return (0, n - 1)
    if name == "tt.get_num_programs":
        n = env["grid"]["xyz".index(op.body.split()[1])]
        return (n, n)
    if name == "tt.make_range":
        start = int(re.search(r"start = (-?\d+)", op.body).group(1))
        end = int(re.search(r"end = (-?\d+)", op.body).group(1))
        return (start, end - 1)
    if name.startswith("arith.cmp"):
        return (0, 1)
    if name in ("arith.extsi", "arith.trunci", "arith.index_cast", "arith.bitcast") and a is not None:
        return a if name != "arith.bitcast" or _fits(a, bits) else full
    if name == "arith.extui" and a is not None:
        return a if a[0] >= 0 else (0, (1 << _bits(op.body.rsplit(" : ", 1)[1].split(" to ")[0])) - 1)
    if name in _SHAPE_OPS:
        return _join(args)
    if name == "arith.select":
        return _join(args[1:])
    if a is None or (b is None and len(op.operands) > 1):
        return full
    if name == "arith.addi":
        return (a[0] + b[0], a[1] + b[1])
    if name == "arith.subi":
        return (a[0] - b[1], a[1] - b[0])
    if name == "arith.muli":
        return _corners(lambda x, y: x * y, a, b)
    if name == "arith.shli":
        return _corners(lambda x, y: x << y, a, b) if 0 <= b[0] and b[1] < bits else full
    if name in ("arith.shrsi", "arith.shrui"):
        return _corners(lambda x, y: x >> y, a, b) if a[0] >= 0 and 0 <= b[0] and b[1] < bits else full
    if name in ("arith.divsi", "arith.divui", "arith.floordivsi", "arith.ceildivsi"):
        if b[0] > 0 or b[1] < 0:
            f = {"arith.floordivsi": lambda x, y: x // y, "arith.ceildivsi": lambda x, y: -(-x // y)}.get(name, _div)
            return _corners(f, a, b)
        m = max(abs(a[0]), abs(a[1]))
        return (-m, m)
    if name in ("arith.remsi", "arith.remui"):
        m = max(abs(b[0]), abs(b[1])) - 1
        return (0 if a[0] >= 0 else max(a[0], -m), max(0, min(a[1], m)))
    if name in ("arith.minsi", "arith.minui"):
        return (min(a[0], b[0]), min(a[1], b[1]))
    if name in ("arith.maxsi", "arith.maxui"):
        return (max(a[0], b[0]), max(a[1], b[1]))
    if name == "arith.andi":
        if a[0] >= 0 or b[0] >= 0:
            return (0, min(x[1] for x in (a, b) if x[0] >= 0))
        return full
    if name in ("arith.ori", "arith.xori"):
        return (0, (1 << max(a[1], b[1]).bit_length()) - 1) if a[0] >= 0 and b[0] >= 0 else full
    return full


@dataclass
class Overflow:
    op: str
    where: list[str]  # file:line, innermost (the helper) first, then its callers
    source: str  # the source line
    operands: list[Interval | None]
    result: Interval
    sink: str = ""  # what the value reaches: "an address", "a Philox counter"


def _loc_chain(expr: str, aliases: dict[str, str], depth: int = 0) -> list[str]:
    """file:line of a location expression, innermost first (a callsite gives the callee, then its caller)."""
    expr = expr.strip()
    if depth > 50 or not expr or expr == "unknown":
        return []
    if expr.startswith("#loc"):
        return _loc_chain(aliases.get(expr, ""), aliases, depth + 1)
    if expr.startswith("loc(") and expr.endswith(")"):
        return _loc_chain(expr[4:-1], aliases, depth + 1)
    m = re.fullmatch(r'"([^"]*)":(\d+):\d+', expr)
    if m:
        return [f"{m.group(1)}:{m.group(2)}"]
    m = re.fullmatch(r'"[^"]*"\((.*)\)', expr)  # a named location
    if m:
        return _loc_chain(m.group(1), aliases, depth + 1)
    m = re.fullmatch(r"callsite\((.*) at (.*)\)", expr)
    if m:
        return _loc_chain(m.group(1), aliases, depth + 1) + _loc_chain(m.group(2), aliases, depth + 1)
    m = re.fullmatch(r"fused(?:<[^>]*>)?\[(.*)\]", expr)
    if m:
        return next((c for c in (_loc_chain(p, aliases, depth + 1) for p in _split_top(m.group(1))) if c), [])
    return []


@functools.cache
def _realpath(path: str) -> str:
    return os.path.realpath(path)


@functools.cache
def _lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def _source(where: list[str]) -> str:
    """The source line of the innermost location that can be read."""
    for w in where:
        path, _, line = w.rpartition(":")
        with contextlib.suppress(ValueError, IndexError):
            return _lines(path)[int(line) - 1].strip()
    return ""


def analyse(
    text: str, values: dict[str, Any], grid: tuple[int, int, int], counter_fn: tuple[str, int, int] | None = None
) -> dict[str, Any]:
    """Integer ranges over one launch's TTIR; overflows of i32 arithmetic that reach an address or a Philox counter.

    ``values`` maps argument names to the launch's values: ints (their range is the value), CPU integer tensors
    (a load through them reads their min..max), anything else (pointers: a load reads its type's full range).
    ``counter_fn`` is (file, first line, last line) of the Philox function: what flows into it is an element index.
    """
    ops, aliases = parse_ttir(text)
    env = {"grid": grid}
    defs: dict[str, tuple[Op, int]] = {r: (op, i) for op in ops for i, r in enumerate(op.results)}
    bits: dict[str, int | None] = {}

    def width(v: str) -> int | None:
        if v not in bits:
            op, i = defs[v]
            ty = op.types[i] if i < len(op.types) else ""
            if ty:
                bits[v] = _bits(ty)
            else:  # a region result or loop value: the type of what flows into it
                bits[v] = None  # (cycle guard)
                srcs = op.inputs[i] if i < len(op.inputs) else []
                bits[v] = next((w for w in (width(s) for s in srcs if s in defs) if w is not None), None)
        return bits[v]

    def load_range(op: Op, w: int) -> Interval:
        v, seen = op.operands[0], set()
        while v in defs and v not in seen:  # walk the pointer back to the kernel argument it offsets
            seen.add(v)
            src = defs[v][0]
            if src.name == "func.arg":
                t = values.get(v[1:])
                if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not t.is_floating_point() and t.numel():
                    return (int(t.min()), int(t.max()))
                break
            if not src.operands:
                break
            v = src.operands[0]
        return _full(w)

    iv: dict[str, Interval | None] = {}
    for op in ops:
        if op.name == "func.arg":
            x = values.get(op.results[0][1:])
            w = width(op.results[0])
            iv[op.results[0]] = (int(x), int(x)) if w and isinstance(x, (int, bool)) else (_full(w) if w else None)
    overflows: dict[int, Overflow] = {}
    for sweep in range(12):  # to a fixed point; loop-carried integers that keep growing are widened
        changed = False
        for k, op in enumerate(ops):
            if op.name == "func.arg":
                continue
            for i, r in enumerate(op.results):
                w = width(r)
                if w is None:
                    new = None
                elif op.inputs and i < len(op.inputs) and op.name != "tt.load":
                    srcs = op.inputs[i]
                    if op.name == "scf.for.iv":  # lb <= iv < ub
                        lb, ub = iv.get(srcs[0]), iv.get(srcs[1])
                        new = None if lb is None or ub is None else (lb[0], max(lb[1], ub[1] - 1))
                    elif op.name in ("tt.reduce", "tt.scan"):
                        new = _full(w)
                    else:
                        new = _join([iv.get(s) for s in srcs]) or (_full(w) if op.name == "block.arg" else None)
                elif op.name == "tt.load":
                    new = load_range(op, w)
                elif op.name == "block.arg":
                    new = _full(w)
                else:
                    args = [iv.get(x) for x in op.operands]
                    new = _transfer(op, args, w, env)
                    if op.name in _OVERFLOWING and new is not None and not _fits(new, w) and w == 32:
                        ok_in = all(x is None or _fits(x, width(o) or 64) for x, o in zip(args, op.operands))
                        if ok_in:  # the root: its operands are in range, its result is not
                            where = _loc_chain(op.loc, aliases)
                            overflows[k] = Overflow(op.name, where, _source(where), args, new)
                old = iv.get(r)
                if new is not None and old is not None and sweep >= 1:
                    new = _join([old, new])
                    if sweep >= 8 and new != old:
                        new = _full(w)
                if new != old:
                    iv[r], changed = new, True
        if not changed:
            break

    # which values reach an address (backwards from every pointer offset and descriptor operand), and which reach
    # a Philox counter (the dropout mask's element index: the values entering the ``counter_fn`` span)
    def reaching(roots: list[str]) -> set[str]:
        reach, todo = set(), list(roots)
        while todo:
            v = todo.pop()
            if v in reach or v not in defs or not width(v) or width(v) == 1:
                continue
            reach.add(v)
            op, i = defs[v]
            todo += op.inputs[i] if op.inputs and i < len(op.inputs) else []
            todo += [] if op.name in ("tt.load", "block.arg") else op.operands
        return reach

    def inside(op: Op) -> bool:
        where = _loc_chain(op.loc, aliases)[:1] if counter_fn is not None else []
        if not where:
            return False
        path, _, line = where[0].rpartition(":")
        return _realpath(path) == counter_fn[0] and counter_fn[1] <= int(line) <= counter_fn[2]

    addresses = [op.operands[1] for op in ops if op.name == "tt.addptr"]
    addresses += [x for op in ops if op.name in _ADDRESS_OPS for x in op.operands if x in defs and width(x)]
    counters = [x for op in ops if inside(op) for x in op.operands if x in defs and not inside(defs[x][0])]
    sinks = {"an address": reaching(addresses), "a Philox counter": reaching(counters)}
    found = []
    for k, o in sorted(overflows.items()):
        o.sink = ", ".join(s for s, reach in sinks.items() if any(r in reach for r in ops[k].results))
        found += [o] if o.sink else []
    offsets = [iv[r] for op in ops if op.name == "tt.addptr" for r in op.operands[1:2] if iv.get(r)]
    return dict(
        overflows=[o.__dict__ for o in found],
        max_offset=max((max(abs(lo), abs(hi)) for lo, hi in offsets), default=0),
        addresses=len(addresses),
        counters=len(counters),
        unranged=sorted({r for r in addresses + counters if iv.get(r) is None}),  # a gap in this reader
    )


# ----------------------------------------------------------------------------------------------------------------
# launches: the launchers on large problems (meta tensors), recorded by fastformer.inspect's capture
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _int32_rows_kernel(X, Y, stride, n, BLOCK: tl.constexpr):
    # the bug this file looks for: program_id * stride (and * n) in int32
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    x = tl.load(X + row * stride + cols, mask=cols < n)
    tl.store(Y + row * n + cols, x, mask=cols < n)


@triton.jit
def _int64_rows_kernel(X, Y, stride, n, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    x = tl.load(X + row * stride + cols, mask=cols < n)
    tl.store(Y + row * n + cols, x, mask=cols < n)


@contextlib.contextmanager
def _meta_tensors() -> Iterator[None]:
    """capture's scenario builders make their activations and weights on the meta device: no memory."""
    from fastformer.inspect import capture

    saved = capture._t
    capture._t = lambda *shape, dtype=capture.BF16: torch.empty(shape, dtype=dtype, device="meta")
    try:
        yield
    finally:
        capture._t = saved


@contextlib.contextmanager
def _patched(module: Any, name: str, value: Any) -> Iterator[None]:
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def _rows_demo(kernel: Any) -> Callable[[], None]:
    def run() -> None:
        m, n = 1 << 20, 4096  # 2**32 elements
        x, y = (torch.empty(m, n, dtype=torch.bfloat16, device="meta") for _ in range(2))
        kernel[(m,)](x, y, n, n, BLOCK=n)

    return run


def _forced_split_k() -> None:
    """Plain GEMMs with split-K forced to 4 (the policy only splits small outputs), written by linear_kernel as fp32
    partials and summed by splitk_reduce_kernel: a 2**30-element output (i32 ``mn``, a 2**32-element workspace) and a
    2**32-element one (i64 ``mn``), each with the weight also as nn.Linear stores it."""
    from fastformer.ops.ffn import triton_impl

    with _patched(triton_impl, "split_k", lambda *_: 4):
        for side in (1 << 15, 1 << 16):
            a = torch.empty(side, 4096, dtype=torch.bfloat16, device="meta")
            b = torch.empty(side, 4096, dtype=torch.bfloat16, device="meta")
            triton_impl.gemm(a, b.t(), torch.bfloat16)
            triton_impl.gemm(a, b.t().contiguous(), torch.bfloat16)


def _forced_split_kv() -> None:
    """Split-KV decoding forced to 16 splits on many rows (the policy splits only few): fp32 partials of
    16 * 2**24 * 128 = 2**35 elements, merged by attention_fwd_combine_kernel."""
    from fastformer.inspect import capture
    from fastformer.ops.attention import triton_tuning

    with _patched(triton_tuning, "num_splits", lambda *_: 16):
        capture._attention(1 << 16, 1 << 12, 256, 64, 128, True, sq=1, bwd=False)


def scenarios() -> dict[str, Callable[[], None]]:
    """Large problems through the real launchers (bf16 training steps unless stated), every kernel and path."""
    from fastformer.inspect.capture import _attention, _attention_varlen, _ffn, _layer_norm

    return {
        # 2**39 elements in batches of 2**23 (i32 batch stride); B * H * S = 2**32 logsumexp rows
        "attention causal 65536x2048x32x128": lambda: _attention(1 << 16, 2048, 32, 32, 128, True),
        # one sequence of 2**33 elements: its rows pass 2**31 (i64 batch stride, i32 token stride); TMA + WS forward
        "attention 1x4194304 GQA 32:8 d64": lambda: _attention(1, 1 << 22, 32, 8, 64, False),
        # padding mask and dropout: Philox rows of B * H * Sq = 2**31.3, mask (B, S)
        "attention 65536x512x80x64 padded+dropout": lambda: _attention(1 << 16, 512, 80, 80, 64, False, True, 0.1),
        # packed: 64 sequences of 2**20 tokens, lse (H, total) of 2**32 rows, cu_seqlens read by the kernels
        "attention varlen 64x1048576 h64 d128 dropout": lambda: _attention_varlen([1 << 20] * 64, 64, 128, 0.1),
        # decoding a 2**26-key cache (2**37-element K/V): the split-KV policy's own choice
        "decode 2x67108864 GQA 32:8 d128": lambda: _attention(2, 1 << 26, 32, 8, 128, True, sq=1, bwd=False),
        "decode split-KV forced, 2**35 partials": _forced_split_kv,
        # h = gelu(x W1 + b1) of 2**33 elements; the weight gradients read 2**21-long transposed views
        "ffn 2097152x1024x4096 gelu_tanh": lambda: _ffn(1 << 21, 1024, 4096, 0.0),
        "ffn 2097152x1024x4096 gelu_tanh dropout": lambda: _ffn(1 << 21, 1024, 4096, 0.1),
        "linear 2097152x1024x4096 gelu (act_grad)": lambda: _ffn(1 << 21, 1024, 4096, 0.0, second_layer=False),
        "gemm split-K forced, 2**32 and 2**34 workspaces": _forced_split_k,
        # 2**32 elements at widths of one chunk, three chunks (768) and the widest row
        "layer_norm 4194304x1024 residual+dropout": lambda: _layer_norm(1 << 22, 1024, True),
        "layer_norm 4194304x768 plain": lambda: _layer_norm(1 << 22, 768, False),
        "layer_norm 65536x65536 residual+dropout": lambda: _layer_norm(1 << 16, 1 << 16, True),
    }


def _ttir(launch: Any, j: dict[str, Any]) -> str:
    """The TTIR of a compile job (``fastformer.inspect.compile.job``): Triton's front end and TTIR passes only, as
    ``triton.compile`` runs them first (the later stages do not change integer widths)."""
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", j["arch"], 32)
    backend = make_backend(target)
    src = ASTSource(launch.fn, j["signature"], j["constexprs"], j["attrs"])
    options = backend.parse_options(j["options"])
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    codegen = backend.get_codegen_implementation(options)
    module = src.make_ir(target, options, codegen, backend.get_module_map(), context)
    stages: dict = {}
    backend.add_stages(stages, options, src.language)
    return str(stages["ttir"](module, {}))


def check(archs: tuple[int, ...] = ARCHS, demo: bool = True) -> dict[str, Any]:
    """Every launch of ``scenarios()`` (and the demo kernels) on each arch: its int arguments and the overflows."""
    from fastformer.inspect import capture
    from fastformer.inspect import compile as inspect_compile

    runs = dict(scenarios())
    if demo:
        runs |= {"demo int32": _rows_demo(_int32_rows_kernel), "demo int64": _rows_demo(_int64_rows_kernel)}
    rows, cache, philox = [], {}, _philox_span()
    for arch in archs:
        with _meta_tensors():
            launches = capture.capture(arch, runs)
        seen = set()
        for launch in launches:
            # pruned candidates are never launched; past sm_90 the untuned defaults cover the pointer paths
            if launch.status == "pruned" or (launch.status == "tried" and arch != archs[0]):
                continue
            j = inspect_compile.job(launch, arch)
            key = inspect_compile.key(j)
            bound = {**dict(zip(launch.fn.arg_names, launch.args)), **launch.kwargs}
            ints = {k: v for k, v in bound.items() if k in j["signature"] and j["signature"][k] in ("i32", "i64")}
            ident = (key, launch.grid, tuple(sorted(ints.items())))
            if ident in seen:
                continue
            seen.add(ident)
            if key not in cache:
                cache[key] = _ttir(launch, j)
            result = analyse(cache[key], bound, launch.grid, philox)
            py_ints = all(type(v) is int for k, v in bound.items() if j["signature"].get(k) in ("i32", "i64"))
            numel = max((t.numel() for t in bound.values() if isinstance(t, torch.Tensor)), default=0)
            rows.append(dict(
                arch=arch, scenario=launch.scenario, kernel=launch.kernel, status=launch.status,
                config=" ".join(f"{k}={v}" for k, v in launch.config.items()), grid=launch.grid,
                i64_args=sorted(k for k, t in j["signature"].items() if t == "i64"),
                big_args={k: v for k, v in ints.items() if abs(v) > INT32_MAX}, python_ints=py_ints, numel=numel,
                **result,
            ))  # fmt: skip
    return dict(rows=rows, kernels=sorted(_all_kernels()), compiles=len(cache))


def _philox_span() -> tuple[str, int, int]:
    """(file, first line, last line) of kernels/dropout.py's philox4x32: its inputs are dropout element indices."""
    import inspect

    from fastformer.kernels import dropout

    lines, first = inspect.getsourcelines(dropout.philox4x32.fn)
    return os.path.realpath(inspect.getsourcefile(dropout.philox4x32.fn)), first, first + len(lines) - 1


def _all_kernels() -> set[str]:
    """The kernels of kernels/*.py that launchers launch: public JIT functions that no other one calls."""
    import importlib
    import pkgutil

    import fastformer.kernels as package
    from triton.runtime.jit import JITFunction

    mods = [importlib.import_module(f"{package.__name__}.{m.name}") for m in pkgutil.iter_modules(package.__path__)]
    fns = {
        n: f for m in mods for n, f in vars(m).items() if isinstance(f, JITFunction) and f.fn.__module__ == m.__name__
    }
    called = {n for n in fns for g in fns.values() if g is not fns[n] and re.search(rf"\b{n}\(", g.src)}
    return {n for n in fns if not n.startswith("_") and n not in called}


def _site(o: dict[str, Any]) -> str:
    """Where an overflow is: the op, the source line with its helper call chain, and what it reaches."""
    where = " <- ".join(w.replace(str(Path(__file__).resolve().parents[1]) + "/", "") for w in o["where"])
    return f"{o['op']} at {where} (reaches {o['sink']}): `{o['source']}`"


def _overflows(rows: list[dict[str, Any]]) -> list[str]:
    """One entry per overflow site: the site, how many launches hit it, the first one and its operands' ranges."""
    sites: dict[str, list[str]] = {}
    for r in rows:
        for o in r["overflows"]:
            ranges = f"{o['operands']} -> {o['result']}"
            sites.setdefault(_site(o), []).append(f"sm_{r['arch']} {r['scenario']!r} [{r['config']}]: {ranges}")
    return [f"{site}\n    {len(w)} launches, e.g. {w[0]}" for site, w in sorted(sites.items())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--arch", type=int, action="append", help="sm arch (repeatable; default 90 and 80)")
    args = parser.parse_args(argv)
    t0 = time.time()
    report = check(tuple(args.arch or ARCHS))
    report["seconds"] = round(time.time() - t0, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    by_kernel: dict[str, list] = {}
    for r in report["rows"]:
        by_kernel.setdefault(r["kernel"], []).append(r)
    for kernel, rs in sorted(by_kernel.items()):
        bad = _overflows(rs)
        top = max(r["max_offset"] for r in rs)
        demo = " (the checker's self-test: int32 must FAIL, int64 pass)" if kernel.startswith("_") else ""
        print(f"{'FAIL' if bad else 'ok  '} {kernel}: {len(rs)} launches, largest offset {top:.3g}{demo}")
        for b in bad:
            print(f"     {b}")
    print(f"{len(report['rows'])} launches, {report['compiles']} TTIR compiles, {report['seconds']} s")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# tests: CPU
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The analysis of every launch, run once in a process with Triton's compiler (not its interpreter)."""
    out = tmp_path_factory.mktemp("int64") / "int64.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--json", str(out)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0 and out.exists(), run.stdout[-3000:] + run.stderr[-5000:]
    return json.loads(out.read_text())


def _rows(report: dict[str, Any], kernel: str) -> list[dict[str, Any]]:
    return [r for r in report["rows"] if r["kernel"] == kernel]


def test_every_kernel_is_checked(report):
    assert set(report["kernels"]) == set(KERNELS), "a kernel was added or removed: update KERNELS and scenarios()"
    for arch in ARCHS:
        assert {r["kernel"] for r in report["rows"] if r["arch"] == arch} >= set(KERNELS), arch


def _known(kernel: str) -> Any:
    return pytest.param(kernel, marks=pytest.mark.xfail(strict=True, reason=KNOWN_INT32[kernel]))


@pytest.mark.parametrize("kernel", [_known(k) if k in KNOWN_INT32 else k for k in KERNELS])
def test_offsets_are_computed_without_int32_overflow(report, kernel):
    rows = _rows(report, kernel)
    assert rows
    # the launches do address tensors of more than 2**31 elements, and every offset was given a range
    assert max(r["numel"] for r in rows) > INT32_MAX
    assert all(r["addresses"] > 0 and not r["unranged"] for r in rows), [r["unranged"] for r in rows]
    found = _overflows(rows)
    assert not found, f"{kernel} computes offsets in int32 that pass 2**31:\n" + "\n".join(found[:20])


def test_launchers_pass_sizes_as_python_ints(report):
    """A Python int becomes i64 from 2**31 on; a numpy or torch integer could keep 32 bits."""
    assert all(r["python_ints"] for r in report["rows"]), [
        r["scenario"] for r in report["rows"] if not r["python_ints"]
    ]
    big = [r for r in report["rows"] if r["big_args"]]
    assert {r["kernel"] for r in big} >= {"attention_fwd_kernel", "splitk_reduce_kernel"}  # strides, sizes >= 2**31
    assert all(set(r["big_args"]) <= set(r["i64_args"]) for r in big)


def test_checker_catches_int32_indexing(report):
    bad, good = _rows(report, "_int32_rows_kernel"), _rows(report, "_int64_rows_kernel")
    assert len(bad) == len(good) == len(ARCHS)
    for r in bad:
        assert [(o["op"], o["source"], o["sink"]) for o in r["overflows"]] == [
            ("arith.muli", "x = tl.load(X + row * stride + cols, mask=cols < n)", "an address"),
            ("arith.muli", "tl.store(Y + row * n + cols, x, mask=cols < n)", "an address"),
        ]
        assert r["overflows"][0]["result"] == [0, ((1 << 20) - 1) * 4096]
    assert all(not r["overflows"] and r["max_offset"] > INT32_MAX for r in good)


_TTIR = """
module {
  tt.func public @k(%X: !tt.ptr<f32> loc("X"(#loc)), %n: i32 loc("n"(#loc)), %key: i32 loc("key"(#loc))) {
    %c0_i32 = arith.constant 0 : i32 loc(#loc1)
    %c1_i32 = arith.constant 1 : i32 loc(#loc1)
    %c64_i32 = arith.constant 64 : i32 loc(#loc1)
    %pid = tt.get_program_id x : i32 loc(#loc1)
    %cond = arith.cmpi slt, %pid, %n : i32 loc(#loc1)
    %wrap = arith.muli %key, %n : i32 loc(#loc1)
    %t = scf.for %i = %c0_i32 to %n step %c64_i32 iter_args(%acc = %c0_i32) -> (i32)  : i32 {
      %a = arith.muli %i, %c64_i32 : i32 loc(#loc2)
      %p = tt.addptr %X, %a : !tt.ptr<f32>, i32 loc(#loc2)
      %s = arith.addi %acc, %c1_i32 : i32 loc(#loc1)
      scf.yield %s : i32 loc(#loc1)
    } loc(#loc1)
    %r = scf.if %cond -> (i32) {
      %a = arith.muli %pid, %c64_i32 : i32 loc(#loc3)
      scf.yield %a : i32 loc(#loc1)
    } else {
      scf.yield %c0_i32 : i32 loc(#loc1)
    } loc(#loc1)
    %q = tt.addptr %X, %r : !tt.ptr<f32>, i32 loc(#loc3)
    tt.return loc(#loc1)
  } loc(#loc)
} loc(#loc)
#loc = loc("k.py":1:0)
#loc1 = loc("k.py":2:0)
#loc2 = loc("k.py":3:0)
#loc3 = loc(callsite(#loc4 at #loc5))
#loc4 = loc("k.py":4:0)
#loc5 = loc("k.py":5:0)
"""


def test_interval_reader_on_handwritten_ttir():
    """Loop bounds, scf.if results, a name reused in sibling regions, locations through call sites; an overflow
    that reaches no address (``%wrap``, as Philox's own arithmetic) is not reported."""
    ok = analyse(_TTIR, {"n": 1 << 20, "key": 1 << 20}, (1 << 20, 1, 1))
    assert ok["overflows"] == [] and ok["max_offset"] == ((1 << 20) - 1) * 64 and ok["addresses"] == 2
    bad = analyse(_TTIR, {"n": 1 << 26, "key": 1}, (1 << 26, 1, 1))
    assert [(o["where"], o["result"][1]) for o in bad["overflows"]] == [
        (["k.py:3"], ((1 << 26) - 1) * 64),  # the loop's iv * 64: iv < n
        (["k.py:4", "k.py:5"], ((1 << 26) - 1) * 64),  # the program id * 64 in the scf.if
    ]


# ----------------------------------------------------------------------------------------------------------------
# tests: GPU (sampled rows against a float64 reference on just those rows)
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def untuned(monkeypatch: pytest.MonkeyPatch) -> None:
    """One (default) config per kernel: autotuning these sizes would take minutes; the CPU part covers the rest."""
    monkeypatch.setenv("FASTFORMER_AUTOTUNE", "0")


def _sample(n: int) -> list[int]:
    return sorted({0, 1, n // 2, n - 2, n - 1})


@pytest.mark.gpu
@pytest.mark.usefixtures("untuned")
@pytest.mark.parametrize(
    "b,s,h",
    [(33, 4096, 128), (1, 65664, 256)],
    ids=["last-batch-past-2**31", "rows-past-2**31"],
)
def test_gpu_attention_past_2_31_elements(b, s, h):
    d = 128
    assert b * s * h * d > 1 << 31
    # q scaled up: each row attends to few keys, so outputs are O(1) and a row read from the wrong place shows
    q = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16).mul_(3)
    k, v = torch.randn_like(q), torch.randn_like(q)
    with torch.no_grad():
        out = fastformer.attention(q, k, v, causal=True, backend="triton")
    for bi in sorted({0, b - 1}):
        for hi in sorted({0, h - 1}):
            for i in _sample(s):
                scores = k[bi, : i + 1, hi].double() @ q[bi, i, hi].double() * d**-0.5
                ref = torch.softmax(scores, 0) @ v[bi, : i + 1, hi].double()
                torch.testing.assert_close(out[bi, i, hi].double(), ref, atol=2e-2, rtol=2e-2, msg=f"{bi} {i} {hi}")


@pytest.mark.gpu
@pytest.mark.usefixtures("untuned")
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_gpu_layer_norm_past_2_31_elements(residual):
    m, n = (1 << 19) + 17, 4096  # 2**31 + 69632 elements
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    w, b = (torch.randn(n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    rows = torch.tensor(_sample(m), device="cuda")
    with torch.no_grad():
        if residual:
            r = torch.randn_like(x)
            y, s = fastformer.dropout_add_layer_norm(x, r, w, b, dropout_p=0.0, backend="triton")
            s_ref = (x[rows].float() + r[rows].float()).bfloat16()
            torch.testing.assert_close(s[rows], s_ref, atol=0, rtol=0)  # the residual sum as stored
            ref = F.layer_norm(s_ref.double(), (n,), w.double(), b.double())
        else:
            y = fastformer.layer_norm(x, n, w, b, backend="triton")
            ref = F.layer_norm(x[rows].double(), (n,), w.double(), b.double())
    torch.testing.assert_close(y[rows].double(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.usefixtures("untuned")
def test_gpu_linear_bias_gelu_past_2_31_elements():
    m, k, n = (1 << 19) + 33, 256, 4096  # output of 2**31 + 135168 elements
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(n, k, device="cuda") * k**-0.5).bfloat16()
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y = fastformer.linear(x, w, bias, "gelu", backend="triton")
    assert y.numel() > 1 << 31
    rows = torch.tensor(_sample(m), device="cuda")
    ref = F.gelu(x[rows].double() @ w.double().T + bias.double())
    torch.testing.assert_close(y[rows].double(), ref, atol=2e-2, rtol=2e-2)


if __name__ == "__main__":
    sys.exit(main())
