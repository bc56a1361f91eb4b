"""A simulation kit in the style of istiod's simulation tests: YAML in, then "which listener,
virtual host, route, cluster and endpoint would this request take?" out -- without sockets.

``Simulation(yaml, ...)`` loads the documents, runs every Deployment as pods with made-up
IPs (``10.0.0.1``, ``10.0.0.2``, ... in document order), builds the registry and snapshot,
and translates for a proxy. ``simulate`` then runs the generated configuration through
meshlet's own proxy: the listener through ``compile_listener`` and its route table's
``select`` -- so what is tested is what the proxy would do -- and picks an endpoint from the
generated ``ClusterLoadAssignment``.

``refusals(proxy)`` compiles every generated resource with the proxy's compilers (an EDS
cluster with its assignment inlined as STATIC, since the proxy has no EDS yet) and lists
what the proxy refuses.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from meshlet.api import LoadedResource, load_documents
from meshlet.api import kube as k8s
from meshlet.control.registry import ConfigRegistry, Workload
from meshlet.control.snapshot import DEFAULT_MESH, MeshConfig, Proxy, ProxyType, Snapshot
from meshlet.control.translate import ProxyResources, build_all
from meshlet.errors import ConfigError
from meshlet.proxy.filters.fault import FaultPolicy
from meshlet.proxy.headers import Headers, RequestHead
from meshlet.proxy.listener import compile_listener
from meshlet.proxy.retry import RetryPolicy
from meshlet.proxy.routing import (
    DirectResponseAction,
    RedirectAction,
    RouteAction,
    RouteTable,
    compile_route_config,
)
from meshlet.proxy.upstream.cluster import compile_cluster
from tests.samples import SAMPLES as _FOUND

SAMPLES = _FOUND if _FOUND is not None else Path("/nonexistent/istio-samples")
BOOKINFO = SAMPLES / "bookinfo"
BOOKINFO_APP = BOOKINFO / "platform" / "kube" / "bookinfo.yaml"
BOOKINFO_NETWORKING = BOOKINFO / "networking"


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    """Where one request went. ``status`` is set when the proxy answers itself: a direct
    response, a redirect (with ``location``), or 404 when no virtual host or route matched."""

    listener: str
    route_config: str
    virtual_host: str | None = None
    route: str | None = None
    cluster: str | None = None
    weights: Mapping[str, int] = field(default_factory=dict)  # weighted clusters only
    endpoint: str | None = None  # "ip:port", the first endpoint of the cluster
    endpoints: tuple[str, ...] = ()
    status: int | None = None
    location: str | None = None
    body: bytes = b""
    fault: FaultPolicy | None = None
    retry: RetryPolicy | None = None
    timeout: float | None = None
    action: object = None  # the compiled RouteAction / RedirectAction / DirectResponseAction
    route_proto: route_components_pb2.Route | None = None
    request: RequestHead | None = None  # the request as sent upstream (rewrites applied)

    @property
    def matched(self) -> bool:
        return self.route is not None


def workloads_from_deployments(resources: Iterable[LoadedResource]) -> list[Workload]:
    """Each Deployment's replicas as pods with IPs 10.0.0.1, 10.0.0.2, ..., in order."""
    out: list[Workload] = []
    for r in resources:
        if not isinstance(r.model, k8s.Deployment):
            continue
        spec = r.model.spec
        template = spec.template
        ports = {
            p.name: p.container_port for c in template.spec.containers for p in c.ports if p.name
        }
        for i in range(spec.effective_replicas):
            n = len(out) + 1
            out.append(
                Workload(
                    name=f"{r.name}-{i}",
                    namespace=r.namespace or "default",
                    address=f"10.0.{n // 250}.{n % 250}",
                    labels=dict(template.metadata.labels),
                    ports=ports,
                    service_account=template.spec.effective_service_account,
                )
            )
    return out


