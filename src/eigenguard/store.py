"""The result store: one SQLite file, a row per run keyed by its config hash, metrics in long format.

Runs and metrics live in separate tables so a new evaluation protocol, a detection rate or a
per-epoch curve never needs retraining nor a schema change: each metric is one row
(run, split, protocol, metric, eval seed, value). Each run's checkpoint and fitted attack state
live beside the database under paths stored *relative* to it, so a store moves with its folder.

Nothing is lost when processes die or race:

- a run is *claimed* in one SQLite transaction before any work (:meth:`ResultStore.claim`), so
  two processes on one key never both train it;
- the owner's host, pid and a heartbeat are recorded; a claim whose process is gone (same host)
  or whose heartbeat is older than ``stale_after`` seconds (another host) is stale and is taken
  over instead of being left "running" forever;
- files are written to a temporary name and renamed, and a run's metrics and its final status
  are written in one transaction: a killed run leaves no half-written row.

Older stores (schema 1: an ``evaluations`` table with one column per metric) are migrated in
place on first open, after a copy of the file is kept beside it.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import tempfile
import threading
import uuid
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import EigenGuardError, StoreNotFoundError

DEFAULT_STORE = Path.home() / ".local" / "share" / "eigenguard" / "results.sqlite"
SCHEMA_VERSION = 2
#: seconds without a heartbeat after which another host's claim counts as abandoned
DEFAULT_STALE_AFTER = 300.0
HEARTBEAT_SECONDS = 30.0

RUN_COLUMNS = {
    "key": "TEXT PRIMARY KEY",
    "setup_key": "TEXT",
    "config": "TEXT NOT NULL",
    "status": "TEXT NOT NULL",
    "started": "TEXT NOT NULL",
    "finished": "TEXT",
    "heartbeat": "REAL",
    "host": "TEXT",
    "pid": "INTEGER",
    "token": "TEXT",
    "wall_seconds": "REAL",
    "history": "TEXT",
    "versions": "TEXT",
    "git_commit": "TEXT",
    "device": "TEXT",
    "checkpoint": "TEXT",
    "attack_state": "TEXT",
    "error": "TEXT",
    "extra": "TEXT",
}

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS runs ({", ".join(f"{n} {t}" for n, t in RUN_COLUMNS.items())});
CREATE TABLE IF NOT EXISTS metrics (
    run_key TEXT NOT NULL REFERENCES runs(key),
    split TEXT NOT NULL,
    protocol TEXT NOT NULL,
    metric TEXT NOT NULL,
    eval_seed INTEGER NOT NULL,
    value REAL NOT NULL,
    created TEXT NOT NULL,
    PRIMARY KEY (run_key, split, protocol, metric, eval_seed)
);
CREATE INDEX IF NOT EXISTS runs_setup ON runs(setup_key);
"""

#: statuses: a run being worked on, done, given up, or trained but not (fully) evaluated
STATUSES = ("running", "finished", "failed", "evaluation-failed")


def default_store_path() -> Path:
    """``$EIGENGUARD_STORE`` if set, else ``~/.local/share/eigenguard/results.sqlite``."""
    return Path(os.environ.get("EIGENGUARD_STORE") or DEFAULT_STORE).expanduser()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _epoch() -> float:
    return datetime.now(timezone.utc).timestamp()


class ClaimLostError(EigenGuardError, RuntimeError):
    """Another process took over a run this process was working on."""


@dataclass(frozen=True)
class StoredRun:
    key: str
    setup_key: str | None
    config: dict
    status: str
    started: str
    finished: str | None
    wall_seconds: float | None
    history: list
    versions: dict
    git_commit: str | None
    device: str | None
    checkpoint: str | None  # relative to the store's folder (absolute in unmigrated rows)
    attack_state: str | None
    error: str | None
    extra: dict
    host: str | None = None
    pid: int | None = None
    heartbeat: float | None = None


