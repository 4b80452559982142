"""The spectral analyses on planted features, and the figures drawn from them.

Effective rank on matrices of known spectra; the Gram and SVD paths against each other and in
float32; a trigger planted with known strength (its share of the top direction against a 2 × 2
eigenproblem solved by hand); a strong trigger inside the clean top-k span against a weak one in
the tail; the top / tail split for t-SNE against the explicit tail; each figure's PNG.
"""
import math
import struct

import pytest
import torch

from eigenguard.analysis import figures
from eigenguard.analysis.spectrum import (Spectrum, effective_rank, shift_alignment, spectrum,
                                          split_projection, triggered_share_per_direction,
                                          triggered_share_summary, tsne_embedding)

F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """One CPU thread, restored after each test: on the shared 2-core machine, with a training job
    beside it, a 400 × 400 eigh took 5.2 s with 2 threads and 0.03 s with 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def generator(seed):
    return torch.Generator().manual_seed(seed)


def orthonormal_columns(rows, columns, seed):
    q, _ = torch.linalg.qr(torch.randn(rows, columns, generator=generator(seed), dtype=F64))
    return q


def with_singular_values(values, n, d, seed=0):
    """A random n × d matrix U diag(values) Vᵀ with exactly these singular values."""
    values = torch.as_tensor(values, dtype=F64)
    r = len(values)
    return (orthonormal_columns(n, r, seed) * values) @ orthonormal_columns(d, r, seed + 1).T


def axis(index, width=120):
    vector = torch.zeros(width, dtype=F64)
    vector[index] = 1.0
    return vector


def clean_features(n=1000, width=120, seed=1):
    """Uncentred 'clean' features: mean 2 along e_0, coordinate stds 3·0.85^j for the first 10
    (separated enough that the top directions are close to the axes) then a slow tail
    0.6·0.97^(j−10). Measured: the top 12 right singular vectors have overlap > 0.84 with an axis."""
    j = torch.arange(width, dtype=F64)
    scales = torch.where(j < 10, 3.0 * 0.85 ** j, 0.6 * 0.97 ** (j - 10))
    features = torch.randn(n, width, generator=generator(seed), dtype=F64) * scales
    features[:, 0] += 2.0
    return features


def distances(points):
    return (points.unsqueeze(0) - points.unsqueeze(1)).norm(dim=-1)


def png_size(path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


# -- effective rank ----------------------------------------------------------------------------------

@pytest.mark.parametrize("r", [1, 3, 7])
def test_effective_rank_of_r_equal_singular_values_is_r(r):
    matrix = with_singular_values([2.5] * r, 40, 60, seed=r)
    assert effective_rank(matrix) == pytest.approx(r, abs=1e-9)
    assert effective_rank(torch.tensor([2.0, 2.0, 2.0, 0.0, 0.0])) == pytest.approx(3.0, abs=1e-12)
    assert effective_rank(torch.outer(torch.arange(1.0, 6.0), torch.arange(1.0, 9.0))) \
        == pytest.approx(1.0, abs=1e-9)


def test_effective_rank_of_a_geometric_spectrum_matches_its_closed_form():
    """σ_i = q^i, i < n: p_i = q^i (1−q)/(1−q^n), H = −log((1−q)/(1−q^n)) − log(q)·E[i] with
    E[i] = q/(1−q) − n q^n/(1−q^n). q = 0.8, n = 40: exp(H) = 12.1909344..."""
    q, n = 0.8, 40
    mean_index = q / (1 - q) - n * q ** n / (1 - q ** n)
    closed = math.exp(-math.log((1 - q) / (1 - q ** n)) - math.log(q) * mean_index)
    values = q ** torch.arange(n, dtype=F64)
    assert closed == pytest.approx(12.1909344, abs=1e-6)
    assert effective_rank(values) == pytest.approx(closed, rel=1e-12)
    assert effective_rank(with_singular_values(values, 60, 90)) == pytest.approx(closed, rel=1e-9)
    assert effective_rank(with_singular_values(values, 90, 60)) == pytest.approx(closed, rel=1e-9)


def test_effective_rank_is_invariant_to_scaling_and_rotations():
    features = torch.randn(50, 80, generator=generator(3), dtype=F64) \
        * torch.logspace(0, -2, 80, dtype=F64)
    base = effective_rank(features)
    assert 5 < base < 50
    rotated = orthonormal_columns(50, 50, 4) @ features @ orthonormal_columns(80, 80, 5)
    for other in (1e3 * features, 1e-3 * features, rotated, features.float()):
        assert effective_rank(other) == pytest.approx(base, rel=1e-6)


def test_effective_rank_of_zero_is_zero_and_bad_values_raise():
    assert effective_rank(torch.zeros(10, 20)) == 0.0
    assert effective_rank(torch.zeros(5)) == 0.0
    with pytest.raises(ValueError, match=">= 0"):
        effective_rank(torch.tensor([1.0, -0.5]))
    with pytest.raises(ValueError, match="NaN"):
        effective_rank(torch.tensor([[1.0, math.nan], [0.0, 1.0]]))


# -- the decomposition -------------------------------------------------------------------------------

@pytest.mark.parametrize("n,d", [(150, 400), (400, 150)])
def test_gram_and_svd_paths_agree(n, d):
    """Measured: values, vectors agree to 8e-14 in both shapes."""
    features = torch.randn(n, d, generator=generator(n), dtype=F64) \
        * torch.logspace(0, -2, d, dtype=F64)
    gram, svd = spectrum(features, top=10, method="gram"), spectrum(features, top=10, method="svd")
    assert spectrum(features).method == ("gram" if n <= d else "svd")
    assert gram.values.shape == svd.values.shape == (min(n, d),)
    assert torch.allclose(gram.values, svd.values, rtol=1e-10, atol=0)
    assert torch.allclose(gram.values, torch.linalg.svdvals(features), rtol=1e-10, atol=0)
    assert (gram.right - svd.right).abs().max() < 1e-9
    assert (gram.left - svd.left).abs().max() < 1e-9
    assert gram.right.shape == (10, d) and gram.left.shape == (n, 10)
    # the definition: F v_i = σ_i u_i with orthonormal v_i
    assert torch.allclose(features @ gram.right.T, gram.left * gram.values[:10], atol=1e-10)
    assert torch.allclose(gram.right @ gram.right.T, torch.eye(10, dtype=F64), atol=1e-10)


def test_float32_input_gives_float64_accurate_values():
    """Spectrum 1 → 1e-3: measured relative error 9e-14 against the float64 SVD of the same
    float32 numbers, where torch's float32 SVD is off by 2.5e-6."""
    features = (torch.randn(300, 800, generator=generator(7))
                * torch.logspace(0, -3, 800)).float()
    reference = torch.linalg.svdvals(features.double())
    result = spectrum(features, top=5)
    assert result.values.dtype == F64 and result.right.dtype == F64
    assert ((result.values - reference) / reference).abs().max() < 1e-10
    assert ((torch.linalg.svdvals(features).double() - reference) / reference).abs().max() > 1e-7


