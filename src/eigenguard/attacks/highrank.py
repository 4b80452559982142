"""A high-rank trigger: the adaptive attack against EigenGuard that the source's rebuttal names
(REFERENCE.md §1, "a trigger whose features span many directions (a 'complicated' high-rank
trigger)"). The source gives no construction; this one is ours.

The trigger family. ``fit`` draws m fixed dense patterns B_1 .. B_m: a Gaussian (C·H·W) × m
matrix, each column's per-channel mean removed (so no pattern shifts an image's brightness, the
direction natural images share most), orthonormalised by QR (signs fixed by R's diagonal, so
the patterns are unique given the draw). A poisoned image gets

    δ = eps · √(C·H·W) · Σ_i c_i B_i,     x' = clip(round(x + δ), 0, 255),

with c a unit vector of R^m drawn for that image. Because the B_i are orthonormal and |c| = 1,
‖δ‖₂ = eps · √(C·H·W) exactly: eps is the trigger's root-mean-square amplitude per value on the
0..255 scale (the L2 bound; the uint8 residual's L2 norm is at most ‖δ‖₂ + 0.5·√(C·H·W), since
rounding moves a value by at most 0.5 and clipping only shortens a change).

The coefficients. Images are taken in blocks of m (in the order of the batch given to the
attack): each block's c are the rows of a random orthogonal m × m matrix (Haar, by QR of a
Gaussian matrix with the sign fix). Each c on its own is uniform on the unit sphere, and over a
full block Σ c cᵀ = I: the trigger energy of every m consecutive poisoned images is spread over
the m directions exactly equally, so over n poisoned images no direction carries more than
about ⌈n / m⌉ / n of it, where i.i.d. directions would give (1 + √(m / n))² / m
(Marchenko–Pastur's edge). The draws come from two seeded streams fixed at ``fit``: one for the
poisoned training images (:meth:`HighRank.poison`) and one for every other call of
:meth:`HighRank.apply` (the triggered test images), so a test image gets a fresh c, not one
seen in training, and both are deterministic (a call on n images gives them the same n
coefficients, in order, every time). :meth:`HighRank.triggers` returns the float δ that a call
on n images adds, for either stream.

Why its features span many directions. A fixed trigger (BadNets, Blended) adds the same vector
to every poisoned image; in a batch the triggered samples' features share that one offset, a
rank-one component that carries the largest singular value once the poison is learned, which is
what EigenGuard's spectral filter acts on. Here the trigger of each image is a different vector
of an m-dimensional subspace, and across a batch (or the training set) the trigger components
are spread over the m directions with equal energy: the triggers' matrix has rank m (for at
least m images) and a flat spectrum, so no single direction dominates. Through the first layers
the offset becomes J·δ (J the layer's Jacobian on the trigger subspace), still spread over up
to m directions. To install the backdoor, the network must map the whole m-dimensional family
to the target; a per-batch filter that equalises only the top k directions does not isolate
that family when m is comparable to or larger than k. The knobs: m sets the rank (default 32,
the project's default EigenGuard k); eps sets the total energy, and eps² · (C·H·W) / m the
energy per direction.

What this does not guarantee, stated: the rank is controlled at the input. After conv + ReLU
layers a network may compute a low-rank summary of the family (for instance a local "noise
energy" that every dense pattern raises) and put the backdoor there. And against EigenGuard's
running mode, which keeps the top k directions of the training features' second moment and
damps the rest by 0.001, spreading has a cost: each trigger direction carries only 1/m of the
poison's energy, so with m large each may fall below the k-th eigenvalue and be damped, where a
strong fixed trigger's single direction enters the kept top k. Which effect wins is measured,
not assumed; eps is the knob that restores energy per direction.

Defaults: m = 32 (above); eps = 24, close to the energy of the project's other triggers, so
that differences in ASR come from the trigger's rank rather than its energy. Measured RMS of the
uint8 residual on 5,000 Fashion-MNIST training images: BadNets 27.0, Blended (alpha 0.2) 25.5,
SIG (delta 40) 23.5, this attack at eps 24: 20.0 (clipping on the black background cuts part
of δ; its largest change was 123). Dirty label, like BadNets: poisoned samples are relabelled
to the target.

Adaptation to 28×28 grey images: none beyond the size; the patterns are drawn at the training
images' size and channels (dense in every channel), and eps is per value, so the per-pixel
amplitude is the same at any size. On dark pixels clipping cuts the negative half of δ, so the
trigger actually added to a mostly black image is a rectified member of the family.
"""
from __future__ import annotations

import math
import numbers
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..data import ImageSet
from .base import Attack, check_images, is_real
from .registry import register_attack

#: the coefficient streams: poisoned training images, and every other application
STREAMS = ("train", "test")
#: images triggered per chunk (bounds the float64 working memory, not a per-image loop)
CHUNK = 4096


def _sign_fixed_qr(matrix: torch.Tensor) -> torch.Tensor:
    """Q of the QR decomposition of (a batch of) matrices, each column's sign chosen so that R's
    diagonal is positive: unique for a full-rank input, and Haar-distributed for a square
    Gaussian one (Mezzadri 2007)."""
    q, r = torch.linalg.qr(matrix)
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs[signs == 0] = 1
    return q * signs.unsqueeze(-2)


