"""Refool and the high-rank trigger, checked with numbers: Refool's focal residual is a blurred
copy of a non-target reflection scaled by alpha (its mean kept, its total variation lowered), its
ghost residual two copies of the reflection at the fitted offset (found by cross-correlation);
the high-rank trigger's matrix has rank m, a flat spectrum and the stated L2 norm. Both attacks
also pass the conformance test of test_attack_suite.py, which picks them up from the registry."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from eigenguard.attacks import NotFittedError, create_attack, list_attacks
from eigenguard.data import ImageSet

SHAPES = [(1, 28), (3, 32)]
TARGET = 2


def image_set(images, labels, classes=5, name="synthetic"):
    channels = images.shape[1]
    return ImageSet(images, labels, tuple(map(str, range(classes))), (0.5,) * channels,
                    (0.25,) * channels, name)


def random_set(n=200, channels=1, size=28, seed=0, classes=5):
    """Random images over 0..255 (noise: sharp autocorrelation), labels cycling over the
    classes, then shuffled."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    labels = (torch.arange(n) % classes)[torch.randperm(n, generator=g)]
    return image_set(images, labels, classes)


def zeros(n, channels, size):
    return torch.zeros(n, channels, size, size, dtype=torch.uint8)


def total_variation(array):
    """Anisotropic total variation of (..., H, W), summed."""
    return (np.abs(np.diff(array, axis=-1)).sum() + np.abs(np.diff(array, axis=-2)).sum())


# -- independent references (numpy) ----------------------------------------------------------

def reference_blur(image, sigma):
    """(C, H, W) float: Gaussian of std sigma truncated at ceil(2 sigma), normalised, borders by
    numpy's 'symmetric' padding (dcba|abcd), separable."""
    radius = math.ceil(2 * sigma)
    x = np.arange(-radius, radius + 1)
    kernel = np.exp(-x ** 2 / (2 * sigma ** 2))
    kernel /= kernel.sum()
    padded = np.pad(image, ((0, 0), (radius, radius), (radius, radius)), mode="symmetric")
    rows = np.apply_along_axis(lambda v: np.convolve(v, kernel, "valid"), 1, padded)
    return np.apply_along_axis(lambda v: np.convolve(v, kernel, "valid"), 2, rows)


def reference_ghost(image, dy, dx, attenuation):
    shifted = np.zeros_like(image)
    shifted[:, dy:, dx:] = image[:, :image.shape[1] - dy, :image.shape[2] - dx]
    return attenuation * image + (1 - attenuation) * shifted


def cross_correlation_peaks(residual, reflection, reach=10):
    """The shifts (dy, dx), |dy|, |dx| <= reach, ordered by the correlation of the centred
    residual with the centred reflection moved by that shift (largest first)."""
    a = residual - residual.mean()
    b = reflection - reflection.mean()
    height, width = a.shape[-2:]
    scores = {}
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            ya, yb = max(dy, 0), max(-dy, 0)
            xa, xb = max(dx, 0), max(-dx, 0)
            h, w = height - abs(dy), width - abs(dx)
            scores[(dy, dx)] = float((a[..., ya:ya + h, xa:xa + w]
                                      * b[..., yb:yb + h, xb:xb + w]).sum())
    return sorted(scores, key=scores.get, reverse=True)


def fitted_refool(channels=1, size=28, seed=0, target=TARGET, data=None, **settings):
    data = data if data is not None else random_set(200, channels, size, seed=11)
    attack = create_attack("refool", **settings).fit(data, seed=seed)
    return attack.for_target(target) if target is not None else attack


# -- both attacks are registered and run through the shared conformance test -------------------

def test_both_attacks_are_registered():
    assert {"refool", "highrank"} <= set(list_attacks())


