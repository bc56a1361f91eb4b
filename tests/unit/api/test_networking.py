"""networking.istio.io schemas: Istio's defaults, and Istio's validation where it is cheap."""

from __future__ import annotations

from typing import Any

from meshlet.api.networking import (
    ClientTLSMode,
    Destination,
    HTTPRoute,
    HTTPRouteDestination,
    OutboundTrafficPolicy,
    OutboundTrafficPolicyMode,
    Resolution,
    ServerTLSMode,
    SimpleLB,
    VirtualServiceSpec,
)

from .conftest import errors, load


def route(**extra: Any) -> dict[str, Any]:
    return {"route": [{"destination": {"host": "reviews"}}], **extra}


def vs(*http: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"hosts": ["reviews"], "http": list(http), **extra}


# -- VirtualService --------------------------------------------------------------------------


def test_a_virtual_service_reads_into_typed_values_with_istio_defaults() -> None:
    spec = load(
        "VirtualService",
        vs(
            route(
                timeout="1.5s",
                retries={"attempts": 3, "perTryTimeout": "500ms", "retryOn": "5xx,503"},
            )
        ),
    ).model.spec
    http = spec.http[0]
    assert http.timeout is not None and http.timeout.seconds == 1.5
    assert http.retries is not None and http.retries.per_try_timeout is not None
    assert http.retries.per_try_timeout.milliseconds == 500
    assert http.route[0].weight == 0  # proto3 zero value: "not set"
    assert http.route[0].destination.port is None
    assert http.is_catch_all
    assert spec.gateways == () and spec.export_to == ()


def test_models_can_be_built_in_python_by_field_name() -> None:
    spec = VirtualServiceSpec(
        hosts=("reviews",),
        http=(HTTPRoute(route=(HTTPRouteDestination(destination=Destination(host="reviews")),)),),
    )
    assert spec.model_dump(mode="json", exclude_unset=True) == {
        "hosts": ["reviews"],
        "http": [{"route": [{"destination": {"host": "reviews"}}]}],
    }


def test_an_http_rule_needs_somewhere_to_send_the_request() -> None:
    assert errors("VirtualService", vs({"name": "nothing"})) == [
        "spec.http[0]: HTTP route, redirect, directResponse or delegate is required"
    ]


def test_route_and_redirect_conflict_as_in_istio() -> None:
    assert errors("VirtualService", vs(route(redirect={"uri": "/new"}))) == [
        "spec.http[0].route: HTTP route cannot contain both route and redirect"
    ]


def test_mirror_and_mirrors_conflict() -> None:
    mirror = {"host": "shadow"}
    assert errors(
        "VirtualService", vs(route(mirror=mirror, mirrors=[{"destination": mirror}]))
    ) == ["spec.http[0].mirrors: HTTP route cannot contain both mirror and mirrors"]


def test_retry_on_accepts_envoy_policies_and_status_codes_only() -> None:
    assert load(
        "VirtualService", vs(route(retries={"attempts": 2, "retryOn": "gateway-error,503"}))
    )
    [message] = errors(
        "VirtualService", vs(route(retries={"attempts": 2, "retryOn": "5xx,sometimes"}))
    )
    assert message.startswith(
        "spec.http[0].retries.retryOn: 'sometimes' is not a valid retryOn policy"
    )


def test_redirect_codes_must_be_3xx() -> None:
    assert errors("VirtualService", vs({"redirect": {"uri": "/x", "redirectCode": 200}})) == [
        "spec.http[0].redirect.redirectCode: 200 is not a valid redirect code, must be 3xx"
    ]


def test_a_string_match_takes_one_of_exact_prefix_or_regex() -> None:
    both = route(match=[{"uri": {"exact": "/a", "prefix": "/"}}])
    assert errors("VirtualService", vs(both)) == [
        "spec.http[0].match[0].uri: only one of exact, prefix, regex may be set, got exact, prefix"
    ]


