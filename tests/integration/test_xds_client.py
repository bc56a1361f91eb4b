"""``meshlet proxy`` as an ADS client: a real AdsServer in this process, the proxy a process.

The control plane serves hand-written tables (a Listener whose routes come by RDS, a
RouteConfiguration, EDS clusters and their ClusterLoadAssignments pointing at test upstreams),
so these tests prove the client's protocol and its atomic swaps, independently of translation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2, message, wrappers_pb2

from meshlet.control.xds import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    AdsServer,
    GeneratedResources,
    ProxyInfo,
    ProxyStatus,
    PushQueue,
    PushRequest,
    SyncState,
)
from tests.integration.conftest import (
    Proxy,
    Upstream,
    bootstrap,
    cluster,
    free_port,
    http_request,
    meshlet_cmd,
)

pytestmark = pytest.mark.timeout(90)

NODE = "sidecar~127.0.0.1~app-1.default~default.svc.cluster.local"
ADS = config_source_pb2.ConfigSource(
    ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
)


def pack(msg: message.Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(msg)
    return packed


# -- resources ---------------------------------------------------------------------------------


def listener(name: str, port: int, route_name: str = "local_route") -> listener_pb2.Listener:
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix="ingress_http",
        rds=hcm_pb2.Rds(route_config_name=route_name, config_source=ADS),
        http_filters=[
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.router", typed_config=pack(router_pb2.Router())
            )
        ],
    )
    return listener_pb2.Listener(
        name=name,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)
        ),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=pack(hcm),
                    )
                ]
            )
        ],
    )


def routes(name: str, cluster: str) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(
        name=name,
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name="all",
                domains=["*"],
                routes=[
                    route_components_pb2.Route(
                        match=route_components_pb2.RouteMatch(prefix="/"),
                        route=route_components_pb2.RouteAction(cluster=cluster),
                    )
                ],
            )
        ],
    )


def eds_cluster(name: str) -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        connect_timeout=wrappers_duration(1),
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ADS),
    )


def wrappers_duration(seconds: int) -> Any:
    from google.protobuf import duration_pb2

    return duration_pb2.Duration(seconds=seconds)


def cla(name: str, *ports: int, priority: int = 0) -> endpoint_pb2.ClusterLoadAssignment:
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                locality=base_pb2.Locality(region="r1", zone="z1"),
                load_balancing_weight=wrappers_pb2.UInt32Value(value=1),
                priority=priority,
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(
                            address=address_pb2.Address(
                                socket_address=address_pb2.SocketAddress(
                                    address="127.0.0.1", port_value=port
                                )
                            )
                        ),
                        load_balancing_weight=wrappers_pb2.UInt32Value(value=2),
                    )
                    for port in ports
                ],
            )
        ],
    )


# -- a control plane on its own thread ----------------------------------------------------------


class Tables:
    """Generators over mutable tables, one version for everything (bumped by ``change``)."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[str, message.Message]] = {
            t: {} for t in (LISTENER_TYPE, ROUTE_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE)
        }
        self.version = 1

    def generate(
        self, proxy: ProxyInfo, type_url: str, names: Sequence[str] | None
    ) -> GeneratedResources:
        table = self.tables[type_url]
        wanted = table if names is None else [n for n in names if n in table]
        return GeneratedResources(
            version=str(self.version), resources={n: pack(table[n]) for n in wanted}
        )


