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
  (templates frozen, as `fit-scalers`), then composed and finetuned;
- `weit-pt`: a nested bundle trained by `weit pretrain` itself (recipes/dt-hopper.yaml with
  `--set` overrides, run as a subprocess with `--json`) on the same data, resized to the target
  exactly as `weit materialize` does (prefix/tile inside the nested range, interp/tile beyond) and
  composed; `weit-pt+fit`: the same bundle with the target's scalers fitted first.

The pretrained bundle. Its largest nested size is the teacher's (depth, width); the targets inside
the teacher's range give the smaller nested depths and widths (tiny: depths 1-2 × widths 16/32;
medium: depths 1-2 × widths 32/64). Same data as the teacher: the benchmark's built-in data (its
`--budget` data budget) is written once to a D4RL-layout .npz in --work and passed as
`data.source=ENV:FILE`, with the benchmark's split (seed 0, val_fraction 0.1), so the training and
validation windows and the state statistics are the teacher's. Same template size and count as
`weit`; the schedule that won for ViTs (nested.sampling=one-size, one_size_power=0: one size per
step, drawn uniformly; recipes/vit-fashion-small.yaml); the teacher's peak lr, batch and grad clip
(pretrain's own warm-up + cosine schedule, warm-up a tenth of the steps as the teacher's).
**Equal training compute**: the teacher's FLOPs are teacher_steps × one dense training step's FLOPs,
counted with torch's FlopCounterMode (forward and backward of the action loss on one batch, as
benchmarks/_flops.py counts images); the bundle's are what `weit pretrain` reports as `train_flops`
(the same counter, per nested size on one batch, the composition of the weights from the templates
included, times the steps each size is drawn, replayed from the seed). `train.steps` is chosen as
the step count whose `train_flops` is nearest the teacher's (the same replay, run here before
training); both numbers are in results.json (`flops`). The largest size straight from the bundle
(no finetuning) is rolled out against the teacher (`largest_vs_teacher`: seeds × episodes each).

Transfer (`--finetune-env`): the teacher and the bundle are trained on `--env`, finetuning and all
rollouts (the largest-vs-teacher comparison excepted, which stays on `--env`) use another task's
built-in data and environment. It needs the same observation and action sizes: of the environments
weit knows (data/envs.py), HalfCheetah-v5 and Walker2d-v5 are both 17/6 and form the only such
pair; Hopper-v5 (11/3) has none, and is refused.

Score: D4RL's normalised return, 100·(R − R_random)/(R_expert − R_random) with the repository's
reference returns, mean and spread over seeds × episodes, against finetuning steps; the rollout
evaluation time is reported.

    python benchmarks/control.py --budget tiny            # under two minutes: proves the pipeline, no claims
    python benchmarks/control.py --budget medium --env Hopper-v5   # about an hour of one core (4 methods, 54 min) + the weit-pt ones
    python benchmarks/control.py --budget medium --env HalfCheetah-v5 --finetune-env Walker2d-v5   # transfer
    python benchmarks/control.py --budget small --env Hopper-v5

Stages are cached in --work (stages/: the teacher, the pretrained bundle, the largest-vs-teacher
rollouts and one file per size × method), keyed by the settings, so an interrupted run continues
and `--methods` can add methods to a finished run. Outputs (in --work, default
runs/control-<budget>-<env>[-to-<finetune env>]): results.json and control.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from weit_cli.arch._registry import get_adapter  # noqa: E402
from weit_cli.core.bundle import COMPANIONS  # noqa: E402
from weit_cli.core.extract import from_dense  # noqa: E402
from weit_cli.core.resize import plan_target, resize  # noqa: E402
from weit_cli.io.bundle_file import load_bundle  # noqa: E402
from weit_cli.io.files import atomic_file  # noqa: E402
from weit_cli.core.selection import random_init, weight_selection  # noqa: E402
from weit_cli.data import control as C  # noqa: E402
from weit_cli.tasks import control as T  # noqa: E402
from weit_cli.training.batches import Batches  # noqa: E402
from weit_cli.training.loop import Loop, Plan  # noqa: E402

