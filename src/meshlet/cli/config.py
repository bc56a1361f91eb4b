"""``meshlet apply``, ``meshlet delete`` and ``meshlet get``: the mesh's configuration, through
the control plane's API, as kubectl does it.

The control plane is found through ``--server URL``, else ``$MESHLET_SERVER``, else
``http://127.0.0.1:15014``. Files are validated here first (``meshlet.api.load_paths``), so a
mistake is reported with its file and line before anything is sent; the server validates
again and applies a batch whole or not at all. Messages follow kubectl's wording
(``virtualservice.networking.istio.io/reviews created``, ``Error from server (NotFound): ...``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:  # meshlet.api (pydantic) is imported by the commands that use it, so that
    # `meshlet proxy`, which shares this CLI, never pays for it (DESIGN: 40 MiB per sidecar).
    from meshlet.api import KindInfo, LoadedResource
from meshlet.errors import ConfigError, MeshletError

DEFAULT_SERVER = "http://127.0.0.1:15014"
SERVER_ENV = "MESHLET_SERVER"
_TIMEOUT = 30.0


# -- talking to the control plane --------------------------------------------------------------


class ServerError(MeshletError):
    """The control plane answered with a Kubernetes ``Status`` failure."""

    def __init__(self, code: int, body: dict[str, Any]) -> None:
        self.code = code
        self.body = body
        self.reason = str(body.get("reason") or code)
        super().__init__(f"Error from server ({self.reason}): {body.get('message', '')}")


class ControlClient:
    """JSON over HTTP to the control plane's API."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def __repr__(self) -> str:
        return f"<ControlClient {self.url}>"

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """The decoded JSON answer. Raises ``ServerError`` for a failure status, and
        ``MeshletError`` when the control plane cannot be reached."""
        # Imported here: urllib.request pulls in http.client and email, ~1 MiB that
        # `meshlet proxy` (which shares this CLI) must not carry.
        import urllib.error
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=_TIMEOUT) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                status = json.loads(raw)
            except ValueError:
                status = {"message": raw.decode(errors="replace"), "reason": e.reason}
            raise ServerError(e.code, status if isinstance(status, dict) else {}) from None
        except (urllib.error.URLError, OSError) as e:
            raise MeshletError(
                f"cannot reach the control plane at {self.url}: is 'meshlet control' running?"
                f" ({getattr(e, 'reason', e)})"
            ) from None


def resource_path(info: KindInfo, namespace: str | None, name: str | None = None) -> str:
    """``/apis/<group>/<version>[/namespaces/<ns>]/<plural>[/<name>]`` (``/api/v1`` for core)."""
    version = info.versions[0]
    path = f"/apis/{info.group}/{version}" if info.group else f"/api/{version}"
    if info.namespaced and namespace is not None:
        path += f"/namespaces/{namespace}"
    path += f"/{info.plural}"
    return path + (f"/{name}" if name is not None else "")


def _client(args: argparse.Namespace) -> ControlClient:
    return ControlClient(args.server or os.environ.get(SERVER_ENV) or DEFAULT_SERVER)


# -- registration -------------------------------------------------------------------------------


def server_option() -> argparse.ArgumentParser:
    """A parent parser with ``--server URL``."""
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument(
        "--server",
        metavar="URL",
        help=f"the control plane's API (default ${SERVER_ENV}, else {DEFAULT_SERVER})",
    )
    return server


def files_option() -> argparse.ArgumentParser:
    """A parent parser with ``-f PATH`` (repeatable, required)."""
    files = argparse.ArgumentParser(add_help=False)
    files.add_argument(
        "-f",
        "--filename",
        action="append",
        required=True,
        metavar="PATH",
        help="a file, a directory (recursively) or - for standard input; may repeat",
    )
    return files


