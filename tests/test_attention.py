"""Fused attention vs a float64 reference (flash-attn's 2x rule), forward and every gradient.

On CPU the triton backend runs in Triton's interpreter, so shapes are small and the combinations are a
covering set rather than a cross product. The Triton backward has two modes: the default adds dQ with atomics
(5 matmuls), ``torch.use_deterministic_algorithms(True)`` selects the deterministic kernels (7 matmuls); tests
that use the ``bwd_mode`` fixture run in both, the others in the default. bf16, long sequences, run-to-run
reproducibility on the GPU and the cuda backend are marked gpu.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastformer
from fastformer.ops import dropout as _dropout
from fastformer.ops.attention import attention_reference
from fastformer.ops.attention.op import AttentionArgs
from fastformer.ops.attention.torch_impl import varlen_dropout_rows
from fastformer.testing import assert_close_2x

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

FUSED = "triton"  # the backend under test in every CPU test (the interpreter on CPU)


def _rand(*shape, dtype=torch.float32, grad=True):
    t = torch.randn(*shape, dtype=dtype, device=DEVICE)
    return t.requires_grad_(grad)


def _grads(out, tensors, g):
    return torch.autograd.grad(out, tensors, g)


@contextlib.contextmanager
def _deterministic(on: bool):
    """``torch.use_deterministic_algorithms(on)`` inside the block, the caller's setting restored after."""
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


@pytest.fixture(params=["atomic", "deterministic"])
def bwd_mode(request):
    """Run the test in each backward mode of the Triton backend."""
    with _deterministic(request.param == "deterministic"):
        yield request.param


@pytest.fixture(params=["mma", "wgmma"])
def cuda_forward(request, monkeypatch):
    """Run a GPU test of the cuda backend with each forward: mma.sync (every sm_80+ GPU) and wgmma (sm_90, opted in
    with FASTFORMER_CUDA_WGMMA=1; skipped elsewhere)."""
    if "cuda" not in fastformer.available_backends():
        pytest.fail("the cuda backend is not available on this GPU machine (fastformer._C not built?)")
    if request.param == "wgmma":
        if torch.cuda.get_device_capability() != (9, 0):
            pytest.skip("the wgmma forward runs on sm_90 only")
        monkeypatch.setenv("FASTFORMER_CUDA_WGMMA", "1")
        from fastformer.ops.attention import cuda_impl

        assert cuda_impl.use_wgmma(torch.empty(1, device="cuda")), "sm_90 but no sm_90a code in fastformer._C"
    return request.param


def _check(q, k, v, g=None, dtype_atol=None, backend=FUSED, **kw):
    """Run ours and check out, dq, dk, dv against the float64 and same-dtype references."""
    out = fastformer.attention(q, k, v, backend=backend, **kw)
    g = torch.randn_like(out) if g is None else g
    grads = _grads(out, (q, k, v), g)
    ref_kw = {k_: v_ for k_, v_ in kw.items() if k_ != "dropout_p"}
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, **ref_kw)
    ref_grads = _grads(ref, (q64, k64, v64), g.double())
    qp, kp, vp = (t.detach().clone().requires_grad_() for t in (q, k, v))
    pt = attention_reference(qp, kp, vp, upcast=False, **ref_kw)
    pt_grads = _grads(pt, (qp, kp, vp), g)
    assert_close_2x("out", out, ref, pt, atol=dtype_atol)
    for name, a, r, p in zip(("dq", "dk", "dv"), grads, ref_grads, pt_grads, strict=True):
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        assert_close_2x(name, a, r, p, atol=dtype_atol)
    return out, grads


# (batch, seqlen_q, seqlen_k, heads, kv_heads, headdim, causal, dtype): covers every seqlen, headdim,
# GQA 4:1 and 4:2, Sq != Sk both ways (with causal rows that see no key), fp32 and fp16.
CASES = [
    (2, 1, 1, 2, 2, 16, False, torch.float32),
    (2, 2, 2, 4, 1, 32, True, torch.float16),
    (1, 17, 17, 4, 1, 40, True, torch.float32),
    (2, 97, 129, 4, 2, 80, False, torch.float16),
    (1, 129, 97, 4, 2, 96, True, torch.float32),
    (1, 128, 128, 2, 2, 64, True, torch.float16),
    (1, 257, 257, 1, 1, 128, False, torch.float16),
    (1, 1, 257, 4, 1, 64, True, torch.float32),
    (1, 17, 2, 2, 2, 128, True, torch.float16),
    (2, 97, 97, 2, 2, 16, False, torch.float32),
    (1, 2, 129, 4, 2, 40, False, torch.float16),
    (1, 33, 17, 2, 1, 8, True, torch.float32),
    (1, 17, 33, 1, 1, 256, True, torch.float32),
    (1, 20, 20, 2, 2, 160, False, torch.float16),
]


@pytest.mark.parametrize("b,sq,sk,h,hkv,d,causal,dtype", CASES)
def test_forward_backward(b, sq, sk, h, hkv, d, causal, dtype):
    q = _rand(b, sq, h, d, dtype=dtype)
    k, v = _rand(b, sk, hkv, d, dtype=dtype), _rand(b, sk, hkv, d, dtype=dtype)
    _check(q, k, v, causal=causal)


# (batch, seqlen_q, seqlen_k, heads, kv_heads, headdim, causal, padding mask kind, dtype) for both backward modes:
# seqlens 1, 17 and 97, head dims 40 and 80 (and 16, whose atomic dQ tile is formed untransposed), GQA, causal
# rows that see no key (Sq > Sk) and a batch row whose keys are all masked
MODE_CASES = [
    (2, 1, 1, 4, 2, 40, False, None, torch.float32),
    (2, 17, 17, 4, 1, 80, True, "full_row", torch.float16),
    (1, 97, 97, 2, 2, 40, True, None, torch.float16),
    (2, 97, 17, 2, 1, 80, True, "full_row", torch.float32),
    (2, 17, 97, 4, 2, 16, False, "random", torch.float16),
]


@pytest.mark.usefixtures("bwd_mode")
@pytest.mark.parametrize("b,sq,sk,h,hkv,d,causal,mask_kind,dtype", MODE_CASES)
def test_backward_modes(b, sq, sk, h, hkv, d, causal, mask_kind, dtype):
    q = _rand(b, sq, h, d, dtype=dtype)
    k, v = _rand(b, sk, hkv, d, dtype=dtype), _rand(b, sk, hkv, d, dtype=dtype)
    m = None if mask_kind is None else _padding_mask(mask_kind, b, sk)
    _, grads = _check(q, k, v, causal=causal, key_padding_mask=m)
    if mask_kind == "full_row":
        assert grads[0][1].abs().max() == 0


