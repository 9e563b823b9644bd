"""The models' outputs: dataclasses used like ``transformers``' ``ModelOutput``, without importing transformers.

Fields are named and ordered as in transformers (``loss`` first), and, as there, fields that are None are left out
of indexing, iteration and ``to_tuple()``: ``out.logits``, ``out["logits"]``, ``out.to_tuple()``; ``out[0]`` is the
loss when labels were given and the logits otherwise; ``out["loss"]`` raises KeyError when there is no loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import Tensor


@dataclass
class ModelOutput:
    """Base of every model output: attribute, string-key and integer access, ``keys()``/``items()``, ``to_tuple()``."""

    def keys(self) -> list[str]:
        """The names of the fields that are set (not None), in field order."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def values(self) -> list[Any]:
        return [getattr(self, k) for k in self.keys()]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def to_tuple(self) -> tuple[Any, ...]:
        """The fields that are set, in order (what ``out[i]`` indexes)."""
        return tuple(self.values())

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(f"{key!r}: not set in this {type(self).__name__}; it holds {self.keys()}")
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self) -> Iterator[str]:  # like a dict: the keys
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __contains__(self, key: object) -> bool:
        return key in self.keys()


@dataclass
class CausalLMOutput(ModelOutput):
    loss: Tensor | None = None  # mean next-token cross-entropy over labels != -100
    logits: Tensor | None = None  # (B, T, vocab_size)


@dataclass
class BertModelOutput(ModelOutput):
    last_hidden_state: Tensor | None = None  # (B, S, C); zeros at padding positions
    pooler_output: Tensor | None = None  # (B, C)


@dataclass
class BertForPreTrainingOutput(ModelOutput):
    loss: Tensor | None = None  # mlm_loss + nsp_loss (the terms present)
    prediction_logits: Tensor | None = None  # (B, S, V); zeros at padding positions
    seq_relationship_logits: Tensor | None = None  # (B, 2)
    mlm_loss: Tensor | None = None
    nsp_loss: Tensor | None = None


@dataclass
class MaskedLMOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None  # (B, S, V); zeros at padding positions


@dataclass
class SequenceClassifierOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None  # (B, num_labels)
