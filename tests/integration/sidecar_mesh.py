"""A small mesh on loopback: a real ``meshlet control``, the Service ``web`` and its pods applied
with ``meshlet apply``, a ``meshlet proxy`` sidecar on each pod IP and a threaded HTTP
application behind the server's sidecar. Requests go the way an application with
``HTTP_PROXY`` sends them: to the client's sidecar (outbound, :15001), on to the server's
sidecar (inbound) and to the application.

Each test module picks its own ``127.1.x.y`` pod IPs, so modules never share an address.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from meshlet.control.registry import INBOUND_PORT_ANNOTATION
from meshlet.runtime.sidecar import ADMIN_PORT, ProxyNode, proxy_bootstrap
from tests.integration.conftest import meshlet_cmd
from tests.integration.test_control import ControlPlane, meshlet
from tests.waiting import wait_until

APP_PORT = 8080
WEB_URL = f"http://web:{APP_PORT}"  # the Service, as a client in the mesh names it

WEB: dict[str, object] = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "web", "namespace": "default"},
    "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": APP_PORT}]},
}


@dataclass(frozen=True, kw_only=True)
class Workload:
    """One pod of the mesh and its sidecar: ``meshlet apply`` gets ``pod``, ``meshlet proxy``
    is bootstrapped as ``node``. Its service account is its ``app`` label."""

    pod_name: str
    ip: str
    workload: str  # the Deployment's name
    labels: Mapping[str, str]

    @property
    def pod(self) -> dict[str, object]:
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": self.pod_name,
                "namespace": "default",
                "labels": dict(self.labels),
                "annotations": {INBOUND_PORT_ANNOTATION: "15006"},
            },
            "spec": {
                "serviceAccountName": self.labels["app"],
                "containers": [
                    {"name": "app", "image": "x", "ports": [{"containerPort": APP_PORT}]}
                ],
            },
            "status": {
                "phase": "Running",
                "podIP": self.ip,
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }

    @property
    def node(self) -> ProxyNode:
        return ProxyNode(
            pod=self.pod_name,
            namespace="default",
            ip=self.ip,
            workload=self.workload,
            service_account=self.labels["app"],
            labels=self.labels,
        )


# -- applications ---------------------------------------------------------------------------


class AppHandler(BaseHTTPRequestHandler):
    """An application's request handler: quiet, and ``reply`` writes one whole response."""

    def reply(self, status: int, body: bytes = b"", content_type: str | None = None) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def app(ip: str, port: int, handler: type[BaseHTTPRequestHandler]) -> Iterator[None]:
    """An HTTP application on ``ip:port`` served by ``handler``, in threads, while entered."""
    server = ThreadingHTTPServer((ip, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


# -- the control plane and the sidecars -----------------------------------------------------


def eventually(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    wait_until(what, check, timeout, interval=0.1)


def apply(plane: ControlPlane, tmp_path: Path, objects: list[dict[str, object]]) -> None:
    path = tmp_path / f"apply-{time.monotonic_ns()}.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
    done = meshlet(plane, "apply", "-f", str(path))
    assert done.returncode == 0, done.stderr


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
                lambda ip=node.ip: status_of(f"http://{ip}:{ADMIN_PORT}/ready") == 200,
                f"sidecar {node.pod} ready",
            )
        yield
    finally:
        for p in proxies:
            p.terminate()
        for p in proxies:
            p.wait(15)


@contextlib.contextmanager
def running_mesh(
    plane: ControlPlane,
    tmp_path: Path,
    workloads: list[Workload],
    apps: list[AbstractContextManager[None]],
    objects: list[dict[str, object]] | None = None,
) -> Iterator[ControlPlane]:
    """``plane`` with the Service ``web``, the workloads' pods and ``objects`` applied, a ready
    sidecar per workload and ``apps`` running; ``plane`` is stopped on exit."""
    try:
        apply(plane, tmp_path, [WEB, *(w.pod for w in workloads), *(objects or [])])
        with (
            running_sidecars(plane, tmp_path, [w.node for w in workloads]),
            contextlib.ExitStack() as running,
        ):
            for each in apps:
                running.enter_context(each)
            yield plane
    finally:
        plane.stop()


@contextlib.contextmanager
def two_pods(
    plane: ControlPlane,
    tmp_path: Path,
    ips: tuple[str, str],
    handler: type[BaseHTTPRequestHandler],
    *,
    client_version: str | None = None,
) -> Iterator[ControlPlane]:
    """``running_mesh`` of the two pods most tests need, a client and a server:
    ``client-ccc-1`` (app ``client``) and ``web-v1-aaa-1`` (app ``web``, version ``v1``)
    serving ``handler``, at ``ips`` (client, server)."""
    client_ip, server_ip = ips
    client = {"app": "client"} | ({"version": client_version} if client_version else {})
    workloads = [
        Workload(pod_name="client-ccc-1", ip=client_ip, workload="client", labels=client),
        Workload(
            pod_name="web-v1-aaa-1",
            ip=server_ip,
            workload="web-v1",
            labels={"app": "web", "version": "v1"},
        ),
    ]
    with running_mesh(plane, tmp_path, workloads, [app(server_ip, APP_PORT, handler)]):
        yield plane


# -- requests -------------------------------------------------------------------------------


def via(
    proxy_ip: str, url: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, str]:
    """One request with the client's sidecar as its HTTP proxy, as an application with
    ``HTTP_PROXY`` makes it: (status, body), status 0 if curl got no answer."""
    args = ["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "-x", f"{proxy_ip}:15001"]
    args += ["-X", method]
    for k, v in (headers or {}).items():
        args += ["-H", f"{k}: {v}"]
    done = subprocess.run([*args, url], capture_output=True, text=True, timeout=10)
    body, _, code = done.stdout.rpartition("\n")
    return int(code or 0), body


def status_of(url: str) -> int:
    """A direct GET's status (a sidecar's admin port), 0 if nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def text_of(url: str) -> str:
    """A direct GET's body (a sidecar's admin port)."""
    with urllib.request.urlopen(url, timeout=5) as r:
        return str(r.read().decode())
