"""The proxy as an ADS client: one state-of-the-world stream to the control plane.

Imported only when the bootstrap has ``dynamic_resources`` (it pulls in grpcio: DESIGN's
memory budget keeps it off the static proxy's path). It runs on the proxy's own uvloop loop.

The protocol (Envoy's SotW ADS, as meshlet's server and grpcio's client speak it):

* On each new stream: LDS and CDS wildcards (empty names; ``node`` on the first request), then
  RDS for the route names that listeners use, EDS for the assignments that EDS clusters need
  and SDS for the secrets (``Secret``) that listeners' and clusters' TLS contexts name,
  each with the version last accepted. Accepted secrets go to the proxy's ``SecretStore`` (through
  ``ProxyConfig.secrets``); one that cannot be used is NACKed.
* A response is compiled with the same compilers as a bootstrap file (``AdsTables``: pure, no
  I/O). A resource that fails (any ``ConfigError``) keeps the version accepted before, if any,
  and makes the response a NACK with every problem in ``error_detail``; as in Envoy, the
  response's valid resources are taken. Then a whole new ``ProxyConfig`` is built and applied
  (``Worker.apply``: compile everything, then swap), and only then ACKed; an apply that fails
  (a port that cannot be bound) is NACKed and changes nothing.
* LDS and CDS responses carry every resource (a missing one is removed); RDS, EDS and SDS
  responses update the resources they carry. A listener waits for its RouteConfiguration and
  an EDS cluster for its ClusterLoadAssignment (Envoy's warming; not for its secrets: until
  they come, its TLS connections fail); meanwhile the version in
  force before stays, and nothing else waits. A listener already serving also keeps its
  routes until the clusters its new routes name have their endpoints (make before break).
* ``/ready`` goes LIVE once the first complete configuration is applied, or once the routes
  and endpoints still missing have exceeded their ``initial_fetch_timeout`` (Envoy's: 15 s by
  default, ``0s`` waits without limit), counted from when listeners and clusters came.
* The stream's end is not the configuration's: the proxy keeps serving what it has and
  reconnects with jittered exponential backoff (0.5 s doubling to 30 s), reset by the first
  response of a new stream.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import grpc  # type: ignore[import-untyped,unused-ignore]
import grpc.aio  # type: ignore[import-untyped,unused-ignore]
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import status_pb2  # type: ignore[import-untyped]

from meshlet.errors import ConfigError, Problem, ProblemList
from meshlet.proxy.config import DynamicResource, DynamicResources, ProxyConfig
from meshlet.proxy.listener import ListenerConfig, compile_listener
from meshlet.proxy.routing import compile_route_config
from meshlet.proxy.secrets import SECRET_TYPE, Secret, SecretStore, compile_secret
from meshlet.proxy.upstream.cluster import ClusterConfig, compile_cla, compile_cluster

log = logging.getLogger("meshlet.xds")

LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"

_MESSAGES: Mapping[str, type[Message]] = {
    LISTENER_TYPE: listener_pb2.Listener,
    ROUTE_TYPE: route_pb2.RouteConfiguration,
    CLUSTER_TYPE: cluster_pb2.Cluster,
    ENDPOINT_TYPE: endpoint_pb2.ClusterLoadAssignment,
    SECRET_TYPE: secret_pb2.Secret,
}
_SHORT = {
    LISTENER_TYPE: "lds",
    ROUTE_TYPE: "rds",
    CLUSTER_TYPE: "cds",
    ENDPOINT_TYPE: "eds",
    SECRET_TYPE: "sds",
}

BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
_INVALID_ARGUMENT = 3  # google.rpc.Code

_CHANNEL_OPTIONS = (
    # Notice a control plane that vanished without closing the connection.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # meshlet's own backoff decides when to reconnect.
    ("grpc.enable_retries", 0),
)


def backoff(attempt: int, rng: random.Random) -> float:
    """Seconds to wait before reconnect ``attempt`` (0-based): jittered, doubling, capped."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(attempt, 16))
    return rng.uniform(ceiling / 2, ceiling)


