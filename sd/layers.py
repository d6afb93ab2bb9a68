"""Layers the UNet and the VAE share: float32 GroupNorm, nearest x2 Upsample, fused projections.

GroupNorm32 and Upsample reproduce `ldm/modules/diffusionmodules/openaimodel.py` GroupNorm32 / Upsample
(the VAE's Upsample in `ldm/modules/diffusionmodules/model.py` is the same nearest x2 + 3x3 conv, key
`conv`). `fuse_projections` is this package's own: several projections of one input as one matmul, with
the checkpoint keys of the separate ones.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that normalises in float32 and casts back (the original GroupNorm32, eps 1e-5 by default).

    Used for every GroupNorm: CUDA autocast gives the original's plain GroupNorms float32 statistics too,
    and PyTorch 1.12 has no CPU bf16 group_norm with float32 weights.
    """

    def forward(self, x: Tensor) -> Tensor:
        # Weights too: in a pure fp16/bf16 model they are half precision (the original never has that).
        weight, bias = self.weight.float(), self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def fuse_projections(module: nn.Module, names: tuple[str, ...], fused_name: str) -> None:
    """Replace `module.<names>` (Linears, or 1x1 Conv2ds, of one input) by `module.<fused_name>`, whose
    output is theirs concatenated on the channel dim, so one matmul replaces several.

    The checkpoint keys do not change: `state_dict()` splits the fused weight back into the original keys
    and `load_state_dict()` joins them (module hooks), so a fused model loads and saves original files.
    """
    parts = [getattr(module, name) for name in names]
    first, sizes = parts[0], [p.weight.shape[0] for p in parts]
    has_bias = first.bias is not None
    kwargs = {"bias": has_bias, "device": first.weight.device, "dtype": first.weight.dtype}
    if isinstance(first, nn.Linear):
        fused: nn.Module = nn.Linear(first.in_features, sum(sizes), **kwargs)
    else:
        fused = nn.Conv2d(first.in_channels, sum(sizes), 1, **kwargs)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in parts]))
        if has_bias:
            fused.bias.copy_(torch.cat([p.bias for p in parts]))
    # The fused module takes the first one's place, so that state_dict() keeps the original key order.
    children = [(fused_name, fused) if n == names[0] else (n, m) for n, m in module._modules.items()]
    module._modules.clear()
    module._modules.update((n, m) for n, m in children if n not in names[1:])
    module._register_state_dict_hook(partial(_split_keys, names, fused_name, sizes))
    module._register_load_state_dict_pre_hook(partial(_join_keys, names, fused_name))


def _split_keys(names, fused_name, sizes, module, state_dict, prefix, local_metadata) -> None:
    """state_dict hook: `<fused>.weight/bias` -> `<name>.weight/bias` for each name, in place, in order."""
    fused_prefix = f"{prefix}{fused_name}."
    own = [(k, state_dict.pop(k)) for k in list(state_dict) if k.startswith(prefix)]  # the latest keys
    tensors = dict(own)
    for key, value in own:
        if not key.startswith(fused_prefix):
            state_dict[key] = value
        elif key == fused_prefix + "weight":
            pieces = {"weight": value.split(sizes)}
            if fused_prefix + "bias" in tensors:
                pieces["bias"] = tensors[fused_prefix + "bias"].split(sizes)
            for i, name in enumerate(names):
                for kind, split in pieces.items():
                    # With keep_vars the loader writes through these views; a saved state dict owns its
                    # tensors (safetensors refuses tensors that share memory).
                    piece = split[i]
                    state_dict[f"{prefix}{name}.{kind}"] = (
                        piece if isinstance(value, nn.Parameter) else piece.clone()
                    )


def _join_keys(names, fused_name, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: the original `<name>.weight/bias` keys -> `<fused>.weight/bias`."""
    for kind in ("weight", "bias"):
        keys = [f"{prefix}{name}.{kind}" for name in names]
        if all(k in state_dict for k in keys):
            state_dict[f"{prefix}{fused_name}.{kind}"] = torch.cat([state_dict.pop(k) for k in keys])
