"""A sweep's runs as Ray tasks, on one machine or a cluster: ``eigenguard sweep --executor ray``.

**Only the driver writes the store.** The result store is one SQLite file, and SQLite's locking
is not safe over a network file system: the store is never written from two machines. So the
driver (the process running ``eigenguard sweep``) does every write: it claims a run's key before
submitting it, keeps every claim's heartbeat fresh while the task is in flight (its own host and
pid are on the claim, so a killed driver leaves claims that the next sweep takes over), and
records the result when the task returns, or marks the run failed with the task's error. A
worker touches no store: it calls :func:`eigenguard.experiment.execute` and returns the
:class:`~eigenguard.experiment.RunResult`.

**What travels back**: the whole RunResult (metrics, training history, the defended model's
tensors and the fitted attack's tensors, all on the CPU), through Ray's object store; the
driver writes the checkpoint files beside its store. A worker shows no progress bars and its
log lines stay in its Ray log files; the driver logs a line as each run is submitted and as each
finishes (the history arrives whole, not epoch by epoch). A worker's run is checked against the driver's key: a worker that finds other data
files at ``--data-root`` (another fingerprint) fails the run instead of recording it under the
wrong key.

**Post-training defenses** (``starts_from == "backdoored"``) repair the undefended model of the
same setup, which must never be trained twice. They are held back until that run is trained in
the store (finished, or trained with a failed evaluation: its checkpoint is there); then its
checkpoint is read once, put in Ray's object store once per setup, and handed to each of them as
``backdoored_state``. An undefended run that neither the store nor the grid holds is added and
trained first (recorded like any other run, though not counted among the grid's); one that
another live process is running is waited for, as ``eigenguard run`` waits; if it fails, the
defenses that need it are recorded as failed with its error.

Runs that are already trained and only need evaluating again (``missing-protocols``; an
evaluation-failed run with ``--retry-failed``) are evaluated in the driver, as the in-process
executor does.

**On a cluster**, every machine needs eigenguard (and any module that registers an attack,
defense or model the grid uses) installed in the same Python environment, and the data set at the
same ``--data-root`` (an absolute path; it is resolved on the driver)::

    ray start --head                       # on one machine, HEAD
    ray start --address HEAD:6379          # on each of the others
    eigenguard sweep GRID --executor ray --address HEAD:6379 --cpus-per-run 4 --gpus-per-run 1

Without ``--address`` a local Ray instance is started for the sweep (and stopped after it). Each
run is one task asking for ``--cpus-per-run`` CPUs (torch uses that many threads) and
``--gpus-per-run`` GPUs (the run uses ``cuda`` when it gets one). On the CPU a run gives the same
numbers as in-process with the same thread count and library versions.

Ray is optional (``pip install 'eigenguard[ray]'``): it is imported when an executor is made.
"""
from __future__ import annotations

import logging
import math
import sqlite3
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .attacks.registry import ATTACKS
from .defenses.registry import DEFENSES
from .errors import EigenGuardError
from .experiment import (RunConfig, device_description, execute, git_commit, library_versions,
                         load_checkpoint, missing_checkpoint, record, recorded_threads,
                         reevaluate)
from .models import registry as model_registry
from .splits import LoadedData
from .store import HEARTBEAT_SECONDS, ClaimLostError, ResultStore, StoredRun
from .sweep import PlannedRun, Progress, SweepSummary, format_duration

RAY_MISSING = "the ray executor needs Ray: pip install 'eigenguard[ray]'"


def _import_ray():
    try:
        import ray
    except ImportError:
        raise EigenGuardError(RAY_MISSING) from None
    return ray


# -- what runs in a worker --------------------------------------------------------------------

def _register_extensions(extensions) -> None:
    """Register the attacks, defenses and models of the driver that a fresh worker lacks
    (unpickling a class defined in an importable module imports it, which registers it; one
    defined in the driver's script arrives by value and is registered here)."""
    for kind, name, factory in extensions:
        if kind == "model":
            if not model_registry.is_model(name):
                model_registry.register_model(name)(factory)
        else:
            registry = ATTACKS if kind == "attack" else DEFENSES
            if name not in registry.names():
                registry.register(name)(factory)