@pytest.mark.usefixtures("bwd_mode")
# the interpreter's numpy warnings for the inf and NaN the kernels compute in lanes that are masked or never stored
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
def test_backward_scores_far_below_zero():
    """Every score about -200: for the zero K rows past the sequence's end exp(s - lse) overflows to inf, which
    must stay out of dQ (as inf * 0 = NaN)."""
    b, s, h, d = 2, 17, 2, 16
    axis = torch.zeros(d, device=DEVICE)
    axis[0] = 1.0
    q = (20 * axis + 0.1 * torch.randn(b, s, h, d, device=DEVICE)).requires_grad_()
    k = (-40 * axis + 0.1 * torch.randn(b, s, h, d, device=DEVICE)).requires_grad_()
    _check(q, k, _rand(b, s, h, d))  # (causal would mask those keys anyway)


def _launch_log(monkeypatch) -> list[tuple[str, bool | None]]:
    """Record (kind, ATOMIC_DQ) of every launch made through triton_tuning.kernel, then launch it."""
    from fastformer.ops.attention import triton_tuning

    log, real = [], triton_tuning.kernel

    class Launcher:
        def __init__(self, kind):
            self.kind, self.fn = kind, real(kind)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                log.append((self.kind, kwargs.get("ATOMIC_DQ")))
                return self.fn[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(triton_tuning, "kernel", Launcher)
    return log


def test_backward_mode_selects_the_kernels(bwd_mode, monkeypatch):
    log = _launch_log(monkeypatch)
    q, k, v = _rand(2, 9, 4, 16), _rand(2, 11, 2, 16), _rand(2, 11, 2, 16)
    out = fastformer.attention(q, k, v, causal=True, backend=FUSED)
    _grads(out, (q, k, v), torch.randn_like(out))
    backward = [entry for entry in log if entry[0] != "fwd"]
    if bwd_mode == "atomic":  # the dK/dV programs also produce dQ: no dQ kernel
        assert backward == [("dkdv_atomic", True)]
    else:
        assert backward == [("dkdv", False), ("dq", None)]


def test_deterministic_backward_is_bitwise_reproducible():
    q = _rand(2, 40, 2, 40, dtype=torch.float16)
    k, v = _rand(2, 40, 1, 40, dtype=torch.float16), _rand(2, 40, 1, 40, dtype=torch.float16)
    m = _padding_mask("random", 2, 40)
    g = torch.randn(2, 40, 2, 40, dtype=torch.float16, device=DEVICE)

    def run():
        torch.manual_seed(3)
        out = fastformer.attention(q, k, v, causal=True, key_padding_mask=m, dropout_p=0.2, backend=FUSED)
        return (out, *_grads(out, (q, k, v), g))

    with _deterministic(True):
        first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def _padding_mask(kind: str, b: int, s: int) -> torch.Tensor:
    if kind == "random":
        m = torch.rand(b, s, device=DEVICE) > 0.5
    elif kind == "third":
        lens = torch.randint(s // 3, s + 1, (b,), device=DEVICE)
        m = torch.arange(s, device=DEVICE)[None] < lens[:, None]
    elif kind == "full_row":
        m = torch.rand(b, s, device=DEVICE) > 0.3
        m[1] = False  # a batch row with no key at all
    elif kind == "left":
        lens = torch.randint(1, s + 1, (b,), device=DEVICE)
        m = torch.arange(s, device=DEVICE)[None] >= (s - lens)[:, None]
    else:
        raise ValueError(kind)
    return m


@pytest.mark.parametrize(
    "kind,sq,sk,hkv,d,causal,dtype,int_mask",
    [
        ("random", 97, 97, 2, 64, False, torch.float32, False),
        ("third", 129, 129, 1, 40, False, torch.float16, True),
        ("full_row", 17, 33, 2, 32, False, torch.float32, False),
        ("full_row", 33, 33, 1, 96, True, torch.float16, False),
        ("left", 65, 65, 2, 80, True, torch.float32, True),
        ("left", 17, 40, 1, 16, True, torch.float16, False),
    ],
)
def test_padding_mask(kind, sq, sk, hkv, d, causal, dtype, int_mask):
    b, h = 3, 4
    m = _padding_mask(kind, b, sk)
    q = _rand(b, sq, h, d, dtype=dtype)
    k, v = _rand(b, sk, hkv, d, dtype=dtype), _rand(b, sk, hkv, d, dtype=dtype)
    mask = m.to(torch.int32) if int_mask else m
    out, grads = _check(q, k, v, causal=causal, key_padding_mask=mask)
    if kind == "full_row":
        assert out[1].abs().max() == 0
        assert grads[0][1].abs().max() == 0


@pytest.mark.usefixtures("bwd_mode")
def test_noncontiguous_packed_qkv_and_grad():
    b, s, h, d = 2, 45, 4, 40
    qkv = _rand(b, s, 3, h, d)
    q, k, v = qkv.unbind(2)  # strided views of a packed projection
    assert not q.is_contiguous()
    g = torch.randn(b, h, s, d, device=DEVICE).transpose(1, 2)  # non-contiguous grad_output
    _check(q, k, v, g=g, causal=True)


def test_noncontiguous_fp16_gqa_views():
    b, s, h, hkv, d = 2, 33, 4, 2, 64
    proj = _rand(b, s, h + 2 * hkv, d, dtype=torch.float16)
    q, k, v = proj.split([h, hkv, hkv], dim=2)
    g = torch.randn(b, s, h, 2 * d, device=DEVICE, dtype=torch.float16)[..., ::2]
    _check(q, k, v, g=g)


def _varlen_case(lens_q, lens_k, h, hkv, d, dtype):
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    q = _rand(sum(lens_q), h, d, dtype=dtype)
    k, v = _rand(sum(lens_k), hkv, d, dtype=dtype), _rand(sum(lens_k), hkv, d, dtype=dtype)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize(
    "lens_q,lens_k,hkv,d,causal,dtype",
    [
        ([5, 40, 1, 17], [5, 40, 1, 17], 2, 64, False, torch.float32),
        ([33, 0, 70], [33, 0, 70], 1, 40, True, torch.float16),
        ([3, 50, 20], [10, 33, 20], 2, 96, True, torch.float32),
    ],
)
@pytest.mark.usefixtures("bwd_mode")
def test_varlen(lens_q, lens_k, hkv, d, causal, dtype):
    _check_varlen(lens_q, lens_k, hkv, d, causal, dtype, FUSED)


def _check_varlen(lens_q, lens_k, hkv, d, causal, dtype, backend):
    h = 4
    q, k, v, cu_q, cu_k = _varlen_case(lens_q, lens_k, h, hkv, d, dtype)
    out = fastformer.attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, backend=backend)
    g = torch.randn_like(out)
    grads = _grads(out, (q, k, v), g)
    for i in range(len(lens_q)):
        q0, q1, k0, k1 = cu_q[i].item(), cu_q[i + 1].item(), cu_k[i].item(), cu_k[i + 1].item()
        qs, ks, vs = (t.detach()[None, a:c] for t, a, c in ((q, q0, q1), (k, k0, k1), (v, k0, k1)))
        q64, k64, v64 = (t.double().requires_grad_() for t in (qs, ks, vs))
        ref = attention_reference(q64, k64, v64, causal=causal)
        rg = _grads(ref, (q64, k64, v64), g[None, q0:q1].double())
        qp, kp, vp = (t.clone().requires_grad_() for t in (qs, ks, vs))
        pt = attention_reference(qp, kp, vp, causal=causal, upcast=False)
        pg = _grads(pt, (qp, kp, vp), g[None, q0:q1])
        assert_close_2x(f"out[{i}]", out[None, q0:q1], ref, pt)
        assert_close_2x(f"dq[{i}]", grads[0][None, q0:q1], rg[0], pg[0])
        assert_close_2x(f"dk[{i}]", grads[1][None, k0:k1], rg[1], pg[1])
        assert_close_2x(f"dv[{i}]", grads[2][None, k0:k1], rg[2], pg[2])


@pytest.mark.parametrize("backend", ["torch", FUSED])
def test_varlen_rows_past_last_sequence_are_zero(backend):
    q, k, v, cu_q, cu_k = _varlen_case([3, 5], [4, 6], 2, 1, 16, torch.float32)
    q2 = torch.cat([q.detach(), torch.randn(3, 2, 16, device=DEVICE)]).requires_grad_()  # 3 rows in no sequence
    out = fastformer.attention_varlen(q2, k, v, cu_q, cu_k, 5, 6, backend=backend)
    assert out[-3:].abs().max() == 0
    ref = fastformer.attention_varlen(q, k, v, cu_q, cu_k, 5, 6, backend="torch")
    torch.testing.assert_close(out[:-3], ref)
    (gq,) = torch.autograd.grad(out, q2, torch.randn_like(out))
    assert gq[-3:].abs().max() == 0


def test_unpad_varlen_pad_matches_masked_dense():
    b, s, h, d = 3, 24, 2, 32
    m = _padding_mask("third", b, s)
    x = _rand(b, s, 3, h, d)
    xu, idx, cu, max_s = fastformer.unpad_input(x, m)
    assert cu.dtype == torch.int32 and cu.shape == (b + 1,) and max_s == int(m.sum(1).max())
    assert xu.shape[0] == int(m.sum())
    q, k, v = xu.unbind(1)
    out = fastformer.pad_input(fastformer.attention_varlen(q, k, v, cu, cu, max_s, max_s, backend=FUSED), idx, b, s)
    dense = fastformer.attention(*x.unbind(2), key_padding_mask=m, backend="torch")
    torch.testing.assert_close(out[m], dense[m], atol=1e-5, rtol=1e-5)
    assert out[~m].abs().max() == 0
    g = torch.randn_like(out) * m[..., None, None]
    (gx,) = torch.autograd.grad(out, x, g)
    (gd,) = torch.autograd.grad(dense, x, g)
    torch.testing.assert_close(gx, gd, atol=1e-5, rtol=1e-5)


# --- the torch backend: torch's CPU flash kernel where it serves, the reference math elsewhere


@pytest.fixture
def flash_calls(monkeypatch):
    """Counts the torch backend's calls of torch's CPU flash kernel (forward, backward)."""
    from fastformer.ops.attention import torch_impl

    calls = {"fwd": 0, "bwd": 0}
    for name, key in (("_flash_fwd", "fwd"), ("_flash_bwd", "bwd")):
        real = getattr(torch_impl, name)

        def spy(*args, _real=real, _key=key):
            calls[_key] += 1
            return _real(*args)

        monkeypatch.setattr(torch_impl, name, spy)
    return calls


@pytest.mark.parametrize("mask", [None, "full_row"])
@pytest.mark.parametrize("b,sq,sk,h,hkv,d,causal,dtype", CASES)
def test_torch_backend_forward_backward(b, sq, sk, h, hkv, d, causal, dtype, mask, flash_calls):
    """Every case of the fused matrix, with a key padding mask whose second batch row sees no key, non-contiguous
    inputs and grad_output; on a CPU through torch's flash kernel."""
    q = _rand(b, sq, h, 2 * d, dtype=dtype)[..., ::2]
    k, v = _rand(b, sk, hkv, d, dtype=dtype), _rand(b, sk, hkv, d, dtype=dtype)
    m = _padding_mask(mask, max(b, 2), sk)[:b] if mask else None
    g = torch.randn(b, h, sq, d, dtype=dtype, device=DEVICE).transpose(1, 2)
    _check(q, k, v, g=g, causal=causal, key_padding_mask=m, backend="torch")
    on_cpu_flash = DEVICE == "cpu"
    assert flash_calls == {"fwd": int(on_cpu_flash), "bwd": int(on_cpu_flash)}


@pytest.mark.parametrize("lens_q,lens_k,hkv,d,causal,dtype", [
    ([5, 40, 1, 17], [5, 40, 1, 17], 2, 64, False, torch.float32),
    ([33, 0, 70], [33, 0, 70], 1, 40, True, torch.float16),
    ([3, 50, 20], [10, 33, 20], 2, 96, True, torch.float32),
    ([4, 6], [0, 9], 4, 80, False, torch.float32),
])  # fmt: skip
def test_torch_backend_varlen(lens_q, lens_k, hkv, d, causal, dtype):
    _check_varlen(lens_q, lens_k, hkv, d, causal, dtype, "torch")


def test_torch_backend_float64_is_the_reference(flash_calls):
    q, k, v = (_rand(2, 17, 2, 40, dtype=torch.float64) for _ in range(3))
    out = fastformer.attention(q, k, v, causal=True, backend="torch")
    torch.testing.assert_close(out, attention_reference(q, k, v, causal=True), atol=1e-12, rtol=1e-12)
    assert flash_calls["fwd"] == 0


@pytest.mark.parametrize("causal,hkv,dtype", [(True, 1, torch.float32), (False, 2, torch.float16)])
def test_torch_backend_dropout_uses_torch_rng_and_matches_reference(causal, hkv, dtype):
    """By default the torch backend draws its masks from torch's generator (not the kernels' Philox): forward
    and every gradient match the reference that regenerates them from the seed; the kept fraction is 1 - p."""
    b, s, h, d, p = 2, 40, 2, 40, 0.25
    q, k, v = _rand(b, s, h, d, dtype=dtype), _rand(b, s, hkv, d, dtype=dtype), _rand(b, s, hkv, d, dtype=dtype)
    m = _padding_mask("full_row", b, s)
    torch.manual_seed(99)
    seed = int(_dropout.new_seed(p))
    assert _dropout.uses_torch_rng(seed)
    torch.manual_seed(99)
    out = fastformer.attention(q, k, v, causal=causal, key_padding_mask=m, dropout_p=p, backend="torch")
    g = torch.randn_like(out)
    grads = _grads(out, (q, k, v), g)
    kw = dict(causal=causal, key_padding_mask=m, dropout_p=p, seed=seed)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, **kw)
    qp, kp, vp = (t.detach().clone().requires_grad_() for t in (q, k, v))
    pt = attention_reference(qp, kp, vp, upcast=False, **kw)
    assert_close_2x("out", out, ref, pt)
    for name, a, r, pp in zip(("dq", "dk", "dv"), grads, _grads(ref, (q64, k64, v64), g.double()),
                              _grads(pt, (qp, kp, vp), g), strict=True):  # fmt: skip
        assert_close_2x(name, a, r, pp)
    keep_torch = _keep_from_output("torch", 0.3, 123, sq=64, sk=64)
    with _dropout.exact_dropout():
        keep_philox = _keep_from_output("torch", 0.3, 123, sq=64, sk=64)
    assert not torch.equal(keep_torch, keep_philox)
    for keep in (keep_torch, keep_philox):
        n = keep.numel()
        assert set(keep.unique().tolist()) <= {0.0, 1.0}
        assert abs(keep.sum().item() - n * 0.7) <= 4 * math.sqrt(n * 0.3 * 0.7)


