"""The OTLP/HTTP span exporter against real sockets: batching, keep-alive, a collector that
closes idle connections, a full queue, a collector that is down.

OTLP/HTTP: https://opentelemetry.io/docs/specs/otlp/#otlphttp (``POST /v1/traces``, binary
protobuf, ``Content-Type: application/x-protobuf``, 200 on success).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

from meshlet.dashboard import otlp_proto as trace_service_pb2
from meshlet.proxy.headers import Headers, RequestHead
from meshlet.proxy.stream_info import StreamInfo
from meshlet.proxy.telemetry.otlp_export import BATCH_SIZE, OtlpExporter
from meshlet.proxy.telemetry.stats import TracingStats
from meshlet.proxy.telemetry.tracing import (
    KIND_SERVER,
    NodeTags,
    OtlpEndpoint,
    Span,
    TracingConfig,
)
from tests.ports import free_port


@dataclass
class Sink:
    """An asyncio OTLP/HTTP receiver; ``close_after_each`` closes every connection after its
    response without saying so (as a collector's idle timeout does, at the worst moment)."""

    close_after_each: bool = False
    status: int = 200
    connections: int = 0
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while line := await reader.readline():
                assert line.startswith(b"POST /v1/traces HTTP/1.1"), line
                headers = {}
                while (h := await reader.readline()) != b"\r\n":
                    k, _, v = h.decode().partition(":")
                    headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers["content-length"]))
                self.requests.append((headers, body))
                writer.write(b"HTTP/1.1 %d X\r\ncontent-length: 0\r\n\r\n" % self.status)
                await writer.drain()
                self.arrived.set()
                if self.close_after_each:
                    break
        finally:
            writer.close()

    def spans(self) -> list[str]:
        out = []
        for _, body in self.requests:
            request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
            for rs in request.resource_spans:
                for ss in rs.scope_spans:
                    out.extend(s.span_id.hex() for s in ss.spans)
        return out


def span_and_info(rng: random.Random) -> tuple[Span, StreamInfo]:
    endpoint = OtlpEndpoint(uri="", host="", port=0, path="")
    span = Span(
        TracingConfig(endpoint=endpoint), KIND_SERVER, b"%032x" % rng.getrandbits(128),
        b"%016x" % rng.getrandbits(64), b"", True,
    )  # fmt: skip
    info = StreamInfo(start=0.0, start_wall=1.8e9, downstream_remote="127.0.0.1:1",
                      downstream_local="127.0.0.1:2")  # fmt: skip
    info.end = 0.001
    info.request = RequestHead(method=b"GET", path=b"/", authority=b"a", headers=Headers())
    info.response_code = 200
    return span, info


async def exporter_for(sink: Sink, max_queue: int = 2048) -> tuple[OtlpExporter, asyncio.Server]:
    port = free_port()
    server = await asyncio.start_server(sink.handle, "127.0.0.1", port)
    endpoint = OtlpEndpoint(uri=f"http://127.0.0.1:{port}/v1/traces", host="127.0.0.1",
                            port=port, path="/v1/traces", timeout=5.0, max_queue=max_queue,
                            headers=(("x-tenant", "t1"),))  # fmt: skip
    loop = asyncio.get_running_loop()
    return OtlpExporter(endpoint, NodeTags(), TracingStats(), loop), server


def test_a_full_batch_goes_at_once_on_one_keep_alive_connection() -> None:
    async def main() -> None:
        sink = Sink()
        exporter, server = await exporter_for(sink)
        rng = random.Random(1)
        sent = []
        for _round in range(3):
            sink.arrived.clear()
            for _ in range(BATCH_SIZE):
                span, info = span_and_info(rng)
                sent.append(span.span_id.decode())
                exporter.submit(span, info)
            await asyncio.wait_for(sink.arrived.wait(), 10)  # no 1 s timer: the batch is full
        await exporter.close()  # waits for the export in flight
        assert sink.spans() == sent
        assert sink.connections == 1
        headers = sink.requests[0][0]
        assert headers["content-type"] == "application/x-protobuf"
        assert headers["x-tenant"] == "t1"
        assert exporter.stats.spans_sent == 3 * BATCH_SIZE
        assert exporter.stats.timer_flushed == 0
        server.close()

    asyncio.run(main())


def test_a_connection_the_collector_closed_is_replaced_without_losing_spans() -> None:
    async def main() -> None:
        sink = Sink(close_after_each=True)
        exporter, server = await exporter_for(sink)
        rng = random.Random(2)
        for i in range(3):
            exporter.submit(*span_and_info(rng))
            await exporter.close()  # exports now (what shutdown does)
            assert len(sink.requests) == i + 1
        assert exporter.stats.spans_sent == 3
        assert exporter.stats.export_failures == 0
        assert sink.connections == 3
        server.close()

    asyncio.run(main())


def test_the_timer_sends_a_partial_batch() -> None:
    async def main() -> None:
        sink = Sink()
        exporter, server = await exporter_for(sink)
        exporter.submit(*span_and_info(random.Random(3)))
        await asyncio.wait_for(sink.arrived.wait(), 10)
        assert exporter.stats.timer_flushed == 1
        await exporter.close()
        assert exporter.stats.spans_sent == 1
        server.close()

    asyncio.run(main())


def test_a_full_queue_drops_and_counts_and_a_failed_export_counts() -> None:
    async def main() -> None:
        sink = Sink(status=503)
        exporter, server = await exporter_for(sink, max_queue=5)
        rng = random.Random(4)
        for _ in range(8):
            exporter.submit(*span_and_info(rng))
        assert exporter.stats.spans_dropped == 3  # no waiting, no growth past the bound
        await exporter.close()
        assert exporter.stats.export_failures == 1
        assert exporter.stats.spans_dropped == 8
        assert exporter.stats.spans_sent == 0
        server.close()

    asyncio.run(main())


def test_a_collector_that_is_down_costs_failures_not_errors() -> None:
    async def main() -> None:
        port = free_port()  # nothing listens here
        endpoint = OtlpEndpoint(uri="", host="127.0.0.1", port=port, path="/v1/traces")
        exporter = OtlpExporter(endpoint, NodeTags(), TracingStats(), asyncio.get_running_loop())
        exporter.submit(*span_and_info(random.Random(5)))
        await exporter.close()
        assert (exporter.stats.export_failures, exporter.stats.spans_dropped) == (1, 1)

    asyncio.run(main())
