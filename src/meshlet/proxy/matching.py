"""Compiled request matchers: strings, headers, query parameters and route paths.

Each matcher is compiled once from its Envoy proto into a frozen value whose ``matches`` runs
on the hot path with bytes only: configured strings are encoded to UTF-8 and regexes compiled
when the configuration arrives, never per request.

Rules kept (Envoy's, see ``envoy/type/matcher/v3/string.proto`` and
``envoy/config/route/v3/route_components.proto``):

* ``safe_regex`` must match the *whole* value (``fullmatch``). Envoy uses RE2; meshlet uses
  Python's ``re`` on bytes, so a pattern is accepted if ``re`` compiles it (RE2 refuses
  back-references and look-arounds; ``re`` does not). ``ignore_case`` never applies to regexes.
* ``ignore_case`` is ASCII case folding, as in Envoy.
* A header matcher sees all values of a repeated header joined with ``,`` and reads the
  pseudo-headers ``:authority``, ``:path``, ``:method``, ``:scheme`` from the request line.
* An absent header fails every matcher, even an inverted one, unless
  ``treat_missing_header_as_empty`` is set; ``present_match`` is the exception: it compares
  presence with the configured value and then applies ``invert_match``.
* A query parameter matcher sees the first value of its key, undecoded.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from meshlet.errors import ConfigError
from meshlet.proxy.fields import check_fields, join
from meshlet.proxy.headers import RequestHead

# --------------------------------------------------------------------------- strings


class StringMatcher(ABC):
    """A compiled ``envoy.type.matcher.v3.StringMatcher``: ``matches(value) -> bool``."""

    __slots__ = ()

    @abstractmethod
    def matches(self, value: bytes) -> bool:
        """Whether ``value`` satisfies the matcher."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ExactMatcher(StringMatcher):
    value: bytes  # lower-cased when ignore_case
    ignore_case: bool = False

    def matches(self, value: bytes) -> bool:
        return (value.lower() if self.ignore_case else value) == self.value


@dataclass(frozen=True, slots=True, kw_only=True)
class PrefixMatcher(StringMatcher):
    prefix: bytes
    ignore_case: bool = False

    def matches(self, value: bytes) -> bool:
        if self.ignore_case:
            return value[: len(self.prefix)].lower() == self.prefix
        return value.startswith(self.prefix)


@dataclass(frozen=True, slots=True, kw_only=True)
class SuffixMatcher(StringMatcher):
    suffix: bytes
    ignore_case: bool = False

    def matches(self, value: bytes) -> bool:
        if self.ignore_case:
            n = len(self.suffix)
            return len(value) >= n and value[len(value) - n :].lower() == self.suffix
        return value.endswith(self.suffix)


@dataclass(frozen=True, slots=True, kw_only=True)
class ContainsMatcher(StringMatcher):
    substring: bytes
    ignore_case: bool = False

    def matches(self, value: bytes) -> bool:
        return self.substring in (value.lower() if self.ignore_case else value)


@dataclass(frozen=True, slots=True, kw_only=True)
class RegexMatcher(StringMatcher):
    regex: re.Pattern[bytes]

    def matches(self, value: bytes) -> bool:
        return self.regex.fullmatch(value) is not None


def compile_regex(msg: Any, path: str) -> re.Pattern[bytes]:
    """Compile an ``envoy.type.matcher.v3.RegexMatcher`` (Python ``re`` standing in for RE2)."""
    check_fields(msg, path, {"google_re2", "regex"})
    if msg.HasField("google_re2"):
        # An empty GoogleRE2 only names the engine (deprecated); its one option is refused.
        check_fields(msg.google_re2, join(path, "google_re2"), ())
    try:
        return re.compile(msg.regex.encode())
    except re.error as e:
        raise ConfigError.at(
            join(path, "regex"), f"is not a valid regular expression ({e}): {msg.regex!r}"
        ) from None