FAMILY = "decision-transformer"
METHODS = ("random", "selection", "weit", "weit+fit", "weit-pt", "weit-pt+fit")
PRETRAINED = ("weit-pt", "weit-pt+fit")  # the methods that need `weit pretrain`'s bundle
RECIPE = ROOT / "recipes" / "dt-hopper.yaml"  # the DT recipe the bundle is trained from, with --set overrides


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
    call = get_adapter(FAMILY).task_forward(model)  # the family's call convention (the window's five tensors)
    loop = Loop(
        Plan(total_steps=steps, lr=lambda s: lr * min(1.0, (s + 1) / max(1, steps // 10)), grad_clip=0.25, eval_every=every),
        optimizer=opt, params=params, batches=Batches(splits.train, batch_size, seed=seed), device=torch.device("cpu"),
        loss_step=lambda batch: task.train_loss(call, batch), evaluate=(lambda done: evaluate(done) or {}) if evaluate else None,
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
        call = lambda *xs: torch.func.functional_call(module, trained.state_dict(), xs, strict=True)  # noqa: E731
        return adapter.apply(call, *inputs)

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


def initial_state(method, target, teacher_arch, teacher_state, b, task, splits, seed, pretrained=None):
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
    if method in PRETRAINED:  # materialize's default rules: prefix/tile inside the nested range, interp beyond
        bundle = pretrained
    else:
        bundle, _ = from_dense(adapter, teacher_arch, teacher_state, b.head_dim, b.templates)
    sized = resize(bundle, plan_target(bundle, depth=target.depth, width=target.width))
    if method in ("weit", "weit-pt"):
        return {k: v.detach().clone() for k, v in sized.state_dict().items()}, method
    return fit_scalers(sized, task, splits, steps=b.fit_steps, lr=1e-3, seed=seed, batch_size=b.batch_size), method


def pool(results: list) -> "T.RolloutResult":
    """Several rollout results of one environment as one (training seeds × episodes): the episodes
    one after the other, wall times summed (weit itself never pools: a benchmark's need)."""
    assert results and len({r.env_id for r in results}) == 1, "pool one environment's results"
    return T.RolloutResult(
        env_id=results[0].env_id, target_return=results[0].target_return,
        returns=[x for r in results for x in r.returns], lengths=[x for r in results for x in r.lengths],
        scores=[x for r in results for x in r.scores], wall_s=sum(r.wall_s for r in results),
    )


# ------------------------------------------------------------------------------------------ stages
def cached_json(path: Path, key: str, make):
    """A stage's JSON result from `path` when it was made with the same `key`, else made and stored."""
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return stored["value"]
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:  # a temp name of its own: processes sharing --work do not collide
        tmp.write_text(json.dumps({"key": key, "value": value}, indent=1) + "\n")
    return value


def step_flops(model, task, batch) -> int:
    """FLOPs of one dense training step (forward and backward of the action loss on `batch`), counted
    with torch's FlopCounterMode as benchmarks/_flops.py and `weit pretrain` count."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.random.fork_rng(), FlopCounterMode(display=False) as fc:
        task.train_loss(get_adapter(FAMILY).task_forward(model), task.prepare(batch)).backward()
    model.zero_grad(set_to_none=True)
    return int(fc.get_total_flops())


def nested_sizes(b: Budget) -> tuple[list[int], list[int]]:
    """The bundle's nested depths and widths: the teacher's size the largest, the targets inside its
    range the smaller ones (the targets beyond are grown from the bundle, as `weit` grows them)."""
    inside = [(d, w) for d, w in b.sizes if d <= b.teacher[0] and w <= b.teacher[1]]
    return sorted({b.teacher[0], *(d for d, _ in inside)}), sorted({b.teacher[1], *(w for _, w in inside)})


def pretrain_overrides(env: C.EnvInfo, b: Budget, data_file: Path, steps: int, seed: int = 0, extra: tuple[str, ...] = ()) -> list[str]:
    """recipes/dt-hopper.yaml made this benchmark's: its model sizes, data and split, template size and
    count, nested sizes, the schedule that won for ViTs, and the teacher's optimiser settings; `extra`
    overrides last (benchmarks/dt_levers.py's variants)."""
    depths, widths = nested_sizes(b)
    return [
        f"model.state_dim={env.obs_dim}", f"model.act_dim={env.act_dim}", f"model.context={b.context}",
        f"model.head_dim={b.head_dim}",
        f"templates.size={b.head_dim}", f"templates.count={b.templates}",
        f"nested.depths=[{','.join(map(str, depths))}]", f"nested.widths=[{','.join(map(str, widths))}]",
        "nested.sampling=one-size", "nested.one_size_power=0", "nested.distill=0.0",
        f"data.source={env.env_id}:{data_file}", "data.val_fraction=0.1", f"data.batch_size={b.batch_size}",
        f"train.steps={steps}", f"train.lr={b.lr}", f"train.warmup_steps={max(1, steps // 10)}",
        "train.eval_every=0", "train.checkpoint_every=0", f"seed={seed}", *extra,
    ]


def pretrain_steps(env: C.EnvInfo, b: Budget, data_file: Path, task, batch, flops_target: int, seed: int = 0,
                   extra: tuple[str, ...] = ()) -> tuple[int, int]:
    """The `train.steps` whose `train_flops` (the product's own count: per nested size on one batch,
    replayed from the seed) is nearest `flops_target`; and that count."""
    from weit_cli import recipe as rcp
    from weit_cli.training.nested import NestedModel, count_size_flops, initial_bundle, size_grid, train_flops

    recipe = rcp.load_recipe(RECIPE, pretrain_overrides(env, b, data_file, 1, seed, extra))
    with torch.random.fork_rng():
        net = NestedModel(initial_bundle(recipe, None))
        per_size = count_size_flops(net, task, batch, size_grid(recipe))

    def total(n):
        recipe.train.steps = n
        return train_flops(recipe, per_size)["train_flops"]

    lo, hi = 1, 2
    while total(hi) < flops_target:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # the replay of n steps is a prefix of that of n + 1: monotone in n
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total(mid) <= flops_target else (lo, mid)
    steps = min((lo, hi), key=lambda n: abs(total(n) - flops_target))
    return steps, total(steps)


def run_pretrain(env: C.EnvInfo, b: Budget, data_file: Path, steps: int, out: Path, threads: int, seed: int = 0,
                 extra: tuple[str, ...] = ()) -> dict:
    """`weit pretrain RECIPE --set … --json` as a subprocess (one thread); its JSON summary."""
    cmd = [sys.executable, "-m", "weit_cli.cli", "pretrain", str(RECIPE), "-o", str(out), "--device", "cpu", "--force", "--json"]
    for o in pretrain_overrides(env, b, data_file, steps, seed, extra):
        cmd += ["--set", o]
    out.parent.mkdir(parents=True, exist_ok=True)
    child_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=child_env, stdout=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"weit pretrain failed (exit {done.returncode}): {done.stdout.strip()[-2000:]}")
    summary = json.loads(done.stdout)
    summary["argv"] = ["weit", *cmd[3:]]
    return summary


def export_data(env_id: str, b: Budget, path: Path) -> Path:
    """The benchmark's built-in data (its data budget) as one D4RL-layout .npz for `weit pretrain`."""
    import numpy as np

    if not path.is_file():
        data = C.load_control_data(env_id, seed=0, budget=b.data)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp, open(tmp, "wb") as f:  # seeds run as parallel processes export it at once
            np.savez(f, **{k: getattr(data, k) for k in C.KEYS})
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="tiny")
    ap.add_argument("--env", default="Hopper-v5", choices=sorted(C.ENVIRONMENTS), help="Environment of the teacher's and the bundle's data.")
    ap.add_argument("--finetune-env", choices=sorted(C.ENVIRONMENTS),
                    help="Finetune and roll out on this environment's data instead (same observation and action sizes as --env).")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--work", type=Path, help="Output folder (default runs/control-<budget>-<env>[-to-<finetune env>]).")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared: 1 by default).")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    b, env = BUDGETS[args.budget], C.env_info(args.env)
    ft_id = args.finetune_env or args.env
    ft_env = C.env_info(ft_id)
    if (ft_env.obs_dim, ft_env.act_dim) != (env.obs_dim, env.act_dim):
        same = [e for e in C.ENVIRONMENTS.values() if e.env_id != env.env_id and (e.obs_dim, e.act_dim) == (env.obs_dim, env.act_dim)]
        ap.error(f"{ft_id} has {ft_env.obs_dim} observations and {ft_env.act_dim} actions, {args.env} {env.obs_dim} and {env.act_dim}; "
                 f"environments of {args.env}'s sizes: {', '.join(e.env_id for e in same) or 'none'}")
    suffix = f"-to-{ft_id}" if ft_id != args.env else ""
    work = args.work or ROOT / "runs" / f"control-{args.budget}-{args.env}{suffix}"
    stages = work / "stages"
    stages.mkdir(parents=True, exist_ok=True)
    # One key for every stage: the settings and environments (a changed budget recomputes everything).
    key = hashlib.sha256(json.dumps([_jsonable(asdict(b)), args.env, ft_id], sort_keys=True).encode()).hexdigest()[:16]
    pre_key = hashlib.sha256(json.dumps([_jsonable(asdict(b)), args.env], sort_keys=True).encode()).hexdigest()[:16]
    t_start = time.perf_counter()

    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    task = T.Control(budget=b.data, progress=say)
    splits = task.load_data(args.env, section(env, b), seed=0, val_fraction=0.1)
    say(splits.description)
    ft_splits = splits if ft_id == args.env else task.load_data(ft_id, section(ft_env, b), seed=0, val_fraction=0.1)
    if ft_splits is not splits:
        say(f"finetuning on {ft_splits.description}")
    adapter = get_adapter(FAMILY)
    teacher_arch = arch_at(env, b, *b.teacher)
    first = tuple(t[: b.batch_size] for t in splits.train.tensors)

    # -------------------------------------------------------------------------------- the teacher
    teacher_file = stages / "teacher.pt"
    stored = torch.load(teacher_file, weights_only=True) if teacher_file.is_file() else None
    if stored is not None and stored.get("key") == pre_key:
        teacher_state, teacher_s = stored["state"], float(stored["train_s"])
        teacher = adapter.build(teacher_arch)
        teacher.load_state_dict(teacher_state, strict=True)
        say(f"teacher {b.teacher}: cached ({teacher_file})")
    else:
        torch.manual_seed(0)
        teacher = adapter.build(teacher_arch)
        t0 = time.perf_counter()
        train(teacher, task, splits, steps=b.teacher_steps, lr=b.lr, seed=0, batch_size=b.batch_size)
        teacher_s = time.perf_counter() - t0
        teacher_state = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
        torch.save({"key": pre_key, "train_s": teacher_s, "state": teacher_state}, teacher_file)
    teacher_mse = task.evaluate(adapter.task_forward(teacher), splits.val).metric
    dense_step = step_flops(adapter.build(teacher_arch), task, first)
    flops = {"teacher_step_flops": dense_step, "teacher_steps": b.teacher_steps, "teacher_train_flops": dense_step * b.teacher_steps,
             "counted_with": "torch.utils.flop_counter.FlopCounterMode, forward + backward of one batch"}
    say(f"teacher {b.teacher}: {b.teacher_steps} steps in {teacher_s:.0f}s, val action MSE {teacher_mse:.4f}, "
        f"{flops['teacher_train_flops'] / 1e12:.4f} TFLOPs")

    def score(model, seed, env_id=ft_id, config=None):
        policy = T.ContextPolicy(adapter.task_forward(model), config or ft_splits.config)
        r = T.rollout(env_id, policy, target_return=(config or ft_splits.config)["target_return"], episodes=b.episodes,
                      seed=1000 * seed, max_steps=b.max_steps)
        model.train()
        return r

    # ------------------------------------------------------------------------ the pretrained bundle
    pretrained, pretrain_info, largest = None, None, None
    if any(m in PRETRAINED for m in methods):
        data_file = export_data(args.env, b, stages / f"data-{args.env}-{pre_key}.npz")
        bundle_file = stages / "pretrain" / "bundle.safetensors"

        def make_pretrain():
            steps, planned = pretrain_steps(env, b, data_file, task, first, flops["teacher_train_flops"])
            say(f"weit pretrain: {steps} steps planned for {planned / 1e12:.4f} TFLOPs (teacher {flops['teacher_train_flops'] / 1e12:.4f})")
            summary = run_pretrain(env, b, data_file, steps, bundle_file, args.threads)
            return {"planned_steps": steps, "planned_train_flops": planned, "summary": summary}

        pretrain_info = cached_json(stages / "pretrain.json", pre_key, make_pretrain)
        if not bundle_file.is_file():  # the summary without its bundle: train again
            (stages / "pretrain.json").unlink()
            pretrain_info = cached_json(stages / "pretrain.json", pre_key, make_pretrain)
        summary = pretrain_info["summary"]
        flops["bundle_train_flops"] = summary["train_flops"]
        flops["bundle_steps"] = summary["steps"]
        flops["bundle_size_steps"] = summary["size_steps"]
        flops["bundle_over_teacher"] = summary["train_flops"] / flops["teacher_train_flops"]
        pretrained, _ = load_bundle(bundle_file)
        if pretrained.arch != teacher_arch:
            raise SystemExit(f"the pretrained bundle's largest size {pretrained.arch} is not the teacher's {teacher_arch}")
        cfg = (pretrained.extra.get(COMPANIONS) or {}).get(T.CONFIG_FILE)
        same = cfg is not None and cfg["target_return"] == splits.config["target_return"] and all(
            abs(float(x) - float(y)) < 1e-5 for k in ("state_mean", "state_std") for x, y in zip(cfg[k], splits.config[k]))
        if not same:  # the bundle saw other data or another split than the teacher: not a fair comparison
            raise SystemExit("the pretrained bundle's control config (data, split, state statistics) is not the benchmark's")
        v = summary.get("val") or {}
        say(f"weit pretrain: {summary['steps']} steps in {summary['wall_s']:.0f}s, {summary['train_flops'] / 1e12:.4f} TFLOPs "
            f"({flops['bundle_over_teacher']:.3f}× the teacher's), sizes {summary['size_steps']}, "
            f"val action MSE largest {v.get('val_action_mse_largest', float('nan')):.4f} smallest {v.get('val_action_mse_smallest', float('nan')):.4f}")

        def make_largest():  # the largest size straight from the bundle vs the teacher, on the pretraining env
            out = {}
            state = {k: v.detach().clone() for k, v in pretrained.state_dict().items()}
            for name, st in (("teacher", teacher_state), ("bundle_largest", state)):
                model = adapter.build(teacher_arch)
                model.load_state_dict(st, strict=True)
                runs = [score(model, seed, args.env, splits.config) for seed in range(b.seeds)]
                pooled = pool(runs)
                out[name] = {"val_action_mse": task.evaluate(adapter.task_forward(model), splits.val).metric, "mean_score": pooled.mean_score,
                             "std_score": pooled.std_score, "episodes": len(pooled.scores), "runs": [r.summary() for r in runs]}
            return out

        largest = cached_json(stages / "largest.json", pre_key, make_largest)
        for name in ("teacher", "bundle_largest"):
            r = largest[name]
            say(f"{args.env} {b.teacher[0]}×{b.teacher[1]} {name:14s} val action MSE {r['val_action_mse']:.4f}, "
                f"score {r['mean_score']:.1f} ± {r['std_score']:.1f} ({r['episodes']} episodes)")

    # ------------------------------------------------------------------------- finetuning, per size
    results = []
    for depth, width in b.sizes:
        target = arch_at(ft_env, b, depth, width)
        where = "inside" if depth <= b.teacher[0] and width <= b.teacher[1] else "beyond"
        for method in methods:
            def make_row(method=method, target=target, depth=depth, width=width, where=where):
                per_seed = []
                for seed in range(b.seeds):
                    state, label = initial_state(method, target, teacher_arch, teacher_state, b, task, ft_splits, seed, pretrained)
                    model = adapter.build(target)
                    model.load_state_dict(state, strict=True)
                    curve = {0: score(model, seed)}
                    losses = train(model, task, ft_splits, steps=b.steps, lr=b.lr, seed=seed, batch_size=b.batch_size,
                                   evaluate=lambda done, m=model, s=seed: curve.__setitem__(done, score(m, s)), every=b.every)
                    curve[b.steps] = score(model, seed)
                    per_seed.append({"seed": seed, "curve": {k: v.summary() for k, v in sorted(curve.items())}, "final_loss": losses[-1]})
                steps = sorted(per_seed[0]["curve"])
                pooled = {s: pool([_result(p["curve"][s]) for p in per_seed]) for s in steps}
                return {
                    "size": {"depth": depth, "width": width, "where": where}, "method": label, "env_id": ft_id,
                    "steps": steps,
                    "mean_score": [pooled[s].mean_score for s in steps],
                    "std_score": [pooled[s].std_score for s in steps],
                    "episodes": len(pooled[steps[-1]].scores),
                    "seeds": per_seed,
                }

            # a row from the bundle is kept only as long as the bundle is the same (its templates' digest)
            row_key = key + ("-" + pretrain_info["summary"]["templates_sha256_by_rank"][0][:16] if method in PRETRAINED else "")
            row = cached_json(stages / "rows" / f"{depth}x{width}-{method}.json", row_key, make_row)
            results.append(row)
            say(f"{ft_id} depth {depth} width {width} ({where}) {row['method']:11s} score " + " → ".join(f"{m:.1f}" for m in row["mean_score"]))

    runs = [c for r in results for p in r["seeds"] for c in p["curve"].values()]
    if largest is not None:
        runs += [run for name in ("teacher", "bundle_largest") for run in largest[name]["runs"]]
    wall, episodes, env_steps = sum(r["wall_s"] for r in runs), sum(r["episodes"] for r in runs), sum(sum(r["lengths"]) for r in runs)
    timing = {
        "rollout_s_per_episode": wall / max(1, episodes),
        "rollout_ms_per_step": 1000 * wall / max(1, env_steps),
        "rollout_s_total": wall,
        "teacher_train_s": teacher_s,
        "pretrain_s": pretrain_info["summary"]["wall_s"] if pretrain_info else None,
        "total_s": time.perf_counter() - t_start,
        "note": "rollout and training times of cached stages are those of the run that made them; total_s is this run's",
    }
    out = {
        "env_id": args.env, "finetune_env_id": ft_id, "budget": args.budget, "settings": _jsonable(asdict(b)), "data": splits.description,
        "finetune_data": ft_splits.description,
        "reference": {"r_random": ft_env.r_random, "r_expert": ft_env.r_expert}, "timing": timing,
        "teacher": {"depth": b.teacher[0], "width": b.teacher[1], "val_action_mse": teacher_mse},
        "flops": flops,
        "pretrain": None if pretrain_info is None else {
            "nested": dict(zip(("depths", "widths"), nested_sizes(b))), "recipe": str(RECIPE.relative_to(ROOT)),
            "argv": pretrain_info["summary"]["argv"], "planned_steps": pretrain_info["planned_steps"],
            "planned_train_flops": pretrain_info["planned_train_flops"],
            **{k: pretrain_info["summary"].get(k) for k in ("steps", "train_flops", "size_steps", "val", "final_loss", "params", "wall_s")},
        },
        "largest_vs_teacher": None if largest is None else {
            "env_id": args.env, **{n: {k: v for k, v in largest[n].items() if k != "runs"} for n in ("teacher", "bundle_largest")},
            "difference": largest["bundle_largest"]["mean_score"] - largest["teacher"]["mean_score"],
        },
        "results": results,
        "torch_threads": torch.get_num_threads(),
    }
    (work / "results.json").write_text(json.dumps(out, indent=1) + "\n")
    where = f"{args.env} → {ft_id}" if ft_id != args.env else args.env
    plot(results, work / "control.png", f"{where}, budget {args.budget}: {b.seeds} seeds × {b.episodes} episodes")
    say(f"rollouts: {timing['rollout_s_per_episode']:.2f} s/episode, {timing['rollout_ms_per_step']:.2f} ms/step; "
        f"total {timing['total_s']:.0f}s; wrote {work}/results.json and control.png")


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
