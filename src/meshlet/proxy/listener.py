"""Listeners and their HTTP connection manager, compiled from Envoy protos.

A listener is an address plus filter chains, each holding one
``envoy.filters.network.http_connection_manager`` and, optionally, a TLS ``transport_socket``.
With several chains, ``filter_chain_match`` (``server_names``, ``transport_protocol``,
``application_protocols``) picks one per connection, as Envoy does; the
``envoy.filters.listener.tls_inspector`` listener filter tells ``tls`` from ``raw_buffer`` and
finds SNI and ALPN (Istio's PERMISSIVE: a TLS chain and a plaintext chain on one port). Each
chain's HCM the HCM carries an inline route
configuration (or, for listeners from ADS, an ``rds`` block naming a RouteConfiguration that
comes over ADS too: the HCM is compiled with an empty table that the ADS client fills in), the
HTTP filters (``envoy.filters.http.jwt_authn``, ``envoy.filters.http.rbac``,
``envoy.filters.http.fault`` then ``envoy.filters.http.router``, and Istio's
``istio.metadata_exchange`` and ``istio.stats`` as TypedStructs; nothing else), access logs,
``tracing`` (``telemetry.tracing``) and the HCM's timeouts and header rules. Defaults are
Envoy's (ENVOY-SEMANTICS §7).

The connection manager runs its filters in Istio's order (jwt_authn, then RBAC AUDIT/DENY/ALLOW,
then fault, then the router). A jwt_authn filter listed after another filter is refused rather
than run before it: RBAC reads the payload jwt_authn leaves. PyJWT is imported only when a chain
configures jwt_authn (``compile_jwt_authn``): most sidecars never check a token.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from xds.type.v3 import typed_struct_pb2

from meshlet.errors import ConfigError, ProblemList
from meshlet.proxy.fields import (
    DEFAULT_FETCH_TIMEOUT,
    ads_config_source,
    check_fields,
    duration_field,
    join,
    uint_field,
)
from meshlet.proxy.filters.fault import FaultPolicy, compile_fault
from meshlet.proxy.filters.istio_stats import STATS_CONFIG_TYPE, StatsConfig, compile_stats
from meshlet.proxy.filters.jwt_authn import JwtAuthn, compile_jwt_authn
from meshlet.proxy.filters.metadata_exchange import PEER_METADATA_CONFIG_TYPE, TYPED_STRUCT_TYPE
from meshlet.proxy.filters.rbac import RbacFilter, compile_rbac
from meshlet.proxy.routing import RouteTable, compile_route_config
from meshlet.proxy.telemetry.access_log import AccessLogger, compile_access_logs
from meshlet.proxy.telemetry.tracing import TracingConfig, compile_tracing
from meshlet.proxy.tls import TLS_INSPECTOR_TYPE, TlsConfig, compile_transport_socket

HCM_TYPE = "type.googleapis.com/" + hcm_pb2.HttpConnectionManager.DESCRIPTOR.full_name
FAULT_TYPE = "type.googleapis.com/" + fault_pb2.HTTPFault.DESCRIPTOR.full_name
ROUTER_TYPE = "type.googleapis.com/" + router_pb2.Router.DESCRIPTOR.full_name
RBAC_TYPE = "type.googleapis.com/" + rbac_pb2.RBAC.DESCRIPTOR.full_name
JWT_AUTHN_TYPE = "type.googleapis.com/" + jwt_pb2.JwtAuthentication.DESCRIPTOR.full_name
_SUPPORTED_HTTP_FILTERS = (
    "envoy.filters.http.jwt_authn, envoy.filters.http.rbac, envoy.filters.http.fault, "
    "envoy.filters.http.router, istio.metadata_exchange, istio.stats"
)

_LISTENER_FIELDS = {
    "name",
    "address",
    "filter_chains",
    "traffic_direction",
    "stat_prefix",
    "listener_filters",
}
_CHAIN_MATCH_FIELDS = {"server_names", "transport_protocol", "application_protocols"}
_XFCC = hcm_pb2.HttpConnectionManager.ForwardClientCertDetails
_SET_CURRENT_FIELDS = ("subject", "uri", "dns", "cert")  # Envoy's order in the header
_HCM_FIELDS = {
    "codec_type",
    "stat_prefix",
    "route_config",
    "http_filters",
    "access_log",
    "generate_request_id",
    "use_remote_address",
    "xff_num_trusted_hops",
    "skip_xff_append",
    "stream_idle_timeout",
    "request_timeout",
    "request_headers_timeout",
    "common_http_protocol_options",
    "max_request_headers_kb",
    "server_name",
    "server_header_transformation",
    "proxy_100_continue",
    "always_set_request_id_in_response",
    "preserve_external_request_id",
    "rds",
    "forward_client_cert_details",
    "set_current_client_cert_details",
    "tracing",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class HcmConfig:
    """What one HTTP connection manager does, compiled."""

    stat_prefix: str
    route_table: RouteTable
    fault_filter: bool  # the fault filter is in the chain (it may still have no config)
    fault: FaultPolicy | None  # filter-level fault config; routes may override it
    access_logs: tuple[AccessLogger, ...]
    generate_request_id: bool = True
    preserve_external_request_id: bool = False
    always_set_request_id_in_response: bool = False
    use_remote_address: bool = False
    xff_num_trusted_hops: int = 0
    skip_xff_append: bool = False
    stream_idle_timeout: float = 300.0  # 0 disables
    request_timeout: float = 0.0  # 0 disables
    request_headers_timeout: float = 0.0  # 0 disables
    idle_timeout: float = 3600.0  # connection with no streams; 0 disables
    max_request_headers_bytes: int = 60 * 1024
    max_headers_count: int = 100
    server_name: bytes | None = b"envoy"  # None: pass the upstream's through
    server_append_if_absent: bool = False
    proxy_100_continue: bool = False
    suppress_envoy_headers: bool = False
    rds_route_name: str = ""  # RDS: route_table is a placeholder until the route arrives
    rds_fetch_timeout: float | None = 15.0  # RDS: how long the first config waits (None: ever)
    jwt_authn: JwtAuthn | None = None  # envoy.filters.http.jwt_authn; runs before RBAC
    rbac: tuple[RbacFilter, ...] = ()  # the RBAC filters, in chain order
    # x-forwarded-client-cert: SANITIZE, FORWARD_ONLY, APPEND_FORWARD, SANITIZE_SET or
    # ALWAYS_FORWARD_ONLY, and the peer certificate's fields set_current_client_cert_details
    # adds (subject, uri, dns, cert; Envoy's order).
    forward_client_cert: str = "SANITIZE"
    client_cert_details: tuple[str, ...] = ()
    # Istio's filters (TypedStructs): peer metadata exchange, and the stats config (None: the
    # standard metrics with Istio's defaults)
    metadata_exchange: bool = False
    istio_stats: StatsConfig | None = None
    tracing: TracingConfig | None = None  # None: no spans, no trace headers (Envoy's null tracer)


@dataclass(frozen=True, slots=True, kw_only=True)
class ChainMatch:
    """``filter_chain_match``: empty fields match anything."""

    server_names: tuple[str, ...] = ()
    transport_protocol: str = ""
    application_protocols: tuple[str, ...] = ()

    def server_name_rank(self, sni: str) -> int:
        """How well ``sni`` matches (Envoy: exact > longest wildcard > none listed); -1: no."""
        if not self.server_names:
            return 0
        best = -1
        for name in self.server_names:
            if name == sni and sni:
                return 1 << 16
            if name.startswith("*.") and sni.endswith(name[1:]):
                best = max(best, len(name))
        return best


@dataclass(frozen=True, slots=True, kw_only=True)
class FilterChainConfig:
    name: str
    match: ChainMatch
    tls: TlsConfig | None  # None: plaintext (raw_buffer)
    hcm: HcmConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerConfig:
    name: str
    host: str
    port: int
    reporter: str  # "destination" for INBOUND listeners, else "source" (Istio's reporter label)
    chains: tuple[FilterChainConfig, ...]
    tls_inspector: bool = False  # envoy.filters.listener.tls_inspector is configured
    outbound: bool = False  # traffic_direction OUTBOUND (a sidecar's outbound listener)

    @property
    def hcm(self) -> HcmConfig:
        """The first chain's HCM (the only one of most listeners)."""
        return self.chains[0].hcm

    @property
    def plain(self) -> bool:
        """One plaintext chain, no inspection: connections go straight to HTTP."""
        return len(self.chains) == 1 and self.chains[0].tls is None and not self.tls_inspector

    def secret_names(self) -> frozenset[str]:
        return frozenset(n for c in self.chains if c.tls for n in c.tls.secret_names())

    def with_hcms(self, hcms: tuple[HcmConfig, ...]) -> ListenerConfig:
        """This listener with each chain's HCM replaced (RDS fills in route tables)."""
        chains = tuple(replace(c, hcm=h) for c, h in zip(self.chains, hcms, strict=True))
        return replace(self, chains=chains)

    def select_chain(self, transport_protocol: str, sni: str, alpn: tuple[str, ...]) -> int | None:
        """The index of the chain for a connection, as Envoy's filter chain matching picks
        it: by server name, then transport protocol, then application protocol, the most
        specific match winning at each step; None when no chain matches."""
        chains = self.chains
        ranks = [c.match.server_name_rank(sni) for c in chains]
        best = max(ranks, default=-1)
        candidates = [i for i in range(len(chains)) if ranks[i] == best and best >= 0]
        exact = [i for i in candidates if chains[i].match.transport_protocol == transport_protocol]
        candidates = exact or [i for i in candidates if not chains[i].match.transport_protocol]
        offered = set(alpn)
        exact = [i for i in candidates if offered & set(chains[i].match.application_protocols)]
        candidates = exact or [i for i in candidates if not chains[i].match.application_protocols]
        return candidates[0] if candidates else None


def compile_listener(
    proto: listener_pb2.Listener, path: str, *, rds: bool = False
) -> ListenerConfig:
    """Compile one Listener; ``rds`` allows HCMs whose routes come by RDS over ADS."""
    check_fields(proto, path, _LISTENER_FIELDS)
    problems = ProblemList()
    addr = proto.address
    addr_path = join(path, "address")
    host, port = "", 0
    try:
        check_fields(addr, addr_path, {"socket_address"})
        sa = addr.socket_address
        check_fields(sa, join(addr_path, "socket_address"), {"address", "port_value", "protocol"})
        host, port = sa.address, sa.port_value
        if not host:
            problems.add(join(addr_path, "socket_address.address"), "is required")
        if not 0 <= port < 65536:
            problems.add(join(addr_path, "socket_address.port_value"), "must be a port")
    except ConfigError as e:
        problems.extend(e)
    chains: list[FilterChainConfig] = []
    if not proto.filter_chains:
        problems.add(join(path, "filter_chains"), "at least one filter chain is required")
    for i, chain in enumerate(proto.filter_chains):
        chain_path = join(path, f"filter_chains[{i}]")
        try:
            chains.append(_compile_filter_chain(chain, chain_path, proto.name, rds=rds))
        except ConfigError as e:
            problems.extend(e)
    inspector = False
    for i, lf in enumerate(proto.listener_filters):
        lpath = join(path, f"listener_filters[{i}]")
        try:
            check_fields(lf, lpath, {"name", "typed_config"})
        except ConfigError as e:
            problems.extend(e)
        url = lf.typed_config.type_url
        if url == TLS_INSPECTOR_TYPE or (
            not url and lf.name == "envoy.filters.listener.tls_inspector"
        ):
            inspector = True
        else:
            problems.add(
                lpath,
                f"{url or lf.name} is not supported (supported: "
                "envoy.filters.listener.tls_inspector)",
            )
    if not inspector and any(
        c.match.server_names or c.match.application_protocols or c.match.transport_protocol == "tls"
        for c in chains
    ):
        problems.add(
            join(path, "listener_filters"),
            "matching on server_names, application_protocols or transport_protocol tls needs "
            "envoy.filters.listener.tls_inspector",
        )
    problems.raise_if_any()
    inbound = proto.traffic_direction == base_pb2.INBOUND
    return ListenerConfig(
        name=proto.name or f"{host}_{port}",
        host=host,
        port=port,
        reporter="destination" if inbound else "source",
        chains=tuple(chains),
        tls_inspector=inspector,
        outbound=proto.traffic_direction == base_pb2.OUTBOUND,
    )


