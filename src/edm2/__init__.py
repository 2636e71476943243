"""edm2: EDM2 diffusion models (Karras et al., CVPR 2024) for PyTorch, from a laptop CPU to many GPUs."""

__version__ = "0.1.0"