def test_dropout_mode_travels_with_the_seed():
    """A forward under exact_dropout and its backward outside it use the same (Philox) mask, and the reverse."""
    q, k, v = (_rand(1, 24, 2, 16) for _ in range(3))
    results = []
    for exact_fwd in (True, False):
        torch.manual_seed(5)
        with _dropout.exact_dropout(exact_fwd):
            out = fastformer.attention(q, k, v, dropout_p=0.3, backend="torch")
        with _dropout.exact_dropout(not exact_fwd):
            grads = _grads(out, (q, k, v), torch.ones_like(out))
        torch.manual_seed(5)
        with _dropout.exact_dropout(exact_fwd):
            seed = int(_dropout.new_seed(0.3))
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = attention_reference(q64, k64, v64, dropout_p=0.3, seed=seed)
        for a, r in zip(grads, _grads(ref, (q64, k64, v64), torch.ones_like(ref)), strict=True):
            torch.testing.assert_close(a.double(), r, atol=1e-5, rtol=1e-5)
        results.append(out)
    assert not torch.equal(results[0], results[1])


# --- dropout


def _keep_from_output(backend: str, p: float, seed_state: int, b=2, h=2, sq=24, sk=32):
    """Recover the dropout keep mask: with q = 0 every key weighs 1/Sk, and v = identity rows makes
    out[b, i, h, j] = keep[b, h, i, j] / ((1 - p) Sk)."""
    q = torch.zeros(b, sq, h, sk, device=DEVICE)
    eye = torch.eye(sk, device=DEVICE)
    k = torch.randn(b, sk, h, sk, device=DEVICE)
    v = eye[None, :, None, :].expand(b, sk, h, sk)
    torch.manual_seed(seed_state)
    out = fastformer.attention(q, k, v, dropout_p=p, backend=backend)
    return (out * (1 - p) * sk).round().permute(0, 2, 1, 3)  # (B, H, Sq, Sk)


