"""security.istio.io: PeerAuthentication, AuthorizationPolicy, RequestAuthentication
(apiVersions v1 and v1beta1, one schema).

Schemas only for now; their behaviour (mTLS modes, RBAC filters, JWT checks) comes with the
security issues. Checks follow Istio's CRD rules and webhook where they are cheap.
"""

from __future__ import annotations

import ipaddress
from enum import StrEnum
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, model_validator

from meshlet.api.schema import Bool, Issues, IstioModel, MinDuration, Resource, is_decimal
from meshlet.api.selectors import PolicySelector, PolicyTargetReference, check_one_target

# -- PeerAuthentication ----------------------------------------------------------------------


class MTLSMode(StrEnum):
    UNSET = "UNSET"  # inherit from the parent (namespace, then mesh); PERMISSIVE at the top
    DISABLE = "DISABLE"
    PERMISSIVE = "PERMISSIVE"
    STRICT = "STRICT"


class MutualTLS(IstioModel):
    mode: MTLSMode = MTLSMode.UNSET


def _port_key(value: object) -> object:
    # YAML reads ``8080:`` as an integer key; protobuf's JSON writes map<uint32, ...> keys
    # as strings. Accept both and keep the string.
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not is_decimal(value) or not 1 <= int(value) <= 65535:
        raise ValueError(f"port {value!r} must be between 1-65535")
    return value


PortKey = Annotated[str, BeforeValidator(_port_key)]


class PeerAuthenticationSpec(IstioModel):
    selector: PolicySelector | None = None
    mtls: MutualTLS | None = None
    port_level_mtls: dict[PortKey, MutualTLS] = {}

    @model_validator(mode="after")
    def _check(self) -> PeerAuthenticationSpec:
        if self.port_level_mtls and not (self.selector and self.selector.match_labels):
            raise ValueError("portLevelMtls requires selector")
        return self

    def port_mode(self, port: int) -> MTLSMode | None:
        """The mode set for ``port``, if any."""
        setting = self.port_level_mtls.get(str(port))
        return setting.mode if setting else None


class PeerAuthentication(Resource):
    spec: PeerAuthenticationSpec = PeerAuthenticationSpec()


# -- AuthorizationPolicy ---------------------------------------------------------------------


