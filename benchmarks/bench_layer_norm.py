"""LayerNorm microbenchmark: the fused dropout + residual + LayerNorm block, and plain LayerNorm.

Reports GB/s (bytes the op must move at minimum), the fraction of this device's measured copy bandwidth,
and the speed ratio against torch eager, torch.compile of the same ops and liger-kernel (plain LN only,
when importable), all measured in the same run on the same tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fastformer.benchmarks import common

import fastformer


def _eager_block(x, r, w, b, p):
    s = F.dropout(x, p) + r
    return F.layer_norm(s, (x.shape[-1],), w, b), s


def _providers(dev, args):
    prov = {}
    for backend in ("triton", "cuda", "torch"):
        if backend in fastformer.available_backends(dev):
            if dev.type == "cpu" and backend != "torch":
                continue  # the interpreter is a correctness tool, not a speed peer
            prov[f"fastformer-{backend}"] = lambda x, r, w, b, p, _b=backend: fastformer.dropout_add_layer_norm(
                x, r, w, b, dropout_p=p, backend=_b
            )
    prov["torch"] = _eager_block
    compiled = common.maybe_compile(_eager_block, not args.no_compile and dev.type == "cuda")
    if compiled is not None:
        prov["torch.compile"] = compiled
    return prov


def _time(fn, x, r, w, b, p, mode):
    if mode == "fwd":
        return common.bench(lambda: fn(x, r, w, b, p))
    out, s = fn(x, r, w, b, p)
    g = torch.randn_like(out)
    params = [x, r, w, b]
    if mode == "bwd":
        return common.bench(lambda: torch.autograd.grad((out, s), params, (g, g), retain_graph=True))

    def step():
        o, ss = fn(x, r, w, b, p)
        torch.autograd.grad((o, ss), params, (g, g))

    return common.bench(step)


def _vs_liger(x, w, b) -> list[dict]:
    """Plain LayerNorm forward against liger-kernel's (it has no fused residual variant)."""
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction

    rows, n = x.shape
    ms_liger = common.bench(lambda: LigerLayerNormFunction.apply(x, w, b, 1e-5))
    ms_ours = common.bench(lambda: fastformer.layer_norm(x, n, w, b))
    base = {"hidden": n, "rows": rows, "mode": "plain fwd"}
    return [
        {**base, "provider": "fastformer", "ms": ms_ours, "vs liger": ms_liger / ms_ours},
        {**base, "provider": "liger", "ms": ms_liger},
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = common.parser(__doc__.splitlines()[0])
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
    results = []
    for n in hiddens:
        x = torch.randn(rows, n, device=dev, dtype=dtype, requires_grad=True)
        r = torch.randn(rows, n, device=dev, dtype=dtype, requires_grad=True)
        w = torch.randn(n, device=dev, dtype=dtype, requires_grad=True)
        b = torch.randn(n, device=dev, dtype=dtype, requires_grad=True)
        elt = x.element_size()
        # minimum traffic: fwd reads x, r and writes out, s; bwd reads dout, ds, s and writes dx, dr
        moved = {"fwd": 4 * rows * n * elt, "bwd": 5 * rows * n * elt, "fwd+bwd": 9 * rows * n * elt}
        for mode in ("fwd", "bwd", "fwd+bwd"):
            times = {name: _time(fn, x, r, w, b, p, mode) for name, fn in _providers(dev, args).items()}
            for name, ms in times.items():
                row = {"hidden": n, "rows": rows, "mode": mode, "provider": name, "ms": ms}
                row["GB/s"] = moved[mode] / ms / 1e6
                row["%copy"] = 100 * row["GB/s"] / peak
                row["vs torch"] = times["torch"] / ms
                if "torch.compile" in times:
                    row["vs compile"] = times["torch.compile"] / ms
                results.append(row)
        if common.liger_available() and dev.type == "cuda":
            results += _vs_liger(x, w, b)
    payload = common.finish("layer_norm", results, args)
    if dev.type != "cuda" and p > 0:
        print(
            "note: on CPU the fused path is the torch reference, which draws dropout with a bit-exact emulation of "
            "the GPU kernels' Philox stream (so every backend drops the same elements); run with --p 0 to time "
            "the LayerNorm alone"
        )
    return payload


if __name__ == "__main__":
    main()
