"""LC, the label-consistent attack, checked with numbers: the exact four-corner pattern on test
images (nothing else changed), the poisoned training images' perturbation bounded by eps outside
the corners and raising the helper's loss, labels kept and only the target class poisoned,
determinism under the seed (also with the in-process caches emptied), the fitted state restoring
an attack that poisons as the run did, the helper's adversarial batches, and bad settings refused.
The conformance test of test_attack_suite.py covers it too once eigenguard.attacks imports it.

Kept fast: the helper (width 8) trains 1 epoch with PGD-2 on 200 synthetic images (tests/
conftest.py's stripe textures), and the poisoning PGD takes 5 steps."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import synthetic_train_subset
from eigenguard.attacks import NotFittedError, create_attack, list_attacks
from eigenguard.attacks.helpers import clear_helper_cache
from eigenguard.attacks.lc import LC, AdversarialBatches, corner_pattern
from eigenguard.data import ImageSet, normalize
from eigenguard.train import Batch

TINY = dict(helper_width=8, helper_epochs=1, helper_train_size=200, helper_steps=2, steps=5)
TARGET = 3
#: the expected 3×3 blocks (255 / 0): the left-hand corners, and their mirror on the right
LEFT = torch.tensor([[255, 0, 0], [0, 255, 0], [255, 0, 255]], dtype=torch.uint8)
RIGHT = torch.tensor([[0, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=torch.uint8)


@pytest.fixture(scope="module")
def train_set(synthetic_root):
    return synthetic_train_subset(synthetic_root, 200)


@pytest.fixture(scope="module")
def attack(train_set):
    return create_attack("lc", **TINY).fit(train_set, seed=0)


def random_set(n, channels, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 5
    return ImageSet(images, labels, tuple("abcde"), (0.5,) * channels, (0.25,) * channels, "rnd")


def corners(images):
    """The four 3×3 corner blocks of every image and channel: TL, TR, BL, BR."""
    return (images[..., :3, :3], images[..., :3, -3:], images[..., -3:, :3],
            images[..., -3:, -3:])


def outside_corners(images):
    mask, _ = corner_pattern(*images.shape[-2:])
    return images[..., ~mask]


def test_registered_clean_label_fitted_with_documented_defaults():
    assert "lc" in list_attacks()
    attack = create_attack("lc")
    assert isinstance(attack, LC) and attack.clean_label and attack.needs_fit
    with pytest.raises(NotFittedError):
        attack.apply(torch.zeros(1, 1, 28, 28, dtype=torch.uint8))
    assert attack.settings() == {
        "eps": 8.0, "step_size": 1.5, "steps": 20, "helper_model": "small_cnn",
        "helper_width": 16, "helper_epochs": 4, "helper_train_size": 20000, "helper_eps": 8.0,
        "helper_steps": 3}
    # the budget reduced from the paper's is visible, with the paper's figure beside ours
    assert attack.reduced_settings() == {"steps": (20, 100), "helper_steps": (3, 7),
                                         "helper_epochs": (4, 200)}
    assert create_attack("lc", steps=100, helper_steps=7,
                         helper_epochs=200).reduced_settings() == {}


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_test_images_get_exactly_the_corner_pattern(channels, size):
    data = random_set(6, channels, size)
    attack = create_attack("lc", **TINY).fit(data, seed=0)
    out = attack.apply(data.images)
    assert out.dtype == torch.uint8 and out.shape == data.images.shape
    for block, expected in zip(corners(out), (LEFT, RIGHT, LEFT, RIGHT)):
        assert torch.equal(block, expected.expand_as(block))  # every image and channel
    assert torch.equal(outside_corners(out), outside_corners(data.images))  # nothing else
    assert int(corner_pattern(size, size)[0].sum()) == 36
    with pytest.raises(ValueError, match=r"at least 6×6 pixels, got 5×5"):
        attack.apply(torch.zeros(1, channels, 5, 5, dtype=torch.uint8))


@pytest.mark.parametrize("eps", [8, 5.5])
def test_poisoned_images_are_target_class_bounded_and_keep_their_labels(train_set, eps):
    attack = create_attack("lc", **{**TINY, "eps": eps}).fit(train_set, seed=0)
    poisoned = attack.poison(train_set, 0.05, TARGET, seed=1)
    idx = poisoned.poison_indices
    assert len(idx) == 10 and (train_set.labels[idx] == TARGET).all()
    assert torch.equal(poisoned.data.labels, train_set.labels) and poisoned.flipped_labels == 0
    clean = ~poisoned.is_poisoned
    assert torch.equal(poisoned.data.images[clean], train_set.images[clean])
    images, before = poisoned.data.images[idx], train_set.images[idx]
    for block, expected in zip(corners(images), (LEFT, RIGHT, LEFT, RIGHT)):
        assert torch.equal(block, expected.expand_as(block))
    change = (outside_corners(images).double() - outside_corners(before).double()).abs()
    bound = eps if float(eps).is_integer() else eps + 0.5  # x ± eps are integers for eps = 8
    assert change.max() <= bound
    assert change.max() >= min(eps, 5 * attack.step_size) - 0.5  # the perturbation moves pixels
    # it pushes the images away from their class: the helper's loss on them rises
    perturbed = attack.perturb(before, train_set.labels[idx])
    assert loss_of(attack, perturbed, train_set.labels[idx]) > loss_of(
        attack, before, train_set.labels[idx])


def loss_of(attack, images, labels):
    mean, std = attack.normalization_.tolist()
    with torch.no_grad():
        logits = attack._helper(normalize(images.float() / 255, mean, std))
    return F.cross_entropy(logits, labels).item()


def test_too_large_a_ratio_for_the_target_class_is_refused(attack, train_set):
    with pytest.raises(ValueError, match=r"target-class samples .*largest possible poison ratio"):
        attack.poison(train_set, 0.5, TARGET, seed=0)
    with pytest.raises(ValueError, match=r"clean-label attack .*all-to-one"):
        attack.poison(train_set, 0.05, TARGET, seed=0, label_mode="all-to-all")


def test_deterministic_under_the_seed_without_the_caches(train_set):
    first = create_attack("lc", **TINY).fit(train_set, seed=1)
    poisoned = first.poison(train_set, 0.05, TARGET, seed=2)
    clear_helper_cache()  # helper and perturbations computed again
    second = create_attack("lc", **TINY).fit(train_set, seed=1)
    for name, tensor in first.fitted_state().items():
        assert torch.equal(second.fitted_state()[name], tensor), name
    assert torch.equal(second.poison(train_set, 0.05, TARGET, seed=2).data.images,
                       poisoned.data.images)
    other = create_attack("lc", **TINY).fit(train_set, seed=2)
    assert not torch.equal(other.fitted_state()["helper.classifier.weight"],
                           first.fitted_state()["helper.classifier.weight"])
    rng = torch.get_rng_state()
    create_attack("lc", **{**TINY, "helper_eps": 4.0}).fit(train_set, seed=1)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's global RNG is untouched


def test_restored_attack_applies_and_poisons_as_the_run_did(attack, train_set, tmp_path):
    path = tmp_path / "lc.safetensors"
    save_file(attack.fitted_state(), str(path))
    state = load_file(str(path))
    assert {"image_shape_", "num_classes_", "normalization_", "helper_accuracy_"} <= set(state)
    assert any(name.startswith("helper.") for name in state)
    clean_acc, robust_acc = attack.helper_accuracy_.tolist()
    assert 0 <= robust_acc <= 1 and 0 <= clean_acc <= 1
    restored = create_attack("lc", **TINY).load_fitted_state(state)
    assert torch.equal(restored.apply(train_set.images), attack.apply(train_set.images))
    clear_helper_cache()  # the restored helper recomputes the perturbations itself
    assert torch.equal(restored.poison(train_set, 0.05, TARGET, seed=1).data.images,
                       attack.poison(train_set, 0.05, TARGET, seed=1).data.images)
    partial = {k: v for k, v in state.items() if not k.startswith("helper.")}
    with pytest.raises(ValueError, match=r"lacks the helper's weights"):
        create_attack("lc", **TINY).load_fitted_state(partial)
    with pytest.raises(ValueError, match=r"helper_width 16: restore with the settings"):
        create_attack("lc", **{**TINY, "helper_width": 16}).load_fitted_state(state)
    colour = random_set(10, 3, 28)
    with pytest.raises(ValueError, match=r"trained on images of shape \(1, 28, 28\)"):
        restored.poison(colour, 0.1, 0, seed=0)


def test_adversarial_batches_stay_in_the_eps_ball_and_leave_train_mode():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 26 * 26, 3)).train()
    data = SimpleNamespace(mean=(0.5,), std=(0.25,))
    images = torch.rand(16, 1, 28, 28)
    batch = Batch(images, torch.arange(16) % 3, torch.arange(16))
    hook = AdversarialBatches(eps=8.0, steps=2, seed=0)
    hook.on_train_start(None)
    running = model[1].running_mean.clone()
    out = hook.on_batch(SimpleNamespace(model=model, data=data), batch)
    assert model.training and torch.equal(model[1].running_mean, running)  # eval-mode attack
    assert torch.equal(out.labels, batch.labels) and torch.equal(out.indices, batch.indices)
    assert (out.images - images).abs().max() <= 8 / 255 + 1e-6
    assert out.images.min() >= 0 and out.images.max() <= 1
    assert (out.images - images).abs().max() > 4 / 255
    again = AdversarialBatches(eps=8.0, steps=2, seed=0)
    again.on_train_start(None)
    assert torch.equal(again.on_batch(SimpleNamespace(model=model, data=data), batch).images,
                       out.images)


NAN = float("nan")
BAD_SETTINGS = [
    ("eps", -1), ("eps", 256), ("eps", NAN), ("eps", "8"), ("eps", True),
    ("step_size", 0), ("step_size", -1.5), ("steps", 0), ("steps", 2.5),
    ("helper_eps", -1), ("helper_eps", NAN), ("helper_steps", 0), ("helper_steps", 1.5),
    ("helper_width", 0), ("helper_epochs", 0), ("helper_train_size", 0),
    ("helper_model", "no-such-net"),
]


@pytest.mark.parametrize("setting,value", BAD_SETTINGS)
def test_bad_settings_are_refused_naming_the_setting(setting, value):
    with pytest.raises(ValueError, match=rf"\bLC {setting} must be .*got"):
        create_attack("lc", **{setting: value})
