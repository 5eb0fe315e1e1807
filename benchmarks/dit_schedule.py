"""The nested schedule of the DiT recipe at equal training FLOPs (issues 18 and 19): which way of
training the nested sizes together costs the largest size least, and what it leaves the smallest?

    OMP_NUM_THREADS=1 python benchmarks/dit_schedule.py --work runs/dit-schedule --alone-steps 800 --seeds 0 1 2

The budget is the training FLOPs of `--alone-steps` steps of the recipe's largest size trained alone
(the lever study's setting, docs/generation/dit-levers.md). Every variant gets as many steps as make
up that budget, counted the way `weit pretrain` counts its own `train_flops` (each size's forward and
backward on one batch, torch's FlopCounterMode, the weights' composition included; the schedule's size
draws replayed from the seed), so a cheaper step gets more steps:

    alone        the largest size alone (the budget's definition; the other sizes untrained)
    sandwich     the shipped schedule: largest, smallest and nested.sandwich random sizes every step
    one-size-p0  one size per step, drawn uniformly (MatFormer; the ViT recipe's default)
    one-size-p1  one size per step, probability ∝ its FLOPs
    shrink-0.5   the largest alone for half the steps, then one-size-p1 (Once-for-All / DϵpS)

Scores are `weit pretrain`'s own validation denoising loss (fixed noise and timesteps) of the largest
and the smallest size after the last step, then the test loss (10 000 official test images) of every
nested size materialized from the bundle. Results: docs/generation/dit-schedule.{json,md}; each run's
JSON stays under --work, so a rerun continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "dit-fashion.yaml"
OUT = ROOT / "docs" / "generation"
PY = [sys.executable, "-m", "weit_cli.cli"]
QUIET = ["train.eval_every=0", "train.checkpoint_every=0"]
VARIANTS = {
    "alone": ["nested.depths=[4]", "nested.widths=[64]"],
    "sandwich": ["nested.sampling=sandwich"],
    "one-size-p0": ["nested.sampling=one-size", "nested.one_size_power=0"],
    "one-size-p1": ["nested.sampling=one-size", "nested.one_size_power=1"],
    "shrink-0.5": ["nested.sampling=one-size", "nested.one_size_power=1", "nested.shrink_start=0.5"],
}


def weit(*args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([*PY, *args, "--json"], capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"weit {' '.join(args)} failed: {p.stdout[-500:]} {p.stderr[-1500:]}")
    return json.loads([line for line in p.stdout.splitlines() if line.startswith("{")][-1])


def per_size_flops(sets: list[str]) -> dict:
    """`weit pretrain`'s own per-size count (nested.count_size_flops) for the recipe with `sets`."""
    import torch

    from weit_cli import recipe as rcp
    from weit_cli.tasks._registry import task_for
    from weit_cli.training.nested import NestedModel, count_size_flops, initial_bundle, size_grid

    recipe = rcp.load_recipe(RECIPE, sets)
    task = task_for(recipe.adapter)
    splits = task.load_data(recipe.data.source, recipe.model, seed=0, val_fraction=recipe.data.val_fraction,
                            train_subset=recipe.data.batch_size * 2)
    torch.manual_seed(0)
    net = NestedModel(initial_bundle(recipe, task.classes(splits)))
    batch = tuple(t[: recipe.data.batch_size] for t in splits.train.tensors)
    return count_size_flops(net, task, batch, size_grid(recipe))


def matched_steps(sets: list[str], budget: int, per_size: dict, seed: int) -> tuple[int, int]:
    """The step count whose replayed schedule (this seed's draws) comes closest to `budget`."""
    from weit_cli import recipe as rcp
    from weit_cli.training.nested import train_flops

    def flops(n: int) -> int:
        return train_flops(rcp.load_recipe(RECIPE, [*sets, f"train.steps={n}", f"seed={seed}"]), per_size)["train_flops"]

    n = max(1, round(budget / (flops(1000) / 1000)))
    for _ in range(3):  # the draws differ with the step count only through shrink_start's cut
        n = max(1, round(n * budget / flops(n)))
    return n, flops(n)


def test_losses(bundle: Path, sizes: list[tuple[int, int]], work: Path) -> dict:
    from weit_cli.commands.sample import _load
    from weit_cli.tasks.generation import Generation

    out = {}
    task = Generation()
    for d, w in sizes:
        folder = work / f"model-{d}x{w}"
        weit("materialize", str(bundle), "--depth", str(d), "--width", str(w), "-o", str(folder), "--force")
        adapter, arch, module = _load(folder)
        splits = task.load_data("fashion-mnist", arch, seed=0)
        out[f"{d}x{w}"] = task.evaluate(adapter.task_forward(module), splits.test, batch_size=500).loss
    return out


