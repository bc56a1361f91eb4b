"""The route table: virtual host and route selection, actions, rewrites, header mutations.

Semantics come from Envoy: ``envoy/config/route/v3/route.proto`` and
``route_components.proto``, ``envoy/config/core/v3/base.proto`` (HeaderValueOption), and
ENVOY-SEMANTICS.md §1-§4 (which cite ``source/common/router/config_impl.cc``).
"""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.route.v3 import route_pb2
from google.protobuf import json_format
from hypothesis import given
from hypothesis import strategies as st

from meshlet.errors import ConfigError
from meshlet.proxy.headers import Headers, RequestHead
from meshlet.proxy.routing import (
    EMPTY_MUTATION,
    DirectResponseAction,
    RedirectAction,
    Route,
    RouteAction,
    RouteTable,
    compile_route_config,
)

PATH = "static_resources.listeners[0].filter_chains[0].filters[0].typed_config.route_config"


def table(d: dict[str, Any]) -> RouteTable:
    return compile_route_config(json_format.ParseDict(d, route_pb2.RouteConfiguration()), PATH)


def refused(d: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as e:
        table(d)
    return [(p.path.removeprefix(PATH + "."), p.message) for p in e.value.problems]


def vhost(
    name: str, domains: list[str], routes: list[Any] | None = None, **kw: Any
) -> dict[str, Any]:
    if routes is None:
        routes = [{"match": {"prefix": "/"}, "route": {"cluster": name}}]
    return {"name": name, "domains": domains, "routes": routes, **kw}


def one_route(route: dict[str, Any], **vh: Any) -> dict[str, Any]:
    return {"name": "rc", "virtual_hosts": [vhost("vh", ["*"], [route], **vh)]}


def head(
    path: bytes = b"/",
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    authority: bytes = b"example.com",
    scheme: bytes = b"http",
) -> RequestHead:
    return RequestHead(
        method=b"GET",
        path=path,
        authority=authority,
        headers=Headers(list(headers or [])),
        scheme=scheme,
    )


def route_of(t: RouteTable, h: RequestHead | None = None) -> Route:
    selection = t.select(h or head())
    assert selection is not None and selection.route is not None
    return selection.route


def action_of(t: RouteTable, h: RequestHead | None = None) -> Any:
    return route_of(t, h).action


def vhost_name(t: RouteTable, authority: bytes) -> str | None:
    selection = t.select(head(authority=authority))
    return None if selection is None else selection.virtual_host.name


# --------------------------------------------------------------------------- virtual hosts

DOMAINS = {
    "exact": ["www.foo.com"],
    "suffix-short": ["*.com"],
    "suffix-long": ["*.foo.com"],
    "suffix-dash": ["*-bar.foo.com"],
    "prefix-short": ["www.*"],
    "prefix-long": ["www.foo.*"],
    "default": ["*"],
}


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        (b"www.foo.com", "exact"),
        (b"WWW.Foo.COM", "exact"),  # case-insensitive
        (b"a.foo.com", "suffix-long"),  # longest suffix first
        (b"x-bar.foo.com", "suffix-dash"),
        (b"a.b.com", "suffix-short"),
        (b"www.foo.org", "prefix-long"),  # no suffix matches; longest prefix first
        (b"www.bar.org", "prefix-short"),
        (b"other.org", "default"),
        (b".foo.com", "suffix-short"),  # *.foo.com must cover at least one character
        (b"-bar.foo.com", "suffix-long"),
        (b"www.foo.com:8080", "prefix-long"),  # the port takes part in the comparison
    ],
)
def test_virtual_host_lookup_order(authority: bytes, expected: str) -> None:
    # ENVOY-SEMANTICS §1: exact -> suffix wildcards (longest first) -> prefix wildcards
    # (longest first) -> "*".
    t = table({"virtual_hosts": [vhost(n, d) for n, d in DOMAINS.items()]})
    assert vhost_name(t, authority) == expected


def test_suffix_wildcard_wins_over_prefix_wildcard() -> None:
    t = table({"virtual_hosts": [vhost("p", ["www.foo.*"]), vhost("s", ["*.com"])]})
    assert vhost_name(t, b"www.foo.com") == "s"


def test_port_is_compared_unless_ignore_port_in_host_matching() -> None:
    # route.proto ignore_port_in_host_matching: the port is dropped from the Host only for
    # matching; domains keep theirs.
    vhosts = [vhost("plain", ["example.com"]), vhost("ported", ["example.com:8080"])]
    strict = table({"virtual_hosts": vhosts})
    assert vhost_name(strict, b"example.com:8080") == "ported"
    assert vhost_name(strict, b"example.com:9090") is None
    loose = table({"virtual_hosts": vhosts, "ignore_port_in_host_matching": True})
    assert vhost_name(loose, b"example.com:9090") == "plain"
    assert vhost_name(loose, b"example.com:8080") == "plain"


def test_ignore_port_understands_bracketed_ipv6() -> None:
    t = table({"virtual_hosts": [vhost("v6", ["[::1]"])], "ignore_port_in_host_matching": True})
    assert vhost_name(t, b"[::1]:80") == "v6"
    assert vhost_name(t, b"[::1]") == "v6"


def test_no_matching_virtual_host_selects_nothing() -> None:
    t = table({"virtual_hosts": [vhost("a", ["a.com"])]})
    assert t.select(head(authority=b"b.com")) is None


def test_empty_route_config_selects_nothing() -> None:
    assert table({"name": "empty"}).select(head()) is None


def test_virtual_host_without_matching_route_selects_no_route() -> None:
    t = table(one_route({"match": {"prefix": "/api"}, "route": {"cluster": "c"}}))
    selection = t.select(head(b"/other"))
    assert selection is not None
    assert selection.virtual_host.name == "vh" and selection.route is None


def test_common_case_returns_a_prebuilt_selection() -> None:
    t = table(one_route({"match": {"prefix": "/"}, "route": {"cluster": "c"}}))
    assert t.select(head(b"/a")) is t.select(head(b"/b", authority=b"other"))


@pytest.mark.parametrize(
    "domains", [(["a.com"], ["A.com"]), (["*.a.com"], ["*.a.com"]), (["*"], ["*"])]
)
def test_duplicate_domains_are_refused(domains: tuple[list[str], list[str]]) -> None:
    # ENVOY-SEMANTICS §1: a domain (lower-cased) may appear once in a RouteConfiguration; one "*".
    problems = refused({"virtual_hosts": [vhost("one", domains[0]), vhost("two", domains[1])]})
    assert problems == [
        (
            "virtual_hosts[1].domains[0]",
            f"{domains[1][0]!r} is already a domain of virtual host 'one'",
        )
    ]


