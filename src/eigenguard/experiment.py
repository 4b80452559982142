"""One run: RunConfig -> poison -> defend (train) -> evaluate -> result store.

A run is a pure function of its config: the same config gives the same poisoned indices, model and
metrics (bitwise on CPU with the same thread count and library versions). The hash of the resolved
config is the run's key, so running a finished config again returns the stored result at once.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy
import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .attacks import create_attack
from .data import ImageSet, dataset_info, load_dataset
from .defenses import DefenseContext, create_defense
from .evaluate import Evaluation, evaluate, protocols_for
from .models.registry import create_model, get_model_factory
from .store import ResultStore, StoredRun
from .train import Augmentation, TrainConfig, train

#: bump when a change to the code makes old results incomparable
CONFIG_VERSION = 1


def _settings_tuple(settings) -> tuple:
    items = settings.items() if isinstance(settings, dict) else settings
    return tuple(sorted((str(key), value) for key, value in items))


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run's result; hashable, and hashed into the run's key."""

    dataset: str = "fashion-mnist"
    model: str = "preact_resnet18"
    width: int = 16
    attack: str = "badnets"
    attack_settings: tuple = ()
    poison_ratio: float = 0.1
    target: int = 0
    defense: str = "none"
    defense_settings: tuple = ()
    train: TrainConfig = TrainConfig()
    seed: int = 0
    train_size: int | None = None  # None: the whole training set; else a seeded random subset
    test_size: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "attack_settings", _settings_tuple(self.attack_settings))
        object.__setattr__(self, "defense_settings", _settings_tuple(self.defense_settings))

    def build_attack(self):
        return create_attack(self.attack, **dict(self.attack_settings))

    def build_defense(self):
        return create_defense(self.defense, **dict(self.defense_settings))

    def validate(self) -> None:
        """Fail on a bad name or setting before any data is loaded."""
        dataset_info(self.dataset)
        get_model_factory(self.model)
        self.build_attack()
        self.build_defense()

    def resolved(self) -> dict:
        """The config as plain data with every attack and defense setting spelled out."""
        data = dataclasses.asdict(self)
        data["attack_settings"] = self.build_attack().settings()
        data["defense_settings"] = self.build_defense().settings()
        data["version"] = CONFIG_VERSION
        return data

    def key(self) -> str:
        text = json.dumps(self.resolved(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        data = {k: v for k, v in data.items() if k != "version"}
        data["train"] = TrainConfig(**data.get("train", {}))
        return cls(**data)


PRESETS = {
    "fast": {},
    # BackdoorBench's full CIFAR-10 setting, for users with a GPU
    "backdoorbench": dict(width=64, train=TrainConfig(epochs=100, lr=0.01, schedule="cosine")),
}


@dataclass
class RunResult:
    key: str
    config: RunConfig
    evaluations: list[dict]
    history: list[dict]
    wall_seconds: float
    cached: bool
    checkpoint: str | None = None
    extra: dict = field(default_factory=dict)


def library_versions() -> dict:
    return dict(eigenguard=__version__, torch=torch.__version__, numpy=numpy.__version__,
                python=platform.python_version(), threads=torch.get_num_threads())


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


def _subset(data: ImageSet, size: int | None, seed: int) -> ImageSet:
    if size is None or size >= len(data):
        return data
    generator = torch.Generator().manual_seed(seed)
    return data.subset(torch.randperm(len(data), generator=generator)[:size].sort().values)


def load_data(config: RunConfig, data_root: str | None = None) -> tuple[ImageSet, ImageSet]:
    train_set = load_dataset(config.dataset, "train", root=data_root)
    test_set = load_dataset(config.dataset, "test", root=data_root)
    return (_subset(train_set, config.train_size, config.seed),
            _subset(test_set, config.test_size, config.seed + 1))


def build_model(config: RunConfig, data: ImageSet) -> torch.nn.Module:
    return create_model(config.model, in_channels=data.in_channels, num_classes=data.num_classes,
                        width=config.width)


def load_run_model(run: StoredRun, data: ImageSet) -> torch.nn.Module:
    """Rebuild a finished run's model (with its defense's layers) and load its checkpoint."""
    if not run.checkpoint or not Path(run.checkpoint).exists():
        raise FileNotFoundError(f"run {run.key} has no checkpoint at {run.checkpoint!r}; "
                                "run it again with --force to retrain")
    config = RunConfig.from_dict(run.config)
    model = config.build_defense().prepare_model(build_model(config, data))
    model.load_state_dict(load_file(run.checkpoint))
    return model


def evaluate_and_store(store: ResultStore, key: str, config: RunConfig, model, test: ImageSet,
                       protocols, *, device="cpu", progress=True, eval_seed: int = 0) -> list[dict]:
    attack = config.build_attack()
    results = []
    for protocol in protocols:
        evaluation = evaluate(model, test, attack, config.target, protocol, seed=eval_seed,
                              device=device, progress=progress).as_dict()
        store.add_evaluation(key, evaluation, eval_seed)
        results.append(evaluation)
    return results


def run(config: RunConfig, store: ResultStore, *, device: str = "cpu", data_root: str | None = None,
        force: bool = False, progress: bool = True, log=print) -> RunResult:
    """Run one config, or return its stored result if it has finished before."""
    key = config.key()
    stored = store.get_run(key)
    if stored is not None and stored.status == "finished" and not force:
        return RunResult(key, config, store.evaluations(key), stored.history,
                         stored.wall_seconds or 0.0, cached=True, checkpoint=stored.checkpoint)
    config.validate()
    attack, defense = config.build_attack(), config.build_defense()
    start = time.monotonic()
    train_set, test_set = load_data(config, data_root)
    info = dataset_info(config.dataset)
    log(f"[{key}] {config.dataset}: {len(train_set)} train / {len(test_set)} test images; "
        f"{config.attack} {config.poison_ratio:.0%} -> class {config.target}; "
        f"defense {config.defense}; {config.model} width {config.width}")
    poisoned = attack.fit(train_set).poison(train_set, config.poison_ratio, config.target,
                                            config.seed)
    store.start_run(key, config.resolved(), library_versions(), git_commit())
    history: list[dict] = []

    def record_epoch(record):
        history.append(record)
        store.update_history(key, history)

    def train_model(model, data):
        return train(model, data, config.train, seed=config.seed + 2,
                     augmentation=Augmentation(info.crop_padding, info.flip), device=device,
                     progress=progress, description=f"[{key}] {config.defense}",
                     on_epoch_end=record_epoch)

    def fresh_model():
        torch.manual_seed(config.seed)
        return build_model(config, train_set)

    try:
        model = defense.defend(DefenseContext(poisoned, fresh_model, train_model))
        checkpoint = store.checkpoint_dir / f"{key}.safetensors"
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        save_file({name: tensor.detach().cpu().contiguous()
                   for name, tensor in model.state_dict().items()}, str(checkpoint))
        evaluations = evaluate_and_store(store, key, config, model, test_set,
                                         protocols_for(model), device=device, progress=progress)
    except BaseException as error:  # an interrupted run is marked, finished ones stay
        store.fail_run(key, f"{type(error).__name__}: {error}")
        raise
    wall = time.monotonic() - start
    summary = {e["protocol"]: {m: e[m] for m in ("acc", "asr", "ra")} for e in evaluations}
    store.finish_run(key, history, summary, wall, str(checkpoint))
    return RunResult(key, config, evaluations, history, wall, cached=False,
                     checkpoint=str(checkpoint))
