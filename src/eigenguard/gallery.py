"""What each attack's trigger looks like: one PNG per attack, and the trigger's size in numbers.

A gallery figure has three rows of the same test images, upscaled by an integer factor with
nearest neighbour (so a 28×28 image keeps its pixels, only larger):

1. the clean images;
2. the same images poisoned (``attack.apply``; a fitted attack must be fitted first);
3. the residual ``|poisoned − clean|``, amplified so the 95th percentile of the non-zero
   differences in the figure is white, larger ones clipped (the gain is printed in the
   caption): black is unchanged, and where a trigger spreads faintly over the whole image
   (Blended, WaNet, BppAttack) it becomes visible. Scaling by the largest difference instead
   left WaNet's residual almost black: a few pixels at sharp edges move by up to 150 levels
   while most change by under 40.

:func:`trigger_stats` gives the size of a trigger over a batch: the largest change of any pixel
value (L∞, on the 0–255 scale), the mean over images of each image's L2 norm of the change (on
the [0, 1] scale, over all C·H·W values), the mean PSNR over images (dB; an image the trigger
leaves unchanged has an infinite PSNR and is left out of the mean, and counted) and the mean
share of values changed.

The image grid is placed in the figure pixel for pixel (``Figure.figimage``), so the PNG's size
is exact (:func:`gallery_size`) and no interpolation blurs the pixels.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import torch

#: each image is upscaled (nearest neighbour) by the smallest integer factor that makes it at
#: least this many pixels high
MIN_CELL = 112
GAP = 4  # pixels between images
#: the gaps' colour: not a grey, so a white or black trigger at an image's border (BadNets'
#: corner patch) stands out from the gap instead of merging with it
GAP_COLOUR = (70, 110, 180)
LEFT = 110  # the row labels' column
RIGHT = 12
TOP = 94  # title and statistics (up to two lines each)
BOTTOM = 44  # the caption (two lines)
MIN_WIDTH = 720
DPI = 100
ROWS = ("clean", "poisoned", "residual")
#: the residual row maps this quantile of the non-zero |differences| to white
RESIDUAL_QUANTILE = 0.95
FIT_SIZE = 2000  # training images a fitted attack is fitted on


def trigger_stats(clean: torch.Tensor, poisoned: torch.Tensor) -> dict:
    """The size of a trigger over a batch of uint8 images (N, C, H, W), before and after.

    Returns ``linf`` (largest |change| of a value, 0–255 scale), ``l2`` (mean over images of the
    L2 norm of the change on the [0, 1] scale), ``psnr`` (mean over the changed images of
    10·log10(1 / MSE), MSE on the [0, 1] scale; ``inf`` when no image changed), ``changed``
    (mean share of values changed), ``n`` (images) and ``n_unchanged`` (images the trigger left
    as they were).
    """
    if clean.shape != poisoned.shape or clean.dim() != 4:
        raise ValueError(f"trigger_stats takes two image batches (N, C, H, W) of one shape, got "
                         f"{tuple(clean.shape)} and {tuple(poisoned.shape)}")
    if len(clean) == 0:
        raise ValueError("trigger_stats needs at least one image")
    diff = (poisoned.double() - clean.double()).flatten(1) / 255  # [0, 1] scale
    l2 = diff.norm(dim=1)
    mse = (diff * diff).mean(dim=1)
    changed = mse > 0
    psnr = (10 * torch.log10(1 / mse[changed])).mean().item() if changed.any() else math.inf
    return dict(linf=float((diff.abs().max() * 255).round()), l2=l2.mean().item(), psnr=psnr,
                changed=(diff != 0).double().mean().item(), n=len(clean),
                n_unchanged=int((~changed).sum()))


def format_stats(stats: dict) -> str:
    """The statistics in one line, as printed in the figure and on stdout."""
    psnr = "inf" if math.isinf(stats["psnr"]) else f"{stats['psnr']:.1f} dB"
    unchanged = f", {stats['n_unchanged']} unchanged" if stats["n_unchanged"] else ""
    return (f"L∞ {stats['linf']:.0f} (0–255) · mean L2 {stats['l2']:.3f} ([0, 1] scale, per "
            f"image) · mean PSNR {psnr} · {stats['changed']:.1%} of values changed · over "
            f"{stats['n']} images{unchanged}")


def upscale_factor(height: int) -> int:
    return max(1, math.ceil(MIN_CELL / height))


def gallery_size(count: int, height: int, width: int) -> tuple[int, int]:
    """The PNG's (width, height) in pixels for ``count`` images of height × width."""
    factor = upscale_factor(height)
    grid_w = count * width * factor + (count - 1) * GAP
    grid_h = len(ROWS) * height * factor + (len(ROWS) - 1) * GAP
    return max(MIN_WIDTH, LEFT + grid_w + RIGHT), TOP + grid_h + BOTTOM


def _grid(rows: list[torch.Tensor], factor: int) -> np.ndarray:
    """uint8 (H, W, 3) mosaic of the rows (each (N, C, h, w) uint8), upscaled, with gaps of
    :data:`GAP_COLOUR` between the images."""
    n, channels, h, w = rows[0].shape
    ch, cw = h * factor, w * factor
    out = np.empty((len(rows) * ch + (len(rows) - 1) * GAP, n * cw + (n - 1) * GAP, 3),
                   dtype=np.uint8)
    out[:] = GAP_COLOUR
    for r, row in enumerate(rows):
        for i, image in enumerate(row):
            pixels = image.permute(1, 2, 0).numpy()
            if channels == 1:
                pixels = np.repeat(pixels, 3, axis=2)
            elif channels != 3:
                raise ValueError(f"the gallery shows grey or RGB images, got {channels} channels")
            big = pixels.repeat(factor, axis=0).repeat(factor, axis=1)
            y, x = r * (ch + GAP), i * (cw + GAP)
            out[y:y + ch, x:x + cw] = big
    return out


