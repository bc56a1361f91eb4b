"""Istio's peer metadata exchange: header encoding, decoding, the filter's header rules, the
EDS fallback, and the metric labels both sides report from it.

Semantics: istio/proxy ``source/extensions/filters/http/peer_metadata`` (headers
``x-envoy-peer-metadata-id`` and ``x-envoy-peer-metadata`` = base64 of a serialized
``google.protobuf.Struct`` of node metadata) and ``extensions/common/metadata_object.cc``
(``convertEndpointMetadata``: ``<workload>;<namespace>;<canonical service>;<revision>;<cluster>``);
the labels are Istio's standard metrics (https://istio.io/latest/docs/reference/config/metrics/).
"""

from __future__ import annotations

import base64

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import json_format, struct_pb2
from hypothesis import given
from hypothesis import strategies as st
from xds.type.v3 import typed_struct_pb2

from meshlet.errors import ConfigError
from meshlet.proxy.filters import metadata_exchange as mx
from meshlet.proxy.headers import Headers, RequestHead
from meshlet.proxy.listener import compile_hcm, compile_listener
from meshlet.proxy.stream_info import DownstreamTls, StreamInfo
from meshlet.proxy.telemetry.stats import ISTIO_LABELS, IstioMetrics, NodeInfo
from meshlet.proxy.upstream.cluster import _host, compile_cla

ID = "sidecar~127.1.9.20~client-ccc-1.default~default.svc.cluster.local"


def node(**labels: str) -> base_pb2.Node:
    n = base_pb2.Node(id=ID, cluster="client.default")
    json_format.ParseDict(
        {
            "NAMESPACE": "default",
            "WORKLOAD_NAME": "client",
            "POD_NAME": "client-ccc-1",
            "SERVICE_ACCOUNT": "client",
            "CLUSTER_ID": "Kubernetes",
            "MESH_ID": "cluster.local",
            "INSTANCE_IPS": "127.1.9.20",
            "LABELS": labels or {"app": "client", "version": "v3"},
            "CA_TOKEN_PATH": "/secret/not/exchanged",
        },
        n.metadata,
    )
    return n


def info_for(headers: list[tuple[bytes, bytes]] | None = None) -> StreamInfo:
    info = StreamInfo(start=1.0, start_wall=1.8e9, downstream_remote="a:1", downstream_local="b:2")
    info.request = RequestHead(
        method=b"GET", path=b"/", authority=b"web", headers=Headers(list(headers or []))
    )
    info.end = 1.01
    info.response_code = 200
    return info


# -- encoding and decoding ---------------------------------------------------------------------


def test_local_headers_are_the_node_id_and_base64_of_a_struct_of_istio_node_metadata():
    (id_name, id_value), (md_name, md_value) = mx.local_headers(node())
    assert (id_name, id_value) == (b"x-envoy-peer-metadata-id", ID.encode())
    assert md_name == b"x-envoy-peer-metadata"
    struct = struct_pb2.Struct.FromString(base64.b64decode(md_value))
    decoded = json_format.MessageToDict(struct)
    assert decoded["WORKLOAD_NAME"] == "client"
    assert decoded["NAME"] == "client-ccc-1"  # Istio's NAME is the pod
    assert decoded["LABELS"] == {"app": "client", "version": "v3"}
    # Only the exchanged keys travel: nothing else of the node's metadata leaks.
    assert set(decoded) == {
        "NAME",
        "NAMESPACE",
        "WORKLOAD_NAME",
        "LABELS",
        "SERVICE_ACCOUNT",
        "CLUSTER_ID",
        "MESH_ID",
        "INSTANCE_IPS",
    }


def test_a_peer_round_trips_through_the_header():
    _, (_, value) = mx.local_headers(node())
    peer = mx.decode_peer(value, ID.encode())
    assert peer is not None
    assert (peer.id, peer.workload, peer.namespace, peer.app, peer.version) == (
        ID,
        "client",
        "default",
        "client",
        "v3",
    )
    assert (peer.canonical_service, peer.canonical_revision, peer.cluster_id) == (
        "client",
        "v3",
        "Kubernetes",
    )


