"""Input checks shared by the models: ValueError/TypeError naming the argument, before any kernel runs."""

from __future__ import annotations

import torch

from fastformer import utils


def check_ids(ids: torch.Tensor, name: str, n_values: int | None, max_len: int | None = None) -> None:
    """``ids``: (B, T) integer token ids in [0, n_values) (unchecked when None), T <= max_len."""
    utils.check_tensor(ids, name)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"{name} must have shape (batch, seqlen), got {tuple(ids.shape)}")
    if max_len is not None and ids.shape[1] > max_len:
        raise ValueError(f"{name} has length {ids.shape[1]} but the model supports at most {max_len} positions")
    # a data-dependent check cannot be traced; compiled callers rely on the eager run having checked
    if n_values is not None and ids.numel() and not torch.compiler.is_compiling():
        lo, hi = torch.stack(torch.aminmax(ids)).tolist()  # one host sync
        if lo < 0 or hi >= n_values:
            raise ValueError(f"{name} holds values in [{lo}, {hi}], outside [0, {n_values})")


def check_mask(mask: torch.Tensor | None, name: str, ids: torch.Tensor) -> torch.Tensor | None:
    """``mask``: (B, T) with 1/True = real token, 0/False = padding, matching ``ids``; returned as bool."""
    if mask is None:
        return None
    utils.check_tensor(mask, name)
    if mask.shape != ids.shape:
        raise ValueError(f"{name} must have shape {tuple(ids.shape)} (like input_ids), got {tuple(mask.shape)}")
    utils.check_device(mask, name, ids, "input_ids")
    return mask if mask.dtype == torch.bool else mask != 0
