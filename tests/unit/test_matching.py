"""Compiled matchers: strings, headers, query parameters, path specifiers, route matches.

Semantics come from Envoy: ``envoy/type/matcher/v3/string.proto``,
``envoy/config/route/v3/route_components.proto`` (HeaderMatcher, QueryParameterMatcher,
RouteMatch) and ENVOY-SEMANTICS.md §2.
"""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import json_format
from hypothesis import given
from hypothesis import strategies as st

from meshlet.errors import ConfigError
from meshlet.proxy.headers import Headers, RequestHead
from meshlet.proxy.matching import (
    compile_header_matcher,
    compile_path_matcher,
    compile_query_parameter_matcher,
    compile_route_match,
    compile_string_matcher,
    first_query_value,
    query_less,
)


def string_matcher(d: dict[str, Any]) -> Any:
    return compile_string_matcher(json_format.ParseDict(d, string_pb2.StringMatcher()), "m")


def header_matcher(d: dict[str, Any]) -> Any:
    return compile_header_matcher(json_format.ParseDict(d, rc.HeaderMatcher()), "h")


def query_matcher(d: dict[str, Any]) -> Any:
    return compile_query_parameter_matcher(
        json_format.ParseDict(d, rc.QueryParameterMatcher()), "q"
    )


def route_match(d: dict[str, Any]) -> Any:
    return compile_route_match(json_format.ParseDict(d, rc.RouteMatch()), "match")


def path_matcher(d: dict[str, Any]) -> Any:
    return compile_path_matcher(json_format.ParseDict(d, rc.RouteMatch()), "match")


def head(
    path: bytes = b"/",
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    authority: bytes = b"example.com",
    method: bytes = b"GET",
) -> RequestHead:
    return RequestHead(
        method=method, path=path, authority=authority, headers=Headers(list(headers or []))
    )


def problems(excinfo: pytest.ExceptionInfo[ConfigError]) -> list[tuple[str, str]]:
    return [(p.path, p.message) for p in excinfo.value.problems]


text = st.text(alphabet="abcAB/-_.?=&%,é", max_size=12)
nonempty = st.text(alphabet="abcAB/-_.?=&%,é", min_size=1, max_size=6)


# --------------------------------------------------------------------------- StringMatcher


@given(pattern=nonempty, value=text)
def test_string_matcher_kinds_agree_with_their_definitions(pattern: str, value: str) -> None:
    # string.proto: exact / prefix / suffix / contains on the raw value.
    p, v = pattern.encode(), value.encode()
    assert string_matcher({"exact": pattern}).matches(v) == (v == p)
    assert string_matcher({"prefix": pattern}).matches(v) == v.startswith(p)
    assert string_matcher({"suffix": pattern}).matches(v) == v.endswith(p)
    assert string_matcher({"contains": pattern}).matches(v) == (p in v)


@given(pattern=nonempty, value=text)
def test_ignore_case_folds_ascii_for_every_kind(pattern: str, value: str) -> None:
    # string.proto ignore_case: "exact/prefix/suffix/contains matching should be case
    # insensitive" (ASCII, as Envoy's absl::EqualsIgnoreCase).
    p, v = pattern.encode().lower(), value.encode().lower()
    for kind, expected in [
        ("exact", v == p),
        ("prefix", v.startswith(p)),
        ("suffix", v.endswith(p)),
        ("contains", p in v),
    ]:
        m = string_matcher({kind: pattern, "ignore_case": True})
        assert m.matches(value.encode()) == expected, kind


def test_ignore_case_matches_other_case() -> None:
    assert string_matcher({"exact": "Foo", "ignore_case": True}).matches(b"fOO")
    assert not string_matcher({"exact": "Foo"}).matches(b"fOO")
    assert string_matcher({"suffix": "BAR", "ignore_case": True}).matches(b"xbar")


def test_safe_regex_must_match_the_whole_value() -> None:
    m = string_matcher({"safe_regex": {"regex": "a+"}})
    assert m.matches(b"aaa")
    assert not m.matches(b"baa")
    assert not m.matches(b"aab")


