"""VirtualService translation, request by request (``ISTIO-TRANSLATION.md`` §1.4, §2).

Each test loads YAML, builds a sidecar's configuration and routes a request through the
proxy's own route table (``simulation.Simulation``), asserting the virtual host, route and
cluster -- or the Envoy field when the proxy has no behaviour for it yet.
"""

from __future__ import annotations

import textwrap

import pytest
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.cors.v3 import cors_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2

from meshlet.api.networking import OutboundTrafficPolicyMode
from meshlet.control.snapshot import MeshConfig
from meshlet.control.translate.routes import (
    CORS_FILTER,
    DEFAULT_RETRY_ON,
    FAULT_FILTER,
    PREVIOUS_HOSTS,
)
from tests.unit.control.simulation import Simulation, app

REVIEWS = "outbound|9080||reviews.default.svc.cluster.local"
V2 = "outbound|9080|v2|reviews.default.svc.cluster.local"


def vs(body: str, name: str = "reviews", namespace: str = "default") -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        f"metadata:\n  name: {name}\n  namespace: {namespace}\n"
        + "spec:\n"
        + textwrap.indent(textwrap.dedent(body).strip("\n"), "  ")
        + "\n"
    )


def dr(body: str, name: str = "reviews", namespace: str = "default") -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        f"metadata:\n  name: {name}\n  namespace: {namespace}\n"
        + "spec:\n"
        + textwrap.indent(textwrap.dedent(body).strip("\n"), "  ")
        + "\n"
    )


SUBSETS = dr(
    """
    host: reviews
    subsets:
    - name: v1
      labels: {version: v1}
    - name: v2
      labels: {version: v2}
    - name: v3
      labels: {version: v3}
    """
)


def mesh(*docs: str, mesh_config: MeshConfig | None = None) -> Simulation:
    base = [app("reviews", versions=("v1", "v2", "v3")), app("ratings"), SUBSETS]
    if mesh_config is None:
        return Simulation(*base, *docs)
    return Simulation(*base, *docs, mesh=mesh_config)


CLIENT = Simulation.client()


def route(sim: Simulation, **request: object) -> rc.Route:
    result = sim.simulate(CLIENT, **{"host": "reviews", "port": 9080, **request})  # type: ignore[arg-type]
    assert result.route_proto is not None, result
    return result.route_proto


# -- no VirtualService ---------------------------------------------------------------------


def test_a_service_without_virtual_service_gets_istios_default_route() -> None:
    sim = mesh()
    result = sim.simulate(CLIENT, host="reviews", port=9080, path="/anything")
    assert result.virtual_host == "reviews.default.svc.cluster.local:9080"
    assert result.route == "default"
    assert result.cluster == REVIEWS
    assert result.endpoint in ("10.0.0.1:9080", "10.0.0.2:9080", "10.0.0.3:9080")
    assert result.timeout == 0.0  # Istio: timeouts disabled unless the VirtualService sets one
    proto = result.route_proto
    assert proto is not None
    policy = proto.route.retry_policy
    assert policy.retry_on == DEFAULT_RETRY_ON
    assert policy.num_retries.value == 2
    assert policy.host_selection_retry_max_attempts == 5
    assert [p.name for p in policy.retry_host_predicate] == [PREVIOUS_HOSTS]
    # EXCLUDE_UNSAFE_503_FROM_DEFAULT_RETRY defaults to true: no status codes by default.
    assert list(policy.retriable_status_codes) == []
    assert result.retry is not None and result.retry.previous_hosts


def test_the_older_default_retry_policy_retries_503_when_the_mesh_asks_for_it() -> None:
    sim = mesh(mesh_config=MeshConfig(exclude_503_from_default_retries=False))
    assert list(route(sim).route.retry_policy.retriable_status_codes) == [503]


@pytest.mark.parametrize(
    ("host", "port"),
    [
        ("reviews", 9080),
        ("reviews", None),  # the bare name belongs to the service's only port
        ("reviews.default", 9080),
        ("reviews.default.svc", 9080),
        ("reviews.default.svc.cluster.local", 9080),
        ("reviews.default.svc.cluster.local.", 9080),
        ("REVIEWS", 9080),
    ],
)
def test_every_istio_domain_of_a_service_reaches_it_through_the_outbound_listener(
    host: str, port: int | None
) -> None:
    result = mesh().simulate(CLIENT, host=host, port=port)
    assert result.cluster == REVIEWS


def test_the_short_name_is_only_a_domain_for_proxies_in_the_services_namespace() -> None:
    sim = mesh()
    other = Simulation.client(namespace="other")
    assert sim.simulate(other, host="reviews", port=9080).cluster == "PassthroughCluster"
    assert sim.simulate(other, host="reviews.default", port=9080).cluster == REVIEWS


