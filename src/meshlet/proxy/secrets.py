"""Named TLS secrets (Envoy's SDS ``Secret``): certificates and trust bundles, by name.

A ``SecretStore`` holds what listeners and clusters refer to by name
(``tls_certificate_sds_secret_configs``, ``validation_context_sds_secret_config``): Istio's
``default`` (the workload certificate) and ``ROOTCA`` (the trust bundle). Secrets come from the
bootstrap (``static_resources.secrets``), from ADS (SDS ``Secret`` resources), or from the
identity module, which also sets ``local_private_key``: the key the proxy generated itself.
The control plane sends only certificates, so a ``tls_certificate`` with a chain and no key is
completed with that local key when it is read (``get``); the key never leaves the process.

Subscribers are called, on the event loop, with the name of each secret that changed; the TLS
context cache (``meshlet.proxy.tls``) drops the contexts built from it, so new connections use
the new certificate while connections already established keep theirs.
"""

from __future__ import annotations

import base64
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from meshlet.errors import ConfigError, ProblemList
from meshlet.proxy.fields import check_fields, join

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsCertificate:
    """A certificate chain (leaf first, PEM) and its private key (PEM; None: the local key)."""

    cert_chain_pem: bytes
    private_key_pem: bytes | None = None

    def __repr__(self) -> str:  # never print the key
        key = "key" if self.private_key_pem else "no key"
        return f"<TlsCertificate {len(self.cert_chain_pem)} bytes, {key}>"


@dataclass(frozen=True, slots=True, kw_only=True)
class SanMatcher:
    """One ``match_typed_subject_alt_names`` entry: SAN type (``URI``, ``DNS``, or ``""`` for
    any) and a string match (``exact``, ``prefix``, ``suffix``, ``contains``)."""

    san_type: str
    kind: str
    value: str
    ignore_case: bool = False

    def matches(self, sans: tuple[tuple[str, str], ...]) -> bool:
        """``sans``: (type, value) pairs as ``ssl.getpeercert()['subjectAltName']`` gives."""
        want = self.value.lower() if self.ignore_case else self.value
        for kind, value in sans:
            if self.san_type and kind != self.san_type:
                continue
            got = value.lower() if self.ignore_case else value
            if (
                (self.kind == "exact" and got == want)
                or (self.kind == "prefix" and got.startswith(want))
                or (self.kind == "suffix" and got.endswith(want))
                or (self.kind == "contains" and want in got)
            ):
                return True
        return False


@dataclass(frozen=True, slots=True, kw_only=True)
class ValidationContext:
    """A trust bundle (PEM CA certificates) and the SANs a peer certificate must have (any
    one of them; none listed: any certificate the bundle verifies)."""

    trusted_ca_pem: bytes
    match_sans: tuple[SanMatcher, ...] = ()


Secret = TlsCertificate | ValidationContext


