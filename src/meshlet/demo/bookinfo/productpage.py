"""productpage: the bookstore's front end, which calls details and reviews for each page.

Calls, as Istio's productpage makes them:

* details ``/details/0``: one attempt, 3 s timeout;
* reviews ``/reviews/0``: **two attempts**, 3 s timeout each, in its own loop -- so a 7 s delay
  injected for a user shows the reviews error after about 6 s (Istio's fault-injection task);
* ratings ``/ratings/0``: only for ``/api/v1/products/0/ratings``, 3 s timeout.

Any status >= 400, a timeout or a refused connection is a failure; the page then shows the
error texts in ``meshlet.demo.bookinfo.page`` and the API answers the upstream's status (500
when there was none). Each call carries the headers ``propagation.productpage_headers`` picks.

Sessions: ``POST /login`` with form field ``username`` sets the cookie ``user=<name>`` and
redirects to the page; ``/logout`` clears it. The cookie is not signed: this is a demo, and the
user name only chooses routes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import quote, unquote

from meshlet.demo.bookinfo.page import (
    DETAILS_UNAVAILABLE,
    PRODUCT,
    REVIEWS_UNAVAILABLE,
    STYLESHEET,
    index_page,
    product_page,
)
from meshlet.demo.bookinfo.propagation import productpage_headers
from meshlet.demo.bookinfo.service import NOT_FOUND, Fetch, Fetched, Reply, Request, fetch_json

DETAILS_TIMEOUT = 3.0
REVIEWS_TIMEOUT = 3.0
REVIEWS_ATTEMPTS = 2
RATINGS_TIMEOUT = 3.0
SESSION_COOKIE = "user"
MAX_USER_LENGTH = 64


def valid_user(name: str) -> str | None:
    """``name`` stripped, if it can be a user (it goes into a header); None otherwise."""
    name = name.strip()
    if not name or len(name) > MAX_USER_LENGTH:
        return None
    if not name.isprintable() or any(c in name for c in ';,"\\'):
        return None
    return name


class ProductPage:
    name = "productpage"

    def __init__(
        self,
        *,
        details_url: str,
        reviews_url: str,
        ratings_url: str,
        fetch: Fetch = fetch_json,
    ) -> None:
        self.details_url = details_url
        self.reviews_url = reviews_url
        self.ratings_url = ratings_url
        self.fetch = fetch
        self._routes: dict[tuple[str, str], Callable[[Request], Reply]] = {
            ("GET", "/"): lambda _: Reply.html(index_page()),
            ("GET", "/index.html"): lambda _: Reply.html(index_page()),
            ("GET", "/health"): lambda _: Reply.text("Product page is healthy"),
            ("GET", "/productpage"): self.front,
            ("POST", "/login"): self.login,
            ("GET", "/logout"): self.logout,
            ("GET", "/api/v1/products"): lambda _: Reply.json([PRODUCT]),
            ("GET", "/static/bookinfo.css"): lambda _: Reply(
                status=200, body=STYLESHEET.encode(), content_type="text/css"
            ),
        }

    def __repr__(self) -> str:
        return (
            f"<ProductPage details={self.details_url} reviews={self.reviews_url} "
            f"ratings={self.ratings_url}>"
        )

    # -- calls ---------------------------------------------------------------------------------

    def details(self, product_id: int, headers: dict[str, str]) -> Fetched:
        return self.fetch(f"{self.details_url}/details/{product_id}", headers, DETAILS_TIMEOUT)

    def reviews(self, product_id: int, headers: dict[str, str]) -> Fetched:
        url = f"{self.reviews_url}/reviews/{product_id}"
        fetched = Fetched(status=None)
        for _ in range(REVIEWS_ATTEMPTS):  # Istio's productpage retries once by itself
            fetched = self.fetch(url, headers, REVIEWS_TIMEOUT)
            if fetched.ok:
                break
        return fetched

    def ratings(self, product_id: int, headers: dict[str, str]) -> Fetched:
        return self.fetch(f"{self.ratings_url}/ratings/{product_id}", headers, RATINGS_TIMEOUT)

    # -- routes --------------------------------------------------------------------------------

    def handle(self, request: Request) -> Reply:
        route = self._routes.get((request.method, request.path))
        if route is None and request.method == "HEAD":
            route = self._routes.get(("GET", request.path))
        if route is not None:
            return route(request)
        if request.method in ("GET", "HEAD") and request.path.startswith("/api/v1/products/"):
            return self.api(request)
        return NOT_FOUND

    def user(self, request: Request) -> str | None:
        value = request.cookie(SESSION_COOKIE)
        return valid_user(unquote(value)) if value else None

    def front(self, request: Request) -> Reply:
        user = self.user(request)
        headers = productpage_headers(request.headers, user)
        product_id = int(PRODUCT["id"])
        details = self.details(product_id, headers)
        reviews = self.reviews(product_id, headers)
        return Reply.html(product_page(PRODUCT, _object(details), _object(reviews), user))

    def login(self, request: Request) -> Reply:
        user = valid_user(request.form().get("username", ""))
        if user is None:
            return Reply.redirect("/productpage")
        cookie = f"{SESSION_COOKIE}={quote(user, safe='')}; Path=/; HttpOnly; SameSite=Lax"
        return Reply.redirect("/productpage", ("Set-Cookie", cookie))

    def logout(self, request: Request) -> Reply:
        cookie = f"{SESSION_COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax"
        return Reply.redirect("/productpage", ("Set-Cookie", cookie))

    def api(self, request: Request) -> Reply:
        """``/api/v1/products/<id>`` (details), ``.../reviews`` and ``.../ratings``."""
        parts = request.path[len("/api/v1/products/") :].strip("/").split("/")
        if not parts[0].isdigit() or len(parts) > 2:
            return NOT_FOUND
        product_id = int(parts[0])
        headers = productpage_headers(request.headers, self.user(request))
        what = parts[1] if len(parts) == 2 else "details"
        if what == "details":
            return _api_reply(self.details(product_id, headers), DETAILS_UNAVAILABLE)
        if what == "reviews":
            return _api_reply(self.reviews(product_id, headers), REVIEWS_UNAVAILABLE)
        if what == "ratings":
            unavailable = "Sorry, product ratings are currently unavailable for this book."
            return _api_reply(self.ratings(product_id, headers), unavailable)
        return NOT_FOUND


def _object(fetched: Fetched) -> dict[str, Any] | None:
    return fetched.data if fetched.ok and isinstance(fetched.data, dict) else None


def _api_reply(fetched: Fetched, unavailable: str) -> Reply:
    if fetched.ok:
        return Reply.json(fetched.data)
    status = fetched.status if fetched.status is not None and fetched.status >= 400 else 500
    return Reply.json({"error": unavailable}, status)
