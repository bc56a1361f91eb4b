"""The RBAC filter's engine (envoyproxy.io "Role Based Access Control (RBAC) Filter";
``rbac.proto``): ALLOW/DENY/LOG actions, shadow rules, Envoy's stats and response details, and
fields refused by name."""

from __future__ import annotations

import pytest
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from google.protobuf import json_format

from meshlet.errors import ConfigError
from meshlet.proxy.filters.rbac import (
    RequestAttributes,
    compile_rbac,
    compile_uri_template,
    enforce,
    parse_ip,
    request_attributes,
)
from meshlet.proxy.headers import Headers, RequestHead
from meshlet.proxy.telemetry.stats import HttpStats


def rbac(config: dict[str, object]) -> http_rbac_pb2.RBAC:
    return json_format.ParseDict(config, http_rbac_pb2.RBAC())


def attrs(method: str = "GET", path: str = "/", **kw: object) -> RequestAttributes:
    head = RequestHead(
        method=method.encode(), path=path.encode(), authority=b"a", headers=Headers()
    )
    return RequestAttributes(head=head, direct_remote_ip=parse_ip("10.0.0.5"), **kw)  # type: ignore[arg-type]


GET_ONLY = {
    "policies": {
        "get": {
            "permissions": [{"header": {"name": ":method", "stringMatch": {"exact": "GET"}}}],
            "principals": [{"any": True}],
        }
    }
}


def test_allow_denies_what_no_policy_matches_with_envoys_details_and_stats() -> None:
    f = compile_rbac(rbac({"rules": {"action": "ALLOW", **GET_ONLY}}), "")
    stats = HttpStats()
    assert enforce((f,), attrs("GET"), stats) is None
    assert enforce((f,), attrs("POST"), stats) == "rbac_access_denied_matched_policy[none]"
    assert (stats.rbac_allowed, stats.rbac_denied) == (1, 1)
    assert stats.snapshot()["counters"]["rbac.denied"] == 1


def test_deny_names_the_matched_policy_and_log_never_denies() -> None:
    deny = compile_rbac(rbac({"rules": {"action": "DENY", **GET_ONLY}}), "")
    assert enforce((deny,), attrs("GET"), HttpStats()) == "rbac_access_denied_matched_policy[get]"
    assert enforce((deny,), attrs("POST"), HttpStats()) is None
    log = compile_rbac(rbac({"rules": {"action": "LOG", **GET_ONLY}}), "")
    assert enforce((log,), attrs("GET"), HttpStats()) is None


def test_shadow_rules_are_counted_but_never_deny() -> None:
    f = compile_rbac(rbac({"shadowRules": {"action": "ALLOW", **GET_ONLY}}), "")
    stats = HttpStats()
    assert enforce((f,), attrs("POST"), stats) is None
    assert (stats.rbac_shadow_denied, stats.rbac_denied) == (1, 0)


def test_authenticated_needs_a_peer_identity_and_ips_use_cidrs() -> None:
    f = compile_rbac(
        rbac(
            {
                "rules": {
                    "policies": {
                        "p": {
                            "permissions": [{"any": True}],
                            "principals": [
                                {
                                    "andIds": {
                                        "ids": [
                                            {
                                                "authenticated": {
                                                    "principalName": {
                                                        "exact": "spiffe://td/ns/a/sa/b"
                                                    }
                                                }
                                            },
                                            {
                                                "directRemoteIp": {
                                                    "addressPrefix": "10.0.0.0",
                                                    "prefixLen": 8,
                                                }
                                            },
                                        ]
                                    }
                                }
                            ],
                        }
                    }
                }
            }
        ),
        "",
    )
    assert enforce((f,), attrs(), HttpStats()) is not None
    assert enforce((f,), attrs(peer_principal="spiffe://td/ns/a/sa/b"), HttpStats()) is None


def test_unsupported_fields_are_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"rules.policies\[p\].condition"):
        compile_rbac(
            rbac(
                {
                    "rules": {
                        "policies": {
                            "p": {
                                "permissions": [{"any": True}],
                                "principals": [{"any": True}],
                                "condition": {"constExpr": {"boolValue": True}},
                            }
                        }
                    }
                }
            ),
            "",
        )
    with pytest.raises(ConfigError, match="matcher"):
        compile_rbac(rbac({"matcher": {}}), "")


def test_uri_templates_match_segments() -> None:
    one = compile_uri_template("/a/*/c", "")
    assert one.fullmatch(b"/a/b/c") and not one.fullmatch(b"/a/b/x/c")
    deep = compile_uri_template("/a/**", "")
    assert deep.fullmatch(b"/a/b/c/d") and deep.fullmatch(b"/a/")
    with pytest.raises(ConfigError):
        compile_uri_template("/a/**/b/*", "")


def test_remote_ip_and_destination_port_from_the_request() -> None:
    head = RequestHead(
        method=b"GET",
        path=b"/",
        authority=b"web:8080",
        headers=Headers([(b"x-forwarded-for", b"1.2.3.4, 5.6.7.8")]),
    )
    a = request_attributes(
        head, peer_ip=b"10.0.0.1", local="10.0.0.2:15006", inbound=True, use_remote_address=False
    )
    assert (str(a.remote_ip), str(a.direct_remote_ip), a.destination_port) == (
        "5.6.7.8",
        "10.0.0.1",
        8080,
    )
    b = request_attributes(
        head, peer_ip=b"10.0.0.1", local="10.0.0.2:80", inbound=False, use_remote_address=True
    )
    assert (str(b.remote_ip), b.destination_port) == ("10.0.0.1", 80)
