"""networking.istio.io: VirtualService, DestinationRule, Gateway, ServiceEntry, WorkloadEntry,
Sidecar -- every field of Istio's reference, for apiVersions v1, v1beta1 and v1alpha3 (the
three share one schema).

Class names are the proto message names of ``istio.io/api/networking/v1alpha3`` so that
istiod's code reads across (``HTTPRoute``, ``HTTPRouteDestination``, ``ClientTLSSettings``).
Checks follow Istio's CRD schema and validating webhook (``pkg/config/validation``) where they
are cheap; each message below quotes Istio's wording where it has one. One deliberate reading:
route weights are relative, as in current Istio -- a weight may not be negative, and when a
rule has several destinations their total must not be 0; they need not add up to 100.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from enum import StrEnum
from http import HTTPStatus
from typing import Annotated

from pydantic import AfterValidator, Field, model_validator

from meshlet.api.schema import (
    AnyDuration,
    Bool,
    ExportTo,
    Float,
    Host,
    Int,
    Issues,
    IstioModel,
    Labels,
    MinDuration,
    NonNegativeInt,
    PercentFloat,
    PercentInt,
    Port,
    Regex,
    Resource,
    UInt32,
    check_regex,
    is_decimal,
    is_dns1123_label,
    is_set,
)
from meshlet.api.selectors import PolicySelector

# -- enums (the first member is proto3's zero value, hence the default) -----------------------


class H2UpgradePolicy(StrEnum):
    DEFAULT = "DEFAULT"
    DO_NOT_UPGRADE = "DO_NOT_UPGRADE"
    UPGRADE = "UPGRADE"


class SimpleLB(StrEnum):
    UNSPECIFIED = "UNSPECIFIED"
    LEAST_CONN = "LEAST_CONN"  # deprecated alias of LEAST_REQUEST
    RANDOM = "RANDOM"
    PASSTHROUGH = "PASSTHROUGH"
    ROUND_ROBIN = "ROUND_ROBIN"
    LEAST_REQUEST = "LEAST_REQUEST"


class ClientTLSMode(StrEnum):
    DISABLE = "DISABLE"
    SIMPLE = "SIMPLE"
    MUTUAL = "MUTUAL"
    ISTIO_MUTUAL = "ISTIO_MUTUAL"


class ServerTLSMode(StrEnum):
    PASSTHROUGH = "PASSTHROUGH"
    SIMPLE = "SIMPLE"
    MUTUAL = "MUTUAL"
    AUTO_PASSTHROUGH = "AUTO_PASSTHROUGH"
    ISTIO_MUTUAL = "ISTIO_MUTUAL"
    OPTIONAL_MUTUAL = "OPTIONAL_MUTUAL"


class TLSProtocol(StrEnum):
    TLS_AUTO = "TLS_AUTO"
    TLSV1_0 = "TLSV1_0"
    TLSV1_1 = "TLSV1_1"
    TLSV1_2 = "TLSV1_2"
    TLSV1_3 = "TLSV1_3"


class ProxyProtocolVersion(StrEnum):
    V1 = "V1"
    V2 = "V2"


class Location(StrEnum):
    MESH_EXTERNAL = "MESH_EXTERNAL"
    MESH_INTERNAL = "MESH_INTERNAL"


class Resolution(StrEnum):
    NONE = "NONE"
    STATIC = "STATIC"
    DNS = "DNS"
    DNS_ROUND_ROBIN = "DNS_ROUND_ROBIN"
    DYNAMIC_DNS = "DYNAMIC_DNS"


class CaptureMode(StrEnum):
    DEFAULT = "DEFAULT"
    IPTABLES = "IPTABLES"
    NONE = "NONE"


class OutboundTrafficPolicyMode(StrEnum):
    # Proto3's zero value is REGISTRY_ONLY: an ``outboundTrafficPolicy: {}`` means it.
    REGISTRY_ONLY = "REGISTRY_ONLY"
    ALLOW_ANY = "ALLOW_ANY"


class RedirectPortSelection(StrEnum):
    FROM_PROTOCOL_DEFAULT = "FROM_PROTOCOL_DEFAULT"
    FROM_REQUEST_PORT = "FROM_REQUEST_PORT"


class UnmatchedPreflights(StrEnum):
    UNSPECIFIED = "UNSPECIFIED"
    FORWARD = "FORWARD"
    IGNORE = "IGNORE"


# -- vocabularies Istio checks against ---------------------------------------------------------

RETRY_ON_POLICIES = frozenset(
    {
        # x-envoy-retry-on
        "5xx",
        "gateway-error",
        "reset",
        "reset-before-request",
        "connect-failure",
        "envoy-ratelimited",
        "retriable-4xx",
        "refused-stream",
        "retriable-status-codes",
        "retriable-headers",
        "http3-post-connect-failure",
        # x-envoy-retry-grpc-on
        "cancelled",
        "deadline-exceeded",
        "internal",
        "resource-exhausted",
        "unavailable",
    }
)
GRPC_STATUS_NAMES = frozenset(
    {
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    }
)
HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "CONNECT", "OPTIONS", "TRACE"}
)
PROTOCOLS = frozenset(
    {
        "HTTP",
        "HTTPS",
        "HTTP2",
        "HTTP_PROXY",
        "GRPC",
        "GRPC-WEB",
        "TCP",
        "TLS",
        "UDP",
        "MONGO",
        "MYSQL",
        "REDIS",
    }
)
"""Port protocols Istio recognises (``protocol.Parse``; case does not matter)."""
_KNOWN_STATUS_CODES = frozenset(s.value for s in HTTPStatus)


def _header_name(name: str) -> str | None:
    """Istio's ``ValidateHTTPHeaderNameOrJwtClaimRoute``: an error message, or None."""
    if not name:
        return "header name cannot be empty"
    if name.startswith(("@request.auth.claims.", "@request.auth.claims[")):
        return None
    if not all(c.isascii() and (c.isalnum() or c in "-_") for c in name):
        return f"header name {name!r} is not a valid header name"
    return None


def _check_subset_name(name: str) -> str:
    if not name:
        raise ValueError("subset name cannot be empty")
    if not is_dns1123_label(name):
        raise ValueError(f"subset name is invalid: {name!r} (must be a DNS-1123 label)")
    return name


SubsetName = Annotated[str, AfterValidator(_check_subset_name)]


def _check_port_name(name: str) -> str:
    if not is_dns1123_label(name):
        raise ValueError(f"invalid port name: {name!r} (must be a DNS-1123 label)")
    return name


def _check_protocol(value: str) -> str:
    if value and value.upper() not in PROTOCOLS:
        raise ValueError(
            f"invalid protocol {value!r}; supported protocols are {', '.join(sorted(PROTOCOLS))}"
        )
    return value


def _check_destination_host(host: str) -> str:
    if host == "*":
        raise ValueError("invalid destination host *")
    return host


DestinationHost = Annotated[Host, AfterValidator(_check_destination_host)]


# -- shared messages ---------------------------------------------------------------------------


class PortSelector(IstioModel):
    number: Port


class Percent(IstioModel):
    """A fraction in percent (``value: 0.1`` is 0.1%)."""

    value: Float = 0.0

    @model_validator(mode="after")
    def _check(self) -> Percent:
        v = self.value
        if v < 0.0 or v > 100.0 or 0.0 < v < 0.0001:
            raise ValueError(f"percentage {v} is neither 0.0, nor in range [0.0001, 100.0]")
        return self


class WorkloadSelector(IstioModel):
    """Selects workloads by labels (``workloadSelector: {labels: ...}`` in networking)."""

    labels: Labels = {}

    @model_validator(mode="after")
    def _check(self) -> WorkloadSelector:
        issues = Issues()
        for key, value in self.labels.items():
            if "*" in key or "*" in value:
                issues.add(("labels", key), "wildcard not allowed in label match")
        issues.raise_if_any("WorkloadSelector")
        return self


class Destination(IstioModel):
    host: DestinationHost
    subset: str = ""
    port: PortSelector | None = None

    @model_validator(mode="after")
    def _check(self) -> Destination:
        if self.subset:
            _check_subset_name(self.subset)
        return self


class HeaderOperations(IstioModel):
    set: dict[str, str] = {}
    add: dict[str, str] = {}
    remove: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> HeaderOperations:
        issues = Issues()
        for field in ("set", "add"):
            for name in getattr(self, field):
                if not name:
                    issues.add((field,), "header name cannot be empty")
        for i, name in enumerate(self.remove):
            if not name:
                issues.add(("remove", i), "header name cannot be empty")
        issues.raise_if_any("HeaderOperations")
        return self


class Headers(IstioModel):
    request: HeaderOperations | None = None
    response: HeaderOperations | None = None


class StringMatch(IstioModel):
    """Exactly one of ``exact``, ``prefix`` or ``regex`` (RE2 syntax).

    ``regex: "*"`` is not RE2; Istio reads it as "header present", so it is let through.
    """

    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None

    @model_validator(mode="after")
    def _check(self) -> StringMatch:
        issues = Issues()
        issues.at_most_one(self, ("exact", "prefix", "regex"))
        if self.regex is not None and self.regex != "*":
            try:
                check_regex(self.regex)
            except ValueError as e:
                issues.add(("regex",), str(e))
        issues.raise_if_any("StringMatch")
        return self


# -- VirtualService ----------------------------------------------------------------------------


class HTTPMatchRequest(IstioModel):
    name: str = ""
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: dict[str, StringMatch] = {}
    port: UInt32 = 0
    source_labels: Labels = {}
    gateways: tuple[str, ...] = ()
    query_params: dict[str, StringMatch] = {}
    ignore_uri_case: Bool = False
    without_headers: dict[str, StringMatch] = {}
    source_namespace: str = ""
    stat_prefix: str = ""

    @model_validator(mode="after")
    def _check(self) -> HTTPMatchRequest:
        issues = Issues()
        for field, matches in (("headers", self.headers), ("withoutHeaders", self.without_headers)):
            for name in matches:
                problem = _header_name(name)
                if problem:
                    issues.add((field, name), problem)
        if self.port and not 1 <= self.port <= 65535:
            issues.add(("port",), f"port number {self.port} must be in the range 1..65535")
        if self.source_namespace and not is_dns1123_label(self.source_namespace):
            issues.add(
                ("sourceNamespace",), f"sourceNamespace match {self.source_namespace} is invalid"
            )
        issues.raise_if_any("HTTPMatchRequest")
        return self


class HTTPRouteDestination(IstioModel):
    destination: Destination
    weight: NonNegativeInt = 0
    headers: Headers | None = None


class RouteDestination(IstioModel):
    destination: Destination
    weight: NonNegativeInt = 0


def _check_weights(route: tuple[HTTPRouteDestination, ...] | tuple[RouteDestination, ...]) -> None:
    # Istio's validateHTTPRouteDestinations: weights are relative; all-zero is the only error.
    if len(route) > 1 and sum(d.weight for d in route) == 0:
        raise ValueError("total destination weight = 0")


def _check_http_weights(
    route: tuple[HTTPRouteDestination, ...],
) -> tuple[HTTPRouteDestination, ...]:
    _check_weights(route)
    return route


def _check_l4_weights(route: tuple[RouteDestination, ...]) -> tuple[RouteDestination, ...]:
    _check_weights(route)
    return route


class HTTPRedirect(IstioModel):
    uri: str = ""
    authority: str = ""
    port: UInt32 | None = None
    derive_port: RedirectPortSelection | None = None
    scheme: str = ""
    redirect_code: UInt32 = 0

    @model_validator(mode="after")
    def _check(self) -> HTTPRedirect:
        issues = Issues()
        issues.at_most_one(self, ("port", "derive_port"))
        if not (
            self.uri
            or self.authority
            or self.scheme
            or is_set(self.port)
            or is_set(self.derive_port)
        ):
            issues.add((), "redirect must specify URI, authority, scheme, or port")
        if self.redirect_code and not 300 <= self.redirect_code <= 399:
            issues.add(
                ("redirectCode",), f"{self.redirect_code} is not a valid redirect code, must be 3xx"
            )
        if self.scheme and self.scheme not in ("http", "https"):
            issues.add(("scheme",), 'invalid redirect scheme, must be "http" or "https"')
        if self.port is not None and self.port > 65535:
            issues.add(("port",), f"redirect port {self.port} invalid")
        issues.raise_if_any("HTTPRedirect")
        return self


class HTTPBody(IstioModel):
    string: str | None = None
    bytes: str | None = None  # base64, as protobuf's JSON writes bytes

    @model_validator(mode="after")
    def _check(self) -> HTTPBody:
        issues = Issues()
        issues.at_most_one(self, ("string", "bytes"))
        if self.bytes is not None:
            try:
                base64.b64decode(self.bytes, validate=True)
            except binascii.Error:
                issues.add(("bytes",), "bytes must be base64-encoded")
        issues.raise_if_any("HTTPBody")
        return self


class HTTPDirectResponse(IstioModel):
    status: UInt32
    body: HTTPBody | None = None

    @model_validator(mode="after")
    def _check(self) -> HTTPDirectResponse:
        if not 200 <= self.status <= 599:
            raise ValueError(f"status code {self.status} must be in range 200-599")
        return self


class Delegate(IstioModel):
    name: str = ""
    namespace: str = ""


class RegexRewrite(IstioModel):
    match: Regex = ""
    rewrite: str = ""

    @model_validator(mode="after")
    def _check(self) -> RegexRewrite:
        if not self.match:
            raise ValueError("uriRegexRewrite.match cannot be empty")
        return self


class HTTPRewrite(IstioModel):
    uri: str = ""
    authority: str = ""
    uri_regex_rewrite: RegexRewrite | None = None

    @model_validator(mode="after")
    def _check(self) -> HTTPRewrite:
        if self.uri and self.uri_regex_rewrite is not None:
            raise ValueError("rewrite may only contain one of uri or uriRegexRewrite")
        if not (self.uri or self.authority or self.uri_regex_rewrite):
            raise ValueError("rewrite must specify uri, uriRegexRewrite, or authority")
        return self


class HTTPRetry(IstioModel):
    attempts: Int = 0
    per_try_timeout: MinDuration | None = None
    retry_on: str = ""
    retry_remote_localities: Bool | None = None
    retry_ignore_previous_hosts: Bool | None = None
    backoff: MinDuration | None = None

    @model_validator(mode="after")
    def _check(self) -> HTTPRetry:
        issues = Issues()
        if self.attempts < 0:
            issues.add(("attempts",), "attempts cannot be negative")
        if self.retry_on:
            for policy in self.retry_on.split(","):
                code = int(policy) if is_decimal(policy) else 0
                if policy not in RETRY_ON_POLICIES and code not in _KNOWN_STATUS_CODES:
                    issues.add(
                        ("retryOn",),
                        f"{policy!r} is not a valid retryOn policy; use HTTP status codes or "
                        f"{', '.join(sorted(RETRY_ON_POLICIES))}",
                    )
        issues.raise_if_any("HTTPRetry")
        return self


class Delay(IstioModel):
    fixed_delay: MinDuration | None = None
    exponential_delay: MinDuration | None = None
    percentage: Percent | None = None
    percent: PercentInt = 0  # deprecated: use percentage

    @model_validator(mode="after")
    def _check(self) -> Delay:
        issues = Issues()
        issues.at_most_one(self, ("fixed_delay", "exponential_delay"))
        if self.exponential_delay is not None:
            issues.add(("exponentialDelay",), "exponentialDelay not supported yet")
        issues.raise_if_any("Delay")
        return self


class Abort(IstioModel):
    http_status: Int | None = None
    grpc_status: str | None = None
    http2_error: str | None = None
    percentage: Percent | None = None

    @model_validator(mode="after")
    def _check(self) -> Abort:
        issues = Issues()
        issues.at_most_one(self, ("http_status", "grpc_status", "http2_error"))
        if self.http_status is not None and not 200 <= self.http_status <= 599:
            issues.add(("httpStatus",), f"HTTP status {self.http_status} is not in range 200-599")
        if self.grpc_status is not None and self.grpc_status not in GRPC_STATUS_NAMES:
            issues.add(
                ("grpcStatus",),
                f"{self.grpc_status!r} is not a gRPC status; "
                f"use one of {', '.join(sorted(GRPC_STATUS_NAMES))}",
            )
        issues.raise_if_any("Abort")
        return self


class HTTPFaultInjection(IstioModel):
    delay: Delay | None = None
    abort: Abort | None = None

    @model_validator(mode="after")
    def _check(self) -> HTTPFaultInjection:
        if self.delay is None and self.abort is None:
            raise ValueError("HTTP fault injection must have an abort and/or a delay")
        return self


class HTTPMirrorPolicy(IstioModel):
    destination: Destination
    percentage: Percent | None = None


class CorsPolicy(IstioModel):
    allow_origin: tuple[str, ...] = ()  # deprecated: use allowOrigins
    allow_origins: tuple[StringMatch, ...] = ()
    allow_methods: tuple[str, ...] = ()
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    max_age: MinDuration | None = None
    allow_credentials: Bool | None = None
    unmatched_preflights: UnmatchedPreflights = UnmatchedPreflights.UNSPECIFIED

    @model_validator(mode="after")
    def _check(self) -> CorsPolicy:
        issues = Issues()
        for i, method in enumerate(self.allow_methods):
            if method not in HTTP_METHODS and method != "*":
                issues.add(("allowMethods", i), f"{method!r} is not a supported HTTP method")
        for field, values in (
            ("allowHeaders", self.allow_headers),
            ("exposeHeaders", self.expose_headers),
        ):
            for i, name in enumerate(values):
                if not name:
                    issues.add((field, i), "header name cannot be empty")
        if self.max_age is not None and self.max_age.nanos % 1_000_000_000:
            issues.add(("maxAge",), "max_age duration is accurate only to seconds precision")
        issues.raise_if_any("CorsPolicy")
        return self


