"""One request through the gateway is one trace, nested hop by hop (issue 6, "Tracing").

Istio's distributed tracing task (istio.io/latest/docs/tasks/observability/distributed-tracing/
overview): each proxy makes a span for each request it handles and forwards the trace context;
the applications copy the context from their inbound request to their outbound calls (Bookinfo
does), so the spans of one user request form one tree. Envoy makes a server span for an
inbound (ingress) request and a client span for an outbound (egress) one
(envoyproxy.io "Tracing" architecture overview; the kind follows the listener's
``traffic_direction``). Istio marks gateway listeners OUTBOUND, so a gateway's span is a client
span, as in Istio. The gateway honours the sampling decision of the caller's ``traceparent``
(W3C Trace Context, "sampled" flag).

With Istio's ``virtual-service-reviews-v3.yaml`` (reviews v3 calls ratings), one request gives
gateway (client) → productpage (server) → productpage (client) → reviews (server) → reviews
(client) → ratings (server), plus productpage's client and server spans of its details call.
"""

from __future__ import annotations

import json
import secrets
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Mesh, start_mesh, wait_until
from tests.samples import SAMPLES

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(240),
    pytest.mark.skipif(SAMPLES is None, reason="Istio's sample files are not present"),
]

BOOKINFO = (SAMPLES or Path("/nonexistent")) / "bookinfo"
NETWORKING = BOOKINFO / "networking"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    running = start_mesh(
        tmp_path_factory.mktemp("tracing"),
        BOOKINFO / "platform" / "kube" / "bookinfo.yaml",
        NETWORKING / "bookinfo-gateway.yaml",
        NETWORKING / "destination-rule-all.yaml",
        extra=("--trace-sampling", "100"),
    )
    try:
        running.apply(NETWORKING / "virtual-service-reviews-v3.yaml")
        yield running
    finally:
        running.down()


def _dashboard(mesh: Mesh) -> str:
    return str(json.loads((mesh.state_dir / "mesh.json").read_text())["dashboard"])


def _get_json(url: str) -> Any:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def _request_with_trace(mesh: Mesh, trace_id: str, parent: str) -> int:
    request = urllib.request.Request(
        mesh.gateway + "/productpage", headers={"traceparent": f"00-{trace_id}-{parent}-01"}
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=30) as response:
        response.read()
        return int(response.status)


def _service(span: dict[str, Any]) -> str:
    return str(span["service"]).split(".", 1)[0]


WANTED = {"productpage", "details", "reviews", "ratings"}


def _complete(mesh: Mesh, trace_id: str) -> list[dict[str, Any]] | None:
    """The trace's spans once every service's server span has arrived; else None."""
    trace = _get_json(f"{_dashboard(mesh)}/api/traces/{trace_id}")
    if trace is None:
        return None
    spans: list[dict[str, Any]] = trace["spans"]
    servers = {_service(s) for s in spans if s["kind"] == "SERVER"}
    gateway = any(_service(s) == "istio-ingressgateway" for s in spans)
    return spans if gateway and servers >= WANTED else None


def test_one_gateway_request_is_one_trace_nested_across_the_services(mesh: Mesh) -> None:
    trace_id, caller = secrets.token_hex(16), secrets.token_hex(8)
    assert _request_with_trace(mesh, trace_id, caller) == 200
    spans = wait_until(
        "the spans of the trace at the dashboard", lambda: _complete(mesh, trace_id), timeout=30
    )
    by_id = {s["span_id"]: s for s in spans}
    # One trace: every span's parent is in it, except the gateway's, which is the caller's.
    roots = [s for s in spans if s["parent_span_id"] not in by_id]
    assert [(_service(r), r["kind"], r["parent_span_id"]) for r in roots] == [
        ("istio-ingressgateway", "CLIENT", caller)
    ], roots

    def chain_to(service: str) -> list[tuple[str, str]]:
        """(service, kind) from the root down to the server span of ``service``."""
        (span,) = [s for s in spans if _service(s) == service and s["kind"] == "SERVER"]
        path = []
        while span is not None:
            path.append((_service(span), span["kind"]))
            span = by_id.get(span["parent_span_id"])
        return path[::-1]

    assert chain_to("ratings") == [
        ("istio-ingressgateway", "CLIENT"),
        ("productpage", "SERVER"),
        ("productpage", "CLIENT"),
        ("reviews", "SERVER"),
        ("reviews", "CLIENT"),
        ("ratings", "SERVER"),
    ]
    assert chain_to("details") == [
        ("istio-ingressgateway", "CLIENT"),
        ("productpage", "SERVER"),
        ("productpage", "CLIENT"),
        ("details", "SERVER"),
    ]
    # A child starts within its parent (same machine, one clock). Its end may trail the
    # parent's by a moment: a server span ends after its last byte is written and logged.
    for span in spans:
        parent = by_id.get(span["parent_span_id"])
        if parent is None:
            continue
        parent_end = parent["start_unix_ms"] + parent["duration_ms"]
        assert parent["start_unix_ms"] - 1 <= span["start_unix_ms"] <= parent_end, (span, parent)
    # The server spans carry Envoy's attributes.
    ratings = next(s for s in spans if _service(s) == "ratings" and s["kind"] == "SERVER")
    assert ratings["attributes"]["http.status_code"] in ("200", 200)
    assert ratings["attributes"]["http.method"] == "GET"


def test_an_unsampled_caller_decision_is_honoured(mesh: Mesh) -> None:
    """``traceparent`` with flags 00: the mesh samples at 100%, but the caller said no."""
    trace_id = secrets.token_hex(16)
    request = urllib.request.Request(
        mesh.gateway + "/productpage",
        headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-00"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=30) as response:
        assert response.status == 200
    # A sampled request sent afterwards shows up; by then the unsampled one would have too.
    marker, caller = secrets.token_hex(16), secrets.token_hex(8)
    assert _request_with_trace(mesh, marker, caller) == 200
    # Each proxy exports its spans in order, so once every proxy's span of the later request
    # has arrived, any span of the earlier one would have arrived too.
    wait_until("the later, sampled trace", lambda: _complete(mesh, marker), timeout=30)
    assert _get_json(f"{_dashboard(mesh)}/api/traces/{trace_id}") is None
