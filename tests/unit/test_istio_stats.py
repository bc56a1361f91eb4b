"""The ``istio.stats`` filter: dropping metrics, removing labels, upserting dimensions, and the
refusals (NACK) of what meshlet cannot evaluate.

Semantics: Istio's Telemetry API metric overrides (https://istio.io/latest/docs/reference/
config/telemetry/#MetricsOverrides, https://istio.io/latest/docs/tasks/observability/metrics/
customize-metrics/) as istiod hands them to the proxy's ``stats.PluginConfig``: per metric
(or every metric for an empty name) ``drop``, ``tags_to_remove`` and ``dimensions`` whose
values are CEL expressions over Istio's attributes
(https://istio.io/latest/docs/reference/config/security/conditions/ lists the request ones).
"""

from __future__ import annotations

import pytest
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import json_format, struct_pb2
from prometheus_client.parser import text_string_to_metric_families
from xds.type.v3 import typed_struct_pb2

from meshlet.errors import ConfigError
from meshlet.proxy.filters.istio_stats import STATS_CONFIG_TYPE, StatsConfig, compile_stats
from meshlet.proxy.headers import Headers, RequestHead
from meshlet.proxy.listener import compile_hcm
from meshlet.proxy.stream_info import StreamInfo
from meshlet.proxy.telemetry.stats import IstioMetrics, NodeInfo, merge_snapshots, render_prometheus

NODE = NodeInfo(workload="web-v1", namespace="default", app="web", version="v1")


def compile_value(value: dict[str, object]) -> StatsConfig | None:
    struct = struct_pb2.Struct()
    json_format.ParseDict(value, struct)
    return compile_stats(struct, "stats")


def config(value: dict[str, object]) -> StatsConfig:
    compiled = compile_value(value)
    assert compiled is not None
    return compiled


def request(method: bytes = b"GET", **headers: str) -> StreamInfo:
    info = StreamInfo(start=1.0, start_wall=1.8e9, downstream_remote="a:1", downstream_local="b:80")
    info.request = RequestHead(
        method=method,
        path=b"/items?x=1",
        authority=b"web",
        headers=Headers([(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]),
    )
    info.end = 1.002
    info.response_code = 200
    return info


def exposition(metrics: IstioMetrics) -> dict[str, list[dict[str, str]]]:
    """Metric family -> the label sets of its samples (the reference parser reads the text)."""
    text = render_prometheus(merge_snapshots([{"istio": metrics.snapshot()}]))
    out: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith(("_bucket", "_sum")):
                continue
            out.setdefault(family.name, []).append(dict(s.labels))
    return out


def record(metrics: IstioMetrics, cfg: StatsConfig | None, info: StreamInfo) -> None:
    metrics.record(
        info,
        reporter="destination",
        destination_service="web.default.svc.cluster.local",
        destination_cluster="",
        config=cfg,
    )


def test_a_config_that_changes_nothing_is_istios_default():
    assert compile_value({}) is None
    assert compile_value({"disable_host_header_fallback": True, "metrics": []}) is None
    # What istiod emits for a metric without overrides.
    empty = {"name": "requests_total", "dimensions": {}, "tags_to_remove": [], "drop": False}
    assert compile_value({"metrics": [empty]}) is None


def test_a_dropped_metric_is_not_reported_and_the_others_are():
    metrics = IstioMetrics(NODE)
    record(metrics, config({"metrics": [{"name": "requests_total", "drop": True}]}), request())
    families = exposition(metrics)
    assert "istio_requests" not in families  # the parser strips _total from counter names
    assert "istio_request_duration_milliseconds" in families
    assert "istio_response_bytes" in families


def test_dropping_every_metric_reports_nothing():
    metrics = IstioMetrics(NODE)
    record(metrics, config({"metrics": [{"name": "", "drop": True}]}), request())
    assert metrics.snapshot() == []
    assert exposition(metrics) == {}


def test_tags_to_remove_apply_to_every_metric_for_an_empty_name():
    metrics = IstioMetrics(NODE)
    cfg = config({"metrics": [{"name": "", "tags_to_remove": ["source_principal", "nope"]}]})
    record(metrics, cfg, request())
    for samples in exposition(metrics).values():
        for labels in samples:
            assert "source_principal" not in labels
            assert labels["destination_workload"] == "web-v1"


def test_dimensions_add_labels_from_request_attributes_one_series_per_value():
    metrics = IstioMetrics(NODE)
    cfg = config(
        {
            "metrics": [
                {
                    "name": "requests_total",
                    "dimensions": {
                        "request_method": "request.method",
                        "user": "request.headers['x-user']",
                        "url_path": "request.url_path",
                    },
                }
            ]
        }
    )
    record(metrics, cfg, request(x_user="alice"))
    record(metrics, cfg, request(x_user="alice"))
    record(metrics, cfg, request(b"POST", x_user="bob"))
    record(metrics, cfg, request())
    families = exposition(metrics)
    got = sorted(
        (s["request_method"], s["user"], s["url_path"]) for s in families["istio_requests"]
    )
    assert got == [
        ("GET", "alice", "/items"),
        ("GET", "unknown", "/items"),
        ("POST", "bob", "/items"),
    ]
    # Only requests_total got the dimensions: the histograms keep the standard labels.
    for s in families["istio_request_duration_milliseconds"]:
        assert "user" not in s
    total = {
        s.labels["user"]: s.value
        for f in text_string_to_metric_families(
            render_prometheus(merge_snapshots([{"istio": metrics.snapshot()}]))
        )
        for s in f.samples
        if s.name == "istio_requests_total"
    }
    assert total == {"alice": 2.0, "bob": 1.0, "unknown": 1.0}


def test_a_dimension_overrides_a_standard_label_in_place():
    metrics = IstioMetrics(NODE)
    cfg = config({"metrics": [{"name": "", "dimensions": {"destination_app": "'frontend'"}}]})
    record(metrics, cfg, request())
    (item, *_) = metrics.snapshot()
    assert "names" not in item  # the label set is Istio's, one value changed
    for samples in exposition(metrics).values():
        assert all(s["destination_app"] == "frontend" for s in samples)


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ('"lit"', "lit"),
        ("request.host", "web"),
        ("request.path", "/items?x=1"),
        ("request.scheme", "http"),
        ("request.protocol", "HTTP/1.1"),
        ("request.useragent", "curl/8"),
        ("request.headers['Host']", "web"),
        ("response.code", "200"),
        ("response.grpc_status", "unknown"),
        ("source.principal", "unknown"),
        ("destination.port", "80"),
    ],
)
def test_each_supported_expression(expression, expected):
    metrics = IstioMetrics(NODE)
    cfg = config({"metrics": [{"name": "requests_total", "dimensions": {"d": expression}}]})
    record(metrics, cfg, request(user_agent="curl/8"))
    (sample,) = exposition(metrics)["istio_requests"]
    assert sample["d"] == expected


