"""The ``meshlet`` command: one module per command group, errors translated here, once.

Exit codes: 0 success, 1 runtime failure (e.g. a port in use), 2 invalid configuration or
usage. A ``MeshletError`` is printed as its message, never as a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence

import meshlet
from meshlet.cli import analyze, config, control, debug, mesh, proxy, telemetry
from meshlet.errors import ConfigError, MeshletError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshlet",
        description="A service mesh in Python: Istio's API, Envoy's xDS, one command.",
    )
    parser.add_argument("--version", action="version", version=f"meshlet {meshlet.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    proxy.register(commands)
    control.register(commands)
    config.register(commands)
    debug.register(commands)
    analyze.register(commands)
    mesh.register(commands)
    telemetry.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
    except ConfigError as e:
        print(e.render(), file=sys.stderr)
        return 2
    except MeshletError as e:
        print(f"meshlet: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`meshlet ... | head`): not an error
        import os

        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())
