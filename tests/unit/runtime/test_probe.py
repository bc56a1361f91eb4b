"""Kubernetes probe semantics: building probes from manifests, the threshold state machine,
and one real prober against a tiny HTTP server on loopback whose answer the test flips."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshlet.api.kube import Probe
from meshlet.errors import ConfigError
from meshlet.runtime.probe import Prober, ProbeSpec, ProbeTally, http_request, probe_once


def kube_probe(**fields: Any) -> Probe:
    return Probe.model_validate(fields)


# -- from_kube ---------------------------------------------------------------------------


def test_http_get_defaults_to_the_pod_ip_and_resolves_named_ports() -> None:
    probe = kube_probe(
        httpGet={
            "path": "healthz",
            "port": "http-admin",
            "httpHeaders": [{"name": "X-Probe", "value": "1"}],
        },
        periodSeconds=2,
        failureThreshold=5,
    )
    spec = ProbeSpec.from_kube(probe, "127.1.0.4", {"http-admin": 15021})
    assert spec == ProbeSpec(
        kind="http",
        host="127.1.0.4",
        port=15021,
        path="/healthz",  # the kubelet prefixes a missing slash
        headers=(("X-Probe", "1"),),
        period=2.0,
        timeout=1.0,
        success_threshold=1,
        failure_threshold=5,
    )


def test_zero_timings_mean_the_api_servers_defaults() -> None:
    probe = kube_probe(
        tcpSocket={"port": 9080, "host": "127.0.0.1"},
        periodSeconds=0,
        timeoutSeconds=0,
        successThreshold=0,
        failureThreshold=0,
        initialDelaySeconds=4,
    )
    spec = ProbeSpec.from_kube(probe, "127.1.0.4", {})
    assert (spec.kind, spec.host, spec.port) == ("tcp", "127.0.0.1", 9080)
    assert (spec.period, spec.timeout, spec.success_threshold, spec.failure_threshold) == (
        10.0,
        1.0,
        1,
        3,
    )
    assert spec.initial_delay == 4.0


def test_a_port_number_given_as_a_string_is_accepted_as_the_kubelet_does() -> None:
    spec = ProbeSpec.from_kube(kube_probe(httpGet={"port": "8080"}), "127.1.0.4", {})
    assert spec.port == 8080 and spec.scheme == "HTTP"


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"exec": {"command": ["cat", "/tmp/ok"]}}, "readinessProbe.exec"),
        ({"grpc": {"port": 9000}}, "readinessProbe.grpc"),
        ({}, "readinessProbe"),
        ({"httpGet": {"port": "nope"}}, "readinessProbe.httpGet.port"),
        ({"httpGet": {"port": 80, "scheme": "FTP"}}, "readinessProbe.httpGet.scheme"),
        (
            {"httpGet": {"port": 80, "httpHeaders": [{"name": "bad name", "value": "x"}]}},
            "readinessProbe.httpGet.httpHeaders[0].name",
        ),
    ],
)
def test_unsupported_or_broken_probes_are_refused_naming_the_field(
    fields: dict[str, Any], where: str
) -> None:
    with pytest.raises(ConfigError) as e:
        ProbeSpec.from_kube(kube_probe(**fields), "127.1.0.4", {"http": 80}, where="readinessProbe")
    assert e.value.problems[0].path == where


def test_request_has_kubelets_default_headers_and_user_headers_replace_them() -> None:
    spec = ProbeSpec(kind="http", host="127.1.0.4", port=8080, path="/ready")
    assert http_request(spec) == (
        b"GET /ready HTTP/1.1\r\nHost: 127.1.0.4:8080\r\nUser-Agent: kube-probe/meshlet\r\n"
        b"Accept: */*\r\nConnection: close\r\n\r\n"
    )
    custom = ProbeSpec(kind="http", host="::1", port=80, headers=(("host", "example"),))
    request = http_request(custom)
    assert b"\r\nhost: example\r\n" in request and b"Host: [" not in request


# -- the threshold state machine ---------------------------------------------------------


def test_readiness_needs_success_threshold_passes_in_a_row() -> None:
    tally = ProbeTally(success_threshold=2, failure_threshold=3, healthy=False)
    assert [tally.record(r) for r in (True, False, True, True)] == [False, False, False, True]
    assert tally.healthy


def test_liveness_fails_after_failure_threshold_failures_in_a_row() -> None:
    tally = ProbeTally(success_threshold=1, failure_threshold=3, healthy=True)
    flips = [tally.record(r) for r in (False, False, True, False, False, False)]
    assert flips == [False, False, False, False, False, True]
    assert not tally.healthy


@given(
    st.integers(1, 4),
    st.integers(1, 4),
    st.booleans(),
    st.lists(st.booleans(), max_size=40),
)
def test_tally_flips_exactly_when_the_last_run_reaches_its_threshold(
    success: int, failure: int, healthy: bool, results: list[bool]
) -> None:
    tally = ProbeTally(success_threshold=success, failure_threshold=failure, healthy=healthy)
    state = healthy
    for i, result in enumerate(results):
        run = 0
        for earlier in reversed(results[: i + 1]):
            if earlier != result:
                break
            run += 1
        flipped = tally.record(result)
        expected = run >= (success if result else failure) and result != state
        assert flipped == expected
        if flipped:
            state = result
        assert tally.healthy == state


# -- real probes against a loopback server -----------------------------------------------


class Answerer:
    """A tiny HTTP server: answers every request with ``status``; counts per status."""

    def __init__(self) -> None:
        self.status = 200
        self.raw: bytes | None = None  # when set, sent instead of a status line
        self.silent = False
        self.served: dict[int, int] = {}
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests.append(head)
        if self.silent:
            await asyncio.sleep(10)
        status = self.status
        self.served[status] = self.served.get(status, 0) + 1
        writer.write(self.raw or f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n".encode())
        await writer.drain()
        writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def run(scenario: Callable[[Answerer, int], Awaitable[None]]) -> None:
    async def main() -> None:
        answerer = Answerer()
        port = await answerer.start()
        try:
            await asyncio.wait_for(scenario(answerer, port), 20)
        finally:
            answerer.close()

    asyncio.run(main())


def http(port: int, **kw: Any) -> ProbeSpec:
    return ProbeSpec(kind="http", host="127.0.0.1", port=port, path="/ready", **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.parametrize(
    ("status", "passes"),
    [(200, True), (302, True), (399, True), (400, False), (404, False), (503, False)],
)
def test_http_probe_passes_on_200_to_399(status: int, passes: bool) -> None:
    async def scenario(answerer: Answerer, port: int) -> None:
        answerer.status = status
        assert await probe_once(http(port)) is passes
        assert answerer.requests[0].startswith(b"GET /ready HTTP/1.1\r\n")

    run(scenario)


def test_http_probe_fails_on_refusal_silence_and_garbage() -> None:
    async def scenario(answerer: Answerer, port: int) -> None:
        assert await probe_once(http(free_port())) is False
        answerer.raw = b"SSH-2.0-OpenSSH\r\n"
        assert await probe_once(http(port)) is False
        answerer.raw, answerer.silent = None, True
        assert await probe_once(http(port, timeout=0.05)) is False

    run(scenario)


def test_tcp_probe_passes_when_the_connection_opens() -> None:
    async def scenario(answerer: Answerer, port: int) -> None:
        assert await probe_once(ProbeSpec(kind="tcp", host="127.0.0.1", port=port)) is True
        refused = ProbeSpec(kind="tcp", host="127.0.0.1", port=free_port())
        assert await probe_once(refused) is False

    run(scenario)


def test_readiness_prober_flips_at_the_thresholds_as_the_server_flips() -> None:
    async def scenario(answerer: Answerer, port: int) -> None:
        changes: asyncio.Queue[tuple[bool, dict[int, int]]] = asyncio.Queue()
        spec = http(port, period=0.01, success_threshold=2, failure_threshold=3)
        prober = Prober.readiness(spec, lambda ok: changes.put_nowait((ok, dict(answerer.served))))
        assert not prober.healthy  # readiness starts failed
        answerer.status = 500
        prober.start()
        try:
            # Failing from the start changes nothing: it is already unready.
            while answerer.served.get(500, 0) < 4:
                await asyncio.sleep(0.01)
            assert changes.empty()
            answerer.status = 200
            ok, served = await changes.get()
            assert ok and served[200] == 2  # exactly success_threshold passes
            assert prober.healthy
            answerer.status = 503
            ok, served = await changes.get()
            assert not ok and served[503] == 3  # exactly failure_threshold failures
        finally:
            await prober.stop()

    run(scenario)


def test_liveness_prober_starts_healthy_and_stop_ends_reports() -> None:
    async def scenario(answerer: Answerer, port: int) -> None:
        changes: list[tuple[bool, int]] = []
        spec = http(port, period=0.01, failure_threshold=2)
        prober = Prober.liveness(spec, lambda ok: changes.append((ok, answerer.served.get(500, 0))))
        assert prober.healthy
        prober.start()
        while answerer.served.get(200, 0) < 3:
            await asyncio.sleep(0.01)
        assert changes == []  # passing keeps a live container live, silently
        answerer.status = 500
        while not changes:
            await asyncio.sleep(0.01)
        assert changes == [(False, 2)]  # exactly failure_threshold failures
        await prober.stop()
        answerer.status = 200
        await asyncio.sleep(0.05)  # a request sent just before stop may still be counted
        count = sum(answerer.served.values())
        await asyncio.sleep(0.05)
        assert sum(answerer.served.values()) == count and len(changes) == 1

    run(scenario)
