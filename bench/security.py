"""The security benchmark (issue 5): what mutual TLS costs a meshed call, how many TLS
handshakes one proxy worker accepts, and how many CSRs the CA signs.

    python bench/security.py            # full run: about 3 minutes, never more than 4
    python bench/security.py --quick    # smoke run: about 1 minute
    python bench/security.py --record   # ... and write the "Security" section of RESULTS.md

Three parts, each with its own processes, started and stopped by PID:

1. **Meshed call.** bench/openloop.py (CPU 1) at a fixed 1,000 req/s over 16 keep-alive
   connections → the client sidecar's outbound listener → a cluster with Istio's auto-mTLS
   shape (``transport_socket_matches``, ``tlsMode: istio``, ``UpstreamTlsContext`` with the
   server's SPIFFE SAN and ALPN ``istio``) → the server sidecar's STRICT inbound listener
   (``DownstreamTlsContext``, client certificate required, XFCC) → the upstream (nginx, one
   worker, ``return 200`` with 1 KiB). Compared in the same rounds against the same two
   processes in plaintext (a second outbound listener and a second inbound listener) and
   against the upstream directly. Both sidecars and the upstream share CPU 0. Per arm:
   latency percentiles (from the intended send time), added p50/p99 vs direct, and each
   sidecar's CPU (utime + stime from /proc/<pid>/stat over the run) per request and per
   1,000 req/s. Each arm is warmed (1 s at the rate, discarded) before it is measured, so the
   client sidecar's pool to the server sidecar (and its handshakes) is in place.
2. **TLS handshakes.** One ``meshlet proxy`` worker (CPU 0) with three listeners answering a
   ``direct_response``: plaintext, TLS (server certificate only) and mutual TLS (client
   certificate required). Clients on CPU 1 make a new connection per request: ``openssl
   s_time -new -www /`` (4 processes; full handshakes, no session resumption) for TLS, and
   ``wrk -H 'Connection: close'`` for the plaintext baseline. Reported: connections/s and the
   proxy's CPU per connection; TLS's cost is the difference to plaintext.
3. **CSRs.** A real ``meshlet control --ca`` (CPU 0, its own state directory). Bootstrap tokens
   are minted with the state directory's key, as the runtime does; CSRs (ECDSA P-256, SPIFFE
   URI SAN, made beforehand) go to ``IstioCertificateService/CreateCertificate`` over gRPC TLS
   from this process (CPU 1), 16 in flight: once over one shared channel (the CA's signing
   rate) and once with a new channel — a new TLS connection — per CSR, as a starting proxy
   does. Reported: signed/s, client latency, and the control plane's CPU per CSR; the CA's own
   ``citadel_server_success_cert_issuance_count`` is checked against our count.

Ports: free ports of 19900-19999 (checked before use). Output: ``OUT/security.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import http.client
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import harness
import report
import yaml
from arms import (
    HOST,
    check_serving,
    http_get,
    start_upstream,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from harness import BENCH, LOAD_CPU, SERVER_CPU, BenchError, Ports, say
from loadgen import LoadFailed, fixed_rate
from processes import CLOCK_TICKS, Spawned, Supervisor, read_cores, wait_until

REPO = Path(__file__).resolve().parent.parent
PORTS = range(19900, 20000)

HCM = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
TLS_DOWN = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
TLS_UP = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
RAW = "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
SERVER_ID = "spiffe://cluster.local/ns/bench/sa/server"
CLIENT_ID = "spiffe://cluster.local/ns/bench/sa/client"
CA_SERVER_NAME = "istiod.istio-system.svc"

ISTIO_CORES_PER_1K = 0.20  # Istio's published sidecar cost, vCPU per 1,000 req/s
TARGET_CORES_PER_1K = 0.10


@dataclass(frozen=True, kw_only=True)
class Plan:
    rounds: int
    rate: int = 1000
    connections: int = 16  # Istio's published figures use 16 client connections
    fixed_s: float
    warmup_s: float
    prewarm_s: float
    handshake_s: int
    s_time_clients: int = 4
    csr_s: float
    csr_concurrency: int = 16


FULL = Plan(rounds=3, fixed_s=15, warmup_s=1, prewarm_s=1, handshake_s=8, csr_s=8)
QUICK = Plan(rounds=1, fixed_s=5, warmup_s=0.5, prewarm_s=0.5, handshake_s=3, csr_s=3)
BUDGET_S = {"full": 230.0, "quick": 85.0}


# -- certificates ---------------------------------------------------------------------------


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_pki(directory: Path) -> dict[str, Path]:
    """A root and two workload certificates (ECDSA P-256, Istio's layout: empty subject, a
    SPIFFE URI SAN), written as PEM files; returns their paths."""
    now = datetime.datetime.now(datetime.UTC)
    root_key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshlet bench root")])
    root = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"ca": directory / "ca.pem"}
    paths["ca"].write_bytes(_pem(root))
    for name, uri in (("server", SERVER_ID), ("client", CLIENT_ID)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(root.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=2))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True
            )
            .sign(root_key, hashes.SHA256())
        )
        paths[name] = directory / f"{name}.pem"
        paths[name + "-key"] = directory / f"{name}-key.pem"
        paths[name].write_bytes(_pem(cert))
        paths[name + "-key"].write_bytes(_pem_key(key))
    return paths


# -- bootstraps -----------------------------------------------------------------------------


def _addr(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": HOST, "port_value": port}}


def _sds(name: str) -> dict[str, Any]:
    return {"name": name, "sds_config": {"ads": {}}}


def _secrets(pki: dict[str, Path], who: str) -> list[dict[str, Any]]:
    """SDS ``default`` and ``ROOTCA``, inline, as a sidecar gets them from its agent."""
    return [
        {
            "name": "default",
            "tls_certificate": {
                "certificate_chain": {"inline_string": pki[who].read_text()},
                "private_key": {"inline_string": pki[who + "-key"].read_text()},
            },
        },
        {
            "name": "ROOTCA",
            "validation_context": {"trusted_ca": {"inline_string": pki["ca"].read_text()}},
        },
    ]


def _hcm(stat_prefix: str, route: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": HCM,
            "stat_prefix": stat_prefix,
            "route_config": {
                "virtual_hosts": [
                    {
                        "name": "all",
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, **route}],
                    }
                ]
            },
            "http_filters": [
                {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}
            ],
            **extra,
        },
    }


def _downstream_tls(*, require_client: bool) -> dict[str, Any]:
    common: dict[str, Any] = {
        "tls_certificate_sds_secret_configs": [_sds("default")],
        "alpn_protocols": ["h2", "http/1.1"],
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
    }
    if require_client:
        common["combined_validation_context"] = {
            "default_validation_context": {},
            "validation_context_sds_secret_config": _sds("ROOTCA"),
        }
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": TLS_DOWN,
            "common_tls_context": common,
            "require_client_certificate": require_client,
        },
    }


def _istio_mutual(san: str) -> dict[str, Any]:
    """The UpstreamTlsContext istiod writes for ISTIO_MUTUAL."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": TLS_UP,
            "common_tls_context": {
                "tls_certificate_sds_secret_configs": [_sds("default")],
                "combined_validation_context": {
                    "default_validation_context": {"match_subject_alt_names": [{"exact": san}]},
                    "validation_context_sds_secret_config": _sds("ROOTCA"),
                },
                "alpn_protocols": ["istio-peer-exchange", "istio"],
            },
            "sni": "outbound_.80_._.server.bench.svc.cluster.local",
        },
    }


