"""The adaptive attacks against EigenGuard, checked with numbers: the guarded helper carries the
layer and is cached and seeded; adaptive-pgd's poisoned images change by at most eps (+ rounding)
outside the BadNets patch while test images get the patch only, and its noise lowers the helper's
accuracy; adaptive-whitebox's optimised pattern is bounded and sends more images to the target
through the running filter than random patterns of the same bound. Both are deterministic under
the seed (also with the caches emptied), their fitted state round-trips through a file, and bad
settings are refused naming the setting. The conformance test of test_attack_suite.py picks them
up from the registry once the module is imported.

Kept fast: a helper of width 8 trained 8 epochs on 400 synthetic images (tests/conftest.py's
stripe textures; 32 optimiser steps, about 80% training accuracy), 60 optimisation steps; the
determinism checks, which empty the caches and train again, use a helper of width 4 trained one
epoch on 200 images."""

import pytest
import torch
from safetensors.torch import load_file, save_file

import eigenguard.attacks.adaptive as adaptive
from conftest import (check_fit_is_deterministic_and_round_trips,
                      check_registered_fitted_dirty_label, synthetic_train_subset)
from eigenguard.attacks import create_attack
from eigenguard.attacks.badnets import BadNets
from eigenguard.attacks.helpers import clear_helper_cache
from eigenguard.data import ImageSet
from eigenguard.layer import find_guards, guards_in_mode
from eigenguard.seeding import generator

HELPER = dict(helper_width=8, helper_epochs=8, helper_train_size=400)
PGD = dict(eps=16, **HELPER)
#: eps 48: on this weak helper a pattern at 24 moves few images through the filter (12% against
#: 8% for random patterns), at 48 clearly more (22% against 12%)
WHITEBOX = dict(eps=48, steps=60, step_size=4, batch_size=32, **HELPER)
#: for the determinism checks, which train helpers again: cheaper still
TINY = dict(helper_width=4, helper_epochs=1, helper_train_size=200)
PGD_TINY = dict(eps=16, steps=3, **TINY)
WHITEBOX_TINY = dict(eps=24, steps=10, batch_size=16, **TINY)
TARGET = 0


@pytest.fixture(scope="module")
def train_set(synthetic_root):
    return synthetic_train_subset(synthetic_root, 400)


@pytest.fixture(scope="module")
def pgd(train_set):
    return create_attack("adaptive-pgd", **PGD).fit(train_set, seed=0)


@pytest.fixture(scope="module")
def whitebox(train_set):
    return create_attack("adaptive-whitebox", **WHITEBOX).fit(train_set, seed=0)


def test_both_are_registered_fitted_and_dirty_label():
    check_registered_fitted_dirty_label("adaptive-pgd", "adaptive-whitebox")


def test_defaults_record_the_helper_the_layer_and_the_budgets():
    common = {"helper_model": "small_cnn", "helper_width": 16, "helper_epochs": 4,
              "helper_train_size": 30000, "guard_after": "block1", "guard_k": 16,
              "guard_tail_scale": 1e-3, "guard_scale": "kth"}
    assert create_attack("adaptive-pgd").settings() == {
        **common, "eps": 25.5, "steps": 10, "step_size": None, "patch": None, "value": 255}
    assert create_attack("adaptive-pgd").pgd_step == 25.5 / 4
    assert create_attack("adaptive-pgd", step_size=2).pgd_step == 2.0
    assert create_attack("adaptive-whitebox").settings() == {
        **common, "eps": 24.0, "steps": 300, "step_size": 2.0, "batch_size": 32,
        "target": None}


