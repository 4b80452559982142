"""The SQLite result store: round trips, claims, stale runs, migration and clear errors."""
import json
import os
import sqlite3
import subprocess
import sys

import pytest
import torch

from eigenguard.store import ClaimLostError, ResultStore, default_store_path


def metric(protocol, name, value, split="test", seed=0):
    return dict(split=split, protocol=protocol, metric=name, value=value, eval_seed=seed)


def claimed(store, key="abc", setup="s1", config=None):
    claim = store.claim(key, setup, config or {"seed": 1}, {"torch": "x"}, "deadbeef", "cpu")
    assert claim.state == "claimed"
    return claim.token


def test_runs_and_metrics_round_trip(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    token = claimed(store)
    assert store.get_run("abc").status == "running"
    store.update_history("abc", token, [{"epoch": 1}])
    assert store.get_run("abc").history == [{"epoch": 1}]
    path = store.write_tensors("abc.safetensors", {"w": torch.arange(3.0)})
    assert path == "checkpoints/abc.safetensors"  # relative to the store's folder
    store.complete("abc", token, status="finished", history=[{"epoch": 1}, {"epoch": 2}],
                   metrics=[metric("mixed", "asr", 0.5), metric("mixed", "acc", 0.9),
                            metric("mixed", "asr", 0.25, split="validation")],
                   wall_seconds=12.5, checkpoint=path, attack_state=None,
                   extra={"flipped_labels": 7})
    run = store.get_run("abc")
    assert run.status == "finished" and run.config == {"seed": 1} and run.setup_key == "s1"
    assert run.history == [{"epoch": 1}, {"epoch": 2}] and run.wall_seconds == 12.5
    assert run.git_commit == "deadbeef" and run.versions == {"torch": "x"}
    assert run.device == "cpu" and run.extra == {"flipped_labels": 7}
    (evaluation,) = store.evaluations("abc")
    assert (evaluation["protocol"], evaluation["asr"], evaluation["acc"]) == ("mixed", 0.5, 0.9)
    assert store.evaluations("abc", split="validation")[0]["asr"] == 0.25
    assert len(store.metrics("abc")) == 3
    assert torch.equal(store.read_tensors(run.checkpoint, "checkpoint", "abc")["w"],
                       torch.arange(3.0))
    assert [r.key for r in ResultStore(tmp_path / "r.sqlite").find_runs("ab")] == ["abc"]
    assert store.get_run("nope") is None


def test_key_prefixes_are_literal_not_sql_wildcards(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    for key in ("abc1", "xbc2"):
        claimed(store, key)
    assert [r.key for r in store.find_runs("%")] == []
    assert [r.key for r in store.find_runs("_bc")] == []
    assert [r.key for r in store.find_runs("ab")] == ["abc1"]
    assert len(store.find_runs("")) == 2


def test_a_finished_run_is_not_claimed_again_and_force_removes_everything(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    token = claimed(store)
    path = store.write_tensors("abc.safetensors", {"w": torch.ones(2)})
    store.complete("abc", token, status="finished", history=[], wall_seconds=1.0,
                   metrics=[metric("triggered", "asr", 1.0)], checkpoint=path, attack_state=None)
    store.record_evaluation("abc", [metric("mixed", "asr", 0.3, seed=5)])  # --eval-seed 5
    assert store.claim("abc", "s1", {}, {}, None, "cpu").state == "finished"
    forced = store.claim("abc", "s1", {}, {}, None, "cpu", force=True)
    assert forced.state == "claimed"
    assert store.metrics("abc") == []  # no stale evaluation survives, whatever its seed
    assert not (tmp_path / path).exists()
    assert store.get_run("abc").status == "running"


def finished(store, key="abc", value=0.5):
    token = claimed(store, key)
    path = store.write_tensors(f"{key}.safetensors", {"w": torch.ones(2)})
    store.complete(key, token, status="finished", history=[{"epoch": 1}], wall_seconds=1.0,
                   metrics=[metric("triggered", "asr", value)], checkpoint=path,
                   attack_state=None, extra={"threads": 2})
    return path


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_a_run_trained_again_keeps_its_record_until_the_new_one_is_complete(tmp_path):
    """Training a finished run again for its weights (an imported run has none) must not lose
    its recorded metrics if the training is interrupted or killed."""
    store = ResultStore(tmp_path / "r.sqlite")
    path = finished(store)
    retrain = store.claim("abc", "s1", {}, {}, None, "cpu", retrain=True)
    assert retrain.state == "claimed"
    assert not (tmp_path / path).exists()  # the files it replaces go at once
    run = store.get_run("abc")
    assert run.status == "finished" and run.history == [{"epoch": 1}]
    assert [m["value"] for m in store.metrics("abc")] == [0.5]
    store.update_history("abc", retrain.token, [{"epoch": 1, "loss": 9.0}])  # no partial history
    assert store.get_run("abc").history == [{"epoch": 1}]
    # the record is what any reader gets meanwhile; a second retraining waits
    assert store.claim("abc", "s1", {}, {}, None, "cpu").state == "finished"
    assert store.claim("abc", "s1", {}, {}, None, "cpu", retrain=True).state == "busy"
    # a retraining that fails leaves the record as it was
    store.fail("abc", retrain.token, "RuntimeError: interrupted")
    run = store.get_run("abc")
    assert (run.status, run.error, run.history) == ("finished", None, [{"epoch": 1}])
    assert [m["value"] for m in store.metrics("abc")] == [0.5]
    # one killed outright (its process gone) is taken over, and the new record replaces it
    again = store.claim("abc", "s1", {}, {}, None, "cpu", retrain=True)
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE runs SET pid = ? WHERE key = 'abc'", (dead_pid(),))
    assert store.get_run("abc").status == "finished" and len(store.metrics("abc")) == 1
    third = store.claim("abc", "s1", {}, {}, None, "cpu", retrain=True)
    assert third.state == "claimed" and third.token != again.token
    new = store.write_tensors("abc.safetensors", {"w": torch.zeros(2)})
    store.complete("abc", third.token, status="finished", history=[{"epoch": 1}, {"epoch": 2}],
                   wall_seconds=2.0, metrics=[metric("triggered", "asr", 0.5),
                                              metric("triggered", "acc", 0.9)],
                   checkpoint=new, attack_state=None)
    run = store.get_run("abc")
    assert run.status == "finished" and len(run.history) == 2 and run.pid is None
    assert len(store.metrics("abc")) == 2 and (tmp_path / new).exists()


def test_a_live_claim_is_busy_and_a_dead_one_is_taken_over(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    claimed(store)  # this process: alive
    busy = store.claim("abc", "s1", {}, {}, None, "cpu")
    assert busy.state == "busy" and busy.run.pid == os.getpid()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    with sqlite3.connect(store.path) as db:  # the owner's process has exited
        db.execute("UPDATE runs SET pid = ? WHERE key = 'abc'", (int(dead.stdout),))
    assert store.claim("abc", "s1", {}, {}, None, "cpu").state == "claimed"


def test_a_live_pid_with_a_stopped_heartbeat_is_stale(tmp_path):
    """A pid reused by another process (after a restart) does not keep a dead run busy."""
    store = ResultStore(tmp_path / "r.sqlite", stale_after=60)
    claimed(store)
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE runs SET heartbeat = heartbeat - 61 WHERE key = 'abc'")
    assert store.claim("abc", "s1", {}, {}, None, "cpu").state == "claimed"


def test_another_hosts_claim_is_stale_after_its_heartbeat_stops(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite", stale_after=60)
    token = claimed(store)
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE runs SET host = 'elsewhere', pid = 1 WHERE key = 'abc'")
    assert store.claim("abc", "s1", {}, {}, None, "cpu").state == "busy"  # fresh heartbeat
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE runs SET heartbeat = heartbeat - 61 WHERE key = 'abc'")
    assert store.claim("abc", "s1", {}, {}, None, "cpu").state == "claimed"
    with pytest.raises(ClaimLostError):  # the old owner cannot record over the new one
        store.complete("abc", token, status="finished", history=[], metrics=[],
                       wall_seconds=0.0, checkpoint=None, attack_state=None)
    with pytest.raises(ClaimLostError):
        store.beat("abc", token)


def test_the_heartbeat_thread_refreshes_the_claim(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    token = claimed(store)
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE runs SET heartbeat = 0 WHERE key = 'abc'")
    with store.heartbeat("abc", token, every=0.05):
        import time
        time.sleep(0.3)
    assert store.get_run("abc").heartbeat > 1e9


def test_complete_refuses_an_unknown_status(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    token = claimed(store)
    with pytest.raises(ValueError, match="completes as one of"):
        store.complete("abc", token, status="running", history=[], metrics=[],
                       wall_seconds=0, checkpoint=None, attack_state=None)


SCHEMA_1 = """
CREATE TABLE runs (key TEXT PRIMARY KEY, config TEXT NOT NULL, status TEXT NOT NULL,
    started TEXT NOT NULL, finished TEXT, wall_seconds REAL, history TEXT, summary TEXT,
    versions TEXT, git_commit TEXT, checkpoint TEXT);
CREATE TABLE evaluations (run_key TEXT NOT NULL REFERENCES runs(key), protocol TEXT NOT NULL,
    batch_size INTEGER NOT NULL, seed INTEGER NOT NULL, acc REAL NOT NULL, asr REAL NOT NULL,
    ra REAL NOT NULL, n_clean INTEGER NOT NULL, n_triggered INTEGER NOT NULL,
    created TEXT NOT NULL, PRIMARY KEY (run_key, protocol, batch_size, seed));
"""


def test_a_schema_1_store_is_migrated_with_a_backup(tmp_path):
    path = tmp_path / "old.sqlite"
    checkpoint = tmp_path / "checkpoints" / "k1.safetensors"
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA_1)
        db.execute("INSERT INTO runs VALUES ('k1', ?, 'finished', 't0', 't1', 3.5, '[]', ?, "
                   "'{}', 'abc', ?)", (json.dumps({"seed": 0}), json.dumps({}), str(checkpoint)))
        db.execute("INSERT INTO runs VALUES ('k2', '{}', 'failed', 't0', NULL, NULL, NULL, ?, "
                   "'{}', NULL, NULL)", (json.dumps({"error": "boom"}),))
        db.execute("INSERT INTO evaluations VALUES ('k1', 'mixed', 128, 0, 0.9, 0.4, 0.5, 100, "
                   "90, 't1')")
    store = ResultStore(path)
    assert (tmp_path / "old.sqlite.schema1.bak").is_file()
    (evaluation,) = store.evaluations("k1")
    assert evaluation == dict(run_key="k1", protocol="mixed", seed=0, acc=0.9, asr=0.4, ra=0.5,
                              batch_size=128, n_clean=100, n_triggered=90)
    assert store.get_run("k1").checkpoint == "checkpoints/k1.safetensors"
    assert store.get_run("k2").error == "boom"
    assert ResultStore(path).evaluations("k1") == [evaluation]  # opening again changes nothing


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "new.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(Exception, match="newer than this eigenguard"):
        ResultStore(path)


def test_default_path_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EIGENGUARD_STORE", str(tmp_path / "x" / "s.sqlite"))
    assert default_store_path() == tmp_path / "x" / "s.sqlite"
    assert ResultStore().path == tmp_path / "x" / "s.sqlite"
    monkeypatch.delenv("EIGENGUARD_STORE")
    assert default_store_path().name == "results.sqlite"


def test_a_file_that_is_not_a_store_gives_a_clear_error(tmp_path):
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(sqlite3.DatabaseError, match="not an EigenGuard store"):
        ResultStore(bad)
    assert bad.read_bytes().startswith(b"this is not")  # left untouched


def test_a_missing_checkpoint_names_the_fix(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    with pytest.raises(FileNotFoundError, match="--force"):
        store.read_tensors("checkpoints/gone.safetensors", "checkpoint", "abc")
