"""Malformed and ambiguous requests end to end: each is refused with the right status, the
connection is closed, nothing reaches the upstream, and the proxy keeps serving.

One proxy and one upstream serve the whole module (the cases are independent connections); the
``target`` fixture clears what the upstream saw and checks, after every test, that a normal
request on a new connection still works. Statuses follow RFC 9112 and Envoy's HTTP/1 codec
(ENVOY-SEMANTICS §7 "Malformed / special requests").
"""

from __future__ import annotations

import http
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import (
    Client,
    Proxy,
    Upstream,
    bootstrap,
    cluster,
    file_access_log,
    free_port,
    launch_proxy,
    stop_proxy,
)

MAX_HEADERS_KB = 16


@dataclass
class Target:
    proxy: Proxy
    upstream: Upstream
    access_log: Path


@pytest.fixture(scope="module")
def _shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    directory = tmp_path_factory.mktemp("smuggling")
    upstream = Upstream("upstream", free_port()).start()
    log = directory / "access.log"
    hcm = {"max_request_headers_kb": MAX_HEADERS_KB, **file_access_log(log)}
    proxy = launch_proxy(bootstrap(clusters=[cluster("web", upstream.port)], hcm=hcm), directory)
    try:
        yield Target(proxy, upstream, log)
    finally:
        stop_proxy(proxy)
        upstream.stop()


@pytest.fixture
def target(_shared: Target) -> Iterator[Target]:
    _shared.upstream.seen.clear()
    _shared.upstream.override = None
    yield _shared
    assert _shared.proxy.process.poll() is None, _shared.proxy.stderr()
    # The proxy keeps serving: a normal request on a new connection works.
    _shared.upstream.seen.clear()
    with Client(_shared.proxy.port) as c:
        c.request("GET", "/bytes/3")
        r = c.read_response()
    assert (r.status, r.body) == (200, b"xxx"), _shared.proxy.stderr()


def _refused(target: Target, data: bytes | list[bytes], status: int) -> None:
    """Send ``data`` (pieces are sent apart); expect one ``status`` reply, then the close."""
    with Client(target.proxy.port) as c:
        for piece in [data] if isinstance(data, bytes) else data:
            try:
                c.send(piece)
            except (BrokenPipeError, ConnectionResetError):
                break  # refused before everything was sent
            time.sleep(0.01)
        r = c.read_response()
        assert r.status == status, (r.status, r.body)
        assert r.body == http.HTTPStatus(status).phrase.encode()
        assert r.header("connection") == "close"
        assert c.at_eof(), f"more after the reply: {c.buf[:200]!r}"
    time.sleep(0.1)  # had anything been forwarded, the upstream would have recorded it by now
    assert target.upstream.seen == []


H = b"Host: a\r\n"

