"""Upstream HTTP/1.1 connections and the keep-alive pool of one host.

Envoy's HTTP/1 pool rules (ENVOY-SEMANTICS §6): one request in flight per connection, no
pipelining; a new connection is opened while the cluster is under ``max_connections``,
otherwise the request waits in the pending queue (bounded by ``max_pending_requests``, overflow
is the caller's 503 UO). A host with no connection at all still gets one at the limit, so its
requests are never stuck behind other hosts' connections (``conn_pool_base.cc``
``tryCreateNewConnection``). A failed connect fails every pending request of the pool (Envoy
purges them; the router may retry). Idle connections close after the cluster's idle timeout
and after ``max_requests_per_connection`` requests.

The pool decides synchronously and hands connections to ``PoolWaiter`` callbacks; only opening
a connection needs a task (``loop.create_connection``).

A pool whose host is reached over TLS (the cluster's ``transport_socket`` or the
``transport_socket_matches`` entry the host's metadata selects) opens TLS connections with the
cluster's current context; a failed handshake, or a server whose SANs are not among those
configured, is a connect failure (Envoy's UF).
"""

from __future__ import annotations

import asyncio
import enum
import socket
from collections import deque
from typing import TYPE_CHECKING, Protocol, cast

import httptools

from meshlet.proxy.headers import Headers
from meshlet.proxy.tls import TlsConfig, upstream_peer_allowed
from meshlet.proxy.upstream.host import Host

if TYPE_CHECKING:
    from meshlet.proxy.upstream.cluster import Cluster


class Reset(enum.Enum):
    """Why an upstream exchange ended without a complete response (Envoy's reset reasons)."""

    CONNECT_FAILURE = "remote connection failure"
    CONNECT_TIMEOUT = "connection timeout"
    TERMINATION = "connection termination"
    PROTOCOL_ERROR = "protocol error"
    OVERFLOW = "overflow"
    LOCAL = "local reset"


class ResponseHandler(Protocol):
    """What an upstream connection tells the request that owns it."""

    def on_response_head(self, status: int, headers: Headers, keep_alive: bool) -> None: ...

    def on_response_body(self, data: bytes) -> None: ...

    def on_response_end(self) -> None: ...

    def on_reset(self, reason: Reset) -> None: ...

    def flush(self) -> None:
        """End of one read from the upstream socket: write what was gathered downstream."""

    def on_upstream_paused(self, paused: bool) -> None:
        """The upstream socket's send buffer is full (True) or drained (False)."""


