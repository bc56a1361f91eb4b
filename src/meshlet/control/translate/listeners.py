"""LDS: the listeners of one proxy (istiod's ``BuildListeners``), shaped for meshlet's proxy.

A sidecar gets two listeners on its pod IP:

* ``virtualOutbound`` on port 15001: the application reaches it as its HTTP proxy
  (``HTTP_PROXY``) or with plain requests; one HTTP connection manager routes by host and
  port with the inline ``http_proxy`` route configuration, which holds every outbound
  virtual host (``reviews:9080``, ``reviews.default:9080``, ... and the bare names).
* ``virtualInbound`` on port 15006: traffic for the workload, routed by the port in the
  ``Host`` to ``inbound|<port>||``.

A gateway gets ``0.0.0.0_<port>`` per server port, bound to the proxy's IP, with the inline
``http.<port>`` configuration; TLS-terminating servers get one filter chain each, matched on
SNI, with Istio's SDS secret names (``kubernetes://<credentialName>``, or
``file-cert:<cert>~<key>`` and ``file-root:<ca>`` for files).

Istio serves route configurations over RDS and captures traffic transparently; meshlet's
proxy reads an inline ``route_config`` and is an explicit proxy today, hence these shapes.
Every HCM starts with ``istio.metadata_exchange``; inbound and gateway HCMs then have the
jwt_authn and RBAC filters of the RequestAuthentications and AuthorizationPolicies that
apply (``request_authn``, ``authz``). The HCM carries the fault filter always, the CORS filter
when a route uses it, ``istio.stats``, and the router last, with its typed config (grpcio's
xDS client refuses a router without it). Tracing and access logs come from the Telemetries
and mesh options in effect (``telemetry``).
Istio HCM settings the proxy does not have (``normalize_path``, websocket upgrades,
request-id extension, client certificate details) are left out.
"""

from __future__ import annotations

from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.cors.v3 import cors_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from google.protobuf import any_pb2, duration_pb2

from meshlet.api.networking import ServerTLSMode, ServerTLSSettings
from meshlet.api.security import MTLSMode
from meshlet.control.snapshot import GatewayConfig, Proxy, ProxyType, ProxyView, Snapshot
from meshlet.control.translate.authz import RBAC_FILTER, authz_filters
from meshlet.control.translate.clusters import TRANSPORT_SOCKET_TLS, sds_secret
from meshlet.control.translate.peer_authn import workload_mode
from meshlet.control.translate.request_authn import applicable, jwt_authn_filter
from meshlet.control.translate.routes import (
    CORS_FILTER,
    FAULT_FILTER,
    gateway_route_configs,
    http_proxy_route_config,
    inbound_route_config,
)
from meshlet.control.translate.telemetry import ListenerClass, apply_telemetry

VIRTUAL_OUTBOUND = "virtualOutbound"
VIRTUAL_INBOUND = "virtualInbound"
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
HCM_FILTER = "envoy.filters.network.http_connection_manager"
ROUTER_FILTER = "envoy.filters.http.router"
SERVER_NAME = "istio-envoy"
TLS_INSPECTOR_FILTER = "envoy.filters.listener.tls_inspector"


def build_listeners(snapshot: Snapshot, proxy: Proxy) -> list[listener_pb2.Listener]:
    """The LDS response for ``proxy``."""
    view = snapshot.view(proxy)
    if proxy.type is ProxyType.ROUTER:
        return gateway_listeners(view)
    return [outbound_listener(view), inbound_listener(view)]


def outbound_listener(view: ProxyView) -> listener_pb2.Listener:
    ip = view.proxy.ip
    hcm = http_connection_manager(
        f"outbound_{ip}_{OUTBOUND_PORT}", http_proxy_route_config(view), inbound=False
    )
    apply_telemetry(hcm, view, ListenerClass.SIDECAR_OUTBOUND)
    return _listener(VIRTUAL_OUTBOUND, ip, OUTBOUND_PORT, [_chain(hcm)], base_pb2.OUTBOUND)