def test_virtual_host_needs_a_name_and_a_domain() -> None:
    problems = refused({"virtual_hosts": [{"name": "", "domains": []}]})
    assert ("virtual_hosts[0].name", "must not be empty") in problems
    assert ("virtual_hosts[0].domains", "must list at least one domain") in problems


domain_labels = st.sampled_from(["a", "b", "ab", "a-b", "x"])
hostnames = st.lists(domain_labels, min_size=1, max_size=3).map(".".join)
domains = st.one_of(
    hostnames,
    hostnames.map(lambda h: "*" + h[1:] if len(h) > 1 else "*" + h),
    hostnames.map(lambda h: "*." + h),
    hostnames.map(lambda h: h + ".*"),
    hostnames.map(lambda h: h[:-1] + "*"),
    st.just("*"),
)


def reference_vhost(vhosts: list[tuple[str, list[str]]], host: str) -> str | None:
    """ENVOY-SEMANTICS §1 written as plainly as possible."""
    host = host.lower()
    for name, ds in vhosts:
        if host in ds:
            return name
    suffixes = sorted(
        ((d[1:], n) for n, ds in vhosts for d in ds if d.startswith("*") and d != "*"),
        key=lambda x: -len(x[0]),
    )
    for suffix, name in suffixes:
        if len(host) > len(suffix) and host.endswith(suffix):
            return name
    prefixes = sorted(
        ((d[:-1], n) for n, ds in vhosts for d in ds if d.endswith("*") and not d.startswith("*")),
        key=lambda x: -len(x[0]),
    )
    for prefix, name in prefixes:
        if len(host) > len(prefix) and host.startswith(prefix):
            return name
    for name, ds in vhosts:
        if "*" in ds:
            return name
    return None


@given(
    domain_lists=st.lists(st.lists(domains, min_size=1, max_size=3, unique=True), max_size=4),
    hosts=st.lists(st.one_of(hostnames, hostnames.map(str.upper)), min_size=1, max_size=4),
)
def test_virtual_host_lookup_agrees_with_reference(
    domain_lists: list[list[str]], hosts: list[str]
) -> None:
    seen: set[str] = set()
    vhosts: list[tuple[str, list[str]]] = []
    for i, ds in enumerate(domain_lists):  # drop duplicates: those are config errors
        kept = [d for d in ds if d not in seen]
        seen.update(kept)
        if kept:
            vhosts.append((f"vh{i}", kept))
    t = table({"virtual_hosts": [vhost(n, ds) for n, ds in vhosts]})
    for host in hosts + hosts:  # the second round is answered from the memo
        assert vhost_name(t, host.encode()) == reference_vhost(vhosts, host)


def test_lookup_memo_stays_bounded() -> None:
    t = table({"virtual_hosts": [vhost("a", ["a.com"]), vhost("any", ["*"])]})
    for i in range(3000):
        assert vhost_name(t, b"h%d" % i) == "any"
    assert vhost_name(t, b"a.com") == "a"
    assert vhost_name(t, b"x" * 1000) == "any"
    assert 0 < len(t.memo) <= 1024 and b"x" * 1000 not in t.memo


# --------------------------------------------------------------------------- routes


def test_first_matching_route_wins() -> None:
    t = table(
        one_route({"name": "never", "match": {"prefix": "/nope"}, "route": {"cluster": "x"}})
        | {
            "virtual_hosts": [
                vhost(
                    "vh",
                    ["*"],
                    [
                        {"name": "first", "match": {"prefix": "/a"}, "route": {"cluster": "c1"}},
                        {"name": "second", "match": {"prefix": "/"}, "route": {"cluster": "c2"}},
                        {"name": "third", "match": {"prefix": "/a/b"}, "route": {"cluster": "c3"}},
                    ],
                )
            ]
        }
    )
    assert route_of(t, head(b"/a/b")).name == "first"
    assert route_of(t, head(b"/b")).name == "second"


def test_route_needs_an_action_and_a_match() -> None:
    problems = refused(one_route({"match": {"prefix": "/"}}))
    assert problems == [
        ("virtual_hosts[0].routes[0]", "needs an action: route, redirect or direct_response")
    ]
    assert refused(one_route({"route": {"cluster": "c"}})) == [
        ("virtual_hosts[0].routes[0].match", "is required")
    ]


def test_unsupported_field_is_refused_with_its_full_path() -> None:
    # The brief's own example: cluster_header is refused by name under the given path.
    problems = refused(
        {
            "virtual_hosts": [
                vhost("a", ["a"]),
                vhost("b", ["b"], [{"match": {"prefix": "/"}, "route": {"cluster_header": "x-c"}}]),
            ]
        }
    )
    assert problems == [
        ("virtual_hosts[1].routes[0].route.cluster_header", "is not supported by meshlet")
    ]
    with pytest.raises(ConfigError) as e:
        table(
            {
                "virtual_hosts": [
                    vhost(
                        "b", ["b"], [{"match": {"prefix": "/"}, "route": {"cluster_header": "x"}}]
                    )
                ]
            }
        )
    assert (
        str(e.value)
        == f"{PATH}.virtual_hosts[0].routes[0].route.cluster_header: is not supported by meshlet"
    )


def test_every_problem_in_the_config_is_reported_at_once() -> None:
    problems = refused(
        {
            "vhds": {"config_source": {"ads": {}}},
            "virtual_hosts": [
                vhost(
                    "a",
                    ["a"],
                    [
                        {
                            "match": {"prefix": "/"},
                            "decorator": {"operation": "x"},
                            "route": {"cluster": "c"},
                        },
                        {"match": {"prefix": "/"}, "route": {"cluster": "c", "cors": {}}},
                    ],
                    cors={},
                    require_tls="ALL",
                    request_mirror_policies=[{"cluster": ""}],
                )
            ],
        }
    )
    assert problems == [
        ("vhds", "is not supported by meshlet"),
        ("virtual_hosts[0].cors", "is not supported by meshlet"),
        ("virtual_hosts[0].require_tls", "is not supported by meshlet (only NONE)"),
        ("virtual_hosts[0].request_mirror_policies[0].cluster", "must not be empty"),
        ("virtual_hosts[0].routes[0].decorator", "is not supported by meshlet"),
        ("virtual_hosts[0].routes[1].route.cors", "is not supported by meshlet"),
    ]


