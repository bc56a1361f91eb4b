"""Load balancers: config compilation, priority load and panic, and each policy's picks.

Envoy references: docs intro/arch_overview/upstream/load_balancing/{load_balancers,priority,
panic_threshold}.rst, cluster.proto (LbPolicy and the *_lb_config messages), and
source/extensions/load_balancing_policies/common/load_balancer_impl.cc.
"""

from __future__ import annotations

import itertools
import random
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Sequence

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlet.errors import ConfigError
from meshlet.proxy.upstream.host import NO_CONTEXT, Host, LbContext
from meshlet.proxy.upstream.lb import (
    MAX_RING_SIZE,
    NO_HOST,
    LbConfig,
    LeastRequest,
    Maglev,
    Policy,
    PriorityBalancer,
    RingHash,
    RoundRobin,
    WeightedLeastRequest,
    WeightedRoundRobin,
    build_load_balancer,
    compile_lb_config,
    priority_load,
)

Cluster = cluster_pb2.Cluster
PATH = "static_resources.clusters[1]"


def hosts_of(n: int, *, weights: Sequence[int] | None = None, priority: int = 0) -> list[Host]:
    return [
        Host(
            f"10.{priority}.{i // 250}.{i % 250}",
            8080,
            weight=weights[i] if weights else 1,
            priority=priority,
        )
        for i in range(n)
    ]


def picks(lb: object, n: int, ctx: LbContext = NO_CONTEXT) -> Counter[Host]:
    choose = lb.choose  # type: ignore[attr-defined]
    return Counter(choose(ctx) for _ in range(n))


def key(i: int) -> LbContext:
    return LbContext(hash_key=random.Random(i).getrandbits(64))


# -- compile_lb_config ------------------------------------------------------------------------


def test_defaults_are_envoys() -> None:
    # cluster.proto: ROUND_ROBIN default; choice_count 2; bias 1.0; ring 1024..8M; maglev
    # 65537; load_balancing/panic_threshold.rst: healthy_panic_threshold 50 %.
    config = compile_lb_config(Cluster(name="c"), PATH)
    assert config == LbConfig()
    assert config.policy is Policy.ROUND_ROBIN
    assert (config.choice_count, config.active_request_bias) == (2, 1.0)
    assert (config.minimum_ring_size, config.maximum_ring_size) == (1024, 8_388_608)
    assert (config.table_size, config.healthy_panic_threshold) == (65537, 50.0)


def test_unsupported_policy_is_refused_by_field_path_with_the_supported_list() -> None:
    # cluster.proto LbPolicy: LOAD_BALANCING_POLICY_CONFIG is not ours.
    policy = Cluster.LOAD_BALANCING_POLICY_CONFIG
    with pytest.raises(ConfigError) as e:
        compile_lb_config(Cluster(name="c", lb_policy=policy), PATH)
    assert str(e.value) == (
        "static_resources.clusters[1].lb_policy: LOAD_BALANCING_POLICY_CONFIG is not supported "
        "(supported: ROUND_ROBIN, LEAST_REQUEST, RANDOM, RING_HASH, MAGLEV, CLUSTER_PROVIDED)"
    )


def test_policy_options_are_read() -> None:
    cluster = Cluster(name="c", lb_policy=Cluster.LEAST_REQUEST)
    cluster.least_request_lb_config.choice_count.value = 3
    cluster.least_request_lb_config.active_request_bias.default_value = 0.5
    cluster.least_request_lb_config.active_request_bias.runtime_key = "lr.bias"
    cluster.common_lb_config.healthy_panic_threshold.value = 25.0
    config = compile_lb_config(cluster, PATH)
    assert (config.policy, config.choice_count, config.active_request_bias) == (
        Policy.LEAST_REQUEST,
        3,
        0.5,
    )
    assert config.healthy_panic_threshold == 25.0


def _inverted_ring_sizes(c: cluster_pb2.Cluster) -> None:
    c.ring_hash_lb_config.minimum_ring_size.value = 4096
    c.ring_hash_lb_config.maximum_ring_size.value = 2048