def test_canonical_labels_win_over_app_and_version():
    labels = {
        "app": "a",
        "version": "v1",
        "service.istio.io/canonical-name": "svc",
        "service.istio.io/canonical-revision": "r9",
    }
    _, (_, value) = mx.local_headers(node(**labels))
    peer = mx.decode_peer(value)
    assert peer is not None
    assert (peer.canonical_service, peer.canonical_revision) == ("svc", "r9")
    assert (peer.app, peer.version) == ("a", "v1")


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"not base64 at all!",
        base64.b64encode(b"\xff\xff\xff\xff"),  # base64, but no Struct
        base64.b64encode(b"x" * 10000),  # too long to be a node's metadata
    ],
)
def test_a_garbage_header_is_ignored(value):
    assert mx.decode_peer(value) is None
    assert mx.PeerCache().get(value) is None


@given(st.binary(max_size=300))
def test_decoding_never_raises(value):
    peer = mx.decode_peer(value)
    assert peer is None or isinstance(peer, mx.Peer)


def test_the_cache_decodes_a_value_once_and_stays_bounded():
    cache = mx.PeerCache(size=4)
    _, (_, value) = mx.local_headers(node())
    first = cache.get(value)
    assert first is not None and cache.get(value) is first
    for i in range(10):  # values a client invents: at most `size` kept
        cache.get(base64.b64encode(b"junk%d" % i))
    assert len(cache._peers) <= 4
    assert cache.get(value) is first  # interned by content: still the same peer object


def test_endpoint_metadata_gives_the_workload_without_app_and_version():
    peer = mx.endpoint_peer("reviews-v2;default;reviews;v2;Kubernetes")
    assert peer is not None
    assert (peer.workload, peer.namespace, peer.canonical_service) == (
        "reviews-v2",
        "default",
        "reviews",
    )
    assert (peer.canonical_revision, peer.cluster_id) == ("v2", "Kubernetes")
    assert (peer.app, peer.version) == ("unknown", "unknown")  # Istio's fallback has neither
    # istiod leaves the revision out when it is "latest".
    latest = mx.endpoint_peer("ratings-v1;default;ratings;;Kubernetes")
    assert latest is not None and latest.canonical_revision == "latest"
    assert mx.endpoint_peer("too;few") is None
    assert mx.endpoint_peer("reviews-v2;default;reviews;v2;Kubernetes") is peer


def test_eds_metadata_reaches_the_host():
    cla = json_format.ParseDict(
        {
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "10.0.0.1", "port_value": 80}
                                }
                            },
                            "metadata": {
                                "filter_metadata": {
                                    "istio": {"workload": "web-v1;default;web;v1;Kubernetes"}
                                }
                            },
                        }
                    ]
                }
            ]
        },
        endpoint_pb2.ClusterLoadAssignment(),
    )
    (ep,) = compile_cla(cla, "cla")
    assert ep.istio_workload == "web-v1;default;web;v1;Kubernetes"
    host = _host(ep, ep.address)
    assert host.peer is mx.endpoint_peer(ep.istio_workload)


# -- the filter's header rules -----------------------------------------------------------------

LOCAL = mx.local_headers(node())


def test_inbound_reads_and_removes_the_source_peer_from_the_request():
    _, (_, value) = mx.local_headers(node(app="web", version="v1"))
    headers = Headers([(b"accept", b"*/*"), (mx.PEER_METADATA_ID, b"x"), (mx.PEER_METADATA, value)])
    special = {mx.PEER_METADATA_ID: b"x", mx.PEER_METADATA: value}
    info = info_for()
    mx.on_request(headers, special, info, inbound=True, local=LOCAL)
    assert headers.items == [(b"accept", b"*/*")]  # the app never sees them
    assert info.downstream_peer is not None and info.downstream_peer.app == "web"


def test_inbound_ignores_a_garbage_header_and_still_removes_it():
    headers = Headers([(mx.PEER_METADATA, b"%%%")])
    info = info_for()
    mx.on_request(headers, {mx.PEER_METADATA: b"%%%"}, info, inbound=True, local=LOCAL)
    assert headers.items == [] and info.downstream_peer is None


