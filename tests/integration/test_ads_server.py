"""The ADS server over real gRPC: a grpc.aio server on loopback, real grpcio client streams.

The generators here are hand-written tables, so these tests prove the protocol (wildcards,
ACK, NACK, nonces, push order, debounced and scoped pushes, bad streams) independently of
translation. The last test points grpcio's own proxyless xDS client at the server.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2, message, wrappers_pb2
from google.rpc import status_pb2

from meshlet.control.xds import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    AdsServer,
    ConfigKey,
    GeneratedResources,
    ProxyInfo,
    PushQueue,
    PushRequest,
    SyncState,
    XdsServerError,
)

pytestmark = pytest.mark.timeout(60)

NODE = "sidecar~127.0.0.1~app-1.default~default.svc.cluster.local"
OTHER_NODE = "sidecar~127.0.0.2~app-2.other~other.svc.cluster.local"


def pack(msg: message.Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(msg)
    return packed


class Tables:
    """Generators from mutable tables: ``tables[type_url][name] = proto``; one version."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[str, message.Message]] = {
            t: {} for t in (LISTENER_TYPE, ROUTE_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE)
        }
        self.version = 1
        self.calls: list[tuple[str, str, list[str] | None]] = []
        self.fail: set[str] = set()

    def generate(
        self, proxy: ProxyInfo, type_url: str, names: Sequence[str] | None
    ) -> GeneratedResources:
        self.calls.append((proxy.id, type_url, None if names is None else list(names)))
        if type_url in self.fail:
            raise RuntimeError("generator broke")
        table = self.tables[type_url]
        wanted = table if names is None else [n for n in names if n in table]
        return GeneratedResources(
            version=str(self.version), resources={n: pack(table[n]) for n in wanted}
        )

    def generators(self) -> dict[str, Any]:
        return dict.fromkeys(self.tables, self)


class NamespaceScope:
    """Changes reach the proxies of their own namespace only."""

    def prepare_push(self, request: PushRequest) -> None:
        return None

    def affects(self, proxy: ProxyInfo, request: PushRequest) -> bool:
        return any(key.namespace == proxy.namespace for key in request.affected or ())


def cla(name: str, port: int) -> endpoint_pb2.ClusterLoadAssignment:
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                # grpcio NACKs a CLA whose LocalityLbEndpoints has no locality (even an empty
                # one), and drops one without load_balancing_weight.
                locality=base_pb2.Locality(),
                load_balancing_weight=wrappers_pb2.UInt32Value(value=1),
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(
                            address=address_pb2.Address(
                                socket_address=address_pb2.SocketAddress(
                                    address="127.0.0.1", port_value=port
                                )
                            )
                        )
                    )
                ],
            )
        ],
    )


def eds_cluster(name: str) -> cluster_pb2.Cluster:
    ads = config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource())
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(service_name=name, eds_config=ads),
    )


# -- a test client ----------------------------------------------------------------------------


class AdsClient:
    """One ADS stream; responses are collected by a background task into a queue."""

    def __init__(self, port: int, node_id: str | None = NODE) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self.call = stub.StreamAggregatedResources()
        self.node_id = node_id
        self.first = True
        self.responses: asyncio.Queue[discovery_pb2.DiscoveryResponse] = asyncio.Queue()
        self.ended: asyncio.Future[grpc.StatusCode] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read())
        self.last: dict[str, discovery_pb2.DiscoveryResponse] = {}

    async def _read(self) -> None:
        try:
            async for response in self.call:
                self.responses.put_nowait(response)
        except grpc.aio.AioRpcError as e:
            self.ended.set_result(e.code())
            return
        except asyncio.CancelledError:
            raise
        if not self.ended.done():
            self.ended.set_result(grpc.StatusCode.OK)

    async def send(
        self,
        type_url: str,
        names: Sequence[str] = (),
        *,
        nonce: str = "",
        version: str = "",
        error: str | None = None,
    ) -> None:
        request = discovery_pb2.DiscoveryRequest(
            type_url=type_url,
            resource_names=list(names),
            response_nonce=nonce,
            version_info=version,
        )
        if self.first and self.node_id is not None:
            request.node.CopyFrom(base_pb2.Node(id=self.node_id))
        self.first = False
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        await self.call.write(request)

    async def recv(self, timeout: float = 5.0) -> discovery_pb2.DiscoveryResponse:
        response = await asyncio.wait_for(self.responses.get(), timeout)
        self.last[response.type_url] = response
        return response

    async def nothing(self, wait: float = 0.3) -> None:
        await asyncio.sleep(wait)
        assert self.responses.empty(), f"unexpected response {self.responses.get_nowait()}"

    async def ack(
        self, response: discovery_pb2.DiscoveryResponse, names: Sequence[str] = ()
    ) -> None:
        await self.send(
            response.type_url, names, nonce=response.nonce, version=response.version_info
        )

    async def close(self) -> None:
        self._reader.cancel()
        await self.channel.close()


