"""Record the Triton launches the launchers make for representative problems, with no GPU.

The backend modules (``fastformer/ops/<op>/triton_impl.py``) are called on CPU tensors of the real shapes,
strides and dtypes while the device is faked (SM count, opt-in shared memory) and Triton's ``JITFunction.run``
and ``Autotuner.run`` only record what they were asked to launch. An autotuned launch is expanded over every
candidate config of that launch, each marked ``tried`` or ``pruned`` by the launcher's own prune hook; a launch
with ``FASTFORMER_AUTOTUNE=0`` records the heuristic default config the launcher would run. Attention's backward
is recorded in both of its modes, deterministic and atomic dQ (its dK/dV rows show ``ATOMIC_DQ``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

# what the launchers query of the device, per arch: SM count and opt-in shared memory per block (bytes)
DEVICES = {
    90: SimpleNamespace(name="H200", sms=132, smem=232448),
    80: SimpleNamespace(name="A100", sms=108, smem=166912),
}
BF16 = torch.bfloat16


@dataclass
class Launch:
    """One kernel launch at one config: what the JIT would compile."""

    scenario: str  # the representative problem
    fn: Any  # the JITFunction
    args: tuple  # positional launch arguments
    kwargs: dict  # keyword arguments, the config's included
    grid: tuple[int, int, int]
    status: str  # "default" (FASTFORMER_AUTOTUNE=0 or no tuning), "tried" or "pruned" (by the prune hook)
    config: dict = field(default_factory=dict)  # BLOCK_* / num_warps / num_stages of this row

    @property
    def kernel(self) -> str:
        return self.fn.fn.__name__


@contextlib.contextmanager
def fake_device(arch: int, autotune: bool) -> Iterator[list[tuple[Any, tuple, dict, Any, list | None]]]:
    """Patch the device queries and Triton's launch entry points; yields the list that records the launches.

    Each record is (fn, args, kwargs, grid, configs): ``configs`` is None for a plain launch, else the
    autotuner's [(config, pruned?)] list.
    """
    import triton.runtime.autotuner as autotuner
    import triton.runtime.jit as jit

    from fastformer import utils

    dev = DEVICES[arch]
    props = SimpleNamespace(multi_processor_count=dev.sms, shared_memory_per_block_optin=dev.smem, name=dev.name)
    calls: list = []

    def jit_run(self, *args, grid, warmup, **kwargs):  # noqa: ARG001 - the signature of JITFunction.run
        calls.append((self, args, kwargs, grid, None))

    def tune_run(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args, strict=False))
        kept = {id(c) for c in self.prune_configs(kwargs)}
        grid = kwargs.pop("grid")
        kwargs.pop("warmup", None)
        calls.append((self.fn, args, kwargs, grid, [(c, id(c) not in kept) for c in self.configs]))

    saved = (jit.JITFunction.run, autotuner.Autotuner.run, torch.cuda.get_device_properties)
    saved += (torch.cuda.current_device, utils.sm_count, utils.tma_capable, os.environ.get("FASTFORMER_AUTOTUNE"))
    jit.JITFunction.run, autotuner.Autotuner.run = jit_run, tune_run
    torch.cuda.get_device_properties = lambda *_: props
    torch.cuda.current_device = lambda: 0
    utils.sm_count = lambda _device: dev.sms
    utils.tma_capable = lambda _device: arch >= 90
    os.environ["FASTFORMER_AUTOTUNE"] = "1" if autotune else "0"
    try:
        yield calls
    finally:
        jit.JITFunction.run, autotuner.Autotuner.run, torch.cuda.get_device_properties = saved[:3]
        torch.cuda.current_device, utils.sm_count, utils.tma_capable = saved[3:6]
        if saved[6] is None:
            os.environ.pop("FASTFORMER_AUTOTUNE", None)
        else:
            os.environ["FASTFORMER_AUTOTUNE"] = saved[6]


def _t(*shape: int, dtype: torch.dtype = BF16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


def _seed() -> torch.Tensor:
    return torch.tensor(0x1234_5678_9ABC, dtype=torch.int64)


def _both_backwards(run: Callable[[], None]) -> None:
    """``run`` (a backward) twice: under ``torch.use_deterministic_algorithms(True)`` (the 7-matmul kernels) and
    without it (the 5-matmul atomic-dQ mode), restoring the caller's setting."""
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        for deterministic in (True, False):
            torch.use_deterministic_algorithms(deterministic)
            run()
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


def _attention(b: int, s: int, h: int, hkv: int, d: int, causal: bool, mask=False, p=0.0, sq=None, bwd=True):
    from fastformer.ops.attention.op import AttentionArgs

    sq = sq or s
    q, k, v = _t(b, sq, h, d), _t(b, s, hkv, d), _t(b, s, hkv, d)
    m = torch.ones(b, s, dtype=torch.bool) if mask else None
    a = AttentionArgs(q, k, v, m, None, None, _seed() if p else None, sq, s, causal, d**-0.5, p, "triton")
    out, lse = a.impl().fwd(a)
    if bwd:
        _both_backwards(lambda: a.impl().bwd(a, _t(b, sq, h, d), out, lse))


