"""The proxy's workload identity: its own key, a certificate for it from the mesh CA, and
rotation (istio-agent's secret manager and CA client).

The key is an ECDSA P-256 key made in this process's memory; it never leaves it. A CSR
carrying the SPIFFE URI SAN goes to the control plane's ``IstioCertificateService``
(``CreateCertificate``, gRPC over TLS, the server verified against the mesh root file), with
``authorization: Bearer <token>`` read from the pod's token file at each request (the runtime
refreshes it). The key and the returned chain go to a ``SecretSink`` -- the proxy's secret
store -- as SDS ``default`` and ``ROOTCA``. A new key and certificate are fetched at half the
certificate's lifetime, with up to 10% of jitter, so a fleet started together does not renew
together; new connections then use the new certificate and connections in flight keep theirs.

Enabled by node metadata (the runtime writes it into the bootstrap): ``CA_ADDRESS``
(``host:port``), ``CA_TOKEN_PATH``, ``CA_ROOT_PATH``, and optionally ``TRUST_DOMAIN`` and
``CA_SERVER_NAME``; identity is NAMESPACE and SERVICE_ACCOUNT. grpc, cryptography and the
Envoy protos are imported only when identity is enabled (the proxy's lean import path).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory, struct_pb2

log = logging.getLogger(__name__)

CREATE_CERTIFICATE = "/istio.v1.auth.IstioCertificateService/CreateCertificate"
DEFAULT_SERVER_NAME = "istiod.istio-system.svc"
ROTATE_AT = 0.5  # of the certificate's lifetime
JITTER = 0.1  # of the lifetime, at most, earlier
RETRY_MIN, RETRY_MAX = 0.5, 30.0  # seconds between failed requests (exponential backoff)


def certificate_messages() -> tuple[type[message.Message], type[message.Message]]:
    """Istio's ``IstioCertificateRequest``/``IstioCertificateResponse`` (``istio.v1.auth``),
    built from their descriptor (xds-protos does not ship them). Shared with the CA."""
    pool = descriptor_pool.Default()
    name = "security/v1alpha1/ca.proto"
    try:
        pool.FindFileByName(name)
    except KeyError:
        f = descriptor_pb2.FileDescriptorProto(
            name=name,
            package="istio.v1.auth",
            syntax="proto3",
            dependency=[struct_pb2.DESCRIPTOR.name],
        )
        fd = descriptor_pb2.FieldDescriptorProto
        req = f.message_type.add(name="IstioCertificateRequest")
        req.field.add(name="csr", number=1, type=fd.TYPE_STRING, label=fd.LABEL_OPTIONAL)
        req.field.add(
            name="validity_duration", number=2, type=fd.TYPE_INT64, label=fd.LABEL_OPTIONAL
        )
        req.field.add(
            name="metadata",
            number=3,
            type=fd.TYPE_MESSAGE,
            type_name=".google.protobuf.Struct",
            label=fd.LABEL_OPTIONAL,
        )
        resp = f.message_type.add(name="IstioCertificateResponse")
        resp.field.add(name="cert_chain", number=1, type=fd.TYPE_STRING, label=fd.LABEL_REPEATED)
        service = f.service.add(name="IstioCertificateService")
        service.method.add(
            name="CreateCertificate",
            input_type=".istio.v1.auth.IstioCertificateRequest",
            output_type=".istio.v1.auth.IstioCertificateResponse",
        )
        pool.Add(f)
    request = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("istio.v1.auth.IstioCertificateRequest")
    )
    response = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("istio.v1.auth.IstioCertificateResponse")
    )
    return request, response


class SecretSink(Protocol):
    """What identity needs of the proxy's secret store (``meshlet.proxy.secrets``)."""

    local_private_key: Any

    def set(self, name: str, secret: Any) -> None:
        """Install (or replace) secret ``name``; new connections use it."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class IdentityOptions:
    ca_address: str
    token_path: Path
    root_path: Path
    namespace: str
    service_account: str
    trust_domain: str = "cluster.local"
    server_name: str = DEFAULT_SERVER_NAME
    ttl: int = 0  # seconds asked for; 0: the CA's default

    @property
    def spiffe_id(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @classmethod
    def from_node_metadata(cls, metadata: Mapping[str, Any]) -> IdentityOptions | None:
        """From a bootstrap's node metadata; None when it does not ask for identity."""

        def text(key: str, default: str = "") -> str:
            value = metadata.get(key)
            return value if isinstance(value, str) and value else default

        address = text("CA_ADDRESS")
        if not address:
            return None
        return cls(
            ca_address=address,
            token_path=Path(text("CA_TOKEN_PATH")),
            root_path=Path(text("CA_ROOT_PATH")),
            namespace=text("NAMESPACE", "default"),
            service_account=text("SERVICE_ACCOUNT", "default"),
            trust_domain=text("TRUST_DOMAIN", "cluster.local"),
            server_name=text("CA_SERVER_NAME", DEFAULT_SERVER_NAME),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadCertificate:
    """A key (PEM, PKCS#8) and its chain (PEM, leaf first), the root, and the leaf's validity."""

    key_pem: bytes
    chain_pem: bytes
    root_pem: bytes
    not_before: float
    not_after: float

    def __repr__(self) -> str:
        return f"<WorkloadCertificate valid until {self.not_after:.0f}>"


def make_csr(spiffe_id: str) -> tuple[bytes, bytes]:
    """A new ECDSA P-256 key and a CSR for it with ``spiffe_id`` as URI SAN (PEM both)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def rotation_delay(
    not_before: float, not_after: float, now: float, rng: random.Random | None = None
) -> float:
    """Seconds until renewal: at half the lifetime, minus up to 10% of it (jitter); never
    negative."""
    lifetime = max(0.0, not_after - not_before)
    jitter = (rng or random).uniform(0.0, JITTER * lifetime)
    return max(0.0, not_before + ROTATE_AT * lifetime - jitter - now)


async def request_certificate(
    options: IdentityOptions, *, csr_pem: bytes | None = None, key_pem: bytes | None = None
) -> WorkloadCertificate:
    """One CSR round trip. ``csr_pem``/``key_pem``: use these instead of a new key (tests).
    Raises ``grpc.aio.AioRpcError`` when the CA refuses or cannot be reached."""
    import grpc  # type: ignore[import-untyped,unused-ignore]
    import grpc.aio  # type: ignore[import-untyped,unused-ignore]
    from cryptography import x509

    if csr_pem is None or key_pem is None:
        key_pem, csr_pem = make_csr(options.spiffe_id)
    root = options.root_path.read_bytes()
    token = options.token_path.read_text().strip()
    request_class, response_class = certificate_messages()
    request = request_class(csr=csr_pem.decode(), validity_duration=options.ttl)
    request.metadata.update({"NAMESPACE": options.namespace})  # type: ignore[attr-defined]
    credentials = grpc.ssl_channel_credentials(root_certificates=root)
    channel_options = (("grpc.ssl_target_name_override", options.server_name),)
    async with grpc.aio.secure_channel(
        options.ca_address, credentials, options=channel_options
    ) as channel:
        call = channel.unary_unary(
            CREATE_CERTIFICATE,
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        response = await call(
            request, metadata=(("authorization", f"Bearer {token}"),), timeout=10.0
        )
    chain = list(response.cert_chain)
    if not chain:
        raise ValueError("the CA answered with an empty certificate chain")
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    return WorkloadCertificate(
        key_pem=key_pem,
        chain_pem="".join(chain[:-1] if len(chain) > 1 else chain).encode(),
        root_pem=root,
        not_before=leaf.not_valid_before_utc.timestamp(),
        not_after=leaf.not_valid_after_utc.timestamp(),
    )


def install(sink: SecretSink, cert: WorkloadCertificate) -> None:
    """Hand a certificate to the proxy's secret store as Istio's SDS secrets: ``default``
    (chain and key) and ``ROOTCA`` (the trust bundle). The local key is set first, so a
    chain-only ``default`` arriving over SDS is completed with the same key."""
    from meshlet.proxy.secrets import TlsCertificate, ValidationContext

    sink.local_private_key = cert.key_pem
    sink.set("default", TlsCertificate(cert_chain_pem=cert.chain_pem, private_key_pem=cert.key_pem))
    sink.set("ROOTCA", ValidationContext(trusted_ca_pem=cert.root_pem))


class IdentityAgent:
    """Keeps a proxy's certificate fresh: fetch, install, sleep to half-life, again."""

    def __init__(
        self,
        options: IdentityOptions,
        on_certificate: Callable[[WorkloadCertificate], None],
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.options = options
        self.on_certificate = on_certificate
        self.rng = rng or random.Random()
        self.clock = clock
        self.current: WorkloadCertificate | None = None
        self.ready = asyncio.Event()

    def __repr__(self) -> str:
        return f"<IdentityAgent {self.options.spiffe_id} {self.current!r}>"

    async def run(self) -> None:
        """Forever (until cancelled): renew at half-life, retry with backoff on failure."""
        failures = 0
        while True:
            try:
                cert = await request_certificate(self.options)
            except Exception as e:
                failures += 1
                delay = min(RETRY_MAX, RETRY_MIN * 2 ** (failures - 1))
                log.warning("certificate request failed (retry in %.1fs): %s", delay, e)
                await asyncio.sleep(delay * self.rng.uniform(0.8, 1.2))
                continue
            failures = 0
            self.current = cert
            self.on_certificate(cert)
            self.ready.set()
            delay = rotation_delay(cert.not_before, cert.not_after, self.clock(), self.rng)
            log.info("certificate for %s valid until %.0f", self.options.spiffe_id, cert.not_after)
            await asyncio.sleep(delay)


__all__ = [
    "CREATE_CERTIFICATE",
    "IdentityAgent",
    "IdentityOptions",
    "SecretSink",
    "WorkloadCertificate",
    "certificate_messages",
    "install",
    "make_csr",
    "request_certificate",
    "rotation_delay",
]
