"""One pod as local processes: its sidecar and containers, supervised as the kubelet does with
``restartPolicy: Always``.

Theory of operation
-------------------

``PodRunner.start`` starts the sidecar (``istio-proxy``) first and holds the application
containers until the sidecar's readiness probe passes -- Istio's
``holdApplicationUntilProxyStarts`` -- or, without a probe, until its process runs. Each
container then has a supervisor task that runs this cycle until the pod stops:

====================  =============================  ===========================================
container state       reason                         what happens next
====================  =============================  ===========================================
waiting               ContainerCreating              held for the sidecar, then started
running                                              probes run; the process may exit, or the
                                                     liveness probe fail (``failure_threshold``
                                                     in a row): then it is stopped with the
                                                     pod's grace (SIGTERM, grace, SIGKILL)
terminated            Completed / Error /            what is left of its process group is
                      StartError                     killed; restarted at once the first time,
                                                     else after the back-off
waiting               CrashLoopBackOff               back-off delay, then started again
====================  =============================  ===========================================

Each restart increments the container's ``restart_count``. The back-off (``RestartBackoff``)
is the kubelet's: the first restart is immediate, then ``restart_backoff_base`` doubling up to
``restart_backoff_max``; a container that ran ``backoff_reset_after`` seconds (default 60)
before it ended starts the sequence afresh. (The kubelet uses 10 s doubling to 300 s and
forgets the back-off after 10 minutes without a crash; the embedded defaults are shorter
because a laptop user is watching.)

Readiness: a container is ready while it runs and its readiness probe passes (at once when
it has none); readiness probes start failed, so a restarted container is unready until its
probe passes again. The pod is ready when it is Running and every container, the sidecar
included, is ready. When a process exits the pod turns unready in the same step, before any
clean-up, so endpoints stop sending it traffic at once.

Phase: Pending while some container has never been started, Running afterwards (a crashing
container is still Running with ``restartPolicy: Always``), and after ``stop`` Succeeded if
every container exited 0, else Failed (the kubelet's terminal phase of a deleted pod).

``stop`` marks the pod unready at once, stops the application containers together (SIGTERM
to each process group, the pod's grace, SIGKILL), then the sidecar with what is left of the
grace but at least min(2 s, grace) -- the app may need its proxy while it drains, as with
Kubernetes' native sidecars. Every process group is killed in the end: nothing outlives the
pod. ``kill_now`` is the synchronous SIGKILL of every group, for ``atexit`` and ``finally``.

Every change of ``PodStatus`` (an immutable value) is passed to ``on_status``;
``to_kube_status`` turns one into a Kubernetes Pod ``status`` object.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from meshlet.runtime.probe import Prober, ProbeSpec
from meshlet.runtime.process import Process, ProcessSpec, ProcessStartError

log = logging.getLogger(__name__)

SIDECAR_NAME = "istio-proxy"

ContainerState = Literal["waiting", "running", "terminated"]
PodPhase = Literal["Pending", "Running", "Succeeded", "Failed"]

# Reasons, as the kubelet spells them.
CONTAINER_CREATING = "ContainerCreating"
CRASH_LOOP_BACK_OFF = "CrashLoopBackOff"
COMPLETED = "Completed"
ERROR = "Error"
START_ERROR = "StartError"
START_ERROR_EXIT_CODE = 128  # what container runtimes report when the exec fails


# -- specs -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ContainerSpec:
    name: str
    process: ProcessSpec
    readiness: ProbeSpec | None = None
    liveness: ProbeSpec | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PodSpec:
    """One pod: where it lives, what it runs, and how it is restarted and stopped.

    ``grace`` is ``terminationGracePeriodSeconds``. ``backoff_reset_after``: a container that
    ran this long before it ended restarts at once, as if it had never crashed.
    """

    name: str
    namespace: str
    ip: str
    containers: Sequence[ContainerSpec]
    sidecar: ContainerSpec | None = None
    grace: float = 30.0
    restart_backoff_base: float = 1.0
    restart_backoff_max: float = 30.0
    backoff_reset_after: float = 60.0

    def __post_init__(self) -> None:
        names = [c.name for c in self.all_containers]
        if len(set(names)) != len(names):
            raise ValueError(f"pod {self.name}: container names repeat: {names}")
        if self.sidecar is not None and self.sidecar.name != SIDECAR_NAME:
            raise ValueError(f"pod {self.name}: the sidecar must be named {SIDECAR_NAME!r}")
        if self.grace < 0 or self.restart_backoff_base < 0:
            raise ValueError(f"pod {self.name}: grace and back-off must not be negative")
        if self.restart_backoff_max < self.restart_backoff_base:
            raise ValueError(f"pod {self.name}: restart_backoff_max < restart_backoff_base")

    @property
    def all_containers(self) -> tuple[ContainerSpec, ...]:
        """The sidecar first (it starts first), then the containers in order."""
        sidecar = () if self.sidecar is None else (self.sidecar,)
        return (*sidecar, *self.containers)


# -- status ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ContainerStatus:
    """One container's state. ``reason``/``message`` explain a waiting or terminated state.

    ``last_exit_code`` and ``last_reason`` describe the most recent termination (the current
    one when ``state`` is terminated); exit codes are Kubernetes', 128+N for signal N.
    """

    name: str
    state: ContainerState
    reason: str = ""
    message: str = ""
    ready: bool = False
    restart_count: int = 0
    pid: int | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    last_exit_code: int | None = None
    last_reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class PodStatus:
    """The pod as the kubelet would report it. ``ready_changed_at`` is when ``ready`` last
    flipped (the Ready condition's ``lastTransitionTime``)."""

    phase: PodPhase
    ready: bool
    containers: tuple[ContainerStatus, ...]
    start_time: datetime
    ready_changed_at: datetime

    def container(self, name: str) -> ContainerStatus:
        for c in self.containers:
            if c.name == name:
                return c
        raise KeyError(name)


def pod_phase(containers: Sequence[ContainerStatus], *, stopped: bool) -> PodPhase:
    """The kubelet's ``getPhase`` for ``restartPolicy: Always``."""
    if stopped:
        clean = all(c.state == "terminated" and c.last_exit_code == 0 for c in containers)
        return "Succeeded" if clean else "Failed"
    never_started = any(c.started_at is None and c.last_exit_code is None for c in containers)
    return "Pending" if never_started else "Running"


def exit_code(returncode: int) -> int:
    """asyncio's ``-N`` for signal N becomes Kubernetes' ``128 + N``."""
    return 128 - returncode if returncode < 0 else returncode


def _rfc3339(t: datetime | None) -> str | None:
    return None if t is None else t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def to_kube_status(status: PodStatus, ip: str) -> dict[str, Any]:
    """A Kubernetes Pod ``status`` object (``kubectl get pod -o json``'s shape)."""
    started = _rfc3339(status.start_time)
    unready = sorted(c.name for c in status.containers if not c.ready)
    ready_reason: dict[str, str] = {}
    if status.phase in ("Succeeded", "Failed"):
        ready_reason = {"reason": "PodCompleted"}
    elif unready:
        ready_reason = {
            "reason": "ContainersNotReady",
            "message": f"containers with unready status: [{' '.join(unready)}]",
        }

    def condition(type_: str, ok: bool, since: datetime, extra: dict[str, str]) -> dict[str, Any]:
        return {
            "type": type_,
            "status": "True" if ok else "False",
            "lastProbeTime": None,
            "lastTransitionTime": _rfc3339(since),
            **({} if ok else extra),
        }

    return {
        "phase": status.phase,
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "startTime": started,
        "conditions": [
            condition("Initialized", True, status.start_time, {}),
            condition("Ready", status.ready, status.ready_changed_at, ready_reason),
            condition("ContainersReady", status.ready, status.ready_changed_at, ready_reason),
            condition("PodScheduled", True, status.start_time, {}),
        ],
        # The kubelet sorts containerStatuses by name.
        "containerStatuses": [
            _kube_container_status(c) for c in sorted(status.containers, key=lambda c: c.name)
        ],
    }


def _kube_container_status(c: ContainerStatus) -> dict[str, Any]:
    state: dict[str, Any]
    if c.state == "running":
        state = {"running": {"startedAt": _rfc3339(c.started_at)}}
    elif c.state == "waiting":
        state = {"waiting": {"reason": c.reason, **({"message": c.message} if c.message else {})}}
    else:
        state = {"terminated": _terminated(c)}
    last: dict[str, Any] = {}
    if c.state != "terminated" and c.last_exit_code is not None:
        last = {"terminated": _terminated(c)}
    return {
        "name": c.name,
        "ready": c.ready,
        "restartCount": c.restart_count,
        "started": c.state == "running",  # no startup probes: started once running
        "state": state,
        "lastState": last,
        **({"containerID": f"meshlet://{c.pid}"} if c.pid is not None else {}),
    }


def _terminated(c: ContainerStatus) -> dict[str, Any]:
    out: dict[str, Any] = {"exitCode": c.last_exit_code, "reason": c.last_reason}
    if c.state == "terminated" and c.message:
        out["message"] = c.message
    if c.finished_at is not None:
        out["finishedAt"] = _rfc3339(c.finished_at)
    return out


# -- restart back-off ------------------------------------------------------------------------


class RestartBackoff:
    """The delay before each restart of one container (kubelet's ``CrashLoopBackOff``).

    ``next_delay(ran_for)`` is asked when the container ended after running ``ran_for``
    seconds. The delays go 0, base, 2 base, 4 base, ... up to ``max``; a run of at least
    ``reset_after`` seconds starts the sequence again at 0.
    """

    __slots__ = ("_next", "base", "max", "reset_after")

    def __init__(self, *, base: float, max: float, reset_after: float) -> None:
        self.base, self.max, self.reset_after = base, max, reset_after
        self._next = 0.0

    def next_delay(self, ran_for: float) -> float:
        if ran_for >= self.reset_after:
            self._next = 0.0
        delay = self._next
        self._next = min(self.max, self.base if delay == 0 else delay * 2)
        return delay

    def __repr__(self) -> str:
        return f"<RestartBackoff next {self._next:g}s [base {self.base:g}s, max {self.max:g}s]>"


# -- one container ---------------------------------------------------------------------------


class _End(enum.Enum):
    """Why a container's run ended, in order of precedence."""

    STOP = "stop"
    LIVENESS = "liveness"
    EXITED = "exited"


class _Container:
    """Supervises one container: start, probe, restart with back-off, stop."""

    __slots__ = (
        "_became_ready",
        "_changed",
        "_ending",
        "_first_attempt",
        "_generation",
        "_grace",
        "_liveness_failed",
        "_pod",
        "_probe_ready",
        "_probers",
        "_stop_grace",
        "_stop_requested",
        "_task",
        "backoff",
        "finished_at",
        "last_exit_code",
        "last_reason",
        "message",
        "process",
        "reason",
        "restart_count",
        "spec",
        "started_at",
        "state",
    )

    def __init__(self, spec: ContainerSpec, pod: PodSpec, changed: Callable[[], None]) -> None:
        self.spec = spec
        self.process = Process(spec.process)
        self.backoff = RestartBackoff(
            base=pod.restart_backoff_base,
            max=pod.restart_backoff_max,
            reset_after=pod.backoff_reset_after,
        )
        self._pod = f"{pod.namespace}/{pod.name}"
        self._grace = pod.grace
        self._changed = changed
        # status
        self.state: ContainerState = "waiting"
        self.reason = CONTAINER_CREATING
        self.message = ""
        self.restart_count = 0
        self.started_at: datetime | None = None
        self.finished_at: datetime | None = None
        self.last_exit_code: int | None = None
        self.last_reason = ""
        # per run: probes report only for the run they were started for
        self._generation = 0
        self._probe_ready = False
        self._ending = False  # the run is over, its process is being stopped
        self._probers: list[Prober] = []
        self._liveness_failed = asyncio.Event()
        # life cycle
        self._first_attempt = asyncio.Event()
        self._became_ready = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._stop_grace = pod.grace
        self._task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        if self.state != "running" or self._ending:
            return False
        return self.spec.readiness is None or self._probe_ready

    def status(self) -> ContainerStatus:
        return ContainerStatus(
            name=self.spec.name,
            state=self.state,
            reason=self.reason,
            message=self.message,
            ready=self.ready,
            restart_count=self.restart_count,
            pid=self.process.pid if self.state == "running" else None,
            started_at=self.started_at,
            finished_at=self.finished_at,
            last_exit_code=self.last_exit_code,
            last_reason=self.last_reason,
        )

    def begin(self) -> None:
        if self._task is None and not self._stop_requested.is_set():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"container {self._pod}/{self.spec.name}"
            )

    async def first_attempt(self) -> None:
        await self._first_attempt.wait()

    async def became_ready(self) -> None:
        await self._became_ready.wait()

    async def stop(self, grace: float) -> None:
        self._stop_grace = grace
        self._stop_requested.set()
        if self._task is not None:
            await asyncio.shield(self._task)  # a cancelled caller still leaves no orphans

    def kill_now(self) -> None:
        self.process.kill_group_now()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = 0.0
        try:
            while not self._stop_requested.is_set():
                if delay > 0:
                    self._set(
                        "waiting",
                        CRASH_LOOP_BACK_OFF,
                        f"back-off {delay:g}s restarting failed container={self.spec.name} "
                        f"pod={self._pod}",
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop_requested.wait(), delay)
                    if self._stop_requested.is_set():
                        break
                if self.last_exit_code is not None:
                    self.restart_count += 1
                began = loop.time()
                end = await self._run_once()
                if end is _End.STOP:
                    break
                delay = self.backoff.next_delay(loop.time() - began)
                log.info(
                    "pod %s: container %s ended (%s, exit code %s); restarting in %gs",
                    self._pod,
                    self.spec.name,
                    end.value,
                    self.last_exit_code,
                    delay,
                )
        except Exception as e:
            # A bug, not a container failure: say so in the status rather than restart.
            log.exception("pod %s: supervisor of container %s failed", self._pod, self.spec.name)
            self._set("terminated", ERROR, f"meshlet supervisor failed: {e!r}")
        finally:
            # Reached on stop, and on cancellation or a bug: no process may outlive this.
            self.process.kill_group_now()
            self._first_attempt.set()
            if self.state == "waiting" and self.last_exit_code is not None:
                self._set("terminated", self.last_reason, "")

    async def _run_once(self) -> _End:
        """Start the process, supervise it until it ends, clean up; return why it ended."""
        try:
            await self.process.start()
        except ProcessStartError as e:
            self._terminated(START_ERROR_EXIT_CODE, START_ERROR, str(e))
            return _End.STOP if self._stop_requested.is_set() else _End.EXITED
        finally:
            self._first_attempt.set()
        self._generation += 1
        self._probe_ready = False
        self._liveness_failed.clear()
        self.started_at = datetime.now(UTC)
        self._set("running", "", "")
        self._start_probes(self._generation)
        try:
            end = await self._wait_for_end()
        finally:
            self._generation += 1  # late probe results of this run are ignored from here
            self._set_unready_now()
            await self._stop_probes()
        if end is _End.LIVENESS:
            log.info("pod %s: container %s failed liveness probe", self._pod, self.spec.name)
        grace = self._stop_grace if end is _End.STOP else self._grace
        # On EXITED the leader is gone already: stop() just kills what is left of its group.
        returncode = await self.process.stop(0.0 if end is _End.EXITED else grace)
        code = exit_code(returncode)
        message = ""
        if end is _End.LIVENESS:
            message = f"container {self.spec.name} failed liveness probe, will be restarted"
        self._terminated(code, COMPLETED if code == 0 else ERROR, message)
        return end

    async def _wait_for_end(self) -> _End:
        waits = {
            asyncio.ensure_future(self._stop_requested.wait()): _End.STOP,
            asyncio.ensure_future(self._liveness_failed.wait()): _End.LIVENESS,
            asyncio.ensure_future(self.process.wait()): _End.EXITED,
        }
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()
        return min((waits[w] for w in done), key=list(_End).index)

    def _start_probes(self, generation: int) -> None:
        readiness, liveness = self.spec.readiness, self.spec.liveness
        if readiness is None:
            self._became_ready.set()
        else:

            def on_ready(healthy: bool) -> None:
                if generation == self._generation:
                    self._probe_ready = healthy
                    if healthy:
                        self._became_ready.set()
                    self._changed()

            self._probers.append(Prober.readiness(readiness, on_ready))
        if liveness is not None:

            def on_alive(healthy: bool) -> None:
                if generation == self._generation and not healthy:
                    self._liveness_failed.set()

            self._probers.append(Prober.liveness(liveness, on_alive))
        for prober in self._probers:
            prober.start()

    async def _stop_probes(self) -> None:
        probers, self._probers = self._probers, []
        for prober in probers:
            await prober.stop()

    def _set_unready_now(self) -> None:
        # The process may still run (it is about to get SIGTERM) but no longer serves.
        self._ending = True
        self._changed()

    def _terminated(self, code: int, reason: str, message: str) -> None:
        self._ending = False
        self.last_exit_code, self.last_reason = code, reason
        self.finished_at = datetime.now(UTC)
        self._set("terminated", reason, message)

    def _set(self, state: ContainerState, reason: str, message: str) -> None:
        self.state, self.reason, self.message = state, reason, message
        self._changed()