@dataclass
class ControlPlane:
    port: int
    tables: Tables = field(default_factory=Tables)
    server: AdsServer | None = None

    def __post_init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(15)

    def start(self) -> None:
        async def start() -> AdsServer:
            generators = dict.fromkeys(self.tables.tables, self.tables)
            server = AdsServer(
                generators, PushQueue(quiet=0.02, max_delay=0.2), f"127.0.0.1:{self.port}"
            )
            await server.start()
            return server

        self.server = self._call(start())

    def stop(self) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            self._call(server.stop(0))

    def change(self, type_url: str, name: str, proto: message.Message) -> None:
        """Set one resource and push the new version to every proxy."""

        async def change() -> None:
            self.tables.tables[type_url][name] = proto
            self.tables.version += 1
            if self.server is not None:
                self.server.push(PushRequest(reason="config"))

        self._call(change())

    def change_many(self, resources: dict[tuple[str, str], message.Message]) -> None:
        """Set several resources and push them as one new version."""

        async def change() -> None:
            for (type_url, name), proto in resources.items():
                self.tables.tables[type_url][name] = proto
            self.tables.version += 1
            if self.server is not None:
                self.server.push(PushRequest(reason="config"))

        self._call(change())

    def status(self) -> list[ProxyStatus]:
        async def status() -> list[ProxyStatus]:
            return self.server.sync_status() if self.server is not None else []

        return list(self._call(status()))

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def control_plane() -> Iterator[ControlPlane]:
    cp = ControlPlane(free_port())
    yield cp
    cp.close()


def serve_app(cp: ControlPlane, cluster_port: int) -> int:
    """Tables for one listener (routes by RDS) to EDS cluster ``a``; returns the listener port."""
    port = free_port()
    t = cp.tables.tables
    t[LISTENER_TYPE]["listener_0"] = listener("listener_0", port)
    t[ROUTE_TYPE]["local_route"] = routes("local_route", "a")
    t[CLUSTER_TYPE]["a"] = eds_cluster("a")
    t[ENDPOINT_TYPE]["a"] = cla("a", cluster_port)
    return port


# -- the proxy ------------------------------------------------------------------------------------


def dynamic_bootstrap(ads_port: int, admin_port: int) -> dict[str, Any]:
    return {
        "node": {"id": NODE, "cluster": "app"},
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
            },
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {
            "clusters": [
                {
                    "name": "xds-grpc",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "xds-grpc",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": "127.0.0.1",
                                                    "port_value": ads_port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ]
        },
    }


@dataclass
class DynamicProxy:
    process: subprocess.Popen[bytes]
    admin_port: int
    stderr: Path

    def admin_get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.admin_port}{path}", timeout=5
            ) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def admin_post(self, path: str) -> int:
        request = urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}", method="POST")
        with urllib.request.urlopen(request, timeout=5) as r:
            return int(r.status)

    def wait_ready(self, timeout: float = 20) -> None:
        def ready() -> bool:
            assert self.process.poll() is None, self.stderr.read_text()
            with contextlib.suppress(OSError):
                return self.admin_get("/ready")[0] == 200
            return False

        eventually(ready, timeout, f"proxy not ready:\n{self.stderr.read_text()}")


