"""Downstream HTTP/1.1 connections: parse requests, run the filter chain, write responses.

Theory of operation. ``DownstreamConnection`` feeds every byte to httptools (llhttp in strict
mode, which already rejects the RFC 9112 §6.3 smuggling cases) and turns parser callbacks into
``Stream`` objects, one per request. Streams form a queue: pipelined requests are parsed as they
arrive but handled one at a time, answered in order. The head stream is *active*: its request
body goes to its router as it arrives; the bodies of queued streams wait in memory, and reading
pauses once they pass a high watermark.

For the active stream the connection manager does what Envoy's HCM does, in order: request
validation, x-request-id / x-forwarded-* handling, the JWT filter, the RBAC filters, route
selection, the fault filter, then the router (``meshlet.proxy.router``), which writes the
response back through ``Stream``'s ``start_response`` / ``send_body`` / ``end_response``.
Everything is callbacks and ``call_later`` timers; no task per request.

Backpressure both ways: the router pauses this connection's reading while the upstream's send
buffer is full, and this connection pauses the upstream's reading while the client's is full.

A connection that cannot go on (a malformed request, a timeout, a refused upgrade) stops
*reading* at once (``closing``) but still answers, in order, the requests parsed before the bad
one; then it shuts its write side and drops what the client still sends for up to Envoy's
``delayed_close_timeout``, so that the client reads our last response instead of a reset.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections import deque
from typing import TYPE_CHECKING, Any, cast

import httptools

from meshlet.proxy import framing
from meshlet.proxy.filters import metadata_exchange as mx
from meshlet.proxy.filters.fault import NO_FAULT, decide
from meshlet.proxy.filters.jwt_authn import MISSING as JWT_MISSING
from meshlet.proxy.filters.rbac import DENIED_BODY, enforce, request_attributes
from meshlet.proxy.headers import Headers, RequestHead
from meshlet.proxy.router import UpstreamRequest
from meshlet.proxy.routing import DirectResponseAction, RedirectAction, RouteAction
from meshlet.proxy.stream_info import DownstreamTls, Flag, StreamInfo

if TYPE_CHECKING:
    from meshlet.proxy.filters.jwt_authn import Failure, JwtAuthn
    from meshlet.proxy.listener import HcmConfig
    from meshlet.proxy.routing import ClusterChoice, Route
    from meshlet.proxy.telemetry.tracing import Span
    from meshlet.proxy.upstream.cluster import Cluster
    from meshlet.proxy.worker import ChainRuntime, ListenerRuntime

log = logging.getLogger("meshlet.http1")

_QUEUED_BODY_HIGH_WATER = 256 * 1024
_FAULT_ABORT_BODY = b"fault filter abort"
_STREAM_TIMEOUT_BODY = b"stream timeout"
_DELAYED_CLOSE = 1.0  # Envoy's delayed_close_timeout default
# x-forwarded-proto says how the client reached us, whatever scheme an absolute-form target names.
_DOWNSTREAM_SCHEME = b"http"
_DOWNSTREAM_SCHEME_TLS = b"https"
_XFCC = b"x-forwarded-client-cert"
JWT_FILTER = "envoy.filters.http.jwt_authn"  # its dynamic metadata namespace
_JWT_REALM_PATH_MAX = 256  # Envoy's jwt_authn: the realm's URI path is cut at 256 bytes


# Request headers the connection manager notes while parsing, and those it drops.
_DROPPED = framing.HOP_BY_HOP | framing.ENVOY_CONTROL
_NOTED = _DROPPED | {
    b"host",
    b"content-length",
    b"expect",
    b"x-request-id",
    b"x-forwarded-proto",
    b"x-forwarded-for",
    _XFCC,
    b"content-type",  # request_protocol grpc
    *mx.HEADERS,  # istio.metadata_exchange
}
_RESPONSE_NOTED = framing.HOP_BY_HOP | mx.HEADERS | {b"content-length", b"date", b"server"}
# UUIDv4 layout: version nibble 4 (bits 76-79), variant bits 10 (bits 62-63).
_UUID_CLEAR = ~((0xF << 76) | (0x3 << 62)) & ((1 << 128) - 1)
_UUID_SET = (0x4 << 76) | (0x2 << 62)


class Stream:
    """One request/response exchange on a downstream connection."""

    __slots__ = (
        "body_queue",
        "chunked_out",
        "close_after",
        "conn",
        "dirty",
        "expect_continue",
        "expects_body",
        "failure",
        "fault_active",
        "hcm",
        "head",
        "headers_done",
        "idle_timeout",
        "info",
        "last_active",
        "out",
        "request_chunked",
        "request_complete",
        "request_timer",
        "response_complete",
        "response_head_only",
        "response_started",
        "router",
        "span",
        "special",
        "timers",
        "upgrade",
        "url",
    )

    def __init__(self, conn: DownstreamConnection, hcm: HcmConfig, info: StreamInfo) -> None:
        self.conn = conn
        self.hcm = hcm  # the configuration this request started on; later swaps do not apply
        self.info = info
        self.url = b""
        self.special: dict[bytes, bytes] = {}  # noted request headers (first values)
        self.dirty = False  # the request carries headers to drop before forwarding
        self.head: RequestHead | None = None
        self.headers_done = False
        self.request_complete = False
        self.request_chunked = False  # the downstream sent a chunked body; re-chunk upstream
        self.body_queue: list[bytes] | None = []  # body bytes that arrived before a router
        self.router: UpstreamRequest | None = None
        self.expect_continue = False
        self.expects_body = False
        self.upgrade = False
        self.response_started = False
        self.response_complete = False
        self.response_head_only = False
        self.chunked_out = False
        self.close_after = False
        self.out: list[bytes] = []  # response bytes gathered during one upstream read
        self.request_timer: asyncio.TimerHandle | None = None  # request_timeout
        self.idle_timeout = 0.0  # stream_idle_timeout (the route's, once routed); 0: none
        self.last_active = 0.0  # loop time of the last activity either way
        self.timers: list[asyncio.TimerHandle] = []  # others (fault delay): end with the stream
        self.fault_active = False  # counted in the active-faults gauges until it ends
        # A local reply owed once the requests before this one are answered: the connection
        # failed here (malformed request, timeout) and closes after it.
        self.failure: tuple[int, bytes, str] | None = None
        self.span: Span | None = None  # only when the HCM traces

    def __repr__(self) -> str:
        return (
            f"<Stream {self.head!r} started={self.response_started} done={self.response_complete}>"
        )

    # -- request body, from the connection ---------------------------------------------------

    def on_body(self, data: bytes) -> None:
        self.info.bytes_received += len(data)
        self.last_active = self.conn.runtime.loop.time()
        router = self.router
        if router is not None:
            router.on_request_body(data)
        elif self.body_queue is not None:
            self.body_queue.append(data)

    def on_request_complete(self) -> None:
        self.request_complete = True
        self.last_active = self.conn.runtime.loop.time()
        if self.request_timer is not None:
            self.request_timer.cancel()  # request_timeout covers receiving the request only
            self.request_timer = None
        if self.router is not None:
            self.router.on_request_end()

    def attach(self, router: UpstreamRequest) -> None:
        """Give the request body (what came so far, and what follows) to ``router``."""
        self.router = router
        queued, self.body_queue = self.body_queue, None
        for data in queued or ():
            router.on_request_body(data)
        if self.request_complete:
            router.on_request_end()

    def cancel_timers(self) -> None:
        if self.request_timer is not None:
            self.request_timer.cancel()
            self.request_timer = None
        for t in self.timers:
            t.cancel()
        self.timers.clear()

    # -- response, from the router or a local reply ------------------------------------------

    def start_response(self, status: int, headers: Headers) -> None:
        """Queue the response head. ``headers`` are the upstream's (hop-by-hop included)."""
        head = self.head
        assert head is not None
        hcm = self.hcm
        self.response_started = True
        self.last_active = self.conn.runtime.loop.time()
        info = self.info
        info.response_code = status
        # One pass over the upstream's headers: drop hop-by-hop ones (and the server header
        # when we overwrite it) and note what the rest of this method needs to know.
        replace_server = hcm.server_name is not None and not hcm.server_append_if_absent
        kept = []
        hop_seen = has_length = has_date = has_server = False
        peer_value = None  # the upstream's x-envoy-peer-metadata (metadata exchange)
        for kv in headers.items:
            k = kv[0]
            if k in _RESPONSE_NOTED:
                if k in framing.HOP_BY_HOP:
                    hop_seen = True
                    continue
                if k == b"content-length":
                    has_length = True
                elif k == b"date":
                    has_date = True
                elif k == b"server":
                    has_server = True
                    if replace_server:
                        continue
                elif k in mx.HEADERS and hcm.metadata_exchange:
                    if k == mx.PEER_METADATA:
                        peer_value = kv[1]
                    continue  # never passed on: the app does not see the exchange
            kept.append(kv)
        if hop_seen:
            # RFC 9110 §7.6.1: the fields a Connection header names are hop-by-hop too.
            connection = headers.joined(b"connection")
            if connection:
                named = {t.strip().lower() for t in connection.split(b",")}
                kept = [(k, v) for k, v in kept if k not in named]
        out = Headers(kept)
        if hcm.metadata_exchange:
            rt = self.conn.runtime
            inbound = rt.reporter == "destination"
            mx.on_response(out, peer_value, info, inbound=inbound, local=rt.mx_headers)
        no_body = head.method == b"HEAD" or status in (204, 304) or status < 200
        self.response_head_only = no_body
        if status == 204 or status < 200:
            if has_length:
                out.remove(b"content-length")  # RFC 9110 §8.6: never on 1xx and 204
        elif not no_body and not has_length:
            if head.version == b"1.1":
                self.chunked_out = True
                out.items.append((b"transfer-encoding", b"chunked"))
            else:
                self.close_after = True  # HTTP/1.0: the body ends when the connection does
        if hcm.server_name is not None and (replace_server or not has_server):
            out.items.append((b"server", hcm.server_name))
        if not has_date:
            out.items.append((b"date", framing.DATE.value()))
        if hcm.always_set_request_id_in_response:
            rid = head.headers.get(b"x-request-id")
            if rid is not None:
                out.set(b"x-request-id", rid)
        if self.conn.draining or not head.keep_alive or not self.request_complete:
            self.close_after = True
        if self.close_after:
            out.items.append((b"connection", b"close"))  # any upstream one was dropped above
        elif head.version == b"1.0":
            out.add(b"connection", b"keep-alive")
        info.response_headers = out
        self.out.append(framing.status_line(status) + framing.serialize_headers(out) + framing.CRLF)

    def send_body(self, data: bytes) -> None:
        if self.response_head_only or not data:
            return
        self.last_active = self.conn.runtime.loop.time()
        self.info.bytes_sent += len(data)
        self.out.append(framing.chunk(data) if self.chunked_out else data)

    def end_response(self) -> None:
        if self.chunked_out:
            self.out.append(framing.LAST_CHUNK)
        self.flush()
        self.conn.stream_finished(self)

    def flush(self) -> None:
        """Write what was gathered, in one write (one syscall, one packet)."""
        out = self.out
        if out:
            self.conn.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def reset(self, flag: Flag) -> None:
        """The upstream failed after the response started: all we can do is close."""
        self.info.add_flag(flag)
        self.flush()
        self.close_after = True
        self.conn.stream_finished(self, aborted=True)

    def local_reply(
        self,
        status: int,
        body: bytes = b"",
        *,
        flag: Flag | None = None,
        details: str = "",
        headers: Headers | None = None,
        close: bool = False,
    ) -> None:
        """Answer from the proxy itself (Envoy's local reply): text body, length, flags."""
        if flag is not None:
            self.info.add_flag(flag)
        self.info.response_code_details = details
        if close:
            self.close_after = True
        out = headers if headers is not None else Headers()
        if body:
            out.set(b"content-length", str(len(body)).encode())
            out.set(b"content-type", b"text/plain")
        else:
            out.set(b"content-length", b"0")
        if self.head is None:
            self.head = RequestHead(
                method=b"GET", path=b"/", authority=b"", headers=Headers(), keep_alive=False
            )
        self.start_response(status, out)
        self.send_body(body)
        self.end_response()


