"""End-to-end fixtures: a whole mesh started the way a user starts it, driven by the ``meshlet``
command and by HTTP requests through its ingress gateway.

* ``Mesh`` is a running mesh: ``meshlet`` commands against it (its own ``MESHLET_SERVER``,
  xDS and gateway ports and state directory, so a developer's mesh on the default ports is
  never touched), the Bookinfo page through the gateway, and the bookkeeping that proves at
  the end that ``meshlet down`` left no process behind.
* ``start_mesh(tmp, *files)`` runs ``meshlet up -d``; ``Mesh.down()`` runs ``meshlet down``
  and asserts that every process the mesh ever ran (the daemon, and every container's process
  group seen in ``meshlet get pods``) is gone.
* ``Page`` reads what a user reads on ``/productpage``: which reviews pod served it, the star
  colours, the error texts.

Configuration changes reach the proxies asynchronously: ``Mesh.apply`` waits until the
control plane has pushed the change and every proxy has acknowledged it (``meshlet
proxy-status``) before a test looks at traffic.
"""

from __future__ import annotations

import contextlib
import http.cookiejar
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshlet.demo.bookinfo.page import REVIEWS_UNAVAILABLE, TITLE
from meshlet.demo.bookinfo.reviews import RATINGS_UNAVAILABLE

MESHLET = [sys.executable, "-m", "meshlet.cli.main"]

_SERVED_BY = re.compile(r"Reviews served by: <b>([^<]+)</b>")
_STAR_COLOR = re.compile(r'<font color="([^"]+)"><span class="glyphicon')


from tests.ports import free_port, free_ports_in_a_row  # noqa: E402

# The e2e tests take wait_until from here, with the fixtures.
from tests.waiting import wait_until as wait_until  # noqa: E402

# -- the page --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Page:
    """One ``/productpage`` as a user sees it."""

    status: int
    html: str
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Served, with its reviews (a failed reviews call still answers 200)."""
        return self.status == 200 and TITLE in self.html and REVIEWS_UNAVAILABLE not in self.html

    @property
    def reviews_pod(self) -> str | None:
        match = _SERVED_BY.search(self.html)
        return match.group(1) if match else None

    @property
    def reviews_version(self) -> str | None:
        """v1, v2 or v3, from the name of the pod that served the reviews."""
        pod = self.reviews_pod
        match = re.match(r"reviews-(v\d+)-", pod or "")
        return match.group(1) if match else None

    @property
    def star_colors(self) -> set[str]:
        return set(_STAR_COLOR.findall(self.html))

    @property
    def reviews_unavailable(self) -> bool:
        return REVIEWS_UNAVAILABLE in self.html

    @property
    def ratings_unavailable(self) -> bool:
        return RATINGS_UNAVAILABLE in self.html

    def __repr__(self) -> str:
        return (
            f"<Page {self.status} reviews={self.reviews_pod} stars={sorted(self.star_colors)}"
            f" reviews_unavailable={self.reviews_unavailable}"
            f" ratings_unavailable={self.ratings_unavailable}>"
        )


class Browser:
    """A user at the gateway: keeps its cookies (the session of ``/login``), no HTTP proxy."""

    def __init__(self, gateway: str) -> None:
        self.gateway = gateway
        self.cookies = http.cookiejar.CookieJar()
        self._opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPCookieProcessor(self.cookies)
        )

    def get(self, path: str = "/productpage", timeout: float = 30.0) -> Page:
        return self._open(urllib.request.Request(self.gateway + path), timeout)

    def login(self, user: str) -> Page:
        """POST /login as the page's form does; the redirect lands on the product page."""
        body = urllib.parse.urlencode({"username": user, "passwd": ""}).encode()
        page = self._open(urllib.request.Request(self.gateway + "/login", data=body), 30.0)
        assert page.status == 200 and f'<b class="user">{user}</b>' in page.html, page
        return page

    def _open(self, request: urllib.request.Request, timeout: float) -> Page:
        started = time.monotonic()
        try:
            with self._opener.open(request, timeout=timeout) as r:
                html = r.read().decode(errors="replace")
                status = r.status
        except urllib.error.HTTPError as e:
            html, status = e.read().decode(errors="replace"), e.code
        return Page(status, html, time.monotonic() - started)


