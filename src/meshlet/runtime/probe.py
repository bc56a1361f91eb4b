"""Container probes with Kubernetes' semantics: ``httpGet`` and ``tcpSocket``, thresholds,
timing.

Three layers, each testable alone:

* ``ProbeSpec`` -- an immutable probe, built from a manifest's ``Probe`` by ``from_kube``
  (host defaults to the pod IP, named ports resolve against the container's ports, a zero
  timing means the API server's default).
* ``ProbeTally`` -- the pure threshold state machine (kubelet's ``prober/worker.go``).
* ``Prober`` -- a thin asyncio loop: waits ``initial_delay``, then probes every ``period``
  with ``probe_once`` and calls ``on_change(healthy)`` when the tally flips.

Rules kept (Kubernetes "Configure Liveness, Readiness and Startup Probes", kubelet source):

* ``httpGet`` passes on a status from 200 to 399; anything else, a refused connection, a
  timeout or garbage fails. The request is ``GET <path> HTTP/1.1`` with ``Host: host:port``,
  ``User-Agent: kube-probe/meshlet`` and ``Accept: */*``; ``httpHeaders`` add headers and
  replace those three by name. ``HTTPS`` does not verify the certificate, as the kubelet.
* ``tcpSocket`` passes when the connection opens.
* A result changes the probe's state only after ``success_threshold`` consecutive passes or
  ``failure_threshold`` consecutive failures. Readiness starts failed, liveness starts passed.

Deviations: redirects are not followed (a 3xx passes, as the kubelet does for a redirect to
another host); ``exec`` and ``grpc`` probes are refused; a failed liveness probe keeps
probing (the kubelet holds it until the restart; the pod layer stops it instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from meshlet.api.kube import Probe
from meshlet.errors import ConfigError

log = logging.getLogger(__name__)

# Kubernetes API-server defaults, applied when a field is absent or zero (SetDefaults_Probe).
DEFAULT_PERIOD = 10.0
DEFAULT_TIMEOUT = 1.0
DEFAULT_SUCCESS_THRESHOLD = 1
DEFAULT_FAILURE_THRESHOLD = 3

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 field name
_STATUS_LINE = re.compile(rb"^HTTP/1\.[01] (\d{3})(?: |\r?$)")


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeSpec:
    """One probe, ready to run. Times are in seconds."""

    kind: Literal["http", "tcp"]
    host: str
    port: int
    path: str = "/"
    headers: tuple[tuple[str, str], ...] = ()
    scheme: Literal["HTTP", "HTTPS"] = "HTTP"
    initial_delay: float = 0.0
    period: float = DEFAULT_PERIOD
    timeout: float = DEFAULT_TIMEOUT
    success_threshold: int = DEFAULT_SUCCESS_THRESHOLD
    failure_threshold: int = DEFAULT_FAILURE_THRESHOLD

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"probe port {self.port} is outside 1..65535")
        if self.period <= 0 or self.timeout <= 0 or self.initial_delay < 0:
            raise ValueError("probe period and timeout must be positive, initial_delay >= 0")
        if self.success_threshold < 1 or self.failure_threshold < 1:
            raise ValueError("probe thresholds must be at least 1")
        for name, value in self.headers:
            if not _TOKEN.match(name) or "\r" in value or "\n" in value:
                raise ValueError(f"probe header {name!r} is not a valid HTTP header")

    @classmethod
    def from_kube(
        cls,
        probe: Probe,
        pod_ip: str,
        named_ports: Mapping[str, int],
        *,
        where: str = "probe",
    ) -> ProbeSpec:
        """The probe of a manifest. ``named_ports`` maps the container's port names to
        numbers; ``where`` is the field path used in errors (e.g.
        ``spec.template.spec.containers[0].readinessProbe``).

        Raises ``ConfigError`` for an ``exec`` or ``grpc`` probe, a probe without a handler,
        an unknown named port, a scheme other than HTTP/HTTPS, or bad ``httpHeaders``.
        """
        timing: dict[str, Any] = {
            "initial_delay": float(probe.initial_delay_seconds),
            "period": float(probe.period_seconds or DEFAULT_PERIOD),
            "timeout": float(probe.timeout_seconds or DEFAULT_TIMEOUT),
            "success_threshold": probe.success_threshold or DEFAULT_SUCCESS_THRESHOLD,
            "failure_threshold": probe.failure_threshold or DEFAULT_FAILURE_THRESHOLD,
        }
        extra = probe.model_extra or {}
        if probe.exec is not None or "grpc" in extra:
            handler = "exec" if probe.exec is not None else "grpc"
            raise ConfigError.at(
                f"{where}.{handler}",
                f"{handler} probes are not supported by the embedded runtime; "
                "use httpGet or tcpSocket",
            )
        if probe.http_get is not None:
            get = probe.http_get
            if get.scheme not in ("HTTP", "HTTPS"):
                raise ConfigError.at(
                    f"{where}.httpGet.scheme", f"{get.scheme!r} must be HTTP or HTTPS"
                )
            path = get.path or "/"
            return cls(
                kind="http",
                host=get.host or pod_ip,
                port=_resolve_port(get.port, named_ports, f"{where}.httpGet.port"),
                path=path if path.startswith("/") else "/" + path,  # as the kubelet does
                headers=_headers(get.model_extra or {}, f"{where}.httpGet.httpHeaders"),
                scheme="HTTPS" if get.scheme == "HTTPS" else "HTTP",
                **timing,
            )
        if probe.tcp_socket is not None:
            sock = probe.tcp_socket
            return cls(
                kind="tcp",
                host=sock.host or pod_ip,
                port=_resolve_port(sock.port, named_ports, f"{where}.tcpSocket.port"),
                **timing,
            )
        raise ConfigError.at(where, "a probe needs one handler: httpGet or tcpSocket")

    def describe(self) -> str:
        if self.kind == "tcp":
            return f"tcp-socket {self.host}:{self.port}"
        return f"http-get {self.scheme.lower()}://{_authority(self.host, self.port)}{self.path}"


def _resolve_port(port: int | str, named_ports: Mapping[str, int], where: str) -> int:
    if isinstance(port, int):
        number = port
    elif port in named_ports:
        number = named_ports[port]
    elif port.isdigit():  # the kubelet accepts a number given as a string
        number = int(port)
    else:
        known = ", ".join(sorted(named_ports)) or "none"
        raise ConfigError.at(where, f"no container port is named {port!r} (named ports: {known})")
    if not 1 <= number <= 65535:
        raise ConfigError.at(where, f"{number} must be in the range 1..65535")
    return number


def _headers(extra: Mapping[str, Any], where: str) -> tuple[tuple[str, str], ...]:
    raw = extra.get("httpHeaders", extra.get("http_headers", ()))
    if not isinstance(raw, list | tuple):
        raise ConfigError.at(where, "must be a list of {name, value}")
    headers: list[tuple[str, str]] = []
    for i, item in enumerate(raw):
        name = item.get("name") if isinstance(item, dict) else None
        value = item.get("value", "") if isinstance(item, dict) else None
        if not isinstance(name, str) or not _TOKEN.match(name):
            raise ConfigError.at(f"{where}[{i}].name", f"{name!r} is not a valid header name")
        if not isinstance(value, str) or "\r" in value or "\n" in value:
            raise ConfigError.at(f"{where}[{i}].value", "must be a string on one line")
        headers.append((name, value))
    return tuple(headers)


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- the threshold state machine -----------------------------------------------------------


class ProbeTally:
    """Consecutive results against thresholds (kubelet ``worker.doProbe``).

    A run of equal results counts up; a different result starts a new run of one. The state
    becomes passed after ``success_threshold`` passes in a row and failed after
    ``failure_threshold`` failures in a row; otherwise it stays as it was.
    """

    __slots__ = ("_last", "_run", "failure_threshold", "healthy", "success_threshold")

    def __init__(self, *, success_threshold: int, failure_threshold: int, healthy: bool) -> None:
        self.success_threshold = success_threshold
        self.failure_threshold = failure_threshold
        self.healthy = healthy
        self._last: bool | None = None
        self._run = 0

    def record(self, passed: bool) -> bool:
        """Count one result; True when the state flipped."""
        if passed == self._last:
            self._run += 1
        else:
            self._last, self._run = passed, 1
        threshold = self.success_threshold if passed else self.failure_threshold
        if self._run < threshold or passed == self.healthy:
            return False
        self.healthy = passed
        return True

    def __repr__(self) -> str:
        last = {None: "none", True: "pass", False: "fail"}[self._last]
        return f"<ProbeTally {'healthy' if self.healthy else 'failed'} [{self._run} x {last}]>"


# -- one probe -----------------------------------------------------------------------------


def http_request(spec: ProbeSpec) -> bytes:
    """The probe's request, built once per prober."""
    defaults = {
        "host": _authority(spec.host, spec.port),
        "user-agent": "kube-probe/meshlet",
        "accept": "*/*",
    }
    given = {name.lower() for name, _ in spec.headers}
    lines = [f"GET {spec.path} HTTP/1.1"]
    lines += [f"{name.title()}: {value}" for name, value in defaults.items() if name not in given]
    lines += [f"{name}: {value}" for name, value in spec.headers]
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