class Action(StrEnum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"
    CUSTOM = "CUSTOM"


def _ip_blocks(field: str, values: tuple[str, ...], issues: Issues) -> None:
    for i, value in enumerate(values):
        try:
            if "/" in value:
                ipaddress.ip_network(value, strict=False)
            else:
                ipaddress.ip_address(value)
        except ValueError:
            issues.add((field, i), f"{value!r} is not a valid IP address or CIDR block")


ServiceAccountName = Annotated[str, Field(max_length=320)]


class Source(IstioModel):
    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()
    remote_ip_blocks: tuple[str, ...] = ()
    not_remote_ip_blocks: tuple[str, ...] = ()
    service_accounts: Annotated[tuple[ServiceAccountName, ...], Field(max_length=16)] = ()
    not_service_accounts: Annotated[tuple[ServiceAccountName, ...], Field(max_length=16)] = ()

    @model_validator(mode="after")
    def _check(self) -> Source:
        issues = Issues()
        if not any(getattr(self, name) for name in type(self).model_fields):
            issues.add((), "`from.source` must not be empty")
        if (self.service_accounts or self.not_service_accounts) and (
            self.principals or self.not_principals or self.namespaces or self.not_namespaces
        ):
            issues.add((), "Cannot set serviceAccounts with namespaces or principals")
        for field, values in (
            ("ipBlocks", self.ip_blocks),
            ("notIpBlocks", self.not_ip_blocks),
            ("remoteIpBlocks", self.remote_ip_blocks),
            ("notRemoteIpBlocks", self.not_remote_ip_blocks),
        ):
            _ip_blocks(field, values, issues)
        issues.raise_if_any("Source")
        return self


class RuleFrom(IstioModel):
    source: Source


class Operation(IstioModel):
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[str, ...] = ()
    not_ports: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> Operation:
        issues = Issues()
        if not any(getattr(self, name) for name in type(self).model_fields):
            issues.add((), "`to.operation` must not be empty")
        for field, ports in (("ports", self.ports), ("notPorts", self.not_ports)):
            for i, port in enumerate(ports):
                if not is_decimal(port) or not 0 <= int(port) <= 65535:
                    issues.add((field, i), f"invalid port {port!r}: must be a number in 0..65535")
        issues.raise_if_any("Operation")
        return self


class RuleTo(IstioModel):
    operation: Operation


# Istio's authorization condition keys (``when[].key``).
CONDITION_KEYS = frozenset(
    {
        "source.ip",
        "remote.ip",
        "source.namespace",
        "source.principal",
        "source.serviceAccount",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
        "destination.ip",
        "destination.port",
        "connection.sni",
    }
)
CONDITION_KEY_PREFIXES = ("request.headers[", "request.auth.claims[")


class Condition(IstioModel):
    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> Condition:
        issues = Issues()
        known = (
            self.key in CONDITION_KEYS
            or self.key.startswith("experimental.envoy.filters.")
            or (self.key.startswith(CONDITION_KEY_PREFIXES) and self.key.endswith("]"))
        )
        if not known:
            issues.add(
                ("key",),
                f"unknown attribute {self.key!r}; use one of {', '.join(sorted(CONDITION_KEYS))}, "
                "request.headers[NAME] or request.auth.claims[NAME]",
            )
        if not self.values and not self.not_values:
            issues.add((), f"at least one of values or notValues must be set for key {self.key}")
        issues.raise_if_any("Condition")
        return self


class Rule(IstioModel):
    from_: Annotated[tuple[RuleFrom, ...], Field(alias="from", max_length=512)] = ()
    to: tuple[RuleTo, ...] = ()
    when: tuple[Condition, ...] = ()


class ExtensionProvider(IstioModel):
    name: str = ""


class AuthorizationPolicySpec(IstioModel):
    selector: PolicySelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: Annotated[tuple[PolicyTargetReference, ...], Field(max_length=16)] = ()
    rules: Annotated[tuple[Rule, ...], Field(max_length=512)] = ()
    action: Action = Action.ALLOW
    provider: ExtensionProvider | None = None

    @model_validator(mode="after")
    def _check(self) -> AuthorizationPolicySpec:
        issues = Issues()
        check_one_target(issues, self.selector, self.target_ref, self.target_refs)
        if self.action is Action.CUSTOM and self.provider is None:
            issues.add(("provider",), "CUSTOM action requires a provider")
        elif self.action is Action.CUSTOM:
            issues.add(
                ("action",),
                "CUSTOM is not supported by meshlet yet: it has no extension providers"
                " (ext_authz); use ALLOW, DENY or AUDIT",
            )
        if self.provider is not None and self.action is not Action.CUSTOM:
            issues.add(("provider",), "provider can only be used with the CUSTOM action")
        issues.raise_if_any("AuthorizationPolicySpec")
        return self


class AuthorizationPolicy(Resource):
    spec: AuthorizationPolicySpec = AuthorizationPolicySpec()


# -- RequestAuthentication -------------------------------------------------------------------


class JWTHeader(IstioModel):
    name: Annotated[str, Field(min_length=1)]
    prefix: str = ""


class ClaimToHeader(IstioModel):
    header: Annotated[str, Field(min_length=1, pattern=r"^[-_A-Za-z0-9]+$")]
    claim: Annotated[str, Field(min_length=1)]


NonEmpty = Annotated[str, Field(min_length=1)]


def _check_jwks_uri(issues: Issues, field: str, uri: str) -> None:
    if uri and urlsplit(uri).scheme not in ("http", "https"):
        issues.add((field,), "url must have scheme http:// or https://")


class JWTRule(IstioModel):
    issuer: NonEmpty
    audiences: tuple[NonEmpty, ...] = ()
    jwks_uri: Annotated[str, Field(max_length=2048)] = ""
    jwks_uri_snake: Annotated[str, Field(alias="jwks_uri", max_length=2048)] = ""
    jwks: str = ""
    from_headers: tuple[JWTHeader, ...] = ()
    from_params: tuple[NonEmpty, ...] = ()
    from_cookies: tuple[NonEmpty, ...] = ()
    output_payload_to_header: str = ""
    forward_original_token: Bool = False
    output_claim_to_headers: tuple[ClaimToHeader, ...] = ()
    timeout: MinDuration | None = None
    space_delimited_claims: Annotated[tuple[NonEmpty, ...], Field(max_length=64)] = ()

    @model_validator(mode="after")
    def _check(self) -> JWTRule:
        issues = Issues()
        issues.at_most_one(self, ("jwks_uri", "jwks_uri_snake", "jwks"))
        _check_jwks_uri(issues, "jwksUri", self.jwks_uri)
        _check_jwks_uri(issues, "jwks_uri", self.jwks_uri_snake)
        issues.raise_if_any("JWTRule")
        return self

    @property
    def effective_jwks_uri(self) -> str:
        return self.jwks_uri or self.jwks_uri_snake


class RequestAuthenticationSpec(IstioModel):
    selector: PolicySelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: Annotated[tuple[PolicyTargetReference, ...], Field(max_length=16)] = ()
    jwt_rules: Annotated[tuple[JWTRule, ...], Field(max_length=4096)] = ()

    @model_validator(mode="after")
    def _check(self) -> RequestAuthenticationSpec:
        issues = Issues()
        check_one_target(issues, self.selector, self.target_ref, self.target_refs)
        issues.raise_if_any("RequestAuthenticationSpec")
        return self


class RequestAuthentication(Resource):
    spec: RequestAuthenticationSpec = RequestAuthenticationSpec()
