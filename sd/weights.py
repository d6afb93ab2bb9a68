"""Checkpoint loading: the original SD 2.1 `.ckpt` / `.safetensors` files into our model, strictly.

Our module names equal the original's, so the key map is the identity: every expected tensor must be
present with its shape, unknown keys are an error, and the few known extras of released or training
checkpoints (EMA copies, the deleted vision tower, ...) are skipped and reported. The original loads with
`load_state_dict(strict=False)` and silently ignores any mismatch; here a mismatch is one clear error.

`.ckpt`/`.pt` files are pickles: they are read with `torch.load(weights_only=True)` where this PyTorch has
it and refused otherwise unless the caller opts in with `unsafe_pickle=True` (arbitrary code execution).
Before that, the pickle's opcodes are read (never run): a file that would call os.system, eval & co. when
unpickled is refused as such. Every loaded tensor must be finite: NaN or inf weights are refused, naming
the first bad tensor, instead of giving black images.
"""

from __future__ import annotations

import inspect
import logging
import pickletools
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sd.errors import CheckpointError

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

# Callables that a pickle of tensors never needs and that run code or commands when unpickled.
_CODE_MODULES = {"os", "posix", "nt", "subprocess", "sys", "runpy", "importlib", "shutil", "socket", "pty"}
_CODE_MODULES |= {"ctypes", "code", "webbrowser", "pickle", "marshal", "commands", "platform"}
_CODE_BUILTINS = {"eval", "exec", "execfile", "compile", "__import__", "getattr", "setattr", "open", "input"}
_STRING_OPS = {
    "SHORT_BINUNICODE",
    "BINUNICODE",
    "BINUNICODE8",
    "UNICODE",
    "SHORT_BINSTRING",
    "BINSTRING",
    "STRING",
}


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


def _pickle_globals(stream, max_pickles: int = 4) -> list[str]:
    """ "module.name" of every global the pickles at the start of `stream` reference, read from the
    opcodes without unpickling (GLOBAL, and STACK_GLOBAL with its two strings tracked through the memo)."""
    found: list[str] = []
    for _ in range(max_pickles):  # a legacy torch file is a few pickles, then raw storage bytes
        strings: list[str] = []
        memo: dict[int, object] = {}
        try:
            for op, arg, _pos in pickletools.genops(stream):
                if op.name in _STRING_OPS:
                    strings.append(arg)
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = strings[-1] if strings else None
                elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
                    memo[int(arg)] = strings[-1] if strings else None
                elif op.name in ("BINGET", "LONG_BINGET", "GET") and isinstance(memo.get(int(arg)), str):
                    strings.append(memo[int(arg)])
                elif op.name in ("GLOBAL", "INST"):
                    found.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
        except Exception:  # not (or no longer) a pickle: what was read is what there is
            break
    return found


def pickle_code_calls(path: Path) -> list[str]:
    """The code-running callables (os.system, builtins.eval, ...) a .ckpt/.pt pickle would call when
    unpickled; [] for a plain checkpoint (or a file too damaged to read, left to torch.load to report)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith("data.pkl")]
                refs = _pickle_globals(archive.open(names[0])) if names else []
        else:
            with path.open("rb") as f:
                refs = _pickle_globals(f)
    except (OSError, zipfile.BadZipFile, KeyError):
        return []
    calls = []
    for ref in refs:
        module, _, name = ref.rpartition(".")
        if module.split(".")[0] in _CODE_MODULES or (
            module in ("builtins", "__builtin__") and name in _CODE_BUILTINS
        ):
            calls.append(ref)
    return calls


def load_state_dict_file(path: str | Path, unsafe_pickle: bool = False) -> dict[str, object]:
    """Read a checkpoint file into a flat {key: tensor} dict (tensors on the CPU, in the file's dtype).

    `.safetensors` is read with safetensors. Anything else is a PyTorch pickle (`.ckpt`, `.pt`): a dict with
    a "state_dict" entry (Lightning checkpoints; other top-level entries such as global_step are dropped)
    or a bare state dict. A pickle that would run code when unpickled is refused (unless unsafe_pickle).
    """
    path = check_checkpoint_path(path)
    safetensors = _is_safetensors(path)
    calls = [] if safetensors or unsafe_pickle else pickle_code_calls(path)
    if calls:
        raise CheckpointError(
            f"refusing to read {str(path)!r}: the file tries to execute code when unpickled (it calls "
            f"{', '.join(dict.fromkeys(calls))}), which no checkpoint of weights needs. Do not load it; use "
            "the "
            ".safetensors version of the checkpoint, which holds tensors only and cannot run code."
        )
    try:
        if safetensors:
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
                f"checkpoint {str(path)!r} contains Python objects that torch.load(weights_only=True) "
                "refuses "
                f"({_reason(err)}). Convert it to .safetensors, or, if you trust the file, pass "
                "unsafe_pickle=True (CLI: --unsafe-pickle): unpickling can run arbitrary code."
            ) from err
    if not unsafe_pickle:
        raise CheckpointError(
            f"refusing to read {str(path)!r}: .ckpt/.pt files are Python pickles, which can run arbitrary "
            "code, "
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
    A tensor holding NaN or inf is always an error. Returns a LoadReport; its summary is also logged.
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
    problems = [f"{len(mismatched)} with a different shape: {_names(mismatched)}"] if mismatched else []
    if strict and missing:
        problems.append(f"{len(missing)} missing: {_names(missing)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unknown: {_names(unexpected)}")
    if problems:
        raise CheckpointError(
            f"checkpoint does not match the model ({type(model).__name__}, {len(targets)} tensors): "
            + "; ".join(problems)
            + ". Check that the config matches the checkpoint (sd21-base vs sd21-v vs tiny) and that the "
              "file "
            "is an SD 2.1 checkpoint."
        )
    _check_finite(state_dict, matched)
    with torch.no_grad():
        for key in matched:
            dtype = str(state_dict[key].dtype).replace("torch.", "")
            report.source_dtypes[dtype] = report.source_dtypes.get(dtype, 0) + 1
            targets[key].copy_(state_dict[key])
    report.loaded = len(matched)
    report.missing, report.unexpected = (missing, unexpected) if not strict else ([], [])
    (logger.warning if report.ignored else logger.info)("checkpoint: %s", report.summary())
    return report


def _check_finite(state_dict: Mapping[str, object], keys: list[str]) -> None:
    """CheckpointError naming the first tensor (in file order) with a NaN or inf, and how many it has."""
    for key in keys:
        value = state_dict[key]
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            nan = int(torch.isnan(value).sum())
            raise CheckpointError(
                f"checkpoint tensor {key!r} holds non-finite values ({bad} of {value.numel()}: {nan} NaN, "
                f"{bad - nan} inf), so the model would output NaN (black images). The file is damaged or was "
                "saved from a diverged run: use another copy of the checkpoint."
            )


def load_checkpoint(
    model: nn.Module, path: str | Path, *, unsafe_pickle: bool = False, strict: bool = True
) -> LoadReport:
    """`load_state_dict_file` then `apply_state_dict`: the whole checkpoint load used by `sd.load_model`."""
    return apply_state_dict(model, load_state_dict_file(path, unsafe_pickle=unsafe_pickle), strict=strict)
