"""The SD 2.1 text encoder: OpenCLIP's text transformer, as the original FrozenOpenCLIPEmbedder uses it.

SD 2.1 builds OpenCLIP ViT-H-14, deletes the vision tower and encodes prompts with the token embedding,
the causal text transformer stopped before its last block ("penultimate") and ln_final; no pooling, no
projection (ldm/modules/encoders/modules.py). Here only the text tower is built, from open_clip's own
Transformer and LayerNorm, with the architecture looked up by name in open_clip's model-config registry;
the module names give the checkpoint keys of `cond_stage_model.model.*` exactly. The tokenizer is
open_clip's (CLIP BPE, SOT/EOT, zero padding to 77).

open_clip changed its text blocks from sequence-first (2.0.2, 2.7.0: what SD 2.1 was written for) to
batch-first (>= 2.26); the original code still permutes to sequence-first and silently mixes the batch on
new open_clip. `forward` asks the transformer which layout its blocks expect, so both are right.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import math
from pathlib import Path

import open_clip
import torch
from torch import nn

from sd import capabilities
from sd.config import TextEncoderConfig
from sd.errors import ConfigError

PACKAGE_CONFIGS = Path(__file__).parent / "configs" / "open_clip"
LAYERS = {"last": 0, "penultimate": 1}  # how many final blocks to skip (the original's layer_idx)

# text_cfg entries that change the classic CLIP text tower; SD 2.1's encoder has none of them.
_UNSUPPORTED = (
    "hf_model_name",
    "embed_cls",
    "no_causal_mask",
    "ls_init_value",
    "qk_norm",
    "scaled_cosine_attn",
    "scale_heads",
    "scale_attn_inner",
    "scale_attn",
    "scale_fc",
    "norm_kwargs",
    "act_kwargs",
    "block_type",
)


def _registry_lookup(arch: str) -> dict | None:
    get_model_config = getattr(open_clip, "get_model_config", None)
    if get_model_config is not None:
        return get_model_config(arch)
    # open_clip < 2.8 has no get_model_config; its registry is the same dict get_model_config reads.
    config = open_clip.factory._MODEL_CONFIGS.get(arch)
    return copy.deepcopy(config) if config is not None else None


def open_clip_arch_config(arch: str) -> dict:
    """open_clip's model config (embed_dim, text_cfg, ...) for `arch`, registering sd/configs/open_clip.

    Raises ConfigError for names open_clip does not know, saying how to register one.
    """
    if ":" in arch:  # "hf-hub:..." / "local-dir:..." would download or read arbitrary folders
        raise ConfigError(
            f"text encoder arch {arch!r}: only open_clip model-config names are supported (no hf-hub: or "
            "local-dir: schemas); register a JSON config with open_clip.add_model_config(path)."
        )
    config = _registry_lookup(arch)
    if config is None and PACKAGE_CONFIGS.is_dir():
        shipped = {p.stem for p in PACKAGE_CONFIGS.glob("*.json")}
        if not shipped <= set(open_clip.list_models()):
            open_clip.add_model_config(PACKAGE_CONFIGS)
            config = _registry_lookup(arch)
    if config is None:
        close = difflib.get_close_matches(arch, open_clip.list_models(), n=5)
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise ConfigError(
            f"unknown open_clip architecture {arch!r} for the text encoder: it is not in open_clip's "
            f"model-config registry.{hint} Register one before building the model with "
            "open_clip.add_model_config('/path/to/NAME.json') (an open_clip model config: embed_dim, "
            "text_cfg with context_length, vocab_size, width, heads, layers, and a vision_cfg, which "
            "open_clip's registry requires but is not built here), or add NAME.json to "
            f"{PACKAGE_CONFIGS}."
        )
    return config


def _open_clip_blocks():
    """(Transformer, LayerNorm, QuickGELU) of the installed open_clip (open_clip.transformer since 2.1)."""
    try:
        from open_clip.transformer import LayerNorm, QuickGELU, Transformer
    except ImportError:  # open_clip 2.0.x keeps them in open_clip.model
        from open_clip.model import LayerNorm, QuickGELU, Transformer
    return Transformer, LayerNorm, QuickGELU


class CLIPTextTower(nn.Module):
    """The text half of open_clip's CLIP: the submodules and names of `cond_stage_model.model`.

    Registration order follows open_clip's CLIP, so `state_dict()` lists the keys in the checkpoint's order.
    """

    def __init__(self, embed_dim: int, text_cfg: dict, quick_gelu: bool = False, init: bool = True):
        super().__init__()
        Transformer, LayerNorm, QuickGELU = _open_clip_blocks()
        width, layers, heads = text_cfg["width"], text_cfg["layers"], text_cfg["heads"]
        context_length = text_cfg.get("context_length", 77)
        act_layer = QuickGELU if quick_gelu else nn.GELU
        self.transformer = Transformer(
            width=width,
            layers=layers,
            heads=heads,
            mlp_ratio=text_cfg.get("mlp_ratio", 4.0),
            act_layer=act_layer,
        )
        self.token_embedding = nn.Embedding(text_cfg.get("vocab_size", 49408), width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        # Additive causal mask: -inf strictly above the diagonal (not in the checkpoint).
        mask = torch.full((context_length, context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)
        if init:
            self.init_parameters()

    def init_parameters(self) -> None:
        """open_clip's CLIP initialisation of the text tower (used for random-weight runs)."""
        width, layers = self.transformer.width, self.transformer.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = (width**-0.5) * ((2 * layers) ** -0.5)
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)


