"""finetune end to end: metrics and checkpoints are written, resumed == uninterrupted, the baselines
run through the same loop, and bad runs are refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import assert_keyed_by_role
from conftest import weit as cli

from weit_cli.arch._registry import get_adapter
from weit_cli.arch.vit import ViTArch
from weit_cli.errors import EXIT_INTERRUPTED, WeitError
from weit_cli.io.files import sha256

SMALL = ViTArch(img_size=16, patch_size=8, in_chans=1, num_classes=10, depth=1, width=16, num_heads=2)
LARGE = ViTArch(img_size=16, patch_size=8, in_chans=1, num_classes=10, depth=2, width=32, num_heads=4)
FAST = dict(data="digits", epochs=2, batch_size=64, train_subset=320, lr=2e-3)


weit = partial(cli, expect=None)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A small materialized-style model (timm folder with weit metadata) and a larger dense one."""
    from weit_cli.core.bundle import Bundle
    from weit_cli.io.export import write_model

    d = tmp_path_factory.mktemp("ft")
    ad = get_adapter("vit")
    out = {}
    for name, arch, seed in (("small", SMALL, 1), ("large", LARGE, 2)):
        torch.manual_seed(seed)
        state = ad.build(arch).state_dict()
        out[name] = d / name
        write_model(Bundle(ad, arch, {}, {}, state), out[name], torch.float32, {"command": "test"}, force=False)
    return out