def test_ignore_case_does_not_apply_to_safe_regex() -> None:
    # string.proto: ignore_case "has no effect for the safe_regex match".
    m = string_matcher({"safe_regex": {"regex": "abc"}, "ignore_case": True})
    assert not m.matches(b"ABC")


def test_exact_empty_string_matches_only_the_empty_value() -> None:
    m = string_matcher({"exact": ""})
    assert m.matches(b"")
    assert not m.matches(b"x")


@pytest.mark.parametrize("kind", ["prefix", "suffix", "contains"])
def test_empty_prefix_suffix_contains_are_refused(kind: str) -> None:
    # string.proto: min_len 1 for prefix, suffix and contains.
    with pytest.raises(ConfigError) as e:
        string_matcher({kind: ""})
    assert problems(e) == [(f"m.{kind}", "must not be empty")]


def test_invalid_regex_is_refused_with_its_field_path() -> None:
    with pytest.raises(ConfigError) as e:
        string_matcher({"safe_regex": {"regex": "a("}})
    assert e.value.problems[0].path == "m.safe_regex.regex"
    assert "not a valid regular expression" in e.value.problems[0].message


def test_string_matcher_without_pattern_is_refused() -> None:
    with pytest.raises(ConfigError, match="needs one of exact"):
        string_matcher({"ignore_case": True})


def test_custom_string_matcher_is_refused_by_name() -> None:
    with pytest.raises(ConfigError) as e:
        string_matcher({"custom": {"name": "x"}})
    assert problems(e) == [("m.custom", "is not supported by meshlet")]


def test_re2_program_size_option_is_refused() -> None:
    with pytest.raises(ConfigError) as e:
        string_matcher({"safe_regex": {"google_re2": {"max_program_size": 5}, "regex": "a"}})
    assert problems(e) == [
        ("m.safe_regex.google_re2.max_program_size", "is not supported by meshlet")
    ]


def test_empty_google_re2_marker_is_accepted() -> None:
    assert string_matcher({"safe_regex": {"google_re2": {}, "regex": "a"}}).matches(b"a")


# --------------------------------------------------------------------------- HeaderMatcher

# ENVOY-SEMANTICS §2 / route_components.proto HeaderMatcher: with the header absent (and
# treat_missing_header_as_empty false) only present_match:false, or present_match:true with
# invert_match:true, matches; every value matcher fails even when inverted.
VALUE_SPECIFIERS: list[dict[str, Any]] = [
    {"string_match": {"exact": "x"}},
    {"string_match": {"prefix": "x"}},
    {"exact_match": "x"},
    {"prefix_match": "x"},
    {"suffix_match": "x"},
    {"contains_match": "x"},
    {"safe_regex_match": {"regex": ".*"}},
    {"range_match": {"start": 0, "end": 10}},
]


@pytest.mark.parametrize("spec", VALUE_SPECIFIERS)
@pytest.mark.parametrize("invert", [False, True])
def test_absent_header_fails_value_matchers_even_inverted(
    spec: dict[str, Any], invert: bool
) -> None:
    m = header_matcher({"name": "x-h", **spec, "invert_match": invert})
    assert not m.matches(head())


@pytest.mark.parametrize(
    ("present", "invert", "absent_result", "present_result"),
    [
        (True, False, False, True),
        (False, False, True, False),
        (True, True, True, False),
        (False, True, False, True),
    ],
)
def test_present_match_compares_presence_then_inverts(
    present: bool, invert: bool, absent_result: bool, present_result: bool
) -> None:
    m = header_matcher({"name": "x-h", "present_match": present, "invert_match": invert})
    assert m.matches(head()) is absent_result
    assert m.matches(head(headers=[(b"x-h", b"")])) is present_result


def test_matcher_without_specifier_is_a_presence_check() -> None:
    # route_components.proto: no header_match_specifier => present_match: true.
    m = header_matcher({"name": "x-h"})
    assert m.matches(head(headers=[(b"x-h", b"anything")]))
    assert not m.matches(head())


