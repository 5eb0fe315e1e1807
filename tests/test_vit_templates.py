"""ViT templating end to end in memory: extraction from a timm ViT, resizing, composition back into timm."""

from __future__ import annotations

import pytest
import torch

from weit_cli.arch._registry import get_adapter
from weit_cli.core.extract import from_dense
from weit_cli.core.resize import resize
from weit_cli.errors import WeitError

FULL = 64  # p·q with p = q = head_dim 8
ADAPTER = get_adapter("vit")


def extract(model, n=FULL, template_size=None):
    state = model.state_dict()
    arch = ADAPTER.infer_arch(state, {"num_heads": model.blocks[0].attn.num_heads})
    return from_dense(ADAPTER, arch, state, template_size, n)


def sized(bundle, depth_rule="auto", width_rule="tile", **sizes):
    return resize(bundle, ADAPTER.target_arch(bundle.arch, **sizes), depth_rule, width_rule)


@torch.no_grad()
def logits(bundle, x):
    model = ADAPTER.build(bundle.arch)
    model.load_state_dict(bundle.state_dict(), strict=True)
    return model.eval()(x)


@torch.no_grad()
def run(model, x):
    return model.eval()(x)


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------- extraction
def test_full_rank_extraction_reproduces_every_weight_and_the_logits(tiny_vit, vit_input):
    bundle, errors = extract(tiny_vit)
    src = tiny_vit.state_dict()
    dense = bundle.state_dict()
    assert sorted(dense) == sorted(src)
    templated = [k for k in src if ADAPTER.template_type_of(k)]
    assert len(templated) == 4 * 2  # qkv, proj, fc1, fc2 in both blocks
    for k in src:
        if k in templated:
            close(dense[k], src[k])
        else:
            assert torch.equal(dense[k], src[k]), k  # small parameters are copied as they are
    assert set(errors) == {"qkv", "proj", "fc1", "fc2"} and max(errors.values()) < 1e-6
    out = run(tiny_vit, vit_input)
    assert out.abs().mean() > 0.1  # a real function, not all zeros
    close(logits(bundle, vit_input), out)
    # Templates are shared: one (N, p, p) set per type, however many layers.
    assert {t: tuple(v.shape) for t, v in bundle.templates.items()} == {t: (FULL, 8, 8) for t in errors}


def test_truncated_error_decreases_with_n_and_is_reported_correctly(tiny_vit):
    src = tiny_vit.state_dict()
    previous = None
    for n in (1, 4, 16, 24, FULL):  # proj's stack has 2 layers × 4×4 blocks = 32 rows: exact from 32 on
        bundle, errors = extract(tiny_vit, n)
        dense = bundle.state_dict()
        for t, err in errors.items():
            keys = [k for k in src if ADAPTER.template_type_of(k) == t]
            num = sum((dense[k].double() - src[k].double()).pow(2).sum() for k in keys)
            den = sum(src[k].double().pow(2).sum() for k in keys)
            assert err == pytest.approx((num / den).sqrt().item(), rel=1e-3, abs=1e-6), (n, t)
            if previous is not None:
                assert err < previous[t], (n, t)
        previous = errors
    assert max(previous.values()) < 1e-6


@pytest.mark.parametrize("template_size", [4, 16])
def test_other_template_sizes_are_exact_at_full_rank(tiny_vit, vit_input, template_size):
    bundle, errors = extract(tiny_vit, template_size**2, template_size)
    assert all(v.shape[1:] == (template_size, template_size) for v in bundle.templates.values())
    assert max(errors.values()) < 1e-6
    close(logits(bundle, vit_input), run(tiny_vit, vit_input))


# ---------------------------------------------------------------------------------------------- width
@pytest.mark.parametrize("factor", [2, 3])
def test_tiled_width_growth_keeps_the_logits(tiny_vit, vit_input, factor):
    bundle, _ = extract(tiny_vit)
    wide = sized(bundle, width=32 * factor)
    assert wide.arch.width == 32 * factor and wide.arch.num_heads == 4 * factor and wide.arch.head_dim == 8
    assert wide.state_dict()["blocks.0.mlp.fc1.weight"].shape == (128 * factor, 32 * factor)
    close(logits(wide, vit_input), run(tiny_vit, vit_input))


