"""The embedded runtime's process layer with real processes on loopback pod IPs.

The processes are ``python -c`` stand-ins: a sidecar that turns ready after a delay, apps
that record their starts, exit, ignore SIGTERM or fork a grandchild. They prove the
kubelet's behaviour (``restartPolicy: Always``) and Istio's
``holdApplicationUntilProxyStarts``: the app starts only once the sidecar is ready, crashes
and liveness failures restart with a back-off, and stopping the pod leaves no process behind.

Assertions never rest on wall-clock durations: ordering is proved with marker files written
by the processes themselves, and timeouts only bound the waiting. Every process is killed at
the end of its test, pass or fail.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import uvloop

from meshlet.runtime.ipam import PodIPAllocator
from meshlet.runtime.pod import (
    ContainerSpec,
    PodRunner,
    PodSpec,
    PodStatus,
    to_kube_status,
)
from meshlet.runtime.probe import ProbeSpec
from meshlet.runtime.process import Process, ProcessSpec, ProcessStartError

WAIT = 20.0  # generous bound for every wait; never an assertion about speed

SIDECAR = r"""
import os, pathlib, signal, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer
d, delay, port = pathlib.Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
d.joinpath("pids").open("a").write(f"{os.getpid()}\n")
t0 = time.monotonic()

class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        ok = time.monotonic() - t0 >= delay
        if ok:
            d.joinpath("sidecar-ready").touch()  # before the first 200 leaves
        self.send_response(200 if ok else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

def on_term(*_):
    # Which app processes are still alive when the sidecar is told to stop?
    pids = [int(p) for p in d.joinpath("app-pids").read_text().split()] if d.joinpath(
        "app-pids").exists() else []
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    d.joinpath("sidecar-term").write_text(" ".join(map(str, alive)) or "none")
    os._exit(0)

signal.signal(signal.SIGTERM, on_term)
HTTPServer((os.environ["POD_IP"], port), Health).serve_forever()
"""

APP = r"""
import os, pathlib, signal, subprocess, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer
d, mode, arg = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
pid = os.getpid()
d.joinpath("pids").open("a").write(f"{pid}\n")
d.joinpath("app-pids").open("a").write(f"{pid}\n")
d.joinpath("app-starts").open("a").write(f"{pid} {int(d.joinpath('sidecar-ready').exists())}\n")
if mode == "exit":
    sys.exit(int(arg))
if mode == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    d.joinpath("term-ignored").touch()
if mode == "grandchild":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    d.joinpath("pids").open("a").write(f"{child.pid}\n")
    d.joinpath("grandchildren").open("a").write(f"{child.pid}\n")
    if arg != "stay":
        sys.exit(int(arg))  # leaves the grandchild behind
if mode == "serve":
    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            sick = d.joinpath("sick").exists()
            self.send_response(500 if sick else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    HTTPServer((os.environ["POD_IP"], int(arg)), Health).serve_forever()
time.sleep(600)
"""


# -- helpers ---------------------------------------------------------------------------------


def pod_ip() -> str:
    # A random /24 so that parallel runs do not share addresses.
    network = f"127.{random.randint(100, 250)}.{random.randint(0, 255)}.0/24"
    return PodIPAllocator(network).allocate()


def free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        port: int = s.getsockname()[1]
        return port


def alive(pid: int) -> bool:
    """Running, and not a zombie waiting for its parent."""
    try:
        os.kill(pid, 0)
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (ProcessLookupError, FileNotFoundError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def pids_in(path: Path) -> list[int]:
    return [int(p) for p in path.read_text().split()] if path.exists() else []


async def eventually(check: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class Pod:
    """Builds a pod of stand-in processes in ``tmp``, runs it and records every status."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp
        self.ip = pod_ip()
        self.sidecar_port = free_port(self.ip)
        self.app_port = free_port(self.ip)
        self.history: list[PodStatus] = []
        self.runner: PodRunner | None = None

    def process(self, name: str, script: str, *args: object) -> ProcessSpec:
        return ProcessSpec(
            name=name,
            argv=[sys.executable, "-c", script, str(self.dir), *map(str, args)],
            env={"POD_IP": self.ip},
            log_path=self.dir / "logs" / f"{name}.log",
        )

    def http_probe(self, port: int, **kw: float) -> ProbeSpec:
        return ProbeSpec(kind="http", host=self.ip, port=port, path="/", period=0.05, **kw)

    def build(
        self,
        app: ContainerSpec,
        *,
        sidecar_delay: float | None = 0.3,
        grace: float = 2.0,
        backoff: float = 0.2,
    ) -> PodRunner:
        sidecar = None
        if sidecar_delay is not None:
            sidecar = ContainerSpec(
                name="istio-proxy",
                process=self.process("istio-proxy", SIDECAR, sidecar_delay, self.sidecar_port),
                readiness=self.http_probe(self.sidecar_port),
            )
        spec = PodSpec(
            name="reviews-v1-7f9c",
            namespace="default",
            ip=self.ip,
            sidecar=sidecar,
            containers=[app],
            grace=grace,
            restart_backoff_base=backoff,
            restart_backoff_max=backoff * 2,
        )
        self.runner = PodRunner(spec, on_status=self.history.append)
        return self.runner

    def app(self, mode: str, arg: object = "-", **probes: ProbeSpec) -> ContainerSpec:
        return ContainerSpec(name="app", process=self.process("app", APP, mode, arg), **probes)

    async def until(self, predicate: Callable[[PodStatus], bool]) -> PodStatus:
        assert self.runner is not None
        return await asyncio.wait_for(self.runner.wait_for(predicate), WAIT)

    def kill_leftovers(self) -> None:
        """The safety net: SIGKILL, by PID, every process this test started."""
        if self.runner is not None:
            self.runner.kill_now()
        for pid in pids_in(self.dir / "pids"):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def pod(tmp_path: Path) -> Iterator[Pod]:
    p = Pod(tmp_path)
    try:
        yield p
    finally:
        p.kill_leftovers()


Scenario = Callable[[], Awaitable[None]]


def run(pod: Pod, scenario: Scenario, loop: str = "asyncio") -> None:
    async def main() -> None:
        try:
            await asyncio.wait_for(scenario(), 60)
        finally:
            if pod.runner is not None:
                try:
                    await asyncio.wait_for(pod.runner.stop(), WAIT)
                finally:
                    pod.runner.kill_now()

    if loop == "uvloop":
        uvloop.run(main())
    else:
        asyncio.run(main())


def app_of(status: PodStatus) -> str:
    c = status.container("app")
    return f"{c.state}/{c.reason}"


# -- the pod ---------------------------------------------------------------------------------


def test_the_app_starts_only_after_the_sidecar_is_ready(pod: Pod) -> None:
    # Istio holdApplicationUntilProxyStarts: the app container waits for the proxy.
    runner = pod.build(pod.app("sleep"), sidecar_delay=0.3)

    async def scenario() -> None:
        await runner.start()
        assert runner.status.phase == "Pending"
        assert runner.status.container("app").reason == "ContainerCreating"
        ready = await pod.until(lambda s: s.ready)
        assert ready.phase == "Running"
        await eventually(lambda: (pod.dir / "app-starts").exists(), "the app to record its start")
        starts = (pod.dir / "app-starts").read_text().split("\n")[0].split()
        assert starts[1] == "1", "the app started before the sidecar answered 200"
        kube = to_kube_status(ready, pod.ip)
        assert kube["podIP"] == pod.ip
        assert {c["type"]: c["status"] for c in kube["conditions"]}["Ready"] == "True"
        log = (pod.dir / "logs" / "app.log").read_text()
        assert log.startswith("---- started ")

    run(pod, scenario)
    phases = [s.phase for s in pod.history]
    assert phases.index("Running") > phases.index("Pending")
    # Until the sidecar was first ready, the app stayed in ContainerCreating.
    for s in pod.history:
        if s.container("istio-proxy").ready:
            break
        assert app_of(s) == "waiting/ContainerCreating"


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_crashing_app_restarts_with_back_off_and_counts_restarts(pod: Pod, loop: str) -> None:
    runner = pod.build(pod.app("exit", 3), backoff=0.1)

    async def scenario() -> None:
        await runner.start()
        await pod.until(lambda s: s.container("app").restart_count >= 3)

    run(pod, scenario, loop)
    app = [s.container("app") for s in pod.history]
    looping = [c for c in app if c.reason == "CrashLoopBackOff"]
    assert looping, "never waited in CrashLoopBackOff"
    assert all(c.state == "waiting" and c.last_exit_code == 3 for c in looping)
    # kubelet: the first restart is immediate; back-off waits come after it.
    assert looping[0].restart_count == 1
    counts = [c.restart_count for c in app]
    assert counts == sorted(counts)
    assert len(pids_in(pod.dir / "app-pids")) >= 3  # the 4th may die before it writes
    before_stop = [s for s in pod.history if s.phase not in ("Succeeded", "Failed")]
    assert all(s.phase == "Running" for s in before_stop if s.container("app").restart_count)
    assert all(s.container("istio-proxy").restart_count == 0 for s in pod.history)
    kube = to_kube_status(
        next(s for s in pod.history if app_of(s) == "waiting/CrashLoopBackOff"), pod.ip
    )
    (app_status,) = [c for c in kube["containerStatuses"] if c["name"] == "app"]
    assert app_status["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    assert app_status["lastState"]["terminated"]["exitCode"] == 3


def test_the_pod_turns_unready_in_the_step_the_app_exits(pod: Pod) -> None:
    probe = pod.http_probe(pod.app_port)
    runner = pod.build(pod.app("serve", pod.app_port, readiness=probe), backoff=5.0)

    async def scenario() -> None:
        await runner.start()
        ready = await pod.until(lambda s: s.ready)
        pid = ready.container("app").pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        after = await pod.until(lambda s: s.container("app").last_exit_code is not None)
        assert not after.ready and after.container("app").last_exit_code == 137
        await pod.until(lambda s: s.ready and s.container("app").restart_count == 1)

    run(pod, scenario)
    for s in pod.history:
        if s.ready:
            assert all(c.state == "running" and c.ready for c in s.containers)
    # A restarted container is unready until its readiness probe passes again.
    restarted = [s for s in pod.history if s.container("app").restart_count == 1]
    assert not restarted[0].ready


def test_a_failing_liveness_probe_restarts_the_app_with_sigterm(pod: Pod) -> None:
    live = pod.http_probe(pod.app_port, failure_threshold=2)
    runner = pod.build(pod.app("serve", pod.app_port, liveness=live), sidecar_delay=None)

    async def scenario() -> None:
        await runner.start()
        first = await pod.until(lambda s: s.container("app").state == "running")
        old_pid = first.container("app").pid
        assert old_pid is not None
        (pod.dir / "sick").touch()
        restarted = await pod.until(lambda s: s.container("app").restart_count >= 1)
        (pod.dir / "sick").unlink()
        app = restarted.container("app")
        assert app.last_exit_code == 143  # SIGTERM ended it, within the grace
        assert "liveness" in next(
            s.container("app").message
            for s in pod.history
            if s.container("app").state == "terminated"
        )
        assert not alive(old_pid)
        now = await pod.until(lambda s: s.container("app").state == "running")
        assert now.container("app").pid != old_pid

    run(pod, scenario)


def test_leftovers_of_a_crashed_container_are_killed_before_it_restarts(pod: Pod) -> None:
    runner = pod.build(pod.app("grandchild", 1), sidecar_delay=None, backoff=0.1)

    async def scenario() -> None:
        await runner.start()
        await pod.until(lambda s: s.container("app").restart_count >= 1)
        await eventually(lambda: len(pids_in(pod.dir / "grandchildren")) >= 1, "a grandchild")
        first = pids_in(pod.dir / "grandchildren")[0]
        await eventually(lambda: not alive(first), f"grandchild {first} to die")

    run(pod, scenario)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_stop_kills_the_whole_group_app_first_then_sidecar(pod: Pod, loop: str) -> None:
    runner = pod.build(pod.app("grandchild", "stay"))

    async def scenario() -> None:
        await runner.start()
        await pod.until(lambda s: s.ready)
        await eventually(lambda: (pod.dir / "grandchildren").exists(), "the grandchild")
        await runner.stop()
        assert runner.status.phase in ("Failed", "Succeeded")
        assert not runner.status.ready
        assert runner.pids == ()
        for pid in pids_in(pod.dir / "pids"):  # SIGKILL is sent; dying takes a moment
            await eventually(lambda pid=pid: not alive(pid), f"process {pid} to die")

    run(pod, scenario, loop)
    # The sidecar got SIGTERM only after every app process was gone.
    assert (pod.dir / "sidecar-term").read_text() == "none"
    assert pod.history[-1].container("istio-proxy").last_exit_code == 0
    # Ready went false before anything was stopped.
    last_ready = max(i for i, s in enumerate(pod.history) if s.ready)
    first_unready = last_ready + 1
    assert pod.history[first_unready].container("app").state == "running"


def test_stop_sigkills_an_app_that_ignores_sigterm_after_the_grace(pod: Pod) -> None:
    runner = pod.build(pod.app("ignore-term"), grace=0.3)

    async def scenario() -> None:
        await runner.start()
        await pod.until(lambda s: s.ready)
        await eventually(lambda: (pod.dir / "term-ignored").exists(), "SIGTERM to be ignored")
        await runner.stop()

    run(pod, scenario)
    final = pod.history[-1]
    assert final.phase == "Failed"
    assert final.container("app").last_exit_code == 137  # SIGKILL
    assert final.container("app").state == "terminated"
    assert final.container("istio-proxy").last_exit_code == 0  # SIGTERM, handled
    for pid in pids_in(pod.dir / "pids"):
        assert not alive(pid)


def test_a_program_that_cannot_start_is_a_start_error_that_backs_off(pod: Pod) -> None:
    bad = ContainerSpec(
        name="app",
        process=ProcessSpec(
            name="app", argv=[str(pod.dir / "missing")], env={}, log_path=pod.dir / "app.log"
        ),
    )
    runner = pod.build(bad, sidecar_delay=None, backoff=0.05)

    async def scenario() -> None:
        await runner.start()
        s = await pod.until(lambda s: s.container("app").restart_count >= 2)
        assert s.container("app").last_reason == "StartError"
        assert s.container("app").last_exit_code == 128

    run(pod, scenario)
    assert "failed to start" in (pod.dir / "app.log").read_text()


def test_stop_before_the_sidecar_is_ready_never_starts_the_app(pod: Pod) -> None:
    runner = pod.build(pod.app("sleep"), sidecar_delay=600)

    async def scenario() -> None:
        await runner.start()
        await eventually(lambda: (pod.dir / "pids").exists(), "the sidecar")
        await runner.stop()
        await runner.stop()  # idempotent

    run(pod, scenario)
    assert not (pod.dir / "app-starts").exists()
    for pid in pids_in(pod.dir / "pids"):
        assert not alive(pid)


# -- one process -----------------------------------------------------------------------------


def test_process_logs_each_start_and_gets_exactly_its_env(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "p.log"
    spec = ProcessSpec(
        name="p",
        argv=[sys.executable, "-c", "import os; print(sorted(os.environ.items()))"],
        env={"ONLY": "this"},
        log_path=log,
        cwd=tmp_path,
    )

    async def scenario() -> None:
        process = Process(spec)
        for _ in range(2):
            await process.start()
            assert await process.wait() == 0
            assert await process.stop(1.0) == 0  # already gone: no error

    asyncio.run(scenario())
    lines = log.read_text().splitlines()
    assert [line.startswith("---- started ") for line in lines] == [True, False, True, False]
    env_line = lines[1]
    assert "('ONLY', 'this')" in env_line and "PATH" not in env_line.replace("'ONLY'", "")


def test_kill_group_now_kills_without_waiting(tmp_path: Path) -> None:
    spec = ProcessSpec(
        name="sleeper",
        argv=[sys.executable, "-c", "import time; time.sleep(600)"],
        env={},
        log_path=tmp_path / "s.log",
    )

    async def scenario() -> None:
        process = Process(spec)
        await process.start()
        try:
            assert process.running and process.pid is not None
            process.kill_group_now()
            assert await asyncio.wait_for(process.wait(), WAIT) == -signal.SIGKILL
        finally:
            process.kill_group_now()
        process.kill_group_now()  # the group is gone: a no-op now

    asyncio.run(scenario())


def test_a_log_that_cannot_be_opened_is_a_start_error(tmp_path: Path) -> None:
    (tmp_path / "file").touch()
    spec = ProcessSpec(
        name="p", argv=[sys.executable, "-c", ""], env={}, log_path=tmp_path / "file" / "p.log"
    )

    async def scenario() -> None:
        process = Process(spec)
        with pytest.raises(ProcessStartError, match="cannot open the log"):
            await process.start()
        assert process.pid is None and not process.running

    asyncio.run(scenario())
