"""The demo mesh's benchmark: how long ``meshlet demo`` takes to serve Bookinfo, and what the
whole mesh costs in memory and in latency while it runs.

    python bench/demo.py            # full run: 5 starts, about 1.5 minutes, never more than 3
    python bench/demo.py --quick    # smoke run: 3 starts, fewer latency samples, about 1 minute
    python bench/demo.py --record   # ... and write the "Demo mesh" section of bench/RESULTS.md

Measured against issue 4's budgets:

1. **Start**: from just before ``meshlet demo`` is spawned until both (a) the mesh's
   ``GET /runtime`` (what the demo itself polls) lists Bookinfo's six pods and the gateway, all
   ready, and (b) this script's own ``GET http://127.0.0.1:<gateway port>/productpage`` (a new
   connection each time) answers 200 with the product page (its title); both polled every
   50 ms. That covers the CLI's start, the control plane, every pod (sidecar, then
   application) and the gateway's routes. Target ≤ 10 s, by every start. The same poll notes
   when each of the demo's own progress lines appeared, when the mesh wrote ``mesh.json``, and
   when the page first came complete (details and reviews, not an "unavailable" notice); the
   demo's own "Bookinfo is up in X s" figure is parsed for comparison (its clock starts after
   its imports and manifest checks; it polls every 0.25 s).
2. **Memory**, in the last start, after 10 s of the demo's own traffic (2 requests/s): VmRSS
   (and PSS, which shares the interpreter's pages fairly) of the control plane (``meshlet
   mesh-daemon``, pid from ``<state dir>/mesh.json``), of each sidecar and the ingress gateway
   (``meshlet proxy``), and of each application. Containers are found as a user finds them,
   ``meshlet get pods -A -o json`` (``containerID`` is ``meshlet://<pid>``); a container's
   figure is its process and its descendants. Every descendant of the control plane that no
   container claims is listed as unaccounted. Target: each ``meshlet proxy`` ≤ 40 MiB
   (DESIGN.md's per-sidecar goal).
3. **Latency** of the product page, sequential requests, a new connection each, alternating
   between the gateway (gateway → productpage's sidecar → productpage) and, as the baseline,
   the productpage pod's own address on port 9080 (no gateway, no inbound sidecar). In both,
   productpage's calls to details and reviews (and reviews' to ratings) go through the
   sidecars, so the difference is the cost of two proxy hops, not of the mesh.

Each start runs in its own temporary state directory with its own ports (API, xDS and gateway,
free ports of 19700-19799) and its own pod addresses (the pod IP cursor is seeded at
127.1.<197 + start>.0, so a mesh another session runs from 127.1.0.1 is not hit). Every start
but the last runs ``--duration 1`` and stops by itself; the last is stopped with SIGTERM once
measured. Whatever is still running then is stopped with ``meshlet down`` (its
``MESHLET_SERVER``) and, last, SIGKILL by PID (checked against its start time).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import report
from processes import _die_with_parent, process_tree, read_stat, rss_kib

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "RESULTS.md"
MESHLET = REPO / ".venv" / "bin" / "meshlet"
HOST = "127.0.0.1"
PORTS = range(19700, 19800)
POD_BLOCK = 197  # the first start's pods get 127.1.197.1, ...; the next start's 127.1.198.1
POLL_S = 0.05
PAGE_TIMEOUT_S = 30.0  # a start that has served no page by then counts as failed
TITLE = b"Simple Bookstore App"
INCOMPLETE = (b"Error fetching", b"currently unavailable")  # details or reviews missing
SIDECAR = "istio-proxy"
EXPECTED_PODS = 7  # Bookinfo's six Deployments, one replica each, and the ingress gateway
GATEWAY_NAMESPACE = "istio-system"

UP_LINE = re.compile(r"Bookinfo is up in ([\d.]+) s")
READY_LINE = re.compile(r"pods: (\d+)/(\d+) ready")
TRAFFIC_LINE = re.compile(r"traffic sent: (.*)")

TARGETS = {
    "start_max_s": ("command to all pods ready and the page served, max over starts, s", "≤ 10"),
    "proxy_max_mib": ("RSS of the largest meshlet proxy (sidecars and gateway), MiB", "≤ 40"),
}
LIMITS = {"start_max_s": 10.0, "proxy_max_mib": 40.0}


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    starts: int
    latency_requests: int  # per arm, after 10 warm-up requests each
    settle_s: float  # the demo's traffic before memory is read
    budget_s: float  # no new start after this much of the run


FULL = Plan(starts=5, latency_requests=200, settle_s=10.0, budget_s=100.0)
QUICK = Plan(starts=3, latency_requests=100, settle_s=10.0, budget_s=60.0)


class BenchError(Exception):
    """The benchmark cannot go on (no free ports, the demo failed to start)."""


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# -- ports and addresses --------------------------------------------------------------------


def bindable(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` now (TIME_WAIT leftovers do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(count: int, taken: set[int]) -> list[int]:
    """``count`` ports of PORTS that nothing listens on and no earlier start used."""
    found = [p for p in PORTS if p not in taken and bindable(HOST, p)][:count]
    if len(found) < count:
        raise BenchError(f"fewer than {count} free ports in {PORTS.start}-{PORTS.stop - 1}")
    taken.update(found)
    return found


def free_ports_in_a_row(count: int, taken: set[int]) -> list[int]:
    """``count`` consecutive ports of PORTS, free and unused by earlier starts."""
    for base in PORTS:
        block = list(range(base, base + count))
        if block[-1] in PORTS and all(p not in taken and bindable(HOST, p) for p in block):
            taken.update(block)
            return block
    raise BenchError(f"no {count} free ports in a row in {PORTS.start}-{PORTS.stop - 1}")


def pod_block(index: int) -> str:
    """The /24 this start's pods get their addresses from; refused when anything listens on the
    sidecar admin, outbound, inbound or application port of its first addresses."""
    block = f"127.1.{POD_BLOCK + index}"
    for host in range(1, 12):
        for port in (15000, 15001, 15006, 9080):
            if not bindable(f"{block}.{host}", port):
                raise BenchError(f"{block}.{host}:{port} is in use; pick another POD_BLOCK")
    return block


# -- one `meshlet demo` ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Ports:
    api: int
    xds: int
    gateway: int


class DemoRun:
    """One ``meshlet demo`` in its own state directory with its own ports, and every process
    it was seen to start (PID and start time), so that ``stop`` can make sure all are gone."""

    def __init__(self, *, ports: Ports, state_dir: Path, block: str, duration: float) -> None:
        self.ports = ports
        self.state_dir = state_dir
        self.duration = duration
        self.log = state_dir.parent / "demo.log"
        self.env = {**os.environ, "MESHLET_SERVER": f"http://{HOST}:{ports.api}"}
        self.popen: subprocess.Popen[bytes] | None = None
        self.seen: dict[int, int] = {}  # pid -> start ticks
        state_dir.mkdir(parents=True)
        (state_dir / "ipam.cursor").write_text(f"{block}.0\n")

    def __repr__(self) -> str:
        state = "not started"
        if self.popen is not None:
            code = self.popen.poll()
            state = "running" if code is None else f"exited {code}"
        return f"<DemoRun pid={self.popen.pid if self.popen else None} {state} {self.ports}>"

    @property
    def argv(self) -> list[str]:
        return [
            str(MESHLET),
            "demo",
            "--duration",
            f"{self.duration:g}",
            "--xds-address",
            f"{HOST}:{self.ports.xds}",
            "--gateway-port",
            str(self.ports.gateway),
            "--state-dir",
            str(self.state_dir),
        ]

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**self.env, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,  # Ctrl-C reaches only this script, which stops it
                preexec_fn=_die_with_parent,  # SIGTERM (a clean stop) if this script dies
            )

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def mesh_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, KeyError):
            return int(json.loads((self.state_dir / "mesh.json").read_text())["pid"])
        return None

    def remember(self) -> list[int]:
        """Note the demo's process tree (the mesh daemon and every pod are in it)."""
        tree = process_tree(self.popen.pid) if self.popen is not None else []
        for stat in tree:
            self.seen[stat.pid] = stat.start_ticks
        return [s.pid for s in tree]

    def still_running(self) -> list[int]:
        alive = []
        for pid, ticks in self.seen.items():
            stat = read_stat(pid)
            if stat is not None and stat.start_ticks == ticks:
                alive.append(pid)
        return alive

    def stop(self, *, signal_first: bool, timeout: float = 45.0) -> dict[str, Any]:
        """Stop the demo (SIGTERM when ``signal_first``, else wait for its ``--duration``), then
        ``meshlet down``, then SIGKILL whatever is left. What was needed, and how long."""
        started = time.perf_counter()
        out: dict[str, Any] = {"down_needed": False, "killed": 0}
        if self.popen is None:
            return out
        self.remember()
        if signal_first and self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
        # Shutdown time runs from the moment the demo says it is stopping to its exit.
        stopping: float | None = None
        deadline = started + timeout
        while self.popen.poll() is None and time.perf_counter() < deadline:
            if stopping is None and "stopping the mesh" in self.output():
                stopping = time.perf_counter()
            time.sleep(POLL_S)
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        out["exit_code"] = self.popen.returncode
        out["stop_s"] = time.perf_counter() - stopping if stopping is not None else None
        pid = self.mesh_pid()
        if pid is not None and pid in self.still_running():
            out["down_needed"] = True
            subprocess.run(
                [str(MESHLET), "down"], env=self.env, capture_output=True, timeout=120, check=False
            )
        deadline = time.perf_counter() + 5
        while (left := self.still_running()) and time.perf_counter() < deadline:
            time.sleep(0.1)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out["killed"] = len(left)
        return out


def keep_logs(demo: DemoRun, into: Path) -> None:
    """Copy the demo's output, the mesh's log and every container's log to ``into``."""
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    with contextlib.suppress(OSError):
        shutil.copy(demo.log, into / "demo.log")
    for log in demo.state_dir.rglob("*.log"):
        target = into / log.relative_to(demo.state_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            shutil.copy(log, target)


def get_page(port: int, host: str = HOST, timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body) of ``GET /productpage`` on a new connection; (0, b"") when refused."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/productpage")
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return 0, b""
    finally:
        conn.close()


def is_page(status: int, body: bytes) -> bool:
    return status == 200 and TITLE in body


def is_complete(body: bytes) -> bool:
    return not any(marker in body for marker in INCOMPLETE)


def all_ready(api_port: int) -> bool:
    """Whether the mesh's ``GET /runtime`` (what ``meshlet up`` and ``demo`` poll) lists
    Bookinfo's six pods and the gateway, every one ready."""
    conn = http.client.HTTPConnection(HOST, api_port, timeout=5)
    try:
        conn.request("GET", "/runtime")
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            return False
        pods = [p for p in json.loads(body).get("pods", []) if not p.get("terminating")]
    except (OSError, http.client.HTTPException, ValueError):
        return False
    finally:
        conn.close()
    return len(pods) >= EXPECTED_PODS and all(p.get("ready") for p in pods)


