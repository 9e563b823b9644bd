"""Seeded property tests: random valid shapes, strides, masks and dtypes for attention, LayerNorm and linear.

Each example draws its sizes from small ranges (the triton backend runs in Triton's CPU interpreter without a GPU)
and its tensor values from a torch generator seeded by hypothesis, so a run is reproducible and a failure shrinks
to a small case. Every result, forward and gradients, is checked against a float64 reference with flash-attn's
2x rule (:func:`fastformer.testing.assert_close_2x`). The example budgets are fixed: the file runs in under a
minute (about 35 s) on two CPU cores with the interpreter.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastformer
from fastformer.ops.attention import attention_reference
from fastformer.ops.ffn import linear_reference
from fastformer.testing import assert_close_2x

FUZZ = settings(
    deadline=None,
    derandomize=True,  # the same examples on every run, with no example database written into the checkout
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

DTYPES = st.sampled_from([torch.float32, torch.float16])
SEEDS = st.integers(0, 2**31 - 1)
PRIMES = [2, 3, 5, 7, 11, 13, 31, 61, 97, 127, 131, 163, 197, 199]
# hidden sizes 1..200, primes drawn as often as the rest
HIDDEN = st.one_of(st.integers(1, 200), st.sampled_from(PRIMES))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _randn(gen: torch.Generator, shape, dtype: torch.dtype, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, device=DEVICE) * scale + offset).to(dtype)


def _laid_out(gen: torch.Generator, shape, dtype: torch.dtype, layout: str, scale=1.0, offset=0.0) -> torch.Tensor:
    """Random values (``randn * scale + offset``, rounded to ``dtype``) of ``shape`` stored in ``layout``:

    contiguous; ``transposed`` (the first two dims after the leading one swapped in storage, unit last stride:
    (B, H, S, D) storage seen as (B, S, H, D)); ``sliced`` (a window of a larger tensor: padded strides, storage
    offset, unit last stride); ``strided_last`` (every other element of the last dim); ``broadcast`` (stride 0
    on the first dim).
    """

    # the values are drawn and rounded in the storage shape, then viewed: arithmetic or a dtype cast after the
    # view would return a contiguous copy
    def base(storage_shape):
        return _randn(gen, storage_shape, dtype, scale, offset)

    if layout == "contiguous":
        return base(shape)
    if layout == "transposed":
        if len(shape) == 2:
            return base(shape[::-1]).t()  # last stride != 1
        perm = (0, 2, 1, *range(3, len(shape)))
        return base(tuple(shape[i] for i in perm)).permute(perm)
    if layout == "sliced":
        big = base(tuple(s + 3 for s in shape))
        return big[tuple(slice(1, 1 + s) for s in shape[:-1]) + (slice(2, 2 + shape[-1]),)]
    if layout == "strided_last":
        return base((*shape[:-1], 2 * shape[-1]))[..., ::2]
    if layout == "broadcast":
        return base((1, *shape[1:])).expand(shape)
    raise AssertionError(layout)


LAYOUTS_4D = st.sampled_from(["contiguous", "transposed", "sliced", "strided_last", "broadcast"])
LAYOUTS_2D = st.sampled_from(["contiguous", "transposed", "sliced", "strided_last"])


def _leaf(t: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """A leaf with t's values (and strides, unless converted to ``dtype``) that requires grad."""
    return None if t is None else t.detach().to(dtype or t.dtype).requires_grad_()


def _grads(outs, leaves, grads_out) -> list[torch.Tensor]:
    return list(torch.autograd.grad(outs, [t for t in leaves if t is not None], grads_out))


def _check_all(names, ours, ref64, pt) -> None:
    assert len(names) == len(ours) == len(ref64) == len(pt)
    for name, o, r, p in zip(names, ours, ref64, pt, strict=True):
        assert o.dtype == p.dtype, f"{name}: dtype {o.dtype} != {p.dtype}"
        assert torch.isfinite(o).all(), f"{name} has non-finite values"
        assert_close_2x(name, o, r, p)