@pytest.mark.usefixtures("exact_dropout")
def test_dropout_mask_matches_torch_backend_and_philox():
    p = 0.3
    keep_t = _keep_from_output(FUSED, p, 123)
    keep_ref = _keep_from_output("torch", p, 123)
    assert torch.equal(keep_t, keep_ref)
    torch.manual_seed(123)
    seed = int(_dropout.new_seed(p))
    rows = torch.arange(keep_t[..., 0].numel(), dtype=torch.int64).view(keep_t.shape[:-1])
    assert torch.equal(keep_t.bool().cpu(), _dropout.keep_mask(seed, rows, keep_t.shape[-1], p))
    # binomial test on the kept fraction: 4 sigma
    n = keep_t.numel()
    kept = keep_t.sum().item()
    assert abs(kept - n * (1 - p)) <= 4 * math.sqrt(n * p * (1 - p))
    # a different seed gives a different mask
    assert not torch.equal(keep_t, _keep_from_output(FUSED, p, 124))


def test_dropout_reproducible_and_p0_exact():
    q, k, v = _rand(2, 33, 2, 32), _rand(2, 33, 2, 32), _rand(2, 33, 2, 32)
    torch.manual_seed(7)
    a = fastformer.attention(q, k, v, dropout_p=0.2, backend=FUSED)
    torch.manual_seed(7)
    b = fastformer.attention(q, k, v, dropout_p=0.2, backend=FUSED)
    assert torch.equal(a, b)
    assert not torch.equal(a, fastformer.attention(q, k, v, dropout_p=0.2, backend=FUSED))
    assert torch.equal(
        fastformer.attention(q, k, v, dropout_p=0.0, backend=FUSED), fastformer.attention(q, k, v, backend=FUSED)
    )


@pytest.mark.parametrize("causal,hkv,dtype", [(True, 1, torch.float32), (False, 2, torch.float16)])
@pytest.mark.usefixtures("bwd_mode", "exact_dropout")
def test_dropout_gradients(causal, hkv, dtype):
    b, s, h, d, p = 2, 40, 2, 40, 0.25
    q, k, v = _rand(b, s, h, d, dtype=dtype), _rand(b, s, hkv, d, dtype=dtype), _rand(b, s, hkv, d, dtype=dtype)
    m = _padding_mask("random", b, s)
    torch.manual_seed(99)
    seed = int(_dropout.new_seed(p))
    torch.manual_seed(99)
    out = fastformer.attention(q, k, v, causal=causal, key_padding_mask=m, dropout_p=p, backend=FUSED)
    g = torch.randn_like(out)
    grads = _grads(out, (q, k, v), g)
    kw = dict(causal=causal, key_padding_mask=m, dropout_p=p, seed=seed)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, **kw)
    rg = _grads(ref, (q64, k64, v64), g.double())
    qp, kp, vp = (t.detach().clone().requires_grad_() for t in (q, k, v))
    pt = attention_reference(qp, kp, vp, upcast=False, **kw)
    pg = _grads(pt, (qp, kp, vp), g)
    assert_close_2x("out", out, ref, pt)
    for name, a, r, pp in zip(("dq", "dk", "dv"), grads, rg, pg, strict=True):
        assert_close_2x(name, a, r, pp)


@pytest.mark.usefixtures("bwd_mode")
@pytest.mark.usefixtures("exact_dropout")
def test_dropout_varlen_matches_torch_backend():
    q, k, v, cu_q, cu_k = _varlen_case([7, 30, 12], [9, 30, 4], 4, 2, 32, torch.float32)
    res = {}
    for be in (FUSED, "torch"):
        torch.manual_seed(5)
        out = fastformer.attention_varlen(q, k, v, cu_q, cu_k, 30, 30, causal=True, dropout_p=0.4, backend=be)
        res[be] = (out, *_grads(out, (q, k, v), torch.ones_like(out)))
    for a, r in zip(res[FUSED], res["torch"], strict=True):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)
    torch.manual_seed(5)
    seed = int(_dropout.new_seed(0.4))
    rows = varlen_dropout_rows(4, q.shape[0], 7, 30, DEVICE)
    assert rows[0, 1, 0] == 1 * q.shape[0] + 7 and _dropout.keep_mask(seed, rows, 30, 0.4).shape == (1, 4, 30, 30)


# --- forward operand paths: tensor descriptors (TMA) or pointers, warp-specialised loop or two loops


def _fwd_path(q, k, v, causal=False, key_padding_mask=None) -> tuple[bool, bool]:
    """(USE_TMA, WARP_SPEC): how the Triton forward will read its operands and shape its key loop."""
    from fastformer.ops.attention import triton_impl, triton_tuning

    sq, sk, d = q.shape[1], k.shape[1], q.shape[-1]
    a = AttentionArgs(q, k, v, key_padding_mask, None, None, None, sq, sk, causal, d**-0.5, 0.0, FUSED)
    tma = triton_impl._use_tma(a)
    return tma, triton_tuning.warp_spec_ok(a, tma)


