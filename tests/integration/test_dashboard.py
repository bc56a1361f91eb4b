"""The telemetry backend over real sockets: an OTLP client posting spans to the receiver, the
scraper reading a proxy-like metrics endpoint over HTTP, the dashboard answering its JSON API
and serving its static files, and the same queries against a real Prometheus.

The metrics endpoint plays a sidecar: Istio's standard labels
(istio.io/latest/docs/reference/config/metrics/), Prometheus text format, at
``<pod IP>:<port>/stats/prometheus``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from meshlet.control.store import Store
from meshlet.dashboard.otlp import OtlpReceiver
from meshlet.dashboard.otlp_proto import (
    AnyValue,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
    KeyValue,
)
from meshlet.dashboard.prometheus import PrometheusSource
from meshlet.dashboard.scraper import Scraper, Target
from meshlet.dashboard.server import Dashboard, DashboardHandler, MeshInfo
from meshlet.dashboard.traces import TraceStore
from meshlet.proxy.telemetry.stats import ISTIO_LABELS
from tests.ports import free_port
from tests.prometheus import poll, running_prometheus

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
POD_IP = "127.0.0.1"


def _labels(**values: str) -> dict[str, str]:
    labels = dict.fromkeys(ISTIO_LABELS, "unknown")
    labels.update(values)
    return labels


def _inbound(source: str, destination: str, service: str, code: str) -> dict[str, str]:
    return _labels(
        reporter="destination",
        source_workload=source,
        source_workload_namespace="default",
        destination_workload=destination,
        destination_workload_namespace="default",
        destination_app=destination.split("-v")[0],
        destination_version="v1",
        destination_service_name=service,
        destination_service_namespace="default",
        destination_service=f"{service}.default.svc.cluster.local",
        request_protocol="http",
        response_code=code,
        connection_security_policy="mutual_tls",
    )


OK = _inbound("productpage-v1", "reviews-v1", "reviews", "200")
FAILED = _inbound("productpage-v1", "reviews-v1", "reviews", "503")


def _render(series: dict[tuple[tuple[str, str], ...], tuple[int, int]]) -> str:
    """``istio_requests_total`` and the duration histogram, as a sidecar renders them: each
    series' requests, all of them in the 5 ms bucket or, for the second count, the 50 ms one."""
    lines = ["# TYPE istio_requests_total counter"]
    for labels, (fast, slow) in series.items():
        body = ",".join(f'{k}="{v}"' for k, v in labels)
        lines.append(f"istio_requests_total{{{body}}} {fast + slow}")
    lines.append("# TYPE istio_request_duration_milliseconds histogram")
    for labels, (fast, slow) in series.items():
        body = ",".join(f'{k}="{v}"' for k, v in labels)
        for le, count in (("1", 0), ("5", fast), ("10", fast), ("50", fast + slow)):
            lines.append(f'istio_request_duration_milliseconds_bucket{{{body},le="{le}"}} {count}')
        lines.append(
            f'istio_request_duration_milliseconds_bucket{{{body},le="+Inf"}} {fast + slow}'
        )
        lines.append(f"istio_request_duration_milliseconds_sum{{{body}}} {fast * 5 + slow * 50}")
        lines.append(f"istio_request_duration_milliseconds_count{{{body}}} {fast + slow}")
    lines.append("# TYPE envoy_server_live gauge")
    lines.append("envoy_server_live 1")
    return "\n".join(lines) + "\n"


