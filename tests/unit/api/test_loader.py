"""Loading: every problem reads ``file:line: field.path: message``; nothing partial."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

import pytest

from meshlet.api import LoadNote, load_documents, load_object, load_paths
from meshlet.api.loader import render_path
from meshlet.errors import ConfigError


def problems(text: str, source: str = "bad.yaml", **kwargs: object) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_documents(textwrap.dedent(text), source, **kwargs)  # type: ignore[arg-type]
    return str(e.value).splitlines()


VS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
  - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v1
      weight: 80
    - destination:
        host: reviews
        subset: v2
      {field}: {value}
"""


def test_an_unknown_field_is_named_at_its_line_with_a_suggestion() -> None:
    assert problems(VS.format(field="weigth", value=20)) == [
        "bad.yaml:17: spec.http[0].route[1].weigth: unknown field 'weigth'; "
        "did you mean 'weight'? (known fields: destination, headers, weight)"
    ]


def test_a_negative_weight_is_refused_at_its_line() -> None:
    assert problems(VS.format(field="weight", value=-20)) == [
        "bad.yaml:17: spec.http[0].route[1].weight: -20 must not be negative"
    ]


def test_weights_are_relative_but_may_not_all_be_zero() -> None:
    # Istio's rule: weights need not add up to 100; several destinations all at 0 is an error.
    assert load_documents(VS.format(field="weight", value=40), "ok.yaml")
    zero = VS.replace("weight: 80", "weight: 0").format(field="weight", value=0)
    assert problems(zero) == ["bad.yaml:9: spec.http[0].route: total destination weight = 0"]


def test_a_weight_of_the_wrong_type_says_what_was_expected() -> None:
    assert problems(VS.format(field="weight", value='"20"')) == [
        "bad.yaml:17: spec.http[0].route[1].weight: expected an integer, got the string '20'"
    ]


def test_a_bad_duration_is_refused_with_the_accepted_syntax() -> None:
    assert problems(
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: ratings}
        spec:
          hosts: [ratings]
          http:
          - route:
            - destination: {host: ratings}
            timeout: 10 seconds
            retries:
              attempts: 3
              perTryTimeout: 0.5ms
        """
    ) == [
        "bad.yaml:9: spec.http[0].timeout: invalid duration '10 seconds'; expected a number "
        'with a unit (ns, us, ms, s, m, h), e.g. "1s", "100ms", "1.5s", "1h30m"',
        "bad.yaml:12: spec.http[0].retries.perTryTimeout: duration '0.5ms' must be at least 1ms",
    ]


def test_a_bad_enum_value_lists_the_allowed_ones() -> None:
    assert problems(
        """\
        apiVersion: networking.istio.io/v1beta1
        kind: ServiceEntry
        metadata:
          name: external
          namespace: egress
        spec:
          hosts: [api.example.com]
          location: MESH_EXTERNAL
          resolution: DNS_ONLY
        """
    ) == [
        "bad.yaml:9: spec.resolution: invalid value 'DNS_ONLY'; expected 'NONE', 'STATIC', "
        "'DNS', 'DNS_ROUND_ROBIN' or 'DYNAMIC_DNS'"
    ]


def test_a_yaml_syntax_error_names_its_line() -> None:
    [message] = problems(
        """\
        apiVersion: v1
        kind: ConfigMap
        metadata:
          name: broken
            labels: {app: web}
        data: {}
        """,
        source="cm.yaml",
    )
    # libyaml and PyYAML word the rest differently ("... not allowed here/in this context")
    assert message.startswith("cm.yaml:5: invalid YAML: mapping values are not allowed")


def test_a_duplicate_key_is_an_error_as_in_kubernetes() -> None:
    assert problems("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n  name: b\n") == [
        "bad.yaml:5: invalid YAML: found duplicate key 'name' (while constructing a mapping)"
    ]


def test_a_missing_required_field_is_reported_at_its_parent() -> None:
    assert problems(
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: reviews}
        spec:
          subsets:
          - name: v1
        """
    ) == ["bad.yaml:4: spec.host: is required"]


