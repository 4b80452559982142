"""Metrics with known answers, and the protocols against their definitions."""
import pytest
import torch
from torch import nn

from eigenguard.attacks import create_attack
from eigenguard.data import ImageSet
from eigenguard.defenses import create_defense
from eigenguard.evaluate import (batch_logits, der, detection_metrics, evaluate, mixed_companions,
                                 naive_mixed_logits, triggered_test_set)
from eigenguard.guarded_eval import guards_in_mode, mixed_logits, protocols_for
from eigenguard.layer import guard
from eigenguard.models import create_model


def coded_test_set(n=300, seed=0):
    """Labels written into pixel (0, 0) so a hand-made model can read them back."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = torch.randint(0, 100, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    images[:, 0, 0, 0] = (labels * 20).to(torch.uint8)
    return ImageSet(images, labels, tuple(map(str, range(10))), (0.0,), (1.0,), "coded")


class ReadsTheCode(nn.Module):
    """Predicts the coded label, or ``target`` when the bottom-right corner is white."""

    def __init__(self, target=0, obey_trigger=True, wrong_classes=()):
        super().__init__()
        self.target, self.obey, self.wrong = target, obey_trigger, set(wrong_classes)

    def forward(self, x):
        label = (x[:, 0, 0, 0] * 255 / 20).round().long()
        label = torch.tensor([(c + 1) % 10 if c in self.wrong else c for c in label.tolist()])
        if self.obey:
            triggered = x[:, 0, -3:, -3:].flatten(1).min(1).values > 0.99
            label = torch.where(triggered, torch.full_like(label, self.target), label)
        return nn.functional.one_hot(label, 10).float()


def test_metrics_of_a_perfect_backdoored_model():
    test = coded_test_set()
    result = evaluate(ReadsTheCode(), test, create_attack("badnets"), target=0)
    non_target = int((test.labels != 0).sum())
    assert (result.acc, result.asr, result.ra) == (1.0, 1.0, 0.0)
    assert result.n_triggered == non_target and result.n_clean == 300


def test_metrics_of_a_clean_model_with_errors():
    test = coded_test_set()
    model = ReadsTheCode(obey_trigger=False, wrong_classes={3})
    result = evaluate(model, test, create_attack("badnets"), target=0)
    n3 = int((test.labels == 3).sum())
    assert result.acc == pytest.approx(1 - n3 / 300)
    non_target = test.labels != 0
    # class 9 images predicted as (9+1)%10 = 0 only if wrong; here only class 3 is wrong: 3 -> 4
    assert result.asr == 0.0
    assert result.ra == pytest.approx(1 - n3 / int(non_target.sum()))


def test_der_follows_its_definition():
    assert der(0.90, 1.00, 0.88, 0.02) == pytest.approx((0.98 - 0.02 + 1) / 2)
    assert der(0.90, 0.50, 0.95, 0.80) == pytest.approx(0.5)  # no gain, no loss


def guarded_model(seed=0, k=8):
    torch.manual_seed(seed)
    model = create_model("small_cnn", in_channels=1, num_classes=10, width=8)
    guard(model, after="block2", k=k, eval_mode="batch")  # the batch-dependent behaviour under test
    return model.eval()


def test_mixed_protocol_equals_full_batches():
    test = coded_test_set(200)
    triggered = triggered_test_set(test, create_attack("badnets"), 0)
    model = guarded_model()
    fast = mixed_logits(model, test, triggered, seed=5, progress=False)
    companions = mixed_companions(triggered, len(test), seed=5)
    head = triggered.__class__(triggered.images[:6], triggered.labels[:6],
                               triggered.source_indices[:6], 0)
    slow = naive_mixed_logits(model, test, head, companions[:6])
    assert torch.allclose(fast[:6], slow, atol=1e-4, rtol=1e-4)
    # and the batch composition matters: the fully triggered protocol gives other logits
    full = batch_logits(model, triggered.images, test, 128)
    assert not torch.allclose(full[:6], fast[:6], atol=1e-3)


def test_mixed_companions_exclude_the_clean_original():
    test = coded_test_set(200)
    triggered = triggered_test_set(test, create_attack("badnets"), 0)
    companions = mixed_companions(triggered, len(test), seed=1)
    assert companions.shape == (len(triggered.labels), 127)
    assert not (companions == triggered.source_indices.unsqueeze(1)).any()
    assert all(len(set(row.tolist())) == 127 for row in companions)
    assert torch.equal(companions, mixed_companions(triggered, len(test), seed=1))


def test_single_protocol_equals_batches_of_one():
    test = coded_test_set(150)
    model = guarded_model()
    with guards_in_mode(model, "identity"):
        fast = batch_logits(model, test.images[:10], test, 128)
    one_by_one = torch.cat([batch_logits(model, test.images[i:i + 1], test, 1) for i in range(10)])
    assert torch.allclose(fast, one_by_one, atol=1e-5)


def test_protocols_recorded_for_guarded_models_only():
    assert protocols_for(guarded_model()) == ("triggered", "mixed", "single")  # no running stats
    trained = guarded_model().train()
    trained(torch.randn(16, 1, 28, 28))
    assert protocols_for(trained) == ("triggered", "mixed", "single", "running")
    assert protocols_for(create_model("small_cnn", in_channels=1)) == ("triggered",)
    test = coded_test_set(150)
    defense = create_defense("eigenguard", eval_mode="batch")
    single = evaluate(guarded_model(), test, create_attack("badnets"), 0, "single",
                      defense=defense)
    assert single.batch_size == 1
    with pytest.raises(ValueError, match="protocol"):
        evaluate(guarded_model(), test, create_attack("badnets"), 0, "sometimes")


def test_the_defense_puts_its_model_in_each_protocols_state():
    """Through the defense, triggered/mixed use the batch filter, single batches of one and
    running the running statistics; the mixed fast path equals its definition."""
    test = coded_test_set(200)
    attack = create_attack("badnets")
    defense = create_defense("eigenguard", k=8, after="block2", eval_mode="batch")
    model = guarded_model()
    model.train()(torch.randn(64, 1, 28, 28))  # running statistics
    model.eval()
    triggered = triggered_test_set(test, attack, 0)
    with guards_in_mode(model, "batch"):
        expected = batch_logits(model, triggered.images, test, 128).argmax(1)
    result = evaluate(model, test, attack, 0, "triggered", defense=defense, progress=False)
    assert result.asr == (expected == 0).double().mean().item()
    with guards_in_mode(model, "running"):
        expected = batch_logits(model, triggered.images, test, 128).argmax(1)
    result = evaluate(model, test, attack, 0, "running", defense=defense, progress=False)
    assert result.asr == (expected == 0).double().mean().item()
    fast = evaluate(model, test, attack, 0, "mixed", defense=defense, progress=False, seed=3)
    with guards_in_mode(model, "batch"):
        slow = evaluate(model, test, attack, 0, "mixed", progress=False, seed=3)  # definition
    assert (fast.acc, fast.asr, fast.ra) == (slow.acc, slow.asr, slow.ra)
    assert model.block2_eigenguard.eval_mode == "batch"  # restored after each protocol


def test_detection_rates_follow_their_definition():
    is_poisoned = torch.zeros(100, dtype=torch.bool)
    is_poisoned[:10] = True
    flagged = torch.tensor([0, 1, 2, 3, 50, 51])  # 4 of 10 poisoned, 2 of 90 clean
    rows = {r["metric"]: r["value"] for r in detection_metrics(flagged, is_poisoned)}
    assert rows == {"tpr": 0.4, "fpr": pytest.approx(2 / 90), "flagged": 6.0}
