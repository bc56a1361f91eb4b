"""details: the book's facts (author, year, ISBN, ...), as JSON at ``/details/<id>``."""

from __future__ import annotations

from typing import Any

from meshlet.demo.bookinfo.service import NOT_FOUND, Reply, Request


def book_details(product_id: int) -> dict[str, Any]:
    """The details of the one book in the store (any id gets the same book, as in Istio's)."""
    return {
        "id": product_id,
        "author": "William Shakespeare",
        "year": 1595,
        "type": "paperback",
        "pages": 200,
        "publisher": "PublisherA",
        "language": "English",
        "ISBN-10": "1234567890",
        "ISBN-13": "123-1234567890",
    }


class Details:
    name = "details"

    def handle(self, request: Request) -> Reply:
        if request.path == "/health":
            return Reply.json({"status": "Details is healthy"})
        parts = request.path.strip("/").split("/")
        if len(parts) == 2 and parts[0] == "details":
            if not parts[1].isdigit():
                return Reply.json({"error": "please provide numeric product id"}, 400)
            return Reply.json(book_details(int(parts[1])))
        return NOT_FOUND
