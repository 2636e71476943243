"""Networks, one file per family, with the official parameter names. `edm2`: the EDM2 magnitude-preserving
U-Net and its preconditioning (`Block`, `UNet`, `Precond`). The EDM (2022) release: `edm_layers` (its blocks),
`songunet` (DDPM++ / NCSN++), `dhariwal` (ADM), `precond` (`VPPrecond`, `VEPrecond`, `iDDPMPrecond`,
`EDMPrecond`); `spec`: one description of every network (`NetworkConfig` for EDM2's, `EDMNetworkConfig` for the
EDM release's: an official class name and its arguments) and `build_network`, the one builder.

The primitives of `edm2.layers` are re-exported here too, as the official `networks_edm2` module has them.
"""

from edm2.layers import MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize, resample
from edm2.networks.dhariwal import DhariwalUNet
from edm2.networks.edm2 import LOW_PRECISION_DTYPES, PRECISIONS, Block, Precond, UNet
from edm2.networks.precond import EDMPrecond, VEPrecond, VPPrecond, iDDPMPrecond
from edm2.networks.songunet import SongUNet
from edm2.networks.spec import (
    NETWORK_CLASSES,
    EDMNetworkConfig,
    NetworkConfig,
    NetworkSpec,
    build_network,
    network_class_name,
    network_spec,
)

__all__ = ["Block", "UNet", "Precond", "PRECISIONS", "LOW_PRECISION_DTYPES",
           "normalize", "resample", "mp_silu", "mp_sum", "mp_cat", "MPFourier", "MPConv",
           "SongUNet", "DhariwalUNet", "VPPrecond", "VEPrecond", "iDDPMPrecond", "EDMPrecond", "NETWORK_CLASSES",
           "build_network", "network_class_name", "network_spec", "NetworkConfig", "EDMNetworkConfig", "NetworkSpec"]
