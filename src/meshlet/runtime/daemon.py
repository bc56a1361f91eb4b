"""The mesh's process: the control plane and the embedded runtime on one event loop.

``meshlet up`` starts it in the background (``meshlet mesh-daemon``, its own session, output
to ``<state dir>/mesh.log``) and talks to it through the control plane's API, which gains:

    GET  /runtime            the runtime's summary: pods, failures, gateway URL, state dir
    POST /runtime/shutdown   stop every pod, then the control plane, then exit

The daemon also runs the mesh's telemetry backend (``meshlet.dashboard``) on the same loop:
the OTLP/HTTP receiver (``otlp_port``, 4318; the control plane points every proxy's tracer at
it), the embedded scraper of every proxy's metrics (or, with ``prometheus_url``, a real
Prometheus as the source) and the dashboard (``dashboard_port``, 20001). Port 0 turns one off.
Every sidecar's access log goes to its stdout, i.e. its log in the pod's directory.

``<state dir>/mesh.json`` names the running mesh (pid, API, xDS, dashboard and OTLP addresses)
while it runs. SIGTERM and SIGINT stop it as ``/runtime/shutdown`` does; nothing it started
outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import uvloop

from meshlet.control.api import Response
from meshlet.control.server import ControlOptions, ControlPlane
from meshlet.dashboard.metrics import MetricsSource
from meshlet.dashboard.otlp import OtlpReceiver
from meshlet.dashboard.prometheus import PrometheusSource
from meshlet.dashboard.scraper import METRICS_PORT, Scraper, Target, targets_from_pods
from meshlet.dashboard.server import Dashboard, DashboardHandler, MeshInfo
from meshlet.dashboard.traces import TraceStore
from meshlet.runtime.mesh import Runtime, RuntimeOptions
from meshlet.runtime.sidecar import ADMIN_PORT

MESH_FILE = "mesh.json"


@dataclass(frozen=True, slots=True, kw_only=True)
class MeshOptions:
    state_dir: Path
    xds_address: str = "127.0.0.1:15010"
    api_address: str = "127.0.0.1:15014"
    gateway_port: int | None = 8080
    images: tuple[Path, ...] = ()
    #: Run the CA and give each sidecar a bootstrap token (``ControlOptions.ca``), and turn on
    #: auto mTLS and PeerAuthentication (``ControlOptions.mtls``). Off by default for now.
    ca: bool = False
    mtls: bool = False
    ca_address: str = "127.0.0.1:15012"
    xds_tls_address: str = "127.0.0.1:15011"
    workload_cert_ttl: float = 24 * 3600.0
    #: The dashboard on 127.0.0.1 (0: none) and the OTLP/HTTP receiver (0: none, no tracing).
    dashboard_port: int = 20001
    otlp_port: int = 4318
    trace_sampling: float = 1.0  # percent of requests traced (Istio's default 1)
    prometheus_url: str = ""  # a real Prometheus as the dashboard's source; "": embedded
    scrape_interval: float = 5.0
    metrics_port: int = METRICS_PORT  # where each proxy serves /stats/prometheus


class Telemetry:
    """The receiver, the scraper and the dashboard of one mesh, started and stopped together."""

    def __init__(self, options: MeshOptions) -> None:
        self.options = options
        self.traces = TraceStore()
        self.receiver: OtlpReceiver | None = None
        if options.otlp_port:
            self.receiver = OtlpReceiver(
                self.traces,
                f"127.0.0.1:{options.otlp_port}",
                hint="pick another port with --otlp-port, or 0 for no tracing",
            )
        self.scraper: Scraper | None = None
        self.dashboard: Dashboard | None = None

    @property
    def otlp_endpoint(self) -> str:
        return self.receiver.endpoint if self.receiver is not None else ""

    @property
    def dashboard_url(self) -> str | None:
        return self.dashboard.url if self.dashboard is not None else None

    async def start_receiver(self) -> None:
        if self.receiver is not None:
            await self.receiver.start()

    async def start(self, plane: ControlPlane) -> None:
        """The scraper and the dashboard, over the started control plane's store."""
        options = self.options
        assert plane.store is not None and plane.ads is not None and plane.api is not None
        store, ads = plane.store, plane.ads

        def targets() -> list[Target]:
            return targets_from_pods(store.list(group="", kind="Pod"))

        source: MetricsSource
        if options.prometheus_url:
            source = PrometheusSource(options.prometheus_url, interval=options.scrape_interval)
        else:
            self.scraper = Scraper(
                targets,
                interval=options.scrape_interval,
                port=options.metrics_port,
                fallback_port=ADMIN_PORT,
            )
            source = self.scraper.source
            await self.scraper.start()
        if options.dashboard_port:
            handler = DashboardHandler(
                traces=self.traces,
                source=source,
                mesh=MeshInfo(
                    api=f"http://{plane.api.bound_address}",
                    xds=ads.bound_address,
                    objects=store.list,
                    sync_status=lambda: [s.as_dict() for s in ads.sync_status()],
                    targets=targets,
                ),
                scraper=self.scraper,
                prometheus_url=options.prometheus_url or None,
                metrics_port=options.metrics_port,
            )
            self.dashboard = Dashboard(
                handler,
                f"127.0.0.1:{options.dashboard_port}",
                hint="pick another port with --dashboard-port, or 0 for no dashboard",
            )
            await self.dashboard.start()

    async def stop_dashboard(self) -> None:
        if self.dashboard is not None:
            await self.dashboard.stop()
        if self.scraper is not None:
            await self.scraper.stop()

    async def stop(self) -> None:
        await self.stop_dashboard()
        if self.receiver is not None:
            await self.receiver.stop()


