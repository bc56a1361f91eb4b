"""The servers of the benchmark: the upstream, and the three arms that stand in front of it.

- ``direct``: the load goes straight to the upstream (nothing under test; its CPU figures are
  the upstream's own);
- ``nginx``: nginx ``proxy_pass`` with one worker and a keep-alive upstream pool;
- ``meshlet``: ``meshlet proxy --config bench/meshlet-bootstrap.yaml --concurrency 1``.

The upstream is nginx with one worker answering ``return 200`` with a 1 KiB body. Every nginx
runs from its own prefix under the output directory (``nginx -p PREFIX -c CONF -e ERRLOG``),
so the system's nginx configuration, logs and PID file are never touched.

An arm that cannot start raises ``ArmUnavailable`` with the reason; the runner reports it and
carries on with the other arms.
"""

from __future__ import annotations

import http.client
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml
from processes import Spawned, Supervisor, wait_until

HOST = "127.0.0.1"
UPSTREAM_PORT = 18080
NGINX_PROXY_PORT = 18081
BODY_BYTES = 1024
NGINX = "/usr/sbin/nginx"
READY_TIMEOUT_S = 10.0

REPO = Path(__file__).resolve().parent.parent
MESHLET_BOOTSTRAP = Path("bench/meshlet-bootstrap.yaml")  # relative to REPO, as in the docs


class ArmUnavailable(Exception):
    """The arm's server could not be started or does not serve; the message says why."""