def _cluster(name: str, port: int, *, mtls: bool = False) -> dict[str, Any]:
    endpoint: dict[str, Any] = {"endpoint": {"address": _addr(port)}}
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [endpoint]}]},
    }
    if mtls:  # istiod's auto-mTLS: endpoints with a sidecar carry tlsMode: istio
        endpoint["metadata"] = {
            "filter_metadata": {"envoy.transport_socket_match": {"tlsMode": "istio"}}
        }
        cluster["transport_socket_matches"] = [
            {
                "name": "tlsMode-istio",
                "match": {"tlsMode": "istio"},
                "transport_socket": _istio_mutual(SERVER_ID),
            },
            {
                "name": "tlsMode-disabled",
                "match": {},
                "transport_socket": {
                    "name": "envoy.transport_sockets.raw_buffer",
                    "typed_config": {"@type": RAW},
                },
            },
        ]
    return cluster


def _node(pod: str, sa: str) -> dict[str, Any]:
    return {
        "id": f"sidecar~127.0.0.1~{pod}.bench~bench.svc.cluster.local",
        "metadata": {"NAMESPACE": "bench", "WORKLOAD_NAME": sa, "SERVICE_ACCOUNT": sa},
    }


def server_sidecar(pki: dict[str, Path], ports: dict[str, int]) -> dict[str, Any]:
    """The server's sidecar: a STRICT inbound listener (mTLS, XFCC) and a plaintext one, both
    to the upstream."""
    xfcc = {
        "forward_client_cert_details": "SANITIZE_SET",
        "set_current_client_cert_details": {"uri": True},
    }
    app = {"route": {"cluster": "inbound|80||"}}
    return {
        "node": _node("server-1", "server"),
        "admin": {"address": _addr(ports["server admin"])},
        "static_resources": {
            "secrets": _secrets(pki, "server"),
            "listeners": [
                {
                    "name": "inbound-mtls",
                    "address": _addr(ports["server inbound mtls"]),
                    "traffic_direction": "INBOUND",
                    "filter_chains": [
                        {
                            "transport_socket": _downstream_tls(require_client=True),
                            "filters": [_hcm("inbound_0.0.0.0_80", app, **xfcc)],
                        }
                    ],
                },
                {
                    "name": "inbound-plain",
                    "address": _addr(ports["server inbound plain"]),
                    "traffic_direction": "INBOUND",
                    "filter_chains": [{"filters": [_hcm("inbound_0.0.0.0_80", app)]}],
                },
            ],
            "clusters": [_cluster("inbound|80||", ports["upstream"])],
        },
    }