class SecretStore:
    """The proxy's named secrets; one per process, shared by its listeners and clusters."""

    def __init__(self) -> None:
        self._secrets: dict[str, Secret] = {}
        self._subscribers: list[Callable[[str], None]] = []
        self._local_private_key: bytes | None = None

    def __repr__(self) -> str:
        key = "local key" if self._local_private_key else "no local key"
        return f"<SecretStore {sorted(self._secrets)} {key}>"

    def names(self) -> list[str]:
        return sorted(self._secrets)

    def get(self, name: str) -> Secret | None:
        """The secret ``name``; a certificate without a key comes with the local key (and
        stays without one while there is none)."""
        secret = self._secrets.get(name)
        if (
            isinstance(secret, TlsCertificate)
            and secret.private_key_pem is None
            and self._local_private_key is not None
        ):
            return replace(secret, private_key_pem=self._local_private_key)
        return secret

    def raw(self, name: str) -> Secret | None:
        """The secret as it was set (for ``/config_dump``: no key is completed)."""
        return self._secrets.get(name)

    def set(self, name: str, secret: Secret) -> None:
        """Add or replace ``name``; subscribers hear of it only if it changed."""
        if self._secrets.get(name) == secret:
            return
        self._secrets[name] = secret
        self._notify(name)

    def remove(self, name: str) -> None:
        if self._secrets.pop(name, None) is not None:
            self._notify(name)

    @property
    def local_private_key(self) -> bytes | None:
        return self._local_private_key

    @local_private_key.setter
    def local_private_key(self, key: bytes | None) -> None:
        if key == self._local_private_key:
            return
        self._local_private_key = key
        for name, secret in list(self._secrets.items()):
            if isinstance(secret, TlsCertificate) and secret.private_key_pem is None:
                self._notify(name)

    def subscribe(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call ``callback(name)`` whenever secret ``name`` changes; returns an unsubscribe."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def _notify(self, name: str) -> None:
        for callback in list(self._subscribers):
            callback(name)


# -- compiling Secret protos -------------------------------------------------------------------


def compile_secret(proto: secret_pb2.Secret, path: str) -> tuple[str, Secret]:
    """An Envoy ``Secret`` (from SDS or ``static_resources.secrets``) as (name, secret).

    Raises ``ConfigError`` for anything that cannot be used: a missing name, an unsupported
    kind (session ticket keys, generic secrets), PEM that does not parse.
    """
    check_fields(proto, path, {"name", "tls_certificate", "validation_context"})
    if not proto.name:
        raise ConfigError.at(join(path, "name"), "is required")
    kind = proto.WhichOneof("type")
    if kind == "tls_certificate":
        return proto.name, compile_tls_certificate(
            proto.tls_certificate, join(path, "tls_certificate")
        )
    if kind == "validation_context":
        # Imported here: tls imports this module.
        from meshlet.proxy.tls import compile_validation_context

        return proto.name, compile_validation_context(
            proto.validation_context, join(path, "validation_context")
        )
    raise ConfigError.at(path, "needs tls_certificate or validation_context")


def compile_tls_certificate(proto: object, path: str) -> TlsCertificate:
    """A ``TlsCertificate``: ``certificate_chain`` and, optionally, ``private_key``."""
    from envoy.extensions.transport_sockets.tls.v3 import common_pb2

    assert isinstance(proto, common_pb2.TlsCertificate)
    check_fields(proto, path, {"certificate_chain", "private_key"})
    problems = ProblemList()
    chain = b""
    key: bytes | None = None
    try:
        chain = data_source(proto.certificate_chain, join(path, "certificate_chain"))
        if not pem_blocks(chain, "CERTIFICATE"):
            problems.add(join(path, "certificate_chain"), "holds no PEM certificate")
    except ConfigError as e:
        problems.extend(e)
    if proto.HasField("private_key"):
        try:
            key = data_source(proto.private_key, join(path, "private_key"))
            if b"PRIVATE KEY-----" not in key:
                problems.add(join(path, "private_key"), "holds no PEM private key")
        except ConfigError as e:
            problems.extend(e)
    problems.raise_if_any()
    return TlsCertificate(cert_chain_pem=chain, private_key_pem=key)


def data_source(proto: base_pb2.DataSource, path: str) -> bytes:
    """The bytes of a ``DataSource``: inline bytes or string, a file, or an environment
    variable (read once, when the configuration is compiled)."""
    check_fields(proto, path, {"inline_bytes", "inline_string", "filename", "environment_variable"})
    kind = proto.WhichOneof("specifier")
    if kind == "inline_bytes":
        return bytes(proto.inline_bytes)
    if kind == "inline_string":
        return str(proto.inline_string).encode()
    if kind == "filename":
        try:
            with open(proto.filename, "rb") as f:
                return f.read()
        except OSError as e:
            raise ConfigError.at(join(path, "filename"), f"cannot read: {e.strerror}") from None
    if kind == "environment_variable":
        value = os.environ.get(proto.environment_variable)
        if value is None:
            raise ConfigError.at(join(path, "environment_variable"), "is not set")
        return value.encode()
    raise ConfigError.at(path, "is empty")


def pem_blocks(data: bytes, label: str) -> list[bytes]:
    """The DER bytes of each ``-----BEGIN <label>-----`` block in ``data``."""
    begin = b"-----BEGIN " + label.encode() + b"-----"
    end = b"-----END " + label.encode() + b"-----"
    out = []
    pos = 0
    while (start := data.find(begin, pos)) >= 0:
        stop = data.find(end, start)
        if stop < 0:
            break
        with contextlib.suppress(ValueError):
            out.append(base64.b64decode(b"".join(data[start + len(begin) : stop].split())))
        pos = stop + len(end)
    return out