# -- the accepted resources (pure) ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """One accepted resource: its proto, what it compiled to, its version and when."""

    proto: Message
    compiled: Any
    version: str
    at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class AdsTables:
    """Everything accepted over ADS, by type and name. Immutable: ``accept`` returns a new one,
    so a response that cannot be applied leaves the tables as they were."""

    listeners: Mapping[str, Entry] = field(default_factory=dict)
    clusters: Mapping[str, Entry] = field(default_factory=dict)
    routes: Mapping[str, Entry] = field(default_factory=dict)
    assignments: Mapping[str, Entry] = field(default_factory=dict)
    secrets: Mapping[str, Entry] = field(default_factory=dict)
    versions: Mapping[str, str] = field(default_factory=dict)  # type URL -> version accepted
    received: frozenset[str] = frozenset()  # type URLs that have had a response

    def route_names(self) -> list[str]:
        """The RouteConfigurations that listeners name (the RDS subscription)."""
        names = {c.hcm.rds_route_name for e in self.listeners.values() for c in e.compiled.chains}
        return sorted(n for n in names if n)

    def secret_names(self, base: ProxyConfig | None = None) -> list[str]:
        """The SDS secrets that listeners and clusters (also the static ones) name."""
        names: set[str] = set(base.secret_names()) if base is not None else set()
        for e in self.listeners.values():
            names |= e.compiled.secret_names()
        for e in self.clusters.values():
            names |= e.compiled.secret_names()
        if base is not None:
            names -= {n for n, _ in base.secrets}  # static secrets are not asked for
        return sorted(names)

    def eds_names(self) -> list[str]:
        """The ClusterLoadAssignments that EDS clusters need (the EDS subscription)."""
        return sorted(
            {e.compiled.eds_service_name for e in self.clusters.values()} - {""},
        )

    def accept(
        self, response: Any, base: ProxyConfig, now: float
    ) -> tuple[AdsTables, ConfigError | None]:
        """The tables with ``response`` applied, and the problems found (``None``: none).

        As in Envoy, the valid resources of a response are taken and each invalid one keeps
        the version accepted before (if any); the problems make the response a NACK, and the
        type's ``versions`` entry stays at the last response accepted whole.
        """
        type_url = response.type_url
        problems = ProblemList()
        entries: dict[str, Entry] = {}
        old = self._table(type_url)
        for i, packed in enumerate(response.resources):
            try:
                name, proto = _unpack(type_url, packed, i)
            except ConfigError as e:
                problems.extend(e)
                continue
            if name in entries:
                problems.add(name, f"{_SHORT[type_url]}: duplicate resource name")
                continue
            previous = old.get(name)
            if previous is not None and previous.proto == proto:
                entries[name] = previous  # unchanged: keeps its version and time
                continue
            try:
                compiled = _compile(type_url, name, proto, base)
            except ConfigError as e:
                problems.extend(e)
                if previous is not None:
                    entries[name] = previous
                continue
            entries[name] = Entry(proto, compiled, response.version_info, now)
        error = ConfigError(problems.items) if problems.items else None
        versions = dict(self.versions)
        if error is None:
            versions[type_url] = response.version_info
        received = self.received | {type_url}
        if type_url == LISTENER_TYPE:
            try:
                _check_addresses(base, entries)
            except ConfigError as e:
                return self, ConfigError([*problems.items, *e.problems])
            tables = replace(self, listeners=entries, versions=versions, received=received)
            wanted = set(tables.route_names())
            routes = {n: e for n, e in self.routes.items() if n in wanted}
            return replace(tables, routes=routes, secrets=tables._kept_secrets(base)), error
        if type_url == CLUSTER_TYPE:
            tables = replace(self, clusters=entries, versions=versions, received=received)
            wanted = set(tables.eds_names())
            assignments = {n: e for n, e in self.assignments.items() if n in wanted}
            return (
                replace(tables, assignments=assignments, secrets=tables._kept_secrets(base)),
                error,
            )
        if type_url == SECRET_TYPE:
            wanted = set(self.secret_names(base))
            merged = {**self.secrets, **entries}
            secrets = {n: e for n, e in merged.items() if n in wanted}
            return replace(self, secrets=secrets, versions=versions, received=received), error
        # RDS and EDS: a response updates what it carries; what nobody needs is dropped.
        if type_url == ROUTE_TYPE:
            wanted = set(self.route_names())
            routes = {n: e for n, e in {**self.routes, **entries}.items() if n in wanted}
            return replace(self, routes=routes, versions=versions, received=received), error
        wanted = set(self.eds_names())
        merged = {**self.assignments, **entries}
        assignments = {n: e for n, e in merged.items() if n in wanted}
        tables = replace(self, assignments=assignments, versions=versions, received=received)
        return tables, error

    def _kept_secrets(self, base: ProxyConfig) -> dict[str, Entry]:
        wanted = set(self.secret_names(base))
        return {n: e for n, e in self.secrets.items() if n in wanted}

    def _table(self, type_url: str) -> Mapping[str, Entry]:
        return {
            LISTENER_TYPE: self.listeners,
            CLUSTER_TYPE: self.clusters,
            ROUTE_TYPE: self.routes,
            ENDPOINT_TYPE: self.assignments,
            SECRET_TYPE: self.secrets,
        }[type_url]


