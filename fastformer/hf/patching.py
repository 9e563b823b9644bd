"""``patch`` / ``unpatch`` a live ``transformers`` model, and the class-level ``patch_gpt2`` / ``patch_bert``.

An instance patch swaps each supported module's class for a subclass (same name, so ``_no_split_modules`` and
``isinstance`` checks still match) whose methods run the fused ops on the module's own parameters, pins the
backend on the modules, and switches the model's attention implementation to ``"fastformer"``. Parameters,
buffers, names and hooks are untouched; ``unpatch`` puts the classes and the attention implementation back.
The class-level form replaces the methods on ``transformers``' classes themselves (as Liger does) and makes
``"fastformer"`` the default attention of models built afterwards.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

from torch import nn

from fastformer import backends
from fastformer.hf.register import NAME, register

_MODULES = {
    "gpt2": "transformers.models.gpt2.modeling_gpt2",
    "bert": "transformers.models.bert.modeling_bert",
    "roberta": "transformers.models.roberta.modeling_roberta",
}
Tables = tuple[dict[type, dict[str, Callable]], type, tuple[type, ...]]
_SUBCLASSES: dict[type, type] = {}
_CLASS_PATCHES: dict[str, list[tuple[type, str, Any]]] = {}  # family -> (class, attribute, value it had or None)


def _tables(family: str) -> Tables:
    hf = importlib.import_module(_MODULES[family])
    if family == "gpt2":
        from fastformer.hf import gpt2

        tables = gpt2.tables()
    else:
        from fastformer.hf import bert

        tables = bert.tables(hf, "Bert" if family == "bert" else "Roberta")
    from fastformer.hf.layers import remember

    for cls, methods in tables[0].items():
        for name in methods:
            remember(cls, name)
    return tables


def _loaded_tables() -> list[Tables]:
    # a model of a family exists only if its modeling file was imported: never import the others
    return [_tables(f) for f, mod in _MODULES.items() if mod in sys.modules]


def _subclass(base: type, methods: dict[str, Callable]) -> type:
    sub = _SUBCLASSES.get(base)
    if sub is None:
        qualname = f"fused_{base.__name__}"
        ns = dict(methods, _fastformer_base=base, __module__=__name__, __qualname__=qualname, __doc__=base.__doc__)
        sub = _SUBCLASSES[base] = type(base.__name__, (base,), ns)
    return sub


def __getattr__(name: str) -> type:
    """Resolves ``fused_<Class>`` so that pickled patched models load in a fresh process."""
    if name.startswith("fused_"):
        for sub in _SUBCLASSES.values():
            if sub.__qualname__ == name:
                return sub
        for methods, _, _ in _loaded_tables() + [_layer_norm_table()]:
            for base, m in methods.items():
                if f"fused_{base.__name__}" == name:
                    return _subclass(base, m)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _layer_norm_table() -> Tables:
    from fastformer.hf.layers import layer_norm_forward, remember

    remember(nn.LayerNorm, "forward")
    return {nn.LayerNorm: {"forward": layer_norm_forward}}, nn.Module, ()


def _check_backend(backend: str | None) -> None:
    if backend is not None:
        backends.selected(backend)  # ValueError naming the choices for an unknown name


def _check_model(model: object) -> None:
    """TypeError naming ``model`` unless it is an ``nn.Module`` instance (checked before transformers is imported)."""
    if isinstance(model, type):
        raise TypeError(f"model must be an nn.Module instance, got the class {model.__name__} (instantiate it first)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")


def patch(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Run a ``transformers`` GPT-2, BERT or RoBERTa model on fastformer's fused ops, in place; returns ``model``.

    Swaps in the fused attention (``attn_implementation="fastformer"``), residual + dropout + LayerNorm and
    feed-forward, keeping every parameter object under its name. ``backend`` pins "triton", "cuda", "torch" or
    "auto" on the patched modules; None follows ``use_backend`` / ``FASTFORMER_BACKEND`` / auto at each call.
    What the fused path cannot serve (``output_attentions=True``, ``head_mask``, a 4-D mask) runs the model's
    original attention for that call, with a one-time warning. :func:`unpatch` undoes it.
    """
    _check_model(model)
    _check_backend(backend)
    register()
    tables = _loaded_tables()
    known = {cls: methods for methods, _, _ in tables for cls, methods in methods.items()}
    attention = tuple(cls for _, _, att in tables for cls in att)
    modules = list(model.modules())
    if not any(isinstance(m, tuple(known)) for m in modules):
        raise TypeError(f"model: {type(model).__name__} has no GPT-2, BERT or RoBERTa modules fastformer can patch")
    known.update(_layer_norm_table()[0])
    from transformers.modeling_utils import PreTrainedModel

    saved: dict[int, tuple[Any, Any]] = {}
    for m in modules:
        if isinstance(m, PreTrainedModel) and id(m.config) not in saved:
            saved[id(m.config)] = (m.config, m.config._attn_implementation)
    for m in modules:
        base = getattr(type(m), "_fastformer_base", type(m))
        if base in known:
            m.__class__ = _subclass(base, known[base])
        if base in known or isinstance(m, attention):
            m._fastformer_backend = backend
        if isinstance(m, attention):
            # what the model ran before: the fallback for calls the fused kernel cannot serve
            previous = saved.get(id(getattr(m, "config", None)), (None, None))[1]
            m._fastformer_original_attn = m.__dict__.get("_fastformer_original_attn", previous)
    if not hasattr(model, "_fastformer_saved_attn"):
        model._fastformer_saved_attn = list(saved.values())
    for config, _ in saved.values():
        config._attn_implementation = NAME
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch` on ``model`` in place (classes and attention implementation as before); returns it."""
    _check_model(model)
    for m in model.modules():
        base = type(m).__dict__.get("_fastformer_base")
        if base is not None:
            m.__class__ = base
        for attr in ("_fastformer_backend", "_fastformer_original_attn"):
            m.__dict__.pop(attr, None)
        for config, impl in m.__dict__.pop("_fastformer_saved_attn", ()):
            config._attn_implementation = impl
    return model


def _default_fastformer(original: Callable) -> Callable:
    def get_correct_attn_implementation(self, requested: str | None, is_init_check: bool = False) -> str:
        return original(self, NAME if requested is None else requested, is_init_check)

    return get_correct_attn_implementation


def _as_defined(cls: type, name: str, fn: Callable) -> Callable:
    """``fn`` as a subclass of ``cls`` defining it would hold it after ``__init_subclass__`` (transformers'
    ``GradientCheckpointingLayer`` wraps ``forward`` there: setting the bare function would disable checkpointing)."""
    probe = type(cls.__name__, (cls,), {name: fn, "__module__": __name__})
    return probe.__dict__[name]


def _patch_classes(families: tuple[str, ...], backend: str | None) -> None:
    _check_backend(backend)
    register()
    for family in families:
        if family in _CLASS_PATCHES:
            _unpatch_classes((family,))
        methods, pretrained, attention = _tables(family)
        changes: list[tuple[type, str, Any]] = []

        def set_attr(cls: type, name: str, value: Any, changes: list = changes) -> None:
            changes.append((cls, name, cls.__dict__.get(name)))
            setattr(cls, name, value)

        for cls, fns in methods.items():
            for name, fn in fns.items():
                set_attr(cls, name, _as_defined(cls, name, fn))
        for cls in (*methods, *attention):
            set_attr(cls, "_fastformer_backend", backend)
        set_attr(
            pretrained,
            "get_correct_attn_implementation",
            _default_fastformer(pretrained.get_correct_attn_implementation),
        )
        _CLASS_PATCHES[family] = changes


def _unpatch_classes(families: tuple[str, ...]) -> None:
    for family in families:
        for cls, name, value in reversed(_CLASS_PATCHES.pop(family, [])):
            if value is None:
                delattr(cls, name)
            else:
                setattr(cls, name, value)


def patch_gpt2(backend: str | None = None) -> None:
    """Patch ``transformers``' GPT-2 classes in place (Liger-style), before ``from_pretrained``.

    Every GPT-2 block, attention and MLP, existing or not, runs the fused forwards, and models built afterwards
    default to ``attn_implementation="fastformer"`` (an explicit ``attn_implementation=`` still wins).
    """
    _patch_classes(("gpt2",), backend)


def unpatch_gpt2() -> None:
    """Restore ``transformers``' GPT-2 classes (models built while patched keep their attention implementation)."""
    _unpatch_classes(("gpt2",))


def patch_bert(backend: str | None = None) -> None:
    """Patch ``transformers``' BERT and RoBERTa classes in place, as :func:`patch_gpt2` does GPT-2's."""
    _patch_classes(("bert", "roberta"), backend)


def unpatch_bert() -> None:
    """Restore ``transformers``' BERT and RoBERTa classes."""
    _unpatch_classes(("bert", "roberta"))
