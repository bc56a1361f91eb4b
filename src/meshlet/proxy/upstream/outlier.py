"""Outlier detection: eject hosts that keep failing, and let them back after a while.

Envoy's consecutive-error detectors (``source/common/upstream/outlier_detection_impl.cc``):

* Every upstream result is reported with ``report(host, status, now)``. A 5xx adds to the
  host's consecutive-5xx count; 502/503/504 also add to its consecutive-gateway-failure count
  (other 5xx reset that one); anything else resets both. A local-origin failure (connect
  failure, timeout, reset; ``status=None``) counts as a gateway error, as Envoy does without
  ``split_external_local_origin_errors``. Circuit-breaker overflows must not be reported.
* When a count *reaches* its threshold the host is a detected outlier: the count is reset and
  the host is ejected now if the ejection cap allows it and the ``enforcing_*`` percent roll
  passes. The cap (current Envoy): eject only if ``100 * (ejected + 1) / hosts <=
  max_ejection_percent``, or, with ``always_eject_one_host``, if nothing is ejected yet.
  Older Envoy documented "at least one host regardless"; current Envoy ejects none when one
  host is already more than the cap (e.g. 3 hosts at the default 10 %).
* An ejected host returns after ``min(base_ejection_time * backoff, max_ejection_time) +
  jitter``; ``backoff`` grows by one per ejection (while ``backoff * base < max + base``) and
  shrinks by one per ``interval`` the host then stays in service. ``sweep(now)``, called every
  ``interval``, does both.
* With ``successful_active_health_check_uneject_host`` (default true), a passing active health
  check returns an ejected host at once (``health_check_passed``).

Not implemented, and refused when enabled: success-rate and failure-percentage detection,
split local/external errors, extension monitors. Envoy runs success-rate detection by default
(``enforcing_success_rate`` 100) once 5 hosts have 100 requests per interval; meshlet does not,
so it accepts ``enforcing_success_rate: 0`` (what Istio sends) but no other value.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from envoy.config.cluster.v3 import outlier_detection_pb2

from meshlet.errors import ConfigError
from meshlet.proxy.fields import check_fields, duration_field, join, uint_field
from meshlet.proxy.upstream.host import Host

_SUPPORTED = frozenset(
    {
        "consecutive_5xx",
        "enforcing_consecutive_5xx",
        "consecutive_gateway_failure",
        "enforcing_consecutive_gateway_failure",
        "interval",
        "base_ejection_time",
        "max_ejection_time",
        "max_ejection_time_jitter",
        "max_ejection_percent",
        "successful_active_health_check_uneject_host",
        "always_eject_one_host",
        # Accepted only with value 0, i.e. disabled (checked below):
        "enforcing_success_rate",
        "enforcing_local_origin_success_rate",
        "enforcing_failure_percentage",
        "enforcing_failure_percentage_local_origin",
        "enforcing_consecutive_local_origin_failure",
    }
)
_ONLY_ZERO = (
    "enforcing_success_rate",
    "enforcing_local_origin_success_rate",
    "enforcing_failure_percentage",
    "enforcing_failure_percentage_local_origin",
    "enforcing_consecutive_local_origin_failure",
)
_PERCENTS = (
    "enforcing_consecutive_5xx",
    "enforcing_consecutive_gateway_failure",
    "max_ejection_percent",
)
_GATEWAY_ERRORS = frozenset({502, 503, 504})


@dataclass(frozen=True, slots=True, kw_only=True)
class OutlierConfig:
    """A cluster's compiled outlier detection (Envoy's defaults; times in seconds)."""

    consecutive_5xx: int = 5
    enforcing_consecutive_5xx: int = 100  # percent
    consecutive_gateway_failure: int = 5
    enforcing_consecutive_gateway_failure: int = 0  # percent: off unless configured
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0  # max(300 s, base_ejection_time) when unset
    max_ejection_time_jitter: float = 0.0
    max_ejection_percent: int = 10
    always_eject_one_host: bool = False
    successful_active_health_check_uneject_host: bool = True


def compile_outlier_config(
    proto: outlier_detection_pb2.OutlierDetection, path: str
) -> OutlierConfig:
    """Compile ``Cluster.outlier_detection``; raises ``ConfigError`` naming the field."""
    check_fields(proto, path, _SUPPORTED)
    for name in _ONLY_ZERO:
        if proto.HasField(name) and getattr(proto, name).value != 0:
            raise ConfigError.at(
                join(path, name),
                "is not supported by meshlet except as 0 (that detector is not implemented)",
            )
    for name in _PERCENTS:
        if proto.HasField(name) and getattr(proto, name).value > 100:
            raise ConfigError.at(join(path, name), "must be a percentage between 0 and 100")
    interval = duration_field(proto, "interval", 10.0)
    base = duration_field(proto, "base_ejection_time", 30.0)
    assert interval is not None and base is not None
    if interval <= 0:
        raise ConfigError.at(join(path, "interval"), "must be greater than 0")
    maximum = duration_field(proto, "max_ejection_time", max(300.0, base))
    assert maximum is not None
    if maximum < base:
        raise ConfigError.at(
            join(path, "max_ejection_time"), "cannot be smaller than base_ejection_time"
        )
    jitter = duration_field(proto, "max_ejection_time_jitter", 0.0)
    assert jitter is not None
    return OutlierConfig(
        consecutive_5xx=uint_field(proto, "consecutive_5xx", 5),
        enforcing_consecutive_5xx=uint_field(proto, "enforcing_consecutive_5xx", 100),
        consecutive_gateway_failure=uint_field(proto, "consecutive_gateway_failure", 5),
        enforcing_consecutive_gateway_failure=uint_field(
            proto, "enforcing_consecutive_gateway_failure", 0
        ),
        interval=interval,
        base_ejection_time=base,
        max_ejection_time=maximum,
        max_ejection_time_jitter=jitter,
        max_ejection_percent=uint_field(proto, "max_ejection_percent", 10),
        always_eject_one_host=(
            proto.HasField("always_eject_one_host") and proto.always_eject_one_host.value
        ),
        successful_active_health_check_uneject_host=(
            not proto.HasField("successful_active_health_check_uneject_host")
            or proto.successful_active_health_check_uneject_host.value
        ),
    )


class _Monitor:
    """Per-host detector state (Envoy's ``DetectorHostMonitorImpl``)."""

    __slots__ = (
        "backoff",
        "consecutive_5xx",
        "consecutive_gateway",
        "ejected_at",
        "jitter",
        "num_ejections",
        "unejected_at",
    )

    def __init__(self) -> None:
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.num_ejections = 0
        self.backoff = 0  # the ejection-time multiplier
        self.ejected_at: float | None = None
        self.unejected_at: float | None = None
        self.jitter = 0.0


class OutlierDetector:
    """One cluster's outlier detection. Pure: the cluster feeds it results and a clock.

    ``on_change`` is called whenever a host's ``failed_outlier`` flag flips, so the cluster
    can rebuild its balancer. Stats use Envoy's names (``outlier_detection.*``).
    """

    def __init__(
        self,
        config: OutlierConfig,
        hosts: Callable[[], Sequence[Host]],
        on_change: Callable[[], None],
        rng: random.Random,
    ) -> None:
        self.config = config
        self._hosts = hosts
        self._on_change = on_change
        self._rng = rng
        self._monitors: dict[Host, _Monitor] = {}
        # Envoy stats (counters), named as in outlier_detection_impl.h.
        self.ejections_total = 0  # deprecated in Envoy; consecutive-5xx ejections under the cap
        self.ejections_consecutive_5xx = 0  # deprecated in Envoy; consecutive-5xx detections
        self.ejections_overflow = 0
        self.ejections_enforced_total = 0
        self.ejections_detected_consecutive_5xx = 0
        self.ejections_enforced_consecutive_5xx = 0
        self.ejections_detected_consecutive_gateway_failure = 0
        self.ejections_enforced_consecutive_gateway_failure = 0

    def __repr__(self) -> str:
        return (
            f"<OutlierDetector [Ejections: {self.ejections_active} active, "
            f"{self.ejections_enforced_total} total]>"
        )

    @property
    def ejections_active(self) -> int:
        """Hosts currently ejected (Envoy's ``ejections_active`` gauge)."""
        return sum(1 for h in self._hosts() if h.failed_outlier)

    @property
    def ejections_gateway_failure(self) -> int:
        """Enforced consecutive-gateway-failure ejections."""
        return self.ejections_enforced_consecutive_gateway_failure

    def stats(self) -> dict[str, int]:
        """Every stat by its Envoy name under ``cluster.<name>.outlier_detection.``."""
        return {
            "ejections_active": self.ejections_active,
            "ejections_total": self.ejections_total,
            "ejections_consecutive_5xx": self.ejections_consecutive_5xx,
            "ejections_overflow": self.ejections_overflow,
            "ejections_enforced_total": self.ejections_enforced_total,
            "ejections_detected_consecutive_5xx": self.ejections_detected_consecutive_5xx,
            "ejections_enforced_consecutive_5xx": self.ejections_enforced_consecutive_5xx,
            "ejections_detected_consecutive_gateway_failure": (
                self.ejections_detected_consecutive_gateway_failure
            ),
            "ejections_enforced_consecutive_gateway_failure": (
                self.ejections_enforced_consecutive_gateway_failure
            ),
        }

    def _monitor(self, host: Host) -> _Monitor:
        m = self._monitors.get(host)
        if m is None:
            m = self._monitors[host] = _Monitor()
        return m

    # -- results -----------------------------------------------------------------------------

    def report(self, host: Host, status: int | None, now: float) -> None:
        """One upstream result: an HTTP status, or None for a local-origin failure."""
        m = self._monitor(host)
        if status is None:
            status = 503  # Envoy maps connect failures to 503 and timeouts to 504: both gateway
        if 500 <= status < 600:
            config = self.config
            if status in _GATEWAY_ERRORS:
                m.consecutive_gateway += 1
                if m.consecutive_gateway == config.consecutive_gateway_failure:
                    self._detected(host, m, gateway=True, now=now)
            else:
                m.consecutive_gateway = 0
            m.consecutive_5xx += 1
            if m.consecutive_5xx == config.consecutive_5xx:
                self._detected(host, m, gateway=False, now=now)
        else:
            m.consecutive_5xx = 0
            m.consecutive_gateway = 0

    def _detected(self, host: Host, m: _Monitor, *, gateway: bool, now: float) -> None:
        if host.failed_outlier:
            return  # already out; Envoy drops the event (the counts reset when it returns)
        if gateway:
            self.ejections_detected_consecutive_gateway_failure += 1
        else:
            self.ejections_detected_consecutive_5xx += 1
            self.ejections_consecutive_5xx += 1
        self._eject(host, m, gateway=gateway, now=now)
        if gateway:
            m.consecutive_gateway = 0
        else:
            m.consecutive_5xx = 0

    def _eject(self, host: Host, m: _Monitor, *, gateway: bool, now: float) -> None:
        config = self.config
        hosts = self._hosts()
        active = sum(1 for h in hosts if h.failed_outlier)
        allowed = 100.0 * (active + 1) / max(1, len(hosts)) <= min(100, config.max_ejection_percent)
        if config.always_eject_one_host and active == 0:
            allowed = True
        if not allowed:
            self.ejections_overflow += 1
            return
        if not gateway:
            self.ejections_total += 1
        enforcing = (
            config.enforcing_consecutive_gateway_failure
            if gateway
            else config.enforcing_consecutive_5xx
        )
        if not self._roll(enforcing):
            return
        self.ejections_enforced_total += 1
        if gateway:
            self.ejections_enforced_consecutive_gateway_failure += 1
        else:
            self.ejections_enforced_consecutive_5xx += 1
        host.failed_outlier = True
        m.num_ejections += 1
        m.ejected_at = now
        jitter_ms = int(config.max_ejection_time_jitter * 1000)
        m.jitter = self._rng.randrange(jitter_ms + 1) / 1000 if jitter_ms else 0.0
        if (
            m.backoff * config.base_ejection_time
            < config.max_ejection_time + config.base_ejection_time
        ):
            m.backoff += 1
        self._on_change()

    def _roll(self, percent: int) -> bool:
        if percent >= 100:
            return True
        if percent <= 0:
            return False
        return self._rng.randrange(100) < percent

    # -- time --------------------------------------------------------------------------------

    def sweep(self, now: float) -> None:
        """The interval timer: return hosts whose ejection ran out, decay ejection backoff."""
        config = self.config
        hosts = self._hosts()
        alive = set(hosts)
        for gone in [h for h in self._monitors if h not in alive]:
            del self._monitors[gone]  # removed from the cluster
        changed = False
        for host in hosts:
            m = self._monitors.get(host)
            if m is None or not host.failed_outlier or m.ejected_at is None:
                continue
            out_for = min(config.base_ejection_time * m.backoff, config.max_ejection_time)
            if out_for + m.jitter <= now - m.ejected_at:
                self._uneject(host, m, now)
                changed = True
        for host in hosts:
            m = self._monitors.get(host)
            if (
                m is not None
                and not host.failed_outlier
                and m.unejected_at is not None
                and now - m.unejected_at >= config.interval
                and m.backoff > 0
            ):
                m.backoff -= 1
        if changed:
            self._on_change()

    def health_check_passed(self, host: Host, now: float) -> None:
        """An active health check passed: return an ejected host at once (Envoy's default)."""
        if not self.config.successful_active_health_check_uneject_host:
            return
        if host.failed_outlier and not host.failed_active_hc:
            self._uneject(host, self._monitor(host), now)
            self._on_change()

    def _uneject(self, host: Host, m: _Monitor, now: float) -> None:
        host.failed_outlier = False
        # Fresh counts, so that a few errors do not re-eject a host that was close to a
        # threshold on the other counter.
        m.consecutive_5xx = 0
        m.consecutive_gateway = 0
        m.unejected_at = now

    def ejected_for(self, host: Host) -> float:
        """How long ``host``'s current ejection lasts (0 when it is not ejected)."""
        m = self._monitors.get(host)
        if m is None or not host.failed_outlier:
            return 0.0
        c = self.config
        return min(c.base_ejection_time * m.backoff, c.max_ejection_time) + m.jitter