@pytest.mark.parametrize(
    ("setup", "where"),
    [
        (
            lambda c: c.least_request_lb_config.slow_start_config.SetInParent(),
            "least_request_lb_config.slow_start_config: is not supported by meshlet",
        ),
        (
            lambda c: setattr(c.least_request_lb_config.choice_count, "value", 1),
            "least_request_lb_config.choice_count: must be at least 2",
        ),
        (
            lambda c: c.common_lb_config.zone_aware_lb_config.SetInParent(),
            "common_lb_config.zone_aware_lb_config: is not supported by meshlet",
        ),
        (
            lambda c: c.common_lb_config.locality_weighted_lb_config.SetInParent(),
            "common_lb_config.locality_weighted_lb_config: is not supported by meshlet",
        ),
        (
            lambda c: setattr(
                c.ring_hash_lb_config, "hash_function", Cluster.RingHashLbConfig.MURMUR_HASH_2
            ),
            "ring_hash_lb_config.hash_function: MURMUR_HASH_2 is not supported "
            "(supported: XX_HASH)",
        ),
        (
            _inverted_ring_sizes,
            "ring_hash_lb_config.minimum_ring_size: (4096) must not exceed "
            "maximum_ring_size (2048)",
        ),
        (
            lambda c: setattr(c.ring_hash_lb_config.maximum_ring_size, "value", MAX_RING_SIZE + 1),
            "ring_hash_lb_config.maximum_ring_size: must be between 1 and 8388608, got 8388609",
        ),
        (
            lambda c: setattr(c.maglev_lb_config.table_size, "value", 65536),
            "maglev_lb_config.table_size: must be a prime number not above 5000011, got 65536",
        ),
        (
            lambda c: setattr(c.common_lb_config.healthy_panic_threshold, "value", 101.0),
            "common_lb_config.healthy_panic_threshold.value: must be a percentage "
            "between 0 and 100, got 101.0",
        ),
    ],
)
def test_unsupported_or_invalid_options_are_refused_by_field_path(
    setup: Callable[[cluster_pb2.Cluster], object], where: str
) -> None:
    # cluster.proto validation rules (choice_count >= 2, ring sizes <= 8M, prime table
    # <= 5000011, Percent in [0, 100]); everything meshlet does not implement is refused.
    cluster = Cluster(name="c")
    setup(cluster)
    with pytest.raises(ConfigError) as e:
        compile_lb_config(cluster, PATH)
    assert str(e.value) == f"{PATH}.{where}"


def test_a_prime_maglev_table_size_is_accepted() -> None:
    cluster = Cluster(name="c", lb_policy=Cluster.MAGLEV)
    cluster.maglev_lb_config.table_size.value = 251
    assert compile_lb_config(cluster, PATH).table_size == 251


# -- priority load and panic ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("p0", "p1", "loads"),
    [
        (100, 100, (100, 0)),
        (72, 100, (100, 0)),
        (71, 100, (99, 1)),
        (50, 100, (70, 30)),
        (25, 100, (35, 65)),
        (0, 100, (0, 100)),
    ],
)
def test_traffic_spills_to_the_next_priority_by_overprovisioned_health(
    p0: int, p1: int, loads: tuple[int, int]
) -> None:
    # load_balancing/priority.rst, the table of P0/P1 health vs traffic (factor 1.4).
    result = priority_load([(p0, 100), (p1, 100)])
    assert result.loads == loads
    assert result.panic == (False, False)


@pytest.mark.parametrize(
    ("p0", "p1", "loads", "panic"),
    [
        (72, 72, (100, 0), (False, False)),
        (71, 71, (99, 1), (False, False)),
        (50, 60, (70, 30), (False, False)),
        (25, 100, (35, 65), (False, False)),
        (25, 25, (50, 50), (True, True)),
        # The doc's table says 7/93; load_balancer_impl.cc's integer arithmetic gives the
        # rounding leftover to the first available priority: 8/92. We follow the code.
        (5, 65, (8, 92), (True, False)),
    ],
)
def test_panic_is_per_priority_and_only_when_total_health_is_below_100(
    p0: int, p1: int, loads: tuple[int, int], panic: tuple[bool, bool]
) -> None:
    # load_balancing/panic_threshold.rst, the P0/P1 table (threshold 50 %).
    result = priority_load([(p0, 100), (p1, 100)], panic_threshold=50)
    assert (result.loads, result.panic) == (loads, panic)


