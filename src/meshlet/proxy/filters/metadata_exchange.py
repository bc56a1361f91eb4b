"""Istio's HTTP peer metadata exchange (``istio.metadata_exchange``): who is at the other end.

Istio's sidecars tell each other who they are in two headers (istio/proxy
``source/extensions/filters/http/peer_metadata``): ``x-envoy-peer-metadata-id`` (the node id)
and ``x-envoy-peer-metadata`` (base64 of a serialized ``google.protobuf.Struct`` with Istio's
node metadata names: NAME, NAMESPACE, WORKLOAD_NAME, LABELS, SERVICE_ACCOUNT, CLUSTER_ID,
MESH_ID, INSTANCE_IPS). The metrics read the peer from them.

Rules kept:

* outbound and gateway HCMs add the local node's two headers to the upstream request (any a
  client sent are replaced) and read and remove both from the upstream response: the response
  names the destination peer;
* inbound HCMs read and remove both from the request (they name the source peer) and add the
  local node's headers to the response;
* without a response header (a destination without a sidecar), the destination peer comes
  from the endpoint's EDS metadata ``filter_metadata["istio"]["workload"]`` =
  ``<workload>;<namespace>;<canonical service>;<canonical revision>;<cluster id>``, Istio's
  fallback (istio/proxy ``extensions/common/metadata_object.cc`` ``convertEndpointMetadata``);
* a header that does not decode is ignored: the peer stays unknown, the request goes on.

Hot path. The local headers are encoded once per worker (``local_headers``). A peer's header
value is decoded once and cached by value (``PeerCache``, bounded: a client sending ever new
values costs one decode per request and no memory). Peers are interned by content, so a peer
is one object wherever it came from, and metric series can key on it by identity.
"""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING, Final

from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from xds.type.v3 import typed_struct_pb2

if TYPE_CHECKING:
    from envoy.config.core.v3.base_pb2 import Node

    from meshlet.proxy.headers import Headers
    from meshlet.proxy.stream_info import StreamInfo

PEER_METADATA: Final = b"x-envoy-peer-metadata"
PEER_METADATA_ID: Final = b"x-envoy-peer-metadata-id"
HEADERS: Final = frozenset({PEER_METADATA, PEER_METADATA_ID})

TYPED_STRUCT_TYPE: Final = (
    "type.googleapis.com/" + typed_struct_pb2.TypedStruct.DESCRIPTOR.full_name
)
#: The typed_config (inside a TypedStruct) of Istio's ``istio.metadata_exchange`` HTTP filter.
PEER_METADATA_CONFIG_TYPE: Final = "type.googleapis.com/io.istio.http.peer_metadata.Config"

UNKNOWN: Final = "unknown"
#: The node metadata keys the exchange carries (Istio's names).
EXCHANGED_KEYS: Final = (
    "NAME",
    "NAMESPACE",
    "WORKLOAD_NAME",
    "LABELS",
    "SERVICE_ACCOUNT",
    "CLUSTER_ID",
    "MESH_ID",
    "INSTANCE_IPS",
)
_MAX_VALUE = 8192  # bytes of base64 decoded at most: a peer's metadata is a few hundred
_CACHE_SIZE = 512
_INTERNED_MAX = 4096


class Peer:
    """A workload at the other end of a request, as Istio's metric labels name it.

    Compared by identity (``PeerCache`` and ``endpoint_peer`` intern peers by content), so
    that a metric series key holding one hashes in nanoseconds.
    """

    __slots__ = (
        "app",
        "canonical_revision",
        "canonical_service",
        "cluster_id",
        "id",
        "namespace",
        "version",
        "workload",
    )

    def __init__(
        self,
        *,
        id: str = "",
        workload: str = UNKNOWN,
        namespace: str = UNKNOWN,
        app: str = UNKNOWN,
        version: str = UNKNOWN,
        canonical_service: str = UNKNOWN,
        canonical_revision: str = UNKNOWN,
        cluster_id: str = UNKNOWN,
    ) -> None:
        self.id = id
        self.workload = workload
        self.namespace = namespace
        self.app = app
        self.version = version
        self.canonical_service = canonical_service
        self.canonical_revision = canonical_revision
        self.cluster_id = cluster_id

    def __repr__(self) -> str:
        return f"<Peer {self.workload}.{self.namespace} {self.app}:{self.version}>"

    def content(self) -> tuple[str, ...]:
        return (self.id, self.workload, self.namespace, self.app, self.version,
                self.canonical_service, self.canonical_revision, self.cluster_id)  # fmt: skip


_interned: dict[tuple[str, ...], Peer] = {}


def intern_peer(peer: Peer) -> Peer:
    """The one ``Peer`` object with ``peer``'s content (bounded: cleared when full)."""
    key = peer.content()
    found = _interned.get(key)
    if found is not None:
        return found
    if len(_interned) >= _INTERNED_MAX:
        _interned.clear()
    _interned[key] = peer
    return peer


# -- encoding the local node -------------------------------------------------------------------


def node_struct(node: Node) -> struct_pb2.Struct:
    """The exchanged subset of an xDS node's metadata (NAME falls back to POD_NAME)."""
    md = node.metadata.fields
    out = struct_pb2.Struct()
    for key in EXCHANGED_KEYS:
        if key in md:
            out.fields[key].CopyFrom(md[key])
    if "NAME" not in md and "POD_NAME" in md:
        out.fields["NAME"].CopyFrom(md["POD_NAME"])
    return out


