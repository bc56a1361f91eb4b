"""RDS: VirtualServices as Envoy routes, virtual hosts and route configurations.

A sidecar gets one ``RouteConfiguration`` per outbound HTTP port, named ``"<port>"``, with a
virtual host ``<host>:<port>`` per service (and per VirtualService host that is no service)
and Istio's domains; its explicit-proxy listener uses ``http_proxy``, all of them merged,
each domain also with ``:<port>``. A gateway gets ``http.<port>`` per server port. The
inbound side's configuration routes each served port to ``inbound|<port>||``.

Rules kept (``ISTIO-TRANSLATION.md`` §1.3-§2.7, istiod's ``route.go``, ``httproute.go``):

* Each ``http`` rule gives one route per match (one catch-all route without matches); the
  first route that matches wins, and nothing is emitted after a catch-all (prefix ``/`` or
  regex ``.*`` without header or query conditions). A host with a VirtualService gets only
  its routes: a request that matches none gets 404. Without one, a host gets the route
  ``default`` to ``outbound|<port>||<host>``.
* Matches whose ``gateways`` do not name the proxy's (``mesh`` for sidecars), whose
  ``sourceLabels`` are not the proxy's, whose ``sourceNamespace`` is another, or whose
  ``port`` is not the listener's, are dropped.
* Destination: ``outbound|<port>|<subset>|<host>``, the port being the destination's, else
  the service's only one, else the listener's. One destination is a ``cluster``; several are
  ``weighted_clusters`` (weights as given, zero weights skipped, no ``total_weight``).
* ``timeout`` defaults to 0s (disabled). The retry policy defaults to Istio's: 2 retries on
  ``connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes``, the
  ``previous_hosts`` predicate (not with consistent hashing), 5 host selection attempts;
  ``attempts: 0`` disables retries; status codes in ``retryOn`` become
  ``retriable_status_codes``.
* The per-route fault and CORS configurations go in ``typed_per_filter_config``.

Istio route fields the proxy does not have are left out: ``decorator``, ``metadata``,
``max_grpc_timeout``, the vhost's ``include_request_attempt_count``, and the mirror's
``trace_sampled`` / ``disable_shadow_host_suffix_append``.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.common.fault.v3 import fault_pb2 as common_fault_pb2
from envoy.extensions.filters.http.cors.v3 import cors_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.retry.priority.previous_priorities.v3 import (
    previous_priorities_config_pb2,
)
from envoy.type.matcher.v3 import metadata_pb2, regex_pb2, string_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2

from meshlet.api.duration import Duration
from meshlet.api.networking import (
    ConsistentHashLB,
    CorsPolicy,
    Destination,
    Headers,
    HTTPFaultInjection,
    HTTPMatchRequest,
    HTTPRedirect,
    HTTPRetry,
    HTTPRoute,
    OutboundTrafficPolicyMode,
    Percent,
    RedirectPortSelection,
    StringMatch,
    UnmatchedPreflights,
)
from meshlet.control.registry import Service
from meshlet.control.snapshot import (
    GatewayConfig,
    Proxy,
    ProxyType,
    ProxyView,
    Snapshot,
    VirtualServiceConfig,
    host_matches,
    inbound_cluster_name,
    labels_match,
    outbound_cluster_name,
)
from meshlet.control.translate.clusters import INBOUND_PASSTHROUGH_CLUSTER, PASSTHROUGH_CLUSTER

HTTP_PROXY_ROUTE_CONFIG = "http_proxy"
INBOUND_ROUTE_CONFIG = "virtualInbound"
DEFAULT_ROUTE = "default"
ALLOW_ANY = "allow_any"
BLOCK_ALL = "block_all"
MAX_DIRECT_RESPONSE_BODY = 1048576
FAULT_FILTER = "envoy.filters.http.fault"
CORS_FILTER = "envoy.filters.http.cors"
JWT_FILTER = "envoy.filters.http.jwt_authn"
PREVIOUS_HOSTS = "envoy.retry_host_predicates.previous_hosts"
PREVIOUS_PRIORITIES = "envoy.retry_priorities.previous_priorities"
DEFAULT_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
INBOUND_RETRY_ON = "reset-before-request"

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_APPEND = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD
_STATUS_CODES = frozenset(s.value for s in HTTPStatus)
_GRPC_CODES = {
    "OK": 0,
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "ABORTED": 10,
    "OUT_OF_RANGE": 11,
    "UNIMPLEMENTED": 12,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}
_REDIRECT_CODES = {
    0: rc.RedirectAction.MOVED_PERMANENTLY,
    301: rc.RedirectAction.MOVED_PERMANENTLY,
    302: rc.RedirectAction.FOUND,
    303: rc.RedirectAction.SEE_OTHER,
    307: rc.RedirectAction.TEMPORARY_REDIRECT,
    308: rc.RedirectAction.PERMANENT_REDIRECT,
}


# -- route configurations --------------------------------------------------------------------


def build_route_configs(snapshot: Snapshot, proxy: Proxy) -> list[route_pb2.RouteConfiguration]:
    """The RDS response for ``proxy``: ``"<port>"`` per outbound HTTP port of a sidecar,
    ``http.<port>`` per HTTP server port of a gateway."""
    view = snapshot.view(proxy)
    if proxy.type is ProxyType.ROUTER:
        return [config for _, config in gateway_route_configs(view)]
    vhosts = sidecar_virtual_hosts(view)
    by_port: dict[int, list[VirtualHostPlan]] = {}
    for vh in vhosts:
        by_port.setdefault(vh.port, []).append(vh)
    return [sidecar_route_config(view, port, by_port[port]) for port in sorted(by_port)]


def sidecar_route_config(
    view: ProxyView, port: int, vhosts: Sequence[VirtualHostPlan]
) -> route_pb2.RouteConfiguration:
    """Istio's sidecar outbound route configuration for one port (``ignore_port_in_host
    _matching``: a ``Host`` with or without the port matches)."""
    config = _route_config(str(port), ignore_port=True)
    seen: set[str] = set()
    for plan in sorted(vhosts, key=lambda v: v.name):
        domains = [d for d in plan.domains if d not in seen]
        if not domains:
            continue
        seen.update(domains)
        config.virtual_hosts.append(plan.virtual_host(domains))
    config.virtual_hosts.append(catch_all_virtual_host(view))
    return config


def http_proxy_route_config(view: ProxyView) -> route_pb2.RouteConfiguration:
    """Every outbound virtual host in one configuration, for the explicit-proxy listener.

    The port is part of the host here (``reviews:9080``): each domain comes with
    ``:<port>``, as Istio's HTTP_PROXY listener has it. The bare name (a ``Host`` without a
    port) belongs to the host's port 80 if it has one, else to its lowest port -- so that
    ``curl reviews`` through the proxy reaches a service that listens on 9080 only.
    """
    config = _route_config(HTTP_PROXY_ROUTE_CONFIG, ignore_port=False)
    plans = sidecar_virtual_hosts(view)
    ports: dict[str, list[int]] = {}
    for plan in plans:
        ports.setdefault(plan.owner, []).append(plan.port)
    bare_port = {owner: 80 if 80 in p else min(p) for owner, p in ports.items()}
    seen: set[str] = set()
    for plan in sorted(plans, key=lambda v: v.name):
        domains: list[str] = []
        for domain in plan.domains:
            candidates = [domain] if bare_port[plan.owner] == plan.port else []
            candidates.append(f"{domain}:{plan.port}")
            for d in candidates:
                if d not in seen:
                    seen.add(d)
                    domains.append(d)
        if domains:
            config.virtual_hosts.append(plan.virtual_host(domains))
    config.virtual_hosts.append(catch_all_virtual_host(view))
    return config


def _route_config(name: str, *, ignore_port: bool) -> route_pb2.RouteConfiguration:
    config = route_pb2.RouteConfiguration(name=name, ignore_port_in_host_matching=ignore_port)
    config.validate_clusters.value = False
    config.max_direct_response_body_size_bytes.value = MAX_DIRECT_RESPONSE_BODY
    return config


def catch_all_virtual_host(view: ProxyView) -> rc.VirtualHost:
    """``allow_any`` (to PassthroughCluster) or ``block_all`` (502) for unknown hosts."""
    if view.outbound_policy is OutboundTrafficPolicyMode.REGISTRY_ONLY:
        route = rc.Route(name=BLOCK_ALL, match=rc.RouteMatch(prefix="/"))
        route.direct_response.status = 502
        return rc.VirtualHost(name=BLOCK_ALL, domains=["*"], routes=[route])
    route = rc.Route(name=ALLOW_ANY, match=rc.RouteMatch(prefix="/"))
    route.route.cluster = PASSTHROUGH_CLUSTER
    route.route.timeout.CopyFrom(duration_pb2.Duration())
    return rc.VirtualHost(name=ALLOW_ANY, domains=["*"], routes=[route])


@dataclass(slots=True, kw_only=True)
class VirtualHostPlan:
    """A virtual host before its domains are settled against the others of a config."""

    name: str  # <host>:<port>
    port: int
    owner: str  # the hostname the domains are derived from
    domains: list[str]  # without ports, in Istio's order
    routes: list[rc.Route] = field(default_factory=list)

    def virtual_host(self, domains: Sequence[str]) -> rc.VirtualHost:
        vh = rc.VirtualHost(name=self.name, domains=domains)
        vh.routes.extend(self.routes)
        return vh


# -- sidecar virtual hosts ---------------------------------------------------------------------


def sidecar_virtual_hosts(view: ProxyView) -> list[VirtualHostPlan]:
    """Every outbound virtual host of a sidecar, all ports, in Istio's precedence order:
    VirtualServices' (in order; the first to claim ``<host>:<port>`` keeps it), then the
    default ones of services without a VirtualService (``BuildSidecarVirtualHostWrapper``).
    Computed once per view, and shared by the views of one snapshot that would compute the
    same: same proxy type, namespace, DNS domain, Sidecar and gateways -- and same labels when
    a visible rule matches on ``sourceLabels``. (Nothing else of the proxy enters them.)"""
    found = view.memo.get("sidecar_virtual_hosts")
    if found is None:
        key = _virtual_hosts_key(view)
        found = view.snapshot.memo.get(key)
        if found is None:
            found = view.snapshot.memo[key] = _sidecar_virtual_hosts(view)
        view.memo["sidecar_virtual_hosts"] = found
    return list(found)


def _virtual_hosts_key(view: ProxyView) -> tuple[Any, ...]:
    proxy = view.proxy
    by_labels = any(
        match.source_labels
        for vs in view.virtual_services
        for rule in vs.http
        for match in rule.match
    )
    sidecar = view.sidecar
    return (
        "sidecar_virtual_hosts",
        proxy.type,
        proxy.namespace,
        proxy.domain,
        None if sidecar is None else (sidecar.namespace, sidecar.name),
        view.gateway_names,
        view.outbound_policy,
        tuple(sorted(proxy.labels.items())) if by_labels else None,
    )


def _sidecar_virtual_hosts(view: ProxyView) -> list[VirtualHostPlan]:
    builder = RouteBuilder(view, view.gateway_names)
    owner = _virtual_service_owners(view)
    plans: list[VirtualHostPlan] = []
    names: set[str] = set()
    claimed: set[str] = set()

    def add(plan: VirtualHostPlan) -> None:
        if plan.name not in names:
            names.add(plan.name)
            plans.append(plan)

    for vs in view.virtual_services:
        services = owner.get(id(vs), [])
        # Hosts that are no service get virtual hosts of their own; a wildcard that covers
        # services is represented by those services (``separateVSHostsAndServices``).
        other_hosts = [
            h
            for h in vs.hosts
            if h != "*"
            and view.service(h) is None
            and not (h.startswith("*") and any(host_matches(h, s.hostname) for s in services))
        ]
        ports = sorted(
            {p.port for s in services for p in s.ports if p.protocol.carries_http_routes}
        )
        if not ports and not services:
            ports = [80]  # Istio: a VirtualService for no known service gets port 80 only
        for port in ports:
            routes = builder.virtual_service_routes(vs, port)
            if not routes:
                continue
            for service in services:
                sp = service.port(port)
                if sp is None or not sp.protocol.carries_http_routes:
                    continue
                # A service whose VirtualService gives no route on any port falls back to
                # the default route (it stays "missing" in Istio's terms).
                claimed.add(service.hostname)
                add(
                    VirtualHostPlan(
                        name=f"{service.hostname}:{port}",
                        port=port,
                        owner=service.hostname,
                        domains=service_domains(service, view.proxy),
                        routes=routes,
                    )
                )
            for host in other_hosts:
                add(
                    VirtualHostPlan(
                        name=f"{host}:{port}", port=port, owner=host, domains=[host], routes=routes
                    )
                )
    for service in view.services:
        if service.hostname in claimed:
            continue
        for sp in service.ports:
            if not sp.protocol.carries_http_routes:
                continue
            add(
                VirtualHostPlan(
                    name=f"{service.hostname}:{sp.port}",
                    port=sp.port,
                    owner=service.hostname,
                    domains=service_domains(service, view.proxy),
                    routes=[builder.default_route(service, sp.port)],
                )
            )
    return plans


def _virtual_service_owners(view: ProxyView) -> dict[int, list[Service]]:
    """Which VirtualService's routes each visible service gets: the first VirtualService
    naming it exactly, else the most specific wildcard one."""
    exact: dict[str, int] = {}
    wildcards: list[tuple[str, int]] = []
    for vs in view.virtual_services:
        for host in vs.hosts:
            if host.startswith("*"):
                wildcards.append((host, id(vs)))
            else:
                exact.setdefault(host, id(vs))
    wildcards.sort(key=lambda item: -len(item[0]))  # stable: order kept among equals
    owner: dict[int, list[Service]] = {}
    for service in view.services:
        chosen = exact.get(service.hostname)
        if chosen is None:
            for pattern, vs_id in wildcards:
                if host_matches(pattern, service.hostname):
                    chosen = vs_id
                    break
        if chosen is not None:
            owner.setdefault(chosen, []).append(service)
    return owner


def service_domains(service: Service, proxy: Proxy) -> list[str]:
    """Istio's ``generateVirtualHostDomains`` for a sidecar: the FQDN, its absolute form,
    the short forms a pod in ``proxy``'s namespace may use, and the service's addresses."""
    hostname = service.hostname
    domains = [hostname]
    if not hostname.startswith("*"):
        domains.append(hostname + ".")
    domains.extend(alt_hosts(hostname, proxy.domain))
    if service.headless and service.is_kubernetes:
        domains.extend([f"*.{d}" for d in domains])
    for address in service.addresses:
        if address != "0.0.0.0":
            domains.append(_bracketed(address))
    return domains


def alt_hosts(hostname: str, proxy_domain: str) -> list[str]:
    """The short names of a Kubernetes service (``GenerateAltVirtualHosts``): in the proxy's
    namespace ``reviews``, ``reviews.default.svc``, ``reviews.default``; from another one
    ``reviews.default``, ``reviews.default.svc``."""
    marker = proxy_domain.find(".svc.")
    if marker < 0:
        return []
    if not hostname.endswith("." + proxy_domain[marker + 1 :]):
        return []
    ih = hostname.find(".svc.")
    first_dot = hostname.find(".")
    if ih < 0 or first_dot + 1 >= ih:
        return []
    if hostname[first_dot + 1 : ih] == proxy_domain[:marker]:
        return [hostname[:first_dot], hostname[:ih] + ".svc", hostname[:ih]]
    return [hostname[:ih], hostname[:ih] + ".svc"]


def _bracketed(address: str) -> str:
    try:
        if isinstance(ipaddress.ip_address(address), ipaddress.IPv6Address):
            return f"[{address}]"
    except ValueError:
        pass
    return address


# -- gateways ------------------------------------------------------------------------------------

_Server = tuple[GatewayConfig, frozenset[str], bool]  # gateway, [ns/]hosts, httpsRedirect


def gateway_route_configs(view: ProxyView) -> list[tuple[int, route_pb2.RouteConfiguration]]:
    """``http.<port>`` for each HTTP (or TLS-terminated HTTPS) server port of the gateways
    that select this proxy: a virtual host per VirtualService host the servers accept, the
    routes of every VirtualService for that host concatenated, catch-alls last."""
    servers: dict[int, list[_Server]] = {}
    for gw in view.gateways:
        for server in gw.spec.servers:
            protocol = server.port.protocol.upper()
            terminated = (
                protocol == "HTTPS"
                and server.tls is not None
                and (server.tls.mode.value not in ("PASSTHROUGH", "AUTO_PASSTHROUGH"))
            )
            if protocol not in ("HTTP", "HTTP2", "GRPC", "GRPC-WEB") and not terminated:
                continue
            port = server.port.target_port or server.port.number
            redirect = server.tls is not None and server.tls.https_redirect
            servers.setdefault(port, []).append((gw, frozenset(server.hosts), redirect))
    out: list[tuple[int, route_pb2.RouteConfiguration]] = []
    for port in sorted(servers):
        config = _route_config(f"http.{port}", ignore_port=True)
        vhosts = _gateway_virtual_hosts(view, port, servers[port])
        if not vhosts:
            vhosts = [rc.VirtualHost(name=f"blackhole:{port}", domains=["*"])]
        config.virtual_hosts.extend(vhosts)
        out.append((port, config))
    return out


def _gateway_virtual_hosts(
    view: ProxyView, port: int, servers: Sequence[_Server]
) -> list[rc.VirtualHost]:
    by_host: dict[str, list[rc.Route]] = {}
    catch_alls: dict[str, list[rc.Route]] = {}
    names = frozenset(gw.key for gw, _, _ in servers)
    for vs in view.virtual_services:
        bound = vs.gateways & names
        if not bound:
            continue
        builder = RouteBuilder(view, frozenset(bound))
        hosts = [
            h
            for h in vs.hosts
            if any(
                gw.key in bound and _server_accepts(gw, server_hosts, vs.namespace, h)
                for gw, server_hosts, _ in servers
            )
        ]
        if not hosts:
            continue
        routes = builder.virtual_service_routes(vs, port)
        for host in hosts:
            for route in routes:
                target = catch_alls if is_catch_all(route) else by_host
                target.setdefault(host, []).append(route)
                by_host.setdefault(host, [])
    vhosts: list[rc.VirtualHost] = []
    seen: set[str] = set()
    for host in sorted(by_host):
        if host in seen:
            continue
        seen.add(host)
        vh = rc.VirtualHost(name=f"{host}:{port}", domains=[host])
        if any(
            redirect and _server_accepts(gw, server_hosts, "", host, any_namespace=True)
            for gw, server_hosts, redirect in servers
        ):
            vh.require_tls = rc.VirtualHost.ALL  # httpsRedirect
        vh.routes.extend(by_host[host])
        vh.routes.extend(catch_alls.get(host, ()))
        vhosts.append(vh)
    return vhosts


def _server_accepts(
    gw: GatewayConfig,
    server_hosts: Iterable[str],
    vs_namespace: str,
    host: str,
    *,
    any_namespace: bool = False,
) -> bool:
    """A server host ``[ns/]host`` accepts a VirtualService host (in ``vs_namespace``)."""
    for entry in server_hosts:
        ns, slash, pattern = entry.rpartition("/")
        if slash and not any_namespace:
            if ns == ".":
                ns = gw.namespace
            if ns not in ("*", vs_namespace):
                continue
        if host_matches(pattern, host) or host_matches(host, pattern):
            return True
    return False


# -- inbound -------------------------------------------------------------------------------------


def inbound_route_config(view: ProxyView) -> route_pb2.RouteConfiguration:
    """The inbound listener's routes: ``inbound|http|<port>`` per served service port, domains
    ``*:<service port>`` and ``*:<target port>``, to ``inbound|<target port>||``; a ``Host``
    without a port goes to the first one. Each route is Istio's inbound default: timeout
    disabled, 2 retries on ``reset-before-request`` (none for gRPC ports)."""
    config = route_pb2.RouteConfiguration(name=INBOUND_ROUTE_CONFIG)
    config.validate_clusters.value = False
    targets: dict[int, tuple[int, bool]] = {}  # service port -> (target port, grpc)
    ingress = view.sidecar.spec.ingress if view.sidecar is not None else ()
    if ingress:  # a Sidecar's ingress listeners replace the service instances
        for listener in ingress:
            _, _, text = listener.default_endpoint.rpartition(":")
            target = int(text) if text.isdigit() else listener.port.number
            grpc = listener.port.protocol.upper() in ("GRPC", "GRPC-WEB")
            targets.setdefault(listener.port.number, (target, grpc))
    else:
        for instance in view.instances:
            targets.setdefault(
                instance.port.port, (instance.endpoint.port, instance.port.protocol.is_grpc)
            )
    seen: set[str] = set()
    first = True
    for port in sorted(targets):
        target, grpc = targets[port]
        domains = [d for d in dict.fromkeys((f"*:{port}", f"*:{target}")) if d not in seen]
        if first:
            domains.append("*")
            first = False
        seen.update(domains)
        route = rc.Route(name=DEFAULT_ROUTE, match=rc.RouteMatch(prefix="/"))
        route.route.cluster = inbound_cluster_name(target)
        route.route.timeout.CopyFrom(duration_pb2.Duration())
        if not grpc:
            policy = route.route.retry_policy
            policy.retry_on = INBOUND_RETRY_ON
            policy.num_retries.value = 2
        config.virtual_hosts.append(
            rc.VirtualHost(name=f"inbound|http|{port}", domains=domains, routes=[route])
        )
    if not targets:  # no service port here: as Istio's passthrough chains, to where it was sent
        route = rc.Route(name=DEFAULT_ROUTE, match=rc.RouteMatch(prefix="/"))
        route.route.cluster = INBOUND_PASSTHROUGH_CLUSTER
        route.route.timeout.CopyFrom(duration_pb2.Duration())
        config.virtual_hosts.append(
            rc.VirtualHost(name="inbound|http|0", domains=["*"], routes=[route])
        )
    return config


# -- VirtualService rules to routes ----------------------------------------------------------


class RouteBuilder:
    """Translates VirtualService rules for one proxy and one set of gateways (``mesh`` for
    sidecars), memoising per VirtualService and port."""

    def __init__(self, view: ProxyView, gateways: frozenset[str]) -> None:
        self.view = view
        self.gateways = gateways
        self._memo: dict[tuple[int, int], list[rc.Route]] = {}

    def __repr__(self) -> str:
        return f"<RouteBuilder {self.view.proxy.id} gateways={sorted(self.gateways)}>"

    def virtual_service_routes(self, vs: VirtualServiceConfig, port: int) -> list[rc.Route]:
        """The routes of ``vs`` for listener ``port`` (``BuildHTTPRoutesForVirtualService``)."""
        key = (id(vs), port)
        found = self._memo.get(key)
        if found is not None:
            return found
        out: list[rc.Route] = []
        for rule in vs.http:
            if not rule.match:
                route = self.route(rule, None, port)
                if route is not None:
                    out.append(route)
                break  # a rule without matches catches everything
            done = False
            for match in rule.match:
                route = self.route(rule, match, port)
                if route is None:
                    continue
                out.append(route)
                if is_catch_all(route):
                    done = True
                    break
            if done:
                break
        self._memo[key] = out
        return out

    def _source_matches(self, match: HTTPMatchRequest) -> bool:
        """Istio's ``sourceMatchHTTP``."""
        proxy = self.view.proxy
        if match.gateways:
            return any(g in self.gateways for g in match.gateways)
        if not labels_match(match.source_labels, proxy.labels):
            return False
        return not match.source_namespace or match.source_namespace == proxy.namespace

    def route(self, rule: HTTPRoute, match: HTTPMatchRequest | None, port: int) -> rc.Route | None:
        """One rule and one of its matches as a route (``translateRoute``); None when the
        match does not apply to this proxy or port."""
        if match is not None:
            if match.port and match.port != port:
                return None
            if not self._source_matches(match):
                return None
        name = rule.name
        if match is not None and match.name:
            name = f"{name}.{match.name}" if name else match.name
        out = rc.Route(name=name)
        out.match.CopyFrom(route_match(match))
        if match is not None and match.stat_prefix:
            out.stat_prefix = match.stat_prefix
        authority = ""
        if rule.headers is not None:
            authority = apply_header_operations(out, rule.headers)
        if rule.redirect is not None:
            redirect = redirect_action(rule.redirect, port)
            if redirect is None:
                return None  # a redirect code Envoy has no name for
            out.redirect.CopyFrom(redirect)
        elif rule.direct_response is not None:
            out.direct_response.status = rule.direct_response.status
            body = rule.direct_response.body
            if body is not None and body.string is not None:
                out.direct_response.body.inline_string = body.string
            elif body is not None and body.bytes is not None:
                out.direct_response.body.inline_bytes = base64.b64decode(body.bytes)
        else:
            self._route_action(out, rule, port, authority)
        if rule.fault is not None:
            fault = fault_config(rule.fault)
            if fault is not None:
                out.typed_per_filter_config[FAULT_FILTER].CopyFrom(_pack(fault))
        if rule.cors_policy is not None:
            out.typed_per_filter_config[CORS_FILTER].CopyFrom(_pack(cors_policy(rule.cors_policy)))
        return out

    def _route_action(self, out: rc.Route, rule: HTTPRoute, port: int, authority: str) -> None:
        """Istio's ``applyHTTPRouteDestination``."""
        view = self.view
        action = out.route
        hash_policies: list[rc.RouteAction.HashPolicy] = []
        weighted: list[rc.WeightedCluster.ClusterWeight] = []
        several = len(rule.route) > 1
        for dst in rule.route:
            if several and dst.weight == 0:
                continue
            cluster = self.destination_cluster(dst.destination, port)
            cw = rc.WeightedCluster.ClusterWeight(name=cluster)
            if several:
                cw.weight.value = dst.weight
            if dst.headers is not None:
                cw_authority = apply_header_operations(cw, dst.headers)
                if cw_authority:
                    cw.host_rewrite_literal = cw_authority
            weighted.append(cw)
            policy = self.hash_policy(dst.destination, port)
            if policy is not None and policy not in hash_policies:
                hash_policies.append(policy)
        retry = retry_policy(
            rule.retries if rule.retries is not None else view.mesh.default_http_retry_policy,
            consistent_hash=bool(hash_policies) and len(rule.route) == 1,
            exclude_503=view.mesh.exclude_503_from_default_retries,
        )
        if retry is not None:
            action.retry_policy.CopyFrom(retry)
        action.timeout.CopyFrom(
            _duration(rule.timeout) if rule.timeout is not None else duration_pb2.Duration()
        )
        if rule.rewrite is not None:
            regex = rule.rewrite.uri_regex_rewrite
            if regex is not None:
                action.regex_rewrite.pattern.regex = regex.match
                action.regex_rewrite.substitution = regex.rewrite
            elif rule.rewrite.uri:
                action.prefix_rewrite = rule.rewrite.uri
            if rule.rewrite.authority:
                authority = rule.rewrite.authority
        if authority:
            action.host_rewrite_literal = authority
        for mirror, percent in _mirrors(rule):
            policy = action.request_mirror_policies.add()
            policy.cluster = self.destination_cluster(mirror, port)
            policy.runtime_fraction.default_value.CopyFrom(percent)
        if len(weighted) == 1:
            only = weighted[0]
            action.cluster = only.name
            out.request_headers_to_add.extend(only.request_headers_to_add)
            out.request_headers_to_remove.extend(only.request_headers_to_remove)
            out.response_headers_to_add.extend(only.response_headers_to_add)
            out.response_headers_to_remove.extend(only.response_headers_to_remove)
            if only.host_rewrite_literal and not action.host_rewrite_literal:
                action.host_rewrite_literal = only.host_rewrite_literal
        elif weighted:
            action.weighted_clusters.clusters.extend(weighted)
        action.hash_policy.extend(hash_policies)

    def destination_cluster(self, destination: Destination, port: int) -> str:
        """Istio's ``GetDestinationCluster``."""
        service = self.view.service(destination.host)
        number = port
        if destination.port is not None:
            number = destination.port.number
        elif service is not None and len(service.ports) == 1:
            number = service.ports[0].port
        # An ExternalName service has its own DNS cluster here (Istio aliases it to the
        # target host's cluster instead), so the destination host is kept as it is.
        return outbound_cluster_name(number, destination.host, destination.subset)

    def hash_policy(self, destination: Destination, port: int) -> rc.RouteAction.HashPolicy | None:
        """The route hash policy from the destination's DestinationRule consistentHash, if
        any (subset port-level > subset > port-level > top-level)."""
        service = self.view.service(destination.host)
        if service is None:
            return None
        rule = self.view.destination_rule(service)
        if rule is None:
            return None
        number = destination.port.number if destination.port is not None else port
        if destination.port is None and len(service.ports) == 1:
            number = service.ports[0].port
        lb = rule.policy(number, destination.subset).load_balancer
        if lb is None or lb.consistent_hash is None:
            return None
        return consistent_hash_policy(lb.consistent_hash)

    def default_route(self, service: Service, port: int) -> rc.Route:
        """The route of a service without a VirtualService (``BuildDefaultHTTPOutboundRoute``)."""
        route = rc.Route(name=DEFAULT_ROUTE, match=rc.RouteMatch(prefix="/"))
        action = route.route
        action.cluster = outbound_cluster_name(port, service.hostname)
        action.timeout.CopyFrom(duration_pb2.Duration())
        policy = self.hash_policy(Destination(host=service.hostname), port)
        retry = retry_policy(
            self.view.mesh.default_http_retry_policy,
            consistent_hash=policy is not None,
            exclude_503=self.view.mesh.exclude_503_from_default_retries,
        )
        if retry is not None:
            action.retry_policy.CopyFrom(retry)
        if policy is not None:
            action.hash_policy.append(policy)
        return route