def test_regexes_must_compile_and_be_re2() -> None:
    [bad] = errors("VirtualService", vs(route(match=[{"uri": {"regex": "/api/(v1"}}])))
    assert bad.startswith("spec.http[0].match[0].uri.regex: regex '/api/(v1' does not compile")
    [lookahead] = errors("VirtualService", vs(route(match=[{"uri": {"regex": "/(?=x)"}}])))
    assert lookahead.endswith("lookaround is not supported (Istio uses RE2)")
    # ``regex: "*"`` means "present" to Istio, and RE2's \p classes are accepted.
    headers = {"x-user": {"regex": "*"}, "x-name": {"regex": r"\p{L}+"}}
    assert load("VirtualService", vs(route(match=[{"headers": headers}])))


def test_header_match_names_follow_istio() -> None:
    assert errors(
        "VirtualService", vs(route(match=[{"headers": {"bad header": {"exact": "x"}}}]))
    ) == [
        'spec.http[0].match[0].headers["bad header"]: '
        "header name 'bad header' is not a valid header name"
    ]
    claims = {"@request.auth.claims.group": {"exact": "admin"}}
    assert load("VirtualService", vs(route(match=[{"headers": claims}])))


def test_fault_injection_checks_status_and_percentage() -> None:
    fault = {"abort": {"httpStatus": 503, "percentage": {"value": 101}}}
    assert errors("VirtualService", vs(route(fault=fault))) == [
        "spec.http[0].fault.abort.percentage: percentage 101.0 is neither 0.0, nor in range "
        "[0.0001, 100.0]",
    ]
    assert errors("VirtualService", vs(route(fault={"abort": {"httpStatus": 700}}))) == [
        "spec.http[0].fault.abort.httpStatus: HTTP status 700 is not in range 200-599"
    ]
    assert errors("VirtualService", vs(route(fault={}))) == [
        "spec.http[0].fault: HTTP fault injection must have an abort and/or a delay"
    ]


def test_mesh_bound_virtual_services_may_not_use_the_wildcard_host() -> None:
    assert errors("VirtualService", {"hosts": ["*"], "http": [route()]}) == [
        "spec.hosts[0]: wildcard host * is not allowed for virtual services bound to the mesh "
        "gateway"
    ]
    assert load("VirtualService", {"hosts": ["*"], "gateways": ["ingress"], "http": [route()]})


def test_a_virtual_service_without_hosts_is_a_delegate() -> None:
    spec = load("VirtualService", {"http": [route()]}).model.spec
    assert spec.is_delegate
    assert errors("VirtualService", {"http": [{"delegate": {"name": "d"}}]}) == [
        "spec.http[0].delegate: delegate HTTP route cannot contain delegate"
    ]


def test_a_virtual_service_needs_routes() -> None:
    assert errors("VirtualService", {"hosts": ["reviews"]}) == [
        "spec: http, tcp or tls must be provided in virtual service"
    ]


def test_export_to_allows_dot_star_tilde_and_namespaces() -> None:
    assert load("VirtualService", vs(route(), exportTo=[".", "prod"]))
    assert errors("VirtualService", vs(route(), exportTo=["~", "prod"])) == [
        "spec.exportTo: exportTo '~' (export to no one) cannot be combined with other entries"
    ]


# -- DestinationRule -------------------------------------------------------------------------


def test_a_destination_rule_reads_policies_and_subsets() -> None:
    spec = load(
        "DestinationRule",
        {
            "host": "reviews.prod.svc.cluster.local",
            "trafficPolicy": {
                "loadBalancer": {"simple": "LEAST_REQUEST", "warmup": {"duration": "30s"}},
                "connectionPool": {"tcp": {"maxConnections": 100, "connectTimeout": "30ms"}},
                "outlierDetection": {
                    "consecutive5xxErrors": 7,
                    "interval": "5m",
                    "baseEjectionTime": "15m",
                },
                "tls": {"mode": "ISTIO_MUTUAL"},
                "portLevelSettings": [
                    {"port": {"number": 80}, "loadBalancer": {"simple": "RANDOM"}}
                ],
            },
            "subsets": [
                {
                    "name": "v2",
                    "labels": {"version": "v2"},
                    "trafficPolicy": {"tunnel": {"targetHost": "t", "targetPort": 8443}},
                }
            ],
        },
    ).model.spec
    policy = spec.traffic_policy
    assert policy is not None and policy.load_balancer is not None
    assert policy.load_balancer.simple is SimpleLB.LEAST_REQUEST
    assert (
        policy.outlier_detection is not None
        and policy.outlier_detection.consecutive_5xx_errors == 7
    )
    assert policy.outlier_detection.base_ejection_time is not None
    assert policy.outlier_detection.base_ejection_time.seconds == 900
    assert policy.tls is not None and policy.tls.mode is ClientTLSMode.ISTIO_MUTUAL
    assert policy.port_level_settings[0].port.number == 80


