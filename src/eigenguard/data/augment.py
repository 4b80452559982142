"""Random crop + horizontal flip on a whole batch at once, on the batch's device.

Parameters are drawn on the generator's device (CPU by default) so a seeded
generator gives the same augmentation wherever the batch lives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["augment_batch", "draw_augment_params", "crop_and_flip"]


def draw_augment_params(
    batch_size: int,
    *,
    crop_padding: int,
    flip: bool,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image (row offset, column offset, flip?) for :func:`crop_and_flip`.

    Offsets are in 0..2*crop_padding; an offset of ``crop_padding`` means no shift.
    """
    if crop_padding < 0:
        raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
    device = generator.device if generator is not None else torch.device("cpu")
    if crop_padding:
        dy, dx = torch.randint(
            0, 2 * crop_padding + 1, (2, batch_size), generator=generator, device=device
        )
    else:
        dy = dx = torch.zeros(batch_size, dtype=torch.int64, device=device)
    if flip:
        flips = torch.rand(batch_size, generator=generator, device=device) < 0.5
    else:
        flips = torch.zeros(batch_size, dtype=torch.bool, device=device)
    return dy, dx, flips


def crop_and_flip(
    images: torch.Tensor,
    dy: torch.Tensor,
    dx: torch.Tensor,
    flips: torch.Tensor,
    crop_padding: int,
) -> torch.Tensor:
    """Zero-pad by ``crop_padding``, take the H×W window at (dy, dx), then mirror where ``flips``.

    ``out[b, :, i, j] = padded[b, :, dy[b] + i, dx[b] + j']`` with ``j' = W-1-j`` for
    flipped images: a single gather, no loop over images.
    """
    if images.dim() != 4:
        raise ValueError(f"expected B×C×H×W images, got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    device = images.device
    dy, dx, flips = dy.to(device), dx.to(device), flips.to(device)
    padded = F.pad(images, (crop_padding,) * 4) if crop_padding else images
    rows = dy[:, None] + torch.arange(h, device=device)  # B×H
    cols = torch.arange(w, device=device).expand(b, w)
    cols = torch.where(flips[:, None], w - 1 - cols, cols) + dx[:, None]  # B×W
    return padded[
        torch.arange(b, device=device)[:, None, None, None],
        torch.arange(c, device=device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def augment_batch(
    images: torch.Tensor,
    *,
    crop_padding: int,
    flip: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Randomly crop (zero padding ``crop_padding``) and, if ``flip``, mirror half the images.

    Returns a new tensor of the same shape, dtype and device; with no padding
    and no flip the input itself is returned.
    """
    if images.dim() != 4:
        raise ValueError(f"expected B×C×H×W images, got shape {tuple(images.shape)}")
    if crop_padding == 0 and not flip:
        return images
    dy, dx, flips = draw_augment_params(
        images.shape[0], crop_padding=crop_padding, flip=flip, generator=generator
    )
    return crop_and_flip(images, dy, dx, flips, crop_padding)
