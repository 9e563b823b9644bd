"""fastformer.linear / feed_forward / nn.FeedForward against float64 references (CPU: Triton interpreter)."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, HAS_GPU

import fastformer
from fastformer.ops import dropout, ffn
from fastformer.testing import assert_close_2x

ACTS = [None, "gelu", "gelu_tanh", "relu"]


def _weights(k: int, n: int, dtype: torch.dtype, layout: str, bias: bool):
    w = torch.randn(n, k, device=DEVICE, dtype=torch.float32) / k**0.5
    if layout == "in_out":
        w = w.t().contiguous()
    b = torch.randn(n, device=DEVICE) if bias else None
    w = w.to(dtype).requires_grad_()
    return w, (b.to(dtype).requires_grad_() if b is not None else None)


def _grads(out: torch.Tensor, inputs: list[torch.Tensor | None], g: torch.Tensor) -> list[torch.Tensor]:
    live = [t for t in inputs if t is not None]
    return list(torch.autograd.grad(out, live, g))


def _as64(ts):
    return [t.detach().double().requires_grad_() if t is not None else None for t in ts]


def _noncontig(t: torch.Tensor) -> torch.Tensor:
    """Same values, last dimension strided (every other element of a doubled buffer)."""
    buf = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    buf[..., ::2] = t
    return buf[..., ::2]


# (M, K, N, activation, bias, dtype, layout, lead shape, non-contiguous x and grad): a covering set of the
# sizes {1, 7, 65, 127, 130, 768, 3073}, every activation with and without bias, both layouts and dtypes
LINEAR_CASES = [
    (7, 65, 130, "gelu", True, torch.float32, "out_in", None, False),
    (65, 127, 7, "gelu_tanh", True, torch.float16, "in_out", (5, 13), False),
    (130, 7, 65, "relu", False, torch.float32, "out_in", None, True),
    (1, 768, 127, None, True, torch.float32, "in_out", None, False),
    (127, 1, 768, "gelu", False, torch.float16, "out_in", None, True),
    (1, 3073, 7, "gelu_tanh", False, torch.float32, "out_in", None, False),
    (3073, 7, 1, "relu", True, torch.float16, "in_out", None, False),
    (65, 130, 127, None, False, torch.float16, "out_in", (13, 5), True),
    (768, 65, 7, "gelu", True, torch.float32, "in_out", (2, 384), True),
    (7, 7, 3073, "relu", True, torch.float32, "out_in", None, False),
]


def _run_linear_case(M, K, N, act, bias, dtype, layout, lead, noncontig, backend, recompute=False, p=0.0):
    lead = lead or (M,)
    x = torch.randn(*lead, K, device=DEVICE).to(dtype)
    if noncontig:
        x = _noncontig(x)
    x.requires_grad_()
    w, b = _weights(K, N, dtype, layout, bias)
    state = torch.get_rng_state()
    # fused kernels draw Philox masks, which the reference emulates for seeds drawn under exact_dropout; the torch
    # backend's default masks come from torch's generator (the reference follows the seed's mode)
    with dropout.exact_dropout(backend != "torch"):
        y = fastformer.linear(x, w, b, act, dropout_p=p, weight_layout=layout, recompute=recompute, backend=backend)
        torch.set_rng_state(state)
        seed_t = dropout.new_seed(p)  # the seed linear drew (none, and no draw, when p == 0)
    seed = int(seed_t) if seed_t is not None else None
    g = torch.randn(*lead, N, device=DEVICE).to(dtype)
    if noncontig:
        g = _noncontig(g)
    ours = [y, *_grads(y, [x, w, b], g)]
    pt_y = ffn.linear_reference(x, w, b, act, layout, p, seed)
    pt = [pt_y, *_grads(pt_y, [x, w, b], g)]
    x64, w64, b64 = _as64([x, w, b])
    ref_y = ffn.linear_reference(x64, w64, b64, act, layout, p, seed)
    ref = [ref_y, *_grads(ref_y, [x64, w64, b64], g.double())]
    for name, o, r, q in zip(["out", "dx", "dw", "db"], ours, ref, pt, strict=False):
        assert o.dtype == dtype and o.shape == r.shape
        assert_close_2x(name, o, r, q)


@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{c[3]}-{str(c[5])[6:]}-{c[6]}")
def test_linear_triton_vs_float64(case):
    _run_linear_case(*case, backend="triton")


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_linear_every_activation(act, bias, backend):
    _run_linear_case(33, 65, 127, act, bias, torch.float32, "out_in", (3, 11), True, backend, recompute=act == "gelu")


# (M, K, N, activation, bias, dtype, layout, lead shape, non-contiguous, recompute, dropout_p): odd shapes, both
# dtypes, with and without an activation (without one, backward needs only the mask, not the pre-activation)
LINEAR_DROPOUT_CASES = [
    (33, 65, 127, "gelu", True, torch.float32, "out_in", (3, 11), True, False, 0.3),
    (65, 7, 130, None, False, torch.float16, "in_out", None, False, False, 0.5),
    (7, 130, 65, "relu", True, torch.float16, "out_in", None, True, True, 0.1),
    (127, 33, 65, "gelu_tanh", False, torch.float32, "in_out", (127,), False, True, 0.2),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "case", LINEAR_DROPOUT_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{c[3]}-{str(c[5])[6:]}-p{c[10]}"
)
def test_linear_dropout_vs_float64(case, backend):
    *shape, recompute, p = case
    _run_linear_case(*shape, backend, recompute=recompute, p=p)


# (M, d, d_ff, activation, dtype, layout, dropout_p, recompute, backend)
FFN_CASES = [
    (65, 7, 130, "gelu", torch.float32, "out_in", 0.0, False, "triton"),
    (7, 127, 65, "gelu_tanh", torch.float16, "in_out", 0.2, False, "triton"),
    (130, 65, 7, "relu", torch.float32, "out_in", 0.5, True, "triton"),
    (1, 65, 768, None, torch.float32, "in_out", 0.1, True, "triton"),
    (65, 7, 130, "gelu", torch.float16, "out_in", 0.3, False, "torch"),
    (127, 65, 7, "gelu_tanh", torch.float32, "in_out", 0.0, True, "torch"),
]


@pytest.mark.parametrize("case", FFN_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-{c[3]}-p{c[6]}-{c[8]}")
def test_feed_forward_vs_float64(case):
    _check_feed_forward_vs_float64(case)


def _check_feed_forward_vs_float64(case):
    M, d, d_ff, act, dtype, layout, p, recompute, backend = case
    x = _noncontig(torch.randn(M, d, device=DEVICE).to(dtype)).requires_grad_()
    w1, b1 = _weights(d, d_ff, dtype, layout, True)
    w2, b2 = _weights(d_ff, d, dtype, layout, True)
    params = [x, w1, b1, w2, b2]
    with dropout.exact_dropout(backend != "torch"):  # as in _run_linear_case
        torch.manual_seed(123)
        out = fastformer.feed_forward(*params, act, p, weight_layout=layout, recompute=recompute, backend=backend)
        torch.manual_seed(123)
        seed_t = dropout.new_seed(p)
    seed = int(seed_t) if seed_t is not None else None
    g = _noncontig(torch.randn(M, d, device=DEVICE).to(dtype))
    ours = [out, *_grads(out, params, g)]
    pt_out = ffn.feed_forward_reference(*params, act, p, seed, layout)
    pt = [pt_out, *_grads(pt_out, params, g)]
    p64 = _as64(params)
    ref_out = ffn.feed_forward_reference(*p64, act, p, seed, layout)
    ref = [ref_out, *_grads(ref_out, p64, g.double())]
    for name, o, r, q in zip(["out", "dx", "dw1", "db1", "dw2", "db2"], ours, ref, pt, strict=True):
        assert_close_2x(name, o, r, q)


class _LaunchSpy:
    """Stands in for a Triton kernel in its launcher: records each launch's constexpr flags, then launches it."""

    def __init__(self, kernel):
        self.kernel, self.flags = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.flags.append({k: v for k, v in kwargs.items() if k.isupper()})
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.fixture
def impl(monkeypatch):
    """(fastformer.ops.ffn.triton_impl, spy on its linear_kernel, spy on its splitk_reduce_kernel), untuned so the
    spied kernels are launched as they are (on a GPU too)."""
    mod = importlib.import_module("fastformer.ops.ffn.triton_impl")
    monkeypatch.setenv("FASTFORMER_AUTOTUNE", "0")
    spy, reduce = _LaunchSpy(mod.linear_kernel), _LaunchSpy(mod.splitk_reduce_kernel)
    monkeypatch.setattr(mod, "linear_kernel", spy)
    monkeypatch.setattr(mod, "splitk_reduce_kernel", reduce)
    return mod, spy, reduce


