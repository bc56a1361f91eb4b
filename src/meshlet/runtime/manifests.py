"""From Kubernetes-shaped objects to what the runtime runs: pure functions, no I/O beyond
reading an image map file.

* **Kinds**: ``meshlet up`` takes Namespace, ServiceAccount, Service, Deployment and ConfigMap,
  and every Istio kind (they go to the control plane). Anything else is refused by name.
* **Image map**: a container with ``command`` runs it (with ``args``). A container with only an
  ``image`` runs the command an image map names for it (``meshlet.demo.images``: image glob ->
  command, first match wins), the user's maps before the shipped one
  (``meshlet/demo/images.yaml``, for Istio's Bookinfo images).
* **Pods** get Kubernetes-style names: ``<deployment>-<pod-template-hash>-<5 chars>``, where
  the hash is a digest of the pod template (a changed template, such as a rollout restart's
  annotation, makes a new hash: a new ReplicaSet in Kubernetes' terms).
* **Environment**: the container's ``env`` (``value``, and ``valueFrom.fieldRef`` for
  ``metadata.name``, ``metadata.namespace``, ``metadata.labels['k']``, ``status.podIP``,
  ``spec.serviceAccountName``, and ``configMapKeyRef``) after its ``envFrom`` ConfigMaps,
  on top of what the runtime gives every container: ``POD_NAME``, ``POD_NAMESPACE``,
  ``POD_IP``, ``SERVICE_ACCOUNT``, ``HTTP_PROXY``/``http_proxy`` (the sidecar's outbound
  listener) and ``NO_PROXY``/``no_proxy`` (the pod's own IP), ``PATH``, ``HOME``, ``LANG``.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshlet.demo.images import ImageMap
from meshlet.errors import ConfigError, Problem

#: Kinds of the Kubernetes core and apps groups the runtime runs or keeps.
WORKLOAD_KINDS = ("Namespace", "ServiceAccount", "Service", "Deployment", "ConfigMap")
ISTIO_GROUPS = ("networking.istio.io", "security.istio.io", "telemetry.istio.io")
TEMPLATE_HASH_LABEL = "pod-template-hash"
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"
OUTBOUND_PORT = 15001
_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # Kubernetes' rand.String alphabet: no vowels
_PASSED_THROUGH = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "PYTHONPATH", "VIRTUAL_ENV", "TMPDIR")


def check_kinds(objects: Sequence[Mapping[str, Any]], where: Sequence[str]) -> None:
    """Raise ``ConfigError`` naming each object whose kind ``meshlet up`` does not run."""
    problems = []
    for obj, place in zip(objects, where, strict=True):
        kind = str(obj.get("kind", ""))
        group = str(obj.get("apiVersion", "")).rpartition("/")[0]
        if group in ISTIO_GROUPS or kind in WORKLOAD_KINDS:
            continue
        problems.append(
            Problem(
                path=f"{place}: kind",
                message=f"{kind or '(none)'} is not run by meshlet up (it runs "
                + ", ".join(WORKLOAD_KINDS)
                + ", and Istio's kinds)",
            )
        )
    if problems:
        raise ConfigError(problems)


# -- images ----------------------------------------------------------------------------------


def load_images(*paths: Path) -> list[ImageMap]:
    """The user's image maps (in order), then the one meshlet ships; ``ConfigError`` for a
    missing or malformed file."""
    maps = []
    for path in paths:
        try:
            maps.append(ImageMap.parse(path.read_text(), str(path)))
        except (OSError, ValueError) as e:
            raise ConfigError.at(f"{path}", f"cannot read the image map: {e}") from None
    maps.append(ImageMap.bookinfo())
    return maps


def container_argv(container: Mapping[str, Any], images: Sequence[ImageMap]) -> list[str]:
    """What a container runs; ``ConfigError`` when neither it nor an image map says."""
    command = [str(c) for c in container.get("command") or ()]
    args = [str(a) for a in container.get("args") or ()]
    if not command:
        image = str(container.get("image") or "")
        mapped = next(
            (c for m in images if (c := m.command_for(image, sys.executable)) is not None), None
        )
        if mapped is None:
            raise ConfigError.at(
                f"container {container.get('name')}: image",
                f"no command for image {image!r}: give the container a command, or map the"
                " image to one in an image map (meshlet up --images FILE)",
            )
        command = mapped
    return command + args


# -- pods ------------------------------------------------------------------------------------


def template_hash(template: Mapping[str, Any]) -> str:
    """A stable 10-character digest of a pod template (Kubernetes' pod-template-hash)."""
    digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).digest()
    number = int.from_bytes(digest[:8], "big")
    chars = []
    for _ in range(10):
        number, r = divmod(number, len(_ALPHABET))
        chars.append(_ALPHABET[r])
    return "".join(chars)