NAN = float("nan")
BAD_SETTINGS = [
    ("adaptive-pgd", "eps", 0), ("adaptive-pgd", "eps", 256), ("adaptive-pgd", "eps", NAN),
    ("adaptive-pgd", "eps", "8"), ("adaptive-pgd", "steps", 0), ("adaptive-pgd", "steps", 2.5),
    ("adaptive-pgd", "step_size", 0), ("adaptive-pgd", "step_size", True),
    ("adaptive-pgd", "patch", 0), ("adaptive-pgd", "value", 256),
    ("adaptive-pgd", "helper_model", "no-such-net"), ("adaptive-pgd", "helper_width", 0),
    ("adaptive-pgd", "guard_k", 0), ("adaptive-pgd", "guard_k", 1.5),
    ("adaptive-pgd", "guard_tail_scale", -1), ("adaptive-pgd", "guard_scale", "max"),
    ("adaptive-pgd", "guard_after", ""),
    ("adaptive-whitebox", "eps", -1), ("adaptive-whitebox", "steps", True),
    ("adaptive-whitebox", "step_size", NAN), ("adaptive-whitebox", "batch_size", 0),
    ("adaptive-whitebox", "target", -1), ("adaptive-whitebox", "target", 1.5),
    ("adaptive-whitebox", "helper_epochs", 0), ("adaptive-whitebox", "helper_train_size", 0),
    ("adaptive-whitebox", "guard_k", True), ("adaptive-whitebox", "guard_after", 3),
]


@pytest.mark.parametrize("name,setting,value", BAD_SETTINGS)
def test_bad_settings_are_refused_naming_the_setting(name, setting, value):
    with pytest.raises(ValueError, match=rf"\b{setting} must be .*got"):
        create_attack(name, **{setting: value})


def test_errors_found_at_fit_name_the_problem(train_set):
    with pytest.raises(ValueError, match=r"guard_after 'block9' does not name a module"):
        create_attack("adaptive-pgd", guard_after="block9", **HELPER).fit(train_set)
    with pytest.raises(ValueError, match=r"patch 29 does not fit 28×28"):
        create_attack("adaptive-pgd", patch=29, **HELPER).fit(train_set)
    with pytest.raises(ValueError, match=r"target 10 is out of range"):
        create_attack("adaptive-whitebox", target=10, **HELPER).fit(train_set)
    with pytest.raises(ValueError, match=r"empty"):
        create_attack("adaptive-whitebox", **HELPER).fit(train_set.subset(torch.arange(0)))


# -- the guarded helper ------------------------------------------------------------------------

def test_the_helper_carries_the_layer_is_cached_and_shared(train_set, pgd, whitebox):
    helper = pgd.helper(train_set, seed=0)
    (name, layer), = find_guards(helper)
    assert name == "block1_eigenguard" and layer.k == 16 and layer.tail_scale == 1e-3
    assert layer.eval_mode == "running" and layer.has_running_stats
    assert not helper.training and not any(p.requires_grad for p in helper.parameters())
    # one helper per seed and settings: both attacks, and the PGD attack's own copy, agree
    for other in (whitebox.helper(train_set, seed=0), pgd._helper):
        for key, tensor in helper.state_dict().items():
            assert torch.equal(other.state_dict()[key], tensor)
    accuracy = (adaptive.predict(helper, train_set.images, train_set) == train_set.labels)
    print(f"guarded helper: training accuracy {accuracy.double().mean():.3f} (running mode)")
    assert accuracy.double().mean() > 0.3  # it learned something (chance is 0.1)
    with guards_in_mode(helper, "batch"):
        assert layer.eval_mode == "batch"
    assert layer.eval_mode == "running"


# -- adaptive-pgd --------------------------------------------------------------------------------