class HTTPRoute(IstioModel):
    name: str = ""
    match: tuple[HTTPMatchRequest, ...] = ()
    route: Annotated[tuple[HTTPRouteDestination, ...], AfterValidator(_check_http_weights)] = ()
    redirect: HTTPRedirect | None = None
    direct_response: HTTPDirectResponse | None = None
    delegate: Delegate | None = None
    rewrite: HTTPRewrite | None = None
    timeout: MinDuration | None = None
    retries: HTTPRetry | None = None
    fault: HTTPFaultInjection | None = None
    mirror: Destination | None = None
    mirrors: tuple[HTTPMirrorPolicy, ...] = ()
    mirror_percent: UInt32 | None = None  # deprecated: use mirrorPercentage
    mirror_percent_snake: Annotated[UInt32 | None, Field(alias="mirror_percent")] = (
        None  # older spelling
    )
    mirror_percentage: Percent | None = None
    cors_policy: CorsPolicy | None = None
    headers: Headers | None = None

    @model_validator(mode="after")
    def _check(self) -> HTTPRoute:
        # Istio's validateHTTPRouteConflict (a root route is one that delegates).
        issues = Issues()
        if self.delegate is not None:
            if self.redirect is not None:
                issues.add(("redirect",), f"root HTTP route {self.name} must not specify redirect")
            if self.route:
                issues.add(("route",), f"root HTTP route {self.name} must not specify route")
        elif self.redirect is not None:
            for field, value in (
                ("route", self.route),
                ("fault", self.fault),
                ("rewrite", self.rewrite),
                ("directResponse", self.direct_response),
            ):
                if is_set(value):
                    issues.add((field,), f"HTTP route cannot contain both {field} and redirect")
        elif self.direct_response is not None:
            for field, value in (
                ("route", self.route),
                ("fault", self.fault),
                ("rewrite", self.rewrite),
            ):
                if is_set(value):
                    issues.add(
                        (field,), f"HTTP route cannot contain both {field} and directResponse"
                    )
        elif not self.route:
            issues.add((), "HTTP route, redirect, directResponse or delegate is required")
        if self.mirror is not None and self.mirrors:
            issues.add(("mirrors",), "HTTP route cannot contain both mirror and mirrors")
        for alias, percent in (
            ("mirrorPercent", self.mirror_percent),
            ("mirror_percent", self.mirror_percent_snake),
        ):
            if percent is not None and percent > 100:
                issues.add(
                    (alias,), f"mirror_percent must have a max value of 100 (it has {percent})"
                )
        self._check_authority_rewrite(issues)
        issues.raise_if_any("HTTPRoute")
        return self

    def _check_authority_rewrite(self, issues: Issues) -> None:
        # Istio's validateAuthorityRewrite: the authority may be rewritten in one place only.
        current = self.rewrite.authority if self.rewrite else ""
        request = self.headers.request if self.headers else None
        if request is None:
            return
        for field, values in (("set", request.set), ("add", request.add)):
            for name, value in values.items():
                if name.lower() not in (":authority", "host"):
                    continue
                if current:
                    issues.add(
                        ("headers", "request", field, name),
                        f"authority header cannot be set multiple times: have {current!r}, "
                        f"attempting to set {value!r}",
                    )
                current = value

    @property
    def is_catch_all(self) -> bool:
        """No match at all: the rule applies to every request (Istio's catch-all route)."""
        return not self.match


class L4MatchAttributes(IstioModel):
    destination_subnets: tuple[str, ...] = ()
    port: UInt32 = 0
    source_labels: Labels = {}
    gateways: tuple[str, ...] = ()
    source_namespace: str = ""
    source_subnet: str = ""  # deprecated


class TLSMatchAttributes(IstioModel):
    sni_hosts: tuple[str, ...]
    destination_subnets: tuple[str, ...] = ()
    port: UInt32 = 0
    source_labels: Labels = {}
    gateways: tuple[str, ...] = ()
    source_namespace: str = ""

    @model_validator(mode="after")
    def _check(self) -> TLSMatchAttributes:
        if not self.sni_hosts:
            raise ValueError("TLS match must have at least one SNI host")
        return self


class TCPRoute(IstioModel):
    match: tuple[L4MatchAttributes, ...] = ()
    route: Annotated[tuple[RouteDestination, ...], AfterValidator(_check_l4_weights)] = ()


class TLSRoute(IstioModel):
    match: tuple[TLSMatchAttributes, ...]
    route: Annotated[tuple[RouteDestination, ...], AfterValidator(_check_l4_weights)] = ()

    @model_validator(mode="after")
    def _check(self) -> TLSRoute:
        if not self.match:
            raise ValueError("TLS route must have at least one match condition")
        return self


class VirtualServiceSpec(IstioModel):
    hosts: tuple[str, ...] = ()
    gateways: tuple[str, ...] = ()
    http: tuple[HTTPRoute, ...] = ()
    tls: tuple[TLSRoute, ...] = ()
    tcp: tuple[TCPRoute, ...] = ()
    export_to: ExportTo = ()

    @model_validator(mode="after")
    def _check(self) -> VirtualServiceSpec:
        issues = Issues()
        delegate = not self.hosts  # a VirtualService without hosts is a delegate
        applies_to_mesh = not self.gateways or "mesh" in self.gateways
        for i, host in enumerate(self.hosts):
            problem = _wildcard_host_problem(host)
            if problem:
                issues.add(("hosts", i), problem)
            elif host == "*" and applies_to_mesh:
                issues.add(
                    ("hosts", i),
                    "wildcard host * is not allowed for virtual services bound to the mesh gateway",
                )
        if delegate and self.gateways:
            issues.add(("gateways",), "delegate virtual service must have no gateways specified")
        if delegate and (self.tls or self.tcp):
            issues.add(
                (),
                "delegate virtual service must have no tls or tcp routes (delegation is HTTP only)",
            )
        if delegate:
            for i, route in enumerate(self.http):
                if route.delegate is not None:
                    issues.add(
                        ("http", i, "delegate"), "delegate HTTP route cannot contain delegate"
                    )
        if not (self.http or self.tls or self.tcp):
            issues.add((), "http, tcp or tls must be provided in virtual service")
        issues.raise_if_any("VirtualServiceSpec")
        return self

    @property
    def is_delegate(self) -> bool:
        return not self.hosts


def _wildcard_host_problem(host: str) -> str | None:
    """Istio's ``ValidateWildcardDomain`` (a wildcard only in the first label), or None.

    IP addresses are accepted too, as Istio accepts them for VirtualService hosts.
    """
    if not host:
        return "empty domain name not allowed"
    if len(host) > 255:
        return f"domain name {host!r} too long (max 255)"
    if _is_ip(host):
        return None
    first, _, rest = host.partition(".")
    if len(first) > 63 or not _WILDCARD_LABEL.match(first):
        return f"domain name {host!r} invalid (label {first!r} invalid)"
    if rest:
        return _dns_labels_problem(host, rest)
    return None