def test_tile_without_division_changes_the_function(tiny_vit, vit_input):
    bundle, _ = extract(tiny_vit)
    nodiv = sized(bundle, width_rule="tile-nodiv", width=64)
    assert not torch.allclose(logits(nodiv, vit_input), run(tiny_vit, vit_input), atol=1e-2)
    tiled = sized(bundle, width=64).state_dict()
    nodiv = nodiv.state_dict()
    # the only difference is the factor 2 on tiled input axes
    close(nodiv["blocks.0.attn.proj.weight"], 2 * tiled["blocks.0.attn.proj.weight"])
    close(nodiv["blocks.0.attn.proj.bias"], tiled["blocks.0.attn.proj.bias"])


def test_prefix_width_shrink_keeps_whole_heads(tiny_vit):
    bundle, _ = extract(tiny_vit)
    full = bundle.state_dict()
    src = tiny_vit.state_dict()
    narrow = sized(bundle, width=16)  # 2 of the 4 heads
    assert (narrow.arch.num_heads, narrow.arch.head_dim) == (2, 8)
    got = narrow.state_dict()
    for l in range(2):
        qkv = got[f"blocks.{l}.attn.qkv.weight"].reshape(3, 16, 16)  # runs q, k, v
        ref = full[f"blocks.{l}.attn.qkv.weight"].reshape(3, 32, 32)
        s = src[f"blocks.{l}.attn.qkv.weight"].reshape(3, 32, 32)
        for r in range(3):
            # rows 0..15 of each run are heads 0 and 1 of the source, over its first 16 input channels
            assert torch.equal(qkv[r], ref[r, :16, :16])
            close(qkv[r], s[r, :16, :16])
        assert torch.equal(got[f"blocks.{l}.attn.qkv.bias"], src[f"blocks.{l}.attn.qkv.bias"].reshape(3, 32)[:, :16].reshape(-1))
        assert torch.equal(got[f"blocks.{l}.attn.proj.weight"], full[f"blocks.{l}.attn.proj.weight"][:16, :16])
        assert torch.equal(got[f"blocks.{l}.mlp.fc1.weight"], full[f"blocks.{l}.mlp.fc1.weight"][:64, :16])
        assert torch.equal(got[f"blocks.{l}.mlp.fc2.weight"], full[f"blocks.{l}.mlp.fc2.weight"][:16, :64])
        assert torch.equal(got[f"blocks.{l}.norm1.weight"], src[f"blocks.{l}.norm1.weight"][:16])
    assert torch.equal(got["pos_embed"], src["pos_embed"][..., :16])
    assert torch.equal(got["patch_embed.proj.weight"], src["patch_embed.proj.weight"][:16])
    assert torch.equal(got["head.weight"], src["head.weight"][:, :16])  # a shrunk input axis is not rescaled
    logits(narrow, torch.zeros(1, 3, 16, 16))  # and timm accepts it


def test_width_errors_name_the_nearest_valid_widths(tiny_vit):
    bundle, _ = extract(tiny_vit)
    with pytest.raises(WeitError, match="not a multiple of 8") as e:
        sized(bundle, width=20)
    assert e.value.hint == "nearest valid widths: 16, 24"
    with pytest.raises(WeitError) as e:
        sized(bundle, width=5)
    assert e.value.hint == "nearest valid widths: 8"
    with pytest.raises(WeitError, match="templates fix head_dim at 8"):
        sized(bundle, width=64, num_heads=4)
    with pytest.raises(WeitError, match="hidden width"):
        sized(bundle, mlp_ratio=3.1)
    # templates larger than head_dim: widths step in template blocks
    with pytest.raises(WeitError, match="multiple of 16") as e:
        ADAPTER.target_arch(bundle.arch, width=40, template_size=16)
    assert e.value.hint == "nearest valid widths: 32, 48"


# ---------------------------------------------------------------------------------------------- depth
def test_identity_depth_growth_keeps_the_logits(tiny_vit, vit_input):
    bundle, _ = extract(tiny_vit)
    deep = sized(bundle, "identity", depth=5)
    assert deep.arch.depth == 5
    close(logits(deep, vit_input), run(tiny_vit, vit_input))


