"""Bad-input sweep (issue 12): every public function against every kind of bad argument that applies.

A row is ``(id, callable, exception, match)`` (the refusal tables fix the exception to BackendError): the call must
raise ``exception`` (ValueError, TypeError or fastformer.BackendError) with a message matching ``match``, which names
the offending argument or, for a refusal, the backend and why. Every table but the fastformer.nn ones (whose
projections legitimately run before attention sees its inputs) runs with each backend's forward entry point replaced
by one that raises AssertionError("kernel ran"), so a check made only after a kernel launch fails its row. Op and
module rows run under backend="torch" and backend="triton" (the CPU interpreter; tests/conftest.py sets
TRITON_INTERPRET=1). Meta tensors are valid op inputs (shapes come back from the fake kernels); a meta tensor mixed
with cpu ones, or where values are needed, must be refused cleanly.

The sweep's first run found 71 distinct bugs (wrong exception types, messages not naming the argument, crashes,
checks after the kernels ran, or no error at all); all are fixed, and every row states the contract.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import traceback
from unittest import mock

import pytest
import torch
from torch import nn

import fastformer
from fastformer import BackendError, utils
from fastformer import nn as fnn
from fastformer.models import (
    GPT,
    BertConfig,
    BertForMaskedLM,
    BertForPreTraining,
    BertForSequenceClassification,
    BertModel,
    GPTConfig,
)

BACKENDS = ("torch", "triton")
INTERP = utils.interpreting()  # triton serves CPU tensors only in the interpreter
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
NAN, INF = float("nan"), float("inf")
ANY = (TypeError, ValueError)  # what a fixed bug may raise: either, as long as it names the argument
_PS = type(pytest.param(None))
_DEF = object()  # "the valid default" in the call helpers below

needs_interp = pytest.mark.skipif(not INTERP, reason="triton serves CPU tensors only under TRITON_INTERPRET=1")
needs_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="fastformer.patch imports transformers")


def _rows(table):
    return [row if isinstance(row, _PS) else pytest.param(*row[1:], id=row[0]) for row in table]


def _one_line(call):
    """``call()``; any exception becomes a one-line failure (type, message, where it was raised) without a traceback.

    pytest formats the traceback of every failing and xfailing test by re-parsing each frame's source file, which
    for the dozens of expected library bugs here costs far more than the calls themselves."""
    try:
        return call()
    except (Exception, pytest.fail.Exception) as e:
        at = traceback.extract_tb(e.__traceback__)[-1]
        pytest.fail(f"{type(e).__name__}: {e} (raised at {at.filename}:{at.lineno} in {at.name})", pytrace=False)


def _expect(call, exc, match):
    """``call()`` must raise ``exc`` matching ``match``; anything else fails in one line (see ``_one_line``)."""

    def check():
        with pytest.raises(exc, match=match):
            call()

    _one_line(check)


@pytest.fixture
def no_kernels(monkeypatch):
    """Every backend's forward entry point raises: a row passes only if the error comes before any kernel."""
    from fastformer.ops.attention import cuda_impl as att_cuda
    from fastformer.ops.attention import torch_impl as att_torch
    from fastformer.ops.attention import triton_impl as att_triton
    from fastformer.ops.ffn import cuda_impl as ffn_cuda
    from fastformer.ops.ffn import torch_impl as ffn_torch
    from fastformer.ops.ffn import triton_impl as ffn_triton
    from fastformer.ops.layer_norm import cuda_impl as ln_cuda
    from fastformer.ops.layer_norm import torch_impl as ln_torch
    from fastformer.ops.layer_norm import triton_impl as ln_triton

    def ran(*_a, **_k):
        raise AssertionError("kernel ran")

    for mod in (att_torch, att_triton, att_cuda, ln_torch, ln_triton, ln_cuda):
        monkeypatch.setattr(mod, "fwd", ran)
    for mod in (ffn_torch, ffn_triton, ffn_cuda):
        monkeypatch.setattr(mod, "gemm", ran)
    monkeypatch.delenv("FASTFORMER_BACKEND", raising=False)


# --- call helpers: a valid tiny call of each op, with any argument replaced by keyword


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(shape).to(dtype=dtype, device=device)


def _m(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def _cu(*values, dtype=torch.int32, device="cpu"):
    return torch.tensor(values, dtype=dtype, device=device)


def _bool(*shape, device="cpu"):
    return torch.ones(shape, dtype=torch.bool, device=device)


def att(be, q=_DEF, k=_DEF, v=_DEF, **kw):
    """attention on q (1, 4, 2, 8), k = v (1, 4, 1, 8) (GQA 2:1)."""
    q = _t(1, 4, 2, 8) if q is _DEF else q
    k = _t(1, 4, 1, 8) if k is _DEF else k
    v = _t(1, 4, 1, 8) if v is _DEF else v
    return fastformer.attention(q, k, v, backend=be, **kw)


def varlen(be, q=_DEF, k=_DEF, v=_DEF, cu_q=_DEF, cu_k=_DEF, max_q=4, max_k=4, **kw):
    """attention_varlen on two packed sequences of lengths 2 and 4 (6 tokens, 2 query heads, 1 kv head)."""
    q = _t(6, 2, 8) if q is _DEF else q
    k = _t(6, 1, 8) if k is _DEF else k
    v = _t(6, 1, 8) if v is _DEF else v
    cu_q = _cu(0, 2, 6) if cu_q is _DEF else cu_q
    cu_k = _cu(0, 2, 6) if cu_k is _DEF else cu_k
    return fastformer.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, backend=be, **kw)


def sdpa(be, q=_DEF, k=_DEF, v=_DEF, **kw):
    """scaled_dot_product_attention on (1, 2, 4, 8) tensors; it takes no backend=, so it runs under use_backend."""
    q = _t(1, 2, 4, 8) if q is _DEF else q
    k = _t(1, 2, 4, 8) if k is _DEF else k
    v = _t(1, 2, 4, 8) if v is _DEF else v
    with fastformer.use_backend(be):
        return fastformer.scaled_dot_product_attention(q, k, v, **kw)


def ln(be, x=_DEF, shape=8, w=_DEF, b=_DEF, eps=1e-5):
    """layer_norm of (2, 3, 8) over the last dimension."""
    x = _t(2, 3, 8) if x is _DEF else x
    w = _t(8) if w is _DEF else w
    b = _t(8) if b is _DEF else b
    return fastformer.layer_norm(x, shape, w, b, eps, backend=be)


def dal(be, x=_DEF, residual=_DEF, w=_DEF, b=_DEF, **kw):
    """dropout_add_layer_norm of (2, 3, 8) with a residual."""
    x = _t(2, 3, 8) if x is _DEF else x
    residual = _t(2, 3, 8) if residual is _DEF else residual
    w = _t(8) if w is _DEF else w
    b = _t(8) if b is _DEF else b
    return fastformer.dropout_add_layer_norm(x, residual, w, b, backend=be, **kw)


def lin(be, x=_DEF, w=_DEF, b=_DEF, activation="gelu", **kw):
    """linear (2, 3, 8) -> (2, 3, 16)."""
    x = _t(2, 3, 8) if x is _DEF else x
    w = _t(16, 8) if w is _DEF else w
    b = _t(16) if b is _DEF else b
    return fastformer.linear(x, w, b, activation, backend=be, **kw)


def ffn(be, x=_DEF, w1=_DEF, b1=_DEF, w2=_DEF, b2=_DEF, activation="gelu", dropout_p=0.0, **kw):
    """feed_forward (2, 3, 8) -> 16 -> 8."""
    x = _t(2, 3, 8) if x is _DEF else x
    w1 = _t(16, 8) if w1 is _DEF else w1
    b1 = _t(16) if b1 is _DEF else b1
    w2 = _t(8, 16) if w2 is _DEF else w2
    b2 = _t(8) if b2 is _DEF else b2
    return fastformer.feed_forward(x, w1, b1, w2, b2, activation, dropout_p, backend=be, **kw)


# --- the op-level table: (id, fn(backend), exception, match); run under each backend with the kernels disabled

_SDPA_PASSTHROUGH = "scaled_dot_product_attention hands input torch rejects to torch, whose error is a RuntimeError"

