"""How every fastformer op is declared: one argument object, its custom ops, and the backend table.

Each op keeps the arguments shared by its forward and backward custom ops (weights, masks, seeds,
scalars and the backend name) in one frozen dataclass derived from :class:`OpArgs`. The custom-op
schemas are generated from that dataclass, so the argument list is written once; the ops' bodies,
fakes and autograd rebuild the object with ``Args(*rest)`` and hand it to the backend modules
``fastformer/ops/<op>/{torch,triton,cuda}_impl.py``, which share one small interface per op.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any, ClassVar, TypeVar

import torch

A = TypeVar("A", bound="OpArgs")

# dataclass annotation (a string under postponed evaluation) -> torch.library schema type
_SCHEMA_TYPES = {**{t: t for t in ("Tensor", "float", "bool", "str")}, "Tensor | None": "Tensor?", "int": "SymInt"}


@dataclasses.dataclass(frozen=True)
class OpArgs:
    """Base of the per-op argument objects; subclasses are frozen dataclasses whose last field is ``backend``."""

    OP: ClassVar[str] = ""  # the op's stem: fastformer/ops/<OP>/

    @classmethod
    def schema(cls) -> str:
        """The fields as a torch.library schema fragment, e.g. ``Tensor? weight, float eps, str backend``."""
        return ", ".join(f"{_SCHEMA_TYPES[f.type]} {f.name}" for f in dataclasses.fields(cls))

    NAMES: ClassVar[tuple[str, ...]] = ()  # the field names, set by :func:`define` (read per call: kept, not derived)

    @classmethod
    def count(cls) -> int:
        return len(cls.NAMES)

    def values(self) -> tuple[Any, ...]:
        """The fields in order, as the custom ops take them."""
        return tuple(getattr(self, n) for n in self.NAMES)

    def grads(self, **named: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        """One autograd output per field: the given gradients by field name, None elsewhere."""
        names = self.NAMES
        unknown = set(named) - set(names)
        if unknown:
            raise KeyError(f"{type(self).__name__} has no fields {sorted(unknown)}")
        return tuple(named.get(n) for n in names)

    def impl(self) -> ModuleType:
        """The backend module serving this call: fastformer/ops/<op>/<backend>_impl.py (imported on first use)."""
        return _impl(self.OP, self.backend)  # type: ignore[attr-defined]


# cached: an op's Python overhead counts on a CPU, where a decode step's ops take microseconds
@functools.cache
def _impl(op: str, backend: str) -> ModuleType:
    return importlib.import_module(f"fastformer.ops.{op}.{backend}_impl")


def define(
    name: str, front: str, args: type[OpArgs], returns: str, fn: Callable[..., Any]
) -> torch.library.CustomOpDef:
    """``fastformer::<name>`` taking ``front`` (schema text, possibly empty) followed by the fields of ``args``.

    ``fn`` receives the arguments positionally: the front ones, then the fields of ``args`` (rebuild it with
    ``args(*rest)``). Register the fake and autograd on the returned definition.
    """
    args.NAMES = tuple(f.name for f in dataclasses.fields(args))
    schema = f"({', '.join(part for part in (front, args.schema()) if part)}) -> {returns}"
    return torch.library.custom_op(f"fastformer::{name}", fn, mutates_args=(), schema=schema)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _plain_inference(*groups: Iterable[Any]) -> bool:
    """Whether a call can skip the dispatcher: eager, no autograd needed, no mode or transform watching, and
    every tensor among ``groups`` a plain tensor with storage (no subclass, fake or meta tensor)."""
    if (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
    ):
        return False
    if torch._C._are_functorch_transforms_active():
        return False
    grad = torch.is_grad_enabled()
    for group in groups:
        for t in group:
            if isinstance(t, torch.Tensor) and (type(t) not in _PLAIN or t.is_meta or (grad and t.requires_grad)):
                return False
    return True


def invoke(op: torch.library.CustomOpDef, direct: Callable[..., Any], a: OpArgs, *front: Any) -> Any:
    """``op(*front, *a.values())``, or, in plain eager inference, ``direct(a, *front)``: what the op's body runs.

    The same function computes either way; the dispatcher's route through a Python custom op (schema checks,
    the autograd wrapper, redispatch) costs 50-100 us a call, more than a decode step's LayerNorm on a CPU.
    Autograd, torch.compile, fake/meta tensors, dispatch modes (profilers, opcheck) and functorch transforms
    all still go through ``op``.
    """
    if _plain_inference(front, a.__dict__.values()):
        return direct(a, *front)
    return op(*front, *a.values())


def split(inputs: tuple[Any, ...], args: type[A]) -> tuple[tuple[Any, ...], A]:
    """(front arguments, argument object) from a custom op's full positional inputs."""
    k = len(inputs) - args.count()
    return tuple(inputs[:k]), args(*inputs[k:])


def save(ctx: Any, a: OpArgs, *tensors: torch.Tensor | None) -> None:
    """Save ``tensors`` and the argument object for backward (tensor fields through save_for_backward)."""
    fields = a.values()
    kinds = [f.type.startswith("Tensor") for f in dataclasses.fields(a)]
    ctx.save_for_backward(*tensors, *(v for v, t in zip(fields, kinds) if t))
    ctx.ff_meta = (type(a), len(tensors), kinds, [v for v, t in zip(fields, kinds) if not t])


def load(ctx: Any) -> tuple[tuple[torch.Tensor | None, ...], OpArgs]:
    """(the tensors given to :func:`save`, the argument object) inside backward."""
    cls, n, kinds, statics = ctx.ff_meta
    saved = ctx.saved_tensors
    tensor_fields, statics = iter(saved[n:]), iter(statics)
    return tuple(saved[:n]), cls(*(next(tensor_fields) if t else next(statics) for t in kinds))
