"""Bootstrap parsing and compiling: every problem named by file, line and field; nothing partial."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshlet.errors import ConfigError
from meshlet.proxy.bootstrap import line_of, load_bootstrap, parse_bootstrap
from meshlet.proxy.config import compile_bootstrap

EXAMPLE = Path(__file__).parents[2] / "examples" / "bootstrap.yaml"


def compile_text(text: str):
    loaded = parse_bootstrap(text, "b.yaml")
    try:
        return compile_bootstrap(loaded.message)
    except ConfigError as e:
        raise loaded.locate(e) from None


def test_the_example_bootstrap_compiles():
    config = compile_bootstrap(load_bootstrap(EXAMPLE).message)
    assert [listener.port for listener in config.listeners] == [10000]
    assert [c.name for c in config.clusters] == ["web"]
    assert config.admin == ("127.0.0.1", 15000)


def test_yaml_syntax_error_names_file_and_line():
    with pytest.raises(ConfigError) as e:
        parse_bootstrap("static_resources:\n  clusters: [\n", "b.yaml")
    assert str(e.value).startswith("b.yaml:3: invalid YAML")


def test_unknown_field_is_named_with_its_line():
    text = "static_resources:\n  clusters:\n  - name: a\n    bogus: 1\n"
    with pytest.raises(ConfigError) as e:
        parse_bootstrap(text, "b.yaml")
    assert str(e.value) == "b.yaml:4: static_resources.clusters[0].bogus: unknown field"


def test_unsupported_lb_policy_lists_the_supported_ones():
    text = EXAMPLE.read_text().replace("LEAST_REQUEST", "LOAD_BALANCING_POLICY_CONFIG")
    with pytest.raises(ConfigError) as e:
        compile_text(text)
    (line,) = str(e.value).splitlines()  # the route naming the bad cluster is not blamed too
    assert (
        "static_resources.clusters[0].lb_policy: LOAD_BALANCING_POLICY_CONFIG is not supported"
        in line
    )
    assert "(supported: ROUND_ROBIN, LEAST_REQUEST, RANDOM, RING_HASH, MAGLEV, CLUSTER_PROV" in line
    assert line.startswith("b.yaml:")


def test_cluster_provided_balancing_needs_an_original_dst_cluster():
    """Envoy: CLUSTER_PROVIDED is the balancing of ORIGINAL_DST clusters (and only theirs)."""
    text = EXAMPLE.read_text().replace("LEAST_REQUEST", "CLUSTER_PROVIDED")
    with pytest.raises(ConfigError) as e:
        compile_text(text)
    assert "clusters[0].lb_policy: CLUSTER_PROVIDED needs type: ORIGINAL_DST" in str(e.value)


def test_every_problem_is_reported_one_line_each():
    text = (
        EXAMPLE.read_text()
        .replace("cluster: web\n", "cluster: nope\n")
        .replace("connect_timeout: 1s", "connect_timeout: 1s\n    respect_dns_ttl: true")
    )
    with pytest.raises(ConfigError) as e:
        compile_text(text)
    lines = str(e.value).splitlines()
    assert any("clusters[0].respect_dns_ttl: is not supported by meshlet" in x for x in lines)
    assert any("route names unknown cluster 'nope'" in x for x in lines)


def test_an_http_filter_other_than_fault_and_router_is_refused():
    text = EXAMPLE.read_text().replace("fault.v3.HTTPFault", "lua.v3.Lua")
    with pytest.raises(ConfigError) as e:
        compile_text(text)
    assert "http_filters[0].typed_config.@type" in str(e.value)
    assert "is not supported" in str(e.value)


def test_router_must_be_the_last_filter():
    text = EXAMPLE.read_text()
    fault_start = text.index("          - name: envoy.filters.http.fault")
    router_start = text.index("          - name: envoy.filters.http.router")
    router_end = text.index("\n\n", router_start)
    swapped = (
        text[:fault_start]
        + text[router_start:router_end]
        + "\n"
        + text[fault_start:router_start].rstrip("\n")
        + text[router_end:]
    )
    with pytest.raises(ConfigError) as e:
        compile_text(swapped)
    assert "the last HTTP filter must be envoy.filters.http.router" in str(e.value)


def test_two_listeners_on_one_address_are_refused():
    text = EXAMPLE.read_text()
    start = text.index("  - name: ingress_http")
    end = text.index("\n  clusters:")
    listener = text[start:end]
    text = text[:end] + "\n" + listener.replace("ingress_http", "second", 1) + text[end:]
    with pytest.raises(ConfigError) as e:
        compile_text(text)
    assert "127.0.0.1:10000 is used twice" in str(e.value)


def test_line_of_accepts_camel_case_keys():
    root = parse_bootstrap(
        "staticResources:\n  clusters:\n  - name: a\n    lbPolicy: RANDOM\n", "b.yaml"
    ).root
    assert line_of(root, "static_resources.clusters[0].lb_policy") == 4
