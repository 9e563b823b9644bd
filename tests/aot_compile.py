"""Compile every Triton kernel for real GPUs (sm_80, sm_90) without one: run by test_gpu_compile.py.

The CPU interpreter executes kernels as numpy and accepts code that Triton's compiler rejects (types of
loop variables, unsupported ops, bf16 paths it cannot run), so CI also lowers each kernel to a cubin, in
bf16 and the other dtypes, with the flag combinations and tile sizes the launchers use.
Usage: python tests/aot_compile.py [ARCH ...]; prints one line per kernel and exits non-zero on failure.
"""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # must be unset before triton is imported

import triton  # noqa: E402
from fastformer.kernels import attention, ffn, layer_norm  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

FLOAT_ARGS = {"eps", "keep_scale", "scale", "sm_scale", "qk_scale", "drop_scale"}
FP32_PTRS = {"MEAN", "RSTD", "DW", "DB", "Lse", "Delta", "OPart", "LPart", "PART"}
PTR_TYPES = {"Mask": "*i1", "CuQ": "*i32", "CuK": "*i32"}


def signature(fn, dtype: str, consts: dict) -> dict:
    """Argument types by the kernels' naming rule: pointers in capitals, runtime scalars in lower case."""
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name[0].isupper():
            sig[name] = PTR_TYPES.get(name, "*fp32" if name in FP32_PTRS else f"*{dtype}")
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        elif name == "seed":
            sig[name] = "i64"
        else:
            sig[name] = "i32"
    return sig


def compile_one(fn, dtype: str, consts: dict, arch: int, warps: int = 4, stages: int = 2) -> int:
    src = ASTSource(fn=fn, signature=signature(fn, dtype, consts), constexprs=consts)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})
    return kernel.metadata.shared


