"""EDS: one ``ClusterLoadAssignment`` per EDS cluster of a proxy (istiod's endpoint builder).

Rules kept (``ISTIO-TRANSLATION.md`` §5, ``DESIGN.md``'s xDS facts):

* One assignment per cluster, subsets included; a subset's endpoints are the service
  port's endpoints whose labels include the subset's labels.
* Only ready endpoints are sent (their ``health_status`` is HEALTHY).
* Endpoints are grouped by locality (``region/zone/subzone``), groups sorted, and every
  ``LocalityLbEndpoints`` carries ``load_balancing_weight`` = the sum of its endpoints'
  weights -- grpcio's xDS client silently drops a group without it. Each endpoint's weight
  is its own, or 1.
* With outlier detection on the cluster and a proxy locality known, endpoints get Istio's
  failover priorities: 0 same subzone, 1 same zone, 2 same region, 3 elsewhere (compacted).
* An endpoint whose sidecar takes inbound traffic uncaptured (the embedded runtime's pods)
  is sent at its sidecar's inbound port; the sidecar routes by the ``Host`` port.
* ``metadata.filter_metadata["istio"]["workload"]`` is
  ``<workload>;<namespace>;<canonical service>;<canonical revision>;<cluster>`` for every
  endpoint backed by a pod or WorkloadEntry: the source side's metrics name the destination
  from it when the response carries no peer metadata (a server without a sidecar). A pod's
  workload is its Deployment.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2

from meshlet.api.security import MTLSMode
from meshlet.control.registry import Endpoint
from meshlet.control.snapshot import OutboundCluster, Proxy, ProxyView, Snapshot
from meshlet.control.translate.peer_authn import workload_mode

CLUSTER_ID = "Kubernetes"  # Istio's default cluster id, the last field of istio.workload
_HEALTHY = health_check_pb2.HEALTHY


def build_endpoints(snapshot: Snapshot, proxy: Proxy) -> list[endpoint_pb2.ClusterLoadAssignment]:
    """The EDS response for ``proxy``: an assignment for every EDS cluster it has."""
    view = snapshot.view(proxy)
    return [load_assignment(c, view) for c in view.outbound_clusters() if c.uses_eds]


def load_assignment(
    c: OutboundCluster, view: ProxyView, *, direct: bool = False
) -> endpoint_pb2.ClusterLoadAssignment:
    """The assignment of one cluster (EDS, or inline for DNS clusters). ``direct``: every
    endpoint at its target port, sidecar or not (proxyless gRPC clients speak HTTP/2 to the
    application itself)."""
    endpoints = view.endpoints(c.service, c.port.port)
    labels = c.labels
    chosen = [e for e in endpoints if e.ready and (labels is None or e.matches(labels))]
    failover = c.policy.outlier_detection is not None and bool(view.proxy.locality)
    mtls = view.mesh.enable_auto_mtls
    return cluster_load_assignment(
        c.name,
        chosen,
        proxy_locality=view.proxy.locality if failover else "",
        cache=view.snapshot.memo,
        direct=direct,
        mtls=mtls,
        plaintext=_mtls_disabled(chosen, view) if mtls else frozenset(),
    )


def _mtls_disabled(endpoints: Sequence[Endpoint], view: ProxyView) -> frozenset[int]:
    """Auto mTLS sends plaintext to a sidecar whose PeerAuthentication mode for the endpoint's
    port is DISABLE (istiod's mtlsChecker reads workload and port-level policies; namespace
    and mesh ones already decide the whole cluster: ``clusters._auto_mtls``). The ids of
    those endpoints."""
    policies = view.snapshot.peer_authentications
    if not any(p.selector is not None for p in policies):
        return frozenset()
    return frozenset(
        id(e)
        for e in endpoints
        if e.tls_mode == "istio"
        and workload_mode(
            policies,
            namespace=e.namespace,
            labels=e.labels,
            port=e.port,
            root_namespace=view.mesh.root_namespace,
        )
        is MTLSMode.DISABLE
    )


def cluster_load_assignment(
    name: str,
    endpoints: Iterable[Endpoint],
    *,
    proxy_locality: str = "",
    cache: dict[Any, Any] | None = None,
    direct: bool = False,
    mtls: bool = False,
    plaintext: frozenset[int] = frozenset(),
) -> endpoint_pb2.ClusterLoadAssignment:
    """Endpoints grouped by locality, weights set on every group and endpoint.

    ``proxy_locality``: when given, groups get failover priorities relative to it.
    ``cache``: where to keep each endpoint's proto for the next cluster that has it (a
    service's endpoints appear in its cluster and again in its subsets').
    ``plaintext``: ids of endpoints auto mTLS must not pick TLS for (DISABLE).
    """
    groups: dict[str, list[Endpoint]] = {}
    for e in endpoints:
        groups.setdefault(e.locality, []).append(e)
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    priorities: dict[str, int] = {}
    if proxy_locality:
        raw = {loc: _proximity(proxy_locality, loc) for loc in groups}
        compact = {p: i for i, p in enumerate(sorted(set(raw.values())))}
        priorities = {loc: compact[p] for loc, p in raw.items()}
    if cache is None:
        cache = {}
    for locality in sorted(groups):
        group = cla.endpoints.add()
        group.locality.SetInParent()  # always present, as Istio sends it (grpcio needs it)
        if locality:
            region, _, rest = locality.partition("/")
            zone, _, sub_zone = rest.partition("/")
            group.locality.region = region
            group.locality.zone = zone
            group.locality.sub_zone = sub_zone
        if priorities:
            group.priority = priorities[locality]
        members = groups[locality]
        protos = []
        for e in members:
            tls = mtls and id(e) not in plaintext
            key = ("lb_endpoint", id(e), direct, tls)
            proto = cache.get(key)
            if proto is None:
                proto = cache[key] = _lb_endpoint(e, direct, tls)
            protos.append(proto)
        group.lb_endpoints.extend(protos)
        group.load_balancing_weight.value = sum(e.weight or 1 for e in members)
    return cla


def _lb_endpoint(
    e: Endpoint, direct: bool, mtls: bool = False
) -> endpoint_components_pb2.LbEndpoint:
    lbe = endpoint_components_pb2.LbEndpoint(health_status=_HEALTHY)
    sa = lbe.endpoint.address.socket_address
    sa.address = e.address
    sa.port_value = e.port if direct else e.connect_port
    lbe.load_balancing_weight.value = e.weight or 1
    if e.workload:
        lbe.metadata.filter_metadata["istio"].update({"workload": _workload(e)})
    if mtls and e.tls_mode == "istio":  # the endpoint has a sidecar: auto mTLS picks TLS
        lbe.metadata.filter_metadata["envoy.transport_socket_match"].update({"tlsMode": "istio"})
    return lbe


def _proximity(proxy: str, endpoint: str) -> int:
    """Istio's locality failover priority: 0 same subzone ... 3 another region."""
    mine = [*proxy.split("/"), "", "", ""][:3]
    theirs = [*endpoint.split("/"), "", "", ""][:3]
    if mine[0] != theirs[0]:
        return 3
    if mine[1] != theirs[1]:
        return 2
    if mine[2] != theirs[2]:
        return 1
    return 0


