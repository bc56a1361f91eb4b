"""The embedded trace store: the spans the OTLP receiver decoded, grouped by trace, bounded.

Rules it keeps:

* Bounded twice: at most ``max_traces`` traces and ``max_spans`` spans in all. Past either
  bound, whole traces go, the one first seen longest ago first (as Jaeger's in-memory store
  evicts), so a trace on screen is never half gone while newer ones are kept.
* A span sent twice (an exporter's retry) is kept once: spans are keyed by span id per trace.
* ``search`` sorts newest first by each trace's start; ``service`` matches any span's
  ``service.name``, so a trace is found from every service it crossed.

Pure and synchronous: the receiver adds, the dashboard reads, both on one event loop.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_MAX_TRACES = 10_000
DEFAULT_MAX_SPANS = 200_000


@dataclass(frozen=True, slots=True, kw_only=True)
class Span:
    """One span, as the dashboard shows it (ids in lower-case hex, times in unix ns)."""

    trace_id: str
    span_id: str
    parent_span_id: str = ""  # "" for a root
    name: str = ""
    service: str = ""  # the resource's service.name
    kind: str = "INTERNAL"  # SERVER, CLIENT, INTERNAL, PRODUCER, CONSUMER, UNSPECIFIED
    start_ns: int = 0
    end_ns: int = 0
    error: bool = False
    attributes: Mapping[str, Any] = field(default_factory=dict)

    @property
    def duration_ms(self) -> float:
        return max(0, self.end_ns - self.start_ns) / 1e6

    def as_dict(self) -> dict[str, Any]:
        return {
            "span_id": self.span_id,
            "parent_span_id": self.parent_span_id,
            "name": self.name,
            "service": self.service,
            "kind": self.kind,
            "start_unix_ms": self.start_ns / 1e6,
            "duration_ms": self.duration_ms,
            "error": self.error,
            "attributes": dict(self.attributes),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class TraceSummary:
    trace_id: str
    root_service: str
    root_name: str
    start_ns: int
    duration_ms: float
    span_count: int
    services: tuple[str, ...]
    error: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "trace_id": self.trace_id,
            "root_service": self.root_service,
            "root_name": self.root_name,
            "start_unix_ms": self.start_ns / 1e6,
            "duration_ms": self.duration_ms,
            "span_count": self.span_count,
            "services": list(self.services),
            "error": self.error,
        }


def summarize(trace_id: str, spans: Iterable[Span]) -> TraceSummary:
    """A trace's row: its root is the earliest span whose parent is not in the trace (a
    trace whose first hop was not sampled, or not yet exported, still has a root)."""
    spans = sorted(spans, key=lambda s: (s.start_ns, s.span_id))
    ids = {s.span_id for s in spans}
    roots = [s for s in spans if not s.parent_span_id or s.parent_span_id not in ids]
    root = roots[0] if roots else spans[0]
    start = min(s.start_ns for s in spans)
    end = max(s.end_ns for s in spans)
    return TraceSummary(
        trace_id=trace_id,
        root_service=root.service,
        root_name=root.name,
        start_ns=start,
        duration_ms=max(0, end - start) / 1e6,
        span_count=len(spans),
        services=tuple(sorted({s.service for s in spans if s.service})),
        error=any(s.error for s in spans),
    )


class TraceStore:
    """Traces by id, oldest first; see the module docstring for the rules."""

    def __init__(
        self, *, max_traces: int = DEFAULT_MAX_TRACES, max_spans: int = DEFAULT_MAX_SPANS
    ) -> None:
        if max_traces < 1 or max_spans < 1:
            raise ValueError("max_traces and max_spans must be at least 1")
        self.max_traces = max_traces
        self.max_spans = max_spans
        self._traces: OrderedDict[str, dict[str, Span]] = OrderedDict()
        self._spans = 0
        self.evicted_traces = 0

    def __repr__(self) -> str:
        return f"<TraceStore [{len(self._traces)} traces, {self._spans} spans]>"

    @property
    def trace_count(self) -> int:
        return len(self._traces)

    @property
    def span_count(self) -> int:
        return self._spans

    def add(self, spans: Iterable[Span]) -> int:
        """Store ``spans``; how many were new."""
        added = 0
        for span in spans:
            trace = self._traces.get(span.trace_id)
            if trace is None:
                trace = self._traces[span.trace_id] = {}
            if span.span_id not in trace:
                self._spans += 1
                added += 1
            trace[span.span_id] = span
        self._evict()
        return added

    def _evict(self) -> None:
        while self._traces and (
            len(self._traces) > self.max_traces or self._spans > self.max_spans
        ):
            _, spans = self._traces.popitem(last=False)
            self._spans -= len(spans)
            self.evicted_traces += 1

    def get(self, trace_id: str) -> list[Span] | None:
        """The trace's spans sorted by start, or None if it is not (or no longer) here."""
        trace = self._traces.get(trace_id.lower())
        if trace is None:
            return None
        return sorted(trace.values(), key=lambda s: (s.start_ns, s.span_id))

    def search(
        self,
        *,
        service: str = "",
        min_duration_ms: float = 0.0,
        errors: bool = False,
        limit: int = 50,
    ) -> list[TraceSummary]:
        """Traces matching every given condition, newest (latest start) first."""
        found = []
        for trace_id, spans in self._traces.items():
            if service and not any(s.service == service for s in spans.values()):
                continue
            summary = summarize(trace_id, spans.values())
            if summary.duration_ms < min_duration_ms or (errors and not summary.error):
                continue
            found.append(summary)
        found.sort(key=lambda t: (t.start_ns, t.trace_id), reverse=True)
        return found[: max(0, limit)]
