"""Load balancers: which host of a cluster serves the next request.

Theory of operation. A cluster calls ``build_load_balancer`` whenever its membership or the
health of a host changes, and swaps the result in. The builder does all the work up front:

1. *Priority load* (Envoy ``LoadBalancerBase::recalculatePerPriorityState``): each priority
   level's health is ``min(100, 1.4 * healthy%)`` (overprovisioning factor 1.4, integer
   arithmetic as in Envoy); levels receive traffic in order until 100 % is handed out, so
   traffic spills to P1 once P0 is below ~71 % healthy.
2. *Panic* (``recalculatePerPriorityPanic``): when the levels together are below 100 % health,
   a level whose healthy share is under ``healthy_panic_threshold`` balances across all of its
   hosts, ignoring health; when every level panics, load follows host counts. A threshold of 0
   disables panic, and then no healthy host means no host (503 UH).
3. *Pickers*: for each level with load, a picker over the chosen hosts with everything it needs
   precomputed: rotation index, EDF schedule, hash ring or Maglev table.

``choose`` is then a percent roll (skipped when one level has all the load) and one picker call:
O(1) or O(log n), on the request hot path. ``LbContext.excluded`` (the retry ``previous_hosts``
predicate) is honoured when another host exists: rotating balancers move on, hashing
balancers walk the ring or table to the next host that is not excluded, and only when that
fails does a pick fall back to a linear scan (a retry, never a first attempt, pays for it).

Differences from Envoy, on purpose: RING_HASH and MAGLEV hash host keys with ``stable_hash``
(BLAKE2b), not xxHash, so rings agree across meshlet workers but not with Envoy's; locality
weighting, zone-aware routing, slow start and degraded hosts are not implemented (their
fields are refused).
"""

from __future__ import annotations

import enum
import heapq
import math
import random
from array import array
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from envoy.config.cluster.v3 import cluster_pb2

from meshlet.errors import ConfigError
from meshlet.proxy.fields import check_fields, join, uint_field
from meshlet.proxy.upstream.host import Host, LbContext, stable_hash

MAX_RING_SIZE = 8_388_608  # ring_hash_lb_config.maximum_ring_size: default and upper limit
MAX_MAGLEV_TABLE_SIZE = 5_000_011  # maglev_lb_config.table_size upper limit (proto rule)
OVERPROVISIONING_FACTOR = 140  # percent; Envoy's default (ClusterLoadAssignment.Policy)


class Policy(enum.StrEnum):
    """The ``Cluster.lb_policy`` values meshlet implements."""

    ROUND_ROBIN = "ROUND_ROBIN"
    LEAST_REQUEST = "LEAST_REQUEST"
    RANDOM = "RANDOM"
    RING_HASH = "RING_HASH"
    MAGLEV = "MAGLEV"
    CLUSTER_PROVIDED = "CLUSTER_PROVIDED"  # ORIGINAL_DST: the cluster picks the host itself


