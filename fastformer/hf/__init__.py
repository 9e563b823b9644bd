"""Accelerate ``transformers`` models with fastformer's fused ops.

- :func:`patch` / :func:`unpatch`: a live GPT-2, BERT (any ``BertFor*`` head) or RoBERTa model, in place.
- :func:`patch_gpt2` / :func:`patch_bert` (and ``unpatch_*``): ``transformers``' classes, before ``from_pretrained``.
- ``attn_implementation="fastformer"``: registered with ``transformers``' ``AttentionInterface`` and
  ``AttentionMaskInterface`` when ``transformers`` is imported (``import fastformer`` installs the hook).

Importing this package does not import ``transformers``; the functions do.
"""

from __future__ import annotations

from fastformer.hf.patching import patch, patch_bert, patch_gpt2, unpatch, unpatch_bert, unpatch_gpt2
from fastformer.hf.register import NAME, install, register

__all__ = [
    "NAME",
    "install",
    "patch",
    "patch_bert",
    "patch_gpt2",
    "register",
    "unpatch",
    "unpatch_bert",
    "unpatch_gpt2",
]
