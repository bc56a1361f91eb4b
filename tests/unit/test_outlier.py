"""Outlier detection: config compilation, consecutive-error ejection, caps, return to service.

Envoy references: docs intro/arch_overview/upstream/outlier.rst, outlier_detection.proto, and
source/common/upstream/outlier_detection_impl.cc (ejectHost, checkHostForUneject,
onIntervalTimer).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from envoy.config.cluster.v3 import outlier_detection_pb2
from hypothesis import given
from hypothesis import strategies as st

from meshlet.errors import ConfigError
from meshlet.proxy.upstream.host import Host
from meshlet.proxy.upstream.outlier import OutlierConfig, OutlierDetector, compile_outlier_config

OD = outlier_detection_pb2.OutlierDetection
PATH = "static_resources.clusters[0].outlier_detection"


class Cluster:
    """A stand-in for the cluster: hosts, and a count of change notifications."""

    def __init__(self, n: int, config: OutlierConfig, rng: random.Random | None = None) -> None:
        self.hosts = [Host(f"10.0.0.{i}", 80) for i in range(n)]
        self.changes = 0
        self.detector = OutlierDetector(
            config, lambda: self.hosts, self.changed, rng or random.Random(1)
        )

    def changed(self) -> None:
        self.changes += 1

    def fail(self, host: Host, times: int, now: float = 0.0, status: int | None = 500) -> None:
        for _ in range(times):
            self.detector.report(host, status, now)


ALL = OutlierConfig(max_ejection_percent=100)


# -- compile ----------------------------------------------------------------------------------


def test_defaults_are_envoys() -> None:
    # outlier_detection.proto defaults: consecutive_5xx 5 (enforcing 100), gateway 5
    # (enforcing 0), interval 10 s, base 30 s, max 300 s, max_ejection_percent 10.
    assert compile_outlier_config(OD(), PATH) == OutlierConfig()


def test_max_ejection_time_defaults_to_base_when_base_is_larger() -> None:
    # outlier_detection_impl.cc: max_ejection_time defaults to max(300 s, base_ejection_time).
    proto = OD()
    proto.base_ejection_time.seconds = 600
    assert compile_outlier_config(proto, PATH).max_ejection_time == 600.0


def test_fields_are_read() -> None:
    proto = OD()
    proto.consecutive_5xx.value = 3
    proto.consecutive_gateway_failure.value = 2
    proto.enforcing_consecutive_gateway_failure.value = 100
    proto.interval.FromMilliseconds(500)
    proto.base_ejection_time.seconds = 10
    proto.max_ejection_time.seconds = 40
    proto.max_ejection_percent.value = 100
    proto.always_eject_one_host.value = True
    proto.successful_active_health_check_uneject_host.value = False
    proto.enforcing_success_rate.value = 0  # what Istio sends
    config = compile_outlier_config(proto, PATH)
    assert config == OutlierConfig(
        consecutive_5xx=3,
        consecutive_gateway_failure=2,
        enforcing_consecutive_gateway_failure=100,
        interval=0.5,
        base_ejection_time=10.0,
        max_ejection_time=40.0,
        max_ejection_percent=100,
        always_eject_one_host=True,
        successful_active_health_check_uneject_host=False,
    )


def _max_below_base(p: outlier_detection_pb2.OutlierDetection) -> None:
    p.base_ejection_time.seconds = 60
    p.max_ejection_time.seconds = 30


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (
            lambda p: setattr(p.success_rate_minimum_hosts, "value", 5),
            "success_rate_minimum_hosts: is not supported by meshlet",
        ),
        (
            lambda p: setattr(p.failure_percentage_threshold, "value", 85),
            "failure_percentage_threshold: is not supported by meshlet",
        ),
        (
            lambda p: setattr(p, "split_external_local_origin_errors", True),
            "split_external_local_origin_errors: is not supported by meshlet",
        ),
        (
            lambda p: setattr(p.enforcing_success_rate, "value", 100),
            "enforcing_success_rate: is not supported by meshlet except as 0 (that detector is "
            "not implemented)",
        ),
        (lambda p: p.monitors.add(), "monitors: is not supported by meshlet"),
        (
            _max_below_base,
            "max_ejection_time: cannot be smaller than base_ejection_time",
        ),
        (
            lambda p: setattr(p.max_ejection_percent, "value", 101),
            "max_ejection_percent: must be a percentage between 0 and 100",
        ),
    ],
)
def test_unimplemented_detectors_and_bad_values_are_refused_by_field_path(
    setup: Callable[[outlier_detection_pb2.OutlierDetection], object], message: str
) -> None:
    proto = OD()
    setup(proto)
    with pytest.raises(ConfigError) as e:
        compile_outlier_config(proto, PATH)
    assert str(e.value) == f"{PATH}.{message}"


# -- consecutive 5xx --------------------------------------------------------------------------


def test_five_consecutive_5xx_eject_the_host() -> None:
    # outlier.rst "Consecutive 5xx": default 5, enforced at 100 %.
    c = Cluster(3, ALL)
    host = c.hosts[0]
    c.fail(host, 4)
    assert not host.failed_outlier
    c.fail(host, 1)
    assert host.failed_outlier
    assert c.changes == 1
    assert c.detector.ejections_active == 1
    assert c.detector.ejections_enforced_consecutive_5xx == 1


def test_a_success_resets_the_consecutive_count() -> None:
    c = Cluster(3, ALL)
    host = c.hosts[0]
    c.fail(host, 4)
    c.detector.report(host, 200, 0.0)
    c.fail(host, 4)
    assert not host.failed_outlier


def test_local_origin_failures_count_as_5xx_without_split() -> None:
    # outlier.rst: without split_external_local_origin_errors, connect failures, timeouts
    # and resets are counted with 5xx responses.
    c = Cluster(3, ALL)
    c.fail(c.hosts[1], 5, status=None)
    assert c.hosts[1].failed_outlier


def test_4xx_responses_are_not_errors() -> None:
    c = Cluster(3, ALL)
    for status in (404, 500, 500, 500, 500, 429, 500):
        c.detector.report(c.hosts[0], status, 0.0)
    assert not c.hosts[0].failed_outlier


# -- consecutive gateway failure --------------------------------------------------------------


def test_gateway_failures_are_detected_but_not_enforced_by_default() -> None:
    # outlier_detection.proto: enforcing_consecutive_gateway_failure defaults to 0.
    c = Cluster(3, OutlierConfig(max_ejection_percent=100, consecutive_5xx=100))
    c.fail(c.hosts[0], 5, status=503)
    assert not c.hosts[0].failed_outlier
    assert c.detector.ejections_detected_consecutive_gateway_failure == 1
    assert c.detector.ejections_enforced_total == 0


def test_gateway_failures_eject_when_enforced() -> None:
    # outlier.rst "Consecutive Gateway Failure": 502, 503, 504 (and local failures).
    config = OutlierConfig(
        max_ejection_percent=100,
        consecutive_5xx=100,
        consecutive_gateway_failure=3,
        enforcing_consecutive_gateway_failure=100,
    )
    c = Cluster(3, config)
    for status in (502, None, 504):
        c.detector.report(c.hosts[0], status, 0.0)
    assert c.hosts[0].failed_outlier
    assert c.detector.ejections_gateway_failure == 1


def test_a_non_gateway_5xx_resets_only_the_gateway_count() -> None:
    # outlier_detection_impl.cc putHttpResponseCode: 500 resets consecutive_gateway_failure
    # but still counts towards consecutive_5xx.
    config = OutlierConfig(
        max_ejection_percent=100,
        consecutive_5xx=4,
        consecutive_gateway_failure=3,
        enforcing_consecutive_gateway_failure=100,
    )
    c = Cluster(3, config)
    for status in (503, 503, 500, 503):
        c.detector.report(c.hosts[0], status, 0.0)
    assert c.hosts[0].failed_outlier  # by consecutive 5xx (4), not gateway (1 after reset)
    assert c.detector.ejections_enforced_consecutive_5xx == 1
    assert c.detector.ejections_gateway_failure == 0


# -- caps and enforcement ---------------------------------------------------------------------


def test_max_ejection_percent_caps_ejections() -> None:
    # outlier_detection_impl.cc ejectHost: eject if 100 * (ejected + 1) / hosts <= max
    # (Envoy's MaxEjectionPercentage test: 50 % of 3 hosts ejects one).
    c = Cluster(3, OutlierConfig(max_ejection_percent=50))
    for host in c.hosts:
        c.fail(host, 5)
    assert [h.failed_outlier for h in c.hosts] == [True, False, False]
    assert c.detector.ejections_overflow == 2


def test_default_cap_ejects_nothing_from_a_small_cluster() -> None:
    # Current Envoy: one of 3 hosts is 33 % > 10 %, so nothing is ejected unless
    # always_eject_one_host (the older "at least one host" doc line no longer holds).
    c = Cluster(3, OutlierConfig())
    c.fail(c.hosts[0], 5)
    assert not c.hosts[0].failed_outlier
    assert c.detector.ejections_overflow == 1


def test_always_eject_one_host_ejects_one_despite_the_cap() -> None:
    # outlier_detection.proto always_eject_one_host.
    c = Cluster(3, OutlierConfig(always_eject_one_host=True))
    c.fail(c.hosts[0], 5)
    c.fail(c.hosts[1], 5)
    assert [h.failed_outlier for h in c.hosts] == [True, False, False]


def test_default_cap_ejects_one_of_ten_hosts() -> None:
    c = Cluster(10, OutlierConfig())
    c.fail(c.hosts[0], 5)
    c.fail(c.hosts[1], 5)
    assert [h.failed_outlier for h in c.hosts[:2]] == [True, False]


@given(percent=st.integers(min_value=1, max_value=99), seed=st.integers(min_value=0))
def test_enforcing_percent_is_a_roll_per_detection(percent: int, seed: int) -> None:
    # outlier_detection.proto enforcing_consecutive_5xx: "% chance that a host will be
    # actually ejected when an outlier status is detected".
    rng = random.Random(seed)
    c = Cluster(
        3,
        OutlierConfig(max_ejection_percent=100, enforcing_consecutive_5xx=percent),
        rng=random.Random(seed),
    )
    c.fail(c.hosts[0], 5)
    assert c.hosts[0].failed_outlier is (rng.randrange(100) < percent)
    assert c.detector.ejections_detected_consecutive_5xx == 1


def test_a_detection_that_is_not_enforced_resets_the_count() -> None:
    c = Cluster(3, OutlierConfig(max_ejection_percent=100, enforcing_consecutive_5xx=0))
    c.fail(c.hosts[0], 9)
    assert c.detector.ejections_detected_consecutive_5xx == 1  # the 10th would be the second
    c.fail(c.hosts[0], 1)
    assert c.detector.ejections_detected_consecutive_5xx == 2


# -- return to service ------------------------------------------------------------------------


def test_an_ejected_host_returns_after_base_ejection_time() -> None:
    # outlier.rst: "ejected for base_ejection_time multiplied by the number of times ..."
    c = Cluster(3, OutlierConfig(max_ejection_percent=100, base_ejection_time=30.0))
    host = c.hosts[0]
    c.fail(host, 5, now=100.0)
    c.detector.sweep(129.9)
    assert host.failed_outlier
    c.detector.sweep(130.0)
    assert not host.failed_outlier
    assert c.changes == 2


def test_repeat_ejections_last_longer_and_are_capped() -> None:
    # outlier_detection_impl.cc: min(base * backoff, max_ejection_time).
    config = OutlierConfig(
        max_ejection_percent=100, base_ejection_time=10.0, max_ejection_time=25.0, interval=10.0
    )
    c = Cluster(3, config)
    host = c.hosts[0]
    durations = []
    now = 0.0
    for _ in range(4):
        c.fail(host, 5, now=now)
        durations.append(c.detector.ejected_for(host))
        now += durations[-1]
        c.detector.sweep(now)
        assert not host.failed_outlier
    assert durations == [10.0, 20.0, 25.0, 25.0]


def test_the_backoff_decays_while_the_host_stays_in_service() -> None:
    # onIntervalTimer: the multiplier drops by one per interval a returned host stays in.
    config = OutlierConfig(max_ejection_percent=100, base_ejection_time=10.0, interval=10.0)
    c = Cluster(3, config)
    host = c.hosts[0]
    c.fail(host, 5, now=0.0)
    c.detector.sweep(10.0)  # back (backoff 1)
    c.fail(host, 5, now=10.0)
    assert c.detector.ejected_for(host) == 20.0  # backoff 2
    c.detector.sweep(30.0)  # back at 30
    for t in (40.0, 50.0):
        c.detector.sweep(t)  # two intervals in service: backoff 2 -> 0
    c.fail(host, 5, now=55.0)
    assert c.detector.ejected_for(host) == 10.0


def test_ejection_time_jitter_is_added() -> None:
    config = OutlierConfig(
        max_ejection_percent=100, base_ejection_time=10.0, max_ejection_time_jitter=2.0
    )
    c = Cluster(3, config, rng=random.Random(3))
    c.fail(c.hosts[0], 5)
    assert 10.0 <= c.detector.ejected_for(c.hosts[0]) <= 12.0


def test_a_returned_host_starts_counting_from_zero() -> None:
    # unejectHost resets the consecutive counters.
    c = Cluster(3, ALL)
    host = c.hosts[0]
    c.fail(host, 5, now=0.0)
    c.fail(host, 3, now=1.0)  # errors while ejected
    c.detector.sweep(30.0)
    c.fail(host, 4, now=31.0)
    assert not host.failed_outlier


def test_a_passing_active_health_check_returns_an_ejected_host() -> None:
    # outlier_detection.proto successful_active_health_check_uneject_host (default true).
    c = Cluster(3, ALL)
    host = c.hosts[0]
    c.fail(host, 5)
    c.detector.health_check_passed(host, 1.0)
    assert not host.failed_outlier
    c2 = Cluster(
        3,
        OutlierConfig(max_ejection_percent=100, successful_active_health_check_uneject_host=False),
    )
    c2.fail(c2.hosts[0], 5)
    c2.detector.health_check_passed(c2.hosts[0], 1.0)
    assert c2.hosts[0].failed_outlier


def test_removed_hosts_are_forgotten_and_not_counted() -> None:
    c = Cluster(3, ALL)
    gone = c.hosts[0]
    c.fail(gone, 5)
    c.fail(c.hosts[1], 1)
    c.hosts = c.hosts[1:]
    assert c.detector.ejections_active == 0
    c.detector.sweep(1.0)
    assert gone not in c.detector._monitors
    assert c.hosts[0] in c.detector._monitors


def test_stats_use_envoys_names() -> None:
    c = Cluster(3, ALL)
    c.fail(c.hosts[0], 5)
    stats = c.detector.stats()
    assert stats["ejections_active"] == 1
    assert stats["ejections_enforced_total"] == 1
    assert stats["ejections_detected_consecutive_5xx"] == 1
    assert stats["ejections_total"] == 1
    assert "ejections_overflow" in stats
