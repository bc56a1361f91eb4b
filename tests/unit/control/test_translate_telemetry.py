"""Telemetry translation: which Telemetries apply to a proxy, and how they and the mesh's
telemetry options become HCM filters, tracing, access logs and the OTLP cluster.

Istio's rules, cited where tested:
- Telemetry reference, https://istio.io/latest/docs/reference/config/telemetry/ -- "The
  hierarchy of Telemetry configuration is as follows: 1. Workload-specific configuration
  2. Namespace-specific configuration 3. Root namespace configuration".
- Telemetry API task, https://istio.io/latest/docs/tasks/observability/telemetry/ -- "Any
  fields specified in the namespace configuration will completely override the field from
  the parent configuration"; "Any workload-specific selector in the root configuration
  namespace will be ignored".
- Access logs with the Telemetry API,
  https://istio.io/latest/docs/tasks/observability/logs/telemetry-api/ -- ``disabled: true``
  turns a workload's logs off; ``filter.expression`` "response.code >= 400" logs errors only;
  ``match.mode: SERVER`` limits an entry to the inbound side.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import yaml
from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.trace.v3 import opentelemetry_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import json_format
from xds.type.v3 import typed_struct_pb2

from meshlet.api import load_documents
from meshlet.api.telemetry import (
    HEADER_FILTER_SUPPORTED,
    AllOf,
    AnyOf,
    DurationCondition,
    HeaderCondition,
    ResponseFlagCondition,
    StatusCodeCondition,
    WorkloadMode,
    check_attribute,
    parse_log_filter,
)
from meshlet.control.generators import Translation
from meshlet.control.registry import Endpoint
from meshlet.control.snapshot import MeshConfig, Proxy, ProxyType
from meshlet.control.store import Store
from meshlet.control.translate.endpoints import workload_name
from meshlet.control.translate.telemetry import (
    ISTIO_JSON_FORMAT,
    ISTIO_TEXT_FORMAT,
    MX_TYPE_URL,
    OTLP_CLUSTER,
    STATS_TYPE_URL,
    ListenerClass,
    log_filter,
    metric_overrides,
    otlp_address,
    tracing_spec,
)
from meshlet.control.xds import CLUSTER_TYPE, LISTENER_TYPE, ProxyInfo, PushRequest
from meshlet.errors import ConfigError
from meshlet.proxy.headers import Headers, RequestHead
from meshlet.proxy.stream_info import StreamInfo
from meshlet.proxy.telemetry.access_log import compile_filter
from tests.unit.control.simulation import Simulation, app

OTLP = "http://127.0.0.1:4318/v1/traces"
TRACED = MeshConfig(otlp_endpoint=OTLP)


def telemetry(spec: str, name: str = "t", namespace: str = "default", created: str = "") -> str:
    meta = f"  name: {name}\n  namespace: {namespace}\n"
    if created:
        meta += f"  creationTimestamp: '{created}'\n"
    body = textwrap.indent(textwrap.dedent(spec).strip(), "  ")
    return f"apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata:\n{meta}spec:\n{body}\n"


def hcms(sim: Simulation, proxy: Proxy) -> dict[str, hcm_pb2.HttpConnectionManager]:
    """Each listener's (first chain's) HCM, by listener name."""
    out = {}
    for listener in sim.build(proxy).listeners:
        manager = hcm_pb2.HttpConnectionManager()
        listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
        out[listener.name] = manager
    return out


def struct_of(f: hcm_pb2.HttpFilter) -> tuple[str, dict[str, object]]:
    typed = typed_struct_pb2.TypedStruct()
    assert f.typed_config.Unpack(typed)
    return typed.type_url, json_format.MessageToDict(typed.value)


def file_log(manager: hcm_pb2.HttpConnectionManager) -> file_pb2.FileAccessLog:
    [entry] = manager.access_log
    assert entry.name == "envoy.access_loggers.file"
    config = file_pb2.FileAccessLog()
    assert entry.typed_config.Unpack(config)
    return config


def reviews(*docs: str, mesh: MeshConfig = TRACED) -> tuple[Simulation, Proxy]:
    sim = Simulation(app("reviews", versions=("v1", "v2")), *docs, mesh=mesh)
    return sim, sim.sidecar("reviews-v1")


# -- which Telemetries apply ----------------------------------------------------------------------


def test_root_then_namespace_then_the_selecting_workload_telemetry_apply_in_that_order() -> None:
    """Reference: workload-specific > namespace-specific > root namespace configuration."""
    sim, proxy = reviews(
        telemetry("tracing: [{randomSamplingPercentage: 10}]", "mesh", "istio-system"),
        telemetry("tracing: [{randomSamplingPercentage: 20}]", "ns"),
        telemetry(
            "selector: {matchLabels: {version: v1}}\ntracing: [{randomSamplingPercentage: 30}]",
            "wl",
        ),
        telemetry(
            "selector: {matchLabels: {version: v2}}\ntracing: [{randomSamplingPercentage: 40}]",
            "other",
        ),
    )
    names = [t.name for t in sim.snapshot.telemetries_for(proxy)]
    assert names == ["mesh", "ns", "wl"]
    assert hcms(sim, proxy)["virtualOutbound"].tracing.random_sampling.value == 30.0
    v2 = sim.sidecar("reviews-v2")
    assert hcms(sim, v2)["virtualOutbound"].tracing.random_sampling.value == 40.0
    elsewhere = Simulation.client(namespace="other")
    assert hcms(sim, elsewhere)["virtualOutbound"].tracing.random_sampling.value == 10.0


def test_a_root_namespace_selector_applies_to_no_other_namespace() -> None:
    """Task: "Any workload-specific selector in the root configuration namespace will be
    ignored" (for workloads outside it)."""
    sim, proxy = reviews(
        telemetry(
            "selector: {matchLabels: {app: reviews}}\ntracing: [{randomSamplingPercentage: 50}]",
            "sel",
            "istio-system",
        )
    )
    assert sim.snapshot.telemetries_for(proxy) == ()
    assert hcms(sim, proxy)["virtualOutbound"].tracing.random_sampling.value == 1.0