@pytest.mark.parametrize("tma", [True, False])
@pytest.mark.parametrize(
    "sq,sk,hkv,d,causal,masked,dtype,ws",
    [
        (17, 256, 2, 40, False, False, torch.float32, True),  # one unmasked, warp-specialised loop
        (33, 128, 1, 64, False, False, torch.float16, True),
        (97, 129, 2, 80, False, False, torch.float16, False),  # keys not a multiple of 128: a masked edge tile
        (40, 256, 2, 96, True, False, torch.float32, False),
        (33, 128, 2, 32, False, True, torch.float32, False),  # a batch row with no visible key
    ],
)
def test_forward_operand_paths(sq, sk, hkv, d, causal, masked, dtype, ws, tma, monkeypatch):
    from fastformer import utils

    if tma and not utils.tma_capable(torch.device(DEVICE)):
        pytest.skip("tensor descriptors need sm_90 or the interpreter")
    if not tma:
        monkeypatch.setattr(utils, "tma_capable", lambda _device: False)
    b, h = 2, 4
    q = _rand(b, sq, h, d, dtype=dtype)
    k, v = _rand(b, sk, hkv, d, dtype=dtype), _rand(b, sk, hkv, d, dtype=dtype)
    m = _padding_mask("full_row", b, sk) if masked else None
    assert _fwd_path(q, k, v, causal, m) == (tma, ws and tma)
    out, _ = _check(q, k, v, causal=causal, key_padding_mask=m)
    if masked:
        assert out[1].abs().max() == 0


def test_forward_unaligned_operands_use_pointers():
    # tokens 49 fp16 elements (98 bytes) apart break TMA's 16-byte stride rule; a view one element into its
    # storage breaks the 16-byte base alignment: both take the pointer path, with the same results
    rows = _rand(3, 2, 33, 2 * 24 + 1, dtype=torch.float16, grad=False)
    q, k, v = (t[..., :48].unflatten(-1, (2, 24)).requires_grad_() for t in rows)
    assert _fwd_path(q, k, v) == (False, False)
    _check(q, k, v)
    flat = torch.randn(3 * 2 * 33 * 2 * 32 + 1, device=DEVICE)
    q, k, v = (t.view(2, 33, 2, 32).detach().requires_grad_() for t in flat[1:].chunk(3))
    assert _fwd_path(q, k, v) == (False, False)
    _check(q, k, v, causal=True)


# --- split-KV decode


@pytest.mark.parametrize(
    "sq,sk,h,hkv,causal,masked,dtype",
    [
        (1, 300, 4, 1, True, False, torch.float32),
        (3, 520, 2, 2, False, True, torch.float16),
        (16, 257, 2, 1, True, True, torch.float32),
        (1, 300, 1, 1, False, False, torch.float16),
        (3, 300, 4, 2, True, True, torch.float32),  # GQA 4:2 packed into one row tile per kv head
        (5, 300, 8, 2, True, False, torch.float16),  # 20 rows per kv head: a row tile starts inside a head
    ],
)
def test_split_kv_decode(sq, sk, h, hkv, causal, masked, dtype, monkeypatch):
    from fastformer.ops.attention import triton_tuning as A

    monkeypatch.setattr(A, "SPLIT_MIN_KEYS", 128)  # the interpreter's shapes are small
    q = _rand(1, sq, h, 64, dtype=dtype)
    k, v = _rand(1, sk, hkv, 64, dtype=dtype), _rand(1, sk, hkv, 64, dtype=dtype)
    m = None
    if masked:
        m = _padding_mask("random", 1, sk)
        m[0, : sk // 2] = False  # the whole first split is padding
    assert A.num_splits(AttentionArgs(q, k, v, m, None, None, None, sq, sk, causal, 1.0, 0.0, FUSED), q.device) > 1
    # backward runs from the split forward's combined lse
    _check(q, k, v, causal=causal, key_padding_mask=m)


# --- torch backend


def test_torch_backend_backward_matches_autograd_reference():
    b, sq, sk, h, hkv, d = 2, 19, 23, 4, 2, 24
    q, k, v = _rand(b, sq, h, d), _rand(b, sk, hkv, d), _rand(b, sk, hkv, d)
    m = _padding_mask("full_row", b, sk)
    out = fastformer.attention(q, k, v, causal=True, key_padding_mask=m, backend="torch")
    g = torch.randn_like(out)
    grads = _grads(out, (q, k, v), g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, causal=True, key_padding_mask=m)
    for a, r in zip((out, *grads), (ref, *_grads(ref, (q64, k64, v64), g.double())), strict=True):
        torch.testing.assert_close(a.double(), r, atol=2e-5, rtol=1e-4)


# --- sdpa, module


@pytest.mark.parametrize(
    "mask_kind,is_causal,h,hkv", [(None, False, 4, 4), (None, True, 4, 2), ("b11k", False, 2, 2), ("11k", False, 4, 1)]
)
def test_sdpa_matches_torch(mask_kind, is_causal, h, hkv):
    b, s, d = 2, 33, 32
    q, k, v = (torch.randn(b, n, s, d, device=DEVICE) for n in (h, hkv, hkv))
    mask = None
    if mask_kind == "b11k":
        mask = torch.rand(b, 1, 1, s, device=DEVICE) > 0.3
    elif mask_kind == "11k":
        mask = torch.rand(1, s, device=DEVICE) > 0.3
    kw = dict(attn_mask=mask, is_causal=is_causal, enable_gqa=h != hkv)
    with fastformer.use_backend(FUSED):
        ours = fastformer.scaled_dot_product_attention(q, k, v, **kw)
    ref = F.scaled_dot_product_attention(q, k, v, **kw)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_sdpa_other_masks_fall_back_with_one_warning():
    q, k, v = (torch.randn(2, 2, 9, 16, device=DEVICE) for _ in range(3))
    add = torch.randn(2, 2, 9, 9, device=DEVICE)
    import fastformer.ops.attention.sdpa as A

    A._SDPA_WARNED.clear()
    with pytest.warns(UserWarning, match="attn_mask"):
        a = fastformer.scaled_dot_product_attention(q, k, v, attn_mask=add)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastformer.scaled_dot_product_attention(q, k, v, attn_mask=add)  # warned once only
    torch.testing.assert_close(a, F.scaled_dot_product_attention(q, k, v, attn_mask=add))
    full = torch.rand(2, 1, 9, 9, device=DEVICE) > 0.5  # a per-query bool mask is not a key-padding mask
    torch.testing.assert_close(
        fastformer.scaled_dot_product_attention(q, k, v, attn_mask=full),
        F.scaled_dot_product_attention(q, k, v, attn_mask=full),
    )


def _sdpa_unfused_cases():
    q, k, v = (torch.randn(2, 2, 9, 16, device=DEVICE) for _ in range(3))
    bool_mask = torch.rand(2, 1, 1, 9, device=DEVICE) > 0.3
    yield "head dimension 12", (*(torch.randn(2, 2, 9, 12, device=DEVICE) for _ in range(3)),), {}
    yield "float64", (q.double(), k.double(), v.double()), {}
    yield "strided last dimension", (torch.randn(2, 2, 9, 32, device=DEVICE)[..., ::2], k, v), {}
    yield "is_causal together with attn_mask", (q, k, v), {"is_causal": True, "attn_mask": bool_mask}
    yield "top-left aligned", (q, k[:, :, :5], v[:, :, :5]), {"is_causal": True}
    yield "only 4-D", (q[0], k[0], v[0]), {}
    yield "non-boolean attn_mask", (q, k, v), {"attn_mask": torch.randn(2, 2, 9, 9, device=DEVICE)}


@pytest.mark.parametrize("match,args,kw", list(_sdpa_unfused_cases()), ids=lambda x: x if isinstance(x, str) else "")
def test_sdpa_never_falls_back_silently_under_a_named_backend(match, args, kw):
    """Named fused backend: BackendError saying why; torch backend: torch's SDPA without a warning; auto: a warning."""
    import fastformer.ops.attention.sdpa as A

    with fastformer.use_backend(FUSED), pytest.raises(fastformer.BackendError, match=match):
        fastformer.scaled_dot_product_attention(*args, **kw)
    ref = F.scaled_dot_product_attention(*args, **kw)
    with fastformer.use_backend("torch"), warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(fastformer.scaled_dot_product_attention(*args, **kw), ref)
    A._SDPA_WARNED.clear()
    with fastformer.use_backend("auto"), pytest.warns(UserWarning, match=match):
        torch.testing.assert_close(fastformer.scaled_dot_product_attention(*args, **kw), ref)


@pytest.mark.parametrize("backend,n_kv,causal", [("torch", None, True), (FUSED, 2, False)])
def test_multihead_self_attention_matches_plain_torch(backend, n_kv, causal):
    d_model, h, b, t = 64, 4, 2, 19
    mod = fastformer.nn.MultiheadSelfAttention(d_model, h, n_kv_heads=n_kv, causal=causal, backend=backend).to(DEVICE)
    hkv, hd = mod.n_kv_heads, mod.head_dim
    x = torch.randn(b, t, d_model, device=DEVICE, requires_grad=True)
    m = torch.ones(b, t, dtype=torch.bool, device=DEVICE)
    m[0, -5:] = False
    y = mod(x, key_padding_mask=None if causal else m)
    # plain torch: separate q/k/v from the fused weight, SDPA, output projection
    qkv = F.linear(x, mod.qkv.weight, mod.qkv.bias).view(b, t, h + 2 * hkv, hd)
    q, k, v = (z.transpose(1, 2) for z in qkv.split([h, hkv, hkv], dim=2))
    k, v = k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1)
    attn_mask = None if causal else m[:, None, None, :]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)
    ref = F.linear(ref.transpose(1, 2).reshape(b, t, d_model), mod.out_proj.weight, mod.out_proj.bias)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)
    g = torch.randn_like(y)
    params = [x, *mod.parameters()]
    for a, r in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params, g), strict=True):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-4)
    assert mod.qkv.out_features == (h + 2 * hkv) * hd


