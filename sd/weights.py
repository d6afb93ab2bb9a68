"""Checkpoint loading: the original SD 2.1 `.ckpt` / `.safetensors` files into our model, strictly.

Our module names equal the original's, so the key map is the identity: every expected tensor must be
present with its shape, unknown keys are an error, and the few known extras of released or training
checkpoints (EMA copies, the deleted vision tower, ...) are skipped and reported. The original loads with
`load_state_dict(strict=False)` and silently ignores any mismatch; here a mismatch is one clear error.

`.ckpt`/`.pt` files are pickles: they are read with `torch.load(weights_only=True)` where this PyTorch has
it and refused otherwise unless the caller opts in with `unsafe_pickle=True` (arbitrary code execution).
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError

logger = logging.getLogger(__name__)

# Keys that may appear in SD checkpoints but have no place in the inference model, and why.
KNOWN_EXTRAS: tuple[tuple[str, str], ...] = (
    ("model_ema.", "EMA copy of the UNet weights (training checkpoints)"),
    ("cond_stage_model.model.visual.", "OpenCLIP vision tower (SD deletes it)"),
    ("first_stage_model.loss.", "VAE training loss (LPIPS/discriminator)"),
    ("lvlb_weights", "training-only loss weights"),
    ("cond_stage_model.model.attn_mask", "causal mask, rebuilt by the model"),
)
_LIST_LIMIT = 12  # names shown per category in an error message


@dataclass
class LoadReport:
    """What `apply_state_dict` did: counts, and the keys it skipped or could not fill."""

    loaded: int = 0
    ignored: dict[str, list[str]] = field(default_factory=dict)  # reason -> keys
    missing: list[str] = field(default_factory=list)  # only non-empty with strict=False
    unexpected: list[str] = field(default_factory=list)  # only non-empty with strict=False
    source_dtypes: dict[str, int] = field(default_factory=dict)  # checkpoint dtype -> tensor count

    def summary(self) -> str:
        dtypes = ", ".join(f"{n} {d}" for d, n in sorted(self.source_dtypes.items()))
        text = f"loaded {self.loaded} tensors ({dtypes})"
        if self.ignored:
            parts = [f"{len(keys)} {reason}" for reason, keys in self.ignored.items()]
            text += "; ignored known extras: " + "; ".join(parts)
        if self.missing:
            text += f"; {len(self.missing)} missing (left as they were): {_names(self.missing)}"
        if self.unexpected:
            text += f"; {len(self.unexpected)} unknown keys skipped: {_names(self.unexpected)}"
        return text


def _names(keys: list[str], limit: int = _LIST_LIMIT) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


def torch_load_has_weights_only() -> bool:
    """True if this PyTorch's torch.load takes `weights_only` (1.13+): the safe way to read a pickle."""
    return "weights_only" in inspect.signature(torch.load).parameters


def _reason(err: BaseException) -> str:
    """The informative line of a reader's exception (PyTorch's are long, multi-line, with ANSI codes)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(err).splitlines()]
    lines = [line for line in lines if line]
    picked = next((line for line in lines if line.startswith("WeightsUnpickler error:")), None)
    text = picked or (lines[0] if lines else "")
    text = text[:240] + ("..." if len(text) > 240 else "")
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with path.open("rb") as f:  # 8-byte little-endian header size, then a JSON header
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def check_checkpoint_path(path: str | Path) -> Path:
    """`path` as a Path if it is an existing file, else CheckpointError (cheap: check before building)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist (or is not a file).")
    return path


def load_state_dict_file(path: str | Path, unsafe_pickle: bool = False) -> dict[str, object]:
    """Read a checkpoint file into a flat {key: tensor} dict (tensors on the CPU, in the file's dtype).

    `.safetensors` is read with safetensors. Anything else is a PyTorch pickle (`.ckpt`, `.pt`): a dict with
    a "state_dict" entry (Lightning checkpoints; other top-level entries such as global_step are dropped)
    or a bare state dict.
    """
    path = check_checkpoint_path(path)
    try:
        if _is_safetensors(path):
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        ckpt = _torch_load(path, unsafe_pickle)
    except CheckpointError:
        raise
    except Exception as err:  # any reader failure is the same user problem: an unreadable file
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r} ({_reason(err)}). "
            "The file is probably truncated or corrupted (e.g. an interrupted download): download it again "
            "and compare its size/sha256 with the published one."
        ) from err
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds a {type(ckpt).__name__}, not a state dict (a dict of tensors, "
            "or a dict with a 'state_dict' entry)."
        )
    if isinstance(ckpt.get("state_dict"), Mapping):
        dropped = sorted(k for k in ckpt if k != "state_dict")
        if dropped:
            logger.info(
                "checkpoint %s: using 'state_dict', ignoring top-level %s", path.name, ", ".join(dropped)
            )
        ckpt = ckpt["state_dict"]
    return dict(ckpt)


