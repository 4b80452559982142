"""One run: RunConfig -> split -> fit the attack -> poison -> defend (train) -> evaluate.

A run's config splits into the **setup** (data, model, attack and its settings, poison ratio,
target, splits, training, seed: everything that makes the backdoored model) and the **defense**.
The setup has its own key: post-training defenses reuse the stored undefended run of the same
setup, and DER compares against it.

Running is separate from recording. :func:`execute` touches no store: it returns a
:class:`RunResult` holding everything the store needs (metrics, history, the model's and the
fitted attack's tensors), so a worker can run it anywhere. :func:`record` writes a result into a
store, and :func:`run` is the driver that claims the key, executes and records.

A run is a pure function of its config and the content of its data: the same config gives the
same splits, poisoned indices, model and metrics (bitwise on CPU with the same thread count and
library versions). Its key hashes the resolved config with a fingerprint of the data, so running
a finished config again returns the stored result, and a changed data file never matches.

Intermediate checkpoints (``save_every``, for the analysis of a backdoor being learnt over
training) are kept by a read-only training hook (:class:`eigenguard.train.KeepStates`): training
is bitwise the same with or without them, so they are not part of the key. They follow every call
of the shared trainer on the poisoned training set, the set the attack's own hooks act on too,
with epochs numbered across the calls: that is the victim learning from poisoned data, including
the stages of a multi-stage defense that train on all of it (DBD's head and semi-supervised
stages, ABL's isolation), and not the repairs that train on other data (a clean reserve, the
samples kept after removal, the isolated samples). Following only the first call would cut
DBD's trajectory in two; following every call would mix in other data and, for DBD's SimCLR
stage, a model with another head. A post-training defense trains nothing on the poisoned set (its
undefended run did), so it keeps none: analyse that run instead. Asking :func:`run` for them on
a stored run that lacks them (or has them at another interval) retrains that run under the same
key; its metrics come out the same.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import platform
import re
import subprocess
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy
import torch
from torch import nn

from . import __version__
from .attacks import POISON_POOLS, create_attack
from .attacks.base import LABEL_MODES
from .data import ImageSet, dataset_info
from .defenses import DefenseContext, DefenseResult, create_defense
from .defenses.registry import DEFENSES
from .evaluate import check_protocol, detection_metrics, evaluate
from .threads import thread_count
from .models.registry import create_model, get_model_factory
from .seeding import stream_seed
from .splits import LoadedData, Splits, check_fractions, load_data, make_splits
from .store import ResultStore, StoredRun, gather_evaluations
from .train import Augmentation, EpochEndHook, KeepStates, TrainConfig, train

#: bump when a change to the code makes old results incomparable (2: validation split, clean
#: reserve, independent random streams, data fingerprint in the key)
CONFIG_VERSION = 2
#: the data splits whose metrics a run records (the validation split is for tuning only)
EVAL_SPLITS = ("test", "validation")


def _settings_tuple(settings) -> tuple:
    items = settings.items() if isinstance(settings, dict) else settings
    return tuple(sorted((str(key), value) for key, value in items))


def _hash(data: dict, fingerprint: str) -> str:
    text = json.dumps({"config": data, "data": fingerprint}, sort_keys=True,
                      separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SetupConfig:
    """Everything that determines the backdoored model: data, splits, model, attack, training."""

    dataset: str = "fashion-mnist"
    model: str = "preact_resnet18"
    width: int = 16
    attack: str = "badnets"
    attack_settings: tuple = ()
    poison_ratio: float = 0.1
    target: int = 0
    poison_pool: str = "all"  # dirty-label draws: "all" (BackdoorBench) or "non-target"
    # "all-to-one": every poisoned sample relabelled to `target`; "all-to-all": class y to
    # (y + 1) mod C, drawn from every class (pool ignored), and so scored at evaluation
    label_mode: str = "all-to-one"
    train: TrainConfig = TrainConfig()
    seed: int = 0
    train_size: int | None = None  # None: the whole training set; else a seeded random subset
    test_size: int | None = None
    validation_fraction: float = 0.1
    reserve_fraction: float = 0.05

    def __post_init__(self):
        object.__setattr__(self, "attack_settings", _settings_tuple(self.attack_settings))

    def build_attack(self):
        return create_attack(self.attack, **dict(self.attack_settings))

    def validate(self) -> None:
        """Fail on a bad name, setting, size or ratio before any data is loaded."""
        info = dataset_info(self.dataset)
        get_model_factory(self.model)
        self.build_attack()
        _check_int("width", self.width, 1)
        _check_int("seed", self.seed, 0)
        for name in ("train_size", "test_size"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        if not (isinstance(self.poison_ratio, (int, float)) and 0 <= self.poison_ratio <= 1):
            raise ValueError(f"poison ratio must be a fraction in [0, 1], got "
                             f"{self.poison_ratio!r}")
        if not (_is_int(self.target) and 0 <= self.target < info.num_classes):
            raise ValueError(f"target class must be an integer in 0..{info.num_classes - 1} "
                             f"for {self.dataset}, got {self.target!r}")
        if self.poison_pool not in POISON_POOLS:
            raise ValueError(f"poison_pool must be one of {POISON_POOLS}, got "
                             f"{self.poison_pool!r}")
        if self.label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {LABEL_MODES} (all-to-one: every "
                             "poisoned sample relabelled to the target; all-to-all: class y to "
                             f"(y + 1) mod C), got {self.label_mode!r}")
        if self.label_mode != "all-to-one":
            check_attack_label_mode(self.build_attack(), self.label_mode)
        check_fractions(self.validation_fraction, self.reserve_fraction)

    def setup_resolved(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(SetupConfig)}
        data["train"] = dataclasses.asdict(self.train)
        data["attack_settings"] = self.build_attack().settings()
        data["version"] = CONFIG_VERSION
        # Key stability: label_mode came after runs were stored, whose keys hash this dict
        # without it. The default (all-to-one, what those runs did) is therefore left out, so
        # their keys stay the same; any other mode is spelled out and gets a key of its own.
        if self.label_mode == "all-to-one":
            del data["label_mode"]
        return data

    def setup_key(self, fingerprint: str) -> str:
        """The key of the backdoored model this setup makes (with the data's fingerprint)."""
        return _hash(self.setup_resolved(), fingerprint)


def _accepts_label_mode(attack) -> bool:
    """Whether the attack's ``poison`` takes ``label_mode`` (an attack that overrides
    ``poison`` without forwarding it poisons all-to-one only)."""
    parameters = inspect.signature(attack.poison).parameters
    return "label_mode" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def check_attack_label_mode(attack, label_mode: str) -> None:
    """Refuse, before any data loads, an attack that cannot poison in ``label_mode``."""
    if label_mode == "all-to-one":
        return
    attack.check_label_mode_supported(label_mode)  # clean-label attacks keep their labels
    if not _accepts_label_mode(attack):
        raise ValueError(f"attack {type(attack).__name__} overrides poison() without a "
                         f"label_mode argument, so it poisons all-to-one only; it cannot run "
                         f"with label_mode {label_mode!r}")


def poison_training_set(attack, config: "SetupConfig", train: ImageSet):
    """Poison the victim's set as the config says (all-to-one is today's call, unchanged)."""
    args = (train, config.poison_ratio, config.target, stream_seed(config.seed, "poison"),
            config.poison_pool)
    if config.label_mode == "all-to-one":
        return attack.poison(*args)
    check_attack_label_mode(attack, config.label_mode)
    return attack.poison(*args, label_mode=config.label_mode)


def _is_int(value) -> bool:
    return isinstance(value, (int, numpy.integer)) and not isinstance(value, bool)


def _check_int(name: str, value, low: int) -> None:
    if not _is_int(value) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class RunConfig(SetupConfig):
    """A setup plus the defense applied to it; hashable, and hashed into the run's key."""

    defense: str = "none"
    defense_settings: tuple = ()

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "defense_settings", _settings_tuple(self.defense_settings))

    @property
    def setup(self) -> SetupConfig:
        return SetupConfig(**{f.name: getattr(self, f.name)
                              for f in dataclasses.fields(SetupConfig)})

    def with_defense(self, name: str, settings=()) -> "RunConfig":
        return dataclasses.replace(self, defense=name, defense_settings=settings)

    def build_defense(self):
        return create_defense(self.defense, **dict(self.defense_settings))

    def validate(self) -> None:
        super().validate()
        self.build_defense()

    def resolved(self) -> dict:
        """The config as plain data with every attack and defense setting spelled out."""
        data = self.setup_resolved()
        data["defense"] = self.defense
        data["defense_settings"] = self.build_defense().key_settings()
        return data

    def key(self, fingerprint: str) -> str:
        return _hash(self.resolved(), fingerprint)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        """The config a store recorded (its key's resolved form; see ``stored_settings``)."""
        data = {k: v for k, v in data.items() if k != "version"}
        data["train"] = TrainConfig(**data.get("train", {}))
        data["defense_settings"] = DEFENSES.stored_settings(data.get("defense", "none"),
                                                            data.get("defense_settings"))
        return cls(**data)


