"""Model configurations: dataclasses with named presets, convertible from Hugging Face configs.

Field names follow ``transformers`` (GPT2Config, BertConfig) so that a checkpoint's ``config.json``
maps onto them directly. Two fields are fastformer's own:

- ``backend``: the op backend for the whole model ("triton", "cuda", "torch", "auto"); None follows
  ``fastformer.use_backend`` / ``FASTFORMER_BACKEND`` / auto, like a bare op call.
- ``gradient_checkpointing``: recompute each block in backward (torch.utils.checkpoint) to save memory.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import os
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from fastformer.backends import BACKENDS

C = TypeVar("C", bound="_Config")

# Hugging Face activation names -> fastformer.linear activations
ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
    "relu": "relu",
}


class _Config:
    """Shared behaviour: named presets, validation, dict/JSON round trips."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    # the Hugging Face ``model_type`` values whose checkpoints these models load
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ()
    # Hugging Face options whose other values change the model's math: key -> the only value implemented here
    HF_FIXED: ClassVar[dict[str, Any]] = {}
    # fields that must be positive (None allowed where the type is optional), dropout probabilities in [0, 1),
    # and floats that must be finite and >= 0
    POSITIVE: ClassVar[tuple[str, ...]] = ()
    PROBABILITIES: ClassVar[tuple[str, ...]] = ()
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def type_problem(cls, name: str, value: Any) -> str | None:
        """Why ``value`` does not fit field ``name``'s annotation (int, float, bool, str, maybe None), or None."""
        kinds = typing.get_args(hint := _hints(cls)[name]) or (hint,)
        if any(value is None if k is type(None) else _fits(value, k) for k in kinds):
            return None
        expected = " or ".join("None" if k is type(None) else _KINDS.get(k, k.__name__) for k in kinds)
        return f"{name} must be {expected}, got {type(value).__name__} {value!r}"

    def validate(self) -> None:
        """TypeError naming a field of the wrong type, ValueError naming one whose value is out of range."""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if problem := self.type_problem(f.name, getattr(self, f.name)):
                raise TypeError(problem)
        for name in self.POSITIVE:
            if (value := getattr(self, name)) is not None and value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value}")
        for name in self.PROBABILITIES:
            if (value := getattr(self, name)) is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be a dropout probability in [0, 1), got {value}")
        for name in self.NON_NEGATIVE:
            if not (math.isfinite(value := getattr(self, name)) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")

    @classmethod
    def from_name(cls: type[C], name: str, **overrides: Any) -> C:
        """A named preset (see ``PRESETS``), with any field overridden by keyword."""
        if name not in cls.PRESETS:
            raise ValueError(f"name: unknown preset {name!r}; expected one of {', '.join(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any], **overrides: Any) -> C:
        """Build from a dict of Hugging Face or fastformer keys; unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in cls.HF_FIXED and value not in (None, cls.HF_FIXED[key]):
                raise ValueError(
                    f"config: {key}={value!r} is not supported (fastformer implements {cls.HF_FIXED[key]!r})"
                )
            if key in names and value is not None:
                kwargs[key] = value
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_hf_config(cls: type[C], hf_config: Any, **overrides: Any) -> C:
        """Convert a ``transformers`` config object (or its dict, or a config.json path) to ours.

        A config.json that is not a JSON object, or whose fields have the wrong types, is a ValueError naming it."""
        where = f"config {os.fspath(hf_config)!r}" if isinstance(hf_config, (str, os.PathLike)) else "the config"
        if isinstance(hf_config, (str, os.PathLike)):
            hf_config = cls._read_json(os.fspath(hf_config))
        elif not isinstance(hf_config, dict):
            if not callable(getattr(hf_config, "to_dict", None)):
                raise TypeError(
                    "hf_config must be a transformers config, a dict or a path to config.json, "
                    f"got {type(hf_config).__name__}"
                )
            hf_config = hf_config.to_dict()
        cls.check_model_type(hf_config.get("model_type"), where)
        return cls.from_dict(hf_config, **overrides)

    @classmethod
    def _read_json(cls, path: str) -> dict[str, Any]:
        """The JSON object in ``path``, its known fields type-checked: ValueError naming the file otherwise."""
        with open(path) as f:
            try:
                d = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"config: {path!r} is not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"config: {path!r} must hold a JSON object, got a JSON {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        for key, value in d.items():
            if key in names and value is not None and (problem := cls.type_problem(key, value)):
                raise ValueError(f"config: {path!r}: {problem}")
        return d

    @classmethod
    def check_model_type(cls, found: str | None, where: str) -> None:
        """ValueError unless ``found`` is one of ``MODEL_TYPES`` (None, as in some old config.json files, passes)."""
        if found is not None and found not in cls.MODEL_TYPES:
            expected = " or ".join(repr(t) for t in cls.MODEL_TYPES)
            raise ValueError(
                f"model_type: {where} is for model_type {found!r}, but {cls.__name__} loads model_type {expected}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


_KINDS = {int: "an int", float: "a number", bool: "a bool", str: "a str"}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fits(value: Any, kind: type) -> bool:
    """``value`` is a ``kind`` (bool is not an int or a float here; numpy scalars are)."""
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    if kind is int:
        return isinstance(value, numbers.Integral)
    if kind is float:
        return isinstance(value, numbers.Real)
    return isinstance(value, kind)


def _check(width: int, heads: int, activation: str, backend: str | None) -> None:
    if heads <= 0 or width % heads != 0:
        raise ValueError(f"hidden size {width} must be a positive multiple of the number of heads {heads}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: unsupported {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
    if backend is not None and backend not in (*BACKENDS, "auto"):
        raise ValueError(f"backend: unknown backend {backend!r}; expected one of {', '.join((*BACKENDS, 'auto'))}")


@dataclass
class GPTConfig(_Config):
    """GPT-2: learned positions, pre-LayerNorm blocks, gelu_tanh MLP, LM head tied to the token embedding (or not)."""

    vocab_size: int = 50257  # GPT-2 BPE; pad to a multiple of 64 for speed when training from scratch
    n_positions: int = 1024  # longest sequence (learned position table size)
    n_embd: int = 768  # model width d
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None = 4 * n_embd
    activation_function: str = "gelu_new"  # HF name; gelu_new is the tanh approximation
    embd_pdrop: float = 0.1  # dropout on token + position embeddings
    attn_pdrop: float = 0.1  # dropout on attention probabilities
    resid_pdrop: float = 0.1  # dropout on each sublayer's output before the residual add
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    tie_word_embeddings: bool = True  # False: the LM head is its own (vocab_size, n_embd) matrix, lm_head.weight
    backend: str | None = None
    gradient_checkpointing: bool = False

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
        "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
        "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
        "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
        "gpt-tiny": dict(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=2),  # tests
        "gpt-small": dict(vocab_size=256, n_positions=128, n_embd=128, n_layer=4, n_head=4),  # demos, CPU
    }
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("gpt2",)
    HF_FIXED: ClassVar[dict[str, Any]] = {
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "add_cross_attention": False,
    }

    POSITIVE: ClassVar[tuple[str, ...]] = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")
    PROBABILITIES: ClassVar[tuple[str, ...]] = ("embd_pdrop", "attn_pdrop", "resid_pdrop")
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("layer_norm_epsilon", "initializer_range")

    def __post_init__(self) -> None:
        self.validate()
        _check(self.n_embd, self.n_head, self.activation_function, self.backend)

    @property
    def act(self) -> str:
        """The activation as ``fastformer.linear`` names it."""
        return ACTIVATIONS[self.activation_function]

    @property
    def d_ff(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def _bert_shape(hidden: int, layers: int, heads: int, ffn: int, **extra: Any) -> dict[str, Any]:
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=ffn, **extra)


@dataclass
class BertConfig(_Config):
    """BERT: post-LayerNorm encoder with token-type embeddings and a tanh pooler on the first token."""

    vocab_size: int = 30522  # WordPiece, uncased
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"  # exact (erf) GELU
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    num_labels: int = 2  # BertForSequenceClassification
    problem_type: str | None = None  # "regression", "single_label_classification", "multi_label_classification"
    classifier_dropout: float | None = None  # None = hidden_dropout_prob
    tie_word_embeddings: bool = True  # the MLM heads' decoder is the word embedding; False only loads encoders
    backend: str | None = None
    gradient_checkpointing: bool = False

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "bert-base": _bert_shape(768, 12, 12, 3072),
        "bert-large": _bert_shape(1024, 24, 16, 4096),
        "bert-tiny": _bert_shape(32, 2, 2, 64, vocab_size=101, max_position_embeddings=32),  # tests
        "bert-small": _bert_shape(128, 4, 4, 512, vocab_size=256, max_position_embeddings=128),  # demos, CPU
    }
    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("bert",)  # RoBERTa's position offset and names are not mapped

    HF_FIXED: ClassVar[dict[str, Any]] = {
        "position_embedding_type": "absolute",
        "is_decoder": False,
        "add_cross_attention": False,
    }

    POSITIVE: ClassVar[tuple[str, ...]] = (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "max_position_embeddings", "type_vocab_size", "num_labels",
    )  # fmt: skip
    PROBABILITIES: ClassVar[tuple[str, ...]] = (
        "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout",
    )  # fmt: skip
    NON_NEGATIVE: ClassVar[tuple[str, ...]] = ("layer_norm_eps", "initializer_range")

    def __post_init__(self) -> None:
        self.validate()
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id must be in [0, vocab_size = {self.vocab_size}), got {self.pad_token_id}")
        _check(self.hidden_size, self.num_attention_heads, self.hidden_act, self.backend)
        if self.problem_type not in (None, "regression", "single_label_classification", "multi_label_classification"):
            raise ValueError(f"problem_type: unsupported {self.problem_type!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides: Any) -> BertConfig:
        config = super().from_dict(d, **overrides)
        if "num_labels" not in d and "id2label" in d and "num_labels" not in overrides:
            config.num_labels = len(d["id2label"])
        return config

    @property
    def act(self) -> str:
        """The activation as ``fastformer.linear`` names it."""
        return ACTIVATIONS[self.hidden_act]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads
