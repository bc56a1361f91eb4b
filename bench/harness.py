"""How a benchmark script runs: its command line, its loopback ports, its parts under one
``Supervisor``, and the results file it leaves.

``bench/security.py`` and ``bench/telemetry.py`` share this shape: check the tools, run each
part with whatever time budget is left, turn SIGTERM into the same clean stop as Ctrl-C (every
process the run started is stopped), then write ``OUT/<name>.json`` with the run's metadata,
print the Markdown and, with ``--record``, update ``bench/RESULTS.md``. Both measure with
the same fixed-rate load (``timed_load``) and place load on CPU 1, servers on CPU 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import report
from arms import NGINX, ArmUnavailable, port_is_free
from loadgen import fixed_rate
from processes import Supervisor

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "RESULTS.md"
SERVER_CPU, LOAD_CPU = 0, 1


class BenchError(Exception):
    """The benchmark cannot go on; the message says why."""


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Ports:
    """Hands out free ports of ``ports``, each once (a script has its own range, so two
    benchmarks never race for one port)."""

    def __init__(self, ports: range) -> None:
        self.ports = ports
        self.taken: dict[str, int] = {}

    def take(self, name: str) -> int:
        for port in self.ports:
            if port not in self.taken.values() and port_is_free(port):
                self.taken[name] = port
                return port
        raise BenchError(f"no free port left in {self.ports.start}-{self.ports.stop - 1}")


def parse_args(doc: str | None, argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0] if doc else None)
    parser.add_argument("--quick", action="store_true", help="one short round, about 1 minute")
    parser.add_argument("--record", action="store_true", help="update bench/RESULTS.md")
    parser.add_argument("--out", type=Path, default=BENCH / "out", help="results dir")
    return parser.parse_args(argv)


def require(tools: Sequence[str]) -> None:
    """Exit naming what is missing: a tool, nginx, or the two benchmark CPUs."""
    for tool in tools:
        if shutil.which(tool) is None:
            sys.exit(f"`{tool}` is needed (see bench/README.md)")
    if not Path(NGINX).exists():
        sys.exit(f"{NGINX} is needed (Debian's nginx-light is enough)")
    if not {SERVER_CPU, LOAD_CPU} <= os.sched_getaffinity(0):
        sys.exit(f"CPUs {SERVER_CPU} and {LOAD_CPU} are needed")


class RatePlan(Protocol):
    """What a plan says about the fixed-rate load: Istio's published figures are taken at
    1,000 req/s over 16 client connections."""

    @property
    def rate(self) -> int: ...
    @property
    def connections(self) -> int: ...
    @property
    def fixed_s(self) -> float: ...
    @property
    def warmup_s(self) -> float: ...


def timed_load(supervisor: Supervisor, plan: RatePlan, port: int) -> dict[str, Any]:
    """``plan``'s fixed-rate load on ``port``, from CPU LOAD_CPU: latency from the intended
    send time (raises ``loadgen.LoadFailed``)."""
    return fixed_rate(
        supervisor,
        port=port,
        rate=plan.rate,
        seconds=plan.fixed_s,
        warmup=plan.warmup_s,
        connections=plan.connections,
        cpu=LOAD_CPU,
    )


def placement(load_side: str, server_side: str) -> str:
    """Which processes run on which benchmark CPU, for the results."""
    return f"{load_side} on CPU {LOAD_CPU}; {server_side} on CPU {SERVER_CPU} (taskset -c)"


def record(path: Path, title: str, about: str, results: dict[str, Any], table: str) -> None:
    """Write the ``title`` section of ``path`` (RESULTS.md), replacing the previous one: how
    and where the run was made, then ``table``."""
    meta = results["meta"]
    m = meta["machine"]
    when = datetime.datetime.fromisoformat(meta["started"]).strftime("%Y-%m-%d %H:%M UTC")
    tools = "; ".join(t for t in (f"nginx {m['nginx']}", m.get("openssl"), m["wrk"]) if t)
    section = (
        f"{title}\n\n"
        f"Written by `python bench/{meta['script']}.py --record` ({meta['mode']} run, {when}, "
        f"{meta['seconds']:.0f} s); {about}.\n\n"
        f"- machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}; Python {m['python']} "
        f"(uvloop {m['uvloop']}, httptools {m['httptools']}); {tools}\n"
        f"- meshlet: `{m['git']}`\n"
        f"- command: `{meta['command']}`\n"
        f"- placement: {meta['placement']}\n"
        f"- load average (1 min) before / after: {meta['loadavg'][0]:.2f} / "
        f"{meta['loadavg'][1]:.2f}\n\n" + table
    )
    report.replace_section(path, title, section)


Part = Callable[[Supervisor], Any]


class Run:
    """One run of a benchmark script: started when made, ``run_parts`` then ``finish``."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name = name
        self.args = args
        self.mode = "quick" if args.quick else "full"
        self.out: Path = args.out.resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.started = datetime.datetime.now(datetime.UTC)
        self.clock = time.perf_counter()
        self.loadavg = os.getloadavg()[0]
        self.command = f"python bench/{name}.py" + "".join(
            f" {shlex.quote(a)}" for a in sys.argv[1:]
        )
        self.interrupted = False

    def run_parts(self, parts: Sequence[tuple[str, Part]], budget_s: float) -> dict[str, Any]:
        """Each part's result under its name, or its failure under ``failed_parts``; a part
        that would start after ``budget_s`` is not run. SIGTERM stops the run like Ctrl-C."""

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, on_sigterm)
        results: dict[str, Any] = {"failed_parts": {}}
        try:
            with Supervisor() as supervisor:
                for name, part in parts:
                    if time.perf_counter() - self.clock > budget_s:
                        results["failed_parts"][name] = "the time budget was spent"
                        continue
                    try:
                        results[name] = part(supervisor)
                    except (BenchError, ArmUnavailable) as exc:
                        results["failed_parts"][name] = str(exc)
                        say(f"{name}: {exc}")
                    supervisor.stop_all()
        except KeyboardInterrupt:
            self.interrupted = True
            say("interrupted: stopped every process this run started")
        return results

    def finish(
        self,
        results: dict[str, Any],
        *,
        meta: dict[str, Any],
        markdown: Callable[[dict[str, Any]], str],
        section: tuple[str, str],
        machine: dict[str, Any] | None = None,
        recordable: bool = True,
    ) -> None:
        """Add the run's metadata (``meta`` adds the script's own: plan, placement), write
        ``OUT/<name>.json`` and print the Markdown. With ``--record``, an uninterrupted run
        that is ``recordable`` replaces ``section`` (its title, and what says what is measured)
        in RESULTS.md."""
        results["meta"] = {
            "script": self.name,
            "started": self.started.isoformat(),
            "seconds": round(time.perf_counter() - self.clock, 1),
            "mode": self.mode,
            "interrupted": self.interrupted,
            "command": self.command,
            "machine": machine or report.machine(),
            **meta,
            "loadavg": [self.loadavg, os.getloadavg()[0]],
        }
        path = self.out / f"{self.name}.json"
        path.write_text(json.dumps(results, indent=2) + "\n")
        table = markdown(results)
        print(table)
        say(f"results: {path} ({results['meta']['seconds']:.0f} s)")
        if self.args.record and not self.interrupted and recordable:
            title, about = section
            record(RESULTS, title, about, results, table)
            say(f"recorded in {RESULTS}")
