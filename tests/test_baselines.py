"""Baseline initialisations: weight selection against a hand-computed reference, and random init."""

from __future__ import annotations

import pytest
import torch

from weit_cli.arch._registry import get_adapter
from weit_cli.arch.vit import ViTArch
from weit_cli.core.selection import evenly_spaced, random_init, weight_selection
from weit_cli.errors import WeitError

VIT = get_adapter("vit")
SRC = ViTArch(img_size=8, patch_size=4, in_chans=1, num_classes=3, depth=3, width=12, num_heads=3, mlp_ratio=2.0)
DST = ViTArch(img_size=8, patch_size=4, in_chans=1, num_classes=3, depth=2, width=8, num_heads=2, mlp_ratio=2.0)

# Computed by hand from the rule arange(m)·(n/m) if m | n, else round(linspace(0, n−1, m)):
EMBED = [0, 2, 3, 5, 6, 8, 9, 11]  # 8 of 12: 0, 11/7≈1.57, 22/7≈3.14, 4.71, 6.29, 7.86, 9.43, 11
HIDDEN = [0, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 23]  # 16 of 24, step 23/15
ATTN = [0, 1, 2, 3, 8, 9, 10, 11]  # heads 0 and 2 of 3 (round(linspace(0, 2, 2))), all 4 dims each
QKV = ATTN + [12 + i for i in ATTN] + [24 + i for i in ATTN]  # q, k and v runs selected separately


def coded_state(arch) -> dict[str, torch.Tensor]:
    """A source state whose every entry is distinct, so a selection can be checked entry by entry."""
    state = VIT.build(arch).state_dict()
    out, start = {}, 0
    for k, v in state.items():
        out[k] = torch.arange(start, start + v.numel(), dtype=torch.float32).reshape(v.shape)
        start += v.numel()
    return out


def test_evenly_spaced_rule():
    assert evenly_spaced(12, 8).tolist() == EMBED
    assert evenly_spaced(24, 16).tolist() == HIDDEN
    assert evenly_spaced(12, 4).tolist() == [0, 3, 6, 9]  # divisible: fixed stride
    assert evenly_spaced(7, 5).tolist() == [0, 2, 3, 4, 6]  # 1.5 → 2, 4.5 → 4 (half to even, as torch.round)
    assert evenly_spaced(5, 5).tolist() == [0, 1, 2, 3, 4]
    assert evenly_spaced(5, 1).tolist() == [0]


def test_weight_selection_matches_hand_reference():
    src = coded_state(SRC)
    fresh = random_init(VIT, DST, seed=0)
    out = weight_selection(src, SRC, DST, fresh)
    assert set(out) == set(fresh)
    for k, v in out.items():
        assert v.shape == fresh[k].shape, k
    e, h, a, qkv = (torch.tensor(x) for x in (EMBED, HIDDEN, ATTN, QKV))
    for layer in range(2):  # first-N layers: target block l is source block l
        b = f"blocks.{layer}."
        torch.testing.assert_close(out[b + "attn.qkv.weight"], src[b + "attn.qkv.weight"][qkv][:, e])
        torch.testing.assert_close(out[b + "attn.qkv.bias"], src[b + "attn.qkv.bias"][qkv])
        torch.testing.assert_close(out[b + "attn.proj.weight"], src[b + "attn.proj.weight"][e][:, a])
        torch.testing.assert_close(out[b + "attn.proj.bias"], src[b + "attn.proj.bias"][e])
        torch.testing.assert_close(out[b + "mlp.fc1.weight"], src[b + "mlp.fc1.weight"][h][:, e])
        torch.testing.assert_close(out[b + "mlp.fc1.bias"], src[b + "mlp.fc1.bias"][h])
        torch.testing.assert_close(out[b + "mlp.fc2.weight"], src[b + "mlp.fc2.weight"][e][:, h])
        torch.testing.assert_close(out[b + "norm1.weight"], src[b + "norm1.weight"][e])
    torch.testing.assert_close(out["pos_embed"], src["pos_embed"][:, :, e])
    torch.testing.assert_close(out["cls_token"], src["cls_token"][:, :, e])
    torch.testing.assert_close(out["patch_embed.proj.weight"], src["patch_embed.proj.weight"][e])
    torch.testing.assert_close(out["head.weight"], src["head.weight"][:, e])
    torch.testing.assert_close(out["head.bias"], src["head.bias"])
    torch.testing.assert_close(out["norm.weight"], src["norm.weight"][e])


