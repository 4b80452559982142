"""The EigenGuard spectral filter: a function on a tensor and a module that holds its settings.

For a batch of features flattened to F (B × d) with thin SVD F = U Σ Vᵀ, the filter sets the top
k singular values to one common scale c and multiplies the rest by ``tail_scale`` (t)::

    F' = U Σ' Vᵀ = t·F + U_k · diag(c/σ_i − t) · U_kᵀ · F

The right-hand form needs only the top-k eigenpairs of the B × B Gram matrix F Fᵀ (never a d × d
matrix, d reaches 65,536 after a CIFAR ResNet's first stage) and never divides by a tiny tail
singular value. The filter is a B × B matrix P applied from the left, F' = P F, which is what the
batch-composition analyses in :mod:`eigenguard.evaluate` build on.

The filter damps the dominant directions relative to a tail, so it needs one: a batch is filtered
only when it has more than k nonzero singular values (a singular value counts as nonzero above
``rank_rtol`` times the largest, the one rank threshold of this module). A batch with k or fewer
(B ≤ k: a small last batch, the local batch under DDP, a batch of one; or rank-deficient
features) passes unchanged, P = I: forcing all its directions to one scale would whiten it,
keeping the subspace it spans and none of the relative magnitudes the next layers learn from.
:class:`EigenGuard` in training mode filters such a batch with its running subspace instead, when
it has one.

Because U_k diag(g) U_kᵀ F = F V_k diag(g) V_kᵀ, the same filter can act on each row alone given the
right singular vectors V_k and the singular values. :class:`EigenGuard` keeps running estimates of
them (like BatchNorm's running statistics) for a batch-independent evaluation mode.

Everything here runs with autocast disabled: the spectrum needs float32 products at least (float64
for the Gram matrices), and autocast would run them in bfloat16 or float16. The output has the
input's dtype.
"""
from __future__ import annotations

import contextlib
import functools
import numbers
import math

import torch
from torch import nn

from .errors import MissingStatisticsError

#: the common scale c of the top k singular values: the k-th one, their mean, or zero (the
#: source's ablation: the top k directions removed instead of equalised)
SCALES = ("kth", "mean", "zero")
METHODS = ("gram", "svd")
GRAD_MODES = ("detach", "full")
EVAL_MODES = ("batch", "running", "identity")

#: singular values at or below this fraction of the largest count as zero (on eigenvalues of a
#: Gram matrix or second moment, which are squared singular values: rank_rtol²).
DEFAULT_RANK_RTOL = 1e-5
#: eigenvalue gaps below this fraction of the largest eigenvalue are smoothed in grad="full".
DEFAULT_GAP_RTOL = 1e-6