# -- Refool: settings ----------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
BAD_SETTINGS = [
    ("refool", "alpha", 0), ("refool", "alpha", -0.2), ("refool", "alpha", 1.5),
    ("refool", "alpha", NAN), ("refool", "alpha", True), ("refool", "alpha", "0.4"),
    ("refool", "sigma", 0), ("refool", "sigma", -1), ("refool", "sigma", INF),
    ("refool", "ghost_rate", -0.1), ("refool", "ghost_rate", 1.1), ("refool", "ghost_rate", NAN),
    ("refool", "mode", "blur"), ("refool", "mode", None),
    ("refool", "ghost_offset", 0), ("refool", "ghost_offset", -3), ("refool", "ghost_offset", 2.5),
    ("refool", "ghost_alpha", -0.1), ("refool", "ghost_alpha", 1.2),
    ("refool", "reflections", 0), ("refool", "reflections", 3.0), ("refool", "reflections", True),
    ("refool", "clean_label", 1), ("refool", "clean_label", "yes"),
    ("highrank", "m", 0), ("highrank", "m", 2.5), ("highrank", "m", True),
    ("highrank", "eps", 0), ("highrank", "eps", -4), ("highrank", "eps", 256),
    ("highrank", "eps", NAN), ("highrank", "eps", "8"),
]


@pytest.mark.parametrize("name,setting,value", BAD_SETTINGS)
def test_bad_settings_are_refused_naming_the_setting(name, setting, value):
    with pytest.raises(ValueError, match=rf"\b{setting} must be .*got"):
        create_attack(name, **{setting: value})


def test_defaults_and_normalised_settings():
    assert create_attack("refool").settings() == {
        "mode": "mixed", "alpha": 0.6, "ghost_rate": 0.49, "sigma": None, "ghost_offset": None,
        "ghost_alpha": None, "reflections": 16, "clean_label": True}
    assert create_attack("highrank").settings() == {"m": 32, "eps": 24.0}
    assert create_attack("refool", alpha=1, sigma=2, ghost_offset=np.int64(4)).settings()[
        "sigma"] == 2.0
    assert create_attack("highrank", m=np.int64(8), eps=8).settings() == {"m": 8, "eps": 8.0}
    refool, highrank = create_attack("refool"), create_attack("highrank")
    assert refool.clean_label and refool.needs_fit
    assert not create_attack("refool", clean_label=False).clean_label
    assert not highrank.clean_label and highrank.needs_fit


# -- Refool: focal mode -------------------------------------------------------------------------

@pytest.mark.parametrize("channels,size", SHAPES)
@pytest.mark.parametrize("sigma,alpha", [(None, 0.6), (2.0, 0.4), (1.0, 1.0), (5.0, 0.25)])
def test_refool_focal_residual_is_the_blurred_reflection_times_alpha(channels, size, sigma,
                                                                      alpha):
    attack = fitted_refool(channels, size, mode="focal", sigma=sigma, alpha=alpha)
    black = zeros(6, channels, size)
    which, is_ghost = attack.choices(black)
    assert not is_ghost.any() and (which == which[0]).all()  # the same image, the same choice
    residual = attack.apply(black)[0].double().numpy()  # x = 0: the residual is the output
    reflection = attack.reflection_images[which[0]].double().numpy()
    used_sigma = float(attack.sigmas_[attack.active_[which[0]]])
    if sigma is not None:
        assert used_sigma == sigma
    else:
        assert 1 <= used_sigma <= 5
    # an independent blur (numpy, 'symmetric' borders), scaled by alpha, rounded
    expected = alpha * reference_blur(reflection, used_sigma)
    assert np.abs(residual - expected).max() <= 0.5 + 1e-9
    # the blur keeps the reflection's mean, channel by channel: alpha × the mean within rounding
    means = residual.mean(axis=(1, 2))
    assert np.abs(means - alpha * reflection.mean(axis=(1, 2))).max() <= 0.5
    # low-pass: much less total variation than the unblurred reflection at the same weight
    assert total_variation(residual) < 0.5 * alpha * total_variation(reflection)
    assert total_variation(residual) > 0


