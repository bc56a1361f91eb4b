"""Tracing: the HCM's ``tracing`` block compiled, trace context in and out, one span a request.

Theory of operation. ``compile_tracing`` turns ``HttpConnectionManager.Tracing`` with the
``envoy.tracers.opentelemetry`` provider into a frozen ``TracingConfig`` (anything else is
refused by field path; ``tracing`` without a provider is Envoy's null tracer: nothing at all).
For each request of a traced HCM the connection manager asks the worker's ``Tracer`` for a
``Span`` once the request head is complete; the router calls ``Span.inject`` on the request it
forwards; when the stream ends, ``Tracer.finish`` hands a sampled span and its ``StreamInfo`` to
the exporter of its endpoint (``otlp_export``), which builds the OTLP protobuf in batches, off
the request path. A request costs: one scan of its headers for trace headers, one or two
``getrandbits`` calls, a few header appends and, when sampled, a deque append.

Rules kept (W3C Trace Context; B3 propagation; Envoy's HCM tracing and OpenTelemetry tracer):

* the parent comes from ``traceparent``; a malformed one is ignored, and then B3 is read
  (``x-b3-traceid``/``x-b3-spanid``/``x-b3-sampled``/``x-b3-flags``, or the single ``b3``);
  a 64-bit B3 trace id is left-padded to 128 bits;
* a sampling decision from upstream (``traceparent`` flags, ``x-b3-sampled``, B3 debug) is
  honoured both ways; without one, ``x-client-trace-id`` samples at ``client_sampling``,
  anything else at ``random_sampling`` (Envoy's default 100 %), then ``overall_sampling``
  caps the result (``ConnectionManagerUtility::mutateTracingRequestHeader``);
* the forwarded request carries ``traceparent: 00-<trace>-<this span>-<01|00>`` (``tracestate``
  passes through untouched) and B3 ``x-b3-traceid``, ``x-b3-spanid`` (this span),
  ``x-b3-parentspanid`` (when there is a parent) and ``x-b3-sampled`` -- unsampled requests
  too, so that the decision travels; incoming trace headers are replaced, never duplicated;
* span kind: SERVER on inbound and gateway listeners, CLIENT on outbound ones (Istio's sidecar
  makes one span per proxy and request); name ``<authority><path without query>``; 5xx sets
  ``error=true`` and status ERROR.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, NamedTuple
from urllib.parse import urlsplit

from meshlet.errors import ConfigError, ProblemList
from meshlet.proxy.fields import check_fields, duration_field, join, uint_field
from meshlet.proxy.headers import Headers, RequestHead

if TYPE_CHECKING:
    import random

    from envoy.config.core.v3.base_pb2 import Node
    from envoy.extensions.filters.network.http_connection_manager.v3 import (
        http_connection_manager_pb2 as hcm_pb2,
    )

    from meshlet.proxy.stream_info import StreamInfo
    from meshlet.proxy.telemetry.otlp_export import OtlpExporter
    from meshlet.proxy.telemetry.stats import TracingStats

OPENTELEMETRY: Final = "envoy.tracers.opentelemetry"
OPENTELEMETRY_TYPE: Final = "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig"

TRACEPARENT: Final = b"traceparent"
TRACESTATE: Final = b"tracestate"
B3_TRACE_ID: Final = b"x-b3-traceid"
B3_SPAN_ID: Final = b"x-b3-spanid"
B3_PARENT_SPAN_ID: Final = b"x-b3-parentspanid"
B3_SAMPLED: Final = b"x-b3-sampled"
B3_FLAGS: Final = b"x-b3-flags"
B3_SINGLE: Final = b"b3"
CLIENT_TRACE_ID: Final = b"x-client-trace-id"
#: The headers this proxy reads a parent from and replaces on the way upstream.
TRACE_HEADERS: Final = frozenset(
    {TRACEPARENT, B3_TRACE_ID, B3_SPAN_ID, B3_PARENT_SPAN_ID, B3_SAMPLED, B3_FLAGS, B3_SINGLE}
)
_READ: Final = TRACE_HEADERS | {CLIENT_TRACE_ID}

# OTLP's SpanKind values (opentelemetry/proto/trace/v1/trace.proto), kept here so that the
# request path never imports the protobuf modules.
KIND_SERVER: Final = 2
KIND_CLIENT: Final = 3

DEFAULT_MAX_PATH_TAG_LENGTH: Final = 256  # Envoy's default for http.url
DEFAULT_MAX_QUEUE: Final = 2048  # spans waiting for export per worker; more are dropped
_HEX: Final = frozenset(b"0123456789abcdef")
_ZERO_TRACE: Final = b"0" * 32
_ZERO_SPAN: Final = b"0" * 16

_TRACING_FIELDS: Final = {
    "random_sampling",
    "client_sampling",
    "overall_sampling",
    "custom_tags",
    "max_path_tag_length",
    "spawn_upstream_span",
    "provider",
}
_OTEL_FIELDS: Final = {"http_service", "service_name", "grpc_service", "max_cache_size"}


# -- configuration -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CustomTag:
    """One ``custom_tags`` entry: a fixed value (literal, or environment read when compiled)
    or a request header with a default."""

    tag: str
    value: str = ""  # literal / environment value, or the header's default
    header: bytes = b""  # request_header: the header's lower-case name; b"": fixed value

    def resolve(self, headers: Headers) -> str | None:
        """The tag's value for a request; None: leave the tag out (no header, no default)."""
        if not self.header:
            return self.value
        found = headers.get(self.header)
        if found is not None:
            return found.decode("latin-1")
        return self.value or None