def test_the_oldest_namespace_wide_telemetry_wins_and_target_refs_apply_to_no_sidecar() -> None:
    sim, proxy = reviews(
        telemetry(
            "tracing: [{randomSamplingPercentage: 5}]", "b-old", created="2024-01-01T00:00:00Z"
        ),
        telemetry(
            "tracing: [{randomSamplingPercentage: 6}]", "a-new", created="2025-01-01T00:00:00Z"
        ),
        telemetry(
            "targetRefs: [{kind: Service, group: '', name: reviews}]\n"
            "tracing: [{randomSamplingPercentage: 7}]",
            "0-target",
        ),
    )
    assert [t.name for t in sim.snapshot.telemetries_for(proxy)] == ["b-old"]


def test_a_namespace_field_overrides_the_root_field_and_unset_fields_are_inherited() -> None:
    """Task: fields the namespace's Telemetry sets override the parent's; custom tags are
    replaced as a whole, as istiod does."""
    sim, proxy = reviews(
        telemetry(
            """
            tracing:
            - randomSamplingPercentage: 10
              customTags: {team: {literal: {value: mesh}}, zone: {literal: {value: z}}}
            """,
            "mesh",
            "istio-system",
        ),
        telemetry("tracing: [{customTags: {team: {literal: {value: ns}}}}]", "ns"),
    )
    spec = tracing_spec(sim.snapshot.telemetries_for(proxy), TRACED, WorkloadMode.CLIENT)
    assert spec.sampling == 10.0
    assert set(spec.custom_tags) == {"team"}


# -- tracing --------------------------------------------------------------------------------------


def test_no_otlp_endpoint_no_tracing() -> None:
    sim, proxy = reviews(telemetry("tracing: [{randomSamplingPercentage: 10}]"), mesh=MeshConfig())
    managers = hcms(sim, proxy)
    assert not any(m.HasField("tracing") for m in managers.values())
    assert OTLP_CLUSTER not in {c.name for c in sim.build(proxy).clusters}


