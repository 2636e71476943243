"""The published EDM2 models by name: the generation presets of the official `generate_images.py` (main network,
guide, EMA length, guidance weight) with the FID / FD_DINOv2 the papers report for each, and the guidance-interval
settings of Kynkaenniemi et al. (NeurIPS 2024). Plain data: the files are opened by URL (`edm2.files.download`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from edm2.sampling import SamplerSettings

__all__ = ["MODEL_ROOT", "REF_ROOT", "GenerationPreset", "GENERATION_PRESETS", "generation_preset",
           "reference_url"]

MODEL_ROOT = "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions"
REF_ROOT = "https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs"
METRIC_NAMES = {"fid": "FID", "dino": "FD_DINOv2"}


@dataclass(frozen=True)
class GenerationPreset:
    """One published way of sampling: `net` and `gnet` are file names under `MODEL_ROOT`, `reported` the metric
    value the paper gives for it (`metric`: 'fid' or 'fd_dinov2'), `source` where the setting comes from."""

    name: str
    net: str
    gnet: str | None
    guidance: float
    reported: float
    guidance_interval: tuple[float, float] | None = None
    source: str = "EDM2 generate_images.py"

    @property
    def metric(self) -> str:
        return "fd_dinov2" if self.name.endswith("-dino") else "fid"

    @property
    def net_url(self) -> str:
        return f"{MODEL_ROOT}/{self.net}"

    @property
    def gnet_url(self) -> str | None:
        return None if self.gnet is None else f"{MODEL_ROOT}/{self.gnet}"

    @property
    def dataset(self) -> str:
        """'img512' or 'img64': the ImageNet resolution the model was trained at."""
        return self.name.split("-")[1]

    @property
    def ref_url(self) -> str:
        """The reference statistics the official README measures this model against."""
        return reference_url(self.dataset)

    @property
    def ema(self) -> float:
        """The main network's EMA length sigma_rel (its file name ends in -<kimg>-<sigma_rel>.pkl)."""
        return float(self.net.rsplit("-", 1)[1].removesuffix(".pkl"))

    def settings(self) -> SamplerSettings:
        """The official sampler settings (edm_sampler's defaults) with this preset's guidance."""
        return SamplerSettings(guidance=self.guidance, guidance_interval=self.guidance_interval)


def reference_url(dataset: str) -> str:
    """The official reference statistics of 'img512' or 'img64'."""
    return f"{REF_ROOT}/{dataset}.pkl"


