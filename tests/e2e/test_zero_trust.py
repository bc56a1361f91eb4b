"""Zero trust on the demo mesh, end to end: automatic mutual TLS between sidecars with
certificates from the mesh's CA, PeerAuthentication, and AuthorizationPolicy, on Bookinfo
started with ``meshlet up -d`` (mTLS is on by default) from Istio's own sample files.

Istio's documentation these tests follow:
* istio.io/latest/docs/tasks/security/authentication/authn-policy/ (auto mTLS; STRICT mode
  refuses plaintext; PERMISSIVE, the default, accepts both),
* istio.io/latest/docs/tasks/security/authorization/authz-http/ (``allow-nothing`` denies
  everything with 403 ``RBAC: access denied``; ALLOW policies open paths for named service
  accounts, which the peers' certificates prove).
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.e2e.conftest import Mesh, start_mesh, wait_until
from tests.samples import SAMPLES

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(180),
    pytest.mark.skipif(SAMPLES is None, reason="Istio's sample files are not present"),
]

BOOKINFO = (SAMPLES or Path("/nonexistent")) / "bookinfo"
CURL = ["curl", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}"]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    cwd = tmp_path_factory.mktemp("zero-trust")
    mesh = start_mesh(
        cwd,
        BOOKINFO / "platform" / "kube" / "bookinfo.yaml",
        BOOKINFO / "networking" / "bookinfo-gateway.yaml",
        BOOKINFO / "networking" / "destination-rule-all.yaml",
    )
    try:
        yield mesh
    finally:
        mesh.down()


def write(mesh: Mesh, name: str, text: str) -> Path:
    path = mesh.cwd / name
    path.write_text(text)
    return path


def pod_ip(mesh: Mesh, prefix: str) -> str:
    [pod] = [p for p in mesh.pods() if p["metadata"]["name"].startswith(prefix)]
    return str(pod["status"]["podIP"])


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with opener.open(request, timeout=15) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def plaintext_to_sidecar(ip: str) -> int:
    """A request straight to a sidecar's inbound port, without TLS (curl's code; 0: refused)."""
    done = subprocess.run(
        [*CURL, "-H", "host: details:9080", f"http://{ip}:15006/details/0"],
        capture_output=True,
        text=True,
        timeout=15,
    )
    return int(done.stdout or 0)


def test_sidecars_talk_mutual_tls_with_spiffe_identities(mesh: Mesh) -> None:
    for _ in range(3):
        assert get(mesh.gateway + "/productpage")[0] == 200
    details = pod_ip(mesh, "details-v1")
    _, metrics = get(f"http://{details}:15000/stats/prometheus")
    inbound = [
        line
        for line in metrics.splitlines()
        if line.startswith("istio_requests_total{") and 'reporter="destination"' in line
    ]
    assert inbound, metrics[:2000]
    assert all('connection_security_policy="mutual_tls"' in line for line in inbound), inbound
    assert any(
        'source_principal="spiffe://cluster.local/ns/default/sa/bookinfo-productpage"' in line
        for line in inbound
    ), inbound


def test_strict_peer_authentication_refuses_plaintext(mesh: Mesh) -> None:
    details = pod_ip(mesh, "details-v1")
    assert plaintext_to_sidecar(details) == 200  # PERMISSIVE, the default: both accepted
    strict = write(
        mesh,
        "strict.yaml",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        "metadata: {name: default, namespace: istio-system}\n"
        "spec: {mtls: {mode: STRICT}}\n",
    )
    mesh.apply(strict)
    try:
        wait_until("plaintext refused", lambda: plaintext_to_sidecar(details) == 0, 30)
        status, page = get(mesh.gateway + "/productpage")
        assert status == 200 and "Book Details" in page  # the mesh itself is all mTLS
    finally:
        mesh.meshlet("delete", "-f", str(strict))
        mesh.applied.clear()
    wait_until("plaintext accepted again", lambda: plaintext_to_sidecar(details) == 200, 30)


def test_authorization_allows_only_what_policies_name(mesh: Mesh) -> None:
    allow_nothing = write(
        mesh,
        "allow-nothing.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: allow-nothing, namespace: default}\nspec: {}\n",
    )
    productpage = write(
        mesh,
        "productpage-viewer.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: productpage-viewer, namespace: default}\n"
        "spec:\n  selector: {matchLabels: {app: productpage}}\n  action: ALLOW\n"
        "  rules:\n  - to:\n    - operation: {methods: [GET]}\n",
    )
    details = write(
        mesh,
        "details-viewer.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: details-viewer, namespace: default}\n"
        "spec:\n  selector: {matchLabels: {app: details}}\n  action: ALLOW\n"
        "  rules:\n  - from:\n    - source:\n"
        '        principals: ["cluster.local/ns/default/sa/bookinfo-productpage"]\n'
        "    to:\n    - operation: {methods: [GET]}\n",
    )
    try:
        mesh.apply(allow_nothing)
        status, body = get(mesh.gateway + "/productpage")
        assert (status, body) == (403, "RBAC: access denied")
        mesh.apply(productpage)
        status, page = get(mesh.gateway + "/productpage")
        assert status == 200
        assert "Error fetching product details" in page  # details still allows nothing
        mesh.apply(details)
        status, page = get(mesh.gateway + "/productpage")
        assert status == 200 and "Error fetching product details" not in page
        # The principal is the peer's certificate: a plaintext caller has none.
        assert plaintext_to_sidecar(pod_ip(mesh, "details-v1")) == 403
    finally:
        for path in (details, productpage, allow_nothing):
            mesh.meshlet("delete", "-f", str(path), check=False)
        mesh.applied.clear()
    wait_until("open again", lambda: get(mesh.gateway + "/productpage")[0] == 200, 30)


def test_istios_mtls_destination_rules_with_strict_keep_bookinfo_working(mesh: Mesh) -> None:
    """istio.io "Mutual TLS Migration": ISTIO_MUTUAL destination rules and STRICT mode."""
    strict = write(
        mesh,
        "strict-all.yaml",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        "metadata: {name: default, namespace: istio-system}\n"
        "spec: {mtls: {mode: STRICT}}\n",
    )
    rules = BOOKINFO / "networking" / "destination-rule-all-mtls.yaml"
    try:
        mesh.apply(rules, strict)
        for _ in range(10):
            status, page = get(mesh.gateway + "/productpage")
            assert status == 200 and "Error fetching" not in page
        wait_until(
            "plaintext refused", lambda: plaintext_to_sidecar(pod_ip(mesh, "details")) == 0, 30
        )
    finally:
        mesh.meshlet("delete", "-f", str(strict), check=False)
        mesh.meshlet("apply", "-f", str(BOOKINFO / "networking" / "destination-rule-all.yaml"))
        mesh.applied.clear()


def test_denying_ratings_shows_its_error_text(mesh: Mesh) -> None:
    """istio.io authorization task on Bookinfo: ratings denied, reviews says so."""
    v3 = BOOKINFO / "networking" / "virtual-service-reviews-v3.yaml"
    deny = write(
        mesh,
        "deny-ratings.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: deny-ratings, namespace: default}\n"
        "spec:\n  selector: {matchLabels: {app: ratings}}\n  action: DENY\n  rules: [{}]\n",
    )
    try:
        mesh.apply(v3, deny)
        status, page = get(mesh.gateway + "/productpage")
        assert status == 200
        assert "Ratings service is currently unavailable" in page
    finally:
        for path in (deny, v3):
            mesh.meshlet("delete", "-f", str(path), check=False)
        mesh.applied.clear()


def test_end_user_authentication_with_jwt(mesh: Mesh) -> None:
    """istio.io "Authentication Policy" task, end-user authentication: an invalid token gets
    401, a missing one passes the RequestAuthentication, and an AuthorizationPolicy that
    requires a request principal then turns it away with 403."""
    key = ec.generate_private_key(ec.SECP256R1())
    public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    public.update(kid="e2e", alg="ES256")
    jwks = json.dumps({"keys": [public]})
    policy = write(
        mesh,
        "jwt.yaml",
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n"
        "metadata: {name: jwt, namespace: default}\n"
        "spec:\n  selector: {matchLabels: {app: productpage}}\n  jwtRules:\n"
        f"  - issuer: e2e@meshlet.dev\n    jwks: '{jwks}'\n"
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: require-jwt, namespace: default}\n"
        "spec:\n  selector: {matchLabels: {app: productpage}}\n  action: ALLOW\n"
        '  rules:\n  - from:\n    - source: {requestPrincipals: ["e2e@meshlet.dev/*"]}\n',
    )
    now = int(time.time())
    good = jwt.encode(
        {"iss": "e2e@meshlet.dev", "sub": "jason", "exp": now + 600},
        key,
        algorithm="ES256",
        headers={"kid": "e2e"},
    )
    other = ec.generate_private_key(ec.SECP256R1())
    bad = jwt.encode(
        {"iss": "e2e@meshlet.dev", "sub": "eve", "exp": now + 600},
        other,
        algorithm="ES256",
        headers={"kid": "e2e"},
    )
    try:
        mesh.apply(policy)
        assert get(mesh.gateway + "/productpage")[0] == 403
        bearer = {"Authorization": f"Bearer {bad}"}
        assert get(mesh.gateway + "/productpage", bearer) == (401, "Jwt verification fails")
        status, page = get(mesh.gateway + "/productpage", {"Authorization": f"Bearer {good}"})
        assert status == 200 and "Simple Bookstore App" in page
    finally:
        mesh.meshlet("delete", "-f", str(policy), check=False)
        mesh.applied.clear()
    wait_until("open again", lambda: get(mesh.gateway + "/productpage")[0] == 200, 30)