# --------------------------------------------------------------------------- cluster choice


def test_single_cluster_action_defaults() -> None:
    # route_components.proto RouteAction: timeout defaults to 15 s; idle_timeout unset means
    # the HCM's stream_idle_timeout.
    t = table(one_route({"match": {"prefix": "/"}, "route": {"cluster": "reviews"}}))
    action = action_of(t)
    assert isinstance(action, RouteAction)
    assert action.choose_cluster(head(), 12345).name == "reviews"
    assert action.timeout == 15.0 and action.idle_timeout is None
    assert action.retry_policy is None and action.mirrors == () and action.hash_policy is None
    assert t.referenced_clusters() == {"reviews"}


def test_timeouts_zero_disables_and_durations_are_seconds() -> None:
    t = table(
        one_route(
            {
                "match": {"prefix": "/"},
                "route": {"cluster": "c", "timeout": "0s", "idle_timeout": "2.5s"},
            }
        )
    )
    assert action_of(t).timeout == 0.0 and action_of(t).idle_timeout == 2.5


def test_negative_timeout_is_refused() -> None:
    route = {"match": {"prefix": "/"}, "route": {"cluster": "c", "idle_timeout": "-1s"}}
    assert refused(one_route(route)) == [
        ("virtual_hosts[0].routes[0].route.idle_timeout", "must not be negative")
    ]


WEIGHTED = {
    "match": {"prefix": "/"},
    "route": {
        "weighted_clusters": {
            "clusters": [
                {"name": "v1", "weight": 10},
                {"name": "zero", "weight": 0},
                {"name": "v2", "weight": 30},
                {"name": "v3", "weight": 60},
            ]
        }
    },
}


@pytest.mark.parametrize(
    ("rand", "expected"),
    [
        (0, "v1"),
        (9, "v1"),
        (10, "v2"),
        (39, "v2"),
        (40, "v3"),
        (99, "v3"),
        (100, "v1"),
        (2**64 - 1, "v2"),
    ],
)
def test_weighted_clusters_use_cumulative_intervals_in_config_order(
    rand: int, expected: str
) -> None:
    # ENVOY-SEMANTICS §3 (weighted_cluster_specifier.cc): rand % total picks the cluster whose
    # [sum_before, sum_before + weight) contains it. (2**64-1) % 100 == 15.
    assert action_of(table(one_route(WEIGHTED))).choose_cluster(head(), rand).name == expected


@given(
    weights=st.lists(st.integers(min_value=0, max_value=1000), min_size=1, max_size=6).filter(any),
    rand=st.integers(min_value=0, max_value=2**64 - 1),
)
def test_weighted_choice_agrees_with_reference_and_never_picks_zero_weight(
    weights: list[int], rand: int
) -> None:
    route = {
        "match": {"prefix": "/"},
        "route": {
            "weighted_clusters": {
                "clusters": [{"name": f"c{i}", "weight": w} for i, w in enumerate(weights)]
            }
        },
    }
    chosen = action_of(table(one_route(route))).choose_cluster(head(), rand).name
    r = rand % sum(weights)
    expected = None
    for i, w in enumerate(weights):
        if r < w:
            expected = f"c{i}"
            break
        r -= w
    assert chosen == expected
    assert weights[int(chosen[1:])] > 0


def test_weighted_clusters_are_all_referenced_even_with_zero_weight() -> None:
    assert table(one_route(WEIGHTED)).referenced_clusters() == {"v1", "zero", "v2", "v3"}


def test_weighted_clusters_must_have_positive_total() -> None:
    route = {
        "match": {"prefix": "/"},
        "route": {"weighted_clusters": {"clusters": [{"name": "a", "weight": 0}]}},
    }
    assert refused(one_route(route)) == [
        (
            "virtual_hosts[0].routes[0].route.weighted_clusters.clusters",
            "weights must sum to between 1 and 4294967295, not 0",
        )
    ]


def test_deprecated_total_weight_must_equal_the_sum() -> None:
    route = {
        "match": {"prefix": "/"},
        "route": {
            "weighted_clusters": {"clusters": [{"name": "a", "weight": 1}], "total_weight": 100}
        },
    }
    [(path, message)] = refused(one_route(route))
    assert path.endswith("weighted_clusters.total_weight") and "sum to 1" in message


def test_weighted_cluster_carries_its_own_headers_and_host_rewrite() -> None:
    route = {
        "match": {"prefix": "/"},
        "route": {
            "weighted_clusters": {
                "clusters": [
                    {
                        "name": "v1",
                        "weight": 1,
                        "host_rewrite_literal": "v1.internal",
                        "request_headers_to_add": [{"header": {"key": "x-subset", "value": "v1"}}],
                        "response_headers_to_add": [{"header": {"key": "x-from", "value": "v1"}}],
                    }
                ]
            }
        },
    }
    choice = action_of(table(one_route(route))).choose_cluster(head(), 0)
    assert choice.host_rewrite == b"v1.internal"
    hs = Headers()
    choice.request_mutation.apply(hs)
    choice.response_mutation.apply(hs)
    assert hs.items == [(b"x-subset", b"v1"), (b"x-from", b"v1")]


def test_single_cluster_choice_has_nothing_of_its_own() -> None:
    choice = action_of(
        table(one_route({"match": {"prefix": "/"}, "route": {"cluster": "c"}}))
    ).choose_cluster(head(), 0)
    assert (
        choice.request_mutation is EMPTY_MUTATION
        and choice.host_rewrite is None
        and choice.fault is None
    )


# --------------------------------------------------------------------------- header mutations


def add(key: str, value: str, action: str | None = None, **kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"header": {"key": key, "value": value}, **kw}
    if action:
        d["append_action"] = action
    return d


def layered(most_specific_wins: bool = False) -> RouteTable:
    return table(
        {
            "most_specific_header_mutations_wins": most_specific_wins,
            "request_headers_to_add": [
                add("x-level", "config", "OVERWRITE_IF_EXISTS_OR_ADD"),
                add("x-all", "config"),
            ],
            "virtual_hosts": [
                vhost(
                    "vh",
                    ["*"],
                    [
                        {
                            "match": {"prefix": "/"},
                            "route": {"cluster": "c"},
                            "request_headers_to_add": [
                                add("x-level", "route", "OVERWRITE_IF_EXISTS_OR_ADD"),
                                add("x-all", "route"),
                            ],
                        }
                    ],
                    request_headers_to_add=[
                        add("x-level", "vhost", "OVERWRITE_IF_EXISTS_OR_ADD"),
                        add("x-all", "vhost"),
                    ],
                )
            ],
        }
    )


