"""timm ResNets through the whole pipeline: `pretrain` (nested per-stage depths and widths) through the
CLI, `fit-scalers` (with BatchNorm recalibration for the fitted size), `materialize --scalers`, and
`finetune` of the materialized model; plus the ResNet recipe schema."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import weit

from weit_cli.errors import WeitError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn (digits) not installed")

ROOT = Path(__file__).resolve().parents[1]
TINY = """\
# weit pretrain tiny-resnet.yaml -o bundle.safetensors
model: {family: resnet, block: basic, img_size: 16, in_chans: 1, stage_ratios: [1, 1, 2, 2], bn_calibration_batches: 3}
templates: {size: 8, count: {conv3x3: 16, conv1x1: 8}}
nested: {depths: [1, 2], widths: [8, 16], sandwich: 1}
data: {source: digits, batch_size: 32}
train: {steps: 2, warmup_steps: 1, eval_every: 0, checkpoint_every: 0}
"""


def timm_model(folder: Path):
    import timm

    return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()


def stats(model) -> dict[str, torch.Tensor]:
    from weit_cli.training.calibrate import running_stats

    return {k: v for k, v in running_stats(model).items() if not k.endswith("num_batches_tracked")}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 2-step nested ResNet pretraining run through the real CLI (a separate process)."""
    root = tmp_path_factory.mktemp("resnet_pipeline")
    recipe = root / "tiny-resnet.yaml"
    recipe.write_text(TINY)
    out = root / "bundle.safetensors"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "weit_cli.cli", "pretrain", str(recipe), "-o", str(out), "--json"],
        capture_output=True, text=True, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return SimpleNamespace(root=root, recipe=recipe, bundle=out, result=json.loads(proc.stdout))


# ---------------------------------------------------------------------------------------------- pretrain
def test_resnet_pretrain_through_the_cli(pretrained):
    from weit_cli.io.bundle_file import load_bundle
    from weit_cli.io.files import load_weit

    r = pretrained.result
    assert r["steps"] == 2 and r["nested"] == {"depths": [1, 2], "widths": [8, 16]}
    assert r["final_loss"] is not None and torch.isfinite(torch.tensor(r["final_loss"]))
    a = r["architecture"]
    # The largest size: 2 blocks per stage, stage widths 16 × (1, 1, 2, 2), the deep stem tied to stage 1.
    assert (a["family"], a["block"], a["depth"], a["width"], a["stem_type"], a["stem_width"]) == (
        "resnet", "basic", [2, 2, 2, 2], [16, 16, 32, 32], "deep", 8)
    assert r["templates"] == {"conv3x3": [16, 8, 8, 3, 3], "conv1x1": [8, 8, 8, 1, 1]}
    assert 0 <= r["val"]["val_acc_smallest"] <= 1 and 0 <= r["val"]["val_acc_largest"] <= 1
    _, meta = load_weit(pretrained.bundle, "weit.templates")
    assert json.loads(meta["architecture"])["nested"] == {"depths": [1, 2], "widths": [8, 16]}
    assert json.loads(meta["provenance"])["recipe"]["model"]["family"] == "resnet"
    bundle, _ = load_bundle(pretrained.bundle)
    assert bundle.small["layer1.0.bn1.running_mean"].abs().sum() > 0  # not timm's initial zeros


def test_bundle_statistics_are_the_largest_sizes_recalibrated(pretrained, tmp_path):
    """Documented rule: after the last step the largest size's BatchNorm statistics are re-estimated
    over `bn_calibration_batches` training batches (seed = recipe seed) and stored in the bundle."""
    from weit_cli.commands.materialize import materialize
    from weit_cli.data.images import load_data
    from weit_cli.training.calibrate import recalibrate_bn

    r = materialize(pretrained.bundle, tmp_path / "largest")
    assert r["bn_statistics"] == "the bundle's (same size; re-estimated at the end of pretraining)"
    model = timm_model(tmp_path / "largest")
    again = timm_model(tmp_path / "largest")
    train = load_data("digits", img_size=16, in_chans=1, seed=0).train
    recalibrate_bn(again, train, batches=3, batch_size=32, seed=0)
    for k, v in stats(model).items():
        torch.testing.assert_close(v, stats(again)[k], rtol=1e-4, atol=1e-5)


