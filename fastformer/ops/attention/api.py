"""Attention's public functions and their input checks: ``attention``, ``attention_varlen``, ``unpad_input`` and
``pad_input`` (the SDPA drop-in is in ``sdpa``)."""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from fastformer import backends, utils
from fastformer.ops import _custom, dropout
from fastformer.ops.attention import cuda_impl
from fastformer.ops.attention.op import AttentionArgs, attention_fwd, run_fwd


def fused_head_dim_reason(d: int) -> str | None:
    """Why the fused kernels cannot take head dimension ``d`` (the torch backend takes any), or None."""
    if d % 8 != 0 or not 8 <= d <= 256:
        return f"head dimension {d} is not supported by the fused kernels (a multiple of 8 in [8, 256])"
    return None


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank: int) -> None:
    utils.check_float(q, "q", (*utils.FLOAT_DTYPES, torch.float64))
    utils.check_like(k, "k", q, "q")
    utils.check_like(v, "v", q, "q")
    layout = "(batch, seqlen, nheads, headdim)" if rank == 4 else "(total_tokens, nheads, headdim)"
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        if t.dim() != rank:
            raise ValueError(f"{name} must be {rank}-D {layout}, got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if rank == 4 and k.shape[0] != q.shape[0]:
        raise ValueError(f"k: batch size {k.shape[0]} does not match q's {q.shape[0]}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k: head dimension {k.shape[-1]} does not match q's {q.shape[-1]}")
    h, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or h % hkv != 0:
        raise ValueError(f"k: number of kv heads ({hkv}) must divide the number of query heads ({h})")
    if q.shape[-1] == 0:
        raise ValueError("q: head dimension must be at least 1, got 0")


def _why_not(backend: str, scale: float, q: torch.Tensor) -> str | None:
    """Why ``backend`` cannot serve this call, or None: the torch backend serves every shape and float dtype."""
    if backend == "torch":
        return None
    if q.dtype == torch.float64:
        return "float64 is served by the torch backend only"
    why = fused_head_dim_reason(q.shape[-1])
    if why is not None:
        return why
    if backend == "cuda":
        return cuda_impl.reason(q)
    if backend == "triton":
        if q.dtype == torch.bfloat16 and q.device.type == "cpu":
            return "the Triton interpreter computes bfloat16 wrongly (test bfloat16 on a GPU)"
        if not 0.0 < scale < math.inf:
            return f"the Triton kernels fold the softmax scale into exp2 and need a positive finite scale, got {scale}"
    return None


def _check_scale(softmax_scale: float | None, d: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    return float(softmax_scale)


def _check_bool_or_int(t: torch.Tensor, name: str, meaning: str = "") -> None:
    utils.check_tensor(t, name)
    if t.dtype.is_floating_point or t.dtype.is_complex:
        raise TypeError(f"{name} must be bool or integer{meaning}, got {t.dtype}")


def _check_mask(mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    _check_bool_or_int(mask, "key_padding_mask", " (True/1 = attend)")
    utils.check_device(mask, "key_padding_mask", q, "q")
    if mask.shape != (k.shape[0], k.shape[1]):
        raise ValueError(
            f"key_padding_mask must have shape (batch, seqlen_k) = ({k.shape[0]}, {k.shape[1]}), "
            f"got {tuple(mask.shape)}"
        )
    return mask if mask.dtype == torch.bool else mask != 0


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ · scale) v over each head, fused (the S×S matrix is never stored).

    Args:
        q: (B, Sq, H, D); k, v: (B, Sk, Hkv, D) with H % Hkv == 0 (GQA/MQA). Any strides with the last
            dimension contiguous are used in place (e.g. views of a packed (B, S, 3, H, D) projection).
        causal: query i sees keys j <= i + Sk - Sq (bottom-right aligned).
        key_padding_mask: (B, Sk) bool or integer, True/1 = attend.
        softmax_scale: defaults to 1/sqrt(D).
        dropout_p: dropout on the attention probabilities, in [0, 1).
        backend: "triton", "cuda", "torch" or "auto" (see fastformer.backends).

    Returns:
        (B, Sq, H, D) in q's dtype. Rows that see no key are 0 (and get zero gradient).

    Determinism: the Triton backward adds each key tile's share of dq into an fp32 buffer with atomics
    (FlashAttention-2's 5 matmuls), so dq's last bits may vary between runs; under
    ``torch.use_deterministic_algorithms(True)`` it runs a separate dq pass instead (7 matmuls, slower) and every
    gradient is bitwise reproducible. The same holds for :func:`attention_varlen`.
    """
    q, k, v = utils.autocast_args(q, k, v)
    _check_qkv(q, k, v, rank=4)
    mask = _check_mask(key_padding_mask, q, k)
    scale = _check_scale(softmax_scale, q.shape[-1])
    p = dropout.check_p(dropout_p)
    name = backends.select("attention", q.device, backend, lambda b: _why_not(b, scale, q))
    a = AttentionArgs(
        q, k, v, mask, None, None, dropout.new_seed(p), q.shape[1], k.shape[1], bool(causal), scale, p, name
    )
    return _custom.invoke(attention_fwd, run_fwd, a)[0]


def _check_cu(cu: torch.Tensor, name: str, q: torch.Tensor) -> None:
    utils.check_tensor(cu, name)
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be 1-D of length batch + 1, got shape {tuple(cu.shape)}")
    utils.check_device(cu, name, q, "q")


def _values_unknown(t: torch.Tensor) -> bool:
    """Whether ``t``'s values cannot be read here: while tracing (torch.compile), for meta and fake tensors (shape
    inference) and during CUDA graph capture; value checks are skipped then, the shape checks still run."""
    if torch.compiler.is_compiling() or t.is_meta or is_fake(t):
        return True
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


# index tensors already checked (cu_seqlens, pad_input's indices), with their version counter and the bounds they
# were checked against: a model passes one tensor through every layer, so its values are read back once per
# forward, not per layer (keyed by id with a weak reference: a WeakKeyDictionary would compare tensors with ==)
_CHECKED_CU: dict[int, tuple[weakref.ref, tuple]] = {}


def _already_checked(t: torch.Tensor, key: tuple) -> bool:
    seen = _CHECKED_CU.get(id(t))
    return seen is not None and seen[0]() is t and seen[1] == (t._version, *key)


def _remember_checked(t: torch.Tensor, key: tuple) -> None:
    _CHECKED_CU[id(t)] = (weakref.ref(t, lambda _, i=id(t): _CHECKED_CU.pop(i, None)), (t._version, *key))


def _check_cu_values(cu: torch.Tensor, name: str, total: int, max_seqlen: int, max_name: str) -> None:
    # one small host read; skipped where values are unknown (tracing, meta and fake tensors)
    if _values_unknown(cu):
        return
    if cu.numel() < 2:
        if cu.numel() == 1 and int(cu[0]) != 0:
            raise ValueError(f"{name}[0] must be 0")
        return
    key = ("cu", total, max_seqlen)
    if _already_checked(cu, key):
        return
    lens = cu[1:] - cu[:-1]
    first, last, lo, hi = torch.stack([cu[0], cu[-1], lens.min(), lens.max()]).tolist()
    if first != 0 or lo < 0:
        raise ValueError(f"{name} must start at 0 and be non-decreasing")
    if last > total:
        raise ValueError(f"{name}[-1] = {last} exceeds the {total} packed tokens")
    if hi > max_seqlen:
        raise ValueError(f"{max_name} = {max_seqlen} is smaller than the longest sequence ({hi}) in {name}")
    _remember_checked(cu, key)


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention over a batch of packed sequences of different lengths (no padding is computed).

    Args:
        q: (total_q, H, D); k, v: (total_k, Hkv, D); sequence b occupies rows
            cu_seqlens_q[b]:cu_seqlens_q[b+1] of q and cu_seqlens_k[b]:cu_seqlens_k[b+1] of k and v.
        cu_seqlens_q, cu_seqlens_k: (B + 1,) int32/int64 prefix sums starting at 0.
        max_seqlen_q, max_seqlen_k: upper bounds of the sequence lengths (sizes the launch grid).
        causal: per sequence, bottom-right aligned as in :func:`attention`.

    Returns:
        (total_q, H, D); rows past cu_seqlens_q[-1] are 0.

    Determinism of the backward: as in :func:`attention`.
    """
    q, k, v = utils.autocast_args(q, k, v)
    _check_qkv(q, k, v, rank=3)
    _check_cu(cu_seqlens_q, "cu_seqlens_q", q)
    _check_cu(cu_seqlens_k, "cu_seqlens_k", q)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), got "
            f"{cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}"
        )
    for val, nm in ((max_seqlen_q, "max_seqlen_q"), (max_seqlen_k, "max_seqlen_k")):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise ValueError(f"{nm} must be a non-negative int, got {val!r}")
    _check_cu_values(cu_seqlens_q, "cu_seqlens_q", q.shape[0], max_seqlen_q, "max_seqlen_q")
    _check_cu_values(cu_seqlens_k, "cu_seqlens_k", k.shape[0], max_seqlen_k, "max_seqlen_k")
    scale = _check_scale(softmax_scale, q.shape[-1])
    p = dropout.check_p(dropout_p)
    name = backends.select("attention_varlen", q.device, backend, lambda b: _why_not(b, scale, q))
    cu = (cu_seqlens_q, cu_seqlens_k)
    a = AttentionArgs(q, k, v, None, *cu, dropout.new_seed(p), max_seqlen_q, max_seqlen_k, bool(causal), scale, p, name)
    return _custom.invoke(attention_fwd, run_fwd, a)[0]


