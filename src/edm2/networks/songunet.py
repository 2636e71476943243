"""DDPM++ and NCSN++ (Song et al., "Score-Based Generative Modeling through Stochastic Differential Equations")
as one configurable U-Net, `SongUNet`, with the official options and parameter names (EDM paper, Appendix F.2).

DDPM++: positional noise embedding, standard encoder and decoder, channel_mult_noise 1, resample filter [1,1].
NCSN++: Fourier noise embedding, residual encoder, standard decoder, channel_mult_noise 2, filter [1,3,3,1].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.nn.functional import silu

from edm2.networks.edm_layers import Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock
from edm2.schedules import check_choice

__all__ = ["SongUNet", "EMBEDDING_TYPES", "ENCODER_TYPES", "DECODER_TYPES", "label_dropout_mask"]

EMBEDDING_TYPES = ("positional", "fourier")
ENCODER_TYPES = ("standard", "skip", "residual")
DECODER_TYPES = ("standard", "skip")


def label_dropout_mask(x: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
    """[N, 1] mask that drops each image's class label with probability p (classifier-free guidance training);
    drawn from the global generator, as the official networks do."""
    return (torch.rand([x.shape[0], 1], device=x.device) >= p).to(dtype)


class SongUNet(torch.nn.Module):
    """The DDPM++ / NCSN++ U-Net F(x; c_noise, class, augment labels) of the EDM paper's configurations."""

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        label_dropout: float = 0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: Sequence[float] = (1, 1),
    ) -> None:
        check_choice("embedding_type", embedding_type, EMBEDDING_TYPES)
        check_choice("encoder_type", encoder_type, ENCODER_TYPES)
        check_choice("decoder_type", decoder_type, DECODER_TYPES)
        super().__init__()
        self.label_dropout = label_dropout
        self.augment_dim = augment_dim
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=np.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5),
                            eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                            init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping of noise level, class and augment labels to the embedding.
        self.map_noise = PositionalEmbedding(noise_channels, endpoint=True) if embedding_type == "positional" \
            else FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        self._build_encoder(img_resolution, in_channels, model_channels, channel_mult, num_blocks, attn_resolutions,
                            encoder_type, resample_filter, block_kwargs, init)
        self._build_decoder(img_resolution, out_channels, model_channels, channel_mult, num_blocks, attn_resolutions,
                            decoder_type, resample_filter, block_kwargs, init_zero)

    def _build_encoder(self, img_resolution: int, in_channels: int, model_channels: int, channel_mult: Sequence[int],
                       num_blocks: int, attn_resolutions: Sequence[int], encoder_type: str,
                       resample_filter: Sequence[float], block_kwargs: dict, init: dict) -> None:
        """Encoder; the 'aux' modules carry the downsampled input image (skip / residual encoders)."""
        self.enc = torch.nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, kernel=0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, kernel=3, down=True,
                                                                   resample_filter=resample_filter,
                                                                   fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block_kwargs)

    def _build_decoder(self, img_resolution: int, out_channels: int, model_channels: int, channel_mult: Sequence[int],
                       num_blocks: int, attn_resolutions: Sequence[int], decoder_type: str,
                       resample_filter: Sequence[float], block_kwargs: dict, init_zero: dict) -> None:
        """Decoder; every block takes one skip connection, attention on the last block of a resolution."""
        skips = [block.out_channels for name, block in self.enc.items() if "aux" not in name]
        cout = skips[-1]
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # [sin, cos] order of the original
        if self.map_label is not None:
            tmp = class_labels
            if self.training and self.label_dropout:
                tmp = tmp * label_dropout_mask(x, self.label_dropout, tmp.dtype)
            emb = emb + self.map_label(tmp * np.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        emb = silu(self.map_layer1(emb))

        skips = []
        aux = x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / np.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        aux = tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux
