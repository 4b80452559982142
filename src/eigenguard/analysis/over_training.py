"""Effective rank and ASR over training (the source's Figure 1), from a run's intermediate
checkpoints (``--save-every N``: :class:`eigenguard.train.KeepStates`).

For each kept epoch the checkpoint is loaded into the run's own model builder (its defense's
layers included, as :func:`eigenguard.experiment.load_run_model` does) and measured on:

- the effective rank of the features at each stage's output and at each EigenGuard layer's input,
  for the clean, the triggered and the mixed images of :mod:`.samples` (the same images at every
  epoch). A layer's output is left out: in its running mode it is what the stage it follows hands
  on, so the stage's point already shows it;
- the label-conditional spectral signatures of the mixed images (:mod:`.signatures`) at each of
  those points: the poison label's top-to-second energy ratio against the other labels' largest,
  its poisoned rows' separation along its top direction, and the accuracy of the two-means cut
  along it. Whether the poison label stands out
  before the backdoor is learned says whether a defense acting during training could find it in
  time;
- ASR and ACC on a fixed seeded draw of :data:`ASR_IMAGES` test images (the same at every epoch;
  a subset keeps E evaluations cheap), under the batch-independent protocol of a model with
  EigenGuard layers that keep running statistics (``running``) and the standard ``triggered``
  protocol otherwise.

A run that lacks the checkpoints is trained again first (:func:`ensure_epoch_checkpoints`):
training is deterministic, so the retrained run has the same key and metrics, and its epochs are
those of the run analysed. A post-training defense trains nothing on the poisoned set (its
undefended run does), so its runs are refused with the run to analyse instead.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..attacks.registry import attack_label
from ..evaluate import evaluate
from ..experiment import (RunConfig, build_model, load_run_attack, load_run_splits,
                          missing_weights, poison_training_set, run)
from ..layer import find_guards
from ..seeding import generator
from ..splits import load_data
from ..store import ResultStore, StoredRun
from ..train import KeepStates
from . import figures
from .capture import GUARD_OUTPUT, capture_features, capture_points
from .samples import AnalysisSamples, draw_samples
from .signatures import label_signatures
from .spectrum import effective_rank

#: test images drawn (with the analysis seed) for the ASR and ACC of each epoch
ASR_IMAGES = 1000
#: the kinds of images and the store protocol of analysis rows, as in :mod:`.analyze`
KINDS = ("clean", "triggered", "mix")
#: the label-signature numbers followed over training (:func:`.signatures.label_signatures`)
SIGNATURE_NUMBERS = ("poison_label_ratio", "max_other_ratio", "separation", "split_accuracy")
PROTOCOL = "analysis"


@dataclass
class OverTraining:
    """The numbers of one run over its kept epochs."""

    key: str
    label: str
    every: int
    epochs: list[int] = field(default_factory=list)
    points: list[str] = field(default_factory=list)
    #: epoch -> point -> kind -> effective rank
    effective_rank: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    #: epoch -> point -> SIGNATURE_NUMBERS name -> value, on the mixed images
    signatures: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    asr: dict[int, float] = field(default_factory=dict)
    acc: dict[int, float] = field(default_factory=dict)
    protocol: dict[int, str] = field(default_factory=dict)  # the ASR's protocol per epoch
    test_images: int = 0
    figures: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    def series(self, kind: str) -> dict[str, list[float]]:
        """Point -> effective rank of ``kind`` features per epoch (one line of a figure)."""
        return {point: [self.effective_rank[epoch][point][kind] for epoch in self.epochs]
                for point in self.points}

    def metric_rows(self) -> list[dict]:
        """``epoch<E>.<point>.effective_rank.<kind>``, ``epoch<E>.asr`` and ``epoch<E>.acc``
        (split train, protocol analysis, as every analysis row)."""
        rows = []
        for epoch in self.epochs:
            for point, ranks in self.effective_rank[epoch].items():
                rows += [dict(split="train", protocol=PROTOCOL,
                              metric=f"epoch{epoch}.{point}.effective_rank.{kind}", value=value)
                         for kind, value in ranks.items() if math.isfinite(value)]
            for point, found in self.signatures.get(epoch, {}).items():
                rows += [dict(split="train", protocol=PROTOCOL,
                              metric=f"epoch{epoch}.{point}.label_signature.{name}", value=value)
                         for name, value in found.items() if math.isfinite(value)]
            rows += [dict(split="train", protocol=PROTOCOL, metric=f"epoch{epoch}.{name}",
                          value=float(values[epoch]))
                     for name, values in (("asr", self.asr), ("acc", self.acc))]
        return rows

    def as_json(self) -> dict:
        return {"every": self.every, "epochs": self.epochs, "points": self.points,
                "test_images": self.test_images,
                "protocol": {str(e): p for e, p in self.protocol.items()},
                "asr": {str(e): v for e, v in self.asr.items()},
                "acc": {str(e): v for e, v in self.acc.items()},
                "effective_rank": {str(e): v for e, v in self.effective_rank.items()},
                "label_signatures": {str(e): v for e, v in self.signatures.items()},
                "figures": [path.name for path in self.figures],
                "seconds": round(self.seconds, 1)}

    def markdown(self) -> str:
        """One row per epoch: ASR and ACC (%), and at each point the effective rank of the
        clean / triggered / mixed features."""
        heads = [f"{point} eff. rank c / t / m" for point in self.points]
        lines = [f"Over training, run {self.key[:8]} ({self.label}): checkpoints every "
                 f"{self.every} epochs, ASR and ACC on {self.test_images} test images", "",
                 "| epoch | protocol | ASR % | ACC % | " + " | ".join(heads) + " |",
                 "|---|---|---|---|" + "---|" * len(heads)]
        for epoch in self.epochs:
            cells = [" / ".join(f"{self.effective_rank[epoch][point][kind]:.2f}"
                                for kind in KINDS) for point in self.points]
            lines.append(f"| {epoch} | {self.protocol[epoch]} | {100 * self.asr[epoch]:.1f} | "
                         f"{100 * self.acc[epoch]:.1f} | " + " | ".join(cells) + " |")
        if any(self.signatures.values()):
            lines += ["", "Label-conditional signatures of the mixed images over training: the "
                      "poison label's σ₁²/σ₂² / the other labels' largest / the poisoned rows' "
                      "separation along its top direction (sd) / the accuracy of the two-means "
                      "split along it", "",
                      "| epoch | ASR % | " + " | ".join(self.points) + " |",
                      "|---|---|" + "---|" * len(self.points)]
            for epoch in self.epochs:
                found = self.signatures.get(epoch, {})
                cells = [" / ".join(f"{found[point][name]:.2f}" for name in SIGNATURE_NUMBERS)
                         if point in found else "-" for point in self.points]
                lines.append(f"| {epoch} | {100 * self.asr[epoch]:.1f} | "
                             + " | ".join(cells) + " |")
        return "\n".join(lines)


def _undefended_runs(store: ResultStore, stored: StoredRun) -> list[str]:
    return [other.key[:8] for other in store.runs_of_setup(stored.setup_key or "")
            if other.config.get("defense") == "none"]


def ensure_epoch_checkpoints(store: ResultStore, stored: StoredRun, every: int | None, *,
                             data_root=None, device="cpu", progress: bool = False,
                             log=print) -> StoredRun:
    """The stored run with checkpoints every ``every`` epochs (``None``: with its final
    checkpoint only): itself if it has them, else the run trained again with its own config
    through :func:`eigenguard.experiment.run` (same key; its row, metrics and files replaced).
    A run imported from an export has no weights at all."""
    config = RunConfig.from_dict(stored.config)
    if every is not None:
        KeepStates(every)  # a bad interval fails before anything loads
        if config.build_defense().starts_from == "backdoored":
            others = _undefended_runs(store, stored)
            raise ValueError(
                f"run {stored.key[:8]} ({config.defense}) repairs the undefended model of its "
                "setup and trains nothing on the poisoned set, so it has no training to follow: "
                "analyse the undefended run over training instead"
                + (f" ({', '.join(others)})" if others else " (run it with --defense none)"))
    missing, wanted = missing_weights(store, stored, every)
    if missing is None:
        return stored
    loaded = load_data(config.dataset, data_root)
    key = config.key(loaded.fingerprint)
    if key != stored.key:
        raise ValueError(
            f"run {stored.key[:8]} has to be trained again {wanted} ({missing}), but its config "
            f"with these {config.dataset} files makes another key ({key[:8]}): pass the "
            "original files with --data-root (or the run was stored by an older version)")
    if stored.status != "finished":  # run() explains a finished run's retraining itself
        log(f"[{stored.key[:8]}] training it again {wanted} ({missing}; its evaluation had "
            "failed)")
    result = run(config, store, device=device, data_root=data_root, progress=progress,
                 log=log, loaded=loaded, save_every=every, need_checkpoint=True)
    return store.get_run(result.key)


def asr_test_draw(test, seed: int, count: int = ASR_IMAGES):
    """``count`` test images drawn with the analysis seed, in their original order."""
    chosen = torch.randperm(len(test), generator=generator(seed, "analysis-over-training-test"))
    return test.subset(chosen[:count].sort().values)


def followed_points(model) -> dict:
    """Every stage's output and each EigenGuard layer's input (not its output: see the module
    docstring)."""
    outputs = {f"{name}.{GUARD_OUTPUT}" for name, _ in find_guards(model)}
    return {name: point for name, point in capture_points(model).items() if name not in outputs}


def analyze_over_training(store: ResultStore, stored: StoredRun, *, folder, count: int = 1000,
                          seed: int = 0, samples: AnalysisSamples | None = None,
                          test_images: int = ASR_IMAGES, data_root=None, device="cpu",
                          log=print) -> OverTraining:
    """Effective rank per capture point and kind of image, and ASR / ACC, at each kept epoch of
    a run that has intermediate checkpoints; one PNG per kind of image in ``folder``. The rows
    are returned (:meth:`OverTraining.metric_rows`), not recorded: the caller records them.
    ``samples``: the images of the run's other analyses (drawn here, ``count`` of each kind, when
    not given)."""
    clock = time.monotonic()
    kept = stored.extra.get("epoch_checkpoints")
    if not kept:
        raise ValueError(f"run {stored.key[:8]} has no intermediate checkpoints: analyse it with "
                         "--save-every N (which trains it again to keep them)")
    config = RunConfig.from_dict(stored.config)
    label = (f"{attack_label(config.attack, config.attack_settings)} "
             f"{config.poison_ratio:.0%}, {config.defense}")
    if not kept.get("epochs"):
        raise ValueError(f"run {stored.key[:8]} ({label}) kept no epoch: it trained nothing on "
                         "the poisoned set")
    splits = load_run_splits(stored, data_root)[1]
    attack = load_run_attack(store, stored)
    if samples is None:
        poisoned = poison_training_set(attack, config, splits.train)
        samples = draw_samples(splits.train, poisoned, attack, config, count=count, seed=seed)
    test = asr_test_draw(splits.test, seed, test_images)
    defense = config.build_defense()
    result = OverTraining(stored.key, label, int(kept["every"]), test_images=len(test))
    log(f"[{stored.key[:8]}] over training: {len(kept['epochs'])} checkpoints (every "
        f"{kept['every']} epochs), ASR on {len(test)} test images")
    for epoch, path in zip(kept["epochs"], kept["files"]):
        model = defense.prepare_model(build_model(config, splits.train))
        model.load_state_dict(store.read_tensors(path, f"epoch {epoch} checkpoint", stored.key))
        points = followed_points(model)
        ranks: dict[str, dict[str, float]] = {point: {} for point in points}
        for kind in KINDS:
            features = capture_features(model, getattr(samples, kind), samples.data,
                                        points=points, device=device)
            for point, feats in features.items():
                ranks[point][kind] = effective_rank(feats)
            if kind == "mix" and samples.mix_poisoned.any():
                result.signatures[int(epoch)] = {
                    point: {name: float(found[name]) for name in SIGNATURE_NUMBERS}
                    for point, feats in features.items()
                    for found in [label_signatures(feats, samples.mix_labels,
                                                   samples.mix_poisoned)]}
        protocol = "running" if "running" in defense.protocols_for(model) else "triggered"
        evaluation = evaluate(model, test, attack, config.target, protocol, device=device,
                              progress=False, defense=defense, label_mode=config.label_mode)
        result.epochs.append(int(epoch))
        result.effective_rank[int(epoch)] = ranks
        result.asr[int(epoch)], result.acc[int(epoch)] = evaluation.asr, evaluation.acc
        result.protocol[int(epoch)] = protocol
        result.points = result.points or list(points)
        log(f"[{stored.key[:8]}] epoch {epoch}: ASR {100 * evaluation.asr:.1f}% ({protocol}), "
            f"ACC {100 * evaluation.acc:.1f}%")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rates = [result.asr[epoch] for epoch in result.epochs]
    for kind in KINDS:
        result.figures.append(figures.plot_over_training(
            folder / f"over-training-{kind}.png", result.epochs, result.series(kind), rates,
            title=f"{stored.key[:8]} ({label}):\neffective rank of the {kind} features over "
                  "training"))
    result.seconds = time.monotonic() - clock
    return result
