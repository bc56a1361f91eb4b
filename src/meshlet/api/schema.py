"""How resource schemas are declared: the base models, ``ObjectMeta``, and shared field types.

Rules every schema in ``meshlet.api`` keeps:

* Python names are snake_case; the YAML/JSON names are Istio's and Kubernetes' camelCase, as
  aliases. The loader accepts only the aliases (``by_name=False``); Python code may construct
  models by either name.
* Istio kinds are strict (``IstioModel``): an unknown field is an error that names it.
  Kubernetes kinds declare what a mesh needs and are strict where their schema is small and
  closed; inside a pod template and its containers, unknown fields are allowed, because real
  manifests carry many fields meshlet has no use for (``KubeOpenModel``).
* Field defaults are proto3's: a scalar without presence defaults to its zero value (``0``,
  ``""``, ``False``, the enum's first value), a repeated field to ``()``, a map to ``{}``; a
  message, a ``Duration`` and a wrapper (``BoolValue``, ``UInt32Value``, ...) default to
  ``None``, meaning "not set". Translators can therefore follow istiod's code line by line.
* Models are frozen: configuration is compiled once into immutable values.
* Validation follows Istio's (CRD schema plus the validating webhook) where it is cheap;
  a check's message says what is allowed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Strict,
    ValidationError,
)
from pydantic.alias_generators import to_camel
from pydantic_core import InitErrorDetails, PydanticCustomError

from meshlet.api.duration import Duration

_COMMON_CONFIG = ConfigDict(
    alias_generator=to_camel,
    validate_by_name=True,  # Python code may use snake_case names (populate_by_name)
    validate_by_alias=True,
    serialize_by_alias=True,
    frozen=True,
    use_enum_values=False,
    regex_engine="python-re",
)


class IstioModel(BaseModel):
    """Base of every Istio message: strict, camelCase in YAML, immutable."""

    model_config = ConfigDict(**_COMMON_CONFIG, extra="forbid")


class KubeModel(BaseModel):
    """A Kubernetes object part with a small, closed schema: strict like Istio's."""

    model_config = ConfigDict(**_COMMON_CONFIG, extra="forbid")


class KubeOpenModel(BaseModel):
    """A Kubernetes object part whose unknown fields are kept, not refused (pod specs)."""

    model_config = ConfigDict(**_COMMON_CONFIG, extra="allow")


# -- scalar types -------------------------------------------------------------------------
# YAML gives ints, floats, bools and strings already typed; Kubernetes refuses "80" for an
# integer and "true" for a boolean, so these scalars are strict. Floats accept integers.


def _number(value: object) -> object:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("expected a number")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("expected a finite number")
    return value


Int = Annotated[int, Strict()]
Bool = Annotated[bool, Strict()]
Float = Annotated[float, BeforeValidator(_number)]


def _port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError(f"port number {value} must be in the range 1..65535")
    return value


def _non_negative(value: int) -> int:
    if value < 0:
        raise ValueError(f"{value} must not be negative")
    return value


def _uint32(value: int) -> int:
    if not 0 <= value <= 4294967295:
        raise ValueError(f"{value} is not in the range 0..4294967295")
    return value


def _percent_int(value: int) -> int:
    if not 0 <= value <= 100:
        raise ValueError(f"percentage {value} is not in range 0..100")
    return value


def _percent_float(value: float) -> float:
    if not 0.0 <= value <= 100.0:
        raise ValueError(f"percentage {value} is not in range 0..100")
    return value


Port = Annotated[int, Strict(), AfterValidator(_port)]
"""A TCP/UDP port number, 1..65535 (Istio's ``ValidatePort``)."""
UInt32 = Annotated[int, Strict(), AfterValidator(_uint32)]
NonNegativeInt = Annotated[int, Strict(), AfterValidator(_non_negative)]
PercentInt = Annotated[int, Strict(), AfterValidator(_percent_int)]
PercentFloat = Annotated[float, AfterValidator(_percent_float), BeforeValidator(_number)]