def test_tracing_posts_otlp_over_http_through_a_static_cluster_at_the_mesh_sampling() -> None:
    """ISTIO-TRANSLATION §8: client and overall sampling 100%, random sampling from
    Telemetry, else the mesh default (PILOT_TRACE_SAMPLING, 1%)."""
    sim, proxy = reviews()
    tracing = hcms(sim, proxy)["virtualInbound"].tracing
    assert (
        tracing.client_sampling.value,
        tracing.random_sampling.value,
        tracing.overall_sampling.value,
    ) == (100.0, 1.0, 100.0)
    assert tracing.provider.name == "envoy.tracers.opentelemetry"
    config = opentelemetry_pb2.OpenTelemetryConfig()
    assert tracing.provider.typed_config.Unpack(config)
    assert not config.HasField("grpc_service")
    assert config.http_service.http_uri.uri == OTLP
    assert config.http_service.http_uri.cluster == OTLP_CLUSTER
    assert config.service_name == "reviews.default"  # APP_LABEL_AND_NAMESPACE
    collector = sim.cluster(proxy, OTLP_CLUSTER)
    assert collector.type == cluster_pb2.Cluster.STATIC
    [group] = collector.load_assignment.endpoints
    address = group.lb_endpoints[0].endpoint.address.socket_address
    assert (address.address, address.port_value) == ("127.0.0.1", 4318)


def test_custom_tags_become_literal_environment_and_request_header_tags() -> None:
    sim, proxy = reviews(
        telemetry(
            """
            tracing:
            - randomSamplingPercentage: 100
              customTags:
                team: {literal: {value: books}}
                pod: {environment: {name: POD_NAME, defaultValue: unknown}}
                user: {header: {name: end-user, defaultValue: anonymous}}
            """
        )
    )
    tracing = hcms(sim, proxy)["virtualOutbound"].tracing
    assert tracing.random_sampling.value == 100.0
    tags = {t.tag: json_format.MessageToDict(t) for t in tracing.custom_tags}
    assert tags["team"]["literal"] == {"value": "books"}
    assert tags["pod"]["environment"] == {"name": "POD_NAME", "defaultValue": "unknown"}
    assert tags["user"]["requestHeader"] == {"name": "end-user", "defaultValue": "anonymous"}


def test_match_mode_limits_an_entry_to_one_side_and_disabled_span_reporting_drops_tracing() -> None:
    """Reference (Tracing.match): CLIENT is the outbound side, SERVER the inbound side;
    ``disableSpanReporting`` stops reporting for the workload."""
    sim, proxy = reviews(
        telemetry(
            """
            tracing:
            - match: {mode: SERVER}
              randomSamplingPercentage: 50
            - match: {mode: CLIENT}
              disableSpanReporting: true
            """
        )
    )
    managers = hcms(sim, proxy)
    assert managers["virtualInbound"].tracing.random_sampling.value == 50.0
    assert not managers["virtualOutbound"].HasField("tracing")


# -- access logs ----------------------------------------------------------------------------------


def test_no_access_log_unless_the_mesh_or_a_telemetry_asks() -> None:
    sim, proxy = reviews(mesh=MeshConfig())
    assert all(not m.access_log for m in hcms(sim, proxy).values())


def test_the_mesh_access_log_file_logs_every_request_in_istios_text_format() -> None:
    sim, proxy = reviews(mesh=MeshConfig(access_log_file="/tmp/x.log"))
    for manager in hcms(sim, proxy).values():
        config = file_log(manager)
        assert config.path == "/tmp/x.log"
        assert config.log_format.text_format_source.inline_string == ISTIO_TEXT_FORMAT
        assert not manager.access_log[0].HasField("filter")


def test_json_encoding_uses_istios_default_json_fields() -> None:
    sim, proxy = reviews(mesh=MeshConfig(access_log_file="/dev/stdout", access_log_encoding="JSON"))
    config = file_log(hcms(sim, proxy)["virtualInbound"])
    assert json_format.MessageToDict(config.log_format.json_format) == dict(ISTIO_JSON_FORMAT)