class OpenCLIPTextEncoder(nn.Module):
    """SD 2.1's FrozenOpenCLIPEmbedder: prompts -> (B, max_length, width) context for cross-attention.

    Child `model` is the open_clip text tower (keys `cond_stage_model.model.*` without the prefix). Frozen:
    eval mode, no gradients, as the original. `device` builds the parameters there ("meta" allocates
    nothing on PyTorch 2; on PyTorch 1.12 the tower is built on the CPU and moved).
    """

    def __init__(self, config: TextEncoderConfig, device: torch.device | str | None = None):
        super().__init__()
        if config.layer not in LAYERS:
            raise ConfigError(
                f"text encoder layer {config.layer!r} is not supported; use 'penultimate' or 'last'."
            )
        arch = open_clip_arch_config(config.arch)
        text_cfg = arch.get("text_cfg")
        if text_cfg is None or "embed_dim" not in arch:
            raise ConfigError(
                f"open_clip config {config.arch!r} has no embed_dim/text_cfg: not a CLIP text model."
            )
        unsupported = [k for k in _UNSUPPORTED if text_cfg.get(k)]
        if unsupported or text_cfg.get("proj_type") not in (None, "linear"):
            raise ConfigError(
                f"open_clip config {config.arch!r} uses text-tower features SD 2.1's encoder does not have "
                f"({', '.join(unsupported) or 'proj_type=' + str(text_cfg.get('proj_type'))}); only the "
                "classic "
                "CLIP text transformer (as ViT-H-14) is supported."
            )
        if text_cfg.get("context_length", 77) != config.max_length:
            raise ConfigError(
                f"text encoder max_length {config.max_length} differs from the context_length "
                f"{text_cfg.get('context_length', 77)} of open_clip config {config.arch!r}."
            )
        self.config = config
        build_on = torch.device(device) if device is not None else None
        context = capabilities.device_context(build_on) if build_on is not None else contextlib.nullcontext()
        with context:
            self.model = CLIPTextTower(
                arch["embed_dim"],
                text_cfg,
                quick_gelu=bool(arch.get("quick_gelu")),
                init=build_on is None
                or build_on.type != "meta",  # meta: nothing to fill (saves time on 1.12)
            )
        if build_on is not None and not capabilities.has_device_context():
            self.model.to(build_on)
        self.num_layers = text_cfg["layers"] - LAYERS[config.layer]
        self.requires_grad_(False)
        self.eval()

    @property
    def width(self) -> int:
        return self.model.transformer.width

    def tokenize(self, prompts: str | list[str]) -> torch.Tensor:
        """open_clip's tokenizer: (B, max_length) int64, [SOT] + BPE ids + [EOT], padded with 0 (on CPU)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        return open_clip.tokenize(list(prompts), context_length=self.config.max_length)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, L, width): blocks 0..layers-2 ("penultimate") or all ("last"), ln_final."""
        m = self.model
        x = m.token_embedding(tokens) + m.positional_embedding  # (B, L, D)
        mask = m.attn_mask.to(x.dtype)
        # open_clip >= 2.26 blocks are batch-first; older ones (no attribute) are sequence-first.
        batch_first = getattr(m.transformer, "batch_first", False)
        if not batch_first:
            x = x.permute(1, 0, 2)  # (L, B, D)
        for block in m.transformer.resblocks[: self.num_layers]:
            x = block(x, attn_mask=mask)
        if not batch_first:
            x = x.permute(1, 0, 2)  # (B, L, D)
        return m.ln_final(x)

    def encode(self, prompts: str | list[str]) -> torch.Tensor:
        """Prompts -> (B, max_length, width) conditioning, on this module's device."""
        tokens = self.tokenize(prompts).to(self.model.positional_embedding.device)
        return self(tokens)