def _unpack(type_url: str, packed: any_pb2.Any, index: int) -> tuple[str, Message]:
    cls = _MESSAGES[type_url]
    proto = cls()
    if not packed.Unpack(proto):
        raise ConfigError.at(
            f"resources[{index}]",
            f"is a {packed.type_url or 'untyped resource'}, not a {cls.DESCRIPTOR.full_name}",
        )
    name = str(getattr(proto, "cluster_name" if type_url == ENDPOINT_TYPE else "name"))
    if not name:
        raise ConfigError.at(f"resources[{index}]", "has no name")
    return name, proto


def _compile(type_url: str, name: str, proto: Any, base: ProxyConfig) -> Any:
    if type_url == LISTENER_TYPE:
        path = f"listener {name}"
        if any(lc.name == name for lc in base.listeners):
            raise ConfigError.at(path, "has the name of a static listener")
        return compile_listener(proto, path, rds=True)
    if type_url == CLUSTER_TYPE:
        path = f"cluster {name}"
        if any(cc.name == name for cc in base.clusters):
            raise ConfigError.at(path, "has the name of a static cluster")
        return compile_cluster(proto, path, eds=True)
    if type_url == ROUTE_TYPE:
        return compile_route_config(proto, f"route_config {name}")
    if type_url == SECRET_TYPE:
        path = f"secret {name}"
        if any(n == name for n, _ in base.secrets):
            raise ConfigError.at(path, "has the name of a static secret")
        return compile_secret(proto, path)[1]
    return tuple(compile_cla(proto, f"cluster_load_assignment {name}"))


def _check_addresses(base: ProxyConfig, entries: Mapping[str, Entry]) -> None:
    seen = {(lc.host, lc.port): lc.name for lc in base.listeners if lc.port}
    problems = ProblemList()
    for name, entry in entries.items():
        lc: ListenerConfig = entry.compiled
        address = (lc.host, lc.port)
        if lc.port and address in seen:
            problems.add(
                f"listener {name}.address",
                f"{lc.host}:{lc.port} is also the address of listener {seen[address]!r}",
            )
        seen[address] = name
    problems.raise_if_any()


@dataclass(frozen=True, slots=True, kw_only=True)
class Built:
    """A configuration to apply, and whether it is complete (nothing warming)."""

    config: ProxyConfig
    complete: bool
    listeners: Mapping[str, ListenerConfig]
    clusters: Mapping[str, ClusterConfig]


