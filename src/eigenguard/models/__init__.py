"""Victim networks for backdoor experiments, built by name.

Every model has top-level stage modules listed in ``model.stage_names`` (in
forward order, each producing a 4-D feature map) so a layer can be inserted
after any stage by replacing ``model.<stage>`` with
``nn.Sequential(model.<stage>, layer)``. The final linear layer is always
``model.classifier``.
"""

from eigenguard.models import mobilenetv2, preact_resnet, resnet, small_cnn, vgg  # noqa: F401
from eigenguard.models.registry import create_model, is_model, list_models, register_model
from eigenguard.models.stages import get_stage_names, stage_output_shapes

__all__ = [
    "create_model",
    "get_stage_names",
    "is_model",
    "list_models",
    "register_model",
    "stage_output_shapes",
]
