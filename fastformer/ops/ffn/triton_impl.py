"""The feed-forward block on the Triton kernels of kernels/ffn.py (CUDA tensors, or CPU under the interpreter).

``gemm`` is ``linear_kernel`` with its forward epilogue (bias, activation, dropout, optionally the
pre-activation stored); ``grad_pre`` fuses act'(pre) and the mask into the epilogue of the GEMM that produces
dh when there is one, else runs ``act_grad_kernel``. Results are in the input dtype; inputs may be strided.
The GEMM is persistent, loads through tensor descriptors where the device and the operands' layout allow, and
splits K over a workspace when a plain GEMM has too few output tiles to fill the device (``split_k``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastformer import utils
from fastformer.kernels.ffn import act_grad_kernel, linear_kernel, splitk_reduce_kernel
from fastformer.ops import dropout
from fastformer.ops.ffn.op import ACT_CODE, PLAIN, Epilogue

# one launch configuration when not autotuning: the interpreter's (few, cheap numpy steps), or one that fits
# every dtype's shared memory on sm80 and sm90 (FASTFORMER_AUTOTUNE=0)
_INTERP_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 4}
_FIXED_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}
_FIXED_HEAVY = dict(_FIXED_CONFIG, BLOCK_N=64)  # the activation-gradient epilogue with dropout spills 64x128
# bf16/fp16 tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) that fit sm80 (164 KiB) and sm90 (228 KiB)
# shared memory; configs that do not fit (fp32 inputs) fail to compile and the autotuner skips them
_TUNE_TILES = ((128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 3))
# the autotune key: problem size buckets, every epilogue flag and every operand-path flag, so a config tuned for one
# variant is never reused for another (they differ in registers, shared memory and time)
_KEY = ["m_bucket", "n_bucket", "k_bucket", "EPILOGUE", "ACT", "DROPOUT", "STORE_AUX", "HAS_BIAS"]
_KEY += ["USE_TMA", "A_MMAJOR", "B_KMAJOR", "SPLIT_K"]
# split-K: the output tile the autotuner picks for large GEMMs (what tile counts are judged on when tuning), the
# least K a split keeps, and the most splits
_SPLIT_TILE = (128, 128)
_MIN_SPLIT_K = 1024
_MAX_SPLIT_K = 16
_REDUCE_BLOCK = 1024  # elements per program of splitk_reduce_kernel


def _configs() -> list:
    import triton

    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in _TUNE_TILES
    ]


def _prune(configs: list, _named_args: dict, **kwargs) -> list:
    """Tiles whose epilogue would spill or overflow shared memory, as `fastformer inspect` reads them on sm_90 (and
    sm_80): the 128x256 tile (128 fp32 accumulators per thread) serves only plain GEMMs (the second layer, weight
    gradients) loaded through TMA, and not with split-K (the layout change of its fp32 partial tile takes 128 KiB of
    shared memory beside the pipeline's 144, which a persistent kernel keeps live) nor on the pointer path (its
    addresses and loads in flight no longer fit beside the accumulators); 128-row tiles in the activation-gradient
    epilogue with dropout (it also rebuilds h)."""
    plain = kwargs["ACT"] == 0 and not kwargs["DROPOUT"] and kwargs["EPILOGUE"] == 0 and not kwargs["STORE_AUX"]
    heavy = kwargs["EPILOGUE"] == 1 and kwargs["DROPOUT"]
    wide_ok = plain and kwargs["USE_TMA"] and kwargs["SPLIT_K"] == 1

    def ok(c) -> bool:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        return (wide_ok or bm * bn < 128 * 256) and not (heavy and bm >= 128)

    return [c for c in configs if ok(c)]


def _kernel(heavy: bool) -> tuple[object, dict]:
    """(the GEMM kernel, launch settings): autotuned on power-of-two buckets of m, n, k and the kernel's flags, or
    one fixed config (a smaller one for the ``heavy`` activation-gradient epilogue with dropout)."""
    if utils.autotune_enabled():
        return utils.autotuned("ffn.linear", linear_kernel, _configs, _KEY, _prune), {}
    if utils.interpreting():
        return linear_kernel, dict(_INTERP_CONFIG)
    return linear_kernel, dict(_FIXED_HEAVY if heavy else _FIXED_CONFIG)


def _bucket(n: int) -> int:
    return min(utils.next_pow2(n), 1 << 16)


def split_k(tiles: int, sms: int, k: int) -> int:
    """Programs that share one output tile, each over a slice of K of length ~k / split (1: no split).

    A GEMM whose ``tiles`` output tiles fill fewer than two waves of the ``sms`` SMs idles most of the device for
    much of its run: the weight gradients of GPT-2 (768x3072 outputs, K = 8192 tokens) have 72-144 large tiles on
    132 SMs, 0.55-1.09 waves. Splitting K makes tiles * split work items, enough for about two waves (the last,
    partial wave then costs at most a third of the run), at the price of split fp32 partial tiles written and read
    back once by the reduction. Each slice keeps at least ``_MIN_SPLIT_K`` of K, so its pipelined loop still hides
    its prologue and the partials stay small next to the operand panels it reads; at most ``_MAX_SPLIT_K`` slices.
    """
    if tiles <= 0 or tiles >= 2 * sms:
        return 1
    return max(1, min(utils.cdiv(2 * sms, tiles), k // _MIN_SPLIT_K, _MAX_SPLIT_K))


def _storage(t: Tensor) -> tuple[Tensor, bool]:
    """(the view of 2-D ``t`` whose last stride is 1 when either is, whether that is ``t.T``): what a tensor
    descriptor can describe; an operand with neither stride 1 comes back as is and fails ``utils.tma_aligned``."""
    if t.stride(1) == 1 or t.stride(0) != 1:
        return t, False
    return t.t(), True


def _sm_budget(device: torch.device) -> tuple[int, int]:
    """(SMs, shared memory per SM in bytes) of ``device``: what the persistent grid is sized by."""
    if utils.interpreting():
        return utils.sm_count(device), 0
    props = torch.cuda.get_device_properties(device)
    return utils.sm_count(device), int(getattr(props, "shared_memory_per_block_optin", 99 * 1024))


def _programs(budget: tuple[int, int], cfg: dict, elem: int) -> int:
    """Size of the persistent grid: SMs times the CTAs of config ``cfg`` (operands of ``elem`` bytes) that fit on
    one SM at once, by the pipeline's shared memory and a generous estimate of registers (the fp32 accumulators
    per thread plus 128 for addresses, loads and the epilogue): a program that did not fit would start only when
    another ends, and then run all of its tiles late. ``budget`` is ``_sm_budget``'s; with no shared memory
    figure (the interpreter, whose programs run one after another) one program per stand-in SM, so that small
    test problems still loop over several tiles per program."""
    sms, smem_per_sm = budget
    if smem_per_sm == 0:
        return sms
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    warps, stages = cfg.get("num_warps", 4), cfg.get("num_stages", 3)
    smem = stages * (bm * bk + bk * bn) * elem
    regs = 32 * warps * (bm * bn // (32 * warps) + 128)
    return sms * max(1, min(smem_per_sm // smem, 65536 // regs))


def _launch(a: Tensor, b: Tensor, out: tuple, bias: Tensor | None, epi: Epilogue, epilogue: int, store: bool) -> None:
    """``linear_kernel`` on strided a (M, K) and b (K, N) into ``out = (C, AUX, H)``, each contiguous (M, N) or None.

    Epilogue 0 writes C = dropout(act(acc + bias)) and, with ``store``, AUX = acc + bias; epilogue 1 reads pre
    from AUX and writes C = acc * act'(pre) * mask and, with ``store``, H = dropout(act(pre)).

    A and B go through tensor descriptors when the device has TMA and both operands' storage is laid out as TMA
    requires (a transposed view is described as stored), else through masked pointer loads. A plain GEMM (no bias,
    activation, dropout or stored pre-activation) whose output tiles fill the device poorly splits K
    (``split_k``): fp32 partials in a workspace, then ``splitk_reduce_kernel`` sums them in a fixed order into C.
    """
    (m, k), n = a.shape, b.shape[1]
    if m == 0 or n == 0:
        return
    kernel, meta = _kernel(epilogue == 1 and epi.dropout_p > 0)
    a_store, a_mmajor = _storage(a)
    b_store, b_kmajor = _storage(b)
    use_tma = k > 0 and utils.tma_capable(a.device) and utils.tma_aligned(a_store, b_store)
    if use_tma:
        utils.ensure_tma_allocator()
    else:
        a_mmajor = b_kmajor = False  # the pointer path reads any strides as they are
    budget = _sm_budget(a.device)  # read now: a grid function may run after the launch returns
    plain = epilogue == 0 and bias is None and epi.act == "none" and epi.dropout_p == 0 and not store
    split = 1
    if plain:
        bm, bn = (meta["BLOCK_M"], meta["BLOCK_N"]) if meta else _SPLIT_TILE
        split = split_k(utils.cdiv(m, bm) * utils.cdiv(n, bn), budget[0], k)
    c = out[0]
    dst = c if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=c.device)

    def grid(cfg: dict) -> tuple[int]:
        items = utils.cdiv(m, cfg["BLOCK_M"]) * utils.cdiv(n, cfg["BLOCK_N"]) * split
        return (min(items, _programs(budget, cfg, a.element_size())),)

    kernel[grid](
        a, b, bias, dst, *out[1:], m, n, k, *a.stride(), *b.stride(), *dropout.kernel_args(epi.dropout_p, epi.seed),
        _bucket(m), _bucket(n), _bucket(k), HAS_BIAS=bias is not None, ACT=ACT_CODE[epi.act], DROPOUT=epi.dropout_p > 0,
        EPILOGUE=epilogue, STORE_AUX=store, DOT_PRECISION=utils.dot_precision(a.dtype, a.device), USE_TMA=use_tma,
        A_MMAJOR=a_mmajor, B_KMAJOR=b_kmajor, SPLIT_K=split, **meta,
    )  # fmt: skip
    if split > 1:
        splitk_reduce_kernel[(utils.cdiv(m * n, _REDUCE_BLOCK),)](dst, c, m * n, SPLIT_K=split, BLOCK=_REDUCE_BLOCK)


def gemm(
    a: Tensor, b: Tensor, out_dtype: torch.dtype, bias: Tensor | None = None, epi: Epilogue = PLAIN, store_pre=False
) -> tuple[Tensor, Tensor | None]:
    """(dropout(act(a @ b + bias)), a @ b + bias when store_pre else None), both contiguous in ``out_dtype``."""
    shape = (a.shape[0], b.shape[1])
    c = a.new_empty(shape, dtype=out_dtype)
    pre = a.new_empty(shape, dtype=out_dtype) if store_pre else None
    _launch(a, b, (c, pre, None), bias, epi, 0, store_pre)
    return c, pre


def grad_pre(dy: Tensor, w_t: Tensor | None, pre: Tensor | None, epi: Epilogue, want_h: bool) -> tuple:
    """(d(pre) = (dy @ w_t or dy) * act'(pre) * keep/(1-p), h = dropout(act(pre)) when want_h) in pre's dtype.

    With ``w_t`` the product is one GEMM with the derivative in its epilogue (which also writes h); without,
    one elementwise pass over dy (``pre`` may then be None when there is no activation; h is not available).
    """
    if w_t is not None:
        g = pre.new_empty((dy.shape[0], w_t.shape[1]))
        h = torch.empty_like(pre) if want_h else None
        _launch(dy, w_t, (g, pre, h), None, epi, 1, want_h)
        return g, h
    (m, n), g = dy.shape, dy.new_empty(dy.shape)
    if g.numel() == 0:
        return g, None
    block_n = min(max(4, utils.next_pow2(n)), 1024)  # dropout tiles cover whole groups of 4 columns
    block_m = max(1, 4096 // block_n)
    act_grad_kernel[(utils.cdiv(m, block_m), utils.cdiv(n, block_n))](
        dy, pre, g, m, n, *dy.stride(), *dropout.kernel_args(epi.dropout_p, epi.seed),
        ACT=ACT_CODE[epi.act], DROPOUT=epi.dropout_p > 0, BLOCK_M=block_m, BLOCK_N=block_n,
    )  # fmt: skip
    return g, None
