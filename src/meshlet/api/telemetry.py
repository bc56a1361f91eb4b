"""telemetry.istio.io: Telemetry (apiVersions v1 and v1alpha1, one schema).

Which workloads trace, log and count, with what sampling, custom tags, access log filter and
metric overrides (``control.translate.telemetry`` turns it into proxy configuration).

Istio evaluates two kinds of CEL expressions here; meshlet's proxy evaluates none, so the
subsets it can honour are checked when a Telemetry is loaded, and anything else is refused
with the field's path (nothing of the resource is applied):

* ``accessLogging[].filter.expression`` -- comparisons joined by ``&&``, ``||`` and
  parentheses, each one that Envoy's ``AccessLogFilter`` can express (``parse_log_filter``):
  ``response.code <op> <int>`` (status_code_filter), ``response.duration <op>
  duration('1s')`` (duration_filter), ``response.flags != 0`` (response_flag_filter, any
  flag), ``request.headers['name'] == 'value'`` or ``!=`` (header_filter).
* ``metrics[].overrides[].tagOverrides.<tag>.value`` -- one attribute or a string literal
  (``check_attribute``): ``request.host``, ``request.method``, ``request.path``,
  ``request.url_path``, ``request.scheme``, ``request.protocol``, ``request.useragent``,
  ``request.headers['name']``, ``response.code``, ``response.grpc_status``,
  ``source.principal``, ``destination.port``, ``'text'``.

Custom metrics (``customMetric``) and ``formatter`` custom tags are refused: meshlet's proxy
has neither.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator, Field, model_validator

from meshlet.api.schema import Bool, Issues, IstioModel, MinDuration, PercentFloat, Resource
from meshlet.api.selectors import PolicySelector, PolicyTargetReference, check_one_target


class WorkloadMode(StrEnum):
    CLIENT_AND_SERVER = "CLIENT_AND_SERVER"
    CLIENT = "CLIENT"
    SERVER = "SERVER"


class IstioMetric(StrEnum):
    ALL_METRICS = "ALL_METRICS"
    REQUEST_COUNT = "REQUEST_COUNT"
    REQUEST_DURATION = "REQUEST_DURATION"
    REQUEST_SIZE = "REQUEST_SIZE"
    RESPONSE_SIZE = "RESPONSE_SIZE"
    TCP_OPENED_CONNECTIONS = "TCP_OPENED_CONNECTIONS"
    TCP_CLOSED_CONNECTIONS = "TCP_CLOSED_CONNECTIONS"
    TCP_SENT_BYTES = "TCP_SENT_BYTES"
    TCP_RECEIVED_BYTES = "TCP_RECEIVED_BYTES"
    GRPC_REQUEST_MESSAGES = "GRPC_REQUEST_MESSAGES"
    GRPC_RESPONSE_MESSAGES = "GRPC_RESPONSE_MESSAGES"


class TagOperation(StrEnum):
    UPSERT = "UPSERT"
    REMOVE = "REMOVE"


NonEmpty = Annotated[str, Field(min_length=1)]


class ProviderRef(IstioModel):
    name: NonEmpty


class WorkloadSelection(IstioModel):
    """``match: {mode: ...}`` of tracing and access logging."""

    mode: WorkloadMode = WorkloadMode.CLIENT_AND_SERVER


class LiteralTag(IstioModel):
    value: NonEmpty


class EnvironmentTag(IstioModel):
    name: NonEmpty
    default_value: str = ""


class HeaderTag(IstioModel):
    name: NonEmpty
    default_value: str = ""


class FormatterTag(IstioModel):
    value: NonEmpty


class CustomTag(IstioModel):
    literal: LiteralTag | None = None
    environment: EnvironmentTag | None = None
    header: HeaderTag | None = None
    formatter: FormatterTag | None = None

    @model_validator(mode="after")
    def _check(self) -> CustomTag:
        issues = Issues()
        names = ("literal", "environment", "header", "formatter")
        issues.at_most_one(self, names)
        if all(getattr(self, n) is None for n in names):
            issues.add((), "one of literal, environment or header must be set")
        if self.formatter is not None:
            issues.add(
                ("formatter",),
                "formatter tags are not supported by meshlet: use literal, environment or header",
            )
        issues.raise_if_any("CustomTag")
        return self


class Tracing(IstioModel):
    match: WorkloadSelection | None = None
    providers: tuple[ProviderRef, ...] = ()
    random_sampling_percentage: PercentFloat | None = None
    disable_span_reporting: Bool | None = None
    custom_tags: dict[str, CustomTag] = {}
    use_request_id_for_trace_sampling: Bool | None = None
    enable_istio_tags: Bool | None = None


class MetricSelector(IstioModel):
    metric: IstioMetric | None = None
    custom_metric: NonEmpty | None = None
    mode: WorkloadMode = WorkloadMode.CLIENT_AND_SERVER

    @model_validator(mode="after")
    def _check(self) -> MetricSelector:
        issues = Issues()
        issues.at_most_one(self, ("metric", "custom_metric"))
        if self.custom_metric is not None:
            issues.add(
                ("customMetric",),
                "custom metrics are not supported by meshlet: use metric (REQUEST_COUNT, "
                "REQUEST_DURATION, REQUEST_SIZE, RESPONSE_SIZE or ALL_METRICS)",
            )
        issues.raise_if_any("MetricSelector")
        return self


class TagOverride(IstioModel):
    operation: TagOperation = TagOperation.UPSERT
    value: str = ""

    @model_validator(mode="after")
    def _check(self) -> TagOverride:
        if self.operation is TagOperation.REMOVE and self.value:
            raise ValueError("value must not be set when operation is REMOVE")
        if self.operation is TagOperation.UPSERT and not self.value:
            raise ValueError("value must be set when operation is UPSERT")
        if self.operation is TagOperation.UPSERT:
            issues = Issues()
            try:
                check_attribute(self.value)
            except ValueError as e:
                issues.add(("value",), str(e))
            issues.raise_if_any("TagOverride")
        return self


class MetricsOverrides(IstioModel):
    match: MetricSelector | None = None
    disabled: Bool | None = None
    tag_overrides: dict[str, TagOverride] = {}


class Metrics(IstioModel):
    providers: tuple[ProviderRef, ...] = ()
    overrides: tuple[MetricsOverrides, ...] = ()
    reporting_interval: MinDuration | None = None


#: Whether meshlet's proxy accepts Envoy's ``header_filter`` in access logs (it does); header
#: comparisons would otherwise be refused when a Telemetry is loaded, so that no proxy is sent
#: a filter it would NACK.
HEADER_FILTER_SUPPORTED = True


def _check_log_filter(expression: str) -> str:
    if expression.strip():
        condition = parse_log_filter(expression)
        if not HEADER_FILTER_SUPPORTED and _has_header(condition):
            raise ValueError(
                "request.headers comparisons are not supported by meshlet's proxy yet "
                "(no access log header_filter); use response.code, response.duration or "
                "response.flags"
            )
    return expression


def _has_header(condition: LogCondition) -> bool:
    if isinstance(condition, HeaderCondition):
        return True
    if isinstance(condition, AllOf | AnyOf):
        return any(_has_header(c) for c in condition.conditions)
    return False


class AccessLogFilter(IstioModel):
    #: CEL, in the subset ``parse_log_filter`` reads; empty: every request is logged.
    expression: Annotated[str, AfterValidator(_check_log_filter)] = ""


class AccessLogging(IstioModel):
    match: WorkloadSelection | None = None
    providers: tuple[ProviderRef, ...] = ()
    disabled: Bool | None = None
    filter: AccessLogFilter | None = None


class TelemetrySpec(IstioModel):
    selector: PolicySelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: Annotated[tuple[PolicyTargetReference, ...], Field(max_length=16)] = ()
    tracing: tuple[Tracing, ...] = ()
    metrics: tuple[Metrics, ...] = ()
    access_logging: tuple[AccessLogging, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> TelemetrySpec:
        issues = Issues()
        check_one_target(issues, self.selector, self.target_ref, self.target_refs)
        issues.raise_if_any("TelemetrySpec")
        return self


class Telemetry(Resource):
    spec: TelemetrySpec = TelemetrySpec()


# -- the CEL subsets -------------------------------------------------------------------------
# Istio's attribute vocabulary: https://istio.io/latest/docs/reference/config/security/conditions/
# and the Telemetry API's access log filter (https://istio.io/latest/docs/reference/config/
# telemetry/#AccessLogging-Filter). Envoy's AccessLogFilter has EQ, NE, GE and LE, so ``>`` and
# ``<`` on integers become GE n+1 and LE n-1.


@dataclass(frozen=True, slots=True)
class StatusCodeCondition:
    """``response.code <op> value`` (Envoy's ``status_code_filter``)."""

    op: str  # "EQ", "NE", "GE" or "LE"
    value: int


@dataclass(frozen=True, slots=True)
class DurationCondition:
    """``response.duration <op> duration('...')``, in milliseconds (``duration_filter``)."""

    op: str
    millis: int


@dataclass(frozen=True, slots=True)
class ResponseFlagCondition:
    """``response.flags != 0``: the response carries any Envoy response flag."""


@dataclass(frozen=True, slots=True)
class HeaderCondition:
    """``request.headers['name'] == 'value'`` (``!=``: ``invert``) (``header_filter``)."""

    name: str
    value: str
    invert: bool = False


@dataclass(frozen=True, slots=True)
class AllOf:
    conditions: tuple[LogCondition, ...]


@dataclass(frozen=True, slots=True)
class AnyOf:
    conditions: tuple[LogCondition, ...]


LogCondition = (
    StatusCodeCondition
    | DurationCondition
    | ResponseFlagCondition
    | HeaderCondition
    | AllOf
    | AnyOf
)

#: The single attributes a tag override may name (the proxy's ``istio.stats`` evaluates them).
TAG_ATTRIBUTES = frozenset(
    {
        "request.host",
        "request.method",
        "request.path",
        "request.url_path",
        "request.scheme",
        "request.protocol",
        "request.useragent",
        "response.code",
        "response.grpc_status",
        "source.principal",
        "destination.port",
    }
)

_LOG_FILTER_HELP = (
    "meshlet supports comparisons joined by &&, || and parentheses: response.code <op> <int>, "
    "response.duration <op> duration('1s'), response.flags != 0, "
    "request.headers['name'] == 'value' (or !=)"
)
_TAG_HELP = "meshlet supports a quoted string, request.headers['name'] or one of " + ", ".join(
    sorted(TAG_ATTRIBUTES)
)

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
    | (?P<num>[0-9]+)
    | (?P<op>==|!=|>=|<=|&&|\|\||[<>()\[\]])
    | (?P<ident>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
    )""",
    re.VERBOSE,
)
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)$")
_UNITS_MS = {"ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_MIRRORED = {"==": "==", "!=": "!=", ">=": "<=", "<=": ">=", ">": "<", "<": ">"}


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "str", "num", "op", "ident", "end"
    text: str
    pos: int


def _tokens(text: str) -> list[_Token]:
    out: list[_Token] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            where = len(text) - len(text[pos:].lstrip())
            raise ValueError(f"unexpected {text[where]!r} at column {where + 1}")
        kind = m.lastgroup or ""
        out.append(_Token(kind, m.group(kind), m.start(kind)))
        pos = m.end()
    out.append(_Token("end", "", len(text)))
    return out


def _unquote(literal: str) -> str:
    return re.sub(r"\\(.)", r"\1", literal[1:-1])


@dataclass(frozen=True, slots=True)
class _Operand:
    kind: str  # "attr", "header", "str", "int", "duration"
    value: str | int


class _Parser:
    """Recursive descent over the subset: ``||`` binds looser than ``&&``, as in CEL."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokens(text)
        self.i = 0

    def peek(self) -> _Token:
        return self.tokens[self.i]

    def take(self) -> _Token:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def expect(self, text: str) -> None:
        token = self.take()
        if token.text != text or token.kind != "op":
            raise ValueError(f"expected {text!r} at column {token.pos + 1}")

    def end(self) -> None:
        token = self.peek()
        if token.kind != "end":
            raise ValueError(f"unexpected {token.text!r} at column {token.pos + 1}")

    def log_filter(self) -> LogCondition:
        found = [self.all_of()]
        while self.peek().text == "||":
            self.take()
            found.append(self.all_of())
        return found[0] if len(found) == 1 else AnyOf(tuple(found))

    def all_of(self) -> LogCondition:
        found = [self.primary()]
        while self.peek().text == "&&":
            self.take()
            found.append(self.primary())
        return found[0] if len(found) == 1 else AllOf(tuple(found))

    def primary(self) -> LogCondition:
        if self.peek().text == "(" and self.peek().kind == "op":
            self.take()
            inner = self.log_filter()
            self.expect(")")
            return inner
        start = self.peek().pos
        left = self.operand()
        op = self.take()
        if op.text not in _MIRRORED or op.kind != "op":
            raise ValueError(f"expected a comparison (==, !=, >=, <=, >, <) at column {op.pos + 1}")
        right = self.operand()
        if left.kind not in ("attr", "header") and right.kind in ("attr", "header"):
            left, right, cmp = right, left, _MIRRORED[op.text]
        else:
            cmp = op.text
        written = self.text[start : self.peek().pos].strip()
        return _condition(left, cmp, right, written)

    def operand(self) -> _Operand:
        token = self.take()
        if token.kind == "str":
            return _Operand("str", _unquote(token.text))
        if token.kind == "num":
            return _Operand("int", int(token.text))
        if token.kind == "ident":
            if token.text == "duration" and self.peek().text == "(":
                self.take()
                literal = self.take()
                if literal.kind != "str":
                    raise ValueError(
                        f"duration() needs a quoted duration at column {literal.pos + 1}"
                    )
                self.expect(")")
                return _Operand("duration", _millis(_unquote(literal.text)))
            if self.peek().text == "[":
                if token.text != "request.headers":
                    raise ValueError(f"{token.text}[...] is not supported; {_LOG_FILTER_HELP}")
                self.take()
                key = self.take()
                if key.kind != "str":
                    raise ValueError(
                        f"request.headers[...] needs a quoted name at column {key.pos + 1}"
                    )
                self.expect("]")
                name = _unquote(key.text)
                if not _HEADER_NAME.match(name):
                    raise ValueError(f"{name!r} is not a header name")
                return _Operand("header", name.lower())
            return _Operand("attr", token.text)
        where = "the end" if token.kind == "end" else f"column {token.pos + 1}"
        raise ValueError(f"expected a value at {where}")


def _millis(text: str) -> int:
    m = _DURATION.match(text)
    if m is None:
        raise ValueError(f"duration {text!r} is not like '1s', '250ms', '1.5s', '2m' or '1h'")
    return round(float(m.group(1)) * _UNITS_MS[m.group(2)])


_OPS = {"==": "EQ", "!=": "NE", ">=": "GE", "<=": "LE"}


def _bound(op: str, value: int) -> tuple[str, int]:
    """An integer comparison in Envoy's four operators."""
    if op == ">":
        return "GE", value + 1
    if op == "<":
        return "LE", value - 1
    return _OPS[op], value


def _condition(left: _Operand, op: str, right: _Operand, written: str) -> LogCondition:
    if left.kind == "attr" and left.value == "response.code" and right.kind == "int":
        return StatusCodeCondition(*_bound(op, int(right.value)))
    if left.kind == "attr" and left.value == "response.duration" and right.kind == "duration":
        return DurationCondition(*_bound(op, int(right.value)))
    zero = right == _Operand("int", 0)
    if left.kind == "attr" and left.value == "response.flags" and zero and op in ("!=", ">"):
        return ResponseFlagCondition()
    if left.kind == "header" and right.kind == "str" and op in ("==", "!="):
        return HeaderCondition(str(left.value), str(right.value), invert=op == "!=")
    raise ValueError(f"{written!r} is not supported; {_LOG_FILTER_HELP}")


def parse_log_filter(expression: str) -> LogCondition:
    """An access log filter expression as conditions; ValueError naming what is not in the
    subset (see the module's docstring)."""
    if not expression.strip():
        raise ValueError(f"the expression is empty; {_LOG_FILTER_HELP}")
    try:
        parser = _Parser(expression)
        condition = parser.log_filter()
        parser.end()
    except ValueError as e:
        message = str(e)
        if _LOG_FILTER_HELP not in message:
            message = f"{message}; {_LOG_FILTER_HELP}"
        raise ValueError(message) from None
    return condition


def check_attribute(expression: str) -> str:
    """A tag override value: one attribute of ``TAG_ATTRIBUTES``, ``request.headers['x']`` or
    a quoted string; ValueError otherwise."""
    try:
        parser = _Parser(expression)
        operand = parser.operand()
        parser.end()
    except ValueError:
        raise ValueError(f"{expression!r} is not supported; {_TAG_HELP}") from None
    if operand.kind in ("str", "header"):
        return expression
    if operand.kind == "attr" and operand.value in TAG_ATTRIBUTES:
        return expression
    raise ValueError(f"{expression!r} is not supported; {_TAG_HELP}")