def test_domains_follow_istios_order_for_same_and_other_namespace_proxies() -> None:
    sim = mesh()
    config = sim.route_config(CLIENT, "9080")
    [vh] = [v for v in config.virtual_hosts if v.name.startswith("reviews")]
    assert list(vh.domains) == [
        "reviews.default.svc.cluster.local",
        "reviews.default.svc.cluster.local.",
        "reviews",
        "reviews.default.svc",
        "reviews.default",
    ]
    other = sim.route_config(Simulation.client(namespace="other"), "9080")
    [vh] = [v for v in other.virtual_hosts if v.name.startswith("reviews")]
    assert list(vh.domains) == [
        "reviews.default.svc.cluster.local",
        "reviews.default.svc.cluster.local.",
        "reviews.default",
        "reviews.default.svc",
    ]
    assert config.ignore_port_in_host_matching
    assert not config.validate_clusters.value
    assert config.max_direct_response_body_size_bytes.value == 1048576


def test_the_explicit_proxy_route_configuration_adds_the_port_to_every_domain() -> None:
    sim = Simulation(app("multi", ports={"http": 80, "http-admin": 9000}))
    config = sim.route_config(CLIENT, "80")
    assert config.name == "80"
    outbound = sim.simulate(CLIENT, host="multi", port=9000)
    assert outbound.cluster == "outbound|9000||multi.default.svc.cluster.local"
    # A Host without a port means port 80.
    assert (
        sim.simulate(CLIENT, host="multi").cluster == "outbound|80||multi.default.svc.cluster.local"
    )
    assert (
        sim.simulate(CLIENT, host="multi", port=80).cluster
        == "outbound|80||multi.default.svc.cluster.local"
    )


def test_service_addresses_are_domains() -> None:
    sim = Simulation(
        "apiVersion: v1\nkind: Service\nmetadata: {name: vip}\n"
        "spec: {clusterIP: 10.96.0.7, selector: {app: vip}, ports: [{name: http, port: 80}]}"
    )
    assert (
        sim.simulate(CLIENT, host="10.96.0.7").cluster
        == "outbound|80||vip.default.svc.cluster.local"
    )


def test_unknown_hosts_pass_through_with_allow_any_and_get_502_with_registry_only() -> None:
    assert mesh().simulate(CLIENT, host="example.com").cluster == "PassthroughCluster"
    strict = mesh(
        mesh_config=MeshConfig(outbound_traffic_policy=OutboundTrafficPolicyMode.REGISTRY_ONLY)
    )
    result = strict.simulate(CLIENT, host="example.com")
    assert (result.virtual_host, result.status) == ("block_all", 502)


# -- match ---------------------------------------------------------------------------------


def test_the_first_matching_rule_wins_and_a_host_with_a_virtual_service_gets_404_otherwise() -> (
    None
):
    sim = mesh(
        vs(
            """
            hosts: [reviews]
            http:
            - name: a
              match: [{uri: {prefix: /a}}]
              route: [{destination: {host: reviews, subset: v1}}]
            - name: ab
              match: [{uri: {prefix: /a/b}}]
              route: [{destination: {host: reviews, subset: v2}}]
            """
        )
    )
    hit = sim.simulate(CLIENT, host="reviews", port=9080, path="/a/b")
    assert (hit.route, hit.cluster) == ("a", "outbound|9080|v1|reviews.default.svc.cluster.local")
    miss = sim.simulate(CLIENT, host="reviews", port=9080, path="/c")
    assert (miss.virtual_host, miss.route, miss.status) == (
        "reviews.default.svc.cluster.local:9080",
        None,
        404,
    )


def test_nothing_is_emitted_after_a_catch_all_route() -> None:
    sim = mesh(
        vs(
            """
            hosts: [reviews]
            http:
            - route: [{destination: {host: reviews, subset: v1}}]
            - match: [{uri: {prefix: /never}}]
              route: [{destination: {host: reviews, subset: v2}}]
            """
        )
    )
    [vh] = [v for v in sim.route_config(CLIENT, "9080").virtual_hosts if v.name.startswith("rev")]
    assert len(vh.routes) == 1


@pytest.mark.parametrize(
    ("match", "path", "expected"),
    [
        ("{uri: {exact: /x}}", "/x", True),
        ("{uri: {exact: /x}}", "/x?q=1", True),
        ("{uri: {exact: /x}}", "/xy", False),
        ("{uri: {prefix: /x}}", "/xy", True),
        ("{uri: {regex: '/x/[0-9]+'}}", "/x/12", True),
        ("{uri: {regex: '/x/[0-9]+'}}", "/x/ab", False),
        ("{uri: {exact: /X}, ignoreUriCase: true}", "/x", True),
        ("{uri: {prefix: /X}}", "/x", False),
    ],
)
def test_uri_matches(match: str, path: str, expected: bool) -> None:
    sim = mesh(
        vs(
            f"hosts: [reviews]\nhttp:\n- match: [{match}]\n"
            "  route: [{destination: {host: reviews, subset: v2}}]"
        )
    )
    assert (sim.simulate(CLIENT, host="reviews", port=9080, path=path).cluster == V2) is expected


def test_ignore_uri_case_is_always_emitted() -> None:
    sim = mesh(
        vs(
            "hosts: [reviews]\nhttp:\n- match: [{uri: {prefix: /a}}]\n"
            "  route: [{destination: {host: reviews}}]"
        )
    )
    proto = route(sim, path="/a")
    assert proto.match.case_sensitive.value is True


