"""Triggers change exactly the pixels they should; poisoning is exact and reproducible."""
import numpy as np
import pytest
import torch

from eigenguard.attacks import create_attack, list_attacks
from eigenguard.data import ImageSet
from eigenguard.errors import UnknownNameError


def image_set(n=200, channels=1, size=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 200, (n, channels, size, size), generator=g, dtype=torch.uint8),
                    torch.randint(0, 10, (n,), generator=g), tuple(map(str, range(10))),
                    (0.5,) * channels, (0.25,) * channels, "toy")


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_badnets_sets_exactly_the_bottom_right_three_by_three(channels, size):
    images = image_set(5, channels, size).images
    out = create_attack("badnets").apply(images)
    changed = (out != images).any(dim=(0, 1))
    assert torch.equal(out[..., -3:, -3:], torch.full_like(out[..., -3:, -3:], 255))
    assert torch.equal(out[..., :-3, :], images[..., :-3, :])
    assert torch.equal(out[..., :, :-3], images[..., :, :-3])
    assert changed.sum() == 9  # every corner pixel differs since inputs are < 200
    assert out.dtype == torch.uint8


def test_badnets_patch_scales_with_image_size():
    attack = create_attack("badnets")
    assert [attack.patch_size(h) for h in (28, 32, 64)] == [3, 3, 6]
    assert create_attack("badnets", patch=5).patch_size(32) == 5


def test_badnets_patch_of_one_changes_one_pixel_per_channel():
    images = image_set(4, 3, 32).images
    out = create_attack("badnets", patch=1).apply(images)
    changed = out != images
    assert changed.sum(dim=(2, 3)).tolist() == [[1, 1, 1]] * 4
    assert changed[..., -1, -1].all() and (out[..., -1, -1] == 255).all()


def test_badnets_patch_as_large_as_the_image_whitens_it_all():
    images = image_set(2, 1, 5).images
    assert (create_attack("badnets", patch=5).apply(images) == 255).all()


@pytest.mark.parametrize("patch", [0, -1, 1.5, 3.0, True, "3"])
def test_badnets_patch_must_be_a_positive_integer(patch):
    with pytest.raises(ValueError, match=r"patch must be an integer >= 1.*got"):
        create_attack("badnets", patch=patch)


@pytest.mark.parametrize("value", [256, -1, 1.0])
def test_badnets_value_must_be_a_pixel_value(value):
    with pytest.raises(ValueError, match=r"value must be an integer in 0\.\.255"):
        create_attack("badnets", value=value)


@pytest.mark.parametrize("height,width", [(28, 4), (4, 28)])
def test_badnets_patch_larger_than_the_image_is_an_error(height, width):
    attack = create_attack("badnets", patch=5)
    images = torch.zeros(2, 1, height, width, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"patch 5 does not fit .*in 1\.\.4"):
        attack.apply(images)


def blended_pattern(shape, seed=0):
    """The pattern itself: alpha = 1 on black images leaves nothing but the pattern."""
    return create_attack("blended", alpha=1.0, pattern_seed=seed).apply(
        torch.zeros((1, *shape), dtype=torch.uint8))[0]


def test_blended_with_alpha_one_is_the_same_noise_pattern_on_every_image():
    images = image_set(6, 3, 32).images
    pattern = blended_pattern((3, 32, 32))
    out = create_attack("blended", alpha=1.0).apply(images)
    assert torch.equal(out, pattern.expand_as(out))  # whatever the image was
    values = pattern.double()
    assert 100 < values.mean() < 155 and values.std() > 60  # uniform 0..255: mean 127.5, std 74
    assert pattern.min() < 10 and pattern.max() > 245
    assert not torch.equal(pattern[0], pattern[1])  # noise in each channel, not grey


