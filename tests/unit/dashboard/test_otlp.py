"""OTLP/HTTP decoding and answers, as the OTLP specification states them
(opentelemetry.io/docs/specs/otlp/#otlphttp): binary protobuf and the JSON mapping with hex
ids, 200 with an ``ExportTraceServiceResponse`` in the request's encoding, 400 with a
``google.rpc.Status`` for a body that cannot be decoded, 415 for other content types."""

from __future__ import annotations

import gzip
import json

import pytest
from google.rpc import status_pb2

from meshlet.dashboard.otlp import JSON, PROTOBUF, OtlpHandler, decode_json, spans_of
from meshlet.dashboard.otlp_proto import (
    AnyValue,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
    KeyValue,
    Status,
)
from meshlet.dashboard.otlp_proto import Span as PbSpan
from meshlet.dashboard.traces import TraceStore
from meshlet.web import Request

TRACE = bytes.fromhex("5b8efff798038103d269b633813fc60c")
SPAN = bytes.fromhex("eee19b7ec3c1b174")
PARENT = bytes.fromhex("eee19b7ec3c1b173")


def _request(*, status: int = Status.STATUS_CODE_UNSET) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    rs = request.resource_spans.add()
    rs.resource.attributes.append(
        KeyValue(key="service.name", value=AnyValue(string_value="reviews.default"))
    )
    span = rs.scope_spans.add().spans.add()
    span.trace_id = TRACE
    span.span_id = SPAN
    span.parent_span_id = PARENT
    span.name = "reviews.default.svc.cluster.local:9080/reviews/0"
    span.kind = PbSpan.SPAN_KIND_SERVER
    span.start_time_unix_nano = 1_700_000_000_000_000_000
    span.end_time_unix_nano = 1_700_000_000_012_500_000
    span.status.code = status
    span.attributes.extend(
        [
            KeyValue(key="http.status_code", value=AnyValue(int_value=200)),
            KeyValue(key="component", value=AnyValue(string_value="proxy")),
            KeyValue(key="sampled", value=AnyValue(bool_value=True)),
        ]
    )
    return request


def _post(
    handler: OtlpHandler, body: bytes, content_type: str, **headers: str
) -> tuple[int, bytes, str]:
    response = handler.handle(
        Request(
            method="POST",
            path="/v1/traces",
            headers={"content-type": content_type, **headers},
            body=body,
        )
    )
    return response.status, response.body, response.content_type


def test_protobuf_spans_are_stored_with_hex_ids_service_kind_and_attributes() -> None:
    store = TraceStore()
    status, body, content_type = _post(OtlpHandler(store), _request().SerializeToString(), PROTOBUF)
    assert status == 200 and content_type == PROTOBUF
    answer = ExportTraceServiceResponse.FromString(body)
    assert not answer.HasField("partial_success")
    [span] = store.get(TRACE.hex()) or []
    assert span.span_id == SPAN.hex() and span.parent_span_id == PARENT.hex()
    assert span.service == "reviews.default"
    assert span.kind == "SERVER"
    assert span.duration_ms == 12.5
    assert span.attributes == {"http.status_code": 200, "component": "proxy", "sampled": True}
    assert not span.error


def test_status_error_marks_the_span_as_an_error() -> None:
    spans, rejected = spans_of(_request(status=Status.STATUS_CODE_ERROR))
    assert rejected == 0 and spans[0].error


OTLP_JSON = {
    "resourceSpans": [
        {
            "resource": {
                "attributes": [{"key": "service.name", "value": {"stringValue": "ratings.default"}}]
            },
            "scopeSpans": [
                {
                    "scope": {"name": "meshlet"},
                    "spans": [
                        {
                            "traceId": TRACE.hex().upper(),  # hex is case-insensitive
                            "spanId": SPAN.hex(),
                            "parentSpanId": "",
                            "name": "ratings.default.svc.cluster.local:9080/ratings/0",
                            "kind": 3,
                            "startTimeUnixNano": "1700000000000000000",
                            "endTimeUnixNano": 1700000000002000000,
                            "attributes": [
                                {"key": "http.status_code", "value": {"intValue": "503"}},
                                {"key": "error", "value": {"boolValue": True}},
                            ],
                            "status": {"code": 2},
                            "someFutureField": {"ignored": True},
                        }
                    ],
                }
            ],
        }
    ]
}


def test_json_mapping_has_hex_ids_integer_enums_and_int64_strings() -> None:
    store = TraceStore()
    status, body, content_type = _post(OtlpHandler(store), json.dumps(OTLP_JSON).encode(), JSON)
    assert status == 200 and content_type == JSON
    assert json.loads(body) == {}  # an ExportTraceServiceResponse with nothing to say
    [span] = store.get(TRACE.hex()) or []
    assert span.span_id == SPAN.hex() and span.parent_span_id == ""
    assert span.kind == "CLIENT" and span.service == "ratings.default"
    assert span.duration_ms == 2.0
    assert span.attributes["http.status_code"] == 503
    assert span.error


def test_json_enum_names_are_accepted_too() -> None:
    data = json.loads(json.dumps(OTLP_JSON))
    data["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["kind"] = "SPAN_KIND_SERVER"
    [span], _ = spans_of(decode_json(json.dumps(data).encode()))
    assert span.kind == "SERVER"


def test_spans_with_ids_of_the_wrong_length_are_a_partial_success() -> None:
    request = _request()
    bad = request.resource_spans[0].scope_spans[0].spans.add()
    bad.trace_id = b"\x01" * 8  # 8 bytes, not 16
    bad.span_id = SPAN
    store = TraceStore()
    status, body, _ = _post(OtlpHandler(store), request.SerializeToString(), PROTOBUF)
    assert status == 200
    answer = ExportTraceServiceResponse.FromString(body)
    assert answer.partial_success.rejected_spans == 1
    assert store.span_count == 1


def test_gzip_bodies_are_decoded() -> None:
    store = TraceStore()
    body = gzip.compress(_request().SerializeToString())
    status, _, _ = _post(OtlpHandler(store), body, PROTOBUF, **{"content-encoding": "gzip"})
    assert status == 200 and store.span_count == 1


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"\xff\xff\xff\xff", PROTOBUF),
        (b"{not json", JSON),
        (b"[1, 2]", JSON),
        (
            json.dumps(
                {"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}
            ).encode(),
            JSON,
        ),
        (json.dumps({"resourceSpans": "nope"}).encode(), JSON),
    ],
)
def test_a_malformed_body_is_400_with_a_status_in_the_request_encoding(
    body: bytes, content_type: str
) -> None:
    store = TraceStore()
    status, answer, answer_type = _post(OtlpHandler(store), body, content_type)
    assert status == 400 and answer_type == content_type
    if content_type == PROTOBUF:
        message = status_pb2.Status.FromString(answer)
    else:
        message = status_pb2.Status(**json.loads(answer))
    assert message.code == 3 and message.message  # INVALID_ARGUMENT, and why
    assert store.span_count == 0


def test_other_content_types_are_415_and_other_methods_and_paths_refused() -> None:
    handler = OtlpHandler(TraceStore())
    assert _post(handler, b"x", "text/plain")[0] == 415
    assert handler.handle(Request(method="GET", path="/v1/traces")).status == 405
    assert handler.handle(Request(method="POST", path="/v1/metrics")).status == 404


def test_content_type_parameters_are_ignored() -> None:
    handler = OtlpHandler(TraceStore())
    status, _, _ = _post(handler, json.dumps(OTLP_JSON).encode(), "application/json; charset=utf-8")
    assert status == 200
