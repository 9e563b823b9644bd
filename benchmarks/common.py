"""Shared benchmark harness: timing, measured device peaks, peers, rotated inputs, tables, JSON, CSV and plots.

Ratios are always against peers measured in the same process on the same inputs; fractions of
peak are against this device's *measured* copy bandwidth and bf16 matmul rate, not datasheet numbers.

Every bench takes ``--json FILE``, ``--csv FILE`` and ``--plot FILE.png`` (see :func:`finish`). A CSV row is one
metric of one provider on one case: ``CSV_COLUMNS``, with the median and the 20th/80th percentiles over the
timed calls. Derived metrics (GB/s, TFLOP/s, tokens/s, speed-ups) carry quantiles derived from the time's, so their
p20 comes from the time's p80; they reflect the spread of that provider's own time only, not its baseline's.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

import torch

T = TypeVar("T")
U = TypeVar("U")

CSV_COLUMNS = (
    "op", "provider", "mode", "shape", "dtype", "metric", "median", "p20", "p80",
    "device", "versions", "commit", "date",
)  # fmt: skip


def parser(description: str, name: str | None = None) -> argparse.ArgumentParser:
    """The options every bench takes; ``name`` (the bench's) makes ``--help`` say ``fastformer bench NAME``."""
    p = argparse.ArgumentParser(prog=f"fastformer bench {name}" if name else None, description=description)
    p.add_argument("--json", default=None, metavar="FILE", help="write results to this JSON file")
    p.add_argument(
        "--csv", default=None, metavar="FILE", help="write one CSV row per metric, columns " + ", ".join(CSV_COLUMNS)
    )
    p.add_argument(
        "--plot", default=None, metavar="FILE.png", help="plot each provider's speed-up over the baseline (PNG)"
    )
    p.add_argument("--quick", action="store_true", help="fewer shapes (CPU smoke run, or the GPU check)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    return p


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclasses.dataclass(frozen=True)
class Timing:
    """Milliseconds per call: the median and the 20th and 80th percentiles."""

    median: float
    p20: float
    p80: float

    def row(self) -> dict[str, float]:
        """Row columns: ``ms`` (the median) then ``ms_p20`` and ``ms_p80`` (kept for JSON and CSV, not printed)."""
        return {"ms": self.median, "ms_p20": self.p20, "ms_p80": self.p80}


# on CPU: at least this many timed calls, so that p20 and p80 each rest on a couple of samples, and more (up to
# the cap) while the rep budget lasts
CPU_MIN_SAMPLES, CPU_MAX_SAMPLES = 10, 200


def bench_stats(fn: Callable[[], Any], warmup: int = 10, rep: int = 50) -> Timing:
    """Median, p20 and p80 milliseconds per call of ``fn``: CUDA events through triton's do_bench on GPU (warmup and
    rep are milliseconds; it clears L2 before each call), wall clock on CPU."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        med, p20, p80 = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
        return Timing(float(med), float(p20), float(p80))
    for _ in range(min(warmup, 2)):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < CPU_MIN_SAMPLES or (len(times) < CPU_MAX_SAMPLES and (time.perf_counter() - start) * 1e3 < rep):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return timing_of(times)


def timing_of(samples: Sequence[float]) -> Timing:
    """The median, p20 and p80 of wall-clock samples (milliseconds); all three the one value of a single sample."""
    if len(samples) == 1:
        return Timing(samples[0], samples[0], samples[0])
    deciles = statistics.quantiles(samples, n=10, method="inclusive")
    return Timing(statistics.median(samples), deciles[1], deciles[7])


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> dict[str, Timing]:
    """Wall-clock milliseconds per call of each function, timed in turn round after round, so that a machine's drift
    (other processes, clocks, a shared host) lands on every provider alike rather than on whichever ran last."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            samples[k].append((time.perf_counter() - t0) * 1e3)
    return {k: timing_of(v) for k, v in samples.items()}


def bench(fn: Callable[[], Any], warmup: int = 10, rep: int = 50) -> float:
    """Median milliseconds per call (see :func:`bench_stats`)."""
    return bench_stats(fn, warmup, rep).median


class Ring(Generic[T]):
    """Input sets used in turn: each call returns the next one, so a timed loop does not keep rereading one set."""

    def __init__(self, sets: Sequence[T]) -> None:
        if not sets:
            raise ValueError("a ring needs at least one input set")
        self.sets = list(sets)
        self._next = 0

    def __call__(self) -> T:
        s = self.sets[self._next]
        self._next = (self._next + 1) % len(self.sets)
        return s

    def __len__(self) -> int:
        return len(self.sets)

    def map(self, f: Callable[[T], U]) -> Ring[U]:
        """``f`` of every set (sharing their tensors), as a ring with its own position."""
        return Ring([f(s) for s in self.sets])


def ring_budget() -> tuple[int, int]:
    """(bytes, most sets) that the input sets of one case should add up to: past an H200's 50 MB L2 twice over on a
    GPU; on a CPU past a typical last-level cache, in few sets so that building them stays quick."""
    return (256 << 20, 16) if torch.cuda.is_available() else (32 << 20, 4)


def _nbytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of the distinct tensor storages inside nested tuples, lists and dicts."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o, seen) for o in obj)
    return 0


def rotating(make_inputs: Callable[[], T], bytes_per_set: int | None = None) -> Ring[T]:
    """A ring of distinct input sets from ``make_inputs()`` that together reach :func:`ring_budget`'s bytes (within
    its count of sets), so that small shapes are not timed from a warm cache. ``bytes_per_set`` defaults to the
    tensors in the first set."""
    first = make_inputs()
    size = max(1, bytes_per_set if bytes_per_set is not None else _nbytes(first))
    budget, most = ring_budget()
    n = max(1, min(most, math.ceil(budget / size)))
    return Ring([first, *(make_inputs() for _ in range(n - 1))])


def timed_backends(dev: torch.device, wanted: Sequence[str]) -> tuple[list[str], list[str]]:
    """The fastformer backends among ``wanted`` to time on ``dev``, and one note saying which others were not and
    why (none if all were). On a CPU only the torch path is timed (the CPU path), ``wanted`` or not."""
    import fastformer
    from fastformer import backends

    if dev.type != "cuda":
        timed = ["torch"]
        why = {
            "triton": "on a CPU Triton runs only in its interpreter (TRITON_INTERPRET=1), a correctness tool "
            "orders of magnitude slower than a kernel",
            "cuda": "needs a CUDA GPU",
        }
        skipped = {b: why[b] for b in ("triton", "cuda")}
    else:
        avail = fastformer.available_backends(dev)
        timed = [b for b in wanted if b in avail]
        skipped = {b: backends.device_reason(b, dev) or "unavailable" for b in wanted if b not in avail}
    note = "not timed: " + "; ".join(f"fastformer-{b} ({why})" for b, why in skipped.items())
    return timed, [note] if skipped else []


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


def _git(*args: str) -> str | None:
    """stdout of git run in this file's real directory (the checkout, also under an editable install), or None."""
    try:
        run = subprocess.run(
            ["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return run.stdout if run.returncode == 0 else None


def commit() -> str:
    """Short commit of the fastformer checkout these benchmarks come from, "-dirty" when tracked files differ from
    it; "unknown" when they are not in a fastformer checkout (a wheel install, or git missing)."""
    out = _git("rev-parse", "--show-toplevel", "--short", "HEAD")
    lines = out.splitlines() if out else []
    # a package installed into site-packages inside some other repository must not report that repository's commit
    if len(lines) != 2 or not (Path(lines[0]) / "fastformer" / "__init__.py").is_file():
        return "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return lines[1] + ("-dirty" if dirty else "")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def device_name() -> str:
    """The GPU's name, or "CPU (model, arch, N threads)" so that a CPU run can never pass for a GPU one."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    parts = [_cpu_model(), platform.machine(), f"{torch.get_num_threads()} threads"]
    return f"CPU ({', '.join(p for p in parts if p)})"


def env_info() -> dict[str, Any]:
    """Versions, device, ISO date-time and commit of this run."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    import fastformer

    versions = {
        "fastformer": fastformer.__version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
    }
    return {
        **versions,
        "versions": " ".join(f"{k}={v}" for k, v in versions.items()),
        "device": device_name(),
        "time": datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": commit(),
    }


# columns of the printed table left out (they stay in JSON and CSV)
_HIDDEN = ("ms_p20", "ms_p80")


def print_table(rows: Sequence[dict[str, Any]], title: str) -> None:
    if not rows:
        print(f"== {title}: no rows")
        return
    cols = [c for c in dict.fromkeys(k for r in rows for k in r) if c not in _HIDDEN]
    fmt = {c: (lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)) for c in cols}
    cells = [[fmt[c](r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print(f"== {title}")
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


# How a row dict becomes CSV rows. Keys that name the row; "task" (bench_models, bench_hf) is their mode.
_NAMING = ("provider", "mode", "task", "shape", "dtype", "error")
# every float-valued key is a metric; all of them except these scale as 1 / time (GB/s, TFLOP/s, tokens/s, %peak,
# MFU, speed-ups), so their quantiles come from the time's
_NOT_PER_TIME = frozenset({"peak_mem_mb"})


def _g(v: float) -> str:
    return f"{v:.6g}"


def csv_rows(op: str, rows: Iterable[dict[str, Any]], env: dict[str, Any], dtype: str) -> list[dict[str, str]]:
    """One CSV row (``CSV_COLUMNS``) per metric of each timed row; rows without ``ms`` (errors) have none.

    ``mode`` is the row's mode, else its task; ``shape`` its ``shape``, else its other non-metric keys as
    ``key=value``. p20 and p80 are empty where only one number was measured (``common.time_ms``, memory)."""
    out = []
    for r in rows:
        ms = r.get("ms")
        if not isinstance(ms, float):
            continue
        lo, hi = r.get("ms_p20"), r.get("ms_p80")
        spread = isinstance(lo, float) and isinstance(hi, float) and lo > 0 and hi > 0
        shape = r.get("shape") or " ".join(
            f"{k}={v}" for k, v in r.items() if k not in _NAMING and k not in _HIDDEN and not isinstance(v, float)
        )
        base = {
            "op": op,
            "provider": str(r.get("provider", "")),
            "mode": str(r.get("mode") or r.get("task", "")),
            "shape": str(shape),
            "dtype": str(r.get("dtype", dtype)),
            "device": env["device"],
            "versions": env["versions"],
            "commit": env["commit"],
            "date": env["time"],
        }
        for k, v in r.items():
            if not isinstance(v, float) or k in _HIDDEN:
                continue
            if k == "ms":
                q = (lo, hi) if spread else (None, None)
            elif k in _NOT_PER_TIME or not spread:
                q = (None, None)
            else:  # v = c / time: the fast end of the time (its p20) is the high end of v
                q = (v * ms / hi, v * ms / lo)
            p20, p80 = ("" if x is None else _g(x) for x in q)
            out.append({**base, "metric": k, "median": _g(v), "p20": p20, "p80": p80})
    return out


@dataclasses.dataclass(frozen=True)
class PlotSpec:
    """What ``--plot`` draws: each provider's speed-up over the panel's baseline against row key ``x`` (lines when
    it takes two or more numeric values, else bars), one panel per mode and ``group(row)``. The baseline is the
    first of ``baseline`` present in the panel, else the panel's first provider."""

    x: str = "shape"
    baseline: tuple[str, ...] = ("torch", "torch-eager", "eager", "transformers-eager", "transformers")
    group: Callable[[dict[str, Any]], str] | None = None


def _atomic_write(path: str | os.PathLike, write: Callable[[IO], None], binary: bool = False) -> None:
    """Write to a temporary file next to ``path``, then rename it over ``path``: never a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb" if binary else "w", **({} if binary else {"newline": ""})) as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _panel(ax: Any, title: str, rows: list[dict[str, Any]], spec: PlotSpec, colors: dict[str, Any]) -> None:
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    base = next((b for b in spec.baseline if b in providers), providers[0])
    base_ms = {r.get(spec.x, ""): r["ms"] for r in rows if r["provider"] == base}
    xs = [x for x in dict.fromkeys(r.get(spec.x, "") for r in rows) if x in base_ms]
    lines = len(xs) > 1 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
    width = 0.8 / len(providers)
    for i, p in enumerate(providers):
        pts = {r.get(spec.x, ""): r for r in rows if r["provider"] == p and r.get(spec.x, "") in base_ms}
        if not pts:
            continue
        keys = [x for x in xs if x in pts]
        speed = [base_ms[x] / pts[x]["ms"] for x in keys]
        # p20..p80 of this provider's time as an error bar on its speed-up, where it was measured
        err = None
        if all("ms_p20" in pts[x] and "ms_p80" in pts[x] for x in keys):
            err = [
                [s - base_ms[x] / pts[x]["ms_p80"] for s, x in zip(speed, keys)],
                [base_ms[x] / pts[x]["ms_p20"] - s for s, x in zip(speed, keys)],
            ]
        color = colors.setdefault(p, f"C{len(colors) % 10}")
        if lines:
            ax.errorbar(keys, speed, yerr=err, marker="o", ms=4, capsize=2, label=p, color=color)
        else:
            pos = [xs.index(x) - 0.4 + (i + 0.5) * width for x in keys]
            ax.bar(pos, speed, width, yerr=err, capsize=2, label=p, color=color)
    if lines:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
    else:
        ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel(spec.x if any(str(x) for x in xs) else "")
    ax.set_ylabel(f"speed-up over {base} (x)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def write_plot(
    path: str | os.PathLike,
    name: str,
    rows: Sequence[dict[str, Any]],
    spec: PlotSpec,
    env: dict[str, Any],
    notes: Sequence[str] = (),
) -> None:
    """PNG of every provider's speed-up (median; bars p20-p80 of its time), one panel per mode and group; the title
    names the device and carries ``notes`` (on a CPU: which paths are references, emulations or interpreters)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if isinstance(r.get("ms"), float):
            mode = str(r.get("mode") or r.get("task", ""))
            key = " | ".join(s for s in (mode, spec.group(r) if spec.group else "") if s)
            panels.setdefault(key, []).append(r)
    ncols = min(3, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig = Figure(figsize=(5.5 * ncols, 3.8 * nrows + 0.4 + 0.3 * len(notes)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colors: dict[str, Any] = {}
    for ax, (title, prs) in zip(axes, panels.items()):
        _panel(ax, title, prs, spec, colors)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    if not panels:
        axes[0].set_visible(True)
        axes[0].text(0.5, 0.5, "no timed rows", ha="center", va="center")
    head = f"{name} on {env['device']}: speed-up over the baseline (higher is faster)"
    wrap = 60 * ncols
    text = "\n".join([head, *(textwrap.fill(n, wrap) for n in notes)])
    fig.suptitle(text, fontsize=10)
    _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), binary=True)


def _interpreted(provider: str) -> bool:
    """Whether this provider's row ran Triton kernels in the CPU interpreter."""
    from fastformer import backends, utils

    if torch.cuda.is_available() or not utils.interpreting():
        return False
    if "triton" in provider:
        return True
    # a provider without a backend in its name (bench_models' "fastformer", bench_hf's "patched") runs the one in force
    named = any(b in provider for b in backends.BACKENDS)
    return provider.startswith(("fastformer", "patched")) and not named and backends.selected() == "triton"


def cpu_notes(rows: list[dict[str, Any]]) -> list[str]:
    """Mark interpreted providers in ``rows`` and say on a CPU what its rows measure."""
    if torch.cuda.is_available():
        return []
    marked = False
    for r in rows:
        p = r.get("provider")
        if isinstance(p, str) and "interpreter" not in p and _interpreted(p):
            r["provider"] = f"{p} (interpreter)"
            marked = True
    reference = (
        "fastformer's rows (fastformer*, patched*) run its torch backend (torch's own CPU kernels: SDPA's flash "
        "attention, native LayerNorm, addmm; dropout from torch's generator), not the fused GPU kernels"
    )
    if not marked:
        return [f"CPU run: {reference}"]
    return [
        "CPU run: rows marked (interpreter) run Triton kernels in its CPU interpreter (TRITON_INTERPRET=1), a "
        f"correctness tool, not a speed; the other {reference}"
    ]


def finish(
    name: str,
    rows: list[dict[str, Any]],
    args: argparse.Namespace,
    *,
    dtype: torch.dtype | str | None = None,
    plot: PlotSpec | None = None,
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """Print the table and the notes; write JSON, CSV and the plot where ``args`` asks. ``dtype`` is what the rows ran
    in (default ``args.dtype``), ``plot`` how to plot them (default :class:`PlotSpec`). Returns the payload."""
    env = env_info()
    notes = [*notes, *cpu_notes(rows)]
    dtype_name = str(dtype).removeprefix("torch.") if dtype is not None else str(getattr(args, "dtype", ""))
    payload = {"bench": name, "env": env, "peaks": peaks(), "dtype": dtype_name, "notes": notes, "rows": rows}
    print_table(rows, f"{name} on {env['device']}")
    for n in notes:
        print(f"note: {n}")
    if getattr(args, "json", None):
        _atomic_write(args.json, lambda f: json.dump(payload, f, indent=1))
    if getattr(args, "csv", None):

        def write_csv(f: IO) -> None:
            w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            w.writeheader()
            w.writerows(csv_rows(name, rows, env, dtype_name))

        _atomic_write(args.csv, write_csv)
    if getattr(args, "plot", None):
        try:
            write_plot(args.plot, name, rows, plot or PlotSpec(), env, notes)
        except ImportError as e:  # the results above are written; only the figure needs matplotlib
            raise SystemExit(f"--plot needs matplotlib (pip install 'fastformer[bench]'): {e}") from e
    return payload
