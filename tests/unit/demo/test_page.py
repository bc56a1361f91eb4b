"""productpage's HTML: stars, error texts, the pod that served reviews, escaping."""

from __future__ import annotations

import re

import pytest

from meshlet.demo.bookinfo.details import book_details
from meshlet.demo.bookinfo.page import (
    DETAILS_ERROR,
    DETAILS_UNAVAILABLE,
    PRODUCT,
    REVIEWS_ERROR,
    REVIEWS_UNAVAILABLE,
    TITLE,
    product_page,
    rating_html,
    stars_html,
)
from meshlet.demo.bookinfo.reviews import FLAVORS, RATINGS_UNAVAILABLE, reviews_body

FULL = 'class="glyphicon glyphicon-star"'
EMPTY = 'class="glyphicon glyphicon-star-empty"'
RATINGS = {"Reviewer1": 5, "Reviewer2": 4}


def test_five_stars_are_five_full_stars() -> None:
    html = stars_html(5, "black")
    assert html.count(FULL) == 5
    assert html.count(EMPTY) == 0
    assert html.startswith('<font color="black">')


def test_four_stars_are_four_full_and_one_empty() -> None:
    html = stars_html(4, "red")
    assert html.count(FULL) == 4
    assert html.count(EMPTY) == 1
    assert 'color="red"' in html


@pytest.mark.parametrize(("stars", "full"), [(-3, 0), (0, 0), (1, 1), (9, 5)])
def test_stars_are_clamped_to_zero_to_five(stars: int, full: int) -> None:
    html = stars_html(stars, "black")
    assert html.count(FULL) == full
    assert html.count(EMPTY) == 5 - full


def test_a_rating_error_is_shown_instead_of_stars() -> None:
    html = rating_html({"error": RATINGS_UNAVAILABLE})
    assert RATINGS_UNAVAILABLE in html
    assert "glyphicon" not in html


def test_a_review_without_rating_shows_nothing() -> None:
    assert rating_html(None) == ""


def _page(version: str, podname: str = "reviews-v2-5b6c7d-x8k2p", user: str | None = None) -> str:
    reviews = reviews_body(0, podname, FLAVORS[version], RATINGS)
    return product_page(PRODUCT, book_details(0), reviews, user)


@pytest.mark.parametrize(
    ("version", "color", "full", "empty"),
    [("v1", None, 0, 0), ("v2", "black", 9, 1), ("v3", "red", 9, 1)],
)
def test_the_page_shows_the_stars_of_each_version(
    version: str, color: str | None, full: int, empty: int
) -> None:
    html = _page(version)
    assert f"<title>{TITLE}</title>" in html
    assert html.count(FULL) == full
    assert html.count(EMPTY) == empty
    if color is not None:
        assert html.count(f'<font color="{color}">') == 2
    else:
        assert "<font" not in html


def test_the_page_shows_the_book_details() -> None:
    html = _page("v1")
    for text in ("William Shakespeare", "1595", "paperback", "PublisherA", "123-1234567890"):
        assert text in html
    assert "The Comedy of Errors" in html


def test_the_page_names_the_reviews_pod_and_nothing_else_like_a_reviews_version() -> None:
    html = _page("v2", podname="reviews-v2-5b6c7d-x8k2p")
    assert re.findall(r"reviews-v\d", html) == ["reviews-v2"]
    assert "reviews-v2-5b6c7d-x8k2p" in html
    assert re.findall(r"reviews-v\d", _page("v1", podname="pod-a")) == []


def test_failed_calls_show_istios_error_texts() -> None:
    html = product_page(PRODUCT, None, None, None)
    for text in (DETAILS_ERROR, DETAILS_UNAVAILABLE, REVIEWS_ERROR, REVIEWS_UNAVAILABLE):
        assert text in html
    assert "Book Details" not in html


def test_ratings_failure_shows_the_error_under_each_review() -> None:
    reviews = reviews_body(0, "pod", FLAVORS["v3"], None)
    html = product_page(PRODUCT, book_details(0), reviews, None)
    assert html.count(RATINGS_UNAVAILABLE) == 2
    assert FULL not in html


def test_signed_in_user_is_shown_escaped_and_the_form_is_gone() -> None:
    html = _page("v1", user="<jason>")
    assert "&lt;jason&gt;" in html
    assert "<jason>" not in html
    assert 'action="/login"' not in html
    assert 'href="/logout"' in html
    assert 'action="/login"' in _page("v1")


def test_upstream_text_is_escaped() -> None:
    reviews = {"podname": "<script>x</script>", "reviews": [{"reviewer": "a&b", "text": "<i>"}]}
    html = product_page(PRODUCT, {"type": "<b>"}, reviews, None)
    assert "<script>" not in html
    assert "&lt;script&gt;" in html
    assert "a&amp;b" in html
    assert "&lt;b&gt;" in html
