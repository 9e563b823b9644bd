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

# Candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, in order of preference: the first one allowed
# and fitting shared memory is the untuned default (FASTFORMER_AUTOTUNE=0). Each was compiled for sm_90 by
# `fastformer inspect` at head dims 64 and 128: all lower to wgmma, which needs 64 rows per warpgroup (queries,
# BLOCK_M, in the forward and dQ; keys, BLOCK_N, in dK/dV; and in the atomic mode's dQ = dS K, BLOCK_D, or
# BLOCK_M when the head dim is narrower), and none spills where `_allowed` admits it. The atomic mode's extra
# operand and dQ tile cost registers, hence its own list with narrower query tiles (the dS K product keeps wgmma
# through its BLOCK_D rows) and BLOCK_N = 128 first (half the atomic adds of 64). The forward's 128-row tiles on 4
# warps serve only its warp-specialised loop (WARP_SPEC), where each of two consumer warpgroups holds 64 rows: one
# warpgroup holding all 128 spills.
_WS_FWD = ((128, 64, 4, 2), (128, 128, 4, 2), (128, 64, 4, 3))
_CONFIGS = {
    "fwd": ((128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2), *_WS_FWD),
    "dkdv": ((32, 128, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2), (64, 128, 8, 2)),
    "dkdv_atomic": ((32, 128, 8, 2), (16, 128, 8, 2), (64, 128, 8, 2), (64, 64, 8, 1)),
    "dq": ((64, 64, 4, 2), (128, 64, 8, 2), (64, 64, 8, 2), (64, 128, 8, 2)),
}
_KEY = ["BLOCK_D", "group", "seq_bucket", "IS_CAUSAL", "HAS_MASK", "HAS_DROPOUT", "IS_VARLEN"]
_FWD_KEY = ["USE_TMA", "WARP_SPEC"]  # the forward's operand path and loop shape
_KERNELS = {
    "fwd": kernels.attention_fwd_kernel,
    "dkdv": kernels.attention_bwd_dkdv_kernel,
    "dkdv_atomic": kernels.attention_bwd_dkdv_kernel,
    "dq": kernels.attention_bwd_dq_kernel,
}

# one fixed launch configuration under the interpreter: big tiles mean fewer, cheaper numpy steps
_INTERP_BLOCK = {"BLOCK_M": 32, "BLOCK_N": 32}

# split-KV decoding: used when there are few query rows (<= SPLIT_MAX_Q), at least SPLIT_MIN_KEYS keys, and
# too few query tiles to fill the GPU
SPLIT_MAX_Q = 16
SPLIT_MIN_KEYS = 512


def _smem_limit() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "shared_memory_per_block_optin", 99 * 1024))


def _allowed(kind: str, cfg: tuple[int, int, int, int], bd: int, group: int, dropout: bool, ws: bool) -> bool:
    """Whether a candidate stays out of local memory here, as `fastformer inspect` reads the kernels on sm_90.

    Dropout's mask bits spill the forward's 128x128 tile and the backward's 64x128 ones; beyond d = 64 the dK/dV
    kernel (keys, values and both fp32 accumulators resident) fits in registers only as 32x128 on 8 warps, or as
    64x64 on 8 and 32x64 on 4 without GQA (whose extra loop over the query heads of a kv head costs registers).

    The atomic-dQ dK/dV kernel ("dkdv_atomic") also holds a dQ tile and the atomics' addresses: below d = 64 its
    dS K product reaches wgmma only with 64-row query tiles; at d = 64 GQA with dropout fits only 16-row ones;
    beyond d = 64 16x128 on 8 warps always fits (but for GQA with dropout, where every config of either mode
    spills), 32x128 only without GQA or dropout, 64x128 never, and 64x64 (one stage: a second one spills) only
    without dropout.

    The forward's 128-row tiles on 4 warps are for the warp-specialised loop (``ws``) only.
    """
    bm, bn, warps, _ = cfg
    if kind == "fwd" and bm == 128 and warps == 4:
        return ws
    if dropout and (bm * bn > 128 * 64 if kind == "fwd" else (bm, bn) == (64, 128)):
        return False
    if kind == "dkdv" and bd > 64:
        return (bm, bn, warps) == (32, 128, 8) or (group == 1 and (bm, bn, warps) in ((64, 64, 8), (32, 64, 4)))
    if kind == "dkdv_atomic":
        if bd < 64:
            return bm == 64
        if bd == 64:
            return bm == 16 or not (dropout and group > 1)
        if (bm, bn, warps) == (16, 128, 8):
            return True
        if (bm, bn) == (32, 128):
            return group == 1 and not dropout
        return bn == 64 and not dropout
    return True


def _fits_smem(kind: str, cfg: tuple[int, int, int, int], bd: int, elem: int, limit: int) -> bool:
    bm, bn, _, stages = cfg
    if kind == "fwd":  # q tile resident, K and V tiles pipelined
        smem = (bm * bd + stages * 2 * bn * bd) * elem
    else:  # k, v resident, q and dO tiles pipelined, P/dS staged
        smem = (2 * bn * bd + stages * 2 * bm * bd) * elem + bm * bn * 4
    return smem <= limit


