"""argparse value types shared by the command-line tools."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T", int, float)

#: the noun of an item type in the messages of :func:`comma_list`
_NOUNS = {int: "integers", float: "numbers"}


def _number(text: str, convert: Callable[[str], T], noun: str) -> T:
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _number(text, int, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _number(text, int, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a float > 0."""
    value = _number(text, float, "a number")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1) (a share of a data set held out, for instance)."""
    value = _number(text, float, "a number")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def comma_list(
    item_type: type[T],
    check: Callable[[T], bool] | None = None,
    what: str | None = None,
    increasing: bool = False,
) -> Callable[[str], list[T]]:
    """An argparse type for comma-separated values: ``"1,64,512"`` -> ``[1, 64, 512]``.

    Args:
        item_type: ``int`` or ``float``, applied to each item (empty items are skipped).
        check: each value must pass it (None: any value).
        what: the values expected, for the message when ``check`` fails or the list is empty
            (default: "integers" / "numbers").
        increasing: the values must also be strictly increasing.

    Returns:
        The parser: ``text -> list``; it raises :class:`argparse.ArgumentTypeError` (printed by
        argparse after the flag's name) for an item that does not parse, an empty list, a value
        failing ``check`` or, with ``increasing``, values out of order.
    """
    noun = _NOUNS.get(item_type, item_type.__name__)
    what = what or noun

    def parse(text: str) -> list[T]:
        try:
            values = [item_type(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {noun}, got {text!r}"
            ) from None
        ordered = not increasing or all(a < b for a, b in zip(values, values[1:]))
        if not values or not ordered or (check is not None and not all(map(check, values))):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return values

    parse.__name__ = f"comma_list_{noun}"  # argparse names the type in some of its messages
    return parse
