"""Open-loop HTTP/1.1 load generator: a fixed schedule, latency from the intended send time.

Request i is *due* at ``start + i / rate`` whatever happened to request i - 1. A due request
goes out on an idle keep-alive connection; when every connection is busy it waits in a
backlog and goes out as soon as one frees up. Its latency is always measured from the time it
was due, never from the time it was finally written, so a server that stalls is charged for
the requests it delayed (no coordinated omission, as in wrk2 and HdrHistogram's docs).

Rules it keeps, for speed (one core must drive 8k rps with room to spare):

- raw asyncio ``Protocol`` objects on uvloop, one request in flight per connection, the
  request bytes built once;
- a response ends after its head plus ``Content-Length`` bytes (the benchmark's upstream
  always sends one); a response without it is counted as an error and its connection closed;
- the schedule is driven by a callback that re-queues itself with ``call_soon``: the loop
  never sleeps in ``epoll_wait`` while requests are due, because libuv timers only have
  millisecond resolution and 8k rps is one request every 125 us. This spins the load
  generator's core at 100 %, which is why the benchmark gives it a core of its own;
- latencies go into a flat integer array during the run and into an HdrHistogram after it.

Requests due during ``--warmup`` are sent but not recorded. Two figures tell whether the
generator itself kept up: ``schedule_slip_us`` (when the scheduler noticed a request minus when
it was due: the generator's own precision, normally 1 or 2 us) and ``queued`` (requests that
found every connection busy and waited for one: the server was slow, and their latency says so).

Run ``python bench/openloop.py --help``; ``--json`` prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import sys
from array import array
from dataclasses import dataclass
from time import perf_counter_ns
from typing import Any, cast

from hdrh.histogram import HdrHistogram

try:
    import uvloop
except ImportError:  # the generator still works, only slower
    uvloop = None  # type: ignore[assignment]

NS_PER_S = 1_000_000_000
MAX_HEAD_BYTES = 65_536
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


@dataclass(frozen=True, kw_only=True, slots=True)
class OpenLoopConfig:
    """What to send, where, how fast and for how long."""

    host: str
    port: int
    path: str = "/"
    rate: int
    duration: float
    warmup: float = 1.0
    connections: int = 50
    grace: float = 2.0

    @property
    def request(self) -> bytes:
        return (
            f"GET {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "User-Agent: meshlet-openloop\r\n\r\n"
        ).encode("ascii")


class ClientConnection(asyncio.Protocol):
    """One keep-alive connection: sends a request, reads one Content-Length framed response."""

    __slots__ = ("_body_left", "_buffer", "_status", "due_ns", "generator", "transport")

    def __init__(self, generator: OpenLoop) -> None:
        self.generator = generator
        self.transport: asyncio.Transport | None = None
        self.due_ns = -1  # due time of the request in flight, -1 when idle
        self._buffer = bytearray()
        self._body_left = -1  # -1 while reading the head
        self._status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def send(self, due_ns: int) -> None:
        self.due_ns = due_ns
        assert self.transport is not None
        self.transport.write(self.generator.request)

    def data_received(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        while buf:
            if self._body_left < 0:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD_BYTES:
                        self._fail("protocol")
                    return
                length = _content_length(buf, end)
                if length < 0:
                    self._fail("protocol")
                    return
                self._status = int(buf[9:12])
                del buf[: end + 4]
                self._body_left = length
            if len(buf) < self._body_left:
                self._body_left -= len(buf)
                buf.clear()
                return
            del buf[: self._body_left]
            self._body_left = -1
            due_ns, self.due_ns = self.due_ns, -1
            self.generator.on_response(self, due_ns, self._status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.generator.on_connection_lost(self)

    def _fail(self, kind: str) -> None:
        self.generator.errors[kind] += 1
        if self.transport is not None:
            self.transport.close()


def _content_length(buf: bytearray, head_end: int) -> int:
    """The Content-Length of the head in ``buf[:head_end]``, or -1 when it has none."""
    at = buf.find(b"\r\nContent-Length:", 0, head_end)
    if at < 0:  # rare spelling: fall back to a case-insensitive search
        at = bytes(buf[:head_end]).lower().find(b"\r\ncontent-length:")
        if at < 0:
            return -1
    start = at + len(b"\r\ncontent-length:")
    stop = buf.find(b"\r\n", start, head_end + 2)
    try:
        return int(buf[start:stop])
    except ValueError:
        return -1


class OpenLoop:
    """The schedule, the connection pool, the backlog and the recorded results."""

    def __init__(self, config: OpenLoopConfig) -> None:
        self.config = config
        self.request = config.request
        self.loop = asyncio.get_running_loop()
        self.errors: collections.Counter[str] = collections.Counter()
        self._idle: collections.deque[ClientConnection] = collections.deque()
        self._backlog: collections.deque[int] = collections.deque()
        self._connections: set[ClientConnection] = set()
        self._interval_ns = NS_PER_S / config.rate
        self._total = round((config.warmup + config.duration) * config.rate)
        self._next_index = 0
        self._start_ns = 0
        self._measure_from_ns = 0
        self._schedule_done = self.loop.create_future()
        self._closing = False
        # results
        self.latencies_ns = array("q")
        self.slips_ns = array("q")
        self.queued = 0
        self.completed = 0
        self.measured_completed = 0
        self.last_completion_ns = 0

    # -- the pool --------------------------------------------------------------------------

    async def connect(self) -> None:
        results = await asyncio.gather(
            *(self._open() for _ in range(self.config.connections)), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise ConnectionError(f"{len(failures)} connections failed: {failures[0]!r}")

    async def _open(self) -> None:
        _, protocol = await self.loop.create_connection(
            lambda: ClientConnection(self), self.config.host, self.config.port
        )
        self._connections.add(protocol)
        if self._backlog:
            protocol.send(self._backlog.popleft())
        else:
            self._idle.append(protocol)

    def on_connection_lost(self, conn: ClientConnection) -> None:
        self._connections.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)
        if conn.due_ns >= 0:
            self.errors["reset"] += 1
            conn.due_ns = -1
        if not self._closing:  # keep the pool at its size
            self.loop.create_task(self._reopen())

    async def _reopen(self) -> None:
        try:
            await self._open()
        except OSError:
            self.errors["connect"] += 1

    # -- the schedule ----------------------------------------------------------------------

    async def run(self) -> None:
        await self.connect()
        self._start_ns = perf_counter_ns() + 1_000_000  # first request 1 ms from now
        self._measure_from_ns = self._start_ns + int(self.config.warmup * NS_PER_S)
        self.loop.call_soon(self._tick)
        await self._schedule_done
        deadline = perf_counter_ns() + int(self.config.grace * NS_PER_S)
        while (self._backlog or self._in_flight()) and perf_counter_ns() < deadline:
            await asyncio.sleep(0.005)
        self._closing = True
        self.errors["unsent"] += len(self._backlog)
        self.errors["timeout"] += self._in_flight()
        for conn in list(self._connections):
            if conn.transport is not None:
                conn.transport.close()

    def _tick(self) -> None:
        # Sends every request that is due, then re-queues itself: see the module docstring.
        now = perf_counter_ns()
        index, total = self._next_index, self._total
        while index < total:
            due = self._start_ns + int(index * self._interval_ns)
            if due > now:
                break
            measured = due >= self._measure_from_ns
            if measured:
                self.slips_ns.append(now - due)
            if self._idle:
                self._idle.popleft().send(due)
            else:
                self._backlog.append(due)
                self.queued += measured
            index += 1
        self._next_index = index
        if index < total:
            self.loop.call_soon(self._tick)
        else:
            self._schedule_done.set_result(None)

    def on_response(self, conn: ClientConnection, due_ns: int, status: int) -> None:
        now = perf_counter_ns()
        self.completed += 1
        if due_ns >= self._measure_from_ns:
            self.latencies_ns.append(now - due_ns)
            self.measured_completed += 1
            self.last_completion_ns = now
            if not 200 <= status < 400:
                self.errors["status"] += 1
        if self._backlog:
            conn.send(self._backlog.popleft())
        else:
            self._idle.append(conn)

    def _in_flight(self) -> int:
        return sum(1 for conn in self._connections if conn.due_ns >= 0)

    # -- the report ------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        config = self.config
        end_of_schedule = self._measure_from_ns + int(config.duration * NS_PER_S)
        elapsed_s = (max(end_of_schedule, self.last_completion_ns) - self._measure_from_ns) / 1e9
        latency = _histogram(self.latencies_ns)
        slip = _histogram(self.slips_ns)
        return {
            "url": f"http://{config.host}:{config.port}{config.path}",
            "rate": config.rate,
            "duration_s": config.duration,
            "warmup_s": config.warmup,
            "connections": config.connections,
            "measured_requests": round(config.duration * config.rate),
            "completed": self.measured_completed,
            "achieved_rps": self.measured_completed / elapsed_s if elapsed_s > 0 else 0.0,
            "errors": dict(self.errors),
            "errors_total": sum(self.errors.values()),
            "queued": self.queued,
            "total_due": self._next_index,
            "total_completed": self.completed,
            "latency_us": _summary(latency),
            "schedule_slip_us": _summary(slip),
        }


def _histogram(values_ns: array[int]) -> HdrHistogram:
    histogram = HdrHistogram(1, 3_600_000_000, 3)  # 1 us .. 1 h, 3 significant figures
    for value in values_ns:
        histogram.record_value(max(1, value // 1000))
    return histogram


def _summary(histogram: HdrHistogram) -> dict[str, float]:
    if histogram.get_total_count() == 0:
        return {}
    summary = {f"p{p:g}": float(histogram.get_value_at_percentile(p)) for p in PERCENTILES}
    summary["max"] = float(histogram.get_max_value())
    summary["mean"] = round(histogram.get_mean_value(), 1)
    return summary


async def run_open_loop(config: OpenLoopConfig) -> dict[str, Any]:
    """Runs one schedule against ``config``'s server and returns the report."""
    generator = OpenLoop(config)
    gc.disable()  # a collection in the middle of the schedule would show up as latency
    try:
        await generator.run()
    finally:
        gc.enable()
    return generator.report()


