"""HTTP/1.1 message framing: status lines, heads, chunked encoding, the Date header.

Precomputed bytes so that writing a head is one ``b"".join``: status lines for every code,
and a ``date`` value refreshed at most once a second.
"""

from __future__ import annotations

import http
import time
from email.utils import formatdate

from meshlet.proxy.headers import Headers

CRLF = b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"

# Hop-by-hop headers (RFC 9110 §7.6.1) and the ones Envoy removes before forwarding.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
        b"trailer",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# Headers that steer Envoy's own behaviour; from clients they are untrusted (Envoy strips them
# from every non-internal request, and since 1.33 no address is internal by default).
ENVOY_CONTROL = frozenset(
    {
        b"x-envoy-retry-on",
        b"x-envoy-retry-grpc-on",
        b"x-envoy-max-retries",
        b"x-envoy-retriable-status-codes",
        b"x-envoy-retriable-header-names",
        b"x-envoy-upstream-alt-stat-name",
        b"x-envoy-upstream-rq-timeout-ms",
        b"x-envoy-upstream-rq-per-try-timeout-ms",
        b"x-envoy-upstream-rq-timeout-alt-response",
        b"x-envoy-expected-rq-timeout-ms",
        b"x-envoy-force-trace",
        b"x-envoy-ip-tags",
        b"x-envoy-original-url",
        b"x-envoy-hedge-on-per-try-timeout",
        b"x-envoy-internal",
    }
)


def _status_lines() -> dict[int, bytes]:
    lines = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in http.HTTPStatus}
    return lines


STATUS_LINES = _status_lines()


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    if line is None:
        line = STATUS_LINES[status] = f"HTTP/1.1 {status} Unknown\r\n".encode()
    return line


def reason_phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def serialize_headers(headers: Headers) -> bytes:
    """``name: value\\r\\n`` lines for every header (names are already lower-case)."""
    items = headers.items
    if not items:
        return b""
    # join of joins: measured 40% faster than concatenating each line
    return b"\r\n".join([b": ".join(kv) for kv in items]) + CRLF


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class DateCache:
    """The ``date`` header value, formatted at most once per second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = 0
        self._value = b""

    def value(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode()
        return self._value


DATE = DateCache()
