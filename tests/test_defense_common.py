"""The pieces the baseline defenses share: feature reads, per-sample losses, detect-and-retrain."""
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import eigenguard
from eigenguard.data import ImageSet
from eigenguard.defenses import DefenseContext
from eigenguard.defenses.checks import check_fraction
from eigenguard.defenses.detect import DetectAndRetrain, removal_count
from eigenguard.defenses.features import (penultimate_features, per_sample_losses,
                                          stage_activations)
from eigenguard.train import model_input


def tiny_set(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8),
                    torch.arange(n) % 3, ("a", "b", "c"), (0.5,), (0.25,), "tiny")


def test_features_are_the_classifier_input_in_eval_mode():
    data = tiny_set()
    model = eigenguard.create_model("small_cnn", in_channels=1, num_classes=3, width=4).train()
    features = penultimate_features(model, data, batch_size=7)
    assert model.training  # the mode is given back
    with torch.no_grad():
        logits = model.eval()(model_input(data.images, data))
    assert features.shape == (40, model.classifier.in_features)
    torch.testing.assert_close(model.classifier(features), logits, atol=1e-5, rtol=1e-5)
    losses = per_sample_losses(model, data, batch_size=9)
    torch.testing.assert_close(losses, F.cross_entropy(logits, data.labels, reduction="none"))
    channels = stage_activations(model, data, model.stage_names[0])
    assert channels.shape[0] == 40 and channels.dim() == 2
    with pytest.raises(ValueError, match="no stage 'nowhere'"):
        stage_activations(model, data, "nowhere")


def test_removal_count_and_fraction_check():
    assert removal_count(1000, 0.1, 1.5) == 150
    assert removal_count(10, 1.0, 1.5) == 9  # never everything
    check_fraction("x", 0.5)
    for bad in (0, -0.1, 1.5, True, "0.1"):
        with pytest.raises(ValueError, match="x must be a number in"):
            check_fraction("x", bad)


@dataclass
class FlagFirst(DetectAndRetrain):
    count: int = 5

    def flag(self, model, context):
        return torch.arange(self.count)


def test_detect_and_retrain_trains_a_fresh_model_on_the_kept_samples():
    data, trained_on, scorers = tiny_set(), [], []

    def build():
        return eigenguard.create_model("small_cnn", in_channels=1, num_classes=3, width=4)

    def backdoored():
        scorers.append(build())
        return scorers[-1]

    context = DefenseContext(data, build, lambda model, subset, **kw: trained_on.append(
        (model, subset)), seed=0, device="cpu", backdoored_model=backdoored)
    result = FlagFirst(count=5).defend(context)
    assert result.flagged.tolist() == [0, 1, 2, 3, 4]
    assert result.extra == dict(removed=5, kept=35)
    (model, subset), = trained_on
    assert model is result.model and model is not scorers[0]
    assert torch.equal(subset.images, data.images[5:])
    with pytest.raises(ValueError, match="flagged every training sample"):
        FlagFirst(count=40).defend(context)
