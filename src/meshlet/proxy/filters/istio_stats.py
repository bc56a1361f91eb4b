"""Istio's stats filter configuration (``istio.stats``, ``stats.PluginConfig``), compiled.

Istio's Telemetry API ends up as this filter on every HCM (istio/proxy
``source/extensions/filters/http/istio_stats``): per standard metric, drop it, remove labels
(``tags_to_remove``) or upsert labels whose values are CEL expressions (``dimensions``). An
entry with an empty ``name`` applies to every metric; entries apply in order, each one
upserting its dimensions and then removing its tags.

meshlet evaluates a subset of Istio's attributes (anything else is refused, naming the field):
a quoted string literal, ``request.host``, ``request.method``, ``request.path``,
``request.url_path``, ``request.scheme``, ``request.protocol``, ``request.useragent``,
``request.headers['name']``, ``response.code``, ``response.grpc_status``,
``source.principal``, ``destination.port``. A value that is absent is ``unknown``, as Istio
reports it.

``disable_host_header_fallback`` is accepted and changes nothing: meshlet never takes
``destination_service`` from the Host header (clients must not mint series).

Hot path: a filter without expressions costs nothing per request; with expressions, each
distinct expression is evaluated once per request and its values join the series key. The
labels of a series are worked out once, when the series is first seen (``labels``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from google.protobuf import json_format, struct_pb2

from meshlet.errors import ConfigError, ProblemList

if TYPE_CHECKING:
    from meshlet.proxy.stream_info import StreamInfo

#: The typed_config (inside a TypedStruct) of Istio's ``istio.stats`` HTTP filter.
STATS_CONFIG_TYPE: Final = "type.googleapis.com/stats.PluginConfig"

#: Istio's standard HTTP metrics by their PluginConfig names, in ``IstioMetrics`` order.
METRICS: Final = (
    "requests_total",
    "request_duration_milliseconds",
    "request_bytes",
    "response_bytes",
)
UNKNOWN: Final = "unknown"
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_LITERAL = re.compile(r"""^(?:'([^'\\]*)'|"([^"\\]*)")$""")
_HEADER = re.compile(r"""^request\.headers\[(?:'([^'\\]+)'|"([^"\\]+)")\]$""")
_SUPPORTED = (
    "a quoted string, request.host, request.method, request.path, request.url_path, "
    "request.scheme, request.protocol, request.useragent, request.headers['name'], "
    "response.code, response.grpc_status, source.principal, destination.port"
)

Expression = Callable[["StreamInfo"], str]


def _text(value: bytes | None) -> str:
    return value.decode("latin-1") if value else UNKNOWN


def _request_attr(get: Callable[[Any], bytes | None]) -> Expression:
    def evaluate(info: StreamInfo) -> str:
        head = info.request
        return UNKNOWN if head is None else _text(get(head))

    return evaluate


def _header(name: bytes) -> Expression:
    def evaluate(info: StreamInfo) -> str:
        head = info.request
        return UNKNOWN if head is None else _text(head.header(name))

    return evaluate


def _response_code(info: StreamInfo) -> str:
    return str(info.response_code)


def grpc_status(info: StreamInfo) -> str:
    """The response's ``grpc-status`` (a trailers-only gRPC response carries it in the head);
    empty when there is none."""
    headers = info.response_headers
    value = headers.get(b"grpc-status") if headers is not None else None
    return value.decode("latin-1") if value else ""


def _grpc_status_attr(info: StreamInfo) -> str:
    return grpc_status(info) or UNKNOWN


def _source_principal(info: StreamInfo) -> str:
    tls = info.downstream_tls
    return (tls.peer_principal or UNKNOWN) if tls is not None else UNKNOWN


def _destination_port(info: StreamInfo) -> str:
    address = info.upstream_host or info.downstream_local
    port = address.rpartition(":")[2]
    return port if port.isdigit() else UNKNOWN