@pytest.mark.parametrize(
    ("match", "request_", "expected"),
    [
        ("{headers: {end-user: {exact: jason}}}", {"headers": {"end-user": "jason"}}, True),
        ("{headers: {end-user: {exact: jason}}}", {"headers": {"end-user": "json"}}, False),
        ("{headers: {end-user: {exact: jason}}}", {}, False),
        ("{headers: {end-user: {prefix: ja}}}", {"headers": {"end-user": "jason"}}, True),
        ("{headers: {end-user: {regex: 'j.*n'}}}", {"headers": {"end-user": "jason"}}, True),
        ("{headers: {end-user: {regex: '*'}}}", {"headers": {"end-user": "anyone"}}, True),
        ("{headers: {end-user: {regex: '*'}}}", {}, False),
        ("{withoutHeaders: {end-user: {exact: jason}}}", {"headers": {"end-user": "x"}}, True),
        ("{withoutHeaders: {end-user: {exact: jason}}}", {}, True),
        ("{withoutHeaders: {end-user: {exact: jason}}}", {"headers": {"end-user": "jason"}}, False),
        ("{withoutHeaders: {end-user: {regex: '*'}}}", {}, True),
        ("{queryParams: {v: {exact: '2'}}}", {"path": "/?v=2"}, True),
        ("{queryParams: {v: {exact: '2'}}}", {"path": "/?v=3"}, False),
        ("{queryParams: {v: {regex: '*'}}}", {"path": "/?v"}, True),
        ("{queryParams: {v: {prefix: ''}}}", {"path": "/?v=1"}, True),
        ("{method: {exact: POST}}", {"method": "POST"}, True),
        ("{method: {exact: POST}}", {"method": "GET"}, False),
        ("{authority: {prefix: reviews}}", {}, True),
        ("{authority: {exact: other}}", {}, False),
        ("{scheme: {exact: https}}", {"scheme": "https"}, True),
        ("{scheme: {exact: https}}", {}, False),
        ("{port: 9080}", {}, True),
        ("{port: 9090}", {}, False),
    ],
)
def test_request_matches(match: str, request_: dict[str, object], expected: bool) -> None:
    sim = mesh(
        vs(
            f"hosts: [reviews]\nhttp:\n- match: [{match}]\n"
            "  route: [{destination: {host: reviews, subset: v2}}]"
        )
    )
    result = sim.simulate(CLIENT, **{"host": "reviews", "port": 9080, **request_})  # type: ignore[arg-type]
    assert (result.cluster == V2) is expected


def test_header_matchers_are_sorted_by_name_and_pseudo_headers_come_last() -> None:
    sim = mesh(
        vs(
            """
            hosts: [reviews]
            http:
            - match:
              - headers: {zeta: {exact: z}, alpha: {exact: a}}
                method: {exact: GET}
                authority: {exact: reviews}
                scheme: {exact: http}
              route: [{destination: {host: reviews}}]
            """
        )
    )
    proto = route(sim, headers={"zeta": "z", "alpha": "a"}, port=None)
    assert [h.name for h in proto.match.headers] == [
        "alpha",
        "zeta",
        ":method",
        ":authority",
        ":scheme",
    ]


def test_without_headers_treat_a_missing_header_as_empty_except_for_presence() -> None:
    sim = mesh(
        vs(
            """
            hosts: [reviews]
            http:
            - match: [{withoutHeaders: {a: {exact: x}, b: {regex: '*'}}}]
              route: [{destination: {host: reviews}}]
            """
        )
    )
    a, b = route(sim).match.headers
    assert (a.invert_match, a.treat_missing_header_as_empty) == (True, True)
    assert (b.invert_match, b.treat_missing_header_as_empty, b.present_match) == (True, False, True)


def test_source_labels_and_source_namespace_select_the_client() -> None:
    sim = mesh(
        vs(
            """
            hosts: [reviews]
            http:
            - match: [{sourceLabels: {app: productpage}}]
              route: [{destination: {host: reviews, subset: v2}}]
            - match: [{sourceNamespace: other}]
              route: [{destination: {host: reviews, subset: v3}}]
            - route: [{destination: {host: reviews, subset: v1}}]
            """
        )
    )
    productpage = Simulation.client(labels={"app": "productpage", "version": "v1"})
    assert sim.simulate(productpage, host="reviews", port=9080).cluster.split("|")[2] == "v2"  # type: ignore[union-attr]
    assert sim.simulate(CLIENT, host="reviews", port=9080).cluster.split("|")[2] == "v1"  # type: ignore[union-attr]
    other = Simulation.client(namespace="other")
    assert sim.simulate(other, host="reviews.default", port=9080).cluster.split("|")[2] == "v3"  # type: ignore[union-attr]


def test_match_gateways_decide_over_source_labels() -> None:
    sim = mesh(
        vs(
            """
            hosts: [reviews]
            gateways: [mesh, my-gateway]
            http:
            - match: [{gateways: [my-gateway], sourceLabels: {app: nobody}}]
              route: [{destination: {host: reviews, subset: v2}}]
            - match: [{gateways: [mesh], sourceLabels: {app: nobody}}]
              route: [{destination: {host: reviews, subset: v3}}]
            """
        )
    )
    result = sim.simulate(CLIENT, host="reviews", port=9080)
    assert result.cluster == "outbound|9080|v3|reviews.default.svc.cluster.local"


