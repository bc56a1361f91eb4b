"""HTTP/1.1 for the dashboard: a small server for async handlers, and a small client.

The server is the control plane API's (``meshlet.control.api.ApiServer``) way of serving --
``asyncio.start_server``, one request per connection, ``Response`` values -- with two
differences the dashboard needs: handlers see the request headers (the OTLP receiver answers by
``content-type``) and may await (a query to a real Prometheus). No web framework: the dashboard
serves a few JSON paths and static files on loopback.

``fetch`` is the client side, for the scraper and the Prometheus source: one GET (or POST) on a
new connection, with a deadline for the whole exchange; httptools parses the response, so
chunked bodies (Prometheus, Go's net/http) are read as well as ``content-length`` ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httptools

from meshlet.control.api import Response
from meshlet.errors import MeshletError

log = logging.getLogger(__name__)

MAX_BODY = 16 * 1024 * 1024
_HEAD_TIMEOUT = 30.0


class WebError(MeshletError):
    """A server cannot listen, or a fetch failed (refused, timed out, not HTTP)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    method: str
    path: str
    query: Mapping[str, list[str]] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""

    def arg(self, name: str, default: str = "") -> str:
        values = self.query.get(name)
        return values[0] if values else default

    @property
    def content_type(self) -> str:
        """The media type without parameters (``application/json; charset=utf-8`` → ...json)."""
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()


Handler = Callable[[Request], Awaitable[Response]]


def json_error(code: int, message: str) -> Response:
    return Response.json({"error": message, "code": code}, code)


def encode(response: Response) -> bytes:
    """The response on the wire (``Response.encode`` knows only the control API's codes)."""
    try:
        reason = HTTPStatus(response.status).phrase
    except ValueError:
        reason = "Unknown"
    head = (
        f"HTTP/1.1 {response.status} {reason}\r\n"
        f"content-type: {response.content_type}\r\n"
        f"content-length: {len(response.body)}\r\n"
        "cache-control: no-store\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + response.body


class WebServer:
    """Serves ``handler`` at ``address`` (``host:port``; port 0 picks one)."""

    def __init__(
        self, handler: Handler, address: str, *, name: str = "server", hint: str = ""
    ) -> None:
        self.handler = handler
        self.address = address
        self.name = name
        self.hint = hint  # what to do when the address is taken
        self.port = 0
        self._server: asyncio.Server | None = None

    def __repr__(self) -> str:
        return f"<WebServer {self.name} {self.bound_address}>"

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
            request = await asyncio.wait_for(self._read(reader), _HEAD_TIMEOUT)
            if isinstance(request, Response):
                response = request
            else:
                try:
                    response = await self.handler(request)
                except Exception as e:
                    log.exception("%s %s failed", request.method, request.path)
                    response = json_error(500, f"internal error: {e}")
            writer.write(encode(response))
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read(self, reader: asyncio.StreamReader) -> Request | Response:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return json_error(400, "request head too large")
        lines = head.decode("latin-1").split("\r\n")
        request_line = lines[0].split(" ")
        if len(request_line) != 3:
            return json_error(400, "malformed request line")
        method, target, _ = request_line
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return json_error(411, "chunked request bodies are not supported; send content-length")
        try:
            length = int(headers.get("content-length") or 0)
        except ValueError:
            return json_error(400, "malformed content-length")
        if length < 0 or length > MAX_BODY:
            return json_error(413, f"bodies are limited to {MAX_BODY} bytes")
        body = await reader.readexactly(length) if length else b""
        url = urlsplit(target)
        return Request(
            method=method,
            path=url.path,
            query=parse_qs(url.query),
            headers=headers,
            body=body,
        )


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
