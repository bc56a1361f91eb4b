"""The xDS server's resource side: translation behind the ``Generator`` and ``PushScope``
interfaces, over snapshots of the store.

``Translation`` holds the current ``Snapshot`` and the store revision it was built from.
``prepare_push`` (once per debounced push, on the event loop) rebuilds it when the store has
moved on; ``generate`` answers each proxy's requests from it. Every type's version is the store
revision of the snapshot, so a proxy's ``version_info`` says which configuration it runs.

Rules kept:

* Objects are read from the store and validated again through ``meshlet.api.load_object``;
  one that no longer validates (written by another meshlet version, say) is logged and left
  out, never allowed to stop the others from being served.
* One snapshot serves every proxy until the next push: a proxy's resources of one type are
  translated once per snapshot and proxy shape (``Proxy.key``), and shared by proxies alike.
* A proxyless gRPC client (node metadata ``GENERATOR: grpc``) gets ``translate.grpc``'s
  resources, built for the names it subscribed to (its listener names are the targets it
  dials), and cached per snapshot, client shape and names.
* Every change may affect every proxy (``affects`` is always True): a needless push of
  unchanged resources is dropped by the connection (same content digest), so it costs little.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from google.protobuf import any_pb2, json_format, message

from meshlet.api import LoadedResource, load_object
from meshlet.control.registry import ConfigRegistry
from meshlet.control.snapshot import Proxy, ProxyType, Snapshot
from meshlet.control.store import Store
from meshlet.control.translate import (
    build_clusters,
    build_endpoints,
    build_grpc_clusters,
    build_grpc_endpoints,
    build_grpc_listeners,
    build_grpc_route_configs,
    build_listeners,
    build_route_configs,
)
from meshlet.control.xds import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    GeneratedResources,
    ProxyInfo,
    PushRequest,
)
from meshlet.errors import ConfigError

log = logging.getLogger(__name__)

_Builder = Callable[[Snapshot, Proxy], Sequence[message.Message]]

_BUILDERS: Mapping[str, _Builder] = {
    LISTENER_TYPE: build_listeners,
    ROUTE_TYPE: build_route_configs,
    CLUSTER_TYPE: build_clusters,
    ENDPOINT_TYPE: build_endpoints,
}

_NamedBuilder = Callable[[Snapshot, Proxy, Sequence[str] | None], Sequence[message.Message]]

_GRPC_BUILDERS: Mapping[str, _NamedBuilder] = {
    LISTENER_TYPE: build_grpc_listeners,
    ROUTE_TYPE: build_grpc_route_configs,
    CLUSTER_TYPE: build_grpc_clusters,
    ENDPOINT_TYPE: build_grpc_endpoints,
}

_CONFIG_TYPES = {
    "listeners": LISTENER_TYPE,
    "routes": ROUTE_TYPE,
    "clusters": CLUSTER_TYPE,
    "endpoints": ENDPOINT_TYPE,
}

#: The type URLs ``Translation`` serves.
TYPE_URLS = tuple(_BUILDERS)


def load_stored(objects: Iterable[Mapping[str, Any]]) -> list[LoadedResource]:
    """Validate stored objects; the ones that fail are logged and left out."""
    resources = []
    for obj in objects:
        metadata = obj.get("metadata") or {}
        where = f"{obj.get('kind')} {metadata.get('namespace', '')}/{metadata.get('name')}"
        try:
            resources.append(
                load_object(obj, where, namespace=str(metadata.get("namespace") or "default"))
            )
        except ConfigError as e:
            log.warning("stored %s is not valid and is not served: %s", where, e.render())
    return resources


def build_snapshot(objects: Iterable[Mapping[str, Any]]) -> Snapshot:
    """The snapshot of a store's objects, with a ``ConfigRegistry`` over them."""
    resources = load_stored(objects)
    return Snapshot.build(resources, ConfigRegistry(resources))


