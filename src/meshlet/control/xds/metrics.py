"""The ADS server's own metrics, in Prometheus text format, under istiod's names.

istiod's names let Istio's "Control Plane" Grafana dashboard read meshlet unchanged:

* ``pilot_xds`` (gauge): connected proxies (ADS streams that sent their node).
* ``pilot_xds_pushes{type}`` (counter): responses sent, by type (``lds``, ``rds``, ``cds``,
  ``eds``).
* ``pilot_total_xds_rejects{type}`` (counter): NACKs received.
* ``pilot_xds_expired_nonce{type}`` (counter): requests answering a superseded response.
* ``pilot_push_triggers{type}`` (counter): push requests enqueued, by reason.
* ``pilot_proxy_convergence_time`` (histogram, seconds): from a change being enqueued to its
  push being written to a proxy, debounce included.
* ``meshlet_xds_generate_errors{type}``, ``meshlet_xds_unknown_type_requests``,
  ``meshlet_xds_refused_streams{code}`` (counters): generators that raised, requests for
  types nobody serves, streams ended for a malformed request.

No client library: a few counters and one histogram render faster than they import.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

#: Convergence buckets (seconds); finer than istiod's at the low end, where the 300 ms goal is.
CONVERGENCE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 3.0, 5.0, 10.0, 20.0, 30.0)


class Histogram:
    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def render(self, name: str) -> list[str]:
        lines = []
        cumulative = 0
        for bound, n in zip((*self.bounds, None), self.counts, strict=True):
            cumulative += n
            le = "+Inf" if bound is None else _number(bound)
            lines.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
        lines.append(f"{name}_sum {_number(self.sum)}")
        lines.append(f"{name}_count {self.count}")
        return lines


class XdsMetrics:
    """Plain counters, updated by the server on the event loop, rendered on demand."""

    def __init__(self) -> None:
        self.connected = 0
        self.pushes: Counter[str] = Counter()
        self.rejects: Counter[str] = Counter()
        self.expired_nonces: Counter[str] = Counter()
        self.generate_errors: Counter[str] = Counter()
        self.refused_streams: Counter[str] = Counter()
        self.unknown_type_requests = 0
        self.convergence = Histogram(CONVERGENCE_BUCKETS)

    def render(self, *, push_triggers: Mapping[str, int]) -> str:
        out: list[str] = []
        _family(out, "pilot_xds", "gauge", "Connected proxies (ADS streams).")
        out.append(f"pilot_xds {self.connected}")
        for name, help_, label, values in (
            ("pilot_xds_pushes", "Responses sent, by type.", "type", self.pushes),
            ("pilot_total_xds_rejects", "NACKs received, by type.", "type", self.rejects),
            (
                "pilot_xds_expired_nonce",
                "Requests answering a superseded response, by type.",
                "type",
                self.expired_nonces,
            ),
            ("pilot_push_triggers", "Push requests, by reason.", "type", push_triggers),
            (
                "meshlet_xds_generate_errors",
                "Generators that raised, by type.",
                "type",
                self.generate_errors,
            ),
            (
                "meshlet_xds_refused_streams",
                "Streams ended for a malformed request, by gRPC status.",
                "code",
                self.refused_streams,
            ),
        ):
            _family(out, name, "counter", help_)
            out.extend(_labelled(name, label, values.items()))
        _family(
            out,
            "meshlet_xds_unknown_type_requests",
            "counter",
            "Requests for type URLs that no generator serves.",
        )
        out.append(f"meshlet_xds_unknown_type_requests {self.unknown_type_requests}")
        _family(
            out,
            "pilot_proxy_convergence_time",
            "histogram",
            "Seconds from a change being enqueued to its push reaching a proxy.",
        )
        out.extend(self.convergence.render("pilot_proxy_convergence_time"))
        return "\n".join(out) + "\n"

    def __repr__(self) -> str:
        return f"<XdsMetrics connected={self.connected} pushes={sum(self.pushes.values())}>"


def _family(out: list[str], name: str, kind: str, help_: str) -> None:
    out.append(f"# HELP {name} {help_}")
    out.append(f"# TYPE {name} {kind}")


def _labelled(name: str, label: str, items: Iterable[tuple[str, int]]) -> list[str]:
    return [f'{name}{{{label}="{_escape(value)}"}} {n}' for value, n in sorted(items)]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return repr(float(value))
