"""The JWT filter's decisions, with real keys and tokens (cryptography, PyJWT).

Envoy's jwt_authn semantics (envoyproxy.io "JWT Authentication"; ISTIO-TRANSLATION.md §6.4):
istiod gives each RequestAuthentication rule a provider and requires ``requires_any[provider,
allow_missing]``, so a missing token passes, a bad one fails with 401, a token for another
audience with 403; a verified token is removed unless ``forward``, and its payload is kept.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import json_format

from meshlet.errors import ConfigError
from meshlet.proxy.filters.jwt_authn import (
    BAD,
    BAD_AUDIENCE,
    EXPIRED,
    UNKNOWN_ISSUER,
    compile_jwt_authn,
)
from meshlet.proxy.listener import JWT_AUTHN_TYPE, RBAC_TYPE, ROUTER_TYPE, compile_hcm

ISSUER = "testing@secure.istio.io"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwks(key: rsa.RSAPrivateKey = KEY) -> str:
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    public.update(kid="k1", alg="RS256", use="sig")
    return json.dumps({"keys": [public]})


def token(key: rsa.RSAPrivateKey = KEY, **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "sub": "alice", "iat": now, "exp": now + 600, **claims}
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": "k1"})


def config(*, audiences: tuple[str, ...] = (), forward: bool = False, allow_missing: bool = True):
    proto = config_pb2.JwtAuthentication()
    provider = proto.providers["origins-0"]
    provider.issuer = ISSUER
    provider.audiences.extend(audiences)
    provider.local_jwks.inline_string = jwks()
    provider.forward = forward
    provider.payload_in_metadata = "payload"
    rule = proto.rules.add()
    rule.match.prefix = "/"
    if allow_missing:
        any_of = rule.requires.requires_any.requirements
        any_of.add().provider_name = "origins-0"
        any_of.add().allow_missing.SetInParent()
    else:
        rule.requires.provider_name = "origins-0"
    return compile_jwt_authn(proto, "jwt")


def check(filter_: Any, value: str | None, target: str = "/ip") -> Any:
    headers = [(b"host", b"x")]
    if value is not None:
        headers.append((b"authorization", f"Bearer {value}".encode()))
    return filter_.check("GET", target, headers)


def test_a_valid_token_passes_its_payload_is_kept_and_the_token_removed() -> None:
    outcome = check(config(), token())
    assert outcome.failure is None
    assert outcome.payloads["payload"]["sub"] == "alice"
    assert outcome.strip == [(b"authorization", "Bearer ")]
    assert check(config(forward=True), token()).strip == []


def test_missing_passes_with_allow_missing_and_fails_without() -> None:
    assert check(config(), None).failure is None
    failure = check(config(allow_missing=False), None).failure
    assert (failure.status, failure.message) == (401, "Jwt is missing")


def test_bad_tokens_fail_with_envoys_messages() -> None:
    assert check(config(), token(OTHER_KEY)).failure.message == BAD
    assert check(config(), "not-a-jwt").failure.message == BAD
    assert check(config(), token(iss="someone-else")).failure.message == UNKNOWN_ISSUER
    expired = token(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200)
    assert check(config(), expired).failure.message == EXPIRED
    # Within the 60 s clock skew, Envoy's default, a just-expired token still passes.
    assert check(config(), token(exp=int(time.time()) - 30)).failure is None


def test_audiences_are_checked_when_given_with_403() -> None:
    filter_ = config(audiences=("bookinfo",))
    assert check(filter_, token(aud="bookinfo")).failure is None
    failure = check(filter_, token(aud="other")).failure
    assert (failure.status, failure.message) == (403, BAD_AUDIENCE)


def test_the_access_token_parameter_is_read_by_default() -> None:
    outcome = config().check("GET", f"/ip?access_token={token()}", [(b"host", b"x")])
    assert outcome.failure is None and outcome.payloads["payload"]["iss"] == ISSUER


def test_unsupported_fields_and_bad_keys_are_refused_by_name() -> None:
    proto = config_pb2.JwtAuthentication()
    provider = proto.providers["p"]
    provider.issuer = ISSUER
    provider.local_jwks.inline_string = "{not json"
    with pytest.raises(ConfigError) as e:
        compile_jwt_authn(proto, "jwt")
    assert "jwt.providers[p].local_jwks.inline_string: bad JWKS" in e.value.render()
    proto.providers["p"].local_jwks.inline_string = jwks()
    proto.providers["p"].jwt_cache_config.jwt_cache_size = 10
    with pytest.raises(ConfigError) as e:
        compile_jwt_authn(proto, "jwt")
    assert "providers[p].jwt_cache_config" in e.value.render()


def test_cookies_and_claims_to_headers() -> None:
    """Istio's ``fromCookies`` and ``outputClaimToHeaders`` (RequestAuthentication reference)."""
    proto = config_pb2.JwtAuthentication()
    provider = proto.providers["p"]
    provider.issuer = ISSUER
    provider.local_jwks.inline_string = jwks()
    provider.from_cookies.append("session")
    provider.claim_to_headers.add(header_name="x-user", claim_name="sub")
    rule = proto.rules.add()
    rule.match.prefix = "/"
    rule.requires.provider_name = "p"
    engine = compile_jwt_authn(proto, "jwt")
    cookie = f"theme=dark; session={token()}".encode()
    outcome = engine.check("GET", "/", [(b"cookie", cookie)])
    assert outcome.failure is None
    assert (b"x-user", b"alice") in outcome.add
    assert engine.check("GET", "/", [(b"cookie", b"theme=dark")]).failure is not None


# -- in the HTTP connection manager -----------------------------------------------------------


def hcm_with(*filters: str) -> hcm_pb2.HttpConnectionManager:
    """An HCM whose http_filters are the named ones (jwt_authn, rbac, router), in order."""
    typed = {
        "jwt_authn": {"@type": JWT_AUTHN_TYPE, "providers": {}},
        "rbac": {"@type": RBAC_TYPE},
        "router": {"@type": ROUTER_TYPE},
    }
    return json_format.ParseDict(
        {
            "route_config": {},
            "http_filters": [{"name": name, "typed_config": typed[name]} for name in filters],
        },
        hcm_pb2.HttpConnectionManager(),
    )


def test_the_hcm_compiles_jwt_authn_ahead_of_rbac() -> None:
    hcm = compile_hcm(hcm_with("jwt_authn", "rbac", "router"), "hcm", "l")
    assert hcm.jwt_authn is not None and len(hcm.rbac) == 1
    assert compile_hcm(hcm_with("rbac", "router"), "hcm", "l").jwt_authn is None


def test_the_hcm_refuses_jwt_authn_after_rbac_which_reads_its_payload() -> None:
    with pytest.raises(ConfigError) as e:
        compile_hcm(hcm_with("rbac", "jwt_authn", "router"), "hcm", "l")
    assert "hcm.http_filters[1]: envoy.filters.http.jwt_authn must come first" in e.value.render()
