"""LayerNorm and dropout + residual + LayerNorm: every backend against a float64 reference."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, HAS_GPU

import fastformer
from fastformer.ops import dropout
from fastformer.testing import assert_close_2x

CPU_BACKENDS = ["triton", "torch"]
GPU_BACKENDS = ["triton", "cuda", "torch"]
BACKENDS = GPU_BACKENDS if HAS_GPU else CPU_BACKENDS
DTYPES = [torch.float32, torch.float16]
# (rows, hidden): hidden 1, 7, 768, 1000, 4097 and rows 1, 3, 257, without the full product
SHAPES = [(1, 1), (3, 7), (257, 7), (3, 768), (1, 1000), (257, 1000), (3, 4097), (1, 4097)]


def _inputs(rows, n, dtype, affine=True, device=DEVICE):
    x = torch.randn(rows, n, device=device).to(dtype) * 2 + 0.5
    w = (torch.randn(n, device=device) * 0.5 + 1).to(dtype) if affine else None
    b = (torch.randn(n, device=device) * 0.5).to(dtype) if affine else None
    return x, w, b


def _grads(out, leaves, g):
    return torch.autograd.grad(out, [t for t in leaves if t is not None], g)


def _leaf(t, dtype=None):
    return None if t is None else t.detach().to(dtype or t.dtype).requires_grad_()


def _check_layer_norm(x, w, b, backend, eps=1e-5):
    """ours vs float64 reference vs torch in x's dtype: forward and every gradient."""
    n = x.shape[-1]
    g = torch.randn_like(x)
    xs, ws, bs = _leaf(x), _leaf(w), _leaf(b)
    y = fastformer.layer_norm(xs, (n,), ws, bs, eps, backend=backend)
    ours = [y, *_grads(y, [xs, ws, bs], g)]
    x64, w64, b64 = _leaf(x, torch.float64), _leaf(w, torch.float64), _leaf(b, torch.float64)
    y64 = F.layer_norm(x64, (n,), w64, b64, eps)
    ref = [y64, *_grads(y64, [x64, w64, b64], g.double())]
    xp, wp, bp = _leaf(x), _leaf(w), _leaf(b)
    yp = F.layer_norm(xp, (n,), wp, bp, eps)
    pt = [yp, *_grads(yp, [xp, wp, bp], g)]
    for name, o, r, p in zip(["out", "dx", "dw", "db"], ours, ref, pt):
        assert o.dtype == x.dtype, name
        assert_close_2x(f"{backend} {name}", o, r, p)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", SHAPES)
