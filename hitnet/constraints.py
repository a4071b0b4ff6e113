"""The ranges of config fields and arguments, declared once as ``annotated_types`` metadata.

A field's type, default and range are declared on the library's dataclass or signature, e.g.
``dropout: Probability = 0.5``. The pipeline's pydantic sections are built from those
declarations, and pydantic reads this metadata natively; the library checks the same metadata
here, by hand, because it does not depend on pydantic (``check_fields``, ``checked_arguments``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from annotated_types import Ge, GroupedMetadata, Gt, Interval, Le, Lt, MaxLen, MinLen

PositiveInt = Annotated[int, Ge(1)]
NonNegativeInt = Annotated[int, Ge(0)]
PositiveFloat = Annotated[float, Gt(0)]
Probability = Annotated[float, Interval(ge=0, lt=1)]
Fraction = Annotated[float, Interval(ge=0, le=1)]

Function = TypeVar("Function", bound=Callable[..., Any])


def violation(name: str, value: object, annotation: object) -> str | None:
    """Why ``value`` breaks what ``annotation`` declares for ``name`` (its Literal choices,
    bounds and lengths, and those of a list's or set's items), or None when it does not.
    Types themselves are not checked: Python's duck typing stays as it was."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return violation(name, value, args[0]) or _bounds_violation(name, value, args[1:])
    if origin is Literal:
        if value in args:
            return None
        return f"{name} must be one of {', '.join(map(repr, args))}, got {value!r}"
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        problems = [violation(name, value, arm) for arm in args if arm is not type(None)]
        return None if None in problems else problems[0]
    if origin in (list, tuple, set, frozenset) and isinstance(
        value, list | tuple | set | frozenset
    ):
        problems = (violation(f"each of {name}", item, args[0]) for item in value)
        return next((problem for problem in problems if problem), None)
    return None


def _bounds_violation(name: str, value: Any, metadata: tuple[object, ...]) -> str | None:
    flat = [
        item
        for entry in metadata
        for item in (entry if isinstance(entry, GroupedMetadata) else [entry])
    ]
    lower = next((m for m in flat if isinstance(m, Ge | Gt)), None)
    upper = next((m for m in flat if isinstance(m, Le | Lt)), None)
    try:  # a NaN is inside no bound
        inside = all(_within(value, bound) for bound in (lower, upper) if bound is not None)
    except TypeError:  # not a number: e.g. the other arm of `PositiveInt | Literal["auto"]`
        inside = False
    if not inside:
        return f"{name} must be {_describe_bounds(lower, upper)}, got {value!r}"
    for length in flat:
        if isinstance(length, MinLen) and len(value) < length.min_length:
            return f"{name} must hold at least {length.min_length} item(s), got {value!r}"
        if isinstance(length, MaxLen) and len(value) > length.max_length:
            return f"{name} must hold at most {length.max_length} item(s), got {value!r}"
    return None


def _within(value: Any, bound: Ge | Gt | Le | Lt) -> bool:
    if isinstance(bound, Ge):
        return value >= bound.ge
    if isinstance(bound, Gt):
        return value > bound.gt
    if isinstance(bound, Le):
        return value <= bound.le
    return value < bound.lt


def _describe_bounds(lower: Ge | Gt | None, upper: Le | Lt | None) -> str:
    if lower is not None and upper is not None:
        opening = f"[{lower.ge}" if isinstance(lower, Ge) else f"({lower.gt}"
        closing = f"{upper.le}]" if isinstance(upper, Le) else f"{upper.lt})"
        return f"in {opening}, {closing}"
    if lower is not None:
        return f">= {lower.ge}" if isinstance(lower, Ge) else f"> {lower.gt}"
    assert upper is not None
    return f"<= {upper.le}" if isinstance(upper, Le) else f"< {upper.lt}"


@functools.cache
def _hints(owner: object) -> dict[str, Any]:
    return get_type_hints(owner, include_extras=True)


def check_fields(config: object) -> None:
    """Raises ``ValueError`` naming the first field of the dataclass instance ``config`` whose
    value breaks its declared range or choices (call it from ``__post_init__``)."""
    hints = _hints(type(config))
    for field in dataclasses.fields(config):  # type: ignore[arg-type]
        problem = violation(field.name, getattr(config, field.name), hints[field.name])
        if problem:
            raise ValueError(problem)


def checked_arguments(function: Function) -> Function:
    """``function``, refusing (``ValueError`` naming it) an argument that breaks its declared
    range or choices."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def checked(*args: Any, **kwargs: Any) -> Any:
        hints = _hints(function)
        for name, value in signature.bind(*args, **kwargs).arguments.items():
            problem = violation(name, value, hints.get(name))
            if problem:
                raise ValueError(problem)
        return function(*args, **kwargs)

    return checked  # type: ignore[return-value]