def test_least_specific_level_wins_by_default() -> None:
    # route.proto most_specific_header_mutations_wins (default false): route, then vhost, then
    # route configuration, so the configuration's overwrite is last.
    hs = Headers()
    route_of(layered()).request_mutation.apply(hs)
    assert hs.get(b"x-level") == b"config"
    assert hs.get_all(b"x-all") == [b"route", b"vhost", b"config"]


def test_most_specific_header_mutations_wins_reverses_the_order() -> None:
    hs = Headers()
    route_of(layered(True)).request_mutation.apply(hs)
    assert hs.get(b"x-level") == b"route"
    assert hs.get_all(b"x-all") == [b"config", b"vhost", b"route"]


def mutation(adds: list[dict[str, Any]], removes: list[str] | None = None) -> Any:
    route = {
        "match": {"prefix": "/"},
        "route": {"cluster": "c"},
        "request_headers_to_add": adds,
        "request_headers_to_remove": removes or [],
    }
    return route_of(table(one_route(route))).request_mutation


@pytest.mark.parametrize(
    ("action", "before", "after"),
    [
        ("APPEND_IF_EXISTS_OR_ADD", [(b"x", b"old")], [(b"x", b"old"), (b"x", b"new")]),
        ("APPEND_IF_EXISTS_OR_ADD", [], [(b"x", b"new")]),
        ("ADD_IF_ABSENT", [(b"x", b"old")], [(b"x", b"old")]),
        ("ADD_IF_ABSENT", [], [(b"x", b"new")]),
        ("OVERWRITE_IF_EXISTS_OR_ADD", [(b"x", b"old"), (b"x", b"old2")], [(b"x", b"new")]),
        ("OVERWRITE_IF_EXISTS_OR_ADD", [], [(b"x", b"new")]),
        ("OVERWRITE_IF_EXISTS", [(b"x", b"old")], [(b"x", b"new")]),
        ("OVERWRITE_IF_EXISTS", [], []),
    ],
)
def test_append_actions(
    action: str, before: list[tuple[bytes, bytes]], after: list[tuple[bytes, bytes]]
) -> None:
    # base.proto HeaderValueOption.HeaderAppendAction.
    hs = Headers(list(before))
    mutation([add("x", "new", action)]).apply(hs)
    assert hs.items == after


@pytest.mark.parametrize(
    ("append", "after"), [(True, [(b"x", b"old"), (b"x", b"new")]), (False, [(b"x", b"new")])]
)
def test_deprecated_append_bool(append: bool, after: list[tuple[bytes, bytes]]) -> None:
    # base.proto: append true = APPEND_IF_EXISTS_OR_ADD, false = OVERWRITE_IF_EXISTS_OR_ADD.
    hs = Headers([(b"x", b"old")])
    mutation([add("x", "new", append=append)]).apply(hs)
    assert hs.items == after


def test_append_and_append_action_together_are_refused() -> None:
    with pytest.raises(ConfigError, match="sets both append and append_action"):
        mutation([add("x", "v", "ADD_IF_ABSENT", append=True)])


def test_removals_run_before_additions_within_a_level() -> None:
    hs = Headers([(b"x", b"old"), (b"y", b"keep")])
    mutation([add("x", "new")], removes=["x"]).apply(hs)
    assert hs.items == [(b"y", b"keep"), (b"x", b"new")]


def test_conditional_actions_look_at_the_headers_before_the_level_adds() -> None:
    # header_parser.cc evaluateHeaders: decide every entry first, then overwrite, then append.
    hs = Headers()
    mutation(
        [
            add("x", "a", "ADD_IF_ABSENT"),
            add("x", "b", "ADD_IF_ABSENT"),
            add("y", "c", "OVERWRITE_IF_EXISTS"),
        ]
    ).apply(hs)
    assert hs.items == [(b"x", b"a"), (b"x", b"b")]
    hs = Headers()
    mutation([add("x", "appended"), add("x", "set", "OVERWRITE_IF_EXISTS_OR_ADD")]).apply(hs)
    assert hs.items == [(b"x", b"set"), (b"x", b"appended")]


def test_empty_values_are_dropped_unless_keep_empty_value() -> None:
    hs = Headers()
    mutation([add("x-empty", ""), add("x-kept", "", keep_empty_value=True)]).apply(hs)
    assert hs.items == [(b"x-kept", b"")]


def test_header_names_are_lower_cased() -> None:
    hs = Headers([(b"x-gone", b"1")])
    mutation([add("X-Added", "v")], removes=["X-Gone"]).apply(hs)
    assert hs.items == [(b"x-added", b"v")]


def test_double_percent_is_a_literal_percent() -> None:
    hs = Headers()
    mutation([add("x", "100%% sure")]).apply(hs)
    assert hs.items == [(b"x", b"100% sure")]


def test_raw_value_is_used_verbatim() -> None:
    hs = Headers()
    mutation([{"header": {"key": "x", "raw_value": "YmluYXJ5"}}]).apply(hs)  # base64 "binary"
    assert hs.items == [(b"x", b"binary")]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "%REQ(x-foo)%",
            "uses %REQ(x-foo)%, which meshlet does not support: only literal values and %%",
        ),
        ("50%", "has a lone '%'; write '%%' for a literal percent sign"),
        ("a\r\nb: c", "must not contain NUL, CR or LF"),
    ],
)
def test_unsupported_or_unsafe_values_are_refused_naming_the_field(
    value: str, message: str
) -> None:
    route = {
        "match": {"prefix": "/"},
        "route": {"cluster": "c"},
        "response_headers_to_add": [add("ok", "1"), add("x", value)],
    }
    assert refused(one_route(route)) == [
        ("virtual_hosts[0].routes[0].response_headers_to_add[1].header.value", message)
    ]


@pytest.mark.parametrize("name", [":path", ":authority", "host", "Host", ":status"])
def test_pseudo_headers_and_host_cannot_be_added_or_removed(name: str) -> None:
    # header_parser.cc: pseudo-headers and Host are refused (ENVOY-SEMANTICS §4).
    config = {
        "request_headers_to_remove": [name],
        "virtual_hosts": [vhost("vh", ["*"], response_headers_to_add=[add(name, "v")])],
    }
    assert [p for p, _ in refused(config)] == [
        "request_headers_to_remove[0]",
        "virtual_hosts[0].response_headers_to_add[0].header.key",
    ]


