"""The training-controlled threat model of WaNet and BppAttack: the hook poisons exactly its share
of every batch, relabels those samples, keeps the extra samples' labels and leaves the rest as it
was; poison() still materialises the data mode's set, which the hook puts back clean while the
victim trains on it; settings, errors, and a run end to end."""

import pytest
import torch

from eigenguard.attacks import create_attack
from eigenguard.attacks.wanet import WaNetBatches
from eigenguard.attacks.helpers import single_thread
from eigenguard.data import ImageSet
from eigenguard.experiment import RunConfig, execute
from eigenguard.train import Batch, TrainConfig, TrainState, batch_slices, train

TARGET = 2


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: these small tensors gain nothing from more, and a busy machine loses a lot."""
    with single_thread():
        yield


def synthetic_set(n=200, channels=1, size=28, seed=0, classes=5):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    labels = (torch.arange(n) % classes)[torch.randperm(n, generator=g)]
    return ImageSet(images, labels, tuple(map(str, range(classes))), (0.5,) * channels,
                    (0.25,) * channels, "synthetic")


def attack_in_training_mode(name, channels=1, size=28, **settings):
    attack = create_attack(name, mode="training", **settings)
    if attack.needs_fit:
        attack.fit(synthetic_set(8, channels, size, seed=99), seed=0)
    return attack


def state_for(data):
    return TrainState(None, None, None, TrainConfig(), data, torch.device("cpu"))


def batch_of(data, indices):
    indices = torch.as_tensor(indices)
    return Batch(data.images[indices].float() / 255, data.labels[indices].clone(), indices)


def extra_expected(name, attack, size, poisoned):
    return round(attack.cross_ratio * poisoned) if name == "wanet" else round(0.1 * size)


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
@pytest.mark.parametrize("name", ["wanet", "bpp"])
def test_the_hook_poisons_its_share_relabels_and_keeps_the_rest(name, channels, size):
    data = synthetic_set(200, channels, size)
    attack = attack_in_training_mode(name, channels, size)
    (hook,) = attack.training_hooks(TARGET, seed=3, ratio=0.1)
    state = state_for(data)
    seen = []
    for batch_size in (64, 100, 128, 37):
        batch = batch_of(data, torch.arange(batch_size))
        before = batch.images.clone(), batch.labels.clone()
        out = hook.on_batch(state, batch)
        poisoned, extra = hook.last_rows
        assert len(poisoned) == round(0.1 * batch_size)
        assert len(extra) == extra_expected(name, attack, batch_size, len(poisoned))
        assert not set(poisoned.tolist()) & set(extra.tolist())
        assert (out.labels[poisoned] == TARGET).all()
        assert torch.equal(out.labels[extra], before[1][extra])  # extra samples keep labels
        rest = torch.ones(batch_size, dtype=torch.bool)
        rest[poisoned], rest[extra] = False, False
        assert torch.equal(out.images[rest], before[0][rest])
        assert torch.equal(out.labels[rest], before[1][rest])
        # the poisoned rows are the evaluation trigger, exactly; the extra rows differ from it
        triggered = attack.apply(data.images[poisoned]).float() / 255
        assert torch.equal(out.images[poisoned], triggered)
        extras = (out.images[extra] * 255).round().to(torch.uint8)
        assert not torch.equal(extras, attack.apply(data.images[extra]))
        assert (extras != data.images[extra]).any()
        assert torch.equal(before[0], batch.images)  # the incoming batch is not edited in place
        seen.append(poisoned)
    assert not torch.equal(seen[0][:5], seen[1][:5])  # a fresh draw every batch


@pytest.mark.parametrize("name", ["wanet", "bpp"])
def test_the_draws_are_seeded(name):
    data = synthetic_set(128)
    attack = attack_in_training_mode(name)
    runs = []
    for seed in (1, 1, 2):
        (hook,) = attack.training_hooks(TARGET, seed=seed, ratio=0.2)
        out = hook.on_batch(state_for(data), batch_of(data, torch.arange(128)))
        runs.append((hook.last_rows, out.images))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))
    assert torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0][0], runs[2][0][0])


def test_bpp_negatives_carry_another_images_quantisation_residual():
    data = synthetic_set(100)
    attack = attack_in_training_mode("bpp", neg_ratio=0.3)
    (hook,) = attack.training_hooks(TARGET, seed=0, ratio=0.1)
    out = hook.on_batch(state_for(data), batch_of(data, torch.arange(100)))
    _, extra = hook.last_rows
    assert len(extra) == 30
    change = (out.images[extra] * 255).round() - data.images[extra].float()
    # the residual Q(x) − x of 8 levels lies within half a level (255 / 7 / 2 ≈ 18.2) ...
    assert change.abs().max() <= 255 / 7 / 2 + 0.5
    # ... and is not the image's own residual (that would be the trigger itself)
    own = attack.apply(data.images[extra]).float() - data.images[extra].float()
    assert (change != own).flatten(1).any(1).all()


@pytest.mark.parametrize("name", ["wanet", "bpp"])
def test_poison_materialises_the_data_modes_set_and_the_hook_puts_it_back(name):
    data = synthetic_set(200)
    attack = attack_in_training_mode(name)
    data_mode = create_attack(name, **{k: v for k, v in attack.settings().items()
                                       if k not in ("mode", "neg_ratio")})
    if data_mode.needs_fit:
        data_mode.load_fitted_state(attack.fitted_state())
    poisoned = attack.poison(data, 0.1, TARGET, seed=5)
    reference = data_mode.poison(data, 0.1, TARGET, seed=5)
    assert torch.equal(poisoned.data.images, reference.data.images)
    assert torch.equal(poisoned.data.labels, reference.data.labels)
    assert len(poisoned.poison_indices) == 20
    # the hook learnt the ratio from poison(); on the materialised set it restores first
    (hook,) = attack.training_hooks(TARGET, seed=0)
    assert hook.plan.ratio == 0.1
    changed = torch.cat((poisoned.poison_indices,
                         getattr(poisoned, "noise_indices", torch.zeros(0, dtype=torch.int64))))
    out = hook.on_batch(state_for(poisoned.data), batch_of(poisoned.data, torch.arange(200)))
    chosen = torch.cat(hook.last_rows)
    back = torch.tensor([i for i in changed.tolist() if i not in set(chosen.tolist())])
    assert len(back) > 0
    assert torch.equal(out.images[back], data.images[back].float() / 255)
    assert torch.equal(out.labels[back], data.labels[back])
    assert len(hook.last_rows[0]) == 20  # the paper's dose, not twice it
    # on another set (a filtered copy, say) nothing is put back
    copy = poisoned.data.subset(torch.arange(200))
    out = hook.on_batch(state_for(copy), batch_of(copy, torch.arange(200)))
    untouched = torch.tensor([i for i in changed.tolist()
                              if i not in set(torch.cat(hook.last_rows).tolist())])
    assert torch.equal(out.images[untouched], poisoned.data.images[untouched].float() / 255)


def test_the_non_target_pool_poisons_other_classes_only():
    data = synthetic_set(200)
    attack = attack_in_training_mode("bpp")
    attack.poison(data, 0.2, TARGET, seed=0, pool="non-target")
    (hook,) = attack.training_hooks(TARGET, seed=0)
    out = hook.on_batch(state_for(data), batch_of(data, torch.arange(100)))
    poisoned, _ = hook.last_rows
    assert len(poisoned) == 20 and (data.labels[poisoned] != TARGET).all()
    assert (out.labels[poisoned] == TARGET).all()


def test_settings_name_the_mode_only_in_training_mode():
    assert create_attack("wanet").settings() == {"k": 4, "s": 0.5, "cross_ratio": 2.0}
    assert create_attack("wanet", mode="training").settings() == {
        "k": 4, "s": 0.5, "cross_ratio": 2.0, "mode": "training"}
    assert create_attack("bpp", mode="data").settings() == {"squeeze_num": 8, "dither": False}
    training = create_attack("bpp", mode="training", neg_ratio=0.2).settings()
    assert training == {"squeeze_num": 8, "dither": False, "mode": "training", "neg_ratio": 0.2}
    assert create_attack("bpp", **training).settings() == training
    assert create_attack("wanet").training_hooks(0, 0) == []
    assert create_attack("bpp").training_hooks(0, 0) == []


@pytest.mark.parametrize("name,settings,message", [
    ("wanet", dict(mode="train"), r"mode must be one of \('data', 'training'\)"),
    ("bpp", dict(mode=None), r"mode must be one of"),
    ("bpp", dict(mode="training", neg_ratio=1.5), r"neg_ratio must be a fraction"),
    ("bpp", dict(neg_ratio=0.2), r"neg_ratio must be left at 0.1 in mode 'data'"),
])
def test_bad_settings_are_refused(name, settings, message):
    with pytest.raises(ValueError, match=message):
        create_attack(name, **settings)


@pytest.mark.parametrize("name", ["wanet", "bpp"])
def test_unsupported_uses_are_refused_clearly(name):
    attack = attack_in_training_mode(name)
    with pytest.raises(ValueError, match="training mode .* all-to-one only"):
        attack.poison(synthetic_set(50), 0.1, TARGET, seed=0, label_mode="all-to-all")
    with pytest.raises(ValueError, match=r"call poison\(\) first"):
        attack.training_hooks(TARGET, seed=0)
    with pytest.raises(ValueError, match="ratio must be a fraction"):
        attack.training_hooks(TARGET, seed=0, ratio=1.5)
    # refused with the run's settings, before any data is loaded
    with pytest.raises(ValueError, match="all-to-one only"):
        RunConfig(attack=name, attack_settings={"mode": "training"},
                  label_mode="all-to-all").validate()


@pytest.mark.parametrize("name", ["wanet", "bpp"])
def test_training_with_the_hooks_works(name):
    data = synthetic_set(96, 1, 28)
    attack = attack_in_training_mode(name)
    poisoned = attack.poison(data, 0.1, TARGET, seed=0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 5))
    history = train(model, poisoned.data, TrainConfig(epochs=1, batch_size=32), seed=0,
                    progress=False, hooks=attack.training_hooks(TARGET, seed=0))
    assert len(history) == 1 and torch.isfinite(torch.tensor(history[0]["loss"]))


def test_a_run_records_the_mode_and_trains_through_the_hooks(synthetic_root, monkeypatch):
    calls = []
    original = WaNetBatches.on_batch
    monkeypatch.setattr(WaNetBatches, "on_batch",
                        lambda self, state, batch: calls.append(1) or original(self, state, batch))
    config = RunConfig(model="small_cnn", width=8, attack="wanet",
                       attack_settings={"mode": "training"}, train_size=300, test_size=60,
                       train=TrainConfig(epochs=1, batch_size=32, augment=False))
    assert config.resolved()["attack_settings"]["mode"] == "training"
    data_mode = RunConfig(model="small_cnn", attack="wanet")
    assert "mode" not in data_mode.resolved()["attack_settings"]
    result = execute(config, data_root=synthetic_root, progress=False, log=lambda *a: None)
    assert result.status == "finished" and len(result.history) == 1
    assert len(calls) == len(batch_slices(result.extra["split_sizes"]["train"], 32))
    # the materialised set handed to defenses: 10% of the victim's training split
    assert result.extra["poisoned"] == round(0.1 * result.extra["split_sizes"]["train"])
    assert set(result.attack_state) == {"control_", "grid_"}
