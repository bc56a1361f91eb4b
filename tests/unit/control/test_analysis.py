"""``meshlet analyze``'s findings: YAML in, istioctl's messages out."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshlet.api import load_documents
from meshlet.control.analysis import Level, analyze
from tests.samples import SAMPLES as _FOUND

SAMPLES = (_FOUND or Path("/nonexistent")) / "bookinfo"

SERVICES = """
apiVersion: v1
kind: Service
metadata: {name: reviews}
spec:
  ports: [{port: 9080, name: http}]
  selector: {app: reviews}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets: [{name: v1, labels: {version: v1}}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*.example.com"]
"""


def findings(text: str) -> list[str]:
    return [str(f) for f in analyze(load_documents(SERVICES + "---\n" + text, "in.yaml"))]


def test_a_clean_set_has_no_findings() -> None:
    text = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http: [{route: [{destination: {host: reviews, subset: v1}}]}]
"""
    assert findings(text) == []


def test_missing_hosts_subsets_and_gateways_are_errors() -> None:
    text = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: broken}
spec:
  hosts: [reviews]
  gateways: [nowhere, mesh]
  http:
  - route:
    - {destination: {host: ratings, subset: v1}, weight: 40}
    - {destination: {host: ratings, subset: v2}, weight: 40}
    - {destination: {host: reviews, subset: v9}, weight: 20}
"""
    found = findings(text)
    assert found == [
        "Error [IST0101] (VirtualService default/broken in.yaml:26) Referenced gateway not found:"
        ' "default/nowhere"',
        "Error [IST0101] (VirtualService default/broken in.yaml:26) Referenced host not found:"
        ' "ratings"',
        "Error [IST0101] (VirtualService default/broken in.yaml:26) Referenced host+subset in"
        ' destinationrule not found: "reviews+v9"',
    ]


def test_two_mesh_virtual_services_for_one_host_conflict() -> None:
    vs = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: %s}
spec:
  hosts: [reviews.default.svc.cluster.local]
  http: [{route: [{destination: {host: reviews}}]}]
"""
    found = findings(vs % "a" + "---\n" + vs % "b")
    assert len(found) == 2
    assert all("[IST0109]" in f and "default/a,default/b" in f for f in found)


def test_a_host_the_gateway_does_not_serve_is_a_warning() -> None:
    text = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web}
spec:
  hosts: [shop.example.com, other.org]
  gateways: [gw]
  http: [{route: [{destination: {host: reviews}}]}]
"""
    [finding] = analyze(load_documents(SERVICES + "---\n" + text, "in.yaml"))
    assert finding.level is Level.WARNING
    assert finding.code == "IST0132"
    assert "['other.org']" in finding.message


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="Istio samples not present")
def test_every_bookinfo_routing_sample_is_clean_with_its_rules() -> None:
    base = [
        SAMPLES / "platform" / "kube" / "bookinfo.yaml",
        SAMPLES / "networking" / "destination-rule-all.yaml",
        SAMPLES / "networking" / "bookinfo-gateway.yaml",
    ]
    for sample in sorted((SAMPLES / "networking").glob("virtual-service-*.yaml")):
        resources = []
        for path in [*base, sample]:
            resources += load_documents(path.read_text(), str(path))
        assert [str(f) for f in analyze(resources)] == [], sample.name
