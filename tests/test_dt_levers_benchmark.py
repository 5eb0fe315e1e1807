"""benchmarks/dt_levers.py: every variant's bundle is matched to the dense reference's FLOPs and
scored at every nested size; a variant's overrides reach `weit pretrain` (the sandwich costs more
per step, so it gets fewer steps). Slow: about a minute at the tiny budget."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_variant_overrides_come_last():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import control

    env = control.C.env_info("Hopper-v5")
    ov = control.pretrain_overrides(env, control.BUDGETS["tiny"], Path("d.npz"), 10, seed=2, extra=("nested.sampling=sandwich",))
    assert ov[-1] == "nested.sampling=sandwich" and "seed=2" in ov
    assert ov.index("nested.sampling=one-size") < ov.index("nested.sampling=sandwich")  # the later one wins


@pytest.mark.slow
def test_dt_levers_tiny(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "dt_levers.py"), "--budget", "tiny", "--teacher-steps", "40", "--seeds", "0",
           "--variants", "base,sandwich", "--episodes", "1", "--work", str(tmp_path / "work"), "--docs", str(tmp_path / "docs")]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    res = json.loads((tmp_path / "docs" / "dt-levers.json").read_text())
    assert res["command"].startswith("benchmarks/dt_levers.py --budget tiny")
    rows = {r["variant"]: r for r in res["results"]}
    assert set(rows) == {"dense 2×32", "base", "sandwich"}
    for name in ("base", "sandwich"):
        r = rows[name]
        assert abs(r["flops"] / res["budget_flops"] - 1) < 0.1  # matched to the dense reference's FLOPs
        assert set(r["val_action_mse"]) == {"1x16", "1x32", "2x16", "2x32"} and set(r["return"]) == {"1x16", "2x32"}
        assert all(0 < v < 10 for v in r["val_action_mse"].values())
    assert rows["sandwich"]["steps"] < rows["base"]["steps"]  # four sizes a step: fewer steps for the same FLOPs
    assert rows["sandwich"]["overrides"] == ["nested.sampling=sandwich"]
    assert "| sandwich |" in (tmp_path / "docs" / "dt-levers.md").read_text()


def test_stages_are_written_under_a_temp_name_of_their_own(tmp_path, monkeypatch):
    """Seeds run as parallel processes share one --work: the exported data and the cached JSON go
    through a temp file unique to the writer (a shared `.tmp` name made the second process fail)."""
    import numpy as np

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import control

    arrays = {k: np.arange(6, dtype=np.float32).reshape(2, 3) + i for i, k in enumerate(control.C.KEYS)}
    monkeypatch.setattr(control.C, "load_control_data", lambda env_id, seed, budget: type("D", (), arrays)())
    for other in ("data.tmp.npz", "stage.tmp"):  # another writer's temp files, mid-write: not ours to touch
        (tmp_path / other).mkdir()
    path = control.export_data("Hopper-v5", control.BUDGETS["tiny"], tmp_path / "data.npz")
    with np.load(path) as got:
        assert set(got.files) == set(control.C.KEYS) and all((got[k] == arrays[k]).all() for k in control.C.KEYS)
    assert control.cached_json(tmp_path / "stage.json", "k", lambda: {"a": 1}) == {"a": 1}
    assert control.cached_json(tmp_path / "stage.json", "k", lambda: {"a": 2}) == {"a": 1}  # kept under its key
    assert control.cached_json(tmp_path / "stage.json", "k2", lambda: {"a": 3}) == {"a": 3}  # another key: made again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.npz", "data.tmp.npz", "stage.json", "stage.tmp"]  # none of ours left
