"""The feed-forward block on the Triton kernels of kernels/ffn.py (CUDA tensors, or CPU under the interpreter).

``gemm`` is ``linear_kernel`` with its forward epilogue (bias, activation, dropout, optionally the
pre-activation stored); ``grad_pre`` fuses act'(pre) and the mask into the epilogue of the GEMM that produces
dh when there is one, else runs ``act_grad_kernel``. Results are in the input dtype; inputs may be strided.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastformer import utils
from fastformer.kernels.ffn import act_grad_kernel, linear_kernel
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
# the autotune key: problem size buckets and every epilogue flag, so a config tuned for one epilogue is never
# reused for another (they differ in registers and in time)
_KEY = ["m_bucket", "n_bucket", "k_bucket", "EPILOGUE", "ACT", "DROPOUT", "STORE_AUX", "HAS_BIAS"]


def _configs() -> list:
    import triton

    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in _TUNE_TILES
    ]


def _prune(configs: list, _named_args: dict, **kwargs) -> list:
    """Tiles whose epilogue would spill, as `fastformer inspect` reads them on sm_90: the 128x256 tile (128 fp32
    accumulators per thread) with anything beyond the bias, so it serves plain GEMMs only (the second layer, weight
    gradients); 128-row tiles in the activation-gradient epilogue with dropout (it also rebuilds h)."""
    plain = kwargs["ACT"] == 0 and not kwargs["DROPOUT"] and kwargs["EPILOGUE"] == 0 and not kwargs["STORE_AUX"]
    heavy = kwargs["EPILOGUE"] == 1 and kwargs["DROPOUT"]

    def ok(c) -> bool:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        return (plain or bm * bn < 128 * 256) and not (heavy and bm >= 128)

    return [c for c in configs if ok(c)]


def _kernel(heavy: bool) -> tuple[object, dict]:
    """(the GEMM kernel, launch settings): autotuned on power-of-two buckets of m, n, k and the epilogue, or one
    fixed config (a smaller one for the ``heavy`` activation-gradient epilogue with dropout)."""
    if utils.autotune_enabled():
        return utils.autotuned("ffn.linear", linear_kernel, _configs, _KEY, _prune), {}
    if utils.interpreting():
        return linear_kernel, dict(_INTERP_CONFIG)
    return linear_kernel, dict(_FIXED_HEAVY if heavy else _FIXED_CONFIG)


def _bucket(n: int) -> int:
    return min(utils.next_pow2(n), 1 << 16)


def _launch(a: Tensor, b: Tensor, out: tuple, bias: Tensor | None, epi: Epilogue, epilogue: int, store: bool) -> None:
    """``linear_kernel`` on strided a (M, K) and b (K, N) into ``out = (C, AUX, H)``, each contiguous (M, N) or None.

    Epilogue 0 writes C = dropout(act(acc + bias)) and, with ``store``, AUX = acc + bias; epilogue 1 reads pre
    from AUX and writes C = acc * act'(pre) * mask and, with ``store``, H = dropout(act(pre)).
    """
    (m, k), n = a.shape, b.shape[1]
    if m == 0 or n == 0:
        return
    kernel, meta = _kernel(epilogue == 1 and epi.dropout_p > 0)

    def grid(cfg):
        return (utils.cdiv(m, cfg["BLOCK_M"]) * utils.cdiv(n, cfg["BLOCK_N"]),)

    kernel[grid](
        a, b, bias, *out, m, n, k, *a.stride(), *b.stride(), *dropout.kernel_args(epi.dropout_p, epi.seed),
        _bucket(m), _bucket(n), _bucket(k), HAS_BIAS=bias is not None, ACT=ACT_CODE[epi.act], DROPOUT=epi.dropout_p > 0,
        EPILOGUE=epilogue, STORE_AUX=store, DOT_PRECISION=utils.dot_precision(a.dtype, a.device), **meta,
    )  # fmt: skip


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
