"""Linear layers with a fused bias + activation (+ dropout) epilogue, and the whole feed-forward block.

Public functions:

- :func:`linear`: ``y = act(x @ W^T + b)`` with ``W`` in ``nn.Linear`` layout ``(out, in)`` or, with
  ``weight_layout="in_out"``, GPT-2 ``Conv1D`` layout ``(in, out)`` (read through strides, never copied).
- :func:`feed_forward`: ``out = dropout(act(x @ W1^T + b1)) @ W2^T + b2``.

Backends (see :mod:`fastformer.backends`):

- ``triton``: kernels/ffn.py. Forward: one GEMM per layer with bias, activation and dropout in the epilogue.
  Backward of ``feed_forward``: the ``dh = dout @ W2`` GEMM multiplies by act'(pre) and the dropout mask in
  its epilogue and writes ``d(pre)`` and ``h`` directly, so the wide activation has no elementwise pass.
- ``cuda``: cuBLAS GEMMs through ``torch.matmul`` plus the fused elementwise kernels of csrc/ffn.cu.
- ``torch``: the pure-PyTorch reference below (fp32 math), also the CPU path.

What backward keeps: ``linear`` saves ``x`` and the pre-activation (only when there is an activation);
``feed_forward`` saves ``x`` and the wide pre-activation, not ``h``. With ``recompute=True`` the
pre-activation is not saved but recomputed in backward by one extra GEMM (less memory, more FLOPs).

Dropout uses the shared counter-based Philox scheme (fastformer/ops/_dropout.py) with the flat element
offset ``row * d_ff + col`` of the hidden activation, so every backend draws the same mask for a seed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastformer import backends, utils
from fastformer.ops import dropout as _dropout

ACTIVATIONS: tuple[str | None, ...] = (None, "gelu", "gelu_tanh", "relu")
# activation name as carried through the custom-op schema (a str, so None becomes "none") -> kernel code
_ACT_CODE = {"none": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}
_LAYOUTS = ("out_in", "in_out")


# ----------------------------------------------------------------------------------------------
# Reference math (the torch backend; tests call it on float64 inputs to build references)
# ----------------------------------------------------------------------------------------------


def act_fn(pre: torch.Tensor, activation: str | None) -> torch.Tensor:
    """Apply ``activation`` (None, "gelu", "gelu_tanh", "relu") elementwise."""
    if activation in (None, "none"):
        return pre
    if activation == "gelu":
        return F.gelu(pre)
    if activation == "gelu_tanh":
        return F.gelu(pre, approximate="tanh")
    if activation == "relu":
        return torch.relu(pre)
    raise ValueError(f"activation: unknown activation {activation!r}")


def act_grad(pre: torch.Tensor, activation: str | None) -> torch.Tensor:
    """Derivative of ``activation`` at ``pre`` (relu' is 0 at 0, as torch's relu backward)."""
    if activation in (None, "none"):
        return torch.ones_like(pre)
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(pre * (1.0 / math.sqrt(2.0))))
        pdf = torch.exp(-0.5 * pre * pre) * (1.0 / math.sqrt(2.0 * math.pi))
        return cdf + pre * pdf
    if activation == "gelu_tanh":
        c = math.sqrt(2.0 / math.pi)
        t = torch.tanh(c * (pre + 0.044715 * pre**3))
        return 0.5 * (1.0 + t) + 0.5 * pre * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * pre * pre)
    if activation == "relu":
        return (pre > 0).to(pre.dtype)
    raise ValueError(f"activation: unknown activation {activation!r}")


def dropout_scale(rows: int, cols: int, p: float, seed: int | None, device: torch.device) -> torch.Tensor | None:
    """(rows, cols) float multiplier keep / (1 - p) of the shared Philox mask at offsets row*cols + col."""
    if p == 0.0 or seed is None:
        return None
    offsets = torch.arange(rows * cols, dtype=torch.int64, device=device).view(rows, cols)
    return _dropout.keep_mask(seed, offsets, p).to(torch.float32) / (1.0 - p)


def _as_kn(weight: torch.Tensor, in_out: bool) -> torch.Tensor:
    """The weight as a (in, out) view: no copy in either layout."""
    return weight if in_out else weight.t()


def reference_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    weight_layout: str = "out_in",
    dropout_p: float = 0.0,
    seed: int | None = None,
) -> torch.Tensor:
    """Plain differentiable torch math in ``x``'s dtype: ``dropout(act(x @ W^T + b))``; x: (..., in)."""
    x2 = x.reshape(-1, x.shape[-1])
    pre = x2 @ _as_kn(weight, weight_layout == "in_out")
    if bias is not None:
        pre = pre + bias
    y = act_fn(pre, activation)
    scale = dropout_scale(y.shape[0], y.shape[1], dropout_p, seed, y.device)
    if scale is not None:
        y = y * scale.to(y.dtype)
    return y.view(*x.shape[:-1], y.shape[-1])