def test_subset_names_are_dns_labels_and_unique() -> None:
    assert errors(
        "DestinationRule",
        {"host": "r", "subsets": [{"name": "V1"}, {"name": "v2"}, {"name": "v2"}]},
    ) == [
        "spec.subsets[0].name: subset name is invalid: 'V1' (must be a DNS-1123 label)",
    ]
    assert errors(
        "DestinationRule", {"host": "r", "subsets": [{"name": "v2"}, {"name": "v2"}]}
    ) == ["spec.subsets[1].name: duplicate subset name 'v2'"]


def test_load_balancer_is_simple_or_consistent_hash() -> None:
    lb = {"simple": "RANDOM", "consistentHash": {"useSourceIp": True}}
    assert errors("DestinationRule", {"host": "r", "trafficPolicy": {"loadBalancer": lb}}) == [
        "spec.trafficPolicy.loadBalancer: only one of simple, consistentHash may be set, "
        "got simple, consistentHash"
    ]


def test_locality_distribution_must_add_up_to_100() -> None:
    locality = {"distribute": [{"from": "us-west/*", "to": {"us-west/*": 80, "us-east/*": 10}}]}
    policy = {"loadBalancer": {"localityLbSetting": locality}}
    assert errors("DestinationRule", {"host": "r", "trafficPolicy": policy}) == [
        "spec.trafficPolicy.loadBalancer.localityLbSetting.distribute[0].to: "
        "total locality weight 90 != 100"
    ]


def test_mutual_tls_needs_certificates_unless_a_credential_is_named() -> None:
    assert errors(
        "DestinationRule", {"host": "r", "trafficPolicy": {"tls": {"mode": "MUTUAL"}}}
    ) == [
        "spec.trafficPolicy.tls.clientCertificate: client certificate required for mutual tls",
        "spec.trafficPolicy.tls.privateKey: private key required for mutual tls",
    ]
    assert load(
        "DestinationRule",
        {"host": "r", "trafficPolicy": {"tls": {"mode": "MUTUAL", "credentialName": "c"}}},
    )


# -- Gateway ---------------------------------------------------------------------------------


def server(protocol: str = "HTTP", **extra: Any) -> dict[str, Any]:
    return {"port": {"number": 443, "name": "https", "protocol": protocol}, "hosts": ["*"], **extra}


def test_https_servers_need_tls_settings() -> None:
    assert errors("Gateway", {"servers": [server("HTTPS")]}) == [
        "spec.servers[0].tls: server must have TLS settings for HTTPS/TLS protocols"
    ]
    gw = load(
        "Gateway", {"servers": [server("HTTPS", tls={"mode": "SIMPLE", "credentialName": "cert"})]}
    )
    tls = gw.model.spec.servers[0].tls
    assert tls is not None and tls.mode is ServerTLSMode.SIMPLE


def test_gateway_ports_have_known_protocols_and_unique_names() -> None:
    [message] = errors("Gateway", {"servers": [server("SPDY")]})
    assert message.startswith(
        "spec.servers[0].port.protocol: invalid protocol 'SPDY'; supported protocols are"
    )
    assert errors("Gateway", {"servers": [server(), server()]}) == [
        "spec.servers[1].port.name: port names in servers must be unique: duplicate name https"
    ]


def test_gateway_hosts_may_name_a_namespace() -> None:
    assert load(
        "Gateway", {"servers": [{**server(), "hosts": ["prod/*.example.com", "./a.example.com"]}]}
    )
    assert errors("Gateway", {"servers": [{**server(), "hosts": ["Prod/a"]}]}) == [
        "spec.servers[0].hosts[0]: 'Prod/a': namespace 'Prod' must be '*', '.', '~' or a "
        "namespace name"
    ]


# -- ServiceEntry, WorkloadEntry -------------------------------------------------------------