class Simulation:
    """A mesh built from YAML, ready to translate and to route simulated requests."""

    def __init__(
        self,
        *texts: str,
        files: Sequence[Path] = (),
        mesh: MeshConfig = DEFAULT_MESH,
        workloads: Sequence[Workload] = (),
    ) -> None:
        resources: list[LoadedResource] = []
        for path in files:
            resources.extend(load_documents(path.read_text(), str(path)))
        for i, text in enumerate(texts):
            resources.extend(load_documents(text, f"<yaml {i}>"))
        self.resources = resources
        self.workloads = [*workloads_from_deployments(resources), *workloads]
        self.registry = ConfigRegistry(
            resources, workloads=self.workloads, domain_suffix=mesh.domain_suffix
        )
        self.snapshot = Snapshot.build(resources, self.registry, mesh)
        self._built: dict[tuple[object, ...], ProxyResources] = {}

    def __repr__(self) -> str:
        return f"<Simulation {self.snapshot!r}>"

    # -- proxies --------------------------------------------------------------------------

    def sidecar(self, workload: str) -> Proxy:
        """The sidecar of the (first) pod whose name starts with ``workload``."""
        for w in self.workloads:
            if w.name.startswith(workload):
                return Proxy(
                    ip=w.address,
                    namespace=w.namespace,
                    pod_name=w.name,
                    labels=dict(w.labels),
                    service_account=w.service_account,
                    workload_name=w.name.rsplit("-", 1)[0],
                )
        raise LookupError(f"no workload named {workload}*")

    @staticmethod
    def client(
        namespace: str = "default",
        labels: Mapping[str, str] | None = None,
        ip: str = "10.9.9.9",
        kind: ProxyType = ProxyType.SIDECAR,
    ) -> Proxy:
        """A proxy for a workload that serves nothing (a client)."""
        return Proxy(
            ip=ip, namespace=namespace, pod_name="client", labels=dict(labels or {}), type=kind
        )

    # -- translation ----------------------------------------------------------------------

    def build(self, proxy: Proxy) -> ProxyResources:
        key = proxy.key
        if key not in self._built:
            self._built[key] = build_all(self.snapshot, proxy)
        return self._built[key]

    def listener(self, proxy: Proxy, name: str) -> listener_pb2.Listener:
        for listener in self.build(proxy).listeners:
            if listener.name == name:
                return listener
        raise LookupError(f"no listener {name}")

    def route_config(self, proxy: Proxy, name: str) -> route_pb2.RouteConfiguration:
        for config in self.build(proxy).routes:
            if config.name == name:
                return config
        raise LookupError(f"no route configuration {name}")

    def cluster(self, proxy: Proxy, name: str) -> cluster_pb2.Cluster:
        for c in self.build(proxy).clusters:
            if c.name == name:
                return c
        raise LookupError(f"no cluster {name}")

    def assignment(self, proxy: Proxy, name: str) -> endpoint_pb2.ClusterLoadAssignment | None:
        for cla in self.build(proxy).endpoints:
            if cla.cluster_name == name:
                return cla
        for c in self.build(proxy).clusters:
            if c.name == name and c.HasField("load_assignment"):
                return c.load_assignment
        return None

    def endpoints(self, proxy: Proxy, cluster: str) -> tuple[str, ...]:
        cla = self.assignment(proxy, cluster)
        if cla is None:
            return ()
        return tuple(
            f"{e.endpoint.address.socket_address.address}:"
            f"{e.endpoint.address.socket_address.port_value}"
            for group in cla.endpoints
            for e in group.lb_endpoints
        )

    # -- requests -------------------------------------------------------------------------

    def simulate(
        self,
        proxy: Proxy,
        *,
        host: str,
        port: int | None = None,
        path: str = "/",
        method: str = "GET",
        headers: Mapping[str, str] | Sequence[tuple[str, str]] = (),
        scheme: str = "http",
        via: Literal["outbound", "inbound", "rds", "gateway"] = "outbound",
        rand: int = 0,
    ) -> Result:
        """Route one request as ``proxy`` would.

        ``via``: ``outbound`` (the sidecar's explicit-proxy listener, ``virtualOutbound``),
        ``inbound`` (``virtualInbound``), ``rds`` (the ``"<port>"`` route configuration, as
        Istio's port listeners use it) or ``gateway`` (the gateway's listener on ``port``).
        ``rand`` is the per-request random number that picks among weighted clusters.
        """
        authority = host if port is None else f"{host}:{port}"
        items = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
        head = RequestHead(
            method=method.encode(),
            path=path.encode(),
            authority=authority.encode(),
            headers=Headers([(k.lower().encode(), v.encode()) for k, v in items]),
            scheme=scheme.encode(),
        )
        listener_name, table = self._table(proxy, via, port)
        selection = table.select(head)
        base = {"listener": listener_name, "route_config": table.name}
        if selection is None:
            return Result(**base, status=404)  # type: ignore[arg-type]
        vhost = selection.virtual_host.name
        route = selection.route
        if route is None:
            return Result(**base, virtual_host=vhost, status=404)  # type: ignore[arg-type]
        index = next(i for i, r in enumerate(selection.virtual_host.routes) if r is route)
        proto = self._route_proto(proxy, via, port, table.name, vhost, index)
        action = route.action
        common = {
            **base,
            "virtual_host": vhost,
            "route": route.name,
            "action": action,
            "route_proto": proto,
        }
        if isinstance(action, DirectResponseAction):
            return Result(**common, status=action.status, body=action.body, fault=route.fault)  # type: ignore[arg-type]
        if isinstance(action, RedirectAction):
            status, location = action.response(head)
            return Result(**common, status=status, location=location.decode(), fault=route.fault)  # type: ignore[arg-type]
        assert isinstance(action, RouteAction)
        choice = action.choose_cluster(head, rand)
        weights: dict[str, int] = {}
        if action.total_weight:
            previous = 0
            for c, end in zip(action.clusters, action.weight_ends, strict=True):
                weights[c.name] = end - previous
                previous = end
        route.finalize_request(head, choice)
        endpoints = self.endpoints(proxy, choice.name)
        return Result(  # type: ignore[arg-type]
            **common,
            cluster=choice.name,
            weights=weights,
            endpoint=endpoints[0] if endpoints else None,
            endpoints=endpoints,
            retry=action.retry_policy,
            timeout=action.timeout,
            fault=choice.fault,
            request=head,
        )

    def _table(self, proxy: Proxy, via: str, port: int | None) -> tuple[str, RouteTable]:
        if via == "rds":
            name = str(port or 80)
            return name, compile_route_config(self.route_config(proxy, name), name)
        if via == "gateway":
            name = f"0.0.0.0_{port or 80}"
        else:
            name = "virtualInbound" if via == "inbound" else "virtualOutbound"
        config = compile_listener(self.listener(proxy, name), name)
        return name, config.hcm.route_table

    def _route_proto(
        self, proxy: Proxy, via: str, port: int | None, config: str, vhost: str, index: int
    ) -> route_components_pb2.Route | None:
        if via == "rds":
            rc = self.route_config(proxy, config)
        else:
            listener = self.listener(proxy, self._table(proxy, via, port)[0])
            hcm = hcm_pb2.HttpConnectionManager()
            listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
            rc = hcm.route_config
        for vh in rc.virtual_hosts:
            if vh.name == vhost:
                return vh.routes[index]
        return None

    # -- what the proxy refuses -------------------------------------------------------------

    def refusals(self, proxy: Proxy) -> list[str]:
        """Every problem meshlet's proxy finds in the proxy's generated resources."""
        built = self.build(proxy)
        problems: list[str] = []

        def attempt(what: str, fn: object) -> None:
            try:
                assert callable(fn)
                fn()
            except ConfigError as e:
                problems.extend(f"{what}: {p.path}: {p.message}" for p in e.problems)

        for listener in built.listeners:
            attempt(f"listener {listener.name}", lambda x=listener: compile_listener(x, ""))
        for config in built.routes:
            attempt(f"route {config.name}", lambda c=config: compile_route_config(c, ""))
        assignments = {cla.cluster_name: cla for cla in built.endpoints}
        for cluster in built.clusters:
            attempt(
                f"cluster {cluster.name}",
                lambda c=cluster: compile_cluster(as_static(c, assignments.get(c.name)), ""),
            )
        return problems


