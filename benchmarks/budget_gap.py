"""The largest size's gap against the dense model at equal compute, over the budget (issue 18): does
the nested bundle's 3×96 close on a dense 3×96 of the same training FLOPs when both train longer?

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/budget_gap.py --scales 0.5,1,2 --seeds 0,1,2

For each budget scale s, `recipes/vit-fashion-small.yaml` (the `small` budget of benchmarks/quality.py,
as shipped) is pretrained for round(s × its train.steps) steps, warm-up scaled
alike, and a dense ViT of the largest size is trained from timm's init for the same FLOPs with the same
batch, learning rate, warm-up, cosine and weight decay: quality.py's own pair (`Bench.pretrain_all`),
cached in runs/quality-small (scale 1 is the pair of docs/benchmarks.md's finetuning tables). Score: test
accuracy of the bundle's largest size as `materialize` writes it (no fitting, no finetuning) and of
the dense model, and their difference per seed. Outputs: docs/quality/NAME.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from quality import ROOT, _stat, small_bench, write_results


def scale_overrides(recipe, scale: float) -> list[str]:
    """The train.steps and train.warmup_steps of `scale` × the recipe's (none at scale 1: the recipe as shipped)."""
    if scale == 1:
        return []
    tr = recipe.train
    return [f"train.steps={round(scale * tr.steps)}", f"train.warmup_steps={round(scale * tr.warmup_steps)}"]


def table(results: list[dict], command: str) -> str:
    lines = [f"`{command}`; test accuracy (%) of the largest size (3×96), mean ± sample sd over seeds "
             f"{sorted({r['seed'] for r in results})}; gap = weit − dense, paired by seed; no finetuning.", "",
             "| budget | TFLOPs | weit steps | dense steps | weit 3×96 | dense 3×96 | gap |", "|---|---|---|---|---|---|---|"]
    for scale in sorted({r["scale"] for r in results}):
        rs = [r for r in results if r["scale"] == scale]
        tf = statistics.mean(r["flops"] for r in rs) / 1e12
        steps = {k: ", ".join(str(s) for s in sorted({r[k] for r in rs})) for k in ("weit_steps", "dense_steps")}
        lines.append(f"| ×{scale:g} | {tf:.2f} | {steps['weit_steps']} | {steps['dense_steps']} | "
                     f"{_stat([r['weit'] for r in rs])} | {_stat([r['dense'] for r in rs])} | "
                     f"{_stat([r['weit'] - r['dense'] for r in rs])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scales", default="0.5,1,2", help="Budget scales (× the recipe's steps).")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "quality")
    ap.add_argument("--name", default="budget-gap", help="Output name: DOCS/NAME.{json,md}.")
    args = ap.parse_args(argv)
    from weit_cli import recipe as rcp

    cfg = small_bench().cfg
    shipped = rcp.load_recipe(ROOT / cfg["recipe"], cfg["overrides"])
    results = []
    for scale in [float(s) for s in args.scales.split(",")]:
        bench = small_bench(overrides=scale_overrides(shipped, scale), match="flops")
        for seed in [int(s) for s in args.seeds.split(",")]:
            s = bench.pretrain_all(seed, ["weit"])["summary"]
            results.append({"scale": scale, "seed": seed, "overrides": s["weit"]["overrides"], "flops": s["weit"]["flops"]["flops"],
                            "weit_steps": s["weit"]["steps"], "dense_steps": s["dense"]["steps"], "weit": s["weit"]["largest_test_acc"],
                            "dense": s["dense"]["largest_test_acc"], "weit_s": s["weit"]["seconds"], "dense_s": s["dense"]["seconds"]})
            print(json.dumps(results[-1]), flush=True)
    write_results(args.docs, args.name, results, table(results, "benchmarks/budget_gap.py " + " ".join(sys.argv[1:])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