def test_a_virtual_service_bound_to_gateways_only_does_not_apply_to_sidecars() -> None:
    sim = mesh(
        vs(
            """
            hosts: [reviews]
            gateways: [some-gateway]
            http:
            - route: [{destination: {host: reviews, subset: v2}}]
            """
        )
    )
    assert sim.simulate(CLIENT, host="reviews", port=9080).route == "default"


def test_route_and_match_names() -> None:
    sim = mesh(
        vs(
            """
            hosts: [reviews]
            http:
            - name: rule
              match: [{name: m, uri: {prefix: /}}]
              route: [{destination: {host: reviews}}]
            """
        )
    )
    assert sim.simulate(CLIENT, host="reviews", port=9080).route == "rule.m"


# -- destinations ----------------------------------------------------------------------------


def test_weighted_destinations_become_weighted_clusters_without_total_weight() -> None:
    sim = mesh(
        vs(
            """
            hosts: [reviews]
            http:
            - route:
              - {destination: {host: reviews, subset: v1}, weight: 80}
              - {destination: {host: reviews, subset: v2}, weight: 20}
              - {destination: {host: reviews, subset: v3}, weight: 0}
            """
        )
    )
    result = sim.simulate(CLIENT, host="reviews", port=9080)
    assert result.weights == {
        "outbound|9080|v1|reviews.default.svc.cluster.local": 80,
        "outbound|9080|v2|reviews.default.svc.cluster.local": 20,
    }
    assert not result.route_proto.route.weighted_clusters.HasField("total_weight")  # type: ignore[union-attr]
    assert sim.simulate(CLIENT, host="reviews", port=9080, rand=79).cluster.endswith(
        "|v1|reviews.default.svc.cluster.local"
    )  # type: ignore[union-attr]
    assert sim.simulate(CLIENT, host="reviews", port=9080, rand=80).cluster.endswith(
        "|v2|reviews.default.svc.cluster.local"
    )  # type: ignore[union-attr]


def test_a_single_remaining_destination_is_a_plain_cluster() -> None:
    sim = mesh(
        vs(
            """
            hosts: [reviews]
            http:
            - route:
              - {destination: {host: reviews, subset: v1}, weight: 100}
              - {destination: {host: reviews, subset: v2}, weight: 0}
            """
        )
    )
    proto = route(sim)
    assert proto.route.cluster == "outbound|9080|v1|reviews.default.svc.cluster.local"


def test_subset_endpoints_are_the_subsets_pods() -> None:
    sim = mesh(vs("hosts: [reviews]\nhttp:\n- route: [{destination: {host: reviews, subset: v2}}]"))
    result = sim.simulate(CLIENT, host="reviews", port=9080)
    assert result.endpoints == ("10.0.0.2:9080",)


def test_destination_port_is_the_destinations_else_the_only_port_else_the_listeners() -> None:
    sim = Simulation(
        app("multi", ports={"http": 80, "http-alt": 8080}),
        app("single", ports={"http": 7000}),
        vs(
            """
            hosts: [multi]
            http:
            - match: [{uri: {prefix: /explicit}}]
              route: [{destination: {host: multi, port: {number: 8080}}}]
            - match: [{uri: {prefix: /single}}]
              route: [{destination: {host: single}}]
            - route: [{destination: {host: multi}}]
            """,
            name="multi",
        ),
    )

    def cluster(path: str, port: int) -> str | None:
        return sim.simulate(CLIENT, host="multi", port=port, path=path).cluster

    assert cluster("/explicit", 80) == "outbound|8080||multi.default.svc.cluster.local"
    assert cluster("/single", 80) == "outbound|7000||single.default.svc.cluster.local"
    assert cluster("/other", 80) == "outbound|80||multi.default.svc.cluster.local"
    assert cluster("/other", 8080) == "outbound|8080||multi.default.svc.cluster.local"


def test_short_destination_hosts_resolve_in_the_virtual_services_namespace() -> None:
    sim = Simulation(
        app("reviews", "prod"),
        app("reviews", "default"),
        vs("hosts: [reviews]\nhttp:\n- route: [{destination: {host: reviews}}]", namespace="prod"),
    )
    prod = Simulation.client(namespace="prod")
    assert (
        sim.simulate(prod, host="reviews", port=9080).cluster
        == "outbound|9080||reviews.prod.svc.cluster.local"
    )


# -- actions ---------------------------------------------------------------------------------


def test_redirect() -> None:
    sim = mesh(
        vs(
            """
            hosts: [reviews]
            http:
            - match: [{uri: {exact: /old}}]
              redirect: {uri: /new, authority: ratings, redirectCode: 302}
            - match: [{uri: {exact: /tls}}]
              redirect: {scheme: https, port: 8443}
            - match: [{uri: {exact: /derive}}]
              redirect: {authority: x, derivePort: FROM_REQUEST_PORT}
            """
        )
    )
    old = sim.simulate(CLIENT, host="reviews", port=9080, path="/old")
    assert (old.status, old.location) == (302, "http://ratings/new")
    tls = sim.simulate(CLIENT, host="reviews", port=9080, path="/tls")
    assert (tls.status, tls.location) == (301, "https://reviews:8443/tls")
    derived = sim.simulate(CLIENT, host="reviews", port=9080, path="/derive")
    assert derived.location == "http://x:9080/derive"


