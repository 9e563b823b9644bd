"""Registering ``attn_implementation="fastformer"`` with ``transformers``, without importing it.

``transformers.modeling_utils`` takes seconds to import, so ``import fastformer`` must not import it. Instead
:func:`install` puts a post-import hook on ``sys.meta_path``: when ``transformers.modeling_utils`` finishes loading,
the attention function is registered with its ``AttentionInterface``; when ``transformers.masking_utils`` does, the
mask function is registered with its ``AttentionMaskInterface``. Modules already loaded are registered at once.
Both registrations are needed: without a mask function of the same name, ``transformers`` hands the attention no
mask at all, which silently drops causal and padding masking.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from collections.abc import Callable
from types import ModuleType

NAME = "fastformer"


def _register_attention(mod: ModuleType) -> None:
    from fastformer.hf.attention import attention_forward

    mod.AttentionInterface.register(NAME, attention_forward)


def _register_mask(mod: ModuleType) -> None:
    from fastformer.hf.attention import fastformer_mask

    mod.AttentionMaskInterface.register(NAME, fastformer_mask)


_TARGETS: dict[str, Callable[[ModuleType], None]] = {
    "transformers.modeling_utils": _register_attention,
    "transformers.masking_utils": _register_mask,
}


def _run(name: str, mod: ModuleType) -> None:
    try:
        _TARGETS[name](mod)
    except Exception as e:  # noqa: BLE001 - a failed registration must never break importing transformers
        warnings.warn(f"fastformer: could not register attn_implementation={NAME!r} with {name}: {e}", stacklevel=2)


class _Loader(importlib.abc.Loader):
    """Runs the real loader, puts it back on the module, then registers."""

    def __init__(self, inner: importlib.abc.Loader, name: str) -> None:
        self.inner, self.name = inner, name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # the module must look as if we were never there (importlib.resources, inspect and reloads use its loader)
        module.__loader__ = self.inner
        if module.__spec__ is not None:
            module.__spec__.loader = self.inner
        self.inner.exec_module(module)
        _run(self.name, module)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds the two target modules with the other finders and wraps their loader; ignores everything else."""

    def find_spec(self, fullname: str, path, target=None) -> importlib.machinery.ModuleSpec | None:  # noqa: ANN001
        if fullname not in _TARGETS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _Loader(spec.loader, fullname)
        return spec


_FINDER = _Finder()


def register() -> None:
    """Register now, importing ``transformers`` (what :func:`fastformer.patch` does before it switches a model)."""
    for name in _TARGETS:
        mod = importlib.import_module(name)
        _run(name, mod)


def install() -> None:
    """Register with the parts of ``transformers`` already imported and hook the others; cheap, idempotent."""
    if importlib.util.find_spec("transformers") is None:
        return
    for name in _TARGETS:
        if name in sys.modules:
            _run(name, sys.modules[name])
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
