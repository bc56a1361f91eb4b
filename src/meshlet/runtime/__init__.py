"""The embedded runtime: Kubernetes-shaped workloads run as local processes (``meshlet up``)."""
