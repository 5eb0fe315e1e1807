"""Decision Transformers on MuJoCo: how well each initialisation finetunes, by normalised return.

For one environment's built-in offline data (data/control.py) and sizes inside and beyond the range
a teacher covers, every method initialises a dense DT, which is then finetuned with the control
task (tasks/control.py, the staged loop) and rolled out at fixed steps:

- `random`: the family's own initialisation;
- `selection`: weight selection from the teacher (sizes inside its range), or `grown`: the teacher
  grown losslessly (full-rank templates, tiled width, identity depth; sizes beyond it);
- `weit`: templates extracted from the teacher by shared SVD (`extract-templates`, `--budget`'s
  count, below full rank), resized to the target by the rules of docs/method.md §4, composed;
- `weit+fit`: the same, with the target's scalers and small parameters fitted first on the data
  (templates frozen, as `fit-scalers`), then composed and finetuned.

Score: D4RL's normalised return, 100·(R − R_random)/(R_expert − R_random) with the repository's
reference returns, mean and spread over seeds × episodes, against finetuning steps; the rollout
evaluation time is reported. The teacher is a dense DT trained here on the same data; once
`weit pretrain` takes control recipes (recipes/dt-*.yaml), the nested bundle replaces it.

    python benchmarks/control.py --budget tiny            # a minute: proves the pipeline, no claims
    python benchmarks/control.py --budget medium --env Hopper-v5   # under an hour of one core
    python benchmarks/control.py --budget small --env Hopper-v5

Outputs (in --work, default runs/control-<budget>-<env>): results.json and control.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from weit_cli.arch._registry import get_adapter  # noqa: E402
from weit_cli.core.extract import from_dense  # noqa: E402
from weit_cli.core.resize import plan_target, resize  # noqa: E402
from weit_cli.core.selection import random_init, weight_selection  # noqa: E402
from weit_cli.data import control as C  # noqa: E402
from weit_cli.tasks import control as T  # noqa: E402
from weit_cli.training.batches import Batches  # noqa: E402
from weit_cli.training.loop import Loop, Plan  # noqa: E402

FAMILY = "decision-transformer"
METHODS = ("random", "selection", "weit", "weit+fit")


@dataclass(frozen=True)
class Budget:
    data: C.Budget
    context: int
    head_dim: int
    teacher: tuple[int, int]  # (depth, width) of the dense teacher
    teacher_steps: int
    templates: int  # per type, below full rank (head_dim²)
    sizes: tuple[tuple[int, int], ...]  # (depth, width) targets: inside and beyond the teacher
    steps: int  # finetuning steps
    every: int  # rollouts every N steps (and at 0 and the end)
    fit_steps: int
    seeds: int
    episodes: int
    max_steps: int | None  # rollout cut (None: the environment's 1000)
    batch_size: int = 64
    lr: float = 6e-4


BUDGETS = {
    # Seconds per piece: proves the code path, says nothing about quality.
    "tiny": Budget(
        data=C.Budget(ppo_steps=2048, checkpoints=2, steps_per_quality=1000, eval_episodes=1),
        context=10, head_dim=16, teacher=(2, 32), teacher_steps=60, templates=64,
        sizes=((1, 16), (3, 48)), steps=40, every=20, fit_steps=20, seeds=3, episodes=2, max_steps=50, batch_size=32,
    ),
    # Under an hour of one shared core: the default PPO data, a 2×64 teacher, one size inside its range
    # and one beyond, 500 finetuning steps; 3 seeds × 10 full episodes at 0, 250 and 500 steps.
    "medium": Budget(
        data=C.Budget(), context=20, head_dim=32, teacher=(2, 64), teacher_steps=1500, templates=128,
        sizes=((1, 32), (3, 96)), steps=500, every=250, fit_steps=150, seeds=3, episodes=10, max_steps=None,
    ),
    # Hours on 2 cores: the DT paper's model size and context, PPO data of the default budget.
    "small": Budget(
        data=C.Budget(), context=20, head_dim=32, teacher=(3, 128), teacher_steps=5000, templates=256,
        sizes=((2, 96), (3, 128), (4, 192)), steps=3000, every=500, fit_steps=300, seeds=3, episodes=10, max_steps=None,
    ),
}


def section(env: C.EnvInfo, b: Budget):
    return get_adapter(FAMILY).model_section(family=FAMILY, state_dim=env.obs_dim, act_dim=env.act_dim, context=b.context, head_dim=b.head_dim)


def arch_at(env: C.EnvInfo, b: Budget, depth: int, width: int):
    return get_adapter(FAMILY).arch_for_recipe(section(env, b), depth=depth, width=width)


def train(model, task, splits, *, steps, lr, seed, batch_size, evaluate=None, every=0):
    """Dense training through the staged loop; `evaluate(step)` every `every` steps."""
    torch.manual_seed(seed)
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=1e-4)
    model.train()
    loop = Loop(
        Plan(total_steps=steps, lr=lambda s: lr * min(1.0, (s + 1) / max(1, steps // 10)), grad_clip=0.25, eval_every=every),
        optimizer=opt, params=params, batches=Batches(splits.train, batch_size, seed=seed), device=torch.device("cpu"),
        loss_step=lambda batch: task.train_loss(model, batch), evaluate=(lambda done: evaluate(done) or {}) if evaluate else None,
    )
    loop.run()
    return loop.losses


def fit_scalers(bundle, task, splits, *, steps, lr, seed, batch_size):
    """Templates frozen; the target's scalers and small parameters trained through the composed
    forward (what `fit-scalers` does), then composed into a dense state."""
    adapter = bundle.adapter
    module = adapter.build(bundle.arch)
    scalers = {k: v.detach().clone().requires_grad_(True) for k, v in bundle.scalers.items()}
    small = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in bundle.small.items()}
    trained = replace(bundle, scalers=scalers, small=small)

    def forward(*inputs):
        return torch.func.functional_call(module, trained.state_dict(), inputs, strict=True)

    params = {**{f"s.{k}": v for k, v in scalers.items()}, **{f"m.{k}": v for k, v in small.items() if v.requires_grad}}
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    module.train()
    loop = Loop(Plan(total_steps=steps, lr=lambda s: lr, grad_clip=1.0), optimizer=opt, params=params,
                batches=Batches(splits.train, batch_size, seed=seed), device=torch.device("cpu"),
                loss_step=lambda batch: task.train_loss(forward, batch))
    loop.run()
    with torch.no_grad():
        return {k: v.detach().clone() for k, v in trained.state_dict().items()}


def initial_state(method, target, teacher_arch, teacher_state, b, task, splits, seed):
    adapter = get_adapter(FAMILY)
    fresh = random_init(adapter, target, seed)
    if method == "random":
        return fresh, "random"
    inside = target.depth <= teacher_arch.depth and target.width <= teacher_arch.width
    if method == "selection":
        if inside:
            return weight_selection(teacher_state, teacher_arch, target, fresh), "selection"
        full, _ = from_dense(adapter, teacher_arch, teacher_state, b.head_dim, b.head_dim**2)
        grown = resize(full, plan_target(full, depth=target.depth, width=target.width), "identity", "tile")
        return {k: v.detach().clone() for k, v in grown.state_dict().items()}, "grown"
    bundle, _ = from_dense(adapter, teacher_arch, teacher_state, b.head_dim, b.templates)
    sized = resize(bundle, plan_target(bundle, depth=target.depth, width=target.width))
    if method == "weit":
        return {k: v.detach().clone() for k, v in sized.state_dict().items()}, "weit"
    return fit_scalers(sized, task, splits, steps=b.fit_steps, lr=1e-3, seed=seed, batch_size=b.batch_size), "weit+fit"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="tiny")
    ap.add_argument("--env", default="Hopper-v5", choices=sorted(C.ENVIRONMENTS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--work", type=Path, help="Output folder (default runs/control-<budget>-<env>).")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared: 1 by default).")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    b, env = BUDGETS[args.budget], C.env_info(args.env)
    work = args.work or ROOT / "runs" / f"control-{args.budget}-{args.env}"
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    task = T.Control(budget=b.data, progress=say)
    splits = task.load_data(args.env, section(env, b), seed=0, val_fraction=0.1)
    say(splits.description)
    adapter = get_adapter(FAMILY)
    teacher_arch = arch_at(env, b, *b.teacher)
    torch.manual_seed(0)
    teacher = adapter.build(teacher_arch)
    t0 = time.perf_counter()
    train(teacher, task, splits, steps=b.teacher_steps, lr=b.lr, seed=0, batch_size=b.batch_size)
    teacher_s = time.perf_counter() - t0
    teacher_state = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
    say(f"teacher {b.teacher}: {b.teacher_steps} steps in {teacher_s:.0f}s, val action MSE {task.evaluate(teacher, splits.val).metric:.4f}")

    rollout_s, rollout_steps = [], []

    def score(model, seed):
        policy = T.ContextPolicy(model, splits.config)
        r = T.rollout(args.env, policy, target_return=splits.config["target_return"], episodes=b.episodes, seed=1000 * seed, max_steps=b.max_steps)
        model.train()
        rollout_s.append(r.wall_s)
        rollout_steps.append(sum(r.lengths))
        return r

    results = []
    for depth, width in b.sizes:
        target = arch_at(env, b, depth, width)
        where = "inside" if depth <= b.teacher[0] and width <= b.teacher[1] else "beyond"
        for method in args.methods.split(","):
            per_seed = []
            for seed in range(b.seeds):
                state, label = initial_state(method, target, teacher_arch, teacher_state, b, task, splits, seed)
                model = adapter.build(target)
                model.load_state_dict(state, strict=True)
                curve = {0: score(model, seed)}
                losses = train(model, task, splits, steps=b.steps, lr=b.lr, seed=seed, batch_size=b.batch_size,
                               evaluate=lambda done, m=model, s=seed: curve.__setitem__(done, score(m, s)), every=b.every)
                curve[b.steps] = score(model, seed)
                per_seed.append({"seed": seed, "curve": {k: v.summary() for k, v in sorted(curve.items())}, "final_loss": losses[-1]})
            steps = sorted(per_seed[0]["curve"])
            pooled = {s: T.pool([_result(p["curve"][s]) for p in per_seed]) for s in steps}
            row = {
                "size": {"depth": depth, "width": width, "where": where}, "method": label,
                "steps": steps,
                "mean_score": [pooled[s].mean_score for s in steps],
                "std_score": [pooled[s].std_score for s in steps],
                "episodes": len(pooled[steps[-1]].scores),
                "seeds": per_seed,
            }
            results.append(row)
            say(f"{args.env} depth {depth} width {width} ({where}) {label:9s} score " + " → ".join(f"{m:.1f}" for m in row["mean_score"]))

    timing = {
        "rollout_s_per_episode": statistics.mean(rollout_s) / b.episodes,
        "rollout_ms_per_step": 1000 * sum(rollout_s) / max(1, sum(rollout_steps)),
        "rollout_s_total": sum(rollout_s),
        "teacher_train_s": teacher_s,
        "total_s": time.perf_counter() - t_start,
    }
    out = {
        "env_id": args.env, "budget": args.budget, "settings": _jsonable(asdict(b)), "data": splits.description,
        "reference": {"r_random": env.r_random, "r_expert": env.r_expert}, "timing": timing, "results": results,
        "torch_threads": torch.get_num_threads(),
    }
    (work / "results.json").write_text(json.dumps(out, indent=1) + "\n")
    plot(results, work / "control.png", f"{args.env}, budget {args.budget}: {b.seeds} seeds × {b.episodes} episodes")
    say(f"rollouts: {timing['rollout_s_per_episode']:.2f} s/episode, {timing['rollout_ms_per_step']:.2f} ms/step; wrote {work}/results.json and control.png")


def _result(summary: dict) -> T.RolloutResult:
    return T.RolloutResult(summary["env_id"], summary["target_return"], summary["returns"], summary["lengths"], summary["normalized_scores"], summary["wall_s"])


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def plot(results, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({(r["size"]["depth"], r["size"]["width"], r["size"]["where"]) for r in results})
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 3.4), squeeze=False, sharey=True)
    for ax, (d, w, where) in zip(axes[0], sizes):
        for r in results:
            if (r["size"]["depth"], r["size"]["width"]) != (d, w):
                continue
            m, s = r["mean_score"], r["std_score"]
            ax.plot(r["steps"], m, marker="o", label=r["method"])
            ax.fill_between(r["steps"], [a - e for a, e in zip(m, s)], [a + e for a, e in zip(m, s)], alpha=0.15)
        ax.set_title(f"depth {d}, width {w} ({where})")
        ax.set_xlabel("finetuning steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("normalised return (mean ± std)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
