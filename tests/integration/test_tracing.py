"""Tracing across real proxy processes: spans exported as OTLP/HTTP protobuf, trace context
propagated in W3C and B3 form, upstream sampling decisions honoured.

Two proxies are chained the way two sidecars are: client -> proxy A (an OUTBOUND listener, so
its spans are CLIENT spans) -> proxy B (an INBOUND listener: SERVER spans) -> the app. A small
OTLP/HTTP receiver in this test decodes what the proxies post
(``ExportTraceServiceRequest``, https://opentelemetry.io/docs/specs/otlp/#otlphttp).
W3C Trace Context: https://www.w3.org/TR/trace-context/; B3:
https://github.com/openzipkin/b3-propagation; Istio's span naming and tags:
https://istio.io/latest/docs/tasks/observability/distributed-tracing/overview/ (the proxies
propagate the headers; an app in between must forward them).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from meshlet.dashboard import otlp_proto as trace_service_pb2
from tests.integration.conftest import (
    Proxy,
    Upstream,
    bootstrap,
    cluster,
    http_request,
)
from tests.ports import free_port

OTEL = "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
WAIT = 20.0  # a bound for things that happen within about a second; never reached when green


@dataclass
class Received:
    """One span as the receiver decoded it."""

    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: int
    service: str
    attributes: dict[str, str]
    status: int


@dataclass
class Collector:
    """An OTLP/HTTP receiver: ``POST /v1/traces`` with protobuf bodies."""

    port: int
    spans: list[Received] = field(default_factory=list)
    content_types: list[str] = field(default_factory=list)
    fail: bool = False  # answer 503 to every export
    lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    def start(self) -> Collector:
        collector = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if collector.fail or self.path != "/v1/traces":
                    self.send_response(503 if collector.fail else 404)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                collector.add(request, self.headers.get("content-type", ""))
                answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def add(self, request: Any, content_type: str) -> None:
        got = []
        for rs in request.resource_spans:
            resource = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    got.append(
                        Received(
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_id=s.parent_span_id.hex(),
                            name=s.name,
                            kind=s.kind,
                            service=resource.get("service.name", ""),
                            attributes={a.key: a.value.string_value for a in s.attributes},
                            status=s.status.code,
                        )
                    )
        with self.lock:
            self.spans.extend(got)
            self.content_types.append(content_type)

    def trace(self, trace_id: str, count: int) -> list[Received]:
        """The spans of ``trace_id`` once ``count`` of them arrived (client first)."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            with self.lock:
                spans = [s for s in self.spans if s.trace_id == trace_id]
            if len(spans) >= count:
                return sorted(spans, key=lambda s: -s.kind)  # CLIENT (3) before SERVER (2)
            time.sleep(0.05)
        raise AssertionError(f"{len(spans)} spans of {trace_id} arrived, wanted {count}")

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector(free_port()).start()
    yield c
    c.stop()


def tracing(collector: Collector, **extra: Any) -> dict[str, Any]:
    return {
        "tracing": {
            "provider": {
                "name": "envoy.tracers.opentelemetry",
                "typed_config": {
                    "@type": OTEL,
                    "http_service": {
                        "http_uri": {"uri": collector.uri, "cluster": "otel", "timeout": "2s"}
                    },
                },
            },
            **extra,
        }
    }


def sidecar(
    name: str, direction: str, target: int, collector: Collector, **tracing_extra: Any
) -> dict[str, Any]:
    config = bootstrap(clusters=[cluster("next", target)], hcm=tracing(collector, **tracing_extra))
    config["node"] = {
        "id": f"sidecar~127.0.0.1~{name}-v1-abc.default~default.svc.cluster.local",
        "cluster": f"{name}.default",
        "metadata": {
            "NAME": f"{name}-v1-abc",
            "NAMESPACE": "default",
            "WORKLOAD_NAME": f"{name}-v1",
            "MESH_ID": "cluster.local",
            "LABELS": {"app": name, "version": "v1"},
        },
    }
    config["static_resources"]["listeners"][0]["traffic_direction"] = direction
    return config


@dataclass
class Chain:
    a: Proxy  # the client's sidecar (outbound)
    b: Proxy  # the server's sidecar (inbound)
    app: Upstream
    collector: Collector


@pytest.fixture
def chain(
    start_proxy: Callable[..., Proxy],
    make_upstream: Callable[..., Upstream],
    collector: Collector,
) -> Chain:
    app = make_upstream("reviews")
    b = start_proxy(sidecar("reviews", "INBOUND", app.port, collector), name="b")
    a = start_proxy(sidecar("productpage", "OUTBOUND", b.port, collector), name="a")
    return Chain(a, b, app, collector)


