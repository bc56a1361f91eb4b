"""The mesh's certificate authority: a root it keeps, and workload certificates it signs for
identities a caller has proved (istiod's Citadel, ``security/pkg/pki/ca``).

Two ways to get the signing key, as Istio has:

* **Self-signed** (the default): on first start an ECDSA P-256 root valid 10 years is made in
  ``<state dir>/ca/`` and kept there; later starts load it.
* **Plugged in** (``--ca-dir DIR``): Istio's ``cacerts`` layout -- ``ca-cert.pem`` (the
  signing certificate), ``ca-key.pem`` (its key), ``root-cert.pem`` (the root) and
  ``cert-chain.pem`` (the signing certificate up to the root).

The self-signed CA writes the same four files, so either way the signer is
``ca-cert.pem``/``ca-key.pem``. The directory is 0700 and every file 0600.

A workload certificate (``sign``) has no subject, one critical URI SAN
``spiffe://<trust domain>/ns/<namespace>/sa/<service account>``, key usage
digitalSignature + keyEncipherment, extended key usage serverAuth + clientAuth, and lives
24 hours unless asked otherwise. It is signed only for the identity the caller proved
(``BootstrapTokens`` in the embedded runtime); a CSR that asks for any other SAN is refused.
The chain returned is Istio's: the leaf, then ``cert-chain.pem``, ending with the root.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshlet.errors import MeshletError

DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_WORKLOAD_CERT_TTL = 24 * 3600.0  # seconds (Istio's DEFAULT_WORKLOAD_CERT_TTL)
MAX_WORKLOAD_CERT_TTL = 90 * 24 * 3600.0  # Istio's MAX_WORKLOAD_CERT_TTL
ROOT_TTL = 10 * 365 * 24 * 3600.0
CA_DIR_NAME = "ca"
TOKEN_KEY_FILE = "bootstrap-token.key"
DEFAULT_TOKEN_TTL = 3600.0  # as Kubernetes' projected service account tokens
_CLOCK_SKEW = 60.0  # certificates start a minute early, for clocks slightly behind

CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
ROOT_CERT = "root-cert.pem"
CERT_CHAIN = "cert-chain.pem"


class CaError(MeshletError):
    """The CA cannot start: its directory or files are missing, unreadable or inconsistent."""


class CsrRefused(MeshletError):
    """A certificate signing request the CA will not sign; ``reason`` is a metric label."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class AuthenticationFailed(MeshletError):
    """A caller's proof of identity (a bootstrap token) is missing, forged or expired."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Identity:
    """A workload identity: namespace and service account in a trust domain (SPIFFE)."""

    namespace: str
    service_account: str
    trust_domain: str = DEFAULT_TRUST_DOMAIN

    @property
    def spiffe_id(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @classmethod
    def parse(cls, uri: str) -> Identity:
        """Read ``spiffe://<td>/ns/<ns>/sa/<sa>``; raises ValueError for anything else."""
        prefix = "spiffe://"
        if not uri.startswith(prefix):
            raise ValueError(f"{uri!r} is not a spiffe:// URI")
        domain, _, path = uri[len(prefix) :].partition("/")
        parts = path.split("/")
        if not domain or len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
            raise ValueError(f"{uri!r} is not spiffe://<trust domain>/ns/<ns>/sa/<sa>")
        if not parts[1] or not parts[3]:
            raise ValueError(f"{uri!r} has an empty namespace or service account")
        return cls(namespace=parts[1], service_account=parts[3], trust_domain=domain)

    def __str__(self) -> str:
        return self.spiffe_id


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file only its owner can read (0600 from its creation on)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _utc(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)


