"""Kubernetes kinds: strict where the schema is small, open inside pod templates."""

from __future__ import annotations

from typing import Any

import pytest

from meshlet.api import load_documents
from meshlet.errors import ConfigError

from .conftest import errors, load


def pod_spec(**container: Any) -> dict[str, Any]:
    return {"containers": [{"name": "web", "image": "web:1", **container}]}


def deployment(labels: dict[str, str], template_labels: dict[str, str]) -> dict[str, Any]:
    return {
        "selector": {"matchLabels": labels},
        "template": {"metadata": {"labels": template_labels}, "spec": pod_spec()},
    }


def test_pod_templates_keep_fields_meshlet_does_not_use() -> None:
    spec = dict(deployment({"app": "web"}, {"app": "web", "version": "v1"}))
    spec["template"]["spec"] = {
        **pod_spec(resources={"requests": {"cpu": "100m"}}, securityContext={"runAsUser": 1000}),
        "volumes": [{"name": "tmp", "emptyDir": {}}],
        "nodeSelector": {"disk": "ssd"},
    }
    d = load("Deployment", spec)
    pod = d.model.spec.template.spec
    assert pod.containers[0].image == "web:1"
    assert pod.model_extra == {
        "volumes": [{"name": "tmp", "emptyDir": {}}],
        "nodeSelector": {"disk": "ssd"},
    }
    assert d.model.model_dump(mode="json", exclude_unset=True) == d.raw
    assert d.model.spec.effective_replicas == 1
    assert pod.effective_service_account == "default"


def test_the_selector_must_match_the_template_labels() -> None:
    assert errors("Deployment", deployment({"app": "web"}, {"app": "api"})) == [
        "spec.template.metadata.labels: `selector` does not match template `labels`"
    ]


def test_deployment_spec_itself_is_strict() -> None:
    spec = {**deployment({"app": "web"}, {"app": "web"}), "replica": 3}
    [message] = errors("Deployment", spec)
    assert message.startswith("spec.replica: unknown field 'replica'; did you mean 'replicas'?")


def test_service_ports_need_names_when_there_are_several() -> None:
    spec = {"selector": {"app": "web"}, "ports": [{"port": 80, "name": "http"}, {"port": 443}]}
    assert errors("Service", spec) == [
        "spec.ports[1].name: required when a service has more than one port"
    ]


def test_target_port_is_a_number_or_a_port_name() -> None:
    named = load("Service", {"ports": [{"port": 80, "targetPort": "http-web"}]}).model.spec
    assert named.ports[0].effective_target_port == "http-web"
    numbered = load("Service", {"ports": [{"port": 80, "targetPort": 8080}]}).model.spec
    assert numbered.ports[0].effective_target_port == 8080
    assert (
        load("Service", {"ports": [{"port": 80}]}).model.spec.ports[0].effective_target_port == 80
    )
    assert errors("Service", {"ports": [{"port": 80, "targetPort": 1.5}]}) == [
        "spec.ports[0].targetPort: expected an integer or a string"
    ]
    assert errors("Service", {"ports": [{"port": 80, "targetPort": "HTTP_WEB"}]}) == [
        "spec.ports[0].targetPort: 'HTTP_WEB' must be an IANA service name: at most 15 "
        "lowercase letters, digits and '-'"
    ]


def test_service_names_are_dns_1035_labels() -> None:
    text = "apiVersion: v1\nkind: Service\nmetadata: {name: 1web}\nspec: {ports: [{port: 80}]}\n"
    with pytest.raises(ConfigError) as e:
        load_documents(text, "s.yaml")
    assert str(e.value).startswith(
        "s.yaml:3: metadata.name: service name '1web' must be a DNS-1035 label"
    )


def test_containers_are_named_and_unique() -> None:
    spec = {"containers": [{"name": "web"}, {"name": "web"}]}
    assert errors("Pod", spec) == ["spec.containers[1].name: duplicate container name 'web'"]