def residual(clean: torch.Tensor, poisoned: torch.Tensor,
             quantile: float = RESIDUAL_QUANTILE) -> tuple[torch.Tensor, float]:
    """|poisoned − clean| × gain, clipped to 255 (uint8), and the gain: ``quantile`` of the
    non-zero differences maps to 255 (1.0 when nothing changed)."""
    diff = (poisoned.int() - clean.int()).abs().double()
    nonzero = diff[diff > 0]
    gain = 255 / float(nonzero.quantile(quantile)) if len(nonzero) else 1.0
    return (diff * gain).round().clamp(0, 255).to(torch.uint8), gain


def write_gallery(attack, images: torch.Tensor, path, title: str, *,
                  stats: dict | None = None) -> Path:
    """Write the gallery PNG of ``attack`` (fitted already, if it learns its trigger) on the
    clean uint8 ``images`` (N, C, H, W) to ``path``; returns the path.

    ``stats`` (from :func:`trigger_stats`, e.g. over a whole test set) is printed in the figure;
    by default it is computed on ``images``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    attack.check_fitted()
    if images.dtype != torch.uint8 or images.dim() != 4 or len(images) == 0:
        raise ValueError(f"write_gallery takes a non-empty uint8 batch (N, C, H, W), got "
                         f"{images.dtype} of shape {tuple(images.shape)}")
    poisoned = attack.apply(images)
    stats = stats if stats is not None else trigger_stats(images, poisoned)
    amplified, gain = residual(images, poisoned)
    n, _, h, w = images.shape
    factor = upscale_factor(h)
    mosaic = _grid([images, poisoned, amplified], factor)
    width, height = gallery_size(n, h, w)

    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    fig.patch.set_facecolor("white")
    # figimage places the mosaic pixel for pixel; its origin is the bottom-left corner
    fig.figimage(mosaic, xo=LEFT, yo=BOTTOM, origin="upper")
    def wrap(text: str, points: float, lines: int, bold: bool = False) -> str:
        # DejaVu Sans text averages about 0.55 em a character (measured on these titles);
        # 0.58 / 0.62 (bold) leaves a margin. A point is DPI / 72 pixels.
        per_char = points * DPI / 72 * (0.62 if bold else 0.58)
        wrapped = textwrap.wrap(text, max(30, int((width - 24) / per_char)))
        if len(wrapped) > lines:  # say that the text goes on rather than cut it silently
            wrapped = wrapped[:lines - 1] + [wrapped[lines - 1].rstrip(",") + " …"]
        return "\n".join(wrapped)

    title_lines = wrap(title, 11, 2, bold=True).split("\n")
    fig.text(12 / width, 1 - 8 / height, "\n".join(title_lines), ha="left", va="top",
             fontsize=11, fontweight="bold")
    stats_top = 8 + 19 * len(title_lines) + 6
    fig.text(12 / width, 1 - stats_top / height,
             wrap(format_stats(stats), 9.5, 2), ha="left", va="top", fontsize=9.5)
    cell = h * factor
    for r, name in enumerate(ROWS):
        centre = height - TOP - r * (cell + GAP) - cell / 2
        fig.text((LEFT - 10) / width, centre / height, name, ha="right", va="center", fontsize=11)
    if stats["linf"] == 0 and gain == 1.0:
        scale = "no value changed"
    else:
        scale = (f"gain ×{gain:.2f}: the {RESIDUAL_QUANTILE:.0%} quantile of the non-zero "
                 f"differences is white, larger ones clipped")
    caption = (f"residual row: |poisoned − clean| ({scale}); black = unchanged. Images upscaled "
               f"×{factor} with nearest neighbour.")
    fig.text(12 / width, 6 / height, wrap(caption, 8.5, 2), ha="left", va="bottom",
             fontsize=8.5, color="#333333")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, facecolor="white")
    return path


def gallery_images(test, count: int) -> torch.Tensor:
    """``count`` test images: the first image of each class in turn (class 0, 1, ...), then the
    second of each, so the row shows as many classes as it can."""
    if count < 1:
        raise ValueError(f"--count must be at least 1, got {count}")
    by_class = [(test.labels == c).nonzero().flatten().tolist() for c in range(test.num_classes)]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < min(count, len(test)):
        for indices in by_class:
            if depth < len(indices) and len(chosen) < count:
                chosen.append(indices[depth])
        depth += 1
    return test.images[torch.tensor(chosen, dtype=torch.int64)]


def fit_subset(train, size: int = FIT_SIZE, seed: int = 0):
    """The seeded subset of the training set a fitted attack learns its trigger from."""
    if size >= len(train):
        return train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return train.subset(order[:size].sort().values)


def describe_attack(name: str, attack, fitted_on: int | None = None) -> str:
    """The figure's title: the attack, its kind and what it was fitted on, then its settings
    (last, so that a list too long for the title's two lines is what gets cut)."""
    settings = ", ".join(f"{k}={v}" for k, v in attack.settings().items())
    kind = "clean label" if attack.clean_label else "dirty label"
    fitted = (f", fitted on {fitted_on:,} training images (seed 0)"
              if attack.needs_fit and fitted_on else "")
    return f"{name} — {kind}{fitted}: {settings}"