class DownstreamConnection(asyncio.Protocol):
    """One client connection to a listener."""

    __slots__ = (
        "_close_timer",
        "_dirty",
        "_hdr_bytes",
        "_hdrs",
        "_head_pending",
        "_head_wire",
        "_headers_timer",
        "_idle_timer",
        "_paused_by",
        "_queued_bytes",
        "_reparse",
        "_shut",
        "_special",
        "_stream_idle_at",
        "_stream_idle_timer",
        "chain",
        "closed",
        "closing",
        "draining",
        "local",
        "parser",
        "peer",
        "peer_ip",
        "peer_principal",
        "runtime",
        "streams",
        "tls",
        "transport",
        "writing_paused",
    )

    def __init__(
        self,
        runtime: ListenerRuntime,
        chain: ChainRuntime | None = None,
        tls: DownstreamTls | None = None,
    ) -> None:
        self.runtime = runtime
        self.chain = chain or runtime.chains[0]  # its HCM (routes, timeouts) serves requests
        self.tls = tls  # None: plaintext
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.streams: deque[Stream] = deque()
        self.peer = ""
        self.peer_ip = b""
        # The peer certificate's URI SAN (spiffe://<td>/ns/<ns>/sa/<sa>) once downstream mTLS
        # sets it; None: no peer identity (RBAC's ``authenticated`` principals never match).
        self.peer_principal: str | None = (tls.peer_principal or None) if tls is not None else None
        self.local = ""
        self.closed = False
        self.closing = False  # no more requests are read; those parsed are still answered
        self._shut = False  # our write side is shut (or the connection is gone): write nothing
        self.draining = runtime.draining
        self.writing_paused = False
        self._paused_by: set[str] = set()
        self._queued_bytes = 0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._headers_timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        # One stream-idle timer per connection, not per request (a timer is ~2 µs of a ~25 µs
        # request): it watches the head stream and is re-armed only when it fires too early.
        self._stream_idle_timer: asyncio.TimerHandle | None = None
        self._stream_idle_at = 0.0
        self._hdrs: list[tuple[bytes, bytes]] = []
        self._hdr_bytes = 0
        # Headers the connection manager looks at, found while parsing (first value each), so
        # that no request pays for scanning its header list again; `_dirty`: one of them must
        # be removed before forwarding.
        self._special: dict[bytes, bytes] = {}
        self._dirty = False
        self._head_pending = False  # a request head is being parsed
        self._head_wire = -1  # bytes read for it after the read it began in (-1: none yet)
        self._reparse: bytes | None = None  # an h2c request head to parse again, as HTTP/1.1

    def __repr__(self) -> str:
        return f"<DownstreamConnection {self.peer} streams={len(self.streams)}>"

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        self.peer = f"{peer[0]}:{peer[1]}"
        self.peer_ip = str(peer[0]).encode()
        self.local = f"{local[0]}:{local[1]}"
        rt = self.runtime
        rt.connections.add(self)
        rt.http_stats.downstream_cx_total += 1
        rt.http_stats.downstream_cx_active += 1
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return  # closing: what the client still sends is read and dropped
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self._upgraded(data, e.args[0])
        except httptools.HttpParserCallbackError as e:
            self._callback_error(e)
            return
        except httptools.HttpParserError:
            self._protocol_error(400, "http1.codec_error")
            return
        if self._head_pending:
            # httptools gathers a header line whole before calling on_header, so a line that
            # never ends would grow without bound: count the bytes of an unfinished head too.
            # The read a head began in is not counted (part of it may be an earlier message).
            if self._head_wire < 0:
                self._head_wire = 0
            else:
                self._head_wire += len(data)
                if self._head_wire > self.chain.hcm.max_request_headers_bytes:
                    self._protocol_error(431, "http1.headers_too_large")

    def _upgraded(self, data: bytes | memoryview, offset: int) -> None:
        """llhttp stopped after an upgrade request (or CONNECT) that ends at ``offset``."""
        while not self.closing:
            reparse = self._reparse
            if reparse is None:
                # A refused upgrade or CONNECT: what follows would be another protocol.
                self.closing = True
                return
            # Envoy ignores "Upgrade: h2c": parse the request again without it, body and all,
            # then what followed it (a loop, not recursion: a read may hold many such requests).
            self._reparse = None
            self.parser = httptools.HttpRequestParser(self)
            data = memoryview(data)[offset:]
            try:
                self.parser.feed_data(reparse)
                self.parser.feed_data(data)
                return
            except httptools.HttpParserUpgrade as e:
                offset = e.args[0]
            except httptools.HttpParserCallbackError as e:
                self._callback_error(e)
                return
            except httptools.HttpParserError:
                self._protocol_error(400, "http1.codec_error")
                return

    def _callback_error(self, e: httptools.HttpParserCallbackError) -> None:
        if isinstance(e.__context__, _Reject):
            self._protocol_error(e.__context__.status, e.__context__.details)
        elif not isinstance(e.__context__, _Stop):
            raise e

    def eof_received(self) -> bool:
        return False  # no half-closed HTTP/1 connections (Envoy closes too)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.closing = True
        self._shut = True
        rt = self.runtime
        rt.connections.discard(self)
        rt.http_stats.downstream_cx_active -= 1
        timers = (self._idle_timer, self._headers_timer, self._close_timer, self._stream_idle_timer)
        for timer in timers:
            if timer is not None:
                timer.cancel()
        while self.streams:
            stream = self.streams.popleft()
            if stream.response_complete:
                continue
            stream.cancel_timers()
            self._end_fault(stream)
            if stream.router is not None:
                stream.router.cancel()
            if stream.head is not None:
                stream.info.add_flag(Flag.DOWNSTREAM_CONNECTION_TERMINATION)
                self._log(stream)

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.streams and self.streams[0].router is not None:
            self.streams[0].router.on_downstream_paused(True)

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.streams and self.streams[0].router is not None:
            self.streams[0].router.on_downstream_paused(False)

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.closing:
            raise _Stop
        rt = self.runtime
        loop_time = rt.loop.time()
        info = StreamInfo(
            # time.monotonic(), not the loop's clock: uvloop's has millisecond steps, and
            # durations (istio_request_duration_milliseconds, spans) need better
            start=time.monotonic(),
            start_wall=time.time(),
            downstream_remote=self.peer,
            downstream_local=self.local,
            downstream_tls=self.tls,
        )
        stream = Stream(self, self.chain.hcm, info)
        self.streams.append(stream)
        # Header accumulation lives on the connection while parsing (hot path: no lookups).
        self._hdrs = []
        self._hdr_bytes = 0
        self._special = {}
        self._dirty = False
        self._head_pending = True
        self._head_wire = -1
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        hcm = stream.hcm
        if hcm.request_timeout:
            stream.request_timer = rt.loop.call_later(
                hcm.request_timeout, self._request_timeout, stream
            )
        if hcm.stream_idle_timeout:
            # Envoy's stream exists (and its idle timer runs) from the request's first byte.
            timeout = stream.idle_timeout = hcm.stream_idle_timeout
            stream.last_active = loop_time
            if self.streams[0] is stream and (
                self._stream_idle_timer is None or loop_time + timeout < self._stream_idle_at
            ):
                self._watch_idle(stream)
        if hcm.request_headers_timeout:
            # Envoy starts this timer at the request's first byte.
            self._headers_timer = rt.loop.call_later(
                hcm.request_headers_timeout, self._headers_timeout
            )

    def on_url(self, url: bytes) -> None:
        if self.closing:
            raise _Stop
        stream = self.streams[-1]
        stream.url += url
        if len(stream.url) > self.chain.hcm.max_request_headers_bytes:
            raise _Reject(414, "http1.request_line_too_long")

    def on_header(self, name: bytes, value: bytes) -> None:
        hdrs = self._hdrs
        self._hdr_bytes += len(name) + len(value) + 4
        hcm = self.chain.hcm
        if self._hdr_bytes > hcm.max_request_headers_bytes:
            raise _Reject(431, "http1.headers_too_large")
        if len(hdrs) >= hcm.max_headers_count:
            raise _Reject(431, "http1.too_many_headers")
        name = name.lower()
        if name in _NOTED:
            special = self._special
            if name == b"host":
                if b"host" in special:
                    raise _Reject(400, "http1.codec_error")  # RFC 9112 §3.2: one Host, no more
                special[name] = value
                return  # not kept in the list: the authority is written apart
            if name not in special:
                special[name] = value
            if name in _DROPPED:
                self._dirty = True
        hdrs.append((name, value))

    def on_headers_complete(self) -> None:
        if self.closing:
            raise _Stop
        stream = self.streams[-1]
        parser = self.parser
        headers = Headers(self._hdrs)
        special = self._special
        self._hdrs = []
        self._head_pending = False
        if self._headers_timer is not None:
            self._headers_timer.cancel()
            self._headers_timer = None
        version = parser.get_http_version().encode()
        if version != b"1.1" and version != b"1.0":
            raise _Reject(505, "http1.invalid_version")  # RFC 9110 §15.6.6 (llhttp takes 2.0)
        method = parser.get_method()
        if parser.should_upgrade() and method != b"CONNECT":
            upgrade = special.get(b"upgrade") or b""
            if upgrade.lower() == b"h2c":
                # llhttp has already made this an upgrade (it skips the body and stops): parse
                # the request again without the header, and forget this parse of it.
                self.streams.pop()
                stream.cancel_timers()
                host = [b"host: " + special[b"host"] + framing.CRLF] if b"host" in special else []
                self._reparse = b"".join(
                    [method, b" ", stream.url, b" HTTP/", version, framing.CRLF, *host]
                    + [k + b": " + v + framing.CRLF for k, v in headers.items if k != b"upgrade"]
                    + [framing.CRLF]
                )
                return
            stream.upgrade = True
        keep_alive = parser.should_keep_alive()
        head = _make_head(stream.url, method, headers, special, version, keep_alive)
        stream.head = head
        stream.special = special
        stream.dirty = self._dirty
        stream.headers_done = True
        stream.last_active = self.runtime.loop.time()
        # A request with a body starts now and streams it; one without starts at its end, so
        # that a reply made at once (404, direct response) does not see an unfinished request.
        cl = special.get(b"content-length")
        stream.expects_body = (cl is not None and cl != b"0") or b"transfer-encoding" in special
        if stream.expects_body and self.streams[0] is stream and not stream.upgrade:
            self._begin(stream)

    def on_body(self, body: bytes) -> None:
        if self.closing:
            raise _Stop
        stream = self.streams[-1]
        if stream.router is None and stream.body_queue is not None:
            self._queued_bytes += len(body)
            if self._queued_bytes > _QUEUED_BODY_HIGH_WATER:
                self.pause_reading("queued")
        stream.on_body(body)

    def on_message_complete(self) -> None:
        if self.closing:
            raise _Stop
        if self._reparse is not None:
            return  # the end llhttp gives an h2c upgrade request; it is parsed again
        stream = self.streams[-1]
        stream.on_request_complete()
        if (not stream.expects_body or stream.upgrade) and self.streams[0] is stream:
            self._begin(stream)

    # -- the connection manager --------------------------------------------------------------

    def _begin(self, stream: Stream) -> None:
        """The stream became active with complete headers: validate, route, filter, proxy."""
        head = stream.head
        assert head is not None
        rt = self.runtime
        hcm = stream.hcm
        info = stream.info
        info.request = head
        rt.http_stats.downstream_rq_total += 1
        rt.http_stats.downstream_rq_active += 1
        if head.authority == b"":
            stream.local_reply(
                400,
                b"Bad Request",
                flag=Flag.DOWNSTREAM_PROTOCOL_ERROR,
                details="missing_host_header",
                close=True,
            )
            return
        if head.path[:1] != b"/":
            if head.path == b"*" and head.method == b"OPTIONS":
                pass
            else:
                # CONNECT matches no route here, and what follows it is a tunnel: close.
                connect = head.method == b"CONNECT"
                stream.local_reply(404, details="absolute_path_rejected", close=connect)
                return
        special = stream.special
        te = special.get(b"transfer-encoding")
        if te is not None:
            if te.lower() != b"chunked":
                # Envoy: any transfer coding but chunked is 501 (RFC 9112 §6.1).
                self.closing = True  # llhttp may not even know where this request ends
                stream.local_reply(
                    501,
                    b"Not Implemented",
                    flag=Flag.DOWNSTREAM_PROTOCOL_ERROR,
                    details="http1.invalid_transfer_encoding",
                    close=True,
                )
                return
            stream.request_chunked = True
            if head.version == b"1.0":
                stream.close_after = True  # RFC 9112 §6.1: faulty framing; close after it
        if stream.upgrade:
            # No upgrade_configs are supported: Envoy refuses with 403 and closes.
            stream.local_reply(403, details="upgrade_failed", close=True)
            return
        headers = head.headers
        expect = special.get(b"expect")
        if expect is not None and expect.lower() == b"100-continue" and not hcm.proxy_100_continue:
            # Envoy answers 100 Continue itself and does not forward the expectation.
            headers.remove(b"expect")
            if not stream.request_complete:
                self.write(framing.CONTINUE_100)
        _sanitize_request(head, stream, hcm, self.peer_ip, rt)
        if hcm.metadata_exchange:
            inbound = rt.reporter == "destination"
            mx.on_request(headers, stream.special, info, inbound=inbound, local=rt.mx_headers)
        content_type = stream.special.get(b"content-type")
        if content_type is not None and content_type.startswith(b"application/grpc"):
            info.grpc = True  # Istio's request_protocol "grpc"
        tracing = hcm.tracing
        if tracing is not None:  # the span starts before the filters, as Envoy's HCM does
            stream.span = rt.tracer.start(tracing, head, outbound=rt.config.outbound)
        # The JWT filter, then the RBAC filters: both before the router, whose work (404, direct
        # responses) they precede; RBAC reads the payload the JWT filter leaves.
        if hcm.jwt_authn is not None and not _jwt_authn(hcm.jwt_authn, stream, head, rt):
            return
        if hcm.rbac:
            attrs = request_attributes(
                head,
                peer_ip=self.peer_ip,
                local=self.local,
                inbound=rt.reporter == "destination",
                use_remote_address=hcm.use_remote_address,
                xff_num_trusted_hops=hcm.xff_num_trusted_hops,
                peer_principal=self.peer_principal,
                metadata=info.dynamic_metadata,
            )
            details = enforce(hcm.rbac, attrs, rt.http_stats)
            if details is not None:
                stream.local_reply(403, DENIED_BODY, details=details)
                return
        selection = hcm.route_table.select(head)
        if selection is None or selection.route is None:
            rt.http_stats.no_route += 1
            stream.local_reply(404, flag=Flag.NO_ROUTE, details="route_not_found")
            return
        route = selection.route
        info.virtual_host = selection.virtual_host.name
        info.route_name = route.name
        action = route.action
        if isinstance(action, DirectResponseAction):
            rt.http_stats.rq_direct_response += 1
            out = Headers()
            route.response_mutation.apply(out)
            stream.local_reply(action.status, action.body, headers=out, details="direct_response")
            return
        if isinstance(action, RedirectAction):
            rt.http_stats.rq_redirect += 1
            status, location = action.response(head)
            out = Headers([(b"location", location)])
            route.response_mutation.apply(out)
            stream.local_reply(status, headers=out, details="direct_response")
            return
        assert isinstance(action, RouteAction)
        if action.idle_timeout is not None:
            self._set_idle_timeout(stream, action.idle_timeout)  # the route's replaces the HCM's
        choice = action.choose_cluster(head, rt.rng.getrandbits(64))
        info.upstream_cluster = choice.name
        cluster = rt.clusters.get(choice.name)
        if cluster is None:
            rt.http_stats.no_cluster += 1
            stream.local_reply(503, flag=Flag.NO_CLUSTER, details="cluster_not_found")
            return
        route.finalize_request(head, choice, suppress_envoy_headers=hcm.suppress_envoy_headers)
        # The fault filter runs before the router, with the route already chosen.
        if hcm.fault_filter:
            policy = choice.fault or hcm.fault
            if policy is not None:
                fault = decide(policy, head, choice.name, rt.active_faults, rt.rng)
                if fault is not NO_FAULT:
                    self._fault(
                        stream, fault.delay, fault.abort_status, route, action, choice, cluster
                    )
                    return
        self._route(stream, route, action, choice, cluster)

    def _route(
        self,
        stream: Stream,
        route: Route,
        action: RouteAction,
        choice: ClusterChoice,
        cluster: Cluster,
    ) -> None:
        if self.closed or stream.response_complete:
            return
        span = stream.span
        if span is not None and stream.head is not None:
            span.inject(stream.head.headers)  # the router's injectContext
        router = UpstreamRequest(stream, route, action, choice, cluster, self.runtime)
        stream.attach(router)
        router.start()

    def _fault(
        self,
        stream: Stream,
        delay: float | None,
        abort_status: int | None,
        *route_args: Any,
    ) -> None:
        rt = self.runtime
        stats = rt.http_stats

        def after_delay() -> None:
            self._end_fault(stream)
            if self.closed or stream.response_complete:
                return
            if abort_status is not None:
                stats.aborts_injected += 1
                stream.local_reply(
                    abort_status,
                    _FAULT_ABORT_BODY,
                    flag=Flag.FAULT_INJECTED,
                    details="fault_filter_abort",
                )
            else:
                self._route(stream, *route_args)

        stream.fault_active = True
        rt.active_faults += 1
        stats.active_faults += 1
        if delay:
            stats.delays_injected += 1
            stream.info.add_flag(Flag.DELAY_INJECTED)
            stream.timers.append(rt.loop.call_later(delay, after_delay))
        else:
            after_delay()

    def _end_fault(self, stream: Stream) -> None:
        """A fault stops counting as active when it ends, or when its stream does first."""
        if stream.fault_active:
            stream.fault_active = False
            self.runtime.active_faults -= 1
            self.runtime.http_stats.active_faults -= 1

    def stream_finished(self, stream: Stream, *, aborted: bool = False) -> None:
        """The response is written: log it, then move on to the next pipelined request."""
        if stream.response_complete:
            return
        stream.response_complete = True
        if stream.request_timer is not None or stream.timers:
            stream.cancel_timers()
        if stream.fault_active:
            self._end_fault(stream)
        stream.router = None  # break the stream <-> router cycle: freed by refcount, not GC
        rt = self.runtime
        if stream.info.request is not None:
            rt.http_stats.downstream_rq_active -= 1
        self._log(stream)
        if self.streams and self.streams[0] is stream:
            self.streams.popleft()
        if stream.close_after or aborted or not stream.request_complete:
            self.streams.clear()
            self._close()
            return
        self._queued_bytes = 0
        self.resume_reading("queued")
        if self.streams:
            nxt = self.streams[0]
            nxt.last_active = rt.loop.time()  # its idle time starts when it becomes active
            self._watch_idle(nxt)
            if nxt.failure is not None:
                self._send_failure(nxt)
            elif nxt.request_complete or (nxt.headers_done and nxt.expects_body):
                self._begin(nxt)
        elif self.closing or self.draining:
            self._close()
        else:
            self._arm_idle()

    def _log(self, stream: Stream) -> None:
        info = stream.info
        rt = self.runtime
        info.end = time.monotonic()
        code = info.response_code
        rt.http_stats.record_response_code(code)
        rt.record(info, stream.hcm)
        span = stream.span
        if span is not None:
            stream.span = None
            rt.tracer.finish(span, info)

    # -- errors and timeouts -----------------------------------------------------------------

    def _protocol_error(self, status: int, details: str) -> None:
        """Malformed request: answer ``status`` (it never reaches an upstream) and close."""
        if self.closing:
            return
        self.runtime.http_stats.downstream_cx_protocol_error += 1
        streams = self.streams
        if streams and not streams[-1].request_complete:
            stream = streams[-1]  # the request being parsed is the malformed one
        else:
            info = StreamInfo(
                start=time.monotonic(),
                start_wall=time.time(),
                downstream_remote=self.peer,
                downstream_local=self.local,
                downstream_tls=self.tls,
            )
            stream = Stream(self, self.chain.hcm, info)
            streams.append(stream)
        stream.info.add_flag(Flag.DOWNSTREAM_PROTOCOL_ERROR)
        self._fail(stream, status, framing.reason_phrase(status).encode(), details)

    def _fail(
        self,
        stream: Stream,
        status: int,
        body: bytes,
        details: str,
        flag: Flag = Flag.DOWNSTREAM_PROTOCOL_ERROR,
    ) -> None:
        """``stream`` cannot go on, nor can the connection: read no more, answer ``stream``
        locally once the requests before it are answered (responses keep request order, RFC
        9112 §9.3.2), then close. If its own response has started, all that is left is closing
        (``flag`` says why).
        """
        self.closing = True
        self._head_pending = False
        if self._headers_timer is not None:
            self._headers_timer.cancel()
            self._headers_timer = None
        if stream.router is not None:
            stream.router.cancel()
        if stream.response_started:
            stream.reset(flag)
            return
        stream.failure = (status, body, details)
        if self.streams and self.streams[0] is stream:
            self._send_failure(stream)

    def _send_failure(self, stream: Stream) -> None:
        assert stream.failure is not None
        status, body, details = stream.failure
        stream.local_reply(status, body, details=details, close=True)

    def _request_timeout(self, stream: Stream) -> None:
        """request_timeout: the whole request was not received in time (408)."""
        stream.request_timer = None
        if stream.response_started or self.closed or stream.request_complete:
            return
        self.runtime.http_stats.downstream_rq_timeout += 1
        self._fail(stream, 408, b"request timeout", "request_overall_timeout")

    def _headers_timeout(self) -> None:
        """request_headers_timeout: the headers did not arrive in time (408, then close)."""
        self._headers_timer = None
        if self.closing or not self.streams or self.streams[-1].headers_done:
            return
        self.runtime.http_stats.downstream_rq_header_timeout += 1
        self._fail(self.streams[-1], 408, b"request header timeout", "request_header_timeout")

    def _set_idle_timeout(self, stream: Stream, timeout: float) -> None:
        stream.idle_timeout = timeout
        stream.last_active = self.runtime.loop.time()
        self._watch_idle(stream)

    def _watch_idle(self, stream: Stream) -> None:
        """Have the stream-idle timer fire by the time the (head) ``stream`` may be idle."""
        if not stream.idle_timeout:
            return
        at = stream.last_active + stream.idle_timeout
        timer = self._stream_idle_timer
        if timer is None or at < self._stream_idle_at:
            if timer is not None:
                timer.cancel()
            self._stream_idle_at = at
            self._stream_idle_timer = self.runtime.loop.call_at(at, self._check_stream_idle)

    def _check_stream_idle(self) -> None:
        """stream_idle_timeout: nothing moved either way for that long (Envoy flag SI).

        Activity only records its time; this checks the head stream (queued ones are not
        active yet: Envoy would not even have read them) and re-arms if it is not idle enough.
        """
        self._stream_idle_timer = None
        if self.closed or not self.streams:
            return
        stream = self.streams[0]
        if not stream.idle_timeout or stream.response_complete:
            return
        if stream.last_active + stream.idle_timeout > self.runtime.loop.time():
            self._watch_idle(stream)
            return
        self.runtime.http_stats.downstream_rq_idle_timeout += 1
        stream.info.add_flag(Flag.STREAM_IDLE_TIMEOUT)
        if stream.request_complete and not stream.response_started:
            # The request was read whole: 504, and the connection can carry on (Envoy).
            if stream.router is not None:
                stream.router.cancel()
            stream.local_reply(504, _STREAM_TIMEOUT_BODY, details="stream_idle_timeout")
        else:
            self._fail(
                stream, 408, _STREAM_TIMEOUT_BODY, "stream_idle_timeout", Flag.STREAM_IDLE_TIMEOUT
            )

    def _arm_idle(self) -> None:
        # Not closed here when draining: a connection accepted while draining (after
        # /healthcheck/fail) is still served, with "connection: close" (Envoy draining.rst).
        timeout = self.chain.hcm.idle_timeout
        if timeout:
            self._idle_timer = self.runtime.loop.call_later(timeout, self._idle_close)

    def _idle_close(self) -> None:
        self._idle_timer = None
        if not self.streams:
            self.runtime.http_stats.downstream_cx_idle_timeout += 1
            self._close(linger=False)

    # -- I/O ---------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self._shut:
            self.transport.write(data)

    def pause_reading(self, reason: str) -> None:
        if not self._paused_by and self.transport is not None and not self._shut:
            self.transport.pause_reading()
        self._paused_by.add(reason)

    def resume_reading(self, reason: str) -> None:
        if self._paused_by and reason in self._paused_by:
            self._paused_by.discard(reason)
            if not self._paused_by and self.transport is not None and not self._shut:
                self.transport.resume_reading()

    def drain(self) -> None:
        """Draining: finish what is in flight with ``connection: close``; close idle now."""
        self.draining = True
        if not self.streams:
            self._close(linger=False)

    def _close(self, *, linger: bool = True) -> None:
        """Close once what is written has gone.

        After a response (``linger``): shut our write side, read and drop whatever the client
        still sends (closing with unread bytes would send a reset that can destroy the response
        still in flight), and close when the client does or after ``delayed_close_timeout``.
        An idle connection has nothing in flight and closes at once.
        """
        self.closing = True
        transport = self.transport
        if transport is None or self._shut or transport.is_closing():
            return
        self._shut = True
        if not linger or not transport.can_write_eof():
            transport.close()
            return
        if self._paused_by:
            self._paused_by.clear()
            transport.resume_reading()
        transport.write_eof()
        self._close_timer = self.runtime.loop.call_later(_DELAYED_CLOSE, transport.close)


