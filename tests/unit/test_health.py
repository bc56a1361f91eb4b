"""Active HTTP health checking: compilation, the threshold state machine, and the prober.

Envoy references: docs intro/arch_overview/upstream/health_checking.rst, health_check.proto,
and source/extensions/health_checkers/common/health_checker_base_impl.cc (handleSuccess,
handleFailure). The prober tests use one real asyncio HTTP server on 127.0.0.1 (port 0).
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Callable, Sequence

import pytest
from envoy.config.core.v3 import base_pb2, health_check_pb2
from hypothesis import given
from hypothesis import strategies as st

from meshlet.errors import ConfigError
from meshlet.proxy.upstream.health import (
    Check,
    HealthCheckConfig,
    HealthChecker,
    HostHealth,
    compile_health_checks,
    verdict,
)
from meshlet.proxy.upstream.host import Host

HC = health_check_pb2.HealthCheck
PATH = "static_resources.clusters[0].health_checks"


def http_check(**http: object) -> health_check_pb2.HealthCheck:
    proto = HC(http_health_check=HC.HttpHealthCheck(path="/healthz", **http))
    proto.timeout.FromMilliseconds(500)
    proto.interval.FromSeconds(5)
    proto.unhealthy_threshold.value = 3
    proto.healthy_threshold.value = 2
    return proto


def config(**overrides: object) -> HealthCheckConfig:
    base: dict[str, object] = dict(
        timeout=1.0,
        interval=5.0,
        unhealthy_threshold=3,
        healthy_threshold=2,
        path=b"/healthz",
        host=b"reviews",
    )
    base.update(overrides)
    return HealthCheckConfig(**base)  # type: ignore[arg-type]


# -- compile ----------------------------------------------------------------------------------


def test_an_http_check_compiles_with_envoys_defaults() -> None:
    # health_check.proto: Host defaults to the cluster name, expected_statuses to [200, 201),
    # reuse_connection true, no_traffic_interval 60 s; the user agent is Envoy/HC.
    c = compile_health_checks([http_check()], "outbound|9080||reviews", PATH)
    assert c == HealthCheckConfig(
        timeout=0.5,
        interval=5.0,
        unhealthy_threshold=3,
        healthy_threshold=2,
        path=b"/healthz",
        host=b"outbound|9080||reviews",
    )
    assert c.expected_statuses == {200}
    assert c.request() == (
        b"GET /healthz HTTP/1.1\r\nhost: outbound|9080||reviews\r\nuser-agent: Envoy/HC\r\n\r\n"
    )


def test_no_health_checks_compile_to_none() -> None:
    assert compile_health_checks([], "c", PATH) is None


def test_http_options_are_read() -> None:
    proto = http_check(host="svc.local", method=base_pb2.HEAD)
    proto.http_health_check.expected_statuses.add(start=200, end=300)
    proto.http_health_check.retriable_statuses.add(start=503, end=504)
    proto.http_health_check.request_headers_to_remove.append("user-agent")
    option = proto.http_health_check.request_headers_to_add.add()
    option.header.key, option.header.value = "X-Probe", "100%%"
    proto.reuse_connection.value = False
    proto.alt_port.value = 15021
    c = compile_health_checks([proto], "c", PATH)
    assert c is not None
    assert (c.host, c.method, c.alt_port) == (b"svc.local", b"HEAD", 15021)
    assert c.expected_statuses == frozenset(range(200, 300))
    assert c.retriable_statuses == {503}
    assert c.request() == (
        b"HEAD /healthz HTTP/1.1\r\nhost: svc.local\r\nx-probe: 100%\r\nconnection: close\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: p.ClearField("timeout"), "[0].timeout: is required"),
        (lambda p: p.ClearField("healthy_threshold"), "[0].healthy_threshold: is required"),
        (lambda p: p.interval.FromSeconds(0), "[0].interval: must be greater than 0"),
        (
            lambda p: setattr(p.unhealthy_threshold, "value", 0),
            "[0].unhealthy_threshold: must be at least 1",
        ),
        (
            lambda p: p.tcp_health_check.SetInParent(),
            "[0].tcp_health_check: is not supported by meshlet",
        ),
        (
            lambda p: p.unhealthy_interval.FromSeconds(1),
            "[0].unhealthy_interval: is not supported by meshlet",
        ),
        (
            lambda p: p.http_health_check.receive.add(),
            "[0].http_health_check.receive: is not supported by meshlet",
        ),
        (
            lambda p: setattr(p.http_health_check, "codec_client_type", 1),
            "[0].http_health_check.codec_client_type: is not supported (supported: HTTP1)",
        ),
        (
            lambda p: setattr(p.http_health_check, "path", ""),
            "[0].http_health_check.path: is required",
        ),
        (
            lambda p: p.http_health_check.expected_statuses.add(start=300, end=200),
            "[0].http_health_check.expected_statuses[0]: [300, 200) is not a range of statuses",
        ),
        (
            lambda p: p.http_health_check.request_headers_to_add.add(
                header={"key": "host", "value": "x"}
            ),
            "[0].http_health_check.request_headers_to_add[0].header.key: 'host' cannot be added",
        ),
        (
            lambda p: p.http_health_check.request_headers_to_add.add(
                header={"key": "x-id", "value": "%HOSTNAME%"}
            ),
            "[0].http_health_check.request_headers_to_add[0].header.value: format variables",
        ),
    ],
)
def test_unsupported_and_invalid_checks_are_refused_by_field_path(
    setup: Callable[[health_check_pb2.HealthCheck], object], message: str
) -> None:
    proto = http_check()
    setup(proto)
    with pytest.raises(ConfigError) as e:
        compile_health_checks([proto], "c", PATH)
    assert str(e.value).startswith(f"{PATH}{message}")


def test_only_one_health_check_is_supported() -> None:
    with pytest.raises(ConfigError) as e:
        compile_health_checks([http_check(), http_check()], "c", PATH)
    assert str(e.value).startswith(f"{PATH}[1]: is not supported")


# -- the state machine ------------------------------------------------------------------------

P, F, N = Check.PASS, Check.FAIL, Check.FAIL_NOW


@pytest.mark.parametrize(
    ("start_failed", "checks", "health"),
    [
        # health_checking.rst: at startup one success suffices.
        (True, [P], [True]),
        (True, [F, F, P], [False, False, False]),  # the shortcut is for the first check only
        # After the first check, healthy_threshold (2) consecutive passes are needed.
        (True, [F, P, P], [False, False, True]),
        (True, [F, P, F, P, P], [False, False, False, False, True]),
        # unhealthy_threshold (3) consecutive failures; a pass resets the count.
        (False, [F, F, F], [True, True, False]),
        (False, [F, F, P, F, F], [True, True, True, True, True]),
        # A status outside expected_statuses fails at once.
        (False, [N], [False]),
        (False, [F, N], [True, False]),
    ],
)
def test_threshold_transitions(start_failed: bool, checks: list[Check], health: list[bool]) -> None:
    host = Host("10.0.0.1", 80)
    host.failed_active_hc = start_failed
    state = HostHealth()
    seen = []
    for check in checks:
        state.record(host, check, config())
        seen.append(not host.failed_active_hc)
    assert seen == health


@given(checks=st.lists(st.sampled_from([P, F, N]), max_size=30), start=st.booleans())
def test_record_reports_exactly_the_flips(checks: list[Check], start: bool) -> None:
    host = Host("10.0.0.1", 80)
    host.failed_active_hc = start
    state = HostHealth()
    for check in checks:
        before = host.failed_active_hc
        flipped = state.record(host, check, config())
        assert flipped == (before != host.failed_active_hc)
        if check is P:
            assert state.failures == 0


def test_verdicts_follow_expected_and_retriable_statuses() -> None:
    # health_check.proto: expected_statuses take precedence over retriable_statuses; any
    # other status is an immediate failure; x-envoy-immediate-health-check-fail too.
    c = config(expected_statuses=frozenset({200, 204}), retriable_statuses=frozenset({204, 503}))
    assert verdict(204, False, c) is Check.PASS
    assert verdict(503, False, c) is Check.FAIL
    assert verdict(500, False, c) is Check.FAIL_NOW
    assert verdict(200, True, c) is Check.FAIL_NOW


def test_a_round_calls_on_change_once_and_reports_every_result() -> None:
    hosts = [Host("10.0.0.1", 80), Host("10.0.0.2", 80)]
    for h in hosts:
        h.failed_active_hc = True
    changes: list[int] = []
    results: list[tuple[Host, Check]] = []
    checker = HealthChecker(
        config(),
        lambda: hosts,
        lambda: changes.append(1),
        on_result=lambda h, c: results.append((h, c)),
    )
    checker.apply([(hosts[0], P), (hosts[1], P)])
    assert changes == [1]
    assert results == [(hosts[0], P), (hosts[1], P)]
    checker.apply([(hosts[0], P), (hosts[1], F)])
    assert changes == [1]  # nothing flipped
    assert (checker.attempts, checker.successes, checker.failures) == (4, 3, 1)


def test_an_immediate_failure_from_traffic_fails_the_host() -> None:
    # health_checking.rst: x-envoy-immediate-health-check-fail on a response.
    host = Host("10.0.0.1", 80)
    changes: list[int] = []
    checker = HealthChecker(config(), lambda: [host], lambda: changes.append(1))
    checker.immediate_failure(host)
    assert host.failed_active_hc and changes == [1]


def test_interval_jitter_adds_up_to_the_configured_amount() -> None:
    # health_check.proto interval_jitter, interval_jitter_percent.
    checker = HealthChecker(
        config(interval=10.0, interval_jitter=1.0, interval_jitter_percent=20),
        lambda: [],
        lambda: None,
        rng=random.Random(1),
    )
    waits = [checker.next_interval() for _ in range(200)]
    assert all(10.0 <= w <= 13.0 for w in waits)
    assert max(waits) > 12.0


# -- the prober against a real server ---------------------------------------------------------


class Upstream:
    """A keep-alive HTTP/1.1 server on 127.0.0.1 answering health checks with ``status``."""

    def __init__(self) -> None:
        self.status = 200
        self.extra = b""
        self.silent = False
        self.drop_second_request = False  # close a reused connection instead of answering
        self.requests: list[bytes] = []
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                served += 1
                if self.drop_second_request and served > 1:
                    return  # as if its idle timeout fired just as the probe arrived
                if self.silent:
                    await asyncio.Event().wait()  # never answer (the checker times out)
                body = b"ok"
                writer.write(
                    b"HTTP/1.1 %d X\r\ncontent-length: %d\r\n%s\r\n%s"
                    % (self.status, len(body), self.extra, body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        assert self.server is not None
        self.server.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_checker(hosts: Sequence[Host], **overrides: object) -> tuple[HealthChecker, list[int]]:
    changes: list[int] = []
    return HealthChecker(config(**overrides), lambda: hosts, lambda: changes.append(1)), changes


def test_probes_against_a_real_server_flip_health_and_reuse_the_connection() -> None:
    # health_checking.rst: GET path with Host = cluster (here "reviews"), user-agent Envoy/HC;
    # reuse_connection (default true) keeps one connection across checks.
    async def scenario() -> None:
        upstream = Upstream()
        port = await upstream.start()
        host = Host("127.0.0.1", port)
        host.failed_active_hc = True  # the cluster marks hosts failed until the first check
        checker, changes = run_checker([host])
        try:
            await checker.check_once()
            assert not host.failed_active_hc and changes == [1]
            await checker.check_once()
            assert upstream.connections == 1
            assert upstream.requests[0] == (
                b"GET /healthz HTTP/1.1\r\nhost: reviews\r\nuser-agent: Envoy/HC\r\n\r\n"
            )
            upstream.status = 500  # outside expected_statuses: unhealthy at once
            await checker.check_once()
            assert host.failed_active_hc and changes == [1, 1]
            upstream.status = 200
            await checker.check_once()  # healthy_threshold is 2 after the first check
            assert host.failed_active_hc
            await checker.check_once()
            assert not host.failed_active_hc
            upstream.extra = b"x-envoy-immediate-health-check-fail: true\r\n"
            await checker.check_once()
            assert host.failed_active_hc
        finally:
            checker.stop()
            upstream.close()

    asyncio.run(scenario())


def test_a_reused_connection_closed_by_the_server_is_not_a_failure() -> None:
    # Envoy reconnects when the server closes an idle health-check connection; the closing
    # is not a verdict on the host.
    async def scenario() -> None:
        upstream = Upstream()
        upstream.drop_second_request = True
        port = await upstream.start()
        host = Host("127.0.0.1", port)
        checker, _ = run_checker([host], unhealthy_threshold=1)
        try:
            for _ in range(3):
                assert await checker.probe(host) is Check.PASS
            assert upstream.connections == 3
        finally:
            checker.stop()
            upstream.close()

    asyncio.run(scenario())


def test_refused_and_silent_hosts_fail_their_checks() -> None:
    # health_check.proto: a timeout is a failure; so is a refused connection.
    async def scenario() -> None:
        upstream = Upstream()
        upstream.silent = True
        port = await upstream.start()
        silent, refused = Host("127.0.0.1", port), Host("127.0.0.1", free_port())
        checker, _ = run_checker([silent, refused], timeout=0.05)
        try:
            assert await checker.probe(silent) is Check.FAIL
            assert await checker.probe(refused) is Check.FAIL
        finally:
            checker.stop()
            upstream.close()

    asyncio.run(scenario())


def test_start_probes_at_once_and_stop_ends_probing() -> None:
    async def scenario() -> None:
        upstream = Upstream()
        port = await upstream.start()
        host = Host("127.0.0.1", port)
        host.failed_active_hc = True
        flipped = asyncio.Event()
        checker = HealthChecker(config(interval=0.01), lambda: [host], flipped.set)
        checker.start()
        try:
            await asyncio.wait_for(flipped.wait(), 5.0)
            assert not host.failed_active_hc
        finally:
            checker.stop()
            upstream.close()
        assert checker._task is None

    asyncio.run(scenario())
