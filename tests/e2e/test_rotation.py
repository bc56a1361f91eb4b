"""Certificate rotation without restarts (issue 5; Istio rotates workload certificates at half
their lifetime): a mesh whose certificates live 8 seconds serves steady traffic through the
gateway across several rotations without losing a request, and the certificate a sidecar
presents changes while its process stays the same."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Load, Mesh, start_mesh, wait_until
from tests.samples import SAMPLES

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(180),
    pytest.mark.skipif(SAMPLES is None, reason="Istio's sample files are not present"),
]

BOOKINFO = (SAMPLES or Path("/nonexistent")) / "bookinfo"
TTL = 8.0


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    cwd = tmp_path_factory.mktemp("rotation")
    mesh = start_mesh(
        cwd,
        BOOKINFO / "platform" / "kube" / "bookinfo.yaml",
        BOOKINFO / "networking" / "bookinfo-gateway.yaml",
        BOOKINFO / "networking" / "destination-rule-all.yaml",
        extra=("--workload-cert-ttl", f"{TTL:g}s"),
    )
    try:
        yield mesh
    finally:
        mesh.down()


def presented_certificate(ip: str) -> bytes:
    """The certificate a sidecar's inbound listener presents (the TLS client sends none; the
    server's certificate arrives before it asks for ours)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((ip, 15006), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_rotation_under_load_loses_no_request(mesh: Mesh) -> None:
    [details] = [p for p in mesh.pods() if p["metadata"]["name"].startswith("details")]
    ip = details["status"]["podIP"]
    sidecar = [c for c in details["status"]["containerStatuses"] if c["name"] == "istio-proxy"]
    first = presented_certificate(ip)
    with Load(mesh.browser()) as load:
        wait_until(
            "a rotated certificate", lambda: presented_certificate(ip) != first, timeout=3 * TTL
        )
        time.sleep(TTL)  # and at least one more rotation under load
    assert load.failures == [], load.failures[:5]
    assert len(load.pages) > 10
    [after] = [p for p in mesh.pods() if p["metadata"]["name"] == details["metadata"]["name"]]
    again = [c for c in after["status"]["containerStatuses"] if c["name"] == "istio-proxy"]
    assert again[0]["restartCount"] == sidecar[0]["restartCount"]  # no restart for it