def test_total_panic_spreads_load_by_host_count() -> None:
    # load_balancer_impl.cc recalculateLoadInTotalPanic: 100 * hosts / total hosts.
    result = priority_load([(0, 1), (0, 3)], panic_threshold=50)
    assert result.loads == (25, 75)
    assert result.panic == (True, True)


def test_panic_threshold_zero_disables_panic() -> None:
    # panic_threshold.rst: "0% disables panic mode" -- no healthy host, no host.
    result = priority_load([(0, 4)], panic_threshold=0)
    assert (result.loads, result.panic) == ((100,), (False,))


@given(
    levels=st.lists(
        st.integers(min_value=0, max_value=20).flatmap(
            lambda total: st.tuples(st.integers(min_value=0, max_value=total), st.just(total))
        ),
        min_size=1,
        max_size=5,
    ),
    threshold=st.floats(min_value=0, max_value=100),
)
def test_priority_loads_always_sum_to_100(levels: list[tuple[int, int]], threshold: float) -> None:
    # load_balancer_impl.cc asserts the loads add up to 100 in every case.
    result = priority_load(levels, panic_threshold=threshold)
    assert sum(result.loads) == 100
    assert all(load >= 0 for load in result.loads)
    health = sum(min(100, 140 * h // t) if t else 0 for h, t in levels)
    if health >= 100:
        assert not any(result.panic)


def test_balancer_uses_priority_1_when_priority_0_is_all_unhealthy() -> None:
    p0 = hosts_of(3, priority=0)
    p1 = hosts_of(2, priority=1)
    for h in p0:
        h.failed_outlier = True
    lb = build_load_balancer(LbConfig(), p0 + p1, random.Random(1))
    assert set(picks(lb, 100)) == set(p1)


def test_balancer_rolls_priorities_by_load() -> None:
    p0 = hosts_of(2, priority=0)  # one of two healthy: health 70 -> 70 % / 30 %
    p0[0].failed_active_hc = True
    p1 = hosts_of(2, priority=1)
    lb = build_load_balancer(LbConfig(), p0 + p1, random.Random(7))
    assert isinstance(lb, PriorityBalancer)
    counts = picks(lb, 10_000)
    assert p0[0] not in counts
    assert 0.67 < counts[p0[1]] / 10_000 < 0.73


def test_a_priority_in_panic_balances_across_all_its_hosts() -> None:
    # panic_threshold.rst: below the threshold, all hosts of the priority, ignoring health.
    hosts = hosts_of(5)
    for h in hosts[:3]:
        h.failed_outlier = True  # 40 % healthy < 50 %
    lb = build_load_balancer(LbConfig(), hosts, random.Random(1))
    assert set(picks(lb, 50)) == set(hosts)


def test_no_healthy_host_and_panic_disabled_means_no_host() -> None:
    hosts = hosts_of(3)
    for h in hosts:
        h.failed_active_hc = True
    lb = build_load_balancer(LbConfig(healthy_panic_threshold=0), hosts, random.Random(1))
    assert lb.choose(NO_CONTEXT) is None


def test_no_hosts_means_no_host() -> None:
    assert build_load_balancer(LbConfig(), [], random.Random(1)) is NO_HOST
    assert NO_HOST.choose(NO_CONTEXT) is None


def test_the_hash_key_chooses_the_priority_deterministically() -> None:
    # load_balancer_impl.cc choosePriority(hash): the priority roll is hash % 100 + 1.
    p0 = hosts_of(2, priority=0)
    p0[0].failed_active_hc = True
    p1 = hosts_of(2, priority=1)
    config = LbConfig(policy=Policy.RING_HASH)
    lb = build_load_balancer(config, p0 + p1, random.Random(1))
    assert lb.choose(LbContext(hash_key=69)) in p0  # roll 70 <= 70
    assert lb.choose(LbContext(hash_key=70)) in p1  # roll 71


def test_non_hashing_policies_roll_priorities_at_random_even_with_a_hash_key() -> None:
    # load_balancer_impl.cc: only the hashing balancers choose the priority from the hash.
    p0 = hosts_of(2, priority=0)
    p0[0].failed_active_hc = True
    p1 = hosts_of(2, priority=1)
    lb = build_load_balancer(LbConfig(), p0 + p1, random.Random(1))
    counts = picks(lb, 1000, LbContext(hash_key=69))
    assert counts[p0[1]] > 500 and counts[p1[0]] + counts[p1[1]] > 200


# -- round robin ------------------------------------------------------------------------------


@given(
    n=st.integers(min_value=1, max_value=30),
    rounds=st.integers(min_value=1, max_value=4),
    seed=st.integers(min_value=0),
)
def test_round_robin_visits_every_host_once_per_round(n: int, rounds: int, seed: int) -> None:
    # load_balancers.rst: ROUND_ROBIN "each available upstream host is selected in round
    # robin order"; equal weights take the plain rotation.
    hosts = hosts_of(n)
    lb = build_load_balancer(LbConfig(), hosts, random.Random(seed))
    assert isinstance(lb, RoundRobin)
    counts = picks(lb, n * rounds)
    assert all(counts[h] == rounds for h in hosts)


@given(
    weights=st.lists(st.integers(min_value=1, max_value=20), min_size=2, max_size=8),
    cycles=st.integers(min_value=1, max_value=3),
    seed=st.integers(min_value=0),
)
def test_weighted_round_robin_follows_weights_within_one_pick(
    weights: list[int], cycles: int, seed: int
) -> None:
    # load_balancers.rst: weighted round robin when weights differ (Envoy's EDF scheduler).
    hosts = hosts_of(len(weights), weights=weights)
    lb = build_load_balancer(LbConfig(), hosts, random.Random(seed))
    counts = picks(lb, sum(weights) * cycles)
    for h in hosts:
        assert abs(counts[h] - h.weight * cycles) <= 1


def test_weighted_round_robin_is_smooth_not_bursty() -> None:
    # EDF interleaves: a 3:1 pair never sends the light host twice in a row.
    heavy, light = hosts_of(2, weights=[3, 1])
    lb = WeightedRoundRobin([heavy, light], random.Random(3))
    seq = [lb.choose(NO_CONTEXT) for _ in range(40)]
    assert all(not (a is light and b is light) for a, b in itertools.pairwise(seq))
    assert seq.count(light) == 10


# -- least request ----------------------------------------------------------------------------


def test_least_request_prefers_the_host_with_fewer_active_requests() -> None:
    # load_balancers.rst: P2C -- two random hosts, the one with fewer active requests wins;
    # the busy one of two is chosen only when both samples land on it (1/4).
    busy, idle = hosts_of(2)
    busy.rq_active = 5
    lb = build_load_balancer(LbConfig(policy=Policy.LEAST_REQUEST), [busy, idle], random.Random(11))
    assert isinstance(lb, LeastRequest)
    share = picks(lb, 20_000)[busy] / 20_000
    assert 0.23 < share < 0.27


def test_least_request_with_many_choices_nearly_always_finds_the_least_loaded() -> None:
    hosts = hosts_of(4)
    for i, h in enumerate(hosts):
        h.rq_active = 10 - i  # hosts[3] is the least loaded
    lb = build_load_balancer(
        LbConfig(policy=Policy.LEAST_REQUEST, choice_count=20), hosts, random.Random(5)
    )
    assert picks(lb, 1000)[hosts[3]] > 990


def test_weighted_least_request_divides_weight_by_active_requests() -> None:
    # load_balancers.rst: weight / (active + 1) ^ active_request_bias, in an EDF schedule.
    a, b = hosts_of(2, weights=[2, 1])
    lb = build_load_balancer(LbConfig(policy=Policy.LEAST_REQUEST), [a, b], random.Random(1))
    assert isinstance(lb, WeightedLeastRequest)
    counts = picks(lb, 3000)
    assert abs(counts[a] - 2000) <= 2  # idle hosts: plain weights
    a.rq_active = 3  # effective 2/4 = 0.5 vs 1
    counts = picks(lb, 3000)
    assert abs(counts[a] - 1000) <= 3


def test_weighted_least_request_with_bias_zero_ignores_active_requests() -> None:
    a, b = hosts_of(2, weights=[2, 1])
    a.rq_active = 100
    lb = WeightedLeastRequest([a, b], random.Random(1), bias=0.0)
    assert abs(picks(lb, 3000)[a] - 2000) <= 2


# -- random -----------------------------------------------------------------------------------


def test_random_is_uniform_and_ignores_weights() -> None:
    # load_balancers.rst: RANDOM "selects a random available host".
    hosts = hosts_of(4, weights=[1, 1, 1, 10])
    lb = build_load_balancer(LbConfig(policy=Policy.RANDOM), hosts, random.Random(2))
    counts = picks(lb, 40_000)
    assert all(9_400 < counts[h] < 10_600 for h in hosts)


# -- ring hash --------------------------------------------------------------------------------


def test_ring_hash_maps_a_key_to_the_same_host_in_every_worker() -> None:
    # load_balancers.rst: consistent hashing; host and key hashes are process-independent
    # (stable_hash), so two workers built with different RNGs agree.
    hosts = hosts_of(7)
    a = build_load_balancer(LbConfig(policy=Policy.RING_HASH), hosts, random.Random(1))
    b = build_load_balancer(LbConfig(policy=Policy.RING_HASH), list(hosts), random.Random(2))
    for i in range(500):
        assert a.choose(key(i)) is b.choose(key(i))


def test_ring_hash_ring_size_follows_minimum_and_maximum() -> None:
    # cluster.proto RingHashLbConfig: the least-weighted host gets ceil(share * minimum) points
    # and the ring never exceeds maximum_ring_size.
    hosts = hosts_of(10)
    assert RingHash(hosts, random.Random(1), 1024, MAX_RING_SIZE).size == 1030
    assert RingHash(hosts, random.Random(1), 1024, 500).size == 500
    assert RingHash(hosts_of(1), random.Random(1), 16, MAX_RING_SIZE).size == 16


def test_ring_hash_gives_points_in_proportion_to_weight() -> None:
    hosts = hosts_of(3, weights=[1, 2, 5])
    lb = RingHash(hosts, random.Random(1), 1024, MAX_RING_SIZE)
    points = Counter(lb._ring)
    assert [points[h] for h in hosts] == [128, 256, 640]  # ring of 1024, shares 1:2:5


@settings(max_examples=25, deadline=None)
@given(n=st.integers(min_value=3, max_value=25), removed=st.integers(min_value=0))
def test_ring_hash_removing_a_host_keeps_most_other_keys_in_place(n: int, removed: int) -> None:
    # Consistent hashing: keys of the removed host move; others mostly stay (the per-host
    # point count is re-derived from the minimum ring size, so a few move, as in Envoy).
    hosts = hosts_of(n)
    gone = hosts[removed % n]
    before = RingHash(hosts, random.Random(1), 1024, MAX_RING_SIZE)
    after = RingHash([h for h in hosts if h is not gone], random.Random(1), 1024, MAX_RING_SIZE)
    kept = moved = 0
    for i in range(2000):
        host = before.choose(key(i))
        if host is gone:
            assert after.choose(key(i)) is not gone
            continue
        if after.choose(key(i)) is host:
            kept += 1
        else:
            moved += 1
    assert moved <= 0.2 * (kept + moved)


def test_ring_hash_without_a_hash_key_picks_at_random() -> None:
    # route_components.proto hash_policy: no hash => the hashing balancer picks randomly.
    hosts = hosts_of(3)
    lb = build_load_balancer(LbConfig(policy=Policy.RING_HASH), hosts, random.Random(4))
    assert set(picks(lb, 200)) == set(hosts)


@given(n=st.integers(min_value=2, max_value=12), seed=st.integers(min_value=0), data=st.data())
def test_ring_hash_walks_to_the_next_distinct_host_not_excluded(
    n: int, seed: int, data: st.DataObject
) -> None:
    # retry previous_hosts predicate: Envoy's ring hash retries at the next ring entries.
    hosts = hosts_of(n)
    lb = RingHash(hosts, random.Random(1), 64, MAX_RING_SIZE)
    excluded = frozenset(data.draw(st.sets(st.sampled_from(hosts), max_size=n - 1)))
    h = random.Random(seed).getrandbits(64)
    picked = lb.choose(LbContext(hash_key=h, excluded=excluded))
    ring = lb._ring
    start = bisect_left(lb._points, h) % len(ring)  # the key's own point
    expected = next(
        ring[(start + s) % len(ring)]
        for s in range(len(ring))
        if ring[(start + s) % len(ring)] not in excluded
    )
    assert picked is expected


# -- maglev -----------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(n=st.integers(min_value=1, max_value=40))
def test_maglev_table_is_shared_evenly_between_equal_hosts(n: int) -> None:
    # Maglev (load_balancers.rst): hosts take turns claiming slots, so each equal host gets
    # floor or ceil of table_size / n.
    lb = Maglev(hosts_of(n), random.Random(1), 65537)
    assert set(lb.counts()) <= {65537 // n, -(-65537 // n)}


def test_maglev_table_is_shared_in_proportion_to_weight() -> None:
    weights = [1, 2, 3, 10]
    lb = Maglev(hosts_of(4, weights=weights), random.Random(1), 65537)
    for count, w in zip(lb.counts(), weights, strict=True):
        assert abs(count - 65537 * w / 16) < 65537 * 0.005


def test_maglev_removing_a_host_barely_disturbs_other_keys() -> None:
    hosts = hosts_of(10)
    before = Maglev(hosts, random.Random(1), 65537)
    after = Maglev(hosts[1:], random.Random(1), 65537)
    moved = sum(
        1
        for i in range(5000)
        if before.choose(key(i)) is not hosts[0]
        and before.choose(key(i)) is not after.choose(key(i))
    )
    assert moved < 50  # < 1 %


def test_maglev_maps_a_key_to_the_same_host_in_every_worker() -> None:
    hosts = hosts_of(5)
    a = build_load_balancer(LbConfig(policy=Policy.MAGLEV, table_size=251), hosts, random.Random(1))
    b = build_load_balancer(LbConfig(policy=Policy.MAGLEV, table_size=251), hosts, random.Random(9))
    assert all(a.choose(key(i)) is b.choose(key(i)) for i in range(300))


# -- excluded hosts (retry previous_hosts) ----------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    policy=st.sampled_from(list(Policy)),
    weights=st.lists(st.integers(min_value=1, max_value=5), min_size=2, max_size=8),
    seed=st.integers(min_value=0, max_value=2**32),
    data=st.data(),
)
def test_every_policy_avoids_excluded_hosts_when_another_exists(
    policy: Policy, weights: list[int], seed: int, data: st.DataObject
) -> None:
    # route_components.proto retry_host_predicate previous_hosts: "reject already attempted
    # hosts"; meshlet's balancers honour it themselves.
    hosts = hosts_of(len(weights), weights=weights)
    lb = build_load_balancer(LbConfig(policy=policy, table_size=251), hosts, random.Random(seed))
    excluded = frozenset(data.draw(st.sets(st.sampled_from(hosts), max_size=len(hosts) - 1)))
    rng = random.Random(seed)
    for _ in range(20):
        ctx = LbContext(
            hash_key=rng.getrandbits(64) if rng.random() < 0.5 else None, excluded=excluded
        )
        assert lb.choose(ctx) not in excluded


@pytest.mark.parametrize("policy", list(Policy))
def test_every_policy_still_answers_when_all_hosts_are_excluded(policy: Policy) -> None:
    # Envoy: after host_selection_retry_max_attempts the last picked host is used.
    hosts = hosts_of(3)
    lb = build_load_balancer(LbConfig(policy=policy, table_size=251), hosts, random.Random(1))
    assert lb.choose(LbContext(hash_key=5, excluded=frozenset(hosts))) in hosts


def test_an_all_excluded_priority_falls_back_to_another_priority() -> None:
    p0 = hosts_of(2, priority=0)
    p0[0].failed_active_hc = True
    p1 = hosts_of(1, priority=1)
    lb = build_load_balancer(LbConfig(), p0 + p1, random.Random(1))
    excluded = frozenset({p0[1]})
    assert all(lb.choose(LbContext(excluded=excluded)) is p1[0] for _ in range(50))
