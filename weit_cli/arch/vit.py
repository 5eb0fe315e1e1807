"""timm `VisionTransformer` (docs/method.md §2): qkv, proj, fc1 and fc2 are templated; everything else is small."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace
from typing import Any

from torch import Tensor, nn

from weit_cli.errors import InputError, WeitError
from weit_cli.core.resize import Axis
from weit_cli.arch._registry import register
from weit_cli.arch.base import Adapter, LayerGroup, TemplateType

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

MAX_PARAMS = 20_000_000_000  # refuse sizes no machine could hold, before allocating anything


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


class ViTAdapter(Adapter):
    family = "vit"
    identity_zero = ("attn.proj.weight", "attn.proj.bias", "mlp.fc2.weight", "mlp.fc2.bias")
    classifier = ("head.weight", "head.bias")
    timm_architecture = "vit_base_patch16_224"  # any timm ViT name: model_args override every size

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
        p = template_size or hd
        if depth < 1:
            raise WeitError(f"depth must be at least 1, got {depth}", "pass --depth 1 or more")
        if num_classes < 0:
            raise WeitError(f"num_classes must be 0 or more, got {num_classes}", "pass --num-classes N")
        step = math.lcm(hd, p)
        if width < 1 or width % step:
            lo = max(step, width // step * step)
            hi = lo + step if lo < width else lo
            near = sorted({lo, hi})
            raise WeitError(
                f"width {width} is not a multiple of {step} (head_dim {hd}, template size {p})",
                f"nearest valid widths: {', '.join(map(str, near))}",
            )
        if num_heads is not None and num_heads * hd != width:
            raise WeitError(
                f"--num-heads {num_heads} gives head_dim {width / num_heads:g}, but the templates fix head_dim at {hd}",
                f"use --num-heads {width // hd} or leave it out",
            )
        hidden = int(width * mlp_ratio)
        if mlp_ratio <= 0 or hidden % p:
            raise WeitError(
                f"mlp ratio {mlp_ratio:g} gives hidden width {hidden}, not a multiple of the template size {p}",
                "pick a ratio r with width·r a multiple of the template size (4.0 always works)",
            )
        new = replace(arch, depth=depth, width=width, num_heads=width // hd, mlp_ratio=mlp_ratio, num_classes=num_classes)
        n = self.param_count(new)
        if n > MAX_PARAMS:
            raise WeitError(f"depth {depth} × width {width} would have {n / 1e9:.0f}B parameters", "pick a smaller size")
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

    def build(self, arch: ViTArch) -> nn.Module:
        import timm

        return timm.create_model(self.timm_architecture, pretrained=False, **arch.model_args())

    def timm_config(self, arch: ViTArch) -> dict[str, Any]:
        return {
            "architecture": self.timm_architecture,
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

    def template_types(self, arch: ViTArch, template_size: int | None = None) -> dict[str, TemplateType]:
        p = template_size or arch.head_dim
        if arch.width % p or arch.hidden % p:
            raise WeitError(
                f"template size {p} does not divide width {arch.width} and hidden width {arch.hidden}",
                f"pick a divisor of both, e.g. the head dim {arch.head_dim}",
            )
        return {t: TemplateType(t, p, p) for t in TEMPLATED}

    def template_type_of(self, key: str, arch: ViTArch | None = None) -> str | None:
        for t, pat in TEMPLATED.items():
            if re.fullmatch(pat, key):
                return t
        return None

    def layer_groups(self, arch: ViTArch) -> list[LayerGroup]:
        return [LayerGroup("blocks.{}.", arch.depth)]

    def sizes(self, arch: ViTArch) -> dict[str, int]:
        return {E: arch.width, H: arch.hidden}

    def axes(self, key: str, arch: ViTArch) -> list[Axis]:
        axes = self._match(AXES, key)
        if axes is None:
            raise InputError(f"unsupported ViT parameter '{key}'", "weit supports timm's plain VisionTransformer blocks")
        return axes


def _square(v: Any, name: str) -> int | None:
    """timm's own configs write sizes as [h, w] (save_for_hf); weit's ViTs are square."""
    if isinstance(v, (list, tuple)):
        if len(v) != 2 or v[0] != v[1]:
            raise InputError(f"{name} {list(v)} is not square", "weit supports square ViT inputs only")
        v = v[0]
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise InputError(f"{name} {v!r} in the model's config is not a positive integer", f"pass --{name.replace('_', '-')}")
    return v


register(ViTAdapter())
