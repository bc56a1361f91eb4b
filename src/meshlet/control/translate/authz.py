"""AuthorizationPolicy -> ``envoy.filters.http.rbac`` filters (istiod's
``pilot/pkg/security/authz/builder``), for inbound and gateway HCMs.

Rules kept (``ISTIO-TRANSLATION.md`` §6.3; istio.io "Authorization Policy" reference):

* One RBAC filter per action with policies, in Istio's order: AUDIT (``rules.action: LOG``),
  then DENY, then ALLOW. Evaluation is therefore CUSTOM (not supported), DENY, then ALLOW:
  with any ALLOW policy on the workload, only a request that one matches passes.
* A policy annotated ``istio.io/dry-run: "true"`` (ALLOW or DENY) goes into its filter's
  ``shadow_rules``, with ``shadow_rules_stat_prefix`` ``istio_dry_run_allow_`` /
  ``istio_dry_run_deny_``: counted and logged, never enforced (istio.io "Dry Run" task).
* CUSTOM needs an ext_authz extension meshlet does not have: such a policy is skipped, with a
  warning (``meshlet analyze`` reports it too).
* Each rule is a policy ``ns[<ns>]-policy[<name>]-rule[<i>]``; each ``from`` one principal and
  each ``to`` one permission (a missing side is ``any``); ``when`` conditions are ANDed into
  each, as principals (source and request attributes) or permissions (destination ones).
  Within one field values are ORed; fields are ANDed; ``not*`` values become a ``not_rule``
  / ``not_id`` over an OR. A policy with no rules is a policy that never matches, so an
  empty ALLOW policy denies everything; ``rules: [{}]`` matches everything.
* Values: ``*`` is presence (``.+``), ``x*`` a prefix, ``*x`` a suffix, else exact.
  Principals carry the ``spiffe://`` prefix; namespaces and service accounts are regexes on
  the principal; hosts ignore case; paths with ``{*}`` / ``{**}`` are URI templates.
  ``requestPrincipals`` and ``request.auth.*`` read the JWT filter's ``payload`` metadata.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence

from envoy.config.core.v3 import extension_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.rbac.v3.rbac_pb2 import Permission, Principal
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.path.match.uri_template.v3 import uri_template_match_pb2
from envoy.type.matcher.v3 import metadata_pb2, path_pb2, string_pb2, value_pb2
from google.protobuf import any_pb2

from meshlet.api.security import Action, Condition, Operation, Rule, Source
from meshlet.control.snapshot import AuthorizationPolicyConfig, ProxyView

log = logging.getLogger(__name__)

RBAC_FILTER = "envoy.filters.http.rbac"
JWT_FILTER = "envoy.filters.http.jwt_authn"
SPIFFE = "spiffe://"
CUSTOM_UNSUPPORTED = (
    "action CUSTOM is not supported (it needs an ext_authz extension provider); "
    "the policy is not applied"
)

_ACTIONS = (
    (Action.AUDIT, rbac_pb2.RBAC.LOG),
    (Action.DENY, rbac_pb2.RBAC.DENY),
    (Action.ALLOW, rbac_pb2.RBAC.ALLOW),
)


def authz_filters(view: ProxyView) -> list[hcm_pb2.HttpFilter]:
    """The RBAC HTTP filters for ``view``'s proxy, to put before its other HTTP filters."""
    policies = view.snapshot.authorization_policies_for(view.proxy)
    return rbac_filters(policies)


#: Istio's stat prefixes of dry-run results (``shadow_rules_stat_prefix``), by action.
DRY_RUN_PREFIX = {
    Action.ALLOW: "istio_dry_run_allow_",
    Action.DENY: "istio_dry_run_deny_",
}


