"""The admin endpoints and the proxy as a process: workers, draining, exit codes, config errors.

Each test cites the Envoy documentation (or ENVOY-SEMANTICS section) whose behaviour it proves;
where meshlet differs from Envoy on purpose (SIGTERM drains, as Istio's pilot-agent does), the
comment says so.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import (
    Proxy,
    Response,
    Upstream,
    bootstrap,
    cluster,
    free_port,
    http_request,
    meshlet_cmd,
)

TYPE = "type.googleapis.com/envoy.admin.v3."
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def prometheus(proxy: Proxy) -> Samples:
    """``/stats/prometheus`` parsed by the Prometheus client: {(sample, labels): value}."""
    status, text = proxy.admin_get("/stats/prometheus")
    assert status == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def exact(samples: Samples, name: str, **labels: str) -> float:
    """The one sample of ``name`` with exactly ``labels``.

    Envoy exports both ``envoy_cluster_upstream_rq{envoy_response_code=...}`` and
    ``envoy_cluster_upstream_rq_total``; the Prometheus client names both ``..._total``, so
    summing by name would count each request twice.
    """
    return samples[(name, frozenset(labels.items()))]


def run_meshlet(
    config_path: Path, *args: str, timeout: float = 15
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        meshlet_cmd("proxy", "--config", str(config_path), *args),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- admin endpoints ------------------------------------------------------------------------------


def test_ready_and_server_info_report_live_state(upstream, start_proxy):
    # Envoy admin.rst GET /ready and /server_info (ENVOY-SEMANTICS §8): "LIVE\n" with 200;
    # ServerInfo JSON with state, uptime, command-line options and the node.
    proxy = start_proxy(bootstrap(clusters=[cluster("web", upstream.port)]), "--concurrency", "1")
    assert proxy.admin_get("/ready") == (200, "LIVE\n")
    status, body = proxy.admin_get("/server_info")
    assert status == 200
    info = json.loads(body)
    assert info["state"] == "LIVE"
    assert info["node"]["id"] == "test-node"
    assert info["node"]["cluster"] == "test"
    assert info["uptime_current_epoch"].endswith("s")
    assert info["command_line_options"]["concurrency"] == 1
    assert info["version"]


def test_config_dump_is_envoy_shaped_json_with_clusters_listeners_and_routes(upstream, start_proxy):
    # Envoy admin.rst GET /config_dump and config_dump.proto (ENVOY-SEMANTICS §8): "configs" in
    # order Bootstrap, Clusters, Listeners, Routes, Secrets, each an Any with its @type.
    proxy = start_proxy(bootstrap(clusters=[cluster("web", upstream.port)]))
    status, body = proxy.admin_get("/config_dump")
    assert status == 200
    dump = json.loads(body)
    types = [c["@type"] for c in dump["configs"]]
    assert types == [
        TYPE + "BootstrapConfigDump",
        TYPE + "ClustersConfigDump",
        TYPE + "ListenersConfigDump",
        TYPE + "RoutesConfigDump",
        TYPE + "SecretsConfigDump",  # Envoy lists secrets last, keys redacted
    ]
    boot, clusters, listeners, routes, _ = dump["configs"]
    assert boot["bootstrap"]["node"]["id"] == "test-node"
    static_cluster = clusters["static_clusters"][0]
    assert (
        static_cluster["cluster"]["@type"] == "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    )
    assert static_cluster["cluster"]["name"] == "web"
    assert "last_updated" in static_cluster
    listener = listeners["static_listeners"][0]["listener"]
    assert listener["@type"] == "type.googleapis.com/envoy.config.listener.v3.Listener"
    assert listener["name"] == "listener_0"
    route_config = routes["static_route_configs"][0]["route_config"]
    assert route_config["name"] == "local_route"
    status, body = proxy.admin_get("/config_dump?resource=static_clusters")
    assert status == 200
    assert [c["cluster"]["name"] for c in json.loads(body)["configs"]] == ["web"]


def test_clusters_shows_limits_and_per_host_stats_as_text_and_json(upstream, start_proxy):
    # Envoy admin.rst GET /clusters (ENVOY-SEMANTICS §8): "cluster::host::stat::value" lines,
    # circuit-breaker limits, health flags; ?format=json gives cluster_statuses.
    proxy = start_proxy(bootstrap(clusters=[cluster("web", upstream.port)]))
    for _ in range(3):
        assert http_request(proxy.port, "/").status == 200
    assert http_request(proxy.port, "/status/500").status == 500
    status, text = proxy.admin_get("/clusters")
    assert status == 200
    lines = set(text.splitlines())
    host = f"web::127.0.0.1:{upstream.port}"
    for expected in (
        "web::observability_name::web",
        "web::default_priority::max_connections::1024",
        "web::default_priority::max_retries::3",
        "web::added_via_api::false",
        f"{host}::rq_total::4",
        f"{host}::rq_success::3",
        f"{host}::rq_error::1",
        f"{host}::health_flags::healthy",
        f"{host}::weight::1",
    ):
        assert expected in lines, expected
    status, body = proxy.admin_get("/clusters?format=json")
    assert status == 200
    statuses = json.loads(body)["cluster_statuses"]
    assert [c["name"] for c in statuses] == ["web"]
    hosts = statuses[0]["host_statuses"]
    assert hosts[0]["address"]["socket_address"]["port_value"] == upstream.port
    stats = {s["name"]: s["value"] for s in hosts[0]["stats"]}
    assert stats["rq_total"] == "4"


def test_prometheus_stats_count_istio_requests_by_response_code(upstream, start_proxy):
    # Istio standard metrics (istio_requests_total with response_code) and Envoy admin.rst
    # /stats/prometheus (ENVOY-SEMANTICS §8): text format the Prometheus client parses.
    routes = [{"match": {"prefix": "/api"}, "route": {"cluster": "web"}}]
    proxy = start_proxy(bootstrap(clusters=[cluster("web", upstream.port)], routes=routes))
    for _ in range(3):
        assert http_request(proxy.port, "/api").status == 200
    for _ in range(2):
        assert http_request(proxy.port, "/nowhere").status == 404
    samples = prometheus(proxy)
    assert total(samples, "istio_requests_total", response_code="200") == 3
    assert total(samples, "istio_requests_total", response_code="404") == 2
    assert exact(samples, "envoy_cluster_upstream_rq_total", envoy_cluster_name="web") == 3


def test_mutating_admin_endpoints_refuse_get(upstream, start_proxy):
    # Envoy admin.rst: mutations via GET get 400 (must be POST); the server keeps running.
    proxy = start_proxy(bootstrap(clusters=[cluster("web", upstream.port)]))
    for path in ("/quitquitquit", "/healthcheck/fail", "/healthcheck/ok"):
        assert proxy.admin_get(path)[0] == 400
    assert proxy.process.poll() is None
    assert proxy.admin_get("/ready") == (200, "LIVE\n")


def test_healthcheck_fail_makes_ready_503_and_closes_connections_until_ok(upstream, start_proxy):
    # Envoy admin.rst POST /healthcheck/fail and draining.rst (ENVOY-SEMANTICS §8, §9): state
    # DRAINING (/ready 503), HTTP/1 responses carry connection: close; /healthcheck/ok undoes it.
    proxy = start_proxy(bootstrap(clusters=[cluster("web", upstream.port)]))
    assert "connection" not in http_request(proxy.port, "/").headers
    assert proxy.admin_post("/healthcheck/fail")[0] == 200
    assert proxy.admin_get("/ready") == (503, "DRAINING\n")
    r = http_request(proxy.port, "/")
    assert r.status == 200  # still serving: new connections are accepted
    assert r.headers["connection"] == "close"
    assert proxy.admin_post("/healthcheck/ok")[0] == 200
    assert proxy.admin_get("/ready") == (200, "LIVE\n")
    assert "connection" not in http_request(proxy.port, "/").headers


# -- workers --------------------------------------------------------------------------------------


def _peer_recorder(peers: set[int]) -> Callable[[BaseHTTPRequestHandler], None]:
    """Record the proxy-side port of each upstream connection (one pool per worker process)."""

    def override(h: BaseHTTPRequestHandler) -> None:
        peers.add(h.client_address[1])
        body = b"ok"
        h.send_response(200)
        h.send_header("content-length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return override


def test_two_workers_share_the_listener_and_stats_sum_both(upstream, start_proxy):
    # Envoy operations/cli --concurrency (DESIGN.md: N worker processes with SO_REUSEPORT).
    # Each worker keeps its own keep-alive pool, so sequential requests reach the upstream over
    # one connection per worker that served them: two connections prove two workers served.
    peers: set[int] = set()
    upstream.override = _peer_recorder(peers)
    proxy = start_proxy(bootstrap(clusters=[cluster("web", upstream.port)]), "--concurrency", "2")
    n = 40
    for i in range(n):  # a new downstream connection each time: the kernel spreads them
        assert http_request(proxy.port, f"/{i}").status == 200
    assert len(upstream.seen) == n
    assert len(peers) == 2, peers
    samples = prometheus(proxy)
    assert total(samples, "istio_requests_total", response_code="200") == n
    assert exact(samples, "envoy_cluster_upstream_rq_total", envoy_cluster_name="web") == n


def test_healthcheck_fail_reaches_every_worker(upstream, start_proxy):
    # Envoy admin.rst POST /healthcheck/fail: every listener drain-closes, whichever worker
    # process accepted the connection.
    proxy = start_proxy(bootstrap(clusters=[cluster("web", upstream.port)]), "--concurrency", "2")
    assert proxy.admin_post("/healthcheck/fail")[0] == 200
    closes = [http_request(proxy.port, f"/{i}").headers.get("connection") for i in range(20)]
    assert closes == ["close"] * 20


def test_a_worker_that_dies_leaves_the_others_serving_every_connection(
    upstream: Upstream, start_proxy: Callable[..., Proxy]
) -> None:
    # A crashed worker's SO_REUSEPORT sockets close with it, so the kernel stops handing it
    # connections: nothing is black-holed, and the parent stops asking it for stats.
    proxy = start_proxy(bootstrap(clusters=[cluster("web", upstream.port)]), "--concurrency", "2")
    pid = proxy.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(children) == 1
    os.kill(int(children[0]), signal.SIGKILL)
    time.sleep(0.3)
    statuses = [http_request(proxy.port, f"/{i}").status for i in range(30)]
    assert statuses == [200] * 30
    status, text = proxy.admin_get("/stats/prometheus")
    assert status == 200
    assert "envoy_cluster_upstream_rq_total" in text
    assert _wait_for(lambda: "has exited" in proxy.stderr())


# -- draining and exit ----------------------------------------------------------------------------


def _in_background(call: Callable[[], Response]) -> tuple[threading.Thread, list[Response]]:
    out: list[Response] = []
    thread = threading.Thread(target=lambda: out.append(call()))
    thread.start()
    return thread, out


def _refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except ConnectionRefusedError:
        return True


def _wait_for(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("concurrency", ["1", "2"])
def test_sigterm_drains_in_flight_requests_refuses_new_ones_and_exits_0(
    upstream: Upstream, start_proxy: Callable[..., Proxy], concurrency: str
) -> None:
    # meshlet drains on SIGTERM (server.py docstring; Istio's pilot-agent does the same, while
    # Envoy itself exits at once, ENVOY-SEMANTICS §9): listeners close, the request in flight
    # finishes with connection: close, then the process exits 0.
    proxy = start_proxy(
        bootstrap(clusters=[cluster("web", upstream.port)]), "--concurrency", concurrency
    )
    thread, out = _in_background(lambda: http_request(proxy.port, "/delay/1"))
    assert _wait_for(lambda: len(upstream.seen) == 1)
    proxy.process.send_signal(signal.SIGTERM)
    assert _wait_for(lambda: _refuses_connections(proxy.port), timeout=0.8)
    thread.join(10)
    assert out and out[0].status == 200
    assert out[0].body == b"delayed"
    assert out[0].headers["connection"] == "close"
    assert proxy.process.wait(10) == 0


def test_quitquitquit_exits_0(upstream, start_proxy):
    # Envoy admin.rst POST /quitquitquit: a clean exit.
    proxy = start_proxy(bootstrap(clusters=[cluster("web", upstream.port)]), "--concurrency", "2")
    assert proxy.admin_post("/quitquitquit") == (200, "OK\n")
    assert proxy.process.wait(10) == 0


# -- configuration errors and ports ---------------------------------------------------------------


def _write(tmp_path: Path, name: str, config: dict[str, Any] | str) -> Path:
    path = tmp_path / name
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False))
    return path


def _assert_config_error(
    result: subprocess.CompletedProcess[str], path: Path, *needles: str
) -> list[str]:
    """Exit 2, no traceback, and one stderr line per needle, each naming the file."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == len(needles), lines
    for line, needle in zip(lines, needles, strict=True):
        assert line.startswith(f"{path}:"), line
        assert needle in line, (needle, line)
    return lines


