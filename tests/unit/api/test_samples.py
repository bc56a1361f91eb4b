"""Every file of Istio's samples in ``../shared/istio-samples/`` loads as it is.

The samples are read where they are (they are not copied into the repository). Files under
``gateway-api/`` directories use the Kubernetes Gateway API (gateway.networking.k8s.io), which
meshlet does not support: loading them is an error that says so, and ``unknown="skip"`` passes
over those documents with a note (as ``meshlet analyze`` will).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from meshlet.api import LoadNote, load_documents, load_paths
from meshlet.errors import ConfigError
from tests.samples import SAMPLES as _FOUND

SAMPLES = _FOUND if _FOUND is not None else Path("/nonexistent/istio-samples")
ALL_FILES = sorted(p for p in SAMPLES.rglob("*") if p.suffix in (".yaml", ".yml"))
GATEWAY_API = [p for p in ALL_FILES if "gateway-api" in p.parts]
ISTIO = [p for p in ALL_FILES if "gateway-api" not in p.parts]

pytestmark = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"{SAMPLES} is not present")


def _id(path: Path) -> str:
    return str(path.relative_to(SAMPLES))


def test_the_samples_are_there() -> None:
    assert len(ISTIO) >= 25
    assert GATEWAY_API


@pytest.mark.parametrize("path", ISTIO, ids=_id)
def test_each_sample_loads_and_writes_back_as_written(path: Path) -> None:
    resources = load_documents(path.read_text(), str(path))
    assert resources, "a sample with no resources"
    for resource in resources:
        # Nothing is lost or invented: the model dumps back to the document as written.
        assert resource.model.model_dump(mode="json", exclude_unset=True) == resource.raw
        assert resource.source == str(path)
        assert resource.line is not None
        assert path.read_text().splitlines()[resource.line - 1].startswith(("apiVersion", "kind"))


@pytest.mark.parametrize("path", GATEWAY_API, ids=_id)
def test_gateway_api_files_are_refused_with_a_clear_message(path: Path) -> None:
    text = path.read_text()
    if "gateway.networking.k8s.io" not in text:
        assert load_documents(text, str(path))  # plain Services next to the routes
        return
    with pytest.raises(ConfigError) as e:
        load_documents(text, str(path))
    assert "Gateway API resources are not supported" in str(e.value)
    assert all(p.path == "apiVersion" for p in e.value.problems)


def test_the_whole_samples_tree_loads_with_gateway_api_documents_skipped() -> None:
    notes: list[LoadNote] = []
    resources = load_paths([SAMPLES], unknown="skip", notes=notes)
    kinds = {r.kind for r in resources}
    assert {"VirtualService", "DestinationRule", "Gateway", "ServiceEntry"} <= kinds
    assert {"Service", "ServiceAccount", "Deployment"} <= kinds
    assert notes
    assert {n.api_version for n in notes} == {"gateway.networking.k8s.io/v1"}
    assert all("meshlet does not use this kind" in str(n) for n in notes)


def test_bookinfo_lands_in_the_default_namespace_with_its_subsets() -> None:
    bookinfo = SAMPLES / "bookinfo"
    resources = load_paths(
        [
            bookinfo / "platform/kube/bookinfo.yaml",
            bookinfo / "networking/destination-rule-all.yaml",
        ]
    )
    assert {r.namespace for r in resources} == {"default"}
    reviews = next(r for r in resources if r.kind == "DestinationRule" and r.name == "reviews")
    assert [s.name for s in reviews.model.spec.subsets] == ["v1", "v2", "v3"]
    deployments = [r for r in resources if r.kind == "Deployment"]
    assert {d.name for d in deployments} >= {"productpage-v1", "reviews-v1", "reviews-v3"}


def test_the_fault_injection_sample_reads_as_typed_values() -> None:
    [vs] = load_paths([SAMPLES / "bookinfo/networking/virtual-service-ratings-test-delay.yaml"])
    fault = vs.model.spec.http[0].fault
    assert fault is not None and fault.delay is not None and fault.delay.fixed_delay is not None
    assert fault.delay.fixed_delay.seconds == 7.0
    assert fault.delay.percentage is not None and fault.delay.percentage.value == 100.0
    assert vs.model.spec.http[0].match[0].headers["end-user"].exact == "jason"
