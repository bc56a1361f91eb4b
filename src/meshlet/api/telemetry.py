"""telemetry.istio.io: Telemetry (apiVersions v1 and v1alpha1, one schema).

Schema only for now: which providers trace, log and count, for which workloads, with what
sampling and tag overrides. Behaviour comes with the telemetry issue.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import Field, model_validator

from meshlet.api.schema import Bool, Issues, IstioModel, MinDuration, PercentFloat, Resource
from meshlet.api.selectors import PolicySelector, PolicyTargetReference, check_one_target


class WorkloadMode(StrEnum):
    CLIENT_AND_SERVER = "CLIENT_AND_SERVER"
    CLIENT = "CLIENT"
    SERVER = "SERVER"


class IstioMetric(StrEnum):
    ALL_METRICS = "ALL_METRICS"
    REQUEST_COUNT = "REQUEST_COUNT"
    REQUEST_DURATION = "REQUEST_DURATION"
    REQUEST_SIZE = "REQUEST_SIZE"
    RESPONSE_SIZE = "RESPONSE_SIZE"
    TCP_OPENED_CONNECTIONS = "TCP_OPENED_CONNECTIONS"
    TCP_CLOSED_CONNECTIONS = "TCP_CLOSED_CONNECTIONS"
    TCP_SENT_BYTES = "TCP_SENT_BYTES"
    TCP_RECEIVED_BYTES = "TCP_RECEIVED_BYTES"
    GRPC_REQUEST_MESSAGES = "GRPC_REQUEST_MESSAGES"
    GRPC_RESPONSE_MESSAGES = "GRPC_RESPONSE_MESSAGES"


class TagOperation(StrEnum):
    UPSERT = "UPSERT"
    REMOVE = "REMOVE"


NonEmpty = Annotated[str, Field(min_length=1)]


class ProviderRef(IstioModel):
    name: NonEmpty


class WorkloadSelection(IstioModel):
    """``match: {mode: ...}`` of tracing and access logging."""

    mode: WorkloadMode = WorkloadMode.CLIENT_AND_SERVER


class LiteralTag(IstioModel):
    value: NonEmpty


class EnvironmentTag(IstioModel):
    name: NonEmpty
    default_value: str = ""


class HeaderTag(IstioModel):
    name: NonEmpty
    default_value: str = ""


class FormatterTag(IstioModel):
    value: NonEmpty


class CustomTag(IstioModel):
    literal: LiteralTag | None = None
    environment: EnvironmentTag | None = None
    header: HeaderTag | None = None
    formatter: FormatterTag | None = None

    @model_validator(mode="after")
    def _check(self) -> CustomTag:
        issues = Issues()
        issues.at_most_one(self, ("literal", "environment", "header", "formatter"))
        issues.raise_if_any("CustomTag")
        return self


class Tracing(IstioModel):
    match: WorkloadSelection | None = None
    providers: tuple[ProviderRef, ...] = ()
    random_sampling_percentage: PercentFloat | None = None
    disable_span_reporting: Bool | None = None
    custom_tags: dict[str, CustomTag] = {}
    use_request_id_for_trace_sampling: Bool | None = None
    enable_istio_tags: Bool | None = None


class MetricSelector(IstioModel):
    metric: IstioMetric | None = None
    custom_metric: NonEmpty | None = None
    mode: WorkloadMode = WorkloadMode.CLIENT_AND_SERVER

    @model_validator(mode="after")
    def _check(self) -> MetricSelector:
        issues = Issues()
        issues.at_most_one(self, ("metric", "custom_metric"))
        issues.raise_if_any("MetricSelector")
        return self


class TagOverride(IstioModel):
    operation: TagOperation = TagOperation.UPSERT
    value: str = ""

    @model_validator(mode="after")
    def _check(self) -> TagOverride:
        if self.operation is TagOperation.REMOVE and self.value:
            raise ValueError("value must not be set when operation is REMOVE")
        if self.operation is TagOperation.UPSERT and not self.value:
            raise ValueError("value must be set when operation is UPSERT")
        return self


class MetricsOverrides(IstioModel):
    match: MetricSelector | None = None
    disabled: Bool | None = None
    tag_overrides: dict[str, TagOverride] = {}


class Metrics(IstioModel):
    providers: tuple[ProviderRef, ...] = ()
    overrides: tuple[MetricsOverrides, ...] = ()
    reporting_interval: MinDuration | None = None


class AccessLogFilter(IstioModel):
    expression: str = ""


class AccessLogging(IstioModel):
    match: WorkloadSelection | None = None
    providers: tuple[ProviderRef, ...] = ()
    disabled: Bool | None = None
    filter: AccessLogFilter | None = None


class TelemetrySpec(IstioModel):
    selector: PolicySelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: Annotated[tuple[PolicyTargetReference, ...], Field(max_length=16)] = ()
    tracing: tuple[Tracing, ...] = ()
    metrics: tuple[Metrics, ...] = ()
    access_logging: tuple[AccessLogging, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> TelemetrySpec:
        issues = Issues()
        check_one_target(issues, self.selector, self.target_ref, self.target_refs)
        issues.raise_if_any("TelemetrySpec")
        return self


class Telemetry(Resource):
    spec: TelemetrySpec = TelemetrySpec()