def proxy_of(info: ProxyInfo) -> Proxy:
    """The translation's ``Proxy`` for an ADS stream's node. Ids not in Istio's form (a test's,
    a proxyless client's) are read as a sidecar in the node's NAMESPACE (else ``default``)."""
    ip = info.instance_ips[0] if info.instance_ips else (info.ip or "0.0.0.0")
    kind = ProxyType.ROUTER if info.kind == ProxyType.ROUTER.value else ProxyType.SIDECAR
    return Proxy(
        ip=ip,
        namespace=info.namespace or "default",
        pod_name=info.pod,
        type=kind,
        dns_domain=info.dns_domain,
        labels=dict(info.labels),
        service_account=info.service_account or "default",
        workload_name=info.workload_name,
    )


def _name(resource: message.Message) -> str:
    name = getattr(resource, "cluster_name", "") or getattr(resource, "name", "")
    return str(name)


def _pack(resource: message.Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(resource)
    return packed


class Translation:
    """``Generator`` for LDS, RDS, CDS and EDS, and ``PushScope``, over ``store``'s objects.

    ``generate`` and ``prepare_push`` run on the event loop; ``snapshot`` and ``revision``
    change only in ``refresh``.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()  # refresh may also be called off the loop (at start)
        self.revision = -1
        self.snapshot = build_snapshot(())
        self._cache: dict[tuple[Any, ...], dict[str, any_pb2.Any]] = {}
        self.refresh()

    def __repr__(self) -> str:
        return f"<Translation revision={self.revision} {self.snapshot!r}>"

    def refresh(self) -> bool:
        """Rebuild the snapshot if the store has changed since; True if it was rebuilt."""
        with self._lock:
            revision = self.store.revision
            if revision == self.revision:
                return False
            # Read the objects first: a write landing meanwhile has a newer revision and
            # triggers another push, so the snapshot is never labelled newer than its data.
            objects = self.store.list()
            self.snapshot = build_snapshot(objects)
            self.revision = revision
            self._cache = {}
        log.info("snapshot at revision %d: %r", revision, self.snapshot)
        return True

    # -- Generator --------------------------------------------------------------------------

    def generate(
        self, proxy: ProxyInfo, type_url: str, names: Sequence[str] | None
    ) -> GeneratedResources:
        target = proxy_of(proxy)
        if proxy.proxyless_grpc:
            wanted = None if names is None else tuple(names)
            key: tuple[Any, ...] = ("grpc", type_url, target.key, wanted)
            resources = self._cache.get(key)
            if resources is None:
                built = _GRPC_BUILDERS[type_url](self.snapshot, target, wanted)
                resources = self._cache[key] = {_name(r): _pack(r) for r in built}
            return GeneratedResources(version=str(self.revision), resources=resources)
        builder = _BUILDERS[type_url]
        key = (type_url, target.type, target.key)
        resources = self._cache.get(key)
        if resources is None:
            resources = {_name(r): _pack(r) for r in builder(self.snapshot, target)}
            self._cache[key] = resources
        if names is not None:
            resources = {n: resources[n] for n in names if n in resources}
        return GeneratedResources(version=str(self.revision), resources=resources)

    def generators(self) -> dict[str, Translation]:
        """Type URL -> generator, as ``AdsServer`` takes them."""
        return dict.fromkeys(TYPE_URLS, self)

    def config_dump(self, proxy_id: str, kind: str) -> dict[str, Any]:
        """What a proxy with this node id gets of one type (``listeners``, ``routes``,
        ``clusters``, ``endpoints``), as JSON. Node metadata is not known here: labels and
        the like are those the id implies."""
        type_url = _CONFIG_TYPES[kind]
        generated = self.generate(ProxyInfo.parse_id(proxy_id), type_url, None)
        return {
            "proxy": proxy_id,
            "type_url": type_url,
            "version": generated.version,
            "resources": [
                json_format.MessageToDict(r) for _, r in sorted(generated.resources.items())
            ],
        }

    # -- PushScope --------------------------------------------------------------------------

    def prepare_push(self, request: PushRequest) -> None:
        self.refresh()

    def affects(self, proxy: ProxyInfo, request: PushRequest) -> bool:
        return True
