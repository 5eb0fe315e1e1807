"""transformers' `DecisionTransformerModel` (Chen et al., "Decision Transformer: Reinforcement Learning
via Sequence Modeling", 2021): GPT-2 blocks under `encoder.h.{l}.` read a sequence of (return-to-go,
state, action) tokens and predict actions. The four block matrices are templated — the fused
`attn.c_attn` (q, k and v runs), `attn.c_proj`, `mlp.c_fc` and `mlp.c_proj` — and everything else is a
small parameter: LayerNorms, the state, action, return and timestep embeddings, `embed_ln`, the
prediction heads, `encoder.wpe` and `encoder.wte`.

**Stored layout.** GPT-2's `Conv1D` computes x @ W + b with W stored as (in, out), the transpose of a
Linear. The templates tile the tensor as stored (p×q blocks of the (in, out) matrix) and the axes
below say that dimension 0 is the input. Since (S ⊗ T)ᵀ = Sᵀ ⊗ Tᵀ, this spans exactly the matrices
that (out, in) templates would, and the composed tensor is the module's own: pretraining's
functional_call, the exporters, extraction and weight selection need no transpose anywhere, and no
module outside this one has to know that Conv1D exists.

**Sizes.** Depth is n_layer (one layer group); width is hidden_size with the head size fixed
(n_head = width / head_dim); the MLP width n_inner follows `mlp_ratio` (GPT-2's default 4).
GPT-2 scales attention by head_dim^-½ (fixed across sizes). A layer-index-dependent scale
(`scale_attn_by_inverse_layer_idx`) would change when depth rules move blocks, so it is refused.

**Lossless growth.** Width tiling copies whole heads (head_dim fixed, every width a multiple of it)
and divides input axes by their copy count (Net2Net); a LayerNorm over a tiled vector sees the same
mean and variance, so with its affine tiled it gives the tiled output (`embed_ln`, `ln_1`, `ln_2`,
`ln_f`). An added block with zero `attn.c_proj` and `mlp.c_proj` (weights and biases) is the
identity. Both keep the predicted actions exactly.

**Positions.** DecisionTransformerModel passes position_ids = 0 for every token (time enters through
`embed_timestep`), so only row 0 of `encoder.wpe` is used and `encoder.wte` (vocabulary of 1) not at
all; both are kept so that the files load unchanged. A recipe sizes wpe at 3·K rows, the tokens of
a K-step context.

Weight selection (Xu et al., ICLR 2024; the generic algorithm is in core/selection.py), as for a ViT:
first-N blocks; evenly spaced elements of the embedding and MLP axes; whole heads of the attention
axis, the same heads in the q, k and v runs; a prefix of the timestep and position rows. State and
action sizes, activation and the action squashing must match.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

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
from weit_cli.core.axes import Axis
from weit_cli.core.selection import evenly_spaced, head_aligned
from weit_cli.errors import InputError, WeitError
from weit_cli.io.exporters import Exporter, TransformersFolder
from weit_cli.section import Section

if TYPE_CHECKING:
    from torch import Tensor, nn

BLOCK = r"encoder\.h\.\d+\."
TEMPLATED = {
    "c_attn": BLOCK + r"attn\.c_attn\.weight",
    "attn_proj": BLOCK + r"attn\.c_proj\.weight",
    "c_fc": BLOCK + r"mlp\.c_fc\.weight",
    "mlp_proj": BLOCK + r"mlp\.c_proj\.weight",
}

E, I = "embed", "inner"  # the residual stream and the MLP hidden axis
HEADS = r"(predict_state|predict_action\.0|predict_return)"
AXES: list[tuple[str, list[Axis]]] = [
    (r"encoder\.(wte|wpe)\.weight", [Axis(1, E)]),
    (BLOCK + r"ln_[12]\.(weight|bias)", [Axis(0, E)]),
    (BLOCK + r"attn\.c_attn\.weight", [Axis(0, E, "in"), Axis(1, E, runs=3)]),  # Conv1D: (in, out)
    (BLOCK + r"attn\.c_attn\.bias", [Axis(0, E, runs=3)]),
    (BLOCK + r"attn\.c_proj\.weight", [Axis(0, E, "in"), Axis(1, E)]),
    (BLOCK + r"attn\.c_proj\.bias", [Axis(0, E)]),
    (BLOCK + r"mlp\.c_fc\.weight", [Axis(0, E, "in"), Axis(1, I)]),
    (BLOCK + r"mlp\.c_fc\.bias", [Axis(0, I)]),
    (BLOCK + r"mlp\.c_proj\.weight", [Axis(0, I, "in"), Axis(1, E)]),
    (BLOCK + r"mlp\.c_proj\.bias", [Axis(0, E)]),
    (r"encoder\.ln_f\.(weight|bias)", [Axis(0, E)]),
    (r"embed_timestep\.weight", [Axis(1, E)]),
    (r"embed_(return|state|action)\.(weight|bias)", [Axis(0, E)]),
    (r"embed_ln\.(weight|bias)", [Axis(0, E)]),
    (HEADS + r"\.weight", [Axis(1, E, "in")]),
    (HEADS + r"\.bias", []),
]

# Weight selection: whole heads on the attention axis, and prefixes of the timestep and position rows.
SELECTION: list[tuple[str, dict[int, str]]] = [
    (BLOCK + r"attn\.c_attn\.weight", {1: "qkv"}),
    (BLOCK + r"attn\.c_attn\.bias", {0: "qkv"}),
    (BLOCK + r"attn\.c_proj\.weight", {0: "attn"}),
    (r"embed_timestep\.weight", {0: "timestep"}),
    (r"encoder\.wpe\.weight", {0: "position"}),
]

MODEL_TYPE = "decision_transformer"
MODEL_CLASS = "DecisionTransformerModel"
CONFIG_CLASS = "DecisionTransformerConfig"
ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu", "tanh")


class DecisionTransformerModelSection(Section):
    family: Literal["decision-transformer"] = Field(description="Architecture family (transformers' DecisionTransformerModel, GPT-2 blocks).")
    state_dim: int = Field(ge=1, description="Observation size of the environment.")
    act_dim: int = Field(ge=1, description="Action size of the environment (continuous actions).")
    context: int = Field(20, ge=1, description="Context length K in timesteps (3·K tokens: return-to-go, state, action); the DT paper's 20.")
    max_ep_len: int = Field(1000, ge=1, description="Rows of the timestep embedding: the longest episode (MuJoCo's 1000 steps).")
    head_dim: int = Field(64, ge=1, description="Channels per attention head, fixed across sizes.")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden width / width (GPT-2: 4).")
    activation: Literal[ACTIVATIONS] = Field("relu", description="MLP activation (the DT paper's relu).")
    action_tanh: bool = Field(True, description="Squash predicted actions into [-1, 1] with tanh.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on embeddings, attention and residual branches (the DT paper's 0.1).")


@dataclass(frozen=True)
class DecisionTransformerArch:
    state_dim: int
    act_dim: int
    depth: int
    width: int
    num_heads: int
    mlp_ratio: float = 4.0
    max_ep_len: int = 4096  # transformers' defaults
    n_positions: int = 1024
    activation: str = "relu"
    action_tanh: bool = True
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    embd_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    family: str = "decision-transformer"

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def inner(self) -> int:
        return round(self.width * self.mlp_ratio)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def config_fields(self) -> dict[str, Any]:
        """`DecisionTransformerConfig`'s keyword arguments for this architecture."""
        return {
            "state_dim": self.state_dim,
            "act_dim": self.act_dim,
            "hidden_size": self.width,
            "n_layer": self.depth,
            "n_head": self.num_heads,
            "n_inner": self.inner,
            "max_ep_len": self.max_ep_len,
            "n_positions": self.n_positions,
            "activation_function": self.activation,
            "action_tanh": self.action_tanh,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "scale_attn_weights": self.scale_attn_weights,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "embd_pdrop": self.embd_pdrop,
            "resid_pdrop": self.resid_pdrop,
            "attn_pdrop": self.attn_pdrop,
            "vocab_size": 1,
            "initializer_range": 0.02,
            # GPT-2's token ids (50256) lie outside a vocabulary of 1, and transformers warns about them
            "bos_token_id": None,
            "eos_token_id": None,
        }


