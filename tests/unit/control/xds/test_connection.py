"""One ADS stream's state machine as conversations: requests in, verdicts and responses out."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, struct_pb2
from google.rpc import status_pb2

from meshlet.control.xds.connection import (
    Connection,
    Limits,
    Pacer,
    RequestError,
    SyncState,
    Verdict,
)
from meshlet.control.xds.generator import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    GeneratedResources,
    ProxyInfo,
)
from meshlet.control.xds.push import PushRequest

TYPES = [LISTENER_TYPE, ROUTE_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE]
NODE_ID = "sidecar~10.0.0.7~reviews-v1-abc.default~default.svc.cluster.local"


def request(
    type_url: str,
    names: Sequence[str] = (),
    *,
    nonce: str = "",
    version: str = "",
    error: str | None = None,
    node: bool = False,
) -> discovery_pb2.DiscoveryRequest:
    req = discovery_pb2.DiscoveryRequest(
        type_url=type_url, resource_names=list(names), response_nonce=nonce, version_info=version
    )
    if node:
        req.node.CopyFrom(base_pb2.Node(id=NODE_ID, cluster="reviews.default"))
    if error is not None:
        req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return req


def clusters(version: str, *names: str) -> GeneratedResources:
    resources = {}
    for name in names:
        packed = any_pb2.Any()
        packed.Pack(cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS))
        resources[name] = packed
    return GeneratedResources(version=version, resources=resources)


def listeners(version: str, *names: str) -> GeneratedResources:
    resources = {}
    for name in names:
        packed = any_pb2.Any()
        packed.Pack(listener_pb2.Listener(name=name))
        resources[name] = packed
    return GeneratedResources(version=version, resources=resources)


def connected() -> Connection:
    conn = Connection(7, types=TYPES, nonce_prefix="n")
    conn.receive(request(CLUSTER_TYPE, node=True))
    return conn


def names_in(response: discovery_pb2.DiscoveryResponse) -> list[str]:
    return [cluster_pb2.Cluster.FromString(r.value).name for r in response.resources]


# -- the first request ------------------------------------------------------------------------


def test_the_first_request_must_name_the_node() -> None:
    conn = Connection(1, types=TYPES)
    with pytest.raises(RequestError) as e:
        conn.receive(request(LISTENER_TYPE))
    assert e.value.code == "INVALID_ARGUMENT"
    assert "node" in e.value.message


def test_the_node_names_the_connection_and_the_proxy() -> None:
    conn = connected()
    assert conn.id == f"{NODE_ID}-7"
    assert conn.proxy is not None
    assert (conn.proxy.kind, conn.proxy.ip, conn.proxy.pod, conn.proxy.namespace) == (
        "sidecar",
        "10.0.0.7",
        "reviews-v1-abc",
        "default",
    )
    assert conn.proxy.cluster == "reviews.default"


def test_node_metadata_is_read_as_istio_writes_it() -> None:
    metadata = struct_pb2.Struct()
    metadata.update(
        {
            "NAMESPACE": "bookinfo",
            "SERVICE_ACCOUNT": "bookinfo-reviews",
            "WORKLOAD_NAME": "reviews-v1",
            "LABELS": {"app": "reviews", "version": "v1"},
            "INSTANCE_IPS": "10.0.0.7,fd00::7",
        }
    )
    node = base_pb2.Node(id="router~10.0.0.9~gw-1.x~x.svc.cluster.local", metadata=metadata)
    proxy = ProxyInfo.from_node(node)
    assert proxy.kind == "router"
    assert proxy.namespace == "bookinfo"  # metadata wins over the id
    assert proxy.service_account == "bookinfo-reviews"
    assert proxy.workload_name == "reviews-v1"
    assert proxy.labels == {"app": "reviews", "version": "v1"}
    assert proxy.instance_ips == ("10.0.0.7", "fd00::7")
    assert proxy.dns_domain == "x.svc.cluster.local"


def test_an_id_not_in_istio_form_is_accepted_with_empty_parts() -> None:
    proxy = ProxyInfo.parse_id("greeter-client")
    assert (proxy.id, proxy.kind, proxy.namespace, proxy.ip) == ("greeter-client", "", "", "")


def test_a_type_nobody_serves_is_ignored() -> None:
    conn = connected()
    received = conn.receive(request("type.googleapis.com/envoy.service.runtime.v3.Runtime"))
    assert received.verdict is Verdict.UNKNOWN
    assert not received.respond


def test_a_request_without_type_url_ends_the_stream() -> None:
    conn = connected()
    with pytest.raises(RequestError):
        conn.receive(request(""))


def test_an_absurd_list_of_names_ends_the_stream() -> None:
    conn = Connection(1, types=TYPES, limits=Limits(max_resource_names=100))
    with pytest.raises(RequestError) as e:
        conn.receive(request(ENDPOINT_TYPE, [f"c{i}" for i in range(101)], node=True))
    assert e.value.code == "RESOURCE_EXHAUSTED"


# -- wildcards and subscriptions --------------------------------------------------------------


def test_an_empty_first_lds_or_cds_request_is_a_wildcard_and_stays_one_while_empty() -> None:
    conn = connected()
    assert conn.names_for(CLUSTER_TYPE) is None
    assert conn.requested == {CLUSTER_TYPE}
    response = conn.build_response(CLUSTER_TYPE, clusters("1", "a", "b"), requested=True)
    conn.requested.clear()
    received = conn.receive(request(CLUSTER_TYPE, nonce=response.nonce, version="1"))
    assert received.verdict is Verdict.ACK
    assert not received.respond
    assert conn.names_for(CLUSTER_TYPE) is None


def test_a_later_empty_list_on_a_named_subscription_unsubscribes() -> None:
    conn = connected()
    conn.receive(request(LISTENER_TYPE, ["greeter:7070"]))
    response = conn.build_response(LISTENER_TYPE, listeners("1", "greeter:7070"), requested=True)
    received = conn.receive(request(LISTENER_TYPE, [], nonce=response.nonce, version="1"))
    assert received.verdict is Verdict.ACK
    assert not received.respond
    assert conn.names_for(LISTENER_TYPE) == []
    assert LISTENER_TYPE not in conn.subscribed_types()


def test_an_empty_first_rds_or_eds_request_subscribes_to_nothing() -> None:
    conn = connected()
    received = conn.receive(request(ENDPOINT_TYPE))
    assert (received.verdict, received.respond) == (Verdict.NEW, False)
    assert conn.names_for(ENDPOINT_TYPE) == []


def test_added_names_are_answered_and_removed_ones_are_not() -> None:
    conn = connected()
    conn.receive(request(ENDPOINT_TYPE, ["a"]))
    sent = conn.build_response(ENDPOINT_TYPE, clusters("1", "a"), requested=True)
    added = conn.receive(request(ENDPOINT_TYPE, ["a", "b"], nonce=sent.nonce, version="1"))
    assert (added.verdict, added.respond) == (Verdict.ACK, True)
    sent = conn.build_response(ENDPOINT_TYPE, clusters("1", "a", "b"), requested=True)
    removed = conn.receive(request(ENDPOINT_TYPE, ["b"], nonce=sent.nonce, version="1"))
    assert (removed.verdict, removed.respond) == (Verdict.ACK, False)
    assert conn.names_for(ENDPOINT_TYPE) == ["b"]


# -- ACK, NACK, stale -------------------------------------------------------------------------


def test_an_ack_names_the_last_nonce_and_the_version_sent() -> None:
    conn = connected()
    sent = conn.build_response(CLUSTER_TYPE, clusters("v1", "a"), requested=True)
    assert conn.sync_status().types["cds"].state is SyncState.STALE
    conn.receive(request(CLUSTER_TYPE, nonce=sent.nonce, version="v1"))
    status = conn.sync_status().types["cds"]
    assert (status.state, status.sent_version, status.acked_version) == (
        SyncState.SYNCED,
        "v1",
        "v1",
    )


def test_a_nack_is_recorded_with_its_message_and_nothing_is_sent_in_reply() -> None:
    conn = connected()
    v1 = conn.build_response(CLUSTER_TYPE, clusters("v1", "a"), requested=True)
    conn.receive(request(CLUSTER_TYPE, nonce=v1.nonce, version="v1"))
    v2 = conn.build_response(CLUSTER_TYPE, clusters("v2", "a", "bad"), requested=False)
    conn.requested.clear()
    received = conn.receive(
        request(CLUSTER_TYPE, nonce=v2.nonce, version="v1", error="cluster bad: not EDS")
    )
    assert received.verdict is Verdict.NACK
    assert not received.respond
    assert conn.requested == set()
    status = conn.sync_status().types["cds"]
    assert status.state is SyncState.NACKED
    assert status.last_nack is not None
    assert (status.last_nack.version, status.last_nack.kept_version) == ("v2", "v1")
    assert status.last_nack.message == "cluster bad: not EDS"

    # The next push is sent and, once ACKed, the proxy is in sync; the NACK stays for history.
    v3 = conn.build_response(CLUSTER_TYPE, clusters("v3", "a"), requested=False)
    assert v3 is not None
    conn.receive(request(CLUSTER_TYPE, nonce=v3.nonce, version="v3"))
    status = conn.sync_status().types["cds"]
    assert status.state is SyncState.SYNCED
    assert status.last_nack is not None


def test_after_a_nack_a_request_with_the_old_version_is_not_an_ack() -> None:
    conn = connected()
    conn.receive(request(ENDPOINT_TYPE, ["a"]))
    v1 = conn.build_response(ENDPOINT_TYPE, clusters("v1", "a"), requested=True)
    conn.receive(request(ENDPOINT_TYPE, ["a"], nonce=v1.nonce, version="v1"))
    v2 = conn.build_response(ENDPOINT_TYPE, clusters("v2", "a", "b"), requested=True)
    conn.receive(request(ENDPOINT_TYPE, ["a"], nonce=v2.nonce, version="v1", error="no"))
    again = conn.receive(request(ENDPOINT_TYPE, ["a", "c"], nonce=v2.nonce, version="v1"))
    assert (again.verdict, again.respond) == (Verdict.UPDATE, True)
    assert conn.sync_status().types["eds"].state is SyncState.NACKED


def test_a_request_answering_a_superseded_response_is_ignored() -> None:
    conn = connected()
    v1 = conn.build_response(CLUSTER_TYPE, clusters("v1", "a"), requested=True)
    conn.build_response(CLUSTER_TYPE, clusters("v2", "a", "b"), requested=False)
    conn.requested.clear()
    stale = conn.receive(request(CLUSTER_TYPE, ["x"], nonce=v1.nonce, version="v1"))
    assert (stale.verdict, stale.respond) == (Verdict.STALE, False)
    assert conn.names_for(CLUSTER_TYPE) is None
    assert conn.sync_status().types["cds"].acked_version == ""


# -- responses --------------------------------------------------------------------------------


def test_a_push_of_what_the_proxy_already_has_sends_nothing_but_a_request_is_answered() -> None:
    conn = connected()
    assert conn.build_response(CLUSTER_TYPE, clusters("1", "a"), requested=True) is not None
    assert conn.build_response(CLUSTER_TYPE, clusters("2", "a"), requested=False) is None
    assert conn.build_response(CLUSTER_TYPE, clusters("2", "a"), requested=True) is not None
    assert conn.build_response(CLUSTER_TYPE, clusters("3", "a", "b"), requested=False) is not None


def test_responses_carry_only_subscribed_resources_sorted_by_name() -> None:
    conn = connected()
    conn.receive(request(ENDPOINT_TYPE, ["b", "a"]))
    generated = clusters("1", "c", "b", "a")
    response = conn.build_response(ENDPOINT_TYPE, generated, requested=True)
    assert names_in(response) == ["a", "b"]
    assert response.type_url == ENDPOINT_TYPE
    assert response.control_plane.identifier == "meshlet"


def test_each_type_has_its_own_version_and_nonces_never_repeat() -> None:
    conn = connected()
    conn.receive(request(LISTENER_TYPE))
    cds = conn.build_response(CLUSTER_TYPE, clusters("c1", "a"), requested=True)
    lds = conn.build_response(LISTENER_TYPE, listeners("l1", "x"), requested=True)
    assert (cds.version_info, lds.version_info) == ("c1", "l1")
    assert cds.nonce != lds.nonce
    assert cds.nonce.startswith("n")


def test_without_a_version_from_the_generator_the_content_is_the_version() -> None:
    conn = connected()
    one = conn.build_response(CLUSTER_TYPE, clusters("", "a"), requested=True)
    same = conn.build_response(CLUSTER_TYPE, clusters("", "a"), requested=True)
    other = conn.build_response(CLUSTER_TYPE, clusters("", "a", "b"), requested=True)
    assert one.version_info == same.version_info != other.version_info
    assert one.version_info


def test_work_comes_in_push_order_with_endpoints_only_pushes_limited_to_eds() -> None:
    conn = connected()
    for type_url in (ROUTE_TYPE, ENDPOINT_TYPE):
        conn.receive(request(type_url, ["x"]))
    conn.receive(request(LISTENER_TYPE))
    work = conn.take_work()
    assert list(work.types) == [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE]
    assert work.requested == set(TYPES)
    assert conn.take_work().types == []

    conn.enqueue_push(PushRequest.endpoints())
    work = conn.take_work()
    assert (list(work.types), work.requested) == ([ENDPOINT_TYPE], frozenset())
    assert work.push is not None and not work.push.full


# -- pacing -----------------------------------------------------------------------------------


def test_the_pacer_allows_a_burst_then_paces_rounds_at_its_rate() -> None:
    pacer = Pacer(burst=3, per_second=10.0, now=0.0)
    for _ in range(3):
        assert pacer.delay(0.0) == 0.0
        pacer.spend(0.0)
    assert pacer.delay(0.0) == pytest.approx(0.1)
    assert pacer.delay(0.05) == pytest.approx(0.05)
    assert pacer.delay(0.1) == 0.0
    pacer.spend(0.1)
    assert pacer.delay(0.1) == pytest.approx(0.1)
    assert pacer.delay(100.0) == 0.0  # refills, but only up to the burst
    for _ in range(3):
        pacer.spend(100.0)
    assert pacer.delay(100.0) > 0