# -- Refool: ghost mode -------------------------------------------------------------------------

@pytest.mark.parametrize("channels,size", SHAPES)
@pytest.mark.parametrize("offset,ghost_alpha", [(None, None), (5, 0.3), (3, 0.7), (8, 0.5)])
def test_refool_ghost_residual_is_two_copies_at_the_offset(channels, size, offset, ghost_alpha):
    alpha = 0.6
    attack = fitted_refool(channels, size, seed=3, mode="ghost", ghost_offset=offset,
                           ghost_alpha=ghost_alpha, alpha=alpha)
    which, is_ghost = attack.choices(zeros(1, channels, size))
    assert is_ghost.all()
    index = attack.active_[which[0]]
    dy, dx = attack.ghost_offsets_[index].tolist()
    attenuation = float(attack.ghost_alphas_[index])
    if offset is None:
        assert 3 <= dy <= 8 and 3 <= dx <= 8
        assert 0.15 <= min(attenuation, 1 - attenuation) <= 0.5
    else:
        assert (dy, dx) == (offset, offset) and attenuation == ghost_alpha
    residual = attack.apply(zeros(1, channels, size))[0].double().numpy()
    reflection = attack.reflection_images[which[0]].double().numpy()
    # the two largest cross-correlation peaks sit at no shift and at the ghost's offset
    peaks = cross_correlation_peaks(residual, reflection)
    assert set(peaks[:2]) == {(0, 0), (dy, dx)}
    # and the residual is alpha × the two-pulse ghost, within rounding (independent reference)
    expected = alpha * reference_ghost(reflection, dy, dx, attenuation)
    assert np.abs(residual - expected).max() <= 0.5 + 1e-9


@pytest.mark.parametrize("channels,size", SHAPES)
def test_refool_blend_formula_on_random_images(channels, size):
    """x' = round((1 − alpha) x + alpha P): P the chosen image's ghost or focal reflection,
    computed here independently."""
    attack = fitted_refool(channels, size, seed=5, alpha=0.6)
    images = random_set(300, channels, size, seed=4).images
    which, is_ghost = attack.choices(images)
    assert 0 < is_ghost.sum() < len(images)  # mixed mode uses both types
    assert len(which.unique()) == len(attack.active_)  # every reflection is used
    references = {}
    for k, index in enumerate(attack.active_.tolist()):
        reflection = attack.reflection_images[k].double().numpy()
        dy, dx = attack.ghost_offsets_[index].tolist()
        references[k] = (reference_blur(reflection, float(attack.sigmas_[index])),
                         reference_ghost(reflection, dy, dx, float(attack.ghost_alphas_[index])))
    expected = np.stack([0.4 * images[i].double().numpy() + 0.6 * references[int(which[i])][
        int(is_ghost[i])] for i in range(len(images))])
    out = attack.apply(images).double().numpy()
    difference = np.abs(out - np.clip(np.round(expected), 0, 255))
    assert difference.max() <= 1  # ties at .5 may round either way after float noise
    assert (difference == 0).mean() > 0.999


def test_refool_mixed_mode_draws_ghosts_at_the_ghost_rate_per_image():
    images = random_set(4000, 1, 28, seed=8).images
    data = random_set(200, 1, 28, seed=11)
    mixed = fitted_refool(data=data, seed=2)
    ghost = fitted_refool(data=data, seed=2, mode="ghost")
    focal = fitted_refool(data=data, seed=2, mode="focal")
    _, is_ghost = mixed.choices(images)
    assert abs(is_ghost.double().mean().item() - 0.49) < 0.03
    out = mixed.apply(images)
    assert torch.equal(out[is_ghost], ghost.apply(images[is_ghost]))
    assert torch.equal(out[~is_ghost], focal.apply(images[~is_ghost]))
    for rate, share in ((0.0, 0.0), (1.0, 1.0)):
        attack = fitted_refool(data=data, seed=2, ghost_rate=rate)
        assert attack.choices(images)[1].double().mean().item() == share


