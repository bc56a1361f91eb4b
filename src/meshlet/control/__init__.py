"""The control plane: meshlet's istiod.

It is a pipeline of stages, each fed by the one before (``../shared/DESIGN.md``):

* ``store`` -- the mesh's configuration: Kubernetes-style objects (already validated by
  ``meshlet.api``) kept in SQLite in the state directory, applied in atomic batches, versioned
  with ``resourceVersion`` and ``generation``, and announced to watchers as change events.
* ``registry`` -- services and endpoints (ServiceEntry, WorkloadEntry, Kubernetes Services
  over workloads), behind an interface the embedded runtime and Kubernetes will implement.
* ``snapshot`` -- an immutable, indexed view of the store and the service registry at one
  revision (istiod's ``PushContext``).
* per-proxy view (``Snapshot.view``) -- what one proxy may see and needs (its namespace,
  Sidecar scoping, exportTo), cut from the snapshot.
* ``translate`` -- pure functions, one per xDS type URL, that turn a view into Envoy resources
  (listeners, routes, clusters, endpoints).
* ``xds`` -- the ADS server: serves those resources over gRPC, pushing debounced changes only to the
  proxies they affect.

The process around them:

* ``generators`` -- ``Translation``: the store's objects as a snapshot, rebuilt once per
  debounced push, behind the ADS server's ``Generator`` and ``PushScope`` interfaces.
* ``api`` -- the HTTP API on port 15014: the store over Kubernetes-style JSON paths,
  ``/apply``, ``/metrics``, ``/debug/syncz``, ``/ready``.
* ``server`` -- ``meshlet control``: store, translation, ADS server and API wired together,
  store changes turned into pushes, shutdown on SIGTERM/SIGINT.
"""
