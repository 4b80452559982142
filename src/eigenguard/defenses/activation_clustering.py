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
PCA (an SVD of the centred features, in torch) is exact, where ICA iterates from a random start.
The split is scikit-learn's ``KMeans`` (k-means++ seeding, Lloyd iterations, the best of
``restarts`` runs by inertia; 10 restarts, scikit-learn's classic default), seeded with an
integer drawn from ``stream_seed(context.seed, "ac-kmeans")``, so flags are deterministic under
the run's seed.

The detector does not know the target class; a class where the poison is the majority (an
all-to-one attack at a high ratio) can split with the *clean* part smaller, and the poison stays.
Nothing is scaled down: the scorer is the stored undefended model and the retraining uses the
run's own training settings.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from sklearn.cluster import KMeans
from torch import nn

from ..seeding import stream_seed
from .base import DefenseContext
from .checks import check_fraction, check_integer
from .detect import DetectAndRetrain
from .features import penultimate_features
from .registry import register_defense

CLUSTERS = 2  # the paper's choice: clean part and poisoned part


def principal_components(features: torch.Tensor, dims: int) -> torch.Tensor:
    """The centred features projected on their top ``dims`` principal directions (fewer when
    the class has fewer samples or features)."""
    centred = features.double() - features.double().mean(dim=0, keepdim=True)
    _, _, right = torch.linalg.svd(centred, full_matrices=False)
    return centred @ right[:dims].T


def kmeans_seed(seed: int) -> int:
    """The run's k-means stream as the 32-bit integer scikit-learn takes as ``random_state``."""
    return stream_seed(seed, "ac-kmeans") % 2**32


def two_means(points: torch.Tensor, *, seed: int, restarts: int = 10) -> torch.Tensor:
    """The cluster (0 or 1) of each point: scikit-learn's k-means, the best of ``restarts``
    seeded runs."""
    fitted = KMeans(n_clusters=CLUSTERS, n_init=restarts, random_state=seed)
    fitted.fit(points.cpu().numpy())
    return torch.from_numpy(fitted.labels_).long()


def smaller_cluster(features: torch.Tensor, *, dims: int, seed: int,
                    restarts: int = 10) -> tuple[torch.Tensor, float]:
    """One class: the mask of its smaller k-means cluster and that cluster's relative size."""
    if len(features) < CLUSTERS:
        return torch.zeros(len(features), dtype=torch.bool), 0.0
    assignment = two_means(principal_components(features, dims), seed=seed, restarts=restarts)
    sizes = torch.bincount(assignment, minlength=CLUSTERS)
    small = int(sizes.argmin())
    return assignment == small, float(sizes[small]) / len(features)


def activation_clustering_flags(features: torch.Tensor, labels: torch.Tensor, *,
                                dims: int = 10, size_threshold: float = 0.35, seed: int = 0,
                                restarts: int = 10) -> tuple[torch.Tensor, dict[str, float]]:
    """The detector on tensors: N × D features and N labels -> (boolean mask of flagged rows,
    the relative size of each class's smaller cluster); ``seed`` is k-means' ``random_state``."""
    flags = torch.zeros(len(features), dtype=torch.bool)
    sizes: dict[str, float] = {}
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        small, size = smaller_cluster(features[members], dims=dims, seed=seed, restarts=restarts)
        sizes[str(int(label))] = round(size, 4)
        if size < size_threshold:
            flags[members[small]] = True
    return flags, sizes


@register_defense("ac")
@dataclass
class ActivationClustering(DetectAndRetrain):
    """Activation Clustering: see the module docstring for the method and its defaults."""

    dims: int = 10
    size_threshold: float = 0.35
    restarts: int = 10

    def __post_init__(self):
        check_integer("dims", self.dims)
        check_fraction("size_threshold", self.size_threshold, high=0.5)
        check_integer("restarts", self.restarts)

    def flag(self, model: nn.Module, context: DefenseContext) -> torch.Tensor:
        clock = time.monotonic()
        features = penultimate_features(model, context.train_set, device=context.device)
        features_seconds = time.monotonic() - clock
        labels = context.train_set.labels
        flags, sizes = activation_clustering_flags(
            features, labels, dims=self.dims, size_threshold=self.size_threshold,
            seed=kmeans_seed(context.seed), restarts=self.restarts)
        self.detection_ = dict(
            smaller_cluster_share=sizes,
            flagged_classes=[str(int(label)) for label in labels[flags].unique()],
            features_seconds=round(features_seconds, 3),
            scoring_seconds=round(time.monotonic() - clock - features_seconds, 3))
        return flags.nonzero().flatten()