def test_pgd_noise_is_within_eps_outside_the_patch_and_test_images_get_the_patch(train_set, pgd):
    poisoned = pgd.poison(train_set, 0.25, TARGET, seed=3)
    idx, images = poisoned.poison_indices, poisoned.data.images
    assert (poisoned.data.labels[idx] == TARGET).all()  # dirty label
    untouched = ~poisoned.is_poisoned
    assert torch.equal(images[untouched], train_set.images[untouched])
    change = images[idx].double() - train_set.images[idx].double()
    patch = torch.zeros(28, 28, dtype=torch.bool)
    patch[-3:, -3:] = True  # BadNets' default at 28×28
    outside = change[..., ~patch]
    assert outside.abs().max() <= 16 + 0.5
    rms = float(outside.pow(2).mean().sqrt())
    assert rms > 4  # the noise is there (most values move by several levels)
    assert (images[idx][..., patch] == 255).all()
    # test images: exactly BadNets, no noise
    assert torch.equal(pgd.apply(train_set.images), BadNets().apply(train_set.images))
    # the noise does what it is for: the helper's accuracy on those images falls
    before, after = pgd.pgd_accuracy_.tolist()
    print(f"adaptive-pgd: helper accuracy on the poisoned images {before:.3f} -> {after:.3f}; "
          f"RMS change outside the patch {rms:.1f}")
    assert after < before - 0.1
    # the noise is the helper's PGD against the true labels, then the patch on top
    noisy = pgd.noisy(train_set.images[idx], train_set.labels[idx], train_set, seed=3)
    assert torch.equal(images[idx], BadNets().apply(noisy))


