"""A sidecar's bootstrap: what istio-agent writes for Envoy, written for meshlet's proxy.

The node is the pod, in Istio's form: id ``sidecar~<pod IP>~<pod>.<namespace>~<namespace>
.svc.cluster.local`` (``router~...`` for a gateway) and the metadata istiod reads (NAMESPACE,
SERVICE_ACCOUNT, WORKLOAD_NAME, LABELS, INSTANCE_IPS, POD_NAME). Listeners, routes, clusters
and endpoints all come over ADS from the control plane, through the static ``xds-grpc``
cluster. The admin interface listens on the pod IP at 15000 (a loopback address: nothing
outside this machine reaches it).

Metrics are served at ``<pod IP>:15090/stats/prometheus`` as Istio's bootstrap serves them: a
static listener ``envoy-prometheus`` routes that path to the static cluster
``prometheus_stats``, the proxy's own admin address. Its HCM carries an ``istio.stats`` filter
that drops every standard metric, so that scrapes are not counted as requests (in Istio they
are not counted because that listener has no stats filter at all; meshlet counts requests on
an HCM without one with Istio's defaults).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ADMIN_PORT = 15000
PROMETHEUS_PORT = 15090
XDS_CLUSTER = "xds-grpc"
PROMETHEUS_LISTENER = "envoy-prometheus"  # Istio's bootstrap names
PROMETHEUS_CLUSTER = "prometheus_stats"
CLUSTER_ID = "Kubernetes"  # Istio's default cluster id (istio-agent's CLUSTER_ID)
_TYPE = "type.googleapis.com/"


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyNode:
    """Who a proxy is: the pod it serves (or the gateway it is)."""

    pod: str
    namespace: str
    ip: str
    service_account: str = "default"
    workload: str = ""  # the Deployment's name
    labels: Mapping[str, str] = field(default_factory=dict)
    router: bool = False  # a gateway, not a sidecar
    domain_suffix: str = "cluster.local"

    @property
    def id(self) -> str:
        kind = "router" if self.router else "sidecar"
        dns = f"{self.namespace}.svc.{self.domain_suffix}"
        return f"{kind}~{self.ip}~{self.pod}.{self.namespace}~{dns}"


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


@dataclass(frozen=True, slots=True, kw_only=True)
class CaSettings:
    """Where a sidecar gets its certificate (node metadata ``CA_ADDRESS``, ``CA_TOKEN_PATH``,
    ``CA_ROOT_PATH``, ``TRUST_DOMAIN``, read by ``meshlet.proxy.identity``)."""

    address: str
    token_path: str
    root_path: str
    trust_domain: str = "cluster.local"
    xds_tls_address: str = ""  # ADS over mTLS with the workload certificate, once it has one

    def metadata(self) -> dict[str, str]:
        return {
            "CA_ADDRESS": self.address,
            "CA_TOKEN_PATH": self.token_path,
            "CA_ROOT_PATH": self.root_path,
            "TRUST_DOMAIN": self.trust_domain,
        }


def proxy_bootstrap(
    node: ProxyNode, xds_address: str, ca: CaSettings | None = None
) -> dict[str, Any]:
    """The Envoy v3 bootstrap (as JSON-able data) of ``node``'s proxy, dynamic over ADS from
    the control plane at ``xds_address`` (``host:port``); with ``ca``, the node metadata says
    where to get a workload certificate."""
    if ca is not None and ca.xds_tls_address:
        xds_address = ca.xds_tls_address
    xds_host, _, xds_port = xds_address.rpartition(":")
    bootstrap: dict[str, Any] = {
        "node": {
            "id": node.id,
            "cluster": f"{node.workload or node.pod}.{node.namespace}",
            "metadata": {
                "NAMESPACE": node.namespace,
                "SERVICE_ACCOUNT": node.service_account,
                "WORKLOAD_NAME": node.workload,
                "POD_NAME": node.pod,
                "LABELS": dict(node.labels),
                "INSTANCE_IPS": node.ip,
                "CLUSTER_ID": CLUSTER_ID,
                "MESH_ID": ca.trust_domain if ca is not None else "cluster.local",
                **(ca.metadata() if ca is not None else {}),
            },
        },
        "admin": {"address": _address(node.ip, ADMIN_PORT)},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}],
            },
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {
            "listeners": [_prometheus_listener(node.ip)],
            "clusters": [
                {
                    "name": XDS_CLUSTER,
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": XDS_CLUSTER,
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {"endpoint": {"address": _address(xds_host, int(xds_port))}}
                                ]
                            }
                        ],
                    },
                },
                _prometheus_cluster(node.ip),
            ],
        },
    }
    if ca is not None and ca.xds_tls_address:
        # After the certificate (fetched first, with the bootstrap token), ADS itself runs
        # over mutual TLS: this workload's ``default`` certificate, the mesh root to check
        # the control plane's (Istio's istiod name as SNI).
        sds = {"ads": {}, "resource_api_version": "V3"}
        bootstrap["static_resources"]["clusters"][0]["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                "UpstreamTlsContext",
                "sni": "istiod.istio-system.svc",
                "common_tls_context": {
                    "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": sds}],
                    "combined_validation_context": {
                        "default_validation_context": {},
                        "validation_context_sds_secret_config": {
                            "name": "ROOTCA",
                            "sds_config": sds,
                        },
                    },
                },
            },
        }
    return bootstrap


def _prometheus_listener(ip: str) -> dict[str, Any]:
    """``envoy-prometheus``: ``GET /stats/prometheus`` on 15090 to the admin's, counted as no
    Istio request (every standard metric dropped)."""
    drop_all = {
        "@type": _TYPE + "xds.type.v3.TypedStruct",
        "type_url": _TYPE + "stats.PluginConfig",
        "value": {"metrics": [{"name": "", "drop": True}]},
    }
    hcm = {
        "@type": _TYPE + "envoy.extensions.filters.network.http_connection_manager.v3."
        "HttpConnectionManager",
        "codec_type": "AUTO",
        "stat_prefix": "stats",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "backend",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/stats/prometheus"},
                            "route": {"cluster": PROMETHEUS_CLUSTER},
                        }
                    ],
                }
            ]
        },
        "http_filters": [
            {"name": "istio.stats", "typed_config": drop_all},
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": _TYPE + "envoy.extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    return {
        "name": PROMETHEUS_LISTENER,
        "address": _address(ip, PROMETHEUS_PORT),
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }


def _prometheus_cluster(ip: str) -> dict[str, Any]:
    """``prometheus_stats``: the proxy's own admin interface."""
    return {
        "name": PROMETHEUS_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "0.250s",
        "load_assignment": {
            "cluster_name": PROMETHEUS_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(ip, ADMIN_PORT)}}]}],
        },
    }
