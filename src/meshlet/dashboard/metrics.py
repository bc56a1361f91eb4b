"""Where the dashboard's numbers come from: the ``MetricsSource`` interface, and the arithmetic
every source shares.

A source answers one question, the one PromQL's ``sum by (...) (increase(m{...}[w]))``
answers: by how much did the counter ``m`` grow over the ``window`` seconds before each of the
times ``at``, summed per group of label values. Everything the dashboard shows is built from
that (``meshlet.dashboard.golden``): rates are increases over the window, success rates are
ratios of two increases, latency quantiles come from the increases of histogram buckets.

Two implementations: the embedded scraper's ring of samples
(``meshlet.dashboard.scraper.EmbeddedSource``) and a real Prometheus over its HTTP API
(``meshlet.dashboard.prometheus.PrometheusSource``).

Counter arithmetic follows Prometheus (prometheus.io/docs/prometheus/latest/querying/functions):
a counter that goes down was reset (its process restarted), so the growth across a reset is
the new value; ``histogram_quantile`` interpolates linearly inside the bucket that holds the
rank, returns the upper bound of the last finite bucket when the rank falls in ``+Inf``, and
has no answer for no observations.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

REQUESTS = "istio_requests_total"
DURATION_BUCKETS = "istio_request_duration_milliseconds_bucket"
METRICS = (REQUESTS, DURATION_BUCKETS)

#: A group: the values of the ``by`` labels, in ``by``'s order.
Group = tuple[str, ...]


class MetricsSourceError(Exception):
    """The source cannot answer (Prometheus unreachable or refusing the query)."""


class MetricsSource(Protocol):
    """Counter increases per label group. Implementations: see the module docstring."""

    #: "embedded" or "prometheus", as ``/api/summary`` reports it.
    kind: str

    @property
    def interval(self) -> float:
        """Seconds between samples (the scrape interval)."""
        ...

    async def increase(
        self,
        metric: str,
        *,
        by: Sequence[str],
        match: Mapping[str, str],
        window: float,
        at: Sequence[float],
    ) -> dict[Group, list[float]]:
        """For each group of ``by`` label values among the series of ``metric`` whose labels
        equal ``match``: its increase over ``(t - window, t]`` for each ``t`` in ``at`` (unix
        seconds, ascending, evenly spaced). A group with no series is absent.

        Raises ``MetricsSourceError`` when the source cannot answer."""
        ...


def counter_increase(samples: Sequence[tuple[float, float]], start: float, end: float) -> float:
    """How much a counter sampled at ``samples`` (time, value; ascending) grew in
    ``(start, end]``: from the last sample at or before ``start`` (or the first one after it)
    to the last one at or before ``end``, a drop counting as a reset to zero."""
    total = 0.0
    previous: float | None = None
    for t, value in samples:
        if t > end:
            break
        if t <= start:
            previous = value
            continue
        if previous is not None:
            total += value - previous if value >= previous else value
        previous = value
    return total


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """PromQL's ``histogram_quantile`` over (upper bound, cumulative count) pairs.

    None when there are no observations (Prometheus's NaN) or no buckets."""
    ordered = sorted(buckets)
    if not ordered or not math.isinf(ordered[-1][0]):
        return None
    # Cumulative counts must not decrease; make them monotonic as Prometheus does.
    fixed: list[tuple[float, float]] = []
    highest = 0.0
    for le, count in ordered:
        highest = max(highest, count)
        fixed.append((le, highest))
    total = fixed[-1][1]
    if total <= 0:
        return None
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    rank = q * total
    index = next(i for i, (_, count) in enumerate(fixed) if count >= rank)
    if index == len(fixed) - 1:  # the +Inf bucket: the last finite bound
        return fixed[-2][0] if len(fixed) > 1 else None
    upper, count = fixed[index]
    lower, below = (0.0, 0.0) if index == 0 else fixed[index - 1]
    if index == 0 and upper <= 0:
        return upper
    in_bucket = count - below
    if in_bucket <= 0:
        return upper
    return lower + (upper - lower) * (rank - below) / in_bucket


def steps(end: float, minutes: float, step: float) -> list[float]:
    """Evenly spaced times ending at ``end``, covering ``minutes``."""
    count = max(1, int(minutes * 60 / step))
    first = end - (count - 1) * step
    return [first + i * step for i in range(count)]
