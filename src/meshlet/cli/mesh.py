"""The embedded mesh's commands: ``up``, ``down``, ``status``, ``logs``, ``describe``, ``scale``,
``rollout restart`` and ``demo`` (and ``mesh-daemon``, the process ``up`` starts).

The running mesh is found as every other command finds the control plane (``--server``,
``$MESHLET_SERVER``, the default API address); its state directory, where pod logs live, is
what its ``/runtime`` endpoint says.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from meshlet.cli.config import (
    DEFAULT_SERVER,
    SERVER_ENV,
    ControlClient,
    ServerError,
    age,
    files_option,
    server_option,
    table,
)
from meshlet.errors import ConfigError, MeshletError, Problem

DEFAULT_STATE_DIR = Path(".meshlet")
_POLL = 0.25


def register(commands: Any) -> None:
    server = server_option()
    namespace = argparse.ArgumentParser(add_help=False)
    namespace.add_argument("-n", "--namespace", default="default", help="default: default")

    start = argparse.ArgumentParser(add_help=False)
    start.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        metavar="DIR",
        help="where the mesh keeps its store, pod logs and bootstraps (default .meshlet)",
    )
    start.add_argument(
        "--gateway-port",
        type=int,
        default=8080,
        metavar="PORT",
        help="host port of the ingress gateway on 127.0.0.1 (default 8080)",
    )
    start.add_argument(
        "--xds-address",
        default="127.0.0.1:15010",
        metavar="HOST:PORT",
        help="where the control plane serves xDS (default 127.0.0.1:15010); the API is"
        " at --server's address",
    )
    start.add_argument(
        "--mtls",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a CA (at the xDS port + 2), workload certificates and automatic mutual TLS"
        " between sidecars, with PeerAuthentication (default on; --no-mtls: plaintext)",
    )
    start.add_argument(
        "--workload-cert-ttl",
        default="24h",
        metavar="DURATION",
        help="lifetime of workload certificates, renewed at half-life (default 24h)",
    )
    _telemetry_options(start, trace_sampling=1.0)
    start.add_argument(
        "--images",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="an image map (image glob -> command); may repeat, tried before meshlet's own",
    )

    p = commands.add_parser(
        "up",
        parents=[server, start, files_option()],
        help="run Kubernetes manifests as a local mesh",
        description=(
            "Start the control plane and run the manifests' Deployments as local pods, each"
            " with a sidecar, plus an ingress gateway. Istio's kinds configure the mesh."
        ),
    )
    p.add_argument("-d", "--detach", action="store_true", help="return once everything is ready")
    p.set_defaults(run=run_up)

    p = commands.add_parser(
        "down", parents=[server], help="stop the local mesh and everything it runs"
    )
    p.set_defaults(run=run_down)

    p = commands.add_parser(
        "status", parents=[server], help="the control plane, each proxy's sync, the pods"
    )
    p.set_defaults(run=run_status)

    p = commands.add_parser(
        "logs", parents=[server, namespace], help="print a container's log (a pod's app or sidecar)"
    )
    p.add_argument("pod", metavar="POD")
    p.add_argument(
        "-c", "--container", help="the container (default: the first; istio-proxy: the sidecar)"
    )
    p.add_argument("-f", "--follow", action="store_true", help="keep printing as it grows")
    p.set_defaults(run=run_logs)

    p = commands.add_parser(
        "describe", parents=[server, namespace], help="show a pod or a service in detail"
    )
    p.add_argument("kind", choices=("pod", "pods", "po", "service", "services", "svc"))
    p.add_argument("name", metavar="NAME")
    p.set_defaults(run=run_describe)

    p = commands.add_parser(
        "scale", parents=[server, namespace], help="set a deployment's replicas"
    )
    p.add_argument("target", metavar="deployment/NAME")
    p.add_argument("--replicas", type=int, required=True, metavar="N")
    p.set_defaults(run=run_scale)

    p = commands.add_parser(
        "rollout", parents=[server, namespace], help="restart a deployment's pods, rolling"
    )
    p.add_argument("action", choices=("restart",))
    p.add_argument("target", metavar="deployment/NAME")
    p.set_defaults(run=run_rollout)

    p = commands.add_parser(
        "demo",
        parents=[server],
        help="run Bookinfo behind the mesh, with traffic",
        description="Start Bookinfo, its gateway and destination rules, and send gentle traffic.",
    )
    p.add_argument("--duration", type=float, metavar="SECONDS", help="stop after this long")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, metavar="DIR")
    p.add_argument("--gateway-port", type=int, default=8080, metavar="PORT")
    p.add_argument("--rate", type=float, default=2.0, metavar="RPS", help="default 2")
    p.add_argument("--xds-address", default="127.0.0.1:15010", metavar="HOST:PORT")
    p.add_argument(
        "--mtls",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="mutual TLS between sidecars, with a CA (default on)",
    )
    _telemetry_options(p, trace_sampling=100.0)
    p.set_defaults(run=run_demo, images=[])

    p = commands.add_parser("mesh-daemon", parents=[start])
    p.add_argument("--api-address", default="127.0.0.1:15014")
    p.set_defaults(run=run_daemon)


def _telemetry_options(p: argparse.ArgumentParser, *, trace_sampling: float) -> None:
    """The dashboard's, the OTLP receiver's and the tracer's flags (``up``, ``demo``)."""
    p.add_argument(
        "--dashboard-port",
        type=int,
        default=20001,
        metavar="PORT",
        help="the dashboard on 127.0.0.1 (default 20001; 0: no dashboard)",
    )
    p.add_argument(
        "--otlp-port",
        type=int,
        default=4318,
        metavar="PORT",
        help="the mesh's OTLP/HTTP trace receiver on 127.0.0.1, where every proxy sends its"
        " spans (default 4318; 0: no tracing)",
    )
    p.add_argument(
        "--trace-sampling",
        type=float,
        default=trace_sampling,
        metavar="PERCENT",
        help=f"percent of requests traced, as Istio's meshConfig (default {trace_sampling:g})",
    )
    p.add_argument(
        "--prometheus",
        default="",
        metavar="URL",
        help="a Prometheus that scrapes the mesh (see `meshlet prometheus-config`), asked by"
        " the dashboard instead of the embedded scraper",
    )
    p.add_argument(
        "--scrape-interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how often the embedded scraper reads every proxy's metrics (default 5); with"
        " --prometheus, how often that Prometheus scrapes them",
    )