def rbac_filters(policies: Sequence[AuthorizationPolicyConfig]) -> list[hcm_pb2.HttpFilter]:
    filters: list[hcm_pb2.HttpFilter] = []
    for action, envoy_action in _ACTIONS:
        chosen = [p for p in policies if p.spec.action is action]
        if not chosen:
            continue
        # Dry-run ALLOW and DENY policies (``istio.io/dry-run``) go into the filter's
        # shadow_rules: evaluated, logged and counted, never enforced. An ALLOW filter with
        # only dry-run policies therefore has no ``rules`` and allows everything, as Istio's.
        # Istio supports dry-run for ALLOW and DENY only; an AUDIT policy never denies anyway.
        dry = [p for p in chosen if p.dry_run and action in DRY_RUN_PREFIX]
        enforced = [p for p in chosen if p not in dry]
        config = http_rbac_pb2.RBAC()
        if enforced:
            config.rules.CopyFrom(_engine(envoy_action, enforced))
        if dry:
            config.shadow_rules.CopyFrom(_engine(envoy_action, dry))
            config.shadow_rules_stat_prefix = DRY_RUN_PREFIX[action]
        packed = any_pb2.Any()
        packed.Pack(config)
        filters.append(hcm_pb2.HttpFilter(name=RBAC_FILTER, typed_config=packed))
    for ap in policies:
        if ap.spec.action is Action.CUSTOM:
            log.warning("AuthorizationPolicy %s/%s: %s", ap.namespace, ap.name, CUSTOM_UNSUPPORTED)
    return filters


def _engine(action: int, policies: Sequence[AuthorizationPolicyConfig]) -> rbac_pb2.RBAC:
    config = rbac_pb2.RBAC(action=action)
    for ap in policies:
        for name, policy in policies_of(ap):
            config.policies[name].CopyFrom(policy)
    return config


def policy_name(namespace: str, name: str, index: int) -> str:
    return f"ns[{namespace}]-policy[{name}]-rule[{index}]"


_NEVER = rbac_pb2.Policy(
    permissions=[Permission(not_rule=Permission(any=True))],
    principals=[Principal(not_id=Principal(any=True))],
)


def policies_of(ap: AuthorizationPolicyConfig) -> list[tuple[str, rbac_pb2.Policy]]:
    """The Envoy policies of one AuthorizationPolicy, by name."""
    rules = ap.spec.rules
    if not rules:  # "an empty rules list gives a never-matching policy"
        return [(policy_name(ap.namespace, ap.name, 0), _NEVER)]
    return [
        (policy_name(ap.namespace, ap.name, i), rule_policy(rule, ap.namespace))
        for i, rule in enumerate(rules)
    ]


def rule_policy(rule: Rule, namespace: str) -> rbac_pb2.Policy:
    """One rule: a permission per ``to`` and a principal per ``from``, ``when`` in each."""
    when_principals: list[Principal] = []
    when_permissions: list[Permission] = []
    for cond in rule.when:
        _condition(cond, namespace, when_principals, when_permissions)
    policy = rbac_pb2.Policy()
    for frm in rule.from_ or (None,):
        ids = _source(frm.source, namespace) if frm is not None else []
        policy.principals.append(_and_ids(ids + when_principals))
    for to in rule.to or (None,):
        rules = _operation(to.operation) if to is not None else []
        policy.permissions.append(_and_rules(rules + when_permissions))
    return policy


# -- fields ---------------------------------------------------------------------------------

_PrincipalOf = Callable[[str], Principal]
_PermissionOf = Callable[[str], Permission]


def _source(src: Source, namespace: str) -> list[Principal]:
    out: list[Principal] = []
    fields: tuple[tuple[tuple[str, ...], tuple[str, ...], _PrincipalOf], ...] = (
        (src.principals, src.not_principals, _principal),
        (src.request_principals, src.not_request_principals, _request_principal),
        (src.namespaces, src.not_namespaces, _namespace),
        (
            src.service_accounts,
            src.not_service_accounts,
            lambda v: _service_account(v, namespace),
        ),
        (src.ip_blocks, src.not_ip_blocks, _direct_remote_ip),
        (src.remote_ip_blocks, src.not_remote_ip_blocks, _remote_ip),
    )
    for values, not_values, make in fields:
        _add_ids(out, values, not_values, make)
    return out


def _operation(op: Operation) -> list[Permission]:
    out: list[Permission] = []
    fields: tuple[tuple[tuple[str, ...], tuple[str, ...], _PermissionOf], ...] = (
        (op.hosts, op.not_hosts, _host),
        (op.ports, op.not_ports, _port),
        (op.methods, op.not_methods, _method),
        (op.paths, op.not_paths, _path),
    )
    for values, not_values, make in fields:
        _add_rules(out, values, not_values, make)
    return out


