"""Where a backdoor trigger lives in a stage's singular spectrum: the math of ``eigenguard analyze``.

EigenGuard takes a batch of features F (N × D, one flattened image a row), equalises its top k
singular values and multiplies the rest by 1e-3. The source's argument is that a trigger's
features concentrate in the dominant singular directions, so equalising them damps the trigger.
These functions measure that on any features (clean images, the same images with the trigger, a
mix at the poison ratio):

- :func:`effective_rank`: exp of the entropy of the normalised singular values (Roy & Vetterli
  2007), the source's Table 2 and Figure 1;
- :func:`spectrum`: the singular values and the top singular directions;
- :func:`triggered_share_per_direction` / :func:`triggered_share_summary`: how much of each
  direction's energy σ_i² the triggered rows of a mix carry, against their share of the rows;
- :func:`shift_alignment`: how much of the feature shift the trigger causes lies in the span of the
  top k directions (those EigenGuard equalises) and how much in the tail (those it damps);
- :func:`split_projection` and :func:`tsne_embedding`: the source's Figure 2, t-SNE of the features
  projected on the top-k eigenspace and on the rest.

Decisions, each for a reason:

- **Uncentred.** The layer filters F itself, not F minus its mean, so every spectrum here is of
  the uncentred F: its first direction is usually close to the mean feature, as the layer sees it.
  (Only the tail's compression for t-SNE centres, as PCA does; distances do not change.)
- **Gram matrix or SVD, never D × D.** D reaches 65,536 (a CIFAR ResNet's first stage) while N is a
  few thousand. With N ≤ D the default (``method="auto"``) eigendecomposes the N × N Gram matrix
  F Fᵀ, summed in float64 from blocks of F (:func:`eigenguard.layer.exact_gram`): N²D
  multiply-adds and N² memory, where the SVD of the N × D matrix costs several times the work and
  two float64 copies of size N·D (2 GiB each at N = 4,000, D = 65,536). The right singular
  vectors are then v_i = Fᵀ u_i / σ_i, for the few directions asked. With N > D the SVD of the
  tall N × D matrix is the cheaper one (O(N·D²), memory N·D) and needs no D × D matrix either.
- **Float64 inside, whatever the input.** Eigenvalues of F Fᵀ are squared singular values: in
  float64 they resolve σ_i down to about 1e-7·σ_1, which single precision would lose.
- **One rank threshold, the layer's.** Singular values at or below ``rank_rtol`` (default
  :data:`eigenguard.layer.DEFAULT_RANK_RTOL`, 1e-5) times the largest are reported as exact zeros:
  the layer counts them as zero too, and below it the Gram path is rounding noise that would
  inflate the effective rank of a rank-deficient matrix.
- **Signs.** A singular pair (u_i, v_i) is defined up to sign; each is flipped so that the entry of
  u_i with the largest magnitude is positive, so both paths and repeated runs give the same
  vectors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..layer import DEFAULT_RANK_RTOL, exact_gram

METHODS = ("auto", "gram", "svd")
#: about how many bytes of float64 one block of rows or columns takes when F is converted block by
#: block (F itself is N × D float32, up to a GiB; a whole float64 copy would double that)
BLOCK_BYTES = 64 << 20
#: how far a set of directions may be from orthonormal, max |V Vᵀ − I| (the Gram path gives
#: right singular vectors orthonormal to about 1e-9 for directions above 1e-3·σ_1)
ORTHONORMAL_ATOL = 1e-4
#: principal components kept of the tail part for t-SNE (the usual PCA step before t-SNE)
TAIL_COMPONENTS = 50
#: t-SNE's perplexity: the usual 30 (van der Maaten & Hinton 2008), well below the few hundred
#: images of each class in a few thousand, so clusters are classes, not fragments of them
TSNE_PERPLEXITY = 30.0
#: dimensions t-SNE's input is reduced to with PCA first, the standard 50
TSNE_PCA_DIMS = 50
#: threads of t-SNE's gradient loop. Its OpenMP threads spin while they wait, which is slow when
#: other processes share the cores: on a 2-core machine shared with a training job, 3,000 points
#: took 49 s with 2 threads and 17 s with 1. None leaves scikit-learn's default (all cores).
TSNE_THREADS = 1


@dataclass(frozen=True)
class Spectrum:
    """The singular value decomposition of a stage's uncentred features F (N × D), in float64.

    ``values``: all min(N, D) singular values, descending, exact zeros at or below the rank
    threshold. ``right``: the top right singular vectors as rows, (m, D), directions in feature
    space, m = min(top, rank). ``left``: the matching left singular vectors as columns, (N, m), or
    (N, rank) when computed with ``all_left=True``. ``method``: "gram" or "svd", the path taken.
    """

    values: torch.Tensor
    right: torch.Tensor
    left: torch.Tensor
    method: str

    @property
    def rank(self) -> int:
        """The number of nonzero singular values (above the rank threshold)."""
        return int((self.values > 0).sum())

    @property
    def energy(self) -> torch.Tensor:
        """σ_i², the energy ‖F v_i‖² of each direction; they sum to ‖F‖²."""
        return self.values ** 2


# -- checks ----------------------------------------------------------------------------------------

def _as_rows(features, name: str = "features") -> torch.Tensor:
    """The features as an (N, D) matrix, one flattened image a row; real, finite, non-empty."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (N, ...), got {type(features).__name__}")
    if features.dim() < 2:
        raise ValueError(f"{name} must have a row per image, shape (N, ...) with at least 2 dims; "
                         f"got shape {tuple(features.shape)}")
    if features.is_complex() or features.dtype == torch.bool:
        raise TypeError(f"{name} must be real numbers, got {features.dtype}")
    rows = features.detach().reshape(features.shape[0], -1)
    if rows.shape[0] == 0 or rows.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(features.shape)}")
    if not rows.is_floating_point():
        rows = rows.to(torch.float64)
    if not torch.isfinite(rows).all():
        raise ValueError(f"{name} contain NaN or Inf values: the model's features diverged")
    return rows


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method