class _Stop(Exception):
    """Raised from a parser callback once the connection is closing: parse no further."""


class _Reject(Exception):
    """Raised from a parser callback to stop parsing with a status (becomes HttpParserError)."""

    def __init__(self, status: int, details: str) -> None:
        super().__init__(details)
        self.status = status
        self.details = details


def _make_head(
    url: bytes,
    method: bytes,
    headers: Headers,
    special: dict[bytes, bytes],
    version: bytes,
    keep_alive: bool,
) -> RequestHead:
    """Build the request head; absolute-form targets give the authority (explicit proxy)."""
    authority = special.get(b"host") or b""
    path = url
    scheme = b"http"
    if url[:1] != b"/" and url != b"*":
        # absolute-form: "http://reviews:9080/x?y" (RFC 9112 §3.2.2); the target's authority
        # wins over the Host header.
        if method == b"CONNECT":
            authority = url
            path = b""
        else:
            try:
                parsed = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                parsed = None
            if parsed is not None and parsed.host:
                scheme = parsed.schema or b"http"
                authority = parsed.host + (b":%d" % parsed.port if parsed.port else b"")
                path = (parsed.path or b"/") + (b"?" + parsed.query if parsed.query else b"")
    return RequestHead(
        method=method,
        path=path,
        authority=authority,
        headers=headers,
        scheme=scheme,
        version=version,
        keep_alive=keep_alive,
    )


