"""timm `VisionTransformer` (docs/method.md §2): qkv, proj, fc1 and fc2 are templated; everything else is small.

Weight selection (Xu et al., "Initializing Models with Larger Ones", ICLR 2024; the generic algorithm
is in core/selection.py), exactly as implemented here:

* **Layers**: first-N — target block l takes source block l (the paper's choice for isotropic
  models). A target deeper than the source is refused: weight selection only shrinks.
* **Axes**: the embedding axis (residual stream: patch embedding, position embedding, class token,
  LayerNorms, the input of qkv/fc1/head, the output of proj/fc2) and the MLP hidden axis use evenly
  spaced *elements*. The attention axis (the rows of q, of k and of v, the qkv bias, the input of
  proj) is selected *per head*: evenly spaced whole heads (H' of H), then evenly spaced dimensions
  inside each kept head (all of them when the head size is unchanged, the weit case). q, k and v are
  three separate runs of the qkv matrix and each gets the same head selection, so every target head
  is one source head's q, k and v and proj reads exactly the value dimensions it wrote. (The
  reference code selects elements of the fused qkv rows directly, which mixes dimensions of
  neighbouring heads; keeping heads whole is the change this project asks for.)
* **Unchanged axes**: tokens (patch grid), input channels and the patch kernel must match; the
  classifier's rows are kept when the class count matches, otherwise the head is timm's fresh
  initialisation.
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
    KeyTables,
    LayerGroup,
    TemplateType,
    check_head_sizes,
    check_param_count,
    check_selection_same,
    check_selection_smaller,
)
from weit_cli.core.axes import Axis
from weit_cli.core.selection import evenly_spaced, head_aligned
from weit_cli.errors import InputError, WeitError
from weit_cli.section import Section

if TYPE_CHECKING:
    from torch import Tensor

TEMPLATED = {
    "qkv": r"blocks\.\d+\.attn\.qkv\.weight",
    "proj": r"blocks\.\d+\.attn\.proj\.weight",
    "fc1": r"blocks\.\d+\.mlp\.fc1\.weight",
    "fc2": r"blocks\.\d+\.mlp\.fc2\.weight",
}

E, H = "embed", "hidden"
AXES: list[tuple[str, list[Axis]]] = [
    (r"cls_token|pos_embed", [Axis(2, E)]),
    (r"patch_embed\.proj\.(weight|bias)", [Axis(0, E)]),
    (r"blocks\.\d+\.norm[12]\.(weight|bias)", [Axis(0, E)]),
    (r"blocks\.\d+\.attn\.qkv\.weight", [Axis(0, E, runs=3), Axis(1, E, "in")]),
    (r"blocks\.\d+\.attn\.qkv\.bias", [Axis(0, E, runs=3)]),
    (r"blocks\.\d+\.attn\.proj\.weight", [Axis(0, E), Axis(1, E, "in")]),
    (r"blocks\.\d+\.attn\.proj\.bias", [Axis(0, E)]),
    (r"blocks\.\d+\.mlp\.fc1\.weight", [Axis(0, H), Axis(1, E, "in")]),
    (r"blocks\.\d+\.mlp\.fc1\.bias", [Axis(0, H)]),
    (r"blocks\.\d+\.mlp\.fc2\.weight", [Axis(0, E), Axis(1, H, "in")]),
    (r"blocks\.\d+\.mlp\.fc2\.bias", [Axis(0, E)]),
    (r"(norm|fc_norm)\.(weight|bias)", [Axis(0, E)]),
    (r"head\.weight", [Axis(1, E, "in")]),
    (r"head\.bias", []),
]

# Weight selection keeps whole attention heads: the axes below replace AXES' embedding axis there.
ATTENTION: list[tuple[str, dict[int, str]]] = [
    (r"blocks\.\d+\.attn\.qkv\.(weight|bias)", {0: "qkv"}),  # q, k and v runs, head by head
    (r"blocks\.\d+\.attn\.proj\.weight", {1: "attn"}),
]

TIMM_ARCHITECTURE = "vit_base_patch16_224"  # any timm ViT name: model_args override every size


class ViTModelSection(Section):
    family: Literal["vit"] = Field("vit", description="Architecture family (timm VisionTransformer).")
    img_size: int = Field(28, ge=4, description="Input image side in pixels; data is resized to it.")
    patch_size: int = Field(4, ge=1, description="Patch side in pixels; must divide img_size.")
    in_chans: Literal[1, 3] = Field(1, description="Input channels: 1 (gray) or 3 (RGB); data is converted.")
    head_dim: int = Field(64, ge=1, description="Channels per attention head, fixed across sizes (ViT-Tiny: 64).")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden width / width.")
    global_pool: Literal["token", "avg"] = Field("token", description="Classifier input: class token or mean of patch tokens.")

    @model_validator(mode="after")
    def _patches(self):
        if self.img_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} does not divide img_size {self.img_size}")
        return self


@dataclass(frozen=True)
class ViTArch:
    img_size: int
    patch_size: int
    in_chans: int
    num_classes: int
    depth: int
    width: int
    num_heads: int
    mlp_ratio: float = 4.0
    class_token: bool = True
    global_pool: str = "token"
    qkv_bias: bool = True
    family: str = "vit"

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def model_args(self) -> dict[str, Any]:
        return {
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "in_chans": self.in_chans,
            "num_classes": self.num_classes,
            "embed_dim": self.width,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "class_token": self.class_token,
            "global_pool": self.global_pool,
            "qkv_bias": self.qkv_bias,
        }


@register
class ViTAdapter(KeyTables, TimmFamily):
    templated, axes_table, selection_table = TEMPLATED, AXES, ATTENTION
    unsupported = ("unsupported ViT parameter '{key}'", "weit supports timm's plain VisionTransformer blocks")
    family = "vit"
    model_section = ViTModelSection
    recipe_default = True
    identity_zero = ("attn.proj.weight", "attn.proj.bias", "mlp.fc2.weight", "mlp.fc2.bias")
    classifier = ("head.weight", "head.bias")
    no_decay = ("pos_embed", "cls_token")  # as in timm's training scripts
    hints = Hints(guessed=("--num-heads", "--img-size"))

    def arch_from_dict(self, d: dict[str, Any]) -> ViTArch:
        fields = {k: v for k, v in d.items() if k in ViTArch.__dataclass_fields__}
        try:
            return ViTArch(**fields)
        except TypeError as e:
            raise InputError(f"architecture record is incomplete: {e}", "the file was not written by this weit") from None

    def matches(self, keys) -> bool:
        keys = set(keys)
        return "patch_embed.proj.weight" in keys and any(re.fullmatch(TEMPLATED["qkv"], k) for k in keys)

    def infer_arch(self, state: dict[str, Tensor], hints: dict[str, Any]) -> ViTArch:
        pe = state["patch_embed.proj.weight"]
        width, in_chans, patch = pe.shape[0], pe.shape[1], pe.shape[2]
        depth = len([k for k in state if re.fullmatch(TEMPLATED["qkv"], k)])
        class_token = "cls_token" in state
        tokens = state["pos_embed"].shape[1] - (1 if class_token else 0) if "pos_embed" in state else None
        img_size = _square(hints.get("img_size"), "img_size")
        if img_size is not None and tokens is not None and (img_size // patch) ** 2 != tokens:
            raise InputError(
                f"img_size {img_size} with patch size {patch} gives {(img_size // patch) ** 2} patches, but pos_embed holds {tokens}",
                f"pass --img-size {math.isqrt(tokens) * patch}" if math.isqrt(tokens) ** 2 == tokens else "check the checkpoint",
            )
        if img_size is None:
            grid = math.isqrt(tokens) if tokens else 0
            if not tokens or grid * grid != tokens:
                raise InputError("cannot infer the image size from pos_embed", "pass --img-size")
            img_size = grid * patch
        num_heads = hints.get("num_heads")
        if num_heads is None:
            if width % 64:
                raise InputError(
                    f"cannot tell the number of heads of a width-{width} ViT from its weights",
                    "pass --num-heads (timm's ViTs use head_dim 64)",
                )
            num_heads = width // 64
        if width % num_heads:
            raise WeitError(f"--num-heads {num_heads} does not divide width {width}", "pick a divisor of the width")
        hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
        head = state.get("head.weight")
        return ViTArch(
            img_size=int(img_size),
            patch_size=int(patch),
            in_chans=int(in_chans),
            num_classes=int(head.shape[0]) if head is not None else 0,
            depth=depth,
            width=int(width),
            num_heads=int(num_heads),
            mlp_ratio=hidden / width,
            class_token=class_token,
            global_pool="avg" if "fc_norm.weight" in state else "token",
            qkv_bias="blocks.0.attn.qkv.bias" in state,
        )

    def target_arch(
        self,
        arch: ViTArch,
        *,
        depth: int | None = None,
        width: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float | None = None,
        num_classes: int | None = None,
        template_size: int | None = None,
    ) -> ViTArch:
        depth = arch.depth if depth is None else depth
        width = arch.width if width is None else width
        mlp_ratio = arch.mlp_ratio if mlp_ratio is None else mlp_ratio
        num_classes = arch.num_classes if num_classes is None else num_classes
        hd = arch.head_dim
        p = template_size or self.default_template_size(arch)
        if depth < 1:  # before the class count, as ever (check_head_sizes checks it too)
            raise WeitError(f"depth must be at least 1, got {depth}", "pass --depth 1 or more")
        if num_classes < 0:
            raise WeitError(f"num_classes must be 0 or more, got {num_classes}", "pass --num-classes N")
        check_head_sizes(depth, width, hd, p, num_heads)
        hidden = int(width * mlp_ratio)
        if mlp_ratio <= 0 or hidden % p:
            raise WeitError(
                f"mlp ratio {mlp_ratio:g} gives hidden width {hidden}, not a multiple of the template size {p}",
                "pick a ratio r with width·r a multiple of the template size (4.0 always works)",
            )
        new = replace(arch, depth=depth, width=width, num_heads=width // hd, mlp_ratio=mlp_ratio, num_classes=num_classes)
        check_param_count(self, new, f"depth {depth} × width {width}")
        return new

    def arch_for_recipe(self, model, *, depth: int, width: int, num_classes: int) -> ViTArch:
        return ViTArch(
            img_size=model.img_size, patch_size=model.patch_size, in_chans=model.in_chans, num_classes=num_classes,
            depth=depth, width=width, num_heads=width // model.head_dim, mlp_ratio=model.mlp_ratio,
            global_pool=model.global_pool,
        )

    def param_count(self, a: ViTArch) -> int:
        d, h = a.width, a.hidden
        block = 3 * d * d + 3 * d + d * d + d + 2 * h * d + h + d + 4 * d
        tokens = (a.img_size // a.patch_size) ** 2 + int(a.class_token)
        embed = d * a.in_chans * a.patch_size**2 + d + tokens * d + d * int(a.class_token)
        return a.depth * block + embed + 2 * d + a.num_classes * (d + 1)

    def state_shapes(self, a: ViTArch) -> dict[str, tuple[int, ...]]:
        d, h = a.width, a.hidden
        tokens = (a.img_size // a.patch_size) ** 2 + int(a.class_token)
        out: dict[str, tuple[int, ...]] = {"cls_token": (1, 1, d)} if a.class_token else {}
        out |= {"pos_embed": (1, tokens, d), "patch_embed.proj.weight": (d, a.in_chans, a.patch_size, a.patch_size), "patch_embed.proj.bias": (d,)}
        for i in range(a.depth):
            b = f"blocks.{i}."
            out |= {b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d)}
            out |= {b + "attn.qkv.bias": (3 * d,)} if a.qkv_bias else {}
            out |= {b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,), b + "norm2.weight": (d,), b + "norm2.bias": (d,)}
            out |= {b + "mlp.fc1.weight": (h, d), b + "mlp.fc1.bias": (h,), b + "mlp.fc2.weight": (d, h), b + "mlp.fc2.bias": (d,)}
        norm = "fc_norm" if a.global_pool == "avg" else "norm"  # timm's final norm moves after an average pool
        out |= {f"{norm}.weight": (d,), f"{norm}.bias": (d,)}
        return out | ({"head.weight": (a.num_classes, d), "head.bias": (a.num_classes,)} if a.num_classes > 0 else {})

    def timm_architecture(self, arch: ViTArch) -> str:
        return TIMM_ARCHITECTURE

    def timm_config(self, arch: ViTArch) -> dict[str, Any]:
        return {
            "architecture": self.timm_architecture(arch),
            "num_classes": arch.num_classes,
            "num_features": arch.width,
            "model_args": arch.model_args(),
            "pretrained_cfg": {
                "input_size": [arch.in_chans, arch.img_size, arch.img_size],
                "fixed_input_size": True,
                "interpolation": "bicubic",
                "crop_pct": 1.0,
                "mean": [0.5] * arch.in_chans,
                "std": [0.5] * arch.in_chans,
                "num_classes": arch.num_classes,
                "classifier": "head",
                "first_conv": "patch_embed.proj",
            },
        }

    def describe(self, arch: ViTArch) -> str:
        return (
            f"ViT depth {arch.depth}, width {arch.width}, {arch.num_heads} heads, mlp ×{arch.mlp_ratio:g}, "
            f"patch {arch.patch_size}, {arch.img_size}px×{arch.in_chans}ch, {arch.num_classes} classes"
        )

    def size_options(self, arch: ViTArch) -> list[str]:
        return [*super().size_options(arch), "--mlp-ratio", f"{arch.mlp_ratio:g}"]

    def default_template_size(self, arch: ViTArch) -> int:
        return arch.head_dim

    def template_types(self, arch: ViTArch, template_size: int | None = None) -> dict[str, TemplateType]:
        p = template_size or self.default_template_size(arch)
        if arch.width % p or arch.hidden % p:
            raise WeitError(
                f"template size {p} does not divide width {arch.width} and hidden width {arch.hidden}",
                f"pick a divisor of both, e.g. the head dim {arch.head_dim}",
            )
        return {t: TemplateType(t, p, p) for t in TEMPLATED}

    def layer_groups(self, arch: ViTArch) -> list[LayerGroup]:
        return [LayerGroup("blocks.{}.", arch.depth)]

    def sizes(self, arch: ViTArch) -> dict[str, int]:
        return {E: arch.width, H: arch.hidden}

    # ------------------------------------------------------------------ weight selection
    def selection_indices(self, src: ViTArch, dst: ViTArch) -> dict[str, Tensor]:
        import torch

        check_selection_same(src, dst, ("img_size", "patch_size", "in_chans", "class_token", "global_pool", "qkv_bias"),
                             "select from a checkpoint of the same patch grid and input format")
        problems = []
        if dst.depth > src.depth:
            problems.append(f"depth {dst.depth} > {src.depth}")
        if dst.width > src.width:
            problems.append(f"width {dst.width} > {src.width}")
        if dst.num_heads > src.num_heads:
            problems.append(f"{dst.num_heads} heads > {src.num_heads}")
        if dst.head_dim > src.head_dim:
            problems.append(f"head size {dst.head_dim} > {src.head_dim}")
        if dst.hidden > src.hidden:
            problems.append(f"MLP width {dst.hidden} > {src.hidden}")
        check_selection_smaller(problems)
        attn = head_aligned(src.num_heads, src.head_dim, dst.num_heads, dst.head_dim)
        return {
            E: evenly_spaced(src.width, dst.width),
            H: evenly_spaced(src.hidden, dst.hidden),
            "attn": attn,
            "qkv": torch.cat([attn + r * src.width for r in range(3)]),
        }

    def selection_missing(self, key: str) -> Exception:
        return WeitError(f"weight selection does not know how to select '{key}'", "the source is not a plain timm ViT")

    # ------------------------------------------------------------------ recipes
    def recipe_template_size(self, model: ViTModelSection, widths: list[int]) -> int:
        return model.head_dim

    def recipe_depths(self, depths: list) -> list:
        return list(depths)

    def check_recipe(self, recipe) -> None:
        if any(isinstance(d, list) for d in recipe.nested.depths):
            raise ValueError("nested.depths: per-stage lists are for ResNets; a ViT depth is one number")
        hd, p = recipe.model.head_dim, recipe.template_size
        if hd % p:
            raise ValueError(f"templates.size {p} must divide model.head_dim {hd}")
        step = math.lcm(hd, p)
        bad = [w for w in recipe.nested.widths if w % step]
        if bad:
            raise ValueError(f"nested.widths {bad} are not multiples of head_dim {hd}")
        for w in recipe.nested.widths:
            hidden = w * recipe.model.mlp_ratio
            if hidden != int(hidden) or int(hidden) % p:
                raise ValueError(f"width {w} × mlp_ratio {recipe.model.mlp_ratio:g} is not a multiple of the template size {p}")
        limit = p * p
        over = {t: n for t, n in recipe.templates.counts(tuple(TEMPLATED)).items() if n > limit}
        if over:
            raise ValueError(f"templates.count {over} exceeds {limit} = size² (the most {p}×{p} templates can span)")


def _square(v: Any, name: str) -> int | None:
    """timm's own configs write sizes as [h, w] (save_for_hf); weit's ViTs are square."""
    if isinstance(v, (list, tuple)):
        if len(v) != 2 or v[0] != v[1]:
            raise InputError(f"{name} {list(v)} is not square", "weit supports square ViT inputs only")
        v = v[0]
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise InputError(f"{name} {v!r} in the model's config is not a positive integer", f"pass --{name.replace('_', '-')}")
    return v

