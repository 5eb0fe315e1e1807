"""diffusers' `DiTTransformer2DModel` (class-conditional, adaLN-Zero; docs/method.md §2).

Templated (the per-block matrices of width² size, p×p templates, p = the head size by default):
`qkv` (attn1.to_q, to_k and to_v: three D×D matrices sharing one set of templates, as a ViT's fused
qkv), `proj` (attn1.to_out.0), `fc1` (ff.net.0.proj, 4D×D), `fc2` (ff.net.2, D×4D), `ada` (the adaLN
modulation norm1.linear, 6D×D: shift, scale and gate of attention, then of the MLP) and `temb` (each
block's timestep embedder linear_2, D×D). Small: biases, the patch-embedding conv, each block's
timestep linear_1 (D×256: 256 sinusoid channels, not a width), each block's class embedding table
((classes + 1)×D: diffusers adds the "no class" row of classifier-free guidance), the final
modulation proj_out_1 (2D×D, once) and proj_out_2. diffusers gives every block its own embedders
(the original DiT shares one; converted checkpoints hold the same copy in every block); the final
layer reads block 0's. The position code is a non-persistent buffer: sin-cos, recomputed by diffusers
from the width, never stored.

Resizing. Depth: one layer group `transformer_blocks.{}.`; a block added by the identity rule keeps
its copy's weights but zero gate chunks (rows 2D..3D and 5D..6D of norm1.linear's weight and bias),
so both residual branches are closed and the block is exactly the identity (adaLN-Zero's own init
zeroes the whole modulation; keeping shift and scale lets the block do what its copy did once its
gates open). Width: tiled, input axes divided by their copy count; LayerNorms have no affine
parameters and normalise tiled features to tiled features, heads keep head_dim, the modulation's six
chunks and proj_out_1's two are tiled run by run, the class tables and embedders along their width.
Everything but the position code is therefore carried losslessly; the position code is diffusers'
sin-cos of the new width, which is not a tiling of the old one (its frequencies are denser), so a
wider model's output differs from the source's by that alone — with the source's position code
tiled into the buffer the output is the same (tests/test_dit.py).

Weight selection (core/selection.py; as for the ViT): first-N blocks; the embedding axis and the MLP
hidden axis take evenly spaced elements; q, k, v rows and to_out.0's columns take whole heads
(`head_aligned`); the modulation's six runs and proj_out_1's two each take the embedding selection.
With a width ratio k that divides, evenly spaced channels (every k-th) are exactly the channels of
the smaller sin-cos position code, so selection keeps the position code consistent. Sample size,
patch, channels and the class count must match.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from weit_cli.arch._registry import register
from weit_cli.arch.base import (
    Adapter,
    Hints,
    KeyTables,
    LayerGroup,
    TemplateType,
    check_head_sizes,
    check_param_count,
    check_selection_same,
    check_selection_smaller,
)
from weit_cli.core.axes import Axis, ZeroRuns
from weit_cli.core.selection import evenly_spaced, head_aligned
from weit_cli.errors import InputError, WeitError
from weit_cli.io.exporters import DiffusersFolder
from weit_cli.section import Section

if TYPE_CHECKING:
    from torch import Tensor, nn

CLASS_NAME = "DiTTransformer2DModel"
B = r"transformer_blocks\.\d+\."
TEMPLATED = {
    "qkv": B + r"attn1\.to_[qkv]\.weight",
    "proj": B + r"attn1\.to_out\.0\.weight",
    "fc1": B + r"ff\.net\.0\.proj\.weight",
    "fc2": B + r"ff\.net\.2\.weight",
    "ada": B + r"norm1\.linear\.weight",
    "temb": B + r"norm1\.emb\.timestep_embedder\.linear_2\.weight",
}
MODULATION = 6  # norm1.linear's chunks: shift, scale, gate of attention; shift, scale, gate of the MLP
GATES = (2, 5)
MLP_RATIO = 4  # diffusers' FeedForward default; DiTTransformer2DModel does not expose it
TIME_CHANNELS = 256  # sinusoid channels of the timestep embedding (CombinedTimestepLabelEmbeddings)

E, H = "embed", "hidden"
AXES: list[tuple[str, list[Axis]]] = [
    (r"pos_embed\.proj\.(weight|bias)", [Axis(0, E)]),
    (B + r"norm1\.emb\.timestep_embedder\.linear_1\.(weight|bias)", [Axis(0, E)]),
    (B + r"norm1\.emb\.timestep_embedder\.linear_2\.weight", [Axis(0, E), Axis(1, E, "in")]),
    (B + r"norm1\.emb\.timestep_embedder\.linear_2\.bias", [Axis(0, E)]),
    (B + r"norm1\.emb\.class_embedder\.embedding_table\.weight", [Axis(1, E)]),
    (B + r"norm1\.linear\.weight", [Axis(0, E, runs=MODULATION), Axis(1, E, "in")]),
    (B + r"norm1\.linear\.bias", [Axis(0, E, runs=MODULATION)]),
    (B + r"attn1\.(to_[qkv]|to_out\.0)\.weight", [Axis(0, E), Axis(1, E, "in")]),
    (B + r"attn1\.(to_[qkv]|to_out\.0)\.bias", [Axis(0, E)]),
    (B + r"ff\.net\.0\.proj\.weight", [Axis(0, H), Axis(1, E, "in")]),
    (B + r"ff\.net\.0\.proj\.bias", [Axis(0, H)]),
    (B + r"ff\.net\.2\.weight", [Axis(0, E), Axis(1, H, "in")]),
    (B + r"ff\.net\.2\.bias", [Axis(0, E)]),
    (r"proj_out_1\.weight", [Axis(0, E, runs=2), Axis(1, E, "in")]),
    (r"proj_out_1\.bias", [Axis(0, E, runs=2)]),
    (r"proj_out_2\.weight", [Axis(1, E, "in")]),
    (r"proj_out_2\.bias", []),
]

# Weight selection keeps whole heads and selects run by run: these replace AXES' names there.
SELECTION: list[tuple[str, dict[int, str]]] = [
    (B + r"attn1\.to_[qkv]\.(weight|bias)", {0: "attn"}),
    (B + r"attn1\.to_out\.0\.weight", {1: "attn"}),
    (B + r"norm1\.linear\.(weight|bias)", {0: "modulation"}),
    (r"proj_out_1\.(weight|bias)", {0: "final"}),
]

# diffusers' init arguments weit carries (DiTArch) and the ones it supports at their defaults only.
FIXED = {
    "norm_type": "ada_norm_zero",
    "attention_bias": True,
    "norm_elementwise_affine": False,
    "upcast_attention": False,
    "dropout": 0.0,
}
ACTIVATIONS = ("gelu-approximate", "gelu")  # both are GELU(proj): same weights


class _ImageNames:
    """The names the image data loaders and tasks read (a ViT's), for the recipe section and the
    architecture alike, so data is loaded for a DiT as for any image model."""

    @property
    def img_size(self) -> int:
        return self.sample_size

    @property
    def in_chans(self) -> int:
        return self.in_channels


class DiTModelSection(_ImageNames, Section):
    family: Literal["dit"] = Field("dit", description="Architecture family (diffusers DiTTransformer2DModel, class-conditional).")
    sample_size: int = Field(28, ge=2, description="Image side in pixels (pixel space); data is resized to it.")
    patch_size: int = Field(2, ge=1, description="Patch side in pixels; must divide sample_size.")
    in_channels: Literal[1, 3] = Field(1, description="Image channels: 1 (gray) or 3 (RGB); the model predicts noise of as many.")
    head_dim: int = Field(64, ge=1, description="Channels per attention head, fixed across sizes (DiT-S/B/L: 64).")

    @model_validator(mode="after")
    def _patches(self):
        if self.sample_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} does not divide sample_size {self.sample_size}")
        return self


@dataclass(frozen=True)
class DiTArch(_ImageNames):
    sample_size: int
    patch_size: int
    in_channels: int
    out_channels: int
    num_classes: int
    depth: int
    width: int
    num_heads: int
    activation_fn: str = "gelu-approximate"
    norm_eps: float = 1e-5
    family: str = "dit"

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def hidden(self) -> int:
        return MLP_RATIO * self.width

    @property
    def mlp_ratio(self) -> float:
        return float(MLP_RATIO)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def model_args(self) -> dict[str, Any]:
        """`DiTTransformer2DModel`'s init arguments (config.json without the `_` keys)."""
        return {
            "num_attention_heads": self.num_heads,
            "attention_head_dim": self.head_dim,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "num_layers": self.depth,
            "sample_size": self.sample_size,
            "patch_size": self.patch_size,
            "activation_fn": self.activation_fn,
            "num_embeds_ada_norm": self.num_classes,
            "norm_eps": self.norm_eps,
            **FIXED,
        }


@register
class DiTAdapter(KeyTables, Adapter):
    templated, axes_table, selection_table = TEMPLATED, AXES, SELECTION
    unsupported = ("unsupported DiT parameter '{key}'", f"weit supports diffusers' {CLASS_NAME} with adaLN-Zero blocks")
    family = "dit"
    model_section = DiTModelSection
    classifier = ()  # the class tables live in every block; a DiT keeps its class count (target_arch)
    no_decay = ("embedding_table.weight",)  # DiT trains with no weight decay at all; embeddings at least
    hints = Hints(guessed=("--num-heads", "--img-size"))
    task = "generation"  # tasks/generation.py (ε-prediction DDPM)
    # Deeper than the bundle, added blocks start as identities (the grown DiT computes the bundle's
    # largest size): at the garments budget, 3 seeds, 6×64 from a 4×64 bundle, judge FID 36.3 at step 0
    # and 28.1 after 1000 finetuning steps, where interpolated blocks draw at 187.8 (docs/benchmarks.md).
    grow_depth_rule = "identity"

    @cached_property
    def exporter(self) -> DiffusersFolder:
        return DiffusersFolder(self.diffusers_config, self.companion_files)

    # ------------------------------------------------------------------ architecture
    def arch_from_dict(self, d: dict[str, Any]) -> DiTArch:
        fields = {k: v for k, v in d.items() if k in DiTArch.__dataclass_fields__}
        try:
            return DiTArch(**fields)
        except TypeError as e:
            raise InputError(f"architecture record is incomplete: {e}", "the file was not written by this weit") from None

    def matches(self, keys) -> bool:
        keys = set(keys)
        return "pos_embed.proj.weight" in keys and "proj_out_1.weight" in keys and any(re.fullmatch(TEMPLATED["ada"], k) for k in keys)

    def infer_arch(self, state: dict[str, Tensor], hints: dict[str, Any]) -> DiTArch:
        cls = hints.get("_class_name")
        if cls is not None and cls != CLASS_NAME:
            raise InputError(f"the model's config.json names a diffusers {cls}, not a {CLASS_NAME}", f"weit reads diffusers' {CLASS_NAME}")
        for k, v in FIXED.items():
            if k in hints and hints[k] != v:
                raise InputError(f"the model's config sets {k}={hints[k]!r}", f"weit supports {CLASS_NAME}s with {k}={v!r} (diffusers' default)")
        pe = state["pos_embed.proj.weight"]
        width, in_channels, patch = int(pe.shape[0]), int(pe.shape[1]), int(pe.shape[2])
        depth = len([k for k in state if re.fullmatch(B + r"norm1\.linear\.weight", k)])
        table = state.get("transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight")
        num_classes = int(table.shape[0]) - 1 if table is not None else 0
        out2 = state.get("proj_out_2.weight")
        out_channels = int(out2.shape[0]) // (patch * patch) if out2 is not None else in_channels
        weights = {"num_layers": depth, "patch_size": patch, "in_channels": in_channels, "out_channels": out_channels, "num_embeds_ada_norm": num_classes}
        wrong = [f"{k} {hints[k]} (weights: {v})" for k, v in weights.items() if hints.get(k) is not None and hints[k] != v]
        heads, hd = hints.get("num_attention_heads"), hints.get("attention_head_dim")
        if isinstance(heads, int) and isinstance(hd, int) and heads * hd != width:
            wrong.append(f"num_attention_heads × attention_head_dim {heads}×{hd} (weights: width {width})")
        if wrong:
            raise InputError(f"the model's config does not match its weights: {'; '.join(wrong)}", "fix config.json, or remove it and pass --num-heads/--img-size")
        sample = _one_size(hints)
        if sample % patch:
            raise InputError(f"sample size {sample} is not a multiple of the patch size {patch}", "pass --img-size (a multiple of the patch size)")
        num_heads = hints.get("num_heads", heads)
        if heads is not None and num_heads != heads:
            raise InputError(f"--num-heads {num_heads} disagrees with the config's num_attention_heads {heads}", "leave out --num-heads")
        if num_heads is None:
            raise InputError(f"cannot tell the number of heads of a width-{width} DiT from its weights", "pass --num-heads, or keep the config.json beside the weights")
        if not isinstance(num_heads, int) or num_heads < 1 or width % num_heads:
            raise InputError(f"{num_heads!r} heads do not divide width {width}", "pass --num-heads with a divisor of the width")
        act = hints.get("activation_fn", "gelu-approximate")
        if act not in ACTIVATIONS:
            raise InputError(f"the model's config sets activation_fn={act!r}", f"weit supports {CLASS_NAME}s with activation_fn in {', '.join(ACTIVATIONS)}")
        eps = hints.get("norm_eps", 1e-5)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise InputError(f"the model's config sets norm_eps={eps!r}", "norm_eps must be a positive number")
        return DiTArch(
            sample_size=sample, patch_size=patch, in_channels=in_channels, out_channels=out_channels, num_classes=num_classes,
            depth=depth, width=width, num_heads=int(num_heads), activation_fn=act, norm_eps=float(eps),
        )

    def target_arch(
        self,
        arch: DiTArch,
        *,
        depth: int | None = None,
        width: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float | None = None,
        num_classes: int | None = None,
        template_size: int | None = None,
    ) -> DiTArch:
        depth = arch.depth if depth is None else depth
        width = arch.width if width is None else width
        hd = arch.head_dim
        p = template_size or self.default_template_size(arch)
        if depth < 1:  # checked first, as for every family (check_head_sizes checks it too)
            raise WeitError(f"depth must be at least 1, got {depth}", "pass --depth 1 or more")
        if num_classes is not None and num_classes != arch.num_classes:
            raise WeitError(
                f"a DiT's {arch.num_classes} class embeddings cannot become {num_classes}",
                "leave out --num-classes: a DiT keeps the classes it was trained on",
            )
        if mlp_ratio is not None and mlp_ratio != MLP_RATIO:
            raise WeitError(f"a {CLASS_NAME}'s MLP ratio is {MLP_RATIO}, not {mlp_ratio:g}", "leave out --mlp-ratio")
        # sin-cos quarters: diffusers' 2-D sin-cos position code splits the width in quarters
        check_head_sizes(depth, width, hd, p, num_heads, extra=(("sin-cos quarters", 4),))
        new = replace(arch, depth=depth, width=width, num_heads=width // hd)
        check_param_count(self, new, f"depth {depth} × width {width}")
        return new

    def build(self, arch: DiTArch) -> nn.Module:
        """diffusers' module with its own label dropout off (see `DiTDenoiser`)."""
        from diffusers import DiTTransformer2DModel

        from weit_cli.arch._dit_module import no_label_dropout

        return no_label_dropout(DiTTransformer2DModel(**arch.model_args()))

    def apply(self, call, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """(x_t, t, y) → ε: diffusers' `.sample`, its first `in_channels` channels when the model
        predicts a learned variance too (out_channels = 2·in, as facebook's checkpoints)."""
        from weit_cli.arch._dit_module import eps

        return eps(call, x, t, y)

    def task_forward(self, module: nn.Module) -> nn.Module:
        from weit_cli.arch._dit_module import DiTDenoiser

        return DiTDenoiser(module)

    def state_shapes(self, a: DiTArch) -> dict[str, tuple[int, ...]]:
        """diffusers' keys; its LayerNorms carry no weights (`norm_elementwise_affine` False) and
        the position code is a non-persistent buffer."""
        d, h, pp = a.width, a.hidden, a.patch_size**2
        out: dict[str, tuple[int, ...]] = {"pos_embed.proj.weight": (d, a.in_channels, a.patch_size, a.patch_size), "pos_embed.proj.bias": (d,)}
        for i in range(a.depth):
            b, t = f"transformer_blocks.{i}.", f"transformer_blocks.{i}.norm1.emb."
            out |= {t + "timestep_embedder.linear_1.weight": (d, TIME_CHANNELS), t + "timestep_embedder.linear_1.bias": (d,),
                    t + "timestep_embedder.linear_2.weight": (d, d), t + "timestep_embedder.linear_2.bias": (d,),
                    t + "class_embedder.embedding_table.weight": (a.num_classes + 1, d),  # + the "no class" row
                    b + "norm1.linear.weight": (MODULATION * d, d), b + "norm1.linear.bias": (MODULATION * d,)}
            for m in ("to_q", "to_k", "to_v", "to_out.0"):
                out |= {f"{b}attn1.{m}.weight": (d, d), f"{b}attn1.{m}.bias": (d,)}
            out |= {b + "ff.net.0.proj.weight": (h, d), b + "ff.net.0.proj.bias": (h,), b + "ff.net.2.weight": (d, h), b + "ff.net.2.bias": (d,)}
        return out | {"proj_out_1.weight": (2 * d, d), "proj_out_1.bias": (2 * d,),
                      "proj_out_2.weight": (pp * a.out_channels, d), "proj_out_2.bias": (pp * a.out_channels,)}

    def describe(self, arch: DiTArch) -> str:
        return (
            f"DiT depth {arch.depth}, width {arch.width}, {arch.num_heads} heads, patch {arch.patch_size}, "
            f"{arch.sample_size}px×{arch.in_channels}ch, {arch.num_classes} classes"
        )

    def param_count(self, a: DiTArch) -> int:
        d, h, c = a.width, a.hidden, a.num_classes
        block = (
            TIME_CHANNELS * d + d + d * d + d  # timestep embedder
            + (c + 1) * d  # class table (with the "no class" row)
            + MODULATION * (d * d + d)  # norm1.linear
            + 4 * (d * d + d)  # q, k, v, out
            + h * d + h + d * h + d  # MLP
        )
        pp = a.patch_size**2
        embed = d * a.in_channels * pp + d
        final = 2 * (d * d + d) + pp * a.out_channels * (d + 1)
        return a.depth * block + embed + final

    # ------------------------------------------------------------------ export
    def diffusers_config(self, arch: DiTArch) -> dict[str, Any]:
        """config.json as diffusers' `save_config` writes it (without `_diffusers_version`)."""
        return {"_class_name": CLASS_NAME, **arch.model_args()}

    def companion_files(self, arch: DiTArch) -> dict[str, dict[str, Any]]:
        """The noise process beside the model: `scheduler_config.json`, which
        `DDIMScheduler.from_pretrained(folder)` (or DDPM…) reads and `weit sample` samples with."""
        from weit_cli.tasks.diffusion import SCHEDULER_FILE, scheduler_file_config

        return {SCHEDULER_FILE: scheduler_file_config()}

    # ------------------------------------------------------------------ structure
    def default_template_size(self, arch: DiTArch) -> int:
        return arch.head_dim

    def template_types(self, arch: DiTArch, template_size: int | None = None) -> dict[str, TemplateType]:
        p = template_size or self.default_template_size(arch)
        if arch.width % p:
            raise WeitError(f"template size {p} does not divide width {arch.width}", f"pick a divisor of the width, e.g. the head dim {arch.head_dim}")
        return {t: TemplateType(t, p, p) for t in TEMPLATED}

    def identity_rows(self, arch: DiTArch) -> dict[str, ZeroRuns]:
        gates = ZeroRuns(MODULATION, GATES)
        return {"norm1.linear.weight": gates, "norm1.linear.bias": gates}

    def layer_groups(self, arch: DiTArch) -> list[LayerGroup]:
        return [LayerGroup("transformer_blocks.{}.", arch.depth)]

    def sizes(self, arch: DiTArch) -> dict[str, int]:
        return {E: arch.width, H: arch.hidden}

    # ------------------------------------------------------------------ weight selection
    def selection_indices(self, src: DiTArch, dst: DiTArch) -> dict[str, Tensor]:
        import torch

        check_selection_same(src, dst, ("sample_size", "patch_size", "in_channels", "out_channels", "num_classes"),
                             "select from a DiT of the same image format and classes")
        problems = []
        if dst.depth > src.depth:
            problems.append(f"depth {dst.depth} > {src.depth}")
        if dst.width > src.width:
            problems.append(f"width {dst.width} > {src.width}")
        if dst.num_heads > src.num_heads:
            problems.append(f"{dst.num_heads} heads > {src.num_heads}")
        if dst.head_dim > src.head_dim:
            problems.append(f"head size {dst.head_dim} > {src.head_dim}")
        check_selection_smaller(problems)
        embed = evenly_spaced(src.width, dst.width)
        return {
            E: embed,
            H: evenly_spaced(src.hidden, dst.hidden),
            "attn": head_aligned(src.num_heads, src.head_dim, dst.num_heads, dst.head_dim),
            "modulation": torch.cat([embed + r * src.width for r in range(MODULATION)]),
            "final": torch.cat([embed + r * src.width for r in range(2)]),
        }

    def selection_missing(self, key: str) -> Exception:
        return WeitError(f"weight selection does not know how to select '{key}'", f"the source is not a diffusers {CLASS_NAME}")

    # ------------------------------------------------------------------ recipes
    def arch_for_recipe(self, model: DiTModelSection, *, depth: int, width: int, num_classes: int) -> DiTArch:
        return DiTArch(
            sample_size=model.sample_size, patch_size=model.patch_size, in_channels=model.in_channels,
            out_channels=model.in_channels, num_classes=num_classes, depth=depth, width=width,
            num_heads=width // model.head_dim,
        )

    def recipe_template_size(self, model: DiTModelSection, widths: list[int]) -> int:
        return model.head_dim

    def recipe_depths(self, depths: list) -> list:
        return list(depths)

    def check_recipe(self, recipe) -> None:
        if any(isinstance(d, list) for d in recipe.nested.depths):
            raise ValueError("nested.depths: per-stage lists are for staged networks; a DiT depth is one number")
        hd, p = recipe.model.head_dim, recipe.template_size
        if hd % p:
            raise ValueError(f"templates.size {p} must divide model.head_dim {hd}")
        step = math.lcm(hd, 4)
        bad = [w for w in recipe.nested.widths if w % step]
        if bad:
            raise ValueError(f"nested.widths {bad} are not multiples of {step} (head_dim {hd}; the sin-cos position code needs multiples of 4)")
        limit = p * p
        over = {t: n for t, n in recipe.templates.counts(tuple(TEMPLATED)).items() if n > limit}
        if over:
            raise ValueError(f"templates.count {over} exceeds {limit} = size² (the most {p}×{p} templates can span)")


def _one_size(hints: dict[str, Any]) -> int:
    """The sample size: the config's `sample_size` or the --img-size option; they must agree. The
    weights do not say it (the position code is not stored)."""
    given = {k: hints[k] for k in ("sample_size", "img_size") if hints.get(k) is not None}
    for k, v in given.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"{k} {v!r} is not a positive integer", "pass --img-size N")
    if len(set(given.values())) > 1:
        raise InputError(f"--img-size {given['img_size']} disagrees with the config's sample_size {given['sample_size']}", "leave out --img-size")
    if not given:
        raise InputError("cannot tell the sample size of a DiT from its weights (its position code is not stored)", "pass --img-size, or keep the config.json beside the weights")
    return next(iter(given.values()))


def __getattr__(name: str) -> Any:
    """`DiTDenoiser` lives in `_dit_module` (an `nn.Module`: importing this family needs no torch)."""
    if name == "DiTDenoiser":
        from weit_cli.arch._dit_module import DiTDenoiser

        return DiTDenoiser
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
