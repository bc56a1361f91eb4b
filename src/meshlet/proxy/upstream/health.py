"""Active HTTP health checking: probe every host of a cluster and keep its health flag.

Three layers, each testable alone:

* ``compile_health_checks`` -- the cluster's ``health_checks`` into a ``HealthCheckConfig``.
* ``HostHealth`` -- the pure threshold state machine of one host (Envoy's
  ``ActiveHealthCheckSession::handleSuccess`` / ``handleFailure``).
* ``HealthChecker`` -- a thin asyncio prober: every ``interval`` it sends ``GET <path>``
  (``Host: <host or cluster name>``, ``user-agent: Envoy/HC``) to every host at once, reads
  the status line and headers, and feeds the verdicts to the state machines.

Rules kept (``health_check.proto``, ``health_checker_impl.cc``):

* A host starts failed (the cluster sets ``failed_active_hc``) and its *first* passing check
  makes it healthy at once; afterwards ``healthy_threshold`` consecutive passes are needed.
* A healthy host fails after ``unhealthy_threshold`` consecutive failures (connect failure,
  timeout, or a status in ``retriable_statuses``), or at once on a status outside
  ``expected_statuses`` (default 200 only) and ``retriable_statuses``, or when the response
  carries ``x-envoy-immediate-health-check-fail``.
* ``reuse_connection`` (default true) keeps the connection when the response is framed by
  ``content-length`` and not ``connection: close``; otherwise each check uses a new one.

Deviations: ``no_traffic_interval`` is accepted but not used -- meshlet always probes every
``interval`` (Envoy probes every 60 s until the cluster has seen traffic). All hosts are
probed together each round rather than on per-host timers. Not implemented, and refused:
TCP/gRPC/custom checkers, ``unhealthy_interval`` and the edge intervals, payload matching
(``send``/``receive``), HTTP/2 checks, TLS options, event logging.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2, health_check_pb2
from envoy.type.v3 import range_pb2

from meshlet.errors import ConfigError
from meshlet.proxy.fields import check_fields, duration_field, join, uint_field
from meshlet.proxy.upstream.host import Host

log = logging.getLogger("meshlet.health")

USER_AGENT = b"Envoy/HC"
IMMEDIATE_FAIL_HEADER = b"x-envoy-immediate-health-check-fail"
_MAX_BODY = 1 << 20  # a larger body is not read: the connection is closed instead

_CHECK_FIELDS = frozenset(
    {
        "timeout",
        "interval",
        "unhealthy_threshold",
        "healthy_threshold",
        "http_health_check",
        "reuse_connection",
        "no_traffic_interval",  # accepted, not used: see the module docstring
        "initial_jitter",
        "interval_jitter",
        "interval_jitter_percent",
        "alt_port",
    }
)
_HTTP_FIELDS = frozenset(
    {
        "host",
        "path",
        "expected_statuses",
        "retriable_statuses",
        "request_headers_to_add",
        "request_headers_to_remove",
        "method",
        "codec_client_type",
    }
)
_ALWAYS_ADDED = frozenset({b"host", b"connection"})  # set by the checker, not configurable


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthCheckConfig:
    """A cluster's compiled active HTTP health check (times in seconds)."""

    timeout: float
    interval: float
    unhealthy_threshold: int
    healthy_threshold: int
    path: bytes
    host: bytes  # the Host header: http_health_check.host, else the cluster name
    method: bytes = b"GET"
    expected_statuses: frozenset[int] = frozenset({200})
    retriable_statuses: frozenset[int] = frozenset()
    headers: tuple[tuple[bytes, bytes], ...] = ((b"user-agent", USER_AGENT),)
    reuse_connection: bool = True
    no_traffic_interval: float = 60.0  # not used: meshlet always probes every `interval`
    initial_jitter: float = 0.0
    interval_jitter: float = 0.0
    interval_jitter_percent: int = 0
    alt_port: int | None = None

    def request(self) -> bytes:
        """The probe's request bytes, head only (no body)."""
        lines = [self.method + b" " + self.path + b" HTTP/1.1", b"host: " + self.host]
        lines.extend(name + b": " + value for name, value in self.headers)
        if not self.reuse_connection:
            lines.append(b"connection: close")
        return b"\r\n".join(lines) + b"\r\n\r\n"


