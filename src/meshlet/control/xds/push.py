"""Debounced pushes: which changes reach which proxies, and when.

Theory of operation
-------------------

Whatever changes the mesh (an applied VirtualService, a new endpoint) becomes a
``PushRequest``: is it a *full* push (any type may have changed) or an endpoints-only one
(only EDS), which configuration it touched (``affected``; ``None`` when unknown, meaning
everything), and why (``reason``, for logs and the ``pilot_push_triggers`` metric).

1. **Debounce** (``Debouncer``, pure, with an injectable clock). Requests merge while they
   keep coming: a merged request is released once no new one has arrived for the quiet period
   (100 ms) or once the first of them has waited the maximum delay (1 s), whichever is first.
   A burst of a thousand applies is one push; a steady trickle still pushes every second.
2. **Select** (``select_push``, pure). For each connected proxy, a released request becomes
   the list of types to regenerate, in push order (CDS, EDS, LDS, RDS: a cluster before the
   endpoints it needs, a listener before the routes it names), or nothing: an endpoints-only
   request regenerates EDS only, a proxy that subscribed to none of the types gets nothing, and
   the resource side (``PushScope.affects``) may say a change cannot touch this proxy.
3. **Merge per connection.** A proxy that is still busy sending the previous push keeps one
   pending request per connection, merged with later ones (``PushRequest.merge``), so its
   backlog is bounded whatever the rate of changes.

``PushQueue`` runs step 1 on the event loop and hands each released request to a sink (the
ADS server, which does steps 2 and 3). ``PushQueue.enqueue`` may be called from any thread:
the store calls its watchers on the writing thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, replace
from typing import Protocol

from meshlet.control.xds.generator import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    SECRET_TYPE,
    ProxyInfo,
)

log = logging.getLogger(__name__)

#: istiod's PILOT_DEBOUNCE_AFTER and PILOT_DEBOUNCE_MAX.
DEBOUNCE_QUIET = 0.100
DEBOUNCE_MAX = 1.0

#: A merged request that names more configuration than this names none, i.e. everything:
#: pushes then reach more proxies than needed, but a backlog never grows without bound.
MAX_AFFECTED = 1024

#: Reasons, as istiod's ``TriggerReason`` names them.
CONFIG_UPDATE = "config"
ENDPOINT_UPDATE = "endpoint"
SERVICE_UPDATE = "service"
PROXY_UPDATE = "proxy"
GLOBAL_UPDATE = "global"

#: Envoy's ADS "make before break" order; types not listed here follow, sorted by URL.
PUSH_ORDER = (CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE, SECRET_TYPE)
_RANK = {type_url: i for i, type_url in enumerate(PUSH_ORDER)}


@dataclass(frozen=True, slots=True, kw_only=True, order=True)
class ConfigKey:
    """One piece of configuration a change touched: ``VirtualService default/reviews``, or the
    endpoints of ``ServiceEntry default/ratings``. The ADS server never looks inside; the
    ``PushScope`` does."""

    kind: str
    name: str
    namespace: str = ""

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else self.name


@dataclass(frozen=True, slots=True, kw_only=True)
class PushRequest:
    """A change to push. ``affected=None`` means unknown, i.e. everything; ``start`` is when
    the oldest merged change was enqueued (``PushQueue`` stamps it), for push latency."""

    full: bool = True
    affected: frozenset[ConfigKey] | None = None
    reason: str = "unknown"
    start: float | None = None

    @classmethod
    def endpoints(cls, affected: Iterable[ConfigKey] | None = None) -> PushRequest:
        """An endpoints-only (EDS) push."""
        keys = None if affected is None else frozenset(affected)
        return cls(full=False, affected=keys, reason=ENDPOINT_UPDATE)

    def merge(self, other: PushRequest) -> PushRequest:
        """One request that covers both: full if either is, the union of what they touched,
        both reasons, the older start."""
        if self.affected is None or other.affected is None:
            affected = None
        else:
            affected = self.affected | other.affected
            if len(affected) > MAX_AFFECTED:
                affected = None
        reasons = set(self.reason.split(",")) | set(other.reason.split(","))
        starts = [s for s in (self.start, other.start) if s is not None]
        return PushRequest(
            full=self.full or other.full,
            affected=affected,
            reason=",".join(sorted(reasons)),
            start=min(starts) if starts else None,
        )

    def __repr__(self) -> str:
        what = "everything" if self.affected is None else f"{len(self.affected)} keys"
        return f"<PushRequest {'full' if self.full else 'eds'} {what} reason={self.reason}>"


def ordered_types(types: Iterable[str]) -> list[str]:
    """``types`` in push order: CDS, EDS, LDS, RDS, SDS, then any others by URL."""
    return sorted(set(types), key=lambda t: (_RANK.get(t, len(_RANK)), t))


def push_types(request: PushRequest, subscribed: Collection[str]) -> list[str]:
    """The subscribed types a request regenerates, in push order."""
    if request.full:
        return ordered_types(subscribed)
    return [ENDPOINT_TYPE] if ENDPOINT_TYPE in subscribed else []


class PushScope(Protocol):
    """The resource side's say in pushes (istiod's ``PushContext`` and ``ProxyNeedsPush``)."""

    def prepare_push(self, request: PushRequest) -> None:
        """Called once per released request, before any proxy is considered: the place to
        rebuild a snapshot once per push rather than once per change."""
        ...

    def affects(self, proxy: ProxyInfo, request: PushRequest) -> bool:
        """Whether the configuration in ``request.affected`` (never ``None`` here) can change
        what ``proxy`` receives. When unsure, True: a needless push costs little."""
        ...


class EveryProxy:
    """The scope that knows nothing: every change affects every proxy."""

    def prepare_push(self, request: PushRequest) -> None:
        return None

    def affects(self, proxy: ProxyInfo, request: PushRequest) -> bool:
        return True

    def __repr__(self) -> str:
        return "<EveryProxy>"


EVERY_PROXY = EveryProxy()


def select_push(
    request: PushRequest, proxy: ProxyInfo, subscribed: Collection[str], scope: PushScope
) -> list[str]:
    """The types to push to one proxy for a released request, in push order; empty for none."""
    types = push_types(request, subscribed)
    if not types:
        return []
    if request.affected is not None and not scope.affects(proxy, request):
        return []
    return types


class Debouncer:
    """Merges requests until a quiet period has passed or the oldest has waited long enough.

    Pure: time comes from ``clock``, and the caller asks ``deadline()`` when to come back and
    ``take_due()`` for the merged request once it is due.
    """

    def __init__(
        self,
        *,
        quiet: float = DEBOUNCE_QUIET,
        max_delay: float = DEBOUNCE_MAX,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.quiet = quiet
        self.max_delay = max_delay
        self.clock = clock
        self._pending: PushRequest | None = None
        self._first = 0.0
        self._last = 0.0

    @property
    def pending(self) -> PushRequest | None:
        return self._pending

    def add(self, request: PushRequest) -> None:
        now = self.clock()
        if request.start is None:
            request = replace(request, start=now)
        if self._pending is None:
            self._pending = request
            self._first = now
        else:
            self._pending = self._pending.merge(request)
        self._last = now

    def deadline(self) -> float | None:
        """When the pending request falls due (clock time), or None with nothing pending."""
        if self._pending is None:
            return None
        return min(self._last + self.quiet, self._first + self.max_delay)

    def take_due(self) -> PushRequest | None:
        """The merged request if it is due now (and forget it), else None."""
        deadline = self.deadline()
        if deadline is None or self.clock() < deadline:
            return None
        request, self._pending = self._pending, None
        return request

    def __repr__(self) -> str:
        return f"<Debouncer pending={self._pending!r}>"


class PushQueue:
    """Runs a ``Debouncer`` on the event loop; ``enqueue`` is safe from any thread."""

    def __init__(
        self,
        *,
        quiet: float = DEBOUNCE_QUIET,
        max_delay: float = DEBOUNCE_MAX,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._debouncer = Debouncer(quiet=quiet, max_delay=max_delay, clock=clock)
        self._lock = threading.Lock()
        self._triggers: Counter[str] = Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    def enqueue(self, request: PushRequest) -> None:
        """Ask for a push. Returns at once; the push follows after the debounce."""
        with self._lock:
            self._debouncer.add(request)
            self._triggers.update(request.reason.split(","))
            loop, wake = self._loop, self._wake
        if loop is None or wake is None:
            return  # not running yet: ``run`` picks it up when it starts
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            wake.set()
        else:
            # A closed loop has nobody left to push to.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wake.set)

    def triggers(self) -> dict[str, int]:
        """Requests enqueued so far, by reason (istiod's ``pilot_push_triggers``)."""
        with self._lock:
            return dict(self._triggers)

    async def run(self, sink: Callable[[PushRequest], None]) -> None:
        """Hand each released request to ``sink`` until cancelled. A sink that raises is
        logged; the queue carries on."""
        wake = asyncio.Event()
        with self._lock:
            self._loop, self._wake = asyncio.get_running_loop(), wake
        try:
            while True:
                with self._lock:
                    deadline = self._debouncer.deadline()
                    request = self._debouncer.take_due()
                if request is not None:
                    try:
                        sink(request)
                    except Exception:
                        log.exception("push of %r failed", request)
                    continue
                if deadline is None:
                    await wake.wait()
                else:
                    delay = deadline - self._debouncer.clock()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), timeout=max(delay, 0.0))
                wake.clear()
        finally:
            with self._lock:
                self._loop = self._wake = None

    def __repr__(self) -> str:
        with self._lock:
            pending = self._debouncer.pending
        return f"<PushQueue pending={pending!r}>"
