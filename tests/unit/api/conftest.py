"""Helpers: build a resource from a spec and see what the loader says about it."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from meshlet.api import LoadedResource, load_documents
from meshlet.errors import ConfigError

API_VERSIONS = {
    "VirtualService": "networking.istio.io/v1",
    "DestinationRule": "networking.istio.io/v1",
    "Gateway": "networking.istio.io/v1",
    "ServiceEntry": "networking.istio.io/v1",
    "WorkloadEntry": "networking.istio.io/v1",
    "Sidecar": "networking.istio.io/v1",
    "PeerAuthentication": "security.istio.io/v1",
    "AuthorizationPolicy": "security.istio.io/v1",
    "RequestAuthentication": "security.istio.io/v1",
    "Telemetry": "telemetry.istio.io/v1",
    "Service": "v1",
    "Pod": "v1",
    "Deployment": "apps/v1",
}


def document(kind: str, spec: dict[str, Any], name: str = "x") -> str:
    return yaml.safe_dump(
        {"apiVersion": API_VERSIONS[kind], "kind": kind, "metadata": {"name": name}, "spec": spec},
        sort_keys=False,
    )


def load(kind: str, spec: dict[str, Any]) -> LoadedResource:
    [resource] = load_documents(document(kind, spec), "t.yaml")
    return resource


def errors(kind: str, spec: dict[str, Any]) -> list[str]:
    """``path: message`` of every problem (lines are tested in test_loader)."""
    with pytest.raises(ConfigError) as e:
        load_documents(document(kind, spec), "t.yaml")
    return [f"{p.path}: {p.message}" for p in e.value.problems]