def test_a_redirect_code_envoy_cannot_send_drops_the_route() -> None:
    sim = mesh(
        vs(
            """
            hosts: [reviews]
            http:
            - match: [{uri: {exact: /old}}]
              redirect: {uri: /new, redirectCode: 305}
            - route: [{destination: {host: reviews}}]
            """
        )
    )
    assert sim.simulate(CLIENT, host="reviews", port=9080, path="/old").cluster == REVIEWS


def test_direct_response_with_a_string_or_bytes_body() -> None:
    sim = mesh(
        vs(
            """
            hosts: [reviews]
            http:
            - match: [{uri: {exact: /s}}]
              directResponse: {status: 418, body: {string: teapot}}
            - match: [{uri: {exact: /b}}]
              directResponse: {status: 200, body: {bytes: aGk=}}
            """
        )
    )
    teapot = sim.simulate(CLIENT, host="reviews", port=9080, path="/s")
    assert (teapot.status, teapot.body) == (418, b"teapot")
    assert sim.simulate(CLIENT, host="reviews", port=9080, path="/b").body == b"hi"


def test_rewrites() -> None:
    sim = mesh(
        vs(
            """
            hosts: [reviews]
            http:
            - match: [{uri: {prefix: /api/v1}}]
              rewrite: {uri: /v2, authority: backend}
              route: [{destination: {host: reviews}}]
            - match: [{uri: {prefix: /re}}]
              rewrite: {uriRegexRewrite: {match: '^/re/([a-z]+)$', rewrite: '/x/\\1'}}
              route: [{destination: {host: reviews}}]
            """
        )
    )
    prefix = sim.simulate(CLIENT, host="reviews", port=9080, path="/api/v1/items?x=1")
    assert prefix.request is not None
    assert (prefix.request.path, prefix.request.authority) == (b"/v2/items?x=1", b"backend")
    regex = sim.simulate(CLIENT, host="reviews", port=9080, path="/re/abc")
    assert regex.request is not None and regex.request.path == b"/x/abc"


def test_timeout() -> None:
    sim = mesh(
        vs("hosts: [reviews]\nhttp:\n- timeout: 1.5s\n  route: [{destination: {host: reviews}}]")
    )
    assert sim.simulate(CLIENT, host="reviews", port=9080).timeout == 1.5


def test_retries() -> None:
    sim = mesh(
        vs(
            """
            hosts: [reviews]
            http:
            - match: [{uri: {prefix: /a}}]
              retries:
                {attempts: 3, perTryTimeout: 2s, retryOn: "gateway-error,503,connect-failure"}
              route: [{destination: {host: reviews}}]
            - match: [{uri: {prefix: /b}}]
              retries: {attempts: 0}
              route: [{destination: {host: reviews}}]
            - match: [{uri: {prefix: /c}}]
              retries:
                {attempts: 1, retryIgnorePreviousHosts: false, backoff: 100ms, retryOn: "409"}
              route: [{destination: {host: reviews}}]
            """
        )
    )
    a = sim.simulate(CLIENT, host="reviews", port=9080, path="/a")
    assert a.retry is not None
    assert a.retry.num_retries == 3
    assert a.retry.per_try_timeout == 2.0
    assert a.retry.retry_on == {"gateway-error", "connect-failure", "retriable-status-codes"}
    assert a.retry.retriable_status_codes == {503}
    assert a.route_proto is not None
    assert (
        a.route_proto.route.retry_policy.retry_on
        == "gateway-error,connect-failure,retriable-status-codes"
    )
    b = sim.simulate(CLIENT, host="reviews", port=9080, path="/b")
    assert b.retry is None
    assert b.route_proto is not None and not b.route_proto.route.HasField("retry_policy")
    c = sim.simulate(CLIENT, host="reviews", port=9080, path="/c")
    assert c.retry is not None
    assert (c.retry.previous_hosts, c.retry.base_interval) == (False, 0.1)
    assert c.retry.retry_on == {"retriable-status-codes"} and c.retry.retriable_status_codes == {
        409
    }


def only_route(sim: Simulation, host: str = "reviews", port: int = 9080) -> rc.Route:
    """The first route of ``host``'s virtual host in the ``"<port>"`` configuration, for
    fields the proxy refuses (so that it cannot route the request)."""
    config = sim.route_config(CLIENT, str(port))
    [vh] = [v for v in config.virtual_hosts if v.name.startswith(host)]
    return vh.routes[0]


def test_retry_remote_localities_sets_the_previous_priorities_retry_priority() -> None:
    sim = mesh(
        vs(
            """
            hosts: [reviews]
            http:
            - retries: {attempts: 2, retryRemoteLocalities: true}
              route: [{destination: {host: reviews}}]
            """
        )
    )
    policy = only_route(sim).route.retry_policy
    assert policy.retry_priority.name == "envoy.retry_priorities.previous_priorities"
    assert any("retry_priority: is not supported" in r for r in sim.refusals(CLIENT))


