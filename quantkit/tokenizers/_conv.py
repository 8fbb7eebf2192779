"""Convolutional encoder / decoder of the VQGAN family (ResNet blocks, single-head attention, stride-2 resampling).

Module names follow taming-transformers (``down.{level}.block.{i}``, ``mid.block_1``, ``up.{level}.upsample``...),
so a published state dict maps onto these modules by renaming only (see :mod:`quantkit.tokenizers.checkpoints`).
Decoder levels are indexed by resolution as in taming: ``up.0`` is full resolution and runs last.

Paper: Esser, Rombach, Ommer, "Taming Transformers for High-Resolution Image Synthesis", https://arxiv.org/abs/2012.09841
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(groups, channels), num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> conv3x3, plus a 1x1 shortcut when channels change."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions; q, k, v, proj_out are 1x1 convs."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))  # (B, HW, C)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, HW, C)
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Pad (0, 1, 0, 1) then conv3x3 stride 2 (taming's asymmetric padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2 then conv3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` (ResNet blocks), ``attn`` (one per block, or empty), and a resampler."""

    def __init__(self, cin: int, cout: int, num_blocks: int, attention: bool, groups: int):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(num_blocks))
        self.attn = nn.ModuleList(AttnBlock(cout, groups) for _ in range(num_blocks)) if attention else nn.ModuleList()

    def run(self, h: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int, attention: bool, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups) if attention else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """(B, in_ch, H, W) -> (B, z_channels, H / 2^(L-1), W / 2^(L-1)) with L = len(ch_mult) levels."""

    def __init__(self, in_channels: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 attn_levels: tuple[int, ...], z_channels: int, groups: int, mid_attention: bool = True):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        chans = [ch * m for m in (1, *ch_mult)]
        self.down = nn.ModuleList()
        for level in range(len(ch_mult)):
            stage = _Level(chans[level], chans[level + 1], num_res_blocks, level in attn_levels, groups)
            if level != len(ch_mult) - 1:
                stage.downsample = Downsample(chans[level + 1])
            self.down.append(stage)
        self.mid = _Mid(chans[-1], mid_attention, groups)
        self.norm_out = _norm(chans[-1], groups)
        self.conv_out = nn.Conv2d(chans[-1], z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            h = stage.run(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, out_ch, h * 2^(L-1), w * 2^(L-1)); ``up[level]`` has num_res_blocks + 1 blocks."""

    def __init__(self, out_channels: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 attn_levels: tuple[int, ...], z_channels: int, groups: int, mid_attention: bool = True):
        super().__init__()
        top = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, top, 3, padding=1)
        self.mid = _Mid(top, mid_attention, groups)
        up = []
        cin = top
        for level in reversed(range(len(ch_mult))):
            cout = ch * ch_mult[level]
            stage = _Level(cin, cout, num_res_blocks + 1, level in attn_levels, groups)
            if level != 0:
                stage.upsample = Upsample(cout)
            up.insert(0, stage)  # prepend: up[level] is resolution level `level`
            cin = cout
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(cin, groups)
        self.conv_out = nn.Conv2d(cin, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(range(len(self.up))):
            stage = self.up[level]
            h = stage.run(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def check_divisible(image_size: int, factor: int, owner: str) -> int:
    if image_size % factor:
        raise ValueError(f"{owner}: image_size {image_size} is not divisible by the downsampling factor {factor}; "
                         f"change image_size or the number of levels (ch_mult)")
    return image_size // factor


__all__ = ["AttnBlock", "Decoder", "Downsample", "Encoder", "ResnetBlock", "Upsample", "check_divisible"]
