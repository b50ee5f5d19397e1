"""Checked value types for command-line options: a bad value is one argparse error line naming the option.

    p.add_argument("--steps", type=integer(1), ...)        # an integer >= 1
    p.add_argument("--temperature", type=number(0, strict=True))   # a finite number > 0
"""

from __future__ import annotations

import argparse
import inspect
import math
from collections.abc import Callable

SEED_MAX = 2**63 - 1


def integer(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An integer in [low, high] (either bound optional)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range: use {_range(low, high)}")
        return value
    parse.__name__ = "integer"
    return parse


def number(low: float | None = None, high: float | None = None, *, strict: bool = False) -> Callable[[str], float]:
    """A finite number in [low, high] ((low, high] with ``strict``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if (low is not None and (value <= low if strict else value < low)) or (high is not None and value > high):
            bounds = [f"{'>' if strict else '>='} {low:g}" if low is not None else None,
                      f"<= {high:g}" if high is not None else None]
            allowed = " and ".join(filter(None, bounds))
            raise argparse.ArgumentTypeError(f"{value:g} is out of range: use a number {allowed}")
        return value
    parse.__name__ = "number"
    return parse


def comma_list(one: Callable[[str], object], example: str) -> Callable[[str], list]:
    """A comma-separated list of values, each parsed by ``one`` (``integer(...)``, ``number(...)``)."""
    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"give one or more comma-separated {one.__name__}s, e.g. {example}")
        return [one(t) for t in items]
    parse.__name__ = f"{one.__name__}s"
    return parse


seed = integer(0, SEED_MAX)


def _range(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f"an integer from {low} to {high}"
    return f"an integer >= {low}" if low is not None else f"an integer <= {high}"


def default_of(function: Callable[..., object], parameter: str) -> object:
    """The default of ``function``'s ``parameter``: a command-line option that maps onto a Python argument
    takes its default from the function, so that the two never disagree."""
    return inspect.signature(function).parameters[parameter].default
