"""Results as text: export runs of a result store to JSON Lines and import them back.

Why: a SQLite store is one binary file on one machine; lose it (a wiped scratch disk, a
rented GPU handed back) and every result is gone. A results file is plain text that can be
committed to git beside the code that produced it, diffed run by run, reviewed, and merged
from several machines into one store. Committed results survive the loss of any store, and a
report can be made straight from them (:func:`open_results`).

What is *not* exported: checkpoints and fitted attack states (large binary files, and paths
that only mean something beside their store). An imported run can therefore be reported, but
not re-evaluated: new evaluation protocols, eval seeds and the spectral analyses that need the
trained weights cannot run from it; rerun it (``--force``) to get its checkpoint back. Runs
still running are not exported (they have no result yet), nor are the claim fields (token).

The format, one JSON object per line, keys sorted, no spaces (so files diff cleanly, and a
re-export of the same store gives the same bytes)::

    {"eigenguard":"0.1.0","format":"eigenguard-results","schema":2,"version":1}
    {"config":{...},"device":"cpu",...,"key":"...","metrics":[{"created":...,"eval_seed":0,
     "metric":"asr","protocol":"mixed","split":"test","value":0.25},...],...,"status":"finished"}

Line 1 is the header; then one line per run, sorted by key, with its metric rows sorted.
Floats are written as Python's ``repr`` writes them, so they read back exactly.
"""
from __future__ import annotations

import atexit
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from . import __version__
from .errors import EigenGuardError
from .store import SCHEMA_VERSION, STATUSES, ResultStore, StoredRun

FORMAT = "eigenguard-results"
FORMAT_VERSION = 1

#: StoredRun fields written per run (checkpoint and attack_state are not)
EXPORTED_FIELDS = ("key", "setup_key", "config", "status", "started", "finished", "heartbeat",
                   "host", "pid", "wall_seconds", "history", "versions", "git_commit", "device",
                   "error", "extra")
METRIC_FIELDS = ("split", "protocol", "metric", "eval_seed", "value", "created")
REQUIRED_FIELDS = ("key", "config", "status", "started", "metrics")

_STRING_OR_NULL = ("setup_key", "finished", "host", "git_commit", "device", "error")
_NUMBER_OR_NULL = ("heartbeat", "wall_seconds")