def test_values_below_the_layers_rank_threshold_are_zero():
    """A rank-5 matrix: exactly 5 nonzero values on both paths (Gram rounding is not counted as
    rank), 5 right vectors even when 10 are asked, effective rank 5 for 5 equal values."""
    features = with_singular_values([3.0] * 5, 80, 200, seed=11)
    for method in ("gram", "svd"):
        result = spectrum(features, top=10, method=method)
        assert result.rank == 5 and result.right.shape == (5, 200)
        assert (result.values[5:] == 0).all()
    assert effective_rank(features) == pytest.approx(5.0, abs=1e-9)


# -- where the triggered rows' energy sits --------------------------------------------------------

def planted_mean_and_trigger(n_clean=360, n_triggered=40, mean=3.0, strength=4.0, seed=0):
    """F = (1 μᵀ + a 1_T tᵀ + Z) Q: a mean μ = m e_0 on every row, a trigger a·e_1 on the
    triggered rows T, noise Z in 300 other coordinates whose rows sum to zero within T and within
    the clean rows, all rotated by a random orthogonal Q (600 × 600). Then FᵀF splits exactly
    into the mean/trigger part and Z's part, and the top pair of directions comes from the 2 × 2
    matrix A = [[(m² + a²) n_T, m² √(n_T n_C)], [m² √(n_T n_C), m² n_C]] on the unit vectors of
    T and of the clean rows (A's eigenvalues 3676 and 564 exceed Z's energy, about 200)."""
    n = n_clean + n_triggered
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=generator(seed))[:n_triggered]] = True
    noise = torch.randn(n, 300, generator=generator(seed + 1), dtype=F64) \
        * torch.linspace(0.5, 0.05, 300, dtype=F64)
    noise[mask] -= noise[mask].mean(0)
    noise[~mask] -= noise[~mask].mean(0)
    features = torch.zeros(n, 600, dtype=F64)
    features[:, 0] = mean
    features[mask, 1] = strength
    features[:, 2:302] = noise
    rotation = orthonormal_columns(600, 600, seed + 2)
    two_by_two = torch.tensor([[(mean ** 2 + strength ** 2) * n_triggered,
                                mean ** 2 * math.sqrt(n_triggered * n_clean)],
                               [mean ** 2 * math.sqrt(n_triggered * n_clean),
                                mean ** 2 * n_clean]], dtype=F64)
    return features @ rotation, mask, two_by_two, noise


