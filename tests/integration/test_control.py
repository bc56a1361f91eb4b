"""``meshlet control`` as a user runs it: a real process with a state directory and free ports,
driven by ``meshlet apply``/``get``/``delete`` processes and a grpcio ADS client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from envoy.config.cluster.v3 import cluster_pb2

from meshlet.control.xds import CLUSTER_TYPE
from tests.integration.conftest import free_port, meshlet_cmd
from tests.integration.test_ads_server import AdsClient, names_of
from tests.samples import SAMPLES as _FOUND

pytestmark = pytest.mark.timeout(90)

SAMPLES = (_FOUND or Path("/nonexistent")) / "bookinfo"
BOOKINFO = SAMPLES / "platform" / "kube" / "bookinfo.yaml"
DESTINATION_RULES = SAMPLES / "networking" / "destination-rule-all.yaml"
SIDECAR = "sidecar~10.1.0.7~productpage-v1-abc.default~default.svc.cluster.local"
REVIEWS_V1 = "outbound|9080|v1|reviews.default.svc.cluster.local"

needs_samples = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"{SAMPLES} is not present")


@dataclass
class ControlPlane:
    process: subprocess.Popen[bytes]
    state_dir: Path
    xds_port: int
    api_port: int
    out: Path
    err: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(15)


def start_control(state_dir: Path, logs: Path) -> ControlPlane:
    xds_port, api_port = free_port(), free_port()
    n = len(list(logs.glob("control-*.out")))
    out, err = logs / f"control-{n}.out", logs / f"control-{n}.err"
    process = subprocess.Popen(
        meshlet_cmd(
            "control",
            "--state-dir",
            str(state_dir),
            "--xds-address",
            f"127.0.0.1:{xds_port}",
            "--api-address",
            f"127.0.0.1:{api_port}",
        ),
        stdout=out.open("wb"),
        stderr=err.open("wb"),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    plane = ControlPlane(process, state_dir, xds_port, api_port, out, err)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"meshlet control exited with {process.returncode}: {err.read_text()}"
            )
        with contextlib.suppress(OSError):
            if plane.get("/ready")[0] == 200:
                return plane
        time.sleep(0.05)
    plane.process.kill()
    raise TimeoutError(f"meshlet control did not become ready: {err.read_text()}")


@pytest.fixture
def control(tmp_path: Path) -> Iterator[ControlPlane]:
    plane = start_control(tmp_path / "state", tmp_path)
    yield plane
    if plane.process.poll() is None:
        plane.process.kill()
        plane.process.wait(10)


def meshlet(
    plane: ControlPlane, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        meshlet_cmd(*args, "--server", plane.url),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "MESHLET_SERVER"},
    )


def changed_reviews_rule(tmp_path: Path) -> Path:
    path = tmp_path / "reviews-dr.yaml"
    path.write_text(
        "apiVersion: networking.istio.io/v1\n"
        "kind: DestinationRule\n"
        "metadata:\n  name: reviews\n"
        "spec:\n"
        "  host: reviews\n"
        "  trafficPolicy:\n    loadBalancer:\n      simple: ROUND_ROBIN\n"
        "  subsets:\n"
        "  - name: v1\n    labels: {version: v1}\n"
        "  - name: v2\n    labels: {version: v2}\n"
    )
    return path


# -- start-up and the API ------------------------------------------------------------------


def test_control_prints_progress_and_stops_cleanly_on_sigterm(control: ControlPlane) -> None:
    assert control.stop() == 0
    out = control.out.read_text()
    assert f"store {control.state_dir / 'store.db'}: 0 objects" in out
    assert f"xDS on 127.0.0.1:{control.xds_port}" in out
    assert f"API on http://127.0.0.1:{control.api_port}" in out


def test_a_second_control_plane_on_the_same_state_dir_is_refused(
    control: ControlPlane, tmp_path: Path
) -> None:
    with pytest.raises(RuntimeError, match="in use by another meshlet process"):
        start_control(control.state_dir, tmp_path)


def test_metrics_and_syncz_are_served(control: ControlPlane) -> None:
    status, text = control.get("/metrics")
    assert status == 200
    assert "pilot_xds 0" in text
    assert "meshlet_store_revision 0" in text
    assert control.get("/debug/syncz") == (200, "[]\n")


def test_unknown_paths_are_kubernetes_not_found_statuses(control: ControlPlane) -> None:
    status, body = control.get("/apis/networking.istio.io/v1/namespaces/default/widgets")
    assert status == 404
    assert json.loads(body)["reason"] == "NotFound"


# -- apply, get, delete --------------------------------------------------------------------


@needs_samples
def test_apply_get_and_restart_keep_bookinfo(control: ControlPlane, tmp_path: Path) -> None:
    applied = meshlet(control, "apply", "-f", str(BOOKINFO), "-f", str(DESTINATION_RULES))
    assert applied.returncode == 0, applied.stderr
    lines = applied.stdout.splitlines()
    assert "service/reviews created" in lines
    assert "deployment.apps/reviews-v3 created" in lines
    assert "destinationrule.networking.istio.io/reviews created" in lines

    again = meshlet(control, "apply", "-f", str(DESTINATION_RULES))
    assert again.returncode == 0, again.stderr
    assert "destinationrule.networking.istio.io/reviews unchanged" in again.stdout.splitlines()

    listed = meshlet(control, "get", "dr", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    items = json.loads(listed.stdout)["items"]
    assert [i["metadata"]["name"] for i in items] == [
        "details",
        "productpage",
        "ratings",
        "reviews",
    ]

    table = meshlet(control, "get", "destinationrules", "-o", "wide")
    assert table.stdout.splitlines()[0].split() == ["NAME", "HOST", "AGE"]
    assert table.stdout.splitlines()[4].split()[:2] == ["reviews", "reviews"]

    assert control.stop() == 0
    restarted = start_control(control.state_dir, tmp_path)
    control.process = restarted.process  # the fixture cleans up the new one
    assert "store" in restarted.out.read_text() and ": 18 objects" in restarted.out.read_text()
    one = meshlet(restarted, "get", "dr", "reviews", "-o", "json")
    assert one.returncode == 0, one.stderr
    assert [s["name"] for s in json.loads(one.stdout)["spec"]["subsets"]] == ["v1", "v2", "v3"]


def test_an_invalid_file_is_refused_whole_with_file_and_line(
    control: ControlPlane, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: networking.istio.io/v1\n"
        "kind: VirtualService\n"
        "metadata:\n  name: good\n"
        "spec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews}\n"
        "---\n"
        "apiVersion: networking.istio.io/v1\n"
        "kind: DestinationRule\n"
        "metadata:\n  name: bad\n"
        "spec:\n  host: reviews\n  trafficPolicy:\n    loadBalancer:\n      simple: FASTEST\n"
    )
    result = meshlet(control, "apply", "-f", str(bad))
    assert result.returncode == 2
    assert f"{bad}:19: spec.trafficPolicy.loadBalancer.simple: invalid value 'FASTEST'" in (
        result.stderr
    )
    assert meshlet(control, "get", "vs", "-o", "json").stdout.count('"name": "good"') == 0
    assert "meshlet_store_revision 0" in control.get("/metrics")[1]


def test_the_server_refuses_an_invalid_batch_whole_with_422(control: ControlPlane) -> None:
    batch = [
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": "fine"},
            "spec": {"host": "reviews"},
        },
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": "broken"},
            "spec": {"hostz": "reviews"},
        },
    ]
    req = urllib.request.Request(
        control.url + "/apply", data=json.dumps(batch).encode(), method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(req, timeout=5)
    assert caught.value.code == 422
    causes = json.loads(caught.value.read())["details"]["causes"]
    assert {(c["index"], c["field"]) for c in causes} == {(1, "spec.host"), (1, "spec.hostz")}
    assert (
        control.get("/apis/networking.istio.io/v1/namespaces/default/destinationrules")[1].count(
            "fine"
        )
        == 0
    )


def test_stdin_apply_get_missing_and_delete(control: ControlPlane, tmp_path: Path) -> None:
    text = changed_reviews_rule(tmp_path).read_text()
    applied = meshlet(control, "apply", "-f", "-", stdin=text)
    assert applied.stdout.strip() == "destinationrule.networking.istio.io/reviews created"

    missing = meshlet(control, "get", "vs", "nope")
    assert missing.returncode == 1
    assert missing.stderr.strip() == (
        'Error from server (NotFound): virtualservices.networking.istio.io "nope" not found'
    )

    deleted = meshlet(control, "delete", "-f", "-", stdin=text)
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout.strip() == 'destinationrule.networking.istio.io "reviews" deleted'
    assert meshlet(control, "get", "dr", "reviews").returncode == 1
    assert meshlet(control, "delete", "-f", "-", stdin=text).returncode == 1


def test_an_unreachable_control_plane_is_explained(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = subprocess.run(
        meshlet_cmd("get", "vs", "--server", url), capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert f"cannot reach the control plane at {url}: is 'meshlet control' running?" in (
        result.stderr
    )


# -- ADS ----------------------------------------------------------------------------------------


@needs_samples
def test_a_sidecar_gets_bookinfo_clusters_and_a_new_version_after_a_change(
    control: ControlPlane, tmp_path: Path
) -> None:
    applied = meshlet(control, "apply", "-f", str(BOOKINFO), "-f", str(DESTINATION_RULES))
    assert applied.returncode == 0, applied.stderr
    changed = changed_reviews_rule(tmp_path)

    async def scenario() -> None:
        client = AdsClient(control.xds_port, SIDECAR)
        try:
            await client.send(CLUSTER_TYPE)
            # The snapshot follows the store after the push debounce: a proxy that connects
            # within it gets the older clusters first, then the push.
            cds = await client.recv(10)
            while REVIEWS_V1 not in names_of(cds):
                await client.ack(cds)
                cds = await client.recv(10)
            assert cds.type_url == CLUSTER_TYPE
            assert "outbound|9080|v3|reviews.default.svc.cluster.local" in names_of(cds)
            await client.ack(cds)

            result = await asyncio.to_thread(meshlet, control, "apply", "-f", str(changed))
            assert result.stdout.strip() == "destinationrule.networking.istio.io/reviews configured"
            pushed = await client.recv(10)
            assert pushed.type_url == CLUSTER_TYPE
            assert int(pushed.version_info) > int(cds.version_info)
            names = names_of(pushed)
            assert REVIEWS_V1 in names
            assert "outbound|9080|v3|reviews.default.svc.cluster.local" not in names
            reviews = next(
                cluster_pb2.Cluster.FromString(r.value)
                for r in pushed.resources
                if cluster_pb2.Cluster.FromString(r.value).name == REVIEWS_V1
            )
            assert reviews.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
            await client.ack(pushed)

            deadline = time.monotonic() + 5
            while True:
                _, body = await asyncio.to_thread(control.get, "/debug/syncz")
                synced = json.loads(body)
                if synced and synced[0]["types"]["cds"]["state"] == "SYNCED":
                    break
                assert time.monotonic() < deadline, body
                await asyncio.sleep(0.05)
            assert synced[0]["proxy_id"] == SIDECAR
            assert synced[0]["types"]["cds"]["acked_version"] == pushed.version_info

            status = await asyncio.to_thread(meshlet, control, "proxy-status")
            assert status.returncode == 0, status.stderr
            header, row = status.stdout.splitlines()
            assert header.split() == ["NAME", "CDS", "LDS", "EDS", "RDS", "VERSION"]
            # Only CDS was asked for: the other types were never sent.
            assert row.split() == [SIDECAR, "SYNCED", *["NOT", "SENT"] * 3, pushed.version_info]
            config = await asyncio.to_thread(
                meshlet, control, "proxy-config", "clusters", "productpage-v1-abc", "-o", "json"
            )
            assert config.returncode == 0, config.stderr
            assert REVIEWS_V1 in [c["name"] for c in json.loads(config.stdout)]
            table = await asyncio.to_thread(
                meshlet, control, "proxy-config", "cluster", "productpage-v1-abc.default"
            )
            assert ["reviews.default.svc.cluster.local", "9080", "v1", "outbound", "EDS"] in [
                line.split() for line in table.stdout.splitlines()
            ]
        finally:
            await client.close()

    asyncio.run(scenario())
    assert "pilot_xds_pushes" in control.get("/metrics")[1]


# -- analyze (offline) --------------------------------------------------------------------------


@needs_samples
def test_analyze_is_clean_for_bookinfo_and_exits_1_on_errors(tmp_path: Path) -> None:
    def analyze(*paths: Path) -> subprocess.CompletedProcess[str]:
        args = [a for p in paths for a in ("-f", str(p))]
        return subprocess.run(
            meshlet_cmd("analyze", *args), capture_output=True, text=True, timeout=60
        )

    all_v1 = SAMPLES / "networking" / "virtual-service-all-v1.yaml"
    clean = analyze(BOOKINFO, DESTINATION_RULES, all_v1)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "No validation issues found" in clean.stdout

    missing = analyze(BOOKINFO, all_v1)
    assert missing.returncode == 1
    assert f"(VirtualService default/reviews {all_v1}:14) Referenced host+subset in" in (
        missing.stdout
    )

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata:\n  name: g\n"
        "spec:\n  servers: oops\n"
    )
    schema = analyze(bad)
    assert schema.returncode == 1
    assert f"{bad}:6: spec.servers:" in schema.stderr
