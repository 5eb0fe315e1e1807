"""Issue 19's training levers: the EMA of the weights (diffusers' EMAModel) in the loop, pretrain and
finetune — it follows diffusers' decay formula, differs from the last weights, is what gets written,
and survives --resume — label dropout as a recipe option, and per-rank diffusion noise under torchrun
(2 gloo processes draw different noise; one process draws from the global generator as before)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import torchrun, weit
from torch import nn
from torch.utils.data import TensorDataset

from weit_cli import recipe as rcp
from weit_cli.io.files import load_weit
from weit_cli.training.batches import Batches
from weit_cli.training.loop import Loop, Plan, make_ema, rank_generator, step_seed
from weit_cli.training.optim import adamw

ROOT = Path(__file__).resolve().parents[1]
needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn (digits) not installed")
SMALL = [
    "--data", "digits", "--set", "model.sample_size=8", "--set", "model.patch_size=2", "--set", "model.head_dim=8",
    "--set", "templates.size=8", "--set", "templates.count=8", "--set", "nested.depths=[1,2]", "--set", "nested.widths=[16,32]",
    "--set", "train.steps=6", "--set", "train.warmup_steps=1", "--set", "train.eval_every=0", "--set", "train.eval_samples=64",
    "--set", "data.batch_size=16", "--set", "train.checkpoint_every=3",
]


# ---------------------------------------------------------------------------------------------- the loop
def _toy_loop(ckpt=None, *, decay=0.9, power=0.75, steps=8, stop_at=None, snapshots=None):
    torch.manual_seed(0)
    x = torch.randn(48, 4, generator=torch.Generator().manual_seed(1))
    data = TensorDataset(x, x.sum(1, keepdim=True).sin())
    model = nn.Linear(4, 1)
    named = dict(model.named_parameters())
    opt = adamw(named, lr=5e-2, weight_decay=0.0, no_decay_keys=())
    calls = [0]

    def loss_step(batch):
        calls[0] += 1
        if stop_at is not None and calls[0] == stop_at:
            raise KeyboardInterrupt
        return nn.functional.mse_loss(model(batch[0]), batch[1])

    def on_step(info):
        if snapshots is not None:
            snapshots.append({k: v.detach().clone() for k, v in named.items()})

    loop = Loop(Plan(steps, lambda s: 5e-2, 0.0, checkpoint_every=3), optimizer=opt, params=named,
                batches=Batches(data, 8, seed=0), device=torch.device("cpu"), loss_step=loss_step,
                checkpoint=ckpt, on_step=on_step, ema=make_ema(named, decay, power))
    return loop, named


def test_ema_follows_diffusers_decay_formula_and_differs_from_the_last_weights():
    snaps: list[dict] = []
    loop, named = _toy_loop(snapshots=snaps)
    start = {k: v.detach().clone() for k, v in named.items()}
    loop.run()
    assert len(snaps) == 8
    expected = dict(start)
    for k_update, raw in enumerate(snaps, start=1):  # diffusers' get_decay: step = k - 1; 0 → decay 0
        step = k_update - 1
        d = 0.0 if step <= 0 else min(0.9, 1 - (1 + step) ** -0.75)
        expected = {k: expected[k] - (1 - d) * (expected[k] - raw[k]) for k in expected}
    for k, shadow in zip(named, loop.ema.shadow_params):
        torch.testing.assert_close(shadow, expected[k], rtol=1e-6, atol=1e-7)
        assert not torch.allclose(shadow, named[k])  # the average is not the last weights
    assert loop.ema.cur_decay_value == pytest.approx(min(0.9, 1 - 8 ** -0.75))
    with loop.ema_weights():  # swapped in for a block, then the last weights back
        assert all(torch.equal(named[k], s) for k, s in zip(named, loop.ema.shadow_params))
    assert all(torch.equal(named[k], snaps[-1][k]) for k in named)
    info = loop.use_ema()
    assert info["weights"] == "ema" and info["ema_updates"] == 8 and info["ema_decay"] == 0.9
    assert all(torch.equal(named[k], s) for k, s in zip(named, loop.ema.shadow_params))


def test_no_ema_when_decay_is_zero():
    assert make_ema({"w": torch.zeros(2)}, 0.0) is None


def test_resume_keeps_the_ema_state(tmp_path):
    ref, ref_named = _toy_loop()
    ref.run()
    ckpt = tmp_path / "c.ckpt.safetensors"
    cut, _ = _toy_loop(ckpt, stop_at=5)  # killed in step 5: the checkpoint of step 3 is kept
    with pytest.raises(Exception, match="step 3 is kept"):
        cut.run()
    again, named = _toy_loop(ckpt)
    again.resume()
    assert again.ema.optimization_step == 3
    again.run()
    for a, b in zip(again.ema.shadow_params, ref.ema.shadow_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(torch.equal(named[k], ref_named[k]) for k in named)


# ---------------------------------------------------------------------------------------------- ranks
def test_one_process_keeps_the_global_generator():
    from weit_cli.commands.pretrain import _rank_noise
    from weit_cli.tasks.generation import Generation

    task = Generation()
    assert rank_generator(1) is None and _rank_noise(task, 1) is None and task.generator is None
    assert step_seed(0, 0, 5) != step_seed(0, 1, 5) and step_seed(0, 0, 5) != step_seed(0, 0, 6)


DRAWS = """\
import json, os, sys, torch
from torch.utils.data import TensorDataset
from weit_cli.tasks.generation import Generation
from weit_cli.training.batches import Batches
from weit_cli.training.dist import cleanup_distributed, setup_distributed
from weit_cli.training.loop import Loop, Plan, rank_generator

