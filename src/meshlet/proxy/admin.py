"""The admin server (Envoy's ``admin.address``, port 15000 in a mesh; loopback only).

Endpoints (ENVOY-SEMANTICS §8): ``GET /ready``, ``/server_info``, ``/config_dump``,
``/clusters`` (text or ``?format=json``), ``/stats`` and ``/stats/prometheus`` (summed over every
worker process); ``POST /quitquitquit`` (drain, then exit), ``/healthcheck/fail``,
``/healthcheck/ok``. Mutations sent with GET get 400, as in Envoy. The admin path is not hot:
protobuf's JSON printer and the admin protos are imported here, not by the data plane.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import parse_qs

import httptools

import meshlet
from meshlet.proxy import framing
from meshlet.proxy.config import ProxyConfig
from meshlet.proxy.headers import Headers
from meshlet.proxy.telemetry.stats import merge_snapshots, render_prometheus, render_text
from meshlet.proxy.upstream.cluster import Cluster

log = logging.getLogger("meshlet.admin")


@dataclass(slots=True, kw_only=True)
class ServerState:
    """What the admin reports and changes about the whole proxy."""

    config: ProxyConfig
    clusters: Callable[[], dict[str, Cluster]]
    snapshots: Callable[[], Awaitable[list[dict[str, Any]]]]
    quit: Callable[[], None]
    set_health_failed: Callable[[bool], Awaitable[None]]  # every worker, before it returns
    command_line: dict[str, Any]
    started: float
    state: str = "PRE_INITIALIZING"  # LIVE, DRAINING, PRE_INITIALIZING, INITIALIZING
    health_failed: bool = False


Response = tuple[int, bytes, bytes]  # status, content-type, body
_TEXT = b"text/plain; charset=UTF-8"
_JSON = b"application/json"
_PROM = b"text/plain; version=0.0.4; charset=utf-8"


class AdminServer:
    """Routes admin requests; ``handle`` is pure apart from reading live state."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def handle(self, method: str, path: str, query: dict[str, list[str]]) -> Response:
        get = {
            "/": self._index,
            "/ready": self._ready,
            "/server_info": self._server_info,
            "/config_dump": self._config_dump,
            "/clusters": self._clusters,
        }
        post = {
            "/quitquitquit": self._quit,
            "/healthcheck/fail": self._hc_fail,
            "/healthcheck/ok": self._hc_ok,
        }
        if path in post:
            if method != "POST":
                return 400, _TEXT, b"This endpoint requires POST\n"
            return await post[path](query)
        if path in ("/stats/prometheus", "/stats"):
            snaps = merge_snapshots(await self.state.snapshots())
            if path == "/stats/prometheus" or query.get("format") == ["prometheus"]:
                return 200, _PROM, render_prometheus(snaps).encode()
            if query.get("format") == ["json"]:
                return 200, _JSON, json.dumps(snaps, default=str).encode()
            return 200, _TEXT, render_text(snaps).encode()
        handler = get.get(path)
        if handler is None:
            return 404, _TEXT, b"invalid path. admin commands are:\n" + self._index({})[2]
        return handler(query)

    # -- handlers --------------------------------------------------------------------------------

    def _index(self, query: dict[str, list[str]]) -> Response:
        lines = [
            "  /: this list",
            "  /clusters: upstream cluster status",
            "  /config_dump: dump current configuration",
            "  /healthcheck/fail (POST): cause the server to fail health checks",
            "  /healthcheck/ok (POST): cause the server to pass health checks",
            "  /quitquitquit (POST): drain, then exit the server",
            "  /ready: print server state, return 200 if LIVE, otherwise return 503",
            "  /server_info: print server version/status information",
            "  /stats: print server stats (?format=json|prometheus)",
            "  /stats/prometheus: print server stats in prometheus format",
        ]
        return 200, _TEXT, ("admin commands are:\n" + "\n".join(lines) + "\n").encode()

    def _ready(self, query: dict[str, list[str]]) -> Response:
        state = self.state.state
        return (200 if state == "LIVE" else 503), _TEXT, f"{state}\n".encode()

    def _server_info(self, query: dict[str, list[str]]) -> Response:
        s = self.state
        node = s.config.node
        uptime = f"{int(time.time() - s.started)}s"
        info = {
            "version": f"meshlet/{meshlet.__version__}",
            "state": s.state,
            "hot_restart_version": "disabled",
            "command_line_options": s.command_line,
            "node": {
                "id": node.id,
                "cluster": node.cluster,
                "user_agent_name": "meshlet",
                "user_agent_build_version": {"version": {"major_number": 0, "minor_number": 1}},
            },
            "uptime_current_epoch": uptime,
            "uptime_all_epochs": uptime,
        }
        return 200, _JSON, json.dumps(info, indent=2).encode()

    def _config_dump(self, query: dict[str, list[str]]) -> Response:
        from meshlet.proxy.config_dump import config_dump

        dump = config_dump(self.state.config, self.state.started, query.get("resource", [""])[0])
        return 200, _JSON, json.dumps(dump, indent=2).encode()

    def _clusters(self, query: dict[str, list[str]]) -> Response:
        clusters = self.state.clusters()
        if query.get("format") == ["json"]:
            return 200, _JSON, json.dumps(clusters_json(clusters), indent=2).encode()
        return 200, _TEXT, clusters_text(clusters).encode()

    async def _quit(self, query: dict[str, list[str]]) -> Response:
        asyncio.get_running_loop().call_soon(self.state.quit)
        return 200, _TEXT, b"OK\n"

    async def _hc_fail(self, query: dict[str, list[str]]) -> Response:
        await self.state.set_health_failed(True)  # every worker, before the answer
        return 200, _TEXT, b"OK\n"

    async def _hc_ok(self, query: dict[str, list[str]]) -> Response:
        await self.state.set_health_failed(False)
        return 200, _TEXT, b"OK\n"


