"""Integration fixtures: real upstream servers and real ``meshlet proxy`` processes on loopback.

* ``upstream`` starts a scripted HTTP/1.1 server in a thread (see ``Upstream`` for paths).
* ``start_proxy(bootstrap_dict)`` writes the bootstrap to a file, runs ``meshlet proxy`` as a
  process the way a user does, waits for ``/ready`` and stops it (by PID) after the test.
* ``bootstrap(...)`` builds a typical one-listener, one-cluster bootstrap to tweak.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

HCM = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
FAULT = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"


from tests.ports import free_port  # noqa: E402  (outside the ephemeral range)

# -- upstream -------------------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class _Handler(BaseHTTPRequestHandler):
    """Scripted behaviour by path:

    /status/N           answer status N (body "status N")
    /delay/S            sleep S seconds, then 200
    /echo               200 with the request body
    /headers            200 with the request headers as JSON (names lower-case)
    /bytes/N            200 with N bytes (Content-Length)
    /chunked/N          200 with N bytes in chunked encoding
    /close              close the connection without answering
    /garbage            answer bytes that are not HTTP
    /sink               read and discard the body (streamed), answer its length
    anything else       200 "hello from <name>"
    """

    protocol_version = "HTTP/1.1"
    # Headers and body are two writes; with Nagle on, the second waits for a delayed ACK (~40 ms).
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and status >= 200 and status not in (204, 304):
            self.wfile.write(body)

    def _handle(self) -> None:
        up = self.server.upstream
        path = self.path.split("?", 1)[0]
        if path == "/sink":
            total = 0
            length = int(self.headers.get("content-length") or 0)
            while total < length:
                chunk = self.rfile.read(min(1 << 16, length - total))
                if not chunk:
                    break
                total += len(chunk)
            up.record(self, b"")
            self._reply(200, str(total).encode())
            return
        body = self._body()
        up.record(self, body)
        if up.override is not None:
            up.override(self)
            return
        parts = path.strip("/").split("/")
        if parts[0] == "status":
            self._reply(int(parts[1]), f"status {parts[1]}".encode())
        elif parts[0] == "delay":
            time.sleep(float(parts[1]))
            self._reply(200, b"delayed")
        elif parts[0] == "echo":
            self._reply(200, body)
        elif parts[0] == "headers":
            data = {k.lower(): v for k, v in self.headers.items()}
            self._reply(200, json.dumps(data).encode(), {"content-type": "application/json"})
        elif parts[0] == "bytes":
            self._reply(200, b"x" * int(parts[1]))
        elif parts[0] == "chunked":
            n = int(parts[1])
            self.send_response(200)
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            if self.command != "HEAD":
                for i in range(0, n, 1000):
                    piece = b"y" * min(1000, n - i)
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")
        elif parts[0] == "close":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        elif parts[0] == "garbage":
            self.wfile.write(b"this is not http\r\n\r\n")
            self.close_connection = True
        else:
            self._reply(200, f"hello from {up.name}".encode())

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    upstream: Upstream


@dataclass
class Upstream:
    name: str
    port: int
    seen: list[Seen] = field(default_factory=list)
    override: Callable[[BaseHTTPRequestHandler], None] | None = None
    _server: _Server | None = None

    def record(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        headers = {k.lower(): v for k, v in handler.headers.items()}
        self.seen.append(Seen(handler.command, handler.path, headers, body))

    def start(self) -> Upstream:
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.upstream = self
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@pytest.fixture
def make_upstream() -> Iterator[Callable[..., Upstream]]:
    started: list[Upstream] = []

    def make(name: str = "upstream", port: int | None = None) -> Upstream:
        up = Upstream(name=name, port=port or free_port()).start()
        started.append(up)
        return up

    yield make
    for up in started:
        up.stop()


@pytest.fixture
def upstream(make_upstream: Callable[..., Upstream]) -> Upstream:
    return make_upstream("upstream")


# -- proxy ----------------------------------------------------------------------------------------


def _address(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def cluster(name: str, *ports: int, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": _address(p)}} for p in ports]}
            ],
        },
        **extra,
    }


def bootstrap(
    *,
    clusters: list[dict[str, Any]],
    routes: list[dict[str, Any]] | None = None,
    virtual_hosts: list[dict[str, Any]] | None = None,
    http_filters: list[dict[str, Any]] | None = None,
    hcm: dict[str, Any] | None = None,
    listener_port: int | None = None,
    admin_port: int | None = None,
) -> dict[str, Any]:
    """A one-listener bootstrap: routes (default: everything to the first cluster)."""
    if routes is None:
        routes = [{"match": {"prefix": "/"}, "route": {"cluster": clusters[0]["name"]}}]
    if virtual_hosts is None:
        virtual_hosts = [{"name": "all", "domains": ["*"], "routes": routes}]
    manager = {
        "@type": HCM,
        "stat_prefix": "ingress_http",
        "route_config": {"name": "local_route", "virtual_hosts": virtual_hosts},
        "http_filters": http_filters
        or [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}],
        **(hcm or {}),
    }
    return {
        "node": {"id": "test-node", "cluster": "test"},
        "admin": {"address": _address(admin_port or free_port())},
        "static_resources": {
            "listeners": [
                {
                    "name": "listener_0",
                    "address": _address(listener_port or free_port()),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": manager,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        },
    }


@dataclass
class Proxy:
    process: subprocess.Popen[bytes]
    config_path: Path
    port: int
    admin_port: int
    stdout_path: Path
    stderr_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def admin_get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.admin + path, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def admin_post(self, path: str) -> tuple[int, str]:
        req = urllib.request.Request(self.admin + path, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def stdout(self) -> str:
        return self.stdout_path.read_text()

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def terminate(self, timeout: float = 15) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def meshlet_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshlet.cli.main", *args]


def wait_ready(admin_port: int, process: subprocess.Popen[bytes], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"proxy exited with {process.returncode}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as r,
        ):
            if r.status == 200:
                return
        time.sleep(0.05)
    raise TimeoutError("proxy did not become ready")


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[Callable[..., Proxy]]:
    started: list[Proxy] = []

    def start(config: dict[str, Any], *args: str, name: str = "bootstrap") -> Proxy:
        path = tmp_path / f"{name}-{len(started)}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        listener = config["static_resources"]["listeners"][0]
        port = listener["address"]["socket_address"]["port_value"]
        admin_port = config["admin"]["address"]["socket_address"]["port_value"]
        out = tmp_path / f"{name}-{len(started)}.out"
        err = tmp_path / f"{name}-{len(started)}.err"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(
            meshlet_cmd("proxy", "--config", str(path), *args),
            stdout=out.open("wb"),
            stderr=err.open("wb"),
            env=env,
        )
        proxy = Proxy(process, path, port, admin_port, out, err)
        started.append(proxy)
        try:
            wait_ready(admin_port, process)
        except Exception as e:
            raise RuntimeError(f"{e}\nstderr:\n{err.read_text()}") from e
        return proxy

    yield start
    for proxy in started:
        if proxy.process.poll() is None:
            proxy.process.kill()
            proxy.process.wait(10)


def raw_request(
    port: int, data: bytes, *, timeout: float = 5.0, read_until_close: bool = True
) -> bytes:
    """Send raw bytes on a fresh connection; return everything read until close or timeout."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if not read_until_close:
                    break
        return b"".join(chunks)


