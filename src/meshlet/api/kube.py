"""The Kubernetes kinds a mesh needs: Namespace, Service, ServiceAccount, ConfigMap, Pod
(``v1``) and Deployment (``apps/v1``).

Each declares the fields the registry, the embedded runtime and ``analyze`` use, typed and
checked as the API server checks them. Small, closed schemas (ObjectMeta, ServiceSpec,
DeploymentSpec, ports, env vars) are strict, so a typo is caught; a pod spec and its
containers keep unknown fields (``KubeOpenModel``), because real manifests carry many fields
(resources, securityContext, volumes, ...) that meshlet passes over.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field, model_validator

from meshlet.api.schema import (
    Bool,
    Int,
    IntOrString,
    Issues,
    KubeModel,
    KubeOpenModel,
    Labels,
    NonNegativeInt,
    ObjectMeta,
    Port,
    Resource,
    is_dns1123_label,
)

_IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def is_dns1035_label(value: str) -> bool:
    return len(value) <= 63 and bool(_DNS1035_LABEL.match(value))


def _port_name_problem(name: str) -> str | None:
    """Kubernetes ``IsValidPortName`` (an IANA service name)."""
    if len(name) > 15 or not _IANA_SVC_NAME.match(name) or "--" in name:
        return (
            f"{name!r} must be an IANA service name: at most 15 lowercase letters, digits and '-'"
        )
    if not any(c.isalpha() for c in name):
        return f"{name!r} must contain at least one letter"
    return None


def _target_port_problem(value: int | str) -> str | None:
    if isinstance(value, int):
        return None if 1 <= value <= 65535 else f"{value} must be in the range 1..65535"
    return _port_name_problem(value)


class Protocol(StrEnum):
    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"


# -- Namespace, ServiceAccount, ConfigMap ------------------------------------------------------


class NamespaceSpec(KubeModel):
    finalizers: tuple[str, ...] = ()


class Namespace(Resource):
    spec: NamespaceSpec | None = None


class ServiceAccount(Resource):
    secrets: tuple[dict[str, Any], ...] = ()
    image_pull_secrets: tuple[dict[str, Any], ...] = ()
    automount_service_account_token: Bool | None = None


class ConfigMap(Resource):
    data: dict[str, str] = {}
    binary_data: dict[str, str] = {}
    immutable: Bool | None = None


# -- Service -----------------------------------------------------------------------------------


class ServiceType(StrEnum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    LOAD_BALANCER = "LoadBalancer"
    EXTERNAL_NAME = "ExternalName"


class ServicePort(KubeModel):
    name: str = ""
    protocol: Protocol = Protocol.TCP
    app_protocol: str = ""
    port: Port
    target_port: IntOrString | None = None
    node_port: Int | None = None

    @model_validator(mode="after")
    def _check(self) -> ServicePort:
        issues = Issues()
        if self.name and not is_dns1123_label(self.name):
            issues.add(("name",), f"{self.name!r} must be a DNS-1123 label")
        if self.target_port is not None:
            problem = _target_port_problem(self.target_port)
            if problem:
                issues.add(("targetPort",), problem)
        issues.raise_if_any("ServicePort")
        return self

    @property
    def effective_target_port(self) -> int | str:
        """``targetPort``, or ``port`` when it is not given (Kubernetes' default)."""
        return self.target_port if self.target_port is not None else self.port


class ServiceSpec(KubeModel):
    ports: tuple[ServicePort, ...] = ()
    selector: dict[str, str] = {}
    type: ServiceType = ServiceType.CLUSTER_IP
    cluster_ip: Annotated[str, Field(alias="clusterIP")] = ""
    cluster_ips: Annotated[tuple[str, ...], Field(alias="clusterIPs")] = ()
    external_ips: Annotated[tuple[str, ...], Field(alias="externalIPs")] = ()
    external_name: str = ""
    session_affinity: str = ""
    session_affinity_config: dict[str, Any] | None = None
    load_balancer_ip: Annotated[str, Field(alias="loadBalancerIP")] = ""
    load_balancer_source_ranges: tuple[str, ...] = ()
    load_balancer_class: str | None = None
    external_traffic_policy: str = ""
    internal_traffic_policy: str = ""
    health_check_node_port: Int | None = None
    publish_not_ready_addresses: Bool = False
    ip_families: tuple[str, ...] = ()
    ip_family_policy: str = ""
    allocate_load_balancer_node_ports: Bool | None = None
    traffic_distribution: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ServiceSpec:
        issues = Issues()
        names: set[str] = set()
        seen: set[tuple[int, str]] = set()
        for i, port in enumerate(self.ports):
            if len(self.ports) > 1 and not port.name:
                issues.add(("ports", i, "name"), "required when a service has more than one port")
            if port.name and port.name in names:
                issues.add(("ports", i, "name"), f"duplicate port name {port.name!r}")
            names.add(port.name)
            key = (port.port, port.protocol.value)
            if key in seen:
                issues.add(("ports", i), f"duplicate port {port.port}/{port.protocol.value}")
            seen.add(key)
        if self.type is ServiceType.EXTERNAL_NAME and not self.external_name:
            issues.add(("externalName",), "required for a service of type ExternalName")
        if self.type is not ServiceType.EXTERNAL_NAME and not self.ports:
            issues.add(("ports",), "a service needs at least one port")
        issues.raise_if_any("ServiceSpec")
        return self

    @property
    def headless(self) -> bool:
        return self.cluster_ip == "None"


class Service(Resource):
    spec: ServiceSpec

    @model_validator(mode="after")
    def _check_name(self) -> Service:
        if self.metadata.name and not is_dns1035_label(self.metadata.name):
            issues = Issues()
            issues.add(
                ("metadata", "name"),
                f"service name {self.metadata.name!r} must be a DNS-1035 label: at most 63 "
                "lowercase letters, digits and '-', starting with a letter",
            )
            issues.raise_if_any("Service")
        return self


# -- pods --------------------------------------------------------------------------------------


class ContainerPort(KubeModel):
    container_port: Port
    name: str = ""
    protocol: Protocol = Protocol.TCP
    host_port: Int | None = None
    host_ip: Annotated[str, Field(alias="hostIP")] = ""

    @model_validator(mode="after")
    def _check(self) -> ContainerPort:
        if self.name:
            problem = _port_name_problem(self.name)
            if problem:
                issues = Issues()
                issues.add(("name",), problem)
                issues.raise_if_any("ContainerPort")
        return self


class EnvVar(KubeModel):
    name: Annotated[str, Field(min_length=1)]
    value: str = ""
    value_from: dict[str, Any] | None = None


class HTTPGetAction(KubeOpenModel):
    path: str = "/"
    port: IntOrString
    host: str = ""
    scheme: str = "HTTP"


class TCPSocketAction(KubeOpenModel):
    port: IntOrString
    host: str = ""


class ExecAction(KubeOpenModel):
    command: tuple[str, ...] = ()


class Probe(KubeOpenModel):
    http_get: HTTPGetAction | None = None
    tcp_socket: TCPSocketAction | None = None
    exec: ExecAction | None = None
    initial_delay_seconds: NonNegativeInt = 0
    period_seconds: NonNegativeInt = 10
    timeout_seconds: NonNegativeInt = 1
    success_threshold: NonNegativeInt = 1
    failure_threshold: NonNegativeInt = 3


class Container(KubeOpenModel):
    name: str
    image: str = ""
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    working_dir: str = ""
    env: tuple[EnvVar, ...] = ()
    ports: tuple[ContainerPort, ...] = ()
    readiness_probe: Probe | None = None
    liveness_probe: Probe | None = None
    startup_probe: Probe | None = None
    image_pull_policy: str = ""

    @model_validator(mode="after")
    def _check(self) -> Container:
        if not is_dns1123_label(self.name):
            issues = Issues()
            issues.add(("name",), f"container name {self.name!r} must be a DNS-1123 label")
            issues.raise_if_any("Container")
        return self


class PodSpec(KubeOpenModel):
    containers: tuple[Container, ...]
    init_containers: tuple[Container, ...] = ()
    service_account_name: str = ""
    service_account: str = ""  # deprecated alias of serviceAccountName
    termination_grace_period_seconds: NonNegativeInt | None = None
    host_network: Bool = False
    restart_policy: str = ""

    @model_validator(mode="after")
    def _check(self) -> PodSpec:
        issues = Issues()
        if not self.containers:
            issues.add(("containers",), "a pod needs at least one container")
        names: set[str] = set()
        for field, containers in (
            ("initContainers", self.init_containers),
            ("containers", self.containers),
        ):
            for i, container in enumerate(containers):
                if container.name in names:
                    issues.add((field, i, "name"), f"duplicate container name {container.name!r}")
                names.add(container.name)
        issues.raise_if_any("PodSpec")
        return self

    @property
    def effective_service_account(self) -> str:
        """The pod's service account: ``serviceAccountName``, else ``default``."""
        return self.service_account_name or self.service_account or "default"


class Pod(Resource):
    spec: PodSpec


# -- Deployment --------------------------------------------------------------------------------


class SelectorOperator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


class LabelSelectorRequirement(KubeModel):
    key: str
    operator: SelectorOperator
    values: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> LabelSelectorRequirement:
        needs_values = self.operator in (SelectorOperator.IN, SelectorOperator.NOT_IN)
        if needs_values and not self.values:
            raise ValueError(f"values must be non-empty for operator {self.operator.value}")
        if not needs_values and self.values:
            raise ValueError(f"values must be empty for operator {self.operator.value}")
        return self

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        if self.operator is SelectorOperator.EXISTS:
            return present
        if self.operator is SelectorOperator.DOES_NOT_EXIST:
            return not present
        inside = present and labels[self.key] in self.values
        return inside if self.operator is SelectorOperator.IN else not inside


class LabelSelector(KubeModel):
    match_labels: Labels = {}
    match_expressions: tuple[LabelSelectorRequirement, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        """Kubernetes selector semantics: every label and every expression must match."""
        return all(labels.get(k) == v for k, v in self.match_labels.items()) and all(
            e.matches(labels) for e in self.match_expressions
        )


class PodTemplateSpec(KubeModel):
    metadata: ObjectMeta = ObjectMeta()
    spec: PodSpec


class DeploymentSpec(KubeModel):
    replicas: NonNegativeInt | None = None
    selector: LabelSelector
    template: PodTemplateSpec
    strategy: dict[str, Any] | None = None
    min_ready_seconds: NonNegativeInt = 0
    revision_history_limit: NonNegativeInt | None = None
    progress_deadline_seconds: NonNegativeInt | None = None
    paused: Bool = False

    @model_validator(mode="after")
    def _check(self) -> DeploymentSpec:
        issues = Issues()
        if not self.selector.match_labels and not self.selector.match_expressions:
            issues.add(("selector",), "empty selector is invalid for a deployment")
        elif not self.selector.matches(self.template.metadata.labels):
            issues.add(
                ("template", "metadata", "labels"), "`selector` does not match template `labels`"
            )
        issues.raise_if_any("DeploymentSpec")
        return self

    @property
    def effective_replicas(self) -> int:
        """``replicas``, or 1 when it is not given (Kubernetes' default)."""
        return 1 if self.replicas is None else self.replicas


class Deployment(Resource):
    spec: DeploymentSpec
