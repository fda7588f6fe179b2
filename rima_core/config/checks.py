"""Value checks of config keys, each with the JSON Schema fragment that says the same thing.

A check returns the reason a value is wrong, or ``None``. Each carries its JSON Schema fragment so
that ``params.schema.json`` (editor completion) and the docs' parameter reference are derived from
the very objects that validate at load: a range changed here changes all three. A condition JSON
Schema cannot express (``[low, high]`` ordering, fractions summing to 1) is checked here and
stated in the fragment's ``description``.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

JsonSchema = dict[str, Any]


class ConfigError(ValueError):
    """A params file or override that does not fit the schema."""


@dataclass(frozen=True)
class Check:
    """A callable value check with its JSON Schema fragment (``schema``, built lazily because a
    few fragments list names from a heavier module, e.g. the model registry's)."""

    test: Callable[[Any], str | None]
    make_schema: Callable[[], JsonSchema] = field(default=dict)

    def __call__(self, value: Any) -> str | None:
        return self.test(value)

    @property
    def schema(self) -> JsonSchema:
        return self.make_schema()


def did_you_mean(wrong: list[str], known: Any) -> str:
    """`` (did you mean 'lr'?)`` for the closest known name of each wrong one, or ``""``."""
    pairs = []
    for w in wrong:
        close = difflib.get_close_matches(str(w), sorted(map(str, known)), n=1, cutoff=0.6)
        if close:
            pairs.append(f"{w!r} -> {close[0]!r}" if len(wrong) > 1 else repr(close[0]))
    return f" (did you mean {', '.join(pairs)}?)" if pairs else ""


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def integer(low: int, high: int | None = None) -> Check:
    """An integer in ``[low, high]``."""
    bound = f">= {low}" if high is None else f"in [{low}, {high}]"

    def check(v: Any) -> str | None:
        if not isinstance(v, int) or isinstance(v, bool):
            return f"must be an integer {bound}"
        if v < low or (high is not None and v > high):
            return f"must be an integer {bound}"
        return None

    schema: JsonSchema = {"type": "integer", "minimum": low}
    if high is not None:
        schema["maximum"] = high
    return Check(check, lambda: dict(schema))


def number(
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> Check:
    """A finite number between ``low`` and ``high`` (each bound open or closed, or absent)."""
    if low is not None and high is not None:
        bound = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        bound = f"{'>' if low_open else '>='} {low:g}"
    elif high is not None:
        bound = f"{'<' if high_open else '<='} {high:g}"
    else:
        bound = ""
    reason = f"must be a finite number {bound}".rstrip()

    def check(v: Any) -> str | None:
        if not _is_number(v) or not math.isfinite(v):
            return reason
        if low is not None and (v <= low if low_open else v < low):
            return reason
        if high is not None and (v >= high if high_open else v > high):
            return reason
        return None

    schema: JsonSchema = {"type": "number"}
    if low is not None:
        schema["exclusiveMinimum" if low_open else "minimum"] = low
    if high is not None:
        schema["exclusiveMaximum" if high_open else "maximum"] = high
    return Check(check, lambda: dict(schema))


POSITIVE = number(0.0, low_open=True)
NON_NEGATIVE = number(0.0)
PROBABILITY = number(0.0, 1.0, high_open=True)  # a dropout / momentum: 1 would be degenerate
FRACTION = number(0.0, 1.0)
SEED = integer(0, 2**32 - 1)


def one_of(*choices: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in choices else f"must be one of {list(choices)}"

    return Check(check, lambda: {"enum": list(choices)})


def matches(pattern: str, what: str) -> Check:
    regex = re.compile(pattern)

    def check(v: Any) -> str | None:
        return None if isinstance(v, str) and regex.fullmatch(v) else f"must be {what}"

    # JSON Schema patterns are not anchored; fullmatch is
    return Check(
        check, lambda: {"type": "string", "pattern": f"^(?:{pattern})$", "description": what}
    )


def optional(inner: Check) -> Check:
    """``None`` (the setting is off) or a value ``inner`` accepts."""

    def check(v: Any) -> str | None:
        return None if v is None else inner(v)

    return Check(check, lambda: {"anyOf": [inner.schema, {"type": "null"}]})


def each(inner: Check, length: int | None = None, min_length: int = 0) -> Check:
    """A list whose items all pass ``inner`` (of exactly ``length`` items when given)."""

    def check(v: Any) -> str | None:
        if not isinstance(v, list):
            return "must be a list"
        if length is not None and len(v) != length:
            return f"must have {length} items"
        if len(v) < min_length:
            return f"must have at least {min_length} item(s)"
        for i, item in enumerate(v):
            reason = inner(item)
            if reason:
                return f"item {i}: {reason}"
        return None

    def schema() -> JsonSchema:
        out: JsonSchema = {"type": "array", "items": inner.schema}
        if length is not None:
            out["minItems"] = out["maxItems"] = length
        elif min_length:
            out["minItems"] = min_length
        return out

    return Check(check, schema)


def each_value(inner: Check) -> Check:
    """A mapping whose values all pass ``inner``."""

    def check(v: Any) -> str | None:
        for key, item in v.items():
            reason = inner(item)
            if reason:
                return f"{key!r}: {reason}"
        return None

    return Check(check, lambda: {"type": "object", "additionalProperties": inner.schema})


def both(*checks: Check, note: str = "") -> Check:
    """Every check in turn; the first reason wins. ``note`` states, in the JSON Schema, a
    condition of a check that has no schema of its own."""

    def check(v: Any) -> str | None:
        for c in checks:
            reason = c(v)
            if reason:
                return reason
        return None

    def schema() -> JsonSchema:
        parts = [c.schema for c in checks if c.schema]
        out: JsonSchema = parts[0] if len(parts) == 1 else {"allOf": parts}
        return {**out, "description": note} if note else out

    return Check(check, schema)


def increasing_pair(inner: Check) -> Check:
    """``[low, high]`` with ``low < high``, both passing ``inner`` (a search or value range)."""

    def order(v: list[Any]) -> str | None:
        return None if v[0] < v[1] else "must be [low, high] with low < high"

    return both(each(inner, length=2), Check(order), note="[low, high] with low < high")


def sums_to_one(v: list[float]) -> str | None:
    return None if abs(sum(v) - 1.0) <= 1e-6 else "must sum to 1"


SPLIT_FRACTIONS = both(
    each(FRACTION, length=3), Check(sums_to_one), note="train, val, test fractions summing to 1"
)
SHAPE_3D = each(integer(1), length=3)  # D, H, W
NON_EMPTY = matches(r"\S.*", "a non-empty string")
URL = matches(r"[A-Za-z][A-Za-z0-9+.\-]*://.*", "a URL (scheme://...)")