def _attention_varlen(lens: list[int], h: int, d: int, p: float = 0.0):
    from fastformer.ops.attention.op import AttentionArgs

    total = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = _t(total, h, d), _t(total, h, d), _t(total, h, d)
    n = max(lens)
    a = AttentionArgs(q, k, v, None, cu, cu, _seed() if p else None, n, n, False, d**-0.5, p, "triton")
    out, lse = a.impl().fwd(a)
    _both_backwards(lambda: a.impl().bwd(a, _t(total, h, d), out, lse))


def _ffn(m: int, d: int, d_ff: int, p: float, second_layer: bool = True):
    from fastformer.ops.ffn.op import FFNArgs, backward, forward

    w2, b2 = (_t(d, d_ff), _t(d)) if second_layer else (None, None)
    act = "gelu_tanh" if second_layer else "gelu"
    a = FFNArgs(_t(d_ff, d), _t(d_ff), w2, b2, act, False, p, _seed() if p else None, "triton")
    x = _t(m, d)
    _, pre = forward(a, x, True)
    backward(a, _t(m, d if second_layer else d_ff), x, pre)


def _layer_norm(m: int, n: int, fused: bool):
    from fastformer.ops.layer_norm.op import LayerNormArgs

    p = 0.1 if fused else 0.0
    a = LayerNormArgs(_t(n), _t(n), n, 1e-5, p, _seed() if p else None, "triton")
    r = _t(m, n) if fused else None
    _, s, mean, rstd = a.impl().fwd(a, _t(m, n), r)
    a.impl().bwd(a, _t(m, n), _t(m, n) if fused else None, _t(m, n), mean, rstd, fused)


# name -> the calls of one representative problem (bf16 training steps unless stated)
SCENARIOS: dict[str, Callable[[], None]] = {
    "gpt2 attention d64 S1024 causal": lambda: _attention(8, 1024, 12, 12, 64, True),
    "bert attention d64 S512 padded+dropout": lambda: _attention(8, 512, 12, 12, 64, False, mask=True, p=0.1),
    "bert attention d64 varlen": lambda: _attention_varlen([512, 384, 301, 128, 512, 77, 450, 256], 12, 64),
    "attention d128 S4096 causal": lambda: _attention(4, 4096, 16, 16, 128, True),
    "attention d128 S4096": lambda: _attention(4, 4096, 16, 16, 128, False),
    "attention d128 S4096 causal GQA 4:1": lambda: _attention(4, 4096, 32, 8, 128, True),
    "decode d128 Sk8192 GQA 4:1": lambda: _attention(2, 8192, 32, 8, 128, True, sq=1, bwd=False),
    "ffn 8192x768x3072 gelu_tanh": lambda: _ffn(8192, 768, 3072, 0.0),
    "ffn 8192x768x3072 gelu_tanh dropout": lambda: _ffn(8192, 768, 3072, 0.1),
    "linear 8192x768x3072 gelu (act_grad)": lambda: _ffn(8192, 768, 3072, 0.0, second_layer=False),
    **{f"layer_norm 8192x{n} {kind}": (lambda n=n, f=f: _layer_norm(8192, n, f)) for n in (768, 1024, 4096)
       for kind, f in (("residual+dropout", True), ("plain", False))},
}  # fmt: skip


def _grid(grid: Any, bound: dict) -> tuple[int, int, int]:
    g = tuple(grid(bound) if callable(grid) else grid)
    return (*g, *(1,) * (3 - len(g)))  # type: ignore[return-value]


def capture(arch: int, scenarios: dict[str, Callable[[], None]] | None = None) -> list[Launch]:
    """Every (launch, config) the launchers reach on ``arch``: autotune candidates and the untuned defaults."""
    launches: list[Launch] = []
    for autotune in (True, False):
        for name, run in (scenarios or SCENARIOS).items():
            with fake_device(arch, autotune) as calls:
                run()
            for fn, args, kwargs, grid, configs in calls:
                options = configs or [(None, False)]
                for cfg, pruned in options:
                    kw = dict(kwargs, **(cfg.all_kwargs() if cfg is not None else {}))
                    status = "default" if cfg is None else "pruned" if pruned else "tried"
                    bound = {**dict(zip(fn.arg_names, args, strict=False)), **kw}
                    # the tiles, warps and stages of the row, and which mode of a kernel that has two
                    prefixes = ("ATOMIC", "WARP_SPEC", "SPLIT_K", "BLOCK", "NUM_", "num_")
                    shown = {k: v for k, v in kw.items() if k.startswith(prefixes)}
                    launches.append(Launch(name, fn, args, kw, _grid(grid, bound), status, shown))
    return launches
