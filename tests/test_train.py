"""The training loop learns, is deterministic under a seed, runs hooks as documented and refuses bad
settings."""
import doctest

import pytest
import torch
from torch import nn

import eigenguard.train
from eigenguard.data import ImageSet, load_dataset
from eigenguard.evaluate import predict
from eigenguard.models import create_model
from eigenguard.train import (Augmentation, Batch, EpochEndHook, TrainConfig, TrainHook,
                              batch_slices, train)


def noise_set(n: int, classes: int = 3, seed: int = 0) -> ImageSet:
    """``n`` random 1×8×8 images with random labels."""
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8),
                    torch.randint(0, classes, (n,), generator=g),
                    tuple(str(c) for c in range(classes)), (0.5,), (0.25,), "noise")


def linear(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, classes))


def fit(data, hooks=(), seed=0, augmentation=Augmentation(), model=None, **settings):
    model = linear(len(data.classes)) if model is None else model
    config = TrainConfig(**{"epochs": 2, "batch_size": 16, "lr": 0.05, **settings})
    history = train(model, data, config, seed=seed, augmentation=augmentation, progress=False,
                    hooks=hooks)
    return model, history


def test_training_learns_and_is_bitwise_deterministic(synthetic_root):
    data = load_dataset("fashion-mnist", "train", root=synthetic_root).subset(range(600))
    config = TrainConfig(epochs=4, batch_size=32, lr=0.1)
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        model = create_model("small_cnn", in_channels=1, num_classes=10, width=8)
        history = train(model, data, config, seed=1, augmentation=Augmentation(2, False),
                        progress=False)
        states.append(model.state_dict())
    assert len(history) == 4 and history[-1]["loss"] < history[0]["loss"]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    accuracy = (predict(model, data.images, data) == data.labels).double().mean().item()
    assert accuracy > 0.9


def test_epoch_callback_and_schedules(synthetic_root):
    data = load_dataset("fashion-mnist", "train", root=synthetic_root).subset(range(100))
    seen = []
    for schedule in ("onecycle", "cosine", "constant"):
        model = create_model("small_cnn", in_channels=1, num_classes=10, width=4)
        history = train(model, data, TrainConfig(epochs=1, batch_size=32, schedule=schedule),
                        seed=0, progress=False, hooks=[EpochEndHook(seen.append)])
        assert history[0]["epoch"] == 1
    assert len(seen) == 3


class Recorder(TrainHook):
    """Logs every call with the state's counters and checks what each call is documented to see."""

    def __init__(self, data):
        self.data, self.events, self.indices = data, [], []

    def on_train_start(self, state):
        self.events.append(("train_start", state.epoch, state.step))

    def on_epoch_start(self, state):
        assert state.model.training
        self.events.append(("epoch_start", state.epoch, state.step))

    def on_batch(self, state, batch):
        images, labels, indices = batch.images, batch.labels, batch.indices
        assert images.dtype == torch.float32 and images.shape == (len(labels), 1, 8, 8)
        assert 0 <= images.min() and images.max() <= 1  # not normalised (that spans [-2, 2])
        assert labels.dtype == torch.int64 and indices.dtype == torch.int64
        assert indices.device.type == "cpu"
        assert torch.equal(labels, self.data.labels[indices])
        self.indices.append(indices.clone())
        self.events.append(("batch", state.epoch, state.step))
        return batch

    def loss(self, state, batch, logits, losses, loss):
        assert logits.shape == (len(batch), 3) and losses.shape == (len(batch),)
        self.events.append(("loss", state.epoch, state.step))
        return loss

    def after_step(self, state, batch):
        self.events.append(("after_step", state.epoch, state.step))

    def on_epoch_end(self, state, record):
        assert record["epoch"] == state.epoch and len(state.history) == state.epoch - 1
        self.events.append(("epoch_end", state.epoch, state.step))

    def on_train_end(self, state):
        assert len(state.history) == 2
        self.events.append(("train_end", state.epoch, state.step))