@register
class DecisionTransformerAdapter(KeyTables, Adapter):
    templated, axes_table, selection_table = TEMPLATED, AXES, SELECTION
    unsupported = (f"unsupported {MODEL_CLASS} parameter '{{key}}'", "weit supports transformers' plain GPT-2 blocks (no cross-attention)")
    family = "decision-transformer"
    task = "control"  # return-conditioned action prediction (tasks/control.py)
    model_section = DecisionTransformerModelSection
    identity_zero = ("attn.c_proj.weight", "attn.c_proj.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")
    # minGPT's rule (which the DT authors' code follows): no decay on embedding tables.
    no_decay = ("wpe.weight", "wte.weight", "embed_timestep.weight")
    hints = Hints(guessed=("--num-heads",))
    # GPT-2's causal-mask buffers, saved by transformers before 4.2x (the DT checkpoints on the Hub
    # have them) and skipped by from_pretrained since.
    ignored_keys = (BLOCK + r"attn\.(bias|masked_bias)",)

    # ------------------------------------------------------------------ architecture
    def arch_from_dict(self, d: dict[str, Any]) -> DecisionTransformerArch:
        fields = {k: v for k, v in d.items() if k in DecisionTransformerArch.__dataclass_fields__}
        try:
            return DecisionTransformerArch(**fields)
        except TypeError as e:
            raise InputError(f"architecture record is incomplete: {e}", "the file was not written by this weit") from None

    def matches(self, keys) -> bool:
        keys = set(keys)
        return "embed_timestep.weight" in keys and any(re.fullmatch(TEMPLATED["c_attn"], k) for k in keys)

    def infer_arch(self, state: dict[str, Tensor], hints: dict[str, Any]) -> DecisionTransformerArch:
        cfg = hints.get("config") if isinstance(hints.get("config"), dict) else {}
        model_type = cfg.get("model_type")
        if model_type is not None and model_type != MODEL_TYPE:
            raise InputError(
                f"config.json describes a '{model_type}' model, but the weights are a {MODEL_CLASS}'s",
                f"point to a folder whose config.json has model_type '{MODEL_TYPE}'",
            )
        needed = ["embed_state.weight", "embed_action.weight", "embed_timestep.weight", "encoder.wpe.weight", "encoder.h.0.attn.c_attn.weight", "encoder.h.0.mlp.c_fc.weight"]
        missing = [k for k in needed if k not in state]
        if missing:
            raise InputError(f"the checkpoint lacks {', '.join(missing)}", f"weit reads transformers' {MODEL_CLASS} state dicts")
        c_attn = state["encoder.h.0.attn.c_attn.weight"]
        width = int(c_attn.shape[0])
        if c_attn.dim() != 2 or c_attn.shape[1] != 3 * width:
            raise InputError(f"encoder.h.0.attn.c_attn.weight has shape {tuple(c_attn.shape)}, not (width, 3·width)", "the checkpoint is not a GPT-2 Conv1D layout")
        found = {
            "hidden_size": width,
            "n_layer": len([k for k in state if re.fullmatch(TEMPLATED["c_attn"], k)]),
            "n_inner": int(state["encoder.h.0.mlp.c_fc.weight"].shape[1]),
            "state_dim": int(state["embed_state.weight"].shape[1]),
            "act_dim": int(state["embed_action.weight"].shape[1]),
            "max_ep_len": int(state["embed_timestep.weight"].shape[0]),
            "n_positions": int(state["encoder.wpe.weight"].shape[0]),
        }
        said = {k: cfg.get(k) for k in found if cfg.get(k) is not None}
        if "n_inner" in cfg and cfg["n_inner"] is None and "hidden_size" in said:
            said["n_inner"] = 4 * said["hidden_size"]  # transformers' default
        wrong = [f"{k} {v!r} (weights: {found[k]})" for k, v in said.items() if v != found[k]]
        if wrong:
            raise InputError(f"config.json does not match the weights: {', '.join(wrong)}", "fix config.json or point to the matching weights")
        num_heads = hints.get("num_heads") or cfg.get("n_head")
        if num_heads is None:
            raise InputError(
                f"cannot tell the number of heads of a width-{width} {MODEL_CLASS} from its weights", "pass --num-heads (the DT paper uses 1)"
            )
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or width % num_heads:
            raise InputError(f"{num_heads!r} heads do not divide width {width}", "pass --num-heads with a divisor of the width")
        if cfg.get("scale_attn_by_inverse_layer_idx"):
            raise InputError(
                "the checkpoint scales attention by its layer index, which changes when depth rules move blocks",
                "weit resizes GPT-2 blocks with scale_attn_by_inverse_layer_idx false only",
            )
        activation = cfg.get("activation_function", "relu")
        if activation not in ACTIVATIONS:
            raise InputError(f"activation '{activation}' in config.json is not supported", f"weit supports: {', '.join(ACTIVATIONS)}")
        floats = {}
        for k in ("layer_norm_epsilon", "embd_pdrop", "resid_pdrop", "attn_pdrop"):
            v = cfg.get(k, DecisionTransformerArch.__dataclass_fields__[k].default)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise InputError(f"{k} {v!r} in config.json is not a number ≥ 0", "fix config.json")
            floats[k] = float(v)
        return DecisionTransformerArch(
            state_dim=found["state_dim"],
            act_dim=found["act_dim"],
            depth=found["n_layer"],
            width=width,
            num_heads=int(num_heads),
            mlp_ratio=found["n_inner"] / width,
            max_ep_len=found["max_ep_len"],
            n_positions=found["n_positions"],
            activation=activation,
            action_tanh=bool(cfg.get("action_tanh", True)),
            scale_attn_weights=bool(cfg.get("scale_attn_weights", True)),
            **floats,
        )

    def target_arch(
        self,
        arch: DecisionTransformerArch,
        *,
        depth: int | None = None,
        width: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float | None = None,
        num_classes: int | None = None,
        template_size: int | None = None,
    ) -> DecisionTransformerArch:
        if num_classes is not None:
            raise WeitError("a Decision Transformer predicts actions, it has no classes", "leave out --num-classes")
        depth = arch.depth if depth is None else depth
        width = arch.width if width is None else width
        mlp_ratio = arch.mlp_ratio if mlp_ratio is None else mlp_ratio
        hd = arch.head_dim
        p = template_size or self.default_template_size(arch)
        check_head_sizes(depth, width, hd, p, num_heads)
        inner = width * mlp_ratio
        if mlp_ratio <= 0 or abs(inner - round(inner)) > 1e-6 or round(inner) % p:
            raise WeitError(
                f"mlp ratio {mlp_ratio:g} gives MLP width {inner:g}, not a multiple of the template size {p}",
                "pick a ratio r with width·r a multiple of the template size (4.0 always works)",
            )
        new = replace(arch, depth=depth, width=width, num_heads=width // hd, mlp_ratio=mlp_ratio)
        check_param_count(self, new, f"depth {depth} × width {width}")
        return new

    def build(self, arch: DecisionTransformerArch) -> nn.Module:
        from transformers import DecisionTransformerConfig, DecisionTransformerModel

        return DecisionTransformerModel(DecisionTransformerConfig(**arch.config_fields()))

    def apply(self, call, states: Tensor, actions: Tensor, returns_to_go: Tensor, timesteps: Tensor, attention_mask: Tensor) -> Tensor:
        """The control task's call on `call` (the module, or composed weights through functional_call):
        transformers' positional inputs in, its `action_preds` out (arch/_control_call.py)."""
        from weit_cli.arch._control_call import action_output, model_inputs

        return action_output(call(*model_inputs((states, actions, returns_to_go, timesteps, attention_mask))))

    def task_forward(self, module: nn.Module) -> nn.Module:
        from weit_cli.arch._control_call import ControlForward

        return ControlForward(module)

    def transformers_config(self, arch: DecisionTransformerArch) -> dict[str, Any]:
        """config.json as `save_pretrained` writes it, without the writer's transformers version (so
        that the same bundle gives the same bytes whichever transformers is installed)."""
        return {"architectures": [MODEL_CLASS], "model_type": MODEL_TYPE, **arch.config_fields()}

    @cached_property
    def exporter(self) -> Exporter:
        return TransformersFolder(self.transformers_config, CONFIG_CLASS)

    def state_shapes(self, a: DecisionTransformerArch) -> dict[str, tuple[int, ...]]:
        """transformers' keys; GPT-2's blocks use Conv1D, which stores (in, out)."""
        d, h, s, act = a.width, a.inner, a.state_dim, a.act_dim
        out: dict[str, tuple[int, ...]] = {"encoder.wte.weight": (1, d), "encoder.wpe.weight": (a.n_positions, d)}
        for i in range(a.depth):
            b = f"encoder.h.{i}."
            out |= {b + "ln_1.weight": (d,), b + "ln_1.bias": (d,), b + "attn.c_attn.weight": (d, 3 * d), b + "attn.c_attn.bias": (3 * d,),
                    b + "attn.c_proj.weight": (d, d), b + "attn.c_proj.bias": (d,), b + "ln_2.weight": (d,), b + "ln_2.bias": (d,),
                    b + "mlp.c_fc.weight": (d, h), b + "mlp.c_fc.bias": (h,), b + "mlp.c_proj.weight": (h, d), b + "mlp.c_proj.bias": (d,)}
        out |= {"encoder.ln_f.weight": (d,), "encoder.ln_f.bias": (d,), "embed_timestep.weight": (a.max_ep_len, d),
                "embed_return.weight": (d, 1), "embed_return.bias": (d,), "embed_state.weight": (d, s), "embed_state.bias": (d,),
                "embed_action.weight": (d, act), "embed_action.bias": (d,), "embed_ln.weight": (d,), "embed_ln.bias": (d,)}
        return out | {"predict_state.weight": (s, d), "predict_state.bias": (s,), "predict_action.0.weight": (act, d),
                      "predict_action.0.bias": (act,), "predict_return.weight": (1, d), "predict_return.bias": (1,)}

    def describe(self, arch: DecisionTransformerArch) -> str:
        return (
            f"Decision Transformer depth {arch.depth}, width {arch.width}, {arch.num_heads} heads, mlp ×{arch.mlp_ratio:g}, "
            f"state {arch.state_dim}, action {arch.act_dim}, {arch.max_ep_len} timesteps"
        )

    def param_count(self, a: DecisionTransformerArch) -> int:
        d, h, s, act = a.width, a.inner, a.state_dim, a.act_dim
        block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * h + h) + (h * d + d)
        encoder = a.depth * block + d + a.n_positions * d + 2 * d  # wte (1 row), wpe, ln_f
        embed = a.max_ep_len * d + 2 * d + (s + 1) * d + (act + 1) * d + 2 * d  # timestep, return, state, action, embed_ln
        heads = (d + 1) * s + (d + 1) * act + (d + 1)
        return encoder + embed + heads

    def size_options(self, arch: DecisionTransformerArch) -> list[str]:
        return [*super().size_options(arch), "--mlp-ratio", f"{arch.mlp_ratio:g}"]

    # ------------------------------------------------------------------ structure
    def default_template_size(self, arch: DecisionTransformerArch) -> int:
        return arch.head_dim

    def template_types(self, arch: DecisionTransformerArch, template_size: int | None = None) -> dict[str, TemplateType]:
        p = template_size or self.default_template_size(arch)
        if arch.width % p or arch.inner % p:
            raise WeitError(
                f"template size {p} does not divide width {arch.width} and MLP width {arch.inner}",
                f"pick a divisor of both, e.g. the head dim {arch.head_dim}",
            )
        return {t: TemplateType(t, p, p) for t in TEMPLATED}

    def layer_groups(self, arch: DecisionTransformerArch) -> list[LayerGroup]:
        return [LayerGroup("encoder.h.{}.", arch.depth)]

    def sizes(self, arch: DecisionTransformerArch) -> dict[str, int]:
        return {E: arch.width, I: arch.inner}

    # ------------------------------------------------------------------ weight selection
    def selection_indices(self, src: DecisionTransformerArch, dst: DecisionTransformerArch) -> dict[str, Tensor]:
        import torch

        check_selection_same(src, dst, ("state_dim", "act_dim", "activation", "action_tanh", "scale_attn_weights"),
                             "select from a checkpoint trained on the same environment, with the same activation and action squashing")
        problems = []
        for label, s, d in (
            ("depth", src.depth, dst.depth),
            ("width", src.width, dst.width),
            ("heads", src.num_heads, dst.num_heads),
            ("head size", src.head_dim, dst.head_dim),
            ("MLP width", src.inner, dst.inner),
            ("timesteps", src.max_ep_len, dst.max_ep_len),
            ("positions", src.n_positions, dst.n_positions),
        ):
            if d > s:
                problems.append(f"{label} {d} > {s}")
        check_selection_smaller(problems)
        attn = head_aligned(src.num_heads, src.head_dim, dst.num_heads, dst.head_dim)
        return {
            E: evenly_spaced(src.width, dst.width),
            I: evenly_spaced(src.inner, dst.inner),
            "attn": attn,
            "qkv": torch.cat([attn + r * src.width for r in range(3)]),
            "timestep": torch.arange(dst.max_ep_len),
            "position": torch.arange(dst.n_positions),
        }

    def selection_missing(self, key: str) -> Exception:
        return WeitError(f"weight selection does not know how to select '{key}'", f"the source is not a plain transformers {MODEL_CLASS}")

    # ------------------------------------------------------------------ recipes
    def arch_for_recipe(self, model: DecisionTransformerModelSection, *, depth: int, width: int, num_classes: int = 0) -> DecisionTransformerArch:
        return DecisionTransformerArch(
            state_dim=model.state_dim, act_dim=model.act_dim, depth=depth, width=width, num_heads=width // model.head_dim,
            mlp_ratio=model.mlp_ratio, max_ep_len=model.max_ep_len, n_positions=3 * model.context,
            activation=model.activation, action_tanh=model.action_tanh,
            embd_pdrop=model.dropout, resid_pdrop=model.dropout, attn_pdrop=model.dropout,
        )

    def recipe_template_size(self, model: DecisionTransformerModelSection, widths: list[int]) -> int:
        return model.head_dim

    def recipe_depths(self, depths: list) -> list:
        return list(depths)

    def check_recipe(self, recipe) -> None:
        if any(isinstance(d, list) for d in recipe.nested.depths):
            raise ValueError("nested.depths: per-stage lists are for staged networks; a Decision Transformer's depth is one number")
        hd, p = recipe.model.head_dim, recipe.template_size
        if hd % p:
            raise ValueError(f"templates.size {p} must divide model.head_dim {hd}")
        bad = [w for w in recipe.nested.widths if w % hd]
        if bad:
            raise ValueError(f"nested.widths {bad} are not multiples of head_dim {hd}")
        for w in recipe.nested.widths:
            inner = w * recipe.model.mlp_ratio
            if inner != int(inner) or int(inner) % p:
                raise ValueError(f"width {w} × mlp_ratio {recipe.model.mlp_ratio:g} is not a multiple of the template size {p}")
        limit = p * p
        over = {t: n for t, n in recipe.templates.counts(tuple(TEMPLATED)).items() if n > limit}
        if over:
            raise ValueError(f"templates.count {over} exceeds {limit} = size² (the most {p}×{p} templates can span)")
