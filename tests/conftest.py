"""Test setup: Triton runs in its CPU interpreter when there is no GPU; `gpu` tests need one."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # must happen before triton is first imported anywhere
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run benchmarks/gpu_check.sh on one")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def exact_dropout():
    """The torch backend draws the fused kernels' Philox masks: for tests that compare dropout across backends
    or against the reference with a seed drawn for a fused backend."""
    from fastformer.ops import dropout

    with dropout.exact_dropout():
        yield