def test_fault_injection() -> None:
    sim = mesh(
        vs(
            """
            hosts: [reviews]
            http:
            - match: [{uri: {prefix: /abort}}]
              fault: {abort: {httpStatus: 555, percentage: {value: 100}}}
              route: [{destination: {host: reviews}}]
            - match: [{uri: {prefix: /delay}}]
              fault: {delay: {fixedDelay: 7s, percentage: {value: 0.1}}}
              route: [{destination: {host: reviews}}]
            - match: [{uri: {prefix: /legacy}}]
              fault: {delay: {fixedDelay: 1s, percent: 50}}
              route: [{destination: {host: reviews}}]
            """
        )
    )
    abort = sim.simulate(CLIENT, host="reviews", port=9080, path="/abort")
    assert abort.fault is not None and abort.fault.abort is not None
    assert abort.fault.abort.http_status == 555
    assert (abort.fault.abort.percentage.numerator, abort.fault.abort.percentage.denominator) == (
        1_000_000,
        1_000_000,
    )
    delay = sim.simulate(CLIENT, host="reviews", port=9080, path="/delay")
    assert delay.fault is not None and delay.fault.delay is not None
    assert delay.fault.delay.fixed == 7.0
    assert delay.fault.delay.percentage.numerator == 1000  # 0.1% of a million
    legacy = sim.simulate(CLIENT, host="reviews", port=9080, path="/legacy")
    assert legacy.fault is not None and legacy.fault.delay is not None
    assert (legacy.fault.delay.percentage.numerator, legacy.fault.delay.percentage.denominator) == (
        50,
        100,
    )


def test_a_grpc_abort_carries_the_status_code() -> None:
    sim = mesh(
        vs(
            """
            hosts: [reviews]
            http:
            - fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 10}}}
              route: [{destination: {host: reviews}}]
            """
        )
    )
    fault = fault_pb2.HTTPFault()
    only_route(sim).typed_per_filter_config[FAULT_FILTER].Unpack(fault)
    assert (fault.abort.grpc_status, fault.abort.percentage.numerator) == (14, 100_000)
    assert any("abort.grpc_status: is not supported" in r for r in sim.refusals(CLIENT))


def test_mirrors() -> None:
    sim = mesh(
        vs(
            """
            hosts: [reviews]
            http:
            - match: [{uri: {prefix: /one}}]
              mirror: {host: ratings}
              mirrorPercentage: {value: 25}
              route: [{destination: {host: reviews}}]
            - match: [{uri: {prefix: /zero}}]
              mirror: {host: ratings}
              mirrorPercentage: {value: 0}
              route: [{destination: {host: reviews}}]
            - match: [{uri: {prefix: /legacy}}]
              mirror: {host: ratings}
              mirrorPercent: 30
              route: [{destination: {host: reviews}}]
            - mirrors:
              - destination: {host: ratings}
              - destination: {host: reviews, subset: v3}
                percentage: {value: 5}
              route: [{destination: {host: reviews}}]
            """
        )
    )

    def mirrors(path: str) -> list[tuple[str, float]]:
        action = sim.simulate(CLIENT, host="reviews", port=9080, path=path).action
        return [(m.cluster, m.fraction) for m in action.mirrors]  # type: ignore[attr-defined]

    ratings = "outbound|9080||ratings.default.svc.cluster.local"
    assert mirrors("/one") == [(ratings, 0.25)]
    assert mirrors("/zero") == []
    assert mirrors("/legacy") == [(ratings, 0.3)]
    assert mirrors("/many") == [
        (ratings, 1.0),
        ("outbound|9080|v3|reviews.default.svc.cluster.local", 0.05),
    ]


def test_header_operations() -> None:
    sim = mesh(
        vs(
            """
            hosts: [reviews]
            http:
            - headers:
                request:
                  set: {x-b: "2", x-a: "1", host: rewritten}
                  add: {x-c: "3"}
                  remove: [x-drop, ":path"]
                response:
                  set: {x-resp: "r"}
                  remove: [server]
              route:
              - destination: {host: reviews}
                headers: {request: {set: {x-dest: d}}}
            """
        )
    )
    result = sim.simulate(CLIENT, host="reviews", port=9080, headers={"x-drop": "1", "x-a": "0"})
    assert result.request is not None
    headers = result.request.headers
    assert (headers.get(b"x-a"), headers.get(b"x-b"), headers.get(b"x-c")) == (b"1", b"2", b"3")
    assert headers.get(b"x-dest") == b"d"
    assert headers.get(b"x-drop") is None
    assert result.request.authority == b"rewritten"
    proto = result.route_proto
    assert proto is not None
    assert [h.header.key for h in proto.request_headers_to_add] == ["x-a", "x-b", "x-c", "x-dest"]
    assert list(proto.request_headers_to_remove) == ["x-drop"]
    assert proto.route.host_rewrite_literal == "rewritten"
    assert list(proto.response_headers_to_remove) == ["server"]


def test_per_destination_headers_stay_on_weighted_clusters() -> None:
    sim = mesh(
        vs(
            """
            hosts: [reviews]
            http:
            - route:
              - destination: {host: reviews, subset: v1}
                weight: 50
                headers: {request: {set: {x-v: "1", ":authority": one}}}
              - destination: {host: reviews, subset: v2}
                weight: 50
            """
        )
    )
    first = sim.simulate(CLIENT, host="reviews", port=9080, rand=0)
    assert first.request is not None
    assert (first.request.headers.get(b"x-v"), first.request.authority) == (b"1", b"one")
    second = sim.simulate(CLIENT, host="reviews", port=9080, rand=60)
    assert second.request is not None and second.request.headers.get(b"x-v") is None