def test_a_workload_telemetry_disables_the_mesh_access_log() -> None:
    """Task (logs/telemetry-api): ``disabled: true`` for the details workload."""
    sim, proxy = reviews(
        telemetry(
            "selector: {matchLabels: {version: v1}}\naccessLogging: [{providers: [{name: envoy}], "
            "disabled: true}]",
            "no-logs",
        ),
        mesh=MeshConfig(access_log_file="/dev/stdout"),
    )
    assert all(not m.access_log for m in hcms(sim, proxy).values())
    v2 = sim.sidecar("reviews-v2")
    assert all(m.access_log for m in hcms(sim, v2).values())


def test_a_telemetry_turns_logging_on_with_its_filter_on_the_side_it_matches() -> None:
    """Task: ``match: {mode: SERVER}`` and ``filter.expression: response.code >= 400``;
    without a mesh file, Istio's built-in ``envoy`` provider writes to /dev/stdout."""
    sim, proxy = reviews(
        telemetry(
            """
            accessLogging:
            - match: {mode: SERVER}
              filter: {expression: "response.code >= 400"}
            """,
            "errors",
            "istio-system",
        ),
        mesh=MeshConfig(),
    )
    managers = hcms(sim, proxy)
    assert not managers["virtualOutbound"].access_log
    assert file_log(managers["virtualInbound"]).path == "/dev/stdout"
    [entry] = managers["virtualInbound"].access_log
    assert json_format.MessageToDict(entry.filter) == {
        "statusCodeFilter": {"comparison": {"op": "GE", "value": {"defaultValue": 400}}}
    }


# -- the CEL subset -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "condition"),
    [
        ("response.code >= 400", StatusCodeCondition("GE", 400)),
        ("response.code == 503", StatusCodeCondition("EQ", 503)),
        ("response.code != 200", StatusCodeCondition("NE", 200)),
        ("response.code > 499", StatusCodeCondition("GE", 500)),
        ("response.code < 300", StatusCodeCondition("LE", 299)),
        ("400 <= response.code", StatusCodeCondition("GE", 400)),
        ("response.duration >= duration('1s')", DurationCondition("GE", 1000)),
        ('response.duration > duration("250ms")', DurationCondition("GE", 251)),
        ("response.flags != 0", ResponseFlagCondition()),
        ("request.headers['X-Debug'] == 'on'", HeaderCondition("x-debug", "on")),
        ('request.headers["x-user"] != "bot"', HeaderCondition("x-user", "bot", invert=True)),
        (
            "response.code >= 500 || request.headers['x'] == 'y' && response.code == 404",
            AnyOf(
                (
                    StatusCodeCondition("GE", 500),
                    AllOf((HeaderCondition("x", "y"), StatusCodeCondition("EQ", 404))),
                )
            ),
        ),
        (
            "(response.code == 500 || response.code == 503) && response.flags != 0",
            AllOf(
                (
                    AnyOf((StatusCodeCondition("EQ", 500), StatusCodeCondition("EQ", 503))),
                    ResponseFlagCondition(),
                )
            ),
        ),
    ],
)
def test_the_cel_subset_reads_comparisons_with_cels_precedence(
    expression: str, condition: object
) -> None:
    assert parse_log_filter(expression) == condition


def test_each_condition_becomes_the_envoy_access_log_filter_that_means_it() -> None:
    as_dict = json_format.MessageToDict
    assert as_dict(log_filter(StatusCodeCondition("EQ", 503))) == {
        "statusCodeFilter": {"comparison": {"value": {"defaultValue": 503}}}  # EQ is 0
    }
    assert as_dict(log_filter(DurationCondition("LE", 10))) == {
        "durationFilter": {"comparison": {"op": "LE", "value": {"defaultValue": 10}}}
    }
    flag = log_filter(ResponseFlagCondition())
    assert flag.HasField("response_flag_filter") and not flag.response_flag_filter.flags
    assert as_dict(log_filter(HeaderCondition("x", "y", invert=True))) == {
        "headerFilter": {
            "header": {"name": "x", "stringMatch": {"exact": "y"}, "invertMatch": True}
        }
    }
    both = log_filter(parse_log_filter("response.code >= 500 && request.headers['x'] == 'y'"))
    assert both.WhichOneof("filter_specifier") == "and_filter"
    assert [f.WhichOneof("filter_specifier") for f in both.and_filter.filters] == [
        "status_code_filter",
        "header_filter",
    ]
    either = log_filter(parse_log_filter("response.code == 1 || response.code == 2"))
    assert len(either.or_filter.filters) == 2
    assert isinstance(either, accesslog_pb2.AccessLogFilter)