def _dns_labels_problem(host: str, rest: str) -> str | None:
    labels = rest.split(".")
    if labels[-1] == "":
        labels = labels[:-1]  # a trailing dot is allowed (an absolute name)
    if labels and is_decimal(labels[-1]):
        return (
            f"domain name {host!r} invalid (top level domain {labels[-1]!r} cannot be all-numeric)"
        )
    for label in labels:
        if not is_dns1123_label(label):
            return f"domain name {host!r} invalid (label {label!r} invalid)"
    return None


def _fqdn_problem(host: str) -> str | None:
    """Istio's ``ValidateFQDN``: DNS labels, no wildcard."""
    if not host:
        return "empty domain name not allowed"
    return _dns_labels_problem(host, host)


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _is_ip_or_cidr(value: str) -> bool:
    try:
        if "/" in value:
            ipaddress.ip_network(value, strict=False)
        else:
            ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


_WILDCARD_LABEL = re.compile(r"^(\*|(\*|\*-)?[a-z0-9]([-a-z0-9]*[a-z0-9])?)$")


class VirtualService(Resource):
    spec: VirtualServiceSpec


# -- DestinationRule ---------------------------------------------------------------------------


class TcpKeepalive(IstioModel):
    probes: UInt32 = 0
    time: MinDuration | None = None
    interval: MinDuration | None = None


class TCPSettings(IstioModel):
    max_connections: NonNegativeInt = 0
    connect_timeout: MinDuration | None = None
    tcp_keepalive: TcpKeepalive | None = None
    max_connection_duration: MinDuration | None = None
    idle_timeout: AnyDuration | None = None


class HTTPSettings(IstioModel):
    http1_max_pending_requests: NonNegativeInt = 0
    http2_max_requests: NonNegativeInt = 0
    max_requests_per_connection: NonNegativeInt = 0
    max_retries: NonNegativeInt = 0
    idle_timeout: MinDuration | None = None
    h2_upgrade_policy: H2UpgradePolicy = H2UpgradePolicy.DEFAULT
    use_client_protocol: Bool = False
    max_concurrent_streams: NonNegativeInt = 0


class ConnectionPoolSettings(IstioModel):
    tcp: TCPSettings | None = None
    http: HTTPSettings | None = None


class HTTPCookieAttribute(IstioModel):
    name: str
    value: str = ""