def client_sidecar(pki: dict[str, Path], ports: dict[str, int]) -> dict[str, Any]:
    """The client's sidecar: an outbound listener per arm, to the server sidecar with
    ISTIO_MUTUAL (auto mTLS) or in plaintext."""
    name_mtls = "outbound|80||server.bench.svc.cluster.local"
    name_plain = "outbound|80|plain|server.bench.svc.cluster.local"
    return {
        "node": _node("client-1", "client"),
        "admin": {"address": _addr(ports["client admin"])},
        "static_resources": {
            "secrets": _secrets(pki, "client"),
            "listeners": [
                {
                    "name": "outbound-mtls",
                    "address": _addr(ports["client outbound mtls"]),
                    "traffic_direction": "OUTBOUND",
                    "filter_chains": [
                        {"filters": [_hcm("outbound_80", {"route": {"cluster": name_mtls}})]}
                    ],
                },
                {
                    "name": "outbound-plain",
                    "address": _addr(ports["client outbound plain"]),
                    "traffic_direction": "OUTBOUND",
                    "filter_chains": [
                        {"filters": [_hcm("outbound_80", {"route": {"cluster": name_plain}})]}
                    ],
                },
            ],
            "clusters": [
                _cluster(name_mtls, ports["server inbound mtls"], mtls=True),
                _cluster(name_plain, ports["server inbound plain"]),
            ],
        },
    }


