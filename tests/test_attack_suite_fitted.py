"""LF and TrojanNN, the attacks fitted on a clean helper model, checked with numbers: LF's
perturbation is bounded in L-inf (after rounding), has no energy above its cut-off frequency and
aims at the target; TrojanNN changes the pixels of its mask only and its optimised patch excites
the chosen neurons more than the patch it started from. Both are deterministic under the seed
(also with the in-process caches emptied) and their fitted state round-trips through a file. They
also pass the conformance test of test_attack_suite.py, which picks them up from the registry.

Kept fast: the helper (width 8) trains for 4 epochs on 400 synthetic images (tests/conftest.py's
stripe textures; 12 optimiser steps, about a second), the optimisations run 30 (LF) and 200
(TrojanNN, on one image) steps."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import (check_fit_is_deterministic_and_round_trips,
                      check_registered_fitted_dirty_label, synthetic_train_subset)
from eigenguard.attacks import create_attack
from eigenguard.attacks.helpers import (HelperSpec, build_helper, clear_helper_cache,
                                        helper_subset, penultimate, train_clean_helper)
from eigenguard.attacks.lf import add_pattern, frequency_radius, high_frequency_energy, low_pass
from eigenguard.attacks.trojannn import (connected_neurons, corner_mask, initial_logits,
                                         neuron_activation, patch_values, stamp)

HELPER = dict(helper_epochs=4, helper_train_size=400, helper_width=8)
LF_FAST = dict(steps=30, batch_size=16, **HELPER)
TROJAN_FAST = dict(steps=200, **HELPER)
#: for the determinism and round-trip checks, which train helpers of other seeds: cheaper still
TINY = dict(helper_epochs=1, helper_train_size=200, helper_width=8)
LF_TINY = dict(steps=10, batch_size=16, **TINY)
TROJAN_TINY = dict(steps=20, **TINY)
TARGET = 0


def helper_of(data, seed):
    """The helper the attacks above are fitted with (from the in-process cache)."""
    return train_clean_helper(data, seed=seed, width=HELPER["helper_width"],
                              epochs=HELPER["helper_epochs"],
                              train_size=HELPER["helper_train_size"])


def normalised(images, data):
    return (images.float() / 255 - data.mean[0]) / data.std[0]


@pytest.fixture(scope="module")
def train_set(synthetic_root):
    return synthetic_train_subset(synthetic_root, 400)


def test_both_are_registered_fitted_and_dirty_label():
    check_registered_fitted_dirty_label("lf", "trojannn")


def test_defaults_record_the_helper_and_the_steps():
    assert create_attack("lf").settings() == {
        "eps": 51.0, "cutoff": 3.0, "steps": 300, "step_size": 4.0, "batch_size": 32,
        "target": None, "helper_model": "small_cnn", "helper_width": 16, "helper_epochs": 4,
        "helper_train_size": 30000}
    assert create_attack("trojannn").settings() == {
        "size": 5, "neurons": 2, "target_value": 100.0, "steps": 1000, "lr": 0.1,
        "helper_model": "small_cnn", "helper_width": 16, "helper_epochs": 4,
        "helper_train_size": 30000}


NAN = float("nan")
BAD_SETTINGS = [
    ("lf", "eps", 0), ("lf", "eps", 256), ("lf", "eps", NAN), ("lf", "eps", "8"),
    ("lf", "cutoff", -1), ("lf", "cutoff", NAN), ("lf", "steps", 0), ("lf", "steps", 2.5),
    ("lf", "step_size", 0), ("lf", "batch_size", 0), ("lf", "target", -1),
    ("lf", "target", 1.5), ("lf", "target", True),
    ("lf", "helper_model", "no-such-net"), ("lf", "helper_width", 0),
    ("lf", "helper_epochs", 0), ("lf", "helper_train_size", 0),
    ("trojannn", "size", 0), ("trojannn", "size", 2.0), ("trojannn", "neurons", 0),
    ("trojannn", "target_value", 0), ("trojannn", "target_value", NAN),
    ("trojannn", "steps", 0), ("trojannn", "lr", -0.1), ("trojannn", "helper_epochs", True),
    ("trojannn", "helper_model", 3),
]


@pytest.mark.parametrize("name,setting,value", BAD_SETTINGS)
def test_bad_settings_are_refused_naming_the_setting(name, setting, value):
    with pytest.raises(ValueError, match=rf"\b{setting} must be .*got"):
        create_attack(name, **{setting: value})


# -- the shared helper -------------------------------------------------------------------------

def test_helper_is_seeded_cached_and_clamped_to_the_data(train_set):
    clear_helper_cache()
    rng = torch.get_rng_state()
    first = train_clean_helper(train_set, seed=3, width=8, epochs=1, train_size=10_000)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's global RNG is untouched
    assert not first.training and not any(p.requires_grad for p in first.parameters())
    # more images asked for than there are: all of them, in order
    assert torch.equal(helper_subset(train_set, 10_000, 3), torch.arange(len(train_set)))
    subset = helper_subset(train_set, 50, 3)
    assert len(subset) == 50 and torch.equal(subset, subset.sort().values)
    cached = train_clean_helper(train_set, seed=3, width=8, epochs=1, train_size=10_000)
    fresh = train_clean_helper(train_set, seed=3, width=8, epochs=1, train_size=10_000,
                               cache=False)
    other = train_clean_helper(train_set, seed=4, width=8, epochs=1, train_size=10_000)
    for name, tensor in first.state_dict().items():
        assert torch.equal(cached.state_dict()[name], tensor)
        assert torch.equal(fresh.state_dict()[name], tensor)  # retrained: the same weights
    assert not torch.equal(other.classifier.weight, first.classifier.weight)
    cached.classifier.weight.data.zero_()  # a caller's change does not reach the cache
    again = train_clean_helper(train_set, seed=3, width=8, epochs=1, train_size=10_000)
    assert torch.equal(again.classifier.weight, first.classifier.weight)
    # it was trained: its weights moved from the seeded initialisation
    start = build_helper(HelperSpec("small_cnn", 8, 1, 10_000), train_set, 3)
    assert not torch.equal(start.classifier.weight, first.classifier.weight)
    assert torch.equal(start.classifier.weight,
                       build_helper(HelperSpec("small_cnn", 8, 1, 10_000), train_set,
                                    3).classifier.weight)


# -- LF ----------------------------------------------------------------------------------------

def test_low_pass_is_an_exact_projection():
    x = torch.randn(2, 3, 28, 32, dtype=torch.float64)
    once = low_pass(x, 3.0)
    assert torch.allclose(low_pass(once, 3.0), once, atol=1e-12)  # idempotent
    assert high_frequency_energy(once, 3.0) < 1e-20
    assert high_frequency_energy(x, 3.0) > 0.9  # white noise: most energy is high
    # what is kept: the radius ≤ 3 coefficients, 29 of them (0, ±1, ±2, ±3 on the axes, ...)
    assert int((frequency_radius(28, 32) <= 3).sum()) == 29
    # a constant and a 2-cycle cosine pass unchanged; an 8-cycle cosine is removed
    j = torch.arange(32, dtype=torch.float64)
    slow = (5 + torch.cos(2 * torch.pi * 2 * j / 32)).expand(28, 32)
    fast = torch.cos(2 * torch.pi * 8 * j / 32).expand(28, 32)
    assert torch.allclose(low_pass(slow, 3.0), slow, atol=1e-12)
    assert low_pass(fast, 3.0).abs().max() < 1e-12


def test_lf_perturbation_is_bounded_low_pass_and_aims_at_the_target(train_set):
    attack = create_attack("lf", eps=20, cutoff=3, **LF_FAST).fit(train_set, seed=0)
    pattern = attack.pattern_
    assert pattern.shape == (1, 28, 28) and pattern.dtype == torch.float64
    assert pattern.abs().max() <= 20 + 1e-9
    assert pattern.abs().max() > 19  # the bound is reached (the projection scales, not clips)
    assert high_frequency_energy(pattern, 3.0) < 1e-12
    assert int(attack.target_[0]) == 0  # no target setting: class 0 until poison names one
    # the L-inf bound after rounding, on the training images (some clip at 0 or 255)
    images = train_set.images
    out = attack.apply(images)
    change = out.double() - images.double()
    assert change.abs().max() <= 20 + 0.5
    # on a mid-grey image nothing clips: the residual is the rounded pattern, still low-pass
    grey = torch.full((1, 1, 28, 28), 128, dtype=torch.uint8)
    residual = attack.apply(grey).double() - 128
    assert (residual - pattern).abs().max() <= 0.5
    assert high_frequency_energy(residual, 3.0) < 0.01
    # the perturbation does what it was optimised for: the helper's mean log-probability of the
    # target on non-target images rises, more than with any of 10 random low-pass patterns of
    # the same L-inf norm
    helper = helper_of(train_set, 0)
    others = images[train_set.labels != TARGET]
    draw = torch.Generator().manual_seed(0)

    def target_log_prob(pattern):
        with torch.no_grad():
            logits = helper(normalised(add_pattern(others, pattern), train_set))
        return torch.log_softmax(logits, 1)[:, TARGET].mean().item()

    randoms = []
    for _ in range(10):
        noise = low_pass(torch.randn(1, 28, 28, generator=draw, dtype=torch.float64), 3.0)
        randoms.append(target_log_prob(noise * 20 / noise.abs().max()))
    clean, aimed = target_log_prob(torch.zeros(1, 28, 28)), target_log_prob(pattern)
    print(f"LF: mean log p(target) on non-target images {clean:.4f} clean, {aimed:.4f} "
          f"triggered, at most {max(randoms):.4f} with random low-pass patterns")
    assert aimed > clean and aimed > max(randoms)
    assert 0 <= float(attack.fooling_rate_) <= 1


def test_lf_is_retargeted_by_poison_and_a_fixed_target_is_kept(train_set):
    attack = create_attack("lf", **LF_FAST).fit(train_set, seed=0)
    aimed_at_0 = attack.pattern_.clone()
    poisoned = attack.poison(train_set, 0.1, 3, seed=0)
    assert int(attack.target_[0]) == 3 and not torch.equal(attack.pattern_, aimed_at_0)
    idx = poisoned.poison_indices
    assert torch.equal(poisoned.data.images[idx], attack.apply(train_set.images[idx]))
    assert (poisoned.data.labels[idx] == 3).all()  # dirty label
    aimed_at_3 = create_attack("lf", target=3, **LF_FAST).fit(train_set, seed=0)
    assert torch.equal(aimed_at_3.pattern_, attack.pattern_)  # the same computation
    fixed = create_attack("lf", target=5, **LF_FAST).fit(train_set, seed=0)
    fixed.poison(train_set, 0.1, 3, seed=0)
    assert int(fixed.target_[0]) == 5  # a fixed target ignores the run's target
    # a restored attack has no helper: it poisons for its own target only
    restored = create_attack("lf", **LF_FAST).load_fitted_state(attack.fitted_state())
    restored.poison(train_set, 0.1, 3, seed=0)
    with pytest.raises(ValueError, match=r"aims at class 3 .*restored"):
        restored.poison(train_set, 0.1, 4, seed=0)
    with pytest.raises(ValueError, match=r"target 10 is out of range"):
        create_attack("lf", target=10, **LF_FAST).fit(train_set, seed=0)


def test_lf_is_deterministic_under_the_seed_and_its_state_round_trips(train_set, tmp_path):
    first = create_attack("lf", **LF_TINY).fit(train_set, seed=1)
    clear_helper_cache()  # everything computed again: helper and perturbation
    second = create_attack("lf", **LF_TINY).fit(train_set, seed=1)
    assert torch.equal(first.pattern_, second.pattern_)
    other = create_attack("lf", **LF_TINY).fit(train_set, seed=2)
    assert not torch.equal(first.pattern_, other.pattern_)
    path = tmp_path / "lf.safetensors"
    save_file(first.fitted_state(), str(path))
    restored = create_attack("lf", **LF_TINY).load_fitted_state(load_file(str(path)))
    assert set(restored.fitted_state()) == {"pattern_", "target_", "fooling_rate_"}
    assert torch.equal(restored.apply(train_set.images), first.apply(train_set.images))
    with pytest.raises(ValueError, match=r"fitted on images of shape \(1, 28, 28\)"):
        first.apply(torch.zeros(1, 1, 32, 32, dtype=torch.uint8))


# -- TrojanNN ----------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [3, 5])
def test_trojannn_changes_only_the_masked_pixels(train_set, size):
    attack = create_attack("trojannn", size=size, **TROJAN_FAST).fit(train_set, seed=0)
    mask = attack.mask_
    assert torch.equal(mask, corner_mask(28, 28, size))
    assert int(mask.sum()) == size * size and bool(mask[-size:, -size:].all())
    assert not attack.patch_[:, ~mask].any()  # the stored patch is zero outside the mask
    images = train_set.images
    out = attack.apply(images)
    assert torch.equal(out[..., ~mask], images[..., ~mask])  # outside: never changed
    # inside: exactly the patch, whatever the image
    assert torch.equal(out[..., mask], attack.patch_[:, mask].expand(len(images), -1, -1))
    white = torch.full((2, 1, 28, 28), 255, dtype=torch.uint8)
    assert torch.equal(attack.apply(white)[..., ~mask], white[..., ~mask])
    assert torch.equal(attack.apply(white)[..., mask], attack.patch_[:, mask].expand(2, -1, -1))


def test_trojannn_patch_excites_the_most_connected_neurons(train_set):
    settings = dict(size=5, neurons=2, **TROJAN_FAST)
    attack = create_attack("trojannn", **settings).fit(train_set, seed=0)
    helper = helper_of(train_set, 0)
    # the neurons: the penultimate units with the largest summed |classifier weight|
    connectivity = helper.classifier.weight.abs().sum(0)
    assert torch.equal(attack.neurons_, connected_neurons(helper, 2))
    assert set(attack.neurons_.tolist()) == set(connectivity.topk(2).indices.tolist())
    assert len(connectivity) == 4 * 8  # small_cnn's penultimate layer: 4 · width units
    # their activation with the optimised patch and with the patch it started from, measured
    # here on the helper (a black image with the patch stamped in, as the optimisation sees it)
    black = torch.zeros(1, 1, 28, 28)
    start = patch_values(initial_logits(1, 5, 0)).round()
    with torch.no_grad():
        before = neuron_activation(helper, stamp(black, start, 5), attack.neurons_, train_set)
        after = neuron_activation(helper, attack.apply(black.to(torch.uint8)).float(),
                                  attack.neurons_, train_set)
        features, _ = penultimate(helper, normalised(black, train_set))
    assert before.shape == after.shape == (1, 2)
    print(f"TrojanNN neurons {attack.neurons_.tolist()}: activation {before.mean():.4f} with the "
          f"initial patch -> {after.mean():.4f} optimised (no patch: "
          f"{features[0, attack.neurons_].abs().mean():.4f})")
    assert after.mean() > before.mean() * 1.02
    assert float(attack.activation_[0]) == pytest.approx(float(before.mean()), rel=1e-5)
    assert float(attack.activation_[1]) == pytest.approx(float(after.mean()), rel=1e-5)


def test_trojannn_is_deterministic_under_the_seed_and_its_state_round_trips(train_set,
                                                                           tmp_path):
    restored = check_fit_is_deterministic_and_round_trips(
        "trojannn", TROJAN_TINY, train_set, tmp_path, learned="patch_",
        state={"mask_", "patch_", "neurons_", "activation_"})
    poisoned = restored.poison(train_set, 0.1, 7, seed=0)
    assert (poisoned.data.labels[poisoned.poison_indices] == 7).all()
    with pytest.raises(ValueError, match=r"size 29 does not fit 28×28"):
        create_attack("trojannn", size=29, **TROJAN_TINY).fit(train_set, seed=0)
    with pytest.raises(ValueError, match=r"neurons = 33, but .* only 32 units"):
        create_attack("trojannn", neurons=33, **TROJAN_TINY).fit(train_set, seed=0)
