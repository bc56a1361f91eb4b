"""Which incoming headers each Bookinfo service passes on to the services it calls.

A mesh can only join a call's spans into one trace, and route by user, if the applications copy
these headers from the request they serve onto the requests they make; the sidecars cannot do
it for them. The lists are the ones Istio's Bookinfo services keep.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

B3 = ("x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags")

#: productpage -> details, reviews, ratings. ``end-user`` is set from the session (see
#: ``productpage_headers``), not in this list.
PRODUCTPAGE_FORWARDS = (
    "x-request-id",
    "traceparent",
    "tracestate",
    *B3,
    "x-ot-span-context",
    "user-agent",
    "cookie",
    "authorization",
)

#: reviews -> ratings.
REVIEWS_FORWARDS = ("end-user", "x-request-id", *B3, "traceparent", "user-agent")


def select(incoming: Mapping[str, str], names: Iterable[str]) -> dict[str, str]:
    """The headers among ``names`` present in ``incoming`` (whose names are lower-case)."""
    return {name: incoming[name] for name in names if name in incoming}


def productpage_headers(incoming: Mapping[str, str], user: str | None) -> dict[str, str]:
    """What productpage sends upstream: the forwarded headers, and ``end-user`` naming the
    signed-in user. Without a session, an incoming ``end-user`` header is passed on instead --
    a meshlet convenience for scripts (Istio's productpage drops it)."""
    headers = select(incoming, PRODUCTPAGE_FORWARDS)
    end_user = user or incoming.get("end-user")
    if end_user:
        headers["end-user"] = end_user
    return headers
