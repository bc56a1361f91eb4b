"""meshlet.api: the resources meshlet accepts, their schemas, and loading them from YAML.

What builds on what:

* ``duration`` -- ``Duration``, Istio's duration strings (``"1.5s"``) as exact values.
* ``schema`` -- how schemas are declared: the strict ``IstioModel``, the Kubernetes bases,
  ``ObjectMeta``, the ``Resource`` envelope, and shared field types (ports, percentages,
  durations with Istio's bounds, regexes, labels, exportTo).
* ``selectors`` -- ``istio.type.v1beta1``: workload selectors and policy target references.
* ``networking``, ``security``, ``telemetry`` -- the Istio kinds, field for field as Istio's
  reference has them; ``kube`` -- the Kubernetes kinds a mesh needs.
* ``registry`` -- ``apiVersion`` + ``kind`` to schema, and kubectl's names for each kind
  (``vs``, ``virtualservices``, ...).
* ``loader`` -- files, directories and stdin to validated ``LoadedResource`` values, with
  every problem reported as ``file:line: field.path: message``.

Rules the package keeps:

* Istio's API is accepted unchanged: Istio's field names, defaults and validation. Unknown
  fields in Istio kinds are errors naming the field; Kubernetes pod templates keep theirs.
* Loading is all or nothing: every problem in every document is reported in one
  ``meshlet.errors.ConfigError``, and nothing is returned unless everything is valid.
* Models are immutable values; nothing here does I/O except ``loader`` reading its inputs.
"""

from meshlet.api.duration import Duration
from meshlet.api.loader import (
    LoadedResource,
    LoadNote,
    load_documents,
    load_object,
    load_paths,
)
from meshlet.api.registry import REGISTRY, KindInfo, KindRegistry, UnknownKindError
from meshlet.api.schema import ObjectMeta, Resource

__all__ = [
    "REGISTRY",
    "Duration",
    "KindInfo",
    "KindRegistry",
    "LoadNote",
    "LoadedResource",
    "ObjectMeta",
    "Resource",
    "UnknownKindError",
    "load_documents",
    "load_object",
    "load_paths",
]
