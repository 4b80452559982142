"""SPECTRE (Hayase, Kong, Somani & Oh, ICML 2021): whiten each class's representations with a
covariance estimated robustly, so that the poison's direction, hidden under the clean variance
in the raw features, stands out; score every sample by its QUantum Entropy (QUE) score; remove
the highest scores and retrain.

Per class of the (possibly poisoned) training labels, on the penultimate features of the model
trained on the poisoned set:

1. **Reduce**: project the centred features on their top ``k`` principal directions.
2. **Robust mean and covariance**: iterative trimming. Starting from the whole class, drop the
   samples with the largest Mahalanobis distance under the current estimate, a tenth of the
   budget at a time, until ``trim_factor`` (2) × the expected poison count is gone; estimate
   mean and covariance on the rest. The paper's filter (Diakonikolas et al. 2017) also removes
   at most 2 × the expected count (its ``limit1``) but may stop earlier when it sees no outliers;
   trimming always spends its budget, which makes the clean covariance somewhat too small in
   every direction alike: all whitened norms grow together, no sample is favoured. Chosen over
   an MCD estimate because it needs no random subsets, is deterministic and handles
   rank-deficient features (dead ReLU units) through an eigenvalue floor.
3. **Whiten** every sample with that estimate: x̃ = Σ^{-1/2}(x − μ).
4. **QUE score** (Dong, Hopkins & Li 2019) with ``alpha`` (4, the paper's): with S the second
   moment of the whitened class, M = exp(α(S − I)/(‖S‖₂ − 1)) / tr(·), τ_i = x̃_iᵀ M x̃_i. Large α
   scores along the top direction of S only (a spectral signature after whitening); α = 0 gives
   the squared Mahalanobis norm; α = 4 weighs every direction with excess variance.
5. **Flag** the ``removal_factor`` (1.5) × ``expected_poison_ratio`` (0.1) share of the class
   with the highest scores: 1.5 × the defender's assumed bound, as in the paper and in
   Spectral Signatures (the run's true ratio is never read).

The dimension ``k`` is chosen per class as in the paper's code when ``dims`` is None (default):
every k in 1, 4, 9, ..., up to ``max_dims`` (64, the paper's) is tried, and the one whose kept
samples, used to whiten the whole class, leave the largest QUE-weighted variance (the most
excess variance in the removed part) wins. ``k`` never exceeds the class's numerical rank or
half its trimmed size (a covariance needs samples), so on small classes and narrow features the
grid is shorter. A fixed ``dims`` skips the selection. Nothing is scaled down: the whole grid
costs about a second per class of 5,000 samples with 512 features on one core, the scorer is
the stored undefended model and the retraining uses the run's own training settings.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from .base import DefenseContext
from .checks import check_fraction, check_integer, check_number
from .detect import DetectAndRetrain, check_class_share, removal_count
from .features import penultimate_features
from .registry import register_defense

TRIM_ROUNDS = 10
EIGEN_FLOOR = 1e-9  # relative to the largest eigenvalue: directions with no variance stay flat


def principal_coordinates(features: torch.Tensor, dims: int) -> torch.Tensor:
    """The centred class features on their top ``dims`` principal directions (float64), at
    most as many as the features' numerical rank."""
    centred = features.double() - features.double().mean(dim=0, keepdim=True)
    _, singular, right = torch.linalg.svd(centred, full_matrices=False)
    rank = int((singular > singular[0] * 1e-6).sum()) if len(singular) and singular[0] > 0 else 0
    return centred @ right[:min(dims, max(rank, 1))].T


def inverse_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Σ^{-1/2} of a symmetric positive semi-definite matrix, with an eigenvalue floor."""
    values, vectors = torch.linalg.eigh(matrix)
    values = values.clamp_min(values.max().clamp_min(1e-30) * EIGEN_FLOOR)
    return vectors @ torch.diag(values.rsqrt()) @ vectors.T


def mean_and_covariance(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = points.mean(dim=0)
    centred = points - mean
    return mean, centred.T @ centred / max(len(points), 1)


def trimmed_mean_and_covariance(points: torch.Tensor, trim: int,
                                rounds: int = TRIM_ROUNDS) -> tuple[torch.Tensor, torch.Tensor]:
    """Robust estimate: drop the ``trim`` points farthest in Mahalanobis distance, in
    ``rounds`` steps that re-estimate between them, and estimate on the rest."""
    keep = torch.ones(len(points), dtype=torch.bool)
    step = max(1, math.ceil(trim / rounds))
    removed = 0
    while removed < trim:
        mean, covariance = mean_and_covariance(points[keep])
        distance = ((points - mean) @ inverse_sqrt(covariance)).square().sum(dim=1)
        distance[~keep] = -math.inf
        drop = min(step, trim - removed)
        keep[distance.topk(drop).indices] = False
        removed += drop
    return mean_and_covariance(points[keep])


def que_weights(covariance: torch.Tensor, alpha: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigenvalues λ, eigenvectors V of S and the weights w of
    M = exp(α(S − I)/(‖S‖₂ − 1)) / tr(·) = V diag(w) Vᵀ.

    Computed from the eigenvalues shifted by the largest, so nothing overflows; when no
    direction has excess variance (‖S‖₂ ≤ 1) the denominator is floored and M tends to the
    projector on the top direction, the limit the formula approaches."""
    values, vectors = torch.linalg.eigh(covariance)
    top = values.max()
    spread = (top - 1).clamp_min(1e-6)
    weights = torch.exp(alpha * (values - top) / spread)
    return values, vectors, weights / weights.sum()


