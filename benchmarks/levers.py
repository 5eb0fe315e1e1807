"""Pretraining levers at equal compute (issue 12): which way of spending one pretraining budget gives
the best models at sizes inside and beyond the nested range, with and without fitting the scalers?

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/levers.py --seeds 0,1,2      # ~1 h on 2 shared cores

Every variant changes `recipes/vit-fashion-small.yaml` (the `small` budget of benchmarks/quality.py)
and gets the training FLOPs of the recipe as shipped (600 sandwich steps; counted with torch's
FlopCounterMode, benchmarks/_flops.py): a cheaper step gets more steps. `nested-2x` is the one
deliberate exception (twice the budget: what a longer schedule buys). For each variant and seed the
bundle is scored on the official Fashion-MNIST test split at 1×32, 2×64, 3×96 (the largest trained
size) and 4×128 (beyond), as `materialize` writes it (`weit`), and after `fit-scalers` (100 steps on
the fixed 10 % subset of benchmarks/quality.py, lr 1e-3; `weit+fit`). No finetuning: that is
benchmarks/quality.py's job, for the variants chosen here.

Pretraining stages are cached in runs/quality-small (shared with benchmarks/quality.py, which trains
the `nested` and `single-16x16-n128` variants with the same recipe); outputs go to
docs/quality/levers.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from _flops import pretrain_flops
from quality import BUDGETS, SINGLE, ROOT, Bench, parse_sizes, small_bench, write_results

DIAGONAL = "nested.sizes=[[1, 32], [2, 64], [3, 96]]"  # round 4: the grid's diagonal only
DIAGONAL_ROW = "nested.sizes=[[1, 32], [2, 64], [3, 32], [3, 64], [3, 96]]"  # + the full-depth row: the small recipe's list since round 4


def _uniform(shrink: str, *extra: str) -> list[str]:
    """16×16 × 128 templates, the largest alone for the first `shrink` of the steps, then one size per
    step drawn uniformly; `extra` overrides after."""
    return ["templates.size=16", "templates.count=128", f"nested.shrink_start={shrink}", "nested.sampling=one-size",
            "nested.one_size_power=0", *extra]


VARIANTS: dict[str, list[str]] = {
    "nested": [],
    "nested-16x16-n128": ["templates.size=16", "templates.count=128"],
    "single-16x16-n128": list(SINGLE),
    "sandwich-0": ["nested.sandwich=0"],
    "lr-scalers-x3": ["train.lr_scales.scalers=3"],
    "distill-0.5-warmup": ["nested.distill=0.5", "nested.distill_warmup_steps=300"],
    "nested-2x": ["train.steps=1200", "train.warmup_steps=100"],
    "scalers-x3": ["train.lr_scales.scalers=3"],  # on the recipe as shipped now (16×16 × 128)
    # issue 18, the schedule (on 16×16 × 128 templates, every schedule option spelled out, since the
    # shipped recipe now has its own; the budget is BUDGET's):
    "sandwich-t16": ["templates.size=16", "templates.count=128", "nested.shrink_start=0", "nested.sampling=sandwich"],
    "shrink-0.5": ["templates.size=16", "templates.count=128", "nested.shrink_start=0.5", "nested.sampling=sandwich"],
    "shrink-0.5-distill-0.5": ["templates.size=16", "templates.count=128", "nested.shrink_start=0.5", "nested.distill=0.5",
                               "nested.sampling=sandwich"],
    "shrink-0.25": ["templates.size=16", "templates.count=128", "nested.shrink_start=0.25", "nested.sampling=sandwich"],
    "one-size": ["templates.size=16", "templates.count=128", "nested.shrink_start=0", "nested.sampling=one-size",
                 "nested.one_size_power=1"],
    "one-size-p0.5": ["templates.size=16", "templates.count=128", "nested.shrink_start=0", "nested.sampling=one-size",
                      "nested.one_size_power=0.5"],
    "one-size-p0": ["templates.size=16", "templates.count=128", "nested.shrink_start=0", "nested.sampling=one-size",
                    "nested.one_size_power=0"],
    "one-size-p2": ["templates.size=16", "templates.count=128", "nested.shrink_start=0", "nested.sampling=one-size",
                    "nested.one_size_power=2"],
    # uniform draws after the shrink: the run in docs/quality/schedule.json took the recipe's power, 0 by then (its
    # TFLOPs at 1384 steps are power 0's; power 1 would cost 5.14 there)
    "shrink-0.5-one-size": ["templates.size=16", "templates.count=128", "nested.shrink_start=0.5", "nested.sampling=one-size",
                            "nested.one_size_power=0"],
    # issue 18, round 2: a longer shrink, a largest-only tail, the learning rates, on uniform one-size draws
    "shrink-0.75-one-size": _uniform("0.75"),
    "shrink-0.5-one-size-scalers-x3": _uniform("0.5", "train.lr_scales.scalers=3"),
    "one-size-tail-0.1": _uniform("0", "nested.largest_tail=0.1"),
    "one-size-tail-0.25": _uniform("0", "nested.largest_tail=0.25"),
    "one-size-lr1e-3": _uniform("0", "train.lr=1e-3"),
    "one-size-lr4e-3": _uniform("0", "train.lr=4e-3"),
    "shrink-0.5-one-size-lr4e-3": _uniform("0.5", "train.lr=4e-3"),
    "one-size-p0-scalers-x3": _uniform("0", "train.lr_scales.scalers=3"),
    # issue 18, round 3: which axis of the nesting costs the largest size (one of them left out)
    "one-size-widths-only": _uniform("0", "nested.depths=[3]"),
    "one-size-depths-only": _uniform("0", "nested.widths=[96]"),
    "one-size-depths-2-3": _uniform("0", "nested.depths=[2, 3]"),  # no one-block size
    # the smaller depths as evenly spaced blocks, the last kept (nested.depth_rule=spread; 3 blocks: 1 → [0], 2 → [0, 2])
    "one-size-spread": _uniform("0", "nested.depth_rule=spread"),
    "shrink-0.5-one-size-spread": _uniform("0.5", "nested.depth_rule=spread"),
    # 256 templates of 16×16 are full rank (p·q): the weights are unconstrained, only nested
    "one-size-n256": _uniform("0", "templates.count=256"),
    # round 4: averaging the weights, bigger batches, fewer sizes (the grid's diagonal)
    "one-size-ema-0.999": _uniform("0", "train.ema.decay=0.999"),
    "one-size-batch-256": _uniform("0", "data.batch_size=256"),
    "one-size-diagonal": _uniform("0", DIAGONAL),
    "shrink-0.5-one-size-diagonal": _uniform("0.5", DIAGONAL),
    "shrink-0.1-one-size-diagonal": _uniform("0.1", DIAGONAL),
    "shrink-0.1-one-size": _uniform("0.1"),
    "shrink-0.1-one-size-diagonal-depth-3": _uniform("0.1", DIAGONAL_ROW),
    # the shipped small recipe's schedule (round 4) with an EMA of the weights written instead of the last ones
    "shrink-0.1-one-size-diagonal-depth-3-ema-0.999": _uniform("0.1", DIAGONAL_ROW, "train.ema.decay=0.999"),
    "shrink-0.15-one-size-diagonal": _uniform("0.15", DIAGONAL),
    "shrink-0.25-one-size-diagonal": _uniform("0.25", DIAGONAL),
    "shrink-0.5-one-size-diagonal-spread": _uniform("0.5", DIAGONAL, "nested.depth_rule=spread"),
}
# The budget every variant is matched to: the small recipe as the dense baseline of docs/benchmarks.md
# was matched to it (32×32 templates × 32, the plain sandwich, 600 steps: 4.31–4.38 TFLOPs by seed),
# whatever the recipe ships now (its size list included: the budget is the full 3 × 3 grid's).
FULL_GRID = ["nested.sizes=null"]  # every variant trains the whole grid unless it lists sizes (the recipe lists five since round 4)
BUDGET = [*FULL_GRID, "templates.size=32", "templates.count=32", "nested.shrink_start=0", "nested.sampling=sandwich", "train.steps=600"]
NOT_MATCHED = {"nested-2x"}
SIZES = [(1, 32), (2, 64), (3, 96), (4, 128)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--fit-steps", type=int, default=100)
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "quality")
    ap.add_argument("--name", default="levers", help="Output name: DOCS/NAME.{json,md}.")
    ap.add_argument("--sizes", default=",".join(f"{d}x{w}" for d, w in SIZES),
                    help="Sizes scored, DEPTHxWIDTH (others than the default are cached apart).")
    args = ap.parse_args(argv)
    bench = small_bench()
    from weit_cli import recipe as rcp

    cfg = bench.cfg
    seeds = [int(s) for s in args.seeds.split(",")]
    sizes = parse_sizes(args.sizes, ap, "--sizes")
    tag = "" if sizes == SIZES else "-" + args.sizes
    results = []
    for name in args.variants.split(","):
        for seed in seeds:
            base = cfg["overrides"] + [f"seed={seed}"]
            budget = pretrain_flops(rcp.load_recipe(ROOT / cfg["recipe"], base + BUDGET))["flops"]
            ov = base + FULL_GRID + VARIANTS[name]
            if name not in NOT_MATCHED:
                ov = matched(rcp, ROOT / cfg["recipe"], ov, budget)
            pre = bench.pretrain_stage(ov)
            key = Path(pre["path"]).parent / f"scores-fit{args.fit_steps}{tag}"
            scores = bench.cached(key, lambda pre=pre, seed=seed: score(bench, Path(pre["path"]), seed, args.fit_steps, sizes))
            results.append({"variant": name, "seed": seed, "overrides": ov, "steps": pre["steps"],
                            "flops": pre["flops"]["flops"], "budget_flops": budget, "pretrain_s": pre["seconds"], **scores})
            print(json.dumps(results[-1]), flush=True)
    write_results(args.docs, args.name, results, table(results, "benchmarks/levers.py " + " ".join(sys.argv[1:]), sizes))
    return 0


def matched(rcp, path: Path, ov: list[str], budget: int) -> list[str]:
    """`ov` plus the train.steps that spend `budget` FLOPs (a few rounds: a schedule's cost per step
    can depend on the step count, e.g. nested.shrink_start), unchanged if the recipe's own fits."""
    recipe = rcp.load_recipe(path, ov)
    steps = recipe.train.steps
    for _ in range(3):
        r = rcp.load_recipe(path, ov + [f"train.steps={steps}"])
        steps = round(budget / (pretrain_flops(r)["flops"] / steps))
    # the same override string benchmarks/quality.py uses
    return ov if steps == recipe.train.steps else ov + [f"train.steps={steps}"]


