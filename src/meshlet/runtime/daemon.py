"""The mesh's process: the control plane and the embedded runtime on one event loop.

``meshlet up`` starts it in the background (``meshlet mesh-daemon``, its own session, output
to ``<state dir>/mesh.log``) and talks to it through the control plane's API, which gains:

    GET  /runtime            the runtime's summary: pods, failures, gateway URL, state dir
    POST /runtime/shutdown   stop every pod, then the control plane, then exit

``<state dir>/mesh.json`` names the running mesh (pid, API and xDS addresses) while it runs.
SIGTERM and SIGINT stop it as ``/runtime/shutdown`` does; nothing it started outlives it.
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
from meshlet.runtime.mesh import Runtime, RuntimeOptions

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


async def serve(options: MeshOptions, out: TextIO = sys.stdout) -> None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    runtime: list[Runtime] = []

    def summary(query: str, body: bytes) -> Response:
        if not runtime:
            return Response.json({"pods": [], "failures": {}, "starting": True})
        return Response.json(runtime[0].summary())

    def shutdown(query: str, body: bytes) -> Response:
        loop.call_soon(stopping.set)
        return Response.json({"status": "stopping"})

    options.state_dir.mkdir(parents=True, exist_ok=True)
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
        ),
        out,
        routes={"GET /runtime": summary, "POST /runtime/shutdown": shutdown},
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    mesh_file = options.state_dir / MESH_FILE
    rt: Runtime | None = None
    try:
        await plane.start()
        assert plane.store is not None and plane.ads is not None and plane.api is not None
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
            if rt is not None:
                await rt.stop()
        except BaseException:
            if rt is not None:
                rt.kill_now()
            raise
        finally:
            await plane.stop()
            with contextlib.suppress(FileNotFoundError):
                mesh_file.unlink()
            print("mesh stopped", file=out, flush=True)


def run(options: MeshOptions) -> int:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(options))
    return 0
