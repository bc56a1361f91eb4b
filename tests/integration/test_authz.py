"""AuthorizationPolicy end to end: a real ``meshlet control``, a client and a server sidecar,
policies applied with ``meshlet apply``, requests through both sidecars.

Istio's documented results (istio.io "Authorization Policy" reference and the HTTP traffic
task): a DENY policy on a path answers 403 ``RBAC: access denied`` there and nowhere else; an
ALLOW policy for GET denies POST; an ALLOW policy with no rules denies everything; a ``when``
header condition; deleting the policy restores access; AUDIT changes no decision.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshlet.runtime.sidecar import ADMIN_PORT
from tests.integration.sidecar_mesh import (
    WEB_URL,
    AppHandler,
    apply,
    eventually,
    text_of,
    two_pods,
    via,
)
from tests.integration.test_control import ControlPlane, meshlet, start_control

pytestmark = pytest.mark.timeout(120)

CLIENT_IP, SERVER_IP = "127.1.10.20", "127.1.10.10"


class _Ok(AppHandler):
    """Reads the request's body, answers ``ok``."""

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.reply(200, b"ok")

    do_GET = do_POST = _answer


def policy(name: str, spec: dict[str, object]) -> dict[str, object]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, **spec},
    }


def call(
    path: str = "/", method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, str]:
    return via(CLIENT_IP, f"{WEB_URL}{path}", method, headers)


DENIED = (403, "RBAC: access denied")


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[ControlPlane]:
    plane = start_control(tmp_path / "state", tmp_path)
    with two_pods(plane, tmp_path, (CLIENT_IP, SERVER_IP), _Ok):
        yield plane


def delete(plane: ControlPlane, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"delete-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(policy(name, {})))
    done = meshlet(plane, "delete", "-f", str(path))
    assert done.returncode == 0, done.stderr


def test_deny_allow_and_allow_nothing_policies_through_real_sidecars(
    mesh: ControlPlane, tmp_path: Path
) -> None:
    assert call("/") == (200, "ok")

    deny = policy(
        "deny-admin", {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]}
    )
    apply(mesh, tmp_path, [deny])
    eventually(lambda: call("/admin/x") == DENIED, "DENY on /admin")
    assert call("/public") == (200, "ok")
    stats = text_of(f"http://{SERVER_IP}:{ADMIN_PORT}/stats")
    assert ".rbac.denied: " in stats

    get_only = policy(
        "get-only", {"action": "ALLOW", "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}
    )
    apply(mesh, tmp_path, [get_only])
    eventually(lambda: call("/", "POST") == DENIED, "ALLOW GET only: POST denied")
    assert call("/", "GET") == (200, "ok")
    assert call("/admin", "GET") == DENIED  # DENY still first

    delete(mesh, tmp_path, "deny-admin")
    delete(mesh, tmp_path, "get-only")
    eventually(lambda: call("/admin", "POST") == (200, "ok"), "policies removed")

    apply(mesh, tmp_path, [policy("allow-nothing", {"action": "ALLOW"})])
    eventually(lambda: call("/") == DENIED, "allow-nothing")
    assert call("/x", "POST") == DENIED
    delete(mesh, tmp_path, "allow-nothing")
    eventually(lambda: call("/") == (200, "ok"), "allow-nothing removed")


def test_when_header_condition_and_audit(mesh: ControlPlane, tmp_path: Path) -> None:
    apply(mesh, tmp_path, [policy("audit", {"action": "AUDIT", "rules": [{}]})])
    time.sleep(1.0)  # AUDIT changes nothing: nothing to wait for but the push
    assert call("/") == (200, "ok")
    header = policy(
        "need-header",
        {
            "action": "ALLOW",
            "rules": [{"when": [{"key": "request.headers[x-team]", "values": ["blue*"]}]}],
        },
    )
    apply(mesh, tmp_path, [header])
    eventually(lambda: call("/") == DENIED, "header required")
    assert call("/", headers={"x-team": "blue-1"}) == (200, "ok")
    assert call("/", headers={"x-team": "red"}) == DENIED


def test_a_dry_run_policy_is_counted_but_not_enforced(mesh: ControlPlane, tmp_path: Path) -> None:
    """istio.io "Dry Run" task: a DENY policy on ``/headers`` annotated ``istio.io/dry-run:
    "true"`` lets the request through; the proxy counts it as a shadow denial under the
    ``istio_dry_run_deny_`` prefix. Removing the annotation enforces it."""
    spec = {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/headers"]}}]}]}
    dry = policy("deny-path-headers", spec)
    dry["metadata"]["annotations"] = {"istio.io/dry-run": "true"}  # type: ignore[index]
    apply(mesh, tmp_path, [dry])
    shadow = ".rbac.istio_dry_run_deny_shadow_denied: "

    def counted() -> bool:
        call("/headers")
        return shadow in text_of(f"http://{SERVER_IP}:{ADMIN_PORT}/stats")

    eventually(counted, "the dry-run denial counted")
    assert call("/headers") == (200, "ok")
    prom = text_of(f"http://{SERVER_IP}:{ADMIN_PORT}/stats/prometheus")
    assert "rbac_istio_dry_run_deny_shadow_denied" in prom
    apply(mesh, tmp_path, [policy("deny-path-headers", spec)])
    eventually(lambda: call("/headers") == DENIED, "the policy enforced without dry-run")
    assert call("/other") == (200, "ok")
