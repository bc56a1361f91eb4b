"""Routing end to end: a real ``meshlet proxy`` process picks virtual hosts, routes and clusters,
rewrites and mutates headers, redirects, answers directly, mirrors, and injects faults.

Each test cites the Envoy documentation (or ENVOY-SEMANTICS section) whose behaviour it proves.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from tests.integration.conftest import (
    FAULT,
    ROUTER,
    Proxy,
    Upstream,
    bootstrap,
    cluster,
    file_access_log,
    http_request,
    wait_for_lines,
)

FAULT_FILTER = "envoy.filters.http.fault"


def _route(prefix: str, cluster_name: str, **extra: Any) -> dict[str, Any]:
    return {"match": {"prefix": prefix}, "route": {"cluster": cluster_name}, **extra}


def _upstreams(make_upstream: Callable[..., Upstream], *names: str) -> dict[str, Upstream]:
    return {name: make_upstream(name) for name in names}


def _who(port: int, path: str = "/", **headers: str) -> str:
    """Which upstream answered (its default body is ``hello from <name>``)."""
    r = http_request(port, path, headers=headers)
    assert r.status == 200, (path, headers, r.status, r.body)
    return r.text.removeprefix("hello from ")


# -- virtual hosts --------------------------------------------------------------------------------


def test_virtual_host_is_chosen_by_exact_then_suffix_then_prefix_then_default_domain(
    make_upstream, start_proxy
):
    # Envoy route_components.proto VirtualHost.domains and RouteMatcher::findVirtualHost
    # (ENVOY-SEMANTICS §1): exact > *.suffix > prefix* > "*"; the port is part of the Host.
    ups = _upstreams(make_upstream, "exact", "suffix", "prefix", "ported", "default")
    vhosts = [
        {"name": "exact", "domains": ["api.example.com"], "routes": [_route("/", "exact")]},
        {"name": "suffix", "domains": ["*.example.com"], "routes": [_route("/", "suffix")]},
        {"name": "prefix", "domains": ["shop.*"], "routes": [_route("/", "prefix")]},
        {"name": "ported", "domains": ["ported.test:8080"], "routes": [_route("/", "ported")]},
        {"name": "default", "domains": ["*"], "routes": [_route("/", "default")]},
    ]
    clusters = [cluster(name, up.port) for name, up in ups.items()]
    proxy = start_proxy(bootstrap(clusters=clusters, virtual_hosts=vhosts))
    expected = {
        "api.example.com": "exact",
        "API.Example.COM": "exact",  # domains match case-insensitively
        "www.example.com": "suffix",
        "shop.example.com": "suffix",  # a suffix wildcard beats a prefix wildcard
        "shop.example.org": "prefix",
        "ported.test:8080": "ported",
        "ported.test": "default",
        "api.example.com:9999": "default",  # the port is compared too: no exact/suffix match
        "elsewhere.test": "default",
    }
    got = {host: _who(proxy.port, Host=host) for host in expected}
    assert got == expected


def test_request_for_unknown_host_or_path_gets_404_with_flag_nr(
    make_upstream, start_proxy, tmp_path
):
    # Envoy router_filter.rst / ENVOY-SEMANTICS §1: no virtual host or no route => 404, empty
    # body, response flag NR, details route_not_found.
    up = make_upstream("known")
    log = tmp_path / "access.log"
    vhosts = [{"name": "known", "domains": ["known.test"], "routes": [_route("/api", "known")]}]
    proxy = start_proxy(
        bootstrap(
            clusters=[cluster("known", up.port)], virtual_hosts=vhosts, hcm=file_access_log(log)
        )
    )
    assert http_request(proxy.port, "/api", headers={"Host": "known.test"}).status == 200
    no_vhost = http_request(proxy.port, "/api", headers={"Host": "other.test"})
    no_route = http_request(proxy.port, "/web", headers={"Host": "known.test"})
    for r in (no_vhost, no_route):
        assert r.status == 404
        assert r.body == b""
    lines = wait_for_lines(log, 3)
    assert lines[0].startswith("200 - ")
    assert lines[1].split()[:2] == ["404", "NR"]
    assert lines[2].split()[:2] == ["404", "NR"]
    assert lines[1].endswith("route_not_found")
    assert len(up.seen) == 1


# -- route matching -------------------------------------------------------------------------------


def test_first_matching_route_wins_across_path_regex_header_and_query_matchers(
    make_upstream, start_proxy
):
    # Envoy route_components.proto RouteMatch (ENVOY-SEMANTICS §2): routes are tried in order;
    # `path` ignores the query, `safe_regex` must match the whole path, `prefix` is a plain string
    # prefix, headers and query_parameters must all match.
    ups = _upstreams(make_upstream, "path", "regex", "header", "query", "prefix", "fallback")
    routes = [
        {"match": {"path": "/exact"}, "route": {"cluster": "path"}},
        {"match": {"safe_regex": {"regex": "/users/[0-9]+"}}, "route": {"cluster": "regex"}},
        {
            "match": {
                "prefix": "/api",
                "headers": [{"name": "x-version", "string_match": {"exact": "v2"}}],
            },
            "route": {"cluster": "header"},
        },
        {
            "match": {
                "prefix": "/api",
                "query_parameters": [{"name": "debug", "string_match": {"exact": "1"}}],
            },
            "route": {"cluster": "query"},
        },
        {"match": {"prefix": "/api"}, "route": {"cluster": "prefix"}},
        {"match": {"prefix": "/"}, "route": {"cluster": "fallback"}},
    ]
    clusters = [cluster(name, up.port) for name, up in ups.items()]
    proxy = start_proxy(bootstrap(clusters=clusters, routes=routes))
    cases: list[tuple[str, dict[str, str], str]] = [
        ("/exact", {}, "path"),
        ("/exact?x=1", {}, "path"),
        ("/exact/more", {}, "fallback"),
        ("/users/42", {}, "regex"),
        ("/users/42/x", {}, "fallback"),
        ("/users/abc", {}, "fallback"),
        ("/api/x", {"x-version": "v2"}, "header"),
        ("/api/x", {"x-version": "v1"}, "prefix"),
        ("/api/x?debug=1", {}, "query"),
        ("/api/x?debug=0", {}, "prefix"),
        ("/api/x?debug=1", {"x-version": "v2"}, "header"),  # earlier route wins
        ("/apix", {}, "prefix"),  # prefix is not segment-aware
        ("/other", {}, "fallback"),
    ]
    got = [(path, hdrs, _who(proxy.port, path, **hdrs)) for path, hdrs, _ in cases]
    assert got == cases
    assert ups["regex"].seen[0].path == "/users/42"


def test_weighted_clusters_split_traffic_roughly_by_weight(make_upstream, start_proxy):
    # Envoy route_components.proto WeightedCluster (ENVOY-SEMANTICS §3): a random value modulo
    # the total weight picks the cluster whose cumulative interval contains it.
    ups = _upstreams(make_upstream, "heavy", "light", "never")
    routes = [
        {
            "match": {"prefix": "/"},
            "route": {
                "weighted_clusters": {
                    "clusters": [
                        {"name": "heavy", "weight": 75},
                        {"name": "light", "weight": 25},
                        {"name": "never", "weight": 0},
                    ]
                }
            },
        }
    ]
    clusters = [cluster(name, up.port) for name, up in ups.items()]
    proxy = start_proxy(bootstrap(clusters=clusters, routes=routes))
    counts: Counter[str] = Counter()
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        for _ in range(200):
            conn.request("GET", "/")
            r = conn.getresponse()
            assert r.status == 200
            counts[r.read().decode().removeprefix("hello from ")] += 1
    finally:
        conn.close()
    # Expected 150/50; the binomial's standard deviation is ~6, so these bounds are > 4 sigma.
    assert 120 <= counts["heavy"] <= 180, counts
    assert 20 <= counts["light"] <= 80, counts
    assert counts["never"] == 0


# -- rewrites and header mutations ----------------------------------------------------------------


def test_upstream_sees_prefix_regex_and_host_rewrites(upstream, start_proxy):
    # Envoy route_components.proto RouteAction prefix_rewrite / regex_rewrite /
    # host_rewrite_literal (ENVOY-SEMANTICS §3): the query is kept; the original path is sent in
    # x-envoy-original-path.
    routes = [
        {"match": {"prefix": "/old/"}, "route": {"cluster": "web", "prefix_rewrite": "/new/"}},
        {
            "match": {"safe_regex": {"regex": "/users/([0-9]+)/profile"}},
            "route": {
                "cluster": "web",
                "regex_rewrite": {
                    "pattern": {"regex": "^/users/([0-9]+)/profile$"},
                    "substitution": "/profiles/\\1",
                },
            },
        },
        {
            "match": {"prefix": "/host"},
            "route": {"cluster": "web", "host_rewrite_literal": "backend.internal"},
        },
    ]
    proxy = start_proxy(bootstrap(clusters=[cluster("web", upstream.port)], routes=routes))
    assert http_request(proxy.port, "/old/a/b?q=1", headers={"Host": "front.test"}).status == 200
    assert http_request(proxy.port, "/users/7/profile?x=y").status == 200
    assert http_request(proxy.port, "/host/z", headers={"Host": "front.test"}).status == 200
    prefix, regex, host = upstream.seen
    assert prefix.path == "/new/a/b?q=1"
    assert prefix.headers["x-envoy-original-path"] == "/old/a/b?q=1"
    assert prefix.headers["host"] == "front.test"
    assert regex.path == "/profiles/7?x=y"
    assert host.path == "/host/z"
    assert host.headers["host"] == "backend.internal"


def _headers_recorder(
    store: list[dict[str, list[str]]],
) -> Callable[[BaseHTTPRequestHandler], None]:
    """An upstream override that records every request header value and adds response headers."""

    def override(h: BaseHTTPRequestHandler) -> None:
        seen: dict[str, list[str]] = {}
        for k, v in h.headers.items():
            seen.setdefault(k.lower(), []).append(v)
        store.append(seen)
        body = b"ok"
        h.send_response(200)
        h.send_header("x-upstream-secret", "s3cr3t")
        h.send_header("x-upstream-kept", "yes")
        h.send_header("content-length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return override


def _hv(key: str, value: str, action: str = "APPEND_IF_EXISTS_OR_ADD") -> dict[str, Any]:
    return {"header": {"key": key, "value": value}, "append_action": action}


def _mutations(level: str) -> dict[str, Any]:
    return {
        "request_headers_to_add": [
            _hv("x-level", level, "OVERWRITE_IF_EXISTS_OR_ADD"),
            _hv("x-trail", level),
            _hv(f"x-from-{level}", "1"),
        ],
        "request_headers_to_remove": [f"x-drop-{level}"],
        "response_headers_to_add": [
            _hv("x-resp-level", level, "OVERWRITE_IF_EXISTS_OR_ADD"),
            _hv(f"x-resp-{level}", "1"),
        ],
    }


def _mutation_proxy(
    start_proxy: Callable[..., Proxy], upstream: Upstream, most_specific: bool
) -> Proxy:
    route = {"match": {"prefix": "/"}, "route": {"cluster": "web"}, **_mutations("route")}
    vhost = {"name": "vh", "domains": ["*"], "routes": [route], **_mutations("vhost")}
    vhost["response_headers_to_remove"] = ["x-upstream-secret"]
    config = bootstrap(clusters=[cluster("web", upstream.port)], virtual_hosts=[vhost])
    route_config = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]["route_config"]
    route_config.update(_mutations("config"))
    route_config["most_specific_header_mutations_wins"] = most_specific
    return start_proxy(config)


def test_headers_are_added_and_removed_at_route_vhost_and_route_config_level(upstream, start_proxy):
    # Envoy headers.rst "Custom request/response headers" (ENVOY-SEMANTICS §4): route, then
    # virtual host, then route configuration; the least specific level's overwrite wins by
    # default, appends come in that order; removes run before adds.
    store: list[dict[str, list[str]]] = []
    upstream.override = _headers_recorder(store)
    proxy = _mutation_proxy(start_proxy, upstream, most_specific=False)
    r = http_request(
        proxy.port,
        "/",
        headers={"x-drop-route": "a", "x-drop-vhost": "b", "x-drop-config": "c", "x-keep": "d"},
    )
    assert r.status == 200
    seen = store[0]
    assert seen["x-level"] == ["config"]
    assert ",".join(seen["x-trail"]).replace(" ", "") == "route,vhost,config"
    for level in ("route", "vhost", "config"):
        assert seen[f"x-from-{level}"] == ["1"]
        assert f"x-drop-{level}" not in seen
    assert seen["x-keep"] == ["d"]
    assert r.headers["x-resp-level"] == "config"
    for level in ("route", "vhost", "config"):
        assert r.headers[f"x-resp-{level}"] == "1"
    assert "x-upstream-secret" not in r.headers  # vhost response_headers_to_remove
    assert r.headers["x-upstream-kept"] == "yes"


def test_most_specific_header_mutations_wins_lets_the_route_overwrite(upstream, start_proxy):
    # Envoy route.proto RouteConfiguration.most_specific_header_mutations_wins (ENVOY-SEMANTICS
    # §4): evaluated config -> vhost -> route, so the route's value wins.
    store: list[dict[str, list[str]]] = []
    upstream.override = _headers_recorder(store)
    proxy = _mutation_proxy(start_proxy, upstream, most_specific=True)
    r = http_request(proxy.port, "/")
    assert r.status == 200
    assert store[0]["x-level"] == ["route"]
    assert r.headers["x-resp-level"] == "route"


# -- redirect and direct response -----------------------------------------------------------------


def test_redirect_answers_with_location_and_direct_response_with_the_configured_body(
    upstream, start_proxy
):
    # Envoy route_components.proto RedirectAction and DirectResponseAction (ENVOY-SEMANTICS §3):
    # the query is kept unless strip_query; 301 by default; the redirect body is empty; route
    # response_headers_to_add apply to direct responses.
    routes = [
        {
            "match": {"prefix": "/moved"},
            "redirect": {
                "host_redirect": "new.example.com",
                "path_redirect": "/landing",
                "response_code": "PERMANENT_REDIRECT",
            },
        },
        {"match": {"prefix": "/secure"}, "redirect": {"https_redirect": True}},
        {
            "match": {"prefix": "/teapot"},
            "direct_response": {"status": 418, "body": {"inline_string": "I am a teapot"}},
            "response_headers_to_add": [_hv("x-direct", "yes")],
        },
        {"match": {"prefix": "/"}, "route": {"cluster": "web"}},
    ]
    proxy = start_proxy(bootstrap(clusters=[cluster("web", upstream.port)], routes=routes))
    moved = http_request(proxy.port, "/moved/x?q=1", headers={"Host": "old.example.com"})
    assert moved.status == 308
    assert moved.headers["location"] == "http://new.example.com/landing?q=1"
    assert moved.body == b""
    secure = http_request(proxy.port, "/secure/p", headers={"Host": "site.test"})
    assert secure.status == 301
    assert secure.headers["location"] == "https://site.test/secure/p"
    teapot = http_request(proxy.port, "/teapot")
    assert teapot.status == 418
    assert teapot.body == b"I am a teapot"
    assert teapot.headers["content-type"] == "text/plain"
    assert teapot.headers["x-direct"] == "yes"
    assert upstream.seen == []


# -- mirrors --------------------------------------------------------------------------------------


def test_mirror_gets_a_copy_with_shadow_host_and_client_gets_the_primary_response(
    make_upstream, start_proxy
):
    # Envoy route_components.proto RouteAction.request_mirror_policies (ENVOY-SEMANTICS §3):
    # fire-and-forget copy, Host gets "-shadow" appended to the host part; the mirror's response
    # is ignored.
    primary = make_upstream("primary")
    mirror = make_upstream("mirror")
    mirror.override = lambda h: (
        h.send_response(500),
        h.send_header("content-length", "0"),
        h.end_headers(),
    )
    routes = [
        {
            "match": {"prefix": "/"},
            "route": {"cluster": "primary", "request_mirror_policies": [{"cluster": "mirror"}]},
        }
    ]
    clusters = [cluster("primary", primary.port), cluster("mirror", mirror.port)]
    proxy = start_proxy(bootstrap(clusters=clusters, routes=routes))
    r = http_request(
        proxy.port, "/echo", method="POST", body=b"payload", headers={"Host": "shop.test:8080"}
    )
    assert (r.status, r.body) == (200, b"payload")
    deadline = time.monotonic() + 5
    while not mirror.seen and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(mirror.seen) == 1
    copy = mirror.seen[0]
    assert copy.headers["host"] == "shop.test-shadow:8080"
    assert (copy.method, copy.path, copy.body) == ("POST", "/echo", b"payload")
    assert primary.seen[0].headers["host"] == "shop.test:8080"


def test_a_mirror_that_does_not_answer_is_dropped_at_the_route_timeout(make_upstream, start_proxy):
    # Envoy shadow requests use the route's global timeout (ENVOY-SEMANTICS §3 "Mirroring"):
    # a silent mirror must not keep its connection open after it.
    primary = make_upstream("primary")
    mirror = make_upstream("mirror")
    mirror.override = lambda h: time.sleep(3)  # never answers in time
    routes = [
        {
            "match": {"prefix": "/"},
            "route": {
                "cluster": "primary",
                "timeout": "0.5s",
                "request_mirror_policies": [{"cluster": "mirror"}],
            },
        }
    ]
    clusters = [cluster("primary", primary.port), cluster("mirror", mirror.port)]
    proxy = start_proxy(bootstrap(clusters=clusters, routes=routes))
    assert http_request(proxy.port, "/").status == 200
    deadline = time.monotonic() + 5
    while not mirror.seen and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(mirror.seen) == 1
    key = f"mirror::127.0.0.1:{mirror.port}::cx_active::"

    def mirror_connections() -> str:
        text = proxy.admin_get("/clusters")[1]
        return next(line for line in text.splitlines() if line.startswith(key))[len(key) :]

    assert mirror_connections() == "1"
    time.sleep(1.0)  # past the route timeout, well before the mirror would answer
    assert mirror_connections() == "0"
    prom = proxy.admin_get("/stats/prometheus")[1]
    assert 'envoy_cluster_upstream_rq_timeout{envoy_cluster_name="mirror"} 1' in prom


# -- fault filter ---------------------------------------------------------------------------------


def _fault_filters(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"name": FAULT_FILTER, "typed_config": {"@type": FAULT, **config}},
        {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}},
    ]


_ALWAYS = {"numerator": 100, "denominator": "HUNDRED"}


def test_fault_abort_answers_configured_status_with_flag_fi(upstream, start_proxy, tmp_path):
    # Envoy fault_filter.rst (ENVOY-SEMANTICS §5): abort => local reply "fault filter abort",
    # flag FI; the upstream is never called.
    log = tmp_path / "access.log"
    filters = _fault_filters({"abort": {"http_status": 503, "percentage": _ALWAYS}})
    proxy = start_proxy(
        bootstrap(
            clusters=[cluster("web", upstream.port)], http_filters=filters, hcm=file_access_log(log)
        )
    )
    r = http_request(proxy.port, "/x")
    assert (r.status, r.body) == (503, b"fault filter abort")
    assert wait_for_lines(log, 1)[0].split()[:2] == ["503", "FI"]
    assert upstream.seen == []


def test_fault_delay_sets_flag_di_and_the_request_still_succeeds(upstream, start_proxy, tmp_path):
    # Envoy fault_filter.rst (ENVOY-SEMANTICS §5): delay => flag DI, then the request continues.
    log = tmp_path / "access.log"
    filters = _fault_filters({"delay": {"fixed_delay": "0.3s", "percentage": _ALWAYS}})
    proxy = start_proxy(
        bootstrap(
            clusters=[cluster("web", upstream.port)], http_filters=filters, hcm=file_access_log(log)
        )
    )
    started = time.monotonic()
    r = http_request(proxy.port, "/x")
    elapsed = time.monotonic() - started
    assert (r.status, r.body) == (200, b"hello from upstream")
    assert elapsed >= 0.3  # the delay happened (a lower bound, not a performance threshold)
    assert wait_for_lines(log, 1)[0].split()[:2] == ["200", "DI"]
    assert len(upstream.seen) == 1


def test_typed_per_filter_config_overrides_the_fault_for_one_route(upstream, start_proxy):
    # Envoy fault_filter.rst / route_components.proto typed_per_filter_config (ENVOY-SEMANTICS
    # §5): the most specific HTTPFault replaces the filter-level one wholesale.
    filters = _fault_filters({"abort": {"http_status": 503, "percentage": _ALWAYS}})
    routes = [
        {
            "match": {"prefix": "/teapot"},
            "route": {"cluster": "web"},
            "typed_per_filter_config": {
                FAULT_FILTER: {
                    "@type": FAULT,
                    "abort": {"http_status": 418, "percentage": _ALWAYS},
                }
            },
        },
        {
            "match": {"prefix": "/healthy"},
            "route": {"cluster": "web"},
            "typed_per_filter_config": {FAULT_FILTER: {"@type": FAULT}},  # no fault here
        },
        {"match": {"prefix": "/"}, "route": {"cluster": "web"}},
    ]
    proxy = start_proxy(
        bootstrap(clusters=[cluster("web", upstream.port)], routes=routes, http_filters=filters)
    )
    assert http_request(proxy.port, "/teapot").status == 418
    assert http_request(proxy.port, "/healthy").status == 200
    assert http_request(proxy.port, "/other").status == 503
    assert [s.path for s in upstream.seen] == ["/healthy"]


def test_concurrent_requests_each_get_their_own_route(make_upstream, start_proxy):
    # Envoy RouteMatcher: routing is per request; keep-alive connections in parallel must not
    # mix up routes (guards the per-stream state of the connection manager).
    ups = _upstreams(make_upstream, "a", "b")
    routes = [_route("/a", "a"), _route("/b", "b")]
    proxy = start_proxy(
        bootstrap(clusters=[cluster(n, u.port) for n, u in ups.items()], routes=routes)
    )
    errors: list[str] = []

    def client(prefix: str) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        try:
            for _ in range(20):
                conn.request("GET", f"/{prefix}")
                body = conn.getresponse().read()
                if body != f"hello from {prefix}".encode():
                    errors.append(body.decode())
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(p,)) for p in ("a", "b", "a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert len(ups["a"].seen) == len(ups["b"].seen) == 40


def test_direct_response_is_logged_with_details_direct_response(
    upstream, start_proxy, tmp_path: Path
):
    # Envoy response_code_details.rst: a direct response is logged with details direct_response.
    log = tmp_path / "access.log"
    routes = [
        {"match": {"prefix": "/direct"}, "direct_response": {"status": 200}},
        {"match": {"prefix": "/"}, "route": {"cluster": "web"}},
    ]
    proxy = start_proxy(
        bootstrap(clusters=[cluster("web", upstream.port)], routes=routes, hcm=file_access_log(log))
    )
    r = http_request(proxy.port, "/direct")
    assert (r.status, r.body) == (200, b"")
    assert wait_for_lines(log, 1)[0].split()[-1] == "direct_response"