@dataclass(frozen=True)
class Claim:
    """The outcome of :meth:`ResultStore.claim`: ``state`` is claimed, finished or busy."""

    state: str
    token: str | None = None
    run: StoredRun | None = None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class ResultStore:
    """Thin wrapper over the SQLite file; every write is its own committed transaction."""

    def __init__(self, path: str | os.PathLike | None = None, create: bool = True,
                 stale_after: float = DEFAULT_STALE_AFTER):
        self.path = Path(path).expanduser().resolve() if path else default_store_path()
        #: what reports name as their source (a temporary store built from JSON Lines names them)
        self.description = str(self.path)
        self.stale_after = stale_after
        if not create and not self.path.is_file():
            raise StoreNotFoundError(
                f"no result store at {self.path}: `eigenguard run` records runs there first, or "
                "pass the store that holds them with --store PATH (or EIGENGUARD_STORE)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._open_schema()
        except sqlite3.DatabaseError as error:
            raise sqlite3.DatabaseError(
                f"cannot open the result store {self.path}: {error}. The file is not an "
                "EigenGuard store; pass another --store path or move that file away") from None

    # -- schema --------------------------------------------------------------------------------

    def _open_schema(self) -> None:
        with closing(self._connect()) as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master "
                                                   "WHERE type = 'table'")}
        if version > SCHEMA_VERSION:
            raise EigenGuardError(
                f"the result store {self.path} has schema {version}, newer than this eigenguard "
                f"({SCHEMA_VERSION}): upgrade eigenguard, or use another --store")
        if "evaluations" in tables and version < SCHEMA_VERSION:
            self._migrate_from_1()
            return
        with closing(self._connect()) as db, db:
            db.executescript(SCHEMA)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _migrate_from_1(self) -> None:
        """Schema 1 -> 2: new run columns, metrics in long format, relative checkpoint paths."""
        backup = self.path.with_name(self.path.name + ".schema1.bak")
        if not backup.exists():
            shutil.copy2(self.path, backup)
        folder = self.path.parent
        with closing(self._connect()) as db, db:
            present = {row[1] for row in db.execute("PRAGMA table_info(runs)")}
            for name, kind in RUN_COLUMNS.items():
                if name not in present:
                    db.execute(f"ALTER TABLE runs ADD COLUMN {name} "
                               f"{kind.replace(' NOT NULL', '').replace(' PRIMARY KEY', '')}")
            db.executescript(SCHEMA)
            for row in db.execute("SELECT * FROM evaluations").fetchall():
                for metric in ("acc", "asr", "ra", "batch_size", "n_clean", "n_triggered"):
                    db.execute("INSERT OR REPLACE INTO metrics VALUES (?, 'test', ?, ?, ?, ?, ?)",
                               (row["run_key"], row["protocol"], metric, row["seed"],
                                float(row[metric]), row["created"]))
            for row in db.execute("SELECT key, checkpoint, summary FROM runs").fetchall():
                checkpoint = row["checkpoint"]
                if checkpoint and Path(checkpoint).is_absolute():
                    try:
                        checkpoint = str(Path(checkpoint).relative_to(folder))
                    except ValueError:
                        pass  # outside the store's folder: kept as it is
                error = None
                if row["summary"]:
                    error = json.loads(row["summary"]).get("error")
                db.execute("UPDATE runs SET checkpoint = ?, error = COALESCE(error, ?) "
                           "WHERE key = ?", (checkpoint, error, row["key"]))
            db.execute("DROP TABLE evaluations")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60)
        db.row_factory = sqlite3.Row
        return db

    @contextmanager
    def _exclusive(self):
        """One write transaction that no other process can interleave with (BEGIN IMMEDIATE)."""
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    # -- files beside the store ----------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> Path:
        return self.path.parent / "checkpoints"

    def resolve(self, stored_path: str | None) -> Path | None:
        """A stored file path (relative to the store's folder) as a path that opens from here."""
        if not stored_path:
            return None
        path = Path(stored_path)
        return path if path.is_absolute() else self.path.parent / path

    def write_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> str:
        """Write a safetensors file under checkpoints/ atomically; returns its stored path."""
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        final = self.checkpoint_dir / name
        handle, temporary = tempfile.mkstemp(dir=self.checkpoint_dir, prefix=".tmp-",
                                             suffix=".safetensors")
        os.close(handle)
        try:
            save_file({key: value.detach().cpu().contiguous() for key, value in tensors.items()},
                      temporary)
            os.replace(temporary, final)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return str(final.relative_to(self.path.parent))

    def read_tensors(self, stored_path: str | None, what: str, key: str) -> dict[str, torch.Tensor]:
        path = self.resolve(stored_path)
        if path is None or not path.is_file():
            raise FileNotFoundError(
                f"run {key} has no {what} at {path}: it was deleted or the store was moved "
                "without its checkpoints/ folder; rerun it with --force to retrain")
        return load_file(str(path))

    # -- claiming and finishing runs -----------------------------------------------------------

    def claim(self, key: str, setup_key: str, config: dict, versions: dict,
              git_commit: str | None, device: str, force: bool = False,
              retrain: bool = False) -> Claim:
        """Atomically take a run to work on it, unless it is finished (and not ``force`` or
        ``retrain``) or a live process holds it. A claim whose process died is taken over.

        ``retrain``: a finished run is trained again for its weights (it lacks them here). Its
        record (status, metrics, history) stands until the new one completes, so a retraining
        that is interrupted, even killed, loses nothing; only its files, which the new ones
        replace, go at once. ``force`` removes the record first."""
        with self._exclusive() as db:
            row = db.execute("SELECT * FROM runs WHERE key = ?", (key,)).fetchone()
            if row is not None:
                stored = self._to_run(row)
                if stored.status == "running" and self.is_live(stored):
                    return Claim("busy", run=stored)
                retraining = (stored.status == "finished" and stored.pid is not None
                              and self.is_live(stored))
                if retraining and (force or retrain):
                    return Claim("busy", run=stored)
                if stored.status == "finished" and not (force or retrain):
                    return Claim("finished", run=stored)
                if stored.status == "finished" and not force:  # retrain: the record stands
                    self._delete_files(stored)
                    token = uuid.uuid4().hex
                    db.execute("UPDATE runs SET heartbeat = ?, host = ?, pid = ?, token = ? "
                               "WHERE key = ?",
                               (_epoch(), socket.gethostname(), os.getpid(), token, key))
                    return Claim("claimed", token=token)
                self._delete_rows(db, key)
                self._delete_files(stored)
            token = uuid.uuid4().hex
            db.execute("INSERT INTO runs (key, setup_key, config, status, started, heartbeat, "
                       "host, pid, token, versions, git_commit, device) "
                       "VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?)",
                       (key, setup_key, json.dumps(config, sort_keys=True), _now(), _epoch(),
                        socket.gethostname(), os.getpid(), token, json.dumps(versions),
                        git_commit, device))
        return Claim("claimed", token=token)

    def is_live(self, run: StoredRun) -> bool:
        """A claim is live while its heartbeat is fresh and, on this host, its process exists
        (a dead process is noticed at once; a reused pid by its stopped heartbeat)."""
        fresh = run.heartbeat is not None and _epoch() - run.heartbeat < self.stale_after
        if run.host == socket.gethostname() and run.pid is not None:
            return fresh and _process_alive(run.pid)
        return fresh

    def beat(self, key: str, token: str) -> None:
        """Refresh the claim's heartbeat; raises ClaimLostError if another process took it."""
        with closing(self._connect()) as db, db:
            changed = db.execute("UPDATE runs SET heartbeat = ? WHERE key = ? AND token = ?",
                                 (_epoch(), key, token)).rowcount
        if not changed:
            raise ClaimLostError(f"run {key} was taken over by another process")

    @contextmanager
    def heartbeat(self, key: str, token: str, every: float = HEARTBEAT_SECONDS):
        """Keep a claim fresh from a background thread while the body works."""
        stop = threading.Event()

        def beat_until_stopped():
            while not stop.wait(every):
                try:
                    self.beat(key, token)
                except (ClaimLostError, sqlite3.Error):
                    return

        thread = threading.Thread(target=beat_until_stopped, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def update_history(self, key: str, token: str, history: list) -> None:
        """A running run's history so far (a finished run trained again keeps its own until
        the new one completes)."""
        with closing(self._connect()) as db, db:
            db.execute("UPDATE runs SET history = CASE WHEN status = 'finished' THEN history "
                       "ELSE ? END, heartbeat = ? WHERE key = ? AND token = ?",
                       (json.dumps(history), _epoch(), key, token))

    def complete(self, key: str, token: str, *, status: str, history: list, metrics: list[dict],
                 wall_seconds: float, checkpoint: str | None, attack_state: str | None,
                 error: str | None = None, extra: dict | None = None) -> None:
        """Write a run's metrics and final status in one transaction (all or nothing)."""
        if status not in STATUSES[1:]:
            raise ValueError(f"a run completes as one of {STATUSES[1:]}, not {status!r}")
        with self._exclusive() as db:
            owner = db.execute("SELECT token FROM runs WHERE key = ?", (key,)).fetchone()
            if owner is None or owner["token"] != token:
                raise ClaimLostError(f"run {key} was taken over by another process; its result "
                                     "is not recorded")
            db.execute("DELETE FROM metrics WHERE run_key = ?", (key,))
            self._insert_metrics(db, key, metrics)
            db.execute("UPDATE runs SET status = ?, finished = ?, wall_seconds = ?, history = ?, "
                       "checkpoint = ?, attack_state = ?, error = ?, extra = ?, pid = NULL "
                       "WHERE key = ?",
                       (status, _now(), wall_seconds, json.dumps(history), checkpoint,
                        attack_state, error, json.dumps(extra or {}), key))

    def fail(self, key: str, token: str, error: str, history: list | None = None) -> None:
        """Mark a claimed run as failed (its process gave up); keeps nothing half-written. A
        finished run that was being trained again keeps its record as it was."""
        with closing(self._connect()) as db, db:
            db.execute("UPDATE runs SET "
                       "status = CASE WHEN status = 'finished' THEN status ELSE 'failed' END, "
                       "error = CASE WHEN status = 'finished' THEN error ELSE ? END, "
                       "history = CASE WHEN status = 'finished' THEN history "
                       "ELSE COALESCE(?, history) END, pid = NULL WHERE key = ? AND token = ?",
                       (error, json.dumps(history) if history is not None else None, key, token))

    def record_evaluation(self, key: str, metrics: list[dict], *, status: str = "finished",
                          error: str | None = None) -> None:
        """Add (or replace) metrics of an existing run after re-evaluating its checkpoint."""
        with self._exclusive() as db:
            self._insert_metrics(db, key, metrics)
            db.execute("UPDATE runs SET status = ?, error = ? WHERE key = ?", (status, error, key))

    def record_metrics(self, key: str, metrics: list[dict]) -> None:
        """Add (or replace) metric rows of a stored run without touching its status (numbers
        computed from its checkpoint later, such as the spectral analysis)."""
        if self.get_run(key) is None:
            raise KeyError(f"no run {key} in {self.path}")
        with self._exclusive() as db:
            self._insert_metrics(db, key, metrics)

    @staticmethod
    def _insert_metrics(db, key: str, metrics: list[dict]) -> None:
        created = _now()
        db.executemany("INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?, ?, ?, ?)",
                       [(key, m.get("split", "test"), m["protocol"], m["metric"],
                         int(m.get("eval_seed", 0)), float(m["value"]), created)
                        for m in metrics])

    def delete_run(self, key: str) -> None:
        """Remove a run, every metric of it and its files (what ``--force`` does first)."""
        with self._exclusive() as db:
            row = db.execute("SELECT * FROM runs WHERE key = ?", (key,)).fetchone()
            self._delete_rows(db, key)
        if row is not None:
            self._delete_files(self._to_run(row))

    @staticmethod
    def _delete_rows(db, key: str) -> None:
        db.execute("DELETE FROM metrics WHERE run_key = ?", (key,))
        db.execute("DELETE FROM runs WHERE key = ?", (key,))

    def _delete_files(self, run: StoredRun) -> None:
        for stored in (run.checkpoint, run.attack_state):
            path = self.resolve(stored)
            if path is not None:
                path.unlink(missing_ok=True)
        for path in self.epoch_checkpoint_files(run.key):
            path.unlink(missing_ok=True)

    def epoch_checkpoint_files(self, key: str) -> list[Path]:
        """A run's intermediate checkpoints (``<key>.epoch<E>.safetensors``), found by name
        rather than read from its ``extra``: every interval's files go, and an imported row's
        ``extra`` can point nowhere outside the store's checkpoints/."""
        if not self.checkpoint_dir.is_dir():
            return []
        prefix, suffix = f"{key}.epoch", ".safetensors"
        return sorted(path for path in self.checkpoint_dir.iterdir()
                      if path.name.startswith(prefix) and path.name.endswith(suffix)
                      and path.name[len(prefix):-len(suffix)].isdigit())

    def merge_runs(self, runs: list[dict], replace: bool = False) -> list[tuple[str, str, str | None]]:
        """Insert runs given as plain dicts, all in one transaction (all or nothing).

        Each dict holds the fields of :class:`StoredRun` except ``checkpoint`` and
        ``attack_state`` (absent ones are NULL; JSON fields as Python objects), plus
        ``"metrics"``: rows with split, protocol, metric, eval_seed, value and created. The run
        is stored without files: its checkpoint and attack state are NULL.

        Per run: a key not stored yet is *added*; a stored run with the same config, status and
        metric values (``created`` aside) is left *unchanged*; a different stored run is
        *kept* as it is, unless ``replace`` or unless it is not finished and the incoming one
        is, and then it is *replaced* (its rows, metrics and files are removed first, as
        ``--force`` does). Returns ``(key, outcome, previous status or None)`` per run.
        """
        outcomes: list[tuple[str, str, str | None]] = []
        replaced: list[StoredRun] = []
        with self._exclusive() as db:
            for run in runs:
                key = run["key"]
                row = db.execute("SELECT * FROM runs WHERE key = ?", (key,)).fetchone()
                stored = self._to_run(row) if row is not None else None
                if stored is not None:
                    if self._same_run(db, stored, run):
                        outcomes.append((key, "unchanged", stored.status))
                        continue
                    if not (replace or (stored.status != "finished"
                                        and run["status"] == "finished")):
                        outcomes.append((key, "kept", stored.status))
                        continue
                    self._delete_rows(db, key)
                    replaced.append(stored)
                self._insert_run_row(db, run)
                outcomes.append((key, "added" if stored is None else "replaced",
                                 stored.status if stored is not None else None))
        for stored in replaced:  # only once the transaction is committed
            self._delete_files(stored)
        return outcomes

    @staticmethod
    def _metric_values(rows) -> set[tuple]:
        return {(m["split"], m["protocol"], m["metric"], int(m["eval_seed"]), float(m["value"]))
                for m in rows}

    def _same_run(self, db, stored: StoredRun, run: dict) -> bool:
        if stored.config != run["config"] or stored.status != run["status"]:
            return False
        rows = db.execute("SELECT * FROM metrics WHERE run_key = ?", (stored.key,)).fetchall()
        return self._metric_values(rows) == self._metric_values(run.get("metrics", []))

    @staticmethod
    def _insert_run_row(db, run: dict) -> None:
        def dump(name, empty):
            value = run.get(name)
            return json.dumps(empty if value is None else value)

        db.execute("INSERT INTO runs (key, setup_key, config, status, started, finished, "
                   "heartbeat, host, pid, token, wall_seconds, history, versions, git_commit, "
                   "device, checkpoint, attack_state, error, extra) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, ?, ?, NULL, NULL, ?, ?)",
                   (run["key"], run.get("setup_key"), json.dumps(run["config"], sort_keys=True),
                    run["status"], run["started"], run.get("finished"), run.get("heartbeat"),
                    run.get("host"), run.get("pid"), run.get("wall_seconds"),
                    dump("history", []), dump("versions", {}), run.get("git_commit"),
                    run.get("device"), run.get("error"), dump("extra", {})))
        db.executemany("INSERT INTO metrics VALUES (?, ?, ?, ?, ?, ?, ?)",
                       [(run["key"], m["split"], m["protocol"], m["metric"], int(m["eval_seed"]),
                         float(m["value"]), m["created"]) for m in run.get("metrics", [])])

    # -- reading -------------------------------------------------------------------------------

    def get_run(self, key: str) -> StoredRun | None:
        with closing(self._connect()) as db:
            row = db.execute("SELECT * FROM runs WHERE key = ?", (key,)).fetchone()
        return self._to_run(row) if row else None

    def find_runs(self, prefix: str = "") -> list[StoredRun]:
        """Runs whose key starts with ``prefix`` (taken literally: no SQL wildcards)."""
        with closing(self._connect()) as db:
            rows = db.execute("SELECT * FROM runs WHERE substr(key, 1, ?) = ? "
                              "ORDER BY started, rowid", (len(prefix), prefix)).fetchall()
        return [self._to_run(row) for row in rows]

    def runs_of_setup(self, setup_key: str) -> list[StoredRun]:
        with closing(self._connect()) as db:
            rows = db.execute("SELECT * FROM runs WHERE setup_key = ? ORDER BY started, rowid",
                              (setup_key,)).fetchall()
        return [self._to_run(row) for row in rows]

    def metrics(self, key: str | None = None) -> list[dict]:
        """Every metric row (of one run), as dicts with the metrics table's columns."""
        query, args = "SELECT * FROM metrics", ()
        if key is not None:
            query, args = query + " WHERE run_key = ?", (key,)
        with closing(self._connect()) as db:
            rows = db.execute(query + " ORDER BY run_key, split, protocol, eval_seed, metric",
                              args).fetchall()
        return [dict(row) for row in rows]

    def evaluations(self, key: str | None = None, split: str = "test") -> list[dict]:
        """The metrics of each (run, protocol, eval seed) of one split gathered in one dict
        (:func:`gather_evaluations`)."""
        return gather_evaluations(self.metrics(key), split)

    @staticmethod
    def _to_run(row: sqlite3.Row) -> StoredRun:
        def load(text, empty):
            return json.loads(text) if text else empty

        return StoredRun(row["key"], row["setup_key"], json.loads(row["config"]), row["status"],
                         row["started"], row["finished"], row["wall_seconds"],
                         load(row["history"], []), load(row["versions"], {}), row["git_commit"],
                         row["device"], row["checkpoint"], row["attack_state"], row["error"],
                         load(row["extra"], {}), row["host"], row["pid"], row["heartbeat"])


#: protocols of metric rows that are not evaluations of a test or validation split
NON_EVALUATION_PROTOCOLS = ("detection", "cost", "analysis")


def gather_evaluations(metrics: list[dict], split: str = "test") -> list[dict]:
    """Long-format metric rows of one split gathered per (run, protocol, eval seed):
    ``{"run_key", "protocol", "seed", "acc", "asr", "ra", "batch_size", ...}``."""
    gathered: dict[tuple, dict] = {}
    for row in metrics:
        if row.get("split", "test") != split or row["protocol"] in NON_EVALUATION_PROTOCOLS:
            continue
        ident = (row.get("run_key"), row["protocol"], row.get("eval_seed", 0))
        entry = gathered.setdefault(ident, {"run_key": ident[0], "protocol": ident[1],
                                            "seed": ident[2]})
        entry[row["metric"]] = row["value"]
    for entry in gathered.values():
        for count in ("batch_size", "n_clean", "n_triggered"):
            if count in entry:
                entry[count] = int(entry[count])
    return list(gathered.values())