def run_task(config: RunConfig, *, data_root, device: str, gpus_per_run: float, threads: int,
             protocols, backdoored_state, extensions=()):
    """The body of one Ray task: execute one run, touching no store, and return its result."""
    torch.set_num_threads(threads)
    _register_extensions(extensions)
    worker_device = "cuda" if gpus_per_run > 0 and torch.cuda.is_available() else device
    return execute(config, data_root=data_root, device=worker_device, progress=False,
                   protocols=protocols, backdoored_state=backdoored_state)


# -- scheduling: which runs wait for which ----------------------------------------------------

def is_trained(store: ResultStore, stored: StoredRun | None) -> bool:
    """A run whose model is in the store (its evaluation may have failed); a run imported from
    an export has its metrics but not its weights."""
    return (stored is not None and stored.status in ("finished", "evaluation-failed")
            and missing_checkpoint(store, stored) is None)


def _reevaluates(item: PlannedRun) -> bool:
    """Trained already: only evaluated again (in the driver), as the in-process executor does."""
    return item.state == "missing-protocols" or (
        item.stored is not None and item.stored.status == "evaluation-failed"
        and bool(item.stored.checkpoint))


def _post_training(config: RunConfig) -> bool:
    return config.build_defense().starts_from == "backdoored"


@dataclass
class Schedule:
    """The pending runs sorted by what they wait for."""

    reevaluate: list[PlannedRun] = field(default_factory=list)  # in the driver
    train: list[PlannedRun] = field(default_factory=list)  # submitted at once
    #: undefended run's key -> the post-training runs that wait for it to be trained
    after: dict[str, list[PlannedRun]] = field(default_factory=dict)
    #: every undefended run waited for: the grid's planned run, or one added here
    references: dict[str, PlannedRun] = field(default_factory=dict)
    #: keys of references not among the runs to train: trained already, being trained
    #: elsewhere, or to be added (settled against the store when the sweep starts)
    outside: list[str] = field(default_factory=list)


def schedule(pending: list[PlannedRun], fingerprints: dict[str, str]) -> Schedule:
    """Sort the pending runs: evaluations again, runs to submit now, and post-training runs
    held back until the undefended run of their setup is trained. ``fingerprints``: each data
    set's fingerprint (part of the keys). Reads no store."""
    result = Schedule()
    to_train = {}
    for item in pending:
        if _reevaluates(item):
            result.reevaluate.append(item)
        elif _post_training(item.config):
            reference = item.config.with_defense("none")
            key = reference.key(fingerprints[item.config.dataset])
            result.after.setdefault(key, []).append(item)
            result.references.setdefault(key, PlannedRun(reference, key, item.setup_key,
                                                          "pending"))
        else:
            result.train.append(item)
            to_train[item.key] = item
    for key in result.references:
        if key in to_train:
            result.references[key] = to_train[key]
        else:
            result.outside.append(key)
    return result


# -- keeping claims alive ---------------------------------------------------------------------

class Heartbeats:
    """One thread that refreshes the heartbeat of every claim the driver holds."""

    def __init__(self, store: ResultStore, every: float = HEARTBEAT_SECONDS, log=print):
        self.store, self.every, self.log = store, every, log
        self.claims: dict[str, str] = {}
        self.lost: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True,
                                        name="eigenguard-heartbeats")

    def add(self, key: str, token: str) -> None:
        with self._lock:
            self.claims[key] = token

    def remove(self, key: str) -> None:
        with self._lock:
            self.claims.pop(key, None)

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            with self._lock:
                claims = list(self.claims.items())
            for key, token in claims:
                try:
                    self.store.beat(key, token)
                except ClaimLostError:
                    if key not in self.lost:
                        self.lost.add(key)
                        self.log(f"[sweep] {key[:8]} was taken over by another process")
                except sqlite3.Error:
                    pass  # a busy database: the next beat tries again

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# -- the executor -----------------------------------------------------------------------------