async def serve(options: MeshOptions, out: TextIO = sys.stdout) -> None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    runtime: list[Runtime] = []

    telemetry = Telemetry(options)

    def summary(query: str, body: bytes) -> Response:
        extra = {"dashboard": telemetry.dashboard_url, "otlp": telemetry.otlp_endpoint or None}
        if not runtime:
            return Response.json({"pods": [], "failures": {}, "starting": True, **extra})
        return Response.json({**runtime[0].summary(), **extra})

    def shutdown(query: str, body: bytes) -> Response:
        loop.call_soon(stopping.set)
        return Response.json({"status": "stopping"})

    options.state_dir.mkdir(parents=True, exist_ok=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    mesh_file = options.state_dir / MESH_FILE
    rt: Runtime | None = None
    plane: ControlPlane | None = None
    try:
        # The receiver first: the control plane names it in every proxy's tracing config.
        await telemetry.start_receiver()
        if telemetry.receiver is not None:
            print(f"OTLP receiver on {telemetry.otlp_endpoint}", file=out, flush=True)
        plane = ControlPlane(
            ControlOptions(
                state_dir=options.state_dir,
                xds_address=options.xds_address,
                api_address=options.api_address,
                ca=options.ca,
                mtls=options.mtls,
                ca_address=options.ca_address,
                xds_tls_address=options.xds_tls_address,
                workload_cert_ttl=options.workload_cert_ttl,
                otlp_endpoint=telemetry.otlp_endpoint,
                trace_sampling=options.trace_sampling,
                access_log_file="/dev/stdout",
            ),
            out,
            routes={"GET /runtime": summary, "POST /runtime/shutdown": shutdown},
        )
        await plane.start()
        assert plane.store is not None and plane.ads is not None and plane.api is not None
        # Before any pod: a taken dashboard port stops the mesh before it starts anything.
        await telemetry.start(plane)
        if telemetry.dashboard is not None:
            print(f"dashboard on {telemetry.dashboard_url}", file=out, flush=True)
        rt = Runtime(
            plane.store,
            RuntimeOptions(
                state_dir=options.state_dir,
                xds_address=plane.ads.bound_address,
                gateway_port=options.gateway_port,
                images=options.images,
                ca_address=plane.ca.bound_address if plane.ca is not None else "",
                xds_tls_address=plane.ca.bound_xds_tls_address if plane.ca is not None else "",
                ca_root_path=(
                    plane.ca.service.ca.directory / "root-cert.pem"
                    if plane.ca is not None and plane.ca.service.ca.directory is not None
                    else None
                ),
            ),
        )
        await rt.start()
        runtime.append(rt)
        mesh_file.write_text(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "api": f"http://{plane.api.bound_address}",
                    "xds": plane.ads.bound_address,
                    "dashboard": telemetry.dashboard_url,
                    "otlp": telemetry.otlp_endpoint or None,
                }
            )
        )
        print("mesh ready", file=out, flush=True)
        await stopping.wait()
        print("mesh stopping", file=out, flush=True)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        try:
            await telemetry.stop_dashboard()
            if rt is not None:
                await rt.stop()
        except BaseException:
            if rt is not None:
                rt.kill_now()
            raise
        finally:
            if plane is not None:
                await plane.stop()
            await telemetry.stop()  # the receiver last: stopping proxies flush their spans
            with contextlib.suppress(FileNotFoundError):
                mesh_file.unlink()
            print("mesh stopped", file=out, flush=True)


def run(options: MeshOptions) -> int:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(options))
    return 0
