"""One ADS stream's state: who the proxy is, what it subscribed to, what it was sent and what
it accepted. Pure: requests in, decisions out; the server does the I/O.

Theory of operation (state of the world, one stream, any number of type URLs)
-----------------------------------------------------------------------------

The first request must carry ``node``: it names the proxy for the life of the stream. Each
later request names one type URL and is judged against that type's ``Watch``
(``Connection.receive`` returns the ``Verdict`` and whether a response is due):

=========================================  =======  ==========================================
request                                    verdict  effect
=========================================  =======  ==========================================
type URL no generator serves               UNKNOWN  ignored (the server logs it once)
``error_detail`` set                       NACK     recorded as ``last_nack``; no response:
                                                    the proxy keeps its last good config and
                                                    the next push sends what is current
no nonce, or first request of the type     NEW      names replace the subscription; respond
nonce other than the last one sent         STALE    ignored: it answers a superseded response
last nonce, version = the one sent         ACK      recorded; respond if names were added
last nonce, another version (after NACK)   UPDATE   names replace the subscription; respond
                                                    if names were added
=========================================  =======  ==========================================

Names: an empty list in the first LDS or CDS request of a stream is a wildcard (every
resource), and stays one while later requests keep it empty; ``*`` is a wildcard too. Any
other empty list (a later one on a named subscription, or any for RDS and EDS) subscribes to
nothing: it is an unsubscribe, not a wildcard (DESIGN.md, "xDS facts").

Responses (``build_response``): LDS and CDS responses carry every subscribed resource that
exists, since a missing one means deleted; RDS and EDS responses carry the subscribed ones
too. A push whose resources equal what the proxy was last sent (same names, same bytes) sends
nothing; a response to a request is always sent. Each type has its own version and nonce.

Sync state per type, for ``meshlet proxy-status``: SYNCED once the last response is ACKed,
NACKED when the last response was rejected, STALE while it is unanswered, NOT_SENT before the
first response.
"""

from __future__ import annotations

import enum
import hashlib
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from meshlet.control.xds.generator import (
    FULL_STATE_TYPES,
    GeneratedResources,
    ProxyInfo,
    short_type_name,
)
from meshlet.control.xds.push import PushRequest, ordered_types, push_types

#: ``DiscoveryResponse.control_plane.identifier``.
CONTROL_PLANE_ID = "meshlet"


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """What one stream may ask for. Beyond the name limits the stream is ended with an error
    status; beyond the send rate (rounds of responses, a token bucket) its requests wait and
    merge, so a proxy flooding requests gets fewer, fuller answers."""

    max_resource_names: int = 50_000
    max_name_length: int = 4096
    send_rounds_burst: int = 32
    send_rounds_per_second: float = 16.0


DEFAULT_LIMITS = Limits()


class RequestError(Exception):
    """A request the server will not serve; the stream ends with gRPC status ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code  # a grpc.StatusCode name, e.g. "INVALID_ARGUMENT"
        self.message = message


class Verdict(enum.Enum):
    NEW = "new"
    ACK = "ack"
    NACK = "nack"
    UPDATE = "update"
    STALE = "stale"
    UNKNOWN = "unknown type"


@dataclass(frozen=True, slots=True)
class Received:
    verdict: Verdict
    respond: bool = False
    nack: Nack | None = None


class SyncState(enum.Enum):
    SYNCED = "SYNCED"
    STALE = "STALE"
    NACKED = "NACKED"
    NOT_SENT = "NOT SENT"


@dataclass(frozen=True, slots=True, kw_only=True)
class Nack:
    """A rejected response: its version (empty when it was not the latest), the version the
    proxy kept, and the proxy's reason."""

    nonce: str
    version: str
    kept_version: str
    message: str
    at: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "kept_version": self.kept_version,
            "message": self.message,
            "at": self.at,
        }


class Pacer:
    """A token bucket for one stream's send rounds (each round answers every pending type).

    A proxy connecting needs a handful of rounds (CDS, EDS, LDS, RDS); pushes come at most
    every debounce period. A stream asking for more than the bucket allows waits, and its
    requests merge meanwhile: a flood costs one generation per type per round, no more.
    """

    __slots__ = ("_at", "_rate", "_size", "_tokens")

    def __init__(self, *, burst: int, per_second: float, now: float) -> None:
        self._size = float(burst)
        self._rate = per_second
        self._tokens = float(burst)
        self._at = now

    def delay(self, now: float) -> float:
        """Seconds to wait before the next round may start (0 for now)."""
        self._refill(now)
        return 0.0 if self._tokens >= 1.0 else (1.0 - self._tokens) / self._rate

    def spend(self, now: float) -> None:
        self._refill(now)
        self._tokens -= 1.0

    def _refill(self, now: float) -> None:
        self._tokens = min(self._size, self._tokens + (now - self._at) * self._rate)
        self._at = now

    def __repr__(self) -> str:
        return f"<Pacer {self._tokens:.1f}/{self._size:.0f} tokens>"


