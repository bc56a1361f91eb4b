"""What every Bookinfo service shares: requests as values, replies, upstream calls, serving.

Each service is an ``App``: ``handle(Request) -> Reply``, with no sockets of its own, so its
behaviour is tested in memory. Calls to other services go through a ``Fetch`` callable; the
real one (``fetch_json``) uses ``urllib.request``, whose default opener honours ``HTTP_PROXY``
and ``NO_PROXY``: that is how the mesh sends the call through the pod's sidecar.

``serve`` runs an App on a ``ThreadingHTTPServer`` bound to ``$POD_IP:$PORT``, logs one line
per request to stdout, and stops (exit status 0) at once on SIGTERM or SIGINT.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

# -- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Where a service listens and what it calls itself, from the pod's environment."""

    pod_ip: str = "127.0.0.1"
    port: int = 9080
    pod_name: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        return cls(
            pod_ip=env.get("POD_IP") or "127.0.0.1",
            port=int(env.get("PORT") or 9080),
            pod_name=env.get("POD_NAME") or socket.gethostname(),
        )


def upstream_url(env: Mapping[str, str], service: str) -> str:
    """The base URL of another Bookinfo service: ``$<SERVICE>_URL`` or ``http://<service>:9080``
    (the name the mesh resolves)."""
    return (env.get(f"{service.upper()}_URL") or f"http://{service}:9080").rstrip("/")


# -- requests and replies --------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """One incoming request. Header names are lower-case; a repeated header keeps its first
    value."""

    method: str
    path: str
    query: Mapping[str, list[str]] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""

    @classmethod
    def parse(
        cls, method: str, target: str, headers: Mapping[str, str], body: bytes = b""
    ) -> Request:
        parts = urlsplit(target)  # also takes the absolute form a proxy may pass on
        return cls(
            method=method,
            path=parts.path or "/",
            query=parse_qs(parts.query),
            headers=headers,
            body=body,
        )

    def cookie(self, name: str) -> str | None:
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(self.headers.get("cookie", ""))
        except CookieError:
            return None
        morsel = jar.get(name)
        return morsel.value if morsel is not None else None

    def form(self) -> dict[str, str]:
        """An ``application/x-www-form-urlencoded`` body, first value of each field."""
        fields = parse_qs(self.body.decode("utf-8", "replace"))
        return {k: v[0] for k, v in fields.items()}


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(cls, data: object, status: int = 200) -> Reply:
        return cls(status=status, body=json.dumps(data).encode(), content_type="application/json")

    @classmethod
    def html(cls, text: str, status: int = 200) -> Reply:
        return cls(status=status, body=text.encode(), content_type="text/html; charset=utf-8")

    @classmethod
    def text(cls, text: str, status: int = 200) -> Reply:
        return cls(status=status, body=text.encode())

    @classmethod
    def redirect(cls, location: str, *headers: tuple[str, str]) -> Reply:
        return cls(status=302, headers=(("Location", location), *headers))


NOT_FOUND = Reply.text("not found\n", 404)


class App(Protocol):
    """A Bookinfo service without its sockets."""

    name: str

    def handle(self, request: Request) -> Reply:
        """The reply to ``request``; never raises for a request a client could send."""
        ...


# -- calls to other services -----------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Fetched:
    """The outcome of one upstream call: ``data`` is the decoded JSON body of a 2xx answer, or
    None when the call failed (status >= 400, timeout, refused connection, body not JSON)."""

    status: int | None  # None: no HTTP answer at all
    data: Any = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.data is not None


#: fetch(url, headers, timeout_seconds) -> Fetched
Fetch = Callable[[str, Mapping[str, str], float], Fetched]


def fetch_json(url: str, headers: Mapping[str, str], timeout: float) -> Fetched:
    """GET ``url`` through the environment's proxy (if any) and decode its JSON body."""
    request = urllib.request.Request(url, headers=dict(headers))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status = int(response.status)
            body = response.read()
    except urllib.error.HTTPError as e:  # any status >= 400
        e.close()
        return Fetched(status=e.code, error=f"HTTP {e.code}")
    except (OSError, ValueError) as e:  # refused, reset, timed out, bad URL
        return Fetched(status=None, error=str(e) or type(e).__name__)
    try:
        data = json.loads(body)
    except ValueError:
        return Fetched(status=status, error="the body is not JSON")
    if data is None:
        return Fetched(status=status, error="the body is JSON null")
    return Fetched(status=status, data=data)


# -- serving ---------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a keep-alive connection must not hold up the exit
    app: App


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so that the sidecar can pool connections
    disable_nagle_algorithm = True  # head and body are two writes; don't wait for an ACK
    server: _Server

    def _handle(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            headers.setdefault(name.lower(), value)
        request = Request.parse(self.command, self.path, headers, body)
        try:
            reply = self.server.app.handle(request)
        except Exception as e:  # a bug: answer 500, keep serving, say what happened
            print(f"{self.server.app.name}: error on {self.path}: {e!r}", file=sys.stderr)
            reply = Reply.text("internal error\n", 500)
        # Logged before the answer goes out: whoever has the answer can count on the line.
        print(
            f'{self.server.app.name} {self.client_address[0]} "{self.requestline}" '
            f"{reply.status} {len(reply.body)}",
            flush=True,
        )
        self.send_response(reply.status)
        for name, value in reply.headers:
            self.send_header(name, value)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = _handle

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # _handle logs each request once, with its status and size

    def log_message(self, format: str, *args: Any) -> None:
        print(f"{self.server.app.name}: {format % args}", file=sys.stderr, flush=True)


class _Stop(BaseException):
    """Raised by the signal handler to leave ``serve_forever`` at once (as KeyboardInterrupt
    does): ``shutdown()`` would wait up to half a second for its poll to notice."""


def serve(app: App, settings: Settings) -> int:
    """Serve ``app`` until SIGTERM or SIGINT; returns the exit status (0)."""
    server = _Server((settings.pod_ip, settings.port), _Handler)
    server.app = app

    def stop(signum: int, frame: FrameType | None) -> None:
        for name in (signal.SIGTERM, signal.SIGINT):  # a second signal must not cut the exit
            signal.signal(name, signal.SIG_IGN)
        raise _Stop

    print(
        f"{app.name} ({settings.pod_name}) listening on {settings.pod_ip}:{settings.port}",
        flush=True,
    )
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever()
    except _Stop:
        pass
    finally:
        server.server_close()  # requests in flight are cut off: their threads are daemons
    print(f"{app.name} stopped", flush=True)
    return 0
