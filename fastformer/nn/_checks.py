"""Constructor argument checks shared by the ``fastformer.nn`` modules: errors name the argument."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence


def check_int(value: object, name: str) -> int:
    """``value`` as an int; TypeError naming ``name`` unless an integer (bool is not)."""
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {_describe(value)}")
    return operator.index(value)


def check_size(value: object, name: str) -> int:
    """``value`` as a positive int; TypeError naming ``name`` unless an integer (bool is not), ValueError if < 1."""
    size = check_int(value, name)
    if size < 1:
        raise ValueError(f"{name} must be a positive int, got {size}")
    return size


def check_shape(value: object, name: str = "normalized_shape") -> int | tuple[int, ...]:
    """An int or a non-empty sequence of ints, each positive (as ``torch.nn.LayerNorm`` takes); errors name ``name``."""
    one = isinstance(value, (str, bytes)) or not isinstance(value, Sequence)
    if one and not _is_int(value):
        raise TypeError(f"{name} must be an int or a sequence of ints, got {_describe(value)}")
    for d in () if one else value:
        if not _is_int(d):
            raise TypeError(f"{name} must be an int or a sequence of ints, got an element of type {type(d).__name__}")
    shape = (operator.index(value),) if one else tuple(operator.index(d) for d in value)
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"{name} must be non-empty with positive sizes, got {shape}")
    return shape[0] if one else shape


def check_eps(eps: object) -> float:
    """``eps`` as a finite float >= 0, with the messages ``fastformer.layer_norm`` gives at call time."""
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not 0.0 <= eps < math.inf:
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    return eps


def _is_int(value: object) -> bool:
    """An integer (a Python or NumPy int, a one-element integer tensor), not a bool."""
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _describe(value: object) -> str:
    if isinstance(value, type):
        return f"the class {value.__name__}"
    return f"{type(value).__name__} {value!r}" if isinstance(value, (int, float, str)) else type(value).__name__
