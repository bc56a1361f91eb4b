"""The configuration store: Kubernetes-style objects in SQLite, applied atomically, watched.

Theory of operation
-------------------

The store keeps whole objects (``apiVersion``, ``kind``, ``metadata``, ``spec``, ...) as JSON,
keyed by ``ObjectKey(group, kind, namespace, name)``; the version in ``apiVersion`` is not
part of the key, so ``v1beta1`` and ``v1`` of one VirtualService are one object, as in
Kubernetes. The store is schema-agnostic: ``meshlet.api`` validates objects (and fills in
``metadata.namespace`` for namespaced kinds) before they arrive here as plain dicts. The store
checks only what it needs for the key.

Rules it keeps, as the Kubernetes API server does:

* ``apply`` and ``delete`` take a batch and run it in one SQLite transaction: any failure
  changes nothing and announces nothing. Within a batch, objects are applied in order, so a
  key given twice ends as its last version.
* Every write (create, change or delete) takes the next store-wide revision; the object carries
  it as ``metadata.resourceVersion`` (a string). ``revision`` is the newest one; it never goes
  back, not even across restarts or after the newest object is deleted.
* The store owns ``metadata.uid`` (a uuid4 on create), ``metadata.creationTimestamp`` (RFC 3339,
  UTC, on create) and ``metadata.generation`` (1 on create, +1 whenever anything other than
  ``apiVersion``, ``kind``, ``metadata`` and ``status`` changes). Values given for them are
  ignored, except as preconditions: a given ``resourceVersion`` (or ``uid``) that differs from
  the stored one is a conflict (``ConflictError``, Kubernetes's 409), and so is a given
  ``resourceVersion`` for an object that does not exist.
* Applying an object that equals the stored one (server-owned fields aside) is ``unchanged``:
  no new revision, no event. Otherwise the given object replaces the stored one whole.
* After a batch commits, each watcher is called once with the batch's events, in commit order.
  A watcher that raises is logged and skipped; the store and the other watchers carry on.
* The last ``history`` revisions are also kept as a change log, so that ``history(since)`` and
  ``events(since)`` can resume a watch, also after a restart (older ones: ``ExpiredError``,
  Kubernetes's 410 Gone).

Threads: every method may be called from any thread. One SQLite connection is shared behind a
lock, so one write or read runs at a time; writes are short local transactions and reads are
primary-key lookups, and JSON is parsed outside the lock. The methods block; an event loop may
call them directly for small batches, or through ``asyncio.to_thread`` for large ones. Watchers
run on a writing thread, outside the lock, so they may read and write the store; when another
thread is already delivering, it delivers the new batch too (this keeps the commit order), so a
write may return before its watchers have run.

Files: ``<state dir>/store.db`` (WAL mode, so also ``store.db-wal`` and ``store.db-shm``) with
owner-only permissions, and ``store.db.lock``, held with ``flock`` while the store is open so
that a second control plane on the same state directory stops with a clear error.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeAlias

from meshlet.errors import ConfigError, MeshletError, Problem, ProblemList

log = logging.getLogger(__name__)

JsonObject: TypeAlias = dict[str, Any]
EventType: TypeAlias = Literal["ADDED", "MODIFIED", "DELETED"]
ApplyAction: TypeAlias = Literal["created", "configured", "unchanged"]
DeleteAction: TypeAlias = Literal["deleted", "not found"]
Watcher: TypeAlias = Callable[[list["Event"]], None]
Unsubscribe: TypeAlias = Callable[[], None]

DEFAULT_STATE_DIR = Path(".meshlet")
STORE_FILE = "store.db"
DEFAULT_HISTORY = 10_000

_MEMORY = ":memory:"
_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE objects (
    api_group TEXT NOT NULL,
    kind TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    resource_version INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (api_group, kind, namespace, name)
) WITHOUT ROWID;
CREATE TABLE changes (
    resource_version INTEGER PRIMARY KEY,
    type TEXT NOT NULL,
    api_group TEXT NOT NULL,
    kind TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO meta VALUES ('revision', 0), ('compacted', 0);
"""
# Server-owned metadata: never compared, never taken from the caller.
_SERVER_FIELDS = ("uid", "resourceVersion", "generation", "creationTimestamp")
# Top-level fields whose change does not make a new generation.
_NOT_DESIRED_STATE = frozenset({"apiVersion", "kind", "metadata", "status"})


