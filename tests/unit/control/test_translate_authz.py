"""AuthorizationPolicy -> RBAC filters, and what the proxy then decides.

Istio's rules cited (istio.io "Authorization Policy" reference and ISTIO-TRANSLATION §6.3):
CUSTOM, then DENY, then -- when the workload has an ALLOW policy -- allow only on a match;
an ALLOW policy with no rules allows nothing and ``rules: [{}]`` everything; selector,
namespace and root-namespace (mesh-wide) scope.
"""

from __future__ import annotations

import textwrap

import pytest
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from meshlet.errors import ConfigError
from meshlet.proxy.filters.rbac import RequestAttributes, compile_rbac, enforce, parse_ip
from meshlet.proxy.headers import Headers, RequestHead
from meshlet.proxy.telemetry.stats import HttpStats
from tests.unit.control.simulation import Simulation, app


def policy(body: str, name: str = "p", namespace: str = "default") -> str:
    return (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        f"metadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n"
        + textwrap.indent(textwrap.dedent(body).strip("\n"), "  ")
        + "\n"
    )


def inbound_filters(sim: Simulation, workload: str = "reviews") -> list[hcm_pb2.HttpFilter]:
    listener = sim.listener(sim.sidecar(workload), "virtualInbound")
    out = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(out)
    return list(out.http_filters)


def rbac_configs(sim: Simulation, workload: str = "reviews") -> list[http_rbac_pb2.RBAC]:
    out = []
    for f in inbound_filters(sim, workload):
        if f.name == "envoy.filters.http.rbac":
            msg = http_rbac_pb2.RBAC()
            f.typed_config.Unpack(msg)
            out.append(msg)
    return out


def decide(
    sim: Simulation,
    method: str = "GET",
    path: str = "/",
    headers: dict[str, str] | None = None,
    principal: str | None = None,
    peer: str = "10.1.1.1",
    workload: str = "reviews",
) -> int:
    """The status the server sidecar's RBAC filters give a request (200: passed on)."""
    filters = tuple(
        compile_rbac(c, f"rbac[{i}]") for i, c in enumerate(rbac_configs(sim, workload))
    )
    head = RequestHead(
        method=method.encode(),
        path=path.encode(),
        authority=b"reviews:9080",
        headers=Headers([(k.encode(), v.encode()) for k, v in (headers or {}).items()]),
    )
    attrs = RequestAttributes(
        head=head,
        direct_remote_ip=parse_ip(peer),
        destination_ip=parse_ip("10.0.0.1"),
        destination_port=9080,
        peer_principal=principal,
    )
    return 200 if enforce(filters, attrs, HttpStats()) is None else 403


APP = app("reviews", service_account="reviews")


def test_no_policy_no_rbac_filter() -> None:
    sim = Simulation(APP)
    assert [f.name for f in inbound_filters(sim)] == [
        "istio.metadata_exchange",
        "envoy.filters.http.fault",
        "istio.stats",
        "envoy.filters.http.router",
    ]


def test_one_filter_per_action_audit_then_deny_then_allow_before_the_others() -> None:
    sim = Simulation(
        APP,
        policy("action: ALLOW\nrules: [{}]", "a"),
        policy("action: DENY\nrules: [{to: [{operation: {paths: [/x]}}]}]", "d"),
        policy("action: AUDIT\nrules: [{}]", "l"),
    )
    names = [f.name for f in inbound_filters(sim)]
    # Istio's order: metadata exchange first, RBAC, then the stats filter before the router.
    assert names[0] == "istio.metadata_exchange"
    assert names[1:4] == ["envoy.filters.http.rbac"] * 3
    assert names[4:] == ["envoy.filters.http.fault", "istio.stats", "envoy.filters.http.router"]
    actions = [c.rules.action for c in rbac_configs(sim)]
    assert actions == [2, 1, 0]  # LOG, DENY, ALLOW
    assert list(rbac_configs(sim)[1].rules.policies) == ["ns[default]-policy[d]-rule[0]"]
    # The proxy compiles exactly what is sent.
    assert len([compile_rbac(c, "") for c in rbac_configs(sim)]) == 3


def test_outbound_listener_has_no_rbac() -> None:
    sim = Simulation(APP, policy("rules: []"))
    listener = sim.listener(sim.sidecar("reviews"), "virtualOutbound")
    out = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(out)
    assert "envoy.filters.http.rbac" not in [f.name for f in out.http_filters]


