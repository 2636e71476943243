"""Data: datasets (image or latent folders and zips read from disk, npz and the built-in digits in memory), the
encoders between pixels and the network's space, the loader that feeds the training step, and the dataset tool."""

from edm2.data.datasets import ImageDataset, load_dataset, load_digits_dataset, open_dataset, to_model_space, to_uint8
from edm2.data.encoders import Encoder, StabilityVAEEncoder, StandardRGBEncoder, encoder_from_dict
from edm2.data.folder import ImageFolderDataset
from edm2.data.loader import BatchStream, InfiniteSampler, TrainingSet

__all__ = ["ImageDataset", "ImageFolderDataset", "open_dataset", "load_dataset", "load_digits_dataset",
           "to_model_space", "to_uint8", "Encoder", "StandardRGBEncoder", "StabilityVAEEncoder", "encoder_from_dict",
           "InfiniteSampler", "TrainingSet", "BatchStream"]
