"""Nested distillation from a dense teacher (`weit pretrain RECIPE --teacher SRC`) and the pretraining
levers added with it (per-group learning rates, in-place distillation warm-up)."""

from __future__ import annotations

import importlib.util
import json
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import weit

from weit_cli.commands.pretrain import pretrain
from weit_cli.io.bundle_file import load_bundle
from weit_cli.errors import WeitError
from weit_cli.io.files import load_weit
from weit_cli.recipe import digest, dump, load_recipe
from weit_cli.tasks._registry import task_for
from weit_cli.training import nested as nested_mod
from weit_cli.training.nested import NestedModel, SandwichLoss, initial_bundle, largest_arch
from weit_cli.training.optim import adamw, set_lr

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn (digits) not installed")

# Full-rank templates (16×16 blocks, 256 per type): the teacher's SVD is exact, so the bundle starts
# as the teacher itself.
TINY = """\
model: {img_size: 8, patch_size: 2, in_chans: 1, head_dim: 16}
templates: {count: 256}
nested: {depths: [1, 2], widths: [16, 32], sandwich: 1}
data: {source: digits, batch_size: 32}
train: {steps: 4, warmup_steps: 1, eval_every: 0, checkpoint_every: 0}
"""


@pytest.fixture
def recipe_path(tmp_path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY)
    return p


def _teacher(recipe_path: Path, folder: Path, seed: int = 3, **recipe_sets) -> Path:
    """A random timm ViT of the recipe's largest size, saved as timm does (every parameter redrawn)."""
    from conftest import randomize, save_timm_dir

    recipe = load_recipe(recipe_path, [f"{k}={v}" for k, v in recipe_sets.items()])
    adapter, arch = largest_arch(recipe, 10)
    model = randomize(adapter.build(arch), seed, norm="norm")
    return save_timm_dir(model, folder, adapter.timm_config(arch)["model_args"])


def test_teacher_run_through_the_cli_starts_from_the_teacher_and_records_it(recipe_path, tmp_path):
    import timm

    teacher = _teacher(recipe_path, tmp_path / "teacher")
    out = tmp_path / "bundle.safetensors"
    # A learning rate too small to move anything: the bundle is its initialisation.
    proc = weit("pretrain", recipe_path, "-o", out, "--teacher", teacher, "--set", "train.lr=1e-12", "--json")
    r = json.loads(proc.stdout)
    from weit_cli.io.files import checkpoint_sha256

    sha = checkpoint_sha256(teacher)
    assert r["teacher"] == {"source": str(teacher), "sha256": sha, "weight": 0.5}
    prov = json.loads(load_weit(out, "weit.templates")[1]["provenance"])
    assert prov["teacher_sha256"] == sha and prov["recipe"]["teacher"]["source"] == str(teacher)
    # The resolved recipe says which teacher, and reproduces the digest.
    resolved = out.with_name("bundle.recipe.yaml")
    assert "teacher:" in resolved.read_text() and digest(load_recipe(resolved)) == r["recipe_sha256"] == prov["recipe_sha256"]
    # Initialised by the teacher's (exact, full-rank) SVD: the largest size computes the teacher.
    bundle, _ = load_bundle(out)
    t = timm.create_model(f"local-dir:{teacher}", pretrained=True).eval()
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(NestedModel(bundle).frozen(2, 32)(x), t(x), atol=1e-4, rtol=1e-4)


def test_teacher_loss_is_the_mix_of_task_loss_and_distance_to_the_teacher(recipe_path):
    recipe = load_recipe(recipe_path)
    task = task_for(recipe.adapter)
    net = NestedModel(initial_bundle(recipe, 10))
    adapter, arch = largest_arch(recipe, 10)
    torch.manual_seed(1)
    teacher = adapter.build(arch).eval()
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(5, 1, 8, 8, generator=g), torch.randint(0, 10, (5,), generator=g))
    sizes = [(2, 32), (1, 16)]
    with torch.no_grad():
        t_out = teacher(batch[0])
        outs = [task.outputs(partial(net, depth=d, width=w), batch) for d, w in sizes]
    for weight in (0.0, 0.3, 1.0):
        loss, ces = SandwichLoss(net, task, weight, 2.0, teacher=teacher)(batch, sizes)
        want = torch.stack([(1 - weight) * task.loss(o, batch) + weight * task.distill_loss(o, t_out, batch, 2.0) for o in outs]).mean()
        assert torch.allclose(loss, want, atol=1e-6)
        assert torch.allclose(ces, torch.stack([task.loss(o, batch) for o in outs]), atol=1e-6)
    # Without a teacher the largest size is the teacher of the others (in-place), and learns from labels only.
    loss, _ = SandwichLoss(net, task, 1.0, 1.0)(batch, sizes)
    want = (task.loss(outs[0], batch) + task.distill_loss(outs[1], outs[0], batch, 1.0)) / 2
    assert torch.allclose(loss, want, atol=1e-6)


