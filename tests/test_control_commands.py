"""Embodied control through every command, via the CLI: a tiny nested Decision Transformer (widths
16/32, depths 1-2, K = 5) pretrained for a few steps on 300 cached random Hopper steps, then
materialized (a folder transformers loads, with control_config.json), rolled out by `weit evaluate`,
fitted, finetuned three ways and extracted with distillation; bad inputs refused in one line with
nothing written. No PPO runs: the data is the built-in random quality with a zero PPO budget."""

from __future__ import annotations

import hashlib
import math
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import assert_keyed_by_role, weit

pytest.importorskip("gymnasium")
pytest.importorskip("transformers")

from weit_cli.data import control as C  # noqa: E402
from weit_cli.tasks import control as T  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--set", "model.context=5", "--set", "model.head_dim=8", "--set", "model.dropout=0.0",
    "--set", "templates.size=8", "--set", "templates.count=16", "--set", "nested.depths=[1,2]",
    "--set", "nested.widths=[16,32]", "--set", "nested.sandwich=1", "--set", "data.val_fraction=0.2",
    "--set", "data.batch_size=16", "--set", "train.steps=6", "--set", "train.warmup_steps=1",
    "--set", "train.eval_every=0", "--set", "train.eval_samples=64", "--set", "train.checkpoint_every=0",
]
ROLL = ["--episodes", "2", "--max-steps", "30", "--seed", "3"]


