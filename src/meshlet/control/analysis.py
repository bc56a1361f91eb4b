"""Offline analysis of a set of resources, as ``istioctl analyze`` does it: findings that the
schemas alone cannot see, because they are about how resources refer to each other.

Each finding carries Istio's message code, so that users can look it up in Istio's reference:

* IST0101 ReferencedResourceNotFound (error): a route's destination host that no Service or
  ServiceEntry defines; a subset that no DestinationRule for that host defines; a gateway that
  no Gateway is.
* IST0109 ConflictingMeshGatewayVirtualServiceHosts (error): two VirtualServices for one host
  on the ``mesh`` gateway (sidecars would take only one of them).
* IST0132 VirtualServiceHostNotFoundInGateway (warning): a VirtualService host that none of
  the servers of a Gateway it is bound to serves.

Host names resolve as translation resolves them (short names in the resource's namespace).
Pure: resources in, findings out, in a stable order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum

from meshlet.api import LoadedResource
from meshlet.api.networking import Destination, DestinationRule, Gateway, VirtualService
from meshlet.control.registry import ConfigRegistry
from meshlet.control.snapshot import (
    MESH_GATEWAY,
    host_matches,
    hosts_overlap,
    resolve_gateway,
    resolve_host,
)


class Level(StrEnum):
    ERROR = "Error"
    WARNING = "Warning"
    INFO = "Info"


@dataclass(frozen=True, slots=True, kw_only=True)
class Finding:
    level: Level
    code: str
    resource: str  # "VirtualService default/reviews"
    location: str  # file:line
    message: str

    def __str__(self) -> str:  # istioctl's form, with the file and line added
        where = f"{self.resource} {self.location}" if self.location else self.resource
        return f"{self.level.value} [{self.code}] ({where}) {self.message}"


def _label(r: LoadedResource) -> str:
    return f"{r.kind} {r.namespace}/{r.name}" if r.namespace else f"{r.kind} {r.name}"


def _destinations(vs: VirtualService) -> Iterator[Destination]:
    for http in vs.spec.http:
        for d in http.route:
            yield d.destination
        if http.mirror is not None:
            yield http.mirror
        for m in http.mirrors:
            yield m.destination
    for tcp in vs.spec.tcp:
        for rd in tcp.route:
            yield rd.destination
    for tls in vs.spec.tls:
        for rd in tls.route:
            yield rd.destination


def analyze(resources: Sequence[LoadedResource]) -> list[Finding]:
    """Every finding about ``resources`` taken together, errors first."""
    registry = ConfigRegistry(resources)
    services = [s.hostname for s in registry.services()]
    rules: list[tuple[str, frozenset[str]]] = []
    gateways: dict[str, tuple[LoadedResource, Gateway]] = {}
    virtual_services: list[tuple[LoadedResource, VirtualService]] = []
    for r in resources:
        namespace = r.namespace or "default"
        if isinstance(r.model, DestinationRule):
            host = resolve_host(r.model.spec.host, namespace)
            rules.append((host, frozenset(s.name for s in r.model.spec.subsets)))
        elif isinstance(r.model, Gateway):
            gateways[f"{namespace}/{r.name}"] = (r, r.model)
        elif isinstance(r.model, VirtualService):
            virtual_services.append((r, r.model))

    findings: list[Finding] = []

    def add(level: Level, code: str, r: LoadedResource, message: str) -> None:
        findings.append(
            Finding(
                level=level, code=code, resource=_label(r), location=r.location, message=message
            )
        )

    mesh_hosts: dict[str, list[LoadedResource]] = {}
    for r, vs in virtual_services:
        namespace = r.namespace or "default"
        seen: set[tuple[str, str]] = set()
        missing_hosts: set[str] = set()
        for d in _destinations(vs):
            host = resolve_host(d.host, namespace)
            if (host, d.subset) in seen:
                continue
            seen.add((host, d.subset))
            if not any(host_matches(s, host) for s in services):
                if host not in missing_hosts:  # once per host, whatever its subsets
                    missing_hosts.add(host)
                    add(Level.ERROR, "IST0101", r, f'Referenced host not found: "{d.host}"')
            elif d.subset and not any(
                d.subset in subsets and host_matches(rule_host, host)
                for rule_host, subsets in rules
            ):
                add(
                    Level.ERROR,
                    "IST0101",
                    r,
                    f'Referenced host+subset in destinationrule not found: "{d.host}+{d.subset}"',
                )
        bound = [resolve_gateway(g, namespace) for g in vs.spec.gateways] or [MESH_GATEWAY]
        for gw in bound:
            if gw == MESH_GATEWAY:
                if not vs.spec.is_delegate:
                    for host in vs.spec.hosts:
                        mesh_hosts.setdefault(resolve_host(host, namespace), []).append(r)
                continue
            found = gateways.get(gw)
            if found is None:
                add(Level.ERROR, "IST0101", r, f'Referenced gateway not found: "{gw}"')
                continue
            _, gateway = found
            served = [
                h.partition("/")[2] if "/" in h else h
                for server in gateway.spec.servers
                for h in server.hosts
            ]
            missing = [h for h in vs.spec.hosts if not any(hosts_overlap(s, h) for s in served)]
            if missing:
                add(
                    Level.WARNING,
                    "IST0132",
                    r,
                    f"one or more host {list(missing)} defined in VirtualService"
                    f" {namespace}/{r.name} not found in Gateway {gw}.",
                )
    for host, owners in sorted(mesh_hosts.items()):
        if len(owners) > 1:
            names = ",".join(f"{o.namespace}/{o.name}" for o in owners)
            for o in owners:
                add(
                    Level.ERROR,
                    "IST0109",
                    o,
                    f"The VirtualServices {names} associated with mesh gateway define the same"
                    f" host {host} which can lead to undefined behavior. This can be fixed by"
                    " merging the conflicting VirtualServices into a single resource.",
                )
    order = {Level.ERROR: 0, Level.WARNING: 1, Level.INFO: 2}
    return sorted(findings, key=lambda f: (order[f.level], f.location, f.code, f.message))