def names_of(response: discovery_pb2.DiscoveryResponse) -> list[str]:
    out = []
    for resource in response.resources:
        cls = {
            CLUSTER_TYPE: cluster_pb2.Cluster,
            LISTENER_TYPE: listener_pb2.Listener,
            ROUTE_TYPE: route_pb2.RouteConfiguration,
            ENDPOINT_TYPE: endpoint_pb2.ClusterLoadAssignment,
        }[response.type_url]
        msg: Any = cls.FromString(resource.value)
        out.append(msg.cluster_name if response.type_url == ENDPOINT_TYPE else msg.name)
    return out


Scenario = Callable[[AdsServer, Tables], Coroutine[Any, Any, None]]


def serve(scenario: Scenario, *, scope: Any = None, tables: Tables | None = None) -> None:
    async def main() -> None:
        t = tables or Tables()
        t.tables[CLUSTER_TYPE].update(a=eds_cluster("a"), b=eds_cluster("b"))
        t.tables[ENDPOINT_TYPE].update(a=cla("a", 1001), b=cla("b", 1002))
        kwargs = {"scope": scope} if scope is not None else {}
        server = AdsServer(
            t.generators(), PushQueue(quiet=0.02, max_delay=0.2), "127.0.0.1:0", **kwargs
        )
        await server.start()
        try:
            await asyncio.wait_for(scenario(server, t), 30)
        finally:
            await server.stop(0)

    asyncio.run(main())


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


# -- the protocol -----------------------------------------------------------------------------


def test_wildcard_cds_then_named_eds_then_acks_make_the_proxy_synced() -> None:
    async def scenario(server: AdsServer, tables: Tables) -> None:
        client = AdsClient(server.port)
        await client.send(CLUSTER_TYPE)
        cds = await client.recv()
        assert (cds.type_url, names_of(cds), cds.version_info) == (CLUSTER_TYPE, ["a", "b"], "1")
        await client.ack(cds)
        await client.send(ENDPOINT_TYPE, ["a", "b"])
        eds = await client.recv()
        assert names_of(eds) == ["a", "b"]
        await client.ack(eds, ["a", "b"])
        await client.nothing()

        await eventually(lambda: len(server.sync_status()) == 1)
        [status] = server.sync_status()
        assert status.proxy_id == NODE
        await eventually(
            lambda: all(t.state is SyncState.SYNCED for t in server.sync_status()[0].types.values())
        )
        assert set(server.sync_status()[0].types) == {"cds", "eds"}
        text = server.metrics_text()
        assert "pilot_xds 1\n" in text
        assert 'pilot_xds_pushes{type="cds"} 1' in text
        await client.close()
        await eventually(lambda: server.sync_status() == [])
        assert "pilot_xds 0\n" in server.metrics_text()

    serve(scenario)


def test_a_change_is_pushed_debounced_and_only_what_changed_is_resent() -> None:
    async def scenario(server: AdsServer, tables: Tables) -> None:
        client = AdsClient(server.port)
        await client.send(CLUSTER_TYPE)
        await client.ack(await client.recv())
        await client.send(ENDPOINT_TYPE, ["a"])
        await client.ack(await client.recv(), ["a"])

        # An endpoints-only change: EDS alone is regenerated and sent.
        tables.version = 2
        tables.tables[ENDPOINT_TYPE]["a"] = cla("a", 2001)
        tables.calls.clear()
        for _ in range(5):  # a burst: one push
            server.push(PushRequest.endpoints([ConfigKey(kind="Service", name="a")]))
        eds = await client.recv()
        assert (eds.type_url, eds.version_info) == (ENDPOINT_TYPE, "2")
        assert [c[1] for c in tables.calls] == [ENDPOINT_TYPE]
        await client.ack(eds, ["a"])

        # A full push in which nothing this proxy has changed sends nothing.
        tables.version = 3
        server.push(PushRequest(reason="config"))
        await client.nothing()
        assert server.sync_status()[0].types["cds"].sent_version == "1"
        assert 'pilot_push_triggers{type="endpoint"} 5' in server.metrics_text()
        assert "pilot_proxy_convergence_time_count 1" in server.metrics_text()
        await client.close()

    serve(scenario)