def _condition(
    cond: Condition, namespace: str, principals: list[Principal], permissions: list[Permission]
) -> None:
    key = cond.key
    permission = _PERMISSION_KEYS.get(key)
    if permission is not None:
        _add_rules(permissions, cond.values, cond.not_values, permission)
        return
    principal: _PrincipalOf | None = _PRINCIPAL_KEYS.get(key)
    if principal is None:
        if key == "source.serviceAccount":
            principal = lambda v: _service_account(v, namespace)  # noqa: E731
        elif key.startswith("request.headers["):
            header = key[len("request.headers[") : -1]
            principal = lambda v: Principal(header=_header(header, v))  # noqa: E731
        elif key.startswith("request.auth.claims["):
            claims = tuple(key[len("request.auth.claims[") : -1].split("]["))
            principal = lambda v: _jwt(("payload", *claims), v, listed=True)  # noqa: E731
        else:  # experimental.envoy.filters.*: istiod's own extensions, none here
            log.warning("AuthorizationPolicy condition %s is not supported; ignored", key)
            return
    _add_ids(principals, cond.values, cond.not_values, principal)


def _add_ids(
    out: list[Principal], values: Sequence[str], not_values: Sequence[str], make: _PrincipalOf
) -> None:
    if values:
        out.append(_or_ids([make(v) for v in values]))
    if not_values:
        out.append(Principal(not_id=_or_ids([make(v) for v in not_values])))


def _add_rules(
    out: list[Permission], values: Sequence[str], not_values: Sequence[str], make: _PermissionOf
) -> None:
    if values:
        out.append(_or_rules([make(v) for v in values]))
    if not_values:
        out.append(Permission(not_rule=_or_rules([make(v) for v in not_values])))


def _and_ids(ids: list[Principal]) -> Principal:
    if not ids:
        return Principal(any=True)
    return Principal(and_ids=Principal.Set(ids=ids))


def _or_ids(ids: list[Principal]) -> Principal:
    return Principal(or_ids=Principal.Set(ids=ids))


def _and_rules(rules: list[Permission]) -> Permission:
    if not rules:
        return Permission(any=True)
    return Permission(and_rules=Permission.Set(rules=rules))


def _or_rules(rules: list[Permission]) -> Permission:
    return Permission(or_rules=Permission.Set(rules=rules))


# -- values ---------------------------------------------------------------------------------


def string_matcher(value: str, prefix: str = "") -> string_pb2.StringMatcher:
    """Istio's ``StringMatcherWithPrefix``: ``*`` is ``.+`` (the prefix dropped), ``x*`` a
    prefix, ``*x`` a suffix (a regex when there is a prefix), else exact."""
    if value == "*":
        return _regex(".+")
    if value.startswith("*"):
        if not prefix:
            return string_pb2.StringMatcher(suffix=value[1:])
        return _regex(re.escape(prefix) + ".*" + re.escape(value[1:]))
    if value.endswith("*"):
        return string_pb2.StringMatcher(prefix=prefix + value[:-1])
    return string_pb2.StringMatcher(exact=prefix + value)


def _regex(pattern: str) -> string_pb2.StringMatcher:
    m = string_pb2.StringMatcher()
    m.safe_regex.regex = pattern
    return m


def _authenticated(matcher: string_pb2.StringMatcher) -> Principal:
    p = Principal()
    p.authenticated.principal_name.CopyFrom(matcher)
    return p


def _principal(value: str) -> Principal:
    return _authenticated(string_matcher(value, SPIFFE))


def _namespace(value: str) -> Principal:
    return _authenticated(_regex(f".*/ns/{value.replace('*', '.*')}/.*"))


def _service_account(value: str, namespace: str) -> Principal:
    ns, slash, sa = value.rpartition("/")
    if not slash:  # a bare name is in the policy's namespace
        ns, sa = namespace, value
    return _authenticated(_regex(f"spiffe://.+/ns/{re.escape(ns)}/(.+/|)sa/{re.escape(sa)}(/.+)?"))


def _cidr(value: str) -> tuple[str, int]:
    address, slash, length = value.partition("/")
    if slash:
        return address, int(length)
    return address, 128 if ":" in address else 32


