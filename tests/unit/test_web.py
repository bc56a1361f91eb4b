"""meshlet.web's server side without sockets: bytes in through a StreamReader, a request or
the error that refuses it out; responses on the wire; the control API served through it."""

from __future__ import annotations

import asyncio
import json

import pytest

from meshlet.control.api import ApiHandler, ApiServer, status
from meshlet.control.store import Store
from meshlet.web import MAX_BODY, ErrorBody, Request, Response, json_error, read_request


def read(raw: bytes, error: ErrorBody = json_error) -> Request | Response:
    async def go() -> Request | Response:
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        return await read_request(reader, error)

    return asyncio.run(go())


def test_a_request_is_read_with_path_query_headers_and_body() -> None:
    request = read(
        b"POST /v1/traces?a=1&a=2&b=x%20y HTTP/1.1\r\nHost: h\r\n"
        b"Content-Type: application/json; charset=utf-8\r\ncontent-length: 5\r\n\r\nhello"
    )
    assert isinstance(request, Request)
    assert (request.method, request.path, request.body) == ("POST", "/v1/traces", b"hello")
    assert request.query == {"a": ["1", "2"], "b": ["x y"]}
    assert request.query_string == "a=1&a=2&b=x%20y"
    assert request.arg("a") == "1" and request.arg("c", "none") == "none"
    assert request.content_type == "application/json"


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        # RFC 9110 §15.5.12: the body has no defined length, and we do not decode chunked.
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411),
        (b"POST / HTTP/1.1\r\ncontent-length: %d\r\n\r\n" % (MAX_BODY + 1), 413),
        (b"POST / HTTP/1.1\r\ncontent-length: -1\r\n\r\n", 413),
        (b"POST / HTTP/1.1\r\ncontent-length: ten\r\n\r\n", 400),
        (b"GET /\r\n\r\n", 400),
    ],
    ids=["chunked", "too-large", "negative-length", "bad-length", "no-version"],
)
def test_requests_we_cannot_read_are_refused_in_the_servers_error_shape(
    raw: bytes, code: int
) -> None:
    refused = read(raw)
    assert isinstance(refused, Response) and refused.status == code
    assert json.loads(refused.body)["code"] == code
    as_status = read(raw, status)  # the control plane API's shape: a Kubernetes Status
    assert isinstance(as_status, Response) and as_status.status == code
    assert json.loads(as_status.body)["kind"] == "Status"


def test_a_response_is_one_piece_with_length_no_store_and_close() -> None:
    wire = Response.text("ready\n").encode()
    assert wire == (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: 6\r\n"
        b"cache-control: no-store\r\nconnection: close\r\n\r\nready\n"
    )
    assert Response(status=599, body=b"").encode().startswith(b"HTTP/1.1 599 Unknown\r\n")


def test_the_control_api_answers_a_served_request_as_handle_does() -> None:
    api = ApiHandler(store=Store.memory(), config_dump=lambda proxy, kind: {proxy: kind})
    request = Request(
        method="GET",
        path="/debug/config_dump",
        query_string="proxy=sidecar~1&type=routes",
    )
    response = asyncio.run(api(request))
    assert (response.status, json.loads(response.body)) == (200, {"sidecar~1": "routes"})
    assert response == api.handle("GET", "/debug/config_dump?proxy=sidecar~1&type=routes", b"")
    assert ApiServer(api, "127.0.0.1:0").error is status
