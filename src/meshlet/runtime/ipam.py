"""Pod IP address management: hands out pod IPs from the loopback block 127.0.0.0/8.

Linux routes the whole of 127.0.0.0/8 to the loopback device, so every address in it can be
bound without privileges and each pod can own one (DESIGN.md, "The embedded runtime").

Rules kept:

* 127.0.0.0/24 is never handed out, whatever the configured network: 127.0.0.1 and its
  neighbours belong to the user's own services. The default pool is 127.1.0.0/16.
* The network address and the broadcast address of the pool (and 127.255.255.255) are
  skipped, as a CNI plugin's host-local IPAM skips them.
* Allocation walks a cursor round the pool: an address released is handed out again only
  after every other free address has been, so a recreated pod gets a different IP (as on
  Kubernetes) and a client still holding the old address fails instead of reaching a
  stranger.
* With ``state_path`` the cursor survives restarts of ``meshlet up``: it is the last address
  handed out, one line of text, written atomically on each allocation.

Not done here: the allocator does not check whether something already listens on an
address it hands out (``Runtime`` skips addresses whose sidecar admin port is taken, as
another mesh's pods would hold it). Addresses outside 127.0.0.0/24 are rarely used by
anything else; a pod whose bind fails with EADDRINUSE crashes, and its restart keeps the
same IP (a restart is not a re-creation), so the user sees the error in the pod's log.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from meshlet.errors import ConfigError, MeshletError

DEFAULT_POD_NETWORK = "127.1.0.0/16"

_LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
_USERS = ipaddress.IPv4Network("127.0.0.0/24")
_LOOPBACK_BROADCAST = int(_LOOPBACK.broadcast_address)


class PoolExhaustedError(MeshletError):
    """Every address of the pod network is in use."""


class PodIPAllocator:
    """Hands out and takes back pod IPs of one network (a subnet of 127.0.0.0/8).

    ``allocate`` raises ``PoolExhaustedError`` when every address is in use; ``release``
    of an address that is not allocated is ignored (a pod torn down twice is not an error).
    Raises ``ConfigError`` at construction for a network outside 127.0.0.0/8 or without a
    usable address.
    """

    __slots__ = ("_allocated", "_first", "_last", "_network", "_next", "_state_path")

    def __init__(
        self, network: str = DEFAULT_POD_NETWORK, *, state_path: Path | None = None
    ) -> None:
        try:
            net = ipaddress.IPv4Network(network)
        except ValueError as e:
            raise ConfigError.at("podNetwork", f"{network!r} is not an IPv4 network: {e}") from e
        if not net.subnet_of(_LOOPBACK):
            raise ConfigError.at(
                "podNetwork", f"{network} is not inside 127.0.0.0/8; pick e.g. 127.1.0.0/16"
            )
        first, last = int(net.network_address), int(net.broadcast_address)
        if net.num_addresses > 2:  # /31 and /32 have no network or broadcast address
            first, last = first + 1, last - 1
        first = max(first, int(_USERS.broadcast_address) + 1)
        last = min(last, _LOOPBACK_BROADCAST - 1)
        if first > last:
            raise ConfigError.at(
                "podNetwork",
                f"{network} has no address outside 127.0.0.0/24 (kept for the user's "
                "services); pick e.g. 127.1.0.0/16",
            )
        self._network = net
        self._first, self._last = first, last
        self._allocated: set[int] = set()
        self._next = first
        self._state_path = state_path
        if state_path is not None:
            self._next = self._load_cursor(state_path)

    @property
    def network(self) -> str:
        return str(self._network)

    @property
    def size(self) -> int:
        """How many addresses the pool holds."""
        return self._last - self._first + 1

    def allocate(self) -> str:
        """The next free address after the last one handed out (wrapping round the pool)."""
        size = self.size
        if len(self._allocated) >= size:
            raise PoolExhaustedError(
                f"all {size} pod IPs of {self._network} are in use; "
                "delete some pods or configure a larger pod network"
            )
        candidate = self._next
        while candidate in self._allocated:  # terminates: at least one address is free
            candidate = candidate + 1 if candidate < self._last else self._first
        self._allocated.add(candidate)
        self._next = candidate + 1 if candidate < self._last else self._first
        if self._state_path is not None:
            self._save_cursor(self._state_path, candidate)
        return str(ipaddress.IPv4Address(candidate))

    def release(self, ip: str) -> None:
        """Return ``ip`` to the pool; it is handed out again only after the rest of the pool."""
        self._allocated.discard(int(ipaddress.IPv4Address(ip)))

    def in_use(self, ip: str) -> bool:
        return int(ipaddress.IPv4Address(ip)) in self._allocated

    def _load_cursor(self, path: Path) -> int:
        try:
            last = int(ipaddress.IPv4Address(path.read_text().strip()))
        except (OSError, ValueError):
            return self._first  # no state yet, or unreadable: start at the beginning
        if not self._first <= last <= self._last:
            return self._first  # the network changed since
        return last + 1 if last < self._last else self._first

    @staticmethod
    def _save_cursor(path: Path, last: int) -> None:
        # Blocking, but one tiny write per pod creation; atomic so a crash leaves the old one.
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(f"{ipaddress.IPv4Address(last)}\n")
        os.replace(tmp, path)

    def __repr__(self) -> str:
        return (
            f"<PodIPAllocator {self._network} [{len(self._allocated)}/{self.size} in use | "
            f"next {ipaddress.IPv4Address(self._next)}]>"
        )