# fmt: off
OP_CASES = [
    # attention: rank, shape
    ("attention-q-rank3", lambda be: att(be, q=_t(4, 2, 8)), ValueError, r"^q must be 4-D"),
    ("attention-q-rank5", lambda be: att(be, q=_t(1, 4, 2, 8, 1)), ValueError, r"^q must be 4-D"),
    ("attention-k-rank3", lambda be: att(be, k=_t(4, 1, 8)), ValueError, r"^k must be 4-D"),
    ("attention-v-shape", lambda be: att(be, v=_t(1, 3, 1, 8)), ValueError, r"^k and v must have the same shape"),
    ("attention-k-batch", lambda be: att(be, k=_t(2, 4, 1, 8), v=_t(2, 4, 1, 8)), ValueError, r"^k: batch size"),
    ("attention-k-headdim", lambda be: att(be, k=_t(1, 4, 1, 16), v=_t(1, 4, 1, 16)), ValueError, r"^k: head dim"),
    ("attention-kv-heads", lambda be: att(be, q=_t(1, 4, 3, 8), k=_t(1, 4, 2, 8), v=_t(1, 4, 2, 8)), ValueError,
     r"^k: number of kv heads \(2\) must divide"),
    ("attention-headdim-0", lambda be: att(be, q=_t(1, 4, 2, 0), k=_t(1, 4, 1, 0), v=_t(1, 4, 1, 0)), ValueError,
     r"^q: head dimension must be at least 1"),
    # attention: dtype
    ("attention-q-int", lambda be: att(be, *(_t(1, 4, 2, 8, dtype=torch.long),) * 3), TypeError, r"^q must have"),
    ("attention-q-complex", lambda be: att(be, *(_t(1, 4, 2, 8, dtype=torch.complex64),) * 3), TypeError,
     r"^q must have a floating dtype"),
    ("attention-k-half", lambda be: att(be, k=_t(1, 4, 1, 8, dtype=torch.half)), TypeError, r"^k has dtype"),
    ("attention-v-half", lambda be: att(be, v=_t(1, 4, 1, 8, dtype=torch.half)), TypeError, r"^v has dtype"),
    # attention: Python types and None
    ("attention-q-str", lambda be: att(be, q="q"), TypeError, r"^q must be a torch.Tensor"),
    ("attention-q-list", lambda be: att(be, q=[[1.0]]), TypeError, r"^q must be a torch.Tensor"),
    ("attention-q-None", lambda be: att(be, q=None), TypeError, r"^q must be a torch.Tensor"),
    ("attention-k-None", lambda be: att(be, k=None), TypeError, r"^k must be a torch.Tensor"),
    # attention: devices
    ("attention-k-meta", lambda be: att(be, k=_m(1, 4, 1, 8)), ValueError, r"^k is on meta but q is on cpu"),
    ("attention-v-meta", lambda be: att(be, v=_m(1, 4, 1, 8)), ValueError, r"^v is on meta but q is on cpu"),
    ("attention-q-meta", lambda be: att(be, q=_m(1, 4, 2, 8)), ValueError, r"^k is on cpu but q is on meta"),
    # attention: key_padding_mask
    ("attention-mask-shape", lambda be: att(be, key_padding_mask=_bool(1, 3)), ValueError,
     r"^key_padding_mask must have shape"),
    ("attention-mask-rank1", lambda be: att(be, key_padding_mask=_bool(4)), ValueError,
     r"^key_padding_mask must have shape"),
    ("attention-mask-float", lambda be: att(be, key_padding_mask=torch.ones(1, 4)), TypeError,
     r"^key_padding_mask must be bool or integer"),
    ("attention-mask-complex", lambda be: att(be, key_padding_mask=torch.ones(1, 4, dtype=torch.complex64)),
     TypeError, r"^key_padding_mask must be bool or integer"),
    ("attention-mask-list", lambda be: att(be, key_padding_mask=[[True] * 4]), TypeError,
     r"^key_padding_mask must be a torch.Tensor"),
    ("attention-mask-meta", lambda be: att(be, key_padding_mask=_bool(1, 4, device="meta")), ValueError,
     r"^key_padding_mask is on meta but q is on cpu"),
    # attention: scalars
    ("attention-dropout-1", lambda be: att(be, dropout_p=1.0), ValueError, r"^dropout_p must be in \[0, 1\)"),
    ("attention-dropout-neg", lambda be: att(be, dropout_p=-0.1), ValueError, r"^dropout_p must be in \[0, 1\)"),
    ("attention-dropout-nan", lambda be: att(be, dropout_p=NAN), ValueError, r"^dropout_p must be in \[0, 1\)"),
    ("attention-dropout-str", lambda be: att(be, dropout_p="0.1"), TypeError, r"^dropout_p must be a float"),
    ("attention-dropout-None", lambda be: att(be, dropout_p=None), TypeError, r"^dropout_p must be a float"),
    ("attention-scale-str", lambda be: att(be, softmax_scale="x"), TypeError, r"^softmax_scale must be a float"),
    ("attention-scale-tensor", lambda be: att(be, softmax_scale=torch.tensor(0.5)), TypeError,
     r"^softmax_scale must be a float"),
    # attention_varlen
    ("varlen-q-rank4", lambda be: varlen(be, q=_t(1, 6, 2, 8)), ValueError, r"^q must be 3-D"),
    ("varlen-k-dtype", lambda be: varlen(be, k=_t(6, 1, 8, dtype=torch.half)), TypeError, r"^k has dtype"),
    ("varlen-cu-float", lambda be: varlen(be, cu_q=_cu(0.0, 2.0, 6.0, dtype=torch.float32)), TypeError,
     r"^cu_seqlens_q must be int32 or int64"),
    ("varlen-cu-bool", lambda be: varlen(be, cu_k=_cu(0, 1, 1, dtype=torch.bool)), TypeError,
     r"^cu_seqlens_k must be int32 or int64"),
    ("varlen-cu-rank2", lambda be: varlen(be, cu_q=_cu([0, 2, 6])), ValueError, r"^cu_seqlens_q must be 1-D"),
    ("varlen-cu-empty", lambda be: varlen(be, cu_q=_cu(), cu_k=_cu()), ValueError, r"^cu_seqlens_q must be 1-D"),
    ("varlen-cu-list", lambda be: varlen(be, cu_q=[0, 2, 6]), TypeError, r"^cu_seqlens_q must be a torch.Tensor"),
    ("varlen-cu-None", lambda be: varlen(be, cu_k=None), TypeError, r"^cu_seqlens_k must be a torch.Tensor"),
    ("varlen-cu-meta", lambda be: varlen(be, cu_q=_cu(0, 2, 6, device="meta")), ValueError,
     r"^cu_seqlens_q is on meta but q is on cpu"),
    ("varlen-cu-lengths", lambda be: varlen(be, cu_k=_cu(0, 6)), ValueError,
     r"^cu_seqlens_q and cu_seqlens_k must have the same length"),
    ("varlen-cu-decreasing", lambda be: varlen(be, cu_q=_cu(0, 4, 2)), ValueError,
     r"^cu_seqlens_q must start at 0 and be non-decreasing"),
    ("varlen-cu-not-from-0", lambda be: varlen(be, cu_k=_cu(1, 2, 6)), ValueError,
     r"^cu_seqlens_k must start at 0 and be non-decreasing"),
    ("varlen-cu-single-not-0", lambda be: varlen(be, cu_q=_cu(3), cu_k=_cu(3)), ValueError,
     r"^cu_seqlens_q\[0\] must be 0"),
    ("varlen-cu-exceeds-q", lambda be: varlen(be, cu_q=_cu(0, 2, 7), max_q=5), ValueError,
     r"^cu_seqlens_q\[-1\] = 7 exceeds the 6 packed tokens"),
    ("varlen-cu-exceeds-k", lambda be: varlen(be, cu_k=_cu(0, 3, 9), max_k=6), ValueError,
     r"^cu_seqlens_k\[-1\] = 9 exceeds the 6 packed tokens"),
    ("varlen-max-q-small", lambda be: varlen(be, max_q=3), ValueError, r"^max_seqlen_q = 3 is smaller"),
    ("varlen-max-k-small", lambda be: varlen(be, max_k=0), ValueError, r"^max_seqlen_k = 0 is smaller"),
    ("varlen-max-negative", lambda be: varlen(be, max_q=-1), ValueError, r"^max_seqlen_q must be a non-negative int"),
    ("varlen-max-float", lambda be: varlen(be, max_q=4.0), ValueError, r"^max_seqlen_q must be a non-negative int"),
    ("varlen-max-str", lambda be: varlen(be, max_k="4"), ValueError, r"^max_seqlen_k must be a non-negative int"),
    ("varlen-max-None", lambda be: varlen(be, max_q=None), ValueError, r"^max_seqlen_q must be a non-negative int"),
    ("varlen-dropout-1", lambda be: varlen(be, dropout_p=1.0), ValueError, r"^dropout_p must be in \[0, 1\)"),
    ("varlen-scale-str", lambda be: varlen(be, softmax_scale="x"), TypeError, r"^softmax_scale must be a float"),
    # scaled_dot_product_attention: fastformer's own checks
    ("sdpa-query-str", lambda be: sdpa(be, q="q"), TypeError, r"argument 'query'"),
    ("sdpa-key-None", lambda be: sdpa(be, k=None), TypeError, r"argument 'key'"),
    ("sdpa-key-meta", lambda be: sdpa(be, k=_m(1, 2, 4, 8)), ValueError, r"^k is on meta but q is on cpu"),
    ("sdpa-dropout-1", lambda be: sdpa(be, dropout_p=1.0), ValueError, r"^dropout_p must be in \[0, 1\)"),
    ("sdpa-dropout-neg", lambda be: sdpa(be, dropout_p=-0.1), ValueError, r"^dropout_p must be in \[0, 1\)"),
    ("sdpa-dropout-nan", lambda be: sdpa(be, dropout_p=NAN), ValueError, r"^dropout_p must be in \[0, 1\)"),
    ("sdpa-scale-str", lambda be: sdpa(be, scale="x"), TypeError, r"scale must be a float"),
    ("sdpa-k-v-seqlen-mismatch", lambda be: sdpa(be, v=_t(1, 2, 5, 8)), ValueError, r"value|key"),
    ("sdpa-attn-mask-meta", lambda be: sdpa(be, attn_mask=_bool(1, 1, 1, 4, device="meta")), ValueError,
         r"attn_mask.*meta"),
    ("sdpa-dtype-mismatch", lambda be: sdpa(be, k=_t(1, 2, 4, 8, dtype=torch.half)), TypeError, r"key"),
    ("sdpa-int", lambda be: sdpa(be, *(_t(1, 2, 4, 8, dtype=torch.long),) * 3), TypeError, r"query"),
    ("sdpa-headdim-mismatch", lambda be: sdpa(be, k=_t(1, 2, 4, 16), v=_t(1, 2, 4, 16)), ValueError, r"key"),
    ("sdpa-rank1", lambda be: sdpa(be, _t(8), _t(8), _t(8)), ValueError, r"query"),
    # layer_norm
    ("layer_norm-input-int", lambda be: ln(be, x=_t(2, 3, 8, dtype=torch.long)), TypeError, r"^input must have"),
    ("layer_norm-input-complex", lambda be: ln(be, x=_t(2, 3, 8, dtype=torch.complex64)), TypeError,
     r"^input must have a floating dtype"),
    ("layer_norm-input-str", lambda be: ln(be, x="x"), TypeError, r"^input must be a torch.Tensor"),
    ("layer_norm-input-None", lambda be: ln(be, x=None), TypeError, r"^input must be a torch.Tensor"),
    ("layer_norm-input-0d", lambda be: ln(be, x=_t(), shape=1, w=None, b=None), ValueError,
     r"^normalized_shape \(1,\) does not match the trailing dimensions of input"),
    ("layer_norm-shape-mismatch", lambda be: ln(be, shape=4, w=None, b=None), ValueError,
     r"^normalized_shape \(4,\) does not match"),
    ("layer_norm-shape-0", lambda be: ln(be, shape=0), ValueError, r"^normalized_shape must be non-empty"),
    ("layer_norm-shape-negative", lambda be: ln(be, shape=-8), ValueError, r"^normalized_shape must be non-empty"),
    ("layer_norm-shape-empty", lambda be: ln(be, shape=()), ValueError, r"^normalized_shape must be non-empty"),
    ("layer_norm-shape-float", lambda be: ln(be, shape=8.0), ANY, r"normalized_shape"),
    ("layer_norm-shape-None", lambda be: ln(be, shape=None), ANY, r"normalized_shape"),
    ("layer_norm-shape-str", lambda be: ln(be, shape="8"), TypeError, r"normalized_shape"),
    ("layer_norm-shape-list-of-str", lambda be: ln(be, shape=["a"]), ANY, r"normalized_shape"),
    ("layer_norm-weight-shape", lambda be: ln(be, w=_t(4)), ValueError, r"^weight must have shape \(8,\)"),
    ("layer_norm-bias-shape", lambda be: ln(be, b=_t(8, 1)), ValueError, r"^bias must have shape \(8,\)"),
    ("layer_norm-weight-int", lambda be: ln(be, w=torch.ones(8, dtype=torch.long)), TypeError,
     r"^weight must have a floating dtype"),
    ("layer_norm-bias-complex", lambda be: ln(be, b=torch.ones(8, dtype=torch.complex64)), TypeError,
     r"^bias must have a floating dtype"),
    ("layer_norm-weight-list", lambda be: ln(be, w=[1.0] * 8), TypeError, r"^weight must be a torch.Tensor"),
    ("layer_norm-weight-meta", lambda be: ln(be, w=_m(8)), ValueError, r"^weight is on meta but input is on cpu"),
    ("layer_norm-bias-meta", lambda be: ln(be, b=_m(8)), ValueError, r"^bias is on meta but input is on cpu"),
    ("layer_norm-input-meta", lambda be: ln(be, x=_m(2, 3, 8)), ValueError, r"^weight is on cpu but input is on meta"),
    ("layer_norm-eps-negative", lambda be: ln(be, eps=-1e-5), ValueError, r"^eps must be a finite number >= 0"),
    ("layer_norm-eps-nan", lambda be: ln(be, eps=NAN), ValueError, r"^eps must be a finite number >= 0"),
    ("layer_norm-eps-inf", lambda be: ln(be, eps=INF), ValueError, r"^eps must be a finite number >= 0"),
    ("layer_norm-eps-str", lambda be: ln(be, eps="1e-5"), TypeError, r"^eps must be a float"),
    ("layer_norm-eps-None", lambda be: ln(be, eps=None), TypeError, r"^eps must be a float"),
    # dropout_add_layer_norm
    ("dal-x-int", lambda be: dal(be, x=_t(2, 3, 8, dtype=torch.int32)), TypeError, r"^x must have a floating dtype"),
    ("dal-x-complex", lambda be: dal(be, x=_t(2, 3, 8, dtype=torch.complex64)), TypeError, r"^x must have a float"),
    ("dal-x-str", lambda be: dal(be, x="x"), TypeError, r"^x must be a torch.Tensor"),
    ("dal-x-0d", lambda be: dal(be, x=_t(), residual=None, w=None, b=None), ValueError,
     r"^x must have at least one dimension"),
    ("dal-residual-shape", lambda be: dal(be, residual=_t(2, 3, 4)), ValueError, r"^residual must have the shape"),
    ("dal-residual-dtype", lambda be: dal(be, residual=_t(2, 3, 8, dtype=torch.half)), TypeError,
     r"^residual has dtype"),
    ("dal-residual-meta", lambda be: dal(be, residual=_m(2, 3, 8)), ValueError, r"^residual is on meta but x is"),
    ("dal-residual-list", lambda be: dal(be, residual=[1.0]), TypeError, r"^residual must be a torch.Tensor"),
    ("dal-weight-shape", lambda be: dal(be, w=_t(4)), ValueError, r"^weight must have shape \(8,\)"),
    ("dal-bias-int", lambda be: dal(be, b=torch.ones(8, dtype=torch.long)), TypeError, r"^bias must have a float"),
    ("dal-weight-meta", lambda be: dal(be, w=_m(8)), ValueError, r"^weight is on meta"),
    ("dal-dropout-1", lambda be: dal(be, dropout_p=1.0), ValueError, r"^dropout_p must be in \[0, 1\)"),
    ("dal-dropout-1-eval", lambda be: dal(be, dropout_p=1.0, training=False), ValueError, r"^dropout_p must be in"),
    ("dal-dropout-neg", lambda be: dal(be, dropout_p=-0.1), ValueError, r"^dropout_p must be in \[0, 1\)"),
    ("dal-dropout-nan", lambda be: dal(be, dropout_p=NAN), ValueError, r"^dropout_p must be in \[0, 1\)"),
    ("dal-dropout-str", lambda be: dal(be, dropout_p="0"), TypeError, r"^dropout_p must be a float"),
    ("dal-eps-negative", lambda be: dal(be, eps=-1.0), ValueError, r"^eps must be a finite number >= 0"),
    ("dal-eps-nan", lambda be: dal(be, eps=NAN), ValueError, r"^eps must be a finite number >= 0"),
    ("dal-eps-inf", lambda be: dal(be, eps=INF), ValueError, r"^eps must be a finite number >= 0"),
    # linear
    ("linear-x-int", lambda be: lin(be, x=_t(2, 3, 8, dtype=torch.long)), TypeError, r"^x must have a floating"),
    ("linear-x-complex", lambda be: lin(be, x=_t(2, 3, 8, dtype=torch.complex64)), TypeError, r"^x must have a"),
    ("linear-x-0d", lambda be: lin(be, x=_t()), ValueError, r"^x must have at least 1 dimension"),
    ("linear-x-str", lambda be: lin(be, x="x"), TypeError, r"^x must be a torch.Tensor"),
    ("linear-x-meta", lambda be: lin(be, x=_m(2, 3, 8)), ValueError, r"^weight is on cpu but x is on meta"),
    ("linear-weight-None", lambda be: lin(be, w=None), TypeError, r"^weight must be a torch.Tensor"),
    ("linear-weight-list", lambda be: lin(be, w=[[1.0] * 8] * 16), TypeError, r"^weight must be a torch.Tensor"),
    ("linear-weight-rank1", lambda be: lin(be, w=_t(8), b=None), ValueError, r"^weight must be 2-D"),
    ("linear-weight-in-features", lambda be: lin(be, w=_t(16, 4)), ValueError, r"^weight has in_features 4"),
    ("linear-weight-layout-in-out", lambda be: lin(be, weight_layout="in_out"), ValueError,
     r"^weight has in_features 16 .* read as \(in_features, out_features\)"),
    ("linear-weight-half", lambda be: lin(be, w=_t(16, 8, dtype=torch.half)), TypeError, r"^weight has dtype"),
    ("linear-weight-int", lambda be: lin(be, w=torch.ones(16, 8, dtype=torch.long)), TypeError, r"^weight must have"),
    ("linear-weight-meta", lambda be: lin(be, w=_m(16, 8)), ValueError, r"^weight is on meta but x is on cpu"),
    ("linear-bias-shape", lambda be: lin(be, b=_t(8)), ValueError, r"^bias must have shape \(16,\)"),
    ("linear-bias-rank2", lambda be: lin(be, b=_t(1, 16)), ValueError, r"^bias must have shape \(16,\)"),
    ("linear-bias-half", lambda be: lin(be, b=_t(16, dtype=torch.half)), TypeError, r"^bias has dtype"),
    ("linear-bias-meta", lambda be: lin(be, b=_m(16)), ValueError, r"^bias is on meta but x is on cpu"),
    ("linear-bias-str", lambda be: lin(be, b="b"), TypeError, r"^bias must be a torch.Tensor"),
    ("linear-activation-unknown", lambda be: lin(be, activation="swish"), ValueError, r"^activation: unknown"),
    ("linear-activation-int", lambda be: lin(be, activation=3), TypeError, r"^activation must be None or a str"),
    ("linear-layout-unknown", lambda be: lin(be, weight_layout="io"), ValueError, r"^weight_layout must be one of"),
    ("linear-layout-None", lambda be: lin(be, weight_layout=None), ValueError, r"^weight_layout must be one of"),
    ("linear-dropout-1", lambda be: lin(be, dropout_p=1.0), ValueError, r"^dropout_p must be in \[0, 1\)"),
    ("linear-dropout-neg", lambda be: lin(be, dropout_p=-0.1), ValueError, r"^dropout_p must be in \[0, 1\)"),
    ("linear-dropout-nan", lambda be: lin(be, dropout_p=NAN), ValueError, r"^dropout_p must be in \[0, 1\)"),
    ("linear-dropout-str", lambda be: lin(be, dropout_p="0.1"), TypeError, r"^dropout_p must be a float"),
    # feed_forward
    ("ffn-x-int", lambda be: ffn(be, x=_t(2, 3, 8, dtype=torch.int32)), TypeError, r"^x must have a floating dtype"),
    ("ffn-x-None", lambda be: ffn(be, x=None), TypeError, r"^x must be a torch.Tensor"),
    ("ffn-w1-in-features", lambda be: ffn(be, w1=_t(16, 4)), ValueError, r"^w1 has in_features 4"),
    ("ffn-b1-shape", lambda be: ffn(be, b1=_t(8)), ValueError, r"^b1 must have shape \(16,\)"),
    ("ffn-w2-in-features", lambda be: ffn(be, w2=_t(8, 12)), ValueError,
     r"^w2 has in_features 12 .* but w1's out_features \(d_ff\) is 16"),
    ("ffn-w2-rank1", lambda be: ffn(be, w2=_t(16)), ValueError, r"^w2 must be 2-D"),
    ("ffn-w2-str", lambda be: ffn(be, w2="w2"), TypeError, r"^w2 must be a torch.Tensor"),
    ("ffn-w2-half", lambda be: ffn(be, w2=_t(8, 16, dtype=torch.half)), TypeError, r"^w2 has dtype"),
    ("ffn-w2-meta", lambda be: ffn(be, w2=_m(8, 16)), ValueError, r"^w2 is on meta but x is on cpu"),
    ("ffn-b2-shape", lambda be: ffn(be, b2=_t(16)), ValueError, r"^b2 must have shape \(8,\)"),
    ("ffn-b2-meta", lambda be: ffn(be, b2=_m(8)), ValueError, r"^b2 is on meta but x is on cpu"),
    ("ffn-b2-int", lambda be: ffn(be, b2=torch.ones(8, dtype=torch.long)), TypeError, r"^b2 must have a floating"),
    ("ffn-w2-None", lambda be: ffn(be, w2=None), TypeError, r"w2"),
    ("ffn-activation-unknown", lambda be: ffn(be, activation="swish"), ValueError, r"^activation: unknown"),
    ("ffn-dropout-1", lambda be: ffn(be, dropout_p=1.0), ValueError, r"^dropout_p must be in \[0, 1\)"),
    ("ffn-dropout-neg", lambda be: ffn(be, dropout_p=-0.1), ValueError, r"^dropout_p must be in \[0, 1\)"),
    ("ffn-dropout-nan", lambda be: ffn(be, dropout_p=NAN), ValueError, r"^dropout_p must be in \[0, 1\)"),
    ("ffn-layout-unknown", lambda be: ffn(be, weight_layout="io"), ValueError, r"^weight_layout must be one of"),
]
# fmt: on