def _dumps(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# -- export ------------------------------------------------------------------------------------


def export_runs(store: ResultStore, destination: str | os.PathLike | IO[str],
                runs: Iterable[StoredRun] | None = None) -> int:
    """Write ``runs`` (default: every run of ``store``) as JSON Lines to ``destination``, a path
    (written atomically) or a text stream. Runs still running are skipped. Returns the number
    of runs written."""
    chosen = store.find_runs() if runs is None else list(runs)
    by_key = {run.key: run for run in chosen if run.status != "running"}
    metrics: dict[str, list[dict]] = {}
    for row in store.metrics():
        if row["run_key"] in by_key:
            metrics.setdefault(row["run_key"], []).append({name: row[name]
                                                           for name in METRIC_FIELDS})
    lines = [_dumps({"format": FORMAT, "version": FORMAT_VERSION, "eigenguard": __version__,
                     "schema": SCHEMA_VERSION})]
    for key in sorted(by_key):
        run = by_key[key]
        record = {name: getattr(run, name) for name in EXPORTED_FIELDS}
        record["metrics"] = sorted(metrics.get(key, []), key=lambda m: (
            m["split"], m["protocol"], m["metric"], m["eval_seed"]))
        lines.append(_dumps(record))
    text = "\n".join(lines) + "\n"
    if isinstance(destination, (str, os.PathLike)):
        _write_atomically(Path(destination), text)
    else:
        destination.write(text)
    return len(by_key)


def _write_atomically(path: Path, text: str) -> None:
    path = path.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with open(handle, "w", encoding="utf-8", newline="\n") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# -- import ------------------------------------------------------------------------------------


@dataclass
class ImportSummary:
    """What :func:`import_runs` did: counts of runs per outcome, and a line per run replaced or
    kept (a conflict left as it was)."""

    added: int = 0
    replaced: int = 0
    unchanged: int = 0
    kept: int = 0
    messages: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return (f"{self.added} added, {self.replaced} replaced, {self.unchanged} unchanged, "
                f"{self.kept} kept as stored (conflicts)")


def import_runs(store: ResultStore, sources: str | os.PathLike | Iterable[str | os.PathLike],
                replace: bool = False) -> ImportSummary:
    """Import results files into ``store``.

    Every file is read and checked before anything is written: a file that is missing, empty,
    not a results file, of another format version, or with a bad line raises
    :class:`EigenGuardError` and changes nothing. Each file is then imported in one
    transaction, per run: a new key is added; a stored run with the same config, status and
    metric values is unchanged; a different stored run is kept as it is unless ``replace``, or
    unless it is not finished (failed, evaluation-failed, running) and the incoming one is
    finished, then it is replaced. Imported runs have no checkpoint nor attack state.
    """
    paths = [sources] if isinstance(sources, (str, os.PathLike)) else list(sources)
    files = [(Path(path), read_results(path)) for path in paths]
    summary = ImportSummary()
    for path, runs in files:
        incoming_status = {run["key"]: run["status"] for run in runs}
        for key, outcome, previous in store.merge_runs(runs, replace=replace):
            setattr(summary, outcome, getattr(summary, outcome) + 1)
            incoming = incoming_status[key]
            if outcome == "replaced":
                summary.messages.append(
                    f"{path}: run {key} replaced the stored one ({previous} there, "
                    f"{incoming} here); the stored run's checkpoint, if any, was removed")
            elif outcome == "kept":
                summary.messages.append(
                    f"{path}: run {key} differs from the stored one ({previous} there, "
                    f"{incoming} here); kept the stored run: import again with replace=True "
                    "to take the file's")
    return summary


def read_results(path: str | os.PathLike) -> list[dict]:
    """The runs of one results file as dicts (the fields of :meth:`ResultStore.merge_runs`),
    after checking all of it; raises :class:`EigenGuardError` naming the file (and line)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise EigenGuardError(
            f"no results file at {path}: pass the path of a .jsonl file written by "
            "export_runs (eigenguard export)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise EigenGuardError(f"{path} is not a text file, so not an {FORMAT} file: pass a "
                              ".jsonl file written by export_runs (eigenguard export)") from None
    lines = [line.rstrip("\r") for line in text.split("\n")]
    if not lines or not lines[0].strip():
        raise EigenGuardError(f"{path} is empty (or its first line is): it holds no "
                              f"{FORMAT} header; export the results again")
    _check_header(path, lines[0])
    runs: list[dict] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        run = _parse_run(path, number, line)
        if run["key"] in seen:
            raise EigenGuardError(f"{path}, line {number}: run {run['key']} is already on line "
                                  f"{seen[run['key']]}; keep one of them")
        seen[run["key"]] = number
        runs.append(run)
    return runs


def _check_header(path: Path, line: str) -> None:
    try:
        header = json.loads(line)
    except ValueError:
        header = None
    if not isinstance(header, dict) or "format" not in header:
        raise EigenGuardError(
            f"{path} does not start with an {FORMAT} header (line 1 is not one): it is not a "
            "results file; pass a .jsonl file written by export_runs (eigenguard export)")
    if header["format"] != FORMAT:
        raise EigenGuardError(f"{path} is a {header['format']!r} file, not {FORMAT}: pass a "
                              "results file written by export_runs (eigenguard export)")
    version = header.get("version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise EigenGuardError(
            f"{path} is {FORMAT} version {version}; this eigenguard ({__version__}) reads "
            f"version {FORMAT_VERSION}: export it again with a matching eigenguard, or "
            "install the eigenguard that wrote it"
            + (f" ({header['eigenguard']})" if "eigenguard" in header else ""))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_run(path: Path, number: int, line: str) -> dict:
    def bad(problem: str) -> EigenGuardError:
        return EigenGuardError(f"{path}, line {number}: {problem}; the file is not imported "
                               "(nothing was changed): fix or remove that line, or export the "
                               "results again")

    try:
        run = json.loads(line)
    except ValueError as error:
        raise bad(f"not valid JSON ({error.msg}, column {error.colno})") from None
    if not isinstance(run, dict):
        raise bad("not a JSON object")
    missing = [name for name in REQUIRED_FIELDS if name not in run]
    if missing:
        raise bad(f"the run lacks {', '.join(missing)}")
    unknown = sorted(set(run) - set(EXPORTED_FIELDS) - {"metrics"})
    if unknown:
        raise bad(f"unknown field(s) {', '.join(unknown)} (written by a newer eigenguard?)")
    if not isinstance(run["key"], str) or not run["key"]:
        raise bad("key must be a non-empty string")
    if not isinstance(run["config"], dict):
        raise bad("config must be an object")
    if run["status"] not in STATUSES[1:]:
        raise bad(f"status {run['status']!r} is not one of {', '.join(STATUSES[1:])}")
    if not isinstance(run["started"], str):
        raise bad("started must be a string")
    for name in _STRING_OR_NULL:
        if run.get(name) is not None and not isinstance(run[name], str):
            raise bad(f"{name} must be a string or null")
    for name in _NUMBER_OR_NULL:
        if run.get(name) is not None and not _is_number(run[name]):
            raise bad(f"{name} must be a number or null")
    if run.get("pid") is not None and (not isinstance(run["pid"], int)
                                       or isinstance(run["pid"], bool)):
        raise bad("pid must be an integer or null")
    for name, kind, word in (("history", list, "a list"), ("versions", dict, "an object"),
                             ("extra", dict, "an object")):
        if run.get(name) is not None and not isinstance(run[name], kind):
            raise bad(f"{name} must be {word} or null")
    if not isinstance(run["metrics"], list):
        raise bad("metrics must be a list")
    identities = set()
    for index, row in enumerate(run["metrics"], start=1):
        where = f"metric row {index}"
        if not isinstance(row, dict):
            raise bad(f"{where} is not an object")
        missing = [name for name in METRIC_FIELDS if name not in row]
        if missing:
            raise bad(f"{where} lacks {', '.join(missing)}")
        if set(row) - set(METRIC_FIELDS):
            raise bad(f"{where} has unknown field(s) "
                      f"{', '.join(sorted(set(row) - set(METRIC_FIELDS)))}")
        for name in ("split", "protocol", "metric", "created"):
            if not isinstance(row[name], str):
                raise bad(f"{where}: {name} must be a string")
        if not isinstance(row["eval_seed"], int) or isinstance(row["eval_seed"], bool):
            raise bad(f"{where}: eval_seed must be an integer")
        if not _is_number(row["value"]) or math.isnan(row["value"]):
            raise bad(f"{where}: value must be a number (not NaN)")
        identity = (row["split"], row["protocol"], row["metric"], row["eval_seed"])
        if identity in identities:
            raise bad(f"{where} repeats split/protocol/metric/eval_seed {identity}")
        identities.add(identity)
    return run


# -- reports straight from files ---------------------------------------------------------------


def open_results(path: str | os.PathLike) -> ResultStore:
    """A store to report from: a ``.jsonl`` results file, or a folder of them, is imported into
    a fresh temporary store (removed when the process exits); any other path opens as a result
    store that must exist (``ResultStore(path, create=False)``)."""
    path = Path(path).expanduser()
    if path.is_dir():
        sources = sorted(path.glob("*.jsonl"))
        if not sources:
            raise EigenGuardError(f"{path} is a folder without *.jsonl results files: pass a "
                                  "result store (.sqlite) or results files written by "
                                  "export_runs (eigenguard export)")
    elif path.suffix == ".jsonl":
        sources = [path]
    else:
        return ResultStore(path, create=False)
    folder = tempfile.mkdtemp(prefix="eigenguard-results-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    store = ResultStore(Path(folder) / "results.sqlite")
    import_runs(store, sources)
    store.description = f"{path} (JSON Lines: {', '.join(source.name for source in sources)})"
    return store
