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


# each custom op's Python body, and the eager autograd.Function of the forward ops (see invoke)
_BODIES: dict[torch.library.CustomOpDef, Callable[..., Any]] = {}
_EAGER: dict[torch.library.CustomOpDef, type[torch.autograd.Function]] = {}


def define(
    name: str, front: str, args: type[OpArgs], returns: str, fn: Callable[..., Any]
) -> torch.library.CustomOpDef:
    """``fastformer::<name>`` taking ``front`` (schema text, possibly empty) followed by the fields of ``args``.

    ``fn`` receives the arguments positionally: the front ones, then the fields of ``args`` (rebuild it with
    ``args(*rest)``). Register the fake on the returned definition, and the autograd with :func:`register_autograd`.
    """
    args.NAMES = tuple(f.name for f in dataclasses.fields(args))
    schema = f"({', '.join(part for part in (front, args.schema()) if part)}) -> {returns}"
    op = torch.library.custom_op(f"fastformer::{name}", fn, mutates_args=(), schema=schema)
    _BODIES[op] = fn
    return op


def register_autograd(op: torch.library.CustomOpDef, backward: Callable[..., Any], setup_context: Callable) -> None:
    """``op.register_autograd(backward, setup_context=...)``, and the same pair as a plain ``autograd.Function`` over
    the op's body, which :func:`invoke` uses for eager calls that need gradients."""
    op.register_autograd(backward, setup_context=setup_context)
    body = _BODIES[op]

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(*inputs: Any) -> Any:
            return body(*inputs)

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
            setup_context(ctx, inputs, output)

        @staticmethod
        def backward(ctx: Any, *grads: Any) -> Any:
            return backward(ctx, *grads)

    Eager.__name__ = Eager.__qualname__ = f"{op._name.split('::')[-1]}_eager"
    _EAGER[op] = Eager


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _eager_state(*groups: Iterable[Any]) -> bool | None:
    """None when something watches the call (torch.compile, a dispatch or function mode such as a profiler or
    opcheck, a functorch transform, a subclass, fake or meta tensor): it must go through the dispatcher. Else
    whether autograd needs the call's graph."""
    if (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
    ):
        return None
    if torch._C._are_functorch_transforms_active():
        return None
    grad_mode, needs_grad = torch.is_grad_enabled(), False
    for group in groups:
        for t in group:
            if isinstance(t, torch.Tensor):
                if type(t) not in _PLAIN or t.is_meta:
                    return None
                needs_grad = needs_grad or (grad_mode and t.requires_grad)
    return needs_grad


def invoke(op: torch.library.CustomOpDef, direct: Callable[..., Any], a: OpArgs, *front: Any) -> Any:
    """``op(*front, *a.values())``, computed by the same body on the cheapest route that is still correct.

    The dispatcher's route through a Python custom op (schema checks, the autograd wrapper, redispatch) costs
    50-100 us a call, more than a decode step's LayerNorm on a CPU or a small kernel's launch on a GPU. So a plain
    eager call runs ``direct(a, *front)`` when no gradient is needed, and the op's own autograd pair as a plain
    ``autograd.Function`` when one is. torch.compile, fake/meta tensors, dispatch modes (profilers, opcheck) and
    functorch transforms go through ``op``.
    """
    state = _eager_state(front, a.__dict__.values())
    if state is None:
        return op(*front, *a.values())
    if not state:
        return direct(a, *front)
    return _EAGER[op].apply(*front, *a.values())


def call(op: torch.library.CustomOpDef, *inputs: Any) -> Any:
    """``op(*inputs)`` (a backward op), or its body directly when nothing watches the call (see :func:`invoke`)."""
    if _eager_state(inputs) is None:
        return op(*inputs)
    return _BODIES[op](*inputs)


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