def test_cors_policy_is_translated_for_the_cors_filter() -> None:
    sim = mesh(
        vs(
            """
            hosts: [reviews]
            http:
            - corsPolicy:
                allowOrigins: [{exact: "https://a.example"}, {regex: "https://.*\\\\.b"}]
                allowMethods: [GET, POST]
                allowHeaders: [x-a, x-b]
                exposeHeaders: [x-c]
                maxAge: 24h
                allowCredentials: true
              route: [{destination: {host: reviews}}]
            """
        )
    )
    config = sim.route_config(CLIENT, "9080")
    [vh] = [v for v in config.virtual_hosts if v.name.startswith("reviews")]
    policy = cors_pb2.CorsPolicy()
    vh.routes[0].typed_per_filter_config[CORS_FILTER].Unpack(policy)
    assert [m.WhichOneof("match_pattern") for m in policy.allow_origin_string_match] == [
        "exact",
        "safe_regex",
    ]
    assert (policy.allow_methods, policy.allow_headers, policy.expose_headers) == (
        "GET,POST",
        "x-a,x-b",
        "x-c",
    )
    assert policy.max_age == "86400"
    assert policy.allow_credentials.value is True
    assert policy.forward_not_matching_preflights.value is True
    assert (
        policy.filter_enabled.default_value.numerator,
        policy.filter_enabled.default_value.denominator,
    ) == (100, 0)
    # The proxy has no CORS filter yet: it refuses the per-route config and the HCM filter.
    refusals = sim.refusals(CLIENT)
    assert any(r.startswith("route 9080") and CORS_FILTER in r for r in refusals)
    assert any(r.startswith("listener virtualOutbound") and "cors.v3.Cors " in r for r in refusals)


def test_consistent_hash_adds_a_hash_policy_and_drops_the_previous_hosts_predicate() -> None:
    sim = mesh(
        dr(
            """
            host: ratings
            trafficPolicy:
              loadBalancer: {consistentHash: {httpHeaderName: x-user}}
            """,
            name="ratings",
        ),
        vs("hosts: [ratings]\nhttp:\n- route: [{destination: {host: ratings}}]", name="ratings"),
    )
    result = sim.simulate(CLIENT, host="ratings", port=9080)
    assert result.route_proto is not None
    [policy] = result.route_proto.route.hash_policy
    assert policy.header.header_name == "x-user"
    assert result.retry is not None and not result.retry.previous_hosts
    action = result.action
    assert action.hash_policy is not None  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("hashing", "field"),
    [
        ("{httpCookie: {name: session, path: /}}", "cookie"),
        ("{useSourceIp: true}", "connection_properties"),
        ("{httpQueryParameterName: user}", "query_parameter"),
    ],
)
def test_every_consistent_hash_key(hashing: str, field: str) -> None:
    sim = mesh(
        dr(
            f"host: ratings\ntrafficPolicy:\n  loadBalancer: {{consistentHash: {hashing}}}",
            name="ratings",
        )
    )
    proto = sim.simulate(CLIENT, host="ratings", port=9080).route_proto
    assert proto is not None
    assert proto.route.hash_policy[0].WhichOneof("policy_specifier") == field


def test_a_cookie_ttl_is_kept() -> None:
    sim = mesh(
        dr(
            "host: ratings\ntrafficPolicy:\n  loadBalancer:\n    consistentHash:\n"
            "      httpCookie: {name: s, ttl: 10s, attributes: [{name: SameSite, value: Strict}]}",
            name="ratings",
        )
    )
    cookie = only_route(sim, "ratings").route.hash_policy[0].cookie
    assert (cookie.name, cookie.ttl.seconds, cookie.attributes[0].name) == ("s", 10, "SameSite")
    assert any("cookie.ttl: is not supported" in r for r in sim.refusals(CLIENT))


def test_subset_hash_policy_wins_over_the_rules() -> None:
    sim = mesh(
        dr(
            """
            host: ratings
            trafficPolicy:
              loadBalancer: {consistentHash: {httpHeaderName: top}}
            subsets:
            - name: v1
              labels: {version: v1}
              trafficPolicy:
                loadBalancer: {consistentHash: {httpHeaderName: subset}}
            """,
            name="ratings",
        ),
        vs(
            "hosts: [ratings]\nhttp:\n- route: [{destination: {host: ratings, subset: v1}}]",
            name="ratings",
        ),
    )
    proto = sim.simulate(CLIENT, host="ratings", port=9080).route_proto
    assert proto is not None and proto.route.hash_policy[0].header.header_name == "subset"


# -- which VirtualService ------------------------------------------------------------------


