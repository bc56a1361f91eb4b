"""Loading resources from YAML (or JSON) with the file and line of every problem.

Theory of operation
-------------------

``load_paths`` reads files, directories (recursively: ``*.yaml``, ``*.yml``, ``*.json``) and
``-`` (standard input); ``load_documents`` reads one text. Each text is split into YAML
documents with PyYAML's composer, which keeps a node tree with positions, and then built into
plain Python data. A document of ``kind: List`` contributes its ``items``. Each object is looked
up in the kind registry by ``apiVersion`` and ``kind`` and validated by its pydantic model.

A problem is reported as ``file:line: field.path: message``. The field path comes from
pydantic's error location, which uses the YAML keys (the models' aliases); walking the
document's node tree along that path gives the line of the very field -- or of its nearest
enclosing one when the field is missing. YAML syntax errors carry their own line.

Everything is all-or-nothing: problems from all documents of all inputs are collected and
raised together as one ``ConfigError``; no resource is returned unless every one is valid.
Documents whose ``apiVersion``/``kind`` meshlet does not know are errors by default; with
``unknown="skip"`` they are passed over and described in ``notes`` instead (``analyze`` uses
this for manifests that carry kinds such as Gateway API routes or StatefulSets).

Rules kept: YAML timestamps stay strings and duplicate mapping keys are errors (as Kubernetes'
strict decoding has them); ``metadata.name`` is required; namespaced kinds get the namespace
``default`` (or the one given) when the document names none, and cluster-scoped kinds none.
"""

from __future__ import annotations

import copy
import difflib
import json
import re
import sys
import types
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from meshlet.api.registry import REGISTRY, KindInfo, KindRegistry, split_api_version
from meshlet.api.schema import ObjectMeta, Resource, is_dns1123_label, is_dns1123_subdomain
from meshlet.errors import ConfigError, Problem

UnknownKinds = Literal["error", "skip"]
PathPart = str | int

FILE_SUFFIXES = (".yaml", ".yml", ".json")
STDIN = "-"
STDIN_SOURCE = "<stdin>"


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadedResource:
    """One valid resource, where it came from, and its model."""

    info: KindInfo
    api_version: str
    kind: str
    name: str
    namespace: str | None  # None for cluster-scoped kinds (Namespace)
    metadata: ObjectMeta
    model: Resource
    source: str
    line: int | None
    raw: dict[str, Any] = field(repr=False)  # the document as written

    @property
    def group(self) -> str:
        return self.info.group

    @property
    def labels(self) -> dict[str, str]:
        return self.metadata.labels

    @property
    def annotations(self) -> dict[str, str]:
        return self.metadata.annotations

    @property
    def location(self) -> str:
        return f"{self.source}:{self.line}" if self.line else self.source

    def to_object(self) -> dict[str, Any]:
        """The object to store: a copy of ``raw`` with ``metadata.namespace`` filled in for
        namespaced kinds."""
        obj = copy.deepcopy(self.raw)
        if self.namespace is not None:
            obj.setdefault("metadata", {})["namespace"] = self.namespace
        return obj

    def __repr__(self) -> str:
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"<LoadedResource {self.kind} {where} at {self.location}>"


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadNote:
    """A document passed over (``unknown="skip"``), and why."""

    source: str
    line: int | None
    api_version: str
    kind: str
    name: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line else self.source
        return f"{where}: {self.message}"


@dataclass(frozen=True, slots=True, kw_only=True)
class SourcedProblem(Problem):
    """A ``Problem`` that carries its own file, since one load spans many files."""

    source: str | None = None

    def render(self, source: str | None) -> str:
        where = self.source or source
        head = f"{where}:{self.line}" if where and self.line else (where or "")
        return ": ".join(p for p in (head, self.path, self.message) if p)


# -- public entry points ---------------------------------------------------------------------


