"""The embedded trace store: bounds, eviction of the oldest traces, search, one trace."""

from __future__ import annotations

from meshlet.dashboard.traces import Span, TraceStore, summarize


def _span(
    trace: int,
    span: int,
    *,
    parent: int = 0,
    service: str = "productpage.default",
    start_ms: int = 0,
    duration_ms: int = 10,
    error: bool = False,
) -> Span:
    return Span(
        trace_id=f"{trace:032x}",
        span_id=f"{span:016x}",
        parent_span_id=f"{parent:016x}" if parent else "",
        name=f"op{span}",
        service=service,
        kind="SERVER",
        start_ns=start_ms * 1_000_000,
        end_ns=(start_ms + duration_ms) * 1_000_000,
        error=error,
    )


def test_spans_group_by_trace_and_come_back_sorted_by_start() -> None:
    store = TraceStore()
    store.add([_span(1, 2, parent=1, start_ms=5), _span(1, 1, start_ms=0), _span(2, 3)])
    spans = store.get(f"{1:032x}")
    assert spans is not None
    assert [s.span_id for s in spans] == [f"{1:016x}", f"{2:016x}"]
    assert store.trace_count == 2 and store.span_count == 3


def test_a_span_sent_twice_is_kept_once() -> None:
    store = TraceStore()
    assert store.add([_span(1, 1)]) == 1
    assert store.add([_span(1, 1)]) == 0  # an exporter's retry
    assert store.span_count == 1


def test_beyond_max_traces_the_trace_first_seen_longest_ago_goes() -> None:
    store = TraceStore(max_traces=2)
    store.add([_span(1, 1)])
    store.add([_span(2, 1)])
    store.add([_span(3, 1)])
    assert store.get(f"{1:032x}") is None
    assert store.get(f"{2:032x}") is not None and store.get(f"{3:032x}") is not None
    assert store.trace_count == 2 and store.evicted_traces == 1


def test_beyond_max_spans_whole_traces_go_oldest_first() -> None:
    store = TraceStore(max_spans=5)
    store.add([_span(1, i) for i in range(1, 4)])  # 3 spans
    store.add([_span(2, i) for i in range(1, 3)])  # 5 spans: at the bound
    assert store.trace_count == 2
    store.add([_span(3, 1)])  # 6 > 5: trace 1 (3 spans) goes, not a part of it
    assert store.get(f"{1:032x}") is None
    assert store.span_count == 3
    assert len(store.get(f"{2:032x}") or []) == 2


def test_search_is_newest_first_and_filters_by_service_duration_and_errors() -> None:
    store = TraceStore()
    store.add(
        [
            _span(1, 1, service="istio-ingressgateway.istio-system", start_ms=0),
            _span(1, 2, parent=1, service="reviews.default", start_ms=1, duration_ms=300),
            _span(2, 1, service="productpage.default", start_ms=100, duration_ms=5),
            _span(3, 1, service="productpage.default", start_ms=200, error=True),
        ]
    )
    assert [t.trace_id[-1] for t in store.search()] == ["3", "2", "1"]
    # `service` matches any span of the trace, not only its root.
    assert [t.trace_id[-1] for t in store.search(service="reviews.default")] == ["1"]
    assert [t.trace_id[-1] for t in store.search(min_duration_ms=100)] == ["1"]
    assert [t.trace_id[-1] for t in store.search(errors=True)] == ["3"]
    assert len(store.search(limit=2)) == 2


def test_a_summary_names_the_root_and_every_service() -> None:
    spans = [
        _span(1, 2, parent=1, service="reviews.default", start_ms=2, duration_ms=5, error=True),
        _span(1, 1, service="istio-ingressgateway.istio-system", start_ms=0, duration_ms=20),
    ]
    summary = summarize(f"{1:032x}", spans)
    assert summary.root_service == "istio-ingressgateway.istio-system"
    assert summary.root_name == "op1"
    assert summary.duration_ms == 20
    assert summary.span_count == 2
    assert summary.services == ("istio-ingressgateway.istio-system", "reviews.default")
    assert summary.error


def test_a_trace_whose_root_is_missing_has_its_earliest_orphan_as_root() -> None:
    spans = [_span(1, 3, parent=9, start_ms=4), _span(1, 2, parent=9, start_ms=1)]
    assert summarize(f"{1:032x}", spans).root_name == "op2"


def test_unknown_trace_is_none() -> None:
    assert TraceStore().get("0" * 32) is None
