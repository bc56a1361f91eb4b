"""Mutual TLS between real ``meshlet proxy`` processes, with certificates made in the test.

A server proxy has a PERMISSIVE inbound listener (``tls_inspector``; a TLS chain and a
plaintext chain on one port), a STRICT one (TLS only) and a SIMPLE one (TLS, no client
certificate asked). A client proxy reaches it through clusters using Istio's auto-mTLS shape
(``transport_socket_matches`` on endpoint metadata ``tlsMode: istio``).
"""

from __future__ import annotations

import datetime
import json
import socket
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.integration.conftest import (
    HCM,
    ROUTER,
    Proxy,
    Upstream,
    free_port,
    http_request,
    wait_for_lines,
)

TLS_DOWN = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
TLS_UP = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
RAW = "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
INSPECTOR = "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
FILE_LOG = "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"


# -- certificates ----------------------------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _ca(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def workload_cert(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], uri: str, *dns: str
) -> tuple[str, str]:
    """(certificate PEM, key PEM) for a workload with URI SAN ``uri`` (Istio's layout:
    empty subject, SANs only)."""
    ca_cert, ca_key = ca
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
    names += [x509.DNSName(d) for d in dns]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode(), _pem_key(key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = _ca("meshlet test root")
    other = _ca("another root")
    out: dict[str, Any] = {
        "ca": root[0].public_bytes(serialization.Encoding.PEM).decode(),
        "server": workload_cert(root, SERVER_ID, "server.test"),
        "client": workload_cert(root, CLIENT_ID),
        "stranger": workload_cert(other, CLIENT_ID),
    }
    directory = tmp_path_factory.mktemp("pki")
    (directory / "ca.pem").write_text(out["ca"])
    for name in ("client", "stranger"):
        (directory / f"{name}.pem").write_text(out[name][0])
        (directory / f"{name}-key.pem").write_text(out[name][1])
    out["dir"] = directory
    return out


# -- configuration ---------------------------------------------------------------------------


def _addr(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def _sds(name: str) -> dict[str, Any]:
    return {"name": name, "sds_config": {"ads": {}}}


def _secrets(cert: tuple[str, str], ca: str) -> list[dict[str, Any]]:
    return [
        {
            "name": "default",
            "tls_certificate": {
                "certificate_chain": {"inline_string": cert[0]},
                "private_key": {"inline_string": cert[1]},
            },
        },
        {"name": "ROOTCA", "validation_context": {"trusted_ca": {"inline_string": ca}}},
    ]


def _hcm(cluster: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": HCM,
            "stat_prefix": "inbound",
            "route_config": {
                "virtual_hosts": [
                    {
                        "name": "all",
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}],
                    }
                ]
            },
            "http_filters": [
                {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}
            ],
            **extra,
        },
    }


def _downstream_tls(*, require_client: bool) -> dict[str, Any]:
    common: dict[str, Any] = {
        "tls_certificate_sds_secret_configs": [_sds("default")],
        "alpn_protocols": ["h2", "http/1.1"],
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
    }
    if require_client:
        common["combined_validation_context"] = {
            "default_validation_context": {},
            "validation_context_sds_secret_config": _sds("ROOTCA"),
        }
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": TLS_DOWN,
            "common_tls_context": common,
            "require_client_certificate": require_client,
        },
    }


def _upstream_tls(san: str) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": TLS_UP,
            "common_tls_context": {
                "tls_certificate_sds_secret_configs": [_sds("default")],
                "combined_validation_context": {
                    "default_validation_context": {
                        "match_subject_alt_names": [{"exact": san}],
                    },
                    "validation_context_sds_secret_config": _sds("ROOTCA"),
                },
                "alpn_protocols": ["istio-peer-exchange", "istio"],
            },
            "sni": "outbound_.9080_._.server.default.svc.cluster.local",
        },
    }


XFCC_HCM = {
    "forward_client_cert_details": "SANITIZE_SET",
    "set_current_client_cert_details": {"uri": True},
}