def test_identity_depth_and_tiled_width_together_keep_the_logits(tiny_vit, vit_input):
    bundle, _ = extract(tiny_vit)
    big = sized(bundle, "identity", depth=4, width=96)
    assert (big.arch.depth, big.arch.width, big.arch.num_heads) == (4, 96, 12)
    close(logits(big, vit_input), run(tiny_vit, vit_input))


# target block → [(source block, weight)], as docs/method.md documents each rule (3 source blocks)
DEPTH_MAPS = {
    ("prefix", 2): [[(0, 1)], [(1, 1)]],
    ("auto", 2): [[(0, 1)], [(1, 1)]],
    ("interp", 5): [[(0, 1)], [(0, 0.5), (1, 0.5)], [(1, 1)], [(1, 0.5), (2, 0.5)], [(2, 1)]],
    ("auto", 5): [[(0, 1)], [(0, 0.5), (1, 0.5)], [(1, 1)], [(1, 0.5), (2, 0.5)], [(2, 1)]],
    ("stack", 5): [[(0, 1)], [(1, 1)], [(2, 1)], [(0, 1)], [(1, 1)]],
    ("interleave", 6): [[(0, 1)], [(0, 1)], [(1, 1)], [(1, 1)], [(2, 1)], [(2, 1)]],
    ("identity", 5): [[(0, 1)], [(0, 1)], [(1, 1)], [(1, 1)], [(2, 1)]],
}
ZEROED = {"attn.proj.weight", "attn.proj.bias", "mlp.fc2.weight", "mlp.fc2.bias"}


@pytest.mark.parametrize("rule,depth", list(DEPTH_MAPS))
def test_depth_rules_map_layers_as_documented(tiny_vit_factory, rule, depth):
    model = tiny_vit_factory(seed=3, depth=3)
    bundle, _ = extract(model)
    src = bundle.state_dict()
    got = sized(bundle, rule, depth=depth).state_dict()
    suffixes = sorted({k.split(".", 2)[2] for k in src if k.startswith("blocks.")})
    assert len(suffixes) == 12
    assert sorted(k for k in got if k.startswith("blocks.")) == sorted(f"blocks.{j}.{s}" for j in range(depth) for s in suffixes)
    zeroed = [1, 3] if rule == "identity" else []  # the copies follow the block they copy
    for j, mix in enumerate(DEPTH_MAPS[rule, depth]):
        for s in suffixes:
            if j in zeroed and s in ZEROED:
                assert got[f"blocks.{j}.{s}"].abs().max() == 0, (j, s)
                continue
            expected = sum(w * src[f"blocks.{i}.{s}"] for i, w in mix)
            close(got[f"blocks.{j}.{s}"], expected)
    for k in ("cls_token", "pos_embed", "norm.weight", "head.weight"):
        assert torch.equal(got[k], src[k])


@pytest.mark.parametrize("depth", [0, -2])
def test_bad_depths_are_refused(tiny_vit, depth):
    bundle, _ = extract(tiny_vit, 4)
    with pytest.raises(WeitError, match="at least 1"):
        sized(bundle, depth=depth)


# ---------------------------------------------------------------------------------------------- classes
def test_new_head_starts_at_zero_when_the_class_count_changes(tiny_vit, vit_input):
    bundle, _ = extract(tiny_vit)
    ten = sized(bundle, num_classes=10, width=64)
    d = ten.state_dict()
    assert d["head.weight"].shape == (10, 64) and d["head.weight"].abs().max() == 0
    assert d["head.bias"].shape == (10,) and d["head.bias"].abs().max() == 0
    assert torch.equal(logits(ten, vit_input), torch.zeros(2, 10))
    headless = sized(bundle, num_classes=0)
    assert not any(k.startswith("head.") for k in headless.state_dict())
    features = logits(headless, vit_input)
    assert features.shape == (2, 32)
    close(features, tiny_vit.forward_head(tiny_vit.forward_features(vit_input), pre_logits=True))


def test_param_count_matches_timm(tiny_vit):
    bundle, _ = extract(tiny_vit, 4)
    for sizes in ({}, {"width": 96, "depth": 5}, {"num_classes": 0}):
        arch = ADAPTER.target_arch(bundle.arch, **sizes)
        assert ADAPTER.param_count(arch) == sum(p.numel() for p in ADAPTER.build(arch).parameters())
