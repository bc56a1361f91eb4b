"""The OTLP/HTTP trace receiver: ``POST /v1/traces`` into a ``TraceStore``.

What the OTLP specification (opentelemetry.io/docs/specs/otlp/#otlphttp) asks, and this does:

* Bodies are ``ExportTraceServiceRequest``: binary protobuf (``application/x-protobuf``) or
  the protobuf JSON mapping (``application/json``), in which trace and span ids are hex
  strings, not base64, and unknown fields are ignored. ``content-encoding: gzip`` is accepted.
* Success is 200 with an ``ExportTraceServiceResponse`` in the request's encoding; spans that
  cannot be stored (ids of the wrong length) are counted in ``partial_success``.
* A body that cannot be decoded is 400 with a ``google.rpc.Status`` in the request's
  encoding; any other content type is 415; another path 404; another method 405.

Decoding is pure (``decode_protobuf``, ``decode_json`` → ``Span`` values); ``OtlpReceiver``
is the thin server around it.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import json
import logging
from collections.abc import Iterable
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from google.rpc import status_pb2  # type: ignore[import-untyped]

from meshlet.dashboard.otlp_proto import (
    AnyValue,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
    KeyValue,
    Status,
)
from meshlet.dashboard.otlp_proto import Span as PbSpan
from meshlet.dashboard.traces import Span, TraceStore
from meshlet.web import Request, Response, WebServer, json_error

log = logging.getLogger(__name__)

PATH = "/v1/traces"
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
DEFAULT_PORT = 4318  # OTLP/HTTP's registered port
UNKNOWN_SERVICE = "unknown_service"  # the SDKs' default service.name
_GRPC_INVALID_ARGUMENT = 3

_KINDS = {
    PbSpan.SPAN_KIND_UNSPECIFIED: "UNSPECIFIED",
    PbSpan.SPAN_KIND_INTERNAL: "INTERNAL",
    PbSpan.SPAN_KIND_SERVER: "SERVER",
    PbSpan.SPAN_KIND_CLIENT: "CLIENT",
    PbSpan.SPAN_KIND_PRODUCER: "PRODUCER",
    PbSpan.SPAN_KIND_CONSUMER: "CONSUMER",
}


class OtlpDecodeError(ValueError):
    """The body is not an ``ExportTraceServiceRequest`` in the encoding it claims."""


# -- decoding --------------------------------------------------------------------------------


def any_value(value: AnyValue) -> Any:
    """An ``AnyValue`` as JSON-able Python (bytes as hex, as the JSON mapping's ids)."""
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return attributes(value.kvlist_value.values)
    if which == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, which)


def attributes(items: Iterable[KeyValue]) -> dict[str, Any]:
    return {kv.key: any_value(kv.value) for kv in items}


def spans_of(request: ExportTraceServiceRequest) -> tuple[list[Span], int]:
    """The request's spans, and how many were rejected (ids of the wrong length)."""
    out: list[Span] = []
    rejected = 0
    for resource_spans in request.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        service = str(resource.get("service.name") or UNKNOWN_SERVICE)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                if (
                    len(span.trace_id) != 16
                    or len(span.span_id) != 8
                    or len(span.parent_span_id) not in (0, 8)
                    or not any(span.trace_id)
                ):
                    rejected += 1
                    continue
                attrs = attributes(span.attributes)
                flagged = attrs.get("error") in (True, "true")
                error = flagged or span.status.code == Status.STATUS_CODE_ERROR
                out.append(
                    Span(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        name=span.name,
                        service=service,
                        kind=_KINDS.get(span.kind, "UNSPECIFIED"),
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        error=error,
                        attributes=attrs,
                    )
                )
    return out, rejected


def decode_protobuf(body: bytes) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(body)
    except DecodeError as e:
        raise OtlpDecodeError(f"not a protobuf ExportTraceServiceRequest: {e}") from e
    return request


_ID_FIELDS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")


def _hex_ids_to_base64(obj: Any) -> None:
    """OTLP/JSON writes ids in hex; protobuf's JSON mapping reads bytes as base64."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in _ID_FIELDS and isinstance(value, str):
                try:
                    obj[key] = base64.b64encode(bytes.fromhex(value)).decode()
                except ValueError as e:
                    raise OtlpDecodeError(f"{key} {value!r} is not hex") from e
            else:
                _hex_ids_to_base64(value)
    elif isinstance(obj, list):
        for item in obj:
            _hex_ids_to_base64(item)


def decode_json(body: bytes) -> ExportTraceServiceRequest:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise OtlpDecodeError(f"not JSON: {e}") from e
    if not isinstance(data, dict):
        raise OtlpDecodeError("not a JSON object")
    _hex_ids_to_base64(data)
    request = ExportTraceServiceRequest()
    try:
        json_format.ParseDict(data, request, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, TypeError) as e:
        raise OtlpDecodeError(f"not an OTLP JSON ExportTraceServiceRequest: {e}") from e
    return request


# -- the receiver ----------------------------------------------------------------------------


def _encoded(message: Any, content_type: str, status: int) -> Response:
    if content_type == JSON:
        body = json_format.MessageToJson(message, indent=None).encode()
    else:
        body = message.SerializeToString()
    return Response(status=status, body=body, content_type=content_type)


class OtlpHandler:
    """``POST /v1/traces`` → ``store``; see the module docstring."""

    def __init__(self, store: TraceStore) -> None:
        self.store = store
        self.requests = 0
        self.rejected_requests = 0

    async def __call__(self, request: Request) -> Response:
        return self.handle(request)

    def handle(self, request: Request) -> Response:
        if request.path != PATH:
            return json_error(404, f"no such path {request.path!r}; traces go to {PATH}")
        if request.method != "POST":
            return json_error(405, f"{request.method} is not allowed on {PATH}; POST")
        content_type = request.content_type
        if content_type not in (PROTOBUF, JSON):
            return json_error(415, f"content-type {content_type!r}: send {PROTOBUF} or {JSON}")
        body = request.body
        try:
            if request.headers.get("content-encoding", "").lower() == "gzip":
                try:
                    body = gzip.decompress(body)
                except (OSError, EOFError, binascii.Error) as e:
                    raise OtlpDecodeError(f"not gzip: {e}") from e
            decoded = decode_json(body) if content_type == JSON else decode_protobuf(body)
        except OtlpDecodeError as e:
            self.rejected_requests += 1
            status = status_pb2.Status(code=_GRPC_INVALID_ARGUMENT, message=str(e))
            return _encoded(status, content_type, 400)
        spans, rejected = spans_of(decoded)
        self.store.add(spans)
        self.requests += 1
        response = ExportTraceServiceResponse()
        if rejected:
            response.partial_success.rejected_spans = rejected
            response.partial_success.error_message = (
                f"{rejected} span(s) with a trace id other than 16 bytes or a span id other"
                " than 8 were dropped"
            )
        return _encoded(response, content_type, 200)


class OtlpReceiver:
    """The receiver on ``address`` (``host:port``), storing into ``store``."""

    def __init__(self, store: TraceStore, address: str, *, hint: str = "") -> None:
        self.store = store
        self.handler = OtlpHandler(store)
        self.server = WebServer(self.handler, address, name="OTLP receiver", hint=hint)

    def __repr__(self) -> str:
        return f"<OtlpReceiver {self.server.bound_address} {self.store!r}>"

    @property
    def bound_address(self) -> str:
        return self.server.bound_address

    @property
    def endpoint(self) -> str:
        return f"http://{self.bound_address}{PATH}"

    async def start(self) -> None:
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop()