def test_a_request_makes_a_client_span_and_its_child_server_span(chain: Chain) -> None:
    r = http_request(chain.a.port, "/headers?x=1", headers={"host": "reviews:9080"})
    assert r.status == 200
    seen = r.json()
    traceparent = seen["traceparent"]
    version, trace_id, app_parent, flags = traceparent.split("-")
    assert (version, flags) == ("00", "01")  # random_sampling defaults to 100 %
    client, server = chain.collector.trace(trace_id, 2)
    # Proxy A started the trace; proxy B's span is its child; the app's parent is B's span.
    assert client.kind == 3 and client.parent_id == ""
    assert server.kind == 2 and server.parent_id == client.span_id
    assert app_parent == server.span_id
    # B3 reaches the app too, naming the same spans.
    assert seen["x-b3-traceid"] == trace_id
    assert seen["x-b3-spanid"] == server.span_id
    assert seen["x-b3-parentspanid"] == client.span_id
    assert seen["x-b3-sampled"] == "1"
    # x-request-id is generated once and kept along the way.
    request_id = seen["x-request-id"]
    assert client.attributes["guid:x-request-id"] == request_id
    assert server.attributes["guid:x-request-id"] == request_id
    assert client.name == server.name == "reviews:9080/headers"
    assert client.service == "productpage.default" and server.service == "reviews.default"
    assert server.attributes["http.status_code"] == "200"
    assert server.attributes["http.url"] == "http://reviews:9080/headers?x=1"
    assert server.attributes["upstream_cluster"] == "next"
    assert server.attributes["istio.canonical_service"] == "reviews"
    assert server.attributes["node_id"].startswith("sidecar~127.0.0.1~reviews-v1-abc")
    assert set(chain.collector.content_types) == {"application/x-protobuf"}


def test_an_incoming_sampled_traceparent_is_the_parent(chain: Chain) -> None:
    r = http_request(
        chain.a.port,
        "/headers",
        headers={"host": "reviews:9080", "traceparent": f"00-{TRACE}-{PARENT}-01",
                 "tracestate": "congo=t61rcWkgMzE"},
    )  # fmt: skip
    seen = r.json()
    client, server = chain.collector.trace(TRACE, 2)
    assert client.parent_id == PARENT
    assert server.parent_id == client.span_id
    assert seen["traceparent"] == f"00-{TRACE}-{server.span_id}-01"
    assert seen["tracestate"] == "congo=t61rcWkgMzE"


def test_an_unsampled_request_propagates_without_spans(chain: Chain) -> None:
    unsampled = "1" * 32
    r = http_request(
        chain.a.port,
        "/headers",
        headers={"host": "reviews:9080", "traceparent": f"00-{unsampled}-{PARENT}-00"},
    )
    seen = r.json()
    _, trace_id, span_id, flags = seen["traceparent"].split("-")
    assert (trace_id, flags) == (unsampled, "00")
    assert span_id != PARENT  # B's (unexported) span still becomes the parent
    assert seen["x-b3-sampled"] == "0"
    # A sampled request afterwards: each proxy exports its spans in order, so once this one's
    # have arrived, any span of the unsampled request would have too.
    http_request(
        chain.a.port,
        "/headers",
        headers={"host": "reviews:9080", "traceparent": f"00-{TRACE}-{PARENT}-01"},
    )
    chain.collector.trace(TRACE, 2)
    assert [s for s in chain.collector.spans if s.trace_id == unsampled] == []


def test_b3_headers_alone_give_the_parent_and_the_decision(chain: Chain) -> None:
    r = http_request(
        chain.a.port,
        "/headers",
        headers={"host": "reviews:9080", "x-b3-traceid": TRACE, "x-b3-spanid": PARENT,
                 "x-b3-sampled": "1"},
    )  # fmt: skip
    seen = r.json()
    client, server = chain.collector.trace(TRACE, 2)
    assert client.parent_id == PARENT
    assert seen["traceparent"] == f"00-{TRACE}-{server.span_id}-01"
    assert seen["x-b3-parentspanid"] == client.span_id


