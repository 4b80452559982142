"""Label-conditional spectral signatures: can one class's features single out the poison?

All-to-one poison lands in one label (the target), where it is a large minority (at 10% poison on
a 10-class set, about half of the label's samples). Within that label the trigger's shift is a
direction most of the spread lies along, the insight of Spectral Signatures (Tran et al., 2018).
EigenGuard looks at the whole batch, where the same shift is a minority of every direction; this
module measures, at any capture point, whether looking label by label would see it:

- per label, the centred features' top-to-second energy ratio σ₁²/σ₂² (how strongly one
  direction dominates the label's spread), with the labels as trained on (poisoned labels: the
  only labels a training-time defense has);
- the label holding most poisoned rows (the harness knows them; measurement only) and whether it
  has the largest ratio of all labels, that is whether the ratio alone would point at it;
- along that label's top direction, the separation of its poisoned rows from its clean rows in
  standard deviations of the clean rows;
- the accuracy of the two-means split of that label's rows along its top direction, read as
  poisoned against clean (the better of the two ways round, so 0.5 to 1): a defense that knew the
  label could cut there without knowing which rows are poisoned; 1 means the cut is the poison.

A label with fewer than :data:`MIN_ROWS` rows gets no ratio.
"""
from __future__ import annotations

import math

import torch

from .spectrum import DEFAULT_RANK_RTOL, _as_rows, _check_mask, _decompose

#: fewest rows of a label for its ratio (two directions need at least three centred rows)
MIN_ROWS = 3


def top_direction(rows: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Centre the rows; their coordinates on the top singular direction (N,) in float64, and the
    top-to-second energy ratio σ₁²/σ₂² (inf when the rest is zero)."""
    centred = rows.to(torch.float64) - rows.to(torch.float64).mean(0, keepdim=True)
    values, left, _, _ = _decompose(centred, "auto", DEFAULT_RANK_RTOL)
    if len(values) < 2 or values[0] == 0:
        return torch.zeros(len(rows), dtype=torch.float64), math.nan
    ratio = math.inf if values[1] == 0 else float(values[0] ** 2 / values[1] ** 2)
    return left[:, 0] * values[0], ratio


def two_means_split(coordinates: torch.Tensor, iterations: int = 100) -> torch.Tensor:
    """One-dimensional two-means (Lloyd's iterations from the median): True for the rows above
    the cut."""
    cut = coordinates.median()
    for _ in range(iterations):
        upper = coordinates > cut
        if upper.all() or not upper.any():
            break
        moved = (coordinates[upper].mean() + coordinates[~upper].mean()) / 2
        if moved == cut:
            break
        cut = moved
    return coordinates > cut


def label_signatures(features: torch.Tensor, labels: torch.Tensor,
                     poisoned: torch.Tensor | None = None) -> dict:
    """The numbers of the module docstring for features (N, ...) with their labels (N,) and, when
    given, the poisoned rows (bool, N).

    Returns ``ratios`` (label -> σ₁²/σ₂²), and with ``poisoned`` holding any row:
    ``poison_label``, ``poison_label_ratio``, ``max_other_ratio`` (largest ratio of the other
    labels), ``poison_label_has_max_ratio``, ``separation`` (|mean poisoned − mean clean| / std
    clean along the poison label's top direction; NaN with fewer than two clean rows there) and
    ``split_accuracy`` (of :func:`two_means_split` along that direction; NaN without clean rows).
    """
    rows = _as_rows(features)
    labels = torch.as_tensor(labels).flatten()
    if len(labels) != len(rows):
        raise ValueError(f"labels must hold one label per row: {len(labels)} labels for "
                         f"{len(rows)} rows")
    coordinates, ratios = {}, {}
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        if len(members) >= MIN_ROWS:
            coordinates[label], ratios[label] = top_direction(rows[members])
    result: dict = {"ratios": ratios}
    if poisoned is None:
        return result
    mask = _check_mask(poisoned, len(rows))
    if not mask.any():
        return result
    poison_label = int(labels[mask].mode().values)
    members = labels == poison_label
    others = [ratio for label, ratio in ratios.items() if label != poison_label]
    own = ratios.get(poison_label, math.nan)
    result.update(poison_label=poison_label, poison_label_ratio=own,
                  max_other_ratio=max(others) if others else math.nan,
                  poison_label_has_max_ratio=bool(others) and own > max(others))
    if poison_label not in coordinates:
        result["separation"] = result["split_accuracy"] = math.nan
        return result
    along = coordinates[poison_label]
    inside = mask[members]
    clean = along[~inside]
    if len(clean) < 2 or not inside.any() or float(clean.std()) == 0:
        result["separation"] = math.nan
    else:
        result["separation"] = float((along[inside].mean() - clean.mean()).abs() / clean.std())
    if inside.all():
        result["split_accuracy"] = math.nan
    else:
        agree = float((two_means_split(along) == inside).double().mean())
        result["split_accuracy"] = max(agree, 1 - agree)
    return result