def test_of_two_virtual_services_for_one_host_the_oldest_wins() -> None:
    newer = vs(
        "hosts: [reviews]\nhttp:\n- route: [{destination: {host: reviews, subset: v2}}]",
        name="a-newer",
    )
    older = vs(
        "hosts: [reviews]\nhttp:\n- route: [{destination: {host: reviews, subset: v1}}]",
        name="b-older",
    )
    newer = newer.replace("metadata:\n", "metadata:\n  creationTimestamp: '2024-02-01T00:00:00Z'\n")
    older = older.replace("metadata:\n", "metadata:\n  creationTimestamp: '2024-01-01T00:00:00Z'\n")
    sim = mesh(newer, older)
    assert sim.simulate(CLIENT, host="reviews", port=9080).cluster.split("|")[2] == "v1"  # type: ignore[union-attr]


def test_a_virtual_service_for_a_host_outside_the_registry_gets_port_80() -> None:
    sim = mesh(
        vs("hosts: [api.example.com]\nhttp:\n- route: [{destination: {host: reviews}}]", name="ext")
    )
    result = sim.simulate(CLIENT, host="api.example.com")
    # No destination port: the service's only port.
    assert (result.virtual_host, result.cluster) == ("api.example.com:80", REVIEWS)


def test_a_wildcard_virtual_service_routes_the_service_entries_it_covers() -> None:
    sim = Simulation(
        """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext}
spec:
  hosts: [a.example.com, b.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
        """,
        vs(
            "hosts: ['*.example.com']\nhttp:\n- timeout: 3s\n"
            "  route: [{destination: {host: a.example.com}}]",
            name="wild",
        ),
    )
    result = sim.simulate(CLIENT, host="b.example.com")
    assert (result.cluster, result.timeout) == ("outbound|80||a.example.com", 3.0)
    assert result.endpoint == "a.example.com:80"
    # The wildcard is represented by the services it covers, not by a vhost of its own.
    assert sim.simulate(CLIENT, host="c.example.com").cluster == "PassthroughCluster"


def test_an_external_name_service_routes_to_its_own_dns_cluster() -> None:
    sim = Simulation(
        "apiVersion: v1\nkind: Service\nmetadata: {name: ext}\n"
        "spec: {type: ExternalName, externalName: api.example.com, ports: [{name: http, port: 80}]}"
    )
    result = sim.simulate(CLIENT, host="ext")
    assert (result.cluster, result.endpoint) == (
        "outbound|80||ext.default.svc.cluster.local",
        "api.example.com:80",
    )


def test_a_delegated_rule_is_merged_under_its_root() -> None:
    sim = mesh(
        vs(
            """
            hosts: [reviews]
            http:
            - name: root
              match: [{uri: {prefix: /api}}]
              timeout: 5s
              delegate: {name: reviews-api}
            - route: [{destination: {host: reviews, subset: v1}}]
            """
        ),
        vs(
            """
            http:
            - name: leaf
              match: [{uri: {prefix: /api/v2}}]
              route: [{destination: {host: reviews, subset: v2}}]
            - name: conflict
              match: [{uri: {prefix: /other}}]
              route: [{destination: {host: reviews, subset: v3}}]
            """,
            name="reviews-api",
        ),
    )
    v2 = sim.simulate(CLIENT, host="reviews", port=9080, path="/api/v2/x")
    assert (v2.route, v2.cluster, v2.timeout) == (
        "root-leaf",
        "outbound|9080|v2|reviews.default.svc.cluster.local",
        5.0,
    )
    # /api/v1 matches the root but no delegate rule; /other conflicts with the root's match.
    assert (
        sim.simulate(CLIENT, host="reviews", port=9080, path="/api/v1").cluster.split("|")[2]
        == "v1"
    )  # type: ignore[union-attr]
    assert (
        sim.simulate(CLIENT, host="reviews", port=9080, path="/other").cluster.split("|")[2] == "v1"
    )  # type: ignore[union-attr]


def test_a_missing_delegate_gives_no_routes_for_its_rule() -> None:
    sim = mesh(
        vs(
            """
            hosts: [reviews]
            http:
            - match: [{uri: {prefix: /api}}]
              delegate: {name: nowhere}
            - route: [{destination: {host: reviews, subset: v3}}]
            """
        )
    )
    assert (
        sim.simulate(CLIENT, host="reviews", port=9080, path="/api").cluster.split("|")[2] == "v3"
    )  # type: ignore[union-attr]


# -- what the proxy accepts ----------------------------------------------------------------


def test_the_proxy_accepts_every_route_feature_it_implements() -> None:
    sim = mesh(
        vs(
            """
            hosts: [reviews]
            http:
            - match: [{uri: {prefix: /a}, headers: {x: {exact: y}}, queryParams: {q: {exact: '1'}}}]
              rewrite: {uri: /b}
              timeout: 2s
              retries: {attempts: 2, perTryTimeout: 1s, retryOn: 5xx}
              fault: {delay: {fixedDelay: 1s, percentage: {value: 1}}}
              mirror: {host: ratings}
              headers: {request: {set: {x-a: b}}, response: {remove: [x-c]}}
              route:
              - {destination: {host: reviews, subset: v1}, weight: 90}
              - {destination: {host: reviews, subset: v2}, weight: 10}
            - match: [{uri: {prefix: /r}}]
              redirect: {uri: /x}
            - match: [{uri: {prefix: /d}}]
              directResponse: {status: 503}
            - route: [{destination: {host: reviews}}]
            """
        )
    )
    refused = [r for r in sim.refusals(CLIENT) if "Passthrough" not in r]
    assert refused == []
