"""Drop-in modules built on the fused ops."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "LayerNorm": "fastformer.nn.layer_norm",
    "DropoutAddLayerNorm": "fastformer.nn.layer_norm",
    "MultiheadSelfAttention": "fastformer.nn.attention",
    "FeedForward": "fastformer.nn.ffn",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'fastformer.nn' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
