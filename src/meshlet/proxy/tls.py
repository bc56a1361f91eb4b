"""TLS transport sockets: Envoy's ``DownstreamTlsContext`` / ``UpstreamTlsContext``, compiled.

Three parts, pure first:

* **Compiling** (``compile_transport_socket``): a ``transport_socket`` becomes a frozen
  ``TlsConfig`` (``raw_buffer`` becomes ``None``). Certificates and trust bundles are inline or
  named (SDS, ``sds_config: {ads: {}}``); anything meshlet does not implement is refused by
  field name. ``alpn_protocols`` are offered and accepted, except ``h2``: meshlet speaks
  HTTP/1.1 only, so ``h2`` is dropped from the list rather than negotiated and then broken.
* **Contexts** (``TlsContexts``): ``ssl.SSLContext``s built from a ``TlsConfig`` and the
  ``SecretStore``, cached until a secret they use changes; then the next connection gets a
  context with the new certificate while established connections keep theirs. A context whose
  secrets have not arrived is ``None``: the connection fails (Envoy's "not ready" socket).
  Python's ssl only checks DNS/IP names, so SANs (SPIFFE URIs) are matched after the
  handshake, against ``match_subject_alt_names`` / ``match_typed_subject_alt_names``.
* **The listener side** (``TransportInspector``): Envoy's ``tls_inspector``. It reads the first
  bytes of a connection; a TLS ClientHello (0x16 0x03 ...) gives transport ``tls``, its SNI and
  ALPN, anything else ``raw_buffer``; the listener picks the filter chain from that
  (PERMISSIVE: a TLS chain and a plaintext chain on one port), and the connection continues in
  plaintext or through TLS, with the bytes already read handed on. TLS runs over asyncio's
  ``SSLProtocol`` (the one ``loop.start_tls`` uses), because it can be given bytes that were
  read before the handshake began.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import ssl
import tempfile
from asyncio import sslproto
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2

from meshlet.errors import ConfigError, ProblemList
from meshlet.proxy.fields import ads_config_source, check_fields, join
from meshlet.proxy.secrets import (
    SanMatcher,
    SecretStore,
    TlsCertificate,
    ValidationContext,
    data_source,
    pem_blocks,
)
from meshlet.proxy.stream_info import DownstreamTls

log = logging.getLogger("meshlet.tls")

TLS_TYPE_DOWNSTREAM = "type.googleapis.com/" + tls_pb2.DownstreamTlsContext.DESCRIPTOR.full_name
TLS_TYPE_UPSTREAM = "type.googleapis.com/" + tls_pb2.UpstreamTlsContext.DESCRIPTOR.full_name
RAW_BUFFER_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
TLS_INSPECTOR_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
)
TLS_SOCKET_NAMES = ("envoy.transport_sockets.tls", "tls")
RAW_SOCKET_NAMES = ("envoy.transport_sockets.raw_buffer", "raw_buffer")

_VERSIONS = {
    common_pb2.TlsParameters.TLS_AUTO: None,
    common_pb2.TlsParameters.TLSv1_2: "TLSv1_2",
    common_pb2.TlsParameters.TLSv1_3: "TLSv1_3",
}
_SSL_VERSIONS = {"TLSv1_2": ssl.TLSVersion.TLSv1_2, "TLSv1_3": ssl.TLSVersion.TLSv1_3}
_SAN_TYPES = {
    common_pb2.SubjectAltNameMatcher.URI: "URI",
    common_pb2.SubjectAltNameMatcher.DNS: "DNS",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsConfig:
    """One side of a TLS transport socket, compiled (hashable: it keys the context cache)."""

    server_side: bool
    certificate: TlsCertificate | None = None  # inline tls_certificates[0]
    certificate_sds: str = ""  # or an SDS secret name
    validation: ValidationContext | None = None  # inline validation_context
    validation_sds: str = ""  # or an SDS secret name (its SANs add to match_sans)
    match_sans: tuple[SanMatcher, ...] = ()
    require_client_certificate: bool = False
    min_version: str = "TLSv1_2"
    max_version: str = "TLSv1_3"
    ciphers: str = ""  # OpenSSL cipher list for TLS 1.2 (1.3 suites are fixed)
    alpn: tuple[str, ...] = ()  # h2 removed: meshlet speaks HTTP/1.1
    sni: str = ""  # upstream: the SNI to send

    def secret_names(self) -> frozenset[str]:
        return frozenset(n for n in (self.certificate_sds, self.validation_sds) if n)

    @property
    def verifies_peer(self) -> bool:
        return self.validation is not None or bool(self.validation_sds)


# -- compiling ---------------------------------------------------------------------------------


def compile_transport_socket(
    proto: base_pb2.TransportSocket, path: str, *, upstream: bool
) -> TlsConfig | None:
    """A ``transport_socket``: TLS (``None`` for ``raw_buffer``, i.e. plaintext)."""
    check_fields(proto, path, {"name", "typed_config"})
    url = proto.typed_config.type_url
    tpath = join(path, "typed_config")
    if url == RAW_BUFFER_TYPE or (not url and proto.name in RAW_SOCKET_NAMES):
        return None
    want = TLS_TYPE_UPSTREAM if upstream else TLS_TYPE_DOWNSTREAM
    if url != want:
        kind = "UpstreamTlsContext" if upstream else "DownstreamTlsContext"
        raise ConfigError.at(
            tpath,
            f"{url or proto.name or 'an empty transport socket'} is not supported "
            f"(supported: {kind} of envoy.transport_sockets.tls, raw_buffer)",
        )
    if upstream:
        up = tls_pb2.UpstreamTlsContext()
        proto.typed_config.Unpack(up)
        return compile_upstream_tls(up, tpath)
    down = tls_pb2.DownstreamTlsContext()
    proto.typed_config.Unpack(down)
    return compile_downstream_tls(down, tpath)


def compile_downstream_tls(proto: tls_pb2.DownstreamTlsContext, path: str) -> TlsConfig:
    check_fields(proto, path, {"common_tls_context", "require_client_certificate"})
    config = _compile_common(proto.common_tls_context, join(path, "common_tls_context"), True)
    require = proto.require_client_certificate.value
    problems = ProblemList()
    if config.certificate is None and not config.certificate_sds:
        problems.add(join(path, "common_tls_context"), "a server needs a certificate")
    if require and not config.verifies_peer:
        problems.add(
            join(path, "require_client_certificate"),
            "needs a validation context (validation_context or an SDS one)",
        )
    problems.raise_if_any()
    return _replace(config, require_client_certificate=require)


def compile_upstream_tls(proto: tls_pb2.UpstreamTlsContext, path: str) -> TlsConfig:
    check_fields(proto, path, {"common_tls_context", "sni"})
    config = _compile_common(proto.common_tls_context, join(path, "common_tls_context"), False)
    return _replace(config, sni=proto.sni)


def _replace(config: TlsConfig, **changes: Any) -> TlsConfig:
    from dataclasses import replace

    return replace(config, **changes)


_COMMON_FIELDS = {
    "tls_params",
    "tls_certificates",
    "tls_certificate_sds_secret_configs",
    "validation_context",
    "validation_context_sds_secret_config",
    "combined_validation_context",
    "alpn_protocols",
}


def _compile_common(proto: tls_pb2.CommonTlsContext, path: str, server_side: bool) -> TlsConfig:
    problems = ProblemList()

    def attempt(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except ConfigError as e:
            problems.extend(e)
            return None

    attempt(lambda: check_fields(proto, path, _COMMON_FIELDS))
    min_version, max_version, ciphers = "TLSv1_2", "TLSv1_3", ""
    if proto.HasField("tls_params"):
        params = attempt(lambda: _compile_params(proto.tls_params, join(path, "tls_params")))
        if params is not None:
            min_version, max_version, ciphers = params
    certificate: TlsCertificate | None = None
    certificate_sds = ""
    n_certs = len(proto.tls_certificates) + len(proto.tls_certificate_sds_secret_configs)
    if n_certs > 1:
        problems.add(path, "only one certificate is supported (tls_certificates or SDS)")
    elif proto.tls_certificates:
        from meshlet.proxy.secrets import compile_tls_certificate

        certificate = attempt(
            lambda: compile_tls_certificate(
                proto.tls_certificates[0], join(path, "tls_certificates[0]")
            )
        )
    elif proto.tls_certificate_sds_secret_configs:
        certificate_sds = (
            attempt(
                lambda: _sds_name(
                    proto.tls_certificate_sds_secret_configs[0],
                    join(path, "tls_certificate_sds_secret_configs[0]"),
                )
            )
            or ""
        )
    validation: ValidationContext | None = None
    validation_sds = ""
    sans: tuple[SanMatcher, ...] = ()
    kinds = [
        f
        for f in (
            "validation_context",
            "validation_context_sds_secret_config",
            "combined_validation_context",
        )
        if proto.HasField(f)
    ]
    if len(kinds) > 1:
        problems.add(path, f"only one of {', '.join(kinds)} may be set")
    elif proto.HasField("validation_context"):
        validation = attempt(
            lambda: compile_validation_context(
                proto.validation_context, join(path, "validation_context")
            )
        )
    elif proto.HasField("validation_context_sds_secret_config"):
        validation_sds = (
            attempt(
                lambda: _sds_name(
                    proto.validation_context_sds_secret_config,
                    join(path, "validation_context_sds_secret_config"),
                )
            )
            or ""
        )
    elif proto.HasField("combined_validation_context"):
        combined = proto.combined_validation_context
        cpath = join(path, "combined_validation_context")
        attempt(
            lambda: check_fields(
                combined,
                cpath,
                {"default_validation_context", "validation_context_sds_secret_config"},
            )
        )
        default = combined.default_validation_context
        sans = (
            attempt(
                lambda: (
                    compile_validation_context(
                        default, join(cpath, "default_validation_context"), ca_required=False
                    ).match_sans
                )
            )
            or ()
        )
        if not combined.HasField("validation_context_sds_secret_config"):
            problems.add(join(cpath, "validation_context_sds_secret_config"), "is required")
        else:
            validation_sds = (
                attempt(
                    lambda: _sds_name(
                        combined.validation_context_sds_secret_config,
                        join(cpath, "validation_context_sds_secret_config"),
                    )
                )
                or ""
            )
    if validation is not None:
        sans, validation = (
            validation.match_sans,
            ValidationContext(trusted_ca_pem=validation.trusted_ca_pem),
        )
    problems.raise_if_any()
    return TlsConfig(
        server_side=server_side,
        certificate=certificate,
        certificate_sds=certificate_sds,
        validation=validation,
        validation_sds=validation_sds,
        match_sans=sans,
        min_version=min_version,
        max_version=max_version,
        ciphers=ciphers,
        alpn=tuple(p for p in proto.alpn_protocols if p != "h2"),
    )


def _compile_params(proto: common_pb2.TlsParameters, path: str) -> tuple[str, str, str]:
    check_fields(
        proto,
        path,
        {"tls_minimum_protocol_version", "tls_maximum_protocol_version", "cipher_suites"},
    )
    problems = ProblemList()
    versions = []
    for field, default in (
        ("tls_minimum_protocol_version", "TLSv1_2"),
        ("tls_maximum_protocol_version", "TLSv1_3"),
    ):
        value = getattr(proto, field)
        if value not in _VERSIONS:
            name = common_pb2.TlsParameters.TlsProtocol.Name(value)
            problems.add(join(path, field), f"{name} is not supported (TLS 1.2 is the minimum)")
            versions.append(default)
        else:
            versions.append(_VERSIONS[value] or default)
    if versions[0] > versions[1]:
        problems.add(path, "the minimum protocol version is above the maximum")
    # Envoy's (BoringSSL's) equal-preference groups "[A|B]" are plain preference order here.
    ciphers = ":".join(
        part for suite in proto.cipher_suites for part in suite.strip("[]").split("|") if part
    )
    if ciphers:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(ciphers)
        except ssl.SSLError:
            problems.add(join(path, "cipher_suites"), f"no cipher in {ciphers!r} is known")
    problems.raise_if_any()
    return versions[0], versions[1], ciphers


def _sds_name(proto: Any, path: str) -> str:
    check_fields(proto, path, {"name", "sds_config"})
    if not proto.name:
        raise ConfigError.at(join(path, "name"), "is required")
    if proto.HasField("sds_config"):
        ads_config_source(proto.sds_config, join(path, "sds_config"))
    return str(proto.name)


def compile_validation_context(
    proto: common_pb2.CertificateValidationContext, path: str, *, ca_required: bool = True
) -> ValidationContext:
    """A ``CertificateValidationContext``: ``trusted_ca`` and the SANs to match."""
    check_fields(
        proto, path, {"trusted_ca", "match_subject_alt_names", "match_typed_subject_alt_names"}
    )
    problems = ProblemList()
    ca = b""
    if proto.HasField("trusted_ca"):
        try:
            ca = data_source(proto.trusted_ca, join(path, "trusted_ca"))
            if not pem_blocks(ca, "CERTIFICATE"):
                problems.add(join(path, "trusted_ca"), "holds no PEM certificate")
            else:
                ssl.create_default_context(cadata=ca.decode("ascii", "replace"))
        except ConfigError as e:
            problems.extend(e)
        except (ssl.SSLError, ValueError) as e:
            problems.add(join(path, "trusted_ca"), f"is not a usable CA bundle: {e}")
    elif ca_required:
        problems.add(join(path, "trusted_ca"), "is required")
    sans: list[SanMatcher] = []
    for i, m in enumerate(proto.match_subject_alt_names):
        try:
            sans.append(_string_matcher(m, f"{path}.match_subject_alt_names[{i}]", ""))
        except ConfigError as e:
            problems.extend(e)
    for i, t in enumerate(proto.match_typed_subject_alt_names):
        tpath = f"{path}.match_typed_subject_alt_names[{i}]"
        try:
            check_fields(t, tpath, {"san_type", "matcher"})
            san_type = _SAN_TYPES.get(t.san_type)
            if san_type is None:
                name = common_pb2.SubjectAltNameMatcher.SanType.Name(t.san_type)
                raise ConfigError.at(join(tpath, "san_type"), f"{name} is not supported (URI, DNS)")
            sans.append(_string_matcher(t.matcher, join(tpath, "matcher"), san_type))
        except ConfigError as e:
            problems.extend(e)
    problems.raise_if_any()
    return ValidationContext(trusted_ca_pem=ca, match_sans=tuple(sans))


def _string_matcher(m: string_pb2.StringMatcher, path: str, san_type: str) -> SanMatcher:
    check_fields(m, path, {"exact", "prefix", "suffix", "contains", "ignore_case"})
    kind = m.WhichOneof("match_pattern")
    if kind is None:
        raise ConfigError.at(path, "needs exact, prefix, suffix or contains")
    return SanMatcher(
        san_type=san_type, kind=kind, value=str(getattr(m, kind)), ignore_case=m.ignore_case
    )


# -- contexts ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BuiltContext:
    """An ``SSLContext`` ready for new connections, with what is checked after handshakes."""

    context: ssl.SSLContext
    match_sans: tuple[SanMatcher, ...]
    local_uri_sans: tuple[str, ...]  # of our own certificate (XFCC's By=)

    def peer_allowed(self, sans: tuple[tuple[str, str], ...]) -> bool:
        """The peer's SANs satisfy the configured list (an empty list allows any)."""
        return not self.match_sans or any(m.matches(sans) for m in self.match_sans)