# ---------------------------------------------------------------------------------------------------- attention


@st.composite
def attention_cases(draw, backend: str) -> dict:
    hkv = draw(st.integers(1, 2))
    d = draw(st.sampled_from([8, 16, 24, 40])) if backend == "triton" else draw(st.integers(1, 48))
    return dict(
        b=draw(st.integers(1, 2)),
        sq=draw(st.integers(1, 40)),
        sk=draw(st.integers(1, 40)),
        h=hkv * draw(st.sampled_from([1, 2])),  # MHA, GQA 2:1, MQA
        hkv=hkv,
        d=d,
        causal=draw(st.booleans()),
        mask=draw(st.sampled_from([None, "random", "lengths", "padded_row"])),
        mask_dtype=draw(st.sampled_from([torch.bool, torch.int32, torch.int64])),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0))),
        dtype=draw(DTYPES),
        layouts=draw(st.tuples(LAYOUTS_4D, LAYOUTS_4D, LAYOUTS_4D, LAYOUTS_4D)),  # q, k, v, grad of out
        seed=draw(SEEDS),
    )


def _key_padding_mask(gen: torch.Generator, kind: str | None, b: int, sk: int, dtype: torch.dtype):
    if kind is None:
        return None
    if kind == "lengths":  # a prefix of each row, possibly empty
        lens = torch.randint(0, sk + 1, (b,), generator=gen, device=DEVICE)
        keep = torch.arange(sk, device=DEVICE)[None] < lens[:, None]
    else:
        density = torch.rand((), generator=gen, device=DEVICE).item()
        keep = torch.rand(b, sk, generator=gen, device=DEVICE) < density
        if kind == "padded_row":
            keep[0] = False  # a batch row with no key at all
    return keep.to(dtype)


def _run_attention_case(c: dict, backend: str) -> None:
    gen = _gen(c["seed"])
    b, sq, sk, h, hkv, d, dtype = (c[n] for n in ("b", "sq", "sk", "h", "hkv", "d", "dtype"))
    lq, lk, lv, lg = c["layouts"]
    q = _leaf(_laid_out(gen, (b, sq, h, d), dtype, lq))
    k = _leaf(_laid_out(gen, (b, sk, hkv, d), dtype, lk))
    v = _leaf(_laid_out(gen, (b, sk, hkv, d), dtype, lv))
    g = _laid_out(gen, (b, sq, h, d), dtype, lg)
    mask = _key_padding_mask(gen, c["mask"], b, sk, c["mask_dtype"])
    kw = dict(causal=c["causal"], key_padding_mask=mask, softmax_scale=c["scale"])

    out = fastformer.attention(q, k, v, backend=backend, **kw)
    assert out.shape == (b, sq, h, d) and out.dtype == dtype
    ours = [out, *_grads(out, (q, k, v), g)]
    leaves64 = [_leaf(t, torch.float64) for t in (q, k, v)]
    ref = attention_reference(*leaves64, **kw)
    ref64 = [ref, *_grads(ref, leaves64, g.double())]
    leaves = [_leaf(t) for t in (q, k, v)]
    same = attention_reference(*leaves, upcast=False, **kw)
    pt = [same, *_grads(same, leaves, g)]
    _check_all([f"{backend} out", "dq", "dk", "dv"], ours, ref64, pt)

    # a query row that sees no key (padded batch row, or causal with Sq > Sk) is exactly 0 with zero dq
    i, j = torch.arange(sq, device=DEVICE)[:, None], torch.arange(sk, device=DEVICE)[None]
    vis = (j <= i + sk - sq if c["causal"] else torch.ones(sq, sk, dtype=torch.bool, device=DEVICE))[None]
    vis = vis.expand(b, sq, sk)
    if mask is not None:
        vis = vis & (mask != 0)[:, None, :]
    blind = ~vis.any(-1)  # (B, Sq)
    assert (out[blind] == 0).all() and (ours[1][blind] == 0).all()


