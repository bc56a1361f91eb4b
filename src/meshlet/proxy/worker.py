"""One worker process's data plane: its listeners, clusters, stats, and config swaps.

A ``Worker`` binds every listener (SO_REUSEPORT, so that ``--concurrency`` workers share the
ports and the kernel spreads connections), owns one ``ClusterManager`` and one ``StatsStore``,
and applies a new ``ProxyConfig`` by swapping references: requests in flight finish on the
configuration they started with. ``apply`` (the ADS client's) binds the sockets of new
listeners before it changes anything, so a port that cannot be bound rejects the whole update;
then it swaps clusters (unchanged ones keep their live state), updates kept listeners in
place, starts new ones and drains removed ones.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket

from meshlet.errors import ConfigError, Problem
from meshlet.proxy.config import ProxyConfig
from meshlet.proxy.filters.metadata_exchange import local_headers
from meshlet.proxy.http1 import DownstreamConnection
from meshlet.proxy.listener import FilterChainConfig, HcmConfig, ListenerConfig
from meshlet.proxy.secrets import SecretStore
from meshlet.proxy.stream_info import DownstreamTls, StreamInfo
from meshlet.proxy.telemetry.stats import HttpStats, StatsStore
from meshlet.proxy.telemetry.tracing import NodeTags, Tracer
from meshlet.proxy.tls import TlsConfig, TlsContexts, TransportInspector
from meshlet.proxy.upstream.cluster import ClusterManager

log = logging.getLogger("meshlet.worker")


class ChainRuntime:
    """One filter chain of a listener; updated in place when the listener's configuration
    changes, so that connections see new routes (as they did with one chain)."""

    __slots__ = ("config", "hcm", "tls")

    def __init__(self, config: FilterChainConfig) -> None:
        self.config = config
        self.hcm: HcmConfig = config.hcm
        self.tls: TlsConfig | None = config.tls

    def __repr__(self) -> str:
        return f"<ChainRuntime {self.config.name or '-'} {'tls' if self.tls else 'plaintext'}>"

    def apply(self, config: FilterChainConfig) -> None:
        self.config = config
        self.hcm = config.hcm
        self.tls = config.tls


def _chain_key(config: FilterChainConfig, index: int) -> str:
    return config.name or f"#{index}"


class ListenerRuntime:
    """What connections of one listener share in this worker."""

    __slots__ = (
        "active_faults",
        "chains",
        "clusters",
        "config",
        "connections",
        "draining",
        "hcm",
        "http_stats",
        "local_ip",
        "loop",
        "mx_headers",
        "reporter",
        "rng",
        "server",
        "stats",
        "tls_contexts",
        "tracer",
    )

    def __init__(
        self,
        config: ListenerConfig,
        clusters: ClusterManager,
        stats: StatsStore,
        loop: asyncio.AbstractEventLoop,
        rng: random.Random,
        tls_contexts: TlsContexts | None = None,
        tracer: Tracer | None = None,
        *,
        mx_headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        self.config = config
        self.chains = [ChainRuntime(c) for c in config.chains]
        self.tls_contexts = tls_contexts or TlsContexts(SecretStore())
        self.hcm: HcmConfig = config.hcm
        self.reporter = config.reporter
        self.clusters = clusters
        self.stats = stats
        self.http_stats: HttpStats = stats.http(config.hcm.stat_prefix)
        self.loop = loop
        self.rng = rng
        self.connections: set[DownstreamConnection] = set()
        self.draining = False
        self.active_faults = 0
        self.local_ip = config.host.encode()
        self.server: asyncio.Server | None = None
        # istio.metadata_exchange: this node's two headers, encoded once per worker
        self.mx_headers = mx_headers
        # The worker's (shared by its listeners); used only by HCMs with tracing configured.
        self.tracer = tracer or Tracer(NodeTags(), stats.tracing, loop, rng)

    def __repr__(self) -> str:
        return f"<ListenerRuntime {self.config.name} connections={len(self.connections)}>"

    # -- connections (tls.ChainSelector) ---------------------------------------------------

    @property
    def inspects_tls(self) -> bool:
        return self.config.tls_inspector

    def accept(self) -> asyncio.Protocol:
        """A new connection: straight to HTTP, or first through the transport inspector."""
        if self.config.plain:
            return DownstreamConnection(self, self.chains[0])
        return TransportInspector(self)

    def select(
        self, transport_protocol: str, sni: str, alpn: tuple[str, ...]
    ) -> ChainRuntime | None:
        index = self.config.select_chain(transport_protocol, sni, alpn)
        return None if index is None else self.chains[index]

    def open(self, chain: ChainRuntime, tls: DownstreamTls | None) -> asyncio.Protocol:
        return DownstreamConnection(self, chain, tls)

    def record(self, info: StreamInfo, hcm: HcmConfig | None = None) -> None:
        """A stream ended: access logs and Istio metrics (as the HCM's istio.stats says)."""
        hcm = hcm or self.hcm
        for logger in hcm.access_logs:
            logger.log(info)
        cluster = info.upstream_cluster
        # The cluster's Istio metadata names the service (inbound clusters too), else its name.
        found = self.clusters.get(cluster) if cluster else None
        service = found.config.istio_service if found is not None else ""
        self.stats.istio.record(
            info,
            reporter=self.reporter,
            destination_service=service or _destination_service(cluster),
            destination_cluster="",
            config=hcm.istio_stats,
        )

    def apply(self, config: ListenerConfig) -> None:
        old = {_chain_key(c.config, i): c for i, c in enumerate(self.chains)}
        chains = []
        for i, cc in enumerate(config.chains):
            chain = old.get(_chain_key(cc, i))
            if chain is None:
                chain = ChainRuntime(cc)
            else:
                chain.apply(cc)
            chains.append(chain)
        self.chains = chains
        self.config = config
        self.hcm = config.hcm
        self.reporter = config.reporter
        self.http_stats = self.stats.http(config.hcm.stat_prefix)

    def drain(self) -> None:
        self.draining = True
        for conn in list(self.connections):
            conn.drain()

    def undrain(self) -> None:
        """/healthcheck/ok: connections stop closing after each response (Envoy's drainClose()
        consults the health-check state on every response, so failing is reversible)."""
        self.draining = False
        for conn in self.connections:
            conn.draining = False


def _destination_service(cluster: str) -> str:
    """Istio's destination_service: the host in an Istio cluster name, else the cluster name.

    Never the request's Host header: clients must not be able to mint metric series.
    """
    if cluster.count("|") == 3:  # outbound|9080|v1|reviews.default.svc.cluster.local
        return cluster.rsplit("|", 1)[1]
    return cluster or "unknown"


class Worker:
    """The data plane of one process."""

    def __init__(
        self,
        config: ProxyConfig,
        loop: asyncio.AbstractEventLoop,
        *,
        index: int = 0,
        concurrency: int = 1,
        secrets: SecretStore | None = None,
    ) -> None:
        self.index = index
        self.config = config
        self.loop = loop
        self.stats = StatsStore(config.node_info, concurrency=concurrency)
        self.secrets = secrets or SecretStore()
        self.tls_contexts = TlsContexts(self.secrets)
        self._config_secrets: set[str] = set()  # names this worker set from configuration
        self.rng = random.Random()
        self.clusters = ClusterManager(self.stats, self.rng)
        self.tracer = Tracer(NodeTags.from_node(config.node), self.stats.tracing, loop, self.rng)
        self.mx_headers = local_headers(config.node)  # the node is the bootstrap's: fixed
        self.listeners: dict[str, ListenerRuntime] = {}
        self.shutting_down = False

    def __repr__(self) -> str:
        return f"<Worker {self.index} listeners={len(self.listeners)} {self.clusters!r}>"

    async def start(self, sockets: dict[str, socket.socket] | None = None) -> None:
        """Build clusters, bind listeners, and wait for DNS clusters' first answer."""
        self._apply_secrets(self.config)
        self.clusters.apply(self.config.clusters, self.tls_contexts)
        for listener in self.config.listeners:
            sock = (sockets or {}).get(listener.name) or bind_listener(listener)
            await self._serve(listener, sock)
        try:
            await self.clusters.initialized(timeout=10.0)
        except TimeoutError:
            log.warning("some DNS clusters have no hosts yet; serving anyway")

    async def _serve(self, listener: ListenerConfig, sock: socket.socket) -> None:
        rt = ListenerRuntime(
            listener,
            self.clusters,
            self.stats,
            self.loop,
            self.rng,
            self.tls_contexts,
            self.tracer,
            mx_headers=self.mx_headers,
        )
        rt.server = await self.loop.create_server(rt.accept, sock=sock, backlog=1024)
        self.listeners[listener.name] = rt

    async def apply(self, config: ProxyConfig) -> None:
        """Swap to ``config`` (a whole new configuration, e.g. from ADS).

        Raises ``ConfigError`` and changes nothing when a new listener's address cannot be
        bound. Requests in flight finish on the tables they started with; removed listeners
        stop accepting and drain their connections.
        """
        if self.shutting_down:
            return
        rebind = {
            lc.name: lc
            for lc in config.listeners
            if (rt := self.listeners.get(lc.name)) is None
            or (rt.config.host, rt.config.port) != (lc.host, lc.port)
        }
        moving = {name for name in rebind if name in self.listeners}
        sockets: dict[str, socket.socket] = {}
        problems = []
        for name, lc in rebind.items():
            try:
                check_port_free(lc)  # also refuses an address another listener here has
                sockets[name] = bind_listener(lc)
            except OSError as e:
                problems.append(
                    Problem(path=f"listener {name}", message=f"cannot bind: {e.strerror}")
                )
        if problems:
            for sock in sockets.values():
                sock.close()
            raise ConfigError(problems)
        self.config = config
        self._apply_secrets(config)
        self.clusters.apply(config.clusters, self.tls_contexts)
        wanted = {lc.name for lc in config.listeners}
        for name in [n for n in self.listeners if n not in wanted or n in moving]:
            rt = self.listeners.pop(name)
            if rt.server is not None:
                rt.server.close()
            rt.drain()
        for lc in config.listeners:
            if lc.name in sockets:
                await self._serve(lc, sockets[lc.name])
            else:
                self.listeners[lc.name].apply(lc)

    def _apply_secrets(self, config: ProxyConfig) -> None:
        """Secrets from the configuration (bootstrap and SDS) into the store; those it no
        longer has are removed (secrets set by others, e.g. the identity module, stay)."""
        for name, secret in config.secrets:
            self.secrets.set(name, secret)
        names = {name for name, _ in config.secrets}
        for name in self._config_secrets - names:
            self.secrets.remove(name)
        self._config_secrets = names

    def flush_logs(self) -> None:
        for rt in self.listeners.values():
            loggers = {id(lg): lg for c in rt.chains for lg in c.hcm.access_logs}
            for logger in loggers.values():
                logger.flush()

    def drain(self) -> None:
        """Stop accepting; finish in-flight requests with ``connection: close``."""
        self.shutting_down = True
        for rt in self.listeners.values():
            if rt.server is not None:
                rt.server.close()
            rt.drain()

    def set_health_failed(self, failed: bool) -> None:
        """/healthcheck/fail: keep accepting, but close every connection after its response;
        /healthcheck/ok: stop doing so (unless the worker is shutting down)."""
        for rt in self.listeners.values():
            if failed:
                rt.drain()
            elif not self.shutting_down:
                rt.undrain()

    async def flush_traces(self, timeout: float = 2.0) -> None:
        """Export the spans still queued (shutdown), waiting at most ``timeout`` seconds."""
        await self.tracer.close(timeout)

    @property
    def active_connections(self) -> int:
        return sum(len(rt.connections) for rt in self.listeners.values())

    def stop(self) -> None:
        self.clusters.stop()
        for rt in self.listeners.values():
            for conn in list(rt.connections):
                if conn.transport is not None:
                    conn.transport.abort()
        self.flush_logs()


def bind_listener(listener: ListenerConfig, port: int | None = None) -> socket.socket:
    """A listening socket with SO_REUSEPORT, so several workers can bind the same port.

    ``port`` overrides the configured one (workers after the first bind the port the first
    one got when the configuration says 0).
    """
    family = socket.AF_INET6 if ":" in listener.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((listener.host, listener.port if port is None else port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def check_port_free(listener: ListenerConfig) -> None:
    """Raise ``OSError`` (EADDRINUSE) if another socket listens on the listener's address.

    SO_REUSEPORT would let a second proxy -- any process of the same user -- bind the same
    port and silently take half of its connections. A probe without SO_REUSEPORT cannot bind
    next to a listening socket, whatever options that one has; SO_REUSEADDR keeps it from
    tripping over connections in TIME_WAIT.
    """
    if listener.port == 0:
        return
    family = socket.AF_INET6 if ":" in listener.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((listener.host, listener.port))