def js(r) -> dict:
    return json.loads(r.stdout)


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def one_line(r, *words: str) -> None:
    err = r.stderr.strip()
    assert r.exit_code != 0 and err.count("\n") == 0 and err.startswith("error:"), err
    for w in words:
        assert w in err, (w, err)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Tiny data in a private cache, saved as an npz; the shipped Hopper recipe shrunk and
    pretrained; its largest and smallest sizes materialized."""
    root = tmp_path_factory.mktemp("ctl")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WEIT_CACHE", str(root / "cache"))
        data = C.load_control_data("Hopper-v5:random", budget=C.Budget(ppo_steps=0, steps_per_quality=300))
        npz = root / "hopper.npz"
        np.savez(npz, **data.arrays())
        source = f"Hopper-v5:{npz}"
        bundle = root / "bundle.safetensors"
        pre = js(weit("pretrain", ROOT / "recipes" / "dt-hopper.yaml", "-o", bundle, "--data", source, *SMALL, "--json"))
        big, small = root / "big", root / "small"
        weit("materialize", bundle, "-o", big, "--json")
        weit("materialize", bundle, "-o", small, "--depth", "1", "--width", "16", "--json")
        yield SimpleNamespace(root=root, bundle=bundle, pre=pre, big=big, small=small, source=source, npz=npz)


def test_pretrain_writes_a_nested_dt_bundle_with_its_control_config(run):
    r = run.pre
    assert r["steps"] == 6 and r["nested"] == {"depths": [1, 2], "widths": [16, 32]}
    assert set(r["templates"]) == {"c_attn", "attn_proj", "c_fc", "mlp_proj"}
    assert set(r["val"]) == {f"val_{k}_{s}" for k in ("action_mse", "loss", "metric") for s in ("largest", "smallest")}
    assert r["val"]["val_action_mse_largest"] == r["val"]["val_loss_largest"] == r["val"]["val_metric_largest"] > 0
    info = js(weit("inspect", run.bundle, "--json"))
    config = info["companion_files"][T.CONFIG_FILE]
    assert config["env_id"] == "Hopper-v5" and config["context"] == 5 and len(config["state_mean"]) == 11
    assert "control_config.json (env_id Hopper-v5" in weit("inspect", run.bundle).stdout


def test_materialize_writes_what_transformers_loads_and_evaluate_rolls_out(run):
    from transformers import DecisionTransformerModel

    for folder, width in ((run.big, 32), (run.small, 16)):
        model = DecisionTransformerModel.from_pretrained(folder)
        assert model.config.hidden_size == width and model.config.state_dim == 11
        assert T.load_control_config(folder) == js(weit("inspect", run.bundle, "--json"))["companion_files"][T.CONFIG_FILE]
    a = js(weit("evaluate", run.small, *ROLL, "--json"))
    assert a["task"] == "control" and a["env_id"] == "Hopper-v5" and a["episodes"] == 2
    assert len(a["returns"]) == 2 and all(1 <= n <= 30 for n in a["lengths"]) and a["wall_s"] > 0
    assert a["normalized_scores"] == [pytest.approx(C.normalized_score("Hopper-v5", x)) for x in a["returns"]]
    assert a["mean_score"] == pytest.approx(np.mean(a["normalized_scores"]))
    assert a["target_return"] == pytest.approx(T.load_control_config(run.small)["target_return"])
    b = js(weit("evaluate", run.small, *ROLL, "--env", "Hopper-v5", "--target-return", "3600", "--json"))
    assert b["target_return"] == 3600.0
    again = js(weit("evaluate", run.small, *ROLL, "--json"))
    assert again["returns"] == a["returns"], "same seed, same returns"
    text = weit("evaluate", run.small, *ROLL).stdout
    assert "normalised score" in text and "2 episodes in Hopper-v5" in text


def test_same_seed_same_bundle_bytes(run, tmp_path, monkeypatch):
    monkeypatch.setenv("WEIT_CACHE", str(run.root / "cache"))
    again = tmp_path / "again.safetensors"
    weit("pretrain", ROOT / "recipes" / "dt-hopper.yaml", "-o", again, "--data", run.source, *SMALL, "--json")
    assert digest(again) == digest(run.bundle)


def test_fit_scalers_then_materialize_with_them(run, tmp_path):
    from transformers import DecisionTransformerModel

    scalers = tmp_path / "s.safetensors"
    r = js(weit("fit-scalers", run.bundle, "-o", scalers, "--data", run.source, "--depth", "1", "--width", "16",
                "--steps", "4", "--batch-size", "8", "--json"))
    assert r["metric"] == "action_mse" and r["val_action_mse_before"] > 0 and r["val_action_mse_after"] > 0
    assert_keyed_by_role(r, "action_mse", "val_{}_before", "val_{}_after")
    assert "--num-classes" not in weit("fit-scalers", run.bundle, "-o", tmp_path / "t.safetensors", "--data", run.source,
                                       "--depth", "1", "--width", "16", "--steps", "2", "--batch-size", "8").stdout
    out = tmp_path / "fitted"
    weit("materialize", run.bundle, "--scalers", scalers, "-o", out, "--depth", "1", "--width", "16", "--json")
    DecisionTransformerModel.from_pretrained(out)
    # fit-scalers prepares its data as the bundle was trained (context, state statistics), and the
    # scalers file carries that record (with its own data's best return) to the materialized folder
    fitted, trained = T.load_control_config(out), T.load_control_config(run.small)
    same = ("context", "state_mean", "state_std", "rtg_scale", "env_id", "state_dim", "act_dim")
    assert {k: fitted[k] for k in same} == {k: trained[k] for k in same} and fitted["context"] == 5
    assert js(weit("evaluate", out, *ROLL, "--json"))["episodes"] == 2


@pytest.mark.parametrize("init", ["weit", "random", "weight-selection"])
def test_finetune_each_init(run, tmp_path, init):
    from transformers import DecisionTransformerModel

    out = tmp_path / f"ft-{init}"
    extra = ["--from", run.big] if init == "weight-selection" else []
    r = js(weit("finetune", run.small, "-o", out, "--data", run.source, "--epochs", "2", "--init", init,
                "--batch-size", "16", *extra, "--json"))
    metrics = json.loads((out / "metrics.json").read_text())["epochs"]
    vals = [m["val_action_mse"] for m in metrics]
    assert len(vals) == 3 and all(v > 0 for v in vals)
    assert r["best"]["val_action_mse"] == min(vals[1:]), "best = the lowest validation action MSE of the trained epochs"
    assert r["init"]["init"] == init
    assert_keyed_by_role(r, "action_mse", "test_{}_by_epoch")
    assert all(m["val_metric"] == m["val_action_mse"] for m in metrics)
    for sub in ("best", "last"):
        DecisionTransformerModel.from_pretrained(out / sub)
        assert T.load_control_config(out / sub)["env_id"] == "Hopper-v5"
    assert js(weit("evaluate", out / "best", *ROLL, "--json"))["episodes"] == 2


def test_extract_templates_distils_from_a_dt_folder(run, tmp_path):
    out = tmp_path / "e.safetensors"
    r = js(weit("extract-templates", run.big, "-o", out, "--num-templates", "8", "--data", run.source,
                "--distill-steps", "4", "--batch-size", "8", "--json"))
    d = r["distillation"]
    assert {"teacher_action_mse", "student_action_mse_before", "student_action_mse_after"} <= set(d)
    # the folder's own control config rides in the bundle, and out again at every size
    model = tmp_path / "m"
    weit("materialize", out, "-o", model, "--depth", "1", "--width", "16", "--json")
    assert T.load_control_config(model) == T.load_control_config(run.big)
    text = weit("extract-templates", run.big, "-o", tmp_path / "e2.safetensors", "--num-templates", "8", "--data", run.source,
                "--distill-steps", "2", "--batch-size", "8").stdout
    assert "action MSE" in text


# ------------------------------------------------------------------------------------------ refusals
def test_bad_data_is_refused_with_nothing_written(run, tmp_path):
    arrays = dict(np.load(run.npz))
    del arrays["rewards"]
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    out = tmp_path / "b.safetensors"
    r = weit("pretrain", ROOT / "recipes" / "dt-hopper.yaml", "-o", out, "--data", f"Hopper-v5:{bad}", *SMALL, expect=None)
    one_line(r, "rewards")
    scalers = tmp_path / "s.safetensors"
    one_line(weit("fit-scalers", run.bundle, "-o", scalers, "--data", f"Hopper-v5:{bad}", "--steps", "2", expect=None), "rewards")
    ft = tmp_path / "ft"
    one_line(weit("finetune", run.small, "-o", ft, "--data", f"Hopper-v5:{bad}", "--epochs", "1", expect=None), "rewards")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz"], "nothing written"


def test_evaluate_refusals_are_one_line(run, tmp_path):
    one_line(weit("evaluate", run.small, "--env", "Hopper-v9", "--episodes", "1", expect=None), "unknown environment")
    one_line(weit("evaluate", run.small, "--env", "HalfCheetah-v5", "--episodes", "1", expect=None), "11 state features and 3 actions")
    one_line(weit("evaluate", run.small, "--data", "digits", expect=None), "rollouts")
    one_line(weit("evaluate", run.small, "--episodes", "0", expect=None), "--episodes")
    bare = tmp_path / "m.safetensors"
    weit("materialize", run.bundle, "-o", bare, "--depth", "1", "--width", "16")
    one_line(weit("evaluate", bare, "--episodes", "1", expect=None), "not a model folder")
    # a model whose sizes do not fit the environment's data is refused before any training
    one_line(weit("finetune", run.small, "-o", tmp_path / "ft", "--data", "HalfCheetah-v5:" + str(run.npz), "--epochs", "1", expect=None))
    one_line(weit("fit-scalers", run.bundle, "-o", tmp_path / "s.safetensors", "--data", run.source, "--num-classes", "3", expect=None), "classes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]



def test_pretrain_with_a_dt_teacher_records_it_and_refuses_a_mismatched_one(run, tmp_path):
    r = js(weit("pretrain", ROOT / "recipes" / "dt-hopper.yaml", "-o", tmp_path / "t.safetensors", "--data", run.source,
                *SMALL, "--teacher", run.big, "--json"))
    assert r["teacher"]["source"] == str(run.big) and all(math.isfinite(v) for v in r["val"].values())
    bad = weit("pretrain", ROOT / "recipes" / "dt-hopper.yaml", "-o", tmp_path / "u.safetensors", "--data", run.source,
               *SMALL, "--teacher", run.small, expect=None)
    one_line(bad, "does not match the recipe's largest size", "width 16 (recipe: 32)")
    assert not (tmp_path / "u.safetensors").exists()