def run(work: Path, variant: str, seed: int, a, per_size: dict, budget: int) -> dict:
    out = work / f"{variant}-s{seed}"
    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    sets = [*VARIANTS[variant], *QUIET, f"train.warmup_steps={a.warmup}"]
    steps, flops = matched_steps(sets, budget, per_size, seed)
    sets += [f"train.steps={steps}", f"seed={seed}"]
    cmd = ["pretrain", str(RECIPE.relative_to(ROOT)), "-o", str(out / "bundle.safetensors"), "--force", *[x for s in sets for x in ("--set", s)]]
    t0 = time.perf_counter()
    r = weit(*cmd)
    sizes = [(4, 64)] if variant == "alone" else [(2, 32), (3, 48), (4, 64)]
    res = {"variant": variant, "seed": seed, "steps": steps, "train_flops": r.get("train_flops"), "planned_flops": flops,
           "size_steps": r.get("size_steps"), "val_largest": r["val"]["val_loss_largest"],
           "val_smallest": None if variant == "alone" else r["val"]["val_loss_smallest"],
           "test": test_losses(out / "bundle.safetensors", sizes, out), "wall_s": round(time.perf_counter() - t0, 1),
           "command": "weit " + " ".join(cmd)}
    done.write_text(json.dumps(res))
    return res


def ms(xs: list) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"


def table(rows: list[dict], a, budget: int) -> str:
    lines = [
        f"# DiT nested schedule at equal training FLOPs ({budget / 1e12:.2f} TFLOPs = {a.alone_steps} steps of 4×64 alone), "
        f"{len(a.seeds)} seeds, 1 CPU thread",
        "",
        "    OMP_NUM_THREADS=1 python benchmarks/dit_schedule.py --work runs/dit-schedule --alone-steps "
        f"{a.alone_steps} --seeds {' '.join(map(str, a.seeds))} --variants {' '.join(a.variants)}",
        "",
        "Denoising loss (ε-MSE, lower is better; fixed noise and timesteps): val = pretrain's own, on 6000 held-out",
        "training images; test = the 10 000 official test images, each size materialized from the bundle.",
        "recipes/dit-fashion.yaml (256 templates per type, batch 64, lr 1e-3, no EMA), warm-up "
        f"{a.warmup} steps. Steps: each seed's count for the budget (`train_flops` within 0.1 %).",
        "",
        "| variant | steps | steps of 4×64 | test 2×32 | test 3×48 | test 4×64 | val largest | val smallest | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == v]
        big = [r["size_steps"].get("4x64", 0) for r in rs]
        lines.append(
            f"| {v} | {', '.join(str(r['steps']) for r in rs)} | {', '.join(map(str, big))} | "
            + " | ".join(ms([r["test"].get(k) for r in rs]) for k in ("2x32", "3x48", "4x64"))
            + f" | {ms([r['val_largest'] for r in rs])} | {ms([r['val_smallest'] for r in rs])} | {statistics.mean(r['wall_s'] for r in rs):.0f} |"
        )
    lines += ["", "mean ± sample standard deviation over seeds; per-run commands in dit-schedule.json."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("runs/dit-schedule"))
    ap.add_argument("--alone-steps", type=int, default=800, help="The budget: this many steps of the largest size alone.")
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--tag", default="", help="Names the outputs: dit-schedule-<tag>.{json,md}.")
    a = ap.parse_args()
    a.work = a.work.resolve()
    a.work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(1)
    per_size = per_size_flops(QUIET)
    budget = a.alone_steps * per_size[(4, 64)]
    rows = []
    for seed in a.seeds:  # seed-major: a cut-short study still has every variant at seed 0
        for v in a.variants:
            rows.append(run(a.work, v, seed, a, per_size, budget))
            print(json.dumps({k: rows[-1][k] for k in ("variant", "seed", "steps", "val_largest", "test", "wall_s")}), flush=True)
    name = f"dit-schedule{a.tag and '-' + a.tag}"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "budget_flops": budget,
                                                  "per_size_flops": {f"{d}x{w}": f for (d, w), f in per_size.items()},
                                                  "runs": rows}, indent=1) + "\n")
    (OUT / f"{name}.md").write_text(table(rows, a, budget))
    print(table(rows, a, budget))


if __name__ == "__main__":
    main()
