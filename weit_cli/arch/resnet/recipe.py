"""A ResNet recipe's `model` section (`weit pretrain`): the section, the largest and every nested
size it describes, and its checks."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from weit_cli.arch.resnet.layout import DEFAULT_TEMPLATE_SIZE, STAGES, ResNetArch, check_supported
from weit_cli.errors import WeitError
from weit_cli.section import Section

if TYPE_CHECKING:
    from weit_cli.arch.base import Adapter

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


def arch_for_recipe(model, *, depth, width: int, num_classes: int) -> ResNetArch:
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
    check_supported(arch)
    return arch


def recipe_template_size(model: ResNetModelSection, widths: list[int]) -> int:
    g = DEFAULT_TEMPLATE_SIZE
    for w in widths:
        g = math.gcd(g, *(w * r for r in model.stage_ratios))
    return g


def check_recipe(adapter: Adapter, recipe) -> None:
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
        arch = arch_for_recipe(recipe.model, depth=largest[0], width=largest[1], num_classes=10)
        adapter.template_types(arch, p)
        for d in recipe.depth_options():
            for w in recipe.nested.widths:
                adapter.target_arch(arch, depth=d, width=w, template_size=p)
    except WeitError as e:
        raise ValueError(f"nested sizes: {e.message}") from None
    limits = adapter.full_rank(p)
    counts = recipe.templates.counts(tuple(limits))
    if isinstance(recipe.templates.count, int):
        over = {t: n for t, n in counts.items() if n > max(limits.values())}
    else:
        over = {t: n for t, n in counts.items() if n > limits[t]}
    if over:
        raise ValueError(f"templates.count {over} exceeds the full rank of {p}×{p} templates (conv3x3 {limits['conv3x3']}, conv1x1 {limits['conv1x1']})")