def _gemm_vs_float64(mod, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """triton_impl.gemm (plain epilogue, with ``bias`` when given) against float64 by the 2x rule."""
    c, _ = mod.gemm(a, b, a.dtype, bias)
    ref64 = a.double() @ b.double() + (bias.double() if bias is not None else 0.0)
    pt = a @ b + (bias if bias is not None else 0.0)
    assert c.dtype == a.dtype and c.is_contiguous()
    assert_close_2x("c", c, ref64, pt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_linear_tma_path_vs_float64(impl, dtype, layout):
    # every operand's storage rows are whole multiples of 16 bytes, so every GEMM of forward and backward loads
    # through tensor descriptors; M (the weight gradient's K) is prime, and the 15 output tiles of the forward
    # outnumber the interpreter's 4 persistent programs, so each program loops over several tiles
    _, spy, _ = impl
    _run_linear_case(131, 72, 136, "gelu", True, dtype, layout, None, False, "triton")
    assert len(spy.flags) == 3 and all(f["USE_TMA"] for f in spy.flags)
    # the forward or dx reads the weight's transposed storage (B = W^T), dW the transposed input or gradient
    assert [f["B_KMAJOR"] for f in spy.flags].count(True) == 1
    assert [f["A_MMAJOR"] for f in spy.flags] == [False, False, True]


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """Same values and strides, at a base one element past a 16-byte boundary (which TMA cannot start from)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["misaligned base", "odd row stride", "no unit stride"])
def test_gemm_pointer_fallback_vs_float64(impl, dtype, kind):
    # B alone could go through TMA (the transposed view of an aligned (N, K) weight); A cannot, so neither does
    mod, spy, _ = impl
    k = 65 if kind == "odd row stride" else 64
    a = torch.randn(37, k, device=DEVICE).to(dtype)
    a = _misaligned(a) if kind == "misaligned base" else _noncontig(a) if kind == "no unit stride" else a
    b = torch.randn(40, k, device=DEVICE).to(dtype).t()
    _gemm_vs_float64(mod, a, b, torch.randn(40, device=DEVICE).to(dtype))
    assert [f["USE_TMA"] for f in spy.flags] == [False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("split", [3, 4])
@pytest.mark.parametrize("operands", ["pointer", "tma"])
def test_gemm_split_k_vs_float64(impl, monkeypatch, dtype, split, operands):
    # K = 131 is 5 steps of 32: 3 slices of 2, 2, 1 steps, or 4 slices of which the last lies wholly past K
    mod, spy, reduce = impl
    monkeypatch.setattr(mod, "split_k", lambda _tiles, _sms, _k: split)
    k = 131
    if operands == "pointer":  # prime M and N: no row stride is a multiple of 16 bytes
        a, b = torch.randn(37, k, device=DEVICE), torch.randn(k, 41, device=DEVICE)
    else:  # a weight gradient's layout: A the transposed (tokens, M) gradient, K the odd token count
        a, b = torch.randn(k, 40, device=DEVICE).t(), torch.randn(k, 72, device=DEVICE)
    _gemm_vs_float64(mod, a.to(dtype), b.to(dtype))
    assert [(f["SPLIT_K"], f["USE_TMA"]) for f in spy.flags] == [(split, operands == "tma")]
    assert [f["SPLIT_K"] for f in reduce.flags] == [split]


def test_linear_split_k_in_forward_and_backward(impl, monkeypatch):
    # no bias and no activation: every GEMM is plain, so each one splits (dW over the 97 tokens)
    mod, spy, reduce = impl
    monkeypatch.setattr(mod, "split_k", lambda _tiles, _sms, _k: 2)
    _run_linear_case(97, 40, 24, None, False, torch.float16, "in_out", None, False, "triton")
    assert [f["SPLIT_K"] for f in spy.flags] == [2, 2, 2] and len(reduce.flags) == 3


def test_split_k_policy():
    split_k = importlib.import_module("fastformer.ops.ffn.triton_impl").split_k
    # GPT-2 weight gradients (768x3072 outputs, K = 8192 tokens) on 132 SMs: 144 tiles of 128x128 or 72 of 128x256
    assert split_k(144, 132, 8192) == 2 and split_k(72, 132, 8192) == 4
    assert split_k(264, 132, 8192) == 1  # two waves already
    assert split_k(144, 132, 1500) == 1  # too little K to share
    assert split_k(1, 132, 1 << 20) == 16  # at most 16 slices


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_linear_tma_and_split_k_gpu(dtype):
    # aligned GPT-2-sized operands (TMA on sm_90) whose weight gradients (3072x768, K = 4096 tokens) split K
    for layout in ("out_in", "in_out"):
        _run_linear_case(4096, 768, 3072, "gelu", True, dtype, layout, None, False, "triton")
        _run_linear_case(4096, 768, 3072, None, False, dtype, layout, None, False, "triton")


def test_gelu_exact_against_torch_and_transformers():
    from transformers.activations import NewGELUActivation

    x = torch.cat([torch.linspace(-12, 12, 97), torch.randn(64) * 3]).to(DEVICE).view(1, -1)
    eye = torch.eye(x.shape[1], device=DEVICE)  # x @ I is exact in fp32 (ieee dot), so only the epilogue differs
    for act, ref in [
        ("gelu", F.gelu(x)),
        ("gelu_tanh", F.gelu(x, approximate="tanh")),
        ("gelu_tanh", NewGELUActivation()(x)),
        ("relu", torch.relu(x)),
    ]:
        for backend in ("triton", "torch"):
            xx = x.clone().requires_grad_()
            y = fastformer.linear(xx, eye, None, act, backend=backend)
            torch.testing.assert_close(y, ref, atol=2e-6, rtol=2e-6, msg=f"{act} {backend}")
            # the derivative used by backward against autograd through torch's own activation
            (dx,) = torch.autograd.grad(y.sum(), xx)
            x64 = x.double().requires_grad_()
            (dref,) = torch.autograd.grad(ffn.act_fn(x64, act).sum(), x64)
            torch.testing.assert_close(dx.double(), dref, atol=2e-6, rtol=2e-6, msg=f"d{act} {backend}")


def _identity_ffn(p: float, backend: str, seed: int = 7, second_layer: bool = True):
    """feed_forward (or linear) with W1 = W2 = I and no activation: the output is exactly the dropped activation."""
    n = 64
    x = (torch.rand(48, n, generator=torch.Generator().manual_seed(0)) + 0.5).to(DEVICE)
    eye = torch.eye(n, device=DEVICE)
    torch.manual_seed(seed)  # the dropout seed is drawn from torch's default generator
    if not second_layer:
        return x, fastformer.linear(x, eye, None, None, dropout_p=p, backend=backend)
    return x, fastformer.feed_forward(x, eye, None, eye, None, None, p, backend=backend)


@pytest.mark.usefixtures("exact_dropout")
def test_dropout_reproducible_binomial_and_backends_agree():
    p = 0.3
    x, a = _identity_ffn(p, "triton")
    _, b = _identity_ffn(p, "triton")
    assert torch.equal(a, b), "same seed must give the same output"
    _, c = _identity_ffn(p, "triton", seed=8)
    assert not torch.equal(a == 0, c == 0), "a different seed must give a different mask"
    _, t = _identity_ffn(p, "torch")
    assert torch.equal(a == 0, t == 0), "triton and torch backends draw different masks for one seed"
    torch.testing.assert_close(a, t)
    kept = a != 0
    torch.testing.assert_close(a[kept], x[kept] / (1 - p))
    n = kept.numel()
    mean, std = n * (1 - p), (n * p * (1 - p)) ** 0.5
    assert abs(kept.sum().item() - mean) < 5 * std, f"kept {kept.sum().item()} of {n}, expected ~{mean:.0f}"


@pytest.mark.usefixtures("exact_dropout")
def test_linear_dropout_backends_draw_identical_masks():
    p = 0.3
    x, ref = _identity_ffn(p, "torch", second_layer=False)
    assert (ref == 0).any() and (ref != 0).any()
    for backend in ["triton"] + (["cuda"] if HAS_GPU else []):
        _, y = _identity_ffn(p, backend, second_layer=False)
        assert torch.equal(y == 0, ref == 0), f"{backend} and torch draw different masks for one seed"
        torch.testing.assert_close(y, ref)
    # the linear's mask is the feed-forward hidden layer's: same (row, col) dropout matrix, same seed
    _, ffn_out = _identity_ffn(p, "torch")
    assert torch.equal(ffn_out == 0, ref == 0)
    torch.testing.assert_close(ref[ref != 0], x[ref != 0] / (1 - p))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("act", [None, "gelu"])
def test_linear_dropout_p0_is_exactly_no_dropout(backend, act):
    x = torch.randn(9, 65, device=DEVICE, requires_grad=True)
    w, b = _weights(65, 33, torch.float32, "out_in", True)
    g = torch.randn(9, 33, device=DEVICE)
    plain = fastformer.linear(x, w, b, act, backend=backend)
    state = torch.get_rng_state()
    zero = fastformer.linear(x, w, b, act, dropout_p=0.0, backend=backend)
    assert torch.equal(torch.get_rng_state(), state), "dropout_p=0 must not draw a seed"
    assert torch.equal(zero, plain)
    for a, c in zip(_grads(zero, [x, w, b], g), _grads(plain, [x, w, b], g), strict=True):
        assert torch.equal(a, c)


@pytest.mark.parametrize(
    "p, exc, match",
    [
        (1.0, ValueError, r"dropout_p must be in \[0, 1\)"),
        (-0.1, ValueError, r"dropout_p must be in \[0, 1\)"),
        (float("nan"), ValueError, r"dropout_p must be in \[0, 1\)"),
        ("0.1", TypeError, "dropout_p must be a float"),
        (True, TypeError, "dropout_p must be a float"),
        (None, TypeError, "dropout_p must be a float"),
    ],
)
def test_linear_bad_dropout_p(p, exc, match):
    with pytest.raises(exc, match=match):
        fastformer.linear(torch.randn(3, 8), torch.randn(5, 8), None, "gelu", dropout_p=p, backend="torch")


@pytest.mark.parametrize("backend", ["torch", "triton", *(["cuda"] if HAS_GPU else [])])
def test_strided_biases(backend):
    # biases that are views with stride 2 must be read as what they hold, forward and backward
    x = torch.randn(5, 17, device=DEVICE, requires_grad=True)
    w1, _ = _weights(17, 23, torch.float32, "out_in", False)
    w2, _ = _weights(23, 11, torch.float32, "out_in", False)
    b1 = torch.randn(46, device=DEVICE)[::2].requires_grad_()
    b2 = torch.randn(22, device=DEVICE)[1::2].requires_grad_()
    g = torch.randn(5, 11, device=DEVICE)
    out = fastformer.feed_forward(x, w1, b1, w2, b2, "gelu", backend=backend)
    ref = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
    leaves = [x, w1, b1, w2, b2]
    for o, r in zip([out, *_grads(out, leaves, g)], [ref, *_grads(ref, leaves, g)], strict=True):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)


def test_dropout_p0_is_exactly_no_dropout():
    x = torch.randn(9, 65, device=DEVICE)
    w1, b1 = _weights(65, 130, torch.float32, "out_in", True)
    w2, b2 = _weights(130, 65, torch.float32, "out_in", True)
    out = fastformer.feed_forward(x, w1, b1, w2, b2, "gelu", 0.0, backend="triton")
    two = fastformer.linear(fastformer.linear(x, w1, b1, "gelu", backend="triton"), w2, b2, backend="triton")
    assert torch.equal(out, two)


def test_feed_forward_module_matches_two_linears():
    torch.manual_seed(1)
    m = fastformer.nn.FeedForward(65, 130, activation="gelu_tanh", backend="triton").to(DEVICE)
    ref = torch.nn.Module()
    ref.fc1, ref.fc2 = torch.nn.Linear(65, 130), torch.nn.Linear(130, 65)
    ref.to(DEVICE)
    assert list(m.state_dict()) == list(ref.state_dict())
    m.load_state_dict(ref.state_dict())
    x = torch.randn(2, 7, 65, device=DEVICE)
    want = ref.fc2(F.gelu(ref.fc1(x), approximate="tanh"))
    torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)
    m_drop = fastformer.nn.FeedForward(65, 130, dropout_p=0.5).to(DEVICE)
    m_drop.load_state_dict(ref.state_dict())
    m_drop.eval()
    torch.testing.assert_close(m_drop(x), fastformer.feed_forward(x, *ref.state_dict().values(), "gelu"))


def test_empty_input():
    x = torch.randn(0, 7, device=DEVICE, requires_grad=True)
    w, b = _weights(7, 5, torch.float32, "out_in", True)
    y = fastformer.linear(x, w, b, "gelu", backend="triton")
    assert y.shape == (0, 5)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def _good():
    x = torch.randn(4, 8)
    return dict(x=x, w1=torch.randn(16, 8), b1=torch.randn(16), w2=torch.randn(8, 16), b2=torch.randn(8))


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(w1=torch.randn(16, 9)), ValueError, "w1 has in_features 9"),
        (dict(w2=torch.randn(8, 15)), ValueError, "w2 has in_features 15"),
        (dict(b1=torch.randn(15)), ValueError, r"b1 must have shape \(16,\)"),
        (dict(b2=torch.randn(8, 1)), ValueError, r"b2 must have shape \(8,\)"),
        (dict(activation="swish"), ValueError, "activation: unknown activation 'swish'"),
        (dict(x=torch.ones(4, 8, dtype=torch.int64)), TypeError, "x must have a floating dtype"),
        (dict(w1=torch.randn(16, 8, dtype=torch.float16)), TypeError, "w1 has dtype torch.float16"),
        (dict(b2=torch.randn(8, dtype=torch.float64)), TypeError, "b2 has dtype torch.float64 but x has"),
        (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
        (dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\)"),
        (dict(weight_layout="oi"), ValueError, "weight_layout must be one of"),
    ],
)
def test_feed_forward_bad_input(change, exc, match, monkeypatch):
    def boom(*_a, **_k):
        raise AssertionError("a kernel ran before validation")

    for name in ("torch", "triton", "cuda"):
        monkeypatch.setattr(importlib.import_module(f"fastformer.ops.ffn.{name}_impl"), "gemm", boom)
    args = {**_good(), "activation": "gelu", "dropout_p": 0.0, **change}
    layout = args.pop("weight_layout", "out_in")
    with pytest.raises(exc, match=match):
        fastformer.feed_forward(**args, weight_layout=layout, backend="torch")


@pytest.mark.parametrize(
    "x, w, b, act, exc, match",
    [
        (torch.randn(3, 8), torch.randn(5, 7), None, None, ValueError, "weight has in_features 7"),
        (torch.randn(3, 8), torch.randn(5, 8), torch.randn(4), None, ValueError, r"bias must have shape \(5,\)"),
        (torch.randn(3, 8), torch.randn(5, 8), None, "tanh", ValueError, "activation: unknown activation"),
        (torch.randn(3, 8), torch.randn(5, 8), None, 3, TypeError, "activation must be None or a str"),
        (torch.ones(3, 8, dtype=torch.int32), torch.randn(5, 8), None, None, TypeError, "x must have a floating"),
        (torch.randn(3, 8), torch.randn(5, 8).half(), None, None, TypeError, "weight has dtype torch.float16"),
        (torch.randn(3, 8), torch.randn(5, 8, 1), None, None, ValueError, "weight must be 2-D"),
    ],
)
def test_linear_bad_input(x, w, b, act, exc, match):
    with pytest.raises(exc, match=match):
        fastformer.linear(x, w, b, act, backend="torch")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend):
    x = torch.randn(5, 7, device=DEVICE, requires_grad=True)
    w1 = torch.randn(9, 7, device=DEVICE, requires_grad=True)
    b1 = torch.randn(9, device=DEVICE, requires_grad=True)
    w2 = torch.randn(7, 9, device=DEVICE, requires_grad=True)
    seed = torch.tensor(1234, dtype=torch.int64)
    # (x, save_pre, w1, b1, w2, b2, activation, in_out, dropout_p, seed, backend): a linear has no second layer
    linear_fwd, ffn_fwd = torch.ops.fastformer.linear_fwd.default, torch.ops.fastformer.ffn_fwd.default
    torch.library.opcheck(linear_fwd, (x, True, w1, b1, None, None, "gelu", False, 0.0, None, backend))
    torch.library.opcheck(ffn_fwd, (x, True, w1, b1, w2, None, "gelu_tanh", False, 0.25, seed, backend))
    torch.library.opcheck(linear_fwd, (x, False, w1, None, None, None, "none", False, 0.25, seed, backend))
    # permuted-dense input and the Conv1D layout
    xt = torch.randn(7, 5, device=DEVICE).t().requires_grad_()
    w_io = torch.randn(7, 9, device=DEVICE, requires_grad=True)
    torch.library.opcheck(linear_fwd, (xt, False, w_io, None, None, None, "relu", True, 0.0, None, backend))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph(backend):
    x = torch.randn(2, 5, 7, device=DEVICE, requires_grad=True)
    w1, b1 = _weights(7, 9, torch.float32, "out_in", True)
    w2, b2 = _weights(9, 7, torch.float32, "out_in", True)

    def f(x, w1, b1, w2, b2):
        h = fastformer.feed_forward(x, w1, b1, w2, b2, "gelu", 0.0, backend=backend)
        return fastformer.linear(h, w1, b1, "relu", backend=backend)

    # aot_eager traces forward and backward like inductor does, without minutes of CPU codegen
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    params = [x, w1, b1, w2, b2]
    y = compiled(*params)
    want = f(*params)
    torch.testing.assert_close(y, want)
    g = torch.randn_like(y)
    for a, b in zip(_grads(y, params, g), _grads(want, params, g), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("act", ACTS)
def test_bf16_and_cuda_backend_gpu(backend, act):
    for M, K, N in [(127, 768, 3073), (3073, 130, 65), (1, 65, 7)]:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            _run_linear_case(M, K, N, act, True, dtype, "out_in", None, True, backend)
            _run_linear_case(M, K, N, act, False, dtype, "in_out", None, False, backend, recompute=True)
            _run_linear_case(M, K, N, act, True, dtype, "in_out", None, True, backend, recompute=True, p=0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_feed_forward_gpu_backends_agree(backend):
    assert HAS_GPU
    for p in (0.0, 0.1):
        _, a = _identity_ffn(p, backend)
        _, t = _identity_ffn(p, "torch")
        assert torch.equal(a == 0, t == 0)
        torch.testing.assert_close(a, t)
    for case in FFN_CASES:
        for dtype in (torch.bfloat16, torch.float16):
            _check_feed_forward_vs_float64((*case[:4], dtype, *case[5:8], backend))


@pytest.mark.parametrize("recompute", [False, True])
def test_backward_keeps_at_most_input_and_pre_activation(recompute):
    M, d, d_ff = 6, 8, 40
    x = torch.randn(M, d, device=DEVICE, requires_grad=True)
    w1, b1 = _weights(d, d_ff, torch.float32, "out_in", True)
    w2, b2 = _weights(d_ff, d, torch.float32, "out_in", True)
    wide = []

    def pack(t):
        if t.shape == (M, d_ff):
            wide.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fastformer.feed_forward(x, w1, b1, w2, b2, "gelu", 0.1, recompute=recompute, backend="triton")
    # only the pre-activation may be kept (never h or a mask), and nothing wide with recompute=True
    assert len(wide) == (0 if recompute else 1)
    out.sum().backward()
    assert x.grad is not None and w1.grad is not None and b2.grad is not None


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_in_features_returns_the_bias_as_f_linear(backend):
    x = torch.randn(3, 2, 0, device=DEVICE, requires_grad=True)
    w, b = torch.randn(5, 0, device=DEVICE, requires_grad=True), torch.randn(5, device=DEVICE, requires_grad=True)
    y = fastformer.linear(x, w, b, "relu", backend=backend)
    ref = F.relu(F.linear(x, w, b))
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    for a, r in zip(torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(ref, (x, w, b), g), strict=True):
        torch.testing.assert_close(a, r)


def test_meta_tensors_give_shapes():
    """Shape inference on the meta device goes through the ops' fake implementations (no autocast lookup)."""
    x, w1, w2 = (torch.empty(s, device="meta") for s in ((4, 7, 16), (32, 16), (16, 32)))
    assert fastformer.linear(x, w1, None, "gelu").shape == (4, 7, 32)
    assert fastformer.feed_forward(x, w1, None, w2, None).shape == (4, 7, 16)
    q = torch.empty(2, 9, 4, 16, device="meta")
    assert fastformer.attention(q, q, q, causal=True).shape == q.shape
    assert fastformer.layer_norm(x, 16).shape == x.shape


def test_torch_backend_serves_float64_and_fused_backends_refuse_it():
    x = torch.randn(7, 13, dtype=torch.float64, requires_grad=True)
    w1, b1 = torch.randn(29, 13, dtype=torch.float64), torch.randn(29, dtype=torch.float64)
    w2 = torch.randn(13, 29, dtype=torch.float64)
    out = fastformer.feed_forward(x, w1, b1, w2, None, "gelu", backend="torch")
    ref = ffn.feed_forward_reference(x, w1, b1, w2, None, "gelu")
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    (dx,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(dx, torch.autograd.grad(ref.sum(), x)[0], atol=1e-12, rtol=1e-12)
    with pytest.raises(fastformer.BackendError, match="float64 is served by the torch backend only"):
        fastformer.linear(x, w1, b1, backend="triton")


@pytest.mark.skipif(HAS_GPU, reason="the Triton interpreter's bfloat16 is refused on CPU only")
def test_triton_interpreter_refuses_bfloat16():
    x, w = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(5, 8, dtype=torch.bfloat16)
    with pytest.raises(fastformer.BackendError, match="computes bfloat16 wrongly"):
        fastformer.linear(x, w, backend="triton")
    with pytest.raises(fastformer.BackendError, match="computes bfloat16 wrongly"):
        fastformer.feed_forward(x, w, None, w.t().contiguous(), None, backend="triton")
    torch.testing.assert_close(fastformer.linear(x, w, backend="torch"), F.linear(x, w))


def test_autocast_casts_like_f_linear():
    x = torch.randn(4, 9)
    w, b = torch.randn(5, 9), torch.randn(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastformer.linear(x, w, b, "relu", backend="torch")
        ref = F.relu(F.linear(x, w, b))
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref)