def test_invalid_bootstraps_exit_2_with_one_line_per_problem(tmp_path):
    # DESIGN.md "Unsupported fields are refused with a message naming the field (an exit with
    # code 2 for a file)"; Envoy rejects unknown fields and enum values (proto validation).
    base = bootstrap(clusters=[cluster("web", free_port())])

    bad_policy = json.loads(json.dumps(base))
    bad_policy["static_resources"]["clusters"][0]["lb_policy"] = "FASTEST"
    path = _write(tmp_path, "policy.yaml", bad_policy)
    _assert_config_error(run_meshlet(path), path, "static_resources.clusters[0].lb_policy")

    unknown_field = json.loads(json.dumps(base))
    unknown_field["static_resources"]["clusters"][0]["colour"] = "blue"
    path = _write(tmp_path, "field.yaml", unknown_field)
    _assert_config_error(run_meshlet(path), path, "static_resources.clusters[0].colour")

    path = _write(tmp_path, "syntax.yaml", "static_resources:\n  clusters: [\n  - name: x\n")
    (line,) = _assert_config_error(run_meshlet(path), path, "YAML")
    assert line.split(":")[1].strip().isdigit(), line  # file:LINE: ...

    two_problems = json.loads(json.dumps(base))
    route_config = two_problems["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][
        0
    ]["typed_config"]["route_config"]
    route_config["virtual_hosts"][0]["routes"][0]["route"]["cluster"] = "ghost"
    two_problems["static_resources"]["clusters"][0]["lb_policy"] = "CLUSTER_PROVIDED"
    path = _write(tmp_path, "two.yaml", two_problems)
    lines = _assert_config_error(
        run_meshlet(path), path, "static_resources.clusters[0].lb_policy", "'ghost'"
    )
    assert "route_config" in lines[1]


def test_port_in_use_exits_1_with_a_clear_message(upstream, tmp_path, start_proxy):
    # DESIGN.md / cli/main.py exit codes: 1 for a runtime failure such as a port in use. A port
    # held by another process -- a plain socket or another meshlet proxy -- must not be shared.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        path = _write(
            tmp_path,
            "taken.yaml",
            bootstrap(clusters=[cluster("web", upstream.port)], listener_port=port),
        )
        result = run_meshlet(path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert f"cannot bind 127.0.0.1:{port}" in result.stderr
    assert "in use" in result.stderr

    first = start_proxy(bootstrap(clusters=[cluster("web", upstream.port)]))
    second = bootstrap(clusters=[cluster("web", upstream.port)], listener_port=first.port)
    path = _write(tmp_path, "second.yaml", second)
    result = run_meshlet(path)
    assert result.returncode == 1, result.stderr
    assert f"cannot bind 127.0.0.1:{first.port}" in result.stderr

    admin_taken = bootstrap(clusters=[cluster("web", upstream.port)], admin_port=first.admin_port)
    path = _write(tmp_path, "admin.yaml", admin_taken)
    result = run_meshlet(path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert f"admin: cannot bind 127.0.0.1:{first.admin_port}" in result.stderr
