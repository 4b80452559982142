"""The SQLite result store: round trips, its default location and a clear error on a bad file."""
import sqlite3

import pytest

from eigenguard.store import ResultStore, default_store_path


def test_runs_and_evaluations_round_trip(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    store.start_run("abc", {"seed": 1}, {"torch": "x"}, "deadbeef")
    assert store.get_run("abc").status == "running"
    store.update_history("abc", [{"epoch": 1}])
    store.finish_run("abc", [{"epoch": 1}, {"epoch": 2}], {"triggered": {"acc": 0.9}}, 12.5,
                     "ckpt.safetensors")
    store.add_evaluation("abc", dict(protocol="mixed", batch_size=128, acc=0.9, asr=0.5, ra=0.4,
                                     n_clean=10, n_triggered=9), seed=0)
    run = store.get_run("abc")
    assert run.status == "finished" and run.config == {"seed": 1}
    assert run.history == [{"epoch": 1}, {"epoch": 2}] and run.wall_seconds == 12.5
    assert run.git_commit == "deadbeef" and run.versions == {"torch": "x"}
    (evaluation,) = store.evaluations("abc")
    assert (evaluation["protocol"], evaluation["asr"]) == ("mixed", 0.5)
    assert [r.key for r in ResultStore(tmp_path / "r.sqlite").find_runs("ab")] == ["abc"]
    assert store.get_run("nope") is None


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