def server_config(pki: dict[str, Any], app_port: int, log_path: Path) -> dict[str, Any]:
    log = {
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": FILE_LOG,
            "path": str(log_path),
            "log_format": {"text_format_source": {"inline_string": "%DOWNSTREAM_PEER_URI_SAN%\n"}},
        },
    }
    mtls_chain = {
        "name": "mtls",
        "filter_chain_match": {"transport_protocol": "tls"},
        "transport_socket": _downstream_tls(require_client=True),
        "filters": [_hcm("app", access_log=[log], **XFCC_HCM)],
    }
    return {
        "node": {
            "id": "sidecar~127.0.0.1~server-1.default~default.svc.cluster.local",
            "metadata": {
                "NAMESPACE": "default",
                "WORKLOAD_NAME": "server",
                "SERVICE_ACCOUNT": "server",
            },
        },
        "admin": {"address": _addr(free_port())},
        "static_resources": {
            "secrets": _secrets(pki["server"], pki["ca"]),
            "listeners": [
                {
                    "name": "permissive",
                    "address": _addr(free_port()),
                    "traffic_direction": "INBOUND",
                    "listener_filters": [
                        {
                            "name": "envoy.filters.listener.tls_inspector",
                            "typed_config": {"@type": INSPECTOR},
                        }
                    ],
                    "filter_chains": [
                        mtls_chain,
                        {
                            "name": "plaintext",
                            "filter_chain_match": {"transport_protocol": "raw_buffer"},
                            "filters": [_hcm("app", access_log=[log], **XFCC_HCM)],
                        },
                    ],
                },
                {
                    "name": "strict",
                    "address": _addr(free_port()),
                    "traffic_direction": "INBOUND",
                    "filter_chains": [
                        {
                            "transport_socket": _downstream_tls(require_client=True),
                            "filters": [_hcm("app", **XFCC_HCM)],
                        }
                    ],
                },
                {
                    "name": "simple",
                    "address": _addr(free_port()),
                    "filter_chains": [
                        {
                            "transport_socket": _downstream_tls(require_client=False),
                            "filters": [_hcm("app")],
                        }
                    ],
                },
            ],
            "clusters": [
                {
                    "name": "app",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "app",
                        "endpoints": [
                            {"lb_endpoints": [{"endpoint": {"address": _addr(app_port)}}]}
                        ],
                    },
                }
            ],
        },
    }


def _auto_mtls_cluster(name: str, port: int, san: str, *, sidecar: bool = True) -> dict[str, Any]:
    endpoint: dict[str, Any] = {"endpoint": {"address": _addr(port)}}
    if sidecar:
        endpoint["metadata"] = {
            "filter_metadata": {"envoy.transport_socket_match": {"tlsMode": "istio"}}
        }
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [endpoint]}]},
        "transport_socket_matches": [
            {
                "name": "tlsMode-istio",
                "match": {"tlsMode": "istio"},
                "transport_socket": _upstream_tls(san),
            },
            {
                "name": "tlsMode-disabled",
                "match": {},
                "transport_socket": {
                    "name": "envoy.transport_sockets.raw_buffer",
                    "typed_config": {"@type": RAW},
                },
            },
        ],
    }


