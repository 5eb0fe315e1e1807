"""The timm ResNet family's adapter (`@register`): reading a checkpoint's architecture, the sizes a
bundle can be resized to, weight selection, and the timm config of its exports. The layout is
`layout.py`, the recipe section `recipe.py`.

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
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import weit_cli.arch.resnet.layout as layout
import weit_cli.arch.resnet.recipe as recipe
from weit_cli.arch._registry import register
from weit_cli.arch._timm import TimmFamily
from weit_cli.arch.base import (
    Hints,
    LayerGroup,
    TemplateType,
    check_param_count,
    check_selection_same,
    check_selection_smaller,
)
from weit_cli.arch.resnet.layout import EXPANSION, STAGES, TIMM_NAME, ResNetArch, check_supported, fmt
from weit_cli.arch.resnet.recipe import ResNetModelSection
from weit_cli.core.selection import evenly_spaced
from weit_cli.errors import InputError, WeitError

if TYPE_CHECKING:
    from torch import Tensor

    from weit_cli.core.axes import Axis


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
        check_supported(arch)
        return arch

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
                f"every stage needs at least 1 block, got depth {fmt(new_depth)}",
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
                f"width {fmt(new_width)}: {w} is not a multiple of {mult} (template size {p})",
                f"nearest valid stage widths: {', '.join(map(str, near))}",
            )
        new = replace(arch, depth=new_depth, width=new_width, num_classes=num_classes)
        new = self._stem_for(arch, new, p)
        check_param_count(self, new, f"ResNet {fmt(new_depth)} × {fmt(new_width)}")
        return new

    def arch_for_recipe(self, model, *, depth, width: int, num_classes: int) -> ResNetArch:
        return recipe.arch_for_recipe(model, depth=depth, width=width, num_classes=num_classes)

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
        return layout.default_template_size(arch)

    def param_count(self, a: ResNetArch) -> int:
        return layout.param_count(a)

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
            f"ResNet ({arch.block}) blocks {fmt(arch.depth)}, channels {fmt(arch.width)}, {stem}, "
            f"{arch.img_size}px×{arch.in_chans}ch, {arch.num_classes} classes"
        )

    def state_shapes(self, a: ResNetArch) -> dict[str, tuple[int, ...]]:
        return layout.state_shapes(a)

    # ------------------------------------------------------------------ structure
    def template_types(self, arch: ResNetArch, template_size: int | None = None) -> dict[str, TemplateType]:
        return layout.template_types(arch, template_size)

    def template_type_of(self, key: str, arch: ResNetArch | None = None) -> str | None:
        return layout.template_type_of(key, arch)

    def identity_suffixes(self, arch: ResNetArch) -> tuple[str, ...]:
        """The last BatchNorm's scale and shift: zero → the residual branch adds nothing, and the
        block computes relu(x) = x on its (already non-negative) input."""
        last = "bn3" if arch.block == "bottleneck" else "bn2"
        return (f"{last}.weight", f"{last}.bias")

    def layer_groups(self, arch: ResNetArch) -> list[LayerGroup]:
        return [LayerGroup(f"layer{s + 1}.{{}}.", arch.depth[s], first=1) for s in range(STAGES)]

    def sizes(self, arch: ResNetArch) -> dict[str, int]:
        return layout.sizes(arch)

    def axes(self, key: str, arch: ResNetArch) -> list[Axis]:
        return layout.axes(key, arch)

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
        return recipe.recipe_template_size(model, widths)

    def recipe_depths(self, depths: list) -> list:
        return [tuple(d) if isinstance(d, list) else (d,) * STAGES for d in depths]

    def check_recipe(self, recipe_) -> None:
        """Every nested size must be a valid prefix of the largest: checked by `target_arch` itself."""
        recipe.check_recipe(self, recipe_)


def _per_stage(value, current: tuple[int, ...], what: str, *, scale: bool) -> tuple[int, ...]:
    if value is None:
        return current
    if isinstance(value, int):
        if not scale:
            return (value,) * STAGES
        if current[0] == 0 or any(c * value % current[0] for c in current):
            raise WeitError(
                f"--width {value} cannot keep this bundle's stage ratios {fmt(current)}",
                f"give all {STAGES} stage widths, e.g. --width {fmt(current)}",
            )
        return tuple(c * value // current[0] for c in current)
    value = tuple(value)
    if len(value) == 1:
        return _per_stage(int(value[0]), current, what, scale=scale)
    if len(value) != STAGES:
        raise WeitError(
            f"--{what} {fmt(value)} names {len(value)} stages; a timm ResNet has {STAGES}",
            f"give one number per stage, e.g. --{what} {fmt(current)}",
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


def _input_size(hints: dict[str, Any]) -> int | None:
    cfg = hints.get("pretrained_cfg") or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return int(size[-1]) if size else None