def watch_start(demo: DemoRun, started: float, *, timeout: float = 60.0) -> dict[str, Any]:
    """Poll every 50 ms until every pod is ready, the gateway serves the page, the page is
    complete and the demo has said it is up; the time (s since ``started``) each was first
    seen. ``up`` is the later of the first two: the budget's moment."""
    seen: dict[str, float] = {}
    own_s: float | None = None
    polls = 0
    while True:
        now = time.perf_counter() - started
        text = demo.output()
        if "cli" not in seen and "starting the control plane" in text:
            seen["cli"] = now
        if "applied" not in seen and " created\n" in text:
            seen["applied"] = now
        if "mesh_json" not in seen and (demo.state_dir / "mesh.json").exists():
            seen["mesh_json"] = now
        if "pods_line" not in seen:
            for ready, expected in READY_LINE.findall(text):
                if ready == expected and int(ready) > 0:
                    seen["pods_line"] = now
        if "ready" not in seen and "applied" in seen and all_ready(demo.ports.api):
            seen["ready"] = time.perf_counter() - started
        if "up_line" not in seen and (m := UP_LINE.search(text)):
            seen["up_line"] = now
            own_s = float(m.group(1))
        if "page" not in seen or "complete" not in seen:
            status, body = get_page(demo.ports.gateway)
            if is_page(status, body):
                seen.setdefault("page", time.perf_counter() - started)
                if is_complete(body):
                    seen.setdefault("complete", time.perf_counter() - started)
        if "up" not in seen and {"ready", "page"} <= seen.keys():
            seen["up"] = max(seen["ready"], seen["page"])
        if {"up", "complete", "up_line"} <= seen.keys():
            break
        if not demo.alive():
            raise BenchError(f"meshlet demo exited ({demo.popen}):\n{text[-2000:]}")
        if now > timeout or ("up" in seen and now > seen["up"] + 15):
            if "up" not in seen:
                missing = "no product page" if "page" not in seen else "not every pod ready"
                raise BenchError(f"{missing} after {timeout:.0f} s:\n{text[-2000:]}")
            break
        polls += 1
        if polls % 10 == 0:
            demo.remember()
        time.sleep(max(0.0, started + now + POLL_S - time.perf_counter()))
    return {"events_s": seen, "own_s": own_s}


# -- memory ---------------------------------------------------------------------------------


def smaps_kib(pid: int) -> tuple[int, int]:
    """(PSS, private) KiB from /proc/PID/smaps_rollup, (0, 0) when gone or unreadable. PSS
    shares each shared page among its users; private pages (clean and dirty) are what this
    process alone holds, what one more such process would cost."""
    pss = private = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key == "Pss":
                pss = int(rest.split()[0])
            elif key in ("Private_Clean", "Private_Dirty"):
                private += int(rest.split()[0])
    except OSError:
        pass
    return pss, private


