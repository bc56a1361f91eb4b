"""The proxy's whole configuration, compiled from a Bootstrap into one immutable value.

``compile_bootstrap`` checks every part and reports every problem at once (one line each,
naming the field); nothing is applied unless everything compiles. The same per-resource
compilers (``compile_listener``, ``compile_cluster``) serve resources arriving over ADS: a
bootstrap with ``dynamic_resources`` compiles to a static base plus an ``AdsConfig`` saying
where the control plane is; ``xds_client`` then builds each new ``ProxyConfig`` from that base
and the resources it accepted (``with_dynamic``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2
from google.protobuf.message import Message

from meshlet.errors import ConfigError, ProblemList
from meshlet.proxy.fields import ads_config_source, check_fields, join
from meshlet.proxy.listener import ListenerConfig, compile_listener
from meshlet.proxy.secrets import Secret, compile_secret
from meshlet.proxy.telemetry.stats import NodeInfo
from meshlet.proxy.tls import TlsConfig
from meshlet.proxy.upstream.cluster import ClusterConfig, compile_cluster

_BOOTSTRAP_FIELDS = {"node", "admin", "static_resources", "dynamic_resources"}
_ADMIN_FIELDS = {"address", "access_log", "access_log_path"}
_DYNAMIC_FIELDS = {"ads_config", "lds_config", "cds_config"}
_ADS_CONFIG_FIELDS = {
    "api_type",
    "transport_api_version",
    "grpc_services",
    "set_node_on_first_message_only",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class AdsConfig:
    """Where the control plane is (``dynamic_resources.ads_config``) and what to ask it for."""

    cluster_name: str  # the static cluster of the control plane
    target: str  # host:port for gRPC, from that cluster's first endpoint
    lds: bool
    cds: bool
    tls: TlsConfig | None = None  # that cluster's transport socket: ADS over (m)TLS


@dataclass(frozen=True, slots=True, kw_only=True)
class DynamicResource:
    """A resource accepted over ADS, as ``/config_dump`` shows it."""

    name: str
    version: str
    proto: Message
    last_updated: float


@dataclass(frozen=True, slots=True, kw_only=True)
class DynamicResources:
    listeners: tuple[DynamicResource, ...] = ()
    clusters: tuple[DynamicResource, ...] = ()
    routes: tuple[DynamicResource, ...] = ()
    secrets: tuple[DynamicResource, ...] = ()
    lds_version: str = ""
    cds_version: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyConfig:
    node: base_pb2.Node
    node_info: NodeInfo
    admin: tuple[str, int] | None
    listeners: tuple[ListenerConfig, ...]
    clusters: tuple[ClusterConfig, ...]
    bootstrap: bootstrap_pb2.Bootstrap  # kept for /config_dump
    ads: AdsConfig | None = None  # set when the bootstrap has dynamic_resources
    dynamic: DynamicResources = DynamicResources()  # what came over ADS, for /config_dump
    secrets: tuple[tuple[str, Secret], ...] = ()  # static_resources.secrets, then SDS ones

    def with_dynamic(
        self,
        listeners: tuple[ListenerConfig, ...],
        clusters: tuple[ClusterConfig, ...],
        dynamic: DynamicResources,
        secrets: tuple[tuple[str, Secret], ...] = (),
    ) -> ProxyConfig:
        """This (static) configuration plus resources from ADS."""
        return replace(
            self,
            listeners=self.listeners + listeners,
            clusters=self.clusters + clusters,
            dynamic=dynamic,
            secrets=self.secrets + secrets,
        )

    def secret_names(self) -> frozenset[str]:
        """The SDS secrets that listeners and clusters name."""
        names: set[str] = set()
        for lc in self.listeners:
            names |= lc.secret_names()
        for cc in self.clusters:
            names |= cc.secret_names()
        return frozenset(names)


def compile_bootstrap(proto: bootstrap_pb2.Bootstrap) -> ProxyConfig:
    """Compile a Bootstrap; raises ``ConfigError`` with every problem found."""
    problems = ProblemList()
    try:
        check_fields(proto, "", _BOOTSTRAP_FIELDS)
        check_fields(
            proto.static_resources, "static_resources", {"listeners", "clusters", "secrets"}
        )
    except ConfigError as e:
        problems.extend(e)
    admin: tuple[str, int] | None = None
    if proto.HasField("admin"):
        try:
            admin = _compile_admin(proto.admin)
        except ConfigError as e:
            problems.extend(e)
    clusters: list[ClusterConfig] = []
    seen: set[str] = set()
    # Names of clusters that failed to compile still count for route validation: one bad
    # cluster should be reported once, not again by every route that names it.
    named = {c.name for c in proto.static_resources.clusters}
    for i, c in enumerate(proto.static_resources.clusters):
        path = f"static_resources.clusters[{i}]"
        try:
            config = compile_cluster(c, path)
        except ConfigError as e:
            problems.extend(e)
            continue
        if config.name in seen:
            problems.add(join(path, "name"), f"duplicate cluster name {config.name!r}")
        seen.add(config.name)
        clusters.append(config)
    listeners: list[ListenerConfig] = []
    addresses: set[tuple[str, int]] = set()
    for i, lp in enumerate(proto.static_resources.listeners):
        path = f"static_resources.listeners[{i}]"
        try:
            listener = compile_listener(lp, path)
        except ConfigError as e:
            problems.extend(e)
            continue
        if (listener.host, listener.port) in addresses and listener.port != 0:
            problems.add(join(path, "address"), f"{listener.host}:{listener.port} is used twice")
        addresses.add((listener.host, listener.port))
        # Envoy validates clusters of inline (static) route configurations by default.
        for c, chain in enumerate(listener.chains):
            table = chain.hcm.route_table
            route_path = join(path, f"filter_chains[{c}].filters[0].typed_config.route_config")
            for name in sorted(table.referenced_clusters() - named):
                problems.add(route_path, f"route names unknown cluster {name!r}")
        listeners.append(listener)
    secrets: list[tuple[str, Secret]] = []
    for i, sp in enumerate(proto.static_resources.secrets):
        path = f"static_resources.secrets[{i}]"
        try:
            name, secret = compile_secret(sp, path)
        except ConfigError as e:
            problems.extend(e)
            continue
        if any(n == name for n, _ in secrets):
            problems.add(join(path, "name"), f"duplicate secret name {name!r}")
        secrets.append((name, secret))
    ads: AdsConfig | None = None
    if proto.HasField("dynamic_resources"):
        try:
            ads = _compile_dynamic(proto.dynamic_resources, clusters)
        except ConfigError as e:
            problems.extend(e)
    problems.raise_if_any()
    return ProxyConfig(
        node=proto.node,
        node_info=NodeInfo.from_node(proto.node),
        admin=admin,
        listeners=tuple(listeners),
        clusters=tuple(clusters),
        bootstrap=proto,
        ads=ads,
        secrets=tuple(secrets),
    )


def _compile_dynamic(
    dynamic: bootstrap_pb2.Bootstrap.DynamicResources, clusters: list[ClusterConfig]
) -> AdsConfig:
    """``dynamic_resources``: one ADS gRPC service on a static cluster; LDS and CDS by ADS."""
    path = "dynamic_resources"
    problems = ProblemList()
    try:
        check_fields(dynamic, path, _DYNAMIC_FIELDS)
    except ConfigError as e:
        problems.extend(e)
    ads_path = join(path, "ads_config")
    cluster_name = ""
    if not dynamic.HasField("ads_config"):
        problems.add(ads_path, "is required (meshlet speaks ADS only)")
    else:
        ads = dynamic.ads_config
        try:
            check_fields(ads, ads_path, _ADS_CONFIG_FIELDS)
        except ConfigError as e:
            problems.extend(e)
        if ads.api_type != config_source_pb2.ApiConfigSource.GRPC:
            name = config_source_pb2.ApiConfigSource.ApiType.Name(ads.api_type)
            problems.add(join(ads_path, "api_type"), f"{name} is not supported (supported: GRPC)")
        if ads.transport_api_version != config_source_pb2.V3:
            name = config_source_pb2.ApiVersion.Name(ads.transport_api_version)
            problems.add(
                join(ads_path, "transport_api_version"), f"{name} is not supported (use V3)"
            )
        if len(ads.grpc_services) != 1:
            problems.add(join(ads_path, "grpc_services"), "exactly one gRPC service is required")
        else:
            service = ads.grpc_services[0]
            spath = join(ads_path, "grpc_services[0]")
            try:
                check_fields(service, spath, {"envoy_grpc"})
                check_fields(service.envoy_grpc, join(spath, "envoy_grpc"), {"cluster_name"})
            except ConfigError as e:
                problems.extend(e)
            cluster_name = service.envoy_grpc.cluster_name
            if not service.HasField("envoy_grpc") or not cluster_name:
                problems.add(join(spath, "envoy_grpc.cluster_name"), "is required")
    for field in ("lds_config", "cds_config"):
        if not dynamic.HasField(field):
            continue
        source = getattr(dynamic, field)
        fpath = join(path, field)
        try:
            timeout = ads_config_source(source, fpath)
        except ConfigError as e:
            problems.extend(e)
            continue
        if timeout is not None and source.HasField("initial_fetch_timeout"):
            # The proxy waits for its first listeners and clusters without limit.
            problems.add(join(fpath, "initial_fetch_timeout"), "only 0s is supported")
    target = ""
    tls = None
    if cluster_name:
        found = next((c for c in clusters if c.name == cluster_name), None)
        where = join(ads_path, "grpc_services[0].envoy_grpc.cluster_name")
        if found is None:
            problems.add(where, f"{cluster_name!r} is not a static cluster (static_resources)")
        elif not found.endpoints:
            problems.add(where, f"cluster {cluster_name!r} has no endpoints")
        else:
            ep = found.endpoints[0]
            host = f"[{ep.address}]" if ":" in ep.address else ep.address
            target = f"{host}:{ep.port}"
            tls = found.transport_socket
    problems.raise_if_any()
    return AdsConfig(
        cluster_name=cluster_name,
        target=target,
        lds=dynamic.HasField("lds_config"),
        cds=dynamic.HasField("cds_config"),
        tls=tls,
    )


def _compile_admin(admin: bootstrap_pb2.Admin) -> tuple[str, int]:
    check_fields(admin, "admin", _ADMIN_FIELDS)
    check_fields(admin.address, "admin.address", {"socket_address"})
    sa = admin.address.socket_address
    check_fields(sa, "admin.address.socket_address", {"address", "port_value", "protocol"})
    if not sa.address:
        raise ConfigError.at("admin.address.socket_address.address", "is required")
    return sa.address, sa.port_value
