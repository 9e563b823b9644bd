"""Loading Hugging Face GPT-2 and BERT weights into fastformer models, from a live model or a local directory.

Name mapping (HF -> ours), applied after stripping the HF wrapper prefix (``transformer.`` / ``bert.``):

- GPT-2: ``attn.c_attn`` -> ``attn.qkv``, ``attn.c_proj`` -> ``attn.out_proj``, ``mlp.c_fc`` -> ``mlp.fc1``,
  ``mlp.c_proj`` -> ``mlp.fc2`` (the fastformer.nn modules' names), the rest unchanged; Conv1D weights (in, out) are
  transposed to nn.Linear's (out, in); the causal-mask buffers ``attn.bias``/``attn.masked_bias`` are dropped, and
  so is ``lm_head.weight`` when the head is tied to ``wte`` (``tie_word_embeddings``, the default), as transformers
  ties it; an untied head keeps its own ``lm_head.weight``.
- BERT: ``embeddings.{word,position,token_type}_embeddings`` -> ``wte``/``wpe``/``wtt``, ``embeddings.LayerNorm`` ->
  ``ln_emb``; per layer ``attention.self.{query,key,value}`` are concatenated into ``attn.qkv``,
  ``attention.output.dense`` -> ``attn.out_proj``, ``attention.output.LayerNorm`` -> ``ln_1``,
  ``intermediate.dense`` -> ``ffn.fc1``, ``output.dense`` -> ``ffn.fc2``, ``output.LayerNorm`` -> ``ln_2``;
  ``pooler.dense`` -> ``pooler``; heads ``cls.predictions.transform.{dense,LayerNorm}`` -> ``mlm.{dense,ln}``,
  ``cls.predictions.bias`` -> ``mlm.bias``, ``cls.seq_relationship`` -> ``nsp``, ``classifier`` -> ``classifier``.
  Old ``gamma``/``beta`` names are accepted.

Keys present in the checkpoint but not in the model ("unexpected") and parameters the checkpoint does not
provide ("missing", left at their random initialisation) are reported by name: a warning by default, a
ValueError with ``strict=True``. No network access: ``from_pretrained`` reads a local directory only, and refuses
a ``config.json`` whose ``model_type`` the class does not load (``GPTConfig.MODEL_TYPES``, ``BertConfig.MODEL_TYPES``).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fastformer.models.config import BertConfig, GPTConfig

# state-dict entries that are derived buffers, never weights
_IGNORED = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|position_ids|token_type_ids)$")
_CONV1D = re.compile(r"\.(c_attn|c_proj|c_fc)\.weight$")
_GPT2_RULES = [
    (r"\.attn\.c_attn\.", ".attn.qkv."),
    (r"\.attn\.c_proj\.", ".attn.out_proj."),
    (r"\.mlp\.c_fc\.", ".mlp.fc1."),
    (r"\.mlp\.c_proj\.", ".mlp.fc2."),
]
_BERT_RULES = [
    (r"embeddings\.word_embeddings\.", "wte."),
    (r"embeddings\.position_embeddings\.", "wpe."),
    (r"embeddings\.token_type_embeddings\.", "wtt."),
    (r"embeddings\.LayerNorm\.", "ln_emb."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"h.\1.attn.out_proj."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"h.\1.ln_1."),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.", r"h.\1.ffn.fc1."),
    (r"encoder\.layer\.(\d+)\.output\.dense\.", r"h.\1.ffn.fc2."),
    (r"encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"h.\1.ln_2."),
    (r"pooler\.dense\.", "pooler."),
    (r"cls\.predictions\.transform\.dense\.", "mlm.dense."),
    (r"cls\.predictions\.transform\.LayerNorm\.", "mlm.ln."),
    (r"cls\.predictions\.bias$", "mlm.bias"),
    (r"cls\.seq_relationship\.", "nsp."),
    (r"classifier\.", "classifier."),
]
_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)$")


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix) :] if key.startswith(prefix) else key


def convert_gpt2(state_dict: dict[str, Tensor], tied: bool = True) -> tuple[dict[str, Tensor], list[str]]:
    """HF GPT2LMHeadModel / GPT2Model state dict -> (ours, HF keys with no counterpart).

    ``tied``: the model's LM head is ``wte`` (any ``lm_head.weight`` is dropped), else its own ``lm_head.weight``."""
    out: dict[str, Tensor] = {}
    for key, t in state_dict.items():
        if _IGNORED.search(key) or (tied and key == "lm_head.weight"):  # buffers; a tied head is wte
            continue
        if key == "lm_head.weight":
            out[key] = t
            continue
        name = "transformer." + _strip(key, "transformer.")
        if _CONV1D.search(name) and t.dim() == 2:
            t = t.t()
        for pattern, repl in _GPT2_RULES:
            name = re.sub(pattern, repl, name)
        out[name] = t
    return out, []