@pytest.fixture
def start_dynamic(tmp_path: Path) -> Iterator[Callable[..., DynamicProxy]]:
    started: list[DynamicProxy] = []

    def start(config: dict[str, Any], *args: str) -> DynamicProxy:
        path = tmp_path / f"bootstrap-{len(started)}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        err = tmp_path / f"proxy-{len(started)}.err"
        process = subprocess.Popen(
            meshlet_cmd("proxy", "--config", str(path), *args),
            stdout=subprocess.DEVNULL,
            stderr=err.open("wb"),
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        admin_port = config["admin"]["address"]["socket_address"]["port_value"]
        proxy = DynamicProxy(process, admin_port, err)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        if proxy.process.poll() is None:
            proxy.process.kill()
            proxy.process.wait(10)


def eventually(check: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what or "condition not reached"
        time.sleep(0.05)


def body_of(port: int, path: str = "/") -> str:
    try:
        return http_request(port, path, timeout=5).body.decode()
    except OSError as e:
        return f"error: {e}"


def synced(cp: ControlPlane, types: set[str]) -> bool:
    status = cp.status()
    return bool(status) and all(
        status[0].types.get(t) is not None and status[0].types[t].state is SyncState.SYNCED
        for t in types
    )


# -- tests ----------------------------------------------------------------------------------------


def test_a_dynamic_proxy_serves_listener_routes_clusters_and_endpoints_from_ads(
    control_plane: ControlPlane,
    make_upstream: Callable[..., Upstream],
    start_dynamic: Callable[..., DynamicProxy],
) -> None:
    a, b = make_upstream("a"), make_upstream("b")
    port = serve_app(control_plane, a.port)
    control_plane.start()
    proxy = start_dynamic(dynamic_bootstrap(control_plane.port, free_port()))
    proxy.wait_ready()
    assert body_of(port) == "hello from a"
    eventually(lambda: synced(control_plane, {"lds", "rds", "cds", "eds"}))

    _, text = proxy.admin_get("/config_dump")
    dump = json.loads(text)["configs"]
    clusters = dump[1]["dynamic_active_clusters"]
    assert [(c["version_info"], c["cluster"]["name"]) for c in clusters] == [("1", "a")]
    [dl] = dump[2]["dynamic_listeners"]
    assert (dl["name"], dl["active_state"]["version_info"]) == ("listener_0", "1")
    [dr] = dump[3]["dynamic_route_configs"]
    assert (dr["version_info"], dr["route_config"]["name"]) == ("1", "local_route")

    # An endpoints-only change moves traffic to the new endpoint.
    control_plane.change(ENDPOINT_TYPE, "a", cla("a", b.port))
    eventually(lambda: body_of(port) == "hello from b", what="EDS change not applied")
    _, clusters_text = proxy.admin_get("/clusters")
    assert f"a::127.0.0.1:{b.port}::weight::2" in clusters_text
    assert f"127.0.0.1:{a.port}" not in clusters_text

    # A new listener binds its socket; a removed one closes it.
    port2 = free_port()
    control_plane.change(LISTENER_TYPE, "listener_1", listener("listener_1", port2))
    eventually(lambda: body_of(port2) == "hello from b", what="new listener not bound")
    async_remove(control_plane, LISTENER_TYPE, "listener_1")
    eventually(lambda: body_of(port2).startswith("error"), what="removed listener still open")
    assert body_of(port) == "hello from b"

    proxy.process.send_signal(signal.SIGTERM)  # the ADS stream does not hold up the exit
    assert proxy.process.wait(15) == 0


def async_remove(cp: ControlPlane, type_url: str, name: str) -> None:
    async def remove() -> None:
        del cp.tables.tables[type_url][name]
        cp.tables.version += 1
        assert cp.server is not None
        cp.server.push(PushRequest(reason="config"))

    cp._call(remove())


@pytest.mark.parametrize("new_cluster", [False, True], ids=["known-cluster", "new-cluster"])
def test_a_route_change_under_load_fails_no_request(
    control_plane: ControlPlane,
    make_upstream: Callable[..., Upstream],
    start_dynamic: Callable[..., DynamicProxy],
    new_cluster: bool,
) -> None:
    a, b = make_upstream("a"), make_upstream("b")
    port = serve_app(control_plane, a.port)
    if not new_cluster:
        control_plane.tables.tables[CLUSTER_TYPE]["b"] = eds_cluster("b")
        control_plane.tables.tables[ENDPOINT_TYPE]["b"] = cla("b", b.port)
    control_plane.start()
    proxy = start_dynamic(dynamic_bootstrap(control_plane.port, free_port()))
    proxy.wait_ready()

    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def load(path: str) -> None:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        while not stop.is_set():
            try:
                conn.request("GET", path)
                r = conn.getresponse()
                results.append((r.status, r.read().decode()))
            except OSError as e:
                results.append((0, str(e)))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.close()

    threads = [
        threading.Thread(target=load, args=(path,))
        for path in ("/", "/", "/delay/0.2", "/delay/0.2")
    ]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        if new_cluster:
            # One push brings the cluster, its endpoints and the routes to it (the server
            # sends CDS, EDS, LDS, RDS; the proxy asks for "b"'s endpoints only after CDS).
            control_plane.change_many(
                {
                    (CLUSTER_TYPE, "b"): eds_cluster("b"),
                    (ENDPOINT_TYPE, "b"): cla("b", b.port),
                    (ROUTE_TYPE, "local_route"): routes("local_route", "b"),
                }
            )
        else:
            control_plane.change(ROUTE_TYPE, "local_route", routes("local_route", "b"))
        eventually(lambda: any(body == "hello from b" for _, body in results[-5:]))
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    failed = [r for r in results if r[0] != 200]
    assert not failed, failed[:5]
    assert any(body == "hello from a" for _, body in results)
    assert sum(1 for _, body in results if body == "delayed") >= 4
    assert results[-1] != (200, "hello from a")


def test_a_bad_resource_is_nacked_and_the_last_good_config_keeps_serving(
    control_plane: ControlPlane,
    make_upstream: Callable[..., Upstream],
    start_dynamic: Callable[..., DynamicProxy],
) -> None:
    a = make_upstream("a")
    port = serve_app(control_plane, a.port)
    control_plane.start()
    proxy = start_dynamic(dynamic_bootstrap(control_plane.port, free_port()))
    proxy.wait_ready()
    eventually(lambda: synced(control_plane, {"lds", "rds", "cds", "eds"}))

    bad = eds_cluster("a")
    bad.lb_policy = cluster_pb2.Cluster.CLUSTER_PROVIDED
    bad.dns_failure_refresh_rate.base_interval.seconds = 3
    control_plane.change(CLUSTER_TYPE, "a", bad)

    def nacked() -> bool:
        status = control_plane.status()
        return bool(status) and status[0].types["cds"].state is SyncState.NACKED

    eventually(nacked, what="CDS not NACKed")
    nack = control_plane.status()[0].types["cds"].last_nack
    assert nack is not None
    assert "cluster a.dns_failure_refresh_rate: is not supported by meshlet" in nack.message
    assert "lb_policy" in nack.message
    assert nack.kept_version == "1"
    assert body_of(port) == "hello from a"
    dump = json.loads(proxy.admin_get("/config_dump")[1])["configs"]
    assert dump[1]["dynamic_active_clusters"][0]["version_info"] == "1"

    # A bad RouteConfiguration is NACKed the same way.
    bad_routes = routes("local_route", "a")
    bad_routes.virtual_hosts[0].routes[0].route.cluster_header = "x-cluster"
    control_plane.change(ROUTE_TYPE, "local_route", bad_routes)
    eventually(
        lambda: control_plane.status()[0].types["rds"].state is SyncState.NACKED,
        what="RDS not NACKed",
    )
    assert body_of(port) == "hello from a"


def test_the_proxy_outlives_the_control_plane_and_reconnects_when_it_returns(
    control_plane: ControlPlane,
    make_upstream: Callable[..., Upstream],
    start_dynamic: Callable[..., DynamicProxy],
) -> None:
    a, b = make_upstream("a"), make_upstream("b")
    port = serve_app(control_plane, a.port)
    control_plane.start()
    proxy = start_dynamic(dynamic_bootstrap(control_plane.port, free_port()))
    proxy.wait_ready()

    control_plane.stop()
    for _ in range(10):
        assert body_of(port) == "hello from a"
        time.sleep(0.1)
    assert proxy.admin_get("/ready")[0] == 200

    control_plane.tables.tables[ENDPOINT_TYPE]["a"] = cla("a", b.port)
    control_plane.tables.version = 7
    control_plane.start()
    eventually(lambda: body_of(port) == "hello from b", 20, "no reconnect")
    eventually(lambda: synced(control_plane, {"lds", "rds", "cds", "eds"}))
    assert control_plane.status()[0].types["eds"].acked_version == "7"


def test_ready_waits_for_the_first_complete_config(
    control_plane: ControlPlane,
    make_upstream: Callable[..., Upstream],
    start_dynamic: Callable[..., DynamicProxy],
) -> None:
    a = make_upstream("a")
    port = serve_app(control_plane, a.port)
    del control_plane.tables.tables[ENDPOINT_TYPE]["a"]  # cluster a stays warming
    proxy = start_dynamic(dynamic_bootstrap(control_plane.port, free_port()))
    eventually(lambda: _admin_up(proxy), what="admin not up")
    assert proxy.admin_get("/ready") == (503, "INITIALIZING\n")
    assert proxy.admin_post("/healthcheck/ok") == 200  # does not make it live either
    assert proxy.admin_get("/ready") == (503, "INITIALIZING\n")

    control_plane.start()  # the proxy finds it on a later attempt
    eventually(lambda: synced(control_plane, {"lds", "cds"}), 20)
    assert proxy.admin_get("/ready")[0] == 503
    # The listener serves already; its cluster is still warming, so it is not found yet.
    assert http_request(port, timeout=5).status == 503

    control_plane.change(ENDPOINT_TYPE, "a", cla("a", a.port))
    proxy.wait_ready()
    assert body_of(port) == "hello from a"


def _admin_up(proxy: DynamicProxy) -> bool:
    assert proxy.process.poll() is None, proxy.stderr.read_text()
    with contextlib.suppress(OSError):
        proxy.admin_get("/ready")
        return True
    return False


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda c: c["dynamic_resources"]["ads_config"].update(api_type="REST"),
            "dynamic_resources.ads_config.api_type: REST is not supported",
        ),
        (
            lambda c: c["dynamic_resources"]["ads_config"]["grpc_services"][0]["envoy_grpc"].update(
                cluster_name="nowhere"
            ),
            "'nowhere' is not a static cluster",
        ),
        (
            lambda c: c["dynamic_resources"].update(lds_config={"path": "/tmp/lds.yaml"}),
            "dynamic_resources.lds_config.path: is not supported by meshlet",
        ),
    ],
)
def test_a_bad_dynamic_bootstrap_is_refused_by_field(
    tmp_path: Path, change: Callable[[dict[str, Any]], None], expected: str
) -> None:
    config = dynamic_bootstrap(free_port(), free_port())
    change(config)
    path = tmp_path / "bootstrap.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run(
        meshlet_cmd("proxy", "--config", str(path)), capture_output=True, timeout=30
    )
    assert done.returncode == 2
    assert expected in done.stderr.decode()


def test_a_dynamic_bootstrap_refuses_more_than_one_worker(tmp_path: Path) -> None:
    path = tmp_path / "bootstrap.yaml"
    path.write_text(yaml.safe_dump(dynamic_bootstrap(free_port(), free_port())))
    done = subprocess.run(
        meshlet_cmd("proxy", "--config", str(path), "--concurrency", "2"),
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "--concurrency: must be 1 with dynamic_resources" in done.stderr.decode()


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_grpc_is_loaded_only_by_a_dynamic_proxy(
    control_plane: ControlPlane,
    upstream: Upstream,
    start_proxy: Callable[..., Proxy],
    start_dynamic: Callable[..., DynamicProxy],
) -> None:
    # DESIGN: the 40 MiB budget has no room for grpcio in a proxy that does not need it.
    static = start_proxy(bootstrap(clusters=[cluster("a", upstream.port)]))
    assert http_request(static.port).status == 200
    assert "cygrpc" not in _maps(static.process.pid)

    serve_app(control_plane, upstream.port)
    control_plane.start()
    dynamic = start_dynamic(dynamic_bootstrap(control_plane.port, free_port()))
    dynamic.wait_ready()
    assert "cygrpc" in _maps(dynamic.process.pid)