def load_documents(
    text: str,
    source: str,
    *,
    unknown: UnknownKinds = "error",
    notes: list[LoadNote] | None = None,
    namespace: str = "default",
    registry: KindRegistry = REGISTRY,
) -> list[LoadedResource]:
    """Every resource in a YAML (or JSON) text; raises ``ConfigError`` listing every problem.

    ``source`` names the text in messages (a file name). ``namespace`` is given to namespaced
    resources that name none. Skipped documents (``unknown="skip"``) are appended to ``notes``.
    """
    batch = _Batch(unknown=unknown, namespace=namespace, registry=registry)
    batch.load_text(text, source)
    return batch.finish(notes)


def load_paths(
    paths: Sequence[str | Path],
    *,
    unknown: UnknownKinds = "error",
    notes: list[LoadNote] | None = None,
    namespace: str = "default",
    registry: KindRegistry = REGISTRY,
) -> list[LoadedResource]:
    """Every resource in files, directories (recursively) and ``-`` (standard input), as
    ``kubectl apply -f`` reads them; all problems of all inputs are raised together."""
    batch = _Batch(unknown=unknown, namespace=namespace, registry=registry)
    for path in paths:
        if str(path) == STDIN:
            batch.load_text(sys.stdin.read(), STDIN_SOURCE)
            continue
        for file, source in _files(Path(path), batch):
            try:
                text = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                batch.problem(source, None, "", f"cannot read: {e}")
                continue
            batch.load_text(text, source)
    return batch.finish(notes)


def load_object(
    data: object,
    source: str = "<object>",
    *,
    namespace: str = "default",
    registry: KindRegistry = REGISTRY,
) -> LoadedResource:
    """One object given as data (a JSON body, say); problems name field paths, not lines."""
    batch = _Batch(unknown="error", namespace=namespace, registry=registry)
    batch.load_data(data, None, source, ())
    [resource] = batch.finish(None)
    return resource


# -- reading ---------------------------------------------------------------------------------


def _files(path: Path, batch: _Batch) -> Iterator[tuple[Path, str]]:
    if path.is_dir():
        found = sorted(
            p for p in path.rglob("*") if p.suffix.lower() in FILE_SUFFIXES and p.is_file()
        )
        if not found:
            batch.problem(str(path), None, "", "no .yaml, .yml or .json files in this directory")
        for p in found:
            yield p, str(p)
    elif path.exists():
        yield path, str(path)
    else:
        batch.problem(str(path), None, "", "no such file or directory")


