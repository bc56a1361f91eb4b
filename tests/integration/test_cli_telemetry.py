"""``meshlet stat``, ``top``, ``dashboard`` and ``prometheus-config`` as a user runs them, against
a stand-in for the mesh's dashboard API (CONTRACT §5: ``/api/summary``, ``/api/workloads``,
``/api/services``, ``/api/prometheus-targets``) found through ``.meshlet/mesh.json``, and
against a REAL Prometheus (Debian's package) that scrapes a stand-in sidecar serving Istio's
standard metrics, configured by ``meshlet prometheus-config`` itself.

The stand-in sidecar adds fixed increments at every scrape (9 responses 200 and 1 response
503, all mutual TLS, all between 1 and 5 ms), so what PromQL derives from them is exact
whatever the timing: success 90%, p50 = 1 + 4 * 0.5 = 3 ms by Prometheus's linear
interpolation inside the (1, 5] bucket (prometheus.io/docs/prometheus/latest/querying/
functions/#histogram_quantile), p99 = 4.96 ms, mTLS 100%.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ports import free_port
from tests.prometheus import PACKAGE, poll, running_prometheus

MESHLET = [sys.executable, "-m", "meshlet.cli.main"]


def _row(namespace: str, name: str, rps: float, **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "namespace": namespace,
        "name": name,
        "app": name.rsplit("-", 1)[0],
        "version": "v1",
        "rps": rps,
        "success_rate": None,
        "p50_ms": None,
        "p90_ms": None,
        "p99_ms": None,
        "requests": rps * 60,
        "outbound_rps": 0.0,
        "mtls_ratio": None,
    }
    return row | extra


WORKLOADS = [
    _row("default", "productpage-v1", 2.0, success_rate=1.0, p50_ms=12.0, p99_ms=48.0),
    _row("default", "reviews-v2", 0.67, success_rate=0.5, p50_ms=3.0, p99_ms=9.0),
    _row("default", "details-v1", 2.0, success_rate=1.0, p50_ms=1.2, p99_ms=4.0),
    _row("istio-system", "istio-ingressgateway", 0.0, outbound_rps=2.0),
]
SERVICES = [_row("default", "productpage", 2.0, success_rate=1.0, p50_ms=12.0, p99_ms=48.0)]


# -- stand-ins ------------------------------------------------------------------------------------


def _destination(code: str) -> str:
    return (
        'reporter="destination",source_workload="productpage-v1",'
        'source_workload_namespace="default",destination_workload="reviews-v1",'
        'destination_workload_namespace="default",destination_app="reviews",'
        'destination_version="v1",destination_service="reviews.default.svc.cluster.local",'
        'destination_service_name="reviews",destination_service_namespace="default",'
        f'request_protocol="http",response_code="{code}",response_flags="-",'
        'connection_security_policy="mutual_tls"'
    )


_GATEWAY = (
    'reporter="source",source_workload="istio-ingressgateway",'
    'source_workload_namespace="istio-system",destination_workload="productpage-v1",'
    'destination_workload_namespace="default",destination_service_name="productpage",'
    'destination_service_namespace="default",response_code="200",'
    'connection_security_policy="unknown"'
)
#: Envoy's default histogram buckets (the proxy's, meshlet.proxy.telemetry.stats).
_BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)


@dataclass
class StandIn:
    """The dashboard API and one sidecar's ``/stats/prometheus``, on one loopback port."""

    url: str = ""
    scrapes: int = 0
    windows: list[str] = field(default_factory=list)

    def metrics(self) -> str:
        """Istio's standard metrics after ``scrapes`` scrapes (each adds 10 requests)."""
        n = self.scrapes
        lines = ["# TYPE istio_requests_total counter"]
        lines.append(f"istio_requests_total{{{_destination('200')}}} {9 * n}")
        lines.append(f"istio_requests_total{{{_destination('503')}}} {1 * n}")
        lines.append(f"istio_requests_total{{{_GATEWAY}}} {10 * n}")
        lines.append("# TYPE istio_request_duration_milliseconds histogram")
        for code, count in (("200", 9 * n), ("503", 1 * n)):
            labels = _destination(code)
            for le in _BUCKETS:
                lines.append(
                    f'istio_request_duration_milliseconds_bucket{{{labels},le="{le}"}}'
                    f" {count if le >= 5 else 0}"
                )
            lines.append(
                f'istio_request_duration_milliseconds_bucket{{{labels},le="+Inf"}} {count}'
            )
            lines.append(f"istio_request_duration_milliseconds_sum{{{labels}}} {3 * count}")
            lines.append(f"istio_request_duration_milliseconds_count{{{labels}}} {count}")
        return "\n".join(lines) + "\n"

    def answer(self, path: str) -> tuple[int, str, bytes]:
        url = urllib.parse.urlsplit(path)
        query = urllib.parse.parse_qs(url.query)
        body: Any
        if url.path == "/stats/prometheus":
            self.scrapes += 1
            return 200, "text/plain; version=0.0.4", self.metrics().encode()
        if url.path == "/api/summary":
            body = {"source": "embedded", "prometheus_url": None, "targets": 1}
        elif url.path in ("/api/workloads", "/api/services"):
            self.windows.append(query.get("window", [""])[0])
            rows = WORKLOADS if url.path == "/api/workloads" else SERVICES
            body = {"window_s": int(query.get("window", ["60"])[0]), "rows": rows}
        elif url.path == "/api/prometheus-targets":
            host = self.url.removeprefix("http://")
            labels = {"namespace": "default", "pod": "reviews-v1-x1", "workload": "reviews-v1"}
            body = [{"targets": [host], "labels": labels | {"app": "reviews", "version": "v1"}}]
        else:
            return 404, "application/json", b'{"error": "not found"}'
        return 200, "application/json", json.dumps(body).encode()


