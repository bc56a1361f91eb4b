"""The proxy's whole configuration, compiled from a Bootstrap into one immutable value.

``compile_bootstrap`` checks every part and reports every problem at once (one line each,
naming the field); nothing is applied unless everything compiles. The same per-resource
compilers (``compile_listener``, ``compile_cluster``) will serve resources arriving over ADS.
"""

from __future__ import annotations

from dataclasses import dataclass

from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.core.v3 import base_pb2

from meshlet.errors import ConfigError, ProblemList
from meshlet.proxy.fields import check_fields, join
from meshlet.proxy.listener import ListenerConfig, compile_listener
from meshlet.proxy.telemetry.stats import NodeInfo
from meshlet.proxy.upstream.cluster import ClusterConfig, compile_cluster

_BOOTSTRAP_FIELDS = {"node", "admin", "static_resources"}
_ADMIN_FIELDS = {"address", "access_log", "access_log_path"}


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyConfig:
    node: base_pb2.Node
    node_info: NodeInfo
    admin: tuple[str, int] | None
    listeners: tuple[ListenerConfig, ...]
    clusters: tuple[ClusterConfig, ...]
    bootstrap: bootstrap_pb2.Bootstrap  # kept for /config_dump


def compile_bootstrap(proto: bootstrap_pb2.Bootstrap) -> ProxyConfig:
    """Compile a Bootstrap; raises ``ConfigError`` with every problem found."""
    problems = ProblemList()
    try:
        check_fields(proto, "", _BOOTSTRAP_FIELDS)
        check_fields(proto.static_resources, "static_resources", {"listeners", "clusters"})
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
        table = listener.hcm.route_table
        route_path = join(path, "filter_chains[0].filters[0].typed_config.route_config")
        for name in sorted(table.referenced_clusters() - named):
            problems.add(route_path, f"route names unknown cluster {name!r}")
        listeners.append(listener)
    problems.raise_if_any()
    return ProxyConfig(
        node=proto.node,
        node_info=NodeInfo.from_node(proto.node),
        admin=admin,
        listeners=tuple(listeners),
        clusters=tuple(clusters),
        bootstrap=proto,
    )


def _compile_admin(admin: bootstrap_pb2.Admin) -> tuple[str, int]:
    check_fields(admin, "admin", _ADMIN_FIELDS)
    check_fields(admin.address, "admin.address", {"socket_address"})
    sa = admin.address.socket_address
    check_fields(sa, "admin.address.socket_address", {"address", "port_value", "protocol"})
    if not sa.address:
        raise ConfigError.at("admin.address.socket_address.address", "is required")
    return sa.address, sa.port_value
