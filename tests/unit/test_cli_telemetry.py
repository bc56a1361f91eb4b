"""``meshlet stat``/``top``'s pure parts: the window, the PromQL sent to Prometheus, the rows made
of its answers, the human numbers, the table, the ``top`` screen and the Prometheus config.

PromQL follows Istio's Grafana dashboards (istio/istio manifests/addons/dashboards): inbound
traffic from the server side (``reporter="destination"``), success = non-5xx over all
(``response_code!~"5.*"`` there), latency quantiles with ``histogram_quantile`` over
``istio_request_duration_milliseconds_bucket`` summed ``by (le)``. Columns follow
``linkerd viz stat`` (NAME, SUCCESS, RPS, LATENCY_P50, LATENCY_P99).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshlet.cli.telemetry import (
    RunningMesh,
    StatRow,
    find_mesh,
    fit_screen,
    format_ms,
    format_percent,
    format_rps,
    parse_window,
    prometheus_config,
    promql_queries,
    promql_string,
    rows_from_prometheus,
    sort_rows,
    stat_table,
    top_screen,
    window_text,
)
from meshlet.errors import MeshletError
from tests.ports import free_port

# -- window ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1m", 60), ("30s", 30), ("90", 90), ("1h", 3600), ("2.5m", 150), (" 5m ", 300)],
)
def test_window_accepts_prometheus_style_durations(text: str, seconds: int) -> None:
    assert parse_window(text) == seconds


@pytest.mark.parametrize("text", ["0s", "500ms", "abc", "-1m", "1w", ""])
def test_window_refuses_what_is_not_a_duration_of_a_second_or_more(text: str) -> None:
    with pytest.raises(MeshletError, match=r"--window .* \(e\.g\. 30s, 1m"):
        parse_window(text)


@pytest.mark.parametrize(("seconds", "text"), [(60, "1m"), (90, "90s"), (3600, "1h"), (300, "5m")])
def test_window_is_shown_in_its_largest_whole_unit(seconds: int, text: str) -> None:
    assert window_text(seconds) == text


# -- human numbers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rps", "text"),
    [(0.0, "0rps"), (0.25, "0.25rps"), (2.034, "2.03rps"), (12.54, "12.5rps"), (1234.4, "1234rps")],
)
def test_rps_has_two_decimals_when_small_and_fewer_when_large(rps: float, text: str) -> None:
    assert format_rps(rps) == text


def test_success_is_a_percentage_with_two_decimals_and_a_dash_without_requests() -> None:
    assert format_percent(1.0) == "100.00%"
    assert format_percent(0.975) == "97.50%"
    assert format_percent(0.0) == "0.00%"
    assert format_percent(None) == "-"


def test_latency_is_in_milliseconds_with_a_decimal_below_ten() -> None:
    assert format_ms(0.84) == "0.8ms"
    assert format_ms(12.4) == "12ms"
    assert format_ms(1250.0) == "1250ms"
    assert format_ms(None) == "-"


# -- rows and the table ----------------------------------------------------------------------

REVIEWS = StatRow(
    namespace="default",
    name="reviews-v2",
    app="reviews",
    version="v2",
    rps=4.5,
    success_rate=0.9,
    p50_ms=3.2,
    p90_ms=8.0,
    p99_ms=25.0,
    requests=270,
    mtls_ratio=1.0,
)
GATEWAY = StatRow(namespace="istio-system", name="istio-ingressgateway", outbound_rps=2.0)
DETAILS = StatRow(
    namespace="default", name="details-v1", rps=2.0, success_rate=1.0, p50_ms=1.0, p99_ms=4.0
)


def test_rows_come_busiest_first_and_senders_only_after_receivers() -> None:
    assert sort_rows([GATEWAY, DETAILS, REVIEWS]) == [REVIEWS, DETAILS, GATEWAY]


def test_a_dashboard_api_row_becomes_a_stat_row_with_nulls_kept_as_none() -> None:
    row = StatRow.from_api(
        {
            "namespace": "default",
            "name": "ratings-v1",
            "app": "ratings",
            "version": "v1",
            "rps": 0,
            "success_rate": None,
            "p50_ms": None,
            "p90_ms": None,
            "p99_ms": None,
            "requests": 0,
            "outbound_rps": 0.5,
            "mtls_ratio": None,
        }
    )
    assert row == StatRow(
        namespace="default", name="ratings-v1", app="ratings", version="v1", outbound_rps=0.5
    )
    assert StatRow.from_api(row.to_dict()) == row


def test_the_table_has_linkerd_stat_columns() -> None:
    lines = stat_table([REVIEWS, GATEWAY], kind="workload").splitlines()
    assert lines[0].split() == ["NAME", "SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P99"]
    assert lines[1].split() == ["reviews-v2", "90.00%", "4.50rps", "3.2ms", "25ms"]
    assert lines[2].split() == ["istio-ingressgateway", "-", "0rps", "-", "-"]


def test_all_namespaces_adds_the_namespace_column_first() -> None:
    lines = stat_table([DETAILS], kind="workload", all_namespaces=True).splitlines()
    assert lines[0].split()[:2] == ["NAMESPACE", "NAME"]
    assert lines[1].split()[:2] == ["default", "details-v1"]


def test_wide_adds_app_version_p90_requests_outbound_and_mtls() -> None:
    lines = stat_table([REVIEWS], kind="workload", wide=True).splitlines()
    assert lines[0].split() == [
        "NAME",
        "APP",
        "VERSION",
        "SUCCESS",
        "RPS",
        "LATENCY_P50",
        "LATENCY_P90",
        "LATENCY_P99",
        "REQUESTS",
        "OUTBOUND_RPS",
        "MTLS",
    ]
    assert lines[1].split() == [
        "reviews-v2",
        "reviews",
        "v2",
        "90.00%",
        "4.50rps",
        "3.2ms",
        "8.0ms",
        "25ms",
        "270",
        "0rps",
        "100.00%",
    ]
    services = stat_table([REVIEWS], kind="service", wide=True).splitlines()
    assert "APP" not in services[0].split()


def test_top_screen_names_what_the_window_and_the_source() -> None:
    screen = top_screen(
        [REVIEWS],
        kind="workload",
        namespace=None,
        window_s=60,
        source="embedded metrics via http://127.0.0.1:20001",
        clock="05:00:00",
    )
    title = screen.splitlines()[0]
    assert "workloads in all namespaces" in title
    assert "last 1m" in title
    assert "embedded metrics via http://127.0.0.1:20001" in title
    assert "reviews-v2" in screen and "NAMESPACE" in screen
    assert screen.splitlines()[-1] == "Ctrl-C to quit"


def test_top_screen_says_when_there_is_no_traffic_or_the_source_failed() -> None:
    common: dict[str, Any] = {"kind": "service", "namespace": "default", "window_s": 30}
    quiet = top_screen([], source="s", clock="c", **common)
    assert "no traffic to services in namespace default in the last 30s" in quiet
    failed = top_screen(None, source="s", clock="c", error="cannot reach it", **common)
    assert "error: cannot reach it" in failed


def test_top_screen_is_cut_to_the_terminal_and_keeps_the_quit_hint() -> None:
    lines = ["title", "", "HEADER", *(f"row{i}" for i in range(20)), "", "Ctrl-C to quit"]
    assert fit_screen(lines, 100) == lines
    cut = fit_screen(lines, 10)
    assert len(cut) == 10
    assert cut[:8] == lines[:8]
    assert cut[8] == "... 16 more lines (narrow with -n)"
    assert cut[9] == "Ctrl-C to quit"


# -- PromQL ----------------------------------------------------------------------------------


def test_workload_queries_read_the_server_side_by_destination_workload() -> None:
    q = promql_queries("workload", "default", 60)
    match = 'reporter="destination",destination_workload_namespace="default"'
    by = "destination_workload_namespace, destination_workload"
    assert q["rps"] == (
        f"sum by ({by}, destination_app, destination_version)"
        f" (rate(istio_requests_total{{{match}}}[60s]))"
    )
    assert q["ok_rps"] == (
        f'sum by ({by}) (rate(istio_requests_total{{{match},response_code!~"5.."}}[60s]))'
    )
    assert q["mtls_rps"] == (
        f"(sum by ({by}) (rate(istio_requests_total"
        f'{{{match},connection_security_policy="mutual_tls"}}[60s])))'
        f" or (0 * sum by ({by}) (rate(istio_requests_total{{{match}}}[60s])))"
    )
    assert q["requests"] == f"sum by ({by}) (increase(istio_requests_total{{{match}}}[60s]))"
    assert q["p50_ms"] == (
        f"histogram_quantile(0.5, sum by ({by}, le)"
        f" (rate(istio_request_duration_milliseconds_bucket{{{match}}}[60s])))"
    )
    assert q["p99_ms"].startswith("histogram_quantile(0.99, ")
    assert q["outbound_rps"] == (
        "sum by (source_workload_namespace, source_workload) (rate(istio_requests_total"
        '{reporter="source",source_workload_namespace="default"}[60s]))'
    )


def test_service_queries_take_the_destinations_report_else_the_clients() -> None:
    """Per service: the destination's report where one names the service, else the source's
    (a destination without a sidecar); the same choice in every query, so ratios stay within
    one report. mTLS only from destinations: sources report connection_security_policy
    "unknown" (istio.io/latest/docs/reference/config/metrics/#labels)."""
    q = promql_queries("service", None, 300)
    by = "destination_service_namespace, destination_service_name"
    dest = 'reporter="destination",destination_service_name!="unknown"'
    src = 'reporter="source",destination_service_name!="unknown"'

    def total(match: str) -> str:
        return f"sum by ({by}) (rate(istio_requests_total{{{match}}}[300s]))"

    assert q["rps"] == f"({total(dest)}) or (({total(src)}) unless on ({by}) ({total(dest)}))"
    assert q["ok_rps"].count(" unless on (") == 1
    assert q["p50_ms"].startswith(
        f"histogram_quantile(0.5, (sum by ({by}, le) "
        f"(rate(istio_request_duration_milliseconds_bucket{{{dest}}}[300s])))"
    )
    assert 'reporter="source"' not in q["mtls_rps"]
    assert "outbound_rps" not in q
    assert all("[300s]" in query for query in q.values())


def test_a_namespace_is_quoted_as_a_promql_string() -> None:
    q = promql_queries("workload", 'a"b\\c', 60)
    assert 'destination_workload_namespace="a\\"b\\\\c"' in q["rps"]


@given(st.text())
def test_promql_strings_decode_back_to_the_value(value: str) -> None:
    # PromQL's double-quoted strings use Go's escapes, a superset of JSON's for these.
    assert json.loads(promql_string(value), strict=False) == value


def _sample(value: str, **labels: str) -> dict[str, Any]:
    return {"metric": labels, "value": [1700000000.0, value]}


def _dest(name: str, **extra: str) -> dict[str, str]:
    return {"destination_workload_namespace": "default", "destination_workload": name, **extra}


def test_prometheus_answers_become_rows_with_success_mtls_and_latency() -> None:
    rows = rows_from_prometheus(
        "workload",
        {
            "rps": [
                _sample("3", **_dest("reviews-v2", destination_app="reviews")),
                _sample("1", **_dest("reviews-v2", destination_version="v2")),
                _sample("2", **_dest("details-v1")),
            ],
            "ok_rps": [_sample("3.6", **_dest("reviews-v2")), _sample("2", **_dest("details-v1"))],
            "mtls_rps": [_sample("2", **_dest("reviews-v2"))],
            "requests": [
                _sample("240", **_dest("reviews-v2")),
                _sample("120", **_dest("details-v1")),
            ],
            "p50_ms": [_sample("3", **_dest("reviews-v2")), _sample("1.5", **_dest("details-v1"))],
            "p90_ms": [_sample("4.5", **_dest("reviews-v2"))],
            "p99_ms": [_sample("+Inf", **_dest("reviews-v2"))],
            "outbound_rps": [
                _sample("1", source_workload_namespace="default", source_workload="reviews-v2")
            ],
        },
    )
    assert [r.name for r in rows] == ["reviews-v2", "details-v1"]
    reviews = rows[0]
    assert reviews.app == "reviews" and reviews.version == "v2"
    assert reviews.rps == 4.0  # both app/version series of the workload, summed
    assert reviews.success_rate == pytest.approx(0.9)
    assert reviews.mtls_ratio == pytest.approx(0.5)
    assert reviews.requests == 240
    assert (reviews.p50_ms, reviews.p90_ms, reviews.p99_ms) == (3.0, 4.5, None)
    assert reviews.outbound_rps == 1.0
    assert rows[1].success_rate == 1.0
    assert rows[1].mtls_ratio is None  # no destination report said whether it was mTLS


def test_a_sender_only_workload_is_listed_without_success_or_latency() -> None:
    """A gateway only sends: linkerd and the dashboard API list it with rps 0 and its
    outbound rps."""
    rows = rows_from_prometheus(
        "workload",
        {
            "rps": [],
            "p50_ms": [_sample("NaN", **_dest("idle-v1"))],
            "outbound_rps": [
                _sample(
                    "2.5",
                    source_workload_namespace="istio-system",
                    source_workload="istio-ingressgateway",
                )
            ],
        },
    )
    gateway = next(r for r in rows if r.name == "istio-ingressgateway")
    assert gateway == StatRow(
        namespace="istio-system", name="istio-ingressgateway", outbound_rps=2.5
    )
    idle = next(r for r in rows if r.name == "idle-v1")
    assert idle.success_rate is None and idle.p50_ms is None


def test_service_rows_are_named_by_destination_service_name() -> None:
    rows = rows_from_prometheus(
        "service",
        {
            "rps": [
                _sample(
                    "1.5",
                    destination_service_namespace="default",
                    destination_service_name="ratings",
                )
            ]
        },
    )
    assert [(r.namespace, r.name, r.rps) for r in rows] == [("default", "ratings", 1.5)]


# -- the running mesh and the Prometheus config ------------------------------------------------


def test_the_mesh_is_found_through_the_state_dirs_mesh_json(tmp_path: Path) -> None:
    (tmp_path / "mesh.json").write_text(
        json.dumps({"pid": 1, "api": "http://127.0.0.1:15014", "dashboard": "http://d:1/"})
    )
    assert find_mesh(tmp_path, None) == RunningMesh(state_dir=tmp_path, dashboard="http://d:1")


def test_no_mesh_json_says_how_to_start_a_mesh(tmp_path: Path) -> None:
    with pytest.raises(MeshletError) as e:
        find_mesh(tmp_path / "nothing", None)
    assert str(e.value).startswith(f"no mesh running in {tmp_path / 'nothing'} — start one")
    assert "`meshlet up" in str(e.value)


def test_without_state_dir_and_no_control_plane_the_default_state_dir_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(MeshletError, match=r"^no mesh running in \.meshlet — start one with"):
        find_mesh(None, dead)


def test_a_mesh_without_dashboard_says_to_restart_it_with_one(tmp_path: Path) -> None:
    (tmp_path / "mesh.json").write_text(json.dumps({"pid": os.getpid(), "api": "http://a:1"}))
    with pytest.raises(MeshletError, match=r"serves no dashboard.*--dashboard-port"):
        find_mesh(tmp_path, None)


MESH = RunningMesh(state_dir=Path(".meshlet"), dashboard="http://127.0.0.1:20001")


def test_the_prometheus_config_follows_pods_through_http_service_discovery() -> None:
    config = prometheus_config(MESH)
    assert config["global"]["scrape_interval"] == "5s"
    (job,) = config["scrape_configs"]
    assert job == {
        "job_name": "envoy-stats",
        "metrics_path": "/stats/prometheus",
        "scrape_interval": "5s",
        "http_sd_configs": [
            {"url": "http://127.0.0.1:20001/api/prometheus-targets", "refresh_interval": "5s"}
        ],
    }


def test_the_static_prometheus_config_lists_the_targets_with_their_labels() -> None:
    targets = [
        {
            "targets": ["127.1.0.5:15090"],
            "labels": {"namespace": "default", "pod": "reviews-v1-abc", "workload": "reviews-v1"},
        }
    ]
    (job,) = prometheus_config(MESH, targets)["scrape_configs"]
    assert "http_sd_configs" not in job
    assert job["static_configs"] == targets
