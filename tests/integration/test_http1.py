"""The downstream HTTP/1.1 connection manager end to end: a real ``meshlet proxy`` process, real
sockets, and a raw client that sees exactly the bytes the proxy writes.

Each test names the behaviour it proves and cites RFC 9112 / RFC 9110 or the Envoy behaviour
(ENVOY-SEMANTICS §4, §7, §8) it follows.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import (
    FAULT,
    ROUTER,
    Client,
    ConnectionClosed,
    Proxy,
    Upstream,
    bootstrap,
    cluster,
    file_access_log,
    wait_for_lines,
)

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")

StartProxy = Callable[..., Proxy]


def _proxy(start_proxy: StartProxy, upstream: Upstream, **hcm: Any) -> Proxy:
    return start_proxy(bootstrap(clusters=[cluster("web", upstream.port)], hcm=hcm))


def _seen_headers(upstream: Upstream, index: int = 0) -> dict[str, str]:
    return upstream.seen[index].headers


# -- persistence ----------------------------------------------------------------------------------


def test_keep_alive_connection_carries_several_requests(upstream, start_proxy):
    # RFC 9112 §9.3: an HTTP/1.1 connection persists unless "close" is signalled.
    proxy = _proxy(start_proxy, upstream)
    with Client(proxy.port) as c:
        for n in (1, 2, 3):
            c.request("GET", f"/bytes/{n}")
            r = c.read_response()
            assert (r.status, r.body) == (200, b"x" * n)
            assert r.header("connection") is None
        assert not c.at_eof(timeout=0.2)
    assert [s.path for s in upstream.seen] == ["/bytes/1", "/bytes/2", "/bytes/3"]


def test_connection_close_from_client_is_echoed_and_the_connection_closes(upstream, start_proxy):
    # RFC 9112 §9.6; ENVOY-SEMANTICS §7: a client's "Connection: close" gets "connection: close"
    # and the proxy closes after the response.
    proxy = _proxy(start_proxy, upstream)
    with Client(proxy.port) as c:
        c.request("GET", "/bytes/4", "Connection: close")
        r = c.read_response()
        assert (r.status, r.body) == (200, b"xxxx")
        assert r.header("connection") == "close"
        assert c.at_eof()


def test_http10_request_without_keep_alive_closes_the_connection(upstream, start_proxy):
    # RFC 9112 §9.3: an HTTP/1.0 connection is not persistent unless the client asks for it.
    proxy = _proxy(start_proxy, upstream)
    with Client(proxy.port) as c:
        c.send(b"GET /bytes/2 HTTP/1.0\r\nHost: example.com\r\n\r\n")
        r = c.read_response()
        assert (r.status, r.body) == (200, b"xx")
        assert r.header("connection") == "close"
        assert c.at_eof()


def test_http10_request_with_keep_alive_keeps_the_connection(upstream, start_proxy):
    # RFC 9112 §C.2.2 (keep-alive for HTTP/1.0): the response says "keep-alive" and stays open.
    proxy = _proxy(start_proxy, upstream)
    with Client(proxy.port) as c:
        for n in (1, 2):
            c.send(b"GET /bytes/%d HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n" % n)
            r = c.read_response()
            assert (r.status, r.body) == (200, b"x" * n)
            assert r.header("connection") == "keep-alive"


def test_pipelined_requests_are_answered_in_order(upstream, start_proxy):
    # RFC 9112 §9.3.2: responses to pipelined requests come in the order of the requests, even
    # when the first one is the slowest.
    proxy = _proxy(start_proxy, upstream)
    with Client(proxy.port) as c:
        c.send(
            b"GET /delay/0.3 HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /bytes/3 HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /status/202 HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        got = [c.read_response() for _ in range(3)]
        assert [(r.status, r.body) for r in got] == [
            (200, b"delayed"),
            (200, b"xxx"),
            (202, b"status 202"),
        ]
        assert not c.at_eof(timeout=0.2)


def test_pipelined_requests_with_bodies_keep_each_body_with_its_request(upstream, start_proxy):
    # RFC 9112 §9.3.2 and §6.3: bodies of queued requests wait for their turn and go to their
    # own request, whatever their framing.
    proxy = _proxy(start_proxy, upstream)
    with Client(proxy.port) as c:
        c.send(
            b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\none"
            b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\ntwo\r\n0\r\n\r\n"
            b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nthree"
        )
        assert [c.read_response("POST").body for _ in range(3)] == [b"one", b"two", b"three"]
    assert [s.body for s in upstream.seen] == [b"one", b"two", b"three"]


def test_requests_after_connection_close_are_not_served(upstream, start_proxy):
    # RFC 9112 §9.6: a server that received "close" does not process later requests on the
    # connection; they are never forwarded.
    proxy = _proxy(start_proxy, upstream)
    with Client(proxy.port) as c:
        c.send(
            b"GET /bytes/1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
            b"GET /bytes/2 HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        r = c.read_response()
        assert (r.status, r.body, r.header("connection")) == (200, b"x", "close")
        assert c.at_eof()
    time.sleep(0.1)
    assert [s.path for s in upstream.seen] == ["/bytes/1"]


def test_upstream_connection_close_does_not_close_the_client_connection(upstream, start_proxy):
    # RFC 9110 §7.6.1: Connection is hop-by-hop; the upstream closing its own connection is no
    # reason to close the client's.
    def closing(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Connection", "close")
        handler.send_header("Content-Length", "2")
        handler.end_headers()
        handler.wfile.write(b"ok")
        handler.close_connection = True

    upstream.override = closing
    proxy = _proxy(start_proxy, upstream)
    with Client(proxy.port) as c:
        for _ in range(2):
            c.request("GET", "/")
            r = c.read_response()
            assert (r.status, r.body, r.header("connection")) == (200, b"ok", None)


def test_http10_client_gets_an_unchunked_body_delimited_by_close(upstream, start_proxy):
    # RFC 9112 §7.1 / §6.3 rule 8: chunked is never sent to an HTTP/1.0 client; a body of
    # unknown length is delimited by closing the connection.
    proxy = _proxy(start_proxy, upstream)
    with Client(proxy.port) as c:
        c.send(b"GET /chunked/3000 HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n")
        r = c.read_response()
        assert (r.status, r.chunked, r.body) == (200, False, b"y" * 3000)
        assert r.header("transfer-encoding") is None
        assert c.at_eof()


# -- bodies ---------------------------------------------------------------------------------------


def test_content_length_request_body_reaches_the_upstream_intact(upstream, start_proxy):
    # RFC 9112 §6.2: the body is exactly Content-Length octets, any byte values.
    proxy = _proxy(start_proxy, upstream)
    body = bytes(range(256)) * 1024
    with Client(proxy.port) as c:
        c.request("POST", "/echo", body=body)
        r = c.read_response("POST")
    assert (r.status, r.body) == (200, body)
    assert upstream.seen[0].body == body
    assert upstream.seen[0].headers["content-length"] == str(len(body))


def test_chunked_request_body_reaches_the_upstream_intact(upstream, start_proxy):
    # RFC 9112 §7.1: chunks (with extensions and a trailer section, split across packets) are
    # decoded and re-framed; the upstream gets the same bytes and the connection stays in step.
    proxy = _proxy(start_proxy, upstream)
    with Client(proxy.port) as c:
        c.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (b"5;ext=1\r\nhello\r\n", b"1\r\n \r\n", b"6\r\nworld!\r\n", b"0\r\n"):
            time.sleep(0.02)
            c.send(piece)
        c.send(b"X-Trailer: t\r\n\r\n")
        r = c.read_response("POST")
        c.request("GET", "/bytes/1")
        assert c.read_response().body == b"x"
    assert (r.status, r.body) == (200, b"hello world!")
    assert upstream.seen[0].body == b"hello world!"
    assert upstream.seen[0].headers.get("transfer-encoding") == "chunked"


def test_chunked_response_comes_back_intact(upstream, start_proxy):
    # RFC 9112 §7.1: a response without Content-Length is sent chunked to an HTTP/1.1 client.
    proxy = _proxy(start_proxy, upstream)
    with Client(proxy.port) as c:
        c.request("GET", "/chunked/100000")
        r = c.read_response()
        assert r.status == 200 and r.chunked
        assert r.body == b"y" * 100000
        c.request("GET", "/bytes/1")  # the framing ended exactly: the connection is reusable
        assert c.read_response().body == b"x"


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_one_gib_upload_streams_through_with_bounded_memory(upstream, start_proxy):
    # RFC 9112 §6.2 + Envoy's flow control: a body is streamed to the upstream as it arrives,
    # never buffered whole; the proxy's RSS stays flat while 1 GiB goes through. (Measured on
    # the 2-core VM: about 2 s into the upstream's /sink, RSS growth under 1 MiB.)
    proxy = _proxy(start_proxy, upstream)
    size = 1 << 30
    piece = memoryview(bytes(1 << 20))

    def body() -> Iterator[memoryview]:
        for _ in range(size // len(piece)):
            yield piece

    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(_rss_kib(proxy.process.pid))
            time.sleep(0.02)

    with Client(proxy.port) as c:  # one request first: lazy imports and pools are warm
        c.request("POST", "/sink", body=b"warm")
        assert c.read_response("POST").body == b"4"
    baseline = _rss_kib(proxy.process.pid)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        with Client(proxy.port, timeout=60) as c:
            c.send(b"POST /sink HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size)
            for data in body():
                c.send(data)
            r = c.read_response("POST")
    finally:
        done.set()
        sampler.join()
    assert (r.status, r.body) == (200, b"%d" % size)
    growth_mib = (max(samples) - baseline) / 1024
    assert samples and growth_mib < 32, (baseline, max(samples))


# -- Expect, HEAD, 204, 304 -----------------------------------------------------------------------


def test_expect_100_continue_is_answered_by_the_proxy_and_not_forwarded(upstream, start_proxy):
    # RFC 9110 §10.1.1; Envoy proxy_100_continue=false (ENVOY-SEMANTICS §7): the proxy sends
    # "100 Continue" itself and removes the expectation before forwarding.
    proxy = _proxy(start_proxy, upstream)
    with Client(proxy.port) as c:
        c.send(
            b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        interim = c.read_response("POST")
        assert interim.status == 100
        c.send(b"hello")
        r = c.read_response("POST")
        assert (r.status, r.body) == (200, b"hello")
    assert "expect" not in _seen_headers(upstream)


def _no_body_upstream(handler: BaseHTTPRequestHandler) -> None:
    """A well-behaved upstream for bodiless responses: /nobody/N answers N without a body (304
    with the Content-Length of the representation), /bytes/N and /chunked/N answer N bytes
    (none to HEAD)."""
    parts = handler.path.strip("/").split("/")
    if parts[0] == "nobody":
        handler.send_response(int(parts[1]))
        if parts[1] == "304":
            handler.send_header("content-length", "10")
        handler.end_headers()
    elif parts[0] == "chunked":
        handler.send_response(200)
        handler.send_header("transfer-encoding", "chunked")
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (int(parts[1]), b"y" * int(parts[1])))
    else:
        n = int(parts[1])
        handler.send_response(200)
        handler.send_header("content-length", str(n))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(b"x" * n)


def test_head_204_and_304_responses_have_no_body_and_the_connection_stays_usable(
    upstream, start_proxy
):
    # RFC 9112 §6.3 rule 1: responses to HEAD, and 1xx/204/304 responses, end after their
    # header section whatever their Content-Length says; RFC 9110 §8.6: no Content-Length on 204.
    upstream.override = _no_body_upstream
    proxy = _proxy(start_proxy, upstream)
    with Client(proxy.port) as c:
        c.request("HEAD", "/bytes/100")
        r = c.read_response("HEAD")
        assert r.status == 200 and r.header("content-length") == "100"
        assert r.header("transfer-encoding") is None
        c.request("HEAD", "/chunked/10")  # no length known: still no body, not even a last chunk
        assert c.read_response("HEAD").status == 200
        c.request("GET", "/nobody/204")
        r = c.read_response()
        assert r.status == 204
        assert r.header("content-length") is None and r.header("transfer-encoding") is None
        c.request("GET", "/nobody/304")
        r = c.read_response()
        assert r.status == 304 and r.header("transfer-encoding") is None
        # Had any of them carried a body, this response would not parse as the next one.
        c.request("GET", "/bytes/5")
        r = c.read_response()
        assert (r.status, r.body) == (200, b"xxxxx")
        assert not c.at_eof(timeout=0.2)


# -- header rules ---------------------------------------------------------------------------------


def test_hop_by_hop_request_headers_are_not_forwarded(upstream, start_proxy):
    # RFC 9110 §7.6.1; ENVOY-SEMANTICS §4: connection, keep-alive, proxy-connection, upgrade (on
    # a request that is no upgrade) and Connection-nominated headers are removed; te is dropped
    # but for "trailers".
    proxy = _proxy(start_proxy, upstream)
    with Client(proxy.port) as c:
        c.request(
            "GET",
            "/headers",
            "Connection: keep-alive, X-Secret",
            "X-Secret: 1",
            "Keep-Alive: timeout=5",
            "Proxy-Connection: keep-alive",
            "TE: trailers, deflate",
            "Upgrade: foo/2",
            "X-Kept: yes",
        )
        r = c.read_response()
        assert r.status == 200
    seen = _seen_headers(upstream)
    for name in ("connection", "x-secret", "keep-alive", "proxy-connection", "upgrade"):
        assert name not in seen, name
    assert seen["te"] == "trailers"
    assert seen["x-kept"] == "yes"


def test_hop_by_hop_response_headers_are_not_forwarded(upstream, start_proxy):
    # RFC 9110 §7.6.1 (a proxy removes Connection-nominated fields it forwards);
    # ENVOY-SEMANTICS §4: connection, keep-alive, proxy-connection, upgrade leave responses.
    def reply(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        for name, value in (
            ("Connection", "X-Hop"),
            ("X-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Connection", "keep-alive"),
            ("Upgrade", "foo"),
            ("X-End", "kept"),
            ("Content-Length", "2"),
        ):
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(b"ok")

    upstream.override = reply
    proxy = _proxy(start_proxy, upstream)
    with Client(proxy.port) as c:
        c.request("GET", "/")
        r = c.read_response()
    assert (r.status, r.body) == (200, b"ok")
    names = {k.lower() for k, _ in r.headers}
    assert not names & {"connection", "x-hop", "keep-alive", "proxy-connection", "upgrade"}
    assert r.header("x-end") == "kept"


def test_websocket_upgrade_is_refused_with_403_and_the_connection_closed(upstream, start_proxy):
    # ENVOY-SEMANTICS §7: an upgrade with no upgrade_configs is answered 403 (upgrade_failed),
    # never forwarded, and the connection is closed after the reply.
    proxy = _proxy(start_proxy, upstream)
    with Client(proxy.port) as c:
        c.request(
            "GET",
            "/ws",
            "Connection: Upgrade",
            "Upgrade: websocket",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
        )
        r = c.read_response()
        assert r.status == 403
        assert r.header("connection") == "close"
        assert c.at_eof()
    assert upstream.seen == []


def test_h2c_upgrade_is_ignored_and_the_next_pipelined_request_is_served(upstream, start_proxy):
    # ENVOY-SEMANTICS §7: "Upgrade: h2c" is removed and the request is served as HTTP/1.1
    # (RFC 9110 §7.8: a server may ignore Upgrade); requests pipelined after it are not lost.
    proxy = _proxy(start_proxy, upstream)
    h2c = (
        b"GET /bytes/%d HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    )
    with Client(proxy.port) as c:
        c.send(h2c % 1 + h2c % 2 + b"GET /bytes/3 HTTP/1.1\r\nHost: a\r\n\r\n")
        got = [c.read_response() for _ in range(3)]
        assert [(r.status, r.body) for r in got] == [(200, b"x"), (200, b"xx"), (200, b"xxx")]
    assert [s.path for s in upstream.seen] == ["/bytes/1", "/bytes/2", "/bytes/3"]
    for seen in upstream.seen:
        assert "upgrade" not in seen.headers and "http2-settings" not in seen.headers


def test_x_request_id_is_generated_when_absent_and_kept_when_present(upstream, start_proxy):
    # Envoy HCM generate_request_id (ENVOY-SEMANTICS §4): a UUIDv4 when absent; an incoming id
    # is kept (without use_remote_address the request is not an edge request).
    proxy = _proxy(start_proxy, upstream)
    with Client(proxy.port) as c:
        c.request("GET", "/")
        c.read_response()
        c.request("GET", "/", "X-Request-Id: my-id-1")
        c.read_response()
        c.request("GET", "/")
        c.read_response()
    first, kept, third = (s.headers["x-request-id"] for s in upstream.seen)
    assert UUID4.match(first) and UUID4.match(third) and first != third
    assert kept == "my-id-1"


def test_x_forwarded_proto_is_set_and_an_incoming_one_kept_without_use_remote_address(
    upstream, start_proxy
):
    # ENVOY-SEMANTICS §4 (x-forwarded-proto, and §10 "code read keeps an incoming value").
    proxy = _proxy(start_proxy, upstream)
    with Client(proxy.port) as c:
        c.request("GET", "/")
        c.read_response()
        c.request("GET", "/", "X-Forwarded-Proto: https")
        c.read_response()
    assert [s.headers["x-forwarded-proto"] for s in upstream.seen] == ["http", "https"]
    assert "x-forwarded-for" not in _seen_headers(upstream)


def test_use_remote_address_appends_the_peer_to_x_forwarded_for(upstream, start_proxy):
    # ENVOY-SEMANTICS §4 (x-forwarded-for, x-forwarded-proto, x-request-id with
    # use_remote_address): the peer is appended, x-forwarded-proto reflects the downstream
    # connection (plain TCP here, whatever the target's scheme says), and an edge request's id
    # is replaced.
    proxy = _proxy(start_proxy, upstream, use_remote_address=True)
    with Client(proxy.port) as c:
        c.request("GET", "/")
        c.read_response()
        c.send(
            b"GET https://example.com/x HTTP/1.1\r\nHost: example.com\r\n"
            b"X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\n"
            b"X-Request-Id: client-chosen\r\n\r\n"
        )
        c.read_response()
    plain, forwarded = (s.headers for s in upstream.seen)
    assert plain["x-forwarded-for"] == "127.0.0.1"
    assert forwarded["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert forwarded["x-forwarded-proto"] == "http"
    assert UUID4.match(forwarded["x-request-id"])


def test_client_sent_envoy_control_headers_are_stripped_and_ignored(upstream, start_proxy):
    # ENVOY-SEMANTICS §4 "Non-internal requests lose x-envoy-retry-on, ..."; since Envoy 1.33 no
    # address is internal by default. A 1 ms timeout the client asks for is not applied.
    proxy = _proxy(start_proxy, upstream)
    with Client(proxy.port) as c:
        c.request(
            "GET",
            "/delay/0.2",
            "X-Envoy-Retry-On: 5xx",
            "X-Envoy-Max-Retries: 3",
            "X-Envoy-Upstream-Rq-Timeout-Ms: 1",
            "X-Envoy-Force-Trace: true",
            "X-Envoy-Internal: true",
        )
        r = c.read_response()
    assert r.status == 200
    seen = _seen_headers(upstream)
    for name in ("retry-on", "max-retries", "upstream-rq-timeout-ms", "force-trace", "internal"):
        assert f"x-envoy-{name}" not in seen, name
    # The one the proxy sets itself comes from the route (15 s default), not from the client.
    assert seen["x-envoy-expected-rq-timeout-ms"] == "15000"


# -- explicit proxy -------------------------------------------------------------------------------


def test_absolute_form_target_is_routed_by_its_authority(make_upstream, start_proxy):
    # RFC 9112 §3.2.2: with an absolute-form target the Host header is ignored and replaced by
    # the target's authority, which picks the virtual host; the upstream gets origin-form.
    svc, other = make_upstream("svc"), make_upstream("other")
    vhosts = [
        {
            "name": "svc",
            "domains": ["svc.example:9080"],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "svc"}}],
        },
        {
            "name": "other",
            "domains": ["other.example", "*"],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "other"}}],
        },
    ]
    clusters = [cluster("svc", svc.port), cluster("other", other.port)]
    proxy = start_proxy(bootstrap(clusters=clusters, virtual_hosts=vhosts))
    with Client(proxy.port) as c:
        c.send(b"GET http://svc.example:9080/x?q=1 HTTP/1.1\r\nHost: other.example\r\n\r\n")
        assert c.read_response().body == b"hello from svc"
        c.send(b"GET http://other.example/y HTTP/1.1\r\nHost: svc.example:9080\r\n\r\n")
        assert c.read_response().body == b"hello from other"
    assert [(s.path, s.headers["host"]) for s in svc.seen] == [("/x?q=1", "svc.example:9080")]
    assert [(s.path, s.headers["host"]) for s in other.seen] == [("/y", "other.example")]


# -- timeouts -------------------------------------------------------------------------------------


def test_request_headers_timeout_answers_408_and_closes(upstream, start_proxy):
    # ENVOY-SEMANTICS §7 request_headers_timeout: headers not complete in time => 408
    # "request header timeout", then the connection closes.
    proxy = _proxy(start_proxy, upstream, request_headers_timeout="0.3s")
    with Client(proxy.port) as c:
        started = time.monotonic()
        c.send(b"GET / HTTP/1.1\r\nHost: a\r\n")  # no blank line: the head never ends
        r = c.read_response()
        assert time.monotonic() - started >= 0.25
        assert (r.status, r.body) == (408, b"request header timeout")
        assert r.header("connection") == "close"
        assert c.at_eof()
    assert upstream.seen == []


def test_request_timeout_answers_408_when_the_body_is_too_slow(upstream, start_proxy):
    # ENVOY-SEMANTICS §7 request_timeout: the whole request must arrive in time; 408 "request
    # timeout" while it is incomplete, and the connection closes (the body cannot be skipped).
    proxy = _proxy(start_proxy, upstream, request_timeout="0.5s")
    with Client(proxy.port) as c:
        c.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhello")
        r = c.read_response("POST")
        assert (r.status, r.body) == (408, b"request timeout")
        assert r.header("connection") == "close"
        assert c.at_eof()


def test_request_timeout_does_not_fire_once_the_request_is_complete(upstream, start_proxy):
    # ENVOY-SEMANTICS §7: request_timeout covers receiving the request, not waiting for the
    # response (that is the route timeout).
    proxy = _proxy(start_proxy, upstream, request_timeout="0.3s")
    with Client(proxy.port) as c:
        c.request("POST", "/delay/0.6", body=b"data")
        r = c.read_response("POST")
    assert (r.status, r.body) == (200, b"delayed")


def test_stream_idle_timeout_answers_504_when_the_upstream_is_silent(
    upstream, start_proxy, tmp_path: Path
):
    # ENVOY-SEMANTICS §7/§8 stream_idle_timeout: no activity on a stream whose request is
    # complete => 504 "stream timeout", response flag SI; the connection stays usable.
    log = tmp_path / "access.log"
    hcm = {"stream_idle_timeout": "0.4s", **file_access_log(log)}
    proxy = _proxy(start_proxy, upstream, **hcm)
    with Client(proxy.port) as c:
        c.request("GET", "/delay/2")
        r = c.read_response()
        assert (r.status, r.body) == (504, b"stream timeout")
        c.request("GET", "/bytes/2")
        assert c.read_response().body == b"xx"
    assert wait_for_lines(log, 1)[0].startswith("504 SI ")


def test_stream_idle_timeout_is_reset_by_activity(upstream, start_proxy):
    # Envoy HCM stream_idle_timeout is an *idle* timer: a body trickling in slower than the
    # timeout overall, but faster than it between pieces, is not cut.
    proxy = _proxy(start_proxy, upstream, stream_idle_timeout="0.6s")
    with Client(proxy.port) as c:
        c.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 8\r\n\r\n")
        for piece in (b"ab", b"cd", b"ef", b"gh"):  # 0.8 s in all, never 0.6 s idle
            time.sleep(0.2)
            c.send(piece)
        r = c.read_response("POST")
    assert (r.status, r.body) == (200, b"abcdefgh")


def test_stream_idle_timeout_closes_a_response_that_stalls(upstream, start_proxy):
    # ENVOY-SEMANTICS §7: once the response has started, a stream idle timeout can only reset it:
    # the client sees a truncated body and the connection closes.
    def stall(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("content-length", "10")
        handler.end_headers()
        handler.wfile.write(b"12345")
        handler.wfile.flush()
        time.sleep(2)

    upstream.override = stall
    proxy = _proxy(start_proxy, upstream, stream_idle_timeout="0.4s")
    with Client(proxy.port) as c:
        c.request("GET", "/")
        with pytest.raises(ConnectionClosed):
            c.read_response()
        assert c.buf == b"12345"


def test_route_idle_timeout_overrides_the_stream_idle_timeout(upstream, start_proxy):
    # Envoy RouteAction.idle_timeout (ENVOY-SEMANTICS §3 timeouts) replaces the HCM's
    # stream_idle_timeout for requests on that route.
    routes = [
        {"match": {"prefix": "/patient"}, "route": {"cluster": "web", "idle_timeout": "5s"}},
        {"match": {"prefix": "/"}, "route": {"cluster": "web"}},
    ]
    config = bootstrap(
        clusters=[cluster("web", upstream.port)],
        routes=routes,
        hcm={"stream_idle_timeout": "0.3s"},
    )
    proxy = start_proxy(config)

    def slow(handler: BaseHTTPRequestHandler) -> None:
        time.sleep(0.6)
        handler.send_response(200)
        handler.send_header("content-length", "0")
        handler.end_headers()

    upstream.override = slow
    with Client(proxy.port) as c:
        c.request("GET", "/patient")
        assert c.read_response().status == 200
        c.request("GET", "/impatient")
        assert c.read_response().status == 504


def test_idle_keep_alive_connection_is_closed_by_the_proxy(upstream, start_proxy):
    # ENVOY-SEMANTICS §7 common_http_protocol_options.idle_timeout: a connection with no active
    # stream for that long is closed by the proxy.
    proxy = _proxy(start_proxy, upstream, common_http_protocol_options={"idle_timeout": "0.3s"})
    with Client(proxy.port) as c:
        c.request("GET", "/bytes/1")
        assert c.read_response().body == b"x"
        assert c.at_eof(timeout=3)
    with Client(proxy.port) as c:  # never used at all
        assert c.at_eof(timeout=3)


def test_idle_timeout_spares_a_connection_with_a_request_in_flight(upstream, start_proxy):
    # The idle timeout counts only time without active streams (Envoy CORE idle_timeout).
    proxy = _proxy(start_proxy, upstream, common_http_protocol_options={"idle_timeout": "0.3s"})
    with Client(proxy.port) as c:
        c.request("GET", "/delay/0.8")
        assert c.read_response().body == b"delayed"


# -- the fault filter's delay and a request body ---------------------------------------------------


def test_fault_delay_on_a_request_with_a_body_still_forwards_it(upstream, start_proxy):
    # Envoy fault filter (ENVOY-SEMANTICS §5): a delayed request is forwarded after the delay,
    # body included; finishing the body must not cancel the delay timer.
    filters = [
        {
            "name": "envoy.filters.http.fault",
            "typed_config": {
                "@type": FAULT,
                "delay": {"fixed_delay": "0.2s", "percentage": {"numerator": 100}},
            },
        },
        {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}},
    ]
    proxy = start_proxy(bootstrap(clusters=[cluster("web", upstream.port)], http_filters=filters))
    with Client(proxy.port) as c:
        c.request("POST", "/echo", body=b"payload")
        r = c.read_response("POST")
    assert (r.status, r.body) == (200, b"payload")
