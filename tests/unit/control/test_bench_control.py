"""The control-plane benchmark's synthetic mesh is valid configuration of the issue's size,
and its Sidecar-scoped proxies see the 10 services the benchmark claims (bench/control.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from meshlet.control.generators import build_snapshot
from meshlet.control.translate import build_all

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
control = pytest.importorskip("control")


def test_the_small_mesh_validates_and_scopes_each_sidecar_to_its_services() -> None:
    mesh = control.Mesh(services=40, endpoints_per_service=4, namespaces=4, scope=5)
    objects = mesh.objects()
    kinds = [o["kind"] for o in objects]
    assert kinds.count("Service") == 40 and kinds.count("WorkloadEntry") == 160
    assert kinds.count("VirtualService") == 40 and kinds.count("DestinationRule") == 40
    snapshot = build_snapshot(objects)  # every object validates, or it is left out
    assert len(snapshot.services) == 40 and len(snapshot.virtual_services) == 40

    proxy = mesh.proxy(7)
    built = build_all(snapshot, proxy)
    hosts = sorted({c.name.rsplit("|", 1)[1] for c in built.clusters if "outbound|" in c.name})
    expected = sorted(
        f"svc{i}.{mesh.namespace(i)}.svc.cluster.local" for i in mesh.scoped_services(3)
    )
    assert hosts == expected and "svc0.ns0.svc.cluster.local" in hosts
    # the proxy's own workload is a service instance: it has an inbound side
    assert snapshot.instances(proxy.ip)


def test_each_round_changes_the_virtual_service() -> None:
    mesh = control.Mesh()
    weights = {
        mesh.changed_virtual_service(n)["spec"]["http"][1]["route"][0]["weight"]
        for n in range(1, 41)
    }
    assert len(weights) == 40 and 90 not in weights