def as_static(
    cluster: cluster_pb2.Cluster, cla: endpoint_pb2.ClusterLoadAssignment | None
) -> cluster_pb2.Cluster:
    """An EDS cluster as the STATIC cluster it amounts to once its assignment is in (the proxy
    has no EDS yet); other clusters as they are."""
    if cluster.type != cluster_pb2.Cluster.EDS:
        return cluster
    copy = cluster_pb2.Cluster()
    copy.CopyFrom(cluster)
    copy.ClearField("eds_cluster_config")
    copy.type = cluster_pb2.Cluster.STATIC
    if cla is not None:
        copy.load_assignment.CopyFrom(cla)
    return copy


def bookinfo(
    *extra: str, networking: Sequence[str] = (), mesh: MeshConfig = DEFAULT_MESH
) -> Simulation:
    """Bookinfo's ``bookinfo.yaml`` with some of its networking samples (file names) and
    ``extra`` YAML. Skips the calling test when the samples are not on this machine."""
    if not BOOKINFO_APP.is_file():
        pytest.skip("Istio samples not present")
    files = [BOOKINFO_APP, *(BOOKINFO_NETWORKING / name for name in networking)]
    return Simulation(*extra, files=files, mesh=mesh)


def app(
    name: str,
    namespace: str = "default",
    *,
    ports: Mapping[str, int] | None = None,
    versions: Sequence[str] = ("v1",),
    replicas: int = 1,
    service_account: str = "",
) -> str:
    """YAML for a Kubernetes Service ``name`` (ports by name, default ``http: 9080``) and a
    Deployment per version, labelled ``app: name, version: v``."""
    ports = dict(ports or {"http": 9080})
    port_lines = "".join(
        f"  - name: {port_name}\n    port: {number}\n" for port_name, number in ports.items()
    )
    container_ports = "".join(
        f"        - containerPort: {number}\n          name: {port_name[:15]}\n"
        for port_name, number in ports.items()
    )
    docs = [
        f"apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {namespace}\n"
        f"spec:\n  selector:\n    app: {name}\n  ports:\n{port_lines}"
    ]
    for version in versions:
        account = f"      serviceAccountName: {service_account}\n" if service_account else ""
        docs.append(
            f"apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}-{version}\n"
            f"  namespace: {namespace}\nspec:\n  replicas: {replicas}\n  selector:\n"
            f"    matchLabels:\n      app: {name}\n      version: {version}\n  template:\n"
            f"    metadata:\n      labels:\n        app: {name}\n        version: {version}\n"
            f"    spec:\n{account}      containers:\n      - name: {name}\n        image: x\n"
            f"        ports:\n{container_ports}"
        )
    return "---\n".join(docs)
