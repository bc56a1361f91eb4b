"""The control plane's HTTP API: the store over Kubernetes-style JSON paths, plus its own
metrics and debug endpoints (port 15014, as istiod's).

Paths (``<prefix>`` is ``/apis/<group>/<version>``, or ``/api/v1`` for the core group)::

    GET    <prefix>/namespaces/<ns>/<plural>           the kind's objects in one namespace
    GET    <prefix>/<plural>                           ... in every namespace (or cluster-scoped)
    GET    <prefix>/namespaces/<ns>/<plural>/<name>    one object
    PUT    <prefix>/namespaces/<ns>/<plural>/<name>    create or replace it (validated)
    DELETE <prefix>/namespaces/<ns>/<plural>/<name>    delete it
    POST   /apply          a JSON list of objects, validated and applied in one transaction
    GET    /metrics        Prometheus text: the ADS server's metrics, store revision and counts
    GET    /debug/syncz    each connected proxy's sync state per type (JSON)
    GET    /debug/config_dump?proxy=<node id>&type=<listeners|routes|clusters|endpoints>
                           what the control plane serves that proxy of that type (JSON)
    GET    /ready          200 once serving

Errors are Kubernetes ``Status`` objects (``reason`` NotFound 404, Invalid 422, Conflict 409,
BadRequest 400, MethodNotAllowed 405), so that a kubectl-style client reads them as it would
the Kubernetes API server's. An invalid ``/apply`` lists every problem in
``details.causes`` (``index``: which object, ``field``, ``message``) and applies nothing.

``ApiHandler.handle`` is the whole behaviour, a function of the request and the store;
``ApiServer`` only moves bytes: it is ``meshlet.web.WebServer`` (one request per connection,
``content-length`` bodies of up to 16 MiB), answering its own errors as ``Status`` objects.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from meshlet.api import REGISTRY, KindInfo, load_object
from meshlet.control.store import ConflictError, ObjectKey, Store
from meshlet.errors import ConfigError, Problem
from meshlet.web import Request, WebServer
from meshlet.web import Response as Response  # re-exported: control routes return it

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "127.0.0.1:15014"
#: The ``type`` values of ``/debug/config_dump``, as ``meshlet proxy-config`` names them.
CONFIG_TYPES = ("listeners", "routes", "clusters", "endpoints")

_STATUS_REASONS = {
    400: "BadRequest",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    413: "RequestEntityTooLarge",
    422: "Invalid",
    500: "InternalError",
}


def status(code: int, message: str, causes: list[dict[str, Any]] | None = None) -> Response:
    """A Kubernetes ``Status`` failure."""
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": _STATUS_REASONS.get(code, "Unknown"),
        "code": code,
    }
    if causes:
        body["details"] = {"causes": causes}
    return Response.json(body, code)


def _causes(problems: tuple[Problem, ...], index: int | None = None) -> list[dict[str, Any]]:
    out = []
    for p in problems:
        cause: dict[str, Any] = {"field": p.path, "message": p.message}
        if index is not None:
            cause["index"] = index
        if p.line:
            cause["line"] = p.line
        out.append(cause)
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class ResourcePath:
    """A parsed Kubernetes-style path: which kind, which version, which namespace, which name."""

    info: KindInfo
    version: str
    namespace: str | None  # None: every namespace (or a cluster-scoped kind)
    name: str | None

    @property
    def api_version(self) -> str:
        return f"{self.info.group}/{self.version}" if self.info.group else self.version

    @property
    def qualified(self) -> str:
        """``virtualservices.networking.istio.io`` (``services`` for the core group), as
        Kubernetes names a resource in its messages."""
        return f"{self.info.plural}.{self.info.group}" if self.info.group else self.info.plural

    def key(self) -> ObjectKey:
        assert self.name is not None
        return ObjectKey(
            group=self.info.group,
            kind=self.info.kind,
            namespace=(self.namespace or "") if self.info.namespaced else "",
            name=self.name,
        )


def parse_resource_path(path: str) -> ResourcePath | str:
    """The resource a path names, or why it names none."""
    parts = [unquote(p) for p in path.strip("/").split("/")]
    if parts[:1] == ["api"] and len(parts) >= 2:
        group, version, rest = "", parts[1], parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return f"no such path {path!r}"
    namespace: str | None = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    if len(rest) not in (1, 2) or not all(rest):
        return f"no such path {path!r}"
    plural = rest[0]
    info = next((i for i in REGISTRY if i.group == group and i.plural == plural), None)
    if info is None:
        api = f"{group}/{version}" if group else version
        return f"the server could not find the requested resource ({plural} in {api})"
    if version not in info.versions:
        return f"{info.kind} is not served at version {version} (served: {info.versions})"
    if namespace is not None and not info.namespaced:
        return f"{info.plural} are not namespaced"
    name = rest[1] if len(rest) == 2 else None
    if name is not None and info.namespaced and namespace is None:
        return f"{info.plural} are namespaced: use .../namespaces/<namespace>/{plural}/{name}"
    return ResourcePath(info=info, version=version, namespace=namespace, name=name)


def _as_version(obj: dict[str, Any], api_version: str) -> dict[str, Any]:
    # Every served version of a kind shares one schema, so conversion is the apiVersion alone.
    return {**obj, "apiVersion": api_version}


@dataclass
class ApiHandler:
    """The API's behaviour: requests in, responses out, against ``store``.

    ``metrics`` and ``sync_status`` come from the ADS server (text, JSON-ready list).
    """

    store: Store
    metrics: Callable[[], str] = lambda: ""
    sync_status: Callable[[], list[dict[str, Any]]] = list
    config_dump: Callable[[str, str], dict[str, Any]] | None = None
    routes: dict[str, Callable[[str, bytes], Response]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.routes.update(
            {
                "GET /ready": lambda q, b: Response.text("ready\n"),
                "GET /metrics": lambda q, b: Response.text(self._metrics()),
                "GET /debug/syncz": lambda q, b: Response.json(self.sync_status()),
                "POST /apply": lambda q, b: self.apply(b),
                "GET /debug/config_dump": lambda q, b: self.dump(q),
            }
        )

    async def __call__(self, request: Request) -> Response:
        # Handlers are short (SQLite in WAL mode, small batches): run them on the loop, so
        # that store watchers and snapshots keep to one thread.
        target = f"{request.path}?{request.query_string}" if request.query_string else request.path
        return self.handle(request.method, target, request.body)

    def handle(self, method: str, target: str, body: bytes) -> Response:
        """One request. Never raises: an unexpected failure is a 500 ``Status``."""
        url = urlsplit(target)
        try:
            route = self.routes.get(f"{method} {url.path}")
            if route is not None:
                return route(url.query, body)
            if url.path in ("/ready", "/metrics", "/debug/syncz", "/debug/config_dump", "/apply"):
                return status(405, f"{method} is not allowed on {url.path}")
            return self._resource(method, url.path, body)
        except Exception as e:
            log.exception("%s %s failed", method, target)
            return status(500, f"internal error: {e}")

    # -- /apply -----------------------------------------------------------------------------

    def apply(self, body: bytes) -> Response:
        data = _json_body(body)
        if isinstance(data, Response):
            return data
        if not isinstance(data, list):
            return status(400, "expected a JSON list of objects")
        objects: list[dict[str, Any]] = []
        causes: list[dict[str, Any]] = []
        for i, item in enumerate(data):
            try:
                objects.append(load_object(item, f"[{i}]").to_object())
            except ConfigError as e:
                causes.extend(_causes(e.problems, index=i))
        if causes:
            return status(422, f"{len(causes)} problem(s); nothing was applied", causes)
        try:
            results = self.store.apply(objects)
        except ConflictError as e:
            return status(409, e.render(), _causes(e.problems))
        except ConfigError as e:
            return status(422, e.render(), _causes(e.problems))
        return Response.json(
            {
                "revision": self.store.revision,
                "results": [
                    {"ref": r.key.ref, "action": r.action, "object": r.object} for r in results
                ],
            }
        )

    # -- /debug/config_dump ----------------------------------------------------------------

    def dump(self, query: str) -> Response:
        params = parse_qs(query)
        proxy = params.get("proxy", [""])[0]
        kind = params.get("type", [""])[0]
        if not proxy or kind not in CONFIG_TYPES:
            return status(
                400, f"give proxy=<node id> and type=<{'|'.join(CONFIG_TYPES)}> in the query"
            )
        if self.config_dump is None:
            return status(404, "no configuration is served here")
        return Response.json(self.config_dump(proxy, kind))

    # -- Kubernetes-style paths ------------------------------------------------------------

    def _resource(self, method: str, path: str, body: bytes) -> Response:
        parsed = parse_resource_path(path)
        if isinstance(parsed, str):
            return status(404, parsed)
        if parsed.name is None:
            if method != "GET":
                return status(405, f"{method} is not allowed on a list; use /apply")
            return self._list(parsed)
        if method == "GET":
            return self._get(parsed)
        if method == "PUT":
            return self._put(parsed, body)
        if method == "DELETE":
            return self._delete(parsed)
        return status(405, f"{method} is not allowed on {path}")

    def _not_found(self, p: ResourcePath) -> Response:
        return status(404, f'{p.qualified} "{p.name}" not found')

    def _list(self, p: ResourcePath) -> Response:
        items = self.store.list(group=p.info.group, kind=p.info.kind, namespace=p.namespace)
        return Response.json(
            {
                "apiVersion": p.api_version,
                "kind": f"{p.info.kind}List",
                "metadata": {"resourceVersion": str(self.store.revision)},
                "items": [_as_version(o, p.api_version) for o in items],
            }
        )

    def _get(self, p: ResourcePath) -> Response:
        obj = self.store.get(p.key())
        if obj is None:
            return self._not_found(p)
        return Response.json(_as_version(obj, p.api_version))

    def _put(self, p: ResourcePath, body: bytes) -> Response:
        data = _json_body(body)
        if isinstance(data, Response):
            return data
        try:
            loaded = load_object(data, "body", namespace=p.namespace or "default")
        except ConfigError as e:
            return status(422, e.render(), _causes(e.problems))
        if (
            loaded.info is not p.info
            or loaded.name != p.name
            or (p.info.namespaced and loaded.namespace != p.namespace)
        ):
            return status(
                400,
                f"the body is {loaded.kind} {loaded.namespace or ''}/{loaded.name}, but the"
                f" path names {p.info.kind} {p.namespace or ''}/{p.name}",
            )
        try:
            [result] = self.store.apply([loaded.to_object()])
        except ConflictError as e:
            return status(409, e.render(), _causes(e.problems))
        code = 201 if result.action == "created" else 200
        return Response.json(_as_version(result.object, p.api_version), code)

    def _delete(self, p: ResourcePath) -> Response:
        [result] = self.store.delete([p.key()])
        if result.object is None:
            return self._not_found(p)
        return Response.json(_as_version(result.object, p.api_version))

    # -- /metrics ---------------------------------------------------------------------------

    def _metrics(self) -> str:
        counts: dict[tuple[str, str], int] = {}
        for obj in self.store.list():
            api_version = str(obj.get("apiVersion", ""))
            group = api_version.rpartition("/")[0]
            kind = str(obj.get("kind", ""))
            counts[(group, kind)] = counts.get((group, kind), 0) + 1
        lines = [
            "# HELP meshlet_store_revision The store's newest resourceVersion.",
            "# TYPE meshlet_store_revision gauge",
            f"meshlet_store_revision {self.store.revision}",
            "# HELP meshlet_store_objects Objects in the store, by API group and kind.",
            "# TYPE meshlet_store_objects gauge",
        ]
        for (group, kind), n in sorted(counts.items()):
            lines.append(f'meshlet_store_objects{{group="{group}",kind="{kind}"}} {n}')
        text = self.metrics()
        if text and not text.endswith("\n"):
            text += "\n"
        return text + "\n".join(lines) + "\n"


def _json_body(body: bytes) -> Any:
    try:
        return json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError) as e:
        return status(400, f"the body is not JSON: {e}")


class ApiServer(WebServer):
    """Serves an ``ApiHandler`` at ``address`` (``host:port``; port 0 picks one)."""

    def __init__(self, handler: ApiHandler, address: str = DEFAULT_ADDRESS) -> None:
        super().__init__(
            handler,
            address,
            name="API",
            hint="is another control plane running? pick another port with --api-address",
            error=status,
        )