def register(commands: Any) -> None:
    server = server_option()
    files = files_option()

    p = commands.add_parser(
        "apply",
        parents=[server, files],
        help="create or update configuration from files",
        description="Validate the files and apply every object in them, all or nothing.",
    )
    p.set_defaults(run=run_apply)

    p = commands.add_parser(
        "delete",
        parents=[server, files],
        help="delete the objects named in files",
        description="Delete every object the files name.",
    )
    p.set_defaults(run=run_delete)

    p = commands.add_parser(
        "get",
        parents=[server],
        help="list objects of a kind, or show one",
        description="Show objects of one kind (vs, dr, gw, se, svc, ...), as kubectl get does.",
    )
    p.add_argument("kind", metavar="KIND", help="e.g. virtualservice, virtualservices, vs")
    p.add_argument("name", nargs="?", metavar="NAME")
    where = p.add_mutually_exclusive_group()
    where.add_argument("-n", "--namespace", default="default", help="default: default")
    where.add_argument(
        "-A", "--all-namespaces", action="store_true", help="objects in every namespace"
    )
    p.add_argument("-o", "--output", choices=("wide", "yaml", "json"), help="output format")
    p.set_defaults(run=run_get)


# -- apply, delete ------------------------------------------------------------------------------


def run_apply(args: argparse.Namespace) -> int:
    from meshlet.api import load_paths

    resources = load_paths(args.filename)
    if not resources:
        raise MeshletError("no objects passed to apply")
    client = _client(args)
    try:
        answer = client.request("POST", "/apply", [r.to_object() for r in resources])
    except ServerError as e:
        if e.code == 422:
            raise _located(e, resources) from None
        raise
    for result in answer.get("results", []):
        print(f"{result['ref']} {result['action']}")
    return 0


def _located(error: ServerError, resources: list[LoadedResource]) -> ConfigError:
    from meshlet.api.loader import SourcedProblem

    """The server's validation causes, placed at the files and lines of their objects."""
    problems = []
    details = error.body.get("details") or {}
    for cause in details.get("causes") or []:
        index = cause.get("index")
        where = resources[index] if isinstance(index, int) and index < len(resources) else None
        problems.append(
            SourcedProblem(
                source=where.source if where else None,
                line=where.line if where else None,
                path=str(cause.get("field", "")),
                message=str(cause.get("message", "")),
            )
        )
    if not problems:
        return ConfigError.at("", str(error.body.get("message", error)))
    return ConfigError(problems)


def run_delete(args: argparse.Namespace) -> int:
    from meshlet.api import load_paths

    resources = load_paths(args.filename)
    client = _client(args)
    code = 0
    for r in resources:
        path = resource_path(r.info, r.namespace, r.name)
        ref = f"{r.info.singular}.{r.info.group}" if r.info.group else r.info.singular
        try:
            client.request("DELETE", path)
        except ServerError as e:
            print(e, file=sys.stderr)
            code = 1
            continue
        print(f'{ref} "{r.name}" deleted')
    return code


# -- get ----------------------------------------------------------------------------------------


def run_get(args: argparse.Namespace) -> int:
    from meshlet.api import REGISTRY, UnknownKindError

    if args.kind in ("endpoints", "endpoint", "ep"):
        return _get_endpoints(args)
    try:
        info = REGISTRY.resolve(args.kind)
    except UnknownKindError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    client = _client(args)
    namespace = None if args.all_namespaces or not info.namespaced else args.namespace
    try:
        if args.name is not None:
            if info.namespaced and namespace is None:
                namespace = "default"
            items = [client.request("GET", resource_path(info, namespace, args.name))]
            single = True
        else:
            items = client.request("GET", resource_path(info, namespace))["items"]
            single = False
    except ServerError as e:
        print(e, file=sys.stderr)
        return 1
    if args.output in ("json", "yaml"):
        data: Any = (
            items[0]
            if single
            else {"apiVersion": "v1", "kind": "List", "items": items, "metadata": {}}
        )
        if args.output == "json":
            print(json.dumps(data, indent=4))
        else:
            print(yaml.safe_dump(data, sort_keys=False), end="")
        return 0
    if not items:
        where = "" if namespace is None else f" in {namespace} namespace"
        print(f"No resources found{where}.", file=sys.stderr)
        return 0
    show_namespace = info.namespaced and namespace is None
    wide = args.output == "wide"
    if info.kind == "Pod":
        from meshlet.cli.mesh import pods_table

        print(pods_table(items, all_namespaces=show_namespace, wide=wide))
        return 0
    if info.kind == "Deployment":
        pods = client.request("GET", resource_path(REGISTRY.resolve("pods"), namespace))["items"]
        print(deployments_table(items, pods, all_namespaces=show_namespace))
        return 0
    print(render_table(info, items, wide=wide, namespaces=show_namespace))
    return 0