@dataclass(frozen=True, slots=True, kw_only=True)
class OtlpEndpoint:
    """Where spans go: an OTLP/HTTP collector (``http_service.http_uri``)."""

    uri: str
    host: str
    port: int
    path: str
    timeout: float = 1.0  # seconds, per export request
    headers: tuple[tuple[str, str], ...] = ()  # http_service.request_headers_to_add
    service_name: str = ""  # empty: Istio's "<canonical service>.<namespace>"
    max_queue: int = DEFAULT_MAX_QUEUE


@dataclass(frozen=True, slots=True, kw_only=True)
class TracingConfig:
    """One HCM's ``tracing``, compiled. Probabilities are fractions (Envoy's Percent / 100)."""

    endpoint: OtlpEndpoint
    random_sampling: float = 1.0
    client_sampling: float = 1.0
    overall_sampling: float = 1.0
    max_path_tag_length: int = DEFAULT_MAX_PATH_TAG_LENGTH
    custom_tags: tuple[CustomTag, ...] = ()


def compile_tracing(
    proto: hcm_pb2.HttpConnectionManager.Tracing,
    path: str,
    environ: Mapping[str, str] | None = None,
) -> TracingConfig | None:
    """Compile the HCM's ``tracing``; None when it names no provider (Envoy: no tracer)."""
    problems = ProblemList()
    try:
        check_fields(proto, path, _TRACING_FIELDS)
    except ConfigError as e:
        problems.extend(e)
    if proto.HasField("spawn_upstream_span") and proto.spawn_upstream_span.value:
        problems.add(join(path, "spawn_upstream_span"), "only false is supported")
    sampling = {}
    for name in ("random_sampling", "client_sampling", "overall_sampling"):
        value = getattr(proto, name).value if proto.HasField(name) else 100.0
        if not 0.0 <= value <= 100.0:
            problems.add(join(path, f"{name}.value"), "must be between 0 and 100")
        sampling[name] = min(max(value, 0.0), 100.0) / 100.0
    tags: list[CustomTag] = []
    env = os.environ if environ is None else environ
    for i, tag in enumerate(proto.custom_tags):
        try:
            tags.append(_compile_custom_tag(tag, join(path, f"custom_tags[{i}]"), env))
        except ConfigError as e:
            problems.extend(e)
    endpoint: OtlpEndpoint | None = None
    if proto.HasField("provider"):
        try:
            endpoint = _compile_provider(proto.provider, join(path, "provider"))
        except ConfigError as e:
            problems.extend(e)
    problems.raise_if_any()
    if endpoint is None:
        return None
    return TracingConfig(
        endpoint=endpoint,
        random_sampling=sampling["random_sampling"],
        client_sampling=sampling["client_sampling"],
        overall_sampling=sampling["overall_sampling"],
        max_path_tag_length=uint_field(proto, "max_path_tag_length", DEFAULT_MAX_PATH_TAG_LENGTH),
        custom_tags=tuple(tags),
    )


