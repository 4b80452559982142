"""Image data sets as in-memory uint8 tensors: loaders for the official file
formats (no download helpers, no image libraries), a name registry and batch
augmentation."""

from .augment import augment_batch, crop_and_flip, draw_augment_params
from .cifar import load_cifar
from .gtsrb import load_gtsrb
from .idx import load_idx
from .imageset import ImageSet, normalize
from .ppm import read_ppm
from .registry import DatasetInfo, dataset_info, list_datasets, load_dataset

__all__ = [
    "DatasetInfo",
    "ImageSet",
    "augment_batch",
    "crop_and_flip",
    "dataset_info",
    "draw_augment_params",
    "list_datasets",
    "load_cifar",
    "load_dataset",
    "load_gtsrb",
    "load_idx",
    "normalize",
    "read_ppm",
]