def _compile_filter_chain(
    chain: listener_pb2.FilterChain, path: str, listener_name: str, *, rds: bool
) -> FilterChainConfig:
    """A chain's match and transport socket here; its HCM in ``_compile_chain``."""
    problems = ProblemList()
    match = ChainMatch()
    if chain.HasField("filter_chain_match"):
        m = chain.filter_chain_match
        mpath = join(path, "filter_chain_match")
        try:
            check_fields(m, mpath, _CHAIN_MATCH_FIELDS)
        except ConfigError as e:
            problems.extend(e)
        if m.transport_protocol not in ("", "tls", "raw_buffer"):
            problems.add(
                join(mpath, "transport_protocol"),
                f"{m.transport_protocol!r} is not supported (tls, raw_buffer)",
            )
        match = ChainMatch(
            server_names=tuple(n.lower() for n in m.server_names),
            transport_protocol=m.transport_protocol,
            application_protocols=tuple(m.application_protocols),
        )
    tls: TlsConfig | None = None
    if chain.HasField("transport_socket"):
        try:
            tls = compile_transport_socket(
                chain.transport_socket, join(path, "transport_socket"), upstream=False
            )
        except ConfigError as e:
            problems.extend(e)
    hcm: HcmConfig | None = None
    try:
        hcm = _compile_chain(chain, path, listener_name, rds=rds)
    except ConfigError as e:
        problems.extend(e)
    problems.raise_if_any()
    assert hcm is not None
    return FilterChainConfig(name=chain.name, match=match, tls=tls, hcm=hcm)


