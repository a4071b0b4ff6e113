"""hitnet/constraints.py: the ranges and choices declared on config fields are what the
library checks, with a message that names the field, the range and the value."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import pytest
from annotated_types import Gt, Interval, Le, MinLen
from hypothesis import given
from hypothesis import strategies as st

from hitnet.constraints import (
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    check_fields,
    checked_arguments,
    violation,
)


@pytest.mark.parametrize(
    ("value", "annotation", "message"),
    [
        (0, PositiveInt, "x must be >= 1, got 0"),
        (-1, NonNegativeInt, "x must be >= 0, got -1"),
        (0.0, PositiveFloat, "x must be > 0, got 0.0"),
        (1.0, Probability, "x must be in [0, 1), got 1.0"),
        (math.nan, Probability, "x must be in [0, 1), got nan"),
        (0.0, Annotated[float, Interval(gt=0, le=3)], "x must be in (0, 3], got 0.0"),
        (4, Annotated[int, Le(3)], "x must be <= 3, got 4"),
        ("c", Literal["a", "b"], "x must be one of 'a', 'b', got 'c'"),
        ([], Annotated[list[int], MinLen(1)], "x must hold at least 1 item(s), got []"),
        ([1, 0], list[PositiveInt], "each of x must be >= 1, got 0"),
        (frozenset({"c"}), frozenset[Literal["a"]], "each of x must be one of 'a', got 'c'"),
        (0, PositiveInt | None, "x must be >= 1, got 0"),
        (0, PositiveInt | Literal["auto"], "x must be >= 1, got 0"),
    ],
)
def test_a_value_outside_its_declaration_is_named_with_the_range(value, annotation, message):
    assert violation("x", value, annotation) == message


@pytest.mark.parametrize(
    ("value", "annotation"),
    [
        (1, PositiveInt),
        (0.0, Probability),
        (None, PositiveInt | None),
        ("auto", PositiveInt | Literal["auto"]),
        ([1, 2], Annotated[list[PositiveInt], MinLen(1)]),
        ("anything", str),  # types themselves are not checked: no declared range
        (object(), int),
    ],
)
def test_a_value_inside_its_declaration_passes(value, annotation):
    assert violation("x", value, annotation) is None


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_bounds_are_checked_as_the_comparisons_say(value: float):
    inside = violation("x", value, Annotated[float, Interval(ge=-1, lt=2)]) is None
    assert inside == (-1 <= value < 2)


@dataclass(frozen=True)
class _Config:
    size: PositiveInt = 1
    rate: Annotated[float, Gt(0)] = 1.0

    def __post_init__(self) -> None:
        check_fields(self)


def test_check_fields_refuses_the_first_field_out_of_range():
    assert _Config(size=3).size == 3
    with pytest.raises(ValueError, match="size must be >= 1, got 0"):
        _Config(size=0)
    with pytest.raises(ValueError, match="rate must be > 0, got -2"):
        _Config(rate=-2)


def test_checked_arguments_refuses_an_argument_out_of_range_before_running():
    calls = []

    @checked_arguments
    def run(steps: NonNegativeInt, rate: PositiveFloat = 1.0, name: str = "") -> int:
        calls.append(steps)
        return steps

    assert run(2, rate=0.5) == 2
    with pytest.raises(ValueError, match="steps must be >= 0, got -1"):
        run(-1)
    with pytest.raises(ValueError, match=r"rate must be > 0, got 0\.0"):
        run(3, rate=0.0)
    assert calls == [2]  # the refused calls never ran
