"""The ADS server: state-of-the-world xDS over one gRPC stream per proxy (grpc.aio).

Each stream has two halves on the event loop. The reader takes requests as they come and
judges them with the stream's ``Connection`` (pure, cheap); a request that needs an answer
only marks its type as requested and wakes the sender. The sender takes the marked types and
any pending push, asks the generators for each type in push order (CDS, EDS, LDS, RDS) and
writes the responses, in rounds paced by a token bucket (``Pacer``). So a flood of requests
costs at most one generation per type per round, a slow proxy holds at most one merged
pending push, and neither holds up other streams.

Pushes come from the ``PushQueue``: each debounced request is offered to every connected
proxy; the ones it selects (``push.select_push``) get it merged into their pending push.

A malformed stream (no node on its first request, no type URL, absurd resource name lists)
is ended with a gRPC error status naming the problem; other streams carry on. Delta xDS is
not served (UNIMPLEMENTED).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from typing import Any

import grpc  # type: ignore[import-untyped,unused-ignore]
import grpc.aio  # type: ignore[import-untyped,unused-ignore]
from envoy.service.discovery.v3 import ads_pb2_grpc

from meshlet.control.xds.connection import (
    DEFAULT_LIMITS,
    Connection,
    Limits,
    Pacer,
    ProxyStatus,
    RequestError,
    Verdict,
)
from meshlet.control.xds.generator import Generator, short_type_name
from meshlet.control.xds.metrics import XdsMetrics
from meshlet.control.xds.push import (
    EVERY_PROXY,
    PushQueue,
    PushRequest,
    PushScope,
    push_types,
    select_push,
)
from meshlet.errors import MeshletError

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "127.0.0.1:15010"

#: Unknown type URLs logged per stream; more are counted, not logged.
_UNKNOWN_TYPES_LOGGED = 8

_SERVER_OPTIONS = (
    # A second control plane on a busy port must fail, not share it (gRPC sets SO_REUSEPORT).
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    # Find proxies that vanished without closing their connection.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
)


class XdsServerError(MeshletError):
    """The ADS server could not start (its address is taken or invalid)."""


class _Stream:
    """One ADS stream: its ``Connection`` and what wakes its sender."""

    __slots__ = (
        "closed",
        "conn",
        "error",
        "pacer",
        "peer",
        "registered",
        "unknown_logged",
        "wake",
    )

    def __init__(self, conn: Connection, limits: Limits, peer: str = "") -> None:
        self.conn = conn
        self.peer = peer  # the client certificate's SPIFFE id (ADS over mTLS), else empty
        self.pacer = Pacer(
            burst=limits.send_rounds_burst,
            per_second=limits.send_rounds_per_second,
            now=time.monotonic(),
        )
        self.wake = asyncio.Event()
        self.closed = False
        self.error: RequestError | None = None
        self.registered = False
        self.unknown_logged: set[str] = set()


class AdsServer:
    """Serves ``generators`` (type URL -> ``Generator``) over ADS at ``address``.

    ``push_queue`` feeds it pushes (``enqueue`` from anywhere); ``scope`` lets the resource
    side narrow pushes to the proxies a change affects.
    """

    def __init__(
        self,
        generators: Mapping[str, Generator],
        push_queue: PushQueue | None = None,
        address: str = DEFAULT_ADDRESS,
        *,
        scope: PushScope = EVERY_PROXY,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.generators = dict(generators)
        self.push_queue = push_queue if push_queue is not None else PushQueue()
        self.address = address
        self.scope = scope
        self.limits = limits
        self.metrics = XdsMetrics()
        self._streams: dict[int, _Stream] = {}
        self._numbers = itertools.count(1)
        # Nonces differ across restarts, so a reconnecting proxy's old nonce never matches.
        self._nonce_prefix = secrets.token_hex(3) + "-"
        self._server: Any = None
        self._port = 0
        self._push_task: asyncio.Task[None] | None = None

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen and serve. Raises ``XdsServerError`` if the address cannot be bound."""
        server = grpc.aio.server(options=_SERVER_OPTIONS)
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(_Servicer(self), server)
        try:
            port = server.add_insecure_port(self.address)
        except RuntimeError as e:
            raise XdsServerError(f"xDS server cannot listen on {self.address}: {e}") from e
        if not port:
            raise XdsServerError(f"xDS server cannot listen on {self.address}")
        await server.start()
        self._server, self._port = server, int(port)
        self._push_task = asyncio.create_task(self.push_queue.run(self._dispatch))
        log.info("xDS (ADS) server listening on %s", self.bound_address)

    async def stop(self, grace: float | None = None) -> None:
        """Stop pushing, end every stream (after ``grace`` seconds at most) and close."""
        if self._push_task is not None:
            self._push_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._push_task
            self._push_task = None
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0); 0 before ``start``."""
        return self._port

    @property
    def bound_address(self) -> str:
        host = self.address.rsplit(":", 1)[0]
        return f"{host}:{self._port}"

    # -- the resource side's entry points ---------------------------------------------------

    def push(self, request: PushRequest) -> None:
        """Shorthand for ``push_queue.enqueue(request)``."""
        self.push_queue.enqueue(request)

    def sync_status(self) -> list[ProxyStatus]:
        """Each connected proxy's sync state per type, ordered by proxy id."""
        statuses = [s.conn.sync_status() for s in self._streams.values() if s.registered]
        return sorted(statuses, key=lambda s: (s.proxy_id, s.connection_id))

    def metrics_text(self) -> str:
        """The control plane's xDS metrics in Prometheus text format."""
        return self.metrics.render(push_triggers=self.push_queue.triggers())

    def __repr__(self) -> str:
        connected = sum(1 for s in self._streams.values() if s.registered)
        return f"<AdsServer {self.bound_address} [{connected} proxies]>"

    # -- pushes -----------------------------------------------------------------------------

    def _dispatch(self, request: PushRequest) -> None:
        """Offer a debounced push to every connected proxy it selects."""
        try:
            self.scope.prepare_push(request)
        except Exception:
            log.exception("preparing %r failed; pushing what the generators have", request)
        selected = 0
        for stream in self._streams.values():
            conn = stream.conn
            if not stream.registered or conn.proxy is None:
                continue
            subscribed = conn.subscribed_types()
            try:
                types = select_push(request, conn.proxy, subscribed, self.scope)
            except Exception:
                log.exception("push scope failed for %s; pushing to it anyway", conn.id)
                types = push_types(request, subscribed)
            if types:
                conn.enqueue_push(request)
                stream.wake.set()
                selected += 1
        log.debug("%r: %d of %d streams", request, selected, len(self._streams))

    # -- one stream -------------------------------------------------------------------------

    def add_to_server(self, server: Any, peer_identity: Any = None) -> None:
        """Serve ADS on another grpc.aio ``server`` too (the control plane's TLS port), its
        streams pushed like this server's. ``peer_identity(context)`` gives a stream's proven
        SPIFFE id, or raises ``RequestError`` to refuse it."""
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(
            _Servicer(self, peer_identity), server
        )

    async def _serve_stream(
        self, requests: AsyncIterator[Any], context: Any, peer: str = ""
    ) -> None:
        """Serve one ADS stream until the proxy goes away or sends what ends it."""
        number = next(self._numbers)
        conn = Connection(
            number, types=self.generators, limits=self.limits, nonce_prefix=self._nonce_prefix
        )
        stream = _Stream(conn, self.limits, peer)
        self._streams[number] = stream
        reader = asyncio.create_task(self._read(stream, requests))
        try:
            while True:
                await stream.wake.wait()
                stream.wake.clear()
                if stream.error is not None:
                    error = stream.error
                    self.metrics.refused_streams[error.code] += 1
                    await context.abort(getattr(grpc.StatusCode, error.code), error.message)
                delay = stream.pacer.delay(time.monotonic())
                if delay > 0:
                    await asyncio.sleep(delay)  # requests arriving meanwhile merge
                stream.pacer.spend(time.monotonic())
                await self._send(stream, context)
                if stream.closed and not conn.requested and conn.pending_push is None:
                    return
        finally:
            reader.cancel()
            del self._streams[number]
            if stream.registered:
                self.metrics.connected -= 1
                log.info("%s disconnected", conn.id)

    async def _read(self, stream: _Stream, requests: AsyncIterator[Any]) -> None:
        try:
            async for request in requests:
                self._receive(stream, request)
                if stream.error is not None:
                    break
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the stream broke (reset, cancelled): the sender winds up
            log.debug("stream %s: read ended: %r", stream.conn.id, e)
        finally:
            stream.closed = True
            stream.wake.set()

    def _receive(self, stream: _Stream, request: Any) -> None:
        conn = stream.conn
        try:
            received = conn.receive(request)
        except RequestError as e:
            log.warning("refusing ADS stream %s: %s", conn.id, e.message)
            stream.error = e
            stream.wake.set()
            return
        if not stream.registered:
            if stream.peer and conn.proxy is not None:
                error = _check_peer(conn.proxy, stream.peer)
                if error is not None:
                    log.warning("refusing ADS stream %s: %s", conn.id, error.message)
                    stream.error = error
                    stream.wake.set()
                    return
                conn.proxy = replace(conn.proxy, peer_identity=stream.peer)
            stream.registered = True
            self.metrics.connected += 1
            proxy = conn.proxy
            log.info("%s connected (%s)", conn.id, proxy.user_agent if proxy else "")
        type_url: str = request.type_url
        verdict = received.verdict
        if verdict is Verdict.UNKNOWN:
            self.metrics.unknown_type_requests += 1
            if type_url not in stream.unknown_logged and (
                len(stream.unknown_logged) < _UNKNOWN_TYPES_LOGGED
            ):
                stream.unknown_logged.add(type_url)
                log.info("%s asked for %s, which is not served: ignored", conn.id, type_url[:200])
        elif verdict is Verdict.NACK and received.nack is not None:
            nack = received.nack
            self.metrics.rejects[short_type_name(type_url)] += 1
            log.warning(
                "%s rejected %s version %s (keeps %s): %s",
                conn.id,
                short_type_name(type_url),
                nack.version or "(superseded)",
                nack.kept_version or "(none)",
                nack.message,
            )
        elif verdict is Verdict.STALE:
            self.metrics.expired_nonces[short_type_name(type_url)] += 1
        if received.respond:
            stream.wake.set()

    async def _send(self, stream: _Stream, context: Any) -> None:
        conn = stream.conn
        proxy = conn.proxy
        if proxy is None:
            return
        work = conn.take_work()
        sent = 0
        for type_url in work.types:
            names = conn.names_for(type_url)
            if names == []:
                continue  # unsubscribed since it was asked for
            try:
                generated = self.generators[type_url].generate(proxy, type_url, names)
                response = conn.build_response(
                    type_url, generated, requested=type_url in work.requested
                )
            except Exception:
                self.metrics.generate_errors[short_type_name(type_url)] += 1
                log.exception("generating %s for %s failed", short_type_name(type_url), conn.id)
                continue
            if response is None:
                continue
            await context.write(response)
            sent += 1
            self.metrics.pushes[short_type_name(type_url)] += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "%s <- %s version %s nonce %s (%d resources)",
                    conn.id,
                    short_type_name(type_url),
                    response.version_info,
                    response.nonce,
                    len(response.resources),
                )
        push = work.push
        if sent and push is not None and push.start is not None:
            self.metrics.convergence.observe(time.monotonic() - push.start)