@pytest.mark.usefixtures("no_kernels")
@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("fn,exc,match", _rows(OP_CASES))
def test_op_rejects_bad_input_before_any_kernel(fn, exc, match, be):
    _expect(lambda: fn(be), exc, match)


# --- named backends that cannot serve a call: a BackendError saying why (checked before any kernel too)


def _triton(id_, fn, match):
    return pytest.param(fn, match, marks=needs_interp, id=id_)


def _refuse(op, backend, why):
    return rf"^{op}: backend '{backend}' cannot serve this call: .*{why}"


# fmt: off
REFUSALS = [
    ("attention-cuda-cpu", lambda: att("cuda"), _refuse("attention", "cuda", "needs CUDA tensors")),
    _triton("attention-triton-bf16-cpu", lambda: att("triton", *(_t(1, 4, 2, 8, dtype=torch.bfloat16),) * 3),
            _refuse("attention", "triton", "bfloat16")),
    _triton("attention-triton-float64", lambda: att("triton", *(_t(1, 4, 2, 8, dtype=torch.float64),) * 3),
            _refuse("attention", "triton", "float64 is served by the torch backend only")),
    _triton("attention-triton-headdim-12", lambda: att("triton", *(_t(1, 4, 2, 12),) * 3),
            _refuse("attention", "triton", "head dimension 12 is not supported")),
    _triton("attention-triton-headdim-264", lambda: att("triton", *(_t(1, 2, 1, 264),) * 3),
            _refuse("attention", "triton", "head dimension 264 is not supported")),
    _triton("attention-triton-scale-0", lambda: att("triton", softmax_scale=0.0),
            _refuse("attention", "triton", "positive finite scale")),
    _triton("attention-triton-scale-nan", lambda: att("triton", softmax_scale=NAN),
            _refuse("attention", "triton", "positive finite scale")),
    ("varlen-cuda-cpu", lambda: varlen("cuda"), _refuse("attention_varlen", "cuda", "needs CUDA tensors")),
    _triton("varlen-triton-float64", lambda: varlen("triton", *(_t(6, 2, 8, dtype=torch.float64),) * 3),
            _refuse("attention_varlen", "triton", "float64")),
    _triton("varlen-triton-headdim-12", lambda: varlen("triton", *(_t(6, 2, 12),) * 3),
            _refuse("attention_varlen", "triton", "head dimension 12")),
    _triton("varlen-triton-scale-inf", lambda: varlen("triton", softmax_scale=INF),
            _refuse("attention_varlen", "triton", "positive finite scale")),
    ("sdpa-cuda-cpu", lambda: sdpa("cuda"), _refuse("attention", "cuda", "needs CUDA tensors")),
    ("sdpa-cuda-3d", lambda: sdpa("cuda", *(_t(2, 4, 8),) * 3),
     _refuse("scaled_dot_product_attention", "cuda", "only 4-D")),
    ("sdpa-triton-3d", lambda: sdpa("triton", *(_t(2, 4, 8),) * 3),
     _refuse("scaled_dot_product_attention", "triton", "only 4-D")),
    ("sdpa-triton-float64", lambda: sdpa("triton", *(_t(1, 2, 4, 8, dtype=torch.float64),) * 3),
     _refuse("scaled_dot_product_attention", "triton", "float64 is not fused")),
    ("sdpa-triton-headdim-12", lambda: sdpa("triton", *(_t(1, 2, 4, 12),) * 3),
     _refuse("scaled_dot_product_attention", "triton", "head dimension 12 is not supported by the fused")),
    ("sdpa-triton-float-mask", lambda: sdpa("triton", attn_mask=torch.zeros(1, 1, 1, 4)),
     _refuse("scaled_dot_product_attention", "triton", "non-boolean attn_mask")),
    ("sdpa-triton-causal-and-mask", lambda: sdpa("triton", attn_mask=_bool(1, 1, 1, 4), is_causal=True),
     _refuse("scaled_dot_product_attention", "triton", "is_causal together with attn_mask")),
    ("sdpa-triton-causal-sq-ne-sk", lambda: sdpa("triton", q=_t(1, 2, 3, 8), is_causal=True),
     _refuse("scaled_dot_product_attention", "triton", "top-left aligned")),
    _triton("sdpa-triton-bf16-cpu", lambda: sdpa("triton", *(_t(1, 2, 4, 8, dtype=torch.bfloat16),) * 3),
            _refuse("attention", "triton", "bfloat16")),
    ("layer_norm-cuda-cpu", lambda: ln("cuda"), _refuse("layer_norm", "cuda", "needs CUDA tensors")),
    _triton("layer_norm-triton-bf16-cpu", lambda: ln("triton", x=_t(2, 8, dtype=torch.bfloat16), w=None, b=None),
            _refuse("layer_norm", "triton", "bfloat16")),
    _triton("layer_norm-triton-float64", lambda: ln("triton", x=_t(2, 8, dtype=torch.float64), w=None, b=None),
            _refuse("layer_norm", "triton", "float64 is served by the torch backend only")),
    _triton("layer_norm-triton-row-65537", lambda: ln("triton", x=_t(1, 65537), shape=65537, w=None, b=None),
            _refuse("layer_norm", "triton", "rows longer than 65536")),
    ("dal-cuda-cpu", lambda: dal("cuda"), _refuse("layer_norm", "cuda", "needs CUDA tensors")),
    _triton("dal-triton-float64", lambda: dal("triton", *(_t(2, 8, dtype=torch.float64),) * 2, w=None, b=None),
            _refuse("layer_norm", "triton", "float64")),
    ("linear-cuda-cpu", lambda: lin("cuda"), _refuse("linear", "cuda", "needs CUDA tensors")),
    _triton("linear-triton-float64", lambda: lin("triton", x=_t(2, 8, dtype=torch.float64),
            w=_t(16, 8, dtype=torch.float64), b=None), _refuse("linear", "triton", "float64")),
    _triton("linear-triton-bf16-cpu", lambda: lin("triton", x=_t(2, 8, dtype=torch.bfloat16),
            w=_t(16, 8, dtype=torch.bfloat16), b=None), _refuse("linear", "triton", "bfloat16")),
    ("ffn-cuda-cpu", lambda: ffn("cuda"), _refuse("feed_forward", "cuda", "needs CUDA tensors")),
    _triton("ffn-triton-float64", lambda: ffn("triton", *(_t(*s, dtype=torch.float64) for s in
            ((2, 8), (16, 8), (16,), (8, 16), (8,)))), _refuse("feed_forward", "triton", "float64")),
]
# fmt: on


