"""The dashboard in a real browser (issue 6, "The dashboard"), on the Bookinfo demo mesh.

The mesh is started the way a user starts it (``meshlet up -d`` with the demo's manifests, every
request traced), a steady stream of ``/productpage`` loads runs through its ingress gateway,
and Chromium, driven by Playwright, reads the dashboard as a user does: the service graph with
every Bookinfo service carrying traffic (Kiali's graph: istio.io/latest/docs/tasks/
observability/kiali/), the golden metrics of a workload, a trace of a productpage request in a
waterfall (istio.io/latest/docs/tasks/observability/distributed-tracing/), the config with each
proxy's sync state (``istioctl proxy-status``), and finally, after ``meshlet down``, the banner
that says what to do.

Every wait is a Playwright wait on what the page shows (the dashboard polls its API), never a
fixed sleep. Screenshots go to the test's temporary directory and, when ``MESHLET_ARTIFACTS``
is set, there too.

Run: ``pytest tests/e2e/test_dashboard.py`` (needs /usr/bin/chromium and the ``playwright``
package; the browsers Playwright downloads itself are not used).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshlet.demo import MANIFESTS, manifest
from tests.e2e.conftest import Load, Mesh, start_mesh, wait_until
from tests.ports import free_port

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",  # the dashboard is on loopback; never ask an HTTP proxy
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(420),
]

BOOKINFO = ("productpage", "details", "reviews", "ratings")
#: How long the page may take to show something the mesh has already done: the embedded
#: scraper reads the proxies every 5 s and the graph polls every 3 s; the rest is slack for a
#: busy test machine, not an expectation.
SHOWN_WITHIN_MS = 90_000


@dataclass
class Dashboard:
    """The mesh under test, its dashboard's address and where screenshots go."""

    mesh: Mesh
    url: str
    screenshots: Path
    down: bool = False

    def save(self, page: playwright_api.Page, name: str) -> Path:
        path = self.screenshots / name
        page.screenshot(path=str(path), full_page=True)
        artifacts = os.environ.get("MESHLET_ARTIFACTS")
        if artifacts:
            Path(artifacts).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(artifacts) / name)
        return path

    @contextlib.contextmanager
    def shot_on_failure(self, page: playwright_api.Page, name: str) -> Iterator[None]:
        """A failing test leaves a screenshot of what the page showed instead."""
        try:
            yield
        except BaseException:
            with contextlib.suppress(Exception):
                self.save(page, f"FAILED-{name}")
            raise


def _served(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    port = free_port()
    files = [Path(str(manifest(name))) for name in MANIFESTS]
    mesh = start_mesh(
        tmp_path_factory.mktemp("dashboard"),
        *files,
        extra=(
            "--dashboard-port",
            str(port),
            "--otlp-port",
            str(free_port()),
            "--trace-sampling",
            "100",
        ),
    )
    running = Dashboard(mesh, f"http://127.0.0.1:{port}", tmp_path_factory.mktemp("screens"))
    try:
        recorded = json.loads((mesh.state_dir / "mesh.json").read_text()).get("dashboard")
        assert recorded is None or recorded.rstrip("/") == running.url, recorded
        wait_until("the dashboard's page", lambda: _served(running.url + "/"), timeout=30)
        yield running
    finally:
        if not running.down:
            mesh.down()


@pytest.fixture(scope="module")
def traffic(dashboard: Dashboard) -> Iterator[Load]:
    """Product page loads through the gateway for as long as the module's tests run."""
    with Load(dashboard.mesh.browser(), interval=0.05) as load:
        wait_until("a served product page", lambda: any(p.ok for p in load.pages), timeout=60)
        yield load


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[playwright_api.Page]:
    """One Chromium tab with a fresh profile, kept for the module (as a user keeps it open)."""
    assert CHROMIUM.exists(), (
        "Debian's chromium is not installed: scripts/test installs it as root "
        "(apt-get install chromium)"
    )
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path_factory.getbasetemp())
    with playwright_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1500, "height": 950},
        )
        try:
            tab = context.new_page()
            tab.set_default_timeout(SHOWN_WITHIN_MS)
            errors: list[str] = []
            tab.on("pageerror", lambda e: errors.append(str(e)))
            yield tab
            assert not errors, f"the page's scripts failed: {errors}"
        finally:
            context.close()