@dataclass
class Load:
    """Steady sequential page loads in a thread: what a user keeps clicking during a change."""

    browser: Browser
    interval: float = 0.02
    pages: list[Page] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Load:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(60)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.pages.append(self.browser.get(timeout=20))
            except OSError as e:  # refused, reset, timed out: a failed request
                self.errors.append(repr(e))
            self._stop.wait(self.interval)

    @property
    def failures(self) -> list[str]:
        return self.errors + [repr(p) for p in self.pages if not p.ok]

    def served_by(self) -> Counter[str | None]:
        return Counter(p.reviews_pod for p in self.pages)


# -- the mesh --------------------------------------------------------------------------------


def _pgid_of(pid: int) -> int | None:
    """The process group of a live (non-zombie) process; None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return int(fields[2])


def leftovers(pids: set[int], groups: set[int]) -> list[str]:
    """Live processes among ``pids``, or in one of the process ``groups``, as 'pid: cmdline'."""
    found: set[int] = {pid for pid in pids if _pgid_of(pid) is not None}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _pgid_of(int(entry.name)) in groups:
            found.add(int(entry.name))
    out = []
    for pid in sorted(found):
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            out.append(f"{pid}: {cmdline.decode(errors='replace').strip()}")
    return out


def container_pid(pod: dict[str, Any], container: str) -> int | None:
    """The PID (and process group) of a running container, from its ``meshlet://PID`` ID."""
    for status in pod["status"].get("containerStatuses") or []:
        if status["name"] == container and status.get("containerID"):
            return int(str(status["containerID"]).removeprefix("meshlet://"))
    return None


def container_status(pod: dict[str, Any], container: str) -> dict[str, Any]:
    for status in pod["status"].get("containerStatuses") or []:
        if status["name"] == container:
            return dict(status)
    raise KeyError(container)


def condition(pod: dict[str, Any], type_: str) -> dict[str, Any]:
    for cond in pod["status"].get("conditions") or []:
        if cond["type"] == type_:
            return dict(cond)
    raise KeyError(type_)


@dataclass
class Mesh:
    """A mesh started by ``meshlet up -d`` for a test module; see the module docstring."""

    cwd: Path
    state_dir: Path
    server: str
    gateway: str
    env: dict[str, str]
    daemon_pid: int = 0
    dashboard: str = ""  # the dashboard's URL ("" when started with --dashboard-port 0)
    pids: set[int] = field(default_factory=set)  # every container process ever seen
    applied: list[Path] = field(default_factory=list)

    def meshlet(
        self, *args: str, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*MESHLET, *args],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"meshlet {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.meshlet(*args, "-o", "json").stdout)

    def pods(self) -> list[dict[str, Any]]:
        """Every pod (``get pods -A``), remembering their processes for ``down``'s check."""
        items: list[dict[str, Any]] = self.json("get", "pods", "-A")["items"]
        for pod in items:
            for status in pod["status"].get("containerStatuses") or []:
                if status.get("containerID"):
                    self.pids.add(int(str(status["containerID"]).removeprefix("meshlet://")))
        return items

    def deployment_pods(self, deployment: str) -> list[dict[str, Any]]:
        return [
            p
            for p in self.pods()
            if (p["metadata"].get("ownerReferences") or [{}])[0].get("name") == deployment
        ]

    def ready_pods(self, deployment: str, count: int) -> list[dict[str, Any]] | None:
        """The deployment's pods when there are exactly ``count``, all ready; else None."""
        pods = self.deployment_pods(deployment)
        if len(pods) == count and all(condition(p, "Ready")["status"] == "True" for p in pods):
            return pods
        return None

    def browser(self) -> Browser:
        return Browser(self.gateway)

    # -- configuration -----------------------------------------------------------------------

    def apply(self, *files: Path) -> None:
        """``meshlet apply -f`` each file in turn (as Istio's tasks do), then wait for the push."""
        for path in files:
            before = self._sent_versions()
            self.meshlet("apply", "-f", str(path))
            self.applied.append(path)
            self.wait_pushed(before)

    def reset(self) -> None:
        """``meshlet delete -f`` what the test applied; files may name the same objects."""
        if not self.applied:
            return
        before = self._sent_versions()
        for path in reversed(self.applied):
            result = self.meshlet("delete", "-f", str(path), check=False)
            # An object a later file also named is gone already: that is fine.
            stray = [
                line
                for line in result.stderr.splitlines()
                if line.strip() and "NotFound" not in line and "not found" not in line
            ]
            assert result.returncode == 0 or not stray, result.stderr
        self.applied.clear()
        left = [vs["metadata"]["name"] for vs in self.json("get", "virtualservices")["items"]]
        assert left == ["bookinfo"], left
        self.wait_pushed(before)

    def _proxy_status(self) -> list[dict[str, Any]]:
        statuses: list[dict[str, Any]] = self.json("proxy-status")
        return statuses

    def _sent_versions(self) -> dict[str, tuple[str, ...]]:
        return {
            s["proxy_id"]: tuple(str(t.get("sent_version")) for _, t in sorted(s["types"].items()))
            for s in self._proxy_status()
        }

    def wait_pushed(self, before: dict[str, tuple[str, ...]], timeout: float = 30.0) -> None:
        """Wait until the control plane has pushed something since ``before`` and every proxy
        has acknowledged what it was sent (twice in a row, a moment apart: the push reaches
        each proxy's stream on its own)."""
        deadline = time.monotonic() + timeout
        changed = False
        synced_in_a_row = 0
        while time.monotonic() < deadline:
            statuses = self._proxy_status()
            versions = {
                s["proxy_id"]: tuple(
                    str(t.get("sent_version")) for _, t in sorted(s["types"].items())
                )
                for s in statuses
            }
            changed = changed or versions != before
            synced = all(
                t["state"] in ("SYNCED", "NOT SENT") for s in statuses for t in s["types"].values()
            )
            synced_in_a_row = synced_in_a_row + 1 if (changed and synced) else 0
            if synced_in_a_row >= 2:
                return
            time.sleep(0.25)
        raise AssertionError(
            "the proxies did not acknowledge the change: "
            + json.dumps(self._proxy_status(), indent=1)[:4000]
        )

    # -- down ------------------------------------------------------------------------------

    def down(self) -> None:
        """``meshlet down``; then nothing the mesh ran may be alive."""
        self.pods()  # the latest processes
        self.meshlet("down", timeout=180)
        groups = set(self.pids)  # each container's PID is its process group's ID
        left = leftovers({*self.pids, self.daemon_pid}, groups)
        assert not left, "meshlet down left processes behind:\n" + "\n".join(left)
        assert not (self.state_dir / "mesh.json").exists()


