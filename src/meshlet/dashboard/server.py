"""The dashboard's HTTP server: the JSON API of the mesh's telemetry and configuration, and the
static UI (``dashboard/static/``), on 127.0.0.1:20001 by default (Kiali's port).

Paths (every answer JSON; ``window`` in seconds, default 60; errors ``{"error", "code"}``)::

    GET /api/summary                 where the numbers come from, targets, traces, the mesh
    GET /api/graph?window=60         the service graph: workload → service → workload
    GET /api/workloads?window=60     inbound golden signals per workload, by rps
    GET /api/services?window=60      ... per service
    GET /api/metrics?kind=workload|service&namespace=NS&name=N&minutes=15
                                     time series: inbound, outbound, by response code
    GET /api/traces?service=S&min_duration_ms=D&errors=1&limit=50
    GET /api/traces/<trace id>       one trace's spans, by start
    GET /api/config                  the store's objects per namespace, analysis findings,
                                     each proxy's xDS sync state (as /debug/syncz)
    GET /api/prometheus-targets      Prometheus http_sd_configs: every proxy's metrics port
    GET /  and  GET /static/<file>   the UI

``DashboardHandler`` is the behaviour (request in, response out); ``WebServer`` moves bytes.
Everything runs on the daemon's event loop, next to the control plane whose store it reads.
"""

from __future__ import annotations

import inspect
import mimetypes
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshlet.dashboard.golden import GoldenSignals
from meshlet.dashboard.metrics import MetricsSource, MetricsSourceError
from meshlet.dashboard.scraper import METRICS_PORT, Scraper, Target, http_sd
from meshlet.dashboard.traces import TraceStore
from meshlet.web import Request, Response, WebServer, json_error

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_PORT = 20001
DEFAULT_WINDOW = 60.0
MAX_WINDOW = 15 * 60.0
MAX_LIMIT = 1000

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".map": "application/json",
    ".txt": "text/plain; charset=utf-8",
    ".woff2": "font/woff2",
}
_TRACE_ID = re.compile(r"^[0-9a-fA-F]{32}$")


class BadRequest(ValueError):
    pass


def content_type(path: Path) -> str:
    known = _CONTENT_TYPES.get(path.suffix.lower())
    if known:
        return known
    guessed, _ = mimetypes.guess_type(path.name)
    return guessed or "application/octet-stream"


def static_file(root: Path, relative: str) -> Path | None:
    """The file ``relative`` names under ``root``, or None: nothing outside ``root`` (``..``,
    absolute paths, symlinks leading out), no directories, no dot files."""
    parts = [p for p in relative.split("/") if p]
    if not parts or any(p in (".", "..") or p.startswith(".") or "\\" in p for p in parts):
        return None
    base = root.resolve()
    try:
        path = base.joinpath(*parts).resolve()
    except (OSError, ValueError):
        return None
    if not path.is_relative_to(base) or not path.is_file():
        return None
    return path


def _number(request: Request, name: str, default: float, low: float, high: float) -> float:
    text = request.arg(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise BadRequest(f"{name}={text!r} is not a number") from None
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low:g} and {high:g}, not {value:g}")
    return value


@dataclass
class MeshInfo:
    """What the dashboard knows about the mesh it runs in (all callables: read when asked)."""

    api: str = ""
    xds: str = ""
    objects: Callable[[], list[dict[str, Any]]] = list
    sync_status: Callable[[], list[dict[str, Any]]] = list
    targets: Callable[[], list[Target]] = list


