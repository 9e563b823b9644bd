"""fastformer: fused Triton and CUDA C++ kernels for the Transformer hot path.

Public ops (each takes ``backend=`` or follows :func:`use_backend` / ``FASTFORMER_BACKEND``):

- ``layer_norm``, ``dropout_add_layer_norm``: LayerNorm, optionally fused with dropout and a residual add.
- ``attention``, ``attention_varlen``, ``scaled_dot_product_attention``, ``unpad_input``, ``pad_input``.
- ``linear``, ``feed_forward``: GEMM with a fused bias + activation epilogue, and the FFN block.

Modules live in :mod:`fastformer.nn`, models in :mod:`fastformer.models`.
"""

from __future__ import annotations

import importlib
from typing import Any

from fastformer.backends import BACKENDS, BackendError, available_backends, use_backend

__version__ = "0.1.0"

# public name -> module that defines it; imported on first use so `import fastformer` stays light
_LAZY = {
    "layer_norm": "fastformer.ops.layer_norm",
    "dropout_add_layer_norm": "fastformer.ops.layer_norm",
    "attention": "fastformer.ops.attention",
    "attention_varlen": "fastformer.ops.attention",
    "scaled_dot_product_attention": "fastformer.ops.attention",
    "unpad_input": "fastformer.ops.attention",
    "pad_input": "fastformer.ops.attention",
    "linear": "fastformer.ops.ffn",
    "feed_forward": "fastformer.ops.ffn",
    "nn": "fastformer.nn",
    "models": "fastformer.models",
}

__all__ = ["BACKENDS", "BackendError", "available_backends", "use_backend", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'fastformer' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if module.__name__ == f"fastformer.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