@dataclass(frozen=True, slots=True, kw_only=True)
class Memory:
    """One process tree's memory, in MiB."""

    rss: float
    pss: float
    private: float
    pids: tuple[int, ...]

    @classmethod
    def of_tree(cls, pid: int, *, descendants: bool = True) -> Memory:
        pids = tuple(s.pid for s in process_tree(pid)) if descendants else (pid,)
        smaps = [smaps_kib(p) for p in pids]
        return cls(
            rss=sum(rss_kib(p) for p in pids) / 1024,
            pss=sum(s[0] for s in smaps) / 1024,
            private=sum(s[1] for s in smaps) / 1024,
            pids=pids,
        )

    def figures(self) -> dict[str, float]:
        return {"rss_mib": self.rss, "pss_mib": self.pss, "private_mib": self.private}


def get_pods(demo: DemoRun) -> list[dict[str, Any]]:
    """``meshlet get pods -A -o json``, as a user runs it against this mesh."""
    done = subprocess.run(
        [str(MESHLET), "get", "pods", "-A", "-o", "json"],
        env=demo.env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"meshlet get pods failed ({done.returncode}):\n{done.stderr[-2000:]}")
    data = json.loads(done.stdout)
    items: list[dict[str, Any]] = data.get("items", []) if isinstance(data, dict) else data
    return items


def measure_memory(demo: DemoRun) -> dict[str, Any]:
    """RSS and PSS of the control plane, every container and the demo CLI (see the docstring)."""
    daemon = demo.mesh_pid()
    if daemon is None or demo.popen is None:
        raise BenchError("the mesh wrote no mesh.json")
    rows: list[dict[str, Any]] = []
    claimed: set[int] = set()
    for pod in get_pods(demo):
        meta = pod.get("metadata") or {}
        status = pod.get("status") or {}
        for container in status.get("containerStatuses") or []:
            cid = str(container.get("containerID") or "")
            if not cid.startswith("meshlet://"):
                continue
            pid = int(cid.removeprefix("meshlet://"))
            memory = Memory.of_tree(pid)
            claimed.update(memory.pids)
            name = container.get("name")
            if name != SIDECAR:
                kind = "app"
            elif meta.get("namespace") == GATEWAY_NAMESPACE:
                kind = "gateway"
            else:
                kind = "sidecar"
            rows.append(
                {
                    "class": kind,
                    "pod": meta.get("name"),
                    "namespace": meta.get("namespace"),
                    "ip": status.get("podIP"),
                    "container": name,
                    "pid": pid,
                    "processes": len(memory.pids),
                    **memory.figures(),
                }
            )
    plane = Memory.of_tree(daemon, descendants=False)
    descendants = [s.pid for s in process_tree(daemon)[1:]]
    unaccounted = [p for p in descendants if p not in claimed]
    cli = Memory.of_tree(demo.popen.pid, descendants=False)
    classes: dict[str, dict[str, float]] = {}
    for kind in ("sidecar", "gateway", "app"):
        members = [r for r in rows if r["class"] == kind]
        classes[kind] = {"count": len(members)} | {
            key: sum(r[key] for r in members) for key in ("rss_mib", "pss_mib", "private_mib")
        }
    classes["control plane"] = {"count": 1, **plane.figures()}
    mesh_rss = sum(c["rss_mib"] for c in classes.values())
    mesh_pss = sum(c["pss_mib"] for c in classes.values())
    proxies = [r["rss_mib"] for r in rows if r["class"] in ("sidecar", "gateway")]
    sidecars = [r["rss_mib"] for r in rows if r["class"] == "sidecar"]
    return {
        "found_by": "meshlet get pods -A -o json (containerID meshlet://<pid>) + mesh.json",
        "daemon_pid": daemon,
        "containers": sorted(rows, key=lambda r: (r["class"], r["pod"] or "")),
        "classes": classes,
        "mesh_rss_mib": mesh_rss,
        "mesh_pss_mib": mesh_pss,
        "unaccounted_pids": unaccounted,
        "unaccounted_rss_mib": sum(rss_kib(p) for p in unaccounted) / 1024,
        "mesh_private_mib": sum(c["private_mib"] for c in classes.values()),
        "demo_cli": {"pid": demo.popen.pid, **cli.figures()},
        "sidecar_median_mib": statistics.median(sidecars) if sidecars else None,
        "proxy_max_mib": max(proxies) if proxies else None,
    }