@dataclass
class _Task:
    item: PlannedRun
    token: str
    submitted: float


def _task_error(error: BaseException) -> str:
    """A task's error as ``Type: message`` (the worker's exception where Ray carries it)."""
    cause = getattr(error, "cause", None)
    shown = cause if isinstance(cause, BaseException) else error
    text = f"{type(shown).__name__}: {shown}".strip()
    if "Traceback (most recent call last)" in text:  # Ray's own error: keep its last line
        text = text.splitlines()[-1].strip()
    if "No module named" in text:
        text += (" (the worker cannot import a module the run needs: install it on every "
                 "machine of the cluster, or pass RayExecutor(runtime_env=...))")
    return text


def _extensions(configs) -> list[tuple]:
    """The registered attacks, defenses and models the configs use that eigenguard does not
    define: a worker registers them before running."""
    found = {}
    for config in configs:
        for kind, name, factory in (
                ("attack", config.attack, ATTACKS.get(config.attack)),
                ("defense", config.defense, DEFENSES.get(config.defense)),
                ("model", config.model, model_registry.get_model_factory(config.model))):
            module = getattr(factory, "__module__", "") or ""
            if module.split(".")[0] != "eigenguard":
                found[(kind, name)] = factory
    return [(kind, name, factory) for (kind, name), factory in found.items()]


@contextmanager
def _threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class RayExecutor:
    """Runs each pending run as a Ray task; the driver alone claims, beats and records.

    ``address``: a running cluster's address (None: start a local Ray instance for the sweep).
    ``runtime_env``: Ray's runtime environment for each task (e.g. ``{"py_modules": [...]}``
    to ship a module that registers an extension). ``max_in_flight``: runs submitted at once
    (default: as many as the cluster's CPUs and GPUs hold); a run is claimed when submitted.
    ``poll_seconds``: how often a run that another process is training is looked up.
    """

    name = "ray"

    def __init__(self, address: str | None = None, cpus_per_run: float = 1,
                 gpus_per_run: float = 0, *, runtime_env: dict | None = None,
                 max_in_flight: int | None = None, poll_seconds: float = 5.0,
                 heartbeat_seconds: float = HEARTBEAT_SECONDS):
        _import_ray()  # fail before the data loads
        if cpus_per_run < 0 or gpus_per_run < 0:
            raise EigenGuardError("--cpus-per-run and --gpus-per-run must not be negative")
        self.address = address
        self.cpus_per_run, self.gpus_per_run = cpus_per_run, gpus_per_run
        self.runtime_env = runtime_env
        self.max_in_flight = max_in_flight
        self.poll_seconds = poll_seconds
        self.heartbeat_seconds = heartbeat_seconds
        #: (key, given the stored undefended model) of each submitted run, in order
        self.submissions: list[tuple[str, bool]] = []

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus_per_run))

    def _slots(self, ray) -> int:
        """How many runs the cluster's nodes can hold at once (at least one must fit)."""
        wants = {name: amount for name, amount in (("CPU", self.cpus_per_run),
                                                    ("GPU", self.gpus_per_run)) if amount > 0}
        slots, nodes = 0, []
        for node in ray.nodes():
            if not node.get("Alive", True):
                continue
            have = node.get("Resources", {})
            nodes.append(f"{have.get('CPU', 0):g} CPUs, {have.get('GPU', 0):g} GPUs")
            if wants:
                slots += min(math.floor(have.get(name, 0) / amount + 1e-9)
                             for name, amount in wants.items())
            else:
                slots += max(1, int(have.get("CPU", 1)))
        if slots < 1:
            raise EigenGuardError(
                f"no Ray node has the {self.cpus_per_run:g} CPUs and {self.gpus_per_run:g} "
                f"GPUs a run asks for (nodes: {'; '.join(nodes) or 'none'}): lower "
                "--cpus-per-run / --gpus-per-run, or add machines to the cluster")
        return slots

    def execute(self, pending: list[PlannedRun], store: ResultStore,
                loaded: dict[str, LoadedData], summary: SweepSummary, *, device="cpu",
                data_root=None, progress=True, log=print) -> None:
        if not pending:
            return
        ray = _import_ray()
        started = False
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.ERROR)
            started = True
        try:
            _Driver(self, ray, pending, store, loaded, summary, device=device,
                    data_root=data_root, progress=progress, log=log).run()
        finally:
            if started:
                ray.shutdown()


