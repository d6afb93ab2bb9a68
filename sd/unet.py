"""The SD 2.1 denoising UNet, with the original module names (state-dict compatible).

Reproduces `UNetModel` of `ldm/modules/diffusionmodules/openaimodel.py` with SpatialTransformer /
BasicTransformerBlock of `ldm/modules/attention.py` as SD 2.1's v2-inference.yaml configures them: cos-first
sinusoidal timestep embedding, ResBlocks whose GroupNorm (eps 1e-5) computes in float32, transformers with
GroupNorm eps 1e-6 and linear proj_in/proj_out, GEGLU feed-forward (first half value, second half gate,
exact GELU), symmetric-padding Downsample, nearest Upsample, skip concatenation [h, skip].

`UNetModel.forward(x, t, context)` accepts int/float/tensor timesteps and turns them into a float32 (B,)
tensor before `denoise`, the tensor-only part that `sd.compile.compile_model` compiles (so that new
timestep values are data, not new graphs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sd.attention import AttendFn, CrossAttention
from sd.config import UNetConfig
from sd.layers import GroupNorm32, Upsample


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (B,) -> (B, dim): [cos(t*f), sin(t*f)], f_i = exp(-ln(max_period) * i / half)."""
    half = dim // 2
    # Built in float32 on t's device (the original builds it on the CPU and copies: same formula).
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (B, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedSequential(nn.Sequential):
    """Sequential whose children get (x, emb) if ResBlocks, (x, context) if transformers, else (x)."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(32, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(32, out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = (
            nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]  # (B, C_out, 1, 1) broadcast
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Conv 3x3 stride 2 with symmetric padding 1 (unlike the VAE's asymmetric padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)  # first half value, second half gate
        return value * F.gelu(gate)  # exact (erf) GELU


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, attend: AttendFn):
        super().__init__()
        # Registration order gives the original state-dict order: attn1, ff, attn2, norm1..3.
        self.attn1 = CrossAttention(dim, None, heads, dim_head, attend)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, attend)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = self.attn1(self.norm1(x)) + x  # self-attention
        x = self.attn2(self.norm2(x), context) + x  # cross-attention on the text
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        depth: int,
        context_dim: int,
        use_linear: bool,
        attend: AttendFn,
    ):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = GroupNorm32(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, attend) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1)  # (B, HW, C)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2)  # (B, C, H, W)
        if not self.use_linear:
            x = self.proj_out(x.contiguous())
        return x_in + x  # x_in first: the sum takes x_in's memory format (NCHW, or channels_last)


def _timesteps_tensor(t: Tensor | float, batch: int, device: torch.device) -> Tensor:
    """int/float/0-d/(1,)/(B,) timesteps -> contiguous float32 (B,) on `device` (fractional t allowed)."""
    t = torch.as_tensor(t, device=device).to(torch.float32).reshape(-1)
    # Always the same layout, so that a compiled `denoise` sees the same kind of input every step.
    return (t.expand(batch) if t.numel() == 1 else t).contiguous()


class UNetModel(nn.Module):
    def __init__(self, cfg: UNetConfig, attend: AttendFn):
        super().__init__()
        self.config = cfg
        self.clone_outputs = False  # set by sd.compile for modes that replay CUDA graphs
        ch, time_dim = cfg.model_channels, cfg.model_channels * 4

        def transformer(c: int) -> SpatialTransformer:
            heads = c // cfg.num_head_channels
            return SpatialTransformer(
                c,
                heads,
                cfg.num_head_channels,
                cfg.transformer_depth,
                cfg.context_dim,
                cfg.use_linear_in_transformer,
                attend,
            )

        self.time_embed = nn.Sequential(nn.Linear(ch, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))]
        )
        skip_channels, ds = [ch], 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, time_dim, mult * cfg.model_channels)]
                ch = mult * cfg.model_channels
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, time_dim, ch), transformer(ch), ResBlock(ch, time_dim, ch)
        )
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), time_dim, mult * cfg.model_channels)]
                ch = mult * cfg.model_channels
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(
            GroupNorm32(32, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1)
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def forward(self, x: Tensor, t: Tensor | float, context: Tensor) -> Tensor:
        """x (B, in_ch, h, w), t scalar or (B,), context (B, 77, context_dim) -> (B, out_ch, h, w)."""
        out = self.denoise(x, _timesteps_tensor(t, x.shape[0], x.device), context)
        # Graph-replaying compile modes reuse their output buffers; the samplers keep past outputs (PLMS).
        return out.clone() if self.clone_outputs else out

    def denoise(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        """The UNet proper on a float32 (B,) timestep tensor; what compile_model compiles."""
        dtype = self.dtype  # the parameters' dtype; under autocast the ops pick their own precision
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(dtype))  # (B, 4*ch)
        h, context = x.to(dtype), context.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)  # [h, skip]: h first
        return self.out(h).to(x.dtype)