def _check_rank_rtol(rank_rtol) -> float:
    if not isinstance(rank_rtol, (int, float)) or not 0 <= rank_rtol < 1:
        raise ValueError(f"rank_rtol must be a number in [0, 1), got {rank_rtol!r}")
    return float(rank_rtol)


def _check_count(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_mask(mask, count: int) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 1:
        raise ValueError("triggered_mask must be a 1-D bool tensor marking the triggered rows, got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)} of shape "
                         f"{tuple(getattr(mask, 'shape', ()))}")
    if len(mask) != count:
        raise ValueError(f"triggered_mask has {len(mask)} entries for {count} rows of features")
    return mask


def _orthonormal_rows(directions, width: int) -> torch.Tensor:
    """The directions as float64 rows (m, D), checked to be orthonormal (or exactly zero): the
    fractions computed from them are fractions of a span only when they are."""
    if not isinstance(directions, torch.Tensor) or directions.dim() != 2:
        raise ValueError("directions must be a 2-D tensor with one direction a row (m, D), got "
                         f"shape {tuple(getattr(directions, 'shape', ()))}")
    if directions.shape[0] == 0:
        raise ValueError("directions is empty: pass at least one direction (m >= 1)")
    if directions.shape[1] != width:
        raise ValueError(f"directions have {directions.shape[1]} entries each, the features "
                         f"{width}: they must live in the same feature space")
    basis = directions.detach().to(torch.float64)
    if not torch.isfinite(basis).all():
        raise ValueError("directions contain NaN or Inf values")
    gram = _matmul_columns(basis, basis)
    # rows of exact zeros are allowed: a padded basis (EigenGuard's running basis pads with zero
    # columns while its statistics have fewer directions than its rank); they add nothing
    expected = torch.diag((basis != 0).any(1).to(torch.float64))
    error = float((gram - expected).abs().max())
    if error > ORTHONORMAL_ATOL:
        raise ValueError(f"directions must be orthonormal rows (max |V Vᵀ − I| = {error:.2e} > "
                         f"{ORTHONORMAL_ATOL:g}); pass Spectrum.right")
    return basis


# -- float64 products in blocks ----------------------------------------------------------------------

def _row_blocks(rows: torch.Tensor):
    """(start, float64 block) over the rows of an (N, D) matrix, about BLOCK_BYTES a block."""
    step = max(1, BLOCK_BYTES // (8 * rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        yield start, rows[start:start + step].to(torch.float64)


def _matmul_columns(left: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """left (m, D) times rowsᵀ (D, N) = (m, N) in float64, converting D in blocks."""
    out = torch.zeros(left.shape[0], rows.shape[0], dtype=torch.float64, device=rows.device)
    step = max(1, BLOCK_BYTES // (8 * max(rows.shape[0], left.shape[0])))
    for start in range(0, rows.shape[1], step):
        out.addmm_(left[:, start:start + step].to(torch.float64),
                   rows[:, start:start + step].to(torch.float64).T)
    return out


def _project(rows: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """The coordinates rows @ basisᵀ, (N, m) in float64."""
    out = torch.empty(rows.shape[0], basis.shape[0], dtype=torch.float64, device=rows.device)
    for start, block in _row_blocks(rows):
        out[start:start + len(block)] = block @ basis.T
    return out


# -- the decomposition -------------------------------------------------------------------------------

def _fix_signs(left: torch.Tensor, right: torch.Tensor | None):
    """Flip each pair so that the largest-magnitude entry of u_i is positive."""
    if left.shape[1] == 0:
        return left, right
    index = left.abs().argmax(0)
    signs = torch.sign(left.gather(0, index.unsqueeze(0)).squeeze(0))
    signs[signs == 0] = 1
    left = left * signs
    if right is not None:
        right = right * signs[:right.shape[0]].unsqueeze(1)
    return left, right


def _decompose(rows: torch.Tensor, method: str, rank_rtol: float):
    """Singular values (min(N, D)), left vectors (N, min(N, D)) and, on the SVD path, the right
    vectors (min(N, D), D); values at or below rank_rtol·σ_1 set to zero."""
    count, width = rows.shape
    size = min(count, width)
    if method == "auto":
        method = "gram" if count <= width else "svd"
    if method == "gram":
        eigenvalues, eigenvectors = torch.linalg.eigh(exact_gram(rows))
        values = eigenvalues.flip(0).clamp_min(0).sqrt()[:size]
        left, right = eigenvectors.flip(1)[:, :size], None
    else:
        left, values, right = torch.linalg.svd(rows.to(torch.float64), full_matrices=False)
    values = torch.where(values > values[0] * rank_rtol, values, torch.zeros_like(values))
    left, right = _fix_signs(left, right)
    return values, left, right, method


def _right_from_left(rows: torch.Tensor, left: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """v_i = Fᵀ u_i / σ_i for nonzero σ_i, as rows (m, D), with D converted in blocks."""
    return _matmul_columns(left.T, rows.T) / values.unsqueeze(1)


def spectrum(features: torch.Tensor, top: int | None = None, *, all_left: bool = False,
             method: str = "auto", rank_rtol: float = DEFAULT_RANK_RTOL) -> Spectrum:
    """The singular spectrum of the uncentred features (N, ...) flattened to F (N × D).

    ``top``: how many right singular vectors (directions in feature space) to return, with their
    left vectors; None or 0 for the values only. Only directions with a nonzero singular value are
    returned (a zero one has no defined direction), so ``right`` may have fewer rows than asked.
    ``all_left``: also keep every left vector of a nonzero value (N × rank), which
    :func:`triggered_share_per_direction` takes instead of decomposing again. ``method``:
    "auto" (Gram matrix when N ≤ D, SVD otherwise; module docstring), "gram" or "svd".
    """
    rows = _as_rows(features)
    method, rank_rtol = _check_method(method), _check_rank_rtol(rank_rtol)
    top = 0 if top is None else _check_count(top, "top", minimum=0)
    values, left, right, taken = _decompose(rows, method, rank_rtol)
    rank = int((values > 0).sum())
    wanted = min(top, rank)
    if right is None:
        right = _right_from_left(rows, left[:, :wanted], values[:wanted])
    return Spectrum(values=values, right=right[:wanted],
                    left=left[:, :rank if all_left else wanted], method=taken)


def effective_rank(x: torch.Tensor, *, rank_rtol: float = DEFAULT_RANK_RTOL) -> float:
    """exp(H(p)), p_i = σ_i / Σ_j σ_j, zeros ignored (Roy & Vetterli 2007).

    ``x`` is a matrix (N, ...) whose singular values are taken (uncentred, through
    :func:`spectrum`, so values at or below ``rank_rtol``·σ_1 count as zero), or a 1-D tensor of
    singular values (used as given: only exact zeros are ignored). Equal to r for r equal nonzero
    values, 1 for rank one, invariant to scaling and rotations. An all-zero input has rank 0 and
    returns 0.0 (the limit of no direction at all, rather than an error in a table of stages).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"effective_rank takes a tensor, got {type(x).__name__}")
    if x.dim() == 1:
        values = x.detach().to(torch.float64)
        if not torch.isfinite(values).all() or (values < 0).any():
            raise ValueError("singular values must be finite and >= 0")
    else:
        values = spectrum(x, rank_rtol=rank_rtol).values
    values = values[values > 0]
    if values.numel() == 0:
        return 0.0
    p = values / values.sum()
    return math.exp(float(-(p * p.log()).sum()))


# -- the triggered rows' share of each direction ---------------------------------------------------

def triggered_share_per_direction(features: torch.Tensor | Spectrum, triggered_mask: torch.Tensor,
                                  *, method: str = "auto",
                                  rank_rtol: float = DEFAULT_RANK_RTOL) -> torch.Tensor:
    """For F = U Σ Vᵀ, the share Σ_{r triggered} U_ri² of direction i's energy σ_i² carried by the
    triggered rows, for each direction with a nonzero singular value (length rank, in [0, 1]).

    Direction i's energy is Σ_r (σ_i U_ri)², so this is the fraction of it from triggered rows; the
    rest (1 − share) is from clean rows. Over all directions the shares sum to the number of
    triggered rows when F has rank N (N ≤ D, generic features), and to at most that otherwise.
    A direction is "triggered" when its share exceeds the triggered rows' share of rows.
    ``features`` is the mix (N, ...), or its :class:`Spectrum` computed with ``all_left=True``.
    """
    if isinstance(features, Spectrum):
        if features.left.shape[1] < features.rank:
            raise ValueError("this Spectrum keeps only the top left vectors: compute it with "
                             "spectrum(features, all_left=True)")
        left = features.left[:, :features.rank]
    else:
        rows = _as_rows(features)
        values, left, _, _ = _decompose(rows, _check_method(method), _check_rank_rtol(rank_rtol))
        left = left[:, :int((values > 0).sum())]
    mask = _check_mask(triggered_mask, left.shape[0]).to(left.device)
    return (left[mask] ** 2).sum(0)


def triggered_share_summary(shares: torch.Tensor, singular_values: torch.Tensor, row_share: float,
                            k: int) -> dict[str, float]:
    """Where the triggered rows' energy sits relative to the top k directions, as plain floats.

    ``shares`` from :func:`triggered_share_per_direction`, ``singular_values`` of the same features
    (Spectrum.values; the first len(shares) are used), ``row_share`` the triggered rows' fraction
    of the rows. Returns:

    - ``top_share`` / ``tail_share``: the triggered rows' share of the top-k energy Σ_{i≤k} σ_i²
      and of the tail energy. Compare with ``row_share``: above it means concentrated there
      (``top_enrichment`` = top_share / row_share, ``tail_enrichment`` likewise; 1 = no preference).
    - ``triggered_energy_in_top`` / ``clean_energy_in_top``: the fraction of the triggered rows'
      own energy Σ ‖F_r‖² inside the top-k directions, and the same for the clean rows.

    A share of an empty part (k ≥ rank: the layer leaves such features unchanged) is NaN.
    """
    if not isinstance(shares, torch.Tensor) or shares.dim() != 1:
        raise ValueError("shares must be the 1-D tensor of triggered_share_per_direction")
    if not isinstance(singular_values, torch.Tensor) or singular_values.dim() != 1 \
            or len(singular_values) < len(shares):
        raise ValueError(f"singular_values must be a 1-D tensor of at least {len(shares)} values "
                         "(the spectrum of the same features)")
    if not isinstance(row_share, (int, float)) or not 0 < row_share < 1:
        raise ValueError(f"row_share must be in (0, 1), got {row_share!r}")
    k = _check_count(k, "k")
    share = shares.detach().to(torch.float64).cpu()
    energy = singular_values.detach().to(torch.float64).cpu()[:len(share)] ** 2
    triggered, clean = share * energy, (1 - share) * energy

    def ratio(part: torch.Tensor, whole: torch.Tensor) -> float:
        total = float(whole.sum())
        return float(part.sum()) / total if total > 0 else math.nan

    top_share = ratio(triggered[:k], energy[:k])
    tail_share = ratio(triggered[k:], energy[k:])
    return {"k": k, "row_share": float(row_share),
            "top_share": top_share, "tail_share": tail_share,
            "top_enrichment": top_share / row_share, "tail_enrichment": tail_share / row_share,
            "triggered_energy_in_top": ratio(triggered[:k], triggered),
            "clean_energy_in_top": ratio(clean[:k], clean)}


# -- the trigger's shift against the top directions ------------------------------------------------

def shift_alignment(clean: torch.Tensor, triggered: torch.Tensor,
                    directions: torch.Tensor) -> dict[str, torch.Tensor | float]:
    """How much of the feature shift a trigger causes lies in the span of the top directions.

    Row i of ``triggered`` is image i of ``clean`` with the trigger; ``directions`` are orthonormal
    rows (m, D), e.g. ``spectrum(clean_features, top=m).right`` (rows of exact zeros, as in a
    padded running basis, are allowed and count as no direction). With d_i = triggered_i − clean_i
    and the mean shift Δ = mean_i d_i, returns:

    - ``cumulative`` (m + 1,): entry k is the fraction of ‖Δ‖² inside the span of the first k
      directions (entry 0 is 0). Near 1 at the layer's k: the trigger lives in the directions it
      equalises; near 0: in the tail it damps.
    - ``cosine`` (m,): cos(Δ, v_i) for each direction.
    - ``per_sample_cumulative`` (m + 1,): entry k is the mean over samples of the fraction of
      ‖d_i‖² inside the top-k span (samples the trigger leaves unchanged, d_i = 0, are skipped).
    - ``shift_norm``: ‖Δ‖; ``sample_shift_rms``: sqrt(mean ‖d_i‖²); ``consistency``:
      ‖Δ‖² / mean ‖d_i‖², 1 when every image shifts by the same vector, near 0 when the shifts
      point in unrelated directions (then the mean shift says little, the per-sample curve more).
    - ``shift_to_spread``: ‖Δ‖² over the clean features' spread mean_i ‖c_i − mean c‖² (their
      total variance), and ``sample_shift_to_spread``: mean ‖d_i‖² over the same spread. How
      large the trigger's move is against the natural variation of the features: a shift
      inside the kept directions but far below their spread is hard to learn from.

    Fractions are NaN when there is nothing to divide: Δ = 0, or no sample shifted at all.
    """
    clean_rows, triggered_rows = _as_rows(clean, "clean"), _as_rows(triggered, "triggered")
    if clean_rows.shape != triggered_rows.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and triggered {tuple(triggered.shape)} "
                         "features must be paired row by row: the same shape")
    basis = _orthonormal_rows(directions, clean_rows.shape[1]).to(clean_rows.device)
    count, m = clean_rows.shape[0], basis.shape[0]
    shift_sum = torch.zeros(clean_rows.shape[1], dtype=torch.float64, device=basis.device)
    sample_curves = torch.zeros(m, dtype=torch.float64, device=basis.device)
    clean_sum = torch.zeros_like(shift_sum)
    sample_energy, clean_energy, shifted = 0.0, 0.0, 0
    step = max(1, BLOCK_BYTES // (8 * clean_rows.shape[1]))
    for start in range(0, count, step):
        block = clean_rows[start:start + step].to(torch.float64)
        clean_sum += block.sum(0)
        clean_energy += float((block ** 2).sum())
        diff = triggered_rows[start:start + step].to(torch.float64) - block
        shift_sum += diff.sum(0)
        norms = (diff ** 2).sum(1)
        moved = norms > 0
        coordinates = diff[moved] @ basis.T
        sample_curves += (coordinates ** 2).cumsum(1).div(norms[moved].unsqueeze(1)).sum(0)
        sample_energy += float(norms.sum())
        shifted += int(moved.sum())
    shift = shift_sum / count
    shift_energy = float((shift ** 2).sum())
    coordinates = basis @ shift
    zero = torch.zeros(1, dtype=torch.float64, device=basis.device)
    if shift_energy > 0:
        cumulative = torch.cat([zero, (coordinates ** 2).cumsum(0) / shift_energy])
        cosine = coordinates / math.sqrt(shift_energy)
    else:
        cumulative = torch.full((m + 1,), math.nan, dtype=torch.float64, device=basis.device)
        cosine = torch.full((m,), math.nan, dtype=torch.float64, device=basis.device)
    if shifted:
        per_sample = torch.cat([zero, sample_curves / shifted])
    else:
        per_sample = torch.full((m + 1,), math.nan, dtype=torch.float64, device=basis.device)
    mean_energy = sample_energy / count
    spread = max(clean_energy / count - float(((clean_sum / count) ** 2).sum()), 0.0)
    return {"cumulative": cumulative, "cosine": cosine, "per_sample_cumulative": per_sample,
            "shift_norm": math.sqrt(shift_energy), "sample_shift_rms": math.sqrt(mean_energy),
            "consistency": shift_energy / mean_energy if mean_energy > 0 else math.nan,
            "shift_to_spread": shift_energy / spread if spread > 0 else math.nan,
            "sample_shift_to_spread": mean_energy / spread if spread > 0 else math.nan}


# -- the source's Figure 2: top-k eigenspace against the rest ---------------------------------------

def split_projection(features: torch.Tensor, directions: torch.Tensor, k: int, *,
                     tail_components: int = TAIL_COMPONENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's part in the span of the first k directions and its part in the rest.

    Returns ``top_part`` (N, k): the coordinates F V_kᵀ in the top-k span (exact, k is small), and
    ``tail_part`` (N, c), c = min(tail_components, N, D − k): the tail F − F V_kᵀ V_k compressed to
    its own top c principal components (centred, as PCA is; t-SNE sees only distances, which
    centring keeps, and the 50 components it would reduce to anyway). The tail is never formed: its
    Gram matrix is F Fᵀ − (F V_kᵀ)(F V_kᵀ)ᵀ, N × N, from float64 blocks of F.
    """
    rows = _as_rows(features)
    basis = _orthonormal_rows(directions, rows.shape[1]).to(rows.device)
    k = _check_count(k, "k")
    if k > len(basis):
        raise ValueError(f"k = {k} is more than the {len(basis)} directions given")
    tail_components = _check_count(tail_components, "tail_components")
    top_part = _project(rows, basis[:k])
    gram = exact_gram(rows) - top_part @ top_part.T
    gram = gram - gram.mean(0, keepdim=True) - gram.mean(1, keepdim=True) + gram.mean()
    eigenvalues, eigenvectors = torch.linalg.eigh((gram + gram.T) / 2)
    size = min(tail_components, rows.shape[0], max(rows.shape[1] - k, 1))
    power = eigenvalues.flip(0)[:size].clamp_min(0)
    vectors, _ = _fix_signs(eigenvectors.flip(1)[:, :size], None)
    return top_part, vectors * power.sqrt()


def tsne_embedding(points: torch.Tensor, seed: int, *, perplexity: float = TSNE_PERPLEXITY,
                   pca_dims: int = TSNE_PCA_DIMS, threads: int | None = TSNE_THREADS
                   ) -> torch.Tensor:
    """A 2-D t-SNE embedding (N, 2) of the rows of ``points``, deterministic under ``seed``.

    Rows are first reduced to ``pca_dims`` principal components when wider (the standard step: it
    drops noise dimensions and makes the neighbour search fast). t-SNE settings: perplexity 30
    (capped at (N − 1) / 3 for small N, since Barnes-Hut needs 3·perplexity neighbours), PCA
    initialisation (keeps the global layout and makes runs reproducible, Kobak & Berens 2019),
    learning rate "auto" (N / 48, Belkina et al. 2019, which suits a few thousand points), the
    default 1,000 iterations. ``threads``: see :data:`TSNE_THREADS` (the result does not depend
    on it).
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    rows = _as_rows(points, "points")
    _check_count(pca_dims, "pca_dims")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if rows.shape[0] < 5:
        raise ValueError(f"t-SNE needs at least 5 points, got {rows.shape[0]}")
    if not isinstance(perplexity, (int, float)) or perplexity <= 0:
        raise ValueError(f"perplexity must be a positive number, got {perplexity!r}")
    data = rows.to(torch.float64).cpu().numpy()
    if data.shape[1] > pca_dims:
        components = min(pca_dims, data.shape[0])
        data = PCA(n_components=components, random_state=seed % 2 ** 32).fit_transform(data)
    if threads is not None:
        _check_count(threads, "threads")
    perplexity = min(float(perplexity), (data.shape[0] - 1) / 3)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                random_state=seed % 2 ** 32)
    with threadpool_limits(limits=threads):
        embedding = tsne.fit_transform(data)
    return torch.from_numpy(embedding).to(torch.float64)