def test_treat_missing_header_as_empty_matches_the_empty_string() -> None:
    exact_empty = header_matcher(
        {"name": "x-h", "string_match": {"exact": ""}, "treat_missing_header_as_empty": True}
    )
    assert exact_empty.matches(head())
    inverted = header_matcher(
        {
            "name": "x-h",
            "string_match": {"exact": "x"},
            "invert_match": True,
            "treat_missing_header_as_empty": True,
        }
    )
    assert inverted.matches(head())  # "" != "x", inverted


def test_invert_match_negates_a_value_match() -> None:
    # route_components.proto invert_match examples: the regex \d{3} does not match 1234, so it
    # matches when inverted; the range [-10,0) matches -1, so inverted it does not.
    regex = header_matcher(
        {"name": "x", "safe_regex_match": {"regex": r"\d{3}"}, "invert_match": True}
    )
    assert regex.matches(head(headers=[(b"x", b"1234")]))
    rng = header_matcher(
        {"name": "x", "range_match": {"start": -10, "end": 0}, "invert_match": True}
    )
    assert not rng.matches(head(headers=[(b"x", b"-1")]))


def test_repeated_header_values_are_joined_with_commas() -> None:
    m = header_matcher({"name": "x-h", "string_match": {"exact": "a,b"}})
    assert m.matches(head(headers=[(b"x-h", b"a"), (b"other", b"z"), (b"x-h", b"b")]))
    assert not header_matcher({"name": "x-h", "string_match": {"exact": "a"}}).matches(
        head(headers=[(b"x-h", b"a"), (b"x-h", b"b")])
    )


def test_header_name_is_matched_case_insensitively() -> None:
    m = header_matcher({"name": "X-User", "string_match": {"exact": "jason"}})
    assert m.matches(head(headers=[(b"x-user", b"jason")]))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (":authority", "reviews:9080"),
        ("host", "reviews:9080"),
        (":method", "POST"),
        (":path", "/a?b=1"),
        (":scheme", "http"),
    ],
)
def test_pseudo_headers_are_read_from_the_request_line(name: str, value: str) -> None:
    m = header_matcher({"name": name, "string_match": {"exact": value}})
    assert m.matches(head(b"/a?b=1", authority=b"reviews:9080", method=b"POST"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"-1", True),
        (b"+-1", False),
        (b"-10", True),
        (b" -5 ", True),  # absl::SimpleAtoi allows surrounding spaces
        (b"0", False),  # end is exclusive
        (b"-11", False),
        (b"-5a", False),
        (b"-5.0", False),
        (b"", False),
        (b"-1_0", False),
        (b"-99999999999999999999", False),  # not an int64
    ],
)
def test_range_match_needs_a_whole_int64_in_half_open_range(value: bytes, expected: bool) -> None:
    m = header_matcher({"name": "x", "range_match": {"start": -10, "end": 0}})
    assert m.matches(head(headers=[(b"x", value)])) is expected


def test_range_match_accepts_an_explicit_plus_sign() -> None:
    m = header_matcher({"name": "x", "range_match": {"start": 0, "end": 10}})
    assert m.matches(head(headers=[(b"x", b"+5")]))


def test_deprecated_empty_exact_match_matches_any_value() -> None:
    # Envoy's HeaderDataExactMatch: an empty expected value matches every value.
    m = header_matcher({"name": "x", "exact_match": ""})
    assert m.matches(head(headers=[(b"x", b"whatever")]))
    assert not m.matches(head())


def test_deprecated_specifiers_behave_like_string_match() -> None:
    h = head(headers=[(b"x", b"hello")])
    assert header_matcher({"name": "x", "exact_match": "hello"}).matches(h)
    assert header_matcher({"name": "x", "prefix_match": "he"}).matches(h)
    assert header_matcher({"name": "x", "suffix_match": "lo"}).matches(h)
    assert header_matcher({"name": "x", "contains_match": "ell"}).matches(h)
    assert not header_matcher({"name": "x", "prefix_match": "lo"}).matches(h)


