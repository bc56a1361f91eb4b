"""Envoy stats and Istio metrics: counting, snapshots, merging across workers, rendering."""

from __future__ import annotations

import json
import pickle
import re

import pytest
from envoy.config.core.v3 import base_pb2
from google.protobuf import json_format
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from meshlet.proxy.headers import Headers, RequestHead
from meshlet.proxy.stream_info import Flag, StreamInfo
from meshlet.proxy.telemetry.stats import (
    ENVOY_DEFAULT_BUCKETS,
    ISTIO_LABELS,
    ClusterStats,
    Histogram,
    HttpStats,
    IstioMetrics,
    NodeInfo,
    StatsStore,
    merge_snapshots,
    render_prometheus,
    render_text,
    service_name_namespace,
)

REVIEWS = "outbound|9080||reviews.default.svc.cluster.local"
PRODUCTPAGE = NodeInfo(
    id="sidecar~10.0.0.7~productpage-v1-123.default~default.svc.cluster.local",
    cluster="productpage.default",
    workload="productpage-v1",
    namespace="default",
    app="productpage",
    version="v1",
    canonical_service="productpage",
    canonical_revision="v1",
    principal="spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
    cluster_id="Kubernetes",
)


def finished(
    code: int = 200, ms: float = 12.0, *, sent: int = 100, received: int = 0
) -> StreamInfo:
    info = StreamInfo(start=10.0, start_wall=1.8e9, downstream_remote="a:1", downstream_local="b:2")
    info.request = RequestHead(method=b"GET", path=b"/", authority=b"reviews", headers=Headers())
    info.end = 10.0 + ms / 1000
    info.response_code = code
    info.bytes_sent = sent
    info.bytes_received = received
    return info


class Samples(dict[tuple[str, frozenset[tuple[str, str]]], float]):
    """Every sample of a rendered exposition, parsed by the reference client library.

    Keys are (name, labels). The parser adds ``_total`` to counters that lack it (our
    ``envoy_cluster_upstream_rq_xx``), so names are looked up without that suffix.
    """

    def __init__(self, text: str) -> None:
        super().__init__()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self[(s.name.removesuffix("_total"), frozenset(s.labels.items()))] = s.value

    def __getitem__(self, key: tuple[str, frozenset[tuple[str, str]]]) -> float:
        return super().__getitem__((key[0].removesuffix("_total"), key[1]))


def samples(text: str) -> Samples:
    return Samples(text)


def busy_store() -> StatsStore:
    store = StatsStore(PRODUCTPAGE, concurrency=2)
    cluster = store.cluster(REVIEWS)
    cluster.upstream_rq_total += 3
    cluster.upstream_cx_active += 2
    cluster.membership_total = 3
    cluster.membership_healthy = 2
    cluster.record_response_code(200)
    cluster.record_response_code(200)
    cluster.record_response_code(503)
    cluster.upstream_rq_time.record(7)
    http = store.http("outbound_0.0.0.0_9080")
    http.downstream_rq_total += 3
    http.delays_injected += 1
    http.active_faults += 1
    http.record_response_code(200)
    store.istio.record(
        finished(200, 12.0),
        reporter="source",
        destination_service="reviews.default.svc.cluster.local",
        destination_cluster="",
    )
    return store


# -- counting ----------------------------------------------------------------------------------


def test_stats_objects_are_slotted_plain_ints():
    stats = ClusterStats()
    assert not hasattr(stats, "__dict__")
    stats.upstream_rq_total += 1
    assert stats.upstream_rq_total == 1
    assert not hasattr(HttpStats(), "__dict__")