@pytest.mark.parametrize(
    "expression",
    [
        "request.url_path.contains('login')",
        "response.code >= '400'",
        "response.code = 400",
        "!(response.code == 200)",
        "response.code >= 400 &&",
        "(response.code >= 400",
        "size(request.headers) > 1",
        "connection.mtls == true",
        "response.flags == 0",
        "response.duration > duration('soon')",
    ],
)
def test_expressions_outside_the_subset_are_refused(expression: str) -> None:
    with pytest.raises(ValueError, match="meshlet supports comparisons"):
        parse_log_filter(expression)


def test_a_refused_filter_is_reported_at_its_file_line_and_field_and_nothing_is_loaded() -> None:
    text = telemetry(
        """
        accessLogging:
        - providers: [{name: envoy}]
          filter:
            expression: "request.url_path.contains('login')"
        """
    )
    with pytest.raises(ConfigError) as e:
        load_documents(text, "telemetry.yaml")
    rendered = e.value.render()
    assert rendered.startswith("telemetry.yaml:10: spec.accessLogging[0].filter.expression: ")
    assert "meshlet supports comparisons" in rendered


def test_tag_override_values_are_one_attribute_or_a_literal() -> None:
    for ok in ("request.host", "request.headers['x-user']", "'fixed'", "destination.port"):
        assert check_attribute(ok) == ok
    for bad in ("upstream_peer.labels['app'].value", "request.host + 'x'", "node.id", ""):
        with pytest.raises(ValueError, match="meshlet supports a quoted string"):
            check_attribute(bad)
    text = telemetry(
        """
        metrics:
        - overrides:
          - tagOverrides:
              app: {value: "filter_state['x']"}
        """
    )
    with pytest.raises(ConfigError) as e:
        load_documents(text, "m.yaml")
    [problem] = e.value.problems
    assert problem.path == "spec.metrics[0].overrides[0].tagOverrides.app.value"


def test_custom_metrics_and_formatter_tags_are_refused_by_name() -> None:
    text = telemetry(
        """
        metrics: [{overrides: [{match: {customMetric: my_metric}, disabled: true}]}]
        tracing: [{customTags: {a: {formatter: {value: "%REQ(x)%"}}}}]
        """
    )
    with pytest.raises(ConfigError) as e:
        load_documents(text, "c.yaml")
    paths = sorted(p.path for p in e.value.problems)
    assert paths == [
        "spec.metrics[0].overrides[0].match.customMetric",
        "spec.tracing[0].customTags.a.formatter",
    ]


# -- metrics --------------------------------------------------------------------------------------


HTTP_GATEWAY = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 8080, name: http, protocol: HTTP}
    hosts: ["*"]
