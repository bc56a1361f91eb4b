"""The CA's gRPC face: Istio's ``IstioCertificateService`` on the control plane's TLS ports,
and ADS over mTLS beside it.

Wire protocol (``istio/api`` ``security/v1alpha1/ca.proto``, package ``istio.v1.auth``)::

    rpc CreateCertificate(IstioCertificateRequest) returns (IstioCertificateResponse)
    message IstioCertificateRequest  { string csr = 1; int64 validity_duration = 2;
                                       google.protobuf.Struct metadata = 3; }
    message IstioCertificateResponse { repeated string cert_chain = 1; }

xds-protos does not ship these, so the messages are built at import from a
``FileDescriptorProto`` (``meshlet.proxy.identity.certificate_messages``): real protobuf
on the wire, which Istio's agent could call as well.
The caller proves who it is with ``authorization: Bearer <token>`` metadata (a
``BootstrapTokens`` token the runtime gave its pod); the certificate is for that identity only.

Ports (both served by one grpc.aio server):

* ``--ca-address`` (``127.0.0.1:15012``): TLS with the control plane's own certificate (SANs
  ``istiod.istio-system.svc`` and the address), no client certificate: ``CreateCertificate``.
  A proxy has no certificate before its first CSR, and gRPC Python can only *require* client
  certificates or not ask for them (no "verify if given"), so this port does not ask.
* ``--xds-tls-address`` (``127.0.0.1:15011``, Istio's former mTLS xDS port): mTLS, a client
  certificate from this CA required: ADS (each stream must be the identity its certificate
  proves) and ``CreateCertificate``.

Metrics, under Citadel's names: ``citadel_server_csr_count``,
``citadel_server_authentication_failure_count``, ``citadel_server_csr_parsing_err_count``,
``citadel_server_csr_sign_err_count{reason}``, ``citadel_server_success_cert_issuance_count``,
``citadel_server_root_cert_expiry_timestamp``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import grpc  # type: ignore[import-untyped,unused-ignore]
import grpc.aio  # type: ignore[import-untyped,unused-ignore]
from cryptography import x509
from google.protobuf import any_pb2, json_format

from meshlet.control.ca import (
    AuthenticationFailed,
    BootstrapTokens,
    CertificateAuthority,
    CsrRefused,
    Identity,
)
from meshlet.control.translate.secrets import build_secrets
from meshlet.control.xds.connection import RequestError
from meshlet.control.xds.generator import SECRET_TYPE, GeneratedResources, ProxyInfo
from meshlet.control.xds.server import AdsServer, XdsServerError
from meshlet.proxy.identity import certificate_messages

log = logging.getLogger(__name__)

DEFAULT_CA_ADDRESS = "127.0.0.1:15012"
DEFAULT_XDS_TLS_ADDRESS = "127.0.0.1:15011"
SERVICE = "istio.v1.auth.IstioCertificateService"
CREATE_CERTIFICATE = f"/{SERVICE}/CreateCertificate"
CONTROL_PLANE_SANS = ("istiod.istio-system.svc", "istiod.istio-system.svc.cluster.local")

_SERVER_OPTIONS = (("grpc.so_reuseport", 0),)


# One descriptor for both ends (the proxy's identity client builds the same messages).
IstioCertificateRequest, IstioCertificateResponse = certificate_messages()


def peer_spiffe_id(auth_context: dict[str, list[bytes]]) -> str:
    """The URI SAN of a verified client certificate in a gRPC auth context, else empty."""
    pems = auth_context.get("x509_pem_cert") or []
    if not pems:
        return ""
    cert = x509.load_pem_x509_certificate(pems[0])
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ""
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else ""


class CaMetrics:
    """Citadel's counters, rendered as Prometheus text."""

    def __init__(self) -> None:
        self.csr = 0
        self.authentication_failures = 0
        self.parsing_errors = 0
        self.sign_errors: Counter[str] = Counter()
        self.issued = 0
        self.root_expiry = 0.0

    def render(self) -> str:
        lines = [
            "# TYPE citadel_server_csr_count counter",
            f"citadel_server_csr_count {self.csr}",
            "# TYPE citadel_server_authentication_failure_count counter",
            f"citadel_server_authentication_failure_count {self.authentication_failures}",
            "# TYPE citadel_server_csr_parsing_err_count counter",
            f"citadel_server_csr_parsing_err_count {self.parsing_errors}",
            "# TYPE citadel_server_csr_sign_err_count counter",
            *(
                f'citadel_server_csr_sign_err_count{{reason="{r}"}} {n}'
                for r, n in sorted(self.sign_errors.items())
            ),
            "# TYPE citadel_server_success_cert_issuance_count counter",
            f"citadel_server_success_cert_issuance_count {self.issued}",
            "# TYPE citadel_server_root_cert_expiry_timestamp gauge",
            f"citadel_server_root_cert_expiry_timestamp {self.root_expiry:.0f}",
        ]
        return "\n".join(lines) + "\n"


class CertificateService:
    """``CreateCertificate``'s decisions, without gRPC: authenticate, sign, count, remember.

    The last chain issued to each pod (``issued``) is what ADS serves that pod as SDS
    ``default``; ``on_issued`` is called after each issuance (the control plane pushes).
    """

    def __init__(
        self,
        ca: CertificateAuthority,
        tokens: BootstrapTokens,
        *,
        on_issued: Callable[[], None] = lambda: None,
    ) -> None:
        self.ca = ca
        self.tokens = tokens
        self.metrics = CaMetrics()
        self.metrics.root_expiry = ca.root_cert.not_valid_after_utc.timestamp()
        self.issued: dict[tuple[str, str], tuple[Identity, tuple[str, ...]]] = {}
        self.on_issued = on_issued

    def __repr__(self) -> str:
        return f"<CertificateService {self.ca!r} [{len(self.issued)} pods]>"

    def create_certificate(
        self, *, authorization: str, csr: str, validity: int, peer: str = ""
    ) -> list[str]:
        """The chain for the caller's CSR. Raises ``AuthenticationFailed`` or ``CsrRefused``."""
        self.metrics.csr += 1
        token = authorization.removeprefix("Bearer ").strip() if authorization else ""
        pod = ""
        try:
            if token:
                claims = self.tokens.verify(token)
                identity = claims.identity(self.ca.trust_domain)
                pod = claims.pod
            elif peer:  # renewal over mTLS: the client certificate proves the identity
                identity = Identity.parse(peer)
            else:
                raise AuthenticationFailed(
                    "no credential: send `authorization: Bearer <token>` metadata"
                )
        except (AuthenticationFailed, ValueError) as e:
            self.metrics.authentication_failures += 1
            raise AuthenticationFailed(str(e)) from e
        try:
            chain = self.ca.sign(csr, identity, float(validity))
        except CsrRefused as e:
            if e.reason == "parse":
                self.metrics.parsing_errors += 1
            else:
                self.metrics.sign_errors[e.reason] += 1
            log.warning("CSR from %s (pod %s) refused: %s", identity, pod or "?", e)
            raise
        self.metrics.issued += 1
        if pod:
            self.issued[(identity.namespace, pod)] = (identity, tuple(chain))
            self.on_issued()
        log.info("issued a certificate for %s (pod %s)", identity, pod or "?")
        return chain

    # -- SDS over ADS ---------------------------------------------------------------------

    def generate(
        self, proxy: ProxyInfo, type_url: str, names: Sequence[str] | None
    ) -> GeneratedResources:
        """``ROOTCA`` for every proxy; ``default`` (the chain, no key) only on a stream whose
        client certificate proves the pod's identity (ADS over mTLS)."""
        chain: tuple[str, ...] = ()
        found = self.issued.get((proxy.namespace, proxy.pod))
        if found is not None and proxy.peer_identity == found[0].spiffe_id:
            chain = found[1]
        resources: dict[str, any_pb2.Any] = {}
        for secret in build_secrets(chain, self.ca.root_pem):
            if names is None or secret.name in names:
                packed = any_pb2.Any()
                packed.Pack(secret)
                resources[secret.name] = packed
        return GeneratedResources(version="", resources=resources)


class CaServer:
    """``CertificateService`` over gRPC on the TLS ports, and ``ads`` over mTLS beside it."""

    def __init__(
        self,
        service: CertificateService,
        ca_address: str = DEFAULT_CA_ADDRESS,
        *,
        xds_tls_address: str = DEFAULT_XDS_TLS_ADDRESS,
        ads: AdsServer | None = None,
    ) -> None:
        self.service = service
        self.ca_address = ca_address
        self.xds_tls_address = xds_tls_address
        self.ads = ads
        self._server: Any = None
        self.ports: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<CaServer {self.bound_address} mtls={self.bound_xds_tls_address}>"

    @property
    def bound_address(self) -> str:
        return f"{self.ca_address.rsplit(':', 1)[0]}:{self.ports.get('ca', 0)}"

    @property
    def bound_xds_tls_address(self) -> str:
        return f"{self.xds_tls_address.rsplit(':', 1)[0]}:{self.ports.get('xds', 0)}"

    async def start(self) -> None:
        ca = self.service.ca
        hosts = {a.rsplit(":", 1)[0].strip("[]") for a in (self.ca_address, self.xds_tls_address)}
        ips = [h for h in hosts if _is_ip(h)]
        dns = [*CONTROL_PLANE_SANS, "localhost", *(h for h in hosts if not _is_ip(h))]
        chain, key = ca.issue_server_certificate(dns, ips)
        pair = [(key.encode(), chain.encode())]
        root = ca.root_pem.encode()
        server = grpc.aio.server(options=_SERVER_OPTIONS)
        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "CreateCertificate": grpc.unary_unary_rpc_method_handler(
                    self._create_certificate,
                    request_deserializer=IstioCertificateRequest.FromString,
                    response_serializer=IstioCertificateResponse.SerializeToString,
                )
            },
        )
        server.add_generic_rpc_handlers((handler,))
        if self.ads is not None:
            self.ads.add_to_server(server, _require_client_certificate)
        for key_, address, creds in (
            ("ca", self.ca_address, grpc.ssl_server_credentials(pair)),
            ("xds", self.xds_tls_address, grpc.ssl_server_credentials(pair, root, True)),
        ):
            try:
                port = server.add_secure_port(address, creds)
            except RuntimeError as e:
                raise XdsServerError(f"CA server cannot listen on {address}: {e}") from e
            if not port:
                raise XdsServerError(f"CA server cannot listen on {address}")
            self.ports[key_] = int(port)
        await server.start()
        self._server = server
        log.info("CA on %s, ADS over mTLS on %s", self.bound_address, self.bound_xds_tls_address)

    async def stop(self, grace: float | None = None) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    def metrics_text(self) -> str:
        return self.service.metrics.render()

    async def _create_certificate(self, request: Any, context: Any) -> Any:
        metadata = {k: v for k, v in (context.invocation_metadata() or ())}
        peer = peer_spiffe_id(context.auth_context())
        try:
            chain = self.service.create_certificate(
                authorization=str(metadata.get("authorization", "")),
                csr=request.csr,
                validity=int(request.validity_duration),
                peer=peer,
            )
        except AuthenticationFailed as e:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
        except CsrRefused as e:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("CSR metadata %s", json_format.MessageToDict(request.metadata))
        return IstioCertificateResponse(cert_chain=chain)


def _require_client_certificate(context: Any) -> str:
    peer = peer_spiffe_id(context.auth_context())
    if not peer:
        raise RequestError(
            "UNAUTHENTICATED",
            "ADS over TLS needs a client certificate from the mesh CA (the mTLS xDS port)",
        )
    return peer


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


__all__ = [
    "CREATE_CERTIFICATE",
    "DEFAULT_CA_ADDRESS",
    "DEFAULT_XDS_TLS_ADDRESS",
    "SECRET_TYPE",
    "CaMetrics",
    "CaServer",
    "CertificateService",
    "IstioCertificateRequest",
    "IstioCertificateResponse",
    "peer_spiffe_id",
]