# --- custom op plumbing


@pytest.mark.parametrize("backend", ["torch", FUSED])
def test_opcheck(backend):
    q, k, v = _rand(2, 9, 4, 16), _rand(2, 11, 2, 16), _rand(2, 11, 2, 16)
    m = torch.rand(2, 11, device=DEVICE) > 0.3
    seed = torch.tensor(1234, dtype=torch.int64)
    torch.library.opcheck(
        torch.ops.fastformer.attention_fwd.default, (q, k, v, m, None, None, seed, 9, 11, True, 0.25, 0.1, backend)
    )
    qv, kv, vv, cu_q, cu_k = _varlen_case([3, 6], [5, 6], 2, 1, 16, torch.float32)
    torch.library.opcheck(
        torch.ops.fastformer.attention_fwd.default, (qv, kv, vv, None, cu_q, cu_k, None, 6, 6, False, 0.3, 0.0, backend)
    )


@pytest.mark.parametrize("backend", ["torch", FUSED])
def test_torch_compile_fullgraph(backend):
    def f(q, k, v, m):
        return fastformer.attention(q, k, v, causal=True, key_padding_mask=m, backend=backend).sum(dim=-1)

    q, k, v = _rand(2, 13, 2, 16), _rand(2, 13, 1, 16), _rand(2, 13, 1, 16)
    m = torch.rand(2, 13, device=DEVICE) > 0.2
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    a = compiled(q, k, v, m)
    b = f(q, k, v, m)
    torch.testing.assert_close(a, b)
    g = torch.randn_like(a)
    for x, y in zip(torch.autograd.grad(a, (q, k, v), g), torch.autograd.grad(b, (q, k, v), g), strict=True):
        torch.testing.assert_close(x, y)


def test_empty_batch():
    q, k, v = _rand(0, 5, 2, 16), _rand(0, 5, 2, 16), _rand(0, 5, 2, 16)
    out = fastformer.attention(q, k, v, backend=FUSED)
    assert out.shape == (0, 5, 2, 16)
    out.sum().backward()
    assert q.grad.shape == q.shape
    assert fastformer.attention(_rand(2, 0, 2, 16), _rand(2, 4, 2, 16), _rand(2, 4, 2, 16), backend=FUSED).shape == (
        2,
        0,
        2,
        16,
    )


def test_no_keys_gives_zero_output():
    q, k, v = _rand(2, 5, 2, 16), _rand(2, 0, 2, 16), _rand(2, 0, 2, 16)
    out = fastformer.attention(q, k, v, backend=FUSED)
    assert out.shape == q.shape and out.abs().max() == 0


# --- bad inputs


def _bad_cases():
    q, k, v = torch.randn(2, 8, 4, 16), torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)
    yield "q must be 4-D", ValueError, (q[0], k, v), {}
    yield "k must be 4-D", ValueError, (q, k[0], v), {}
    yield "batch size", ValueError, (q, k[:1], v[:1]), {}
    yield "k and v must have the same shape", ValueError, (q, k, v[:, :5]), {}
    yield "head dimension 16 does not match", ValueError, (torch.randn(2, 8, 4, 24), k, v), {}
    yield "must divide", ValueError, (q, torch.randn(2, 8, 3, 16), torch.randn(2, 8, 3, 16)), {}
    yield (
        "head dimension 12 is not supported by the fused",
        fastformer.BackendError,
        (torch.randn(2, 8, 4, 12),) * 3,
        {},
    )
    yield "head dimension 264", fastformer.BackendError, (torch.randn(1, 2, 1, 264),) * 3, {}
    yield (
        "float64 is served by the torch backend only",
        fastformer.BackendError,
        (q.double(), k.double(), v.double()),
        {},
    )
    yield "head dimension must be at least 1", ValueError, (torch.randn(2, 8, 4, 0),) * 3, {}
    yield "key_padding_mask must have shape", ValueError, (q, k, v), {"key_padding_mask": torch.ones(2, 7, dtype=bool)}
    yield "key_padding_mask must be bool", TypeError, (q, k, v), {"key_padding_mask": torch.ones(2, 8)}
    yield "k has dtype", TypeError, (q, k.half(), v), {}
    yield "q must have a floating dtype", TypeError, (q.long(), k.long(), v.long()), {}
    yield "dropout_p must be in", ValueError, (q, k, v), {"dropout_p": 1.0}
    yield "dropout_p must be in", ValueError, (q, k, v), {"dropout_p": -0.1}
    yield "softmax_scale must be", TypeError, (q, k, v), {"softmax_scale": "x"}
    yield "q must be a torch.Tensor", TypeError, (q.numpy(), k, v), {}
    yield "k is on meta", ValueError, (q, k.to("meta"), v), {}
    yield (
        "key_padding_mask is on meta",
        ValueError,
        (q, k, v),
        {"key_padding_mask": torch.ones(2, 8, dtype=torch.bool, device="meta")},
    )


