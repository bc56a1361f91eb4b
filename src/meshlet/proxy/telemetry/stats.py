"""Envoy's stats and Istio's standard metrics, as one worker process counts them.

Theory of operation. The hot path only adds to plain ints: a ``ClusterStats`` or ``HttpStats``
is a slotted object that the compiled config holds a reference to, so counting a request is
``stats.upstream_rq_total += 1`` -- no lookup, no lock (one asyncio loop per process). Istio's
metrics are one dict lookup with a tuple key, plus a bisect into the bucket bounds for each
histogram; the 25 label values of a series are built once, when the series is first seen.

Nothing here does I/O. ``StatsStore.snapshot()`` turns everything into plain, picklable and
JSON-able data; the admin server collects one snapshot per worker process, folds them with
``merge_snapshots()`` and renders the result with ``render_prometheus()`` (Prometheus text
format 0.0.4, Envoy's and Istio's names) or ``render_text()`` (Envoy's plain ``/stats``).

Merging rules: counters and histograms add up. Gauges that count activity (active
connections, active requests) add up too; gauges that describe shared state (a cluster's
membership, outlier ejections, the server's state) are reported by every worker alike, so they
merge by maximum -- summing them would multiply them by the number of workers.
"""

from __future__ import annotations

import math
import re
import time
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Final

from meshlet.proxy.filters.istio_stats import grpc_status
from meshlet.proxy.stream_info import StreamInfo

if TYPE_CHECKING:
    from envoy.config.core.v3.base_pb2 import Node

    from meshlet.proxy.filters.istio_stats import StatsConfig
    from meshlet.proxy.filters.metadata_exchange import Peer

#: Envoy's default histogram bucket bounds (ms), used for every histogram here.
ENVOY_DEFAULT_BUCKETS: Final[tuple[float, ...]] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000,
    600000, 1800000, 3600000,
)  # fmt: skip
_NBUCKETS: Final = len(ENVOY_DEFAULT_BUCKETS) + 1  # the last bucket is +Inf

# How a stat merges and renders. Gauges of shared state merge by max (see the module doc).
COUNTER: Final = "counters"
GAUGE: Final = "gauges"
STATE_GAUGE: Final = "state_gauges"
HISTOGRAM: Final = "histograms"