def que_scores(whitened: torch.Tensor, alpha: float = 4.0) -> torch.Tensor:
    """QUantum Entropy score τ_i = x_iᵀ M x_i of each (already whitened and centred) row."""
    whitened = whitened.double()
    second_moment = whitened.T @ whitened / len(whitened)
    _, vectors, weights = que_weights(second_moment, alpha)
    return ((whitened @ vectors).square() * weights).sum(dim=1)


def que_filter(coordinates: torch.Tensor, *, removal: int, trim: int,
               alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One class at one dimension: robustly whiten, QUE-score, flag the ``removal`` highest.
    Returns (scores, boolean flags)."""
    mean, covariance = trimmed_mean_and_covariance(coordinates, trim)
    scores = que_scores((coordinates - mean) @ inverse_sqrt(covariance), alpha)
    flags = torch.zeros(len(coordinates), dtype=torch.bool)
    flags[scores.topk(removal).indices] = True
    return scores, flags


def excess_variance_left_out(coordinates: torch.Tensor, flags: torch.Tensor,
                             alpha: float) -> float:
    """The paper's criterion for choosing k: whiten the whole class with the covariance of the
    samples kept, then the QUE-weighted variance tr(S M) / tr(M) of the result. It is large when
    the flagged samples carried variance the kept ones lack, i.e. when the filter removed an
    outlying group."""
    mean, covariance = mean_and_covariance(coordinates[~flags])
    whitened = (coordinates - mean) @ inverse_sqrt(covariance)
    _, spread = mean_and_covariance(whitened)
    values, _, weights = que_weights(spread, alpha)
    return float((values * weights).sum())


def candidate_dims(available: int, max_dims: int) -> list[int]:
    """1, 4, 9, ... (the squares of the paper's grid) up to ``max_dims`` and what is available,
    with ``available`` itself when it falls between two squares."""
    limit = min(available, max_dims)
    squares = [k * k for k in range(1, math.isqrt(limit) + 1)]
    return squares if squares[-1] == limit else squares + [limit]


def spectre_class_flags(features: torch.Tensor, *, removal: int, trim: int, alpha: float,
                        dims: int | None, max_dims: int) -> tuple[torch.Tensor, dict]:
    """One class: boolean flags and what was chosen (k, the criterion's value)."""
    if removal == 0 or len(features) < 2:
        return torch.zeros(len(features), dtype=torch.bool), dict(dims=0, excess_variance=0.0)
    room = max(1, (len(features) - trim) // 2)  # at least two kept samples per dimension
    coordinates = principal_coordinates(features, min(room, dims or max_dims))
    grid = [coordinates.shape[1]] if dims else candidate_dims(coordinates.shape[1], max_dims)
    best = None
    for k in grid:
        _, flags = que_filter(coordinates[:, :k], removal=removal, trim=trim, alpha=alpha)
        criterion = excess_variance_left_out(coordinates, flags, alpha)
        if best is None or criterion > best[1]:
            best = (flags, criterion, k)
    flags, criterion, k = best
    return flags, dict(dims=k, excess_variance=round(criterion, 4))


def spectre_flags(features: torch.Tensor, labels: torch.Tensor, *,
                  expected_poison_ratio: float = 0.1, removal_factor: float = 1.5,
                  trim_factor: float = 2.0, alpha: float = 4.0, dims: int | None = None,
                  max_dims: int = 64) -> tuple[torch.Tensor, dict[str, dict]]:
    """The detector on tensors: N × D features and N labels -> (boolean mask of flagged rows,
    per class the chosen dimension and criterion)."""
    flags = torch.zeros(len(features), dtype=torch.bool)
    chosen: dict[str, dict] = {}
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        size = len(members)
        removal = removal_count(size, expected_poison_ratio, removal_factor)
        trim = min(max(size - 2, 0), int(round(trim_factor * expected_poison_ratio * size)))
        class_flags, chosen[str(int(label))] = spectre_class_flags(
            features[members], removal=removal, trim=trim, alpha=alpha, dims=dims,
            max_dims=max_dims)
        flags[members[class_flags]] = True
    return flags, chosen


@register_defense("spectre")
@dataclass
class Spectre(DetectAndRetrain):
    """SPECTRE: see the module docstring for the steps and why each default."""

    expected_poison_ratio: float = 0.1
    removal_factor: float = 1.5
    trim_factor: float = 2.0
    alpha: float = 4.0
    dims: int | None = None
    max_dims: int = 64

    def __post_init__(self):
        check_fraction("expected_poison_ratio", self.expected_poison_ratio)
        check_number("removal_factor", self.removal_factor, low=0)
        check_class_share("removal_factor", self.removal_factor, self.expected_poison_ratio)
        check_number("trim_factor", self.trim_factor, low=0, open_low=False,
                     meaning="0: plain mean and covariance")
        check_class_share("trim_factor", self.trim_factor, self.expected_poison_ratio)
        check_number("alpha", self.alpha, low=0, open_low=False)
        check_integer("dims", self.dims, optional=True, meaning="None: chosen per class")
        check_integer("max_dims", self.max_dims)

    def flag(self, model: nn.Module, context: DefenseContext) -> torch.Tensor:
        clock = time.monotonic()
        features = penultimate_features(model, context.train_set, device=context.device)
        features_seconds = time.monotonic() - clock
        labels = context.train_set.labels
        flags, chosen = spectre_flags(
            features, labels, expected_poison_ratio=self.expected_poison_ratio,
            removal_factor=self.removal_factor, trim_factor=self.trim_factor, alpha=self.alpha,
            dims=self.dims, max_dims=self.max_dims)
        self.detection_ = dict(
            dims_per_class={label: info["dims"] for label, info in chosen.items()},
            excess_variance_per_class={label: info["excess_variance"]
                                       for label, info in chosen.items()},
            features_seconds=round(features_seconds, 3),
            scoring_seconds=round(time.monotonic() - clock - features_seconds, 3))
        return flags.nonzero().flatten()