def test_record_response_code_charges_completed_class_and_code():
    stats = ClusterStats()
    for code in (200, 204, 302, 404, 503, 503, 101):
        stats.record_response_code(code)
    assert stats.upstream_rq_completed == 7
    assert (stats.upstream_rq_1xx, stats.upstream_rq_2xx, stats.upstream_rq_3xx) == (1, 2, 1)
    assert (stats.upstream_rq_4xx, stats.upstream_rq_5xx) == (1, 2)
    assert stats.upstream_rq_by_code == {200: 1, 204: 1, 302: 1, 404: 1, 503: 2, 101: 1}


def test_http_record_response_code_counts_no_class_for_code_zero():
    stats = HttpStats()
    stats.record_response_code(0)
    stats.record_response_code(504)
    assert stats.downstream_rq_completed == 2
    assert stats.downstream_rq_5xx == 1
    assert stats.downstream_rq_2xx + stats.downstream_rq_4xx == 0


def test_store_creates_scopes_once():
    store = StatsStore()
    assert store.cluster("a") is store.cluster("a")
    assert store.http("p") is store.http("p")
    assert store.cluster("a") is not store.cluster("b")


@given(st.lists(st.floats(min_value=0, max_value=5e6, allow_nan=False), max_size=50))
def test_histogram_buckets_follow_prometheus_le(values: list[float]):
    hist = Histogram()
    for v in values:
        hist.record(v)
    cumulative = 0
    for bound, n in zip(ENVOY_DEFAULT_BUCKETS, hist.counts, strict=False):
        cumulative += n
        assert cumulative == sum(1 for v in values if v <= bound)
    assert hist.count == len(values)
    assert hist.sum == pytest.approx(sum(values))


# -- Istio metrics -----------------------------------------------------------------------------


def labels_of(metrics: IstioMetrics) -> dict[str, str]:
    (item,) = metrics.snapshot()
    return dict(zip(ISTIO_LABELS, item["labels"], strict=True))


def test_source_reporter_labels_the_local_workload_as_source():
    metrics = IstioMetrics(PRODUCTPAGE)
    info = finished(503)
    info.add_flag(Flag.UPSTREAM_RETRY_LIMIT_EXCEEDED)
    info.add_flag(Flag.UPSTREAM_CONNECTION_FAILURE)
    metrics.record(
        info,
        reporter="source",
        destination_service="reviews.default.svc.cluster.local",
        destination_cluster="",
    )
    assert labels_of(metrics) == {
        "reporter": "source",
        "source_workload": "productpage-v1",
        "source_canonical_service": "productpage",
        "source_canonical_revision": "v1",
        "source_workload_namespace": "default",
        "source_principal": "unknown",  # plaintext: no authenticated principal
        "source_app": "productpage",
        "source_version": "v1",
        "source_cluster": "Kubernetes",
        "destination_workload": "unknown",
        "destination_workload_namespace": "unknown",
        "destination_principal": "unknown",
        "destination_app": "unknown",
        "destination_version": "unknown",
        "destination_service": "reviews.default.svc.cluster.local",
        "destination_canonical_service": "unknown",
        "destination_canonical_revision": "unknown",
        "destination_service_name": "reviews",
        "destination_service_namespace": "default",
        "destination_cluster": "unknown",
        "request_protocol": "http",
        "response_code": "503",
        "grpc_response_status": "",
        "response_flags": "URX,UF",
        "connection_security_policy": "unknown",
    }


def test_destination_reporter_labels_the_local_workload_as_destination():
    metrics = IstioMetrics(PRODUCTPAGE)
    metrics.record(
        finished(200),
        reporter="destination",
        destination_service="productpage.default.svc.cluster.local",
        destination_cluster="",
    )
    labels = labels_of(metrics)
    assert (
        labels["source_workload"] == labels["source_app"] == labels["source_cluster"] == "unknown"
    )
    assert labels["destination_workload"] == "productpage-v1"
    assert labels["destination_workload_namespace"] == "default"
    assert labels["destination_app"] == "productpage"
    assert labels["destination_version"] == "v1"
    assert labels["destination_cluster"] == "Kubernetes"
    assert labels["response_flags"] == "-"
    assert labels["connection_security_policy"] == "none"