def inbound_listener(view: ProxyView) -> listener_pb2.Listener:
    ip = view.proxy.ip
    hcm = http_connection_manager(
        f"inbound_{ip}_{INBOUND_PORT}", inbound_route_config(view), inbound=True
    )
    prepend_filters(hcm, [*jwt_filters(view), *authz_filters(view)])
    apply_telemetry(hcm, view, ListenerClass.SIDECAR_INBOUND)
    mode = inbound_mtls_mode(view)
    ports = inbound_port_modes(view, mode) if mode is not None else {}
    modes = {mode, *ports.values()}
    if not modes & {MTLSMode.STRICT, MTLSMode.PERMISSIVE}:  # no mTLS, or DISABLE everywhere
        return _listener(VIRTUAL_INBOUND, ip, INBOUND_PORT, [_chain(hcm)], base_pb2.INBOUND)
    # Istio's inbound chains: mutual TLS with this workload's certificate, the peer's
    # certificate checked against the mesh's root and its identity passed on in XFCC; with
    # PERMISSIVE, plaintext on the same port too, told apart by the TLS inspector.
    chains = []
    mtls_hcm = hcm_pb2.HttpConnectionManager()
    mtls_hcm.CopyFrom(hcm)
    mtls_hcm.forward_client_cert_details = hcm_pb2.HttpConnectionManager.SANITIZE_SET
    mtls_hcm.set_current_client_cert_details.uri = True
    mtls = _chain(mtls_hcm)
    mtls.name = "inbound-mtls"
    mtls.filter_chain_match.transport_protocol = "tls"
    mtls.transport_socket.CopyFrom(inbound_mtls_socket())
    chains.append(mtls)
    assert mode is not None  # else every mode would be None: returned above
    if modes & {MTLSMode.PERMISSIVE, MTLSMode.DISABLE}:
        guard = plaintext_port_guard(mode, ports)
        if guard is not None:
            plain_hcm = hcm_pb2.HttpConnectionManager()
            plain_hcm.CopyFrom(hcm)
            prepend_filters(plain_hcm, [guard])
        else:
            plain_hcm = hcm
        plain = _chain(plain_hcm)
        plain.name = "inbound-plaintext"
        plain.filter_chain_match.transport_protocol = "raw_buffer"
        chains.append(plain)
    listener = _listener(VIRTUAL_INBOUND, ip, INBOUND_PORT, chains, base_pb2.INBOUND)
    inspector = listener.listener_filters.add(name=TLS_INSPECTOR_FILTER)
    inspector.typed_config.Pack(tls_inspector_pb2.TlsInspector())
    return listener


def inbound_port_modes(view: ProxyView, mode: MTLSMode) -> dict[int, MTLSMode]:
    """``portLevelMtls``: the mode of each port a request may name in its ``Host``, where
    it differs from the workload's ``mode``. The policy's keys are the workload's (target)
    ports; clients name the service port, so each service port takes its target's mode."""
    policies = view.snapshot.peer_authentications
    proxy = view.proxy
    if not any(p.spec.port_level_mtls for p in policies):
        return {}

    def at(port: int) -> MTLSMode:
        found = workload_mode(
            policies,
            namespace=proxy.namespace,
            labels=proxy.labels,
            port=port,
            root_namespace=view.mesh.root_namespace,
        )
        return MTLSMode.PERMISSIVE if found is MTLSMode.UNSET else found

    out: dict[int, MTLSMode] = {}
    for policy in policies:
        for key in policy.spec.port_level_mtls:
            out[int(key)] = at(int(key))
    for instance in view.instances:
        out[instance.port.port] = at(instance.endpoint.port)
    return {port: m for port, m in out.items() if m is not mode}


PORT_MTLS_POLICY = "peer-authentication-port-level-mtls"


def plaintext_port_guard(mode: MTLSMode, ports: dict[int, MTLSMode]) -> hcm_pb2.HttpFilter | None:
    """The RBAC filter that keeps plaintext requests off STRICT ports, on the plaintext chain
    of a listener whose ports differ in mode. Istio tells ports apart by the captured
    destination port and refuses the connection; here every port shares 15006, so the port
    is the one the request names and the refusal is a 403 ``RBAC: access denied``."""
    plaintext_ok = mode in (MTLSMode.PERMISSIVE, MTLSMode.DISABLE)
    if plaintext_ok:  # deny the STRICT ports
        chosen = sorted(p for p, m in ports.items() if m is MTLSMode.STRICT)
        action = rbac_pb2.RBAC.DENY
    else:  # the workload is STRICT: allow only the ports that take plaintext
        chosen = sorted(p for p, m in ports.items() if m is not MTLSMode.STRICT)
        action = rbac_pb2.RBAC.ALLOW
    if plaintext_ok and not chosen:
        return None
    config = rbac_pb2.RBAC(action=action)
    policy = config.policies[PORT_MTLS_POLICY]
    policy.principals.add(any=True)
    if chosen:
        ports_rule = policy.permissions.add().or_rules
        for port in chosen:
            ports_rule.rules.add(destination_port=port)
    else:
        policy.permissions.add(not_rule=rbac_pb2.Permission(any=True))
    return _filter(RBAC_FILTER, http_rbac_pb2.RBAC(rules=config))


