"""Counter arithmetic and ``histogram_quantile`` as Prometheus defines them
(prometheus.io/docs/prometheus/latest/querying/functions/: "Any decrease in the value between
two consecutive float samples is interpreted as a counter reset"; ``histogram_quantile``
"interpolates linearly within the bucket", answers the upper bound of the second-highest
bucket when the quantile falls in ``+Inf``, and NaN without observations), and the embedded
scraper's rings."""

from __future__ import annotations

import asyncio
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshlet.dashboard.metrics import (
    DURATION_BUCKETS,
    REQUESTS,
    counter_increase,
    histogram_quantile,
    steps,
)
from meshlet.dashboard.scraper import (
    EmbeddedSource,
    SeriesStore,
    Target,
    parse_istio,
    parse_uptime,
)

INF = math.inf


def test_increase_is_last_minus_baseline_before_the_window() -> None:
    samples = [(0.0, 10.0), (5.0, 12.0), (10.0, 20.0), (15.0, 21.0)]
    # (5, 15]: from the sample at 5 (the baseline) to the one at 15.
    assert counter_increase(samples, 5.0, 15.0) == 9.0
    assert counter_increase(samples, 4.0, 10.0) == 10.0  # baseline at 0 (<= 4)
    assert counter_increase(samples, 15.0, 30.0) == 0.0  # nothing after the baseline


def test_a_counter_that_drops_was_reset_and_its_new_value_is_growth() -> None:
    # A proxy restarted between 10 and 15: 20 -> 3 means 3 requests since the restart.
    samples = [(0.0, 10.0), (5.0, 15.0), (10.0, 20.0), (15.0, 3.0), (20.0, 7.0)]
    assert counter_increase(samples, 0.0, 20.0) == 5 + 5 + 3 + 4


def test_without_a_baseline_the_first_sample_in_the_window_is_the_start() -> None:
    samples = [(10.0, 100.0), (15.0, 104.0)]
    assert counter_increase(samples, 0.0, 20.0) == 4.0


@given(st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=2, max_size=30))
def test_monotonic_counters_increase_by_last_minus_first(deltas: list[float]) -> None:
    value, samples = 0.0, []
    for i, d in enumerate(deltas):
        value += d
        samples.append((float(i), value))
    got = counter_increase(samples, 0.0, float(len(deltas)))
    assert got == pytest.approx(samples[-1][1] - samples[0][1], rel=1e-9, abs=1e-6)


def test_histogram_quantile_interpolates_linearly_within_the_bucket() -> None:
    # 100 observations: 50 in (0, 10], 40 in (10, 50], 10 in (50, 100].
    buckets = [(10.0, 50.0), (50.0, 90.0), (100.0, 100.0), (INF, 100.0)]
    assert histogram_quantile(0.5, buckets) == 10.0
    assert histogram_quantile(0.25, buckets) == 5.0  # first bucket: from 0
    assert histogram_quantile(0.7, buckets) == pytest.approx(10 + 40 * (70 - 50) / 40)
    assert histogram_quantile(0.99, buckets) == pytest.approx(50 + 50 * (99 - 90) / 10)


def test_histogram_quantile_in_the_inf_bucket_is_the_last_finite_bound() -> None:
    buckets = [(10.0, 1.0), (50.0, 2.0), (INF, 10.0)]
    assert histogram_quantile(0.99, buckets) == 50.0


def test_histogram_quantile_without_observations_has_no_answer() -> None:
    assert histogram_quantile(0.5, [(10.0, 0.0), (INF, 0.0)]) is None
    assert histogram_quantile(0.5, []) is None
    assert histogram_quantile(0.5, [(10.0, 3.0)]) is None  # no +Inf bucket: not a histogram


def test_histogram_quantile_makes_cumulative_counts_monotonic() -> None:
    # A bucket lower than the one before it (a scrape mid-update) is raised to it.
    buckets = [(10.0, 5.0), (50.0, 4.0), (INF, 10.0)]
    assert histogram_quantile(0.5, buckets) == 10.0


def test_steps_are_evenly_spaced_and_end_now() -> None:
    assert steps(1000.0, 1, 15) == [955.0, 970.0, 985.0, 1000.0]


# -- the embedded rings ----------------------------------------------------------------------

TARGET = Target(ip="127.1.0.5", namespace="default", pod="reviews-v1-abc", workload="reviews-v1")
LABELS = 'reporter="destination",destination_workload="reviews-v1",response_code="200"'


