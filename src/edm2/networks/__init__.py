"""Networks, one file per family. `edm2`: the EDM2 magnitude-preserving U-Net and its preconditioning
(`Block`, `UNet`, `Precond`), with the official parameter names.

The primitives of `edm2.layers` are re-exported here too, as the official `networks_edm2` module has them.
"""

from edm2.layers import MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize, resample
from edm2.networks.edm2 import LOW_PRECISION_DTYPES, PRECISIONS, Block, Precond, UNet

__all__ = ["Block", "UNet", "Precond", "PRECISIONS", "LOW_PRECISION_DTYPES",
           "normalize", "resample", "mp_silu", "mp_sum", "mp_cat", "MPFourier", "MPConv"]