def test_trained_function_is_what_materialize_writes(pretrained, tmp_path):
    """At every nested size (per-stage depth, stage-1 width) the constrained model in eval mode and
    the materialized timm model compute the same logits; `--calibrate` then replaces the smaller
    size's statistics, which are prefixes of the largest's."""
    from weit_cli.commands.materialize import materialize
    from weit_cli.io.bundle_file import load_bundle
    from weit_cli.training.nested import NestedModel

    bundle, _ = load_bundle(pretrained.bundle)
    net = NestedModel(bundle)
    assert {n for n, _ in net.named_buffers()} and not any("running" in n for n, _ in net.named_parameters())
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    for depth, width in [((1, 1, 1, 1), 8), ((2, 2, 2, 2), 16), ((1, 1, 1, 1), 16)]:
        folder = tmp_path / f"m{sum(depth)}x{width}"
        r = materialize(pretrained.bundle, folder, depth=list(depth), width=width)
        assert ("not recalibrated" in r["bn_statistics"]) == ((depth, width) != ((2, 2, 2, 2), 16))
        model = timm_model(folder)
        assert [len(getattr(model, f"layer{s}")) for s in range(1, 5)] == list(depth)
        assert r["architecture"]["width"] == [width, width, 2 * width, 2 * width]
        with torch.no_grad():
            torch.testing.assert_close(model(x), net.frozen(depth, width)(x), atol=1e-4, rtol=1e-4)
    r = weit("materialize", pretrained.bundle, "-o", tmp_path / "cal", "--depth", "1", "--width", "8",
             "--calibrate", "digits", "--calibrate-batches", "2", "--json")
    assert json.loads(r.stdout)["bn_statistics"].startswith("recalibrated on digits")
    prefix, calibrated = stats(timm_model(tmp_path / "m4x8")), stats(timm_model(tmp_path / "cal"))
    assert not torch.allclose(prefix["layer2.0.bn1.running_var"], calibrated["layer2.0.bn1.running_var"])


# ---------------------------------------------------------------------------------------------- fit → finetune
def test_fit_scalers_materialize_finetune(pretrained, tmp_path):
    from weit_cli.core.resize import resize
    from weit_cli.io.bundle_file import load_bundle
    from weit_cli.data.images import load_data
    from weit_cli.io.files import load_weit
    from weit_cli.tasks.classification import evaluate

    scalers = tmp_path / "s.safetensors"
    r = weit("fit-scalers", pretrained.bundle, "--data", "digits", "--depth", "1,1,1,1", "--width", "8", "--steps", "40",
             "--lr", "5e-3", "--calibrate-batches", "4", "-o", scalers, "--json")
    fit = json.loads(r.stdout)
    assert fit["architecture"]["depth"] == [1, 1, 1, 1] and fit["architecture"]["width"] == [8, 8, 16, 16]
    assert fit["loss_last"] < fit["loss_first"]  # it learns
    assert fit["bn_statistics"].startswith("recalibrated on the fitting data (4 batches")
    # The stored statistics are the fitted model's own, not the bundle's resized ones.
    tensors, meta = load_weit(scalers, "weit.scalers")
    assert json.loads(meta["provenance"])["bn_statistics"] == fit["bn_statistics"]
    bundle, _ = load_bundle(pretrained.bundle)
    target = bundle.adapter.target_arch(bundle.arch, depth=1, width=8, template_size=8)
    resized = resize(bundle, target, "prefix", "tile")
    key = "layer3.0.bn2.running_var"
    assert not torch.allclose(tensors[f"small.{key}"], resized.small[key])

    # materialize --scalers writes exactly the fitted model, statistics included.
    r = weit("materialize", pretrained.bundle, "--scalers", scalers, "--depth", "1,1,1,1", "--width", "8,8,16,16",
             "-o", tmp_path / "fitted", "--json")
    assert "recalibrated on the fitting data" in json.loads(r.stdout)["bn_statistics"]
    model = timm_model(tmp_path / "fitted")
    torch.testing.assert_close(model.state_dict()[key], tensors[f"small.{key}"])
    splits = load_data("digits", img_size=16, in_chans=1, seed=0)
    assert evaluate(model, splits.val).accuracy == pytest.approx(fit["val_acc_after"])
    start = evaluate(model, splits.test).accuracy

    # finetune trains the materialized ResNet as an ordinary timm model, from those weights.
    run = tmp_path / "ft"
    r = weit("finetune", tmp_path / "fitted", "-o", run, "--data", "digits", "--epochs", "2", "--train-subset", "320",
             "--lr", "3e-3", "--json")
    ft = json.loads(r.stdout)
    assert ft["architecture"]["img_size"] == 16  # the input size travels with the materialized CNN
    assert ft["test_acc_by_epoch"][0] == pytest.approx(start)  # epoch 0 is the fitted initialisation
    losses = [e["train_loss"] for e in json.loads((run / "metrics.json").read_text())["epochs"][1:]]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[1] < losses[0]
    last = timm_model(run / "last")
    assert stats(last).keys() == stats(model).keys()
    assert not torch.allclose(last.state_dict()["layer1.0.conv1.weight"], model.state_dict()["layer1.0.conv1.weight"])


