"""Activation Clustering (Chen et al., SafeAI@AAAI 2019): within a class whose label the attack
forged, the poisoned samples are classified by the trigger rather than by the content, so their
last hidden activations form a cluster of their own; split each class in two and remove the
smaller part when it is small enough to be poison, then retrain.

For each class of the (possibly poisoned) training labels the detector projects the penultimate
features of the model trained on the poisoned set on their top ``dims`` (10, the paper's and
BackdoorBench's) principal directions, splits them into two clusters with k-means, and flags the
smaller cluster when it holds less than ``size_threshold`` of the class (0.35, the threshold of
the relative-size analysis in IBM's Adversarial Robustness Toolbox, which implements the
paper). A clean class has no natural two-way split, so k-means cuts it roughly in half and
nothing is flagged; a poisoned class splits into its clean and its poisoned part. The
relative-size criterion is used rather than the silhouette score because it needs no second
threshold tuned on data with known poison.

The paper (and the Adversarial Robustness Toolbox's implementation) reduces with FastICA, which
projects on the same top principal directions, whitens them and rotates the result. k-means does
not see the rotation, so the two differ only in the whitening, which PCA skips: the direction
that separates the poison keeps its large variance, which is what the two-way split needs, and
PCA is exact, where ICA iterates from a random start (and needs scikit-learn, which this package
does not depend on). k-means runs in torch: k-means++ seeding, ``restarts`` seeded runs (10, as
in scikit-learn's classic default), the best by inertia, under
``generator(context.seed, "ac-kmeans")``, so flags are deterministic under the run's seed.

The detector does not know the target class; a class where the poison is the majority (an
all-to-one attack at a high ratio) can split with the *clean* part smaller, and the poison stays.
Nothing is scaled down: the scorer is the stored undefended model and the retraining uses the
run's own training settings.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ..seeding import generator
from .base import DefenseContext
from .detect import DetectAndRetrain, check_fraction
from .features import penultimate_features
from .registry import register_defense

CLUSTERS = 2  # the paper's choice: clean part and poisoned part
KMEANS_ITERATIONS = 100


def principal_components(features: torch.Tensor, dims: int) -> torch.Tensor:
    """The centred features projected on their top ``dims`` principal directions (fewer when
    the class has fewer samples or features)."""
    centred = features.double() - features.double().mean(dim=0, keepdim=True)
    _, _, right = torch.linalg.svd(centred, full_matrices=False)
    return centred @ right[:dims].T


def kmeans_plus_plus_centres(points: torch.Tensor, clusters: int,
                             rng: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centre drawn with probability ∝ squared distance."""
    centres = [points[torch.randint(len(points), (1,), generator=rng)].squeeze(0)]
    for _ in range(1, clusters):
        distances = torch.cdist(points, torch.stack(centres)).square().min(dim=1).values
        if distances.sum() <= 0:  # every point sits on a centre already
            centres.append(centres[-1])
            continue
        pick = torch.multinomial(distances / distances.sum(), 1, generator=rng)
        centres.append(points[pick].squeeze(0))
    return torch.stack(centres)


def lloyd(points: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Lloyd iterations from ``centres`` to a fixed point: cluster of each point, inertia."""
    for _ in range(KMEANS_ITERATIONS):
        assignment = torch.cdist(points, centres).argmin(dim=1)
        moved = centres.clone()
        for cluster in range(len(centres)):
            members = points[assignment == cluster]
            if len(members):  # an empty cluster keeps its centre
                moved[cluster] = members.mean(dim=0)
        if torch.equal(moved, centres):
            break
        centres = moved
    distances = torch.cdist(points, centres).square()
    assignment = distances.argmin(dim=1)
    return assignment, float(distances.gather(1, assignment[:, None]).sum())


def kmeans(points: torch.Tensor, clusters: int, rng: torch.Generator,
           restarts: int = 10) -> torch.Tensor:
    """The cluster of each point: the best (lowest inertia) of ``restarts`` seeded runs."""
    best, best_inertia = None, float("inf")
    for _ in range(restarts):
        assignment, inertia = lloyd(points, kmeans_plus_plus_centres(points, clusters, rng))
        if inertia < best_inertia:
            best, best_inertia = assignment, inertia
    return best


def smaller_cluster(features: torch.Tensor, *, dims: int, rng: torch.Generator,
                    restarts: int = 10) -> tuple[torch.Tensor, float]:
    """One class: the mask of its smaller k-means cluster and that cluster's relative size."""
    if len(features) < CLUSTERS:
        return torch.zeros(len(features), dtype=torch.bool), 0.0
    assignment = kmeans(principal_components(features, dims), CLUSTERS, rng, restarts)
    sizes = torch.bincount(assignment, minlength=CLUSTERS)
    small = int(sizes.argmin())
    return assignment == small, float(sizes[small]) / len(features)


def activation_clustering_flags(features: torch.Tensor, labels: torch.Tensor, *,
                                dims: int = 10, size_threshold: float = 0.35,
                                rng: torch.Generator | None = None,
                                restarts: int = 10) -> tuple[torch.Tensor, dict[str, float]]:
    """The detector on tensors: N × D features and N labels -> (boolean mask of flagged rows,
    the relative size of each class's smaller cluster)."""
    rng = rng if rng is not None else torch.Generator().manual_seed(0)
    flags = torch.zeros(len(features), dtype=torch.bool)
    sizes: dict[str, float] = {}
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        small, size = smaller_cluster(features[members], dims=dims, rng=rng, restarts=restarts)
        sizes[str(int(label))] = round(size, 4)
        if size < size_threshold:
            flags[members[small]] = True
    return flags, sizes


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@register_defense("ac")
@dataclass
class ActivationClustering(DetectAndRetrain):
    """Activation Clustering: see the module docstring for the method and its defaults."""

    dims: int = 10
    size_threshold: float = 0.35
    restarts: int = 10

    def __post_init__(self):
        check_positive_int("dims", self.dims)
        check_fraction("size_threshold", self.size_threshold, high=0.5)
        check_positive_int("restarts", self.restarts)

    def flag(self, model: nn.Module, context: DefenseContext) -> torch.Tensor:
        clock = time.monotonic()
        features = penultimate_features(model, context.train_set, device=context.device)
        features_seconds = time.monotonic() - clock
        labels = context.train_set.labels
        flags, sizes = activation_clustering_flags(
            features, labels, dims=self.dims, size_threshold=self.size_threshold,
            rng=generator(context.seed, "ac-kmeans"), restarts=self.restarts)
        self.detection_ = dict(
            smaller_cluster_share=sizes,
            flagged_classes=[str(int(label)) for label in labels[flags].unique()],
            features_seconds=round(features_seconds, 3),
            scoring_seconds=round(time.monotonic() - clock - features_seconds, 3))
        return flags.nonzero().flatten()
