"""``meshlet analyze -f PATH``: check configuration offline, as ``istioctl analyze`` does.

Schema errors are reported with file, line and field path; then the resources are analysed
together (``meshlet.control.analysis``) for references that lead nowhere and conflicts. Kinds
meshlet does not know are passed over with a note. Exit 1 when there is any error.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshlet.api import LoadNote
from meshlet.errors import ConfigError


def register(commands: Any) -> None:
    from meshlet.cli.config import files_option

    p: argparse.ArgumentParser = commands.add_parser(
        "analyze",
        parents=[files_option()],
        help="check configuration files offline",
        description=(
            "Validate the files and analyse them together: destination hosts, subsets and"
            " gateways that exist nowhere, conflicting VirtualServices, unserved hosts."
        ),
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from meshlet.api import load_paths  # not at import time: `meshlet proxy` shares this CLI
    from meshlet.control.analysis import Level, analyze

    notes: list[LoadNote] = []
    try:
        resources = load_paths(args.filename, unknown="skip", notes=notes)
    except ConfigError as e:
        print(e.render(), file=sys.stderr)
        return 1
    for note in notes:
        print(f"Info [IST0000] ({note}) passed over", file=sys.stderr)
    findings = analyze(resources)
    for finding in findings:
        print(finding)
    if not findings:
        print(f"No validation issues found ({len(resources)} resources analyzed).")
    return 1 if any(f.level is Level.ERROR for f in findings) else 0
