"""The Bookinfo services as real processes on loopback, called over real HTTP.

Each service runs as ``python -m meshlet.demo.bookinfo <service>`` on its own address
127.0.0.<100-250>, wired to the others through ``DETAILS_URL``, ``REVIEWS_URL`` and
``RATINGS_URL`` (no mesh in between). A recording upstream (conftest's ``Upstream``) stands in
for a service when a test needs to see what was sent to it. Every process is stopped with
SIGTERM at the end of its test (or module), and killed if it does not exit.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import Upstream, free_port

DETAILS_ERROR = "Error fetching product details!"
DETAILS_UNAVAILABLE = "Sorry, product details are currently unavailable for this book."
REVIEWS_ERROR = "Error fetching product reviews!"
REVIEWS_UNAVAILABLE = "Sorry, product reviews are currently unavailable for this book."
RATINGS_UNAVAILABLE = "Ratings service is currently unavailable"
FULL = 'class="glyphicon glyphicon-star"'
EMPTY = 'class="glyphicon glyphicon-star-empty"'
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: str

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class App:
    service: str
    process: subprocess.Popen[bytes]
    ip: str
    port: int
    out: Path
    err: Path

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.port}"

    def request(
        self,
        path: str,
        *,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        timeout: float = 30.0,
    ) -> Reply:
        conn = http.client.HTTPConnection(self.ip, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode())
        finally:
            conn.close()

    def stop(self, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
                raise
        return self.process.returncode


def _pod_address() -> tuple[str, int]:
    """A fresh loopback address and a port free on it (Linux routes all of 127/8 to lo)."""
    ip = f"127.0.0.{random.randint(100, 250)}"
    with socket.socket() as s:
        s.bind((ip, 0))
        return ip, int(s.getsockname()[1])


def closed_url() -> str:
    """A URL where nothing listens: calls to it are refused at once."""
    return f"http://127.0.0.1:{free_port()}"


def _wait_healthy(app: App, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if app.process.poll() is not None:
            raise RuntimeError(
                f"{app.service} exited with {app.process.returncode}:\n{app.err.read_text()}"
            )
        with contextlib.suppress(OSError):
            if app.request("/health", timeout=1).status == 200:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{app.service} did not answer /health:\n{app.err.read_text()}")


Launch = Callable[..., App]


def _launcher(directory: Path, started: list[App]) -> Launch:
    def launch(service: str, *args: str, **env: str) -> App:
        ip, port = _pod_address()
        base = {k: v for k, v in os.environ.items() if k.upper() not in PROXY_VARS}
        full_env = {**base, "PYTHONUNBUFFERED": "1", "POD_IP": ip, "PORT": str(port), **env}
        name = f"{service}-{len(started)}"
        out, err = directory / f"{name}.out", directory / f"{name}.err"
        process = subprocess.Popen(
            [sys.executable, "-m", "meshlet.demo.bookinfo", service, *args],
            stdout=out.open("wb"),
            stderr=err.open("wb"),
            env=full_env,
        )
        app = App(service, process, ip, port, out, err)
        started.append(app)
        _wait_healthy(app)
        return app

    return launch


def _stop_all(started: list[App]) -> None:
    for app in started:
        with contextlib.suppress(Exception):
            app.stop()


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launch]:
    """``launch(service, *args, **env)``: start a service and wait until it is healthy."""
    started: list[App] = []
    yield _launcher(tmp_path, started)
    _stop_all(started)


@dataclass
class Backends:
    details: App
    ratings: App
    reviews: dict[str, App]  # by version


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backends]:
    """details, ratings and reviews v1/v2/v3 (pods reviews-vN-test-1), shared by the module."""
    started: list[App] = []
    launch = _launcher(tmp_path_factory.mktemp("bookinfo"), started)
    try:
        details = launch("details")
        ratings = launch("ratings")
        reviews = {
            v: launch(
                "reviews",
                "--version",
                v,
                POD_NAME=f"reviews-{v}-test-1",
                RATINGS_URL=ratings.url,
            )
            for v in ("v1", "v2", "v3")
        }
        yield Backends(details, ratings, reviews)
    finally:
        _stop_all(started)


def _json_reply(handler: BaseHTTPRequestHandler, status: int, data: object) -> None:
    handler._reply(status, json.dumps(data).encode(), {"content-type": "application/json"})  # type: ignore[attr-defined]


def book_service(delay: float = 0.0, reviews_status: int = 200) -> Callable[..., None]:
    """An ``Upstream.override`` answering like details and reviews (by path, absolute-form
    targets included); reviews answers ``reviews_status`` after ``delay`` seconds."""

    def answer(handler: BaseHTTPRequestHandler) -> None:
        path = handler.path
        if "/details/" in path:
            _json_reply(handler, 200, {"id": 0, "author": "William Shakespeare"})
        elif "/reviews/" in path:
            time.sleep(delay)
            data = {"id": "0", "podname": "fake-pod", "reviews": [{"reviewer": "R", "text": "t"}]}
            _json_reply(handler, reviews_status, data)
        else:
            _json_reply(handler, 404, {"error": "not found"})

    return answer


def recording(make_upstream: Callable[..., Upstream], **kwargs: Any) -> Upstream:
    up = make_upstream("book")
    up.override = book_service(**kwargs)
    return up


def _url(up: Upstream) -> str:
    return f"http://127.0.0.1:{up.port}"


# -- the page --------------------------------------------------------------------------------


@pytest.mark.parametrize(("version", "color"), [("v1", None), ("v2", "black"), ("v3", "red")])
def test_the_page_shows_details_reviews_and_the_stars_of_each_version(
    launch: Launch, backends: Backends, version: str, color: str | None
) -> None:
    page = launch(
        "productpage",
        DETAILS_URL=backends.details.url,
        REVIEWS_URL=backends.reviews[version].url,
        RATINGS_URL=backends.ratings.url,
    )
    reply = page.request("/productpage")
    assert reply.status == 200
    html = reply.body
    assert "<title>Simple Bookstore App</title>" in html
    for text in ("The Comedy of Errors", "William Shakespeare", "PublisherA", "123-1234567890"):
        assert text in html
    assert "Reviewer1" in html and "Reviewer2" in html
    assert f"reviews-{version}-test-1" in html
    assert re.findall(r"reviews-v\d", html) == [f"reviews-{version}"]
    if color is None:
        assert FULL not in html and EMPTY not in html
    else:
        assert html.count(FULL) == 5 + 4
        assert html.count(EMPTY) == 1
        assert html.count(f'<font color="{color}">') == 2
    assert DETAILS_ERROR not in html and REVIEWS_ERROR not in html


def test_the_api_passes_on_details_reviews_and_ratings(launch: Launch, backends: Backends) -> None:
    page = launch(
        "productpage",
        DETAILS_URL=backends.details.url,
        REVIEWS_URL=backends.reviews["v2"].url,
        RATINGS_URL=backends.ratings.url,
    )
    assert page.request("/api/v1/products").json()[0]["title"] == "The Comedy of Errors"
    assert page.request("/api/v1/products/0").json()["ISBN-10"] == "1234567890"
    reviews = page.request("/api/v1/products/0/reviews").json()
    assert [r["rating"]["stars"] for r in reviews["reviews"]] == [5, 4]
    ratings = page.request("/api/v1/products/0/ratings").json()
    assert ratings == {"id": 0, "ratings": {"Reviewer1": 5, "Reviewer2": 4}}
    assert "/productpage" in page.request("/").body
    assert page.request("/static/bookinfo.css").status == 200


# -- users and headers -------------------------------------------------------------------------

TRACING = {
    "x-request-id": "6a3c5f0e-req",
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "x-b3-traceid": "80f198ee56343ba864fe8b2a57d3eff7",
    "x-b3-spanid": "e457b5a2e4d86bd1",
    "x-b3-sampled": "1",
    "user-agent": "bookinfo-test/1",
}


def test_login_makes_productpage_send_end_user_and_logout_stops_it(
    launch: Launch, make_upstream: Callable[..., Upstream]
) -> None:
    book = recording(make_upstream)
    page = launch("productpage", DETAILS_URL=_url(book), REVIEWS_URL=_url(book))

    login = page.request(
        "/login",
        method="POST",
        body=b"username=jason&passwd=secret",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert login.status == 302
    assert login.headers["location"] == "/productpage"
    cookie = login.headers["set-cookie"].split(";")[0]
    assert cookie == "user=jason"

    html = page.request(
        "/productpage", headers={"cookie": cookie, "x-unrelated": "nope", **TRACING}
    ).body
    assert 'class="user">jason<' in html
    assert sorted(s.path for s in book.seen) == ["/details/0", "/reviews/0"]
    for seen in book.seen:
        assert seen.headers["end-user"] == "jason"
        assert seen.headers["cookie"] == cookie
        for name, value in TRACING.items():
            assert seen.headers[name] == value
        assert "x-unrelated" not in seen.headers

    logout = page.request("/logout", headers={"cookie": cookie})
    assert logout.status == 302
    assert "Max-Age=0" in logout.headers["set-cookie"]
    book.seen.clear()
    page.request("/productpage")
    assert book.seen and all("end-user" not in s.headers for s in book.seen)


def test_an_incoming_end_user_header_is_passed_on(
    launch: Launch, make_upstream: Callable[..., Upstream]
) -> None:
    book = recording(make_upstream)
    page = launch("productpage", DETAILS_URL=_url(book), REVIEWS_URL=_url(book))
    page.request("/productpage", headers={"end-user": "jason"})
    assert [s.headers.get("end-user") for s in book.seen] == ["jason", "jason"]


def test_reviews_pass_on_the_listed_headers_to_ratings(
    launch: Launch, make_upstream: Callable[..., Upstream]
) -> None:
    ratings = make_upstream("ratings")
    ratings.override = lambda h: _json_reply(h, 200, {"id": 0, "ratings": {"Reviewer1": 1}})
    reviews = launch("reviews", "--version", "v2", RATINGS_URL=_url(ratings))
    headers = {**TRACING, "end-user": "jason", "cookie": "user=jason", "x-unrelated": "nope"}
    data = reviews.request("/reviews/0", headers=headers).json()
    assert [r["rating"] for r in data["reviews"]] == [
        {"stars": 1, "color": "black"},
        {"error": RATINGS_UNAVAILABLE},  # ratings named no stars for Reviewer2
    ]
    [seen] = ratings.seen
    assert seen.path == "/ratings/0"
    assert seen.headers["end-user"] == "jason"
    for name, value in TRACING.items():
        assert seen.headers[name] == value
    assert "cookie" not in seen.headers and "x-unrelated" not in seen.headers


def test_calls_go_through_the_http_proxy_to_the_services_names(
    launch: Launch, make_upstream: Callable[..., Upstream]
) -> None:
    # The mesh's way: HTTP_PROXY names the sidecar, and the URLs keep the service names.
    sidecar = recording(make_upstream)
    page = launch("productpage", HTTP_PROXY=_url(sidecar), NO_PROXY="127.0.0.200")
    assert DETAILS_ERROR not in page.request("/productpage").body
    assert [s.path for s in sidecar.seen] == [
        "http://details:9080/details/0",
        "http://reviews:9080/reviews/0",
    ]


# -- failures ----------------------------------------------------------------------------------


def test_details_down_shows_the_details_error(launch: Launch, backends: Backends) -> None:
    page = launch("productpage", DETAILS_URL=closed_url(), REVIEWS_URL=backends.reviews["v2"].url)
    html = page.request("/productpage").body
    assert DETAILS_ERROR in html and DETAILS_UNAVAILABLE in html
    assert REVIEWS_ERROR not in html
    assert html.count(FULL) == 9


def test_ratings_down_shows_the_ratings_error_under_each_review(
    launch: Launch, backends: Backends
) -> None:
    reviews = launch(
        "reviews", "--version", "v3", POD_NAME="reviews-v3-x", RATINGS_URL=closed_url()
    )
    page = launch("productpage", DETAILS_URL=backends.details.url, REVIEWS_URL=reviews.url)
    html = page.request("/productpage").body
    assert html.count(RATINGS_UNAVAILABLE) == 2
    assert FULL not in html
    assert REVIEWS_ERROR not in html


def test_productpage_tries_reviews_twice_then_shows_the_reviews_error(
    launch: Launch, make_upstream: Callable[..., Upstream]
) -> None:
    book = recording(make_upstream, reviews_status=503)
    page = launch("productpage", DETAILS_URL=_url(book), REVIEWS_URL=_url(book))
    html = page.request("/productpage").body
    assert REVIEWS_ERROR in html and REVIEWS_UNAVAILABLE in html
    assert [s.path for s in book.seen] == ["/details/0", "/reviews/0", "/reviews/0"]
    api = page.request("/api/v1/products/0/reviews")
    assert api.status == 503
    assert api.json() == {"error": REVIEWS_UNAVAILABLE}


@pytest.mark.slow
def test_productpage_gives_up_on_slow_reviews_after_two_timeouts(
    launch: Launch, make_upstream: Callable[..., Upstream]
) -> None:
    book = recording(make_upstream, delay=4.0)  # longer than the 3 s timeout
    page = launch("productpage", DETAILS_URL=_url(book), REVIEWS_URL=_url(book))
    html = page.request("/productpage", timeout=60).body
    assert REVIEWS_ERROR in html
    assert [s.path for s in book.seen] == ["/details/0", "/reviews/0", "/reviews/0"]


# -- the process ---------------------------------------------------------------------------------


@pytest.mark.parametrize("service", ["productpage", "details", "reviews", "ratings"])
def test_each_service_logs_a_line_per_request_and_exits_0_on_sigterm(
    launch: Launch, service: str
) -> None:
    app = launch(service, DETAILS_URL=closed_url(), REVIEWS_URL=closed_url())
    app.request("/health")
    app.request("/nowhere")
    assert app.stop() == 0
    lines = app.out.read_text().splitlines()
    assert sum('"GET /health HTTP/1.1" 200' in line for line in lines) >= 2  # + the wait
    assert sum('"GET /nowhere HTTP/1.1" 404' in line for line in lines) == 1


def test_a_service_exits_0_on_sigterm_with_an_idle_keep_alive_connection(launch: Launch) -> None:
    app = launch("ratings")
    conn = http.client.HTTPConnection(app.ip, app.port, timeout=10)
    try:
        conn.request("GET", "/ratings/0")
        assert conn.getresponse().read()
        assert app.stop() == 0
    finally:
        conn.close()


def test_reviews_refuses_an_unknown_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshlet.demo.bookinfo", "reviews", "--version", "v4"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "v4" in result.stderr