def compile_string_matcher(msg: Any, path: str) -> StringMatcher:
    """Compile an ``envoy.type.matcher.v3.StringMatcher``."""
    check_fields(msg, path, {"exact", "prefix", "suffix", "contains", "safe_regex", "ignore_case"})
    kind = msg.WhichOneof("match_pattern")
    ignore_case = bool(msg.ignore_case)
    if kind is None:
        raise ConfigError.at(path, "needs one of exact, prefix, suffix, contains or safe_regex")
    if kind == "safe_regex":
        return RegexMatcher(regex=compile_regex(msg.safe_regex, join(path, "safe_regex")))
    text: str = getattr(msg, kind)
    value = text.encode()
    if ignore_case:
        value = value.lower()
    if kind == "exact":
        return ExactMatcher(value=value, ignore_case=ignore_case)
    if not value:  # string.proto: prefix, suffix and contains have min_len 1
        raise ConfigError.at(join(path, kind), "must not be empty")
    if kind == "prefix":
        return PrefixMatcher(prefix=value, ignore_case=ignore_case)
    if kind == "suffix":
        return SuffixMatcher(suffix=value, ignore_case=ignore_case)
    return ContainsMatcher(substring=value, ignore_case=ignore_case)


# --------------------------------------------------------------------------- headers


class _AnyValue(StringMatcher):
    """The deprecated ``exact_match: ""``: any value matches (Envoy's HeaderDataExactMatch)."""

    __slots__ = ()

    def matches(self, value: bytes) -> bool:
        return True

    def __repr__(self) -> str:
        return "AnyValue()"


_INT64 = re.compile(rb"\s*[+-]?[0-9]+\s*")  # absl::SimpleAtoi: optional sign, spaces around


@dataclass(frozen=True, slots=True, kw_only=True)
class RangeMatcher(StringMatcher):
    """``range_match``: the value parses whole as a base-10 int64 in ``[start, end)``."""

    start: int
    end: int

    def matches(self, value: bytes) -> bool:
        if _INT64.fullmatch(value) is None:
            return False
        n = int(value)
        return -(2**63) <= n < 2**63 and self.start <= n < self.end


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderMatcher:
    """A compiled ``envoy.config.route.v3.HeaderMatcher``.

    ``present`` is set for ``present_match`` (and for a matcher with no specifier, which Envoy
    reads as ``present_match: true``); otherwise ``value`` judges the header's value.
    """

    name: bytes
    value: StringMatcher | None = None
    present: bool | None = None
    invert: bool = False
    missing_as_empty: bool = False
    from_request_line: bool = False  # :authority, host, :path, :method, :scheme

    def matches(self, head: RequestHead) -> bool:
        if self.from_request_line:
            actual = head.header(self.name)
        else:  # Headers.joined inlined: no list per call, 3x faster when the header is absent
            actual = None
            name = self.name
            for k, v in head.headers.items:
                if k == name:
                    actual = v if actual is None else actual + b"," + v
        if self.present is not None:  # presence ignores treat_missing_header_as_empty
            return ((actual is not None) == self.present) != self.invert
        if actual is None:
            if not self.missing_as_empty:
                return False  # even when inverted (route_components.proto, HeaderMatcher)
            actual = b""
        assert self.value is not None
        return self.value.matches(actual) != self.invert


_HEADER_FIELDS = {
    "name",
    "exact_match",
    "safe_regex_match",
    "range_match",
    "present_match",
    "prefix_match",
    "suffix_match",
    "contains_match",
    "string_match",
    "invert_match",
    "treat_missing_header_as_empty",
}


def compile_header_matcher(msg: Any, path: str) -> HeaderMatcher:
    """Compile an ``envoy.config.route.v3.HeaderMatcher``."""
    check_fields(msg, path, _HEADER_FIELDS)
    name = msg.name.lower().encode()
    if not name:
        raise ConfigError.at(join(path, "name"), "must not be empty")
    invert = bool(msg.invert_match)
    missing_as_empty = bool(msg.treat_missing_header_as_empty)
    request_line = name.startswith(b":") or name == b"host"
    kind = msg.WhichOneof("header_match_specifier")
    if kind is None or kind == "present_match":
        present = True if kind is None else bool(msg.present_match)
        return HeaderMatcher(
            name=name, present=present, invert=invert, from_request_line=request_line
        )
    value: StringMatcher
    if kind == "string_match":
        value = compile_string_matcher(msg.string_match, join(path, "string_match"))
    elif kind == "safe_regex_match":
        value = RegexMatcher(regex=compile_regex(msg.safe_regex_match, join(path, kind)))
    elif kind == "range_match":
        check_fields(msg.range_match, join(path, kind), {"start", "end"})
        value = RangeMatcher(start=msg.range_match.start, end=msg.range_match.end)
    elif kind == "exact_match":
        text = msg.exact_match.encode()
        value = ExactMatcher(value=text) if text else _AnyValue()
    else:  # deprecated prefix_match, suffix_match, contains_match
        text = getattr(msg, kind).encode()
        if not text:
            raise ConfigError.at(join(path, kind), "must not be empty")
        if kind == "prefix_match":
            value = PrefixMatcher(prefix=text)
        elif kind == "suffix_match":
            value = SuffixMatcher(suffix=text)
        else:
            value = ContainsMatcher(substring=text)
    return HeaderMatcher(
        name=name,
        value=value,
        invert=invert,
        missing_as_empty=missing_as_empty,
        from_request_line=request_line,
    )