def test_triggered_share_of_the_top_direction_matches_the_planted_construction():
    """Analytic: share_1 = c_T² for A's top eigenvector (c_T, c_C) = 0.1401; σ_1² = 3675.9;
    share_1 + share_2 = 1 (the pair spans the unit vectors of T and of the clean rows); the other
    directions span the columns of Z, so they carry Σ_{r in T} ‖P_Z e_r‖² (29.63 of the 39 left,
    as F has rank 302 < N = 400)."""
    features, mask, two_by_two, noise = planted_mean_and_trigger()
    eigenvalues, eigenvectors = torch.linalg.eigh(two_by_two)
    expected_share = float(eigenvectors[0, 1] ** 2)
    assert expected_share == pytest.approx(0.1401, abs=1e-4)
    result = spectrum(features, top=2, all_left=True)
    shares = triggered_share_per_direction(result, mask)
    assert float(result.values[0] ** 2) == pytest.approx(float(eigenvalues[1]), rel=1e-10)
    assert float(result.values[1] ** 2) == pytest.approx(float(eigenvalues[0]), rel=1e-10)
    assert float(shares[0]) == pytest.approx(expected_share, abs=1e-10)
    assert float(shares[0] + shares[1]) == pytest.approx(1.0, abs=1e-10)
    noise_basis, _ = torch.linalg.qr(noise)
    assert float(shares[2:].sum()) == pytest.approx(float((noise_basis[mask] ** 2).sum()),
                                                    abs=1e-8)
    assert float(shares.sum()) < int(mask.sum())
    assert torch.allclose(shares, triggered_share_per_direction(features, mask), atol=1e-10)


