"""The embedded scraper: Istio's request metrics from every proxy, kept 15 minutes.

* Targets are the running pods whose sidecar (``istio-proxy``) runs, the ingress gateway
  included, read from the control plane's store (``Pod`` objects with ``status.podIP``, written
  by the runtime): ``http://<pod IP>:<port>/stats/prometheus``, port 15090 as Istio's
  (``metrics_port`` is a parameter: the admin port 15000 serves the same text).
* Every ``interval`` seconds all targets are scraped at once, each within ``timeout``. Only
  ``istio_requests_total`` and ``istio_request_duration_milliseconds_bucket`` are kept; lines
  of other families are skipped before parsing (a sidecar's text is mostly Envoy's stats).
  The text is parsed by ``prometheus_client``'s parser.
* Each series (target + metric + labels) keeps its cumulative samples in a ring, for
  ``retention`` seconds; a sample equal to the one before is not stored (the increase is the
  same without it), so an idle series costs one sample. A series not seen for ``retention``
  is dropped.
* A series that first appears on a target scraped before is new since the last scrape: it
  grew from 0 (a baseline of 0 at the previous scrape is added), so the first request with a
  new label set (the first 503, say) counts. On a target's first scrape the baseline is the
  proxy's start (``envoy_server_uptime`` ago): its counters began at 0 then.
* Counter resets (a restarted proxy) are handled where increases are computed
  (``metrics.counter_increase``).

``EmbeddedSource`` answers the ``MetricsSource`` question from these rings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from meshlet.dashboard.metrics import METRICS, Group, counter_increase
from meshlet.web import WebError, fetch

log = logging.getLogger(__name__)

METRICS_PORT = 15090  # Istio's merged metrics port on every sidecar and gateway
METRICS_PATH = "/stats/prometheus"
DEFAULT_INTERVAL = 5.0
DEFAULT_RETENTION = 15 * 60.0
SIDECAR = "istio-proxy"

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """One proxy to scrape, and who it is (the labels of Prometheus's http_sd)."""

    ip: str
    namespace: str
    pod: str
    workload: str = ""
    app: str = ""
    version: str = ""

    def address(self, port: int) -> str:
        return f"{self.ip}:{port}"

    def sd_labels(self) -> dict[str, str]:
        return {
            "namespace": self.namespace,
            "pod": self.pod,
            "workload": self.workload,
            "app": self.app,
            "version": self.version,
        }


def _sidecar_running(pod: Mapping[str, Any]) -> bool:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return any(s.get("name") == SIDECAR and "running" in (s.get("state") or {}) for s in statuses)


def targets_from_pods(pods: Iterable[Mapping[str, Any]]) -> list[Target]:
    """The scrape targets among ``pods`` (Pod objects): running, with an IP and a running
    sidecar; the workload is the owning Deployment (the gateway's: its ``app`` label)."""
    out = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        status = pod.get("status") or {}
        ip = status.get("podIP")
        if not ip or status.get("phase") != "Running" or not _sidecar_running(pod):
            continue
        labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
        owners = meta.get("ownerReferences") or []
        workload = str(owners[0].get("name", "")) if owners else labels.get("app", "")
        out.append(
            Target(
                ip=str(ip),
                namespace=str(meta.get("namespace") or "default"),
                pod=str(meta.get("name", "")),
                workload=workload or str(meta.get("name", "")),
                app=labels.get("app", ""),
                version=labels.get("version", ""),
            )
        )
    return sorted(out, key=lambda t: (t.namespace, t.pod))


def http_sd(targets: Iterable[Target], port: int = METRICS_PORT) -> list[dict[str, Any]]:
    """Prometheus's ``http_sd_configs`` document for ``targets``."""
    return [{"targets": [t.address(port)], "labels": t.sd_labels()} for t in targets]


# -- parsing -------------------------------------------------------------------------------


_WANTED_PREFIXES = tuple(METRICS)
_TYPE_LINES = tuple(
    f"# TYPE {name}" for name in ("istio_requests_total", "istio_request_duration_milliseconds")
)


_UPTIME = "envoy_server_uptime "


def parse_uptime(text: str) -> float | None:
    """The proxy's ``envoy_server_uptime`` (seconds since it started), if it reports one."""
    for line in text.splitlines():
        if line.startswith(_UPTIME):
            try:
                return float(line[len(_UPTIME) :].split()[0])
            except (IndexError, ValueError):
                return None
    return None


def parse_istio(text: str) -> list[tuple[str, Labels, float]]:
    """The samples of ``METRICS`` in a Prometheus text exposition: (name, labels, value)."""
    kept = [
        line
        for line in text.splitlines()
        if line.startswith(_WANTED_PREFIXES) or line.startswith(_TYPE_LINES)
    ]
    out = []
    for family in text_string_to_metric_families("\n".join(kept) + "\n"):
        for sample in family.samples:
            if sample.name in METRICS and not math.isnan(sample.value):
                labels = tuple(sorted(sample.labels.items()))
                out.append((sample.name, labels, float(sample.value)))
    return out


# -- the rings -----------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class Series:
    metric: str
    labels: Mapping[str, str]
    samples: deque[tuple[float, float]]
    last_seen: float = 0.0


@dataclass(eq=False, slots=True)
class _TargetState:
    target: Target
    last_scrape: float | None = None  # time of the last successful scrape
    error: str = ""
    series: dict[tuple[str, Labels], Series] = field(default_factory=dict)


class SeriesStore:
    """Rings of samples per target and series; pure (times are given)."""

    def __init__(self, *, retention: float = DEFAULT_RETENTION, capacity: int = 400) -> None:
        self.retention = retention
        self.capacity = capacity  # hard bound per ring, whatever the interval
        self._targets: dict[tuple[str, str, str], _TargetState] = {}

    def __repr__(self) -> str:
        return f"<SeriesStore [{len(self._targets)} targets, {self.series_count} series]>"

    @property
    def series_count(self) -> int:
        return sum(len(s.series) for s in self._targets.values())

    def _state(self, target: Target) -> _TargetState:
        key = (target.namespace, target.pod, target.ip)
        state = self._targets.get(key)
        if state is None:
            state = self._targets[key] = _TargetState(target)
        return state

    def record(
        self,
        target: Target,
        now: float,
        samples: Iterable[tuple[str, Labels, float]],
        *,
        started: float | None = None,
    ) -> None:
        """One successful scrape of ``target`` at ``now``. ``started``: when the proxy started
        (now - its uptime); on a target's first scrape its counters grew from 0 since then,
        so traffic before the first scrape counts too."""
        state = self._state(target)
        state.error = ""
        baseline = state.last_scrape if state.last_scrape is not None else started
        for metric, labels, value in samples:
            key = (metric, labels)
            series = state.series.get(key)
            if series is None:
                series = state.series[key] = Series(
                    metric=metric, labels=dict(labels), samples=deque(maxlen=self.capacity)
                )
                if baseline is not None and baseline < now and value > 0:
                    series.samples.append((baseline, 0.0))  # new since then
            ring = series.samples
            if not ring or ring[-1][1] != value:
                ring.append((now, value))
            series.last_seen = now
        state.last_scrape = now

    def failed(self, target: Target, error: str) -> None:
        self._state(target).error = error

    def prune(self, now: float, live: Iterable[Target] = ()) -> None:
        """Forget samples older than the retention (keeping one as a baseline), series not
        seen within it, and targets that are gone with nothing left."""
        horizon = now - self.retention
        live_keys = {(t.namespace, t.pod, t.ip) for t in live}
        for key, state in list(self._targets.items()):
            for skey, series in list(state.series.items()):
                if series.last_seen < horizon:
                    del state.series[skey]
                    continue
                ring = series.samples
                while len(ring) > 1 and ring[1][0] <= horizon:
                    ring.popleft()
            if key not in live_keys and not state.series:
                del self._targets[key]

    def series(self, metric: str, match: Mapping[str, str]) -> Iterable[Series]:
        for state in self._targets.values():
            for (name, _), series in state.series.items():
                if name == metric and all(series.labels.get(k) == v for k, v in match.items()):
                    yield series

    def status(self) -> list[dict[str, Any]]:
        return [
            {
                "target": s.target.ip,
                "namespace": s.target.namespace,
                "pod": s.target.pod,
                "last_scrape": s.last_scrape,
                "error": s.error,
                "series": len(s.series),
            }
            for s in self._targets.values()
        ]


class EmbeddedSource:
    """``MetricsSource`` over a ``SeriesStore``."""

    kind = "embedded"

    def __init__(self, store: SeriesStore, interval: float = DEFAULT_INTERVAL) -> None:
        self.store = store
        self._interval = interval

    @property
    def interval(self) -> float:
        return self._interval

    async def increase(
        self,
        metric: str,
        *,
        by: Sequence[str],
        match: Mapping[str, str],
        window: float,
        at: Sequence[float],
    ) -> dict[Group, list[float]]:
        return self.increase_now(metric, by=by, match=match, window=window, at=at)

    def increase_now(
        self,
        metric: str,
        *,
        by: Sequence[str],
        match: Mapping[str, str],
        window: float,
        at: Sequence[float],
    ) -> dict[Group, list[float]]:
        out: dict[Group, list[float]] = {}
        for series in self.store.series(metric, match):
            group = tuple(series.labels.get(name, "") for name in by)
            sums = out.get(group)
            if sums is None:
                sums = out[group] = [0.0] * len(at)
            samples = list(series.samples)
            for i, t in enumerate(at):
                sums[i] += counter_increase(samples, t - window, t)
        return out


# -- the scrape loop -----------------------------------------------------------------------


class Scraper:
    """Scrapes ``targets()`` every ``interval`` into ``store``; see the module docstring."""

    def __init__(
        self,
        targets: Callable[[], list[Target]],
        *,
        store: SeriesStore | None = None,
        interval: float = DEFAULT_INTERVAL,
        timeout: float | None = None,
        port: int = METRICS_PORT,
        fallback_port: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.targets = targets
        self.store = store or SeriesStore()
        self.interval = interval
        self.timeout = timeout if timeout is not None else max(0.5, min(interval * 0.8, 10.0))
        self.port = port
        #: Tried when nothing listens on ``port`` (a proxy without the 15090 listener serves
        #: the same text on its admin port, 15000).
        self.fallback_port = fallback_port
        self.clock = clock
        self.source = EmbeddedSource(self.store, interval)
        self.scrapes = 0
        self.last_targets: list[Target] = []
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Scraper every {self.interval:g}s :{self.port} {self.store!r}>"

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="scraper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.scrape_once()
            except Exception:
                log.exception("scrape failed")
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    async def scrape_once(self) -> None:
        """Scrape every target once, concurrently."""
        targets = self.targets()
        self.last_targets = targets
        await asyncio.gather(*(self._scrape(t) for t in targets))
        self.store.prune(self.clock(), targets)
        self.scrapes += 1

    async def _scrape(self, target: Target) -> None:
        url = f"http://{target.address(self.port)}{METRICS_PATH}"
        try:
            try:
                fetched = await fetch(url, timeout=self.timeout)
            except WebError as e:
                if self.fallback_port is None or not isinstance(
                    e.__cause__, ConnectionRefusedError
                ):
                    raise
                url = f"http://{target.address(self.fallback_port)}{METRICS_PATH}"
                fetched = await fetch(url, timeout=self.timeout)
            if fetched.status != 200:
                raise WebError(f"GET {url}: HTTP {fetched.status}")
            text = fetched.body.decode("utf-8", "replace")
            samples = parse_istio(text)
        except (WebError, ValueError) as e:
            log.debug("scrape of %s failed: %s", url, e)
            self.store.failed(target, str(e))
            return
        now = self.clock()
        uptime = parse_uptime(text)
        self.store.record(
            target, now, samples, started=None if uptime is None else now - uptime - 1.0
        )
