"""EDM2's ablation ladder (EDM2 Table 1) as training setups: `config_preset(preset, "A".."G")` is the preset's
network and recipe at one configuration. G returns the preset itself (the official network and recipe); the other
letters change what the paper's step changes, and nothing else (the choices: docs/ablation.md).

- A: EDM's ADM network (`DhariwalUNet` in `EDMPrecond`, attention also at half the resolution, dropout 0.1) with
  EDM's recipe: EDM's loss and noise levels (P_mean -1.2, P_std 1.2), a traditional EMA, Adam betas (0.9, 0.999),
  a constant learning rate of the preset's alpha_ref / 50 (EDM's 2e-4 at EDM2-S).
- B: the preset's hyper-parameters (noise levels, power-function EMAs, Adam betas, dropout), EDM2's
  uncertainty-weighted loss (an uncertainty head on the ADM network), no attention at half the resolution; the
  learning rate stays constant at alpha_ref / 50.
- C to G: EDM2's U-Net with the switches of `edm2.networks.ladder`; C keeps alpha_ref / 50 (its weights are
  He-uniform, not unit-norm), D the preset's alpha_ref; both at a constant rate. E, F and G add the
  inverse-square-root decay, the preset's schedule.
"""

from __future__ import annotations

import dataclasses

from edm2.networks.ladder import NETWORK_CONFIGS
from edm2.networks.spec import EDMNetworkConfig, NetworkConfig
from edm2.presets import EDMRecipe, Preset

__all__ = ["CONFIGS", "config_preset", "ADM_LR_RATIO", "EDM_P_MEAN", "EDM_P_STD"]

CONFIGS = ("A", "B", *NETWORK_CONFIGS)
ADM_LR_RATIO = 50  # A-C: alpha_ref / 50, EDM's 2e-4 for ADM at EDM2-S's 0.01
EDM_P_MEAN, EDM_P_STD = -1.2, 1.2  # EDM's training noise levels (configuration A)
ADM_DROPOUT = 0.10  # EDM's ADM on ImageNet-64
CONSTANT_LR = ("A", "B", "C", "D")  # no decay before E


def config_preset(preset: Preset, config: str) -> Preset:
    """`preset` (an EDM2 preset) at ablation configuration `config` (A to G; G: `preset` itself). ValueError for
    an unknown letter or a preset of the EDM (2022) release, which is not on the ladder."""
    if config not in CONFIGS:
        raise ValueError(f"--config is one of {', '.join(CONFIGS)} (EDM2 Table 1), got {config!r}")
    net = preset.network
    if preset.edm is not None or not isinstance(net, NetworkConfig):
        raise ValueError(f"--config applies to the EDM2 presets; {preset.name} is an EDM (2022) setup, not on EDM2's "
                         "ablation ladder: choose an edm2-* or cpu-* preset")
    if net.config != "G":
        raise ValueError(f"preset {preset.name} is already configuration {net.config}; start from a G preset")
    if config == "G":
        return preset
    tr = preset.training
    training = dataclasses.replace(tr, lr=tr.lr / ADM_LR_RATIO if config in "ABC" else tr.lr,
                                   decay=0 if config in CONSTANT_LR else tr.decay)
    edm = None
    if config in "AB":
        network = _adm_network(net, config)
        if config == "A":
            training = dataclasses.replace(training, P_mean=EDM_P_MEAN, P_std=EDM_P_STD, ema_stds=())
            # The half-life follows the run: at most 5 % of the images seen (EDM's ramp-up ratio) ends the preset's
            # duration at that cap.
            edm = EDMRecipe(loss="EDMLoss", augment=0.0, ema_halflife_Mimg=0.05 * tr.duration / 1e6,
                            ema_rampup_ratio=0.05)
    else:
        network = net.replace(config=config)
    return dataclasses.replace(preset, description=f"{preset.description}; EDM2 Table 1 configuration {config}",
                               network=network, training=training, edm=edm)


def _adm_network(net: NetworkConfig, config: str) -> EDMNetworkConfig:
    """EDM's ADM network in the shape of EDM2's `net` (width, levels, blocks, embedding width); A adds attention at
    half the resolution, B has an uncertainty head for EDM2's loss."""
    attn = sorted(set(net.attn_resolutions) | ({net.img_resolution // 2} if config == "A" else set()), reverse=True)
    emb_mult = net.channel_mult_emb if net.channel_mult_emb is not None else max(net.channel_mult)
    kwargs = dict(img_resolution=net.img_resolution, img_channels=net.img_channels, label_dim=net.label_dim,
                  use_fp16=net.use_fp16, sigma_data=net.sigma_data, model_type="DhariwalUNet",
                  model_channels=net.model_channels, channel_mult=list(net.channel_mult), channel_mult_emb=emb_mult,
                  num_blocks=net.num_blocks, attn_resolutions=attn,
                  dropout=ADM_DROPOUT if config == "A" else net.dropout)
    if config == "B":
        kwargs["logvar_channels"] = net.logvar_channels
    return EDMNetworkConfig("EDMPrecond", kwargs)
