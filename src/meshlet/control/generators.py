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
* A rebuild costs what changed: objects whose ``resourceVersion`` did not move keep their
  validated form, the registry is reused when no Service, ServiceEntry, WorkloadEntry or Pod
  changed, a VirtualService that did not change keeps its prepared form, and when only
  VirtualServices and Gateways changed, clusters and endpoints already generated are kept
  (they do not depend on routes).
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from google.protobuf import any_pb2, json_format, message

from meshlet.api import LoadedResource, load_object
from meshlet.control.registry import ConfigRegistry
from meshlet.control.snapshot import DEFAULT_MESH, MeshConfig, Proxy, ProxyType, Snapshot
from meshlet.control.store import Event, ExpiredError, ObjectKey, Store
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


def build_snapshot(
    objects: Iterable[Mapping[str, Any]], mesh: MeshConfig = DEFAULT_MESH
) -> Snapshot:
    """The snapshot of a store's objects, with a ``ConfigRegistry`` over them."""
    resources = load_stored(objects)
    return Snapshot.build(resources, ConfigRegistry(resources), mesh)


#: A refresh that validated this many objects freezes the heap (see ``refresh``).
FREEZE_AFTER = 1000
#: Kinds the registry is built from; any other change leaves it as it was.
_REGISTRY_KINDS = frozenset({"Service", "ServiceEntry", "WorkloadEntry", "Pod"})
#: Kinds that change only routes (LDS and RDS); clusters and endpoints stay as generated.
_ROUTE_ONLY_KINDS = frozenset({"VirtualService", "Gateway", "Telemetry"})
_ROUTE_TYPES = frozenset({LISTENER_TYPE, ROUTE_TYPE})

_Key = tuple[Any, ...]


class _Loaded:
    """Validated objects by store key, with the resourceVersion they were validated at."""

    def __init__(self) -> None:
        self.objects: dict[ObjectKey, tuple[Any, LoadedResource | None]] = {}
        self.validated = 0  # objects validated so far

    def resources(self) -> list[LoadedResource]:
        """In the store's listing order (namespace, name, group, kind), as a full read has."""
        keys = sorted(self.objects, key=lambda k: (k.namespace, k.name, k.group, k.kind))
        return [r for k in keys if (r := self.objects[k][1]) is not None]

    def replace(self, objects: Iterable[Mapping[str, Any]]) -> set[str]:
        """Take the store's whole content; the kinds that changed."""
        old = self.objects
        self.objects = {}
        changed: set[str] = set()
        for obj in objects:
            key = ObjectKey.of(obj)
            version = (obj.get("metadata") or {}).get("resourceVersion")
            kept = old.get(key)
            if kept is not None and version is not None and kept[0] == version:
                self.objects[key] = kept
            else:
                self._validate(key, obj)
                changed.add(key.kind)
        changed.update(k.kind for k in old.keys() - self.objects.keys())
        return changed

    def apply(self, events: Iterable[Event]) -> set[str]:
        """Take the store's changes since the last read; the kinds that changed."""
        changed: set[str] = set()
        for event in events:
            changed.add(event.key.kind)
            if event.type == "DELETED":
                self.objects.pop(event.key, None)
            else:
                self._validate(event.key, event.object)
        return changed

    def _validate(self, key: ObjectKey, obj: Mapping[str, Any]) -> None:
        self.validated += 1
        found = load_stored([obj])
        version = (obj.get("metadata") or {}).get("resourceVersion")
        self.objects[key] = (version, found[0] if found else None)


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

    def __init__(self, store: Store, *, mesh: MeshConfig = DEFAULT_MESH) -> None:
        self.store = store
        self.mesh = mesh
        self._lock = threading.Lock()  # refresh may also be called off the loop (at start)
        self.revision = -1
        self.snapshot = build_snapshot((), mesh)
        self._cache: dict[tuple[Any, ...], dict[str, any_pb2.Any]] = {}
        self._loaded = _Loaded()
        self._registry = ConfigRegistry(())
        self._memo: dict[Any, Any] = {}
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
            before = self._loaded.validated
            changed = self._read_changes()
            if self._loaded.validated - before >= FREEZE_AFTER:
                # Many objects were just validated: they live until they change. Move them out
                # of the collector's sight (after a collection, so that no garbage is frozen),
                # so that full collections -- 150 ms for a 1,000-service mesh -- no longer
                # land in the middle of pushes. Snapshots stay unfrozen: they are replaced.
                gc.collect()
                gc.freeze()
            resources = self._loaded.resources()
            if changed & _REGISTRY_KINDS:
                self._registry = ConfigRegistry(resources)
            memo = self._memo
            self._memo = {}  # only what this build uses is kept for the next one
            self.snapshot = Snapshot.build(
                resources, self._registry, self.mesh, memo=_Carry(memo, self._memo)
            )
            self.revision = revision
            if changed <= _ROUTE_ONLY_KINDS:
                self._cache = {
                    k: v for k, v in self._cache.items() if _type_of(k) not in _ROUTE_TYPES
                }
            else:
                self._cache = {}
        log.info("snapshot at revision %d: %r", revision, self.snapshot)
        return True

    def _read_changes(self) -> set[str]:
        """Bring the validated objects up to the store; the kinds that changed. Reads only
        the changes since the last snapshot while the store's history still has them."""
        if self.revision >= 0:
            try:
                return self._loaded.apply(self.store.history(self.revision))
            except ExpiredError:
                pass
        return self._loaded.replace(self.store.list())

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
        key = self._key(type_url, target)
        resources = self._cache.get(key)
        if resources is None:
            resources = {_name(r): _pack(r) for r in builder(self.snapshot, target)}
            self._cache[key] = resources
        if names is not None:
            resources = {n: resources[n] for n in names if n in resources}
        return GeneratedResources(version=str(self.revision), resources=resources)

    def _key(self, type_url: str, proxy: Proxy) -> tuple[Any, ...]:
        """What a proxy's resources of one type depend on. Endpoints depend only on which
        services it sees (its type, namespace and Sidecar) and its locality (failover), so
        the proxies of one scope share them; other types are the proxy's own."""
        if type_url == ENDPOINT_TYPE:
            sidecar = self.snapshot.sidecar_for(proxy)
            scope = None if sidecar is None else (sidecar.namespace, sidecar.name)
            return (type_url, proxy.type, proxy.namespace, scope, proxy.locality)
        return (type_url, proxy.type, proxy.key)

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


def _type_of(key: tuple[Any, ...]) -> Any:
    """The type URL in a cache key (``(type, ...)`` or ``("grpc", type, ...)``)."""
    return key[1] if key[0] == "grpc" else key[0]


class _Carry(dict[Any, Any]):
    """A memo that reads from the last build's and records what this build used, so that
    entries of deleted objects are dropped after one build."""

    def __init__(self, previous: dict[Any, Any], current: dict[Any, Any]) -> None:
        super().__init__()
        self.previous = previous
        self.current = current

    def get(self, key: Any, default: Any = None) -> Any:
        value = self.current.get(key)
        if value is None:
            value = self.previous.get(key)
            if value is not None:
                self.current[key] = value
        return default if value is None else value

    def __setitem__(self, key: Any, value: Any) -> None:
        self.current[key] = value