def reference_feed_forward(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation: str | None = "gelu",
    dropout_p: float = 0.0,
    seed: int | None = None,
    weight_layout: str = "out_in",
) -> torch.Tensor:
    """Plain differentiable torch math: ``dropout(act(x @ W1^T + b1)) @ W2^T + b2``."""
    h = reference_linear(x, w1, b1, activation, weight_layout, dropout_p, seed)
    return reference_linear(h, w2, b2, None, weight_layout)


# ----------------------------------------------------------------------------------------------
# torch launchers (fp32 math, results in the input dtype)
# ----------------------------------------------------------------------------------------------


def _seed_int(seed: torch.Tensor | None) -> int | None:
    return None if seed is None else int(seed.item())


def _torch_linear_fwd(x, w, b, act, in_out, p, seed, save_pre):
    f32 = torch.float32
    pre = x.to(f32) @ _as_kn(w, in_out).to(f32)
    if b is not None:
        pre = pre + b.to(f32)
    y = act_fn(pre, act)
    scale = dropout_scale(pre.shape[0], pre.shape[1], p, _seed_int(seed), x.device)
    if scale is not None:
        y = y * scale
    pre_out = pre.to(x.dtype) if save_pre else x.new_empty(0)
    return y.to(x.dtype), pre_out


def _torch_dpre(dy, pre, act, p, seed):
    """fp32 d(pre) = dy * keep/(1-p) * act'(pre), and h = act(pre) * keep/(1-p)."""
    pre = pre.float()
    g = dy.float() * act_grad(pre, act)
    h = act_fn(pre, act)
    scale = dropout_scale(pre.shape[0], pre.shape[1], p, _seed_int(seed), pre.device)
    if scale is not None:
        g, h = g * scale, h * scale
    return g, h


def _torch_linear_bwd(dy, x, w, b, pre, act, in_out, p, seed):
    f32 = torch.float32
    wkn = _as_kn(w, in_out).to(f32)
    if act != "none" or p > 0.0:
        if pre.numel() == 0:
            pre = x.to(f32) @ wkn + (b.to(f32) if b is not None else 0.0)
        g, _ = _torch_dpre(dy, pre, act, p, seed)
    else:
        g = dy.to(f32)
    xf = x.to(f32)
    dx = g @ wkn.t()
    dw = xf.t() @ g if in_out else g.t() @ xf
    db = g.sum(0).to(x.dtype) if b is not None else x.new_empty(0)
    return dx.to(x.dtype), dw.to(w.dtype), db


def _torch_ffn_fwd(x, w1, b1, w2, b2, act, in_out, p, seed, save_pre):
    h, pre = _torch_linear_fwd(x, w1, b1, act, in_out, p, seed, save_pre)
    out, _ = _torch_linear_fwd(h, w2, b2, "none", in_out, 0.0, None, False)
    return out, pre


