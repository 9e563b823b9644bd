"""The Transformer feed-forward block as a module whose parameters are two ``nn.Linear`` layers."""

from __future__ import annotations

import torch
from torch import nn

from fastformer.nn._checks import check_size
from fastformer.ops import dropout
from fastformer.ops.ffn import check_activation, feed_forward


class FeedForward(nn.Module):
    """``fc2(dropout(act(fc1(x))))`` on fastformer's fused kernels.

    ``fc1 = nn.Linear(d_model, d_ff)`` and ``fc2 = nn.Linear(d_ff, d_model)`` hold the parameters, so the
    state dict has exactly the keys of that pair (``fc1.weight``, ``fc1.bias``, ``fc2.weight``, ``fc2.bias``)
    and weights of existing models load unchanged.

    Args:
        d_model: input and output features (a positive int).
        d_ff: hidden features (a positive int, typically 4 * d_model).
        activation: None, "gelu", "gelu_tanh" or "relu".
        dropout_p: dropout probability on the hidden activation while training, in [0, 1).
        bias: whether both layers have a bias.
        backend: fixed backend for this module (default: the ambient selection).
        recompute: recompute the hidden pre-activation in backward instead of keeping it.
        device, dtype: of the parameters, as for ``torch.nn`` modules.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        activation: str | None = "gelu",
        dropout_p: float = 0.0,
        bias: bool = True,
        *,
        backend: str | None = None,
        recompute: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        d_model, d_ff = check_size(d_model, "d_model"), check_size(d_ff, "d_ff")
        check_activation(activation)
        self.activation = activation
        self.dropout_p = dropout.check_p(dropout_p)
        self.recompute = recompute
        self.backend = backend
        self.fc1 = nn.Linear(d_model, d_ff, bias=bias, device=device, dtype=dtype)
        self.fc2 = nn.Linear(d_ff, d_model, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_model) -> (..., d_model)."""
        p = self.dropout_p if self.training else 0.0
        return feed_forward(
            x,
            self.fc1.weight,
            self.fc1.bias,
            self.fc2.weight,
            self.fc2.bias,
            self.activation,
            p,
            recompute=self.recompute,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, dropout_p={self.dropout_p}, recompute={self.recompute}"
