"""The RBAC filter (``envoy.filters.http.rbac``): allow or deny a request by policy.

``compile_rbac`` turns an ``envoy.extensions.filters.http.rbac.v3.RBAC`` into a frozen
``RbacFilter``; ``enforce`` runs an HCM's RBAC filters, in order, over one request's
``RequestAttributes`` and returns the response details of a denial, or None. Everything is
decided here, without I/O; the connection manager only builds the attributes and answers
403 ``RBAC: access denied``.

Rules kept (envoyproxy.io "Role Based Access Control (RBAC) Filter"; ``rbac.proto``;
``filters/common/rbac/engine_impl.cc``, ``matchers.cc``):

* A policy matches when one of its ``permissions`` and one of its ``principals`` match.
  Policies are tried in name order (Envoy keeps them in a sorted map); the first match is the
  *effective policy*.
* ``action: ALLOW`` allows a request only if a policy matches; ``DENY`` denies it only if one
  matches; ``LOG`` allows everything (a match only marks the request for logging).
* ``shadow_rules`` are evaluated and counted (``rbac.shadow_allowed`` / ``shadow_denied``) but
  never deny. ``rules`` count ``rbac.allowed`` / ``rbac.denied``; a filter without ``rules``
  enforces nothing.
* A denial is 403 with body ``RBAC: access denied`` and details
  ``rbac_access_denied_matched_policy[<policy>]`` (``none`` when an ALLOW filter matched
  nothing). Envoy sets no response flag for it.
* ``authenticated`` needs a peer certificate: it compares ``principal_name`` with the peer's
  URI SAN (``spiffe://...``); without one it never matches, and an empty ``principal_name``
  matches any authenticated peer.
* ``direct_remote_ip`` / ``source_ip`` is the connection's peer; ``remote_ip`` is the
  connection manager's remote address (the last ``x-forwarded-for`` hop unless
  ``use_remote_address``). ``destination_ip`` / ``destination_port`` are where the request was
  going; ``url_path`` compares the path without query; ``metadata`` reads dynamic metadata
  (the JWT filter's ``payload``), and a missing value never matches unless inverted.
* ``uri_template`` (``envoy.path.match.uri_template.uri_template_matcher``): ``*`` is one
  path segment, ``**`` zero or more, and must be the last operator.

``shadow_rules_stat_prefix`` names the shadow counters ``rbac.<prefix>shadow_allowed`` /
``..._denied`` (Istio's dry-run prefixes ``istio_dry_run_allow_`` / ``istio_dry_run_deny_``);
a shadow result is logged at debug level (``shadow denied, matched policy ...``).

Refused by name: ``matcher`` / ``shadow_matcher`` (the xDS matcher API), a non-empty
``rules_stat_prefix``, ``track_per_rule_stats``, policy ``condition`` / ``checked_condition`` /
``cel_config`` (CEL), ``audit_logging_options``, principal ``filter_state``,
``sourced_metadata``, ``custom`` and permission ``matcher``, ``sourced_metadata``.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.path.match.uri_template.v3 import uri_template_match_pb2

from meshlet.errors import ConfigError, ProblemList
from meshlet.proxy.fields import check_fields, join
from meshlet.proxy.headers import RequestHead
from meshlet.proxy.matching import (
    HeaderMatcher,
    StringMatcher,
    compile_header_matcher,
    compile_string_matcher,
)

if TYPE_CHECKING:
    from meshlet.proxy.telemetry.stats import HttpStats

log = logging.getLogger("meshlet.rbac")

DENIED_BODY = b"RBAC: access denied"
URI_TEMPLATE_TYPE = (
    "type.googleapis.com/" + uri_template_match_pb2.UriTemplateMatchConfig.DESCRIPTOR.full_name
)

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class RequestAttributes:
    """What RBAC may look at for one request (Envoy's connection, headers and stream info).

    ``peer_principal`` is the peer certificate's URI SAN as Envoy matches it
    (``spiffe://cluster.local/ns/<ns>/sa/<sa>``), None without mTLS. ``metadata`` is the
    dynamic metadata by filter name (``envoy.filters.http.jwt_authn`` -> ``{"payload": ...}``).
    """

    __slots__ = (
        "destination_ip",
        "destination_port",
        "direct_remote_ip",
        "head",
        "metadata",
        "peer_principal",
        "remote_ip",
        "requested_server_name",
    )

    def __init__(
        self,
        *,
        head: RequestHead,
        direct_remote_ip: IpAddress | None = None,
        remote_ip: IpAddress | None = None,
        destination_ip: IpAddress | None = None,
        destination_port: int = 0,
        peer_principal: str | None = None,
        requested_server_name: bytes = b"",
        metadata: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.head = head
        self.direct_remote_ip = direct_remote_ip
        self.remote_ip = remote_ip if remote_ip is not None else direct_remote_ip
        self.destination_ip = destination_ip
        self.destination_port = destination_port
        self.peer_principal = peer_principal
        self.requested_server_name = requested_server_name
        self.metadata: Mapping[str, Mapping[str, Any]] = metadata or {}

    def __repr__(self) -> str:
        return (
            f"<RequestAttributes {self.head!r} from {self.direct_remote_ip}"
            f" principal={self.peer_principal} to {self.destination_ip}:{self.destination_port}>"
        )


def parse_ip(value: bytes | str | None) -> IpAddress | None:
    """An IP address from text (``[v6]`` brackets and a zone allowed), None if it is not one."""
    if not value:
        return None
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    try:
        return ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None


def request_attributes(
    head: RequestHead,
    *,
    peer_ip: bytes,
    local: str,
    inbound: bool,
    use_remote_address: bool,
    xff_num_trusted_hops: int = 0,
    peer_principal: str | None = None,
    requested_server_name: bytes = b"",
    metadata: Mapping[str, Mapping[str, Any]] | None = None,
) -> RequestAttributes:
    """One request's attributes as the connection manager knows them.

    ``metadata`` is the stream's dynamic metadata: the JWT filter's payload, which
    ``requestPrincipals`` (``payload.iss`` / ``payload.sub``) and ``request.auth.*`` match.

    The remote address is Envoy's: the peer with ``use_remote_address``, else the
    ``x-forwarded-for`` entry ``xff_num_trusted_hops`` from the right (the peer when there is
    none). meshlet captures no traffic, so on an inbound listener the destination port is
    the one the ``Host`` names (80 without one), as for ORIGINAL_DST clusters; elsewhere it
    is the listener's.
    """
    direct = parse_ip(peer_ip)
    remote = direct
    if not use_remote_address:
        xff = head.headers.joined(b"x-forwarded-for")
        if xff:
            hops = xff.split(b",")
            if len(hops) > xff_num_trusted_hops:
                remote = parse_ip(hops[-1 - xff_num_trusted_hops]) or direct
    local_host, _, local_port = local.rpartition(":")
    port = int(local_port) if local_port.isdigit() else 0
    if inbound:
        _, sep, text = head.authority.rpartition(b":")
        port = int(text) if sep and text.isdigit() else 80
    return RequestAttributes(
        head=head,
        direct_remote_ip=direct,
        remote_ip=remote,
        destination_ip=parse_ip(local_host),
        destination_port=port,
        peer_principal=peer_principal,
        requested_server_name=requested_server_name,
        metadata=metadata,
    )


# --------------------------------------------------------------------------- matchers


class Matcher(ABC):
    """A compiled Permission or Principal: ``matches(attrs) -> bool``."""

    __slots__ = ()

    @abstractmethod
    def matches(self, attrs: RequestAttributes) -> bool: ...


@dataclass(frozen=True, slots=True)
class AnyMatcher(Matcher):
    def matches(self, attrs: RequestAttributes) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class AndMatcher(Matcher):
    items: tuple[Matcher, ...]

    def matches(self, attrs: RequestAttributes) -> bool:
        for m in self.items:  # noqa: SIM110 -- a plain loop: all() + genexpr is slower
            if not m.matches(attrs):
                return False
        return True


@dataclass(frozen=True, slots=True)
class OrMatcher(Matcher):
    items: tuple[Matcher, ...]

    def matches(self, attrs: RequestAttributes) -> bool:
        for m in self.items:  # noqa: SIM110 -- a plain loop: any() + genexpr is slower
            if m.matches(attrs):
                return True
        return False


@dataclass(frozen=True, slots=True)
class NotMatcher(Matcher):
    item: Matcher

    def matches(self, attrs: RequestAttributes) -> bool:
        return not self.item.matches(attrs)


@dataclass(frozen=True, slots=True)
class HeaderRule(Matcher):
    header: HeaderMatcher

    def matches(self, attrs: RequestAttributes) -> bool:
        return self.header.matches(attrs.head)


@dataclass(frozen=True, slots=True)
class UrlPathRule(Matcher):
    path: StringMatcher

    def matches(self, attrs: RequestAttributes) -> bool:
        return self.path.matches(attrs.head.path_only)


@dataclass(frozen=True, slots=True)
class UriTemplateRule(Matcher):
    template: str
    regex: re.Pattern[bytes]

    def matches(self, attrs: RequestAttributes) -> bool:
        return self.regex.fullmatch(attrs.head.path_only) is not None


@dataclass(frozen=True, slots=True)
class CidrRule(Matcher):
    """An IP in a CIDR range; ``source`` names which address: direct, remote or destination."""

    network: IpNetwork
    source: str  # "direct_remote_ip", "remote_ip" or "destination_ip"

    def matches(self, attrs: RequestAttributes) -> bool:
        ip: IpAddress | None = getattr(attrs, self.source)
        return ip is not None and ip.version == self.network.version and ip in self.network


@dataclass(frozen=True, slots=True)
class PortRule(Matcher):
    start: int
    end: int  # exclusive

    def matches(self, attrs: RequestAttributes) -> bool:
        return self.start <= attrs.destination_port < self.end


@dataclass(frozen=True, slots=True)
class ServerNameRule(Matcher):
    name: StringMatcher

    def matches(self, attrs: RequestAttributes) -> bool:
        return self.name.matches(attrs.requested_server_name)


@dataclass(frozen=True, slots=True)
class AuthenticatedRule(Matcher):
    principal: StringMatcher | None  # None: any authenticated peer

    def matches(self, attrs: RequestAttributes) -> bool:
        peer = attrs.peer_principal
        if peer is None:
            return False
        return self.principal is None or self.principal.matches(peer.encode())


class ValueMatcher(ABC):
    """A compiled ``envoy.type.matcher.v3.ValueMatcher`` over a JSON-like value."""

    __slots__ = ()

    @abstractmethod
    def matches(self, value: object) -> bool: ...


@dataclass(frozen=True, slots=True)
class StringValue(ValueMatcher):
    matcher: StringMatcher

    def matches(self, value: object) -> bool:
        return isinstance(value, str) and self.matcher.matches(value.encode())


@dataclass(frozen=True, slots=True)
class PresentValue(ValueMatcher):
    present: bool

    def matches(self, value: object) -> bool:
        return (value is not None) == self.present


@dataclass(frozen=True, slots=True)
class BoolValue(ValueMatcher):
    value: bool

    def matches(self, value: object) -> bool:
        return isinstance(value, bool) and value == self.value


@dataclass(frozen=True, slots=True)
class ListValue(ValueMatcher):
    one_of: ValueMatcher

    def matches(self, value: object) -> bool:
        return isinstance(value, list | tuple) and any(self.one_of.matches(v) for v in value)


@dataclass(frozen=True, slots=True)
class OrValue(ValueMatcher):
    items: tuple[ValueMatcher, ...]

    def matches(self, value: object) -> bool:
        return any(m.matches(value) for m in self.items)


@dataclass(frozen=True, slots=True)
class MetadataRule(Matcher):
    filter: str
    path: tuple[str, ...]
    value: ValueMatcher
    invert: bool = False

    def matches(self, attrs: RequestAttributes) -> bool:
        found: object = attrs.metadata.get(self.filter)
        for key in self.path:
            found = found.get(key) if isinstance(found, Mapping) else None
        # Envoy's MetadataMatcher: a missing value matches nothing (present_match aside).
        return self.value.matches(found) != self.invert


# --------------------------------------------------------------------------- engines


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    name: str
    permissions: Matcher  # an OrMatcher of the configured permissions
    principals: Matcher

    def matches(self, attrs: RequestAttributes) -> bool:
        return self.permissions.matches(attrs) and self.principals.matches(attrs)


ALLOW, DENY, LOG = "ALLOW", "DENY", "LOG"


@dataclass(frozen=True, slots=True, kw_only=True)
class RbacEngine:
    """A compiled ``envoy.config.rbac.v3.RBAC``: an action and policies in name order."""

    action: str  # ALLOW, DENY or LOG
    policies: tuple[Policy, ...]

    def __repr__(self) -> str:
        return f"<RbacEngine {self.action} [{', '.join(p.name for p in self.policies)}]>"

    def matched(self, attrs: RequestAttributes) -> str | None:
        """The effective policy: the first (by name) that matches, None if none does."""
        for p in self.policies:
            if p.matches(attrs):
                return p.name
        return None

    def allows(self, attrs: RequestAttributes) -> tuple[bool, str | None]:
        """Whether the action lets the request pass, and the effective policy."""
        policy = self.matched(attrs)
        if self.action == ALLOW:
            return policy is not None, policy
        if self.action == DENY:
            return policy is None, policy
        if policy is not None and log.isEnabledFor(logging.INFO):
            log.info("rbac log: %s matched policy %s", attrs, policy)
        return True, policy


@dataclass(frozen=True, slots=True, kw_only=True)
class RbacFilter:
    """A compiled ``envoy.extensions.filters.http.rbac.v3.RBAC``."""

    rules: RbacEngine | None
    shadow_rules: RbacEngine | None = None
    # shadow_rules_stat_prefix: the shadow counters are ``rbac.<prefix>shadow_allowed`` /
    # ``..._denied`` (Istio's dry-run uses ``istio_dry_run_allow_`` / ``istio_dry_run_deny_``)
    shadow_prefix: str = ""


def enforce(
    filters: tuple[RbacFilter, ...], attrs: RequestAttributes, stats: HttpStats
) -> str | None:
    """Run the RBAC filters in order, counting as Envoy does; the response code details of
    the first denial (``rbac_access_denied_matched_policy[...]``), or None to go on."""
    for f in filters:
        if f.shadow_rules is not None:
            ok, policy = f.shadow_rules.allows(attrs)
            if f.shadow_prefix:
                stats.count_rbac_shadow(f.shadow_prefix, ok)
            elif ok:
                stats.rbac_shadow_allowed += 1
            else:
                stats.rbac_shadow_denied += 1
            if log.isEnabledFor(logging.DEBUG):  # Envoy's rbac debug line, as Istio's task shows
                log.debug(
                    "shadow %s, matched policy %s",
                    "allowed" if ok else "denied",
                    policy or "none",
                )
        if f.rules is not None:
            ok, policy = f.rules.allows(attrs)
            if ok:
                stats.rbac_allowed += 1
            else:
                stats.rbac_denied += 1
                return f"rbac_access_denied_matched_policy[{policy or 'none'}]"
    return None


# --------------------------------------------------------------------------- compiling

_STAT_NAME = re.compile(r"[A-Za-z0-9_]+")
_HTTP_RBAC_FIELDS = {"rules", "shadow_rules", "rules_stat_prefix", "shadow_rules_stat_prefix"}
_ACTIONS = {rbac_pb2.RBAC.ALLOW: ALLOW, rbac_pb2.RBAC.DENY: DENY, rbac_pb2.RBAC.LOG: LOG}


def compile_rbac(proto: http_rbac_pb2.RBAC, path: str) -> RbacFilter:
    """Compile the HTTP RBAC filter's config."""
    check_fields(proto, path, _HTTP_RBAC_FIELDS)
    problems = ProblemList()
    if proto.rules_stat_prefix:
        problems.add(
            join(path, "rules_stat_prefix"), "is not supported by meshlet (only an empty prefix)"
        )
    shadow_prefix = proto.shadow_rules_stat_prefix
    if shadow_prefix and not _STAT_NAME.fullmatch(shadow_prefix):
        problems.add(
            join(path, "shadow_rules_stat_prefix"),
            "must be letters, digits and underscores (it becomes part of a stat name)",
        )
    rules = shadow = None
    try:
        if proto.HasField("rules"):
            rules = compile_engine(proto.rules, join(path, "rules"))
    except ConfigError as e:
        problems.extend(e)
    try:
        if proto.HasField("shadow_rules"):
            shadow = compile_engine(proto.shadow_rules, join(path, "shadow_rules"))
    except ConfigError as e:
        problems.extend(e)
    problems.raise_if_any()
    return RbacFilter(rules=rules, shadow_rules=shadow, shadow_prefix=shadow_prefix)


def compile_engine(proto: rbac_pb2.RBAC, path: str) -> RbacEngine:
    check_fields(proto, path, {"action", "policies"})
    problems = ProblemList()
    policies: list[Policy] = []
    for name in sorted(proto.policies):
        ppath = join(path, f"policies[{name}]")
        try:
            policies.append(_policy(name, proto.policies[name], ppath))
        except ConfigError as e:
            problems.extend(e)
    problems.raise_if_any()
    return RbacEngine(action=_ACTIONS[proto.action], policies=tuple(policies))


def _policy(name: str, proto: rbac_pb2.Policy, path: str) -> Policy:
    check_fields(proto, path, {"permissions", "principals"})
    if not proto.permissions:
        raise ConfigError.at(join(path, "permissions"), "at least one permission is required")
    if not proto.principals:
        raise ConfigError.at(join(path, "principals"), "at least one principal is required")
    perms = tuple(
        compile_permission(p, join(path, f"permissions[{i}]"))
        for i, p in enumerate(proto.permissions)
    )
    principals = tuple(
        compile_principal(p, join(path, f"principals[{i}]")) for i, p in enumerate(proto.principals)
    )
    return Policy(name=name, permissions=_any_of(perms), principals=_any_of(principals))


def _any_of(items: tuple[Matcher, ...]) -> Matcher:
    return items[0] if len(items) == 1 else OrMatcher(items)


def compile_permission(proto: rbac_pb2.Permission, path: str) -> Matcher:
    kind = proto.WhichOneof("rule")
    if kind is None:
        raise ConfigError.at(path, "needs a rule")
    kpath = join(path, kind)
    if kind in ("and_rules", "or_rules"):
        rules = getattr(proto, kind)
        check_fields(rules, kpath, {"rules"})
        items = tuple(
            compile_permission(r, join(kpath, f"rules[{i}]")) for i, r in enumerate(rules.rules)
        )
        return AndMatcher(items) if kind == "and_rules" else OrMatcher(items)
    if kind == "any":
        return _any(proto.any, kpath)
    if kind == "not_rule":
        return NotMatcher(compile_permission(proto.not_rule, kpath))
    if kind == "header":
        return HeaderRule(compile_header_matcher(proto.header, kpath))
    if kind == "url_path":
        return _url_path(proto.url_path, kpath)
    if kind == "destination_ip":
        return CidrRule(_cidr(proto.destination_ip, kpath), "destination_ip")
    if kind == "destination_port":
        if not 0 <= proto.destination_port <= 65535:
            raise ConfigError.at(kpath, "must be a port (0..65535)")
        return PortRule(proto.destination_port, proto.destination_port + 1)
    if kind == "destination_port_range":
        r = proto.destination_port_range
        check_fields(r, kpath, {"start", "end"})
        return PortRule(r.start, r.end)
    if kind == "requested_server_name":
        return ServerNameRule(compile_string_matcher(proto.requested_server_name, kpath))
    if kind == "metadata":
        return _metadata(proto.metadata, kpath)
    if kind == "uri_template":
        return _uri_template(proto.uri_template, kpath)
    raise ConfigError.at(kpath, "is not supported by meshlet")


def compile_principal(proto: rbac_pb2.Principal, path: str) -> Matcher:
    kind = proto.WhichOneof("identifier")
    if kind is None:
        raise ConfigError.at(path, "needs an identifier")
    kpath = join(path, kind)
    if kind in ("and_ids", "or_ids"):
        ids = getattr(proto, kind)
        check_fields(ids, kpath, {"ids"})
        items = tuple(compile_principal(p, join(kpath, f"ids[{i}]")) for i, p in enumerate(ids.ids))
        return AndMatcher(items) if kind == "and_ids" else OrMatcher(items)
    if kind == "any":
        return _any(proto.any, kpath)
    if kind == "not_id":
        return NotMatcher(compile_principal(proto.not_id, kpath))
    if kind == "authenticated":
        auth = proto.authenticated
        check_fields(auth, kpath, {"principal_name"})
        if not auth.HasField("principal_name"):
            return AuthenticatedRule(None)
        return AuthenticatedRule(
            compile_string_matcher(auth.principal_name, join(kpath, "principal_name"))
        )
    if kind in ("direct_remote_ip", "source_ip"):
        return CidrRule(_cidr(getattr(proto, kind), kpath), "direct_remote_ip")
    if kind == "remote_ip":
        return CidrRule(_cidr(proto.remote_ip, kpath), "remote_ip")
    if kind == "header":
        return HeaderRule(compile_header_matcher(proto.header, kpath))
    if kind == "url_path":
        return _url_path(proto.url_path, kpath)
    if kind == "metadata":
        return _metadata(proto.metadata, kpath)
    raise ConfigError.at(kpath, "is not supported by meshlet")


def _any(value: bool, path: str) -> Matcher:
    if not value:
        raise ConfigError.at(path, "must be true")
    return AnyMatcher()


def _url_path(proto: Any, path: str) -> Matcher:
    check_fields(proto, path, {"path"})
    if not proto.HasField("path"):
        raise ConfigError.at(join(path, "path"), "is required")
    return UrlPathRule(compile_string_matcher(proto.path, join(path, "path")))


def _cidr(proto: Any, path: str) -> IpNetwork:
    check_fields(proto, path, {"address_prefix", "prefix_len"})
    length = proto.prefix_len.value if proto.HasField("prefix_len") else None
    text = proto.address_prefix if length is None else f"{proto.address_prefix}/{length}"
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ConfigError.at(path, f"{text!r} is not a CIDR range") from None


def _metadata(proto: Any, path: str) -> Matcher:
    check_fields(proto, path, {"filter", "path", "value", "invert"})
    keys: list[str] = []
    for i, segment in enumerate(proto.path):
        check_fields(segment, join(path, f"path[{i}]"), {"key"})
        keys.append(segment.key)
    if not proto.filter or not keys:
        raise ConfigError.at(path, "filter and path are required")
    value = _value_matcher(proto.value, join(path, "value"))
    return MetadataRule(proto.filter, tuple(keys), value, bool(proto.invert))


def _value_matcher(proto: Any, path: str) -> ValueMatcher:
    kind = proto.WhichOneof("match_pattern")
    kpath = join(path, kind or "")
    if kind == "string_match":
        return StringValue(compile_string_matcher(proto.string_match, kpath))
    if kind == "present_match":
        return PresentValue(bool(proto.present_match))
    if kind == "bool_match":
        return BoolValue(bool(proto.bool_match))
    if kind == "list_match":
        check_fields(proto.list_match, kpath, {"one_of"})
        return ListValue(_value_matcher(proto.list_match.one_of, join(kpath, "one_of")))
    if kind == "or_match":
        check_fields(proto.or_match, kpath, {"value_matchers"})
        return OrValue(
            tuple(
                _value_matcher(v, join(kpath, f"value_matchers[{i}]"))
                for i, v in enumerate(proto.or_match.value_matchers)
            )
        )
    if kind is None:
        raise ConfigError.at(path, "needs a match pattern")
    raise ConfigError.at(kpath, "is not supported by meshlet")


# Envoy's uri_template (``uri_template/uri_template.cc``): literals are path characters
# (pchar); ``*`` one non-empty segment, ``**`` any number of segments, slashes included.
_PCHAR = rb"[a-zA-Z0-9\-._~%!$&'()+,;:@=]"
_LITERAL = re.compile(r"[a-zA-Z0-9\-._~%!$&'()+,;:@=/]+")


def compile_uri_template(template: str, path: str) -> re.Pattern[bytes]:
    """The regex a ``path_template`` stands for (variables ``{name}``/``{name=...}`` are
    not supported: istiod never writes them)."""
    if not template.startswith("/"):
        raise ConfigError.at(path, f"{template!r} must start with /")
    parts: list[bytes] = []
    seen_double = False
    i = 0
    while i < len(template):
        if template.startswith("**", i):
            if seen_double:
                raise ConfigError.at(path, f"{template!r}: ** must be the last operator")
            seen_double = True
            parts.append(_PCHAR[:-1] + b"/]*")
            i += 2
        elif template[i] == "*":
            if seen_double:
                raise ConfigError.at(path, f"{template!r}: ** must be the last operator")
            parts.append(_PCHAR + b"+")
            i += 1
        else:
            m = _LITERAL.match(template, i)
            if m is None:
                raise ConfigError.at(path, f"{template!r}: {template[i]!r} is not supported")
            parts.append(re.escape(m.group().encode()))
            i = m.end()
    return re.compile(b"".join(parts))


def _uri_template(proto: Any, path: str) -> Matcher:
    check_fields(proto, path, {"name", "typed_config"})
    if proto.typed_config.type_url != URI_TEMPLATE_TYPE:
        raise ConfigError.at(
            join(path, "typed_config"),
            f"{proto.typed_config.type_url or '(none)'} is not supported "
            "(supported: envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig)",
        )
    config = uri_template_match_pb2.UriTemplateMatchConfig()
    proto.typed_config.Unpack(config)
    cpath = join(path, "typed_config")
    check_fields(config, cpath, {"path_template"})
    template = config.path_template
    return UriTemplateRule(template, compile_uri_template(template, join(cpath, "path_template")))


__all__ = [
    "DENIED_BODY",
    "RbacEngine",
    "RbacFilter",
    "RequestAttributes",
    "compile_engine",
    "compile_permission",
    "compile_principal",
    "compile_rbac",
    "compile_uri_template",
    "enforce",
    "parse_ip",
    "request_attributes",
]
