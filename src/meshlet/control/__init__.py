"""The control plane: meshlet's istiod.

It is a pipeline of stages, each fed by the one before (``../shared/DESIGN.md``):

* ``store`` -- the mesh's configuration: Kubernetes-style objects (already validated by
  ``meshlet.api``) kept in SQLite in the state directory, applied in atomic batches, versioned
  with ``resourceVersion`` and ``generation``, and announced to watchers as change events.
* snapshot -- an immutable, indexed view of the store and the service registry at one
  revision (istiod's ``PushContext``).
* per-proxy view -- what one proxy may see and needs (its namespace, Sidecar scoping,
  exportTo), cut from the snapshot.
* generators -- pure functions, one per xDS type URL, that turn a view into Envoy resources
  (listeners, routes, clusters, endpoints).
* ADS server -- serves those resources over gRPC, pushing debounced changes only to the
  proxies they affect.

Only the store exists so far; the other stages are to come.
"""