def test_response_mutations_merge_levels_and_weighted_cluster_runs_first() -> None:
    route = {
        "match": {"prefix": "/"},
        "route": {
            "weighted_clusters": {
                "clusters": [
                    {"name": "a", "weight": 1, "response_headers_to_add": [add("x", "cluster")]}
                ]
            }
        },
        "response_headers_to_add": [add("x", "route")],
    }
    t = table(
        {
            "response_headers_to_add": [add("x", "config")],
            "virtual_hosts": [
                vhost("vh", ["*"], [route], response_headers_to_add=[add("x", "vhost")])
            ],
        }
    )
    r = route_of(t)
    hs = Headers()
    r.finalize_response(hs, action_of(t).choose_cluster(head(), 0))
    assert hs.get_all(b"x") == [b"cluster", b"route", b"vhost", b"config"]
    selection = t.select(head())
    assert selection is not None
    hs = Headers()
    selection.virtual_host.response_mutation.apply(hs)  # for local replies without a route
    assert hs.get_all(b"x") == [b"vhost", b"config"]


# --------------------------------------------------------------------------- rewrites


def rewritten(
    route_match: dict[str, Any], route_action: dict[str, Any], path: bytes, **kw: Any
) -> RequestHead:
    t = table(one_route({"match": route_match, "route": {"cluster": "c", **route_action}}))
    h = head(path, **kw)
    r = route_of(t, h)
    r.finalize_request(h, action_of(t, h).choose_cluster(h, 0))
    return h


@pytest.mark.parametrize(
    ("prefix", "rewrite", "path", "expected"),
    [
        ("/prefix/", "/", b"/prefix/etc", b"/etc"),
        ("/prefix", "/", b"/prefix/etc", b"//etc"),  # the proto's trailing-slash caveat
        ("/api", "/v2", b"/api/x?q=1", b"/v2/x?q=1"),  # the query is kept
        ("/API", "/v2", b"/api/x", b"/v2/x"),
    ],
)
def test_prefix_rewrite_replaces_the_matched_prefix(
    prefix: str, rewrite: str, path: bytes, expected: bytes
) -> None:
    # route_components.proto RouteAction.prefix_rewrite.
    h = rewritten(
        {"prefix": prefix, "case_sensitive": prefix != "/API"}, {"prefix_rewrite": rewrite}, path
    )
    assert h.path == expected
    assert h.headers.get(b"x-envoy-original-path") == path


def test_prefix_rewrite_with_exact_path_and_separated_prefix() -> None:
    assert rewritten({"path": "/old"}, {"prefix_rewrite": "/new"}, b"/old?x").path == b"/new?x"
    assert (
        rewritten({"path_separated_prefix": "/old"}, {"prefix_rewrite": "/new"}, b"/old/a").path
        == b"/new/a"
    )


def test_prefix_rewrite_on_a_regex_route_replaces_the_whole_path() -> None:
    h = rewritten(
        {"safe_regex": {"regex": "/v[0-9]/.*"}}, {"prefix_rewrite": "/latest"}, b"/v1/a/b?q"
    )
    assert h.path == b"/latest?q"


def test_regex_rewrite_substitutes_every_match_and_keeps_the_query() -> None:
    # route_components.proto regex_rewrite examples: capture groups are \N.
    h = rewritten(
        {"prefix": "/"},
        {
            "regex_rewrite": {
                "pattern": {"regex": "^/service/([^/]+)(/.*)$"},
                "substitution": "\\2/instance/\\1",
            }
        },
        b"/service/foo/v1/api?x=1",
    )
    assert h.path == b"/v1/api/instance/foo?x=1"
    h = rewritten(
        {"prefix": "/"},
        {"regex_rewrite": {"pattern": {"regex": "one"}, "substitution": "two"}},
        b"/xxx/one/yyy/one/zzz",
    )
    assert h.path == b"/xxx/two/yyy/two/zzz"


def test_regex_rewrite_with_empty_result_leaves_the_path() -> None:
    h = rewritten(
        {"prefix": "/"}, {"regex_rewrite": {"pattern": {"regex": ".*"}, "substitution": ""}}, b"/a"
    )
    assert h.path == b"/a" and b"x-envoy-original-path" not in h.headers


def test_regex_rewrite_refuses_unknown_groups_and_escapes() -> None:
    for sub, msg in [("\\2", "refers to group \\2"), ("\\n", "invalid escape")]:
        route = {
            "match": {"prefix": "/"},
            "route": {
                "cluster": "c",
                "regex_rewrite": {"pattern": {"regex": "(a)"}, "substitution": sub},
            },
        }
        [(path, message)] = refused(one_route(route))
        assert path.endswith("route.regex_rewrite.substitution") and msg in message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("prefix_rewrite", "/a b"),
        ("prefix_rewrite", "/a\r\nx: y"),
        ("regex_rewrite", {"pattern": {"regex": "a"}, "substitution": "b c"}),
    ],
)
def test_rewrites_that_would_break_the_request_line_are_refused(field: str, value: Any) -> None:
    route = {"match": {"prefix": "/"}, "route": {"cluster": "c", field: value}}
    [(_, message)] = refused(one_route(route))
    assert message == "must not contain spaces or control characters"


def test_unknown_append_action_is_refused() -> None:
    with pytest.raises(ConfigError, match="7 is not a known action"):
        mutation([{"header": {"key": "x", "value": "v"}, "append_action": 7}])


def test_prefix_and_regex_rewrite_together_are_refused() -> None:
    route = {
        "match": {"prefix": "/"},
        "route": {
            "cluster": "c",
            "prefix_rewrite": "/x",
            "regex_rewrite": {"pattern": {"regex": "a"}, "substitution": "b"},
        },
    }
    assert refused(one_route(route)) == [
        ("virtual_hosts[0].routes[0].route", "sets both prefix_rewrite and regex_rewrite; set one")
    ]


def test_host_rewrite_literal_replaces_the_authority_and_records_the_original() -> None:
    h = rewritten(
        {"prefix": "/"},
        {"host_rewrite_literal": "internal.svc"},
        b"/",
        headers=[(b"host", b"example.com")],
    )
    assert h.authority == b"internal.svc"
    assert h.headers.get(b"host") == b"internal.svc"
    assert h.headers.get(b"x-envoy-original-host") == b"example.com"