@pytest.mark.usefixtures("no_kernels")
@pytest.mark.parametrize("fn,match", _rows(REFUSALS))
def test_named_backend_refuses_with_the_reason(fn, match):
    _expect(fn, BackendError, match)


# --- meta tensors are valid op inputs: shapes come back from the fake kernels, nothing runs

# fmt: off
META_OK = [
    ("attention", lambda be: att(be, _m(1, 4, 2, 8), _m(1, 4, 1, 8), _m(1, 4, 1, 8),
     key_padding_mask=_bool(1, 4, device="meta"), causal=True), (1, 4, 2, 8)),
    ("sdpa", lambda be: sdpa(be, *(_m(1, 2, 4, 8),) * 3, is_causal=True), (1, 2, 4, 8)),
    ("layer_norm", lambda be: ln(be, _m(2, 3, 8), 8, _m(8), _m(8)), (2, 3, 8)),
    ("dropout_add_layer_norm", lambda be: dal(be, _m(2, 3, 8), _m(2, 3, 8), _m(8), _m(8), dropout_p=0.1)[0],
     (2, 3, 8)),
    ("linear", lambda be: lin(be, _m(2, 3, 8), _m(16, 8), _m(16), dropout_p=0.1), (2, 3, 16)),
    ("feed_forward", lambda be: ffn(be, _m(2, 3, 8), _m(16, 8), _m(16), _m(8, 16), _m(8)), (2, 3, 8)),
    ("attention_varlen", lambda be: varlen(be, _m(6, 2, 8), _m(6, 1, 8), _m(6, 1, 8),
         _cu(0, 2, 6, device="meta"), _cu(0, 2, 6, device="meta")), (6, 2, 8)),
]
# fmt: on