class FakeProxy:
    """A sidecar's metrics endpoint in a thread; ``series`` is what the next scrape reads,
    and with ``grow`` each scrape first adds that much to every series."""

    def __init__(self, host: str = POD_IP) -> None:
        self.series: dict[tuple[tuple[str, str], ...], tuple[int, int]] = {}
        self.grow: dict[tuple[tuple[str, str], ...], tuple[int, int]] = {}
        self.scrapes = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/stats/prometheus":
                    self.send_error(404)
                    return
                with outer.lock:
                    for key, (fast, slow) in outer.grow.items():
                        old = outer.series.get(key, (0, 0))
                        outer.series[key] = (old[0] + fast, old[1] + slow)
                    body = _render(outer.series).encode()
                    outer.scrapes += 1
                self.send_response(200)
                self.send_header("content-type", "text/plain; version=0.0.4")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer((host, free_port()), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def set(self, labels: dict[str, str], fast: int, slow: int = 0) -> None:
        with self.lock:
            self.series[tuple(labels.items())] = (fast, slow)

    def __enter__(self) -> FakeProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy() -> Iterator[FakeProxy]:
    with FakeProxy() as fake:
        yield fake


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with _DIRECT.open(url, timeout=10) as r:
            return r.status, r.headers.get("content-type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type", ""), e.read()


def _json(url: str) -> Any:
    status, content_type, body = _get(url)
    assert status == 200 and content_type == "application/json", (status, body[:300])
    return json.loads(body)


def _otlp_request(trace_id: bytes) -> bytes:
    request = ExportTraceServiceRequest()
    for service, span_id, parent, start, end in (
        ("istio-ingressgateway.istio-system", b"\x01" * 8, b"", 1_000, 9_000_000),
        ("productpage.default", b"\x02" * 8, b"\x01" * 8, 2_000, 8_000_000),
    ):
        rs = request.resource_spans.add()
        rs.resource.attributes.append(
            KeyValue(key="service.name", value=AnyValue(string_value=service))
        )
        span = rs.scope_spans.add().spans.add()
        span.trace_id, span.span_id, span.parent_span_id = trace_id, span_id, parent
        span.name = "productpage.default.svc.cluster.local:9080/productpage"
        span.kind = 2
        span.start_time_unix_nano = 1_700_000_000_000_000_000 + start
        span.end_time_unix_nano = 1_700_000_000_000_000_000 + end
    return request.SerializeToString()


def _post(url: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"content-type": content_type}
    )
    try:
        with _DIRECT.open(request, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_spans_posted_over_otlp_http_are_served_by_the_dashboard(tmp_path: Path) -> None:
    """A client posts an ``ExportTraceServiceRequest`` as protobuf to /v1/traces (OTLP/HTTP,
    opentelemetry.io/docs/specs/otlp/#otlphttp-request) and gets a protobuf
    ``ExportTraceServiceResponse``; the dashboard lists and shows the trace."""
    trace_id = bytes.fromhex("0af7651916cd43dd8448eb211c80319c")

    async def scenario() -> None:
        traces = TraceStore()
        receiver = OtlpReceiver(traces, f"127.0.0.1:{free_port()}")
        handler = DashboardHandler(traces=traces, source=Scraper(list).source)
        dashboard = Dashboard(handler, f"127.0.0.1:{free_port()}")
        await receiver.start()
        await dashboard.start()
        try:
            status, body = await asyncio.to_thread(
                _post, receiver.endpoint, _otlp_request(trace_id), "application/x-protobuf"
            )
            assert status == 200
            ExportTraceServiceResponse.FromString(body)
            status, _ = await asyncio.to_thread(_post, receiver.endpoint, b"{}", "text/plain")
            assert status == 415
            status, _ = await asyncio.to_thread(
                _post, receiver.endpoint, b"\x0a\xff", "application/x-protobuf"
            )
            assert status == 400

            found = await asyncio.to_thread(_json, f"{dashboard.url}/api/traces?limit=5")
            [row] = found["traces"]
            assert row["trace_id"] == trace_id.hex()
            assert row["root_service"] == "istio-ingressgateway.istio-system"
            assert row["span_count"] == 2 and row["duration_ms"] == pytest.approx(8.999)
            by_service = await asyncio.to_thread(
                _json, f"{dashboard.url}/api/traces?service=productpage.default"
            )
            assert len(by_service["traces"]) == 1
            trace = await asyncio.to_thread(_json, f"{dashboard.url}/api/traces/{trace_id.hex()}")
            assert [s["parent_span_id"] for s in trace["spans"]] == ["", "01" * 8]
            assert trace["spans"][1]["kind"] == "SERVER"
            status, _, body = await asyncio.to_thread(
                _get, f"{dashboard.url}/api/traces/{'0' * 32}"
            )
            assert status == 404 and "error" in json.loads(body)
            summary = await asyncio.to_thread(_json, f"{dashboard.url}/api/summary")
            assert summary["traces"] == 1 and summary["spans"] == 2
            assert summary["source"] == "embedded" and summary["prometheus_url"] is None
        finally:
            await dashboard.stop()
            await receiver.stop()

    asyncio.run(scenario())


def test_the_scraper_reads_a_proxy_over_http_and_the_dashboard_shows_its_workloads(
    proxy: FakeProxy,
) -> None:
    """Two scrapes five seconds apart (a scripted clock): 40 requests, 4 of them 503, give
    8 rps over a 5 s window at 90 % success, and p50 in the 5 ms bucket."""
    target = Target(ip=POD_IP, namespace="default", pod="reviews-v1-x", workload="reviews-v1")
    now = [1_000.0]
    closed = free_port()  # nothing listens here: the scraper falls back to the proxy's port
    scraper = Scraper(lambda: [target], port=closed, fallback_port=proxy.port, clock=lambda: now[0])
    store = Store.memory()
    meta = {"name": "reviews", "namespace": "default"}
    route = {"route": [{"destination": {"host": "nowhere"}}]}
    store.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": meta,
                "spec": {"selector": {"app": "reviews"}, "ports": [{"name": "http", "port": 9080}]},
            },
            {
                "apiVersion": "networking.istio.io/v1",
                "kind": "VirtualService",
                "metadata": meta,
                "spec": {"hosts": ["reviews"], "http": [route]},
            },
        ]
    )

    async def scenario() -> None:
        handler = DashboardHandler(
            traces=TraceStore(),
            source=scraper.source,
            mesh=MeshInfo(
                api="http://127.0.0.1:15014",
                xds="127.0.0.1:15010",
                objects=store.list,
                targets=lambda: [target],
            ),
            scraper=scraper,
        )
        handler.golden.clock = lambda: now[0]
        dashboard = Dashboard(handler, f"127.0.0.1:{free_port()}")
        await dashboard.start()
        try:
            proxy.set(OK, 100)
            proxy.set(FAILED, 10)
            await scraper.scrape_once()
            proxy.set(OK, 100 + 30, 6)
            proxy.set(FAILED, 10 + 4)
            now[0] += 5.0
            await scraper.scrape_once()
            assert proxy.scrapes == 2

            url = dashboard.url
            rows = (await asyncio.to_thread(_json, f"{url}/api/workloads?window=5"))["rows"]
            [row] = rows
            assert (row["namespace"], row["name"], row["app"]) == (
                "default",
                "reviews-v1",
                "reviews",
            )
            assert row["rps"] == 8.0 and row["requests"] == 40
            assert row["success_rate"] == 0.9 and row["mtls_ratio"] == 1.0
            # 34 of the 40 in (1, 5]: rank 20 interpolated in that bucket.
            assert row["p50_ms"] == pytest.approx(1 + 4 * 20 / 34, abs=1e-3)
            services = (await asyncio.to_thread(_json, f"{url}/api/services?window=5"))["rows"]
            assert [(s["name"], s["rps"]) for s in services] == [("reviews", 8.0)]
            graph = await asyncio.to_thread(_json, f"{url}/api/graph?window=5")
            assert {(e["source"], e["target"]) for e in graph["edges"]} == {
                ("workload:default/productpage-v1", "service:default/reviews"),
                ("service:default/reviews", "workload:default/reviews-v1"),
            }
            # 4 of 40 are 503: 10 %, Kiali's failure threshold.
            assert {e["health"] for e in graph["edges"]} == {"failing"}
            series = await asyncio.to_thread(
                _json,
                f"{url}/api/metrics?kind=workload&namespace=default&name=reviews-v1&minutes=1",
            )
            assert series["inbound"][-1]["rps"] == pytest.approx(40 / 10)  # window 2 x 5 s
            assert set(series["by_code"]) == {"200", "503"}

            targets = await asyncio.to_thread(_json, f"{url}/api/prometheus-targets")
            assert targets == [
                {
                    "targets": [f"{POD_IP}:15090"],
                    "labels": {"namespace": "default", "pod": "reviews-v1-x",
                               "workload": "reviews-v1", "app": "", "version": ""},
                }
            ]  # fmt: skip
            config = await asyncio.to_thread(_json, f"{url}/api/config")
            assert [o["kind"] for o in config["namespaces"]["default"]] == [
                "Service",
                "VirtualService",
            ]
            assert [f["code"] for f in config["findings"]] == ["IST0101"]  # host "nowhere"
            assert config["proxies"] == []
            status, _, body = await asyncio.to_thread(_get, f"{url}/api/graph?window=nope")
            assert status == 400 and b"window" in body
        finally:
            await dashboard.stop()

    asyncio.run(scenario())