def _is_integer(value) -> bool:
    """True for ints (and NumPy integers); bools and floats are refused, not rounded."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_k(k) -> int:
    """Validate the number of dominant directions; bools and floats are refused, not rounded."""
    if not _is_integer(k):
        raise TypeError(f"EigenGuard k must be an integer >= 1, got {k!r} ({type(k).__name__}); "
                        "pass for example k=16")
    if k < 1:
        raise ValueError(f"EigenGuard k must be >= 1, got {k}: k is how many dominant singular "
                         "directions share one scale; pass for example k=16")
    return int(k)


def _check_settings(k, tail_scale, scale, rank_rtol) -> int:
    k = check_k(k)
    if not isinstance(tail_scale, numbers.Real) or not math.isfinite(tail_scale) or tail_scale < 0:
        raise ValueError(f"tail_scale must be a finite number >= 0, got {tail_scale!r}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if not 0 <= rank_rtol < 1:
        raise ValueError(f"rank_rtol must be in [0, 1), got {rank_rtol!r}")
    return k


def _check_finite(values: torch.Tensor) -> None:
    if not torch.isfinite(values).all():
        raise FloatingPointError(
            "EigenGuard received non-finite features (NaN or Inf): the layers before it diverged. "
            "Lower the learning rate or check the input data for NaN values.")


def _nonzero(singular: torch.Tensor, rank_rtol: float) -> torch.Tensor:
    """Which values of a descending spectrum of singular values count as nonzero (last dim)."""
    return singular > singular[..., :1] * rank_rtol


def _autocast_off(function):
    """Run ``function`` with autocast disabled on the device of its first tensor argument."""
    @functools.wraps(function)
    def run(*args, **kwargs):
        device = next(arg for arg in args if isinstance(arg, torch.Tensor)).device.type
        if not torch.amp.is_autocast_available(device):
            return function(*args, **kwargs)
        with torch.autocast(device_type=device, enabled=False):
            return function(*args, **kwargs)
    return run


class _SafeEigh(torch.autograd.Function):
    """Symmetric eigendecomposition whose backward pass survives equal eigenvalues.

    The exact derivative of the eigenvectors has factors 1/(λ_j − λ_i). Where two eigenvalues are
    closer than ``gap_rtol``·max|λ| the filter is (or nearly is) invariant to rotations inside their
    common eigenspace, and the factor is replaced by the Lorentzian (λ_j − λ_i)/((λ_j − λ_i)² + ε²)
    with ε = gap_rtol·max|λ|: exact to relative order (ε/gap)² on well-separated spectra, bounded
    by 1/(2ε) everywhere, so no NaN or Inf reaches the weights.
    """

    @staticmethod
    def forward(ctx, matrix, gap_rtol):
        eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
        ctx.save_for_backward(eigenvalues, eigenvectors)
        ctx.gap_rtol = gap_rtol
        return eigenvalues, eigenvectors

    @staticmethod
    def backward(ctx, grad_values, grad_vectors):
        eigenvalues, eigenvectors = ctx.saved_tensors
        inner = torch.zeros_like(eigenvectors)
        if grad_vectors is not None:
            gap = eigenvalues.unsqueeze(-2) - eigenvalues.unsqueeze(-1)  # gap[i, j] = λ_j − λ_i
            eps = ctx.gap_rtol * eigenvalues.abs().amax(-1, keepdim=True).unsqueeze(-1)
            inverse = gap / (gap * gap + eps * eps).clamp_min(torch.finfo(gap.dtype).tiny)
            inner = inverse * (eigenvectors.transpose(-1, -2) @ grad_vectors)
        if grad_values is not None:
            inner = inner + torch.diag_embed(grad_values)
        grad = eigenvectors @ inner @ eigenvectors.transpose(-1, -2)
        return (grad + grad.transpose(-1, -2)) / 2, None


def filter_weights(gram: torch.Tensor, k: int, tail_scale: float = 1e-3, scale: str = "kth",
                   rank_rtol: float = DEFAULT_RANK_RTOL, differentiable: bool = False,
                   gap_rtol: float = DEFAULT_GAP_RTOL) -> torch.Tensor:
    """The B × B matrix P with F' = P F, from the Gram matrix G = F Fᵀ (batched over leading dims).

    Computed in float64 whatever G's dtype: B is small, and the eigenvalues of G are the squared
    singular values of F, so single precision would lose the lower half of the spectrum.
    P = I for a batch with k or fewer nonzero singular values (no tail to damp; module docstring).
    With ``differentiable=True`` autograd goes through the eigendecomposition (see _SafeEigh).
    """
    return _weights_and_tail(gram, k, tail_scale, scale, rank_rtol, differentiable, gap_rtol)[0]


def _weights_and_tail(gram, k, tail_scale, scale, rank_rtol, differentiable=False,
                      gap_rtol=DEFAULT_GAP_RTOL):
    """filter_weights, and whether each batch had a tail (was filtered), shape (..., 1)."""
    k = _check_settings(k, tail_scale, scale, rank_rtol)
    gram = gram.to(torch.float64) if differentiable else gram.detach().to(torch.float64)
    _check_finite(gram)
    n = gram.shape[-1]
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    if n <= k:  # B ≤ k: no batch has a tail
        return eye.expand(gram.shape).clone(), gram.new_zeros(gram.shape[:-1] + (1,), dtype=bool)
    if differentiable:
        eigenvalues, eigenvectors = _SafeEigh.apply(gram, gap_rtol)
    else:
        eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
    power = eigenvalues.flip(-1)  # descending squared singular values of F
    vectors = eigenvectors.flip(-1)
    with torch.no_grad():
        tail = _nonzero(power.clamp_min(0).sqrt(), rank_rtol).sum(-1, keepdim=True) > k
        top = (torch.arange(n, device=gram.device) < k) & tail  # forced to the common scale
    # square roots only where the value is positive, so no infinite derivative appears elsewhere
    sigma = torch.where(top, power, torch.ones_like(power)).sqrt()
    common = _common_scale(sigma[..., k - 1:k], (sigma * top).sum(-1, keepdim=True) / k, scale)
    gain = torch.where(top, common / sigma - tail_scale, torch.zeros_like(sigma))
    weights = (vectors * gain.unsqueeze(-2)) @ vectors.transpose(-1, -2) + tail_scale * eye
    return torch.where(tail.unsqueeze(-1), weights, eye), tail


#: bytes of one float64 column block in exact_gram: small enough to stay in a CPU core's cache.
GRAM_BLOCK_BYTES = 1 << 20


def exact_gram(rows: torch.Tensor) -> torch.Tensor:
    """``rows @ rows.T`` in float64, for any input dtype.

    The eigenvalues of F Fᵀ are the squared singular values of F, so the product needs float64.
    Converting all of a (B, d) float32 batch to float64 first writes a copy twice its size; on the
    CPU the columns go through in blocks of about GRAM_BLOCK_BYTES instead, each converted while
    still in cache (about 1.8 times faster at B = 128, d = 65,536, with the same float64 sums).
    """
    if rows.dtype == torch.float64:
        return rows @ rows.T
    count, width = rows.shape
    block = GRAM_BLOCK_BYTES // (8 * max(count, 1))
    if rows.device.type != "cpu" or block < 256 or width <= block:
        exact = rows.to(torch.float64)
        return exact @ exact.T
    gram = torch.zeros(count, count, dtype=torch.float64)
    for start in range(0, width, block):
        part = rows[:, start:start + block].to(torch.float64)
        gram.addmm_(part, part.T)
    return gram


def _float64_rows(parts: list[torch.Tensor]):
    """The rows of (d, n_i) matrices side by side, converted to float64 a block of rows at a time.

    On the CPU each block holds about GRAM_BLOCK_BYTES and is converted while in cache (see
    exact_gram); elsewhere there is one block. Yields (first row, block).
    """
    length, width = parts[0].shape[0], sum(part.shape[1] for part in parts)
    block = length if parts[0].device.type != "cpu" else max(1, GRAM_BLOCK_BYTES // (8 * width))
    for start in range(0, length, block):
        yield start, torch.cat([part[start:start + block] for part in parts], 1).to(torch.float64)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def svd_filter_weights(flat: torch.Tensor, k: int, tail_scale: float = 1e-3, scale: str = "kth",
                       rank_rtol: float = DEFAULT_RANK_RTOL) -> torch.Tensor:
    """The reference path: P from ``torch.linalg.svd`` of F itself (slow; for tests and benchmarks)."""
    return _svd_weights_and_tail(flat, k, tail_scale, scale, rank_rtol)[0]


def _svd_weights_and_tail(flat, k, tail_scale, scale, rank_rtol):
    k = _check_settings(k, tail_scale, scale, rank_rtol)
    exact = flat.detach().to(torch.float64)
    _check_finite(exact)
    u, sigma, _ = torch.linalg.svd(exact, full_matrices=False)
    eye = torch.eye(exact.shape[0], dtype=torch.float64, device=exact.device)
    gains = _top_gains(sigma, k, tail_scale, scale, rank_rtol)
    if gains is None:
        return eye, False
    top = u[:, :k]
    return tail_scale * eye + (top * gains) @ top.T, True


@_autocast_off
def spectral_filter(features: torch.Tensor, k: int, tail_scale: float = 1e-3, scale: str = "kth",
                    rank_rtol: float = DEFAULT_RANK_RTOL, method: str = "gram",
                    grad: str = "detach") -> torch.Tensor:
    """Filter a batch of features (B, ...) in its singular basis; returns the input's shape and dtype.

    ``method="gram"`` (the fast path) eigendecomposes the B × B Gram matrix; ``method="svd"``
    (the reference) takes the SVD of the B × d features. With ``grad="detach"`` the filter matrix
    is a constant for autograd (the gradient flows through F' = P F with P fixed); with
    ``grad="full"`` it is the exact derivative through the eigendecomposition, with near-equal
    eigenvalues safeguarded (fast path only). A batch with k or fewer nonzero singular values
    (B ≤ k, a batch of one) is returned unchanged: it has no tail to damp, and equalising all
    of its directions would whiten it.
    """
    flat = _flatten_batch(features, method, grad)
    weights, _, _ = _filter_matrix(flat, k, tail_scale, scale, rank_rtol, method, grad)
    return _apply_filter(weights, flat, features)


def _flatten_batch(features: torch.Tensor, method: str, grad: str) -> torch.Tensor:
    """Check the input and the path settings; the features as rows, (B, d)."""
    if features.dim() < 2:
        raise ValueError(f"spectral_filter expects a batch (B, ...) with at least 2 dims, got shape "
                         f"{tuple(features.shape)}; add a batch dimension with x.unsqueeze(0)")
    if not features.is_floating_point():
        raise TypeError(f"spectral_filter expects floating-point features, got {features.dtype}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if grad not in GRAD_MODES:
        raise ValueError(f"grad must be one of {GRAD_MODES}, got {grad!r}")
    if grad == "full" and method != "gram":
        raise ValueError("grad='full' is computed on the fast path: use method='gram'")
    return features.reshape(features.shape[0], -1)


def _filter_matrix(flat, k, tail_scale, scale, rank_rtol, method, grad):
    """The filter matrix P, the float64 Gram matrix F Fᵀ it came from (None on the SVD path), and
    whether the batch had a tail (False: P = I)."""
    if grad == "full" and torch.is_grad_enabled():
        exact = flat.to(torch.float64)
        gram = exact @ exact.T
        weights, tail = _weights_and_tail(gram, k, tail_scale, scale, rank_rtol,
                                          differentiable=True)
        return weights, gram.detach(), bool(tail.all())
    with torch.no_grad():
        if method == "svd":
            weights, tail = _svd_weights_and_tail(flat, k, tail_scale, scale, rank_rtol)
            return weights, None, tail
        gram = exact_gram(flat.detach())
        weights, tail = _weights_and_tail(gram, k, tail_scale, scale, rank_rtol)
        return weights, gram, bool(tail.all())


def _apply_filter(weights: torch.Tensor, flat: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    dtype = _compute_dtype(features.dtype)
    out = weights.to(dtype) @ flat.to(dtype)
    return out.to(features.dtype).reshape(features.shape)


def _top_gains(sigma: torch.Tensor, k: int, tail_scale: float, scale: str, rank_rtol: float):
    """Gains c/σ_i − t of the top k values of a descending spectrum of singular values, or None
    when it has k or fewer nonzero values (no tail: the filter is the identity)."""
    if int(_nonzero(sigma, rank_rtol).sum()) <= k:
        return None
    top = sigma[:k]
    return _common_scale(top[-1], top.mean(), scale) / top - tail_scale


def _common_scale(kth: torch.Tensor, mean: torch.Tensor, scale: str) -> torch.Tensor:
    return kth if scale == "kth" else mean if scale == "mean" else torch.zeros_like(kth)


@_autocast_off
def update_running_subspace(basis: torch.Tensor, power: torch.Tensor, flat: torch.Tensor,
                            momentum: float, rank: int, batch_gram: torch.Tensor | None = None,
                            rank_rtol: float = DEFAULT_RANK_RTOL
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of an exponential moving average of the feature second moment E[x xᵀ], kept at rank r.

    ``basis`` (d × r) and ``power`` (r) hold M ≈ V diag(λ) Vᵀ. The new M is
    (1 − m)·M + m·FᵀF / B = A Aᵀ with A = [V·a, s·Fᵀ], a = sqrt((1 − m)λ), s = sqrt(m / B), whose
    top r eigenpairs come from the small (r + B) × (r + B) matrix AᵀA: memory O(r·d), never d × d.
    AᵀA is assembled in float64 from blocks: a·(VᵀV)·a, the cross term a·(VᵀFᵀ)·s and s²·F Fᵀ, the
    batch Gram matrix that the filter has already computed (pass it as ``batch_gram`` to skip the
    product). Directions are kept by the filter's threshold, sqrt(λ_i) > rank_rtol·sqrt(λ_1), so a
    direction the batch filter counts is also kept here. Float64 makes λ exact to about
    1e-14·λ_1, far below rank_rtol² = 1e-10 at the default, and forms the new basis vectors
    A·v_i/sqrt(λ_i) without the cancellation that would leak the strong directions into a weak
    one in float32 (stored in float32, they carry its rounding only). An empty ``basis`` starts
    the estimate from this batch alone.
    """
    work = _compute_dtype(flat.dtype)
    rows = flat.detach().to(work)
    batch = rows.shape[0]
    if batch_gram is None:
        batch_gram = exact_gram(rows)
    r = basis.shape[1] if basis.numel() else 0
    if not r:
        momentum = 1.0
    old = basis.to(work)
    columns = [old, rows.T] if r else [rows.T]  # A = [V, Fᵀ] · diag(weight)
    weight = torch.cat([(power.to(torch.float64).clamp_min(0) * (1 - momentum)).sqrt()[:r],
                        rows.new_full((batch,), math.sqrt(momentum / batch), dtype=torch.float64)])
    gram = torch.empty(r + batch, r + batch, dtype=torch.float64, device=rows.device)
    gram[r:, r:] = batch_gram.to(torch.float64)
    if r:
        top = torch.zeros(r, r + batch, dtype=torch.float64, device=rows.device)
        for _, block in _float64_rows(columns):
            top.addmm_(block[:, :r].T, block)  # Vᵀ [V, Fᵀ]
        gram[:r] = top
        gram[r:, :r] = top[:, r:].T
    gram = gram * torch.outer(weight, weight)
    _check_finite(gram)
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    eigenvalues, eigenvectors = eigenvalues.flip(0)[:rank], eigenvectors.flip(1)[:, :rank]
    eigenvalues = eigenvalues.clamp_min(0)
    # below float64 rounding of the small matrix a value means nothing, whatever rank_rtol
    rounding = eigenvalues[:1] * torch.finfo(torch.float64).eps * gram.shape[0]
    keep = _nonzero(eigenvalues.sqrt(), rank_rtol) & (eigenvalues > rounding)
    scale = torch.where(keep, eigenvalues.clamp_min(1e-300).rsqrt(), torch.zeros_like(eigenvalues))
    coefficients = eigenvectors * scale * weight.unsqueeze(1)  # new basis = [V, Fᵀ] · coefficients
    new_basis = torch.empty(rows.shape[1], coefficients.shape[1], dtype=work, device=rows.device)
    for start, block in _float64_rows(columns):
        new_basis[start:start + block.shape[0]] = block @ coefficients
    new_power = torch.where(keep, eigenvalues, torch.zeros_like(eigenvalues))
    if new_basis.shape[1] < rank:  # fewer columns than the sketch rank so far: pad with zeros
        pad = rank - new_basis.shape[1]
        new_basis = torch.cat([new_basis, new_basis.new_zeros(new_basis.shape[0], pad)], dim=1)
        new_power = torch.cat([new_power, new_power.new_zeros(pad)])
    return new_basis, new_power.to(torch.float32)


@_autocast_off
def running_filter(features: torch.Tensor, basis: torch.Tensor, power: torch.Tensor, k: int,
                   tail_scale: float = 1e-3, scale: str = "kth",
                   rank_rtol: float = DEFAULT_RANK_RTOL) -> torch.Tensor:
    """The filter with a fixed subspace: x' = t·x + (x V_k) diag(c/σ_i − t) V_kᵀ for each row alone.

    σ_i = sqrt(λ_i) of the running second moment; the gains c/σ_i are ratios of singular values, so
    they do not depend on the batch size the statistics came from. Statistics with k or fewer
    nonzero values return the features unchanged, as the batch filter does on such a batch.
    """
    k = _check_settings(k, tail_scale, scale, rank_rtol)
    gains = _top_gains(power.to(torch.float64).clamp_min(0).sqrt(), k, tail_scale, scale, rank_rtol)
    if gains is None:
        return features
    flat = features.reshape(features.shape[0], -1)
    dtype = _compute_dtype(features.dtype)
    x = flat.to(dtype)
    top = basis[:, :k].to(dtype)
    out = tail_scale * x + ((x @ top) * gains.to(dtype)) @ top.T
    return out.to(features.dtype).reshape(features.shape)


class EigenGuard(nn.Module):
    """Drop-in layer that damps the dominant singular directions of each training batch.

    A training batch with k or fewer nonzero singular values (B ≤ k: a small last batch, the
    local batch under DDP) has no tail to damp, and equalising its directions would whiten it. It is
    filtered with the running subspace as it stood before this batch (the filter of evaluation,
    independent of the batch), or passed unchanged while there are no running statistics yet. It
    is still folded into the running statistics when due, as BatchNorm folds a small last batch: a
    run whose every local batch has B ≤ k then filters with the running subspace from its second
    batch on, instead of never filtering. In ``eval_mode="batch"`` such a test batch passes
    unchanged (that mode depends on the batch alone, and a batch of one is the identity).

    Args:
        k: how many dominant directions are forced to one common scale.
        tail_scale: factor for the remaining singular values (the source uses 1e-3).
        scale: the common scale, ``"kth"`` (the k-th singular value), ``"mean"`` (mean of the top
            k) or ``"zero"`` (the top k directions removed: the source's ablation, which its
            rebuttal says costs clean accuracy).
        grad: ``"detach"``: the filter matrix is a constant in the backward pass; ``"full"``: the
            exact derivative through the eigendecomposition, near-equal eigenvalues safeguarded.
        eval_mode: what the layer does in ``model.eval()``: ``"running"`` (the default) filters each
            image alone with the running subspace estimated during training, so a prediction does
            not depend on the rest of its batch; ``"batch"`` filters each test batch (the source's
            behaviour); ``"identity"`` passes features through.
        track_running_stats: keep, during training, a running estimate of the dominant feature
            subspace (buffers ``running_basis`` d × r and ``running_power`` r, like BatchNorm's
            running statistics; they travel in the state_dict). Required by ``eval_mode="running"``.
        rank_rtol: singular values at or below this fraction of the largest count as zero, in the
            batch filter and in the running statistics alike (rank_rtol² on their eigenvalues).
        momentum: weight of each batch folded into the running estimate.
        stats_every: fold one training batch in every ``stats_every`` into the running estimate
            (the first always); the update costs as much as the filter or more after an early
            stage, and a moving average with momentum 0.1 does not need every batch. A training
            batch with more than k directions is filtered the same for every value: the running
            statistics serve at test time and for training batches without a tail.
        sketch_rank: r, the rank of the running estimate (default 2k).
        method: ``"gram"`` (fast: B × B Gram matrix) or ``"svd"`` (reference: SVD of the features).
    """

    def __init__(self, k: int = 16, tail_scale: float = 1e-3, scale: str = "kth",
                 grad: str = "detach", eval_mode: str = "running",
                 rank_rtol: float = DEFAULT_RANK_RTOL, track_running_stats: bool = True,
                 momentum: float = 0.1, stats_every: int = 2, sketch_rank: int | None = None,
                 method: str = "gram"):
        super().__init__()
        self.k = _check_settings(k, tail_scale, scale, rank_rtol)
        if grad not in GRAD_MODES:
            raise ValueError(f"grad must be one of {GRAD_MODES}, got {grad!r}")
        if eval_mode not in EVAL_MODES:
            raise ValueError(f"eval_mode must be one of {EVAL_MODES}, got {eval_mode!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if eval_mode == "running" and not track_running_stats:
            raise ValueError("eval_mode='running' (the default) filters with the running statistics, "
                             "so it needs track_running_stats=True; without them pass "
                             "eval_mode='batch' or eval_mode='identity'")
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")
        if not _is_integer(stats_every) or stats_every < 1:
            raise ValueError(f"stats_every must be an integer >= 1 (1: fold every training batch "
                             f"into the running statistics), got {stats_every!r}")
        if sketch_rank is not None and (not _is_integer(sketch_rank) or sketch_rank < self.k):
            raise ValueError(f"sketch_rank must be an integer >= k ({self.k}), got {sketch_rank!r}")
        self.tail_scale = float(tail_scale)
        self.scale = scale
        self.grad = grad
        self.eval_mode = eval_mode
        self.rank_rtol = float(rank_rtol)
        self.track_running_stats = bool(track_running_stats)
        self.momentum = float(momentum)
        self.stats_every = int(stats_every)
        self._batches_since_update = 0
        self.sketch_rank = int(sketch_rank) if sketch_rank is not None else 2 * self.k
        self.method = method
        # sized on the first training batch, when the feature dimension d is known
        self.register_buffer("running_basis", torch.zeros(0))
        self.register_buffer("running_power", torch.zeros(0))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))

    def settings(self) -> dict:
        """The constructor arguments, for configs and reports."""
        return dict(k=self.k, tail_scale=self.tail_scale, scale=self.scale, grad=self.grad,
                    eval_mode=self.eval_mode, rank_rtol=self.rank_rtol,
                    track_running_stats=self.track_running_stats, momentum=self.momentum,
                    stats_every=self.stats_every, sketch_rank=self.sketch_rank, method=self.method)

    @property
    def has_running_stats(self) -> bool:
        return self.running_basis.numel() > 0

    @torch.no_grad()
    def update_running_stats(self, features: torch.Tensor,
                             batch_gram: torch.Tensor | None = None) -> None:
        """Fold one batch into the running subspace estimate (``batch_gram``: F Fᵀ if known).

        ``num_batches_tracked`` counts the batches folded in.
        """
        flat = features.reshape(features.shape[0], -1)
        self._check_width(flat.shape[1])
        basis, power = update_running_subspace(self.running_basis, self.running_power,
                                               flat.float(), self.momentum, self.sketch_rank,
                                               batch_gram, self.rank_rtol)
        self.running_basis, self.running_power = basis, power
        self.num_batches_tracked += 1

    def _check_width(self, width: int) -> None:
        if self.has_running_stats and self.running_basis.shape[0] != width:
            raise ValueError(f"EigenGuard running statistics are for {self.running_basis.shape[0]} "
                             f"features, got {width}: the layer sees another shape")

    def _stats_due(self) -> bool:
        """Whether this training batch is folded into the running statistics (every stats_every-th)."""
        due = not self.has_running_stats or self._batches_since_update >= self.stats_every - 1
        self._batches_since_update = 0 if due else self._batches_since_update + 1
        return due

    def running(self, features: torch.Tensor) -> torch.Tensor:
        """Filter each sample alone with the running subspace (batch-independent)."""
        if not self.has_running_stats:
            raise MissingStatisticsError("EigenGuard has no running statistics: train the model with "
                               "track_running_stats=True before evaluating with eval_mode='running'")
        self._check_width(features[0].numel())
        return running_filter(features, self.running_basis, self.running_power, self.k,
                              self.tail_scale, self.scale, self.rank_rtol)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # the running buffers are sized lazily: take the checkpoint's shapes
        for name in ("running_basis", "running_power"):
            incoming = state_dict.get(prefix + name)
            if incoming is not None and incoming.shape != getattr(self, name).shape:
                setattr(self, name, torch.zeros_like(incoming, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        # a checkpoint of the model without EigenGuard loads too: no running statistics yet
        for name in ("running_basis", "running_power", "num_batches_tracked"):
            if prefix + name in missing_keys:
                missing_keys.remove(prefix + name)

    def weights_from_gram(self, gram: torch.Tensor) -> torch.Tensor:
        """The filter matrix P (F' = P F) for Gram matrices batched over leading dims."""
        return filter_weights(gram, self.k, self.tail_scale, self.scale, self.rank_rtol)

    def filter(self, features: torch.Tensor) -> torch.Tensor:
        """Apply the filter to a batch, whatever the train/eval state."""
        return spectral_filter(features, self.k, self.tail_scale, self.scale, self.rank_rtol,
                               self.method, self.grad)

    @_autocast_off
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self._training_forward(features)
        if self.eval_mode == "identity":
            return features
        if self.eval_mode == "running":
            return self.running(features)
        return self.filter(features)

    def _training_forward(self, features: torch.Tensor) -> torch.Tensor:
        """Filter the batch (or, without a tail, use the running subspace), then fold it in."""
        flat = _flatten_batch(features, self.method, self.grad)
        weights, gram, tail = _filter_matrix(flat, self.k, self.tail_scale, self.scale,
                                             self.rank_rtol, self.method, self.grad)
        if tail:
            out = _apply_filter(weights, flat, features)
        elif self.has_running_stats:  # the statistics before this batch: batch-independent
            out = self.running(features)
        else:
            out = features
        if self.track_running_stats and self._stats_due():
            self.update_running_stats(features, gram)  # reuses the filter's Gram matrix
        return out

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.settings().items())

    def _filter_output(self, module, inputs, output):
        """Forward hook installed by :func:`guard` on the module it follows."""
        return self(output)


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _insert_after(sequence: nn.Sequential, leaf: str, name: str, layer: nn.Module) -> None:
    """Put ``layer`` right after child ``leaf``; the other children keep their names."""
    children = list(sequence._modules.items())
    sequence._modules.clear()
    for child_name, child in children:
        sequence._modules[child_name] = child
        if child_name == leaf:
            sequence._modules[name] = layer


def insert_after(model: nn.Module, after: str, layer: nn.Module, suffix: str) -> nn.Module:
    """Insert ``layer`` after the submodule named ``after`` (dotted path) of any model.

    Inside an ``nn.Sequential`` the layer becomes the next element, named ``<name>_<suffix>``
    (the other elements keep their names). Elsewhere it is registered on the nearest enclosing
    module that is not a container, named ``<path>_<suffix>``, and runs as a forward hook on the
    target (its ``_filter_output`` method). Either way ``.to()``, ``repr`` and ``state_dict`` see
    it, the model's own parameter names do not change, and checkpoints of the model without it
    still load.
    """
    kind = type(layer).__name__
    try:
        if not after:
            raise AttributeError(after)
        target = model.get_submodule(after)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name]
        stages = getattr(model, "stage_names", None)
        hint = f"its stages are {list(stages)}" if stages else f"modules include {names[:12]}"
        raise ValueError(f"cannot insert {kind} after {after!r}: the model has no such "
                         f"module; {hint}") from None
    parts = after.split(".")
    parent = model.get_submodule(".".join(parts[:-1]))
    if isinstance(parent, nn.Sequential):
        owner, layer_name = parent, f"{parts[-1]}_{suffix}"
    else:  # the closest ancestor whose forward does not iterate over its children
        depth = len(parts) - 1
        while depth > 0 and isinstance(model.get_submodule(".".join(parts[:depth])), _CONTAINERS):
            depth -= 1
        owner = model.get_submodule(".".join(parts[:depth]))
        if isinstance(owner, _CONTAINERS):
            raise ValueError(f"cannot insert {kind} after {after!r}: every module around it "
                             "is a container; wrap the model in a module with its own forward")
        layer_name = "_".join(parts[depth:]) + f"_{suffix}"
    if hasattr(owner, layer_name):
        raise ValueError(f"an {kind} layer already follows {after!r}")
    if isinstance(parent, nn.Sequential):
        _insert_after(parent, parts[-1], layer_name, layer)
    else:
        owner.add_module(layer_name, layer)
        target.register_forward_hook(layer._filter_output)
    return layer


def guard(model: nn.Module, after: str, **settings) -> EigenGuard:
    """Insert an EigenGuard layer after the submodule named ``after`` (dotted path) of any model
    (:func:`insert_after`; the layer is named ``<name>_eigenguard``)."""
    return insert_after(model, after, EigenGuard(**settings), "eigenguard")


def find_guards(model: nn.Module) -> list[tuple[str, EigenGuard]]:
    """Every EigenGuard layer in a model, with its module name."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, EigenGuard)]


@contextlib.contextmanager
def guards_in_mode(model: nn.Module, mode: str):
    """Set every EigenGuard layer's eval_mode inside the block (an evaluation protocol, an
    attack probing a guarded helper), and restore each layer's own afterwards."""
    guards = [layer for _, layer in find_guards(model)]
    saved = [layer.eval_mode for layer in guards]
    for layer in guards:
        layer.eval_mode = mode
    try:
        yield model
    finally:
        for layer, saved_mode in zip(guards, saved):
            layer.eval_mode = saved_mode