def is_catch_all(route: rc.Route) -> bool:
    """Istio's ``IsCatchAllRoute``: prefix ``/`` (or regex ``.*``), no other conditions."""
    m = route.match
    if m.headers or m.query_parameters or m.dynamic_metadata:
        return False
    kind = m.WhichOneof("path_specifier")
    if kind == "prefix":
        return bool(m.prefix == "/")
    if kind == "path_separated_prefix":
        return bool(m.path_separated_prefix == "/")
    if kind == "safe_regex":
        return bool(m.safe_regex.regex == ".*")
    return False


# -- pieces of a route ---------------------------------------------------------------------------


def route_match(match: HTTPMatchRequest | None) -> rc.RouteMatch:
    """Istio's ``TranslateRouteMatch``."""
    out = rc.RouteMatch(prefix="/")
    if match is None:
        return out
    headers: list[rc.HeaderMatcher] = []
    claims: list[metadata_pb2.MetadataMatcher] = []
    for name, value in match.headers.items():
        if name.startswith("@request.auth.claims"):
            claims.append(_claim_matcher(name, value))
        else:
            headers.append(header_matcher(name, value))
    for name, value in match.without_headers.items():
        if name.startswith("@request.auth.claims"):
            claim = _claim_matcher(name, value)
            claim.invert = True
            claims.append(claim)
            continue
        m = header_matcher(name, value)
        m.invert_match = True
        if m.WhichOneof("header_match_specifier") != "present_match":
            m.treat_missing_header_as_empty = True
        headers.append(m)
    headers.sort(key=lambda h: h.name)
    out.headers.extend(headers)
    for claim in claims:
        out.dynamic_metadata.append(claim)
    uri = match.uri
    if uri is not None:
        if uri.exact is not None:
            out.path = uri.exact
        elif uri.prefix is not None:
            out.prefix = uri.prefix
        elif uri.regex is not None:
            out.safe_regex.regex = uri.regex
    out.case_sensitive.value = not match.ignore_uri_case
    for pseudo, pseudo_match in ((":method", match.method), (":authority", match.authority)):
        if pseudo_match is not None:
            out.headers.append(header_matcher(pseudo, pseudo_match))
    if match.scheme is not None:
        out.headers.append(header_matcher(":scheme", match.scheme))
    for name, value in match.query_params.items():
        q = out.query_parameters.add(name=name)
        if _catch_all_string(value):
            q.present_match = True
        else:
            sm = string_matcher(value)
            if sm is not None:
                q.string_match.CopyFrom(sm)
    return out