def test_a_service_entry_reads_with_istio_defaults() -> None:
    spec = load(
        "ServiceEntry", {"hosts": ["api.example.com"], "ports": [{"number": 443, "name": "https"}]}
    ).model.spec
    assert spec.resolution is Resolution.NONE  # proto3 zero value, as in Istio
    assert spec.location.value == "MESH_EXTERNAL"


def test_service_entry_checks_as_istio_does() -> None:
    spec = {
        "hosts": ["*.example.com"],
        "resolution": "DNS",
        "ports": [{"number": 80, "name": "http"}, {"number": 80, "name": "http"}],
    }
    assert errors("ServiceEntry", spec) == [  # in the order of their lines
        "spec.hosts[0]: hosts must be FQDN if no endpoints are provided for resolution mode DNS",
        "spec.ports[1].number: service entry port 80 already defined",
        "spec.ports[1].name: service entry port name 'http' already defined",
    ]
    static = {
        "hosts": ["db.internal"],
        "resolution": "STATIC",
        "ports": [{"number": 5432, "name": "tcp", "protocol": "TCP"}],
        "endpoints": [
            {"address": "10.0.0.1", "ports": {"tcp": 15432}},
            {"address": "db-1", "ports": {"pg": 1}},
        ],
    }
    assert errors("ServiceEntry", static) == [
        "spec.endpoints[1].address: endpoint address 'db-1' is not a valid IP address "
        "(resolution STATIC)",
        "spec.endpoints[1].ports.pg: endpoint port 'pg' is not defined by the service entry",
    ]


def test_a_workload_entry_reads_its_address_and_ports() -> None:
    we = load(
        "WorkloadEntry", {"address": "10.1.2.3", "ports": {"http": 8080}, "labels": {"app": "vm"}}
    ).model.spec
    assert (we.address, we.ports, we.weight) == ("10.1.2.3", {"http": 8080}, 0)


# -- Sidecar ---------------------------------------------------------------------------------


def test_sidecar_egress_hosts_need_a_namespace() -> None:
    assert load("Sidecar", {"egress": [{"hosts": ["./*", "istio-system/*"]}]})
    assert errors("Sidecar", {"egress": [{"hosts": ["reviews"]}]}) == [
        "spec.egress[0].hosts[0]: 'reviews': egress host must be of form 'namespace/dnsName'"
    ]


def test_outbound_traffic_policy_defaults_to_registry_only_as_proto3_does() -> None:
    sidecar = load("Sidecar", {"outboundTrafficPolicy": {}}).model.spec
    assert sidecar.outbound_traffic_policy == OutboundTrafficPolicy()
    assert sidecar.outbound_traffic_policy.mode is OutboundTrafficPolicyMode.REGISTRY_ONLY
    assert errors("Sidecar", {"outboundTrafficPolicy": {"egressProxy": {"host": "proxy"}}}) == [
        "spec.outboundTrafficPolicy: egress_proxy must be set only with ALLOW_ANY "
        "outbound_traffic_policy mode"
    ]


def test_an_empty_sidecar_is_refused() -> None:
    assert errors("Sidecar", {}) == ["spec: sidecar: empty configuration provided"]


def test_service_entry_resolution_rules() -> None:
    rr = {
        "hosts": ["example.com"],
        "resolution": "DNS_ROUND_ROBIN",
        "endpoints": [{"address": "a.example.com"}, {"address": "b.example.com"}],
    }
    assert errors("ServiceEntry", rr) == [
        "spec.endpoints: DNS_ROUND_ROBIN mode cannot have multiple endpoints"
    ]
    cidr = {"hosts": ["example.com"], "addresses": ["10.0.0.0/16"], "resolution": "DNS"}
    assert errors("ServiceEntry", cidr) == [
        "spec.addresses[0]: CIDR addresses are allowed only for NONE/STATIC resolution types"
    ]


def test_a_workload_entry_needs_an_address_but_an_endpoint_may_name_only_a_network() -> None:
    assert errors("WorkloadEntry", {"labels": {"app": "vm"}}) == [
        "spec.address: address is required"
    ]
    remote = {"hosts": ["svc.remote"], "resolution": "DNS", "endpoints": [{"network": "net-2"}]}
    assert load("ServiceEntry", remote).model.spec.endpoints[0].network == "net-2"
