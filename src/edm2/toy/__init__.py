"""The 2D demonstration of autoguidance ("Guiding a Diffusion Model with a Bad Version of Itself", Karras et al.,
NeurIPS 2024): a tree-shaped two-class Gaussian mixture with its exact density and score (`mixture`), a small MLP
denoiser trained on a CPU in minutes (`model`), sampling with classifier-free guidance and autoguidance
(`guidance`), the figure (`plot`) and the experiment end to end (`experiment`)."""

from edm2.toy.experiment import *  # noqa: F403
from edm2.toy.experiment import __all__ as _experiment
from edm2.toy.guidance import *  # noqa: F403
from edm2.toy.guidance import __all__ as _guidance
from edm2.toy.mixture import *  # noqa: F403
from edm2.toy.mixture import __all__ as _mixture
from edm2.toy.model import *  # noqa: F403
from edm2.toy.model import __all__ as _model
from edm2.toy.plot import *  # noqa: F403
from edm2.toy.plot import __all__ as _plot

__all__ = [*_mixture, *_model, *_guidance, *_plot, *_experiment]