def _torch_load(path: Path, unsafe_pickle: bool):
    if torch_load_has_weights_only():
        if unsafe_pickle:
            return torch.load(str(path), map_location="cpu", weights_only=False)
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:
            if "Unsupported global" not in str(err):
                raise  # not a refused object: reported as an unreadable file
            raise CheckpointError(
                f"checkpoint {str(path)!r} contains Python objects that torch.load(weights_only=True) refuses "
                f"({_reason(err)}). Convert it to .safetensors, or, if you trust the file, pass "
                "unsafe_pickle=True (CLI: --unsafe-pickle): unpickling can run arbitrary code."
            ) from err
    if not unsafe_pickle:
        raise CheckpointError(
            f"refusing to read {str(path)!r}: .ckpt/.pt files are Python pickles, which can run arbitrary code, "
            "and this PyTorch's torch.load has no weights_only=True mode (needs PyTorch 1.13+). Use the "
            ".safetensors version of the checkpoint, or, if you trust the file, pass unsafe_pickle=True "
            "(CLI: --unsafe-pickle)."
        )
    return torch.load(str(path), map_location="cpu")


def _known_extra(key: str) -> str | None:
    for prefix, reason in KNOWN_EXTRAS:
        if key.startswith(prefix):
            return reason
    return None


def apply_state_dict(model: nn.Module, state_dict: Mapping[str, object], strict: bool = True) -> LoadReport:
    """Copy `state_dict` into `model` (any dtype -> the model's dtype and device), checking every key.

    Strict (default): any missing key, shape mismatch or unknown key raises one CheckpointError naming
    them all. Known extras (KNOWN_EXTRAS) and non-tensor entries are skipped and reported. With
    strict=False missing/unknown keys are reported but tolerated; a shape mismatch is always an error.
    Returns a LoadReport; its summary is also logged.
    """
    targets = model.state_dict(keep_vars=True)
    report = LoadReport()
    unexpected, mismatched, matched = [], [], []
    for key, value in state_dict.items():
        reason = _known_extra(key) if key not in targets else None
        if reason is None and not isinstance(value, torch.Tensor):
            reason = "non-tensor entries"
        if reason is not None:
            report.ignored.setdefault(reason, []).append(key)
        elif key not in targets:
            unexpected.append(key)
        elif tuple(value.shape) != tuple(targets[key].shape):
            mismatched.append(f"{key} (checkpoint {list(value.shape)}, model {list(targets[key].shape)})")
        else:
            matched.append(key)
    missing = [k for k in targets if k not in state_dict]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} with a different shape: {_names(mismatched)}")
    if strict and missing:
        problems.append(f"{len(missing)} missing: {_names(missing)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unknown: {_names(unexpected)}")
    if problems:
        raise CheckpointError(
            f"checkpoint does not match the model ({type(model).__name__}, {len(targets)} tensors): "
            + "; ".join(problems)
            + ". Check that the config matches the checkpoint (sd21-base vs sd21-v vs tiny) and that the file "
            "is an SD 2.1 checkpoint."
        )
    with torch.no_grad():
        for key in matched:
            value = state_dict[key]
            report.source_dtypes[str(value.dtype).replace("torch.", "")] = (
                report.source_dtypes.get(str(value.dtype).replace("torch.", ""), 0) + 1
            )
            targets[key].copy_(value)
    report.loaded = len(matched)
    report.missing, report.unexpected = (missing, unexpected) if not strict else ([], [])
    if report.ignored:
        logger.warning("checkpoint: %s", report.summary())
    else:
        logger.info("checkpoint: %s", report.summary())
    return report


def load_checkpoint(
    model: nn.Module, path: str | Path, *, unsafe_pickle: bool = False, strict: bool = True
) -> LoadReport:
    """`load_state_dict_file` then `apply_state_dict`: the whole checkpoint load used by `sd.load_model`."""
    return apply_state_dict(model, load_state_dict_file(path, unsafe_pickle=unsafe_pickle), strict=strict)
