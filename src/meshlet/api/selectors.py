"""``istio.type.v1beta1``: how policies (security, telemetry, DestinationRule) pick workloads.

``WorkloadSelector`` selects pods and VMs by ``matchLabels``; ``PolicyTargetReference`` names a
Gateway-API or Service object instead (``targetRef``/``targetRefs``). A policy may use at most
one of ``selector``, ``targetRef`` and ``targetRefs`` (checked by the kinds that have them).
The networking kinds Sidecar and ServiceEntry use their own ``WorkloadSelector`` with
``labels`` (``meshlet.api.networking.WorkloadSelector``).
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import Field, model_validator

from meshlet.api.schema import Issues, IstioModel, Labels

_GROUP = re.compile(r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_KIND = re.compile(r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$")


class PolicySelector(IstioModel):
    """``selector: {matchLabels: ...}`` -- Istio's ``istio.type.v1beta1.WorkloadSelector``."""

    match_labels: Labels = {}

    @model_validator(mode="after")
    def _check(self) -> PolicySelector:
        issues = Issues()
        for key, value in self.match_labels.items():
            if not key:
                issues.add(("matchLabels",), "key must not be empty")
            if "*" in key:
                issues.add(("matchLabels", key), "wildcard not allowed in label key match")
            if "*" in value:
                issues.add(("matchLabels", key), "wildcard not allowed in label value match")
        issues.raise_if_any("WorkloadSelector")
        return self


class PolicyTargetReference(IstioModel):
    group: Annotated[str, Field(max_length=253, pattern=_GROUP.pattern)] = ""
    kind: Annotated[str, Field(min_length=1, max_length=63, pattern=_KIND.pattern)]
    name: Annotated[str, Field(min_length=1, max_length=253)]
    namespace: str = ""

    @model_validator(mode="after")
    def _check(self) -> PolicyTargetReference:
        if self.namespace:
            raise ValueError("cross namespace referencing is not currently supported")
        return self


def check_one_target(
    issues: Issues, selector: object, target_ref: object, target_refs: tuple[object, ...]
) -> None:
    """Istio's CRD rule: only one of ``selector``, ``targetRef`` or ``targetRefs``."""
    given = [
        name
        for name, value in (
            ("selector", selector),
            ("targetRef", target_ref),
            ("targetRefs", target_refs),
        )
        if value not in (None, ())
    ]
    if len(given) > 1:
        issues.add((), f"only one of targetRefs or selector can be set, got {', '.join(given)}")
