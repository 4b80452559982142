"""Neural Attention Distillation (NAD; Li et al., ICLR 2021): a fine-tuned teacher shows the
backdoored student where to look.

First a copy of the backdoored model is fine-tuned on the clean reserve: the teacher. Fine-tuning
alone leaves much of a backdoor in place, but it shifts the model's intermediate attention towards
what clean images need. Then the backdoored model itself, the student, is trained on the reserve
with cross-entropy plus, at each chosen stage, β times the distance between the student's and the
teacher's attention maps. An attention map is where a stage's activity sits in the image: the mean
over channels of |a|^p, flattened and L2-normalised per image; the distance is the mean squared
difference of the two maps. Aligning the student's attention with the teacher's erases trigger
features the teacher no longer attends to, and keeps the task, which both agree on.

The attention loss is a :class:`~eigenguard.train.TrainHook`, :class:`AttentionDistillation`:
forward hooks record the student's input and stage outputs during the shared loop's forward pass,
the teacher (frozen, in evaluation mode) runs on that same input, and the hook adds the weighted
attention distances to the loss. Teacher and student both train with the shared loop.

Defaults, from BackdoorBench's NAD on CIFAR-10 (REFERENCE.md §2): the teacher fine-tunes for 10
epochs, the student trains for 10, both at lr 0.01 with a cosine schedule; p = 2; β = 500, 1000,
1000 on the last three stages (the last three residual groups of a ResNet: ``layer2``..``layer4``;
on another model the last three of its ``stage_names``). The authors' public code trains the
student for 20 epochs and puts its whole weight on the last group (β = 0, 0, 5000). The epochs are
not scaled down: on a 5% reserve (about 600 images at the benchmark's 12,000-image budget) twenty
epochs cost a quarter of the victim's four-epoch training. The β values were set for CIFAR's map
sizes (the mean over a map's positions makes the loss per position) and are kept as the published
calibration; on the tests' 28×28 setting ten times these β erased a backdoor the defaults only
weakened, so β is the first setting to try on a new data set. Nothing here draws randomness of its
own: the shared loop's seeded streams are the only ones, so a run is a function of its seed.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..models.stages import get_stage_names
from ..train import Batch, TrainHook, TrainState
from .base import DefenseContext, DefenseResult
from .checks import check_integer, check_number, invalid, is_finite_number
from .finetune import final_record
from .registry import register_defense
from .repair import Repair, fine_tune


def attention_map(activation: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Where a stage's activity sits: mean over channels of |a|^p, flattened per image and
    L2-normalised (so only the spatial pattern counts, not the activation's scale)."""
    return nn.functional.normalize(activation.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def attention_distance(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0
                       ) -> torch.Tensor:
    """Mean squared difference between two stage outputs' attention maps."""
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


class StageOutputs:
    """Records the latest output of named stages of a model (forward hooks) and, optionally, the
    model's own input."""

    def __init__(self, model: nn.Module, stages: tuple[str, ...], *, record_input: bool = False):
        self.outputs: dict[str, torch.Tensor] = {}
        self.input: torch.Tensor | None = None
        self._handles = [getattr(model, name).register_forward_hook(self._keeper(name))
                         for name in stages]
        if record_input:
            self._handles.append(model.register_forward_pre_hook(self._keep_input))

    def _keeper(self, name: str):
        def keep(_module, _inputs, output):
            self.outputs[name] = output
        return keep

    def _keep_input(self, _module, inputs):
        self.input = inputs[0]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.outputs.clear()
        self.input = None


class AttentionDistillation(TrainHook):
    """Adds ``sum_s beta_s * attention_distance(student_s, teacher_s)`` to the loss.

    ``attach(student)`` starts recording (``on_train_start`` does it for the model being
    trained); ``remove()`` stops it (``on_train_end`` does it). The teacher is frozen and runs in
    evaluation mode on exactly the (augmented, normalised) batch the student saw.
    """

    def __init__(self, teacher: nn.Module, stages: tuple[str, ...], betas: tuple[float, ...],
                 p: float = 2.0):
        if len(stages) != len(betas):
            raise ValueError(f"one beta per stage: {len(stages)} stages {stages} but "
                             f"{len(betas)} betas {betas}")
        self.teacher, self.stages, self.betas, self.p = teacher, tuple(stages), tuple(betas), p
        self.teacher.requires_grad_(False)
        self._student: StageOutputs | None = None
        self._teacher: StageOutputs | None = None
        self._sums = torch.zeros(len(stages), dtype=torch.float64)
        self._steps = 0

    def attach(self, student: nn.Module) -> None:
        self.remove()
        self._student = StageOutputs(student, self.stages, record_input=True)
        self._teacher = StageOutputs(self.teacher, self.stages)

    def remove(self) -> None:
        for outputs in (self._student, self._teacher):
            if outputs is not None:
                outputs.remove()
        self._student = self._teacher = None

    def distances(self) -> torch.Tensor:
        """Per-stage attention distances of the student's last forward pass (teacher run on the
        same input)."""
        if self._student is None or self._student.input is None:
            raise RuntimeError("AttentionDistillation: attach(student) and run the student on a "
                               "batch first")
        with torch.no_grad():
            self.teacher(self._student.input)
        return torch.stack([attention_distance(self._student.outputs[name],
                                               self._teacher.outputs[name], self.p)
                            for name in self.stages])

    def weighted(self, distances: torch.Tensor) -> torch.Tensor:
        """``sum_s beta_s * distances_s``."""
        betas = torch.as_tensor(self.betas, dtype=distances.dtype, device=distances.device)
        return (betas * distances).sum()

    def distillation_loss(self) -> torch.Tensor:
        """What the hook adds to the loss for the student's last forward pass."""
        return self.weighted(self.distances())

    def on_train_start(self, state: TrainState) -> None:
        self.teacher.to(state.device).eval()
        self.attach(state.model)

    def on_epoch_start(self, state: TrainState) -> None:
        self._sums.zero_()
        self._steps = 0

    def loss(self, state: TrainState, batch: Batch, logits: torch.Tensor, losses: torch.Tensor,
             loss: torch.Tensor) -> torch.Tensor:
        distances = self.distances()
        self._sums += distances.detach().double().cpu()
        self._steps += 1
        return loss + self.weighted(distances)

    def on_epoch_end(self, state: TrainState, record: dict) -> None:
        means = (self._sums / max(self._steps, 1)).tolist()
        for name, mean in zip(self.stages, means):
            record[f"attention_distance.{name}"] = mean
        record["attention_loss"] = float(sum(b * d for b, d in zip(self.betas, means)))

    def on_train_end(self, state: TrainState) -> None:
        self.remove()


@register_defense("nad")
@dataclass
class NeuralAttentionDistillation(Repair):
    """Fine-tune a teacher on the clean reserve, then train the backdoored model on it with
    attention distillation from the teacher at the last ``len(betas)`` stages (or ``stages``)."""

    teacher_epochs: int = 10
    epochs: int = 10
    lr: float = 0.01
    teacher_lr: float = 0.01
    betas: tuple[float, ...] = (500.0, 1000.0, 1000.0)
    p: float = 2.0
    stages: tuple[str, ...] | None = None

    def __post_init__(self):
        check_integer("teacher_epochs", self.teacher_epochs)
        check_integer("epochs", self.epochs)
        check_number("lr", self.lr, low=0)
        check_number("teacher_lr", self.teacher_lr, low=0)
        self.betas = self._checked_betas(self.betas)
        check_number("p", self.p, low=0, meaning="the paper uses 2")
        if self.stages is not None:
            if (isinstance(self.stages, str) or not isinstance(self.stages, (tuple, list))
                    or not all(isinstance(s, str) for s in self.stages)):
                raise invalid("stages", self.stages, "a sequence of stage names or None",
                              "the last len(betas) stages")
            self.stages = tuple(self.stages)
            if len(self.stages) != len(self.betas):
                raise ValueError(f"stages and betas must have the same length (one beta per "
                                 f"stage), got {len(self.stages)} stages {self.stages} and "
                                 f"{len(self.betas)} betas {self.betas}")

    @staticmethod
    def _checked_betas(betas) -> tuple[float, ...]:
        ok = (not isinstance(betas, (str, bytes)) and hasattr(betas, "__len__") and len(betas) > 0
              and all(is_finite_number(b) and b >= 0 for b in betas))
        if not ok:
            raise invalid("betas", betas, "a non-empty sequence of finite numbers >= 0",
                          "one per distilled stage; BackdoorBench: 500, 1000, 1000")
        return tuple(float(b) for b in betas)

    def distilled_stages(self, model: nn.Module) -> tuple[str, ...]:
        """The stages whose attention is distilled: ``stages``, or the model's last
        ``len(betas)``."""
        names = get_stage_names(model)
        if self.stages is not None:
            missing = [s for s in self.stages if s not in names]
            if missing:
                raise ValueError(f"stages {missing} are not stages of {type(model).__name__}; "
                                 f"its stages are {', '.join(names)}")
            return self.stages
        if len(self.betas) > len(names):
            raise ValueError(f"{len(self.betas)} betas but {type(model).__name__} has only "
                             f"{len(names)} stages ({', '.join(names)}): give fewer betas")
        return names[-len(self.betas):]

    def defend(self, context: DefenseContext) -> DefenseResult:
        reserve = context.clean_reserve
        student = context.backdoored_model()
        stages = self.distilled_stages(student)
        clock = time.monotonic()
        teacher = copy.deepcopy(student)
        teacher_history = fine_tune(context, teacher, reserve, epochs=self.teacher_epochs,
                                    lr=self.teacher_lr)
        seconds_teacher = time.monotonic() - clock
        clock = time.monotonic()
        distillation = AttentionDistillation(teacher, stages, self.betas, self.p)
        try:
            history = fine_tune(context, student, reserve, epochs=self.epochs, lr=self.lr,
                                hooks=[distillation])
        finally:
            distillation.remove()
        last = history[-1] if history else {}
        return DefenseResult(student, extra=dict(
            stages=list(stages), betas=list(self.betas), reserve_size=len(reserve),
            teacher_epochs=self.teacher_epochs, epochs=self.epochs,
            teacher=final_record(teacher_history),
            final_attention_distance={name: last.get(f"attention_distance.{name}")
                                      for name in stages},
            final_attention_loss=last.get("attention_loss"),
            seconds_teacher=seconds_teacher, seconds_student=time.monotonic() - clock,
            **final_record(history)))
