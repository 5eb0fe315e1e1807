"""The generation benchmark runs end to end at its tiny budget (one seed, two methods) and writes
what docs/benchmarks.md promises: JSON with the command, per-step FID and class accuracy from step 0,
the equal-compute record of the dense DiT, a plot and one grid per method and size. Slow: minutes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_generation_benchmark_tiny(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "generation.py"), "--budget", "tiny", "--seeds", "1",
           "--methods", "random,weit", "--work", str(tmp_path / "work"), "--docs", str(tmp_path / "docs")]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    res = json.loads((tmp_path / "docs" / "generation-tiny.json").read_text())
    assert res["command"].startswith("benchmarks/generation.py --budget tiny")
    (pre,) = res["pretrain"]  # one pretraining (seed 0) shared by the finetuning seeds
    assert pre["compute"]["dense_steps"] >= pre["compute"]["bundle_steps"]
    assert {tuple(r["size"]) for r in res["runs"]} == {(1, 16), (2, 32), (3, 16)}
    for r in res["runs"]:
        assert r["steps"][0] == 0 and len(r["fid_mean"]) == len(r["steps"]) == len(r["class_accuracy_mean"])
        assert all(f > 0 for f in r["fid_mean"]) and all(0 <= a <= 1 for a in r["class_accuracy_mean"])
    assert len(res["grids"]) == 6 and all((ROOT / g["path"]).is_file() or Path(g["path"]).is_file() for g in res["grids"])
    assert (tmp_path / "docs" / "generation-tiny.png").stat().st_size > 0
    floor = res["real_floor"]  # the judge's scale: real images, and the ceilings weit evaluate reports
    assert floor["fid_judge"] < floor["ceilings"]["blank"]["fid_judge"] and floor["fid_judge"] < floor["ceilings"]["noise"]["fid_judge"]
    assert "Ceiling, Gaussian noise" in (tmp_path / "docs" / "generation-tiny.md").read_text()


@pytest.mark.slow
def test_generation_benchmark_step0_per_pretraining_seed(tmp_path):
    """--pretrain-seeds: seed i starts from a bundle and a dense DiT pretrained with seed i;
    --step0-only: the initialisations are scored, nothing is finetuned."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "generation.py"), "--budget", "tiny", "--seeds", "2", "--step0-only",
           "--pretrain-seeds", "--methods", "weight-selection,weit,weit-identity,weit-interp", "--targets", "1x16,3x16", "--tag", "s0",
           "--work", str(tmp_path / "work"),
           "--docs", str(tmp_path / "docs")]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    res = json.loads((tmp_path / "docs" / "generation-tiny-s0.json").read_text())
    assert [p["seed"] for p in res["pretrain"]] == [0, 1]
    assert res["pretrain"][0]["bundle"]["path"] != res["pretrain"][1]["bundle"]["path"]
    for r in res["runs"]:
        assert r["steps"] == [0] and len(r["seeds"]) == 2 and r["seeds"][0]["finetune_seconds"] == 0.0
    assert {tuple(r["size"]) for r in res["runs"]} == {(1, 16), (3, 16)}  # --targets: a subset of the budget's
    weit = [r for r in res["runs"] if r["method"] == "weit"]
    assert all(r["seeds"][0]["fid"] != r["seeds"][1]["fid"] for r in weit)  # other bundles, other samples
    by = {(tuple(r["size"]), r["method"]): r for r in res["runs"]}
    # inside the range every depth rule materializes the prefix; deeper, the default grows a DiT by
    # identity blocks and interp gives other layers
    assert by[(1, 16), "weit-identity"]["fid_mean"] == by[(1, 16), "weit"]["fid_mean"] == by[(1, 16), "weit-interp"]["fid_mean"]
    assert by[(3, 16), "weit-identity"]["fid_mean"] == by[(3, 16), "weit"]["fid_mean"] != by[(3, 16), "weit-interp"]["fid_mean"]
    assert "judge FID step 0" in (tmp_path / "docs" / "generation-tiny-s0.md").read_text()


@pytest.mark.slow
def test_generation_benchmark_transfer_teacher_and_second_guidance(tmp_path):
    """--finetune-data: finetuned and scored on MNIST (its own judge) from Fashion-MNIST pretraining;
    weit-teacher: the teacher path inside the bundle's budget; --also-guidance: a second score of the
    last model."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "generation.py"), "--budget", "tiny", "--seeds", "1",
           "--methods", "weit,weit-teacher", "--targets", "1x16", "--finetune-data", "mnist5k", "--also-guidance", "2",
           "--tag", "tr", "--work", str(tmp_path / "work"), "--docs", str(tmp_path / "docs")]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    res = json.loads((tmp_path / "docs" / "generation-tiny-tr.json").read_text())
    from weit_cli.tasks.fid import load_judge

    assert res["settings"]["finetune"]["data"] == "mnist5k"
    assert res["judge"]["sha256"] == load_judge("mnist5k").sha256 != load_judge("fashion-mnist").sha256
    taught = res["pretrain"][0]["teacher_half"]
    spent = taught["model_flops"]
    # the two halves together stay inside the bundle's budget, within one nested step
    assert 0.9 * spent["budget"] <= spent["teacher_training"] + spent["nested_with_teacher_forwards"] <= spent["budget"]
    assert taught["teacher"]["steps"] == -(-res["pretrain"][0]["compute"]["dense_steps"] // 2)
    by = {r["method"]: r for r in res["runs"]}
    assert by["weit"]["fid_mean"] != by["weit-teacher"]["fid_mean"]  # another bundle
    for r in res["runs"]:
        also = r["guidance_2"]
        assert also["fid_mean"] > 0 and also["fid_mean"] != r["fid_mean"][-1]  # guidance 2 draws other samples than 1
    assert "guidance 2 |" in (tmp_path / "docs" / "generation-tiny-tr.md").read_text()


def test_generation_benchmark_epoch_fits_a_small_training_split():
    """A finetuning epoch is the scoring interval, or on a smaller training split the largest divisor
    of it that fits: mnist5k's 3960 training images hold 50 batches of 64 of the 200-step interval."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import generation

    from weit_cli import recipe as rcp

    bench = generation.Bench.__new__(generation.Bench)
    bench.cfg = dict(generation.BUDGETS["garments"])
    bench.recipe = rcp.load_recipe(ROOT / generation.RECIPE, bench.cfg["overrides"])

    class Args:
        finetune_data = "mnist5k"

    bench.args = Args()
    assert bench.epoch_length() == 50
    Args.finetune_data = "fashion-mnist"
    assert bench.epoch_length() == 200