def test_one_series_per_label_key_and_a_new_one_per_code_or_flags():
    metrics = IstioMetrics(PRODUCTPAGE)
    for code in (200, 200, 200, 503):
        metrics.record(finished(code), reporter="source", destination_service="r",
                       destination_cluster="")  # fmt: skip
    flagged = finished(503)
    flagged.add_flag(Flag.NO_HEALTHY_UPSTREAM)
    metrics.record(flagged, reporter="source", destination_service="r", destination_cluster="")
    counts = {(i["labels"][21], i["labels"][23]): i["requests"] for i in metrics.snapshot()}
    assert counts == {("200", "-"): 3, ("503", "-"): 1, ("503", "UH"): 1}


def test_histograms_record_duration_and_body_sizes():
    metrics = IstioMetrics(PRODUCTPAGE)
    metrics.record(finished(200, ms=30.0, sent=2000, received=10), reporter="source",
                   destination_service="r", destination_cluster="")  # fmt: skip
    (item,) = metrics.snapshot()
    assert item["duration"]["sum"] == pytest.approx(30.0)
    assert item["duration"]["counts"][ENVOY_DEFAULT_BUCKETS.index(50)] == 1
    assert item["request_bytes"]["counts"][ENVOY_DEFAULT_BUCKETS.index(10)] == 1
    assert item["response_bytes"]["counts"][ENVOY_DEFAULT_BUCKETS.index(2500)] == 1


def test_unknown_reporter_is_refused():
    with pytest.raises(ValueError, match="reporter"):
        IstioMetrics(PRODUCTPAGE).record(
            finished(), reporter="inbound", destination_service="r", destination_cluster=""
        )


@pytest.mark.parametrize(
    ("service", "expected"),
    [
        ("reviews.default.svc.cluster.local", ("reviews", "default")),
        ("reviews.bookinfo.svc.corp.example", ("reviews", "bookinfo")),
        ("reviews.default.svc.cluster.local:9080", ("reviews", "default")),
        ("httpbin.org", ("httpbin.org", "unknown")),
        ("", ("unknown", "unknown")),
    ],
)
def test_service_name_and_namespace_come_from_the_kubernetes_host(
    service: str, expected: tuple[str, str]
):
    assert service_name_namespace(service) == expected


def test_node_info_reads_istio_node_metadata():
    node = base_pb2.Node(
        id="sidecar~10.0.0.7~reviews-v2-abc.bookinfo~bookinfo.svc.cluster.local",
        cluster="reviews.bookinfo",
    )
    json_format.ParseDict(
        {
            "NAME": "reviews-v2-abc",
            "NAMESPACE": "bookinfo",
            "WORKLOAD_NAME": "reviews-v2",
            "CLUSTER_ID": "Kubernetes",
            "SERVICE_ACCOUNT": "bookinfo-reviews",
            "LABELS": {"app": "reviews", "version": "v2"},
        },
        node.metadata,
    )
    info = NodeInfo.from_node(node)
    assert info == NodeInfo(
        id=node.id,
        cluster="reviews.bookinfo",
        workload="reviews-v2",
        namespace="bookinfo",
        app="reviews",
        version="v2",
        canonical_service="reviews",
        canonical_revision="v2",
        principal="spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews",
        cluster_id="Kubernetes",
    )


def test_node_info_prefers_canonical_labels_and_falls_back_to_unknown():
    node = base_pb2.Node(id="sidecar~10.0.0.7~ratings-1.shop~shop.svc.cluster.local")
    json_format.ParseDict(
        {"LABELS": {"service.istio.io/canonical-name": "ratings-svc"}}, node.metadata
    )
    info = NodeInfo.from_node(node)
    assert info.namespace == "shop"  # from the node id
    assert info.canonical_service == "ratings-svc"
    assert info.canonical_revision == "latest"
    assert (info.workload, info.app, info.version, info.principal, info.cluster_id) == (
        "unknown",
    ) * 5


