"""Turns the runs of a benchmark into a summary, Markdown tables, and a RESULTS.md section.

Every figure in the summary is the median over rounds of that arm and load, except errors
(summed) and RSS (the largest seen). Added latency is computed per round (arm p50 minus direct
p50 at the same rate in the same round) and then its median is taken, so that a round that was
slow for everyone does not count against one arm.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Run = dict[str, Any]
PERCENTILES = ("p50", "p90", "p99", "p99.9")
MIB = 1024.0
OTHER_LIMIT = 0.05  # share of a benchmark CPU other processes may take before we warn


@dataclass(frozen=True, kw_only=True, slots=True)
class Target:
    """One goal from the issue, checked against the meshlet arm."""

    name: str
    goal: str
    check: Callable[[float], bool]
    digits: int = 2  # decimals shown in the table


TARGETS = {
    "throughput_ratio": Target(
        name="throughput at saturation, x nginx", goal="≥ 0.5 (aim 0.8)", check=lambda v: v >= 0.5
    ),
    "cpu_ratio": Target(name="CPU per request, x nginx", goal="≤ 1.5", check=lambda v: v <= 1.5),
    "added_p50_ms": Target(
        name="added p50 latency vs direct, ms", goal="≤ 0.3", check=lambda v: v <= 0.3, digits=3
    ),
    "rss_mib": Target(name="RSS per worker, MiB", goal="≤ 40", check=lambda v: v <= 40, digits=1),
    "start_to_ready_ms": Target(
        name="start to /ready, ms", goal="≤ 300", check=lambda v: v <= 300, digits=0
    ),
    "errors": Target(name="errors, all loads", goal="0", check=lambda v: v == 0, digits=0),
}


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def load_order(names: Iterable[str]) -> list[str]:
    """Loads in the order they are run: saturation first, then the rates ascending."""

    def key(name: str) -> tuple[int, int]:
        return (0, 0) if name == "saturation" else (1, int(name.removeprefix("rate-")))

    return sorted(set(names), key=key)


def summarize(runs: list[Run], arms: list[str], starts: dict[str, list[float]]) -> dict[str, Any]:
    """Medians per arm and load, ratios vs nginx, added latency vs direct, target verdicts."""
    ok = [run for run in runs if "error" not in run]
    direct_p50 = {
        (run["round"], run["load"]): run["latency_us"].get("p50")
        for run in ok
        if run["arm"] == "direct" and run.get("latency_us")
    }
    summary: dict[str, Any] = {}
    for arm in arms:
        per_load: dict[str, Any] = {}
        for load in load_order(run["load"] for run in runs):
            mine = [run for run in ok if run["arm"] == arm and run["load"] == load]
            if not mine:
                continue
            row: dict[str, Any] = {
                "rounds": len(mine),
                "rps": _median(run["rps"] for run in mine),
                "errors_total": sum(run["errors_total"] for run in mine),
                "proxy_cpu_us_per_req": _median(run["proxy_cpu_us_per_req"] for run in mine),
                "upstream_cpu_us_per_req": _median(run["upstream_cpu_us_per_req"] for run in mine),
                "core_busy": {
                    core: _median(run["core_busy"][core] for run in mine)
                    for core in mine[0]["core_busy"]
                },
                "core_other_share_max": {
                    core: max(run["core_other_share"][core] for run in mine)
                    for core in mine[0]["core_other_share"]
                },
                "proxy_rss_mib": max(
                    (run["proxy_rss_kib"] / MIB for run in mine if run["proxy_rss_kib"]),
                    default=None,
                ),
            }
            if mine[0].get("latency_us") is not None:
                row["latency_ms"] = {
                    p: _ms(_median(run["latency_us"].get(p) for run in mine)) for p in PERCENTILES
                }
                added = [
                    run["latency_us"]["p50"] - direct_p50[run["round"], load]
                    for run in mine
                    if direct_p50.get((run["round"], load)) is not None
                    and run["latency_us"].get("p50") is not None
                ]
                row["added_p50_ms"] = _ms(_median(added))
            per_load[load] = row
        summary[arm] = {"loads": per_load}
        if starts.get(arm):
            summary[arm]["start_to_ready_ms"] = _median(starts[arm])
            summary[arm]["start_to_ready_max_ms"] = max(starts[arm])
    _add_ratios(summary)
    return summary


def _ms(us: float | None) -> float | None:
    return None if us is None else round(us / 1000, 3)


def _add_ratios(summary: dict[str, Any]) -> None:
    nginx = summary.get("nginx", {}).get("loads", {})
    for arm in summary.values():
        for load, row in arm["loads"].items():
            base = nginx.get(load)
            row["rps_x_nginx"] = _ratio(row["rps"], base and base["rps"])
            row["cpu_x_nginx"] = _ratio(
                row["proxy_cpu_us_per_req"], base and base["proxy_cpu_us_per_req"]
            )


def _ratio(value: float | None, base: float | None) -> float | None:
    return round(value / base, 3) if value is not None and base else None


def verdicts(summary: dict[str, Any], arm: str = "meshlet") -> list[dict[str, Any]]:
    """The issue's targets, each with the arm's value, nginx's for reference, and pass/FAIL."""
    rows = []
    loads = summary.get(arm, {}).get("loads", {})
    nginx = summary.get("nginx", {})

    def add(key: str, label: str, value: float | None, reference: float | None) -> None:
        target = TARGETS[key]
        verdict = "n/a" if value is None else "pass" if target.check(value) else "FAIL"
        rows.append(
            {
                "target": f"{target.name}{label}",
                "value": value,
                "nginx": reference,
                "goal": target.goal,
                "verdict": verdict,
                "digits": target.digits,
            }
        )

    def get(load: str, field: str) -> float | None:
        value = loads.get(load, {}).get(field)
        return value if isinstance(value, int | float) else None

    def ref(load: str, field: str) -> float | None:
        value = nginx.get("loads", {}).get(load, {}).get(field)
        return value if isinstance(value, int | float) else None

    rates = [load for load in _loads_in(summary) if load != "saturation"]
    add("throughput_ratio", "", get("saturation", "rps_x_nginx"), 1.0)
    for load in [*rates, "saturation"]:
        add("cpu_ratio", f" ({load})", get(load, "cpu_x_nginx"), 1.0)
    for load in rates:
        add("added_p50_ms", f" ({load})", get(load, "added_p50_ms"), ref(load, "added_p50_ms"))
    rss = [row.get("proxy_rss_mib") for row in loads.values() if row.get("proxy_rss_mib")]
    nginx_rss = [
        row.get("proxy_rss_mib")
        for row in nginx.get("loads", {}).values()
        if row.get("proxy_rss_mib")
    ]
    add("rss_mib", "", round(max(rss), 1) if rss else None, max(nginx_rss) if nginx_rss else None)
    add("start_to_ready_ms", "", summary.get(arm, {}).get("start_to_ready_ms"), None)
    errors = [row["errors_total"] for row in loads.values()]
    nginx_errors = [row["errors_total"] for row in nginx.get("loads", {}).values()]
    add("errors", "", sum(errors) if errors else None, sum(nginx_errors) if nginx_errors else None)
    return rows