# -- Refool: where the reflections come from ----------------------------------------------------

@pytest.mark.parametrize("target", range(5))
def test_refool_reflections_are_non_target_images_of_the_set(target):
    data = random_set(200, 1, 28, seed=13)
    attack = create_attack("refool").fit(data, seed=0)
    poisoned = attack.poison(data, 0.1, target, seed=1)
    assert int(attack.target_) == target
    indices, labels = attack.reflection_indices, attack.reflection_labels
    assert len(indices) == 16 and len(indices.unique()) == 16
    assert (labels != target).all() and torch.equal(labels, data.labels[indices])
    assert torch.equal(attack.reflection_images, data.images[indices])  # images of the set itself
    # clean label: the poisoned samples are target-class images, none of them a reflection
    assert (data.labels[poisoned.poison_indices] == target).all()
    assert not torch.isin(poisoned.poison_indices, indices).any()
    assert torch.equal(poisoned.data.labels, data.labels)


def test_refool_dirty_label_never_poisons_a_reflections_own_image():
    data = random_set(200, 1, 28, seed=13)
    attack = create_attack("refool", clean_label=False).fit(data, seed=0)
    poisoned = attack.poison(data, 0.9, TARGET, seed=1)  # 180 of the 184 non-reflection images
    assert len(poisoned.poison_indices) == 180
    assert not torch.isin(poisoned.poison_indices, attack.reflection_indices).any()
    assert (poisoned.data.labels[poisoned.poison_indices] == TARGET).all()
    with pytest.raises(ValueError, match=r"largest possible poison ratio here is 0\.9200"):
        attack.poison(data, 0.95, TARGET, seed=1)


def test_refool_small_sets_and_a_set_without_other_classes():
    data = random_set(10, 1, 28, seed=1)
    attack = create_attack("refool").fit(data, seed=0).for_target(TARGET)
    others = int((data.labels != TARGET).sum())
    assert len(attack.active_) == others < 16  # as many as there are
    only_target = image_set(data.images, torch.full((10,), TARGET))
    with pytest.raises(ValueError, match=r"classes other than the target"):
        create_attack("refool").fit(only_target, seed=0).for_target(TARGET)
    with pytest.raises(ValueError, match=r"ghost_offset 28 does not fit 28×28"):
        create_attack("refool", ghost_offset=28).fit(data)


# -- Refool: determinism and fitted state -------------------------------------------------------

def test_refool_is_deterministic_batch_independent_and_its_state_round_trips(tmp_path):
    data = random_set(200, 3, 32, seed=11)
    images = random_set(50, 3, 32, seed=12).images
    first = create_attack("refool").fit(data, seed=7)
    again = create_attack("refool").fit(data, seed=7)
    other = create_attack("refool").fit(data, seed=8)
    assert all(torch.equal(first.fitted_state()[k], again.fitted_state()[k])
               for k in first.fitted_state())
    assert not torch.equal(first.reflection_indices, other.reflection_indices)
    assert torch.equal(first.apply(images), again.apply(images))
    # an image's reflection and type depend on its pixels only, not on its batch
    alone = torch.cat([first.apply(images[i:i + 1]) for i in range(len(images))])
    assert torch.equal(first.apply(images), alone)
    assert torch.equal(first.apply(images.flip(0)), first.apply(images).flip(0))
    # the state saved after poisoning (target chosen) restores the same attack
    first.poison(data, 0.05, TARGET, seed=0)
    save_file(first.fitted_state(), tmp_path / "refool.safetensors")
    restored = create_attack("refool").load_fitted_state(
        load_file(tmp_path / "refool.safetensors"))
    assert int(restored.target_) == TARGET
    assert torch.equal(restored.reflection_indices, first.reflection_indices)
    assert torch.equal(restored.apply(images), first.apply(images))
    with pytest.raises(ValueError, match=r"fitted on images of shape \(3, 32, 32\)"):
        first.apply(zeros(1, 1, 28))
    with pytest.raises(NotFittedError):
        create_attack("refool").apply(images)