def _rows() -> list[GenerationPreset]:
    """The official table, one row per preset: (name, net, gnet, guidance, reported metric)."""
    xs_u = "edm2-img512-xs-uncond-2147483-{}.pkl"
    table = [
        ("edm2-img512-xs-fid", "edm2-img512-xs-2147483-0.135.pkl", None, 1.0, 3.53),
        ("edm2-img512-xs-dino", "edm2-img512-xs-2147483-0.200.pkl", None, 1.0, 103.39),
        ("edm2-img512-s-fid", "edm2-img512-s-2147483-0.130.pkl", None, 1.0, 2.56),
        ("edm2-img512-s-dino", "edm2-img512-s-2147483-0.190.pkl", None, 1.0, 68.64),
        ("edm2-img512-m-fid", "edm2-img512-m-2147483-0.100.pkl", None, 1.0, 2.25),
        ("edm2-img512-m-dino", "edm2-img512-m-2147483-0.155.pkl", None, 1.0, 58.44),
        ("edm2-img512-l-fid", "edm2-img512-l-1879048-0.085.pkl", None, 1.0, 2.06),
        ("edm2-img512-l-dino", "edm2-img512-l-1879048-0.155.pkl", None, 1.0, 52.25),
        ("edm2-img512-xl-fid", "edm2-img512-xl-1342177-0.085.pkl", None, 1.0, 1.96),
        ("edm2-img512-xl-dino", "edm2-img512-xl-1342177-0.155.pkl", None, 1.0, 45.96),
        ("edm2-img512-xxl-fid", "edm2-img512-xxl-0939524-0.070.pkl", None, 1.0, 1.91),
        ("edm2-img512-xxl-dino", "edm2-img512-xxl-0939524-0.150.pkl", None, 1.0, 42.84),
        ("edm2-img64-s-fid", "edm2-img64-s-1073741-0.075.pkl", None, 1.0, 1.58),
        ("edm2-img64-m-fid", "edm2-img64-m-2147483-0.060.pkl", None, 1.0, 1.43),
        ("edm2-img64-l-fid", "edm2-img64-l-1073741-0.040.pkl", None, 1.0, 1.33),
        ("edm2-img64-xl-fid", "edm2-img64-xl-0671088-0.040.pkl", None, 1.0, 1.33),
        ("edm2-img512-xs-guid-fid", "edm2-img512-xs-2147483-0.045.pkl", xs_u.format("0.045"), 1.40, 2.91),
        ("edm2-img512-xs-guid-dino", "edm2-img512-xs-2147483-0.150.pkl", xs_u.format("0.150"), 1.70, 79.94),
        ("edm2-img512-s-guid-fid", "edm2-img512-s-2147483-0.025.pkl", xs_u.format("0.025"), 1.40, 2.23),
        ("edm2-img512-s-guid-dino", "edm2-img512-s-2147483-0.085.pkl", xs_u.format("0.085"), 1.90, 52.32),
        ("edm2-img512-m-guid-fid", "edm2-img512-m-2147483-0.030.pkl", xs_u.format("0.030"), 1.20, 2.01),
        ("edm2-img512-m-guid-dino", "edm2-img512-m-2147483-0.015.pkl", xs_u.format("0.015"), 2.00, 41.98),
        ("edm2-img512-l-guid-fid", "edm2-img512-l-1879048-0.015.pkl", xs_u.format("0.015"), 1.20, 1.88),
        ("edm2-img512-l-guid-dino", "edm2-img512-l-1879048-0.035.pkl", xs_u.format("0.035"), 1.70, 38.20),
        ("edm2-img512-xl-guid-fid", "edm2-img512-xl-1342177-0.020.pkl", xs_u.format("0.020"), 1.20, 1.85),
        ("edm2-img512-xl-guid-dino", "edm2-img512-xl-1342177-0.030.pkl", xs_u.format("0.030"), 1.70, 35.67),
        ("edm2-img512-xxl-guid-fid", "edm2-img512-xxl-0939524-0.015.pkl", xs_u.format("0.015"), 1.20, 1.81),
        ("edm2-img512-xxl-guid-dino", "edm2-img512-xxl-0939524-0.015.pkl", xs_u.format("0.015"), 1.70, 33.09),
        ("edm2-img512-s-autog-fid", "edm2-img512-s-2147483-0.070.pkl", "edm2-img512-xs-0134217-0.125.pkl",
         2.10, 1.34),
        ("edm2-img512-s-autog-dino", "edm2-img512-s-2147483-0.120.pkl", "edm2-img512-xs-0134217-0.165.pkl",
         2.45, 36.67),
        ("edm2-img512-xxl-autog-fid", "edm2-img512-xxl-0939524-0.075.pkl", "edm2-img512-m-0268435-0.155.pkl",
         2.05, 1.25),
        ("edm2-img512-xxl-autog-dino", "edm2-img512-xxl-0939524-0.130.pkl", "edm2-img512-m-0268435-0.205.pkl",
         2.30, 24.18),
        ("edm2-img512-s-uncond-autog-fid", "edm2-img512-s-uncond-2147483-0.070.pkl",
         "edm2-img512-xs-uncond-0134217-0.110.pkl", 2.85, 3.86),
        ("edm2-img512-s-uncond-autog-dino", "edm2-img512-s-uncond-2147483-0.090.pkl",
         "edm2-img512-xs-uncond-0134217-0.125.pkl", 2.90, 90.39),
        ("edm2-img64-s-autog-fid", "edm2-img64-s-1073741-0.045.pkl", "edm2-img64-xs-0134217-0.110.pkl", 1.70, 1.01),
        ("edm2-img64-s-autog-dino", "edm2-img64-s-1073741-0.105.pkl", "edm2-img64-xs-0134217-0.175.pkl", 2.20, 31.85),
    ]
    rows = [GenerationPreset(*row) for row in table]
    # Guidance interval (Kynkaenniemi et al. 2024, Table 1): classifier-free guidance only for sigma in
    # (0.28, 5.42], with a higher weight; the networks of the -guid-fid presets.
    band = (0.28, 5.42)
    rows += [
        GenerationPreset("edm2-img512-s-guid-interval-fid", "edm2-img512-s-2147483-0.025.pkl", xs_u.format("0.025"),
                         2.10, 1.68, band, "Kynkaenniemi et al. 2024"),
        GenerationPreset("edm2-img512-xxl-guid-interval-fid", "edm2-img512-xxl-0939524-0.015.pkl",
                         xs_u.format("0.015"), 2.00, 1.40, band, "Kynkaenniemi et al. 2024"),
    ]
    return rows


GENERATION_PRESETS: dict[str, GenerationPreset] = {p.name: p for p in _rows()}


def generation_preset(name: str) -> GenerationPreset:
    """The preset called `name`; ValueError naming the closest ones for an unknown name."""
    if name in GENERATION_PRESETS:
        return GENERATION_PRESETS[name]
    close = difflib.get_close_matches(name, GENERATION_PRESETS, n=4, cutoff=0.5)
    hint = f"closest: {', '.join(close)}" if close else "'edm2 info --generation' lists them"
    raise ValueError(f"unknown generation preset {name!r}; {hint}")
