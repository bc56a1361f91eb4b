"""``meshlet control``: the control plane's process, its stages wired together.

Start-up, in order: open the store (``<state dir>/store.db``, locked against a second control
plane), build the first snapshot from it (``Translation``), start the ADS server with the
translation as its generators and push scope, start the HTTP API, then watch the store: each
committed batch becomes one ``PushRequest`` naming what it touched. The push queue debounces
them; the translation rebuilds its snapshot once per released push (``prepare_push``), and
every connected proxy gets what changed for it.

Shutdown (SIGTERM or SIGINT): stop watching, stop the API, end the ADS streams, close the
store. A progress line is printed for each step of start-up, so a user sees where it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import uvloop

from meshlet.control.api import DEFAULT_ADDRESS as DEFAULT_API_ADDRESS
from meshlet.control.api import ApiHandler, ApiServer, Response
from meshlet.control.ca import (
    DEFAULT_TRUST_DOMAIN,
    DEFAULT_WORKLOAD_CERT_TTL,
    BootstrapTokens,
    CertificateAuthority,
)
from meshlet.control.ca_server import (
    DEFAULT_CA_ADDRESS,
    DEFAULT_XDS_TLS_ADDRESS,
    CaServer,
    CertificateService,
)
from meshlet.control.generators import Translation
from meshlet.control.snapshot import MeshConfig
from meshlet.control.store import DEFAULT_STATE_DIR, Event, Store
from meshlet.control.xds import (
    CONFIG_UPDATE,
    PROXY_UPDATE,
    SECRET_TYPE,
    AdsServer,
    ConfigKey,
    PushQueue,
    PushRequest,
)
from meshlet.control.xds.server import DEFAULT_ADDRESS as DEFAULT_XDS_ADDRESS

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlOptions:
    state_dir: Path = DEFAULT_STATE_DIR
    xds_address: str = DEFAULT_XDS_ADDRESS
    api_address: str = DEFAULT_API_ADDRESS
    #: Run the CA (CSRs on ``ca_address``, ADS over mTLS on ``xds_tls_address``, SDS).
    ca: bool = False
    #: Auto mTLS and PeerAuthentication in the translation (implies ``ca``). Off by default
    #: until every proxy speaks TLS.
    mtls: bool = False
    ca_dir: Path | None = None  # Istio's cacerts layout; None: self-signed in the state dir
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    workload_cert_ttl: float = DEFAULT_WORKLOAD_CERT_TTL
    ca_address: str = DEFAULT_CA_ADDRESS
    xds_tls_address: str = DEFAULT_XDS_TLS_ADDRESS
    #: Telemetry defaults, overridden per workload by Telemetry resources. Random trace
    #: sampling in percent (Istio's mesh default is 1%).
    trace_sampling: float = 1.0
    #: Where proxies post spans (OTLP/HTTP, e.g. ``http://127.0.0.1:4318/v1/traces``);
    #: empty: no tracing is configured.
    otlp_endpoint: str = ""
    #: Access logs of every proxy (e.g. ``/dev/stdout``); empty: off unless a Telemetry turns
    #: them on (then ``/dev/stdout``).
    access_log_file: str = ""
    access_log_encoding: str = "TEXT"  # or "JSON"

    @property
    def ca_enabled(self) -> bool:
        return self.ca or self.mtls

    def mesh_config(self) -> MeshConfig:
        """The mesh-wide settings translation reads."""
        return MeshConfig(
            trust_domain=self.trust_domain,
            enable_auto_mtls=self.mtls,
            trace_sampling=self.trace_sampling,
            otlp_endpoint=self.otlp_endpoint,
            access_log_file=self.access_log_file,
            access_log_encoding=self.access_log_encoding,
        )


def push_request(events: list[Event]) -> PushRequest:
    """The push a committed batch asks for: a full one, naming each object it touched."""
    affected = frozenset(
        ConfigKey(kind=e.key.kind, name=e.key.name, namespace=e.key.namespace) for e in events
    )
    return PushRequest(full=True, affected=affected, reason=CONFIG_UPDATE)


class ControlPlane:
    """The running control plane: store, translation, ADS server and API."""

    def __init__(
        self,
        options: ControlOptions,
        out: TextIO = sys.stdout,
        *,
        routes: dict[str, Callable[[str, bytes], Response]] | None = None,
    ) -> None:
        self.options = options
        self.out = out
        self.routes = dict(routes or {})  # more API routes ("METHOD /path"), the runtime's
        self.store: Store | None = None
        self.translation: Translation | None = None
        self.ads: AdsServer | None = None
        self.api: ApiServer | None = None
        self.ca: CaServer | None = None
        self._unwatch: Callable[[], None] | None = None

    def __repr__(self) -> str:
        return f"<ControlPlane {self.ads!r} {self.api!r}>"

    def _say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    async def start(self) -> None:
        """Start every stage; on failure, stop what was started and raise."""
        # A snapshot of a large mesh is hundreds of thousands of objects, and rebuilding it
        # allocates as many: at CPython's default threshold (700) the collector runs hundreds
        # of times per push, half of a push's time. Young collections 100 times rarer cost
        # a few MiB at most.
        gc.set_threshold(70_000, 20, 20)
        try:
            options = self.options
            store = self.store = Store.in_state_dir(options.state_dir)
            translation = self.translation = Translation(store, mesh=options.mesh_config())
            self._say(f"store {store.path}: {len(store.list())} objects")
            queue = PushQueue()
            generators: dict[str, Any] = dict(translation.generators())
            service = None
            if options.ca_enabled:
                service = self._certificate_service(queue)
                generators[SECRET_TYPE] = service
            ads = self.ads = AdsServer(generators, queue, options.xds_address, scope=translation)
            await ads.start()
            self._say(f"xDS on {ads.bound_address}")
            if service is not None:
                ca = self.ca = CaServer(
                    service, options.ca_address, xds_tls_address=options.xds_tls_address, ads=ads
                )
                await ca.start()
                self._say(f"CA on {ca.bound_address}, xDS over mTLS on {ca.bound_xds_tls_address}")

            def metrics() -> str:
                text = ads.metrics_text()
                return text + self.ca.metrics_text() if self.ca is not None else text

            handler = ApiHandler(
                store=store,
                metrics=metrics,
                sync_status=lambda: [s.as_dict() for s in ads.sync_status()],
                config_dump=translation.config_dump,
                routes=dict(self.routes),
            )
            api = self.api = ApiServer(handler, self.options.api_address)
            await api.start()
            self._say(f"API on http://{api.bound_address}")
            self._unwatch = store.watch(lambda events: queue.enqueue(push_request(events)))
            if store.revision != translation.revision:  # written between snapshot and watch
                queue.enqueue(PushRequest(full=True, reason=CONFIG_UPDATE))
        except BaseException:
            await self.stop()
            raise

    def _certificate_service(self, queue: PushQueue) -> CertificateService:
        options = self.options
        ttl = {"default_ttl": options.workload_cert_ttl}
        if options.ca_dir is not None:
            authority = CertificateAuthority.from_dir(
                options.ca_dir, trust_domain=options.trust_domain, **ttl
            )
        else:
            authority = CertificateAuthority.load_or_create(
                options.state_dir, trust_domain=options.trust_domain, **ttl
            )
        tokens = BootstrapTokens.load_or_create(options.state_dir)
        # A new certificate changes one proxy's SDS ``default``: a push re-sends secrets
        # (unchanged resources are dropped by the connection's digest).
        return CertificateService(
            authority,
            tokens,
            on_issued=lambda: queue.enqueue(PushRequest(full=True, reason=PROXY_UPDATE)),
        )

    async def stop(self) -> None:
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        if self.api is not None:
            await self.api.stop()
            self.api = None
        if self.ca is not None:
            await self.ca.stop(1.0)
            self.ca = None
        if self.ads is not None:
            await self.ads.stop(1.0)
            self.ads = None
        if self.store is not None:
            self.store.close()
            self.store = None


async def serve(options: ControlOptions, out: TextIO = sys.stdout) -> None:
    """Run the control plane until SIGTERM or SIGINT."""
    plane = ControlPlane(options, out)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await plane.start()
        print("ready", file=out, flush=True)
        await stopping.wait()
        print("shutting down", file=out, flush=True)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        await plane.stop()


def run(options: ControlOptions) -> int:
    """``meshlet control``'s body: serve on uvloop; exit code 0 after a signal."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(options))
    return 0