def _catch_all_string(value: StringMatch | None) -> bool:
    return value is None or value.regex == "*"


def header_matcher(name: str, value: StringMatch | None) -> rc.HeaderMatcher:
    """Istio's ``translateHeaderMatch``: regex ``*`` (or nothing) means "present"."""
    out = rc.HeaderMatcher(name=name)
    if _catch_all_string(value):
        out.present_match = True
        return out
    assert value is not None
    sm = string_matcher(value)
    if sm is not None:
        out.string_match.CopyFrom(sm)
    return out


def string_matcher(value: StringMatch) -> string_pb2.StringMatcher | None:
    """Istio's ``ConvertToEnvoyMatch``; an empty prefix (Envoy needs one character) is the
    regex ``.*``, which matches the same values."""
    if value.exact is not None:
        return string_pb2.StringMatcher(exact=value.exact)
    if value.prefix is not None:
        if not value.prefix:
            return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=".*"))
        return string_pb2.StringMatcher(prefix=value.prefix)
    if value.regex is not None:
        return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=value.regex))
    return None


def _claim_matcher(name: str, value: StringMatch) -> metadata_pb2.MetadataMatcher:
    """``@request.auth.claims.a.b`` / ``@request.auth.claims[a][b]``: the JWT filter's
    ``payload`` metadata, as a string or a list containing it."""
    rest = name[len("@request.auth.claims") :]
    if rest.startswith("."):
        path = rest[1:].split(".")
    else:
        path = [p for p in rest.replace("]", "").split("[") if p]
    out = metadata_pb2.MetadataMatcher(filter=JWT_FILTER)
    out.path.add(key="payload")
    for key in path:
        out.path.add(key=key)
    sm = string_matcher(value) if not _catch_all_string(value) else None
    if sm is None:
        out.value.present_match = True
        return out
    either = out.value.or_match
    either.value_matchers.add().string_match.CopyFrom(sm)
    either.value_matchers.add().list_match.one_of.string_match.CopyFrom(sm)
    return out


