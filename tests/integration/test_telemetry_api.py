"""The Telemetry API through a real ``meshlet control`` and real sidecars: what a user applies
changes what the proxies log, and what the control plane cannot honour is refused at apply.

Istio's "Configure access logs with Telemetry API" task
(https://istio.io/latest/docs/tasks/observability/logs/telemetry-api/): a mesh-wide Telemetry
with ``filter: {expression: response.code >= 400}`` logs only failed requests; a workload's
``disabled: true`` turns its logs off. ``meshlet control --access-log-file`` is MeshConfig's
``accessLogFile``, ``--access-log-encoding JSON`` Istio's default JSON fields.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import meshlet_cmd
from tests.integration.sidecar_mesh import WEB_URL, AppHandler, apply, eventually, two_pods, via
from tests.integration.test_control import ControlPlane, meshlet
from tests.ports import free_port

pytestmark = pytest.mark.timeout(120)

CLIENT_IP, SERVER_IP = "127.1.9.40", "127.1.9.41"


class _Status(AppHandler):
    """``GET /status/<code>`` answers ``<code>``."""

    def do_GET(self) -> None:
        self.reply(int(self.path.rsplit("/", 1)[-1]))


def telemetry(name: str, namespace: str, spec: dict[str, Any]) -> dict[str, object]:
    return {
        "apiVersion": "telemetry.istio.io/v1",
        "kind": "Telemetry",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def start_control(tmp_path: Path, *extra: str) -> ControlPlane:
    xds_port, api_port = free_port(), free_port()
    out, err = tmp_path / "control.out", tmp_path / "control.err"
    args = ["control", "--state-dir", str(tmp_path / "state")]
    args += ["--xds-address", f"127.0.0.1:{xds_port}", "--api-address", f"127.0.0.1:{api_port}"]
    process = subprocess.Popen(
        meshlet_cmd(*args, *extra),
        stdout=out.open("wb"),
        stderr=err.open("wb"),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    plane = ControlPlane(process, tmp_path / "state", xds_port, api_port, out, err)
    eventually(lambda: _ready(plane), "meshlet control ready")
    return plane


def _ready(plane: ControlPlane) -> bool:
    if plane.process.poll() is not None:
        raise RuntimeError(f"meshlet control exited: {plane.err.read_text()}")
    with contextlib.suppress(OSError):
        return plane.get("/ready")[0] == 200
    return False


def log_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def access_log(tmp_path: Path) -> Iterator[tuple[ControlPlane, Path]]:
    path = tmp_path / "access.log"
    plane = start_control(tmp_path, "--access-log-file", str(path), "--access-log-encoding", "JSON")
    with two_pods(plane, tmp_path, (CLIENT_IP, SERVER_IP), _Status):
        yield plane, path


def test_the_mesh_log_then_a_telemetry_filter_then_a_workload_disable(
    access_log: tuple[ControlPlane, Path], tmp_path: Path
) -> None:
    plane, path = access_log
    # The mesh's file: every request, by both sidecars, in Istio's JSON fields.
    assert via(CLIENT_IP, f"{WEB_URL}/status/200")[0] == 200
    eventually(lambda: len(log_lines(path)) >= 2, "two log lines for one request")
    first = log_lines(path)
    assert {line["response_code"] for line in first} == {200}
    assert {line["path"] for line in first} == {"/status/200"}
    assert any(line["upstream_cluster"] == "inbound|8080||" for line in first)

    # Mesh-wide: only failed requests (the task's "response.code >= 400").
    apply(
        plane,
        tmp_path,
        [
            telemetry(
                "mesh-default",
                "istio-system",
                {"accessLogging": [{"filter": {"expression": "response.code >= 400"}}]},
            )
        ],
    )

    def filtered() -> bool:
        before = len(log_lines(path))
        via(CLIENT_IP, f"{WEB_URL}/status/200")
        via(CLIENT_IP, f"{WEB_URL}/status/404")
        time.sleep(1.5)  # the sinks flush every second
        new = log_lines(path)[before:]
        return bool(new) and {line["response_code"] for line in new} == {404}

    eventually(filtered, "only the 404 is logged")

    # The server's workload turns its logs off: the client's sidecar still logs the 503.
    apply(
        plane,
        tmp_path,
        [
            telemetry(
                "quiet",
                "default",
                {
                    "selector": {"matchLabels": {"app": "web"}},
                    "accessLogging": [{"disabled": True}],
                },
            )
        ],
    )

    def server_quiet() -> bool:
        before = len(log_lines(path))
        via(CLIENT_IP, f"{WEB_URL}/status/503")
        time.sleep(1.5)
        new = log_lines(path)[before:]
        clusters = {line["upstream_cluster"] for line in new}
        return clusters == {"outbound|8080||web.default.svc.cluster.local"}

    eventually(server_quiet, "only the client's sidecar logs")


def test_an_unsupported_filter_expression_is_refused_at_apply_and_nothing_changes(
    access_log: tuple[ControlPlane, Path], tmp_path: Path
) -> None:
    plane, _ = access_log
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: telemetry.istio.io/v1\n"
        "kind: Telemetry\n"
        "metadata: {name: bad, namespace: default}\n"
        "spec:\n"
        "  accessLogging:\n"
        "  - filter:\n"
        "      expression: \"request.url_path.contains('login')\"\n"
    )
    done = meshlet(plane, "apply", "-f", str(bad))
    assert done.returncode == 2
    assert f"{bad}:7: spec.accessLogging[0].filter.expression: " in done.stderr
    assert "meshlet supports comparisons" in done.stderr
    listing = meshlet(plane, "get", "telemetry", "-A")
    assert listing.returncode == 0, listing.stderr
    assert "bad" not in listing.stdout
