"""The Decision Transformer recipe's levers at equal compute (issue 18): which way of spending one
pretraining budget gives the best nested DT bundle, scored without finetuning?

    HF_HUB_OFFLINE=1 PYTHONHASHSEED=0 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dt_levers.py \\
        --seeds 0,1,2 --teacher-steps 500 --variants base,t16-n256,n64,n256,scalers-x3,sandwich

The setting is benchmarks/control.py's (`--budget`, Hopper-v5's built-in data, the same split, the
nested sizes 1-2 × 32/64 of `medium` with the teacher's 2×64 the largest), with the teacher's step
count as the budget: `--teacher-steps` dense steps of 2×64 give the FLOPs every variant's bundle is
matched to (`train.steps` whose `train_flops` — `weit pretrain`'s own count, replayed from the seed —
is nearest; control.py's `pretrain_steps`). Per seed, the dense 2×64 of that budget is trained too
(the reference a practitioner would have: control.py's `train`, seeded).

Each variant is control.py's `weit pretrain` overrides plus its own (`VARIANTS`), per seed. Score, for
every nested size: the validation action MSE of the size as `materialize` writes it (no fitting, no
finetuning), and for the largest (2×64) and smallest (1×32) size D4RL's normalised return over
`--episodes` full episodes (rollout seed 1000·seed, the target return of the data). Outputs in
--work (cached per variant and seed) and docs/control/dt-levers.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import control as B  # benchmarks/control.py: its budget, data, teacher training and pretrain path
import torch

from weit_cli.arch._registry import get_adapter
from weit_cli.core.resize import plan_target, resize
from weit_cli.io.bundle_file import load_bundle

VARIANTS: dict[str, tuple[str, ...]] = {
    "base": (),  # control.py's bundle: 32×32 templates (one head) × 128 per type, one size per step, uniform
    "t16-n256": ("templates.size=16", "templates.count=256"),  # half-head templates, as many as 16×16 allows (half the parameters)
    "n64": ("templates.count=64",),
    "n256": ("templates.count=256",),
    "scalers-x3": ("train.lr_scales.scalers=3",),
    "small-x0.5": ("train.lr_scales.small=0.5",),
    "sandwich": ("nested.sampling=sandwich",),
    "lr-x2": ("train.lr=1.2e-3",),  # twice the teacher's peak lr (control.py: 6e-4)
    # the ViT's round-4 lever: the largest alone first, then fewer sizes (the medium budget's 1-2 × 32/64 grid)
    "shrink-0.1": ("nested.shrink_start=0.1",),
    "row-shrink-0.1": ("nested.sizes=[[1, 32], [2, 32], [2, 64]]", "nested.shrink_start=0.1"),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", choices=sorted(B.BUDGETS), default="medium")
    ap.add_argument("--env", default="Hopper-v5")
    ap.add_argument("--teacher-steps", type=int, default=500, help="Dense steps of the teacher's size that set the budget.")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default="base,t16-n256,n64,n256,scalers-x3,sandwich")
    ap.add_argument("--episodes", type=int, help="Rollout episodes per seed and size (default: the budget's).")
    ap.add_argument("--work", type=Path, help="Cache folder (default runs/dt-levers-<budget>-<env>-<teacher steps>).")
    ap.add_argument("--docs", type=Path, default=B.ROOT / "docs" / "control")
    ap.add_argument("--name", default="dt-levers", help="Output name: DOCS/NAME.{json,md}.")
    args = ap.parse_args()
    torch.set_num_threads(1)
    b = replace(B.BUDGETS[args.budget], teacher_steps=args.teacher_steps)
    episodes = args.episodes or b.episodes
    env = B.C.env_info(args.env)
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    work = args.work or B.ROOT / "runs" / f"dt-levers-{args.budget}-{args.env}-{args.teacher_steps}"
    work.mkdir(parents=True, exist_ok=True)
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    task = B.T.Control(budget=b.data, progress=say)
    splits = task.load_data(args.env, B.section(env, b), seed=0, val_fraction=0.1)
    adapter = get_adapter(B.FAMILY)
    teacher_arch = B.arch_at(env, b, *b.teacher)
    first = tuple(t[: b.batch_size] for t in splits.train.tensors)
    budget = B.step_flops(adapter.build(teacher_arch), task, first) * b.teacher_steps
    data_file = B.export_data(args.env, b, work / f"data-{args.env}.npz")
    depths, widths = B.nested_sizes(b)
    sizes = [(d, w) for d in depths for w in widths]
    largest, smallest = (max(depths), max(widths)), (min(depths), min(widths))
    say(f"budget: {b.teacher_steps} dense {teacher_arch.depth}×{teacher_arch.width} steps, {budget / 1e12:.4f} TFLOPs; sizes {sizes}")

    def rollouts(state, depth, width, seed):
        model = adapter.build(B.arch_at(env, b, depth, width))
        model.load_state_dict(state, strict=True)
        model.eval()
        policy = B.T.ContextPolicy(adapter.task_forward(model), splits.config)
        r = B.T.rollout(args.env, policy, target_return=splits.config["target_return"], episodes=episodes, seed=1000 * seed,
                        max_steps=b.max_steps)
        return {"scores": r.scores, "mean_score": statistics.fmean(r.scores)}

    def mse(state, depth, width):
        model = adapter.build(B.arch_at(env, b, depth, width))
        model.load_state_dict(state, strict=True)
        return task.evaluate(adapter.task_forward(model), splits.val).metric

    from weit_cli import recipe as rcp

    for name in variants:  # a variant the recipe refuses fails now, not after the runs before it
        rcp.load_recipe(B.RECIPE, B.pretrain_overrides(env, b, data_file, 1, 0, VARIANTS[name]))
    results = []
    seeds = [int(s) for s in args.seeds.split(",")]
    for seed in seeds:  # the dense reference of the same FLOPs
        def make_dense(seed=seed):
            torch.manual_seed(seed)
            model = adapter.build(teacher_arch)
            t0 = time.perf_counter()
            B.train(model, task, splits, steps=b.teacher_steps, lr=b.lr, seed=seed, batch_size=b.batch_size)
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return {"train_s": time.perf_counter() - t0, "val_action_mse": {f"{largest[0]}x{largest[1]}": mse(state, *largest)},
                    "return": {f"{largest[0]}x{largest[1]}": rollouts(state, *largest, seed)}, "flops": budget, "steps": b.teacher_steps}

        row = B.cached_json(work / f"dense-{seed}.json", f"dense-{b.teacher_steps}-{episodes}", make_dense)
        results.append({"variant": f"dense {teacher_arch.depth}×{teacher_arch.width}", "seed": seed, **row})
        say(json.dumps({"variant": "dense", "seed": seed, "mse": row["val_action_mse"], "return": row["return"][f"{largest[0]}x{largest[1]}"]["mean_score"]}))
    for name in variants:
        extra = VARIANTS[name]
        for seed in seeds:
            def make(seed=seed, extra=extra, name=name):
                steps, planned = B.pretrain_steps(env, b, data_file, task, first, budget, seed=seed, extra=extra)
                out = work / f"{name}-{seed}" / "bundle.safetensors"
                summary = B.run_pretrain(env, b, data_file, steps, out, 1, seed=seed, extra=extra)
                bundle, _ = load_bundle(out)
                scores, returns = {}, {}
                for d, w in sizes:
                    state = {k: v.detach().clone() for k, v in resize(bundle, plan_target(bundle, depth=d, width=w)).state_dict().items()}
                    scores[f"{d}x{w}"] = mse(state, d, w)
                    if (d, w) in (largest, smallest):
                        returns[f"{d}x{w}"] = rollouts(state, d, w, seed)
                return {"steps": summary["steps"], "flops": summary["train_flops"], "size_steps": summary["size_steps"],
                        "pretrain_s": summary["wall_s"], "overrides": list(extra), "val_action_mse": scores, "return": returns}

            row = B.cached_json(work / f"{name}-{seed}.json", f"{name}-{b.teacher_steps}-{episodes}-{list(extra)}", make)
            results.append({"variant": name, "seed": seed, **row})
            say(json.dumps({"variant": name, "seed": seed, "steps": row["steps"], "mse": row["val_action_mse"],
                            "return": {k: v["mean_score"] for k, v in row["return"].items()}}))
    args.docs.mkdir(parents=True, exist_ok=True)
    command = "benchmarks/dt_levers.py " + " ".join(sys.argv[1:])
    (args.docs / f"{args.name}.json").write_text(json.dumps({"command": command, "budget_flops": budget, "results": results}, indent=1) + "\n")
    md = table(results, sizes, largest, smallest, command)
    (args.docs / f"{args.name}.md").write_text(md)
    print(md)
    return 0


def _stat(v: list[float], digits: int) -> str:
    if not v:
        return "–"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{statistics.fmean(v):.{digits}f} ± {statistics.stdev(v):.{digits}f}"


def table(results: list[dict], sizes, largest, smallest, command: str) -> str:
    names = list(dict.fromkeys(r["variant"] for r in results))
    keys = [f"{d}x{w}" for d, w in sizes]
    head = ["variant", "steps", "TFLOPs", *(f"MSE {k.replace('x', '×')}" for k in keys),
            *(f"return {d}×{w}" for d, w in (largest, smallest))]
    lines = [f"    {command}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in names:
        rows = [r for r in results if r["variant"] == n]
        steps = sorted({r["steps"] for r in rows})
        cells = [n, ", ".join(map(str, steps)), f"{statistics.fmean(r['flops'] for r in rows) / 1e12:.3f}"]
        cells += [_stat([r["val_action_mse"][k] for r in rows if k in r["val_action_mse"]], 4) for k in keys]
        # the return: mean over seeds × episodes, spread over the seeds' means (as the ViT tables)
        cells += [_stat([r["return"][f"{d}x{w}"]["mean_score"] for r in rows if f"{d}x{w}" in r["return"]], 1) for d, w in (largest, smallest)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