def _usable(kind: str, bd: int, elem: int, group: int, dropout: bool, ws: bool) -> list[tuple[int, int, int, int]]:
    """The candidates of ``kind`` for this head dim (BLOCK_D), element size and flags, in order of preference."""
    limit = _smem_limit()
    table = _CONFIGS[kind]
    usable = [c for c in table if _allowed(kind, c, bd, group, dropout, ws) and _fits_smem(kind, c, bd, elem, limit)]
    return usable or [min(table, key=lambda c: c[0] * c[1])]


def _zero_dq(nargs: dict) -> None:
    # the atomic dK/dV kernel adds into DQ: every benchmark run, and the run after them, must start from zero
    nargs["DQ"].zero_()


def _configs(kind: str) -> list:
    import triton

    hook = _zero_dq if kind == "dkdv_atomic" else None
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st, pre_hook=hook)
        for m, n, w, st in _CONFIGS[kind]
    ]


def _prune(kind: str):
    def prune(configs, named_args, **kwargs):
        bd, dropout, ws = kwargs["BLOCK_D"], kwargs["HAS_DROPOUT"], kwargs.get("WARP_SPEC", False)
        usable = _usable(kind, bd, named_args["Q"].element_size(), named_args["group"], dropout, ws)
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in usable]

    return prune


def kernel(kind: str):
    """The jitted kernel ("fwd", "dkdv", "dkdv_atomic" or "dq"), wrapped in an autotuner on GPU (fixed configs
    otherwise). "dkdv_atomic" is the dK/dV kernel launched with ATOMIC_DQ, tuned apart from "dkdv"."""
    if not utils.autotune_enabled():
        return _KERNELS[kind]
    key = _KEY + _FWD_KEY if kind == "fwd" else _KEY
    return utils.autotuned(f"attention_{kind}", _KERNELS[kind], lambda: _configs(kind), key, _prune(kind))


def seq_bucket(n: int) -> int:
    return min(utils.next_pow2(max(n, 1)), 8192)


def launch_meta(kind: str, a: AttentionArgs, bd: int, ws: bool = False) -> dict:
    """Launch settings when not autotuning: the interpreter's config, or the first usable candidate on GPU
    (``ws``: the forward's loop is warp-specialised)."""
    if utils.interpreting():
        return dict(_INTERP_BLOCK)
    if utils.autotune_enabled():
        return {}
    bm, bn, w, st = _usable(kind, bd, a.q.element_size(), a.group, a.dropout_p > 0, ws)[0]
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}


def num_splits(a: AttentionArgs, device: torch.device) -> int:
    """Key splits of the forward: 1 (the plain path) unless decoding few rows over many keys on an idle GPU."""
    if a.varlen or a.sq > SPLIT_MAX_Q or a.sk < SPLIT_MIN_KEYS:
        return 1
    # row tiles per (batch, kv head): a tile packs the group's query heads
    bd = max(16, utils.next_pow2(a.d))
    programs = a.batch * a.hkv * utils.cdiv(a.group * a.sq, split_meta(bd, a.q.element_size())["BLOCK_M"])
    target = 2 * utils.sm_count(device)
    if programs >= target:
        return 1
    return max(1, min(utils.cdiv(target, programs), utils.cdiv(a.sk, 256)))


def split_meta(bd: int, elem: int) -> dict:
    """Tiles and launch settings of the split-KV forward: K/V tiles of BLOCK_N x BLOCK_D pipelined within shared
    memory for wide rows and fp32. On GPU the row tile has 64 rows, the fewest wgmma takes on sm_90 (decoding
    fills group of them per (batch, kv head): the step is bound by reading K/V, not by the idle rows' arithmetic);
    the interpreter runs 16."""
    row_bytes = bd * elem
    if utils.interpreting():
        return {"BLOCK_M": 16, "BLOCK_N": 32}
    block_n = 32 if row_bytes > 256 else (128 if row_bytes <= 128 else 64)
    return {"BLOCK_M": 64, "BLOCK_N": block_n, "num_warps": 4, "num_stages": 3 if row_bytes <= 256 else 2}


def combine_tiles(rows: int, bd: int, device: torch.device) -> tuple[int, int]:
    """(rows, head-dim lanes) per program of the split-KV combine: up to 16 rows by the whole head dim, shrunk
    (rows first, then D down to 32 lanes) until the programs fill the GPU twice over; a decoding step has only
    B * H * Sq rows, which 16-row programs would leave on a few SMs."""
    target = 2 * utils.sm_count(device)
    block_r, block_d = 16, bd
    while utils.cdiv(rows, block_r) * utils.cdiv(bd, block_d) < target and (block_r > 1 or block_d > 32):
        if block_r > 1:
            block_r //= 2
        else:
            block_d //= 2
    return block_r, block_d


def warp_spec_ok(a: AttentionArgs, use_tma: bool) -> bool:
    """Whether the forward may warp-specialise its key loop (producer warps issue the TMA loads while two consumer
    warpgroups alternate softmax and matmuls). Triton 3.6 compiles that for one unmasked loop fed by tensor
    descriptors only, so: TMA, not causal, no padding mask or dropout, dense, and keys a multiple of 128 (every
    BLOCK_N divides them, so no tile needs the masked edge loop)."""
    plain = not (a.causal or a.varlen or a.key_padding_mask is not None or a.dropout_p > 0)
    return use_tma and plain and a.sk % 128 == 0
