"""An upstream host (Envoy's "host", Istio's "endpoint") and the sets balancers choose from.

A host's health is the union of reasons it may be unhealthy (Envoy's health flags); it is
healthy when there is none. ``rq_active`` is what LEAST_REQUEST compares.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from hashlib import blake2b as _blake2b
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshlet.proxy.filters.metadata_exchange import Peer


class Host:
    """One endpoint of a cluster: address, weight, priority, health and live counters."""

    __slots__ = (
        "address",
        "cx_active",
        "cx_connect_fail",
        "cx_total",
        "failed_active_hc",
        "failed_outlier",
        "hostname",
        "locality",
        "peer",
        "port",
        "priority",
        "rq_active",
        "rq_error",
        "rq_success",
        "rq_timeout",
        "rq_total",
        "socket_match",
        "weight",
    )

    def __init__(
        self,
        address: str,
        port: int,
        *,
        weight: int = 1,
        priority: int = 0,
        hostname: str = "",
        locality: tuple[str, str, str] = ("", "", ""),
        socket_match: tuple[tuple[str, str], ...] = (),
        peer: Peer | None = None,
    ) -> None:
        self.socket_match = socket_match  # endpoint metadata for transport_socket_matches
        self.peer = peer  # who runs here, from EDS metadata (Istio's metrics fallback)
        self.address = address
        self.port = port
        self.weight = weight
        self.priority = priority
        self.hostname = hostname
        self.locality = locality  # (region, zone, sub_zone)
        self.failed_active_hc = False
        self.failed_outlier = False
        self.rq_active = 0
        self.rq_total = 0
        self.rq_success = 0
        self.rq_error = 0
        self.rq_timeout = 0
        self.cx_active = 0
        self.cx_total = 0
        self.cx_connect_fail = 0

    def __repr__(self) -> str:
        return f"<Host {self.key} w={self.weight} p={self.priority} {self.health_flags}>"

    @property
    def key(self) -> str:
        """``ip:port``, the host's identity in stats and ``/clusters``."""
        return f"{self.address}:{self.port}"

    @property
    def healthy(self) -> bool:
        return not (self.failed_active_hc or self.failed_outlier)

    @property
    def health_flags(self) -> str:
        """As Envoy's ``/clusters`` prints them: ``healthy`` or ``/failed_active_hc/...``."""
        flags = ""
        if self.failed_active_hc:
            flags += "/failed_active_hc"
        if self.failed_outlier:
            flags += "/failed_outlier_check"
        return flags or "healthy"


@dataclass(frozen=True, slots=True, kw_only=True)
class LbContext:
    """What a balancer may consult for one pick.

        ``hash_key`` comes from the route's ``hash_policy`` (None: no policy produced a hash, the
        hashing balancers then pick at random). ``excluded`` are hosts a retry host predicate
        (previous_hosts) rejects; a balancer avoids them when it can. ``original_dst`` is the
    destination an ORIGINAL_DST cluster connects to (None: the request has none).
    """

    hash_key: int | None = None
    excluded: frozenset[Host] = field(default_factory=frozenset)
    original_dst: tuple[str, int] | None = None  # ORIGINAL_DST clusters: where to connect


NO_CONTEXT = LbContext()


def stable_hash(data: bytes) -> int:
    """A 64-bit hash that is the same in every process and run (unlike ``hash()``).

    Hash policies and the hashing balancers (RING_HASH, MAGLEV) must agree across worker
    processes, so that one key lands on one host whichever worker serves it.
    """
    return int.from_bytes(_blake2b(data, digest_size=8).digest(), "little")