def compile_health_checks(
    protos: Sequence[health_check_pb2.HealthCheck], cluster_name: str, path: str
) -> HealthCheckConfig | None:
    """Compile ``Cluster.health_checks`` (at most one, an HTTP check); None when empty."""
    if not protos:
        return None
    if len(protos) > 1:
        raise ConfigError.at(
            f"{path}[1]", "is not supported: meshlet runs at most one health check per cluster"
        )
    proto = protos[0]
    path = f"{path}[0]"
    check_fields(proto, path, _CHECK_FIELDS)
    if not proto.HasField("http_health_check"):  # other checkers were refused above
        raise ConfigError.at(path, "needs http_health_check (the only checker meshlet runs)")
    timeout = _positive_duration(proto, "timeout", path)
    interval = _positive_duration(proto, "interval", path)
    thresholds = {}
    for name in ("unhealthy_threshold", "healthy_threshold"):
        if not proto.HasField(name):
            raise ConfigError.at(join(path, name), "is required")
        thresholds[name] = getattr(proto, name).value
        if thresholds[name] < 1:
            raise ConfigError.at(join(path, name), "must be at least 1")
    http = proto.http_health_check
    hpath = join(path, "http_health_check")
    check_fields(http, hpath, _HTTP_FIELDS)
    if http.codec_client_type != 0:  # HTTP1
        raise ConfigError.at(
            join(hpath, "codec_client_type"), "is not supported (supported: HTTP1)"
        )
    if not http.path:
        raise ConfigError.at(join(hpath, "path"), "is required")
    if any(c in http.path for c in " \r\n") or not http.path.startswith("/"):
        raise ConfigError.at(join(hpath, "path"), f"{http.path!r} is not a valid request path")
    method = b"GET"
    if http.method != base_pb2.METHOD_UNSPECIFIED:
        if http.method == base_pb2.CONNECT:
            raise ConfigError.at(join(hpath, "method"), "CONNECT is not allowed")
        method = base_pb2.RequestMethod.Name(http.method).encode()
    expected = _statuses(http.expected_statuses, join(hpath, "expected_statuses"))
    retriable = _statuses(http.retriable_statuses, join(hpath, "retriable_statuses"))
    headers = _headers(http, hpath)
    alt_port = uint_field(proto, "alt_port", 0) or None
    if alt_port is not None and alt_port > 65535:
        raise ConfigError.at(join(path, "alt_port"), "must be a port between 1 and 65535")
    percent = proto.interval_jitter_percent
    if percent > 100:
        raise ConfigError.at(join(path, "interval_jitter_percent"), "must be at most 100")
    return HealthCheckConfig(
        timeout=timeout,
        interval=interval,
        unhealthy_threshold=thresholds["unhealthy_threshold"],
        healthy_threshold=thresholds["healthy_threshold"],
        path=http.path.encode(),
        host=(http.host or cluster_name).encode(),
        method=method,
        expected_statuses=expected or frozenset({200}),
        retriable_statuses=retriable,
        headers=headers,
        reuse_connection=(not proto.HasField("reuse_connection") or proto.reuse_connection.value),
        no_traffic_interval=duration_field(proto, "no_traffic_interval", 60.0) or 60.0,
        initial_jitter=duration_field(proto, "initial_jitter", 0.0) or 0.0,
        interval_jitter=duration_field(proto, "interval_jitter", 0.0) or 0.0,
        interval_jitter_percent=percent,
        alt_port=alt_port,
    )


def _positive_duration(proto: health_check_pb2.HealthCheck, name: str, path: str) -> float:
    value = duration_field(proto, name, None)
    if value is None:
        raise ConfigError.at(join(path, name), "is required")
    if value <= 0:
        raise ConfigError.at(join(path, name), "must be greater than 0")
    return value


def _statuses(ranges: Sequence[range_pb2.Int64Range], path: str) -> frozenset[int]:
    out: set[int] = set()
    for i, r in enumerate(ranges):
        rpath = f"{path}[{i}]"
        start, end = r.start, r.end
        if not 100 <= start < end <= 600:
            raise ConfigError.at(
                rpath, f"[{start}, {end}) is not a range of statuses within [100, 600)"
            )
        out.update(range(start, end))
    return frozenset(out)