def _get_endpoints(args: argparse.Namespace) -> int:
    """``get endpoints``: each Service's ready pod addresses (Kubernetes' Endpoints, which
    meshlet derives from Services and Pods rather than stores)."""
    from meshlet.api import REGISTRY

    client = _client(args)
    namespace = None if args.all_namespaces else args.namespace
    services = client.request("GET", resource_path(REGISTRY.resolve("services"), namespace))
    pods = client.request("GET", resource_path(REGISTRY.resolve("pods"), namespace))["items"]
    rows: list[dict[str, Any]] = []
    for svc in services["items"]:
        meta = svc.get("metadata") or {}
        if args.name is not None and meta.get("name") != args.name:
            continue
        addresses = endpoint_addresses(svc, pods)
        rows.append({"metadata": dict(meta), "subsets": [{"addresses": addresses}]})
    if args.name is not None and not rows:
        print(f'Error from server (NotFound): endpoints "{args.name}" not found', file=sys.stderr)
        return 1
    if args.output in ("json", "yaml"):
        listed = {"apiVersion": "v1", "kind": "List", "items": rows, "metadata": {}}
        print(json.dumps(listed, indent=4) if args.output == "json" else yaml.safe_dump(listed))
        return 0
    now = datetime.now(UTC)
    header = ["NAME", "ENDPOINTS", "AGE"]
    if namespace is None:
        header.insert(0, "NAMESPACE")
    found = []
    for row in rows:
        meta = row["metadata"]
        shown = [f"{a['ip']}:{a['port']}" for a in row["subsets"][0]["addresses"]]
        cells = [
            str(meta.get("name")),
            ",".join(shown[:3]) + (f" + {len(shown) - 3} more..." if len(shown) > 3 else "")
            or "<none>",
            age(meta.get("creationTimestamp"), now),
        ]
        if namespace is None:
            cells.insert(0, str(meta.get("namespace", "")))
        found.append(cells)
    print(table(header, found))
    return 0