def cases(arch: int):
    """(label, kernel, dtype, constexprs, num_warps, num_stages) covering every flag at least once; tensor
    descriptors (USE_TMA) only where the launchers use them, sm_90."""
    tma = arch >= 90
    ln = dict(
        HAS_RESIDUAL=True, HAS_WEIGHT=True, HAS_BIAS=True, HAS_DROPOUT=True, STORE_S=True, BLOCK_M=4, BLOCK_N=1024,
        NUM_CHUNKS=1, ROWS_SPREAD=False,
    )  # fmt: skip
    yield "ln fwd fused", layer_norm.layer_norm_fwd_kernel, "bf16", ln, 4, 1
    plain = dict(ln, HAS_RESIDUAL=False, HAS_BIAS=False, HAS_DROPOUT=False, STORE_S=False, BLOCK_M=1, BLOCK_N=8192)
    yield "ln fwd plain", layer_norm.layer_norm_fwd_kernel, "fp32", plain, 16, 1
    yield (
        "ln fwd 3 chunks",
        layer_norm.layer_norm_fwd_kernel,
        "bf16",
        dict(ln, BLOCK_N=256, NUM_CHUNKS=3, ROWS_SPREAD=True),
        4,
        1,
    )
    lnb = dict(
        HAS_DS_OUT=True, HAS_DRES=True, HAS_WEIGHT=True, HAS_DROPOUT=True, BLOCK_M=4, BLOCK_N=1024, NUM_CHUNKS=1,
        ROWS_SPREAD=False,
    )  # fmt: skip
    yield "ln bwd fused", layer_norm.layer_norm_bwd_kernel, "bf16", lnb, 4, 1
    yield (
        "ln bwd 3 chunks",
        layer_norm.layer_norm_bwd_kernel,
        "bf16",
        dict(lnb, BLOCK_N=256, NUM_CHUNKS=3, ROWS_SPREAD=True),
        4,
        1,
    )
    yield (
        "ln bwd plain",
        layer_norm.layer_norm_bwd_kernel,
        "fp16",
        dict(lnb, HAS_DS_OUT=False, HAS_DRES=False, HAS_DROPOUT=False),
        4,
        1,
    )
    mm = dict(
        HAS_BIAS=True,
        ACT=2,
        DROPOUT=True,
        EPILOGUE=0,
        STORE_AUX=True,
        DOT_PRECISION="tf32",
        BLOCK_M=128,
        BLOCK_N=128,
        BLOCK_K=64,
        GROUP_M=8,
        USE_TMA=tma,
        A_MMAJOR=False,
        B_KMAJOR=True,
        SPLIT_K=1,
    )
    yield "ffn gemm fwd", ffn.linear_kernel, "bf16", mm, 8, 3
    yield "ffn gemm dgelu", ffn.linear_kernel, "bf16", dict(mm, HAS_BIAS=False, ACT=1, EPILOGUE=1, USE_TMA=False), 8, 3
    plain = dict(mm, HAS_BIAS=False, ACT=0, DROPOUT=False, STORE_AUX=False, A_MMAJOR=tma, B_KMAJOR=False, SPLIT_K=2)
    yield "ffn gemm dW split-k", ffn.linear_kernel, "bf16", plain, 8, 3
    yield "ffn split-k reduce", ffn.splitk_reduce_kernel, "bf16", dict(SPLIT_K=2, BLOCK=1024), 4, 1
    yield (
        "ffn gemm fp32 relu",
        ffn.linear_kernel,
        "fp32",
        dict(mm, ACT=3, DROPOUT=False, STORE_AUX=False, DOT_PRECISION="ieee", BLOCK_N=64, BLOCK_K=32, USE_TMA=False),
        4,
        2,
    )
    yield "ffn act grad", ffn.act_grad_kernel, "bf16", dict(ACT=1, DROPOUT=True, BLOCK_M=32, BLOCK_N=128), 4, 1
    yield "ffn dropout grad", ffn.act_grad_kernel, "fp16", dict(ACT=0, DROPOUT=True, BLOCK_M=4, BLOCK_N=1024), 4, 1
    att = dict(
        IS_CAUSAL=True,
        HAS_MASK=False,
        IS_VARLEN=False,
        HAS_DROPOUT=False,
        BLOCK_M=128,
        BLOCK_N=64,
        BLOCK_D=128,
        DOT_PREC="tf32",
    )
    fwd = dict(att, IS_SPLIT=False, USE_TMA=tma, WARP_SPEC=False)
    yield "attn fwd causal", attention.attention_fwd_kernel, "bf16", fwd, 8, 3
    if tma:
        ws = dict(fwd, IS_CAUSAL=False, WARP_SPEC=True)
        yield "attn fwd warp-specialised", attention.attention_fwd_kernel, "bf16", ws, 4, 2
    yield (
        "attn fwd mask+dropout d80",
        attention.attention_fwd_kernel,
        "fp16",
        dict(fwd, IS_CAUSAL=False, HAS_MASK=True, HAS_DROPOUT=True, BLOCK_D=128, USE_TMA=False),
        4,
        3,
    )
    yield (
        "attn fwd varlen d256",
        attention.attention_fwd_kernel,
        "bf16",
        dict(fwd, IS_VARLEN=True, BLOCK_M=64, BLOCK_N=32, BLOCK_D=256),
        4,
        2,
    )
    yield "attn fwd split-kv", attention.attention_fwd_kernel, "bf16", dict(fwd, BLOCK_M=64, IS_SPLIT=True), 4, 3
    yield "attn combine", attention.attention_fwd_combine_kernel, "bf16", dict(BLOCK_M=16, BLOCK_D=128), 4, 1
    yield (
        "attn bwd pre",
        attention.attention_bwd_preprocess_kernel,
        "bf16",
        dict(IS_VARLEN=True, BLOCK_M=64, BLOCK_D=128),
        4,
        1,
    )
    bwd = dict(att, BLOCK_M=64, BLOCK_N=64, HAS_MASK=True, HAS_DROPOUT=True)
    yield "attn bwd dkdv", attention.attention_bwd_dkdv_kernel, "bf16", dict(bwd, ATOMIC_DQ=False), 4, 2
    atomic = dict(bwd, ATOMIC_DQ=True, BLOCK_M=32, BLOCK_N=128, HAS_DROPOUT=False)
    yield "attn bwd dkdv atomic dQ", attention.attention_bwd_dkdv_kernel, "bf16", atomic, 8, 2
    yield "attn bwd dq", attention.attention_bwd_dq_kernel, "bf16", dict(bwd, IS_VARLEN=True), 4, 2
    yield (
        "attn bwd dkdv fp32",
        attention.attention_bwd_dkdv_kernel,
        "fp32",
        dict(bwd, DOT_PREC="ieee", BLOCK_D=64, BLOCK_M=32, BLOCK_N=32, ATOMIC_DQ=True),
        4,
        2,
    )


def main(archs: list[int]) -> int:
    failures = 0
    for arch in archs:
        for label, fn, dtype, consts, warps, stages in cases(arch):
            try:
                smem = compile_one(fn, dtype, consts, arch, warps, stages)
                print(f"ok   sm_{arch} {label} ({dtype}, {smem} B shared)", flush=True)
            except Exception as e:  # noqa: BLE001 - report every kernel, then fail
                failures += 1
                print(f"FAIL sm_{arch} {label} ({dtype}): {type(e).__name__}: {str(e)[:2000]}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main([int(a) for a in sys.argv[1:]] or [90]))
