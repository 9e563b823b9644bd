"""LayerNorm microbenchmark: the fused dropout + residual + LayerNorm block, and plain LayerNorm.

Reports GB/s (bytes the op must move at minimum), the fraction of this device's measured copy bandwidth,
and the speed ratio against torch eager, torch.compile of the same ops and liger-kernel (plain LN only,
when importable), all measured in the same run on the same tensors. Each timed call reads the next of a ring
of input sets larger than the caches together (``common.rotating``). ``--plot``: speed-up over torch eager (the
plain-LayerNorm panel: over liger) against the hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fastformer.benchmarks import common

import fastformer
from fastformer.ops import dropout


def _eager_block(x, r, w, b, p):
    s = F.dropout(x, p) + r
    return F.layer_norm(s, (x.shape[-1],), w, b), s


def _providers(dev, args, backends: list[str]):
    prov = {
        f"fastformer-{backend}": lambda x, r, w, b, p, _b=backend: fastformer.dropout_add_layer_norm(
            x, r, w, b, dropout_p=p, backend=_b
        )
        for backend in backends
    }
    prov["torch"] = _eager_block
    compiled = common.maybe_compile(_eager_block, not args.no_compile and dev.type == "cuda")
    if compiled is not None:
        prov["torch.compile"] = compiled
    return prov


def _inputs(rows: int, n: int, dev, dtype) -> common.Ring:
    """A ring of (x, residual, weight, bias, output gradient) sets, each call timed on the next one."""

    def make():
        x, r = (torch.randn(rows, n, device=dev, dtype=dtype, requires_grad=True) for _ in range(2))
        w, b = (torch.randn(n, device=dev, dtype=dtype, requires_grad=True) for _ in range(2))
        return x, r, w, b, torch.randn(rows, n, device=dev, dtype=dtype)

    return common.rotating(make)


def _time(fn, ring: common.Ring, p: float, mode: str) -> common.Timing:
    if mode == "fwd":

        def fwd():
            x, r, w, b, _ = ring()
            fn(x, r, w, b, p)

        return common.bench_stats(fwd)
    if mode == "bwd":
        # one graph per input set, kept (retain_graph) so that each timed call backpropagates through the next one
        graphs = ring.map(lambda t: (fn(*t[:4], p), t))

        def bwd():
            outs, (x, r, w, b, g) = graphs()
            torch.autograd.grad(outs, (x, r, w, b), (g, g), retain_graph=True)

        return common.bench_stats(bwd)

    def step():
        x, r, w, b, g = ring()
        torch.autograd.grad(fn(x, r, w, b, p), (x, r, w, b), (g, g))

    return common.bench_stats(step)


def _vs_liger(ring: common.Ring) -> list[dict]:
    """Plain LayerNorm forward against liger-kernel's (it has no fused residual variant)."""
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction

    xwb = ring.map(lambda t: (t[0], t[2], t[3]))
    rows, n = xwb.sets[0][0].shape
    t_liger = common.bench_stats(lambda: LigerLayerNormFunction.apply(*xwb(), 1e-5))

    def ours():
        x, w, b = xwb()
        fastformer.layer_norm(x, n, w, b)

    t_ours = common.bench_stats(ours)
    base = {"hidden": n, "rows": rows, "mode": "plain fwd"}
    return [
        {**base, "provider": "fastformer", **t_ours.row(), "vs liger": t_liger.median / t_ours.median},
        {**base, "provider": "liger", **t_liger.row()},
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = common.parser(__doc__.splitlines()[0], "layer_norm")
    parser.add_argument("--p", type=float, default=0.1, help="dropout probability of the fused block")
    args = parser.parse_args(argv)
    dev = common.device()
    dtype = getattr(torch, args.dtype) if dev.type == "cuda" else torch.float32
    rows = 16384 if dev.type == "cuda" else 512
    hiddens = [768, 1024, 4096, 8192] if not args.quick else [768, 1024]
    if dev.type != "cuda":
        hiddens = [768]
    p = args.p
    peak = common.peaks()["copy_gbps"]
    backends, notes = common.timed_backends(dev, ("triton", "cuda", "torch"))
    results = []
    for n in hiddens:
        ring = _inputs(rows, n, dev, dtype)
        elt = torch.finfo(dtype).bits // 8
        # minimum traffic: fwd reads x, r and writes out, s; bwd reads dout, ds, s and writes dx, dr
        moved = {"fwd": 4 * rows * n * elt, "bwd": 5 * rows * n * elt, "fwd+bwd": 9 * rows * n * elt}
        for mode in ("fwd", "bwd", "fwd+bwd"):
            times = {name: _time(fn, ring, p, mode) for name, fn in _providers(dev, args, backends).items()}
            for name, t in times.items():
                row = {"hidden": n, "rows": rows, "mode": mode, "provider": name, **t.row()}
                row["GB/s"] = moved[mode] / t.median / 1e6
                row["%copy"] = 100 * row["GB/s"] / peak
                row["vs torch"] = times["torch"].median / t.median
                if "torch.compile" in times:
                    row["vs compile"] = times["torch.compile"].median / t.median
                results.append(row)
        if common.liger_available() and dev.type == "cuda":
            results += _vs_liger(ring)
        del ring
    if dev.type != "cuda" and p > 0 and dropout.exact():
        notes.append(
            "exact_dropout is on: fastformer-torch emulates the GPU kernels' Philox stream (so every backend drops the "
            "same elements), slower than torch's generator, which it uses by default"
        )
    spec = common.PlotSpec(x="hidden", baseline=("torch", "liger"))
    return common.finish("layer_norm", results, args, dtype=dtype, plot=spec, notes=notes)


if __name__ == "__main__":
    main()