def unpad_input(x: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Drop the padding tokens of a batch.

    Args:
        x: (B, S, ...) padded batch, of any dtype (token ids too).
        attention_mask: (B, S) bool or integer, True/1 = real token, on x's device.

    Returns:
        x_unpad (total, ...), indices (total,) int64 into the flattened (B*S) tokens, cu_seqlens (B + 1,)
        int32 and max_seqlen (int). Differentiable with respect to ``x``. The output shapes depend on the mask's
        values, so meta tensors are refused (ValueError).
    """
    utils.check_tensor(x, "x")
    _check_bool_or_int(attention_mask, "attention_mask")
    if x.dim() < 2:
        raise ValueError(
            f"x must be at least 2-D (batch, seqlen, ...) and attention_mask must have shape (batch, seqlen) of x, "
            f"got x {tuple(x.shape)} and attention_mask {tuple(attention_mask.shape)}"
        )
    if attention_mask.shape != x.shape[:2]:
        raise ValueError(
            f"attention_mask must have shape {tuple(x.shape[:2])} (batch, seqlen) of x, "
            f"got {tuple(attention_mask.shape)}"
        )
    utils.check_device(attention_mask, "attention_mask", x, "x")
    if attention_mask.is_meta:
        raise ValueError(
            "attention_mask is on meta: unpad_input needs the mask's values (the number of tokens it keeps sets the "
            "output shapes), which meta tensors do not have"
        )
    keep = attention_mask != 0
    seqlens = keep.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    max_seqlen = int(seqlens.max()) if seqlens.numel() else 0
    x_unpad = x.flatten(0, 1).index_select(0, indices)
    return x_unpad, indices, cu_seqlens, max_seqlen


def _check_size(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def pad_input(x_unpad: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of :func:`unpad_input`: scatter (total, ...) back to (batch, seqlen, ...) with zeros at padding.

    ``indices``: (total,) integer tensor (as :func:`unpad_input` returns it) on x_unpad's device, each in
    [0, batch * seqlen); ``batch``, ``seqlen``: non-negative ints.
    """
    utils.check_tensor(x_unpad, "x_unpad")
    if x_unpad.dim() < 1:
        raise ValueError("x_unpad must be at least 1-D (total, ...), got a 0-D tensor")
    utils.check_tensor(indices, "indices")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError(f"indices must be an integer tensor (int64, as unpad_input returns), got {indices.dtype}")
    utils.check_device(indices, "indices", x_unpad, "x_unpad")
    if indices.dim() != 1 or indices.shape[0] != x_unpad.shape[0]:
        raise ValueError(
            f"indices must be 1-D with one entry per row of x_unpad ({x_unpad.shape[0]}), "
            f"got shape {tuple(indices.shape)}"
        )
    _check_size(batch, "batch")
    _check_size(seqlen, "seqlen")
    n = batch * seqlen
    if indices.numel() and not _values_unknown(indices) and not _already_checked(indices, ("pad", n)):
        lo, hi = torch.stack([indices.min(), indices.max()]).tolist()  # one small host read
        if lo < 0 or hi >= n:
            raise ValueError(
                f"indices holds values in [{lo}, {hi}], outside [0, batch * seqlen) = [0, {n}) "
                f"(batch={batch}, seqlen={seqlen})"
            )
        _remember_checked(indices, ("pad", n))
    out = x_unpad.new_zeros((n, *x_unpad.shape[1:]))
    return out.index_copy(0, indices.long(), x_unpad).view(batch, seqlen, *x_unpad.shape[1:])