def score(bench: Bench, bundle: Path, seed: int, fit_steps: int, sizes: list[tuple[int, int]] = SIZES) -> dict:
    """Test accuracy at every size of `sizes`, as materialized and after fitting the scalers."""
    from weit_cli.commands.fit_scalers import fit_scalers
    from weit_cli.commands.materialize import materialize

    out: dict = {"weit": {}, "weit+fit": {}, "fit_seconds": {}}
    folder = bundle.parent / "levers"
    folder.mkdir(exist_ok=True)
    for d, w in sizes:
        plain = folder / f"weit-{d}x{w}"
        materialize(bundle, plain, depth=d, width=w, force=True)
        out["weit"][f"{d}x{w}"] = bench.test_acc(plain, "fashion-mnist")
        if not fit_steps:
            continue
        scalers = folder / f"scalers-{d}x{w}-fit{fit_steps}.safetensors"
        fit = fit_scalers(bundle, scalers, data="fashion-mnist", depth=d, width=w, steps=fit_steps, lr=1e-3,
                          train_subset=BUDGETS["small"]["subset"], seed=seed, device="cpu", force=True)
        fitted = folder / f"weit-fit-{d}x{w}"
        materialize(bundle, fitted, depth=d, width=w, scalers=scalers, force=True)
        out["weit+fit"][f"{d}x{w}"] = bench.test_acc(fitted, "fashion-mnist")
        out["fit_seconds"][f"{d}x{w}"] = fit["fit_seconds"]
    return out


