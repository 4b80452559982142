"""LabelSieve on planted features: it flags the group of a label that is made of other classes
(dirty-label poison), nothing in clean data, and not clean-label poison (its stated blind spot);
it is the identity at evaluation and stops the flagged rows' gradient."""
import math
from types import SimpleNamespace

import pytest
import torch

from eigenguard.experiment import RunConfig
from eigenguard.models import create_model
from eigenguard.sieve import HandLabels, LabelSieve, find_sieves, sieve

CLASSES, WIDTH, BATCH = 10, 32, 128
#: the sieve defense's defaults before validation chose spread / unlearn / plain (and the row
#: rule "either", and the second tier)
FIRST_DEFAULTS = {"statistic": "mixing", "action": "hold", "view": "augmented",
                  "row_rule": "foreign", "level_threshold": None}


def planted_batches(steps: int, *, poison: float = 0.1, shift: float = 1.0, clean_label=False,
                    seed: int = 0):
    """Batches of ``BATCH`` rows: class centres 3 apart in a ``WIDTH``-dim space plus unit noise.
    A ``poison`` share of the rows gets ``shift`` added on every axis and label 0; dirty-label
    rows keep their other class's content, clean-label rows are class-0 content."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, WIDTH, generator=g) * 3
    for _ in range(steps):
        y = torch.randint(0, CLASSES, (BATCH,), generator=g)
        poisoned = (torch.rand(BATCH, generator=g) < poison) & (y != 0)
        if clean_label:
            y = torch.where(poisoned, torch.zeros_like(y), y)
        x = centres[y] + torch.randn(BATCH, WIDTH, generator=g)
        x[poisoned] += shift
        yield x.view(BATCH, WIDTH, 1, 1), torch.where(poisoned, torch.zeros_like(y), y), poisoned


def run_layer(layer, batches, skip: int = 40):
    """Feed the batches in training mode; (true positives, poisoned, false positives, clean)
    counted after ``skip`` batches."""
    layer.train()
    counts = [0, 0, 0, 0]
    for step, (x, y, poisoned) in enumerate(batches):
        layer.set_labels(y)
        layer(x)
        if step >= skip:
            flagged = layer.flagged_last
            counts[0] += int((flagged & poisoned).sum())
            counts[1] += int(poisoned.sum())
            counts[2] += int((flagged & ~poisoned).sum())
            counts[3] += int((~poisoned).sum())
    return counts


def test_dirty_label_poison_is_flagged_and_nothing_else():
    layer = LabelSieve(CLASSES, pool=1, warmup=20)
    tp, poisoned, fp, clean = run_layer(layer, planted_batches(200))
    assert tp / poisoned > 0.98 and fp / clean < 0.005  # measured 1.0 and 0.0
    scores = layer.mixing_scores()
    # the poisoned side of label 0 spreads over the other classes like the whole set (about 1);
    # every clean group, one class each, far less (measured 0.27-0.30)
    poison_side = int(scores[0].argmax())
    assert scores[0, poison_side] > 0.9
    others = torch.cat([scores[0, 1 - poison_side].view(1), scores[1:].flatten()])
    assert float(others.max()) < 0.5
    assert layer.flagged_sides().tolist() == [poison_side] + [-1] * (CLASSES - 1)


def test_clean_data_flags_nothing():
    layer = LabelSieve(CLASSES, pool=1, warmup=20)
    _, _, fp, clean = run_layer(layer, planted_batches(150, poison=0.0))
    assert fp == 0 and clean > 0
    assert (layer.flagged_sides() == -1).all()


def test_clean_label_poison_is_not_seen():
    """Target-class content with a trigger: no group of any label is made of other classes."""
    layer = LabelSieve(CLASSES, pool=1, warmup=20)
    tp, poisoned, fp, _ = run_layer(layer, planted_batches(150, clean_label=True))
    assert poisoned > 0 and tp == 0 and fp == 0


def test_nothing_is_flagged_during_warmup():
    layer = LabelSieve(CLASSES, pool=1, warmup=30)
    layer.train()
    for step, (x, y, _) in enumerate(planted_batches(30)):
        layer.set_labels(y)
        layer(x)
        assert not layer.flagged_last.any(), step


def test_flagged_rows_are_one_constant_and_pass_no_gradient():
    layer = LabelSieve(CLASSES, pool=1, warmup=5)
    batches = list(planted_batches(60))
    run_layer(layer, batches[:-1])
    x, y, poisoned = batches[-1]
    x = x.clone().requires_grad_(True)
    layer.set_labels(y)
    out = layer(x)
    flagged = layer.flagged_last
    assert flagged.any() and (flagged == poisoned).float().mean() > 0.95
    assert torch.equal(out[~flagged], x[~flagged])  # every other row passes unchanged
    assert (out[flagged] == out[flagged][0]).all()  # label 0's other side's running mean
    out.sum().backward()
    assert (x.grad[flagged] == 0).all() and (x.grad[~flagged] == 1).all()


def test_evaluation_mode_is_the_identity_and_needs_no_labels():
    layer = LabelSieve(CLASSES, pool=1, warmup=5)
    run_layer(layer, planted_batches(30))
    layer.eval()
    x = torch.randn(7, WIDTH, 1, 1)
    assert layer(x) is x


def test_bad_settings_and_inputs_are_named():
    for settings, word in [({"classes": 2}, "classes"), ({"pool": 0}, "pool"),
                           ({"momentum": 0}, "momentum"), ({"threshold": math.nan}, "threshold"),
                           ({"warmup": -1}, "warmup"), ({"patience": 0}, "patience"),
                           ({"margin": 0.9}, "margin"), ({"statistic": "kurtosis"}, "statistic"),
                           ({"row_margin": 0}, "row_margin"), ({"row_margin": 1.5}, "row_margin"),
                           ({"row_rule": "kmeans"}, "row_rule")]:
        with pytest.raises(ValueError, match=word):
            LabelSieve(**{"classes": CLASSES, **settings})
    layer = LabelSieve(CLASSES).train()
    with pytest.raises(RuntimeError, match="HandLabels"):
        layer(torch.randn(4, 3, 8, 8))
    layer.set_labels(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="2 labels for a batch of 4"):
        layer(torch.randn(4, 3, 8, 8))
    layer.set_labels(torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        layer(torch.randn(4, 3, 8, 8))
    layer.set_labels(torch.tensor([0, 1, 2, 3]))
    with pytest.raises(FloatingPointError, match="non-finite"):
        layer(torch.full((4, 3, 8, 8), math.nan))


def test_pooling_keeps_channels_and_a_coarse_grid():
    layer = LabelSieve(CLASSES, pool=4)
    rows = layer.pooled(torch.randn(5, 3, 28, 28))
    assert rows.shape == (5, 3 * 16) and rows.dtype == torch.float64
    assert layer.pooled(torch.randn(5, 3, 2, 2)).shape == (5, 3 * 4)  # smaller maps: as they are
    assert layer.pooled(torch.randn(5, 12)).shape == (5, 12)  # flat features: as they are


def test_a_sieved_model_trains_with_the_hook_and_saves_no_sieve_state():
    model = create_model("small_cnn", in_channels=1, num_classes=CLASSES, width=4)
    plain = model.state_dict()
    layer = sieve(model, "block1", CLASSES, warmup=1)
    assert find_sieves(model) == [layer]
    assert set(model.state_dict()) == set(plain)  # checkpoints load with or without it
    hand = HandLabels(find_sieves(model))
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, CLASSES, (32,))
    model.train()
    for layer_ in hand.layers:
        layer_.set_labels(y)
    assert model(x).shape == (32, CLASSES)
    with pytest.raises(ValueError, match="already follows"):
        sieve(model, "block1", CLASSES)
    with pytest.raises(ValueError, match="at least one"):
        HandLabels([])


def test_a_flagged_label_stays_suspect_and_its_clean_rows_pass():
    """The poison's score falls as a network learns it, so a label once flagged stays suspect;
    inside it only rows nearer another label's mean than the label's clean side are flagged."""
    layer = LabelSieve(CLASSES, pool=1, warmup=20)
    run_layer(layer, planted_batches(80))
    assert layer.suspect.tolist() == [True] + [False] * (CLASSES - 1)
    _, _, fp, clean = run_layer(layer, planted_batches(60, poison=0.0, seed=1), skip=0)
    assert layer.suspect[0] and int(layer.suspect.sum()) == 1
    assert fp / clean < 0.01  # class-0 rows are nearest their own clean side
    layer.reset()
    assert not layer.suspect.any()


def test_a_label_becomes_suspect_only_after_patience_batches_above_the_threshold():
    layer = LabelSieve(CLASSES, pool=1, warmup=0, patience=25)
    layer.train()
    streaks = []
    for x, y, _ in planted_batches(60):
        layer.set_labels(y)
        layer(x)
        streaks.append((int(layer.streak[0]), bool(layer.suspect[0])))
    became = next(step for step, (_, suspect) in enumerate(streaks) if suspect)
    assert streaks[became][0] == 25 and all(streak < 25 for streak, _ in streaks[:became])
    assert not layer.suspect[1:].any()


def test_one_label_at_most_and_only_when_it_leads_by_the_margin():
    """Two labels poisoned alike (all-to-all-like): neither leads the other by the margin, so
    none is suspect, the stated limit of an all-to-one detector; with margin 1 the leader is,
    and it alone."""
    strict = LabelSieve(CLASSES, pool=1, warmup=10, margin=1.2)
    run_layer(strict, two_targets(120))
    scores = strict.mixing_scores().nan_to_num(0).max(1).values
    assert scores[0] > 0.7 and scores[1] > 0.7 and not strict.suspect.any()
    loose = LabelSieve(CLASSES, pool=1, warmup=10, margin=1.0)
    run_layer(loose, two_targets(120))
    assert int(loose.suspect.sum()) == 1 and bool(loose.suspect[:2].any())


def two_targets(steps, seed=0):
    """Poison split between labels 0 and 1: both spread high, neither leads by much."""
    for x, y, poisoned in planted_batches(steps, seed=seed):
        halves = torch.arange(len(y)) % 2 == 1
        yield x, torch.where(poisoned & halves, torch.ones_like(y), y), poisoned


def test_a_second_tier_suspects_a_high_level_with_a_small_lead():
    """With ``level_threshold`` a label also leads at a high score and a smaller margin (the
    case the first tier's margin misses); a level above every score changes nothing. The
    layer's own default is one tier; the defense's is two since validation chose them, and
    one-tier runs name ``level_threshold: None`` and keep their keys, whatever level margin
    they name."""
    strict = LabelSieve(CLASSES, pool=1, warmup=10, margin=1.2)
    run_layer(strict, two_targets(120))
    scores = strict.mixing_scores().nan_to_num(0).max(1).values
    top = scores.topk(2).values
    assert not strict.suspect.any() and float(top[0] / top[1]) < 1.2
    tiered = LabelSieve(CLASSES, pool=1, warmup=10, margin=1.2, level_threshold=0.7,
                        level_margin=1.0)
    run_layer(tiered, two_targets(120))
    assert int(tiered.suspect.sum()) == 1 and bool(tiered.suspect[:2].any())
    too_high = LabelSieve(CLASSES, pool=1, warmup=10, margin=1.2,
                          level_threshold=float(top[0]) + 1, level_margin=1.0)
    run_layer(too_high, two_targets(120))
    assert not too_high.suspect.any()
    assert LabelSieve(CLASSES).level_threshold is None
    one_tier = RunConfig(defense="sieve", defense_settings={"level_threshold": None})
    assert one_tier.key("fixed-fingerprint") == "33deb358655ff87d"  # the key before the setting
    assert RunConfig(defense="sieve", defense_settings={"level_threshold": None,
                                                        "level_margin": 1.5}).key(
        "fixed-fingerprint") == "33deb358655ff87d"
    assert one_tier.build_defense().label() == "sieve(level_threshold=None)"
    two_tiers = RunConfig(defense="sieve").build_defense()
    assert (two_tiers.level_threshold, two_tiers.level_margin) == (0.75, 1.1)
    assert RunConfig(defense="sieve").key("d") != one_tier.key("d")
    with pytest.raises(ValueError, match="level_threshold"):
        LabelSieve(CLASSES, level_threshold=math.nan)
    with pytest.raises(ValueError, match="level_margin"):
        LabelSieve(CLASSES, level_threshold=0.7, level_margin=0.9)


@pytest.mark.parametrize("shift", [1.0, 10.0])
def test_the_spread_statistic_flags_poison_made_of_every_other_class(shift):
    """The poisoned side's rows, their common offset (the trigger's shift, small or large) taken
    away, are nearest every other label's mean about equally; a clean class's rows are nearest
    a few neighbours."""
    layer = LabelSieve(CLASSES, pool=1, warmup=20, statistic="spread")
    tp, poisoned, fp, clean = run_layer(layer, planted_batches(200, shift=shift))
    assert tp / poisoned > 0.95 and fp / clean < 0.01  # measured 1.0 and 0.0
    scores = layer.spread_scores()
    poison_side = int(scores[0].argmax())
    assert scores[0, poison_side] > 0.9  # measured 0.99: all nine labels
    others = torch.cat([scores[0, 1 - poison_side].view(1), scores[1:].flatten()])
    assert float(others.max()) < 0.7  # measured 0.12 (shift 1) and 0.52 (shift 10)
    assert layer.flagged_sides().tolist() == [poison_side] + [-1] * (CLASSES - 1)


def test_the_spread_statistic_flags_nothing_in_clean_or_clean_label_data():
    for batches in (planted_batches(150, poison=0.0), planted_batches(150, clean_label=True)):
        layer = LabelSieve(CLASSES, pool=1, warmup=20, statistic="spread")
        tp, _, fp, _ = run_layer(layer, batches)
        assert tp == 0 and fp == 0 and not layer.suspect.any()


def test_the_defense_defaults_are_the_validation_choice_and_the_first_keep_their_key():
    """Plain ``sieve`` is now the setting validation chose; its runs share their keys with the
    runs that named it (docs/SIEVE.md), and runs at the first defaults keep theirs."""
    chosen = {"statistic": "spread", "action": "unlearn", "view": "plain", "row_rule": "either",
              "level_threshold": 0.75, "level_margin": 1.1}
    default = RunConfig(defense="sieve")
    assert default.resolved() == RunConfig(defense="sieve", defense_settings=chosen).resolved()
    assert default.key("d") == RunConfig(defense="sieve", defense_settings=chosen).key("d")
    first = RunConfig(defense="sieve", defense_settings=FIRST_DEFAULTS)
    assert first.key("fixed-fingerprint") == "5353a4ca885f76da"
    assert first.build_defense().label() == ("sieve(statistic=mixing, action=hold, "
                                             "view=augmented, row_rule=foreign, "
                                             "level_threshold=None)")
    assert default.build_defense().label() == "sieve"
    # the defaults before the row rule (spread, plain, unlearn, the foreign rule) keep the key
    # their runs were stored under (computed with the code before the row rule was chosen)
    second = RunConfig(defense="sieve", defense_settings={"row_rule": "foreign",
                                                         "level_threshold": None})
    assert second.key("fixed-fingerprint") == "091a5542775c3b51"
    assert second.build_defense().label() == "sieve(row_rule=foreign, level_threshold=None)"


def test_the_statistic_setting_keeps_stored_sieve_runs_keys():
    # Guards the keys of the sieve runs stored before the setting existed: the value was
    # computed with the code before it (RunConfig with the fingerprint "fixed-fingerprint").
    default = RunConfig(defense="sieve", defense_settings=FIRST_DEFAULTS)
    assert default.key("fixed-fingerprint") == "5353a4ca885f76da"
    assert not {"statistic", "row_margin"} & set(default.resolved()["defense_settings"])
    spread = RunConfig(defense="sieve", defense_settings={**FIRST_DEFAULTS,
                                                          "statistic": "spread"})
    assert spread.resolved()["defense_settings"]["statistic"] == "spread"
    assert spread.key("d") != default.key("d")
    assert RunConfig.from_dict(spread.resolved()).key("d") == spread.key("d")


def test_a_row_margin_flags_fewer_rows_of_the_suspect_label():
    """Rows of the suspect label that lie between its clean side and another label (planted:
    clean class-0 rows moved 55% of the way to class 1's centre) are flagged at row_margin 1 and
    mostly kept at 0.5; the poison, far nearer other labels, is flagged either way."""
    def with_borderline_rows(steps):
        g = torch.Generator().manual_seed(5)
        centres = torch.randn(CLASSES, WIDTH, generator=torch.Generator().manual_seed(0)) * 3
        for x, y, poisoned in planted_batches(steps):
            borderline = (y == 0) & ~poisoned & (torch.rand(len(y), generator=g) < 0.3)
            flat = x.view(len(y), WIDTH)
            flat[borderline] += 0.55 * (centres[1] - centres[0])
            yield flat.view_as(x), y, poisoned
    counts = {}
    for row_margin in (1.0, 0.5):
        layer = LabelSieve(CLASSES, pool=1, warmup=20, row_margin=row_margin)
        counts[row_margin] = run_layer(layer, with_borderline_rows(200))
    (tp1, poisoned, fp1, clean), (tp2, _, fp2, _) = counts[1.0], counts[0.5]
    assert tp1 == tp2 == poisoned  # measured: every poisoned row, either way
    assert fp1 > 400 and fp2 < fp1 / 5  # measured 562 and 52 (of 18,727 clean rows)


def look_alike_batches(steps: int, shift: float = 4.0):
    """planted_batches' setting, but class 6's centre a tenth of the way from class 0's (a
    class that resembles the target's, as shirts do T-shirts) and a larger trigger offset."""
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(CLASSES, WIDTH, generator=g) * 3
    centres[6] = centres[0] + 0.1 * (centres[6] - centres[0])
    for _ in range(steps):
        y = torch.randint(0, CLASSES, (BATCH,), generator=g)
        poisoned = (torch.rand(BATCH, generator=g) < 0.1) & (y != 0)
        x = centres[y] + torch.randn(BATCH, WIDTH, generator=g)
        x[poisoned] += shift
        yield x.view(BATCH, WIDTH, 1, 1), torch.where(poisoned, torch.zeros_like(y), y), \
            poisoned, y


def test_the_side_rule_flags_the_look_alike_class_the_foreign_rule_misses():
    """A triggered image of a class that resembles the target's lies about as near the label's
    clean side as its own class's mean, so the foreign rule flags only part of it, and flags
    clean rows of the label that lie near that class instead; the triggered image carries the
    poison side's offset, so the side rule flags it, and keeps the clean rows; ``either`` flags
    what one or the other flags; ``shifted`` takes the trigger's estimated offset off each row
    before comparing it with the other labels."""
    counts = {}
    for rule in ("foreign", "side", "either", "shifted"):
        layer = LabelSieve(CLASSES, pool=1, warmup=20, statistic="spread",
                           row_rule=rule).train()
        look_alike = [0, 0]  # poisoned class-6 rows flagged, all of them
        others, clean_flagged = [0, 0], 0
        for step, (x, y, poisoned, true) in enumerate(look_alike_batches(200)):
            layer.set_labels(y)
            layer(x)
            if step < 40:
                continue
            flagged = layer.flagged_last
            mine = poisoned & (true == 6)
            look_alike[0] += int((flagged & mine).sum())
            look_alike[1] += int(mine.sum())
            others[0] += int((flagged & poisoned & ~mine).sum())
            others[1] += int((poisoned & ~mine).sum())
            clean_flagged += int((flagged & ~poisoned).sum())
        assert layer.flagged_sides()[0] >= 0  # label 0 found either way
        counts[rule] = (look_alike[0] / look_alike[1], others[0] / others[1], clean_flagged)
    foreign, side = counts["foreign"], counts["side"]
    assert side[0] > 0.98 and foreign[0] < 0.5  # measured 1.0 and 0.15
    assert side[1] > 0.98 and foreign[1] > 0.98  # the other classes' poison: both (1.0)
    # clean rows flagged (of about 20,000): the foreign rule takes the label's own rows that lie
    # near the look-alike class's mean for foreign (measured 253), the side rule none
    assert side[2] < 10 and foreign[2] > 100
    either = counts["either"]  # what one or the other flags
    assert either[0] > 0.98 and either[1] > 0.98 and either[2] >= foreign[2]
    # the foreign rule on the rows less the trigger's estimated offset: the look-alike's poison
    # becomes nearer its own class, the label's clean rows farther from the others
    shifted = counts["shifted"]  # measured 1.0, 1.0 and no clean row
    assert shifted[0] > 0.98 and shifted[1] > 0.98 and shifted[2] < foreign[2] / 2


def test_unlearning_passes_flagged_rows_and_pushes_their_label_down():
    """action="unlearn": the flagged rows pass unchanged (gradient and all), and the hook's loss
    replaces their cross-entropy by −log(1 − p(label)), bounded below by 0: at p = 0.9 it is
    log 10 = 2.30, where the plain loss was −log 0.9 = 0.105; the other rows keep theirs."""
    layer = LabelSieve(CLASSES, pool=1, warmup=5, action="unlearn", unlearn_weight=2.0)
    batches = list(planted_batches(60))
    run_layer(layer, batches[:-1])
    x, y, poisoned = batches[-1]
    layer.set_labels(y)
    out = layer(x)
    flagged = layer.flagged_last
    assert flagged.any() and (flagged == poisoned).float().mean() > 0.95
    assert torch.equal(out, x)  # nothing replaced: the loss does the work
    logits = torch.full((BATCH, CLASSES), -10.0, requires_grad=True)
    with torch.no_grad():  # each row's own label at probability 0.9
        logits[torch.arange(BATCH), y] = math.log(0.9 / 0.1 * (CLASSES - 1)) - 10.0
    losses = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    hook = HandLabels([layer])

    class Batch:
        labels, indices = y, torch.arange(BATCH)

    total = hook.loss(None, Batch, logits, losses, losses.mean())
    count = int(flagged.sum())
    expected = ((BATCH - count) * -math.log(0.9) + 2.0 * count * math.log(10)) / BATCH
    assert float(total.detach()) == pytest.approx(expected, rel=1e-4)
    total.backward()
    own = logits.grad[torch.arange(BATCH), y]
    assert (own[flagged] > 0).all() and (own[~flagged] < 0).all()  # down for flagged, up else
    assert hook.flagged_total == count
    # with the hold action the same flagged rows leave the loss as it is
    layer.action = "hold"
    plain = losses.mean()
    assert HandLabels([layer]).loss(None, Batch, logits, losses, plain) is plain


def test_relabelling_trains_flagged_rows_towards_the_best_other_label():
    """action="relabel": the flagged rows pass unchanged and their cross-entropy is taken
    against the label the logits rank first once the row's own is left out (here each row's
    label + 1, ranked second): the loss is that cross-entropy, times the weight, and its
    gradient raises that label and lowers the row's own; the other rows keep theirs."""
    layer = LabelSieve(CLASSES, pool=1, warmup=5, action="relabel", unlearn_weight=0.5)
    batches = list(planted_batches(60))
    run_layer(layer, batches[:-1])
    x, y, poisoned = batches[-1]
    layer.set_labels(y)
    assert torch.equal(layer(x), x)
    flagged = layer.flagged_last
    assert flagged.any() and (flagged == poisoned).float().mean() > 0.95
    rows = torch.arange(BATCH)
    second = (y + 1) % CLASSES
    logits = torch.zeros(BATCH, CLASSES)
    logits[rows, y] = 3.0
    logits[rows, second] = 1.0
    logits.requires_grad_(True)
    losses = torch.nn.functional.cross_entropy(logits, y, reduction="none")

    class Batch:
        labels, indices = y, rows

    total = HandLabels([layer]).loss(None, Batch, logits, losses, losses.mean())
    moved = torch.nn.functional.cross_entropy(logits.detach(), second, reduction="none")
    count = int(flagged.sum())
    expected = (losses.detach()[~flagged].sum() + 0.5 * moved[flagged].sum()) / BATCH
    assert float(total.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert float(moved[0]) > 2.0  # the second label at p ≈ 0.11: a real change of target
    total.backward()
    assert (logits.grad[rows, second][flagged] < 0).all()  # descent raises the new label
    assert (logits.grad[rows, y][flagged] > 0).all()  # and lowers the row's own
    assert (logits.grad[rows, y][~flagged] < 0).all()
    assert count < BATCH


def test_unlearning_settings_are_checked_and_keep_stored_keys():
    with pytest.raises(ValueError, match="action must be one of hold, unlearn, relabel"):
        LabelSieve(CLASSES, action="forget")
    with pytest.raises(ValueError, match="unlearn_weight must be a positive number"):
        LabelSieve(CLASSES, unlearn_weight=0)
    default = RunConfig(defense="sieve", defense_settings=FIRST_DEFAULTS)
    assert default.key("fixed-fingerprint") == "5353a4ca885f76da"  # as before the settings
    unlearn = RunConfig(defense="sieve", defense_settings={**FIRST_DEFAULTS,
                                                           "action": "unlearn"})
    assert unlearn.key("d") != default.key("d")


def test_the_bimodal_statistic_flags_the_label_split_in_two():
    """statistic="bimodal": a clean label is one Gaussian group, whose split at the mean gives
    between / within variance (2/π) / (1 − 2/π) ≈ 1.75 (measured 1.66-2.31); the poisoned label
    is its clean rows plus other classes' rows moved by the trigger (measured 19.3). With a
    threshold of 4 the layer flags every poisoned row and no clean one; on clean data nothing."""
    layer = LabelSieve(CLASSES, pool=1, warmup=20, statistic="bimodal", threshold=4.0)
    tp, poisoned, fp, _ = run_layer(layer, planted_batches(200))
    values = layer.bimodality()
    assert float(values[0]) > 10 and float(values[1:].max()) < 2.6
    assert float(values[1:].mean()) == pytest.approx(2 / math.pi / (1 - 2 / math.pi), rel=0.15)
    assert tp == poisoned and fp == 0
    clean = LabelSieve(CLASSES, pool=1, warmup=20, statistic="bimodal", threshold=4.0)
    _, _, fp, _ = run_layer(clean, planted_batches(150, poison=0.0))
    assert fp == 0 and (clean.flagged_sides() == -1).all()


def grey_set(count: int = 96) -> "ImageSet":
    from eigenguard.data import ImageSet
    g = torch.Generator().manual_seed(5)
    return ImageSet(torch.randint(0, 256, (count, 1, 28, 28), generator=g, dtype=torch.uint8),
                    torch.arange(count) % CLASSES, tuple(map(str, range(CLASSES))),
                    (0.5,), (0.25,), "grey")


def train_sieved(view: str, data) -> tuple[torch.nn.Module, LabelSieve]:
    """Two epochs of the shared loop with crops and flips, a sieve after ``block1`` that only
    measures (its warmup never ends), and the HandLabels hook."""
    from eigenguard.train import Augmentation, TrainConfig, train
    torch.manual_seed(0)
    model = create_model("small_cnn", in_channels=1, num_classes=CLASSES, width=4)
    layer = sieve(model, "block1", CLASSES, warmup=10 ** 6, view=view)
    train(model, data, TrainConfig(epochs=2, batch_size=32), seed=0,
          augmentation=Augmentation(crop_padding=2, flip=True), progress=False,
          hooks=[HandLabels([layer])])
    return model, layer


def test_the_plain_view_reads_the_unaugmented_images_and_leaves_training_unchanged():
    data = grey_set()
    plain_model, plain_layer = train_sieved("plain", data)
    augmented_model, augmented_layer = train_sieved("augmented", data)
    # the extra pass changes nothing: same weights and BatchNorm statistics, bit for bit
    for name, value in augmented_model.state_dict().items():
        assert torch.equal(plain_model.state_dict()[name], value), name
    # but the statistics read other features: the label means differ
    assert not torch.allclose(plain_layer._state["mean"], augmented_layer._state["mean"])

    # the rows handed over are the stage's features of the samples as stored, in train mode
    from eigenguard.data import normalize
    from eigenguard.train import Batch
    model, layer = plain_model, plain_layer
    model.train()
    indices = torch.arange(8)
    stored = data.images[indices].float() / 255
    batch = Batch(stored.flip(-1), data.labels[indices], indices)  # "augmented": flipped
    HandLabels([layer]).on_batch(SimpleNamespace(model=model, data=data), batch)
    handed = layer.plain_rows
    layer.eval()  # the identity, so block1's output below is the stage's own
    reference = model.block1(normalize(stored, data.mean, data.std)).detach()
    assert torch.allclose(handed, reference.flatten(1).double(), atol=1e-5)


def test_the_plain_view_needs_the_hook_and_a_known_name():
    with pytest.raises(ValueError, match="view must be one of augmented, plain"):
        LabelSieve(CLASSES, view="sideways")
    layer = LabelSieve(CLASSES, view="plain").train()
    layer.set_labels(torch.zeros(4, dtype=torch.long))
    with pytest.raises(RuntimeError, match="unaugmented images and none were handed over"):
        layer(torch.randn(4, WIDTH, 1, 1))
    default = RunConfig(defense="sieve", defense_settings=FIRST_DEFAULTS)
    assert default.key("fixed-fingerprint") == "5353a4ca885f76da"  # as before the setting
    plain = RunConfig(defense="sieve", defense_settings={**FIRST_DEFAULTS, "view": "plain"})
    assert plain.key("d") != default.key("d")


def trained_repair(shift: float, **settings) -> LabelSieve:
    layer = LabelSieve(CLASSES, warmup=20, repair=0.5, **settings)
    run_layer(layer, planted_batches(200, shift=shift))
    return layer.eval()


def test_the_repair_takes_the_trigger_offset_off_triggered_rows_at_evaluation():
    """With ``repair`` set the layer keeps the trigger's estimated offset and the suspect
    label's clean side; at evaluation a row that carries the offset has it taken off (it looks
    like its untriggered self to the layers after), a clean row passes as it is, and a row's
    output never depends on its batch."""
    layer = trained_repair(shift=3.0)
    assert layer.repair_active()
    assert float(layer.repair_outside) < 0.05  # other labels' rows at the level: measured 0.01
    offset = layer.repair_offset
    assert torch.allclose(offset, torch.full((WIDTH,), 3.0), atol=0.6)  # the planted shift
    clean, _, _ = next(planted_batches(1, poison=0.0, seed=5))
    triggered = clean + 3.0
    out_clean, out_triggered = layer(clean), layer(triggered)
    moved = (out_clean != clean).flatten(1).any(1)
    assert float(moved.double().mean()) < 0.03  # clean rows taken for triggered: measured 0.0x
    # triggered rows back within the offset's estimation error of their clean selves
    error = (out_triggered - clean).flatten(1).norm(dim=1)
    assert float((error < 0.35 * offset.norm()).double().mean()) > 0.97
    assert torch.equal(layer(triggered[3:4]), out_triggered[3:4])  # row by row


def test_the_repair_guard_turns_it_off_where_clean_rows_take_the_offset_too():
    """A trigger offset small beside the classes' own differences: some clean rows of the other
    labels reach the repair level (taking the offset off would change them). Past the guard the
    layer stays the identity at evaluation; under it, the repair acts."""
    guarded = trained_repair(shift=1.0, repair_guard=0.02)
    assert guarded.flagged_sides()[0] >= 0  # the label is found all the same
    share = float(guarded.repair_outside)  # measured 0.063 (at shift 3: 0.01)
    assert 0.03 < share < 0.2
    assert not guarded.repair_active()
    x = torch.randn(5, WIDTH, 1, 1)
    assert guarded(x) is x
    loose = trained_repair(shift=1.0, repair_guard=0.2)
    assert loose.repair_active() and not torch.equal(loose(x + 1.0), x + 1.0)


def test_the_repair_is_saved_with_the_model_and_only_with_it():
    layer = trained_repair(shift=3.0)
    state = layer.state_dict()
    assert set(state) == {"repair_offset", "repair_clean", "repair_outside"}
    fresh = LabelSieve(CLASSES, warmup=20, repair=0.5)
    fresh.load_state_dict(state)
    fresh.eval()
    x = next(planted_batches(1, poison=0.0, seed=6))[0] + 3.0
    assert torch.equal(fresh(x), layer(x))
    assert LabelSieve(CLASSES).state_dict() == {}  # no repair: checkpoints as before
    untrained = LabelSieve(CLASSES, repair=0.5).eval()  # never saw a suspect label
    assert not untrained.repair_active() and untrained(x) is x
    with pytest.raises(ValueError, match="fitted on rows of 32"):
        layer(torch.randn(2, 8, 3, 3))


def test_repair_settings_are_checked_and_keep_stored_keys():
    for settings, word in [({"repair": 0}, "repair"), ({"repair": math.nan}, "repair"),
                           ({"repair_guard": 0}, "repair_guard"),
                           ({"repair_guard": 1.5}, "repair_guard"),
                           ({"repair": 0.5, "pool": 2}, "pool to None")]:
        with pytest.raises(ValueError, match=word):
            LabelSieve(CLASSES, **settings)
    default = RunConfig(defense="sieve")
    assert default.key("d") == RunConfig(defense="sieve", defense_settings={
        "repair": None, "repair_guard": 0.7}).key("d")  # no repair: the guard means nothing
    repaired = RunConfig(defense="sieve", defense_settings={"repair": 0.5})
    assert repaired.key("d") != default.key("d")
    assert repaired.build_defense().label() == "sieve(repair=0.5)"