def jwt_filters(view: ProxyView) -> list[hcm_pb2.HttpFilter]:
    """The jwt_authn filter of the RequestAuthentications that apply to this workload (inbound
    and gateway HCMs only, before the RBAC filters, as Istio orders them)."""
    policies = applicable(
        view.snapshot.request_authentications,
        view.proxy.namespace,
        view.proxy.labels,
        view.mesh.root_namespace,
    )
    found = jwt_authn_filter(policies)
    return [] if found is None else [found]


def inbound_mtls_mode(view: ProxyView) -> MTLSMode | None:
    """The PeerAuthentication mode of this workload's inbound side (workload > namespace >
    mesh, PERMISSIVE by default); None while the mesh runs without mTLS. ``portLevelMtls``
    is ``inbound_port_modes``."""
    if not view.mesh.enable_auto_mtls:
        return None
    mode = workload_mode(
        view.snapshot.peer_authentications,
        namespace=view.proxy.namespace,
        labels=view.proxy.labels,
        root_namespace=view.mesh.root_namespace,
    )
    return MTLSMode.PERMISSIVE if mode is MTLSMode.UNSET else mode


def inbound_mtls_socket() -> base_pb2.TransportSocket:
    """A DownstreamTlsContext requiring a client certificate: SDS ``default`` as this
    workload's certificate, ``ROOTCA`` to check the peer's (``buildInboundFilterChain``)."""
    context = tls_pb2.DownstreamTlsContext()
    context.require_client_certificate.value = True
    common = context.common_tls_context
    common.tls_params.tls_minimum_protocol_version = common_pb2.TlsParameters.TLSv1_2
    common.tls_certificate_sds_secret_configs.append(sds_secret("default"))
    common.combined_validation_context.validation_context_sds_secret_config.CopyFrom(
        sds_secret("ROOTCA")
    )
    socket = base_pb2.TransportSocket(name=TRANSPORT_SOCKET_TLS)
    socket.typed_config.Pack(context)
    return socket


def gateway_listeners(view: ProxyView) -> list[listener_pb2.Listener]:
    configs = dict(gateway_route_configs(view))
    tls_servers: dict[int, list[tuple[GatewayConfig, tuple[str, ...], ServerTLSSettings]]] = {}
    for gw in view.gateways:
        for server in gw.spec.servers:
            port = server.port.target_port or server.port.number
            tls = server.tls
            if (
                tls is not None
                and server.port.protocol.upper() == "HTTPS"
                and tls.mode
                not in (
                    ServerTLSMode.PASSTHROUGH,
                    ServerTLSMode.AUTO_PASSTHROUGH,
                )
            ):
                tls_servers.setdefault(port, []).append((gw, server.hosts, tls))
    listeners: list[listener_pb2.Listener] = []
    for port in sorted(configs):
        hcm = http_connection_manager(f"outbound_0.0.0.0_{port}", configs[port], inbound=False)
        hcm.use_remote_address.value = True
        hcm.server_name = SERVER_NAME
        prepend_filters(hcm, [*jwt_filters(view), *authz_filters(view)])
        apply_telemetry(hcm, view, ListenerClass.GATEWAY)
        chains: list[listener_components_pb2.FilterChain] = []
        for gw, hosts, tls in tls_servers.get(port, ()):
            chain = _chain(hcm)
            names = [h.rpartition("/")[2] for h in hosts if h.rpartition("/")[2] != "*"]
            chain.filter_chain_match.server_names.extend(names)
            chain.transport_socket.CopyFrom(downstream_tls(tls, gw))
            chains.append(chain)
        if not chains:
            chains.append(_chain(hcm))
        listeners.append(
            _listener(f"0.0.0.0_{port}", view.proxy.ip, port, chains, base_pb2.OUTBOUND)
        )
    return listeners