# -- High-rank trigger --------------------------------------------------------------------------

def fitted_highrank(channels=1, size=28, seed=0, **settings):
    return create_attack("highrank", **settings).fit(random_set(8, channels, size, seed=99),
                                                     seed=seed)


def spectrum(matrix):
    return torch.linalg.svdvals(matrix.reshape(len(matrix), -1))


@pytest.mark.parametrize("channels,size", SHAPES)
@pytest.mark.parametrize("m", [16, 32])
def test_highrank_triggers_of_poisoned_zero_images_have_rank_m_and_a_flat_spectrum(channels,
                                                                                   size, m):
    n = 200
    attack = fitted_highrank(channels, size, m=m)
    data = image_set(zeros(n, channels, size), torch.arange(n) % 5)
    poisoned = attack.poison(data, 1.0, TARGET, seed=3)
    assert torch.equal(poisoned.poison_indices, torch.arange(n))
    delta = attack.triggers(n, "train")  # the float triggers the poisoning added, in order
    # on a zero image the poisoned image is the trigger, rounded and clipped at 0
    assert torch.equal(poisoned.data.images, delta.round().clamp(0, 255).to(torch.uint8))
    values = spectrum(delta)
    # numerical rank m: m singular values well above zero, the rest at float noise
    assert values[m - 1] > 0.5 * values[0]
    assert values[m:].max() < 1e-9 * values[0]
    # no dominant direction: the top one carries at most about 2/m of the energy (here ~1/m,
    # since every block of m images spreads its energy exactly equally)
    energy = values ** 2 / (values ** 2).sum()
    assert energy[0] <= 2 / m
    assert energy[0] <= math.ceil(n / m) / n + 1e-9
    # a fixed trigger, for contrast, puts everything in one direction
    fixed = create_attack("badnets").apply(data.images).double()
    fixed_values = spectrum(fixed)
    assert (fixed_values[0] ** 2 / (fixed_values ** 2).sum()) > 0.999


@pytest.mark.parametrize("channels,size", SHAPES)
def test_highrank_uint8_residuals_keep_rank_m_up_to_rounding(channels, size):
    """On mid-grey images nothing clips: the uint8 residual is the trigger up to rounding, and
    by Weyl's inequality its (m+1)-th singular value is at most the rounding error's norm."""
    n, m = 200, 16
    attack = fitted_highrank(channels, size, m=m, eps=16)
    grey = torch.full((n, channels, size, size), 128, dtype=torch.uint8)
    delta = attack.triggers(n, "test")
    assert delta.abs().max() < 127  # no clipping
    residual = attack.apply(grey).double() - 128
    error = residual - delta
    assert error.abs().max() <= 0.5 + 1e-9
    values = spectrum(residual)
    bound = float(error.norm())
    assert values[m:].max() <= bound
    assert values[m - 1] > 10 * bound


@pytest.mark.parametrize("channels,size", SHAPES)
@pytest.mark.parametrize("eps", [4.0, 24.0, 60.0])
def test_highrank_l2_bound(channels, size, eps):
    attack = fitted_highrank(channels, size, eps=eps)
    values = channels * size * size
    bound = eps * math.sqrt(values)
    assert attack.l2_norm == pytest.approx(bound)
    for stream in ("train", "test"):
        norms = attack.triggers(100, stream).flatten(1).norm(dim=1)
        assert torch.allclose(norms, torch.full_like(norms, bound), rtol=1e-12)
    images = random_set(100, channels, size, seed=3).images
    residual = (attack.apply(images).double() - images.double()).flatten(1)
    # rounding moves each value by at most 0.5, clipping only shortens a change
    assert (residual.norm(dim=1) <= bound + 0.5 * math.sqrt(values) + 1e-9).all()
    assert (residual.abs() <= attack.triggers(100).flatten(1).abs() + 0.5 + 1e-9).all()


