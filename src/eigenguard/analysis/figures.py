"""The figures of ``eigenguard analyze``: one PNG per function, from numbers already computed.

Each function takes the numbers of :mod:`eigenguard.analysis.spectrum` (tensors, lists or arrays),
checks them (mismatched lengths raise ValueError before anything is drawn), writes one PNG and
returns its path. Drawing goes through matplotlib's Agg canvas on a ``Figure`` object, not pyplot:
no global state, no window, and no figure left open (a figure is freed with its last reference).
Sizes are fixed (:data:`SIZES` inches at :data:`DPI`) so the PNGs line up in a Markdown report.

- :func:`plot_spectra`: singular values by index, log scale, one curve per kind of image, the
  layer's k marked (the source's spectra);
- :func:`plot_triggered_share`: the triggered rows' share of each direction's energy against their
  share of the rows (where the trigger sits: top k equalised or tail damped);
- :func:`plot_shift_alignment`: the fraction of the trigger's feature shift inside the top-k span;
- :func:`plot_tsne`: t-SNE of the top-k eigenspace beside the rest (the source's Figure 2);
- :func:`plot_over_training`: effective rank per epoch with the ASR (the source's Figure 1).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

DPI = 110
#: figure sizes in inches, (width, height); the PNG is DPI times that in pixels
SIZES = {"spectra": (7.0, 4.5), "triggered_share": (7.0, 4.5), "shift_alignment": (7.0, 4.5),
         "tsne": (12.0, 5.4), "over_training": (7.0, 4.5)}
#: how many leading directions plot_triggered_share shows by default
SHARE_DIRECTIONS = 100
#: tab10, then tab20's lighter shades: distinct colours for up to 20 classes or curves
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896",
           "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5")
K_COLOR = "#444444"
#: line styles cycled with the colours, so curves that coincide stay visible under each other
LINESTYLES = ("-", "--", "-.", ":")


def pixel_size(kind: str) -> tuple[int, int]:
    """(width, height) in pixels of the PNG a plot of this kind writes."""
    width, height = SIZES[kind]
    return round(width * DPI), round(height * DPI)


# -- checks ----------------------------------------------------------------------------------------

def _vector(values, name: str) -> np.ndarray:
    """A non-empty 1-D float array of finite numbers (NaN allowed: drawn as a gap)."""
    try:
        array = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values,
                           dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a sequence of numbers: {error}") from None
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of numbers, got shape "
                         f"{array.shape}")
    if np.isinf(array).any():
        raise ValueError(f"{name} contains infinite values")
    return array


def _curves(curves, name: str) -> dict[str, np.ndarray]:
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError(f"{name} must be a non-empty dict of label -> values")
    return {str(label): _vector(values, f"{name}[{label!r}]") for label, values in curves.items()}


def _optional_k(k) -> int | None:
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1 or None, got {k!r}")
    return int(k)


def _points(embedding, name: str) -> np.ndarray:
    array = np.asarray(embedding.detach().cpu() if hasattr(embedding, "detach") else embedding,
                       dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 2 or array.shape[0] == 0:
        raise ValueError(f"{name} must be an (N, 2) embedding, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or Inf values")
    return array


# -- drawing ---------------------------------------------------------------------------------------

def _new_figure(kind: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=SIZES[kind], dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # no Software entry, as in the HTML report: it would carry matplotlib's web address
    figure.savefig(path, dpi=DPI, facecolor="white", metadata={"Software": None})
    figure.clear()
    return path


def _color(index: int, count: int):
    """Distinct colours: the palette up to 20, then evenly spaced hues (GTSRB has 43 classes)."""
    if count <= len(PALETTE):
        return PALETTE[index % len(PALETTE)]
    from matplotlib import colormaps

    return colormaps["turbo"](0.05 + 0.9 * index / max(count - 1, 1))


def _mark_k(axes, k: int | None, text: str) -> None:
    if k is not None:
        axes.axvline(k, color=K_COLOR, linestyle="--", linewidth=1.2, label=text)


# -- the figures -----------------------------------------------------------------------------------

def plot_spectra(path, spectra: Mapping[str, Sequence[float]], k: int | None = None,
                 title: str = "Singular values of the features") -> Path:
    """Singular values σ_i by index i (1 = largest), log scale, one curve per label (e.g. clean,
    triggered, mix); zeros (below the rank threshold) are left out. The index axis is
    logarithmic too when a spectrum has more than 100 values, so the top k stay visible next to
    thousands of tail values. A dashed line marks the layer's k when given."""
    curves = _curves(spectra, "spectra")
    for label, values in curves.items():
        if (values < 0).any() or np.isnan(values).any():
            raise ValueError(f"spectra[{label!r}] must be singular values: finite and >= 0")
    k = _optional_k(k)
    figure = _new_figure("spectra")
    axes = figure.add_subplot()
    longest = max(len(values) for values in curves.values())
    for index, (label, values) in enumerate(curves.items()):
        positive = values[values > 0]
        axes.plot(np.arange(1, len(positive) + 1), positive, color=_color(index, len(curves)),
                  linestyle=LINESTYLES[index % len(LINESTYLES)], linewidth=1.6,
                  label=f"{label} (rank {len(positive)})")
    _mark_k(axes, k, f"k = {k}: σ_1..σ_k equalised, the rest ×1e-3")
    axes.set_yscale("log")
    if longest > 100:
        axes.set_xscale("log")
    axes.set_xlabel("index i of the singular value, largest first"
                    + (" (log scale)" if longest > 100 else ""))
    axes.set_ylabel("singular value σ_i (log scale)")
    axes.set_title(title)
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(fontsize=9)
    return _save(figure, path)