def _headers(
    http: health_check_pb2.HealthCheck.HttpHealthCheck, path: str
) -> tuple[tuple[bytes, bytes], ...]:
    """The probe's extra headers: ``user-agent`` unless removed, then the added ones."""
    removed = set()
    for i, name in enumerate(http.request_headers_to_remove):
        lowered = name.lower().encode()
        if lowered in _ALWAYS_ADDED or lowered.startswith(b":"):
            raise ConfigError.at(f"{path}.request_headers_to_remove[{i}]", "cannot be removed")
        removed.add(lowered)
    headers = [] if b"user-agent" in removed else [(b"user-agent", USER_AGENT)]
    action_names = base_pb2.HeaderValueOption.HeaderAppendAction
    for i, option in enumerate(http.request_headers_to_add):
        opath = f"{path}.request_headers_to_add[{i}]"
        check_fields(option, opath, {"header", "append_action", "append"})
        check_fields(option.header, join(opath, "header"), {"key", "value", "raw_value"})
        name = option.header.key.lower().encode()
        if not name or name in _ALWAYS_ADDED or name.startswith(b":"):
            raise ConfigError.at(join(opath, "header.key"), f"{name.decode()!r} cannot be added")
        raw = option.header.raw_value or option.header.value.encode()
        # Header values are format strings in Envoy; meshlet knows no variables, so only
        # the escaped percent sign may appear.
        if b"%" in raw.replace(b"%%", b""):
            raise ConfigError.at(
                join(opath, "header.value"), "format variables (%...%) are not supported"
            )
        value = raw.replace(b"%%", b"%")
        if any(c in value for c in b"\r\n"):
            raise ConfigError.at(join(opath, "header.value"), "must not contain CR or LF")
        action = option.append_action
        if option.HasField("append"):
            action = (
                action_names.Value("APPEND_IF_EXISTS_OR_ADD")
                if option.append.value
                else action_names.Value("OVERWRITE_IF_EXISTS_OR_ADD")
            )
        exists = any(k == name for k, _ in headers)
        if action == action_names.Value("ADD_IF_ABSENT") and exists:
            continue
        if action in (
            action_names.Value("OVERWRITE_IF_EXISTS_OR_ADD"),
            action_names.Value("OVERWRITE_IF_EXISTS"),
        ):
            if not exists and action == action_names.Value("OVERWRITE_IF_EXISTS"):
                continue
            headers = [(k, v) for k, v in headers if k != name]
        if value:  # empty values are dropped (keep_empty_value is not supported)
            headers.append((name, value))
    return tuple(headers)


# -- the pure state machine ------------------------------------------------------------------


class Check(enum.Enum):
    """One probe's verdict."""

    PASS = "pass"
    FAIL = "fail"  # connect failure, timeout, retriable status: counts toward the threshold
    FAIL_NOW = "fail-now"  # unexpected status or immediate-fail header: unhealthy at once


class HostHealth:
    """One host's threshold counts; ``record`` applies a verdict to ``host.failed_active_hc``.

    ========================  ===============================  ============================
    host is                   PASS                             FAIL / FAIL_NOW
    ========================  ===============================  ============================
    failed, first check       healthy                          stays failed
    failed                    healthy after healthy_threshold  stays failed, passes reset
    healthy                   stays healthy, failures reset    failed after
                                                               unhealthy_threshold FAILs,
                                                               or at once on FAIL_NOW
    ========================  ===============================  ============================
    """

    __slots__ = ("failures", "first_check", "passes")

    def __init__(self) -> None:
        self.first_check = True
        self.passes = 0
        self.failures = 0

    def __repr__(self) -> str:
        return f"<HostHealth passes={self.passes} failures={self.failures}>"

    def record(self, host: Host, check: Check, config: HealthCheckConfig) -> bool:
        """Apply ``check``; True when ``host.failed_active_hc`` flipped."""
        first, self.first_check = self.first_check, False
        if check is Check.PASS:
            self.failures = 0
            if not host.failed_active_hc:
                return False
            self.passes += 1
            if first or self.passes >= config.healthy_threshold:
                host.failed_active_hc = False
                return True
            return False
        self.passes = 0
        if host.failed_active_hc:
            return False
        self.failures += 1
        if check is Check.FAIL_NOW or self.failures >= config.unhealthy_threshold:
            host.failed_active_hc = True
            return True
        return False


def verdict(status: int, immediate_fail: bool, config: HealthCheckConfig) -> Check:
    """The verdict on a response with ``status``."""
    if immediate_fail:
        return Check.FAIL_NOW
    if status in config.expected_statuses:
        return Check.PASS
    if status in config.retriable_statuses:
        return Check.FAIL
    return Check.FAIL_NOW


# -- the prober ------------------------------------------------------------------------------


class _ProbeError(Exception):
    """The response could not be read or parsed."""