def test_problems_of_every_document_and_file_are_reported_together(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: good}\n"
        "---\n"
        "apiVersion: v1\nkind: Service\nmetadata: {name: svc}\nspec:\n  ports:\n  - port: 0\n"
    )
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yml").write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n")
    with pytest.raises(ConfigError) as e:
        load_paths([tmp_path])
    assert str(e.value).splitlines() == [
        f"{tmp_path}/a.yaml:10: spec.ports[0].port: port number 0 must be in the range 1..65535",
        f"{tmp_path}/sub/b.yml:1: spec: is required",
    ]


def test_each_document_keeps_its_first_line_and_empty_documents_are_skipped() -> None:
    text = textwrap.dedent(
        """\
        # a comment before anything
        ---
        apiVersion: v1
        kind: Namespace
        metadata:
          name: bookinfo
        ---
        # only a comment
        ---

        apiVersion: v1
        kind: ServiceAccount
        metadata:
          name: reviews
          namespace: bookinfo
        ---
        """
    )
    ns, sa = load_documents(text, "two.yaml")
    assert (ns.kind, ns.line, ns.namespace) == ("Namespace", 3, None)
    assert (sa.kind, sa.line, sa.namespace) == ("ServiceAccount", 11, "bookinfo")
    assert sa.location == "two.yaml:11"


def test_namespaced_kinds_default_to_the_given_namespace() -> None:
    text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cfg, labels: {app: web}}\n"
    [cm] = load_documents(text, "cm.yaml")
    assert cm.namespace == "default"
    assert cm.metadata.namespace == ""  # the document as written names none
    assert cm.to_object()["metadata"] == {
        "name": "cfg",
        "labels": {"app": "web"},
        "namespace": "default",
    }
    assert cm.raw["metadata"] == {"name": "cfg", "labels": {"app": "web"}}
    [other] = load_documents(text, "cm.yaml", namespace="prod")
    assert other.namespace == "prod"
    assert other.labels == {"app": "web"}


def test_a_list_document_is_expanded_and_its_items_keep_their_lines() -> None:
    text = textwrap.dedent(
        """\
        apiVersion: v1
        kind: List
        items:
        - apiVersion: v1
          kind: ServiceAccount
          metadata: {name: a}
        - apiVersion: v1
          kind: ServiceAccount
          metadata: {name: b}
        """
    )
    a, b = load_documents(text, "list.yaml")
    assert (a.name, a.line, b.name, b.line) == ("a", 4, "b", 7)
    bad = text.replace("metadata: {name: b}", "metadata: {name: b}\n  automount: true")
    assert problems(bad) == [
        "bad.yaml:10: items[1].automount: unknown field 'automount'; "
        "did you mean 'automountServiceAccountToken'? (known fields: apiVersion, "
        "automountServiceAccountToken, imagePullSecrets, kind, metadata, secrets, status)"
    ]


def test_an_unknown_kind_names_the_supported_ones() -> None:
    [message] = problems(
        "apiVersion: networking.istio.io/v1\nkind: EnvoyFilter\nmetadata: {name: x}\n"
    )
    assert message.startswith(
        "bad.yaml:2: kind: 'EnvoyFilter' is not supported in networking.istio.io/v1; "
        "supported kinds: VirtualService, DestinationRule, Gateway, ServiceEntry"
    )


def test_an_unknown_api_version_names_the_supported_ones() -> None:
    assert problems(
        "apiVersion: monitoring.coreos.com/v1\nkind: ServiceMonitor\nmetadata: {name: m}\n"
    ) == [
        "bad.yaml:1: apiVersion: 'monitoring.coreos.com/v1' (kind ServiceMonitor) is not "
        "supported; supported apiVersions: networking.istio.io/v1, networking.istio.io/v1beta1, "
        "networking.istio.io/v1alpha3, security.istio.io/v1, security.istio.io/v1beta1, "
        "telemetry.istio.io/v1, telemetry.istio.io/v1alpha1, v1, apps/v1"
    ]


def test_a_kind_in_the_wrong_api_version_says_where_it_is_served() -> None:
    [message] = problems("apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: db}\n")
    assert message == (
        "bad.yaml:2: kind: 'StatefulSet' is not supported in apps/v1; supported kinds: Deployment"
    )
    [wrong_group] = problems("apiVersion: v1\nkind: Deployment\nmetadata: {name: web}\n")
    assert wrong_group.startswith("bad.yaml:2: kind: 'Deployment' is not supported in v1;")
    assert wrong_group.endswith("; Deployment is served as apps/v1")