@pytest.mark.usefixtures("no_kernels")
@pytest.mark.parametrize("be", ["torch", "auto"])
@pytest.mark.parametrize("fn,shape", _rows(META_OK))
def test_meta_inputs_are_valid_and_return_shapes(fn, shape, be):
    out = _one_line(lambda: fn(be))
    assert out.device.type == "meta" and tuple(out.shape) == shape


# --- functions without a backend, configs, constructors and loaders (kernels disabled too)


def _hf_dirs(root):
    gpt_cfg = {"model_type": "gpt2", "n_embd": 32, "n_head": 2, "n_layer": 1, "vocab_size": 10, "n_positions": 8}
    dirs = {
        "bert-config": (json.dumps({"model_type": "bert"}), {}),
        "bad-json": ("{not json", {}),
        "list-json": ("[1, 2]", {}),
        "no-weights": (json.dumps(gpt_cfg), {}),
        "bad-safetensors": (json.dumps(gpt_cfg), {"model.safetensors": b"garbage"}),
        "bad-bin": (json.dumps(gpt_cfg), {"pytorch_model.bin": b"garbage"}),
        "unsupported-option": (json.dumps({**gpt_cfg, "scale_attn_by_inverse_layer_idx": True}), {}),
        "str-field": (json.dumps({**gpt_cfg, "n_embd": "32"}), {}),
    }
    for name, (config, files) in dirs.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(config)
        for fname, data in files.items():
            (root / name / fname).write_bytes(data)
    (root / "empty").mkdir()
    (root / "file.txt").write_text("x")
    return root


@functools.cache
def _gpt():
    return GPT(GPTConfig.from_name("gpt-tiny")).eval()


@functools.cache
def _bert(cls=BertModel):
    return cls(BertConfig.from_name("bert-tiny")).eval()


def _under_env(name, value, fn):
    with mock.patch.dict(os.environ, {name: value}):
        return fn()


def _ids(shape=(2, 5), lo=0, hi=90):
    return torch.randint(lo, hi, shape)


def _unpad(x=_DEF, mask=_DEF):
    x = _t(2, 3, 4) if x is _DEF else x
    mask = _bool(2, 3) if mask is _DEF else mask
    return fastformer.unpad_input(x, mask)


def _pad(x=_DEF, indices=_DEF, batch=2, seqlen=2):
    x = _t(3, 4) if x is _DEF else x
    indices = torch.tensor([0, 1, 3]) if indices is _DEF else indices
    return fastformer.pad_input(x, indices, batch, seqlen)


def _generate(ids=_DEF, max_new_tokens=2, **kw):
    return _gpt().generate(_ids() if ids is _DEF else ids, max_new_tokens, **kw)


_LATE = "checked only after the forward ran every kernel"
_CE = "passed unchecked to F.cross_entropy after the forward ran every kernel"