class HealthChecker:
    """Probes ``hosts()`` every interval on the running loop; ``on_change`` when any host's
    health flips. ``on_result(host, check)``, if given, hears every verdict (the cluster uses
    it to let a passing check return a host ejected by outlier detection)."""

    def __init__(
        self,
        config: HealthCheckConfig,
        hosts: Callable[[], Sequence[Host]],
        on_change: Callable[[], None],
        *,
        on_result: Callable[[Host, Check], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._hosts = hosts
        self._on_change = on_change
        self._on_result = on_result
        self._rng = rng or random.Random()
        self._request = config.request()
        self._state: dict[Host, HostHealth] = {}
        self._connections: dict[Host, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
        self._task: asyncio.Task[None] | None = None
        self.attempts = 0  # Envoy's health_check.attempt / success / failure stats
        self.successes = 0
        self.failures = 0

    def __repr__(self) -> str:
        failed = sum(1 for h in self._hosts() if h.failed_active_hc)
        return (
            f"<HealthChecker {self.config.method.decode()} {self.config.path.decode()} "
            f"[Hosts: {len(self._hosts())}, {failed} failed]>"
        )

    # -- pure part ---------------------------------------------------------------------------

    def record(self, host: Host, check: Check) -> bool:
        """Apply one verdict to ``host``; True when its health flipped (no callbacks)."""
        state = self._state.get(host)
        if state is None:
            state = self._state[host] = HostHealth()
        self.attempts += 1
        if check is Check.PASS:
            self.successes += 1
        else:
            self.failures += 1
        return state.record(host, check, self.config)

    def apply(self, results: Sequence[tuple[Host, Check]]) -> None:
        """Apply a round of verdicts, then call ``on_change`` once if anything flipped."""
        changed = False
        for host, check in results:
            changed = self.record(host, check) or changed
            if self._on_result is not None:
                self._on_result(host, check)
        alive = set(self._hosts())
        for gone in [h for h in self._state if h not in alive]:
            del self._state[gone]
        if changed:
            self._on_change()

    def immediate_failure(self, host: Host) -> None:
        """An upstream response carried ``x-envoy-immediate-health-check-fail``."""
        if self.record(host, Check.FAIL_NOW):
            self._on_change()

    def next_interval(self) -> float:
        c = self.config
        wait = c.interval
        if c.interval_jitter:
            wait += self._rng.uniform(0, c.interval_jitter)
        if c.interval_jitter_percent:
            wait += self._rng.uniform(0, c.interval * c.interval_jitter_percent / 100)
        return wait

    # -- I/O ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start probing on the running loop (first round at once, after initial jitter)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for _, writer in self._connections.values():
            writer.close()
        self._connections.clear()

    async def _run(self) -> None:
        if self.config.initial_jitter:
            await asyncio.sleep(self._rng.uniform(0, self.config.initial_jitter))
        while True:
            await self.check_once()
            await asyncio.sleep(self.next_interval())

    async def check_once(self) -> None:
        """Probe every host once and apply the verdicts."""
        hosts = list(self._hosts())
        checks = await asyncio.gather(*(self.probe(h) for h in hosts))
        self.apply(list(zip(hosts, checks, strict=True)))

    async def probe(self, host: Host) -> Check:
        """One health check of ``host``; never raises (failures are verdicts)."""
        try:
            async with asyncio.timeout(self.config.timeout):
                return await self._exchange(host)
        except (OSError, TimeoutError, EOFError, _ProbeError, ValueError) as e:
            log.debug("health check of %s failed: %r", host.key, e)
            self._drop(host)
            return Check.FAIL

    async def _exchange(self, host: Host) -> Check:
        config = self.config
        conn = self._connections.pop(host, None)
        if conn is not None and (conn[0].at_eof() or conn[1].is_closing()):
            conn[1].close()
            conn = None
        head: bytes | None = None
        if conn is not None:
            try:
                head = await self._send(host, conn)
            except ConnectionError:
                head = None
            if head is None:  # the server closed the idle connection: not the host's fault
                self._drop(host)
        if head is None:
            conn = await asyncio.open_connection(host.address, config.alt_port or host.port)
            head = await self._send(host, conn)
            if head is None:
                raise _ProbeError("connection closed before a response")
        assert conn is not None
        reader = conn[0]
        status, headers = _parse_head(head)
        length = headers.get(b"content-length")
        keep = (
            config.reuse_connection
            and b"close" not in headers.get(b"connection", b"").lower()
            and not head.startswith(b"HTTP/1.0")
        )
        no_body = config.method == b"HEAD" or status in (204, 304) or 100 <= status < 200
        if no_body:
            pass
        elif length is not None and length.isdigit() and int(length) <= _MAX_BODY:
            await reader.readexactly(int(length))
        else:
            keep = False  # chunked, unframed or large: not worth reading
        if not keep:
            self._drop(host)
        return verdict(status, IMMEDIATE_FAIL_HEADER in headers, config)

    async def _send(
        self, host: Host, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]
    ) -> bytes | None:
        """Write the probe and read the response head; None if closed before any byte."""
        reader, writer = conn
        self._connections[host] = conn  # until proven unusable
        writer.write(self._request)
        try:
            return await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as e:
            if not e.partial:
                return None
            raise _ProbeError("connection closed in the middle of a response") from e
        except asyncio.LimitOverrunError as e:
            raise _ProbeError("response head too large") from e

    def _drop(self, host: Host) -> None:
        conn = self._connections.pop(host, None)
        if conn is not None:
            conn[1].close()


def _parse_head(head: bytes) -> tuple[int, dict[bytes, bytes]]:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise _ProbeError(f"bad status line {lines[0][:80]!r}")
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            raise _ProbeError(f"bad header line {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers
