"""The configuration store: atomic batches, resourceVersion and generation, watchers, files.

Kubernetes references for the rules: the API server's optimistic concurrency
(metadata.resourceVersion as a precondition, 409 Conflict), metadata.generation (bumped on
spec changes only), watch events ADDED / MODIFIED / DELETED, and 410 Gone for a watch that
starts before the kept history.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import re
import sqlite3
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from meshlet.control.store import (
    ConflictError,
    Event,
    ExpiredError,
    NotFoundError,
    ObjectKey,
    Store,
)
from meshlet.errors import ConfigError, MeshletError

NS = "default"


def vs(name: str, namespace: str = NS, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec or {"hosts": [name]},
    }


def key(name: str, namespace: str = NS, kind: str = "VirtualService") -> ObjectKey:
    return ObjectKey(group="networking.istio.io", kind=kind, namespace=namespace, name=name)


class Recorder:
    """A watcher that keeps every batch it was given."""

    def __init__(self) -> None:
        self.batches: list[list[Event]] = []

    def __call__(self, events: list[Event]) -> None:
        self.batches.append(events)

    @property
    def events(self) -> list[Event]:
        return [e for batch in self.batches for e in batch]


@pytest.fixture
def store() -> Iterator[Store]:
    with Store.memory() as s:
        yield s


# -- keys -------------------------------------------------------------------------------------


def test_key_takes_the_group_from_api_version_and_leaves_out_the_version() -> None:
    assert ObjectKey.of(vs("reviews")) == key("reviews")
    beta = vs("reviews") | {"apiVersion": "networking.istio.io/v1beta1"}
    assert ObjectKey.of(beta) == key("reviews")


def test_key_of_core_group_and_cluster_scoped_objects() -> None:
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bookinfo"}}
    assert ObjectKey.of(namespace) == ObjectKey(
        group="", kind="Namespace", namespace="", name="bookinfo"
    )
    assert str(ObjectKey.of(namespace)) == "namespace/bookinfo"
    assert str(key("reviews")) == "virtualservice.networking.istio.io/reviews in namespace default"


def test_apply_refuses_objects_without_a_key_listing_every_problem(store: Store) -> None:
    bad = [vs("ok"), {"kind": "VirtualService", "metadata": {}}, {"apiVersion": "a/b/c"}]
    with pytest.raises(ConfigError) as info:
        store.apply(bad)
    paths = [p.path for p in info.value.problems]
    assert paths == [
        "[1].apiVersion",
        "[1].metadata.name",
        "[2].apiVersion",
        "[2].kind",
        "[2].metadata",
    ]
    assert store.list() == [] and store.revision == 0


def test_apply_refuses_values_that_are_not_json(store: Store) -> None:
    with pytest.raises(ConfigError, match=r"\[0\]: is not plain JSON data"):
        store.apply([vs("reviews", weight=float("nan"))])
    with pytest.raises(ConfigError, match=r"\[0\]: is not plain JSON data"):
        store.apply([vs("reviews", when=object())])
    assert store.revision == 0


# -- resourceVersion, generation, uid ---------------------------------------------------------


def test_create_sets_uid_timestamp_generation_and_resource_version(store: Store) -> None:
    [result] = store.apply([vs("reviews")])
    assert result.action == "created" and str(result) == (
        "virtualservice.networking.istio.io/reviews created"
    )
    meta = result.object["metadata"]
    assert meta["resourceVersion"] == "1" and meta["generation"] == 1
    assert re.fullmatch(r"[0-9a-f-]{36}", meta["uid"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", meta["creationTimestamp"])
    assert store.get(key("reviews")) == result.object
    assert store.revision == 1


def test_resource_version_is_store_wide_and_taken_by_every_write(store: Store) -> None:
    results = store.apply([vs("a"), vs("b")])
    assert [r.object["metadata"]["resourceVersion"] for r in results] == ["1", "2"]
    [c] = store.apply([vs("c")])
    assert c.object["metadata"]["resourceVersion"] == "3"
    [deleted] = store.delete([key("a")])
    assert deleted.object is not None and deleted.object["metadata"]["resourceVersion"] == "4"
    assert store.revision == 4


def test_reapplying_an_identical_object_is_unchanged_without_a_revision(store: Store) -> None:
    store.apply([vs("reviews")])
    recorder = Recorder()
    store.watch(recorder)
    [result] = store.apply([vs("reviews")])
    assert result.action == "unchanged"
    assert result.object["metadata"]["resourceVersion"] == "1"
    assert store.revision == 1 and recorder.batches == []


def test_reapplying_what_get_returned_is_unchanged(store: Store) -> None:
    store.apply([vs("reviews")])
    stored = store.get(key("reviews"))
    assert stored is not None
    assert [r.action for r in store.apply([stored])] == ["unchanged"]


def test_key_order_does_not_make_a_change(store: Store) -> None:
    store.apply([vs("reviews", hosts=["r"], http=[{"route": []}])])
    reordered = vs("reviews", http=[{"route": []}], hosts=["r"])
    assert store.apply([reordered])[0].action == "unchanged"


def test_true_and_one_are_different_values(store: Store) -> None:
    store.apply([vs("reviews", enabled=1)])
    assert store.apply([vs("reviews", enabled=True)])[0].action == "configured"


def test_a_spec_change_is_configured_with_a_new_generation(store: Store) -> None:
    [created] = store.apply([vs("reviews", hosts=["reviews"])])
    [changed] = store.apply([vs("reviews", hosts=["reviews", "reviews.default"])])
    assert changed.action == "configured"
    meta = changed.object["metadata"]
    assert meta["generation"] == 2 and meta["resourceVersion"] == "2"
    created_meta = created.object["metadata"]
    assert meta["uid"] == created_meta["uid"]
    assert meta["creationTimestamp"] == created_meta["creationTimestamp"]


def test_a_metadata_change_is_configured_with_the_same_generation(store: Store) -> None:
    store.apply([vs("reviews")])
    labelled = vs("reviews")
    labelled["metadata"]["labels"] = {"app": "reviews"}
    [result] = store.apply([labelled])
    assert result.action == "configured"
    assert result.object["metadata"]["generation"] == 1
    assert result.object["metadata"]["resourceVersion"] == "2"


def test_status_and_api_version_changes_keep_the_generation(store: Store) -> None:
    store.apply([vs("reviews")])
    [status] = store.apply([vs("reviews") | {"status": {"observedGeneration": 1}}])
    [beta] = store.apply([vs("reviews") | {"apiVersion": "networking.istio.io/v1beta1"}])
    assert status.action == beta.action == "configured"
    assert beta.object["metadata"]["generation"] == 1
    assert beta.object["apiVersion"] == "networking.istio.io/v1beta1"


def test_server_fields_given_by_the_caller_are_ignored(store: Store) -> None:
    forged = vs("reviews")
    forged["metadata"] |= {"uid": "forged", "generation": 7, "creationTimestamp": "1999"}
    meta = store.apply([forged])[0].object["metadata"]
    assert meta["uid"] != "forged" and meta["generation"] == 1
    assert meta["creationTimestamp"] != "1999"


def test_apply_and_get_do_not_share_dicts_with_the_caller(store: Store) -> None:
    recorder = Recorder()
    store.watch(recorder)
    obj = vs("reviews")
    before = copy.deepcopy(obj)
    [result] = store.apply([obj])
    assert obj == before
    result.object["spec"]["hosts"].append("mutated")
    assert recorder.events[0].object["spec"] == before["spec"]
    got = store.get(key("reviews"))
    assert got is not None
    got["spec"]["hosts"].append("mutated")
    assert store.get(key("reviews")) != got


# -- preconditions and atomic batches ---------------------------------------------------------


def test_a_matching_resource_version_applies(store: Store) -> None:
    store.apply([vs("reviews")])
    update = vs("reviews", hosts=["x"])
    update["metadata"]["resourceVersion"] = "1"
    assert store.apply([update])[0].action == "configured"


def test_a_stale_resource_version_is_a_conflict_naming_the_object(store: Store) -> None:
    store.apply([vs("reviews")])
    store.apply([vs("reviews", hosts=["x"])])
    stale = vs("reviews", hosts=["y"])
    stale["metadata"]["resourceVersion"] = "1"
    with pytest.raises(ConflictError) as info:
        store.apply([stale])
    [problem] = info.value.problems
    assert problem.path == "virtualservice.networking.istio.io/reviews in namespace default"
    assert "has been modified" in problem.message and "'2' stored" in problem.message
    assert store.get(key("reviews"))["spec"] == {"hosts": ["x"]}  # type: ignore[index]


def test_a_resource_version_for_a_missing_object_is_a_conflict(store: Store) -> None:
    ghost = vs("reviews")
    ghost["metadata"]["resourceVersion"] = "5"
    with pytest.raises(ConflictError, match="does not exist"):
        store.apply([ghost])


def test_a_uid_of_an_earlier_incarnation_is_a_conflict(store: Store) -> None:
    [first] = store.apply([vs("reviews")])
    store.delete([key("reviews")])
    store.apply([vs("reviews")])
    old = vs("reviews")
    old["metadata"]["uid"] = first.object["metadata"]["uid"]
    with pytest.raises(ConflictError, match="deleted and created again"):
        store.apply([old])


def test_a_conflict_in_the_middle_of_a_batch_changes_nothing(store: Store) -> None:
    store.apply([vs("middle")])
    recorder = Recorder()
    store.watch(recorder)
    stale = vs("middle", hosts=["changed"])
    stale["metadata"]["resourceVersion"] = "99"
    with pytest.raises(ConflictError):
        store.apply([vs("first"), stale, vs("last")])
    assert store.get(key("first")) is None and store.get(key("last")) is None
    assert store.get(key("middle"))["spec"] == {"hosts": ["middle"]}  # type: ignore[index]
    assert store.revision == 1 and store.history(0)[-1].resource_version == 1
    assert recorder.batches == []
    # The next write continues from the last committed revision.
    assert store.apply([vs("first")])[0].object["metadata"]["resourceVersion"] == "2"


def test_a_conflict_error_lists_every_conflicting_object(store: Store) -> None:
    store.apply([vs("a"), vs("b")])
    a, b = vs("a", hosts=["x"]), vs("b", hosts=["x"])
    a["metadata"]["resourceVersion"] = b["metadata"]["resourceVersion"] = "7"
    with pytest.raises(ConflictError) as info:
        store.apply([a, vs("c"), b])
    assert [p.path.split("/")[1].split()[0] for p in info.value.problems] == ["a", "b"]


def test_a_key_given_twice_in_a_batch_ends_as_its_last_version(store: Store) -> None:
    results = store.apply([vs("reviews", hosts=["one"]), vs("reviews", hosts=["two"])])
    assert [r.action for r in results] == ["created", "configured"]
    assert store.get(key("reviews"))["spec"] == {"hosts": ["two"]}  # type: ignore[index]
    assert store.get(key("reviews"))["metadata"]["generation"] == 2  # type: ignore[index]


# -- delete, get, list ------------------------------------------------------------------------


def test_delete_reports_missing_objects_without_failing(store: Store) -> None:
    store.apply([vs("a")])
    results = store.delete([key("a"), key("ghost")])
    assert [(r.key.name, r.action) for r in results] == [("a", "deleted"), ("ghost", "not found")]
    assert store.get(key("a")) is None and store.revision == 2


def test_delete_with_missing_not_ok_deletes_nothing(store: Store) -> None:
    store.apply([vs("a")])
    recorder = Recorder()
    store.watch(recorder)
    with pytest.raises(NotFoundError, match="ghost") as info:
        store.delete([key("a"), key("ghost")], missing_ok=False)
    assert info.value.keys == (key("ghost"),)
    assert store.get(key("a")) is not None and store.revision == 1 and recorder.batches == []


def test_an_object_created_again_after_delete_is_a_new_incarnation(store: Store) -> None:
    [first] = store.apply([vs("a", hosts=["x"])])
    store.apply([vs("a", hosts=["y"])])
    store.delete([key("a")])
    [again] = store.apply([vs("a", hosts=["x"])])
    assert again.action == "created"
    assert again.object["metadata"]["generation"] == 1
    assert again.object["metadata"]["uid"] != first.object["metadata"]["uid"]


def test_list_filters_and_sorts_by_namespace_then_name(store: Store) -> None:
    dr = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "b", "namespace": "x"},
        "spec": {},
    }
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a", "namespace": "x"}}
    store.apply([vs("z", "x"), vs("a", "y"), vs("b", "x"), dr, svc])

    def names(objs: list[dict[str, Any]]) -> list[str]:
        return [f"{o['metadata']['namespace']}/{o['kind']}/{o['metadata']['name']}" for o in objs]

    assert names(store.list()) == [
        "x/Service/a",
        "x/DestinationRule/b",
        "x/VirtualService/b",
        "x/VirtualService/z",
        "y/VirtualService/a",
    ]
    assert names(store.list(kind="VirtualService", namespace="x")) == [
        "x/VirtualService/b",
        "x/VirtualService/z",
    ]
    assert names(store.list(group="")) == ["x/Service/a"]
    assert names(store.list(group="networking.istio.io", namespace="nope")) == []


# -- watchers ---------------------------------------------------------------------------------


def test_watchers_get_each_batch_once_with_its_events_in_order(store: Store) -> None:
    recorder = Recorder()
    store.watch(recorder)
    store.apply([vs("a"), vs("b")])
    store.apply([vs("a", hosts=["x"]), vs("b")])  # b unchanged: no event
    store.delete([key("a"), key("ghost")])
    summary = [[(e.type, e.key.name, e.resource_version) for e in b] for b in recorder.batches]
    assert summary == [
        [("ADDED", "a", 1), ("ADDED", "b", 2)],
        [("MODIFIED", "a", 3)],
        [("DELETED", "a", 4)],
    ]
    deleted = recorder.batches[2][0].object
    assert deleted["spec"] == {"hosts": ["x"]} and deleted["metadata"]["resourceVersion"] == "4"


def test_a_raising_watcher_is_logged_and_others_still_see_every_batch(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(events: list[Event]) -> None:
        raise RuntimeError("watcher bug")

    before, after = Recorder(), Recorder()
    store.watch(before)
    store.watch(broken)
    store.watch(after)
    with caplog.at_level(logging.ERROR, logger="meshlet.control.store"):
        store.apply([vs("a")])
        store.apply([vs("b")])
    assert len(before.batches) == len(after.batches) == 2
    assert "watcher bug" in caplog.text and store.get(key("b")) is not None


def test_each_watcher_gets_its_own_list(store: Store) -> None:
    recorder = Recorder()
    store.watch(lambda events: events.clear())
    store.watch(recorder)
    store.apply([vs("a")])
    assert len(recorder.events) == 1


def test_unsubscribed_watchers_hear_nothing_more(store: Store) -> None:
    recorder = Recorder()
    unsubscribe = store.watch(recorder)
    store.apply([vs("a")])
    unsubscribe()
    unsubscribe()  # idempotent
    store.apply([vs("b")])
    assert len(recorder.batches) == 1


def test_a_watcher_that_writes_does_not_reorder_other_watchers_events(store: Store) -> None:
    def mirror(events: list[Event]) -> None:
        for e in events:
            if e.type == "ADDED" and e.key.name.startswith("orig"):
                store.apply([vs("copy-" + e.key.name)])

    recorder = Recorder()
    store.watch(mirror)
    store.watch(recorder)
    store.apply([vs("orig-1")])
    assert [e.resource_version for e in recorder.events] == [1, 2]
    assert [e.key.name for e in recorder.events] == ["orig-1", "copy-orig-1"]


def test_writes_from_many_threads_reach_watchers_in_commit_order(store: Store) -> None:
    recorder = Recorder()
    store.watch(recorder)

    def writer(n: int) -> None:
        for i in range(25):
            store.apply([vs(f"t{n}-{i}")])

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [e.resource_version for e in recorder.events] == list(range(1, 101))
    assert store.revision == 100 and len(store.list()) == 100


def test_history_replays_events_after_a_revision(store: Store) -> None:
    store.apply([vs("a")])
    store.apply([vs("b")])
    store.delete([key("a")])
    assert [(e.type, e.key.name) for e in store.history(1)] == [("ADDED", "b"), ("DELETED", "a")]
    assert store.history(3) == []


def test_history_keeps_only_the_last_revisions_and_older_is_expired(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    with Store(path, history=2) as store:
        for name in "abcd":
            store.apply([vs(name)])
        assert [e.key.name for e in store.history(2)] == ["c", "d"]
        with pytest.raises(ExpiredError, match="list the objects again"):
            store.history(1)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT count(*) FROM changes").fetchone() == (2,)
    with Store(path) as store:  # a longer history later cannot bring back what was dropped
        with pytest.raises(ExpiredError):
            store.history(0)
        assert len(store.history(2)) == 2


def test_events_yields_the_backlog_then_live_batches(store: Store) -> None:
    store.apply([vs("a")])
    store.apply([vs("b")])

    async def scenario() -> list[list[str]]:
        seen: list[list[str]] = []
        async with contextlib.aclosing(store.events(since=1)) as stream:
            async for batch in stream:
                seen.append([e.key.name for e in batch])
                if len(seen) == 1:
                    # A write from another thread, as the HTTP API would make.
                    await asyncio.to_thread(store.apply, [vs("c"), vs("d")])
                else:
                    break
        return seen

    assert asyncio.run(asyncio.wait_for(scenario(), timeout=10)) == [["b"], ["c", "d"]]
    assert "0 watchers" in repr(store)  # closing the stream ended its watch


# -- files ------------------------------------------------------------------------------------


def test_a_reopened_store_has_every_object_and_continues_the_revision(tmp_path: Path) -> None:
    path = tmp_path / "state" / "store.db"
    with Store(path) as store:
        [a] = store.apply([vs("a"), vs("b")])[:1]
        store.delete([key("b")])  # the newest revision now belongs to no object
    with Store(path) as store:
        assert store.revision == 3
        assert store.get(key("a")) == a.object
        assert store.get(key("b")) is None
        assert [e.type for e in store.history(0)] == ["ADDED", "ADDED", "DELETED"]
        assert store.apply([vs("c")])[0].object["metadata"]["resourceVersion"] == "4"


def test_in_state_dir_creates_the_directory_and_owner_only_files(tmp_path: Path) -> None:
    state = tmp_path / "deep" / ".meshlet"
    with Store.in_state_dir(state) as store:
        store.apply([vs("a")])
        assert store.path == state / "store.db"
        for name in ("store.db", "store.db-wal", "store.db.lock"):
            assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE(state.stat().st_mode) & 0o077 == 0


def test_an_existing_world_readable_store_is_made_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    Store(path).close()
    path.chmod(0o644)
    Store(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_file_that_is_not_sqlite_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    path.write_text("apiVersion: v1\nkind: ConfigMap\n" * 100)
    with pytest.raises(MeshletError, match=f"{re.escape(str(path))} is not a usable") as info:
        Store(path)
    assert "move it" in str(info.value) and "--state-dir" in str(info.value)
    Store(path.with_name("other.db")).close()  # the failed open released its lock


def test_a_foreign_sqlite_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(MeshletError, match="not a meshlet store"):
        Store(path)


def test_a_store_from_a_newer_meshlet_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    Store(path).close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(MeshletError, match="newer meshlet"):
        Store(path)


def test_a_second_store_on_the_same_file_is_refused_while_the_first_is_open(
    tmp_path: Path,
) -> None:
    path = tmp_path / "store.db"
    first = Store(path)
    with pytest.raises(MeshletError, match=r"in use by another meshlet process \(pid \d+\)"):
        Store(path)
    first.close()
    Store(path).close()


def test_an_unwritable_state_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(MeshletError, match="cannot open the store"):
        Store(blocker / "store.db")


# -- the store against a model ----------------------------------------------------------------

NAMES = st.sampled_from(["a", "b", "c"])
SPECS = st.sampled_from([{"hosts": ["x"]}, {"hosts": ["y"]}, {"hosts": ["x"], "gateways": []}])
LABELS = st.sampled_from([None, {"app": "a"}, {"app": "b"}])


def obj(name: str, spec: dict[str, Any], labels: dict[str, str] | None) -> dict[str, Any]:
    o = vs(name, **spec)
    if labels is not None:
        o["metadata"]["labels"] = labels
    return o


class StoreModel(RuleBasedStateMachine):
    """Random applies, deletes and reopens, checked against a dict of what should be stored."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.path = Path(self.dir.name) / "store.db"
        self.store = Store(self.path)
        self.recorder = Recorder()
        self.store.watch(self.recorder)
        # name -> (object as given, generation, uid)
        self.model: dict[str, tuple[dict[str, Any], int, str]] = {}
        self.revision = 0

    def teardown(self) -> None:
        self.store.close()
        self.dir.cleanup()

    @rule(
        batch=st.lists(st.tuples(NAMES, SPECS, LABELS), min_size=1, max_size=4),
        conflict_at=st.none() | st.integers(0, 3),
    )
    def apply(
        self,
        batch: list[tuple[str, dict[str, Any], dict[str, str] | None]],
        conflict_at: int | None,
    ) -> None:
        objects = [obj(*item) for item in batch]
        if conflict_at is not None and conflict_at < len(objects):
            objects[conflict_at]["metadata"]["resourceVersion"] = "999999"  # never reached
            before = (self.store.list(), self.store.revision, len(self.recorder.batches))
            with pytest.raises(ConflictError):
                self.store.apply(objects)
            after = (self.store.list(), self.store.revision, len(self.recorder.batches))
            assert after == before
            return
        results = self.store.apply(objects)
        events_before = len(self.recorder.events)
        for o, result in zip(objects, results, strict=True):
            name = o["metadata"]["name"]
            old = self.model.get(name)
            if old is None:
                expected = "created"
            elif old[0] == o:
                expected = "unchanged"
            else:
                expected = "configured"
            assert result.action == expected
            if expected == "unchanged":
                continue
            self.revision += 1
            meta = result.object["metadata"]
            assert meta["resourceVersion"] == str(self.revision)
            if old is None:
                generation, uid = 1, meta["uid"]
            else:
                generation = old[1] + (old[0]["spec"] != o["spec"])
                uid = old[2]
            assert (meta["generation"], meta["uid"]) == (generation, uid)
            self.model[name] = (o, generation, uid)
        new_events = self.recorder.events[events_before:]
        assert [e.resource_version for e in new_events] == list(
            range(self.revision - len(new_events) + 1, self.revision + 1)
        )

    @rule(names=st.lists(NAMES, min_size=1, max_size=3))
    def delete(self, names: list[str]) -> None:
        results = self.store.delete([key(n) for n in names])
        for n, result in zip(names, results, strict=True):
            if n in self.model:
                assert result.action == "deleted"
                del self.model[n]
                self.revision += 1
            else:
                assert result.action == "not found"

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = Store(self.path)
        self.store.watch(self.recorder)

    @invariant()
    def matches_the_model(self) -> None:
        assert self.store.revision == self.revision
        stored = {o["metadata"]["name"]: o for o in self.store.list()}
        assert sorted(stored) == sorted(self.model)
        for name, (given, generation, uid) in self.model.items():
            meta = stored[name]["metadata"]
            assert {k: v for k, v in stored[name].items() if k != "metadata"} == {
                k: v for k, v in given.items() if k != "metadata"
            }
            assert meta.get("labels") == given["metadata"].get("labels")
            assert (meta["generation"], meta["uid"]) == (generation, uid)

    @invariant()
    def history_replays_to_the_same_state(self) -> None:
        replayed: dict[str, dict[str, Any]] = {}
        for e in self.store.history(0):
            if e.type == "DELETED":
                del replayed[e.key.name]
            else:
                replayed[e.key.name] = e.object
        assert json.dumps(replayed, sort_keys=True) == json.dumps(
            {o["metadata"]["name"]: o for o in self.store.list()}, sort_keys=True
        )


TestStoreModel = StoreModel.TestCase
TestStoreModel.settings = settings(max_examples=60, stateful_step_count=20, deadline=None)