def http_get(port: int, path: str = "/", timeout: float = 0.5) -> tuple[int, int]:
    """(status, body length) of one GET on loopback; (0, 0) when nothing answers."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, len(response.read())
    except (OSError, http.client.HTTPException):
        return 0, 0
    finally:
        conn.close()


def port_is_free(port: int) -> bool:
    """Whether a server could listen on ``port`` (TIME_WAIT leftovers do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


# -- nginx --------------------------------------------------------------------------------

NGINX_MAIN = """\
daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  client_body_temp_path {prefix}/tmp/body;
  proxy_temp_path {prefix}/tmp/proxy;
  fastcgi_temp_path {prefix}/tmp/fastcgi;
  uwsgi_temp_path {prefix}/tmp/uwsgi;
  scgi_temp_path {prefix}/tmp/scgi;
  keepalive_timeout 75s;
  keepalive_requests 10000000;
{body}
}}
"""

UPSTREAM_HTTP = """\
  access_log off;
  default_type text/plain;
  server {{
    listen {host}:{port} backlog=4096;
    location / {{ return 200 "{body}"; }}
  }}
"""

# The access log is buffered and flushed every second, as Envoy's file access log is.
PROXY_HTTP = """\
  access_log {access_log};
  upstream upstream {{
    server {host}:{upstream_port};
    keepalive 64;
    keepalive_requests 10000000;
  }}
  server {{
    listen {host}:{port} backlog=4096;
    location / {{
      proxy_pass http://upstream;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
"""


def _start_nginx(
    supervisor: Supervisor, *, name: str, prefix: Path, http_body: str, cpu: int
) -> Spawned:
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "tmp").mkdir(exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_MAIN.format(prefix=prefix, body=http_body))
    argv = [NGINX, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    check = supervisor.run(f"{name}-check", [*argv, "-t", "-q"], cpu=cpu, timeout=10)
    if check[0] != 0:
        raise ArmUnavailable(f"nginx -t refused {conf}: {check[2].strip()}")
    return supervisor.spawn(name, argv, cpu=cpu, log=prefix / "stdout.log")


def _wait_serving(server: Spawned, port: int, started: float) -> float:
    """Waits for a 200 with the upstream's body; returns milliseconds since ``started``."""

    def serving() -> bool:
        if not server.alive():
            raise ArmUnavailable(f"{server.name} exited with code {server.popen.returncode}")
        return http_get(port) == (200, BODY_BYTES)

    if not wait_until(serving, READY_TIMEOUT_S):
        raise ArmUnavailable(f"{server.name} did not serve 200 on port {port}")
    return (time.perf_counter() - started) * 1000


def start_upstream(
    supervisor: Supervisor, *, prefix: Path, cpu: int, port: int = UPSTREAM_PORT
) -> Spawned:
    """The nginx upstream on ``port`` (``return 200`` with BODY_BYTES), serving on return; its
    files in ``prefix``."""
    body = UPSTREAM_HTTP.format(host=HOST, port=port, body="x" * BODY_BYTES)
    started = time.perf_counter()
    server = _start_nginx(supervisor, name="upstream", prefix=prefix, http_body=body, cpu=cpu)
    _wait_serving(server, port, started)
    return server


def check_serving(arm_ports: dict[str, int]) -> None:
    """One ``GET /`` on each arm's port must give the upstream's 200 and body."""
    for arm, port in arm_ports.items():
        status = http_get(port, timeout=5.0)
        if status != (200, BODY_BYTES):
            raise ArmUnavailable(f"GET / on the {arm} arm gave (status, bytes) = {status}")


# -- the arms -----------------------------------------------------------------------------


class Arm(Protocol):
    """Something the load generator sends to; ``server`` is the process under test, if any."""

    name: str

    @property
    def port(self) -> int: ...

    @property
    def server(self) -> Spawned | None: ...

    def start(self, supervisor: Supervisor) -> dict[str, Any]:
        """Starts the server (raises ``ArmUnavailable``); returns start-up facts to record."""
        ...

    def stop(self, supervisor: Supervisor) -> None: ...


class DirectArm:
    name = "direct"
    port = UPSTREAM_PORT
    server = None

    def start(self, supervisor: Supervisor) -> dict[str, Any]:
        return {}

    def stop(self, supervisor: Supervisor) -> None:
        pass


@dataclass(kw_only=True)
class NginxArm:
    out: Path
    cpu: int
    access_log: bool = True
    name: str = "nginx"
    port: int = NGINX_PROXY_PORT
    server: Spawned | None = None

    def start(self, supervisor: Supervisor) -> dict[str, Any]:
        prefix = self.out / "nginx-proxy"
        log = prefix / "access.log"
        log.unlink(missing_ok=True)
        access_log = f"{log} combined buffer=64k flush=1s" if self.access_log else "off"
        body = PROXY_HTTP.format(
            host=HOST, port=self.port, upstream_port=UPSTREAM_PORT, access_log=access_log
        )
        started = time.perf_counter()
        self.server = _start_nginx(
            supervisor, name="nginx", prefix=prefix, http_body=body, cpu=self.cpu
        )
        return {"start_to_serving_ms": round(_wait_serving(self.server, self.port, started), 1)}

    def stop(self, supervisor: Supervisor) -> None:
        if self.server is not None:
            supervisor.forget(self.server)
            self.server = None


@dataclass(frozen=True, kw_only=True)
class MeshletBootstrap:
    """What the runner needs to know of bench/meshlet-bootstrap.yaml."""

    listener_port: int
    admin_port: int
    access_log: Path | None

    @classmethod
    def load(cls, path: Path) -> MeshletBootstrap:
        doc = yaml.safe_load(path.read_text())
        listener = doc["static_resources"]["listeners"][0]
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        logs = [log["typed_config"]["path"] for log in hcm.get("access_log", [])]
        return cls(
            listener_port=int(listener["address"]["socket_address"]["port_value"]),
            admin_port=int(doc["admin"]["address"]["socket_address"]["port_value"]),
            access_log=REPO / logs[0] if logs else None,
        )


@dataclass(kw_only=True)
class MeshletArm:
    out: Path
    cpu: int
    bootstrap_path: Path = MESHLET_BOOTSTRAP
    name: str = "meshlet"
    server: Spawned | None = None

    def __post_init__(self) -> None:
        self.bootstrap = MeshletBootstrap.load(REPO / self.bootstrap_path)

    @property
    def port(self) -> int:
        return self.bootstrap.listener_port

    def command(self) -> list[str]:
        exe = Path(sys.executable).parent / "meshlet"
        meshlet = str(exe) if exe.exists() else shutil.which("meshlet")
        if meshlet is None:
            raise ArmUnavailable("no `meshlet` executable (pip install -e . in the venv)")
        return [meshlet, "proxy", "--config", str(self.bootstrap_path), "--concurrency", "1"]

    def start(self, supervisor: Supervisor) -> dict[str, Any]:
        argv = self.command()
        if self.bootstrap.access_log is not None:
            self.bootstrap.access_log.parent.mkdir(parents=True, exist_ok=True)
            self.bootstrap.access_log.unlink(missing_ok=True)
        log = self.out / "meshlet-proxy.log"
        started = time.perf_counter()
        self.server = server = supervisor.spawn("meshlet", argv, cpu=self.cpu, log=log, cwd=REPO)

        def ready() -> bool:
            if not server.alive():
                tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                raise ArmUnavailable(
                    f"`{' '.join(argv[1:])}` exited with code {server.popen.returncode}: "
                    + " | ".join(tail)
                )
            return http_get(self.bootstrap.admin_port, "/ready")[0] == 200

        if not wait_until(ready, READY_TIMEOUT_S):
            raise ArmUnavailable(f"admin /ready never answered 200 within {READY_TIMEOUT_S:g} s")
        ready_ms = (time.perf_counter() - started) * 1000
        status = http_get(self.port)
        if status != (200, BODY_BYTES):
            raise ArmUnavailable(f"GET / through the listener gave (status, bytes) = {status}")
        return {"start_to_ready_ms": round(ready_ms, 1)}

    def stop(self, supervisor: Supervisor) -> None:
        if self.server is not None:
            supervisor.forget(self.server)
            self.server = None

    def access_log_bytes(self) -> int | None:
        log = self.bootstrap.access_log
        return log.stat().st_size if log is not None and log.exists() else None
