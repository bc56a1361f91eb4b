"""The control plane's API, its translation adapter and the CLI's table, without sockets:
requests in, responses out, against an in-memory store."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2

from meshlet.api import REGISTRY
from meshlet.cli.config import age, render_table, resource_path
from meshlet.control.api import ApiHandler, ResourcePath, parse_resource_path
from meshlet.control.generators import Translation, proxy_of
from meshlet.control.server import push_request
from meshlet.control.store import Store
from meshlet.control.xds import CLUSTER_TYPE, ConfigKey, ProxyInfo, PushRequest

DR_PATH = "/apis/networking.istio.io/v1/namespaces/default/destinationrules"
SIDECAR = "sidecar~10.1.0.7~productpage-v1-abc.default~default.svc.cluster.local"


def dr(name: str, host: str = "reviews", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": name},
        "spec": {"host": host, **spec},
    }


def service(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {"ports": [{"port": 9080, "name": "http"}], "selector": {"app": name}},
    }


@pytest.fixture
def api() -> ApiHandler:
    return ApiHandler(store=Store.memory())


def call(api: ApiHandler, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    raw = b"" if body is None else json.dumps(body).encode()
    response = api.handle(method, path, raw)
    if response.content_type.startswith("application/json"):
        return response.status, json.loads(response.body)
    return response.status, response.body.decode()


def test_paths_name_kinds_by_group_version_and_plural() -> None:
    p = parse_resource_path(DR_PATH + "/reviews")
    assert isinstance(p, ResourcePath)
    assert (p.info.kind, p.version, p.namespace, p.name) == (
        "DestinationRule",
        "v1",
        "default",
        "reviews",
    )
    assert p.qualified == "destinationrules.networking.istio.io"
    core = parse_resource_path("/api/v1/services")
    assert isinstance(core, ResourcePath) and core.namespace is None and core.name is None
    assert isinstance(parse_resource_path("/apis/networking.istio.io/v9/gateways"), str)
    assert isinstance(parse_resource_path("/apis/networking.istio.io/v1/widgets"), str)
    assert isinstance(parse_resource_path("/apis/networking.istio.io/v1/gateways/gw"), str)


def test_the_cli_builds_the_paths_the_api_parses() -> None:
    for info in REGISTRY:
        path = resource_path(info, "default" if info.namespaced else None, "x")
        parsed = parse_resource_path(path)
        assert isinstance(parsed, ResourcePath) and parsed.info is info, path


def test_apply_reports_created_configured_unchanged(api: ApiHandler) -> None:
    status, body = call(api, "POST", "/apply", [dr("reviews"), service("reviews")])
    assert status == 200
    assert [(r["ref"], r["action"]) for r in body["results"]] == [
        ("destinationrule.networking.istio.io/reviews", "created"),
        ("service/reviews", "created"),
    ]
    _, body = call(api, "POST", "/apply", [dr("reviews"), dr("reviews", host="ratings")][1:])
    assert body["results"][0]["action"] == "configured"
    _, body = call(api, "POST", "/apply", [service("reviews")])
    assert body["results"][0]["action"] == "unchanged"


def test_an_invalid_batch_lists_every_problem_and_applies_nothing(api: ApiHandler) -> None:
    bad = dr("broken")
    bad["spec"]["trafficPolicy"] = {"loadBalancer": {"simple": "FASTEST"}}
    status, body = call(api, "POST", "/apply", [dr("fine"), bad, {"kind": "Nothing"}])
    assert status == 422
    assert body["reason"] == "Invalid"
    fields = [(c["index"], c["field"]) for c in body["details"]["causes"]]
    assert (1, "spec.trafficPolicy.loadBalancer.simple") in fields
    assert {i for i, _ in fields} == {1, 2}
    assert api.store.revision == 0


def test_a_stale_resource_version_is_a_conflict(api: ApiHandler) -> None:
    call(api, "POST", "/apply", [dr("reviews")])
    stale = dr("reviews", host="ratings")
    stale["metadata"]["resourceVersion"] = "99"
    status, body = call(api, "POST", "/apply", [stale])
    assert (status, body["reason"]) == (409, "Conflict")


def test_get_put_list_delete_one_object(api: ApiHandler) -> None:
    status, body = call(api, "GET", DR_PATH + "/reviews")
    assert (status, body["message"]) == (
        404,
        'destinationrules.networking.istio.io "reviews" not found',
    )
    assert call(api, "PUT", DR_PATH + "/reviews", dr("reviews"))[0] == 201
    assert call(api, "PUT", DR_PATH + "/reviews", dr("reviews", host="x"))[0] == 200
    assert call(api, "PUT", DR_PATH + "/reviews", dr("other"))[0] == 400
    status, body = call(api, "GET", DR_PATH.replace("/v1/", "/v1beta1/") + "/reviews")
    assert status == 200
    assert body["apiVersion"] == "networking.istio.io/v1beta1"
    assert body["spec"]["host"] == "x"
    _, listed = call(api, "GET", "/apis/networking.istio.io/v1/destinationrules")
    assert listed["kind"] == "DestinationRuleList"
    assert [i["metadata"]["name"] for i in listed["items"]] == ["reviews"]
    assert call(api, "DELETE", DR_PATH + "/reviews")[0] == 200
    assert call(api, "DELETE", DR_PATH + "/reviews")[0] == 404
    assert call(api, "POST", DR_PATH + "/reviews")[0] == 405


def test_metrics_add_store_revision_and_counts(api: ApiHandler) -> None:
    call(api, "POST", "/apply", [dr("a"), dr("b"), service("reviews")])
    status, text = call(api, "GET", "/metrics")
    assert status == 200
    assert "meshlet_store_revision 3" in text
    assert 'meshlet_store_objects{group="networking.istio.io",kind="DestinationRule"} 2' in text
    assert 'meshlet_store_objects{group="",kind="Service"} 1' in text


def test_bad_bodies_are_bad_requests(api: ApiHandler) -> None:
    assert api.handle("POST", "/apply", b"{nope").status == 400
    assert api.handle("POST", "/apply", b'{"a": 1}').status == 400
    assert api.handle("PUT", "/ready", b"").status == 405


# -- translation over the store ----------------------------------------------------------------


def test_translation_serves_the_store_at_its_revision_and_follows_pushes() -> None:
    store = Store.memory()
    store.apply([service("reviews"), dr("reviews", subsets=[{"name": "v1", "labels": {}}])])
    translation = Translation(store)
    proxy = ProxyInfo.parse_id(SIDECAR)
    cds = translation.generate(proxy, CLUSTER_TYPE, None)
    assert cds.version == "2"
    assert "outbound|9080|v1|reviews.default.svc.cluster.local" in cds.resources

    store.apply([dr("reviews", subsets=[{"name": "v2", "labels": {}}])])
    assert translation.generate(proxy, CLUSTER_TYPE, None).version == "2"  # until the push
    translation.prepare_push(PushRequest())
    cds = translation.generate(proxy, CLUSTER_TYPE, None)
    assert cds.version == "3"
    assert "outbound|9080|v2|reviews.default.svc.cluster.local" in cds.resources
    assert "outbound|9080|v1|reviews.default.svc.cluster.local" not in cds.resources
    named = translation.generate(proxy, CLUSTER_TYPE, ["nope", "BlackHoleCluster"])
    assert list(named.resources) == ["BlackHoleCluster"]
    packed = named.resources["BlackHoleCluster"]
    assert cluster_pb2.Cluster.FromString(packed.value).name == "BlackHoleCluster"


def test_an_istio_node_becomes_the_translations_proxy() -> None:
    info = ProxyInfo.parse_id(SIDECAR, {"LABELS": {"app": "productpage"}})
    proxy = proxy_of(info)
    assert (proxy.ip, proxy.namespace, proxy.pod_name, proxy.labels) == (
        "10.1.0.7",
        "default",
        "productpage-v1-abc",
        {"app": "productpage"},
    )
    assert proxy.id == SIDECAR
    assert proxy_of(ProxyInfo.parse_id("grpc-client")).namespace == "default"


def test_a_store_batch_is_one_push_naming_what_it_touched() -> None:
    store = Store.memory()
    pushes: list[PushRequest] = []
    store.watch(lambda events: pushes.append(push_request(events)))
    objects = [dr("a"), service("reviews")]
    for obj in objects:
        obj["metadata"]["namespace"] = "default"
    store.apply(objects)
    [push] = pushes
    assert push.full
    assert push.affected == {
        ConfigKey(kind="DestinationRule", name="a", namespace="default"),
        ConfigKey(kind="Service", name="reviews", namespace="default"),
    }


# -- the CLI's table ---------------------------------------------------------------------------


def test_the_table_is_kubectls() -> None:
    info = REGISTRY.resolve("vs")
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    items = [
        {
            "metadata": {
                "name": "reviews",
                "namespace": "default",
                "creationTimestamp": "2026-01-01T11:55:30Z",
            },
            "spec": {"hosts": ["reviews"], "gateways": ["bookinfo-gateway", "mesh"]},
        }
    ]
    wide = render_table(info, items, wide=True, namespaces=True, now=now).splitlines()
    assert wide[0].split() == ["NAMESPACE", "NAME", "GATEWAYS", "HOSTS", "AGE"]
    assert wide[1].split() == ["default", "reviews", "bookinfo-gateway,mesh", "reviews", "4m30s"]
    assert render_table(info, items, now=now).splitlines()[0].split() == ["NAME", "AGE"]


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(5, "5s"), (119, "119s"), (150, "2m30s"), (600, "10m"), (3 * 3600, "3h"), (5 * 86400, "5d")],
)
def test_ages_read_as_kubectl_shows_them(seconds: int, shown: str) -> None:
    now = datetime(2026, 1, 10, tzinfo=UTC)
    then = datetime.fromtimestamp(now.timestamp() - seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert age(then, now) == shown
    assert age(None, now) == "<unknown>"
