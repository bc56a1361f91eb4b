"""The embedded cluster: Deployments in the control plane's store become pods running here.

``Runtime`` is the kubelet and the Deployment controller in one, over the control plane's
store, which plays the Kubernetes API server:

* It watches the store. For each Deployment it keeps ``replicas`` pods of the current pod
  template (named ``<deployment>-<template hash>-<suffix>``, each with a new IP from the
  pod network). A changed template -- ``meshlet rollout restart`` sets an annotation on it --
  rolls: new pods start first, and an old pod is removed each time a new one is ready, so
  serving capacity never drops. Scaling down removes the newest pods first.
* Each pod is a ``PodRunner``: the sidecar (``meshlet proxy`` bootstrapped to the control
  plane as that pod's node) starts first, the application once the sidecar is ready. Its
  ``Pod`` object, with Kubernetes' status, is written to the store on every change, so the
  registry's endpoints follow readiness (only ready pods receive traffic) and
  ``meshlet get pods`` shows it.
* A pod that goes away is first taken out of the store (its endpoint leaves the proxies'
  configuration), then, a propagation delay later, stopped: SIGTERM to its process groups,
  the grace period, SIGKILL.
* The ingress gateway is a pod of its own in ``istio-system`` with Istio's labels (``istio:
  ingressgateway``), whose proxy is a ``router`` node; ``PortForward`` takes host port
  ``gateway_port`` on 127.0.0.1 to its port 8080.

Everything runs on the control plane's event loop; store watch callbacks only schedule work.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshlet.control.ca import BootstrapTokens, write_token_file
from meshlet.control.registry import INBOUND_PORT_ANNOTATION, TLS_MODE_LABEL
from meshlet.control.store import Event, ObjectKey, Store
from meshlet.errors import ConfigError
from meshlet.runtime.forward import PortForward
from meshlet.runtime.ipam import PodIPAllocator
from meshlet.runtime.manifests import (
    TEMPLATE_HASH_LABEL,
    PodIdentity,
    container_argv,
    container_env,
    load_images,
    named_ports,
    pod_name,
    template_hash,
)
from meshlet.runtime.pod import (
    SIDECAR_NAME,
    ContainerSpec,
    PodRunner,
    PodSpec,
    PodStatus,
    to_kube_status,
)
from meshlet.runtime.probe import ProbeSpec
from meshlet.runtime.process import ProcessSpec
from meshlet.runtime.sidecar import ADMIN_PORT, CaSettings, ProxyNode, proxy_bootstrap

log = logging.getLogger(__name__)

INBOUND_PORT = 15006
GATEWAY_NAMESPACE = "istio-system"
GATEWAY_NAME = "istio-ingressgateway"
GATEWAY_LABELS = {"istio": "ingressgateway", "app": "istio-ingressgateway"}
GATEWAY_TARGET_PORT = 8080  # the port Istio's ingress gateway serves HTTP on
PROPAGATION_DELAY = 1.0  # seconds between a pod leaving the endpoints and its SIGTERM
SIDECAR_PROBE_PERIOD = 0.5
TOKEN_FILE = "istio-token"
ROOT_FILE = "root-cert.pem"
TOKEN_TTL = 3600.0  # as Kubernetes' projected tokens; rewritten every third of it


def _nothing_listens(ip: str, port: int) -> bool:
    """Whether ``ip:port`` can be bound (SO_REUSEADDR: connections of a pod that is gone,
    in TIME_WAIT, do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, port))
        except OSError as e:
            return e.errno != errno.EADDRINUSE
    return True


@dataclass(frozen=True, slots=True, kw_only=True)
class RuntimeOptions:
    state_dir: Path
    xds_address: str
    gateway_port: int | None = 8080  # None: no ingress gateway
    images: tuple[Path, ...] = ()
    sidecar_log_level: str = "warning"
    #: The control plane's CA (``host:port``); empty: sidecars get no workload certificate.
    ca_address: str = ""
    xds_tls_address: str = ""  # ADS over mTLS (with the CA); "" keeps ADS plaintext
    ca_root_path: Path | None = None  # the mesh root, copied into each pod's directory
    trust_domain: str = "cluster.local"


