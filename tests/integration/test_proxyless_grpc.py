"""Proxyless gRPC through ``meshlet control``: grpcio's own xDS client, no proxy in between.

As Istio runs it ("gRPC Proxyless Service Mesh", https://istio.io/latest/blog/2021/proxyless-grpc/,
and ``ISTIO-TRANSLATION.md`` §7): the bootstrap that ``GRPC_XDS_BOOTSTRAP`` names carries the
control plane's address, ``server_features: ["xds_v3"]``, an Istio node id and node metadata
``GENERATOR: grpc``; the application dials ``xds:///<service>:<port>``. Here with a real
``meshlet control`` process, real grpcio servers on 127.0.0.2-4 and a grpcio client process:
the client resolves the target through LDS (``helloworld:5000``, an ``api_listener``), RDS,
CDS and EDS, honours a VirtualService's weights to DestinationRule subsets, and follows
VirtualServices applied while it runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.integration.test_control import ControlPlane, meshlet, start_control

pytestmark = pytest.mark.timeout(120)

CLIENT_ID = "sidecar~127.0.0.1~client.default~default.svc.cluster.local"
SHORT = "xds:///helloworld:5000"
FQDN = "xds:///helloworld.default.svc.cluster.local:5000"
NAMESPACED = "xds:///helloworld.default:5000"

# One line in per batch, "<target> <calls>"; one line out: JSON {reply or error: count}.
# GRPC_XDS_BOOTSTRAP is read once per process, hence a process of its own.
CLIENT = r"""
import json, sys, grpc
channels = {}
for line in sys.stdin:
    target, n = line.split()
    if target not in channels:
        channels[target] = grpc.insecure_channel(target)
    say = channels[target].unary_unary("/helloworld.Greeter/SayHello")
    counts = {}
    for _ in range(int(n)):
        try:
            reply = say(b"hi", timeout=10).decode()
        except grpc.RpcError as e:
            reply = f"error {e.code().name}: {e.details()}"
        counts[reply] = counts.get(reply, 0) + 1
    print(json.dumps(counts), flush=True)
"""


def greeter(address: str, reply: str) -> tuple[grpc.Server, int]:
    """A grpcio server on ``address`` whose ``helloworld.Greeter/SayHello`` answers ``reply``
    (raw bytes: a generic handler, no generated stubs)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.method_handlers_generic_handler(
        "helloworld.Greeter",
        {"SayHello": grpc.unary_unary_rpc_method_handler(lambda request, context: reply.encode())},
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{address}:0")
    server.start()
    return server, port


def mesh_yaml(ports: dict[str, int]) -> str:
    """A Service over three WorkloadEntries (v1 on 127.0.0.2, v2 on .3 and .4), each at its
    own server's port, and a DestinationRule with subsets v1 and v2."""
    entries = "".join(
        f"---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n"
        f"metadata: {{name: {name}, namespace: default}}\n"
        f"spec:\n  address: {address}\n  labels: {{app: helloworld, version: {version}}}\n"
        f"  ports: {{grpc: {ports[name]}}}\n"
        for name, address, version in WORKLOADS
    )
    return (
        "apiVersion: v1\nkind: Service\nmetadata: {name: helloworld, namespace: default}\n"
        "spec:\n  selector: {app: helloworld}\n"
        "  ports: [{name: grpc, port: 5000, targetPort: grpc}]\n"
        + entries
        + "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        "metadata: {name: helloworld, namespace: default}\n"
        "spec:\n  host: helloworld\n  subsets:\n"
        "  - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}}\n"
    )


WORKLOADS = (
    ("hello-v1", "127.0.0.2", "v1"),
    ("hello-v2a", "127.0.0.3", "v2"),
    ("hello-v2b", "127.0.0.4", "v2"),
)
V2 = {"hello-v2a", "hello-v2b"}


def weights_yaml(v1: int, v2: int) -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        "metadata: {name: helloworld, namespace: default}\n"
        "spec:\n  hosts: [helloworld]\n  http:\n  - route:\n"
        f"    - {{destination: {{host: helloworld, subset: v1}}, weight: {v1}}}\n"
        f"    - {{destination: {{host: helloworld, subset: v2}}, weight: {v2}}}\n"
    )


