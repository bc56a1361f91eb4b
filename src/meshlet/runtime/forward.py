"""A TCP port forward: the embedded runtime's LoadBalancer, from a host port on 127.0.0.1 to
the ingress gateway's pod IP (as Kubernetes forwards a LoadBalancer Service's port).

Bytes are relayed both ways with ``asyncio.Protocol``s; when one side's write buffer fills,
the other side stops reading until it drains. A half-close is passed on.
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

log = logging.getLogger(__name__)


class _Side(asyncio.Protocol):
    """One connection of a pair; ``peer`` is the other."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.pending: list[bytes] = []  # data before the peer connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.pending.append(data)
            return
        peer.transport.write(data)

    def eof_received(self) -> bool:
        peer = self.peer
        if peer is not None and peer.transport is not None and peer.transport.can_write_eof():
            peer.transport.write_eof()
            return True  # keep our side open for the other direction
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class PortForward:
    """Listens on ``listen`` (host, port) and relays each connection to ``target``."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.listen = listen
        self.target = target
        self._server: asyncio.Server | None = None

    def __repr__(self) -> str:
        return (
            f"<PortForward {self.listen[0]}:{self.listen[1]} -> {self.target[0]}:{self.target[1]}>"
        )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accept, *self.listen, reuse_address=True)

    def _accept(self) -> _Side:
        downstream = _Side()
        asyncio.get_running_loop().create_task(self._connect(downstream))
        return downstream

    async def _connect(self, downstream: _Side) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await loop.create_connection(_Side, *self.target)
        except OSError as e:
            log.warning("%r: cannot connect: %s", self, e)
            if downstream.transport is not None:
                downstream.transport.close()
            return
        if downstream.transport is None or downstream.transport.is_closing():
            if upstream.transport is not None:
                upstream.transport.close()
            return
        downstream.peer, upstream.peer = upstream, downstream
        assert upstream.transport is not None
        for data in downstream.pending:
            upstream.transport.write(data)
        downstream.pending.clear()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