# fmt: off
PLAIN_CASES = [
    # unpad_input / pad_input
    ("unpad-mask-float", lambda: _unpad(mask=torch.ones(2, 3)), TypeError, r"^attention_mask must be bool or int"),
    ("unpad-mask-complex", lambda: _unpad(mask=torch.ones(2, 3, dtype=torch.complex64)), TypeError,
     r"^attention_mask must be bool or integer"),
    ("unpad-mask-shape", lambda: _unpad(mask=_bool(2, 4)), ValueError, r"^attention_mask must have shape \(2, 3\)"),
    ("unpad-mask-rank1", lambda: _unpad(mask=_bool(2)), ValueError, r"^attention_mask must have shape \(2, 3\)"),
    ("unpad-mask-meta", lambda: _unpad(mask=_bool(2, 3, device="meta")), ValueError,
     r"^attention_mask is on meta but x is on cpu"),
    ("unpad-mask-None", lambda: _unpad(mask=None), TypeError, r"^attention_mask must be a torch.Tensor"),
    ("unpad-mask-list", lambda: _unpad(mask=[[1, 1, 1]] * 2), TypeError, r"^attention_mask must be a torch.Tensor"),
    ("unpad-x-rank1", lambda: _unpad(x=_t(3), mask=_bool(3)), ValueError, r"attention_mask must have shape .* of x"),
    ("unpad-x-str", lambda: _unpad(x="x"), TypeError, r"^x must be a torch.Tensor"),
    ("unpad-x-None", lambda: _unpad(x=None), TypeError, r"^x must be a torch.Tensor"),
    ("unpad-all-meta", lambda: _unpad(x=_m(2, 3, 4), mask=_bool(2, 3, device="meta")), ValueError,
         r"attention_mask.*meta"),
    ("pad-indices-rank2", lambda: _pad(indices=torch.tensor([[0, 1, 3]])), ValueError, r"^indices must be 1-D"),
    ("pad-indices-length", lambda: _pad(indices=torch.tensor([0, 1])), ValueError, r"^indices must be 1-D with one"),
    ("pad-indices-float", lambda: _pad(indices=torch.tensor([0.0, 1.0, 3.0])), TypeError, r"indices"),
    ("pad-indices-out-of-range", lambda: _pad(indices=torch.tensor([0, 1, 9])), ValueError, r"indices"),
    ("pad-indices-list", lambda: _pad(indices=[0, 1, 3]), TypeError, r"indices"),
    ("pad-indices-meta", lambda: _pad(indices=torch.tensor([0, 1, 3], device="meta")), ValueError, r"indices"),
    ("pad-x_unpad-str", lambda: _pad(x="x"), TypeError, r"x_unpad"),
    ("pad-batch-float", lambda: _pad(batch=2.0), ANY, r"batch"),
    ("pad-batch-negative", lambda: _pad(batch=-2), ValueError, r"batch"),
    # backend names
    ("layer_norm-backend-unknown", lambda: ln("fast"), ValueError, r"^backend: unknown backend 'fast'"),
    ("attention-backend-int", lambda: att(3), ValueError, r"^backend: unknown backend 3"),
    ("linear-backend-from-env", lambda: _under_env("FASTFORMER_BACKEND", "fast", lambda: lin(None)), ValueError,
     r"^FASTFORMER_BACKEND: unknown backend 'fast'"),
    ("use_backend-unknown", lambda: fastformer.use_backend("fast").__enter__(), ValueError,
     r"^use_backend: unknown backend 'fast'"),
    # fastformer.nn constructors
    ("DropoutAddLayerNorm-dropout-1", lambda: fnn.DropoutAddLayerNorm(8, 1.0), ValueError, r"^dropout_p must be in"),
    ("DropoutAddLayerNorm-dropout-nan", lambda: fnn.DropoutAddLayerNorm(8, NAN), ValueError, r"^dropout_p must be"),
    ("DropoutAddLayerNorm-dropout-str", lambda: fnn.DropoutAddLayerNorm(8, "0.1"), TypeError, r"^dropout_p must be"),
    ("DropoutAddLayerNorm-hidden-float", lambda: fnn.DropoutAddLayerNorm(8.0), ANY, r"hidden"),
    ("DropoutAddLayerNorm-hidden-str", lambda: fnn.DropoutAddLayerNorm("8"), ANY, r"hidden"),
    ("MultiheadSelfAttention-d-not-multiple", lambda: fnn.MultiheadSelfAttention(10, 3), ValueError,
     r"^d_model \(10\) must be a positive multiple of n_heads \(3\)"),
    ("MultiheadSelfAttention-heads-0", lambda: fnn.MultiheadSelfAttention(8, 0), ValueError, r"n_heads \(0\)"),
    ("MultiheadSelfAttention-kv-heads-3", lambda: fnn.MultiheadSelfAttention(8, 2, n_kv_heads=3), ValueError,
     r"^n_kv_heads \(3\) must divide n_heads"),
    ("MultiheadSelfAttention-kv-heads-0", lambda: fnn.MultiheadSelfAttention(8, 2, n_kv_heads=0), ValueError,
     r"^n_kv_heads \(0\) must divide n_heads"),
    ("MultiheadSelfAttention-dropout-1", lambda: fnn.MultiheadSelfAttention(8, 2, dropout_p=1.0), ValueError,
     r"^dropout_p must be in"),
    pytest.param(lambda: fnn.MultiheadSelfAttention(0, 2), ValueError, r"d_model",
         marks=(pytest.mark.filterwarnings("ignore:Initializing zero-element tensors"),),
              id="MultiheadSelfAttention-d-model-0"),
    ("MultiheadSelfAttention-d-model-negative", lambda: fnn.MultiheadSelfAttention(-8, 2), ValueError, r"d_model"),
    ("MultiheadSelfAttention-heads-float", lambda: fnn.MultiheadSelfAttention(8, 2.0), ANY, r"n_heads"),
    ("MultiheadSelfAttention-heads-str", lambda: fnn.MultiheadSelfAttention(8, "2"), ANY, r"n_heads"),
    ("FeedForward-activation", lambda: fnn.FeedForward(8, 16, "swish"), ValueError, r"^activation: unknown"),
    ("FeedForward-activation-int", lambda: fnn.FeedForward(8, 16, 1), TypeError, r"^activation must be None or"),
    ("FeedForward-dropout-1", lambda: fnn.FeedForward(8, 16, dropout_p=1.0), ValueError, r"^dropout_p must be in"),
    ("FeedForward-d_ff-negative", lambda: fnn.FeedForward(8, -16), ValueError, r"d_ff"),
    # model configs and constructors
    ("GPTConfig-unknown-preset", lambda: GPTConfig.from_name("gpt-huge"), ValueError, r"^name: unknown preset"),
    ("GPTConfig-heads", lambda: GPTConfig.from_name("gpt-tiny", n_head=3), ValueError,
     r"hidden size 32 must be a positive multiple of the number of heads 3"),
    ("GPTConfig-activation", lambda: GPTConfig(activation_function="swish"), ValueError, r"^activation: unsupported"),
    ("GPTConfig-backend", lambda: GPTConfig.from_name("gpt-tiny", backend="fast"), ValueError,
     r"^backend: unknown backend 'fast'"),
    ("GPTConfig-unknown-field", lambda: GPTConfig.from_name("gpt-tiny", n_heads=2), TypeError, r"n_heads"),
    ("BertConfig-problem-type", lambda: BertConfig.from_name("bert-tiny", problem_type="ranking"), ValueError,
     r"^problem_type: unsupported 'ranking'"),
    ("GPTConfig-heads-str", lambda: GPTConfig.from_name("gpt-tiny", n_head="2"), ANY, r"n_head|heads"),
    ("GPT-vocab-negative", lambda: GPT(GPTConfig.from_name("gpt-tiny", vocab_size=-1)), ValueError, r"vocab_size"),
    ("GPT-config-None", lambda: GPT(None), TypeError, r"config"),
    ("GPT-config-BertConfig", lambda: GPT(BertConfig.from_name("bert-tiny")), TypeError, r"config"),
    ("BertModel-config-GPTConfig", lambda: BertModel(GPTConfig.from_name("gpt-tiny")), TypeError, r"config"),
    # from_hf
    ("from_hf-str", lambda: GPT.from_hf("gpt2"), TypeError, r"^hf_model_or_state_dict must be an nn.Module or a dict"),
    ("from_hf-None", lambda: GPT.from_hf(None), TypeError, r"^hf_model_or_state_dict must be"),
    ("from_hf-dict-no-config", lambda: GPT.from_hf({}), ValueError, r"^config: required"),
    ("from_hf-wrong-config", lambda: GPT.from_hf({}, BertConfig.from_name("bert-tiny")), TypeError,
     r"^config must be a GPTConfig, got BertConfig"),
    ("from_hf-config-dict", lambda: BertForPreTraining.from_hf({}, {"hidden_size": 32}), TypeError,
     r"^config must be a BertConfig, got dict"),
    ("from_hf-bad-shape", lambda: GPT.from_hf({"transformer.wte.weight": _t(3, 3)}, GPTConfig.from_name("gpt-tiny")),
     ValueError, r"^state dict: transformer.wte.weight has shape \(3, 3\)"),
    ("from_hf-strict-missing", lambda: GPT.from_hf({}, GPTConfig.from_name("gpt-tiny"), strict=True), ValueError,
     r"^state dict does not match GPT: missing"),
    ("from_hf-module-without-config", lambda: GPT.from_hf(nn.Linear(2, 2)), ANY, r"hf_model_or_state_dict|config"),
    ("from_hf-value-not-tensor", lambda: GPT.from_hf({"transformer.wte.weight": "w"},
         GPTConfig.from_name("gpt-tiny")), ANY, r"transformer.wte.weight"),
    # fastformer.patch / unpatch
    ("patch-backend-unknown", lambda: fastformer.patch(nn.Linear(2, 2), backend="fast"), ValueError,
     r"^backend: unknown backend 'fast'"),
    ("patch_gpt2-backend-unknown", lambda: fastformer.patch_gpt2(backend="fast"), ValueError, r"^backend: unknown"),
    ("patch_bert-backend-int", lambda: fastformer.patch_bert(backend=3), ValueError, r"^backend: unknown backend 3"),
    pytest.param(lambda: fastformer.patch(nn.Linear(2, 2)), TypeError, r"^model: Linear has no GPT-2, BERT",
                 marks=needs_transformers, id="patch-module-without-hf-modules"),
    pytest.param(lambda: fastformer.patch(_gpt()), TypeError, r"^model: GPT has no GPT-2, BERT",
                 marks=needs_transformers, id="patch-fastformer-model"),
    pytest.param(lambda: fastformer.patch("model"), TypeError, r"model", marks=(needs_transformers,), id="patch-str"),
    pytest.param(lambda: fastformer.patch(None), TypeError, r"model", marks=(needs_transformers,), id="patch-None"),
    pytest.param(lambda: fastformer.patch(nn.Linear), TypeError, r"model", marks=(needs_transformers,),
         id="patch-class-not-instance"),
    ("unpatch-str", lambda: fastformer.unpatch("model"), TypeError, r"model"),
]
# fmt: on


@pytest.mark.usefixtures("no_kernels")
@pytest.mark.parametrize("fn,exc,match", _rows(PLAIN_CASES))
def test_plain_function_rejects_bad_input(fn, exc, match):
    _expect(fn, exc, match)


# --- model forward and generate: fastformer.models.inputs promises its checks come before any kernel runs