PRESETS = {
    "fast": {},
    # BackdoorBench's full CIFAR-10 setting, for users with a GPU
    "backdoorbench": dict(width=64, train=TrainConfig(epochs=100, lr=0.01, schedule="cosine")),
}


@dataclass
class RunResult:
    """Everything a store records of one run (and, from a store, ``cached=True``)."""

    key: str
    setup_key: str
    config: RunConfig
    status: str  # "finished" or "evaluation-failed"
    metrics: list[dict]
    history: list[dict]
    wall_seconds: float
    model_state: dict[str, torch.Tensor] | None = None
    attack_state: dict[str, torch.Tensor] = field(default_factory=dict)
    error: str | None = None
    extra: dict = field(default_factory=dict)
    cached: bool = False
    checkpoint: str | None = None  # stored path, once recorded
    #: intermediate checkpoints (``save_every``): epoch -> CPU tensors, written by :func:`record`
    epoch_states: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def evaluations(self) -> list[dict]:
        """Test-split metrics gathered per (protocol, eval seed), as the store returns them."""
        return gather_evaluations([{**row, "run_key": self.key} for row in self.metrics])


def library_versions() -> dict:
    return dict(eigenguard=__version__, torch=torch.__version__, numpy=numpy.__version__,
                python=platform.python_version(), threads=torch.get_num_threads())