@pytest.mark.parametrize(
    ("value", "path", "message"),
    [
        (
            {"metrics": [{"name": "requests_total", "dimensions": {"x": "upstream_peer.app"}}]},
            "stats.metrics[0].dimensions.x",
            "expression 'upstream_peer.app' is not supported",
        ),
        (
            {"metrics": [{"dimensions": {"x": "request.headers['a'] + 'b'"}}]},
            "stats.metrics[0].dimensions.x",
            "is not supported",
        ),
        ({"metrics": [{"name": "tcp_sent_bytes_total"}]}, "stats.metrics[0].name", "not a metric"),
        ({"metrics": [{"name": "", "drop": "yes"}]}, "stats.metrics[0].drop", "must be a bool"),
        (
            {"metrics": [{"name": "", "dimensions": {"bad-name": "'x'"}}]},
            "stats.metrics[0].dimensions.bad-name",
            "label name",
        ),
        ({"metrics": [{"name": "", "tags": []}]}, "stats.metrics[0].tags", "not supported"),
        ({"reporter": "x"}, "stats.reporter", "not supported"),
    ],
)
def test_what_meshlet_cannot_honour_is_refused_naming_the_field(value, path, message):
    with pytest.raises(ConfigError) as e:
        compile_value(value)
    problems = {p.path: p.message for p in e.value.problems}
    assert path in problems, problems
    assert message in problems[path]


def stats_filter(value: dict[str, object]) -> hcm_pb2.HttpFilter:
    ts = typed_struct_pb2.TypedStruct(type_url=STATS_CONFIG_TYPE)
    json_format.ParseDict(value, ts.value)
    hf = hcm_pb2.HttpFilter(name="istio.stats")
    hf.typed_config.Pack(ts)
    return hf


def hcm(*filters: hcm_pb2.HttpFilter) -> hcm_pb2.HttpConnectionManager:
    proto = hcm_pb2.HttpConnectionManager(stat_prefix="x")
    proto.route_config.SetInParent()
    proto.http_filters.extend(filters)
    router = proto.http_filters.add(name="envoy.filters.http.router")
    router.typed_config.Pack(router_pb2.Router())
    return proto


def test_the_hcm_compiles_the_filter_and_nacks_with_the_full_path():
    drop = {"metrics": [{"name": "request_bytes", "drop": True}]}
    compiled = compile_hcm(hcm(stats_filter(drop)), "hcm", "l").istio_stats
    assert compiled is not None and compiled.plans[2].drop
    assert compile_hcm(hcm(), "hcm", "l").istio_stats is None  # no filter: Istio's defaults
    bad = {"metrics": [{"name": "", "dimensions": {"x": "connection.id"}}]}
    with pytest.raises(ConfigError) as e:
        compile_hcm(hcm(stats_filter(bad)), "hcm", "l")
    assert "hcm.http_filters[0].typed_config.value.metrics[0].dimensions.x" in str(e.value)


def test_two_stats_filters_are_refused():
    with pytest.raises(ConfigError, match="only one"):
        compile_hcm(hcm(stats_filter({}), stats_filter({})), "hcm", "l")