def test_layer_norm_matches_float64(backend, dtype, rows, n):
    _check_layer_norm(*_inputs(rows, n, dtype), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_without_affine_and_3d(backend):
    x = torch.randn(2, 5, 13, device=DEVICE)
    _check_layer_norm(x.reshape(10, 13), None, None, backend)
    y = fastformer.layer_norm(x, 13, backend=backend)
    torch.testing.assert_close(y, F.layer_norm(x, (13,)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_dim_normalized_shape(backend):
    x = torch.randn(4, 3, 5, device=DEVICE, requires_grad=True)
    w = torch.randn(3, 5, device=DEVICE, requires_grad=True)
    b = torch.randn(3, 5, device=DEVICE, requires_grad=True)
    y = fastformer.layer_norm(x, (3, 5), w, b, backend=backend)
    g = torch.randn_like(y)
    ours = [y, *torch.autograd.grad(y, [x, w, b], g)]
    yr = F.layer_norm(x, (3, 5), w, b)
    ref = [yr, *torch.autograd.grad(yr, [x, w, b], g)]
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input_and_grad(backend):
    base = torch.randn(9, 40, device=DEVICE)
    x = base[::2, 3:36].detach().requires_grad_()  # row stride 80, 33 columns
    w = torch.randn(33, device=DEVICE, requires_grad=True)
    g = torch.randn(33, 5, device=DEVICE).t()  # transposed grad_output
    y = fastformer.layer_norm(x, (33,), w, None, backend=backend)
    dx, dw = torch.autograd.grad(y, [x, w], g)
    yr = F.layer_norm(x, (33,), w)
    dxr, dwr = torch.autograd.grad(yr, [x, w], g)
    torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx, dxr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dw, dwr, atol=1e-5, rtol=1e-5)
    xt = torch.randn(33, 6, device=DEVICE).t()  # column stride != 1
    torch.testing.assert_close(fastformer.layer_norm(xt, 33, backend=backend), F.layer_norm(xt, (33,)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_weight_and_bias(backend):
    # parameters that are views with stride 2 (e.g. a slice of a packed buffer) must be read as what they hold
    x = torch.randn(7, 17, device=DEVICE, requires_grad=True)
    r = torch.randn(7, 17, device=DEVICE)
    w = torch.randn(34, device=DEVICE)[::2].requires_grad_()
    b = torch.randn(34, device=DEVICE)[1::2].requires_grad_()
    g = torch.randn(7, 17, device=DEVICE)
    y, _ = fastformer.dropout_add_layer_norm(x, r, w, b, backend=backend)
    ours = [y, *torch.autograd.grad(y, [x, w, b], g)]
    yr = F.layer_norm(x + r, (17,), w, b)
    for o, ref in zip(ours, [yr, *torch.autograd.grad(yr, [x, w, b], g)], strict=True):
        torch.testing.assert_close(o, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rows_give_empty_output(backend):
    x = torch.randn(0, 3, 8, device=DEVICE, requires_grad=True)
    w = torch.ones(8, device=DEVICE, requires_grad=True)
    y = fastformer.layer_norm(x, 8, w, backend=backend)
    assert y.shape == (0, 3, 8)
    (dx, dw) = torch.autograd.grad(y.sum(), [x, w])
    assert dx.shape == x.shape and torch.equal(dw, torch.zeros_like(dw))
    out, s = fastformer.dropout_add_layer_norm(x, torch.randn_like(x), w, dropout_p=0.2, backend=backend)
    assert out.shape == s.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_stays_in_its_row(backend):
    x = torch.randn(4, 16, device=DEVICE)
    x[2, 5] = float("nan")
    y = fastformer.layer_norm(x, 16, backend=backend)
    assert torch.isnan(y[2, 5])
    keep = [0, 1, 3]
    torch.testing.assert_close(y[keep], F.layer_norm(x[keep], (16,)), atol=1e-5, rtol=1e-5)


def _dropout_add_ref(x, r, w, b, p, seed, eps, dtype):
    """s and LayerNorm(s) computed in ``dtype`` with the mask the op draws for ``seed``."""
    n = x.shape[1]
    s = x.to(dtype)
    if p > 0:
        s = dropout.apply(s, seed, p)
    if r is not None:
        s = s + r.to(dtype)
    return F.layer_norm(s, (n,), w.to(dtype) if w is not None else None, b.to(dtype) if b is not None else None, eps), s


def _check_dropout_add(rows, n, dtype, p, residual, backend, affine=True):
    """dropout + residual + LayerNorm: both outputs and every gradient against float64 and torch in ``dtype``."""
    x, w, b = _inputs(rows, n, dtype, affine)
    r = torch.randn(rows, n, device=DEVICE).to(dtype) if residual else None
    g_out, g_s = torch.randn_like(x), torch.randn_like(x)
    leaves = [_leaf(x), _leaf(r), _leaf(w), _leaf(b)]
    # the torch backend's default masks come from torch's generator; the fused kernels' from Philox, which the
    # reference emulates for seeds drawn under exact_dropout. Backward runs outside the block: the seed says.
    with dropout.exact_dropout(backend != "torch"):
        torch.manual_seed(7)
        seed = dropout.seed_int(dropout.new_seed(p))
        torch.manual_seed(7)
        out, s = fastformer.dropout_add_layer_norm(*leaves, dropout_p=p, backend=backend)
    # both outputs carry gradient: pre-LN blocks use s as the residual stream
    ours = [out, s, *_grads([out, s], leaves, [g_out, g_s])]
    results = []
    for dt in (torch.float64, dtype):
        ls = [_leaf(t, dt if dt == torch.float64 else None) for t in (x, r, w, b)]
        o, ss = _dropout_add_ref(*ls, p, seed, 1e-5, dt)
        results.append([o, ss, *_grads([o, ss], ls, [g_out.to(dt), g_s.to(dt)])])
    names = ["out", "s", "dx"] + ["dresidual"] * residual + ["dw", "db"] * affine
    assert len(names) == len(ours)
    for name, o, r64, pt in zip(names, ours, *results):
        assert_close_2x(f"{backend} {name}", o, r64, pt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n,p,residual", [(3, 7, 0.0, True), (97, 130, 0.1, True), (17, 97, 0.5, False)])
def test_dropout_add_layer_norm_matches_float64(backend, dtype, rows, n, p, residual):
    _check_dropout_add(rows, n, dtype, p, residual, backend)


# widths the Triton launcher splits into 3 power-of-two chunks rather than padding to one (kernels/layer_norm.py):
# 768 = 3 * 256 and 48 = 3 * 16 (rows spread over threads), the primes 47 and 761 (last chunk partly masked) and
# 2560 in 3 * 1024 (one row per program)
CHUNKED = [(21, 768), (70, 48), (37, 47), (19, 761), (6, 2560)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", CHUNKED)
def test_chunked_rows_match_float64(dtype, rows, n, monkeypatch):
    from fastformer import utils
    from fastformer.ops.layer_norm.triton_impl import settings

    _, block_n, chunks, _, spread = settings(n, dtype.itemsize)
    assert chunks == 3 and 2 * block_n < n <= 3 * block_n and spread == (n < 2560), settings(n, dtype.itemsize)
    # a one-SM device: a backward grid of at most 4 programs, so most of these shapes loop over several row tiles
    monkeypatch.setattr(utils, "sm_count", lambda _device: 1)
    _check_layer_norm(*_inputs(rows, n, dtype), "triton")
    _check_dropout_add(rows, n, dtype, 0.1, True, "triton")
    _check_dropout_add(rows, n, dtype, 0.3, False, "triton", affine=False)


def test_row_split_choice():
    from fastformer.ops.layer_norm.triton_impl import settings

    # (BLOCK_M, BLOCK_N, NUM_CHUNKS, num_warps, ROWS_SPREAD): power-of-two rows stay one block
    assert settings(1024, 2) == (4, 1024, 1, 4, False)
    assert settings(4096, 4) == (1, 4096, 1, 8, False)
    assert settings(768, 2) == (4, 256, 3, 4, True)
    # 5 * 512 would leave each of the 128 threads half a 16-byte vector: 3 * 1024, a quarter of a chunk masked
    assert settings(2560, 2) == (1, 1024, 3, 4, False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_mask_statistics_and_reproducibility(backend):
    x = torch.ones(64, 256, device=DEVICE)
    p = 0.3
    torch.manual_seed(3)
    _, s1 = fastformer.dropout_add_layer_norm(x, dropout_p=p, backend=backend)
    torch.manual_seed(3)
    _, s2 = fastformer.dropout_add_layer_norm(x, dropout_p=p, backend=backend)
    assert torch.equal(s1, s2), "same torch seed must give the same mask"
    kept = (s1 != 0).double().mean().item()
    n = x.numel()
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(kept - (1 - p)) < 5 * sd, f"kept fraction {kept:.4f} vs {1 - p} (5 sigma = {5 * sd:.4f})"
    torch.testing.assert_close(s1[s1 != 0], torch.full_like(s1[s1 != 0], 1 / (1 - p)))
    _, s3 = fastformer.dropout_add_layer_norm(x, dropout_p=p, backend=backend)
    assert not torch.equal(s1, s3), "a fresh seed must give a fresh mask"


@pytest.mark.usefixtures("exact_dropout")
def test_dropout_masks_agree_across_backends():
    x = torch.randn(33, 65, device=DEVICE)
    outs = []
    for backend in BACKENDS:
        torch.manual_seed(11)
        outs.append(fastformer.dropout_add_layer_norm(x, dropout_p=0.25, backend=backend)[1])
    for o in outs[1:]:
        assert torch.equal(o == 0, outs[0] == 0)
        torch.testing.assert_close(o, outs[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_off_in_eval_and_p_zero_is_exact(backend):
    x, r = torch.randn(5, 24, device=DEVICE), torch.randn(5, 24, device=DEVICE)
    out_eval, s_eval = fastformer.dropout_add_layer_norm(x, r, dropout_p=0.5, training=False, backend=backend)
    out_p0, s_p0 = fastformer.dropout_add_layer_norm(x, r, dropout_p=0.0, backend=backend)
    assert torch.equal(out_eval, out_p0) and torch.equal(s_eval, s_p0)
    assert torch.equal(s_p0, x + r)


def test_module_is_drop_in_for_torch_layer_norm():
    ref = torch.nn.LayerNorm(37, eps=1e-6, bias=False)
    torch.nn.init.normal_(ref.weight)
    ours = fastformer.nn.LayerNorm(37, eps=1e-6, bias=False)
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight"]
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 37)
    torch.testing.assert_close(ours(x), ref(x))
    both = fastformer.nn.LayerNorm(37)
    assert list(both.state_dict()) == ["weight", "bias"]
    plain = fastformer.nn.LayerNorm(37, elementwise_affine=False)
    assert plain.weight is None and list(plain.state_dict()) == []


def test_dropout_add_module():
    m = fastformer.nn.DropoutAddLayerNorm(16, dropout_p=0.5)
    x, r = torch.randn(4, 16), torch.randn(4, 16)
    m.eval()
    out, s = m(x, r)
    torch.testing.assert_close(s, x + r)
    torch.testing.assert_close(out, F.layer_norm(x + r, (16,), m.weight, m.bias))
    assert list(m.state_dict()) == ["weight", "bias"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    x = torch.randn(5, 24, device=DEVICE, requires_grad=True)
    r = torch.randn(5, 24, device=DEVICE, requires_grad=True)
    w = torch.randn(24, device=DEVICE, requires_grad=True)
    b = torch.randn(24, device=DEVICE, requires_grad=True)
    seed = torch.tensor(123, dtype=torch.int64)
    op = torch.ops.fastformer.layer_norm_fwd
    torch.library.opcheck(op, (x, None, w, b, 24, 1e-5, 0.0, None, backend))
    torch.library.opcheck(op, (x, r, w, None, 24, 1e-5, 0.2, seed, backend))
    torch.library.opcheck(op, (x.t().contiguous().t(), None, None, None, 24, 1e-5, 0.0, None, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    w = torch.randn(24, device=DEVICE, requires_grad=True)

    def block(x, r):
        out, s = fastformer.dropout_add_layer_norm(x, r, w, None, dropout_p=0.0, backend=backend)
        return fastformer.layer_norm(out * 2, 24, w, backend=backend) + s

    x = torch.randn(6, 24, device=DEVICE, requires_grad=True)
    r = torch.randn(6, 24, device=DEVICE, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    y, yc = block(x, r), compiled(x, r)
    torch.testing.assert_close(yc, y)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, r, w], g)
    grads_c = torch.autograd.grad(yc, [x, r, w], g)
    for a, c in zip(grads, grads_c):
        torch.testing.assert_close(c, a)


def test_compile_dynamic_shapes_and_eps():
    """Under torch.compile(dynamic=True) rows and eps may be symbolic; the input checks must not break the graph."""

    def f(x, eps):
        return fastformer.layer_norm(x, 16, eps=eps, backend="torch")

    compiled = torch.compile(f, dynamic=True, fullgraph=True, backend="aot_eager")
    for rows, eps in ((3, 1e-5), (7, 1e-3)):
        x = torch.randn(rows, 16, device=DEVICE)
        torch.testing.assert_close(compiled(x, eps), F.layer_norm(x, (16,), eps=eps))


def test_compile_follows_use_backend_without_graph_break():
    def f(x):
        return fastformer.layer_norm(x, 8)

    x = torch.randn(3, 8, device=DEVICE)
    with fastformer.use_backend("triton"):
        y = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(y, F.layer_norm(x, (8,)))


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: fastformer.layer_norm(torch.ones(2, 4, dtype=torch.int64), 4), TypeError, "input"),
        (lambda: fastformer.layer_norm(torch.ones(2, 4), 5), ValueError, "normalized_shape"),
        (lambda: fastformer.layer_norm(torch.ones(2, 4), 4, torch.ones(3)), ValueError, "weight"),
        (lambda: fastformer.layer_norm(torch.ones(2, 4), 4, None, torch.ones(5)), ValueError, "bias"),
        (lambda: fastformer.layer_norm(torch.ones(2, 4), 4, torch.ones(4, dtype=torch.int32)), TypeError, "weight"),
        (lambda: fastformer.layer_norm(torch.ones(2, 4), 4, eps=-1.0), ValueError, "eps"),
        (lambda: fastformer.dropout_add_layer_norm(torch.ones(2, 4), dropout_p=1.0), ValueError, "p"),
        (lambda: fastformer.dropout_add_layer_norm(torch.ones(2, 4), dropout_p=-0.1), ValueError, "p"),
        (lambda: fastformer.dropout_add_layer_norm(torch.ones(2, 4), torch.ones(2, 5)), ValueError, "residual"),
        (
            lambda: fastformer.dropout_add_layer_norm(torch.ones(2, 4), torch.ones(2, 4, dtype=torch.float16)),
            TypeError,
            "residual",
        ),
        (lambda: fastformer.layer_norm(torch.ones(2, 4), 4, backend="nope"), ValueError, "backend"),
    ],
)
def test_bad_input_is_rejected_before_any_kernel(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_explicit_backend_that_cannot_serve_raises():
    x = torch.randn(2, 8, dtype=torch.float64)
    with pytest.raises(fastformer.BackendError, match="float64"):
        fastformer.layer_norm(x, 8, backend="triton")
    if not HAS_GPU:
        with pytest.raises(fastformer.BackendError, match="CUDA"):
            fastformer.layer_norm(torch.randn(2, 8), 8, backend="cuda")
    with pytest.raises(fastformer.BackendError, match="65536"):
        fastformer.layer_norm(torch.randn(1, 65537), 65537, backend="triton")
    # auto serves float64 through the torch reference
    torch.testing.assert_close(fastformer.layer_norm(x, 8), F.layer_norm(x, (8,)))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("rows,n", [(4096, 768), (1000, 1024), (33, 8192), (7, 65537)])
def test_gpu_bf16_and_wide_rows(backend, rows, n):
    if backend == "triton" and n > 65536:
        with pytest.raises(fastformer.BackendError, match="65536"):
            fastformer.layer_norm(torch.randn(rows, n, device="cuda"), n, backend=backend)
        return
    _check_layer_norm(*_inputs(rows, n, torch.bfloat16, device="cuda"), backend)
    _check_layer_norm(*_inputs(rows, n, torch.float16, device="cuda"), backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_more_than_2_31_elements(backend):
    rows, n = (1 << 20) + 3, 2048  # 2**31 + 6144 elements: int32 offsets would wrap
    x = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
    y = fastformer.layer_norm(x, n, backend=backend)
    tail = slice(rows - 4, rows)
    torch.testing.assert_close(y[tail].float(), F.layer_norm(x[tail].float(), (n,)), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_gpu_cuda_and_triton_dropout_masks_agree():
    x, r = torch.randn(300, 1024, device="cuda"), torch.randn(300, 1024, device="cuda")
    outs = []
    for backend in GPU_BACKENDS:
        torch.manual_seed(5)
        outs.append(fastformer.dropout_add_layer_norm(x, r, dropout_p=0.1, backend=backend))
    for out, s in outs[1:]:
        torch.testing.assert_close(s, outs[0][1])
        torch.testing.assert_close(out, outs[0][0], atol=1e-4, rtol=1e-4)