def test_suppress_envoy_headers_skips_original_path_and_host() -> None:
    t = table(
        one_route(
            {
                "match": {"prefix": "/a"},
                "route": {"cluster": "c", "prefix_rewrite": "/b", "host_rewrite_literal": "h"},
            }
        )
    )
    h = head(b"/a")
    action = action_of(t, h)
    action.rewrite(h, None, suppress_envoy_headers=True)
    assert (h.path, h.authority, h.headers.items) == (b"/b", b"h", [])


def test_route_host_rewrite_wins_over_the_weighted_clusters() -> None:
    # config_impl.cc: the weighted cluster's host is set first, the route's later.
    route = {
        "match": {"prefix": "/"},
        "route": {
            "host_rewrite_literal": "route",
            "weighted_clusters": {
                "clusters": [{"name": "a", "weight": 1, "host_rewrite_literal": "cluster"}]
            },
        },
    }
    t = table(one_route(route))
    h = head()
    route_of(t).finalize_request(h, action_of(t).choose_cluster(h, 0))
    assert h.authority == b"route"
    route["route"].pop("host_rewrite_literal")
    t = table(one_route(route))
    h = head()
    route_of(t).finalize_request(h, action_of(t).choose_cluster(h, 0))
    assert h.authority == b"cluster"


def test_finalize_request_runs_cluster_then_route_headers_then_rewrites() -> None:
    route = {
        "match": {"prefix": "/a"},
        "route": {
            "prefix_rewrite": "/b",
            "weighted_clusters": {
                "clusters": [
                    {"name": "a", "weight": 1, "request_headers_to_add": [add("x", "cluster")]}
                ]
            },
        },
        "request_headers_to_add": [add("x", "route")],
    }
    t = table(one_route(route))
    h = head(b"/a")
    route_of(t, h).finalize_request(h, action_of(t, h).choose_cluster(h, 0))
    assert h.headers.items == [
        (b"x", b"cluster"),
        (b"x", b"route"),
        (b"x-envoy-original-path", b"/a"),
    ]
    assert h.path == b"/b"


# --------------------------------------------------------------------------- redirects


def redirect(
    spec: dict[str, Any],
    path: bytes = b"/old/page?q=1",
    match: dict[str, Any] | None = None,
    **kw: Any,
) -> tuple[int, bytes]:
    t = table(one_route({"match": match or {"prefix": "/old"}, "redirect": spec}))
    h = head(path, **kw)
    action = action_of(t, h)
    assert isinstance(action, RedirectAction)
    return action.response(h)


@pytest.mark.parametrize(
    ("spec", "kw", "expected"),
    [
        ({}, {}, (301, b"http://example.com/old/page?q=1")),
        (
            {"https_redirect": True},
            {"authority": b"example.com:80"},
            (301, b"https://example.com/old/page?q=1"),
        ),
        (
            {"https_redirect": True},
            {"authority": b"example.com:8080"},
            (301, b"https://example.com:8080/old/page?q=1"),
        ),
        (
            {"scheme_redirect": "http"},
            {"authority": b"a:443", "scheme": b"https"},
            (301, b"http://a/old/page?q=1"),
        ),
        (
            {"host_redirect": "new.com"},
            {"authority": b"old.com:81"},
            (301, b"http://new.com/old/page?q=1"),
        ),
        (
            {"port_redirect": 8443},
            {"authority": b"a.com:81"},
            (301, b"http://a.com:8443/old/page?q=1"),
        ),
        ({"path_redirect": "/new"}, {}, (301, b"http://example.com/new?q=1")),
        (
            {"path_redirect": "/new?x=2", "strip_query": True},
            {},
            (301, b"http://example.com/new?x=2"),
        ),
        ({"path_redirect": "/new", "strip_query": True}, {}, (301, b"http://example.com/new")),
        ({"prefix_rewrite": "/fresh"}, {}, (301, b"http://example.com/fresh/page?q=1")),
        (
            {"regex_rewrite": {"pattern": {"regex": "page"}, "substitution": "leaf"}},
            {},
            (301, b"http://example.com/old/leaf?q=1"),
        ),
        ({"response_code": "FOUND"}, {}, (302, b"http://example.com/old/page?q=1")),
        ({"response_code": "SEE_OTHER"}, {}, (303, b"http://example.com/old/page?q=1")),
        ({"response_code": "TEMPORARY_REDIRECT"}, {}, (307, b"http://example.com/old/page?q=1")),
        ({"response_code": "PERMANENT_REDIRECT"}, {}, (308, b"http://example.com/old/page?q=1")),
        (
            {"https_redirect": True},
            {"authority": b"[::1]:80"},
            (301, b"https://[::1]/old/page?q=1"),
        ),
    ],
)
def test_redirect_location(
    spec: dict[str, Any], kw: dict[str, Any], expected: tuple[int, bytes]
) -> None:
    # ENVOY-SEMANTICS §3 redirect table; http/utility.cc newUri and processRequestHost.
    assert redirect(spec, **kw) == expected


def test_redirect_port_stripping_follows_x_forwarded_proto() -> None:
    # processRequestHost judges the port by x-forwarded-proto, not the connection.
    _, location = redirect(
        {"https_redirect": True}, authority=b"a:80", headers=[(b"x-forwarded-proto", b"https")]
    )
    assert location == b"https://a:80/old/page?q=1"


def test_redirect_path_without_leading_slash_gets_one() -> None:
    assert redirect({"path_redirect": "new"}, b"/old")[1] == b"http://example.com/new"


def test_direct_response_status_and_body() -> None:
    t = table(
        one_route(
            {
                "match": {"prefix": "/"},
                "direct_response": {"status": 503, "body": {"inline_string": "down"}},
            }
        )
    )
    action = action_of(t)
    assert isinstance(action, DirectResponseAction)
    assert (action.status, action.body, action.location(head())) == (503, b"down", None)


@pytest.mark.parametrize(
    ("spec", "path", "message"),
    [
        ({"status": 100}, "status", "must be in [200, 600), not 100"),
        ({"status": 600}, "status", "must be in [200, 600), not 600"),
        (
            {"status": 200, "body": {"filename": "/etc/passwd"}},
            "body.filename",
            "is not supported by meshlet",
        ),
        (
            {"status": 200, "body": {"inline_string": "x" * 4097}},
            "body",
            "is 4097 bytes, more than max_direct_response_body_size_bytes (4096)",
        ),
    ],
)
def test_direct_response_refusals(spec: dict[str, Any], path: str, message: str) -> None:
    # route_components.proto DirectResponseAction: status in [200, 600); route.proto
    # max_direct_response_body_size_bytes defaults to 4096.
    assert refused(one_route({"match": {"prefix": "/"}, "direct_response": spec})) == [
        (f"virtual_hosts[0].routes[0].direct_response.{path}", message)
    ]


