"""timm ResNet's weight layout (docs/method.md §1, convolution templates): the architecture record,
every key of its state dict with its shape, its closed-form parameter count, the template type of
every key and the width axes resizing follows.

The convolutions of the residual blocks are templated — every 3×3 conv shares one template set,
every 1×1 conv (bottleneck ends, projection shortcuts) another, each template carrying its spatial
kernel. Stem, BatchNorm and classifier are small parameters. timm's `down_kernel_size` applies to
the strided projection shortcuts only: stage 1's (stride 1) and every avg-pool shortcut is 1×1
(`ResNetArch.shortcut_kernel`).

Depth is blocks per stage, width is timm's `channels` per stage (a bottleneck's block output is 4×
that). The first block of every stage (it may downsample and project the shortcut) is never added or
removed, so depth rules act on the blocks after it.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from weit_cli.arch.base import TemplateType, batchnorm_shapes
from weit_cli.core.axes import Axis
from weit_cli.errors import InputError, WeitError

STAGES = 4  # timm's ResNet always has layer1..layer4
BLOCKS = ("basic", "bottleneck")
STEMS = ("", "deep", "deep_tiered")
EXPANSION = {"basic": 1, "bottleneck": 4}
TIMM_NAME = {"basic": "resnet18", "bottleneck": "resnet50"}  # model_args override every size
DEFAULT_TEMPLATE_SIZE = 16  # default p: gcd of the templated widths, at most this
BN_STATS = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class ResNetArch:
    """A timm ResNet. `depth` = blocks per stage, `width` = timm's `channels` per stage."""

    block: str
    depth: tuple[int, ...]
    width: tuple[int, ...]
    in_chans: int
    num_classes: int
    img_size: int = 224  # not part of the network (it is size-agnostic); the data it expects
    stem_width: int = 64
    stem_type: str = ""
    base_width: int = 64
    avg_down: bool = False
    down_kernel_size: int = 1
    family: str = "resnet"

    def __post_init__(self):
        object.__setattr__(self, "depth", tuple(int(d) for d in self.depth))
        object.__setattr__(self, "width", tuple(int(w) for w in self.width))

    @property
    def expansion(self) -> int:
        return EXPANSION[self.block]

    @property
    def stem_chs(self) -> tuple[int, int, int]:
        """Output widths of the stem's convolutions (deep stems: three; the 7×7 stem: the last only)."""
        sw = self.stem_width
        if self.stem_type == "":
            return (0, 0, 64)
        first = 3 * (sw // 4) if self.stem_type == "deep_tiered" else sw
        return (first, sw, 2 * sw)

    @property
    def stem_out(self) -> int:
        return self.stem_chs[2]

    def mid(self, s: int) -> int:
        """Inner width of stage s's blocks (bottleneck: planes·base_width/64; basic: planes)."""
        return int(math.floor(self.width[s] * self.base_width / 64)) if self.block == "bottleneck" else self.width[s]

    def out(self, s: int) -> int:
        return self.width[s] * self.expansion

    def shortcut_kernel(self, s: int) -> int:
        """Kernel side of stage s's projection shortcut conv: timm's `down_kernel_size` for a strided
        projection, 1 for stage 1's (stride 1) and for every avg-pool shortcut (pool, then a 1×1 conv)."""
        return 1 if self.avg_down or s == 0 else self.down_kernel_size

    def has_downsample(self, s: int) -> bool:
        """timm adds a projection shortcut when a stage strides (2–4) or changes the width."""
        cin = self.stem_out if s == 0 else self.out(s - 1)
        return s > 0 or cin != self.out(s)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["depth"], d["width"] = list(self.depth), list(self.width)
        return d

    def model_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {
            "layers": list(self.depth),
            "channels": list(self.width),
            "in_chans": self.in_chans,
            "num_classes": self.num_classes,
            "stem_width": self.stem_width,
            "stem_type": self.stem_type,
            "avg_down": self.avg_down,
            "down_kernel_size": self.down_kernel_size,
        }
        if self.block == "bottleneck":
            args["base_width"] = self.base_width
        return args


def check_supported(arch: ResNetArch) -> None:
    if arch.block not in BLOCKS:
        raise InputError(f"unknown ResNet block '{arch.block}'", f"weit supports: {', '.join(BLOCKS)}")
    if arch.stem_type not in STEMS:
        raise InputError(f"unsupported stem type '{arch.stem_type}'", "weit supports timm's '', 'deep' and 'deep_tiered' stems")
    if arch.down_kernel_size not in (1, 3):
        raise InputError(f"unsupported shortcut kernel {arch.down_kernel_size}", "weit supports 1×1 and 3×3 projection shortcuts")
    if len(arch.depth) != STAGES or len(arch.width) != STAGES:
        raise InputError(f"a timm ResNet has {STAGES} stages, the record has {len(arch.depth)}", "the file is corrupt")


def default_template_size(arch: ResNetArch) -> int:
    g = DEFAULT_TEMPLATE_SIZE
    for w in templated_widths(arch):
        g = math.gcd(g, w)
    return g


def templated_widths(arch: ResNetArch) -> list[int]:
    return [arch.stem_out, *(arch.mid(s) for s in range(STAGES)), *(arch.out(s) for s in range(STAGES))]


def param_count(a: ResNetArch) -> int:
    total = 0
    for s in range(STAGES):
        cin, mid, out = (a.stem_out if s == 0 else a.out(s - 1)), a.mid(s), a.out(s)

        def block(i: int) -> int:
            if a.block == "basic":
                return 9 * i * mid + 9 * mid * out + 4 * (mid + out)
            return i * mid + 9 * mid * mid + mid * out + 4 * (2 * mid + out)

        # closed form, not a loop over blocks: an absurd --depth must be refused, not counted
        if a.depth[s] >= 1:
            total += block(cin) + (a.depth[s] - 1) * block(out)
        if a.has_downsample(s):
            total += a.shortcut_kernel(s) ** 2 * cin * out + 4 * out
    c0, c1, c2 = a.stem_chs
    stem = 49 * a.in_chans * c2 if a.stem_type == "" else 9 * (a.in_chans * c0 + c0 * c1 + c1 * c2) + 4 * (c0 + c1)
    return total + stem + 4 * c2 + a.num_classes * (a.out(STAGES - 1) + 1)


def state_shapes(a: ResNetArch) -> dict[str, tuple[int, ...]]:
    c0, c1, c2 = a.stem_chs
    deep = {"conv1.0.weight": (c0, a.in_chans, 3, 3), **batchnorm_shapes("conv1.1", c0), "conv1.3.weight": (c1, c0, 3, 3), **batchnorm_shapes("conv1.4", c1)}
    out = ({"conv1.weight": (c2, a.in_chans, 7, 7)} if a.stem_type == "" else {**deep, "conv1.6.weight": (c2, c1, 3, 3)}) | batchnorm_shapes("bn1", c2)
    for s in range(STAGES):
        mid, o = a.mid(s), a.out(s)
        for i in range(a.depth[s]):
            b, cin = f"layer{s + 1}.{i}.", (a.stem_out if s == 0 else a.out(s - 1)) if i == 0 else o
            convs = [(mid, cin, 3), (o, mid, 3)] if a.block == "basic" else [(mid, cin, 1), (mid, mid, 3), (o, mid, 1)]
            for j, (co, ci, k) in enumerate(convs, 1):
                out |= {f"{b}conv{j}.weight": (co, ci, k, k), **batchnorm_shapes(f"{b}bn{j}", co)}
            if i == 0 and a.has_downsample(s):  # avg_down: pool, 1×1 conv, BN; else conv (1×1 in stage 1: no stride), BN
                (conv, bn), k = ((1, 2) if a.avg_down else (0, 1)), a.shortcut_kernel(s)
                out |= {f"{b}downsample.{conv}.weight": (o, cin, k, k), **batchnorm_shapes(f"{b}downsample.{bn}", o)}
    return out | ({"fc.weight": (a.num_classes, a.out(STAGES - 1)), "fc.bias": (a.num_classes,)} if a.num_classes > 0 else {})


def template_types(arch: ResNetArch, template_size: int | None = None) -> dict[str, TemplateType]:
    p = template_size or default_template_size(arch)
    bad = sorted({w for w in templated_widths(arch) if w % p})
    if bad:
        raise WeitError(
            f"template size {p} does not divide the ResNet's conv widths {', '.join(map(str, bad))}",
            f"pick a divisor of every stage width, e.g. {default_template_size(arch)}",
        )
    types = {"conv3x3": TemplateType("conv3x3", p, p, (3, 3))}
    if arch.block == "bottleneck" or any(arch.has_downsample(s) and arch.shortcut_kernel(s) == 1 for s in range(STAGES)):
        types["conv1x1"] = TemplateType("conv1x1", p, p, (1, 1))
    return types


def template_type_of(key: str, arch: ResNetArch | None = None) -> str | None:
    m = re.fullmatch(r"layer([1-4])\.\d+\.(conv[123]|downsample\.[01])\.weight", key)
    if m is None:
        return None
    if arch is None:
        raise TypeError("template_type_of needs the architecture (block type)")
    name = m[2]
    if name.startswith("downsample"):
        if name != f"downsample.{int(arch.avg_down)}":
            return None  # the shortcut's BatchNorm
        return "conv1x1" if arch.shortcut_kernel(int(m[1]) - 1) == 1 else "conv3x3"
    if arch.block == "basic":
        return "conv3x3" if name in ("conv1", "conv2") else None
    return "conv3x3" if name == "conv2" else "conv1x1"


def sizes(arch: ResNetArch) -> dict[str, int]:
    c0, c1, c2 = arch.stem_chs
    out = {"stem0": c0, "stem1": c1, "stem": c2}
    for s in range(STAGES):
        out[f"mid{s + 1}"] = arch.mid(s)
        out[f"out{s + 1}"] = arch.out(s)
    return out


def axes(key: str, arch: ResNetArch) -> list[Axis]:
    axes = _axes(key, arch)
    if axes is None:
        raise InputError(f"unsupported ResNet parameter '{key}'", "weit supports timm's plain ResNet blocks and stems")
    return axes


def _axes(key: str, arch: ResNetArch) -> list[Axis] | None:
    m = re.fullmatch(r"layer([1-4])\.(\d+)\.(.+)\.(\w+)", key)
    if m:
        s, blk, mod, leaf = int(m[1]), int(m[2]), m[3], m[4]
        mid, out = f"mid{s}", f"out{s}"
        prev = "stem" if s == 1 else f"out{s - 1}"
        cin = prev if blk == 0 else out
        if arch.block == "basic":
            convs = {"conv1": (mid, cin), "conv2": (out, mid)}
            bns = {"bn1": mid, "bn2": out}
        else:
            convs = {"conv1": (mid, cin), "conv2": (mid, mid), "conv3": (out, mid)}
            bns = {"bn1": mid, "bn2": mid, "bn3": out}
        ds_conv, ds_bn = (("downsample.1", "downsample.2") if arch.avg_down else ("downsample.0", "downsample.1"))
        convs[ds_conv] = (out, prev)
        bns[ds_bn] = out
        if mod in convs and leaf == "weight":
            o, i = convs[mod]
            return [Axis(0, o), Axis(1, i, "in")]
        if mod in bns:
            return bn_axes(leaf, bns[mod])
        return None
    if arch.stem_type == "":
        if key == "conv1.weight":
            return [Axis(0, "stem")]
    else:
        stem = {"conv1.0.weight": [Axis(0, "stem0")], "conv1.3.weight": [Axis(0, "stem1"), Axis(1, "stem0", "in")],
                "conv1.6.weight": [Axis(0, "stem"), Axis(1, "stem1", "in")]}
        if key in stem:
            return stem[key]
        m = re.fullmatch(r"conv1\.([14])\.(\w+)", key)
        if m:
            return bn_axes(m[2], "stem0" if m[1] == "1" else "stem1")
    m = re.fullmatch(r"bn1\.(\w+)", key)
    if m:
        return bn_axes(m[1], "stem")
    if key == "fc.weight":
        return [Axis(1, f"out{STAGES}", "in")]
    if key == "fc.bias":
        return []
    return None


def bn_axes(leaf: str, name: str) -> list[Axis] | None:
    """BatchNorm: scale, shift and running statistics are per channel, so they are tiled (never divided)."""
    if leaf in BN_STATS:
        return [Axis(0, name)]
    if leaf == "num_batches_tracked":
        return []
    return None


def fmt(xs) -> str:
    return ",".join(str(x) for x in xs)