class HTTPCookie(IstioModel):
    name: str
    path: str = ""
    ttl: AnyDuration | None = None
    attributes: tuple[HTTPCookieAttribute, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> HTTPCookie:
        if not self.name:
            raise ValueError("consistentHash.httpCookie.name cannot be empty")
        return self


class RingHash(IstioModel):
    minimum_ring_size: NonNegativeInt = 0


class MagLev(IstioModel):
    table_size: NonNegativeInt = 0


class ConsistentHashLB(IstioModel):
    http_header_name: str | None = None
    http_cookie: HTTPCookie | None = None
    use_source_ip: Bool | None = None
    http_query_parameter_name: str | None = None
    ring_hash: RingHash | None = None
    maglev: MagLev | None = None
    minimum_ring_size: NonNegativeInt = 0  # deprecated: use ringHash

    @model_validator(mode="after")
    def _check(self) -> ConsistentHashLB:
        issues = Issues()
        issues.at_most_one(
            self, ("http_header_name", "http_cookie", "use_source_ip", "http_query_parameter_name")
        )
        issues.at_most_one(self, ("ring_hash", "maglev"))
        issues.raise_if_any("ConsistentHashLB")
        return self


class LocalityDistribute(IstioModel):
    from_: Annotated[str, Field(alias="from")] = ""
    to: dict[str, UInt32] = {}


class LocalityFailover(IstioModel):
    from_: Annotated[str, Field(alias="from")] = ""
    to: str = ""


class LocalityLoadBalancerSetting(IstioModel):
    distribute: tuple[LocalityDistribute, ...] = ()
    failover: tuple[LocalityFailover, ...] = ()
    failover_priority: tuple[str, ...] = ()
    enabled: Bool | None = None

    @model_validator(mode="after")
    def _check(self) -> LocalityLoadBalancerSetting:
        issues = Issues()
        if self.distribute and self.failover:
            issues.add((), "can not simultaneously set 'distribute' and 'failover'")
        for i, rule in enumerate(self.distribute):
            total = sum(rule.to.values())
            if total != 100:
                issues.add(("distribute", i, "to"), f"total locality weight {total} != 100")
        for i, failover in enumerate(self.failover):
            if failover.from_ == failover.to:
                issues.add(
                    ("failover", i), "locality lb failover settings must specify different regions"
                )
        issues.raise_if_any("LocalityLoadBalancerSetting")
        return self


class WarmupConfiguration(IstioModel):
    duration: MinDuration
    minimum_percent: PercentFloat | None = None
    aggression: Float | None = None

    @model_validator(mode="after")
    def _check(self) -> WarmupConfiguration:
        if self.aggression is not None and self.aggression < 0:
            raise ValueError(f"aggression {self.aggression} must not be negative")
        return self


class LoadBalancerSettings(IstioModel):
    simple: SimpleLB | None = None
    consistent_hash: ConsistentHashLB | None = None
    locality_lb_setting: LocalityLoadBalancerSetting | None = None
    warmup_duration_secs: MinDuration | None = None  # deprecated: use warmup
    warmup: WarmupConfiguration | None = None

    @model_validator(mode="after")
    def _check(self) -> LoadBalancerSettings:
        issues = Issues()
        issues.at_most_one(self, ("simple", "consistent_hash"))
        issues.at_most_one(self, ("warmup_duration_secs", "warmup"))
        issues.raise_if_any("LoadBalancerSettings")
        return self


class OutlierDetection(IstioModel):
    consecutive_errors: Int = 0  # deprecated: use consecutive5xxErrors
    split_external_local_origin_errors: Bool = False
    consecutive_local_origin_failures: UInt32 | None = None
    consecutive_gateway_errors: UInt32 | None = None
    consecutive_5xx_errors: Annotated[UInt32 | None, Field(alias="consecutive5xxErrors")] = None
    interval: MinDuration | None = None
    base_ejection_time: MinDuration | None = None
    max_ejection_percent: PercentInt = 0
    min_health_percent: PercentInt = 0


class ClientTLSSettings(IstioModel):
    mode: ClientTLSMode = ClientTLSMode.DISABLE
    client_certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""
    credential_name: str = ""
    subject_alt_names: tuple[str, ...] = ()
    sni: str = ""
    insecure_skip_verify: Bool | None = None
    ca_crl: str = ""

    @model_validator(mode="after")
    def _check(self) -> ClientTLSSettings:
        issues = Issues()
        if self.mode is ClientTLSMode.MUTUAL and not self.credential_name:
            if not self.client_certificate:
                issues.add(("clientCertificate",), "client certificate required for mutual tls")
            if not self.private_key:
                issues.add(("privateKey",), "private key required for mutual tls")
        if self.credential_name and (
            self.client_certificate or self.private_key or self.ca_certificates
        ):
            issues.add(
                ("credentialName",),
                "cannot specify client certificates or CA certificate if credentialName is set",
            )
        issues.raise_if_any("ClientTLSSettings")
        return self


class TunnelSettings(IstioModel):
    protocol: str = ""
    target_host: str
    target_port: Port

    @model_validator(mode="after")
    def _check(self) -> TunnelSettings:
        issues = Issues()
        if self.protocol and self.protocol.upper() not in ("CONNECT", "POST"):
            issues.add(
                ("protocol",), f"tunnel protocol must be CONNECT or POST, got {self.protocol!r}"
            )
        if not self.target_host:
            issues.add(("targetHost",), "tunnel target host must be set")
        issues.raise_if_any("TunnelSettings")
        return self


class ProxyProtocol(IstioModel):
    version: ProxyProtocolVersion = ProxyProtocolVersion.V1


class RetryBudget(IstioModel):
    percent: PercentFloat | None = None
    min_retry_concurrency: UInt32 = 0


class PortTrafficPolicy(IstioModel):
    port: PortSelector
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None


class TrafficPolicy(IstioModel):
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None
    port_level_settings: Annotated[tuple[PortTrafficPolicy, ...], Field(max_length=4096)] = ()
    tunnel: TunnelSettings | None = None
    proxy_protocol: ProxyProtocol | None = None
    retry_budget: RetryBudget | None = None

    @model_validator(mode="after")
    def _check(self) -> TrafficPolicy:
        issues = Issues()
        seen: set[int] = set()
        for i, setting in enumerate(self.port_level_settings):
            if setting.port.number in seen:
                issues.add(
                    ("portLevelSettings", i, "port"), f"duplicate port {setting.port.number}"
                )
            seen.add(setting.port.number)
        issues.raise_if_any("TrafficPolicy")
        return self


class Subset(IstioModel):
    name: SubsetName
    labels: Labels = {}
    traffic_policy: TrafficPolicy | None = None


class DestinationRuleSpec(IstioModel):
    host: Host
    traffic_policy: TrafficPolicy | None = None
    subsets: tuple[Subset, ...] = ()
    export_to: ExportTo = ()
    workload_selector: PolicySelector | None = None

    @model_validator(mode="after")
    def _check(self) -> DestinationRuleSpec:
        issues = Issues()
        problem = _wildcard_host_problem(self.host)
        if problem:
            issues.add(("host",), problem)
        seen: set[str] = set()
        for i, subset in enumerate(self.subsets):
            if subset.name in seen:
                issues.add(("subsets", i, "name"), f"duplicate subset name {subset.name!r}")
            seen.add(subset.name)
        issues.raise_if_any("DestinationRuleSpec")
        return self


class DestinationRule(Resource):
    spec: DestinationRuleSpec


# -- Gateway -----------------------------------------------------------------------------------


class GatewayPort(IstioModel):
    """``networking.istio.io`` ``Port``: a server's port, with its protocol and name."""

    number: Port
    protocol: Annotated[str, AfterValidator(_check_protocol)]
    name: Annotated[str, AfterValidator(_check_port_name)]
    target_port: UInt32 = 0


class TLSCertificate(IstioModel):
    server_certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""


class ServerTLSSettings(IstioModel):
    https_redirect: Bool = False
    mode: ServerTLSMode = ServerTLSMode.PASSTHROUGH
    server_certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""
    ca_crl: str = ""
    credential_name: str = ""
    credential_names: tuple[str, ...] = ()
    ca_cert_credential_name: str = ""
    tls_certificates: tuple[TLSCertificate, ...] = ()
    subject_alt_names: tuple[str, ...] = ()
    verify_certificate_spki: tuple[str, ...] = ()
    verify_certificate_hash: tuple[str, ...] = ()
    min_protocol_version: TLSProtocol = TLSProtocol.TLS_AUTO
    max_protocol_version: TLSProtocol = TLSProtocol.TLS_AUTO
    cipher_suites: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> ServerTLSSettings:
        # Istio's validateTLSOptions
        issues = Issues()
        if self.mode is ServerTLSMode.ISTIO_MUTUAL:
            for field, value in (
                ("serverCertificate", self.server_certificate),
                ("privateKey", self.private_key),
                ("caCertificates", self.ca_certificates),
            ):
                if value:
                    issues.add((field,), f"ISTIO_MUTUAL TLS cannot have {field} set")
        elif self.mode in (ServerTLSMode.SIMPLE, ServerTLSMode.MUTUAL) and not (
            self.credential_name or self.credential_names or self.tls_certificates
        ):
            mode = self.mode.value
            if not self.server_certificate:
                issues.add(
                    (),
                    f"{mode} TLS requires a server certificate "
                    "(serverCertificate or credentialName)",
                )
            if not self.private_key:
                issues.add((), f"{mode} TLS requires a private key (privateKey or credentialName)")
            if self.mode is ServerTLSMode.MUTUAL and not self.ca_certificates:
                issues.add((), "MUTUAL TLS requires a client CA bundle (caCertificates)")
        issues.at_most_one(self, ("credential_name", "credential_names", "tls_certificates"))
        issues.raise_if_any("ServerTLSSettings")
        return self


class Server(IstioModel):
    port: GatewayPort
    bind: str = ""
    hosts: tuple[str, ...]
    tls: ServerTLSSettings | None = None
    default_endpoint: str = ""
    name: str = ""

    @model_validator(mode="after")
    def _check(self) -> Server:
        issues = Issues()
        if not self.hosts:
            issues.add(("hosts",), "server config must contain at least one host")
        for i, host in enumerate(self.hosts):
            problem = _namespaced_host_problem(host, gateway=True)
            if problem:
                issues.add(("hosts", i), problem)
        protocol = self.port.protocol.upper()
        is_tls = protocol in ("HTTPS", "TLS")
        if is_tls and self.tls is None:
            issues.add(("tls",), "server must have TLS settings for HTTPS/TLS protocols")
        elif not is_tls and self.tls is not None:
            http = protocol in ("HTTP", "HTTP2", "GRPC", "GRPC-WEB", "HTTP_PROXY")
            tls = self.tls
            redirect_only = tls.mode is ServerTLSMode.PASSTHROUGH and not (
                tls.ca_certificates or tls.private_key or tls.server_certificate
            )
            if not http:
                issues.add(("tls",), "server cannot have TLS settings for non HTTPS/TLS ports")
            elif not redirect_only:
                issues.add(("tls",), "server cannot have TLS settings for plain text HTTP ports")
        issues.raise_if_any("Server")
        return self


def _namespaced_host_problem(host: str, *, gateway: bool) -> str | None:
    """``[namespace/]host`` as in Gateway servers (namespace optional) and Sidecar egress
    (namespace required): namespace is ``*``, ``.``, ``~`` or a name; host a wildcard domain."""
    namespace, slash, name = host.rpartition("/")
    if not slash:
        if not gateway:
            return f"{host!r}: egress host must be of form 'namespace/dnsName'"
        name = host
    elif namespace not in ("*", ".", "~") and not is_dns1123_label(namespace):
        return f"{host!r}: namespace {namespace!r} must be '*', '.', '~' or a namespace name"
    if name == "*":
        return None
    return _wildcard_host_problem(name)


class GatewaySpec(IstioModel):
    servers: tuple[Server, ...] = ()
    selector: dict[str, str] = {}

    @model_validator(mode="after")
    def _check(self) -> GatewaySpec:
        issues = Issues()
        if not self.servers:
            issues.add(("servers",), "gateway must have at least one server")
        names: set[str] = set()
        for i, server in enumerate(self.servers):
            if server.port.name in names:
                issues.add(
                    ("servers", i, "port", "name"),
                    f"port names in servers must be unique: duplicate name {server.port.name}",
                )
            names.add(server.port.name)
        issues.raise_if_any("GatewaySpec")
        return self


class Gateway(Resource):
    spec: GatewaySpec


# -- ServiceEntry and WorkloadEntry ------------------------------------------------------------


class ServicePort(IstioModel):
    number: Port
    protocol: Annotated[str, AfterValidator(_check_protocol)] = ""
    name: Annotated[str, AfterValidator(_check_port_name)]
    target_port: UInt32 = 0

    @model_validator(mode="after")
    def _check(self) -> ServicePort:
        if self.target_port > 65535:
            issues = Issues()
            issues.add(
                ("targetPort",), f"port number {self.target_port} must be in the range 1..65535"
            )
            issues.raise_if_any("ServicePort")
        return self


_ENDPOINT_PORT_NAME = re.compile(r"^[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?$")


def _check_endpoint_ports(ports: dict[str, int]) -> dict[str, int]:
    for name, number in ports.items():
        if len(name) >= 63 or not _ENDPOINT_PORT_NAME.match(name):
            raise ValueError(f"port name {name!r} must be valid (letters, digits and '-')")
        if not 1 <= number <= 65535:
            raise ValueError(f"port {name}: {number} must be in the range 1..65535")
    return ports


class WorkloadEntrySpec(IstioModel):
    """A workload (a VM, or a ServiceEntry endpoint): address, ports by name, labels, ..."""

    address: Annotated[str, Field(max_length=256)] = ""
    ports: Annotated[dict[str, UInt32], AfterValidator(_check_endpoint_ports)] = {}
    labels: Labels = {}
    network: Annotated[str, Field(max_length=2048)] = ""
    locality: Annotated[str, Field(max_length=2048)] = ""
    weight: UInt32 = 0
    service_account: Annotated[str, Field(max_length=253)] = ""

    @model_validator(mode="after")
    def _check(self) -> WorkloadEntrySpec:
        issues = Issues()
        if self.address.startswith("unix://"):
            path = self.address[len("unix://") :]
            if not path.startswith(("/", "@")):
                issues.add(("address",), "UDS must be an absolute path or abstract socket")
            elif path.endswith("/"):
                issues.add(("address",), "UDS may not be a dir")
            if self.ports:
                issues.add(("ports",), "UDS may not include ports")
        issues.raise_if_any("WorkloadEntry")
        return self


Address = Annotated[str, Field(max_length=64)]


class ServiceEntrySpec(IstioModel):
    hosts: Annotated[tuple[str, ...], Field(max_length=256)]
    addresses: Annotated[
        tuple[Annotated[str, Field(max_length=64)], ...], Field(max_length=256)
    ] = ()
    ports: Annotated[tuple[ServicePort, ...], Field(max_length=256)] = ()
    location: Location = Location.MESH_EXTERNAL
    resolution: Resolution = Resolution.NONE
    endpoints: Annotated[tuple[WorkloadEntrySpec, ...], Field(max_length=4096)] = ()
    workload_selector: WorkloadSelector | None = None
    export_to: ExportTo = ()
    subject_alt_names: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> ServiceEntrySpec:
        issues = Issues()
        if not self.hosts:
            issues.add(("hosts",), "service entry must have at least one host")
        for i, host in enumerate(self.hosts):
            if host == "*":
                issues.add(("hosts", i), "invalid host *")
                continue
            problem = _wildcard_host_problem(host)
            if problem:
                issues.add(("hosts", i), problem)
        if self.workload_selector is not None and self.endpoints:
            issues.add(
                ("workloadSelector",),
                "only one of workloadSelector or endpoints is allowed in service entry",
            )
        names: set[str] = set()
        numbers: set[int] = set()
        for i, port in enumerate(self.ports):
            if port.name in names:
                issues.add(
                    ("ports", i, "name"), f"service entry port name {port.name!r} already defined"
                )
            if port.number in numbers:
                issues.add(
                    ("ports", i, "number"), f"service entry port {port.number} already defined"
                )
            names.add(port.name)
            numbers.add(port.number)
        for i, address in enumerate(self.addresses):
            if not _is_ip_or_cidr(address):
                issues.add(("addresses", i), f"{address!r} is not a valid IP address or CIDR block")
        for i, endpoint in enumerate(self.endpoints):
            for name in endpoint.ports:
                if name not in names:
                    issues.add(
                        ("endpoints", i, "ports", name),
                        f"endpoint port {name!r} is not defined by the service entry",
                    )
            if (
                self.resolution is Resolution.STATIC
                and not _is_ip(endpoint.address)
                and not endpoint.address.startswith("unix://")
            ):
                issues.add(
                    ("endpoints", i, "address"),
                    f"endpoint address {endpoint.address!r} is not a valid IP address "
                    "(resolution STATIC)",
                )
        if self.resolution is Resolution.NONE and self.endpoints:
            issues.add(("endpoints",), "no endpoints should be provided for resolution type NONE")
        if self.resolution is Resolution.DNS_ROUND_ROBIN and len(self.endpoints) > 1:
            issues.add(("endpoints",), "DNS_ROUND_ROBIN mode cannot have multiple endpoints")
        if self.resolution not in (Resolution.NONE, Resolution.STATIC):
            for i, address in enumerate(self.addresses):
                if "/" in address:
                    issues.add(
                        ("addresses", i),
                        "CIDR addresses are allowed only for NONE/STATIC resolution types",
                    )
        if self.resolution in (Resolution.DNS, Resolution.DNS_ROUND_ROBIN) and not self.endpoints:
            for i, host in enumerate(self.hosts):
                if host != "*" and _fqdn_problem(host):
                    issues.add(
                        ("hosts", i),
                        f"hosts must be FQDN if no endpoints are provided for resolution mode "
                        f"{self.resolution.value}",
                    )
        issues.raise_if_any("ServiceEntrySpec")
        return self


class ServiceEntry(Resource):
    spec: ServiceEntrySpec


class WorkloadEntry(Resource):
    spec: WorkloadEntrySpec

    @model_validator(mode="after")
    def _check_address(self) -> WorkloadEntry:
        # Required of a WorkloadEntry, not of a ServiceEntry endpoint (which may name only a
        # network, reached through its gateway).
        if not self.spec.address:
            issues = Issues()
            issues.add(("spec", "address"), "address is required")
            issues.raise_if_any("WorkloadEntry")
        return self


# -- Sidecar -----------------------------------------------------------------------------------


class SidecarPort(IstioModel):
    number: UInt32 = 0
    protocol: Annotated[str, AfterValidator(_check_protocol)] = ""
    name: str = ""
    target_port: UInt32 = 0


class IstioIngressListener(IstioModel):
    port: SidecarPort
    bind: str = ""
    capture_mode: CaptureMode = CaptureMode.DEFAULT
    default_endpoint: str = ""
    tls: ServerTLSSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None

    @model_validator(mode="after")
    def _check(self) -> IstioIngressListener:
        issues = Issues()
        if not 1 <= self.port.number <= 65535:
            issues.add(
                ("port", "number"), f"port number {self.port.number} must be in the range 1..65535"
            )
        endpoint = self.default_endpoint
        if endpoint and not endpoint.startswith("unix://"):
            host, colon, port = endpoint.rpartition(":")
            if (
                not colon
                or host not in ("127.0.0.1", "0.0.0.0", "[::1]", "[::]")
                or not is_decimal(port)
            ):
                issues.add(
                    ("defaultEndpoint",),
                    "defaultEndpoint must be 127.0.0.1:PORT, 0.0.0.0:PORT, [::1]:PORT, [::]:PORT "
                    "or unix:///path",
                )
        issues.raise_if_any("IstioIngressListener")
        return self


class IstioEgressListener(IstioModel):
    port: SidecarPort | None = None
    bind: str = ""
    capture_mode: CaptureMode = CaptureMode.DEFAULT
    hosts: tuple[str, ...]

    @model_validator(mode="after")
    def _check(self) -> IstioEgressListener:
        issues = Issues()
        if not self.hosts:
            issues.add(("hosts",), "sidecar: egress listener must contain at least one host")
        for i, host in enumerate(self.hosts):
            problem = _namespaced_host_problem(host, gateway=False)
            if problem:
                issues.add(("hosts", i), problem)
        if self.port is not None and not 1 <= self.port.number <= 65535:
            issues.add(
                ("port", "number"), f"port number {self.port.number} must be in the range 1..65535"
            )
        issues.raise_if_any("IstioEgressListener")
        return self


class OutboundTrafficPolicy(IstioModel):
    mode: OutboundTrafficPolicyMode = OutboundTrafficPolicyMode.REGISTRY_ONLY
    egress_proxy: Destination | None = None

    @model_validator(mode="after")
    def _check(self) -> OutboundTrafficPolicy:
        if self.egress_proxy is not None and self.mode is not OutboundTrafficPolicyMode.ALLOW_ANY:
            raise ValueError(
                "egress_proxy must be set only with ALLOW_ANY outbound_traffic_policy mode"
            )
        return self


class SidecarSpec(IstioModel):
    workload_selector: WorkloadSelector | None = None
    ingress: tuple[IstioIngressListener, ...] = ()
    egress: tuple[IstioEgressListener, ...] = ()
    inbound_connection_pool: ConnectionPoolSettings | None = None
    outbound_traffic_policy: OutboundTrafficPolicy | None = None

    @model_validator(mode="after")
    def _check(self) -> SidecarSpec:
        issues = Issues()
        if not (
            self.ingress
            or self.egress
            or self.inbound_connection_pool
            or self.outbound_traffic_policy
        ):
            issues.add((), "sidecar: empty configuration provided")
        catch_alls = [i for i, e in enumerate(self.egress) if e.port is None]
        if len(catch_alls) > 1:
            issues.add(
                ("egress", catch_alls[1]), "sidecar: only one egress listener may omit the port"
            )
        ports: set[int] = set()
        for i, listener in enumerate(self.ingress):
            if listener.port.number in ports:
                issues.add(
                    ("ingress", i, "port", "number"),
                    f"sidecar: ports on IP bound listeners must be unique ({listener.port.number})",
                )
            ports.add(listener.port.number)
        issues.raise_if_any("SidecarSpec")
        return self


class Sidecar(Resource):
    spec: SidecarSpec