def _text(requests: float, buckets: tuple[float, ...] = ()) -> str:
    lines = [
        "# TYPE envoy_cluster_upstream_rq_total counter",
        'envoy_cluster_upstream_rq_total{envoy_cluster_name="x"} 99',
        "# TYPE istio_requests_total counter",
        f"istio_requests_total{{{LABELS}}} {requests}",
    ]
    if buckets:
        lines.append("# TYPE istio_request_duration_milliseconds histogram")
        for le, count in zip(("5", "10", "+Inf"), buckets, strict=True):
            lines.append(
                f'istio_request_duration_milliseconds_bucket{{{LABELS},le="{le}"}} {count}'
            )
        lines.append(f"istio_request_duration_milliseconds_sum{{{LABELS}}} 1")
        lines.append(f"istio_request_duration_milliseconds_count{{{LABELS}}} {buckets[-1]}")
    return "\n".join(lines) + "\n"


def test_parse_keeps_only_istio_requests_and_duration_buckets() -> None:
    samples = parse_istio(_text(7, (1, 2, 3)))
    assert {name for name, _, _ in samples} == {REQUESTS, DURATION_BUCKETS}
    [(_, labels, value)] = [s for s in samples if s[0] == REQUESTS]
    assert dict(labels)["destination_workload"] == "reviews-v1" and value == 7


def _increase(store: SeriesStore, window: float, at: float) -> float:
    groups = EmbeddedSource(store).increase_now(REQUESTS, by=(), match={}, window=window, at=[at])
    return groups.get((), [0.0])[0]


def test_a_series_new_on_a_known_target_counts_from_zero() -> None:
    """The first 503 of a new label set counts: the series did not exist at the last scrape."""
    store = SeriesStore()
    store.record(TARGET, 100.0, [])  # scraped, no traffic yet
    store.record(TARGET, 105.0, parse_istio(_text(3)))
    assert _increase(store, 60.0, 105.0) == 3.0


def test_on_a_targets_first_scrape_there_is_no_baseline() -> None:
    store = SeriesStore()
    store.record(TARGET, 100.0, parse_istio(_text(1000)))  # counted before we looked
    store.record(TARGET, 105.0, parse_istio(_text(1004)))
    assert _increase(store, 60.0, 105.0) == 4.0


def test_on_a_first_scrape_the_proxys_start_is_the_baseline() -> None:
    """A proxy that reports its uptime began counting from 0 then: traffic served before the
    scraper first reached it counts (the first seconds of a new mesh)."""
    store = SeriesStore()
    store.record(TARGET, 100.0, parse_istio(_text(61)), started=97.0)
    assert _increase(store, 60.0, 100.0) == 61.0
    assert parse_uptime("# TYPE envoy_server_uptime gauge\nenvoy_server_uptime 33\n") == 33.0
    assert parse_uptime("envoy_server_live 1\n") is None


def test_a_restarted_proxy_resets_its_counters_without_negative_rates() -> None:
    store = SeriesStore()
    for t, value in ((100.0, 50.0), (105.0, 60.0), (110.0, 2.0), (115.0, 5.0)):
        store.record(TARGET, t, parse_istio(_text(value)))
    assert _increase(store, 20.0, 115.0) == 10 + 2 + 3


def test_unchanged_samples_are_not_stored_and_old_ones_are_pruned() -> None:
    store = SeriesStore(retention=60.0)
    for t in range(0, 200, 5):
        store.record(TARGET, float(t), parse_istio(_text(10)))
    [series] = store.series(REQUESTS, {})
    assert len(series.samples) == 1  # idle: one sample
    store.record(TARGET, 200.0, parse_istio(_text(11)))
    store.prune(200.0, [TARGET])
    assert len(series.samples) == 2  # the baseline and the change
    store.prune(261.0, [])  # not seen for longer than the retention: gone
    assert list(store.series(REQUESTS, {})) == []


def test_increases_group_by_labels_and_filter_by_match() -> None:
    store = SeriesStore()
    other = Target(ip="127.1.0.6", namespace="default", pod="ratings-v1-x", workload="ratings-v1")
    store.record(TARGET, 0.0, parse_istio(_text(0, (0, 0, 0))))
    store.record(other, 0.0, parse_istio(_text(0).replace("reviews-v1", "ratings-v1")))
    store.record(TARGET, 5.0, parse_istio(_text(4, (1, 3, 4))))
    store.record(other, 5.0, parse_istio(_text(6).replace("reviews-v1", "ratings-v1")))
    source = EmbeddedSource(store)
    got = asyncio.run(
        source.increase(REQUESTS, by=("destination_workload",), match={}, window=10, at=[5.0])
    )
    assert got == {("reviews-v1",): [4.0], ("ratings-v1",): [6.0]}
    got = asyncio.run(
        source.increase(
            DURATION_BUCKETS,
            by=("le",),
            match={"destination_workload": "reviews-v1"},
            window=10,
            at=[0.0, 5.0],
        )
    )
    assert got == {("5",): [0.0, 1.0], ("10",): [0.0, 3.0], ("+Inf",): [0.0, 4.0]}