@pytest.mark.parametrize("channels,size", SHAPES)
def test_highrank_patterns_are_orthonormal_dense_and_zero_mean(channels, size):
    m = 32
    attack = fitted_highrank(channels, size, m=m)
    basis = attack.basis_.flatten(1)
    assert basis.shape == (m, channels * size * size)
    assert torch.allclose(basis @ basis.T, torch.eye(m, dtype=torch.float64), atol=1e-12)
    assert attack.basis_.mean(dim=(2, 3)).abs().max() < 1e-12  # per channel
    # dense: every value is used and none dominates (a unit vector spread over d values)
    assert (basis != 0).all()
    assert basis.abs().max() < 6 / math.sqrt(basis.shape[1])
    coefficients = attack.coefficients(3 * m + 5)
    assert torch.allclose(coefficients.norm(dim=1), torch.ones(3 * m + 5, dtype=torch.float64))
    block = coefficients[m:2 * m]
    assert torch.allclose(block @ block.T, torch.eye(m, dtype=torch.float64), atol=1e-12)
    with pytest.raises(ValueError, match=r"m must be at most 3 "):
        create_attack("highrank", m=4).fit(random_set(4, 1, 2, seed=0), seed=0)


def test_highrank_each_image_gets_its_own_trigger_and_test_draws_are_fresh():
    attack = fitted_highrank(m=16)
    data = image_set(torch.full((64, 1, 28, 28), 128, dtype=torch.uint8), torch.arange(64) % 5)
    train = attack.poison(data, 1.0, TARGET, seed=0).data.images
    test = attack.apply(data.images)
    assert len({image.numpy().tobytes() for image in train}) == 64
    assert len({image.numpy().tobytes() for image in test}) == 64
    # the test stream's triggers are none of the training stream's
    train_c, test_c = attack.coefficients(64, "train"), attack.coefficients(64, "test")
    assert (train_c @ test_c.T).abs().max() < 0.99
    assert not torch.equal(train, test)


def test_highrank_is_deterministic_and_its_state_round_trips(tmp_path):
    data = random_set(100, 3, 32, seed=5)
    first = fitted_highrank(3, 32, seed=4)
    again = fitted_highrank(3, 32, seed=4)
    other = fitted_highrank(3, 32, seed=5)
    assert set(first.fitted_state()) == {"basis_", "stream_seeds_"}
    assert all(torch.equal(first.fitted_state()[k], again.fitted_state()[k])
               for k in first.fitted_state())
    assert not torch.equal(first.basis_, other.basis_)
    assert torch.equal(first.apply(data.images), again.apply(data.images))
    assert torch.equal(first.poison(data, 0.3, TARGET, seed=1).data.images,
                       again.poison(data, 0.3, TARGET, seed=1).data.images)
    # poisoning leaves apply on its own (test) stream, also when it fails
    before = first.apply(data.images)
    with pytest.raises(ValueError):
        first.poison(data, 2.0, TARGET, seed=1)
    assert torch.equal(first.apply(data.images), before)
    save_file(first.fitted_state(), tmp_path / "highrank.safetensors")
    restored = create_attack("highrank").load_fitted_state(
        load_file(tmp_path / "highrank.safetensors"))
    assert torch.equal(restored.apply(data.images), before)
    assert torch.equal(restored.poison(data, 0.3, TARGET, seed=1).data.images,
                       first.poison(data, 0.3, TARGET, seed=1).data.images)
    with pytest.raises(ValueError, match=r"fitted on images of shape \(3, 32, 32\)"):
        first.apply(zeros(1, 1, 28))
    with pytest.raises(NotFittedError):
        create_attack("highrank").apply(data.images)