@pytest.mark.parametrize("match,exc,args,kw", list(_bad_cases()), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_inputs(match, exc, args, kw, monkeypatch):
    from fastformer.ops.attention import torch_impl, triton_impl

    def boom(*_a, **_k):
        raise AssertionError("a kernel was launched for bad input")

    monkeypatch.setattr(triton_impl, "fwd", boom)
    monkeypatch.setattr(torch_impl, "fwd", boom)
    with pytest.raises(exc, match=match):
        fastformer.attention(*args, backend=FUSED, **kw)


@pytest.mark.parametrize("scale", [0.0, -0.3, float("inf"), float("nan")])
def test_triton_refuses_a_scale_it_cannot_fold_and_torch_serves_it(scale):
    q, k, v = torch.randn(1, 6, 2, 16), torch.randn(1, 9, 2, 16), torch.randn(1, 9, 2, 16)
    m = torch.ones(1, 9, dtype=torch.bool)
    m[0, 7:] = False
    with pytest.raises(fastformer.BackendError, match="positive finite scale"):
        fastformer.attention(q, k, v, causal=True, key_padding_mask=m, softmax_scale=scale, backend="triton")
    cu = torch.tensor([0, 6], dtype=torch.int32)
    with pytest.raises(fastformer.BackendError, match="positive finite scale"):
        fastformer.attention_varlen(q[0], k[0, :6], v[0, :6], cu, cu, 6, 6, softmax_scale=scale, backend="triton")
    out = fastformer.attention(q, k, v, causal=True, key_padding_mask=m, softmax_scale=scale, backend="torch")
    ref = attention_reference(q, k, v, causal=True, key_padding_mask=m, softmax_scale=scale)
    torch.testing.assert_close(out, ref, equal_nan=True)


@pytest.mark.parametrize(
    "d,dtype", [(12, torch.float32), (264, torch.float32), (5, torch.float64), (40, torch.float64)]
)
def test_torch_backend_serves_any_head_dim_and_float64(d, dtype):
    """The fused kernels' limits are theirs: the torch backend (and auto on a CPU) serves these, by the 2x rule."""
    q, k, v = _rand(2, 9, 2, d, dtype=dtype), _rand(2, 11, 1, d, dtype=dtype), _rand(2, 11, 1, d, dtype=dtype)
    _check(q, k, v, causal=True, key_padding_mask=_padding_mask("full_row", 2, 11), backend="torch")
    if DEVICE == "cpu":
        assert fastformer.attention(q, k, v).shape == q.shape  # auto


def test_bad_varlen_inputs():
    q, k, v, cu_q, cu_k = _varlen_case([3, 4], [3, 4], 2, 2, 16, torch.float32)
    with pytest.raises(TypeError, match="cu_seqlens_q must be int32"):
        fastformer.attention_varlen(q, k, v, cu_q.float(), cu_k, 4, 4)
    with pytest.raises(ValueError, match="max_seqlen_q = 3 is smaller"):
        fastformer.attention_varlen(q, k, v, cu_q, cu_k, 3, 4)
    with pytest.raises(ValueError, match="exceeds"):
        fastformer.attention_varlen(q[:5], k, v, cu_q, cu_k, 4, 4)
    with pytest.raises(ValueError, match="same length"):
        fastformer.attention_varlen(q, k, v, cu_q, cu_k[:2], 4, 4)
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        fastformer.unpad_input(torch.randn(2, 5, 3), torch.ones(2, 4, dtype=torch.bool))


# --- GPU only


gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("s,d,causal", [(1024, 128, True), (4096, 64, False), (16384, 128, True)])
def test_gpu_bf16_long(s, d, causal):
    b, h = (1, 2) if s >= 8192 else (2, 4)
    q, k, v = (_rand(b, s, h, d, dtype=torch.bfloat16) for _ in range(3))
    m = None if causal else _padding_mask("third", b, s)
    out = fastformer.attention(q, k, v, causal=causal, key_padding_mask=m, backend=FUSED)
    g = torch.randn_like(out)
    grads = _grads(out, (q, k, v), g)
    # the fp64 S×S reference of every row does not fit; check the last 128 query rows (they see the most keys)
    rows = slice(s - 128, s)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    kw = dict(key_padding_mask=m)
    if causal:  # the last rows with all keys: bottom-right causal on a (128, S) block
        kw["causal"] = True
    ref = attention_reference(q64[:, rows], k64, v64, **kw)
    rg = _grads(ref, (q64, k64, v64), g[:, rows].double())
    qp, kp, vp = (t.detach().clone().requires_grad_() for t in (q, k, v))
    pt = attention_reference(qp[:, rows], kp, vp, upcast=False, **kw)
    pg = _grads(pt, (qp, kp, vp), g[:, rows])
    assert_close_2x("out", out[:, rows], ref, pt)
    assert_close_2x("dq", grads[0][:, rows], rg[0][:, rows], pg[0][:, rows])
    assert all(torch.isfinite(t).all() for t in grads)


@gpu
@pytest.mark.parametrize("b,sq,sk,h,hkv,d,causal,dtype", [c[:7] + (torch.bfloat16,) for c in CASES])
def test_gpu_bf16(b, sq, sk, h, hkv, d, causal, dtype):
    q = _rand(b, sq, h, d, dtype=dtype)
    k, v = _rand(b, sk, hkv, d, dtype=dtype), _rand(b, sk, hkv, d, dtype=dtype)
    _check(q, k, v, causal=causal)


@gpu
def test_gpu_deterministic():
    """Under torch.use_deterministic_algorithms(True) reruns are bitwise equal; the default mode, whose dQ sums
    its fp32 parts atomically in a varying order, agrees with them to rounding."""
    q, k, v = (_rand(2, 1000, 8, 128, dtype=torch.bfloat16) for _ in range(3))
    kk, vv = k[:, :, :2], v[:, :, :2]

    def run():
        torch.manual_seed(3)
        out = fastformer.attention(q, kk, vv, causal=True, dropout_p=0.1, backend=FUSED)
        return (out, *_grads(out, (q, k, v), torch.ones_like(out)))

    with _deterministic(True):
        first = run()
        for _ in range(20):
            assert all(torch.equal(a, b) for a, b in zip(first, run(), strict=True))
    with _deterministic(False):
        atomic = run()
    assert torch.equal(atomic[0], first[0])  # the forward is the same in both modes
    for a, r in zip(atomic[1:], first[1:], strict=True):
        torch.testing.assert_close(a.float(), r.float(), atol=2e-2, rtol=2e-2)


@gpu
@pytest.mark.parametrize("causal,masked,hkv,dtype", [(True, False, 2, torch.bfloat16), (False, True, 4, torch.float16)])
def test_gpu_cuda_backend_matches_triton(causal, masked, hkv, dtype):
    if "cuda" not in fastformer.available_backends():
        pytest.fail("the cuda backend is not available on this GPU machine (fastformer._C not built?)")
    b, s, h, d = 2, 333, 4, 128
    q, k, v = _rand(b, s, h, d, dtype=dtype), _rand(b, s, hkv, d, dtype=dtype), _rand(b, s, hkv, d, dtype=dtype)
    m = _padding_mask("full_row", b, s) if masked else None
    res = {}
    for be in ("cuda", "triton"):  # the same seed, hence the same Philox dropout masks
        torch.manual_seed(11)
        out = fastformer.attention(q, k, v, causal=causal, key_padding_mask=m, dropout_p=0.1, backend=be)
        res[be] = (out, *_grads(out, (q, k, v), torch.ones_like(out)))
    for a, r in zip(res["cuda"], res["triton"], strict=True):
        torch.testing.assert_close(a.float(), r.float(), atol=3e-2, rtol=3e-2)
    q2, k2, v2, cu_q, cu_k = _varlen_case([100, 3, 250], [90, 7, 250], h, hkv, d, dtype)
    outs = [
        fastformer.attention_varlen(q2, k2, v2, cu_q, cu_k, 250, 250, causal=causal, backend=be)
        for be in ("cuda", "triton")
    ]
    torch.testing.assert_close(outs[0].float(), outs[1].float(), atol=2e-2, rtol=2e-2)


@gpu
@pytest.mark.parametrize("d,dtype", [(64, torch.float16), (128, torch.bfloat16), (128, torch.float16)])
@pytest.mark.parametrize("sq,sk", [(1, 129), (17, 17), (97, 129), (129, 97)])
@pytest.mark.parametrize("causal,masked", [(True, False), (False, True)])
@pytest.mark.usefixtures("cuda_forward")
def test_gpu_cuda_backend_vs_reference(causal, masked, sq, sk, d, dtype):
    """Both CUDA forwards (mma.sync everywhere, wgmma on sm_90 with FASTFORMER_CUDA_WGMMA=1) and the backward."""
    q, k, v = _rand(2, sq, 4, d, dtype=dtype), _rand(2, sk, 2, d, dtype=dtype), _rand(2, sk, 2, d, dtype=dtype)
    m = _padding_mask("full_row", 2, sk) if masked else None
    _check(q, k, v, causal=causal, key_padding_mask=m, backend="cuda")


@gpu
def test_gpu_cuda_backend_varlen_deterministic_and_refusals():
    """Varlen against the reference, bitwise-repeatable gradients, and head dims / dtypes the CUDA kernels do not
    take refused by name when cuda is asked for."""
    if "cuda" not in fastformer.available_backends():
        pytest.fail("the cuda backend is not available on this GPU machine (fastformer._C not built?)")
    q, k, v, cu_q, cu_k = _varlen_case([100, 3, 250], [90, 7, 250], 4, 2, 128, torch.bfloat16)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fastformer.attention_varlen(q, k, v, cu_q, cu_k, 250, 250, causal=True, backend="cuda")
    ref = fastformer.attention_varlen(q, k, v, cu_q, cu_k, 250, 250, causal=True, backend="torch")
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    for _ in range(5):
        again = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    for d, dtype in ((80, torch.float16), (64, torch.float32)):
        x = _rand(1, 8, 2, d, dtype=dtype)
        with pytest.raises(fastformer.BackendError, match="CUDA attention kernels"):
            fastformer.attention(x, x, x, backend="cuda")


@gpu
@pytest.mark.parametrize("sk,h,hkv", [(4097, 16, 2), (130, 8, 8), (50000, 4, 1)])
def test_gpu_decode_split_kv(sk, h, hkv):
    b, d = 3, 128
    q = torch.randn(b, 1, h, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(b, sk, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    with torch.no_grad():
        out = fastformer.attention(q, k, v, causal=True, backend=FUSED)
    ref = attention_reference(q, k, v, causal=True)
    pt = attention_reference(q, k, v, causal=True, upcast=False)
    ref64 = attention_reference(q.double(), k.double(), v.double(), causal=True)
    assert_close_2x("decode", out, ref64, pt)
    assert (out.float() - ref.float()).abs().max() < 2e-2


@gpu
def test_gpu_int64_offsets(bwd_mode):
    """q's second batch starts past 2**31 elements: int32 pointer math would read the wrong memory."""
    h, d, s = 2, 64, 256
    n = (1 << 31) // (h * d) + s
    big = torch.empty(2, n, h, d, device="cuda", dtype=torch.float16)
    big[:, -s:].normal_()
    q = big[:, -s:].requires_grad_()  # batch stride > 2**31 elements
    k, v = (_rand(2, s, h, d, dtype=torch.float16) for _ in range(2))
    qc = q.detach().contiguous().requires_grad_()
    out = fastformer.attention(q, k, v, causal=True, backend=FUSED)
    ref = fastformer.attention(qc, k, v, causal=True, backend=FUSED)
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    for a, r in zip(_grads(out, (q, k, v), g), _grads(ref, (qc, k, v), g), strict=True):
        if bwd_mode == "deterministic":
            assert torch.equal(a, r)
        else:  # the order of dQ's atomic fp32 sums varies
            torch.testing.assert_close(a, r, atol=1e-3, rtol=1e-3)


@gpu
@pytest.mark.usefixtures("cuda_forward")
def test_gpu_cuda_int64_offsets():
    """The CUDA kernels on a q whose second batch starts past 2**31 elements (read in place: its strides are
    multiples of 8), both forwards; every gradient bitwise equal to the contiguous copy's (the CUDA backward is
    deterministic)."""
    h, d, s = 2, 64, 256
    n = (1 << 31) // (h * d) + s
    big = torch.empty(2, n, h, d, device="cuda", dtype=torch.float16)
    big[:, -s:].normal_()
    q = big[:, -s:].requires_grad_()
    k, v = (_rand(2, s, h, d, dtype=torch.float16) for _ in range(2))
    qc = q.detach().contiguous().requires_grad_()
    out = fastformer.attention(q, k, v, causal=True, backend="cuda")
    ref = fastformer.attention(qc, k, v, causal=True, backend="cuda")
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    for a, r in zip(_grads(out, (q, k, v), g), _grads(ref, (qc, k, v), g), strict=True):
        assert torch.equal(a, r)
