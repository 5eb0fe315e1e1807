"""timm ResNets (BasicBlock and Bottleneck) through extract-templates and materialize: exact full-rank
round trip, lossless 2× width growth and identity depth growth, every output loads in timm, BatchNorm
recalibration, and clear errors for impossible per-stage sizes."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    TINY_RESNET_IMG,
    TINY_RESNET_P,
    make_tiny_resnet,
    save_timm_dir,
    tiny_resnet_args,
    weit,
)

from weit_cli.errors import EXIT_INPUT, EXIT_USAGE, WeitError

FULL_RANK = TINY_RESNET_P**2 * 9  # 3×3 templates; the 1×1 set is capped at its own full rank (64)
BLOCKS = ("basic", "bottleneck")


@pytest.fixture(scope="module", params=BLOCKS)
def case(request, tmp_path_factory):
    """A tiny random ResNet saved as a timm folder, and its full-rank bundle."""
    from weit_cli.commands.extract import extract_templates

    block = request.param
    root = tmp_path_factory.mktemp(f"resnet_{block}")
    model = make_tiny_resnet(block)
    folder = save_timm_dir(model, root / "dense", tiny_resnet_args(block))
    bundle = root / "bundle.safetensors"
    result = extract_templates(folder, bundle, template_size=TINY_RESNET_P, num_templates=FULL_RANK, img_size=TINY_RESNET_IMG)
    return SimpleNamespace(block=block, model=model, folder=folder, bundle=bundle, result=result, root=root)


def load_output(result: dict):
    """Load a materialized output the way a user would: local-dir for folders, checkpoint_path for files."""
    import timm

    out = result["output"]
    if out.endswith(".safetensors"):
        model = timm.create_model(result["timm_architecture"], checkpoint_path=out, **result["timm"])
    else:
        model = timm.create_model(f"local-dir:{out}", pretrained=True)
    return model.eval()


def materialize(case, name: str, **kw) -> dict:
    from weit_cli.commands.materialize import materialize as mat

    return mat(case.bundle, case.root / name, **kw)


@torch.no_grad()
def assert_same_logits(a, b, x):
    ya, yb = a(x), b(x)
    assert ya.shape == yb.shape
    scale = ya.abs().max().item()
    assert scale > 0.1  # a non-trivial function, so equality means something
    torch.testing.assert_close(yb, ya, atol=2e-5 * scale, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- extraction
def test_extract_detects_resnet_and_full_rank_is_exact(case):
    r = case.result
    a = r["architecture"]
    assert a["family"] == "resnet" and a["block"] == case.block
    assert a["depth"] == [2, 2, 2, 2] and a["width"] == tiny_resnet_args(case.block)["channels"]
    p = TINY_RESNET_P
    assert r["templates"]["conv3x3"] == [FULL_RANK, p, p, 3, 3]
    assert r["templates"]["conv1x1"] == [p * p, p, p, 1, 1]  # capped at its own full rank
    assert max(r["relative_error"].values()) < 1e-5


def test_round_trip_is_exact_and_timm_loads_folder_and_file(case, resnet_input):
    for name in ("same_dir", "same.safetensors"):
        r = materialize(case, name)
        assert r["bn_statistics"].startswith("the bundle's")
        assert_same_logits(case.model, load_output(r), resnet_input)
    from safetensors import safe_open

    with safe_open(str(case.root / "same.safetensors"), "pt") as f:
        assert f.get_tensor("bn1.num_batches_tracked").dtype == torch.int64  # counters stay integers


def test_round_trip_from_bare_state_dict_file(case, resnet_input, tmp_path):
    from safetensors.torch import save_file

    from weit_cli.commands.extract import extract_templates
    from weit_cli.commands.materialize import materialize

    dense = tmp_path / "dense.safetensors"
    save_file(case.model.state_dict(), str(dense))
    r = extract_templates(dense, tmp_path / "b.safetensors", template_size=TINY_RESNET_P, num_templates=FULL_RANK)
    assert r["architecture"]["block"] == case.block
    out = materialize(tmp_path / "b.safetensors", tmp_path / "out.safetensors")
    assert_same_logits(case.model, load_output(out), resnet_input)


# ---------------------------------------------------------------------------------------------- growth
def test_lossless_2x_width_growth(case, resnet_input):
    width = [2 * w for w in tiny_resnet_args(case.block)["channels"]]
    r = materialize(case, "wide_dir", width=width)
    assert r["architecture"]["width"] == width
    assert "resized" in r["bn_statistics"]
    wide = load_output(r)
    assert_same_logits(case.model, wide, resnet_input)
    # Per-channel BatchNorm statistics are tiled, never divided; conv inputs are split over the copies.
    old, new = case.model.state_dict(), wide.state_dict()
    torch.testing.assert_close(new["layer2.1.bn1.running_var"], old["layer2.1.bn1.running_var"].repeat(2))
    torch.testing.assert_close(new["layer2.1.bn1.running_mean"], old["layer2.1.bn1.running_mean"].repeat(2))
    w_old, w_new = old["layer2.1.conv1.weight"], new["layer2.1.conv1.weight"]
    n = w_old.shape[1]
    torch.testing.assert_close(new["layer2.1.conv1.weight"][: w_old.shape[0], :n], w_old / 2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w_new[:, n:], w_new[:, :n])


def test_single_width_keeps_stage_ratios(case):
    channels = tiny_resnet_args(case.block)["channels"]
    r = materialize(case, "wide1.safetensors", width=2 * channels[0])
    assert r["architecture"]["width"] == [2 * c for c in channels]


def test_identity_depth_growth_is_lossless(case, resnet_input):
    r = materialize(case, "deep.safetensors", depth=[3, 2, 4, 3], depth_rule="identity")
    deep = load_output(r)
    assert [len(getattr(deep, f"layer{s}")) for s in range(1, 5)] == [3, 2, 4, 3]
    assert_same_logits(case.model, deep, resnet_input)
    last = "bn3" if case.block == "bottleneck" else "bn2"
    sd = deep.state_dict()
    assert sd[f"layer3.3.{last}.weight"].abs().max() == 0 and sd[f"layer3.3.{last}.bias"].abs().max() == 0
    assert sd[f"layer3.1.{last}.weight"].abs().max() > 0  # the kept blocks are untouched


@pytest.mark.parametrize(
    "sizes",
    [
        dict(depth=1),  # every stage back to its first block
        dict(depth=[3, 1, 2, 3], depth_rule="interp"),
        dict(depth=4, depth_rule="stack", width_rule="tile-nodiv"),
        dict(depth=[2, 3, 2, 2], depth_rule="interleave", num_classes=7),
    ],
    ids=["prefix-1", "interp", "stack-nodiv", "interleave-classes"],
)
def test_every_rule_writes_a_model_timm_loads(case, resnet_input, sizes):
    ch = tiny_resnet_args(case.block)["channels"]
    width = [ch[0], ch[1], 3 * ch[2], ch[3] // 2] if case.block == "basic" else [ch[0], 2 * ch[1], ch[2], 3 * ch[3]]
    r = materialize(case, "rule.safetensors", width=width, force=True, **sizes)
    model = load_output(r)  # strict: every key present with the right shape
    with torch.no_grad():
        y = model(resnet_input)
    assert y.shape == (4, sizes.get("num_classes", 5)) and torch.isfinite(y).all()


def test_cli_table_and_json_say_statistics_are_resized(case, tmp_path):
    wide = ",".join(str(2 * w) for w in tiny_resnet_args(case.block)["channels"])
    r = weit("materialize", case.bundle, "-o", tmp_path / "m", "--depth", "2,2,3,2", "--width", wide, "--json")
    obj = json.loads(r.stdout)
    assert obj["architecture"]["depth"] == [2, 2, 3, 2]
    assert "not recalibrated" in obj["bn_statistics"] and "ResNet" in obj["description"]
    r = weit("materialize", case.bundle, "-o", tmp_path / "m.safetensors", "--width", wide)
    assert "BN statistics" in r.stdout and "resized" in r.stdout
    assert f"timm.create_model('{'resnet18' if case.block == 'basic' else 'resnet50'}'" in r.stdout.replace("\n", "")


# ---------------------------------------------------------------------------------------------- bad sizes
BAD = [
    (["--width", "12,16,16,32"], "is not a multiple of 8"),
    (["--width", "8,16,16"], "names 3 stages; a timm ResNet has 4"),
    (["--depth", "2,2"], "names 2 stages"),
    (["--depth", "0,1,1,1"], "at least 1 block"),
    (["--depth", "2,x"], "not a number or a comma list"),
    (["--width", "20"], ": 20 is not a multiple of 8"),
    (["--num-heads", "4"], "--num-heads does not apply to a ResNet"),
    (["--mlp-ratio", "2"], "does not apply to a ResNet"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_sizes_give_one_line_errors(case, tmp_path, args, message):
    out = tmp_path / "never"
    r = weit("materialize", case.bundle, "-o", out, *args, "--json", expect=EXIT_USAGE)
    obj = json.loads(r.stdout)
    assert message in obj["error"] and obj["hint"]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_nearest_widths_and_structural_limits():
    from weit_cli.arch._registry import get_adapter
    from weit_cli.arch.resnet import ResNetArch

    ad = get_adapter("resnet")
    base = ResNetArch(block="basic", depth=(2, 1, 2, 2), width=(64, 128, 256, 512), in_chans=3, num_classes=10)
    with pytest.raises(WeitError, match="nearest valid stage widths: 96, 112") as e:
        ad.target_arch(base, width=[100, 128, 256, 512], template_size=16)
    assert "not a multiple of 16" in e.value.message
    # resnet18's 7×7 stem is 64 wide and its first stage has no projection: stage 1 cannot change.
    with pytest.raises(WeitError, match="always 64 channels"):
        ad.target_arch(base, width=[128, 128, 256, 512], template_size=16)
    # A stage holding only its first (downsampling) block has nothing to grow from.
    with pytest.raises(WeitError, match="stage 2 of the bundle has only its first"):
        ad.target_arch(base, depth=3, template_size=16)
    odd = ResNetArch(block="bottleneck", depth=(2, 2, 2, 2), width=(48, 64, 128, 256), in_chans=3, num_classes=10)
    with pytest.raises(WeitError, match="cannot keep this bundle's stage ratios 48,64,128,256"):
        ad.target_arch(odd, width=32, template_size=16)
    # The deep stem is resized with stage 1 instead.
    deep = ResNetArch(block="basic", depth=(2, 2, 2, 2), width=(64, 128, 256, 512), in_chans=3, num_classes=10, stem_type="deep", stem_width=32)
    assert ad.target_arch(deep, width=128, template_size=16).stem_width == 64


def test_vit_rejects_per_stage_lists(tiny_bundle, tmp_path):
    r = weit("materialize", tiny_bundle, "-o", tmp_path / "v", "--depth", "2,2", "--json", expect=EXIT_USAGE)
    assert "takes one number" in json.loads(r.stdout)["error"]
    weit("materialize", tiny_bundle, "-o", tmp_path / "v1.safetensors", "--depth", "3")


# ---------------------------------------------------------------------------------------------- recalibration
def test_recalibrate_bn_replaces_statistics_and_restores_the_model():
    from torch.utils.data import TensorDataset

    from weit_cli.training.calibrate import recalibrate_bn, running_stats

    model = make_tiny_resnet("basic")
    momenta = [m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = {k: v.clone() for k, v in running_stats(model).items()}
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(3 + 2 * torch.randn(40, 3, 16, 16, generator=g), torch.zeros(40, dtype=torch.long))
    used = recalibrate_bn(model, data, batches=3, batch_size=16, seed=0)
    assert used == {"batches": 2, "images": 32}  # full batches only
    after = running_stats(model)
    assert not model.training
    assert [m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)] == momenta
    assert after["bn1.num_batches_tracked"].item() == 2
    assert not torch.allclose(after["bn1.running_mean"], before["bn1.running_mean"])
    # The first BatchNorm's mean is now the data's: the average of its input over the two batches.
    with torch.no_grad():
        feats = model.conv1[0](data.tensors[0][torch.randperm(40, generator=torch.Generator().manual_seed(0))[:32]])
    torch.testing.assert_close(after["conv1.1.running_mean"], feats.mean((0, 2, 3)), atol=1e-5, rtol=1e-4)
    # Same seed, same statistics.
    again = make_tiny_resnet("basic")
    recalibrate_bn(again, data, batches=3, batch_size=16, seed=0)
    for k, v in running_stats(again).items():
        assert torch.equal(v, after[k])


@pytest.fixture(scope="module")
def trained_resnet(tmp_path_factory):
    """A tiny basic ResNet trained for 150 steps on scikit-learn digits (16 px, gray), and its bundle."""
    import timm

    from weit_cli.commands.extract import extract_templates
    from weit_cli.data.images import load_data

    pytest.importorskip("sklearn")
    data = load_data("digits", img_size=16, in_chans=1, seed=0)
    args = dict(layers=[1, 1, 1, 1], channels=[8, 16, 16, 32], in_chans=1, num_classes=10, stem_width=4, stem_type="deep")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", **args)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = data.train.tensors
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    root = tmp_path_factory.mktemp("trained_resnet")
    folder = save_timm_dir(model.eval(), root / "dense", args)
    bundle = root / "bundle.safetensors"
    extract_templates(folder, bundle, template_size=8, num_templates=FULL_RANK, img_size=16)
    return SimpleNamespace(model=model, data=data, bundle=bundle, root=root)


def test_calibrate_repairs_wrong_statistics(trained_resnet):
    """`tile-nodiv` doubles every conv's input: the bundle's statistics no longer fit the activations.
    A short recalibration pass makes the widened model as good as the original again."""
    from weit_cli.commands.materialize import materialize
    from weit_cli.tasks.classification import evaluate

    t = trained_resnet
    test = t.data.test
    original = evaluate(t.model, test).accuracy
    assert original > 0.7
    common = dict(width=[16, 32, 32, 64], width_rule="tile-nodiv")
    stale = materialize(t.bundle, t.root / "stale", **common)
    fixed = materialize(t.bundle, t.root / "fixed", calibrate="digits", calibrate_batches=10, **common)
    assert "not recalibrated" in stale["bn_statistics"]
    assert fixed["bn_statistics"].startswith("recalibrated on digits") and "10 batches" in fixed["bn_statistics"]
    m_stale, m_fixed = load_output(stale), load_output(fixed)
    acc_stale, acc_fixed = evaluate(m_stale, test).accuracy, evaluate(m_fixed, test).accuracy
    assert acc_stale < original - 0.3  # the resized statistics are wrong …
    assert acc_fixed > acc_stale + 0.3 and acc_fixed >= original - 0.05  # … and recalibration repairs them
    a, b = m_stale.state_dict(), m_fixed.state_dict()
    assert not torch.allclose(a["layer2.0.bn1.running_var"], b["layer2.0.bn1.running_var"])
    torch.testing.assert_close(a["layer2.0.conv1.weight"], b["layer2.0.conv1.weight"])  # weights untouched
    # Same inputs and seed → identical bytes.
    again = materialize(t.bundle, t.root / "fixed2", calibrate="digits", calibrate_batches=10, **common)
    assert Path(again["files"][0]).read_bytes() == Path(fixed["files"][0]).read_bytes()


def test_calibrate_errors(trained_resnet, tiny_bundle, tmp_path):
    r = weit("materialize", tiny_bundle, "-o", tmp_path / "v", "--calibrate", "digits", "--json", expect=EXIT_USAGE)
    assert "no BatchNorm statistics" in json.loads(r.stdout)["error"]
    r = weit("materialize", trained_resnet.bundle, "-o", tmp_path / "r", "--calibrate", str(tmp_path / "nope"), "--json", expect=EXIT_INPUT)
    assert "unknown data source" in json.loads(r.stdout)["error"]
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------- 3×3 shortcuts
@pytest.mark.parametrize("avg_down", [False, True])
def test_down_kernel_size_3_extracts_and_round_trips(tmp_path, resnet_input, avg_down):
    """timm's `down_kernel_size=3` makes the strided shortcuts (stages 2–4) 3×3 convs, while stage 1's
    (stride 1) and every avg-pool shortcut stays 1×1: each is templated by its own kernel, so a
    basic-block ResNet whose stage 1 projects needs both template types."""
    from weit_cli.commands.extract import extract_templates

    # stem output 8 ≠ stage-1 output 16: stage 1 has a (1×1) projection shortcut
    shape = dict(channels=[16, 16, 32, 32], down_kernel_size=3, avg_down=avg_down)
    model = make_tiny_resnet("basic", **shape)
    args = {**tiny_resnet_args("basic"), **shape}
    assert model.layer1[0].downsample is not None
    folder = save_timm_dir(model, tmp_path / "dense", args)
    bundle = tmp_path / "bundle.safetensors"
    result = extract_templates(folder, bundle, template_size=TINY_RESNET_P, num_templates=FULL_RANK, img_size=TINY_RESNET_IMG)
    assert result["architecture"]["down_kernel_size"] == (1 if avg_down else 3)
    assert set(result["templates"]) == {"conv3x3", "conv1x1"}
    assert max(result["relative_error"].values()) < 1e-5
    from weit_cli.commands.materialize import materialize as mat

    out = mat(bundle, tmp_path / "same")
    assert_same_logits(model, load_output(out), resnet_input)
    grown = mat(bundle, tmp_path / "grown", depth=[2, 3, 2, 2], width=[32, 32, 64, 64])
    assert load_output(grown)(resnet_input).shape == (4, 5)
