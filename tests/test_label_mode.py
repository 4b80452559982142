"""All-to-one and all-to-all poisoning: labels, metrics with known answers, the run key, the CLI."""
import pytest
import torch
from torch import nn

from eigenguard.attacks import create_attack
from eigenguard.attacks.base import Attack
from eigenguard.cli import build_parser, config_from_args, main
from eigenguard.data import ImageSet
from eigenguard.defenses import create_defense
from eigenguard.evaluate import (TriggeredTestSet, evaluate, mixed_companions, naive_mixed_logits,
                                 triggered_test_set)
from eigenguard.experiment import RunConfig, SetupConfig, execute
from eigenguard.guarded_eval import mixed_logits
from eigenguard.layer import guard
from eigenguard.models import create_model
from eigenguard.train import TrainConfig


def image_set(n=300, seed=0):
    """Labels written into pixel (0, 0) so a hand-made model can read them back; no pixel is
    white, so the BadNets corner is the only white patch."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = torch.randint(0, 100, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    images[:, 0, 0, 0] = (labels * 20).to(torch.uint8)
    return ImageSet(images, labels, tuple(map(str, range(10))), (0.0,), (1.0,), "coded")


class Stub(nn.Module):
    """Reads the coded label y; on a triggered image (white bottom-right corner) predicts
    ``(y + shift) mod 10``, on a clean one y."""

    def __init__(self, shift):
        super().__init__()
        self.shift = shift

    def forward(self, x):
        label = (x[:, 0, 0, 0] * 255 / 20).round().long()
        triggered = x[:, 0, -3:, -3:].flatten(1).min(1).values > 0.99
        label = torch.where(triggered, (label + self.shift) % 10, label)
        return nn.functional.one_hot(label, 10).float()


class ToZero(nn.Module):
    """Reads the coded label; sends every triggered image to class 0 (an all-to-one backdoor)."""

    def forward(self, x):
        label = (x[:, 0, 0, 0] * 255 / 20).round().long()
        triggered = x[:, 0, -3:, -3:].flatten(1).min(1).values > 0.99
        label = torch.where(triggered, torch.zeros_like(label), label)
        return nn.functional.one_hot(label, 10).float()


# -- poisoning ---------------------------------------------------------------------------------

def test_all_to_all_relabels_every_poisoned_sample_to_the_next_class():
    train = image_set(400)
    poisoned = create_attack("badnets").poison(train, 0.25, 0, seed=3, label_mode="all-to-all")
    idx = poisoned.poison_indices
    assert len(idx) == 100
    assert torch.equal(poisoned.data.labels[idx], (train.labels[idx] + 1) % 10)
    assert poisoned.flipped_labels == 100  # every label changes, the target class's too
    assert (train.labels[idx] == 0).any() and (train.labels[idx] == 9).any()  # 9 -> 0 wraps
    clean = ~poisoned.is_poisoned
    assert torch.equal(poisoned.data.labels[clean], train.labels[clean])
    assert torch.equal(poisoned.data.images[clean], train.images[clean])
    assert (poisoned.data.images[idx][..., -3:, -3:] == 255).all()
    # every class is eligible whatever the pool: the same draw from either pool
    other = create_attack("badnets").poison(train, 0.25, 0, seed=3, pool="non-target",
                                            label_mode="all-to-all")
    assert torch.equal(other.poison_indices, idx)


def test_all_to_one_poisoning_is_unchanged():
    train = image_set(400)
    default = create_attack("badnets").poison(train, 0.1, 2, seed=7)
    explicit = create_attack("badnets").poison(train, 0.1, 2, seed=7, label_mode="all-to-one")
    assert torch.equal(default.poison_indices, explicit.poison_indices)
    assert torch.equal(default.data.labels, explicit.data.labels)
    assert torch.equal(default.data.images, explicit.data.images)
    idx = default.poison_indices
    assert (default.data.labels[idx] == 2).all()
    # flipped_labels: as before, the poisoned samples not already in the target class
    assert default.flipped_labels == int((train.labels[idx] != 2).sum()) < len(idx)


def test_a_clean_label_attack_has_no_all_to_all_mode():
    train = image_set(400)
    with pytest.raises(ValueError, match="clean-label attack.*all-to-one"):
        create_attack("sig").poison(train, 0.01, 0, seed=0, label_mode="all-to-all")
    with pytest.raises(ValueError, match="clean-label"):
        SetupConfig(attack="sig", label_mode="all-to-all").validate()
    with pytest.raises(ValueError, match=r"label_mode must be one of \('all-to-one', "
                                         r"'all-to-all'\)"):
        create_attack("badnets").poison(train, 0.1, 0, seed=0, label_mode="one-to-one")


def test_label_mode_is_validated_before_the_data_loads():
    with pytest.raises(ValueError, match=r"label_mode must be one of \('all-to-one', "
                                         r"'all-to-all'\).*'sideways'"):
        RunConfig(label_mode="sideways").validate()
    RunConfig(label_mode="all-to-all").validate()


class OldStylePoison(Attack):
    """An attack whose poison() override predates label_mode and does not forward it."""

    def settings(self):
        return {}

    def apply(self, images):
        return images.clone()

    def poison(self, train, ratio, target, seed, pool="all"):
        return super().poison(train, ratio, target, seed, pool)


def test_an_attack_that_cannot_take_the_label_mode_is_refused(monkeypatch):
    from eigenguard import experiment

    monkeypatch.setattr(SetupConfig, "build_attack", lambda self: OldStylePoison())
    with pytest.raises(ValueError, match="without a label_mode argument.*all-to-one only"):
        SetupConfig(label_mode="all-to-all").validate()
    SetupConfig().validate()  # all-to-one: called as before
    poisoned = experiment.poison_training_set(OldStylePoison(), SetupConfig(), image_set(50))
    assert len(poisoned.poison_indices) == 5


# -- evaluation --------------------------------------------------------------------------------

def test_the_all_to_all_triggered_set_holds_every_image_with_its_own_target():
    test = image_set(300)
    triggered = triggered_test_set(test, create_attack("badnets"), 0, label_mode="all-to-all")
    assert len(triggered) == 300 and torch.equal(triggered.source_indices, torch.arange(300))
    assert torch.equal(triggered.targets, (test.labels + 1) % 10)
    assert triggered.target is None
    head = triggered.select(slice(0, 5))
    assert torch.equal(head.targets, triggered.targets[:5]) and len(head) == 5
    # all-to-one: the non-target images, every target the target
    one = triggered_test_set(test, create_attack("badnets"), 3)
    assert torch.equal(one.source_indices, (test.labels != 3).nonzero().flatten())
    assert one.target == 3 and (one.targets == 3).all()
    # built by hand as before (positional, an int target): the targets follow
    by_hand = TriggeredTestSet(one.images, one.labels, one.source_indices, 3)
    assert (by_hand.targets == 3).all()


@pytest.mark.parametrize("protocol", ["triggered", "mixed", "single", "running"])
def test_all_to_all_asr_and_ra_have_known_answers_under_every_protocol(protocol):
    test = image_set(300)
    attack = create_attack("badnets")
    obeys = evaluate(Stub(shift=1), test, attack, 0, protocol, label_mode="all-to-all",
                     progress=False)
    assert (obeys.acc, obeys.asr, obeys.ra) == (1.0, 1.0, 0.0)
    assert (obeys.n_triggered, obeys.n_clean) == (300, 300)  # the target class is included
    ignores = evaluate(Stub(shift=0), test, attack, 0, protocol, label_mode="all-to-all",
                       progress=False)
    assert (ignores.acc, ignores.asr, ignores.ra) == (1.0, 0.0, 1.0)
    # a model that always sends a triggered image to class 0 (all-to-one behaviour) hits the
    # all-to-all target only for class 9 (9 + 1 = 0 mod 10)
    to_zero = evaluate(ToZero(), test, attack, 0, protocol, label_mode="all-to-all",
                       progress=False)
    assert to_zero.asr == pytest.approx(int((test.labels == 9).sum()) / 300)
    assert to_zero.ra == pytest.approx(int((test.labels == 0).sum()) / 300)


def test_all_to_one_numbers_are_unchanged():
    """The same answers as test_evaluate's perfect backdoored model, through every protocol."""
    test = image_set(300)
    attack = create_attack("badnets")
    non_target = int((test.labels != 0).sum())
    for protocol in ("triggered", "mixed", "single", "running"):
        result = evaluate(ToZero(), test, attack, 0, protocol, progress=False)
        assert (result.acc, result.asr, result.ra) == (1.0, 1.0, 0.0)
        assert result.n_triggered == non_target
        # the y + 1 model scores in all-to-one only where y + 1 is the target: class 9
        shifted = evaluate(Stub(shift=1), test, attack, 0, protocol, progress=False)
        assert shifted.asr == pytest.approx(int((test.labels == 9).sum()) / non_target)
        assert shifted.ra == 0.0


