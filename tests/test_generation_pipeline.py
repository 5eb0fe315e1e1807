"""Image generation through every command, via the CLI: a tiny nested denoiser (8 px digits, patch 2,
widths 16/32, depths 1-2) pretrained for a few steps, then materialized, fitted, finetuned, distilled,
sampled and evaluated; bad inputs refused in one line with nothing written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_keyed_by_role, weit

from weit_cli.tasks import fid

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn (digits) not installed")

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--data", "digits", "--set", "model.sample_size=8", "--set", "model.patch_size=2", "--set", "model.head_dim=8",
    "--set", "templates.size=8", "--set", "templates.count=8", "--set", "nested.depths=[1,2]", "--set", "nested.widths=[16,32]",
    "--set", "train.steps=4", "--set", "train.warmup_steps=1", "--set", "train.eval_every=0", "--set", "train.eval_samples=64",
    "--set", "data.batch_size=16",
]
FAST_JUDGE = dict(train_subset=1200, epochs=1, batch_size=64)


def js(r) -> dict:
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The shipped recipe, shrunk by overrides, pretrained; the bundle's largest size materialized."""
    root = tmp_path_factory.mktemp("gen")
    bundle = root / "bundle.safetensors"
    pre = js(weit("pretrain", ROOT / "recipes" / "dit-fashion.yaml", "-o", bundle, *SMALL, "--json"))
    model = root / "model"
    mat = js(weit("materialize", bundle, "-o", model, "--json"))
    return SimpleNamespace(root=root, bundle=bundle, pre=pre, model=model, mat=mat)


def test_pretrain_writes_a_nested_denoiser_bundle(run):
    r = run.pre
    assert r["steps"] == 4 and r["nested"] == {"depths": [1, 2], "widths": [16, 32]}
    assert set(r["templates"]) == {"qkv", "proj", "fc1", "fc2", "ada", "temb"}
    assert all(torch.isfinite(torch.tensor(v)) for v in r["val"].values())
    assert set(r["val"]) == {f"val_{k}_{s}" for k in ("loss", "metric") for s in ("largest", "smallest")}  # scored by its loss
    assert r["val"]["val_metric_largest"] == r["val"]["val_loss_largest"] and r["metric_info"]["name"] == "loss"
    assert (run.root / "bundle.recipe.yaml").read_text().startswith("# weit ")  # the command that ran it (in-process: pytest's argv)
    info = js(weit("inspect", run.bundle, "--json"))
    assert info["kind"] == "weit.templates" and "DiT depth 2, width 32" in info["description"]


def test_materialize_writes_what_diffusers_loads_and_samples(run):
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    from weit_cli.arch.dit import DiTDenoiser
    from weit_cli.tasks.diffusion import SCHEDULER, sample

    names = sorted(p.name for p in run.model.iterdir())
    assert names == ["config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json"]
    model = DiTTransformer2DModel.from_pretrained(run.model)
    sched = DDIMScheduler.from_pretrained(run.model)
    assert {k: sched.config[k] for k in SCHEDULER} == SCHEDULER
    x = sample(DiTDenoiser(model), torch.arange(4), shape=(1, 8, 8), num_classes=10, steps=3, scheduler_config=dict(sched.config))
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all() and x.abs().max() <= 1


def test_materialize_is_the_trained_model_at_every_nested_size(run):
    """What pretraining trained at a size is what materialize writes: the weights of the composed
    model equal the file's."""
    from weit_cli.io.bundle_file import load_bundle
    from weit_cli.io.files import load_dense
    from weit_cli.training.nested import NestedModel

    out = run.root / "d1w16"
    weit("materialize", run.bundle, "--depth", 1, "--width", 16, "-o", out)
    state, _ = load_dense(out)
    bundle, _ = load_bundle(run.bundle)
    composed = NestedModel(bundle).state_at(1, 16)
    assert set(state) == set(composed)
    for k, v in composed.items():
        torch.testing.assert_close(state[k], v.detach(), rtol=1e-6, atol=1e-6)


def test_fit_scalers_then_materialize_with_them(run):
    s = run.root / "s.safetensors"
    r = js(weit("fit-scalers", run.bundle, "-o", s, "--data", "digits", "--depth", 1, "--width", 16, "--steps", 3,
                "--batch-size", 16, "--train-subset", 200, "--json"))
    assert r["metric"] == "loss" and r["val_loss_after"] > 0 and "val_acc_after" not in r
    assert_keyed_by_role(r, "loss", "val_{}_before", "val_{}_after")
    out = run.root / "fitted"
    m = js(weit("materialize", run.bundle, "--scalers", s, *r["size_options"], "-o", out, "--json"))
    assert (out / "scheduler_config.json").is_file() and m["architecture"]["depth"] == 1