@settings(FUZZ, max_examples=30)
@given(c=attention_cases("triton"))
def test_attention_triton_fuzz(c):
    """Triton attention over random shapes, GQA, Sq != Sk, causal, padding masks (some rows fully padded),
    softmax scales and strided q/k/v/grad layouts: out, dq, dk, dv within 2x of torch's error to float64."""
    _run_attention_case(c, "triton")


@settings(FUZZ, max_examples=40)
@given(c=attention_cases("torch"))
def test_attention_torch_fuzz(c):
    """The torch backend over the same space, with any head dimension 1..48."""
    _run_attention_case(c, "torch")


# ---------------------------------------------------------------------------------------------------- LayerNorm


@st.composite
def layer_norm_cases(draw) -> dict:
    return dict(
        lead=draw(st.lists(st.integers(1, 6), min_size=1, max_size=2)),
        n=draw(HIDDEN),
        weight=draw(st.booleans()),
        bias=draw(st.booleans()),
        eps=draw(st.sampled_from([1e-5, 1e-6, 1e-2])),
        scale=draw(st.sampled_from([1e-2, 1.0, 30.0])),
        offset=draw(st.sampled_from([0.0, 3.0])),
        residual=draw(st.booleans()),
        dtype=draw(DTYPES),
        layouts=draw(st.tuples(LAYOUTS_2D, LAYOUTS_2D, LAYOUTS_2D)),  # x, residual, grad of out
        seed=draw(SEEDS),
    )


def _layer_norm_inputs(c: dict):
    """(x, residual, weight, bias, grad of out, grad of s); x and residual (*lead, n) in the drawn layouts."""
    gen, dtype, n = _gen(c["seed"]), c["dtype"], c["n"]
    shape = (*c["lead"], n)

    def x_like(layout, scale=1.0, offset=0.0):
        # a 2-D layout of the flattened rows, viewed as (*lead, n) (splitting the row dim keeps the strides)
        return _laid_out(gen, (math.prod(c["lead"]), n), dtype, layout, scale, offset).view(shape)

    x = x_like(c["layouts"][0], c["scale"], c["offset"])
    r = x_like(c["layouts"][1]) if c["residual"] else None
    w = _randn(gen, (n,), dtype, 0.5, 1.0) if c["weight"] else None
    b = _randn(gen, (n,), dtype, 0.5) if c["bias"] else None
    g_out = x_like(c["layouts"][2])
    g_s = _randn(gen, shape, dtype)
    return x, r, w, b, g_out, g_s


def _run_layer_norm_case(c: dict, backend: str) -> None:
    x, _, w, b, g, _ = _layer_norm_inputs(c)
    n, eps = c["n"], c["eps"]
    leaves = [_leaf(t) for t in (x, w, b)]
    y = fastformer.layer_norm(leaves[0], n, leaves[1], leaves[2], eps, backend=backend)
    ours = [y, *_grads(y, leaves, g)]
    leaves64 = [_leaf(t, torch.float64) for t in (x, w, b)]
    y64 = F.layer_norm(leaves64[0], (n,), leaves64[1], leaves64[2], eps)
    ref64 = [y64, *_grads(y64, leaves64, g.double())]
    leaves = [_leaf(t) for t in (x, w, b)]
    yp = F.layer_norm(leaves[0], (n,), leaves[1], leaves[2], eps)
    pt = [yp, *_grads(yp, leaves, g)]
    names = ["out", "dx"] + ["dw"] * c["weight"] + ["db"] * c["bias"]
    _check_all([f"{backend} {name}" for name in names], ours, ref64, pt)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@settings(FUZZ, max_examples=25)
@given(c=layer_norm_cases())
def test_layer_norm_fuzz(backend, c):
    """layer_norm over 1-2 leading dims, hidden sizes 1..200 (primes included), optional weight and bias, several
    eps, input scales and offsets, strided x and grad: out, dx, dw, db within 2x of torch's error to float64."""
    _run_layer_norm_case(c, backend)


