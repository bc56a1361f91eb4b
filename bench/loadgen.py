"""The two loads: wrk at saturation (closed loop) and bench/openloop.py at fixed rates.

Both run as their own process pinned to the load generator's CPU and return a plain dict.
``total_completed`` is every response the load received, warm-up included: the runner
divides the servers' CPU time by it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from arms import HOST
from processes import Supervisor

BENCH = Path(__file__).resolve().parent


class LoadFailed(Exception):
    """The load generator did not produce a result; the message says why."""


def saturate(
    supervisor: Supervisor, *, port: int, seconds: int, connections: int, cpu: int
) -> dict[str, Any]:
    """``wrk -t1 -cN -dS`` with keep-alive: the most requests per second the arm gives."""
    argv = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "-s",
        str(BENCH / "wrk-report.lua"),
        f"http://{HOST}:{port}/",
    ]
    code, out, err = supervisor.run("wrk", argv, cpu=cpu, timeout=seconds + 30)
    lines = [line for line in out.splitlines() if line.startswith("WRK_JSON ")]
    if code != 0 or not lines:
        raise LoadFailed(f"wrk exited with code {code}: {(err or out).strip()[-300:]}")
    totals = json.loads(lines[-1].removeprefix("WRK_JSON "))
    seconds_run = totals["duration_us"] / 1e6
    return {
        "command": " ".join(["wrk", *argv[1:4], argv[-1]]),
        "rps": totals["requests"] / seconds_run,
        "duration_s": round(seconds_run, 3),
        "errors": totals["errors"],
        "errors_total": sum(totals["errors"].values()),
        "total_completed": totals["requests"],
    }


def fixed_rate(
    supervisor: Supervisor,
    *,
    port: int,
    rate: int,
    seconds: float,
    warmup: float,
    connections: int,
    cpu: int,
) -> dict[str, Any]:
    """bench/openloop.py at ``rate`` requests per second: latency without coordinated omission."""
    argv = [
        sys.executable,
        str(BENCH / "openloop.py"),
        f"http://{HOST}:{port}/",
        f"--rate={rate}",
        f"--duration={seconds:g}",
        f"--warmup={warmup:g}",
        f"--connections={connections}",
        "--json",
    ]
    code, out, err = supervisor.run("openloop", argv, cpu=cpu, timeout=seconds + warmup + 30)
    if code != 0:
        raise LoadFailed(f"openloop exited with code {code}: {(err or out).strip()[-300:]}")
    report: dict[str, Any] = json.loads(out)
    return report
