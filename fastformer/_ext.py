"""Locate and import ``fastformer._C``: installed next to the package, else built once into the cache."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType

import torch


@functools.cache
def _load() -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module("fastformer._C"), None
    except ImportError:
        pass
    from fastformer import _build

    if _build.find_nvcc() is None:
        return None, "fastformer._C is not built and nvcc was not found to build it"
    if os.environ.get("FASTFORMER_JIT", "1") == "0":
        return None, "fastformer._C is not built and FASTFORMER_JIT=0 forbids building it"
    try:
        path = _build.jit_build()
    except Exception as e:  # noqa: BLE001 - the reason is reported to the caller
        return None, f"building fastformer._C failed: {e}"
    spec = importlib.util.spec_from_file_location("fastformer._C", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, None


def load() -> ModuleType:
    """The extension module; RuntimeError saying why if it cannot be had."""
    mod, why = _load()
    if mod is None:
        raise RuntimeError(why)
    return mod


def unavailable_reason() -> str | None:
    """None when the cuda backend can run here, else why not (never builds on a machine with no GPU)."""
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return _load()[1]


def is_built() -> bool:
    """Whether the extension is importable without building it."""
    if importlib.util.find_spec("fastformer._C") is not None:
        return True
    from fastformer import _build

    nvcc = _build.find_nvcc()
    if nvcc is None:
        return False
    return (_build.cache_dir() / _build.build_key(_build.source_dir(), nvcc) / _build.ext_filename()).is_file()
