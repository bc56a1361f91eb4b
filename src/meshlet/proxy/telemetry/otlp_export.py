"""Exporting spans to an OpenTelemetry collector: OTLP over HTTP, protobuf, in batches.

Imported only once a worker has a sampled span to export. Rules it keeps:

* a bounded queue per worker and collector: a span that finds it full is dropped and counted
  (``tracing.opentelemetry.spans_dropped``) -- requests never wait for the collector;
* a batch goes when 512 spans wait or 1 s after the first one (``timer_flushed`` counts
  those), as the OpenTelemetry SDK's batch span processor does; one export at a time;
* an export is ``POST <path>`` with an ``ExportTraceServiceRequest`` body, Content-Type
  ``application/x-protobuf`` (OTLP/HTTP), on one keep-alive connection, with
  ``http_uri.timeout`` for the whole exchange; a failure or a non-2xx answer counts in
  ``export_failures`` and its spans are dropped (counted too), never retried;
* spans become protobuf here, in the batch, not on the request path, written by hand (see
  below) in slices between which requests run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections import deque
from typing import TYPE_CHECKING, Final

from meshlet.proxy.telemetry.tracing import is_error, span_attributes, span_name

if TYPE_CHECKING:
    from meshlet.proxy.stream_info import StreamInfo
    from meshlet.proxy.telemetry.stats import TracingStats
    from meshlet.proxy.telemetry.tracing import NodeTags, OtlpEndpoint, Span

log = logging.getLogger("meshlet.tracing")

BATCH_SIZE: Final = 512
FLUSH_INTERVAL: Final = 1.0  # seconds
SCOPE_NAME: Final = "meshlet"
_MAX_RESPONSE: Final = 1 << 20  # a collector's answer bigger than this is not read whole
# Spans encoded between two yields to the loop: ~10 us each, so a 512-span batch never holds
# requests up for more than about a millisecond at a time.
_ENCODE_SLICE: Final = 64


# -- OTLP protobuf, encoded by hand ---------------------------------------------------------------
# ``ExportTraceServiceRequest`` written straight to the protobuf wire format: building the
# opentelemetry-proto messages cost ~28 us a span (about a whole proxied request), this ~8 us.
# Field numbers from opentelemetry/proto/{collector/trace,trace,common,resource}/v1/*.proto;
# the tests decode what this writes with the OTLP messages of meshlet.dashboard.otlp_proto.


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: ``tag`` is its key byte(s), (number << 3) | 2."""
    n = len(payload)
    return tag + (bytes((n,)) if n < 0x80 else _varint(n)) + payload


_KEYS: dict[str, bytes] = {}  # KeyValue.key fields, encoded once per tag name


def _key_value(tag: bytes, key: str, value: str) -> bytes:
    """A ``KeyValue`` with a string ``AnyValue``, as field ``tag`` of its parent."""
    k = _KEYS.get(key)
    if k is None:
        k = _ld(b"\x0a", key.encode())
        if len(_KEYS) < 1024:  # tag names come from configuration: few
            _KEYS[key] = k
    v = value.encode()
    n = len(v)
    if n < 0x7E:  # the common short value: both lengths fit one byte
        return _ld(tag, k + bytes((0x12, n + 2, 0x0A, n)) + v)
    return _ld(tag, k + _ld(b"\x12", _ld(b"\x0a", v)))


_SPAN_ATTRIBUTE = b"\x4a"  # Span.attributes = 9
_RESOURCE_ATTRIBUTE = b"\x0a"  # Resource.attributes = 1
_STATUS_ERROR = _ld(b"\x7a", b"\x18\x02")  # Span.status = 15 {code = 3: STATUS_CODE_ERROR}
_FLAGS_SAMPLED = b"\x85\x01" + struct.pack("<I", 1)  # Span.flags = 16 (fixed32): W3C flags
_SCOPE = _ld(b"\x0a", _ld(b"\x0a", SCOPE_NAME.encode()))  # ScopeSpans.scope {name}