def test_a_5xx_span_is_an_error_and_a_malformed_traceparent_starts_a_new_trace(
    chain: Chain,
) -> None:
    r = http_request(
        chain.a.port, "/status/503", headers={"host": "reviews:9080", "traceparent": "00-zz-01"}
    )
    assert r.status == 503
    # The app's answer carries no trace headers: find the trace by the request id.
    deadline = time.monotonic() + WAIT
    mine: list[Any] = []
    while time.monotonic() < deadline and len(mine) < 2:
        with chain.collector.lock:
            mine = [s for s in chain.collector.spans if s.name == "reviews:9080/status/503"]
        time.sleep(0.05)
    assert len(mine) == 2
    client, server = sorted(mine, key=lambda s: -s.kind)
    assert client.parent_id == ""  # "00-zz-01" is no parent: a new trace starts here
    assert server.parent_id == client.span_id and server.trace_id == client.trace_id
    assert all(s.attributes["error"] == "true" and s.status == 2 for s in mine)  # STATUS_ERROR


def test_random_sampling_zero_exports_nothing_but_still_propagates(
    start_proxy: Callable[..., Proxy],
    make_upstream: Callable[..., Upstream],
    collector: Collector,
) -> None:
    app = make_upstream("reviews")
    quiet = start_proxy(
        sidecar("reviews", "INBOUND", app.port, collector, random_sampling={"value": 0})
    )
    seen = http_request(quiet.port, "/headers", headers={"host": "reviews:9080"}).json()
    assert seen["traceparent"].endswith("-00") and seen["x-b3-sampled"] == "0"
    # An upstream decision to sample is honoured although the local rate is 0.
    http_request(
        quiet.port,
        "/headers",
        headers={"host": "reviews:9080", "traceparent": f"00-{TRACE}-{PARENT}-01"},
    )
    (span,) = collector.trace(TRACE, 1)
    assert span.parent_id == PARENT
    assert len(collector.spans) == 1  # the unsampled request's span never came
    status, text = quiet.admin_get("/stats")
    assert status == 200
    assert "tracing.opentelemetry.spans_sent: 1" in text
    status, dump = quiet.admin_get("/config_dump")  # the provider's config shows as JSON
    assert status == 200 and "envoy.config.trace.v3.OpenTelemetryConfig" in dump


def test_export_failures_are_counted_and_requests_do_not_wait(
    start_proxy: Callable[..., Proxy],
    make_upstream: Callable[..., Upstream],
    collector: Collector,
) -> None:
    collector.fail = True
    app = make_upstream("reviews")
    proxy = start_proxy(sidecar("reviews", "INBOUND", app.port, collector))
    for _ in range(3):
        assert http_request(proxy.port, "/", headers={"host": "reviews:9080"}).status == 200
    stats: dict[str, str] = {}
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and stats.get("spans_dropped") != "3":
        text = proxy.admin_get("/stats")[1]
        prefix = "tracing.opentelemetry."
        stats = {
            k[len(prefix) :]: v.strip()
            for k, _, v in (line.partition(":") for line in text.splitlines())
            if k.startswith(prefix)
        }
        time.sleep(0.05)
    assert stats["spans_dropped"] == "3" and stats["spans_sent"] == "0"
    assert int(stats["export_failures"]) >= 1  # one batch, or more if the requests were slow


def test_spans_queued_at_shutdown_are_exported(
    start_proxy: Callable[..., Proxy],
    make_upstream: Callable[..., Upstream],
    collector: Collector,
) -> None:
    app = make_upstream("reviews")
    proxy = start_proxy(sidecar("reviews", "INBOUND", app.port, collector))
    http_request(
        proxy.port,
        "/",
        headers={"host": "reviews:9080", "traceparent": f"00-{TRACE}-{PARENT}-01"},
    )
    assert proxy.terminate() == 0
    (span,) = collector.trace(TRACE, 1)
    assert span.parent_id == PARENT


def test_every_worker_exports_its_spans(
    start_proxy: Callable[..., Proxy],
    make_upstream: Callable[..., Upstream],
    collector: Collector,
) -> None:
    app = make_upstream("reviews")
    proxy = start_proxy(sidecar("reviews", "INBOUND", app.port, collector), "--concurrency", "2")
    traces = [f"{i:032x}" for i in range(1, 9)]
    for trace_id in traces:  # one connection each: the kernel spreads them over the workers
        headers = {"host": "reviews:9080", "traceparent": f"00-{trace_id}-{PARENT}-01"}
        assert http_request(proxy.port, "/", headers=headers).status == 200
    for trace_id in traces:
        (span,) = collector.trace(trace_id, 1)
        assert span.parent_id == PARENT