@pytest.mark.parametrize("alpha", [0.2, 0.3, 0.5, 0.1])
def test_blended_is_round_of_the_alpha_mix(alpha):
    # every pixel value x against 256 pattern values each, so values near .5 occur by the thousand
    shape = (1, 256, 256)
    pattern = blended_pattern(shape).numpy().astype(np.float64)
    ramp = torch.arange(256, dtype=torch.uint8)
    images = torch.stack([ramp.repeat(256).reshape(shape), ramp.flip(0).repeat(256).reshape(shape)])
    out = create_attack("blended", alpha=alpha).apply(images)
    expected = np.round((1 - alpha) * images.numpy().astype(np.float64) + alpha * pattern)
    assert out.dtype == torch.uint8
    assert np.array_equal(out.numpy(), expected.astype(np.uint8))


def test_blended_known_values():
    images = torch.tensor([0, 100, 255], dtype=torch.uint8).view(3, 1, 1, 1)
    out = create_attack("blended", alpha=0.2).apply(images).flatten().tolist()
    p = int(blended_pattern((1, 1, 1)))
    assert out == [round(0.2 * p), round(80 + 0.2 * p), round(204 + 0.2 * p)]


def test_blended_pattern_is_fixed_by_seed_and_shape():
    first = blended_pattern((3, 32, 32), seed=0)
    assert torch.equal(first, blended_pattern((3, 32, 32), seed=0))  # reproducible across calls
    assert (first != blended_pattern((3, 32, 32), seed=1)).double().mean() > 0.9
    small = blended_pattern((1, 28, 28))
    assert small.shape == (1, 28, 28)
    assert not torch.equal(small, blended_pattern((1, 32, 32))[:, :28, :28])  # drawn per shape
    images = image_set(4, 3, 32).images
    assert not torch.equal(create_attack("blended").apply(images),
                           create_attack("blended", pattern_seed=1).apply(images))


@pytest.mark.parametrize("alpha", [0, -0.1, 1.5, float("nan")])
def test_blended_alpha_out_of_range_is_refused(alpha):
    with pytest.raises(ValueError, match="alpha"):
        create_attack("blended", alpha=alpha)


def test_poison_edits_exactly_the_chosen_samples():
    train = image_set(200)
    poisoned = create_attack("badnets").poison(train, ratio=0.1, target=0, seed=3)
    idx = poisoned.poison_indices
    assert len(idx) == 20 and torch.equal(idx, idx.sort().values)
    assert torch.equal(poisoned.data.labels[idx], torch.zeros(20, dtype=torch.int64))
    assert torch.equal(poisoned.original_labels, train.labels)
    clean = ~poisoned.is_poisoned
    assert torch.equal(poisoned.data.images[clean], train.images[clean])
    assert torch.equal(poisoned.data.labels[clean], train.labels[clean])
    assert (poisoned.data.images[idx][..., -3:, -3:] == 255).all()
    assert torch.equal(train.images, image_set(200).images)  # the input is not modified


def test_poison_is_reproducible_under_a_seed():
    train = image_set(300)
    first = create_attack("badnets").poison(train, 0.05, 1, seed=7)
    second = create_attack("badnets").poison(train, 0.05, 1, seed=7)
    other = create_attack("badnets").poison(train, 0.05, 1, seed=8)
    assert torch.equal(first.poison_indices, second.poison_indices)
    assert torch.equal(first.data.images, second.data.images)
    assert not torch.equal(first.poison_indices, other.poison_indices)


def test_bad_poison_arguments_are_refused():
    train = image_set(50)
    with pytest.raises(ValueError, match="ratio"):
        create_attack("badnets").poison(train, 1.5, 0, 0)
    with pytest.raises(ValueError, match="target class 12"):
        create_attack("badnets").poison(train, 0.1, 12, 0)
    with pytest.raises(ValueError, match="uint8"):
        create_attack("badnets").apply(torch.rand(2, 1, 28, 28))


def test_unknown_attack_lists_the_known_ones():
    assert {"badnets", "blended"} <= set(list_attacks())
    with pytest.raises(UnknownNameError, match="badnets"):
        create_attack("badnet")
