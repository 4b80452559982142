"""Triggers change exactly the pixels they should; poisoning is exact and reproducible."""
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


def test_blended_is_the_alpha_mix_of_a_fixed_pattern():
    images = image_set(4, 3, 32).images
    attack = create_attack("blended")
    out = attack.apply(images)
    again = create_attack("blended").apply(images)
    assert torch.equal(out, again)
    pattern = attack.apply(torch.zeros_like(images[:1])).float() / 0.2  # 0.2·p rounded
    expected = (0.8 * images.float() + 0.2 * pattern).round()
    assert (out.float() - expected).abs().max() <= 1.0  # pattern recovered up to rounding
    assert not torch.equal(attack.apply(images), create_attack("blended", pattern_seed=1).apply(images))
    with pytest.raises(ValueError, match="alpha"):
        create_attack("blended", alpha=0)


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
