"""EigenGuard: train image classifiers on data that may carry a backdoor.

The defense is one layer, :class:`EigenGuard`, dropped into any model::

    import eigenguard
    model = eigenguard.create_model("preact_resnet18", in_channels=1, num_classes=10, width=16)
    eigenguard.guard(model, after="layer1", k=16)

The rest of the package is the benchmark that measures it: data sets, attacks, defenses, one
training loop, evaluation protocols and a result store.
"""
from .layer import EigenGuard, find_guards, filter_weights, guard, spectral_filter
from .models import create_model, list_models

__version__ = "0.1.0"

__all__ = ["EigenGuard", "spectral_filter", "filter_weights", "guard", "find_guards",
           "create_model", "list_models", "__version__"]
