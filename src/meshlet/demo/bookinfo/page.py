"""The HTML productpage serves, built from what details and reviews answered (pure functions).

The markup keeps the hooks people's scripts look for on Istio's page: the title "Simple
Bookstore App", stars as ``glyphicon glyphicon-star`` / ``glyphicon-star-empty`` elements inside
``<font color="...">``, and the exact error texts. Every value from elsewhere is escaped.
"""

from __future__ import annotations

from html import escape
from typing import Any

TITLE = "Simple Bookstore App"
DETAILS_ERROR = "Error fetching product details!"
DETAILS_UNAVAILABLE = "Sorry, product details are currently unavailable for this book."
REVIEWS_ERROR = "Error fetching product reviews!"
REVIEWS_UNAVAILABLE = "Sorry, product reviews are currently unavailable for this book."
MAX_STARS = 5

#: The one product of the store.
PRODUCT: dict[str, Any] = {
    "id": 0,
    "title": "The Comedy of Errors",
    "descriptionHtml": (
        '<a href="https://en.wikipedia.org/wiki/The_Comedy_of_Errors">Wikipedia Summary</a>: '
        "two pairs of twins, parted in a shipwreck, land in the same town on the same day. "
        "Wives, servants and merchants take each twin for the other, and the mix-ups make "
        "this <b>William Shakespeare</b> play his shortest and most farcical comedy."
    ),
}

STYLESHEET = """\
body { font-family: sans-serif; margin: 0; color: #222; }
nav { background: #2c3e50; color: #fff; padding: 0.6em 1em; display: flex; gap: 1em; }
nav .brand { font-weight: bold; flex: 1; }
nav a, nav button { color: #fff; }
main { max-width: 60em; margin: 1em auto; padding: 0 1em; }
.columns { display: flex; gap: 2em; }
.columns > section { flex: 1; }
blockquote { border-left: 4px solid #ccc; margin: 0 0 1em; padding: 0.3em 1em; }
.glyphicon-star::before { content: "\\2605"; }
.glyphicon-star-empty::before { content: "\\2606"; }
.error { color: #a00; }
"""


def stars_html(stars: int, color: str) -> str:
    """``stars`` full stars, then empty ones up to five, in ``color``."""
    full = max(0, min(MAX_STARS, stars))
    spans = ['<span class="glyphicon glyphicon-star"></span>'] * full
    spans += ['<span class="glyphicon glyphicon-star-empty"></span>'] * (MAX_STARS - full)
    # <font color> is what Istio's page uses, and what scripts grep for.
    return f'<font color="{escape(color)}">{"".join(spans)}</font>'


def rating_html(rating: object) -> str:
    if not isinstance(rating, dict):
        return ""
    stars, color = rating.get("stars"), rating.get("color")
    if isinstance(stars, int) and not isinstance(stars, bool):
        return stars_html(stars, color if isinstance(color, str) else "black")
    if rating.get("error"):
        return f'<p class="error"><i>{escape(str(rating["error"]))}</i></p>'
    return ""


def details_html(details: dict[str, Any] | None) -> str:
    if details is None:
        return f'<h4 class="error">{DETAILS_ERROR}</h4>\n<p>{DETAILS_UNAVAILABLE}</p>\n'
    rows = [
        ("Type", details.get("type")),
        ("Pages", details.get("pages")),
        ("Publisher", details.get("publisher")),
        ("Language", details.get("language")),
        ("ISBN-10", details.get("ISBN-10")),
        ("ISBN-13", details.get("ISBN-13")),
    ]
    items = "".join(
        f"<dt>{name}:</dt><dd>{escape(str(value))}</dd>\n" for name, value in rows if value
    )
    author = escape(str(details.get("author", "")))
    year = escape(str(details.get("year", "")))
    return f"<h4>Book Details</h4>\n<p>by {author}, {year}</p>\n<dl>\n{items}</dl>\n"


def reviews_html(reviews: dict[str, Any] | None) -> str:
    if reviews is None:
        return f'<h4 class="error">{REVIEWS_ERROR}</h4>\n<p>{REVIEWS_UNAVAILABLE}</p>\n'
    out = ["<h4>Book Reviews</h4>\n"]
    for review in reviews.get("reviews") or []:
        if not isinstance(review, dict):
            continue
        out.append(
            "<blockquote>\n"
            f"<p>{escape(str(review.get('text', '')))}</p>\n"
            f"<small>{escape(str(review.get('reviewer', '')))}</small>\n"
            f"{rating_html(review.get('rating'))}\n"
            "</blockquote>\n"
        )
    podname = reviews.get("podname")
    if podname:
        out.append(f'<p class="served-by">Reviews served by: <b>{escape(str(podname))}</b></p>\n')
    return "".join(out)


def user_html(user: str | None) -> str:
    if user:
        return (
            f'<span>Signed in as <b class="user">{escape(user)}</b></span>'
            '<a href="/logout">Sign out</a>'
        )
    return (
        '<form method="post" action="/login">'
        '<input name="username" placeholder="User name" required> '
        '<input name="passwd" type="password" placeholder="Password"> '
        '<button type="submit">Sign in</button></form>'
    )


def _document(body: str, user: str | None) -> str:
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{TITLE}</title>\n"
        '<link rel="stylesheet" href="/static/bookinfo.css">\n'
        "</head>\n<body>\n"
        f'<nav><span class="brand">BookInfo Sample</span>{user_html(user)}</nav>\n'
        f"<main>\n{body}</main>\n</body>\n</html>\n"
    )


def product_page(
    product: dict[str, Any],
    details: dict[str, Any] | None,
    reviews: dict[str, Any] | None,
    user: str | None,
) -> str:
    """The page for ``product``; ``details`` or ``reviews`` is None when that call failed."""
    body = (
        f'<h1 class="title">{escape(str(product["title"]))}</h1>\n'
        # descriptionHtml is our own constant markup, not user input
        f'<p class="summary">{product["descriptionHtml"]}</p>\n'
        '<div class="columns">\n'
        f'<section class="details">\n{details_html(details)}</section>\n'
        f'<section class="reviews">\n{reviews_html(reviews)}</section>\n'
        "</div>\n"
    )
    return _document(body, user)


def index_page() -> str:
    body = (
        "<h1>Bookinfo</h1>\n"
        "<p>A small bookstore made of four services: productpage shows a book, details "
        "knows its facts, reviews has what readers wrote, and ratings holds their stars. "
        "Three versions of reviews differ in how they show the stars.</p>\n"
        "<ul>\n"
        '<li><a href="/productpage">The product page</a></li>\n'
        '<li><a href="/api/v1/products">The products, as JSON</a></li>\n'
        "</ul>\n"
    )
    return _document(body, None)
