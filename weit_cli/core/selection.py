"""Baseline initialisations that `finetune` compares weit against.

- `random_init`: timm's own initialisation at the target architecture (seeded).
- `weight_selection`: Xu et al., "Initializing Models with Larger Ones" (ICLR 2024): a smaller model
  takes a subset of a larger pretrained model's weights.

Weight selection, exactly as implemented here (ViT, timm naming):

* **Layers**: first-N — target block l takes source block l (the paper's choice for isotropic
  models). A target deeper than the source is refused: weight selection only shrinks.
* **Evenly spaced selection** of m indices among n, the rule of the authors' reference code:
  ``arange(m) * (n // m)`` when m divides n, otherwise ``round(linspace(0, n - 1, m))`` (round half to
  even, as ``torch.round``). The same index list is used on every tensor sharing an axis, so the
  residual stream stays consistent across layers.
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

ResNets (timm naming; the paper's rule for its ConvNets): per stage, first-N blocks (target block b
takes source block b, so the stage's first, downsampling block stays first); every channel axis (the
stem's, each stage's inner and output widths) takes evenly spaced channels, one index list per axis
shared by every tensor on it (convs' output and input channels, BatchNorm scale, shift and running
statistics, the classifier's input); conv kernels are kept whole. Block type, stem type and shortcut
type must match.
"""

from __future__ import annotations

from typing import Any
import torch
from torch import Tensor
from weit_cli.errors import WeitError


_VIT_AXES: list[tuple[str, dict[int, str]]] = [
    (r"cls_token|pos_embed", {2: "embed"}),
    (r"patch_embed\.proj\.(weight|bias)", {0: "embed"}),
    (r"blocks\.\d+\.norm[12]\.(weight|bias)", {0: "embed"}),
    (r"blocks\.\d+\.attn\.qkv\.weight", {0: "qkv", 1: "embed"}),
    (r"blocks\.\d+\.attn\.qkv\.bias", {0: "qkv"}),
    (r"blocks\.\d+\.attn\.proj\.weight", {0: "embed", 1: "attn"}),
    (r"blocks\.\d+\.attn\.proj\.bias", {0: "embed"}),
    (r"blocks\.\d+\.mlp\.fc1\.weight", {0: "hidden", 1: "embed"}),
    (r"blocks\.\d+\.mlp\.fc1\.bias", {0: "hidden"}),
    (r"blocks\.\d+\.mlp\.fc2\.weight", {0: "embed", 1: "hidden"}),
    (r"blocks\.\d+\.mlp\.fc2\.bias", {0: "embed"}),
    (r"(norm|fc_norm)\.(weight|bias)", {0: "embed"}),
    (r"head\.weight", {1: "embed"}),
    (r"head\.bias", {}),
]


