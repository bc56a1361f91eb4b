"""Upstream behaviour end to end: retries, timeouts, failures, circuit breakers, outlier
detection, active health checks, load balancers and DNS clusters, through a real proxy process.

Each test cites the Envoy documentation (or ENVOY-SEMANTICS section) whose behaviour it proves.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import (
    Proxy,
    Response,
    Upstream,
    bootstrap,
    cluster,
    file_access_log,
    free_port,
    http_request,
    wait_for_lines,
)

RESET_PREFIX = "upstream connect error or disconnect/reset before headers. "
PREVIOUS_HOSTS = {
    "name": "envoy.retry_host_predicates.previous_hosts",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3."
        "PreviousHostsPredicate"
    },
}


def reply(h: BaseHTTPRequestHandler, status: int, body: bytes = b"") -> None:
    h.send_response(status)
    h.send_header("content-length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


def scripted(*statuses: int, then: int = 200) -> Callable[[BaseHTTPRequestHandler], None]:
    """An upstream override answering ``statuses`` in order, then ``then`` forever."""
    lock = threading.Lock()
    it = iter(statuses)

    def override(h: BaseHTTPRequestHandler) -> None:
        with lock:
            status = next(it, then)
        reply(h, status, f"status {status}".encode())

    return override


def routes_with(action: dict[str, Any], cluster_name: str = "web") -> list[dict[str, Any]]:
    return [{"match": {"prefix": "/"}, "route": {"cluster": cluster_name, **action}}]


def retry(retry_on: str, num_retries: int = 2, **extra: Any) -> dict[str, Any]:
    return {"retry_policy": {"retry_on": retry_on, "num_retries": num_retries, **extra}}


def start_logged(
    start_proxy: Callable[..., Proxy], log: Path, clusters: list[dict[str, Any]], **kw: Any
) -> Proxy:
    return start_proxy(bootstrap(clusters=clusters, hcm=file_access_log(log), **kw))


def flags(line: str) -> set[str]:
    """The RESPONSE_FLAGS field of a test access-log line."""
    return set(line.split()[1].split(","))


def host_stats(proxy: Proxy, cluster_name: str) -> dict[str, dict[str, str]]:
    """``/clusters`` text as {host: {stat: value}} for one cluster."""
    status, text = proxy.admin_get("/clusters")
    assert status == 200
    hosts: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        parts = line.split("::")
        if len(parts) == 4 and parts[0] == cluster_name and ":" in parts[1]:
            hosts.setdefault(parts[1], {})[parts[2]] = parts[3]
    return hosts


def wait_until(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def concurrently(calls: Iterable[Callable[[], Response]]) -> list[Response]:
    calls = list(calls)
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: call(), calls))


def who(r: Response) -> str:
    return r.text.removeprefix("hello from ")


# -- retries --------------------------------------------------------------------------------------


def test_retry_on_5xx_turns_503_then_200_into_200(upstream, start_proxy):
    # Envoy router_filter.rst x-envoy-retry-on "5xx" (ENVOY-SEMANTICS §3 retry policy).
    upstream.override = scripted(503)
    proxy = start_proxy(
        bootstrap(clusters=[cluster("web", upstream.port)], routes=routes_with(retry("5xx")))
    )
    r = http_request(proxy.port, "/")
    assert (r.status, r.body) == (200, b"status 200")
    assert len(upstream.seen) == 2


def test_exhausted_retries_return_the_last_503_with_flag_urx(upstream, start_proxy, tmp_path):
    # Envoy router_filter.rst / access log usage.rst URX: "upstream retry limit exceeded"; the
    # status of the last attempt is returned.
    log = tmp_path / "access.log"
    upstream.override = scripted(then=503)
    proxy = start_logged(
        start_proxy, log, [cluster("web", upstream.port)], routes=routes_with(retry("5xx"))
    )
    r = http_request(proxy.port, "/")
    assert (r.status, r.body) == (503, b"status 503")
    assert len(upstream.seen) == 3  # the first try and num_retries 2
    assert "URX" in flags(wait_for_lines(log, 1)[0])


def test_a_response_marked_x_envoy_ratelimited_is_not_retried(upstream, start_proxy):
    # Envoy router_filter.rst x-envoy-retry-on "envoy-ratelimited": responses carrying
    # x-envoy-ratelimited are retried only under that condition, never under "5xx".
    def ratelimited(h: BaseHTTPRequestHandler) -> None:
        h.send_response(503)
        h.send_header("x-envoy-ratelimited", "true")
        h.send_header("content-length", "0")
        h.end_headers()

    upstream.override = ratelimited
    proxy = start_proxy(
        bootstrap(clusters=[cluster("web", upstream.port)], routes=routes_with(retry("5xx")))
    )
    assert http_request(proxy.port, "/").status == 503
    assert len(upstream.seen) == 1


def test_connect_failure_is_retried_on_another_host(upstream, start_proxy):
    # Envoy router_filter.rst retry_on "connect-failure"; ROUND_ROBIN moves on to the next host.
    dead = free_port()
    proxy = start_proxy(
        bootstrap(
            clusters=[cluster("web", dead, upstream.port)],
            routes=routes_with(retry("connect-failure")),
        )
    )
    results = [http_request(proxy.port, f"/{i}") for i in range(4)]
    assert [r.status for r in results] == [200] * 4
    assert len(upstream.seen) == 4
    stats = host_stats(proxy, "web")
    assert int(stats[f"127.0.0.1:{dead}"]["cx_connect_fail"]) >= 1


def test_a_reset_attempt_is_retried_with_the_same_request_body(upstream, start_proxy):
    # Envoy router_filter.rst retry_on "reset"; the router buffers the body for retries
    # (ENVOY-SEMANTICS §3 "Request bodies are buffered for retry").
    calls = itertools.count()

    def close_then_echo(h: BaseHTTPRequestHandler) -> None:
        if next(calls) == 0:
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        reply(h, 200, upstream.seen[-1].body)

    upstream.override = close_then_echo
    proxy = start_proxy(
        bootstrap(clusters=[cluster("web", upstream.port)], routes=routes_with(retry("reset", 1)))
    )
    body = b"x" * 100_000
    r = http_request(proxy.port, "/upload", method="POST", body=body)
    assert (r.status, r.body) == (200, body)
    assert [s.body for s in upstream.seen] == [body, body]


def test_retriable_status_codes_retries_only_the_listed_codes(upstream, start_proxy):
    # Envoy route_components.proto RetryPolicy.retriable_status_codes with
    # retry_on "retriable-status-codes" (ENVOY-SEMANTICS §3).
    upstream.override = scripted(418, 503, 418)
    proxy = start_proxy(
        bootstrap(
            clusters=[cluster("web", upstream.port)],
            routes=routes_with(retry("retriable-status-codes", retriable_status_codes=[418])),
        )
    )
    first = http_request(proxy.port, "/")  # 418 retried, then 503 is not a listed code
    assert (first.status, first.body) == (503, b"status 503")
    second = http_request(proxy.port, "/")  # 418 retried, then 200
    assert (second.status, second.body) == (200, b"status 200")
    assert len(upstream.seen) == 4


def test_per_try_timeout_resets_a_slow_attempt_and_retries(upstream, start_proxy):
    # Envoy route_components.proto RetryPolicy.per_try_timeout (ENVOY-SEMANTICS §3): a per-try
    # timeout is a reset, retried under "5xx".
    calls = itertools.count()

    def slow_first(h: BaseHTTPRequestHandler) -> None:
        if next(calls) == 0:
            time.sleep(1.5)
        reply(h, 200, b"fast")

    upstream.override = slow_first
    action = {"timeout": "5s", **retry("5xx", 1, per_try_timeout="0.3s")}
    proxy = start_proxy(
        bootstrap(clusters=[cluster("web", upstream.port)], routes=routes_with(action))
    )
    r = http_request(proxy.port, "/")
    assert (r.status, r.body) == (200, b"fast")
    assert len(upstream.seen) == 2


def test_per_try_timeout_without_retries_left_gives_504(upstream, start_proxy, tmp_path):
    # Envoy router_filter.rst: a per-try timeout that is not retried => 504 upstream request
    # timeout, flag UT.
    log = tmp_path / "access.log"
    action = retry("5xx", 0, per_try_timeout="0.3s")
    proxy = start_logged(
        start_proxy, log, [cluster("web", upstream.port)], routes=routes_with(action)
    )
    r = http_request(proxy.port, "/delay/2")
    assert (r.status, r.body) == (504, b"upstream request timeout")
    assert "UT" in flags(wait_for_lines(log, 1)[0])


def test_previous_hosts_predicate_sends_the_retry_to_the_other_host(make_upstream, start_proxy):
    # Envoy route_components.proto RetryPolicy.retry_host_predicate
    # envoy.retry_host_predicates.previous_hosts (ENVOY-SEMANTICS §3). With RANDOM, a retry
    # without the predicate would hit the failing host again in a quarter of the requests.
    bad = make_upstream("bad")
    bad.override = scripted(then=503)
    good = make_upstream("good")
    policy = retry("5xx", 1, retry_host_predicate=[PREVIOUS_HOSTS])
    proxy = start_proxy(
        bootstrap(
            clusters=[cluster("web", bad.port, good.port, lb_policy="RANDOM")],
            routes=routes_with(policy),
        )
    )
    results = [http_request(proxy.port, f"/{i}") for i in range(24)]
    assert [r.status for r in results] == [200] * 24
    assert len(good.seen) == 24
    assert len(bad.seen) >= 1  # the failing host was tried (and then avoided)


def test_route_timeout_gives_504_upstream_request_timeout_with_flag_ut(
    upstream, start_proxy, tmp_path
):
    # Envoy route_components.proto RouteAction.timeout (ENVOY-SEMANTICS §3): 504 body
    # "upstream request timeout", flag UT, details upstream_response_timeout.
    log = tmp_path / "access.log"
    proxy = start_logged(
        start_proxy, log, [cluster("web", upstream.port)], routes=routes_with({"timeout": "0.4s"})
    )
    r = http_request(proxy.port, "/delay/2")
    assert (r.status, r.body) == (504, b"upstream request timeout")
    assert r.headers["content-type"] == "text/plain"
    line = wait_for_lines(log, 1)[0]
    assert "UT" in flags(line)
    assert line.endswith("upstream_response_timeout")


# -- failures -------------------------------------------------------------------------------------


def test_connect_failure_gives_503_with_envoy_reset_body_and_flag_uf(start_proxy, tmp_path):
    # Envoy router.cc / ENVOY-SEMANTICS §6, §8: refused connection => 503
    # "upstream connect error or disconnect/reset before headers. reset reason: remote
    # connection failure", flag UF.
    log = tmp_path / "access.log"
    proxy = start_logged(start_proxy, log, [cluster("web", free_port())])
    r = http_request(proxy.port, "/")
    assert r.status == 503
    assert r.text.startswith(RESET_PREFIX + "reset reason: remote connection failure")
    assert flags(wait_for_lines(log, 1)[0]) == {"UF"}


def test_upstream_closing_mid_request_gives_503_with_flag_uc(upstream, start_proxy, tmp_path):
    # ENVOY-SEMANTICS §8: connection termination before headers => 503 reset body, flag UC.
    log = tmp_path / "access.log"
    proxy = start_logged(start_proxy, log, [cluster("web", upstream.port)])
    r = http_request(proxy.port, "/close")
    assert r.status == 503
    assert r.text == RESET_PREFIX + "reset reason: connection termination"
    assert flags(wait_for_lines(log, 1)[0]) == {"UC"}


def test_a_body_ended_by_the_upstream_closing_is_relayed_complete(upstream, start_proxy, tmp_path):
    # RFC 9112 §6.3 rule 8: without Content-Length or chunking, the body ends at close. The
    # proxy re-frames it (chunked to an HTTP/1.1 client) and ends it properly: no UC.
    def close_delimited(handler: BaseHTTPRequestHandler) -> None:
        handler.wfile.write(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\n" + b"z" * 5000)
        handler.wfile.flush()
        handler.close_connection = True

    upstream.override = close_delimited
    log = tmp_path / "access.log"
    proxy = start_logged(start_proxy, log, [cluster("web", upstream.port)])
    r = http_request(proxy.port, "/")
    assert r.status == 200
    assert r.body == b"z" * 5000
    assert r.headers.get("transfer-encoding") == "chunked"
    assert flags(wait_for_lines(log, 1)[0]) == {"-"}


def test_malformed_upstream_response_gives_502_with_flag_upe(upstream, start_proxy, tmp_path):
    # ENVOY-SEMANTICS §8: upstream protocol error => 502 reset body, flag UPE.
    log = tmp_path / "access.log"
    proxy = start_logged(start_proxy, log, [cluster("web", upstream.port)])
    r = http_request(proxy.port, "/garbage")
    assert r.status == 502
    assert r.text == RESET_PREFIX + "reset reason: protocol error"
    assert flags(wait_for_lines(log, 1)[0]) == {"UPE"}


def _http_health_check(
    path: str = "/health", *, timeout: str = "0.5s", interval: str = "0.2s", **extra: Any
) -> dict[str, Any]:
    return {
        "health_checks": [
            {
                "timeout": timeout,
                "interval": interval,
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                "http_health_check": {"path": path},
                **extra,
            }
        ]
    }


def test_no_healthy_upstream_gives_503_with_flag_uh(upstream, start_proxy, tmp_path):
    # Envoy cluster.proto CommonLbConfig.healthy_panic_threshold 0 disables panic; with every host
    # failing active health checks => 503 "no healthy upstream", flag UH (ENVOY-SEMANTICS §6).
    log = tmp_path / "access.log"
    upstream.override = scripted(then=503)
    web = cluster(
        "web",
        upstream.port,
        common_lb_config={"healthy_panic_threshold": {"value": 0}},
        **_http_health_check(),
    )
    proxy = start_logged(start_proxy, log, [web])
    wait_until(
        lambda: (
            "failed_active_hc"
            in host_stats(proxy, "web")[f"127.0.0.1:{upstream.port}"]["health_flags"]
        ),
        what="the host to fail its health check",
    )
    r = http_request(proxy.port, "/x")
    assert (r.status, r.body) == (503, b"no healthy upstream")
    assert flags(wait_for_lines(log, 1)[0]) == {"UH"}
    assert all(s.path == "/health" for s in upstream.seen)


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port whose accept queue is full: connection attempts hang until they time out."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        fillers = []
        for _ in range(3):
            c = socket.socket()
            c.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                c.connect(("127.0.0.1", port))
            fillers.append(c)
        time.sleep(0.1)
        try:
            yield port
        finally:
            for c in fillers:
                c.close()


def test_connect_timeout_gives_503_uf_with_reason_connection_timeout(
    blackhole, start_proxy, tmp_path
):
    # Envoy cluster.proto connect_timeout (ENVOY-SEMANTICS §6): 503 reset body with
    # "reset reason: connection timeout", flag UF.
    log = tmp_path / "access.log"
    proxy = start_logged(start_proxy, log, [cluster("web", blackhole, connect_timeout="0.3s")])
    r = http_request(proxy.port, "/")
    assert r.status == 503
    assert r.text.startswith(RESET_PREFIX + "reset reason: connection timeout")
    assert flags(wait_for_lines(log, 1)[0]) == {"UF"}


def test_a_failed_connect_fails_every_request_waiting_in_the_pool(blackhole, start_proxy, tmp_path):
    # Envoy conn_pool_base.cc onConnectionEvent: a connect failure purges every pending request
    # of the pool (503 UF each), rather than leaving them queued until the route timeout (504).
    log = tmp_path / "access.log"
    limits = {"thresholds": [{"max_connections": 1}]}
    web = cluster("web", blackhole, connect_timeout="0.5s", circuit_breakers=limits)
    proxy = start_logged(start_proxy, log, [web], routes=routes_with({"timeout": "4s"}))
    results = concurrently(partial(http_request, proxy.port, f"/{i}") for i in range(3))
    assert [r.status for r in results] == [503] * 3
    for r in results:
        assert r.text.startswith(RESET_PREFIX + "reset reason: connection timeout")
    assert all(flags(line) == {"UF"} for line in wait_for_lines(log, 3))


def test_a_host_without_connections_gets_one_even_when_the_cluster_is_at_max_connections(
    make_upstream, start_proxy
):
    # Envoy conn_pool_base.cc tryCreateNewConnection: at the cluster's connection limit, a pool
    # with no connection at all still opens one, so its requests are not stuck behind another
    # host's idle keep-alive connection.
    a, b = make_upstream("a"), make_upstream("b")
    limits = {"thresholds": [{"max_connections": 1}]}
    web = cluster("web", a.port, b.port, circuit_breakers=limits)
    proxy = start_proxy(bootstrap(clusters=[web], routes=routes_with({"timeout": "3s"})))
    results = [http_request(proxy.port, f"/{i}") for i in range(4)]
    assert [r.status for r in results] == [200] * 4
    assert sorted(who(r) for r in results) == ["a", "a", "b", "b"]


# -- circuit breakers -----------------------------------------------------------------------------


def test_circuit_breaker_overflow_gives_503_uo_with_x_envoy_overloaded(
    upstream, start_proxy, tmp_path
):
    # Envoy circuit_breaking.rst (ENVOY-SEMANTICS §6): one connection, one pending request; the
    # rest overflow => 503 reset body "overflow", flag UO, header x-envoy-overloaded: true.
    log = tmp_path / "access.log"
    limits = {"thresholds": [{"max_connections": 1, "max_pending_requests": 1}]}
    proxy = start_logged(start_proxy, log, [cluster("web", upstream.port, circuit_breakers=limits)])
    results = concurrently(partial(http_request, proxy.port, "/delay/1") for _ in range(5))
    ok = [r for r in results if r.status == 200]
    overflow = [r for r in results if r.status == 503]
    assert 1 <= len(ok) <= 2
    assert len(ok) + len(overflow) == 5
    for r in overflow:
        assert r.text == RESET_PREFIX + "reset reason: overflow"
        assert r.headers["x-envoy-overloaded"] == "true"
    lines = wait_for_lines(log, 5)
    assert sum(1 for line in lines if "UO" in flags(line)) == len(overflow)
    assert len(upstream.seen) == len(ok)


def test_max_retries_bounds_concurrent_retries_and_overflow_returns_the_upstream_answer(
    upstream, start_proxy, tmp_path
):
    # Envoy cluster circuit_breaker.proto max_retries (ENVOY-SEMANTICS §3 "Concurrency budget"):
    # a retry needs a free retry slot, held while the retry is in flight; without one the
    # failed attempt's response is returned with flag UO (stat upstream_rq_retry_overflow).
    log = tmp_path / "access.log"
    lock = threading.Lock()
    attempts: Counter[str] = Counter()

    def slow_then_fail(h: BaseHTTPRequestHandler) -> None:
        with lock:
            attempts[h.path] += 1
            n = attempts[h.path]
        time.sleep(0.6 if n == 1 else 1.0)
        reply(h, 503 if n == 1 else 200, f"attempt {n}".encode())

    upstream.override = slow_then_fail
    limits = {"thresholds": [{"max_retries": 1}]}
    proxy = start_logged(
        start_proxy,
        log,
        [cluster("web", upstream.port, circuit_breakers=limits)],
        routes=routes_with(retry("5xx", 1)),
    )
    results = concurrently(partial(http_request, proxy.port, f"/r{i}") for i in range(3))
    answers = sorted((r.status, r.text) for r in results)
    # One request got the only retry slot; the other two overflowed and return their 503.
    assert answers == [(200, "attempt 2"), (503, "attempt 1"), (503, "attempt 1")]
    lines = wait_for_lines(log, 3)
    assert sorted("UO" in flags(line) for line in lines) == [False, True, True]
    _, prom = proxy.admin_get("/stats/prometheus")
    assert 'envoy_cluster_upstream_rq_retry_overflow{envoy_cluster_name="web"} 2' in prom


# -- outlier detection ----------------------------------------------------------------------------


def test_outlier_detection_ejects_a_failing_host_and_returns_it_later(make_upstream, start_proxy):
    # Envoy outlier.rst consecutive_5xx (ENVOY-SEMANTICS §6): ejected inline after N consecutive
    # 5xx; /clusters shows failed_outlier_check; the host returns after base_ejection_time.
    bad = make_upstream("bad")
    bad.override = scripted(then=500)
    good = make_upstream("good")
    od = {
        "consecutive_5xx": 3,
        "interval": "0.5s",
        "base_ejection_time": "1s",
        "max_ejection_percent": 100,
    }
    proxy = start_proxy(
        bootstrap(clusters=[cluster("web", bad.port, good.port, outlier_detection=od)])
    )
    bad_key = f"127.0.0.1:{bad.port}"
    for i in range(6):  # round robin: three of these reach the bad host
        http_request(proxy.port, f"/warm{i}")
    assert len(bad.seen) == 3
    assert "failed_outlier_check" in host_stats(proxy, "web")[bad_key]["health_flags"]
    assert "web::outlier::success_rate_average::-1" in proxy.admin_get("/clusters")[1]
    _, clusters_json = proxy.admin_get("/clusters?format=json")
    hosts = json.loads(clusters_json)["cluster_statuses"][0]["host_statuses"]
    ejected = [h for h in hosts if h["address"]["socket_address"]["port_value"] == bad.port]
    assert ejected[0]["health_status"]["failed_outlier_check"] is True
    results = [http_request(proxy.port, f"/after{i}") for i in range(6)]
    assert [r.status for r in results] == [200] * 6
    assert len(bad.seen) == 3
    wait_until(
        lambda: host_stats(proxy, "web")[bad_key]["health_flags"] == "healthy",
        timeout=5,
        what="the ejected host to return",
    )
    bad.override = None
    for i in range(4):
        http_request(proxy.port, f"/back{i}")
    assert len(bad.seen) > 3


# -- active health checks -------------------------------------------------------------------------


def test_host_failing_active_health_checks_is_marked_and_gets_no_traffic(
    make_upstream, start_proxy
):
    # Envoy health_checking.rst / health_check.proto (ENVOY-SEMANTICS §6): a host answering the
    # health path with a non-200 status is unhealthy (/failed_active_hc) and takes no traffic.
    sick = make_upstream("sick")
    sick.override = lambda h: reply(h, 503 if h.path == "/health" else 200, b"hello from sick")
    well = make_upstream("well")
    web = cluster("web", sick.port, well.port, **_http_health_check())
    proxy = start_proxy(bootstrap(clusters=[web]))
    wait_until(
        lambda: (
            host_stats(proxy, "web")[f"127.0.0.1:{sick.port}"]["health_flags"]
            == "/failed_active_hc"
            and host_stats(proxy, "web")[f"127.0.0.1:{well.port}"]["health_flags"] == "healthy"
        ),
        what="health checks to settle",
    )
    results = [http_request(proxy.port, f"/r{i}") for i in range(8)]
    assert {who(r) for r in results} == {"well"}
    assert [s.path for s in sick.seen if s.path != "/health"] == []
    assert all(s.headers["host"] == "web" for s in well.seen if s.path == "/health")


def test_proxy_is_ready_only_after_the_first_round_of_health_checks(make_upstream, start_proxy):
    # Envoy cluster initialization (ClusterImplBase): with active health checking a cluster
    # finishes warming after the first check of its hosts, so the server turns LIVE only then
    # and its first requests already avoid failing hosts (no panic routing over all hosts).
    sick = make_upstream("sick")
    sick.override = lambda h: reply(h, 503 if h.path == "/health" else 200, b"hello from sick")
    slow = make_upstream("slow")

    def slow_health(h: BaseHTTPRequestHandler) -> None:
        if h.path == "/health":
            time.sleep(0.6)
        reply(h, 200, b"hello from slow")

    slow.override = slow_health
    web = cluster("web", sick.port, slow.port, **_http_health_check(timeout="2s", interval="5s"))
    proxy = start_proxy(bootstrap(clusters=[web]))
    results = [http_request(proxy.port, f"/r{i}") for i in range(6)]
    assert {who(r) for r in results} == {"slow"}


def test_a_passing_health_check_returns_a_host_ejected_by_outlier_detection(
    make_upstream, start_proxy
):
    # Envoy outlier_detection.proto successful_active_health_check_uneject_host (default true):
    # the ejection ends at the next passing health check, long before base_ejection_time.
    release = threading.Event()
    health_checks = itertools.count()

    def flaky_handler(h: BaseHTTPRequestHandler) -> None:
        if h.path != "/health":
            reply(h, 500, b"flaky")
            return
        if next(health_checks) > 0:
            release.wait(10)  # the second check passes only when the test says so
        reply(h, 200)

    flaky = make_upstream("flaky")
    flaky.override = flaky_handler
    steady = make_upstream("steady")
    od = {"consecutive_5xx": 2, "base_ejection_time": "60s", "max_ejection_percent": 100}
    web = cluster(
        "web",
        flaky.port,
        steady.port,
        outlier_detection=od,
        **_http_health_check(timeout="15s", interval="0.1s"),
    )
    proxy = start_proxy(bootstrap(clusters=[web]))
    flaky_key = f"127.0.0.1:{flaky.port}"
    for i in range(4):  # round robin: two 500s from the flaky host eject it
        http_request(proxy.port, f"/{i}")
    assert host_stats(proxy, "web")[flaky_key]["health_flags"] == "/failed_outlier_check"
    release.set()
    wait_until(
        lambda: host_stats(proxy, "web")[flaky_key]["health_flags"] == "healthy",
        timeout=5,
        what="a passing health check to return the ejected host",
    )


# -- load balancers -------------------------------------------------------------------------------


def _lb_proxy(
    start_proxy: Callable[..., Proxy],
    upstreams: list[Upstream],
    policy: str,
    routes: list[dict[str, Any]] | None = None,
) -> Proxy:
    web = cluster("web", *(u.port for u in upstreams), lb_policy=policy)
    return start_proxy(bootstrap(clusters=[web], routes=routes))


def test_round_robin_alternates_between_hosts(make_upstream, start_proxy):
    # Envoy load_balancers.rst "Weighted round robin": equal weights rotate through the hosts.
    ups = [make_upstream("a"), make_upstream("b")]
    proxy = _lb_proxy(start_proxy, ups, "ROUND_ROBIN")
    order = [who(http_request(proxy.port, "/")) for _ in range(8)]
    assert order in (["a", "b"] * 4, ["b", "a"] * 4)


def test_random_and_least_request_spread_over_every_host(make_upstream, start_proxy):
    # Envoy load_balancers.rst "Random" and "Weighted least request" (P2C with equal weights).
    ups = [make_upstream("a"), make_upstream("b"), make_upstream("c")]
    for policy in ("RANDOM", "LEAST_REQUEST"):
        proxy = _lb_proxy(start_proxy, ups, policy)
        counts = Counter(who(http_request(proxy.port, "/")) for _ in range(60))
        assert set(counts) == {"a", "b", "c"}, (policy, counts)
        proxy.terminate()


def test_hashing_balancers_send_one_header_value_to_one_host(make_upstream, start_proxy):
    # Envoy route_components.proto RouteAction.hash_policy header; load_balancers.rst "Ring hash"
    # and "Maglev": the same key maps to the same host, and different keys spread.
    ups = [make_upstream("a"), make_upstream("b"), make_upstream("c")]
    routes = routes_with({"hash_policy": [{"header": {"header_name": "x-user"}}]})
    for policy in ("RING_HASH", "MAGLEV"):
        proxy = _lb_proxy(start_proxy, ups, policy, routes)
        mapping: dict[str, set[str]] = {}
        for _ in range(3):
            for user in range(12):
                r = http_request(proxy.port, "/", headers={"x-user": f"user-{user}"})
                mapping.setdefault(f"user-{user}", set()).add(who(r))
        assert all(len(hosts) == 1 for hosts in mapping.values()), (policy, mapping)
        assert len(set().union(*mapping.values())) >= 2, (policy, mapping)
        proxy.terminate()


# -- DNS clusters ---------------------------------------------------------------------------------


def test_strict_dns_and_logical_dns_clusters_resolve_localhost(make_upstream, start_proxy):
    # Envoy service_discovery.rst "Strict DNS" and "Logical DNS" (ENVOY-SEMANTICS §6).
    strict = make_upstream("strict")
    logical = make_upstream("logical")

    def dns_cluster(name: str, kind: str, port: int) -> dict[str, Any]:
        c = cluster(name, port, type=kind, dns_lookup_family="V4_ONLY", dns_refresh_rate="1s")
        c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
            "socket_address"
        ]["address"] = "localhost"
        return c

    routes = [
        {"match": {"prefix": "/strict"}, "route": {"cluster": "strict"}},
        {"match": {"prefix": "/logical"}, "route": {"cluster": "logical"}},
    ]
    clusters = [
        dns_cluster("strict", "STRICT_DNS", strict.port),
        dns_cluster("logical", "LOGICAL_DNS", logical.port),
    ]
    proxy = start_proxy(bootstrap(clusters=clusters, routes=routes))
    assert who(http_request(proxy.port, "/strict")) == "strict"
    assert who(http_request(proxy.port, "/logical")) == "logical"
    hosts = host_stats(proxy, "strict")
    assert f"127.0.0.1:{strict.port}" in hosts
    assert hosts[f"127.0.0.1:{strict.port}"]["hostname"] == "localhost"
