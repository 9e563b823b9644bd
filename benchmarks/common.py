"""Shared benchmark harness: timing, measured device peaks, peers, tables and JSON.

Ratios are always against peers measured in the same process on the same inputs; fractions of
peak are against this device's *measured* copy bandwidth and bf16 matmul rate, not datasheet numbers.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", default=None, help="write results to this JSON file")
    p.add_argument("--quick", action="store_true", help="fewer shapes (CPU smoke run, or the GPU check)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    return p


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bench(fn: Callable[[], Any], warmup: int = 10, rep: int = 50) -> float:
    """Median milliseconds per call (CUDA events through triton's do_bench on GPU, wall clock on CPU)."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    for _ in range(min(warmup, 2)):
        fn()
    times = []
    for _ in range(max(3, min(rep, 5))):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# the CPU smoke runs (--quick without a GPU) of the model benchmarks use these tiny configs so they take seconds
TINY_GPT = dict(vocab_size=512, n_positions=128, n_embd=64, n_layer=2, n_head=2)
TINY_BERT = dict(
    vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
    max_position_embeddings=128,
)  # fmt: skip


def time_ms(fn: Callable[[], Any], warmup: int, iters: int) -> float:
    """Wall-clock ms per call after ``warmup`` calls, for whole training or inference steps (long enough that
    CUDA events would add nothing)."""
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / iters


def train_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, inputs: dict, amp: torch.dtype, device_type: str
) -> Callable[[], None]:
    """One optimizer step of a model whose output has ``.loss``, under autocast to ``amp`` unless that is fp32."""

    def step() -> None:
        with torch.autocast(device_type, dtype=amp, enabled=amp != torch.float32):
            loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _copy_gbps(n: int, dtype: torch.dtype, dev: torch.device) -> float:
    src = torch.empty(n, dtype=dtype, device=dev)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def _matmul_tflops(n: int, dtype: torch.dtype, dev: torch.device) -> float:
    m = torch.randn(n, n, dtype=dtype, device=dev)
    ms = bench(lambda: m @ m)
    return 2 * n**3 / ms / 1e9


@functools.cache
def peaks() -> dict[str, float]:
    """Measured copy bandwidth (GB/s, bytes read + written) and bf16 matmul rate (TFLOP/s) of this device."""
    dev = device()
    if dev.type != "cuda":
        return {
            "copy_gbps": _copy_gbps(1 << 24, torch.float32, dev),
            "matmul_tflops": _matmul_tflops(512, torch.float32, dev),
        }
    # 1 GiB of bf16 per side, far past L2; 8192^3 bf16 products on random data
    return {
        "copy_gbps": _copy_gbps(1 << 29, torch.bfloat16, dev),
        "matmul_tflops": _matmul_tflops(8192, torch.bfloat16, dev),
    }


def peak_mem_mb(step: Callable[[], Any]) -> float | None:
    """Peak CUDA memory (MiB) that one call of ``step`` allocates beyond what was live before; None without a GPU."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def maybe_compile(fn: Callable, enabled: bool = True) -> Callable | None:
    """torch.compile'd ``fn``, or None when compiling is disabled or fails here."""
    if not enabled:
        return None
    try:
        return torch.compile(fn)
    except Exception:  # noqa: BLE001 - a peer that cannot compile is reported as missing
        return None


def env_info() -> dict[str, Any]:
    import triton

    info: dict[str, Any] = {
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        import subprocess

        info["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        pass
    return info


def print_table(rows: Sequence[dict[str, Any]], title: str) -> None:
    if not rows:
        print(f"== {title}: no rows")
        return
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = {c: (lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)) for c in cols}
    cells = [[fmt[c](r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print(f"== {title}")
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def finish(name: str, rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Print the table and write JSON (if asked); returns the payload."""
    payload = {"bench": name, "env": env_info(), "peaks": peaks(), "rows": rows}
    print_table(rows, f"{name} on {payload['env']['device']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
    return payload
