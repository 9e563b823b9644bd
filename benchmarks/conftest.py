"""The pytest-benchmark suite: ``pytest benchmarks --benchmark-only`` (not part of the main run, which collects
``tests`` only). A few small shapes per op and provider; every timed call reads the next input set of a ring
(``common.rotating``), and every test also checks the op's output, so that it can fail."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from fastformer.benchmarks import common

HAS_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_GPU else "cpu")
DTYPE = torch.bfloat16 if HAS_GPU else torch.float32
# rounds per test: as many as fit in the time budget, within these bounds (few on a CPU, to keep the run short)
MIN_ROUNDS, MAX_ROUNDS, BUDGET_S = (10, 200, 1.0) if HAS_GPU else (5, 20, 0.3)

# a test with a ``backend`` argument runs on each of these fastformer backends: the torch path everywhere, the fused
# kernels where a GPU can run them
BACKENDS = [
    pytest.param("torch", id="fastformer-torch"),
    pytest.param("triton", id="fastformer-triton", marks=pytest.mark.gpu),
    pytest.param("cuda", id="fastformer-cuda", marks=pytest.mark.gpu),
]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", BACKENDS)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _backend_runs_here(request: pytest.FixtureRequest) -> None:
    """Skip a fused backend unless it runs here as a kernel (Triton's CPU interpreter is no speed peer)."""
    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("backend", "torch") if callspec else "torch"
    if backend == "torch":
        return
    if not HAS_GPU:
        pytest.skip(f"fastformer-{backend} needs a CUDA GPU")
    from fastformer import backends

    why = backends.device_reason(backend, DEVICE)
    if why is not None:
        pytest.skip(f"fastformer-{backend}: {why}")


@pytest.fixture
def dev() -> torch.device:
    return DEVICE


@pytest.fixture
def dtype() -> torch.dtype:
    return DTYPE


@pytest.fixture
def timed(benchmark: Any) -> Callable[[Callable[..., Any], common.Ring], Any]:
    """``timed(fn, ring)``: time ``fn(*inputs)`` with pytest-benchmark, one call per round on the next input set of
    ``ring`` (drawn outside the timing), after two warm-up calls; returns the last call's result."""

    def run(fn: Callable[..., Any], ring: common.Ring) -> Any:
        def call(*inputs: Any) -> Any:
            out = fn(*inputs)
            if HAS_GPU:
                torch.cuda.synchronize()  # the timer is the host's clock: wait for the kernels
            return out

        call(*ring())  # compilation, autotuning
        t0 = time.perf_counter()
        call(*ring())
        rounds = int(BUDGET_S / max(time.perf_counter() - t0, 1e-6))
        return benchmark.pedantic(call, setup=lambda: (ring(), {}), rounds=max(MIN_ROUNDS, min(MAX_ROUNDS, rounds)))

    return run