def test_finetune_cli_writes_metrics_and_checkpoints(models, tmp_path):
    run = tmp_path / "run"
    r = weit("finetune", models["small"], "--data", "digits", "--epochs", "2", "--train-subset", "320",
             "--batch-size", "64", "--lr", "2e-3", "-o", run, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["steps"] == 2 * (320 // 64) and res["init"] == {"init": "weit"}
    m = json.loads((run / "metrics.json").read_text())
    assert [e["epoch"] for e in m["epochs"]] == [0, 1, 2]
    for e in m["epochs"]:
        assert 0 <= e["test_acc"] <= 1 and 0 <= e["val_acc"] <= 1 and e["wall_s"] >= 0
    assert m["epochs"][0]["train_loss"] is None and m["epochs"][2]["train_loss"] < m["epochs"][1]["train_loss"]
    assert res["test_acc_by_epoch"] == [e["test_acc"] for e in m["epochs"]]
    assert_keyed_by_role(res, "acc", "test_{}_by_epoch")
    assert all(e["val_metric"] == e["val_acc"] and e["test_metric"] == e["test_acc"] for e in m["epochs"])
    assert m["best"]["epoch"] in (1, 2)
    assert not (run / "state.safetensors").exists()  # finished: no resumable state left behind
    import timm

    from weit_cli.data.images import load_data
    from weit_cli.tasks.classification import evaluate

    last = timm.create_model(f"local-dir:{run / 'last'}", pretrained=True)
    test = load_data("digits", img_size=16, in_chans=1, seed=0, train_subset=320).test
    assert evaluate(last, test).accuracy == pytest.approx(m["epochs"][-1]["test_acc"], abs=1e-9)
    best = timm.create_model(f"local-dir:{run / 'best'}", pretrained=True)
    assert evaluate(best, test).accuracy == pytest.approx(m["best"]["test_acc"], abs=1e-9)
    # the run folder is not replaced without --force, and a finished run cannot be resumed
    r = weit("finetune", models["small"], "--data", "digits", "--epochs", "1", "-o", run)
    assert r.exit_code == 4 and "--resume" in r.stderr
    r = weit("finetune", models["small"], "--data", "digits", "--epochs", "2", "-o", run, "--resume")
    assert r.exit_code == 3 and "no resumable" in r.stderr


def test_resume_equals_uninterrupted(models, tmp_path):
    from weit_cli.commands.finetune import finetune

    full = finetune(models["small"], tmp_path / "full", **FAST)

    class Stop:
        def __call__(self, info):
            if info.step == 7:  # epoch 1 has 5 steps: stop inside epoch 2
                raise KeyboardInterrupt

    with pytest.raises(WeitError) as e:
        finetune(models["small"], tmp_path / "cut", on_step=Stop(), **FAST)
    assert e.value.exit_code == EXIT_INTERRUPTED and "--resume" in e.value.hint
    assert len(json.loads((tmp_path / "cut" / "metrics.json").read_text())["epochs"]) == 2  # epochs 0 and 1
    with pytest.raises(WeitError, match="other options"):
        finetune(models["small"], tmp_path / "cut", resume=True, **{**FAST, "lr": 1e-3})
    resumed = finetune(models["small"], tmp_path / "cut", resume=True, **FAST)
    assert resumed["resumed_from_epoch"] == 1
    assert sha256(tmp_path / "cut" / "last" / "model.safetensors") == sha256(tmp_path / "full" / "last" / "model.safetensors")
    def without_times(run: Path) -> list[dict]:
        epochs = json.loads((run / "metrics.json").read_text())["epochs"]
        return [{k: v for k, v in e.items() if not k.endswith("_s")} for e in epochs]

    assert without_times(tmp_path / "full") == without_times(tmp_path / "cut")  # losses and accuracies identical


def test_baseline_inits(models, tmp_path):
    from weit_cli.commands.finetune import initial_state, read_model
    from weit_cli.core.selection import random_init, weight_selection
    from weit_cli.io.files import load_dense

    ad, arch, _ = read_model(models["small"], need_weights=False)
    state, origin = initial_state(ad, arch, "weight-selection", None, models["large"], seed=0)
    large, _ = load_dense(models["large"])
    assert torch.equal(state["blocks.0.attn.qkv.weight"], weight_selection(large, LARGE, SMALL, random_init(ad, SMALL, 0))["blocks.0.attn.qkv.weight"])
    assert origin["source_sha256"] == sha256(models["large"] / "model.safetensors")
    rnd, _ = initial_state(ad, arch, "random", None, None, seed=0)
    assert torch.equal(rnd["blocks.0.mlp.fc1.weight"], random_init(ad, SMALL, 0)["blocks.0.mlp.fc1.weight"])

    # a config.json alone fixes the architecture for the baselines
    cfg_only = tmp_path / "cfg"
    cfg_only.mkdir()
    shutil.copy(models["small"] / "config.json", cfg_only / "config.json")
    for init, extra in (("random", ()), ("weight-selection", ("--from", models["large"]))):
        r = weit("finetune", cfg_only, "--data", "digits", "--epochs", "1", "--train-subset", "128", "--init", init, *extra,
                 "-o", tmp_path / init, "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["init"]["init"] == init
    r = weit("finetune", cfg_only, "--data", "digits", "--epochs", "1", "-o", tmp_path / "x")
    assert r.exit_code == 3 and "no weights" in r.stderr
    r = weit("finetune", models["large"], "--data", "digits", "--epochs", "1", "--init", "weight-selection",
             "--from", models["small"], "-o", tmp_path / "y")
    assert r.exit_code == 2 and "only initialises smaller models" in r.stderr
    r = weit("finetune", models["small"], "--data", "digits", "--epochs", "1", "--init", "weight-selection", "-o", tmp_path / "z")
    assert r.exit_code == 2 and "--from" in r.stderr
    r = weit("finetune", models["small"], "--data", "digits", "--epochs", str(10**19), "-o", tmp_path / "z")
    assert r.exit_code == 2 and "--epochs must be in" in r.stderr
    assert not any((tmp_path / n).exists() for n in "xyz")


def test_new_classes_get_a_fresh_head(models, tmp_path):
    """mnist5k-style transfer with another class count: the classifier is replaced, the rest kept."""
    from weit_cli.commands.finetune import finetune

    folder = tmp_path / "three"
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in range(3):
        (folder / f"c{c}").mkdir(parents=True)
        for i in range(12):
            img = (torch.rand(16, 16, generator=g) * 80 + 80 * c).byte().numpy()
            Image.fromarray(img, mode="L").save(folder / f"c{c}" / f"{i}.png")
    res = finetune(models["small"], tmp_path / "run", data=str(folder), epochs=1, batch_size=8)
    assert res["new_head"] and res["architecture"]["num_classes"] == 3
    cfg = json.loads((tmp_path / "run" / "last" / "config.json").read_text())
    assert cfg["num_classes"] == 3


@pytest.mark.slow
def test_finetune_ddp_two_processes(models, tmp_path):
    """Two CPU processes under torchrun (gloo): both train their shard, rank 0 writes one summary."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", "-m", "weit_cli.cli",
           "finetune", str(models["small"]), "--data", "digits", "--epochs", "1", "--train-subset", "256",
           "--batch-size", "32", "-o", str(tmp_path / "ddp"), "--json", "--device", "cpu"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1
    res = json.loads(lines[0])
    assert res["world_size"] == 2 and res["steps"] == 256 // 32
    assert len(json.loads((tmp_path / "ddp" / "metrics.json").read_text())["epochs"]) == 2
