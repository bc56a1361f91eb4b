"""reviews: two reviews of the book, as JSON at ``/reviews/<id>``; three versions.

v1 shows no ratings. v2 and v3 ask ratings for the stars (v2 waits up to 10 s and colours them
black, v3 waits up to 2.5 s and colours them red); when ratings fails, each review carries
"Ratings service is currently unavailable" instead. The reply names the pod that served it
(``podname``), so that a page can show which version answered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshlet.demo.bookinfo.propagation import REVIEWS_FORWARDS, select
from meshlet.demo.bookinfo.service import NOT_FOUND, Fetch, Fetched, Reply, Request, fetch_json

RATINGS_UNAVAILABLE = "Ratings service is currently unavailable"

REVIEWS = (
    (
        "Reviewer1",
        "A merry tangle of twins and errors; the quick wit and the knockabout scenes "
        "kept us laughing from the first act to the last.",
    ),
    (
        "Reviewer2",
        "Great fun on the stage, though lighter in its thoughts than the tragedies "
        "the same pen would write.",
    ),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Flavor:
    """What one version of reviews does with ratings."""

    version: str
    star_color: str | None  # None: no ratings at all
    ratings_timeout: float = 0.0  # seconds


FLAVORS = {
    "v1": Flavor(version="v1", star_color=None),
    "v2": Flavor(version="v2", star_color="black", ratings_timeout=10.0),
    "v3": Flavor(version="v3", star_color="red", ratings_timeout=2.5),
}


def reviews_body(
    product_id: int, podname: str, flavor: Flavor, ratings: dict[str, Any] | None
) -> dict[str, Any]:
    """The JSON reply. ``ratings`` maps reviewer to stars, or is None when ratings failed;
    flavors without a star colour ignore it."""
    reviews = []
    for reviewer, text in REVIEWS:
        review: dict[str, Any] = {"reviewer": reviewer, "text": text}
        if flavor.star_color is not None:
            stars = (ratings or {}).get(reviewer)
            if isinstance(stars, int) and not isinstance(stars, bool):
                review["rating"] = {"stars": stars, "color": flavor.star_color}
            else:
                review["rating"] = {"error": RATINGS_UNAVAILABLE}
        reviews.append(review)
    return {"id": str(product_id), "podname": podname, "reviews": reviews}


def ratings_of(fetched: Fetched) -> dict[str, Any] | None:
    """The reviewer -> stars map in a ratings answer, or None if it has none."""
    if not fetched.ok or not isinstance(fetched.data, dict):
        return None
    ratings = fetched.data.get("ratings")
    return ratings if isinstance(ratings, dict) else None


class Reviews:
    name = "reviews"

    def __init__(
        self, *, flavor: Flavor, podname: str, ratings_url: str, fetch: Fetch = fetch_json
    ) -> None:
        self.flavor = flavor
        self.podname = podname
        self.ratings_url = ratings_url
        self.fetch = fetch

    def __repr__(self) -> str:
        return f"<Reviews {self.flavor.version} {self.podname} ratings={self.ratings_url}>"

    def handle(self, request: Request) -> Reply:
        if request.path == "/health":
            return Reply.json({"status": "Reviews is healthy"})
        parts = request.path.strip("/").split("/")
        if len(parts) == 2 and parts[0] == "reviews":
            if not parts[1].isdigit():
                return Reply.json({"error": "please provide numeric product id"}, 400)
            product_id = int(parts[1])
            ratings = None
            if self.flavor.star_color is not None:
                fetched = self.fetch(
                    f"{self.ratings_url}/ratings/{product_id}",
                    select(request.headers, REVIEWS_FORWARDS),
                    self.flavor.ratings_timeout,
                )
                ratings = ratings_of(fetched)
            return Reply.json(reviews_body(product_id, self.podname, self.flavor, ratings))
        return NOT_FOUND
