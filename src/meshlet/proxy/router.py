"""The router: one request's trip upstream, with retries, timeouts and mirrors.

``UpstreamRequest`` is Envoy's router filter for one stream. It picks a host from the cluster's
balancer, takes a connection from that host's pool, writes the request head and streams the
body, then relays the response to the downstream ``Stream``. Decisions come from pure code:
the route (``routing``), the balancer (``upstream.lb``), retries (``retry``) and outlier
detection (``upstream.outlier``); this module only sequences them with callbacks and
``call_later`` timers.

Rules it keeps (ENVOY-SEMANTICS §3, §6, §8):
* the route timeout starts when the downstream request is complete and covers every retry;
  the per-try timeout covers one attempt; both give 504 ``upstream request timeout`` (UT);
* nothing is retried once response bytes went downstream, nor after a circuit-breaker
  overflow; a retry needs a replayable body (bodies are kept for replay up to the cluster's
  buffer limit) and a free ``max_retries`` slot, held from the retry decision until the next
  decision or the end of the request, as Envoy's ``RetryStateImpl`` holds it. Without a slot
  the failed attempt's own result goes downstream (its response, or its reset reply) with
  flag UO added;
* failures before the response starts become local replies with Envoy's bodies and flags;
  after it starts, the downstream connection is closed.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from meshlet.proxy import framing
from meshlet.proxy.headers import Headers, RequestHead
from meshlet.proxy.retry import Outcome, RetryState
from meshlet.proxy.stream_info import Flag
from meshlet.proxy.upstream.host import NO_CONTEXT, Host, LbContext
from meshlet.proxy.upstream.pool import HostPool, Reset, UpstreamConnection

if TYPE_CHECKING:
    import asyncio

    from meshlet.proxy.http1 import Stream
    from meshlet.proxy.routing import ClusterChoice, Route, RouteAction
    from meshlet.proxy.upstream.cluster import Cluster
    from meshlet.proxy.worker import ListenerRuntime

_RESET_PREFIX = b"upstream connect error or disconnect/reset before headers. "
_UPSTREAM_TIMEOUT = b"upstream request timeout"
_NO_HEALTHY = b"no healthy upstream"
_RESET_OUTCOME = {
    Reset.CONNECT_FAILURE: Outcome.CONNECT_FAILURE,
    Reset.CONNECT_TIMEOUT: Outcome.CONNECT_FAILURE,
    Reset.TERMINATION: Outcome.RESET,
    Reset.PROTOCOL_ERROR: Outcome.RESET,
    Reset.LOCAL: Outcome.RESET,
    Reset.OVERFLOW: Outcome.OVERFLOW,
}
_RESET_FLAG = {
    Reset.CONNECT_FAILURE: Flag.UPSTREAM_CONNECTION_FAILURE,
    Reset.CONNECT_TIMEOUT: Flag.UPSTREAM_CONNECTION_FAILURE,
    Reset.TERMINATION: Flag.UPSTREAM_CONNECTION_TERMINATION,
    Reset.PROTOCOL_ERROR: Flag.UPSTREAM_PROTOCOL_ERROR,
    Reset.LOCAL: Flag.LOCAL_RESET,
    Reset.OVERFLOW: Flag.UPSTREAM_OVERFLOW,
}
_HIGH_WATER = 64 * 1024
_NONE: frozenset[Host] = frozenset()  # request bytes held while no upstream connection takes them


class UpstreamRequest:
    """Envoy's router filter for one stream (implements PoolWaiter and ResponseHandler)."""

    __slots__ = (
        "_attempt_sent",
        "_body",
        "_body_size",
        "_done",
        "_global_timer",
        "_head_bytes",
        "_host_active",
        "_paused_upstream",
        "_per_try_timer",
        "_request_ended_at",
        "_retry",
        "_retry_slot",
        "_retry_timer",
        "_tried",
        "_unsent",
        "_unsent_size",
        "action",
        "choice",
        "cluster",
        "conn",
        "host",
        "pool",
        "route",
        "rt",
        "stream",
    )

    def __init__(
        self,
        stream: Stream,
        route: Route,
        action: RouteAction,
        choice: ClusterChoice,
        cluster: Cluster,
        rt: ListenerRuntime,
    ) -> None:
        self.stream = stream
        self.route = route
        self.action = action
        self.choice = choice
        self.cluster = cluster
        self.rt = rt
        self.host: Host | None = None
        self.pool: HostPool | None = None
        self.conn: UpstreamConnection | None = None
        policy = action.retry_policy
        self._retry = RetryState(policy, rt.rng) if policy is not None else None
        self._tried: list[Host] = []
        self._body: list[bytes] | None = []  # every body chunk, while replay is possible
        self._body_size = 0
        self._unsent: list[bytes] = []  # chunks the current connection has not had yet
        self._unsent_size = 0
        self._head_bytes = b""
        self._attempt_sent = False
        self._host_active = False
        self._request_ended_at: float | None = None
        self._global_timer: asyncio.TimerHandle | None = None
        self._per_try_timer: asyncio.TimerHandle | None = None
        self._retry_slot = False  # this request holds one of the cluster's max_retries
        self._retry_timer: asyncio.TimerHandle | None = None
        self._paused_upstream = False
        self._done = False

    def __repr__(self) -> str:
        host = self.host.key if self.host else "-"
        return f"<UpstreamRequest {self.cluster.name} host={host} tries={len(self._tried)}>"

    # -- start ---------------------------------------------------------------------------------

    def start(self) -> None:
        cluster = self.cluster
        stats = cluster.stats
        stats.upstream_rq_total += 1
        if cluster.rq_active >= cluster.limits.max_requests:
            stats.upstream_rq_pending_overflow += 1
            self._fail_reset(Reset.OVERFLOW)
            return
        cluster.rq_active += 1
        stats.upstream_rq_active += 1
        self._head_bytes = self._serialize_head()
        self._attempt()

    def _serialize_head(self) -> bytes:
        stream = self.stream
        head = stream.head
        assert head is not None
        headers = head.headers
        if self.stream.request_chunked:
            headers.add(b"transfer-encoding", b"chunked")
        if not self.stream.hcm.suppress_envoy_headers:
            timeout = self.action.timeout
            policy = self.action.retry_policy
            per_try = policy.per_try_timeout if policy is not None else None
            expected = per_try if per_try and (not timeout or per_try < timeout) else timeout
            if expected:
                # Clients cannot send this header (it is stripped on the way in): append.
                headers.items.append(
                    (b"x-envoy-expected-rq-timeout-ms", b"%d" % int(expected * 1000))
                )
        return b"".join(
            [
                head.method,
                b" ",
                head.path,
                b" HTTP/1.1\r\nhost: ",
                head.authority,
                b"\r\n",
                framing.serialize_headers(headers),
                b"\r\n",
            ]
        )

    def _attempt(self) -> None:
        """Pick a host and ask its pool for a connection."""
        cluster = self.cluster
        hash_policy = self.action.hash_policy
        head = self.stream.head
        assert head is not None
        key = hash_policy.compute(head, self.stream.conn.peer_ip) if hash_policy else None
        previous = self._tried and self._retry is not None and self._retry.policy.previous_hosts
        if cluster.config.discovery == "ORIGINAL_DST":
            ctx = LbContext(original_dst=self._original_destination(head))
        elif key is None and not previous:
            ctx = NO_CONTEXT  # the common case: no allocation
        else:
            ctx = LbContext(hash_key=key, excluded=frozenset(self._tried) if previous else _NONE)
        host = cluster.choose(ctx)
        if host is None:
            self._local_failure(503, _NO_HEALTHY, Flag.NO_HEALTHY_UPSTREAM, "no_healthy_upstream")
            return
        self.host = host
        self._tried.append(host)
        self.stream.info.upstream_host = host.key
        self.stream.info.upstream_peer = host.peer  # the response's peer headers override it
        pool = self.pool = cluster.pool(host)
        if not pool.acquire(self):
            self.pool = None
            self._on_reset(Reset.OVERFLOW)

    def _original_destination(self, head: RequestHead) -> tuple[str, int] | None:
        """Where the request was going, for an ORIGINAL_DST cluster.

        With ``use_http_header``, the header's ``IP:port`` (Envoy's rule: nothing else).
        Otherwise Envoy takes the address the connection was sent to before capture. meshlet
        captures nothing -- applications reach an outbound listener as their HTTP proxy and
        an inbound listener directly -- so the original destination is what the request
        names: an outbound listener goes to the authority's host and port, an inbound one to
        its own IP at the authority's port. The port defaults to 80.
        """
        header = self.cluster.config.original_dst_header
        if header is not None:
            value = head.headers.get(header)
            return _ip_port(value) if value is not None else None
        host, sep, port_text = head.authority.rpartition(b":")
        if not sep or b"]" in port_text:  # no port (or an IPv6 literal without one)
            host, port_text = head.authority, b"80"
        if not port_text.isdigit() or not 0 < int(port_text) < 65536 or not host:
            return None
        name = host.strip(b"[]").decode("ascii", "replace")
        if self.stream.conn.runtime.reporter == "destination":
            name = self.stream.conn.local.rpartition(":")[0].strip("[]")
        return name, int(port_text)

    # -- PoolWaiter ----------------------------------------------------------------------------

    def on_pool_ready(self, conn: UpstreamConnection) -> None:
        if self._done:
            self.cluster.pool(conn.host).release(conn)
            return
        self.pool = None
        self.conn = conn
        host = conn.host
        host.rq_active += 1
        host.rq_total += 1
        self._host_active = True
        stream = self.stream
        chunked = stream.request_chunked
        if self._body is not None:
            chunks = self._body
        elif not self._attempt_sent:
            chunks = self._unsent
        else:
            chunks = []
        if chunks or chunked:
            data = [self._head_bytes]
            data.extend(framing.chunk(c) for c in chunks) if chunked else data.extend(chunks)
            if self._request_ended_at is not None and chunked:
                data.append(framing.LAST_CHUNK)
            payload = b"".join(data)
        else:
            payload = self._head_bytes  # no body: the head alone, no copy
        if self._unsent_size:
            self._unsent = []
            self._unsent_size = 0
            stream.conn.resume_reading("router")
        self._attempt_sent = True
        head = stream.head
        assert head is not None
        conn.start(self, payload, head_only=head.method == b"HEAD")
        if self._request_ended_at is not None:
            self._arm_per_try()

    def on_pool_failure(self, reason: Reset) -> None:
        self.pool = None
        self._on_reset(reason)

    # -- request body, from the stream ---------------------------------------------------------

    def on_request_body(self, data: bytes) -> None:
        if self._body is not None:
            self._body.append(data)
            self._body_size += len(data)
            if self._body_size > self.cluster.config.buffer_limit:
                # Too big to replay: retries and mirrors are off for this request (Envoy).
                self._body = None
        conn = self.conn
        if conn is not None:
            conn.write(framing.chunk(data) if self.stream.request_chunked else data)
        else:
            self._unsent.append(data)
            self._unsent_size += len(data)
            if self._unsent_size > _HIGH_WATER:
                self.stream.conn.pause_reading("router")

    def on_request_end(self) -> None:
        rt = self.rt
        self._request_ended_at = rt.loop.time()
        if self.conn is not None:
            if self.stream.request_chunked:
                self.conn.write(framing.LAST_CHUNK)
            self._arm_per_try()
        timeout = self.action.timeout
        if timeout and not self._done:
            self._global_timer = rt.loop.call_later(timeout, self._on_global_timeout)
        if self.action.mirrors and self._body is not None:
            self._mirror()

    # -- ResponseHandler -----------------------------------------------------------------------

    def on_response_head(self, status: int, headers: Headers, keep_alive: bool) -> None:
        self._cancel_per_try()
        host = self.host
        assert host is not None
        now = self.rt.loop.time()
        outlier = self.cluster.outlier
        if outlier is not None:
            outlier.report(host, status, now)
        retry = self._retry
        # Only error statuses are retried over HTTP/1 (gRPC statuses need HTTP/2).
        if (
            retry is not None
            and status >= 400
            and not self.stream.response_started
            and self._can_replay()
        ):
            self._release_retry_slot()
            grpc = headers.get(b"grpc-status")
            if (
                retry.should_retry_status(
                    status,
                    grpc_status=int(grpc) if grpc is not None and grpc.isdigit() else None,
                    ratelimited=b"x-envoy-ratelimited" in headers,
                )
                and self._take_retry_slot()
            ):
                self._end_attempt(error=status >= 500)
                conn, self.conn = self.conn, None
                if conn is not None:
                    conn.abort()
                self._schedule_retry()
                return
        stream = self.stream
        info = stream.info
        if self._request_ended_at is not None:
            info.upstream_service_time = (now - self._request_ended_at) * 1000.0
            if not stream.hcm.suppress_envoy_headers:
                headers.add(
                    b"x-envoy-upstream-service-time", b"%d" % int(info.upstream_service_time)
                )
        if retry is not None and retry.exhausted:
            info.add_flag(Flag.UPSTREAM_RETRY_LIMIT_EXCEEDED)
        self.route.finalize_response(headers, self.choice)
        self.cluster.stats.record_response_code(status)
        if status >= 500:
            host.rq_error += 1
        else:
            host.rq_success += 1
        self._end_attempt(error=False)
        stream.start_response(status, headers)

    def on_response_body(self, data: bytes) -> None:
        self.stream.send_body(data)

    def on_response_end(self) -> None:
        self.conn = None
        self._finish()
        self.stream.end_response()

    def on_reset(self, reason: Reset) -> None:
        self.conn = None
        self._on_reset(reason)

    def flush(self) -> None:
        self.stream.flush()

    def on_upstream_paused(self, paused: bool) -> None:
        conn = self.stream.conn
        if paused:
            conn.pause_reading("upstream")
        else:
            conn.resume_reading("upstream")

    def on_downstream_paused(self, paused: bool) -> None:
        if self.conn is not None:
            self.conn.pause_reading(paused)

    # -- failures, retries, timeouts -------------------------------------------------------------

    def _on_reset(self, reason: Reset) -> None:
        if self._done:
            return
        self._cancel_per_try()
        host = self.host
        outlier = self.cluster.outlier
        if host is not None and reason is not Reset.OVERFLOW and outlier is not None:
            outlier.report(host, None, self.rt.loop.time())
        self._end_attempt(error=True)
        if self.stream.response_started:
            self._finish()
            self.stream.reset(_RESET_FLAG[reason])
            return
        if self._retry_granted(_RESET_OUTCOME[reason]):
            self._schedule_retry()
            return
        self._fail_reset(reason)

    def _fail_reset(self, reason: Reset) -> None:
        body = _RESET_PREFIX
        if len(self._tried) > 1:
            body += b"retried and the latest "
        body += b"reset reason: " + reason.value.encode()
        status = 502 if reason is Reset.PROTOCOL_ERROR else 503
        headers = Headers()
        if reason is Reset.OVERFLOW and not self.stream.hcm.suppress_envoy_headers:
            headers.add(b"x-envoy-overloaded", b"true")
        details = "upstream_reset_before_response_started{" + reason.value.replace(" ", "_") + "}"
        self._local_failure(status, body, _RESET_FLAG[reason], details, headers)

    def _local_failure(
        self, status: int, body: bytes, flag: Flag, details: str, headers: Headers | None = None
    ) -> None:
        self._finish()
        info = self.stream.info
        if self._retry is not None and self._retry.exhausted:
            info.add_flag(Flag.UPSTREAM_RETRY_LIMIT_EXCEEDED)
        self.stream.local_reply(status, body, flag=flag, details=details, headers=headers)

    def _can_replay(self) -> bool:
        return self._body is not None or not self._attempt_sent

    def _retry_granted(self, outcome: Outcome) -> bool:
        """An attempt failed without a response: may it be retried (policy, body, slot)?"""
        retry = self._retry
        if retry is None or not self._can_replay():
            return False
        self._release_retry_slot()
        return retry.should_retry_outcome(outcome) and self._take_retry_slot()

    def _take_retry_slot(self) -> bool:
        """The policy granted a retry: take one of the cluster's ``max_retries`` (else UO)."""
        cluster = self.cluster
        if cluster.retries_active >= cluster.limits.max_retries:
            cluster.stats.upstream_rq_retry_overflow += 1
            self.stream.info.add_flag(Flag.UPSTREAM_OVERFLOW)
            return False
        cluster.stats.upstream_rq_retry += 1
        cluster.retries_active += 1
        self._retry_slot = True
        return True

    def _release_retry_slot(self) -> None:
        if self._retry_slot:
            self._retry_slot = False
            self.cluster.retries_active -= 1

    def _schedule_retry(self) -> None:
        """A retry was granted and has its slot: back off, then try again."""
        retry = self._retry
        assert retry is not None
        self._attempt_sent = False if self._body is not None else self._attempt_sent
        self._retry_timer = self.rt.loop.call_later(retry.backoff(), self._retry_now)

    def _retry_now(self) -> None:
        self._retry_timer = None
        if self._done:
            return
        self._attempt()

    def _arm_per_try(self) -> None:
        policy = self.action.retry_policy
        per_try = getattr(policy, "per_try_timeout", None)
        if per_try and (not self.action.timeout or per_try < self.action.timeout):
            self._per_try_timer = self.rt.loop.call_later(per_try, self._on_per_try_timeout)

    def _cancel_per_try(self) -> None:
        if self._per_try_timer is not None:
            self._per_try_timer.cancel()
            self._per_try_timer = None

    def _on_per_try_timeout(self) -> None:
        self._per_try_timer = None
        if self._done or self.stream.response_started:
            return
        self.cluster.stats.upstream_rq_per_try_timeout += 1
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort()
        host = self.host
        if host is not None:
            host.rq_timeout += 1
            if self.cluster.outlier is not None:
                self.cluster.outlier.report(host, None, self.rt.loop.time())
        self._end_attempt(error=True)
        if self._retry_granted(Outcome.PER_TRY_TIMEOUT):
            self._schedule_retry()
            return
        self._timeout_reply()

    def _on_global_timeout(self) -> None:
        self._global_timer = None
        if self._done:
            return
        self.cluster.stats.upstream_rq_timeout += 1
        if self.host is not None:
            self.host.rq_timeout += 1
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort()
        if self.pool is not None:
            self.pool.cancel(self)
            self.pool = None
        self._end_attempt(error=True)
        if self.stream.response_started:
            self._finish()
            self.stream.reset(Flag.UPSTREAM_REQUEST_TIMEOUT)
            return
        self._timeout_reply()

    def _timeout_reply(self) -> None:
        self._local_failure(
            504, _UPSTREAM_TIMEOUT, Flag.UPSTREAM_REQUEST_TIMEOUT, "upstream_response_timeout"
        )

    # -- bookkeeping -----------------------------------------------------------------------------

    def _end_attempt(self, *, error: bool) -> None:
        """The current attempt is over: the host has one request fewer in flight."""
        host = self.host
        if host is not None and self._host_active:
            self._host_active = False
            host.rq_active -= 1
            if error:
                host.rq_error += 1

    def _finish(self) -> None:
        """Release everything this request holds (exactly once)."""
        if self._done:
            return
        self._done = True
        if self._global_timer is not None:
            self._global_timer.cancel()
        if self._retry_timer is not None:
            self._retry_timer.cancel()
        self._release_retry_slot()
        self._cancel_per_try()
        self._end_attempt(error=False)
        cluster = self.cluster
        if cluster.rq_active > 0 and self._head_bytes:
            cluster.rq_active -= 1
            cluster.stats.upstream_rq_active -= 1
        self.stream.conn.resume_reading("router")
        self.stream.conn.resume_reading("upstream")

    def cancel(self) -> None:
        """The downstream went away: drop the upstream side (its connection cannot be reused)."""
        if self._done:
            return
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort()
        if self.pool is not None:
            self.pool.cancel(self)
            self.pool = None
        self._finish()

    # -- mirrors ---------------------------------------------------------------------------------

    def _mirror(self) -> None:
        rt = self.rt
        head = self.stream.head
        assert head is not None and self._body is not None
        for mirror in self.action.mirrors:
            if mirror.fraction < 1.0 and rt.rng.random() >= mirror.fraction:
                continue
            cluster = rt.clusters.get(mirror.cluster)
            if cluster is None:
                continue
            shadow = ShadowRequest(cluster, head, self._body, self.stream.request_chunked)
            shadow.start(rt.loop, self.action.timeout)