def build(
    tables: AdsTables,
    base: ProxyConfig,
    previous_listeners: Mapping[str, ListenerConfig],
    previous_clusters: Mapping[str, ClusterConfig],
) -> Built:
    """The whole ``ProxyConfig``: the bootstrap's static part plus every warm resource.

    A listener still waiting for its routes, or an EDS cluster for its endpoints, keeps the
    version applied before (if any) and makes the result incomplete; so does a listener whose
    new routes name a cluster still waiting for its endpoints.
    """
    complete = True
    clusters: dict[str, ClusterConfig] = {}
    for name, entry in tables.clusters.items():
        cc: ClusterConfig = entry.compiled
        if cc.discovery == "EDS":
            assignment = tables.assignments.get(cc.eds_service_name)
            if assignment is None:
                complete = False
                if name in previous_clusters:
                    clusters[name] = previous_clusters[name]
                continue
            cc = replace(cc, endpoints=assignment.compiled)
        clusters[name] = cc
    warming = set(tables.clusters) - set(clusters)
    listeners: dict[str, ListenerConfig] = {}
    for name, entry in tables.listeners.items():
        lc: ListenerConfig = entry.compiled
        route_names = [c.hcm.rds_route_name for c in lc.chains if c.hcm.rds_route_name]
        if any(n not in tables.routes for n in route_names):
            complete = False
            if name in previous_listeners:
                listeners[name] = previous_listeners[name]
            continue
        if route_names:
            lc = lc.with_hcms(
                tuple(
                    replace(c.hcm, route_table=tables.routes[c.hcm.rds_route_name].compiled)
                    if c.hcm.rds_route_name
                    else c.hcm
                    for c in lc.chains
                )
            )
        previous = previous_listeners.get(name)
        referenced: set[str] = set()
        for c in lc.chains:
            referenced |= c.hcm.route_table.referenced_clusters()
        if previous is not None and referenced & warming:
            # Make before break: routes to a cluster whose endpoints are on their way wait
            # for them, so no request meets a cluster that is not there yet (503 NC).
            complete = False
            listeners[name] = previous
            continue
        listeners[name] = lc
    if base.ads is not None:
        needed = {LISTENER_TYPE} if base.ads.lds else set()
        needed |= {CLUSTER_TYPE} if base.ads.cds else set()
        complete = complete and needed <= tables.received

    def dump(table: Mapping[str, Entry]) -> tuple[DynamicResource, ...]:
        return tuple(
            DynamicResource(name=n, version=e.version, proto=e.proto, last_updated=e.at)
            for n, e in sorted(table.items())
        )

    dynamic = DynamicResources(
        listeners=dump(tables.listeners),
        clusters=dump(tables.clusters),
        routes=dump(tables.routes),
        secrets=dump(tables.secrets),
        lds_version=tables.versions.get(LISTENER_TYPE, ""),
        cds_version=tables.versions.get(CLUSTER_TYPE, ""),
    )
    secrets: tuple[tuple[str, Secret], ...] = tuple(
        (n, e.compiled) for n, e in sorted(tables.secrets.items())
    )
    config = base.with_dynamic(
        tuple(listeners.values()), tuple(clusters.values()), dynamic, secrets
    )
    return Built(config=config, complete=complete, listeners=listeners, clusters=clusters)


# -- the stream (I/O) --------------------------------------------------------------------------