def apply_header_operations(
    target: rc.Route | rc.WeightedCluster.ClusterWeight, headers: Headers
) -> str:
    """Istio's ``TranslateHeadersOperations`` onto a route or a weighted cluster; returns the
    authority to rewrite to (``set`` beats ``add``), if the request's host is set."""
    request = headers.request
    response = headers.response
    authority = ""
    if request is not None:
        set_authority = _append_headers(target.request_headers_to_add, request.set, _OVERWRITE)
        add_authority = _append_headers(target.request_headers_to_add, request.add, _APPEND)
        authority = set_authority or add_authority
        target.request_headers_to_remove.extend(_droppable(request.remove))
    if response is not None:
        _append_headers(target.response_headers_to_add, response.set, _OVERWRITE)
        _append_headers(target.response_headers_to_add, response.add, _APPEND)
        target.response_headers_to_remove.extend(_droppable(response.remove))
    return authority


def _append_headers(
    into: object, values: Mapping[str, str], action: base_pb2.HeaderValueOption.HeaderAppendAction
) -> str:
    authority = ""
    options: list[base_pb2.HeaderValueOption] = []
    for key in sorted(values):
        lower = key.lower()
        if lower in (":authority", "host"):
            authority = values[key]
            continue
        if lower.startswith(":"):
            continue
        option = base_pb2.HeaderValueOption(append_action=action)
        option.header.key = key
        option.header.value = values[key]
        options.append(option)
    into.extend(options)  # type: ignore[attr-defined]
    return authority