def apply(plane: ControlPlane, text: str) -> None:
    result = meshlet(plane, "apply", "-f", "-", stdin=text)
    assert result.returncode == 0, result.stderr


class Client:
    """grpcio's xDS client in a child process, driven one batch of calls at a time."""

    def __init__(self, plane: ControlPlane, tmp_path: Path) -> None:
        bootstrap = tmp_path / "grpc-bootstrap.json"
        bootstrap.write_text(
            json.dumps(
                {
                    "xds_servers": [
                        {
                            "server_uri": f"127.0.0.1:{plane.xds_port}",
                            "channel_creds": [{"type": "insecure"}],
                            "server_features": ["xds_v3"],
                        }
                    ],
                    "node": {
                        "id": CLIENT_ID,
                        "metadata": {"GENERATOR": "grpc", "NAMESPACE": "default"},
                    },
                }
            )
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", CLIENT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "GRPC_XDS_BOOTSTRAP": str(bootstrap)},
        )

    def calls(self, target: str, n: int) -> Counter[str]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{target} {n}\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, f"the client exited with {self.process.poll()}"
        return Counter(json.loads(line))

    def until(self, target: str, done: Callable[[Counter[str]], bool], timeout: float = 60) -> None:
        """Call in small batches until one satisfies ``done`` (config reaches the client
        asynchronously; no assertion on how fast)."""
        deadline = time.monotonic() + timeout
        seen: Counter[str] = Counter()
        while time.monotonic() < deadline:
            seen = self.calls(target, 10)
            if done(seen):
                return
            time.sleep(0.1)
        raise AssertionError(f"{target}: last batch {dict(seen)}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


@pytest.fixture
def greeters() -> Iterator[dict[str, int]]:
    servers: list[grpc.Server] = []
    ports: dict[str, int] = {}
    try:
        for name, address, _ in WORKLOADS:
            server, port = greeter(address, name)
            servers.append(server)
            ports[name] = port
        yield ports
    finally:
        for server in servers:
            server.stop(None)


def only(names: set[str]) -> Callable[[Counter[str]], bool]:
    return lambda counts: bool(counts) and set(counts) <= names


def test_grpcio_resolves_through_meshlet_honours_weights_and_follows_a_live_change(
    tmp_path: Path, greeters: dict[str, int]
) -> None:
    plane = start_control(tmp_path / "state", tmp_path)
    client: Client | None = None
    try:
        apply(plane, mesh_yaml(greeters) + "---\n" + weights_yaml(100, 0))
        client = Client(plane, tmp_path)

        # Resolution: the short name, the FQDN and <name>.<namespace> all reach v1 only.
        client.until(SHORT, only({"hello-v1"}))
        assert client.calls(SHORT, 50) == {"hello-v1": 50}
        assert client.calls(FQDN, 20) == {"hello-v1": 20}
        assert client.calls(NAMESPACED, 20) == {"hello-v1": 20}

        # 50/50, applied live: both subsets, within 6 standard deviations over 400 calls,
        # and round robin over v2's two endpoints.
        apply(plane, weights_yaml(50, 50))
        client.until(SHORT, lambda c: bool(V2 & set(c)))
        counts = client.calls(SHORT, 400)
        assert set(counts) <= {"hello-v1", *V2}, counts
        v2 = counts["hello-v2a"] + counts["hello-v2b"]
        assert 140 <= v2 <= 260, counts
        assert counts["hello-v2a"] > 0 and counts["hello-v2b"] > 0, counts

        # All to v2: v1 stops getting calls.
        apply(plane, weights_yaml(0, 100))
        client.until(SHORT, only(V2))
        assert set(client.calls(SHORT, 50)) <= V2

        # grpcio opens one ADS stream per target: each is subscribed to all four types and
        # has refused nothing it was sent.
        status, text = plane.get("/debug/syncz")
        assert status == 200
        streams = [p for p in json.loads(text) if p["proxy_id"] == CLIENT_ID]
        assert len(streams) == 3
        for stream in streams:
            types: dict[str, Any] = stream["types"]
            assert set(types) == {"lds", "rds", "cds", "eds"}
            assert all(t["last_nack"] is None for t in types.values()), types
    finally:
        if client is not None:
            client.close()
        plane.stop()