def test_guarded_mixed_protocol_scores_each_image_against_its_own_target():
    """The EigenGuard defense's fast mixed path (guarded_eval) on the all-to-all triggered set:
    its logits equal the protocol's definition (checked on the first images; the definition
    costs a full batch per image), and ASR / RA score them against each image's target."""
    test = image_set(200)
    attack = create_attack("badnets")
    torch.manual_seed(0)
    model = create_model("small_cnn", in_channels=1, num_classes=10, width=8)
    guard(model, after="block2", k=8, eval_mode="batch")
    model.eval()
    defense = create_defense("eigenguard", k=8, after="block2", eval_mode="batch")
    result = evaluate(model, test, attack, 0, "mixed", defense=defense, progress=False, seed=2,
                      label_mode="all-to-all")
    triggered = triggered_test_set(test, attack, 0, label_mode="all-to-all")
    fast = mixed_logits(model, test, triggered, seed=2, progress=False)
    head = triggered.select(slice(0, 6))
    slow = naive_mixed_logits(model, test, head, mixed_companions(triggered, 200, 2)[:6])
    assert torch.allclose(fast[:6], slow, atol=1e-4, rtol=1e-4)
    predicted = fast.argmax(1)
    assert result.asr == (predicted == triggered.targets).double().mean().item()
    assert result.ra == (predicted == triggered.labels).double().mean().item()
    assert result.n_triggered == 200