def _compile_custom_tag(tag: object, path: str, env: Mapping[str, str]) -> CustomTag:
    from envoy.type.tracing.v3 import custom_tag_pb2

    assert isinstance(tag, custom_tag_pb2.CustomTag)
    check_fields(tag, path, {"tag", "literal", "environment", "request_header"})
    if not tag.tag:
        raise ConfigError.at(join(path, "tag"), "is required")
    kind = tag.WhichOneof("type")
    if kind == "literal":
        check_fields(tag.literal, join(path, "literal"), {"value"})
        return CustomTag(tag=tag.tag, value=tag.literal.value)
    if kind == "environment":
        check_fields(tag.environment, join(path, "environment"), {"name", "default_value"})
        value = env.get(tag.environment.name, tag.environment.default_value)
        return CustomTag(tag=tag.tag, value=value)
    if kind == "request_header":
        rh = tag.request_header
        check_fields(rh, join(path, "request_header"), {"name", "default_value"})
        if not rh.name:
            raise ConfigError.at(join(path, "request_header.name"), "is required")
        return CustomTag(tag=tag.tag, value=rh.default_value, header=rh.name.lower().encode())
    raise ConfigError.at(path, "one of literal, environment or request_header is required")


def _compile_provider(provider: object, path: str) -> OtlpEndpoint:
    from envoy.config.trace.v3 import http_tracer_pb2, opentelemetry_pb2

    assert isinstance(provider, http_tracer_pb2.Tracing.Http)
    check_fields(provider, path, {"name", "typed_config"})
    url = provider.typed_config.type_url
    if url != OPENTELEMETRY_TYPE and not (not url and provider.name == OPENTELEMETRY):
        raise ConfigError.at(
            path, f"{url or provider.name} is not supported (supported: {OPENTELEMETRY})"
        )
    if not url:
        raise ConfigError.at(join(path, "typed_config"), "http_service is required")
    config = opentelemetry_pb2.OpenTelemetryConfig()
    provider.typed_config.Unpack(config)
    cpath = join(path, "typed_config")
    check_fields(config, cpath, _OTEL_FIELDS)
    if config.HasField("grpc_service"):
        raise ConfigError.at(
            join(cpath, "grpc_service"), "is not supported: use http_service, OTLP over HTTP"
        )
    if not config.HasField("http_service"):
        raise ConfigError.at(join(cpath, "http_service"), "is required (OTLP over HTTP)")
    service = config.http_service
    spath = join(cpath, "http_service")
    check_fields(service, spath, {"http_uri", "request_headers_to_add"})
    uri = service.http_uri
    upath = join(spath, "http_uri")
    check_fields(uri, upath, {"uri", "cluster", "timeout"})
    parts = urlsplit(uri.uri)
    if parts.scheme != "http" or not parts.hostname:
        raise ConfigError.at(
            join(upath, "uri"), f"{uri.uri!r} must be an http:// URL (OTLP/HTTP without TLS)"
        )
    try:
        port = parts.port or 80
    except ValueError:
        raise ConfigError.at(join(upath, "uri"), f"{uri.uri!r} has a bad port") from None
    headers = []
    for i, option in enumerate(service.request_headers_to_add):
        opath = join(spath, f"request_headers_to_add[{i}]")
        check_fields(option, opath, {"header", "append_action"})
        check_fields(option.header, join(opath, "header"), {"key", "value"})
        if not option.header.key:
            raise ConfigError.at(join(opath, "header.key"), "is required")
        headers.append((option.header.key, option.header.value))
    timeout = duration_field(uri, "timeout", 1.0) or 1.0
    return OtlpEndpoint(
        uri=uri.uri,
        host=parts.hostname,
        port=port,
        path=(parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
        timeout=timeout,
        headers=tuple(headers),
        service_name=config.service_name,
        max_queue=uint_field(config, "max_cache_size", DEFAULT_MAX_QUEUE) or DEFAULT_MAX_QUEUE,
    )


# -- trace context -----------------------------------------------------------------------------


class SpanContext(NamedTuple):
    """What a request says about its trace. Ids are lower-case hex; ``span_id`` is empty when
    only a sampling decision came (``x-b3-sampled`` or ``b3: 0`` alone)."""

    trace_id: bytes
    span_id: bytes
    sampled: bool | None  # None: no decision, this proxy samples
    debug: bool = False


def _hex(value: bytes, length: int) -> bool:
    return len(value) == length and not set(value) - _HEX


def parse_traceparent(value: bytes) -> SpanContext | None:
    """W3C ``traceparent``: ``version-traceid-parentid-flags``; None when malformed.

    Version ``ff`` and all-zero ids are invalid; version 00 has exactly four fields, later
    versions may append more (read the first four).
    """
    value = value.strip()
    parts = value.split(b"-")
    if len(parts) < 4:
        return None
    version, trace_id, span_id, flags = parts[0], parts[1], parts[2], parts[3]
    if not _hex(version, 2) or version == b"ff" or (version == b"00" and len(parts) != 4):
        return None
    if not _hex(trace_id, 32) or not _hex(span_id, 16) or not _hex(flags, 2):
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return SpanContext(trace_id, span_id, bool(int(flags, 16) & 1))


def _b3_trace_id(value: bytes) -> bytes | None:
    value = value.lower()
    if _hex(value, 32):
        return None if value == _ZERO_TRACE else value
    if _hex(value, 16):
        return None if value == _ZERO_SPAN else b"0" * 16 + value
    return None


def _b3_sampled(value: bytes | None) -> bool | None:
    if value is None:
        return None
    value = value.lower()
    if value in (b"1", b"true", b"d"):
        return True
    if value in (b"0", b"false"):
        return False
    return None


def parse_b3_single(value: bytes) -> SpanContext | None:
    """``b3: {traceid}-{spanid}[-{sampling}[-{parentspanid}]]`` or ``b3: {sampling}``."""
    parts = value.strip().split(b"-")
    if len(parts) == 1:
        decision = _b3_sampled(parts[0])
        return None if decision is None else SpanContext(b"", b"", decision, parts[0] == b"d")
    if len(parts) > 4:
        return None
    trace_id = _b3_trace_id(parts[0])
    span_id = parts[1].lower()
    if trace_id is None or not _hex(span_id, 16) or span_id == _ZERO_SPAN:
        return None
    sampled: bool | None = None
    debug = False
    if len(parts) >= 3:
        sampled = _b3_sampled(parts[2])
        if sampled is None:
            return None
        debug = parts[2] == b"d"
    if len(parts) == 4 and not _hex(parts[3].lower(), 16):
        return None
    return SpanContext(trace_id, span_id, sampled, debug)


def parse_b3_multi(found: Mapping[bytes, bytes]) -> SpanContext | None:
    """``x-b3-traceid``/``x-b3-spanid``/``x-b3-sampled``/``x-b3-flags`` (flags 1: debug,
    which means sampled); a decision alone, without ids, still counts."""
    debug = found.get(B3_FLAGS) == b"1"
    sampled = True if debug else _b3_sampled(found.get(B3_SAMPLED))
    raw_trace, raw_span = found.get(B3_TRACE_ID), found.get(B3_SPAN_ID)
    if raw_trace is not None and raw_span is not None:
        trace_id = _b3_trace_id(raw_trace.strip())
        span_id = raw_span.strip().lower()
        if trace_id is not None and _hex(span_id, 16) and span_id != _ZERO_SPAN:
            return SpanContext(trace_id, span_id, sampled, debug)
    if sampled is None:
        return None
    return SpanContext(b"", b"", sampled, debug)


def extract(headers: Headers) -> tuple[SpanContext | None, bool]:
    """The incoming context (``traceparent`` first, then B3 single, then B3 multi) and whether
    the request carries ``x-client-trace-id``. One pass over the headers."""
    found: dict[bytes, bytes] = {}
    for k, v in headers.items:
        if k in _READ and k not in found:
            found[k] = v
    if not found:
        return None, False
    client = CLIENT_TRACE_ID in found
    ctx = None
    if TRACEPARENT in found:
        ctx = parse_traceparent(found[TRACEPARENT])
    if ctx is None and B3_SINGLE in found:
        ctx = parse_b3_single(found[B3_SINGLE])
    if ctx is None:
        ctx = parse_b3_multi(found)
    return ctx, client


# -- spans -------------------------------------------------------------------------------------


class Span:
    """One request's span in one proxy, from the request head to the end of the stream."""

    __slots__ = ("config", "debug", "kind", "parent_id", "sampled", "span_id", "trace_id")

    def __init__(
        self,
        config: TracingConfig,
        kind: int,
        trace_id: bytes,
        span_id: bytes,
        parent_id: bytes,
        sampled: bool,
        debug: bool = False,
    ) -> None:
        self.config = config
        self.kind = kind
        self.trace_id = trace_id  # 32 lower-case hex digits
        self.span_id = span_id  # 16
        self.parent_id = parent_id  # 16, or b"" for a root span
        self.sampled = sampled
        self.debug = debug

    def __repr__(self) -> str:
        return (
            f"<Span {self.trace_id.decode()}/{self.span_id.decode()} "
            f"parent={self.parent_id.decode() or '-'} sampled={self.sampled}>"
        )

    @property
    def traceparent(self) -> bytes:
        return b"00-%s-%s-%s" % (self.trace_id, self.span_id, b"01" if self.sampled else b"00")

    def inject(self, headers: Headers) -> None:
        """Replace the request's trace headers by this span's: W3C and B3 (``tracestate``,
        whatever the client sent, passes through)."""
        items = headers.items
        for k, _ in items:
            if k in TRACE_HEADERS:
                items = headers.items = [kv for kv in items if kv[0] not in TRACE_HEADERS]
                break
        sampled = b"1" if self.sampled else b"0"
        items.append((TRACEPARENT, self.traceparent))
        items.append((B3_TRACE_ID, self.trace_id))
        items.append((B3_SPAN_ID, self.span_id))
        if self.parent_id:
            items.append((B3_PARENT_SPAN_ID, self.parent_id))
        items.append((B3_SAMPLED, sampled))
        if self.debug:
            items.append((B3_FLAGS, b"1"))


def start_span(
    config: TracingConfig, head: RequestHead, *, outbound: bool, rng: random.Random
) -> Span:
    """A span for a request whose head is complete: parent and decision from its headers,
    else a new trace sampled at the configured rates."""
    ctx, client = extract(head.headers)
    sampled: bool | None = None
    trace_id = parent_id = b""
    debug = False
    if ctx is not None:
        trace_id, parent_id, sampled, debug = ctx
    if sampled is None:
        if client:
            sampled = rng.random() < config.client_sampling
        else:
            sampled = rng.random() < config.random_sampling
        if sampled and config.overall_sampling < 1.0:
            sampled = rng.random() < config.overall_sampling
    if not trace_id:
        trace_id = b"%032x" % (rng.getrandbits(128) or 1)
    span_id = b"%016x" % (rng.getrandbits(64) or 1)
    kind = KIND_CLIENT if outbound else KIND_SERVER
    return Span(config, kind, trace_id, span_id, parent_id, sampled, debug)


# -- what a finished span says -----------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeTags:
    """The local proxy as spans name it: per-process tags and the OTLP resource."""

    node_id: str = ""
    canonical_service: str = "unknown"
    canonical_revision: str = "latest"
    namespace: str = "unknown"
    mesh_id: str = ""
    pod_name: str = ""

    @classmethod
    def from_node(cls, node: Node) -> NodeTags:
        from meshlet.proxy.telemetry.stats import NodeInfo

        info = NodeInfo.from_node(node)
        md = node.metadata.fields

        def text(key: str) -> str:
            value = md.get(key)
            if value is None or value.WhichOneof("kind") != "string_value":
                return ""
            return str(value.string_value)

        return cls(
            node_id=node.id,
            canonical_service=info.canonical_service,
            canonical_revision=info.canonical_revision,
            namespace=info.namespace,
            mesh_id=text("MESH_ID"),
            pod_name=text("NAME"),
        )

    def tags(self) -> tuple[tuple[str, str], ...]:
        """Istio's per-proxy span tags."""
        return (
            ("node_id", self.node_id),
            ("component", "proxy"),
            ("istio.canonical_service", self.canonical_service),
            ("istio.canonical_revision", self.canonical_revision),
            ("istio.namespace", self.namespace),
            ("istio.mesh_id", self.mesh_id),
        )

    def resource(self, service_name: str = "") -> tuple[tuple[str, str], ...]:
        """The OTLP resource: ``service.name`` is the configured one, else Istio's default
        ``<canonical service>.<namespace>`` (APP_LABEL_AND_NAMESPACE)."""
        out = [("service.name", service_name or f"{self.canonical_service}.{self.namespace}")]
        if self.pod_name:
            out.append(("k8s.pod.name", self.pod_name))
        if self.namespace != "unknown":
            out.append(("k8s.namespace.name", self.namespace))
        return tuple(out)


def span_name(info: StreamInfo) -> str:
    """``<authority><path without query>``, as Istio's spans read."""
    head = info.request
    if head is None:
        return "-"
    return (head.authority + head.path_only).decode("latin-1")


def span_attributes(span: Span, info: StreamInfo) -> list[tuple[str, str]]:
    """Envoy's HCM span tags for a finished stream, then the custom tags (string values, as
    Envoy's tracers export them)."""
    head = info.request
    headers = head.headers if head is not None else Headers()

    def header(name: bytes) -> str:
        value = headers.get(name)
        return "-" if value is None else value.decode("latin-1")

    out = []
    if head is not None:
        scheme = headers.get(b"x-forwarded-proto") or head.scheme
        url = (scheme + b"://" + head.authority + head.path).decode("latin-1")
        out.append(("http.method", head.method.decode("latin-1")))
        out.append(("http.url", url[: span.config.max_path_tag_length]))
        out.append(("http.protocol", "HTTP/" + head.version.decode("latin-1")))
    code = info.response_code
    cluster = info.upstream_cluster or "-"
    out.extend(
        (
            ("http.status_code", str(code)),
            ("upstream_cluster", cluster),
            ("upstream_cluster.name", cluster),
            ("guid:x-request-id", header(b"x-request-id")),
            ("user_agent", header(b"user-agent")),
            ("downstream_cluster", header(b"x-envoy-downstream-service-cluster")),
            ("request_size", str(info.bytes_received)),
            ("response_size", str(info.bytes_sent)),
            ("response_flags", info.flags_str),
            ("peer.address", info.downstream_remote),
        )
    )
    if info.upstream_host:
        out.append(("upstream_address", info.upstream_host))
    if code >= 500 or code == 0:
        out.append(("error", "true"))
    for tag in span.config.custom_tags:
        value = tag.resolve(headers)
        if value is not None:
            out.append((tag.tag, value))
    return out


def is_error(info: StreamInfo) -> bool:
    """Envoy marks a span with ``error=true`` for 5xx and for streams that got no response."""
    return info.response_code >= 500 or info.response_code == 0


# -- the worker's tracer -----------------------------------------------------------------------


class Tracer:
    """One worker's spans: starts them, and hands sampled finished ones to the exporter of
    their endpoint (one ``OtlpExporter`` per collector, made on the first span for it, so a
    proxy without tracing never imports the OTLP protobuf modules)."""

    __slots__ = ("_exporters", "loop", "node", "rng", "stats")

    def __init__(
        self,
        node: NodeTags,
        stats: TracingStats,
        loop: asyncio.AbstractEventLoop,
        rng: random.Random,
    ) -> None:
        self.node = node
        self.stats = stats
        self.loop = loop
        self.rng = rng
        self._exporters: dict[OtlpEndpoint, OtlpExporter] = {}

    def __repr__(self) -> str:
        return f"<Tracer {self.node.node_id or '-'} exporters={len(self._exporters)}>"

    def start(self, config: TracingConfig, head: RequestHead, *, outbound: bool) -> Span:
        return start_span(config, head, outbound=outbound, rng=self.rng)

    def finish(self, span: Span, info: StreamInfo) -> None:
        """The stream ended: queue the span for export if it is sampled."""
        if not span.sampled:
            return
        endpoint = span.config.endpoint
        exporter = self._exporters.get(endpoint)
        if exporter is None:
            from meshlet.proxy.telemetry.otlp_export import OtlpExporter

            exporter = self._exporters[endpoint] = OtlpExporter(
                endpoint, self.node, self.stats, self.loop
            )
        exporter.submit(span, info)

    async def close(self, timeout: float = 2.0) -> None:
        """Export what is queued (draining, shutdown), waiting at most ``timeout`` seconds."""
        exporters = list(self._exporters.values())
        if not exporters:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(e.close() for e in exporters), return_exceptions=True), timeout
            )