def workload_name(e: Endpoint) -> str:
    """The Deployment's name for a pod it owns (``<deployment>-<pod-template-hash>-<suffix>``,
    as Istio's ``GetDeployMetaFromPod`` derives it), else the pod or WorkloadEntry name."""
    template_hash = e.labels.get("pod-template-hash", "")
    if template_hash:
        owner, found, _ = e.workload.rpartition(f"-{template_hash}-")
        if found and owner:
            return owner
    return e.workload


def _workload(e: Endpoint) -> str:
    """Istio's ``istio.workload`` metadata: the canonical service and revision from the
    labels (``service.istio.io/canonical-*``, else the app and version labels, as Istio's
    injector sets them; ``latest`` when there is no version)."""
    labels = e.labels
    workload = workload_name(e)
    service = (
        labels.get("service.istio.io/canonical-name")
        or labels.get("app.kubernetes.io/name")
        or labels.get("app")
        or workload
    )
    revision = (
        labels.get("service.istio.io/canonical-revision")
        or labels.get("app.kubernetes.io/version")
        or labels.get("version")
        or "latest"
    )
    return f"{workload};{e.namespace};{service};{revision};{CLUSTER_ID}"


__all__ = [
    "CLUSTER_ID",
    "build_endpoints",
    "cluster_load_assignment",
    "load_assignment",
    "workload_name",
]
