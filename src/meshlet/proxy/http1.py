"""Downstream HTTP/1.1 connections: parse requests, run the filter chain, write responses.

Theory of operation. ``DownstreamConnection`` feeds every byte to httptools (llhttp in strict
mode, which already rejects the RFC 9112 §6.3 smuggling cases) and turns parser callbacks into
``Stream`` objects, one per request. Streams form a queue: pipelined requests are parsed as they
arrive but handled one at a time, answered in order. The head stream is *active*: its request
body goes to its router as it arrives; the bodies of queued streams wait in memory, and reading
pauses once they pass a high watermark.

For the active stream the connection manager does what Envoy's HCM does, in order: request
validation, x-request-id / x-forwarded-* handling, route selection, the fault filter, then the
router (``meshlet.proxy.router``), which writes the response back through ``Stream``'s
``start_response`` / ``send_body`` / ``end_response``. Everything is callbacks and
``call_later`` timers; no task per request.

Backpressure both ways: the router pauses this connection's reading while the upstream's send
buffer is full, and this connection pauses the upstream's reading while the client's is full.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections import deque
from typing import TYPE_CHECKING, Any, cast

import httptools

from meshlet.proxy import framing
from meshlet.proxy.filters.fault import NO_FAULT, decide
from meshlet.proxy.headers import Headers, RequestHead
from meshlet.proxy.router import UpstreamRequest
from meshlet.proxy.routing import DirectResponseAction, RedirectAction, RouteAction
from meshlet.proxy.stream_info import Flag, StreamInfo

if TYPE_CHECKING:
    from meshlet.proxy.listener import HcmConfig
    from meshlet.proxy.routing import ClusterChoice, Route
    from meshlet.proxy.upstream.cluster import Cluster
    from meshlet.proxy.worker import ListenerRuntime

log = logging.getLogger("meshlet.http1")

_QUEUED_BODY_HIGH_WATER = 256 * 1024
_FAULT_ABORT_BODY = b"fault filter abort"


class Stream:
    """One request/response exchange on a downstream connection."""

    __slots__ = (
        "body_queue",
        "chunked_out",
        "close_after",
        "conn",
        "expect_continue",
        "expects_body",
        "hcm",
        "head",
        "headers_done",
        "info",
        "out",
        "request_chunked",
        "request_complete",
        "response_complete",
        "response_head_only",
        "response_started",
        "router",
        "timers",
        "upgrade",
        "url",
    )

    def __init__(self, conn: DownstreamConnection, hcm: HcmConfig, info: StreamInfo) -> None:
        self.conn = conn
        self.hcm = hcm  # the configuration this request started on; later swaps do not apply
        self.info = info
        self.url = b""
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
        self.timers: list[asyncio.TimerHandle] = []

    def __repr__(self) -> str:
        return (
            f"<Stream {self.head!r} started={self.response_started} done={self.response_complete}>"
        )

    # -- request body, from the connection ---------------------------------------------------

    def on_body(self, data: bytes) -> None:
        self.info.bytes_received += len(data)
        router = self.router
        if router is not None:
            router.on_request_body(data)
        elif self.body_queue is not None:
            self.body_queue.append(data)

    def on_request_complete(self) -> None:
        self.request_complete = True
        for t in self.timers:
            t.cancel()  # request_timeout covers receiving the request only
        self.timers.clear()
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

    # -- response, from the router or a local reply ------------------------------------------

    def start_response(self, status: int, headers: Headers, *, upstream: bool) -> None:
        """Queue the response head. ``headers`` are the upstream's (hop-by-hop included)."""
        head = self.head
        assert head is not None
        hcm = self.hcm
        self.response_started = True
        info = self.info
        info.response_code = status
        out = Headers([(k, v) for k, v in headers.items if k not in framing.HOP_BY_HOP])
        no_body = head.method == b"HEAD" or status in (204, 304) or status < 200
        self.response_head_only = no_body
        if not no_body and b"content-length" not in out:
            if head.version == b"1.1":
                self.chunked_out = True
                out.add(b"transfer-encoding", b"chunked")
            else:
                self.close_after = True  # HTTP/1.0: the body ends when the connection does
        elif not no_body and upstream is False and b"content-length" not in out:
            out.add(b"content-length", b"0")
        if hcm.server_name is not None:
            if hcm.server_append_if_absent:
                out.setdefault(b"server", hcm.server_name)
            else:
                out.set(b"server", hcm.server_name)
        out.setdefault(b"date", framing.DATE.value())
        if hcm.always_set_request_id_in_response:
            rid = head.headers.get(b"x-request-id")
            if rid is not None:
                out.set(b"x-request-id", rid)
        if self.conn.draining or not head.keep_alive or not self.request_complete:
            self.close_after = True
        if self.close_after:
            out.set(b"connection", b"close")
        elif head.version == b"1.0":
            out.add(b"connection", b"keep-alive")
        info.response_headers = out
        self.out.append(framing.status_line(status) + framing.serialize_headers(out) + framing.CRLF)

    def send_body(self, data: bytes) -> None:
        if self.response_head_only or not data:
            return
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
        self.start_response(status, out, upstream=False)
        self.send_body(body)
        self.end_response()


