"""Small forward + backward calls of every op on every GPU backend, for compute-sanitizer memcheck.

Shapes are odd on purpose (edges of every tile are masked). Exits non-zero if any call raises.
``python benchmarks/sanitize.py [BACKEND ...]`` limits the run to some backends (the GPU check's racecheck pass
runs ``cuda`` only: racecheck instruments shared memory, where the CUDA kernels stage their tiles).
"""

from __future__ import annotations

import os
import sys

import torch

import fastformer


def _layer_norm(backend: str) -> None:
    x = torch.randn(37, 1000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn_like(x, requires_grad=True)
    w = torch.randn(1000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out, s = fastformer.dropout_add_layer_norm(x, r, w, None, dropout_p=0.1, backend=backend)
    (out.float().sum() + s.float().sum()).backward()


def _attention(backend: str) -> None:
    # the CUDA kernels take head dims 64 and 128; on sm_90 their wgmma forward runs too
    wgmma = ("0", "1") if backend == "cuda" and torch.cuda.get_device_capability() == (9, 0) else ("0",)
    for d in (64, 128) if backend == "cuda" else (80,):
        for flag in wgmma:
            os.environ["FASTFORMER_CUDA_WGMMA"] = flag
            q = torch.randn(2, 97, 4, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            k = torch.randn(2, 129, 2, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            v = torch.randn_like(k, requires_grad=True)
            mask = torch.rand(2, 129, device="cuda") > 0.3
            mask[1] = False
            out = fastformer.attention(q, k, v, causal=True, key_padding_mask=mask, dropout_p=0.1, backend=backend)
            out.float().sum().backward()
    os.environ.pop("FASTFORMER_CUDA_WGMMA", None)


def _ffn(backend: str) -> None:
    x = torch.randn(3, 65, 127, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w1 = torch.randn(130, 127, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w2 = torch.randn(127, 130, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b1 = torch.randn(130, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b2 = torch.randn(127, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    fastformer.feed_forward(x, w1, b1, w2, b2, "gelu_tanh", 0.1, backend=backend).float().sum().backward()


def main() -> None:
    failures = []
    for name, fn in (("layer_norm", _layer_norm), ("attention", _attention), ("ffn", _ffn)):
        for backend in sys.argv[1:] or ("triton", "cuda"):
            try:
                fn(backend)
                torch.cuda.synchronize()
                print(f"ok   {name} {backend}")
            except Exception as e:  # noqa: BLE001 - report every failure, then fail
                failures.append(f"{name} {backend}: {type(e).__name__}: {e}")
                print(f"FAIL {failures[-1]}")
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