def test_outbound_replaces_what_the_client_sent_with_the_local_node():
    headers = Headers([(mx.PEER_METADATA, b"forged"), (b"accept", b"*/*")])
    info = info_for()
    mx.on_request(headers, {mx.PEER_METADATA: b"forged"}, info, inbound=False, local=LOCAL)
    assert headers.items == [(b"accept", b"*/*"), *LOCAL]


def test_outbound_takes_the_destination_peer_from_the_response():
    _, (_, value) = mx.local_headers(node(app="web", version="v1"))
    out = Headers()
    info = info_for()
    mx.on_response(out, value, info, inbound=False, local=LOCAL)
    assert out.items == [] and info.upstream_peer is not None
    assert info.upstream_peer.app == "web"


def test_inbound_adds_the_local_node_to_the_response():
    out = Headers([(b"content-length", b"0")])
    mx.on_response(out, None, info_for(), inbound=True, local=LOCAL)
    assert out.items == [(b"content-length", b"0"), *LOCAL]


# -- configuration -----------------------------------------------------------------------------


def typed_struct(type_url: str, value: dict[str, object] | None = None) -> hcm_pb2.HttpFilter:
    ts = typed_struct_pb2.TypedStruct(type_url=type_url)
    json_format.ParseDict(value or {}, ts.value)
    hf = hcm_pb2.HttpFilter(name="istio.x")
    hf.typed_config.Pack(ts)
    return hf


def hcm(*filters: hcm_pb2.HttpFilter) -> hcm_pb2.HttpConnectionManager:
    proto = hcm_pb2.HttpConnectionManager(stat_prefix="x")
    proto.route_config.SetInParent()
    for f in filters:
        proto.http_filters.append(f)
    router = proto.http_filters.add(name="envoy.filters.http.router")
    router.typed_config.Pack(router_pb2.Router())
    return proto


def test_the_filter_is_accepted_whatever_its_config_holds():
    config = compile_hcm(hcm(typed_struct(mx.PEER_METADATA_CONFIG_TYPE, {"any": [1]})), "h", "l")
    assert config.metadata_exchange
    assert not compile_hcm(hcm(), "h", "l").metadata_exchange


def test_an_unknown_typed_struct_is_refused_by_name():
    with pytest.raises(ConfigError) as e:
        compile_hcm(hcm(typed_struct("type.googleapis.com/io.istio.other")), "h", "l")
    assert "h.http_filters[0].typed_config.type_url" in str(e.value)
    assert "io.istio.other" in str(e.value)


def test_the_filter_may_come_before_jwt_authn_as_istio_orders_it():
    from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2

    proto = hcm(typed_struct(mx.PEER_METADATA_CONFIG_TYPE))
    jwt = hcm_pb2.HttpFilter(name="envoy.filters.http.jwt_authn")
    jwt.typed_config.Pack(config_pb2.JwtAuthentication())
    proto.http_filters.insert(1, jwt)
    assert compile_hcm(proto, "h", "l").metadata_exchange


def test_a_listener_with_the_filter_compiles():
    listener = listener_pb2.Listener(name="l")
    listener.address.socket_address.address = "127.0.0.1"
    chain = listener.filter_chains.add()
    f = chain.filters.add(name="envoy.filters.network.http_connection_manager")
    f.typed_config.Pack(hcm(typed_struct(mx.PEER_METADATA_CONFIG_TYPE)))
    assert compile_listener(listener, "l").hcm.metadata_exchange


# -- labels from the peers ---------------------------------------------------------------------

SERVER = NodeInfo(
    id="sidecar~127.1.9.10~web-v1-aaa-1.default~default.svc.cluster.local",
    workload="web-v1",
    namespace="default",
    app="web",
    version="v1",
    canonical_service="web",
    canonical_revision="v1",
    principal="spiffe://cluster.local/ns/default/sa/web",
    cluster_id="Kubernetes",
)
CLIENT_PEER = mx.decode_peer(mx.local_headers(node())[1][1], ID.encode())


def labels(metrics: IstioMetrics) -> dict[str, str]:
    (item,) = metrics.snapshot()
    return dict(zip(ISTIO_LABELS, item["labels"], strict=True))