def _check_peer(proxy: Any, peer: str) -> RequestError | None:
    """A stream over mTLS must be the identity its certificate proves: its node's namespace
    and service account are those of ``peer`` (``spiffe://<td>/ns/<ns>/sa/<sa>``)."""
    parts = peer.split("/")
    if len(parts) < 7 or parts[3] != "ns" or parts[5] != "sa":
        return RequestError("PERMISSION_DENIED", f"client certificate {peer!r} is not SPIFFE")
    namespace, account = parts[4], parts[6]
    if proxy.namespace != namespace or (proxy.service_account or "default") != account:
        return RequestError(
            "PERMISSION_DENIED",
            f"node {proxy.id} (namespace {proxy.namespace!r}, service account"
            f" {proxy.service_account!r}) is not the client certificate's identity {peer}",
        )
    return None


class _Servicer:
    """The gRPC face of ``AdsServer`` (``AggregatedDiscoveryService``)."""

    def __init__(self, server: AdsServer, peer_identity: Any = None) -> None:
        self._server = server
        self._peer_identity = peer_identity

    async def StreamAggregatedResources(
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> None:
        peer = ""
        if self._peer_identity is not None:
            try:
                peer = self._peer_identity(context)
            except RequestError as e:
                await context.abort(getattr(grpc.StatusCode, e.code), e.message)
        await self._server._serve_stream(request_iterator, context, peer)

    async def DeltaAggregatedResources(
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> None:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "meshlet serves state-of-the-world ADS only (StreamAggregatedResources)",
        )
