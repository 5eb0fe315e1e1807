"""Each family's `state_shapes` (its layout written out, what every file check compares with) against
the state dict of its library's own module, built on the meta device, over architectures that differ
in every way the family's record can: depth, width, heads, MLP ratio, classes, input format and the
variants the family supports. A library that changes its layout fails here, not in a user's file."""

from __future__ import annotations

import math

import pytest
import torch

from weit_cli.arch._registry import get_adapter


def _library(adapter, arch) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = adapter.build(arch)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check(family: str, records: list[dict]) -> None:
    adapter = get_adapter(family)
    for record in records:
        arch = adapter.arch_from_dict({"family": family, **record})
        want, got = _library(adapter, arch), adapter.state_shapes(arch)
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        wrong = {k: (got[k], want[k]) for k in want if k in got and got[k] != want[k]}
        assert not (missing or extra or wrong), (record, {"missing": missing, "extra": extra, "wrong (ours, library's)": wrong})


VIT = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, depth=2, width=32, num_heads=2)


def test_vit_state_shapes():
    _check("vit", [
        VIT,
        {**VIT, "depth": 1, "width": 64, "num_heads": 4, "num_classes": 0},
        {**VIT, "depth": 3, "mlp_ratio": 2.0, "in_chans": 3, "img_size": 12, "patch_size": 3},
        {**VIT, "global_pool": "avg", "num_classes": 5},
        {**VIT, "class_token": False, "global_pool": "avg"},
        {**VIT, "qkv_bias": False, "mlp_ratio": 3.0},
        {**VIT, "img_size": 224, "patch_size": 16, "in_chans": 3, "num_classes": 1000, "depth": 12, "width": 768, "num_heads": 12},
    ])


RESNET = dict(block="basic", depth=[1, 1, 1, 1], width=[16, 32, 64, 128], in_chans=1, num_classes=10, stem_width=16, stem_type="deep")


def test_resnet_state_shapes_and_param_count():
    _check("resnet", RESNETS)
    adapter = get_adapter("resnet")
    for record in RESNETS:  # the closed form counts every tensor but BatchNorm's counters
        arch = adapter.arch_from_dict({"family": "resnet", **record})
        shapes = adapter.state_shapes(arch)
        assert adapter.param_count(arch) == sum(math.prod(v) for k, v in shapes.items() if not k.endswith("num_batches_tracked")), record


RESNETS = [
    RESNET,
    {**RESNET, "depth": [2, 1, 3, 1], "num_classes": 0},
    {**RESNET, "block": "bottleneck", "width": [8, 16, 32, 64], "in_chans": 3},
    {**RESNET, "block": "bottleneck", "base_width": 32, "depth": [1, 2, 1, 2]},
    {**RESNET, "stem_type": "deep_tiered", "stem_width": 32},
    {**RESNET, "stem_type": "", "width": [64, 64, 128, 128]},  # 7×7 stem; stage 1 needs no shortcut
    {**RESNET, "stem_type": "", "width": [32, 64, 64, 256]},
    {**RESNET, "avg_down": True, "depth": [2, 2, 1, 1]},
    {**RESNET, "block": "bottleneck", "avg_down": True},
    {**RESNET, "down_kernel_size": 3},  # stage 1 projects (stem 32 ≠ 16): its shortcut stays 1×1
    {**RESNET, "down_kernel_size": 3, "avg_down": True},  # avg-pool shortcuts are 1×1 whatever the kernel
    {**RESNET, "width": [16, 16, 16, 16]},  # stages 2–4 stride but keep the width
    {**RESNET, "block": "bottleneck", "stem_type": "", "depth": [3, 4, 6, 3], "width": [64, 128, 256, 512], "in_chans": 3, "num_classes": 1000},
]


DIT = dict(sample_size=8, patch_size=2, in_channels=1, out_channels=1, num_classes=10, depth=2, width=32, num_heads=2)


def test_dit_state_shapes():
    pytest.importorskip("diffusers")
    _check("dit", [
        DIT,
        {**DIT, "depth": 1, "width": 64, "num_heads": 4, "num_classes": 1},
        {**DIT, "out_channels": 2, "in_channels": 1, "depth": 3},  # a learned variance: 2 × in
        {**DIT, "in_channels": 4, "out_channels": 8, "sample_size": 16, "patch_size": 4, "activation_fn": "gelu"},
    ])


DT = dict(state_dim=11, act_dim=3, depth=2, width=32, num_heads=2)


def test_decision_transformer_state_shapes():
    pytest.importorskip("transformers")
    _check("decision-transformer", [
        DT,
        {**DT, "depth": 1, "width": 64, "num_heads": 4, "mlp_ratio": 2.0},
        {**DT, "state_dim": 17, "act_dim": 6, "max_ep_len": 1000, "n_positions": 60, "action_tanh": False},
        {**DT, "depth": 3, "mlp_ratio": 3.0, "activation": "gelu_new", "scale_attn_weights": False},
    ])


def test_every_family_is_covered():
    """A new family adds its own test above."""
    from weit_cli.arch._registry import list_families

    covered = {"vit", "resnet", "dit", "decision-transformer"}
    assert set(list_families()) == covered, f"add a state_shapes test for {sorted(set(list_families()) - covered)}"