def device_description(device: str) -> str:
    """The device a run used, in words (a GPU's name; the CPU's architecture otherwise)."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def git_commit() -> str | None:
    """The source tree's commit (with ``-dirty`` for local changes), or None outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "") if commit else None


def build_model(config: SetupConfig, data: ImageSet) -> nn.Module:
    return create_model(config.model, in_channels=data.in_channels, num_classes=data.num_classes,
                        width=config.width)


def run_splits(config: SetupConfig, loaded: LoadedData) -> Splits:
    return make_splits(loaded, seed=config.seed, validation_fraction=config.validation_fraction,
                       reserve_fraction=config.reserve_fraction, train_size=config.train_size,
                       test_size=config.test_size)


# -- executing: no store ----------------------------------------------------------------------

def evaluate_model(config: RunConfig, model: nn.Module, attack, splits: Splits, *,
                   protocols=None, eval_seed: int = 0, device="cpu", progress=True,
                   log=print) -> tuple[list[dict], list[str]]:
    """Metrics of every protocol on the test and validation splits, and the errors of those
    that failed (each protocol is attempted; a failure does not lose the others)."""
    defense = config.build_defense()
    protocols = protocols or defense.protocols_for(model)
    metrics, errors = [], []
    for protocol in protocols:
        check_protocol(protocol)
        for split, data in (("test", splits.test), ("validation", splits.validation)):
            if len(data) == 0:
                continue
            try:
                result = evaluate(model, data, attack, config.target, protocol, seed=eval_seed,
                                  device=device, progress=progress, defense=defense,
                                  label_mode=config.label_mode)
            except (ValueError, RuntimeError) as error:
                errors.append(f"{protocol} on {split}: {type(error).__name__}: {error}")
                log(f"evaluation failed: {errors[-1]}")
                continue
            metrics += result.metric_rows(split, eval_seed)
    return metrics, errors


