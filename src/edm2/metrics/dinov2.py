"""The FD_DINOv2 feature network: the DINOv2 vision transformer (Oquab et al. 2023; ViT-L/14 for the metric of
the EDM2 paper), and the preprocessing of the official metric.

Module and parameter names are those of the published DINOv2 weights (`dinov2_vitl14_pretrain.pth`:
`cls_token`, `pos_embed`, `mask_token`, `patch_embed.proj.weight`, `blocks.<i>.norm1.weight`,
`blocks.<i>.attn.qkv.weight`, `blocks.<i>.ls1.gamma`, `blocks.<i>.mlp.fc1.weight`, `norm.weight`, ...), so the
file loads with strict names. The shape (width, depth) is read from the weights; heads have 64 channels as in
every published DINOv2. Preprocessing follows the EDM2 metric: uint8 RGB, bicubic antialiased resize to
224 x 224 (torch's, without clamping), scaled to [0, 1] and normalized with the ImageNet mean and std. The
positional embedding (trained at 518 x 518, 37 x 37 patches) is resampled to the input's patch grid with
torch's bicubic interpolation at scale (grid + 0.1) / 37, as the official model does. Features: the final
layer-normed class token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DinoVisionTransformer", "dinov2_preprocess", "DINOV2_SIZE", "IMAGENET_MEAN", "IMAGENET_STD"]

DINOV2_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEAD_CHANNELS = 64


def dinov2_preprocess(images: torch.Tensor, size: int = DINOV2_SIZE) -> torch.Tensor:
    """uint8 RGB [N, 3, H, W] -> normalized float32 [N, 3, size, size]."""
    x = F.interpolate(images.to(torch.float32), size=(size, size), mode="bicubic", antialias=True) / 255
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).reshape(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).reshape(1, -1, 1, 1)
    return (x - mean) / std


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(n, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head channels)) v
        return self.proj(y.transpose(1, 2).reshape(n, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block with layer scale: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoVisionTransformer(nn.Module):
    """DINOv2 ViT (the published backbones: no registers, MLP feed-forward, layer scale). `forward` takes
    uint8 RGB images and returns the class-token features [N, embed_dim]."""

    def __init__(self, img_size: int = 518, patch_size: int = 14, embed_dim: int = 1024, depth: int = 24,
                 num_heads: int = 16, mlp_ratio: float = 4.0, interpolate_offset: float = 0.1) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.interpolate_offset = interpolate_offset
        self.feature_dim = embed_dim
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # used in DINOv2 training only; in the file
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> DinoVisionTransformer:
        """The transformer whose shape the weights describe (width, depth, patch size, training resolution)."""
        try:
            embed_dim = state["cls_token"].shape[-1]
            patch_size = state["patch_embed.proj.weight"].shape[-1]
            grid = math.isqrt(state["pos_embed"].shape[1] - 1)
            depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
            hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
        except (KeyError, ValueError, IndexError) as e:
            raise ValueError(f"not DINOv2 ViT weights (no {e})") from None
        return cls(img_size=grid * patch_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                   num_heads=max(1, embed_dim // HEAD_CHANNELS), mlp_ratio=hidden / embed_dim)

    def interpolate_pos_encoding(self, h: int, w: int) -> torch.Tensor:
        """The positional embedding for an input of h x w pixels."""
        grid_h, grid_w = h // self.patch_size, w // self.patch_size
        pos = self.pos_embed.float()
        m = math.isqrt(pos.shape[1] - 1)
        if grid_h == grid_w == m:
            return self.pos_embed
        patch = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
        scale = ((grid_h + self.interpolate_offset) / m, (grid_w + self.interpolate_offset) / m)
        patch = F.interpolate(patch, scale_factor=scale, mode="bicubic")
        patch = patch.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat([pos[:, :1], patch], dim=1).to(self.pos_embed.dtype)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized images [N, 3, H, W] -> class-token features [N, embed_dim]."""
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + self.interpolate_pos_encoding(x.shape[2], x.shape[3])
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 RGB [N, 3, H, W] -> features [N, embed_dim]."""
        return self.features(dinov2_preprocess(images))