class TlsContexts:
    """``SSLContext``s by ``TlsConfig``, rebuilt when a secret they use changes."""

    def __init__(self, secrets: SecretStore) -> None:
        self.secrets = secrets
        self._cache: dict[TlsConfig, BuiltContext | None] = {}
        secrets.subscribe(self._secret_changed)

    def __repr__(self) -> str:
        return f"<TlsContexts {len(self._cache)} cached>"

    def get(self, config: TlsConfig) -> BuiltContext | None:
        """The context for ``config``; None while a secret it needs is missing (or unusable)."""
        try:
            return self._cache[config]
        except KeyError:
            pass
        built = self._build(config)
        self._cache[config] = built
        return built

    def _secret_changed(self, name: str) -> None:
        for config in [c for c in self._cache if name in c.secret_names()]:
            del self._cache[config]

    def _build(self, config: TlsConfig) -> BuiltContext | None:
        certificate = config.certificate
        if config.certificate_sds:
            secret = self.secrets.get(config.certificate_sds)
            certificate = secret if isinstance(secret, TlsCertificate) else None
            if certificate is None or certificate.private_key_pem is None:
                return None
        validation = config.validation
        sans = config.match_sans
        if config.validation_sds:
            secret = self.secrets.get(config.validation_sds)
            if not isinstance(secret, ValidationContext):
                return None
            validation = secret
            sans = sans + secret.match_sans
        try:
            ctx = ssl.SSLContext(
                ssl.PROTOCOL_TLS_SERVER if config.server_side else ssl.PROTOCOL_TLS_CLIENT
            )
            ctx.minimum_version = _SSL_VERSIONS[config.min_version]
            ctx.maximum_version = _SSL_VERSIONS[config.max_version]
            ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
            if config.ciphers:
                ctx.set_ciphers(config.ciphers)
            if not config.server_side:
                ctx.check_hostname = False  # SANs are matched after the handshake
            if certificate is not None:
                _load_cert_chain(ctx, certificate)
            elif config.server_side:
                return None
            if validation is not None:
                ctx.load_verify_locations(cadata=validation.trusted_ca_pem.decode("ascii"))
                ctx.verify_mode = (
                    ssl.CERT_REQUIRED
                    if not config.server_side or config.require_client_certificate
                    else ssl.CERT_OPTIONAL
                )
            else:
                ctx.verify_mode = ssl.CERT_NONE  # Envoy: no validation context, no checks
            if config.alpn:
                ctx.set_alpn_protocols(list(config.alpn))
        except (ssl.SSLError, ValueError, OSError) as e:
            log.error(
                "cannot build a TLS context (secrets %s): %s", sorted(config.secret_names()), e
            )
            return None
        local: tuple[str, ...] = ()
        if certificate is not None:
            leaf = pem_blocks(certificate.cert_chain_pem, "CERTIFICATE")
            local = tuple(v for k, v in cert_sans(leaf[0]) if k == "URI") if leaf else ()
        return BuiltContext(context=ctx, match_sans=sans, local_uri_sans=local)


def _load_cert_chain(ctx: ssl.SSLContext, certificate: TlsCertificate) -> None:
    """``load_cert_chain`` from memory: Python's ssl reads only files, so the PEM goes through
    an anonymous memory file (memfd), never the disk."""
    data = certificate.cert_chain_pem + b"\n" + (certificate.private_key_pem or b"")
    memfd = getattr(os, "memfd_create", None)
    if memfd is not None:
        fd = memfd("meshlet-tls", getattr(os, "MFD_CLOEXEC", 0))
        try:
            _write_all(fd, data)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory() as tmp:  # mode 0700, removed at once
        path = os.path.join(tmp, "cert.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        ctx.load_cert_chain(path)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# -- certificates (a small DER reader: no cryptography on the proxy's path) --------------------

_SAN_OID = bytes([0x06, 0x03, 0x55, 0x1D, 0x11])  # 2.5.29.17 subjectAltName


def _tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of value, end of value) of the DER element at ``pos``."""
    tag = data[pos]
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        length = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    if pos + length > len(data):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def cert_sans(der: bytes) -> tuple[tuple[str, str], ...]:
    """The URI and DNS subject alternative names of a DER certificate, as
    ``ssl.getpeercert()`` spells them: ``(("URI", "spiffe://..."), ("DNS", "a.b"))``."""
    try:
        _, cert, _ = _tlv(der, 0)
        _, tbs, tbs_end = _tlv(der, cert)
        pos = tbs
        while pos < tbs_end:
            tag, start, end = _tlv(der, pos)
            if tag == 0xA3:  # [3] extensions
                _, exts, exts_end = _tlv(der, start)
                p = exts
                while p < exts_end:
                    _, ext, ext_end = _tlv(der, p)
                    if der[ext : ext + len(_SAN_OID)] == _SAN_OID:
                        return _general_names(der, ext + len(_SAN_OID), ext_end)
                    p = ext_end
            pos = end
    except (IndexError, ValueError):
        pass
    return ()


def _general_names(der: bytes, pos: int, end: int) -> tuple[tuple[str, str], ...]:
    tag, start, stop = _tlv(der, pos)
    if tag == 0x01:  # critical flag
        tag, start, stop = _tlv(der, stop)
    _, names, names_end = _tlv(der, start)  # OCTET STRING holds a SEQUENCE
    out = []
    p = names
    while p < names_end:
        tag, s, e = _tlv(der, p)
        if tag == 0x86:
            out.append(("URI", der[s:e].decode("ascii", "replace")))
        elif tag == 0x82:
            out.append(("DNS", der[s:e].decode("ascii", "replace")))
        p = e
    return tuple(out)


def downstream_tls(ssl_object: Any, built: BuiltContext, sni: str) -> DownstreamTls | None:
    """What a finished handshake tells about the peer; None if its SANs are not allowed."""
    der = ssl_object.getpeercert(binary_form=True)
    sans: tuple[tuple[str, str], ...] = ()
    subject = ""
    if der:
        peer = ssl_object.getpeercert() or {}
        sans = tuple((k, v) for k, v in peer.get("subjectAltName", ()) if k in ("URI", "DNS"))
        subject = ",".join(
            f"{_RDN_SHORT.get(k, k)}={v}"
            for rdn in reversed(peer.get("subject", ()))
            for k, v in rdn
        )
        if not built.peer_allowed(sans):
            return None
    return DownstreamTls(
        version=ssl_object.version() or "",
        sni=sni,
        peer_certificate=der or b"",
        peer_uri_sans=tuple(v for k, v in sans if k == "URI"),
        peer_dns_sans=tuple(v for k, v in sans if k == "DNS"),
        peer_subject=subject,
        peer_cert_sha256=hashlib.sha256(der).hexdigest() if der else "",
        local_uri_sans=built.local_uri_sans,
    )


_RDN_SHORT = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
}


def upstream_peer_allowed(transport: Any, built: BuiltContext) -> bool:
    """After an upstream handshake: the server's SANs satisfy the configured list."""
    if not built.match_sans:
        return True
    ssl_object = transport.get_extra_info("ssl_object")
    peer = ssl_object.getpeercert() if ssl_object is not None else None
    if not peer:
        return False
    sans = tuple((k, v) for k, v in peer.get("subjectAltName", ()) if k in ("URI", "DNS"))
    return built.peer_allowed(sans)


# -- ClientHello (tls_inspector) ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientHello:
    sni: str
    alpn: tuple[str, ...]


NEED_MORE = object()  # not enough bytes yet to tell
MAX_CLIENT_HELLO = 16 * 1024  # Envoy's tls_inspector max_client_hello_size default


def inspect(data: bytes) -> ClientHello | object | None:
    """What the first bytes of a connection say: a ``ClientHello`` (transport ``tls``),
    ``None`` (not TLS: ``raw_buffer``), or ``NEED_MORE``."""
    if not data:
        return NEED_MORE
    if data[0] != 0x16:
        return None
    if len(data) < 2:
        return NEED_MORE
    if data[1] != 0x03:
        return None
    if len(data) < 5:
        return NEED_MORE
    length = int.from_bytes(data[3:5], "big")
    if len(data) < 5 + length and len(data) < MAX_CLIENT_HELLO:
        return NEED_MORE
    return _parse_hello(data[5 : 5 + length])


def _parse_hello(body: bytes) -> ClientHello:
    """SNI and ALPN of a ClientHello handshake message (what fits in the first record)."""
    sni, alpn = "", []
    try:
        if body[0] != 0x01:
            return ClientHello("", ())
        p = 4 + 2 + 32  # handshake header, version, random
        p += 1 + body[p]  # session id
        p += 2 + int.from_bytes(body[p : p + 2], "big")  # cipher suites
        p += 1 + body[p]  # compression methods
        end = p + 2 + int.from_bytes(body[p : p + 2], "big")
        p += 2
        while p + 4 <= min(end, len(body)):
            kind = int.from_bytes(body[p : p + 2], "big")
            size = int.from_bytes(body[p + 2 : p + 4], "big")
            ext = body[p + 4 : p + 4 + size]
            p += 4 + size
            if kind == 0 and len(ext) >= 5 and ext[2] == 0:  # server_name, host_name
                n = int.from_bytes(ext[3:5], "big")
                sni = ext[5 : 5 + n].decode("ascii", "replace").lower()
            elif kind == 16 and len(ext) >= 2:  # ALPN
                q = 2
                while q < len(ext):
                    n = ext[q]
                    alpn.append(ext[q + 1 : q + 1 + n].decode("ascii", "replace"))
                    q += 1 + n
    except IndexError:
        pass
    return ClientHello(sni, tuple(alpn))


# -- the listener side -------------------------------------------------------------------------


class ChainSelector(Protocol):
    """What a ``TransportInspector`` needs from its listener (``worker.ListenerRuntime``)."""

    loop: asyncio.AbstractEventLoop
    tls_contexts: TlsContexts

    @property
    def inspects_tls(self) -> bool:
        """The listener has a ``tls_inspector``."""

    def select(self, transport_protocol: str, sni: str, alpn: tuple[str, ...]) -> Any:
        """The chain (``worker.ChainRuntime``) for a connection, or None: no chain matches."""

    def open(self, chain: Any, tls: DownstreamTls | None) -> asyncio.Protocol:
        """The application protocol (HTTP connection manager) for ``chain``."""


_INSPECT_TIMEOUT = 15.0  # Envoy's listener_filters_timeout


class TransportInspector(asyncio.Protocol):
    """A new connection on a listener with TLS chains or a ``tls_inspector``: tells TLS from
    plaintext, picks the filter chain, and hands the connection (and the bytes read so far)
    on to plaintext HTTP or to TLS."""

    __slots__ = ("_buffer", "_timer", "listener", "transport")

    def __init__(self, listener: ChainSelector) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self._buffer = b""
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if not self.listener.inspects_tls:
            self._decide("raw_buffer", "", ())  # Envoy: no inspector, transport raw_buffer
            return
        self._timer = self.listener.loop.call_later(_INSPECT_TIMEOUT, self._timeout)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        hello = inspect(self._buffer)
        if hello is NEED_MORE:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if isinstance(hello, ClientHello):
            self._decide("tls", hello.sni, hello.alpn)
        else:
            self._decide("raw_buffer", "", ())

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timeout(self) -> None:
        self._timer = None
        if self.transport is not None:
            self.transport.close()

    def _decide(self, transport_protocol: str, sni: str, alpn: tuple[str, ...]) -> None:
        transport = self.transport
        assert transport is not None
        listener = self.listener
        chain = listener.select(transport_protocol, sni, alpn)
        if chain is None:
            transport.abort()  # Envoy: no matching filter chain closes the connection
            return
        data, self._buffer = self._buffer, b""
        tls_config: TlsConfig | None = chain.tls
        if tls_config is None:
            app = listener.open(chain, None)
            transport.set_protocol(app)
            app.connection_made(transport)
            if data:
                app.data_received(data)
            return
        built = listener.tls_contexts.get(tls_config)
        if built is None:
            transport.abort()  # secrets not there yet
            return
        ssl_protocol = sslproto.SSLProtocol(
            listener.loop,
            _HandshakeGate(listener, chain, built, sni),
            built.context,
            None,  # type: ignore[arg-type]  # no waiter: the gate hears of the handshake
            server_side=True,
        )
        transport.set_protocol(ssl_protocol)
        ssl_protocol.connection_made(transport)
        view = memoryview(data)
        while view:
            buf = ssl_protocol.get_buffer(len(view))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            ssl_protocol.buffer_updated(n)
            view = view[n:]


class _HandshakeGate(asyncio.Protocol):
    """Sits between ``SSLProtocol`` and the HTTP connection only until the handshake is
    done: checks the peer's SANs, then swaps in the application protocol."""

    def __init__(self, listener: ChainSelector, chain: Any, built: BuiltContext, sni: str):
        self.listener = listener
        self.chain = chain
        self.built = built
        self.sni = sni

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        info = downstream_tls(ssl_object, self.built, self.sni) if ssl_object else None
        if info is None:
            cast(asyncio.Transport, transport).abort()  # a peer whose SANs are not allowed
            return
        app = self.listener.open(self.chain, info)
        transport.set_protocol(app)
        app.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        pass
