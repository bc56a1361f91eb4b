"""An OTLP/HTTP sink for bench/telemetry.py: accepts ``POST /v1/traces`` (protobuf) and
counts the spans; ``GET /count`` answers ``{"spans": N, "requests": N}``.

    python bench/otlp_sink.py PORT
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from meshlet.dashboard.otlp_proto import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

counts = {"spans": 0, "requests": 0}


class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._reply(200, json.dumps(counts).encode(), "application/json")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        request = ExportTraceServiceRequest.FromString(body)
        counts["requests"] += 1
        counts["spans"] += sum(
            len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans
        )
        reply = ExportTraceServiceResponse().SerializeToString()
        self._reply(200, reply, "application/x-protobuf")


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
