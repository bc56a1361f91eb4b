"""A real Prometheus for tests: Debian's ``prometheus`` package, started on a free loopback port
with a given configuration and a throw-away TSDB, stopped by its PID.

A missing binary fails the test naming the package (CI installs it: ``.ci/run``,
``scripts/test``); it never skips silently.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.ports import free_port
from tests.waiting import wait_until

PACKAGE = "prometheus"
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def prometheus_binary() -> str:
    """The ``prometheus`` executable, or a failed test that names the Debian package."""
    path = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not os.access(path, os.X_OK):
        pytest.fail(
            f"Prometheus is not installed: install the Debian package `{PACKAGE}`"
            f" (apt-get install {PACKAGE}; scripts/test does it when run as root)"
        )
    return path


# Prometheus needs a few seconds to start and a scrape interval to answer: no need to poll it
# often.
def poll(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    """Call ``check`` until it returns something truthy; fail naming ``what`` at the timeout."""
    return wait_until(what, check, timeout, interval)


@dataclass
class Prometheus:
    """A running Prometheus server: its URL, process and log."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def get(self, path: str) -> Any:
        with _DIRECT.open(self.url + path, timeout=10) as r:
            return json.loads(r.read())

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's ``data.result``."""
        answer = self.get("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets (``/api/v1/targets``), with health and last error."""
        active: list[dict[str, Any]] = self.get("/api/v1/targets")["data"]["activeTargets"]
        return active

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(
                f"prometheus exited {self.process.returncode}:\n{self.log.read_text()[-3000:]}"
            )
        try:
            with _DIRECT.open(self.url + "/-/ready", timeout=5) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        """SIGTERM by PID (Prometheus shuts down cleanly on it), SIGKILL if it lingers."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


@contextlib.contextmanager
def running_prometheus(workdir: Path, config: str) -> Iterator[Prometheus]:
    """Prometheus on ``127.0.0.1:<free port>`` with ``config`` (prometheus.yml text)."""
    binary = prometheus_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    config_file = workdir / "prometheus.yml"
    config_file.write_text(config)
    port = free_port()
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            cwd=workdir,
        )
    server = Prometheus(url=f"http://127.0.0.1:{port}", process=process, log=log)
    try:
        poll("prometheus to be ready", server.ready, timeout=60)
        yield server
    finally:
        server.stop()