def test_hooks_are_called_in_order_and_see_documented_batches():
    data = noise_set(50)  # 3 batches of 16 + 2 left over: 3 steps per epoch, the last of 18
    first, second = Recorder(data), Recorder(data)
    fit(data, hooks=[first, second], augmentation=Augmentation(crop_padding=2, flip=True))
    expected = [("train_start", 0, 0)]
    for epoch in (1, 2):
        done = 3 * (epoch - 1)
        expected.append(("epoch_start", epoch, done))
        for step in range(done, done + 3):
            expected += [("batch", epoch, step), ("loss", epoch, step),
                         ("after_step", epoch, step + 1)]
        expected.append(("epoch_end", epoch, done + 3))
    expected.append(("train_end", 2, 6))
    assert first.events == second.events == expected
    assert [len(i) for i in first.indices] == [16, 16, 18] * 2
    for epoch in (first.indices[:3], first.indices[3:]):
        assert torch.equal(torch.cat(epoch).sort().values, torch.arange(50))
    assert not torch.equal(torch.cat(first.indices[:3]), torch.cat(first.indices[3:]))


def test_no_op_hooks_change_nothing():
    data = noise_set(40)
    plain, history = fit(data, augmentation=Augmentation(1, True))
    hooked, hooked_history = fit(data, hooks=[TrainHook(), TrainHook()],
                                 augmentation=Augmentation(1, True))
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), hooked.parameters()))
    assert [r["loss"] for r in history] == [r["loss"] for r in hooked_history]


class RelabelToZero(TrainHook):
    def on_batch(self, state, batch):
        return Batch(batch.images, torch.zeros_like(batch.labels), batch.indices)


def test_on_batch_hook_changes_what_the_model_trains_on():
    data = noise_set(96)
    assert (data.labels == 0).double().mean() < 0.5
    plain, _ = fit(data, epochs=4, schedule="constant")
    relabelled, history = fit(data, hooks=[RelabelToZero()], epochs=4, schedule="constant")
    assert (predict(plain, data.images, data) == 0).double().mean() < 0.6
    assert (predict(relabelled, data.images, data) == 0).all()
    assert history[-1]["train_acc"] == 1.0  # accuracy is measured on the labels trained on


class KeepFirstHalf(TrainHook):
    def __init__(self):
        self.sizes = []

    def on_batch(self, state, batch):
        half = len(batch) // 2
        return Batch(batch.images[:half], batch.labels[:half], batch.indices[:half])

    def loss(self, state, batch, logits, losses, loss):
        self.sizes.append(len(losses))
        return loss


def test_on_batch_hook_may_drop_samples():
    counter = KeepFirstHalf()
    fit(noise_set(64), hooks=[counter])
    assert counter.sizes == [8] * 8


class Scale(TrainHook):
    """Multiplies the loss by ``factor`` after checking what it was given."""

    def __init__(self, factor, expect_factor):
        self.factor, self.expect_factor, self.calls = factor, expect_factor, 0

    def loss(self, state, batch, logits, losses, loss):
        default = nn.functional.cross_entropy(logits, batch.labels)
        assert torch.allclose(losses.mean(), default, rtol=1e-6)
        assert torch.equal(loss, losses.mean() * self.expect_factor)
        self.calls += 1
        return loss * self.factor


def test_loss_hooks_chain_and_their_loss_is_what_is_optimised():
    data = noise_set(48)
    initial = [p.detach().clone() for p in linear().parameters()]
    first, second = Scale(2.0, expect_factor=1.0), Scale(0.0, expect_factor=2.0)
    model, history = fit(data, hooks=[first, second], weight_decay=0.0)
    assert first.calls == second.calls == 6
    assert all(torch.equal(a, b) for a, b in zip(initial, model.parameters()))
    assert [r["loss"] for r in history] == [0.0, 0.0]  # the recorded loss is the optimised one
    trained, _ = fit(data, hooks=[Scale(1.0, expect_factor=1.0)], weight_decay=0.0)
    assert not all(torch.equal(a, b) for a, b in zip(initial, trained.parameters()))


class OwnOptimiser(TrainHook):
    """Pulls a parameter outside the model towards 1 after every training step."""

    def __init__(self):
        self.weight = nn.Parameter(torch.zeros(3))
        self.optimizer = torch.optim.SGD([self.weight], lr=0.1)
        self.steps = 0

    def after_step(self, state, batch):
        self.optimizer.zero_grad()
        ((self.weight - 1) ** 2).sum().backward()
        self.optimizer.step()
        self.steps += 1


def test_after_step_can_step_its_own_optimiser():
    hook = OwnOptimiser()
    fit(noise_set(64), hooks=[hook])
    assert hook.steps == 8
    expected = 1 - 0.8 ** 8  # each step moves the weight 20% of the way to 1
    assert torch.allclose(hook.weight.detach(), torch.full((3,), expected))


