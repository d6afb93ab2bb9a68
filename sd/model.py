"""The whole SD 2.1 model (`StableDiffusion`) and `load_model`, its one constructor.

Reproduces the inference side of `LatentDiffusion` (`ldm/models/diffusion/ddpm.py`): the UNet
under `model.diffusion_model`, the autoencoder as `first_stage_model`, the OpenCLIP text encoder as
`cond_stage_model.model` and the 12 schedule buffers at top level, so that `state_dict()` has exactly the
keys and shapes of the original checkpoints. `scale_factor` is a plain float, as in the original.

Random weights (no checkpoint) are deterministic from `seed`: the modules are built and initialised on the
CPU under a private RNG, with PyTorch's default layer initialisation. The original zero-initialises the
ResBlocks' last conv, the transformers' proj_out and the UNet's output conv; we never zero them, so the
outputs of a random model depend on its inputs (the same effect as re-initialising them).

With a checkpoint the random initialisation is skipped (about 15 s of CPU time for sd21-base): strict
loading then overwrites every parameter and persistent buffer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn

from sd import capabilities
from sd.attention import AttendFn, CrossAttention, resolve_attention, resolve_with_fallback
from sd.config import ModelConfig, load_config
from sd.errors import AttentionUnavailable
from sd.schedule import schedule_buffers
from sd.text_encoder import OpenCLIPTextEncoder
from sd.unet import UNetModel
from sd.vae import AttnBlock, AutoencoderKL
from sd.weights import check_checkpoint_path, load_checkpoint


class DiffusionWrapper(nn.Module):
    """The original's `model` wrapper: holds the UNet as `diffusion_model` (cross-attention conditioning)."""

    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet

    def forward(self, x: Tensor, t: Tensor | float, context: Tensor) -> Tensor:
        return self.diffusion_model(x, t, context)


def vae_head_dims(config: ModelConfig) -> tuple[int, ...]:
    """The VAE's attention runs one head as wide as its channels (512 for SD 2.1's mid-block)."""
    vae = config.vae
    return tuple(
        sorted({vae.ch * m for m in vae.ch_mult} if vae.attn_resolutions else {vae.ch * vae.ch_mult[-1]})
    )


def resolve_model_attention(
    config: ModelConfig, attention: str, vae_attention: str | None, device: torch.device, dtype: torch.dtype
) -> tuple[AttendFn, str, AttendFn]:
    """(UNet kernel, VAE backend name, VAE kernel), each checked on device/dtype at the head dims it sees.

    The UNet's backend is resolved first, so a backend that cannot run names the UNet's kernel. With
    vae_attention=None the VAE takes `attention` if it runs at the VAE's head dim, else the first of that
    backend's fallbacks that does (sd.attention's table: same family first, then sdpa, sdpa-math, original).
    """
    attend = resolve_attention(attention, device, dtype, (config.unet.num_head_channels,))
    dims = vae_head_dims(config)
    if vae_attention is None:
        return (attend, *resolve_with_fallback(attention, device, dtype, dims))
    try:
        return attend, vae_attention, resolve_attention(vae_attention, device, dtype, dims)
    except AttentionUnavailable as exc:
        raise AttentionUnavailable(
            f"For the VAE's mid-block attention (one head of dim {max(dims)}): {exc} "
            "Pass vae_attention=None to let the VAE take the first backend that runs there."
        ) from None


def fuse_model_projections(model: nn.Module) -> None:
    """Fuse every attention's projections (self-attention QKV, cross-attention KV, the VAE's QKV) into
    one matmul each; state_dict keys stay the original's (see sd.layers.fuse_projections)."""
    for module in model.modules():
        if isinstance(module, (CrossAttention, AttnBlock)):
            module.fuse_projections()


