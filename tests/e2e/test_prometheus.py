"""A real Prometheus scraping the demo mesh, end to end: Bookinfo started with ``meshlet up -d``
(its own API, xDS, gateway, dashboard and OTLP ports), traffic through the ingress gateway,
Prometheus (Debian's package) configured by ``meshlet prometheus-config`` alone, then
``meshlet stat`` from that Prometheus and from the mesh's own dashboard.

What is checked is what Istio documents for its standard metrics
(istio.io/latest/docs/reference/config/metrics/): every workload that serves requests reports
``istio_requests_total`` with ``reporter="destination"`` and its own ``destination_workload``,
so that the PromQL of Istio's "Querying Metrics from Prometheus" task
(istio.io/latest/docs/tasks/observability/metrics/querying-metrics/) finds each of
Bookinfo's six workloads. Prometheus follows the mesh's pods through the dashboard's HTTP
service discovery (``http_sd_configs``), scraping every proxy at ``<pod IP>:15090/stats/
prometheus``; a 1m rate needs two scrapes, so the test polls until the rates appear.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshlet.demo import MANIFESTS, manifest
from tests.e2e.conftest import Load, Mesh, start_mesh, wait_until
from tests.ports import free_port
from tests.prometheus import prometheus_binary, running_prometheus

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

BOOKINFO = {"productpage-v1", "details-v1", "reviews-v1", "reviews-v2", "reviews-v3", "ratings-v1"}
BY_WORKLOAD = (
    'sum by (destination_workload) (rate(istio_requests_total{reporter="destination"}[1m]))'
)


@pytest.fixture(scope="module")
def dashboard_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, dashboard_port: int) -> Iterator[Mesh]:
    prometheus_binary()  # fail at once, naming the package, rather than after the mesh starts
    running = start_mesh(
        tmp_path_factory.mktemp("prometheus"),
        *(Path(str(manifest(name))) for name in MANIFESTS),
        extra=("--dashboard-port", str(dashboard_port)),  # a port the test knows
    )
    try:
        yield running
    finally:
        running.down()


def _workload_rates(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {r["metric"].get("destination_workload", ""): float(r["value"][1]) for r in rows}


def _serving(mesh: Mesh, *args: str) -> dict[str, dict[str, Any]] | None:
    """``meshlet stat -A -o json ...``'s rows by workload, once every Bookinfo workload in it
    serves requests (rps > 0); else None."""
    data = json.loads(mesh.meshlet("stat", "-A", "-o", "json", *args).stdout)
    rows = {row["name"]: row for row in data["rows"]}
    serving = {name for name, row in rows.items() if row["rps"] > 0}
    return rows if serving >= BOOKINFO else None


def test_prometheus_scrapes_every_bookinfo_workload_and_stat_lists_them(
    mesh: Mesh, dashboard_port: int, tmp_path: Path
) -> None:
    dashboard = mesh.meshlet("dashboard").stdout.strip()
    assert dashboard == f"http://127.0.0.1:{dashboard_port}/"

    config_text = mesh.meshlet("prometheus-config").stdout
    (job,) = yaml.safe_load(config_text)["scrape_configs"]
    assert job["http_sd_configs"][0]["url"] == f"{dashboard}api/prometheus-targets"

    with (
        Load(mesh.browser(), interval=0.05) as load,
        running_prometheus(tmp_path / "prometheus", config_text) as prometheus,
    ):
        # Every pod's sidecar (and the gateway) is a target, up, at port 15090.
        def targets_up() -> list[dict[str, Any]] | None:
            targets = prometheus.targets()
            workloads = {t["labels"].get("workload") for t in targets if t["health"] == "up"}
            return targets if workloads >= BOOKINFO else None

        targets = wait_until("Prometheus to scrape every Bookinfo sidecar", targets_up, 120)
        assert all(t["scrapeUrl"].endswith(":15090/stats/prometheus") for t in targets), targets

        def every_workload_rated() -> dict[str, float] | None:
            rates = _workload_rates(prometheus.query(BY_WORKLOAD))
            return rates if all(rates.get(w, 0) > 0 for w in BOOKINFO) else None

        wait_until(f"{BY_WORKLOAD} to list every Bookinfo workload", every_workload_rated, 120)

        from_prometheus = wait_until(
            "`meshlet stat --prometheus` to list every Bookinfo workload",
            lambda: _serving(mesh, "--prometheus", prometheus.url),
            60,
        )
        embedded = wait_until(
            "`meshlet stat` (the mesh's own metrics) to list every Bookinfo workload",
            lambda: _serving(mesh),
            60,
        )
        for rows in (from_prometheus, embedded):
            for name in BOOKINFO:
                assert rows[name]["namespace"] == "default", rows[name]
                assert rows[name]["success_rate"] is not None, rows[name]
                assert rows[name]["p50_ms"] is not None, rows[name]

        table = mesh.meshlet("stat", "--prometheus", prometheus.url).stdout
        assert {line.split()[0] for line in table.splitlines()[1:]} >= BOOKINFO, table

        top = mesh.meshlet("top", "--iterations", "1", "--prometheus", prometheus.url).stdout
        assert f"source: prometheus {prometheus.url}" in top.splitlines()[0], top
        assert all(name in top for name in BOOKINFO), top
    assert not load.failures, load.failures[:5]


def test_prometheus_follows_pods_that_come_and_go(mesh: Mesh, tmp_path: Path) -> None:
    """`prometheus-config`'s job discovers targets through the dashboard (http_sd_configs,
    refreshed every 5 s): a pod added by `meshlet scale` is scraped, a removed one is dropped."""
    config_text = mesh.meshlet("prometheus-config").stdout
    with running_prometheus(tmp_path / "prometheus", config_text) as prometheus:

        def scraped_pods(workload: str) -> set[str]:
            return {
                t["labels"]["pod"]
                for t in prometheus.targets()
                if t["labels"].get("workload") == workload and t["health"] == "up"
            }

        (before,) = wait_until("reviews-v1 scraped", lambda: scraped_pods("reviews-v1"), 60)
        mesh.meshlet("scale", "deployment/reviews-v1", "--replicas", "2")
        pods = wait_until("two ready reviews-v1 pods", lambda: mesh.ready_pods("reviews-v1", 2), 60)
        names = {p["metadata"]["name"] for p in pods}
        wait_until("both reviews-v1 pods scraped", lambda: scraped_pods("reviews-v1") == names, 60)

        mesh.meshlet("scale", "deployment/reviews-v1", "--replicas", "1")
        (left,) = wait_until("one reviews-v1 pod", lambda: mesh.ready_pods("reviews-v1", 1), 60)
        remaining = {left["metadata"]["name"]}
        wait_until("the removed pod dropped", lambda: scraped_pods("reviews-v1") == remaining, 60)
        assert before in names