def parse_args(argv: list[str] | None = None) -> tuple[OpenLoopConfig, bool]:
    """The configuration, and whether to print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="http://HOST:PORT/PATH (plain HTTP/1.1 only)")
    parser.add_argument("--rate", type=int, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="unrecorded seconds first")
    parser.add_argument("--connections", type=int, default=50, help="keep-alive pool size")
    parser.add_argument("--grace", type=float, default=2.0, help="wait for stragglers (s)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    scheme, _, rest = args.url.partition("://")
    if scheme != "http" or not rest:
        parser.error("the URL must look like http://HOST:PORT/PATH")
    authority, slash, path = rest.partition("/")
    host, _, port = authority.rpartition(":")
    if not host or not port.isdigit():
        parser.error("the URL must name a host and a port")
    if args.rate <= 0 or args.duration <= 0 or args.connections <= 0:
        parser.error("--rate, --duration and --connections must be positive")
    config = OpenLoopConfig(
        host=host,
        port=int(port),
        path=slash + path,
        rate=args.rate,
        duration=args.duration,
        warmup=args.warmup,
        connections=args.connections,
        grace=args.grace,
    )
    return config, args.json


def main(argv: list[str] | None = None) -> int:
    config, as_json = parse_args(argv)
    run = uvloop.run if uvloop is not None else asyncio.run
    try:
        report = run(run_open_loop(config))
    except OSError as exc:
        print(f"openloop: cannot reach {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(report))
    else:
        lat, slip = report["latency_us"], report["schedule_slip_us"]
        print(
            f"{report['url']} at {config.rate} rps for {config.duration:g} s: "
            f"achieved {report['achieved_rps']:.0f} rps, {report['errors_total']} errors "
            f"{report['errors']}\n"
            f"latency us  p50 {lat.get('p50')}  p90 {lat.get('p90')}  p99 {lat.get('p99')}  "
            f"p99.9 {lat.get('p99.9')}  max {lat.get('max')}\n"
            f"schedule slip us p50 {slip.get('p50')}  p99 {slip.get('p99')}; "
            f"{report['queued']} requests waited for a free connection"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
