"""Compile recorded launches as Triton's JIT would, and read their facts from the PTX and the cubin's SASS.

Each launch is specialised with Triton's own binder (16-byte pointer alignment, divisibility of integers by 16,
integers equal to 1 made constants: ``JITFunction.run`` on a GPU does the same), compiled for the target arch
with ``triton.compile`` (cached by Triton per source hash, so a second run is quick) and measured:

- ``mma``: ``wgmma`` when the SASS has HGMMA, ``mma.sync`` when it has HMMA, both joined by ``+``, else ``none``;
- ``regs``, ``stack`` (bytes of local memory per thread, where spills go) from ``cuobjdump -res-usage``, and
  ``spill_ops`` (LDL/STL instructions in the SASS);
- ``smem`` (bytes of shared memory the launch needs), ``tma`` (bulk tensor copies in the PTX);
- ``loop``: instructions in the kernel's largest loop body per warp per iteration (the hot loop), 0 if none.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from fastformer.inspect.capture import Launch


def job(launch: Launch, arch: int) -> dict[str, Any]:
    """A picklable compile job: the kernel by module and name, and its specialised signature."""
    import triton.runtime.jit as jit
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    fn, kwargs = launch.fn, dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = jit.create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return dict(
        module=fn.fn.__module__, name=fn.fn.__name__, arch=arch, signature=signature,
        constexprs=constexprs, attrs=attrs, options=options.__dict__,
    )  # fmt: skip


def key(j: dict[str, Any]) -> str:
    """Identity of a compile: two launches with the same key compile to the same cubin."""
    parts = ("signature", "constexprs", "attrs", "options")
    return repr([j[k] for k in ("module", "name", "arch")] + [sorted(j[k].items(), key=repr) for k in parts])


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _loop_body(sass: str) -> int:
    """Instructions in the largest loop: a backward branch to an earlier instruction closes a loop body.

    Only predicated branches close loops: an unconditional backward branch is a warp-specialised partition's
    jump back to its dispatch. Branches after the kernel's last unconditional EXIT are not loops either: they
    are the out-of-line retry stubs of mbarrier waits (TMA, wgmma pipelines), which jump back into the code.
    """
    addr, best = {}, 0
    lines = [ln for ln in sass.splitlines() if re.match(r"\s*/\*[0-9a-f]{4,}\*/", ln)]
    for i, ln in enumerate(lines):
        addr[int(re.match(r"\s*/\*([0-9a-f]+)\*/", ln).group(1), 16)] = i
    exits = [i for i, ln in enumerate(lines) if re.search(r"\*/\s+EXIT\s*;", ln)]
    if exits:
        lines = lines[: exits[-1]]
    for i, ln in enumerate(lines):
        target = re.search(r"@!?U?P\w*\s+BRA(?:\.\w+)*\s+(?:\w+,\s*)?(0x[0-9a-f]+)", ln)
        start = addr.get(int(target.group(1), 16)) if target else None
        if start is not None and start < i:  # (a branch to itself is the trailing trap, not a loop)
            best = max(best, i - start + 1)
    return best


def run_job(j: dict[str, Any]) -> dict[str, Any]:
    """Compile one job (in a worker process) and return its facts, or the compiler's error."""
    try:
        return _facts(j)
    except Exception as e:  # noqa: BLE001 - a kernel that does not compile is reported, not fatal
        return dict(error=f"{type(e).__name__}: {str(e)[:300]}", mma="?", regs=0, stack=0, spill_ops=0, smem=0,
                    tma=False, loop=0, dot=False)  # fmt: skip


def _facts(j: dict[str, Any]) -> dict[str, Any]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(j["module"]), j["name"])
    src = ASTSource(fn, j["signature"], j["constexprs"], j["attrs"])
    kernel = triton.compile(src, target=GPUTarget("cuda", j["arch"], 32), options=j["options"])
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
    field = lambda name: int(m.group(1)) if (m := re.search(rf"\b{name}:(\d+)", usage)) else 0  # noqa: E731
    # a kernel with both is reported as such: one matmul left on mma.sync is what --check must catch
    mma = "+".join(name for name, op in (("wgmma", "HGMMA"), ("mma.sync", "HMMA")) if op in sass) or "none"
    return dict(
        mma=mma, regs=field("REG"), stack=field("STACK"), spill_ops=len(re.findall(r"\b(?:LDL|STL)\b", sass)),
        smem=kernel.metadata.shared, tma="cp.async.bulk.tensor" in kernel.asm["ptx"], loop=_loop_body(sass),
        dot="tt.dot" in kernel.asm["ttir"],
    )  # fmt: skip


def compile_all(jobs: list[dict[str, Any]], workers: int | None = None) -> dict[str, dict[str, Any]]:
    """Facts per compile key, compiled in parallel worker processes (each key once)."""
    unique = {key(j): j for j in jobs}
    workers = workers or min(len(unique), os.cpu_count() or 1) or 1
    if workers == 1:
        return {k: run_job(j) for k, j in unique.items()}
    import multiprocessing

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return dict(zip(unique, pool.map(run_job, unique.values()), strict=True))
