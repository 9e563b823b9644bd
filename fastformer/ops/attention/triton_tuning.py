"""Launch settings of the Triton attention kernels: autotune candidates, heuristic configs, split-KV policy.

On GPU the forward, dK/dV and dQ kernels are autotuned per (head dim, seqlen bucket, flags) over the candidates
below, after pruning those that do not fit the device's shared memory or would spill their accumulators;
``FASTFORMER_AUTOTUNE=0`` uses the first heuristic config that fits instead, and the interpreter one fixed config.
"""

from __future__ import annotations

import torch

from fastformer import utils
from fastformer.kernels import attention as kernels
from fastformer.ops.attention.op import AttentionArgs

# Autotune candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) shared by sm80 and sm90; the ones that do not fit
# the device's shared memory or would spill their fp32 accumulators at this head dim are pruned before timing.
_FWD_CONFIGS = ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 2))
_BWD_CONFIGS = ((64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (32, 32, 4, 2))
_KEY = ["BLOCK_D", "seq_bucket", "IS_CAUSAL", "HAS_MASK", "HAS_DROPOUT", "IS_VARLEN"]
_KERNELS = {
    "fwd": kernels.attention_fwd_kernel,
    "dkdv": kernels.attention_bwd_dkdv_kernel,
    "dq": kernels.attention_bwd_dq_kernel,
}

# one fixed launch configuration under the interpreter: big tiles mean fewer, cheaper numpy steps
_INTERP_BLOCK = {"BLOCK_M": 32, "BLOCK_N": 32}

# heuristic configs in order of preference when not autotuning; the first that fits is used
_FIXED_FWD = ((128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 1))
_FIXED_BWD = ((64, 64, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2), (16, 32, 4, 1))

# split-KV decoding: used when there are few query rows (<= SPLIT_MAX_Q), at least SPLIT_MIN_KEYS keys, and
# too few query tiles to fill the GPU
SPLIT_MAX_Q = 16
SPLIT_MIN_KEYS = 512


def _smem_limit() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "shared_memory_per_block_optin", 99 * 1024))


def _fits(kind: str, bm: int, bn: int, warps: int, stages: int, bd: int, elem: int, limit: int) -> bool:
    threads = 32 * warps
    if kind == "fwd":  # q tile resident, K and V tiles pipelined; acc (bm, bd) fp32 in registers
        smem = (bm * bd + stages * 2 * bn * bd) * elem
        regs = bm * bd // threads
    else:  # k, v resident, q and dO tiles pipelined, P/dS staged; dk/dv or dq accumulators in registers
        smem = (2 * bn * bd + stages * 2 * bm * bd) * elem + bm * bn * 4
        regs = 2 * max(bm, bn) * bd // threads
    return smem <= limit and regs <= 128


def _configs(kind: str) -> list:
    import triton

    table = _FWD_CONFIGS if kind == "fwd" else _BWD_CONFIGS
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in table]


def _prune(kind: str):
    def prune(configs, named_args, **kwargs):
        bd = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
        elem, limit = named_args["Q"].element_size(), _smem_limit()
        keep = [
            c
            for c in configs
            if _fits(kind, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, bd, elem, limit)
        ]
        return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]

    return prune


def kernel(kind: str):
    """The jitted kernel ("fwd", "dkdv" or "dq"), wrapped in an autotuner on GPU (fixed configs otherwise)."""
    if not utils.autotune_enabled():
        return _KERNELS[kind]
    group = "fwd" if kind == "fwd" else "bwd"
    return utils.autotuned(f"attention_{kind}", _KERNELS[kind], lambda: _configs(group), _KEY, _prune(group))


def seq_bucket(n: int) -> int:
    return min(utils.next_pow2(max(n, 1)), 8192)


def launch_meta(kind: str, bd: int, elem: int) -> dict:
    """Launch settings when not autotuning: the interpreter's config, or a heuristic one on GPU."""
    if utils.interpreting():
        return dict(_INTERP_BLOCK)
    if utils.autotune_enabled():
        return {}
    table = _FIXED_FWD if kind == "fwd" else _FIXED_BWD
    limit = _smem_limit()
    fits = [c for c in table if _fits(kind, *c, bd, elem, limit)]
    bm, bn, w, st = fits[0] if fits else table[-1]
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}


def num_splits(a: AttentionArgs, device: torch.device) -> int:
    """Key splits of the forward: 1 (the plain path) unless decoding few rows over many keys on an idle GPU."""
    if a.varlen or a.sq > SPLIT_MAX_Q or a.sk < SPLIT_MIN_KEYS:
        return 1
    programs = a.batch * a.h  # one query tile per (batch, head)
    target = 2 * utils.sm_count(device)
    if programs >= target:
        return 1
    return max(1, min(utils.cdiv(target, programs), utils.cdiv(a.sk, 256)))


def split_meta(bd: int, elem: int) -> dict:
    """Tiles and launch settings of the split-KV forward: 16 query rows, K/V tiles of BLOCK_N x BLOCK_D pipelined
    within shared memory for wide rows and fp32."""
    row_bytes = bd * elem
    block_n = 32 if utils.interpreting() or row_bytes > 256 else (128 if row_bytes <= 128 else 64)
    launch = {} if utils.interpreting() else {"num_warps": 4, "num_stages": 3 if row_bytes <= 256 else 2}
    return {"BLOCK_M": 16, "BLOCK_N": block_n, **launch}
