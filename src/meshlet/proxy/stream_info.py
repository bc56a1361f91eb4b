"""What happened to one request: the record that access logs and metrics are made from.

Response flags use Envoy's short names (``%RESPONSE_FLAGS%``): they say why the proxy answered
the way it did, e.g. ``UH`` no healthy upstream, ``UF`` connect failure.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from meshlet.proxy.headers import Headers, RequestHead

if TYPE_CHECKING:
    from meshlet.proxy.filters.metadata_exchange import Peer


class Flag(enum.StrEnum):
    """Envoy's response flags that meshlet sets (``source/common/stream_info/utility.h``)."""

    NO_ROUTE = "NR"
    NO_CLUSTER = "NC"
    NO_HEALTHY_UPSTREAM = "UH"
    UPSTREAM_CONNECTION_FAILURE = "UF"
    UPSTREAM_OVERFLOW = "UO"
    UPSTREAM_RETRY_LIMIT_EXCEEDED = "URX"
    UPSTREAM_REQUEST_TIMEOUT = "UT"
    UPSTREAM_CONNECTION_TERMINATION = "UC"
    UPSTREAM_REMOTE_RESET = "UR"
    LOCAL_RESET = "LR"
    UPSTREAM_PROTOCOL_ERROR = "UPE"
    DOWNSTREAM_CONNECTION_TERMINATION = "DC"
    DOWNSTREAM_PROTOCOL_ERROR = "DPE"
    FAULT_INJECTED = "FI"
    DELAY_INJECTED = "DI"
    STREAM_IDLE_TIMEOUT = "SI"
    LOCAL_HEALTH_CHECK_FAILED = "LH"


@dataclass(frozen=True, slots=True, kw_only=True)
class DownstreamTls:
    """A downstream TLS connection's facts, found once per connection (``meshlet.proxy.tls``).

    ``peer_certificate`` is empty when the client presented none (TLS, not mutual TLS).
    """

    version: str  # "TLSv1.3"
    sni: str
    peer_certificate: bytes  # DER
    peer_uri_sans: tuple[str, ...]
    peer_dns_sans: tuple[str, ...]
    peer_subject: str  # RFC 2253-like, most significant last
    peer_cert_sha256: str  # hex, XFCC's Hash=
    local_uri_sans: tuple[str, ...]  # of the certificate this proxy presented

    @property
    def mutual(self) -> bool:
        return bool(self.peer_certificate)

    @property
    def peer_principal(self) -> str:
        """Istio's source principal: the peer's first URI SAN (``spiffe://...``)."""
        return self.peer_uri_sans[0] if self.peer_uri_sans else ""


# Most streams have no dynamic metadata: they share this empty one instead of making their own.
NO_METADATA: Mapping[str, Mapping[str, Any]] = MappingProxyType({})


class StreamInfo:
    """Per-request facts, filled in as the request moves through the proxy.

    ``dynamic_metadata`` is Envoy's: by filter name, what a filter left for later ones
    (``envoy.filters.http.jwt_authn`` -> ``{"payload": claims}``, which RBAC reads).
    """

    __slots__ = (
        "bytes_received",
        "bytes_sent",
        "downstream_local",
        "downstream_peer",
        "downstream_remote",
        "downstream_tls",
        "dynamic_metadata",
        "end",
        "flags",
        "grpc",
        "request",
        "response_code",
        "response_code_details",
        "response_headers",
        "route_name",
        "start",
        "start_wall",
        "upstream_cluster",
        "upstream_host",
        "upstream_peer",
        "upstream_service_time",
        "virtual_host",
    )

    def __init__(
        self,
        *,
        start: float,
        start_wall: float,
        downstream_remote: str,
        downstream_local: str,
        downstream_tls: DownstreamTls | None = None,
    ) -> None:
        self.start = start  # monotonic seconds
        self.start_wall = start_wall  # epoch seconds, for %START_TIME%
        self.end: float | None = None
        self.downstream_remote = downstream_remote  # "ip:port"
        self.downstream_local = downstream_local
        self.downstream_tls = downstream_tls  # None: plaintext
        self.request: RequestHead | None = None
        self.response_headers: Headers | None = None
        self.response_code = 0  # 0 when nothing was sent (Envoy logs 0 then)
        self.response_code_details = ""
        self.flags: list[Flag] = []
        self.bytes_received = 0  # request body bytes
        self.bytes_sent = 0  # response body bytes
        self.route_name = ""
        self.virtual_host = ""
        self.upstream_cluster = ""
        self.upstream_host = ""  # "ip:port" of the last upstream tried
        self.upstream_service_time: float | None = None  # ms until upstream response headers
        self.dynamic_metadata = NO_METADATA
        # Istio's peers (metadata exchange, else endpoint metadata), for the metric labels.
        self.downstream_peer: Peer | None = None
        self.upstream_peer: Peer | None = None
        self.grpc = False  # the request's content-type is application/grpc*

    def __repr__(self) -> str:
        return f"<StreamInfo {self.response_code} {self.flags_str} {self.upstream_cluster}>"

    @property
    def flags_str(self) -> str:
        """Envoy's ``%RESPONSE_FLAGS%``: flags joined with ``,``; ``-`` when none."""
        return ",".join(self.flags) if self.flags else "-"

    @property
    def duration_ms(self) -> float:
        return 0.0 if self.end is None else (self.end - self.start) * 1000.0

    def add_flag(self, flag: Flag) -> None:
        if flag not in self.flags:
            self.flags.append(flag)