# -- latency --------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank: with 200 samples, p99 is the 198th in order (the third largest)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def reviews_version(body: bytes) -> str:
    """Which reviews version served the page: v2 draws black stars, v3 red ones, v1 none."""
    if b'<font color="red">' in body:
        return "v3"
    if b'<font color="black">' in body:
        return "v2"
    return "v1"


def measure_latency(gateway_port: int, pod_ip: str, requests: int) -> dict[str, Any]:
    """Sequential GETs of the page, alternating between the gateway and the pod's own port."""
    arms = {"gateway": (HOST, gateway_port), "direct": (pod_ip, 9080)}
    samples: dict[str, list[float]] = {name: [] for name in arms}
    versions: dict[str, list[str]] = {name: [] for name in arms}
    errors = dict.fromkeys(arms, 0)
    incomplete = dict.fromkeys(arms, 0)
    warmup = 10
    for i in range(warmup + requests):
        for name, (host, port) in arms.items():
            t = time.perf_counter_ns()
            status, body = get_page(port, host)
            ms = (time.perf_counter_ns() - t) / 1e6
            if i < warmup:
                continue
            if not is_page(status, body):
                errors[name] += 1
                continue
            if not is_complete(body):
                incomplete[name] += 1
            samples[name].append(ms)
            versions[name].append(reviews_version(body))
    out: dict[str, Any] = {"requests": requests, "warmup": warmup}
    for name, (host, port) in arms.items():
        values = samples[name]
        out[name] = {
            "target": f"http://{host}:{port}/productpage",
            "ok": len(values),
            "errors": errors[name],
            "incomplete": incomplete[name],
            "p50_ms": statistics.median(values) if values else None,
            "p90_ms": percentile(values, 90) if values else None,
            "p99_ms": percentile(values, 99) if values else None,
            "max_ms": max(values) if values else None,
            "mean_ms": statistics.fmean(values) if values else None,
            "by_reviews": {
                v: {
                    "n": len(of_v),
                    "p50_ms": statistics.median(of_v),
                    "p90_ms": percentile(of_v, 90),
                }
                for v in sorted(set(versions[name]))
                if (of_v := [ms for ms, w in zip(values, versions[name], strict=True) if w == v])
            },
            "samples_ms": [round(ms, 3) for ms in values],
            "samples_reviews": versions[name],
        }
    g, d = out["gateway"]["p50_ms"], out["direct"]["p50_ms"]
    out["added_p50_ms"] = g - d if g is not None and d is not None else None
    return out


# -- the run --------------------------------------------------------------------------------


def one_start(
    index: int, root: Path, taken: set[int], *, last: bool, plan: Plan, out: Path
) -> dict[str, Any]:
    """One ``meshlet demo``: its start, and for the ``last``, memory and latency. A start that
    never serves the page is recorded as failed, its logs kept in ``out/demo-failed-<n>/``."""
    # The mesh puts mTLS xDS and its CA at the xDS port + 1 and + 2: take five in a row.
    api, xds, _, _, gateway = free_ports_in_a_row(5, taken)
    ports = Ports(api=api, xds=xds, gateway=gateway)
    block = pod_block(index)
    demo = DemoRun(
        ports=ports,
        state_dir=root / f"start{index}" / "state",
        block=block,
        duration=120.0 if last else 1.0,
    )
    result: dict[str, Any] = {"start": index + 1, "ports": vars_of(ports), "pods": f"{block}.0/24"}
    started = time.perf_counter()
    demo.start()
    failed = False
    try:
        try:
            result |= watch_start(demo, started, timeout=PAGE_TIMEOUT_S)
        except BenchError as e:
            failed = True
            kept = out / f"demo-failed-{index + 1}"
            keep_logs(demo, kept)
            result["failed"] = f"{e}"[-3000:]
            say(f"start {index + 1} FAILED (logs in {kept}): {str(e).splitlines()[0]}")
            return result
        events = result["events_s"]
        say(
            f"start {index + 1}: all pods ready and the page served after {events['up']:.2f} s"
            f" (pods {events['ready']:.2f} s, page {events['page']:.2f} s; the demo says "
            f"{result['own_s']} s)"
        )
        if last:
            wait = events["up"] + plan.settle_s - (time.perf_counter() - started)
            say(f"  {max(wait, 0):.0f} s of the demo's traffic, then memory ...")
            time.sleep(max(wait, 0.0))
            demo.remember()
            memory = measure_memory(demo)
            result["memory"] = memory
            say(
                f"  mesh RSS {memory['mesh_rss_mib']:.0f} MiB (PSS {memory['mesh_pss_mib']:.0f});"
                f" largest proxy {memory['proxy_max_mib']:.1f} MiB"
            )
            pod_ip = next(
                r["ip"] for r in memory["containers"] if (r["pod"] or "").startswith("productpage")
            )
            say(f"  latency: {plan.latency_requests} requests per arm ...")
            result["latency"] = measure_latency(gateway, pod_ip, plan.latency_requests)
            result["memory_after_latency"] = measure_memory(demo)
            lat = result["latency"]
            say(
                f"  gateway p50 {lat['gateway']['p50_ms']:.1f} ms, direct p50 "
                f"{lat['direct']['p50_ms']:.1f} ms"
            )
    finally:
        stopped = demo.stop(signal_first=last or failed)
        result["stop"] = stopped
        tail = TRAFFIC_LINE.findall(demo.output())
        result["traffic"] = tail[-1] if tail else None
        result["demo_log"] = demo.output()[-4000:]
    if stopped["down_needed"] or stopped["killed"]:
        say(f"  stop: {stopped}")
    return result


