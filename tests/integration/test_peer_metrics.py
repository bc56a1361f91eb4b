"""Istio's standard metrics with real peer labels, from both sides, through real proxies.

What Istio documents (https://istio.io/latest/docs/reference/config/metrics/; the exchange is
istio/proxy's ``peer_metadata`` filter) and these tests observe:
* a request client sidecar -> server sidecar is reported by the server's sidecar with
  ``reporter="destination"`` and the client's ``source_workload``/``source_app``/
  ``source_version``, and by the client's sidecar with ``reporter="source"`` and the server's
  ``destination_workload``/``destination_app``/``destination_version``;
* the application never sees ``x-envoy-peer-metadata(-id)``, nor does the client;
* a destination without a sidecar is named from the endpoint's EDS metadata
  (``istio.workload``), app and version unknown;
* each sidecar serves its metrics at ``<pod IP>:15090/stats/prometheus`` (Istio's
  ``envoy-prometheus`` listener) and the scrapes themselves are not counted as requests.

The first tests use static bootstraps (the proxy alone); the last one runs a real
``meshlet control``, whose listeners carry the ``istio.metadata_exchange`` filter.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshlet.runtime.sidecar import PROMETHEUS_PORT
from tests.integration.conftest import ROUTER, Proxy, Upstream, bootstrap, cluster
from tests.integration.sidecar_mesh import WEB_URL, AppHandler, eventually, two_pods
from tests.integration.test_control import ControlPlane, start_control

pytestmark = pytest.mark.timeout(120)

TYPED_STRUCT = "type.googleapis.com/xds.type.v3.TypedStruct"
MX_FILTER = {
    "name": "istio.metadata_exchange",
    "typed_config": {
        "@type": TYPED_STRUCT,
        "type_url": "type.googleapis.com/io.istio.http.peer_metadata.Config",
        "value": {},
    },
}
ROUTER_FILTER = {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}
PEER_HEADERS = {"x-envoy-peer-metadata", "x-envoy-peer-metadata-id"}


def node(pod: str, workload: str, app: str, version: str) -> dict[str, Any]:
    return {
        "id": f"sidecar~127.0.0.1~{pod}.default~default.svc.cluster.local",
        "cluster": f"{workload}.default",
        "metadata": {
            "NAMESPACE": "default",
            "WORKLOAD_NAME": workload,
            "POD_NAME": pod,
            "SERVICE_ACCOUNT": app,
            "CLUSTER_ID": "Kubernetes",
            "LABELS": {"app": app, "version": version},
        },
    }


def sidecar_bootstrap(
    node_: dict[str, Any], direction: str, clusters: list[dict[str, Any]]
) -> dict[str, Any]:
    config = bootstrap(clusters=clusters, http_filters=[MX_FILTER, ROUTER_FILTER])
    config["node"] = node_
    config["static_resources"]["listeners"][0]["traffic_direction"] = direction
    return config


def istio_requests(text: str) -> list[dict[str, str]]:
    """The label sets of ``istio_requests_total``, one per series, parsed by the reference
    client library."""
    return [
        dict(s.labels)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "istio_requests_total"
    ]


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()


@pytest.fixture
def pair(
    make_upstream: Callable[..., Upstream], start_proxy: Callable[..., Proxy]
) -> tuple[Proxy, Proxy, Upstream]:
    """client sidecar (outbound) -> server sidecar (inbound) -> app, from static bootstraps."""
    app = make_upstream("web")
    # istiod's telemetry metadata: the services an (inbound) cluster serves.
    services = [{"host": "web.default.svc.cluster.local", "name": "web", "namespace": "default"}]
    inbound = cluster(
        "inbound|8080||", app.port, metadata={"filter_metadata": {"istio": {"services": services}}}
    )
    server = start_proxy(
        sidecar_bootstrap(node("web-v1-aaa-1", "web-v1", "web", "v1"), "INBOUND", [inbound]),
        name="server",
    )
    client = start_proxy(
        sidecar_bootstrap(
            node("client-ccc-1", "client", "client", "v3"),
            "OUTBOUND",
            [cluster("outbound|8080||web.default.svc.cluster.local", server.port)],
        ),
        name="client",
    )
    return client, server, app


def test_both_sidecars_report_the_other_side_by_its_workload(pair):
    client, server, app = pair
    # A client trying to pose as someone else: its headers are replaced on the way out.
    status, headers, _ = get(
        client.url + "/headers", {"x-envoy-peer-metadata": "Zm9yZ2Vk", "x-user": "a"}
    )
    assert status == 200
    assert not PEER_HEADERS & set(headers)  # the client never sees the server's
    assert not PEER_HEADERS & set(app.seen[-1].headers)  # the app never sees the client's
    assert app.seen[-1].headers["x-user"] == "a"

    (inbound,) = istio_requests(server.admin_get("/stats/prometheus")[1])
    assert inbound["reporter"] == "destination"
    assert (inbound["source_workload"], inbound["source_app"], inbound["source_version"]) == (
        "client",
        "client",
        "v3",
    )
    assert inbound["source_canonical_service"] == "client"
    assert inbound["source_cluster"] == "Kubernetes"
    assert (inbound["destination_workload"], inbound["destination_app"]) == ("web-v1", "web")
    # The inbound cluster's metadata names the service, not the request's Host.
    assert inbound["destination_service"] == "web.default.svc.cluster.local"
    assert inbound["destination_service_name"] == "web"

    (outbound,) = istio_requests(client.admin_get("/stats/prometheus")[1])
    assert outbound["reporter"] == "source"
    assert outbound["source_workload"] == "client"
    assert (
        outbound["destination_workload"],
        outbound["destination_app"],
        outbound["destination_version"],
    ) == ("web-v1", "web", "v1")
    assert outbound["destination_service"] == "web.default.svc.cluster.local"


def test_a_destination_without_a_sidecar_is_named_from_eds_metadata(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
):
    target = cluster("outbound|8080||web.default.svc.cluster.local", upstream.port)
    lbe = target["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    lbe["metadata"] = {
        "filter_metadata": {"istio": {"workload": "web-v1;default;web;v1;Kubernetes"}}
    }
    client = start_proxy(
        sidecar_bootstrap(node("client-ccc-1", "client", "client", "v3"), "OUTBOUND", [target])
    )
    assert get(client.url + "/")[0] == 200
    (outbound,) = istio_requests(client.admin_get("/stats/prometheus")[1])
    assert outbound["destination_workload"] == "web-v1"
    assert outbound["destination_canonical_service"] == "web"
    assert outbound["destination_canonical_revision"] == "v1"
    assert outbound["destination_app"] == "unknown"  # not in Istio's endpoint metadata


# -- a real control plane ------------------------------------------------------------------------

CLIENT_IP, SERVER_IP = "127.1.9.60", "127.1.9.61"


class _EchoHeaders(AppHandler):
    """Answers with the request's headers, as JSON."""

    def do_GET(self) -> None:
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.reply(200, body, "application/json")