def test_a_push_goes_clusters_first_and_listeners_before_routes() -> None:
    async def scenario(server: AdsServer, tables: Tables) -> None:
        tables.tables[LISTENER_TYPE]["l"] = listener_pb2.Listener(name="l")
        tables.tables[ROUTE_TYPE]["r"] = route_pb2.RouteConfiguration(name="r")
        client = AdsClient(server.port)
        await client.send(LISTENER_TYPE)
        await client.ack(await client.recv())
        await client.send(ROUTE_TYPE, ["r"])
        await client.ack(await client.recv(), ["r"])
        await client.send(CLUSTER_TYPE)
        await client.ack(await client.recv())
        await client.send(ENDPOINT_TYPE, ["a", "b"])
        await client.ack(await client.recv(), ["a", "b"])

        tables.version = 2
        tables.tables[LISTENER_TYPE]["l"] = listener_pb2.Listener(name="l", stat_prefix="x")
        tables.tables[ROUTE_TYPE]["r"] = route_pb2.RouteConfiguration(name="r", vhds=None)
        tables.tables[ROUTE_TYPE]["r"].validate_clusters.value = True
        tables.tables[CLUSTER_TYPE]["c"] = eds_cluster("c")
        tables.tables[ENDPOINT_TYPE]["a"] = cla("a", 3001)
        server.push(PushRequest(reason="config"))
        order = [(await client.recv()).type_url for _ in range(4)]
        assert order == [CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE]
        assert names_of(client.last[CLUSTER_TYPE]) == ["a", "b", "c"]  # LDS/CDS: all of them
        await client.close()

    serve(scenario)


def test_a_push_reaches_only_the_proxies_its_change_affects() -> None:
    async def scenario(server: AdsServer, tables: Tables) -> None:
        here, there = AdsClient(server.port, NODE), AdsClient(server.port, OTHER_NODE)
        for client in (here, there):
            await client.send(CLUSTER_TYPE)
            await client.ack(await client.recv())
        tables.version = 2
        tables.tables[CLUSTER_TYPE]["c"] = eds_cluster("c")
        server.push(
            PushRequest(affected=frozenset({ConfigKey(kind="X", name="c", namespace="other")}))
        )
        assert names_of(await there.recv()) == ["a", "b", "c"]
        await here.nothing()
        await here.close()
        await there.close()

    serve(scenario, scope=NamespaceScope())


def test_a_nack_is_logged_shown_in_sync_status_and_the_stream_keeps_being_served() -> None:
    async def scenario(server: AdsServer, tables: Tables) -> None:
        client = AdsClient(server.port)
        await client.send(CLUSTER_TYPE)
        v1 = await client.recv()
        await client.ack(v1)
        tables.version = 2
        tables.tables[CLUSTER_TYPE]["bad"] = cluster_pb2.Cluster(name="bad")
        server.push(PushRequest())
        v2 = await client.recv()
        await client.send(
            CLUSTER_TYPE, nonce=v2.nonce, version="1", error="cluster bad: not of type EDS"
        )
        await client.nothing(0.2)  # a NACK is not answered

        def nacked() -> bool:
            status = server.sync_status()[0].types["cds"]
            return status.state is SyncState.NACKED

        await eventually(nacked)
        nack = server.sync_status()[0].types["cds"].last_nack
        assert nack is not None
        assert (nack.version, nack.kept_version) == ("2", "1")
        assert nack.message == "cluster bad: not of type EDS"
        assert 'pilot_total_xds_rejects{type="cds"} 1' in server.metrics_text()

        tables.version = 3
        del tables.tables[CLUSTER_TYPE]["bad"]
        server.push(PushRequest())
        v3 = await client.recv()
        assert (v3.version_info, names_of(v3)) == ("3", ["a", "b"])
        await client.ack(v3)
        await eventually(lambda: server.sync_status()[0].types["cds"].state is SyncState.SYNCED)
        await client.close()

    serve(scenario)