_insecure_tls: ssl.SSLContext | None = None


def _tls_context() -> ssl.SSLContext:
    global _insecure_tls
    if _insecure_tls is None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the kubelet probes with InsecureSkipVerify
        _insecure_tls = ctx
    return _insecure_tls


async def probe_once(spec: ProbeSpec, request: bytes | None = None) -> bool:
    """Run the probe once; True when it passes. Never raises (except on cancellation)."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(spec.timeout):
            tls = _tls_context() if spec.kind == "http" and spec.scheme == "HTTPS" else None
            reader, writer = await asyncio.open_connection(spec.host, spec.port, ssl=tls)
            if spec.kind == "tcp":
                return True
            writer.write(request if request is not None else http_request(spec))
            status_line = await reader.readline()
    except (OSError, TimeoutError, ssl.SSLError, ValueError):
        return False
    finally:
        if writer is not None:
            writer.close()  # no wait_closed: a slow close must not turn a pass into a fail
    match = _STATUS_LINE.match(status_line)
    return match is not None and 200 <= int(match.group(1)) < 400


# -- the loop ------------------------------------------------------------------------------


class Prober:
    """Runs one probe every ``period`` and reports state flips to ``on_change(healthy)``.

    ``on_change`` is called from the event loop, never after ``stop``; an exception it raises
    is logged and probing goes on.
    """

    __slots__ = ("_on_change", "_request", "_tally", "_task", "spec")

    def __init__(
        self, spec: ProbeSpec, on_change: Callable[[bool], None], *, initially_healthy: bool
    ) -> None:
        self.spec = spec
        self._on_change = on_change
        self._tally = ProbeTally(
            success_threshold=spec.success_threshold,
            failure_threshold=spec.failure_threshold,
            healthy=initially_healthy,
        )
        self._request = http_request(spec) if spec.kind == "http" else b""
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def readiness(cls, spec: ProbeSpec, on_change: Callable[[bool], None]) -> Prober:
        """A readiness prober: not ready until the probe passes."""
        return cls(spec, on_change, initially_healthy=False)

    @classmethod
    def liveness(cls, spec: ProbeSpec, on_change: Callable[[bool], None]) -> Prober:
        """A liveness prober: alive until the probe fails ``failure_threshold`` times."""
        return cls(spec, on_change, initially_healthy=True)

    @property
    def healthy(self) -> bool:
        return self._tally.healthy

    def start(self) -> None:
        """Start probing (after ``initial_delay``). Idempotent."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"probe {self.spec.describe()}"
            )

    async def stop(self) -> None:
        """Stop probing; returns once the loop has ended."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        spec, loop = self.spec, asyncio.get_running_loop()
        await asyncio.sleep(spec.initial_delay)
        due = loop.time()
        while True:
            passed = await probe_once(spec, self._request)
            if self._tally.record(passed):
                try:
                    self._on_change(self._tally.healthy)
                except Exception:
                    log.exception("probe %s: on_change failed", spec.describe())
            # A ticker, as the kubelet's: a slow probe does not shift later ones, and a
            # loop that fell behind does not burst to catch up.
            due = max(due + spec.period, loop.time())
            await asyncio.sleep(due - loop.time())

    def __repr__(self) -> str:
        state = "running" if self._task is not None else "stopped"
        return f"<Prober {self.spec.describe()} [{state} | {self._tally!r}]>"
