"""timm `ResNet` (docs/method.md §1, convolution templates): the convolutions of the residual blocks are templated — every 3×3 conv
shares one template set, every 1×1 conv (bottleneck ends, projection shortcuts) another, each template
carrying its spatial kernel (docs/method.md §1). Stem, BatchNorm and classifier are small parameters.

Depth is blocks per stage, width is timm's `channels` per stage (a bottleneck's block output is 4×
that). The first block of every stage (it may downsample and project the shortcut) is never added or
removed, so depth rules act on the blocks after it.

The stem's output feeds stage 1. When stage 1 of the source has no projection shortcut (stem width =
stage-1 output width, e.g. resnet18), the stem's output width is tied to stage 1 and resized with it
(only possible for timm's deep stems, whose width is an argument; the 7×7 stem is always 64 wide).
Otherwise the stem keeps its size.

Weight selection (the paper's rule for its ConvNets; the generic algorithm is in core/selection.py):
per stage, first-N blocks (target block b takes source block b, so the stage's first, downsampling
block stays first); every channel axis (the stem's, each stage's inner and output widths) takes
evenly spaced channels, one index list per axis shared by every tensor on it (convs' output and
input channels, BatchNorm scale, shift and running statistics, the classifier's input); conv kernels
are kept whole. Block type, stem type and shortcut type must match.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from weit_cli.arch._registry import register
from weit_cli.arch._timm import TimmFamily
from weit_cli.arch.base import (
    Hints,
    LayerGroup,
    TemplateType,
    batchnorm_shapes,
    check_param_count,
    check_selection_same,
    check_selection_smaller,
)
from weit_cli.core.axes import Axis
from weit_cli.core.selection import evenly_spaced
from weit_cli.errors import InputError, WeitError
from weit_cli.section import Section

if TYPE_CHECKING:
    from torch import Tensor

STAGES = 4  # timm's ResNet always has layer1..layer4
BLOCKS = ("basic", "bottleneck")
STEMS = ("", "deep", "deep_tiered")
EXPANSION = {"basic": 1, "bottleneck": 4}
TIMM_NAME = {"basic": "resnet18", "bottleneck": "resnet50"}  # model_args override every size
DEFAULT_TEMPLATE_SIZE = 16  # default p: gcd of the templated widths, at most this
BN_STATS = ("weight", "bias", "running_mean", "running_var")
RECIPE_STEMS = {"deep": "deep", "deep_tiered": "deep_tiered", "7x7": ""}  # recipe name → timm stem_type


class ResNetModelSection(Section):
    """timm ResNet. Depth = blocks per stage, width = stage-1 channels (the other stages follow
    `stage_ratios`). A deep stem is tied to stage 1 (its output is stage 1's width, so stage 1 has
    no projection shortcut) and is nested with it."""

    family: Literal["resnet"] = Field(description="Architecture family (timm ResNet: resnet18-style basic or resnet50-style bottleneck blocks).")
    block: Literal["basic", "bottleneck"] = Field("basic", description="Residual block type (bottleneck: 4x expansion, 1x1-3x3-1x1 convs).")
    img_size: int = Field(28, ge=8, description="Input image side in pixels; data is resized to it (the network itself is size-agnostic).")
    in_chans: Literal[1, 3] = Field(1, description="Input channels: 1 (gray) or 3 (RGB); data is converted.")
    stem_type: Literal["deep", "deep_tiered", "7x7"] = Field(
        "deep", description="deep / deep_tiered: three 3x3 convs whose output width is tied to stage 1; 7x7: timm's fixed 64-channel stem."
    )
    stage_ratios: list[int] = Field([1, 2, 4, 8], description="Channels of stages 1-4 as multiples of the nested width (resnet18: 1, 2, 4, 8).")
    avg_down: bool = Field(False, description="Average-pool shortcuts (the '-d' variants) instead of strided 1x1 projections.")
    bn_calibration_batches: int = Field(
        20, ge=1,
        description=(
            "BatchNorm statistics: after the last step the largest size's running statistics are "
            "re-estimated over this many training batches (also before every validation of a size)."
        ),
    )

    @model_validator(mode="after")
    def _ratios(self):
        if len(self.stage_ratios) != 4 or any(r < 1 for r in self.stage_ratios):
            raise ValueError(f"stage_ratios {self.stage_ratios} must be 4 positive integers (a timm ResNet has 4 stages)")
        return self


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


@register
class ResNetAdapter(TimmFamily):
    family = "resnet"
    model_section = ResNetModelSection
    classifier = ("fc.weight", "fc.bias")
    batchnorm = True
    hints = Hints(guessed=("--img-size",))

    # ------------------------------------------------------------------ architecture
    def arch_from_dict(self, d: dict[str, Any]) -> ResNetArch:
        fields = {k: v for k, v in d.items() if k in ResNetArch.__dataclass_fields__}
        try:
            return ResNetArch(**fields)
        except (TypeError, ValueError) as e:
            raise InputError(f"architecture record is incomplete: {e}", "the file was not written by this weit") from None

    def matches(self, keys) -> bool:
        keys = set(keys)
        stem = "conv1.weight" in keys or "conv1.0.weight" in keys
        return stem and "layer1.0.conv1.weight" in keys and "layer4.0.conv1.weight" in keys

    def infer_arch(self, state: dict[str, Tensor], hints: dict[str, Any]) -> ResNetArch:
        block = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
        depth = []
        for s in range(1, STAGES + 1):
            n = len([k for k in state if re.fullmatch(rf"layer{s}\.\d+\.conv1\.weight", k)])
            depth.append(n)
        last = "conv3" if block == "bottleneck" else "conv2"
        expansion = EXPANSION[block]
        width = [int(state[f"layer{s}.0.{last}.weight"].shape[0]) // expansion for s in range(1, STAGES + 1)]
        base_width = 64
        if block == "bottleneck":
            mid = int(state["layer1.0.conv1.weight"].shape[0])
            base_width = mid * 64 // width[0]
        if "conv1.0.weight" in state:
            first, sw = int(state["conv1.0.weight"].shape[0]), int(state["conv1.3.weight"].shape[0])
            stem_type, stem_width = ("deep" if first == sw else "deep_tiered"), sw
            in_chans = int(state["conv1.0.weight"].shape[1])
        else:
            stem_type, stem_width = "", 64
            in_chans = int(state["conv1.weight"].shape[1])
        # Projection shortcut: conv at downsample.0 (plain) or downsample.1 after an avg-pool (avg_down).
        ds = state.get("layer2.0.downsample.0.weight")
        avg_down = ds is None or ds.dim() != 4
        conv = state.get("layer2.0.downsample.1.weight" if avg_down else "layer2.0.downsample.0.weight")
        if conv is None or conv.dim() != 4:
            raise InputError("the ResNet's second stage has no projection shortcut", "weit reads timm ResNets (resnet18…resnet152, -d variants)")
        fc = state.get("fc.weight")
        img_size = hints.get("img_size") or _input_size(hints) or 224
        arch = ResNetArch(
            block=block,
            depth=tuple(depth),
            width=tuple(width),
            in_chans=in_chans,
            num_classes=int(fc.shape[0]) if fc is not None else 0,
            img_size=int(img_size),
            stem_width=stem_width,
            stem_type=stem_type,
            base_width=base_width,
            avg_down=avg_down,
            down_kernel_size=int(conv.shape[-1]),
        )
        self._check_supported(arch)
        return arch

    def _check_supported(self, arch: ResNetArch) -> None:
        if arch.block not in BLOCKS:
            raise InputError(f"unknown ResNet block '{arch.block}'", f"weit supports: {', '.join(BLOCKS)}")
        if arch.stem_type not in STEMS:
            raise InputError(f"unsupported stem type '{arch.stem_type}'", "weit supports timm's '', 'deep' and 'deep_tiered' stems")
        if arch.down_kernel_size not in (1, 3):
            raise InputError(f"unsupported shortcut kernel {arch.down_kernel_size}", "weit supports 1×1 and 3×3 projection shortcuts")
        if len(arch.depth) != STAGES or len(arch.width) != STAGES:
            raise InputError(f"a timm ResNet has {STAGES} stages, the record has {len(arch.depth)}", "the file is corrupt")

    def target_arch(
        self,
        arch: ResNetArch,
        *,
        depth: int | list[int] | tuple[int, ...] | None = None,
        width: int | list[int] | tuple[int, ...] | None = None,
        num_classes: int | None = None,
        template_size: int | None = None,
        **other: Any,
    ) -> ResNetArch:
        """`depth`: blocks per stage (one number = every stage); `width`: channels per stage (one
        number = stage 1's, the others keep the bundle's ratios to it)."""
        unknown = [k for k, v in other.items() if v is not None]
        if unknown:
            opts = ", ".join("--" + k.replace("_", "-") for k in unknown)
            raise WeitError(f"{opts} does not apply to a ResNet", "ResNets take --depth, --width and --num-classes")
        new_depth = _per_stage(depth, arch.depth, "depth", scale=False)
        new_width = _per_stage(width, arch.width, "width", scale=True)
        num_classes = arch.num_classes if num_classes is None else num_classes
        if any(d < 1 for d in new_depth):
            raise WeitError(
                f"every stage needs at least 1 block, got depth {_fmt(new_depth)}",
                "each stage keeps its first (downsampling) block: pass --depth with entries ≥ 1",
            )
        if num_classes < 0:
            raise WeitError(f"num_classes must be 0 or more, got {num_classes}", "pass --num-classes N")
        for s, (old, new) in enumerate(zip(arch.depth, new_depth)):
            if new > old == 1:
                raise WeitError(
                    f"stage {s + 1} of the bundle has only its first (downsampling) block, so no block to grow it from",
                    f"keep stage {s + 1} at 1 block, or start from a bundle with ≥ 2 blocks there",
                )
        p = template_size or self.default_template_size(arch)
        mult = p if arch.block == "basic" else math.lcm(p, _bottleneck_step(arch, p))
        bad = [w for w in new_width if w < 1 or w % mult]
        if bad:
            w = bad[0]
            lo = max(mult, w // mult * mult)
            near = sorted({lo, lo + mult} if lo < w else {lo})
            raise WeitError(
                f"width {_fmt(new_width)}: {w} is not a multiple of {mult} (template size {p})",
                f"nearest valid stage widths: {', '.join(map(str, near))}",
            )
        new = replace(arch, depth=new_depth, width=new_width, num_classes=num_classes)
        new = self._stem_for(arch, new, p)
        check_param_count(self, new, f"ResNet {_fmt(new_depth)} × {_fmt(new_width)}")
        return new

    def arch_for_recipe(self, model, *, depth, width: int, num_classes: int) -> ResNetArch:
        """A recipe's ResNet (ResNetModelSection) at one size: `depth` blocks per stage (one number or
        4), stage s with `width`·stage_ratios[s] channels. A deep stem's output is tied to stage 1."""
        depth = (depth,) * STAGES if isinstance(depth, int) else tuple(depth)
        widths = tuple(width * r for r in model.stage_ratios)
        stem_type = RECIPE_STEMS[model.stem_type]
        arch = ResNetArch(
            block=model.block, depth=depth, width=widths, in_chans=model.in_chans, num_classes=num_classes,
            img_size=model.img_size, stem_type=stem_type, avg_down=model.avg_down,
        )
        if stem_type:
            out0 = arch.out(0)
            if out0 % 2:
                raise WeitError(f"stage-1 output width {out0} is odd; a deep stem is 2× a whole width", "pick even widths")
            arch = replace(arch, stem_width=out0 // 2)
        self._check_supported(arch)
        return arch

    def _stem_for(self, arch: ResNetArch, new: ResNetArch, p: int) -> ResNetArch:
        """Keep the stem, or resize it with stage 1 when the two are tied (see the module doc)."""
        if new.width[0] == arch.width[0]:
            return new
        if arch.has_downsample(0):
            if not new.has_downsample(0):
                raise WeitError(
                    f"stage-1 output width {new.out(0)} equals the stem's {arch.stem_out} channels, where timm drops "
                    "the projection shortcut this bundle's first stage has",
                    "pick another stage-1 width",
                )
            return new
        # Tied: the stem's output must follow stage 1's output width.
        want = new.out(0)
        if arch.stem_type == "":
            raise WeitError(
                f"stage 1 of this bundle is tied to timm's 7×7 stem, which is always 64 channels wide, so its output "
                f"width must stay {arch.out(0)}",
                f"keep the first --width entry at {arch.width[0]}",
            )
        if want % 2:
            raise WeitError(f"stage-1 output width {want} is odd; timm's deep stem is 2× a whole width", "pick an even stage-1 width")
        return replace(new, stem_width=want // 2)

    def default_template_size(self, arch: ResNetArch) -> int:
        g = DEFAULT_TEMPLATE_SIZE
        for w in self._templated_widths(arch):
            g = math.gcd(g, w)
        return g

    def _templated_widths(self, arch: ResNetArch) -> list[int]:
        return [arch.stem_out, *(arch.mid(s) for s in range(STAGES)), *(arch.out(s) for s in range(STAGES))]

    def param_count(self, a: ResNetArch) -> int:
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
                total += a.down_kernel_size**2 * cin * out + 4 * out
        c0, c1, c2 = a.stem_chs
        stem = 49 * a.in_chans * c2 if a.stem_type == "" else 9 * (a.in_chans * c0 + c0 * c1 + c1 * c2) + 4 * (c0 + c1)
        return total + stem + 4 * c2 + a.num_classes * (a.out(STAGES - 1) + 1)

    def timm_architecture(self, arch: ResNetArch) -> str:
        return TIMM_NAME[arch.block]

    def timm_config(self, arch: ResNetArch) -> dict[str, Any]:
        return {
            "architecture": self.timm_architecture(arch),
            "num_classes": arch.num_classes,
            "num_features": arch.out(STAGES - 1),
            "model_args": arch.model_args(),
            "pretrained_cfg": {
                "input_size": [arch.in_chans, arch.img_size, arch.img_size],
                "interpolation": "bilinear",
                "crop_pct": 1.0,
                "mean": [0.5] * arch.in_chans,
                "std": [0.5] * arch.in_chans,
                "num_classes": arch.num_classes,
                "classifier": "fc",
                "first_conv": "conv1" if arch.stem_type == "" else "conv1.0",
            },
        }

    def describe(self, arch: ResNetArch) -> str:
        stem = f"{arch.stem_type} stem {arch.stem_width}" if arch.stem_type else "7×7 stem"
        return (
            f"ResNet ({arch.block}) blocks {_fmt(arch.depth)}, channels {_fmt(arch.width)}, {stem}, "
            f"{arch.img_size}px×{arch.in_chans}ch, {arch.num_classes} classes"
        )

    def state_shapes(self, a: ResNetArch) -> dict[str, tuple[int, ...]]:
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
                    conv, bn, k = (1, 2, 1) if a.avg_down else (0, 1, a.down_kernel_size if s else 1)
                    out |= {f"{b}downsample.{conv}.weight": (o, cin, k, k), **batchnorm_shapes(f"{b}downsample.{bn}", o)}
        return out | ({"fc.weight": (a.num_classes, a.out(STAGES - 1)), "fc.bias": (a.num_classes,)} if a.num_classes > 0 else {})

    # ------------------------------------------------------------------ structure
    def template_types(self, arch: ResNetArch, template_size: int | None = None) -> dict[str, TemplateType]:
        p = template_size or self.default_template_size(arch)
        bad = sorted({w for w in self._templated_widths(arch) if w % p})
        if bad:
            raise WeitError(
                f"template size {p} does not divide the ResNet's conv widths {', '.join(map(str, bad))}",
                f"pick a divisor of every stage width, e.g. {self.default_template_size(arch)}",
            )
        types = {"conv3x3": TemplateType("conv3x3", p, p, (3, 3))}
        if arch.block == "bottleneck" or arch.down_kernel_size == 1:
            types["conv1x1"] = TemplateType("conv1x1", p, p, (1, 1))
        return types

    def template_type_of(self, key: str, arch: ResNetArch | None = None) -> str | None:
        m = re.fullmatch(r"layer[1-4]\.\d+\.(conv[123]|downsample\.[01])\.weight", key)
        if m is None:
            return None
        if arch is None:
            raise TypeError("ResNetAdapter.template_type_of needs the architecture (block type)")
        name = m[1]
        if name.startswith("downsample"):
            if name != f"downsample.{int(arch.avg_down)}":
                return None  # the shortcut's BatchNorm
            return "conv1x1" if arch.down_kernel_size == 1 else "conv3x3"
        if arch.block == "basic":
            return "conv3x3" if name in ("conv1", "conv2") else None
        return "conv3x3" if name == "conv2" else "conv1x1"

    def identity_suffixes(self, arch: ResNetArch) -> tuple[str, ...]:
        """The last BatchNorm's scale and shift: zero → the residual branch adds nothing, and the
        block computes relu(x) = x on its (already non-negative) input."""
        last = "bn3" if arch.block == "bottleneck" else "bn2"
        return (f"{last}.weight", f"{last}.bias")

    def layer_groups(self, arch: ResNetArch) -> list[LayerGroup]:
        return [LayerGroup(f"layer{s + 1}.{{}}.", arch.depth[s], first=1) for s in range(STAGES)]

    def sizes(self, arch: ResNetArch) -> dict[str, int]:
        c0, c1, c2 = arch.stem_chs
        out = {"stem0": c0, "stem1": c1, "stem": c2}
        for s in range(STAGES):
            out[f"mid{s + 1}"] = arch.mid(s)
            out[f"out{s + 1}"] = arch.out(s)
        return out

    def axes(self, key: str, arch: ResNetArch) -> list[Axis]:
        axes = self._axes(key, arch)
        if axes is None:
            raise InputError(f"unsupported ResNet parameter '{key}'", "weit supports timm's plain ResNet blocks and stems")
        return axes

    def _axes(self, key: str, arch: ResNetArch) -> list[Axis] | None:
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
                return _bn_axes(leaf, bns[mod])
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
                return _bn_axes(m[2], "stem0" if m[1] == "1" else "stem1")
        m = re.fullmatch(r"bn1\.(\w+)", key)
        if m:
            return _bn_axes(m[1], "stem")
        if key == "fc.weight":
            return [Axis(1, f"out{STAGES}", "in")]
        if key == "fc.bias":
            return []
        return None

    # ------------------------------------------------------------------ weight selection
    def selection_indices(self, src: ResNetArch, dst: ResNetArch) -> dict[str, Tensor]:
        check_selection_same(src, dst, ("block", "stem_type", "avg_down", "down_kernel_size", "in_chans"),
                             "select from a ResNet of the same block, stem and shortcut type", quote=True)
        old, new = self.sizes(src), self.sizes(dst)
        problems = [f"stage {s + 1} depth {d} > {e}" for s, (d, e) in enumerate(zip(dst.depth, src.depth)) if d > e]
        problems += [f"{n} width {new[n]} > {old[n]}" for n in new if new[n] > old[n]]
        check_selection_smaller(problems)
        return {n: evenly_spaced(old[n], new[n]) for n in new if new[n] > 0}

    def selection_axes(self, key: str, arch: ResNetArch) -> dict[int, str] | None:
        return {ax.dim: ax.name for ax in self.axes(key, arch)}

    def selection_missing(self, key: str) -> Exception:
        return WeitError(
            f"weight selection has no source tensor for '{key}'",
            "the target has a shortcut or stem layer the source lacks; pick stage widths with the source's structure",
        )

    # ------------------------------------------------------------------ recipes
    def full_rank(self, p: int) -> dict[str, int]:
        return {"conv3x3": 9 * p * p, "conv1x1": p * p}

    def recipe_template_size(self, model: ResNetModelSection, widths: list[int]) -> int:
        g = DEFAULT_TEMPLATE_SIZE
        for w in widths:
            g = math.gcd(g, *(w * r for r in model.stage_ratios))
        return g

    def recipe_depths(self, depths: list) -> list:
        return [tuple(d) if isinstance(d, list) else (d,) * STAGES for d in depths]

    def check_recipe(self, recipe) -> None:
        """Every nested size must be a valid prefix of the largest: checked by `target_arch` itself."""
        if any(isinstance(d, list) and len(d) != STAGES for d in recipe.nested.depths):
            raise ValueError("nested.depths: a per-stage depth lists 4 numbers (a timm ResNet has 4 stages)")
        p = recipe.template_size
        largest, smallest = recipe.largest(), recipe.smallest()
        for name, (d, _) in (("largest", largest), ("smallest", smallest)):
            if d not in recipe.depth_options():
                raise ValueError(
                    f"nested.depths: the per-stage {name} {list(d)} must be listed (every stage's "
                    f"{'most' if name == 'largest' else 'fewest'} blocks)"
                )
        try:
            arch = self.arch_for_recipe(recipe.model, depth=largest[0], width=largest[1], num_classes=10)
            self.template_types(arch, p)
            for d in recipe.depth_options():
                for w in recipe.nested.widths:
                    self.target_arch(arch, depth=d, width=w, template_size=p)
        except WeitError as e:
            raise ValueError(f"nested sizes: {e.message}") from None
        limits = self.full_rank(p)
        counts = recipe.templates.counts(tuple(limits))
        if isinstance(recipe.templates.count, int):
            over = {t: n for t, n in counts.items() if n > max(limits.values())}
        else:
            over = {t: n for t, n in counts.items() if n > limits[t]}
        if over:
            raise ValueError(f"templates.count {over} exceeds the full rank of {p}×{p} templates (conv3x3 {limits['conv3x3']}, conv1x1 {limits['conv1x1']})")


def _bn_axes(leaf: str, name: str) -> list[Axis] | None:
    """BatchNorm: scale, shift and running statistics are per channel, so they are tiled (never divided)."""
    if leaf in BN_STATS:
        return [Axis(0, name)]
    if leaf == "num_batches_tracked":
        return []
    return None


def _per_stage(value, current: tuple[int, ...], what: str, *, scale: bool) -> tuple[int, ...]:
    if value is None:
        return current
    if isinstance(value, int):
        if not scale:
            return (value,) * STAGES
        if current[0] == 0 or any(c * value % current[0] for c in current):
            raise WeitError(
                f"--width {value} cannot keep this bundle's stage ratios {_fmt(current)}",
                f"give all {STAGES} stage widths, e.g. --width {_fmt(current)}",
            )
        return tuple(c * value // current[0] for c in current)
    value = tuple(value)
    if len(value) == 1:
        return _per_stage(int(value[0]), current, what, scale=scale)
    if len(value) != STAGES:
        raise WeitError(
            f"--{what} {_fmt(value)} names {len(value)} stages; a timm ResNet has {STAGES}",
            f"give one number per stage, e.g. --{what} {_fmt(current)}",
        )
    return tuple(int(v) for v in value)


def _bottleneck_step(arch: ResNetArch, p: int) -> int:
    """Smallest planes step whose inner width planes·base_width/64 is a multiple of p too."""
    step = 1
    while (step * arch.base_width) % 64 or (step * arch.base_width // 64) % p:
        step += 1
        if step > 64 * p:
            raise WeitError(f"base width {arch.base_width} gives no width divisible by {p}", "pick another template size")
    return step


def _fmt(xs) -> str:
    return ",".join(str(x) for x in xs)


def _input_size(hints: dict[str, Any]) -> int | None:
    cfg = hints.get("pretrained_cfg") or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return int(size[-1]) if size else None

