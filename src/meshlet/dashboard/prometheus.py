"""``MetricsSource`` over a real Prometheus's HTTP API (``meshlet up --prometheus URL``).

The question is PromQL's own: ``sum by (<by>) (increase(<metric>{<match>}[<window>s]))``,
asked with ``/api/v1/query`` for one time and ``/api/v1/query_range`` for several
(prometheus.io/docs/prometheus/latest/querying/api/). Prometheus scrapes the proxies itself;
``/api/prometheus-targets`` of the dashboard is an ``http_sd_configs`` endpoint that tells it
where they are. Prometheus's ``increase`` extrapolates to the window's edges, the embedded
source does not: the two agree on rates to within a scrape interval's worth.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

from meshlet.dashboard.metrics import Group, MetricsSourceError
from meshlet.web import WebError, fetch

DEFAULT_TIMEOUT = 10.0


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def promql(metric: str, *, by: Sequence[str], match: Mapping[str, str], window: float) -> str:
    selector = ",".join(f"{k}={_quote(v)}" for k, v in sorted(match.items()))
    seconds = max(1, round(window))
    return f"sum by ({','.join(by)}) (increase({metric}{{{selector}}}[{seconds}s]))"


class PrometheusSource:
    """Asks the Prometheus at ``url`` (``http://host:port``, optionally with a path prefix)."""

    kind = "prometheus"

    def __init__(
        self, url: str, *, interval: float = 15.0, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.url = url.rstrip("/")
        self._interval = interval
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"<PrometheusSource {self.url}>"

    @property
    def interval(self) -> float:
        return self._interval

    async def query(self, path: str, params: Mapping[str, str]) -> Any:
        """``data`` of a Prometheus API answer; ``MetricsSourceError`` for anything else."""
        url = f"{self.url}{path}?{urlencode(params)}"
        try:
            fetched = await fetch(url, timeout=self.timeout)
        except WebError as e:
            raise MetricsSourceError(f"Prometheus at {self.url} did not answer: {e}") from e
        try:
            answer = json.loads(fetched.body)
        except ValueError:
            raise MetricsSourceError(
                f"Prometheus at {self.url} answered HTTP {fetched.status} without JSON"
            ) from None
        if not isinstance(answer, dict) or answer.get("status") != "success":
            error = answer.get("error") if isinstance(answer, dict) else None
            raise MetricsSourceError(f"Prometheus refused {params.get('query')!r}: {error}")
        return answer.get("data")

    async def increase(
        self,
        metric: str,
        *,
        by: Sequence[str],
        match: Mapping[str, str],
        window: float,
        at: Sequence[float],
    ) -> dict[Group, list[float]]:
        query = promql(metric, by=by, match=match, window=window)
        out: dict[Group, list[float]] = {}
        if len(at) == 1:
            data = await self.query("/api/v1/query", {"query": query, "time": f"{at[0]:.3f}"})
            for item in data.get("result") or []:
                group = tuple(str(item["metric"].get(name, "")) for name in by)
                out[group] = [_number(item["value"][1])]
            return out
        step = at[1] - at[0]
        data = await self.query(
            "/api/v1/query_range",
            {
                "query": query,
                "start": f"{at[0]:.3f}",
                "end": f"{at[-1]:.3f}",
                "step": f"{step:g}",
            },
        )
        for item in data.get("result") or []:
            group = tuple(str(item["metric"].get(name, "")) for name in by)
            values = [0.0] * len(at)
            for t, value in item.get("values") or []:
                index = round((float(t) - at[0]) / step)
                if 0 <= index < len(at):
                    values[index] = _number(value)
            out[group] = values
        return out


def _number(text: str) -> float:
    value = float(text)
    return 0.0 if math.isnan(value) else value