# -- the run key, the CLI, a whole run ---------------------------------------------------------

def test_the_default_label_mode_keeps_stored_runs_keys():
    # Guards the keys of runs stored before label_mode existed: these values were computed with
    # the code before label_mode was added (RunConfig() with the fingerprint "fixed-fingerprint").
    # If this fails, every stored run would be recomputed under a new key.
    assert RunConfig().key("fixed-fingerprint") == "e4d716502e90a045"
    assert RunConfig().setup_key("fixed-fingerprint") == "4325f0db36a9eae7"
    assert "label_mode" not in RunConfig().resolved()
    assert RunConfig(label_mode="all-to-one").key("d") == RunConfig().key("d")
    other = RunConfig(label_mode="all-to-all")
    assert other.resolved()["label_mode"] == "all-to-all"
    assert other.key("d") != RunConfig().key("d")
    assert other.setup_key("d") != RunConfig().setup_key("d")  # another backdoored model
    assert RunConfig.from_dict(other.resolved()).key("d") == other.key("d")
    assert RunConfig.from_dict(RunConfig().resolved()).label_mode == "all-to-one"


def test_cli_label_mode_flag():
    def parsed(*flags):
        return config_from_args(build_parser().parse_args(["run", *flags]))

    assert parsed().label_mode == "all-to-one"
    assert parsed("--label-mode", "all-to-all").label_mode == "all-to-all"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--label-mode", "one-to-all"])


def test_cli_refuses_a_clean_label_attack_all_to_all(tmp_path, capsys):
    code = main(["run", "--attack", "sig", "--label-mode", "all-to-all", "--store",
                 str(tmp_path / "r.sqlite"), "--data-root", str(tmp_path / "nowhere")])
    assert code == 2 and "clean-label" in capsys.readouterr().err


def test_an_all_to_all_run_executes_and_records_its_metrics(synthetic_root):
    config = RunConfig(model="small_cnn", width=8, poison_ratio=0.1, label_mode="all-to-all",
                       train=TrainConfig(epochs=1, batch_size=32, lr=0.1, augment=False))
    result = execute(config, data_root=synthetic_root, progress=False, log=lambda *a: None)
    assert result.status == "finished"
    rows = {(r["split"], r["metric"]): r["value"] for r in result.metrics
            if r.get("protocol") == "triggered"}
    assert rows[("test", "n_triggered")] == rows[("test", "n_clean")] == 300  # every image
    assert rows[("validation", "n_triggered")] == 200
    for split in ("test", "validation"):
        for metric in ("acc", "asr", "ra"):
            assert 0.0 <= rows[(split, metric)] <= 1.0
        assert rows[(split, "asr")] + rows[(split, "ra")] <= 1.0  # disjoint: target != label
    assert result.extra["poisoned"] == result.extra["flipped_labels"] == 170
    assert result.key == config.key(result.extra["data_fingerprint"])