def _compile_chain(
    chain: listener_pb2.FilterChain, path: str, listener_name: str, *, rds: bool = False
) -> HcmConfig:
    check_fields(chain, path, {"filters", "name", "filter_chain_match", "transport_socket"})
    if len(chain.filters) != 1:
        raise ConfigError.at(
            join(path, "filters"),
            "exactly one network filter, envoy.filters.network.http_connection_manager, "
            "is supported",
        )
    f = chain.filters[0]
    fpath = join(path, "filters[0]")
    check_fields(f, fpath, {"name", "typed_config"})
    if f.typed_config.type_url != HCM_TYPE:
        raise ConfigError.at(
            join(fpath, "typed_config"),
            f"{f.typed_config.type_url or f.name} is not supported "
            "(supported: envoy.filters.network.http_connection_manager)",
        )
    hcm = hcm_pb2.HttpConnectionManager()
    f.typed_config.Unpack(hcm)
    return compile_hcm(hcm, join(fpath, "typed_config"), listener_name, rds=rds)


def compile_hcm(
    proto: hcm_pb2.HttpConnectionManager, path: str, listener_name: str, *, rds: bool = False
) -> HcmConfig:
    problems = ProblemList()

    def guard(fn: object) -> object:
        try:
            assert callable(fn)
            return fn()
        except ConfigError as e:
            problems.extend(e)
            return None

    guard(lambda: check_fields(proto, path, _HCM_FIELDS))
    if proto.codec_type not in (
        hcm_pb2.HttpConnectionManager.AUTO,
        hcm_pb2.HttpConnectionManager.HTTP1,
    ):
        name = hcm_pb2.HttpConnectionManager.CodecType.Name(proto.codec_type)
        problems.add(join(path, "codec_type"), f"{name} is not supported (supported: AUTO, HTTP1)")
    rds_name = ""
    rds_timeout: float | None = DEFAULT_FETCH_TIMEOUT
    table: object = None
    if rds and proto.HasField("rds"):
        compiled_rds = guard(lambda: _compile_rds(proto, join(path, "rds")))
        if isinstance(compiled_rds, tuple):
            rds_name, rds_timeout = compiled_rds
        if proto.HasField("route_config"):
            problems.add(join(path, "route_config"), "is not allowed together with rds")
        table = _EMPTY_TABLE
    elif not proto.HasField("route_config"):
        problems.add(
            join(path, "route_config"),
            "an inline route_config is required"
            + ("" if rds else " (rds only for listeners from ADS)"),
        )
    else:
        table = guard(lambda: compile_route_config(proto.route_config, join(path, "route_config")))
    fault_filter, fault, suppress = False, None, False
    filters_path = join(path, "http_filters")
    names = []
    rbac: list[RbacFilter] = []
    jwt_authn: JwtAuthn | None = None
    metadata_exchange = stats_filter = False
    istio_stats: object = None
    for i, hf in enumerate(proto.http_filters):
        hpath = f"{filters_path}[{i}]"
        guard(lambda hf=hf, hpath=hpath: check_fields(hf, hpath, {"name", "typed_config"}))
        url = hf.typed_config.type_url
        if url == FAULT_TYPE or (not url and hf.name == "envoy.filters.http.fault"):
            fault_filter = True
            names.append("fault")
            if url:
                msg = fault_pb2.HTTPFault()
                hf.typed_config.Unpack(msg)
                fault = guard(
                    lambda msg=msg, hpath=hpath: compile_fault(msg, join(hpath, "typed_config"))
                )
        elif url == JWT_AUTHN_TYPE:
            if "jwt_authn" in names:
                problems.add(hpath, "only one envoy.filters.http.jwt_authn filter is supported")
            elif names:
                problems.add(
                    hpath,
                    "envoy.filters.http.jwt_authn must come first, before "
                    "envoy.filters.http.rbac and envoy.filters.http.fault (Istio's order)",
                )
            names.append("jwt_authn")
            msg_jwt = jwt_pb2.JwtAuthentication()
            hf.typed_config.Unpack(msg_jwt)
            try:
                jwt_authn = compile_jwt_authn(msg_jwt, join(hpath, "typed_config"))
            except ConfigError as e:
                problems.extend(e)
        elif url == RBAC_TYPE:
            names.append("rbac")
            msg_rbac = rbac_pb2.RBAC()
            hf.typed_config.Unpack(msg_rbac)
            compiled = guard(
                lambda m=msg_rbac, hpath=hpath: compile_rbac(m, join(hpath, "typed_config"))
            )
            if isinstance(compiled, RbacFilter):
                rbac.append(compiled)
        elif url == TYPED_STRUCT_TYPE:
            # Istio's own filters; they run around the others, so their place is free.
            ts = typed_struct_pb2.TypedStruct()
            hf.typed_config.Unpack(ts)
            tpath = join(hpath, "typed_config")
            if ts.type_url == PEER_METADATA_CONFIG_TYPE and not metadata_exchange:
                metadata_exchange = True
            elif ts.type_url == STATS_CONFIG_TYPE and not stats_filter:
                stats_filter = True
                istio_stats = guard(
                    lambda ts=ts, tpath=tpath: compile_stats(ts.value, join(tpath, "value"))
                )
            elif ts.type_url in (PEER_METADATA_CONFIG_TYPE, STATS_CONFIG_TYPE):
                problems.add(hpath, f"only one {ts.type_url} filter is supported")
            else:
                problems.add(
                    join(tpath, "type_url"),
                    f"{ts.type_url or '(empty)'} is not supported (supported: "
                    f"{PEER_METADATA_CONFIG_TYPE}, {STATS_CONFIG_TYPE})",
                )
        elif url == ROUTER_TYPE or (not url and hf.name == "envoy.filters.http.router"):
            names.append("router")
            if url:
                router = router_pb2.Router()
                hf.typed_config.Unpack(router)
                rpath = join(hpath, "typed_config")
                guard(
                    lambda router=router, rpath=rpath: check_fields(
                        router, rpath, {"suppress_envoy_headers"}
                    )
                )
                suppress = router.suppress_envoy_headers
        else:
            problems.add(
                hpath,
                f"{url or hf.name} is not supported (supported: {_SUPPORTED_HTTP_FILTERS})",
            )
    if names and names[-1] != "router":
        problems.add(filters_path, "the last HTTP filter must be envoy.filters.http.router")
    elif not names:
        problems.add(filters_path, "envoy.filters.http.router is required")
    logs = guard(lambda: compile_access_logs(list(proto.access_log), join(path, "access_log")))
    opts = proto.common_http_protocol_options
    opts_path = join(path, "common_http_protocol_options")
    guard(lambda: check_fields(opts, opts_path, {"idle_timeout", "max_headers_count"}))
    transformation = proto.server_header_transformation
    details: tuple[str, ...] = ()
    if proto.HasField("set_current_client_cert_details"):
        current = proto.set_current_client_cert_details
        cpath = join(path, "set_current_client_cert_details")
        guard(lambda: check_fields(current, cpath, {"subject", "uri", "dns", "cert"}))
        details = tuple(
            f
            for f in _SET_CURRENT_FIELDS
            if (current.subject.value if f == "subject" else getattr(current, f))
        )
    tracing = None
    if proto.HasField("tracing"):
        tracing = guard(lambda: compile_tracing(proto.tracing, join(path, "tracing")))
    problems.raise_if_any()
    assert isinstance(table, RouteTable)
    assert fault is None or isinstance(fault, FaultPolicy)
    assert istio_stats is None or isinstance(istio_stats, StatsConfig)
    assert tracing is None or isinstance(tracing, TracingConfig)
    generate = proto.generate_request_id.value if proto.HasField("generate_request_id") else True
    return HcmConfig(
        stat_prefix=proto.stat_prefix or listener_name,
        route_table=table,
        fault_filter=fault_filter,
        fault=fault,
        access_logs=tuple(logs) if isinstance(logs, tuple | list) else (),
        generate_request_id=generate,
        preserve_external_request_id=proto.preserve_external_request_id,
        always_set_request_id_in_response=proto.always_set_request_id_in_response,
        use_remote_address=proto.use_remote_address.value,
        xff_num_trusted_hops=proto.xff_num_trusted_hops,
        skip_xff_append=proto.skip_xff_append,
        stream_idle_timeout=_or(duration_field(proto, "stream_idle_timeout", 300.0)),
        request_timeout=_or(duration_field(proto, "request_timeout", 0.0)),
        request_headers_timeout=_or(duration_field(proto, "request_headers_timeout", 0.0)),
        idle_timeout=_or(duration_field(opts, "idle_timeout", 3600.0)),
        max_request_headers_bytes=uint_field(proto, "max_request_headers_kb", 60) * 1024,
        max_headers_count=uint_field(opts, "max_headers_count", 100),
        server_name=(
            None
            if transformation == hcm_pb2.HttpConnectionManager.PASS_THROUGH
            else (proto.server_name or "envoy").encode()
        ),
        server_append_if_absent=transformation == hcm_pb2.HttpConnectionManager.APPEND_IF_ABSENT,
        proxy_100_continue=proto.proxy_100_continue,
        suppress_envoy_headers=suppress,
        rds_route_name=rds_name,
        rds_fetch_timeout=rds_timeout,
        jwt_authn=jwt_authn,
        rbac=tuple(rbac),
        forward_client_cert=_XFCC.Name(proto.forward_client_cert_details),
        client_cert_details=details,
        metadata_exchange=metadata_exchange,
        istio_stats=istio_stats,
        tracing=tracing,
    )


def _compile_rds(proto: hcm_pb2.HttpConnectionManager, path: str) -> tuple[str, float | None]:
    """The route name of an ``rds`` block and its initial fetch timeout; its config source
    must be ADS."""
    rds = proto.rds
    check_fields(rds, path, {"route_config_name", "config_source"})
    if not rds.route_config_name:
        raise ConfigError.at(join(path, "route_config_name"), "is required")
    source_path = join(path, "config_source")
    if not rds.HasField("config_source"):
        raise ConfigError.at(source_path, "is required (config_source: {ads: {}})")
    timeout = ads_config_source(rds.config_source, source_path)
    return str(rds.route_config_name), timeout


_EMPTY_TABLE = compile_route_config(route_pb2.RouteConfiguration(), "")


def _or(value: float | None) -> float:
    return value or 0.0
