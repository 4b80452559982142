"""SSBA, checked with numbers: its trigger differs from image to image, stays within eps (plus
rounding), and carries the secret (the decoder trained beside the encoder reads it back from
held-out triggered images); the fit is deterministic under the seed (also with the in-process
cache emptied); the fitted state round-trips through a safetensors file and applies the same
trigger; bad settings are refused naming the setting. The registry's conformance test
(tests/test_attack_suite.py) picks SSBA up once it is registered.

Kept fast: one fit that learns (width-8 networks, 8 bits, eps 16, no fidelity term, 100 Adam
steps on 640 of conftest's stripe images: 5 to 10 s on a busy 2-core machine), and two-step fits
for everything else."""

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from eigenguard.attacks import NotFittedError
from eigenguard.attacks.helpers import clear_helper_cache
from eigenguard.attacks.ssba import DIAGNOSTICS, SSBA
from eigenguard.data import ImageSet, load_dataset

#: a fit whose decoder reads the secret back (held-out bit accuracy 0.995 to 1.0 at seeds 0-2)
LEARNS = dict(bits=8, width=8, eps=16, fidelity_weight=0, train_size=640, steps=100,
              batch_size=32, lr=3e-3)
#: two optimiser steps: enough for shapes, bounds, determinism and the fitted state
TINY = dict(bits=8, width=4, train_size=64, steps=2, batch_size=32)


@pytest.fixture(scope="module")
def stripes(synthetic_root):
    """conftest's 2,000 stripe-texture training images (1×28×28, 10 classes)."""
    return load_dataset("fashion-mnist", "train", root=synthetic_root)


@pytest.fixture(scope="module")
def held_out(synthetic_root):
    """300 stripe images drawn with another seed: never seen by the fit."""
    return load_dataset("fashion-mnist", "test", root=synthetic_root).images


@pytest.fixture(scope="module")
def learned(stripes):
    return SSBA(**LEARNS).fit(stripes, seed=0)


