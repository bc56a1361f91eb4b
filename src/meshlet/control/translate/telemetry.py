"""Telemetry: Istio's Telemetry API and the mesh's telemetry options as HCM configuration
(istiod's ``pilot/pkg/model/telemetry.go`` and ``networking/core/tracing.go``).

Every HTTP connection manager of a sidecar or gateway gets:

* ``istio.metadata_exchange`` first (``io.istio.http.peer_metadata.Config``, a TypedStruct):
  the proxies swap ``x-envoy-peer-metadata(-id)`` so metrics name both peers.
* ``istio.stats`` right before the router (``stats.PluginConfig``, a TypedStruct), with the
  metric overrides of the Telemetries in effect and Istio's ``disable_host_header_fallback``
  (true on inbound and gateway listeners).
* ``tracing`` when the mesh has an OTLP endpoint (``meshlet control --otlp-endpoint``): the
  OpenTelemetry tracer posting to that URL through the STATIC cluster ``OTLP_CLUSTER``,
  sampled at the Telemetry's ``randomSamplingPercentage``, else the mesh's default (1%), with
  its custom tags. ``disableSpanReporting: true`` leaves ``tracing`` out, as istiod does.
* ``access_log`` (``envoy.access_loggers.file``) when the mesh logs (``--access-log-file``)
  or a Telemetry turns logging on; a Telemetry's ``disabled: true`` turns it off, and its
  ``filter.expression`` becomes an Envoy ``AccessLogFilter``. Istio's default text format, or
  its default JSON fields with ``--access-log-encoding JSON``; ``/dev/stdout`` when a
  Telemetry turns logging on and the mesh names no file.

Rules kept (https://istio.io/latest/docs/reference/config/telemetry/ and
https://istio.io/latest/docs/tasks/observability/telemetry/):

* The Telemetries in effect are the root namespace's (mesh-wide), the proxy's namespace's and
  the one selecting the workload (``Snapshot.telemetries_for``); each field a later one sets
  overrides the earlier one's.
* Tracing: ``randomSamplingPercentage``, ``customTags`` (as a whole) and
  ``disableSpanReporting`` override field by field; entries with ``match.mode`` apply only to
  that side: CLIENT is the outbound listener and gateways, SERVER the inbound listener.
* Metrics: overrides merge per metric and side, later ones on top of earlier ones (tag by
  tag); ``ALL_METRICS`` stands for each metric; disabling ``ALL_METRICS`` drops every metric
  until a later override touches any metric again. TCP and gRPC message metrics are accepted
  and change nothing (meshlet has no TCP proxying).
* Access logging: entries apply by ``match.mode`` the same way; a later entry turns logging
  on (with its filter) or off.
* Provider names are accepted and not resolved: meshlet has one provider per signal (the
  proxy's Prometheus metrics, its file access log, the mesh's OTLP endpoint).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final
from urllib.parse import urlsplit

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.config.trace.v3 import opentelemetry_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.tracing.v3 import custom_tag_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2
from xds.type.v3 import typed_struct_pb2

from meshlet.api.telemetry import (
    AllOf,
    AnyOf,
    CustomTag,
    DurationCondition,
    HeaderCondition,
    IstioMetric,
    LogCondition,
    MetricSelector,
    ResponseFlagCondition,
    StatusCodeCondition,
    TagOperation,
    WorkloadMode,
    WorkloadSelection,
    parse_log_filter,
)
from meshlet.control.snapshot import MeshConfig, Proxy, ProxyView, TelemetryConfig

MX_FILTER: Final = "istio.metadata_exchange"
MX_TYPE_URL: Final = "type.googleapis.com/io.istio.http.peer_metadata.Config"
STATS_FILTER: Final = "istio.stats"
STATS_TYPE_URL: Final = "type.googleapis.com/stats.PluginConfig"
OTEL_TRACER: Final = "envoy.tracers.opentelemetry"
FILE_ACCESS_LOG: Final = "envoy.access_loggers.file"
#: The STATIC cluster of the mesh's OTLP endpoint.
OTLP_CLUSTER: Final = "otlp-collector"
DEFAULT_LOG_PATH: Final = "/dev/stdout"  # Istio's built-in ``envoy`` provider's path
MAX_PATH_TAG_LENGTH: Final = 256  # Istio's default maxTagLength
OTLP_TIMEOUT_S: Final = 1.0

#: Istio's default text access log format (``EnvoyTextLogFormat``).
ISTIO_TEXT_FORMAT: Final = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    "%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% "
    '"%UPSTREAM_TRANSPORT_FAILURE_REASON%" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% '
    '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" '
    '"%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER_RAW% '
    "%UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% "
    "%REQUESTED_SERVER_NAME% %ROUTE_NAME%\n"
)

#: Istio's default JSON access log fields (``EnvoyJSONLogFormatIstio``).
ISTIO_JSON_FORMAT: Final[Mapping[str, str]] = {
    "start_time": "%START_TIME%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
    "protocol": "%PROTOCOL%",
    "response_code": "%RESPONSE_CODE%",
    "response_flags": "%RESPONSE_FLAGS%",
    "response_code_details": "%RESPONSE_CODE_DETAILS%",
    "connection_termination_details": "%CONNECTION_TERMINATION_DETAILS%",
    "upstream_transport_failure_reason": "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "duration": "%DURATION%",
    "upstream_service_time": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    "x_forwarded_for": "%REQ(X-FORWARDED-FOR)%",
    "user_agent": "%REQ(USER-AGENT)%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "authority": "%REQ(:AUTHORITY)%",
    "upstream_host": "%UPSTREAM_HOST%",
    "upstream_cluster": "%UPSTREAM_CLUSTER_RAW%",
    "upstream_local_address": "%UPSTREAM_LOCAL_ADDRESS%",
    "downstream_local_address": "%DOWNSTREAM_LOCAL_ADDRESS%",
    "downstream_remote_address": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "requested_server_name": "%REQUESTED_SERVER_NAME%",
    "route_name": "%ROUTE_NAME%",
}

#: Telemetry metric -> the proxy's metric name (without ``istio_``); others are not produced.
METRIC_NAMES: Final[Mapping[IstioMetric, str]] = {
    IstioMetric.REQUEST_COUNT: "requests_total",
    IstioMetric.REQUEST_DURATION: "request_duration_milliseconds",
    IstioMetric.REQUEST_SIZE: "request_bytes",
    IstioMetric.RESPONSE_SIZE: "response_bytes",
}
_EACH_METRIC: Final = tuple(m for m in IstioMetric if m is not IstioMetric.ALL_METRICS)


class ListenerClass(StrEnum):
    """Which HCM is being built (istiod's ``ListenerClass``)."""

    SIDECAR_OUTBOUND = "outbound"
    SIDECAR_INBOUND = "inbound"
    GATEWAY = "gateway"

    @property
    def mode(self) -> WorkloadMode:
        """The side a Telemetry's ``match.mode`` names: gateways are clients (istiod's
        ``workloadMode``)."""
        return WorkloadMode.SERVER if self is ListenerClass.SIDECAR_INBOUND else WorkloadMode.CLIENT


# -- resolving the Telemetries in effect -----------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TracingSpec:
    """Tracing for one side of a proxy after merging."""

    sampling: float  # percent
    custom_tags: Mapping[str, CustomTag] = field(default_factory=dict)
    disabled: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class AccessLogSpec:
    """Access logging for one side of a proxy after merging."""

    enabled: bool
    condition: LogCondition | None = None  # None: every request


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricOverride:
    """One entry of ``istio.stats``'s ``metrics`` (name "" is every metric)."""

    name: str
    drop: bool = False
    dimensions: Mapping[str, str] = field(default_factory=dict)
    tags_to_remove: tuple[str, ...] = ()

    def as_value(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dimensions": dict(self.dimensions),
            "tags_to_remove": list(self.tags_to_remove),
            "drop": self.drop,
        }


def _applies(match: WorkloadSelection | None, mode: WorkloadMode) -> bool:
    return match is None or match.mode in (WorkloadMode.CLIENT_AND_SERVER, mode)


def tracing_spec(
    telemetries: Sequence[TelemetryConfig], mesh: MeshConfig, mode: WorkloadMode
) -> TracingSpec:
    """The merged tracing of ``telemetries`` (least specific first) for one side."""
    sampling = mesh.trace_sampling
    tags: Mapping[str, CustomTag] = {}
    disabled = False
    for tc in telemetries:
        for entry in tc.spec.tracing:
            if not _applies(entry.match, mode):
                continue
            if entry.disable_span_reporting is not None:
                disabled = entry.disable_span_reporting
            if entry.custom_tags:  # a map replaces the parent's as a whole (istiod's TODO)
                tags = entry.custom_tags
            if entry.random_sampling_percentage is not None:
                sampling = entry.random_sampling_percentage
    return TracingSpec(sampling=sampling, custom_tags=tags, disabled=disabled)


def access_log_spec(
    telemetries: Sequence[TelemetryConfig], mesh: MeshConfig, mode: WorkloadMode
) -> AccessLogSpec:
    """The merged access logging of ``telemetries`` for one side: the mesh's file, if any,
    logs every request until a Telemetry says otherwise."""
    spec = AccessLogSpec(enabled=bool(mesh.access_log_file))
    for tc in telemetries:
        for entry in tc.spec.access_logging:
            if not _applies(entry.match, mode):
                continue
            if entry.disabled:
                spec = AccessLogSpec(enabled=False)
                continue
            expression = entry.filter.expression if entry.filter is not None else ""
            condition = parse_log_filter(expression) if expression.strip() else None
            spec = AccessLogSpec(enabled=True, condition=condition)
    return spec


@dataclass(slots=True)
class _Merged:
    disabled: bool | None = None
    tags: dict[str, tuple[TagOperation, str]] = field(default_factory=dict)


def _metrics_of(match: MetricSelector | None) -> tuple[IstioMetric, ...]:
    if match is None or match.metric is None or match.metric is IstioMetric.ALL_METRICS:
        return _EACH_METRIC
    return (match.metric,)


def metric_overrides(
    telemetries: Sequence[TelemetryConfig], mode: WorkloadMode
) -> tuple[MetricOverride, ...]:
    """The merged metric overrides of ``telemetries`` for one side (istiod's
    ``mergeMetrics``), sorted by metric name."""
    merged: dict[IstioMetric, _Merged] = {}
    disabled_all = False
    for tc in telemetries:
        for metrics in tc.spec.metrics:
            for o in metrics.overrides:
                match = o.match
                if match is not None and match.metric is IstioMetric.ALL_METRICS and o.disabled:
                    disabled_all = True
                    continue
                disabled_all = False  # disabled mesh-wide, enabled again below
                if match is not None and match.mode not in (WorkloadMode.CLIENT_AND_SERVER, mode):
                    continue
                for metric in _metrics_of(match):
                    entry = merged.setdefault(metric, _Merged())
                    if o.disabled is not None:
                        entry.disabled = o.disabled
                    for tag, tag_override in o.tag_overrides.items():
                        entry.tags[tag] = (tag_override.operation, tag_override.value)
    if disabled_all:
        return (MetricOverride(name="", drop=True),)
    out: list[MetricOverride] = []
    for metric, entry in merged.items():
        name = METRIC_NAMES.get(metric)
        if name is None:
            continue  # TCP and gRPC message metrics: not produced
        out.append(
            MetricOverride(
                name=name,
                drop=bool(entry.disabled),
                dimensions={
                    t: v for t, (op, v) in sorted(entry.tags.items()) if op is TagOperation.UPSERT
                },
                tags_to_remove=tuple(
                    t for t, (op, _) in sorted(entry.tags.items()) if op is TagOperation.REMOVE
                ),
            )
        )
    return tuple(sorted(out, key=lambda m: m.name))


# -- filters and HCM fields --------------------------------------------------------------------


def _typed_struct(type_url: str, value: Mapping[str, Any]) -> any_pb2.Any:
    struct = struct_pb2.Struct()
    struct.update(value)
    packed = any_pb2.Any()
    packed.Pack(typed_struct_pb2.TypedStruct(type_url=type_url, value=struct))
    return packed


def metadata_exchange_filter() -> hcm_pb2.HttpFilter:
    """``istio.metadata_exchange`` (istio/proxy ``peer_metadata``); its config is empty."""
    return hcm_pb2.HttpFilter(name=MX_FILTER, typed_config=_typed_struct(MX_TYPE_URL, {}))


def stats_filter(
    overrides: Sequence[MetricOverride], listener_class: ListenerClass
) -> hcm_pb2.HttpFilter:
    """``istio.stats`` with ``overrides``; the host header is not used for the destination
    service on inbound and gateway listeners (istiod's ``disableHostHeaderFallback``)."""
    value = {
        "disable_host_header_fallback": listener_class is not ListenerClass.SIDECAR_OUTBOUND,
        "metrics": [o.as_value() for o in overrides],
    }
    return hcm_pb2.HttpFilter(name=STATS_FILTER, typed_config=_typed_struct(STATS_TYPE_URL, value))


def service_name(proxy: Proxy) -> str:
    """``<canonical service>.<namespace>`` (Istio's default tracing service name,
    APP_LABEL_AND_NAMESPACE)."""
    labels = proxy.labels
    name = (
        labels.get("service.istio.io/canonical-name")
        or labels.get("app.kubernetes.io/name")
        or labels.get("app")
        or proxy.workload_name
        or proxy.pod_name
        or proxy.ip
    )
    return f"{name}.{proxy.namespace}"


def _custom_tag(name: str, tag: CustomTag) -> custom_tag_pb2.CustomTag:
    out = custom_tag_pb2.CustomTag(tag=name)
    if tag.literal is not None:
        out.literal.value = tag.literal.value
    elif tag.environment is not None:
        out.environment.name = tag.environment.name
        out.environment.default_value = tag.environment.default_value
    elif tag.header is not None:
        out.request_header.name = tag.header.name
        out.request_header.default_value = tag.header.default_value
    return out


def hcm_tracing(
    spec: TracingSpec, mesh: MeshConfig, proxy: Proxy
) -> hcm_pb2.HttpConnectionManager.Tracing | None:
    """The HCM's ``tracing``, or None (no OTLP endpoint, or span reporting disabled)."""
    if not mesh.otlp_endpoint or spec.disabled:
        return None
    tracing = hcm_pb2.HttpConnectionManager.Tracing()
    tracing.client_sampling.value = 100.0
    tracing.random_sampling.value = spec.sampling
    tracing.overall_sampling.value = 100.0
    tracing.max_path_tag_length.value = MAX_PATH_TAG_LENGTH
    tracing.custom_tags.extend(
        _custom_tag(n, spec.custom_tags[n]) for n in sorted(spec.custom_tags)
    )
    config = opentelemetry_pb2.OpenTelemetryConfig(service_name=service_name(proxy))
    uri = config.http_service.http_uri
    uri.uri = mesh.otlp_endpoint
    uri.cluster = OTLP_CLUSTER
    uri.timeout.CopyFrom(_duration(OTLP_TIMEOUT_S))
    tracing.provider.name = OTEL_TRACER
    tracing.provider.typed_config.Pack(config)
    return tracing


_COMPARISON_OPS: Final = {
    "EQ": accesslog_pb2.ComparisonFilter.EQ,
    "NE": accesslog_pb2.ComparisonFilter.NE,
    "GE": accesslog_pb2.ComparisonFilter.GE,
    "LE": accesslog_pb2.ComparisonFilter.LE,
}


def _comparison(op: str, value: int) -> accesslog_pb2.ComparisonFilter:
    comparison = accesslog_pb2.ComparisonFilter(op=_COMPARISON_OPS[op])
    comparison.value.default_value = value
    comparison.value.runtime_key = ""
    return comparison


def log_filter(condition: LogCondition) -> accesslog_pb2.AccessLogFilter:
    """A parsed Telemetry filter expression as Envoy's ``AccessLogFilter``."""
    out = accesslog_pb2.AccessLogFilter()
    if isinstance(condition, StatusCodeCondition):
        out.status_code_filter.comparison.CopyFrom(_comparison(condition.op, condition.value))
    elif isinstance(condition, DurationCondition):
        out.duration_filter.comparison.CopyFrom(_comparison(condition.op, condition.millis))
    elif isinstance(condition, ResponseFlagCondition):
        out.response_flag_filter.SetInParent()  # no flags listed: any flag
    elif isinstance(condition, HeaderCondition):
        matcher = route_components_pb2.HeaderMatcher(
            name=condition.name, invert_match=condition.invert
        )
        matcher.string_match.exact = condition.value
        out.header_filter.header.CopyFrom(matcher)
    elif isinstance(condition, AllOf):
        out.and_filter.filters.extend(log_filter(c) for c in condition.conditions)
    elif isinstance(condition, AnyOf):
        out.or_filter.filters.extend(log_filter(c) for c in condition.conditions)
    return out


def access_logs(spec: AccessLogSpec, mesh: MeshConfig) -> list[accesslog_pb2.AccessLog]:
    """The HCM's ``access_log``: one file logger, or none when logging is off."""
    if not spec.enabled:
        return []
    config = file_pb2.FileAccessLog(path=mesh.access_log_file or DEFAULT_LOG_PATH)
    if mesh.access_log_encoding.upper() == "JSON":
        config.log_format.json_format.update(dict(ISTIO_JSON_FORMAT))
    else:
        config.log_format.text_format_source.inline_string = ISTIO_TEXT_FORMAT
    entry = accesslog_pb2.AccessLog(name=FILE_ACCESS_LOG)
    entry.typed_config.Pack(config)
    if spec.condition is not None:
        entry.filter.CopyFrom(log_filter(spec.condition))
    return [entry]


@dataclass(frozen=True, slots=True, kw_only=True)
class HcmTelemetry:
    """What one HCM gets: filters to put first and before the router, tracing, access logs."""

    first: tuple[hcm_pb2.HttpFilter, ...]
    before_router: tuple[hcm_pb2.HttpFilter, ...]
    tracing: hcm_pb2.HttpConnectionManager.Tracing | None
    access_logs: tuple[accesslog_pb2.AccessLog, ...]


def hcm_telemetry(view: ProxyView, listener_class: ListenerClass) -> HcmTelemetry:
    """The telemetry of one of ``view``'s HCMs (computed once per proxy and class)."""
    key = f"telemetry:{listener_class.value}"
    found = view.memo.get(key)
    if found is None:
        telemetries = view.snapshot.telemetries_for(view.proxy)
        mesh = view.mesh
        mode = listener_class.mode
        tracing = hcm_tracing(tracing_spec(telemetries, mesh, mode), mesh, view.proxy)
        found = view.memo[key] = HcmTelemetry(
            first=(metadata_exchange_filter(),),
            before_router=(stats_filter(metric_overrides(telemetries, mode), listener_class),),
            tracing=tracing,
            access_logs=tuple(access_logs(access_log_spec(telemetries, mesh, mode), mesh)),
        )
    assert isinstance(found, HcmTelemetry)
    return found


def apply_telemetry(
    hcm: hcm_pb2.HttpConnectionManager, view: ProxyView, listener_class: ListenerClass
) -> None:
    """Add ``view``'s telemetry to ``hcm``, whose last filter is the router."""
    found = hcm_telemetry(view, listener_class)
    filters = list(hcm.http_filters)
    del hcm.http_filters[:]
    hcm.http_filters.extend([*found.first, *filters[:-1], *found.before_router, *filters[-1:]])
    if found.tracing is not None:
        hcm.tracing.CopyFrom(found.tracing)
    hcm.access_log.extend(found.access_logs)


# -- the OTLP collector's cluster -----------------------------------------------------------------


def otlp_address(endpoint: str) -> tuple[str, int]:
    """``(host, port)`` of an OTLP/HTTP URL such as ``http://127.0.0.1:4318/v1/traces``;
    ValueError if it is not an ``http://`` URL (port 80 when none is given)."""
    parts = urlsplit(endpoint)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(
            f"{endpoint!r} is not an OTLP/HTTP URL like http://127.0.0.1:4318/v1/traces"
        )
    try:
        port = parts.port or 80
    except ValueError:
        raise ValueError(f"{endpoint!r} has an invalid port") from None
    return parts.hostname, port


def otlp_cluster(mesh: MeshConfig) -> cluster_pb2.Cluster | None:
    """The cluster the tracer's ``http_uri`` names: STATIC for an IP address (STRICT_DNS for
    a host name), so that Envoy would accept the same configuration; None without an OTLP
    endpoint."""
    if not mesh.otlp_endpoint:
        return None
    host, port = otlp_address(mesh.otlp_endpoint)
    cluster = cluster_pb2.Cluster(name=OTLP_CLUSTER)
    cluster.type = cluster_pb2.Cluster.STATIC if _is_ip(host) else cluster_pb2.Cluster.STRICT_DNS
    cluster.connect_timeout.CopyFrom(_duration(mesh.connect_timeout))
    assignment = endpoint_pb2.ClusterLoadAssignment(cluster_name=OTLP_CLUSTER)
    group = assignment.endpoints.add()
    lb_endpoint = endpoint_components_pb2.LbEndpoint()
    lb_endpoint.endpoint.address.CopyFrom(
        address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host, port_value=port))
    )
    group.lb_endpoints.append(lb_endpoint)
    group.load_balancing_weight.value = 1
    cluster.load_assignment.CopyFrom(assignment)
    return cluster


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _duration(seconds: float) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromNanoseconds(round(seconds * 1e9))
    return out


__all__ = [
    "DEFAULT_LOG_PATH",
    "ISTIO_JSON_FORMAT",
    "ISTIO_TEXT_FORMAT",
    "METRIC_NAMES",
    "MX_FILTER",
    "MX_TYPE_URL",
    "OTEL_TRACER",
    "OTLP_CLUSTER",
    "STATS_FILTER",
    "STATS_TYPE_URL",
    "AccessLogSpec",
    "HcmTelemetry",
    "ListenerClass",
    "MetricOverride",
    "TracingSpec",
    "access_log_spec",
    "access_logs",
    "apply_telemetry",
    "hcm_telemetry",
    "hcm_tracing",
    "log_filter",
    "metadata_exchange_filter",
    "metric_overrides",
    "otlp_address",
    "otlp_cluster",
    "service_name",
    "stats_filter",
    "tracing_spec",
]