def client_config(pki: dict[str, Any], server: dict[str, Any]) -> dict[str, Any]:
    listeners = server["static_resources"]["listeners"]
    permissive = listeners[0]["address"]["socket_address"]["port_value"]
    strict = listeners[1]["address"]["socket_address"]["port_value"]
    routes = [
        {
            "match": {"prefix": "/wrong-san/"},
            "route": {"cluster": "wrong-san", "prefix_rewrite": "/"},
        },
        {"match": {"prefix": "/strict/"}, "route": {"cluster": "strict", "prefix_rewrite": "/"}},
        {
            "match": {"prefix": "/plain-strict/"},
            "route": {"cluster": "plain-strict", "prefix_rewrite": "/"},
        },
        {"match": {"prefix": "/plain/"}, "route": {"cluster": "plain", "prefix_rewrite": "/"}},
        {"match": {"prefix": "/"}, "route": {"cluster": "server"}},
    ]
    return {
        "node": {"id": "client", "metadata": {"NAMESPACE": "default", "SERVICE_ACCOUNT": "client"}},
        "admin": {"address": _addr(free_port())},
        "static_resources": {
            "secrets": _secrets(pki["client"], pki["ca"]),
            "listeners": [
                {
                    "name": "outbound",
                    "address": _addr(free_port()),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": HCM,
                                        "stat_prefix": "outbound",
                                        "route_config": {
                                            "virtual_hosts": [
                                                {"name": "all", "domains": ["*"], "routes": routes}
                                            ]
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {"@type": ROUTER},
                                            }
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                _auto_mtls_cluster("server", permissive, SERVER_ID),
                _auto_mtls_cluster(
                    "wrong-san", permissive, "spiffe://cluster.local/ns/default/sa/other"
                ),
                _auto_mtls_cluster("strict", strict, SERVER_ID),
                _auto_mtls_cluster("plain-strict", strict, SERVER_ID, sidecar=False),
                _auto_mtls_cluster("plain", permissive, SERVER_ID, sidecar=False),
            ],
        },
    }


# -- fixtures --------------------------------------------------------------------------------


def _port(config: dict[str, Any], index: int) -> int:
    return int(
        config["static_resources"]["listeners"][index]["address"]["socket_address"]["port_value"]
    )


@pytest.fixture
def mesh(
    pki: dict[str, Any],
    upstream: Upstream,
    start_proxy: Callable[..., Proxy],
    tmp_path: Path,
) -> dict[str, Any]:
    log_path = tmp_path / "server-access.log"
    server_cfg = server_config(pki, upstream.port, log_path)
    server = start_proxy(server_cfg, name="server")
    client = start_proxy(client_config(pki, server_cfg), name="client")
    return {
        "server": server,
        "client": client,
        "permissive": _port(server_cfg, 0),
        "strict": _port(server_cfg, 1),
        "simple": _port(server_cfg, 2),
        "log": log_path,
        "upstream": upstream,
    }


def _tls_get(port: int, pki: dict[str, Any], who: str | None, path: str = "/headers") -> bytes:
    """A GET over TLS from this process, presenting ``who``'s certificate (None: none)."""
    ctx = ssl.create_default_context(cafile=str(pki["dir"] / "ca.pem"))
    ctx.check_hostname = False
    if who is not None:
        ctx.load_cert_chain(str(pki["dir"] / f"{who}.pem"), str(pki["dir"] / f"{who}-key.pem"))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="server.test") as s,
    ):
        s.sendall(f"GET {path} HTTP/1.1\r\nhost: server\r\nconnection: close\r\n\r\n".encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


# -- tests -----------------------------------------------------------------------------------


def test_mutual_tls_between_proxies_carries_the_client_identity_to_the_app(
    mesh: dict[str, Any],
) -> None:
    r = http_request(mesh["client"].port, "/headers")
    assert r.status == 200, r.body
    seen = json.loads(r.body)
    xfcc = seen["x-forwarded-client-cert"]
    parts = dict(p.split("=", 1) for p in xfcc.split(";"))
    assert parts["By"] == SERVER_ID
    assert parts["URI"] == CLIENT_ID
    assert len(parts["Hash"]) == 64
    # The client proxy set x-forwarded-proto (http, its app's scheme); without
    # use_remote_address the server proxy keeps it, as Envoy does.
    assert seen["x-forwarded-proto"] == "http"
    assert wait_for_lines(mesh["log"], 1) == [CLIENT_ID]


def test_metrics_report_mutual_tls_and_the_source_principal(mesh: dict[str, Any]) -> None:
    assert http_request(mesh["client"].port, "/").status == 200
    assert http_request(mesh["client"].port, "/plain/").status == 200
    _, text = mesh["server"].admin_get("/stats/prometheus")
    lines = [ln for ln in text.splitlines() if ln.startswith("istio_requests_total{")]
    mtls = [ln for ln in lines if 'connection_security_policy="mutual_tls"' in ln]
    plain = [ln for ln in lines if 'connection_security_policy="none"' in ln]
    assert len(mtls) == 1 and len(plain) == 1, lines
    assert f'source_principal="{CLIENT_ID}"' in mtls[0]
    assert f'destination_principal="{SERVER_ID}"' in mtls[0]
    assert 'source_principal="unknown"' in plain[0]


def test_permissive_accepts_plaintext_and_a_forged_xfcc_is_removed(mesh: dict[str, Any]) -> None:
    r = http_request(mesh["permissive"], "/headers", headers={"x-forwarded-client-cert": "By=evil"})
    assert r.status == 200
    seen = json.loads(r.body)
    assert "x-forwarded-client-cert" not in seen
    assert seen["x-forwarded-proto"] == "http"
    via_client = http_request(mesh["client"].port, "/plain/headers")  # tlsMode absent: plaintext
    assert via_client.status == 200
    assert "x-forwarded-client-cert" not in json.loads(via_client.body)


def test_strict_refuses_plaintext_and_accepts_mutual_tls(
    mesh: dict[str, Any], pki: dict[str, Any]
) -> None:
    with socket.create_connection(("127.0.0.1", mesh["strict"]), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        try:
            answer = s.recv(1024)
        except ConnectionResetError:
            answer = b""
    assert not answer.startswith(b"HTTP/")
    assert http_request(mesh["client"].port, "/plain-strict/").status == 503
    assert http_request(mesh["client"].port, "/strict/").status == 200
    assert b"200 OK" in _tls_get(mesh["strict"], pki, "client").split(b"\r\n")[0]


def test_a_client_without_a_certificate_or_from_another_ca_is_refused(
    mesh: dict[str, Any], pki: dict[str, Any]
) -> None:
    for who in (None, "stranger"):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            out = _tls_get(mesh["strict"], pki, who)
            if not out:  # TLS 1.3: the refusal can arrive after the handshake returned
                raise ConnectionError("closed")


def test_a_server_with_the_wrong_san_is_refused(mesh: dict[str, Any]) -> None:
    r = http_request(mesh["client"].port, "/wrong-san/")
    assert r.status == 503
    assert b"upstream connect error" in r.body or r.body
    _, text = mesh["client"].admin_get("/stats/prometheus")
    flagged = [
        ln
        for ln in text.splitlines()
        if ln.startswith("istio_requests_total{") and 'response_code="503"' in ln
    ]
    assert flagged and 'response_flags="UF' in flagged[0]


def test_curl_over_tls_against_a_tls_listener(mesh: dict[str, Any], pki: dict[str, Any]) -> None:
    port = mesh["simple"]
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--cacert",
            str(pki["dir"] / "ca.pem"),
            "--resolve",
            f"server.test:{port}:127.0.0.1",
            f"https://server.test:{port}/headers",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    seen = json.loads(out.stdout)
    assert seen["x-forwarded-proto"] == "https"
    assert "x-forwarded-client-cert" not in seen  # TLS without a client certificate