def _pem_certs(data: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(data) if data.strip() else []


class CertificateAuthority:
    """Signs workload certificates with ``ca-cert.pem``/``ca-key.pem``.

    ``load_or_create(state_dir)`` for the self-signed CA, ``from_dir(path)`` for a plugged-in
    one. ``sign`` is pure CPU (about a millisecond): callers on an event loop may call it
    inline.
    """

    def __init__(
        self,
        *,
        signer_cert: x509.Certificate,
        signer_key: ec.EllipticCurvePrivateKey,
        root_cert: x509.Certificate,
        chain: list[x509.Certificate],
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        default_ttl: float = DEFAULT_WORKLOAD_CERT_TTL,
        max_ttl: float = MAX_WORKLOAD_CERT_TTL,
        directory: Path | None = None,
    ) -> None:
        self.signer_cert = signer_cert
        self.signer_key = signer_key
        self.root_cert = root_cert
        self.trust_domain = trust_domain
        self.default_ttl = default_ttl
        self.max_ttl = max(max_ttl, default_ttl)
        self.directory = directory
        # Istio's response: leaf, then cert-chain.pem, ending with the root.
        tail = list(chain) or [signer_cert]
        if tail[-1] != root_cert:
            tail.append(root_cert)
        self._tail_pem = [c.public_bytes(serialization.Encoding.PEM).decode() for c in tail]
        self.root_pem = root_cert.public_bytes(serialization.Encoding.PEM).decode()

    def __repr__(self) -> str:
        subject = self.signer_cert.subject.rfc4514_string()
        return f"<CertificateAuthority {subject!r} trust_domain={self.trust_domain!r}>"

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def load_or_create(
        cls, state_dir: Path, *, trust_domain: str = DEFAULT_TRUST_DOMAIN, **kwargs: float
    ) -> CertificateAuthority:
        """The self-signed CA in ``<state_dir>/ca/``, created on first use."""
        directory = state_dir / CA_DIR_NAME
        if not (directory / CA_KEY).exists():
            create_root(directory, trust_domain=trust_domain)
        return cls.from_dir(directory, trust_domain=trust_domain, **kwargs)

    @classmethod
    def from_dir(
        cls, directory: Path, *, trust_domain: str = DEFAULT_TRUST_DOMAIN, **kwargs: float
    ) -> CertificateAuthority:
        """A CA in Istio's ``cacerts`` layout. Raises ``CaError`` naming what is wrong."""
        try:
            signer_pem = (directory / CA_CERT).read_bytes()
            key_pem = (directory / CA_KEY).read_bytes()
            root_pem = (directory / ROOT_CERT).read_bytes()
            chain_path = directory / CERT_CHAIN
            chain_pem = chain_path.read_bytes() if chain_path.exists() else b""
        except OSError as e:
            raise CaError(
                f"CA directory {directory}: {e.strerror or e}: {e.filename}"
                f" (expected {CA_CERT}, {CA_KEY}, {ROOT_CERT} and {CERT_CHAIN})"
            ) from e
        try:
            signer = x509.load_pem_x509_certificate(signer_pem)
            key = serialization.load_pem_private_key(key_pem, password=None)
            root = x509.load_pem_x509_certificate(root_pem)
            chain = _pem_certs(chain_pem)
        except ValueError as e:
            raise CaError(f"CA directory {directory}: not PEM: {e}") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CaError(f"{directory / CA_KEY}: meshlet's CA signs with ECDSA keys only")
        if key.public_key().public_numbers() != signer.public_key().public_numbers():  # type: ignore[union-attr]
            raise CaError(f"{directory / CA_KEY} is not the key of {directory / CA_CERT}")
        return cls(
            signer_cert=signer,
            signer_key=key,
            root_cert=root,
            chain=chain,
            trust_domain=trust_domain,
            directory=directory,
            **kwargs,
        )

    # -- signing --------------------------------------------------------------------------

    def sign(
        self, csr_pem: bytes | str, identity: Identity, ttl: float = 0.0, *, now: float = 0.0
    ) -> list[str]:
        """A certificate for ``identity`` (which the caller proved) over the CSR's key; the
        chain as PEM strings, leaf first, root last.

        ``ttl`` 0 means the default lifetime. Raises ``CsrRefused`` for a malformed CSR, a bad
        signature, a SAN other than ``identity``'s, another trust domain, or a ttl above the
        maximum.
        """
        if identity.trust_domain != self.trust_domain:
            raise CsrRefused(
                f"identity {identity} is not in trust domain {self.trust_domain}",
                reason="trust_domain",
            )
        data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
        try:
            csr = x509.load_pem_x509_csr(data)
        except ValueError as e:
            raise CsrRefused(f"CSR is not a PEM certificate request: {e}", reason="parse") from e
        if not csr.is_signature_valid:
            raise CsrRefused("CSR signature does not verify", reason="signature")
        requested = _requested_sans(csr)
        if requested and requested != [identity.spiffe_id]:
            raise CsrRefused(
                f"CSR asks for {', '.join(requested)}; the caller proved {identity}",
                reason="identity_mismatch",
            )
        if ttl < 0 or ttl > self.max_ttl:
            raise CsrRefused(
                f"requested lifetime {ttl:g}s is above the maximum {self.max_ttl:g}s",
                reason="ttl",
            )
        lifetime = ttl or self.default_ttl
        start = now or time.time()
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise CsrRefused("CSR key must be ECDSA or RSA", reason="key")
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.signer_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(_utc(start - _CLOCK_SKEW))
            .not_valid_after(_utc(start + lifetime))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.spiffe_id)]),
                critical=True,  # the subject is empty (RFC 5280 4.2.1.6)
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_encipherment=True,
                    content_commitment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.signer_key.public_key()),
                critical=False,
            )
        )
        cert = builder.sign(self.signer_key, hashes.SHA256())
        return [cert.public_bytes(serialization.Encoding.PEM).decode(), *self._tail_pem]

    def issue_server_certificate(
        self, dns_names: list[str], ips: list[str], ttl: float = 365 * 24 * 3600.0
    ) -> tuple[str, str]:
        """A serving certificate and key (PEM chain, PEM key) for the control plane itself
        (istiod's ``istiod.istio-system.svc``). The key is made here: it never leaves this
        process."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = time.time()
        names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        names.extend(x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshlet")]))
            .issuer_name(self.signer_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_utc(now - _CLOCK_SKEW))
            .not_valid_after(_utc(now + ttl))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.signer_key, hashes.SHA256())
        )
        chain = cert.public_bytes(serialization.Encoding.PEM).decode() + "".join(
            p for p in self._tail_pem if p != self.root_pem
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        return chain, key_pem


def _requested_sans(csr: x509.CertificateSigningRequest) -> list[str]:
    """Every SAN a CSR asks for, URIs as written, others as ``dns:``/``ip:``/``email:``."""
    try:
        ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    out: list[str] = []
    for name in ext.value:
        if isinstance(name, x509.UniformResourceIdentifier):
            out.append(name.value)
        elif isinstance(name, x509.DNSName):
            out.append(f"dns:{name.value}")
        elif isinstance(name, x509.IPAddress):
            out.append(f"ip:{name.value}")
        else:
            out.append(f"{type(name).__name__}:{name.value}")
    return out


def create_root(directory: Path, *, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> None:
    """Make a self-signed ECDSA P-256 root valid 10 years, in the ``cacerts`` layout
    (istiod's self-signed CA: organisation = trust domain)."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, "meshlet root CA"),
        ]
    )
    now = time.time()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(now - _CLOCK_SKEW))
        .not_valid_after(_utc(now + ROOT_TTL))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=False,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    for name_ in (CA_CERT, ROOT_CERT, CERT_CHAIN):
        _write_private(directory / name_, cert_pem)
    _write_private(directory / CA_KEY, key_pem)  # last: its presence means "created"


# -- bootstrap tokens --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenClaims:
    """What a bootstrap token proves: a pod of a namespace running as a service account."""

    namespace: str
    service_account: str
    pod: str
    expires: float

    def identity(self, trust_domain: str) -> Identity:
        return Identity(
            namespace=self.namespace,
            service_account=self.service_account,
            trust_domain=trust_domain,
        )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class BootstrapTokens:
    """Short-lived tokens the embedded runtime gives each pod, bound to its namespace,
    service account and pod: ``<base64url claims>.<base64url HMAC-SHA256>``, keyed with a
    secret in ``<state dir>/ca/bootstrap-token.key`` (0600). The runtime and the control
    plane share the state directory, hence the key; nothing else can mint one.
    """

    PREFIX = "mlt1"

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise CaError("bootstrap token key must be at least 32 bytes")
        self._key = key

    def __repr__(self) -> str:
        return "<BootstrapTokens>"

    @classmethod
    def load_or_create(cls, state_dir: Path) -> BootstrapTokens:
        directory = state_dir / CA_DIR_NAME
        path = directory / TOKEN_KEY_FILE
        if not path.exists():
            directory.mkdir(parents=True, exist_ok=True)
            os.chmod(directory, 0o700)
            _write_private(path, secrets.token_bytes(32))
        return cls(path.read_bytes())

    def issue(
        self,
        *,
        namespace: str,
        service_account: str,
        pod: str,
        ttl: float = DEFAULT_TOKEN_TTL,
        now: float = 0.0,
    ) -> str:
        claims = {
            "ns": namespace,
            "sa": service_account,
            "pod": pod,
            "exp": int((now or time.time()) + ttl),
        }
        body = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
        signed = f"{self.PREFIX}.{body}"
        mac = hmac.new(self._key, signed.encode(), hashlib.sha256).digest()
        return f"{signed}.{_b64(mac)}"

    def verify(self, token: str, *, now: float = 0.0) -> TokenClaims:
        """The token's claims; raises ``AuthenticationFailed`` if forged, malformed or
        expired."""
        prefix, _, rest = token.strip().partition(".")
        body, _, mac_text = rest.partition(".")
        if prefix != self.PREFIX or not body or not mac_text:
            raise AuthenticationFailed("not a meshlet bootstrap token")
        expected = hmac.new(self._key, f"{prefix}.{body}".encode(), hashlib.sha256).digest()
        try:
            mac = _unb64(mac_text)
            claims = json.loads(_unb64(body))
        except (ValueError, TypeError) as e:
            raise AuthenticationFailed("malformed bootstrap token") from e
        if not hmac.compare_digest(mac, expected):
            raise AuthenticationFailed("bootstrap token signature does not verify")
        try:
            result = TokenClaims(
                namespace=str(claims["ns"]),
                service_account=str(claims["sa"]),
                pod=str(claims["pod"]),
                expires=float(claims["exp"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise AuthenticationFailed("bootstrap token lacks ns, sa, pod or exp") from e
        if result.expires < (now or time.time()):
            raise AuthenticationFailed("bootstrap token has expired")
        return result


def write_token_file(path: Path, token: str) -> None:
    """Write a pod's token where only the pod's processes (this user) can read it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_private(path, token.encode())


__all__ = [
    "CA_CERT",
    "CA_KEY",
    "CERT_CHAIN",
    "DEFAULT_TRUST_DOMAIN",
    "DEFAULT_WORKLOAD_CERT_TTL",
    "ROOT_CERT",
    "AuthenticationFailed",
    "BootstrapTokens",
    "CaError",
    "CertificateAuthority",
    "CsrRefused",
    "Identity",
    "TokenClaims",
    "create_root",
    "write_token_file",
]