class Histogram:
    """Counts per bucket of ``ENVOY_DEFAULT_BUCKETS`` (not cumulative; +Inf last) and a sum."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * _NBUCKETS
        self.sum = 0.0

    def __repr__(self) -> str:
        return f"<Histogram count={self.count} sum={self.sum:g}>"

    def record(self, value: float) -> None:
        # bisect_left: the first bound >= value, i.e. the bucket whose ``le`` admits value.
        self.counts[bisect_left(ENVOY_DEFAULT_BUCKETS, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def snapshot(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "sum": self.sum}


# -- declaring stats ---------------------------------------------------------------------------
# Each stat is a dataclass field whose metadata gives its kind and, where Envoy's dotted name
# differs from the attribute (``outlier_detection.ejections_active``), that name.


def _counter(name: str | None = None) -> int:
    return field(default=0, metadata={"kind": COUNTER, "name": name})


def _gauge(name: str | None = None) -> int:
    return field(default=0, metadata={"kind": GAUGE, "name": name})


def _state_gauge(name: str | None = None) -> int:
    return field(default=0, metadata={"kind": STATE_GAUGE, "name": name})


# Histogram fields are written ``field(default_factory=Histogram, metadata=_HISTOGRAM)``: a
# helper call like the ones above would hide the mutable default from linters.
_HISTOGRAM: Final = {"kind": HISTOGRAM, "name": None}


@dataclass(frozen=True, slots=True)
class _Stat:
    attr: str
    kind: str
    name: str  # Envoy's stat name below the scope, e.g. "outlier_detection.ejections_active"


def _stat_table(cls: type) -> tuple[_Stat, ...]:
    return tuple(
        _Stat(f.name, f.metadata["kind"], f.metadata["name"] or f.name)
        for f in fields(cls)
        if "kind" in f.metadata
    )


def _scope_snapshot(obj: object, table: tuple[_Stat, ...]) -> dict[str, Any]:
    snap: dict[str, Any] = {COUNTER: {}, GAUGE: {}, STATE_GAUGE: {}, HISTOGRAM: {}}
    for s in table:
        value = getattr(obj, s.attr)
        snap[s.kind][s.name] = value.snapshot() if s.kind == HISTOGRAM else value
    return snap


@dataclass(slots=True, eq=False, repr=False)
class ClusterStats:
    """Envoy's ``cluster.<name>.*`` stats for one upstream cluster.

    Hot-path code increments attributes directly; ``record_response_code`` charges a response
    the way Envoy does (``upstream_rq_completed``, ``upstream_rq_<class>xx``,
    ``upstream_rq_<code>``).
    """

    upstream_cx_total: int = _counter()
    upstream_cx_http1_total: int = _counter()
    upstream_cx_connect_fail: int = _counter()
    upstream_cx_connect_timeout: int = _counter()
    upstream_cx_overflow: int = _counter()
    upstream_cx_destroy: int = _counter()
    upstream_cx_destroy_local: int = _counter()
    upstream_cx_destroy_remote: int = _counter()
    upstream_cx_destroy_with_active_rq: int = _counter()
    upstream_cx_idle_timeout: int = _counter()
    upstream_cx_max_requests: int = _counter()
    upstream_cx_none_healthy: int = _counter()
    upstream_cx_protocol_error: int = _counter()
    upstream_cx_rx_bytes_total: int = _counter()
    upstream_cx_tx_bytes_total: int = _counter()
    upstream_rq_total: int = _counter()
    upstream_rq_completed: int = _counter()
    upstream_rq_1xx: int = _counter()
    upstream_rq_2xx: int = _counter()
    upstream_rq_3xx: int = _counter()
    upstream_rq_4xx: int = _counter()
    upstream_rq_5xx: int = _counter()
    upstream_rq_cancelled: int = _counter()
    upstream_rq_maintenance_mode: int = _counter()
    upstream_rq_pending_total: int = _counter()
    upstream_rq_pending_overflow: int = _counter()
    upstream_rq_pending_failure_eject: int = _counter()
    upstream_rq_timeout: int = _counter()
    upstream_rq_per_try_timeout: int = _counter()
    upstream_rq_rx_reset: int = _counter()
    upstream_rq_tx_reset: int = _counter()
    upstream_rq_retry: int = _counter()
    upstream_rq_retry_success: int = _counter()
    upstream_rq_retry_overflow: int = _counter()
    upstream_rq_retry_limit_exceeded: int = _counter()
    upstream_rq_retry_backoff_exponential: int = _counter()
    membership_change: int = _counter()
    update_attempt: int = _counter()
    update_success: int = _counter()
    update_rejected: int = _counter()
    lb_healthy_panic: int = _counter()
    outlier_detection_ejections_enforced_total: int = _counter(
        "outlier_detection.ejections_enforced_total"
    )
    outlier_detection_ejections_overflow: int = _counter("outlier_detection.ejections_overflow")
    outlier_detection_ejections_enforced_consecutive_5xx: int = _counter(
        "outlier_detection.ejections_enforced_consecutive_5xx"
    )
    outlier_detection_ejections_detected_consecutive_5xx: int = _counter(
        "outlier_detection.ejections_detected_consecutive_5xx"
    )
    outlier_detection_ejections_enforced_consecutive_gateway_failure: int = _counter(
        "outlier_detection.ejections_enforced_consecutive_gateway_failure"
    )
    outlier_detection_ejections_detected_consecutive_gateway_failure: int = _counter(
        "outlier_detection.ejections_detected_consecutive_gateway_failure"
    )
    outlier_detection_ejections_enforced_consecutive_local_origin_failure: int = _counter(
        "outlier_detection.ejections_enforced_consecutive_local_origin_failure"
    )
    outlier_detection_ejections_detected_consecutive_local_origin_failure: int = _counter(
        "outlier_detection.ejections_detected_consecutive_local_origin_failure"
    )
    outlier_detection_ejections_enforced_success_rate: int = _counter(
        "outlier_detection.ejections_enforced_success_rate"
    )
    outlier_detection_ejections_detected_success_rate: int = _counter(
        "outlier_detection.ejections_detected_success_rate"
    )
    health_check_attempt: int = _counter("health_check.attempt")
    health_check_success: int = _counter("health_check.success")
    health_check_failure: int = _counter("health_check.failure")
    health_check_network_failure: int = _counter("health_check.network_failure")
    health_check_passive_failure: int = _counter("health_check.passive_failure")
    health_check_verify_cluster: int = _counter("health_check.verify_cluster")
    upstream_cx_active: int = _gauge()
    upstream_rq_active: int = _gauge()
    upstream_rq_pending_active: int = _gauge()
    membership_total: int = _state_gauge()
    membership_healthy: int = _state_gauge()
    membership_degraded: int = _state_gauge()
    membership_excluded: int = _state_gauge()
    outlier_detection_ejections_active: int = _state_gauge("outlier_detection.ejections_active")
    health_check_healthy: int = _state_gauge("health_check.healthy")
    upstream_rq_time: Histogram = field(default_factory=Histogram, metadata=_HISTOGRAM)
    upstream_cx_connect_ms: Histogram = field(default_factory=Histogram, metadata=_HISTOGRAM)
    upstream_cx_length_ms: Histogram = field(default_factory=Histogram, metadata=_HISTOGRAM)
    upstream_rq_by_code: dict[int, int] = field(default_factory=dict)  # upstream_rq_<code>

    def __repr__(self) -> str:
        return (
            f"<ClusterStats rq_total={self.upstream_rq_total} rq_active={self.upstream_rq_active}"
            f" cx_active={self.upstream_cx_active}>"
        )

    def record_response_code(self, code: int) -> None:
        """Charge one upstream response: completed, its class and its code (Envoy's CodeStats)."""
        self.upstream_rq_completed += 1
        if code >= 500:
            self.upstream_rq_5xx += 1
        elif code >= 400:
            self.upstream_rq_4xx += 1
        elif code >= 300:
            self.upstream_rq_3xx += 1
        elif code >= 200:
            self.upstream_rq_2xx += 1
        elif code >= 100:
            self.upstream_rq_1xx += 1
        by_code = self.upstream_rq_by_code
        by_code[code] = by_code.get(code, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        snap = _scope_snapshot(self, _CLUSTER_STATS)
        snap["codes"] = {str(code): n for code, n in self.upstream_rq_by_code.items()}
        return snap


@dataclass(slots=True, eq=False, repr=False)
class HttpStats:
    """Envoy's ``http.<stat_prefix>.*`` stats of one HTTP connection manager.

    Includes the router's (``no_route``, ``rq_redirect``, ...), the fault filter's
    (``fault.delays_injected``, ...), the JWT filter's (``jwt_authn.allowed``, ``.denied``) and
    the RBAC filters' (``rbac.allowed``, ...) stats, which Envoy keeps under the same prefix.
    """

    downstream_cx_total: int = _counter()
    downstream_cx_http1_total: int = _counter()
    downstream_cx_destroy: int = _counter()
    downstream_cx_destroy_local: int = _counter()
    downstream_cx_destroy_remote: int = _counter()
    downstream_cx_destroy_active_rq: int = _counter()
    downstream_cx_drain_close: int = _counter()
    downstream_cx_idle_timeout: int = _counter()
    downstream_cx_protocol_error: int = _counter()
    downstream_cx_rx_bytes_total: int = _counter()
    downstream_cx_tx_bytes_total: int = _counter()
    downstream_rq_total: int = _counter()
    downstream_rq_http1_total: int = _counter()
    downstream_rq_completed: int = _counter()
    downstream_rq_1xx: int = _counter()
    downstream_rq_2xx: int = _counter()
    downstream_rq_3xx: int = _counter()
    downstream_rq_4xx: int = _counter()
    downstream_rq_5xx: int = _counter()
    downstream_rq_timeout: int = _counter()
    downstream_rq_idle_timeout: int = _counter()
    downstream_rq_header_timeout: int = _counter()
    downstream_rq_rx_reset: int = _counter()
    downstream_rq_tx_reset: int = _counter()
    downstream_rq_too_large: int = _counter()
    downstream_rq_non_relative_path: int = _counter()
    rs_too_large: int = _counter()
    no_route: int = _counter()
    no_cluster: int = _counter()
    rq_total: int = _counter()
    rq_redirect: int = _counter()
    rq_direct_response: int = _counter()
    rq_reset_after_downstream_response_started: int = _counter()
    delays_injected: int = _counter("fault.delays_injected")
    aborts_injected: int = _counter("fault.aborts_injected")
    faults_overflow: int = _counter("fault.faults_overflow")
    jwt_authn_allowed: int = _counter("jwt_authn.allowed")
    jwt_authn_denied: int = _counter("jwt_authn.denied")
    rbac_allowed: int = _counter("rbac.allowed")
    rbac_denied: int = _counter("rbac.denied")
    rbac_shadow_allowed: int = _counter("rbac.shadow_allowed")
    rbac_shadow_denied: int = _counter("rbac.shadow_denied")
    downstream_cx_active: int = _gauge()
    downstream_cx_http1_active: int = _gauge()
    downstream_rq_active: int = _gauge()
    active_faults: int = _gauge("fault.active_faults")
    # counters named at run time: rbac.<shadow_rules_stat_prefix>shadow_allowed / _denied
    rbac_prefixed: dict[str, int] = field(default_factory=dict)
    downstream_rq_time: Histogram = field(default_factory=Histogram, metadata=_HISTOGRAM)
    downstream_cx_length_ms: Histogram = field(default_factory=Histogram, metadata=_HISTOGRAM)

    def __repr__(self) -> str:
        return (
            f"<HttpStats rq_total={self.downstream_rq_total}"
            f" rq_active={self.downstream_rq_active} cx_active={self.downstream_cx_active}>"
        )

    def record_response_code(self, code: int) -> None:
        """Charge one downstream response: completed and its class (no counter for code 0)."""
        self.downstream_rq_completed += 1
        if code >= 500:
            self.downstream_rq_5xx += 1
        elif code >= 400:
            self.downstream_rq_4xx += 1
        elif code >= 300:
            self.downstream_rq_3xx += 1
        elif code >= 200:
            self.downstream_rq_2xx += 1
        elif code >= 100:
            self.downstream_rq_1xx += 1

    def count_rbac_shadow(self, prefix: str, allowed: bool) -> None:
        """A shadow result of an RBAC filter with ``shadow_rules_stat_prefix``:
        ``rbac.<prefix>shadow_allowed`` or ``..._denied``."""
        name = f"rbac.{prefix}shadow_{'allowed' if allowed else 'denied'}"
        self.rbac_prefixed[name] = self.rbac_prefixed.get(name, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        snap = _scope_snapshot(self, _HTTP_STATS)
        snap[COUNTER].update(self.rbac_prefixed)
        return snap


class ServerState:
    """Envoy's ``server.state`` gauge values."""

    LIVE: Final = 0
    DRAINING: Final = 1
    PRE_INITIALIZING: Final = 2
    INITIALIZING: Final = 3


@dataclass(slots=True, eq=False, repr=False)
class ServerStats:
    """Envoy's ``server.*`` gauges. ``uptime`` is refreshed from ``started`` at snapshot."""

    live: int = _state_gauge()
    state: int = _state_gauge()
    concurrency: int = _state_gauge()
    uptime: int = _state_gauge()
    started: float = field(default_factory=time.monotonic)

    def __repr__(self) -> str:
        return f"<ServerStats live={self.live} state={self.state} uptime={self.uptime}>"

    def snapshot(self) -> dict[str, Any]:
        self.uptime = int(time.monotonic() - self.started)
        return _scope_snapshot(self, _SERVER_STATS)


@dataclass(slots=True, eq=False, repr=False)
class TracingStats:
    """Envoy's ``tracing.opentelemetry.*`` stats of one worker's span exporters."""

    spans_sent: int = _counter()
    spans_dropped: int = _counter()  # queue full, or their export failed
    export_failures: int = _counter()
    timer_flushed: int = _counter()

    def __repr__(self) -> str:
        return f"<TracingStats sent={self.spans_sent} dropped={self.spans_dropped}>"

    def snapshot(self) -> dict[str, Any]:
        return _scope_snapshot(self, _TRACING_STATS)


_CLUSTER_STATS: Final = _stat_table(ClusterStats)
_HTTP_STATS: Final = _stat_table(HttpStats)
_SERVER_STATS: Final = _stat_table(ServerStats)
_TRACING_STATS: Final = _stat_table(TracingStats)


# -- Istio's standard metrics ------------------------------------------------------------------

UNKNOWN: Final = "unknown"

#: Istio's standard labels, in the order Istio's sidecar renders them.
ISTIO_LABELS: Final[tuple[str, ...]] = (
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_service_name",
    "destination_service_namespace",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
)

ISTIO_REQUESTS: Final = "istio_requests_total"
ISTIO_DURATION: Final = "istio_request_duration_milliseconds"
ISTIO_REQUEST_BYTES: Final = "istio_request_bytes"
ISTIO_RESPONSE_BYTES: Final = "istio_response_bytes"


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeInfo:
    """Who the local proxy is, as Istio's metric labels name it (from the xDS ``Node``)."""

    id: str = ""
    cluster: str = ""
    workload: str = UNKNOWN
    namespace: str = UNKNOWN
    app: str = UNKNOWN
    version: str = UNKNOWN
    canonical_service: str = UNKNOWN
    canonical_revision: str = UNKNOWN
    principal: str = UNKNOWN  # spiffe://<trust-domain>/ns/<ns>/sa/<sa>; labels use it with mTLS
    cluster_id: str = UNKNOWN

    @classmethod
    def from_node(cls, node: Node, *, trust_domain: str = "cluster.local") -> NodeInfo:
        """Read an ``envoy.config.core.v3.Node`` whose metadata Istio's agent filled in.

        Keys: ``NAME`` (pod), ``NAMESPACE``, ``WORKLOAD_NAME``, ``LABELS`` (``app``,
        ``version``, ``service.istio.io/canonical-name``/``-revision``), ``CLUSTER_ID``,
        ``SERVICE_ACCOUNT``. The namespace falls back to the pod part of an Istio node id
        (``sidecar~ip~pod.namespace~domain``); anything else missing is ``unknown``.
        """
        md = node.metadata.fields
        labels = md["LABELS"].struct_value.fields if "LABELS" in md else {}

        def get(fields_: Any, key: str) -> str:
            value = fields_.get(key)
            if value is None or value.WhichOneof("kind") != "string_value":
                return ""
            return str(value.string_value)

        namespace = get(md, "NAMESPACE") or _namespace_from_node_id(node.id) or UNKNOWN
        workload = get(md, "WORKLOAD_NAME") or UNKNOWN
        app = get(labels, "app") or get(labels, "app.kubernetes.io/name")
        version = get(labels, "version") or get(labels, "app.kubernetes.io/version")
        account = get(md, "SERVICE_ACCOUNT")
        principal = (
            f"spiffe://{trust_domain}/ns/{namespace}/sa/{account}"
            if account and namespace != UNKNOWN
            else UNKNOWN
        )
        return cls(
            id=node.id,
            cluster=node.cluster,
            workload=workload,
            namespace=namespace,
            app=app or UNKNOWN,
            version=version or UNKNOWN,
            # Istio's rule for canonical names: the label, else app/version, else defaults.
            canonical_service=get(labels, "service.istio.io/canonical-name") or app or workload,
            canonical_revision=get(labels, "service.istio.io/canonical-revision")
            or version
            or "latest",
            principal=principal,
            cluster_id=get(md, "CLUSTER_ID") or UNKNOWN,
        )


def _namespace_from_node_id(node_id: str) -> str:
    parts = node_id.split("~")
    if len(parts) == 4 and "." in parts[2]:
        return parts[2].split(".", 1)[1]
    return ""


def service_name_namespace(service: str) -> tuple[str, str]:
    """``reviews.default.svc.cluster.local`` -> ``("reviews", "default")``.

    Other hosts give ``(host, "unknown")``; an empty service gives ``unknown`` twice.
    """
    if not service:
        return UNKNOWN, UNKNOWN
    host = service
    if host.count(":") == 1:  # host:port (an IPv6 address has more colons)
        host = host.split(":", 1)[0]
    parts = host.split(".")
    if len(parts) >= 3 and parts[2] == "svc" and parts[0] and parts[1]:
        return parts[0], parts[1]
    return host, UNKNOWN


class _IstioSeries:
    """The metrics of one label set. A metric that the stats config drops, or that has other
    labels (its own series), is None here."""

    __slots__ = ("duration", "labels", "names", "request_bytes", "requests", "response_bytes")

    def __init__(
        self, names: tuple[str, ...], labels: tuple[str, ...], metrics: tuple[bool, ...]
    ) -> None:
        self.names = names
        self.labels = labels
        self.requests: int | None = 0 if metrics[0] else None
        self.duration = Histogram() if metrics[1] else None
        self.request_bytes = Histogram() if metrics[2] else None
        self.response_bytes = Histogram() if metrics[3] else None

    def add(self, info: StreamInfo) -> None:
        if self.requests is not None:
            self.requests += 1
        if self.duration is not None:
            self.duration.record(info.duration_ms)
        if self.request_bytes is not None:
            self.request_bytes.record(info.bytes_received)
        if self.response_bytes is not None:
            self.response_bytes.record(info.bytes_sent)

    def snapshot(self) -> dict[str, Any]:
        item: dict[str, Any] = {"labels": list(self.labels)}
        if self.names != ISTIO_LABELS:
            item["names"] = list(self.names)  # the stats config changed the label set
        if self.requests is not None:
            item["requests"] = self.requests
        for key, _ in _ISTIO_HISTS:
            hist = getattr(self, key)
            if hist is not None:
                item[key] = hist.snapshot()
        return item


_ALL_METRICS: Final = (True, True, True, True)


class IstioMetrics:
    """``istio_requests_total`` and the three request histograms, labelled as Istio does.

    The local proxy is the source for ``reporter="source"`` (outbound and gateways) and the
    destination for ``reporter="destination"`` (inbound). The peer is what the metadata
    exchange found (``StreamInfo.downstream_peer`` inbound, ``upstream_peer`` outbound: the
    response's headers, else the endpoint's EDS metadata); without one its workload labels
    are ``unknown``. On the destination side, a mutual TLS connection gives
    ``connection_security_policy="mutual_tls"``, the peer's URI SAN as ``source_principal`` and
    the local principal as ``destination_principal``; plaintext gives ``none`` and ``unknown``
    principals. The source side reports ``unknown``, as Istio's does. ``request_protocol`` is
    ``grpc`` for an ``application/grpc`` request (then ``grpc_response_status`` is the
    response's ``grpc-status``), else ``http``.

    Hot path: one tuple key (the peer by identity: peers are interned) and one dict lookup per
    request; the labels of a series are built once, when it is first seen. An ``istio.stats``
    config adds its fingerprint and, when it has expressions, their values to the key.
    """

    __slots__ = ("_series", "node")

    def __init__(self, node: NodeInfo) -> None:
        self.node = node
        # (reporter, destination_service, destination_cluster, code, flags, mTLS peer
        # principal or "" for plaintext, peer, grpc status or None for http, stats config
        # fingerprint, expression values) -> the series (one per distinct label set)
        self._series: dict[tuple[Any, ...], tuple[_IstioSeries, ...]] = {}

    def __repr__(self) -> str:
        return f"<IstioMetrics {self.node.workload}.{self.node.namespace} [{len(self._series)}]>"

    def record(
        self,
        info: StreamInfo,
        *,
        reporter: str,
        destination_service: str,
        destination_cluster: str,
        config: StatsConfig | None = None,
    ) -> None:
        """Count one finished request. ``reporter`` is ``source`` or ``destination``.

        ``destination_cluster`` is Istio's cluster id of the destination; empty means the
        local cluster id for ``destination`` and the peer's (else ``unknown``) for ``source``.
        ``config`` is the HCM's ``istio.stats`` filter (None: Istio's defaults).
        """
        tls = info.downstream_tls
        inbound = reporter == "destination"
        mtls = inbound and tls is not None and tls.mutual
        principal = (tls.peer_principal or UNKNOWN) if mtls and tls is not None else ""
        peer = info.downstream_peer if inbound else info.upstream_peer
        grpc = grpc_status(info) if info.grpc else None
        key: tuple[Any, ...]
        if config is None:
            key = (reporter, destination_service, destination_cluster, info.response_code,
                   info.flags_str, principal, peer, grpc)  # fmt: skip
        else:
            dims = config.evaluate(info) if config.expressions else ()
            key = (reporter, destination_service, destination_cluster, info.response_code,
                   info.flags_str, principal, peer, grpc, config.fingerprint, dims)  # fmt: skip
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = self._new_series(key, config)
        for s in series:
            s.add(info)

    def _new_series(
        self, key: tuple[Any, ...], config: StatsConfig | None
    ) -> tuple[_IstioSeries, ...]:
        labels = self._labels(*key[:8])
        if config is None:
            return (_IstioSeries(ISTIO_LABELS, labels, _ALL_METRICS),)
        dims = key[9]
        groups: dict[tuple[tuple[str, ...], tuple[str, ...]], list[bool]] = {}
        for i in range(len(_ALL_METRICS)):
            found = config.labels(i, ISTIO_LABELS, labels, dims)
            if found is not None:
                groups.setdefault(found, [False] * len(_ALL_METRICS))[i] = True
        return tuple(_IstioSeries(n, v, tuple(m)) for (n, v), m in groups.items())

    def _labels(
        self,
        reporter: str,
        service: str,
        cluster: str,
        code: int,
        flags: str,
        mtls_peer: str,
        peer: Peer | None,
        grpc: str | None,
    ) -> tuple[str, ...]:
        n = self.node
        local_principal = n.principal if mtls_peer else UNKNOWN
        local = (n.workload, n.canonical_service, n.canonical_revision, n.namespace,
                 local_principal, n.app, n.version)  # fmt: skip
        if peer is None:
            remote = (UNKNOWN,) * 4 + (mtls_peer or UNKNOWN,) + (UNKNOWN,) * 2
            peer_cluster = UNKNOWN
        else:
            remote = (peer.workload, peer.canonical_service, peer.canonical_revision,
                      peer.namespace, mtls_peer or UNKNOWN, peer.app, peer.version)  # fmt: skip
            peer_cluster = peer.cluster_id
        if reporter == "source":
            src, dst, security = local, remote, UNKNOWN
            src_cluster, dst_cluster = n.cluster_id, cluster or peer_cluster
        elif reporter == "destination":
            src, dst, security = remote, local, "mutual_tls" if mtls_peer else "none"
            src_cluster, dst_cluster = peer_cluster, cluster or n.cluster_id
        else:
            raise ValueError(f"reporter must be 'source' or 'destination', not {reporter!r}")
        # src/dst: workload, canonical service, canonical revision, namespace, principal, app,
        # version
        svc_name, svc_namespace = service_name_namespace(service)
        return (
            reporter,
            src[0], src[1], src[2], src[3], src[4], src[5], src[6], src_cluster,
            dst[0], dst[3], dst[4], dst[5], dst[6],
            service or UNKNOWN, dst[1], dst[2], svc_name, svc_namespace, dst_cluster,
            "http" if grpc is None else "grpc", str(code), grpc or "", flags, security,
        )  # fmt: skip

    def snapshot(self) -> list[dict[str, Any]]:
        merged: dict[tuple[tuple[str, ...], tuple[str, ...]], dict[str, Any]] = {}
        for group in self._series.values():
            for s in group:
                item = s.snapshot()
                # Different keys can give the same labels (e.g. "" and the local cluster id).
                key = (s.names, s.labels)
                prior = merged.get(key)
                merged[key] = item if prior is None else _merge_istio_item(prior, item)
        return list(merged.values())


# -- the store of one worker, snapshots, merging -----------------------------------------------


class StatsStore:
    """Every stat one worker process holds. Scopes are created on first use.

    Look scopes up when config is compiled and keep the reference; ``cluster()`` and
    ``http()`` are dict lookups, not for every request.
    """

    __slots__ = ("_clusters", "_http", "istio", "server", "tracing")

    def __init__(self, node: NodeInfo | None = None, *, concurrency: int = 1) -> None:
        self._clusters: dict[str, ClusterStats] = {}
        self._http: dict[str, HttpStats] = {}
        self.istio = IstioMetrics(node if node is not None else NodeInfo())
        self.server = ServerStats(live=1, state=ServerState.LIVE, concurrency=concurrency)
        self.tracing = TracingStats()

    def __repr__(self) -> str:
        return f"<StatsStore clusters={len(self._clusters)} http={len(self._http)}>"

    def cluster(self, name: str) -> ClusterStats:
        stats = self._clusters.get(name)
        if stats is None:
            stats = self._clusters[name] = ClusterStats()
        return stats

    def http(self, prefix: str) -> HttpStats:
        stats = self._http.get(prefix)
        if stats is None:
            stats = self._http[prefix] = HttpStats()
        return stats

    def snapshot(self) -> dict[str, Any]:
        """Plain data (dicts, lists, str, int, float) of every stat: picklable and JSON-able."""
        return {
            "server": self.server.snapshot(),
            "clusters": {name: s.snapshot() for name, s in self._clusters.items()},
            "http": {prefix: s.snapshot() for prefix, s in self._http.items()},
            "istio": self.istio.snapshot(),
            "tracing": self.tracing.snapshot(),
        }


def merge_snapshots(snaps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Fold worker snapshots into one: counters, activity gauges and histograms add up;
    state gauges (membership, ejections, server) take the maximum."""
    out: dict[str, Any] = {"server": _empty_scope(), "clusters": {}, "http": {}, "istio": []}
    out["tracing"] = _empty_scope()
    istio: dict[tuple[tuple[str, ...], tuple[str, ...]], dict[str, Any]] = {}
    for snap in snaps:
        _merge_scope(out["server"], snap.get("server", {}))
        _merge_scope(out["tracing"], snap.get("tracing", {}))
        for group in ("clusters", "http"):
            for name, scope in snap.get(group, {}).items():
                _merge_scope(out[group].setdefault(name, _empty_scope()), scope)
        for item in snap.get("istio", []):
            key = _istio_key(item)
            prior = istio.get(key)
            istio[key] = _copy_istio_item(item) if prior is None else _merge_istio_item(prior, item)
    out["istio"] = list(istio.values())
    return out


def _empty_scope() -> dict[str, Any]:
    return {COUNTER: {}, GAUGE: {}, STATE_GAUGE: {}, HISTOGRAM: {}}


def _merge_scope(into: dict[str, Any], scope: dict[str, Any]) -> None:
    for kind in (COUNTER, GAUGE, "codes"):
        if kind in scope:
            target = into.setdefault(kind, {})
            for name, value in scope[kind].items():
                target[name] = target.get(name, 0) + value
    states = into[STATE_GAUGE]
    for name, value in scope.get(STATE_GAUGE, {}).items():
        states[name] = max(states.get(name, value), value)
    hists = into[HISTOGRAM]
    for name, hist in scope.get(HISTOGRAM, {}).items():
        hists[name] = _merge_hist(hists[name], hist) if name in hists else _copy_hist(hist)


def _copy_hist(h: dict[str, Any]) -> dict[str, Any]:
    return {"counts": list(h["counts"]), "sum": h["sum"]}


def _merge_hist(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {"counts": [x + y for x, y in zip(a["counts"], b["counts"], strict=True)],
            "sum": a["sum"] + b["sum"]}  # fmt: skip


_ISTIO_HISTS: Final = (
    ("duration", ISTIO_DURATION),
    ("request_bytes", ISTIO_REQUEST_BYTES),
    ("response_bytes", ISTIO_RESPONSE_BYTES),
)


def _istio_key(item: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(item.get("names", ISTIO_LABELS)), tuple(item["labels"])


def _copy_istio_item(item: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in item.items() if k in ("labels", "names", "requests")}
    out["labels"] = list(item["labels"])
    out.update({key: _copy_hist(item[key]) for key, _ in _ISTIO_HISTS if key in item})
    return out


def _merge_istio_item(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two snapshots of one label set; a metric one of them lacks (dropped) is taken as is."""
    out = _copy_istio_item(a)
    if "requests" in b:
        out["requests"] = out.get("requests", 0) + b["requests"]
    for key, _ in _ISTIO_HISTS:
        if key in b:
            out[key] = _merge_hist(out[key], b[key]) if key in out else _copy_hist(b[key])
    return out


# -- rendering ---------------------------------------------------------------------------------

_XX: Final = re.compile(r"^(.*_rq)_([1-5])xx$")  # Envoy: response code class tag
_PROM_UNSAFE: Final = re.compile(r"[^a-zA-Z0-9_]")


def _prom_name(name: str) -> str:
    return _PROM_UNSAFE.sub("_", name)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)
    return f"{{{body}}}" if body else ""


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


_LE: Final = (*(_number(float(b)) for b in ENVOY_DEFAULT_BUCKETS), "+Inf")


class _Families:
    """Samples grouped by metric name: text format 0.0.4 wants each family in one block."""

    def __init__(self) -> None:
        self.types: dict[str, str] = {}
        self.lines: dict[str, list[str]] = {}

    def add(self, name: str, kind: str, labels: list[tuple[str, str]], value: float) -> None:
        self._family(name, kind).append(f"{name}{_labels(labels)} {_number(value)}")

    def add_histogram(self, name: str, labels: list[tuple[str, str]], hist: dict[str, Any]) -> None:
        lines = self._family(name, "histogram")
        cumulative = 0
        for le, n in zip(_LE, hist["counts"], strict=True):
            cumulative += n
            lines.append(f"{name}_bucket{_labels([*labels, ('le', le)])} {cumulative}")
        lines.append(f"{name}_sum{_labels(labels)} {_number(hist['sum'])}")
        lines.append(f"{name}_count{_labels(labels)} {cumulative}")

    def _family(self, name: str, kind: str) -> list[str]:
        self.types.setdefault(name, kind)
        return self.lines.setdefault(name, [])

    def render(self) -> str:
        out: list[str] = []
        for name in sorted(self.lines):
            out.append(f"# TYPE {name} {self.types[name]}")
            out.extend(self.lines[name])
        return "\n".join(out) + "\n" if out else ""


_PROM_KIND: Final = {COUNTER: "counter", GAUGE: "gauge", STATE_GAUGE: "gauge"}


def _render_scope(
    fam: _Families, prefix: str, tags: list[tuple[str, str]], scope: dict[str, Any]
) -> None:
    for kind, prom_kind in _PROM_KIND.items():
        for stat, value in scope.get(kind, {}).items():
            m = _XX.match(stat)
            if m:  # Envoy's tag extraction: upstream_rq_2xx -> upstream_rq_xx{class="2"}
                name = _prom_name(f"{prefix}_{m.group(1)}_xx")
                fam.add(name, prom_kind, [("envoy_response_code_class", m.group(2)), *tags], value)
            else:
                fam.add(_prom_name(f"{prefix}_{stat}"), prom_kind, tags, value)
    for code, value in scope.get("codes", {}).items():
        fam.add(f"{prefix}_upstream_rq", "counter", [("envoy_response_code", code), *tags], value)
    for stat, hist in scope.get(HISTOGRAM, {}).items():
        fam.add_histogram(_prom_name(f"{prefix}_{stat}"), tags, hist)


def render_prometheus(snap: dict[str, Any]) -> str:
    """Prometheus text format 0.0.4, named as Envoy's ``/stats/prometheus`` names stats.

    ``cluster.x.upstream_rq_total`` -> ``envoy_cluster_upstream_rq_total{envoy_cluster_name="x"}``,
    ``http.p.fault.aborts_injected`` ->
    ``envoy_http_fault_aborts_injected{envoy_http_conn_manager_prefix="p"}``; Istio's metrics
    keep their own names and labels.
    """
    fam = _Families()
    _render_scope(fam, "envoy_server", [], snap.get("server", {}))
    _render_scope(fam, "envoy_tracing_opentelemetry", [], snap.get("tracing", {}))
    for name in sorted(snap.get("clusters", {})):
        scope = snap["clusters"][name]
        _render_scope(fam, "envoy_cluster", [("envoy_cluster_name", name)], scope)
    for prefix in sorted(snap.get("http", {})):
        scope = snap["http"][prefix]
        _render_scope(fam, "envoy_http", [("envoy_http_conn_manager_prefix", prefix)], scope)
    for item in sorted(snap.get("istio", []), key=_istio_key):
        labels = list(zip(item.get("names", ISTIO_LABELS), item["labels"], strict=True))
        if "requests" in item:
            fam.add(ISTIO_REQUESTS, "counter", labels, item["requests"])
        for key, metric in _ISTIO_HISTS:
            if key in item:
                fam.add_histogram(metric, labels, item[key])
    return fam.render()


_QUANTILES: Final = (0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 1.0)


def _quantile(counts: Sequence[int], q: float) -> float:
    """Estimate a quantile from bucket counts, interpolating linearly inside a bucket."""
    total = sum(counts)
    rank = q * total
    cumulative = 0
    for i, n in enumerate(counts):
        if n and cumulative + n >= rank:
            lower = ENVOY_DEFAULT_BUCKETS[i - 1] if i > 0 else 0.0
            upper = ENVOY_DEFAULT_BUCKETS[i] if i < len(ENVOY_DEFAULT_BUCKETS) else lower
            return lower + (upper - lower) * max(rank - cumulative, 0) / n
        cumulative += n
    return ENVOY_DEFAULT_BUCKETS[-1]


def _text_histogram(hist: dict[str, Any]) -> str:
    counts = hist["counts"]
    if not any(counts):
        return "No recorded values"
    # Envoy prints (interval, cumulative) pairs; snapshots keep no interval, hence nan.
    return " ".join(f"P{q * 100:g}(nan,{_quantile(counts, q):g})" for q in _QUANTILES)


def render_text(snap: dict[str, Any]) -> str:
    """Envoy's plain ``/stats``: ``cluster.x.upstream_rq_total: 3`` lines sorted by name,
    then histograms as quantile summaries. Istio's metrics are only in the Prometheus form."""
    values: list[tuple[str, str]] = []
    hists: list[tuple[str, str]] = []

    def scope_lines(prefix: str, scope: dict[str, Any]) -> None:
        for kind in (COUNTER, GAUGE, STATE_GAUGE):
            values.extend((f"{prefix}.{k}", _number(v)) for k, v in scope.get(kind, {}).items())
        values.extend(
            (f"{prefix}.upstream_rq_{c}", str(v)) for c, v in scope.get("codes", {}).items()
        )
        hists.extend(
            (f"{prefix}.{k}", _text_histogram(h)) for k, h in scope.get(HISTOGRAM, {}).items()
        )

    scope_lines("server", snap.get("server", {}))
    scope_lines("tracing.opentelemetry", snap.get("tracing", {}))
    for name, scope in snap.get("clusters", {}).items():
        scope_lines(f"cluster.{name}", scope)
    for prefix, scope in snap.get("http", {}).items():
        scope_lines(f"http.{prefix}", scope)
    lines = [f"{k}: {v}" for k, v in sorted(values)] + [f"{k}: {v}" for k, v in sorted(hists)]
    return "\n".join(lines) + "\n" if lines else ""