"""
GATEWAY = Simulation.client(
    namespace="istio-system",
    labels={"istio": "ingressgateway", "app": "istio-ingressgateway"},
    kind=ProxyType.ROUTER,
    ip="10.0.9.1",
)


def test_every_hcm_starts_with_metadata_exchange_and_has_stats_right_before_the_router() -> None:
    """ISTIO-TRANSLATION §8: the MX filter ``istio.metadata_exchange``
    (``io.istio.http.peer_metadata.Config``); the stats filter goes last before the router,
    with ``disable_host_header_fallback`` on inbound and gateway listeners (istiod's
    ``disableHostHeaderFallback``)."""
    sim, proxy = reviews(HTTP_GATEWAY, mesh=MeshConfig())
    managers = {**hcms(sim, proxy), **hcms(sim, GATEWAY)}
    assert sorted(managers) == ["0.0.0.0_8080", "virtualInbound", "virtualOutbound"]
    fallback = {}
    for name, manager in managers.items():
        names = [f.name for f in manager.http_filters]
        assert names[0] == "istio.metadata_exchange"
        assert names[-2:] == ["istio.stats", "envoy.filters.http.router"]
        assert struct_of(manager.http_filters[0]) == (MX_TYPE_URL, {})
        type_url, value = struct_of(manager.http_filters[-2])
        assert type_url == STATS_TYPE_URL and value["metrics"] == []
        fallback[name] = value["disable_host_header_fallback"]
    assert fallback == {"0.0.0.0_8080": True, "virtualInbound": True, "virtualOutbound": False}


def test_a_gateway_traces_as_its_app_and_takes_client_side_telemetry() -> None:
    sim = Simulation(
        HTTP_GATEWAY,
        telemetry(
            "tracing: [{match: {mode: CLIENT}, randomSamplingPercentage: 60}]",
            "mesh",
            "istio-system",
        ),
        mesh=TRACED,
    )
    tracing = hcms(sim, GATEWAY)["0.0.0.0_8080"].tracing
    assert tracing.random_sampling.value == 60.0
    config = opentelemetry_pb2.OpenTelemetryConfig()
    tracing.provider.typed_config.Unpack(config)
    assert config.service_name == "istio-ingressgateway.istio-system"
    assert OTLP_CLUSTER in {c.name for c in sim.build(GATEWAY).clusters}
    assert sim.refusals(GATEWAY) == []


def test_metric_overrides_drop_a_metric_and_upsert_or_remove_tags_per_side() -> None:
    """Reference (MetricsOverrides): ``disabled`` drops the metric; ``tagOverrides`` UPSERT
    sets a label from an expression, REMOVE drops it; ``match.mode`` picks the side."""
    sim, proxy = reviews(
        telemetry(
            """
            metrics:
            - providers: [{name: prometheus}]
              overrides:
              - match: {metric: REQUEST_COUNT, mode: CLIENT}
                disabled: true
              - match: {metric: REQUEST_DURATION}
                tagOverrides:
                  request_host: {value: request.host}
                  request_protocol: {operation: REMOVE}
              - match: {metric: TCP_OPENED_CONNECTIONS}
                disabled: true
            """
        ),
        mesh=MeshConfig(),
    )
    managers = hcms(sim, proxy)
    _, outbound = struct_of(managers["virtualOutbound"].http_filters[-2])
    _, inbound = struct_of(managers["virtualInbound"].http_filters[-2])
    duration = {
        "name": "request_duration_milliseconds",
        "dimensions": {"request_host": "request.host"},
        "tags_to_remove": ["request_protocol"],
        "drop": False,
    }
    count = {"name": "requests_total", "dimensions": {}, "tags_to_remove": [], "drop": True}
    assert outbound["metrics"] == [duration, count]
    assert inbound["metrics"] == [duration]


def test_disabling_all_metrics_drops_everything_until_a_narrower_telemetry_overrides() -> None:
    """istiod's mergeMetrics: "root namespace disables all, but then enables them by
    namespace scoped"."""
    root = telemetry(
        "metrics: [{overrides: [{match: {metric: ALL_METRICS}, disabled: true}]}]",
        "mesh",
        "istio-system",
    )
    sim, proxy = reviews(root, mesh=MeshConfig())
    mode = WorkloadMode.SERVER
    found = metric_overrides(sim.snapshot.telemetries_for(proxy), mode)
    assert [o.as_value() for o in found] == [
        {"name": "", "dimensions": {}, "tags_to_remove": [], "drop": True}
    ]
    sim, proxy = reviews(
        root,
        telemetry(
            "metrics: [{overrides: [{match: {metric: REQUEST_SIZE}, disabled: false}]}]", "ns"
        ),
        mesh=MeshConfig(),
    )
    found = metric_overrides(sim.snapshot.telemetries_for(proxy), mode)
    assert [(o.name, o.drop) for o in found] == [("request_bytes", False)]


