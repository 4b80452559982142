"""Label-conditional spectral signatures on planted features: the poisoned label's top direction
is the planted shift, its energy ratio stands out, and the separation is the planted one."""
import math

import pytest
import torch

from eigenguard.analysis.signatures import label_signatures, top_direction


def planted(shift: float, *, per_label=200, labels=5, width=40, poisoned_share=0.5, seed=0):
    """Isotropic unit-variance features, ``per_label`` rows per label; in label 2 the first
    ``poisoned_share`` of the rows are moved by ``shift`` along one fixed unit direction."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(labels * per_label, width, generator=g, dtype=torch.float64)
    label_of = torch.arange(labels).repeat_interleave(per_label)
    direction = torch.randn(width, generator=g, dtype=torch.float64)
    direction /= direction.norm()
    poisoned = torch.zeros(len(features), dtype=torch.bool)
    poisoned[2 * per_label: 2 * per_label + int(poisoned_share * per_label)] = True
    features[poisoned] += shift * direction
    return features, label_of, poisoned, direction


def test_the_poisoned_label_stands_out_and_the_separation_is_the_planted_shift():
    features, labels, poisoned, _ = planted(shift=6.0)
    found = label_signatures(features, labels, poisoned)
    assert found["poison_label"] == 2 and found["poison_label_has_max_ratio"]
    # half the label moved by 6: variance along the shift 1 + 6²/4 = 10 against the noise's
    # largest of about (1 + sqrt(40/200))² = 2.1
    assert found["poison_label_ratio"] > 3.5
    assert found["max_other_ratio"] < 1.8
    # the poisoned rows sit the planted 6 standard deviations from the clean ones (± noise)
    assert found["separation"] == pytest.approx(6.0, abs=0.6)
    # 6 sd apart: the two-means cut halfway misassigns a row with probability Φ(-3) = 0.13%
    assert found["split_accuracy"] > 0.99


def test_without_a_shift_nothing_stands_out():
    features, labels, poisoned, _ = planted(shift=0.0)
    found = label_signatures(features, labels, poisoned)
    assert max(found["ratios"].values()) < 1.8
    assert found["separation"] < 0.6
    # no shift: the cut splits the label at random with respect to the poisoned half
    assert found["split_accuracy"] < 0.6


def test_two_means_cuts_between_two_planted_groups_of_unequal_size():
    from eigenguard.analysis.signatures import two_means_split
    g = torch.Generator().manual_seed(0)
    coordinates = torch.cat([torch.randn(300, generator=g), 8 + torch.randn(100, generator=g)])
    upper = two_means_split(coordinates)
    assert int(upper[:300].sum()) == 0 and int(upper[300:].sum()) == 100
    assert not two_means_split(torch.zeros(5)).any()  # no spread: nothing above the cut


def test_the_top_direction_is_the_shift_and_the_ratio_is_exact_for_two_directions():
    features, _, poisoned, direction = planted(shift=6.0)
    rows = features[400:600]
    coordinates, _ = top_direction(rows)
    centred = rows - rows.mean(0)
    # the coordinates are the rows' projections on a unit vector close to the planted direction
    fitted = torch.linalg.lstsq(centred, coordinates.unsqueeze(1)).solution.flatten()
    assert abs(float(fitted / fitted.norm() @ direction)) > 0.95
    two = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    assert top_direction(two)[1] == pytest.approx(9.0)


def test_no_poison_given_gives_ratios_only_and_bad_labels_are_refused():
    features, labels, _, _ = planted(shift=6.0)
    assert set(label_signatures(features, labels)) == {"ratios"}
    assert set(label_signatures(features, labels)["ratios"]) == {0, 1, 2, 3, 4}
    with pytest.raises(ValueError, match="one label per row"):
        label_signatures(features, labels[:10])
    few = label_signatures(features[:2], labels[:2], torch.tensor([True, False]))
    assert few["ratios"] == {} and math.isnan(few["separation"])