def _node(node_id: str) -> str:
    return f'g.node[data-node-id="{node_id}"]'


# -- the graph -------------------------------------------------------------------------------


def test_graph_shows_every_bookinfo_service_with_traffic(
    dashboard: Dashboard, traffic: Load, page: playwright_api.Page
) -> None:
    """Kiali's graph: each Bookinfo service, and a workload behind it, is a node with a
    non-zero request rate; the ingress gateway is the leftmost layer and calls run left to
    right; the graph refreshes in place, without reloading the page."""
    with dashboard.shot_on_failure(page, "dashboard-graph.png"):
        page.goto(dashboard.url + "/#/graph")
        services = [f"service:default/{name}" for name in BOOKINFO]
        workloads = ["workload:default/productpage-v1", "workload:default/details-v1"]
        workloads += ["workload:default/ratings-v1"]
        page.wait_for_function(
            """(ids) => ids.every((id) => {
                const el = document.querySelector(`g.node[data-node-id="${id}"]`);
                return el && parseFloat(el.dataset.rps) > 0;
            })""",
            arg=services + workloads,
            polling=500,
        )
        page.wait_for_function(
            """(sel) => [...document.querySelectorAll(sel)]
                .some((el) => parseFloat(el.dataset.rps) > 0)""",
            arg='g.node[data-node-id^="workload:default/reviews-v"]',
            polling=500,
        )
        gateway = page.locator('g.node[data-node-id*="ingressgateway"]')
        assert gateway.count() == 1

        def x(selector: str) -> float:
            box = page.locator(selector).first.bounding_box()
            assert box is not None, selector
            return box["x"] + box["width"] / 2

        chain = [
            'g.node[data-node-id*="ingressgateway"]',
            _node("service:default/productpage"),
            _node("workload:default/productpage-v1"),
            _node("service:default/reviews"),
            _node("service:default/ratings"),
        ]
        xs = [x(selector) for selector in chain]
        assert xs == sorted(xs) and len(set(xs)) == len(xs), dict(zip(chain, xs, strict=True))
        called = page.locator('g.edge[data-target="service:default/productpage"]')
        assert float(called.first.get_attribute("data-rps") or 0) > 0

        # Live: the next poll updates the same elements; the page is not reloaded.
        page.evaluate("window.__sameDocument = true")
        productpage = page.locator(_node("service:default/productpage")).element_handle()
        with page.expect_response(lambda r: "/api/graph" in r.url and r.status == 200):
            pass
        page.wait_for_function(
            "(el) => el.isConnected && window.__sameDocument === true", arg=productpage
        )
        dashboard.save(page, "dashboard-graph.png")


# -- services and workloads ------------------------------------------------------------------


def test_workload_row_opens_its_golden_metrics(
    dashboard: Dashboard, traffic: Load, page: playwright_api.Page
) -> None:
    """The Workloads table lists productpage-v1 with traffic; its row opens charts of the last
    15 minutes with a drawn inbound request-rate line."""
    with dashboard.shot_on_failure(page, "dashboard-metrics.png"):
        page.goto(dashboard.url + "/#/workloads")
        row = 'tr.row[data-row-id="workload:default/productpage-v1"]'
        page.wait_for_function(
            "(sel) => parseFloat(document.querySelector(sel)?.dataset.rps) > 0",
            arg=row,
            polling=500,
        )
        dashboard.save(page, "dashboard-workloads.png")
        page.locator(row).click()
        page.wait_for_url("**/#/workloads/default/productpage-v1")
        chart = 'figure.chart[data-chart="Inbound: requests/s"] g.series path'
        page.wait_for_function(
            "(sel) => /L/.test(document.querySelector(sel)?.getAttribute('d') ?? '')",
            arg=chart,
            polling=500,
        )
        assert page.locator('figure.chart[data-chart="Inbound: latency"]').count() == 1
        dashboard.save(page, "dashboard-metrics.png")


# -- traces ----------------------------------------------------------------------------------