class ShadowRequest:
    """A fire-and-forget copy of a request to a mirror cluster; its response is dropped.

    It lives at most the route's timeout, as Envoy's shadow requests do: a mirror that does
    not answer must not hold connections (or pending slots) of its cluster for ever.
    """

    __slots__ = ("_cluster", "_conn", "_data", "_done", "_pool", "_timer")

    def __init__(
        self, cluster: Cluster, head: RequestHead, body: list[bytes], chunked: bool
    ) -> None:
        self._cluster = cluster
        self._pool: HostPool | None = None
        self._conn: UpstreamConnection | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._done = False
        authority = _shadow_host(head.authority)
        headers = Headers([(k, v) for k, v in head.headers.items if k != b"transfer-encoding"])
        payload = b"".join(body)
        if chunked:
            headers.set(b"content-length", b"%d" % len(payload))
        self._data = b"".join(
            [
                head.method,
                b" ",
                head.path,
                b" HTTP/1.1\r\nhost: ",
                authority,
                b"\r\n",
                framing.serialize_headers(headers),
                b"\r\n",
                payload,
            ]
        )

    def start(self, loop: asyncio.AbstractEventLoop, timeout: float | None) -> None:
        cluster = self._cluster
        host = cluster.choose(LbContext())
        if host is None:
            return
        cluster.stats.upstream_rq_total += 1
        if timeout:
            self._timer = loop.call_later(timeout, self._on_timeout)
        pool = self._pool = cluster.pool(host)
        if not pool.acquire(self):
            self._finish()

    def _on_timeout(self) -> None:
        self._timer = None
        if self._done:
            return
        self._cluster.stats.upstream_rq_timeout += 1
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()
        if self._pool is not None:
            self._pool.cancel(self)
        self._finish()

    def _finish(self) -> None:
        self._done = True
        self._pool = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def on_pool_ready(self, conn: UpstreamConnection) -> None:
        if self._done:
            self._cluster.pool(conn.host).release(conn)
            return
        self._pool = None
        self._conn = conn
        conn.start(self, self._data, head_only=False)

    def on_pool_failure(self, reason: Reset) -> None:
        self._finish()

    def on_response_head(self, status: int, headers: Headers, keep_alive: bool) -> None:
        self._cluster.stats.record_response_code(status)

    def on_response_body(self, data: bytes) -> None:
        pass

    def on_response_end(self) -> None:
        self._conn = None
        self._finish()

    def on_reset(self, reason: Reset) -> None:
        self._conn = None
        self._finish()

    def flush(self) -> None:
        pass

    def on_upstream_paused(self, paused: bool) -> None:
        pass


def _shadow_host(authority: bytes) -> bytes:
    """Envoy appends ``-shadow`` to the host part: ``a.com:8080`` -> ``a.com-shadow:8080``."""
    host, sep, port = authority.rpartition(b":")
    if sep and port.isdigit():
        return host + b"-shadow:" + port
    return authority + b"-shadow"


def _ip_port(value: bytes) -> tuple[str, int] | None:
    """``IP:port`` (``[v6]:port`` too) from a header, else None."""
    host, sep, port_text = value.decode("ascii", "replace").strip().rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return None
    return host, int(port_text)
