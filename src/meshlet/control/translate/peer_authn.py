"""PeerAuthentication: which mTLS mode a workload's inbound side runs (istiod's
``pilot/pkg/security/authn``), and the mode auto mTLS infers for a destination service.

Rules kept (``ISTIO-TRANSLATION.md`` §3.6, §6.1; Istio's PeerAuthentication reference,
https://istio.io/latest/docs/reference/config/security/peer_authentication/):

* Precedence: the workload's policy (a ``selector`` matching its labels) over its
  namespace's (no selector) over the mesh's (no selector, root namespace ``istio-system``);
  ``portLevelMtls`` of the workload policy over all of them for its port.
* ``UNSET`` inherits from the next level up; with nothing set the mode is PERMISSIVE.
* Several policies at one level: the oldest wins (then by name), as Istio resolves conflicts.
* Auto mTLS infers a service's mode from the namespace and mesh policies only (a client does
  not know which workload it will reach): ``infer_service_mode``.

Pure; no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from meshlet.api.security import MTLSMode, PeerAuthenticationSpec


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerAuthnConfig:
    name: str
    namespace: str
    spec: PeerAuthenticationSpec
    creation: str = ""

    def __repr__(self) -> str:
        return f"<PeerAuthnConfig {self.namespace}/{self.name}>"

    @property
    def selector(self) -> Mapping[str, str] | None:
        s = self.spec.selector
        return dict(s.match_labels) if s is not None and s.match_labels else None

    @property
    def mode(self) -> MTLSMode:
        return self.spec.mtls.mode if self.spec.mtls is not None else MTLSMode.UNSET


def _oldest(policies: Iterable[PeerAuthnConfig]) -> PeerAuthnConfig | None:
    ordered = sorted(policies, key=lambda p: (p.creation, p.name))
    return ordered[0] if ordered else None


def _inherit(parent: MTLSMode, child: MTLSMode | None) -> MTLSMode:
    return parent if child is None or child is MTLSMode.UNSET else child


def _scoped(policies: Sequence[PeerAuthnConfig], namespace: str, root_namespace: str) -> MTLSMode:
    """The mesh, then namespace, mode (PERMISSIVE when neither sets one)."""
    mode = MTLSMode.PERMISSIVE
    mesh = _oldest(p for p in policies if p.namespace == root_namespace and p.selector is None)
    if mesh is not None:
        mode = _inherit(mode, mesh.mode)
    if namespace != root_namespace:
        ns = _oldest(p for p in policies if p.namespace == namespace and p.selector is None)
        if ns is not None:
            mode = _inherit(mode, ns.mode)
    return mode


def workload_mode(
    policies: Sequence[PeerAuthnConfig],
    *,
    namespace: str,
    labels: Mapping[str, str],
    port: int | None = None,
    root_namespace: str = "istio-system",
) -> MTLSMode:
    """The mode a workload's inbound side runs on ``port`` (None: the workload level)."""
    mode = _scoped(policies, namespace, root_namespace)
    workload = _oldest(
        p
        for p in policies
        if p.namespace == namespace
        and p.selector is not None
        and all(labels.get(k) == v for k, v in p.selector.items())
    )
    if workload is not None:
        mode = _inherit(mode, workload.mode)
        if port is not None:
            mode = _inherit(mode, workload.spec.port_mode(port))
    return mode


def infer_service_mode(
    policies: Sequence[PeerAuthnConfig], *, namespace: str, root_namespace: str = "istio-system"
) -> MTLSMode:
    """What auto mTLS assumes of a service's workloads (namespace or mesh policy)."""
    return _scoped(policies, namespace, root_namespace)


__all__ = ["PeerAuthnConfig", "infer_service_mode", "workload_mode"]
