"""benchmarks/budget_gap.py: a budget scale scales the recipe's steps and warm-up (none at scale 1,
so that pair is the finetuning tables' own), and the table pairs weit and dense by seed."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_scale_overrides_and_paired_gap():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import budget_gap

    from weit_cli.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "vit-fashion-small.yaml", ["train.steps=1000", "train.warmup_steps=50"])
    assert budget_gap.scale_overrides(recipe, 1) == []
    assert budget_gap.scale_overrides(recipe, 2) == ["train.steps=2000", "train.warmup_steps=100"]
    assert budget_gap.scale_overrides(recipe, 0.5) == ["train.steps=500", "train.warmup_steps=25"]
    rows = [{"scale": 2.0, "seed": s, "flops": 8e12, "weit_steps": 2000, "dense_steps": 700 + s, "weit": w, "dense": d}
            for s, (w, d) in enumerate([(0.85, 0.86), (0.84, 0.86), (0.86, 0.86)])]
    md = budget_gap.table(rows, "benchmarks/budget_gap.py --scales 2")
    line = next(l for l in md.splitlines() if l.startswith("| ×2 "))
    # per seed −1, −2, 0: mean −1.00, sd 1.00; the means alone would give the same mean, not this sd
    assert line.endswith("| 85.00 ± 1.00 | 86.00 ± 0.00 | -1.00 ± 1.00 |") and "700, 701, 702" in line
