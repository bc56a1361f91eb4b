"""From manifests to what the runtime runs: kinds, commands, names and environments.

Kubernetes' rules kept: a pod is named ``<deployment>-<pod-template-hash>-<5 chars>`` and a
changed template gets a new hash; ``env`` overrides ``envFrom``; ``fieldRef`` and
``configMapKeyRef`` resolve as the kubelet resolves them; a missing ConfigMap that is not
``optional`` is an error (kubernetes.io "Configure a Pod to Use a ConfigMap").
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from meshlet.errors import ConfigError
from meshlet.runtime.manifests import (
    PodIdentity,
    check_kinds,
    container_argv,
    container_env,
    load_images,
    pod_name,
    template_hash,
)

POD = PodIdentity(
    name="reviews-v1-abc-x1",
    namespace="default",
    ip="127.1.0.9",
    service_account="bookinfo-reviews",
    labels={"app": "reviews", "version": "v1"},
)


def test_kinds_outside_the_runtime_and_istio_are_refused_by_place() -> None:
    objects = [
        {"apiVersion": "apps/v1", "kind": "Deployment"},
        {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService"},
        {"apiVersion": "apps/v1", "kind": "StatefulSet"},
    ]
    with pytest.raises(ConfigError) as e:
        check_kinds(objects, ["a.yaml:1", "a.yaml:20", "a.yaml:40"])
    [problem] = e.value.problems
    assert problem.path == "a.yaml:40: kind"
    assert "StatefulSet is not run by meshlet up" in problem.message


def test_a_template_hash_is_stable_and_changes_with_the_template() -> None:
    template = {"metadata": {"labels": {"app": "reviews"}}, "spec": {"containers": []}}
    assert template_hash(template) == template_hash(dict(template))
    restarted = {
        "metadata": {"labels": {"app": "reviews"}, "annotations": {"restartedAt": "now"}},
        "spec": {"containers": []},
    }
    assert template_hash(restarted) != template_hash(template)
    assert re.fullmatch(r"reviews-v1-[a-z0-9]{10}-[a-z0-9]{5}", pod_name("reviews-v1", "b" * 10))


def test_a_command_runs_as_given_and_an_image_through_the_maps(tmp_path: Path) -> None:
    maps = load_images()
    assert container_argv({"name": "a", "command": ["sleep"], "args": ["5"]}, maps) == [
        "sleep",
        "5",
    ]
    image = "registry.istio.io/release/examples-bookinfo-reviews-v2:1.20.3"
    argv = container_argv({"name": "r", "image": image}, maps)
    assert argv[0] == sys.executable  # `python` is meshlet's interpreter
    assert argv[-2:] == ["--version", "v2"]
    mine = tmp_path / "images.yaml"
    mine.write_text('"*/examples-bookinfo-reviews-v2:*": [my-reviews]\n')
    assert container_argv({"name": "r", "image": image}, load_images(mine)) == ["my-reviews"]
    with pytest.raises(ConfigError) as e:
        container_argv({"name": "x", "image": "example.com/unknown:1"}, maps)
    assert "no command for image 'example.com/unknown:1'" in e.value.render()
    assert "--images FILE" in e.value.render()


def test_the_environment_layers_envfrom_env_and_the_pods_own() -> None:
    config_maps = {("default", "settings"): {"MODE": "fast", "LEVEL": "1"}}
    container = {
        "name": "reviews",
        "envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "APP_"}],
        "env": [
            {"name": "APP_MODE", "value": "slow"},  # env wins over envFrom
            {"name": "ME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {
                "name": "VERSION",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['version']"}},
            },
            {
                "name": "LEVEL",
                "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "LEVEL"}},
            },
        ],
    }
    env = container_env(container, POD, config_maps)
    assert env["APP_MODE"] == "slow" and env["APP_LEVEL"] == "1"
    assert (env["ME"], env["IP"], env["VERSION"], env["LEVEL"]) == (
        "reviews-v1-abc-x1",
        "127.1.0.9",
        "v1",
        "1",
    )
    assert env["POD_IP"] == "127.1.0.9" and env["SERVICE_ACCOUNT"] == "bookinfo-reviews"
    assert env["HTTP_PROXY"] == env["http_proxy"] == "http://127.1.0.9:15001"
    assert env["NO_PROXY"] == "127.1.0.9"


def test_a_missing_config_map_is_an_error_unless_optional() -> None:
    missing = {"name": "c", "envFrom": [{"configMapRef": {"name": "nope"}}]}
    with pytest.raises(ConfigError) as e:
        container_env(missing, POD, {})
    assert "ConfigMap default/nope does not exist" in e.value.render()
    optional = {"name": "c", "envFrom": [{"configMapRef": {"name": "nope", "optional": True}}]}
    assert "POD_NAME" in container_env(optional, POD, {})
    unknown = {"name": "c", "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s"}}}]}
    with pytest.raises(ConfigError) as e:
        container_env(unknown, POD, {})
    assert "secretKeyRef is not supported" in e.value.render()
