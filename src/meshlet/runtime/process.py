"""One container's process: spawned in its own process group, logged to a file, stopped as
a container runtime stops a container.

Rules kept:

* Each start spawns the argv in a new session (``start_new_session``), so the child leads
  its own process group and every process it forks belongs to it. Signals go to the whole
  group (``os.killpg``), as a container runtime signals the whole container.
* stdout and stderr are appended to ``log_path`` (opened by the parent, passed as a file
  descriptor, so the log survives the child and needs no pipe pumping). Each start first
  writes a marker line ``---- started <ISO time> argv=[...] ----``, so restarts are visible
  in one log, as ``kubectl logs --previous`` would separate them.
* ``stop(grace)`` sends SIGTERM to the group, waits up to ``grace`` seconds for the leader to
  exit, then sends SIGKILL to the group. When the leader is gone, the group is killed anyway:
  as when a container's PID 1 exits, nothing it started may linger. ``stop`` never raises
  because the process is already gone.
* ``kill_group_now()`` is the synchronous SIGKILL for emergency cleanup (``atexit``, a
  ``finally`` in a dying event loop); it does not wait.
* ``returncode`` follows asyncio: ``-N`` when signal N killed the process (Kubernetes would
  report ``128 + N``; the pod layer converts).

The environment is exactly ``spec.env``: a container does not inherit the runtime's
environment, so callers add ``PATH`` and friends themselves when they want them.

Limits: a process that leaves the group (``setsid``, ``setpgid``) escapes the group signals.
A later network-namespace mode can use cgroups to close that gap. Once the group is known to
be empty, it is never signalled again, so a recycled process-group ID is never hit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from meshlet.errors import MeshletError

#: util-linux's setpriv (Essential on Debian): sets the parent-death signal, then execs.
_SETPRIV = shutil.which("setpriv")


class ProcessStartError(MeshletError):
    """The process could not be spawned (no such program, not executable, bad cwd, a log
    file that cannot be opened)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessSpec:
    """What to run: ``argv`` with exactly ``env``, in ``cwd``, logging to ``log_path``."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    log_path: Path
    cwd: Path | None = None

    def __post_init__(self) -> None:
        if not self.argv:
            raise ValueError(f"process {self.name!r}: argv is empty")


class Process:
    """One run at a time of a ``ProcessSpec``; ``start`` again after it ended to restart it."""

    __slots__ = ("_group_alive", "_proc", "spec")

    def __init__(self, spec: ProcessSpec) -> None:
        self.spec = spec
        self._proc: asyncio.subprocess.Process | None = None
        # True from spawn until the group was SIGKILLed after the leader exited: after that
        # the group ID may be recycled and must not be signalled.
        self._group_alive = False

    @property
    def pid(self) -> int | None:
        """The leader's PID (also the process group ID) of the current or last run."""
        return None if self._proc is None else self._proc.pid

    @property
    def returncode(self) -> int | None:
        """The last run's exit status (``-N`` for signal N); None while running or unstarted."""
        return None if self._proc is None else self._proc.returncode

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        """Spawn the process. Raises ``ProcessStartError`` if it cannot be spawned, and
        ``RuntimeError`` if the previous run has not ended."""
        if self.running:
            raise RuntimeError(f"process {self.spec.name!r} is already running")
        spec = self.spec
        argv = list(spec.argv)
        path = spec.env.get("PATH", os.defpath)
        if _SETPRIV is not None and shutil.which(argv[0], path=path) is not None:
            # If the runtime itself dies (even by SIGKILL), the kernel kills what it started.
            # (A program that cannot be found is spawned as it is, to fail as it should.)
            argv = [_SETPRIV, "--pdeathsig", "KILL", "--", *argv]
        # Blocking file I/O, but a few bytes once per start.
        try:
            spec.log_path.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            fd = os.open(spec.log_path, flags, 0o644)
        except OSError as e:
            raise ProcessStartError(
                f"cannot open the log of {spec.name!r} ({spec.log_path}): {e.strerror or e}"
            ) from e
        try:
            now = datetime.now(UTC).isoformat(timespec="milliseconds")
            os.write(fd, f"---- started {now} argv={argv!r} ----\n".encode())
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=subprocess.DEVNULL,
                    stdout=fd,
                    stderr=subprocess.STDOUT,
                    env=dict(spec.env),
                    cwd=spec.cwd,
                    start_new_session=True,
                )
            except OSError as e:
                os.write(fd, f"---- failed to start: {e} ----\n".encode())
                raise ProcessStartError(
                    f"cannot start {spec.name!r} ({argv[0]!r}): {e.strerror or e}"
                ) from e
            self._group_alive = True
        finally:
            os.close(fd)  # the child holds its own copy

    async def wait(self) -> int:
        """Wait for the current run to end and return its exit status."""
        proc = self._started()
        return await proc.wait()

    async def stop(self, grace: float) -> int:
        """SIGTERM the group, SIGKILL it after ``grace`` seconds; return the exit status.

        Also kills what is left of the group when the leader has already exited. Never raises
        because the process is gone; raises ``RuntimeError`` if it was never started.
        """
        proc = self._started()
        if proc.returncode is None:
            self._signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout=max(grace, 0.0))
            except TimeoutError:
                self._signal_group(signal.SIGKILL)
        returncode = await proc.wait()
        self.kill_group_now()  # the leader is gone; nothing it started may outlive it
        return returncode

    def kill_group_now(self) -> None:
        """SIGKILL the whole group at once, without waiting. Safe to call at any time."""
        if self._proc is None or not self._group_alive:
            return
        self._signal_group(signal.SIGKILL)
        if self._proc.returncode is not None:
            # The leader was reaped and everything else was just killed: the group ID is now
            # free for reuse, so it is never signalled again.
            self._group_alive = False

    def _signal_group(self, signum: signal.Signals) -> None:
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signum)

    def _started(self) -> asyncio.subprocess.Process:
        if self._proc is None:
            raise RuntimeError(f"process {self.spec.name!r} was never started")
        return self._proc

    def __repr__(self) -> str:
        if self._proc is None:
            state = "not started"
        elif self._proc.returncode is None:
            state = f"running pid {self._proc.pid}"
        else:
            state = f"exited {self._proc.returncode} (pid {self._proc.pid})"
        return f"<Process {self.spec.name} [{state}]>"
