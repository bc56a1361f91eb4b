"""The control plane's benchmark: translation time, push convergence and memory at scale.

    python bench/control.py            # full run, about 3 minutes, never more than 5
    python bench/control.py --quick    # smoke run: same mesh, fewer rounds, about 1 minute
    python bench/control.py --record   # ... and write the "Control plane" section of
                                       # bench/RESULTS.md

The mesh (``Mesh``): 1,000 Kubernetes Services over 10 namespaces, each selecting 10
WorkloadEntries (10,000 endpoints), with one VirtualService (a header match and a 90/10
split, retries, timeout) and one DestinationRule (pool and outlier settings, two subsets)
per service. Each namespace also has a Sidecar whose egress lists 10 services.

Three parts, measured against the targets of issue 3:

1. **Translation**, in this process: one sidecar's whole configuration (LDS, RDS, CDS, EDS,
   serialized as the server sends it) from a fresh snapshot of the whole mesh; and a sidecar
   scoped by its namespace's Sidecar to 10 services, on a snapshot already indexed.
2. **Convergence**: ``meshlet control`` started as a user starts it (its own state directory,
   xDS on 19010, API on 19014, pinned to CPU 0), the mesh applied with ``meshlet apply``; then
   100 and then 1,000 simulated sidecars (real grpcio streams, in this process on CPU 1) each
   subscribe as ``meshlet proxy`` does (LDS and CDS wildcards, EDS for the EDS clusters, RDS for
   the route configurations listeners name) and ACK every response. Round after round, one
   VirtualService that every sidecar sees is changed through the API (``POST /apply``); the
   time from just before that request to the moment the last sidecar has ACKed the last
   response of the new version is that round's convergence (the 100 ms debounce included).
3. **Memory**: VmRSS of the control plane's process with the whole mesh and 1,000 sidecars
   connected, after the rounds.

Every process it starts is stopped by its PID when the run ends, fails or is interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import shlex
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
import grpc.aio
import report
import yaml
from arms import port_is_free
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2
from processes import Spawned, Supervisor, rss_kib, wait_until

from meshlet.control.generators import build_snapshot, load_stored
from meshlet.control.registry import ConfigRegistry
from meshlet.control.snapshot import Proxy, Snapshot
from meshlet.control.translate import build_all

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "RESULTS.md"
HOST = "127.0.0.1"
XDS_PORT = 19010
API_PORT = 19014
CONTROL_CPU = 0
CLIENT_CPU = 1

LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"

TARGETS = {
    "full_ms": ("whole-mesh sidecar config, ms", "≤ 1000", lambda v: v <= 1000.0),
    "scoped_ms": ("Sidecar-scoped (10 services) config, ms", "≤ 20", lambda v: v <= 20.0),
    "converge_100_ms": ("convergence p99, 100 sidecars, ms", "≤ 300", lambda v: v <= 300.0),
    "rss_mib": ("control plane RSS, 1,000 sidecars, MiB", "≤ 300", lambda v: v <= 300.0),
}


# -- the synthetic mesh ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Mesh:
    """The issue's mesh as Kubernetes-style objects, the way a user would apply them.

    Service ``svc<i>`` lives in namespace ``ns<i % namespaces>``; its workloads
    ``svc<i>-<j>`` are at ``10.<i // 250>.<i % 250>.<j>`` with labels ``app=svc<i>`` and
    ``version=v1|v2``. The Sidecar of ``ns<n>`` lets its proxies see ``svc0`` (the service
    whose VirtualService the convergence rounds change) and ``scope - 1`` services of ``ns<n>``.
    """

    services: int = 1000
    endpoints_per_service: int = 10
    namespaces: int = 10
    scope: int = 10  # services per Sidecar

    def namespace(self, i: int) -> str:
        return f"ns{i % self.namespaces}"

    def address(self, i: int, j: int) -> str:
        return f"10.{i // 250}.{i % 250}.{j}"

    def objects(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for i in range(self.services):
            out.append(self.service(i))
            out.extend(self.workload(i, j) for j in range(self.endpoints_per_service))
            out.append(self.virtual_service(i))
            out.append(self.destination_rule(i))
        out.extend(self.sidecar(n) for n in range(self.namespaces))
        return out

    def service(self, i: int) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": f"svc{i}", "namespace": self.namespace(i)},
            "spec": {
                "selector": {"app": f"svc{i}"},
                "ports": [{"name": "http", "port": 8080, "targetPort": 8080}],
            },
        }

    def workload(self, i: int, j: int) -> dict[str, Any]:
        return {
            "apiVersion": "networking.istio.io/v1",
            "kind": "WorkloadEntry",
            "metadata": {
                "name": f"svc{i}-{j}",
                "namespace": self.namespace(i),
                "labels": {"app": f"svc{i}", "version": f"v{j % 2 + 1}"},
            },
            "spec": {"address": self.address(i, j), "serviceAccount": f"svc{i}"},
        }

    def virtual_service(self, i: int, v1_weight: int = 90) -> dict[str, Any]:
        name = f"svc{i}"
        return {
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": name, "namespace": self.namespace(i)},
            "spec": {
                "hosts": [name],
                "http": [
                    {
                        "match": [{"headers": {"end-user": {"exact": "jason"}}}],
                        "route": [{"destination": {"host": name, "subset": "v2"}}],
                    },
                    {
                        "route": [
                            {"destination": {"host": name, "subset": "v1"}, "weight": v1_weight},
                            {
                                "destination": {"host": name, "subset": "v2"},
                                "weight": 100 - v1_weight,
                            },
                        ],
                        "retries": {"attempts": 3, "perTryTimeout": "2s"},
                        "timeout": "10s",
                    },
                ],
            },
        }

    def destination_rule(self, i: int) -> dict[str, Any]:
        return {
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": f"svc{i}", "namespace": self.namespace(i)},
            "spec": {
                "host": f"svc{i}",
                "trafficPolicy": {
                    "connectionPool": {"http": {"http1MaxPendingRequests": 100}},
                    "outlierDetection": {"consecutive5xxErrors": 5},
                },
                "subsets": [
                    {"name": "v1", "labels": {"version": "v1"}},
                    {"name": "v2", "labels": {"version": "v2"}},
                ],
            },
        }

    def scoped_services(self, n: int) -> list[int]:
        """The services the Sidecar of ``ns<n>`` lets its proxies see: svc0, then its own."""
        own = [i for i in range(n, self.services, self.namespaces) if i != 0]
        return [0, *own[: self.scope - 1]]

    def sidecar(self, n: int) -> dict[str, Any]:
        suffix = "svc.cluster.local"
        hosts = [
            f"{self.namespace(i)}/svc{i}.{self.namespace(i)}.{suffix}"
            for i in self.scoped_services(n)
        ]
        return {
            "apiVersion": "networking.istio.io/v1",
            "kind": "Sidecar",
            "metadata": {"name": "default", "namespace": f"ns{n}"},
            "spec": {"egress": [{"hosts": hosts}]},
        }

    def changed_virtual_service(self, round_: int) -> dict[str, Any]:
        """svc0's VirtualService with a weight no earlier round used (89, 88, ... 11)."""
        return self.virtual_service(0, v1_weight=89 - round_ % 79)

    def proxy(self, k: int) -> Proxy:
        """Sidecar ``k``: the proxy of workload ``svc<k>-0`` (its own IP, so its own inbound
        side), as ``meshlet proxy`` describes itself."""
        i = k % self.services
        return Proxy(
            ip=self.address(i, k // self.services),
            namespace=self.namespace(i),
            pod_name=f"svc{i}-{k // self.services}",
            labels={"app": f"svc{i}", "version": f"v{k // self.services % 2 + 1}"},
            service_account=f"svc{i}",
            workload_name=f"svc{i}",
        )


# -- part 1: translation --------------------------------------------------------------------


def _serialized_size(built: Any) -> int:
    return sum(
        len(r.SerializeToString())
        for kind in (built.listeners, built.routes, built.clusters, built.endpoints)
        for r in kind
    )


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def bench_translation(mesh: Mesh, *, full_runs: int, scoped_runs: int) -> dict[str, Any]:
    """Times translation in this process; every figure in ms."""
    objects = mesh.objects()
    unscoped = [o for o in objects if o["kind"] != "Sidecar"]
    started = time.perf_counter()
    resources = load_stored(unscoped)
    load_ms = (time.perf_counter() - started) * 1000
    registry = ConfigRegistry(resources)
    whole = mesh.proxy(0)

    full: list[float] = []
    translate_only: list[float] = []
    size = 0
    for _ in range(full_runs):
        started = time.perf_counter()
        snapshot = Snapshot.build(resources, registry)
        built = build_all(snapshot, whole)
        translated = time.perf_counter()
        size = _serialized_size(built)
        full.append((time.perf_counter() - started) * 1000)
        translate_only.append((translated - started) * 1000)
    counts = {
        "listeners": len(built.listeners),
        "routes": len(built.routes),
        "clusters": len(built.clusters),
        "endpoints": len(built.endpoints),
    }

    # The control plane's rebuild per push: stored JSON to validated models to snapshot.
    started = time.perf_counter()
    build_snapshot(objects)
    rebuild_ms = (time.perf_counter() - started) * 1000

    scoped_resources = load_stored(objects)
    snapshot = Snapshot.build(scoped_resources, ConfigRegistry(scoped_resources))
    build_all(snapshot, mesh.proxy(mesh.services))  # the snapshot-wide indexes, once
    scoped: list[float] = []
    scoped_clusters = 0
    for k in range(scoped_runs):
        proxy = mesh.proxy(k + 1)  # a new proxy each time: nothing from its own cache
        started = time.perf_counter()
        built = build_all(snapshot, proxy)
        _serialized_size(built)
        scoped.append((time.perf_counter() - started) * 1000)
        scoped_clusters = len(built.clusters)
    return {
        "objects": len(objects),
        "load_ms": load_ms,
        "full_ms": statistics.median(full),
        "full_min_ms": min(full),
        "full_translate_ms": statistics.median(translate_only),
        "full_counts": counts,
        "full_bytes": size,
        "rebuild_ms": rebuild_ms,
        "scoped_ms": statistics.median(scoped),
        "scoped_p99_ms": _percentile(scoped, 99),
        "scoped_clusters": scoped_clusters,
        "full_runs": full_runs,
        "scoped_runs": scoped_runs,
    }


# -- part 2: simulated sidecars -------------------------------------------------------------


class Round:
    """One apply: which version counts as new, and how many sidecars have ACKed it."""

    def __init__(self, version: int, expected: int) -> None:
        self.version = version
        self.expected = expected
        self.reached = 0
        self.done = asyncio.Event()
        if expected == 0:
            self.done.set()


class Sidecar:
    """One simulated sidecar: an ADS stream that subscribes as ``meshlet proxy`` does and ACKs
    every response at once. ``acks`` holds (version, monotonic time once the ACK was
    written) for each response."""

    def __init__(self, channel: grpc.aio.Channel, node: base_pb2.Node) -> None:
        self.channel = channel
        self.node = node
        self.acks: list[tuple[int, float]] = []
        self.names: dict[str, list[str]] = {ROUTE_TYPE: [], ENDPOINT_TYPE: []}
        self.ready = asyncio.Event()  # LDS and CDS ACKed once
        self.seen: set[str] = set()
        self.round: Round | None = None
        self.counted = -1  # the last round's version this sidecar counted for
        self.error: BaseException | None = None
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        call = stub.StreamAggregatedResources()
        try:
            first = discovery_pb2.DiscoveryRequest(type_url=LISTENER_TYPE, node=self.node)
            await call.write(first)
            await call.write(discovery_pb2.DiscoveryRequest(type_url=CLUSTER_TYPE))
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    return
                for request in self.handle(response):
                    await call.write(request)
                self.acked(response)
        except asyncio.CancelledError:
            call.cancel()
            raise
        except Exception as e:
            self.error = e
            self.ready.set()

    def handle(self, response: Any) -> list[Any]:
        type_url = response.type_url
        ack = discovery_pb2.DiscoveryRequest(
            type_url=type_url,
            version_info=response.version_info,
            response_nonce=response.nonce,
            resource_names=self.names.get(type_url, []),
        )
        out = [ack]
        wanted: tuple[str, list[str]] | None = None
        if type_url == CLUSTER_TYPE:
            wanted = ENDPOINT_TYPE, _eds_names(response.resources)
        elif type_url == LISTENER_TYPE:
            wanted = ROUTE_TYPE, _rds_names(response.resources)
        if wanted is not None and wanted[1] != self.names[wanted[0]]:
            self.names[wanted[0]] = wanted[1]
            out.append(discovery_pb2.DiscoveryRequest(type_url=wanted[0], resource_names=wanted[1]))
        return out

    def acked(self, response: Any) -> None:
        now = time.monotonic()
        version = int(response.version_info or 0)
        self.acks.append((version, now))
        self.seen.add(response.type_url)
        if {LISTENER_TYPE, CLUSTER_TYPE} <= self.seen:
            self.ready.set()
        current = self.round
        if current is not None and version >= current.version and self.counted < current.version:
            self.counted = current.version
            current.reached += 1
            if current.reached >= current.expected:
                current.done.set()

    def converged_at(self, version: int, since: float) -> float | None:
        """When the last response of ``version`` (or newer) was ACKed after ``since``."""
        times = [t for v, t in self.acks if v >= version and t >= since]
        return max(times) if times else None


def _eds_names(resources: Sequence[Any]) -> list[str]:
    names = set()
    for packed in resources:
        cluster = cluster_pb2.Cluster.FromString(packed.value)
        if cluster.type == cluster_pb2.Cluster.EDS:
            names.add(cluster.eds_cluster_config.service_name or cluster.name)
    return sorted(names)


def _rds_names(resources: Sequence[Any]) -> list[str]:
    names = set()
    for packed in resources:
        listener = listener_pb2.Listener.FromString(packed.value)
        for chain in listener.filter_chains:
            for f in chain.filters:
                if f.typed_config.type_url.endswith("HttpConnectionManager"):
                    hcm = hcm_pb2.HttpConnectionManager.FromString(f.typed_config.value)
                    if hcm.HasField("rds"):
                        names.add(hcm.rds.route_config_name)
    return sorted(names)


def _node(proxy: Proxy) -> base_pb2.Node:
    metadata = struct_pb2.Struct()
    metadata.update(
        {
            "NAMESPACE": proxy.namespace,
            "SERVICE_ACCOUNT": proxy.service_account,
            "WORKLOAD_NAME": proxy.workload_name,
            "LABELS": dict(proxy.labels),
            "INSTANCE_IPS": proxy.ip,
        }
    )
    return base_pb2.Node(
        id=proxy.id, metadata=metadata, user_agent_name="meshlet-bench", cluster=proxy.pod_name
    )


# -- part 2: the control plane --------------------------------------------------------------


class ControlPlane:
    """``meshlet control`` in a temporary state directory, and its HTTP API."""

    def __init__(self, supervisor: Supervisor, state_dir: Path) -> None:
        self.supervisor = supervisor
        self.state_dir = state_dir
        self.log = state_dir / "control.log"
        self.api = f"http://{HOST}:{API_PORT}"
        self.process: Spawned | None = None

    def start(self) -> float:
        """Start it and wait for ``/ready``; seconds taken."""
        started = time.perf_counter()
        self.process = self.supervisor.spawn(
            "meshlet control",
            [
                str(REPO / ".venv" / "bin" / "meshlet"),
                "control",
                "--state-dir",
                str(self.state_dir / "state"),
                "--xds-address",
                f"{HOST}:{XDS_PORT}",
                "--api-address",
                f"{HOST}:{API_PORT}",
                "--log-level",
                "warning",
            ],
            cpu=CONTROL_CPU,
            log=self.log,
        )
        if not wait_until(lambda: self._ready() or not self.alive(), 30.0, 0.01) or (
            not self.alive()
        ):
            raise BenchError(f"meshlet control did not become ready:\n{self.tail()}")
        return time.perf_counter() - started

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api}/ready", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def apply_files(self, path: Path) -> float:
        """``meshlet apply -f path``, as a user runs it; seconds taken."""
        started = time.perf_counter()
        code, _, err = self.supervisor.run(
            "meshlet apply",
            [
                str(REPO / ".venv" / "bin" / "meshlet"),
                "apply",
                "--server",
                self.api,
                "-f",
                str(path),
            ],
            cpu=CLIENT_CPU,
            timeout=120,
        )
        if code != 0:
            raise BenchError(f"meshlet apply failed ({code}):\n{err[-2000:]}")
        return time.perf_counter() - started

    def apply(self, obj: dict[str, Any]) -> int:
        """``POST /apply`` of one object; the store revision it got."""
        request = urllib.request.Request(
            f"{self.api}/apply",
            data=json.dumps([obj]).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as r:
            body = json.loads(r.read())
        return int(body["results"][0]["object"]["metadata"]["resourceVersion"])

    def rss_mib(self) -> float:
        return rss_kib(self.process.pid) / 1024 if self.process else 0.0


class BenchError(Exception):
    """The benchmark cannot go on (the control plane did not start, an apply failed)."""


@dataclass(slots=True, kw_only=True)
class Phase:
    clients: int
    connect_s: float = 0.0
    rounds: list[dict[str, Any]] = field(default_factory=list)
    rss_mib: float = 0.0
    errors: int = 0


async def connect(mesh: Mesh, sidecars: list[Sidecar], count: int, timeout: float) -> float:
    """Grow ``sidecars`` to ``count`` streams; seconds until all have their first config."""
    started = time.monotonic()
    for k in range(len(sidecars), count):
        channel = grpc.aio.insecure_channel(f"{HOST}:{XDS_PORT}")
        sidecar = Sidecar(channel, _node(mesh.proxy(k)))
        sidecar.task = asyncio.create_task(sidecar.run())
        sidecars.append(sidecar)
    await asyncio.wait_for(asyncio.gather(*(s.ready.wait() for s in sidecars)), timeout)
    if broken := [s for s in sidecars if s.error is not None]:
        raise BenchError(f"{len(broken)} sidecars failed to connect: {broken[0].error!r}")
    return time.monotonic() - started


async def converge(
    plane: ControlPlane,
    mesh: Mesh,
    sidecars: list[Sidecar],
    number: int,
    *,
    timeout: float,
    settle: float,
) -> dict[str, Any]:
    """One apply of the changed VirtualService, until every sidecar has ACKed it."""
    obj = mesh.changed_virtual_service(number)
    started = time.monotonic()
    version = await asyncio.to_thread(plane.apply, obj)
    # The version is known once the apply returns; ACKs of it may already have arrived.
    current = Round(version=version, expected=len(sidecars))
    for s in sidecars:
        s.round = current
        if s.converged_at(version, started) is not None:
            s.counted = version
            current.reached += 1
    if current.reached >= current.expected:
        current.done.set()
    timed_out = False
    try:
        await asyncio.wait_for(current.done.wait(), timeout)
    except TimeoutError:
        timed_out = True
    # More types of the same push may follow the first one ACKed: wait until it is quiet.
    last = 0.0
    while True:
        await asyncio.sleep(settle)
        newest = max((t for s in sidecars for _, t in s.acks[-4:]), default=0.0)
        if newest == last:
            break
        last = newest
    per_client = [s.converged_at(version, started) for s in sidecars]
    reached = [t - started for t in per_client if t is not None]
    for s in sidecars:
        s.round = None
    return {
        "version": version,
        "all_ms": max(reached) * 1000 if reached and not timed_out else None,
        "client_ms": sorted(t * 1000 for t in reached),
        "missing": len(sidecars) - len(reached),
    }


async def bench_convergence(
    plane: ControlPlane, mesh: Mesh, plan: Plan, deadline: float, say: Callable[[str], None]
) -> list[Phase]:
    sidecars: list[Sidecar] = []
    phases: list[Phase] = []
    number = 0
    try:
        for clients, rounds in zip(plan.clients, plan.rounds, strict=True):
            phase = Phase(clients=clients)
            phase.connect_s = await connect(mesh, sidecars, clients, timeout=plan.connect_timeout)
            say(f"{clients} sidecars connected and configured in {phase.connect_s:.1f} s")
            await asyncio.sleep(0.5)  # let the start-up pushes end before the first round
            for _ in range(rounds):
                if time.monotonic() > deadline:
                    say("  the time budget is spent: no more rounds")
                    break
                number += 1
                result = await converge(
                    plane, mesh, sidecars, number, timeout=plan.round_timeout, settle=0.2
                )
                phase.rounds.append(result)
                all_ms = result["all_ms"]
                say(
                    f"  round {len(phase.rounds)}: version {result['version']}, all "
                    f"{clients} ACKed after "
                    + (f"{all_ms:.0f} ms" if all_ms is not None else "TIMEOUT")
                    + (f" ({result['missing']} missing)" if result["missing"] else "")
                )
                if not plane.alive():
                    raise BenchError(f"meshlet control exited:\n{plane.tail()}")
            phase.rss_mib = plane.rss_mib()
            phase.errors = sum(1 for s in sidecars if s.error is not None)
            say(f"  control plane RSS {phase.rss_mib:.0f} MiB")
            phases.append(phase)
    finally:
        for s in sidecars:
            if s.task is not None:
                s.task.cancel()
        await asyncio.gather(*(s.task for s in sidecars if s.task), return_exceptions=True)
        await asyncio.gather(*(s.channel.close() for s in sidecars), return_exceptions=True)
    return phases


# -- the run --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    full_runs: int
    scoped_runs: int
    clients: tuple[int, ...]
    rounds: tuple[int, ...]  # per number of clients
    budget_s: float  # no new round starts after this much of the run
    connect_timeout: float
    round_timeout: float


FULL = Plan(
    full_runs=5,
    scoped_runs=50,
    clients=(100, 1000),
    rounds=(20, 5),
    budget_s=270.0,
    connect_timeout=90.0,
    round_timeout=20.0,
)
QUICK = Plan(
    full_runs=2,
    scoped_runs=10,
    clients=(100, 1000),
    rounds=(3, 2),
    budget_s=150.0,
    connect_timeout=90.0,
    round_timeout=20.0,
)


def summarize(phases: list[Phase]) -> list[dict[str, Any]]:
    out = []
    for phase in phases:
        alls = [r["all_ms"] for r in phase.rounds if r["all_ms"] is not None]
        clients = [t for r in phase.rounds for t in r["client_ms"]]
        out.append(
            {
                "clients": phase.clients,
                "rounds": len(phase.rounds),
                "timeouts": len(phase.rounds) - len(alls),
                "connect_s": phase.connect_s,
                "all_p50_ms": statistics.median(alls) if alls else None,
                "all_p99_ms": _percentile(alls, 99) if alls else None,
                "all_max_ms": max(alls) if alls else None,
                "client_p50_ms": statistics.median(clients) if clients else None,
                "client_p99_ms": _percentile(clients, 99) if clients else None,
                "rss_mib": phase.rss_mib,
                "errors": phase.errors,
            }
        )
    return out


def _fmt(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def verdicts(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    t = results["translation"]
    by_clients = {row["clients"]: row for row in results["convergence"]}
    # A round that timed out counts as a failure of the p99.
    hundred = by_clients.get(100)
    converge_100 = None
    if hundred is not None:
        converge_100 = hundred["all_p99_ms"] if not hundred["timeouts"] else float("inf")
    biggest = by_clients.get(max(by_clients)) if by_clients else None
    values = {
        "full_ms": t["full_ms"],
        "scoped_ms": t["scoped_ms"],
        "converge_100_ms": converge_100,
        "rss_mib": biggest["rss_mib"] if biggest and biggest["clients"] >= 1000 else None,
    }
    rows = []
    for key, (name, goal, check) in TARGETS.items():
        value = values[key]
        verdict = "—" if value is None else ("pass" if check(value) else "FAIL")
        rows.append((name, _fmt(value, 1), goal, verdict))
    return rows


def markdown(results: dict[str, Any]) -> str:
    t = results["translation"]
    c = t["full_counts"]
    lines = [
        f"**Translation** (in process; {t['objects']:,} objects; median of {t['full_runs']} "
        f"and {t['scoped_runs']} runs)",
        "",
        "| what | ms |",
        "|---|---|",
        f"| whole mesh, one sidecar: snapshot index + LDS/RDS/CDS/EDS + serialize "
        f"({c['listeners']} listeners, {c['routes']} route configs, {c['clusters']:,} clusters,"
        f" {c['endpoints']:,} CLAs, {t['full_bytes'] / 1e6:.1f} MB) | {_fmt(t['full_ms'], 1)} |",
        f"| ... of which snapshot index + translation, without serializing "
        f"| {_fmt(t['full_translate_ms'], 1)} |",
        f"| Sidecar-scoped to 10 services ({t['scoped_clusters']} clusters), snapshot already "
        f"indexed: median / p99 | {_fmt(t['scoped_ms'], 2)} / {_fmt(t['scoped_p99_ms'], 2)} |",
        f"| for reference: the control plane's snapshot rebuild per push (validate every "
        f"stored object, registry, index) | {_fmt(t['rebuild_ms'], 0)} |",
        "",
        "**Convergence** (`meshlet control` on CPU 0; simulated sidecars on CPU 1; time from "
        "`POST /apply` of a changed VirtualService to the last sidecar's ACK of the new "
        "version, 100 ms debounce included)",
        "",
        "| sidecars | rounds | connect + first config, s | all ACKed p50 ms | p99 ms | max ms "
        "| per sidecar p50 ms | p99 ms | timeouts | control RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["convergence"]:
        lines.append(
            f"| {row['clients']:,} | {row['rounds']} | {row['connect_s']:.1f} | "
            f"{_fmt(row['all_p50_ms'])} | {_fmt(row['all_p99_ms'])} | {_fmt(row['all_max_ms'])} | "
            f"{_fmt(row['client_p50_ms'])} | {_fmt(row['client_p99_ms'])} | {row['timeouts']} | "
            f"{row['rss_mib']:.0f} |"
        )
    lines += [
        "",
        "**Targets** (issue 3)",
        "",
        "| target | measured | goal | verdict |",
        "|---|---|---|---|",
    ]
    for name, value, goal, verdict in verdicts(results):
        lines.append(f"| {name} | {value} | {goal} | {verdict} |")
    return "\n".join(lines) + "\n"


SECTION = "## Control plane"


def record(path: Path, results: dict[str, Any], notes: str = "") -> None:
    """Write the "Control plane" section of ``path``, replacing the previous one."""
    meta = results["meta"]
    m = meta["machine"]
    when = datetime.datetime.fromisoformat(meta["started"]).strftime("%Y-%m-%d %H:%M UTC")
    section = (
        f"{SECTION}\n\n"
        f"Written by `python bench/control.py --record` ({meta['mode']} run, {when}); "
        "bench/README.md says what is measured.\n\n"
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']:.0f} GiB RAM, "
        f"Linux {m['kernel']}; Python {m['python']}\n"
        f"- meshlet: `{m['git']}`\n"
        f"- command: `{meta['command']}`\n\n" + markdown(results) + notes
    )
    report.replace_section(path, SECTION, section)


def machine() -> dict[str, Any]:
    described = report.machine()
    keys = ("cpu", "cores", "kernel", "python", "git")
    return {k: described[k] for k in keys} | {"ram_gib": report.ram_gib()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer runs and rounds")
    parser.add_argument("--record", action="store_true", help="update bench/RESULTS.md")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out", help="results dir")
    parser.add_argument(
        "--skip-translation", action="store_true", help="only the control plane part"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    mesh = Mesh()
    if busy := [str(p) for p in (XDS_PORT, API_PORT) if not port_is_free(p)]:
        sys.exit(f"ports already in use: {', '.join(busy)}; stop what holds them first")
    allowed = os.sched_getaffinity(0)
    if not {CONTROL_CPU, CLIENT_CPU} <= allowed:
        sys.exit(f"needs CPUs {CONTROL_CPU} and {CLIENT_CPU} (have {sorted(allowed)})")
    started = datetime.datetime.now(datetime.UTC)
    deadline = time.monotonic() + plan.budget_s
    command = "python bench/control.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    os.sched_setaffinity(0, {CLIENT_CPU})  # the control plane has CPU 0 to itself

    results: dict[str, Any] = {}
    translation: dict[str, Any] = {}
    if not args.skip_translation:
        say("translation ...")
        translation = bench_translation(
            mesh, full_runs=plan.full_runs, scoped_runs=plan.scoped_runs
        )
        say(
            f"  whole mesh {translation['full_ms']:.0f} ms, scoped "
            f"{translation['scoped_ms']:.2f} ms, rebuild {translation['rebuild_ms']:.0f} ms"
        )
    phases: list[Phase] = []
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="meshlet-bench-control-") as tmp:
        state = Path(tmp)
        manifest = state / "mesh.yaml"
        manifest.write_text(yaml.safe_dump_all(mesh.objects(), sort_keys=False))
        try:
            with Supervisor() as supervisor:
                plane = ControlPlane(supervisor, state)
                ready_s = plane.start()
                say(f"meshlet control ready in {ready_s:.2f} s (pid {plane.process.pid})")  # type: ignore[union-attr]
                apply_s = plane.apply_files(manifest)
                say(f"meshlet apply of {len(mesh.objects()):,} objects: {apply_s:.1f} s")
                results["apply_s"] = apply_s
                results["idle_rss_mib"] = plane.rss_mib()
                phases = asyncio.run(bench_convergence(plane, mesh, plan, deadline, say))
        except KeyboardInterrupt:
            interrupted = True
            say("interrupted: stopped every process this run started")
        except BenchError as e:
            sys.exit(str(e))

    results |= {
        "meta": {
            "started": started.isoformat(),
            "mode": "quick" if args.quick else "full",
            "command": command,
            "machine": machine(),
            "plan": plan.__repr__(),
            "ports": {"xds": XDS_PORT, "api": API_PORT},
            "interrupted": interrupted,
        },
        "translation": translation,
        "convergence": summarize(phases),
        "rounds": [{"clients": p.clients, "rounds": p.rounds} for p in phases],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "control.json").write_text(json.dumps(results, indent=2) + "\n")
    if translation:
        print(markdown(results))
        if args.record and not interrupted:
            record(RESULTS, results)
            say("recorded in bench/RESULTS.md")
    say(f"results: {args.out / 'control.json'}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