def test_direct_response_body_limit_is_configurable() -> None:
    t = table(
        one_route(
            {
                "match": {"prefix": "/"},
                "direct_response": {"status": 200, "body": {"inline_string": "x" * 5000}},
            }
        )
        | {"max_direct_response_body_size_bytes": 8192}
    )
    assert len(action_of(t).body) == 5000


def test_direct_response_3xx_carries_the_request_url_as_location() -> None:
    t = table(one_route({"match": {"prefix": "/"}, "direct_response": {"status": 301}}))
    assert action_of(t).location(head(b"/x?y", authority=b"a.com")) == b"http://a.com/x?y"


# --------------------------------------------------------------------------- hash policy


def hash_policy(policies: list[dict[str, Any]]) -> Any:
    t = table(
        one_route({"match": {"prefix": "/"}, "route": {"cluster": "c", "hash_policy": policies}})
    )
    return action_of(t).hash_policy


def test_header_hash_needs_the_header_and_ignores_value_order() -> None:
    hp = hash_policy([{"header": {"header_name": "X-User"}}])
    assert hp.compute(head(), b"10.0.0.1") is None
    one = hp.compute(head(headers=[(b"x-user", b"a"), (b"x-user", b"b")]), b"")
    two = hp.compute(head(headers=[(b"x-user", b"b"), (b"x-user", b"a")]), b"")
    assert one == two is not None
    assert hp.compute(head(headers=[(b"x-user", b"a")]), b"") != one


def test_cookie_hash_reads_the_named_cookie() -> None:
    hp = hash_policy([{"cookie": {"name": "session"}}])
    a = hp.compute(head(headers=[(b"cookie", b"x=1; session=abc")]), b"")
    b = hp.compute(head(headers=[(b"cookie", b"y=2"), (b"cookie", b'session="abc"')]), b"")
    assert a == b is not None
    assert hp.compute(head(headers=[(b"cookie", b"sessionx=abc")]), b"") is None


def test_cookie_ttl_is_refused_with_a_reason() -> None:
    route = {
        "match": {"prefix": "/"},
        "route": {"cluster": "c", "hash_policy": [{"cookie": {"name": "s", "ttl": "10s"}}]},
    }
    [(path, message)] = refused(one_route(route))
    assert path == "virtual_hosts[0].routes[0].route.hash_policy[0].cookie.ttl"
    assert "does not generate cookies" in message


def test_source_ip_and_query_parameter_hashes() -> None:
    ip = hash_policy([{"connection_properties": {"source_ip": True}}])
    assert ip.compute(head(), b"10.0.0.1") == ip.compute(head(b"/other"), b"10.0.0.1") is not None
    assert ip.compute(head(), b"10.0.0.1") != ip.compute(head(), b"10.0.0.2")
    q = hash_policy([{"query_parameter": {"name": "user"}}])
    assert (
        q.compute(head(b"/?user=a&user=b"), b"") == q.compute(head(b"/x?user=a"), b"") is not None
    )
    assert q.compute(head(b"/?User=a"), b"") is None  # names are case-sensitive


def test_hash_methods_combine_deterministically_and_terminal_stops() -> None:
    # route_components.proto HashPolicy.terminal: stop at the first policy that produced a hash.
    h = head(headers=[(b"a", b"1"), (b"b", b"2")])
    combined = hash_policy([{"header": {"header_name": "a"}}, {"header": {"header_name": "b"}}])
    first_only = hash_policy(
        [{"header": {"header_name": "a"}, "terminal": True}, {"header": {"header_name": "b"}}]
    )
    only_a = hash_policy([{"header": {"header_name": "a"}}])
    assert combined.compute(h, b"") == combined.compute(h, b"")
    assert combined.compute(h, b"") != only_a.compute(h, b"")
    assert first_only.compute(h, b"") == only_a.compute(h, b"")
    # A terminal policy that produced nothing does not stop the next one.
    skip = hash_policy(
        [{"header": {"header_name": "missing"}, "terminal": True}, {"header": {"header_name": "b"}}]
    )
    assert skip.compute(h, b"") == hash_policy([{"header": {"header_name": "b"}}]).compute(h, b"")


def test_duplicate_hash_rules_do_not_cancel_out() -> None:
    h = head(headers=[(b"a", b"1")])
    twice = hash_policy([{"header": {"header_name": "a"}}, {"header": {"header_name": "a"}}])
    assert twice.compute(h, b"") not in (0, None)


def test_filter_state_hash_is_refused() -> None:
    route = {
        "match": {"prefix": "/"},
        "route": {"cluster": "c", "hash_policy": [{"filter_state": {"key": "k"}}]},
    }
    assert refused(one_route(route)) == [
        (
            "virtual_hosts[0].routes[0].route.hash_policy[0].filter_state",
            "is not supported by meshlet",
        )
    ]


# --------------------------------------------------------------------------- mirrors, retries


def test_route_mirrors_replace_the_virtual_hosts() -> None:
    # ENVOY-SEMANTICS §3: the most specific non-empty list wins, no merge.
    vh_mirrors = [{"cluster": "vh-shadow"}]
    t = table(
        {
            "virtual_hosts": [
                vhost(
                    "vh",
                    ["*"],
                    [
                        {
                            "match": {"prefix": "/own"},
                            "route": {
                                "cluster": "c",
                                "request_mirror_policies": [
                                    {
                                        "cluster": "route-shadow",
                                        "runtime_fraction": {"default_value": {"numerator": 25}},
                                    }
                                ],
                            },
                        },
                        {"match": {"prefix": "/"}, "route": {"cluster": "c"}},
                    ],
                    request_mirror_policies=vh_mirrors,
                )
            ]
        }
    )
    own = action_of(t, head(b"/own")).mirrors
    assert [(m.cluster, m.fraction) for m in own] == [("route-shadow", 0.25)]
    assert [(m.cluster, m.fraction) for m in action_of(t, head(b"/x")).mirrors] == [
        ("vh-shadow", 1.0)
    ]
    assert t.referenced_clusters() == {"c", "route-shadow", "vh-shadow"}