# fmt: off
MODEL_CASES = [
    # GPT.forward: input_ids
    ("gpt-ids-float", lambda: _gpt()(_ids().float()), TypeError, r"^input_ids must hold integer token ids"),
    ("gpt-ids-bool", lambda: _gpt()(_ids().bool()), TypeError, r"^input_ids must hold integer token ids"),
    ("gpt-ids-complex", lambda: _gpt()(_ids().to(torch.complex64)), TypeError, r"^input_ids must hold integer"),
    ("gpt-ids-rank1", lambda: _gpt()(_ids((5,))), ValueError, r"^input_ids must have shape \(batch, seqlen\)"),
    ("gpt-ids-rank3", lambda: _gpt()(_ids((1, 2, 5))), ValueError, r"^input_ids must have shape \(batch, seqlen\)"),
    ("gpt-ids-negative", lambda: _gpt()(_ids(lo=-5, hi=0)), ValueError, r"^input_ids holds values in \[-\d+, -\d+\]"),
    ("gpt-ids-out-of-vocab", lambda: _gpt()(_ids(lo=97, hi=200)), ValueError, r"^input_ids holds .* outside \[0, 97\)"),
    ("gpt-ids-too-long", lambda: _gpt()(_ids((1, 33))), ValueError, r"^input_ids has length 33 .* at most 32"),
    ("gpt-ids-str", lambda: _gpt()("hello"), TypeError, r"^input_ids must be a torch.Tensor"),
    ("gpt-ids-list", lambda: _gpt()([[1, 2]]), TypeError, r"^input_ids must be a torch.Tensor"),
    ("gpt-ids-None", lambda: _gpt()(None), TypeError, r"^input_ids must be a torch.Tensor"),
    ("gpt-ids-meta", lambda: _gpt()(_ids().to("meta")), ValueError, r"input_ids.*meta"),
    # GPT.forward: attention_mask, labels
    ("gpt-mask-shape", lambda: _gpt()(_ids(), attention_mask=_bool(2, 4)), ValueError,
     r"^attention_mask must have shape \(2, 5\)"),
    ("gpt-mask-meta", lambda: _gpt()(_ids(), attention_mask=_bool(2, 5, device="meta")), ValueError,
     r"^attention_mask is on meta but input_ids is on cpu"),
    ("gpt-mask-list", lambda: _gpt()(_ids(), attention_mask=[[1] * 5] * 2), TypeError,
     r"^attention_mask must be a torch.Tensor"),
    ("gpt-labels-shape", lambda: _gpt()(_ids(), labels=_ids((2, 4))), ValueError, r"^labels must have shape"),
    ("gpt-labels-float", lambda: _gpt()(_ids(), labels=_ids().float()), TypeError, r"labels"),
    ("gpt-labels-out-of-vocab", lambda: _gpt()(_ids(), labels=_ids(lo=97, hi=200)), ValueError, r"labels"),
    ("gpt-labels-negative", lambda: _gpt()(_ids(), labels=_ids(lo=-5, hi=-1)), ValueError, r"labels"),
    ("gpt-labels-str", lambda: _gpt()(_ids(), labels="x"), TypeError, r"labels"),
    # GPT.generate
    ("generate-ids-rank1", lambda: _generate(_ids((5,))), ValueError, r"^input_ids must be a non-empty"),
    ("generate-ids-empty", lambda: _generate(_ids((2, 0))), ValueError, r"^input_ids must be a non-empty"),
    ("generate-ids-str", lambda: _generate("hello"), ValueError, r"^input_ids must be a non-empty .* got str"),
    ("generate-ids-float", lambda: _generate(_ids().float()), TypeError, r"^input_ids must hold integer token ids"),
    ("generate-ids-out-of-vocab", lambda: _generate(_ids(lo=97, hi=200)), ValueError, r"^input_ids holds values"),
    ("generate-ids-negative", lambda: _generate(_ids(lo=-5, hi=0)), ValueError, r"^input_ids holds values"),
    ("generate-max-new-negative", lambda: _generate(max_new_tokens=-1), ValueError, r"^max_new_tokens must be"),
    ("generate-max-new-float", lambda: _generate(max_new_tokens=2.0), ValueError, r"^max_new_tokens must be"),
    ("generate-max-new-None", lambda: _generate(max_new_tokens=None), ValueError, r"^max_new_tokens must be"),
    ("generate-max-new-too-many", lambda: _generate(max_new_tokens=28), ValueError,
     r"^input_ids length 5 \+ max_new_tokens 28 exceeds n_positions 32"),
    ("generate-temperature-0", lambda: _generate(temperature=0.0), ValueError, r"^temperature must be > 0"),
    ("generate-temperature-negative", lambda: _generate(temperature=-1.0), ValueError, r"^temperature must be > 0"),
    ("generate-temperature-nan", lambda: _generate(temperature=NAN), ValueError, r"^temperature must be > 0"),
    ("generate-top_k-0", lambda: _generate(top_k=0), ValueError, r"^top_k must be >= 1"),
    ("generate-top_p-0", lambda: _generate(top_p=0.0), ValueError, r"^top_p must be in \(0, 1\]"),
    ("generate-top_p-1.5", lambda: _generate(top_p=1.5), ValueError, r"^top_p must be in \(0, 1\]"),
    ("generate-top_p-nan", lambda: _generate(top_p=NAN), ValueError, r"^top_p must be in \(0, 1\]"),
    ("generate-mask-shape", lambda: _generate(attention_mask=_bool(2, 4)), ValueError, r"^attention_mask must have"),
    ("generate-mask-meta", lambda: _generate(attention_mask=_bool(2, 5, device="meta")), ValueError,
     r"^attention_mask is on meta but input_ids is on cpu"),
    ("generate-mask-right-padded", lambda: _generate(attention_mask=torch.tensor([[1, 1, 1, 1, 0], [1] * 5])),
     ValueError, r"^attention_mask: generate needs left padding"),
    ("generate-temperature-str", lambda: _generate(temperature="hot"), TypeError, r"temperature"),
    ("generate-temperature-None", lambda: _generate(temperature=None), TypeError, r"temperature"),
    ("generate-top_k-float", lambda: _generate(top_k=1.5, do_sample=True), TypeError, r"top_k"),
    ("generate-top_k-str", lambda: _generate(top_k="3"), TypeError, r"top_k"),
    ("generate-top_p-str", lambda: _generate(top_p="x"), TypeError, r"top_p"),
    ("generate-eos-str", lambda: _generate(eos_token_id="x"), TypeError, r"eos_token_id"),
    ("generate-generator-str", lambda: _generate(do_sample=True, generator="g"), TypeError, r"generator"),
    # BertModel.forward
    ("bert-ids-float", lambda: _bert()(_ids().float()), TypeError, r"^input_ids must hold integer token ids"),
    ("bert-ids-rank1", lambda: _bert()(_ids((5,))), ValueError, r"^input_ids must have shape \(batch, seqlen\)"),
    ("bert-ids-out-of-vocab", lambda: _bert()(_ids(lo=101, hi=200)), ValueError, r"^input_ids holds .* \[0, 101\)"),
    ("bert-ids-negative", lambda: _bert()(_ids(lo=-5, hi=0)), ValueError, r"^input_ids holds values"),
    ("bert-ids-too-long", lambda: _bert()(_ids((1, 33))), ValueError, r"^input_ids has length 33"),
    ("bert-ids-empty", lambda: _bert()(_ids((2, 0))), ValueError, r"^input_ids: sequence length must be at least 1"),
    ("bert-ids-str", lambda: _bert()("hello"), TypeError, r"^input_ids must be a torch.Tensor"),
    ("bert-mask-shape", lambda: _bert()(_ids(), _bool(2, 4)), ValueError, r"^attention_mask must have shape"),
    ("bert-mask-meta", lambda: _bert()(_ids(), _bool(2, 5, device="meta")), ValueError,
     r"^attention_mask is on meta but input_ids is on cpu"),
    ("bert-token-types-out-of-range", lambda: _bert()(_ids(), token_type_ids=torch.full((2, 5), 2)), ValueError,
     r"^token_type_ids holds values in \[2, 2\], outside \[0, 2\)"),
    ("bert-token-types-negative", lambda: _bert()(_ids(), token_type_ids=torch.full((2, 5), -1)), ValueError,
     r"^token_type_ids holds values"),
    ("bert-token-types-shape", lambda: _bert()(_ids(), token_type_ids=torch.zeros(2, 4, dtype=torch.long)),
     ValueError, r"^token_type_ids must have shape \(2, 5\) or \(1, 5\)"),
    ("bert-token-types-float", lambda: _bert()(_ids(), token_type_ids=torch.zeros(2, 5)), TypeError,
     r"^token_type_ids must hold integer token ids"),
    ("bert-positions-out-of-range", lambda: _bert()(_ids(), position_ids=torch.arange(30, 35)[None]), ValueError,
     r"^position_ids holds values in \[30, 34\], outside \[0, 32\)"),
    ("bert-positions-rank1", lambda: _bert()(_ids(), position_ids=torch.arange(5)), ValueError,
     r"^position_ids must have shape"),
    ("bert-positions-str", lambda: _bert()(_ids(), position_ids="x"), TypeError, r"^position_ids must be a torch"),
    ("bert-token-types-meta", lambda: _bert()(_ids(), token_type_ids=torch.zeros(2, 5, dtype=torch.long,
         device="meta")), ValueError, r"token_type_ids.*meta"),
    # the BERT heads
    ("pretraining-labels-shape", lambda: _bert(BertForPreTraining)(_ids(), labels=_ids((2, 4))), ValueError,
         r"^labels must have the shape of input_ids"),
    ("pretraining-labels-out-of-vocab", lambda: _bert(BertForPreTraining)(_ids(), labels=_ids(lo=101, hi=200)),
         ValueError, r"labels"),
    ("pretraining-next-sentence-out-of-range", lambda: _bert(BertForPreTraining)(_ids(),
         next_sentence_label=torch.tensor([0, 5])), ValueError, r"next_sentence_label"),
    ("pretraining-next-sentence-shape", lambda: _bert(BertForPreTraining)(_ids(),
         next_sentence_label=torch.tensor([0, 1, 1])), ValueError, r"next_sentence_label"),
    ("masked-lm-labels-float", lambda: _bert(BertForMaskedLM)(_ids(), labels=_ids().float()), TypeError, r"labels"),
    ("classification-labels-out-of-range", lambda: _bert(BertForSequenceClassification)(_ids(),
         labels=torch.tensor([0, 2])), ValueError, r"labels"),
    ("classification-labels-shape", lambda: _bert(BertForSequenceClassification)(_ids(),
         labels=torch.tensor([0, 1, 1])), ValueError, r"labels"),
    ("classification-labels-str", lambda: _bert(BertForSequenceClassification)(_ids(), labels="x"), TypeError,
         r"labels"),
]
# fmt: on


@pytest.mark.usefixtures("no_kernels")
@pytest.mark.parametrize("fn,exc,match", _rows(MODEL_CASES))
def test_model_rejects_bad_input_before_any_kernel(fn, exc, match):
    _expect(fn, exc, match)


# --- fastformer.nn forward: the projections run before attention sees its inputs, so kernels stay enabled here


def _mha(be, **kw):
    return fnn.MultiheadSelfAttention(8, 2, backend=be, **kw)