def test_destination_reporter_names_the_source_from_the_downstream_peer():
    metrics = IstioMetrics(SERVER)
    info = info_for()
    info.downstream_peer = CLIENT_PEER
    info.downstream_tls = DownstreamTls(
        version="TLSv1.3",
        sni="",
        peer_certificate=b"der",
        peer_uri_sans=("spiffe://cluster.local/ns/default/sa/client",),
        peer_dns_sans=(),
        peer_subject="",
        peer_cert_sha256="",
        local_uri_sans=(),
    )
    metrics.record(
        info,
        reporter="destination",
        destination_service="web.default.svc.cluster.local",
        destination_cluster="",
    )
    got = labels(metrics)
    assert {k: v for k, v in got.items() if k.startswith("source_")} == {
        "source_workload": "client",
        "source_canonical_service": "client",
        "source_canonical_revision": "v3",
        "source_workload_namespace": "default",
        "source_principal": "spiffe://cluster.local/ns/default/sa/client",
        "source_app": "client",
        "source_version": "v3",
        "source_cluster": "Kubernetes",
    }
    assert got["destination_workload"] == "web-v1" and got["destination_app"] == "web"
    assert got["destination_principal"] == "spiffe://cluster.local/ns/default/sa/web"
    assert got["connection_security_policy"] == "mutual_tls"


def test_source_reporter_names_the_destination_from_the_upstream_peer():
    client = NodeInfo(
        workload="client",
        namespace="default",
        app="client",
        version="v3",
        canonical_service="client",
        canonical_revision="v3",
        cluster_id="Kubernetes",
    )
    metrics = IstioMetrics(client)
    info = info_for()
    info.upstream_peer = mx.decode_peer(mx.local_headers(node(app="web", version="v1"))[1][1])
    metrics.record(
        info,
        reporter="source",
        destination_service="web.default.svc.cluster.local",
        destination_cluster="",
    )
    got = labels(metrics)
    assert (got["source_workload"], got["source_app"], got["source_version"]) == (
        "client",
        "client",
        "v3",
    )
    assert got["destination_workload"] == "client"  # node() says WORKLOAD_NAME client
    assert (got["destination_app"], got["destination_version"]) == ("web", "v1")
    assert got["destination_canonical_service"] == "web"
    assert got["destination_cluster"] == "Kubernetes"
    assert got["destination_service_name"] == "web"


def test_grpc_requests_report_protocol_and_grpc_status():
    metrics = IstioMetrics(SERVER)
    info = info_for()
    info.grpc = True
    info.response_headers = Headers([(b"grpc-status", b"14")])
    metrics.record(info, reporter="destination", destination_service="web", destination_cluster="")
    got = labels(metrics)
    assert (got["request_protocol"], got["grpc_response_status"]) == ("grpc", "14")


def test_one_series_per_peer():
    metrics = IstioMetrics(SERVER)
    a = mx.endpoint_peer("a;default;a;v1;Kubernetes")
    b = mx.endpoint_peer("b;default;b;v1;Kubernetes")
    for peer in (a, b, a):
        info = info_for()
        info.downstream_peer = peer
        metrics.record(
            info, reporter="destination", destination_service="web", destination_cluster=""
        )
    counts = {item["labels"][1]: item["requests"] for item in metrics.snapshot()}
    assert counts == {"a": 2, "b": 1}


def test_a_clusters_istio_metadata_names_its_service():
    from envoy.config.cluster.v3 import cluster_pb2

    from meshlet.proxy.upstream.cluster import compile_cluster

    proto = json_format.ParseDict(
        {
            "name": "inbound|8080||",
            "type": "STATIC",
            "metadata": {
                "filter_metadata": {
                    "istio": {
                        "services": [
                            {
                                "host": "web.default.svc.cluster.local",
                                "name": "web",
                                "namespace": "default",
                            }
                        ]
                    },
                    "other": {"x": 1},
                }
            },
        },
        cluster_pb2.Cluster(),
    )
    assert compile_cluster(proto, "c").istio_service == "web.default.svc.cluster.local"
    proto.metadata.typed_filter_metadata["x"].Pack(struct_pb2.Struct())
    with pytest.raises(ConfigError, match=r"c\.metadata\.typed_filter_metadata"):
        compile_cluster(proto, "c")