def _torch_ffn_bwd(dout, x, w1, b1, w2, b2, pre, act, in_out, p, seed):
    f32 = torch.float32
    w1kn, w2kn = _as_kn(w1, in_out).to(f32), _as_kn(w2, in_out).to(f32)
    xf, g2 = x.to(f32), dout.to(f32)
    if pre.numel() == 0:
        pre = xf @ w1kn + (b1.to(f32) if b1 is not None else 0.0)
    dh = g2 @ w2kn.t()
    g1, h = _torch_dpre(dh, pre, act, p, seed)
    # h is rounded to the input dtype as the forward's h was
    h = h.to(x.dtype).to(f32)
    dw2 = h.t() @ g2 if in_out else g2.t() @ h
    dw1 = xf.t() @ g1 if in_out else g1.t() @ xf
    dx = g1 @ w1kn.t()
    db1 = g1.sum(0).to(x.dtype) if b1 is not None else x.new_empty(0)
    db2 = g2.sum(0).to(x.dtype) if b2 is not None else x.new_empty(0)
    return dx.to(x.dtype), dw1.to(w1.dtype), db1, dw2.to(w2.dtype), db2


# ----------------------------------------------------------------------------------------------
# triton launchers
# ----------------------------------------------------------------------------------------------

_INTERP_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 4}


