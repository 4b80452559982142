"""An in-memory labelled image set, kept as uint8 so a whole data set fits in RAM."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["ImageSet", "normalize"]


@dataclass(frozen=True, eq=False)
class ImageSet:
    """Images (N×C×H×W uint8), their labels and what is needed to normalise them.

    Frozen so a loaded set is not swapped out from under a training run; the
    tensors themselves are not copied, so edit them through
    :meth:`with_images_labels` (e.g. when poisoning) rather than in place.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
            raise TypeError(
                f"{self.name}: images must be a torch.uint8 tensor, got "
                f"{getattr(images, 'dtype', type(images).__name__)}"
            )
        if images.dim() != 4:
            raise ValueError(
                f"{self.name}: images must be N×C×H×W, got shape {tuple(images.shape)}"
            )
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64:
            raise TypeError(
                f"{self.name}: labels must be a torch.int64 tensor, got "
                f"{getattr(labels, 'dtype', type(labels).__name__)}"
            )
        if labels.dim() != 1:
            raise ValueError(f"{self.name}: labels must be 1-D, got shape {tuple(labels.shape)}")
        if labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"{self.name}: {images.shape[0]} images but {labels.shape[0]} labels"
            )
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if not self.classes:
            raise ValueError(f"{self.name}: classes must not be empty")
        channels = images.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"{self.name}: mean/std need one value per channel ({channels}), "
                f"got {len(self.mean)}/{len(self.std)}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"{self.name}: std must be positive, got {self.std}")
        if labels.numel():
            low, high = int(labels.min()), int(labels.max())
            if low < 0 or high >= len(self.classes):
                bad = low if low < 0 else high
                raise ValueError(
                    f"{self.name}: label {bad} is out of range for "
                    f"{len(self.classes)} classes (0..{len(self.classes) - 1})"
                )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W)."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    def subset(self, indices: Sequence[int] | torch.Tensor) -> ImageSet:
        """The images at ``indices`` (ints or a boolean mask), in that order."""
        index = torch.as_tensor(indices)
        if index.dtype != torch.bool:
            index = index.to(torch.int64)
        return self.with_images_labels(self.images[index], self.labels[index])

    def with_images_labels(self, images: torch.Tensor, labels: torch.Tensor) -> ImageSet:
        """A copy with new tensors and the same metadata, validated again."""
        return dataclasses.replace(self, images=images, labels=labels)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise float images in [0, 1] with this set's mean/std."""
        return normalize(x, self.mean, self.std)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel for C×H×W or N×C×H×W floats in [0, 1].

    Builds the constants on ``x``'s device and dtype, so it works wherever the
    batch already is.
    """
    if x.dim() < 3:
        raise ValueError(f"normalize expects C×H×W or N×C×H×W, got shape {tuple(x.shape)}")
    if len(mean) != x.shape[-3] or len(std) != x.shape[-3]:
        raise ValueError(
            f"normalize: {x.shape[-3]} channels but {len(mean)} means and {len(std)} stds"
        )
    dtype = x.dtype if x.is_floating_point() else torch.float32
    m = torch.as_tensor(tuple(mean), dtype=dtype, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(tuple(std), dtype=dtype, device=x.device).view(-1, 1, 1)
    return (x.to(dtype) - m) / s