def test_all_metrics_stands_for_each_metric_and_later_overrides_win_tag_by_tag() -> None:
    sim, proxy = reviews(
        telemetry(
            """
            metrics:
            - overrides:
              - tagOverrides: {a: {value: "'x'"}, b: {value: request.method}}
            """,
            "mesh",
            "istio-system",
        ),
        telemetry(
            """
            metrics:
            - overrides:
              - match: {metric: RESPONSE_SIZE}
                tagOverrides: {a: {operation: REMOVE}}
            """,
            "ns",
        ),
        mesh=MeshConfig(),
    )
    found = {
        o.name: o
        for o in metric_overrides(sim.snapshot.telemetries_for(proxy), WorkloadMode.CLIENT)
    }
    assert sorted(found) == [
        "request_bytes",
        "request_duration_milliseconds",
        "requests_total",
        "response_bytes",
    ]
    assert found["requests_total"].dimensions == {"a": "'x'", "b": "request.method"}
    assert found["response_bytes"].dimensions == {"b": "request.method"}
    assert found["response_bytes"].tags_to_remove == ("a",)


# -- the proxy accepts it, and users see it -------------------------------------------------------


def test_meshlets_proxy_accepts_the_generated_telemetry_configuration() -> None:
    sim, proxy = reviews(
        telemetry(
            """
            tracing:
            - randomSamplingPercentage: 25
              customTags: {team: {literal: {value: books}}}
            metrics:
            - overrides:
              - match: {metric: REQUEST_COUNT}
                tagOverrides: {request_host: {value: request.host}}
            accessLogging:
            - filter: {expression: "response.code >= 500 || response.flags != 0"}
            """
        ),
        mesh=MeshConfig(otlp_endpoint=OTLP, access_log_file="/dev/stdout"),
    )
    assert sim.refusals(proxy) == []


def test_header_comparisons_become_a_header_filter_the_proxy_applies() -> None:
    """``request.headers['x'] == 'y'`` is Envoy's access log ``header_filter`` (a
    HeaderMatcher on the request's headers); the proxy compiles it and logs only matching
    requests."""
    assert HEADER_FILTER_SUPPORTED
    sim, proxy = reviews(
        telemetry(
            'accessLogging: [{filter: {expression: "response.code >= 500 && '
            "request.headers['x-debug'] == 'on'\"}}]"
        ),
        mesh=MeshConfig(access_log_file="/dev/stdout"),
    )
    assert sim.refusals(proxy) == []
    inbound = hcms(sim, proxy)["virtualInbound"]
    [log] = inbound.access_log
    predicate = compile_filter(log.filter, "filter")
    for headers, code, logged in (
        ([(b"x-debug", b"on")], 503, True),
        ([(b"x-debug", b"off")], 503, False),
        ([], 503, False),
        ([(b"x-debug", b"on")], 200, False),
    ):
        info = StreamInfo(
            start=0.0, start_wall=0.0, downstream_remote="10.0.0.1:1", downstream_local=""
        )
        info.request = RequestHead(
            method=b"GET", path=b"/", authority=b"reviews", headers=Headers(headers)
        )
        info.response_code = code
        assert predicate(info) is logged, (headers, code)


def test_config_dump_shows_the_telemetry_filters_as_json() -> None:
    """What ``meshlet proxy-config listeners <pod> -o json`` prints."""
    store = Store.memory()
    store.apply(
        [d for d in yaml.safe_load_all(app("reviews")) if d]
        + [yaml.safe_load(telemetry("tracing: [{randomSamplingPercentage: 5}]"))]
    )
    dump = Translation(store, mesh=TRACED).config_dump(
        "sidecar~10.0.0.1~reviews-v1-0.default~default.svc.cluster.local", "listeners"
    )
    text = json.dumps(dump)
    for expected in ("istio.metadata_exchange", "istio.stats", MX_TYPE_URL, STATS_TYPE_URL):
        assert expected in text
    assert '"randomSampling": {"value": 5.0}' in text


def test_a_telemetry_change_rebuilds_the_listeners_at_the_next_push() -> None:
    store = Store.memory()
    store.apply([d for d in yaml.safe_load_all(app("reviews")) if d])
    translation = Translation(store, mesh=TRACED)
    node = ProxyInfo.parse_id("sidecar~10.0.0.1~reviews-v1-0.default~default.svc.cluster.local")

    def sampling() -> float:
        resources = translation.generate(node, LISTENER_TYPE, None).resources
        listener = resources["virtualOutbound"]
        from envoy.config.listener.v3 import listener_pb2

        decoded = listener_pb2.Listener.FromString(listener.value)
        manager = hcm_pb2.HttpConnectionManager()
        decoded.filter_chains[0].filters[0].typed_config.Unpack(manager)
        return float(manager.tracing.random_sampling.value)

    assert sampling() == 1.0
    clusters = translation.generate(node, CLUSTER_TYPE, None).resources
    assert OTLP_CLUSTER in clusters
    store.apply([yaml.safe_load(telemetry("tracing: [{randomSamplingPercentage: 42}]"))])
    translation.prepare_push(PushRequest())
    assert sampling() == 42.0


