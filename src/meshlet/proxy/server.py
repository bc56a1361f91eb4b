"""Running the proxy as a process: workers, the admin server, signals and draining.

``--concurrency N`` forks N-1 children after the configuration is compiled; the parent is
worker 0 and also serves the admin endpoints, so no process sits idle (DESIGN: an idle parent
costs ~22 MB). The parent binds one SO_REUSEPORT socket per worker and listener before it
forks, so that a port in use fails once, loudly, and every worker gets the same port even
when the configuration says 0; it first checks that no other process listens there (which
SO_REUSEPORT would otherwise allow). The parent reaches its children over a socketpair, one
command line and one answer line at a time: ``stats`` (summed for ``/stats``), ``hc_fail`` and
``hc_ok`` (``/healthcheck/*``). Children die with the parent (PR_SET_PDEATHSIG), so nothing
is ever orphaned.

With ``dynamic_resources`` the parent also runs the ADS client (``xds_client``, imported only
then) on its loop; ``/ready`` stays INITIALIZING until the first complete configuration from the
control plane is applied. Dynamic configuration needs ``--concurrency 1`` for now: one worker
applies what the stream brings.

Shutdown: SIGTERM, SIGINT and ``POST /quitquitquit`` drain: stop accepting, let requests in
flight finish with ``connection: close`` for up to ``--drain-time`` seconds, then exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import uvloop

from meshlet.errors import ConfigError
from meshlet.proxy.admin import AdminProtocol, AdminServer, ServerState
from meshlet.proxy.config import ProxyConfig
from meshlet.proxy.telemetry.access_log import DEFAULT_MANAGER
from meshlet.proxy.worker import Worker, bind_listener, check_port_free

IDENTITY_WAIT = 30.0  # seconds the proxy waits for its first certificate before going on
log = logging.getLogger("meshlet.proxy")

_LOG_FLUSH_INTERVAL = 1.0  # Envoy flushes file access logs every second


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerOptions:
    concurrency: int = 1
    drain_time: float = 5.0
    config_path: str = ""


class BindError(Exception):
    """A listener or the admin address could not be bound."""


def run(config: ProxyConfig, options: ServerOptions) -> int:
    """Serve until told to stop; returns the exit code."""
    if config.ads is not None and options.concurrency > 1:
        raise ConfigError.at(
            "--concurrency",
            "must be 1 with dynamic_resources (ADS): one worker applies the control plane's "
            "updates for now",
        )
    # Startup objects (protos, compiled tables) live for ever: freeze them out of the cyclic
    # GC's reach, so collections stay cheap and forked workers keep sharing those pages.
    gc.collect()
    gc.freeze()
    per_worker = _bind_all(config, options.concurrency)
    children: list[tuple[int, socket.socket]] = []
    for index in range(1, options.concurrency):
        parent_end, child_end = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # child
            parent_end.close()
            for _, sock in children:
                sock.close()
            _die_with_parent()
            for i, socks in enumerate(per_worker):
                if i != index:
                    for sock in socks.values():
                        sock.close()
            code = 1
            try:
                code = _run_loop(_child_main(config, options, index, child_end, per_worker[index]))
            finally:
                os._exit(code)
        child_end.close()
        for sock in per_worker[index].values():
            sock.close()  # the child's now
        children.append((pid, parent_end))
    try:
        return _run_loop(_parent_main(config, options, per_worker[0], children))
    finally:
        for pid, _ in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid, _ in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def _run_loop(main: Any) -> int:
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return int(loop.run_until_complete(main))
    finally:
        loop.close()


def _bind_all(config: ProxyConfig, workers: int) -> list[dict[str, socket.socket]]:
    """Every worker's listening sockets (index = worker), bound here in the parent."""
    per_worker: list[dict[str, socket.socket]] = [{} for _ in range(workers)]
    for listener in config.listeners:
        try:
            check_port_free(listener)
            port = listener.port
            for sockets in per_worker:
                sock = sockets[listener.name] = bind_listener(listener, port)
                port = sock.getsockname()[1]
        except OSError as e:
            for sockets in per_worker:
                for s in sockets.values():
                    s.close()
            raise BindError(
                f"listener {listener.name}: cannot bind {listener.host}:{listener.port}: "
                f"{e.strerror}"
            ) from e
    return per_worker


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _Lifecycle:
    """Drain-then-exit, shared by signals and /quitquitquit."""

    def __init__(self, worker: Worker, drain_time: float) -> None:
        self.worker = worker
        self.drain_time = drain_time
        self.done = asyncio.Event()
        self.draining = False

    def install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.shutdown)

    def shutdown(self) -> None:
        if self.draining:
            return
        self.draining = True
        log.info("draining for up to %.1fs", self.drain_time)
        self.worker.drain()
        asyncio.get_running_loop().create_task(self._wait_drained())

    async def _wait_drained(self) -> None:
        deadline = time.monotonic() + self.drain_time
        while self.worker.active_connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.done.set()


