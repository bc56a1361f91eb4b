"""Tracing in the proxy: trace context in and out, sampling, span tags, compiling ``tracing``.

References: W3C Trace Context (https://www.w3.org/TR/trace-context/, "traceparent header"),
B3 propagation (https://github.com/openzipkin/b3-propagation), Envoy's HCM tracing
(https://www.envoyproxy.io/docs/envoy/latest/intro/arch_overview/observability/tracing and
``HttpConnectionManager.Tracing``: random_sampling defaults to 100 %), and Envoy's span tags
(``source/common/tracing/http_tracer_impl.cc``).
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from envoy.config.trace.v3 import opentelemetry_pb2  # noqa: F401  (registers the @type)
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import json_format
from hypothesis import given
from hypothesis import strategies as st

from meshlet.dashboard import otlp_proto as trace_pb2
from meshlet.dashboard import otlp_proto as trace_service_pb2
from meshlet.errors import ConfigError
from meshlet.proxy.headers import Headers, RequestHead
from meshlet.proxy.listener import compile_hcm
from meshlet.proxy.stream_info import Flag, StreamInfo
from meshlet.proxy.telemetry.otlp_export import encode
from meshlet.proxy.telemetry.tracing import (
    KIND_CLIENT,
    KIND_SERVER,
    TRACE_HEADERS,
    NodeTags,
    OtlpEndpoint,
    Span,
    SpanContext,
    TracingConfig,
    compile_tracing,
    extract,
    parse_b3_multi,
    parse_b3_single,
    parse_traceparent,
    span_attributes,
    start_span,
)

TRACE = b"4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = b"00f067aa0ba902b7"
OTEL = "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig"
ENDPOINT = OtlpEndpoint(uri="http://127.0.0.1:4318/v1/traces", host="127.0.0.1", port=4318,
                        path="/v1/traces")  # fmt: skip


def config(**kw: Any) -> TracingConfig:
    return TracingConfig(endpoint=ENDPOINT, **kw)


def head(*headers: tuple[bytes, bytes], path: bytes = b"/productpage?u=1") -> RequestHead:
    return RequestHead(
        method=b"GET",
        path=path,
        authority=b"productpage.default.svc.cluster.local:9080",
        headers=Headers(list(headers)),
    )


# -- W3C traceparent ---------------------------------------------------------------------------


def test_traceparent_gives_trace_parent_and_decision():
    assert parse_traceparent(b"00-" + TRACE + b"-" + PARENT + b"-01") == SpanContext(
        TRACE, PARENT, True
    )
    assert parse_traceparent(b"00-" + TRACE + b"-" + PARENT + b"-00") == SpanContext(
        TRACE, PARENT, False
    )
    # Only bit 0 of the flags is "sampled"; other bits are ignored.
    assert parse_traceparent(b"00-" + TRACE + b"-" + PARENT + b"-03").sampled is True  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"garbage",
        b"00-" + TRACE + b"-" + PARENT,  # no flags
        b"00-" + TRACE.upper() + b"-" + PARENT + b"-01",  # upper-case hex is invalid
        b"00-" + TRACE[:-1] + b"-" + PARENT + b"-01",  # short trace id
        b"00-" + b"0" * 32 + b"-" + PARENT + b"-01",  # all-zero trace id
        b"00-" + TRACE + b"-" + b"0" * 16 + b"-01",  # all-zero parent id
        b"ff-" + TRACE + b"-" + PARENT + b"-01",  # version ff is forbidden
        b"00-" + TRACE + b"-" + PARENT + b"-01-extra",  # version 00 has exactly 4 fields
        b"0g-" + TRACE + b"-" + PARENT + b"-01",
        b"00-" + TRACE + b"-" + PARENT + b"-1",
    ],
)
def test_malformed_traceparent_is_ignored(value: bytes) -> None:
    assert parse_traceparent(value) is None


def test_a_later_traceparent_version_may_carry_more_fields():
    # W3C: a parser for version 00 reading a higher version takes the first four fields.
    assert parse_traceparent(b"01-" + TRACE + b"-" + PARENT + b"-01-what-ever") == SpanContext(
        TRACE, PARENT, True
    )


_HEXCHARS = "0123456789abcdef"


@given(
    st.text(_HEXCHARS, min_size=32, max_size=32),
    st.text(_HEXCHARS, min_size=16, max_size=16),
    st.integers(0, 255),
)
def test_any_valid_traceparent_parses_and_round_trips(trace: str, parent: str, flags: int) -> None:
    value = f"00-{trace}-{parent}-{flags:02x}".encode()
    ctx = parse_traceparent(value)
    if set(trace) == {"0"} or set(parent) == {"0"}:
        assert ctx is None
        return
    assert ctx == SpanContext(trace.encode(), parent.encode(), bool(flags & 1))
    span = Span(config(), KIND_SERVER, ctx.trace_id, ctx.span_id, b"", ctx.sampled)
    assert parse_traceparent(span.traceparent) == SpanContext(
        ctx.trace_id, ctx.span_id, ctx.sampled
    )


@given(st.lists(st.tuples(st.sampled_from(sorted(TRACE_HEADERS)), st.binary(max_size=80))))
def test_arbitrary_trace_headers_never_break_a_request(items: list[tuple[bytes, bytes]]) -> None:
    span = start_span(config(), head(*items), outbound=False, rng=random.Random(0))
    assert len(span.trace_id) == 32 and len(span.span_id) == 16
    headers = Headers(list(items))
    span.inject(headers)
    assert parse_traceparent(headers.get(b"traceparent") or b"") is not None


# -- B3 ----------------------------------------------------------------------------------------


def test_b3_single_header_forms():
    assert parse_b3_single(TRACE + b"-" + PARENT + b"-1") == SpanContext(TRACE, PARENT, True)
    assert parse_b3_single(TRACE + b"-" + PARENT + b"-0-" + b"1" * 16) == SpanContext(
        TRACE, PARENT, False
    )
    assert parse_b3_single(TRACE + b"-" + PARENT) == SpanContext(TRACE, PARENT, None)
    assert parse_b3_single(TRACE + b"-" + PARENT + b"-d") == SpanContext(TRACE, PARENT, True, True)
    # A decision alone: "b3: 0" means "do not sample", with no ids.
    assert parse_b3_single(b"0") == SpanContext(b"", b"", False)
    assert parse_b3_single(b"1") == SpanContext(b"", b"", True)
    # A 64-bit trace id is left-padded to 128 bits (what W3C needs).
    assert parse_b3_single(b"a3ce929d0e0e4736-" + PARENT + b"-1") == SpanContext(
        b"0" * 16 + b"a3ce929d0e0e4736", PARENT, True
    )


@pytest.mark.parametrize(
    "value", [b"x", TRACE + b"-xyz-1", TRACE + b"-" + PARENT + b"-7", b"1-2-3-4-5", b"-"]
)
def test_malformed_b3_single_is_ignored(value: bytes) -> None:
    assert parse_b3_single(value) is None


def test_b3_multi_headers():
    found = {b"x-b3-traceid": TRACE, b"x-b3-spanid": PARENT, b"x-b3-sampled": b"1"}
    assert parse_b3_multi(found) == SpanContext(TRACE, PARENT, True)
    assert parse_b3_multi({**found, b"x-b3-sampled": b"0"}) == SpanContext(TRACE, PARENT, False)
    assert parse_b3_multi({**found, b"x-b3-sampled": b"true"}) == SpanContext(TRACE, PARENT, True)
    # x-b3-flags: 1 is debug, which implies sampled.
    assert parse_b3_multi(
        {b"x-b3-traceid": TRACE, b"x-b3-spanid": PARENT, b"x-b3-flags": b"1"}
    ) == (SpanContext(TRACE, PARENT, True, True))
    # Bad ids: the decision still counts, the ids do not.
    assert parse_b3_multi(
        {b"x-b3-traceid": b"zz", b"x-b3-spanid": PARENT, b"x-b3-sampled": b"0"}
    ) == (SpanContext(b"", b"", False))
    assert parse_b3_multi({b"x-b3-traceid": b"zz", b"x-b3-spanid": PARENT}) is None


def test_traceparent_wins_over_b3_and_a_malformed_one_falls_back_to_b3():
    tp = (b"traceparent", b"00-" + TRACE + b"-" + PARENT + b"-01")
    b3 = [(b"x-b3-traceid", b"1" * 32), (b"x-b3-spanid", b"2" * 16), (b"x-b3-sampled", b"0")]
    ctx, _ = extract(Headers([*b3, tp]))
    assert ctx == SpanContext(TRACE, PARENT, True)
    ctx, _ = extract(Headers([(b"traceparent", b"nonsense"), *b3]))
    assert ctx == SpanContext(b"1" * 32, b"2" * 16, False)
    ctx, client = extract(Headers([(b"x-client-trace-id", b"abc")]))
    assert ctx is None and client


# -- sampling ----------------------------------------------------------------------------------


def test_an_upstream_decision_is_honoured_both_ways():
    rng = random.Random(1)
    never, always = config(random_sampling=0.0), config(random_sampling=1.0)
    sampled = head((b"traceparent", b"00-" + TRACE + b"-" + PARENT + b"-01"))
    unsampled = head((b"traceparent", b"00-" + TRACE + b"-" + PARENT + b"-00"))
    for _ in range(50):
        assert start_span(never, sampled, outbound=False, rng=rng).sampled
        assert not start_span(always, unsampled, outbound=False, rng=rng).sampled
    assert not start_span(always, head((b"x-b3-sampled", b"0")), outbound=False, rng=rng).sampled
    assert start_span(never, head((b"b3", b"1")), outbound=False, rng=rng).sampled


def test_without_a_decision_the_configured_rates_decide():
    rng = random.Random(7)
    assert all(start_span(config(), head(), outbound=False, rng=rng).sampled for _ in range(100))
    none = config(random_sampling=0.0)
    assert not any(start_span(none, head(), outbound=False, rng=rng).sampled for _ in range(100))
    half = config(random_sampling=0.5)
    n = sum(start_span(half, head(), outbound=False, rng=rng).sampled for _ in range(2000))
    assert 800 < n < 1200
    # B3 ids without a decision: this proxy decides (and keeps the ids).
    span = start_span(none, head((b"b3", TRACE + b"-" + PARENT)), outbound=False, rng=rng)
    assert (span.trace_id, span.parent_id, span.sampled) == (TRACE, PARENT, False)


def test_client_sampling_applies_to_requests_with_x_client_trace_id_and_overall_caps_all():
    rng = random.Random(3)
    cfg = config(random_sampling=0.0, client_sampling=1.0)
    assert start_span(cfg, head((b"x-client-trace-id", b"1")), outbound=False, rng=rng).sampled
    assert not start_span(cfg, head(), outbound=False, rng=rng).sampled
    capped = config(random_sampling=1.0, overall_sampling=0.0)
    assert not start_span(capped, head(), outbound=False, rng=rng).sampled


def test_a_new_trace_gets_fresh_ids_and_a_child_keeps_the_trace():
    rng = random.Random(5)
    root = start_span(config(), head(), outbound=True, rng=rng)
    assert len(root.trace_id) == 32 and len(root.span_id) == 16 and root.parent_id == b""
    assert root.kind == KIND_CLIENT
    child = start_span(config(), head((b"traceparent", root.traceparent)), outbound=False, rng=rng)
    assert child.kind == KIND_SERVER
    assert (child.trace_id, child.parent_id) == (root.trace_id, root.span_id)
    assert child.span_id != root.span_id


# -- injection ---------------------------------------------------------------------------------


def test_injection_replaces_trace_headers_and_passes_tracestate_through():
    headers = Headers(
        [
            (b"traceparent", b"00-" + TRACE + b"-" + PARENT + b"-01"),
            (b"tracestate", b"congo=t61rcWkgMzE"),
            (b"x-b3-traceid", b"9" * 32),
            (b"b3", b"0"),
            (b"x-request-id", b"abc"),
        ]
    )
    span = Span(config(), KIND_SERVER, TRACE, b"1" * 16, PARENT, True)
    span.inject(headers)
    assert headers.get_all(b"traceparent") == [b"00-" + TRACE + b"-" + b"1" * 16 + b"-01"]
    assert headers.get(b"tracestate") == b"congo=t61rcWkgMzE"
    assert headers.get_all(b"x-b3-traceid") == [TRACE]
    assert headers.get(b"x-b3-spanid") == b"1" * 16
    assert headers.get(b"x-b3-parentspanid") == PARENT
    assert headers.get(b"x-b3-sampled") == b"1"
    assert b"b3" not in headers
    assert headers.get(b"x-request-id") == b"abc"


def test_an_unsampled_root_span_still_propagates_its_decision():
    headers = Headers()
    Span(config(), KIND_CLIENT, TRACE, PARENT, b"", False).inject(headers)
    assert headers.get(b"traceparent") == b"00-" + TRACE + b"-" + PARENT + b"-00"
    assert headers.get(b"x-b3-sampled") == b"0"
    assert b"x-b3-parentspanid" not in headers


# -- tags and export ---------------------------------------------------------------------------


def finished(code: int = 200, **kw: Any) -> StreamInfo:
    info = StreamInfo(start=10.0, start_wall=1795647303.5, downstream_remote="10.0.0.1:40000",
                      downstream_local="10.0.0.2:15006")  # fmt: skip
    info.end = 10.25
    info.request = head(
        (b"user-agent", b"curl/8"),
        (b"x-request-id", b"req-1"),
        (b"x-forwarded-proto", b"http"),
        (b"x-tenant", b"acme"),
    )
    info.response_code = code
    info.upstream_cluster = "outbound|9080||productpage.default.svc.cluster.local"
    info.upstream_host = "10.0.0.3:9080"
    info.bytes_received, info.bytes_sent = 3, 1234
    for k, v in kw.items():
        setattr(info, k, v)
    return info


def test_span_attributes_use_envoys_tag_names():
    span = Span(config(), KIND_SERVER, TRACE, PARENT, b"", True)
    tags = dict(span_attributes(span, finished()))
    assert tags["http.method"] == "GET"
    assert tags["http.url"] == "http://productpage.default.svc.cluster.local:9080/productpage?u=1"
    assert tags["http.protocol"] == "HTTP/1.1"
    assert tags["http.status_code"] == "200"
    assert tags["upstream_cluster"] == tags["upstream_cluster.name"]
    assert tags["guid:x-request-id"] == "req-1"
    assert tags["user_agent"] == "curl/8"
    assert tags["downstream_cluster"] == "-"
    assert (tags["request_size"], tags["response_size"]) == ("3", "1234")
    assert tags["response_flags"] == "-"
    assert tags["peer.address"] == "10.0.0.1:40000"
    assert "error" not in tags


def test_5xx_and_missing_responses_are_errors_and_flags_are_tagged():
    span = Span(config(), KIND_SERVER, TRACE, PARENT, b"", True)
    info = finished(503)
    info.add_flag(Flag.NO_HEALTHY_UPSTREAM)
    tags = dict(span_attributes(span, info))
    assert tags["error"] == "true" and tags["response_flags"] == "UH"
    assert dict(span_attributes(span, finished(0)))["error"] == "true"


def test_custom_tags_and_max_path_tag_length():
    tracing = compile_tracing(
        tracing_proto(
            custom_tags=[
                {"tag": "lit", "literal": {"value": "v"}},
                {"tag": "env", "environment": {"name": "MESHLET_T", "default_value": "d"}},
                {"tag": "env2", "environment": {"name": "MESHLET_NONE", "default_value": "d"}},
                {"tag": "tenant", "request_header": {"name": "X-Tenant"}},
                {"tag": "missing", "request_header": {"name": "x-no", "default_value": "dflt"}},
                {"tag": "gone", "request_header": {"name": "x-no"}},
            ],
            max_path_tag_length=20,
        ),
        "tracing",
        environ={"MESHLET_T": "from-env"},
    )
    assert tracing is not None
    tags = dict(span_attributes(Span(tracing, KIND_SERVER, TRACE, PARENT, b"", True), finished()))
    assert tags["lit"] == "v"
    assert (tags["env"], tags["env2"]) == ("from-env", "d")
    assert tags["tenant"] == "acme"
    assert tags["missing"] == "dflt"
    assert "gone" not in tags
    assert tags["http.url"] == "http://productpage.d"


def test_encode_builds_an_otlp_export_request():
    node = NodeTags(node_id="sidecar~10.0.0.2~reviews-v1-1.default~default.svc.cluster.local",
                    canonical_service="reviews", canonical_revision="v1", namespace="default",
                    mesh_id="cluster.local", pod_name="reviews-v1-1")  # fmt: skip
    span = Span(config(), KIND_SERVER, TRACE, b"1" * 16, PARENT, True)
    body = encode([(span, finished(500))], node)
    request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
    (rs,) = request.resource_spans
    resource = {a.key: a.value.string_value for a in rs.resource.attributes}
    assert resource == {"service.name": "reviews.default", "k8s.pod.name": "reviews-v1-1",
                        "k8s.namespace.name": "default"}  # fmt: skip
    (pb,) = rs.scope_spans[0].spans
    assert pb.trace_id.hex() == TRACE.decode() and pb.parent_span_id.hex() == PARENT.decode()
    assert pb.span_id.hex() == "1" * 16
    assert pb.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert pb.name == "productpage.default.svc.cluster.local:9080/productpage"
    assert pb.end_time_unix_nano - pb.start_time_unix_nano == 250_000_000
    assert pb.status.code == trace_pb2.Status.STATUS_CODE_ERROR
    assert pb.flags == 1  # W3C "sampled"
    assert pb.trace_state == ""
    attrs = {a.key: a.value.string_value for a in pb.attributes}
    assert attrs["istio.canonical_service"] == "reviews" and attrs["component"] == "proxy"
    assert attrs["node_id"].startswith("sidecar~") and attrs["istio.mesh_id"] == "cluster.local"
    # The configured service_name wins over Istio's default.
    body = encode([(span, finished())], node, "custom")
    rs = trace_service_pb2.ExportTraceServiceRequest.FromString(body).resource_spans[0]
    assert rs.resource.attributes[0].value.string_value == "custom"


# -- compiling ---------------------------------------------------------------------------------


def tracing_proto(**fields: Any) -> hcm_pb2.HttpConnectionManager.Tracing:
    otel = fields.pop(
        "otel",
        {"http_service": {"http_uri": {"uri": "http://127.0.0.1:4318/v1/traces",
                                       "cluster": "otel", "timeout": "0.5s"}},
         "service_name": "svc"},
    )  # fmt: skip
    provider = fields.pop(
        "provider", {"name": "envoy.tracers.opentelemetry", "typed_config": {"@type": OTEL, **otel}}
    )
    body = {"provider": provider, **fields} if provider is not None else fields
    return json_format.ParseDict(body, hcm_pb2.HttpConnectionManager.Tracing())


def test_compile_defaults_follow_envoy():
    tracing = compile_tracing(tracing_proto(), "tracing")
    assert tracing is not None
    assert (tracing.random_sampling, tracing.client_sampling, tracing.overall_sampling) == (
        1.0, 1.0, 1.0
    )  # fmt: skip
    ep = tracing.endpoint
    assert (ep.host, ep.port, ep.path, ep.timeout, ep.service_name) == (
        "127.0.0.1", 4318, "/v1/traces", 0.5, "svc"
    )  # fmt: skip
    tracing = compile_tracing(tracing_proto(random_sampling={"value": 1.0}), "tracing")
    assert tracing is not None and tracing.random_sampling == pytest.approx(0.01)


def test_tracing_without_a_provider_traces_nothing():
    assert compile_tracing(tracing_proto(provider=None, random_sampling={"value": 5}), "t") is None


@pytest.mark.parametrize(
    ("fields", "where", "says"),
    [
        ({"otel": {"grpc_service": {"envoy_grpc": {"cluster_name": "otel"}}}},
         "t.provider.typed_config.grpc_service", "use http_service, OTLP over HTTP"),
        ({"provider": {"name": "envoy.tracers.zipkin"}}, "t.provider",
         "envoy.tracers.zipkin is not supported (supported: envoy.tracers.opentelemetry)"),
        ({"custom_tags": [{"tag": "m", "metadata": {"kind": {"request": {}}}}]},
         "t.custom_tags[0].metadata", "is not supported"),
        ({"spawn_upstream_span": True}, "t.spawn_upstream_span", "only false"),
        ({"verbose": True}, "t.verbose", "is not supported"),
        ({"otel": {"http_service": {"http_uri": {"uri": "https://c:4318/v1/traces"}}}},
         "t.provider.typed_config.http_service.http_uri.uri", "must be an http:// URL"),
        ({"otel": {"service_name": "x"}}, "t.provider.typed_config.http_service", "is required"),
        ({"random_sampling": {"value": 101}}, "t.random_sampling.value", "between 0 and 100"),
    ],
)  # fmt: skip
def test_unsupported_tracing_is_refused_by_name(fields: Any, where: str, says: str) -> None:
    with pytest.raises(ConfigError) as e:
        compile_tracing(tracing_proto(**fields), "t")
    text = str(e.value)
    assert where in text and says in text, text


def test_the_hcm_accepts_tracing_and_names_problems_under_it():
    hcm = hcm_pb2.HttpConnectionManager()
    json_format.ParseDict(
        {
            "stat_prefix": "in",
            "route_config": {"name": "r"},
            "http_filters": [
                {"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
            ],
        },
        hcm,
    )  # fmt: skip
    hcm.tracing.CopyFrom(tracing_proto())
    compiled = compile_hcm(hcm, "hcm", "l")
    assert compiled.tracing is not None and compiled.tracing.endpoint.port == 4318
    hcm.tracing.CopyFrom(tracing_proto(spawn_upstream_span=True))
    with pytest.raises(ConfigError) as e:
        compile_hcm(hcm, "hcm", "l")
    assert "hcm.tracing.spawn_upstream_span" in str(e.value)
    hcm.ClearField("tracing")
    assert compile_hcm(hcm, "hcm", "l").tracing is None