@pytest.mark.parametrize("init", ["weit", "random", "weight-selection"])
def test_finetune_from_each_init(run, init):
    small = run.root / "small"
    if not small.exists():
        weit("materialize", run.bundle, "--depth", 1, "--width", 16, "-o", small)
    out = run.root / f"ft-{init}"
    extra = ["--from", run.model] if init == "weight-selection" else []
    r = js(weit("finetune", small, "-o", out, "--data", "digits", "--epochs", 1, "--train-subset", 64,
                "--batch-size", 32, "--init", init, *extra, "--json"))
    assert r["init"]["init"] == init and r["metric"] == "loss"
    losses = r["test_loss_by_epoch"]
    assert_keyed_by_role(r, "loss", "test_{}_by_epoch")
    assert_keyed_by_role({**r["best"], "metric_info": r["metric_info"]}, "loss", "val_{}", "test_{}")
    assert len(losses) == 2 and all(v > 0 for v in losses)
    best = r["best"]
    assert best["val_loss"] == min(m["val_loss"] for m in json.loads((out / "metrics.json").read_text())["epochs"][1:])
    assert sorted(p.name for p in (out / "best").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json"]
    # --resume finds the epoch of a diffusers folder (its weights are not model.safetensors)
    from weit_cli.commands.finetune import epoch_of

    assert epoch_of(out / "last") == 1 and epoch_of(out / "best") == best["epoch"] and epoch_of(out / "nothing") is None


def test_extract_templates_distils_the_teachers_noise_prediction(run):
    out = run.root / "extracted.safetensors"
    r = js(weit("extract-templates", run.model, "-o", out, "-n", 4, "--data", "digits", "--distill-steps", 3,
                "--batch-size", 16, "--json"))
    d = r["distillation"]
    assert {"teacher_loss", "student_loss_before", "student_loss_after"} <= set(d)
    assert d["teacher_loss"] > 0 and d["student_loss_after"] > 0
    assert js(weit("inspect", out, "--json"))["provenance"]["distillation"]["steps"] == 3


def test_sample_is_seeded_atomic_and_byte_reproducible(run):
    a, b, c = (run.root / n for n in ("a.png", "b.png", "c.png"))
    ra = js(weit("sample", run.model, "--class", 3, "-n", 6, "--steps", 3, "--seed", 7, "-o", a, "--json"))
    weit("sample", run.model, "--class", 3, "-n", 6, "--steps", 3, "--seed", 7, "-o", b)
    weit("sample", run.model, "--class", 3, "-n", 6, "--steps", 3, "--seed", 8, "--guidance", 2, "-o", c)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    assert a.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and ra["class"] == 3 and ra["n"] == 6
    assert [p.name for p in run.root.iterdir() if p.name.startswith(".")] == []


def test_evaluate_a_generator_names_its_judge(run, tmp_path, monkeypatch):
    monkeypatch.setenv("WEIT_CACHE", str(tmp_path))
    for k, v in FAST_JUDGE.items():
        monkeypatch.setitem(fid.JUDGE_TRAIN, k, v)
    r = js(weit("evaluate", run.model, "--data", "digits", "--num-samples", 20, "--steps", 2, "--json"))
    assert all(torch.isfinite(torch.tensor(r[k])) for k in ("fid_judge", "class_accuracy", "test_loss"))
    assert len(r["judge_sha256"]) == 64 and "NOT comparable to Inception-FID" in r["note"]


def test_evaluate_a_classifier_and_sample_refuses_it(tmp_path, tiny_vit_factory):
    from conftest import save_timm_dir

    args = dict(img_size=8, patch_size=4, in_chans=1, num_classes=10, embed_dim=16, depth=1, num_heads=2)
    folder = save_timm_dir(tiny_vit_factory(**args), tmp_path / "clf", args)
    r = js(weit("evaluate", folder, "--data", "digits", "--json"))
    assert r["task"] == "classification" and 0 <= r["test_acc"] <= 1 and r["test_loss"] > 0
    bad = weit("sample", folder, "-o", tmp_path / "g.png", expect=2)
    assert "generator" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("args, code", [
    (["--class", "10"], 2),  # not one of the model's classes
    (["--steps", "0"], 2),
    (["--guidance", "-1"], 2),
    (["-n", "0"], 2),
])
def test_sample_bad_inputs_are_one_line_and_write_nothing(run, args, code):
    out = run.root / "bad.png"
    r = weit("sample", run.model, "-o", out, *args, expect=code)
    assert r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_bad_generation_inputs_are_refused(run, tmp_path):
    # a folder whose config names another diffusers class
    other = tmp_path / "other"
    other.mkdir()
    for f in run.model.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "_class_name": "UNet2DModel"}))
    r = weit("sample", other, "-o", tmp_path / "x.png", expect=None)
    assert r.exit_code != 0 and "UNet2DModel" in r.stderr and not (tmp_path / "x.png").exists()
    # label smoothing is not a generation option
    r = weit("pretrain", ROOT / "recipes" / "dit-fashion.yaml", "-o", tmp_path / "b.safetensors", *SMALL,
             "--set", "train.label_smoothing=0.1", expect=None)
    assert r.exit_code != 0 and "label smoothing" in r.stderr and not (tmp_path / "b.safetensors").exists()
    # a width the head size does not divide
    r = weit("materialize", run.bundle, "--width", 20, "-o", tmp_path / "w", expect=None)
    assert r.exit_code != 0 and "width 20" in r.stderr and not (tmp_path / "w").exists()


def test_pretrain_with_a_dit_teacher_starts_from_it_and_learns_from_its_noise_prediction(run, tmp_path):
    """`pretrain --teacher` on a diffusers folder: full-rank templates (8×8 blocks, 64 per type) start
    the bundle as the teacher itself; a learning rate too small to move anything keeps it there."""
    from weit_cli.io.bundle_file import load_bundle
    from weit_cli.training.nested import NestedModel

    out = tmp_path / "taught.safetensors"
    r = js(weit("pretrain", ROOT / "recipes" / "dit-fashion.yaml", "-o", out, *SMALL, "--teacher", run.model,
                "--set", "templates.count=64", "--set", "train.lr=1e-12", "--json"))
    assert r["teacher"]["source"] == str(run.model) and r["teacher"]["weight"] == 0.5
    teacher, _ = load_bundle(run.bundle)
    taught, _ = load_bundle(out)
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(3, 1, 8, 8, generator=g), torch.tensor([5, 50, 500]), torch.tensor([0, 3, 9])
    with torch.no_grad():
        want = NestedModel(teacher).frozen(2, 32)(x, t, y)
        got = NestedModel(taught).frozen(2, 32)(x, t, y)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