def test_share_summary_matches_the_planted_energies():
    """k = 2 holds the whole mean/trigger part: the triggered rows' share of the top-2 energy is
    (m² + a²) n_T / ((m² + a²) n_T + m² n_C) = 1000 / 4240 against a row share of 0.1; the
    fraction of the triggered rows' own energy in the top 2 is 1000 / (1000 + ‖Z_T‖²)."""
    features, mask, _, noise = planted_mean_and_trigger()
    result = spectrum(features, all_left=True)
    shares = triggered_share_per_direction(result, mask)
    summary = triggered_share_summary(shares, result.values, 0.1, k=2)
    assert summary["top_share"] == pytest.approx(1000 / 4240, rel=1e-9)
    assert summary["top_enrichment"] == pytest.approx(10000 / 4240, rel=1e-9)
    noise_triggered, noise_clean = float((noise[mask] ** 2).sum()), float((noise[~mask] ** 2).sum())
    assert summary["tail_share"] == pytest.approx(
        noise_triggered / (noise_triggered + noise_clean), rel=1e-8)
    assert summary["triggered_energy_in_top"] == pytest.approx(
        1000 / (1000 + noise_triggered), rel=1e-9)
    assert summary["clean_energy_in_top"] == pytest.approx(9 * 360 / (9 * 360 + noise_clean),
                                                           rel=1e-9)


def test_shares_sum_to_the_number_of_triggered_rows_at_full_rank():
    features = torch.randn(120, 300, generator=generator(5), dtype=F64)
    mask = torch.arange(120) % 7 == 0
    shares = triggered_share_per_direction(features, mask)
    assert shares.shape == (120,)
    assert float(shares.sum()) == pytest.approx(int(mask.sum()), abs=1e-9)
    assert float(shares.min()) >= 0 and float(shares.max()) <= 1


def test_strong_trigger_concentrates_in_the_top_k_and_a_weak_one_does_not():
    """A mix of 900 clean rows and 100 triggered ones (row share 0.1), k = 16. Trigger 3·e_100 (a
    tail axis of the clean features, energy 900, near the clean 8th direction's 938): one
    top-16 direction is mostly triggered (measured share 0.87 at direction 9) and the top-k
    energy share 0.120 (enrichment 1.20). Trigger 0.05·e_100: top share 0.0988 (enrichment
    0.99), no top-16 direction above 0.12."""
    clean = clean_features()
    mask = torch.arange(1000) >= 900
    results = {}
    for name, strength in (("strong", 3.0), ("weak", 0.05)):
        mix = torch.where(mask.unsqueeze(1), clean + strength * axis(100), clean)
        result = spectrum(mix, all_left=True)
        shares = triggered_share_per_direction(result, mask)
        results[name] = shares, triggered_share_summary(shares, result.values, 0.1, k=16)
    shares, summary = results["strong"]
    assert float(shares[:16].max()) > 0.8
    assert summary["top_enrichment"] > 1.15
    assert summary["triggered_energy_in_top"] > summary["clean_energy_in_top"]
    shares, summary = results["weak"]
    assert float(shares[:16].max()) < 0.2
    assert 0.95 < summary["top_enrichment"] < 1.05


# -- the trigger's shift against the clean top directions -----------------------------------------

def test_weak_trigger_orthogonal_to_the_clean_top_k_lands_in_the_tail():
    """Shift 0.05·e_100 against the clean features' top 32 directions: measured fraction inside
    the top 16 2.8e-5 (mean and per sample alike: every image shifts by the same vector, so the
    consistency is 1), largest |cosine| 0.0045."""
    clean = clean_features()
    directions = spectrum(clean, top=32).right
    result = shift_alignment(clean, clean + 0.05 * axis(100), directions)
    assert result["cumulative"].shape == (33,) and result["cosine"].shape == (32,)
    assert float(result["cumulative"][16]) < 1e-3
    assert float(result["per_sample_cumulative"][16]) < 1e-3
    assert float(result["cosine"].abs().max()) < 0.02
    assert result["consistency"] == pytest.approx(1.0, abs=1e-9)
    assert result["shift_norm"] == pytest.approx(0.05, rel=1e-9)


