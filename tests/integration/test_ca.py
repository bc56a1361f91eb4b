"""The CA as a proxy meets it: a real ``meshlet control --ca`` process, a bootstrap token, a CSR
over gRPC TLS (Istio's ``IstioCertificateService/CreateCertificate``), and ADS over mTLS with
the certificate it issued."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from cryptography import x509
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from meshlet.control.ca import BootstrapTokens, write_token_file
from meshlet.control.xds import SECRET_TYPE
from meshlet.proxy.identity import (
    IdentityOptions,
    WorkloadCertificate,
    make_csr,
    request_certificate,
)
from tests.integration.conftest import free_port, meshlet_cmd

pytestmark = pytest.mark.timeout(90)


@dataclass
class Plane:
    process: subprocess.Popen[bytes]
    state_dir: Path
    ca_port: int
    mtls_port: int
    api_port: int

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}/metrics", timeout=5) as r:
            return r.read().decode()


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[Plane]:
    state = tmp_path / "state"
    ports = [free_port() for _ in range(4)]
    err = tmp_path / "control.err"
    process = subprocess.Popen(
        meshlet_cmd(
            "control",
            "--ca",
            "--state-dir",
            str(state),
            "--xds-address",
            f"127.0.0.1:{ports[0]}",
            "--api-address",
            f"127.0.0.1:{ports[1]}",
            "--ca-address",
            f"127.0.0.1:{ports[2]}",
            "--xds-tls-address",
            f"127.0.0.1:{ports[3]}",
            "--workload-cert-ttl",
            "1h",
        ),
        stdout=(tmp_path / "control.out").open("wb"),
        stderr=err.open("wb"),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    p = Plane(process, state, ports[2], ports[3], ports[1])
    deadline = time.monotonic() + 20
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"meshlet control exited: {err.read_text()}")
        with contextlib.suppress(OSError):
            if "citadel_server_csr_count" in p.metrics():
                break
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError(err.read_text())
        time.sleep(0.05)
    yield p
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def _options(plane: Plane, tmp_path: Path, *, namespace: str, sa: str, pod: str) -> IdentityOptions:
    token = BootstrapTokens.load_or_create(plane.state_dir).issue(
        namespace=namespace, service_account=sa, pod=pod
    )
    token_path = tmp_path / pod / "token"
    write_token_file(token_path, token)
    return IdentityOptions(
        ca_address=f"127.0.0.1:{plane.ca_port}",
        token_path=token_path,
        root_path=plane.state_dir / "ca" / "root-cert.pem",
        namespace=namespace,
        service_account=sa,
    )


def test_a_csr_with_a_token_gets_a_spiffe_certificate_chaining_to_the_root(
    plane: Plane, tmp_path: Path
) -> None:
    options = _options(plane, tmp_path, namespace="default", sa="bookinfo-reviews", pod="r-1")
    assert (plane.state_dir / "ca" / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    cert = asyncio.run(request_certificate(options))
    leaf = x509.load_pem_x509_certificate(cert.chain_pem)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
    ]
    root = x509.load_pem_x509_certificate(options.root_path.read_bytes())
    leaf.verify_directly_issued_by(root)
    assert 3590 <= cert.not_after - time.time() <= 3600  # --workload-cert-ttl 1h
    assert "citadel_server_success_cert_issuance_count 1" in plane.metrics()


def test_a_csr_for_another_identity_is_refused_and_counted(plane: Plane, tmp_path: Path) -> None:
    options = _options(plane, tmp_path, namespace="default", sa="bookinfo-reviews", pod="r-2")
    key, csr = make_csr("spiffe://cluster.local/ns/default/sa/bookinfo-ratings")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        asyncio.run(request_certificate(options, csr_pem=csr, key_pem=key))
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "bookinfo-ratings" in (refused.value.details() or "")
    metrics = plane.metrics()
    assert 'citadel_server_csr_sign_err_count{reason="identity_mismatch"} 1' in metrics
    assert "citadel_server_success_cert_issuance_count 0" in metrics


def test_a_csr_without_a_valid_token_is_unauthenticated(plane: Plane, tmp_path: Path) -> None:
    options = _options(plane, tmp_path, namespace="default", sa="x", pod="x-1")
    options.token_path.write_text("mlt1.e30.forged")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        asyncio.run(request_certificate(options))
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert "citadel_server_authentication_failure_count 1" in plane.metrics()


def _node(namespace: str, sa: str, pod: str) -> base_pb2.Node:
    node = base_pb2.Node(id=f"sidecar~127.0.0.9~{pod}.{namespace}~{namespace}.svc.cluster.local")
    node.metadata.update({"NAMESPACE": namespace, "SERVICE_ACCOUNT": sa})
    return node


async def _secrets_over_mtls(
    plane: Plane, options: IdentityOptions, node: base_pb2.Node
) -> tuple[WorkloadCertificate, Any]:
    cert = await request_certificate(options)  # a new key, and its certificate
    creds = grpc.ssl_channel_credentials(cert.root_pem, cert.key_pem, cert.chain_pem)
    async with grpc.aio.secure_channel(
        f"127.0.0.1:{plane.mtls_port}",
        creds,
        options=(("grpc.ssl_target_name_override", "istiod.istio-system.svc"),),
    ) as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        call = stub.StreamAggregatedResources()
        await call.write(
            discovery_pb2.DiscoveryRequest(
                node=node, type_url=SECRET_TYPE, resource_names=["default", "ROOTCA"]
            )
        )
        response = await asyncio.wait_for(call.read(), 10)
        call.cancel()
    return cert, response


def test_ads_over_mtls_serves_the_pods_own_chain_as_sds_default(
    plane: Plane, tmp_path: Path
) -> None:
    options = _options(plane, tmp_path, namespace="default", sa="reviews", pod="r-3")
    cert, response = asyncio.run(
        _secrets_over_mtls(plane, options, _node("default", "reviews", "r-3"))
    )
    secrets = {}
    for packed in response.resources:
        s = secret_pb2.Secret()
        packed.Unpack(s)
        secrets[s.name] = s
    assert set(secrets) == {"default", "ROOTCA"}
    assert secrets["default"].tls_certificate.certificate_chain.inline_bytes.startswith(
        cert.chain_pem
    )
    assert not secrets["default"].tls_certificate.HasField("private_key")  # never the key
    assert secrets["ROOTCA"].validation_context.trusted_ca.inline_bytes == cert.root_pem


def test_ads_over_mtls_refuses_a_node_that_is_not_the_certificates_identity(
    plane: Plane, tmp_path: Path
) -> None:
    options = _options(plane, tmp_path, namespace="default", sa="reviews", pod="r-4")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        asyncio.run(_secrets_over_mtls(plane, options, _node("default", "ratings", "r-4")))
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
