"""Which headers productpage and reviews pass on (BOOKINFO.md's lists)."""

from __future__ import annotations

from meshlet.demo.bookinfo.propagation import (
    PRODUCTPAGE_FORWARDS,
    REVIEWS_FORWARDS,
    productpage_headers,
    select,
)

TRACING = {
    "x-request-id": "r-1",
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "tracestate": "vendor=1",
    "x-b3-traceid": "80f198ee56343ba864fe8b2a57d3eff7",
    "x-b3-spanid": "e457b5a2e4d86bd1",
    "x-b3-parentspanid": "05e3ac9a4f6e3b90",
    "x-b3-sampled": "1",
    "x-b3-flags": "0",
    "x-ot-span-context": "ctx",
    "user-agent": "curl/8",
    "cookie": "user=jason",
    "authorization": "Bearer t",
}
OTHER = {"host": "productpage:9080", "x-custom": "no", "content-length": "0", "accept": "*/*"}


def test_productpage_forwards_exactly_the_listed_headers() -> None:
    headers = productpage_headers({**TRACING, **OTHER}, None)
    assert headers == TRACING
    assert set(PRODUCTPAGE_FORWARDS) == set(TRACING)


def test_productpage_sends_end_user_from_the_session() -> None:
    assert productpage_headers({}, "jason") == {"end-user": "jason"}


def test_the_session_user_wins_over_an_incoming_end_user_header() -> None:
    assert productpage_headers({"end-user": "mallory"}, "jason")["end-user"] == "jason"


def test_an_incoming_end_user_header_is_passed_on_without_a_session() -> None:
    assert productpage_headers({"end-user": "jason"}, None) == {"end-user": "jason"}


def test_no_end_user_without_session_or_header() -> None:
    assert "end-user" not in productpage_headers(TRACING, None)


def test_reviews_forwards_end_user_request_id_b3_traceparent_and_user_agent() -> None:
    incoming = {**TRACING, **OTHER, "end-user": "jason"}
    assert select(incoming, REVIEWS_FORWARDS) == {
        "end-user": "jason",
        "x-request-id": "r-1",
        "traceparent": TRACING["traceparent"],
        "x-b3-traceid": TRACING["x-b3-traceid"],
        "x-b3-spanid": TRACING["x-b3-spanid"],
        "x-b3-parentspanid": TRACING["x-b3-parentspanid"],
        "x-b3-sampled": "1",
        "x-b3-flags": "0",
        "user-agent": "curl/8",
    }


def test_select_skips_absent_headers() -> None:
    assert select({}, REVIEWS_FORWARDS) == {}