# --------------------------------------------------------------------------- query parameters


def first_query_value(path: bytes, name: bytes) -> bytes | None:
    """The first value of query parameter ``name`` in ``path``, undecoded; None if absent.

    Envoy's ``QueryParamsMulti::parseQueryString``: split on ``&``, a piece without ``=`` is a
    key with an empty value.
    """
    q = path.find(b"?")
    if q < 0:
        return None
    query = path[q + 1 :]
    f = query.find(b"#")
    if f >= 0:
        query = query[:f]
    for piece in query.split(b"&"):
        key, _, value = piece.partition(b"=")
        if key == name:
            return value  # b"" when the piece has no "="
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class QueryParameterMatcher:
    """A compiled ``envoy.config.route.v3.QueryParameterMatcher``.

    ``present`` set: the key's presence must equal it (Envoy >= 1.34 semantics, runtime guard
    ``enable_new_query_param_present_match_behavior``). Otherwise the key must exist and, when
    ``value`` is set, its first value must match.
    """

    name: bytes
    value: StringMatcher | None = None
    present: bool | None = None

    def matches(self, path: bytes) -> bool:
        actual = first_query_value(path, self.name)
        if self.present is not None:
            return (actual is not None) == self.present
        if actual is None:
            return False
        return self.value is None or self.value.matches(actual)


def compile_query_parameter_matcher(msg: Any, path: str) -> QueryParameterMatcher:
    check_fields(msg, path, {"name", "string_match", "present_match"})
    name = msg.name.encode()
    if not name:
        raise ConfigError.at(join(path, "name"), "must not be empty")
    kind = msg.WhichOneof("query_parameter_match_specifier")
    if kind == "present_match":
        return QueryParameterMatcher(name=name, present=bool(msg.present_match))
    if kind == "string_match":
        value = compile_string_matcher(msg.string_match, join(path, "string_match"))
        return QueryParameterMatcher(name=name, value=value)
    return QueryParameterMatcher(name=name)  # no specifier: the key must be present


# --------------------------------------------------------------------------- paths


class PathMatcher(ABC):
    """A route's path specifier, judged against the full ``:path`` (query included).

    ``rewrite_length`` is how much of the path ``prefix_rewrite`` replaces: the configured
    value's length, or None for a regex, whose rewrite replaces the whole query-less path.
    """

    __slots__ = ()

    @abstractmethod
    def matches(self, path: bytes) -> bool: ...

    @property
    @abstractmethod
    def rewrite_length(self) -> int | None: ...


# ``prefix``, ``path`` and ``path_separated_prefix`` are defined on the query-less path; they
# compare against the full path here to save slicing it: for a value without ``?`` or ``#``
# (validated, or irrelevant for ``prefix``) the answers are the same.


@dataclass(frozen=True, slots=True, kw_only=True)
class PrefixPath(PathMatcher):
    prefix: bytes  # lower-cased unless case_sensitive
    case_sensitive: bool = True

    def matches(self, path: bytes) -> bool:
        if self.case_sensitive:
            return path.startswith(self.prefix)
        return path[: len(self.prefix)].lower() == self.prefix

    @property
    def rewrite_length(self) -> int | None:
        return len(self.prefix)


@dataclass(frozen=True, slots=True, kw_only=True)
class ExactPath(PathMatcher):
    path: bytes
    case_sensitive: bool = True

    def matches(self, path: bytes) -> bool:
        n = len(self.path)
        head = path[:n] if self.case_sensitive else path[:n].lower()
        return head == self.path and (len(path) == n or path[n] in b"?#")

    @property
    def rewrite_length(self) -> int | None:
        return len(self.path)


