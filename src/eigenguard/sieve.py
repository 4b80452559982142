"""LabelSieve: a layer that finds dirty-label poison by how its features spread over classes, and
keeps it from teaching the network while it trains.

Why (docs/ANALYSIS.md, "Label-conditional signatures over training"). All-to-one dirty-label
poison puts images of every other class under one label. At an early stage (``layer1`` or
``layer2`` of the PreAct-ResNet; the defense places it after ``layer2``, docs/SIEVE.md), from the
first epoch, the label's rows split along their top direction into two
groups, and the group holding the poison spreads over the *between-class* subspace (the span of
the other labels' mean features) about as much as the whole data set does, because it is made of
every other class; the clean group, one class, spreads over it far less, and so do both halves of
any clean label. So the statistic names the label, the side of the cut, and the rows, before the
backdoor is learned, without knowing the trigger. It needs the batch's labels: a training hook
hands them over (:class:`HandLabels`); that is the layer's one addition to the training loop.

Per training batch, on the features as they are, or averaged to ``pool`` × ``pool`` per channel
(d = C·pool²) when ``pool`` is set (pooling measurably blurs the statistic: the default is none):

1. running per-label means (exponential, ``momentum``), and each label's top direction of its
   centred covariance, by streaming power iteration (a running Σv from each batch's rows: O(B·d)
   per batch, never a d × d matrix);
2. per label, the two-means cut along that direction (running means of the coordinates on each
   side, the cut halfway between them), and per side a running mean and the running energies of
   its centred rows: in all, and inside the between-class subspace of the *other* labels' means;
3. a side's between-class fraction divided by the same fraction of the rows of the other labels:
   its *mixing score* (about 1: spread like the whole data set; a clean class: well below);
   or, with ``statistic="spread"``, over how many other labels the side's rows lie once their
   common offset is taken away (:meth:`LabelSieve.spread_scores`: it sees Blended's poison
   offline, which the mixing score does not, but did not keep its lead in training,
   docs/SIEVE.md); or, with ``statistic="bimodal"``, how far the label's two sides lie apart
   along its top direction against their own spread (:meth:`LabelSieve.bimodality`: measured
   offline, Blended's label is the most bimodal once its backdoor has formed), put on the side
   with the higher mixing score;
4. after ``warmup`` batches, the label whose higher side has had the highest mixing score, at least
   ``threshold`` and ``margin`` times the next label's, ``patience`` batches more than it did not,
   becomes suspect, for the rest of training (one label at most: all-to-one poison); with
   ``level_threshold`` set, a label also leads when its score is at least that and
   ``level_margin`` times the next label's (a second tier: a high level with a small lead, as
   poison at half the label's rows makes it, beside a lower level with a clear lead); in a suspect
   label, the rows nearer another label's running mean than the label's clean side (the
   lower-scoring one) are flagged (``row_rule="foreign"``; with ``"side"``, the rows nearer the
   label's flagged side than its clean side; with ``"either"``, both; with ``"shifted"``, the
   rows that, less the trigger's estimated offset, lie nearer another label's mean than the
   row lies to the clean side, :meth:`LabelSieve.foreign_rows`): the output rows of its samples
   are replaced by the running mean feature of the label's other side, a constant, so the
   flagged samples pass no gradient to the layers before and look like an ordinary sample of
   their label to the layers after (their loss is small). Every other row passes unchanged.
5. with ``action="unlearn"`` the flagged rows pass unchanged instead, and the hook replaces
   their cross-entropy by −log(1 − p(label)) (:func:`unlearning_loss`): they push their label's
   probability down, through every layer, so a backdoor learned before its label was flagged
   is unlearned inside the same training run (ABL's idea, with a loss bounded below).
   With ``action="relabel"`` they pass unchanged too, and the hook trains each towards the
   label the network itself ranks first among the others (:func:`relabelling_loss`): a
   triggered image of another class, once its label is suspect, teaches that class instead of
   nothing, so the training set keeps its poisoned images as clean ones (a self-training step,
   as DBD's semi-supervised stage does with its unlabelled half).

With ``view="plain"`` the statistics and the rows' judgement use the features of the batch's
*unaugmented* images instead of the training forward's (the samples are the same; only the
random crop and flip are left out): :class:`HandLabels` runs the layers before the sieve on them
once more, without gradient and with every buffer (BatchNorm's running statistics) restored, so
training is unchanged. Why (docs/SIEVE.md): the training augmentation moves clean rows towards
other labels' means, which hides the poison label among them; on the unaugmented images the
poison label led from the first batches of training on the tuning runs. It costs a forward pass
of the early layers per batch. The plain images are read from the training set, so a trigger a
training hook adds to the batch (a training-controlled attack) is not in them; the sieve's
threat model is data poisoning.

In evaluation mode the layer is the identity: it acts on training only, so it adds no cost at
test time and its output never depends on the batch. Its running state is not part of the
model's state dict (non-persistent), so checkpoints load into a model without it. With
``repair`` set it keeps one thing for the evaluation (docs/SIEVE.md, "The repair at
evaluation"): the trigger's estimated offset t (the flagged side's running mean less the mean
of the other labels' means) and the suspect label's clean side c, saved with the model; a row
whose offset from c, projected on t, reaches ``repair`` × |t| has t taken off, row by row.
Poison the row rules missed (images of the classes that look like the target's) may teach the
network part of the backdoor; taking the trigger's offset off at the layer makes the triggered
input look untriggered to the layers after it. A guard turns it off where the offset is a
direction clean rows take too (more than ``repair_guard`` of the other labels' training rows
reach the level).

Clean-label attacks (SIG, LC, Refool) put true images of the target class under their own label:
no group of any label is made of other classes, so this statistic cannot see them by design.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .data import normalize
from .layer import insert_after
from .train import Batch, TrainHook, TrainState

#: the most pooled dimensions per row (the running state holds about 4 · classes of them)
MAX_DIMS = 1 << 20

#: what scores a side of a label's cut (see :meth:`LabelSieve.side_scores`)
STATISTICS = ("mixing", "spread", "bimodal")

#: what the layer does with a flagged row (see the module docstring)
ACTIONS = ("hold", "unlearn", "relabel")

#: which features the statistics read: the training forward's, or the unaugmented images'
VIEWS = ("augmented", "plain")

#: what the repair keeps for the evaluation (persistent buffers, only with ``repair`` set)
REPAIR_BUFFERS = ("repair_offset", "repair_clean", "repair_outside")

#: how a row of the suspect label is judged foreign (see :meth:`LabelSieve.foreign_rows`)
ROW_RULES = ("foreign", "side", "either", "shifted")


class PlainPassDone(Exception):
    """Ends the forward pass of the unaugmented images once every sieve has its features."""


class LabelSieve(nn.Module):
    """See the module docstring. ``classes``: the number of labels."""

    def __init__(self, classes: int, *, pool: int | None = None, momentum: float = 0.05,
                 threshold: float = 0.6, margin: float = 1.2, warmup: int = 10,
                 patience: int = 10, statistic: str = "mixing", row_margin: float = 1.0,
                 action: str = "hold", unlearn_weight: float = 1.0,
                 view: str = "augmented", row_rule: str = "foreign",
                 level_threshold: float | None = None, level_margin: float = 1.0,
                 repair: float | None = None, repair_guard: float = 0.2):
        super().__init__()
        if repair is not None and not (isinstance(repair, (int, float))
                                       and math.isfinite(repair) and repair > 0):
            raise ValueError(f"repair must be None or a positive number (at evaluation, a row "
                             f"whose offset from the suspect label's clean side, projected on "
                             f"the trigger's estimated offset t, is at least repair x |t| has t "
                             f"taken off), got {repair!r}")
        if not (isinstance(repair_guard, (int, float)) and 0 < repair_guard <= 1):
            raise ValueError(f"repair_guard must be in (0, 1] (the repair acts only while at "
                             f"most this share of the other labels' training rows reaches the "
                             f"repair level), got {repair_guard!r}")
        if repair is not None and pool is not None:
            raise ValueError("repair takes the trigger's offset off the features as they are: "
                             "set pool to None (a pooled offset does not fit the full maps)")
        if level_threshold is not None and not (
                isinstance(level_threshold, (int, float)) and math.isfinite(level_threshold)
                and level_threshold > 0):
            raise ValueError(f"level_threshold must be None or a positive number (a label also "
                             f"leads when its score is at least this, and level_margin times "
                             f"the next label's), got {level_threshold!r}")
        if not (isinstance(level_margin, (int, float)) and math.isfinite(level_margin)
                and level_margin >= 1):
            raise ValueError(f"level_margin must be a number >= 1 (how many times the next "
                             f"label's score a label at level_threshold must lead by), got "
                             f"{level_margin!r}")
        if row_rule not in ROW_RULES:
            raise ValueError(f"row_rule must be one of {', '.join(ROW_RULES)} (foreign: a row of "
                             f"the suspect label nearer another label's mean than the label's "
                             f"clean side is flagged; side: one nearer the label's flagged side "
                             f"than its clean side; either: one or the other; shifted: one "
                             f"whose row less the trigger's estimated offset lies nearer another "
                             f"label's mean than the row lies to the clean side), got "
                             f"{row_rule!r}")
        if view not in VIEWS:
            raise ValueError(f"view must be one of {', '.join(VIEWS)} (the features the "
                             f"statistics read: the training forward's, or those of the batch's "
                             f"unaugmented images), got {view!r}")
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {', '.join(ACTIONS)} (hold: a flagged row "
                             f"teaches nothing; unlearn: it is trained away from its label; "
                             f"relabel: towards the network's best other label), got "
                             f"{action!r}")
        if not (isinstance(unlearn_weight, (int, float)) and math.isfinite(unlearn_weight)
                and unlearn_weight > 0):
            raise ValueError(f"unlearn_weight must be a positive number (the weight of a "
                             f"flagged row's unlearning or relabelling loss against a clean "
                             f"row's loss), got {unlearn_weight!r}")
        if not (isinstance(row_margin, (int, float)) and 0 < row_margin <= 1):
            raise ValueError(f"row_margin must be in (0, 1] (a row of the suspect label is flagged "
                             f"when its distance to another label's mean is below row_margin "
                             f"times its distance to the label's clean side), got "
                             f"{row_margin!r}")
        if statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {', '.join(STATISTICS)} (what scores a "
                             f"side of a label's cut), got {statistic!r}")
        if not (isinstance(classes, int) and classes >= 3):
            raise ValueError(f"classes must be an integer >= 3 (a between-class subspace needs "
                             f"two other labels), got {classes!r}")
        if pool is not None and not (isinstance(pool, int) and pool >= 1):
            raise ValueError(f"pool must be None or an integer >= 1 (the pooled grid's side), "
                             f"got {pool!r}")
        if not (isinstance(momentum, (int, float)) and 0 < momentum <= 1):
            raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")
        if not (isinstance(threshold, (int, float)) and math.isfinite(threshold)
                and threshold > 0):
            raise ValueError(f"threshold must be a positive number (the score that flags a "
                             f"side: for the mixing score 1 = spread like the whole data set, "
                             f"for bimodality 1.75 = one Gaussian group), got {threshold!r}")
        if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 1):
            raise ValueError(f"margin must be a number >= 1 (how many times the next label's "
                             f"score the suspect label's must be), got {margin!r}")
        if not (isinstance(patience, int) and patience >= 1):
            raise ValueError(f"patience must be an integer >= 1 (net batches leading above the "
                             f"threshold before a label is suspect), got {patience!r}")
        if not (isinstance(warmup, int) and warmup >= 0):
            raise ValueError(f"warmup must be an integer >= 0 (batches before acting), got "
                             f"{warmup!r}")
        self.classes, self.pool, self.momentum = classes, pool, float(momentum)
        self.threshold, self.warmup, self.patience = float(threshold), warmup, patience
        self.margin, self.statistic = float(margin), statistic
        self.row_margin = float(row_margin)
        self.action, self.unlearn_weight = action, float(unlearn_weight)
        self.view, self.row_rule = view, row_rule
        self.level_threshold = None if level_threshold is None else float(level_threshold)
        self.level_margin = float(level_margin)
        self.repair = None if repair is None else float(repair)
        self.repair_guard = float(repair_guard)
        if self.repair is not None:  # what the evaluation needs, saved with the model
            for name in REPAIR_BUFFERS:
                self.register_buffer(name, torch.zeros(0))
        self.labels: torch.Tensor | None = None
        self.plain_rows: torch.Tensor | None = None  # the next forward's unaugmented features
        self.capturing: list | None = None  # set while HandLabels runs the unaugmented pass
        self.reset()

    def settings(self) -> dict:
        return dict(classes=self.classes, pool=self.pool, momentum=self.momentum,
                    threshold=self.threshold, margin=self.margin, warmup=self.warmup,
                    patience=self.patience, statistic=self.statistic,
                    row_margin=self.row_margin, action=self.action,
                    unlearn_weight=self.unlearn_weight, view=self.view,
                    row_rule=self.row_rule, level_threshold=self.level_threshold,
                    level_margin=self.level_margin, repair=self.repair,
                    repair_guard=self.repair_guard)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.settings().items())

    def set_labels(self, labels: torch.Tensor) -> None:
        """The next training forward's labels (one per row); :class:`HandLabels` calls it."""
        self.labels = labels

    def reset(self) -> None:
        """Forget every running statistic (a new training run)."""
        self.steps = 0
        self._state: dict[str, torch.Tensor] | None = None
        self.flagged_last: torch.Tensor | None = None  # bool mask of the last batch's rows
        self.suspect = torch.zeros(self.classes, dtype=torch.bool)  # labels flagged so far
        self.streak = torch.zeros(self.classes, dtype=torch.long)  # net batches each label led
        if self.repair is not None:
            for name in REPAIR_BUFFERS:
                setattr(self, name, torch.zeros(0, device=getattr(self, name).device))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """The repair's buffers take the saved shapes (they are sized by the first batch)."""
        if self.repair is not None:
            for name in REPAIR_BUFFERS:
                if prefix + name in state_dict:
                    setattr(self, name, torch.zeros_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- the statistics ------------------------------------------------------------------------

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        """(B, d) float64 rows: spatial maps averaged to ``pool`` × ``pool`` per channel when
        ``pool`` is set, else as they are."""
        if features.dim() == 4 and self.pool is not None:
            size = (min(self.pool, features.shape[2]), min(self.pool, features.shape[3]))
            features = F.adaptive_avg_pool2d(features, size)
        return features.detach().flatten(1).to(torch.float64)

    def _new_state(self, d: int, shape: torch.Size, device) -> dict[str, torch.Tensor]:
        c = self.classes
        start = torch.arange(1, d + 1, dtype=torch.float64, device=device)
        return dict(
            seen=torch.zeros(c, dtype=torch.bool, device=device),
            mean=torch.zeros(c, d, dtype=torch.float64, device=device),
            push=torch.zeros(c, d, dtype=torch.float64, device=device),
            direction=(start / start.norm()).repeat(c, 1),
            side_coordinate=torch.zeros(c, 2, dtype=torch.float64, device=device),
            side_coordinate_sq=torch.zeros(c, 2, dtype=torch.float64, device=device),
            side_share=torch.zeros(c, 2, dtype=torch.float64, device=device),
            side_mean=torch.zeros(c, 2, d, dtype=torch.float64, device=device),
            side_total=torch.zeros(c, 2, dtype=torch.float64, device=device),
            side_between=torch.zeros(c, 2, dtype=torch.float64, device=device),
            side_seen=torch.zeros(c, 2, dtype=torch.bool, device=device),
            pool_total=torch.zeros(c, dtype=torch.float64, device=device),
            pool_between=torch.zeros(c, dtype=torch.float64, device=device),
            side_nearest=torch.zeros(c, 2, c, dtype=torch.float64, device=device),
            side_output=torch.zeros(c, 2, *shape, device=device),
        )

    def _blend(self, name: str, index, value: torch.Tensor, seen: torch.Tensor) -> None:
        """Exponential update of ``state[name][index]``; its first value is taken as it is."""
        old = self._state[name][index]
        weight = torch.where(seen, torch.as_tensor(self.momentum, dtype=old.dtype,
                                                   device=old.device),
                             torch.ones((), dtype=old.dtype, device=old.device))
        while weight.dim() < old.dim():
            weight = weight.unsqueeze(-1)
        self._state[name][index] = old + weight * (value.to(old.dtype) - old)

    def between_bases(self) -> torch.Tensor:
        """(C, C-2, d): per label, an orthonormal basis of the span of the other labels' centred
        running means (zero rows where fewer labels have been seen)."""
        mean, seen = self._state["mean"], self._state["seen"]
        c, d = mean.shape
        rank = c - 2
        bases = torch.zeros(c, rank, d, dtype=mean.dtype, device=mean.device)
        for label in range(c):
            others = [o for o in range(c) if o != label and bool(seen[o])]
            if len(others) < 2:
                continue
            rows = mean[others] - mean[others].mean(0)
            _, values, right = torch.linalg.svd(rows, full_matrices=False)
            keep = values > values[0] * 1e-9
            basis = right[keep][:rank]
            bases[label, :len(basis)] = basis
        return bases

    def update(self, rows: torch.Tensor, labels: torch.Tensor,
               features: torch.Tensor) -> torch.Tensor:
        """Fold one batch into the running statistics; the side (0 / 1) of each row's cut."""
        state = self._state
        present = labels.unique()
        onehot = F.one_hot(labels, self.classes).to(rows.dtype)  # (B, C)
        counts = onehot.sum(0)
        batch_mean = (onehot.T @ rows) / counts.clamp(min=1).unsqueeze(1)
        self._blend("mean", present, batch_mean[present], state["seen"][present])
        # each label's top direction of its centred covariance, by streaming power iteration:
        # a running estimate of Σ v from the batch's rows, O(B·d), never a d × d matrix
        centred = rows - state["mean"][labels]
        coordinate = (centred * state["direction"][labels]).sum(1)
        batch_push = (onehot.T @ (centred * coordinate.unsqueeze(1))) / \
            counts.clamp(min=1).unsqueeze(1)
        self._blend("push", present, batch_push[present], state["seen"][present])
        state["seen"][present] = True
        push = state["push"]
        norm = push.norm(dim=1, keepdim=True)
        state["direction"] = torch.where(norm > 0, push / norm.clamp(min=1e-300),
                                         state["direction"])
        direction = state["direction"]
        # the two-means cut along it, from the running coordinate of each side
        coordinate = (centred * direction[labels]).sum(1)
        cut = state["side_coordinate"].mean(1)
        cut = torch.where(state["side_seen"].all(1), cut, torch.zeros_like(cut))
        side = (coordinate > cut[labels]).long()
        bases = self.between_bases()
        for label in present.tolist():
            mine = labels == label
            basis = bases[label]
            others = rows[~mine]
            if len(others) > 1:
                rest = others - others.mean(0)
                total = (rest ** 2).sum(1).mean()
                between = ((rest @ basis.T) ** 2).sum(1).mean()
                seen = state["pool_total"][label] > 0
                self._blend("pool_total", label, total, seen)
                self._blend("pool_between", label, between, seen)
            for which in (0, 1):
                members = mine & (side == which)
                if not members.any():
                    continue
                seen = state["side_seen"][label, which]
                self._blend("side_coordinate", (label, which), coordinate[members].mean(), seen)
                self._blend("side_coordinate_sq", (label, which),
                            (coordinate[members] ** 2).mean(), seen)
                self._blend("side_share", (label, which),
                            members.sum().to(rows.dtype) / mine.sum(), seen)
                self._blend("side_mean", (label, which), rows[members].mean(0), seen)
                self._blend("side_output", (label, which), features[members].detach().mean(0),
                            seen)
                centred = rows[members] - state["side_mean"][label, which]
                self._blend("side_total", (label, which), (centred ** 2).sum(1).mean(), seen)
                self._blend("side_between", (label, which),
                            ((centred @ basis.T) ** 2).sum(1).mean(), seen)
                if self.statistic == "spread":  # a distance per row and label: only when used
                    self._blend("side_nearest", (label, which),
                                self.nearest_others(centred, label), seen)
                state["side_seen"][label, which] = True
        return side

    def nearest_others(self, centred: torch.Tensor, label: int) -> torch.Tensor:
        """(C,) the share of the centred rows of one side of ``label`` nearest each other seen
        label's running mean, once moved to the centre of the labels' means (the side's common
        offset, a trigger's shift among them, taken away)."""
        mean, seen = self._state["mean"], self._state["seen"]
        centre = mean[seen].mean(0)
        distance = torch.cdist(centred + centre, mean)
        distance[:, label] = math.inf
        distance[:, ~seen] = math.inf
        return torch.bincount(distance.argmin(1), minlength=self.classes).to(mean.dtype) / \
            len(centred)

    def side_scores(self) -> torch.Tensor:
        """(C, 2): each side's score by the layer's ``statistic`` (NaN until known)."""
        if self.statistic == "bimodal":
            return self.bimodal_scores()
        return self.mixing_scores() if self.statistic == "mixing" else self.spread_scores()

    def bimodality(self) -> torch.Tensor:
        """(C,) per label, the variance between the two sides of its cut over the variance
        within them, along its top direction: p0·p1·(c1 − c0)² / (p0·v0 + p1·v1) from the
        running side shares p, coordinate means c and variances v. A Gaussian label split at
        its mean gives (2/π) / (1 − 2/π) ≈ 1.75; a label made of two separate groups, such as
        clean rows and rows of other classes moved by one trigger, far more (docs/SIEVE.md).
        NaN until both sides are known."""
        state = self._state
        share = state["side_share"] / state["side_share"].sum(1, keepdim=True).clamp(min=1e-300)
        mean = state["side_coordinate"]
        variance = (state["side_coordinate_sq"] - mean ** 2).clamp(min=0)
        between = share[:, 0] * share[:, 1] * (mean[:, 1] - mean[:, 0]) ** 2
        within = (share * variance).sum(1)
        values = between / within.clamp(min=1e-300)
        return torch.where(state["side_seen"].all(1), values, torch.full_like(values, math.nan))

    def bimodal_scores(self) -> torch.Tensor:
        """(C, 2): each label's :meth:`bimodality` on the side whose mixing score is higher
        (the side made of other classes, if either is), 0 on the other; NaN until known."""
        mixing = self.mixing_scores().nan_to_num(-1.0)
        poison_side = (mixing[:, 1] > mixing[:, 0]).long()
        scores = torch.zeros_like(mixing)
        scores.scatter_(1, poison_side.unsqueeze(1), self.bimodality().unsqueeze(1))
        return torch.where(self._state["side_seen"].all(1, keepdim=True), scores,
                           torch.full_like(scores, math.nan))

    def spread_scores(self) -> torch.Tensor:
        """(C, 2): over how many other labels each side's rows are spread, once their common
        offset is taken away: the effective number (exp of the entropy) of the labels whose
        running means are nearest them (:meth:`nearest_others`), over the number of other labels
        (1: spread evenly over every other label, like poison made of every other class; a clean
        class is nearest a few neighbours). NaN until known."""
        state = self._state
        shares = state["side_nearest"]
        entropy = -(shares * shares.clamp(min=1e-300).log()).sum(-1)
        others = (state["seen"].sum() - 1).clamp(min=1).to(shares.dtype)
        scores = entropy.exp() / others
        return torch.where(state["side_seen"], scores, torch.full_like(scores, math.nan))

    def mixing_scores(self) -> torch.Tensor:
        """(C, 2): each side's between-class fraction over the other labels' fraction (NaN until
        both are known)."""
        state = self._state
        side_fraction = state["side_between"] / state["side_total"]
        pool_fraction = state["pool_between"] / state["pool_total"]
        scores = side_fraction / pool_fraction.unsqueeze(1)
        known = state["side_seen"] & (state["pool_total"] > 0).unsqueeze(1)
        return torch.where(known, scores, torch.full_like(scores, math.nan))

    def flagged_sides(self) -> torch.Tensor:
        """(C,) the flagged side of each label, −1 for none.

        One label at most becomes suspect (all-to-one poison: one target): the label whose
        higher side scores highest, when that score is at least ``threshold`` and at least
        ``margin`` times the next label's, ``patience`` batches more often than not (each batch
        it leads adds one to its count, each other batch takes one away). A clean class that
        is itself mixed up with others (Fashion-MNIST's coats, among pullovers and shirts) can
        pass the threshold; it does not lead the poison label by the margin. The suspect label
        stays suspect for the rest of training (its side: the one with the higher score): as
        the network learns, the poison's features drift towards their label and the score
        falls (measured: Blended's from 0.80 to 0.68 by epoch 4), which must not let the
        poison back in."""
        scores = self.side_scores()
        higher = (scores[:, 1] > scores[:, 0]).long()
        best = torch.nan_to_num(scores.gather(1, higher.unsqueeze(1)).squeeze(1), nan=0.0)
        self.suspect = self.suspect.to(best.device)
        self.streak = self.streak.to(best.device)
        if not self.suspect.any():
            top = best.topk(2)
            leader = int(top.indices[0])
            first, second = float(top.values[0]), float(top.values[1])
            leads = first >= self.threshold and first >= self.margin * second
            if self.level_threshold is not None:  # the second tier: a high level, a small lead
                leads = leads or (first >= self.level_threshold
                                  and first >= self.level_margin * second)
            # the leader's count goes up, every other count down (not to zero: one noisy batch
            # of the running estimate must not undo a label's lead)
            self.streak.sub_(1).clamp_(min=0)
            if leads:
                self.streak[leader] += 2
            if self.streak[leader] >= self.patience:
                self.suspect[leader] = True
        return torch.where(self.suspect, higher, torch.full_like(higher, -1))

    # -- the layer ---------------------------------------------------------------------------

    def capture(self, features: torch.Tensor) -> None:
        """In the unaugmented pass: keep this batch's rows for the training forward; the last
        sieve to capture ends the pass (the layers after it are not needed)."""
        self.plain_rows = self.pooled(features)
        pending, self.capturing = self.capturing, None
        pending.remove(self)
        if not pending:
            raise PlainPassDone

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return features if self.repair is None else self.repaired(features)
        if self.capturing is not None:
            self.capture(features)
            return features
        labels, self.labels = self.labels, None
        if labels is None:
            raise RuntimeError(
                "LabelSieve trains on the batch's labels and none were handed over: train with "
                "the HandLabels hook (eigenguard.sieve.HandLabels) or call "
                "layer.set_labels(labels) before each training forward")
        labels = torch.as_tensor(labels, device=features.device).long().flatten()
        if len(labels) != len(features):
            raise ValueError(f"LabelSieve got {len(labels)} labels for a batch of "
                             f"{len(features)} rows")
        if len(labels) and (labels.min() < 0 or labels.max() >= self.classes):
            raise ValueError(f"LabelSieve labels must lie in [0, {self.classes}), got "
                             f"{labels.min().item()}..{labels.max().item()}")
        rows = self.pooled(features) if self.view == "augmented" else self.take_plain_rows(
            len(labels))
        if not torch.isfinite(rows).all():
            raise FloatingPointError("LabelSieve got non-finite features: the layers before it "
                                     "diverged (lower the learning rate)")
        if rows.shape[1] > MAX_DIMS:
            raise ValueError(f"LabelSieve got {rows.shape[1]} features per row, more than "
                             f"{MAX_DIMS}: set pool to average the maps to pool x pool")
        if self._state is None:
            self._state = self._new_state(rows.shape[1], features.shape[1:], features.device)
        side = self.update(rows, labels, features)
        self.steps += 1
        flagged = torch.zeros(len(labels), dtype=torch.bool, device=features.device)
        sides = self.flagged_sides() if self.steps > self.warmup else None
        if sides is not None:
            flagged = self.foreign_rows(rows, labels, sides)
            if self.repair is not None and (sides >= 0).any():
                self.update_repair(rows, labels, sides)
        self.flagged_last = flagged
        if not flagged.any() or self.action != "hold":  # the other actions act on the loss
            return features
        keep = self._state["side_output"][labels, 1 - sides[labels].clamp(min=0)].to(
            features.dtype)
        mask = flagged.view(-1, *([1] * (features.dim() - 1)))
        return torch.where(mask, keep, features)

    def take_plain_rows(self, count: int) -> torch.Tensor:
        """The unaugmented features :class:`HandLabels` handed over for this forward."""
        rows, self.plain_rows = self.plain_rows, None
        if rows is None:
            raise RuntimeError("LabelSieve(view='plain') reads the features of the batch's "
                               "unaugmented images and none were handed over: train with the "
                               "HandLabels hook (eigenguard.sieve.HandLabels)")
        if len(rows) != count:
            raise ValueError(f"LabelSieve got {len(rows)} unaugmented rows for a batch of "
                             f"{count}")
        return rows

    def trigger_offsets(self, sides: torch.Tensor) -> torch.Tensor:
        """(C, d): for each label with a flagged side (``sides`` ≥ 0), that side's running mean
        less the mean of the other seen labels' running means: all-to-one poison draws its
        content from every other class, so what is left is the trigger's offset; zero for the
        other labels."""
        state = self._state
        mean, seen = state["mean"], state["seen"]
        offsets = torch.zeros_like(mean)
        for label in torch.nonzero(sides >= 0).flatten().tolist():
            others = seen.clone()
            others[label] = False
            if others.any():
                offsets[label] = (state["side_mean"][label, int(sides[label])]
                                  - mean[others].mean(0))
        return offsets

    def foreign_rows(self, rows: torch.Tensor, labels: torch.Tensor,
                     sides: torch.Tensor) -> torch.Tensor:
        """The rows of the flagged labels judged foreign, one by one (a cut along the top
        direction alone mixes the two groups up where they overlap; it names the label and
        its clean side, the side not flagged). With ``row_rule="foreign"``: rows nearer another
        label's running mean than their own label's clean side (other classes' content under
        the label); with ``"side"``: rows nearer the label's flagged side's running mean than
        its clean side's (the two-means assignment in the whole feature space: a triggered
        image of a class that resembles the label's own, a shirt under the T-shirts' label, is
        nearer the clean side than any other label's mean but still carries the trigger's
        offset of the flagged side; docs/SIEVE.md); with ``"either"``, rows one or the other
        rule flags (the side rule alone misses a small patch's poison, whose offset is weak
        early in training); with ``"shifted"``, rows that, less the trigger's estimated offset
        (the flagged side's running mean less the mean of the other labels' running means: the
        poison's content, drawn from every other class, averages out), lie nearer another
        label's running mean than the row itself lies to the clean side (undoing the trigger
        makes a triggered look-alike nearer its own class, and a clean row of the label farther
        from the others). Squared distances; ``row_margin`` < 1 asks
        a row to be that much nearer (fewer clean rows of the label flagged, fewer poisoned ones
        too)."""
        state = self._state
        suspect = sides[labels] >= 0
        flagged = torch.zeros(len(labels), dtype=torch.bool, device=rows.device)
        if not suspect.any():
            return flagged
        chosen = rows[suspect]
        own = labels[suspect]
        clean_side = state["side_mean"][own, 1 - sides[own]]
        to_own = ((chosen - clean_side) ** 2).sum(1)
        to_other = torch.full_like(to_own, math.inf)
        if self.row_rule in ("side", "either"):
            to_other = ((chosen - state["side_mean"][own, sides[own]]) ** 2).sum(1)
        if self.row_rule in ("foreign", "either", "shifted"):
            moved = (chosen - self.trigger_offsets(sides)[own] if self.row_rule == "shifted"
                     else chosen)
            to_labels = torch.cdist(moved, state["mean"]) ** 2  # (n, C)
            to_labels[torch.arange(len(own)), own] = math.inf  # the own label's mean holds poison
            to_labels[:, ~state["seen"]] = math.inf
            to_other = torch.minimum(to_other, to_labels.min(1).values)
        flagged[suspect] = to_other < self.row_margin * to_own
        return flagged

    # -- the repair at evaluation ---------------------------------------------------------------

    def along_offset(self, rows: torch.Tensor, offset: torch.Tensor,
                     clean: torch.Tensor) -> torch.Tensor:
        """Each row's offset from the clean side projected on the trigger's offset t, in units
        of |t| (1: the row sits where the flagged side's trigger puts it)."""
        return ((rows - clean) @ offset) / (offset @ offset).clamp(min=1e-12)

    def update_repair(self, rows: torch.Tensor, labels: torch.Tensor,
                      sides: torch.Tensor) -> None:
        """Keep the suspect label's clean side and the trigger's estimated offset for the
        evaluation, and the running share of the other labels' rows at or over the repair
        level: where it is large, the offset is a direction clean images take as well (measured
        on BadNets' patch at ``layer2``: 41-44% of clean test rows), so taking it off would
        change clean predictions, and the guard turns the repair off."""
        label = int(torch.nonzero(sides >= 0)[0])
        offset = self.trigger_offsets(sides)[label]
        clean = self._state["side_mean"][label, 1 - int(sides[label])]
        if not bool(offset.any()):
            return
        others = rows[labels != label]
        if len(others):
            share = (self.along_offset(others, offset, clean) >= self.repair).double().mean()
            old = self.repair_outside
            self.repair_outside = (share if old.numel() == 0 else
                                   old + self.momentum * (share - old)).to(old.device).float()
        self.repair_offset = offset.float().to(self.repair_offset.device)
        self.repair_clean = clean.float().to(self.repair_clean.device)

    def repair_active(self) -> bool:
        """Whether the evaluation takes the offset off: a label was suspect in training and the
        guard lets it (at most ``repair_guard`` of the other labels' rows reach the level)."""
        return (self.repair is not None and self.repair_offset.numel() > 0
                and self.repair_outside.numel() > 0
                and float(self.repair_outside) <= self.repair_guard)

    def repaired(self, features: torch.Tensor) -> torch.Tensor:
        """Evaluation: the rows whose projection on the trigger's estimated offset t reaches
        ``repair`` × |t| have t taken off; every other row passes unchanged. Row by row, so a
        prediction never depends on its batch."""
        if not self.repair_active():
            return features
        rows = features.flatten(1)
        if rows.shape[1] != self.repair_offset.numel():
            raise ValueError(f"LabelSieve's repair was fitted on rows of "
                             f"{self.repair_offset.numel()} features and got "
                             f"{rows.shape[1]}: evaluate the model it trained with")
        offset = self.repair_offset.to(rows.dtype)
        hit = self.along_offset(rows, offset, self.repair_clean.to(rows.dtype)) >= self.repair
        return (rows - hit.unsqueeze(1).to(rows.dtype) * offset).view_as(features)

    def _filter_output(self, module, inputs, output):
        """Forward hook installed by :func:`sieve` on the module it follows."""
        return self(output)


def unlearning_loss(logits: torch.Tensor, labels: torch.Tensor, losses: torch.Tensor,
                    flagged: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """The batch's loss with each flagged row's cross-entropy replaced by its unlearning loss
    −log(1 − p(label)), times ``weight``: the row now pushes its own label's probability down
    (what ABL's gradient ascent does), but bounded below by zero, so it cannot diverge as an
    ascent on the cross-entropy can. Averaged over every row, as the plain loss is."""
    probability = logits[flagged].float().softmax(1).gather(
        1, labels[flagged].long().unsqueeze(1)).squeeze(1)
    away = -torch.log1p(-probability.clamp(max=1 - 1e-6))
    return with_flagged_losses(losses, flagged, away, weight)


def with_flagged_losses(losses: torch.Tensor, flagged: torch.Tensor, replaced: torch.Tensor,
                        weight: float) -> torch.Tensor:
    """The batch's mean loss with the flagged rows' losses swapped for ``weight`` × ``replaced``
    (one per flagged row): averaged over every row, as the plain loss is."""
    return (losses[~flagged].sum() + weight * replaced.sum()) / len(losses)


def relabelling_loss(logits: torch.Tensor, labels: torch.Tensor, losses: torch.Tensor,
                     flagged: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """The batch's loss with each flagged row's cross-entropy taken instead against the label
    the network ranks first once the row's own label is left out, times ``weight`` (the target
    is read from the logits without gradient). Averaged over every row, as the plain loss is."""
    chosen = logits[flagged].float()
    own = labels[flagged].long()
    ranked = chosen.detach().clone()
    ranked[torch.arange(len(own)), own] = -math.inf
    moved = F.cross_entropy(chosen, ranked.argmax(1), reduction="none")
    return with_flagged_losses(losses, flagged, moved, weight)


def sieve(model: nn.Module, after: str, classes: int, **settings) -> LabelSieve:
    """Insert a :class:`LabelSieve` after the submodule named ``after`` (named
    ``<name>_sieve``; see :func:`eigenguard.layer.insert_after`)."""
    return insert_after(model, after, LabelSieve(classes, **settings), "sieve")


def find_sieves(model: nn.Module) -> list[LabelSieve]:
    return [module for module in model.modules() if isinstance(module, LabelSieve)]


def unaugmented_pass(model: nn.Module, data, batch: Batch, layers: list[LabelSieve]) -> None:
    """Run ``model`` on the batch's samples as stored (no crop, no flip) until every layer of
    ``layers`` has captured its features; no gradient, and every buffer (BatchNorm's running
    statistics, EigenGuard's running subspace) restored after it, so training is unchanged."""
    images = data.images[batch.indices].to(batch.images.device).float().div_(255)
    buffers = [(buffer, buffer.clone()) for buffer in model.buffers()]
    pending = list(layers)
    for layer in layers:
        layer.capturing = pending
    try:
        with torch.no_grad():
            model(normalize(images, data.mean, data.std))
    except PlainPassDone:
        pass
    finally:
        for layer in layers:
            layer.capturing = None
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    missing = [layer for layer in layers if layer.plain_rows is None]
    if missing:
        raise RuntimeError("the unaugmented pass did not reach every LabelSieve: is each one "
                           "part of the model's forward?")


class HandLabels(TrainHook):
    """Hands each training batch's labels (as trained on, after every other hook) to the model's
    sieves before its forward pass, and keeps the training indices each one flagged in the last
    epoch (what the harness scores as the defense's detection)."""

    def __init__(self, layers: list[LabelSieve]):
        if not layers:
            raise ValueError("HandLabels needs at least one LabelSieve layer")
        self.layers = layers
        self.flagged_epoch: list[torch.Tensor] = []
        self.flagged_total = 0

    def on_train_start(self, state: TrainState) -> None:
        for layer in self.layers:
            layer.reset()

    def on_epoch_start(self, state: TrainState) -> None:
        self.flagged_epoch = []

    def on_batch(self, state: TrainState, batch: Batch) -> Batch:
        for layer in self.layers:
            layer.set_labels(batch.labels)
        plain = [layer for layer in self.layers if layer.view == "plain"]
        if plain:
            unaugmented_pass(state.model, state.data, batch, plain)
        return batch

    def loss(self, state, batch, logits, losses, loss):
        acted = torch.zeros(len(losses), dtype=torch.bool, device=losses.device)
        weight, action = 1.0, "hold"
        for layer in self.layers:
            if layer.flagged_last is not None and layer.flagged_last.any():
                rows = layer.flagged_last.cpu()
                self.flagged_epoch.append(batch.indices[rows])
                self.flagged_total += int(rows.sum())
                if layer.action != "hold":
                    acted |= layer.flagged_last.to(losses.device)
                    weight, action = layer.unlearn_weight, layer.action
        if not acted.any():
            return loss
        replace = unlearning_loss if action == "unlearn" else relabelling_loss
        return replace(logits, batch.labels.to(logits.device), losses, acted, weight)

    def on_epoch_end(self, state: TrainState, record: dict) -> None:
        record["sieve_flagged"] = int(sum(len(rows) for rows in self.flagged_epoch))
        record["sieve_suspect"] = sorted({label for layer in self.layers
                                          for label in layer.suspect.nonzero().flatten().tolist()})
        layer = self.layers[0]
        if layer._state is not None:  # each label's higher side score at the epoch's end
            scores = layer.side_scores().nan_to_num(0).max(1).values
            record["sieve_scores"] = [round(float(score), 3) for score in scores]

    def flagged_indices(self) -> torch.Tensor:
        """Training indices flagged in the last epoch (sorted, unique)."""
        if not self.flagged_epoch:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat(self.flagged_epoch).unique()