def _gemm_configs():
    import triton

    cfg = []
    # bf16/fp16 tiles that fit sm80 (164 KiB) and sm90 (228 KiB) shared memory; configs that do not fit
    # (fp32 inputs) fail to compile and the autotuner skips them
    for bm, bn, bk, warps, stages in (
        (128, 256, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 3),
    ):
        cfg.append(
            triton.Config(
                {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages
            )
        )
    return cfg


_TUNED = None


def _gemm_kernel():
    """The GEMM kernel: autotuned on GPU (keyed on power-of-two buckets of M, N, K), plain under the interpreter."""
    global _TUNED
    from fastformer.kernels import ffn as K

    if utils.interpreting():
        return K.linear_kernel, _INTERP_CONFIG
    if _TUNED is None:
        import triton

        _TUNED = triton.autotune(configs=_gemm_configs(), key=["M_BUCKET", "N_BUCKET", "K_BUCKET", "EPILOGUE"])(
            K.linear_kernel
        )
    return _TUNED, {}


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype != torch.float32 or utils.interpreting():
        return "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _bucket(n: int) -> int:
    return min(utils.next_pow2(n), 1 << 16)


def _mm(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
    act: str = "none",
    epilogue: int = 0,
    p: float = 0.0,
    seed: int | None = None,
    pre: torch.Tensor | None = None,
    h: torch.Tensor | None = None,
    store_pre: bool = False,
) -> torch.Tensor:
    """c = epilogue(a @ b) for strided 2-D views a (M, K), b (K, N); c, pre and h are contiguous (M, N).

    epilogue 0: c = dropout(act(acc + bias)), optionally writing acc + bias to ``pre``.
    epilogue 1: c = acc * act'(pre) * keep/(1-p), optionally writing h = act(pre) * keep/(1-p) to ``h``.
    """
    M, Kd = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    kernel, meta = _gemm_kernel()
    block_m = meta.get("BLOCK_M")

    def grid(m):
        return (utils.cdiv(M, m["BLOCK_M"]) * utils.cdiv(N, m["BLOCK_N"]),)

    dummy = c
    kernel[grid if block_m is None else grid(meta)](
        a, b, c,
        bias if bias is not None else dummy,
        pre if pre is not None else dummy,
        h if h is not None else dummy,
        M, N, Kd,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        seed if seed is not None else 0,
        _dropout.threshold24(p),
        1.0 / (1.0 - p),
        _bucket(M), _bucket(N), _bucket(Kd),
        HAS_BIAS=bias is not None,
        ACT=_ACT_CODE[act],
        DROPOUT=p > 0.0,
        EPILOGUE=epilogue,
        STORE_AUX=store_pre if epilogue == 0 else h is not None,
        DOT_PRECISION=_dot_precision(a.dtype),
        **meta,
    )  # fmt: skip
    return c


def _triton_act_grad(dy: torch.Tensor, pre: torch.Tensor, act: str, p: float, seed: int | None) -> torch.Tensor:
    """d(pre) = dy * act'(pre) * keep/(1-p) in one elementwise pass; dy may be strided, pre is contiguous."""
    from fastformer.kernels import ffn as K

    M, N = pre.shape
    out = torch.empty_like(pre)
    if M == 0 or N == 0:
        return out
    block_n = min(utils.next_pow2(N), 1024)
    block_m = max(1, 4096 // block_n)
    grid = (utils.cdiv(M, block_m), utils.cdiv(N, block_n))
    K.act_grad_kernel[grid](
        dy, pre, out, M, N, dy.stride(0), dy.stride(1),
        seed if seed is not None else 0, _dropout.threshold24(p), 1.0 / (1.0 - p),
        ACT=_ACT_CODE[act], DROPOUT=p > 0.0, BLOCK_M=block_m, BLOCK_N=block_n,
    )  # fmt: skip
    return out


def _triton_linear_fwd(x, w, b, act, in_out, p, seed, save_pre):
    M, N = x.shape[0], w.shape[1] if in_out else w.shape[0]
    pre = torch.empty((M, N), dtype=x.dtype, device=x.device) if save_pre else x.new_empty(0)
    y = _mm(x, _as_kn(w, in_out), out_dtype=x.dtype, bias=b, act=act, p=p, seed=_seed_int(seed),
            pre=pre if save_pre else None, store_pre=save_pre)  # fmt: skip
    return y, pre


def _triton_recompute_pre(x, w, b, in_out):
    return _mm(x, _as_kn(w, in_out), out_dtype=x.dtype, bias=b)


def _triton_linear_bwd(dy, x, w, b, pre, act, in_out, p, seed):
    wkn = _as_kn(w, in_out)
    if act != "none" or p > 0.0:
        if pre.numel() == 0:
            pre = _triton_recompute_pre(x, w, b, in_out)
        g = _triton_act_grad(dy, pre, act, p, _seed_int(seed))
    else:
        g = dy
    dx = _mm(g, wkn.t(), out_dtype=x.dtype)
    dw = _mm(x.t(), g, out_dtype=w.dtype) if in_out else _mm(g.t(), x, out_dtype=w.dtype)
    db = g.sum(0, dtype=torch.float32).to(x.dtype) if b is not None else x.new_empty(0)
    return dx, dw, db


def _triton_ffn_fwd(x, w1, b1, w2, b2, act, in_out, p, seed, save_pre):
    h, pre = _triton_linear_fwd(x, w1, b1, act, in_out, p, seed, save_pre)
    out = _mm(h, _as_kn(w2, in_out), out_dtype=x.dtype, bias=b2)
    return out, pre


def _triton_ffn_bwd(dout, x, w1, b1, w2, b2, pre, act, in_out, p, seed):
    if pre.numel() == 0:
        pre = _triton_recompute_pre(x, w1, b1, in_out)
    w1kn, w2kn = _as_kn(w1, in_out), _as_kn(w2, in_out)
    h = torch.empty_like(pre)
    # dh = dout @ W2, with act'(pre) and the dropout mask applied in the epilogue -> d(pre); h rebuilt alongside
    g1 = _mm(dout, w2kn.t(), out_dtype=x.dtype, act=act, epilogue=1, p=p, seed=_seed_int(seed), pre=pre, h=h)
    dw2 = _mm(h.t(), dout, out_dtype=w2.dtype) if in_out else _mm(dout.t(), h, out_dtype=w2.dtype)
    dw1 = _mm(x.t(), g1, out_dtype=w1.dtype) if in_out else _mm(g1.t(), x, out_dtype=w1.dtype)
    dx = _mm(g1, w1kn.t(), out_dtype=x.dtype)
    db1 = g1.sum(0, dtype=torch.float32).to(x.dtype) if b1 is not None else x.new_empty(0)
    db2 = dout.sum(0, dtype=torch.float32).to(x.dtype) if b2 is not None else x.new_empty(0)
    return dx, dw1, db1, dw2, db2


# ----------------------------------------------------------------------------------------------
# cuda launchers: cuBLAS GEMMs (torch.matmul) + csrc/ffn.cu elementwise kernels
# ----------------------------------------------------------------------------------------------


def _cuda_bias_act(z: torch.Tensor, b, act: str, p: float, seed, store_pre: bool) -> torch.Tensor:
    """y = dropout(act(z + b)); z (contiguous fp32-or-dtype GEMM result) becomes z + b in place if store_pre."""
    from fastformer import _ext

    M, N = z.shape
    y = torch.empty_like(z)
    if z.numel() == 0:
        return y
    s = _seed_int(seed)
    _ext.load().ffn_bias_act_fwd(
        z.data_ptr(), b.data_ptr() if b is not None else 0, y.data_ptr(), int(store_pre), M, N,
        _ACT_CODE[act], s if s is not None else 0, float(p), _dropout.threshold24(p), utils.DTYPE_CODE[z.dtype],
        utils.stream_handle(z.device),
    )  # fmt: skip
    return y


def _cuda_act_bwd(g: torch.Tensor, pre: torch.Tensor, act: str, p: float, seed, h: torch.Tensor | None) -> None:
    """In place: g <- g * act'(pre) * keep/(1-p); if h is given, h <- act(pre) * keep/(1-p)."""
    from fastformer import _ext

    M, N = pre.shape
    if pre.numel() == 0:
        return
    s = _seed_int(seed)
    _ext.load().ffn_act_bwd(
        g.data_ptr(), pre.data_ptr(), h.data_ptr() if h is not None else 0, M, N,
        _ACT_CODE[act], s if s is not None else 0, float(p), _dropout.threshold24(p), utils.DTYPE_CODE[pre.dtype],
        utils.stream_handle(pre.device),
    )  # fmt: skip


def _cuda_linear_fwd(x, w, b, act, in_out, p, seed, save_pre):
    z = torch.matmul(x, _as_kn(w, in_out)).contiguous()
    y = _cuda_bias_act(z, b, act, p, seed, store_pre=save_pre)
    return y, (z if save_pre else x.new_empty(0))


def _cuda_recompute_pre(x, w, b, in_out):
    wkn = _as_kn(w, in_out)
    return (torch.addmm(b, x, wkn) if b is not None else torch.matmul(x, wkn)).contiguous()


def _cuda_linear_bwd(dy, x, w, b, pre, act, in_out, p, seed):
    wkn = _as_kn(w, in_out)
    if act != "none" or p > 0.0:
        if pre.numel() == 0:
            pre = _cuda_recompute_pre(x, w, b, in_out)
        g = dy.clone(memory_format=torch.contiguous_format)  # d(pre) is written over it in place
        _cuda_act_bwd(g, pre, act, p, seed, None)
    else:
        g = dy
    dx = torch.matmul(g, wkn.t())
    dw = torch.matmul(x.t(), g) if in_out else torch.matmul(g.t(), x)
    db = g.sum(0, dtype=torch.float32).to(x.dtype) if b is not None else x.new_empty(0)
    return dx.contiguous(), dw.contiguous(), db


def _cuda_ffn_fwd(x, w1, b1, w2, b2, act, in_out, p, seed, save_pre):
    h, pre = _cuda_linear_fwd(x, w1, b1, act, in_out, p, seed, save_pre)
    w2kn = _as_kn(w2, in_out)
    out = torch.addmm(b2, h, w2kn) if b2 is not None else torch.matmul(h, w2kn)
    return out.contiguous(), pre


def _cuda_ffn_bwd(dout, x, w1, b1, w2, b2, pre, act, in_out, p, seed):
    if pre.numel() == 0:
        pre = _cuda_recompute_pre(x, w1, b1, in_out)
    w1kn, w2kn = _as_kn(w1, in_out), _as_kn(w2, in_out)
    g1 = torch.matmul(dout, w2kn.t()).contiguous()  # dh, turned into d(pre) in place below
    h = torch.empty_like(pre)
    _cuda_act_bwd(g1, pre, act, p, seed, h)
    dw2 = torch.matmul(h.t(), dout) if in_out else torch.matmul(dout.t(), h)
    dw1 = torch.matmul(x.t(), g1) if in_out else torch.matmul(g1.t(), x)
    dx = torch.matmul(g1, w1kn.t())
    db1 = g1.sum(0, dtype=torch.float32).to(x.dtype) if b1 is not None else x.new_empty(0)
    db2 = dout.sum(0, dtype=torch.float32).to(x.dtype) if b2 is not None else x.new_empty(0)
    return dx.contiguous(), dw1.contiguous(), db1, dw2.contiguous(), db2


_IMPL = {
    "linear_fwd": {"torch": _torch_linear_fwd, "triton": _triton_linear_fwd, "cuda": _cuda_linear_fwd},
    "linear_bwd": {"torch": _torch_linear_bwd, "triton": _triton_linear_bwd, "cuda": _cuda_linear_bwd},
    "ffn_fwd": {"torch": _torch_ffn_fwd, "triton": _triton_ffn_fwd, "cuda": _cuda_ffn_fwd},
    "ffn_bwd": {"torch": _torch_ffn_bwd, "triton": _triton_ffn_bwd, "cuda": _cuda_ffn_bwd},
}


# ----------------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("fastformer::linear_fwd", mutates_args=())
def _linear_fwd_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    in_out: bool,
    dropout_p: float,
    seed: torch.Tensor | None,
    save_pre: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (M, K) -> (y (M, N), pre (M, N) when save_pre else (0,))."""
    return _IMPL["linear_fwd"][backend](x, weight, bias, activation, in_out, dropout_p, seed, save_pre)


@_linear_fwd_op.register_fake
def _(x, weight, bias, activation, in_out, dropout_p, seed, save_pre, backend):
    n = weight.shape[1] if in_out else weight.shape[0]
    y = x.new_empty((x.shape[0], n))
    return y, (x.new_empty((x.shape[0], n)) if save_pre else x.new_empty(0))


@torch.library.custom_op("fastformer::linear_bwd", mutates_args=())
def _linear_bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pre: torch.Tensor,
    activation: str,
    in_out: bool,
    dropout_p: float,
    seed: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx (M, K), dweight (weight's shape), dbias (N,) or (0,) without bias)."""
    return _IMPL["linear_bwd"][backend](dy, x, weight, bias, pre, activation, in_out, dropout_p, seed)


@_linear_bwd_op.register_fake
def _(dy, x, weight, bias, pre, activation, in_out, dropout_p, seed, backend):
    db = x.new_empty(bias.shape) if bias is not None else x.new_empty(0)
    return x.new_empty(x.shape), weight.new_empty(weight.shape), db


def _linear_setup(ctx, inputs, output):
    x, weight, bias, activation, in_out, dropout_p, seed, _save_pre, backend = inputs
    ctx.save_for_backward(x, weight, bias, output[1], seed)
    ctx.cfg = (activation, in_out, dropout_p, backend)


def _linear_backward(ctx, dy, _dpre):
    x, weight, bias, pre, seed = ctx.saved_tensors
    activation, in_out, dropout_p, backend = ctx.cfg
    dx, dw, db = _linear_bwd_op(dy, x, weight, bias, pre, activation, in_out, dropout_p, seed, backend)
    return dx, dw, (db if bias is not None else None), None, None, None, None, None, None


_linear_fwd_op.register_autograd(_linear_backward, setup_context=_linear_setup)


@torch.library.custom_op("fastformer::ffn_fwd", mutates_args=())
def _ffn_fwd_op(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation: str,
    in_out: bool,
    dropout_p: float,
    seed: torch.Tensor | None,
    save_pre: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (M, d) -> (out (M, d_out), pre (M, d_ff) when save_pre else (0,))."""
    return _IMPL["ffn_fwd"][backend](x, w1, b1, w2, b2, activation, in_out, dropout_p, seed, save_pre)


@_ffn_fwd_op.register_fake
def _(x, w1, b1, w2, b2, activation, in_out, dropout_p, seed, save_pre, backend):
    d_ff = w1.shape[1] if in_out else w1.shape[0]
    d_out = w2.shape[1] if in_out else w2.shape[0]
    pre = x.new_empty((x.shape[0], d_ff)) if save_pre else x.new_empty(0)
    return x.new_empty((x.shape[0], d_out)), pre


@torch.library.custom_op("fastformer::ffn_bwd", mutates_args=())
def _ffn_bwd_op(
    dout: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    pre: torch.Tensor,
    activation: str,
    in_out: bool,
    dropout_p: float,
    seed: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx, dw1, db1, dw2, db2); a missing bias gets a (0,) gradient."""
    return _IMPL["ffn_bwd"][backend](dout, x, w1, b1, w2, b2, pre, activation, in_out, dropout_p, seed)


@_ffn_bwd_op.register_fake
def _(dout, x, w1, b1, w2, b2, pre, activation, in_out, dropout_p, seed, backend):
    db1 = x.new_empty(b1.shape) if b1 is not None else x.new_empty(0)
    db2 = x.new_empty(b2.shape) if b2 is not None else x.new_empty(0)
    return x.new_empty(x.shape), w1.new_empty(w1.shape), db1, w2.new_empty(w2.shape), db2


def _ffn_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, activation, in_out, dropout_p, seed, _save_pre, backend = inputs
    ctx.save_for_backward(x, w1, b1, w2, b2, output[1], seed)
    ctx.cfg = (activation, in_out, dropout_p, backend)


def _ffn_backward(ctx, dout, _dpre):
    x, w1, b1, w2, b2, pre, seed = ctx.saved_tensors
    activation, in_out, dropout_p, backend = ctx.cfg
    dx, dw1, db1, dw2, db2 = _ffn_bwd_op(dout, x, w1, b1, w2, b2, pre, activation, in_out, dropout_p, seed, backend)
    db1 = db1 if b1 is not None else None
    db2 = db2 if b2 is not None else None
    return dx, dw1, db1, dw2, db2, None, None, None, None, None, None


_ffn_fwd_op.register_autograd(_ffn_backward, setup_context=_ffn_setup)


# ----------------------------------------------------------------------------------------------
# validation and public functions
# ----------------------------------------------------------------------------------------------


def _check_activation(activation) -> str:
    if activation is not None and not isinstance(activation, str):
        raise TypeError(f"activation must be None or a str, got {type(activation).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    return "none" if activation is None else activation


def _check_layout(weight_layout) -> bool:
    if weight_layout not in _LAYOUTS:
        raise ValueError(f"weight_layout must be one of {_LAYOUTS}, got {weight_layout!r}")
    return weight_layout == "in_out"


def _check_weight(w, name: str, x, in_features: int, in_out: bool, x_name: str = "x.shape[-1]") -> int:
    """Checks a weight against ``x`` (dtype, device) and ``in_features``; returns its out_features."""
    utils.check_float(w, name)
    utils.check_like(w, name, x, "x")
    if w.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(w.shape)}")
    w_in, w_out = (w.shape[0], w.shape[1]) if in_out else (w.shape[1], w.shape[0])
    if w_in != in_features:
        layout = "(in_features, out_features)" if in_out else "(out_features, in_features)"
        raise ValueError(
            f"{name} has in_features {w_in} (shape {tuple(w.shape)} read as {layout}) but {x_name} is "
            f"{in_features}; in_features mismatch"
        )
    return w_out


def _check_bias(b, name: str, x, out_features: int) -> None:
    if b is None:
        return
    utils.check_float(b, name)
    utils.check_like(b, name, x, "x")
    if b.dim() != 1 or b.shape[0] != out_features:
        raise ValueError(f"{name} must have shape ({out_features},), got {tuple(b.shape)}")


def _check_x(x) -> None:
    utils.check_float(x, "x")
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., in_features)")


def _resolve_backend(op: str, x: torch.Tensor, backend: str | None, empty: bool) -> str:
    # every backend serves every float dtype and shape; only device-level reasons can refuse one
    name = backends.select(op, x.device, backend)
    # nothing to compute on empty problems: the reference handles every degenerate shape
    return "torch" if empty else name


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    weight_layout: str = "out_in",
    recompute: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """``act(x @ W^T + b)`` with the bias and activation fused into the GEMM.

    Args:
        x: (..., in_features).
        weight: (out_features, in_features) (``nn.Linear``), or (in_features, out_features) with
            ``weight_layout="in_out"`` (GPT-2 ``Conv1D``), read through strides without a copy.
        bias: (out_features,) or None.
        activation: None, "gelu" (erf), "gelu_tanh" (GPT-2 gelu_new) or "relu".
        recompute: do not keep the pre-activation for backward; recompute it there with one GEMM.
        backend: "triton", "cuda", "torch" or "auto" (default: see :mod:`fastformer.backends`).

    Returns:
        (..., out_features) in ``x``'s dtype (autocast's dtype when autocast is on, as for ``F.linear``).
    """
    x, weight, bias = utils.autocast_args(x, weight, bias)
    _check_x(x)
    in_out = _check_layout(weight_layout)
    act = _check_activation(activation)
    n = _check_weight(weight, "weight", x, x.shape[-1], in_out)
    _check_bias(bias, "bias", x, n)
    x2 = x.reshape(-1, x.shape[-1])
    name = _resolve_backend("linear", x, backend, x2.numel() == 0 or n == 0)
    save_pre = act != "none" and not recompute
    y, _ = _linear_fwd_op(x2, weight, bias, act, in_out, 0.0, None, save_pre, name)
    return y.view(*x.shape[:-1], n)


def feed_forward(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation: str | None = "gelu",
    dropout_p: float = 0.0,
    *,
    weight_layout: str = "out_in",
    recompute: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """The Transformer feed-forward block ``dropout(act(x @ W1^T + b1)) @ W2^T + b2``.

    Args:
        x: (..., d_model).
        w1: (d_ff, d_model), b1: (d_ff,) or None; w2: (d_out, d_ff), b2: (d_out,) or None
            (``nn.Linear`` layout; with ``weight_layout="in_out"`` the transposes, as GPT-2 ``Conv1D``).
        activation: None, "gelu", "gelu_tanh" or "relu".
        dropout_p: dropout on the hidden activation, in [0, 1) (pass 0 in eval mode).
        recompute: keep only ``x`` for backward and recompute the (..., d_ff) pre-activation there.
        backend: "triton", "cuda", "torch" or "auto".

    Returns:
        (..., d_out) in ``x``'s dtype.
    """
    x, w1, b1, w2, b2 = utils.autocast_args(x, w1, b1, w2, b2)
    _check_x(x)
    in_out = _check_layout(weight_layout)
    act = _check_activation(activation)
    p = _dropout.check_p(dropout_p, "dropout_p")
    d_ff = _check_weight(w1, "w1", x, x.shape[-1], in_out)
    _check_bias(b1, "b1", x, d_ff)
    d_out = _check_weight(w2, "w2", x, d_ff, in_out, x_name="w1's out_features (d_ff)")
    _check_bias(b2, "b2", x, d_out)
    x2 = x.reshape(-1, x.shape[-1])
    name = _resolve_backend("feed_forward", x, backend, x2.numel() == 0 or d_ff == 0 or d_out == 0)
    seed = _dropout.new_seed(p)
    out, _ = _ffn_fwd_op(x2, w1, b1, w2, b2, act, in_out, p, seed, not recompute, name)
    return out.view(*x.shape[:-1], d_out)
