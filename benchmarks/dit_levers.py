"""The DiT recipe's levers at equal steps (issue 19): template count per type (32 / 128 / all 256) and
the EMA of the weights, on the recipe's largest size (4×64) trained alone, 3 seeds, one CPU thread;
beside it the same DiT trained dense from random init (`weit finetune --init random`) for as many
steps at the same batch, learning rate, warm-up and cosine schedule.

    OMP_NUM_THREADS=1 python benchmarks/dit_levers.py --work runs/dit-levers --steps 800 --warmup 40 --score 300

Every pretraining run keeps an EMA (train.ema.decay, warm-up power 0.75), so one run gives both
arms: `val_raw` (the last weights) and `val` (the EMA weights, which are written); test loss is the
written (EMA) weights' on the 10 000 official test images (fixed noise and timesteps, EVAL_SEED).
The template count changes only the cost of composing the weights (Σ S ⊗ T, once per step), not the
DiT's forward: equal steps are equal FLOPs up to that term (reported as compose_flops_share).

Results go to docs/generation/dit-levers.json and .md; each run's JSON is kept under --work, so a
rerun continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "dit-fashion.yaml"
OUT = ROOT / "docs" / "generation"
PY = [sys.executable, "-m", "weit_cli.cli"]


def weit(*args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([*PY, *args, "--json"], capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"weit {' '.join(args)} failed: {p.stdout[-500:]} {p.stderr[-1500:]}")
    return json.loads([line for line in p.stdout.splitlines() if line.startswith("{")][-1])


def test_loss(folder: Path) -> float:
    """The denoising loss of a materialized DiT on the official test split (tasks/generation.py)."""
    from weit_cli.commands.sample import _load
    from weit_cli.tasks.generation import Generation

    adapter, arch, module = _load(folder)
    task = Generation()
    splits = task.load_data("fashion-mnist", arch, seed=0)
    return task.evaluate(adapter.task_forward(module), splits.test, batch_size=500).loss


def weit_run(work: Path, count: int, seed: int, a) -> dict:
    out = work / f"weit{a.tag and '-' + a.tag}-n{count}-s{seed}"
    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    # --nested keeps the recipe's nested sizes (the shipped schedule); otherwise the largest size alone
    alone = [] if a.nested else [f"nested.depths=[{a.depth}]", f"nested.widths=[{a.width}]"]
    sets = [*alone, f"templates.count={count}", f"seed={seed}", *a.overrides,
            f"train.steps={a.steps}", f"train.lr={a.lr}", f"train.warmup_steps={a.warmup}", f"data.batch_size={a.batch}",
            "train.eval_every=0", "train.checkpoint_every=0", f"train.ema.decay={a.ema_decay}"]
    cmd = ["pretrain", str(RECIPE), "-o", str(out / "bundle.safetensors"), "--force", *[x for s in sets for x in ("--set", s)]]
    t0 = time.perf_counter()
    r = weit(*cmd)
    weit("materialize", str(out / "bundle.safetensors"), "--depth", str(a.depth), "--width", str(a.width), "-o", str(out / "model"), "--force")
    res = {"method": f"weit{a.tag and ' ' + a.tag} n={count}", "count": count, "train_flops": r.get("train_flops"), "seed": seed, "val_ema": r["val"]["val_loss_largest"],
           "val_raw": r["val_raw"]["val_loss_largest"], "test_ema": test_loss(out / "model"),
           "wall_s": round(time.perf_counter() - t0, 1), "command": "weit " + " ".join(cmd)}
    done.write_text(json.dumps(res))
    return res


def dense_run(work: Path, seed: int, a) -> dict:
    out = work / f"dense-s{seed}"
    done = out / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    src = work / f"weit-n32-s{seed}" / "model"  # only its architecture is used: --init random
    cmd = ["finetune", str(src), "-o", str(out / "run"), "--data", "fashion-mnist", "--epochs", "1", "--init", "random",
           "--train-subset", str(a.steps * a.batch), "--batch-size", str(a.batch), "--lr", str(a.lr),
           "--warmup", str(a.warmup / a.steps), "--min-lr-ratio", "0.01", "--weight-decay", "0", "--seed", str(seed), "--force"]
    t0 = time.perf_counter()
    r = weit(*cmd)
    last = r["final"] if "final" in r else r["last"]
    res = {"method": "dense (random init)", "count": None, "seed": seed, "val_raw": last.get("val_loss"), "test_raw": last.get("test_loss"),
           "wall_s": round(time.perf_counter() - t0, 1), "command": "weit " + " ".join(cmd)}
    done.write_text(json.dumps(res))
    return res


def score(work: Path, rows: list[dict], a) -> list[dict]:
    """`weit evaluate` (judge FID and class accuracy) of seed 0's model of every method at guidance 1,
    and of the method with the lowest mean test loss at each of --guidance; a grid of that model."""
    from weit_cli.commands.sample import sample_grid

    def model_of(method: str, seed: int = 0) -> Path:
        r = next(r for r in rows if r["method"] == method and r["seed"] == seed)
        return work / f"weit{a.tag and '-' + a.tag}-n{r['count']}-s{seed}" / "model" if r["count"] else work / f"dense-s{seed}" / "run" / "last"

    means = {m: statistics.mean(r.get("test_ema", r.get("test_raw")) for r in rows if r["method"] == m) for m in dict.fromkeys(r["method"] for r in rows)}
    best = min((m for m in means if m.startswith("weit")), key=means.get)
    todo = [(m, 1.0) for m in means] + [(best, g) for g in a.guidance if g != 1.0]
    out = []
    for method, g, seed in [(m, g, s) for m, g in todo for s in a.score_seeds if any(r["method"] == m and r["seed"] == s for r in rows)]:
        tail = "" if seed == 0 else f"-s{seed}"
        done = work / f"score-{method.replace(' ', '_').replace('=', '')}-g{g:g}-n{a.score}{tail}.json"
        if not done.is_file():
            cmd = ["evaluate", str(model_of(method, seed)), "--data", "fashion-mnist", "--num-samples", str(a.score), "--steps", "20", "--guidance", str(g)]
            r = weit(*cmd)
            done.write_text(json.dumps({"method": method, "guidance": g, "seed": seed, "fid_judge": r["fid_judge"], "class_accuracy": r["class_accuracy"],
                                        "references": r["judge_references"], "command": "weit " + " ".join(cmd)}))
        out.append(json.loads(done.read_text()))
        print(json.dumps(out[-1]), flush=True)
    grid = OUT / f"dit-levers{a.tag and '-' + a.tag}-grid.png"
    sample_grid(model_of(best), grid, n=40, steps=20, guidance=max(a.guidance), seed=0, force=True)
    return out


def ms(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"


def table(rows: list[dict], a, scores: list[dict] | None = None) -> str:
    lines = [
        f"# DiT recipe levers: {a.depth}×{a.width} trained alone, {a.steps} steps, batch {a.batch}, lr {a.lr}, {len(a.seeds)} seeds, 1 CPU thread",
        "",
        f"    OMP_NUM_THREADS=1 python benchmarks/dit_levers.py {a.command}",
        "",
        "Denoising loss (ε-MSE, lower is better; fixed noise and timesteps). val: 6000 held-out training images;",
        f"test: the 10 000 official test images, of the written weights (the EMA's for weit: decay {a.ema_decay}, warm-up power 0.75).",
        "",
        "| method | val, last weights | val, EMA | test (written weights) | wall s / run |",
        "|---|---|---|---|---|",
    ]
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        test = [r.get("test_ema", r.get("test_raw")) for r in rs]
        lines.append(f"| {method} | {ms([r['val_raw'] for r in rs])} | {ms([r.get('val_ema') for r in rs])} | {ms(test)} | "
                     f"{statistics.mean(r['wall_s'] for r in rs):.0f} |")
    if scores:
        refs = scores[0]["references"]
        lines += ["", f"The written model of each method (seeds {', '.join(map(str, a.score_seeds))}; mean ± sd), `weit evaluate --num-samples {a.score} --steps 20` (judge FID, class accuracy of samples):", "",
                  "| method | guidance | judge FID | class accuracy |", "|---|---|---|---|"]
        for key in dict.fromkeys((x["method"], x["guidance"]) for x in scores):
            xs = [x for x in scores if (x["method"], x["guidance"]) == key]
            fid, acc = [x["fid_judge"] for x in xs], [100 * x["class_accuracy"] for x in xs]
            spread = (lambda v, f: f"{statistics.mean(v):{f}} ± {statistics.stdev(v):{f}}" if len(v) > 1 else f"{v[0]:{f}}")
            lines.append(f"| {key[0]} | {key[1]:g} | {spread(fid, '.1f')} | {spread(acc, '.1f')} % |"
                         + ("" if len(xs) == 1 else f" seeds {', '.join(str(x.get('seed', 0)) for x in xs)} |"))
        lines += ["", "The judge's scale at this sample count: " + ", ".join(
            f"{what} FID {refs[k]['fid_judge']:.1f} ({100 * refs[k]['class_accuracy']:.1f} %)"
            for k, what in (("real_train", "real training images"), ("blank", "blank images"), ("noise", "Gaussian noise"))) + "."]
    n_seeds = {m: len([r for r in rows if r["method"] == m]) for m in dict.fromkeys(r["method"] for r in rows)}
    if len(set(n_seeds.values())) > 1:
        lines += ["", "Seeds per method: " + ", ".join(f"{m} {k}" for m, k in n_seeds.items()) + " (one value: no ± sd)."]
    lines += ["", "Per-run commands are in dit-levers.json."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("runs/dit-levers"))
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--counts", type=int, nargs="+", default=[32, 128, 256])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--dense-seeds", type=int, nargs="*", default=None, help="Seeds of the dense arm (default: --seeds; none: no dense).")
    ap.add_argument("--score", type=int, default=0, help="Then score seed 0's models with `weit evaluate` on this many samples (0: no).")
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 4.0], help="Guidance scales scored for the best weit count.")
    ap.add_argument("--score-seeds", type=int, nargs="+", default=[0], help="Seeds whose models are scored (default: seed 0's).")
    ap.add_argument("--nested", action="store_true", help="Keep the recipe's nested sizes (default: --depth × --width alone).")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="Extra recipe override for the weit runs.")
    ap.add_argument("--tag", default="", help="Names this study's runs and outputs (dit-levers-<tag>.md/.json).")
    a = ap.parse_args()
    a.command = shlex.join(sys.argv[1:])
    a.work = a.work.resolve()
    rows = []
    for seed in a.seeds:  # seed-major: a cut-short study still has every arm at seed 0
        for count in a.counts:
            rows.append(weit_run(a.work, count, seed, a))
            print(json.dumps(rows[-1]), flush=True)
        if seed in (a.seeds if a.dense_seeds is None else a.dense_seeds):
            rows.append(dense_run(a.work, seed, a))
            print(json.dumps(rows[-1]), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    scores = score(a.work, rows, a) if a.score else []
    name = f"dit-levers{a.tag and '-' + a.tag}"
    (OUT / f"{name}.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "runs": rows, "scores": scores}, indent=1))
    (OUT / f"{name}.md").write_text(table(rows, a, scores))
    print(table(rows, a, scores))


if __name__ == "__main__":
    main()