def via_client(path: str) -> tuple[int, dict[str, Any], str]:
    """One request through the client's sidecar as HTTP proxy (the app's HTTP_PROXY)."""
    done = subprocess.run(
        ["curl", "-s", "-D", "-", "-x", f"{CLIENT_IP}:15001", f"{WEB_URL}{path}"],
        capture_output=True,
        timeout=10,
    )
    head, _, body = done.stdout.decode().partition("\r\n\r\n")
    lines = head.split("\r\n")
    status = int(lines[0].split()[1]) if lines and lines[0] else 0
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    return status, headers, body


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[ControlPlane]:
    plane = start_control(tmp_path / "state", tmp_path)
    with two_pods(plane, tmp_path, (CLIENT_IP, SERVER_IP), _EchoHeaders, client_version="v3"):
        yield plane


def scrape(ip: str) -> list[dict[str, str]]:
    """The sidecar's metrics the way Prometheus scrapes a pod: <pod IP>:15090."""
    status, headers, body = get(f"http://{ip}:{PROMETHEUS_PORT}/stats/prometheus")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    return istio_requests(body.decode())


def test_sidecars_of_a_real_mesh_report_each_other_on_15090(mesh: ControlPlane) -> None:
    eventually(lambda: via_client("/")[0] == 200, "the client's sidecar routes to web")
    for _ in range(3):
        status, headers, body = via_client("/")
        assert status == 200
        assert not PEER_HEADERS & set(headers)  # nor does the client see the exchange
        assert not PEER_HEADERS & set(json.loads(body))  # the app never sees the exchange

    def reported(ip: str, reporter: str) -> list[dict[str, str]]:
        return [s for s in scrape(ip) if s["reporter"] == reporter]

    eventually(lambda: bool(reported(SERVER_IP, "destination")), "server reports")
    (inbound, *others) = reported(SERVER_IP, "destination")
    assert not others, others  # one series: every request named the same peer
    assert (inbound["source_workload"], inbound["source_app"], inbound["source_version"]) == (
        "client",
        "client",
        "v3",
    )
    assert inbound["destination_workload"] == "web-v1"
    # No CA in this mesh: plaintext between the sidecars, so no principals (mTLS gives them).
    assert inbound["connection_security_policy"] == "none"

    outbound = [s for s in reported(CLIENT_IP, "source") if s["destination_app"] != "unknown"]
    assert outbound, scrape(CLIENT_IP)
    (series,) = outbound
    assert (
        series["destination_workload"],
        series["destination_app"],
        series["destination_version"],
    ) == ("web-v1", "web", "v1")
    assert series["source_workload"] == "client"
    assert series["destination_service"] == "web.default.svc.cluster.local"
    # Scraping 15090 is not a request of the mesh: no series names the stats listener.
    assert all(s["destination_service"] != "prometheus_stats" for s in scrape(CLIENT_IP))