def test_a_stale_nonce_is_ignored_and_counted() -> None:
    async def scenario(server: AdsServer, tables: Tables) -> None:
        client = AdsClient(server.port)
        await client.send(ENDPOINT_TYPE, ["a"])
        v1 = await client.recv()
        tables.version = 2
        tables.tables[ENDPOINT_TYPE]["a"] = cla("a", 4001)
        server.push(PushRequest.endpoints())
        v2 = await client.recv()
        await client.send(ENDPOINT_TYPE, ["a", "b"], nonce=v1.nonce, version="1")  # stale
        await client.nothing(0.2)
        await client.ack(v2, ["a", "b"])  # the same names with the current nonce: answered
        assert names_of(await client.recv()) == ["a", "b"]
        assert 'pilot_xds_expired_nonce{type="eds"} 1' in server.metrics_text()
        await client.close()

    serve(scenario)


# -- bad streams ------------------------------------------------------------------------------


def test_a_stream_without_node_ends_with_invalid_argument_and_others_carry_on() -> None:
    async def scenario(server: AdsServer, tables: Tables) -> None:
        good = AdsClient(server.port)
        await good.send(CLUSTER_TYPE)
        await good.ack(await good.recv())
        bad = AdsClient(server.port, node_id=None)
        await bad.send(CLUSTER_TYPE)
        assert await asyncio.wait_for(bad.ended, 5) is grpc.StatusCode.INVALID_ARGUMENT
        tables.version = 2
        tables.tables[CLUSTER_TYPE]["c"] = eds_cluster("c")
        server.push(PushRequest())
        assert names_of(await good.recv()) == ["a", "b", "c"]
        assert 'meshlet_xds_refused_streams{code="INVALID_ARGUMENT"} 1' in server.metrics_text()
        await good.close()
        await bad.close()

    serve(scenario)


def test_an_absurd_list_of_names_ends_that_stream_only() -> None:
    async def scenario(server: AdsServer, tables: Tables) -> None:
        bad = AdsClient(server.port)
        await bad.send(ENDPOINT_TYPE, [f"cluster-{i}" for i in range(60_000)])
        assert await asyncio.wait_for(bad.ended, 5) is grpc.StatusCode.RESOURCE_EXHAUSTED
        good = AdsClient(server.port, OTHER_NODE)
        await good.send(CLUSTER_TYPE)
        assert names_of(await good.recv()) == ["a", "b"]
        await good.close()
        await bad.close()

    serve(scenario)


def test_unknown_type_urls_are_ignored_and_the_stream_goes_on() -> None:
    async def scenario(server: AdsServer, tables: Tables) -> None:
        client = AdsClient(server.port)
        await client.send("type.googleapis.com/envoy.service.runtime.v3.Runtime", ["x"])
        await client.send("type.googleapis.com/nonsense")
        await client.send(CLUSTER_TYPE)
        assert (await client.recv()).type_url == CLUSTER_TYPE
        assert "meshlet_xds_unknown_type_requests 2" in server.metrics_text()
        await client.close()

    serve(scenario)


def test_a_generator_that_raises_costs_its_type_only() -> None:
    tables = Tables()
    tables.fail.add(ENDPOINT_TYPE)

    async def scenario(server: AdsServer, tables: Tables) -> None:
        client = AdsClient(server.port)
        await client.send(ENDPOINT_TYPE, ["a"])
        await client.send(CLUSTER_TYPE)
        assert (await client.recv()).type_url == CLUSTER_TYPE
        await client.nothing(0.2)
        assert 'meshlet_xds_generate_errors{type="eds"} 1' in server.metrics_text()
        await client.close()

    serve(scenario, tables=tables)


def test_a_request_flood_is_coalesced_and_does_not_hold_up_other_proxies() -> None:
    async def scenario(server: AdsServer, tables: Tables) -> None:
        flood = AdsClient(server.port)
        await flood.send(CLUSTER_TYPE)
        cds = await flood.recv()
        calm = AdsClient(server.port, OTHER_NODE)

        async def flooding() -> None:
            for i in range(3000):  # subscription changes, each of which asks for an answer
                await flood.send(CLUSTER_TYPE, ["a"] if i % 2 else ["b"], nonce="", version="")

        flooder = asyncio.create_task(flooding())
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await calm.send(CLUSTER_TYPE)
        assert names_of(await calm.recv()) == ["a", "b"]
        assert time.monotonic() - started < 1.0
        await flooder
        # The flooder is answered far fewer times than it asked, and last for its last names.
        answers = 0
        while True:
            try:
                last = await flood.recv(timeout=0.5)
            except TimeoutError:
                break
            answers += 1
        assert answers <= 100
        assert names_of(last) == ["a"]
        assert cds.nonce != last.nonce
        await flood.close()
        await calm.close()

    serve(scenario)