def edge_proxy(pki: dict[str, Path], ports: dict[str, int]) -> dict[str, Any]:
    """One worker with three listeners answering a direct response: plaintext, TLS, mTLS."""
    ok = {"direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}

    def listener(name: str, tls: dict[str, Any] | None) -> dict[str, Any]:
        chain: dict[str, Any] = {"filters": [_hcm(name, ok)]}
        if tls is not None:
            chain["transport_socket"] = tls
        return {"name": name, "address": _addr(ports[f"edge {name}"]), "filter_chains": [chain]}

    return {
        "node": _node("edge-1", "server"),
        "admin": {"address": _addr(ports["edge admin"])},
        "static_resources": {
            "secrets": _secrets(pki, "server"),
            "listeners": [
                listener("plain", None),
                listener("tls", _downstream_tls(require_client=False)),
                listener("mtls", _downstream_tls(require_client=True)),
            ],
            "clusters": [],
        },
    }


# -- processes ------------------------------------------------------------------------------


def meshlet_exe() -> str:
    exe = Path(sys.executable).parent / "meshlet"
    found = str(exe) if exe.exists() else shutil.which("meshlet")
    if found is None:
        raise BenchError("no `meshlet` executable (pip install -e . in the venv)")
    return found


def start_proxy(
    supervisor: Supervisor, name: str, config: dict[str, Any], out: Path
) -> tuple[Spawned, float]:
    """``meshlet proxy --concurrency 1`` on CPU 0; waits for admin ``/ready``."""
    path = out / f"security-{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    log = out / f"security-{name}.log"
    log.unlink(missing_ok=True)
    admin = int(config["admin"]["address"]["socket_address"]["port_value"])
    argv = [meshlet_exe(), "proxy", "--config", str(path), "--concurrency", "1"]
    started = time.perf_counter()
    proxy = supervisor.spawn(name, argv, cpu=SERVER_CPU, log=log, cwd=REPO)

    def ready() -> bool:
        if not proxy.alive():
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
            raise BenchError(f"{name} proxy exited with {proxy.popen.returncode}: {tail}")
        return http_get(admin, "/ready")[0] == 200

    if not wait_until(ready, 15.0, 0.01):
        raise BenchError(f"{name} proxy: admin /ready never answered 200 (see {log})")
    return proxy, (time.perf_counter() - started) * 1000


class Window:
    """CPU of some processes, of reaped children (load generators) and of each CPU between
    ``Window()`` and ``close()``."""

    def __init__(self, processes: dict[str, Spawned]) -> None:
        self.processes = processes
        self.cpu = {name: p.cpu_seconds() for name, p in processes.items()}
        self.children = self._children()
        self.me = self._me()
        self.cores = read_cores()
        self.wall = time.perf_counter()

    @staticmethod
    def _children() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    @staticmethod
    def _me() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def close(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.wall
        cores = read_cores()
        busy = {}
        for core, before in self.cores.items():
            total = cores[core].total - before.total
            busy[str(core)] = round((cores[core].busy - before.busy) / total, 3) if total else 0
        cpu = {
            name: round(p.cpu_seconds() - self.cpu[name], 3) for name, p in self.processes.items()
        }
        ours_on_server = sum(cpu.values())
        server_total = (cores[SERVER_CPU].total - self.cores[SERVER_CPU].total) / CLOCK_TICKS
        server_busy = (cores[SERVER_CPU].busy - self.cores[SERVER_CPU].busy) / CLOCK_TICKS
        other = max(0.0, server_busy - ours_on_server) / server_total if server_total else 0.0
        return {
            "wall_s": round(wall, 3),
            "cpu_s": cpu,
            "load_cpu_s": round(self._children() - self.children, 3),
            "runner_cpu_s": round(self._me() - self.me, 3),
            "core_busy": busy,
            "server_core_other_share": round(other, 3),
        }


# -- 1. the meshed call ---------------------------------------------------------------------

ARMS = ("direct", "plaintext", "mtls")
DISTURBED = 0.20  # other processes' share of CPU 0 above which a run's latency is set aside


def meshed_call(
    supervisor: Supervisor, plan: Plan, pki: dict[str, Path], ports: Ports, out: Path
) -> dict[str, Any]:
    names = ["upstream", "server admin", "server inbound mtls", "server inbound plain"]
    names += ["client admin", "client outbound mtls", "client outbound plain"]
    p = {name: ports.take(name) for name in names}
    prefix = out / "security-nginx-upstream"
    upstream = start_upstream(supervisor, prefix=prefix, cpu=SERVER_CPU, port=p["upstream"])
    server, server_ms = start_proxy(supervisor, "server-sidecar", server_sidecar(pki, p), out)
    client, client_ms = start_proxy(supervisor, "client-sidecar", client_sidecar(pki, p), out)
    arm_port = {
        "direct": p["upstream"],
        "plaintext": p["client outbound plain"],
        "mtls": p["client outbound mtls"],
    }
    check_serving(arm_port)
    processes = {"client sidecar": client, "server sidecar": server, "upstream": upstream}
    runs: list[dict[str, Any]] = []
    for number in range(plan.rounds):
        order = ARMS[number % 3 :] + ARMS[: number % 3]
        for arm in order:
            port = arm_port[arm]
            try:  # warms the pools (and the mTLS handshakes) up; discarded
                fixed_rate(
                    supervisor,
                    port=port,
                    rate=plan.rate,
                    seconds=plan.prewarm_s,
                    warmup=0,
                    connections=plan.connections,
                    cpu=LOAD_CPU,
                )
                window = Window(processes)
                result = harness.timed_load(supervisor, plan, port)
            except LoadFailed as exc:
                runs.append({"round": number, "arm": arm, "error": str(exc)})
                say(f"[round {number + 1}] {arm}: {exc}")
                continue
            facts = window.close()
            run = {"round": number, "arm": arm, **result, **facts}
            for who in ("client sidecar", "server sidecar"):
                if not processes[who].alive():
                    run["error"] = f"{who} exited during the run"
            runs.append(run)
            lat = result["latency_us"]
            say(
                f"[round {number + 1}] {arm:9} {result['achieved_rps']:7.0f} req/s  "
                f"p50 {lat['p50'] / 1000:.3f} ms  p99 {lat['p99'] / 1000:.3f} ms  "
                f"client {facts['cpu_s']['client sidecar']:.2f} s  server "
                f"{facts['cpu_s']['server sidecar']:.2f} s  errors {result['errors_total']}"
                + (
                    f"  WARNING: other processes took {100 * facts['server_core_other_share']:.0f}%"
                    f" of CPU {SERVER_CPU}"
                    if facts["server_core_other_share"] > report.OTHER_LIMIT
                    else ""
                )
            )
    rss = {who: processes[who].rss_kib()[0] for who in ("client sidecar", "server sidecar")}
    for spawned in (client, server, upstream):
        supervisor.forget(spawned)
    return {
        "ports": p,
        "start_to_ready_ms": {
            "server sidecar": round(server_ms, 1),
            "client sidecar": round(client_ms, 1),
        },
        "rss_kib_after": rss,
        "runs": runs,
        "summary": summarize_meshed(runs),
    }


def _med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _quiet(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs other processes left alone (latency figures come from these when any)."""
    quiet = [r for r in runs if r["server_core_other_share"] <= DISTURBED]
    return quiet or runs


def summarize_meshed(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    direct = _quiet([r for r in ok if r["arm"] == "direct"])
    summary: dict[str, Any] = {}
    for arm in ARMS:
        mine = [r for r in ok if r["arm"] == arm]
        if not mine:
            continue
        timed = _quiet(mine)
        latency = {
            q: _med([r["latency_us"][q] for r in timed]) for q in ("p50", "p90", "p99", "p99.9")
        }
        row: dict[str, Any] = {
            "rounds": len(mine),
            "latency_rounds": len(timed),
            "rps": _med([r["achieved_rps"] for r in mine]),
            "errors": sum(r["errors_total"] for r in mine),
            "queued": sum(r.get("queued", 0) for r in mine),
            "latency_ms": {q: round(v / 1000, 3) for q, v in latency.items() if v is not None},
            "other_share_max": max(r["server_core_other_share"] for r in mine),
        }
        if arm != "direct" and direct:
            for q in ("p50", "p99"):
                base = _med([r["latency_us"][q] for r in direct])
                row[f"added_{q}_ms"] = round((latency[q] - base) / 1000, 3)  # type: ignore[operator]
        for who in ("client sidecar", "server sidecar", "upstream"):
            per_req = [r["cpu_s"][who] / r["total_completed"] for r in mine if r["total_completed"]]
            if who == "upstream" or arm != "direct":
                us = _med([1e6 * v for v in per_req])
                row[who] = {
                    "cpu_us_per_req": round(us, 2) if us is not None else None,
                    # CPU-seconds per 1,000 requests = cores busy per 1,000 req/s
                    "cores_per_1k_rps": round(us / 1000, 4) if us is not None else None,
                }
        summary[arm] = row
    return summary


# -- 2. TLS handshakes ----------------------------------------------------------------------

S_TIME_COUNT = re.compile(r"(\d+) connections in (\d+) real seconds")
WRK_JSON = "WRK_JSON "


def handshakes(
    supervisor: Supervisor, plan: Plan, pki: dict[str, Path], ports: Ports, out: Path
) -> dict[str, Any]:
    p = {name: ports.take(name) for name in ("edge admin", "edge plain", "edge tls", "edge mtls")}
    edge, _ = start_proxy(supervisor, "edge", edge_proxy(pki, p), out)
    results: dict[str, Any] = {"ports": p, "negotiated": negotiated(p["edge mtls"], pki)}
    variants = ("plain", "tls", "mtls")
    for variant in variants:
        window = Window({"proxy": edge})
        if variant == "plain":
            done = plain_connections(supervisor, p["edge plain"], plan)
        else:
            done = s_time(
                supervisor, p[f"edge {variant}"], plan, pki if variant == "mtls" else None
            )
        facts = window.close()
        cpu = facts["cpu_s"]["proxy"]
        conns = done["connections"]
        wall = facts["wall_s"]
        row = {
            **done,
            **facts,
            "connections_per_s": round(conns / wall, 1) if wall else None,
            "proxy_cores": round(cpu / wall, 3) if wall else None,
            "proxy_cpu_us_per_connection": round(1e6 * cpu / conns, 1) if conns else None,
        }
        results[variant] = row
        say(
            f"[handshakes] {variant:5} {row['connections_per_s']:7.0f} connections/s  proxy "
            f"{row['proxy_cores']:.2f} cores, {row['proxy_cpu_us_per_connection']} us/connection"
            f"  failed {done['failed']}"
        )
    results["rss_kib_after"] = edge.rss_kib()[0]
    supervisor.forget(edge)
    return results


def plain_connections(supervisor: Supervisor, port: int, plan: Plan) -> dict[str, Any]:
    """``wrk`` with ``Connection: close``: a new TCP connection per request."""
    clients = plan.s_time_clients
    argv = ["wrk", "-t1", f"-c{clients}", f"-d{plan.handshake_s}s", "-H", "Connection: close"]
    argv += ["-s", str(BENCH / "wrk-report.lua"), f"http://{HOST}:{port}/"]
    code, text, err = supervisor.run("wrk", argv, cpu=LOAD_CPU, timeout=plan.handshake_s + 30)
    lines = [line for line in text.splitlines() if line.startswith(WRK_JSON)]
    if code != 0 or not lines:
        raise BenchError(f"wrk exited with {code}: {(err or text).strip()[-300:]}")
    totals = json.loads(lines[-1].removeprefix(WRK_JSON))
    return {
        "client": " ".join(["wrk", *argv[1:6], argv[-1]]),
        "connections": totals["requests"],
        "failed": sum(totals["errors"].values()),
        "errors": totals["errors"],
    }


def s_time(
    supervisor: Supervisor, port: int, plan: Plan, pki: dict[str, Path] | None
) -> dict[str, Any]:
    """``openssl s_time -new -www /`` from a few processes at once: full handshakes, one
    HTTP/1.0 request each."""
    argv = ["openssl", "s_time", "-connect", f"{HOST}:{port}", "-new", "-www", "/"]
    argv += ["-time", str(plan.handshake_s)]
    if pki is not None:
        argv += ["-cert", str(pki["client"]), "-key", str(pki["client-key"])]
    clients = [
        supervisor.spawn(f"s_time-{i}", argv, cpu=LOAD_CPU, capture=True)
        for i in range(plan.s_time_clients)
    ]
    total, failed, outputs = 0, 0, []
    for client in clients:
        try:
            text, err = client.popen.communicate(timeout=plan.handshake_s + 30)
        except subprocess.TimeoutExpired:
            supervisor.forget(client)
            failed += 1
            continue
        supervisor.forget(client)
        decoded = text.decode(errors="replace")
        outputs.append(decoded.strip().splitlines()[-2:])
        counts = S_TIME_COUNT.findall(decoded)
        if client.popen.returncode != 0 or not counts:
            failed += 1
            say(f"s_time exited with {client.popen.returncode}: {err.decode()[-300:]}")
            continue
        total += int(counts[-1][0])
    return {
        "client": f"{plan.s_time_clients} x "
        + " ".join(argv[:7] + (["-cert", "-key"] if pki else [])),
        "connections": total,
        "failed": failed,
        "s_time_tail": outputs,
    }


def negotiated(port: int, pki: dict[str, Path]) -> str:
    """Protocol and cipher suite openssl's client gets from the mTLS listener."""
    argv = ["openssl", "s_client", "-connect", f"{HOST}:{port}", "-brief"]
    argv += ["-cert", str(pki["client"]), "-key", str(pki["client-key"])]
    try:
        done = subprocess.run(argv, input=b"", capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    text = done.stderr.decode(errors="replace")
    found = dict(
        line.split(": ", 1)
        for line in text.splitlines()
        if ": " in line and not line.startswith(" ")
    )
    keys = ("Protocol version", "Ciphersuite", "Peer signature type", "Server Temp Key")
    return ", ".join(f"{k}: {found[k]}" for k in keys if k in found) or text.strip()[-200:]


# -- 3. CSRs --------------------------------------------------------------------------------


def csrs(supervisor: Supervisor, plan: Plan, ports: Ports, out: Path) -> dict[str, Any]:
    p = {
        name: ports.take(name)
        for name in ("control xds", "control api", "control ca", "control xds-tls")
    }
    state = out / "security-control-state"
    shutil.rmtree(state, ignore_errors=True)
    argv = [meshlet_exe(), "control", "--ca", "--state-dir", str(state)]
    argv += [
        "--xds-address",
        f"{HOST}:{p['control xds']}",
        "--api-address",
        f"{HOST}:{p['control api']}",
    ]
    argv += [
        "--ca-address",
        f"{HOST}:{p['control ca']}",
        "--xds-tls-address",
        f"{HOST}:{p['control xds-tls']}",
    ]
    argv += ["--workload-cert-ttl", "1h"]
    log = out / "security-control.log"
    log.unlink(missing_ok=True)
    control = supervisor.spawn("control", argv, cpu=SERVER_CPU, log=log, cwd=REPO)

    def metrics() -> str:
        conn = http.client.HTTPConnection(HOST, p["control api"], timeout=2)
        try:
            conn.request("GET", "/metrics")
            return conn.getresponse().read().decode()
        finally:
            conn.close()

    def ready() -> bool:
        if not control.alive():
            raise BenchError(f"meshlet control exited: {log.read_text(errors='replace')[-300:]}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            return "citadel_server_csr_count" in metrics()
        return False

    if not wait_until(ready, 30.0, 0.05):
        raise BenchError(f"meshlet control --ca never served /metrics (see {log})")
    # grpc is imported only now: no process is forked after this point.
    from meshlet.control.ca import BootstrapTokens
    from meshlet.proxy.identity import make_csr

    tokens = BootstrapTokens.load_or_create(state)
    pool = []
    for i in range(64):  # distinct pods and service accounts; CSRs made before the clock runs
        sa = f"sa-{i}"
        token = tokens.issue(namespace="bench", service_account=sa, pod=f"pod-{i}")
        _, csr = make_csr(f"spiffe://cluster.local/ns/bench/sa/{sa}")
        pool.append((token, csr.decode()))
    root = (state / "ca" / "root-cert.pem").read_bytes()
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {LOAD_CPU})
    results: dict[str, Any] = {"ports": p, "concurrency": plan.csr_concurrency}
    try:
        for mode in ("shared channel", "channel per CSR"):
            issued_before = _issued(metrics())
            window = Window({"control": control})
            done = asyncio.run(
                _drive_csrs(
                    f"{HOST}:{p['control ca']}",
                    root,
                    pool,
                    plan,
                    new_channel=mode != "shared channel",
                )
            )
            facts = window.close()
            issued = _issued(metrics()) - issued_before
            cpu = facts["cpu_s"]["control"]
            signed = done["signed"]
            row = {
                **done,
                **facts,
                "ca_counted": issued,
                "signed_per_s": round(signed / done["seconds"], 1),
                "control_cores": round(cpu / facts["wall_s"], 3),
                "control_cpu_us_per_csr": round(1e6 * cpu / signed, 1) if signed else None,
            }
            results[mode] = row
            say(
                f"[csr] {mode:15} {row['signed_per_s']:7.1f} signed/s  p50 "
                f"{done['latency_ms']['p50']} ms  control {row['control_cores']:.2f} cores, "
                f"{row['control_cpu_us_per_csr']} us/CSR  failed {done['failed']}  "
                f"(CA counted {issued})"
            )
    finally:
        os.sched_setaffinity(0, affinity)
        results["rss_kib_after"] = control.rss_kib()[0]
        supervisor.forget(control)
    return results


def _issued(metrics_text: str) -> int:
    for line in metrics_text.splitlines():
        if line.startswith("citadel_server_success_cert_issuance_count "):
            return int(float(line.split()[1]))
    return 0


async def _drive_csrs(
    address: str, root: bytes, pool: list[tuple[str, str]], plan: Plan, *, new_channel: bool
) -> dict[str, Any]:
    """``csr_concurrency`` workers send CSRs for ``csr_s`` seconds; latencies in ms."""
    import grpc
    import grpc.aio

    from meshlet.proxy.identity import CREATE_CERTIFICATE, certificate_messages

    request_class, response_class = certificate_messages()
    credentials = grpc.ssl_channel_credentials(root_certificates=root)
    options = (("grpc.ssl_target_name_override", CA_SERVER_NAME),)
    latencies: list[float] = []
    failures: list[str] = []
    requests = []
    for token, csr in pool:
        request = request_class(csr=csr, validity_duration=0)
        request.metadata.update({"NAMESPACE": "bench"})
        requests.append((request, (("authorization", f"Bearer {token}"),)))

    def stub(channel: Any) -> Any:
        return channel.unary_unary(
            CREATE_CERTIFICATE,
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )

    async def one(call: Any, i: int) -> None:
        request, metadata = requests[i % len(requests)]
        began = time.perf_counter()
        try:
            response = await call(request, metadata=metadata, timeout=10.0)
        except grpc.aio.AioRpcError as exc:
            failures.append(f"{exc.code().name}: {exc.details()}")
            return
        if not response.cert_chain:
            failures.append("empty chain")
            return
        latencies.append((time.perf_counter() - began) * 1000)

    shared = grpc.aio.secure_channel(address, credentials, options=options)
    await shared.channel_ready()
    await one(stub(shared), 0)  # the CA's first signature (and the shared connection) not timed
    latencies.clear()
    counter = iter(range(1, 1 << 30))
    began = time.perf_counter()
    deadline = began + plan.csr_s

    async def worker() -> None:
        call = stub(shared)
        while time.perf_counter() < deadline:
            if new_channel:
                async with grpc.aio.secure_channel(address, credentials, options=options) as ch:
                    await one(stub(ch), next(counter))
            else:
                await one(call, next(counter))

    await asyncio.gather(*(worker() for _ in range(plan.csr_concurrency)))
    seconds = time.perf_counter() - began
    await shared.close()
    latencies.sort()

    def pct(q: float) -> float | None:
        if not latencies:
            return None
        return round(latencies[min(len(latencies) - 1, round(q * (len(latencies) - 1)))], 2)

    return {
        "signed": len(latencies),
        "failed": len(failures),
        "failures": sorted(set(failures))[:5],
        "seconds": round(seconds, 3),
        "latency_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)},
    }


# -- report ---------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "—" if value is None else f"{value:,.{digits}f}{suffix}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def verdicts(results: dict[str, Any]) -> list[list[str]]:
    mtls = results.get("meshed", {}).get("summary", {}).get("mtls")
    rows = []
    for who in ("client sidecar", "server sidecar"):
        value = mtls[who]["cores_per_1k_rps"] if mtls else None
        verdict = "n/a" if value is None else "pass" if value <= TARGET_CORES_PER_1K else "FAIL"
        rows.append(
            [
                f"CPU per 1,000 req/s, {who} (mTLS), cores",
                _fmt(value, 3),
                f"{ISTIO_CORES_PER_1K:.2f}",
                f"≤ {TARGET_CORES_PER_1K:.2f}",
                verdict,
            ]
        )
    errors = sum(r.get("errors_total", 0) for r in results.get("meshed", {}).get("runs", []))
    rows.append(["errors, meshed call", str(errors), "—", "0", "pass" if errors == 0 else "FAIL"])
    return rows


def markdown(results: dict[str, Any]) -> str:
    plan = results["meta"]["plan"]
    parts = []
    meshed = results.get("meshed")
    if meshed:
        rows = []
        for arm, row in meshed["summary"].items():
            lat = row["latency_ms"]
            c, s = row.get("client sidecar"), row.get("server sidecar")
            rows.append(
                [
                    arm,
                    _fmt(row["rps"], 0),
                    str(row["errors"]),
                    *(_fmt(lat[q], 3) for q in ("p50", "p90", "p99", "p99.9")),
                    _fmt(row.get("added_p50_ms"), 3),
                    _fmt(row.get("added_p99_ms"), 3),
                    _fmt(c and c["cpu_us_per_req"], 1),
                    _fmt(c and c["cores_per_1k_rps"], 3),
                    _fmt(s and s["cpu_us_per_req"], 1),
                    _fmt(s and s["cores_per_1k_rps"], 3),
                    _fmt(row["upstream"]["cpu_us_per_req"], 1),
                ]
            )
        parts.append(
            f"**Meshed call** — `bench/openloop.py` at {plan['rate']:,} req/s, "
            f"{plan['connections']} keep-alive connections, {plan['fixed_s']:g} s after "
            f"{plan['warmup_s']:g} s warm-up (each arm warmed {plan['prewarm_s']:g} s before); "
            f"load → client sidecar → server sidecar → nginx; medians of "
            f"{plan['rounds']} round(s)\n\n"
            + _table(
                [
                    "arm",
                    "req/s",
                    "errors",
                    "p50 ms",
                    "p90 ms",
                    "p99 ms",
                    "p99.9 ms",
                    "added p50 ms",
                    "added p99 ms",
                    "client sidecar µs/req",
                    "cores per 1k rps",
                    "server sidecar µs/req",
                    "cores per 1k rps",
                    "upstream µs/req",
                ],
                rows,
            )
        )
        parts.append(
            f"Latency columns: medians over the rounds in which other processes took at most "
            f"{100 * DISTURBED:.0f}% of CPU {SERVER_CPU} ("
            + ", ".join(
                f"{arm} {row['latency_rounds']} of {row['rounds']}"
                for arm, row in meshed["summary"].items()
            )
            + "; all rounds when none was); added latency is the arm's median minus direct's. "
            "CPU columns: medians over all rounds (CPU time of our own processes)."
        )
        parts.append(
            "**Targets** (mTLS arm; Istio's published Envoy figure for reference)\n\n"
            + _table(["target", "meshlet", "Istio", "goal", "verdict"], verdicts(results))
        )
    hs = results.get("handshakes")
    if hs:
        rows = []
        for variant, label in (
            ("plain", "plaintext (TCP + HTTP/1.1)"),
            ("tls", "TLS, server certificate"),
            ("mtls", "mutual TLS, client certificate required"),
        ):
            row = hs.get(variant)
            if row is None:
                continue
            extra = (
                row["proxy_cpu_us_per_connection"] - hs["plain"]["proxy_cpu_us_per_connection"]
                if variant != "plain" and row["proxy_cpu_us_per_connection"] and hs.get("plain")
                else None
            )
            rows.append(
                [
                    label,
                    _fmt(row["connections_per_s"], 0),
                    str(row["failed"]),
                    _fmt(row["proxy_cores"], 2),
                    _fmt(row["proxy_cpu_us_per_connection"], 0),
                    _fmt(extra, 0),
                    " / ".join(_fmt(100 * v, 0, "%") for v in row["core_busy"].values()),
                    _fmt(100 * row["server_core_other_share"], 0, "%"),
                ]
            )
        parts.append(
            f"**New connections** — one `meshlet proxy` worker (CPU 0), a `direct_response` "
            f"listener; a new connection per request for {plan['handshake_s']} s: "
            f"{plan['s_time_clients']} x `openssl s_time -new -www /` (full handshakes) for TLS, "
            f"`wrk -c{plan['s_time_clients']} -H 'Connection: close'` for plaintext. "
            f"Negotiated: {hs['negotiated']}\n\n"
            + _table(
                [
                    "listener",
                    "connections/s",
                    "failed",
                    "proxy cores",
                    "proxy CPU µs/connection",
                    "TLS's share µs",
                    "busy CPU 0 / 1",
                    "others on CPU 0",
                ],
                rows,
            )
        )
    ca = results.get("csrs")
    if ca:
        rows = []
        for mode in ("shared channel", "channel per CSR"):
            row = ca.get(mode)
            if row is None:
                continue
            lat = row["latency_ms"]
            rows.append(
                [
                    mode,
                    str(row["signed"]),
                    str(row["failed"]),
                    _fmt(row["signed_per_s"], 0),
                    _fmt(lat["p50"], 1),
                    _fmt(lat["p99"], 1),
                    _fmt(row["control_cores"], 2),
                    _fmt(row["control_cpu_us_per_csr"], 0),
                    _fmt(row["runner_cpu_s"] / row["wall_s"], 2),
                    _fmt(100 * row["server_core_other_share"], 0, "%"),
                    str(row["ca_counted"]),
                ]
            )
        parts.append(
            f"**CSRs** — `meshlet control --ca` (CPU 0); ECDSA P-256 CSRs with a bootstrap token "
            f"each (64 identities), {ca['concurrency']} in flight over gRPC TLS from the runner "
            f"(CPU 1) for {plan['csr_s']:g} s\n\n"
            + _table(
                [
                    "client",
                    "signed",
                    "failed",
                    "signed/s",
                    "p50 ms",
                    "p99 ms",
                    "control cores",
                    "control CPU µs/CSR",
                    "client cores",
                    "others on CPU 0",
                    "CA's own count",
                ],
                rows,
            )
        )
    noisy = [
        r
        for r in (meshed or {}).get("runs", [])
        if r.get("server_core_other_share", 0) > report.OTHER_LIMIT
    ]
    if noisy:
        worst = max(r["server_core_other_share"] for r in noisy)
        parts.append(
            f"**The machine was not quiet**: other processes took more than "
            f"{100 * report.OTHER_LIMIT:.0f}% of CPU {SERVER_CPU} in {len(noisy)} of "
            f"{len(meshed['runs'])} meshed runs (up to {100 * worst:.0f}%)."
        )
    for part, reason in results.get("failed_parts", {}).items():
        parts.append(f"**{part}: not measured** — {reason}")
    return "\n\n".join(parts) + "\n"


SECTION = ("## Security", "bench/README.md says what is measured")


# -- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = harness.parse_args(__doc__, argv)
    plan = QUICK if args.quick else FULL
    harness.require(("wrk", "openssl", "taskset"))
    run = harness.Run("security", args)
    say(f"meshlet security benchmark ({run.mode}): meshed call, TLS handshakes, CSRs")
    ports, out = Ports(PORTS), run.out
    pki = make_pki(out / "security-pki")
    results = run.run_parts(
        (
            ("meshed", lambda s: meshed_call(s, plan, pki, ports, out)),
            ("handshakes", lambda s: handshakes(s, plan, pki, ports, out)),
            ("csrs", lambda s: csrs(s, plan, ports, out)),
        ),
        BUDGET_S[run.mode],
    )
    machine = report.machine() | {
        "openssl": report._first_line(["openssl", "version"]).split(" (")[0]
    }
    run.finish(
        results,
        meta={
            "plan": asdict(plan),
            "placement": harness.placement(
                "load generators and clients",
                "sidecars, upstream, the TLS proxy and the control plane",
            ),
        },
        markdown=markdown,
        section=SECTION,
        machine=machine,
    )
    return 130 if run.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