def test_pgd_noise_depends_on_the_seed_and_a_restored_attack_poisons_identically(
        train_set, pgd, tmp_path):
    first = pgd.poison(train_set, 0.1, 4, seed=1)
    assert not torch.equal(pgd.poison(train_set, 0.1, 4, seed=2).data.images, first.data.images)
    path = tmp_path / "adaptive-pgd.safetensors"
    save_file(pgd.fitted_state(), str(path))
    restored = create_attack("adaptive-pgd", **PGD).load_fitted_state(load_file(str(path)))
    again = restored.poison(train_set, 0.1, 4, seed=1)
    assert torch.equal(again.data.images, first.data.images)
    assert torch.equal(restored.apply(train_set.images), pgd.apply(train_set.images))
    with pytest.raises(ValueError, match=r"helper settings"):
        create_attack("adaptive-pgd", eps=16, helper_width=4, helper_epochs=2,
                      helper_train_size=400).load_fitted_state(load_file(str(path)))
    with pytest.raises(ValueError, match=r"fitted on images of shape \(1, 28, 28\)"):
        pgd.apply(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


# -- adaptive-whitebox ---------------------------------------------------------------------------

def target_scores(helper, images, pattern, data, mode="running"):
    """(the fraction classified as the target, the mean log-probability of the target)."""
    triggered = adaptive.add_pattern(images, pattern)
    predicted = adaptive.predict(helper, triggered, data, mode=mode, batch=adaptive.EVAL_BATCH)
    rate = (predicted == TARGET).double().mean()
    with torch.no_grad():
        logits = helper(adaptive.helper_input(triggered, data))
    return float(rate), float(torch.log_softmax(logits, 1)[:, TARGET].mean())


def test_whitebox_trigger_is_bounded_and_beats_random_patterns_through_the_filter(train_set,
                                                                                  whitebox):
    eps, pattern = 48, whitebox.pattern_
    assert pattern.shape == (1, 28, 28) and pattern.abs().max() <= eps
    assert pattern.abs().max() == eps  # the bound is reached
    change = whitebox.apply(train_set.images).double() - train_set.images.double()
    assert change.abs().max() <= eps + 0.5
    helper = whitebox.helper(train_set, seed=0)
    others = train_set.images[train_set.labels != TARGET]
    aimed, aimed_log = target_scores(helper, others, pattern, train_set)
    draw = generator(0, "test-random-patterns")
    randoms = [target_scores(helper, others, eps * (torch.randint(
        0, 2, (1, 28, 28), generator=draw) * 2 - 1.0), train_set) for _ in range(5)]
    clean, clean_log = target_scores(helper, others, torch.zeros(1, 28, 28), train_set)
    batch, _ = target_scores(helper, others, pattern, train_set, mode="batch")
    best, best_log = max(rate for rate, _ in randoms), max(log for _, log in randoms)
    print(f"adaptive-whitebox: target rate on non-target images {clean:.3f} clean, "
          f"{aimed:.3f} triggered (running), {batch:.3f} (per batch), at most {best:.3f} with "
          f"random ±{eps} patterns; mean log p(target) {clean_log:.3f}, {aimed_log:.3f}, "
          f"at most {best_log:.3f}")
    assert aimed > best + 0.05 and aimed > clean + 0.1  # measured 0.225, 0.121, 0.068
    assert aimed_log > best_log + 0.05  # measured -2.245 against -2.375
    rates = whitebox.fooling_rate_.tolist()
    assert rates[:2] == pytest.approx([clean, aimed])  # every non-target image is sampled
    assert rates[2] == pytest.approx(batch)  # both in batches of 128 (the last one shorter)


def test_whitebox_is_retargeted_by_poison_and_restored_for_its_target_only(train_set, whitebox):
    attack = create_attack("adaptive-whitebox", **WHITEBOX).fit(train_set, seed=0)
    assert int(attack.target_[0]) == 0 and torch.equal(attack.pattern_, whitebox.pattern_)
    poisoned = attack.poison(train_set, 0.1, 3, seed=0)
    assert int(attack.target_[0]) == 3 and not torch.equal(attack.pattern_, whitebox.pattern_)
    idx = poisoned.poison_indices
    assert torch.equal(poisoned.data.images[idx], attack.apply(train_set.images[idx]))
    assert (poisoned.data.labels[idx] == 3).all()
    fixed = create_attack("adaptive-whitebox", target=5, **WHITEBOX).fit(train_set, seed=0)
    fixed.poison(train_set, 0.1, 3, seed=0)
    assert int(fixed.target_[0]) == 5
    restored = create_attack("adaptive-whitebox", **WHITEBOX).load_fitted_state(
        attack.fitted_state())
    restored.poison(train_set, 0.1, 3, seed=0)
    with pytest.raises(ValueError, match=r"aims at class 3 .*restored"):
        restored.poison(train_set, 0.1, 4, seed=0)


@pytest.mark.parametrize("name", ["adaptive-pgd", "adaptive-whitebox"])
def test_colour_images(name):
    """3×32×32: the helper, the noise and the pattern at the colour shape."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), generator=g, dtype=torch.uint8)
    data = ImageSet(images, torch.arange(64) % 4, tuple("abcd"), (0.5,) * 3, (0.25,) * 3, "rgb")
    attack = create_attack(name, steps=5, helper_width=4, helper_epochs=1).fit(data, seed=0)
    poisoned = attack.poison(data, 0.25, 1, seed=0)
    idx = poisoned.poison_indices
    change = poisoned.data.images[idx].double() - images[idx].double()
    eps = attack.eps
    assert change[..., :-3, :].abs().max() <= eps + 0.5  # 3×3 patch at 32×32
    assert poisoned.data.images.shape == images.shape
    assert (poisoned.data.labels[idx] == 1).all()


# -- determinism without the caches (last: they empty the caches the tests above share) ---------

def test_pgd_is_deterministic_without_the_caches(train_set):
    tiny = create_attack("adaptive-pgd", **PGD_TINY).fit(train_set, seed=0)
    expected = tiny.poison(train_set, 0.1, 4, seed=1).data.images
    clear_helper_cache()  # trained again from scratch: the same helper, the same noise
    fresh = create_attack("adaptive-pgd", **PGD_TINY).fit(train_set, seed=0)
    assert torch.equal(fresh.poison(train_set, 0.1, 4, seed=1).data.images, expected)


def test_whitebox_is_deterministic_and_its_state_round_trips(train_set, tmp_path):
    restored = check_fit_is_deterministic_and_round_trips(
        "adaptive-whitebox", WHITEBOX_TINY, train_set, tmp_path, learned="pattern_",
        state={"pattern_", "target_", "fooling_rate_"}, seed=0)
    with pytest.raises(ValueError, match=r"fitted on images of shape \(1, 28, 28\)"):
        restored.apply(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
