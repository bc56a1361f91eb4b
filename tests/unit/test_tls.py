"""TLS: compiling transport sockets, secrets, filter chain choice, ClientHello inspection,
XFCC, and certificate rotation on a live listener (in-process, loopback)."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import pytest
import uvloop
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf import json_format

import meshlet.proxy.bootstrap  # noqa: F401  (registers the typed_config messages)
from meshlet.errors import ConfigError
from meshlet.proxy.config import compile_bootstrap
from meshlet.proxy.headers import Headers
from meshlet.proxy.http1 import _forward_client_cert
from meshlet.proxy.listener import HcmConfig, compile_listener
from meshlet.proxy.secrets import SecretStore, TlsCertificate, ValidationContext, compile_secret
from meshlet.proxy.stream_info import DownstreamTls
from meshlet.proxy.tls import (
    NEED_MORE,
    ClientHello,
    TlsContexts,
    cert_sans,
    compile_transport_socket,
    inspect,
)
from meshlet.proxy.worker import Worker
from tests.integration.test_tls import (
    CLIENT_ID,
    SERVER_ID,
    TLS_DOWN,
    TLS_UP,
    _ca,
    workload_cert,
)

HCM = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


@pytest.fixture(scope="module")
def pki() -> dict[str, Any]:
    from cryptography.hazmat.primitives import serialization

    root = _ca("unit root")
    return {
        "ca": root[0].public_bytes(serialization.Encoding.PEM).decode(),
        "a": workload_cert(root, SERVER_ID, "a.test"),
        "b": workload_cert(root, SERVER_ID, "b.test"),
        "client": workload_cert(root, CLIENT_ID),
    }


def _socket(config: dict[str, Any], *, upstream: bool = False) -> base_pb2.TransportSocket:
    proto = base_pb2.TransportSocket()
    json_format.ParseDict(
        {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {"@type": TLS_UP if upstream else TLS_DOWN, **config},
        },
        proto,
    )
    return proto


def _sds(name: str) -> dict[str, Any]:
    return {"name": name, "sds_config": {"ads": {}}}


# -- compiling ------------------------------------------------------------------------------


def test_an_istio_downstream_context_compiles_and_drops_h2_from_alpn() -> None:
    config = compile_transport_socket(
        _socket(
            {
                "common_tls_context": {
                    "tls_certificate_sds_secret_configs": [_sds("default")],
                    "combined_validation_context": {
                        "default_validation_context": {
                            "match_subject_alt_names": [{"prefix": "spiffe://cluster.local/"}]
                        },
                        "validation_context_sds_secret_config": _sds("ROOTCA"),
                    },
                    "alpn_protocols": ["h2", "http/1.1"],
                    "tls_params": {
                        "tls_minimum_protocol_version": "TLSv1_2",
                        "tls_maximum_protocol_version": "TLSv1_3",
                        "cipher_suites": [
                            "[ECDHE-ECDSA-AES128-GCM-SHA256|ECDHE-RSA-AES128-GCM-SHA256]"
                        ],
                    },
                },
                "require_client_certificate": True,
            }
        ),
        "ts",
        upstream=False,
    )
    assert config is not None
    assert config.server_side and config.require_client_certificate
    assert config.alpn == ("http/1.1",)
    assert config.secret_names() == {"default", "ROOTCA"}
    assert config.match_sans[0].kind == "prefix"
    assert config.ciphers == "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256"


def test_raw_buffer_is_plaintext() -> None:
    proto = base_pb2.TransportSocket(name="envoy.transport_sockets.raw_buffer")
    assert compile_transport_socket(proto, "ts", upstream=True) is None


@pytest.mark.parametrize(
    ("config", "path"),
    [
        (
            {
                "common_tls_context": {"tls_certificate_sds_secret_configs": [_sds("d")]},
                "require_sni": True,
            },
            "ts.typed_config.require_sni",
        ),
        (
            {
                "common_tls_context": {
                    "tls_certificate_sds_secret_configs": [_sds("d")],
                    "tls_params": {"ecdh_curves": ["P-256"]},
                }
            },
            "ts.typed_config.common_tls_context.tls_params.ecdh_curves",
        ),
        (
            {
                "common_tls_context": {
                    "tls_certificate_sds_secret_configs": [_sds("d")],
                    "tls_params": {"tls_minimum_protocol_version": "TLSv1_1"},
                }
            },
            "ts.typed_config.common_tls_context.tls_params.tls_minimum_protocol_version",
        ),
        (
            {
                "common_tls_context": {"tls_certificate_sds_secret_configs": [_sds("d")]},
                "require_client_certificate": True,
            },
            "ts.typed_config.require_client_certificate",
        ),
        ({"common_tls_context": {}}, "ts.typed_config.common_tls_context"),
        (
            {
                "common_tls_context": {
                    "tls_certificate_sds_secret_configs": [
                        {"name": "d", "sds_config": {"path_config_source": {"path": "/x"}}}
                    ]
                }
            },
            "ts.typed_config.common_tls_context.tls_certificate_sds_secret_configs[0].sds_config",
        ),
    ],
)
def test_unsupported_or_invalid_fields_are_refused_by_name(
    config: dict[str, Any], path: str
) -> None:
    with pytest.raises(ConfigError) as e:
        compile_transport_socket(_socket(config), "ts", upstream=False)
    assert any(p.path.startswith(path) for p in e.value.problems), e.value.problems


def test_secrets_compile_and_refuse_what_cannot_be_used(pki: dict[str, Any]) -> None:
    proto = secret_pb2.Secret()
    json_format.ParseDict(
        {
            "name": "default",
            "tls_certificate": {"certificate_chain": {"inline_string": pki["a"][0]}},
        },
        proto,
    )
    name, secret = compile_secret(proto, "s")
    assert name == "default" and isinstance(secret, TlsCertificate)
    assert secret.private_key_pem is None
    bad = secret_pb2.Secret()
    json_format.ParseDict(
        {"name": "ROOTCA", "validation_context": {"trusted_ca": {"inline_string": "not pem"}}}, bad
    )
    with pytest.raises(ConfigError, match="trusted_ca"):
        compile_secret(bad, "s")
    generic = secret_pb2.Secret(name="g")
    generic.generic_secret.secret.inline_string = "x"
    with pytest.raises(ConfigError, match="generic_secret"):
        compile_secret(generic, "s")


def test_a_certificate_without_key_is_completed_with_the_local_key(pki: dict[str, Any]) -> None:
    store = SecretStore()
    changed: list[str] = []
    store.subscribe(changed.append)
    store.set("default", TlsCertificate(cert_chain_pem=pki["a"][0].encode()))
    assert store.get("default") == TlsCertificate(cert_chain_pem=pki["a"][0].encode())
    store.local_private_key = pki["a"][1].encode()
    got = store.get("default")
    assert isinstance(got, TlsCertificate) and got.private_key_pem == pki["a"][1].encode()
    store.set("default", TlsCertificate(cert_chain_pem=pki["a"][0].encode()))  # unchanged
    assert changed == ["default", "default"]


def test_contexts_wait_for_their_secrets_and_are_rebuilt_when_one_changes(
    pki: dict[str, Any],
) -> None:
    store = SecretStore()
    contexts = TlsContexts(store)
    config = compile_transport_socket(
        _socket(
            {
                "common_tls_context": {
                    "tls_certificate_sds_secret_configs": [_sds("default")],
                    "validation_context_sds_secret_config": _sds("ROOTCA"),
                }
            },
            upstream=True,
        ),
        "ts",
        upstream=True,
    )
    assert config is not None
    assert contexts.get(config) is None
    store.set("default", TlsCertificate(cert_chain_pem=pki["client"][0].encode()))
    store.set("ROOTCA", ValidationContext(trusted_ca_pem=pki["ca"].encode()))
    assert contexts.get(config) is None  # no key yet
    store.local_private_key = pki["client"][1].encode()
    first = contexts.get(config)
    assert first is not None and first.local_uri_sans == (CLIENT_ID,)
    assert contexts.get(config) is first
    store.set(
        "default",
        TlsCertificate(cert_chain_pem=pki["a"][0].encode(), private_key_pem=pki["a"][1].encode()),
    )
    second = contexts.get(config)
    assert second is not None and second is not first and second.local_uri_sans == (SERVER_ID,)


def test_cert_sans_reads_uri_and_dns_names(pki: dict[str, Any]) -> None:
    der = ssl.PEM_cert_to_DER_cert(pki["a"][0])
    assert cert_sans(der) == (("URI", SERVER_ID), ("DNS", "a.test"))
    assert cert_sans(b"\x30\x03garbage") == ()


# -- listener side --------------------------------------------------------------------------


def _client_hello(sni: str, alpn: list[str]) -> bytes:
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_inspect_tells_tls_from_plaintext_and_reads_sni_and_alpn() -> None:
    hello = _client_hello("reviews.default.svc", ["istio-http/1.1", "http/1.1"])
    assert inspect(hello) == ClientHello("reviews.default.svc", ("istio-http/1.1", "http/1.1"))
    assert inspect(hello[:3]) is NEED_MORE
    assert inspect(hello[:40]) is NEED_MORE
    assert inspect(b"") is NEED_MORE
    assert inspect(b"GET / HTTP/1.1\r\n") is None
    assert inspect(b"\x16\x01") is None  # not TLS 1.x record version


def _listener(chains: list[dict[str, Any]], inspector: bool = True) -> listener_pb2.Listener:
    hcm = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": HCM,
            "stat_prefix": "x",
            "route_config": {},
            "http_filters": [
                {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}
            ],
        },
    }
    proto = listener_pb2.Listener()
    json_format.ParseDict(
        {
            "name": "l",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
            "listener_filters": [{"name": "envoy.filters.listener.tls_inspector"}]
            if inspector
            else [],
            "filter_chains": [{**c, "filters": [hcm]} for c in chains],
        },
        proto,
    )
    return proto


def test_filter_chain_match_picks_as_envoy_does() -> None:
    tls_socket = {
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": TLS_DOWN,
                "common_tls_context": {"tls_certificate_sds_secret_configs": [_sds("default")]},
            },
        }
    }
    lc = compile_listener(
        _listener(
            [
                {"name": "plain", "filter_chain_match": {"transport_protocol": "raw_buffer"}},
                {"name": "tls", "filter_chain_match": {"transport_protocol": "tls"}, **tls_socket},
                {
                    "name": "sni",
                    "filter_chain_match": {
                        "transport_protocol": "tls",
                        "server_names": ["*.example.com"],
                    },
                    **tls_socket,
                },
                {
                    "name": "exact",
                    "filter_chain_match": {"server_names": ["a.example.com"]},
                    **tls_socket,
                },
            ]
        ),
        "l",
    )
    names = [c.name for c in lc.chains]

    def pick(*args: Any) -> str | None:
        index = lc.select_chain(*args)
        return None if index is None else names[index]

    assert pick("raw_buffer", "", ()) == "plain"
    assert pick("tls", "", ()) == "tls"
    assert pick("tls", "b.example.com", ()) == "sni"
    assert pick("tls", "a.example.com", ()) == "exact"
    assert pick("tls", "other.org", ()) == "tls"
    assert lc.secret_names() == {"default"}


def test_matching_on_tls_needs_the_tls_inspector() -> None:
    with pytest.raises(ConfigError, match="tls_inspector"):
        compile_listener(
            _listener([{"filter_chain_match": {"transport_protocol": "tls"}}], inspector=False), "l"
        )


def test_other_listener_filters_are_refused_by_name() -> None:
    proto = _listener([{}])
    proto.listener_filters.add(name="envoy.filters.listener.original_src")
    with pytest.raises(ConfigError, match=r"listener_filters\[1\]"):
        compile_listener(proto, "l")


# -- x-forwarded-client-cert ----------------------------------------------------------------

_PEER = DownstreamTls(
    version="TLSv1.3",
    sni="",
    peer_certificate=b"\x30\x00",
    peer_uri_sans=(CLIENT_ID,),
    peer_dns_sans=("c.test",),
    peer_subject="",
    peer_cert_sha256="ab" * 32,
    local_uri_sans=(SERVER_ID,),
)


def _xfcc(
    mode: str,
    tls: DownstreamTls | None,
    incoming: bytes | None,
    details: tuple[str, ...] = ("uri",),
) -> bytes | None:
    from meshlet.proxy.routing import RouteTable

    hcm = HcmConfig(
        stat_prefix="x",
        route_table=RouteTable.__new__(RouteTable),
        fault_filter=False,
        fault=None,
        access_logs=(),
        forward_client_cert=mode,
        client_cert_details=details,
    )
    headers = Headers([(b"x-forwarded-client-cert", incoming)] if incoming else [])
    special = {b"x-forwarded-client-cert": incoming} if incoming else {}
    _forward_client_cert(headers, special, hcm, tls)
    return headers.joined(b"x-forwarded-client-cert")


def test_xfcc_follows_forward_client_cert_details() -> None:
    element = f"By={SERVER_ID};Hash={'ab' * 32};URI={CLIENT_ID}".encode()
    assert _xfcc("SANITIZE", _PEER, b"By=x") is None
    assert _xfcc("SANITIZE_SET", _PEER, b"By=x") == element
    assert _xfcc("APPEND_FORWARD", _PEER, b"By=x") == b"By=x," + element
    assert _xfcc("APPEND_FORWARD", _PEER, None) == element
    assert _xfcc("FORWARD_ONLY", _PEER, b"By=x") == b"By=x"
    assert _xfcc("SANITIZE_SET", None, b"By=x") is None  # plaintext: removed
    assert _xfcc("ALWAYS_FORWARD_ONLY", None, b"By=x") == b"By=x"
    assert _xfcc("SANITIZE_SET", _PEER, None, ("subject", "uri", "dns")) == (
        f'By={SERVER_ID};Hash={"ab" * 32};Subject="";URI={CLIENT_ID};DNS=c.test'.encode()
    )


# -- rotation on a live listener ------------------------------------------------------------


def _bootstrap(pki: dict[str, Any]) -> Any:
    proto = bootstrap_pb2.Bootstrap()
    json_format.ParseDict(
        {
            "static_resources": {
                "listeners": [
                    {
                        "name": "tls",
                        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                        "filter_chains": [
                            {
                                "transport_socket": {
                                    "name": "envoy.transport_sockets.tls",
                                    "typed_config": {
                                        "@type": TLS_DOWN,
                                        "common_tls_context": {
                                            "tls_certificate_sds_secret_configs": [_sds("default")]
                                        },
                                    },
                                },
                                "filters": [
                                    {
                                        "name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": {
                                            "@type": HCM,
                                            "stat_prefix": "x",
                                            "route_config": {
                                                "virtual_hosts": [
                                                    {
                                                        "name": "all",
                                                        "domains": ["*"],
                                                        "routes": [
                                                            {
                                                                "match": {"prefix": "/"},
                                                                "direct_response": {
                                                                    "status": 200,
                                                                    "body": {"inline_string": "ok"},
                                                                },
                                                            }
                                                        ],
                                                    }
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
                                ],
                            }
                        ],
                    }
                ]
            }
        },
        proto,
    )
    return compile_bootstrap(proto)


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    return head + await reader.readexactly(2)


def test_rotating_the_default_secret_changes_new_connections_only(pki: dict[str, Any]) -> None:
    async def main() -> None:
        store = SecretStore()
        store.local_private_key = pki["a"][1].encode()
        store.set("default", TlsCertificate(cert_chain_pem=pki["a"][0].encode()))
        worker = Worker(_bootstrap(pki), asyncio.get_running_loop(), secrets=store)
        await worker.start()
        rt = worker.listeners["tls"]
        assert rt.server is not None
        port = rt.server.sockets[0].getsockname()[1]
        client = ssl.create_default_context(cadata=pki["ca"])
        client.check_hostname = False

        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            dns = [v for k, v in cert_sans(der) if k == "DNS"]
            return reader, writer, dns[0]

        try:
            r1, w1, name1 = await connect()
            assert name1 == "a.test"
            assert (await _get(r1, w1)).startswith(b"HTTP/1.1 200")
            # Rotation: the identity module sets a new certificate and key.
            store.local_private_key = pki["b"][1].encode()
            store.set("default", TlsCertificate(cert_chain_pem=pki["b"][0].encode()))
            r2, w2, name2 = await connect()
            assert name2 == "b.test"
            assert (await _get(r2, w2)).startswith(b"HTTP/1.1 200")
            # The keep-alive connection made before the rotation still works.
            assert (await _get(r1, w1)).endswith(b"ok")
            for w in (w1, w2):
                w.close()
        finally:
            worker.drain()
            worker.stop()

    uvloop.run(main())


# -- SDS over ADS ---------------------------------------------------------------------------


def test_sds_secrets_are_subscribed_by_name_accepted_and_bad_ones_nacked(
    pki: dict[str, Any],
) -> None:
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.service.discovery.v3 import discovery_pb2

    from meshlet.proxy.secrets import SECRET_TYPE
    from meshlet.proxy.xds_client import CLUSTER_TYPE, AdsTables, build

    base = compile_bootstrap(bootstrap_pb2.Bootstrap())
    cluster = cluster_pb2.Cluster()
    json_format.ParseDict(
        {
            "name": "c",
            "type": "STATIC",
            "transport_socket": {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": TLS_UP,
                    "common_tls_context": {
                        "tls_certificate_sds_secret_configs": [_sds("default")],
                        "validation_context_sds_secret_config": _sds("ROOTCA"),
                    },
                },
            },
        },
        cluster,
    )
    cds = discovery_pb2.DiscoveryResponse(type_url=CLUSTER_TYPE, version_info="1")
    cds.resources.add().Pack(cluster)
    tables, error = AdsTables().accept(cds, base, 0.0)
    assert error is None
    assert tables.secret_names(base) == ["ROOTCA", "default"]

    good = secret_pb2.Secret()
    json_format.ParseDict(
        {
            "name": "default",
            "tls_certificate": {"certificate_chain": {"inline_string": pki["a"][0]}},
        },
        good,
    )
    bad = secret_pb2.Secret()
    json_format.ParseDict(
        {"name": "ROOTCA", "validation_context": {"trusted_ca": {"inline_string": "nope"}}}, bad
    )
    sds = discovery_pb2.DiscoveryResponse(type_url=SECRET_TYPE, version_info="7")
    sds.resources.add().Pack(good)
    sds.resources.add().Pack(bad)
    tables, error = tables.accept(sds, base, 0.0)
    assert error is not None and "secret ROOTCA" in str(error.problems[0].path)
    config = build(tables, base, {}, {}).config
    assert [name for name, _ in config.secrets] == ["default"]
