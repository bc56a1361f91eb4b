"""``/config_dump``: the configuration in force, as Envoy's admin ``ConfigDump`` JSON.

Order and message types are Envoy's: Bootstrap, Clusters, Listeners, Routes, Secrets, each an
``Any`` with its ``@type``; resources from ADS appear as Envoy shows them
(``dynamic_active_clusters``, ``dynamic_listeners``, ``dynamic_route_configs``,
``dynamic_active_secrets``, each with its ``version_info``). Imported
only when the admin endpoint is used (it pulls in the admin protos and protobuf's JSON
printer). Private keys are shown as ``[redacted]``, as Envoy shows its sensitive fields.
"""

from __future__ import annotations

from typing import Any

from envoy.admin.v3 import config_dump_pb2, config_dump_shared_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf import json_format, timestamp_pb2

from meshlet.proxy.config import ProxyConfig


def config_dump(config: ProxyConfig, loaded_at: float, resource: str = "") -> dict[str, Any]:
    updated = timestamp_pb2.Timestamp()
    updated.FromNanoseconds(int(loaded_at * 1e9))
    bootstrap = config.bootstrap
    if bootstrap.static_resources.secrets:
        bootstrap = type(bootstrap)()
        bootstrap.CopyFrom(config.bootstrap)
        for sp in bootstrap.static_resources.secrets:
            _redact(sp)
    dumps = config_dump_pb2.ConfigDump()

    boot = config_dump_pb2.BootstrapConfigDump(bootstrap=bootstrap, last_updated=updated)
    clusters = config_dump_shared_pb2.ClustersConfigDump()
    for c in bootstrap.static_resources.clusters:
        clusters.static_clusters.add(last_updated=updated).cluster.Pack(c)
    listeners = config_dump_shared_pb2.ListenersConfigDump()
    routes = config_dump_shared_pb2.RoutesConfigDump()
    for lp in bootstrap.static_resources.listeners:
        listeners.static_listeners.add(last_updated=updated).listener.Pack(lp)
        for chain in lp.filter_chains:
            for f in chain.filters:
                hcm = hcm_pb2.HttpConnectionManager()
                if f.typed_config.Unpack(hcm) and hcm.HasField("route_config"):
                    routes.static_route_configs.add(last_updated=updated).route_config.Pack(
                        hcm.route_config
                    )
    _add_dynamic(config, clusters, listeners, routes)
    secrets = config_dump_pb2.SecretsConfigDump()
    for sp in bootstrap.static_resources.secrets:
        secrets.static_secrets.add(name=sp.name, last_updated=updated).secret.Pack(sp)
    for r in config.dynamic.secrets:
        entry = secrets.dynamic_active_secrets.add(
            name=r.name, version_info=r.version, last_updated=_timestamp(r.last_updated)
        )
        proto = secret_pb2.Secret()
        proto.CopyFrom(r.proto)
        _redact(proto)
        entry.secret.Pack(proto)
    for message in (boot, clusters, listeners, routes, secrets):
        dumps.configs.add().Pack(message)
    result: dict[str, Any] = json_format.MessageToDict(dumps, preserving_proto_field_name=True)
    if resource:
        # ?resource=static_clusters etc.: just those entries, as Envoy does.
        picked = []
        for entry in result["configs"]:
            picked.extend(entry.get(resource, []))
        return {"configs": picked}
    return result


def _redact(secret: secret_pb2.Secret) -> None:
    if secret.HasField("tls_certificate") and secret.tls_certificate.HasField("private_key"):
        secret.tls_certificate.private_key.Clear()
        secret.tls_certificate.private_key.inline_string = "[redacted]"


def _timestamp(at: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(at * 1e9))
    return stamp


def _add_dynamic(
    config: ProxyConfig,
    clusters: config_dump_shared_pb2.ClustersConfigDump,
    listeners: config_dump_shared_pb2.ListenersConfigDump,
    routes: config_dump_shared_pb2.RoutesConfigDump,
) -> None:
    dynamic = config.dynamic
    clusters.version_info = dynamic.cds_version
    listeners.version_info = dynamic.lds_version
    for r in dynamic.clusters:
        entry = clusters.dynamic_active_clusters.add(
            version_info=r.version, last_updated=_timestamp(r.last_updated)
        )
        entry.cluster.Pack(r.proto)
    for r in dynamic.listeners:
        state = listeners.dynamic_listeners.add(name=r.name).active_state
        state.version_info = r.version
        state.last_updated.CopyFrom(_timestamp(r.last_updated))
        state.listener.Pack(r.proto)
    for r in dynamic.routes:
        entry = routes.dynamic_route_configs.add(
            version_info=r.version, last_updated=_timestamp(r.last_updated)
        )
        entry.route_config.Pack(r.proto)