def local_headers(node: Node) -> tuple[tuple[bytes, bytes], ...]:
    """The two header pairs this node sends, encoded once (per worker and bootstrap)."""
    value = base64.b64encode(node_struct(node).SerializeToString(deterministic=True))
    return ((PEER_METADATA_ID, node.id.encode()), (PEER_METADATA, value))


# -- decoding a peer ---------------------------------------------------------------------------


def _string(fields: object, key: str) -> str:
    value = fields.get(key)  # type: ignore[attr-defined]
    if value is None or value.WhichOneof("kind") != "string_value":
        return ""
    return str(value.string_value)


def peer_from_struct(md: struct_pb2.Struct, node_id: str = "") -> Peer:
    """A peer from Istio's node metadata, with Istio's label rules: app and version from the
    ``app``/``version`` labels (else ``app.kubernetes.io/name``/``-version``); the canonical
    service from its label, else the app, else the workload; the canonical revision from its
    label, else the version, else ``latest``."""
    fields = md.fields
    labels = fields["LABELS"].struct_value.fields if "LABELS" in fields else {}
    workload = _string(fields, "WORKLOAD_NAME")
    app = _string(labels, "app") or _string(labels, "app.kubernetes.io/name")
    version = _string(labels, "version") or _string(labels, "app.kubernetes.io/version")
    return Peer(
        id=node_id,
        workload=workload or UNKNOWN,
        namespace=_string(fields, "NAMESPACE") or UNKNOWN,
        app=app or UNKNOWN,
        version=version or UNKNOWN,
        canonical_service=_string(labels, "service.istio.io/canonical-name")
        or app
        or workload
        or UNKNOWN,
        canonical_revision=_string(labels, "service.istio.io/canonical-revision")
        or version
        or "latest",
        cluster_id=_string(fields, "CLUSTER_ID") or UNKNOWN,
    )


def decode_peer(value: bytes, node_id: bytes = b"") -> Peer | None:
    """The peer an ``x-envoy-peer-metadata`` value names; None when it is not base64 of a
    Struct (garbage is ignored, as Istio ignores it)."""
    if not value or len(value) > _MAX_VALUE:
        return None
    try:
        raw = base64.b64decode(value, validate=True)
        md = struct_pb2.Struct.FromString(raw)
    except (binascii.Error, ValueError, DecodeError):
        return None
    return peer_from_struct(md, node_id.decode("utf-8", "replace"))


class PeerCache:
    """Decoded peers by header value: one decode per distinct value, not per request.

    Bounded: when full it starts over, so that values a client invents cost it a decode
    each and this worker no memory. Undecodable values are cached too (as None).
    """

    __slots__ = ("_peers", "size")

    def __init__(self, size: int = _CACHE_SIZE) -> None:
        self.size = size
        self._peers: dict[bytes, Peer | None] = {}

    def __repr__(self) -> str:
        return f"<PeerCache {len(self._peers)}/{self.size}>"

    def get(self, value: bytes) -> Peer | None:
        peers = self._peers
        try:
            return peers[value]
        except KeyError:
            pass
        peer = decode_peer(value)
        if peer is not None:
            peer = intern_peer(peer)
        if len(peers) >= self.size:
            peers.clear()
        peers[value] = peer
        return peer


#: One cache per process (each worker process has its own).
PEERS: Final = PeerCache()


def endpoint_peer(workload: str) -> Peer | None:
    """Istio's endpoint metadata fallback: ``filter_metadata["istio"]["workload"]`` =
    ``<workload>;<namespace>;<canonical service>;<canonical revision>;<cluster id>``.

    App and version are not in it (Istio reports them ``unknown`` then); an empty revision
    means ``latest`` (istiod leaves ``latest`` out). None when it has fewer than 5 parts.
    """
    parts = workload.split(";")
    if len(parts) < 5:
        return None
    name, namespace, service, revision, cluster = parts[:5]
    return intern_peer(
        Peer(
            workload=name or UNKNOWN,
            namespace=namespace or UNKNOWN,
            canonical_service=service or name or UNKNOWN,
            canonical_revision=revision or "latest",
            cluster_id=cluster or UNKNOWN,
        )
    )


# -- the filter on one request -----------------------------------------------------------------


def on_request(
    headers: Headers,
    special: dict[bytes, bytes],
    info: StreamInfo,
    *,
    inbound: bool,
    local: tuple[tuple[bytes, bytes], ...],
) -> None:
    """Request headers: inbound, read the source peer and remove the headers; outbound (and
    gateways), replace whatever a client sent with the local node's headers.

    ``special`` holds the first value of each header the codec noted while parsing, so a
    request without the headers pays two dict lookups.
    """
    value = special.get(PEER_METADATA)
    present = value is not None or PEER_METADATA_ID in special
    if inbound:
        if value is not None:
            info.downstream_peer = PEERS.get(value)
    elif local:
        if present:
            headers.items = [kv for kv in headers.items if kv[0] not in HEADERS]
        headers.items.extend(local)
        return
    if present:
        headers.items = [kv for kv in headers.items if kv[0] not in HEADERS]


def on_response(
    out: Headers,
    value: bytes | None,
    info: StreamInfo,
    *,
    inbound: bool,
    local: tuple[tuple[bytes, bytes], ...],
) -> None:
    """Response headers (the upstream's two headers already taken out, ``value`` being its
    ``x-envoy-peer-metadata``): outbound, the destination peer; inbound, add the local
    node's headers."""
    if inbound:
        out.items.extend(local)
    elif value is not None:
        peer = PEERS.get(value)
        if peer is not None:
            info.upstream_peer = peer
