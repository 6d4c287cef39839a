"""Data: classification data sets held in memory and batch augmentation on the device."""

from cnnkit.data.classification import (
    DataSplits,
    ImageDataset,
    RestrictedUnpickler,
    load_data,
    load_image,
)
from cnnkit.data.transforms import BatchAugment, cutout, random_crop, random_flip

__all__ = [
    "BatchAugment",
    "DataSplits",
    "ImageDataset",
    "RestrictedUnpickler",
    "cutout",
    "load_data",
    "load_image",
    "random_crop",
    "random_flip",
]
