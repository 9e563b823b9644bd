"""Attention benchmark: fused forward and forward+backward against every torch SDPA backend.

TFLOP/s use flash-attn's convention: forward 4·B·H·Sq·Sk·D (halved when causal), backward 2.5× forward, so
forward+backward is 3.5× forward. Shapes follow flash-attn's grid: 16k tokens per batch (B = 16384 / S),
model width 2048 (H = 2048 / D), head dims 64 and 128, seqlen 512 to 16k, causal and not. Peers, measured in the
same run on the same inputs (each in its native layout): torch SDPA forced to flash, efficient, cuDNN, and the
math path where its S×S matrices fit; fastformer's Triton path is timed twice, as is (5-matmul backward, dQ added
atomically) and under ``torch.use_deterministic_algorithms(True)`` (7-matmul backward, no atomics). Also:
BERT-style padded batches (S = 512, 30-70% padding) through the key-padding-mask path and through
unpad -> varlen -> pad (TFLOP/s counted on real tokens only), and single-query decoding over a long KV cache
(split-KV path, GB/s of K/V read). ``--quick`` runs a few shapes. Each timed call reads the next of a ring of
input sets larger than the caches together (``common.rotating``). ``--plot``: speed-up over SDPA's flash backend (on
CPU: SDPA; padded batches: its efficient backend) against the sequence length, one panel per mode and case.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from fastformer.benchmarks import common

import fastformer

_SDPA = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION"}


def _sdpa_peer(name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, _SDPA[name] if name in _SDPA else "MATH")

    def run(q, k, v, **kw):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, **kw)

    return run


def _flops(b: int, h: int, sq: int, sk: int, d: int, causal: bool) -> float:
    """Forward FLOPs; forward+backward counts 3.5 times as many (see :func:`_timed_rows`)."""
    return 4.0 * b * h * sq * sk * d / (2 if causal else 1)


# a provider named with this suffix is timed under torch.use_deterministic_algorithms(True): fastformer's Triton
# backward then runs its 7-matmul kernels without atomics instead of the default 5-matmul atomic-dQ kernel
DETERMINISTIC = " deterministic"


def _time(fn, ring: common.Ring, mode: str, deterministic: bool = False) -> common.Timing | None:
    """Time fn(*inputs) (forward) or forward + backward, each call on the next input set of ``ring``; None if this
    peer cannot run the case."""
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        return _time_as_set(fn, ring, mode)
    finally:
        torch.use_deterministic_algorithms(saved)


def _time_as_set(fn, ring: common.Ring, mode: str) -> common.Timing | None:
    try:
        if mode == "fwd":
            with torch.no_grad():
                fn(*ring.sets[0])
                return common.bench_stats(lambda: fn(*ring()))

        def with_grad(inputs):
            leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
            return inputs, leaves, torch.randn_like(fn(*inputs))

        sets = ring.map(with_grad)

        def step():
            inputs, leaves, g = sets()
            torch.autograd.grad(fn(*inputs), leaves, g)

        step()
        return common.bench_stats(step)
    except (RuntimeError, ValueError, torch.OutOfMemoryError) as e:  # a peer that refuses this shape is skipped
        if "out of memory" in str(e).lower():
            torch.cuda.empty_cache()
        return None


def _timed_rows(provs: dict, work: float, peak: float, head: dict, tail: dict | None = None) -> list[dict]:
    """Forward and forward+backward rows of every provider (name -> (fn, ring of its inputs)): ms, TFLOP/s of
    ``work`` (the forward's FLOPs) and the speed-up over the fastest torch SDPA peer; ``head`` and ``tail`` are the
    case's columns before and after."""
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        times = {n: _time(f, ring, mode, n.endswith(DETERMINISTIC)) for n, (f, ring) in provs.items()}
        sdpa = [t.median for n, t in times.items() if n.startswith("sdpa") and t is not None]
        best = min(sdpa) if sdpa else None
        for name, t in times.items():
            if t is None:
                continue
            tf = work * (3.5 if mode == "fwd+bwd" else 1.0) / t.median / 1e9
            row = {**head, "mode": mode, "provider": name, **t.row(), "TFLOP/s": tf, "%matmul": 100 * tf / peak}
            row.update(tail or {})
            if best is not None:
                row["vs best sdpa"] = best / t.median
            rows.append(row)
    return rows


def _ours(backends: list[str]) -> dict:
    provs = {
        f"fastformer-{b}": (
            lambda q, k, v, causal, mask=None, _b=b: fastformer.attention(
                q, k, v, causal=causal, key_padding_mask=mask, backend=_b
            )
        )
        for b in backends
    }
    if "cuda" in backends and torch.cuda.get_device_capability() == (9, 0):
        # the sm_90a forward, opt-in until measured (fastformer/ops/attention/cuda_impl.py)
        provs["fastformer-cuda wgmma"] = _with_env(provs["fastformer-cuda"], "FASTFORMER_CUDA_WGMMA", "1")
    return provs


def _with_env(fn, key: str, value: str):
    """fn with environment variable ``key`` set to ``value`` during each call."""

    def run(*args, **kw):
        saved = os.environ.get(key)
        os.environ[key] = value
        try:
            return fn(*args, **kw)
        finally:
            if saved is None:
                del os.environ[key]
            else:
                os.environ[key] = saved

    return run


def _dense_rows(dev, dtype, args, backends: list[str]) -> list[dict]:
    peak = common.peaks()["matmul_tflops"]
    if dev.type != "cuda":
        shapes = [(64, 32, False), (64, 32, True)]
        tokens, width = 256, 64
    elif args.quick:
        shapes = [(s, 128, c) for s in (2048, 8192) for c in (False, True)]
        tokens, width = 16384, 2048
    else:
        shapes = [(s, d, c) for d in (64, 128) for s in (512, 1024, 2048, 4096, 8192, 16384) for c in (False, True)]
        tokens, width = 16384, 2048
    rows = []
    for s, d, causal in shapes:
        b, h = max(1, tokens // s), width // d

        def make(b=b, s=s, h=h, d=d):
            q, k, v = (torch.randn(b, s, h, d, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
            # the same values in SDPA's (B, H, S, D) layout
            return q, k, v, *(t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))

        ring = common.rotating(make)
        native, bhsd = ring.map(lambda t, c=causal: (*t[:3], c)), ring.map(lambda t: t[3:])
        provs = {n: (f, native) for n, f in _ours(backends).items()}
        if "triton" in backends:
            provs["fastformer-triton" + DETERMINISTIC] = provs["fastformer-triton"]
        if dev.type == "cuda":
            for name in _SDPA:
                provs[name] = (lambda a, b_, c, _f=_sdpa_peer(name), _c=causal: _f(a, b_, c, is_causal=_c), bhsd)
            if b * h * s * s * 4 <= 8 << 30:  # math materialises fp32 S×S scores (and more for backward)
                provs["sdpa-math"] = (
                    lambda a, b_, c, _f=_sdpa_peer("math"), _c=causal: _f(a, b_, c, is_causal=_c),
                    bhsd,
                )
        else:
            provs["sdpa"] = (
                lambda a, b_, c, _c=causal: F.scaled_dot_product_attention(a, b_, c, is_causal=_c),
                bhsd,
            )
        head = {"case": "dense", "seqlen": s, "d": d, "B": b, "H": h, "causal": causal}
        rows += _timed_rows(provs, _flops(b, h, s, s, d, causal), peak, head)
        del ring, native, bhsd, provs
    return rows


def _padded_rows(dev, dtype, args, backends: list[str]) -> list[dict]:
    """BERT-base attention (H 12, D 64) on a padded S = 512 batch with 30-70% padding per sequence."""
    peak = common.peaks()["matmul_tflops"]
    b, s, h, d = (32, 512, 12, 64) if dev.type == "cuda" else (4, 64, 2, 32)
    if args.quick and dev.type == "cuda":
        b = 16
    g = torch.Generator().manual_seed(0)
    lens = (s * (0.3 + 0.4 * torch.rand(b, generator=g))).long().clamp(min=1).to(dev)
    mask = torch.arange(s, device=dev)[None] < lens[:, None]  # (B, S) True = real token
    useful = sum(4.0 * h * n * n * d for n in lens.tolist())

    def make():
        qkv = torch.randn(b, s, 3, h, d, device=dev, dtype=dtype, requires_grad=True)
        return qkv, qkv.detach().permute(2, 0, 3, 1, 4).contiguous().requires_grad_()  # and (3, B, H, S, D)

    ring = common.rotating(make)
    packed, packed_t = ring.map(lambda t: t[:1]), ring.map(lambda t: t[1:])
    sdpa_mask = mask[:, None, None, :]

    def via_mask(x, _b):
        q, k, v = x.unbind(2)
        return fastformer.attention(q, k, v, key_padding_mask=mask, backend=_b)

    def via_varlen(x, _b):
        xu, idx, cu, max_s = fastformer.unpad_input(x, mask)
        q, k, v = xu.unbind(1)
        return fastformer.pad_input(fastformer.attention_varlen(q, k, v, cu, cu, max_s, max_s, backend=_b), idx, b, s)

    provs = {}
    for be in backends:
        provs[f"fastformer-{be} mask"] = (lambda x, _b=be: via_mask(x, _b), packed)
        provs[f"fastformer-{be} varlen"] = (lambda x, _b=be: via_varlen(x, _b), packed)
    names = [n for n in ("sdpa-efficient", "sdpa-cudnn", "sdpa-math") if dev.type == "cuda"] or ["sdpa"]
    for name in names:
        f = _sdpa_peer(name) if dev.type == "cuda" else F.scaled_dot_product_attention
        provs[name] = (lambda x, _f=f: _f(x[0], x[1], x[2], attn_mask=sdpa_mask), packed_t)
    head = {"case": "bert-padded", "seqlen": s, "d": d, "B": b, "H": h, "causal": False}
    pad = round(100 * (1 - mask.float().mean().item()))
    return _timed_rows(provs, useful, peak, head, {"pad%": pad})


def _decode_rows(dev, dtype, args, backends: list[str]) -> list[dict]:
    """One query token per sequence against a long KV cache (GPT decoding with GQA 32:8, D 128)."""
    copy = common.peaks()["copy_gbps"]
    if dev.type != "cuda":
        cases = [(1, 256, 2, 2, 32)]
    elif args.quick:
        cases = [(1, 16384, 32, 8, 128)]
    else:
        cases = [(1, 4096, 32, 8, 128), (1, 32768, 32, 8, 128), (16, 4096, 32, 8, 128)]
    rows = []
    for b, sk, h, hkv, d in cases:

        def make(b=b, sk=sk, h=h, hkv=hkv, d=d):
            q = torch.randn(b, 1, h, d, device=dev, dtype=dtype)
            k, v = (torch.randn(b, sk, hkv, d, device=dev, dtype=dtype) for _ in range(2))
            # SDPA's layout, K/V heads repeated for each query head of their group
            kt, vt = (t.transpose(1, 2).repeat_interleave(h // hkv, 1).contiguous() for t in (k, v))
            return q, k, v, q.transpose(1, 2).contiguous(), kt, vt

        ring = common.rotating(make)
        kv_bytes = 2 * b * sk * hkv * d * torch.finfo(dtype).bits // 8
        provs = {n: (f, ring.map(lambda t: (*t[:3], True))) for n, f in _ours(backends).items()}
        bhsd = ring.map(lambda t: t[3:])
        peers = ["sdpa-flash", "sdpa-efficient", "sdpa-cudnn"] if dev.type == "cuda" else []
        for name in peers:
            provs[name] = (lambda a, b_, c, _f=_sdpa_peer(name): _f(a, b_, c), bhsd)
        if dev.type != "cuda":
            provs["sdpa"] = (lambda a, b_, c: F.scaled_dot_product_attention(a, b_, c), bhsd)
        times = {n: _time(f, inputs, "fwd") for n, (f, inputs) in provs.items()}
        for name, t in times.items():
            if t is None:
                continue
            gbps = kv_bytes / t.median / 1e6
            rows.append(
                {
                    "case": "decode",
                    "seqlen": sk,
                    "d": d,
                    "B": b,
                    "H": h,
                    "causal": True,
                    "mode": "fwd",
                    "provider": name,
                    **t.row(),
                    "GB/s": gbps,
                    "%copy": 100 * gbps / copy,
                }
            )
        del ring, provs, bhsd
    return rows


def _panel(row: dict) -> str:
    """Plot panel of a row besides its mode: the case and what varies within it other than the sequence length (the
    dense cases' batch size follows from it)."""
    label = f"{row['case']} d={row['d']}"
    if row["case"] == "dense":
        label += " causal" if row["causal"] else ""
    elif row["case"] == "decode":
        label += f" B={row['B']}"
    return label


def main(argv: list[str] | None = None) -> dict:
    args = common.parser(__doc__.splitlines()[0], "attention").parse_args(argv)
    dev = common.device()
    dtype = getattr(torch, args.dtype) if dev.type == "cuda" else torch.float32
    if args.quick and dev.type == "cuda":
        # one heuristic config per kernel instead of autotuning: keeps the GPU check's attention part short
        os.environ.setdefault("FASTFORMER_AUTOTUNE", "0")
    # on CPU only the torch path is timed: the interpreter is a correctness tool, not a speed peer
    backends, notes = common.timed_backends(dev, ("triton", "cuda"))
    rows = _dense_rows(dev, dtype, args, backends)
    rows += _padded_rows(dev, dtype, args, backends)
    rows += _decode_rows(dev, dtype, args, backends)
    baseline = ("sdpa-flash", "sdpa-efficient", "sdpa")
    spec = common.PlotSpec(x="seqlen", baseline=baseline, group=_panel)
    return common.finish("attention", rows, args, dtype=dtype, plot=spec, notes=notes)


if __name__ == "__main__":
    main()