def plot_triggered_share(path, shares: Mapping[str, Sequence[float]], row_share: float, k: int,
                         directions: int = SHARE_DIRECTIONS,
                         title: str = "Triggered rows' share of each direction's energy") -> Path:
    """The triggered rows' share of σ_i² for the first ``directions`` directions, one curve per
    label (e.g. a stage), the triggered rows' share of the rows as a horizontal line: a direction
    above it carries more than its share of trigger. The top k (equalised) are shaded."""
    curves = _curves(shares, "shares")
    for label, values in curves.items():
        if (values < -1e-9).any() or (values > 1 + 1e-9).any():
            raise ValueError(f"shares[{label!r}] must lie in [0, 1]")
    if not isinstance(row_share, (int, float)) or not 0 < row_share < 1:
        raise ValueError(f"row_share must be in (0, 1), got {row_share!r}")
    k = _optional_k(k)
    if k is None:
        raise ValueError("k (the layer's number of equalised directions) is required")
    if isinstance(directions, bool) or not isinstance(directions, int) or directions < 1:
        raise ValueError(f"directions must be an integer >= 1, got {directions!r}")
    figure = _new_figure("triggered_share")
    axes = figure.add_subplot()
    shown = min(directions, max(len(values) for values in curves.values()))
    axes.axvspan(0.5, k + 0.5, color="#e8e8e8", label=f"top k = {k}: equalised")
    for index, (label, values) in enumerate(curves.items()):
        part = values[:shown]
        axes.plot(np.arange(1, len(part) + 1), part, color=_color(index, len(curves)),
                  marker="o", markersize=3, linewidth=1.2, label=label)
    axes.axhline(row_share, color="#d62728", linestyle=":", linewidth=1.5,
                 label=f"triggered share of rows = {row_share:.3g}")
    axes.set_xlim(0.5, shown + 0.5)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("singular direction i, largest σ_i first")
    axes.set_ylabel("share of σ_i² from triggered rows")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=9, loc="upper right")
    return _save(figure, path)


def plot_shift_alignment(path, curves: Mapping[str, Sequence[float]], k: int | None = None,
                         title: str = "How much of the trigger's feature shift lies in the top-k "
                                      "directions") -> Path:
    """Cumulative curves from :func:`~eigenguard.analysis.spectrum.shift_alignment` (entry j =
    fraction of the shift's squared norm inside the span of the first j directions, entry 0 = 0),
    one per label; the layer's k marked. High at k: the trigger lives where the layer equalises;
    low: in the tail it damps."""
    series = _curves(curves, "curves")
    for label, values in series.items():
        finite = values[~np.isnan(values)]
        if (finite < -1e-9).any() or (finite > 1 + 1e-9).any():
            raise ValueError(f"curves[{label!r}] must be fractions in [0, 1]")
    k = _optional_k(k)
    figure = _new_figure("shift_alignment")
    axes = figure.add_subplot()
    for index, (label, values) in enumerate(series.items()):
        axes.plot(np.arange(len(values)), values, color=_color(index, len(series)),
                  linestyle=LINESTYLES[index % len(LINESTYLES)], linewidth=1.6, label=label)
    _mark_k(axes, k, f"layer's k = {k}")
    axes.set_ylim(0, 1.02)
    axes.set_xlim(0, max(len(values) for values in series.values()) - 1 or 1)
    axes.set_xlabel("number of top singular directions j (span of v_1..v_j)")
    axes.set_ylabel("fraction of ‖trigger shift‖² inside the span")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=9, loc="lower right")
    return _save(figure, path)


