"""The attack suite: every registered attack passes one conformance test, every setting is checked,
and each trigger has its defining property, with numbers (SIG's column profile, WaNet's bounded
warp and noise mode, BppAttack's colour levels)."""

import numpy as np
import pytest
import torch

from eigenguard.attacks import NotFittedError, create_attack, list_attacks
from eigenguard.attacks.wanet import identity_grid, upsample_field
from eigenguard.data import ImageSet

SHAPES = [(1, 28), (3, 32)]  # Fashion-MNIST-like grey and CIFAR-like colour
TARGET = 2


def synthetic_set(n=100, channels=1, size=28, seed=0, classes=5):
    """Random images over the full 0..255 range; labels cycle over the classes (n / classes of
    each, so a clean-label attack has target-class samples to poison), then are shuffled."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    labels = (torch.arange(n) % classes)[torch.randperm(n, generator=g)]
    return ImageSet(images, labels, tuple(map(str, range(classes))), (0.5,) * channels,
                    (0.25,) * channels, "synthetic")


#: attacks whose fit budget is counted in steps, not in passes over the (tiny) set: a few steps
CHEAP_FIT = {"ssba": dict(steps=2, width=4, bits=8)}


def fitted(name, channels, size, seed=0, **settings):
    """A fresh attack (defaults unless given, cheap fits for CHEAP_FIT), fitted on a tiny set of
    the right shape if needed."""
    attack = create_attack(name, **{**CHEAP_FIT.get(name, {}), **settings})
    if attack.needs_fit:
        attack.fit(synthetic_set(8, channels, size, seed=99), seed=seed)
    return attack


# -- conformance: every registered attack ------------------------------------------------------

def test_the_suite_is_registered():
    assert {"badnets", "blended", "sig", "wanet", "bpp"} <= set(list_attacks())


@pytest.mark.parametrize("channels,size", SHAPES)
@pytest.mark.parametrize("name", list_attacks())
def test_attack_conformance(name, channels, size):
    data = synthetic_set(100, channels, size)
    before = data.images.clone()
    attack = fitted(name, channels, size)
    if attack.needs_fit:
        with pytest.raises(NotFittedError):
            create_attack(name).apply(data.images)
        fresh = create_attack(name, **attack.settings()).load_fitted_state(
            attack.fitted_state())
        assert torch.equal(fresh.apply(data.images), attack.apply(data.images))

    # settings round-trip through the registry (as a run's config does)
    assert create_attack(name, **attack.settings()).settings() == attack.settings()

    # apply: uint8 in, a new uint8 tensor of the same shape out, the input untouched
    out = attack.apply(data.images)
    assert out.dtype == torch.uint8 and out.shape == data.images.shape
    assert out.data_ptr() != data.images.data_ptr()
    assert torch.equal(data.images, before)
    assert torch.equal(attack.apply(data.images), out)  # deterministic
    assert not torch.equal(out, data.images)  # the trigger changes something

    for ratio in (0.1, 0.07):
        poisoned = attack.poison(data, ratio, TARGET, seed=5)
        again = attack.poison(data, ratio, TARGET, seed=5)
        other = fitted(name, channels, size).poison(data, ratio, TARGET, seed=5)
        for twin in (again, other):  # deterministic under a seed, also for a new instance
            assert torch.equal(twin.poison_indices, poisoned.poison_indices)
            assert torch.equal(twin.data.images, poisoned.data.images)
            assert torch.equal(twin.data.labels, poisoned.data.labels)
        assert torch.equal(data.images, before)  # the input set is not modified

        images, labels = poisoned.data.images, poisoned.data.labels
        assert images.dtype == torch.uint8 and images.shape == data.images.shape
        assert labels.dtype == torch.int64
        idx = poisoned.poison_indices
        assert len(idx) == round(ratio * len(data))
        assert torch.equal(idx, idx.unique())  # sorted, no repeats
        assert (labels[idx] == TARGET).all()
        assert torch.equal(poisoned.original_labels, data.labels)
        assert poisoned.target == TARGET
        assert (images[idx] != data.images[idx]).any()  # the trigger does something
        if attack.clean_label:
            assert torch.equal(labels, data.labels)  # every label kept ...
            assert (data.labels[idx] == TARGET).all()  # ... because only the target class is drawn
            assert poisoned.flipped_labels == 0

        # WaNet's noise-mode samples are modified but not poisoned; every other sample is as it was
        noise = getattr(poisoned, "noise_indices", torch.zeros(0, dtype=torch.int64))
        assert not poisoned.is_poisoned[noise].any()
        untouched = ~poisoned.is_poisoned
        untouched[noise] = False
        assert torch.equal(images[untouched], data.images[untouched])
        assert torch.equal(labels[~poisoned.is_poisoned], data.labels[~poisoned.is_poisoned])

    other_seed = attack.poison(data, 0.1, TARGET, seed=6)
    assert not torch.equal(other_seed.poison_indices,
                           attack.poison(data, 0.1, TARGET, seed=5).poison_indices)


# -- settings are checked, and the error names the setting --------------------------------------

NAN, INF = float("nan"), float("inf")
BAD_SETTINGS = [
    ("sig", "delta", -20), ("sig", "delta", 0), ("sig", "delta", 256), ("sig", "delta", NAN),
    ("sig", "delta", True), ("sig", "delta", "20"),
    ("sig", "frequency", 0), ("sig", "frequency", -6), ("sig", "frequency", INF),
    ("wanet", "k", 1), ("wanet", "k", 0), ("wanet", "k", 2.5), ("wanet", "k", True),
    ("wanet", "s", 0), ("wanet", "s", -0.5), ("wanet", "s", NAN),
    ("wanet", "cross_ratio", -1), ("wanet", "cross_ratio", NAN),
    ("bpp", "squeeze_num", 1), ("bpp", "squeeze_num", 0), ("bpp", "squeeze_num", 256),
    ("bpp", "squeeze_num", 8.0), ("bpp", "squeeze_num", True),
    ("bpp", "dither", "yes"), ("bpp", "dither", 1),
    ("badnets", "patch", 0), ("blended", "alpha", 0),
]


@pytest.mark.parametrize("name,setting,value", BAD_SETTINGS)
def test_bad_settings_are_refused_naming_the_setting(name, setting, value):
    with pytest.raises(ValueError, match=rf"\b{setting} must be .*got"):
        create_attack(name, **{setting: value})


def test_good_settings_are_accepted_and_normalised():
    assert create_attack("sig", delta=40, frequency=3).settings() == {"delta": 40.0,
                                                                      "frequency": 3.0}
    assert create_attack("wanet", k=2, s=1, cross_ratio=0).settings() == {
        "k": 2, "s": 1.0, "cross_ratio": 0.0}
    assert create_attack("bpp", squeeze_num=np.int64(255), dither=True).settings() == {
        "squeeze_num": 255, "dither": True}


def test_defaults():
    assert create_attack("sig").settings() == {"delta": 40.0, "frequency": 6.0}
    assert create_attack("wanet").settings() == {"k": 4, "s": 0.5, "cross_ratio": 2.0}
    assert create_attack("bpp").settings() == {"squeeze_num": 8, "dither": False}
    assert create_attack("sig").clean_label and not create_attack("wanet").clean_label
    assert create_attack("wanet").needs_fit and not create_attack("bpp").needs_fit


# -- SIG: a horizontal sinusoid, the same down every column ------------------------------------

@pytest.mark.parametrize("channels,size", SHAPES)
@pytest.mark.parametrize("delta,frequency", [(20, 6), (40, 6), (30, 2.5)])
def test_sig_adds_the_column_profile_to_every_row_and_channel(channels, size, delta, frequency):
    grey = torch.full((2, channels, size, size), 128, dtype=torch.uint8)
    out = create_attack("sig", delta=delta, frequency=frequency).apply(grey)
    residual = out.double() - 128
    j = np.arange(size)
    profile = np.round(delta * np.sin(2 * np.pi * j * frequency / size))
    # every row of every channel of every image has the profile, within one level
    assert np.abs(residual.numpy() - profile).max() <= 1
    # and it is constant down each column (and identical across channels and images)
    assert torch.equal(residual, residual[:1, :1, :1, :].expand_as(residual))
    assert residual.abs().max() == pytest.approx(round(delta * max(abs(np.sin(
        2 * np.pi * j * frequency / size)))), abs=1)


def test_sig_clips_at_white_and_black():
    delta, size = 40, 32
    profile = torch.from_numpy(np.round(40 * np.sin(2 * np.pi * np.arange(size) * 6 / size)))
    white = create_attack("sig", delta=delta).apply(torch.full((1, 1, 4, size), 250,
                                                               dtype=torch.uint8))
    black = create_attack("sig", delta=delta).apply(torch.full((1, 1, 4, size), 5,
                                                               dtype=torch.uint8))
    assert torch.equal(white[0, 0, 0].double(), (250 + profile).clamp(max=255))
    assert torch.equal(black[0, 0, 0].double(), (5 + profile).clamp(min=0))


def test_sig_has_f_periods_across_the_width():
    # f = 1 on 28 columns: positive on the first half, negative on the second
    out = create_attack("sig", delta=50, frequency=1).apply(
        torch.full((1, 1, 1, 28), 100, dtype=torch.uint8))[0, 0, 0].double() - 100
    assert (out[1:14] > 0).all() and (out[15:] < 0).all() and out[0] == 0 and out[14] == 0


# -- WaNet: a smooth warp whose displacement is bounded -----------------------------------------

def ramp(channels, size, axis, slope):
    """slope · x (axis = -1, a horizontal ramp) or slope · y (axis = -2), uint8."""
    line = torch.arange(size, dtype=torch.float64) * slope
    shape = [1, 1, 1, 1]
    shape[axis] = size
    return line.view(shape).expand(1, channels, size, size).round().to(torch.uint8).contiguous()


@pytest.mark.parametrize("channels,size", SHAPES)
def test_wanet_field_is_normalised_and_its_displacement_bounded(channels, size):
    attack = fitted("wanet", channels, size, seed=3)
    s, k = attack.s, attack.k
    control = attack.control_
    assert control.shape == (2, k, k)
    assert control.abs().mean().item() == pytest.approx(1.0)  # normalised by the mean |offset|
    grid = attack.grid_
    assert grid.shape == (size, size, 2) and grid.abs().max() <= 1
    # the move, in grid units, is at most s · M / size, M the largest upsampled offset ...
    field = upsample_field(control, size, size)
    bound = s * field.abs().amax(dim=(1, 2)) / size
    move = (grid - identity_grid(size, size)).abs().amax(dim=(0, 1))
    assert (move <= bound + 1e-12).all()
    # ... and M is at most the bicubic kernel's Lebesgue constant (1.375 per axis) times the
    # largest control offset: bicubic upsampling overshoots, but not by more
    assert field.abs().max() <= 1.375 ** 2 * control.abs().max() + 1e-12
    # the bound in pixels (grid units · (size − 1) / 2), as the attack reports it
    dx, dy = attack.max_displacement()
    assert dx == pytest.approx(float(bound[0]) * (size - 1) / 2)
    assert dy == pytest.approx(float(bound[1]) * (size - 1) / 2)
    assert 0.1 < max(dx, dy) < s * 1.375 ** 2 * control.abs().max() / 2  # small but not nothing


@pytest.mark.parametrize("channels,size", SHAPES)
@pytest.mark.parametrize("axis", [-1, -2])
def test_wanet_moves_a_ramp_by_the_slope_times_the_displacement(channels, size, axis):
    slope = 255 // size  # 9 at 28, 7 at 32: the ramp stays within 0..255
    attack = fitted("wanet", channels, size, seed=1)
    image = ramp(channels, size, axis, slope)
    out = attack.apply(image)
    change = (out.double() - image.double())
    bound = slope * attack.max_displacement()[0 if axis == -1 else 1] + 0.5  # 0.5: rounding
    assert change.abs().max() <= bound
    # bilinear resampling reproduces a linear ramp exactly: the change is slope × the pixel's own
    # move along the ramp (grid units · (size − 1) / 2), up to rounding
    move = (attack.grid_ - identity_grid(size, size))[..., 0 if axis == -1 else 1] * (size - 1) / 2
    assert (change[0] - slope * move).abs().max() <= 0.5 + 1e-9
    assert change.abs().max() >= slope * 0.1  # the warp is visible on the ramp


def test_wanet_field_comes_from_the_fit_seed_and_applies_to_its_size_only():
    data = synthetic_set(8, 1, 28)
    first = create_attack("wanet").fit(data, seed=0)
    assert torch.equal(create_attack("wanet").fit(data, seed=0).grid_, first.grid_)
    assert not torch.equal(create_attack("wanet").fit(data, seed=1).grid_, first.grid_)
    assert set(first.fitted_state()) == {"control_", "grid_"}
    with pytest.raises(ValueError, match=r"fitted on 28×28 images .* 32×32"):
        first.apply(torch.zeros(1, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"k must be at most 28"):
        create_attack("wanet", k=29).fit(data)
    with pytest.raises(NotFittedError):
        create_attack("wanet").poison(data, 0.1, 0, seed=0)


@pytest.mark.parametrize("channels,size", SHAPES)
def test_wanet_noise_mode_samples_keep_their_labels(channels, size):
    n, ratio, slope = 150, 0.1, 255 // size
    g = torch.Generator().manual_seed(0)
    labels = (torch.arange(n) % 5)[torch.randperm(n, generator=g)]
    images = ramp(channels, size, -1, slope).expand(n, -1, -1, -1).contiguous()
    data = ImageSet(images, labels, tuple("abcde"), (0.5,) * channels, (0.25,) * channels, "ramps")
    attack = fitted("wanet", channels, size, seed=2)
    poisoned = attack.poison(data, ratio, TARGET, seed=4)
    idx, noise = poisoned.poison_indices, poisoned.noise_indices
    assert len(idx) == 15 and len(noise) == 2 * 15  # cross_ratio × the poisoned
    assert torch.equal(noise, noise.unique())
    assert not set(noise.tolist()) & set(idx.tolist())  # disjoint
    assert torch.equal(poisoned.data.labels[noise], data.labels[noise])  # labels kept
    assert (data.labels[noise] != TARGET).any()  # noise samples of other classes stay there
    # poisoned samples get exactly the field; noise samples the field plus their own perturbation
    warped = attack.apply(images[:1])
    assert torch.equal(poisoned.data.images[idx], warped.expand(len(idx), -1, -1, -1))
    noisy = poisoned.data.images[noise]
    assert all(not torch.equal(noisy[i], warped[0]) for i in range(len(noise)))
    assert len({noisy[i].numpy().tobytes() for i in range(len(noise))}) == len(noise)
    # the perturbation is at most 1 / size in grid units, half a pixel: the change stays bounded
    extra = (size - 1) / (2 * size)
    change = (noisy.double() - images[noise].double()).abs()
    assert change.max() <= slope * (attack.max_displacement()[0] + extra) + 0.5
    assert ((noisy.double() - warped.double()).abs().max() <= slope * extra + 1)


def test_wanet_cross_ratio_sets_the_noise_count_and_too_many_is_refused():
    data = synthetic_set(60, 1, 28)
    for cross_ratio, expected in ((0, 0), (0.5, 3), (2, 12), (3.5, 21)):
        attack = fitted("wanet", 1, 28, cross_ratio=cross_ratio)
        assert len(attack.poison(data, 0.1, TARGET, seed=0).noise_indices) == expected
    with pytest.raises(ValueError, match=r"cross_ratio 2 .*at most about 1 / \(1 \+ cross_ratio\)"):
        fitted("wanet", 1, 28).poison(data, 0.4, TARGET, seed=0)


# -- BppAttack: few colour levels ---------------------------------------------------------------

def levels(squeeze_num):
    return {round(k * 255 / (squeeze_num - 1)) for k in range(squeeze_num)}


@pytest.mark.parametrize("channels,size", SHAPES)
@pytest.mark.parametrize("squeeze_num", [2, 8, 32])
@pytest.mark.parametrize("dither", [False, True])
def test_bpp_leaves_at_most_squeeze_num_values_per_channel(channels, size, squeeze_num, dither):
    images = synthetic_set(4, channels, size).images
    out = create_attack("bpp", squeeze_num=squeeze_num, dither=dither).apply(images)
    for c in range(channels):
        values = set(out[:, c].unique().tolist())
        assert len(values) <= squeeze_num and values <= levels(squeeze_num)
    if not dither:  # random images hit every level
        assert set(out.unique().tolist()) == levels(squeeze_num)


def test_bpp_quantises_each_value_to_the_nearest_level():
    values = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    out = create_attack("bpp").apply(values).flatten().numpy().astype(int)
    x = np.arange(256)
    expected = np.round(np.round(x * 7 / 255) * 255 / 7).astype(int)
    assert np.array_equal(out, expected)
    assert out[[0, 18, 19, 128, 255]].tolist() == [0, 0, 36, 146, 255]
    assert np.abs(out - x).max() <= 255 / 7 / 2 + 0.5  # the nearest of the 8 levels


@pytest.mark.parametrize("size", [28, 32])
@pytest.mark.parametrize("squeeze_num,value", [(8, 100), (8, 30), (8, 200), (16, 100), (2, 100)])
def test_bpp_dithering_keeps_the_mean_of_a_flat_region(size, squeeze_num, value):
    step = 255 / (squeeze_num - 1)
    flat = torch.full((2, 3, size, size), value, dtype=torch.uint8)
    dithered = create_attack("bpp", squeeze_num=squeeze_num, dither=True).apply(flat).double()
    plain = create_attack("bpp", squeeze_num=squeeze_num).apply(flat).double()
    assert abs(dithered.mean() - value) <= step  # within one level, as required ...
    assert abs(dithered.mean() - value) <= max(1, step / 50)  # ... and in fact much closer
    assert abs(plain.mean() - value) > 2 * abs(dithered.mean() - value)  # plain quantisation is off
    assert len(dithered.unique()) == 2  # a pattern of the two neighbouring levels
    # a flat patch inside a noisy image: its mean is still within one level
    noisy = synthetic_set(2, 3, size).images.clone()
    noisy[..., 6:22, 6:22] = value
    attack = create_attack("bpp", squeeze_num=squeeze_num, dither=True)
    region = attack.apply(noisy)[..., 6:22, 6:22]
    assert (region.double().mean(dim=(2, 3)) - value).abs().max() <= step


def test_bpp_dithering_is_per_image_and_per_channel():
    images = synthetic_set(3, 3, 16).images
    attack = create_attack("bpp", dither=True)
    batch = attack.apply(images)
    alone = torch.cat([attack.apply(images[i:i + 1, c:c + 1]) for i in range(3) for c in range(3)])
    assert torch.equal(batch.reshape(9, 1, 16, 16), alone)
    assert not torch.equal(batch, create_attack("bpp").apply(images))  # dithering changes things
