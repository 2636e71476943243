"""Data: datasets (image folder, zip, npz, the built-in digits) and the loader that feeds the training step."""

from edm2.data.datasets import ImageDataset, load_digits_dataset, open_dataset, to_model_space, to_uint8
from edm2.data.loader import BatchStream, InfiniteSampler

__all__ = ["ImageDataset", "open_dataset", "load_digits_dataset", "to_model_space", "to_uint8", "InfiniteSampler",
           "BatchStream"]