def test_unknown_kinds_can_be_skipped_with_a_note() -> None:
    text = (
        "apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: db}\n---\n"
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n"
    )
    notes: list[LoadNote] = []
    [ns] = load_documents(text, "mixed.yaml", unknown="skip", notes=notes)
    assert ns.name == "shop"
    assert [str(n) for n in notes] == [
        "mixed.yaml:1: skipped apps/v1 StatefulSet 'db': meshlet does not use this kind"
    ]


def test_skipping_unknown_kinds_still_refuses_invalid_known_ones() -> None:
    text = (
        "apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: db}\n---\n"
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: Shop}\n"
    )
    notes: list[LoadNote] = []
    with pytest.raises(ConfigError, match=r"mixed\.yaml:7: metadata\.name: 'Shop' must be"):
        load_documents(text, "mixed.yaml", unknown="skip", notes=notes)
    assert notes == []  # nothing is reported from a load that failed


def test_envelope_problems_name_the_field() -> None:
    assert problems("kind: Service\nmetadata: {name: x}\n") == [
        "bad.yaml:1: apiVersion: is required"
    ]
    assert problems("- just\n- a list\n") == [
        "bad.yaml:1: a resource must be a mapping with apiVersion, kind and metadata, got a list"
    ]
    assert problems("apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  labels: {a: b}\n") == [
        "bad.yaml:3: metadata.name: is required"
    ]


def test_snake_case_field_names_are_not_accepted_from_yaml() -> None:
    [message] = problems(
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\nspec:\n"
        "  servers:\n  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: ['*']\n"
        "    default_endpoint: 127.0.0.1:80\n"
    )
    assert message.startswith(
        "bad.yaml:8: spec.servers[0].default_endpoint: unknown field 'default_endpoint'; "
        "did you mean 'defaultEndpoint'?"
    )


def test_label_keys_are_bracketed_in_paths() -> None:
    assert render_path(("metadata", "labels", "app.kubernetes.io/name")) == (
        'metadata.labels["app.kubernetes.io/name"]'
    )
    [message] = problems(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n"
        "  labels:\n    app.kubernetes.io/name: 1\n"
    )
    assert message == (
        'bad.yaml:6: metadata.labels["app.kubernetes.io/name"]: expected a string, '
        "got the integer 1"
    )


def test_timestamps_stay_strings() -> None:
    [cm] = load_documents(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n"
        "  creationTimestamp: 2024-01-02T03:04:05Z\ndata:\n  day: 2024-01-02\n",
        "cm.yaml",
    )
    assert cm.metadata.creation_timestamp == "2024-01-02T03:04:05Z"
    assert cm.raw["data"] == {"day": "2024-01-02"}


def test_json_files_and_stdin_load_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ns.json").write_text(
        '{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}}'
    )
    monkeypatch.setattr(
        "sys.stdin", io.StringIO("apiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n")
    )
    a, b = load_paths([tmp_path / "ns.json", "-"])
    assert (a.name, a.source, b.name, b.source) == ("a", str(tmp_path / "ns.json"), "b", "<stdin>")


def test_missing_paths_and_empty_directories_are_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_paths([tmp_path / "nope.yaml", tmp_path])
    assert str(e.value).splitlines() == [
        f"{tmp_path}/nope.yaml: no such file or directory",
        f"{tmp_path}: no .yaml, .yml or .json files in this directory",
    ]


def test_load_object_validates_data_without_lines() -> None:
    ok = load_object({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}})
    assert ok.namespace is None and ok.line is None
    with pytest.raises(ConfigError) as e:
        load_object(
            {
                "apiVersion": "networking.istio.io/v1",
                "kind": "DestinationRule",
                "metadata": {"name": "r"},
                "spec": {"host": "r", "subsets": [{"name": "v1"}, {"name": "v1"}]},
            },
            "<api>",
        )
    assert str(e.value) == "<api>: spec.subsets[1].name: duplicate subset name 'v1'"