@pytest.fixture
def stand_in() -> Iterator[StandIn]:
    state = StandIn()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code, content_type, body = state.answer(self.path)
            self.send_response(code)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def home(tmp_path: Path, stand_in: StandIn) -> Path:
    """A directory whose ``.meshlet/mesh.json`` names the stand-in as the mesh's dashboard."""
    (tmp_path / ".meshlet").mkdir()
    (tmp_path / ".meshlet" / "mesh.json").write_text(
        json.dumps({"pid": os.getpid(), "api": "http://127.0.0.1:1", "dashboard": stand_in.url})
    )
    return tmp_path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy")}
    env["MESHLET_SERVER"] = f"http://127.0.0.1:{free_port()}"  # nothing there
    return env


def meshlet(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MESHLET, *args],
        cwd=cwd,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _names(table: str) -> list[str]:
    return [line.split()[0] for line in table.splitlines()[1:]]


# -- stat -----------------------------------------------------------------------------------------


def test_stat_lists_the_namespaces_workloads_busiest_first(home: Path, stand_in: StandIn) -> None:
    result = meshlet(home, "stat")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P99"]
    # Ties on rps are broken by name; the gateway is in istio-system, not in `default`.
    assert _names(result.stdout) == ["details-v1", "productpage-v1", "reviews-v2"]
    assert lines[3].split() == ["reviews-v2", "50.00%", "0.67rps", "3.0ms", "9.0ms"]
    assert stand_in.windows == ["60"]


def test_stat_all_namespaces_lists_the_sender_only_gateway_last(home: Path) -> None:
    result = meshlet(home, "stat", "deploy", "-A", "-o", "wide")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["NAMESPACE", "NAME"] and "OUTBOUND_RPS" in lines[0]
    assert lines[-1].split()[:2] == ["istio-system", "istio-ingressgateway"]
    assert "2.00rps" in lines[-1]


