"""ratings: the stars each reviewer gave, as JSON at ``/ratings/<id>``."""

from __future__ import annotations

from typing import Any

from meshlet.demo.bookinfo.service import NOT_FOUND, Reply, Request

RATINGS = {"Reviewer1": 5, "Reviewer2": 4}


def product_ratings(product_id: int) -> dict[str, Any]:
    return {"id": product_id, "ratings": dict(RATINGS)}


class Ratings:
    name = "ratings"

    def handle(self, request: Request) -> Reply:
        if request.path == "/health":
            return Reply.json({"status": "Ratings is healthy"})
        parts = request.path.strip("/").split("/")
        if len(parts) == 2 and parts[0] == "ratings":
            if not parts[1].isdigit():
                return Reply.json({"error": "please provide numeric product ID"}, 400)
            return Reply.json(product_ratings(int(parts[1])))
        return NOT_FOUND
