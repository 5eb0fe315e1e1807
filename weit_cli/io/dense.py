"""A dense model as weit reads it: its weights, the family they belong to (by their keys) and its
architecture. The first stage of `extract-templates` and `finetune`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor


@dataclass
class Dense:
    adapter: Any  # the family's Adapter
    arch: Any  # its architecture record
    state: dict[str, Tensor]  # the weights, less the keys the family's library skips on load


def identify(state: dict[str, Tensor], hints: dict[str, Any]) -> Dense:
    """The family of a state dict (`detect_family`) and its architecture, inferred from the weights
    and `hints` (what a config beside them says)."""
    from weit_cli.arch._registry import detect_family

    adapter = detect_family(state.keys())
    state = adapter.loadable(state)
    return Dense(adapter, adapter.infer_arch(state, hints), state)


def read_dense(path, **hints: Any) -> Dense:
    """`path` (a .safetensors file or a family's folder, io/files.load_dense) identified; keyword
    `hints` (e.g. num_heads, img_size) override what the files say."""
    from weit_cli.io.files import load_dense

    state, found = load_dense(path)
    found.update(hints)
    return identify(state, found)