def test_trace_of_a_productpage_request_shows_spans_of_four_services(
    dashboard: Dashboard, traffic: Load, page: playwright_api.Page
) -> None:
    """Searching for productpage's traces (service.name "productpage.default", Istio's
    APP_LABEL_AND_NAMESPACE) lists traces; one opens as a waterfall whose spans come from at
    least four services, productpage's nested under the gateway's; a span's attributes open
    on click."""
    with dashboard.shot_on_failure(page, "dashboard-trace.png"):
        page.goto(dashboard.url + "/#/traces")
        page.locator('#trace-search input[name="service"]').fill("productpage.default")
        page.locator("#trace-search button[type=submit]").click()
        page.wait_for_url("**/#/traces?service=productpage.default*")
        wide = "tr.trace-row[data-trace-id]"
        page.wait_for_function(
            """(sel) => [...document.querySelectorAll(sel)]
                .some((row) => Number(row.dataset.serviceCount) >= 4)""",
            arg=wide,
            polling=500,
        )
        trace_id = page.locator(wide).evaluate_all(
            "rows => rows.find((r) => Number(r.dataset.serviceCount) >= 4).dataset.traceId"
        )
        # By id: the list refreshes itself, so a row's position may change under the pointer.
        page.locator(f'tr.trace-row[data-trace-id="{trace_id}"] a').first.click()
        page.wait_for_url(f"**/#/traces/{trace_id}")
        page.locator(".span-row[data-service]").first.wait_for()

        spans = page.locator(".span-row[data-service]").evaluate_all(
            "rows => rows.map(r => ({service: r.dataset.service, depth: Number(r.dataset.depth)}))"
        )
        services = {s["service"] for s in spans}
        assert len(services) >= 4, services
        assert "productpage.default" in services, services
        root = spans[0]
        assert root["depth"] == 0 and "ingressgateway" in root["service"], spans
        assert all(s["depth"] >= 1 for s in spans if s["service"] == "productpage.default"), spans

        first_productpage = page.locator('.span-row[data-service="productpage.default"]').first
        first_productpage.click()
        attrs = page.locator(".span-attrs:not([hidden])")
        attrs.wait_for()
        assert "http.status_code" in attrs.inner_text()
        dashboard.save(page, "dashboard-trace.png")


# -- config ----------------------------------------------------------------------------------


def test_config_lists_the_demo_resources_and_synced_proxies(
    dashboard: Dashboard, page: playwright_api.Page
) -> None:
    """The Config page lists the demo's VirtualService under its namespace, and every proxy
    (seven: the gateway and six Bookinfo pods) has acknowledged what it was sent."""
    with dashboard.shot_on_failure(page, "dashboard-config.png"):
        page.goto(dashboard.url + "/#/config")
        page.locator(
            'section.namespace[data-namespace="default"] '
            'tr.resource[data-resource="VirtualService default/bookinfo"]'
        ).wait_for()
        page.wait_for_function(
            """() => {
                const rows = [...document.querySelectorAll('tr.proxy')];
                return rows.length >= 7 && rows.every((r) => r.dataset.synced === 'true');
            }""",
            polling=500,
        )
        dashboard.save(page, "dashboard-config.png")


# -- the mesh goes away (last: it stops the module's mesh) ------------------------------------


def test_banner_says_what_to_do_when_the_mesh_is_down(
    dashboard: Dashboard, traffic: Load, page: playwright_api.Page
) -> None:
    """With the graph open, ``meshlet down``: the page keeps polling and shows a banner that
    names the command that brings the mesh back."""
    with dashboard.shot_on_failure(page, "dashboard-down.png"):
        page.goto(dashboard.url + "/#/graph")
        page.locator(_node("service:default/productpage")).wait_for()
        assert page.locator("#banner").is_hidden()
        # Stop the page loads before the gateway goes (the fixture's own exit is a no-op then).
        traffic.__exit__(None, None, None)
        dashboard.down = True
        dashboard.mesh.down()
        banner = page.locator("#banner")
        banner.wait_for(state="visible")
        assert "meshlet up" in banner.inner_text()
        dashboard.save(page, "dashboard-down.png")
