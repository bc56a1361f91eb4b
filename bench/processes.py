"""The processes the benchmark starts, and what /proc says about them.

Rules it keeps:

- every process is pinned to one CPU with ``taskset -c`` (which execs the program, so the PID
  we hold is the program's own);
- every process starts in its own session, so Ctrl-C reaches only the runner, which then stops
  them itself; each also gets ``PR_SET_PDEATHSIG`` = SIGTERM, so the kernel stops it if the
  runner dies without cleaning up;
- a process is stopped by the PID it was given: SIGTERM, a few seconds' wait, then SIGKILL
  for it and for every descendant seen while it ran (checked against its start time, so a
  recycled PID is never hit). Nothing is ever stopped by name.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


# -- /proc readers ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class ProcStat:
    """The fields of /proc/<pid>/stat the benchmark uses."""

    pid: int
    ppid: int
    start_ticks: int  # identifies the process across PID reuse
    cpu_ticks: int  # utime + stime + cutime + cstime


def read_stat(pid: int) -> ProcStat | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone, or never existed
        return None
    fields = text[text.rindex(")") + 2 :].split()  # comm may hold spaces and parentheses
    # fields[0] is field 3 (state) of proc(5): ppid is 4, utime..cstime 14..17, starttime 22.
    return ProcStat(
        pid=pid,
        ppid=int(fields[1]),
        start_ticks=int(fields[19]),
        cpu_ticks=sum(int(f) for f in fields[11:15]),
    )


def process_tree(root: int) -> list[ProcStat]:
    """``root`` and all its live descendants (empty when ``root`` is gone)."""
    stats = [s for s in (read_stat(int(n)) for n in os.listdir("/proc") if n.isdigit()) if s]
    children: dict[int, list[ProcStat]] = {}
    by_pid = {}
    for stat in stats:
        children.setdefault(stat.ppid, []).append(stat)
        by_pid[stat.pid] = stat
    if root not in by_pid:
        return []
    tree, frontier = [by_pid[root]], [root]
    while frontier:
        kids = children.get(frontier.pop(), [])
        tree.extend(kids)
        frontier.extend(k.pid for k in kids)
    return tree


def rss_kib(pid: int) -> int:
    """VmRSS of one process in KiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass(frozen=True, kw_only=True, slots=True)
class CoreTimes:
    """Busy and total ticks of one CPU since boot, from /proc/stat."""

    busy: int  # user + nice + system + irq + softirq (softirq holds the loopback work)
    total: int  # busy + idle + iowait + steal


def read_cores() -> dict[int, CoreTimes]:
    cores = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in values[:8])
        busy = user + nice + system + irq + softirq
        cores[int(name[3:])] = CoreTimes(busy=busy, total=busy + idle + iowait + steal)
    return cores


# -- processes we start -------------------------------------------------------------------


class Spawned:
    """A process we started, pinned to one CPU, and the descendants we have seen it start."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], cpu: int) -> None:
        self.name = name
        self.popen = popen
        self.cpu = cpu
        self._seen: dict[int, int] = {}  # descendant pid -> start ticks

    def __repr__(self) -> str:
        state = "running" if self.popen.poll() is None else f"exited {self.popen.returncode}"
        return f"<Spawned {self.name} pid={self.pid} cpu={self.cpu} {state}>"

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tree(self) -> list[ProcStat]:
        """The process and its live descendants; remembers them for ``stop``."""
        tree = process_tree(self.pid) if self.alive() else []
        for stat in tree[1:]:
            self._seen[stat.pid] = stat.start_ticks
        return tree

    def cpu_seconds(self) -> float:
        """CPU time used so far by the process and its descendants."""
        return sum(s.cpu_ticks for s in self.tree()) / CLOCK_TICKS

    def rss_kib(self) -> tuple[int, int]:
        """(sum over the process tree, largest single process) VmRSS in KiB."""
        sizes = [rss_kib(s.pid) for s in self.tree()] or [0]
        return sum(sizes), max(sizes)

    def stop(self, timeout: float = 5.0) -> None:
        self.tree()
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        for pid, start_ticks in self._seen.items():
            stat = read_stat(pid)
            if stat is not None and stat.start_ticks == start_ticks:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


class Supervisor:
    """Starts pinned processes and stops every one of them on exit, error or Ctrl-C."""

    def __init__(self) -> None:
        self._spawned: list[Spawned] = []

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()

    def spawn(
        self,
        name: str,
        argv: list[str],
        *,
        cpu: int,
        log: Path | None = None,
        cwd: Path | None = None,
        capture: bool = False,
    ) -> Spawned:
        """Starts ``argv`` on ``cpu``; output goes to ``log``, to a pipe, or nowhere."""
        with contextlib.ExitStack() as stack:
            stdout: int | IO[bytes]
            stderr: int | IO[bytes]
            if capture:
                stdout = stderr = subprocess.PIPE
            elif log is not None:
                stdout = stack.enter_context(log.open("ab"))
                stderr = subprocess.STDOUT
            else:
                stdout = stderr = subprocess.DEVNULL
            popen = subprocess.Popen(
                ["taskset", "-c", str(cpu), *argv],
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        spawned = Spawned(name, popen, cpu)
        self._spawned.append(spawned)
        return spawned

    def run(self, name: str, argv: list[str], *, cpu: int, timeout: float) -> tuple[int, str, str]:
        """Runs ``argv`` on ``cpu`` to completion: (exit code, stdout, stderr)."""
        spawned = self.spawn(name, argv, cpu=cpu, capture=True)
        try:
            out, err = spawned.popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            spawned.stop()
            out, err = spawned.popen.communicate()
            return (
                -1,
                out.decode(errors="replace"),
                f"timed out after {timeout:g} s\n" + (err.decode(errors="replace")),
            )
        finally:
            self.forget(spawned)
        return spawned.popen.returncode, out.decode(errors="replace"), err.decode(errors="replace")

    def forget(self, spawned: Spawned) -> None:
        spawned.stop()
        with contextlib.suppress(ValueError):
            self._spawned.remove(spawned)

    def stop_all(self) -> None:
        while self._spawned:
            self._spawned.pop().stop()


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.002) -> bool:
    """Polls ``predicate()`` until it is true or ``timeout`` seconds have passed."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