rank, world, dev = setup_distributed("cpu")
torch.manual_seed(0)  # every rank seeds the global generator alike, as the commands do
task = Generation()
task.num_classes = 10
w = torch.nn.Parameter(torch.zeros(()))
data = TensorDataset(torch.zeros(64, 1, 4, 4), torch.zeros(64, dtype=torch.long))
draws = []
def loss_step(batch):
    x_t, t, y, eps = task.prepare(batch)
    draws.append({"t": t.tolist(), "eps": eps.flatten()[:8].tolist()})
    return (w - eps.mean()) ** 2
gen = rank_generator(world)
task.generator = gen
opt = torch.optim.SGD([w], lr=0.1)
Loop(Plan(3, lambda s: 0.1, 0.0), optimizer=opt, params={"w": w}, batches=Batches(data, 8, seed=0, rank=rank, world_size=world),
     device=dev, loss_step=loss_step, rank=rank, world_size=world, noise=gen).run()
json.dump({"world": world, "draws": draws}, open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w"))
cleanup_distributed()
"""


def test_two_processes_draw_their_own_noise(tmp_path):
    script = tmp_path / "draws.py"
    script.write_text(DRAWS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = torchrun([str(script), str(tmp_path)], env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and len(r0["draws"]) == 3
    for a, b in zip(r0["draws"], r1["draws"]):
        assert a["t"] != b["t"] and a["eps"] != b["eps"]  # each rank its own timesteps and noise
    assert r0["draws"][0]["t"] != r0["draws"][1]["t"]  # and new ones every step
    g = torch.Generator().manual_seed(step_seed(0, 1, 2))  # rank 1, step 3: reproducible from (seed, rank, step)
    assert torch.randint(0, 1000, (8,), generator=g).tolist() == r1["draws"][2]["t"]


# ---------------------------------------------------------------------------------------------- commands
def test_options_off_keep_the_recipe_digest():
    base = rcp.load_recipe(ROOT / "recipes" / "dit-fashion.yaml")
    plain = rcp.to_plain(base)
    assert "ema" not in plain["train"] and "label_dropout" not in plain["train"]
    on = rcp.load_recipe(ROOT / "recipes" / "dit-fashion.yaml", ["train.ema.decay=0.99", "train.label_dropout=0.2"])
    assert rcp.to_plain(on)["train"]["ema"] == {"decay": 0.99, "warmup_power": 0.75}
    assert rcp.digest(on) != rcp.digest(base)


@needs_sklearn
def test_label_dropout_is_a_generation_option(tmp_path):
    from weit_cli.tasks._registry import task_for

    recipe = rcp.load_recipe(ROOT / "recipes" / "dit-fashion.yaml", ["train.label_dropout=0.3"])
    assert task_for(recipe.adapter, label_dropout=recipe.train.label_dropout).label_dropout == 0.3
    assert task_for(recipe.adapter).label_dropout == 0.1
    r = weit("pretrain", ROOT / "recipes" / "vit-fashion.yaml", "-o", tmp_path / "b.safetensors", "--data", "digits",
             "--set", "train.label_dropout=0.2", expect=None)
    assert r.exit_code != 0 and "generation option" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "b.safetensors").exists()


@needs_sklearn
def test_pretrain_writes_the_ema_weights_and_says_so(tmp_path):
    out = tmp_path / "b.safetensors"
    r = json.loads(weit("pretrain", ROOT / "recipes" / "dit-fashion.yaml", "-o", out, *SMALL,
                        "--set", "train.ema.decay=0.9", "--json").stdout)
    assert r["ema"]["weights"] == "ema" and r["ema"]["ema_updates"] == 6
    assert r["val"] != r["val_raw"]  # the written (EMA) weights score differently from the last ones
    _, meta = load_weit(out, "weit.templates")
    prov = json.loads(meta["provenance"])
    assert prov["ema"]["ema_decay"] == 0.9 and prov["recipe"]["train"]["ema"]["decay"] == 0.9
    plain = json.loads(weit("pretrain", ROOT / "recipes" / "dit-fashion.yaml", "-o", tmp_path / "p.safetensors", *SMALL, "--json").stdout)
    assert "ema" not in plain and "ema" not in json.loads(load_weit(tmp_path / "p.safetensors", "weit.templates")[1]["provenance"])
    assert plain["val"] == r["val_raw"]  # EMA off: the same training, the last weights


@needs_sklearn
def test_finetune_ema_scores_and_writes_the_average(tmp_path):
    from weit_cli.io.files import read_header, weights_file

    bundle = tmp_path / "b.safetensors"
    weit("pretrain", ROOT / "recipes" / "dit-fashion.yaml", "-o", bundle, *SMALL)
    weit("materialize", bundle, "--depth", "2", "--width", "32", "-o", tmp_path / "m")
    common = ["--data", "digits", "--epochs", "2", "--train-subset", "64", "--batch-size", "16", "--json"]
    with_ema = json.loads(weit("finetune", tmp_path / "m", "-o", tmp_path / "ema", "--ema", "0.9", *common).stdout)
    without = json.loads(weit("finetune", tmp_path / "m", "-o", tmp_path / "raw", *common).stdout)
    assert with_ema["init"]["weights"] == "ema" and "weights" not in without["init"]
    assert with_ema["final"]["test_loss"] != without["final"]["test_loss"]
    assert with_ema["test_loss_by_epoch"][0] == without["test_loss_by_epoch"][0]  # epoch 0: both the start
    prov = json.loads(read_header(weights_file(tmp_path / "ema" / "last"))["__metadata__"]["provenance"])
    assert prov["weights"] == "ema" and prov["ema_decay"] == 0.9
    assert json.loads((tmp_path / "ema" / "args.json").read_text())["ema"] == 0.9
    assert "ema" not in json.loads((tmp_path / "raw" / "args.json").read_text())
    bad = weit("finetune", tmp_path / "m", "-o", tmp_path / "bad", "--ema", "1.5", *common, expect=None)
    assert bad.exit_code != 0 and "--ema" in bad.output and not (tmp_path / "bad").exists()


@needs_sklearn
def test_finetune_ema_resume_equals_uninterrupted(tmp_path):
    from weit_cli.commands.finetune import finetune
    from weit_cli.errors import WeitError
    from weit_cli.io.files import sha256

    weit("pretrain", ROOT / "recipes" / "dit-fashion.yaml", "-o", tmp_path / "b.safetensors", *SMALL)
    weit("materialize", tmp_path / "b.safetensors", "--depth", "1", "--width", "16", "-o", tmp_path / "m")
    fast = dict(data="digits", epochs=3, train_subset=48, batch_size=16, ema=0.9)
    finetune(tmp_path / "m", tmp_path / "full", **fast)

    seen = []

    def stop(info):  # the last epoch's end (the 2nd report of step 9): after its checkpoint and last/
        seen.append(info.step)
        if seen.count(9) == 2:
            raise KeyboardInterrupt

    with pytest.raises(WeitError):
        finetune(tmp_path / "m", tmp_path / "cut", on_step=stop, **fast)
    for name in ("last", "best"):  # as if killed after the checkpoint, before last/ and best/ were written
        (tmp_path / "cut" / name / "diffusion_pytorch_model.safetensors").unlink(missing_ok=True)
    assert finetune(tmp_path / "m", tmp_path / "cut", resume=True, **fast)["resumed_from_epoch"] == 3
    for name in ("last", "best"):  # written again from the checkpoint: the EMA weights, not the last ones
        assert sha256(tmp_path / "cut" / name / "diffusion_pytorch_model.safetensors") == sha256(tmp_path / "full" / name / "diffusion_pytorch_model.safetensors")
    epochs = [json.loads((tmp_path / r / "metrics.json").read_text())["epochs"] for r in ("full", "cut")]
    assert [[{k: v for k, v in e.items() if not k.endswith("_s")} for e in run] for run in epochs][0] == \
        [[{k: v for k, v in e.items() if not k.endswith("_s")} for e in run] for run in epochs][1]
