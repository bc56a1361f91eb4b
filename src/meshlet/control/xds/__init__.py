"""xDS: serving Envoy resources to proxies over ADS (state of the world, gRPC).

How the pieces build on each other:

* ``generator`` -- the interface to the resource side: ``Generator.generate(proxy, type_url,
  names)`` per type URL (LDS, RDS, CDS, EDS), ``ProxyInfo`` read from a stream's node.
* ``push`` -- ``PushRequest``, the pure ``Debouncer`` (100 ms quiet, 1 s at most) and push
  selection, and ``PushQueue``, which runs the debouncer on the event loop.
* ``connection`` -- one stream's state machine (subscriptions, per-type version and nonce,
  ACK, NACK, stale nonces), the responses it decides to send, its ``Limits`` and the
  ``Pacer`` that bounds its send rounds; pure.
* ``metrics`` -- the server's counters in Prometheus text, under istiod's names.
* ``server`` -- ``AdsServer``: the grpc.aio service, one reader and one sender per stream,
  fan-out of debounced pushes, ``sync_status()`` and ``metrics_text()``.

Typical wiring::

    queue = PushQueue()
    server = AdsServer({LISTENER_TYPE: lds, ROUTE_TYPE: rds, ...}, queue, "127.0.0.1:15010")
    await server.start()
    ...
    queue.enqueue(PushRequest(full=True, affected={ConfigKey(...)}, reason=CONFIG_UPDATE))
"""

from meshlet.control.xds.connection import (
    Limits,
    Nack,
    ProxyStatus,
    SyncState,
    TypeStatus,
)
from meshlet.control.xds.generator import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    GRPC_GENERATOR,
    LISTENER_TYPE,
    ROUTE_TYPE,
    SECRET_TYPE,
    GeneratedResources,
    Generator,
    ProxyInfo,
    short_type_name,
)
from meshlet.control.xds.push import (
    CONFIG_UPDATE,
    DEBOUNCE_MAX,
    DEBOUNCE_QUIET,
    ENDPOINT_UPDATE,
    EVERY_PROXY,
    GLOBAL_UPDATE,
    PROXY_UPDATE,
    SERVICE_UPDATE,
    ConfigKey,
    Debouncer,
    EveryProxy,
    PushQueue,
    PushRequest,
    PushScope,
)
from meshlet.control.xds.server import AdsServer, XdsServerError

__all__ = [
    "CLUSTER_TYPE",
    "CONFIG_UPDATE",
    "DEBOUNCE_MAX",
    "DEBOUNCE_QUIET",
    "ENDPOINT_TYPE",
    "ENDPOINT_UPDATE",
    "EVERY_PROXY",
    "GLOBAL_UPDATE",
    "GRPC_GENERATOR",
    "LISTENER_TYPE",
    "PROXY_UPDATE",
    "ROUTE_TYPE",
    "SECRET_TYPE",
    "SERVICE_UPDATE",
    "AdsServer",
    "ConfigKey",
    "Debouncer",
    "EveryProxy",
    "GeneratedResources",
    "Generator",
    "Limits",
    "Nack",
    "ProxyInfo",
    "ProxyStatus",
    "PushQueue",
    "PushRequest",
    "PushScope",
    "SyncState",
    "TypeStatus",
    "XdsServerError",
    "short_type_name",
]