@register_attack("highrank")
@dataclass
class HighRank(Attack):
    """x' = round(x + eps·√(CHW)·Σ c_i B_i): m fixed orthonormal dense patterns, a different unit
    c for every image (orthogonal within each block of m images); dirty label."""

    needs_fit = True

    m: int = 32
    eps: float = 24.0

    def __post_init__(self):
        if not isinstance(self.m, numbers.Integral) or isinstance(self.m, bool) or self.m < 1:
            raise ValueError(f"HighRank m must be an integer >= 1 (the number of patterns, the "
                             f"trigger's rank), got {self.m!r}")
        if not is_real(self.eps) or not 0 < self.eps <= 255:
            raise ValueError(f"HighRank eps must be a number in (0, 255] (the trigger's RMS "
                             f"amplitude per value on 0..255), got {self.eps!r}")
        self.m, self.eps = int(self.m), float(self.eps)
        self._stream = "test"

    # -- fitting -------------------------------------------------------------------------------

    def fit(self, train: ImageSet, *, seed: int = 0,
            device: str | torch.device = "cpu") -> "HighRank":
        """Draw the m patterns at the training images' shape and the two streams' seeds, from
        ``seed`` (on the CPU, in float64; ``device`` is not needed)."""
        channels, (height, width) = train.in_channels, train.image_size
        free = channels * (height * width - 1)  # dimensions left once per-channel means go
        if self.m > free:
            raise ValueError(f"HighRank m = {self.m} patterns do not fit {channels}×{height}×"
                             f"{width} images: m must be at most {free} (C·(H·W − 1))")
        draw = torch.Generator().manual_seed(seed)
        gaussian = torch.randn(channels, height * width, self.m, generator=draw,
                               dtype=torch.float64)
        gaussian = gaussian - gaussian.mean(dim=1, keepdim=True)
        basis = _sign_fixed_qr(gaussian.reshape(channels * height * width, self.m))
        self.basis_ = basis.T.reshape(self.m, channels, height, width).contiguous()
        self.stream_seeds_ = torch.randint(0, 2 ** 62, (len(STREAMS),), generator=draw,
                                           dtype=torch.int64)
        return self

    # -- the trigger ---------------------------------------------------------------------------

    def coefficients(self, count: int, stream: str = "test") -> torch.Tensor:
        """The unit vectors c (count × m, float64) that a call on ``count`` images gives its
        images, in order; rows i·m .. i·m + m − 1 are the rows of one random orthogonal matrix."""
        self.check_fitted()
        if stream not in STREAMS:
            raise ValueError(f"HighRank stream must be one of {STREAMS}, got {stream!r}")
        seed = int(self.stream_seeds_[STREAMS.index(stream)])
        blocks = -(-count // self.m)
        if blocks == 0:
            return torch.zeros(0, self.m, dtype=torch.float64)
        gaussian = torch.randn(blocks, self.m, self.m, dtype=torch.float64,
                               generator=torch.Generator().manual_seed(seed))
        return _sign_fixed_qr(gaussian).reshape(blocks * self.m, self.m)[:count]

    def triggers(self, count: int, stream: str = "test") -> torch.Tensor:
        """The float64 triggers δ (count, C, H, W) added to the images of a call on ``count``
        images: ``"train"`` for :meth:`poison`, ``"test"`` for :meth:`apply`."""
        coefficients = self.coefficients(count, stream)
        return self._triggers(coefficients, self.basis_)

    def _triggers(self, coefficients: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        scale = self.eps * math.sqrt(basis[0].numel())
        flat = scale * coefficients.to(basis.device) @ basis.flatten(1)
        return flat.reshape(len(coefficients), *basis.shape[1:])

    @property
    def l2_norm(self) -> float:
        """‖δ‖₂ of every trigger (before rounding and clipping): eps · √(C·H·W)."""
        self.check_fitted()
        return self.eps * math.sqrt(self.basis_[0].numel())

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        self.check_fitted()
        if tuple(images.shape[1:]) != tuple(self.basis_.shape[1:]):
            raise ValueError(f"HighRank was fitted on images of shape "
                             f"{tuple(self.basis_.shape[1:])} (C, H, W) and cannot trigger "
                             f"images of shape {tuple(images.shape[1:])}: fit it on images of "
                             f"that shape")
        coefficients = self.coefficients(len(images), self._stream)
        basis = self.basis_.to(images.device)
        out = torch.empty_like(images)
        for start in range(0, len(images), CHUNK):
            stop = start + CHUNK
            delta = self._triggers(coefficients[start:stop], basis)
            out[start:stop] = (images[start:stop].double() + delta).round().clamp(0, 255).to(
                torch.uint8)
        return out

    # -- poisoning -----------------------------------------------------------------------------

    @contextmanager
    def _using(self, stream: str):
        previous, self._stream = self._stream, stream
        try:
            yield
        finally:
            self._stream = previous

    def poison(self, train: ImageSet, ratio: float, target: int, seed: int, pool: str = "all",
               **kwargs):
        """Poison as the base class does, with the coefficients of the training stream."""
        with self._using("train"):
            return super().poison(train, ratio, target, seed, pool, **kwargs)
