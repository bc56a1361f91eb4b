"""``meshlet demo`` and ``meshlet up``'s refusal of what it cannot run, end to end: the commands
run as a user types them, each with its own API, xDS and gateway ports and state directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import (
    MESHLET,
    Browser,
    condition,
    free_port,
    free_ports_in_a_row,
    leftovers,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _env(server: str) -> dict[str, str]:
    env = {**os.environ, "MESHLET_SERVER": server}
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        env.pop(name, None)
    return env


def _pids(pods: list[dict[str, object]]) -> set[int]:
    out = set()
    for pod in pods:
        for status in pod["status"].get("containerStatuses") or []:  # type: ignore[attr-defined]
            if status.get("containerID"):
                out.add(int(str(status["containerID"]).removeprefix("meshlet://")))
    return out


def test_demo_serves_bookinfo_for_its_duration_and_leaves_nothing_behind(tmp_path: Path) -> None:
    """`meshlet demo --duration 20` starts Bookinfo behind the mesh with a gateway (the setup
    of istio.io/latest/docs/examples/bookinfo/), serves the product page and sends traffic
    while it runs, then stops every process it started and exits 0."""
    server = f"http://127.0.0.1:{free_port()}"
    gateway = free_port()
    state = tmp_path / "state"
    env = _env(server)
    demo = subprocess.Popen(
        [
            *MESHLET,
            "demo",
            "--duration",
            "20",
            "--xds-address",
            f"127.0.0.1:{free_ports_in_a_row(3)}",
            "--gateway-port",
            str(gateway),
            "--dashboard-port",
            str(free_port()),
            "--otlp-port",
            str(free_port()),
            "--state-dir",
            str(state),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pids: set[int] = set()
    daemon = 0
    try:
        page = wait_until(
            "the demo's product page",
            lambda: _page_or_none(Browser(f"http://127.0.0.1:{gateway}")),
            timeout=90,
        )
        assert page.ok and page.reviews_version in ("v1", "v2", "v3"), page
        daemon = int(json.loads((state / "mesh.json").read_text())["pid"])
        listed = subprocess.run(
            [*MESHLET, "get", "pods", "-A", "-o", "json"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        pids = _pids(json.loads(listed.stdout)["items"])
        assert len(pids) >= 13, pids  # six pods of two containers, and the gateway
        out, err = demo.communicate(timeout=150)
    finally:
        if demo.poll() is None:
            demo.terminate()  # Ctrl-C's path: the demo stops the mesh itself
            demo.communicate(timeout=120)
    assert demo.returncode == 0, (out, err)
    assert "traffic sent:" in out and " x 200" in out, out
    assert "mesh stopped" in out, out
    left = leftovers({*pids, daemon}, pids)
    assert not left, "the demo left processes behind:\n" + "\n".join(left)


def _page_or_none(browser: Browser) -> object:
    try:
        page = browser.get(timeout=5)
    except OSError:
        return None
    return page if page.status == 200 else None


STATEFUL_SET = """\
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector:
    app: web
  ports:
  - name: http
    port: 80
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: web
spec:
  serviceName: web
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      containers:
      - name: web
        image: docker.io/library/nginx
"""


def test_up_refuses_an_unsupported_kind_naming_file_and_line(tmp_path: Path) -> None:
    """`meshlet up` runs Deployments (istio.io's samples use nothing else); a StatefulSet is
    refused before anything starts: exit code 2 (invalid configuration) and a message naming
    the file, the line of its ``kind`` and the kind."""
    manifest = tmp_path / "web.yaml"
    manifest.write_text(STATEFUL_SET)
    line = STATEFUL_SET.splitlines().index("kind: StatefulSet") + 1
    api = free_port()
    state = tmp_path / "state"
    result = subprocess.run(
        [
            *MESHLET,
            "up",
            "-d",
            "-f",
            str(manifest),
            "--xds-address",
            f"127.0.0.1:{free_ports_in_a_row(3)}",
            "--gateway-port",
            str(free_port()),
            "--dashboard-port",
            "0",
            "--otlp-port",
            "0",
            "--state-dir",
            str(state),
        ],
        cwd=tmp_path,
        env=_env(f"http://127.0.0.1:{api}"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result
    assert f"{manifest}:{line}" in result.stderr, result.stderr
    assert "StatefulSet" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    # Nothing started: no state directory, nothing answering on the API port.
    assert not state.exists()
    time.sleep(0.5)
    status = subprocess.run(
        [*MESHLET, "status"],
        env=_env(f"http://127.0.0.1:{api}"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 1 and "no mesh is running" in status.stderr, status


def test_up_skips_pod_ips_that_something_else_listens_on(tmp_path: Path) -> None:
    """Pod IPs come from 127.1.0.0/16 with a cursor per state directory, so two meshes on one
    machine would hand out the same addresses: a mesh skips an address on which something
    already listens on the sidecar's admin port, and its pods still become ready."""
    from meshlet.runtime.ipam import DEFAULT_POD_NETWORK, PodIPAllocator
    from meshlet.runtime.sidecar import ADMIN_PORT
    from tests.e2e.conftest import running_mesh

    first = PodIPAllocator(DEFAULT_POD_NETWORK).allocate()  # a fresh state's first address
    manifest = tmp_path / "config.yaml"
    manifest.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n")
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with contextlib.suppress(OSError):  # taken already (another mesh): just as good
            squatter.bind((first, ADMIN_PORT))
            squatter.listen()
        with running_mesh(tmp_path, manifest) as mesh:
            (gateway,) = mesh.pods()
            assert gateway["status"]["podIP"] != first
            assert condition(gateway, "Ready")["status"] == "True"
