"""The result store: one SQLite file, one row per run keyed by its config hash, one per evaluation.

Runs and evaluations live in separate tables so a new evaluation protocol never needs retraining:
each finished run keeps its checkpoint beside the database.
"""
from __future__ import annotations

import json
import os
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import StoreNotFoundError

DEFAULT_STORE = Path.home() / ".local" / "share" / "eigenguard" / "results.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    status TEXT NOT NULL,
    started TEXT NOT NULL,
    finished TEXT,
    wall_seconds REAL,
    history TEXT,
    summary TEXT,
    versions TEXT,
    git_commit TEXT,
    checkpoint TEXT
);
CREATE TABLE IF NOT EXISTS evaluations (
    run_key TEXT NOT NULL REFERENCES runs(key),
    protocol TEXT NOT NULL,
    batch_size INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    acc REAL NOT NULL,
    asr REAL NOT NULL,
    ra REAL NOT NULL,
    n_clean INTEGER NOT NULL,
    n_triggered INTEGER NOT NULL,
    created TEXT NOT NULL,
    PRIMARY KEY (run_key, protocol, batch_size, seed)
);
"""


def default_store_path() -> Path:
    """``$EIGENGUARD_STORE`` if set, else ``~/.local/share/eigenguard/results.sqlite``."""
    return Path(os.environ.get("EIGENGUARD_STORE") or DEFAULT_STORE).expanduser()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class StoredRun:
    key: str
    config: dict
    status: str
    started: str
    finished: str | None
    wall_seconds: float | None
    history: list
    summary: dict
    versions: dict
    git_commit: str | None
    checkpoint: str | None


class ResultStore:
    """Thin wrapper over the SQLite file; every write is its own committed transaction."""

    def __init__(self, path: str | os.PathLike | None = None, create: bool = True):
        self.path = Path(path).expanduser() if path else default_store_path()
        if not create and not self.path.is_file():
            raise StoreNotFoundError(
                f"no result store at {self.path}: `eigenguard run` records runs there first, or "
                "pass the store that holds them with --store PATH (or EIGENGUARD_STORE)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with closing(self._connect()) as db, db:
                db.executescript(SCHEMA)
        except sqlite3.DatabaseError as error:
            raise sqlite3.DatabaseError(
                f"cannot open the result store {self.path}: {error}. The file is not an "
                "EigenGuard store; pass another --store path or move that file away") from None

    @property
    def checkpoint_dir(self) -> Path:
        return self.path.parent / "checkpoints"

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60)
        db.row_factory = sqlite3.Row
        return db

    def start_run(self, key: str, config: dict, versions: dict, git_commit: str | None) -> None:
        with closing(self._connect()) as db, db:
            db.execute("INSERT OR REPLACE INTO runs (key, config, status, started, versions, "
                       "git_commit) VALUES (?, ?, 'running', ?, ?, ?)",
                       (key, json.dumps(config, sort_keys=True), _now(), json.dumps(versions),
                        git_commit))

    def update_history(self, key: str, history: list) -> None:
        with closing(self._connect()) as db, db:
            db.execute("UPDATE runs SET history = ? WHERE key = ?", (json.dumps(history), key))

    def finish_run(self, key: str, history: list, summary: dict, wall_seconds: float,
                   checkpoint: str | None) -> None:
        with closing(self._connect()) as db, db:
            db.execute("UPDATE runs SET status = 'finished', finished = ?, wall_seconds = ?, "
                       "history = ?, summary = ?, checkpoint = ? WHERE key = ?",
                       (_now(), wall_seconds, json.dumps(history), json.dumps(summary),
                        checkpoint, key))

    def fail_run(self, key: str, reason: str) -> None:
        with closing(self._connect()) as db, db:
            db.execute("UPDATE runs SET status = 'failed', summary = ? WHERE key = ?",
                       (json.dumps({"error": reason}), key))

    def add_evaluation(self, key: str, evaluation: dict, seed: int) -> None:
        with closing(self._connect()) as db, db:
            db.execute("INSERT OR REPLACE INTO evaluations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (key, evaluation["protocol"], evaluation["batch_size"], seed,
                        evaluation["acc"], evaluation["asr"], evaluation["ra"],
                        evaluation["n_clean"], evaluation["n_triggered"], _now()))

    def get_run(self, key: str) -> StoredRun | None:
        with closing(self._connect()) as db:
            row = db.execute("SELECT * FROM runs WHERE key = ?", (key,)).fetchone()
        return self._to_run(row) if row else None

    def find_runs(self, prefix: str = "") -> list[StoredRun]:
        with closing(self._connect()) as db:
            rows = db.execute("SELECT * FROM runs WHERE key LIKE ? ORDER BY started, rowid",
                              (prefix + "%",)).fetchall()
        return [self._to_run(row) for row in rows]

    def evaluations(self, key: str | None = None) -> list[dict]:
        query = "SELECT * FROM evaluations"
        args: tuple = ()
        if key is not None:
            query, args = query + " WHERE run_key = ?", (key,)
        with closing(self._connect()) as db:
            rows = db.execute(query + " ORDER BY run_key, protocol", args).fetchall()
        return [dict(row) for row in rows]

    @staticmethod
    def _to_run(row: sqlite3.Row) -> StoredRun:
        def load(text, empty):
            return json.loads(text) if text else empty

        return StoredRun(row["key"], json.loads(row["config"]), row["status"], row["started"],
                         row["finished"], row["wall_seconds"], load(row["history"], []),
                         load(row["summary"], {}), load(row["versions"], {}), row["git_commit"],
                         row["checkpoint"])