def test_delta_xds_is_refused_as_unimplemented() -> None:
    async def scenario(server: AdsServer, tables: Tables) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            call = stub.DeltaAggregatedResources()
            await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=CLUSTER_TYPE))
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call.read()
            assert e.value.code() is grpc.StatusCode.UNIMPLEMENTED

    serve(scenario)


def test_a_busy_address_is_a_clear_error_and_stop_ends_every_stream() -> None:
    async def scenario(server: AdsServer, tables: Tables) -> None:
        client = AdsClient(server.port)
        await client.send(CLUSTER_TYPE)
        await client.recv()
        second = AdsServer(tables.generators(), address=f"127.0.0.1:{server.port}")
        with pytest.raises(XdsServerError, match="cannot listen"):
            await second.start()
        await server.stop(0)
        assert await asyncio.wait_for(client.ended, 5) is not grpc.StatusCode.OK
        await client.close()

    serve(scenario)


# -- grpcio's proxyless xDS client ------------------------------------------------------------

CLIENT = r"""
import sys, time, grpc
channel = grpc.insecure_channel("xds:///greeter:7070")
say = channel.unary_unary("/helloworld.Greeter/SayHello")
seen = set()
deadline = time.monotonic() + 25
while time.monotonic() < deadline:
    try:
        reply = say(b"hi", timeout=5).decode()
    except grpc.RpcError as e:
        print("error", e.code(), e.details(), flush=True)
        time.sleep(0.1)
        continue
    if reply not in seen:
        seen.add(reply)
        print("reply", reply, flush=True)
    if reply == "two":
        sys.stdin.readline()  # the test checks sync status, then lets us go
        sys.exit(0)
    time.sleep(0.05)
sys.exit(1)
"""

ROUTER_FILTER = hcm_pb2.HttpFilter(
    name="envoy.filters.http.router", typed_config=pack(router_pb2.Router())
)


def greeter_listener() -> listener_pb2.Listener:
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix="greeter",
        rds=hcm_pb2.Rds(
            route_config_name="outbound|7070||greeter.default.svc.cluster.local",
            config_source=config_source_pb2.ConfigSource(
                ads=config_source_pb2.AggregatedConfigSource(),
                resource_api_version=config_source_pb2.V3,
            ),
        ),
        http_filters=[ROUTER_FILTER],
    )
    return listener_pb2.Listener(
        name="greeter:7070", api_listener=api_listener_pb2.ApiListener(api_listener=pack(hcm))
    )


def greeter_route(cluster: str) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(
        name="outbound|7070||greeter.default.svc.cluster.local",
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name="greeter:7070",
                domains=["greeter:7070"],
                routes=[
                    route_components_pb2.Route(
                        match=route_components_pb2.RouteMatch(prefix=""),
                        route=route_components_pb2.RouteAction(cluster=cluster),
                    )
                ],
            )
        ],
    )