# -- snapshots and merging ---------------------------------------------------------------------


def test_snapshot_is_plain_data():
    snap = busy_store().snapshot()
    assert json.loads(json.dumps(snap)) == snap
    assert pickle.loads(pickle.dumps(snap)) == snap
    cluster = snap["clusters"][REVIEWS]
    assert cluster["counters"]["upstream_rq_total"] == 3
    assert cluster["counters"]["outlier_detection.ejections_enforced_total"] == 0
    assert cluster["codes"] == {"200": 2, "503": 1}
    assert snap["http"]["outbound_0.0.0.0_9080"]["counters"]["fault.delays_injected"] == 1


def test_merge_sums_counters_activity_gauges_and_histograms_and_maxes_state_gauges():
    one, two = busy_store().snapshot(), busy_store().snapshot()
    two = json.loads(json.dumps(two))  # as it arrives from another process
    merged = merge_snapshots([one, two])
    cluster = merged["clusters"][REVIEWS]
    assert cluster["counters"]["upstream_rq_total"] == 6
    assert cluster["codes"] == {"200": 4, "503": 2}
    assert cluster["gauges"]["upstream_cx_active"] == 4
    assert cluster["state_gauges"]["membership_total"] == 3  # every worker sees the same hosts
    assert cluster["histograms"]["upstream_rq_time"]["counts"][ENVOY_DEFAULT_BUCKETS.index(10)] == 2
    assert merged["server"]["state_gauges"]["concurrency"] == 2
    assert merged["server"]["state_gauges"]["live"] == 1
    (series,) = merged["istio"]
    assert series["requests"] == 2
    assert series["duration"]["sum"] == pytest.approx(24.0)
    assert one["clusters"][REVIEWS]["counters"]["upstream_rq_total"] == 3  # inputs untouched


def test_merge_of_nothing_renders_nothing():
    merged = merge_snapshots([])
    assert render_prometheus(merged) == ""
    assert render_text(merged) == ""
    assert merged["istio"] == []


def test_series_with_equal_labels_merge_in_one_worker():
    metrics = IstioMetrics(PRODUCTPAGE)
    # "" means the local cluster id for reporter=destination: both keys give equal labels.
    for cluster in ("", "Kubernetes"):
        metrics.record(finished(), reporter="destination", destination_service="r",
                       destination_cluster=cluster)  # fmt: skip
    (item,) = metrics.snapshot()
    assert item["requests"] == 2


# -- rendering ---------------------------------------------------------------------------------


def test_prometheus_output_parses_and_uses_envoy_names_and_tags():
    text = render_prometheus(merge_snapshots([busy_store().snapshot()]))
    got = samples(text)
    cluster = ("envoy_cluster_name", REVIEWS)
    prefix = ("envoy_http_conn_manager_prefix", "outbound_0.0.0.0_9080")
    assert got[("envoy_cluster_upstream_rq_total", frozenset([cluster]))] == 3
    assert got[("envoy_cluster_upstream_cx_active", frozenset([cluster]))] == 2
    xx2 = frozenset([cluster, ("envoy_response_code_class", "2")])
    assert got[("envoy_cluster_upstream_rq_xx", xx2)] == 2
    code503 = frozenset([cluster, ("envoy_response_code", "503")])
    assert got[("envoy_cluster_upstream_rq", code503)] == 1
    assert got[("envoy_cluster_outlier_detection_ejections_active", frozenset([cluster]))] == 0
    assert got[("envoy_http_downstream_rq_total", frozenset([prefix]))] == 3
    assert got[("envoy_http_fault_delays_injected", frozenset([prefix]))] == 1
    assert got[("envoy_http_fault_active_faults", frozenset([prefix]))] == 1
    assert got[("envoy_server_live", frozenset())] == 1
    assert "# TYPE envoy_cluster_upstream_rq_total counter" in text
    assert "# TYPE envoy_cluster_upstream_cx_active gauge" in text
    assert "# TYPE envoy_cluster_upstream_rq_time histogram" in text