def convert_bert(state_dict: dict[str, Tensor], heads: bool) -> tuple[dict[str, Tensor], list[str]]:
    """HF Bert* state dict -> (ours, HF keys with no counterpart). ``heads``: the target wraps BertModel as ``bert``."""
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    prefix = "bert." if heads else ""
    for key, t in state_dict.items():
        k = (
            _strip(key, "bert.")
            .replace("LayerNorm.gamma", "LayerNorm.weight")
            .replace("LayerNorm.beta", "LayerNorm.bias")
        )
        if _IGNORED.search(k) or k.startswith("cls.predictions.decoder."):  # buffers; decoder tied to wte, mlm.bias
            continue
        if m := _QKV.match(k):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = t
            continue
        for pattern, repl in _BERT_RULES:
            name, n = re.subn("^" + pattern, repl, k)
            if n:
                head = name.startswith(("mlm.", "nsp.", "classifier."))
                out[name if head else prefix + name] = t
                break
        else:
            unknown.append(key)
    for (layer, kind), parts in qkv.items():
        name = f"{prefix}h.{layer}.attn.qkv.{kind}"
        if set(parts) != {"query", "key", "value"}:
            unknown += [f"encoder.layer.{layer}.attention.self.{p}.{kind}" for p in parts]
            continue
        out[name] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out, unknown


def load_converted(model: nn.Module, converted: dict[str, Tensor], unknown: list[str], strict: bool) -> nn.Module:
    """Copy ``converted`` into ``model``; report missing and unexpected keys by name."""
    own = model.state_dict()
    unexpected = sorted(unknown + [k for k in converted if k not in own])
    missing = sorted(k for k in own if k not in converted)
    for k, t in converted.items():
        if k in own and own[k].shape != t.shape:
            raise ValueError(f"state dict: {k} has shape {tuple(t.shape)}, the model expects {tuple(own[k].shape)}")
    if (missing or unexpected) and strict:
        raise ValueError(
            f"state dict does not match {type(model).__name__}: missing {missing}, unexpected {unexpected}"
        )
    if missing:
        warnings.warn(
            f"{type(model).__name__}: not in the checkpoint, left randomly initialised: {missing}", stacklevel=3
        )
    if unexpected:
        warnings.warn(f"{type(model).__name__}: checkpoint entries not used: {unexpected}", stacklevel=3)
    model.load_state_dict({k: t for k, t in converted.items() if k in own}, strict=False)
    model.loading_info = {"missing_keys": missing, "unexpected_keys": unexpected}
    return model