class PoolWaiter(Protocol):
    """A request waiting for a connection."""

    def on_pool_ready(self, conn: UpstreamConnection) -> None: ...

    def on_pool_failure(self, reason: Reset) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    """One HTTP/1.1 client connection to a host, parsing responses with httptools."""

    __slots__ = (
        "_framed",
        "_head_only",
        "_headers",
        "_idle_since",
        "_idle_timer",
        "_keep_alive",
        "_loop",
        "_parser",
        "_status",
        "_until_close",
        "host",
        "owner",
        "pool",
        "requests",
        "transport",
    )

    def __init__(self, pool: HostPool) -> None:
        self.pool = pool
        self.host = pool.host
        self.transport: asyncio.Transport | None = None
        self.owner: ResponseHandler | None = None
        self.requests = 0
        self._parser = httptools.HttpResponseParser(self)
        self._headers: list[tuple[bytes, bytes]] = []
        self._status = 0
        self._until_close = False
        self._framed = False
        self._keep_alive = True
        self._head_only = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_since = 0.0
        self._loop = asyncio.get_running_loop()

    def __repr__(self) -> str:
        state = "busy" if self.owner else "idle"
        return f"<UpstreamConnection {self.host.key} {state} requests={self.requests}>"

    # -- used by the router ------------------------------------------------------------------

    def start(self, owner: ResponseHandler, data: bytes, *, head_only: bool) -> None:
        """Begin an exchange: ``data`` is the request head (and any body at hand)."""
        self.owner = owner
        self.requests += 1
        self._head_only = head_only
        assert self.transport is not None
        self.transport.write(data)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def pause_reading(self, paused: bool) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if paused:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def abort(self) -> None:
        """Drop the connection (an exchange was abandoned mid-flight)."""
        self.owner = None
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is None:
            # Bytes on an idle connection: the peer broke HTTP/1.1; do not reuse it.
            self._close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self.owner = None
            self._close()
            owner.on_reset(Reset.PROTOCOL_ERROR)
            return
        owner.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.forget(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        owner = self.owner
        if owner is not None:
            if self._until_close and self._status:
                # A body delimited by the connection's end (RFC 9112 §6.3 rule 8) is complete
                # now; httptools cannot be told about end-of-input, so finish it here.
                self._keep_alive = False
                self._message_done()
                owner.flush()
                return
            self.owner = None
            owner.on_reset(Reset.TERMINATION)
            owner.flush()

    def pause_writing(self) -> None:
        if self.owner is not None:
            self.owner.on_upstream_paused(True)

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner.on_upstream_paused(False)

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._headers = []
        self._framed = False  # Content-Length or Transfer-Encoding seen

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length" or name == b"transfer-encoding":
            self._framed = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            return  # 1xx: the final response follows on the same connection
        self._status = status
        self._keep_alive = self._parser.should_keep_alive()
        self._until_close = not self._framed and status != 204 and status != 304
        owner = self.owner
        if owner is not None:
            owner.on_response_head(status, Headers(self._headers), self._keep_alive)
            if self._head_only:
                # A response to HEAD has no body whatever its Content-Length says; httptools
                # cannot be told so, so end the message here and use a fresh parser next time.
                self._parser = httptools.HttpResponseParser(self)
                self._message_done()

    def on_body(self, body: bytes) -> None:
        if self.owner is not None:
            self.owner.on_response_body(body)

    def on_message_complete(self) -> None:
        if self._status == 0:
            return  # end of a 1xx
        self._message_done()

    def _message_done(self) -> None:
        owner = self.owner
        self._status = 0
        self.owner = None
        if owner is None:
            return
        if self._keep_alive:
            self.pool.release(self)
        else:
            self._close()
        owner.on_response_end()

    # -- pool side ---------------------------------------------------------------------------

    def went_idle(self, timeout: float | None) -> None:
        """The connection is idle from now; close it once idle for ``timeout`` seconds.

        A lazy timer: it is armed once and, when it fires, re-armed for whatever is left, so
        a busy connection costs one clock read per request instead of a timer per request.
        """
        if not timeout:
            return
        loop = self._loop
        self._idle_since = loop.time()
        if self._idle_timer is None:
            self._idle_timer = loop.call_later(timeout, self._idle_check, timeout)

    def _idle_check(self, timeout: float) -> None:
        self._idle_timer = None
        if self.transport is None or self.transport.is_closing():
            return
        remaining = (
            timeout if self.owner is not None else self._idle_since + timeout - self._loop.time()
        )
        if remaining <= 0:
            self._close()
        else:
            self._idle_timer = self._loop.call_later(remaining, self._idle_check, timeout)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class HostPool:
    """Idle connections and pending requests of one host of one cluster."""

    __slots__ = ("_idle", "_pending", "cluster", "connecting", "host", "open", "tls")

    def __init__(self, cluster: Cluster, host: Host, tls: TlsConfig | None = None) -> None:
        self.cluster = cluster
        self.host = host
        self.tls = tls  # None: plaintext
        self._idle: list[UpstreamConnection] = []
        self._pending: deque[PoolWaiter] = deque()
        self.open: set[UpstreamConnection] = set()
        self.connecting = 0

    def __repr__(self) -> str:
        return (
            f"<HostPool {self.host.key}{' tls' if self.tls else ''} "
            f"[Connections: {len(self.open)} open, "
            f"{len(self._idle)} idle, {self.connecting} connecting | "
            f"Requests: {len(self._pending)} pending]>"
        )

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def acquire(self, waiter: PoolWaiter) -> bool:
        """Hand ``waiter`` a connection now or later. False: overflow (503 UO).

        Calls ``waiter.on_pool_ready`` synchronously when an idle connection exists.
        """
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                waiter.on_pool_ready(conn)
                return True
        cluster = self.cluster
        if cluster.rq_pending >= cluster.limits.max_pending_requests:
            cluster.stats.upstream_rq_pending_overflow += 1
            return False
        self._pending.append(waiter)
        cluster.rq_pending += 1
        cluster.stats.upstream_rq_pending_total += 1
        cluster.stats.upstream_rq_pending_active += 1
        if self.connecting < len(self._pending):
            self._maybe_connect()
        return True

    def _maybe_connect(self) -> None:
        """Open a connection for the pending queue if the circuit breaker (or Envoy's rule for
        a host with no connection) allows it."""
        cluster = self.cluster
        if cluster.cx_active + cluster.cx_connecting < cluster.limits.max_connections:
            self._connect()
            return
        cluster.stats.upstream_cx_overflow += 1
        if not self.open and not self.connecting:
            self._connect()

    def cancel(self, waiter: PoolWaiter) -> None:
        try:
            self._pending.remove(waiter)
        except ValueError:
            return
        self._left_pending()

    def _next_waiter(self) -> PoolWaiter:
        waiter = self._pending.popleft()
        self._left_pending()
        return waiter

    def _left_pending(self) -> None:
        self.cluster.rq_pending -= 1
        self.cluster.stats.upstream_rq_pending_active -= 1

    def release(self, conn: UpstreamConnection) -> None:
        """A connection finished its exchange and may be reused."""
        limit = self.cluster.config.max_requests_per_connection
        if (limit and conn.requests >= limit) or self.cluster.closed:
            conn._close()
            return
        if self._pending:
            self._next_waiter().on_pool_ready(conn)
            return
        self._idle.append(conn)
        conn.went_idle(self.cluster.config.idle_timeout)

    def forget(self, conn: UpstreamConnection) -> None:
        """A connection closed: drop it from the pool's books."""
        if conn in self.open:
            self.open.discard(conn)
            self.cluster.cx_active -= 1
            self.host.cx_active -= 1
            self.cluster.stats.upstream_cx_active -= 1
            self.cluster.stats.upstream_cx_destroy += 1
        if conn in self._idle:
            self._idle.remove(conn)
        if self._pending and self.connecting < len(self._pending) and not self.cluster.closed:
            self._maybe_connect()

    def close_idle(self) -> None:
        for conn in list(self._idle):
            conn._close()
        self._idle.clear()

    def fail_pending(self, reason: Reset) -> None:
        while self._pending:
            self._next_waiter().on_pool_failure(reason)

    def _connect(self) -> None:
        self.connecting += 1
        self.cluster.cx_connecting += 1
        asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        cluster = self.cluster
        host = self.host
        loop = asyncio.get_running_loop()
        cluster.stats.upstream_cx_total += 1
        host.cx_total += 1
        reason: Reset | None = None
        conn: UpstreamConnection | None = None
        try:
            source = cluster.config.source_address
            tls = self.tls
            built = None
            if tls is not None:
                contexts = cluster.tls_contexts
                built = contexts.get(tls) if contexts is not None else None
                if built is None:  # its secrets have not arrived
                    raise ConnectionRefusedError("TLS context not ready")
            _, proto = await asyncio.wait_for(
                loop.create_connection(
                    lambda: UpstreamConnection(self),
                    host.address,
                    host.port,
                    local_addr=(source, 0) if source is not None else None,
                    ssl=built.context if built is not None else None,
                    server_hostname=(tls.sni or host.address) if tls is not None else None,
                ),
                cluster.config.connect_timeout,
            )
            if built is not None and not upstream_peer_allowed(proto.transport, built):
                proto.abort()
                raise ConnectionRefusedError("the server's SAN is not allowed")
            conn = proto
        except TimeoutError:
            reason = Reset.CONNECT_TIMEOUT
            cluster.stats.upstream_cx_connect_timeout += 1
        except OSError:
            reason = Reset.CONNECT_FAILURE
        finally:
            self.connecting -= 1
            cluster.cx_connecting -= 1
        if conn is None:
            assert reason is not None
            cluster.stats.upstream_cx_connect_fail += 1
            host.cx_connect_fail += 1
            # Every waiter fails, not just one: nothing else would connect for them. Taken out
            # first, so a retry that acquires again from its callback is not failed with them.
            waiters = [self._next_waiter() for _ in range(len(self._pending))]
            for waiter in waiters:
                waiter.on_pool_failure(reason)
            return
        self.open.add(conn)
        cluster.cx_active += 1
        host.cx_active += 1
        cluster.stats.upstream_cx_active += 1
        if self._pending:
            self._next_waiter().on_pool_ready(conn)
        else:
            self._idle.append(conn)
            conn.went_idle(cluster.config.idle_timeout)
