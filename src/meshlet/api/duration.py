"""Durations as Istio's configuration writes them: ``"1s"``, ``"100ms"``, ``"1.5s"``, ``"1h30m"``.

Istio reads ``google.protobuf.Duration`` fields from YAML with Go's ``time.ParseDuration``
(and Kubernetes checks them with CEL's ``duration()``, the same grammar): one or more decimal
numbers, each with an optional fraction and a unit -- ``ns``, ``us`` (or ``µs``), ``ms``, ``s``,
``m``, ``h`` -- and an optional sign in front; ``"0"`` alone is also allowed. Fractions of a
nanosecond are truncated, as Go does.

A ``Duration`` keeps the exact value in nanoseconds and the text it came from, so that a
resource written back out reads as the user wrote it (``"90s"`` stays ``"90s"``). Two
durations are equal when their values are, whatever their text.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

NANOS_PER_UNIT = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # U+00B5 micro sign
    "μs": 1_000,  # U+03BC Greek small letter mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
}
_MAX_NANOS = 2**63 - 1  # Go's time.Duration is an int64 of nanoseconds
_COMPONENT = re.compile(r"([0-9]+)?(?:\.([0-9]*))?(ns|us|µs|μs|ms|s|m|h)")
_GRAMMAR_HINT = 'a number with a unit (ns, us, ms, s, m, h), e.g. "1s", "100ms", "1.5s", "1h30m"'


class Duration:
    """An exact, signed span of time with the text it was written as."""

    __slots__ = ("_nanos", "_text")

    def __init__(self, nanos: int, text: str | None = None) -> None:
        if not -_MAX_NANOS <= nanos <= _MAX_NANOS:
            raise ValueError(f"duration {nanos}ns is out of range")
        self._nanos = nanos
        self._text = text if text is not None else format_nanos(nanos)

    @classmethod
    def parse(cls, text: str) -> Duration:
        """Parse Go duration syntax; raises ``ValueError`` naming what is wrong."""
        return cls(parse_nanos(text), text)

    @classmethod
    def of(cls, *, seconds: float = 0, milliseconds: float = 0) -> Duration:
        """A duration built in code; its text is the shortest exact form (``"1.5s"``)."""
        return cls(round(seconds * 1e9 + milliseconds * 1e6))

    @property
    def nanos(self) -> int:
        return self._nanos

    @property
    def seconds(self) -> float:
        return self._nanos / 1e9

    @property
    def milliseconds(self) -> float:
        return self._nanos / 1e6

    @property
    def text(self) -> str:
        """The text as written (or, for a duration built in code, its canonical form)."""
        return self._text

    def __str__(self) -> str:
        return self._text

    def __repr__(self) -> str:
        return f"Duration({self._text!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Duration):
            return self._nanos == other._nanos
        return NotImplemented

    def __lt__(self, other: Duration) -> bool:
        return self._nanos < other._nanos

    def __le__(self, other: Duration) -> bool:
        return self._nanos <= other._nanos

    def __gt__(self, other: Duration) -> bool:
        return self._nanos > other._nanos

    def __ge__(self, other: Duration) -> bool:
        return self._nanos >= other._nanos

    def __hash__(self) -> int:
        return hash(self._nanos)

    # -- pydantic integration: a field typed ``Duration`` accepts the YAML string and dumps
    # the original text back.

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: type[Any], handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            _validate,
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda d: d.text, when_used="always"
            ),
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"type": "string", "format": "duration", "examples": ["1s", "100ms"]}


def _validate(value: object) -> Duration:
    if isinstance(value, Duration):
        return value
    if isinstance(value, str):
        return Duration.parse(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise ValueError(f'expected a duration string such as "{value}s", got the number {value}')
    raise ValueError(f"expected a duration string, {_GRAMMAR_HINT}")


def parse_nanos(text: str) -> int:
    """Go's ``time.ParseDuration``, returning nanoseconds."""
    s = text
    if not s:
        raise ValueError(f"empty duration; expected {_GRAMMAR_HINT}")
    sign = 1
    if s[0] in "+-":
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    if s == "0":
        return 0
    if not s:
        raise ValueError(f"invalid duration {text!r}; expected {_GRAMMAR_HINT}")
    total = 0
    pos = 0
    while pos < len(s):
        m = _COMPONENT.match(s, pos)
        if m is None or (m.group(1) is None and not m.group(2)):
            raise ValueError(f"invalid duration {text!r}; expected {_GRAMMAR_HINT}")
        whole, frac, unit = m.group(1) or "0", m.group(2) or "", m.group(3)
        scale = NANOS_PER_UNIT[unit]
        total += int(whole) * scale + (int(frac) * scale // 10 ** len(frac) if frac else 0)
        if total > _MAX_NANOS:
            raise ValueError(f"duration {text!r} is out of range")
        pos = m.end()
    return sign * total


def format_nanos(nanos: int) -> str:
    """The canonical text for a value: whole or decimal seconds (``"0s"``, ``"1.5s"``)."""
    sign = "-" if nanos < 0 else ""
    whole, frac = divmod(abs(nanos), 1_000_000_000)
    if not frac:
        return f"{sign}{whole}s"
    return f"{sign}{whole}.{frac:09d}".rstrip("0") + "s"
