"""HTTP header blocks and request heads as the proxy's hot path holds them.

Everything stays ``bytes`` from the wire to the wire: names are lower-cased once when parsed,
values are never decoded. Matchers compiled from configuration are encoded to bytes when the
configuration arrives, so no request pays for a decode.
"""

from __future__ import annotations

from collections.abc import Iterator


class Headers:
    """An ordered multi-map of lower-case header names to raw values.

    Repeated names keep their order. Envoy's rule for matching a repeated header applies:
    ``joined()`` returns every value joined with ``,``.
    """

    __slots__ = ("items",)

    def __init__(self, items: list[tuple[bytes, bytes]] | None = None) -> None:
        self.items: list[tuple[bytes, bytes]] = items if items is not None else []

    def __repr__(self) -> str:
        return f"<Headers {len(self.items)} fields>"

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, name: bytes) -> bool:  # a plain loop: any() + genexpr is 2x slower
        for k, _ in self.items:  # noqa: SIM110
            if k == name:
                return True
        return False

    def get(self, name: bytes) -> bytes | None:
        """The first value of ``name`` or None."""
        for k, v in self.items:
            if k == name:
                return v
        return None

    def get_all(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.items if k == name]

    def joined(self, name: bytes) -> bytes | None:
        """All values of ``name`` joined with ``,`` (Envoy's matching rule), or None if absent."""
        values = [v for k, v in self.items if k == name]
        if not values:
            return None
        return values[0] if len(values) == 1 else b",".join(values)

    def add(self, name: bytes, value: bytes) -> None:
        self.items.append((name, value))

    def set(self, name: bytes, value: bytes) -> None:
        """Replace every value of ``name`` by one ``value`` (added at the end if absent)."""
        items = self.items
        for i, (k, _) in enumerate(items):
            if k == name:
                items[i] = (name, value)
                self.items = [kv for j, kv in enumerate(items) if j <= i or kv[0] != name]
                return
        items.append((name, value))

    def setdefault(self, name: bytes, value: bytes) -> None:
        if name not in self:
            self.items.append((name, value))

    def remove(self, name: bytes) -> None:
        if name in self:
            self.items = [kv for kv in self.items if kv[0] != name]

    def copy(self) -> Headers:
        return Headers(list(self.items))


class RequestHead:
    """The request line and headers of one downstream request, mutated as filters run.

    ``path`` is the origin-form target (path plus query), even when the client sent the
    absolute form (``GET http://reviews:9080/x``), in which case ``authority`` came from it.
    """

    __slots__ = ("authority", "headers", "keep_alive", "method", "path", "scheme", "version")

    def __init__(
        self,
        *,
        method: bytes,
        path: bytes,
        authority: bytes,
        headers: Headers,
        scheme: bytes = b"http",
        version: bytes = b"1.1",
        keep_alive: bool = True,
    ) -> None:
        self.method = method
        self.path = path
        self.authority = authority
        self.headers = headers
        self.scheme = scheme
        self.version = version
        self.keep_alive = keep_alive

    def __repr__(self) -> str:
        return f"<RequestHead {self.method.decode()} {self.authority.decode()}{self.path.decode()}>"

    @property
    def path_only(self) -> bytes:
        """The path without query string or fragment (what ``path`` matchers compare)."""
        path = self.path
        q = path.find(b"?")
        if q >= 0:
            path = path[:q]
        f = path.find(b"#")
        return path if f < 0 else path[:f]

    @property
    def query(self) -> bytes:
        q = self.path.find(b"?")
        return b"" if q < 0 else self.path[q + 1 :]

    def header(self, name: bytes) -> bytes | None:
        """A header by lower-case name, answering the pseudo-headers Envoy matches on."""
        if name == b":authority" or name == b"host":
            return self.authority
        if name == b":path":
            return self.path
        if name == b":method":
            return self.method
        if name == b":scheme":
            return self.scheme
        return self.headers.joined(name)
