"""The telemetry benchmark (issue 6): what metrics, access logs and tracing cost the proxy.

    python bench/telemetry.py            # full run: about 4 minutes, never more than 5
    python bench/telemetry.py --quick    # smoke run: about 1 minute
    python bench/telemetry.py --record   # ... and write the "Telemetry" section of RESULTS.md

One ``meshlet proxy`` worker (CPU 0) with five outbound listeners, all routing to the same
nginx upstream (one worker, ``return 200`` with 1 KiB, CPU 0), that differ only in telemetry:

- ``off``: the ``istio.stats`` filter drops every metric; no access log, no tracing;
- ``metrics``: Istio's standard metrics (``istio.metadata_exchange`` and ``istio.stats``, as
  the control plane configures a sidecar);
- ``metrics+logs``: and a file access log in Istio's default text format;
- ``tracing 1%``: and OpenTelemetry tracing, 1% random sampling (Istio's mesh default);
- ``tracing 100%``: the same at 100% (the demo's setting).

Spans go over OTLP/HTTP to ``bench/otlp_sink.py`` (CPU 1, it only counts). In each round every
arm gets, in rotating order, wrk at saturation (``-t1 -c50``, throughput) and bench/openloop.py
at a fixed 1,000 req/s over 16 connections (latency from the intended send time, and the
proxy's CPU per request from /proc). The load generators run on CPU 1.

Ports: free ports of 19800-19899 (checked before use). Output: ``OUT/telemetry.json``.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import harness
import security
from arms import HOST, check_serving, http_get, start_upstream
from harness import LOAD_CPU, SERVER_CPU, BenchError, Ports, say
from loadgen import LoadFailed, saturate
from processes import Supervisor, wait_until
from security import HCM, ROUTER, Window

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"

TYPED_STRUCT = "type.googleapis.com/xds.type.v3.TypedStruct"
OTEL = "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig"
FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
ARMS = ("off", "metrics", "metrics+logs", "tracing 1%", "tracing 100%")


@dataclass(frozen=True, kw_only=True)
class Plan:
    rounds: int
    rate: int = 1000
    connections: int = 16
    fixed_s: float
    warmup_s: float
    saturation_s: int
    wrk_connections: int = 50


FULL = Plan(rounds=3, fixed_s=8, warmup_s=1, saturation_s=5)
QUICK = Plan(rounds=1, fixed_s=4, warmup_s=0.5, saturation_s=3)
BUDGET_S = {"full": 290.0, "quick": 80.0}
PORTS = range(19800, 19900)


def _filter(name: str, type_url: str, value: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "typed_config": {"@type": TYPED_STRUCT, "type_url": type_url, "value": value},
    }


def _hcm(arm: str, otlp_port: int, log: Path) -> dict[str, Any]:
    """The outbound HCM of one arm, shaped as the control plane shapes a sidecar's."""
    exchange = _filter(
        "istio.metadata_exchange", "type.googleapis.com/io.istio.http.peer_metadata.Config", {}
    )
    stats_config: dict[str, Any] = {}
    if arm == "off":
        stats_config = {"metrics": [{"name": "", "drop": True}]}
    stats = _filter("istio.stats", "type.googleapis.com/stats.PluginConfig", stats_config)
    router = {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}
    hcm: dict[str, Any] = {
        "@type": HCM,
        "stat_prefix": "outbound_0.0.0.0_80",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "route": {"cluster": "outbound|80||upstream.bench.svc.cluster.local"},
                        }
                    ],
                }
            ]
        },
        "http_filters": ([stats, router] if arm == "off" else [exchange, stats, router]),
    }
    if arm in ("metrics+logs", "tracing 1%", "tracing 100%"):
        hcm["access_log"] = [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {"@type": FILE_LOG, "path": str(log)},
            }
        ]
    if arm.startswith("tracing"):
        hcm["tracing"] = {
            "random_sampling": {"value": 1.0 if arm == "tracing 1%" else 100.0},
            "provider": {
                "name": "envoy.tracers.opentelemetry",
                "typed_config": {
                    "@type": OTEL,
                    "service_name": "client.bench",
                    "http_service": {
                        "http_uri": {
                            "uri": f"http://{HOST}:{otlp_port}/v1/traces",
                            "cluster": "otlp",
                            "timeout": "2s",
                        }
                    },
                },
            },
        }
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}