def test_header_matcher_needs_a_name() -> None:
    with pytest.raises(ConfigError) as e:
        header_matcher({"present_match": True})
    assert problems(e) == [("h.name", "must not be empty")]


# --------------------------------------------------------------------------- query parameters


def reference_first_value(path: bytes, name: bytes) -> bytes | None:
    """Envoy's QueryParamsMulti::parseQueryString + getFirstValue, written plainly."""
    if b"?" not in path:
        return None
    query = path.split(b"?", 1)[1].split(b"#", 1)[0]
    found: dict[bytes, bytes] = {}
    for piece in query.split(b"&"):
        if b"=" in piece:
            k, v = piece.split(b"=", 1)
        else:
            k, v = piece, b""
        found.setdefault(k, v)
    return found.get(name)


@given(
    params=st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c", ""]), st.text("xy=%2", max_size=3), st.booleans()
        ),
        max_size=5,
    ),
    name=st.sampled_from(["a", "b", "c"]),
)
def test_first_query_value_agrees_with_envoys_parse(
    params: list[tuple[str, str, bool]], name: str
) -> None:
    query = "&".join(f"{k}={v}" if eq else k for k, v, eq in params)
    path = f"/p?{query}".encode()
    assert first_query_value(path, name.encode()) == reference_first_value(path, name.encode())


def test_query_matcher_sees_only_the_first_value() -> None:
    m = query_matcher({"name": "debug", "string_match": {"exact": "1"}})
    assert m.matches(b"/x?debug=1&debug=2")
    assert not m.matches(b"/x?debug=2&debug=1")


def test_query_values_are_compared_undecoded() -> None:
    m = query_matcher({"name": "q", "string_match": {"exact": "a%20b"}})
    assert m.matches(b"/x?q=a%20b")
    assert not m.matches(b"/x?q=a b")


def test_query_present_match_compares_presence() -> None:
    # Envoy >= 1.34 (enable_new_query_param_present_match_behavior, on by default).
    present = query_matcher({"name": "debug", "present_match": True})
    absent = query_matcher({"name": "debug", "present_match": False})
    assert present.matches(b"/x?debug") and present.matches(b"/x?debug=")
    assert not present.matches(b"/x?other=1")
    assert absent.matches(b"/x") and not absent.matches(b"/x?debug=1")


def test_query_string_match_needs_the_key() -> None:
    m = query_matcher({"name": "v", "string_match": {"exact": ""}})
    assert m.matches(b"/x?v") and m.matches(b"/x?v=")
    assert not m.matches(b"/x?w=")


def test_query_matcher_without_specifier_needs_the_key() -> None:
    m = query_matcher({"name": "v"})
    assert m.matches(b"/x?v=1")
    assert not m.matches(b"/x")


# --------------------------------------------------------------------------- path specifiers

segment = st.sampled_from(["api", "API", "dev", "developer", "", "x"])
paths = st.builds(
    lambda segs, q, f: ("/" + "/".join(segs) + q + f).encode(),
    st.lists(segment, max_size=4),
    st.sampled_from(["", "?", "?a=1", "?/x"]),
    st.sampled_from(["", "#frag"]),
)
values = st.builds(lambda segs: "/" + "/".join(segs), st.lists(segment, min_size=1, max_size=3))


@given(path=paths, value=values, case_sensitive=st.booleans())
def test_path_specifiers_agree_with_their_definitions_on_the_query_less_path(
    path: bytes, value: str, case_sensitive: bool
) -> None:
    # route_components.proto RouteMatch: prefix on :path; path and path_separated_prefix on the
    # path without query; case_sensitive (default true) for all three.
    v = value.encode()
    just = query_less(path)
    fold = (lambda b: b) if case_sensitive else bytes.lower
    cs = {"case_sensitive": case_sensitive}
    assert path_matcher({"prefix": value, **cs}).matches(path) == fold(path).startswith(fold(v))
    assert path_matcher({"path": value, **cs}).matches(path) == (fold(just) == fold(v))
    if not v.endswith(b"/"):
        expected = fold(just) == fold(v) or fold(just).startswith(fold(v) + b"/")
        assert path_matcher({"path_separated_prefix": value, **cs}).matches(path) == expected