def test_weight_selection_keeps_heads_whole():
    src = coded_state(SRC)
    out = weight_selection(src, SRC, DST, random_init(VIT, DST, 0))
    w_src, w_dst = src["blocks.1.attn.qkv.weight"], out["blocks.1.attn.qkv.weight"]
    hd, d_src, d_dst = SRC.head_dim, SRC.width, DST.width
    for run in range(3):  # q, k, v
        for head in range(DST.num_heads):
            rows = w_dst[run * d_dst + head * hd : run * d_dst + (head + 1) * hd]
            # these rows are one whole source head of the same run, in order
            e = torch.tensor(EMBED)
            starts = [s for s in range(0, d_src, hd) if torch.equal(rows, w_src[run * d_src + s : run * d_src + s + hd][:, e])]
            assert len(starts) == 1, (run, head)
    # proj reads the value dimensions of the same heads
    p_src, p_dst = src["blocks.1.attn.proj.weight"], out["blocks.1.attn.proj.weight"]
    assert torch.equal(p_dst[0], p_src[0][torch.tensor(ATTN)])


def test_weight_selection_smaller_heads():
    """A smaller head size keeps evenly spaced dimensions inside each kept head."""
    dst = ViTArch(img_size=8, patch_size=4, in_chans=1, num_classes=3, depth=1, width=4, num_heads=2, mlp_ratio=2.0)
    src = coded_state(SRC)
    out = weight_selection(src, SRC, dst, random_init(VIT, dst, 0))
    attn = torch.tensor([0, 2, 8, 10])  # heads 0, 2; dims 0, 2 of 4 in each
    e = torch.tensor([0, 3, 6, 9])
    q = torch.cat([attn, attn + 12, attn + 24])
    torch.testing.assert_close(out["blocks.0.attn.qkv.weight"], src["blocks.0.attn.qkv.weight"][q][:, e])
    torch.testing.assert_close(out["blocks.0.attn.proj.weight"], src["blocks.0.attn.proj.weight"][e][:, attn])


def test_weight_selection_new_classes_and_refusals():
    src = coded_state(SRC)
    dst = ViTArch(img_size=8, patch_size=4, in_chans=1, num_classes=5, depth=2, width=8, num_heads=2, mlp_ratio=2.0)
    fresh = random_init(VIT, dst, seed=1)
    out = weight_selection(src, SRC, dst, fresh)
    assert torch.equal(out["head.weight"], fresh["head.weight"])  # new class count: fresh head
    deeper = ViTArch(img_size=8, patch_size=4, in_chans=1, num_classes=3, depth=4, width=8, num_heads=2, mlp_ratio=2.0)
    with pytest.raises(WeitError, match="depth 4 > 3"):
        weight_selection(src, SRC, deeper, random_init(VIT, deeper, 0))
    other_grid = ViTArch(img_size=16, patch_size=4, in_chans=1, num_classes=3, depth=2, width=8, num_heads=2, mlp_ratio=2.0)
    with pytest.raises(WeitError, match="img size"):
        weight_selection(src, SRC, other_grid, random_init(VIT, other_grid, 0))


def test_random_init_is_timm_and_seeded():
    a, b, c = random_init(VIT, DST, 3), random_init(VIT, DST, 3), random_init(VIT, DST, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], c["blocks.0.attn.qkv.weight"])
    # timm's ViT init: truncated normal with std 0.02 for linear weights, zero biases
    assert a["blocks.0.mlp.fc1.weight"].std().item() == pytest.approx(0.02, rel=0.3)
    assert a["blocks.0.mlp.fc1.bias"].abs().max().item() == 0.0
