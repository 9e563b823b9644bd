"""fastformer: fused Triton and CUDA C++ kernels for the Transformer hot path.

Public ops (each takes ``backend=`` or follows :func:`use_backend` / ``FASTFORMER_BACKEND``):

- ``layer_norm``, ``dropout_add_layer_norm``: LayerNorm, optionally fused with dropout and a residual add.
- ``attention``, ``attention_varlen``, ``scaled_dot_product_attention``, ``unpad_input``, ``pad_input``.
- ``linear``, ``feed_forward``: GEMM with a fused bias + activation epilogue, and the FFN block.
- ``patch``, ``unpatch``, ``patch_gpt2``, ``patch_bert``: run ``transformers`` GPT-2 / BERT / RoBERTa on the fused ops
  (:mod:`fastformer.hf`); ``attn_implementation="fastformer"`` works once ``fastformer`` is imported.

The torch backend (the CPU path) draws dropout masks from torch's generator; inside ``with exact_dropout():`` it
drops exactly the elements the fused kernels drop for the same seed (:mod:`fastformer.ops.dropout`).

Modules live in :mod:`fastformer.nn`, models in :mod:`fastformer.models`.
"""

from __future__ import annotations

import importlib
from typing import Any

from fastformer.backends import BACKENDS, BackendError, available_backends, use_backend
from fastformer.ops.attention import attention, attention_varlen, pad_input, scaled_dot_product_attention, unpad_input

# importing the ops registers torch.ops.fastformer.* (needed to run or load a graph that uses them); they
# do not import triton, which is loaded on the first Triton launch
from fastformer.ops.dropout import exact_dropout
from fastformer.ops.ffn import feed_forward, linear
from fastformer.ops.layer_norm import dropout_add_layer_norm, layer_norm

__version__ = "0.1.0"

# subpackages imported on first use
_LAZY = {"nn": "fastformer.nn", "models": "fastformer.models"}
# functions of fastformer.hf (imported by the hook below, without transformers), bound on first use
_LAZY_ATTRS = {
    name: "fastformer.hf" for name in ("patch", "unpatch", "patch_gpt2", "unpatch_gpt2", "patch_bert", "unpatch_bert")
}

__all__ = [
    "BACKENDS",
    "BackendError",
    "__version__",
    "attention",
    "attention_varlen",
    "available_backends",
    "dropout_add_layer_norm",
    "exact_dropout",
    "feed_forward",
    "layer_norm",
    "linear",
    "pad_input",
    "patch",
    "patch_bert",
    "patch_gpt2",
    "scaled_dot_product_attention",
    "unpad_input",
    "unpatch",
    "unpatch_bert",
    "unpatch_gpt2",
    "use_backend",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY_ATTRS:
        value = getattr(importlib.import_module(_LAZY_ATTRS[name]), name)
    elif name in _LAZY:
        value = importlib.import_module(_LAZY[name])
    else:
        raise AttributeError(f"module 'fastformer' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_LAZY_ATTRS))


def _install_hf_hook() -> None:
    # attn_implementation="fastformer" must work right after `import fastformer`, yet importing transformers'
    # modeling code takes seconds: register now with what is loaded, and hook the rest (no transformers import)
    from fastformer.hf.register import install

    install()


_install_hf_hook()