def _droppable(names: Iterable[str]) -> list[str]:
    return [n for n in names if not n.startswith(":") and n.lower() != "host"]


def redirect_action(redirect: HTTPRedirect, port: int) -> rc.RedirectAction | None:
    """Istio's ``ApplyRedirect``; None for a code Envoy cannot send."""
    code = _REDIRECT_CODES.get(redirect.redirect_code)
    if code is None:
        return None
    out = rc.RedirectAction(response_code=code)
    if redirect.authority:
        out.host_redirect = redirect.authority
    if redirect.uri:
        out.path_redirect = redirect.uri
    if redirect.scheme:
        out.scheme_redirect = redirect.scheme
    if redirect.port is not None:
        out.port_redirect = redirect.port
    elif redirect.derive_port is RedirectPortSelection.FROM_REQUEST_PORT:
        default = (redirect.scheme == "http" and port == 80) or (
            redirect.scheme == "https" and port == 443
        )
        if not default:
            out.port_redirect = port
    return out


def retry_policy(
    retry: HTTPRetry | None, *, consistent_hash: bool = False, exclude_503: bool = True
) -> rc.RetryPolicy | None:
    """Istio's ``retry.ConvertPolicy``: the default policy, overridden field by field."""
    out = rc.RetryPolicy(retry_on=DEFAULT_RETRY_ON, host_selection_retry_max_attempts=5)
    out.num_retries.value = 2
    if not exclude_503:
        out.retriable_status_codes.append(503)
    if not consistent_hash:
        out.retry_host_predicate.append(_previous_hosts())
    if retry is None:
        return out
    if retry.attempts <= 0:
        return None
    out.num_retries.value = retry.attempts
    if retry.retry_on:
        conditions: list[str] = []
        codes: list[int] = []
        for part in retry.retry_on.split(","):
            part = part.strip()
            if not part:
                continue
            if part.isdigit() and int(part) in _STATUS_CODES:
                codes.append(int(part))
            else:
                conditions.append(part)
        retry_on = ",".join(conditions)
        if codes and "retriable-status-codes" not in retry_on:
            retry_on = ",".join(filter(None, (retry_on, "retriable-status-codes")))
        out.retry_on = retry_on
        del out.retriable_status_codes[:]
        out.retriable_status_codes.extend(codes)
    if retry.per_try_timeout is not None:
        out.per_try_timeout.CopyFrom(_duration(retry.per_try_timeout))
    if retry.retry_ignore_previous_hosts is not None:
        del out.retry_host_predicate[:]
        if retry.retry_ignore_previous_hosts:
            out.retry_host_predicate.append(_previous_hosts())
    if retry.retry_remote_localities:
        out.retry_priority.name = PREVIOUS_PRIORITIES
        out.retry_priority.typed_config.CopyFrom(
            _pack(previous_priorities_config_pb2.PreviousPrioritiesConfig(update_frequency=2))
        )
    if retry.backoff is not None:
        out.retry_back_off.base_interval.CopyFrom(_duration(retry.backoff))
    return out