def test_stat_json_gives_rows_window_and_source(home: Path, stand_in: StandIn) -> None:
    result = meshlet(home, "stat", "--window", "5m", "-o", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["window_s"] == 300 and data["kind"] == "workload"
    assert data["source"] == f"embedded metrics via {stand_in.url}"
    assert [r["name"] for r in data["rows"]] == ["details-v1", "productpage-v1", "reviews-v2"]
    assert stand_in.windows == ["300"]
    as_yaml = yaml.safe_load(meshlet(home, "stat", "--window", "5m", "-o", "yaml").stdout)
    assert as_yaml == data


def test_stat_svc_reads_the_services(home: Path) -> None:
    result = meshlet(home, "stat", "svc")
    assert result.returncode == 0, result.stderr
    assert _names(result.stdout) == ["productpage"]


def test_stat_in_a_quiet_namespace_says_so(home: Path) -> None:
    result = meshlet(home, "stat", "-n", "nowhere")
    assert result.returncode == 0 and result.stdout == ""
    assert "No traffic to workloads in namespace nowhere in the last 1m" in result.stderr


@pytest.mark.parametrize(
    "command", [["stat"], ["top"], ["dashboard"], ["prometheus-config"]], ids=lambda c: c[0]
)
def test_without_a_running_mesh_each_command_says_how_to_start_one(
    tmp_path: Path, command: list[str]
) -> None:
    result = meshlet(tmp_path, *command)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "meshlet: no mesh running in .meshlet — start one with `meshlet up -f FILE` or"
        " `meshlet demo` (or pass --state-dir DIR of a running mesh)"
    )


def test_a_mesh_that_does_not_answer_is_reported_with_the_next_step(tmp_path: Path) -> None:
    state = tmp_path / "elsewhere"
    state.mkdir()
    dead = f"http://127.0.0.1:{free_port()}"
    (state / "mesh.json").write_text(json.dumps({"pid": 1, "dashboard": dead}))
    result = meshlet(tmp_path, "stat", "--state-dir", str(state))
    assert result.returncode == 1
    assert f"cannot reach the mesh's dashboard at {dead}/api/workloads?window=60" in result.stderr
    assert f"the mesh in {state} is not answering — see `meshlet status`" in result.stderr