async def _flush_logs_forever(worker: Worker) -> None:
    while True:
        await asyncio.sleep(_LOG_FLUSH_INTERVAL)
        worker.flush_logs()


async def _child_main(
    config: ProxyConfig,
    options: ServerOptions,
    index: int,
    control: socket.socket,
    sockets: dict[str, socket.socket],
) -> int:
    loop = asyncio.get_running_loop()
    worker = Worker(config, loop, index=index, concurrency=options.concurrency)
    await worker.start(sockets)
    life = _Lifecycle(worker, options.drain_time)
    life.install_signals(loop)
    flusher = loop.create_task(_flush_logs_forever(worker))
    reader, writer = await asyncio.open_connection(sock=control)
    serve = loop.create_task(_serve_control(worker, reader, writer))
    await life.done.wait()
    flusher.cancel()
    serve.cancel()
    worker.stop()
    await asyncio.sleep(0)  # aborted connections end their streams (and spans) first
    await worker.flush_traces()
    DEFAULT_MANAGER.close()
    return 0


async def _serve_control(
    worker: Worker, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Answer the parent's commands, one line each: ``stats`` gets this worker's snapshot as
    one JSON line; ``hc_fail`` / ``hc_ok`` get ``ok`` once applied."""
    while line := await reader.readline():
        command = line.strip()
        if command == b"stats":
            answer = json.dumps(worker.stats.snapshot()).encode()
        elif command in (b"hc_fail", b"hc_ok"):
            worker.set_health_failed(command == b"hc_fail")
            answer = b"ok"
        else:
            answer = b"unknown command"
        writer.write(answer + b"\n")
        await writer.drain()


async def _parent_main(
    config: ProxyConfig,
    options: ServerOptions,
    sockets: dict[str, socket.socket],
    children: list[tuple[int, socket.socket]],
) -> int:
    loop = asyncio.get_running_loop()
    started = time.time()
    worker = Worker(config, loop, index=0, concurrency=options.concurrency)
    life = _Lifecycle(worker, options.drain_time)
    channels: dict[int, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
    for pid, sock in children:
        channels[pid] = await asyncio.open_connection(sock=sock)
    lock = asyncio.Lock()

    async def ask_children(command: bytes) -> list[bytes]:
        """Send ``command`` to every child; their answer lines (a silent child is skipped)."""
        answers = []
        async with lock:  # one outstanding question per child channel
            for pid, (reader, writer) in list(channels.items()):
                try:
                    writer.write(command + b"\n")
                    await writer.drain()
                    line = await asyncio.wait_for(reader.readline(), 2.0)
                except TimeoutError:
                    log.warning("worker pid %d did not answer %r", pid, command.decode())
                    continue
                except OSError:
                    line = b""
                if line:
                    answers.append(line)
                else:
                    # Its end of the channel is closed: the worker is gone. The kernel no longer
                    # sends it connections (its sockets closed with it); the others serve all.
                    log.error("worker pid %d has exited; the other workers serve its share", pid)
                    del channels[pid]
        return answers

    async def snapshots() -> list[dict[str, Any]]:
        snaps = [worker.stats.snapshot()]
        for line in await ask_children(b"stats"):
            try:
                snaps.append(json.loads(line))
            except ValueError:
                log.warning("a worker sent unreadable stats")
        return snaps

    configured = config.ads is None  # dynamic: once the first configuration is applied

    async def set_health_failed(failed: bool) -> None:
        state.health_failed = failed
        live = "LIVE" if configured else "INITIALIZING"
        state.state = "DRAINING" if failed or life.draining else live
        worker.set_health_failed(failed)
        await ask_children(b"hc_fail" if failed else b"hc_ok")

    def quit_() -> None:
        state.state = "DRAINING"
        for pid, _ in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        life.shutdown()

    state = ServerState(
        config=config,
        clusters=lambda: worker.clusters.clusters,
        snapshots=snapshots,
        quit=quit_,
        set_health_failed=set_health_failed,
        command_line={
            "config_path": options.config_path,
            "concurrency": options.concurrency,
            "drain_time": f"{options.drain_time:g}s",
            "drain_strategy": "Immediate",
        },
        started=started,
    )
    admin_server = None
    if config.admin is not None:
        host, port = config.admin
        try:
            admin_server = await loop.create_server(
                lambda: AdminProtocol(AdminServer(state)), host, port, reuse_address=True
            )
        except OSError as e:
            raise BindError(f"admin: cannot bind {host}:{port}: {e.strerror}") from e
    state.state = "INITIALIZING"
    await worker.start(sockets)
    identity_task = await _start_identity(config, worker)
    xds_task = None
    if config.ads is None:
        state.state = "LIVE"
    else:

        def ready() -> None:
            nonlocal configured
            configured = True
            if not life.draining and not state.health_failed:
                state.state = "LIVE"
            log.info("first configuration from the control plane applied: live")

        xds_task = loop.create_task(_run_xds(config, worker, state, ready))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, quit_)
    flusher = loop.create_task(_flush_logs_forever(worker))
    addresses = ", ".join(
        f"{lc.host}:{sockets[lc.name].getsockname()[1]}" for lc in config.listeners
    )
    log.info(
        "meshlet proxy is %s: listeners %s; admin %s; %d worker(s)",
        "live" if config.ads is None else "started",
        addresses or "(none)",
        f"{config.admin[0]}:{config.admin[1]}" if config.admin else "(none)",
        options.concurrency,
    )
    if config.ads is not None:
        log.info(
            "waiting for configuration from the control plane at %s (cluster %s)",
            config.ads.target,
            config.ads.cluster_name,
        )
    await life.done.wait()
    flusher.cancel()
    if identity_task is not None:
        identity_task.cancel()
    if xds_task is not None:
        xds_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await xds_task
    worker.stop()
    await asyncio.sleep(0)  # aborted connections end their streams (and spans) first
    await worker.flush_traces()
    DEFAULT_MANAGER.close()
    if admin_server is not None:
        admin_server.close()
    for pid, _ in children:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    sys.stdout.flush()
    return 0


async def _start_identity(config: ProxyConfig, worker: Worker) -> asyncio.Task[None] | None:
    """When the node's metadata names a CA (``CA_ADDRESS``), get this workload's certificate
    before anything else is configured -- the key is made here and never leaves -- and keep it
    fresh. Waits up to ``IDENTITY_WAIT`` seconds for the first one (Envoy's warming: TLS
    listeners and clusters need it); without it the proxy goes on, and TLS fails until then."""
    from google.protobuf import json_format

    metadata = json_format.MessageToDict(config.node.metadata)
    if not metadata.get("CA_ADDRESS"):
        return None
    from meshlet.proxy.identity import IdentityAgent, IdentityOptions, install

    options = IdentityOptions.from_node_metadata(metadata)
    assert options is not None
    agent = IdentityAgent(options, lambda cert: install(worker.secrets, cert))
    task = asyncio.get_running_loop().create_task(agent.run(), name="identity")
    try:
        await asyncio.wait_for(agent.ready.wait(), IDENTITY_WAIT)
    except TimeoutError:
        log.error("no certificate from %s yet; TLS fails until one arrives", options.ca_address)
    return task


async def _run_xds(
    config: ProxyConfig, worker: Worker, state: ServerState, ready: Callable[[], None]
) -> None:
    """The ADS client: each accepted update goes to the worker and to the admin's view."""
    from meshlet.proxy.xds_client import XdsClient  # grpcio: only for dynamic bootstraps

    async def apply(new: ProxyConfig) -> None:
        await worker.apply(new)
        state.config = new

    await XdsClient(config, apply, ready, secrets=worker.secrets).run()