@dataclass(frozen=True, slots=True, kw_only=True)
class SeparatedPrefixPath(PathMatcher):
    """``path_separated_prefix``: the value, then the end of the path or a ``/``."""

    prefix: bytes
    case_sensitive: bool = True

    def matches(self, path: bytes) -> bool:
        n = len(self.prefix)
        head = path[:n] if self.case_sensitive else path[:n].lower()
        return head == self.prefix and (len(path) == n or path[n] in b"/?#")

    @property
    def rewrite_length(self) -> int | None:
        return len(self.prefix)


@dataclass(frozen=True, slots=True, kw_only=True)
class RegexPath(PathMatcher):
    """``safe_regex``: full match on the query-less path; ``case_sensitive`` does not apply."""

    regex: re.Pattern[bytes]

    def matches(self, path: bytes) -> bool:
        return self.regex.fullmatch(query_less(path)) is not None

    @property
    def rewrite_length(self) -> int | None:
        return None


def query_less(path: bytes) -> bytes:
    """``path`` without its query string and fragment."""
    q = path.find(b"?")
    if q >= 0:
        path = path[:q]
    f = path.find(b"#")
    return path if f < 0 else path[:f]


def compile_path_matcher(msg: Any, path: str) -> PathMatcher:
    """Compile the path specifier of an ``envoy.config.route.v3.RouteMatch`` (``msg``)."""
    kind = msg.WhichOneof("path_specifier")
    case_sensitive = msg.case_sensitive.value if msg.HasField("case_sensitive") else True
    if kind is None:
        raise ConfigError.at(
            path, "needs a path specifier: prefix, path, safe_regex or path_separated_prefix"
        )
    if kind == "safe_regex":
        return RegexPath(regex=compile_regex(msg.safe_regex, join(path, "safe_regex")))
    if kind not in ("prefix", "path", "path_separated_prefix"):
        raise ConfigError.at(join(path, kind), "is not supported by meshlet")
    value: bytes = getattr(msg, kind).encode()
    if not case_sensitive:
        value = value.lower()
    if kind == "prefix":
        return PrefixPath(prefix=value, case_sensitive=case_sensitive)
    if kind == "path":
        if b"?" in value or b"#" in value:  # Envoy compares it with the query-less path
            raise ConfigError.at(join(path, kind), "can never match: it contains '?' or '#'")
        return ExactPath(path=value, case_sensitive=case_sensitive)
    # route_components.proto: path_separated_prefix must not contain ? or # nor end with /.
    if not value or b"?" in value or b"#" in value or value.endswith(b"/"):
        raise ConfigError.at(
            join(path, kind), "must be non-empty, contain no '?' or '#', and not end with '/'"
        )
    return SeparatedPrefixPath(prefix=value, case_sensitive=case_sensitive)


# --------------------------------------------------------------------------- route match


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteMatch:
    """A compiled ``envoy.config.route.v3.RouteMatch``: every condition must hold.

    The path is checked first: it is the cheapest test and the one that most often fails.
    """

    path: PathMatcher
    headers: tuple[HeaderMatcher, ...] = ()
    query_parameters: tuple[QueryParameterMatcher, ...] = ()

    def matches(self, head: RequestHead) -> bool:
        if not self.path.matches(head.path):
            return False
        for h in self.headers:
            if not h.matches(head):
                return False
        for q in self.query_parameters:  # noqa: SIM110 -- a loop is faster than all(genexpr)
            if not q.matches(head.path):
                return False
        return True


_ROUTE_MATCH_FIELDS = {
    "prefix",
    "path",
    "safe_regex",
    "path_separated_prefix",
    "case_sensitive",
    "headers",
    "query_parameters",
}


def compile_route_match(msg: Any, path: str) -> RouteMatch:
    """Compile an ``envoy.config.route.v3.RouteMatch``."""
    check_fields(msg, path, _ROUTE_MATCH_FIELDS)
    return RouteMatch(
        path=compile_path_matcher(msg, path),
        headers=tuple(
            compile_header_matcher(h, f"{path}.headers[{i}]") for i, h in enumerate(msg.headers)
        ),
        query_parameters=tuple(
            compile_query_parameter_matcher(q, f"{path}.query_parameters[{i}]")
            for i, q in enumerate(msg.query_parameters)
        ),
    )