def test_a_prometheus_that_does_not_answer_is_named(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    result = meshlet(tmp_path, "stat", "--prometheus", dead)
    assert result.returncode == 1
    assert f"cannot reach Prometheus at {dead} (" in result.stderr
    assert "check --prometheus URL" in result.stderr


def test_a_bad_window_is_refused_before_anything_is_asked(home: Path) -> None:
    result = meshlet(home, "stat", "--window", "soon")
    assert result.returncode == 1
    assert "--window 'soon' is not a duration" in result.stderr


# -- top ------------------------------------------------------------------------------------------


def test_top_redraws_the_table_with_its_window_and_source(home: Path, stand_in: StandIn) -> None:
    result = meshlet(home, "top", "-A", "--iterations", "3", "--interval", "0.05")
    assert result.returncode == 0, result.stderr
    screens = [s for s in result.stdout.split("Ctrl-C to quit") if s.strip()]
    assert len(screens) == 3
    title = screens[0].strip().splitlines()[0]
    assert "workloads in all namespaces, last 1m, by rps" in title
    assert f"source: embedded metrics via {stand_in.url}" in title
    assert "istio-ingressgateway" in screens[-1]
    assert stand_in.windows == ["60", "60", "60"]
    assert "\x1b[" not in result.stdout  # not a terminal: no escape codes


def test_top_ends_on_ctrl_c_with_exit_code_0(home: Path) -> None:
    process = subprocess.Popen(
        [*MESHLET, "top", "--interval", "0.2"],
        cwd=home,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:  # the first screen is drawn: top is in its loop
            if line.startswith("Ctrl-C to quit"):
                break
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0
        assert process.stderr is not None
        assert process.stderr.read() == ""  # no traceback, no message: a normal end
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# -- dashboard ------------------------------------------------------------------------------------


def test_dashboard_prints_the_running_meshs_url(home: Path, stand_in: StandIn) -> None:
    result = meshlet(home, "dashboard")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{stand_in.url}/\n"


def test_dashboard_open_hands_the_url_to_the_browser(home: Path, stand_in: StandIn) -> None:
    opened = home / "opened"
    browser = home / "browser"
    browser.write_text(f'#!/bin/sh\necho "$1" > {opened}\n')
    browser.chmod(browser.stat().st_mode | stat.S_IEXEC)
    env = _env() | {"BROWSER": f"{browser} %s"}  # Python's webbrowser honours $BROWSER
    result = meshlet(home, "dashboard", "--open", env=env)
    assert result.returncode == 0, result.stderr
    poll("the browser to be started", opened.exists, timeout=30, interval=0.1)
    assert opened.read_text().strip() == f"{stand_in.url}/"


# -- prometheus-config ----------------------------------------------------------------------------


def _promtool_check(config: Path) -> None:
    """Prometheus's own validation of a config file (``promtool check config``)."""
    promtool = "/usr/bin/promtool"
    if not os.access(promtool, os.X_OK):
        pytest.fail(f"promtool is not installed: install the Debian package `{PACKAGE}`")
    check = subprocess.run(
        [promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_prometheus_config_follows_the_dashboards_targets(home: Path, stand_in: StandIn) -> None:
    result = meshlet(home, "prometheus-config")
    assert result.returncode == 0, result.stderr
    (job,) = yaml.safe_load(result.stdout)["scrape_configs"]
    assert job["metrics_path"] == "/stats/prometheus"
    assert job["http_sd_configs"] == [
        {"url": f"{stand_in.url}/api/prometheus-targets", "refresh_interval": "5s"}
    ]
    (home / "prometheus.yml").write_text(result.stdout)
    _promtool_check(home / "prometheus.yml")


def test_prometheus_config_static_lists_todays_targets(home: Path, stand_in: StandIn) -> None:
    result = meshlet(home, "prometheus-config", "--static")
    assert result.returncode == 0, result.stderr
    (job,) = yaml.safe_load(result.stdout)["scrape_configs"]
    (group,) = job["static_configs"]
    assert group["targets"] == [stand_in.url.removeprefix("http://")]
    assert group["labels"]["workload"] == "reviews-v1"
    assert "# 1 proxies as of" in result.stdout
    (home / "prometheus.yml").write_text(result.stdout)
    _promtool_check(home / "prometheus.yml")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_stat_from_a_real_prometheus_scraping_with_the_generated_config(
    home: Path, stand_in: StandIn
) -> None:
    """A real Prometheus, configured by `meshlet prometheus-config`, finds the sidecar through
    the dashboard's HTTP service discovery and scrapes it; `meshlet stat --prometheus` then
    derives the golden metrics (see the module docstring for the exact numbers)."""
    config = meshlet(home, "prometheus-config")
    assert config.returncode == 0, config.stderr
    with running_prometheus(home / "prometheus", config.stdout) as prometheus:

        def rows() -> dict[str, dict[str, Any]] | None:
            result = meshlet(home, "stat", "-A", "--prometheus", prometheus.url, "-o", "json")
            assert result.returncode == 0, result.stderr
            found = {r["name"]: r for r in json.loads(result.stdout)["rows"]}
            ready = found.get("reviews-v1", {}).get("rps", 0) > 0
            return found if ready and "istio-ingressgateway" in found else None

        found = poll("a 1m rate of reviews-v1's requests (two scrapes)", rows, timeout=90)
        targets = prometheus.targets()
        assert [t["labels"]["workload"] for t in targets] == ["reviews-v1"]
        assert targets[0]["scrapeUrl"] == f"{stand_in.url}/stats/prometheus"

        reviews = found["reviews-v1"]
        assert (reviews["app"], reviews["version"]) == ("reviews", "v1")
        assert reviews["success_rate"] == pytest.approx(0.9)
        assert reviews["mtls_ratio"] == pytest.approx(1.0)
        assert reviews["p50_ms"] == pytest.approx(3.0)
        assert reviews["p90_ms"] == pytest.approx(4.6)
        assert reviews["p99_ms"] == pytest.approx(4.96)
        gateway = found["istio-ingressgateway"]
        assert gateway["namespace"] == "istio-system"
        assert gateway["rps"] == 0 and gateway["outbound_rps"] > 0
        assert gateway["success_rate"] is None

        # reviews from its destination's report; productpage, whose destination has no
        # sidecar here, from its client's (the gateway's): success known, mTLS not.
        result = meshlet(home, "stat", "svc", "--prometheus", prometheus.url, "-o", "json")
        assert result.returncode == 0, result.stderr
        services = {r["name"]: r for r in json.loads(result.stdout)["rows"]}
        assert set(services) == {"reviews", "productpage"}
        assert services["reviews"]["success_rate"] == pytest.approx(0.9)
        assert services["reviews"]["mtls_ratio"] == pytest.approx(1.0)
        assert services["reviews"]["p50_ms"] == pytest.approx(3.0)
        assert services["productpage"]["success_rate"] == 1.0
        assert services["productpage"]["mtls_ratio"] is None