def _jwt_authn(jwt: JwtAuthn, stream: Stream, head: RequestHead, rt: ListenerRuntime) -> bool:
    """Envoy's ``envoy.filters.http.jwt_authn`` on one request: False when it answered.

    A verified token's header goes (Envoy removes the whole header unless ``forward``), the
    provider's ``forward_payload_header`` is set, and the payloads become the stream's
    dynamic metadata for RBAC. A failure is a local reply with the failure's status and
    message, ``www-authenticate`` and ``jwt_authn_access_denied{<message>}`` details.
    """
    headers = head.headers
    outcome = jwt.check(head.method.decode("latin-1"), head.path.decode("latin-1"), headers.items)
    failure = outcome.failure
    if failure is not None:
        rt.http_stats.jwt_authn_denied += 1
        _jwt_denied(stream, head, failure)
        return False
    rt.http_stats.jwt_authn_allowed += 1
    for name, _ in outcome.strip:
        headers.remove(name)
    for name, value in outcome.add:
        headers.set(name, value)
    if outcome.payloads:
        stream.info.dynamic_metadata = {JWT_FILTER: outcome.payloads}
    return True


def _jwt_denied(stream: Stream, head: RequestHead, failure: Failure) -> None:
    # Envoy (jwt_authn/filter.cc): realm = the original URI (x-forwarded-proto, host, path),
    # error="invalid_token" unless the token is missing, and the message in the details with
    # its spaces made underscores (access-log fields are split on spaces).
    scheme = head.headers.get(b"x-forwarded-proto") or head.scheme
    uri = scheme + b"://" + head.authority + head.path[:_JWT_REALM_PATH_MAX]
    challenge = b'Bearer realm="' + uri + b'"'
    if failure.message != JWT_MISSING:
        challenge += b', error="invalid_token"'
    stream.local_reply(
        failure.status,
        failure.message.encode(),
        headers=Headers([(b"www-authenticate", challenge)]),
        details="jwt_authn_access_denied{" + "_".join(failure.message.split()) + "}",
    )


