"""The CA without sockets: root creation, signing, refusals, tokens, Istio's cacerts layout."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from cryptography import x509

from meshlet.api.security import PeerAuthenticationSpec
from meshlet.control.ca import (
    AuthenticationFailed,
    BootstrapTokens,
    CertificateAuthority,
    CsrRefused,
    Identity,
)
from meshlet.control.translate.peer_authn import PeerAuthnConfig, workload_mode
from meshlet.proxy.identity import make_csr, rotation_delay

REVIEWS = Identity(namespace="default", service_account="reviews")


def test_first_start_creates_a_p256_root_readable_by_its_owner_only(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path)
    directory = tmp_path / "ca"
    assert directory.stat().st_mode & 0o777 == 0o700
    for name in ("ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem"):
        assert (directory / name).stat().st_mode & 0o777 == 0o600
    root = ca.root_cert
    assert root.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    lifetime = root.not_valid_after_utc - root.not_valid_before_utc
    assert 3649 <= lifetime.days <= 3651
    again = CertificateAuthority.load_or_create(tmp_path)  # a second start loads it
    assert again.root_pem == ca.root_pem


def test_a_signed_certificate_carries_the_spiffe_uri_and_the_lifetime(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path)
    _, csr = make_csr(REVIEWS.spiffe_id)
    now = time.time()
    chain = ca.sign(csr, REVIEWS, now=now)
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local/ns/default/sa/reviews"
    ]
    assert abs(leaf.not_valid_after_utc.timestamp() - (now + 24 * 3600)) < 2  # 24 h default
    assert chain[-1] == ca.root_pem
    leaf.verify_directly_issued_by(ca.root_cert)
    short = x509.load_pem_x509_certificate(ca.sign(csr, REVIEWS, 5, now=now)[0].encode())
    assert abs(short.not_valid_after_utc.timestamp() - (now + 5)) < 2


def test_a_csr_for_another_identity_than_the_proven_one_is_refused(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path)
    _, csr = make_csr("spiffe://cluster.local/ns/default/sa/ratings")
    with pytest.raises(CsrRefused) as refused:
        ca.sign(csr, REVIEWS)
    assert refused.value.reason == "identity_mismatch"


def test_tokens_bind_namespace_account_and_pod_and_expire(tmp_path: Path) -> None:
    tokens = BootstrapTokens.load_or_create(tmp_path)
    assert (tmp_path / "ca" / "bootstrap-token.key").stat().st_mode & 0o777 == 0o600
    token = tokens.issue(namespace="default", service_account="reviews", pod="r-1", ttl=60)
    claims = tokens.verify(token)
    assert (claims.namespace, claims.service_account, claims.pod) == ("default", "reviews", "r-1")
    with pytest.raises(AuthenticationFailed):
        tokens.verify(token, now=time.time() + 120)
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    with pytest.raises(AuthenticationFailed):
        tokens.verify(forged)
    with pytest.raises(AuthenticationFailed):
        BootstrapTokens(b"k" * 32).verify(token)  # another mesh's key


def test_a_ca_dir_in_istios_cacerts_layout_is_used_as_it_is(tmp_path: Path) -> None:
    made = CertificateAuthority.load_or_create(tmp_path / "made")
    cacerts = tmp_path / "cacerts"
    shutil.copytree(tmp_path / "made" / "ca", cacerts)
    ca = CertificateAuthority.from_dir(cacerts, trust_domain="example.org")
    assert ca.root_pem == made.root_pem
    identity = Identity(namespace="ns", service_account="sa", trust_domain="example.org")
    _, csr = make_csr(identity.spiffe_id)
    leaf = x509.load_pem_x509_certificate(ca.sign(csr, identity)[0].encode())
    leaf.verify_directly_issued_by(made.root_cert)


def test_rotation_comes_at_half_life_minus_at_most_ten_percent() -> None:
    delays = [rotation_delay(1000.0, 1100.0, 1000.0) for _ in range(200)]
    assert all(40.0 <= d <= 50.0 for d in delays)


def _pa(name: str, namespace: str, spec: dict[str, object], creation: str = "") -> PeerAuthnConfig:
    return PeerAuthnConfig(
        name=name,
        namespace=namespace,
        spec=PeerAuthenticationSpec.model_validate(spec),
        creation=creation,
    )


def test_peer_authentication_precedence_workload_over_namespace_over_mesh() -> None:
    """https://istio.io/latest/docs/concepts/security/#peer-authentication: the narrowest
    policy wins -- workload, then namespace, then mesh (root namespace); UNSET inherits;
    PERMISSIVE when nothing is set; portLevelMtls overrides for its port."""
    mesh = _pa("default", "istio-system", {"mtls": {"mode": "STRICT"}})
    ns = _pa("default", "foo", {"mtls": {"mode": "PERMISSIVE"}})
    wl = _pa(
        "app",
        "foo",
        {
            "selector": {"matchLabels": {"app": "reviews"}},
            "mtls": {"mode": "UNSET"},
            "portLevelMtls": {"8080": {"mode": "DISABLE"}},
        },
    )
    reviews = {"app": "reviews"}
    assert workload_mode([], namespace="foo", labels=reviews).value == "PERMISSIVE"
    assert workload_mode([mesh], namespace="foo", labels=reviews).value == "STRICT"
    assert workload_mode([mesh, ns], namespace="foo", labels=reviews).value == "PERMISSIVE"
    assert workload_mode([mesh, ns, wl], namespace="foo", labels=reviews).value == "PERMISSIVE"
    assert (
        workload_mode([mesh, ns, wl], namespace="foo", labels=reviews, port=8080).value == "DISABLE"
    )
    assert workload_mode([mesh, wl], namespace="bar", labels=reviews).value == "STRICT"