_POLICIES = {
    cluster_pb2.Cluster.ROUND_ROBIN: Policy.ROUND_ROBIN,
    cluster_pb2.Cluster.LEAST_REQUEST: Policy.LEAST_REQUEST,
    cluster_pb2.Cluster.RANDOM: Policy.RANDOM,
    cluster_pb2.Cluster.RING_HASH: Policy.RING_HASH,
    cluster_pb2.Cluster.MAGLEV: Policy.MAGLEV,
    cluster_pb2.Cluster.CLUSTER_PROVIDED: Policy.CLUSTER_PROVIDED,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class LbConfig:
    """A cluster's compiled balancing configuration (Envoy's defaults throughout)."""

    policy: Policy = Policy.ROUND_ROBIN
    choice_count: int = 2  # LEAST_REQUEST: hosts sampled per pick (P2C)
    active_request_bias: float = 1.0  # LEAST_REQUEST with unequal weights
    minimum_ring_size: int = 1024  # RING_HASH
    maximum_ring_size: int = MAX_RING_SIZE  # RING_HASH
    table_size: int = 65537  # MAGLEV, a prime
    healthy_panic_threshold: float = 50.0  # percent; 0 disables panic
    overprovisioning_factor: int = OVERPROVISIONING_FACTOR  # percent


def compile_lb_config(cluster: cluster_pb2.Cluster, path: str) -> LbConfig:
    """Read ``lb_policy`` and the per-policy option messages of ``cluster``.

    Only these fields are checked here; the cluster compiler checks the rest of the Cluster.
    Raises ``ConfigError`` naming the field for anything unsupported or invalid.
    """
    policy = _POLICIES.get(cluster.lb_policy)
    if policy is None:
        name = cluster_pb2.Cluster.LbPolicy.Name(cluster.lb_policy)
        supported = ", ".join(p.value for p in Policy)
        raise ConfigError.at(
            join(path, "lb_policy"), f"{name} is not supported (supported: {supported})"
        )
    options: dict[str, object] = {"policy": policy}

    if cluster.HasField("least_request_lb_config"):
        lr = cluster.least_request_lb_config
        lr_path = join(path, "least_request_lb_config")
        check_fields(lr, lr_path, {"choice_count", "active_request_bias"})
        choice_count = uint_field(lr, "choice_count", 2)
        if choice_count < 2:
            raise ConfigError.at(join(lr_path, "choice_count"), "must be at least 2")
        options["choice_count"] = choice_count
        if lr.HasField("active_request_bias"):
            bias = lr.active_request_bias
            bias_path = join(lr_path, "active_request_bias")
            # runtime_key names a runtime override; meshlet has no runtime layer, so the
            # default_value always applies -- which is what Envoy does with no override set.
            check_fields(bias, bias_path, {"default_value", "runtime_key"})
            if bias.default_value < 0 or not math.isfinite(bias.default_value):
                raise ConfigError.at(
                    join(bias_path, "default_value"), "must be a finite number >= 0"
                )
            options["active_request_bias"] = float(bias.default_value)

    if cluster.HasField("ring_hash_lb_config"):
        rh = cluster.ring_hash_lb_config
        rh_path = join(path, "ring_hash_lb_config")
        check_fields(rh, rh_path, {"minimum_ring_size", "maximum_ring_size", "hash_function"})
        if rh.hash_function != cluster_pb2.Cluster.RingHashLbConfig.XX_HASH:
            name = cluster_pb2.Cluster.RingHashLbConfig.HashFunction.Name(rh.hash_function)
            raise ConfigError.at(
                join(rh_path, "hash_function"), f"{name} is not supported (supported: XX_HASH)"
            )
        minimum = uint_field(rh, "minimum_ring_size", 1024)
        maximum = uint_field(rh, "maximum_ring_size", MAX_RING_SIZE)
        for name, value in (("minimum_ring_size", minimum), ("maximum_ring_size", maximum)):
            if not 0 < value <= MAX_RING_SIZE:
                raise ConfigError.at(
                    join(rh_path, name), f"must be between 1 and {MAX_RING_SIZE}, got {value}"
                )
        if minimum > maximum:
            raise ConfigError.at(
                join(rh_path, "minimum_ring_size"),
                f"({minimum}) must not exceed maximum_ring_size ({maximum})",
            )
        options["minimum_ring_size"] = minimum
        options["maximum_ring_size"] = maximum

    if cluster.HasField("maglev_lb_config"):
        mg = cluster.maglev_lb_config
        mg_path = join(path, "maglev_lb_config")
        check_fields(mg, mg_path, {"table_size"})
        size = uint_field(mg, "table_size", 65537)
        if size > MAX_MAGLEV_TABLE_SIZE or not _is_prime(size):
            raise ConfigError.at(
                join(mg_path, "table_size"),
                f"must be a prime number not above {MAX_MAGLEV_TABLE_SIZE}, got {size}",
            )
        options["table_size"] = size

    if cluster.HasField("common_lb_config"):
        common = cluster.common_lb_config
        common_path = join(path, "common_lb_config")
        check_fields(common, common_path, {"healthy_panic_threshold"})
        if common.HasField("healthy_panic_threshold"):
            value = common.healthy_panic_threshold.value
            if not 0.0 <= value <= 100.0:
                raise ConfigError.at(
                    join(common_path, "healthy_panic_threshold.value"),
                    f"must be a percentage between 0 and 100, got {value}",
                )
            options["healthy_panic_threshold"] = float(value)

    return LbConfig(**options)  # type: ignore[arg-type]


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


# -- the interface ---------------------------------------------------------------------------


class LoadBalancer(Protocol):
    """Chooses the host for one request attempt.

    ``choose`` returns None when the cluster has no host to offer (the router answers 503
    with flag UH). It never raises and never blocks.
    """

    def choose(self, ctx: LbContext) -> Host | None: ...


class _NoHost:
    """The balancer of a cluster without hosts (or, with panic disabled, without healthy ones)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<NoHost>"

    def choose(self, ctx: LbContext) -> Host | None:
        return None


NO_HOST: LoadBalancer = _NoHost()


# -- priorities and panic --------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class PriorityLoad:
    """Percent of traffic per priority level (sums to 100) and which levels are in panic."""

    loads: tuple[int, ...]
    panic: tuple[bool, ...]


def priority_load(
    levels: Sequence[tuple[int, int]],
    panic_threshold: float = 50.0,
    overprovisioning_factor: int = OVERPROVISIONING_FACTOR,
) -> PriorityLoad:
    """Envoy's priority load and panic flags for ``levels`` of ``(healthy, total)`` host counts.

    Integer arithmetic as in ``load_balancer_impl.cc``, so results match Envoy's to the percent.
    """
    n = len(levels)
    if n == 0:
        return PriorityLoad(loads=(), panic=())
    threshold = math.floor(min(100.0, panic_threshold) + 0.5)  # Envoy rounds the Percent
    health = [
        min(100, overprovisioning_factor * healthy // total) if total else 0
        for healthy, total in levels
    ]
    normalized_total = min(100, sum(health))
    loads = [0] * n
    if normalized_total > 0:
        remaining = 100
        first_available = -1
        for i, h in enumerate(health):
            if first_available < 0 and h > 0:
                first_available = i
            loads[i] = min(remaining, h * 100 // normalized_total)
            remaining -= loads[i]
        loads[first_available] += remaining  # rounding leftovers
    if threshold == 0 and normalized_total == 0:
        # Panic disabled and nothing healthy: nominally all load to P0, which has no host.
        loads[0] = 100
        return PriorityLoad(loads=tuple(loads), panic=(False,) * n)
    panic = tuple(
        False
        if normalized_total == 100
        else (100.0 * healthy / total if total else 0.0) < threshold
        for healthy, total in levels
    )
    if all(panic):
        # Total panic: load follows host counts, regardless of health.
        hosts_total = sum(total for _, total in levels)
        loads = [0] * n
        if hosts_total == 0:
            loads[0] = 100
        else:
            for i, (_, total) in enumerate(levels):
                loads[i] = 100 * total // hosts_total
            first_nonempty = next(i for i, (_, total) in enumerate(levels) if total)
            loads[first_nonempty] += 100 - sum(loads)
    return PriorityLoad(loads=tuple(loads), panic=panic)


def build_load_balancer(
    config: LbConfig, hosts: Sequence[Host], rng: random.Random
) -> LoadBalancer:
    """A balancer over ``hosts`` as they are now (health included). Rebuild on any change."""
    if not hosts:
        return NO_HOST
    depth = max(h.priority for h in hosts) + 1
    by_level: list[list[Host]] = [[] for _ in range(depth)]
    for h in hosts:
        by_level[h.priority].append(h)
    healthy = [[h for h in level if h.healthy] for level in by_level]
    load = priority_load(
        [(len(ok), len(level)) for ok, level in zip(healthy, by_level, strict=True)],
        config.healthy_panic_threshold,
        config.overprovisioning_factor,
    )
    pickers: list[tuple[int, LoadBalancer]] = []
    cumulative = 0
    for i, share in enumerate(load.loads):
        if share == 0:
            continue
        cumulative += share
        chosen = by_level[i] if load.panic[i] else healthy[i]
        pickers.append((cumulative, _picker(config, chosen, rng)))
    if len(pickers) == 1:
        return pickers[0][1]  # one level takes all the traffic: no roll per request
    hashing = config.policy in (Policy.RING_HASH, Policy.MAGLEV)
    return PriorityBalancer(pickers, load, rng, hashing=hashing)


class PriorityBalancer:
    """Rolls a priority level by its load, then asks that level's picker.

    Hashing policies roll with the request's hash key (so a key keeps its priority, as in
    Envoy's ``ThreadAwareLoadBalancerBase``); the others, and keyless requests, at random.
    """

    __slots__ = ("_hashing", "_levels", "_load", "_rng")

    def __init__(
        self,
        levels: list[tuple[int, LoadBalancer]],
        load: PriorityLoad,
        rng: random.Random,
        *,
        hashing: bool = False,
    ) -> None:
        self._levels = levels  # (cumulative percent, picker)
        self._load = load
        self._rng = rng
        self._hashing = hashing

    def __repr__(self) -> str:
        return f"<PriorityBalancer loads={list(self._load.loads)} panic={list(self._load.panic)}>"

    def choose(self, ctx: LbContext) -> Host | None:
        key = ctx.hash_key if self._hashing else None
        roll = (self._rng.getrandbits(64) if key is None else key) % 100 + 1  # 1..100 (Envoy)
        chosen = self._levels[-1][1]
        for limit, picker in self._levels:
            if roll <= limit:
                chosen = picker
                break
        host = chosen.choose(ctx)
        if host is None or not ctx.excluded or host not in ctx.excluded:
            return host
        for _, picker in self._levels:  # a retry whose level is all excluded tries the others
            if picker is not chosen:
                other = picker.choose(ctx)
                if other is not None and other not in ctx.excluded:
                    return other
        return host


# -- pickers: one priority level's hosts -----------------------------------------------------


def _picker(config: LbConfig, hosts: Sequence[Host], rng: random.Random) -> LoadBalancer:
    if not hosts:
        return NO_HOST
    hosts = tuple(hosts)
    weighted = any(h.weight != hosts[0].weight for h in hosts)
    policy = config.policy
    if policy is Policy.ROUND_ROBIN:
        return WeightedRoundRobin(hosts, rng) if weighted else RoundRobin(hosts, rng)
    if policy is Policy.LEAST_REQUEST:
        if weighted:
            return WeightedLeastRequest(hosts, rng, config.active_request_bias)
        return LeastRequest(hosts, rng, config.choice_count)
    if policy is Policy.RANDOM:
        return UniformRandom(hosts, rng)
    if policy is Policy.RING_HASH:
        return RingHash(hosts, rng, config.minimum_ring_size, config.maximum_ring_size)
    return Maglev(hosts, rng, config.table_size)


def _fallback(hosts: Sequence[Host], excluded: frozenset[Host], rng: random.Random) -> Host | None:
    """A weighted random host not in ``excluded``, or None. Linear: for retries only."""
    candidates = [h for h in hosts if h not in excluded]
    if not candidates:
        return None
    point = rng.random() * sum(h.weight for h in candidates)
    for h in candidates:
        point -= h.weight
        if point < 0:
            return h
    return candidates[-1]


class RoundRobin:
    """Equal weights: a rotation, started at a random place so workers do not move in step."""

    __slots__ = ("_hosts", "_next")

    def __init__(self, hosts: Sequence[Host], rng: random.Random) -> None:
        self._hosts = tuple(hosts)
        self._next = rng.randrange(len(self._hosts))

    def __repr__(self) -> str:
        return f"<RoundRobin {len(self._hosts)} hosts>"

    def choose(self, ctx: LbContext) -> Host | None:
        hosts = self._hosts
        n = len(hosts)
        i = self._next
        self._next = i + 1 if i + 1 < n else 0
        host = hosts[i]
        if ctx.excluded and host in ctx.excluded:
            for step in range(1, n):
                other = hosts[(i + step) % n]
                if other not in ctx.excluded:
                    self._next = (i + step + 1) % n
                    return other
        return host


class _Edf:
    """Earliest-deadline-first schedule (Envoy's ``EdfScheduler``): a host of weight w is due
    every 1/w; O(log n) per pick. Ties go to the earlier insertion, as in Envoy."""

    __slots__ = ("_heap", "_order")

    def __init__(self, weights: Sequence[float]) -> None:
        self._heap = [(1.0 / w, i, i) for i, w in enumerate(weights)]
        heapq.heapify(self._heap)
        self._order = len(weights)

    def peek(self) -> int:
        """The index of the host due next."""
        return self._heap[0][2]

    def advance(self, weight: float) -> None:
        """Reschedule the host due next, at its (possibly new) ``weight``."""
        deadline, _, i = self._heap[0]
        heapq.heapreplace(self._heap, (deadline + 1.0 / weight, self._order, i))
        self._order += 1


class WeightedRoundRobin:
    """Unequal weights: an EDF schedule, so each host's share follows its weight smoothly."""

    __slots__ = ("_edf", "_hosts", "_rng", "_weights")

    def __init__(self, hosts: Sequence[Host], rng: random.Random) -> None:
        self._hosts = tuple(hosts)
        self._weights = [float(max(1, h.weight)) for h in self._hosts]
        self._edf = _Edf(self._weights)
        self._rng = rng
        for _ in range(rng.randrange(len(self._hosts))):  # desynchronise workers
            self._edf.advance(self._weights[self._edf.peek()])

    def __repr__(self) -> str:
        return f"<WeightedRoundRobin {len(self._hosts)} hosts>"

    def choose(self, ctx: LbContext) -> Host | None:
        i = self._edf.peek()
        self._edf.advance(self._weights[i])
        host = self._hosts[i]
        if ctx.excluded and host in ctx.excluded:
            return _fallback(self._hosts, ctx.excluded, self._rng) or host
        return host


class LeastRequest:
    """Equal weights: sample ``choice_count`` hosts at random, take the one with the fewest
    active requests (power of two choices; the first sampled wins ties, as in Envoy)."""

    __slots__ = ("_choices", "_hosts", "_rng")

    def __init__(self, hosts: Sequence[Host], rng: random.Random, choice_count: int) -> None:
        self._hosts = tuple(hosts)
        self._rng = rng
        self._choices = choice_count

    def __repr__(self) -> str:
        return f"<LeastRequest {len(self._hosts)} hosts, {self._choices} choices>"

    def choose(self, ctx: LbContext) -> Host | None:
        hosts = self._hosts
        n = len(hosts)
        if n == 1:
            return hosts[0]
        rand = self._rng.random
        best = hosts[int(rand() * n)]
        for _ in range(self._choices - 1):
            other = hosts[int(rand() * n)]
            if other.rq_active < best.rq_active:
                best = other
        if ctx.excluded and best in ctx.excluded:
            candidates = [h for h in hosts if h not in ctx.excluded]
            if candidates:
                sample = [candidates[int(rand() * len(candidates))] for _ in range(self._choices)]
                return min(sample, key=lambda h: h.rq_active)  # min() keeps the first of ties
        return best


class WeightedLeastRequest:
    """Unequal weights: EDF where a host's weight is ``weight / (active + 1) ** bias``,
    recomputed each time the host is scheduled again (Envoy's ``LeastRequestLoadBalancer``)."""

    __slots__ = ("_bias", "_edf", "_hosts", "_rng")

    def __init__(self, hosts: Sequence[Host], rng: random.Random, bias: float) -> None:
        self._hosts = tuple(hosts)
        self._bias = bias
        self._rng = rng
        self._edf = _Edf([self._effective(h) for h in self._hosts])

    def __repr__(self) -> str:
        return f"<WeightedLeastRequest {len(self._hosts)} hosts, bias {self._bias}>"

    def _effective(self, host: Host) -> float:
        weight = float(max(1, host.weight))
        bias = self._bias
        if bias == 0.0:
            return weight
        if bias == 1.0:
            return weight / (host.rq_active + 1)
        return weight / math.pow(host.rq_active + 1, bias)

    def choose(self, ctx: LbContext) -> Host | None:
        host = self._hosts[self._edf.peek()]
        self._edf.advance(self._effective(host))
        if ctx.excluded and host in ctx.excluded:
            return _fallback(self._hosts, ctx.excluded, self._rng) or host
        return host


class UniformRandom:
    """A uniformly random host (Envoy's RANDOM ignores weights)."""

    __slots__ = ("_hosts", "_rng")

    def __init__(self, hosts: Sequence[Host], rng: random.Random) -> None:
        self._hosts = tuple(hosts)
        self._rng = rng

    def __repr__(self) -> str:
        return f"<UniformRandom {len(self._hosts)} hosts>"

    def choose(self, ctx: LbContext) -> Host | None:
        hosts = self._hosts
        host = hosts[int(self._rng.random() * len(hosts))]
        if ctx.excluded and host in ctx.excluded:
            candidates = [h for h in hosts if h not in ctx.excluded]
            if candidates:
                return candidates[int(self._rng.random() * len(candidates))]
        return host


class RingHash:
    """Ketama consistent hashing (Envoy's ``RingHashLoadBalancer``).

    Each host gets hash points ``stable_hash(b"<ip:port>_<i>")`` in proportion to its weight;
    the least-weighted host gets at least ``ceil(min_weight_share * minimum_ring_size)`` and the
    ring never exceeds ``maximum_ring_size``. A request maps to the first point at or after its
    hash (wrapping), found by bisection. Without a hash key the point is random.
    """

    __slots__ = ("_hosts", "_points", "_ring", "_rng")

    def __init__(
        self, hosts: Sequence[Host], rng: random.Random, minimum: int, maximum: int
    ) -> None:
        self._hosts = tuple(hosts)
        self._rng = rng
        total = sum(max(1, h.weight) for h in self._hosts)
        shares = [max(1, h.weight) / total for h in self._hosts]
        least = min(shares)
        scale = min(math.ceil(least * minimum) / least, float(maximum))
        entries: list[tuple[int, int]] = []
        current = 0.0
        target = 0.0
        for index, (host, share) in enumerate(zip(self._hosts, shares, strict=True)):
            target += scale * share
            prefix = f"{host.key}_"
            i = 0
            while current < target:
                entries.append((stable_hash(f"{prefix}{i}".encode()), index))
                i += 1
                current += 1
        entries.sort()
        self._points = [h for h, _ in entries]
        self._ring = [self._hosts[i] for _, i in entries]

    def __repr__(self) -> str:
        return f"<RingHash {len(self._hosts)} hosts, {len(self._ring)} points>"

    @property
    def size(self) -> int:
        return len(self._ring)

    def choose(self, ctx: LbContext) -> Host | None:
        key = ctx.hash_key
        if key is None:
            key = self._rng.getrandbits(64)
        ring = self._ring
        i = bisect_left(self._points, key)
        if i == len(ring):
            i = 0
        host = ring[i]
        if ctx.excluded and host in ctx.excluded and not ctx.excluded.issuperset(self._hosts):
            n = len(ring)
            for step in range(1, n):  # walk on to the next host not excluded
                other = ring[(i + step) % n]
                if other not in ctx.excluded:
                    return other
        return host


class Maglev:
    """Maglev consistent hashing (Envoy's ``MaglevLoadBalancer``, weighted table building).

    Each host has a permutation of the table's slots (``offset + j * skip mod M``, from two
    hashes of its key); hosts take turns claiming their next free slot, a host of weight w
    claiming in proportion to w, until the table is full. A request maps to
    ``table[hash % M]``.
    """

    __slots__ = ("_hosts", "_rng", "_table")

    def __init__(self, hosts: Sequence[Host], rng: random.Random, table_size: int) -> None:
        self._hosts = tuple(hosts)
        self._rng = rng
        self._table = _maglev_table(self._hosts, table_size)

    def __repr__(self) -> str:
        return f"<Maglev {len(self._hosts)} hosts, table {len(self._table)}>"

    def choose(self, ctx: LbContext) -> Host | None:
        key = ctx.hash_key
        if key is None:
            key = self._rng.getrandbits(64)
        table = self._table
        m = len(table)
        i = key % m
        host = self._hosts[table[i]]
        if ctx.excluded and host in ctx.excluded and not ctx.excluded.issuperset(self._hosts):
            for step in range(1, m):  # walk on to the next host not excluded
                other = self._hosts[table[(i + step) % m]]
                if other not in ctx.excluded:
                    return other
        return host

    def counts(self) -> list[int]:
        """Table slots per host, in host order (for tests and ``/clusters``)."""
        counts = [0] * len(self._hosts)
        for i in self._table:
            counts[i] += 1
        return counts


def _maglev_table(hosts: Sequence[Host], m: int) -> array[int]:
    n = len(hosts)
    offsets = []
    skips = []
    for h in hosts:
        key = h.key.encode()
        offsets.append(stable_hash(key) % m)
        skips.append(stable_hash(key + b"#skip") % (m - 1) + 1)
    weights = [float(max(1, h.weight)) for h in hosts]
    top = max(weights)
    targets = [0.0] * n
    cursor = list(offsets)  # each host's current position in its permutation
    free = -1
    table = array("i", [free]) * m
    filled = 0
    iteration = 1
    # The loop below is the whole cost of a rebuild (~M log M probes): kept to local names.
    while filled < m:
        for i in range(n):
            if iteration * weights[i] < targets[i]:
                continue  # a lighter host skips turns in proportion to its weight
            targets[i] += top
            c = cursor[i]
            skip = skips[i]
            while table[c] != free:
                c += skip
                if c >= m:
                    c -= m
            table[c] = i
            c += skip
            cursor[i] = c - m if c >= m else c
            filled += 1
            if filled == m:
                break
        iteration += 1
    return table