class Watch:
    """One type URL on one stream: the subscription, and the last response and its answers."""

    __slots__ = (
        "acked_nonce",
        "acked_version",
        "last_nack",
        "names",
        "sent_count",
        "sent_digest",
        "sent_nonce",
        "sent_version",
        "type_url",
    )

    def __init__(self, type_url: str) -> None:
        self.type_url = type_url
        self.names: frozenset[str] | None = frozenset()  # None: wildcard
        self.sent_version = ""
        self.sent_nonce = ""
        self.sent_digest = b""
        self.sent_count = 0
        self.acked_version = ""
        self.acked_nonce = ""
        self.last_nack: Nack | None = None

    @property
    def subscribed(self) -> bool:
        return self.names is None or bool(self.names)

    @property
    def state(self) -> SyncState:
        if not self.sent_nonce:
            return SyncState.NOT_SENT
        if self.acked_nonce == self.sent_nonce:
            return SyncState.SYNCED
        if self.last_nack is not None and self.last_nack.nonce == self.sent_nonce:
            return SyncState.NACKED
        return SyncState.STALE

    def __repr__(self) -> str:
        names = "*" if self.names is None else len(self.names)
        return (
            f"<Watch {short_type_name(self.type_url)} names={names} "
            f"sent={self.sent_version!r} {self.state.value}>"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class TypeStatus:
    type_url: str
    state: SyncState
    sent_version: str
    acked_version: str
    subscribed: int | None  # None: wildcard
    sent_resources: int
    last_nack: Nack | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "type_url": self.type_url,
            "state": self.state.value,
            "sent_version": self.sent_version,
            "acked_version": self.acked_version,
            "subscribed": "*" if self.subscribed is None else self.subscribed,
            "sent_resources": self.sent_resources,
            "last_nack": None if self.last_nack is None else self.last_nack.as_dict(),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyStatus:
    """One stream's sync state per type (short names: ``lds``, ``rds``, ``cds``, ``eds``)."""

    proxy_id: str
    connection_id: str
    connected_at: float
    types: Mapping[str, TypeStatus] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "proxy_id": self.proxy_id,
            "connection_id": self.connection_id,
            "connected_at": self.connected_at,
            "types": {name: status.as_dict() for name, status in self.types.items()},
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Work:
    """What a stream's sender does next: these types, in push order. ``requested`` ones are
    always answered; the others belong to ``push`` and are sent only if they changed."""

    types: Sequence[str]
    requested: frozenset[str]
    push: PushRequest | None


class Connection:
    """The state of one ADS stream (see the module docstring for the rules)."""

    def __init__(
        self,
        number: int,
        *,
        types: Collection[str],
        limits: Limits = DEFAULT_LIMITS,
        nonce_prefix: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.number = number
        self.id = f"stream-{number}"
        self.proxy: ProxyInfo | None = None
        self.watches: dict[str, Watch] = {}
        self.connected_at = clock()
        # Per-stream work for the sender; bounded by the number of types served.
        self.requested: set[str] = set()
        self.pending_push: PushRequest | None = None
        self._types = frozenset(types)
        self._limits = limits
        self._nonce_prefix = nonce_prefix
        self._nonces = 0
        self._clock = clock

    # -- requests ---------------------------------------------------------------------------

    def receive(self, request: Any) -> Received:
        """Judge one ``DiscoveryRequest``. Raises ``RequestError`` for one the stream must not
        survive (no node on the first request, no type URL, too many names)."""
        if self.proxy is None:
            if not request.HasField("node") or not request.node.id:
                raise RequestError(
                    "INVALID_ARGUMENT", "the first request of a stream must carry node.id"
                )
            self.proxy = ProxyInfo.from_node(request.node)
            self.id = f"{self.proxy.id}-{self.number}"
        type_url: str = request.type_url
        if not type_url:
            raise RequestError("INVALID_ARGUMENT", "type_url is required on an ADS stream")
        if type_url not in self._types:
            return Received(Verdict.UNKNOWN)
        self._check_names(request.resource_names)

        watch = self.watches.get(type_url)
        nonce: str = request.response_nonce
        if request.HasField("error_detail"):
            current = watch is not None and nonce == watch.sent_nonce
            nack = Nack(
                nonce=nonce,
                version=watch.sent_version if watch is not None and current else "",
                kept_version=request.version_info,
                message=request.error_detail.message,
                at=self._clock(),
            )
            if watch is not None:
                watch.last_nack = nack
            return Received(Verdict.NACK, nack=nack)

        if watch is None or not nonce:
            first = watch is None
            if watch is None:
                watch = self.watches[type_url] = Watch(type_url)
            watch.names = self._names(type_url, request.resource_names, watch, first=first)
            watch.sent_digest = b""  # the proxy starts over: answer in full
            return self._answer(Received(Verdict.NEW, respond=watch.subscribed), type_url)

        if nonce != watch.sent_nonce:
            return Received(Verdict.STALE)

        verdict = Verdict.UPDATE
        if request.version_info == watch.sent_version:
            verdict = Verdict.ACK
            watch.acked_version = watch.sent_version
            watch.acked_nonce = nonce
        old = watch.names
        new = watch.names = self._names(type_url, request.resource_names, watch, first=False)
        # Respond to names added, or to a named subscription turning into a wildcard.
        added = old is not None and (new is None or not new <= old)
        return self._answer(Received(verdict, respond=added), type_url)

    def _answer(self, received: Received, type_url: str) -> Received:
        if received.respond:
            self.requested.add(type_url)
        return received

    def _check_names(self, names: Sequence[str]) -> None:
        limits = self._limits
        if len(names) > limits.max_resource_names:
            raise RequestError(
                "RESOURCE_EXHAUSTED",
                f"resource_names has {len(names)} names; at most "
                f"{limits.max_resource_names} are served on one request",
            )
        if any(len(name) > limits.max_name_length for name in names):
            raise RequestError(
                "INVALID_ARGUMENT",
                f"a resource name is longer than {limits.max_name_length} characters",
            )

    @staticmethod
    def _names(
        type_url: str, names: Sequence[str], watch: Watch, *, first: bool
    ) -> frozenset[str] | None:
        subscribed = frozenset(names)
        if "*" in subscribed:
            return None
        if not subscribed and type_url in FULL_STATE_TYPES and (first or watch.names is None):
            return None  # wildcard: the first request's empty list, kept while it stays empty
        return subscribed

    # -- pushes and responses ---------------------------------------------------------------

    def subscribed_types(self) -> list[str]:
        return [t for t, watch in self.watches.items() if watch.subscribed]

    def enqueue_push(self, request: PushRequest) -> None:
        """Merge a push into this stream's pending one (at most one is ever pending)."""
        pending = self.pending_push
        self.pending_push = request if pending is None else pending.merge(request)

    def take_work(self) -> Work:
        """The types to send now, in push order, and forget them."""
        push, self.pending_push = self.pending_push, None
        requested, self.requested = frozenset(self.requested), set()
        types = set(requested)
        if push is not None:
            types.update(push_types(push, self.subscribed_types()))
        return Work(types=ordered_types(types), requested=requested, push=push)

    def names_for(self, type_url: str) -> list[str] | None:
        """The subscribed names of a type, sorted; None for a wildcard."""
        names = self.watches[type_url].names
        return None if names is None else sorted(names)

    def build_response(
        self, type_url: str, generated: GeneratedResources, *, requested: bool
    ) -> Any | None:
        """The ``DiscoveryResponse`` to send, recorded as sent; None when a push would send
        exactly what the proxy already has (requests are always answered)."""
        watch = self.watches[type_url]
        resources: Mapping[str, any_pb2.Any] = generated.resources
        if watch.names is not None:
            names = watch.names
            resources = {n: r for n, r in resources.items() if n in names}
        ordered = sorted(resources.items())
        digest = _digest(ordered)
        if not requested and digest == watch.sent_digest:
            return None
        self._nonces += 1
        nonce = f"{self._nonce_prefix}{self._nonces}"
        version = generated.version or digest.hex()[:16]
        response = discovery_pb2.DiscoveryResponse(
            version_info=version,
            type_url=type_url,
            nonce=nonce,
            resources=[resource for _, resource in ordered],
            control_plane=base_pb2.ControlPlane(identifier=CONTROL_PLANE_ID),
        )
        watch.sent_version = version
        watch.sent_nonce = nonce
        watch.sent_digest = digest
        watch.sent_count = len(ordered)
        return response

    # -- status -----------------------------------------------------------------------------

    def sync_status(self) -> ProxyStatus:
        types = {
            short_type_name(t): TypeStatus(
                type_url=t,
                state=w.state,
                sent_version=w.sent_version,
                acked_version=w.acked_version,
                subscribed=None if w.names is None else len(w.names),
                sent_resources=w.sent_count,
                last_nack=w.last_nack,
            )
            for t, w in sorted(self.watches.items())
            if w.subscribed
        }
        return ProxyStatus(
            proxy_id=self.proxy.id if self.proxy else "",
            connection_id=self.id,
            connected_at=self.connected_at,
            types=types,
        )

    def __repr__(self) -> str:
        watches = ", ".join(repr(w) for w in self.watches.values())
        return f"<Connection {self.id} [{watches}]>"


def _digest(resources: Sequence[tuple[str, any_pb2.Any]]) -> bytes:
    """A fingerprint of a response's content: names, types and serialized bytes."""
    h = hashlib.blake2b(digest_size=16)
    for name, resource in resources:
        value = resource.value
        type_url = resource.type_url.encode()
        h.update(b"%d:%s\0%s\0%d:" % (len(name), name.encode(), type_url, len(value)))
        h.update(value)
    return h.digest()
