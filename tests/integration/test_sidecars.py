"""Sidecars configured by a real ``meshlet control``: applications on pod IPs, each behind its
own proxy, requests through the client's outbound listener (as ``HTTP_PROXY``) to the server's
inbound listener and on to the application.

What Istio documents and these tests observe through real requests:
* a VirtualService's weighted routes to DestinationRule subsets, and a live change of them
  (istio.io "Traffic shifting");
* a request to a host the mesh does not know leaves through PassthroughCluster with the
  default ``outboundTrafficPolicy: ALLOW_ANY``, and is refused (502) with REGISTRY_ONLY
  (istio.io "Accessing external services");
* the server's sidecar sees the request on its inbound listener (reporter "destination").
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from meshlet.control.registry import INBOUND_PORT_ANNOTATION
from meshlet.runtime.sidecar import ADMIN_PORT, ProxyNode, proxy_bootstrap
from tests.integration.conftest import free_port, meshlet_cmd
from tests.integration.test_control import ControlPlane, meshlet, start_control

pytestmark = pytest.mark.timeout(120)

CLIENT_IP = "127.1.9.20"
V1_IP, V2_IP = "127.1.9.10", "127.1.9.11"
APP_PORT = 8080


class _Named(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    name = ""


class _Handler(BaseHTTPRequestHandler):
    server: _Named

    def do_GET(self) -> None:
        body = self.server.name.encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def app(ip: str, port: int, name: str) -> Iterator[None]:
    server = _Named((ip, port), _Handler)
    server.name = name
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def pod(name: str, ip: str, labels: dict[str, str]) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": labels,
            "annotations": {INBOUND_PORT_ANNOTATION: "15006"},
        },
        "spec": {
            "serviceAccountName": labels["app"],
            "containers": [{"name": "app", "image": "x", "ports": [{"containerPort": APP_PORT}]}],
        },
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


MESH = [
    {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": APP_PORT}]},
    },
    pod("web-v1-aaa-1", V1_IP, {"app": "web", "version": "v1"}),
    pod("web-v2-bbb-1", V2_IP, {"app": "web", "version": "v2"}),
    pod("client-ccc-1", CLIENT_IP, {"app": "client"}),
    {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "host": "web",
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {"name": "v2", "labels": {"version": "v2"}},
            ],
        },
    },
]


def shift(v1: int, v2: int) -> dict[str, object]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "hosts": ["web"],
            "http": [
                {
                    "route": [
                        {"destination": {"host": "web", "subset": "v1"}, "weight": v1},
                        {"destination": {"host": "web", "subset": "v2"}, "weight": v2},
                    ]
                }
            ],
        },
    }


def apply(plane: ControlPlane, tmp_path: Path, objects: list[dict[str, object]]) -> None:
    path = tmp_path / f"apply-{time.monotonic_ns()}.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
    done = meshlet(plane, "apply", "-f", str(path))
    assert done.returncode == 0, done.stderr


def via(proxy_ip: str, url: str) -> tuple[int, str]:
    """One request with the client's sidecar as its HTTP proxy, as an application with
    ``HTTP_PROXY`` makes it."""
    done = subprocess.run(
        ["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "-x", f"{proxy_ip}:15001", url],
        capture_output=True,
        text=True,
        timeout=10,
    )
    body, _, code = done.stdout.rpartition("\n")
    return int(code or 0), body


def eventually(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting: {what}")


@contextlib.contextmanager
def running_sidecars(plane: ControlPlane, tmp_path: Path, nodes: list[ProxyNode]) -> Iterator[None]:
    """``meshlet proxy`` for each node, bootstrapped to ``plane``; ready on entry, stopped on
    exit."""
    proxies: list[subprocess.Popen[bytes]] = []
    try:
        for node in nodes:
            config = tmp_path / f"{node.pod}.json"
            config.write_text(json.dumps(proxy_bootstrap(node, f"127.0.0.1:{plane.xds_port}")))
            proxies.append(
                subprocess.Popen(
                    meshlet_cmd("proxy", "-c", str(config)),
                    stdout=subprocess.DEVNULL,
                    stderr=(tmp_path / f"{node.pod}.err").open("wb"),
                )
            )
        for node in nodes:
            eventually(
                lambda ip=node.ip: _get(f"http://{ip}:{ADMIN_PORT}/ready") == 200,
                f"sidecar {node.pod} ready",
            )
        yield
    finally:
        for p in proxies:
            p.terminate()
        for p in proxies:
            p.wait(15)


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[ControlPlane]:
    plane = start_control(tmp_path / "state", tmp_path)
    try:
        apply(plane, tmp_path, [*MESH, shift(100, 0)])
        nodes = [
            ProxyNode(pod="client-ccc-1", namespace="default", ip=CLIENT_IP, workload="client"),
            ProxyNode(pod="web-v1-aaa-1", namespace="default", ip=V1_IP, workload="web-v1"),
            ProxyNode(pod="web-v2-bbb-1", namespace="default", ip=V2_IP, workload="web-v2"),
        ]
        with (
            running_sidecars(plane, tmp_path, nodes),
            app(V1_IP, APP_PORT, "v1"),
            app(V2_IP, APP_PORT, "v2"),
        ):
            yield plane
    finally:
        plane.stop()


def _get(url: str) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def test_requests_cross_both_sidecars_and_follow_weighted_subsets(
    mesh: ControlPlane, tmp_path: Path
) -> None:
    for _ in range(10):
        assert via(CLIENT_IP, f"http://web:{APP_PORT}/") == (200, "v1")
    # The server's sidecar took them in on its inbound listener.
    stats = _text(f"http://{V1_IP}:{ADMIN_PORT}/stats")
    assert f"cluster.inbound|{APP_PORT}||.upstream_rq_200: 10" in stats

    apply(mesh, tmp_path, [shift(50, 50)])
    eventually(lambda: via(CLIENT_IP, f"http://web:{APP_PORT}/")[1] == "v2", "v2 appears")
    seen = Counter(
        via(CLIENT_IP, f"http://web.default.svc.cluster.local:{APP_PORT}/")[1] for _ in range(200)
    )
    # 200 draws at p = 0.5: outside 70..130 has probability below 1e-5.
    assert set(seen) == {"v1", "v2"}
    assert 70 <= seen["v1"] <= 130, seen

    apply(mesh, tmp_path, [shift(0, 100)])
    eventually(lambda: via(CLIENT_IP, f"http://web:{APP_PORT}/")[1] == "v2", "only v2")
    eventually(
        lambda: all(via(CLIENT_IP, f"http://web:{APP_PORT}/")[1] == "v2" for _ in range(20)),
        "all v2",
    )


def test_unknown_hosts_pass_through_by_default_and_are_refused_with_registry_only(
    mesh: ControlPlane, tmp_path: Path
) -> None:
    port = free_port()
    with app("127.0.0.1", port, "outside"):
        assert via(CLIENT_IP, f"http://127.0.0.1:{port}/") == (200, "outside")
        sidecar = {
            "apiVersion": "networking.istio.io/v1",
            "kind": "Sidecar",
            "metadata": {"name": "default", "namespace": "default"},
            "spec": {"outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"}},
        }
        apply(mesh, tmp_path, [sidecar])
        eventually(
            lambda: via(CLIENT_IP, f"http://127.0.0.1:{port}/")[0] == 502, "REGISTRY_ONLY 502"
        )
        # Registered services still work.
        assert via(CLIENT_IP, f"http://web:{APP_PORT}/")[0] == 200


def _text(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        return str(r.read().decode())