@dataclass
class DashboardHandler:
    """The dashboard's behaviour; see the module docstring."""

    traces: TraceStore
    source: MetricsSource
    mesh: MeshInfo = field(default_factory=MeshInfo)
    scraper: Scraper | None = None
    prometheus_url: str | None = None
    metrics_port: int = METRICS_PORT
    static_dir: Path = STATIC_DIR

    def __post_init__(self) -> None:
        self.golden = GoldenSignals(self.source, known=self._known_workloads)
        self.routes: dict[str, Callable[[Request], Any]] = {
            "/api/summary": self.summary,
            "/api/graph": self.graph,
            "/api/workloads": self.workloads,
            "/api/services": self.services,
            "/api/metrics": self.metrics,
            "/api/traces": self.search_traces,
            "/api/config": self.config,
            "/api/prometheus-targets": self.prometheus_targets,
        }

    async def __call__(self, request: Request) -> Response:
        if request.method != "GET":
            return json_error(405, f"{request.method} is not allowed; the dashboard is read-only")
        try:
            route = self.routes.get(request.path)
            if route is not None:
                result = route(request)
                if inspect.isawaitable(result):
                    result = await result
                assert isinstance(result, Response)
                return result
            if request.path.startswith("/api/traces/"):
                return self.trace(request.path.removeprefix("/api/traces/"))
            if request.path.startswith("/api/"):
                return json_error(404, f"no such path {request.path!r}")
            return self.static(request.path)
        except BadRequest as e:
            return json_error(400, str(e))
        except MetricsSourceError as e:
            return json_error(502, str(e))

    # -- metrics ---------------------------------------------------------------------------

    def _known_workloads(self) -> list[tuple[str, str, str, str]]:
        return [(t.namespace, t.workload, t.app, t.version) for t in self.mesh.targets()]

    def _window(self, request: Request) -> float:
        return _number(request, "window", DEFAULT_WINDOW, 1.0, MAX_WINDOW)

    def summary(self, request: Request) -> Response:
        return Response.json(
            {
                "source": self.source.kind,
                "prometheus_url": self.prometheus_url,
                "scrape_interval_s": self.source.interval,
                "targets": len(self.mesh.targets()),
                "traces": self.traces.trace_count,
                "spans": self.traces.span_count,
                "mesh": {"api": self.mesh.api, "xds": self.mesh.xds},
            }
        )

    async def graph(self, request: Request) -> Response:
        return Response.json(await self.golden.graph(self._window(request)))

    async def workloads(self, request: Request) -> Response:
        return Response.json(await self.golden.workloads(self._window(request)))

    async def services(self, request: Request) -> Response:
        return Response.json(await self.golden.services(self._window(request)))

    async def metrics(self, request: Request) -> Response:
        kind = request.arg("kind", "workload")
        if kind not in ("workload", "service"):
            raise BadRequest(f"kind={kind!r}: workload or service")
        namespace, name = request.arg("namespace"), request.arg("name")
        if not namespace or not name:
            raise BadRequest("give namespace=NS and name=NAME")
        minutes = _number(request, "minutes", 15.0, 1.0, MAX_WINDOW / 60)
        return Response.json(await self.golden.metrics(kind, namespace, name, minutes))

    def prometheus_targets(self, request: Request) -> Response:
        return Response.json(http_sd(self.mesh.targets(), self.metrics_port))

    # -- traces ----------------------------------------------------------------------------

    def search_traces(self, request: Request) -> Response:
        limit = int(_number(request, "limit", 50, 1, MAX_LIMIT))
        min_duration = _number(request, "min_duration_ms", 0.0, 0.0, float("inf"))
        errors = request.arg("errors", "0").lower() in ("1", "true", "yes")
        found = self.traces.search(
            service=request.arg("service"),
            min_duration_ms=min_duration,
            errors=errors,
            limit=limit,
        )
        return Response.json({"traces": [t.as_dict() for t in found]})

    def trace(self, trace_id: str) -> Response:
        if not _TRACE_ID.match(trace_id):
            return json_error(400, f"{trace_id!r} is not a trace id (32 hex digits)")
        spans = self.traces.get(trace_id)
        if spans is None:
            return json_error(404, f"trace {trace_id} is not here (never received, or evicted)")
        return Response.json({"trace_id": trace_id.lower(), "spans": [s.as_dict() for s in spans]})

    # -- configuration ---------------------------------------------------------------------

    def config(self, request: Request) -> Response:
        from meshlet.control.analysis import analyze
        from meshlet.control.generators import load_stored

        objects = self.mesh.objects()
        namespaces: dict[str, list[dict[str, Any]]] = {}
        for obj in objects:
            meta = obj.get("metadata") or {}
            namespace = str(meta.get("namespace") or "")
            namespaces.setdefault(namespace, []).append(
                {
                    "kind": obj.get("kind", ""),
                    "name": meta.get("name", ""),
                    "namespace": namespace,
                    "apiVersion": obj.get("apiVersion", ""),
                }
            )
        for items in namespaces.values():
            items.sort(key=lambda o: (o["kind"], o["name"]))
        findings = [
            {
                "code": f.code,
                "level": f.level.value,
                "message": f.message,
                "resource": f.resource,
            }
            for f in analyze(load_stored(objects))
        ]
        proxies = [
            {
                "id": s.get("proxy_id", ""),
                "connected_at": s.get("connected_at"),
                "sync": s.get("types", {}),
            }
            for s in self.mesh.sync_status()
        ]
        return Response.json(
            {
                "namespaces": dict(sorted(namespaces.items())),
                "findings": findings,
                "proxies": proxies,
            }
        )

    # -- the UI ----------------------------------------------------------------------------

    def static(self, path: str) -> Response:
        if path in ("/", "/index.html"):
            relative = "index.html"
        elif path.startswith("/static/"):
            relative = path.removeprefix("/static/")
        else:
            return json_error(404, f"no such path {path!r}")
        found = static_file(self.static_dir, relative)
        if found is None:
            return json_error(404, f"no such file {path!r}")
        return Response(status=200, body=found.read_bytes(), content_type=content_type(found))


class Dashboard:
    """The dashboard's server on ``address``."""

    def __init__(self, handler: DashboardHandler, address: str, *, hint: str = "") -> None:
        self.handler = handler
        self.server = WebServer(handler, address, name="dashboard", hint=hint)

    def __repr__(self) -> str:
        return f"<Dashboard {self.url}>"

    @property
    def url(self) -> str:
        return f"http://{self.server.bound_address}"

    async def start(self) -> None:
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop()