def execute(config: RunConfig, *, loaded: LoadedData | None = None, data_root=None,
            device: str = "cpu", progress: bool = True, log=print, on_epoch=None,
            backdoored_state: dict[str, torch.Tensor] | None = None,
            protocols=None, save_every: int | None = None) -> RunResult:
    """Run one config without touching any store.

    ``on_epoch(history)`` is called after every training epoch (the driver records progress with
    it). A post-training defense repairs ``backdoored_state`` (the undefended model of the same
    setup) when given, and trains that model here first when not. ``protocols``: the evaluation
    protocols to run (default: every one the defense declares for the model). ``save_every``:
    keep the model's weights every that many epochs of training on the poisoned set, and at the
    end of each such training call (module docstring), in ``epoch_states``.
    """
    config.validate()
    keeper = KeepStates(save_every) if save_every is not None else None
    attack, defense = config.build_attack(), config.build_defense()
    loaded = loaded or load_data(config.dataset, data_root)
    key, setup_key = config.key(loaded.fingerprint), config.setup_key(loaded.fingerprint)
    stages: dict[str, float] = {}
    clock, processor = time.monotonic(), time.process_time()
    splits = run_splits(config, loaded)
    goal = (f"class {config.target}" if config.label_mode == "all-to-one"
            else "y + 1 (all-to-all)")
    log(f"[{key[:8]}] {config.dataset}: {len(splits.train)} train / {len(splits.validation)} "
        f"validation / {len(splits.reserve)} reserve / {len(splits.test)} test images; "
        f"{config.attack} {config.poison_ratio:.0%} -> {goal}; defense "
        f"{config.defense}; {config.model} width {config.width}")
    attack.fit(splits.train, seed=stream_seed(config.seed, "attack-fit"), device=device)
    poisoned = poison_training_set(attack, config, splits.train)
    stages["poison"] = time.monotonic() - clock
    info = dataset_info(config.dataset)
    history: list[dict] = []
    attack_hooks = attack.training_hooks(config.target, stream_seed(config.seed, "attack-hooks"))
    if attack_hooks and config.label_mode != "all-to-one":
        raise ValueError(f"attack {config.attack} edits training batches with hooks that "
                         "relabel to one target; it supports label_mode all-to-one only")
    calls = [0]

    def record_epoch(record):
        history.append(record)
        if on_epoch is not None:
            on_epoch(history)

    def train_model(model, data, hooks=(), **overrides):
        """The shared trainer with the run's settings (``overrides`` change TrainConfig fields).
        The attack's own hooks act only when training on the poisoned training set itself."""
        calls[0] += 1
        stream = "train" if calls[0] == 1 else f"train-{calls[0]}"
        own = list(attack_hooks) if data is poisoned.data else []
        # last of the hooks that may change the model, so it keeps what the next epoch starts from
        kept = [keeper] if keeper is not None and data is poisoned.data else []
        return train(model, data, dataclasses.replace(config.train, **overrides),
                     seed=stream_seed(config.seed, stream),
                     augmentation=Augmentation(info.crop_padding, info.flip), device=device,
                     progress=progress, description=f"[{key[:8]}] {config.defense}",
                     hooks=[*own, *hooks, *kept, EpochEndHook(record_epoch)])

    def fresh_model():
        torch.manual_seed(stream_seed(config.seed, "init"))
        return build_model(config, splits.train)

    def backdoored_model():
        state = backdoored_state
        if state is None:  # no store to reuse: train the undefended model of this setup here
            log(f"[{key[:8]}] training the undefended model of this setup first")
            state = execute(config.with_defense("none"), loaded=loaded, device=device,
                            progress=progress, log=log).model_state
        model = fresh_model()
        model.load_state_dict(state)
        return model

    context = DefenseContext(
        poisoned.data, fresh_model, train_model, seed=config.seed, device=device,
        clean_reserve=splits.reserve, clean_rights=defense.clean_data,
        backdoored_model=backdoored_model if defense.starts_from == "backdoored" else None)
    clock = time.monotonic()
    outcome = defense.defend(context)
    outcome = outcome if isinstance(outcome, DefenseResult) else DefenseResult(outcome)
    stages["defend"] = time.monotonic() - clock
    model = outcome.model
    clock = time.monotonic()
    metrics, errors = evaluate_model(config, model, attack, splits, protocols=protocols,
                                     device=device, progress=progress, log=log)
    stages["evaluate"] = time.monotonic() - clock
    if outcome.flagged is not None:
        metrics += detection_metrics(outcome.flagged, poisoned.is_poisoned)
    metrics += [dict(split="run", protocol="cost", metric=f"seconds.{stage}", value=seconds)
                for stage, seconds in stages.items()]
    # the processor time of the whole run, every thread of this process: unlike wall time it does
    # not grow while the process is paused or waits for a machine busy with other work
    metrics.append(dict(split="run", protocol="cost", metric="cpu_seconds",
                        value=time.process_time() - processor))
    # the CPU thread count changes the order of floating-point sums, and so the digits of a
    # retrained run (measured: about two points of ASR); kept so a rerun can match it
    extra = dict(data_fingerprint=loaded.fingerprint, poisoned=len(poisoned.poison_indices),
                 flipped_labels=poisoned.flipped_labels, device=device_description(device),
                 threads=torch.get_num_threads(),
                 split_sizes=dict(train=len(splits.train), validation=len(splits.validation),
                                  reserve=len(splits.reserve), test=len(splits.test)),
                 defense=outcome.extra)
    if keeper is not None:
        extra["epoch_checkpoints"] = dict(every=save_every, epochs=sorted(keeper.states))
    return RunResult(key, setup_key, config, "evaluation-failed" if errors else "finished",
                     metrics, history, sum(stages.values()),
                     model_state={name: tensor.detach().cpu().contiguous()
                                  for name, tensor in model.state_dict().items()},
                     attack_state=attack.fitted_state(),
                     error="; ".join(errors) or None, extra=extra,
                     epoch_states=keeper.states if keeper is not None else {})


# -- recording: the driver --------------------------------------------------------------------

def record(store: ResultStore, result: RunResult, token: str) -> RunResult:
    """Write a result into the store: files first (atomically), then its rows in one
    transaction. Intermediate checkpoints go beside the checkpoint as
    ``<key>.epoch<E>.safetensors``, listed in ``extra["epoch_checkpoints"]["files"]``."""
    checkpoint = store.write_tensors(f"{result.key}.safetensors", result.model_state)
    attack_state = (store.write_tensors(f"{result.key}.attack.safetensors", result.attack_state)
                    if result.attack_state else None)
    if "epoch_checkpoints" in result.extra:
        files = [store.write_tensors(epoch_checkpoint_name(result.key, epoch), state)
                 for epoch, state in sorted(result.epoch_states.items())]
        result.extra = {**result.extra, "epoch_checkpoints": {
            **result.extra["epoch_checkpoints"], "files": files}}
    store.complete(result.key, token, status=result.status, history=result.history,
                   metrics=result.metrics, wall_seconds=result.wall_seconds,
                   checkpoint=checkpoint, attack_state=attack_state, error=result.error,
                   extra=result.extra)
    result.checkpoint = checkpoint
    return result


def epoch_checkpoint_name(key: str, epoch: int) -> str:
    return f"{key}.epoch{epoch}.safetensors"


def missing_epoch_checkpoints(store: ResultStore, run: StoredRun, every: int | None) -> str | None:
    """Why a stored run lacks the intermediate checkpoints every ``every`` epochs (None: it has
    them, or none were asked for)."""
    if every is None:
        return None
    kept = run.extra.get("epoch_checkpoints")
    if not kept:
        return "it kept no intermediate checkpoints"
    if kept.get("every") != every:
        return f"it kept them every {kept.get('every')} epochs"
    files = kept.get("files", [])
    if len(files) != len(kept.get("epochs", [])) or not all(
            store.resolve(path).is_file() for path in files):
        return "its intermediate checkpoint files are not in this store"
    return missing_checkpoint(store, run)