def test_only_request_classes_become_the_response_code_class_tag():
    text = render_prometheus(busy_store().snapshot())
    assert "envoy_cluster_outlier_detection_ejections_enforced_consecutive_5xx{" in text
    assert "consecutive_xx" not in text


def test_istio_metrics_render_with_all_labels_and_cumulative_buckets():
    text = render_prometheus(busy_store().snapshot())
    got = samples(text)
    requests = [(k, v) for k, v in got.items() if k[0] == "istio_requests"]
    ((_, labels), value) = requests[0]
    assert len(requests) == 1 and value == 1
    assert dict(labels)["destination_service_name"] == "reviews"
    assert set(dict(labels)) == set(ISTIO_LABELS)
    buckets = {
        dict(k[1])["le"]: v for k, v in got.items() if k[0].startswith("istio_request_duration")
        and k[0].endswith("_bucket")
    }  # fmt: skip
    assert buckets["10"] == 0 and buckets["25"] == 1 and buckets["+Inf"] == 1
    assert 'le="0.5"' in text and 'le="3600000"' in text and 'le="+Inf"' in text
    assert "# TYPE istio_request_duration_milliseconds histogram" in text
    assert "# TYPE istio_requests_total counter" in text


def test_label_values_are_escaped():
    store = StatsStore()
    store.cluster('we\\ird "name"\nhere').upstream_rq_total += 1
    text = render_prometheus(store.snapshot())
    assert r'envoy_cluster_name="we\\ird \"name\"\nhere"' in text
    key = (
        "envoy_cluster_upstream_rq_total",
        frozenset([("envoy_cluster_name", 'we\\ird "name"\nhere')]),
    )
    assert samples(text)[key] == 1


def test_every_family_is_typed_once_and_names_are_valid():
    text = render_prometheus(merge_snapshots([busy_store().snapshot(), StatsStore().snapshot()]))
    typed = re.findall(r"^# TYPE (\S+) (counter|gauge|histogram)$", text, re.M)
    names = [n for n, _ in typed]
    assert len(names) == len(set(names))
    assert all(re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", n) for n in names)
    # every sample line belongs to the family typed most recently above it
    current = ""
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            current = line.split()[2]
        else:
            assert re.match(rf"{current}(_bucket|_sum|_count)?[{{ ]", line), line


def test_render_text_is_envoys_plain_stats_format():
    text = render_text(busy_store().snapshot())
    lines = text.splitlines()
    assert f"cluster.{REVIEWS}.upstream_rq_total: 3" in lines
    assert f"cluster.{REVIEWS}.upstream_rq_503: 1" in lines
    assert f"cluster.{REVIEWS}.upstream_rq_2xx: 2" in lines
    assert f"cluster.{REVIEWS}.outlier_detection.ejections_active: 0" in lines
    assert "http.outbound_0.0.0.0_9080.fault.delays_injected: 1" in lines
    assert "server.live: 1" in lines
    values = [line for line in lines if not re.search(r": (P0\(|No recorded values)", line)]
    assert values == sorted(values)
    assert f"cluster.{REVIEWS}.upstream_cx_connect_ms: No recorded values" in lines
    (rq_time,) = [line for line in lines if line.startswith(f"cluster.{REVIEWS}.upstream_rq_time:")]
    assert rq_time.split(": ", 1)[1].startswith("P0(nan,5) P25(nan,")
    assert rq_time.endswith("P100(nan,10)")


def test_uptime_is_refreshed_at_snapshot():
    store = StatsStore()
    store.server.started -= 42
    assert store.snapshot()["server"]["state_gauges"]["uptime"] >= 42