def pod_name(deployment: str, hash_: str) -> str:
    suffix = "".join(secrets.choice(_ALPHABET) for _ in range(5))
    return f"{deployment}-{hash_}-{suffix}"


@dataclass(frozen=True, slots=True, kw_only=True)
class PodIdentity:
    name: str
    namespace: str
    ip: str
    service_account: str
    labels: Mapping[str, str]


def container_env(
    container: Mapping[str, Any],
    pod: PodIdentity,
    config_maps: Mapping[tuple[str, str], Mapping[str, str]],
    *,
    sidecar: bool = True,
) -> dict[str, str]:
    """The environment of one container of ``pod``; ``ConfigError`` for a reference that
    cannot be resolved (a missing ConfigMap or key that is not optional)."""
    env = {k: os.environ[k] for k in _PASSED_THROUGH if k in os.environ}
    env.update(
        POD_NAME=pod.name,
        POD_NAMESPACE=pod.namespace,
        POD_IP=pod.ip,
        SERVICE_ACCOUNT=pod.service_account,
        PYTHONUNBUFFERED="1",
    )
    if sidecar:
        proxy = f"http://{pod.ip}:{OUTBOUND_PORT}"
        env.update(HTTP_PROXY=proxy, http_proxy=proxy, NO_PROXY=pod.ip, no_proxy=pod.ip)
    name = container.get("name")
    for i, source in enumerate(container.get("envFrom") or ()):
        ref = source.get("configMapRef") or {}
        data = config_maps.get((pod.namespace, str(ref.get("name"))))
        if data is None:
            if ref.get("optional"):
                continue
            raise ConfigError.at(
                f"container {name}: envFrom[{i}].configMapRef",
                f"ConfigMap {pod.namespace}/{ref.get('name')} does not exist",
            )
        prefix = str(source.get("prefix") or "")
        env.update({prefix + k: v for k, v in data.items()})
    for i, var in enumerate(container.get("env") or ()):
        value = var.get("value")
        source = var.get("valueFrom")
        if source:
            value = _value_from(source, pod, config_maps, f"container {name}: env[{i}]")
        if value is not None:
            env[str(var["name"])] = str(value)
    return env


def _value_from(
    source: Mapping[str, Any],
    pod: PodIdentity,
    config_maps: Mapping[tuple[str, str], Mapping[str, str]],
    where: str,
) -> str | None:
    field = (source.get("fieldRef") or {}).get("fieldPath")
    if field:
        fields = {
            "metadata.name": pod.name,
            "metadata.namespace": pod.namespace,
            "status.podIP": pod.ip,
            "status.hostIP": "127.0.0.1",
            "spec.serviceAccountName": pod.service_account,
            "spec.nodeName": "meshlet",
        }
        if field in fields:
            return fields[field]
        if field.startswith("metadata.labels['") and field.endswith("']"):
            return pod.labels.get(field[len("metadata.labels['") : -2], "")
        raise ConfigError.at(f"{where}.valueFrom.fieldRef.fieldPath", f"{field} is not supported")
    ref = source.get("configMapKeyRef")
    if ref:
        data = config_maps.get((pod.namespace, str(ref.get("name"))))
        if data is None or ref.get("key") not in data:
            if ref.get("optional"):
                return None
            raise ConfigError.at(
                f"{where}.valueFrom.configMapKeyRef",
                f"ConfigMap {pod.namespace}/{ref.get('name')} has no key {ref.get('key')!r}",
            )
        return data[str(ref["key"])]
    kinds = ", ".join(sorted(source))
    raise ConfigError.at(
        f"{where}.valueFrom", f"{kinds} is not supported (fieldRef, configMapKeyRef)"
    )


def named_ports(container: Mapping[str, Any]) -> dict[str, int]:
    return {
        str(p["name"]): int(p["containerPort"])
        for p in container.get("ports") or ()
        if p.get("name") and p.get("containerPort")
    }