def encode_span(span: Span, info: StreamInfo, node_tags: bytes = b"") -> bytes:
    """One ``Span`` message (``node_tags``: KeyValue fields already encoded, appended)."""
    start = int(info.start_wall * 1e9)
    end = start + int(info.duration_ms * 1e6)
    parts = [
        _ld(b"\x0a", bytes.fromhex(span.trace_id.decode())),
        _ld(b"\x12", bytes.fromhex(span.span_id.decode())),
    ]
    tracestate = info.request.headers.get(b"tracestate") if info.request is not None else None
    if tracestate:
        parts.append(_ld(b"\x1a", tracestate))
    if span.parent_id:
        parts.append(_ld(b"\x22", bytes.fromhex(span.parent_id.decode())))
    parts.append(_ld(b"\x2a", span_name(info).encode()))
    parts.append(b"\x30" + _varint(span.kind))
    parts.append(b"\x39" + struct.pack("<Q", start))
    parts.append(b"\x41" + struct.pack("<Q", end))
    keys = _KEYS
    for k, v in span_attributes(span, info):
        kb = keys.get(k)
        vb = v.encode()
        n = len(vb)
        if kb is not None and (m := len(kb) + n + 4) < 0x80 and n < 0x7E:
            # The common case in one formatting: KeyValue{key, value: AnyValue{string}}.
            parts.append(b"\x4a%c%s\x12%c\x0a%c%s" % (m, kb, n + 2, n, vb))
        else:
            parts.append(_key_value(_SPAN_ATTRIBUTE, k, v))
    parts.append(node_tags)
    if is_error(info):
        parts.append(_STATUS_ERROR)
    if span.sampled:
        parts.append(_FLAGS_SAMPLED)
    return b"".join(parts)


def node_tags(node: NodeTags) -> bytes:
    """The per-proxy span tags, encoded once per exporter."""
    return b"".join(_key_value(_SPAN_ATTRIBUTE, k, v) for k, v in node.tags())


def resource_attributes(node: NodeTags, service_name: str = "") -> bytes:
    """The OTLP resource's attributes (``service.name``, ``k8s.*``), encoded."""
    return b"".join(_key_value(_RESOURCE_ATTRIBUTE, k, v) for k, v in node.resource(service_name))


def export_request(spans: bytes, resource: bytes) -> bytes:
    """An ``ExportTraceServiceRequest``: one resource (this proxy), one scope, ``spans``
    (``ScopeSpans.spans`` fields, as ``encode_spans`` writes them)."""
    scope_spans = _ld(b"\x12", _SCOPE + spans)  # ResourceSpans.scope_spans = 2
    resource_spans = _ld(b"\x0a", resource) + scope_spans  # ResourceSpans.resource = 1
    return _ld(b"\x0a", resource_spans)  # ExportTraceServiceRequest.resource_spans = 1


def encode_spans(batch: list[tuple[Span, StreamInfo]], tags: bytes) -> bytes:
    return b"".join(_ld(b"\x12", encode_span(span, info, tags)) for span, info in batch)


def encode(batch: list[tuple[Span, StreamInfo]], node: NodeTags, service_name: str = "") -> bytes:
    """An ``ExportTraceServiceRequest`` holding ``batch``, in one go."""
    spans = encode_spans(batch, node_tags(node))
    return export_request(spans, resource_attributes(node, service_name))


