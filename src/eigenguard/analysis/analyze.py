"""``eigenguard analyze``: the spectral analyses of a stored run, as numbers, PNGs and store rows.

For each capture point of the run's model (every stage's output, and each EigenGuard layer's
input and its output in running and in batch mode; :mod:`.capture`) on the three kinds of
images of :mod:`.samples` (clean, the same images triggered, a mix at the poison ratio):

- the effective rank of the clean, the triggered and the mixed features (the source's Table 2);
- the singular spectrum of the mix and the triggered rows' share of its top-k energy against
  their share of the rows (above it: the trigger concentrates in the top k directions);
- the fraction of the trigger's mean feature shift f(x + t) − f(x), and of each image's shift,
  inside the span of the clean features' top k directions; at an EigenGuard layer's input also
  inside its *running* top-k subspace, the one its running mode equalises, all else being damped;
- a t-SNE of the features at the layer's input (or after ``layer1``), projected on the top-k
  eigenspace and on the rest (the source's Figure 2).
- label by label in the mix (labels as trained on), the top-to-second energy ratio of the
  centred features, and how far the poisoned rows sit from the clean ones of their label along
  its top direction (:mod:`.signatures`: would a class-conditional statistic see the poison?).

k is the run's EigenGuard k, or the layer's default (16) for an undefended run. The numbers go
into the store as metric rows of split ``train``, protocol ``analysis`` (so they travel with
``eigenguard export``), into ``analysis.json`` and ``analysis.md`` beside the figures.

With ``save_every`` N, the same numbers over training (effective rank and ASR per kept epoch,
the source's Figure 1; :mod:`.over_training`), from checkpoints kept every N epochs; a run that
lacks them is trained again first (same key, same metrics).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..attacks.helpers import single_thread
from ..attacks.registry import attack_label
from ..layer import EigenGuard, find_guards
from ..store import ResultStore, StoredRun
from . import figures
from .capture import GUARD_INPUT, GUARD_OUTPUT, capture_features, running_directions
from .over_training import OverTraining, analyze_over_training, ensure_epoch_checkpoints
from .samples import load_for_analysis
from .signatures import label_signatures
from .spectrum import (effective_rank, shift_alignment, spectrum, split_projection,
                       triggered_share_per_direction, triggered_share_summary, tsne_embedding)

#: k for a run without an EigenGuard layer: the layer's default
DEFAULT_K = EigenGuard().k
#: directions of the clean spectrum kept for the shift curves (beyond any k of interest)
CURVE_DIRECTIONS = 64
#: the protocol name of analysis rows in the store
PROTOCOL = "analysis"
KINDS = ("clean", "triggered", "mix")


@dataclass
class RunAnalysis:
    key: str
    label: str
    k: int
    points: dict[str, dict] = field(default_factory=dict)  # point -> numbers
    figures: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    over_training: OverTraining | None = None  # with save_every

    def metric_rows(self) -> list[dict]:
        rows = [dict(split="train", protocol=PROTOCOL, metric="k", value=float(self.k))]
        if self.over_training is not None:
            rows += self.over_training.metric_rows()
        for point, numbers in self.points.items():
            rows += [dict(split="train", protocol=PROTOCOL, metric=f"{point}.{name}",
                          value=float(value)) for name, value in numbers.items()
                     if isinstance(value, (int, float)) and math.isfinite(value)]
        return rows


def _guard_mode_points(model) -> dict[str, tuple]:
    return {f"{name}.{GUARD_OUTPUT}": (layer, GUARD_OUTPUT) for name, layer in find_guards(model)}


def collect_features(model, samples, *, device="cpu") -> dict[str, dict[str, torch.Tensor]]:
    """Point -> kind -> features. Guard outputs in batch mode get their own point
    (``<layer>.out.batch``): each batch of 128 images of one kind filtered as a batch."""
    features = {kind: capture_features(model, getattr(samples, kind), samples.data,
                                       device=device) for kind in KINDS}
    batch_points = _guard_mode_points(model)
    if batch_points:
        for kind in KINDS:
            batch = capture_features(model, getattr(samples, kind), samples.data,
                                     points=batch_points, guard_mode="batch", device=device)
            features[kind].update({f"{name}.batch": value for name, value in batch.items()})
    return {point: {kind: features[kind][point] for kind in KINDS}
            for point in features["clean"]}


def point_numbers(feats: dict[str, torch.Tensor], poisoned: torch.Tensor, k: int,
                  running: torch.Tensor | None = None,
                  labels: torch.Tensor | None = None) -> tuple[dict, dict]:
    """The numbers of one capture point, and the curves its figures draw. ``labels``: the mix's
    labels as trained on, for the label-conditional signatures (:mod:`.signatures`)."""
    clean = spectrum(feats["clean"], top=CURVE_DIRECTIONS)
    mix = spectrum(feats["mix"], all_left=True)
    spectra = {"clean": clean.values, "triggered": spectrum(feats["triggered"]).values,
               "mix": mix.values}
    numbers = {f"effective_rank.{kind}": effective_rank(values)
               for kind, values in spectra.items()}
    curves = {"spectra": spectra}
    row_share = float(poisoned.double().mean())
    if 0 < row_share < 1:
        shares = triggered_share_per_direction(mix, poisoned)
        summary = triggered_share_summary(shares, mix.values, row_share, k)
        numbers.update({"poisoned_share_top_k": summary["top_share"],
                        "poisoned_enrichment_top_k": summary["top_enrichment"],
                        "poisoned_energy_in_top_k": summary["triggered_energy_in_top"],
                        "clean_energy_in_top_k": summary["clean_energy_in_top"]})
        curves["shares"], curves["row_share"] = shares, row_share
        if labels is not None:
            found = label_signatures(feats["mix"], labels, poisoned)
            numbers.update({f"label_signature.{name}": float(found[name]) for name in (
                "poison_label_ratio", "max_other_ratio", "poison_label_has_max_ratio",
                "separation", "split_accuracy")})
    if len(clean.right) >= k:
        alignment = shift_alignment(feats["clean"], feats["triggered"], clean.right)
        numbers.update({"shift_in_top_k": float(alignment["cumulative"][k]),
                        "sample_shift_in_top_k": float(alignment["per_sample_cumulative"][k]),
                        "shift_consistency": alignment["consistency"],
                        "shift_to_spread": alignment["shift_to_spread"],
                        "sample_shift_to_spread": alignment["sample_shift_to_spread"]})
        curves["shift"] = alignment["cumulative"]
    if running is not None:
        alignment = shift_alignment(feats["clean"], feats["triggered"], running)
        numbers.update({"shift_in_running_top_k": float(alignment["cumulative"][-1]),
                        "sample_shift_in_running_top_k":
                            float(alignment["per_sample_cumulative"][-1])})
    return numbers, curves


def tsne_point(model, points) -> str:
    """Where the t-SNE looks: the first EigenGuard layer's input, else after ``layer1``, else
    the second stage (the first one's features are nearly the pixels)."""
    for name in points:
        if name.endswith(f".{GUARD_INPUT}"):
            return name
    stages = list(model.stage_names)
    return "layer1" if "layer1" in stages else stages[min(1, len(stages) - 1)]


def analyze_run(store: ResultStore, run: StoredRun, *, out_dir, count: int = 1000,
                k: int | None = None, seed: int = 0, data_root=None, device="cpu",
                tsne: bool = True, log=print, save_every: int | None = None,
                progress: bool = False) -> RunAnalysis:
    """Every analysis of one stored run; figures and numbers under ``out_dir/<key[:8]>/``,
    numbers recorded in the store. ``save_every``: also the analysis over training, from
    checkpoints every that many epochs. A run that lacks the checkpoints it needs (imported
    from an export, or kept no intermediate ones) is trained again first, with ``progress``
    bars."""
    # before single_thread: a retraining wants every thread
    run = ensure_epoch_checkpoints(store, run, save_every, data_root=data_root, device=device,
                                   progress=progress, log=log)
    with single_thread():  # the N × N eigendecompositions lose many times over to contention
        return _analyze_run(store, run, out_dir=out_dir, count=count, k=k, seed=seed,
                            data_root=data_root, device=device, tsne=tsne, log=log,
                            over_training=save_every is not None)


def _analyze_run(store, run, *, out_dir, count, k, seed, data_root, device, tsne, log,
                 over_training=False):
    clock = time.monotonic()
    loaded = load_for_analysis(store, run, count=count, seed=seed, data_root=data_root)
    model, samples = loaded.model, loaded.samples
    guards = find_guards(model)
    k = k if k is not None else (guards[0][1].k if guards else DEFAULT_K)
    label = (f"{attack_label(loaded.config.attack, loaded.config.attack_settings)} "
             f"{loaded.config.poison_ratio:.0%}, {loaded.config.defense}")
    log(f"[{run.key[:8]}] analysing {label}: {len(samples.clean)} images of each kind, k = {k}")
    folder = Path(out_dir) / run.key[:8]
    folder.mkdir(parents=True, exist_ok=True)
    analysis = RunAnalysis(run.key, label, k)
    running = {f"{name}.{GUARD_INPUT}": running_directions(layer)
               for name, layer in guards if layer.has_running_stats}
    features = collect_features(model, samples, device=device)
    shift_curves, share_curves, row_share = {}, {}, None
    for point, feats in features.items():
        numbers, curves = point_numbers(feats, samples.mix_poisoned, k, running.get(point),
                                        samples.mix_labels)
        analysis.points[point] = numbers
        analysis.figures.append(figures.plot_spectra(
            folder / f"spectra-{point}.png", curves["spectra"], k,
            title=f"{run.key[:8]} ({label}): singular values at {point}"))
        if "shift" in curves:
            shift_curves[point] = curves["shift"]
        if "shares" in curves:
            share_curves[point], row_share = curves["shares"], curves["row_share"]
    if shift_curves:
        analysis.figures.append(figures.plot_shift_alignment(
            folder / "shift-alignment.png", shift_curves, k,
            title=f"{run.key[:8]} ({label}):\nthe trigger's mean feature shift in the clean "
                  "top directions"))
    if share_curves:
        analysis.figures.append(figures.plot_triggered_share(
            folder / "poisoned-share.png", share_curves, row_share, k,
            title=f"{run.key[:8]} ({label}):\npoisoned samples' share of each direction"))
    if tsne:
        point = tsne_point(model, features)
        analysis.figures.append(tsne_figure(folder / f"tsne-{point}.png", features[point],
                                            samples, k, seed, f"{run.key[:8]} ({label}) at "
                                                              f"{point}"))
    if over_training:
        analysis.over_training = analyze_over_training(
            store, run, folder=folder, count=count, seed=seed, samples=samples,
            data_root=data_root, device=device, log=log)
        analysis.figures += analysis.over_training.figures
    analysis.seconds = time.monotonic() - clock
    write_outputs(folder, analysis)
    store.record_metrics(run.key, analysis.metric_rows())
    log(f"[{run.key[:8]}] {len(analysis.figures)} figures and analysis.md in {folder} "
        f"({analysis.seconds:.0f} s)")
    return analysis


def tsne_figure(path, feats, samples, k, seed, title) -> Path:
    """t-SNE of the clean and the triggered images together, on the top-k eigenspace of the
    clean features and on the rest; triggered images highlighted."""
    both = torch.cat([feats["clean"], feats["triggered"]])
    directions = spectrum(feats["clean"], top=k).right
    top, tail = split_projection(both, directions, min(k, len(directions)))
    labels = torch.cat([samples.clean_labels, samples.clean_labels])
    marked = torch.cat([torch.zeros(len(samples.clean), dtype=torch.bool),
                        torch.ones(len(samples.clean), dtype=torch.bool)])
    return figures.plot_tsne(path, tsne_embedding(top, seed), tsne_embedding(tail, seed),
                             labels, marked, samples.data.classes, title, k=k)


def write_outputs(folder: Path, analysis: RunAnalysis) -> None:
    numbers = {"key": analysis.key, "label": analysis.label, "k": analysis.k,
               "seconds": round(analysis.seconds, 1), "points": analysis.points,
               "figures": [path.name for path in analysis.figures]}
    tables = [markdown_table([analysis])]
    if analysis.over_training is not None:
        numbers["over_training"] = analysis.over_training.as_json()
        tables.append(analysis.over_training.markdown())
    (folder / "analysis.json").write_text(json.dumps(numbers, indent=1, default=float))
    (folder / "analysis.md").write_text("\n\n".join(tables) + "\n")


#: the columns of the side-by-side table: (metric, heading)
TABLE_COLUMNS = (("effective_rank.clean", "eff. rank clean"),
                 ("effective_rank.triggered", "eff. rank triggered"),
                 ("effective_rank.mix", "eff. rank mix"),
                 ("poisoned_enrichment_top_k", "poisoned enrichment top k"),
                 ("shift_in_top_k", "shift in top k %"),
                 ("shift_in_running_top_k", "shift in running top k %"),
                 ("label_signature.poison_label_ratio", "poison label σ₁²/σ₂²"),
                 ("label_signature.max_other_ratio", "other labels' max σ₁²/σ₂²"),
                 ("label_signature.separation", "poison separation (sd)"),
                 ("label_signature.split_accuracy", "two-means split accuracy"))


def markdown_table(analyses: list[RunAnalysis]) -> str:
    """One row per run and capture point: the effective ranks, the poisoned samples' enrichment
    in the mix's top k (1 = their share of rows), the share of the trigger's mean shift inside
    the clean top k (and the running top k at a layer's input)."""
    lines = ["| run | point | k | " + " | ".join(head for _, head in TABLE_COLUMNS) + " |",
             "|---|---|---|" + "---|" * len(TABLE_COLUMNS)]
    for analysis in analyses:
        for point, numbers in analysis.points.items():
            cells = []
            for metric, head in TABLE_COLUMNS:
                value = numbers.get(metric)
                if value is None or not math.isfinite(value):
                    cells.append("-")
                elif head.endswith("%"):
                    cells.append(f"{100 * value:.1f}")
                else:
                    cells.append(f"{value:.2f}")
            lines.append(f"| {analysis.key[:8]} ({analysis.label}) | {point} | {analysis.k} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)