def plot_tsne(path, top_embedding, tail_embedding, labels, triggered_mask,
              class_names: Sequence[str], title: str, *, k: int | None = None) -> Path:
    """Two t-SNE panels side by side: the features in the top-k eigenspace and in the remaining
    eigenspace (the source's Figure 2). Points are coloured by class; triggered samples are drawn
    on top as triangles with a black edge; the legend names the classes."""
    top, tail = _points(top_embedding, "top_embedding"), _points(tail_embedding, "tail_embedding")
    classes = np.asarray(labels.detach().cpu() if hasattr(labels, "detach") else labels)
    mask = np.asarray(triggered_mask.detach().cpu() if hasattr(triggered_mask, "detach")
                      else triggered_mask)
    count = len(top)
    if len(tail) != count or classes.shape != (count,) or mask.shape != (count,):
        raise ValueError(f"top_embedding ({len(top)}), tail_embedding ({len(tail)}), labels "
                         f"{classes.shape} and triggered_mask {mask.shape} must have one entry "
                         "per sample")
    if mask.dtype != bool:
        raise ValueError(f"triggered_mask must be booleans, got {mask.dtype}")
    if not np.issubdtype(classes.dtype, np.integer) or classes.min() < 0 \
            or classes.max() >= len(class_names):
        raise ValueError(f"labels must be integers in [0, {len(class_names)}), one per name of "
                         "class_names")
    k = _optional_k(k)
    figure = _new_figure("tsne")
    panels = figure.subplots(1, 2)
    names = (f"top-{k} eigenspace (equalised)" if k else "top-k eigenspace (equalised)",
             "remaining eigenspace (damped)")
    size = float(np.clip(8000 / count, 3, 30))  # 4 points² at 2,000 samples
    present = sorted(set(classes.tolist()))
    for axes, points, name in zip(panels, (top, tail), names):
        for c in present:
            chosen = (classes == c) & ~mask
            axes.scatter(points[chosen, 0], points[chosen, 1], s=size, alpha=0.6, linewidths=0,
                         color=_color(c, len(class_names)))
        for c in present:
            chosen = (classes == c) & mask
            axes.scatter(points[chosen, 0], points[chosen, 1], s=size * 2.2, marker="^",
                         color=_color(c, len(class_names)), edgecolors="black", linewidths=0.6)
        axes.set_title(name)
        axes.set_xticks([])
        axes.set_yticks([])
        axes.set_xlabel("t-SNE 1")
        axes.set_ylabel("t-SNE 2")
    _tsne_legend(figure, present, class_names, bool(mask.any()))
    figure.suptitle(title)
    return _save(figure, path)


def _tsne_legend(figure, present, class_names, any_triggered: bool) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], linestyle="", marker="o", markersize=6,
                      color=_color(c, len(class_names)), label=str(class_names[c]))
               for c in present]
    if any_triggered:
        handles.append(Line2D([], [], linestyle="", marker="^", markersize=7, color="white",
                              markeredgecolor="black", label="triggered (black edge)"))
    columns = 1 if len(handles) <= 16 else math.ceil(len(handles) / 16)
    figure.legend(handles=handles, loc="outside right center", fontsize=8, ncols=columns,
                  title="class")


def plot_over_training(path, epochs: Sequence[int], series: Mapping[str, Sequence[float]],
                       asr: Sequence[float] | None = None,
                       title: str = "Effective rank of the features during training") -> Path:
    """Effective rank per epoch, one line per label (a stage, or an image kind), and the attack
    success rate on a second axis when given (fractions in [0, 1], shown in percent), as in the
    source's Figure 1."""
    x = _vector(epochs, "epochs")
    lines = _curves(series, "series")
    for label, values in lines.items():
        if len(values) != len(x):
            raise ValueError(f"series[{label!r}] has {len(values)} values for {len(x)} epochs")
    rates = None
    if asr is not None:
        rates = _vector(asr, "asr")
        if len(rates) != len(x):
            raise ValueError(f"asr has {len(rates)} values for {len(x)} epochs")
        finite = rates[~np.isnan(rates)]
        if (finite < 0).any() or (finite > 1).any():
            raise ValueError("asr must be fractions in [0, 1] (the store's unit)")
    figure = _new_figure("over_training")
    axes = figure.add_subplot()
    for index, (label, values) in enumerate(lines.items()):
        axes.plot(x, values, color=_color(index, len(lines)), marker="o", markersize=3.5,
                  linewidth=1.6, label=label)
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("epoch")
    axes.set_ylabel("effective rank exp(H(σ / Σσ))")
    axes.grid(True, alpha=0.3)
    handles, names = axes.get_legend_handles_labels()
    if rates is not None:
        second = axes.twinx()
        second.plot(x, 100 * rates, color="black", linestyle="--", marker="s", markersize=3.5,
                    linewidth=1.4, label="ASR")
        second.set_ylim(0, 102)
        second.set_ylabel("attack success rate (%)")
        more, more_names = second.get_legend_handles_labels()
        handles, names = handles + more, names + more_names
    # below the plot: inside, it would hide one axis's lines whatever corner it took
    figure.legend(handles, names, fontsize=9, loc="outside lower center",
                  ncols=min(len(names), 4))
    axes.set_title(title)
    return _save(figure, path)