def _client(args: argparse.Namespace) -> ControlClient:
    return ControlClient(args.server or os.environ.get(SERVER_ENV) or DEFAULT_SERVER)


def _runtime(client: ControlClient) -> dict[str, Any] | None:
    """The running mesh's summary, or None when no mesh answers."""
    try:
        data = client.request("GET", "/runtime")
    except ServerError:
        return None  # a control plane without a runtime (`meshlet control`)
    except MeshletError:
        return None
    return data if isinstance(data, dict) else None


def _need_runtime(client: ControlClient) -> dict[str, Any]:
    summary = _runtime(client)
    if summary is None:
        raise MeshletError(
            f"no mesh is running at {client.url}: start one with `meshlet up -f FILE` "
            "or `meshlet demo`"
        )
    return summary


# -- mesh-daemon ---------------------------------------------------------------------------------


def run_daemon(args: argparse.Namespace) -> int:
    import logging

    from meshlet.cli.control import _duration
    from meshlet.runtime.daemon import MeshOptions
    from meshlet.runtime.daemon import run as serve

    logging.basicConfig(
        level="INFO", stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return serve(
        MeshOptions(
            state_dir=args.state_dir,
            xds_address=args.xds_address,
            api_address=args.api_address,
            gateway_port=args.gateway_port or None,
            images=tuple(args.images),
            ca=args.mtls,
            mtls=args.mtls,
            ca_address=_next_port(args.xds_address, 2),  # 15012 next to 15010, as Istio's
            xds_tls_address=_next_port(args.xds_address, 1),
            workload_cert_ttl=_duration(args.workload_cert_ttl, "--workload-cert-ttl"),
            dashboard_port=args.dashboard_port,
            otlp_port=args.otlp_port,
            trace_sampling=args.trace_sampling,
            prometheus_url=args.prometheus,
            scrape_interval=args.scrape_interval,
        )
    )


def _next_port(address: str, offset: int) -> str:
    host, _, port = address.rpartition(":")
    return f"{host}:{int(port) + offset}"


# -- up ------------------------------------------------------------------------------------------


def _load(paths: list[str]) -> list[dict[str, Any]]:
    """Validate the files (file:line errors) and check each kind is one ``up`` runs."""
    from meshlet.api import load_paths
    from meshlet.runtime.manifests import check_kinds

    resources = load_paths(paths)
    objects = [r.to_object() for r in resources]
    check_kinds(objects, [f"{r.source}:{r.line}" for r in resources])
    return objects


def _check_images(objects: list[dict[str, Any]], images: list[Path]) -> None:
    from meshlet.runtime.manifests import container_argv, load_images

    maps = load_images(*images)
    problems: list[Problem] = []
    for obj in objects:
        if obj.get("kind") != "Deployment":
            continue
        template = (obj.get("spec") or {}).get("template") or {}
        for container in (template.get("spec") or {}).get("containers") or ():
            try:
                container_argv(container, maps)
            except ConfigError as e:
                name = obj["metadata"]["name"]
                problems.extend(
                    Problem(path=f"deployment {name}: {p.path}", message=p.message)
                    for p in e.problems
                )
    if problems:
        raise ConfigError(problems)


def _start_daemon(args: argparse.Namespace, client: ControlClient) -> None:
    state: Path = args.state_dir
    state.mkdir(parents=True, exist_ok=True)
    log_path = state / "mesh.log"
    argv = [
        sys.executable,
        "-m",
        "meshlet",
        "mesh-daemon",
        "--state-dir",
        str(state),
        "--gateway-port",
        str(args.gateway_port),
        "--xds-address",
        args.xds_address,
        "--api-address",
        client.url.split("://", 1)[-1].rstrip("/"),
    ]
    for image_map in args.images:
        argv += ["--images", str(image_map)]
    argv.append("--mtls" if getattr(args, "mtls", True) else "--no-mtls")
    argv += ["--workload-cert-ttl", getattr(args, "workload_cert_ttl", "24h")]
    argv += ["--dashboard-port", str(args.dashboard_port), "--otlp-port", str(args.otlp_port)]
    argv += ["--trace-sampling", f"{args.trace_sampling:g}"]
    argv += ["--scrape-interval", f"{args.scrape_interval:g}"]
    if args.prometheus:
        argv += ["--prometheus", args.prometheus]
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            # The daemon forks pods while gRPC's threads run; its processes exec at once, so
            # gRPC's fork handlers have nothing to protect (and log a warning per fork).
            env={**os.environ, "PYTHONUNBUFFERED": "1", "GRPC_ENABLE_FORK_SUPPORT": "0"},
        )
    print(f"starting the control plane (log: {log_path})", flush=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-8:]
            raise MeshletError(
                "the mesh did not start:\n  "
                + "\n  ".join(tail)
                + "\n(is another control plane or mesh using ports 15010/15014, or the"
                " dashboard's and OTLP receiver's 20001/4318?)"
            )
        if _runtime(client) is not None:
            return
        time.sleep(_POLL)
    process.terminate()
    raise MeshletError(f"the mesh did not answer within 30 s; see {log_path}")


