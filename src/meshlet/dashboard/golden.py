"""The golden signals the dashboard shows -- rate, errors, latency -- built from a
``MetricsSource``: the service graph, the workload and service tables, and time series.

Rules, Istio's and Kiali's:

* Inbound traffic is what the destination's sidecar reports (``reporter="destination"``), as
  ``linkerd viz stat`` and Kiali's workload pages count it; outbound traffic is what the
  source reports (``reporter="source"``).
* A graph edge is drawn from the destination's report when there is one, else from the
  source's: a destination without a sidecar, or a request that never reached it (503 UH, no
  healthy upstream), is only seen by the source. Edges run workload → service (the
  ``destination_service_name``) → workload, as Kiali's versioned-app graph draws them.
* Success is any answer but 5xx (``response_code`` 0, no answer at all, counts as success,
  as in Istio's dashboards' success rate); error rate = 5xx / all.
* Health uses Kiali's default thresholds for HTTP 5xx (kiali.io/docs/configuration/health:
  ``degraded: 0``, ``failure: 10`` percent): no 5xx healthy, any degraded, 10 % or more
  failing; no traffic idle.
* Latency quantiles come from the duration histogram's bucket increases over the same
  window and the same series, by ``histogram_quantile``.
"""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshlet.dashboard.metrics import (
    DURATION_BUCKETS,
    REQUESTS,
    MetricsSource,
    histogram_quantile,
    steps,
)

UNKNOWN = "unknown"
MUTUAL_TLS = "mutual_tls"
FAILING_ERROR_RATE = 0.1  # Kiali's default 5xx failure threshold, 10 %
POINTS = 60  # points per time series (a step of 15 s over 15 minutes)

#: The labels every graph and table query groups by.
FLOW_LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_app",
    "source_version",
    "destination_workload",
    "destination_workload_namespace",
    "destination_app",
    "destination_version",
    "destination_service_name",
    "destination_service_namespace",
    "response_code",
    "connection_security_policy",
)
_LATENCY_LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "destination_workload",
    "destination_workload_namespace",
    "destination_service_name",
    "destination_service_namespace",
    "le",
)


def health(rps: float, error_rate: float | None) -> str:
    """Kiali's request health for HTTP 5xx at its default thresholds (see the module doc)."""
    if rps <= 0:
        return "idle"
    if error_rate is not None and error_rate >= FAILING_ERROR_RATE:
        return "failing"
    if error_rate:
        return "degraded"
    return "healthy"


def is_error(code: str) -> bool:
    return code.startswith("5") and len(code) == 3


@dataclass(slots=True)
class Totals:
    """Requests and what became of them, with the latency buckets of the same requests."""

    requests: float = 0.0
    errors: float = 0.0
    mtls: float = 0.0
    groups: int = 0  # series groups seen (traffic or not)
    mtls_groups: int = 0
    buckets: dict[float, float] = field(default_factory=dict)
    codes: dict[str, float] = field(default_factory=dict)

    def add(self, labels: Mapping[str, str], value: float) -> None:
        self.requests += value
        self.groups += 1
        code = labels.get("response_code", "")
        self.codes[code] = self.codes.get(code, 0.0) + value
        if is_error(code):
            self.errors += value
        if labels.get("connection_security_policy") == MUTUAL_TLS:
            self.mtls += value
            self.mtls_groups += 1

    def add_bucket(self, le: str, value: float) -> None:
        bound = float(le)
        self.buckets[bound] = self.buckets.get(bound, 0.0) + value

    def rps(self, window: float) -> float:
        return self.requests / window if window > 0 else 0.0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests > 0 else 0.0

    @property
    def success_rate(self) -> float | None:
        return 1.0 - self.errors / self.requests if self.requests > 0 else None

    @property
    def mtls_ratio(self) -> float | None:
        return self.mtls / self.requests if self.requests > 0 else None

    @property
    def all_mtls(self) -> bool:
        if self.requests > 0:
            return self.mtls >= self.requests
        return self.groups > 0 and self.mtls_groups == self.groups

    def quantile(self, q: float) -> float | None:
        if not self.buckets:
            return None
        return histogram_quantile(q, self.buckets.items())