def recorded_threads(run: StoredRun) -> int | None:
    """The CPU thread count a stored run was trained with (None where not recorded)."""
    for value in ((run.extra or {}).get("threads"), (run.versions or {}).get("threads")):
        if isinstance(value, int) and value >= 1:
            return value
    match = re.search(r"(\d+) threads", str((run.extra or {}).get("device", "")))
    return int(match.group(1)) if match else None


def missing_checkpoint(store: ResultStore, run: StoredRun) -> str | None:
    """Why a stored run's final weights are not in this store (None: they are). A run imported
    from a JSONL export has its metrics but no weights."""
    if not run.checkpoint:
        return "its checkpoint is not in this store (an imported run has none)"
    if not store.resolve(run.checkpoint).is_file():
        return f"its checkpoint file {run.checkpoint} is missing"
    return None


def missing_weights(store: ResultStore, run: StoredRun, every: int | None,
                    need_checkpoint: bool = True) -> tuple[str | None, str]:
    """Why a stored run must be trained again (None: it need not), and what for: its
    checkpoints every ``every`` epochs when asked, else (with ``need_checkpoint``) its final
    weights."""
    if every is not None:
        return (missing_epoch_checkpoints(store, run, every),
                f"to keep its weights every {every} epochs")
    return (missing_checkpoint(store, run) if need_checkpoint else None), "for its weights"


def stored_result(store: ResultStore, run: StoredRun, config: RunConfig) -> RunResult:
    return RunResult(run.key, run.setup_key or "", config, run.status, store.metrics(run.key),
                     run.history, run.wall_seconds or 0.0, error=run.error, extra=run.extra,
                     cached=True, checkpoint=run.checkpoint)


def run(config: RunConfig, store: ResultStore, *, device: str = "cpu", data_root=None,
        force: bool = False, progress: bool = True, log=print, poll_seconds: float = 5.0,
        loaded: LoadedData | None = None, protocols=None,
        save_every: int | None = None, need_checkpoint: bool = False) -> RunResult:
    """Run one config and record it, or return its stored result if it has finished before.

    The key is claimed first: if another live process holds it, this one waits for its result
    instead of training it twice; a claim whose process died is taken over. ``force`` removes
    the stored run, its metrics and files, and runs it again. ``save_every``: also keep the
    model's weights every that many epochs (:func:`execute`); a finished run that lacks them, or
    kept them at another interval, is trained again (same key, same metrics) and replaced.
    ``need_checkpoint``: a finished run whose final weights are not in the store (imported from
    an export, or its file deleted) is trained again the same way.
    """
    config.validate()  # every setting checked before the data loads
    if save_every is not None:
        KeepStates(save_every)  # a bad interval fails before the data loads
    loaded = loaded or load_data(config.dataset, data_root)
    key, setup_key = config.key(loaded.fingerprint), config.setup_key(loaded.fingerprint)
    with ExitStack() as stack:  # a run trained again uses its recorded CPU thread count
        waiting = retrain = announced = False
        while True:
            claim = store.claim(key, setup_key, config.resolved(), library_versions(), git_commit(),
                                device_description(device), force=force, retrain=retrain)
            if claim.state == "finished":
                missing, wanted = missing_weights(store, claim.run, save_every, need_checkpoint)
                if missing is None:
                    return stored_result(store, claim.run, config)
                if not announced:
                    threads = recorded_threads(claim.run)
                    if threads is not None:  # from here on: the claim records it, training uses it
                        stack.enter_context(thread_count(threads))
                    log(f"[{key[:8]}] training it again {wanted} ({missing}); training is "
                        "deterministic, so its metrics stay the same"
                        + (f" (on its recorded {threads} CPU threads)" if threads else ""))
                    announced = True
                retrain = True  # its record stands until the new one is complete
                continue
            if claim.state == "claimed":
                break
            if not waiting:
                log(f"[{key[:8]}] is being run by pid {claim.run.pid} on {claim.run.host}; "
                    "waiting for its result")
                waiting, force, retrain = True, False, False  # then look at it afresh
            time.sleep(poll_seconds)
        token = claim.token
        try:
            with store.heartbeat(key, token):
                backdoored_state = None
                if config.build_defense().starts_from == "backdoored":
                    reference = run(config.with_defense("none"), store, device=device,
                                    progress=progress, log=log, loaded=loaded,
                                    need_checkpoint=True)
                    backdoored_state = load_checkpoint(store, store.get_run(reference.key))
                result = execute(config, loaded=loaded, device=device, progress=progress, log=log,
                                 on_epoch=lambda history: store.update_history(key, token, history),
                                 backdoored_state=backdoored_state, protocols=protocols,
                                 save_every=save_every)
                return record(store, result, token)
        except BaseException as error:  # an interrupted run is marked; finished ones stay
            store.fail(key, token, f"{type(error).__name__}: {error}")
            raise