def _stat(v: list[float]) -> str:
    v = [100 * x for x in v]
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return f"{m:.2f} ± {sd:.2f}"


def table(results: list[dict], command: str, sizes: list[tuple[int, int]] = SIZES) -> str:
    lines = [f"`{command}`; test accuracy (%), mean ± sample standard deviation over seeds "
             f"{sorted({r['seed'] for r in results})}; no finetuning.", ""]
    head = "| variant | steps | TFLOPs | " + " | ".join(f"{d}×{w}" for d, w in sizes) + " | " + " | ".join(f"{d}×{w} fit" for d, w in sizes) + " |"
    lines += [head, "|" + "---|" * (3 + 2 * len(sizes))]
    for name in dict.fromkeys(r["variant"] for r in results):
        rs = [r for r in results if r["variant"] == name]
        steps = ", ".join(str(s) for s in sorted({r["steps"] for r in rs}))
        tf = sum(r["flops"] for r in rs) / len(rs) / 1e12
        plain = " | ".join(_stat([r["weit"][f"{d}x{w}"] for r in rs]) for d, w in sizes)
        fit = " | ".join(_stat([r["weit+fit"][f"{d}x{w}"] for r in rs]) if all(r["weit+fit"] for r in rs) else "–" for d, w in sizes)
        lines.append(f"| {name} | {steps} | {tf:.2f} | {plain} | {fit} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