MALFORMED = {
    # RFC 9112 §6.3 rule 3; Envoy http1.content_length_and_chunked_not_allowed.
    "content-length-and-chunked": (
        b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "chunked-and-content-length": (
        b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
        b"Content-Length: 5\r\n\r\n0\r\n\r\n",
        400,
    ),
    # RFC 9112 §6.3 rule 5: differing Content-Length values are unrecoverable.
    "duplicate-differing-content-length": (
        b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        400,
    ),
    "content-length-list": (
        b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 5, 6\r\n\r\nhello!",
        400,
    ),
    "content-length-with-sign": (
        b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: +5\r\n\r\nhello",
        400,
    ),
    # RFC 9112 §7.1: chunk-size is 1*HEXDIG.
    "invalid-chunk-size": (
        b"POST /echo HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    "chunk-size-overflow": (
        b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
        b"10000000000000000\r\nhello\r\n0\r\n\r\n",
        400,
    ),
    "chunk-line-ends-in-bare-lf": (
        b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
        400,
    ),
    # RFC 9112 §6.1: chunked applied twice.
    "chunked-twice": (
        b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    # Envoy http1.invalid_transfer_encoding: any coding but chunked is 501 (RFC 9112 §6.1).
    "unknown-transfer-coding-before-chunked": (
        b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501,
    ),
    "unknown-transfer-coding-alone": (
        b"POST /echo HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\nhello",
        501,
    ),
    # RFC 9112 §5.1: no whitespace between field name and colon (400).
    "whitespace-before-colon": (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    "tab-before-colon": (b"GET / HTTP/1.1\r\n" + H + b"X-A\t: b\r\n\r\n", 400),
    # RFC 9112 §5.2: obs-fold may be rejected with 400.
    "obs-fold": (b"GET / HTTP/1.1\r\n" + H + b"X-A: b\r\n c\r\n\r\n", 400),
    # RFC 9110 §5.5: CR, LF and NUL are never allowed in a field value.
    "nul-in-field-value": (b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n", 400),
    # RFC 9112 §2.2: a bare CR is invalid; we also refuse bare LF as a line end (strict).
    "bare-lf-in-request-line": (b"GET / HTTP/1.1\n" + H + b"\r\n", 400),
    "bare-lf-after-field": (b"GET / HTTP/1.1\r\nHost: a\nX-A: b\r\n\r\n", 400),
    "bare-cr-in-field": (b"GET / HTTP/1.1\r\nHost: a\rX-A: b\r\n\r\n", 400),
    # RFC 9112 §3: method is a token.
    "invalid-method": (b"G@T / HTTP/1.1\r\n" + H + b"\r\n", 400),
    "whitespace-in-target": (b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", 400),
    # RFC 9112 §3.2 / ENVOY-SEMANTICS §7 missing_host_header: HTTP/1.1 without Host is 400,
    # and so is more than one Host.
    "missing-host": (b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n", 400),
    "duplicate-host": (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    # RFC 9110 §15.6.6: a major version the server does not speak.
    "http-2-request-line": (b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505),
    # ENVOY-SEMANTICS §7 headers_too_large / too_many_headers: 431.
    "headers-over-max-request-headers-kb": (
        b"GET / HTTP/1.1\r\n"
        + H
        + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(20))
        + b"\r\n",
        431,
    ),
    "more-than-100-headers": (
        b"GET / HTTP/1.1\r\n" + H + b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n",
        431,
    ),
    # A request line longer than the header limit (RFC 9112 §3: 414 URI Too Long).
    "oversize-request-line": (
        b"GET /" + b"a" * (MAX_HEADERS_KB * 1024) + b" HTTP/1.1\r\n" + H,
        414,
    ),
}


@pytest.mark.parametrize(("data", "status"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_request_is_refused_closed_and_never_forwarded(target, data, status):
    _refused(target, data, status)


def test_malformed_request_split_into_single_bytes_is_refused_the_same(target):
    # Framing must not depend on how the bytes are cut into packets (RFC 9112 §6.3 rule 3).
    data, status = MALFORMED["content-length-and-chunked"]
    _refused(target, [data[i : i + 1] for i in range(len(data))], status)


def test_oversize_header_line_is_refused_before_it_ends(target):
    # ENVOY-SEMANTICS §7: 431 as soon as the header section passes max_request_headers_kb, not
    # when the (never-ending) line finally ends: the proxy must not buffer it without bound.
    head = b"GET / HTTP/1.1\r\n" + H + b"X-Big: "
    _refused(target, [head] + [b"v" * 65536] * 8, 431)


def test_connect_is_not_tunnelled_and_the_connection_closes(target):
    # ENVOY-SEMANTICS §7: CONNECT matches no ordinary route (404); the bytes after it would be
    # a tunnel, never HTTP to parse, so the connection closes.
    with Client(target.proxy.port) as c:
        c.send(
            b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\nGET /bytes/1 HTTP/1.1\r\n" + H + b"\r\n"
        )
        r = c.read_response()
        assert r.status == 404
        assert c.at_eof()
    assert target.upstream.seen == []


# -- requests that look like smuggling but are well-formed -----------------------------------------


def test_request_after_a_content_length_body_is_parsed_as_its_own_request(target):
    # RFC 9112 §6.3 rule 6: the body is exactly Content-Length octets; what follows is the next
    # request, not more body and not part of the first one.
    with Client(target.proxy.port) as c:
        c.send(
            b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nhello"
            b"GET /bytes/2 HTTP/1.1\r\n" + H + b"\r\n"
        )
        first, second = c.read_response("POST"), c.read_response()
    assert (first.status, first.body) == (200, b"hello")
    assert (second.status, second.body) == (200, b"xx")
    assert [(s.method, s.path, s.body) for s in target.upstream.seen] == [
        ("POST", "/echo", b"hello"),
        ("GET", "/bytes/2", b""),
    ]


def test_request_inside_a_body_stays_body(target):
    # RFC 9112 §6.2: bytes inside the Content-Length body are data, even if they read as HTTP.
    inner = b"GET /smuggled HTTP/1.1\r\n" + H + b"\r\n"
    with Client(target.proxy.port) as c:
        c.send(b"POST /echo HTTP/1.1\r\n" + H + b"Content-Length: %d\r\n\r\n" % len(inner))
        time.sleep(0.05)
        c.send(inner)
        r = c.read_response("POST")
    assert (r.status, r.body) == (200, inner)
    assert [s.path for s in target.upstream.seen] == ["/echo"]


def test_h2c_upgrade_request_body_is_its_body_not_a_request(target):
    # ENVOY-SEMANTICS §7 (h2c upgrades are ignored): the request keeps its body; the body is
    # never parsed as a request of its own, whether it comes with the head or after it.
    inner = b"GET /smuggled HTTP/1.1\r\n" + H + b"\r\n"
    head = (
        b"POST /echo HTTP/1.1\r\n" + H + b"Connection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
        b"Content-Length: %d\r\n\r\n" % len(inner)
    )
    with Client(target.proxy.port) as c:
        c.send(head + inner)
        r = c.read_response("POST")
        assert (r.status, r.body) == (200, inner)
        c.send(head)
        time.sleep(0.05)
        c.send(inner)
        r = c.read_response("POST")
        assert (r.status, r.body) == (200, inner)
    assert [(s.path, s.body) for s in target.upstream.seen] == [("/echo", inner)] * 2


def test_http10_request_with_transfer_encoding_is_served_then_the_connection_closes(target):
    # RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 message means faulty framing: process the
    # message, then close the connection (even if the client asked for keep-alive).
    with Client(target.proxy.port) as c:
        c.send(
            b"POST /echo HTTP/1.0\r\n" + H + b"Connection: keep-alive\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
            b"GET /bytes/1 HTTP/1.0\r\n" + H + b"Connection: keep-alive\r\n\r\n"
        )
        r = c.read_response("POST")
        assert (r.status, r.body, r.header("connection")) == (200, b"hi", "close")
        assert c.at_eof()
    assert [s.path for s in target.upstream.seen] == ["/echo"]


def test_malformed_request_pipelined_after_a_good_one_is_refused_after_its_answer(target):
    # RFC 9112 §9.3.2: responses keep request order. The good request is answered first, then
    # the malformed one gets its 400 and the connection closes; only the good one is forwarded.
    with Client(target.proxy.port) as c:
        c.send(
            b"GET /delay/0.2 HTTP/1.1\r\n" + H + b"\r\n"
            b"GET / HTTP/1.1\r\n" + H + b"Bad Header\r\n\r\n"
        )
        first = c.read_response()
        assert (first.status, first.body) == (200, b"delayed")
        second = c.read_response()
        assert second.status == 400
        assert c.at_eof()
    assert [s.path for s in target.upstream.seen] == ["/delay/0.2"]


# -- a malformed upstream response ----------------------------------------------------------------


def test_malformed_upstream_response_is_502_with_flag_upe(target):
    # ENVOY-SEMANTICS §8: an upstream protocol error before the response started => 502 with
    # the reset body and response flag UPE.
    with Client(target.proxy.port) as c:
        c.request("GET", "/garbage")
        r = c.read_response()
    assert r.status == 502
    assert r.body == (
        b"upstream connect error or disconnect/reset before headers. reset reason: protocol error"
    )
    deadline = time.monotonic() + 5
    lines: list[str] = []
    while not lines and time.monotonic() < deadline:
        time.sleep(0.1)
        text = target.access_log.read_text() if target.access_log.exists() else ""
        lines = [line for line in text.splitlines() if " /garbage " in line]
    assert lines and lines[0].startswith("502 UPE "), lines
