"""Fine-Pruning (FP; Liu, Dolan-Gavitt and Garg, RAID 2018): prune the last stage's channels that
clean images leave dormant, then fine-tune.

The observation behind it: a backdoor needs neurons, and a network trained on mostly clean data
tends to put the trigger on neurons that clean inputs hardly use. So the method records each
last-stage channel's mean activation on clean images, removes channels in increasing order of that
activation while clean accuracy holds, and fine-tunes what is left to recover the accuracy lost and
to wear down a backdoor that hid in the kept channels.

Which activation, and where the mask acts. In every model of the registry the classifier's input
is the spatial mean of the last stage's channels after their final activation: for ResNet, VGG,
MobileNetV2 and the small CNN that is the last stage's own output (it ends in a ReLU); for
PreAct-ResNet it is the output of ``final_bn`` and ``final_relu``, which run after ``layer4``. The
pre-activation sum that ``layer4`` returns is the wrong thing to rank (the final BatchNorm shifts
and rescales each channel, so a channel with a low mean there can be among the most active after
the ReLU, and the reverse) and the wrong place to mask (a zeroed channel still carries the final
BatchNorm's shift, which the ReLU passes). So FP reads the
classifier's input (:func:`~eigenguard.defenses.features.penultimate_features`: the post-activation
channel means, one per last-stage channel) and prunes a channel by masking it there, which removes
it exactly: it then adds nothing to any logit, and fine-tuning sends it no gradient. Because the
mask acts at the classifier's input, the clean accuracy of every pruned count follows from the
features computed once, and the search over counts costs one forward pass of the reserve.

The mask is a buffer of :class:`PrunedClassifier`, an ``nn.Linear`` that replaces ``classifier``
(:meth:`FinePruning.prepare_model`), so a stored checkpoint reloads into
``prepare_model(build_model(...))`` with the mask it was saved with.

Defaults, from BackdoorBench's FP on CIFAR-10: pruning stops before the clean accuracy falls by more
than ``accuracy_tolerance`` = 10% of its unpruned value (their ``acc_ratio`` 0.1, a relative drop),
measured on the clean reserve, which the backdoored model never trained on; channels go one at a
time (their ``once_prune_ratio`` 0.01 is one channel of a 64-wide PreAct-ResNet18's 512, and with
the mask at the classifier's input single steps cost nothing). ``max_prune_ratio`` = 0.8 keeps a
fifth of the channels whatever the accuracy says: on a small reserve the accuracy of a heavily
pruned model is a noisy estimate, and the fine-tuning needs channels left to recover with.
Fine-tuning afterwards uses FT's defaults (10 epochs at lr 0.01, cosine; see
:mod:`eigenguard.defenses.finetune` for the scaling from BackdoorBench's 100 epochs). The
pruning is deterministic (ties in activation go in channel order) and the fine-tuning uses the
shared loop's seeded streams.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import DefenseContext, DefenseResult
from .checks import check_fraction, check_integer, check_number
from .features import classifier_layer, penultimate_features
from .finetune import final_record
from .registry import register_defense
from .repair import Repair, fine_tune


class PrunedClassifier(nn.Linear):
    """The classifier with a 0/1 mask on its input channels: a pruned channel adds nothing to the
    logits. The mask is a buffer, so it is saved and reloaded with the model's state."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer("channel_mask", torch.ones(in_features, device=device, dtype=dtype))

    @classmethod
    def wrapping(cls, linear: nn.Linear) -> "PrunedClassifier":
        """A pruned classifier (nothing pruned yet) that shares ``linear``'s parameters."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    device="meta")  # no initialisation drawn: the parameters are linear's own
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.channel_mask = torch.ones(linear.in_features, device=linear.weight.device,
                                        dtype=linear.weight.dtype)
        return layer

    @property
    def pruned_count(self) -> int:
        return int((self.channel_mask == 0).sum())

    def prune(self, channels: torch.Tensor) -> None:
        """Mask ``channels`` (indices into the classifier's input)."""
        with torch.no_grad():
            self.channel_mask[channels.to(self.channel_mask.device)] = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x * self.channel_mask, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pruned={self.pruned_count}"


def activation_order(features: torch.Tensor) -> torch.Tensor:
    """Channels in increasing order of mean clean activation (ties in index order)."""
    return torch.sort(features.double().mean(dim=0), stable=True).indices


def accuracy_while_pruning(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor | None, order: torch.Tensor,
                           count: int) -> torch.Tensor:
    """Clean accuracy with the first 0, 1, ..., ``count`` channels of ``order`` masked.

    Masking a channel at the classifier's input subtracts its column's contribution from the
    logits, so each step updates the logits instead of running the model again.
    """
    features, weight = features.double(), weight.detach().double().cpu()
    logits = features @ weight.T
    if bias is not None:
        logits += bias.detach().double().cpu()
    accuracies = [(logits.argmax(1) == labels).double().mean()]
    for channel in order[:count].tolist():
        logits -= features[:, channel:channel + 1] * weight[:, channel]
        accuracies.append((logits.argmax(1) == labels).double().mean())
    return torch.stack(accuracies)


def pruned_count(accuracies: torch.Tensor, tolerance: float) -> int:
    """How many channels to prune: the most before accuracy first falls below
    ``(1 - tolerance)`` times its unpruned value (``accuracies[0]``)."""
    floor = (1 - tolerance) * float(accuracies[0])
    too_low = (accuracies < floor - 1e-12).nonzero().flatten()
    return int(too_low[0]) - 1 if too_low.numel() else len(accuracies) - 1


@register_defense("fp")
@dataclass
class FinePruning(Repair):
    """Prune dormant last-stage channels while clean accuracy holds, then fine-tune."""

    accuracy_tolerance: float = 0.1
    max_prune_ratio: float = 0.8
    epochs: int = 10
    lr: float = 0.01

    def __post_init__(self):
        check_fraction("accuracy_tolerance", self.accuracy_tolerance, open_low=False)
        check_number("max_prune_ratio", self.max_prune_ratio, low=0, high=1, open_low=False,
                     meaning="the classifier needs a channel left")
        check_integer("epochs", self.epochs)
        check_number("lr", self.lr, low=0)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        layer = classifier_layer(model)
        if not isinstance(layer, PrunedClassifier):
            model.classifier = PrunedClassifier.wrapping(layer)
        return model

    def defend(self, context: DefenseContext) -> DefenseResult:
        reserve = context.clean_reserve
        model = self.prepare_model(context.backdoored_model())
        clock = time.monotonic()
        # the classifier's input before its mask: a channel pruned already reads as dormant
        features = (penultimate_features(model, reserve, device=context.device)
                    * model.classifier.channel_mask.cpu())
        order = activation_order(features)
        limit = int(self.max_prune_ratio * features.shape[1])
        accuracies = accuracy_while_pruning(features, reserve.labels, model.classifier.weight,
                                            model.classifier.bias, order, limit)
        count = pruned_count(accuracies, self.accuracy_tolerance)
        model.classifier.prune(order[:count])
        seconds_prune = time.monotonic() - clock
        clock = time.monotonic()
        history = fine_tune(context, model, reserve, epochs=self.epochs, lr=self.lr)
        mean_activation = features.double().mean(dim=0)
        return DefenseResult(model, extra=dict(
            channels=int(features.shape[1]), pruned=count, max_pruned=limit,
            pruned_channels=order[:count].tolist(),
            activation_threshold=(float(mean_activation[order[count - 1]]) if count else None),
            reserve_acc_unpruned=float(accuracies[0]), reserve_acc_pruned=float(accuracies[count]),
            reserve_size=len(reserve), epochs=self.epochs, seconds_prune=seconds_prune,
            seconds_fine_tune=time.monotonic() - clock, **final_record(history)))