def _direct_remote_ip(value: str) -> Principal:
    address, length = _cidr(value)
    p = Principal()
    p.direct_remote_ip.address_prefix = address
    p.direct_remote_ip.prefix_len.value = length
    return p


def _remote_ip(value: str) -> Principal:
    address, length = _cidr(value)
    p = Principal()
    p.remote_ip.address_prefix = address
    p.remote_ip.prefix_len.value = length
    return p


def _header(name: str, value: str) -> rc.HeaderMatcher:
    """Istio's ``HeaderMatcher``: ``*`` is presence, else a string match."""
    if value == "*":
        return rc.HeaderMatcher(name=name, present_match=True)
    return rc.HeaderMatcher(name=name, string_match=string_matcher(value))


def _metadata(path: Sequence[str], value: value_pb2.ValueMatcher) -> Principal:
    m = metadata_pb2.MetadataMatcher(filter=JWT_FILTER, value=value)
    for key in path:
        m.path.add(key=key)
    return Principal(metadata=m)


def _jwt(path: Sequence[str], value: str, *, listed: bool = False) -> Principal:
    """A JWT payload value: a string, or (``listed``) a string or a list holding it."""
    string = value_pb2.ValueMatcher(string_match=string_matcher(value))
    if not listed:
        return _metadata(path, string)
    either = value_pb2.ValueMatcher()
    either.or_match.value_matchers.append(string)
    either.or_match.value_matchers.add().list_match.one_of.CopyFrom(string)
    return _metadata(path, either)


def _request_principal(value: str) -> Principal:
    """``<iss>/<sub>`` split at the last ``/``; ``*`` is any token with both claims."""
    if value == "*":
        return _and_ids([_jwt(("payload", "iss"), "*"), _jwt(("payload", "sub"), "*")])
    iss, slash, sub = value.rpartition("/")
    if not slash:  # "x*" or "*x" without a slash: on the issuer alone
        return _jwt(("payload", "iss"), value)
    return _and_ids([_jwt(("payload", "iss"), iss), _jwt(("payload", "sub"), sub or "*")])


def _host(value: str) -> Permission:
    if value == "*":
        return Permission(header=rc.HeaderMatcher(name=":authority", present_match=True))
    m = string_matcher(value)
    m.ignore_case = True
    return Permission(header=rc.HeaderMatcher(name=":authority", string_match=m))


def _port(value: str) -> Permission:
    return Permission(destination_port=int(value))


def _method(value: str) -> Permission:
    return Permission(header=_header(":method", value))


def _path(value: str) -> Permission:
    if "{*}" in value or "{**}" in value:
        template = value.replace("{**}", "**").replace("{*}", "*")
        config = any_pb2.Any()
        config.Pack(uri_template_match_pb2.UriTemplateMatchConfig(path_template=template))
        p = Permission()
        p.uri_template.CopyFrom(
            extension_pb2.TypedExtensionConfig(name="uri-template", typed_config=config)
        )
        return p
    return Permission(url_path=path_pb2.PathMatcher(path=string_matcher(value)))


def _destination_ip(value: str) -> Permission:
    address, length = _cidr(value)
    p = Permission()
    p.destination_ip.address_prefix = address
    p.destination_ip.prefix_len.value = length
    return p


def _sni(value: str) -> Permission:
    return Permission(requested_server_name=string_matcher(value))


_PERMISSION_KEYS: dict[str, _PermissionOf] = {
    "destination.ip": _destination_ip,
    "destination.port": _port,
    "connection.sni": _sni,
}
_PRINCIPAL_KEYS: dict[str, _PrincipalOf] = {
    "source.ip": _direct_remote_ip,
    "remote.ip": _remote_ip,
    "source.namespace": _namespace,
    "source.principal": _principal,
    "request.auth.principal": _request_principal,
    "request.auth.audiences": lambda v: _jwt(("payload", "aud"), v, listed=True),
    "request.auth.presenter": lambda v: _jwt(("payload", "azp"), v),
}


__all__ = [
    "CUSTOM_UNSUPPORTED",
    "RBAC_FILTER",
    "authz_filters",
    "policies_of",
    "policy_name",
    "rbac_filters",
    "rule_policy",
    "string_matcher",
]
