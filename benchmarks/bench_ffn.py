"""Feed-forward block benchmark: Linear -> GELU -> Linear, forward and forward+backward.

Shapes are GPT-2 small/medium and BERT-base/large FFNs (d 768/1024, hidden 4d) at 4k-32k tokens.
Peers in the same run: torch eager (nn.Linear -> GELU -> nn.Linear), torch.compile of the same, and
fastformer's triton and cuda backends. Reported per row: milliseconds, TFLOP/s (forward = two GEMMs,
2 * tokens * d * 4d FLOPs each; forward+backward = 3x forward), the fraction of this device's measured
bf16 matmul rate, speedup over eager, and peak memory of one forward+backward above the inputs. Each timed call
reads the next of a ring of input sets larger than the caches together (``common.rotating``). ``--plot``: speed-up
over torch eager against tokens, one panel per mode and d_model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from fastformer.benchmarks import common

# (model, d_model, tokens)
SHAPES = [
    ("gpt2-small", 768, 4096),
    ("gpt2-small", 768, 16384),
    ("bert-base", 768, 32768),
    ("gpt2-medium", 1024, 8192),
    ("bert-large", 1024, 16384),
    ("bert-large", 1024, 32768),
]
QUICK_GPU = [("gpt2-small", 768, 8192), ("bert-large", 1024, 16384)]
QUICK_CPU = [("tiny", 64, 128)]


def _providers(args, on_gpu: bool, backends: list[str]) -> dict[str, Callable[..., torch.Tensor]]:
    import fastformer

    def eager(x, w1, b1, w2, b2):
        return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)

    out: dict[str, Callable[..., torch.Tensor] | None] = {"torch-eager": eager}
    if on_gpu or not args.quick:
        out["torch-compile"] = common.maybe_compile(eager, enabled=not args.no_compile)
    for backend in backends:
        out[f"fastformer-{backend}"] = lambda x, w1, b1, w2, b2, _b=backend: fastformer.feed_forward(
            x, w1, b1, w2, b2, "gelu", backend=_b
        )
    return {k: v for k, v in out.items() if v is not None}


def _inputs(tokens: int, d: int, dev: torch.device, dtype: torch.dtype) -> common.Ring:
    """A ring of ((x, w1, b1, w2, b2), output gradient) sets, each call timed on the next one."""
    d_ff = 4 * d

    def make():
        x = torch.randn(tokens, d, device=dev, dtype=dtype, requires_grad=True)
        w1 = (torch.randn(d_ff, d, device=dev, dtype=dtype) / d**0.5).requires_grad_()
        b1 = torch.zeros(d_ff, device=dev, dtype=dtype, requires_grad=True)
        w2 = (torch.randn(d, d_ff, device=dev, dtype=dtype) / d_ff**0.5).requires_grad_()
        b2 = torch.zeros(d, device=dev, dtype=dtype, requires_grad=True)
        return (x, w1, b1, w2, b2), torch.randn(tokens, d, device=dev, dtype=dtype)

    return common.rotating(make)


def main(argv: list[str] | None = None) -> dict:
    args = common.parser(__doc__.splitlines()[0], "ffn").parse_args(argv)
    dev = common.device()
    on_gpu = dev.type == "cuda"
    dtype = getattr(torch, args.dtype) if on_gpu else torch.float32  # the CPU interpreter has no bf16 dot
    shapes = (QUICK_GPU if on_gpu else QUICK_CPU) if args.quick else (SHAPES if on_gpu else QUICK_CPU)
    peak = common.peaks()["matmul_tflops"]
    backends, notes = common.timed_backends(dev, ("triton", "cuda"))
    providers = _providers(args, on_gpu, backends)
    rows: list[dict[str, Any]] = []
    for model, d, tokens in shapes:
        ring = _inputs(tokens, d, dev, dtype)
        flops_fwd = 2 * (2 * tokens * d * 4 * d)
        eager_ms: dict[str, float] = {}
        for name, fn in providers.items():

            def fwd(fn=fn, ring=ring):
                params, _ = ring()
                with torch.no_grad():
                    return fn(*params)

            def fwd_bwd(fn=fn, ring=ring):
                params, grad = ring()
                torch.autograd.backward(fn(*params), grad)

            try:
                # common.bench_stats runs untimed warm-up calls first (compilation, autotuning); the memory is
                # measured on one more step once they are done
                times = {"fwd": common.bench_stats(fwd), "fwd+bwd": common.bench_stats(fwd_bwd)}
                mem = common.peak_mem_mb(fwd_bwd)
            except Exception as e:  # noqa: BLE001 - a failing peer is reported, not fatal
                rows.append({"model": model, "d": d, "tokens": tokens, "provider": name, "error": str(e)[:80]})
                continue
            finally:
                for params, _ in ring.sets:
                    for p in params:
                        p.grad = None
            for mode, t in times.items():
                flops = flops_fwd * (3 if mode == "fwd+bwd" else 1)
                tflops = flops / t.median / 1e9
                if name == "torch-eager":
                    eager_ms[mode] = t.median
                row = {
                    "model": model,
                    "d": d,
                    "tokens": tokens,
                    "mode": mode,
                    "provider": name,
                    **t.row(),
                    "tflops": tflops,
                    "frac_peak": tflops / peak,
                    "vs_eager": eager_ms[mode] / t.median if mode in eager_ms else None,
                    "peak_mem_mb": mem if mode == "fwd+bwd" else None,
                }
                rows.append({k: v for k, v in row.items() if v is not None})
        del ring
    spec = common.PlotSpec(x="tokens", baseline=("torch-eager",), group=lambda r: f"d={r['d']}")
    return common.finish("ffn", rows, args, dtype=dtype, plot=spec, notes=notes)


if __name__ == "__main__":
    main()
