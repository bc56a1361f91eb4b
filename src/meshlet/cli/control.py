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
    p.add_argument("--log-level", default="warning", choices=_LEVELS, help="default warning")
    p.set_defaults(run=run)


def _address(text: str, flag: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise MeshletError(f"{flag} {text!r} is not HOST:PORT (e.g. 127.0.0.1:15010)")
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
    )
    return serve(options)
