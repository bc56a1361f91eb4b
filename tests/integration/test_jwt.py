"""``envoy.filters.http.jwt_authn`` in the connection manager, ahead of RBAC, through a real
proxy process.

Envoy's behaviour (envoyproxy.io "JWT Authentication" filter; ``jwt_authn/filter.cc``) with the
requirement istiod writes for a RequestAuthentication (``requires_any[provider,
allow_missing]``) and an AuthorizationPolicy's ``requestPrincipals: ["<iss>/<sub>"]`` (RBAC
matching the filter's ``payload`` metadata): a request without a token passes the JWT filter
and is then refused by RBAC where a principal is required; a valid token reaches the upstream
without its ``Authorization`` header; a bad one is 401 with a ``www-authenticate`` challenge, a
token for another audience 403; the access log carries ``jwt_authn_access_denied{...}``.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.integration.conftest import (
    TEST_LOG_FORMAT,
    Proxy,
    Upstream,
    bootstrap,
    cluster,
    file_access_log,
    free_port,
    http_request,
    launch_proxy,
    stop_proxy,
    wait_for_lines,
)

pytestmark = pytest.mark.timeout(60)

JWT_AUTHN = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
RBAC = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
JWT_FILTER = "envoy.filters.http.jwt_authn"
ISSUER = "testing@secure.istio.io"
AUDIENCE = "meshlet-test"
SUBJECT = "alice"

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwks(key: rsa.RSAPrivateKey = KEY) -> str:
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    public.update(kid="k1", alg="RS256", use="sig")
    return json.dumps({"keys": [public]})


def token(key: rsa.RSAPrivateKey = KEY, **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "sub": SUBJECT, "aud": AUDIENCE, "iat": now, "exp": now + 600}
    return jwt.encode({**body, **claims}, key, algorithm="RS256", headers={"kid": "k1"})


def bearer(value: str) -> dict[str, str]:
    return {"authorization": f"Bearer {value}"}


def jwt_filter(provider: dict[str, Any], *, allow_missing: bool = True) -> dict[str, Any]:
    """A jwt_authn filter with one provider, required on every path as istiod writes it."""
    requires: dict[str, Any] = {"provider_name": "origins-0"}
    if allow_missing:
        requires = {"requires_any": {"requirements": [requires, {"allow_missing": {}}]}}
    return {
        "name": JWT_FILTER,
        "typed_config": {
            "@type": JWT_AUTHN,
            "providers": {
                "origins-0": {
                    "issuer": ISSUER,
                    "audiences": [AUDIENCE],
                    "payload_in_metadata": "payload",
                    **provider,
                }
            },
            "rules": [{"match": {"prefix": "/"}, "requires": requires}],
        },
    }


def payload_is(key: str, value: str) -> dict[str, Any]:
    """An RBAC principal on the JWT payload (Istio's ``requestPrincipals`` half)."""
    return {
        "metadata": {
            "filter": JWT_FILTER,
            "path": [{"key": "payload"}, {"key": key}],
            "value": {"string_match": {"exact": value}},
        }
    }


# ALLOW: /admin only for the request principal <iss>/<sub>; anything else for anyone.
ADMIN = {"url_path": {"path": {"prefix": "/admin"}}}
ALICE = {"and_ids": {"ids": [payload_is("iss", ISSUER), payload_is("sub", SUBJECT)]}}
RBAC_FILTER = {
    "name": "envoy.filters.http.rbac",
    "typed_config": {
        "@type": RBAC,
        "rules": {
            "action": "ALLOW",
            "policies": {
                "admin-for-alice": {
                    "permissions": [ADMIN],
                    "principals": [ALICE],
                },
                "the-rest": {"permissions": [{"not_rule": ADMIN}], "principals": [{"any": True}]},
            },
        },
    },
}
ROUTER_FILTER = {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    up = Upstream(name="upstream", port=free_port()).start()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def access_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("jwt-log") / "access.log"


@pytest.fixture(scope="module")
def proxy(
    upstream: Upstream, access_log: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    filters = [jwt_filter({"local_jwks": {"inline_string": jwks()}}), RBAC_FILTER, ROUTER_FILTER]
    config = bootstrap(
        clusters=[cluster("web", upstream.port)],
        http_filters=filters,
        hcm=file_access_log(access_log, TEST_LOG_FORMAT),
    )
    started = launch_proxy(config, tmp_path_factory.mktemp("jwt-proxy"))
    yield started
    stop_proxy(started)


def logged(access_log: Path, path: str) -> str:
    """The access-log line of the last request for ``path`` (status ... path details)."""
    lines = wait_for_lines(access_log, 1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        found = [line for line in lines if line.split()[3:4] == [path]]
        if found:
            return found[-1]
        time.sleep(0.1)
        lines = access_log.read_text().splitlines()
    raise AssertionError(f"no access-log line for {path} in {lines!r}")


def test_without_a_token_rbac_refuses_the_protected_path_and_allows_the_rest(
    proxy: Proxy,
) -> None:
    denied = http_request(proxy.port, "/admin")
    assert (denied.status, denied.text) == (403, "RBAC: access denied")
    assert "www-authenticate" not in denied.headers
    assert http_request(proxy.port, "/hello").status == 200


def test_a_valid_token_passes_and_its_authorization_header_is_not_forwarded(
    proxy: Proxy, upstream: Upstream
) -> None:
    r = http_request(proxy.port, "/admin/panel", headers=bearer(token()))
    assert (r.status, r.text) == (200, "hello from upstream")
    seen = upstream.seen[-1]
    assert seen.path == "/admin/panel"
    assert "authorization" not in seen.headers


def test_a_token_for_another_subject_passes_jwt_but_not_rbac(proxy: Proxy) -> None:
    r = http_request(proxy.port, "/admin", headers=bearer(token(sub="mallory")))
    assert (r.status, r.text) == (403, "RBAC: access denied")


def test_a_badly_signed_token_is_401_with_a_bearer_challenge_and_envoys_details(
    proxy: Proxy, access_log: Path
) -> None:
    r = http_request(proxy.port, "/hello/bad", headers=bearer(token(OTHER_KEY)))
    assert (r.status, r.text) == (401, "Jwt verification fails")
    realm = f"http://127.0.0.1:{proxy.port}/hello/bad"
    assert r.headers["www-authenticate"] == f'Bearer realm="{realm}", error="invalid_token"'
    line = logged(access_log, "/hello/bad")
    assert line.split()[0] == "401"
    assert line.endswith("jwt_authn_access_denied{Jwt_verification_fails}")


def test_a_token_for_another_audience_is_403(proxy: Proxy) -> None:
    r = http_request(proxy.port, "/hello", headers=bearer(token(aud="someone-else")))
    assert (r.status, r.text) == (403, "Audiences in Jwt are not allowed")


def test_the_filter_counts_allowed_and_denied_requests(proxy: Proxy) -> None:
    http_request(proxy.port, "/hello", headers=bearer(token()))
    http_request(proxy.port, "/hello", headers=bearer("not-a-jwt"))
    status, text = proxy.admin_get("/stats")
    assert status == 200
    stats = dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)
    assert int(stats["http.ingress_http.jwt_authn.allowed"]) >= 1
    assert int(stats["http.ingress_http.jwt_authn.denied"]) >= 1


# -- remote_jwks ----------------------------------------------------------------------------------


class _JwksHandler(BaseHTTPRequestHandler):
    server: _JwksServer

    def do_GET(self) -> None:
        self.server.fetches += 1
        body = jwks().encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _JwksServer(ThreadingHTTPServer):
    daemon_threads = True
    fetches = 0


@contextlib.contextmanager
def jwks_server() -> Iterator[_JwksServer]:
    server = _JwksServer(("127.0.0.1", free_port()), _JwksHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_remote_jwks_are_fetched_then_tokens_checked_against_them(
    upstream: Upstream, tmp_path: Path
) -> None:
    with jwks_server() as keys:
        port = keys.server_address[1]
        remote = {
            "remote_jwks": {
                "http_uri": {
                    "uri": f"http://127.0.0.1:{port}/jwks",
                    "cluster": "jwks",
                    "timeout": "2s",
                },
                "cache_duration": "300s",
            }
        }
        config = bootstrap(
            clusters=[cluster("web", upstream.port), cluster("jwks", port)],
            http_filters=[jwt_filter(remote, allow_missing=False), ROUTER_FILTER],
        )
        proxy = launch_proxy(config, tmp_path)
        try:
            # Until the first fetch completes every token of the provider fails, as in Envoy.
            deadline = time.monotonic() + 20
            status = 0
            while time.monotonic() < deadline:
                status = http_request(proxy.port, "/hello", headers=bearer(token())).status
                if status == 200:
                    break
                assert status == 401
                time.sleep(0.1)
            assert status == 200
            assert keys.fetches >= 1
            bad = http_request(proxy.port, "/hello", headers=bearer(token(OTHER_KEY)))
            assert (bad.status, bad.text) == (401, "Jwt verification fails")
            missing = http_request(proxy.port, "/hello")
            assert (missing.status, missing.text) == (401, "Jwt is missing")
            realm = f"http://127.0.0.1:{proxy.port}/hello"
            assert missing.headers["www-authenticate"] == f'Bearer realm="{realm}"'
        finally:
            stop_proxy(proxy)
