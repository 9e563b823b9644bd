"""Input checks shared by the models: ValueError/TypeError naming the argument, before any kernel runs.

Type, shape and device checks come first; value checks (a host sync each) last, and only where values can be read:
not on meta or fake tensors, nor while ``torch.compile`` traces or a CUDA graph is captured (compiled and captured
callers rely on the eager run having checked).
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from fastformer import utils


def check_config(config: object, config_class: type) -> None:
    """TypeError naming ``config`` unless it is a ``config_class``."""
    if not isinstance(config, config_class):
        raise TypeError(f"config must be a {config_class.__name__}, got {type(config).__name__}")


def is_integer(dtype: torch.dtype) -> bool:
    """An integer dtype (bool is not one here)."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_ids(
    ids: torch.Tensor,
    name: str,
    n_values: int | None,
    max_len: int | None = None,
    device: torch.device | None = None,
    device_of: str = "the model",
) -> None:
    """``ids``: (B, T) integer token ids in [0, n_values) (unchecked when None), T <= max_len, on ``device`` (the
    device of ``device_of``) when given."""
    utils.check_tensor(ids, name)
    if not is_integer(ids.dtype):
        raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"{name} must have shape (batch, seqlen), got {tuple(ids.shape)}")
    if max_len is not None and ids.shape[1] > max_len:
        raise ValueError(f"{name} has length {ids.shape[1]} but the model supports at most {max_len} positions")
    if device is not None and ids.device != device:
        raise ValueError(f"{name} is on {ids.device} but {device_of} is on {device}; they must be on one device")
    if n_values is not None:
        check_range(ids, name, n_values)


def check_range(t: torch.Tensor, name: str, n_values: int, ignore_index: int | None = None) -> None:
    """ValueError unless every value of the integer tensor ``t`` other than ``ignore_index`` is in [0, n_values).
    One host sync; skipped where values cannot be read (see the module docstring)."""
    check_ranges((t, name, n_values, ignore_index))


def _readable(t: torch.Tensor) -> bool:
    if not t.numel() or t.is_meta or torch.compiler.is_compiling() or is_fake(t):
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def check_ranges(*checks: tuple[torch.Tensor, str, int, int | None]) -> None:
    """:func:`check_range` for several (tensor, name, n_values, ignore_index) at the price of one host sync: the
    first tensor out of range is the one named."""
    checks = tuple(c for c in checks if _readable(c[0]))
    if not checks:
        return
    stats = []
    for t, _, _, ignore_index in checks:
        if ignore_index is None:
            stats += torch.aminmax(t)
        else:
            keep, info = t != ignore_index, torch.iinfo(t.dtype)
            stats += [torch.where(keep, t, info.max).amin(), torch.where(keep, t, info.min).amax()]
    values = torch.stack([x.to(torch.int64) for x in stats]).tolist()
    for (_, name, n_values, ignore_index), lo, hi in zip(checks, values[::2], values[1::2], strict=True):
        if lo > hi:  # every value is ignore_index
            continue
        if lo < 0 or hi >= n_values:
            besides = "" if ignore_index is None else f" (besides {ignore_index}, which is ignored)"
            raise ValueError(f"{name} holds values in [{lo}, {hi}]{besides}, outside [0, {n_values})")


def check_labels(
    labels: torch.Tensor,
    name: str,
    ids: torch.Tensor,
    n_classes: int,
    shapes: tuple[tuple[int, ...], ...],
    expected: str,
    check_values: bool = True,
) -> None:
    """Class-id targets: an integer tensor with one of ``shapes`` (described by ``expected``), on ``ids``' device,
    each value in [0, n_classes) or -100 (ignored by the loss; the values are left to the caller when not
    ``check_values``)."""
    utils.check_tensor(labels, name)
    if not is_integer(labels.dtype):
        raise TypeError(f"{name} must hold integer class ids, got dtype {labels.dtype}")
    if tuple(labels.shape) not in shapes:
        raise ValueError(f"{name} must have {expected}, got {tuple(labels.shape)}")
    utils.check_device(labels, name, ids, "input_ids")
    if check_values:
        check_range(labels, name, n_classes, ignore_index=-100)


def check_mask(mask: torch.Tensor | None, name: str, ids: torch.Tensor) -> torch.Tensor | None:
    """``mask``: (B, T) with 1/True = real token, 0/False = padding, matching ``ids``; returned as bool."""
    if mask is None:
        return None
    utils.check_tensor(mask, name)
    if mask.shape != ids.shape:
        raise ValueError(f"{name} must have shape {tuple(ids.shape)} (like input_ids), got {tuple(mask.shape)}")
    utils.check_device(mask, name, ids, "input_ids")
    return mask if mask.dtype == torch.bool else mask != 0
