"""HTTP/1.1 for meshlet's own small servers -- the control plane API, the dashboard, the OTLP
receiver -- and a small client. No web framework: each serves a few paths on loopback.

The server's rules, the same for all of them:

* one request per connection, answered with ``connection: close`` (their clients -- the CLI,
  Prometheus, a browser on loopback -- make few calls, so keep-alive would buy little);
* the head must arrive within 30 s; bodies need ``content-length`` and are limited to
  ``MAX_BODY``: a chunked body is 411 Length Required (RFC 9110 §15.5.12: "refuses to accept
  the request without a defined Content-Length"), a larger one 413, a bad head 400;
* handlers are awaited on the event loop; one that raises is a 500. Each server says how its
  errors look (``error``): ``{"error", "code"}`` by default, Kubernetes ``Status`` objects for
  the control plane API;
* every answer carries ``cache-control: no-store``: they are all live state.

``fetch`` is the client side, for the scraper and the Prometheus source: one GET (or POST) on a
new connection, with a deadline for the whole exchange; httptools parses the response, so
chunked bodies (Prometheus, Go's net/http) are read as well as ``content-length`` ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httptools

from meshlet.errors import MeshletError

log = logging.getLogger(__name__)

MAX_BODY = 16 * 1024 * 1024
_HEAD_TIMEOUT = 30.0
# Status lines precomputed: one dict lookup per response instead of an HTTPStatus lookup.
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}


class WebError(MeshletError):
    """A server cannot listen, or a fetch failed (refused, timed out, not HTTP)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    method: str
    path: str
    query: Mapping[str, list[str]] = field(default_factory=dict)
    query_string: str = ""  # the query as sent, undecoded (ASGI's name)
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""

    def arg(self, name: str, default: str = "") -> str:
        values = self.query.get(name)
        return values[0] if values else default

    @property
    def content_type(self) -> str:
        """The media type without parameters (``application/json; charset=utf-8`` → ...json)."""
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()


@dataclass(frozen=True, slots=True, kw_only=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"

    @classmethod
    def json(cls, data: Any, status: int = 200) -> Response:
        return cls(status=status, body=json.dumps(data, indent=2).encode() + b"\n")

    @classmethod
    def text(cls, text: str, status: int = 200) -> Response:
        return cls(status=status, body=text.encode(), content_type="text/plain; version=0.0.4")

    def encode(self) -> bytes:
        """The response on the wire, head and body in one piece (one write)."""
        status_line = (
            _STATUS_LINES.get(self.status) or f"HTTP/1.1 {self.status} Unknown\r\n".encode()
        )
        head = (
            f"content-type: {self.content_type}\r\n"
            f"content-length: {len(self.body)}\r\n"
            "cache-control: no-store\r\n"
            "connection: close\r\n\r\n"
        )
        return b"".join((status_line, head.encode(), self.body))


Handler = Callable[[Request], Awaitable[Response]]
ErrorBody = Callable[[int, str], Response]


def json_error(code: int, message: str) -> Response:
    return Response.json({"error": message, "code": code}, code)


async def read_request(
    reader: asyncio.StreamReader, error: ErrorBody = json_error
) -> Request | Response:
    """The next request on ``reader``, or the error response that refuses it."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        return error(400, "request head too large")
    lines = head.decode("latin-1").split("\r\n")
    request_line = lines[0].split(" ")
    if len(request_line) != 3:
        return error(400, "malformed request line")
    method, target, _ = request_line
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return error(411, "chunked request bodies are not supported; send content-length")
    try:
        length = int(headers.get("content-length") or 0)
    except ValueError:
        return error(400, "malformed content-length")
    if length < 0 or length > MAX_BODY:
        return error(413, f"bodies are limited to {MAX_BODY} bytes")
    body = await reader.readexactly(length) if length else b""
    url = urlsplit(target)
    return Request(
        method=method,
        path=url.path,
        query=parse_qs(url.query),
        query_string=url.query,
        headers=headers,
        body=body,
    )


class WebServer:
    """Serves ``handler`` at ``address`` (``host:port``; port 0 picks one); see the module
    docstring for the rules. ``name`` and ``hint`` (what to do when the address is taken) go
    into the error when it cannot listen; ``error`` makes the body of each error response."""

    def __init__(
        self,
        handler: Handler,
        address: str,
        *,
        name: str = "server",
        hint: str = "",
        error: ErrorBody = json_error,
    ) -> None:
        self.handler = handler
        self.address = address
        self.name = name
        self.hint = hint
        self.error = error
        self.port = 0
        self._server: asyncio.Server | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.bound_address}>"

    @property
    def bound_address(self) -> str:
        return f"{self.address.rpartition(':')[0]}:{self.port}"

    async def start(self) -> None:
        host, _, port = self.address.rpartition(":")
        try:
            self._server = await asyncio.start_server(
                self._serve, host.strip("[]") or None, int(port)
            )
        except (OSError, ValueError) as e:
            hint = f" ({self.hint})" if self.hint else ""
            raise WebError(f"the {self.name} cannot listen on {self.address}: {e}{hint}") from e
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(read_request(reader, self.error), _HEAD_TIMEOUT)
            if isinstance(request, Response):
                response = request
            else:
                try:
                    response = await self.handler(request)
                except Exception as e:
                    log.exception("%s %s failed", request.method, request.path)
                    response = self.error(500, f"internal error: {e}")
            writer.write(response.encode())
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


# -- the client ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Fetched:
    status: int
    headers: Mapping[str, str]
    body: bytes


class _ResponseSink:
    """httptools callbacks: collects one response."""

    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []
        self.size = 0
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > MAX_BODY:
            raise WebError(f"the response is larger than {MAX_BODY} bytes")
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.done = True


async def fetch(
    url: str,
    *,
    timeout: float,
    method: str = "GET",
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
) -> Fetched:
    """One HTTP/1.1 exchange with ``url`` (http only), all of it within ``timeout`` seconds."""
    try:
        return await asyncio.wait_for(_fetch(url, method, body, headers or {}), timeout)
    except TimeoutError:
        raise WebError(f"{method} {url}: no answer within {timeout:g} s") from None
    except (OSError, httptools.HttpParserError) as e:
        raise WebError(f"{method} {url}: {e}") from e


async def _fetch(url: str, method: str, body: bytes, headers: Mapping[str, str]) -> Fetched:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise WebError(f"{url}: only http:// URLs are fetched")
    port = parts.port or 80
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    host_header = parts.netloc
    lines = [f"{method} {target} HTTP/1.1", f"host: {host_header}", "connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body or method in ("POST", "PUT"):
        lines.append(f"content-length: {len(body)}")
    reader, writer = await asyncio.open_connection(parts.hostname, port)
    try:
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        sink = _ResponseSink()
        parser: Any = httptools.HttpResponseParser(sink)
        while not sink.done:
            data = await reader.read(65536)
            if not data:
                break
            parser.feed_data(data)
        # A response delimited by the end of the connection is complete at EOF.
        if not sink.done and (
            "content-length" in sink.headers or "transfer-encoding" in sink.headers
        ):
            raise WebError(f"{method} {url}: the connection closed mid-response")
        return Fetched(
            status=int(parser.get_status_code()), headers=sink.headers, body=b"".join(sink.chunks)
        )
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