def _at_least_1ms(value: Duration) -> Duration:
    if value.nanos < 1_000_000:
        raise ValueError(f"duration {value.text!r} must be at least 1ms")
    if value.nanos % 1_000_000:
        raise ValueError(f"duration {value.text!r}: only durations to ms precision are supported")
    return value


def _not_negative_duration(value: Duration) -> Duration:
    if value.nanos < 0:
        raise ValueError(f"duration {value.text!r} must not be negative")
    return value


MinDuration = Annotated[Duration, AfterValidator(_at_least_1ms)]
"""At least 1ms, in whole milliseconds: Istio's ``ValidateDuration`` (and its CRD rule)."""
AnyDuration = Annotated[Duration, AfterValidator(_not_negative_duration)]
"""A duration of zero or more (fields where Istio gives ``0s`` a meaning, e.g. "disabled")."""


# -- strings with a grammar ------------------------------------------------------------------

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LOOKAROUND = re.compile(r"\(\?<?[=!]")
_BACKREFERENCE = re.compile(r"(?<!\\)(?:\\\\)*\\[1-9]")


_DECIMAL = re.compile(r"^[0-9]+$")


def is_decimal(value: str) -> bool:
    """ASCII digits only (``str.isdigit`` also accepts other scripts' digits)."""
    return bool(_DECIMAL.match(value))


def is_dns1123_label(value: str) -> bool:
    return len(value) <= 63 and bool(_DNS1123_LABEL.match(value))


def is_dns1123_subdomain(value: str) -> bool:
    return len(value) <= 253 and bool(_DNS1123_SUBDOMAIN.match(value))


def check_regex(pattern: str) -> str:
    """Refuse a pattern that Envoy's RE2 would refuse, where Python can tell.

    Python's ``re`` and RE2 agree on most syntax. RE2 has no lookaround and no backreferences,
    so those are refused here; RE2's ``\\p{...}`` classes are unknown to ``re``, so patterns
    using them are accepted without compiling.
    """
    if _LOOKAROUND.search(pattern):
        raise ValueError(f"regex {pattern!r}: lookaround is not supported (Istio uses RE2)")
    if _BACKREFERENCE.search(pattern):
        raise ValueError(f"regex {pattern!r}: backreferences are not supported (Istio uses RE2)")
    if "\\p" in pattern or "\\P" in pattern:
        return pattern
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"regex {pattern!r} does not compile: {e}") from None
    return pattern


Regex = Annotated[str, Strict(), AfterValidator(check_regex)]


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    """Kubernetes label keys (``[prefix/]name``) and values (``name`` or empty)."""
    for key, value in labels.items():
        prefix, _, name = key.rpartition("/")
        if prefix and not is_dns1123_subdomain(prefix):
            raise ValueError(f"label key {key!r}: prefix must be a DNS subdomain")
        if len(name) > 63 or not _LABEL_NAME.match(name):
            raise ValueError(
                f"label key {key!r}: name must be 1-63 letters, digits, '-', '_' or '.', "
                "starting and ending with a letter or digit"
            )
        if value and (len(value) > 63 or not _LABEL_NAME.match(value)):
            raise ValueError(
                f"label value {value!r} (key {key!r}) must be empty or 1-63 letters, digits, "
                "'-', '_' or '.', starting and ending with a letter or digit"
            )
    return labels


Labels = Annotated[dict[str, str], AfterValidator(check_labels)]


def check_export_to(values: tuple[str, ...]) -> tuple[str, ...]:
    """``exportTo``: ``*`` (everyone), ``.`` (own namespace), ``~`` (no one) or namespaces."""
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"duplicate entries in exportTo for entry {value}")
        seen.add(value)
        if value not in ("*", ".", "~") and not is_dns1123_label(value):
            raise ValueError(f"exportTo entry {value!r} must be '*', '.', '~' or a namespace name")
    if "~" in seen and len(seen) > 1:
        raise ValueError("exportTo '~' (export to no one) cannot be combined with other entries")
    return values


ExportTo = Annotated[tuple[str, ...], AfterValidator(check_export_to)]