async def greeter(reply: bytes) -> tuple[grpc.aio.Server, int]:
    async def say_hello(request: bytes, context: Any) -> bytes:
        return reply

    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "helloworld.Greeter", {"SayHello": grpc.unary_unary_rpc_method_handler(say_hello)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


class ProxylessClient:
    """grpcio's xDS client in a child process (its XdsClient is per process), calling
    ``xds:///greeter:7070`` in a loop and printing each new reply."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []

    @classmethod
    async def start(cls, server: AdsServer, tmp_path: Path) -> ProxylessClient:
        bootstrap = tmp_path / "bootstrap.json"
        bootstrap.write_text(
            json.dumps(
                {
                    "xds_servers": [
                        {
                            "server_uri": f"127.0.0.1:{server.port}",
                            "channel_creds": [{"type": "insecure"}],
                            "server_features": ["xds_v3"],
                        }
                    ],
                    "node": {
                        "id": "sidecar~127.0.0.9~client-1.default~default.svc.cluster.local",
                        "metadata": {"NAMESPACE": "default", "GENERATOR": "grpc"},
                    },
                }
            )
        )
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CLIENT,
            env={**os.environ, "GRPC_XDS_BOOTSTRAP": str(bootstrap)},
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        return cls(process)

    async def line(self) -> str:
        assert self.process.stdout is not None
        line = (await asyncio.wait_for(self.process.stdout.readline(), 20)).decode().strip()
        self.lines.append(line)
        return line

    async def wait_for_reply(self, reply: str) -> None:
        while (line := await self.line()) != f"reply {reply}":
            assert line, self.lines  # the client gave up

    async def finish(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(b"done\n")
        assert await asyncio.wait_for(self.process.wait(), 10) == 0

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


V1 = "outbound|7070|v1|greeter.default.svc.cluster.local"
V2 = "outbound|7070|v2|greeter.default.svc.cluster.local"


async def greeter_mesh(tables: Tables) -> list[grpc.aio.Server]:
    """Two greeters, ``one`` (subset v1) and ``two`` (v2); the route sends to v1."""
    one, one_port = await greeter(b"one")
    two, two_port = await greeter(b"two")
    tables.tables[LISTENER_TYPE]["greeter:7070"] = greeter_listener()
    tables.tables[ROUTE_TYPE][greeter_route(V1).name] = greeter_route(V1)
    tables.tables[CLUSTER_TYPE].update({V1: eds_cluster(V1), V2: eds_cluster(V2)})
    tables.tables[ENDPOINT_TYPE].update({V1: cla(V1, one_port), V2: cla(V2, two_port)})
    return [one, two]


def states(server: AdsServer) -> dict[str, SyncState]:
    statuses = server.sync_status()
    return {k: v.state for k, v in statuses[0].types.items()} if statuses else {}


ALL_SYNCED = {k: SyncState.SYNCED for k in ("lds", "rds", "cds", "eds")}


def test_grpcio_proxyless_client_resolves_through_the_server_and_follows_a_route_change(
    tmp_path: Path,
) -> None:
    async def scenario(server: AdsServer, tables: Tables) -> None:
        greeters = await greeter_mesh(tables)
        client = await ProxylessClient.start(server, tmp_path)
        try:
            assert await client.line() == "reply one", client.lines
            await eventually(lambda: states(server) == ALL_SYNCED)
            assert server.sync_status()[0].types["lds"].subscribed == 1  # named, not wildcard

            tables.version = 2
            tables.tables[ROUTE_TYPE][greeter_route(V2).name] = greeter_route(V2)
            server.push(PushRequest(reason="config"))
            await client.wait_for_reply("two")
            await eventually(lambda: states(server) == ALL_SYNCED)
            assert server.sync_status()[0].types["rds"].acked_version == "2"
            await client.finish()
        finally:
            await client.kill()
            for g in greeters:
                await g.stop(0)

    serve(scenario)


def test_grpcio_nacks_are_shown_and_a_fixed_push_recovers_the_client(tmp_path: Path) -> None:
    async def scenario(server: AdsServer, tables: Tables) -> None:
        greeters = await greeter_mesh(tables)
        good = tables.tables[ENDPOINT_TYPE][V1]
        broken = endpoint_pb2.ClusterLoadAssignment()
        broken.CopyFrom(good)
        broken.endpoints[0].ClearField("locality")  # grpcio refuses this
        tables.tables[ENDPOINT_TYPE][V1] = broken
        client = await ProxylessClient.start(server, tmp_path)
        try:
            await eventually(lambda: states(server).get("eds") is SyncState.NACKED, 20)
            nack = server.sync_status()[0].types["eds"].last_nack
            assert nack is not None
            assert nack.version == "1"
            assert "locality" in nack.message
            assert 'pilot_total_xds_rejects{type="eds"}' in server.metrics_text()

            tables.version = 2
            tables.tables[ENDPOINT_TYPE][V1] = good
            server.push(PushRequest.endpoints())
            await client.wait_for_reply("one")
            await eventually(lambda: states(server) == ALL_SYNCED)
            # The client exits once it sees "two": route there to let it go.
            tables.version = 3
            tables.tables[ROUTE_TYPE][greeter_route(V2).name] = greeter_route(V2)
            server.push(PushRequest(reason="config"))
            await client.wait_for_reply("two")
            await client.finish()
        finally:
            await client.kill()
            for g in greeters:
                await g.stop(0)

    serve(scenario)