def vars_of(ports: Ports) -> dict[str, int]:
    return {"api": ports.api, "xds": ports.xds, "gateway": ports.gateway}


def summarize(starts: list[dict[str, Any]]) -> dict[str, Any]:
    def stat(key: str) -> dict[str, float | None]:
        values = [s["events_s"][key] for s in starts if key in s.get("events_s", {})]
        return {
            "median": statistics.median(values) if values else None,
            "max": max(values) if values else None,
            "n": len(values),
        }

    own = [s["own_s"] for s in starts if s.get("own_s") is not None]
    return {
        "starts": len(starts),
        "failed": sum(1 for s in starts if "failed" in s),
        "events": {k: stat(k) for k in EVENT_NAMES},
        "own_s": {
            "median": statistics.median(own) if own else None,
            "max": max(own) if own else None,
        },
        "stop_s": [s["stop"].get("stop_s") for s in starts],
        "down_needed": sum(1 for s in starts if s["stop"]["down_needed"]),
        "killed": sum(s["stop"]["killed"] for s in starts),
    }


def verdicts(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    summary = results["summary"]
    memory = results.get("memory") or {}
    values = {
        # A start that never served the page fails the budget, whatever the others did.
        "start_max_s": math.inf if summary["failed"] else summary["events"]["up"]["max"],
        "proxy_max_mib": memory.get("proxy_max_mib"),
    }
    rows = []
    for key, (name, goal) in TARGETS.items():
        value = values[key]
        verdict = "—" if value is None else ("pass" if value <= LIMITS[key] else "FAIL")
        shown = f"no page in {PAGE_TIMEOUT_S:.0f} s" if value == math.inf else _fmt(value, 1)
        rows.append((name, shown, goal, verdict))
    return rows


def _fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


EVENT_NAMES = {
    "cli": "CLI has imported and checked the manifests (its first line)",
    "mesh_json": "mesh daemon wrote `mesh.json` (control plane and gateway pod started)",
    "applied": "manifests applied (`... created` printed)",
    "ready": "all 7 pods ready (`GET /runtime`, polled by this script)",
    "page": "product page served through the gateway (this script's own GET)",
    "up": "**both: all pods ready and the page served** (the budget's moment)",
    "complete": "product page complete (details and reviews, no 'unavailable')",
    "pods_line": "the demo printed `pods: 7/7 ready` (it polls every 0.25 s)",
    "up_line": "the demo printed `Bookinfo is up in X s`",
}


def markdown(results: dict[str, Any]) -> str:
    summary = results["summary"]
    events = summary["events"]
    plan = results["meta"]["plan"]
    lines = [
        f"**Start** — `meshlet demo` spawned → its moments, as this script saw them (polled "
        f"every 50 ms); {summary['starts'] - summary['failed']} starts",
        "",
        "| moment | median s | max s |",
        "|---|---|---|",
    ]
    for key, label in EVENT_NAMES.items():
        e = events.get(key) or {}
        lines.append(f"| {label} | {_fmt(e.get('median'), 2)} | {_fmt(e.get('max'), 2)} |")
    own = summary["own_s"]
    lines.append(
        f'| for comparison, the demo\'s own "Bookinfo is up in X s" (clock starts after its '
        f"imports and manifest checks) | {_fmt(own['median'], 1)} | {_fmt(own['max'], 1)} |"
    )
    if summary["failed"]:
        lines += [
            "",
            f"**{summary['failed']} of {summary['starts']} starts served no product page within "
            f"{PAGE_TIMEOUT_S:.0f} s** (the table above is over the others; their logs are in "
            "`bench/out/demo-failed-<n>/`).",
        ]
    stops = [s for s in summary["stop_s"] if s is not None]
    lines += [
        "",
        f"Stopping: `meshlet demo` took {_fmt(min(stops, default=None), 1)} to "
        f"{_fmt(max(stops, default=None), 1)} s from printing `stopping the mesh ...` to its "
        f"exit; `meshlet down` was needed {summary['down_needed']} time(s); processes left "
        f"to SIGKILL: {summary['killed']}.",
    ]
    memory = results.get("memory")
    if memory:
        lines += [
            "",
            f"**Memory** — after {plan['settle_s']:.0f} s of the demo's traffic (2 requests/s); "
            "VmRSS, PSS and private (clean + dirty) memory from /proc; containers found with "
            "`meshlet get pods -A -o json`",
            "",
            "| process | pod | pid | RSS MiB | PSS MiB | private MiB |",
            "|---|---|---|---|---|---|",
        ]
        for row in memory["containers"]:
            if row["class"] in ("sidecar", "gateway"):
                what = "gateway (meshlet proxy)" if row["class"] == "gateway" else "sidecar"
                lines.append(
                    f"| {what} | {row['pod']} | {row['pid']} | {row['rss_mib']:.1f} | "
                    f"{row['pss_mib']:.1f} | {row['private_mib']:.1f} |"
                )
        lines += [
            "",
            "| class | processes | RSS MiB | PSS MiB | private MiB |",
            "|---|---|---|---|---|",
        ]
        for kind, c in memory["classes"].items():
            lines.append(
                f"| {kind} | {c['count']:.0f} | {c['rss_mib']:.1f} | {c['pss_mib']:.1f} | "
                f"{c['private_mib']:.1f} |"
            )
        count = sum(c["count"] for c in memory["classes"].values())
        lines.append(
            f"| **the mesh** | {count:.0f} | {memory['mesh_rss_mib']:.1f} | "
            f"{memory['mesh_pss_mib']:.1f} | {memory['mesh_private_mib']:.1f} |"
        )
        cli = memory["demo_cli"]
        lines.append(
            f"| not counted: the `meshlet demo` CLI (traffic client) | 1 | {cli['rss_mib']:.1f} |"
            f" {cli['pss_mib']:.1f} | {cli['private_mib']:.1f} |"
        )
        after = results.get("memory_after_latency")
        unaccounted = len(memory["unaccounted_pids"])
        lines += [
            "",
            f"Per sidecar: median {_fmt(memory['sidecar_median_mib'])} MiB, largest meshlet "
            f"proxy {_fmt(memory['proxy_max_mib'])} MiB (DESIGN.md's goal: 40 MiB per sidecar). "
            f"Descendants of the control plane no container claims: {unaccounted}."
            + (
                f" After the latency runs below: mesh RSS {after['mesh_rss_mib']:.1f} MiB, "
                f"largest proxy {after['proxy_max_mib']:.1f} MiB."
                if after
                else ""
            ),
        ]
    latency = results.get("latency")
    if latency:
        n = latency["requests"]
        lines += [
            "",
            f"**Latency** of `GET /productpage` — {n} sequential requests per arm after "
            f"{latency['warmup']} warm-up, alternating, a new connection each",
            "",
            "| path | ok | errors | incomplete pages | p50 ms | p90 ms | p99 ms | max ms |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, label in (
            ("gateway", "gateway → productpage's sidecar → productpage"),
            ("direct", "baseline: productpage pod IP:9080 directly"),
        ):
            a = latency[name]
            lines.append(
                f"| {label} | {a['ok']} | {a['errors']} | {a['incomplete']} | "
                f"{_fmt(a['p50_ms'], 2)} | {_fmt(a['p90_ms'], 2)} | {_fmt(a['p99_ms'], 2)} | "
                f"{_fmt(a['max_ms'], 2)} |"
            )
        versions = sorted({*latency["gateway"]["by_reviews"], *latency["direct"]["by_reviews"]})
        by = [f"{v}: {_by(latency['gateway'], v)} vs {_by(latency['direct'], v)}" for v in versions]
        lines += [
            "",
            f'Added p50: {_fmt(latency["added_p50_ms"], 2)} ms. The baseline is not "without '
            "the mesh\": it skips only the gateway and productpage's inbound sidecar. Each call "
            "productpage makes (details, reviews) still crosses two sidecars (its own outbound, "
            "the callee's inbound), as does reviews' call to ratings (v2 and v3 only): 4 to 6 "
            "proxy passes per page in the baseline, 6 to 8 through the gateway. So the "
            "difference is the cost of two proxy passes. Which reviews version answered changes "
            "the page's cost; p50 through the gateway vs the baseline, by version (n): "
            + "; ".join(by)
            + f". p99 is the nearest-rank sample ({percentile_rank(n) + 1} of {n} in order); "
            "the demo's own traffic (2 requests/s) runs alongside.",
        ]
    lines += [
        "",
        "**Targets** (issue 4)",
        "",
        "| target | measured | goal | verdict |",
        "|---|---|---|---|",
    ]
    for name, value, goal, verdict in verdicts(results):
        lines.append(f"| {name} | {value} | {goal} | {verdict} |")
    return "\n".join(lines) + "\n"


def _by(arm: dict[str, Any], version: str) -> str:
    got = arm["by_reviews"].get(version)
    return "—" if got is None else f"{got['p50_ms']:.2f} ms ({got['n']})"


def percentile_rank(n: int) -> int:
    return min(n - 1, round(0.99 * (n - 1)))


SECTION = "## Demo mesh"


def record(path: Path, results: dict[str, Any], notes: str = "") -> None:
    """Write the "Demo mesh" section of ``path``, replacing the previous one."""
    meta = results["meta"]
    m = meta["machine"]
    when = datetime.datetime.fromisoformat(meta["started"]).strftime("%Y-%m-%d %H:%M UTC")
    load = meta["loadavg"]
    section = (
        f"{SECTION}\n\n"
        f"Written by `python bench/demo.py --record` ({meta['mode']} run, {when}); "
        "bench/README.md says what is measured.\n\n"
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']:.0f} GiB RAM, "
        f"Linux {m['kernel']}; Python {m['python']} (uvloop {m['uvloop']}, httptools "
        f"{m['httptools']})\n"
        f"- meshlet: `{m['git']}`\n"
        f"- command: `{meta['command']}`\n"
        f"- load average (1 min) before / after: {load['before']:.2f} / {load['after']:.2f} "
        "(other sessions share this VM; nothing is pinned)\n\n" + markdown(results) + notes
    )
    report.replace_section(path, SECTION, section)


def machine() -> dict[str, Any]:
    described = report.machine()
    keys = ("cpu", "cores", "kernel", "python", "git", "uvloop", "httptools")
    return {k: described[k] for k in keys} | {"ram_gib": report.ram_gib()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="3 starts, 100 latency samples")
    parser.add_argument("--record", action="store_true", help="update bench/RESULTS.md")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out", help="results dir")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    if not MESHLET.exists():
        sys.exit(f"{MESHLET} not found: pip install -e . in the venv first")
    started = datetime.datetime.now(datetime.UTC)
    deadline = time.monotonic() + plan.budget_s
    command = "python bench/demo.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    loadavg_before = os.getloadavg()[0]

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    starts: list[dict[str, Any]] = []
    interrupted = False
    taken: set[int] = set()
    with tempfile.TemporaryDirectory(prefix="meshlet-bench-demo-") as tmp:
        try:
            index = 0
            retried = False
            while True:
                last = index >= plan.starts - 1
                if not last and time.monotonic() > deadline:
                    say("the time budget is spent: the next start is the last")
                    last = True
                start = one_start(index, Path(tmp), taken, last=last, plan=plan, out=args.out)
                starts.append(start)
                index += 1
                if last and "failed" in start and not retried:
                    say("the measured start failed: one more, to measure memory and latency")
                    retried = True
                    continue
                if last:
                    break
        except KeyboardInterrupt:
            interrupted = True
            say("interrupted: stopped every process this run started")
        except BenchError as e:
            sys.exit(str(e))

    measured = next((s for s in starts if "memory" in s), {})
    results: dict[str, Any] = {
        "meta": {
            "started": started.isoformat(),
            "mode": "quick" if args.quick else "full",
            "command": command,
            "machine": machine(),
            "plan": {
                "starts": plan.starts,
                "latency_requests": plan.latency_requests,
                "settle_s": plan.settle_s,
                "budget_s": plan.budget_s,
            },
            "loadavg": {"before": loadavg_before, "after": os.getloadavg()[0]},
            "interrupted": interrupted,
        },
        "summary": summarize(starts),
        "memory": measured.get("memory"),
        "memory_after_latency": measured.get("memory_after_latency"),
        "latency": measured.get("latency"),
        "starts": starts,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo.json").write_text(json.dumps(results, indent=2) + "\n")
    if starts:
        print(markdown(results))
        if args.record and not interrupted:
            record(RESULTS, results)
            say("recorded in bench/RESULTS.md")
    say(f"results: {args.out / 'demo.json'}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