def test_fit_hint_and_mismatch_use_per_stage_sizes(pretrained, tmp_path):
    scalers = tmp_path / "s.safetensors"
    r = weit("fit-scalers", pretrained.bundle, "--data", "digits", "--depth", "1", "--width", "8", "--steps", "2",
             "--calibrate-batches", "1", "-o", scalers)
    assert "--depth 1,1,1,1 --width 8,8,16,16 --num-classes 10" in r.stdout.replace("\n", " ").replace("│", " ").replace("  ", " ")
    r = weit("materialize", pretrained.bundle, "--scalers", scalers, "--depth", "2", "-o", tmp_path / "x", "--json", expect=3)
    assert "--depth 1,1,1,1 --width 8,8,16,16" in json.loads(r.stdout)["hint"]
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------- recipes
def test_shipped_resnet_recipe_describes_its_nested_sizes():
    from weit_cli.recipe import load_recipe
    from weit_cli.training.nested import largest_arch

    r = load_recipe(ROOT / "recipes" / "resnet-fashion.yaml")
    assert r.family == "resnet" and r.data.source == "fashion-mnist"
    adapter, arch = largest_arch(r, 10)
    assert arch.width == (32, 64, 128, 256) and arch.depth == (2, 2, 2, 2)
    assert r.template_counts() == {"conv3x3": 64, "conv1x1": 32} and r.smallest() == ((1, 1, 1, 1), 16)
    assert adapter.param_count(arch) < 5_000_000  # small enough for a CPU


def test_resnet_model_section_fields_are_described_and_strict():
    from weit_cli.arch.resnet import ResNetModelSection

    assert ResNetModelSection.model_config.get("extra") == "forbid"
    for name, f in ResNetModelSection.model_fields.items():
        assert f.description and len(f.description) > 8, name


BASE = {"model": {"family": "resnet"}, "nested": {"depths": [1, 2], "widths": [16, 32]}}


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"model": {"family": "resnet", "patch_size": 4}}, "unknown key 'model.patch_size'"),
        ({"model": {"family": "resnet", "stage_ratios": [1, 2]}}, "must be 4 positive integers"),
        ({"nested": {"depths": [[1, 2], [2, 2]], "widths": [16]}}, "lists 4 numbers"),
        ({"nested": {"depths": [[1, 2, 1, 1], [2, 1, 1, 1]], "widths": [16]}}, "per-stage largest [2, 2, 1, 1] must be listed"),
        ({"templates": {"count": {"qkv": 4}}}, "exactly the keys conv3x3, conv1x1"),
        ({"templates": {"count": 5000}}, "exceeds the full rank"),
        ({"model": {"family": "resnet", "stem_type": "7x7"}, "nested": {"depths": [1], "widths": [32, 64]}}, "always 64 channels"),
        ({"model": {"family": "cnn"}}, "does not match any of the expected tags"),
    ],
)
def test_bad_resnet_recipes_are_one_line_errors(patch, message):
    from weit_cli.recipe import validate

    raw = {**BASE, **patch}
    with pytest.raises(WeitError) as e:
        validate(raw)
    assert message in e.value.message and "\n" not in str(e.value) and e.value.hint