class _Driver:
    """One sweep's state on the driver: the queue, the tasks in flight, the claims held."""

    def __init__(self, executor: RayExecutor, ray, pending, store, loaded, summary, *, device,
                 data_root, progress, log):
        self.executor, self.ray, self.store, self.summary = executor, ray, store, summary
        self.device, self.progress, self.log = device, progress, log
        self.data_root = (str(Path(data_root).expanduser().resolve())
                          if data_root is not None else None)
        fingerprints = {dataset: data.fingerprint for dataset, data in loaded.items()}
        self.plan = schedule(pending, fingerprints)
        self.grid_keys = {item.key for item in pending}
        self.accounted: set[str] = set()  # grid runs counted in the summary
        self.tracker = Progress(pending, log)
        self.tracker.done = summary.stored_before + len(summary.skipped)
        self.tracker.total = summary.total
        self.ready: deque[tuple[PlannedRun, object]] = deque(
            (item, None) for item in self.plan.train)
        self.reevaluations = deque(self.plan.reevaluate)
        self.in_flight: dict[object, _Task] = {}
        self.waiting: set[str] = set()  # references another process is training
        self.attempted: set[str] = set()  # references this sweep claimed to train
        self.remote = ray.remote(run_task)
        self.slots = executor._slots(ray)
        self.max_in_flight = executor.max_in_flight or self.slots
        with _threads(executor.threads):  # the thread count the workers run with
            self.versions = library_versions()
            self.description = ("cuda (a Ray worker's GPU)" if executor.gpus_per_run > 0
                                else device_description(device))
        self.commit = git_commit()
        self.heartbeats = Heartbeats(store, executor.heartbeat_seconds, log)

    # -- counting ------------------------------------------------------------------------------

    def _count(self, key: str, outcome: str) -> None:
        """Count a grid run's outcome once (finished, failed or skipped)."""
        if key not in self.grid_keys or key in self.accounted:
            return
        self.accounted.add(key)
        if outcome == "finished":
            self.summary.finished += 1
        elif outcome == "failed":
            self.summary.failed.append(key)
        else:
            self.summary.skipped.append(key)
        self.tracker.done += 1

    def _remaining(self) -> list[PlannedRun]:
        items = [item for item, _ in self.ready] + list(self.reevaluations)
        items += [task.item for task in self.in_flight.values()]
        items += [item for waiting in self.plan.after.values() for item in waiting]
        return [item for item in items if item.key not in self.accounted]

    def _time_left(self) -> str:
        remaining = self._remaining()
        seconds = self.tracker.time_left(remaining)
        if seconds is not None and remaining:
            seconds /= min(self.slots, len(remaining))
        return format_duration(seconds)

    def _describe(self, item: PlannedRun) -> str:
        added = "" if item.key in self.grid_keys else \
            " (the undefended run that post-training defenses start from)"
        return f"{item.key[:8]} {item.describe()}{added}"

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> None:
        if torch.device(self.device).type == "cuda" and self.executor.gpus_per_run <= 0:
            self.log("[sweep] the device is cuda but --gpus-per-run is 0: Ray gives the runs "
                     "no GPU")
        with self.heartbeats:
            try:
                for key in self.plan.outside:
                    self._settle(key)
                while self.ready or self.in_flight or self.waiting or self.reevaluations:
                    self._submit_ready()
                    if self.reevaluations:
                        self._reevaluate(self.reevaluations.popleft())
                        self._collect(timeout=0)
                    elif self.in_flight:
                        self._collect(timeout=self.executor.poll_seconds)
                    elif self.waiting:
                        time.sleep(self.executor.poll_seconds)
                    for key in list(self.waiting):
                        self._settle(key)
            except BaseException as error:
                self._abandon("interrupted" if isinstance(error, KeyboardInterrupt)
                              else f"{type(error).__name__}: {error}")
                raise

    def _abandon(self, reason: str) -> None:
        """Mark every claim in flight failed and cancel its task."""
        for ref, task in list(self.in_flight.items()):
            try:
                self.store.fail(task.item.key, task.token, reason)
            except sqlite3.Error:
                pass
            try:
                self.ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001  (finished meanwhile, or already gone)
                pass
            self.heartbeats.remove(task.item.key)
        if self.in_flight:
            self.log(f"[sweep] {reason}: {len(self.in_flight)} runs in flight marked failed "
                     "and cancelled")
        self.in_flight.clear()

    def _claim(self, item: PlannedRun):
        """Claim the run; (claim, CPU threads to train with). An undefended run waited for is
        trained again if its weights are not in the store, on the thread count it was recorded
        with (the count changes the order of floating-point sums, so only that one reproduces
        its record); every other run on the executor's."""
        stored = self.store.get_run(item.key) if item.key in self.plan.references else None
        retrain = item.key in self.plan.references and not is_trained(self.store, stored)
        threads = (recorded_threads(stored) if retrain and stored is not None else None)
        claim = self.store.claim(item.key, item.setup_key, item.config.resolved(), self.versions,
                                 self.commit, self.description, retrain=retrain)
        return claim, threads or self.executor.threads

    def _submit_ready(self) -> None:
        while self.ready and len(self.in_flight) < self.max_in_flight:
            item, state = self.ready.popleft()
            claim, threads = self._claim(item)
            if claim.state == "finished":
                self.log(f"[sweep] {item.key[:8]} was finished meanwhile by another process; "
                         "not run again")
                self._count(item.key, "finished")
                self._settled(item.key)
                continue
            if claim.state == "busy":
                self.log(f"[sweep] skipping {item.key[:8]}: being run by pid {claim.run.pid} on "
                         f"{claim.run.host}")
                self._count(item.key, "skipped")
                self._settled(item.key)
                continue
            if item.key in self.plan.references:
                self.attempted.add(item.key)
            self.heartbeats.add(item.key, claim.token)
            ref = self.remote.options(
                num_cpus=self.executor.cpus_per_run, num_gpus=self.executor.gpus_per_run,
                runtime_env=self.executor.runtime_env,
            ).remote(item.config, data_root=self.data_root, device=self.device,
                     gpus_per_run=self.executor.gpus_per_run, threads=threads,
                     protocols=item.protocols, backdoored_state=state,
                     extensions=_extensions([item.config]))
            self.in_flight[ref] = _Task(item, claim.token, time.monotonic())
            self.executor.submissions.append((item.key, state is not None))
            self.log(f"[sweep] {self.tracker.done}/{self.tracker.total} done; started "
                     f"{self._describe(item)} ({len(self.in_flight)} running); time left about "
                     f"{self._time_left()}")

    def _collect(self, timeout: float) -> None:
        done, _ = self.ray.wait(list(self.in_flight), num_returns=1, timeout=timeout)
        for ref in done:
            self._finish(ref, self.in_flight[ref])

    def _finish(self, ref, task: _Task) -> None:
        item = task.item
        del self.in_flight[ref]
        self.heartbeats.remove(item.key)
        try:
            result = self.ray.get(ref)
            if result.key != item.key:
                raise EigenGuardError(
                    f"the worker's {item.config.dataset} files (fingerprint "
                    f"{result.extra.get('data_fingerprint')}) are not the driver's: put the "
                    "same data set at the same --data-root on every machine")
            record(self.store, result, task.token)
        except BaseException as error:  # the run is recorded as failed; the sweep goes on
            interrupted = isinstance(error, KeyboardInterrupt)
            message = "interrupted" if interrupted else _task_error(error)
            self.store.fail(item.key, task.token, message)
            if interrupted:
                raise
            self.log(f"[sweep] {item.key[:8]} failed: {message}")
            self._count(item.key, "failed")
            self._settled(item.key)
            return
        seconds = result.wall_seconds
        self.summary.seconds += seconds
        self.tracker.measured.append((item, seconds))
        self._count(item.key, "finished" if result.status == "finished" else "failed")
        status = "" if result.status == "finished" else f" (evaluation failed: {result.error})"
        self.log(f"[sweep] {self.tracker.done}/{self.tracker.total} done; {self._describe(item)} "
                 f"finished in {format_duration(seconds)}{status}; time left about "
                 f"{self._time_left()}")
        self._settled(item.key)

    def _reevaluate(self, item: PlannedRun) -> None:
        self.log(f"[sweep] {self.tracker.done}/{self.tracker.total} done; evaluating "
                 f"{self._describe(item)} again in the driver")
        clock = time.monotonic()
        try:
            protocols = item.missing or item.protocols
            reevaluate(self.store, item.stored, data_root=self.data_root, protocols=protocols,
                       device=self.device, progress=self.progress, log=self.log)
        except KeyboardInterrupt:
            raise
        except Exception as error:
            self.log(f"[sweep] {item.key[:8]} failed: {type(error).__name__}: {error}")
            self._count(item.key, "failed")
        else:
            seconds = time.monotonic() - clock
            self.summary.seconds += seconds
            self.tracker.measured.append((item, seconds))
            self._count(item.key, "finished")
        self._settled(item.key)

    # -- post-training defenses: waiting for the undefended run --------------------------------

    def _settled(self, key: str) -> None:
        """A run's outcome is known: if post-training runs wait for it, settle them."""
        if key in self.plan.after:
            self._settle(key)

    def _settle(self, key: str) -> None:
        """Release the runs waiting for undefended run ``key`` if it is trained; wait if another
        process trains it; train it if nobody does; fail them if this sweep's attempt failed."""
        if key not in self.plan.after:
            return
        stored = self.store.get_run(key)
        if is_trained(self.store, stored):
            self.waiting.discard(key)
            state = self.ray.put(load_checkpoint(self.store, stored))  # once per setup
            for item in reversed(self.plan.after.pop(key)):
                self.ready.appendleft((item, state))
        elif key in self.attempted:
            self.waiting.discard(key)
            reason = (stored.error if stored is not None and stored.error else
                      f"it is {stored.status if stored else 'not in the store'}")
            self._fail_dependents(key, reason)
        elif stored is not None and stored.status == "running" and self.store.is_live(stored):
            if key not in self.waiting:
                self.log(f"[sweep] {key[:8]} is being run by pid {stored.pid} on "
                         f"{stored.host}: the post-training defenses of its setup wait for it")
            self.waiting.add(key)
        else:  # nobody trains it: this sweep does, before the runs that wait for it
            self.waiting.discard(key)
            if not any(item.key == key for item, _ in self.ready) and not any(
                    task.item.key == key for task in self.in_flight.values()):
                self.ready.appendleft((self.plan.references[key], None))

    def _fail_dependents(self, key: str, reason: str) -> None:
        for item in self.plan.after.pop(key):
            claim, _ = self._claim(item)
            if claim.state == "claimed":
                message = f"the undefended run {key[:8]} of this setup failed: {reason}"
                self.store.fail(item.key, claim.token, message)
                self.log(f"[sweep] {item.key[:8]} failed: {message}")
                self._count(item.key, "failed")
            else:
                self._count(item.key, "finished" if claim.state == "finished" else "skipped")
