"""The EigenGuard spectral filter: a function on a tensor and a module that holds its settings.

For a batch of features flattened to F (B × d) with thin SVD F = U Σ Vᵀ, the filter sets the top
k singular values to one common scale c and multiplies the rest by ``tail_scale`` (t)::

    F' = U Σ' Vᵀ = t·F + U_k · diag(c/σ_i − t) · U_kᵀ · F

The right-hand form needs only the top-k eigenpairs of the B × B Gram matrix F Fᵀ (never a d × d
matrix, d reaches 65,536 after a CIFAR ResNet's first stage) and never divides by a tiny tail
singular value. The filter is a B × B matrix P applied from the left, F' = P F, which is what the
batch-composition analyses in :mod:`eigenguard.evaluate` build on.

When the batch has fewer than k nonzero singular values (B < k, a partial last batch, rank-deficient
features) the filter uses k_eff = that number, so a batch of one passes unchanged.
"""
from __future__ import annotations

import numbers
import math

import torch
from torch import nn

SCALES = ("kth", "mean")
GRAD_MODES = ("detach",)
EVAL_MODES = ("batch", "identity")

#: singular values at or below this fraction of the largest count as zero when finding k_eff.
DEFAULT_RANK_RTOL = 1e-5


def check_k(k) -> int:
    """Validate the number of dominant directions; bools and floats are refused, not rounded."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"EigenGuard k must be an integer >= 1, got {k!r} ({type(k).__name__}); "
                        "pass for example k=32")
    if k < 1:
        raise ValueError(f"EigenGuard k must be >= 1, got {k}: k is how many dominant singular "
                         "directions share one scale; pass for example k=32")
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


def filter_weights(gram: torch.Tensor, k: int, tail_scale: float = 1e-3, scale: str = "kth",
                   rank_rtol: float = DEFAULT_RANK_RTOL) -> torch.Tensor:
    """The B × B matrix P with F' = P F, from the Gram matrix G = F Fᵀ (batched over leading dims).

    Computed in float64 whatever G's dtype: B is small, and the eigenvalues of G are the squared
    singular values of F, so single precision would lose the lower half of the spectrum.
    """
    k = _check_settings(k, tail_scale, scale, rank_rtol)
    gram = gram.detach().to(torch.float64)
    if not torch.isfinite(gram).all():
        raise FloatingPointError(
            "EigenGuard received non-finite features (NaN or Inf): the layers before it diverged. "
            "Lower the learning rate or check the input data for NaN values.")
    n = gram.shape[-1]
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
    sigma = eigenvalues.flip(-1).clamp_min(0).sqrt()  # descending singular values of F
    vectors = eigenvectors.flip(-1)
    # k_eff: how many of the top k singular values are nonzero, per batch.
    threshold = sigma[..., :1] * rank_rtol
    rank = (sigma > threshold).sum(-1, keepdim=True)
    k_eff = rank.clamp(max=k)
    position = torch.arange(n, device=gram.device)
    top = position < k_eff  # (..., n) mask of the directions forced to the common scale
    if scale == "kth":
        common = sigma.gather(-1, (k_eff - 1).clamp_min(0))
    else:
        common = (sigma * top).sum(-1, keepdim=True) / k_eff.clamp_min(1)
    safe_sigma = torch.where(top, sigma, torch.ones_like(sigma))
    gain = torch.where(top, common / safe_sigma - tail_scale, torch.zeros_like(sigma))
    weights = (vectors * gain.unsqueeze(-2)) @ vectors.transpose(-1, -2)
    return weights + tail_scale * torch.eye(n, dtype=weights.dtype, device=weights.device)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def spectral_filter(features: torch.Tensor, k: int, tail_scale: float = 1e-3, scale: str = "kth",
                    rank_rtol: float = DEFAULT_RANK_RTOL) -> torch.Tensor:
    """Filter a batch of features (B, ...) in its singular basis; returns the input's shape and dtype.

    The filter matrix is a constant for autograd (the gradient flows through F' = P F with P
    fixed), which avoids differentiating an eigendecomposition whose spectrum may be degenerate.
    """
    if features.dim() < 2:
        raise ValueError(f"spectral_filter expects a batch (B, ...) with at least 2 dims, got shape "
                         f"{tuple(features.shape)}; add a batch dimension with x.unsqueeze(0)")
    if not features.is_floating_point():
        raise TypeError(f"spectral_filter expects floating-point features, got {features.dtype}")
    flat = features.reshape(features.shape[0], -1)
    with torch.no_grad():
        exact = flat.detach().to(torch.float64)
        weights = filter_weights(exact @ exact.T, k, tail_scale, scale, rank_rtol)
    dtype = _compute_dtype(features.dtype)
    out = weights.to(dtype) @ flat.to(dtype)
    return out.to(features.dtype).reshape(features.shape)


class EigenGuard(nn.Module):
    """Drop-in layer that damps the dominant singular directions of each training batch.

    Args:
        k: how many dominant directions are forced to one common scale.
        tail_scale: factor for the remaining singular values (the source uses 1e-3).
        scale: the common scale, ``"kth"`` (the k-th singular value) or ``"mean"`` (mean of the top k).
        grad: ``"detach"``, the filter matrix is a constant in the backward pass.
        eval_mode: what the layer does in ``model.eval()``: ``"batch"`` filters each test batch (the
            source's behaviour; a prediction then depends on the rest of its batch), ``"identity"``
            passes features through.
    """

    def __init__(self, k: int = 32, tail_scale: float = 1e-3, scale: str = "kth",
                 grad: str = "detach", eval_mode: str = "batch",
                 rank_rtol: float = DEFAULT_RANK_RTOL):
        super().__init__()
        self.k = _check_settings(k, tail_scale, scale, rank_rtol)
        if grad not in GRAD_MODES:
            raise ValueError(f"grad must be one of {GRAD_MODES}, got {grad!r}")
        if eval_mode not in EVAL_MODES:
            raise ValueError(f"eval_mode must be one of {EVAL_MODES}, got {eval_mode!r}")
        self.tail_scale = float(tail_scale)
        self.scale = scale
        self.grad = grad
        self.eval_mode = eval_mode
        self.rank_rtol = float(rank_rtol)

    def settings(self) -> dict:
        """The constructor arguments, for configs and reports."""
        return dict(k=self.k, tail_scale=self.tail_scale, scale=self.scale, grad=self.grad,
                    eval_mode=self.eval_mode, rank_rtol=self.rank_rtol)

    def weights_from_gram(self, gram: torch.Tensor) -> torch.Tensor:
        """The filter matrix P (F' = P F) for Gram matrices batched over leading dims."""
        return filter_weights(gram, self.k, self.tail_scale, self.scale, self.rank_rtol)

    def filter(self, features: torch.Tensor) -> torch.Tensor:
        """Apply the filter to a batch, whatever the train/eval state."""
        return spectral_filter(features, self.k, self.tail_scale, self.scale, self.rank_rtol)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not self.training and self.eval_mode == "identity":
            return features
        return self.filter(features)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.settings().items())

    def _filter_output(self, module, inputs, output):
        """Forward hook installed by :func:`guard` on the module it follows."""
        return self(output)


def guard(model: nn.Module, after: str, **settings) -> EigenGuard:
    """Insert an EigenGuard layer after the submodule named ``after`` (dotted path) of any model.

    The layer is registered as a sibling named ``<name>_eigenguard`` (so ``.to()``, ``repr`` and
    ``state_dict`` see it) and runs as a forward hook on that submodule, so the model's own
    parameter names do not change and checkpoints of the unguarded model still load.
    """
    try:
        if not after:
            raise AttributeError(after)
        target = model.get_submodule(after)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name]
        stages = getattr(model, "stage_names", None)
        hint = f"its stages are {list(stages)}" if stages else f"modules include {names[:12]}"
        raise ValueError(f"cannot insert EigenGuard after {after!r}: the model has no such "
                         f"module; {hint}") from None
    parent_name, _, leaf = after.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    layer_name = f"{leaf}_eigenguard"
    if hasattr(parent, layer_name):
        raise ValueError(f"an EigenGuard layer already follows {after!r}")
    layer = EigenGuard(**settings)
    parent.add_module(layer_name, layer)
    target.register_forward_hook(layer._filter_output)
    return layer


def find_guards(model: nn.Module) -> list[tuple[str, EigenGuard]]:
    """Every EigenGuard layer in a model, with its module name."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, EigenGuard)]
