"""The kinds meshlet understands: ``apiVersion`` + ``kind`` -> schema, and kubectl's names.

Each ``KindInfo`` says which group and versions serve a kind, whether it is namespaced, and
the names a user may type for it (``virtualservice``, ``virtualservices``, ``vs``, also
``virtualservices.networking.istio.io``), as ``kubectl get`` accepts them. All served
versions of a kind share one schema, as Istio's do; the first version is the preferred one.
The store keys objects by group and kind, so one object written as ``v1beta1`` and read as
``v1`` is the same object.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from meshlet.api import kube, networking, security, telemetry
from meshlet.api.schema import Resource

NETWORKING = "networking.istio.io"
SECURITY = "security.istio.io"
TELEMETRY = "telemetry.istio.io"
NETWORKING_VERSIONS = ("v1", "v1beta1", "v1alpha3")
SECURITY_VERSIONS = ("v1", "v1beta1")
TELEMETRY_VERSIONS = ("v1", "v1alpha1")


@dataclass(frozen=True, slots=True, kw_only=True)
class KindInfo:
    group: str  # "" for the Kubernetes core group
    kind: str
    versions: tuple[str, ...]
    model: type[Resource]
    plural: str
    short_names: tuple[str, ...] = ()
    namespaced: bool = True

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def api_versions(self) -> tuple[str, ...]:
        return tuple(_api_version(self.group, v) for v in self.versions)

    @property
    def preferred_api_version(self) -> str:
        return self.api_versions[0]

    @property
    def names(self) -> tuple[str, ...]:
        """Every name ``kubectl get`` would accept for this kind, lower case."""
        base = (self.singular, self.plural, *self.short_names)
        qualified = (
            tuple(f"{n}.{self.group}" for n in (self.singular, self.plural)) if self.group else ()
        )
        return base + qualified

    def __repr__(self) -> str:
        return f"<KindInfo {self.kind}.{self.group or 'core'} {'/'.join(self.versions)}>"


def _api_version(group: str, version: str) -> str:
    return f"{group}/{version}" if group else version


def split_api_version(api_version: str) -> tuple[str, str]:
    """``networking.istio.io/v1`` -> (``networking.istio.io``, ``v1``); ``v1`` -> ("", ``v1``)."""
    group, _, version = api_version.rpartition("/")
    return group, version


class UnknownKindError(LookupError):
    """A kind name, or an apiVersion/kind pair, that no registered kind matches."""


class KindRegistry:
    """Kinds by (group, version, kind) and by every kubectl-style name."""

    def __init__(self, kinds: tuple[KindInfo, ...]) -> None:
        self._kinds = kinds
        self._by_gvk: dict[tuple[str, str, str], KindInfo] = {}
        self._by_name: dict[str, KindInfo] = {}
        for info in kinds:
            for version in info.versions:
                self._by_gvk[(info.group, version, info.kind)] = info
            for name in info.names:
                if name in self._by_name:
                    raise ValueError(f"kind name {name!r} is ambiguous")
                self._by_name[name] = info

    def __iter__(self) -> Iterator[KindInfo]:
        return iter(self._kinds)

    def __repr__(self) -> str:
        return f"<KindRegistry [{len(self._kinds)} kinds]>"

    def lookup(self, api_version: str, kind: str) -> KindInfo | None:
        """The kind served at ``api_version`` under ``kind``, or None."""
        group, version = split_api_version(api_version)
        return self._by_gvk.get((group, version, kind))

    def resolve(self, name: str) -> KindInfo:
        """A kind from what a user typed: ``vs``, ``VirtualService``, ``virtualservices``,
        ``virtualservice.networking.istio.io``; raises ``UnknownKindError`` listing the kinds."""
        info = self._by_name.get(name.lower())
        if info is None:
            raise UnknownKindError(
                f"the server doesn't have a resource type {name!r}; known types: "
                + ", ".join(
                    sorted(
                        f"{i.plural} ({', '.join(i.short_names)})" if i.short_names else i.plural
                        for i in self
                    )
                )
            )
        return info

    def api_versions(self) -> tuple[str, ...]:
        """Every supported apiVersion, in registration order."""
        seen: dict[str, None] = {}
        for info in self._kinds:
            for api_version in info.api_versions:
                seen[api_version] = None
        return tuple(seen)

    def kinds_for(self, api_version: str) -> tuple[str, ...]:
        """The kinds served at ``api_version`` (empty if the apiVersion is unknown)."""
        group, version = split_api_version(api_version)
        return tuple(i.kind for i in self._kinds if i.group == group and version in i.versions)

    def by_kind(self, kind: str) -> tuple[KindInfo, ...]:
        """Kinds with this exact ``kind`` name in any group."""
        return tuple(i for i in self._kinds if i.kind == kind)


REGISTRY = KindRegistry(
    (
        KindInfo(
            group=NETWORKING,
            kind="VirtualService",
            versions=NETWORKING_VERSIONS,
            model=networking.VirtualService,
            plural="virtualservices",
            short_names=("vs",),
        ),
        KindInfo(
            group=NETWORKING,
            kind="DestinationRule",
            versions=NETWORKING_VERSIONS,
            model=networking.DestinationRule,
            plural="destinationrules",
            short_names=("dr",),
        ),
        KindInfo(
            group=NETWORKING,
            kind="Gateway",
            versions=NETWORKING_VERSIONS,
            model=networking.Gateway,
            plural="gateways",
            short_names=("gw",),
        ),
        KindInfo(
            group=NETWORKING,
            kind="ServiceEntry",
            versions=NETWORKING_VERSIONS,
            model=networking.ServiceEntry,
            plural="serviceentries",
            short_names=("se",),
        ),
        KindInfo(
            group=NETWORKING,
            kind="WorkloadEntry",
            versions=NETWORKING_VERSIONS,
            model=networking.WorkloadEntry,
            plural="workloadentries",
            short_names=("we",),
        ),
        KindInfo(
            group=NETWORKING,
            kind="Sidecar",
            versions=NETWORKING_VERSIONS,
            model=networking.Sidecar,
            plural="sidecars",
        ),
        KindInfo(
            group=SECURITY,
            kind="PeerAuthentication",
            versions=SECURITY_VERSIONS,
            model=security.PeerAuthentication,
            plural="peerauthentications",
            short_names=("pa",),
        ),
        KindInfo(
            group=SECURITY,
            kind="AuthorizationPolicy",
            versions=SECURITY_VERSIONS,
            model=security.AuthorizationPolicy,
            plural="authorizationpolicies",
            short_names=("ap",),
        ),
        KindInfo(
            group=SECURITY,
            kind="RequestAuthentication",
            versions=SECURITY_VERSIONS,
            model=security.RequestAuthentication,
            plural="requestauthentications",
            short_names=("ra",),
        ),
        KindInfo(
            group=TELEMETRY,
            kind="Telemetry",
            versions=TELEMETRY_VERSIONS,
            model=telemetry.Telemetry,
            plural="telemetries",
        ),
        KindInfo(
            group="",
            kind="Namespace",
            versions=("v1",),
            model=kube.Namespace,
            plural="namespaces",
            short_names=("ns",),
            namespaced=False,
        ),
        KindInfo(
            group="",
            kind="Service",
            versions=("v1",),
            model=kube.Service,
            plural="services",
            short_names=("svc",),
        ),
        KindInfo(
            group="",
            kind="ServiceAccount",
            versions=("v1",),
            model=kube.ServiceAccount,
            plural="serviceaccounts",
            short_names=("sa",),
        ),
        KindInfo(
            group="",
            kind="ConfigMap",
            versions=("v1",),
            model=kube.ConfigMap,
            plural="configmaps",
            short_names=("cm",),
        ),
        KindInfo(
            group="",
            kind="Pod",
            versions=("v1",),
            model=kube.Pod,
            plural="pods",
            short_names=("po",),
        ),
        KindInfo(
            group="apps",
            kind="Deployment",
            versions=("v1",),
            model=kube.Deployment,
            plural="deployments",
            short_names=("deploy",),
        ),
    )
)
"""The kinds meshlet serves."""