def _sanitize_request(
    head: RequestHead, stream: Stream, hcm: HcmConfig, peer_ip: bytes, rt: ListenerRuntime
) -> None:
    """Envoy's request header rules (ENVOY-SEMANTICS §4): hop-by-hop, x-envoy-*, XFF, ids.

    The common request carries none of the headers to drop (``stream.dirty`` is False) and is
    not filtered at all; what is added is appended, its absence known from ``stream.special``.
    """
    headers = head.headers
    special = stream.special
    if stream.dirty:
        connection = headers.joined(b"connection")
        nominated = {t.strip().lower() for t in connection.split(b",")} if connection else set()
        items = [(k, v) for k, v in headers.items if k not in _DROPPED and k not in nominated]
        te = special.get(b"te")
        if te is not None and b"trailers" in te.lower():
            items.append((b"te", b"trailers"))
        headers.items = items
        special = {k: v for k, v in special.items() if k not in nominated}
    items = headers.items
    tls = stream.conn.tls
    scheme = _DOWNSTREAM_SCHEME if tls is None else _DOWNSTREAM_SCHEME_TLS
    if hcm.use_remote_address:
        if not hcm.skip_xff_append:
            xff = headers.joined(b"x-forwarded-for")
            ip = rt.local_ip if peer_ip in (b"127.0.0.1", b"::1") else peer_ip
            headers.set(b"x-forwarded-for", xff + b", " + ip if xff else ip)
        headers.set(b"x-forwarded-proto", scheme)
    elif b"x-forwarded-proto" not in special:
        items.append((b"x-forwarded-proto", scheme))
    if tls is not None or _XFCC in special or hcm.forward_client_cert != "SANITIZE":
        _forward_client_cert(headers, special, hcm, tls)
    if hcm.generate_request_id:
        if b"x-request-id" not in special:
            items.append((b"x-request-id", _request_id(rt.rng)))
        elif hcm.use_remote_address and not hcm.preserve_external_request_id:
            headers.set(b"x-request-id", _request_id(rt.rng))