def test_allow_with_no_rules_allows_nothing_and_an_empty_rule_allows_everything() -> None:
    # istio.io: "allow-nothing" -- a policy with ALLOW and no rules denies every request.
    assert decide(Simulation(APP, policy("action: ALLOW"))) == 403
    assert decide(Simulation(APP, policy("action: ALLOW\nrules: [{}]"))) == 200
    # A DENY policy with no rules denies nothing.
    assert decide(Simulation(APP, policy("action: DENY"))) == 200


def test_deny_by_method_and_path_then_allow_otherwise() -> None:
    sim = Simulation(
        APP,
        policy(
            """
            action: DENY
            rules:
            - to:
              - operation: {methods: [POST], paths: [/admin*]}
            """
        ),
    )
    assert decide(sim, "POST", "/admin/x") == 403
    assert decide(sim, "GET", "/admin/x") == 200
    assert decide(sim, "POST", "/other") == 200


def test_deny_wins_over_allow() -> None:
    sim = Simulation(
        APP,
        policy("action: ALLOW\nrules: [{}]", "all"),
        policy("action: DENY\nrules: [{to: [{operation: {paths: ['/secret']}}]}]", "deny"),
    )
    assert decide(sim, path="/secret") == 403
    assert decide(sim, path="/secret?q=1") == 403  # paths ignore the query
    assert decide(sim, path="/open") == 200


def test_allow_get_only_denies_post() -> None:
    sim = Simulation(APP, policy("action: ALLOW\nrules: [{to: [{operation: {methods: [GET]}}]}]"))
    assert decide(sim, "GET") == 200
    assert decide(sim, "POST") == 403


def test_not_values_and_path_matching_forms() -> None:
    sim = Simulation(
        APP,
        policy(
            """
            rules:
            - to:
              - operation: {paths: ['/exact', '/pre*', '*.png', '/t/{*}/x', '/deep/{**}'],
                            notPaths: ['/pre/no']}
            """
        ),
    )
    assert decide(sim, path="/exact") == 200
    assert decide(sim, path="/exact/") == 403
    assert decide(sim, path="/prefix") == 200
    assert decide(sim, path="/pre/no") == 403
    assert decide(sim, path="/a/b.png") == 200
    assert decide(sim, path="/t/one/x") == 200
    assert decide(sim, path="/t/one/two/x") == 403  # {*} is one segment
    assert decide(sim, path="/deep/a/b/c") == 200


def test_when_header_conditions_and_presence() -> None:
    sim = Simulation(
        APP,
        policy(
            """
            rules:
            - when:
              - key: request.headers[x-token]
                values: ['abc*']
                notValues: [abcd]
            """
        ),
    )
    assert decide(sim, headers={"x-token": "abc1"}) == 200
    assert decide(sim, headers={"x-token": "abcd"}) == 403
    assert decide(sim) == 403
    present = Simulation(
        APP, policy("rules: [{when: [{key: 'request.headers[x-a]', values: ['*']}]}]")
    )
    assert decide(present, headers={"x-a": "1"}) == 200
    assert decide(present) == 403


def test_from_fields_and_within_a_rule_or_between_froms() -> None:
    sim = Simulation(
        APP,
        policy(
            """
            rules:
            - from:
              - source: {principals: [cluster.local/ns/default/sa/productpage]}
              - source: {namespaces: [test]}
              to:
              - operation: {methods: [GET]}
            """
        ),
    )
    pp = "spiffe://cluster.local/ns/default/sa/productpage"
    assert decide(sim, principal=pp) == 200
    assert decide(sim, "POST", principal=pp) == 403  # from AND to
    assert decide(sim, principal="spiffe://cluster.local/ns/test/sa/any") == 200
    assert decide(sim, principal="spiffe://cluster.local/ns/other/sa/productpage") == 403
    # No mTLS, no peer identity: principals never match (istio.io: principals need mTLS).
    assert decide(sim) == 403


def test_service_accounts_ip_blocks_and_source_namespace_conditions() -> None:
    sim = Simulation(APP, policy("rules: [{from: [{source: {serviceAccounts: [test/sleep]}}]}]"))
    assert decide(sim, principal="spiffe://cluster.local/ns/test/sa/sleep") == 200
    assert decide(sim, principal="spiffe://cluster.local/ns/test/sa/sleepy") == 403
    ips = Simulation(
        APP,
        policy("rules: [{from: [{source: {ipBlocks: [10.1.0.0/16], notIpBlocks: [10.1.2.3]}}]}]"),
    )
    assert decide(ips, peer="10.1.9.9") == 200
    assert decide(ips, peer="10.1.2.3") == 403
    assert decide(ips, peer="10.2.0.1") == 403
    ns = Simulation(APP, policy("rules: [{when: [{key: source.namespace, notValues: [evil]}]}]"))
    assert decide(ns, principal="spiffe://cluster.local/ns/good/sa/a") == 200
    assert decide(ns, principal="spiffe://cluster.local/ns/evil/sa/a") == 403


