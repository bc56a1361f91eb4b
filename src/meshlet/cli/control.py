"""``meshlet control``: run the control plane (store, xDS server, HTTP API)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from meshlet.errors import MeshletError

_LEVELS = ("debug", "info", "warning", "error")


def register(commands: Any) -> None:
    p: argparse.ArgumentParser = commands.add_parser(
        "control",
        help="run the control plane: the configuration store, xDS (ADS) and the API",
        description=(
            "Run meshlet's control plane: keep the mesh's configuration in the state"
            " directory, serve it to proxies over ADS, and serve the API that `meshlet apply`"
            " and `meshlet get` use."
        ),
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".meshlet"),
        metavar="DIR",
        help="where the store lives (default .meshlet/)",
    )
    p.add_argument(
        "--xds-address",
        default="127.0.0.1:15010",
        metavar="HOST:PORT",
        help="ADS over plaintext gRPC (default 127.0.0.1:15010)",
    )
    p.add_argument(
        "--api-address",
        default="127.0.0.1:15014",
        metavar="HOST:PORT",
        help="the HTTP API, /metrics and /debug (default 127.0.0.1:15014)",
    )
    p.add_argument(
        "--ca",
        action="store_true",
        help="run the CA: CSRs over TLS on --ca-address, ADS over mTLS on --xds-tls-address",
    )
    p.add_argument(
        "--mtls",
        action="store_true",
        help="auto mTLS and PeerAuthentication in the proxies' configuration (implies --ca)",
    )
    p.add_argument(
        "--ca-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="a CA in Istio's cacerts layout (ca-cert.pem, ca-key.pem, root-cert.pem,"
        " cert-chain.pem); default: a self-signed root in <state dir>/ca/",
    )
    p.add_argument(
        "--trust-domain",
        default="cluster.local",
        metavar="DOMAIN",
        help="the SPIFFE trust domain (default cluster.local)",
    )
    p.add_argument(
        "--workload-cert-ttl",
        default="24h",
        metavar="DURATION",
        help="lifetime of workload certificates, e.g. 24h, 90m, 30s (default 24h)",
    )
    p.add_argument(
        "--ca-address",
        default="127.0.0.1:15012",
        metavar="HOST:PORT",
        help="the CA's gRPC over TLS (default 127.0.0.1:15012)",
    )
    p.add_argument(
        "--xds-tls-address",
        default="127.0.0.1:15011",
        metavar="HOST:PORT",
        help="ADS over mTLS, client certificates from the CA (default 127.0.0.1:15011)",
    )
    p.add_argument(
        "--trace-sampling",
        type=float,
        default=1.0,
        metavar="PERCENT",
        help="random trace sampling, 0-100 (default 1, Istio's); Telemetry resources"
        " override it per workload",
    )
    p.add_argument(
        "--otlp-endpoint",
        default="",
        metavar="URL",
        help="where proxies send spans, OTLP over HTTP (e.g. http://127.0.0.1:4318/v1/traces);"
        " default: no tracing",
    )
    p.add_argument(
        "--access-log-file",
        default="",
        metavar="PATH",
        help="every proxy's access log (e.g. /dev/stdout); default: off unless a Telemetry"
        " turns it on",
    )
    p.add_argument(
        "--access-log-encoding",
        default="TEXT",
        type=str.upper,
        choices=("TEXT", "JSON"),
        help="Istio's default text format or its JSON fields (default TEXT)",
    )
    p.add_argument("--log-level", default="warning", choices=_LEVELS, help="default warning")
    p.set_defaults(run=run)


def _duration(text: str, flag: str) -> float:
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        value = float(number) * units[unit]
    except ValueError:
        value = 0.0
    if value <= 0:
        raise MeshletError(f"{flag} {text!r} is not a positive duration (e.g. 24h, 90m, 30s)")
    return value


def _address(text: str, flag: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise MeshletError(f"{flag} {text!r} is not HOST:PORT (e.g. 127.0.0.1:15010)")
    return text


def _percent(value: float, flag: str) -> float:
    if not 0.0 <= value <= 100.0:
        raise MeshletError(f"{flag} {value:g} is not a percentage from 0 to 100")
    return value


def _otlp_endpoint(text: str, flag: str) -> str:
    if not text:
        return text
    from meshlet.control.translate.telemetry import otlp_address

    try:
        otlp_address(text)
    except ValueError as e:
        raise MeshletError(f"{flag}: {e}") from None
    return text


def run(args: argparse.Namespace) -> int:
    from meshlet.control.server import ControlOptions
    from meshlet.control.server import run as serve

    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    options = ControlOptions(
        state_dir=args.state_dir,
        xds_address=_address(args.xds_address, "--xds-address"),
        api_address=_address(args.api_address, "--api-address"),
        ca=args.ca,
        mtls=args.mtls,
        ca_dir=args.ca_dir,
        trust_domain=args.trust_domain,
        workload_cert_ttl=_duration(args.workload_cert_ttl, "--workload-cert-ttl"),
        ca_address=_address(args.ca_address, "--ca-address"),
        xds_tls_address=_address(args.xds_tls_address, "--xds-tls-address"),
        trace_sampling=_percent(args.trace_sampling, "--trace-sampling"),
        otlp_endpoint=_otlp_endpoint(args.otlp_endpoint, "--otlp-endpoint"),
        access_log_file=args.access_log_file,
        access_log_encoding=args.access_log_encoding,
    )
    return serve(options)