def test_trigger_inside_the_span_reaches_one():
    """Shift (e_1 + e_2)/√2, the clean 2nd and 3rd directions (the 1st is the mean along e_0).
    With the exact axes as directions the curve is 0, 0, 0.5, 1 (cosines 1/√2); with the
    directions estimated from the clean features, measured 0.0045, 0.463, 0.993 at k = 1, 2, 3."""
    clean = clean_features()
    shifted = clean + (axis(1) + axis(2)) / math.sqrt(2)
    exact = shift_alignment(clean, shifted, torch.eye(120, dtype=F64)[:10])
    assert torch.allclose(exact["cumulative"][:4], torch.tensor([0, 0, 0.5, 1], dtype=F64),
                          atol=1e-12)
    assert float(exact["cumulative"][-1]) == pytest.approx(1.0, abs=1e-12)
    assert float(exact["cosine"][1]) == pytest.approx(1 / math.sqrt(2), abs=1e-12)
    padded = torch.cat([torch.eye(120, dtype=F64)[:3], torch.zeros(2, 120, dtype=F64)]).float()
    assert float(shift_alignment(clean, shifted, padded)["cumulative"][-1]) \
        == pytest.approx(1.0, abs=1e-6)
    estimated = shift_alignment(clean, shifted, spectrum(clean, top=32).right)
    assert float(estimated["cumulative"][1]) < 0.02
    assert float(estimated["cumulative"][3]) > 0.98
    assert (estimated["cumulative"].diff() >= -1e-12).all()
    assert float(estimated["cumulative"][-1]) <= 1 + 1e-12


def test_shift_against_the_clean_spread():
    """Clean rows with independent N(0, σ_j²) coordinates (σ_j = 2 on 4 axes, 0.5 on 60): total
    variance 4·4 + 60·0.25 = 31. A shift of 0.5 e_1 for all images gives ‖Δ‖² = 0.25, so
    shift_to_spread 0.25 / 31; with a further per-image ±1 along e_70 (signs alternating, so
    Δ is unchanged) the per-image energy is 1.25 and sample_shift_to_spread 1.25 / 31."""
    g = generator(3)
    scales = torch.cat([torch.full((4,), 2.0), torch.full((60,), 0.5)]).to(F64)
    raw = torch.randn(4000, 64, generator=g, dtype=F64)
    # exact moments: centre, then give every column the variance of its scale
    raw = (raw - raw.mean(0)) / raw.std(0, unbiased=False)
    clean = torch.cat([raw * scales, torch.zeros(4000, 16, dtype=F64)], 1) + 3.0
    signs = torch.tensor([1.0, -1.0], dtype=F64).repeat(2000)
    triggered = clean + 0.5 * axis(1, width=80) + signs.unsqueeze(1) * axis(70, width=80)
    result = shift_alignment(clean, triggered, torch.eye(80, dtype=F64)[:8])
    assert result["shift_to_spread"] == pytest.approx(0.25 / 31, rel=1e-9)
    assert result["sample_shift_to_spread"] == pytest.approx(1.25 / 31, rel=1e-9)
    flat = shift_alignment(torch.ones(10, 5), torch.ones(10, 5) + 1, torch.eye(5)[:2])
    assert math.isnan(flat["shift_to_spread"])  # no spread to compare with


def test_rank_two_trigger_per_sample_fractions():
    """Per-image shift d_i = α_i e_1 + β_i e_40 (α ~ 1 ± 0.2, β ~ N(0, 0.5²)), exact axes as
    directions: the mean-shift curve at k = 2 is ᾱ² / (ᾱ² + β̄²), the per-sample one the mean of
    α_i² / (α_i² + β_i²), both 1 once e_40 is in; consistency ‖Δ‖² / mean ‖d_i‖²."""
    clean = clean_features(n=400)
    g = generator(9)
    alpha = 1 + 0.2 * torch.randn(400, generator=g, dtype=F64)
    beta = 0.5 * torch.randn(400, generator=g, dtype=F64)
    triggered = clean + alpha.unsqueeze(1) * axis(1) + beta.unsqueeze(1) * axis(40)
    result = shift_alignment(clean, triggered.float(), torch.eye(120, dtype=F64)[:60])
    mean_alpha, mean_beta = float(alpha.mean()), float(beta.mean())
    tol = 1e-6  # the triggered features were rounded to float32
    assert float(result["cumulative"][2]) == pytest.approx(
        mean_alpha ** 2 / (mean_alpha ** 2 + mean_beta ** 2), abs=tol)
    assert float(result["per_sample_cumulative"][2]) == pytest.approx(
        float((alpha ** 2 / (alpha ** 2 + beta ** 2)).mean()), abs=tol)
    assert float(result["per_sample_cumulative"][41]) == pytest.approx(1.0, abs=tol)
    assert result["consistency"] == pytest.approx(
        (mean_alpha ** 2 + mean_beta ** 2) / float((alpha ** 2 + beta ** 2).mean()), rel=1e-5)