def _loads_in(summary: dict[str, Any]) -> list[str]:
    return load_order(load for arm in summary.values() for load in arm["loads"])


# -- Markdown -----------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}{suffix}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    """The tables of a results.json document, as printed and as recorded."""
    summary, meta = results["summary"], results["meta"]
    plan = meta["plan"]
    arms = [arm for arm in meta["arms"] if arm in summary and summary[arm]["loads"]]
    parts = []
    sat_rows = []
    for arm in arms:
        row = summary[arm]["loads"].get("saturation")
        if row is None:
            continue
        busy = row["core_busy"]
        sat_rows.append(
            [
                arm,
                _fmt(row["rps"], 0),
                _fmt(row["rps_x_nginx"], 2, "x"),
                str(row["errors_total"]),
                _fmt(row["proxy_cpu_us_per_req"], 2),
                _fmt(row["cpu_x_nginx"], 2, "x"),
                _fmt(row["upstream_cpu_us_per_req"], 2),
                " / ".join(_fmt(100 * v, 0, "%") for v in busy.values()),
                _fmt(row["proxy_rss_mib"], 1),
            ]
        )
    if sat_rows:
        parts.append(
            f"**Saturation** — `wrk -t1 -c{plan['wrk_connections']} "
            f"-d{plan['saturation_s']}s`, keep-alive; medians of {plan['rounds_run']} round(s)\n\n"
            + _table(
                [
                    "arm",
                    "req/s",
                    "x nginx",
                    "errors",
                    "proxy CPU µs/req",
                    "x nginx",
                    "upstream CPU µs/req",
                    "busy CPU " + " / ".join(meta["placement"]["cores"]),
                    "proxy RSS MiB",
                ],
                sat_rows,
            )
        )
    rate_rows = []
    for load in _loads_in(summary):
        if load == "saturation":
            continue
        for arm in arms:
            row = summary[arm]["loads"].get(load)
            if row is None:
                continue
            lat = row["latency_ms"]
            rate_rows.append(
                [
                    arm,
                    load.removeprefix("rate-"),
                    _fmt(row["rps"], 0),
                    str(row["errors_total"]),
                    *(_fmt(lat[p], 3) for p in PERCENTILES),
                    _fmt(row["added_p50_ms"], 3) if arm != "direct" else "—",
                    _fmt(row["proxy_cpu_us_per_req"], 2),
                    _fmt(row["cpu_x_nginx"], 2, "x"),
                    _fmt(row["upstream_cpu_us_per_req"], 2),
                ]
            )
    if rate_rows:
        parts.append(
            f"**Fixed rates** — `bench/openloop.py`, {plan['openloop_connections']} keep-alive "
            f"connections, {plan['fixed_s']}s after {plan['warmup_s']}s warm-up, latency from "
            f"the intended send time; medians of {plan['rounds_run']} round(s)\n\n"
            + _table(
                [
                    "arm",
                    "rate",
                    "achieved req/s",
                    "errors",
                    "p50 ms",
                    "p90 ms",
                    "p99 ms",
                    "p99.9 ms",
                    "added p50 ms",
                    "proxy CPU µs/req",
                    "x nginx",
                    "upstream CPU µs/req",
                ],
                rate_rows,
            )
        )
    meshlet = meta["arms"].get("meshlet")
    if meshlet is not None:
        if meshlet.get("available"):
            target_rows = [
                [
                    row["target"],
                    _fmt(row["value"], row["digits"]),
                    _fmt(row["nginx"], row["digits"]),
                    row["goal"],
                    row["verdict"],
                ]
                for row in results["targets"]
            ]
            parts.append(
                "**Targets** (meshlet; nginx for reference)\n\n"
                + _table(["target", "meshlet", "nginx", "goal", "verdict"], target_rows)
            )
        else:
            parts.append(f"**meshlet: not available** — {meshlet.get('reason', 'unknown')}")
    if quiet := _quietness(results["runs"]):
        parts.append(quiet)
    for arm, facts in meta["arms"].items():
        if arm != "meshlet" and not facts.get("available"):
            parts.append(f"**{arm}: not available** — {facts.get('reason', 'unknown')}")
    return "\n\n".join(parts) + "\n"