def check_host(host: str) -> str:
    """A service host: a DNS name (``reviews``, ``reviews.ns.svc.cluster.local``), optionally
    with a wildcard first label (``*.example.com``, ``*``), or an IP address."""
    if not host:
        raise ValueError("empty host name not allowed")
    if len(host) > 255:
        raise ValueError(f"host {host!r} too long (max 255)")
    if any(c.isspace() for c in host) or "://" in host or "/" in host:
        raise ValueError(f"host {host!r} must be a DNS name, without scheme, path or namespace")
    if ":" in host and not _looks_like_ipv6(host):
        raise ValueError(f"host {host!r} must not include a port")
    return host


def _looks_like_ipv6(host: str) -> bool:
    return host.count(":") >= 2 and all(c in "0123456789abcdefABCDEF:." for c in host)


Host = Annotated[str, Strict(), AfterValidator(check_host)]


def int_or_string(value: object) -> int | str:
    """Kubernetes ``IntOrString`` (``targetPort: 8080`` or ``targetPort: http``)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("expected an integer or a string")
    return value


IntOrString = Annotated[int | str, BeforeValidator(int_or_string)]


class Issues:
    """Cross-field problems found by a model's own check, each at its exact field path.

    A model validator collects them and calls ``raise_if_any``; pydantic then reports each one
    at the model's location plus the path given here, so the loader can name the YAML line
    of the very field. Paths use the YAML (alias) names.
    """

    def __init__(self) -> None:
        self._errors: list[InitErrorDetails] = []

    def add(self, loc: tuple[str | int, ...], message: str) -> None:
        error = PydanticCustomError("meshlet", "{message}", {"message": message})
        self._errors.append(InitErrorDetails(type=error, loc=loc, input=None))

    def at_most_one(
        self, model: BaseModel, names: Iterable[str], loc: tuple[str | int, ...] = ()
    ) -> None:
        """A protobuf ``oneof``: refuse more than one member set (``names`` are Python names)."""
        names = list(names)
        given = [n for n in names if is_set(getattr(model, n))]
        if len(given) > 1:
            self.add(
                loc,
                f"only one of {aliases(model, names)} may be set, got {aliases(model, given)}",
            )

    def raise_if_any(self, title: str) -> None:
        if self._errors:
            raise ValidationError.from_exception_data(title, self._errors)


def is_set(value: object) -> bool:
    return value is not None and value != "" and value != () and value != {}


def aliases(model: BaseModel, names: Iterable[str]) -> str:
    fields = type(model).model_fields
    return ", ".join(fields[n].alias or n for n in names)


# -- the Kubernetes envelope ----------------------------------------------------------------


class OwnerReference(KubeOpenModel):
    api_version: str = ""
    kind: str = ""
    name: str = ""
    uid: str = ""


class ObjectMeta(KubeModel):
    """Kubernetes ``ObjectMeta``: every field of it, typed loosely where meshlet has no use."""

    name: str = ""
    generate_name: str = ""
    namespace: str = ""
    labels: Labels = {}
    annotations: dict[str, str] = {}
    uid: str = ""
    resource_version: str = ""
    generation: Int = 0
    creation_timestamp: str | None = None
    deletion_timestamp: str | None = None
    deletion_grace_period_seconds: Int | None = None
    self_link: str = ""
    owner_references: tuple[OwnerReference, ...] = ()
    finalizers: tuple[str, ...] = ()
    managed_fields: tuple[dict[str, Any], ...] = ()

    def __repr__(self) -> str:
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"<ObjectMeta {where}>"


class Resource(BaseModel):
    """A whole object: ``apiVersion``, ``kind``, ``metadata``, ``spec`` (per kind), ``status``.

    Which ``apiVersion`` and ``kind`` a model serves is the registry's business
    (``meshlet.api.registry``); the model only carries them.
    """

    model_config = ConfigDict(**_COMMON_CONFIG, extra="forbid")

    api_version: str
    kind: str
    metadata: ObjectMeta
    status: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"<{self.kind} {self.metadata.namespace or '-'}/{self.metadata.name}>"