# -- the source's Figure 2 -----------------------------------------------------------------------

def test_split_projection_matches_the_explicit_tail():
    """Top part = F V_kᵀ; the tail part keeps the explicit tail's pairwise distances when all its
    components are kept, and its 50 columns have the norms of the centred tail's top 50
    singular values."""
    features = torch.randn(120, 300, generator=generator(13), dtype=F64) \
        * torch.logspace(0, -1, 300, dtype=F64) + 0.5
    directions = spectrum(features, top=10).right
    top_part, tail_part = split_projection(features, directions, 4, tail_components=500)
    tail = features - features @ directions[:4].T @ directions[:4]
    assert torch.allclose(top_part, features @ directions[:4].T, atol=1e-12)
    assert tail_part.shape == (120, 120)
    assert torch.allclose(distances(tail_part), distances(tail), atol=1e-9)
    _, compressed = split_projection(features, directions, 4)
    centred = torch.linalg.svdvals(tail - tail.mean(0))
    assert compressed.shape == (120, 50)
    assert torch.allclose(compressed.norm(dim=0), centred[:50], rtol=1e-8)


def test_tsne_is_deterministic_and_keeps_planted_classes_apart():
    """Three Gaussian clusters (60 points each, 100 dims, centres 8 apart, unit noise): every
    point's nearest neighbour in the embedding is of its own class; same seed, same embedding."""
    g = generator(17)
    centres = 8 * torch.randn(3, 100, generator=g, dtype=F64) / math.sqrt(2)
    labels = torch.arange(3).repeat_interleave(60)
    points = centres[labels] + torch.randn(180, 100, generator=g, dtype=F64)
    embedding = tsne_embedding(points, seed=0)
    assert embedding.shape == (180, 2) and embedding.dtype == F64
    assert torch.equal(embedding, tsne_embedding(points, seed=0))
    nearest = distances(embedding).fill_diagonal_(math.inf).argmin(1)
    assert (labels[nearest] == labels).all()


