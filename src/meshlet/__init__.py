"""meshlet: a service mesh in Python.

How the pieces build on each other (see docs and ``../shared/DESIGN.md``):

* ``meshlet.errors`` -- the small exception family every layer raises and the CLI prints.
* ``meshlet.web`` -- the small asyncio HTTP/1.1 server and client the control plane's API, the
  dashboard and the OTLP receiver share.
* ``meshlet.api`` -- Istio's and Kubernetes' resources: YAML loading with file:line positions,
  pydantic schemas, validation.
* ``meshlet.control`` -- the control plane: store, registry, snapshot, pure translation into
  Envoy resources, the ADS server, the CA.
* ``meshlet.proxy`` -- the data plane. Envoy v3 resources (from a bootstrap file or an ADS
  stream) are compiled into immutable tables; an asyncio shell moves bytes and asks pure
  decision code (routing, balancing, retries, outlier ejection, faults, RBAC) what to do;
  telemetry counts, logs and traces each request.
* ``meshlet.runtime`` -- the embedded cluster: pods as processes with sidecars, the gateway.
* ``meshlet.dashboard`` -- what telemetry goes up to: OTLP receiver, trace store, scraper,
  golden metrics and the web UI.
* ``meshlet.demo`` -- Bookinfo's services and manifests.
* ``meshlet.cli`` -- the ``meshlet`` command; it translates errors into exit codes once.
"""

__version__ = "0.1.0"