def test_mirror_fraction_uses_the_denominator_and_caps_at_one() -> None:
    def fraction(pct: dict[str, Any]) -> float:
        route = {
            "match": {"prefix": "/"},
            "route": {
                "cluster": "c",
                "request_mirror_policies": [
                    {"cluster": "m", "runtime_fraction": {"default_value": pct}}
                ],
            },
        }
        return float(action_of(table(one_route(route))).mirrors[0].fraction)

    assert fraction({"numerator": 5, "denominator": "TEN_THOUSAND"}) == 0.0005
    assert fraction({"numerator": 200}) == 1.0


def test_mirror_runtime_key_is_refused() -> None:
    route = {
        "match": {"prefix": "/"},
        "route": {
            "cluster": "c",
            "request_mirror_policies": [{"cluster": "m", "runtime_fraction": {"runtime_key": "k"}}],
        },
    }
    assert refused(one_route(route)) == [
        (
            "virtual_hosts[0].routes[0].route.request_mirror_policies[0].runtime_fraction.runtime_key",
            "is not supported by meshlet",
        )
    ]


def test_route_retry_policy_replaces_the_virtual_hosts() -> None:
    # ENVOY-SEMANTICS §3 Retry policy: no merge, the route's wins.
    t = table(
        {
            "virtual_hosts": [
                vhost(
                    "vh",
                    ["*"],
                    [
                        {
                            "match": {"prefix": "/own"},
                            "route": {
                                "cluster": "c",
                                "retry_policy": {"retry_on": "5xx", "num_retries": 7},
                            },
                        },
                        {"match": {"prefix": "/"}, "route": {"cluster": "c"}},
                    ],
                    retry_policy={"retry_on": "connect-failure", "num_retries": 2},
                )
            ]
        }
    )
    own, inherited = (
        action_of(t, head(b"/own")).retry_policy,
        action_of(t, head(b"/x")).retry_policy,
    )
    assert own is not None and inherited is not None and own != inherited
    assert own.num_retries == 7 and inherited.num_retries == 2


def test_retry_policy_problems_carry_the_route_path() -> None:
    route = {
        "match": {"prefix": "/"},
        "route": {
            "cluster": "c",
            "retry_policy": {
                "retry_on": "5xx",
                "retry_priority": {"name": "x"},
                "rate_limited_retry_back_off": {},
            },
        },
    }
    paths = [p for p, _ in refused(one_route(route))]
    assert paths and all(
        p.startswith("virtual_hosts[0].routes[0].route.retry_policy.") for p in paths
    )


# --------------------------------------------------------------------------- per-filter config


def test_per_filter_config_other_than_fault_is_refused() -> None:
    route = {
        "match": {"prefix": "/"},
        "route": {"cluster": "c"},
        "typed_per_filter_config": {
            "envoy.filters.http.cors": {"@type": "type.googleapis.com/google.protobuf.Empty"}
        },
    }
    assert refused(one_route(route)) == [
        (
            'virtual_hosts[0].routes[0].typed_per_filter_config["envoy.filters.http.cors"]',
            "is not supported by meshlet (only envoy.filters.http.fault)",
        )
    ]


def test_fault_key_with_another_type_is_refused() -> None:
    route = {
        "match": {"prefix": "/"},
        "route": {"cluster": "c"},
        "typed_per_filter_config": {
            "envoy.filters.http.fault": {"@type": "type.googleapis.com/google.protobuf.Empty"}
        },
    }
    [(path, message)] = refused(one_route(route))
    assert path == 'virtual_hosts[0].routes[0].typed_per_filter_config["envoy.filters.http.fault"]'
    assert message.startswith(
        "must be a type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
    )


def test_validate_clusters_is_reported_as_configured() -> None:
    assert table({"name": "a"}).validate_clusters is None
    assert table({"name": "a", "validate_clusters": False}).validate_clusters is False
    assert table({"name": "a", "validate_clusters": True}).validate_clusters is True


FAULT_TYPE = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"


def fault_config(status: int) -> dict[str, Any]:
    return {
        "envoy.filters.http.fault": {
            "@type": FAULT_TYPE,
            "abort": {"http_status": status, "percentage": {"numerator": 100}},
        }
    }


def test_most_specific_fault_config_wins() -> None:
    # ENVOY-SEMANTICS §5: per-route fault config, weighted cluster > route > virtual host,
    # replacing the less specific one wholesale.
    routes = [
        {
            "match": {"prefix": "/weighted"},
            "route": {
                "weighted_clusters": {
                    "clusters": [
                        {"name": "own", "weight": 1, "typed_per_filter_config": fault_config(501)},
                        {"name": "inherits", "weight": 1},
                    ]
                }
            },
            "typed_per_filter_config": fault_config(502),
        },
        {
            "match": {"prefix": "/route"},
            "route": {"cluster": "c"},
            "typed_per_filter_config": fault_config(502),
        },
        {"match": {"prefix": "/"}, "route": {"cluster": "c"}},
    ]
    t = table(
        {"virtual_hosts": [vhost("vh", ["*"], routes, typed_per_filter_config=fault_config(503))]}
    )

    def abort_status(fault: Any) -> int:
        assert fault is not None and fault.abort is not None
        return int(fault.abort.http_status)

    weighted = action_of(t, head(b"/weighted"))
    assert abort_status(weighted.choose_cluster(head(), 0).fault) == 501
    assert abort_status(weighted.choose_cluster(head(), 1).fault) == 502
    assert abort_status(route_of(t, head(b"/weighted")).fault) == 502
    assert abort_status(route_of(t, head(b"/route")).fault) == 502
    assert abort_status(action_of(t, head(b"/route")).choose_cluster(head(), 0).fault) == 502
    assert abort_status(route_of(t, head(b"/other")).fault) == 503


def test_no_per_route_fault_config_means_none() -> None:
    t = table(one_route({"match": {"prefix": "/"}, "route": {"cluster": "c"}}))
    assert route_of(t).fault is None


def test_fault_config_problems_carry_the_filter_key_path() -> None:
    bad = {"envoy.filters.http.fault": {"@type": FAULT_TYPE, "abort": {"grpc_status": 14}}}
    route = {"match": {"prefix": "/"}, "route": {"cluster": "c"}, "typed_per_filter_config": bad}
    paths = [p for p, _ in refused(one_route(route))]
    assert paths and all(
        p.startswith(
            'virtual_hosts[0].routes[0].typed_per_filter_config["envoy.filters.http.fault"]'
        )
        for p in paths
    )