def _previous_hosts() -> rc.RetryPolicy.RetryHostPredicate:
    predicate = rc.RetryPolicy.RetryHostPredicate(name=PREVIOUS_HOSTS)
    predicate.typed_config.CopyFrom(_pack(previous_hosts_pb2.PreviousHostsPredicate()))
    return predicate


def fault_config(fault: HTTPFaultInjection) -> fault_pb2.HTTPFault | None:
    """Istio's ``TranslateFault``."""
    out = fault_pb2.HTTPFault()
    delay = fault.delay
    if delay is not None and delay.fixed_delay is not None:
        d = common_fault_pb2.FaultDelay()
        d.fixed_delay.CopyFrom(_duration(delay.fixed_delay))
        if delay.percentage is not None:
            d.percentage.CopyFrom(_million(delay.percentage))
        else:
            d.percentage.numerator = delay.percent
            d.percentage.denominator = percent_pb2.FractionalPercent.HUNDRED
        out.delay.CopyFrom(d)
    abort = fault.abort
    if abort is not None and (abort.http_status is not None or abort.grpc_status is not None):
        a = fault_pb2.FaultAbort()
        if abort.http_status is not None:
            a.http_status = abort.http_status
        else:
            assert abort.grpc_status is not None
            a.grpc_status = _GRPC_CODES[abort.grpc_status]
        if abort.percentage is not None:
            a.percentage.CopyFrom(_million(abort.percentage))
        out.abort.CopyFrom(a)
    if not out.HasField("delay") and not out.HasField("abort"):
        return None
    return out