# fmt: off
MODULE_CASES = [
    ("LayerNorm-input-shape", lambda be: fnn.LayerNorm(8, backend=be)(_t(2, 4)), ValueError,
     r"^normalized_shape \(8,\) does not match the trailing dimensions of input"),
    ("LayerNorm-input-int", lambda be: fnn.LayerNorm(8, backend=be)(torch.ones(2, 8, dtype=torch.long)), TypeError,
     r"^input must have a floating dtype"),
    ("LayerNorm-input-str", lambda be: fnn.LayerNorm(8, backend=be)("x"), TypeError, r"^input must be a torch"),
    ("LayerNorm-eps-negative", lambda be: fnn.LayerNorm(8, eps=-1.0, backend=be)(_t(2, 8)), ValueError,
     r"^eps must be a finite number >= 0"),
    ("LayerNorm-eps-nan", lambda be: fnn.LayerNorm(8, eps=NAN, backend=be)(_t(2, 8)), ValueError,
     r"^eps must be a finite number >= 0"),
    ("LayerNorm-shape-0", lambda be: fnn.LayerNorm(0, backend=be)(_t(2, 0)), ValueError,
     r"^normalized_shape must be non-empty with positive sizes"),
    ("DropoutAddLayerNorm-residual-shape", lambda be: fnn.DropoutAddLayerNorm(8, backend=be)(_t(2, 8), _t(2, 4)),
     ValueError, r"^residual must have the shape of x"),
    ("DropoutAddLayerNorm-residual-dtype", lambda be: fnn.DropoutAddLayerNorm(8, backend=be)(_t(2, 8),
     _t(2, 8, dtype=torch.half)), TypeError, r"^residual has dtype"),
    ("DropoutAddLayerNorm-x-int", lambda be: fnn.DropoutAddLayerNorm(8, backend=be)(torch.ones(2, 8, dtype=torch.int)),
     TypeError, r"^x must have a floating dtype"),
    ("DropoutAddLayerNorm-eps-negative", lambda be: fnn.DropoutAddLayerNorm(8, eps=-1.0, backend=be)(_t(2, 8)),
     ValueError, r"^eps must be a finite number >= 0"),
    ("MultiheadSelfAttention-x-width", lambda be: _mha(be)(_t(2, 5, 6)), ValueError,
     r"^weight has in_features 8 .* but x.shape\[-1\] is 6"),
    ("MultiheadSelfAttention-x-int", lambda be: _mha(be)(torch.ones(2, 5, 8, dtype=torch.long)), TypeError,
     r"^x must have a floating dtype"),
    ("MultiheadSelfAttention-x-str", lambda be: _mha(be)("x"), TypeError, r"^x must be a torch.Tensor"),
    ("MultiheadSelfAttention-mask-shape", lambda be: _mha(be)(_t(2, 5, 8), _bool(2, 4)), ValueError,
     r"^key_padding_mask must have shape \(batch, seqlen_k\) = \(2, 5\)"),
    ("MultiheadSelfAttention-mask-float", lambda be: _mha(be)(_t(2, 5, 8), torch.ones(2, 5)), TypeError,
     r"^key_padding_mask must be bool or integer"),
    ("MultiheadSelfAttention-mask-meta", lambda be: _mha(be)(_t(2, 5, 8), _bool(2, 5, device="meta")), ValueError,
     r"^key_padding_mask is on meta"),
    ("MultiheadSelfAttention-cu_seqlens-float", lambda be: _mha(be)(_t(5, 8), cu_seqlens=_cu(0.0, 5.0,
     dtype=torch.float32), max_seqlen=5), TypeError, r"^cu_seqlens_q must be int32 or int64"),
    ("MultiheadSelfAttention-cu_seqlens-decreasing", lambda be: _mha(be)(_t(5, 8), cu_seqlens=_cu(0, 4, 3),
     max_seqlen=5), ValueError, r"^cu_seqlens_q must start at 0 and be non-decreasing"),
    ("MultiheadSelfAttention-max_seqlen-missing", lambda be: _mha(be)(_t(5, 8), cu_seqlens=_cu(0, 5)), ValueError,
     r"^max_seqlen_q = 0 is smaller than the longest sequence \(5\)"),
    ("MultiheadSelfAttention-backend-unknown", lambda be: _mha(be + "-x")(_t(2, 5, 8)), ValueError,
     r"^backend: unknown backend"),
    ("MultiheadSelfAttention-x-rank2-without-cu_seqlens", lambda be: _mha(be)(_t(5, 8)), ValueError, r"\bx\b"),
    ("MultiheadSelfAttention-x-rank3-with-cu_seqlens", lambda be: _mha(be)(_t(2, 5, 8), cu_seqlens=_cu(0, 5),
         max_seqlen=5), ValueError, r"\bx\b"),
    ("MultiheadSelfAttention-kv_cache-str", lambda be: _mha(be)(_t(2, 5, 8), kv_cache="cache"), TypeError, r"kv_cache"),
    ("FeedForward-x-width", lambda be: fnn.FeedForward(8, 16, backend=be)(_t(2, 4)), ValueError,
     r"^w1 has in_features 8 .* but x.shape\[-1\] is 4"),
    ("FeedForward-x-int", lambda be: fnn.FeedForward(8, 16, backend=be)(torch.ones(2, 8, dtype=torch.long)),
     TypeError, r"^x must have a floating dtype"),
    ("FeedForward-x-half", lambda be: fnn.FeedForward(8, 16, backend=be)(_t(2, 8, dtype=torch.half)), TypeError,
     r"^w1 has dtype torch.float32 but x has torch.float16"),
    ("FeedForward-x-meta", lambda be: fnn.FeedForward(8, 16, backend=be)(_m(2, 8)), ValueError,
     r"^w1 is on cpu but x is on meta"),
    ("FeedForward-x-str", lambda be: fnn.FeedForward(8, 16, backend=be)("x"), TypeError, r"^x must be a torch"),
]
# fmt: on


@pytest.mark.parametrize("be", ["torch", pytest.param("triton", marks=needs_interp)])
@pytest.mark.parametrize("fn,exc,match", _rows(MODULE_CASES))
def test_module_rejects_bad_input(fn, exc, match, be):
    _expect(lambda: fn(be), exc, match)


# fmt: off
MODULE_REFUSALS = [
    _triton("MultiheadSelfAttention-triton-headdim-12",
            lambda: fnn.MultiheadSelfAttention(24, 2, backend="triton")(_t(1, 3, 24)),
            _refuse("attention", "triton", "head dimension 12 is not supported")),
    _triton("FeedForward-triton-float64",
            lambda: fnn.FeedForward(8, 16, backend="triton", dtype=torch.float64)(_t(2, 8, dtype=torch.float64)),
            _refuse("feed_forward", "triton", "float64")),
    ("LayerNorm-cuda-cpu", lambda: fnn.LayerNorm(8, backend="cuda")(_t(2, 8)), _refuse("layer_norm", "cuda", "CUDA")),
    ("GPT-cuda-cpu", lambda: GPT(GPTConfig.from_name("gpt-tiny", backend="cuda"))(_ids()),
     _refuse(r"\w+", "cuda", "needs CUDA tensors")),
]
# fmt: on


@pytest.mark.parametrize("fn,match", _rows(MODULE_REFUSALS))
def test_module_named_backend_refuses_with_the_reason(fn, match):
    _expect(fn, BackendError, match)


# --- from_pretrained: a local directory only (FileNotFoundError for a missing one, as tests/test_models.py pins)

# fmt: off
LOADING_CASES = [
    ("missing-path", lambda d: GPT.from_pretrained(d / "missing"), FileNotFoundError, r"^path: .* is not a local dir"),
    ("file-not-directory", lambda d: GPT.from_pretrained(d / "file.txt"), FileNotFoundError,
     r"^path: .*file.txt' is not a local directory"),
    ("no-config-json", lambda d: BertModel.from_pretrained(d / "empty"), FileNotFoundError, r"^path: no config\.json"),
    ("no-weights", lambda d: GPT.from_pretrained(d / "no-weights"), FileNotFoundError,
     r"^path: no model.safetensors or pytorch_model.bin"),
    ("wrong-model-type", lambda d: GPT.from_pretrained(d / "bert-config"), ValueError,
     r"^model_type: .* is for model_type 'bert'"),
    ("bert-from-gpt2-directory", lambda d: BertForPreTraining.from_pretrained(d / "no-weights"), ValueError,
     r"^model_type: .* is for model_type 'gpt2'"),
    ("unsupported-hf-option", lambda d: GPT.from_pretrained(d / "unsupported-option"), ValueError,
     r"^config: scale_attn_by_inverse_layer_idx=True is not supported"),
    ("pickle-not-state-dict", lambda d: GPT.from_pretrained(d / "bad-bin"), ValueError,
     r"^path: .*pytorch_model.bin holds pickled Python objects"),
    ("override-backend", lambda d: GPT.from_pretrained(d / "no-weights", backend="fast"), ValueError,
     r"^backend: unknown backend 'fast'"),
    ("override-unknown-field", lambda d: GPT.from_pretrained(d / "no-weights", n_heads=2), TypeError, r"n_heads"),
    ("path-None", lambda _d: GPT.from_pretrained(None), TypeError, r"path"),
    ("path-int", lambda _d: GPT.from_pretrained(3), TypeError, r"path"),
    ("config-json-invalid", lambda d: GPT.from_pretrained(d / "bad-json"), ValueError, r"config\.json|path"),
    ("config-json-not-an-object", lambda d: GPT.from_pretrained(d / "list-json"), ValueError, r"config"),
    ("config-json-str-field", lambda d: GPT.from_pretrained(d / "str-field"), ANY, r"n_embd"),
    ("safetensors-corrupt", lambda d: GPT.from_pretrained(d / "bad-safetensors"), ValueError, r"model\.safetensors"),
]
# fmt: on


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    return _hf_dirs(tmp_path_factory.mktemp("hf"))


@pytest.mark.usefixtures("no_kernels")
@pytest.mark.parametrize("fn,exc,match", _rows(LOADING_CASES))
def test_from_pretrained_rejects_bad_input(fn, exc, match, hf_dirs):
    _expect(lambda: fn(hf_dirs), exc, match)