def test_per_stage_depths_sort_and_vit_refuses_them():
    from weit_cli.recipe import validate

    r = validate({**BASE, "nested": {"depths": [[2, 2, 2, 2], 1, [1, 1, 2, 1], 1], "widths": [16]}})
    assert r.nested.depths == [1, [1, 1, 2, 1], [2, 2, 2, 2]]
    assert r.depth_options() == [(1, 1, 1, 1), (1, 1, 2, 1), (2, 2, 2, 2)] and r.largest() == ((2, 2, 2, 2), 16)
    with pytest.raises(WeitError, match="per-stage lists are for ResNets"):
        validate({"model": {"head_dim": 32}, "nested": {"depths": [[1, 1, 1, 1]], "widths": [32]}})


# ---------------------------------------------------------------------------------------------- baselines
def test_resnet_weight_selection_hand_checked(tmp_path):
    """First-N blocks per stage, evenly spaced channels shared by every tensor on an axis (convs,
    BatchNorm statistics, classifier input); then finetune --init weight-selection runs on it."""
    from conftest import make_tiny_resnet, save_timm_dir, tiny_resnet_args

    from weit_cli.arch._registry import get_adapter
    from weit_cli.arch.resnet import ResNetArch
    from weit_cli.core.selection import random_init, weight_selection

    ad = get_adapter("resnet")
    src_model = make_tiny_resnet("basic")  # blocks 2,2,2,2, channels 8,16,16,32, deep stem 4 (tied to stage 1)
    src = ad.infer_arch(src_model.state_dict(), {"img_size": 16})
    dst = ResNetArch(block="basic", depth=(1, 1, 2, 1), width=(4, 8, 16, 16), in_chans=3, num_classes=5, img_size=16,
                     stem_type="deep", stem_width=2)
    state = weight_selection(src_model.state_dict(), src, dst, random_init(ad, dst, 0))
    s = src_model.state_dict()
    half8, half16, half32 = [0, 2, 4, 6], [0, 2, 4, 6, 8, 10, 12, 14], list(range(0, 32, 2))
    torch.testing.assert_close(state["layer2.0.conv1.weight"], s["layer2.0.conv1.weight"][half16][:, half8])
    torch.testing.assert_close(state["layer3.1.conv2.weight"], s["layer3.1.conv2.weight"])  # stage 3 unchanged
    torch.testing.assert_close(state["layer4.0.bn2.running_var"], s["layer4.0.bn2.running_var"][half32])
    torch.testing.assert_close(state["fc.weight"], s["fc.weight"][:, half32])
    torch.testing.assert_close(state["conv1.0.weight"], s["conv1.0.weight"][[0, 2]])  # the tied stem, 4 → 2
    assert "layer1.1.conv1.weight" not in state  # first-N blocks
    import timm

    model = timm.create_model("resnet18", **dst.model_args())
    model.load_state_dict(state)  # strict: exactly the target's keys and shapes
    with pytest.raises(WeitError, match="only initialises smaller models: target stage 1 depth 3 > 2"):
        weight_selection(s, src, ResNetArch(**{**dst.to_dict(), "depth": (3, 1, 1, 1)}), random_init(ad, dst, 0))

    from weit_cli.core.bundle import Bundle
    from weit_cli.io.export import write_model

    big = save_timm_dir(src_model, tmp_path / "big", {**tiny_resnet_args("basic"), "in_chans": 3})
    shell = tmp_path / "small"
    write_model(Bundle(ad, dst, {}, {}, random_init(ad, dst, 1)), shell, torch.float32, {"command": "test"}, force=False)
    r = weit("finetune", shell, "-o", tmp_path / "ft", "--init", "weight-selection", "--from", big, "--data", "digits",
             "--epochs", "1", "--train-subset", "128", "--batch-size", "32", "--json")
    ft = json.loads(r.stdout)
    assert ft["init"]["init"] == "weight-selection" and ft["new_head"]  # digits has 10 classes, the source 5
    assert all(0 <= a <= 1 for a in ft["test_acc_by_epoch"])
