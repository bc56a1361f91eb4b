"""The meshlet benchmark: one command, three arms, interleaved rounds.

    python bench/run.py            # full run, about 8 minutes, never more than 10
    python bench/run.py --quick    # smoke run, about 1 minute
    python bench/run.py --record   # ... and append the tables to bench/RESULTS.md

It starts an nginx upstream (1 worker, ``return 200`` with a 1 KiB body), then, round after
round, starts the arms' proxies, runs every load against every arm (the arms' order rotates
each round), and stops the proxies. For each run it samples /proc before and after: the CPU
time of the proxy's and the upstream's process trees, and the busy time of each CPU. The
results go to ``OUT/results.json`` and to a Markdown table on stdout. bench/README.md says
what each figure means.

Placement: the load generator (wrk or bench/openloop.py) runs alone on ``--load-cpu`` (1);
the proxy under test and the upstream share ``--proxy-cpu`` (0), as a sidecar shares its
node with its application.

Every process it starts is stopped by its PID when the run ends, fails or is interrupted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import report
from arms import (
    MESHLET_BOOTSTRAP,
    NGINX_PROXY_PORT,
    REPO,
    UPSTREAM_PORT,
    Arm,
    ArmUnavailable,
    DirectArm,
    MeshletArm,
    NginxArm,
    port_is_free,
    start_upstream,
)
from loadgen import LoadFailed, fixed_rate, saturate
from processes import CLOCK_TICKS, CoreTimes, Spawned, Supervisor, read_cores

ARM_NAMES = ("direct", "nginx", "meshlet")
OTHER_LIMIT = report.OTHER_LIMIT


@dataclass(frozen=True, kw_only=True)
class Plan:
    """How long and how often to measure."""

    rounds: int
    saturation_s: int
    fixed_s: float
    warmup_s: float
    rates: tuple[int, ...] = (1000, 8000)
    wrk_connections: int = 50
    openloop_connections: int = 50
    budget_s: float | None = 600.0  # no new round starts if it could end past this

    def loads(self) -> list[str]:
        return ["saturation", *(f"rate-{rate}" for rate in self.rates)]

    def seconds_per_arm(self) -> float:
        per_rate = self.warmup_s + self.fixed_s + 0.5  # + interpreter start and connecting
        return self.saturation_s + 0.2 + per_rate * len(self.rates)


FULL = Plan(rounds=5, saturation_s=10, fixed_s=10, warmup_s=1)
QUICK = Plan(rounds=1, saturation_s=5, fixed_s=5, warmup_s=0.5, budget_s=90)


@dataclass(frozen=True, kw_only=True)
class Placement:
    load_cpu: int
    proxy_cpu: int
    upstream_cpu: int

    def describe(self) -> str:
        return (
            f"load generator on CPU {self.load_cpu}; proxy under test on CPU {self.proxy_cpu}; "
            f"upstream on CPU {self.upstream_cpu} (taskset -c)"
        )

    def cores(self) -> list[int]:
        return sorted({self.load_cpu, self.proxy_cpu, self.upstream_cpu})


@dataclass(frozen=True, kw_only=True, slots=True)
class Sample:
    """One look at the clock and /proc."""

    wall: float
    proxy_cpu: float  # 0 when there is no proxy
    upstream_cpu: float
    load_cpu: float  # every reaped child's CPU time: grows by the load generator's when it ends
    cores: dict[int, CoreTimes]

    @classmethod
    def take(cls, proxy: Spawned | None, upstream: Spawned) -> Sample:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return cls(
            wall=time.perf_counter(),
            proxy_cpu=proxy.cpu_seconds() if proxy is not None else 0.0,
            upstream_cpu=upstream.cpu_seconds(),
            load_cpu=children.ru_utime + children.ru_stime,
            cores=read_cores(),
        )


class Measurement:
    """Samples around one run: CPU of the proxy, upstream and load, busy time per CPU.

    Busy time a CPU spent on none of our pinned processes is other tenants' work; a run where it
    is large was disturbed, and the runner says so.
    """

    def __init__(self, proxy: Spawned | None, upstream: Spawned, placement: Placement) -> None:
        self.proxy, self.upstream, self.placement = proxy, upstream, placement
        self._before = Sample.take(proxy, upstream)

    def finish(self, requests: int) -> dict[str, Any]:
        """CPU figures of the run; call it after the load generator has been reaped."""
        before, after = self._before, Sample.take(self.proxy, self.upstream)
        wall = after.wall - before.wall
        per_req = 1e6 / requests if requests else 0.0
        proxy_s = after.proxy_cpu - before.proxy_cpu
        upstream_s = after.upstream_cpu - before.upstream_cpu
        load_s = after.load_cpu - before.load_cpu
        facts: dict[str, Any] = {
            "wall_s": round(wall, 3),
            "proxy_cpu_s": None,
            "proxy_cpu_us_per_req": None,
            "proxy_rss_kib": None,
            "proxy_rss_max_process_kib": None,
            "upstream_cpu_s": round(upstream_s, 3),
            "upstream_cpu_us_per_req": round(upstream_s * per_req, 3),
            "load_cpu_s": round(load_s, 3),
        }
        if self.proxy is not None:
            total, largest = self.proxy.rss_kib()
            facts |= {
                "proxy_cpu_s": round(proxy_s, 3),
                "proxy_cpu_us_per_req": round(proxy_s * per_req, 3),
                "proxy_rss_kib": total,
                "proxy_rss_max_process_kib": largest,
            }
        ours = dict.fromkeys(self.placement.cores(), 0.0)
        ours[self.placement.load_cpu] += load_s
        ours[self.placement.proxy_cpu] += proxy_s
        ours[self.placement.upstream_cpu] += upstream_s
        busy, other = {}, {}
        for core, our_s in ours.items():
            busy_s = (after.cores[core].busy - before.cores[core].busy) / CLOCK_TICKS
            total_s = (after.cores[core].total - before.cores[core].total) / CLOCK_TICKS
            busy[str(core)] = round(busy_s / total_s, 3) if total_s else 0.0
            other[str(core)] = round(max(0.0, busy_s - our_s) / total_s, 3) if total_s else 0.0
        facts["core_busy"] = busy
        facts["core_other_share"] = other  # busy with processes that are not ours
        return facts


class Benchmark:
    """Runs the plan; collects one record per (round, load, arm) in ``runs``."""

    def __init__(self, plan: Plan, placement: Placement, arms: list[Arm], out: Path) -> None:
        self.plan, self.placement, self.arms, self.out = plan, placement, arms, out
        self.runs: list[dict[str, Any]] = []
        self.arm_facts: dict[str, dict[str, Any]] = {a.name: {"available": True} for a in arms}
        self.starts: dict[str, list[float]] = {}
        self.rounds_run = 0

    def run(self, supervisor: Supervisor, upstream: Spawned) -> None:
        began = time.perf_counter()
        round_s = self.plan.seconds_per_arm() * len(self.arms)
        for number in range(self.plan.rounds):
            elapsed = time.perf_counter() - began
            budget = self.plan.budget_s
            if number and budget is not None and elapsed + round_s > budget:
                print(f"time budget reached: stopping after {number} round(s)", file=sys.stderr)
                break
            started = time.perf_counter()
            self.rounds_run = number + 1  # counts a round cut short by Ctrl-C too
            self._round(supervisor, upstream, number)
            round_s = time.perf_counter() - started

    def _round(self, supervisor: Supervisor, upstream: Spawned, number: int) -> None:
        shift = number % len(self.arms)
        order = self.arms[shift:] + self.arms[:shift]
        live = [arm for arm in order if self._start(supervisor, arm, number)]
        try:
            for load in self.plan.loads():
                for arm in live:
                    self._measure(supervisor, upstream, arm, load, number)
        finally:
            for arm in live:
                if isinstance(arm, MeshletArm):
                    self.arm_facts[arm.name]["access_log_bytes"] = arm.access_log_bytes()
                arm.stop(supervisor)

    def _start(self, supervisor: Supervisor, arm: Arm, number: int) -> bool:
        facts = self.arm_facts[arm.name]
        if not facts["available"]:
            return False
        try:
            started = arm.start(supervisor)
        except ArmUnavailable as exc:
            arm.stop(supervisor)
            facts |= {"available": False, "reason": str(exc), "round": number}
            print(f"[round {number + 1}] {arm.name}: not available: {exc}", file=sys.stderr)
            return False
        for key, value in started.items():
            facts.setdefault(key + "_all", []).append(value)
            if key == "start_to_ready_ms":
                self.starts.setdefault(arm.name, []).append(value)
        return True

    def _measure(
        self, supervisor: Supervisor, upstream: Spawned, arm: Arm, load: str, number: int
    ) -> None:
        plan, cpu = self.plan, self.placement.load_cpu
        record: dict[str, Any] = {"round": number, "arm": arm.name, "load": load}
        measurement = Measurement(arm.server, upstream, self.placement)
        try:
            if load == "saturation":
                result = saturate(
                    supervisor,
                    port=arm.port,
                    seconds=plan.saturation_s,
                    connections=plan.wrk_connections,
                    cpu=cpu,
                )
            else:
                rate = int(load.removeprefix("rate-"))
                record["rate"] = rate
                result = fixed_rate(
                    supervisor,
                    port=arm.port,
                    rate=rate,
                    seconds=plan.fixed_s,
                    warmup=plan.warmup_s,
                    connections=plan.openloop_connections,
                    cpu=cpu,
                )
                result["rps"] = result.pop("achieved_rps")
        except LoadFailed as exc:
            record["error"] = str(exc)
            print(f"[round {number + 1}] {arm.name} {load}: {exc}", file=sys.stderr)
            self.runs.append(record)
            return
        record |= result
        record |= measurement.finish(result["total_completed"])
        if arm.server is not None and not arm.server.alive():
            record["error"] = f"{arm.name} exited during the run"
        self.runs.append(record)
        print(_progress(number, record), file=sys.stderr)


def _progress(number: int, run: dict[str, Any]) -> str:
    text = f"[round {number + 1}] {run['arm']:8} {run['load']:11} {run['rps']:9.0f} req/s"
    if run["proxy_cpu_us_per_req"] is not None:
        text += f"  proxy {run['proxy_cpu_us_per_req']:6.2f} us/req"
    text += f"  upstream {run['upstream_cpu_us_per_req']:5.2f} us/req"
    if run.get("latency_us"):
        text += f"  p50 {run['latency_us']['p50'] / 1000:.3f} ms"
    if run.get("queued"):
        text += f"  {run['queued']} waited for a connection"
    other = {core: share for core, share in run["core_other_share"].items() if share > OTHER_LIMIT}
    if other:
        shares = ", ".join(f"{100 * share:.0f}% of CPU {core}" for core, share in other.items())
        text += f"  WARNING: other processes used {shares}"
    slip = run.get("schedule_slip_us", {}).get("p99", 0)
    if slip > 1000 and run.get("queued"):  # bursts after a server stall keep the loop busy
        text += f"  (generator slip p99 {slip / 1000:.1f} ms while draining the backlog)"
    elif slip > 1000:
        text += f"  WARNING: load generator slipped (p99 {slip / 1000:.1f} ms): CPU contention?"
    if run["errors_total"]:
        text += f"  errors {run['errors']}"
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark meshlet's proxy against nginx and a direct connection.",
        epilog="See bench/README.md.",
    )
    parser.add_argument("--quick", action="store_true", help="one short round (~1 minute)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out", help="output dir")
    parser.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    parser.add_argument("--rounds", type=int, help="override the number of rounds")
    parser.add_argument(
        "--arms", default=",".join(ARM_NAMES), help="comma-separated subset of the arms"
    )
    parser.add_argument("--load-cpu", type=int, default=1, help="CPU of the load generator")
    parser.add_argument("--proxy-cpu", type=int, default=0, help="CPU of the proxy under test")
    parser.add_argument("--upstream-cpu", type=int, help="CPU of the upstream (default: proxy's)")
    parser.add_argument(
        "--nginx-access-log",
        choices=("on", "off"),
        default="on",
        help="the nginx arm's buffered access log (meshlet's is always on)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.rounds:
        plan = Plan(**{**asdict(plan), "rounds": args.rounds, "budget_s": None})
    placement = Placement(
        load_cpu=args.load_cpu,
        proxy_cpu=args.proxy_cpu,
        upstream_cpu=args.proxy_cpu if args.upstream_cpu is None else args.upstream_cpu,
    )
    allowed = os.sched_getaffinity(0)
    for cpu in (placement.load_cpu, placement.proxy_cpu, placement.upstream_cpu):
        if cpu not in allowed:
            sys.exit(f"CPU {cpu} is not available here (have {sorted(allowed)})")
    names = [name.strip() for name in args.arms.split(",") if name.strip()]
    if unknown := set(names) - set(ARM_NAMES):
        sys.exit(f"unknown arms: {', '.join(sorted(unknown))} (have {', '.join(ARM_NAMES)})")
    if "direct" not in names:
        names.insert(0, "direct")  # added latency is measured against it
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    arms: list[Arm] = []
    for name in ARM_NAMES:
        if name == "direct" and name in names:
            arms.append(DirectArm())
        elif name == "nginx" and name in names:
            arms.append(
                NginxArm(out=out, cpu=placement.proxy_cpu, access_log=args.nginx_access_log == "on")
            )
        elif name == "meshlet" and name in names:
            arms.append(MeshletArm(out=out, cpu=placement.proxy_cpu))
    ports = {"upstream": UPSTREAM_PORT, "nginx": NGINX_PROXY_PORT}
    for arm in arms:
        if isinstance(arm, MeshletArm):
            ports |= {"meshlet": arm.port, "meshlet admin": arm.bootstrap.admin_port}
    if busy := [f"{who} {port}" for who, port in ports.items() if not port_is_free(port)]:
        sys.exit(f"ports already in use: {', '.join(busy)}; stop what holds them first")

    started = datetime.datetime.now(datetime.UTC)
    command = "python bench/run.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    print(
        f"meshlet benchmark ({'quick' if args.quick else 'full'}): {plan.rounds} round(s) of "
        f"{', '.join(plan.loads())} over {', '.join(a.name for a in arms)}; "
        f"about {plan.seconds_per_arm() * len(arms) * plan.rounds / 60:.1f} min; "
        f"{placement.describe()}",
        file=sys.stderr,
    )
    benchmark = Benchmark(plan, placement, arms, out)
    interrupted = False

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with Supervisor() as supervisor:
            upstream = start_upstream(
                supervisor, prefix=out / "nginx-upstream", cpu=placement.upstream_cpu
            )
            benchmark.run(supervisor, upstream)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: stopped every process this run started", file=sys.stderr)
    except ArmUnavailable as exc:  # only the upstream's failure gets here
        sys.exit(f"the upstream did not start: {exc}")

    names_run = [arm.name for arm in arms]
    summary = report.summarize(benchmark.runs, names_run, benchmark.starts)
    results: dict[str, Any] = {
        "meta": {
            "started": started.isoformat(),
            "finished": datetime.datetime.now(datetime.UTC).isoformat(),
            "mode": "quick" if args.quick else "full",
            "interrupted": interrupted,
            "command": command,
            "machine": report.machine(),
            "plan": asdict(plan) | {"rounds_run": benchmark.rounds_run},
            "placement": asdict(placement)
            | {
                "description": placement.describe(),
                "cores": [str(c) for c in placement.cores()],
            },
            "ports": ports,
            "meshlet_bootstrap": str(MESHLET_BOOTSTRAP),
            "nginx_access_log": args.nginx_access_log,
            "arms": benchmark.arm_facts,
        },
        "summary": summary,
        "targets": report.verdicts(summary) if "meshlet" in names_run else [],
        "runs": benchmark.runs,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = report.markdown(results)
    print(table)
    print(f"results: {out / 'results.json'}", file=sys.stderr)
    if args.record and not interrupted:
        report.record(REPO / "bench" / "RESULTS.md", results)
        print("recorded in bench/RESULTS.md", file=sys.stderr)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
