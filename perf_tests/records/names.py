"""The vocabulary of a benchmark case, without PyTorch: the axes' spellings, the kinds, :class:`Case` and
the parsing of its name.

A result file, a baseline, a verdict and a study table speak of cases by these names, so everything that
reads or judges results imports this module and never ``sd`` (which imports torch). The spellings are
``sd``'s own (``sd.attention.ATTENTION_BACKENDS``, ``sd.compile.COMPILE_MODES``,
``sd.precision.PRECISIONS``); ``tests/test_layers.py`` checks that both agree.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

ATTENTION_BACKENDS = (
    "original", "sdpa", "sdpa-math", "sdpa-flash", "sdpa-mem-efficient", "sdpa-cudnn", "xformers",
)
COMPILE_MODES = ("eager", "compile", "compile-max-autotune", "compile-reduce-overhead")
PRECISIONS = ("fp32", "fp16", "bf16", "autocast")

# Kinds in the order they run inside one model group: txt2img first, so that a compiled model's
# compilation is paid (and recorded) by the end-to-end case, as a user running txt2img would pay it.
KINDS = (
    "txt2img",
    "unet-step",
    "vae-decode",
    "text-encode",
    "attention-self-4096",
    "attention-self-1024",
    "attention-cross-77",
)
# A "--case-kind" value may also name a family: "attention" selects the three attention shapes.
KIND_FAMILIES = {"attention": ("attention-self-4096", "attention-self-1024", "attention-cross-77")}
# Attention shapes of SD 2.1 at 512x512 (sd21-facts §2.2): (query tokens, key tokens, level).
ATTENTION_SHAPES = {
    "attention-self-4096": (4096, 4096, 0),
    "attention-self-1024": (1024, 1024, 1),
    "attention-cross-77": (4096, 77, 0),
}
# Kinds that do not depend on the attention backend or on compilation (the text encoder is open_clip's
# own transformer): only their original/eager point is a distinct measurement.
BACKEND_FREE_KINDS = ("text-encode",)
# Model axes, passed to sd.load_model(channels_last=..., fuse_projections=...). The first value of
# each is the default, which adds nothing to a case id, so the ids (and baselines) of earlier runs stay valid.
MEMORY_FORMATS = ("contiguous", "channels-last")
PROJECTIONS = ("separate", "fused")


@dataclass(frozen=True)
class Case:
    kind: str
    profile: str
    attention: str
    compile: str  # a sd.compile.COMPILE_MODES name: "eager", "compile", "compile-max-autotune", ...
    batch_size: int
    precision: str
    steps: int | None = None  # txt2img only
    height: int | None = None
    width: int | None = None
    memory_format: str = MEMORY_FORMATS[0]
    projections: str = PROJECTIONS[0]

    def __str__(self) -> str:
        suffix = "".join(f"-{v}" for v, default in ((self.memory_format, MEMORY_FORMATS[0]),
                                                     (self.projections, PROJECTIONS[0])) if v != default)
        return f"{self.profile}-{self.attention}-{self.compile}-bs{self.batch_size}-{self.precision}{suffix}"

    @property
    def test_name(self) -> str:
        return "test_" + self.kind.replace("-", "_")

    @property
    def name(self) -> str:
        """The benchmark name, the comparison key: ``test_<kind>[<id>]``."""
        return f"{self.test_name}[{self}]"

    @property
    def compiled(self) -> bool:
        return self.compile != "eager"

    @property
    def optimized(self) -> bool:
        """True when the case differs from the fp32/original/eager reference and must be checked."""
        return self != self.reference()

    def reference(self) -> Case:
        """The case whose output this one must reproduce: original attention, eager, fp32, contiguous,
        separate projections."""
        return dataclasses.replace(self, attention="original", compile="eager", precision="fp32",
                                   memory_format=MEMORY_FORMATS[0], projections=PROJECTIONS[0])

    def model_key(self) -> tuple:
        """Cases with equal keys share one built model (each compiled case compiles it afresh)."""
        return (self.profile, self.attention, self.compile, self.precision, self.memory_format,
                self.projections)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


_ID_RE = re.compile(
    r"^(?P<profile>tiny|sd21-base|sd21-v|[a-z0-9]+)-(?P<attention>.+)-"
    r"(?P<compile>eager|compile(?:-max-autotune|-reduce-overhead)?)-bs(?P<batch>\d+)-(?P<precision>[a-z0-9]+)"
    r"(?P<memory_format>-channels-last)?(?P<projections>-fused)?$"
)
_NAME_RE = re.compile(r"^test_(?P<kind>[a-z0-9_]+)\[(?P<id>.+)\]$")


def parse_name(name: str) -> Case:
    """Inverse of ``Case.name`` (steps/size unknown from a name alone)."""
    m = _NAME_RE.match(name)
    if not m:
        raise ValueError(f"not a perf_tests benchmark name: {name!r}")
    i = _ID_RE.match(m["id"])
    if not i:
        raise ValueError(f"not a perf_tests case id: {m['id']!r}")
    return Case(m["kind"].replace("_", "-"), i["profile"], i["attention"], i["compile"], int(i["batch"]),
                i["precision"],
                memory_format=i["memory_format"][1:] if i["memory_format"] else MEMORY_FORMATS[0],
                projections=i["projections"][1:] if i["projections"] else PROJECTIONS[0])

ENV_LABELS = ("torch1", "torch20", "torch2")  # in release order


def env_label(torch_version: str) -> str:
    """The environment a run came from, named as its nox session (noxenvs.PINS): 'torch1' (1.x), 'torch20'
    (2.0.x, the release of the PyTorch 2 study) or 'torch2' (any later 2.x, the current release line)."""
    match = re.match(r"(\d+)\.(\d+)", torch_version)
    if match is None:
        raise ValueError(f"not a torch version: {torch_version!r} (expected e.g. '2.0.1' or '2.14.1+cpu')")
    major, minor = int(match.group(1)), int(match.group(2))
    if major < 2:
        return "torch1"
    return "torch20" if (major, minor) == (2, 0) else "torch2"
