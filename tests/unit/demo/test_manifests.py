"""The shipped manifests load with meshlet's own loader, mirror Istio's Bookinfo names, labels
and subsets, and every image they (and Istio's Bookinfo files) name has a command in the map."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshlet.api import LoadedResource, load_documents
from meshlet.demo import MANIFESTS, image_map, manifest
from meshlet.demo.images import ImageMap
from tests.samples import SAMPLES


def _load(name: str) -> list[LoadedResource]:
    return load_documents(manifest(name).read_text(encoding="utf-8"), name)


def _by_kind(name: str, kind: str) -> dict[str, LoadedResource]:
    return {r.name: r for r in _load(name) if r.kind == kind}


def _containers(resource: LoadedResource) -> list[dict[str, Any]]:
    containers: list[dict[str, Any]] = resource.raw["spec"]["template"]["spec"]["containers"]
    return containers


@pytest.mark.parametrize("name", MANIFESTS)
def test_each_manifest_loads_in_the_default_namespace(name: str) -> None:
    resources = _load(name)
    assert resources
    assert {r.namespace for r in resources} == {"default"}


def test_bookinfo_has_istios_services_accounts_and_deployments() -> None:
    services = _by_kind("bookinfo.yaml", "Service")
    assert set(services) == {"productpage", "details", "reviews", "ratings"}
    for name, service in services.items():
        assert service.raw["spec"]["selector"] == {"app": name}
        assert service.raw["spec"]["ports"] == [{"name": "http", "port": 9080}]
    accounts = _by_kind("bookinfo.yaml", "ServiceAccount")
    assert set(accounts) == {f"bookinfo-{s}" for s in services}
    deployments = _by_kind("bookinfo.yaml", "Deployment")
    assert set(deployments) == {
        "productpage-v1",
        "details-v1",
        "ratings-v1",
        "reviews-v1",
        "reviews-v2",
        "reviews-v3",
    }
    for name, deployment in deployments.items():
        app, version = name.rsplit("-", 1)
        labels = {"app": app, "version": version}
        assert deployment.labels == labels
        template = deployment.raw["spec"]["template"]
        assert template["metadata"]["labels"] == labels
        assert deployment.raw["spec"]["selector"]["matchLabels"] == labels
        assert template["spec"]["serviceAccountName"] == f"bookinfo-{app}"
        [container] = _containers(deployment)
        assert "command" not in container  # the image map chooses the command
        assert container["ports"] == [{"containerPort": 9080}]


def test_the_gateway_and_its_virtual_service_route_the_page_to_productpage() -> None:
    [gateway] = _by_kind("gateway.yaml", "Gateway").values()
    assert gateway.name == "bookinfo-gateway"
    assert gateway.raw["spec"]["selector"] == {"istio": "ingressgateway"}
    [server] = gateway.raw["spec"]["servers"]
    assert server["port"] == {"name": "http", "number": 8080, "protocol": "HTTP"}
    assert server["hosts"] == ["*"]
    [vs] = _by_kind("gateway.yaml", "VirtualService").values()
    assert vs.name == "bookinfo"
    assert vs.raw["spec"]["gateways"] == ["bookinfo-gateway"]
    [http] = vs.raw["spec"]["http"]
    assert [m["uri"] for m in http["match"]] == [
        {"exact": "/productpage"},
        {"prefix": "/static"},
        {"exact": "/login"},
        {"exact": "/logout"},
        {"prefix": "/api/v1/products"},
    ]
    assert http["route"] == [{"destination": {"host": "productpage", "port": {"number": 9080}}}]


def _subsets(resources: list[LoadedResource]) -> dict[str, list[tuple[str, dict[str, str]]]]:
    return {
        r.raw["spec"]["host"]: [(s["name"], s["labels"]) for s in r.raw["spec"]["subsets"]]
        for r in resources
        if r.kind == "DestinationRule"
    }


def test_destination_rules_have_a_subset_per_version() -> None:
    subsets = _subsets(_load("destination-rules.yaml"))
    names = {host: [name for name, _ in s] for host, s in subsets.items()}
    assert names == {
        "productpage": ["v1"],
        "reviews": ["v1", "v2", "v3"],
        "ratings": ["v1", "v2", "v2-mysql", "v2-mysql-vm"],
        "details": ["v1", "v2"],
    }
    for s in subsets.values():
        assert all(labels == {"version": name} for name, labels in s)


needs_samples = pytest.mark.skipif(SAMPLES is None, reason="Istio's samples are not present")


@needs_samples
def test_destination_rules_match_istios_destination_rule_all() -> None:
    assert SAMPLES is not None
    path = SAMPLES / "bookinfo" / "networking" / "destination-rule-all.yaml"
    istio = _subsets(load_documents(path.read_text(), str(path)))
    assert _subsets(_load("destination-rules.yaml")) == istio


@needs_samples
def test_the_gateway_matches_istios_bookinfo_gateway() -> None:
    assert SAMPLES is not None
    path = SAMPLES / "bookinfo" / "networking" / "bookinfo-gateway.yaml"
    istio = {(r.kind, r.name): r.raw["spec"] for r in load_documents(path.read_text(), str(path))}
    ours = {(r.kind, r.name): r.raw["spec"] for r in _load("gateway.yaml")}
    assert ours == istio


# -- the image map ------------------------------------------------------------------------------


def _images(resources: list[LoadedResource]) -> Iterator[str]:
    for r in resources:
        if r.kind == "Deployment":
            for container in _containers(r):
                yield container["image"]


def _istio_bookinfo_images() -> list[str]:
    if SAMPLES is None:
        return []
    kube = SAMPLES / "bookinfo" / "platform" / "kube"
    images: set[str] = set()
    for path in sorted(kube.glob("*.yaml")):
        images.update(_images(load_documents(path.read_text(), str(path), unknown="skip")))
    return sorted(images)


def test_every_image_of_our_manifest_runs_the_matching_service() -> None:
    table = ImageMap.bookinfo()
    deployments = _by_kind("bookinfo.yaml", "Deployment")
    for name, deployment in deployments.items():
        app, version = name.rsplit("-", 1)
        [container] = _containers(deployment)
        command = table.command_for(container["image"], "/py")
        assert command is not None, container["image"]
        assert command[:4] == ["/py", "-m", "meshlet.demo.bookinfo", app]
        if app == "reviews":
            assert command[4:] == ["--version", version]


@needs_samples
@pytest.mark.parametrize("image", _istio_bookinfo_images() or ["none"])
def test_every_image_of_istios_bookinfo_has_a_command(image: str) -> None:
    assert ImageMap.bookinfo().command_for(image, sys.executable) is not None


def test_the_map_is_a_mapping_of_pattern_to_command_list() -> None:
    data = yaml.safe_load(image_map().read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    assert all(isinstance(v, list) and v[0] == "python" for v in data.values())


def test_the_first_matching_pattern_wins_and_python_is_replaced() -> None:
    table = ImageMap.parse("'*/a:*': [python, one]\n'*': [two, python]\n")
    assert table.command_for("x/a:1", "/usr/bin/py3") == ["/usr/bin/py3", "one"]
    assert table.command_for("x/b:1", "/usr/bin/py3") == ["two", "python"]
    assert ImageMap.parse("'x/*': [a]\n").command_for("y/z:1", "p") is None


def test_patterns_match_the_whole_reference_case_sensitively() -> None:
    table = ImageMap.parse("'*/examples-bookinfo-ratings-v1:*': [r]\n")
    assert table.command_for("docker.io/istio/examples-bookinfo-ratings-v1:1.20.3", "p") == ["r"]
    assert table.command_for("examples-bookinfo-ratings-v1:1.20.3", "p") is None
    assert table.command_for("docker.io/istio/EXAMPLES-bookinfo-ratings-v1:1", "p") is None
    assert table.command_for("docker.io/istio/examples-bookinfo-ratings-v10:1", "p") is None


@pytest.mark.parametrize(
    "text", ["[a, b]\n", "'x': []\n", "'x': 'run me'\n", "'x': [1]\n", "'': [a]\n"]
)
def test_a_malformed_map_is_refused_with_its_source(text: str) -> None:
    with pytest.raises(ValueError, match="my-map"):
        ImageMap.parse(text, "my-map")


def test_an_empty_map_matches_nothing() -> None:
    assert ImageMap.parse("").command_for("x", "p") is None


def test_the_manifests_and_the_map_are_files_of_the_package() -> None:
    # Installed from a wheel these must be package data (pyproject's package-data).
    for name in MANIFESTS:
        assert Path(str(manifest(name))).is_file()
    assert Path(str(image_map())).is_file()
    with pytest.raises(ValueError, match=r"bookinfo\.yaml"):
        manifest("nope.yaml")