def test_the_dashboard_serves_its_static_files_and_nothing_else(tmp_path: Path) -> None:
    static = tmp_path / "static"
    static.mkdir()
    (static / "index.html").write_text("<!doctype html><title>meshlet</title>")
    (static / "app.js").write_text("export {};")
    (static / "style.css").write_text("body {}")
    (tmp_path / "secret.txt").write_text("not for the web")

    async def scenario() -> None:
        handler = DashboardHandler(
            traces=TraceStore(), source=Scraper(list).source, static_dir=static
        )
        dashboard = Dashboard(handler, f"127.0.0.1:{free_port()}")
        await dashboard.start()
        try:
            url = dashboard.url
            status, content_type, body = await asyncio.to_thread(_get, url + "/")
            assert status == 200 and content_type == "text/html; charset=utf-8"
            assert b"<title>meshlet</title>" in body
            status, content_type, _ = await asyncio.to_thread(_get, url + "/static/app.js")
            assert status == 200 and content_type == "text/javascript; charset=utf-8"
            status, content_type, _ = await asyncio.to_thread(_get, url + "/static/style.css")
            assert status == 200 and content_type == "text/css; charset=utf-8"
            for path in ("/static/../secret.txt", "/static/%2e%2e/secret.txt", "/static/",
                         "/static/nothing.js", "/secret.txt"):  # fmt: skip
                status, _, body = await asyncio.to_thread(_raw_get, dashboard.server.port, path)
                assert status == 404 and b"not for the web" not in body, path
        finally:
            await dashboard.stop()

    asyncio.run(scenario())