# -- bad input ---------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    features = torch.randn(30, 40, generator=generator(19), dtype=F64)
    with pytest.raises(ValueError, match="30 rows"):
        triggered_share_per_direction(features, torch.zeros(29, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        triggered_share_per_direction(features, torch.zeros(30))
    with pytest.raises(ValueError, match="all_left"):
        triggered_share_per_direction(spectrum(features, top=3), torch.zeros(30, dtype=torch.bool))
    with pytest.raises(ValueError, match="orthonormal"):
        shift_alignment(features, features, torch.randn(3, 40, dtype=F64))
    with pytest.raises(ValueError, match="paired"):
        shift_alignment(features, features[:20], torch.eye(40, dtype=F64)[:3])
    with pytest.raises(ValueError, match="same feature space"):
        split_projection(features, torch.eye(39, dtype=F64)[:3], 2)
    with pytest.raises(ValueError, match="more than the 3 directions"):
        split_projection(features, torch.eye(40, dtype=F64)[:3], 4)
    with pytest.raises(ValueError, match="method"):
        spectrum(features, method="eig")
    with pytest.raises(ValueError, match="top"):
        spectrum(features, top=-1)
    with pytest.raises(ValueError, match="row_share"):
        triggered_share_summary(torch.ones(3), torch.ones(3), 0.0, 1)
    with pytest.raises(ValueError, match="at least 5 points"):
        tsne_embedding(features[:3], seed=0)
    assert isinstance(spectrum(features), Spectrum)


# -- figures -----------------------------------------------------------------------------------------

def realistic_figure_inputs():
    """Numbers shaped like a run's: spectra of clean / triggered / mix, shares, shift curves."""
    clean = clean_features(n=600)
    mask = torch.arange(600) >= 540
    triggered = clean + 3.0 * axis(100)
    mix = torch.where(mask.unsqueeze(1), triggered, clean)
    mix_spectrum = spectrum(mix, all_left=True)
    shares = triggered_share_per_direction(mix_spectrum, mask)
    directions = spectrum(clean, top=60).right
    curve = shift_alignment(clean, triggered, directions)
    return {"clean": spectrum(clean).values, "triggered": spectrum(triggered).values,
            "mix": mix_spectrum.values}, shares, curve


def test_each_figure_writes_a_png_of_its_size(tmp_path):
    spectra, shares, curve = realistic_figure_inputs()
    g = generator(23)
    embedding = torch.randn(200, 2, generator=g)
    labels = torch.randint(0, 10, (200,), generator=g)
    written = {
        "spectra": figures.plot_spectra(tmp_path / "a" / "spectra.png", spectra, k=16),
        "triggered_share": figures.plot_triggered_share(tmp_path / "share.png",
                                                        {"layer1": shares}, 0.1, 16),
        "shift_alignment": figures.plot_shift_alignment(
            tmp_path / "shift.png", {"mean": curve["cumulative"],
                                     "per sample": curve["per_sample_cumulative"]}, k=16),
        "tsne": figures.plot_tsne(tmp_path / "tsne.png", embedding, embedding.flip(1), labels,
                                  torch.arange(200) < 20, [f"class {c}" for c in range(10)],
                                  "t-SNE", k=16),
        "over_training": figures.plot_over_training(
            tmp_path / "rank.png", [1, 2, 3], {"clean": [5.0, 4.0, 3.5],
                                               "triggered": [4.0, 2.0, 1.5]},
            asr=[0.1, 0.8, 0.99]),
    }
    for kind, path in written.items():
        assert path.exists() and path.stat().st_size > 10_000
        assert png_size(path) == figures.pixel_size(kind)
    assert written["spectra"] == tmp_path / "a" / "spectra.png"


def test_figures_reject_mismatched_input(tmp_path):
    path = tmp_path / "bad.png"
    with pytest.raises(ValueError, match="3 epochs"):
        figures.plot_over_training(path, [1, 2, 3], {"clean": [1.0, 2.0]})
    with pytest.raises(ValueError, match="asr has 2 values"):
        figures.plot_over_training(path, [1, 2, 3], {"clean": [1.0, 2.0, 3.0]}, asr=[0.1, 0.2])
    with pytest.raises(ValueError, match="fractions"):
        figures.plot_over_training(path, [1, 2], {"clean": [1.0, 2.0]}, asr=[50.0, 90.0])
    points = torch.zeros(10, 2)
    with pytest.raises(ValueError, match="one entry per sample"):
        figures.plot_tsne(path, points, points[:9], torch.zeros(10, dtype=torch.long),
                          torch.zeros(10, dtype=torch.bool), ["a"], "t")
    with pytest.raises(ValueError, match="class_names"):
        figures.plot_tsne(path, points, points, torch.full((10,), 3),
                          torch.zeros(10, dtype=torch.bool), ["a", "b"], "t")
    with pytest.raises(ValueError, match="non-empty dict"):
        figures.plot_spectra(path, {})
    with pytest.raises(ValueError, match="row_share"):
        figures.plot_triggered_share(path, {"a": [0.5]}, 1.5, 4)
    with pytest.raises(ValueError, match="fractions in"):
        figures.plot_shift_alignment(path, {"a": [0.0, 1.7]})
    assert not path.exists()