def proxy_config(ports: dict[str, int], out: Path) -> dict[str, Any]:
    cluster = "outbound|80||upstream.bench.svc.cluster.local"
    listeners = [
        {
            "name": f"arm-{i}",
            "address": security._addr(ports[arm]),
            "traffic_direction": "OUTBOUND",
            "filter_chains": [
                {"filters": [_hcm(arm, ports["otlp"], out / f"telemetry-access-{i}.log")]}
            ],
        }
        for i, arm in enumerate(ARMS)
    ]
    return {
        "node": {
            "id": "sidecar~127.0.0.1~client-1.bench~bench.svc.cluster.local",
            "metadata": {
                "NAMESPACE": "bench",
                "WORKLOAD_NAME": "client",
                "SERVICE_ACCOUNT": "client",
                "LABELS": {"app": "client", "version": "v1"},
            },
        },
        "admin": {"address": security._addr(ports["admin"])},
        "static_resources": {
            "listeners": listeners,
            "clusters": [
                security._cluster(cluster, ports["upstream"]),
                security._cluster("otlp", ports["otlp"]),
            ],
        },
    }


def spans_received(port: int) -> int:
    """How many spans the sink has counted so far."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/count", timeout=2.0) as response:
        return int(json.loads(response.read())["spans"])


def measure(supervisor: Supervisor, plan: Plan, ports: Ports, out: Path) -> dict[str, Any]:
    p = {name: ports.take(name) for name in ("upstream", "admin", "otlp", *ARMS)}
    prefix = out / "telemetry-nginx-upstream"
    upstream = start_upstream(supervisor, prefix=prefix, cpu=SERVER_CPU, port=p["upstream"])
    sink = supervisor.spawn(
        "otlp-sink",
        [sys.executable, str(BENCH / "otlp_sink.py"), str(p["otlp"])],
        cpu=LOAD_CPU,
        log=out / "telemetry-otlp-sink.log",
        cwd=REPO,
    )
    if not wait_until(lambda: http_get(p["otlp"], "/count")[0] == 200, 10.0, 0.01):
        raise BenchError("the OTLP sink did not start")
    proxy, ready_ms = security.start_proxy(supervisor, "telemetry-proxy", proxy_config(p, out), out)
    check_serving({arm: p[arm] for arm in ARMS})
    time.sleep(1.2)  # the check requests' spans are exported before any arm is counted
    processes = {"proxy": proxy, "upstream": upstream}
    runs: list[dict[str, Any]] = []
    for number in range(plan.rounds):
        shift = number % len(ARMS)
        for arm in ARMS[shift:] + ARMS[:shift]:
            port = p[arm]
            try:
                spans_before = spans_received(p["otlp"])
                window = Window(processes)
                sat = saturate(
                    supervisor,
                    port=port,
                    seconds=plan.saturation_s,
                    connections=plan.wrk_connections,
                    cpu=LOAD_CPU,
                )
                sat_facts = window.close()
                window = Window(processes)
                fixed = harness.timed_load(supervisor, plan, port)
                facts = window.close()
                time.sleep(1.2)  # the exporter flushes every second
                spans = spans_received(p["otlp"]) - spans_before
            except LoadFailed as exc:
                runs.append({"round": number, "arm": arm, "error": str(exc)})
                say(f"[round {number + 1}] {arm}: {exc}")
                continue
            if not proxy.alive():
                raise BenchError("the proxy exited during the run")
            requests = sat["total_completed"] + fixed["total_completed"]
            run = {
                "round": number,
                "arm": arm,
                "saturation_rps": round(sat["rps"], 1),
                "saturation_errors": sat["errors_total"],
                "saturation_proxy_cpu_s": sat_facts["cpu_s"]["proxy"],
                "saturation_requests": sat["total_completed"],
                "fixed": fixed,
                "fixed_proxy_cpu_s": facts["cpu_s"]["proxy"],
                "other_share": facts["server_core_other_share"],
                "spans": spans,
                "requests": requests,
            }
            runs.append(run)
            lat = fixed["latency_us"]
            say(
                f"[round {number + 1}] {arm:13} {sat['rps']:7.0f} req/s max  "
                f"p50 {lat['p50'] / 1000:.3f} ms  p99 {lat['p99'] / 1000:.3f} ms @ {plan.rate}/s  "
                f"proxy {1e6 * facts['cpu_s']['proxy'] / max(1, fixed['total_completed']):.0f} "
                f"µs/req  spans {spans}"
            )
    rss = proxy.rss_kib()[0]
    for spawned in (proxy, upstream, sink):
        supervisor.forget(spawned)
    return {"ports": p, "start_to_ready_ms": round(ready_ms, 1), "rss_kib": rss, "runs": runs}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    summary: dict[str, Any] = {}
    for arm in ARMS:
        mine = [r for r in ok if r["arm"] == arm]
        if not mine:
            continue
        timed = security._quiet([r | {"server_core_other_share": r["other_share"]} for r in mine])
        lat = {
            q: security._med([r["fixed"]["latency_us"][q] for r in timed]) for q in ("p50", "p99")
        }
        cpu = security._med(
            [
                1e6 * r["fixed_proxy_cpu_s"] / r["fixed"]["total_completed"]
                for r in mine
                if r["fixed"]["total_completed"]
            ]
        )
        summary[arm] = {
            "rounds": len(mine),
            "saturation_rps": security._med([r["saturation_rps"] for r in mine]),
            "p50_ms": round(lat["p50"] / 1000, 3) if lat["p50"] is not None else None,
            "p99_ms": round(lat["p99"] / 1000, 3) if lat["p99"] is not None else None,
            "proxy_cpu_us_per_req": round(cpu, 1) if cpu is not None else None,
            "errors": sum(r["saturation_errors"] + r["fixed"]["errors_total"] for r in mine),
            "spans_per_request": round(
                sum(r["spans"] for r in mine) / max(1, sum(r["requests"] for r in mine)), 4
            ),
        }
    base = summary.get("off")
    if base:
        for row in summary.values():
            for key in ("saturation_rps", "proxy_cpu_us_per_req"):
                if row.get(key) is not None and base.get(key):
                    row[f"{key}_vs_off"] = round(row[key] / base[key], 3)
    return summary


def markdown(results: dict[str, Any]) -> str:
    fmt = security._fmt
    summary = results.get("summary", {})
    rows = [
        [
            arm,
            fmt(row["saturation_rps"], 0),
            fmt(row.get("saturation_rps_vs_off"), 2, "x"),
            fmt(row["p50_ms"], 3),
            fmt(row["p99_ms"], 3),
            fmt(row["proxy_cpu_us_per_req"], 1),
            fmt(row.get("proxy_cpu_us_per_req_vs_off"), 2, "x"),
            fmt(row["spans_per_request"], 3),
            str(row["errors"]),
        ]
        for arm, row in summary.items()
    ]
    header = [
        "arm",
        "max req/s (wrk)",
        "vs off",
        f"p50 ms @ {results['meta']['plan']['rate']}/s",
        "p99 ms",
        "proxy CPU µs/req",
        "vs off",
        "spans/req",
        "errors",
    ]
    parts = [security._table(header, rows)]
    failed = results.get("failed_parts") or {}
    if failed:
        parts.append("Parts that did not run: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    return "\n\n".join(parts) + "\n"


SECTION = ("## Telemetry", "the module's docstring says what is measured")


def main(argv: list[str] | None = None) -> int:
    args = harness.parse_args(__doc__, argv)
    plan = QUICK if args.quick else FULL
    harness.require(("wrk", "taskset"))
    run = harness.Run("telemetry", args)
    say(f"meshlet telemetry benchmark ({run.mode}): {', '.join(ARMS)}")
    results = run.run_parts(
        (("measured", lambda s: measure(s, plan, Ports(PORTS), run.out)),), BUDGET_S[run.mode]
    )
    if "measured" in results:
        results["summary"] = summarize(results["measured"]["runs"])
    run.finish(
        results,
        meta={
            "plan": asdict(plan),
            "placement": harness.placement(
                "load generators and the OTLP sink", "the proxy and the upstream"
            ),
        },
        markdown=markdown,
        section=SECTION,
        recordable="summary" in results,
    )
    return 1 if results["failed_parts"] else 0


if __name__ == "__main__":
    sys.exit(main())