_ATTRIBUTES: Final[dict[str, Expression]] = {
    "request.host": _request_attr(lambda h: h.authority),
    "request.method": _request_attr(lambda h: h.method),
    "request.path": _request_attr(lambda h: h.path),
    "request.url_path": _request_attr(lambda h: h.path_only),
    "request.scheme": _request_attr(lambda h: h.scheme),
    "request.protocol": _request_attr(lambda h: b"HTTP/" + h.version),
    "request.useragent": _header(b"user-agent"),
    "response.code": _response_code,
    "response.grpc_status": _grpc_status_attr,
    "source.principal": _source_principal,
    "destination.port": _destination_port,
}


def compile_expression(text: str, path: str) -> str | Expression:
    """A literal (its string) or an attribute (a function of the stream); ``ConfigError``
    naming ``path`` for anything else."""
    text = text.strip()
    m = _LITERAL.match(text)
    if m:
        return m.group(1) if m.group(1) is not None else m.group(2)
    m = _HEADER.match(text)
    if m:
        return _header((m.group(1) or m.group(2)).lower().encode("latin-1"))
    found = _ATTRIBUTES.get(text)
    if found is None:
        raise ConfigError.at(
            path, f"expression {text!r} is not supported (supported: {_SUPPORTED})"
        )
    return found


@dataclass(frozen=True, slots=True)
class _Upsert:
    label: str
    literal: str | None  # the value, or None: the value of expressions[index]
    index: int


@dataclass(frozen=True, slots=True)
class _MetricPlan:
    """What the entries do to one metric, in order: (upserts, removals) per entry."""

    drop: bool
    steps: tuple[tuple[tuple[_Upsert, ...], tuple[str, ...]], ...]


@dataclass(frozen=True, slots=True, eq=False)
class StatsConfig:
    """A compiled ``stats.PluginConfig``. ``fingerprint`` identifies its content (series
    key part: configuration pushes that change nothing keep their series)."""

    fingerprint: str
    expressions: tuple[Expression, ...]  # distinct non-literal expressions, evaluated per request
    plans: tuple[_MetricPlan, ...]  # one per entry of METRICS
    disable_host_header_fallback: bool = False

    @property
    def changes_nothing(self) -> bool:
        """Istio's defaults: no metric dropped, no label changed (what istiod emits without
        a Telemetry)."""
        return all(not p.drop and not p.steps for p in self.plans)

    def __repr__(self) -> str:
        dropped = [m for m, p in zip(METRICS, self.plans, strict=True) if p.drop]
        return f"<StatsConfig expressions={len(self.expressions)} dropped={dropped}>"

    def evaluate(self, info: StreamInfo) -> tuple[str, ...]:
        """The values of the expressions for one request (part of its series key)."""
        return tuple(e(info) for e in self.expressions)

    def labels(
        self, metric: int, names: tuple[str, ...], values: tuple[str, ...], dims: tuple[str, ...]
    ) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
        """The label names and values of metric ``metric`` (index into METRICS) from the
        standard ones, ``dims`` being ``evaluate``'s result; None when the metric is dropped."""
        plan = self.plans[metric]
        if plan.drop:
            return None
        if not plan.steps:
            return names, values
        labels = dict(zip(names, values, strict=True))
        for upserts, removals in plan.steps:
            for u in upserts:
                labels[u.label] = u.literal if u.literal is not None else dims[u.index]
            for name in removals:
                labels.pop(name, None)
        return tuple(labels), tuple(labels.values())


def _kind(value: struct_pb2.Value) -> str:
    return str(value.WhichOneof("kind"))


