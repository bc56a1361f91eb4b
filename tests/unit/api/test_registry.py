"""The kind registry: apiVersion + kind to schema, and kubectl's names for each kind."""

from __future__ import annotations

import pytest

from meshlet.api import REGISTRY, UnknownKindError, kube, networking, security, telemetry


@pytest.mark.parametrize(
    ("typed", "kind"),
    [
        ("vs", "VirtualService"),
        ("virtualservice", "VirtualService"),
        ("virtualservices", "VirtualService"),
        ("VirtualService", "VirtualService"),
        ("virtualservices.networking.istio.io", "VirtualService"),
        ("dr", "DestinationRule"),
        ("se", "ServiceEntry"),
        ("serviceentries", "ServiceEntry"),
        ("gw", "Gateway"),
        ("we", "WorkloadEntry"),
        ("sidecars", "Sidecar"),
        ("pa", "PeerAuthentication"),
        ("ap", "AuthorizationPolicy"),
        ("authorizationpolicies", "AuthorizationPolicy"),
        ("ra", "RequestAuthentication"),
        ("telemetries", "Telemetry"),
        ("svc", "Service"),
        ("sa", "ServiceAccount"),
        ("ns", "Namespace"),
        ("deploy", "Deployment"),
        ("deployments.apps", "Deployment"),
        ("cm", "ConfigMap"),
        ("po", "Pod"),
    ],
)
def test_kubectl_style_names_resolve(typed: str, kind: str) -> None:
    assert REGISTRY.resolve(typed).kind == kind


def test_an_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(UnknownKindError) as e:
        REGISTRY.resolve("httproutes")
    assert "doesn't have a resource type 'httproutes'" in str(e.value)
    assert "virtualservices (vs)" in str(e.value)


@pytest.mark.parametrize(
    ("api_version", "kind", "model"),
    [
        ("networking.istio.io/v1", "VirtualService", networking.VirtualService),
        ("networking.istio.io/v1beta1", "VirtualService", networking.VirtualService),
        ("networking.istio.io/v1alpha3", "DestinationRule", networking.DestinationRule),
        ("networking.istio.io/v1alpha3", "Sidecar", networking.Sidecar),
        ("security.istio.io/v1beta1", "AuthorizationPolicy", security.AuthorizationPolicy),
        ("security.istio.io/v1", "PeerAuthentication", security.PeerAuthentication),
        ("telemetry.istio.io/v1alpha1", "Telemetry", telemetry.Telemetry),
        ("v1", "Service", kube.Service),
        ("apps/v1", "Deployment", kube.Deployment),
    ],
)
def test_every_served_version_maps_to_the_one_schema(
    api_version: str, kind: str, model: type
) -> None:
    info = REGISTRY.lookup(api_version, kind)
    assert info is not None and info.model is model


def test_versions_and_scopes() -> None:
    vs = REGISTRY.resolve("vs")
    assert vs.preferred_api_version == "networking.istio.io/v1"
    assert vs.api_versions == (
        "networking.istio.io/v1",
        "networking.istio.io/v1beta1",
        "networking.istio.io/v1alpha3",
    )
    assert not REGISTRY.resolve("ns").namespaced
    assert REGISTRY.resolve("svc").namespaced
    assert REGISTRY.lookup("networking.istio.io/v2", "VirtualService") is None
    assert REGISTRY.lookup("gateway.networking.k8s.io/v1", "Gateway") is None
    assert REGISTRY.kinds_for("apps/v1") == ("Deployment",)