def from_hf(
    cls: type[nn.Module],
    hf_model_or_state_dict: Any,
    config: GPTConfig | BertConfig | None = None,
    strict: bool = False,
) -> Any:
    """An instance of ``cls`` holding the weights of a ``transformers`` model or of its state dict."""
    config_class = cls.config_class  # type: ignore[attr-defined]
    if isinstance(hf_model_or_state_dict, nn.Module):
        if config is None:
            hf_config = getattr(hf_model_or_state_dict, "config", None)
            if hf_config is None:
                raise TypeError(
                    f"hf_model_or_state_dict: {type(hf_model_or_state_dict).__name__} has no Hugging Face config "
                    "(.config); pass config= to load its state dict"
                )
            config = config_class.from_hf_config(hf_config)
        state_dict = hf_model_or_state_dict.state_dict()
    elif isinstance(hf_model_or_state_dict, dict):
        if config is None:
            raise ValueError("config: required when loading from a bare state dict")
        state_dict = hf_model_or_state_dict
    else:
        raise TypeError(f"hf_model_or_state_dict must be an nn.Module or a dict, got {type(hf_model_or_state_dict)}")
    if not isinstance(config, config_class):
        raise TypeError(f"config must be a {config_class.__name__}, got {type(config).__name__}")
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"state dict: {key} must be a torch.Tensor, got {type(value).__name__}")
    model = cls(config)
    if config_class is GPTConfig:
        converted, unknown = convert_gpt2(state_dict, tied=config.tie_word_embeddings)  # type: ignore[union-attr]
    else:
        converted, unknown = convert_bert(state_dict, heads=hasattr(model, "bert"))
    return load_converted(model, converted, unknown, strict)


def read_state_dict(path: str) -> dict[str, Tensor]:
    """Weights of a local HF directory: model.safetensors (maybe sharded with an index), else pytorch_model.bin."""
    st, st_index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    pt = os.path.join(path, "pytorch_model.bin")
    if os.path.exists(st) or os.path.exists(st_index):
        if os.path.exists(st):
            return _load_safetensors(st)
        with open(st_index) as f:
            try:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
                raise ValueError(f"path: {st_index} is not a safetensors index (a JSON weight_map): {e!r}") from None
        return {k: v for shard in shards for k, v in _load_safetensors(os.path.join(path, str(shard))).items()}
    if os.path.exists(pt):
        try:  # tensors only: a pickle may run code when loaded, so arbitrary objects are refused
            state = torch.load(pt, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"path: {pt} holds pickled Python objects besides tensors; fastformer loads weights only "
                "(torch.load(weights_only=True)). Convert it to model.safetensors if you trust its source."
            ) from e
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise ValueError(f"path: {pt} is not a state dict of tensors")
        return state
    raise FileNotFoundError(f"path: no model.safetensors or pytorch_model.bin in {path}")


def _load_safetensors(file: str) -> dict[str, Tensor]:
    """The tensors in a .safetensors file; ValueError naming the file when it is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(file)
    except SafetensorError as e:
        raise ValueError(f"path: {file} is not a valid safetensors file ({e})") from None


def from_pretrained(
    cls: type[nn.Module], path: str | os.PathLike, strict: bool = False, **config_overrides: Any
) -> Any:
    """An instance of ``cls`` from a local Hugging Face directory (config.json plus weights). No network."""
    path = os.fspath(path) if isinstance(path, os.PathLike) else path
    if not isinstance(path, str):
        raise TypeError(f"path must be a str or os.PathLike (a local directory), got {type(path).__name__}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path: {path!r} is not a local directory (fastformer never downloads)")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(
            f"path: no config.json in {path!r}; from_pretrained reads a Hugging Face directory holding config.json "
            "and model.safetensors or pytorch_model.bin"
        )
    config = cls.config_class.from_hf_config(config_path, **config_overrides)  # type: ignore[attr-defined]
    return from_hf(cls, read_state_dict(path), config, strict)


class HFLoadable:
    """Mixin giving a model class ``from_hf`` and ``from_pretrained``; the class sets ``config_class``."""

    config_class: ClassVar[type]

    @classmethod
    def from_hf(cls, hf_model_or_state_dict: Any, config: Any = None, strict: bool = False) -> Any:
        """Build from the matching ``transformers`` model, or its state dict (then ``config`` is required)."""
        return from_hf(cls, hf_model_or_state_dict, config, strict)  # type: ignore[arg-type]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, strict: bool = False, **config_overrides: Any) -> Any:
        """Load a local Hugging Face directory (config.json + model.safetensors or pytorch_model.bin)."""
        return from_pretrained(cls, path, strict, **config_overrides)  # type: ignore[arg-type]