def cors_policy(cors: CorsPolicy) -> cors_pb2.CorsPolicy:
    """Istio's ``TranslateCORSPolicy``."""
    out = cors_pb2.CorsPolicy()
    out.forward_not_matching_preflights.value = (
        cors.unmatched_preflights is not UnmatchedPreflights.IGNORE
    )
    if cors.allow_origins:
        for origin in cors.allow_origins:
            sm = string_matcher(origin)
            if sm is not None:
                out.allow_origin_string_match.append(sm)
    else:
        for exact in cors.allow_origin:
            out.allow_origin_string_match.append(string_pb2.StringMatcher(exact=exact))
    out.filter_enabled.default_value.numerator = 100
    out.filter_enabled.default_value.denominator = percent_pb2.FractionalPercent.HUNDRED
    if cors.allow_credentials is not None:
        out.allow_credentials.value = cors.allow_credentials
    out.allow_headers = ",".join(cors.allow_headers)
    out.allow_methods = ",".join(cors.allow_methods)
    out.expose_headers = ",".join(cors.expose_headers)
    if cors.max_age is not None:
        out.max_age = str(cors.max_age.nanos // 1_000_000_000)
    return out


def consistent_hash_policy(hashing: ConsistentHashLB) -> rc.RouteAction.HashPolicy | None:
    """A DestinationRule ``consistentHash`` as a route hash policy
    (``consistentHashToHashPolicy``)."""
    out = rc.RouteAction.HashPolicy()
    if hashing.http_header_name is not None:
        out.header.header_name = hashing.http_header_name
    elif hashing.http_cookie is not None:
        cookie = hashing.http_cookie
        out.cookie.name = cookie.name
        if cookie.path:
            out.cookie.path = cookie.path
        if cookie.ttl is not None:
            out.cookie.ttl.CopyFrom(_duration(cookie.ttl))
        for attribute in cookie.attributes:
            out.cookie.attributes.add(name=attribute.name, value=attribute.value)
    elif hashing.use_source_ip is not None:
        out.connection_properties.source_ip = hashing.use_source_ip
    elif hashing.http_query_parameter_name is not None:
        out.query_parameter.name = hashing.http_query_parameter_name
    else:
        return None
    return out


def _mirrors(rule: HTTPRoute) -> list[tuple[Destination, percent_pb2.FractionalPercent]]:
    """``mirror`` (with mirrorPercentage / mirrorPercent) and ``mirrors``: unset means 100%,
    an explicit 0 means no mirror (``MirrorPercent``, ``MirrorPercentByPolicy``)."""
    out: list[tuple[Destination, percent_pb2.FractionalPercent]] = []
    if rule.mirror is not None:
        legacy = rule.mirror_percent
        if legacy is None:
            legacy = rule.mirror_percent_snake
        if rule.mirror_percentage is not None:
            if rule.mirror_percentage.value > 0:
                out.append((rule.mirror, _million(rule.mirror_percentage)))
        elif legacy is not None:
            if legacy > 0:
                out.append((rule.mirror, _hundred(legacy)))
        else:
            out.append((rule.mirror, _hundred(100)))
    for policy in rule.mirrors:
        if policy.percentage is None:
            out.append((policy.destination, _hundred(100)))
        elif policy.percentage.value > 0:
            out.append((policy.destination, _million(policy.percentage)))
    return out


def _million(percent: Percent) -> percent_pb2.FractionalPercent:
    return percent_pb2.FractionalPercent(
        numerator=round(percent.value * 10000),
        denominator=percent_pb2.FractionalPercent.MILLION,
    )


def _hundred(value: int) -> percent_pb2.FractionalPercent:
    return percent_pb2.FractionalPercent(
        numerator=value, denominator=percent_pb2.FractionalPercent.HUNDRED
    )


def _duration(d: Duration) -> duration_pb2.Duration:
    seconds, nanos = divmod(d.nanos, 1_000_000_000)
    return duration_pb2.Duration(seconds=seconds, nanos=nanos)


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


__all__ = [
    "ALLOW_ANY",
    "BLOCK_ALL",
    "CORS_FILTER",
    "DEFAULT_RETRY_ON",
    "DEFAULT_ROUTE",
    "FAULT_FILTER",
    "HTTP_PROXY_ROUTE_CONFIG",
    "INBOUND_ROUTE_CONFIG",
    "RouteBuilder",
    "VirtualHostPlan",
    "alt_hosts",
    "build_route_configs",
    "catch_all_virtual_host",
    "consistent_hash_policy",
    "cors_policy",
    "fault_config",
    "gateway_route_configs",
    "header_matcher",
    "http_proxy_route_config",
    "inbound_route_config",
    "is_catch_all",
    "redirect_action",
    "retry_policy",
    "route_match",
    "service_domains",
    "sidecar_route_config",
    "sidecar_virtual_hosts",
    "string_matcher",
]
