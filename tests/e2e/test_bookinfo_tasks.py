"""Istio's Bookinfo traffic-management tasks, end to end: one mesh started with ``meshlet up -d``
from Istio's own, unchanged sample files, driven with ``meshlet`` commands, observed through
the ingress gateway as a user's browser sees the page.

Each test cites the istio.io task whose outcome it checks. Tests share the module's mesh; each
one's VirtualServices are deleted (``meshlet delete -f``) after it, so every test starts from
Bookinfo with its gateway and destination rules only.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import (
    Load,
    Mesh,
    Page,
    condition,
    container_pid,
    container_status,
    start_mesh,
    wait_until,
)
from tests.samples import SAMPLES

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(180),
    pytest.mark.skipif(SAMPLES is None, reason="Istio's sample files are not present"),
]

BOOKINFO = (SAMPLES or Path("/nonexistent")) / "bookinfo"
NETWORKING = BOOKINFO / "networking"
ALL_V1 = NETWORKING / "virtual-service-all-v1.yaml"
REVIEWS_TEST_V2 = NETWORKING / "virtual-service-reviews-test-v2.yaml"
REVIEWS_50_V3 = NETWORKING / "virtual-service-reviews-50-v3.yaml"
REVIEWS_V3 = NETWORKING / "virtual-service-reviews-v3.yaml"
RATINGS_DELAY = NETWORKING / "virtual-service-ratings-test-delay.yaml"
RATINGS_ABORT = NETWORKING / "virtual-service-ratings-test-abort.yaml"

PRODUCTPAGE_TIMEOUT = 3.0  # productpage's own timeout on its reviews call (BOOKINFO.md)
PRODUCTPAGE_ATTEMPTS = 2


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    running = start_mesh(
        tmp_path_factory.mktemp("bookinfo"),
        BOOKINFO / "platform" / "kube" / "bookinfo.yaml",
        NETWORKING / "bookinfo-gateway.yaml",
        NETWORKING / "destination-rule-all.yaml",
    )
    try:
        yield running
    finally:
        running.down()


@pytest.fixture(autouse=True)
def fresh_routes(mesh: Mesh) -> Iterator[None]:
    yield
    mesh.reset()


def loads(mesh: Mesh, n: int, *, user: str | None = None) -> list[Page]:
    browser = mesh.browser()
    if user is not None:
        browser.login(user)
    pages = [browser.get() for _ in range(n)]
    failed = [p for p in pages if not p.ok]
    assert not failed, failed[:3]
    return pages


# -- request routing -------------------------------------------------------------------------


def test_all_v1_routes_every_request_to_reviews_v1(mesh: Mesh) -> None:
    """istio.io/latest/docs/tasks/traffic-management/request-routing/ ("Route to version 1"):
    with virtual-service-all-v1.yaml the page never shows stars, however often it is loaded."""
    mesh.apply(ALL_V1)
    pages = loads(mesh, 30)
    assert Counter(p.reviews_version for p in pages) == {"v1": 30}
    assert all(not p.star_colors for p in pages)


def test_jason_sees_v2_and_everyone_else_v1(mesh: Mesh) -> None:
    """istio.io/latest/docs/tasks/traffic-management/request-routing/ ("Route based on user
    identity"): after virtual-service-reviews-test-v2.yaml, jason, signed in, sees black
    stars (reviews v2) on every load; an anonymous user still sees v1."""
    mesh.apply(ALL_V1, REVIEWS_TEST_V2)
    jason = loads(mesh, 15, user="jason")
    assert Counter(p.reviews_version for p in jason) == {"v2": 15}
    assert all(p.star_colors == {"black"} for p in jason)
    anonymous = loads(mesh, 15)
    assert Counter(p.reviews_version for p in anonymous) == {"v1": 15}
    assert all(not p.star_colors for p in anonymous)


# -- traffic shifting ------------------------------------------------------------------------


def test_fifty_fifty_split_between_v1_and_v3(mesh: Mesh) -> None:
    """istio.io/latest/docs/tasks/traffic-management/traffic-shifting/: with
    virtual-service-reviews-50-v3.yaml about half the loads show red stars (v3), the rest
    none (v1). The bound is 6 standard deviations of a fair coin over n loads."""
    mesh.apply(ALL_V1, REVIEWS_50_V3)
    n = 240
    versions = Counter(p.reviews_version for p in loads(mesh, n))
    assert set(versions) <= {"v1", "v3"}, versions
    sigma = (n * 0.5 * 0.5) ** 0.5
    assert abs(versions["v3"] - n / 2) <= 6 * sigma, versions


def test_all_traffic_shifted_to_v3(mesh: Mesh) -> None:
    """istio.io/latest/docs/tasks/traffic-management/traffic-shifting/: after
    virtual-service-reviews-v3.yaml every load shows red stars (reviews v3)."""
    mesh.apply(ALL_V1, REVIEWS_50_V3, REVIEWS_V3)
    pages = loads(mesh, 30)
    assert Counter(p.reviews_version for p in pages) == {"v3": 30}
    assert all(p.star_colors == {"red"} for p in pages)


# -- fault injection -------------------------------------------------------------------------


def test_delay_for_jason_shows_the_reviews_error(mesh: Mesh) -> None:
    """istio.io/latest/docs/tasks/traffic-management/fault-injection/ ("Injecting an HTTP delay
    fault"): ratings is delayed 7 s for jason; productpage gives up on reviews after two 3 s
    attempts, so jason's page shows "Sorry, product reviews are currently unavailable for
    this book." (the bug the task uncovers). Anonymous users are not delayed."""
    mesh.apply(ALL_V1, REVIEWS_TEST_V2, RATINGS_DELAY)
    jason = mesh.browser()
    jason.login("jason")
    page = jason.get()
    assert page.status == 200 and page.reviews_unavailable, page
    # Semantics, not speed: the error can only come once both attempts have timed out.
    assert page.seconds >= PRODUCTPAGE_ATTEMPTS * PRODUCTPAGE_TIMEOUT * 0.95, page.seconds
    anonymous = loads(mesh, 5)
    assert all(p.reviews_version == "v1" for p in anonymous)


def test_abort_for_jason_shows_ratings_unavailable(mesh: Mesh) -> None:
    """istio.io/latest/docs/tasks/traffic-management/fault-injection/ ("Injecting an HTTP abort
    fault"): ratings answers 500 for jason, whose page (reviews v2) says "Ratings service is
    currently unavailable"; anonymous users see reviews v1, without that message."""
    mesh.apply(ALL_V1, REVIEWS_TEST_V2, RATINGS_ABORT)
    jason = loads(mesh, 5, user="jason")
    assert all(p.reviews_version == "v2" and p.ratings_unavailable for p in jason), jason
    assert all(not p.star_colors for p in jason)
    anonymous = loads(mesh, 5)
    assert all(p.reviews_version == "v1" and not p.ratings_unavailable for p in anonymous)


# -- the runtime under traffic ---------------------------------------------------------------


def test_rollout_restart_replaces_the_pod_without_failed_requests(mesh: Mesh) -> None:
    """istio.io/latest/docs/tasks/traffic-management/request-routing/ routes everything to v1;
    `meshlet rollout restart deployment/reviews-v1` then replaces its pod as Kubernetes does
    (the new pod ready before the old one leaves), so a user loading the page all along sees
    no error, and the page is afterwards served by a pod with a new name and a new IP."""
    mesh.apply(ALL_V1)
    (old,) = mesh.deployment_pods("reviews-v1")
    old_name, old_ip = old["metadata"]["name"], old["status"]["podIP"]
    with Load(mesh.browser()) as load:
        wait_until("some traffic", lambda: len(load.pages) >= 10, timeout=60)
        mesh.meshlet("rollout", "restart", "deployment/reviews-v1")
        (new,) = wait_until(
            "the old reviews-v1 pod to be replaced",
            lambda: [
                p
                for p in mesh.ready_pods("reviews-v1", 1) or []
                if p["metadata"]["name"] != old_name
            ],
            timeout=90,
        )
        wait_until(
            "a page served by the new pod",
            lambda: new["metadata"]["name"] in load.served_by(),
            timeout=60,
        )
        seen = len(load.pages)
        wait_until("more traffic", lambda: len(load.pages) >= seen + 10, timeout=60)
    assert not load.failures, load.failures[:5]
    assert new["status"]["podIP"] != old_ip
    assert set(load.served_by()) == {old_name, new["metadata"]["name"]}


def test_killed_app_restarts_and_retries_hide_it_from_clients(mesh: Mesh) -> None:
    """A container that dies is restarted by the runtime (restartCount 1, exit code 137 for
    SIGKILL); its pod leaves Ready while it is down. Requests that meet the dead app are
    retried on another endpoint by the caller's sidecar -- Istio's default retry policy
    retries connect failures and 503s, on a host not tried before
    (istio.io/latest/docs/concepts/traffic-management/#retries) -- so a user loading the page
    all along sees no failure. Routing is the all-v1 of
    istio.io/latest/docs/tasks/traffic-management/request-routing/, and reviews-v1 runs two
    replicas: with a single one, nothing could serve while its only app restarts."""
    mesh.apply(ALL_V1)
    before_scale = mesh._sent_versions()
    mesh.meshlet("scale", "deployment/reviews-v1", "--replicas", "2")
    try:
        pods = wait_until(
            "two ready reviews-v1 pods", lambda: mesh.ready_pods("reviews-v1", 2), timeout=90
        )
        mesh.wait_pushed(before_scale)
        victim = pods[0]
        name = victim["metadata"]["name"]
        pid = container_pid(victim, "reviews")
        assert pid is not None
        restarts = container_status(victim, "reviews")["restartCount"]
        ready_since = condition(victim, "Ready")["lastTransitionTime"]
        time.sleep(1.1)  # lastTransitionTime counts whole seconds: let it be able to move

        def restarted() -> dict[str, Any] | None:
            for pod in mesh.deployment_pods("reviews-v1"):
                if pod["metadata"]["name"] != name:
                    continue
                status = container_status(pod, "reviews")
                ready = condition(pod, "Ready")["status"] == "True"
                return pod if status["restartCount"] == restarts + 1 and ready else None
            raise AssertionError(f"pod {name} is gone: the container, not the pod, restarts")

        with Load(mesh.browser()) as load:
            wait_until("some traffic", lambda: len(load.pages) >= 10, timeout=60)
            os.kill(pid, signal.SIGKILL)
            after = wait_until("the reviews container to restart", restarted, timeout=60)
            seen = len(load.pages)
            wait_until("more traffic", lambda: len(load.pages) >= seen + 20, timeout=60)
        status = container_status(after, "reviews")
        assert status["lastState"]["terminated"]["exitCode"] == 128 + signal.SIGKILL
        assert container_pid(after, "reviews") not in (None, pid)
        # Ready went False when the process died, and True again once it ran.
        assert condition(after, "Ready")["lastTransitionTime"] > ready_since
        assert not load.failures, load.failures[:5]
        assert name in load.served_by()
    finally:
        mesh.meshlet("scale", "deployment/reviews-v1", "--replicas", "1")
        wait_until("one reviews-v1 pod", lambda: mesh.ready_pods("reviews-v1", 1), timeout=90)


def test_scaled_deployment_spreads_traffic_over_its_pods(mesh: Mesh) -> None:
    """`meshlet scale deployment/reviews-v1 --replicas 3` (kubectl scale) gives the reviews v1
    subset three endpoints (istio.io/latest/docs/tasks/traffic-management/request-routing/'s
    all-v1 routing), and the sidecars balance page loads over all three."""
    mesh.apply(ALL_V1)
    before = mesh._sent_versions()
    mesh.meshlet("scale", "deployment/reviews-v1", "--replicas", "3")
    try:
        pods = wait_until(
            "three ready reviews-v1 pods", lambda: mesh.ready_pods("reviews-v1", 3), timeout=90
        )
        mesh.wait_pushed(before)
        served = Counter(p.reviews_pod for p in loads(mesh, 60))
        assert set(served) == {p["metadata"]["name"] for p in pods}, served
    finally:
        mesh.meshlet("scale", "deployment/reviews-v1", "--replicas", "1")
        wait_until("one reviews-v1 pod", lambda: mesh.ready_pods("reviews-v1", 1), timeout=90)