_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_BaseLoader):  # type: ignore[valid-type,misc]
    """A safe loader with Kubernetes' strictness: duplicate keys are errors; timestamps
    stay strings."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable):
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {key!r}",
                        key_node.start_mark,
                    )
                seen.add(key)
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


def _timestamp_as_text(loader: yaml.SafeLoader, node: yaml.Node) -> str:
    return str(loader.construct_scalar(node))  # type: ignore[arg-type]


_Loader.add_constructor("tag:yaml.org,2002:timestamp", _timestamp_as_text)


def _documents(text: str) -> Iterator[tuple[yaml.Node, Any]]:
    """(node tree, data) per document; raises ``yaml.YAMLError`` at the first bad one."""
    loader = _Loader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            yield node, loader.construct_document(node)
    finally:
        loader.dispose()


# -- one batch: everything loaded together, problems collected -------------------------------


class _Batch:
    def __init__(self, *, unknown: UnknownKinds, namespace: str, registry: KindRegistry) -> None:
        if unknown not in ("error", "skip"):
            raise ValueError(f"unknown must be 'error' or 'skip', not {unknown!r}")
        self.unknown = unknown
        self.namespace = namespace
        self.registry = registry
        self.resources: list[LoadedResource] = []
        self.problems: list[SourcedProblem] = []
        self.notes: list[LoadNote] = []

    def problem(self, source: str, line: int | None, path: str, message: str) -> None:
        self.problems.append(SourcedProblem(source=source, line=line, path=path, message=message))

    def finish(self, notes: list[LoadNote] | None) -> list[LoadedResource]:
        if self.problems:
            raise ConfigError(self.problems)
        if notes is not None:
            notes.extend(self.notes)
        return self.resources

    def load_text(self, text: str, source: str) -> None:
        try:
            for node, data in _documents(text):
                if data is None:
                    continue  # an empty document: a comment, or a trailing ``---``
                if _is_list(data):
                    self._load_list(node, data, source)
                else:
                    self.load_data(data, node, source, ())
        except yaml.YAMLError as e:
            self._yaml_problem(e, source)

    def _yaml_problem(self, error: yaml.YAMLError, source: str) -> None:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(error, "problem", None) or str(error)
        context = getattr(error, "context", None)
        message = f"invalid YAML: {problem}" + (f" ({context})" if context else "")
        self.problem(source, line, "", message)

    def _load_list(self, node: yaml.Node, data: dict[str, Any], source: str) -> None:
        items = data.get("items")
        if items is None:
            return
        items_node = _child(node, "items")
        if not isinstance(items, list):
            self.problem(source, _line(items_node or node), "items", "expected a list of resources")
            return
        for i, item in enumerate(items):
            item_node = _child(items_node, i) if items_node is not None else None
            self.load_data(item, item_node, source, ("items", i))

    def load_data(
        self, data: object, node: yaml.Node | None, source: str, prefix: tuple[PathPart, ...]
    ) -> None:
        line = _line(node)
        where = render_path(prefix)
        if not isinstance(data, dict):
            self.problem(
                source,
                line,
                where,
                "a resource must be a mapping with apiVersion, kind and metadata, "
                f"got {_describe(data)}",
            )
            return
        info = self._kind(data, node, source, prefix)
        if info is None:
            return
        try:
            model = info.model.model_validate(data, by_alias=True, by_name=False)
        except ValidationError as e:
            found = []
            for error in e.errors(include_url=False):
                parts, error_line = locate(node, error["loc"])
                message = describe_error(error, info.model)
                found.append((error_line or line or 0, render_path(prefix + parts), message))
            for error_line, path, message in sorted(found, key=lambda f: f[0]):
                self.problem(source, error_line or None, path, message)
            return
        ok, namespace = self._identity(model, info, node, source, prefix)
        if not ok:
            return
        self.resources.append(
            LoadedResource(
                info=info,
                api_version=model.api_version,
                kind=model.kind,
                name=model.metadata.name,
                namespace=namespace,
                metadata=model.metadata,
                model=model,
                source=source,
                line=line,
                raw=data,
            )
        )

    def _kind(
        self,
        data: dict[str, Any],
        node: yaml.Node | None,
        source: str,
        prefix: tuple[PathPart, ...],
    ) -> KindInfo | None:
        api_version, kind = data.get("apiVersion"), data.get("kind")
        bad = False
        for key, value in (("apiVersion", api_version), ("kind", kind)):
            if not isinstance(value, str) or not value:
                where = _child(node, key)
                message = (
                    "is required" if value is None else f"expected a string, got {_describe(value)}"
                )
                self.problem(source, _line(where or node), render_path((*prefix, key)), message)
                bad = True
        if bad:
            return None
        assert isinstance(api_version, str) and isinstance(kind, str)
        info = self.registry.lookup(api_version, kind)
        if info is not None:
            return info
        name = _name_of(data)
        if self.unknown == "skip":
            self.notes.append(
                LoadNote(
                    source=source,
                    line=_line(node),
                    api_version=api_version,
                    kind=kind,
                    name=name,
                    message=(
                        f"skipped {api_version} {kind} {name!r}: meshlet does not use this kind"
                    ),
                )
            )
            return None
        field, message = self._unknown_kind_message(api_version, kind)
        self.problem(
            source, _line(_child(node, field) or node), render_path((*prefix, field)), message
        )
        return None

    def _unknown_kind_message(self, api_version: str, kind: str) -> tuple[str, str]:
        served = self.registry.by_kind(kind)
        elsewhere = (
            f"; {kind} is served as " + ", ".join(v for i in served for v in i.api_versions)
            if served
            else ""
        )
        kinds = self.registry.kinds_for(api_version)
        if kinds:
            return "kind", (
                f"{kind!r} is not supported in {api_version}; supported kinds: "
                f"{', '.join(kinds)}{elsewhere}"
            )
        group, _ = split_api_version(api_version)
        if group == "gateway.networking.k8s.io":
            return "apiVersion", (
                f"{api_version!r} (kind {kind}) is not supported: Gateway API resources are not "
                "supported yet; use networking.istio.io Gateway and VirtualService"
            )
        return "apiVersion", (
            f"{api_version!r} (kind {kind}) is not supported{elsewhere}; supported apiVersions: "
            f"{', '.join(self.registry.api_versions())}"
        )

    def _identity(
        self,
        model: Resource,
        info: KindInfo,
        node: yaml.Node | None,
        source: str,
        prefix: tuple[PathPart, ...],
    ) -> tuple[bool, str | None]:
        """Check name and namespace: (no problem found, the namespace to use)."""
        meta = model.metadata
        ok = True

        def report(key: str, message: str) -> None:
            nonlocal ok
            parts, line = locate(node, ("metadata", key))
            self.problem(source, line, render_path(prefix + parts), message)
            ok = False

        if not meta.name:
            report("name", "is required")
        elif not is_dns1123_subdomain(meta.name):
            report(
                "name",
                f"{meta.name!r} must be a DNS-1123 subdomain: lowercase letters, digits, '-' "
                "and '.', starting and ending with a letter or digit",
            )
        elif info.kind in ("Namespace", "Gateway") and not is_dns1123_label(meta.name):
            report(
                "name", f"{meta.name!r} must be a DNS-1123 label (no dots, at most 63 characters)"
            )
        if meta.namespace and not is_dns1123_label(meta.namespace):
            report("namespace", f"{meta.namespace!r} must be a DNS-1123 label")
        if not info.namespaced:
            return ok, None
        return ok, meta.namespace or self.namespace


def _is_list(data: object) -> bool:
    return (
        isinstance(data, dict)
        and data.get("kind") == "List"
        and data.get("apiVersion", "v1") == "v1"
    )


def _name_of(data: dict[str, Any]) -> str:
    metadata = data.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    return name if isinstance(name, str) else ""


# -- locating errors in the YAML ---------------------------------------------------------------


def _line(node: yaml.Node | None) -> int | None:
    return node.start_mark.line + 1 if node is not None else None


def _child(node: yaml.Node | None, key: PathPart) -> yaml.Node | None:
    """The value node under ``key`` (a mapping key or a sequence index), or None."""
    if isinstance(node, yaml.MappingNode) and isinstance(key, str):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
                return value_node  # type: ignore[no-any-return]
    if isinstance(node, yaml.SequenceNode) and isinstance(key, int) and 0 <= key < len(node.value):
        return node.value[key]  # type: ignore[no-any-return]
    return None


def locate(
    node: yaml.Node | None, loc: tuple[PathPart, ...]
) -> tuple[tuple[PathPart, ...], int | None]:
    """Follow a pydantic error location through the node tree.

    Returns the path as written in the YAML (pydantic's own markers, such as union member
    names or ``[key]``, are left out) and the line of the deepest part found: the key's line
    for a mapping entry, the item's line for a list entry. A missing last part (a required
    field) is kept in the path, at its parent's line.
    """
    parts: list[PathPart] = []
    line = _line(node)
    current = node
    for i, comp in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(current, yaml.MappingNode):
            found = None
            for key_node, value_node in current.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.value == str(comp):
                    found = key_node, value_node
                    break
            if found is not None:
                parts.append(comp if isinstance(comp, str) else str(comp))
                line = _line(found[0])
                current = found[1]
                continue
            if last and isinstance(comp, str) and comp != "[key]":
                parts.append(comp)  # a missing field
            continue  # otherwise a pydantic marker
        if isinstance(current, yaml.SequenceNode) and isinstance(comp, int):
            if 0 <= comp < len(current.value):
                parts.append(comp)
                current = current.value[comp]
                line = _line(current)
            continue
        if node is None and comp != "[key]" and (isinstance(comp, int) or not _is_marker(comp)):
            parts.append(comp)  # no YAML to follow (load_object): trust the location
    return tuple(parts), line


def _is_marker(comp: str) -> bool:
    return "[" in comp or comp in ("int", "str", "float", "bool", "list", "dict", "none")


_PLAIN_KEY = re.compile(r"^[A-Za-z_@][A-Za-z0-9_-]*$")


def render_path(parts: tuple[PathPart, ...]) -> str:
    """``("spec", "http", 0, "route", 1, "weight")`` -> ``spec.http[0].route[1].weight``.

    Keys that are not plain words (label keys, port numbers) are quoted in brackets:
    ``metadata.labels["app.kubernetes.io/name"]``, ``portLevelMtls["8080"]``.
    """
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.match(part):
            out += f".{part}" if out else part
        else:
            out += "[" + json.dumps(part) + "]"
    return out


# -- wording errors ----------------------------------------------------------------------------

_EXPECTED = {
    "int": "an integer",
    "bool": "a boolean (true or false)",
    "string": "a string",
    "float": "a number",
    "dict": "a mapping",
    "model": "a mapping",
    "model_attributes": "a mapping",
    "list": "a list",
    "tuple": "a list",
}


def describe_error(error: ErrorDetails, model: type[BaseModel]) -> str:
    """One pydantic error in the words of a configuration reference."""
    kind = error["type"]
    loc = error["loc"]
    value = error.get("input")
    message = error["msg"]
    if kind == "extra_forbidden":
        name = str(loc[-1])
        known = fields_at(model, loc[:-1])
        text = f"unknown field {name!r}"
        if known:
            close = _closest(name, known)
            if close:
                text += f"; did you mean {close!r}?"
            text += f" (known fields: {', '.join(known)})"
        return text
    if kind == "missing":
        return "is required"
    if kind == "enum":
        expected = (error.get("ctx") or {}).get("expected", "")
        return f"invalid value {value!r}; expected {expected}"
    if kind in ("value_error", "assertion_error"):
        return re.sub(r"^(Value|Assertion) error, ", "", message)
    for prefix in (
        "int",
        "bool",
        "string",
        "float",
        "dict",
        "model_attributes",
        "model",
        "list",
        "tuple",
    ):
        if kind in (f"{prefix}_type", f"{prefix}_parsing"):
            return f"expected {_EXPECTED[prefix]}, got {_describe(value)}"
    if kind == "int_from_float":
        return f"expected an integer, got {_describe(value)}"
    return re.sub(r"^(Input|String|List|Tuple|Value|Dictionary) should", "must", message)


def _closest(name: str, known: list[str]) -> str | None:
    """The known field a misspelt or snake_case ``name`` most likely meant."""
    folded = {k.lower(): k for k in known}
    plain = name.replace("_", "").lower()
    if plain in folded:
        return folded[plain]
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        return close[0]
    starts = [k for k in known if k.lower().startswith(plain) or plain.startswith(k.lower())]
    return starts[0] if len(starts) == 1 else None


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


def fields_at(model: type[BaseModel], loc: tuple[PathPart, ...]) -> list[str]:
    """The YAML field names of the model found at ``loc`` under ``model`` (empty if none)."""
    current: Any = model
    for comp in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            match = next(
                (f for n, f in current.model_fields.items() if (f.alias or n) == comp),
                None,
            )
            if match is None:
                continue  # a pydantic marker
            current = match.annotation
        elif typing.get_origin(current) in (tuple, list) and isinstance(comp, int):
            current = typing.get_args(current)[0]
        elif typing.get_origin(current) is dict:
            current = typing.get_args(current)[1]
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(f.alias or n for n, f in current.model_fields.items())
    return []


def _unwrap(tp: Any) -> Any:
    """Strip ``Annotated`` and ``X | None`` down to the type that holds fields."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(members) != 1:
                return tp
            tp = members[0]
        else:
            return tp