def test_request_principals_need_a_jwt_which_is_absent_today() -> None:
    sim = Simulation(APP, policy("rules: [{from: [{source: {requestPrincipals: ['*']}}]}]"))
    assert decide(sim) == 403
    deny = Simulation(
        APP, policy("action: DENY\nrules: [{from: [{source: {notRequestPrincipals: ['*']}}]}]")
    )
    assert decide(deny) == 403  # istio.io "require a JWT": no token, denied


def test_scope_selector_namespace_and_mesh_wide() -> None:
    other = app("ratings", service_account="ratings")
    sim = Simulation(
        APP,
        other,
        policy("selector: {matchLabels: {app: ratings}}\naction: ALLOW", "only-ratings"),
    )
    assert decide(sim, workload="ratings") == 403
    assert decide(sim, workload="reviews") == 200
    mesh = Simulation(APP, policy("action: ALLOW", "nothing", namespace="istio-system"))
    assert decide(mesh) == 403
    elsewhere = Simulation(APP, policy("action: ALLOW", "nothing", namespace="other"))
    assert decide(elsewhere) == 200


def test_audit_changes_no_decision() -> None:
    sim = Simulation(APP, policy("action: AUDIT\nrules: [{}]"))
    assert decide(sim) == 200
    assert [c.rules.action for c in rbac_configs(sim)] == [2]  # LOG


def test_custom_is_refused_with_a_message() -> None:
    """Refused when applied (no extension mechanism yet), naming the field."""
    with pytest.raises(ConfigError) as e:
        Simulation(APP, policy("action: CUSTOM\nprovider: {name: ext}\nrules: [{}]", "ext"))
    assert "spec.action: CUSTOM is not supported by meshlet yet" in e.value.render()


def test_dry_run_policies_become_shadow_rules_with_istios_stat_prefixes() -> None:
    """istio.io "Dry Run": ``istio.io/dry-run: "true"`` evaluates a policy without enforcing
    it; Envoy carries it as the RBAC filter's ``shadow_rules``."""
    annotated = policy(
        """
            action: DENY
            rules: [{to: [{operation: {paths: ["/headers"]}}]}]
            """,
        name="deny-path-headers",
    ).replace("metadata:\n", 'metadata:\n  annotations: {"istio.io/dry-run": "true"}\n')
    sim = Simulation(APP, annotated)
    [config] = rbac_configs(sim)
    assert not config.HasField("rules")
    assert config.shadow_rules_stat_prefix == "istio_dry_run_deny_"
    assert list(config.shadow_rules.policies) == ["ns[default]-policy[deny-path-headers]-rule[0]"]
    assert decide(sim, path="/headers") == 200
    stats = HttpStats()
    filters = (compile_rbac(config, "rbac"),)
    head = RequestHead(method=b"GET", path=b"/headers", authority=b"reviews", headers=Headers())
    attrs = RequestAttributes(
        head=head,
        direct_remote_ip=parse_ip("10.1.1.1"),
        destination_ip=parse_ip("10.0.0.1"),
        destination_port=9080,
        peer_principal=None,
    )
    assert enforce(filters, attrs, stats) is None
    assert stats.snapshot()["counters"]["rbac.istio_dry_run_deny_shadow_denied"] == 1


def test_a_dry_run_allow_policy_enforces_nothing_beside_an_enforced_one() -> None:
    """Only-dry-run ALLOW policies must not switch the workload to allow-list mode; an
    enforced ALLOW policy next to it still decides alone."""
    dry_allow = policy(
        """
        action: ALLOW
        rules: [{to: [{operation: {methods: ["GET"]}}]}]
        """,
        name="dry",
    ).replace("metadata:\n", 'metadata:\n  annotations: {"istio.io/dry-run": "true"}\n')
    sim = Simulation(APP, dry_allow)
    [config] = rbac_configs(sim)
    assert config.shadow_rules_stat_prefix == "istio_dry_run_allow_"
    assert decide(sim, method="POST") == 200
    enforced = policy(
        """
        action: ALLOW
        rules: [{to: [{operation: {paths: ["/public"]}}]}]
        """,
        name="public",
    )
    sim = Simulation(APP, dry_allow, enforced)
    [config] = rbac_configs(sim)
    assert list(config.rules.policies) == ["ns[default]-policy[public]-rule[0]"]
    assert list(config.shadow_rules.policies) == ["ns[default]-policy[dry]-rule[0]"]
    assert decide(sim, path="/public") == 200
    assert decide(sim, path="/other") == 403
