"""Datasets, safe archive reading, index splits and augmentation."""
from crl.data.augment import augment_batch, flip_batch
from crl.data.datasets import DATASET_NAMES, IMAGEFOLDER_PREFIX, load_dataset, load_imagefolder
from crl.data.splits import (
    PoolSplit,
    check_disjoint,
    half_split,
    make_pool_split,
    own_split,
    random_halves,
)
from crl.data.types import ImageData, normalize

__all__ = [
    "DATASET_NAMES", "IMAGEFOLDER_PREFIX", "ImageData", "PoolSplit", "augment_batch",
    "check_disjoint", "flip_batch", "half_split", "load_dataset", "load_imagefolder",
    "make_pool_split", "normalize", "own_split", "random_halves",
]