def _apply(client: ControlClient, objects: list[dict[str, Any]]) -> None:
    from meshlet.api import REGISTRY

    order = {"Namespace": 0, "ServiceAccount": 1, "ConfigMap": 1, "Service": 2}
    ordered = sorted(objects, key=lambda o: order.get(str(o.get("kind")), 3))
    answer = client.request("POST", "/apply", ordered)
    for result in answer.get("results", []):
        obj = result.get("object") or {}
        kind = str(obj.get("kind", ""))
        try:
            info = REGISTRY.resolve(kind)
            label = f"{info.singular}.{info.group}" if info.group else info.singular
        except Exception:
            label = kind.lower()
        name = (obj.get("metadata") or {}).get("name", "")
        print(f"{label}/{name} {result.get('action')}")


def _expected_pods(client: ControlClient) -> int:
    deployments = client.request("GET", "/apis/apps/v1/deployments").get("items", [])
    total = 0
    for d in deployments:
        replicas = (d.get("spec") or {}).get("replicas")
        total += 1 if replicas is None else int(replicas)
    return total


def _wait_ready(client: ControlClient, timeout: float = 120.0) -> dict[str, Any]:
    """Print progress until every pod is ready; the last summary."""
    deadline = time.monotonic() + timeout
    last = ""
    start = time.monotonic()
    while True:
        summary = _need_runtime(client)
        expected = _expected_pods(client) + (1 if summary.get("gateway") else 0)
        pods = [p for p in summary["pods"] if not p["terminating"]]
        ready = [p for p in pods if p["ready"]]
        starting = [p for p in pods if not p["ready"] and p["phase"] == "Running"]
        pending = max(0, expected - len(ready) - len(starting))
        line = f"pods: {len(ready)}/{expected} ready, {len(starting)} starting, {pending} pending"
        if line != last:
            waiting = ", ".join(sorted(p["name"] for p in pods if not p["ready"]))
            print(
                f"[{time.monotonic() - start:4.1f}s] {line}" + (f" ({waiting})" if waiting else ""),
                flush=True,
            )
            last = line
        failures = summary.get("failures") or {}
        if failures:
            raise MeshletError(
                "some deployments cannot run:\n  "
                + "\n  ".join(f"{k}: {v}" for k, v in failures.items())
                + "\nfix the manifests and `meshlet apply` them; the mesh keeps running"
                " (`meshlet down` stops it)"
            )
        if len(ready) >= expected and not any(p["terminating"] for p in summary["pods"]):
            return summary
        if time.monotonic() > deadline:
            raise MeshletError(
                f"not every pod was ready after {timeout:.0f} s: see `meshlet get pods` and "
                "`meshlet logs POD`"
            )
        time.sleep(_POLL)


