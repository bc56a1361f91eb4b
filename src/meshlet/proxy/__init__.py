"""The data plane: an Envoy-compatible HTTP/1.1 proxy.

Layering, bottom up:

* ``headers``, ``stream_info`` -- the values the hot path carries (bytes end to end).
* pure decision code: ``matching`` and ``routing`` (virtual hosts, routes, rewrites),
  ``retry``, ``filters.fault``, ``upstream.lb`` / ``upstream.outlier`` -- no sockets, no awaits.
* ``bootstrap`` parses Envoy v3 bootstrap files into xds-protos messages; ``config`` compiles
  those messages into one immutable ``ProxyConfig``; ``xds_client`` (the ADS client, imported
  only for a bootstrap with ``dynamic_resources``) feeds the same compilers from the control
  plane and hands each whole new ``ProxyConfig`` to the worker.
* the asyncio shell: ``http1`` (downstream connections, httptools), ``router`` (one request's
  trip upstream: retries, timeouts, mirrors), ``upstream.pool`` / ``upstream.cluster``
  (connections and the live state of a cluster), ``admin``, ``server`` (sockets, workers,
  signals, drain).
* ``telemetry`` -- Istio's metrics, Envoy's stats and access logs.
"""
