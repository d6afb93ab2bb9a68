"""The SD 2.1 autoencoder (AutoencoderKL), with the original module names (state-dict compatible).

Reproduces `AutoencoderKL` of `ldm/models/autoencoder.py` and Encoder/Decoder of
`ldm/modules/diffusionmodules/model.py` as SD 2.1's v2-inference.yaml configures them: GroupNorm(32, eps
1e-6),
swish, ResnetBlocks with 1x1 `nin_shortcut`, encoder Downsample with asymmetric (0,1,0,1) zero padding and
an unpadded stride-2 conv, nearest Upsample, and the single-head mid-block attention, which runs through the
same attention kernels as the UNet (`attend` on (B, 1, HW, C)).

`encode(image)` returns the moments (mean and logvar, before the original's clamp to [-30, 20]);
`decode(z)` applies no scale factor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sd.attention import AttendFn
from sd.config import VAEConfig
from sd.layers import GroupNorm32, Upsample, fuse_projections


def Normalize(channels: int) -> nn.GroupNorm:  # noqa: N802 - the original's name
    return GroupNorm32(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # swish x*sigmoid(x) is F.silu
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions with 1x1-conv projections (scale C**-0.5)."""

    def __init__(self, channels: int, attend: AttendFn):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.attend = attend
        self.fused = False

    def fuse_projections(self) -> None:
        if not self.fused:
            fuse_projections(self, ("q", "k", "v"), "qkv")
            self.fused = True

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        qkv = self.qkv(y).chunk(3, dim=1) if self.fused else (self.q(y), self.k(y), self.v(y))
        # (B, C, H, W) -> (B, 1, HW, C): one head whose dimension is the channel count (copied so that
        # the channels are the contiguous last dim, which the fused kernels require).
        q, k, v = (t.permute(0, 2, 3, 1).reshape(b, 1, h * w, c).contiguous() for t in qkv)
        out = self.attend(q, k, v)  # (B, 1, HW, C)
        out = out.reshape(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right and bottom only (differs from the UNet)


def _level(
    blocks: list[nn.Module], attns: list[nn.Module], resample: nn.Module | None, name: str
) -> nn.Module:
    level = nn.Module()
    level.block, level.attn = nn.ModuleList(blocks), nn.ModuleList(attns)
    if resample is not None:
        setattr(level, name, resample)
    return level


def _mid(channels: int, dropout: float, attend: AttendFn) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout)
    mid.attn_1 = AttnBlock(channels, attend)
    mid.block_2 = ResnetBlock(channels, channels, dropout)
    return mid


def _run_level(level: nn.Module, h: Tensor) -> Tensor:
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


def _run_mid(mid: nn.Module, h: Tensor) -> Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig, attend: AttendFn):
        super().__init__()
        ch, res = cfg.ch, cfg.resolution
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        in_mult = (1, *cfg.ch_mult)
        for i, mult in enumerate(cfg.ch_mult):
            block_in, block_out = ch * in_mult[i], ch * mult
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in, attend))
            last = i == len(cfg.ch_mult) - 1
            self.down.append(_level(blocks, attns, None if last else Downsample(block_in), "downsample"))
            res = res if last else res // 2
        self.mid = _mid(block_in, cfg.dropout, attend)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(
            block_in, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, padding=1
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig, attend: AttendFn):
        super().__init__()
        block_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // 2 ** (len(cfg.ch_mult) - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, cfg.dropout, attend)
        levels: list[nn.Module] = []
        for i in reversed(range(len(cfg.ch_mult))):  # built from the lowest resolution up, stored by level
            block_out = cfg.ch * cfg.ch_mult[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, cfg.dropout))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(block_in, attend))
            levels.insert(0, _level(blocks, attns, Upsample(block_in) if i else None, "upsample"))
            res = res * 2 if i else res
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):  # up.3 (lowest resolution) first
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig, attend: AttendFn):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg, attend)
        self.decoder = Decoder(cfg, attend)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    def encode(self, image: Tensor) -> Tensor:
        """image (B, 3, H, W) in [-1, 1] -> moments (B, 2*embed_dim, H/8, W/8): [mean, logvar], unclamped."""
        return self.quant_conv(self.encoder(image.to(self.dtype))).to(image.dtype)

    def decode(self, z: Tensor) -> Tensor:
        """latents (B, embed_dim, h, w), already divided by the scale factor -> image (B, 3, 8h, 8w)."""
        return self.decoder(self.post_quant_conv(z.to(self.dtype))).to(z.dtype)

    def forward(self, z: Tensor) -> Tensor:
        return self.decode(z)


def moments_to_mean_std(moments: Tensor) -> tuple[Tensor, Tensor]:
    """DiagonalGaussianDistribution: split [mean, logvar], clamp logvar to [-30, 20], std = exp(logvar/2)."""
    mean, logvar = torch.chunk(moments, 2, dim=1)
    return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