def _print_ready(client: ControlClient, summary: dict[str, Any]) -> None:
    print()
    print(pods_table(client.request("GET", "/api/v1/pods").get("items", []), all_namespaces=True))
    print()
    gateway = summary.get("gateway")
    if gateway:
        print(f"ingress gateway: {gateway}/")
    if summary.get("dashboard"):
        print(f"dashboard: {summary['dashboard']}/")
    if summary.get("otlp"):
        print(f"traces (OTLP/HTTP): {summary['otlp']}")
    print("next: meshlet status | meshlet get pods | meshlet logs POD | meshlet down")


def run_up(args: argparse.Namespace) -> int:
    objects = _load(args.filename)
    _check_images(objects, args.images)
    client = _client(args)
    if _runtime(client) is None:
        _start_daemon(args, client)
    else:
        print(f"using the mesh running at {client.url}")
    _apply(client, objects)
    summary = _wait_ready(client)
    _print_ready(client, summary)
    if args.detach:
        return 0
    return _foreground(client)


def _foreground(
    client: ControlClient, duration: float | None = None, before_stop: Any = None
) -> int:
    """Wait for Ctrl-C, SIGTERM or ``duration``; then call ``before_stop`` and stop the mesh."""
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    print("the mesh runs until Ctrl-C" + (f" or {duration:.0f} s" if duration else ""), flush=True)
    try:
        stop.wait(duration)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if before_stop is not None:
        before_stop()
    print("stopping the mesh ...", flush=True)
    _shutdown(client)
    return 0


def _shutdown(client: ControlClient, timeout: float = 90.0) -> bool:
    summary = _runtime(client)
    if summary is None:
        return False
    mesh_file = Path(summary["state_dir"]) / "mesh.json"
    pid = None
    with contextlib.suppress(OSError, ValueError, KeyError):
        pid = int(json.loads(mesh_file.read_text())["pid"])
    with contextlib.suppress(MeshletError):
        client.request("POST", "/runtime/shutdown")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid is not None:
            if not _alive(pid):
                break
        elif _runtime(client) is None:
            break
        time.sleep(_POLL)
    else:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    print("mesh stopped")
    return True


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (reaping it if it is our own child that has exited)."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def run_down(args: argparse.Namespace) -> int:
    if not _shutdown(_client(args)):
        print("no mesh is running")
    return 0


# -- status, get helpers --------------------------------------------------------------------------


def pod_state(pod: dict[str, Any]) -> tuple[str, str, int]:
    """kubectl's READY, STATUS and RESTARTS of a Pod object."""
    status = pod.get("status") or {}
    containers = status.get("containerStatuses") or []
    ready = sum(1 for c in containers if c.get("ready"))
    restarts = sum(int(c.get("restartCount") or 0) for c in containers)
    phase = str(status.get("phase") or "Pending")
    for c in containers:
        waiting = (c.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason") and waiting["reason"] != "ContainerCreating":
            phase = str(waiting["reason"])
            break
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        phase = "Terminating"
    return f"{ready}/{len(containers) or 1}", phase, restarts


def pods_table(
    pods: list[dict[str, Any]], *, all_namespaces: bool = False, wide: bool = False
) -> str:
    now = datetime.now(UTC)
    header = ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    if all_namespaces:
        header.insert(0, "NAMESPACE")
    if wide:
        header += ["IP", "NODE"]
    rows = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        ready, phase, restarts = pod_state(pod)
        row = [
            str(meta.get("name")),
            ready,
            phase,
            str(restarts),
            age(meta.get("creationTimestamp"), now),
        ]
        if all_namespaces:
            row.insert(0, str(meta.get("namespace", "")))
        if wide:
            row += [str((pod.get("status") or {}).get("podIP", "<none>")), "meshlet"]
        rows.append(row)
    return table(header, rows)


def run_status(args: argparse.Namespace) -> int:
    from meshlet.cli.debug import status_table

    client = _client(args)
    summary = _need_runtime(client)
    print(f"control plane: {client.url} (state {summary['state_dir']})")
    if summary.get("gateway"):
        print(f"ingress gateway: {summary['gateway']}/")
    if summary.get("dashboard"):
        print(f"dashboard: {summary['dashboard']}/")
    if summary.get("otlp"):
        print(f"traces (OTLP/HTTP): {summary['otlp']}")
    print()
    statuses = client.request("GET", "/debug/syncz")
    print(status_table(statuses) if statuses else "no proxies connected")
    print()
    pods = client.request("GET", "/api/v1/pods").get("items", [])
    print(pods_table(pods, all_namespaces=True, wide=True) if pods else "no pods")
    for key, why in (summary.get("failures") or {}).items():
        print(f"deployment {key} cannot run: {why}")
    return 0


# -- logs, describe ------------------------------------------------------------------------------


def _pod(client: ControlClient, namespace: str, name: str) -> dict[str, Any]:
    try:
        pod: dict[str, Any] = client.request("GET", f"/api/v1/namespaces/{namespace}/pods/{name}")
    except ServerError as e:
        if e.code == 404:
            raise MeshletError(
                f'pods "{name}" not found in namespace {namespace} (see `meshlet get pods`)'
            ) from None
        raise
    return pod


def run_logs(args: argparse.Namespace) -> int:
    client = _client(args)
    summary = _need_runtime(client)
    pod = _pod(client, args.namespace, args.pod)
    containers = [c["name"] for c in (pod.get("spec") or {}).get("containers") or []]
    name = args.container or (containers[0] if containers else "istio-proxy")
    if name not in (*containers, "istio-proxy"):
        raise MeshletError(
            f"container {name} is not in pod {args.pod}; choose one of "
            + ", ".join([*containers, "istio-proxy"])
        )
    path = Path(summary["state_dir"]) / "pods" / args.namespace / args.pod / f"{name}.log"
    if not path.exists():
        print(f"(no output from {name} yet)", file=sys.stderr)
        if not args.follow:
            return 0
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError):
        offset = 0
        while True:
            if path.exists():
                with path.open("rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                    offset += len(chunk)
                if chunk:
                    sys.stdout.write(chunk.decode(errors="replace"))
                    sys.stdout.flush()
            if not args.follow:
                break
            time.sleep(_POLL)
    return 0


def run_describe(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.kind in ("pod", "pods", "po"):
        print(describe_pod(_pod(client, args.namespace, args.name)))
        return 0
    try:
        svc = client.request("GET", f"/api/v1/namespaces/{args.namespace}/services/{args.name}")
    except ServerError as e:
        if e.code == 404:
            raise MeshletError(
                f'services "{args.name}" not found in namespace {args.namespace}'
            ) from None
        raise
    pods = client.request("GET", f"/api/v1/namespaces/{args.namespace}/pods").get("items", [])
    print(describe_service(svc, pods))
    return 0


def _labels(values: dict[str, Any] | None) -> str:
    return ",".join(f"{k}={v}" for k, v in (values or {}).items()) or "<none>"


def describe_pod(pod: dict[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    _, phase, _ = pod_state(pod)
    owner = (meta.get("ownerReferences") or [{}])[0].get("name", "<none>")
    lines = [
        f"Name:             {meta.get('name')}",
        f"Namespace:        {meta.get('namespace')}",
        f"Service Account:  {spec.get('serviceAccountName', 'default')}",
        f"Start Time:       {status.get('startTime', '<none>')}",
        f"Labels:           {_labels(meta.get('labels'))}",
        f"Annotations:      {_labels(meta.get('annotations'))}",
        f"Status:           {phase}",
        f"IP:               {status.get('podIP', '<none>')}",
        f"Controlled By:    Deployment/{owner}",
        "Containers:",
    ]
    statuses = {c.get("name"): c for c in status.get("containerStatuses") or []}
    for container in [
        *(spec.get("containers") or []),
        {"name": "istio-proxy", "image": "meshlet proxy"},
    ]:
        c = statuses.get(container.get("name"), {})
        state = c.get("state") or {}
        state_name, detail = next(iter(state.items()), ("waiting", None))
        reason = str((detail or {}).get("reason", ""))
        lines += [
            f"  {container.get('name')}:",
            f"    Image:          {container.get('image', '')}",
            f"    State:          {state_name.capitalize()}" + (f" ({reason})" if reason else ""),
            f"    Ready:          {bool(c.get('ready'))}",
            f"    Restart Count:  {c.get('restartCount', 0)}",
        ]
        for probe in ("readinessProbe", "livenessProbe"):
            if container.get(probe):
                lines.append(f"    {probe[:-5].capitalize()}:      {json.dumps(container[probe])}")
    lines.append("Conditions:")
    for cond in status.get("conditions") or []:
        lines.append(f"  {cond.get('type'):<17} {cond.get('status')}")
    return "\n".join(lines)


def describe_service(svc: dict[str, Any], pods: list[dict[str, Any]]) -> str:
    meta = svc.get("metadata") or {}
    spec = svc.get("spec") or {}
    selector = spec.get("selector") or {}
    selected = [
        p
        for p in pods
        if selector
        and all(
            ((p.get("metadata") or {}).get("labels") or {}).get(k) == v for k, v in selector.items()
        )
    ]
    ready = [p for p in selected if pod_state(p)[0].split("/")[0] == pod_state(p)[0].split("/")[1]]
    lines = [
        f"Name:              {meta.get('name')}",
        f"Namespace:         {meta.get('namespace')}",
        f"Labels:            {_labels(meta.get('labels'))}",
        f"Selector:          {_labels(selector)}",
        f"Type:              {spec.get('type', 'ClusterIP')}",
        f"Host:              {meta.get('name')}.{meta.get('namespace')}.svc.cluster.local",
    ]
    for port in spec.get("ports") or []:
        target = port.get("targetPort", port.get("port"))
        lines.append(f"Port:              {port.get('name', '<unset>')}  {port.get('port')}/TCP")
        lines.append(f"TargetPort:        {target}/TCP")
        endpoints = ",".join(f"{(p.get('status') or {}).get('podIP')}:{target}" for p in ready)
        lines.append(f"Endpoints:         {endpoints or '<none>'}")
    not_ready = [p["metadata"]["name"] for p in selected if p not in ready]
    if not_ready:
        lines.append(f"Not ready:         {', '.join(not_ready)}")
    return "\n".join(lines)


# -- scale, rollout ------------------------------------------------------------------------------


def _deployment_target(target: str) -> str:
    kind, sep, name = target.partition("/")
    if not sep or kind not in ("deployment", "deployments", "deploy") or not name:
        raise MeshletError(f"expected deployment/NAME, not {target!r}")
    return name


def _update_deployment(args: argparse.Namespace, change: Any) -> str:
    name = _deployment_target(args.target)
    client = _client(args)
    path = f"/apis/apps/v1/namespaces/{args.namespace}/deployments/{name}"
    try:
        deployment = client.request("GET", path)
    except ServerError as e:
        if e.code == 404:
            raise MeshletError(
                f'deployments.apps "{name}" not found in namespace {args.namespace}'
            ) from None
        raise
    change(deployment)
    client.request("PUT", path, deployment)
    return name


def run_scale(args: argparse.Namespace) -> int:
    if args.replicas < 0:
        raise MeshletError("--replicas must be 0 or more")

    def change(d: dict[str, Any]) -> None:
        d.setdefault("spec", {})["replicas"] = args.replicas

    print(f"deployment.apps/{_update_deployment(args, change)} scaled")
    return 0


def run_rollout(args: argparse.Namespace) -> int:
    from meshlet.runtime.manifests import RESTARTED_AT

    def change(d: dict[str, Any]) -> None:
        template = d.setdefault("spec", {}).setdefault("template", {})
        annotations = template.setdefault("metadata", {}).setdefault("annotations", {})
        annotations[RESTARTED_AT] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    print(f"deployment.apps/{_update_deployment(args, change)} restarted")
    return 0


# -- demo ----------------------------------------------------------------------------------------


def run_demo(args: argparse.Namespace) -> int:
    from meshlet.demo import manifest

    paths = [str(manifest(n)) for n in ("bookinfo.yaml", "gateway.yaml", "destination-rules.yaml")]
    objects = _load(paths)
    client = _client(args)
    if _runtime(client) is not None:
        raise MeshletError(
            f"a mesh is already running at {client.url}: stop it with `meshlet down` first"
        )
    started = time.monotonic()
    _start_daemon(args, client)
    _apply(client, objects)
    summary = _wait_ready(client)
    product = f"{summary['gateway']}/productpage"
    _wait_page(product, deadline=time.monotonic() + 30)
    print(f"Bookinfo is up in {time.monotonic() - started:.1f} s.")
    _print_ready(client, summary)
    here = Path(str(manifest("bookinfo.yaml"))).parent
    print(
        f"""
open {product}
then try:
  meshlet apply -f {here / "virtual-service-reviews-v3.yaml"}    # the stars turn red
  meshlet apply -f {here / "virtual-service-all-v1.yaml"}        # no stars at all
  meshlet top                   # requests/s, success rate and latency per workload, live
  meshlet get pods -o wide
  meshlet proxy-status
traffic: {args.rate:g} requests/s to {product}"""
    )
    stop_traffic = threading.Event()
    counts: Counter[int] = Counter()
    traffic = threading.Thread(
        target=_traffic, args=(product, args.rate, stop_traffic, counts), daemon=True
    )
    traffic.start()

    def end_traffic() -> None:
        """Stop the traffic before the mesh, so that no request meets a closing gateway."""
        stop_traffic.set()
        traffic.join(15)
        if counts:
            answers = ", ".join(
                f"{n} x {code or 'no answer'}" for code, n in sorted(counts.items())
            )
            print(f"traffic sent: {answers}")

    try:
        return _foreground(client, args.duration, end_traffic)
    finally:
        stop_traffic.set()


def _wait_page(url: str, deadline: float) -> None:
    import urllib.request

    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise MeshletError(f"{url} is not served yet: see `meshlet status`")
        time.sleep(_POLL)


def _traffic(url: str, rate: float, stop: threading.Event, counts: Counter[int]) -> None:
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    interval = 1.0 / rate if rate > 0 else 1.0
    while not stop.wait(interval):
        try:
            with opener.open(url, timeout=10) as r:
                r.read()
                counts[r.status] += 1
        except urllib.error.HTTPError as e:
            counts[e.code] += 1
        except OSError:
            counts[0] += 1
