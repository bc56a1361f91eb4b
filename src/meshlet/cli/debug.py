"""``meshlet proxy-status`` and ``meshlet proxy-config``: what the control plane has sent each
connected proxy, and whether the proxy took it, as istioctl shows them.

Both read the control plane's debug endpoints (``/debug/syncz``, ``/debug/config_dump``),
found as ``meshlet get`` finds the API (``--server``, ``$MESHLET_SERVER``, the default).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any
from urllib.parse import urlencode

from meshlet.cli.config import DEFAULT_SERVER, SERVER_ENV, ControlClient, ServerError, table
from meshlet.errors import MeshletError

_TYPES = ("cds", "lds", "eds", "rds")
_CONFIG_TYPES = ("listeners", "routes", "clusters", "endpoints")
_ALIASES = {
    "listener": "listeners",
    "route": "routes",
    "cluster": "clusters",
    "endpoint": "endpoints",
}


def register(commands: Any) -> None:
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument(
        "--server",
        metavar="URL",
        help=f"the control plane's API (default ${SERVER_ENV}, else {DEFAULT_SERVER})",
    )
    p = commands.add_parser(
        "proxy-status",
        parents=[server],
        help="each connected proxy's sync state per xDS type",
        description="Each connected proxy and, per type, SYNCED, STALE, NACKED or NOT SENT.",
    )
    p.add_argument("-o", "--output", choices=("json",), help="output format")
    p.set_defaults(run=run_status)

    p = commands.add_parser(
        "proxy-config",
        parents=[server],
        help="the listeners, routes, clusters or endpoints served to one proxy",
        description="Show what the control plane serves one connected proxy.",
    )
    p.add_argument("type", choices=(*_CONFIG_TYPES, *_ALIASES), metavar="TYPE")
    p.add_argument("proxy", metavar="PROXY", help="a node id, or a pod name (pod[.namespace])")
    p.add_argument("-o", "--output", choices=("json",), help="output format")
    p.set_defaults(run=run_config)


def _client(args: argparse.Namespace) -> ControlClient:
    return ControlClient(args.server or os.environ.get(SERVER_ENV) or DEFAULT_SERVER)


def status_table(statuses: list[dict[str, Any]]) -> str:
    """istioctl's proxy-status table: NAME, then CDS LDS EDS RDS, then the acked version."""
    rows = []
    for s in statuses:
        types = s.get("types") or {}
        states = [str((types.get(t) or {}).get("state", "NOT SENT")) for t in _TYPES]
        versions = {str((v or {}).get("acked_version") or "") for v in types.values()} - {""}
        rows.append([str(s.get("proxy_id", "")), *states, ",".join(sorted(versions)) or "-"])
    return table(["NAME", *(t.upper() for t in _TYPES), "VERSION"], rows)


def run_status(args: argparse.Namespace) -> int:
    statuses = _client(args).request("GET", "/debug/syncz")
    if args.output == "json":
        print(json.dumps(statuses, indent=2))
        return 0
    if not statuses:
        print("No proxies are connected.", file=sys.stderr)
        return 0
    print(status_table(statuses))
    nacks = [
        (s["proxy_id"], t, v["last_nack"])
        for s in statuses
        for t, v in sorted((s.get("types") or {}).items())
        if v.get("state") == "NACKED" and v.get("last_nack")
    ]
    for proxy, t, nack in nacks:
        print(f"{proxy} rejected {t} {nack.get('version', '')}: {nack.get('message', '')}")
    return 0


def resolve_proxy(given: str, statuses: list[dict[str, Any]]) -> str:
    """The node id a user means: an id, ``pod.namespace`` or a pod name of a connected proxy."""
    ids = [str(s.get("proxy_id", "")) for s in statuses]
    if given in ids:
        return given
    matches = sorted(
        {
            i
            for i in ids
            if len(parts := i.split("~")) == 4
            and given in (parts[2], parts[2].split(".", 1)[0], parts[1])
        }
    )
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise MeshletError(f"{given!r} names several proxies: {', '.join(matches)}")
    if given.count("~") == 3:
        return given  # not connected: show what it would get
    raise MeshletError(f"no connected proxy is {given!r}; `meshlet proxy-status` lists them")


def run_config(args: argparse.Namespace) -> int:
    client = _client(args)
    kind = _ALIASES.get(args.type, args.type)
    proxy = resolve_proxy(args.proxy, client.request("GET", "/debug/syncz"))
    try:
        dump = client.request(
            "GET", "/debug/config_dump?" + urlencode({"proxy": proxy, "type": kind})
        )
    except ServerError as e:
        print(e, file=sys.stderr)
        return 1
    resources: list[dict[str, Any]] = dump.get("resources", [])
    if args.output == "json":
        print(json.dumps(resources, indent=2))
        return 0
    print(config_table(kind, resources))
    return 0


def config_table(kind: str, resources: list[dict[str, Any]]) -> str:
    """A one-line-per-resource summary, as istioctl proxy-config prints them."""
    rows: list[list[str]] = []
    if kind == "clusters":
        header = ["SERVICE FQDN", "PORT", "SUBSET", "DIRECTION", "TYPE"]
        for r in resources:
            name = str(r.get("name", ""))
            parts = name.split("|")
            if len(parts) == 4:
                direction, port, subset, host = parts
                rows.append([host or "-", port, subset or "-", direction, str(r.get("type", ""))])
            else:
                rows.append([name, "-", "-", "-", str(r.get("type", ""))])
    elif kind == "listeners":
        header = ["NAME", "ADDRESS", "PORT", "FILTER CHAINS"]
        for r in resources:
            socket = (r.get("address") or {}).get("socketAddress") or {}
            rows.append(
                [
                    str(r.get("name", "")),
                    str(socket.get("address", "-")),
                    str(socket.get("portValue", "-")),
                    str(len(r.get("filterChains") or [])),
                ]
            )
    elif kind == "routes":
        header = ["NAME", "VIRTUAL HOSTS", "DOMAINS"]
        for r in resources:
            hosts = r.get("virtualHosts") or []
            domains = sum(len(h.get("domains") or []) for h in hosts)
            rows.append([str(r.get("name", "")), str(len(hosts)), str(domains)])
    else:
        header = ["ENDPOINT", "CLUSTER"]
        for r in resources:
            cluster = str(r.get("clusterName", ""))
            for locality in r.get("endpoints") or []:
                for lb in locality.get("lbEndpoints") or []:
                    socket = ((lb.get("endpoint") or {}).get("address") or {}).get(
                        "socketAddress"
                    ) or {}
                    rows.append([f"{socket.get('address')}:{socket.get('portValue')}", cluster])
    return table(header, rows)
