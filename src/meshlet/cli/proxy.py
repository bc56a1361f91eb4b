"""``meshlet proxy``: run the data-plane proxy on an Envoy v3 bootstrap file."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from meshlet.errors import ConfigError, MeshletError

_LEVELS = ("trace", "debug", "info", "warning", "warn", "error", "critical", "off")


def register(commands: Any) -> None:
    p: argparse.ArgumentParser = commands.add_parser(
        "proxy",
        help="run the proxy on an Envoy v3 bootstrap (YAML or JSON)",
        description="Run meshlet's Envoy-compatible HTTP/1.1 proxy on an Envoy v3 bootstrap file.",
    )
    p.add_argument("-c", "--config", required=True, metavar="FILE", help="Envoy v3 bootstrap")
    p.add_argument(
        "--concurrency",
        type=_positive,
        default=1,
        metavar="N",
        help="worker processes sharing the listeners (default 1)",
    )
    p.add_argument(
        "--drain-time",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long requests in flight may finish after SIGTERM (default 5)",
    )
    p.add_argument("--log-level", default="info", choices=_LEVELS, help="default info")
    p.set_defaults(run=run)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def run(args: argparse.Namespace) -> int:
    # Imports here keep `meshlet --help` fast and the proxy's memory free of other commands.
    from meshlet.proxy.bootstrap import load_bootstrap
    from meshlet.proxy.config import compile_bootstrap
    from meshlet.proxy.server import BindError, ServerOptions
    from meshlet.proxy.server import run as serve

    level = {"trace": "DEBUG", "warn": "WARNING", "off": "CRITICAL"}.get(
        args.log_level, args.log_level.upper()
    )
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    bootstrap = load_bootstrap(args.config)
    try:
        config = compile_bootstrap(bootstrap.message)
    except ConfigError as e:
        raise bootstrap.locate(e) from None
    options = ServerOptions(
        concurrency=args.concurrency, drain_time=args.drain_time, config_path=args.config
    )
    try:
        return serve(config, options)
    except BindError as e:
        raise MeshletError(f"{e} (is another proxy running? pick another port)") from e