class DownstreamConnection(asyncio.Protocol):
    """One client connection to a listener."""

    __slots__ = (
        "_hdr_bytes",
        "_hdrs",
        "_headers_timer",
        "_idle_timer",
        "_paused_by",
        "_queued_bytes",
        "closed",
        "closing",
        "draining",
        "local",
        "parser",
        "peer",
        "peer_ip",
        "runtime",
        "streams",
        "transport",
        "writing_paused",
    )

    def __init__(self, runtime: ListenerRuntime) -> None:
        self.runtime = runtime
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.streams: deque[Stream] = deque()
        self.peer = ""
        self.peer_ip = b""
        self.local = ""
        self.closed = False
        self.closing = False
        self.draining = runtime.draining
        self.writing_paused = False
        self._paused_by: set[str] = set()
        self._queued_bytes = 0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._headers_timer: asyncio.TimerHandle | None = None
        self._hdrs: list[tuple[bytes, bytes]] = []
        self._hdr_bytes = 0

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
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # the stream already refused the upgrade and will close
        except httptools.HttpParserCallbackError as e:
            if isinstance(e.__context__, _Reject):
                self._protocol_error(e.__context__.status, e.__context__.details)
            elif not isinstance(e.__context__, _Stop):
                raise
        except httptools.HttpParserError:
            self._protocol_error(400, "http1.codec_error")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        rt = self.runtime
        rt.connections.discard(self)
        rt.http_stats.downstream_cx_active -= 1
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        while self.streams:
            stream = self.streams.popleft()
            if stream.response_complete:
                continue
            for t in stream.timers:
                t.cancel()
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
            start=loop_time,
            start_wall=time.time(),
            downstream_remote=self.peer,
            downstream_local=self.local,
        )
        stream = Stream(self, rt.hcm, info)
        self.streams.append(stream)
        # Header accumulation lives on the connection while parsing (hot path: no lookups).
        self._hdrs = []
        self._hdr_bytes = 0
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        hcm = stream.hcm
        if hcm.request_timeout:
            stream.timers.append(
                rt.loop.call_later(hcm.request_timeout, self._request_timeout, stream)
            )
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
        if len(stream.url) > self.runtime.hcm.max_request_headers_bytes:
            raise _Reject(414, "http1.request_line_too_long")

    def on_header(self, name: bytes, value: bytes) -> None:
        hdrs = self._hdrs
        self._hdr_bytes += len(name) + len(value) + 4
        hcm = self.runtime.hcm
        if self._hdr_bytes > hcm.max_request_headers_bytes:
            raise _Reject(431, "http1.headers_too_large")
        if len(hdrs) >= hcm.max_headers_count:
            raise _Reject(431, "http1.too_many_headers")
        hdrs.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if self.closing:
            raise _Stop
        stream = self.streams[-1]
        parser = self.parser
        headers = Headers(self._hdrs)
        self._hdrs = []
        version = parser.get_http_version().encode()
        keep_alive = parser.should_keep_alive()
        method = parser.get_method()
        head = _make_head(stream.url, method, headers, version, keep_alive)
        stream.head = head
        stream.headers_done = True
        if self._headers_timer is not None:
            self._headers_timer.cancel()
            self._headers_timer = None
        # A request with a body starts now and streams it; one without starts at its end, so
        # that a reply made at once (404, direct response) does not see an unfinished request.
        cl = headers.get(b"content-length")
        stream.expects_body = (cl is not None and cl != b"0") or b"transfer-encoding" in headers
        if stream.expects_body and self.streams[0] is stream:
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
        stream = self.streams[-1]
        stream.on_request_complete()
        if not stream.expects_body and self.streams[0] is stream:
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
                stream.local_reply(404, details="absolute_path_rejected", close=False)
                return
        te = head.headers.get(b"transfer-encoding")
        if te is not None:
            if te.lower() != b"chunked":
                # Envoy: any transfer coding but chunked is 501 (RFC 9112 §6.1).
                stream.local_reply(
                    501,
                    b"Not Implemented",
                    flag=Flag.DOWNSTREAM_PROTOCOL_ERROR,
                    details="http1.invalid_transfer_encoding",
                    close=True,
                )
                return
            stream.request_chunked = True
        upgrade = head.headers.get(b"upgrade")
        if upgrade is not None:
            if upgrade.lower() == b"h2c":
                head.headers.remove(b"upgrade")  # Envoy ignores h2c upgrades
                self.parser = httptools.HttpRequestParser(self)
            else:
                stream.upgrade = True
                stream.local_reply(403, details="upgrade_failed", close=True)
                return
        headers = head.headers
        expect = headers.get(b"expect")
        if expect is not None and expect.lower() == b"100-continue" and not hcm.proxy_100_continue:
            # Envoy answers 100 Continue itself and does not forward the expectation.
            headers.remove(b"expect")
            if not stream.request_complete:
                self.write(framing.CONTINUE_100)
        _sanitize_request(head, hcm, self.peer_ip, rt)
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
        if self.closed:
            return
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
            rt.active_faults -= 1
            stats.active_faults -= 1
            if self.closed:
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

        if delay:
            stats.delays_injected += 1
            stream.info.add_flag(Flag.DELAY_INJECTED)
            rt.active_faults += 1
            stats.active_faults += 1
            stream.timers.append(rt.loop.call_later(delay, after_delay))
        else:
            rt.active_faults += 1
            stats.active_faults += 1
            after_delay()

    def stream_finished(self, stream: Stream, *, aborted: bool = False) -> None:
        """The response is written: log it, then move on to the next pipelined request."""
        if stream.response_complete:
            return
        stream.response_complete = True
        for t in stream.timers:
            t.cancel()
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
            if nxt.request_complete or (nxt.headers_done and nxt.expects_body):
                self._begin(nxt)
        else:
            self._arm_idle()

    def _log(self, stream: Stream) -> None:
        info = stream.info
        rt = self.runtime
        info.end = rt.loop.time()
        code = info.response_code
        rt.http_stats.record_response_code(code)
        rt.record(info)

    # -- errors and timeouts -----------------------------------------------------------------

    def _protocol_error(self, status: int, details: str) -> None:
        """Malformed request: answer ``status`` (it never reaches an upstream) and close."""
        if self.closed:
            return
        self.runtime.http_stats.downstream_cx_protocol_error += 1
        if self.streams and not self.streams[-1].response_started:
            stream = self.streams[-1]
        else:
            info = StreamInfo(
                start=self.runtime.loop.time(),
                start_wall=time.time(),
                downstream_remote=self.peer,
                downstream_local=self.local,
            )
            stream = Stream(self, self.runtime.hcm, info)
        stream.info.add_flag(Flag.DOWNSTREAM_PROTOCOL_ERROR)
        self._reply_and_close(stream, status, framing.reason_phrase(status).encode(), details)

    def _request_timeout(self, stream: Stream) -> None:
        """request_timeout: the whole request was not received in time (408)."""
        if stream.response_started or self.closed or stream.request_complete:
            return
        if stream.router is not None:
            stream.router.cancel()
        self._reply_and_close(stream, 408, b"request timeout", "request_overall_timeout")

    def _headers_timeout(self) -> None:
        """request_headers_timeout: the headers did not arrive in time (408, then close)."""
        self._headers_timer = None
        if self.closed or not self.streams or self.streams[-1].headers_done:
            return
        self._reply_and_close(
            self.streams[-1], 408, b"request header timeout", "request_header_timeout"
        )

    def _reply_and_close(self, stream: Stream, status: int, body: bytes, details: str) -> None:
        # Earlier pipelined streams still in flight are abandoned: the connection closes.
        for other in self.streams:
            if other is not stream and other.router is not None:
                other.router.cancel()
        self.streams.clear()
        self.streams.append(stream)
        stream.local_reply(status, body, details=details, close=True)

    def _arm_idle(self) -> None:
        if self.draining:
            self._close()
            return
        timeout = self.runtime.hcm.idle_timeout
        if timeout:
            self._idle_timer = self.runtime.loop.call_later(timeout, self._idle_close)

    def _idle_close(self) -> None:
        if not self.streams:
            self._close()

    # -- I/O ---------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def pause_reading(self, reason: str) -> None:
        if not self._paused_by and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self._paused_by.add(reason)

    def resume_reading(self, reason: str) -> None:
        if reason in self._paused_by:
            self._paused_by.discard(reason)
            if not self._paused_by and self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def drain(self) -> None:
        """Draining: finish what is in flight with ``connection: close``; close idle now."""
        self.draining = True
        if not self.streams:
            self._close()

    def _close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class _Stop(Exception):
    """Raised from a parser callback once the connection is closing: parse no further."""


