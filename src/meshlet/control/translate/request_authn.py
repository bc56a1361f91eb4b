"""RequestAuthentication → ``envoy.filters.http.jwt_authn`` (ISTIO-TRANSLATION.md §6.4).

Every RequestAuthentication that applies to a workload counts: the mesh-wide ones (root
namespace, no selector), its namespace's without a selector, and those whose selector matches
its labels. Their JWT rules, sorted by issuer, become providers ``origins-<i>``, each with
``payload_in_metadata: payload``; the requirement is ``requires_any[origins-i, allow_missing]``
for one provider, and ``requires_any[origins-0 … origins-n, requires_all[requires_any[origins-i,
allow_missing] …]]`` for several: an invalid token fails, a missing one passes (requiring a
token is AuthorizationPolicy's job). ``bypass_cors_preflight`` is on. JWKS given inline are sent
inline; a ``jwksUri`` becomes ``remote_jwks``, fetched by the proxy (istiod fetches and inlines
by default; meshlet's control plane does no I/O while translating).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from envoy.config.core.v3 import http_uri_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from meshlet.api.security import JWTRule, RequestAuthentication

JWT_FILTER = "envoy.filters.http.jwt_authn"
ROOT_NAMESPACE = "istio-system"


def applicable(
    policies: Iterable[tuple[RequestAuthentication, str]],
    namespace: str,
    labels: Mapping[str, str],
    root_namespace: str = ROOT_NAMESPACE,
) -> list[RequestAuthentication]:
    """The policies that apply to a workload in ``namespace`` with ``labels``."""
    out = []
    for policy, ns in policies:
        selector = policy.spec.selector
        match = selector.match_labels if selector is not None else {}
        mesh_wide = ns == root_namespace and not match
        selected = ns == namespace and all(labels.get(k) == v for k, v in match.items())
        if mesh_wide or selected:
            out.append(policy)
    return out


def jwt_authn_filter(policies: Sequence[RequestAuthentication]) -> hcm_pb2.HttpFilter | None:
    """The HTTP filter for ``policies``, or None when they have no JWT rule."""
    rules = sorted((rule for p in policies for rule in p.spec.jwt_rules), key=lambda r: r.issuer)
    if not rules:
        return None
    config = jwt_pb2.JwtAuthentication(bypass_cors_preflight=True)
    names = []
    for i, rule in enumerate(rules):
        name = f"origins-{i}"
        names.append(name)
        config.providers[name].CopyFrom(_provider(rule))
    requirement = config.rules.add()
    requirement.match.prefix = "/"
    top = requirement.requires.requires_any.requirements
    if len(names) == 1:
        top.add().provider_name = names[0]
        top.add().allow_missing.SetInParent()
    else:
        for name in names:
            top.add().provider_name = name
        every = top.add().requires_all.requirements
        for name in names:
            either = every.add().requires_any.requirements
            either.add().provider_name = name
            either.add().allow_missing.SetInParent()
    http_filter = hcm_pb2.HttpFilter(name=JWT_FILTER)
    http_filter.typed_config.Pack(config)
    return http_filter


def _provider(rule: JWTRule) -> jwt_pb2.JwtProvider:
    provider = jwt_pb2.JwtProvider(
        issuer=rule.issuer,
        audiences=list(rule.audiences),
        forward=rule.forward_original_token,
        payload_in_metadata="payload",
    )
    if rule.output_payload_to_header:
        provider.forward_payload_header = rule.output_payload_to_header
    for header in rule.from_headers:
        provider.from_headers.add(name=header.name, value_prefix=header.prefix)
    provider.from_params.extend(rule.from_params)
    provider.from_cookies.extend(rule.from_cookies)
    for claim in rule.output_claim_to_headers:
        provider.claim_to_headers.add(header_name=claim.header, claim_name=claim.claim)
    if rule.jwks:
        provider.local_jwks.inline_string = rule.jwks
    else:
        uri = rule.effective_jwks_uri
        remote = provider.remote_jwks
        remote.http_uri.CopyFrom(http_uri_pb2.HttpUri(uri=uri, cluster=uri))
        remote.http_uri.timeout.FromSeconds(5)
        remote.cache_duration.FromSeconds(300)
    return provider