def start_mesh(cwd: Path, *files: Path, extra: tuple[str, ...] = ()) -> Mesh:
    """``meshlet up -d -f FILE...`` on free ports, as a user would type it (in ``cwd``).

    Every port is the mesh's own -- API, xDS (and the CA's two next to it), gateway, dashboard
    and OTLP receiver -- so meshes of parallel tests never meet; ``extra`` flags come last and
    win (a test that wants its own dashboard port passes ``--dashboard-port``)."""
    api, xds, gateway = free_port(), free_ports_in_a_row(3), free_port()
    dashboard, otlp = free_port(), free_port()
    server = f"http://127.0.0.1:{api}"
    env = {**os.environ, "MESHLET_SERVER": server}
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        env.pop(name, None)
    mesh = Mesh(
        cwd=cwd,
        state_dir=cwd / ".meshlet",
        server=server,
        gateway=f"http://127.0.0.1:{gateway}",
        env=env,
    )
    args = ["up", "-d"]
    for path in files:
        args += ["-f", str(path)]
    args += ["--xds-address", f"127.0.0.1:{xds}", "--gateway-port", str(gateway)]
    args += ["--dashboard-port", str(dashboard), "--otlp-port", str(otlp)]
    args += ["--state-dir", str(mesh.state_dir), *extra]
    try:
        result = mesh.meshlet(*args, timeout=180)
        assert f"ingress gateway: {mesh.gateway}/" in result.stdout, result.stdout
        recorded = json.loads((mesh.state_dir / "mesh.json").read_text())
        mesh.daemon_pid = int(recorded["pid"])
        mesh.dashboard = str(recorded.get("dashboard") or "")
        mesh.pods()
    except BaseException:
        with contextlib.suppress(Exception):
            mesh.meshlet("down", check=False, timeout=180)
        raise
    return mesh


@contextlib.contextmanager
def running_mesh(cwd: Path, *files: Path) -> Iterator[Mesh]:
    mesh = start_mesh(cwd, *files)
    try:
        yield mesh
    finally:
        mesh.down()
