"""A sidecar's bootstrap: what istio-agent writes for Envoy, written for meshlet's proxy.

The node is the pod, in Istio's form: id ``sidecar~<pod IP>~<pod>.<namespace>~<namespace>
.svc.cluster.local`` (``router~...`` for a gateway) and the metadata istiod reads (NAMESPACE,
SERVICE_ACCOUNT, WORKLOAD_NAME, LABELS, INSTANCE_IPS, POD_NAME). Listeners, routes, clusters
and endpoints all come over ADS from the control plane, through the static ``xds-grpc``
cluster. The admin interface listens on the pod IP at 15000 (a loopback address: nothing
outside this machine reaches it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ADMIN_PORT = 15000
XDS_CLUSTER = "xds-grpc"


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
                }
            ]
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