def http_connection_manager(
    stat_prefix: str, route_config: route_pb2.RouteConfiguration, *, inbound: bool
) -> hcm_pb2.HttpConnectionManager:
    """Istio's sidecar HCM, as far as the proxy implements it: AUTO codec, no stream idle
    timeout, 100-continue proxied, ``istio-envoy`` as the inbound server name."""
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=stat_prefix,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        proxy_100_continue=True,
    )
    hcm.stream_idle_timeout.CopyFrom(duration_pb2.Duration())
    hcm.route_config.CopyFrom(route_config)
    if inbound:
        hcm.server_name = SERVER_NAME
    hcm.http_filters.append(_filter(FAULT_FILTER, fault_pb2.HTTPFault()))
    if _uses_filter(route_config, CORS_FILTER):
        hcm.http_filters.append(_filter(CORS_FILTER, cors_pb2.Cors()))
    hcm.http_filters.append(_filter(ROUTER_FILTER, router_pb2.Router()))
    return hcm


def prepend_filters(hcm: hcm_pb2.HttpConnectionManager, filters: list[hcm_pb2.HttpFilter]) -> None:
    """Put ``filters`` (AuthorizationPolicy's RBAC filters) before the HCM's own."""
    if filters:
        rest = list(hcm.http_filters)
        del hcm.http_filters[:]
        hcm.http_filters.extend([*filters, *rest])


def downstream_tls(tls: ServerTLSSettings, gw: GatewayConfig) -> base_pb2.TransportSocket:
    """A gateway server's TLS termination (``buildGatewayListenerTLSContext``)."""
    context = tls_pb2.DownstreamTlsContext()
    common = context.common_tls_context
    common.alpn_protocols.extend(["h2", "http/1.1"])
    mutual = tls.mode in (ServerTLSMode.MUTUAL, ServerTLSMode.ISTIO_MUTUAL)
    if tls.mode is ServerTLSMode.ISTIO_MUTUAL:
        common.tls_certificate_sds_secret_configs.append(sds_secret("default"))
        common.combined_validation_context.validation_context_sds_secret_config.CopyFrom(
            sds_secret("ROOTCA")
        )
    elif tls.credential_name:
        common.tls_certificate_sds_secret_configs.append(
            sds_secret(f"kubernetes://{tls.credential_name}")
        )
        if tls.mode in (ServerTLSMode.MUTUAL, ServerTLSMode.OPTIONAL_MUTUAL):
            common.combined_validation_context.validation_context_sds_secret_config.CopyFrom(
                sds_secret(f"kubernetes://{tls.credential_name}-cacert")
            )
    else:
        common.tls_certificate_sds_secret_configs.append(
            sds_secret(f"file-cert:{tls.server_certificate}~{tls.private_key}")
        )
        if tls.ca_certificates:
            common.combined_validation_context.validation_context_sds_secret_config.CopyFrom(
                sds_secret(f"file-root:{tls.ca_certificates}")
            )
    if mutual:
        context.require_client_certificate.value = True
    packed = any_pb2.Any()
    packed.Pack(context)
    return base_pb2.TransportSocket(name=TRANSPORT_SOCKET_TLS, typed_config=packed)


def _uses_filter(config: route_pb2.RouteConfiguration, name: str) -> bool:
    for vh in config.virtual_hosts:
        if name in vh.typed_per_filter_config:
            return True
        for route in vh.routes:
            if name in route.typed_per_filter_config:
                return True
    return False


def _filter(name: str, config: object) -> hcm_pb2.HttpFilter:
    packed = any_pb2.Any()
    packed.Pack(config)  # type: ignore[arg-type]
    return hcm_pb2.HttpFilter(name=name, typed_config=packed)


def _chain(hcm: hcm_pb2.HttpConnectionManager) -> listener_components_pb2.FilterChain:
    packed = any_pb2.Any()
    packed.Pack(hcm)
    chain = listener_components_pb2.FilterChain()
    chain.filters.add(name=HCM_FILTER, typed_config=packed)
    return chain


def _listener(
    name: str,
    ip: str,
    port: int,
    chains: list[listener_components_pb2.FilterChain],
    direction: base_pb2.TrafficDirection,
) -> listener_pb2.Listener:
    listener = listener_pb2.Listener(name=name, traffic_direction=direction)
    listener.address.CopyFrom(
        address_pb2.Address(socket_address=address_pb2.SocketAddress(address=ip, port_value=port))
    )
    listener.filter_chains.extend(chains)
    return listener


__all__ = [
    "INBOUND_PORT",
    "OUTBOUND_PORT",
    "VIRTUAL_INBOUND",
    "VIRTUAL_OUTBOUND",
    "build_listeners",
    "downstream_tls",
    "gateway_listeners",
    "http_connection_manager",
    "inbound_listener",
    "outbound_listener",
]
