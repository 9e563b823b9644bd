"""LayerNorm modules on the fused kernels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastformer.nn._checks import check_eps, check_shape
from fastformer.ops import dropout
from fastformer.ops.layer_norm import dropout_add_layer_norm, layer_norm


class LayerNorm(torch.nn.LayerNorm):
    """Drop-in for ``torch.nn.LayerNorm``: same constructor, parameters and ``state_dict`` keys.

    ``backend`` pins this module to one backend (None follows ``use_backend`` / ``FASTFORMER_BACKEND``).
    ``normalized_shape`` (a positive int or a non-empty sequence of them) and ``eps`` (finite, >= 0) are checked
    here: TypeError or ValueError naming the argument.
    """

    def __init__(self, normalized_shape: int | Sequence[int], *args, backend: str | None = None, **kwargs) -> None:
        super().__init__(check_shape(normalized_shape), *args, **kwargs)
        check_eps(self.eps)
        self.backend = backend

    def forward(self, input: Tensor) -> Tensor:
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, backend=self.backend)


class DropoutAddLayerNorm(torch.nn.LayerNorm):
    """``s = dropout(x) + residual; out = LayerNorm(s)`` in one kernel; ``forward`` returns ``(out, s)``.

    Parameters and ``state_dict`` keys are those of ``torch.nn.LayerNorm(hidden)``, so a transformer block's
    existing LayerNorm weights load unchanged. Dropout applies only in training mode.
    """

    def __init__(
        self, hidden: int, dropout_p: float = 0.0, eps: float = 1e-5, *, backend: str | None = None, **kwargs
    ) -> None:
        super().__init__(check_shape(hidden, "hidden"), eps=check_eps(eps), **kwargs)
        self.dropout_p = dropout.check_p(dropout_p)
        self.backend = backend

    def forward(self, x: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return dropout_add_layer_norm(
            x,
            residual,
            self.weight,
            self.bias,
            dropout_p=self.dropout_p,
            eps=self.eps,
            training=self.training,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dropout_p={self.dropout_p}"