# -- the pod ---------------------------------------------------------------------------------


class PodRunner:
    """Runs one pod's processes until ``stop``. See the module docstring for the rules.

    ``on_status`` is called (from the event loop) with every new ``PodStatus``; an exception
    it raises is logged and the pod runs on.
    """

    __slots__ = (
        "_app_gate",
        "_containers",
        "_on_status",
        "_ready_changed_at",
        "_start_time",
        "_status",
        "_stop_task",
        "_stopped",
        "_terminating",
        "_waiters",
        "spec",
    )

    def __init__(
        self, spec: PodSpec, *, on_status: Callable[[PodStatus], None] | None = None
    ) -> None:
        self.spec = spec
        self._on_status = on_status
        self._containers = [_Container(c, spec, self._changed) for c in spec.all_containers]
        self._start_time = datetime.now(UTC)
        self._ready_changed_at = self._start_time
        self._terminating = False
        self._stopped = False
        self._app_gate: asyncio.Task[None] | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._waiters: list[tuple[Callable[[PodStatus], bool], asyncio.Future[PodStatus]]] = []
        self._status = self._build_status()

    @property
    def status(self) -> PodStatus:
        return self._status

    @property
    def pids(self) -> tuple[int, ...]:
        """The process-group IDs of the running containers (for diagnostics and tests)."""
        return tuple(c.process.pid for c in self._containers if c.process.pid and c.process.running)

    async def start(self) -> None:
        """Start the pod; returns once the first process (the sidecar's, or else every
        container's) has been spawned or has failed to spawn."""
        if self._app_gate is not None or self._terminating:
            return
        self._start_time = self._ready_changed_at = datetime.now(UTC)
        self._changed()
        sidecar = self._containers[0] if self.spec.sidecar is not None else None
        apps = self._containers[1:] if sidecar is not None else self._containers
        if sidecar is not None:
            sidecar.begin()
        self._app_gate = asyncio.get_running_loop().create_task(
            self._start_apps(sidecar, apps), name=f"pod {self._key} app gate"
        )
        first = [sidecar] if sidecar is not None else apps
        await asyncio.gather(*(c.first_attempt() for c in first))

    async def stop(self) -> None:
        """Stop the application containers, then the sidecar; returns when every process of
        the pod is gone. Safe to call more than once and concurrently."""
        if self._stop_task is None:
            self._stop_task = asyncio.get_running_loop().create_task(
                self._stop(), name=f"pod {self._key} stop"
            )
        await asyncio.shield(self._stop_task)

    def kill_now(self) -> None:
        """SIGKILL every process group of the pod at once (emergency clean-up; no waiting)."""
        for c in self._containers:
            c.kill_now()

    async def wait_for(self, predicate: Callable[[PodStatus], bool]) -> PodStatus:
        """The first status (the current one included) for which ``predicate`` holds.
        Callers bound the wait with ``asyncio.wait_for``."""
        if predicate(self._status):
            return self._status
        future: asyncio.Future[PodStatus] = asyncio.get_running_loop().create_future()
        entry = (predicate, future)
        self._waiters.append(entry)
        try:
            return await future
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)

    @property
    def _key(self) -> str:
        return f"{self.spec.namespace}/{self.spec.name}"

    async def _start_apps(self, sidecar: _Container | None, apps: Sequence[_Container]) -> None:
        if sidecar is not None:
            await sidecar.became_ready()  # holdApplicationUntilProxyStarts
        for app in apps:
            app.begin()

    async def _stop(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.spec.grace
        self._terminating = True
        self._changed()  # unready at once: endpoints drop the pod before it gets SIGTERM
        if self._app_gate is not None:
            self._app_gate.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._app_gate
        has_sidecar = self.spec.sidecar is not None
        sidecar = self._containers[0] if has_sidecar else None
        apps = self._containers[1:] if has_sidecar else self._containers
        try:
            await asyncio.gather(*(app.stop(self.spec.grace) for app in apps))
            if sidecar is not None:
                left = max(deadline - loop.time(), min(2.0, self.spec.grace))
                await sidecar.stop(left)
        finally:
            self.kill_now()
            self._stopped = True
            self._changed()

    def _build_status(self) -> PodStatus:
        containers = tuple(c.status() for c in self._containers)
        phase = pod_phase(containers, stopped=self._stopped)
        ready = phase == "Running" and not self._terminating and all(c.ready for c in containers)
        return PodStatus(
            phase=phase,
            ready=ready,
            containers=containers,
            start_time=self._start_time,
            ready_changed_at=self._ready_changed_at,
        )

    def _changed(self) -> None:
        status = self._build_status()
        if status == self._status:
            return
        if status.ready != self._status.ready:
            self._ready_changed_at = datetime.now(UTC)
            status = self._build_status()
        self._status = status
        if self._on_status is not None:
            try:
                self._on_status(status)
            except Exception:
                log.exception("pod %s: on_status failed", self._key)
        for predicate, future in list(self._waiters):
            if not future.done() and predicate(status):
                future.set_result(status)

    def __repr__(self) -> str:
        s = self._status
        parts = []
        for c in s.containers:
            part = f"{c.name} {c.state}"
            if c.reason:
                part += f" {c.reason}"
            if c.restart_count:
                part += f" ({c.restart_count} restarts)"
            parts.append(part)
        ready = "ready" if s.ready else "unready"
        return f"<PodRunner {self._key} {self.spec.ip} [{s.phase}, {ready} | {', '.join(parts)}]>"