def _forward_client_cert(
    headers: Headers, special: dict[bytes, bytes], hcm: HcmConfig, tls: DownstreamTls | None
) -> None:
    """x-forwarded-client-cert as Envoy's HCM sets it (``forward_client_cert_details``):
    without a client certificate it is removed (except ALWAYS_FORWARD_ONLY); with one,
    SANITIZE removes it, FORWARD_ONLY keeps it, APPEND_FORWARD appends this hop's element and
    SANITIZE_SET replaces it with this hop's element: ``By=<our URI SAN>;Hash=<sha256 of the
    peer certificate>`` then the ``set_current_client_cert_details`` fields."""
    mode = hcm.forward_client_cert
    present = _XFCC in special
    if mode == "ALWAYS_FORWARD_ONLY":
        return
    if tls is None or not tls.mutual or mode == "SANITIZE":
        if present:
            headers.remove(_XFCC)
        return
    if mode == "FORWARD_ONLY":
        return
    parts = [f"By={uri}" for uri in tls.local_uri_sans]
    parts.append(f"Hash={tls.peer_cert_sha256}")
    for field in hcm.client_cert_details:
        if field == "cert":
            import ssl
            from urllib.parse import quote

            pem = ssl.DER_cert_to_PEM_cert(tls.peer_certificate)
            parts.append(f'Cert="{quote(pem, safe="")}"')
        elif field == "subject":
            parts.append(f'Subject="{tls.peer_subject}"')
        elif field == "uri":
            parts.extend(f"URI={uri}" for uri in tls.peer_uri_sans)
        elif field == "dns":
            parts.extend(f"DNS={dns}" for dns in tls.peer_dns_sans)
    element = ";".join(parts).encode()
    if mode == "APPEND_FORWARD" and present:
        headers.set(_XFCC, (headers.joined(_XFCC) or b"") + b"," + element)
    else:
        headers.set(_XFCC, element)


def _request_id(rng: random.Random) -> bytes:
    """A UUID version 4 string for x-request-id.

    From the worker's Mersenne Twister rather than os.urandom: a getrandom() syscall per
    request cost more than the rest of this function, and request ids are not secrets.
    """
    r = rng.getrandbits(128) & _UUID_CLEAR | _UUID_SET
    h = b"%032x" % r
    return b"%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:])