def _raw_get(port: int, path: str) -> tuple[int, str, bytes]:
    """A GET with the path exactly as given (urllib would normalise ``..``)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), "", body


@pytest.mark.slow
def test_a_real_prometheus_finds_the_proxies_by_http_sd_and_answers_the_same_rows(
    proxy: FakeProxy, tmp_path: Path
) -> None:
    """Prometheus discovers the proxy through the dashboard's ``/api/prometheus-targets``
    (``http_sd_configs``, prometheus.io/docs/prometheus/latest/http_sd/), scrapes it, and the
    dashboard asked with ``--prometheus`` (PromQL over its HTTP API) lists the workload with
    the same success rate as the proxy's counters say: 90 %."""
    target = Target(ip=POD_IP, namespace="default", pod="reviews-v1-x", workload="reviews-v1")
    proxy.grow = {tuple(OK.items()): (9, 0), tuple(FAILED.items()): (1, 0)}

    async def scenario() -> None:
        sd = DashboardHandler(
            traces=TraceStore(),
            source=Scraper(list).source,
            mesh=MeshInfo(targets=lambda: [target]),
            metrics_port=proxy.port,
        )
        sd_server = Dashboard(sd, f"127.0.0.1:{free_port()}")
        await sd_server.start()
        config = f"""
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: meshlet-proxies
    metrics_path: /stats/prometheus
    http_sd_configs:
      - url: {sd_server.url}/api/prometheus-targets
        refresh_interval: 1s
"""
        try:
            with running_prometheus(tmp_path / "prometheus", config) as prometheus:
                source = PrometheusSource(prometheus.url, interval=1.0)
                handler = DashboardHandler(
                    traces=TraceStore(), source=source, prometheus_url=prometheus.url
                )

                async def rows() -> list[dict[str, Any]]:
                    answer = await handler.golden.workloads(30.0)
                    return [r for r in answer["rows"] if r["rps"]]

                found: list[dict[str, Any]] = []
                for _ in range(120):
                    found = await rows()
                    if found:
                        break
                    await asyncio.sleep(0.5)
                [row] = found
                assert (row["namespace"], row["name"]) == ("default", "reviews-v1")
                assert row["success_rate"] == pytest.approx(0.9, abs=1e-6)
                assert row["p50_ms"] is not None and 1.0 < row["p50_ms"] <= 5.0
                graph = await handler.golden.graph(30.0)
                assert {(e["source"], e["target"]) for e in graph["edges"]} == {
                    ("workload:default/productpage-v1", "service:default/reviews"),
                    ("service:default/reviews", "workload:default/reviews-v1"),
                }
                series = await handler.golden.metrics("workload", "default", "reviews-v1", 2)
                assert any(p["rps"] for p in series["inbound"])
                assert set(series["by_code"]) == {"200", "503"}
                summary = json.loads((await handler(_request("/api/summary"))).body)
                assert summary["source"] == "prometheus"
                assert summary["prometheus_url"] == prometheus.url
                assert prometheus.targets()[0]["health"] == "up"
        finally:
            await sd_server.stop()

    asyncio.run(scenario())
    _ = poll  # the helper module's poll is for callers without an event loop


def _request(path: str) -> Any:
    from meshlet.web import Request

    return Request(method="GET", path=path)


def test_a_taken_port_stops_the_mesh_with_the_flag_to_change(tmp_path: Path) -> None:
    """The daemon's telemetry refuses to start on a port in use, naming the flag to change."""
    import socket

    from meshlet.runtime.daemon import MeshOptions, Telemetry
    from meshlet.web import WebError

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        telemetry = Telemetry(MeshOptions(state_dir=tmp_path, otlp_port=port))
        with pytest.raises(WebError, match="--otlp-port"):
            asyncio.run(telemetry.start_receiver())
    assert Telemetry(MeshOptions(state_dir=tmp_path, otlp_port=0)).otlp_endpoint == ""
