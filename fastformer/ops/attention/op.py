"""The attention custom ops: :class:`AttentionArgs`, ``fastformer::attention_fwd`` / ``attention_bwd``, autograd.

The forward returns ``(out, lse)`` for dense q (B, Sq, H, D) or, with cu_seqlens, packed q (total_q, H, D);
the backward recomputes the scores blockwise from the saved ``out`` and ``lse`` (FlashAttention-2 style) and
regenerates the dropout mask from the seed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from fastformer.ops import _custom


def lastdim(t: Tensor) -> Tensor:
    """``t``, copied once when its head dimension is strided: the kernels index it with unit stride."""
    return t if t.stride(-1) == 1 else t.contiguous()


@dataclass(frozen=True)
class AttentionArgs(_custom.OpArgs):
    """Every input of an attention call; the backward op takes ``dout, out, lse`` in front of these.

    The shape and stride helpers give every launcher its sizes in one form: batch/head/seq strides as (b, s, h)
    triples (varlen: b-stride 0, the sequence starts come from cu_seqlens).
    """

    OP = "attention"

    q: Tensor  # (B, Sq, H, D), or packed (total_q, H, D) with cu_seqlens
    k: Tensor  # (B, Sk, Hkv, D), or packed (total_k, Hkv, D)
    v: Tensor  # like k
    key_padding_mask: Tensor | None  # (B, Sk) bool, True = attend (dense only)
    cu_seqlens_q: Tensor | None  # (B + 1,) int32/int64 query sequence starts (varlen)
    cu_seqlens_k: Tensor | None  # (B + 1,) key sequence starts (varlen)
    seed: Tensor | None  # Philox seed (CPU int64 scalar) when dropout_p > 0
    max_seqlen_q: int  # Sq dense, the longest query sequence varlen
    max_seqlen_k: int  # Sk dense, the longest key sequence varlen
    causal: bool  # bottom-right aligned
    scale: float  # softmax scale
    dropout_p: float  # dropout on the attention probabilities
    backend: str

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def batch(self) -> int:
        return self.cu_seqlens_q.numel() - 1 if self.varlen else self.q.shape[0]

    @property
    def h(self) -> int:
        return self.q.shape[-2]

    @property
    def hkv(self) -> int:
        return self.k.shape[-2]

    @property
    def d(self) -> int:
        return self.q.shape[-1]

    @property
    def group(self) -> int:
        """Query heads per kv head."""
        return self.h // self.hkv

    @property
    def sq(self) -> int:
        return self.max_seqlen_q

    @property
    def sk(self) -> int:
        return self.max_seqlen_k

    @property
    def total_q(self) -> int:
        """Packed query rows (varlen)."""
        return self.q.shape[0]

    @property
    def drop_stride(self) -> int:
        """Row length of the dropout matrix: element (row r, key j) uses word j % 4 of the Philox call at counter
        ``r * ceil(drop_stride / 4) + j // 4``."""
        return self.sk

    @property
    def lse_shape(self) -> tuple[int, ...]:
        """(H, total_q) varlen, (B, H, Sq) dense."""
        q = self.q
        return (q.shape[1], q.shape[0]) if self.varlen else (q.shape[0], q.shape[2], q.shape[1])

    @property
    def no_rows(self) -> bool:
        """No query row to compute: the forward's outputs are empty or all padding."""
        return self.q.numel() == 0 or self.batch == 0 or self.sq == 0

    @property
    def no_pairs(self) -> bool:
        """No (query, key) pair: every gradient is zero."""
        return self.no_rows or self.k.numel() == 0 or self.sk == 0

    def bsh(self, t: Tensor) -> tuple[int, int, int]:
        """(batch, seq, head) strides of a q/k/v-shaped tensor."""
        if self.varlen:
            return 0, t.stride(0), t.stride(1)
        return t.stride(0), t.stride(1), t.stride(2)

    def strides(self, *tensors: Tensor) -> list[int]:
        """The (batch, seq, head) strides of each tensor, one triple after another."""
        return [s for t in tensors for s in self.bsh(t)]

    def lse_strides(self) -> tuple[int, int]:
        """(batch, head) strides of lse and delta; a head's rows are contiguous."""
        return (0, self.total_q) if self.varlen else (self.h * self.sq, self.sq)

    def mask_strides(self, mask: Tensor | None) -> tuple[int, int]:
        """(batch, key) strides of the key padding mask (or of its byte view), 0 when there is none."""
        return (mask.stride(0), mask.stride(1)) if mask is not None else (0, 0)

    def lse_empty(self) -> Tensor:
        return torch.empty(self.lse_shape, dtype=torch.float32, device=self.q.device)

    def lastdim(self) -> AttentionArgs:
        """The same call with q, k and v of unit head-dimension stride, as the kernels need."""
        return dataclasses.replace(self, q=lastdim(self.q), k=lastdim(self.k), v=lastdim(self.v))


def run_fwd(a: AttentionArgs) -> tuple[Tensor, Tensor]:
    """(out, lse): the forward custom op's body, also called directly in plain inference (``_custom.invoke``)."""
    return a.impl().fwd(a)


def _attention_fwd(*fields) -> tuple[Tensor, Tensor]:
    return run_fwd(AttentionArgs(*fields))


def _attention_fwd_fake(*fields) -> tuple[Tensor, Tensor]:
    a = AttentionArgs(*fields)
    return a.q.new_empty(a.q.shape), a.q.new_empty(a.lse_shape, dtype=torch.float32)


def _attention_bwd(dout: Tensor, out: Tensor, lse: Tensor, *fields) -> tuple[Tensor, Tensor, Tensor]:
    a = AttentionArgs(*fields)
    return a.impl().bwd(a, dout, out, lse)


def _attention_bwd_fake(_dout: Tensor, _out: Tensor, _lse: Tensor, *fields) -> tuple[Tensor, Tensor, Tensor]:
    a = AttentionArgs(*fields)
    return a.q.new_empty(a.q.shape), a.k.new_empty(a.k.shape), a.v.new_empty(a.v.shape)


attention_fwd = _custom.define("attention_fwd", "", AttentionArgs, "(Tensor, Tensor)", _attention_fwd)
attention_fwd.register_fake(_attention_fwd_fake)
attention_bwd = _custom.define(
    "attention_bwd", "Tensor dout, Tensor out, Tensor lse", AttentionArgs, "(Tensor, Tensor, Tensor)", _attention_bwd
)
attention_bwd.register_fake(_attention_bwd_fake)


def _setup_context(ctx, inputs, output) -> None:
    _, a = _custom.split(inputs, AttentionArgs)
    out, lse = output
    _custom.save(ctx, a, out, lse)


def _backward(ctx, dout, _dlse):
    (out, lse), a = _custom.load(ctx)
    dq, dk, dv = _custom.call(attention_bwd, dout, out, lse, *a.values())
    return a.grads(q=dq, k=dk, v=dv)


_custom.register_autograd(attention_fwd, _backward, _setup_context)