def evenly_spaced(n: int, m: int) -> Tensor:
    """m of n indices, evenly spaced, first one 0 (the reference code's rule)."""
    if not 1 <= m <= n:
        raise ValueError(f"cannot select {m} of {n}")
    if n % m == 0:
        return torch.arange(m) * (n // m)
    return torch.round(torch.linspace(0, n - 1, m, dtype=torch.float64)).long()


def head_aligned(num_heads: int, head_dim: int, new_heads: int, new_head_dim: int) -> Tensor:
    """Indices into an attention axis of num_heads × head_dim: whole heads, evenly spaced."""
    heads = evenly_spaced(num_heads, new_heads)
    dims = evenly_spaced(head_dim, new_head_dim)
    return (heads[:, None] * head_dim + dims[None, :]).reshape(-1)


def selection_indices(src, dst) -> dict[str, Tensor]:
    """Index lists per axis kind for a source and target ViT architecture."""
    for name in ("img_size", "patch_size", "in_chans", "class_token", "global_pool", "qkv_bias"):
        if getattr(src, name) != getattr(dst, name):
            raise WeitError(
                f"weight selection needs the same {name.replace('_', ' ')} "
                f"(source {getattr(src, name)}, target {getattr(dst, name)})",
                "select from a checkpoint of the same patch grid and input format",
            )
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
    if problems:
        raise WeitError(
            "weight selection only initialises smaller models: target " + ", ".join(problems),
            "select from a larger checkpoint, or grow with 'weit extract-templates' + 'weit materialize'",
        )
    attn = head_aligned(src.num_heads, src.head_dim, dst.num_heads, dst.head_dim)
    return {
        "embed": evenly_spaced(src.width, dst.width),
        "hidden": evenly_spaced(src.hidden, dst.hidden),
        "attn": attn,
        "qkv": torch.cat([attn + r * src.width for r in range(3)]),
    }


def weight_selection(source: dict[str, Tensor], src_arch: Any, dst_arch: Any, fresh: dict[str, Tensor]) -> dict[str, Tensor]:
    """The target state dict: every tensor selected from `source`, except a classifier whose class
    count changed, which comes from `fresh` (the target model's own initialisation)."""
    from weit_cli.arch.base import Adapter

    if getattr(src_arch, "family", None) == "resnet" and getattr(dst_arch, "family", None) == "resnet":
        return _resnet_selection(source, src_arch, dst_arch, fresh)
    if getattr(src_arch, "family", None) != "vit" or getattr(dst_arch, "family", None) != "vit":
        raise WeitError("weight selection is implemented for ViTs and ResNets", "use --init random for other families")
    idx = selection_indices(src_arch, dst_arch)
    out: dict[str, Tensor] = {}
    for key, ref in fresh.items():
        if key.startswith("head.") and dst_arch.num_classes != src_arch.num_classes:
            out[key] = ref.clone()
            continue
        axes = Adapter._match(_VIT_AXES, key)
        if axes is None or key not in source:
            raise WeitError(f"weight selection does not know how to select '{key}'", "the source is not a plain timm ViT")
        x = source[key]
        for dim, kind in axes.items():
            x = x.index_select(dim, idx[kind])
        out[key] = _fitted(key, x, ref)
    return out


def _resnet_selection(source: dict[str, Tensor], src: Any, dst: Any, fresh: dict[str, Tensor]) -> dict[str, Tensor]:
    from weit_cli.arch._registry import get_adapter

    ad = get_adapter("resnet")
    for name in ("block", "stem_type", "avg_down", "down_kernel_size", "in_chans"):
        if getattr(src, name) != getattr(dst, name):
            raise WeitError(
                f"weight selection needs the same {name.replace('_', ' ')} (source {getattr(src, name)!r}, target {getattr(dst, name)!r})",
                "select from a ResNet of the same block, stem and shortcut type",
            )
    old, new = ad.sizes(src), ad.sizes(dst)
    problems = [f"stage {s + 1} depth {d} > {e}" for s, (d, e) in enumerate(zip(dst.depth, src.depth)) if d > e]
    problems += [f"{n} width {new[n]} > {old[n]}" for n in new if new[n] > old[n]]
    if problems:
        raise WeitError(
            "weight selection only initialises smaller models: target " + ", ".join(problems),
            "select from a larger checkpoint, or grow with 'weit extract-templates' + 'weit materialize'",
        )
    idx = {n: evenly_spaced(old[n], new[n]) for n in new if new[n] > 0}
    out: dict[str, Tensor] = {}
    for key, ref in fresh.items():
        if key in ad.classifier and dst.num_classes != src.num_classes:
            out[key] = ref.clone()
            continue
        if key not in source:
            raise WeitError(
                f"weight selection has no source tensor for '{key}'",
                "the target has a shortcut or stem layer the source lacks; pick stage widths with the source's structure",
            )
        x = source[key]
        for ax in ad.axes(key, dst):
            x = x.index_select(ax.dim, idx[ax.name])
        out[key] = _fitted(key, x, ref)
    return out


def _fitted(key: str, x: Tensor, ref: Tensor) -> Tensor:
    if tuple(x.shape) != tuple(ref.shape):
        raise WeitError(
            f"selected '{key}' has shape {tuple(x.shape)}, the target needs {tuple(ref.shape)}",
            "the source checkpoint does not match its stated architecture",
        )
    return x.to(ref.dtype).contiguous().clone()


def random_init(adapter, arch: Any, seed: int) -> dict[str, Tensor]:
    """timm's initialisation at `arch`, reproducible from `seed`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = adapter.build(arch)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
