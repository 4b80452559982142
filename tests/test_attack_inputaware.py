"""Input-aware: settings, the mask network's density and diversity (with numbers), input-specific
triggers and cross samples, a restored generator applying identically, the training hook, and
the generator trained alongside a victim in training mode."""

import pytest
import torch

import eigenguard.attacks.inputaware  # noqa: F401  (registration)
from eigenguard.attacks import NotFittedError, create_attack
from eigenguard.attacks.helpers import clear_helper_cache, single_thread
from eigenguard.attacks.inputaware import (build_network, rms_distance, threshold,
                                           train_mask)
from eigenguard.data import ImageSet
from eigenguard.experiment import RunConfig
from eigenguard.train import Batch, TrainConfig, TrainState, train

TARGET = 2


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: these small tensors gain nothing from more, and a busy machine loses a lot."""
    with single_thread():
        yield
#: a fit small enough for tests: every phase runs, on a few images
TINY = dict(train_size=64, batch_size=32, mask_epochs=1, epochs=1, width=4,
            helper_epochs=1, helper_width=4, helper_train_size=64)


def synthetic_set(n=64, channels=1, size=28, seed=0, classes=5):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    labels = (torch.arange(n) % classes)[torch.randperm(n, generator=g)]
    return ImageSet(images, labels, tuple(map(str, range(classes))), (0.5,) * channels,
                    (0.25,) * channels, "synthetic")


@pytest.fixture(scope="module", params=[(1, 28), (3, 32)], ids=["grey28", "colour32"])
def fitted(request):
    channels, size = request.param
    data = synthetic_set(64, channels, size)
    return create_attack("inputaware", target=TARGET, **TINY).fit(data, seed=0), data


def test_defaults_are_the_papers_where_not_reduced():
    settings = create_attack("inputaware").settings()
    assert {k: settings[k] for k in ("mode", "cross_ratio", "mask_density", "lambda_div",
                                     "lambda_norm", "lr")} == dict(
        mode="data", cross_ratio=1.0, mask_density=0.032, lambda_div=1.0, lambda_norm=100.0,
        lr=0.01)
    assert settings["mask_epochs"] == 2 and settings["epochs"] == 4  # reduced for the CPU
    assert create_attack("inputaware", **settings).settings() == settings
    assert create_attack("inputaware").needs_fit and not create_attack("inputaware").clean_label


@pytest.mark.parametrize("setting,value", [
    ("mode", "paper"), ("mask_density", 0), ("mask_density", 1.5), ("lambda_div", -1),
    ("lambda_norm", float("nan")), ("cross_ratio", -0.5), ("mask_epochs", 0), ("epochs", 1.5),
    ("train_size", 1), ("batch_size", 1), ("lr", 0), ("width", True), ("target", -1),
    ("helper_model", "no-such-model"),
])
def test_bad_settings_are_refused_naming_the_setting(setting, value):
    with pytest.raises(ValueError, match=rf"\b{setting} must be .*got"):
        create_attack("inputaware", **{setting: value})


def test_the_mask_is_sparse_and_input_specific_only_with_the_diversity_loss():
    data = synthetic_set(256, 1, 16)
    x = data.images.float() / 255
    masks = {}
    for lambda_div in (1.0, 0.0):
        net = build_network((1, 16, 16), 1, 4, 0, "mask-test")
        with torch.no_grad():
            untrained = threshold(net.eval()(x))
        train_mask(net, data, epochs=8, batch_size=64, lr=0.01, density=0.032,
                   lambda_norm=100, lambda_div=lambda_div, seed=0, device="cpu")
        with torch.no_grad():
            masks[lambda_div] = threshold(net(x))
    # measured: the untrained mask covers 0.485 of the image; trained, 0.027 with the
    # diversity loss (the density asked for is 0.032) and 0.006 without; the masks of two
    # images differ by 0.177 (rms) with it, 0.040 without
    with_div, without = masks[1.0], masks[0.0]
    assert untrained.mean() > 0.3
    assert 0.01 < with_div.mean() < 0.04 and without.mean() < 0.032
    spread, flat = (rms_distance(m, m.roll(1, 0)).mean() for m in (with_div, without))
    assert spread > 0.1 and spread > 3 * flat


def test_apply_is_uint8_input_specific_and_cross_samples_differ(fitted):
    attack, data = fitted
    out = attack.apply(data.images)
    assert out.dtype == torch.uint8 and out.shape == data.images.shape
    assert torch.equal(attack.apply(data.images), out)
    # x' = x + m(x) (G(x) − x): the change of each image comes from its own pattern and mask
    x = data.images.float() / 255
    with torch.no_grad():
        expected = x + threshold(attack.mask_(x)) * (attack.generator_(x) - x)
    assert ((out.float() - expected * 255).abs() <= 0.5 + 1e-3).all()
    residuals = out.float() - data.images.float()
    assert rms_distance(residuals[:32], residuals[32:]).min() > 0
    crossed = attack.apply_from(data.images[:32], data.images[32:])
    assert not torch.equal(crossed, out[:32])


def test_restored_state_applies_identically_and_cannot_be_re_aimed(fitted):
    attack, data = fitted
    state = attack.fitted_state()
    assert {"shape_", "target_", "density_", "surrogate_asr_"} <= set(state)
    assert any(k.startswith("generator.") for k in state) and any(k.startswith("mask.")
                                                                   for k in state)
    restored = create_attack("inputaware", **TINY).load_fitted_state(state)
    assert torch.equal(restored.apply(data.images), attack.apply(data.images))
    assert torch.equal(restored.poison(data, 0.1, TARGET, seed=1).data.images,
                       attack.poison(data, 0.1, TARGET, seed=1).data.images)
    with pytest.raises(ValueError, match="restored from a saved state"):
        restored.poison(data, 0.1, TARGET + 1, seed=1)
    with pytest.raises(ValueError, match="unexpected fitted state"):
        create_attack("inputaware").load_fitted_state({"bogus_": torch.zeros(1)})


def test_the_fit_is_deterministic_under_the_seed():
    data = synthetic_set(64)
    first = create_attack("inputaware", **TINY).fit(data, seed=4).fitted_state()
    clear_helper_cache()
    again = create_attack("inputaware", **TINY).fit(data, seed=4).fitted_state()
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_data_mode_poison_adds_cross_samples_that_keep_their_labels(fitted):
    attack, data = fitted
    poisoned = attack.poison(data, 0.125, TARGET, seed=0)
    idx, cross = poisoned.poison_indices, poisoned.noise_indices
    assert len(idx) == 8 and len(cross) == 8 and not set(idx.tolist()) & set(cross.tolist())
    assert (poisoned.data.labels[idx] == TARGET).all()
    assert torch.equal(poisoned.data.labels[cross], data.labels[cross])
    assert torch.equal(poisoned.data.images[idx], attack.apply(data.images[idx]))
    assert (poisoned.data.images[cross] != attack.apply(data.images[cross])).any()
    assert attack.training_hooks(TARGET, seed=0) == []
    with pytest.raises(ValueError, match=r"at most about 1 / \(1 \+ cross_ratio\)"):
        attack.poison(data, 0.6, TARGET, seed=0)


def test_errors_before_fitting_and_on_the_wrong_shape(fitted):
    attack, data = fitted
    with pytest.raises(NotFittedError):
        create_attack("inputaware").apply(data.images)
    other = torch.zeros(1, 3 if data.in_channels == 1 else 1, 30, 30, dtype=torch.uint8)
    with pytest.raises(ValueError, match="fitted on images of shape"):
        attack.apply(other)
    training = create_attack("inputaware", mode="training", **TINY)
    with pytest.raises(ValueError, match="all-to-one only"):
        training.check_label_mode_supported("all-to-all")
    with pytest.raises(ValueError, match="all-to-one only"):
        RunConfig(attack="inputaware", attack_settings={"mode": "training"},
                  label_mode="all-to-all").validate()


def batch_of(data, rows):
    rows = torch.as_tensor(rows)
    return Batch(data.images[rows].float() / 255, data.labels[rows].clone(), rows)


def test_the_hook_poisons_its_share_with_own_and_cross_triggers(fitted):
    attack, data = fitted
    training = create_attack("inputaware", mode="training", **TINY)
    training.load_fitted_state(attack.fitted_state())
    (hook,) = training.training_hooks(TARGET, seed=0, ratio=0.25)
    state = TrainState(None, None, None, TrainConfig(), data, torch.device("cpu"))
    batch = batch_of(data, torch.arange(48))
    out = hook.on_batch(state, batch)
    poisoned, cross = hook.last_rows
    assert len(poisoned) == 12 and len(cross) == 12  # round(0.25 · 48), cross_ratio 1
    assert (out.labels[poisoned] == TARGET).all()
    assert torch.equal(out.labels[cross], batch.labels[cross])
    rest = torch.ones(48, dtype=torch.bool)
    rest[poisoned], rest[cross] = False, False
    assert torch.equal(out.images[rest], batch.images[rest])
    # the generator in evaluation mode (as before training starts) makes apply()'s triggers
    own = attack.apply(data.images[poisoned]).float()
    assert ((out.images[poisoned] * 255 - own).abs() <= 0.5 + 1e-3).all()
    hook.on_train_start(state)  # now it learns through the victim's loss
    out = hook.on_batch(state, batch)
    assert out.images.requires_grad and not batch.images.requires_grad
    assert hook.diversity is not None and hook.diversity > 0


def test_training_mode_trains_the_generator_alongside_the_victim(fitted):
    attack, data = fitted
    training = create_attack("inputaware", mode="training", **TINY)
    training.load_fitted_state(attack.fitted_state())
    before = training.fitted_state()
    poisoned = training.poison(data, 0.1, TARGET, seed=0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(data.images[0].numel(), 5))
    history = train(model, poisoned.data, TrainConfig(epochs=1, batch_size=16), seed=0,
                    progress=False, hooks=training.training_hooks(TARGET, seed=0))
    assert len(history) == 1 and torch.isfinite(torch.tensor(history[0]["loss"]))
    after = training.fitted_state()
    generator_keys = [k for k in after if k.startswith("generator.")]
    assert any(not torch.equal(before[k], after[k]) for k in generator_keys)
    assert all(torch.equal(before[k], after[k]) for k in after if k.startswith("mask."))
    # the state saved after training is the generator that evaluation applies
    restored = create_attack("inputaware", **TINY).load_fitted_state(after)
    assert torch.equal(restored.apply(data.images), training.apply(data.images))
    assert not torch.equal(restored.apply(data.images), attack.apply(data.images))