def clusters_text(clusters: dict[str, Cluster]) -> str:
    """Envoy's ``/clusters`` text: ``cluster::host::stat::value`` lines."""
    lines: list[str] = []
    for name in sorted(clusters):
        c = clusters[name]
        limits = c.limits
        lines.append(f"{name}::observability_name::{name}")
        if c.outlier is not None:
            # Envoy prints the success-rate figures of a cluster with outlier detection; meshlet
            # has no success-rate detector, so they are Envoy's "no data" value.
            for figure in (
                "success_rate_average",
                "success_rate_ejection_threshold",
                "local_origin_success_rate_average",
                "local_origin_success_rate_ejection_threshold",
            ):
                lines.append(f"{name}::outlier::{figure}::-1")
        for prio in ("default_priority", "high_priority"):
            lines.append(f"{name}::{prio}::max_connections::{limits.max_connections}")
            lines.append(f"{name}::{prio}::max_pending_requests::{limits.max_pending_requests}")
            lines.append(f"{name}::{prio}::max_requests::{limits.max_requests}")
            lines.append(f"{name}::{prio}::max_retries::{limits.max_retries}")
        lines.append(f"{name}::added_via_api::false")
        for h in c.hosts:
            p = f"{name}::{h.key}"
            for stat in (
                "cx_active",
                "cx_connect_fail",
                "cx_total",
                "rq_active",
                "rq_error",
                "rq_success",
                "rq_timeout",
                "rq_total",
            ):
                lines.append(f"{p}::{stat}::{getattr(h, stat)}")
            lines.append(f"{p}::hostname::{h.hostname}")
            lines.append(f"{p}::health_flags::{h.health_flags}")
            lines.append(f"{p}::weight::{h.weight}")
            region, zone, sub_zone = h.locality
            lines.append(f"{p}::region::{region}")
            lines.append(f"{p}::zone::{zone}")
            lines.append(f"{p}::sub_zone::{sub_zone}")
            lines.append(f"{p}::canary::false")
            lines.append(f"{p}::priority::{h.priority}")
            lines.append(f"{p}::success_rate::-1.0")
            lines.append(f"{p}::local_origin_success_rate::-1.0")
    return "\n".join(lines) + "\n"


def clusters_json(clusters: dict[str, Cluster]) -> dict[str, Any]:
    statuses = []
    for name in sorted(clusters):
        c = clusters[name]
        hosts = []
        for h in c.hosts:
            health: dict[str, Any] = {"eds_health_status": "HEALTHY"}
            if h.failed_active_hc:
                health["failed_active_health_check"] = True
            if h.failed_outlier:
                health["failed_outlier_check"] = True
            hosts.append(
                {
                    "address": {"socket_address": {"address": h.address, "port_value": h.port}},
                    "stats": [
                        {"name": s, "value": str(getattr(h, s)), "type": "COUNTER"}
                        for s in (
                            "cx_connect_fail",
                            "cx_total",
                            "rq_error",
                            "rq_success",
                            "rq_timeout",
                            "rq_total",
                        )
                    ]
                    + [
                        {"name": s, "value": str(getattr(h, s)), "type": "GAUGE"}
                        for s in ("cx_active", "rq_active")
                    ],
                    "health_status": health,
                    "weight": h.weight,
                    "priority": h.priority,
                    "hostname": h.hostname,
                    "locality": dict(zip(("region", "zone", "sub_zone"), h.locality, strict=True)),
                }
            )
        statuses.append({"name": name, "observability_name": name, "host_statuses": hosts})
    return {"cluster_statuses": statuses}


class AdminProtocol(asyncio.Protocol):
    """A small HTTP/1.1 server for the admin endpoints (one request at a time)."""

    def __init__(self, admin: AdminServer) -> None:
        self.admin = admin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.busy: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._write(400, _TEXT, b"Bad Request\n", close=True)

    def on_message_begin(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        keep_alive = self.parser.should_keep_alive()
        parsed = httptools.parse_url(self.url)
        path = parsed.path.decode() if parsed.path else "/"
        query = parse_qs(parsed.query.decode()) if parsed.query else {}
        for key in ("include_eds", "format"):
            if key in query and query[key] == [""]:
                query[key] = ["true"]
        if "format" not in query and parsed.query and b"prometheus" in parsed.query:
            query["format"] = ["prometheus"]
        self.busy = asyncio.get_running_loop().create_task(
            self._respond(method, path, query, keep_alive)
        )

    async def _respond(
        self, method: str, path: str, query: dict[str, list[str]], keep: bool
    ) -> None:
        try:
            status, ctype, body = await self.admin.handle(method, path, query)
        except Exception:
            log.exception("admin %s %s failed", method, path)
            status, ctype, body = 500, _TEXT, b"internal error\n"
        self._write(status, ctype, body, close=not keep)

    def _write(self, status: int, ctype: bytes, body: bytes, *, close: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        headers = Headers(
            [
                (b"content-type", ctype),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-cache, max-age=0"),
                (b"x-content-type-options", b"nosniff"),
                (b"date", framing.DATE.value()),
                (b"server", b"meshlet"),
            ]
        )
        if close:
            headers.add(b"connection", b"close")
        self.transport.write(
            framing.status_line(status) + framing.serialize_headers(headers) + framing.CRLF + body
        )
        if close:
            self.transport.close()
