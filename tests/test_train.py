"""The training loop learns, is deterministic under a seed, and refuses bad settings."""
import pytest
import torch

from eigenguard.data import load_dataset
from eigenguard.evaluate import predict
from eigenguard.models import create_model
from eigenguard.train import Augmentation, TrainConfig, train


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
                        seed=0, progress=False, on_epoch_end=seen.append)
        assert history[0]["epoch"] == 1
    assert len(seen) == 3


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
