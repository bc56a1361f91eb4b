"""RequestAuthentication → jwt_authn as istiod builds it (ISTIO-TRANSLATION.md §6.4; istio.io
"RequestAuthentication" reference: a request with an invalid token is rejected, one without a
token is accepted), and the result runs in meshlet's own JWT filter."""

from __future__ import annotations

import json
import time

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2

from meshlet.api import load_documents
from meshlet.api.security import RequestAuthentication
from meshlet.control.translate.request_authn import applicable, jwt_authn_filter
from meshlet.proxy.filters.jwt_authn import compile_jwt_authn

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PUBLIC = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(KEY.public_key()))
JWKS = json.dumps({"keys": [PUBLIC]})


def policies(text: str) -> list[tuple[RequestAuthentication, str]]:
    out = []
    for r in load_documents(text, "ra.yaml"):
        assert isinstance(r.model, RequestAuthentication)
        out.append((r.model, r.namespace or "default"))
    return out


POLICIES = policies(
    f"""
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: mesh, namespace: istio-system}}
spec:
  jwtRules:
  - issuer: b-issuer
    jwks: '{JWKS}'
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: httpbin, namespace: default}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
  jwtRules:
  - issuer: a-issuer
    jwksUri: http://127.0.0.1:9/jwks.json
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: other, namespace: other}}
spec:
  jwtRules:
  - issuer: c-issuer
    jwks: '{JWKS}'
"""
)


def test_mesh_namespace_and_selector_policies_apply_and_others_do_not() -> None:
    names = [p.metadata.name for p in applicable(POLICIES, "default", {"app": "httpbin"})]
    assert names == ["mesh", "httpbin"]
    assert [p.metadata.name for p in applicable(POLICIES, "default", {"app": "x"})] == ["mesh"]


def test_providers_sorted_by_issuer_with_istios_requirement() -> None:
    selected = applicable(POLICIES, "default", {"app": "httpbin"})
    http_filter = jwt_authn_filter(selected)
    assert http_filter is not None and http_filter.name == "envoy.filters.http.jwt_authn"
    config = config_pb2.JwtAuthentication()
    http_filter.typed_config.Unpack(config)
    assert config.providers["origins-0"].issuer == "a-issuer"
    assert config.providers["origins-0"].remote_jwks.http_uri.uri == "http://127.0.0.1:9/jwks.json"
    assert config.providers["origins-1"].local_jwks.inline_string == JWKS
    assert config.providers["origins-1"].payload_in_metadata == "payload"
    assert config.bypass_cors_preflight
    top = config.rules[0].requires.requires_any.requirements
    assert [r.provider_name for r in top[:2]] == ["origins-0", "origins-1"]
    assert len(top[2].requires_all.requirements) == 2
    assert jwt_authn_filter([]) is None


def test_the_translated_filter_rejects_bad_tokens_and_accepts_missing_ones() -> None:
    http_filter = jwt_authn_filter(applicable(POLICIES, "default", {"app": "x"}))
    assert http_filter is not None
    config = config_pb2.JwtAuthentication()
    http_filter.typed_config.Unpack(config)
    engine = compile_jwt_authn(config, "jwt")
    now = int(time.time())
    good = jwt.encode({"iss": "b-issuer", "sub": "bob", "exp": now + 60}, KEY, algorithm="RS256")
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    bad = jwt.encode({"iss": "b-issuer", "sub": "eve", "exp": now + 60}, other, algorithm="RS256")
    auth = b"authorization"
    assert engine.check("GET", "/", []).failure is None
    assert engine.check("GET", "/", [(auth, f"Bearer {good}".encode())]).failure is None
    failure = engine.check("GET", "/", [(auth, f"Bearer {bad}".encode())]).failure
    assert failure is not None and failure.status == 401
