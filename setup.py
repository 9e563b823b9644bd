"""Install fastformer; build the torch-free CUDA extension fastformer._C when nvcc is found.

FASTFORMER_BUILD_CUDA=auto|0|1 (default auto: build if nvcc exists), FASTFORMER_CUDA_ARCHS (default "80;90a").
Without a build here, fastformer builds _C on first use into a per-user cache when nvcc exists.
"""

import importlib.util
import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _builder():
    # load fastformer/_build.py by path: importing the package would import torch
    spec = importlib.util.spec_from_file_location("_fastformer_build", ROOT / "fastformer" / "_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class BuildCuda(build_ext):
    """Builds fastformer._C with nvcc + ninja (fastformer/_build.py) instead of setuptools' compiler."""

    def build_extension(self, ext: Extension) -> None:
        out = Path(self.get_ext_fullpath(ext.name)).parent
        _builder().build(out, build_dir=Path(self.build_temp) / "fastformer_C", verbose=self.verbose > 1)


def _ext_modules() -> list:
    mode = os.environ.get("FASTFORMER_BUILD_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"FASTFORMER_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return []
    if _builder().find_nvcc() is None:
        if mode == "1":
            raise SystemExit("FASTFORMER_BUILD_CUDA=1 but nvcc was not found")
        return []
    return [Extension("fastformer._C", sources=[])]


setup(
    packages=[
        "fastformer",
        "fastformer.ops",
        "fastformer.ops.attention",
        "fastformer.ops.ffn",
        "fastformer.ops.layer_norm",
        "fastformer.nn",
        "fastformer.models",
        "fastformer.hf",
        "fastformer.inspect",
        "fastformer.study",
        "fastformer.kernels",
        "fastformer.csrc",
        "fastformer.benchmarks",
    ],
    package_dir={
        "fastformer": "fastformer",
        "fastformer.kernels": "kernels",
        "fastformer.csrc": "csrc",
        "fastformer.benchmarks": "benchmarks",
    },
    package_data={"fastformer.csrc": ["*.cu", "*.cuh", "*.cpp", "*.h"], "fastformer.benchmarks": ["*.sh"]},
    ext_modules=_ext_modules(),
    cmdclass={"build_ext": BuildCuda},
)