def colour_set(n=64, seed=0):
    """Random 3×32×32 images over the full 0..255 range."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    return ImageSet(images, torch.arange(n) % 5, tuple("abcde"), (0.5,) * 3, (0.25,) * 3,
                    "colour")


def grey_set(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    return ImageSet(images, torch.arange(n) % 5, tuple("abcde"), (0.5,), (0.25,), "grey")


# -- settings ----------------------------------------------------------------------------------

def test_defaults_and_kind():
    attack = SSBA()
    assert attack.settings() == {"bits": 32, "eps": 8.0, "fidelity_weight": 30.0, "width": 16,
                                 "steps": 750, "train_size": 16000, "batch_size": 64,
                                 "lr": 1e-3, "warmup": 0.5}
    assert attack.needs_fit and not attack.clean_label and not attack.is_fitted
    with pytest.raises(NotFittedError):
        attack.apply(torch.zeros(1, 1, 28, 28, dtype=torch.uint8))


NAN = float("nan")


@pytest.mark.parametrize("setting,value", [
    ("bits", 0), ("bits", -3), ("bits", 2.5), ("bits", True), ("eps", 0), ("eps", -1),
    ("eps", 256), ("eps", NAN), ("eps", "8"), ("fidelity_weight", -1),
    ("fidelity_weight", NAN), ("width", 0), ("steps", 0), ("steps", -2),
    ("train_size", 0), ("train_size", -100), ("batch_size", 0), ("lr", 0), ("lr", -1e-3),
    ("warmup", -0.1), ("warmup", 1.5)])
def test_bad_settings_are_refused_naming_the_setting(setting, value):
    with pytest.raises(ValueError, match=rf"SSBA {setting} must be .*got"):
        SSBA(**{setting: value})


def test_an_empty_training_set_is_refused():
    with pytest.raises(ValueError, match="training set, which is empty"):
        SSBA(**TINY).fit(grey_set().subset(torch.arange(0)))


# -- the trigger -------------------------------------------------------------------------------

@pytest.mark.parametrize("data", [grey_set(), colour_set()], ids=["1x28x28", "3x32x32"])
def test_trigger_is_bounded_sample_specific_and_batch_independent(data):
    attack = SSBA(**TINY).fit(data, seed=0)
    images = data.images
    out = attack.apply(images)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    change = out.double() - images.double()
    assert change.abs().max() <= attack.eps + 0.5  # |r| < eps, then rounding
    # sample-specific: no two images get the same residual (not even two flat greys, which do
    # not clip)
    flat = change.flatten(1)
    assert len({row.numpy().tobytes() for row in flat}) == len(images)
    greys = torch.stack([torch.full(images.shape[1:], v, dtype=torch.uint8) for v in (90, 160)])
    grey_change = attack.apply(greys).double() - greys.double()
    assert not torch.equal(grey_change[0], grey_change[1])
    # an image's trigger does not depend on its batch
    alone = torch.cat([attack.apply(images[i:i + 1]) for i in range(len(images))])
    assert torch.equal(alone, out)
    assert torch.equal(attack.apply(images.flip(0)), out.flip(0))
    with pytest.raises(ValueError, match=r"fitted on images of shape"):
        attack.apply(torch.zeros(1, 1, 20, 20, dtype=torch.uint8))


def test_the_decoder_recovers_the_secret_from_held_out_triggered_images(learned, held_out):
    triggered = learned.apply(held_out)
    secret = learned.secret_.expand(len(held_out), -1)
    recovered = (learned.decode(triggered) == secret).double().mean().item()
    clean = (learned.decode(held_out) == secret).double().mean().item()
    print(f"SSBA tiny fit: bits recovered {recovered:.3f} from triggered held-out images, "
          f"{clean:.3f} agree with the secret on clean ones; fit diagnostics "
          + ", ".join(f"{name} {float(getattr(learned, name)):.3f}" for name in DIAGNOSTICS))
    assert recovered >= 0.95  # chance is 0.5
    assert clean <= 0.75  # the clean images do not carry it
    assert float(learned.bit_accuracy_) >= 0.95  # the fit's own measure agrees
    assert float(learned.random_bit_accuracy_) >= 0.95  # any secret, not just this one
    change = triggered.double() - held_out.double()
    assert change.abs().max() <= learned.eps + 0.5
    # the learned residuals are not one pattern: two images' residuals differ on most pixels,
    # by a quarter of the residual's mean size (a fixed pattern would give 0 and 0)
    flat = change.flatten(1)
    pairs = ~torch.eye(len(flat), dtype=torch.bool)
    differing = (flat[:, None] != flat[None]).double().mean(2)[pairs].mean().item()
    spread = ((flat[:, None] - flat[None]).abs().mean(2)[pairs].mean() / flat.abs().mean()).item()
    print(f"SSBA tiny fit: residuals of two images differ on {differing:.2f} of the pixels, "
          f"by {spread:.2f} of the residual's mean |r|")
    assert differing > 0.5 and spread > 0.15


def test_poison_relabels_and_adds_the_trigger(learned, stripes):
    data = stripes.subset(torch.arange(200))
    poisoned = learned.poison(data, 0.1, 3, seed=0)
    idx = poisoned.poison_indices
    assert len(idx) == 20 and (poisoned.data.labels[idx] == 3).all()
    assert torch.equal(poisoned.data.images[idx], learned.apply(data.images[idx]))


# -- determinism and fitted state --------------------------------------------------------------

def test_the_fit_is_deterministic_under_the_seed():
    data = grey_set()
    rng = torch.get_rng_state()
    first = SSBA(**TINY).fit(data, seed=1)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's global RNG is untouched
    clear_helper_cache()  # trained again, not read from the cache
    second = SSBA(**TINY).fit(data, seed=1)
    state, again = first.fitted_state(), second.fitted_state()
    assert state.keys() == again.keys()
    assert all(torch.equal(state[k], again[k]) for k in state)
    other = SSBA(**TINY).fit(data, seed=2)
    assert not torch.equal(other.fitted_state()["encoder.inc.0.weight_"],
                           state["encoder.inc.0.weight_"])
    assert not torch.equal(other.apply(data.images), first.apply(data.images))


def test_the_fitted_state_round_trips_through_a_file(learned, held_out, tmp_path):
    state = learned.fitted_state()
    assert all(name.endswith("_") for name in state)
    assert {"secret_", "image_shape_", "eps_", *DIAGNOSTICS} <= set(state)
    assert not any(name.startswith("decoder.") for name in state)  # the trigger needs no decoder
    save_file(state, str(tmp_path / "ssba.safetensors"))
    restored = SSBA(**LEARNS).load_fitted_state(load_file(str(tmp_path / "ssba.safetensors")))
    assert restored.is_fitted
    assert torch.equal(restored.apply(held_out), learned.apply(held_out))
    assert torch.equal(restored.secret_, learned.secret_)
    assert math.isclose(float(restored.bit_accuracy_), float(learned.bit_accuracy_))
    with pytest.raises(ValueError, match="restored from a saved state"):
        restored.decode(held_out)
    # a state is only restored into an attack with the settings that made it
    with pytest.raises(ValueError, match=r"8-bit secret, but .* bits = 16"):
        SSBA(**{**LEARNS, "bits": 16}).load_fitted_state(state)
    with pytest.raises(ValueError, match=r"fitted with eps = 16, but .* eps = 8"):
        SSBA(**{**LEARNS, "eps": 8}).load_fitted_state(state)
    with pytest.raises(ValueError, match=r"does not fit an SSBA of width 4"):
        SSBA(**{**LEARNS, "width": 4}).load_fitted_state(state)
    with pytest.raises(ValueError, match=r"unexpected fitted-state entry 'pattern_'"):
        SSBA(**LEARNS).load_fitted_state({**state, "pattern_": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"lacks 'secret_'"):
        SSBA(**LEARNS).load_fitted_state({k: v for k, v in state.items() if k != "secret_"})