def _quietness(runs: list[Run]) -> str:
    """A warning when other processes took a noticeable share of a benchmark CPU."""
    measured = [run for run in runs if "core_other_share" in run]
    noisy = [run for run in measured if max(run["core_other_share"].values()) > OTHER_LIMIT]
    if not noisy:
        return ""
    worst = max(noisy, key=lambda run: max(run["core_other_share"].values()))
    core, share = max(worst["core_other_share"].items(), key=lambda item: item[1])
    return (
        f"**The machine was not quiet**: other processes took more than "
        f"{100 * OTHER_LIMIT:.0f}% of a benchmark CPU in {len(noisy)} of {len(measured)} runs "
        f"(up to {100 * share:.0f}% of CPU {core}, {worst['arm']} {worst['load']} in round "
        f"{worst['round'] + 1}). Latency tails and throughput suffer first; CPU per request "
        f"holds up best. Rerun on an idle machine for numbers worth recording."
    )


# -- the machine, and RESULTS.md ----------------------------------------------------------


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return "not found"
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    versions = {}
    for module in ("uvloop", "httptools"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = "not installed"
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": _first_line(["/usr/sbin/nginx", "-v"]).removeprefix("nginx version: "),
        "wrk": _first_line(["wrk", "-v"]).split(" [")[0],
        **versions,
        "git": _first_line(["git", "describe", "--always", "--dirty"]),
    }


def ram_gib() -> float:
    """The machine's memory (``MemTotal``), in GiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024 / 1024
    return 0.0


def replace_section(path: Path, title: str, section: str) -> None:
    """Write ``section`` (starting with the ``title`` line, e.g. ``## Demo mesh``) into the
    results file, in place of an earlier section of that title, else at the end."""
    text = path.read_text() if path.exists() else RESULTS_HEADER
    start = text.find(f"\n{title}\n")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + (text[end:] if end >= 0 else "")
    path.write_text(text.rstrip("\n") + "\n\n" + section)


RESULTS_HEADER = """\
# meshlet benchmark results

Sections are appended by `python bench/run.py --record`; bench/README.md says what is measured
and how to read it. Compare medians and CPU per request; p99 on these shared VMs swings widely.
"""


def record(path: Path, results: dict[str, Any]) -> None:
    """Appends a dated section with the machine, the command and the tables to ``path``."""
    meta = results["meta"]
    m = meta["machine"]
    when = datetime.datetime.fromisoformat(meta["started"]).strftime("%Y-%m-%d %H:%M UTC")
    placement = meta["placement"]
    section = (
        f"\n## {when} — {meta['mode']} run, {meta['plan']['rounds_run']} round(s)\n\n"
        f"- machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}; Python {m['python']}"
        f" (uvloop {m['uvloop']}, httptools {m['httptools']}); nginx {m['nginx']}; {m['wrk']}\n"
        f"- meshlet: `{m['git']}`\n"
        f"- command: `{meta['command']}`\n"
        f"- placement: {placement['description']}\n\n" + markdown(results)
    )
    if not path.exists():
        path.write_text(RESULTS_HEADER)
    with path.open("a") as file:
        file.write(section)