class _Reject(Exception):
    """Raised from a parser callback to stop parsing with a status (becomes HttpParserError)."""

    def __init__(self, status: int, details: str) -> None:
        super().__init__(details)
        self.status = status
        self.details = details


def _make_head(
    url: bytes, method: bytes, headers: Headers, version: bytes, keep_alive: bool
) -> RequestHead:
    """Build the request head; absolute-form targets give the authority (explicit proxy)."""
    authority = headers.get(b"host") or b""
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


def _sanitize_request(
    head: RequestHead, hcm: HcmConfig, peer_ip: bytes, rt: ListenerRuntime
) -> None:
    """Envoy's request header rules (ENVOY-SEMANTICS §4): hop-by-hop, x-envoy-*, XFF, ids."""
    headers = head.headers
    connection = headers.get(b"connection")
    nominated: list[bytes] = []
    if connection is not None:
        nominated = [t.strip().lower() for t in connection.split(b",")]
    items = [
        (k, v)
        for k, v in headers.items
        if k not in framing.HOP_BY_HOP and k not in framing.ENVOY_CONTROL and k not in nominated
    ]
    te = headers.get(b"te")
    if te is not None and b"trailers" in te.lower():
        items.append((b"te", b"trailers"))
    headers.items = [kv for kv in items if kv[0] != b"host"]  # the authority is written apart
    if hcm.use_remote_address:
        if not hcm.skip_xff_append:
            xff = headers.get(b"x-forwarded-for")
            ip = rt.local_ip if peer_ip in (b"127.0.0.1", b"::1") else peer_ip
            headers.set(b"x-forwarded-for", xff + b", " + ip if xff else ip)
        headers.set(b"x-forwarded-proto", head.scheme)
    else:
        headers.setdefault(b"x-forwarded-proto", head.scheme)
    if hcm.generate_request_id:
        rid = headers.get(b"x-request-id")
        if rid is None or (hcm.use_remote_address and not hcm.preserve_external_request_id):
            headers.set(b"x-request-id", str(uuid.UUID(bytes=os.urandom(16), version=4)).encode())
