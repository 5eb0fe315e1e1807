"""Baseline initialisations that `finetune` compares weit against.

- `random_init`: the family's own initialisation at the target architecture (seeded).
- `weight_selection`: Xu et al., "Initializing Models with Larger Ones" (ICLR 2024): a smaller model
  takes a subset of a larger pretrained model's weights.

The algorithm here is the same for every family; each family says which axes its tensors have and
which source indices every axis keeps (`Adapter.selection_indices`, `Adapter.selection_axes`; the
family module's docstring spells out its rule):

* **Layers**: first-N — target block l takes source block l. A target deeper than the source is
  refused: weight selection only shrinks.
* **Evenly spaced selection** of m indices among n, the rule of the authors' reference code:
  ``arange(m) * (n // m)`` when m divides n, otherwise ``round(linspace(0, n - 1, m))`` (round half to
  even, as ``torch.round``). The same index list is used on every tensor sharing an axis, so the
  residual stream stays consistent across layers.
* **Classifier**: its rows are kept when the class count matches, otherwise it is the target
  model's fresh initialisation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from weit_cli.errors import WeitError

if TYPE_CHECKING:
    from torch import Tensor


def evenly_spaced(n: int, m: int) -> Tensor:
    """m of n indices, evenly spaced, first one 0 (the reference code's rule)."""
    import torch

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


def weight_selection(source: dict[str, Tensor], src_arch: Any, dst_arch: Any, fresh: dict[str, Tensor]) -> dict[str, Tensor]:
    """The target state dict: every tensor selected from `source`, except a classifier whose class
    count changed, which comes from `fresh` (the target model's own initialisation)."""
    from weit_cli.arch._registry import get_adapter

    family = getattr(dst_arch, "family", None)
    if getattr(src_arch, "family", None) != family:
        raise WeitError(
            f"weight selection needs a source of the same family (source {getattr(src_arch, 'family', None)}, target {family})",
            "select from a checkpoint of the target's family, or use --init random",
        )
    ad = get_adapter(family)
    idx = ad.selection_indices(src_arch, dst_arch)
    out: dict[str, Tensor] = {}
    for key, ref in fresh.items():
        if key in ad.classifier and dst_arch.num_classes != src_arch.num_classes:
            out[key] = ref.clone()
            continue
        if key not in source:
            raise ad.selection_missing(key)
        axes = ad.selection_axes(key, dst_arch)
        if axes is None:
            raise ad.selection_missing(key)
        x = source[key]
        for dim, name in axes.items():
            x = x.index_select(dim, idx[name])
        out[key] = _check_fits(key, x, ref)
    return out


def _check_fits(key: str, x: Tensor, ref: Tensor) -> Tensor:
    if tuple(x.shape) != tuple(ref.shape):
        raise WeitError(
            f"selected '{key}' has shape {tuple(x.shape)}, the target needs {tuple(ref.shape)}",
            "the source checkpoint does not match its stated architecture",
        )
    return x.to(ref.dtype).contiguous().clone()


def random_init(adapter, arch: Any, seed: int) -> dict[str, Tensor]:
    """The family's own initialisation at `arch`, reproducible from `seed`."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = adapter.build(arch)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