class XdsClient:
    """Keeps one ADS stream to ``base.ads.target`` open and applies what it receives.

    ``apply`` installs a whole new configuration (``Worker.apply``; may raise ``ConfigError``);
    ``on_ready`` is called once, after the first complete configuration was applied.
    """

    def __init__(
        self,
        base: ProxyConfig,
        apply: Callable[[ProxyConfig], Awaitable[None]],
        on_ready: Callable[[], None],
        *,
        rng: random.Random | None = None,
        secrets: SecretStore | None = None,
    ) -> None:
        assert base.ads is not None
        self.base = base
        self.secrets = secrets  # the workload's certificate, for ADS over mTLS
        self.target = base.ads.target
        self._apply = apply
        self._on_ready = on_ready
        self._rng = rng or random.Random()
        self.tables = AdsTables()
        self.nonces: dict[str, str] = {}
        self.subscribed: dict[str, list[str]] = {}  # RDS and EDS names asked for
        self.ready = False
        self.connected = False
        self.streams = 0  # streams opened, for logs and tests
        self._listeners: Mapping[str, ListenerConfig] = {}
        self._clusters: Mapping[str, ClusterConfig] = {}
        self._got_response = False
        self._warming_timer: asyncio.TimerHandle | None = None
        self._warming_since: float | None = None
        self._needed = {LISTENER_TYPE} if base.ads.lds else set()
        self._needed |= {CLUSTER_TYPE} if base.ads.cds else set()
        node = base_pb2.Node()
        node.CopyFrom(base.node)
        if not node.user_agent_name:
            node.user_agent_name = "meshlet"
        self.node = node

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        versions = " ".join(f"{_SHORT[t]}={v}" for t, v in sorted(self.tables.versions.items()))
        return f"<XdsClient {self.target} {state} {versions or 'no config'}>"

    def _channel(self) -> grpc.aio.Channel:
        """Plaintext, or (m)TLS when the control plane's cluster has a TLS transport socket:
        the secrets it names (Istio's ``default`` and ``ROOTCA``) as they are now, so a
        rotated certificate serves the next connection."""
        assert self.base.ads is not None
        tls = self.base.ads.tls
        if tls is None:
            return grpc.aio.insecure_channel(self.target, options=_CHANNEL_OPTIONS)
        store = self.secrets
        cert = store.get(tls.certificate_sds) if store and tls.certificate_sds else None
        cert = cert or tls.certificate
        root = store.get(tls.validation_sds) if store and tls.validation_sds else None
        root = root or tls.validation
        credentials = grpc.ssl_channel_credentials(
            root_certificates=getattr(root, "trusted_ca_pem", None),
            private_key=getattr(cert, "private_key_pem", None),
            certificate_chain=getattr(cert, "cert_chain_pem", None),
        )
        options: list[tuple[str, str | int]] = list(_CHANNEL_OPTIONS)
        if tls.sni:
            options.append(("grpc.ssl_target_name_override", tls.sni))
        return grpc.aio.secure_channel(self.target, credentials, options=options)

    async def run(self) -> None:
        """Stream until cancelled, reconnecting with backoff."""
        attempt = 0
        while True:
            self._got_response = False
            try:
                await self._stream()
                log.warning("xDS stream to %s ended", self.target)
            except grpc.aio.AioRpcError as e:
                log.warning("xDS stream to %s failed: %s %s", self.target, e.code(), e.details())
            except Exception:
                log.exception("xDS stream to %s failed", self.target)
            finally:
                self.connected = False
            if self._got_response:
                attempt = 0
            delay = backoff(attempt, self._rng)
            attempt += 1
            log.info("reconnecting to the control plane in %.2fs", delay)
            await asyncio.sleep(delay)

    async def _stream(self) -> None:
        channel = self._channel()
        try:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            call = stub.StreamAggregatedResources()
            self.streams += 1
            self.nonces.clear()  # nonces belong to a stream
            for request in self._initial_requests():
                await call.write(request)
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    return
                if not self._got_response:
                    log.info("connected to the control plane at %s", self.target)
                self._got_response = self.connected = True
                for request in await self.handle(response):
                    await call.write(request)
        finally:
            await channel.close()

    def _initial_requests(self) -> list[Any]:
        assert self.base.ads is not None
        requests = []
        types = [LISTENER_TYPE] if self.base.ads.lds else []
        types += [CLUSTER_TYPE] if self.base.ads.cds else []
        for type_url in types:
            requests.append(self._request(type_url, []))
        for type_url, names in (
            (ROUTE_TYPE, self.tables.route_names()),
            (ENDPOINT_TYPE, self.tables.eds_names()),
            (SECRET_TYPE, self.tables.secret_names(self.base)),
        ):
            self.subscribed[type_url] = names
            if names:
                requests.append(self._request(type_url, names))
        if requests:
            requests[0].node.CopyFrom(self.node)
        return requests

    def _request(self, type_url: str, names: list[str], error: str | None = None) -> Any:
        request = discovery_pb2.DiscoveryRequest(
            type_url=type_url,
            version_info=self.tables.versions.get(type_url, ""),
            response_nonce=self.nonces.get(type_url, ""),
            resource_names=names,
        )
        if error is not None:
            request.error_detail.CopyFrom(
                status_pb2.Status(code=_INVALID_ARGUMENT, message=error[:4096])
            )
        return request

    async def handle(self, response: Any) -> list[Any]:
        """Judge and apply one response; the requests to send back (ACK or NACK first)."""
        type_url = response.type_url
        if type_url not in _MESSAGES:
            log.warning("ignoring an xDS response of unknown type %s", type_url)
            return []
        self.nonces[type_url] = response.nonce
        names = self.subscribed.get(type_url, [])
        short = _SHORT[type_url]
        try:
            tables, error = self.tables.accept(response, self.base, time.time())
            built = build(tables, self.base, self._listeners, self._clusters)
        except Exception as e:  # a compiler bug must not end the stream: refuse the update
            log.exception("rejected %s version %s", short, response.version_info)
            return [self._request(type_url, names, error=f"internal error: {e!r}")]
        if error is not None:
            log.warning("rejected %s version %s:\n%s", short, response.version_info, error)
        if tables is not self.tables:
            try:
                await self._apply(built.config)
            except ConfigError as e:
                log.warning("could not apply %s version %s:\n%s", short, response.version_info, e)
                return [self._request(type_url, names, error=_render(e))]
            except Exception as e:  # NACK rather than reconnect to the same update for ever
                log.exception("could not apply %s version %s", short, response.version_info)
                return [self._request(type_url, names, error=f"internal error: {e!r}")]
            self.tables = tables
            self._listeners, self._clusters = built.listeners, built.clusters
            if error is None:
                log.info("applied %s version %s", short, response.version_info)
        out = [self._request(type_url, names, error=None if error is None else _render(error))]
        for sub_type, wanted in (
            (ROUTE_TYPE, tables.route_names()),
            (ENDPOINT_TYPE, tables.eds_names()),
            (SECRET_TYPE, tables.secret_names(self.base)),
        ):
            if wanted != self.subscribed.get(sub_type, []):
                self.subscribed[sub_type] = wanted
                out.append(self._request(sub_type, wanted))
        if not self.ready:
            if built.complete:
                self._become_ready()
            elif self._needed <= tables.received:
                if self._warming_since is None:
                    self._warming_since = asyncio.get_running_loop().time()
                self._schedule_warming_check()
        return out

    def _missing(self) -> list[tuple[str, float | None]]:
        """What the first configuration still waits for, each with its fetch timeout."""
        tables = self.tables
        missing: list[tuple[str, float | None]] = []
        for entry in tables.listeners.values():
            for chain in entry.compiled.chains:
                hcm = chain.hcm
                if hcm.rds_route_name and hcm.rds_route_name not in tables.routes:
                    missing.append((f"route {hcm.rds_route_name}", hcm.rds_fetch_timeout))
        for entry in tables.clusters.values():
            cc = entry.compiled
            if cc.eds_service_name and cc.eds_service_name not in tables.assignments:
                missing.append((f"endpoints {cc.eds_service_name}", cc.eds_fetch_timeout))
        return missing

    def _warming_deadline(self) -> float | None:
        """When the first configuration stops waiting (Envoy's ``initial_fetch_timeout``, per
        resource, counted from when listeners and clusters came); None: it waits."""
        missing = self._missing()
        if self._warming_since is None or not missing:
            return None
        timeouts = [timeout for _, timeout in missing]
        if any(timeout is None for timeout in timeouts):
            return None  # initial_fetch_timeout: 0s -- wait for it however long it takes
        return self._warming_since + max(t for t in timeouts if t is not None)

    def _schedule_warming_check(self) -> None:
        if self._warming_timer is not None:
            self._warming_timer.cancel()
            self._warming_timer = None
        deadline = self._warming_deadline()
        if deadline is not None:
            loop = asyncio.get_running_loop()
            self._warming_timer = loop.call_at(deadline, self._warming_timed_out)

    def _become_ready(self) -> None:
        self.ready = True
        if self._warming_timer is not None:
            self._warming_timer.cancel()
            self._warming_timer = None
        self._on_ready()

    def _warming_timed_out(self) -> None:
        self._warming_timer = None
        deadline = self._warming_deadline()
        if self.ready or deadline is None:
            return
        if asyncio.get_running_loop().time() < deadline:
            self._schedule_warming_check()
            return
        log.warning(
            "initial fetch timed out for %s; going live without them",
            ", ".join(name for name, _ in self._missing()),
        )
        self._become_ready()


def _render(error: ConfigError) -> str:
    """The problems of a NACK, one per line."""
    return "\n".join(Problem.render(p, None) for p in error.problems)