class StableDiffusion(nn.Module):
    """SD 2.1 for inference. Build it with `load_model`; see the module docstring for the layout."""

    betas: Tensor
    alphas_cumprod: Tensor

    def __init__(
        self,
        config: ModelConfig,
        attention: str,
        attend: AttendFn,
        vae_attention: str,
        vae_attend: AttendFn,
    ):
        super().__init__()
        for name, value in schedule_buffers(config.linear_start, config.linear_end, config.timesteps).items():
            self.register_buffer(name, value)  # float32 (timesteps,), top-level keys as in the original
        self.model = DiffusionWrapper(UNetModel(config.unet, attend))
        self.first_stage_model = AutoencoderKL(config.vae, vae_attend)
        self.cond_stage_model = OpenCLIPTextEncoder(config.text)
        self.config = config
        self.parameterization = config.parameterization
        self.scale_factor = float(config.scale_factor)
        self.attention = attention  # the backend of the UNet's attention
        self.vae_attention = vae_attention  # the backend of the VAE's, which may differ (see load_model)
        self.compile_mode: str | None = None  # set by sd.compile.compile_model
        self.fused_projections = False
        self.channels_last = False
        self.checkpoint: str | None = None  # the file the weights came from; None for random weights

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def text_encoder(self) -> OpenCLIPTextEncoder:
        return self.cond_stage_model

    def tokenize(self, prompts: str | list[str]) -> Tensor:
        """open_clip tokens, LongTensor (B, 77)."""
        return self.cond_stage_model.tokenize(prompts)

    def encode_text(self, prompts: str | list[str]) -> Tensor:
        """Prompts -> (B, 77, width) cross-attention context (penultimate layer + ln_final for SD 2.1)."""
        return self.cond_stage_model.encode(prompts)

    def decode_latents(self, z: Tensor) -> Tensor:
        """Latents (B, C, h, w) from a sampler -> float32 image (B, 3, 8h, 8w) in [0, 1].

        As the original decode_first_stage and txt2img: decode(z / scale_factor) in the VAE's dtype, then
        clamp((x + 1) / 2, 0, 1).
        """
        image = self.vae.decode((z / self.scale_factor).to(self.vae.dtype))
        return ((image.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def set_attention(self, name: str, vae_attention: str | None = None) -> None:
        """Switch the UNet's attention (and the VAE's, as load_model chooses it) to other kernels,
        checked on this model's device/dtype. A compiled UNet recompiles on its next call."""
        weight = self.unet.time_embed[0].weight
        attend, vae_name, vae_attend = resolve_model_attention(
            self.config, name, vae_attention, weight.device, weight.dtype
        )
        for part, kernel in ((self.unet, attend), (self.vae, vae_attend)):
            for module in part.modules():
                if hasattr(module, "attend"):
                    module.attend = kernel
        self.attention, self.vae_attention = name, vae_name


@contextmanager
def skip_weight_init() -> Iterator[None]:
    """Make `torch.nn.init`'s in-place initialisers no-ops while modules are built.

    Parameters keep whatever `torch.empty` gave them, so only use it when every parameter and persistent
    buffer is loaded afterwards (strict loading checks that). Buffers computed in `__init__` (causal masks,
    schedules) do not go through `torch.nn.init` and are built as usual. Restored on exit, also on errors.
    """
    init = torch.nn.init
    names = [n for n in dir(init) if n.endswith("_") and not n.startswith("_") and callable(getattr(init, n))]
    saved = {n: getattr(init, n) for n in names}

    def keep(tensor: Tensor, *args: object, **kwargs: object) -> Tensor:
        return tensor

    try:
        for n in names:
            setattr(init, n, keep)
        yield
    finally:
        for n, fn in saved.items():
            setattr(init, n, fn)


def load_model(
    config_or_preset: str | Path | ModelConfig,
    ckpt: str | Path | None = None,
    *,
    attention: str = "original",
    vae_attention: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    unsafe_pickle: bool = False,
    channels_last: bool = False,
    fuse_projections: bool = False,
) -> StableDiffusion:
    """Build SD 2.1 from a preset name ("sd21-base", "sd21-v", "tiny"), an LDM YAML path or a ModelConfig.

    ckpt: a .safetensors or .ckpt file (strictly checked, non-finite weights refused), or None for random
    weights from `seed`. attention: one of sd.ATTENTION_BACKENDS for the UNet; AttentionUnavailable
    (naming it) if it cannot run on `device`/`dtype`. vae_attention: the kernel of the VAE's single
    512-wide head (flash and cuDNN stop at head dim 256); None means `attention` where it runs at that
    head dim, else the first of its fallbacks that does (see sd.attention). Both are recorded
    (`model.attention`, `model.vae_attention`).
    device "meta" builds without memory (for key/shape checks). The schedule buffers stay float32 in every
    dtype. channels_last puts the conv weights in channels-last memory format. fuse_projections computes
    each attention's Q, K, V (self) or K, V (cross, and the VAE's) with one matmul; the state dict keeps
    the original keys. Both are recorded (`model.channels_last`, `model.fused_projections`). Returns the
    model in eval mode without gradients.
    """
    config = config_or_preset if isinstance(config_or_preset, ModelConfig) else load_config(config_or_preset)
    if ckpt is not None:
        check_checkpoint_path(ckpt)  # a wrong path fails before minutes of model building
    device = torch.device(device)
    attend, vae_name, vae_attend = resolve_model_attention(config, attention, vae_attention, device, dtype)
    # Initialised on the CPU, so that a seed gives the same weights on every device; a "meta" model is
    # built directly on meta where PyTorch can (2.x), else on the CPU and moved below.
    build_on = (
        capabilities.device_context(device) if device.type == "meta" and ckpt is None else nullcontext()
    )
    init = skip_weight_init() if ckpt is not None else nullcontext()  # loading overwrites every weight
    with torch.random.fork_rng(devices=[]), build_on, init:
        torch.manual_seed(seed)
        model = StableDiffusion(config, attention, attend, vae_name, vae_attend)
    if ckpt is not None:
        load_checkpoint(model, ckpt, unsafe_pickle=unsafe_pickle, strict=True)
        model.checkpoint = str(ckpt)  # read by the pipeline's random-weights warning
    if fuse_projections:
        fuse_model_projections(model)
        model.fused_projections = True
    model.to(device)
    for part in (model.model, model.first_stage_model, model.cond_stage_model):
        part.to(dtype)  # not the top level: alphas_cumprod & co stay float32
    if channels_last:
        model.to(memory_format=torch.channels_last)
        model.channels_last = True
    model.eval().requires_grad_(False)
    return model
