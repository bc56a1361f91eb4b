"""Durations parse as Go's time.ParseDuration does, keep their text, and compare by value."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from meshlet.api.duration import NANOS_PER_UNIT, Duration, format_nanos, parse_nanos


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("100ms", 0.1),
        ("1.5s", 1.5),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("2m3.5s", 123.5),
        ("0", 0.0),
        ("0s", 0.0),
        (".5s", 0.5),
        ("1.s", 1.0),
        ("10us", 0.00001),
        ("10µs", 0.00001),
        ("7ns", 7e-9),
        ("-1.5s", -1.5),
        ("+2s", 2.0),
    ],
)
def test_go_duration_syntax_parses_to_seconds(text: str, seconds: float) -> None:
    d = Duration.parse(text)
    assert d.seconds == pytest.approx(seconds)
    assert d.text == text


@pytest.mark.parametrize("text", ["", "1", "10", "s", ".s", "1x", "1 s", "1sm", "-", "1h-1m", "٣s"])
def test_malformed_durations_are_refused_with_the_grammar(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        Duration.parse(text)


def test_fractions_of_a_nanosecond_are_truncated_as_go_does() -> None:
    assert parse_nanos("1.9ns") == 1
    assert parse_nanos("0.0000000019s") == 1


def test_out_of_range_durations_are_refused() -> None:
    with pytest.raises(ValueError, match="out of range"):
        Duration.parse("3000000h")


def test_durations_compare_by_value_whatever_their_text() -> None:
    assert Duration.parse("90s") == Duration.parse("1m30s")
    assert hash(Duration.parse("1000ms")) == hash(Duration.parse("1s"))
    assert Duration.parse("1ms") < Duration.parse("1s")
    assert str(Duration.parse("90s")) == "90s"


def test_durations_built_in_code_get_the_canonical_text() -> None:
    assert Duration.of(seconds=1.5).text == "1.5s"
    assert Duration.of(milliseconds=100).text == "0.1s"
    assert Duration.of().text == "0s"


class _Holder(BaseModel):
    d: Duration


def test_a_duration_field_reads_the_string_and_writes_the_original_text_back() -> None:
    holder = _Holder.model_validate({"d": "1m30s"})
    assert holder.d.seconds == 90
    assert holder.model_dump(mode="json") == {"d": "1m30s"}
    assert holder.model_dump() == {"d": "1m30s"}


def test_a_bare_number_is_refused_with_a_hint() -> None:
    with pytest.raises(ValidationError, match='such as "10s"'):
        _Holder.model_validate({"d": 10})


_UNITS = sorted(NANOS_PER_UNIT)
_component = st.tuples(
    st.integers(min_value=0, max_value=10_000),
    st.one_of(st.none(), st.text(alphabet="0123456789", min_size=0, max_size=9)),
    st.sampled_from(_UNITS),
)


@given(st.lists(_component, min_size=1, max_size=4), st.sampled_from(["", "+", "-"]))
def test_parsing_agrees_with_exact_arithmetic(
    components: list[tuple[int, str | None, str]], sign: str
) -> None:
    text = sign
    expected = 0
    for whole, frac, unit in components:
        text += str(whole) + (f".{frac}" if frac is not None else "") + unit
        scale = NANOS_PER_UNIT[unit]
        exact = Fraction(whole) + (Fraction(int(frac), 10 ** len(frac)) if frac else 0)
        expected += int(exact * scale)  # Go truncates each component to whole nanoseconds
    if sign == "-":
        expected = -expected
    assert parse_nanos(text) == expected
    assert Duration.parse(text).text == text


@given(st.integers(min_value=-(2**63 - 1), max_value=2**63 - 1))
def test_canonical_text_parses_back_to_the_same_value(nanos: int) -> None:
    assert parse_nanos(format_nanos(nanos)) == nanos
    assert Duration(nanos).text == format_nanos(nanos)
