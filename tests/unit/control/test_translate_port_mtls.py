"""PeerAuthentication ``portLevelMtls`` on the inbound listener and in auto mTLS.

Istio's reference (istio.io/latest/docs/reference/config/security/peer_authentication/):
``portLevelMtls`` sets the mode of one workload port and needs a ``selector``; a workload
policy's port setting wins over its workload-level mode. Istio's auto mTLS sends plaintext to
an endpoint whose port is DISABLE (istiod's mtlsChecker reads workload and port policies).

Every inbound request reaches meshlet's sidecar on 15006 and names its port in the ``Host``,
so the plaintext chain carries an RBAC filter keeping plaintext off STRICT ports.
"""

from __future__ import annotations

from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from meshlet.control.snapshot import MeshConfig
from meshlet.control.translate.listeners import PORT_MTLS_POLICY
from meshlet.proxy.filters.rbac import RequestAttributes, compile_rbac, enforce, parse_ip
from meshlet.proxy.headers import Headers, RequestHead
from meshlet.proxy.telemetry.stats import HttpStats
from tests.unit.control.simulation import Simulation, app

MTLS = MeshConfig(enable_auto_mtls=True)
SERVER = app("reviews", ports={"http": 9080, "admin": 9090}, service_account="reviews").replace(
    "      labels:\n        app: reviews\n",
    "      labels:\n        app: reviews\n        security.istio.io/tlsMode: istio\n",
)
CLIENT = app("productpage", service_account="productpage")


def peer_authentication(mode: str, ports: dict[int, str]) -> str:
    port_lines = "".join(f"    {p}: {{mode: {m}}}\n" for p, m in ports.items())
    return (
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        "metadata: {name: reviews, namespace: default}\n"
        "spec:\n  selector: {matchLabels: {app: reviews}}\n"
        f"  mtls: {{mode: {mode}}}\n  portLevelMtls:\n{port_lines}"
    )


def chains(sim: Simulation) -> dict[str, hcm_pb2.HttpConnectionManager]:
    listener = sim.listener(sim.sidecar("reviews"), "virtualInbound")
    out = {}
    for chain in listener.filter_chains:
        hcm = hcm_pb2.HttpConnectionManager()
        chain.filters[0].typed_config.Unpack(hcm)
        out[chain.filter_chain_match.transport_protocol or "any"] = hcm
    return out


def plaintext_status(hcm: hcm_pb2.HttpConnectionManager, port: int) -> int:
    """What the plaintext chain's RBAC filters answer a request naming ``reviews:<port>``."""
    filters = []
    for f in hcm.http_filters:
        if f.name == "envoy.filters.http.rbac":
            msg = http_rbac_pb2.RBAC()
            f.typed_config.Unpack(msg)
            filters.append(compile_rbac(msg, "rbac"))
    head = RequestHead(
        method=b"GET", path=b"/", authority=f"reviews:{port}".encode(), headers=Headers()
    )
    attrs = RequestAttributes(
        head=head,
        direct_remote_ip=parse_ip("10.0.0.9"),
        destination_ip=parse_ip("10.0.0.1"),
        destination_port=port,
        peer_principal=None,
    )
    return 200 if enforce(tuple(filters), attrs, HttpStats()) is None else 403


def test_a_strict_port_on_a_permissive_workload_refuses_plaintext_there_only() -> None:
    sim = Simulation(SERVER, CLIENT, peer_authentication("PERMISSIVE", {9090: "STRICT"}), mesh=MTLS)
    found = chains(sim)
    assert sorted(found) == ["raw_buffer", "tls"]
    guard = found["raw_buffer"].http_filters[0]
    config = http_rbac_pb2.RBAC()
    guard.typed_config.Unpack(config)
    assert config.rules.action == rbac_pb2.RBAC.DENY
    assert list(config.rules.policies) == [PORT_MTLS_POLICY]
    assert plaintext_status(found["raw_buffer"], 9090) == 403
    assert plaintext_status(found["raw_buffer"], 9080) == 200
    # The mTLS chain has no such guard: TLS is welcome on every port.
    assert plaintext_status(found["tls"], 9090) == 200


def test_a_disabled_port_on_a_strict_workload_takes_plaintext_and_clients_send_it() -> None:
    sim = Simulation(SERVER, CLIENT, peer_authentication("STRICT", {9080: "DISABLE"}), mesh=MTLS)
    found = chains(sim)
    assert sorted(found) == ["raw_buffer", "tls"]
    assert plaintext_status(found["raw_buffer"], 9080) == 200
    assert plaintext_status(found["raw_buffer"], 9090) == 403
    # Auto mTLS: the client sidecar sends plaintext to reviews on 9080, mTLS on 9090.
    client = sim.sidecar("productpage")
    for port, tls in ((9080, False), (9090, True)):
        cla = sim.assignment(client, f"outbound|{port}||reviews.default.svc.cluster.local")
        assert cla is not None
        [lbe] = [e for group in cla.endpoints for e in group.lb_endpoints]
        marked = "envoy.transport_socket_match" in lbe.metadata.filter_metadata
        assert marked is tls, port


def test_without_port_settings_the_listener_is_as_before() -> None:
    strict = peer_authentication("STRICT", {}).replace("  portLevelMtls:\n", "")
    sim = Simulation(SERVER, CLIENT, strict, mesh=MTLS)
    assert sorted(chains(sim)) == ["tls"]
    same = peer_authentication("STRICT", {9080: "STRICT"})
    sim = Simulation(SERVER, CLIENT, same, mesh=MTLS)
    assert sorted(chains(sim)) == ["tls"]