class AddKeys(TrainHook):
    def on_epoch_end(self, state, record):
        record["twice_epoch"] = 2 * record["epoch"]
        record["steps_so_far"] = state.step


def test_on_epoch_end_adds_keys_to_history():
    seen = []
    _, history = fit(noise_set(64), hooks=[AddKeys(), EpochEndHook(seen.append)], epochs=3)
    assert [r["twice_epoch"] for r in history] == [2, 4, 6]
    assert [r["steps_so_far"] for r in history] == [4, 8, 12]
    assert seen == history
    assert set(history[0]) == {"epoch", "loss", "train_acc", "lr", "seconds", "twice_epoch",
                               "steps_so_far"}


class BatchSizes(TrainHook):
    def on_train_start(self, state):
        self.steps_per_epoch, self.total_steps = state.steps_per_epoch, state.scheduler.total_steps
        self.sizes = []

    def on_batch(self, state, batch):
        self.sizes.append(len(batch))
        return batch


@pytest.mark.parametrize("n,sizes", [
    (10 * 8 + 3, [8] * 9 + [11]),   # 3 < 8 / 2: merged into the previous batch
    (10 * 8 + 4, [8] * 10 + [4]),   # 4 >= 8 / 2: its own step
    (10 * 8, [8] * 10),
    (5, [5]),                       # smaller than one batch: one step
])
def test_tiny_last_batch_is_merged(n, sizes):
    hook = BatchSizes()
    fit(noise_set(n), hooks=[hook], batch_size=8, epochs=2)
    assert hook.sizes == sizes * 2
    assert hook.steps_per_epoch == len(sizes) and hook.total_steps == 2 * len(sizes)
    assert [s.stop - s.start for s in batch_slices(n, 8)] == sizes


class LearningRates(TrainHook):
    def __init__(self):
        self.lrs = []

    def after_step(self, state, batch):
        self.lrs.append(state.optimizer.param_groups[0]["lr"])


def schedule_lrs(schedule):
    hook = LearningRates()
    fit(noise_set(64), hooks=[hook], schedule=schedule, batch_size=4, lr=0.1)  # 2 × 16 steps
    assert len(hook.lrs) == 32
    return torch.tensor(hook.lrs, dtype=torch.float64)


def test_learning_rate_schedules():
    onecycle = schedule_lrs("onecycle")
    peak = int(onecycle.argmax())
    assert 0.95 * 0.1 < onecycle.max() <= 0.1 and 5 <= peak <= 12  # warm-up over ~30% of steps
    assert onecycle[0] == pytest.approx(0.1 / 25)
    assert (onecycle[1:peak + 1] > onecycle[:peak]).all()
    assert (onecycle[peak + 1:] < onecycle[peak:-1]).all()
    assert onecycle[-1] < 0.1 / 1000

    cosine = schedule_lrs("cosine")
    assert cosine[0] == 0.1 and (cosine[1:] <= cosine[:-1]).all()
    assert cosine[16] == pytest.approx(0.05) and cosine[-1] < 0.001

    assert (schedule_lrs("constant") == 0.1).all()


def test_same_seed_same_weights_other_seed_other_weights():
    data = noise_set(40)
    runs = [fit(data, seed=seed, augmentation=Augmentation(1, True))[0] for seed in (3, 3, 4)]
    params = [torch.cat([p.detach().flatten() for p in m.parameters()]) for m in runs]
    assert torch.equal(params[0], params[1])
    assert not torch.equal(params[0], params[2])


class ForgetsToReturn(TrainHook):
    def on_batch(self, state, batch):
        batch.labels.zero_()


def test_hook_returning_nothing_gets_a_clear_error():
    with pytest.raises(TypeError, match="ForgetsToReturn.on_batch must return a Batch"):
        fit(noise_set(16), hooks=[ForgetsToReturn()])


def test_docstring_example_runs():
    assert doctest.testmod(eigenguard.train).failed == 0


@pytest.mark.parametrize("field,value", [("epochs", 0), ("batch_size", -1), ("lr", 0.0),
                                         ("lr", float("nan")), ("schedule", "step")])
def test_bad_training_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_divergence_stops_with_advice(synthetic_root):
    data = load_dataset("fashion-mnist", "train", root=synthetic_root).subset(range(64))
    model = create_model("small_cnn", in_channels=1, num_classes=10, width=4)
    with torch.no_grad():
        model.classifier.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="learning rate"):
        train(model, data, TrainConfig(epochs=1, batch_size=32), seed=0, progress=False)