# -- re-evaluating a stored run ---------------------------------------------------------------

def load_checkpoint(store: ResultStore, run: StoredRun) -> dict[str, torch.Tensor]:
    return store.read_tensors(run.checkpoint, "checkpoint", run.key)


def load_run_model(store: ResultStore, run: StoredRun, data: ImageSet) -> nn.Module:
    """Rebuild a stored run's model (with its defense's layers) and load its checkpoint."""
    config = RunConfig.from_dict(run.config)
    model = config.build_defense().prepare_model(build_model(config, data))
    model.load_state_dict(load_checkpoint(store, run))
    return model


def load_run_splits(run: StoredRun, data_root=None) -> tuple[RunConfig, Splits]:
    """A stored run's config and its splits, from data files checked to be the ones it was
    trained on (the fingerprint recorded with the run)."""
    config = RunConfig.from_dict(run.config)
    loaded = load_data(config.dataset, data_root)
    recorded = run.extra.get("data_fingerprint")
    if recorded and recorded != loaded.fingerprint:
        raise ValueError(f"the {config.dataset} files found (fingerprint {loaded.fingerprint}) "
                         f"are not the data run {run.key[:8]} was trained on ({recorded}): "
                         "pass the original files with --data-root")
    return config, run_splits(config, loaded)


def load_run_attack(store: ResultStore, run: StoredRun):
    """The attack the run's model was poisoned with, with its fitted state restored."""
    attack = RunConfig.from_dict(run.config).build_attack()
    if run.attack_state:
        attack.load_fitted_state(store.read_tensors(run.attack_state, "fitted attack state",
                                                    run.key))
    attack.check_fitted()
    return attack


@dataclass
class RebuiltRun:
    """A stored run rebuilt from its record: its splits, fitted attack, poisoned training set
    and trained model, exactly as the run made them (for the harness's probes and analyses)."""
    run: StoredRun
    config: RunConfig
    splits: Splits
    attack: object
    poisoned: object  # the PoisonedSet the run trained on
    model: nn.Module


def rebuild_run(store: ResultStore, run: StoredRun, *, data_root=None) -> RebuiltRun:
    """Everything a stored run trained on and produced; its model in evaluation mode."""
    config, splits = load_run_splits(run, data_root)
    attack = load_run_attack(store, run)
    poisoned = poison_training_set(attack, config, splits.train)
    model = load_run_model(store, run, splits.train).eval()
    return RebuiltRun(run, config, splits, attack, poisoned, model)


def reevaluate(store: ResultStore, run: StoredRun, *, data_root=None, protocols=None,
               eval_seed: int = 0, device: str = "cpu", progress: bool = True,
               log=print) -> list[dict]:
    """Evaluate a stored run's checkpoint again (also one whose evaluation failed) and record
    the metrics; the run becomes finished when every protocol succeeds."""
    if run.status not in ("finished", "evaluation-failed"):
        raise ValueError(f"run {run.key} is {run.status}: only a trained run can be evaluated "
                         "(run it again to train it)")
    config, splits = load_run_splits(run, data_root)
    model = load_run_model(store, run, splits.train)
    attack = load_run_attack(store, run)
    metrics, errors = evaluate_model(config, model, attack, splits, protocols=protocols,
                                     eval_seed=eval_seed, device=device, progress=progress,
                                     log=log)
    store.record_evaluation(run.key, metrics,
                            status="evaluation-failed" if errors else "finished",
                            error="; ".join(errors) or None)
    if errors:
        raise ValueError("evaluation failed: " + "; ".join(errors))
    return metrics