def compile_stats(value: struct_pb2.Struct, path: str) -> StatsConfig | None:
    """Compile the ``value`` Struct of an ``istio.stats`` TypedStruct; ``ConfigError`` naming
    every field it cannot honour. None: it changes nothing (Istio's defaults)."""
    problems = ProblemList()
    fields = value.fields
    for key in fields:
        if key not in ("metrics", "disable_host_header_fallback"):
            problems.add(f"{path}.{key}", "is not supported by meshlet")
    disable = False
    if "disable_host_header_fallback" in fields:
        v = fields["disable_host_header_fallback"]
        if _kind(v) != "bool_value":
            problems.add(f"{path}.disable_host_header_fallback", "must be a bool")
        disable = v.bool_value
    expressions: list[Expression] = []
    expression_index: dict[str, int] = {}
    steps: list[list[tuple[tuple[_Upsert, ...], tuple[str, ...]]]] = [[] for _ in METRICS]
    drops = [False] * len(METRICS)
    entries: list[struct_pb2.Value] = []
    if "metrics" in fields:
        if _kind(fields["metrics"]) != "list_value":
            problems.add(f"{path}.metrics", "must be a list")
        else:
            entries = list(fields["metrics"].list_value.values)
    for i, entry in enumerate(entries):
        epath = f"{path}.metrics[{i}]"
        if _kind(entry) != "struct_value":
            problems.add(epath, "must be an object")
            continue
        ef = entry.struct_value.fields
        for key in ef:
            if key not in ("name", "dimensions", "tags_to_remove", "drop"):
                problems.add(f"{epath}.{key}", "is not supported by meshlet")
        name = ef["name"].string_value if "name" in ef else ""
        if "name" in ef and _kind(ef["name"]) != "string_value":
            problems.add(f"{epath}.name", "must be a string")
        if name and name not in METRICS:
            problems.add(
                f"{epath}.name",
                f"{name!r} is not a metric meshlet produces (supported: {', '.join(METRICS)}, "
                "or empty for all)",
            )
            continue
        targets = range(len(METRICS)) if not name else (METRICS.index(name),)
        upserts: list[_Upsert] = []
        if "dimensions" in ef:
            dims = ef["dimensions"]
            if _kind(dims) != "struct_value":
                problems.add(f"{epath}.dimensions", "must be an object")
            else:
                for label, expr in dims.struct_value.fields.items():
                    dpath = f"{epath}.dimensions.{label}"
                    if not _LABEL.match(label):
                        problems.add(dpath, "is not a valid Prometheus label name")
                        continue
                    if _kind(expr) != "string_value":
                        problems.add(dpath, "must be a string (an expression)")
                        continue
                    try:
                        compiled = compile_expression(expr.string_value, dpath)
                    except ConfigError as e:
                        problems.extend(e)
                        continue
                    if isinstance(compiled, str):
                        upserts.append(_Upsert(label, compiled, -1))
                        continue
                    text = expr.string_value.strip()
                    if text not in expression_index:
                        expression_index[text] = len(expressions)
                        expressions.append(compiled)
                    upserts.append(_Upsert(label, None, expression_index[text]))
        removals: list[str] = []
        if "tags_to_remove" in ef:
            tags = ef["tags_to_remove"]
            if _kind(tags) != "list_value":
                problems.add(f"{epath}.tags_to_remove", "must be a list")
            else:
                for j, tag in enumerate(tags.list_value.values):
                    if _kind(tag) != "string_value":
                        problems.add(f"{epath}.tags_to_remove[{j}]", "must be a string")
                    else:
                        removals.append(tag.string_value)
        drop = False
        if "drop" in ef:
            if _kind(ef["drop"]) != "bool_value":
                problems.add(f"{epath}.drop", "must be a bool")
            drop = ef["drop"].bool_value
        for t in targets:
            drops[t] = drops[t] or drop
            if upserts or removals:
                steps[t].append((tuple(upserts), tuple(removals)))
    problems.raise_if_any()
    fingerprint = json.dumps(json_format.MessageToDict(value), sort_keys=True)
    config = StatsConfig(
        fingerprint=fingerprint,
        expressions=tuple(expressions),
        plans=tuple(_MetricPlan(d, tuple(s)) for d, s in zip(drops, steps, strict=True)),
        disable_host_header_fallback=disable,
    )
    # Without changes the metrics take the default path (the series key has no config part).
    return None if config.changes_nothing else config