def _r(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


@dataclass(frozen=True, slots=True)
class Flow:
    """One group of series: its labels and its increase over the window."""

    labels: Mapping[str, str]
    value: float

    def get(self, name: str) -> str:
        return self.labels.get(name, "") or UNKNOWN

    @property
    def edge_key(self) -> tuple[str, ...]:
        return tuple(
            self.get(n)
            for n in (
                "source_workload",
                "source_workload_namespace",
                "destination_service_name",
                "destination_service_namespace",
                "destination_workload",
                "destination_workload_namespace",
            )
        )


def _flows(groups: Mapping[tuple[str, ...], list[float]], by: Sequence[str]) -> list[Flow]:
    return [Flow(dict(zip(by, key, strict=True)), values[0]) for key, values in groups.items()]


_SERVICE = ("destination_service_name", "destination_service_namespace")
_PAIR = (
    "source_workload",
    "source_workload_namespace",
    "destination_workload",
    "destination_workload_namespace",
)


def fill_services(
    flows: Sequence[Flow], more: Sequence[Flow] = ()
) -> tuple[list[Flow], list[Flow]]:
    """``flows`` and ``more``, where a destination's report that does not name the service
    (``destination_service_name="unknown"``: a sidecar that could not tell which service an
    inbound request was for) takes it from the source's report of the same workload pair,
    the service with the most requests. Both reports then describe one edge."""
    named: dict[tuple[str, ...], dict[tuple[str, str], float]] = defaultdict(dict)
    for f in flows:
        if f.labels.get("reporter") == "source" and f.get(_SERVICE[0]) != UNKNOWN:
            services = named[tuple(f.get(n) for n in _PAIR)]
            service = (f.get(_SERVICE[0]), f.get(_SERVICE[1]))
            services[service] = services.get(service, 0.0) + f.value
    if not named:
        return list(flows), list(more)

    def fill(group: Sequence[Flow]) -> list[Flow]:
        out = []
        for f in group:
            if f.labels.get("reporter") == "destination" and f.get(_SERVICE[0]) == UNKNOWN:
                services = named.get(tuple(f.get(n) for n in _PAIR))
                if services:
                    name, namespace = max(services, key=lambda k: (services[k], k))
                    f = Flow({**f.labels, _SERVICE[0]: name, _SERVICE[1]: namespace}, f.value)
            out.append(f)
        return out

    return fill(flows), fill(more)


def observed(flows: Iterable[Flow]) -> list[Flow]:
    """Each edge's flows from its destination's report if it has one, else its source's."""
    by_reporter: dict[tuple[str, ...], dict[str, list[Flow]]] = defaultdict(
        lambda: {"destination": [], "source": []}
    )
    for f in flows:
        reporter = f.labels.get("reporter", "")
        if reporter in ("destination", "source"):
            by_reporter[f.edge_key][reporter].append(f)
    out: list[Flow] = []
    for reports in by_reporter.values():
        out.extend(reports["destination"] or reports["source"])
    return out


def _workload_id(namespace: str, name: str) -> str:
    return f"workload:{namespace}/{name}"


def _service_id(namespace: str, name: str) -> str:
    return f"service:{namespace}/{name}"


class GoldenSignals:
    """The dashboard's metric queries over ``source``; ``known`` lists workloads that run
    (namespace, name, app, version), so idle ones are listed too."""

    def __init__(
        self,
        source: MetricsSource,
        known: Callable[[], Iterable[tuple[str, str, str, str]]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.source = source
        self.known: Callable[[], Iterable[tuple[str, str, str, str]]] = known or list
        self.clock = clock

    async def _window(self, window: float, at: float) -> tuple[list[Flow], list[Flow]]:
        requests = await self.source.increase(
            REQUESTS, by=FLOW_LABELS, match={}, window=window, at=[at]
        )
        latency = await self.source.increase(
            DURATION_BUCKETS, by=_LATENCY_LABELS, match={}, window=window, at=[at]
        )
        flows, buckets = fill_services(
            _flows(requests, FLOW_LABELS), _flows(latency, _LATENCY_LABELS)
        )
        return flows, buckets

    # -- the graph ---------------------------------------------------------------------------

    async def graph(self, window: float = 60.0) -> dict[str, Any]:
        flows, latency = await self._window(window, self.clock())
        chosen = observed(flows)
        chosen_reporter = {f.edge_key: f.labels.get("reporter") for f in chosen}
        nodes: dict[str, dict[str, Any]] = {}
        edges: dict[tuple[str, str], Totals] = defaultdict(Totals)
        inbound: dict[str, Totals] = defaultdict(Totals)
        outbound: dict[str, Totals] = defaultdict(Totals)
        hops: dict[tuple[str, ...], list[tuple[str, str]]] = {}

        def node(kind: str, namespace: str, name: str, app: str = "", version: str = "") -> str:
            if kind == UNKNOWN:
                node_id = UNKNOWN
                namespace = name = ""
            elif kind == "workload":
                node_id = _workload_id(namespace, name)
            else:
                node_id = _service_id(namespace, name)
            entry = nodes.setdefault(
                node_id,
                {"id": node_id, "kind": kind, "namespace": namespace, "name": name,
                 "app": "", "version": ""},
            )  # fmt: skip
            if app and app != UNKNOWN and not entry["app"]:
                entry["app"] = app
            if version and version != UNKNOWN and not entry["version"]:
                entry["version"] = version
            return node_id

        for f in chosen:
            source_id = (
                UNKNOWN
                if f.get("source_workload") == UNKNOWN
                else node(
                    "workload",
                    f.get("source_workload_namespace"),
                    f.get("source_workload"),
                    f.get("source_app"),
                    f.get("source_version"),
                )
            )
            if source_id == UNKNOWN:
                node(UNKNOWN, "", "")
            path = [source_id]
            if f.get("destination_service_name") != UNKNOWN:
                path.append(
                    node(
                        "service",
                        f.get("destination_service_namespace"),
                        f.get("destination_service_name"),
                        f.get("destination_app"),
                    )
                )
            if f.get("destination_workload") != UNKNOWN:
                path.append(
                    node(
                        "workload",
                        f.get("destination_workload_namespace"),
                        f.get("destination_workload"),
                        f.get("destination_app"),
                        f.get("destination_version"),
                    )
                )
            if len(path) == 1:
                path.append(node(UNKNOWN, "", ""))
            pairs = list(itertools.pairwise(path))
            hops[f.edge_key] = pairs
            for pair in pairs:
                edges[pair].add(f.labels, f.value)
                inbound[pair[1]].add(f.labels, f.value)
                outbound[pair[0]].add(f.labels, f.value)
        for b in latency:
            if b.labels.get("reporter") != chosen_reporter.get(b.edge_key):
                continue
            for pair in hops.get(b.edge_key, ()):
                edges[pair].add_bucket(b.labels["le"], b.value)

        node_rows = []
        for node_id, entry in sorted(nodes.items()):
            totals = inbound.get(node_id)
            if totals is None or totals.requests <= 0:
                totals = outbound.get(node_id) or Totals()  # a gateway, a client: its outbound
            rps = totals.rps(window)
            node_rows.append(
                {
                    **entry,
                    "rps": _r(rps),
                    "error_rate": _r(totals.error_rate),
                    "health": health(rps, totals.error_rate),
                }
            )
        edge_rows = []
        for (source_id, target_id), totals in sorted(edges.items()):
            rps = totals.rps(window)
            edge_rows.append(
                {
                    "source": source_id,
                    "target": target_id,
                    "rps": _r(rps),
                    "error_rate": _r(totals.error_rate),
                    "p50_ms": _r(totals.quantile(0.5), 3),
                    "p99_ms": _r(totals.quantile(0.99), 3),
                    "mtls": totals.all_mtls,
                    "health": health(rps, totals.error_rate),
                    "protocol": "http",
                }
            )
        return {"window_s": window, "nodes": node_rows, "edges": edge_rows}

    # -- tables ------------------------------------------------------------------------------

    async def workloads(self, window: float = 60.0) -> dict[str, Any]:
        flows, latency = await self._window(window, self.clock())
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        inbound: dict[tuple[str, str], Totals] = defaultdict(Totals)
        outbound: dict[tuple[str, str], Totals] = defaultdict(Totals)

        def row(namespace: str, name: str, app: str, version: str) -> None:
            entry = rows.setdefault(
                (namespace, name),
                {"namespace": namespace, "name": name, "app": "", "version": ""},
            )
            if app and app != UNKNOWN and not entry["app"]:
                entry["app"] = app
            if version and version != UNKNOWN and not entry["version"]:
                entry["version"] = version

        for known in self.known():
            row(*known)
        for f in flows:
            reporter = f.labels.get("reporter")
            if reporter == "destination" and f.get("destination_workload") != UNKNOWN:
                key = (f.get("destination_workload_namespace"), f.get("destination_workload"))
                row(*key, f.get("destination_app"), f.get("destination_version"))
                inbound[key].add(f.labels, f.value)
            elif reporter == "source" and f.get("source_workload") != UNKNOWN:
                key = (f.get("source_workload_namespace"), f.get("source_workload"))
                row(*key, f.get("source_app"), f.get("source_version"))
                outbound[key].add(f.labels, f.value)
        for b in latency:
            if b.labels.get("reporter") == "destination":
                key = (b.get("destination_workload_namespace"), b.get("destination_workload"))
                if key in inbound:
                    inbound[key].add_bucket(b.labels["le"], b.value)
        return {
            "window_s": window,
            "rows": _sorted(
                _table_row(entry, inbound.get(key) or Totals(), outbound.get(key), window)
                for key, entry in rows.items()
            ),
        }

    async def services(self, window: float = 60.0) -> dict[str, Any]:
        flows, latency = await self._window(window, self.clock())
        by_reporter: dict[str, dict[tuple[str, str], Totals]] = {
            "destination": defaultdict(Totals),
            "source": defaultdict(Totals),
        }
        apps: dict[tuple[str, str], set[str]] = defaultdict(set)
        versions: dict[tuple[str, str], set[str]] = defaultdict(set)
        for f in flows:
            reporter = f.labels.get("reporter", "")
            if reporter not in by_reporter or f.get("destination_service_name") == UNKNOWN:
                continue
            key = (f.get("destination_service_namespace"), f.get("destination_service_name"))
            by_reporter[reporter][key].add(f.labels, f.value)
            if f.get("destination_app") != UNKNOWN:
                apps[key].add(f.get("destination_app"))
            if f.get("destination_version") != UNKNOWN:
                versions[key].add(f.get("destination_version"))
        chosen: dict[tuple[str, str], tuple[str, Totals]] = {}
        for key, totals in by_reporter["source"].items():
            chosen[key] = ("source", totals)
        for key, totals in by_reporter["destination"].items():
            chosen[key] = ("destination", totals)  # the destination's report wins
        for b in latency:
            key = (b.get("destination_service_namespace"), b.get("destination_service_name"))
            if key in chosen and b.labels.get("reporter") == chosen[key][0]:
                chosen[key][1].add_bucket(b.labels["le"], b.value)
        rows = []
        for key, (_, totals) in chosen.items():
            entry = {
                "namespace": key[0],
                "name": key[1],
                "app": ",".join(sorted(apps[key])),
                "version": ",".join(sorted(versions[key])),
            }
            rows.append(_table_row(entry, totals, None, window))
        return {"window_s": window, "rows": _sorted(rows)}

    # -- time series -------------------------------------------------------------------------

    async def metrics(
        self, kind: str, namespace: str, name: str, minutes: float = 15.0
    ) -> dict[str, Any]:
        interval = self.source.interval
        step = max(interval, round(minutes * 60 / POINTS))
        window = max(step, 2 * interval)
        at = steps(self.clock(), minutes, step)
        if kind == "service":
            inbound_match = {
                "reporter": "destination",
                "destination_service_name": name,
                "destination_service_namespace": namespace,
            }
            outbound_match: dict[str, str] | None = None
        else:
            inbound_match = {
                "reporter": "destination",
                "destination_workload": name,
                "destination_workload_namespace": namespace,
            }
            outbound_match = {
                "reporter": "source",
                "source_workload": name,
                "source_workload_namespace": namespace,
            }
        inbound, by_code = await self._points(inbound_match, window, at)
        if kind == "service" and not by_code:
            # No destination report names the service (see ``fill_services``): its clients'.
            inbound_match = {**inbound_match, "reporter": "source"}
            inbound, by_code = await self._points(inbound_match, window, at)
        outbound: list[dict[str, Any]] = []
        if outbound_match is not None:
            outbound, _ = await self._points(outbound_match, window, at)
        return {"step_s": step, "inbound": inbound, "outbound": outbound, "by_code": by_code}

    async def _points(
        self, match: Mapping[str, str], window: float, at: Sequence[float]
    ) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
        codes = await self.source.increase(
            REQUESTS, by=("response_code",), match=match, window=window, at=at
        )
        buckets = await self.source.increase(
            DURATION_BUCKETS, by=("le",), match=match, window=window, at=at
        )
        points = []
        for i, t in enumerate(at):
            totals = Totals()
            for (code,), values in codes.items():
                totals.add({"response_code": code}, values[i])
            for (le,), values in buckets.items():
                totals.add_bucket(le, values[i])
            rps = totals.rps(window)
            points.append(
                {
                    "t": round(t, 3),
                    "rps": _r(rps),
                    "success_rate": _r(totals.success_rate),
                    "p50_ms": _r(totals.quantile(0.5), 3),
                    "p90_ms": _r(totals.quantile(0.9), 3),
                    "p99_ms": _r(totals.quantile(0.99), 3),
                }
            )
        by_code = {
            code: [{"t": round(t, 3), "rps": _r(values[i] / window)} for i, t in enumerate(at)]
            for (code,), values in sorted(codes.items())
        }
        return points, by_code


def _table_row(
    entry: Mapping[str, Any], inbound: Totals, outbound: Totals | None, window: float
) -> dict[str, Any]:
    return {
        **entry,
        "rps": _r(inbound.rps(window)),
        "success_rate": _r(inbound.success_rate),
        "p50_ms": _r(inbound.quantile(0.5), 3) if inbound.requests > 0 else None,
        "p90_ms": _r(inbound.quantile(0.9), 3) if inbound.requests > 0 else None,
        "p99_ms": _r(inbound.quantile(0.99), 3) if inbound.requests > 0 else None,
        "requests": round(inbound.requests),
        "outbound_rps": _r(outbound.rps(window) if outbound is not None else 0.0),
        "mtls_ratio": _r(inbound.mtls_ratio),
    }


def _sorted(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (-(r["rps"] or 0.0), r["namespace"], r["name"]))