@pytest.mark.parametrize(
    ("teacher_sets", "recipe_sets", "message"),
    [
        ({"nested.widths": "[16,48]"}, [], "does not match the recipe's largest size: width 48 (recipe: 32)"),
        ({"model.patch_size": 4}, [], "patch_size 4 (recipe: 2)"),
        ({}, ["nested.distill=0.5"], "exclude each other"),
    ],
)
def test_teacher_that_does_not_fit_is_refused_and_nothing_is_written(recipe_path, tmp_path, teacher_sets, recipe_sets, message):
    teacher = _teacher(recipe_path, tmp_path / "teacher", **teacher_sets)
    out = tmp_path / "out" / "bundle.safetensors"
    out.parent.mkdir()
    sets = [a for s in recipe_sets for a in ("--set", s)]
    proc = weit("pretrain", recipe_path, "-o", out, "--teacher", teacher, *sets, expect=None)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert list(out.parent.iterdir()) == []


def test_teacher_of_another_family_or_missing_is_refused(recipe_path, tmp_path):
    from conftest import make_tiny_resnet, save_timm_dir

    resnet = make_tiny_resnet()
    folder = save_timm_dir(resnet, tmp_path / "resnet", {})
    with pytest.raises(WeitError, match="is a resnet checkpoint, the recipe trains the vit family"):
        pretrain(recipe_path, tmp_path / "a.safetensors", teacher=folder)
    with pytest.raises(WeitError, match="does not exist"):
        pretrain(recipe_path, tmp_path / "b.safetensors", teacher=tmp_path / "nothing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet", "tiny.yaml"]


def test_resume_refuses_another_teacher(recipe_path, tmp_path):
    t1 = _teacher(recipe_path, tmp_path / "t1", seed=1)
    t2 = _teacher(recipe_path, tmp_path / "t2", seed=2)
    out = tmp_path / "bundle.safetensors"

    def stop(info):
        if info.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(WeitError, match="interrupted"):
        pretrain(recipe_path, out, teacher=t1, overrides=["train.checkpoint_every=2"], callback=stop)
    # The same path with other bytes is another teacher.
    import shutil

    shutil.rmtree(t1)
    shutil.copytree(t2, t1)
    with pytest.raises(WeitError, match="another teacher"):
        pretrain(recipe_path, out, teacher=t1, overrides=["train.checkpoint_every=2"], resume=True)


def test_new_options_leave_old_recipes_their_digest(recipe_path):
    plain = load_recipe(recipe_path)
    text = dump(plain)
    assert "teacher" not in text and "lr_scales" not in text and "distill_warmup_steps" not in text
    # The digest of a recipe that does not use them is the one it had before they existed.
    assert digest(plain) == digest(load_recipe(recipe_path, ["train.lr_scales.templates=1.0", "nested.distill_warmup_steps=0"]))
    assert digest(plain) != digest(load_recipe(recipe_path, ["train.lr_scales.scalers=3"]))
    assert "lr_scales" in dump(load_recipe(recipe_path, ["train.lr_scales.scalers=3"]))
    with pytest.raises(WeitError, match="lr_scales"):
        load_recipe(recipe_path, ["train.lr_scales.scalers=0"])


def test_lr_scales_give_each_part_its_learning_rate():
    named = {"templates.qkv": torch.nn.Parameter(torch.ones(2, 2)), "scalers.blocks.0.qkv": torch.nn.Parameter(torch.ones(2, 2)),
             "small.norm.weight": torch.nn.Parameter(torch.ones(2)), "small.head.weight": torch.nn.Parameter(torch.ones(2, 2))}
    plain = adamw(named, lr=1.0, weight_decay=0.1, no_decay_keys=())
    assert [len(g["params"]) for g in plain.param_groups] == [3, 1] and all("lr_scale" not in g for g in plain.param_groups)
    scales = {"templates": 1.0, "scalers": 3.0, "small": 0.5}
    opt = adamw(named, lr=1.0, weight_decay=0.1, no_decay_keys=(), lr_scale=lambda n: scales[n.split(".")[0]])
    set_lr(opt, 2e-3)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    assert lr_of[id(named["templates.qkv"])] == (2e-3, 0.1)
    assert lr_of[id(named["scalers.blocks.0.qkv"])] == pytest.approx((6e-3, 0.1))
    assert lr_of[id(named["small.head.weight"])] == pytest.approx((1e-3, 0.1))
    assert lr_of[id(named["small.norm.weight"])] == pytest.approx((1e-3, 0.0))


def test_distillation_weight_ramps_up_over_the_warmup(recipe_path, tmp_path, monkeypatch):
    seen: list[float] = []
    forward = SandwichLoss.forward

    def spy(self, batch, sizes):
        seen.append(self.distill)
        return forward(self, batch, sizes)

    monkeypatch.setattr(nested_mod.SandwichLoss, "forward", spy)
    pretrain(recipe_path, tmp_path / "b.safetensors", overrides=["nested.distill=0.6", "nested.distill_warmup_steps=3"])
    assert seen == pytest.approx([0.2, 0.4, 0.6, 0.6])