@dataclass(eq=False)
class RunningPod:
    """A pod this runtime runs: its runner, and which Deployment and template it is of."""

    name: str
    namespace: str
    ip: str
    owner: str  # the Deployment's name ("" for the gateway)
    hash: str
    runner: PodRunner
    object: dict[str, Any]
    terminating: bool = False
    created: float = field(default_factory=lambda: asyncio.get_running_loop().time())

    @property
    def ready(self) -> bool:
        return self.runner.status.ready

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(group="", kind="Pod", namespace=self.namespace, name=self.name)


class Runtime:
    """Runs the store's Deployments as pods; see the module docstring."""

    def __init__(self, store: Store, options: RuntimeOptions) -> None:
        self.store = store
        self.options = options
        self.images = load_images(*options.images)
        self.ipam = PodIPAllocator(state_path=options.state_dir / "ipam.cursor")
        self.pods: dict[tuple[str, str], RunningPod] = {}
        self.failures: dict[str, str] = {}  # deployment key -> why its pods cannot be made
        self.gateway: RunningPod | None = None
        self.forward: PortForward | None = None
        self._unwatch: Any = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._background: set[asyncio.Task[Any]] = set()
        self._dirty: set[tuple[str, str]] = set()
        # Bootstrap tokens for the pods' sidecars (the key is in the state dir, shared with
        # the CA), and where each pod's token lives, to refresh it before it expires.
        self.tokens = (
            BootstrapTokens.load_or_create(options.state_dir) if options.ca_address else None
        )
        self._token_files: dict[Path, ProxyNode] = {}

    def __repr__(self) -> str:
        return f"<Runtime {len(self.pods)} pods>"

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # Pods of an earlier run are gone with their processes: clear their objects.
        stale = [ObjectKey.of(p) for p in self.store.list(group="", kind="Pod")]
        if stale:
            self.store.delete(stale)

        def watcher(events: list[Event]) -> None:
            loop.call_soon_threadsafe(self._on, events)

        self._unwatch = self.store.watch(watcher)
        if self.options.gateway_port is not None:
            await self._start_gateway()
        self._task = loop.create_task(self._loop(), name="runtime reconcile")
        self._wake.set()
        if self.tokens is not None:
            task = loop.create_task(self._refresh_tokens(), name="token refresh")
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def stop(self) -> None:
        """Stop every pod (applications first, then sidecars) and the gateway."""
        self._stopping = True
        if self._unwatch is not None:
            self._unwatch()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.forward is not None:
            await self.forward.stop()
        pods = list(self.pods.values())
        if self.gateway is not None:
            pods.append(self.gateway)
        with contextlib.suppress(Exception):
            self.store.delete([p.key for p in pods])
        await asyncio.gather(*(p.runner.stop() for p in pods), return_exceptions=True)
        for task in list(self._background):
            task.cancel()
        self.pods.clear()

    def kill_now(self) -> None:
        """Last resort (an exception on the way out): SIGKILL every process group."""
        for pod in [*self.pods.values(), *([self.gateway] if self.gateway else [])]:
            pod.runner.kill_now()

    def _on(self, events: list[Event]) -> None:
        if any(e.key.kind in ("Deployment", "ConfigMap") for e in events):
            self._wake.set()
        for e in events:  # a Pod object deleted by a user: that pod goes, a new one comes
            if e.type == "DELETED" and e.key.kind == "Pod":
                pod = self.pods.get((e.key.namespace, e.key.name))
                if pod is not None and not pod.terminating:
                    self._terminate(pod, already_removed=True)
                    self._wake.set()

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.reconcile()
            except Exception:
                log.exception("reconcile failed")

    # -- the Deployment controller ---------------------------------------------------------

    async def reconcile(self) -> None:
        deployments = self.store.list(group="apps", kind="Deployment")
        config_maps = {
            (str(c["metadata"].get("namespace", "default")), str(c["metadata"]["name"])): {
                str(k): str(v) for k, v in (c.get("data") or {}).items()
            }
            for c in self.store.list(group="", kind="ConfigMap")
        }
        wanted: set[tuple[str, str]] = set()
        for deployment in deployments:
            meta = deployment["metadata"]
            namespace = str(meta.get("namespace") or "default")
            name = str(meta["name"])
            wanted.add((namespace, name))
            await self._reconcile_deployment(deployment, namespace, name, config_maps)
        for pod in list(self.pods.values()):
            if (pod.namespace, pod.owner) not in wanted and not pod.terminating:
                self._terminate(pod)

    async def _reconcile_deployment(
        self,
        deployment: Mapping[str, Any],
        namespace: str,
        name: str,
        config_maps: Mapping[tuple[str, str], Mapping[str, str]],
    ) -> None:
        spec = deployment.get("spec") or {}
        template = spec.get("template") or {}
        replicas = spec.get("replicas")
        replicas = 1 if replicas is None else int(replicas)
        hash_ = template_hash(template)
        mine = [
            p
            for p in self.pods.values()
            if p.namespace == namespace and p.owner == name and not p.terminating
        ]
        current = [p for p in mine if p.hash == hash_]
        old = [p for p in mine if p.hash != hash_]
        failure_key = f"{namespace}/{name}"
        self.failures.pop(failure_key, None)
        for _ in range(replicas - len(current)):
            try:
                current.append(await self._create(namespace, name, hash_, template, config_maps))
            except ConfigError as e:
                self.failures[failure_key] = e.render()
                log.error("deployment %s: %s", failure_key, e.render())
                break
        if len(current) > replicas:  # scale down: the newest go first, not-ready before ready
            extra = sorted(current, key=lambda p: (p.ready, -p.created))[: len(current) - replicas]
            for pod in extra:
                self._terminate(pod)
        # Rolling update: old pods leave as new ones become ready (maxUnavailable 0).
        ready_new = sum(1 for p in current if p.ready)
        keep_old = max(0, replicas - ready_new)
        for pod in sorted(old, key=lambda p: (p.ready, p.created))[: max(0, len(old) - keep_old)]:
            self._terminate(pod)

    async def _create(
        self,
        namespace: str,
        owner: str,
        hash_: str,
        template: Mapping[str, Any],
        config_maps: Mapping[tuple[str, str], Mapping[str, str]],
    ) -> RunningPod:
        meta = template.get("metadata") or {}
        pod_spec = template.get("spec") or {}
        name = pod_name(owner, hash_)
        labels = {**{str(k): str(v) for k, v in (meta.get("labels") or {}).items()}}
        labels[TEMPLATE_HASH_LABEL] = hash_
        labels[TLS_MODE_LABEL] = "istio"  # every pod here has a sidecar (Istio's injector)
        account = str(
            pod_spec.get("serviceAccountName") or pod_spec.get("serviceAccount") or "default"
        )
        ip = self._allocate_ip()
        try:
            identity = PodIdentity(
                name=name, namespace=namespace, ip=ip, service_account=account, labels=labels
            )
            node = ProxyNode(
                pod=name,
                namespace=namespace,
                ip=ip,
                service_account=account,
                workload=owner,
                labels=labels,
            )
            directory = self.options.state_dir / "pods" / namespace / name
            containers = [
                self._container(c, identity, directory, config_maps, i)
                for i, c in enumerate(pod_spec.get("containers") or ())
            ]
            grace = pod_spec.get("terminationGracePeriodSeconds")
            spec = PodSpec(
                name=name,
                namespace=namespace,
                ip=ip,
                containers=containers,
                sidecar=self._sidecar(node, directory),
                grace=30.0 if grace is None else float(grace),
            )
        except BaseException:
            self.ipam.release(ip)
            raise
        annotations = {str(k): str(v) for k, v in (meta.get("annotations") or {}).items()}
        annotations[INBOUND_PORT_ANNOTATION] = str(INBOUND_PORT)
        obj: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": labels,
                "annotations": annotations,
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": owner}],
            },
            "spec": {**pod_spec, "serviceAccountName": account, "nodeName": "meshlet"},
        }
        return await self._run(name, namespace, ip, owner, hash_, spec, obj)

    async def _run(
        self,
        name: str,
        namespace: str,
        ip: str,
        owner: str,
        hash_: str,
        spec: PodSpec,
        obj: dict[str, Any],
    ) -> RunningPod:
        pod: RunningPod | None = None

        def on_status(status: PodStatus) -> None:
            if pod is not None:
                self._status_changed(pod)

        runner = PodRunner(spec, on_status=on_status)
        pod = RunningPod(
            name=name,
            namespace=namespace,
            ip=ip,
            owner=owner,
            hash=hash_,
            runner=runner,
            object=obj,
        )
        if owner:
            self.pods[(namespace, name)] = pod
        self._write(pod)
        # Started in the background: a pod slow to spawn must not hold up the others (nor the
        # reconcile loop, which goes on creating pods while this one starts).
        task = asyncio.get_running_loop().create_task(self._start(pod), name=f"start {name}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return pod

    async def _start(self, pod: RunningPod) -> None:
        try:
            await pod.runner.start()
        except Exception:
            log.exception("pod %s/%s failed to start", pod.namespace, pod.name)
            return
        log.info("pod %s/%s started on %s", pod.namespace, pod.name, pod.ip)

    def _container(
        self,
        container: Mapping[str, Any],
        pod: PodIdentity,
        directory: Path,
        config_maps: Mapping[tuple[str, str], Mapping[str, str]],
        index: int,
    ) -> ContainerSpec:
        name = str(container.get("name") or f"container-{index}")
        where = f"spec.template.spec.containers[{index}]"
        ports = named_ports(container)
        probes: dict[str, ProbeSpec | None] = {}
        for key, field_name in (("readiness", "readinessProbe"), ("liveness", "livenessProbe")):
            raw = container.get(field_name)
            probes[key] = None
            if raw:
                from meshlet.api.kube import Probe

                probes[key] = ProbeSpec.from_kube(
                    Probe.model_validate(raw), pod.ip, ports, where=f"{where}.{field_name}"
                )
        process = ProcessSpec(
            name=name,
            argv=container_argv(container, self.images),
            env=container_env(container, pod, config_maps),
            log_path=directory / f"{name}.log",
            cwd=Path(str(container["workingDir"])) if container.get("workingDir") else None,
        )
        return ContainerSpec(
            name=name, process=process, readiness=probes["readiness"], liveness=probes["liveness"]
        )

    def _ca_settings(self, node: ProxyNode, directory: Path) -> CaSettings | None:
        """Write the pod's token (0600, this user only: the pod's processes) and the mesh
        root next to its bootstrap; the settings the sidecar reads them by."""
        options = self.options
        if self.tokens is None or not options.ca_address:
            return None
        token_path = directory / TOKEN_FILE
        self._write_token(token_path, node)
        self._token_files[token_path] = node
        root_path = directory / ROOT_FILE
        if options.ca_root_path is not None:
            root_path.write_bytes(options.ca_root_path.read_bytes())
        return CaSettings(
            address=options.ca_address,
            token_path=str(token_path.resolve()),
            root_path=str(root_path.resolve()),
            trust_domain=options.trust_domain,
            xds_tls_address=options.xds_tls_address,
        )

    def _write_token(self, path: Path, node: ProxyNode) -> None:
        assert self.tokens is not None
        token = self.tokens.issue(
            namespace=node.namespace,
            service_account=node.service_account,
            pod=node.pod,
            ttl=TOKEN_TTL,
        )
        write_token_file(path, token)

    async def _refresh_tokens(self) -> None:
        """Rewrite every pod's token a third of the way through its life (as the kubelet
        refreshes projected tokens), so a sidecar renewing its certificate always has one."""
        while True:
            await asyncio.sleep(TOKEN_TTL / 3)
            for path, node in list(self._token_files.items()):
                if not path.parent.exists():
                    self._token_files.pop(path, None)
                    continue
                try:
                    self._write_token(path, node)
                except OSError:
                    log.exception("cannot refresh the token of %s/%s", node.namespace, node.pod)

    def _sidecar(self, node: ProxyNode, directory: Path) -> ContainerSpec:
        directory.mkdir(parents=True, exist_ok=True)
        bootstrap = directory / "envoy-bootstrap.json"
        ca = self._ca_settings(node, directory)
        bootstrap.write_text(
            json.dumps(proxy_bootstrap(node, self.options.xds_address, ca), indent=1)
        )
        bootstrap.chmod(0o600)
        process = ProcessSpec(
            name=SIDECAR_NAME,
            argv=[
                sys.executable,
                "-m",
                "meshlet",
                "proxy",
                "-c",
                str(bootstrap),
                "--drain-time",
                "2",
                "--log-level",
                self.options.sidecar_log_level,
            ],
            env={"PYTHONUNBUFFERED": "1", "PATH": "/usr/bin:/bin"},
            log_path=directory / f"{SIDECAR_NAME}.log",
        )
        readiness = ProbeSpec(
            kind="http",
            host=node.ip,
            port=ADMIN_PORT,
            path="/ready",
            period=SIDECAR_PROBE_PERIOD,
            failure_threshold=3,
        )
        return ContainerSpec(name=SIDECAR_NAME, process=process, readiness=readiness)

    def _allocate_ip(self) -> str:
        """The next pod IP on which nothing listens yet.

        Another mesh on this machine (its own state directory, so its own cursor) hands out
        the same addresses; a pod given one of its IPs could not bind its ports. An address
        whose sidecar admin port is taken is skipped (and released: the cursor has moved past
        it). Two meshes starting at the same instant can still race for an address.
        """
        skipped: list[str] = []
        try:
            while True:
                ip = self.ipam.allocate()
                if _nothing_listens(ip, ADMIN_PORT):
                    return ip
                log.info("pod IP %s is in use by another process; skipping it", ip)
                skipped.append(ip)
        finally:
            for ip in skipped:
                self.ipam.release(ip)

    # -- pods in the store -----------------------------------------------------------------

    def _status_changed(self, pod: RunningPod) -> None:
        if pod.terminating:
            return
        key = (pod.namespace, pod.name)
        if key in self._dirty:
            return  # a write is already scheduled; it takes the newest status
        self._dirty.add(key)
        loop = asyncio.get_running_loop()

        def write() -> None:
            self._dirty.discard(key)
            if not pod.terminating:
                self._write(pod)
                self._wake.set()  # readiness moves rollouts on

        loop.call_soon(write)

    def _write(self, pod: RunningPod) -> None:
        obj = dict(pod.object)
        obj["status"] = to_kube_status(pod.runner.status, pod.ip)
        try:
            self.store.apply([obj])
        except Exception:
            log.exception("cannot write pod %s/%s", pod.namespace, pod.name)

    def _terminate(self, pod: RunningPod, *, already_removed: bool = False) -> None:
        """Take ``pod`` out of the endpoints now, stop it a propagation delay later."""
        pod.terminating = True
        if not already_removed:
            with contextlib.suppress(Exception):
                self.store.delete([pod.key])
        log.info("pod %s/%s terminating", pod.namespace, pod.name)

        async def stop() -> None:
            try:
                await asyncio.sleep(PROPAGATION_DELAY)
                await pod.runner.stop()
            finally:
                self.pods.pop((pod.namespace, pod.name), None)
                self.ipam.release(pod.ip)

        task = asyncio.get_running_loop().create_task(stop(), name=f"stop {pod.name}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- the ingress gateway ---------------------------------------------------------------

    async def _start_gateway(self) -> None:
        hash_ = template_hash({"gateway": GATEWAY_LABELS})
        name = pod_name(GATEWAY_NAME, hash_)
        ip = self._allocate_ip()
        labels = {**GATEWAY_LABELS, TEMPLATE_HASH_LABEL: hash_}
        node = ProxyNode(
            pod=name,
            namespace=GATEWAY_NAMESPACE,
            ip=ip,
            service_account="istio-ingressgateway-service-account",
            workload=GATEWAY_NAME,
            labels=labels,
            router=True,
        )
        directory = self.options.state_dir / "pods" / GATEWAY_NAMESPACE / name
        spec = PodSpec(
            name=name,
            namespace=GATEWAY_NAMESPACE,
            ip=ip,
            containers=[],
            sidecar=self._sidecar(node, directory),
            grace=5.0,
        )
        obj: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": GATEWAY_NAMESPACE, "labels": labels},
            "spec": {
                "serviceAccountName": node.service_account,
                "containers": [{"name": SIDECAR_NAME, "image": "meshlet/proxy"}],
            },
        }
        self.gateway = await self._run(name, GATEWAY_NAMESPACE, ip, "", hash_, spec, obj)
        assert self.options.gateway_port is not None
        self.forward = PortForward(
            ("127.0.0.1", self.options.gateway_port), (ip, GATEWAY_TARGET_PORT)
        )
        await self.forward.start()

    # -- reports ---------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """For ``meshlet status`` and ``meshlet up``'s progress."""
        pods = [*self.pods.values(), *([self.gateway] if self.gateway else [])]
        return {
            "pods": [
                {
                    "name": p.name,
                    "namespace": p.namespace,
                    "ip": p.ip,
                    "ready": p.ready,
                    "phase": p.runner.status.phase,
                    "terminating": p.terminating,
                }
                for p in pods
            ],
            "failures": dict(self.failures),
            "gateway": (
                f"http://127.0.0.1:{self.options.gateway_port}"
                if self.options.gateway_port is not None
                else None
            ),
            "state_dir": str(self.options.state_dir.resolve()),
        }
