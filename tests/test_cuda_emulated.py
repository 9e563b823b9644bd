"""The CUDA C++ kernels (csrc/attention.cu, layer_norm.cu, ffn.cu) run on the CPU through a host emulation.

CI has no GPU, so these kernels would otherwise be checked only by the compiler. Here g++ compiles the .cu files
unchanged with tests/emulation/cuda_host.h forced in first: threads of a block become cooperative
contexts, and mma.sync, ldmatrix, cp.async and shuffles are emulated from the PTX ISA's fragment layouts (the
header says how, and what it checks: stale reads of tiles before their cp.async wait, reads of unwritten shared
memory, misaligned or out-of-bounds ldmatrix and cp.async, divergent barriers). The launcher in
fastformer/ops/attention/cuda_impl.py runs as in production, with fastformer._C replaced by the emulated library;
every case runs with each forward kernel, mma.sync (sm_80) and wgmma (sm_90a, operands read through shared-memory
descriptors as the header emulates them).

Numbers follow the project's rule: |ours - ref64| <= 2 |torch in the same dtype - ref64| + atol, forward and every
gradient, with dropout masks shared through the exact (Philox) mode. The LayerNorm cases cover the vector and scalar
paths, a row per team of threads and the long-row kernels, several partial dW/dB rows; the FFN cases every
activation with and without dropout. What emulation cannot show (speed, real
hardware ordering, the compiled PTX) is the GPU check's and tests/test_cuda_sass.py's.

Needs g++ and CUDA's headers (the toolkit's, or the copy in Triton's package); skipped without them.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fastformer import _build, _ext, testing, utils
from fastformer.ops import dropout
from fastformer.ops.attention import cuda_impl, torch_impl
from fastformer.ops.attention.op import AttentionArgs

HERE = Path(__file__).resolve().parent
EMU = HERE / "emulation"


def _cuda_include() -> Path | None:
    """A directory with cuda_runtime.h, cuda_fp16.h and cuda_bf16.h."""
    cands = [Path(os.environ[v]) / "include" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    nvcc = _build.find_nvcc()
    if nvcc:
        cands.append(Path(nvcc).resolve().parent.parent / "include")
    cands += [Path("/usr/local/cuda/include"), *sorted(Path("/usr/local").glob("cuda-*/include"))]
    try:
        import triton

        cands.append(Path(triton.__file__).parent / "backends" / "nvidia" / "include")
    except ImportError:
        pass
    need = ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h")
    return next((c for c in cands if all((c / n).is_file() for n in need)), None)


@pytest.fixture(scope="module")
def lib() -> ctypes.CDLL:
    """The emulated attention kernels, built once per source hash into fastformer's cache directory."""
    cxx = shutil.which("g++") or shutil.which("c++")
    inc = _cuda_include()
    if cxx is None or inc is None:
        pytest.skip("g++ or CUDA's headers (toolkit or Triton's copy) not found: cannot build the emulation")
    src = _build.source_dir()
    files = [src / "attention.cu", src / "layer_norm.cu", src / "ffn.cu", EMU / "capi.cpp"]
    deps = files + sorted(p for p in src.iterdir() if p.suffix in (".cuh", ".h")) + [EMU / "cuda_host.h"]
    key = hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in deps)).hexdigest()[:16]
    target = _build.cache_dir() / "emulation" / f"kernels-{key}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        cmd = [cxx, "-O2", "-std=c++17", "-fPIC", "-shared", "-include", str(EMU / "cuda_host.h"), f"-I{inc}"]
        cmd += [f"-I{src}", "-x", "c++", *map(str, files), "-o", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, f"emulation build failed:\n{proc.stderr[-4000:]}"
        os.replace(tmp, target)
    return ctypes.CDLL(str(target))


class _Emulated:
    """Stands in for fastformer._C: the same attention entry points, run by the emulation."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib

    def _call(self, fn, ptrs, dims, strides, causal, scale, seed, p, thresh, dtype, *flags):
        err = ctypes.create_string_buffer(512)
        d, s = (ctypes.c_int64 * len(dims))(*dims), (ctypes.c_int64 * len(strides))(*strides)
        u64 = ctypes.c_uint64
        fn(*map(u64, ptrs), d, len(dims), s, len(strides), int(causal), ctypes.c_double(scale), u64(seed),
           ctypes.c_double(p), ctypes.c_uint32(thresh), int(dtype), *map(int, flags), err)  # fmt: skip
        if err.value:
            raise RuntimeError(err.value.decode())

    def attention_fwd(self, *args):
        *ptrs, dims, strides, causal, scale, seed, p, thresh, dtype, wgmma, _stream = args
        self._call(self.lib.emu_attention_fwd, ptrs, dims, strides, causal, scale, seed, p, thresh, dtype, wgmma)

    def attention_bwd(self, *args):
        *ptrs, dims, strides, causal, scale, seed, p, thresh, dtype, _stream = args
        self._call(self.lib.emu_attention_bwd, ptrs, dims, strides, causal, scale, seed, p, thresh, dtype)

    def _plain(self, fn, args, types):
        """fn(*args, err) with each argument converted by its ctypes type, the stream (last) dropped."""
        err = ctypes.create_string_buffer(512)
        fn(*(t(a) for t, a in zip(types, args[:-1], strict=True)), err)
        if err.value:
            raise RuntimeError(err.value.decode())

    def layer_norm_fwd(self, *args):
        u, i, d = ctypes.c_uint64, ctypes.c_int64, ctypes.c_double
        self._plain(self.lib.emu_layer_norm_fwd, args, [u] * 8 + [i] * 4 + [d, u, d, ctypes.c_uint32, int])

    def layer_norm_bwd(self, *args):
        u, i, d = ctypes.c_uint64, ctypes.c_int64, ctypes.c_double
        self._plain(self.lib.emu_layer_norm_bwd, args, [u] * 10 + [i] * 3 + [u, d, ctypes.c_uint32, int])

    def ffn_bias_act_fwd(self, *args):
        u, i, d = ctypes.c_uint64, ctypes.c_int64, ctypes.c_double
        self._plain(self.lib.emu_ffn_bias_act_fwd, args, [u, u, u, int, i, i, int, u, d, ctypes.c_uint32, int])

    def ffn_act_bwd(self, *args):
        u, i, d = ctypes.c_uint64, ctypes.c_int64, ctypes.c_double
        self._plain(self.lib.emu_ffn_act_bwd, args, [u, u, u, i, i, int, u, d, ctypes.c_uint32, int])


@pytest.fixture(params=["mma", "wgmma"])
def emulated(lib, monkeypatch, request):
    """The emulated kernels in place of fastformer._C, the forward on the sm_80 (mma.sync) or sm_90a (wgmma) kernel."""
    monkeypatch.setattr(_ext, "load", lambda: _Emulated(lib))
    monkeypatch.setattr(utils, "stream_handle", lambda _device: 0)
    monkeypatch.setattr(cuda_impl, "use_wgmma", lambda _q: request.param == "wgmma")


def _args(q, k, v, mask=None, cu=None, causal=False, p=0.0, seed=None) -> AttentionArgs:
    if cu is not None:
        cu_q, cu_k = cu
        sq, sk = (int((c[1:] - c[:-1]).max()) for c in cu)
    else:
        cu_q = cu_k = None
        sq, sk = q.shape[1], k.shape[1]
    return AttentionArgs(q, k, v, mask, cu_q, cu_k, seed, sq, sk, causal, q.shape[-1] ** -0.5, p, "cuda")


def _check(a: AttentionArgs, dout: torch.Tensor | None = None) -> None:
    """The emulated kernels vs torch_impl in float64 and in a's dtype: out, lse and the three gradients."""
    hi = dataclasses.replace(a, q=a.q.double(), k=a.k.double(), v=a.v.double(), backend="torch")
    lo = dataclasses.replace(a, backend="torch")
    out, lse = cuda_impl.fwd(a)
    out64, lse64 = torch_impl.fwd(hi)
    out_pt, lse_pt = torch_impl.fwd(lo)
    testing.assert_close_2x("out", out, out64, out_pt)
    assert torch.equal(lse.isinf(), lse64.isinf()), "lse: rows that see no key differ"
    fin = lse64.isfinite()
    assert testing.max_err(lse[fin], lse64[fin]) < 1e-4, "lse"
    dout = torch.randn_like(a.q) if dout is None else dout
    grads = cuda_impl.bwd(a, dout, out, lse)
    grads64 = torch_impl.bwd(hi, dout.double(), out64, lse64)
    grads_pt = torch_impl.bwd(lo, dout, out_pt, lse_pt)
    for name, g, g64, gpt in zip(("dq", "dk", "dv"), grads, grads64, grads_pt, strict=True):
        testing.assert_close_2x(name, g, g64, gpt)


def _qkv(b, sq, sk, h, hkv, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, h, d, generator=gen).to(dtype)
    k, v = (torch.randn(b, sk, hkv, d, generator=gen).to(dtype) for _ in range(2))
    return q, k, v


CASES = [
    # b, sq, sk, h, hkv, d, dtype, causal, masked
    (1, 1, 17, 2, 1, 64, torch.float16, False, False),  # one query (decoding)
    (2, 17, 17, 2, 2, 64, torch.float16, True, False),
    (1, 97, 129, 4, 2, 128, torch.bfloat16, True, True),  # GQA, Sq < Sk, several key tiles
    (2, 129, 97, 2, 1, 64, torch.bfloat16, True, False),  # Sq > Sk: the first rows see no key
    (1, 40, 65, 3, 1, 128, torch.float16, False, True),  # MQA across a tile edge
    (1, 70, 300, 2, 1, 64, torch.float16, False, False),  # five key tiles: both pipeline stages, twice
    (1, 200, 200, 1, 1, 128, torch.bfloat16, True, False),  # causal over several tiles, two query blocks
]


@pytest.mark.parametrize("b,sq,sk,h,hkv,d,dtype,causal,masked", CASES)
@pytest.mark.usefixtures("emulated")
def test_emulated_matches_reference(b, sq, sk, h, hkv, d, dtype, causal, masked):
    q, k, v = _qkv(b, sq, sk, h, hkv, d, dtype)
    mask = None
    if masked:
        mask = torch.rand(b, sk, generator=torch.Generator().manual_seed(1)) > 0.3
        mask[0, : sk // 2] = False
    _check(_args(q, k, v, mask, causal=causal))


@pytest.mark.parametrize("p,causal,d,masked", [(0.3, True, 64, True), (0.1, False, 128, False)])
@pytest.mark.usefixtures("emulated")
def test_emulated_dropout_drops_the_reference_elements(p, causal, d, masked):
    """Exact mode: the kernels' keep decisions are the torch backend's (and the Triton kernels'), forward and
    backward, or the float64 comparison fails by O(1)."""
    q, k, v = _qkv(1, 65, 70, 2, 1, d, torch.float16)
    mask = torch.ones(1, 70, dtype=torch.bool) if masked else None
    if masked:
        mask[0, 3] = False
    with dropout.exact_dropout(True):
        seed = dropout.new_seed(p)
    _check(_args(q, k, v, mask, causal=causal, p=p, seed=seed))


@pytest.mark.usefixtures("emulated")
def test_emulated_varlen_with_an_empty_sequence():
    cu_q = torch.tensor([0, 17, 17, 50], dtype=torch.int32)
    cu_k = torch.tensor([0, 20, 29, 95], dtype=torch.int32)
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(50, 4, 64, generator=gen).half()
    k, v = (torch.randn(95, 2, 64, generator=gen).half() for _ in range(2))
    _check(_args(q, k, v, cu=(cu_q, cu_k), causal=True))


@pytest.mark.usefixtures("emulated")
def test_emulated_no_keys():
    """Sk = 0: every row sees no key (out 0, lse +inf, zero gradients); no TMA map over an empty tensor."""
    q, k, v = _qkv(2, 9, 0, 2, 1, 64, torch.float16)
    a = _args(q, k, v, causal=True)
    out, lse = cuda_impl.fwd(a)
    assert (out == 0).all() and torch.isinf(lse).all()
    assert all((g == 0).all() for g in cuda_impl.bwd(a, torch.randn_like(q), out, lse))


@pytest.mark.usefixtures("emulated")
def test_emulated_fully_padded_rows_and_nan_in_padding():
    """A sequence whose keys are all padding gives 0 and lse +inf; NaN stored in padded keys reaches nothing (the
    tile loads zero-fill padded keys instead of reading them)."""
    q, k, v = _qkv(2, 33, 33, 2, 1, 64, torch.bfloat16)
    mask = torch.ones(2, 33, dtype=torch.bool)
    mask[0] = False
    mask[1, 20:] = False
    k[1, 20:] = float("nan")
    v[1, 20:] = float("inf")
    a = _args(q, k, v, mask)
    out, lse = cuda_impl.fwd(a)
    assert torch.isfinite(out).all() and (out[0] == 0).all() and torch.isinf(lse[0]).all()
    dq, dk, dv = cuda_impl.bwd(a, torch.randn_like(q), out, lse)
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert (dk[1, 20:] == 0).all() and (dv[1, 20:] == 0).all() and (dq[0] == 0).all()
    k[1, 20:] = 0
    v[1, 20:] = 0
    _check(_args(q, k, v, mask))


@pytest.mark.usefixtures("emulated")
def test_emulated_strided_and_misaligned_inputs():
    """Views of a packed (B, S, 3, H, D) projection are read in place; a base address off 16 bytes or a token stride
    that is no multiple of 8 is copied first (cuda_impl.aligned); a non-contiguous grad_output works."""
    b, s, h, d = 1, 37, 2, 64
    qkv = torch.randn(b, s, 3, h, d).half()
    q, k, v = qkv.unbind(2)
    assert cuda_impl.aligned(q).data_ptr() == q.data_ptr()
    flat = torch.randn(b * s * h * d + 3).half()
    q_off = flat[3:].view(b, s, h, d)  # 6 bytes off alignment
    assert cuda_impl.aligned(q_off).data_ptr() != q_off.data_ptr()
    k_odd = torch.randn(b, s, h, d + 4).half()[..., :d]  # token stride 2 (d + 4): a multiple of 4, not of 8
    assert cuda_impl.aligned(k_odd).is_contiguous()
    dout = torch.randn(b, h, s, d).half().transpose(1, 2)
    _check(_args(q_off, k_odd, v, causal=True), dout=dout)


def test_cuda_backend_reasons():
    """What the CUDA kernels do not take is refused by name before any launch (api routes it to Triton or raises
    BackendError when cuda is named)."""
    assert "64 or 128" in cuda_impl.reason(torch.empty(1, 1, 1, 80, dtype=torch.float16))
    assert "float16 or bfloat16" in cuda_impl.reason(torch.empty(1, 1, 1, 64))
    assert cuda_impl.reason(torch.empty(1, 1, 1, 128, dtype=torch.bfloat16)) is None


# ---- LayerNorm and the FFN epilogues ----------------------------------------------------------------------------


@pytest.fixture
def emulated_elementwise(lib, monkeypatch):
    """The emulated kernels in place of fastformer._C for the LayerNorm and FFN launchers."""
    monkeypatch.setattr(_ext, "load", lambda: _Emulated(lib))
    monkeypatch.setattr(utils, "stream_handle", lambda _device: 0)


LN_CASES = [
    # rows, n, dtype, residual, dropout p, affine, layout, sm_count (1 or 2: one or several dW/dB partial rows)
    (5, 7, torch.float16, False, 0.0, False, "contig", 1),  # scalar packs, several rows per warp
    (3, 768, torch.bfloat16, True, 0.1, True, "contig", 2),  # 16-byte packs, a team per row
    (37, 96, torch.float32, True, 0.3, True, "contig", 1),  # many rows per block, the persistent backward loops
    (9, 1001, torch.float16, False, 0.2, True, "stride3", 2),  # odd width and row stride: the scalar path
    (9, 768, torch.bfloat16, False, 0.0, True, "offset", 2),  # a base off 16 bytes: the scalar path
    (3, 8200, torch.float16, True, 0.1, True, "contig", 1),  # past the row-in-registers limit: the long kernels
    (2, 20003, torch.float32, True, 0.0, False, "contig", 2),
]


@pytest.mark.parametrize("rows,n,dtype,residual,p,affine,layout,sm", LN_CASES)
@pytest.mark.usefixtures("emulated_elementwise")
def test_emulated_layer_norm(rows, n, dtype, residual, p, affine, layout, sm, monkeypatch):
    from fastformer.ops.layer_norm import cuda_impl as ln_cuda
    from fastformer.ops.layer_norm import torch_impl as ln_torch
    from fastformer.ops.layer_norm.op import LayerNormArgs

    monkeypatch.setattr(utils, "sm_count", lambda _device: sm)
    gen = torch.Generator().manual_seed(rows * 1000 + n)
    extra = {"contig": 0, "stride3": 3, "offset": 0}[layout]
    offset = 1 if layout == "offset" else 0
    flat = (torch.randn(rows * (n + extra) + offset, generator=gen) * 2 + 0.5).to(dtype)
    x = flat[offset:].view(rows, n + extra)[:, :n]
    r = torch.randn(rows, n, generator=gen).to(dtype) if residual else None
    w = (torch.randn(n, generator=gen) * 0.5 + 1).to(dtype) if affine else None
    b = (torch.randn(n, generator=gen) * 0.5).to(dtype) if affine else None
    with dropout.exact_dropout(True):
        seed = dropout.new_seed(p)

    def args(t):
        return LayerNormArgs(t(w) if affine else None, t(b) if affine else None, n, 1e-5, p, seed, "cuda")

    def hi(t):
        return t.double() if t is not None else None

    a, a64 = args(lambda t: t), args(hi)
    y, s_out, mean, rstd = ln_cuda.fwd(a, x, r)
    y64, s64, mean64, rstd64 = ln_torch.fwd(a64, hi(x), hi(r))
    ypt, spt, meanpt, rstdpt = ln_torch.fwd(a, x, r)
    testing.assert_close_2x("y", y, y64, ypt)
    if a.stores_s(r):
        assert torch.equal(s_out, spt), "the stored dropout(x) + residual differs from torch's"
    s2 = s_out if a.stores_s(r) else x
    dy = torch.randn(rows, n, generator=gen).to(dtype)
    dso = torch.randn(rows, n, generator=gen).to(dtype) if a.stores_s(r) else None
    got = ln_cuda.bwd(a, dy, dso, s2, mean, rstd, residual)
    ref = ln_torch.bwd(a64, hi(dy), hi(dso), hi(s2), mean64, rstd64, residual)
    pt = ln_torch.bwd(a, dy, dso, s2.contiguous(), meanpt, rstdpt, residual)
    for name, g, g64, gpt, used in zip(("dx", "dres", "dw", "db"), got, ref, pt, (True, residual, affine, affine)):
        if used:
            testing.assert_close_2x(name, g, g64, gpt)


@pytest.mark.parametrize("act", ["none", "gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize(
    "dtype,cols,p", [(torch.float16, 136, 0.1), (torch.bfloat16, 131, 0.0), (torch.float32, 96, 0.2)]
)
@pytest.mark.usefixtures("emulated_elementwise")
def test_emulated_ffn_epilogues(act, dtype, cols, p):
    """gemm with a stored pre-activation (ffn_bias_act_fwd) and grad_pre (ffn_act_bwd) against torch's, at widths
    that take the 16-byte path (136, 96) and the element path (131)."""
    from fastformer.ops.ffn import cuda_impl as ffn_cuda
    from fastformer.ops.ffn import torch_impl as ffn_torch
    from fastformer.ops.ffn.op import Epilogue

    gen = torch.Generator().manual_seed(cols)
    a, bmat = torch.randn(13, 40, generator=gen).to(dtype), torch.randn(40, cols, generator=gen).to(dtype)
    bias = torch.randn(cols, generator=gen).to(dtype)
    with dropout.exact_dropout(True):
        seed = dropout.new_seed(p)
    epi = Epilogue(act, p, seed)
    y, pre = ffn_cuda.gemm(a, bmat, dtype, bias, epi, store_pre=True)
    y64, pre64 = ffn_torch.gemm(a.double(), bmat.double(), torch.float64, bias.double(), epi, store_pre=True)
    ypt, prept = ffn_torch.gemm(a, bmat, dtype, bias, epi, store_pre=True)
    testing.assert_close_2x("y", y, y64, ypt)
    testing.assert_close_2x("pre", pre, pre64, prept)
    dy, w_t = torch.randn(13, 50, generator=gen).to(dtype), torch.randn(50, cols, generator=gen).to(dtype)
    g, h = ffn_cuda.grad_pre(dy, w_t, pre, epi, want_h=True)
    g64, h64 = ffn_torch.grad_pre(dy.double(), w_t.double(), pre.double(), epi, want_h=True)
    gpt, hpt = ffn_torch.grad_pre(dy, w_t, pre, epi, want_h=True)
    testing.assert_close_2x("d(pre)", g, g64, gpt.to(dtype))
    testing.assert_close_2x("h", h, h64, hpt)