# -- helpers shared by the end-to-end tests ----------------------------------------------------

FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
#: A compact access-log line for tests: status, flags, upstream host, path, response details.
TEST_LOG_FORMAT = (
    "%RESPONSE_CODE% %RESPONSE_FLAGS% %UPSTREAM_HOST% %REQ(:PATH)% %RESPONSE_CODE_DETAILS%\n"
)


def file_access_log(path: Path, log_format: str = TEST_LOG_FORMAT) -> dict[str, Any]:
    """An HCM ``access_log`` list writing ``log_format`` lines to ``path``."""
    return {
        "access_log": [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": FILE_LOG,
                    "path": str(path),
                    "log_format": {"text_format_source": {"inline_string": log_format}},
                },
            }
        ]
    }


def wait_for_lines(path: Path, count: int, timeout: float = 5.0) -> list[str]:
    """The first ``count`` lines of a file the proxy writes (file logs flush every second)."""
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while time.monotonic() < deadline:
        if path.exists():
            lines = path.read_text().splitlines()
            if len(lines) >= count:
                return lines
        time.sleep(0.05)
    raise AssertionError(f"expected {count} lines in {path}, got {lines!r}")


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # names lower-case; a repeated header keeps its values ", "-joined
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body)


def http_request(
    port: int,
    path: str = "/",
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 10.0,
) -> Response:
    """One request on a fresh connection (``http.client``: any status is returned, not raised)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        got: dict[str, str] = {}
        for k, v in r.getheaders():
            k = k.lower()
            got[k] = f"{got[k]}, {v}" if k in got else v
        return Response(r.status, got, r.read())
    finally:
        conn.close()


# -- raw HTTP/1.1 client and module-wide proxies (additive) ---------------------------------------


def launch_proxy(
    config: dict[str, Any], directory: Path, *args: str, name: str = "bootstrap"
) -> Proxy:
    """Run ``meshlet proxy`` on ``config`` (files in ``directory``) and wait until it is ready.

    For fixtures wider than one test; stop it with ``stop_proxy``.
    """
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    listener = config["static_resources"]["listeners"][0]
    port = listener["address"]["socket_address"]["port_value"]
    admin_port = config["admin"]["address"]["socket_address"]["port_value"]
    out, err = directory / f"{name}.out", directory / f"{name}.err"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        meshlet_cmd("proxy", "--config", str(path), *args),
        stdout=out.open("wb"),
        stderr=err.open("wb"),
        env=env,
    )
    proxy = Proxy(process, path, port, admin_port, out, err)
    try:
        wait_ready(admin_port, process)
    except Exception as e:
        stop_proxy(proxy)
        raise RuntimeError(f"{e}\nstderr:\n{err.read_text()}") from e
    return proxy


def stop_proxy(proxy: Proxy) -> None:
    if proxy.process.poll() is None:
        proxy.process.kill()
        proxy.process.wait(10)


@dataclass
class RawResponse:
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    chunked: bool = False

    def header(self, name: str) -> str | None:
        """The value of ``name`` (case-insensitive), repeated values joined with ``,``."""
        values = self.header_all(name)
        return ",".join(values) if values else None

    def header_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class ConnectionClosed(Exception):
    """The peer closed the connection before a whole response arrived."""


class Client:
    """A raw HTTP/1.1 client connection that frames responses exactly as RFC 9112 §6.3 says.

    Nothing is normalised or retried, so a test sees what the proxy wrote: ``send`` raw bytes,
    ``read_response(method)`` for the next response, ``at_eof()`` to check the proxy closed.
    """

    def __init__(self, port: int, *, timeout: float = 5.0) -> None:
        self.sock: socket.socket | None = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout
        )
        self.buf = b""
        self.eof = False

    @classmethod
    def from_bytes(cls, data: bytes) -> Client:
        """A reader over bytes already received (e.g. from ``raw_request``)."""
        client = cls.__new__(cls)
        client.sock, client.buf, client.eof = None, data, True
        return client

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def send(self, data: bytes) -> None:
        assert self.sock is not None
        self.sock.sendall(data)

    def request(
        self, method: str, target: str, *headers: str, body: bytes = b"", host: str = "example.com"
    ) -> None:
        """Send a request; ``headers`` are ``"Name: value"`` strings (a Host is added)."""
        lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", *headers]
        framed = ("content-length:", "transfer-encoding:")
        if body and not any(h.lower().startswith(framed) for h in headers):
            lines.append(f"Content-Length: {len(body)}")
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    def _fill(self) -> None:
        if self.eof or self.sock is None:
            self.eof = True
            raise ConnectionClosed(f"closed with {self.buf[:200]!r} unread")
        try:
            data = self.sock.recv(1 << 20)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            raise ConnectionClosed(f"closed with {self.buf[:200]!r} unread")
        self.buf += data

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_response(self, method: str = "GET") -> RawResponse:
        """The next response; 1xx interim responses are returned too (call again for the final)."""
        version, _, rest = self._line().decode("latin-1").partition(" ")
        code, _, reason = rest.partition(" ")
        status = int(code)
        headers = []
        while line := self._line():
            name, _, value = line.decode("latin-1").partition(":")
            headers.append((name, value.strip()))
        response = RawResponse(version, status, reason, headers, b"")
        if method == "HEAD" or status < 200 or status in (204, 304):
            return response
        te = response.header("transfer-encoding")
        if te is not None:
            assert te.lower() == "chunked", te
            response.chunked = True
            body = bytearray()
            while True:
                size = int(self._line().split(b";")[0], 16)
                if size == 0:
                    while self._line():  # trailers
                        pass
                    break
                body += self._exactly(size)
                assert self._exactly(2) == b"\r\n"
            response.body = bytes(body)
        elif (length := response.header("content-length")) is not None:
            response.body = self._exactly(int(length))
        else:  # delimited by the connection's close
            with contextlib.suppress(ConnectionClosed):
                while True:
                    self._fill()
            response.body, self.buf = self.buf, b""
        return response

    def at_eof(self, timeout: float = 3.0) -> bool:
        """True when the peer closes (FIN or RST) within ``timeout`` and sent nothing more."""
        if self.buf:
            return False
        if self.eof:
            return True
        assert self.sock is not None
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        except ConnectionResetError:
            data = b""
        if data:
            self.buf += data
            return False
        self.eof = True
        return True
