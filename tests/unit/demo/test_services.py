"""The services as values: Request in, Reply out; upstream calls through a fake ``fetch``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from meshlet.demo.bookinfo.details import Details
from meshlet.demo.bookinfo.page import (
    DETAILS_ERROR,
    DETAILS_UNAVAILABLE,
    REVIEWS_ERROR,
    REVIEWS_UNAVAILABLE,
)
from meshlet.demo.bookinfo.productpage import ProductPage, valid_user
from meshlet.demo.bookinfo.ratings import Ratings
from meshlet.demo.bookinfo.reviews import FLAVORS, RATINGS_UNAVAILABLE, Reviews
from meshlet.demo.bookinfo.service import Fetched, Reply, Request, Settings, upstream_url


@dataclass
class Call:
    url: str
    headers: dict[str, str]
    timeout: float


@dataclass
class FakeFetch:
    """Answers by URL prefix; records every call. An unscripted URL fails like a refusal."""

    answers: dict[str, Fetched] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)

    def __call__(self, url: str, headers: Mapping[str, str], timeout: float) -> Fetched:
        self.calls.append(Call(url, dict(headers), timeout))
        for prefix, answer in self.answers.items():
            if url.startswith(prefix):
                return answer
        return Fetched(status=None, error="connection refused")

    def urls(self) -> list[str]:
        return [c.url for c in self.calls]


def get(path: str, headers: dict[str, str] | None = None, method: str = "GET") -> Request:
    return Request.parse(method, path, headers or {})


def body(reply: Reply) -> Any:
    return json.loads(reply.body)


# -- details and ratings ------------------------------------------------------------------------


def test_details_answers_istios_book() -> None:
    reply = Details().handle(get("/details/0"))
    assert reply.status == 200
    assert reply.content_type == "application/json"
    assert body(reply) == {
        "id": 0,
        "author": "William Shakespeare",
        "year": 1595,
        "type": "paperback",
        "pages": 200,
        "publisher": "PublisherA",
        "language": "English",
        "ISBN-10": "1234567890",
        "ISBN-13": "123-1234567890",
    }


def test_ratings_answers_five_and_four_stars() -> None:
    reply = Ratings().handle(get("/ratings/0"))
    assert body(reply) == {"id": 0, "ratings": {"Reviewer1": 5, "Reviewer2": 4}}


@pytest.mark.parametrize(("app", "path"), [(Details(), "/details/x"), (Ratings(), "/ratings/x")])
def test_a_non_numeric_product_id_is_a_400(app: Details | Ratings, path: str) -> None:
    reply = app.handle(get(path))
    assert reply.status == 400
    assert "numeric" in body(reply)["error"]


@pytest.mark.parametrize("app", [Details(), Ratings()])
def test_health_and_unknown_paths(app: Details | Ratings) -> None:
    assert app.handle(get("/health")).status == 200
    assert app.handle(get("/nope")).status == 404


# -- reviews ------------------------------------------------------------------------------------

RATINGS_OK = Fetched(status=200, data={"id": 0, "ratings": {"Reviewer1": 5, "Reviewer2": 4}})


def reviews(version: str, fetch: FakeFetch) -> Reviews:
    return Reviews(
        flavor=FLAVORS[version], podname="reviews-x-1", ratings_url="http://r:9", fetch=fetch
    )


def test_reviews_v1_does_not_call_ratings_and_has_no_rating() -> None:
    fetch = FakeFetch({"http://r:9": RATINGS_OK})
    data = body(reviews("v1", fetch).handle(get("/reviews/0")))
    assert fetch.calls == []
    assert data["podname"] == "reviews-x-1"
    assert [r["reviewer"] for r in data["reviews"]] == ["Reviewer1", "Reviewer2"]
    assert all("rating" not in r and r["text"] for r in data["reviews"])


@pytest.mark.parametrize(
    ("version", "color", "timeout"), [("v2", "black", 10.0), ("v3", "red", 2.5)]
)
def test_reviews_v2_v3_ask_ratings_with_their_timeout_and_colour(
    version: str, color: str, timeout: float
) -> None:
    fetch = FakeFetch({"http://r:9": RATINGS_OK})
    data = body(reviews(version, fetch).handle(get("/reviews/0")))
    assert [(c.url, c.timeout) for c in fetch.calls] == [("http://r:9/ratings/0", timeout)]
    assert [r["rating"] for r in data["reviews"]] == [
        {"stars": 5, "color": color},
        {"stars": 4, "color": color},
    ]


@pytest.mark.parametrize(
    "failure",
    [
        Fetched(status=None, error="timed out"),
        Fetched(status=503, error="HTTP 503"),
        Fetched(status=200, data={"unexpected": True}),
    ],
)
def test_reviews_show_the_ratings_error_on_each_review_when_ratings_fails(
    failure: Fetched,
) -> None:
    fetch = FakeFetch({"http://r:9": failure})
    reply = reviews("v2", fetch).handle(get("/reviews/0"))
    assert reply.status == 200
    assert [r["rating"] for r in body(reply)["reviews"]] == [{"error": RATINGS_UNAVAILABLE}] * 2


def test_reviews_pass_on_the_listed_headers_to_ratings() -> None:
    fetch = FakeFetch({"http://r:9": RATINGS_OK})
    incoming = {"end-user": "jason", "x-request-id": "r1", "cookie": "c", "x-other": "o"}
    reviews("v3", fetch).handle(get("/reviews/0", incoming))
    assert fetch.calls[0].headers == {"end-user": "jason", "x-request-id": "r1"}


# -- productpage --------------------------------------------------------------------------------

DETAILS_OK = Fetched(status=200, data={"id": 0, "author": "William Shakespeare", "type": "x"})
REVIEWS_OK = Fetched(
    status=200, data={"id": "0", "podname": "reviews-v1-abc", "reviews": [{"reviewer": "R"}]}
)


def productpage(fetch: FakeFetch) -> ProductPage:
    return ProductPage(
        details_url="http://d:1", reviews_url="http://v:2", ratings_url="http://r:3", fetch=fetch
    )


def test_the_page_calls_details_once_and_reviews_once_when_both_answer() -> None:
    fetch = FakeFetch({"http://d:1": DETAILS_OK, "http://v:2": REVIEWS_OK})
    reply = productpage(fetch).handle(get("/productpage"))
    assert reply.status == 200
    assert [(c.url, c.timeout) for c in fetch.calls] == [
        ("http://d:1/details/0", 3.0),
        ("http://v:2/reviews/0", 3.0),
    ]
    assert "reviews-v1-abc" in reply.body.decode()


@pytest.mark.parametrize(
    "failure", [Fetched(status=None, error="timed out"), Fetched(status=500, error="HTTP 500")]
)
def test_reviews_are_tried_twice_then_the_error_is_shown(failure: Fetched) -> None:
    fetch = FakeFetch({"http://d:1": DETAILS_OK, "http://v:2": failure})
    html = productpage(fetch).handle(get("/productpage")).body.decode()
    assert fetch.urls() == ["http://d:1/details/0", *["http://v:2/reviews/0"] * 2]
    assert REVIEWS_ERROR in html
    assert REVIEWS_UNAVAILABLE in html
    assert DETAILS_ERROR not in html


def test_details_are_tried_once_then_the_error_is_shown() -> None:
    fetch = FakeFetch({"http://d:1": Fetched(status=503), "http://v:2": REVIEWS_OK})
    html = productpage(fetch).handle(get("/productpage")).body.decode()
    assert fetch.urls().count("http://d:1/details/0") == 1
    assert DETAILS_ERROR in html
    assert DETAILS_UNAVAILABLE in html
    assert REVIEWS_ERROR not in html


def test_login_sets_the_user_cookie_and_the_page_sends_end_user() -> None:
    page = productpage(FakeFetch({"http://d:1": DETAILS_OK, "http://v:2": REVIEWS_OK}))
    login = page.handle(Request.parse("POST", "/login", {}, b"username=jason&passwd=x"))
    assert login.status == 302
    headers = dict(login.headers)
    assert headers["Location"] == "/productpage"
    assert headers["Set-Cookie"].startswith("user=jason;")
    cookie = headers["Set-Cookie"].split(";")[0]
    reply = page.handle(get("/productpage", {"cookie": cookie, "x-request-id": "r1"}))
    assert 'class="user">jason<' in reply.body.decode()
    fetch = page.fetch
    assert isinstance(fetch, FakeFetch)
    for call in fetch.calls:
        assert call.headers == {"end-user": "jason", "cookie": cookie, "x-request-id": "r1"}


def test_logout_clears_the_cookie() -> None:
    reply = productpage(FakeFetch()).handle(get("/logout"))
    assert reply.status == 302
    assert "Max-Age=0" in dict(reply.headers)["Set-Cookie"]


@pytest.mark.parametrize("name", ["", "   ", "a\nb", "a;b", "x" * 65])
def test_login_refuses_names_that_cannot_go_into_a_header(name: str) -> None:
    assert valid_user(name) is None
    reply = productpage(FakeFetch()).handle(
        Request.parse("POST", "/login", {}, b"username=" + name.encode())
    )
    assert "Set-Cookie" not in dict(reply.headers)


def test_api_products_lists_the_book() -> None:
    data = body(productpage(FakeFetch()).handle(get("/api/v1/products")))
    assert [p["id"] for p in data] == [0]
    assert data[0]["title"] == "The Comedy of Errors"


def test_api_passes_on_upstream_answers_and_failures() -> None:
    ratings = Fetched(status=200, data={"id": 0, "ratings": {"Reviewer1": 5}})
    fetch = FakeFetch(
        {"http://d:1": DETAILS_OK, "http://v:2": Fetched(status=503), "http://r:3": ratings}
    )
    page = productpage(fetch)
    assert body(page.handle(get("/api/v1/products/0"))) == DETAILS_OK.data
    assert body(page.handle(get("/api/v1/products/0/ratings"))) == ratings.data
    failed = page.handle(get("/api/v1/products/0/reviews"))
    assert failed.status == 503
    assert body(failed) == {"error": REVIEWS_UNAVAILABLE}
    assert fetch.urls().count("http://v:2/reviews/0") == 2
    assert page.handle(get("/api/v1/products/x")).status == 404


def test_productpage_health_index_static_and_404() -> None:
    page = productpage(FakeFetch())
    assert page.handle(get("/health")).status == 200
    assert "/productpage" in page.handle(get("/")).body.decode()
    assert page.handle(get("/static/bookinfo.css")).content_type == "text/css"
    assert page.handle(get("/nope")).status == 404
    assert page.handle(get("/login")).status == 404  # login is POST only


# -- configuration ------------------------------------------------------------------------------


def test_settings_and_upstream_urls_come_from_the_environment() -> None:
    env = {"POD_IP": "127.0.0.9", "PORT": "1234", "POD_NAME": "p-1", "DETAILS_URL": "http://x/"}
    assert Settings.from_env(env) == Settings(pod_ip="127.0.0.9", port=1234, pod_name="p-1")
    assert upstream_url(env, "details") == "http://x"
    assert upstream_url(env, "reviews") == "http://reviews:9080"
    defaults = Settings.from_env({})
    assert (defaults.pod_ip, defaults.port) == ("127.0.0.1", 9080)
    assert defaults.pod_name


def test_a_request_target_in_absolute_form_is_parsed_to_its_path() -> None:
    request = Request.parse("GET", "http://productpage:9080/productpage?u=test", {})
    assert request.path == "/productpage"
    assert request.query == {"u": ["test"]}