def test_prefix_is_not_segment_aware() -> None:
    assert path_matcher({"prefix": "/api"}).matches(b"/apix")


def test_path_ignores_the_query_string() -> None:
    m = path_matcher({"path": "/productpage"})
    assert m.matches(b"/productpage?u=normal")
    assert not m.matches(b"/productpage/")


def test_path_separated_prefix_examples_from_the_proto() -> None:
    m = path_matcher({"path_separated_prefix": "/api/dev"})
    for ok in (b"/api/dev", b"/api/dev/", b"/api/dev/x", b"/api/dev?q"):
        assert m.matches(ok), ok
    assert not m.matches(b"/api/developer")


@pytest.mark.parametrize("value", ["/api/", "/a?b", "/a#b", ""])
def test_invalid_path_separated_prefix_is_refused(value: str) -> None:
    with pytest.raises(ConfigError) as e:
        path_matcher({"path_separated_prefix": value})
    assert e.value.problems[0].path == "match.path_separated_prefix"


def test_safe_regex_path_fully_matches_the_query_less_path() -> None:
    m = path_matcher({"safe_regex": {"regex": "/api/v[0-9]+"}})
    assert m.matches(b"/api/v1?x=1")
    assert not m.matches(b"/api/v1/x")
    assert not m.matches(b"/x/api/v1")


def test_safe_regex_path_ignores_case_sensitive() -> None:
    m = path_matcher({"safe_regex": {"regex": "/abc"}, "case_sensitive": False})
    assert not m.matches(b"/ABC")


def test_case_insensitive_prefix() -> None:
    m = path_matcher({"prefix": "/API", "case_sensitive": False})
    assert m.matches(b"/api/x") and m.matches(b"/Api")
    assert not path_matcher({"prefix": "/API"}).matches(b"/api")


def test_route_match_needs_a_path_specifier() -> None:
    with pytest.raises(ConfigError, match="needs a path specifier"):
        route_match({"headers": [{"name": "x"}]})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("runtime_fraction", {"default_value": {"numerator": 1}}),
        ("grpc", {}),
        ("tls_context", {"presented": True}),
        ("path_match_policy", {"name": "x"}),
        ("connect_matcher", {}),
    ],
)
def test_unsupported_route_match_fields_are_refused_by_name(field: str, value: Any) -> None:
    d: dict[str, Any] = {field: value}
    if field not in ("path_match_policy", "connect_matcher"):
        d["prefix"] = "/"
    with pytest.raises(ConfigError) as e:
        route_match(d)
    assert (f"match.{field}", "is not supported by meshlet") in problems(e)


# --------------------------------------------------------------------------- RouteMatch


def test_route_match_needs_path_headers_and_query_to_all_hold() -> None:
    m = route_match(
        {
            "prefix": "/reviews",
            "headers": [{"name": "end-user", "string_match": {"exact": "jason"}}],
            "query_parameters": [{"name": "v", "present_match": True}],
        }
    )
    good = head(b"/reviews/1?v=2", [(b"end-user", b"jason")])
    assert m.matches(good)
    assert not m.matches(head(b"/ratings?v=2", [(b"end-user", b"jason")]))
    assert not m.matches(head(b"/reviews/1?v=2", [(b"end-user", b"bob")]))
    assert not m.matches(head(b"/reviews/1", [(b"end-user", b"jason")]))


def test_nested_matcher_problems_carry_their_field_path() -> None:
    with pytest.raises(ConfigError) as e:
        route_match(
            {
                "prefix": "/",
                "headers": [{"name": "a"}, {"name": "b", "string_match": {"prefix": ""}}],
            }
        )
    assert problems(e) == [("match.headers[1].string_match.prefix", "must not be empty")]
