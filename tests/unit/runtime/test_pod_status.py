"""The pod layer's pure parts: restart back-off, phase, and the Kubernetes status JSON."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshlet.runtime.pod import (
    ContainerSpec,
    ContainerStatus,
    PodSpec,
    PodStatus,
    RestartBackoff,
    exit_code,
    pod_phase,
    to_kube_status,
)
from meshlet.runtime.process import ProcessSpec

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
T1 = datetime(2024, 5, 1, 12, 0, 7, 250000, tzinfo=UTC)


def test_backoff_restarts_at_once_then_doubles_from_base_up_to_max() -> None:
    # kubelet: the first restart is immediate; CrashLoopBackOff delays double up to the cap.
    backoff = RestartBackoff(base=1.0, max=5.0, reset_after=60.0)
    assert [backoff.next_delay(0.1) for _ in range(6)] == [0.0, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_backoff_resets_after_a_long_enough_run() -> None:
    backoff = RestartBackoff(base=1.0, max=30.0, reset_after=60.0)
    for _ in range(4):
        backoff.next_delay(1.0)
    assert backoff.next_delay(60.0) == 0.0
    assert backoff.next_delay(1.0) == 1.0


@given(
    base=st.floats(0.01, 10.0),
    factor=st.floats(1.0, 100.0),
    runs=st.lists(st.floats(0.0, 100.0), min_size=1, max_size=30),
)
def test_backoff_never_exceeds_max_and_never_shrinks_without_a_reset(
    base: float, factor: float, runs: list[float]
) -> None:
    backoff = RestartBackoff(base=base, max=base * factor, reset_after=50.0)
    previous = 0.0
    for ran_for in runs:
        delay = backoff.next_delay(ran_for)
        assert 0.0 <= delay <= base * factor
        if ran_for >= 50.0:
            assert delay == 0.0
        else:
            assert delay >= previous
        previous = delay


def test_exit_codes_of_signals_are_128_plus_the_signal() -> None:
    assert exit_code(-9) == 137 and exit_code(-15) == 143 and exit_code(3) == 3


def running(name: str, **kw: object) -> ContainerStatus:
    return ContainerStatus(name=name, state="running", started_at=T0, pid=42, **kw)  # type: ignore[arg-type]


def test_phase_is_pending_until_every_container_started_once() -> None:
    held = ContainerStatus(name="app", state="waiting", reason="ContainerCreating")
    assert pod_phase([running("istio-proxy"), held], stopped=False) == "Pending"
    crashed = ContainerStatus(
        name="app", state="waiting", reason="CrashLoopBackOff", last_exit_code=1
    )
    assert pod_phase([running("istio-proxy"), crashed], stopped=False) == "Running"


def test_a_stopped_pod_succeeded_only_if_every_container_exited_zero() -> None:
    ok = ContainerStatus(name="a", state="terminated", last_exit_code=0, last_reason="Completed")
    killed = ContainerStatus(name="b", state="terminated", last_exit_code=143, last_reason="Error")
    assert pod_phase([ok], stopped=True) == "Succeeded"
    assert pod_phase([ok, killed], stopped=True) == "Failed"


def test_kube_status_of_a_ready_pod() -> None:
    status = PodStatus(
        phase="Running",
        ready=True,
        containers=(running("reviews", ready=True), running("istio-proxy", ready=True)),
        start_time=T0,
        ready_changed_at=T1,
    )
    out = to_kube_status(status, "127.1.0.7")
    assert json.loads(json.dumps(out)) == out  # plain JSON, ready for the store
    assert out["phase"] == "Running"
    assert out["podIP"] == "127.1.0.7" and out["podIPs"] == [{"ip": "127.1.0.7"}]
    assert out["startTime"] == "2024-05-01T12:00:00Z"
    conditions = {c["type"]: c for c in out["conditions"]}
    assert set(conditions) == {"Initialized", "Ready", "ContainersReady", "PodScheduled"}
    assert all(c["status"] == "True" for c in conditions.values())
    assert conditions["Ready"]["lastTransitionTime"] == "2024-05-01T12:00:07Z"
    # Sorted by name, as the kubelet does.
    assert [c["name"] for c in out["containerStatuses"]] == ["istio-proxy", "reviews"]
    reviews = out["containerStatuses"][1]
    assert reviews == {
        "name": "reviews",
        "ready": True,
        "restartCount": 0,
        "started": True,
        "state": {"running": {"startedAt": "2024-05-01T12:00:00Z"}},
        "lastState": {},
        "containerID": "meshlet://42",
    }


def test_kube_status_of_a_crash_looping_container() -> None:
    looping = ContainerStatus(
        name="app",
        state="waiting",
        reason="CrashLoopBackOff",
        message="back-off 2s restarting failed container=app pod=default/p",
        restart_count=3,
        finished_at=T1,
        last_exit_code=1,
        last_reason="Error",
    )
    status = PodStatus(
        phase="Running",
        ready=False,
        containers=(looping,),
        start_time=T0,
        ready_changed_at=T0,
    )
    out = to_kube_status(status, "127.1.0.8")
    (app,) = out["containerStatuses"]
    assert app["state"] == {"waiting": {"reason": "CrashLoopBackOff", "message": looping.message}}
    assert app["lastState"] == {
        "terminated": {"exitCode": 1, "reason": "Error", "finishedAt": "2024-05-01T12:00:07Z"}
    }
    assert app["restartCount"] == 3 and app["ready"] is False and app["started"] is False
    ready = next(c for c in out["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False"
    assert ready["reason"] == "ContainersNotReady"
    assert ready["message"] == "containers with unready status: [app]"


def test_kube_status_of_a_terminated_container() -> None:
    done = ContainerStatus(
        name="app",
        state="terminated",
        reason="Error",
        finished_at=T1,
        last_exit_code=137,
        last_reason="Error",
    )
    status = PodStatus(
        phase="Failed", ready=False, containers=(done,), start_time=T0, ready_changed_at=T1
    )
    (app,) = to_kube_status(status, "127.1.0.9")["containerStatuses"]
    assert app["state"] == {
        "terminated": {"exitCode": 137, "reason": "Error", "finishedAt": "2024-05-01T12:00:07Z"}
    }
    assert app["lastState"] == {}


def spec(name: str, tmp: Path) -> ContainerSpec:
    process = ProcessSpec(name=name, argv=["true"], env={}, log_path=tmp / f"{name}.log")
    return ContainerSpec(name=name, process=process)


def test_pod_spec_refuses_repeated_names_and_a_misnamed_sidecar(tmp_path: Path) -> None:
    app = spec("app", tmp_path)
    with pytest.raises(ValueError, match="repeat"):
        PodSpec(name="p", namespace="default", ip="127.1.0.1", containers=[app, app])
    with pytest.raises(ValueError, match="istio-proxy"):
        PodSpec(
            name="p",
            namespace="default",
            ip="127.1.0.1",
            containers=[app],
            sidecar=spec("envoy", tmp_path),
        )