def endpoint_addresses(svc: dict[str, Any], pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ready pods a Service selects, at each port's target (named ports resolved)."""
    spec = svc.get("spec") or {}
    selector = spec.get("selector") or {}
    out: list[dict[str, Any]] = []
    if not selector:
        return out
    for pod in pods:
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        if meta.get("namespace") != (svc.get("metadata") or {}).get("namespace"):
            continue
        if any(labels.get(k) != v for k, v in selector.items()):
            continue
        status = pod.get("status") or {}
        conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
        if conditions.get("Ready") != "True" or not status.get("podIP"):
            continue
        named = {
            p.get("name"): p.get("containerPort")
            for c in (pod.get("spec") or {}).get("containers") or []
            for p in c.get("ports") or []
        }
        for port in spec.get("ports") or []:
            target = port.get("targetPort", port.get("port"))
            number = named.get(target) if isinstance(target, str) else target
            if number:
                out.append({"ip": status["podIP"], "port": number, "pod": meta.get("name")})
    return out


def deployments_table(
    deployments: list[dict[str, Any]], pods: list[dict[str, Any]], *, all_namespaces: bool
) -> str:
    """kubectl's READY, UP-TO-DATE, AVAILABLE columns, counted from the pods."""
    now = datetime.now(UTC)
    header = ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]
    if all_namespaces:
        header.insert(0, "NAMESPACE")
    rows = []
    for d in deployments:
        meta = d.get("metadata") or {}
        replicas = (d.get("spec") or {}).get("replicas")
        replicas = 1 if replicas is None else int(replicas)
        mine = [
            p
            for p in pods
            if (p.get("metadata") or {}).get("namespace") == meta.get("namespace")
            and any(
                o.get("name") == meta.get("name")
                for o in (p.get("metadata") or {}).get("ownerReferences") or []
            )
        ]
        ready = sum(
            1
            for p in mine
            if any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in (p.get("status") or {}).get("conditions") or []
            )
        )
        cells = [
            str(meta.get("name")),
            f"{ready}/{replicas}",
            str(len(mine)),
            str(ready),
            age(meta.get("creationTimestamp"), now),
        ]
        if all_namespaces:
            cells.insert(0, str(meta.get("namespace", "")))
        rows.append(cells)
    return table(header, rows)


def table(header: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell, three spaces apart (kubectl's look)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    )


def _columns(info: KindInfo, obj: dict[str, Any]) -> list[tuple[str, str]]:
    """Kind-specific columns for ``-o wide`` (as Istio's CRDs declare them)."""
    spec = obj.get("spec") or {}

    def listed(value: Any) -> str:
        return ",".join(str(v) for v in value) if value else "<none>"

    if info.kind == "VirtualService":
        return [("GATEWAYS", listed(spec.get("gateways"))), ("HOSTS", listed(spec.get("hosts")))]
    if info.kind == "DestinationRule":
        return [("HOST", str(spec.get("host", "")))]
    if info.kind == "ServiceEntry":
        return [
            ("HOSTS", listed(spec.get("hosts"))),
            ("LOCATION", str(spec.get("location", ""))),
            ("RESOLUTION", str(spec.get("resolution", ""))),
        ]
    if info.kind == "Gateway":
        return [("SELECTOR", listed(f"{k}={v}" for k, v in (spec.get("selector") or {}).items()))]
    if info.kind == "Service":
        ports = [f"{p.get('port')}/{p.get('protocol', 'TCP')}" for p in spec.get("ports") or []]
        return [
            ("TYPE", str(spec.get("type") or "ClusterIP")),
            ("PORT(S)", listed(ports)),
            ("SELECTOR", listed(f"{k}={v}" for k, v in (spec.get("selector") or {}).items())),
        ]
    return []


def render_table(
    info: KindInfo,
    items: list[dict[str, Any]],
    *,
    wide: bool = False,
    namespaces: bool = False,
    now: datetime | None = None,
) -> str:
    """kubectl's table: NAMESPACE (with -A), NAME, the kind's columns (wide), AGE."""
    now = now or datetime.now(UTC)
    rows: list[list[str]] = []
    header: list[str] = []
    for obj in items:
        metadata = obj.get("metadata") or {}
        cells = [("NAME", str(metadata.get("name", "")))]
        if namespaces:
            cells.insert(0, ("NAMESPACE", str(metadata.get("namespace", ""))))
        if wide:
            cells.extend(_columns(info, obj))
        cells.append(("AGE", age(metadata.get("creationTimestamp"), now)))
        header = [c[0] for c in cells]
        rows.append([c[1] for c in cells])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)


def age(timestamp: Any, now: datetime) -> str:
    """kubectl's short age: ``45s``, ``3m12s``, ``25m``, ``5h``, ``3d``, ``400d``."""
    if not isinstance(timestamp, str):
        return "<unknown>"
    try:
        then = datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return "<unknown>"
    seconds = max(0, int((now - then).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 48:
        return f"{hours}h"
    return f"{hours // 24}d"