# -- values -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True, order=True)
class ObjectKey:
    """Which object: API group ("" for the core group), kind, namespace ("" when cluster-scoped)
    and name."""

    group: str
    kind: str
    namespace: str
    name: str

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> ObjectKey:
        """The key of a Kubernetes-style object. Raises ``ConfigError`` naming each missing or
        malformed field (``apiVersion``, ``kind``, ``metadata.name``, ``metadata.namespace``)."""
        problems = ProblemList()
        api_version = obj.get("apiVersion")
        group = ""
        if not isinstance(api_version, str) or not api_version:
            problems.add("apiVersion", "required: a string such as networking.istio.io/v1")
        else:
            parts = api_version.split("/")
            if len(parts) > 2 or not all(parts):
                problems.add("apiVersion", f"{api_version!r} is not GROUP/VERSION or VERSION")
            elif len(parts) == 2:
                group = parts[0]
        kind = obj.get("kind")
        if not isinstance(kind, str) or not kind:
            problems.add("kind", "required: a string such as VirtualService")
        metadata = obj.get("metadata")
        name: object = None
        namespace: object = None
        if not isinstance(metadata, Mapping):
            problems.add("metadata", "required: a mapping with at least a name")
        else:
            name = metadata.get("name")
            namespace = metadata.get("namespace")
            if not isinstance(name, str) or not name:
                problems.add("metadata.name", "required: a non-empty string")
            if namespace is not None and not isinstance(namespace, str):
                problems.add("metadata.namespace", "must be a string")
        problems.raise_if_any()
        assert isinstance(kind, str) and isinstance(name, str)
        return cls(group=group, kind=kind, namespace=str(namespace or ""), name=name)

    @property
    def ref(self) -> str:
        """kubectl's ``TYPE[.GROUP]/NAME``, e.g. ``virtualservice.networking.istio.io/reviews``."""
        kind = self.kind.lower()
        return f"{kind}.{self.group}/{self.name}" if self.group else f"{kind}/{self.name}"

    def __str__(self) -> str:
        return f"{self.ref} in namespace {self.namespace}" if self.namespace else self.ref


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class Event:
    """One committed change. ``object`` is the object as stored after the change; for
    ``DELETED``, its last state with the deletion's ``resourceVersion`` (as Kubernetes sends it).
    Events are shared between watchers: treat ``object`` as read-only."""

    type: EventType
    key: ObjectKey
    object: JsonObject
    resource_version: int

    def __repr__(self) -> str:
        return f"<Event {self.type} {self.key} @{self.resource_version}>"


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class ApplyResult:
    """What ``apply`` did with one object, and the object as now stored."""

    key: ObjectKey
    action: ApplyAction
    object: JsonObject

    def __str__(self) -> str:  # as kubectl apply prints it
        return f"{self.key.ref} {self.action}"

    def __repr__(self) -> str:
        return f"<ApplyResult {self.key} {self.action}>"


@dataclass(frozen=True, slots=True, kw_only=True, repr=False)
class DeleteResult:
    """What ``delete`` did with one key; ``object`` is the deleted object's last state."""

    key: ObjectKey
    action: DeleteAction
    object: JsonObject | None

    def __str__(self) -> str:
        return f"{self.key.ref} {self.action}"

    def __repr__(self) -> str:
        return f"<DeleteResult {self.key} {self.action}>"


# -- errors (candidates for meshlet.errors) ---------------------------------------------------


class ConflictError(ConfigError):
    """A batch whose preconditions (``metadata.resourceVersion``, ``metadata.uid``) do not hold
    for the stored objects. Nothing of the batch was applied. One problem per object, its path
    naming the object (HTTP 409 at the API edge)."""


class NotFoundError(MeshletError):
    """``delete(..., missing_ok=False)`` named objects that do not exist. Nothing was
    deleted."""

    def __init__(self, keys: Sequence[ObjectKey]) -> None:
        self.keys = tuple(keys)
        super().__init__("not found: " + ", ".join(str(k) for k in self.keys))


class ExpiredError(MeshletError):
    """A watch asked for changes after a revision whose successors are no longer kept
    (Kubernetes's 410 Gone): list again and watch from the list's revision."""

    def __init__(self, since: int, compacted: int) -> None:
        self.since = since
        self.compacted = compacted
        super().__init__(
            f"changes after revision {since} are no longer kept (only those after revision"
            f" {compacted}); list the objects again and watch from the store's revision"
        )


# -- the store --------------------------------------------------------------------------------


class _Batch:
    """The writes of one transaction: revisions handed out, events and change-log rows."""

    __slots__ = ("compacted", "events", "revision", "rows")

    def __init__(self, revision: int, compacted: int) -> None:
        self.revision = revision
        self.compacted = compacted  # the change log holds only revisions after this one
        self.events: builtins.list[Event] = []
        self.rows: builtins.list[tuple[int, str, str, str, str, str, str]] = []

    def record(self, type_: EventType, key: ObjectKey, obj: JsonObject, body: str) -> None:
        self.events.append(Event(type=type_, key=key, object=obj, resource_version=self.revision))
        self.rows.append((self.revision, type_, key.group, key.kind, key.namespace, key.name, body))


class Store:
    """The control plane's configuration store. ``Store(path)`` opens (creating if needed) the
    SQLite file at ``path``; ``Store.in_state_dir()`` opens ``.meshlet/store.db``;
    ``Store.memory()`` keeps everything in memory, for tests. Raises ``MeshletError`` when the
    file cannot be used (not a meshlet store, damaged, in use by another process)."""

    def __init__(self, path: Path | str, *, history: int = DEFAULT_HISTORY) -> None:
        if history < 1:
            raise ValueError("history must keep at least one revision")
        self.path = Path(path)
        self._history = history
        self._lock = threading.Lock()  # guards the connection, _revision and _compacted
        self._lock_fd: int | None = None
        if str(path) == _MEMORY:
            self._conn = sqlite3.connect(_MEMORY, isolation_level=None, check_same_thread=False)
        else:
            self._conn = self._open_file(self.path)
        try:
            self._revision, self._compacted = self._init_schema()
        except BaseException:
            self.close()
            raise
        # Delivery: batches queue in commit order; one thread at a time drains the queue.
        self._watch_lock = threading.Lock()
        self._watchers: tuple[tuple[object, Watcher], ...] = ()
        self._pending: deque[builtins.list[Event]] = deque()
        self._delivering = False

    @classmethod
    def memory(cls, *, history: int = DEFAULT_HISTORY) -> Store:
        return cls(_MEMORY, history=history)

    @classmethod
    def in_state_dir(
        cls, state_dir: Path | str = DEFAULT_STATE_DIR, *, history: int = DEFAULT_HISTORY
    ) -> Store:
        return cls(Path(state_dir) / STORE_FILE, history=history)

    def close(self) -> None:
        self._conn.close()
        self._release_lock()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Store {self.path} [revision {self._revision}, {len(self._watchers)} watchers]>"

    @property
    def revision(self) -> int:
        """The newest resourceVersion handed out (0 for a new store)."""
        return self._revision

    # -- writes ---------------------------------------------------------------------------------

    def apply(self, objects: Sequence[Mapping[str, Any]]) -> builtins.list[ApplyResult]:
        """Create or replace ``objects`` in one transaction, in order. Raises ``ConfigError``
        (an object without apiVersion, kind or name, or not JSON) or ``ConflictError`` (a
        failed precondition), listing every such object; either way nothing was applied."""
        prepared = _prepare(objects)
        results: builtins.list[ApplyResult] = []
        conflicts: builtins.list[Problem] = []
        with self._write() as batch:
            for key, obj in prepared:
                old = self._read(key)
                conflict = _precondition_failure(obj, old)
                if conflict:
                    conflicts.append(Problem(path=str(key), message=conflict))
                    continue
                if old is not None and _canonical(_without_server_fields(obj)) == _canonical(
                    _without_server_fields(old)
                ):
                    results.append(ApplyResult(key=key, action="unchanged", object=old))
                    continue
                batch.revision += 1
                stored = _stamp(obj, old, batch.revision)
                body = json.dumps(stored, ensure_ascii=False, separators=(",", ":"))
                self._conn.execute(
                    "INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?, ?)",
                    (key.group, key.kind, key.namespace, key.name, batch.revision, body),
                )
                batch.record("ADDED" if old is None else "MODIFIED", key, stored, body)
                action: ApplyAction = "created" if old is None else "configured"
                # The caller's copy is its own: events hold ``stored``, and run later.
                results.append(ApplyResult(key=key, action=action, object=_loads(body)))
            if conflicts:
                raise ConflictError(conflicts)
        return results

    def delete(
        self, keys: Sequence[ObjectKey], *, missing_ok: bool = True
    ) -> builtins.list[DeleteResult]:
        """Delete ``keys`` in one transaction. A missing object is reported as ``not found``;
        with ``missing_ok=False`` it raises ``NotFoundError`` and nothing is deleted."""
        results: builtins.list[DeleteResult] = []
        missing: builtins.list[ObjectKey] = []
        with self._write() as batch:
            for key in keys:
                old = self._read(key)
                if old is None:
                    missing.append(key)
                    results.append(DeleteResult(key=key, action="not found", object=None))
                    continue
                batch.revision += 1
                old["metadata"]["resourceVersion"] = str(batch.revision)
                self._conn.execute(
                    "DELETE FROM objects"
                    " WHERE api_group = ? AND kind = ? AND namespace = ? AND name = ?",
                    (key.group, key.kind, key.namespace, key.name),
                )
                body = json.dumps(old, ensure_ascii=False, separators=(",", ":"))
                batch.record("DELETED", key, old, body)
                results.append(DeleteResult(key=key, action="deleted", object=_loads(body)))
            if missing and not missing_ok:
                raise NotFoundError(missing)
        return results

    # -- reads ----------------------------------------------------------------------------------

    def get(self, key: ObjectKey) -> JsonObject | None:
        """The stored object (a fresh copy), or None."""
        with self._lock:
            row = self._conn.execute(
                "SELECT body FROM objects"
                " WHERE api_group = ? AND kind = ? AND namespace = ? AND name = ?",
                (key.group, key.kind, key.namespace, key.name),
            ).fetchone()
        return None if row is None else _loads(row[0])

    def list(
        self, group: str | None = None, kind: str | None = None, namespace: str | None = None
    ) -> builtins.list[JsonObject]:
        """The stored objects matching every filter given, sorted by (namespace, name) and
        then by (group, kind)."""
        where, params = [], []
        for column, value in (("api_group", group), ("kind", kind), ("namespace", namespace)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        sql = "SELECT body FROM objects"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY namespace, name, api_group, kind"
        with self._lock:
            rows = self._conn.execute(sql, params).fetchall()
        return [_loads(body) for (body,) in rows]

    def history(self, since: int) -> builtins.list[Event]:
        """The events after revision ``since``, oldest first. Raises ``ExpiredError`` when some
        of them are no longer kept."""
        with self._lock:
            if since < self._compacted:
                raise ExpiredError(since, self._compacted)
            rows = self._conn.execute(
                "SELECT resource_version, type, api_group, kind, namespace, name, body"
                " FROM changes WHERE resource_version > ? ORDER BY resource_version",
                (since,),
            ).fetchall()
        return [
            Event(
                type=type_,
                key=ObjectKey(group=group, kind=kind, namespace=namespace, name=name),
                object=_loads(body),
                resource_version=rv,
            )
            for rv, type_, group, kind, namespace, name, body in rows
        ]

    # -- watching -------------------------------------------------------------------------------

    def watch(self, callback: Watcher) -> Unsubscribe:
        """Call ``callback(events)`` after every committed batch that changed something, with
        that batch's events, in commit order. Returns a function that ends the watch."""
        token = object()
        with self._watch_lock:
            self._watchers = (*self._watchers, (token, callback))

        def unsubscribe() -> None:
            with self._watch_lock:
                self._watchers = tuple(w for w in self._watchers if w[0] is not token)

        return unsubscribe

    async def events(self, since: int) -> AsyncIterator[builtins.list[Event]]:
        """Batches of events after revision ``since``: first those already committed (as one
        batch), then each new batch as it commits. Raises ``ExpiredError`` as ``history``.
        Close it when done (``contextlib.aclosing``), which ends its watch."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[builtins.list[Event]] = asyncio.Queue()

        def deliver(events: builtins.list[Event]) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, events)
            except RuntimeError:  # the loop is closed: nobody will read this any more
                unsubscribe()

        unsubscribe = self.watch(deliver)  # before reading history, so that no batch is missed
        try:
            last = since
            backlog = self.history(since)
            if backlog:
                last = backlog[-1].resource_version
                yield backlog
            while True:
                batch = [e for e in await queue.get() if e.resource_version > last]
                if batch:
                    last = batch[-1].resource_version
                    yield batch
        finally:
            unsubscribe()

    # -- internals ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _write(self) -> Iterator[_Batch]:
        """One write transaction; on success its events are queued for the watchers."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            batch = _Batch(self._revision, self._compacted)
            try:
                yield batch
                if batch.events:
                    self._conn.executemany(
                        "INSERT INTO changes VALUES (?, ?, ?, ?, ?, ?, ?)", batch.rows
                    )
                    batch.compacted = max(self._compacted, batch.revision - self._history)
                    self._conn.execute(
                        "DELETE FROM changes WHERE resource_version <= ?", (batch.compacted,)
                    )
                    self._conn.executemany(
                        "UPDATE meta SET value = ? WHERE key = ?",
                        [(batch.revision, "revision"), (batch.compacted, "compacted")],
                    )
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            self._revision, self._compacted = batch.revision, batch.compacted
            if batch.events:
                with self._watch_lock:  # appended under the write lock: commit order
                    self._pending.append(batch.events)
        self._deliver()

    def _deliver(self) -> None:
        """Hand queued batches to the watchers, unless another call is already doing so (on
        another thread, or further up this one's stack: a watcher that writes)."""
        with self._watch_lock:
            if self._delivering:
                return
            self._delivering = True
        try:
            while True:
                with self._watch_lock:
                    if not self._pending:
                        self._delivering = False
                        return
                    events = self._pending.popleft()
                    watchers = self._watchers
                for _, callback in watchers:
                    try:
                        callback(builtins.list(events))
                    except Exception:
                        log.exception(
                            "store watcher %r failed on the batch ending at revision %d;"
                            " the store and other watchers carry on",
                            callback,
                            events[-1].resource_version,
                        )
        except BaseException:
            with self._watch_lock:
                self._delivering = False
            raise

    def _read(self, key: ObjectKey) -> JsonObject | None:
        # Called inside _write, with the lock held.
        row = self._conn.execute(
            "SELECT body FROM objects"
            " WHERE api_group = ? AND kind = ? AND namespace = ? AND name = ?",
            (key.group, key.kind, key.namespace, key.name),
        ).fetchone()
        return None if row is None else _loads(row[0])

    def _open_file(self, path: Path) -> sqlite3.Connection:
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock_fd = _lock_exclusively(path.with_name(path.name + ".lock"), path)
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            for file in (
                path,
                path.with_name(path.name + "-wal"),
                path.with_name(path.name + "-shm"),
            ):
                if file.exists():
                    file.chmod(0o600)  # owner-only, also for a file made by older versions
            return sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except OSError as exc:
            self._release_lock()
            raise MeshletError(
                f"cannot open the store {path}: {exc.strerror or exc}; check that the state"
                " directory is writable, or choose another with --state-dir"
            ) from exc

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # which releases the flock
            self._lock_fd = None

    def _init_schema(self) -> tuple[int, int]:
        """Prepare a new file, check an existing one; return its revision and the revision up
        to which its change log is compacted."""
        conn = self._conn
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")  # an acknowledged apply survives power loss
            conn.execute("PRAGMA busy_timeout = 5000")
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version > _SCHEMA_VERSION:
                raise MeshletError(
                    f"{self.path} was written by a newer meshlet (store schema {version}, this"
                    f" meshlet reads {_SCHEMA_VERSION}); upgrade meshlet, or choose another"
                    " --state-dir"
                )
            if version == 0:
                if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                    raise MeshletError(
                        f"{self.path} is an SQLite database but not a meshlet store; choose"
                        " another --state-dir, or move the file aside"
                    )
                conn.executescript(
                    f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version = {_SCHEMA_VERSION}; COMMIT;"
                )
            (check,) = conn.execute("PRAGMA quick_check").fetchone()
            if check != "ok":
                raise sqlite3.DatabaseError(check)
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as exc:
            raise MeshletError(
                f"{self.path} is not a usable meshlet store ({exc}). If it is damaged, move it"
                " (and its -wal and -shm files) aside and apply the configuration again, or"
                " restore a backup; or choose another --state-dir"
            ) from exc
        return int(meta["revision"]), int(meta["compacted"])


# -- pure helpers -----------------------------------------------------------------------------


def _lock_exclusively(lock_path: Path, store_path: Path) -> int:
    """Hold ``flock`` on ``lock_path`` (holding our pid) for as long as the store is open."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip()
        os.close(fd)
        who = f" (pid {holder})" if holder.isdigit() else ""
        raise MeshletError(
            f"the store {store_path} is in use by another meshlet process{who}; stop it, or"
            " give this one another --state-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def _prepare(objects: Sequence[Mapping[str, Any]]) -> list[tuple[ObjectKey, JsonObject]]:
    """Keys and plain-JSON copies of ``objects`` (the callers' dicts are never changed)."""
    problems: list[Problem] = []
    prepared: list[tuple[ObjectKey, JsonObject]] = []
    for i, obj in enumerate(objects):
        if not isinstance(obj, Mapping):
            problems.append(Problem(path=f"[{i}]", message="must be a mapping (an object)"))
            continue
        try:
            key = ObjectKey.of(obj)
            copy = json.loads(json.dumps(dict(obj), allow_nan=False))
        except ConfigError as exc:
            problems.extend(
                Problem(path=f"[{i}].{p.path}", message=p.message) for p in exc.problems
            )
            continue
        except (TypeError, ValueError) as exc:
            problems.append(Problem(path=f"[{i}]", message=f"is not plain JSON data: {exc}"))
            continue
        prepared.append((key, copy))
    if problems:
        raise ConfigError(problems)
    return prepared


def _precondition_failure(obj: JsonObject, old: JsonObject | None) -> str | None:
    metadata = obj["metadata"]
    given_rv = metadata.get("resourceVersion")
    if old is None:
        if given_rv not in (None, ""):
            return (
                f"metadata.resourceVersion is {given_rv!r} but the object does not exist;"
                " remove metadata.resourceVersion to create it"
            )
        return None
    stored = old["metadata"]
    if given_rv not in (None, "") and str(given_rv) != stored["resourceVersion"]:
        return (
            f"the object has been modified (metadata.resourceVersion {given_rv!r} given,"
            f" {stored['resourceVersion']!r} stored); get it again and reapply your changes"
        )
    given_uid = metadata.get("uid")
    if given_uid not in (None, "") and given_uid != stored["uid"]:
        return (
            f"metadata.uid {given_uid!r} given, but the stored object is {stored['uid']!r}"
            " (it was deleted and created again); get it again and reapply your changes"
        )
    return None


def _stamp(obj: JsonObject, old: JsonObject | None, revision: int) -> JsonObject:
    """``obj`` with the server-owned metadata of its new revision."""
    metadata = {k: v for k, v in obj["metadata"].items() if k not in _SERVER_FIELDS}
    if old is None:
        metadata["uid"] = str(uuid.uuid4())
        metadata["creationTimestamp"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        generation = 1
    else:
        metadata["uid"] = old["metadata"]["uid"]
        metadata["creationTimestamp"] = old["metadata"]["creationTimestamp"]
        generation = old["metadata"]["generation"]
        if _canonical(_desired_state(obj)) != _canonical(_desired_state(old)):
            generation += 1
    metadata["generation"] = generation
    metadata["resourceVersion"] = str(revision)
    return {**obj, "metadata": metadata}


def _without_server_fields(obj: JsonObject) -> JsonObject:
    metadata = {k: v for k, v in obj["metadata"].items() if k not in _SERVER_FIELDS}
    return {**obj, "metadata": metadata}


def _desired_state(obj: JsonObject) -> JsonObject:
    return {k: v for k, v in obj.items() if k not in _NOT_DESIRED_STATE}


def _canonical(value: Any) -> str:
    # Sorted keys make key order irrelevant; JSON text keeps true/1 and 1/1.0 apart, which
    # Python's == does not.
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _loads(body: str) -> JsonObject:
    obj: JsonObject = json.loads(body)
    return obj
