"""``meshlet stat``, ``top``, ``dashboard`` and ``prometheus-config``: the mesh's golden metrics
(success rate, requests per second, latency) on the command line, as ``linkerd viz stat`` and
``linkerd viz top`` show them, and the wiring a real Prometheus needs to scrape the mesh.

Two sources give the same rows (``StatRow``), sorted by rps:

* the running mesh's dashboard API (``GET /api/workloads`` and ``/api/services``), whose address
  is the ``dashboard`` key of ``<state dir>/mesh.json`` (default state dir ``.meshlet``; else the
  control plane at ``--server``/``$MESHLET_SERVER`` says where its state dir is);
* a real Prometheus (``--prometheus URL``), asked through its HTTP API (``/api/v1/query``) with
  PromQL over Istio's standard metrics, from the server side (``reporter="destination"``) as
  Istio's Grafana workload and service dashboards do: success = non-5xx responses
  (``response_code!~"5.."``), latencies from ``istio_request_duration_milliseconds_bucket``
  with ``histogram_quantile``. A service that no server's report names is counted from its
  clients' reports, as the dashboard's service table does.

Rules kept: the pure parts (window parsing, PromQL building, turning query results into rows,
number formatting, the table and the ``top`` screen) take and return values and are tested
without sockets; the I/O around them only fetches JSON. Every error says what to do next.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, Literal, Protocol

import yaml

from meshlet.cli.config import DEFAULT_SERVER, SERVER_ENV, ControlClient, server_option, table
from meshlet.cli.mesh import DEFAULT_STATE_DIR
from meshlet.errors import MeshletError

Kind = Literal["workload", "service"]

#: ``meshlet.runtime.daemon.MESH_FILE`` (not imported: it would load the whole daemon).
MESH_FILE: Final = "mesh.json"
DEFAULT_WINDOW: Final = "1m"
TOP_INTERVAL_S: Final = 2.0  # between ``top``'s redraws, as ``linkerd viz top``
#: The generated job's scrape and target refresh interval: short, so that a 1m rate has
#: several samples (rate needs two) and new pods are scraped within seconds.
SCRAPE_INTERVAL: Final = "5s"
#: The Envoy/Istio sidecar's Prometheus endpoint (pod IP:15090, as Istio's `envoy-stats` job).
METRICS_PATH: Final = "/stats/prometheus"
_TIMEOUT: Final = 10.0

_KINDS: Final[dict[str, Kind]] = {
    "deploy": "workload",
    "deployment": "workload",
    "deployments": "workload",
    "workload": "workload",
    "workloads": "workload",
    "svc": "service",
    "service": "service",
    "services": "service",
}


# -- values -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class StatRow:
    """One workload's (or service's) inbound golden metrics over the window (CONTRACT §5 row)."""

    namespace: str
    name: str
    app: str = ""
    version: str = ""
    rps: float = 0.0
    success_rate: float | None = None  # 0..1; None when no request arrived in the window
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    requests: float = 0.0
    outbound_rps: float = 0.0
    mtls_ratio: float | None = None

    @classmethod
    def from_api(cls, row: Mapping[str, Any]) -> StatRow:
        """A row of the dashboard's ``/api/workloads`` or ``/api/services`` answer."""
        return cls(
            namespace=str(row.get("namespace") or ""),
            name=str(row.get("name") or ""),
            app=str(row.get("app") or ""),
            version=str(row.get("version") or ""),
            rps=_number(row.get("rps")) or 0.0,
            success_rate=_number(row.get("success_rate")),
            p50_ms=_number(row.get("p50_ms")),
            p90_ms=_number(row.get("p90_ms")),
            p99_ms=_number(row.get("p99_ms")),
            requests=_number(row.get("requests")) or 0.0,
            outbound_rps=_number(row.get("outbound_rps")) or 0.0,
            mtls_ratio=_number(row.get("mtls_ratio")),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _number(value: Any) -> float | None:
    """A finite float, or None (null, NaN, +Inf and anything unparsable)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def sort_rows(rows: Sequence[StatRow]) -> list[StatRow]:
    """Busiest first (inbound rps, then outbound), then by namespace and name."""
    return sorted(rows, key=lambda r: (-r.rps, -r.outbound_rps, r.namespace, r.name))


_WINDOW = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_S: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_window(text: str) -> int:
    """``--window``: ``30s``, ``1m``, ``5m``, ``1h`` or plain seconds, as whole seconds (≥ 1)."""
    match = _WINDOW.match(text)
    seconds = float(match.group(1)) * _UNIT_S[match.group(2) or "s"] if match else 0.0
    if seconds < 1:
        raise MeshletError(f"--window {text!r} is not a duration of 1s or more (e.g. 30s, 1m, 5m)")
    return round(seconds)


def window_text(seconds: int) -> str:
    """``60`` → ``1m``, ``90`` → ``90s``, ``3600`` → ``1h``."""
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"


# -- formatting ---------------------------------------------------------------------------------


def format_rps(rps: float) -> str:
    """``0``, ``0.25rps``, ``2.03rps``, ``12.5rps``, ``1234rps``: 2 decimals when small."""
    if rps <= 0:
        return "0rps"
    if rps < 10:
        return f"{rps:.2f}rps"
    if rps < 100:
        return f"{rps:.1f}rps"
    return f"{rps:.0f}rps"


def format_percent(ratio: float | None) -> str:
    """``100.00%``, ``97.50%``; ``-`` when there is nothing to divide (linkerd's look)."""
    return "-" if ratio is None else f"{ratio * 100:.2f}%"


def format_ms(ms: float | None) -> str:
    """``0.8ms``, ``12ms``, ``1250ms``; ``-`` when no request was measured."""
    if ms is None:
        return "-"
    if ms < 10:
        return f"{ms:.1f}ms"
    return f"{ms:.0f}ms"


def stat_table(
    rows: Sequence[StatRow], *, kind: Kind, all_namespaces: bool = False, wide: bool = False
) -> str:
    """``linkerd viz stat``'s columns: NAME, SUCCESS, RPS, LATENCY_P50, LATENCY_P99; wide adds
    app and version (workloads), P90, the requests in the window, outbound rps and the share of
    inbound requests over mutual TLS."""
    columns: list[tuple[str, Any]] = [("NAME", lambda r: r.name)]
    if all_namespaces:
        columns.insert(0, ("NAMESPACE", lambda r: r.namespace))
    if wide and kind == "workload":
        columns += [("APP", lambda r: r.app or "-"), ("VERSION", lambda r: r.version or "-")]
    columns += [
        ("SUCCESS", lambda r: format_percent(r.success_rate)),
        ("RPS", lambda r: format_rps(r.rps)),
        ("LATENCY_P50", lambda r: format_ms(r.p50_ms)),
    ]
    if wide:
        columns.append(("LATENCY_P90", lambda r: format_ms(r.p90_ms)))
    columns.append(("LATENCY_P99", lambda r: format_ms(r.p99_ms)))
    if wide:
        columns += [
            ("REQUESTS", lambda r: f"{r.requests:.0f}"),
            ("OUTBOUND_RPS", lambda r: format_rps(r.outbound_rps)),
            ("MTLS", lambda r: format_percent(r.mtls_ratio)),
        ]
    return table([h for h, _ in columns], [[str(cell(r)) for _, cell in columns] for r in rows])


def top_screen(
    rows: Sequence[StatRow] | None,
    *,
    kind: Kind,
    namespace: str | None,
    window_s: int,
    source: str,
    clock: str,
    error: str = "",
    wide: bool = False,
) -> str:
    """What ``meshlet top`` draws each time: a title line naming what, over which window and
    from where, then the table (or the last error, if the source did not answer)."""
    what = "workloads" if kind == "workload" else "services"
    where = "all namespaces" if namespace is None else f"namespace {namespace}"
    lines = [
        f"meshlet top: {what} in {where}, last {window_text(window_s)}, by rps"
        f"   source: {source}   {clock}",
        "",
    ]
    if error:
        lines.append(f"error: {error}")
    elif not rows:
        lines.append(f"no traffic to {what} in {where} in the last {window_text(window_s)}")
    else:
        lines.append(stat_table(rows, kind=kind, all_namespaces=namespace is None, wide=wide))
    lines += ["", "Ctrl-C to quit"]
    return "\n".join(lines)


# -- PromQL ---------------------------------------------------------------------------------------

REQUESTS: Final = "istio_requests_total"
DURATION_BUCKET: Final = "istio_request_duration_milliseconds_bucket"

#: The labels naming a row: (namespace label, name label), on the reporter="destination" side.
_ROW_LABELS: Final[dict[Kind, tuple[str, str]]] = {
    "workload": ("destination_workload_namespace", "destination_workload"),
    "service": ("destination_service_namespace", "destination_service_name"),
}
_QUANTILES: Final = (("p50_ms", 0.5), ("p90_ms", 0.9), ("p99_ms", 0.99))


def promql_string(value: str) -> str:
    """A PromQL double-quoted string literal (Go escaping of ``\\`` and ``"``)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def promql_queries(kind: Kind, namespace: str | None, window_s: int) -> dict[str, str]:
    """The instant queries ``stat --prometheus`` sends, by what each answers.

    Inbound traffic as the server's sidecar saw it (``reporter="destination"``), grouped by the
    destination workload (or service) and its namespace; the success rate is non-5xx over all,
    as Istio's Grafana dashboards compute it. For workloads, ``outbound_rps`` comes from the
    client side (``reporter="source"``), so that a gateway, which only sends, is listed too.

    A service is counted from its destinations' reports where they name it, else from its
    clients' (``reporter="source"``): a destination without a sidecar, or a sidecar that
    could not tell which service a request was for (``destination_service_name="unknown"``),
    leaves only the clients' view — as the dashboard's service table does. Each query makes
    that choice per service the same way (``or ... unless on (...)``), so ratios stay within
    one report.
    """
    ns_label, name_label = _ROW_LABELS[kind]
    scope = "" if namespace is None else f",{ns_label}={promql_string(namespace)}"
    by = f"{ns_label}, {name_label}"
    window = f"[{window_s}s]"
    labelled = f"{by}, destination_app, destination_version" if kind == "workload" else by

    def rate(metric: str, match: str, extra: str = "", group: str = by) -> str:
        return f"sum by ({group}) (rate({metric}{{{match}{extra}}}{window}))"

    def increase(match: str) -> str:
        return f"sum by ({by}) (increase({REQUESTS}{{{match}}}{window}))"

    expressions: dict[str, Any] = {
        "rps": lambda m: rate(REQUESTS, m, group=labelled),
        "ok_rps": lambda m: rate(REQUESTS, m, ',response_code!~"5.."'),
        "requests": increase,
    }
    for key, _ in _QUANTILES:  # wrapped in histogram_quantile below
        expressions[key] = lambda m: rate(DURATION_BUCKET, m, group=f"{by}, le")

    destination = f'reporter="destination"{scope}'
    if kind == "workload":
        queries = {key: expr(destination) for key, expr in expressions.items()}
        source = 'reporter="source"'
        if namespace is not None:
            source += f",source_workload_namespace={promql_string(namespace)}"
        queries["outbound_rps"] = (
            f"sum by (source_workload_namespace, source_workload) "
            f"(rate({REQUESTS}{{{source}}}{window}))"
        )
    else:
        named = f',{name_label}!="unknown"{scope}'
        destination, source = f'reporter="destination"{named}', f'reporter="source"{named}'
        reported = rate(REQUESTS, destination)
        queries = {
            key: f"({expr(destination)}) or (({expr(source)}) unless on ({by}) ({reported}))"
            for key, expr in expressions.items()
        }
    # Only a destination knows whether its caller spoke mutual TLS (the source reports
    # connection_security_policy="unknown"); "or 0 * all" gives 0 for plaintext, and no sample
    # (no ratio) where no destination reported.
    mtls = rate(REQUESTS, destination, ',connection_security_policy="mutual_tls"')
    queries["mtls_rps"] = f"({mtls}) or (0 * {rate(REQUESTS, destination)})"
    for key, q in _QUANTILES:
        queries[key] = f"histogram_quantile({q:g}, {queries[key]})"
    return queries


def rows_from_prometheus(
    kind: Kind, results: Mapping[str, Sequence[Mapping[str, Any]]]
) -> list[StatRow]:
    """Rows from the ``data.result`` vectors of ``promql_queries``' answers, sorted by rps."""
    ns_label, name_label = _ROW_LABELS[kind]
    fields: dict[tuple[str, str], dict[str, Any]] = {}

    def row(namespace: str, name: str) -> dict[str, Any]:
        return fields.setdefault((namespace, name), {"namespace": namespace, "name": name})

    def samples(key: str, labels: tuple[str, str]) -> list[tuple[dict[str, Any], float | None]]:
        """(the row a sample names, its value) for each sample of one query."""
        out = []
        for sample in results.get(key, ()):
            metric = sample.get("metric") or {}
            ns, name = str(metric.get(labels[0], "")), str(metric.get(labels[1], ""))
            if name:
                r = row(ns, name)
                for label, field in (
                    ("destination_app", "app"),
                    ("destination_version", "version"),
                ):
                    if metric.get(label) and metric[label] != "unknown":
                        r[field] = str(metric[label])
                out.append((r, _number((sample.get("value") or (None, None))[1])))
        return out

    for r, value in samples("rps", (ns_label, name_label)):
        r["rps"] = r.get("rps", 0.0) + (value or 0.0)  # summed over app/version series
    for key in ("ok_rps", "mtls_rps", "requests", "p50_ms", "p90_ms", "p99_ms"):
        for r, value in samples(key, (ns_label, name_label)):
            r[key] = value
    for r, value in samples("outbound_rps", ("source_workload_namespace", "source_workload")):
        r["outbound_rps"] = r.get("outbound_rps", 0.0) + (value or 0.0)

    rows = []
    for r in fields.values():
        rps = float(r.get("rps") or 0.0)
        requests = float(r.get("requests") or 0.0)
        # No request in the window: no success rate, no latency (histogram_quantile gives NaN).
        served = rps > 0 or requests > 0
        ok, mtls = r.get("ok_rps"), r.get("mtls_rps")
        rows.append(
            StatRow(
                namespace=r["namespace"],
                name=r["name"],
                app=r.get("app", ""),
                version=r.get("version", ""),
                rps=rps,
                success_rate=min(1.0, (ok or 0.0) / rps) if rps > 0 else None,
                p50_ms=r.get("p50_ms") if served else None,
                p90_ms=r.get("p90_ms") if served else None,
                p99_ms=r.get("p99_ms") if served else None,
                requests=requests,
                outbound_rps=float(r.get("outbound_rps") or 0.0),
                mtls_ratio=min(1.0, mtls / rps) if rps > 0 and mtls is not None else None,
            )
        )
    return sort_rows(rows)


# -- fetching JSON --------------------------------------------------------------------------------


class _Unreachable(MeshletError):
    """Nothing answered at the address (refused, timed out, not HTTP); ``reason`` says why."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def get_json(url: str, *, what: str, direct: bool = True) -> Any:
    """GET ``url`` and decode its JSON. ``direct`` bypasses ``$HTTP_PROXY`` (loopback
    addresses of the mesh itself). Raises ``_Unreachable`` when nothing answers and
    ``MeshletError`` for an error status or a body that is not JSON."""
    # Imported here: urllib.request pulls in http.client and email (see cli/config.py).
    import urllib.error
    import urllib.request

    handlers = [urllib.request.ProxyHandler({})] if direct else []
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(url, timeout=_TIMEOUT) as r:
            body = r.read()
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace").strip()
        with contextlib.suppress(ValueError):
            answer = json.loads(detail)
            if isinstance(answer, dict):
                detail = str(answer.get("error") or answer.get("message") or detail)
        raise MeshletError(f"{what} answered {e.code} for {url}: {detail[:300]}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = str(getattr(e, "reason", e))
        raise _Unreachable(f"cannot reach {what} at {url} ({reason})", reason) from None
    try:
        return json.loads(body)
    except ValueError:
        raise MeshletError(f"{what} at {url} did not answer JSON") from None


# -- where the running mesh is ------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RunningMesh:
    """The mesh a command talks to: its state dir and its dashboard's URL (no trailing /)."""

    state_dir: Path
    dashboard: str


def _no_mesh(state_dir: Path) -> MeshletError:
    return MeshletError(
        f"no mesh running in {state_dir} — start one with `meshlet up -f FILE` or `meshlet demo`"
        " (or pass --state-dir DIR of a running mesh)"
    )


def read_mesh_file(state_dir: Path) -> dict[str, Any] | None:
    """``<state dir>/mesh.json`` (written by the mesh daemon while it runs), or None."""
    try:
        data = json.loads((state_dir / MESH_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def find_mesh(state_dir: Path | None, server: str | None) -> RunningMesh:
    """The running mesh: ``--state-dir``'s mesh.json; without the flag, ``.meshlet``'s, else the
    state dir the control plane (``--server``, ``$MESHLET_SERVER``, the default) reports."""
    candidates = [state_dir] if state_dir is not None else [DEFAULT_STATE_DIR]
    info = read_mesh_file(candidates[0])
    if info is None and state_dir is None:
        url = server or os.environ.get(SERVER_ENV) or DEFAULT_SERVER
        try:
            summary = ControlClient(url).request("GET", "/runtime")
        except MeshletError:
            summary = None
        if isinstance(summary, dict) and summary.get("state_dir"):
            candidates.append(Path(str(summary["state_dir"])))
            info = read_mesh_file(candidates[-1])
            if info is not None and not info.get("dashboard") and summary.get("dashboard"):
                info["dashboard"] = summary["dashboard"]
    where = candidates[-1]
    if info is None:
        raise _no_mesh(where)
    dashboard = str(info.get("dashboard") or "").rstrip("/")
    if not dashboard:
        raise MeshletError(
            f"the mesh running in {where} serves no dashboard (started with --dashboard-port 0,"
            " or by an older meshlet): restart it (`meshlet down`, then `meshlet up` or"
            " `meshlet demo`) with a --dashboard-port"
        )
    return RunningMesh(state_dir=where, dashboard=dashboard)


def _dashboard_json(mesh: RunningMesh, path: str) -> Any:
    try:
        return get_json(mesh.dashboard + path, what="the mesh's dashboard")
    except _Unreachable as e:
        raise MeshletError(
            f"{e}: the mesh in {mesh.state_dir} is not answering — see `meshlet status`,"
            " or start it again with `meshlet up`"
        ) from None


# -- sources --------------------------------------------------------------------------------------


class StatSource(Protocol):
    """Where ``stat`` and ``top`` read their rows. Both methods raise ``MeshletError`` with the
    next step when the source cannot answer."""

    def rows(self, kind: Kind, namespace: str | None, window_s: int) -> list[StatRow]:
        """Rows in ``namespace`` (None: all), over the last ``window_s`` seconds, by rps."""
        ...

    def describe(self) -> str:
        """Where the numbers come from, in a few words (for ``top``'s title)."""
        ...


class DashboardSource:
    """The running mesh's dashboard API (``/api/workloads``, ``/api/services``)."""

    def __init__(self, mesh: RunningMesh) -> None:
        self.mesh = mesh

    def __repr__(self) -> str:
        return f"<DashboardSource {self.mesh.dashboard}>"

    def rows(self, kind: Kind, namespace: str | None, window_s: int) -> list[StatRow]:
        path = "/api/workloads" if kind == "workload" else "/api/services"
        answer = _dashboard_json(self.mesh, f"{path}?window={window_s}")
        rows = [StatRow.from_api(r) for r in (answer or {}).get("rows") or []]
        return sort_rows([r for r in rows if namespace is None or r.namespace == namespace])

    def describe(self) -> str:
        summary = _dashboard_json(self.mesh, "/api/summary") or {}
        if summary.get("source") == "prometheus" and summary.get("prometheus_url"):
            return f"prometheus {summary['prometheus_url']} via {self.mesh.dashboard}"
        return f"embedded metrics via {self.mesh.dashboard}"


class PrometheusSource:
    """A Prometheus server's HTTP API (``GET /api/v1/query``), with ``promql_queries``."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def __repr__(self) -> str:
        return f"<PrometheusSource {self.url}>"

    def query(self, promql: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's vector (``data.result``), evaluated at ``at`` (unix seconds;
        default: Prometheus's now)."""
        import urllib.parse

        params = {"query": promql} | ({} if at is None else {"time": f"{at:.3f}"})
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode(params)
        try:
            answer = get_json(url, what="Prometheus", direct=False)
        except _Unreachable as e:
            raise MeshletError(
                f"cannot reach Prometheus at {self.url} ({e.reason}): is it running there?"
                " check --prometheus URL"
            ) from None
        if not isinstance(answer, dict) or answer.get("status") != "success":
            error = answer.get("error") if isinstance(answer, dict) else answer
            raise MeshletError(f"Prometheus refused {promql!r}: {error}")
        result = (answer.get("data") or {}).get("result") or []
        return list(result) if isinstance(result, list) else []

    def rows(self, kind: Kind, namespace: str | None, window_s: int) -> list[StatRow]:
        queries = promql_queries(kind, namespace, window_s)
        # One evaluation time for every query: rate() extrapolates to the window's edges, so
        # ratios of queries evaluated a moment apart (success, mTLS) would not quite agree.
        at = time.time()
        return rows_from_prometheus(kind, {k: self.query(q, at) for k, q in queries.items()})

    def describe(self) -> str:
        return f"prometheus {self.url}"


# -- commands -------------------------------------------------------------------------------------


def register(commands: Any) -> None:
    server = server_option()
    state = argparse.ArgumentParser(add_help=False)
    state.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="the running mesh's state dir (default .meshlet, else the one the control plane at"
        " --server reports)",
    )
    stats = argparse.ArgumentParser(add_help=False)
    stats.add_argument(
        "kind",
        nargs="?",
        default="deploy",
        choices=sorted(_KINDS),
        metavar="deploy|svc",
        help="workloads (deploy, the default) or services (svc)",
    )
    where = stats.add_mutually_exclusive_group()
    where.add_argument("-n", "--namespace", default="default", help="default: default")
    where.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")
    stats.add_argument(
        "--window",
        default=DEFAULT_WINDOW,
        metavar="DURATION",
        help=f"the time window the numbers cover, e.g. 30s, 1m, 5m (default {DEFAULT_WINDOW})",
    )
    stats.add_argument(
        "--prometheus",
        metavar="URL",
        help="ask this Prometheus (PromQL over istio_requests_total) instead of the mesh",
    )

    p = commands.add_parser(
        "stat",
        parents=[server, state, stats],
        help="success rate, rps and latency of each workload or service",
        description="Golden metrics of inbound traffic, busiest first (like `linkerd viz stat`).",
    )
    p.add_argument("-o", "--output", choices=("wide", "json", "yaml"), help="output format")
    p.set_defaults(run=run_stat)

    p = commands.add_parser(
        "top",
        parents=[server, state, stats],
        help="the stat table, live",
        description="The `meshlet stat` table, redrawn every 2 s, busiest first; Ctrl-C quits.",
    )
    p.add_argument("-o", "--output", choices=("wide",), help="wide: more columns")
    p.add_argument(
        "--interval",
        type=float,
        default=TOP_INTERVAL_S,
        metavar="SECONDS",
        help=f"between redraws (default {TOP_INTERVAL_S:g})",
    )
    p.add_argument(
        "--iterations", type=int, default=0, metavar="N", help="stop after N screens (0: never)"
    )
    p.set_defaults(run=run_top)

    p = commands.add_parser(
        "dashboard",
        parents=[server, state],
        help="print the running mesh's dashboard URL",
        description="Print the dashboard URL of the running mesh; --open opens it in a browser.",
    )
    p.add_argument("--open", action="store_true", help="open it in the default web browser")
    p.set_defaults(run=run_dashboard)

    p = commands.add_parser(
        "prometheus-config",
        parents=[server, state],
        help="a Prometheus scrape configuration for the mesh's proxies",
        description=(
            "Print a prometheus.yml that scrapes every sidecar and gateway of the running mesh"
            f" at <pod IP>:15090{METRICS_PATH}: by default following pods as they come and go"
            " (http_sd_configs on the dashboard's /api/prometheus-targets); --static lists"
            " today's targets."
        ),
    )
    p.add_argument(
        "--static", action="store_true", help="static_configs of the current targets instead"
    )
    p.set_defaults(run=run_prometheus_config)


def _source(args: argparse.Namespace) -> StatSource:
    if args.prometheus:
        return PrometheusSource(args.prometheus)
    return DashboardSource(find_mesh(args.state_dir, args.server))


def _scope(args: argparse.Namespace) -> tuple[Kind, str | None, int]:
    return (
        _KINDS[args.kind],
        None if args.all_namespaces else args.namespace,
        parse_window(args.window),
    )


def run_stat(args: argparse.Namespace) -> int:
    kind, namespace, window_s = _scope(args)
    source = _source(args)
    rows = source.rows(kind, namespace, window_s)
    if args.output in ("json", "yaml"):
        data = {
            "kind": kind,
            "window_s": window_s,
            "source": source.describe(),
            "rows": [r.to_dict() for r in rows],
        }
        if args.output == "json":
            print(json.dumps(data, indent=4))
        else:
            print(yaml.safe_dump(data, sort_keys=False), end="")
        return 0
    if not rows:
        what = "workloads" if kind == "workload" else "services"
        where = "" if namespace is None else f" in namespace {namespace}"
        print(
            f"No traffic to {what}{where} in the last {window_text(window_s)}"
            + (" (-A shows every namespace)" if namespace is not None else ""),
            file=sys.stderr,
        )
        return 0
    print(stat_table(rows, kind=kind, all_namespaces=namespace is None, wide=args.output == "wide"))
    return 0


#: ANSI: cursor home, erase to end of line / of screen, hide / show the cursor. No curses.
_HOME, _EOL, _EOS = "\x1b[H", "\x1b[K", "\x1b[J"
_HIDE, _SHOW, _CLEAR = "\x1b[?25l", "\x1b[?25h", "\x1b[2J"


def fit_screen(lines: list[str], height: int) -> list[str]:
    """The screen's lines cut to a terminal ``height`` (so that it never scrolls), the cut
    said on the last line, which stays the hint for quitting."""
    if len(lines) <= height or height < 3:
        return lines
    kept = lines[: height - 2]
    return [*kept, f"... {len(lines) - 1 - len(kept)} more lines (narrow with -n)", lines[-1]]


def run_top(args: argparse.Namespace) -> int:
    kind, namespace, window_s = _scope(args)
    if args.interval <= 0:
        raise MeshletError(f"--interval {args.interval:g} must be more than 0 seconds")
    source = _source(args)
    described = source.describe()  # fails with the next step when there is no mesh
    terminal = sys.stdout.isatty()
    out = sys.stdout
    drawn = 0
    try:
        if terminal:
            out.write(_HIDE + _CLEAR)
        while True:
            error = ""
            rows: list[StatRow] | None = None
            try:
                rows = source.rows(kind, namespace, window_s)
            except MeshletError as e:  # keep drawing: the mesh may be restarting
                if drawn == 0:
                    raise
                error = str(e)
            screen = top_screen(
                rows,
                kind=kind,
                namespace=namespace,
                window_s=window_s,
                source=described,
                clock=time.strftime("%H:%M:%S"),
                error=error,
                wide=args.output == "wide",
            )
            if terminal:
                lines = fit_screen(screen.split("\n"), shutil.get_terminal_size().lines)
                out.write(_HOME + "".join(line + _EOL + "\n" for line in lines) + _EOS)
            else:
                out.write(screen + "\n\n")
            out.flush()
            drawn += 1
            if args.iterations and drawn >= args.iterations:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:  # Ctrl-C is how one leaves top: not a failure
        return 0
    finally:
        if terminal:
            out.write(_SHOW)
            out.flush()


def run_dashboard(args: argparse.Namespace) -> int:
    mesh = find_mesh(args.state_dir, args.server)
    _dashboard_json(mesh, "/api/summary")  # it answers, or the error says what to do
    url = mesh.dashboard + "/"
    print(url)
    if args.open:
        import webbrowser

        if not webbrowser.open(url):
            print(f"no web browser found here: open {url} yourself", file=sys.stderr)
    return 0


def prometheus_config(
    mesh: RunningMesh, targets: Sequence[Mapping[str, Any]] | None = None
) -> dict[str, Any]:
    """A prometheus.yml with one job scraping every proxy at ``METRICS_PATH``: the dashboard's
    HTTP service discovery (``http_sd_configs``), or ``targets`` as ``static_configs``."""
    job: dict[str, Any] = {
        # Istio's own name for this job (samples/addons/prometheus.yaml), so that dashboards
        # written for Istio find it.
        "job_name": "envoy-stats",
        "metrics_path": METRICS_PATH,
        "scrape_interval": SCRAPE_INTERVAL,
    }
    if targets is None:
        job["http_sd_configs"] = [
            {"url": f"{mesh.dashboard}/api/prometheus-targets", "refresh_interval": SCRAPE_INTERVAL}
        ]
    else:
        job["static_configs"] = [
            {
                "targets": [str(t) for t in group.get("targets") or []],
                "labels": {str(k): str(v) for k, v in (group.get("labels") or {}).items()},
            }
            for group in targets
        ]
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "scrape_configs": [job],
    }


def run_prometheus_config(args: argparse.Namespace) -> int:
    mesh = find_mesh(args.state_dir, args.server)
    targets = None
    if args.static:
        answer = _dashboard_json(mesh, "/api/prometheus-targets")
        targets = answer if isinstance(answer, list) else []
        count = sum(len(t.get("targets") or []) for t in targets)
        note = f"# {count} proxies as of {time.strftime('%Y-%m-%d %H:%M:%S')}; pods that come"
        note += " later are not scraped (drop --static to follow them).\n"
    else:
        note = "# Targets follow the mesh's pods through its dashboard (http_sd_configs).\n"
    print(f"# Prometheus scrape configuration for the meshlet mesh in {mesh.state_dir}")
    print(
        note
        + "# Run: prometheus --config.file=prometheus.yml; then `meshlet stat --prometheus URL`."
    )
    print(yaml.safe_dump(prometheus_config(mesh, targets), sort_keys=False), end="")
    return 0
