"""Debounced pushes without sockets: a fake clock, merged requests, push selection."""

from __future__ import annotations

import asyncio
import threading

from hypothesis import given
from hypothesis import strategies as st

from meshlet.control.xds.connection import Connection
from meshlet.control.xds.generator import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    ProxyInfo,
)
from meshlet.control.xds.push import (
    DEBOUNCE_MAX,
    DEBOUNCE_QUIET,
    EVERY_PROXY,
    MAX_AFFECTED,
    ConfigKey,
    Debouncer,
    PushQueue,
    PushRequest,
    ordered_types,
    push_types,
    select_push,
)

ALL_TYPES = [LISTENER_TYPE, ROUTE_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def vs(name: str) -> ConfigKey:
    return ConfigKey(kind="VirtualService", name=name, namespace="default")


def debouncer() -> tuple[Debouncer, FakeClock]:
    clock = FakeClock()
    return Debouncer(clock=clock), clock


# -- debounce ---------------------------------------------------------------------------------


def test_istiod_debounce_constants() -> None:
    assert (DEBOUNCE_QUIET, DEBOUNCE_MAX) == (0.100, 1.0)


def test_a_single_change_is_released_after_the_quiet_period_and_not_before() -> None:
    d, clock = debouncer()
    d.add(PushRequest(affected=frozenset({vs("a")}), reason="config"))
    assert d.deadline() == clock.now + DEBOUNCE_QUIET
    clock.advance(0.099)
    assert d.take_due() is None
    clock.advance(0.001)
    released = d.take_due()
    assert released is not None
    assert released.affected == {vs("a")}
    assert d.take_due() is None
    assert d.deadline() is None


def test_a_burst_is_one_push_released_a_quiet_period_after_its_last_change() -> None:
    d, clock = debouncer()
    for name in ("a", "b", "c"):
        d.add(PushRequest(affected=frozenset({vs(name)}), reason="config"))
        clock.advance(0.05)
        assert d.take_due() is None
    last = clock.now - 0.05
    assert d.deadline() == last + DEBOUNCE_QUIET
    clock.advance(0.04)
    assert d.take_due() is None
    clock.advance(0.02)
    released = d.take_due()
    assert released is not None
    assert released.affected == {vs("a"), vs("b"), vs("c")}


def test_a_steady_trickle_is_still_pushed_once_the_oldest_change_waited_the_maximum() -> None:
    d, clock = debouncer()
    start = clock.now
    released = None
    while released is None:
        d.add(PushRequest(reason="config"))
        clock.advance(0.05)  # always inside the quiet period
        released = d.take_due()
    assert start + DEBOUNCE_MAX <= clock.now < start + DEBOUNCE_MAX + 0.05
    assert released.start == start


def test_the_queue_stamps_each_request_with_when_it_was_enqueued() -> None:
    d, clock = debouncer()
    d.add(PushRequest())
    clock.advance(0.05)
    d.add(PushRequest())
    clock.advance(0.2)
    released = d.take_due()
    assert released is not None
    assert released.start == 1000.0


@given(
    gaps=st.lists(st.floats(min_value=0.0, max_value=0.3), min_size=1, max_size=60),
)
def test_every_change_is_released_once_and_never_later_than_the_debounce_allows(
    gaps: list[float],
) -> None:
    """Simulate arrivals at the given gaps, polling the debouncer at every instant it asks."""
    d, clock = debouncer()
    released: list[PushRequest] = []
    first_pending_since: float | None = None
    for i, gap in enumerate(gaps):
        target = clock.now + gap
        while (deadline := d.deadline()) is not None and deadline <= target:
            clock.now = deadline
            request = d.take_due()
            assert request is not None
            assert first_pending_since is not None
            assert clock.now - first_pending_since <= DEBOUNCE_MAX + 1e-9
            released.append(request)
            first_pending_since = None
        clock.now = target
        d.add(PushRequest(affected=frozenset({vs(str(i))}), reason="config"))
        if first_pending_since is None:
            first_pending_since = clock.now
    while (deadline := d.deadline()) is not None:
        clock.now = deadline
        request = d.take_due()
        assert request is not None
        released.append(request)
    seen = [key for request in released for key in sorted(request.affected or ())]
    assert sorted(seen) == sorted(vs(str(i)) for i in range(len(gaps)))


# -- merging ----------------------------------------------------------------------------------


def test_merging_is_full_if_either_is_and_unions_what_changed() -> None:
    eds = PushRequest.endpoints([vs("a")])
    full = PushRequest(full=True, affected=frozenset({vs("b")}), reason="config", start=5.0)
    merged = eds.merge(full)
    assert merged.full
    assert merged.affected == {vs("a"), vs("b")}
    assert merged.reason == "config,endpoint"
    assert merged.start == 5.0
    assert not PushRequest.endpoints([vs("a")]).merge(PushRequest.endpoints([vs("c")])).full


def test_unknown_change_absorbs_known_ones() -> None:
    known = PushRequest(affected=frozenset({vs("a")}))
    assert known.merge(PushRequest(affected=None)).affected is None
    assert PushRequest(affected=None).merge(known).affected is None


def test_a_merged_request_naming_too_much_names_everything() -> None:
    big = PushRequest(affected=frozenset(vs(str(i)) for i in range(MAX_AFFECTED)))
    assert big.merge(PushRequest(affected=frozenset({vs("one more")}))).affected is None


def test_a_busy_connection_keeps_one_merged_pending_push() -> None:
    conn = Connection(1, types=ALL_TYPES)
    for name in ("a", "b", "c"):
        conn.enqueue_push(PushRequest.endpoints([vs(name)]))
    assert conn.pending_push is not None
    assert conn.pending_push.affected == {vs("a"), vs("b"), vs("c")}
    assert not conn.pending_push.full


# -- selection --------------------------------------------------------------------------------


def test_push_order_is_clusters_then_endpoints_then_listeners_then_routes() -> None:
    other = "type.googleapis.com/example.Thing"
    assert ordered_types([other, ROUTE_TYPE, LISTENER_TYPE, ENDPOINT_TYPE, CLUSTER_TYPE]) == [
        CLUSTER_TYPE,
        ENDPOINT_TYPE,
        LISTENER_TYPE,
        ROUTE_TYPE,
        other,
    ]


def test_a_full_push_regenerates_every_subscribed_type_in_push_order() -> None:
    assert push_types(PushRequest(), [ROUTE_TYPE, LISTENER_TYPE]) == [LISTENER_TYPE, ROUTE_TYPE]
    assert push_types(PushRequest(), ALL_TYPES) == [
        CLUSTER_TYPE,
        ENDPOINT_TYPE,
        LISTENER_TYPE,
        ROUTE_TYPE,
    ]


def test_an_endpoints_only_push_regenerates_eds_only() -> None:
    assert push_types(PushRequest.endpoints(), ALL_TYPES) == [ENDPOINT_TYPE]
    assert push_types(PushRequest.endpoints(), [LISTENER_TYPE, ROUTE_TYPE]) == []


class OnlyNamespace:
    """A scope in which a change reaches the proxies of its own namespace only."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def prepare_push(self, request: PushRequest) -> None:
        return None

    def affects(self, proxy: ProxyInfo, request: PushRequest) -> bool:
        self.asked.append(proxy.id)
        assert request.affected is not None
        return any(key.namespace == proxy.namespace for key in request.affected)


def test_a_push_reaches_only_the_proxies_its_change_affects() -> None:
    scope = OnlyNamespace()
    default = ProxyInfo.parse_id("sidecar~10.0.0.1~a-1.default~default.svc.cluster.local")
    other = ProxyInfo.parse_id("sidecar~10.0.0.2~b-1.other~other.svc.cluster.local")
    request = PushRequest(affected=frozenset({vs("reviews")}), reason="config")
    assert select_push(request, default, ALL_TYPES, scope) == [
        CLUSTER_TYPE,
        ENDPOINT_TYPE,
        LISTENER_TYPE,
        ROUTE_TYPE,
    ]
    assert select_push(request, other, ALL_TYPES, scope) == []


def test_an_unknown_change_reaches_every_proxy_without_asking_the_scope() -> None:
    scope = OnlyNamespace()
    other = ProxyInfo.parse_id("sidecar~10.0.0.2~b-1.other~other.svc.cluster.local")
    assert select_push(PushRequest(affected=None), other, [LISTENER_TYPE], scope) == [LISTENER_TYPE]
    assert scope.asked == []


def test_a_proxy_subscribed_to_nothing_a_push_regenerates_is_not_asked_about() -> None:
    scope = OnlyNamespace()
    proxy = ProxyInfo.parse_id("sidecar~10.0.0.1~a-1.default~default.svc.cluster.local")
    request = PushRequest.endpoints([vs("reviews")])
    assert select_push(request, proxy, [LISTENER_TYPE], scope) == []
    assert scope.asked == []
    assert select_push(request, proxy, [LISTENER_TYPE], EVERY_PROXY) == []


# -- the queue on an event loop ---------------------------------------------------------------


def test_the_queue_releases_changes_enqueued_from_another_thread_as_one_push() -> None:
    async def scenario() -> list[PushRequest]:
        queue = PushQueue(quiet=0.02, max_delay=0.5)
        released: list[PushRequest] = []
        got = asyncio.Event()

        def sink(request: PushRequest) -> None:
            released.append(request)
            got.set()

        runner = asyncio.create_task(queue.run(sink))
        await asyncio.sleep(0)

        def store_writer() -> None:
            for name in ("a", "b", "c"):
                queue.enqueue(PushRequest(affected=frozenset({vs(name)}), reason="config"))

        thread = threading.Thread(target=store_writer)
        thread.start()
        thread.join()
        await asyncio.wait_for(got.wait(), 2)
        await asyncio.sleep(0.05)  # nothing more follows
        runner.cancel()
        assert queue.triggers() == {"config": 3}
        return released

    released = asyncio.run(scenario())
    assert len(released) == 1
    assert released[0].affected == {vs("a"), vs("b"), vs("c")}


def test_the_queue_survives_a_sink_that_raises() -> None:
    async def scenario() -> int:
        queue = PushQueue(quiet=0.0, max_delay=0.0)
        calls = 0

        def sink(request: PushRequest) -> None:
            nonlocal calls
            calls += 1
            raise RuntimeError("boom")

        queue.enqueue(PushRequest())  # before the queue runs: kept
        runner = asyncio.create_task(queue.run(sink))
        await asyncio.sleep(0.01)
        queue.enqueue(PushRequest())
        await asyncio.sleep(0.01)
        runner.cancel()
        return calls

    assert asyncio.run(scenario()) == 2
