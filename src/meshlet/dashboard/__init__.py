"""The mesh's telemetry backend and dashboard: traces, metrics, the service graph, config status.

How the pieces build on each other (each module's docstring has its rules)::

    traces      the bounded trace store (spans by trace, evicting the oldest)
    otlp        the OTLP/HTTP receiver: POST /v1/traces (protobuf, JSON) → traces
    metrics     the ``MetricsSource`` interface (counter increases per label group) and the
                shared arithmetic: counter resets, ``histogram_quantile``
    scraper     the embedded source: scrapes every proxy's :15090/stats/prometheus into rings
    prometheus  the other source: PromQL against a real Prometheus's HTTP API
    golden      rate, errors, latency from a source: graph, workload/service tables, series
    server      the dashboard's JSON API and the static UI (``static/``, written separately)

HTTP/1.1 is ``meshlet.web``'s: the receiver and the dashboard are its ``WebServer``, the scraper
and the Prometheus source use its ``fetch``. The mesh daemon (``meshlet.runtime.daemon``)
starts the receiver, the scraper and the dashboard on its event loop, next to the control
plane whose store they read.
"""
