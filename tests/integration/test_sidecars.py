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

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshlet.runtime.sidecar import ADMIN_PORT
from tests.integration.conftest import free_port
from tests.integration.sidecar_mesh import (
    APP_PORT,
    AppHandler,
    Workload,
    app,
    apply,
    eventually,
    running_mesh,
    text_of,
    via,
)
from tests.integration.test_control import ControlPlane, start_control

pytestmark = pytest.mark.timeout(120)

CLIENT_IP = "127.1.9.20"
V1_IP, V2_IP = "127.1.9.10", "127.1.9.11"
WORKLOADS = [
    Workload(pod_name="client-ccc-1", ip=CLIENT_IP, workload="client", labels={"app": "client"}),
    Workload(
        pod_name="web-v1-aaa-1", ip=V1_IP, workload="web-v1", labels={"app": "web", "version": "v1"}
    ),
    Workload(
        pod_name="web-v2-bbb-1", ip=V2_IP, workload="web-v2", labels={"app": "web", "version": "v2"}
    ),
]


def named(name: str) -> type[AppHandler]:
    """An application that answers every GET with its ``name``."""

    class Named(AppHandler):
        def do_GET(self) -> None:
            self.reply(200, name.encode())

    return Named


DESTINATION_RULE: dict[str, object] = {
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
}


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


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[ControlPlane]:
    with running_mesh(
        start_control(tmp_path / "state", tmp_path),
        tmp_path,
        WORKLOADS,
        [app(V1_IP, APP_PORT, named("v1")), app(V2_IP, APP_PORT, named("v2"))],
        [DESTINATION_RULE, shift(100, 0)],
    ) as plane:
        yield plane


def test_requests_cross_both_sidecars_and_follow_weighted_subsets(
    mesh: ControlPlane, tmp_path: Path
) -> None:
    for _ in range(10):
        assert via(CLIENT_IP, f"http://web:{APP_PORT}/") == (200, "v1")
    # The server's sidecar took them in on its inbound listener.
    stats = text_of(f"http://{V1_IP}:{ADMIN_PORT}/stats")
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
    with app("127.0.0.1", port, named("outside")):
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