# -- the rest -------------------------------------------------------------------------------------


def test_the_otlp_endpoint_must_be_an_http_url() -> None:
    assert otlp_address("http://127.0.0.1:4318/v1/traces") == ("127.0.0.1", 4318)
    assert otlp_address("http://collector/v1/traces") == ("collector", 80)
    for bad in ("127.0.0.1:4318", "https://c:4318/v1/traces", "grpc://c:4317"):
        with pytest.raises(ValueError, match="OTLP/HTTP URL"):
            otlp_address(bad)


def test_a_host_name_endpoint_gets_a_dns_cluster() -> None:
    sim, proxy = reviews(mesh=MeshConfig(otlp_endpoint="http://collector.obs:4318/v1/traces"))
    assert sim.cluster(proxy, OTLP_CLUSTER).type == cluster_pb2.Cluster.STRICT_DNS


def test_the_gateway_class_is_a_client_for_match_mode() -> None:
    """istiod's ``workloadMode``: gateways are CLIENT."""
    assert ListenerClass.GATEWAY.mode is WorkloadMode.CLIENT
    assert ListenerClass.SIDECAR_OUTBOUND.mode is WorkloadMode.CLIENT
    assert ListenerClass.SIDECAR_INBOUND.mode is WorkloadMode.SERVER


def test_endpoint_workload_metadata_names_the_deployment_of_a_pod() -> None:
    """Istio's ``istio.workload`` metadata: ``<workload>;<ns>;<canonical svc>;<rev>;<cluster>``,
    the workload being the Deployment that owns the pod."""
    pod = Endpoint(
        address="10.0.0.1",
        port=9080,
        labels={"app": "reviews", "pod-template-hash": "5d8f7c", "version": "v1"},
        workload="reviews-v1-5d8f7c-x2b9q",
        namespace="default",
    )
    assert workload_name(pod) == "reviews-v1"
    sim = Simulation(app("reviews"))
    proxy = Simulation.client()
    cla = sim.assignment(proxy, "outbound|9080||reviews.default.svc.cluster.local")
    assert cla is not None
    md = cla.endpoints[0].lb_endpoints[0].metadata.filter_metadata["istio"]
    assert md.fields["workload"].string_value == "reviews-v1-0;default;reviews;v1;Kubernetes"


def test_meshlet_control_flags_reach_the_translations_mesh_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import meshlet.control.server as server
    from meshlet.cli.main import build_parser
    from meshlet.errors import MeshletError

    seen: list[server.ControlOptions] = []

    def run(options: server.ControlOptions) -> int:
        seen.append(options)
        return 0

    monkeypatch.setattr(server, "run", run)
    parser = build_parser()
    argv = ["control", "--trace-sampling", "100", "--otlp-endpoint", OTLP]
    argv += ["--access-log-file", "/dev/stdout", "--access-log-encoding", "json"]
    args = parser.parse_args(argv)
    assert args.run(args) == 0
    mesh = seen[0].mesh_config()
    assert (mesh.trace_sampling, mesh.otlp_endpoint) == (100.0, OTLP)
    assert (mesh.access_log_file, mesh.access_log_encoding) == ("/dev/stdout", "JSON")
    defaults = server.ControlOptions().mesh_config()
    assert (defaults.trace_sampling, defaults.otlp_endpoint, defaults.access_log_file) == (
        1.0,
        "",
        "",
    )
    for bad in (["--trace-sampling", "120"], ["--otlp-endpoint", "127.0.0.1:4318"]):
        args = parser.parse_args(["control", *bad])
        with pytest.raises(MeshletError, match=bad[0]):
            args.run(args)
