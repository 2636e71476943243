"""edm2: EDM2 diffusion models (Karras et al., CVPR 2024) for PyTorch, from a laptop CPU to many GPUs."""

from edm2 import _moved

__version__ = "0.1.0"

_moved.install()
