"""The tables ``meshlet get pods|deployments|endpoints`` print, with kubectl's columns and
rules (READY counts ready containers; a waiting reason such as CrashLoopBackOff replaces the
phase; Endpoints hold only ready pods, at the target port, named ports resolved)."""

from __future__ import annotations

from typing import Any

from meshlet.cli.config import deployments_table, endpoint_addresses
from meshlet.cli.mesh import pod_state, pods_table


def pod(
    name: str,
    *,
    ready: bool = True,
    ip: str = "127.1.0.5",
    labels: dict[str, str] | None = None,
    waiting: str = "",
    restarts: int = 0,
    owner: str = "reviews-v1",
) -> dict[str, Any]:
    app_state: dict[str, Any] = {"waiting": {"reason": waiting}} if waiting else {"running": {}}
    return {
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": labels or {"app": "reviews"},
            "ownerReferences": [{"kind": "Deployment", "name": owner}],
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {
            "containers": [{"name": "reviews", "ports": [{"name": "http", "containerPort": 9080}]}]
        },
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "containerStatuses": [
                {"name": "istio-proxy", "ready": True, "restartCount": 0, "state": {"running": {}}},
                {"name": "reviews", "ready": ready, "restartCount": restarts, "state": app_state},
            ],
        },
    }


def test_pod_state_counts_ready_containers_and_shows_a_waiting_reason() -> None:
    assert pod_state(pod("a")) == ("2/2", "Running", 0)
    crashing = pod("b", ready=False, waiting="CrashLoopBackOff", restarts=3)
    assert pod_state(crashing) == ("1/2", "CrashLoopBackOff", 3)


def test_pods_table_has_kubectls_columns_and_wide_adds_the_ip() -> None:
    lines = pods_table([pod("reviews-v1-abc-x1")], wide=True).splitlines()
    assert lines[0].split() == ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE"]
    assert lines[1].split()[:4] == ["reviews-v1-abc-x1", "2/2", "Running", "0"]
    assert lines[1].split()[-2:] == ["127.1.0.5", "meshlet"]


def test_deployments_count_their_own_ready_pods() -> None:
    deployment = {"metadata": {"name": "reviews-v1", "namespace": "default"}, "spec": {}}
    pods = [pod("a"), pod("b", ready=False), pod("c", owner="other")]
    [_, row] = deployments_table([deployment], pods, all_namespaces=False).splitlines()
    # replicas defaults to 1 (Kubernetes); two pods are its own, one of them ready.
    assert row.split()[:4] == ["reviews-v1", "1/1", "2", "1"]


def test_endpoints_are_ready_selected_pods_at_the_resolved_target_port() -> None:
    service = {
        "metadata": {"name": "reviews", "namespace": "default"},
        "spec": {"selector": {"app": "reviews"}, "ports": [{"port": 80, "targetPort": "http"}]},
    }
    pods = [
        pod("a", ip="127.1.0.5"),
        pod("b", ip="127.1.0.6", ready=False),
        pod("c", ip="127.1.0.7", labels={"app": "ratings"}),
    ]
    assert endpoint_addresses(service, pods) == [{"ip": "127.1.0.5", "port": 9080, "pod": "a"}]
