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