def _run_dropout_add_case(c: dict, backend: str) -> None:
    x, r, w, b, g_out, g_s = _layer_norm_inputs(c)
    n, eps = c["n"], c["eps"]
    leaves = [_leaf(t) for t in (x, r, w, b)]
    out, s = fastformer.dropout_add_layer_norm(*leaves, eps=eps, backend=backend)
    ours = [out, s, *_grads([out, s], leaves, [g_out, g_s])]
    results = []
    for dt in (torch.float64, c["dtype"]):
        ls = [_leaf(t, dt) for t in (x, r, w, b)]
        ss = ls[0] + ls[1] if ls[1] is not None else ls[0]
        o = F.layer_norm(ss, (n,), ls[2], ls[3], eps)
        results.append([o, ss, *_grads([o, ss], ls, [g_out.to(dt), g_s.to(dt)])])
    names = ["out", "s", "dx"] + ["dresidual"] * c["residual"] + ["dw"] * c["weight"] + ["db"] * c["bias"]
    _check_all([f"{backend} {name}" for name in names], ours, *results)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@settings(FUZZ, max_examples=25)
@given(c=layer_norm_cases())
def test_dropout_add_layer_norm_fuzz(backend, c):
    """dropout_add_layer_norm without dropout (with or without a residual): out, s and every gradient, with
    gradient flowing into both outputs, within 2x of torch's error to float64."""
    _run_dropout_add_case(c, backend)


# ------------------------------------------------------------------------------------------------------- linear


@st.composite
def linear_cases(draw) -> dict:
    return dict(
        lead=draw(st.lists(st.sampled_from([1, 2, 3, 5, 7, 13]), min_size=1, max_size=2)),
        k=draw(HIDDEN),
        n=draw(HIDDEN),
        activation=draw(st.sampled_from([None, "gelu", "gelu_tanh", "relu"])),
        bias=draw(st.booleans()),
        weight_layout=draw(st.sampled_from(["out_in", "in_out"])),
        recompute=draw(st.booleans()),
        dtype=draw(DTYPES),
        layouts=draw(st.tuples(LAYOUTS_2D, LAYOUTS_2D, LAYOUTS_2D)),  # x rows, weight, grad of out
        seed=draw(SEEDS),
    )


def _run_linear_case(c: dict, backend: str) -> None:
    gen, dtype, k, n, lead = _gen(c["seed"]), c["dtype"], c["k"], c["n"], tuple(c["lead"])
    rows = math.prod(lead)
    lx, lw, lg = c["layouts"]
    x = _laid_out(gen, (rows, k), dtype, lx).view(*lead, k)
    w_shape = (n, k) if c["weight_layout"] == "out_in" else (k, n)
    w = _laid_out(gen, w_shape, dtype, lw, scale=k**-0.5)
    b = _randn(gen, (n,), dtype) if c["bias"] else None
    g = _laid_out(gen, (rows, n), dtype, lg).view(*lead, n)
    act, layout = c["activation"], c["weight_layout"]

    leaves = [_leaf(t) for t in (x, w, b)]
    y = fastformer.linear(*leaves, act, weight_layout=layout, recompute=c["recompute"], backend=backend)
    assert y.shape == (*lead, n)
    ours = [y, *_grads(y, leaves, g)]
    leaves64 = [_leaf(t, torch.float64) for t in (x, w, b)]
    y64 = linear_reference(*leaves64, act, layout)
    ref64 = [y64, *_grads(y64, leaves64, g.double())]
    leaves = [_leaf(t) for t in (x, w, b)]
    yp = linear_reference(*leaves, act, layout)
    pt = [yp, *_grads(yp, leaves, g)]
    names = ["out", "dx", "dw"] + ["db"] * c["bias"]
    _check_all([f"{backend} {name}" for name in names], ours, ref64, pt)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@settings(FUZZ, max_examples=25)
@given(c=linear_cases())
def test_linear_fuzz(backend, c):
    """linear with every activation, optional bias, both weight layouts, recompute on/off and strided x, weight
    and grad, in/out features 1..200 (primes included): out, dx, dw, db within 2x of torch's error to float64."""
    _run_linear_case(c, backend)
