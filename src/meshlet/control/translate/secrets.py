"""SDS: the ``Secret`` resources a proxy gets over ADS (istio-agent's SDS server, served here
by the control plane).

* ``default`` -- the workload certificate chain (leaf first), **without a private key**: the
  key never leaves the proxy that made it, so the proxy completes this secret with its own
  key (its secret store's ``local_private_key``).
* ``ROOTCA`` -- the trust bundle: a validation context with the mesh root as trusted CA.

Istio's names, so that the ``sds_secret("default")`` and ``sds_secret("ROOTCA")`` references in
clusters and listeners resolve. Pure; no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

WORKLOAD_SECRET = "default"
ROOT_SECRET = "ROOTCA"


def workload_secret(chain: Sequence[str]) -> secret_pb2.Secret:
    """``default``: the chain only; the proxy adds the key it holds."""
    secret = secret_pb2.Secret(name=WORKLOAD_SECRET)
    secret.tls_certificate.certificate_chain.inline_bytes = "".join(chain).encode()
    return secret


def root_secret(root_pem: str) -> secret_pb2.Secret:
    secret = secret_pb2.Secret(name=ROOT_SECRET)
    secret.validation_context.trusted_ca.inline_bytes = root_pem.encode()
    return secret


def build_secrets(chain: Sequence[str], root_pem: str) -> list[secret_pb2.Secret]:
    """``ROOTCA``, and ``default`` when a chain was issued to this proxy."""
    out = [root_secret(root_pem)]
    if chain:
        out.insert(0, workload_secret(chain))
    return out


__all__ = ["ROOT_SECRET", "WORKLOAD_SECRET", "build_secrets", "root_secret", "workload_secret"]