class OtlpExporter:
    """One worker's queue of finished spans for one collector, and the exports that empty it."""

    __slots__ = (
        "_client",
        "_idle",
        "_queue",
        "_resource",
        "_tags",
        "_task",
        "_timer",
        "endpoint",
        "loop",
        "node",
        "stats",
    )

    def __init__(
        self,
        endpoint: OtlpEndpoint,
        node: NodeTags,
        stats: TracingStats,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.endpoint = endpoint
        self.node = node
        self.stats = stats
        self.loop = loop
        self._queue: deque[tuple[Span, StreamInfo]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._client = HttpClient(endpoint.host, endpoint.port, endpoint.timeout)
        self._idle = asyncio.Event()
        self._idle.set()
        self._tags = node_tags(node)
        self._resource = resource_attributes(node, endpoint.service_name)

    def __repr__(self) -> str:
        return f"<OtlpExporter {self.endpoint.uri} queued={len(self._queue)}>"

    def submit(self, span: Span, info: StreamInfo) -> None:
        queue = self._queue
        if len(queue) >= self.endpoint.max_queue:
            self.stats.spans_dropped += 1
            return
        queue.append((span, info))
        if self._task is None:
            if len(queue) >= BATCH_SIZE:
                self._start_export()
            elif self._timer is None:
                self._timer = self.loop.call_later(FLUSH_INTERVAL, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._queue and self._task is None:
            self.stats.timer_flushed += 1
            self._start_export()

    def _start_export(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._idle.clear()
        self._task = self.loop.create_task(self._export_all())

    async def _export_all(self) -> None:
        try:
            while self._queue:
                n = min(len(self._queue), BATCH_SIZE)
                batch = [self._queue.popleft() for _ in range(n)]
                await self._export(batch)
        finally:
            self._task = None
            self._idle.set()
            if self._queue and self._timer is None:
                self._timer = self.loop.call_later(FLUSH_INTERVAL, self._on_timer)

    async def _export(self, batch: list[tuple[Span, StreamInfo]]) -> None:
        stats = self.stats
        parts = []
        for i in range(0, len(batch), _ENCODE_SLICE):
            parts.append(encode_spans(batch[i : i + _ENCODE_SLICE], self._tags))
            await asyncio.sleep(0)  # let requests run between slices
        body = export_request(b"".join(parts), self._resource)
        try:
            status = await self._client.post(
                self.endpoint.path,
                body,
                [("content-type", "application/x-protobuf"), *self.endpoint.headers],
            )
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError) as e:
            log.debug("OTLP export to %s failed: %r", self.endpoint.uri, e)
            status = 0
        if 200 <= status < 300:
            stats.spans_sent += len(batch)
        else:
            if status:
                log.debug("OTLP export to %s answered %d", self.endpoint.uri, status)
            stats.export_failures += 1
            stats.spans_dropped += len(batch)

    async def close(self) -> None:
        """Export everything queued, then close the connection."""
        if self._queue and self._task is None:
            self._start_export()
        await self._idle.wait()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._client.close()


class HttpClient:
    """A minimal HTTP/1.1 client for one origin: one keep-alive connection, one request at a
    time, ``timeout`` seconds for each exchange (connect included). Not on any request path."""

    __slots__ = ("_reader", "_writer", "host", "port", "timeout")

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    def __repr__(self) -> str:
        state = "connected" if self._writer is not None else "idle"
        return f"<HttpClient {self.host}:{self.port} {state}>"

    async def post(self, path: str, body: bytes, headers: list[tuple[str, str]]) -> int:
        """POST ``body``; the response's status (its body is read and dropped)."""
        try:
            return await asyncio.wait_for(self._post(path, body, headers), self.timeout)
        except BaseException:
            self.close()  # the connection's state is unknown: never reuse it
            raise

    async def _post(self, path: str, body: bytes, headers: list[tuple[str, str]]) -> int:
        reader, writer = self._reader, self._writer
        if reader is not None and writer is not None and not reader.at_eof():
            try:
                return await self._exchange(reader, writer, path, body, headers)
            except _Stale:
                self.close()  # the server closed the idle connection as we reused it: once more
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        try:
            return await self._exchange(self._reader, self._writer, path, body, headers)
        except _Stale as e:
            raise ConnectionResetError("the collector closed the connection") from e

    async def _exchange(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        path: str,
        body: bytes,
        headers: list[tuple[str, str]],
    ) -> int:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        lines = [f"POST {path} HTTP/1.1", f"host: {host}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in headers]
        lines.append(f"content-length: {len(body)}")
        try:
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
            await writer.drain()
            status_line = await reader.readline()
        except ConnectionError as e:
            raise _Stale from e
        if not status_line:
            raise _Stale
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ValueError(f"not an HTTP response: {status_line[:80]!r}")
        status = int(parts[1])
        length: int | None = None
        chunked = close = False
        while (line := await reader.readline()) not in (b"\r\n", b"\n"):
            if not line:
                raise asyncio.IncompleteReadError(b"", None)
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                chunked = "chunked" in value
            elif name == "connection":
                close = "close" in value
        if chunked:
            while size := int((await reader.readline()).split(b";")[0], 16):
                await reader.readexactly(size + 2)
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass  # trailers
        elif length is not None:
            if length > _MAX_RESPONSE:
                close = True
            else:
                await reader.readexactly(length)
        elif status >= 200 and status not in (204, 304):
            close = True  # delimited by close: we do not wait for it
        if close or parts[0] == b"HTTP/1.0":
            self.close()
        return status

    def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()


class _Stale(Exception):
    """The connection ended before any byte of a response: nothing was processed."""
