"""Image generation (DiT): does a diffusion Transformer of a new size train faster and end better from
weit's templates than from the usual initialisations?

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/generation.py --budget tiny    # ≤ 3 min on 2 shared cores; proves the pipeline, no claim
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/generation.py --budget medium  # 2 CPU cores, ~1.5 h: --pretrain-only --threads 2, then
                                                                                 # --methods random,weight-selection and --methods weit,weit+fit in parallel, then all
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/generation.py --budget small   # a quiet CPU machine, ~5-8 h on one thread (see BUDGETS)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/generation.py --budget full --device cuda   # one GPU, ~3-5 h

On Fashion-MNIST it pretrains one nested WeiT bundle (`weit pretrain`, recipes/dit-fashion.yaml with the
budget's overrides) and one dense diffusers DiT of the largest size trained from diffusers' own
initialisation (`weit finetune --init random`) **with the same training compute**: the model FLOPs of
every sandwich step of the bundle (the sizes `pretrain` draws, replayed with its seeded generator,
each size's forward + backward counted by torch's FlopCounterMode on the dense DiT of that size) are
summed and divided by the largest size's FLOPs per step; the dense model trains that many steps with
the same batch, peak learning rate, warmup, cosine, weight decay and clipping. Weight composition
(templates × scalers) is not counted: it is the constrained model's own overhead (see
benchmarks/pretrain_step.py). For three targets — two inside the nested range and one deeper and
wider than anything pretrained — each initialisation

    random            diffusers' initialisation (`finetune --init random`)
    weight-selection  Xu et al. 2024 from the dense DiT (`finetune --init weight-selection --from`);
                      beyond the range, where selection cannot grow, the dense DiT is grown instead:
    dense-grown       `extract-templates` of the dense DiT at full rank (exact), then `materialize
                      --depth-rule identity` (lossless growth: tiled width, identity blocks)
    weit              `materialize` from the bundle, no data (the default depth rule: deeper than the
                      bundle a DiT grows by identity blocks since issue 19; before, by `interp`)
    weit+fit          `fit-scalers` (diffusion loss, templates frozen), then `materialize`
    weit-identity     `materialize --depth-rule identity` (not in the default list): deeper than the
                      bundle, the added blocks start as identities (zeroed residual branches), so the
                      model computes the bundle's largest size; inside the range it is `weit`
    weit-interp,      the same with `--depth-rule interp` (interpolated scalers; not in the default
    weit+fit-interp   list): what `weit` and `weit+fit` were beyond the range before issue 19
    weit-teacher      the teacher path inside the same budget (not in the default list): a dense DiT
                      for half the bundle's FLOPs, then `weit pretrain --teacher` of it for the other
                      half (teacher forwards counted), then `materialize` (identity growth beyond)

With --finetune-data (e.g. mnist5k) the runs finetune, fit and score on other data than the
pretraining data (transfer); the 10-class table is kept (class i starts as the pretraining data's
class i), and the models are scored by that data's judge against its test images.

is trained by `weit finetune` for S steps, 3 seeds (the finetuning seed: data order, noise and, for
random, the initial weights; the bundle and the dense DiT are pretrained once, seed 0). After every
E steps (and at step 0, the initialisation itself) the model is sampled (DDIM, η = 0, a fixed sampling
seed for every model, so comparisons are paired) and scored as `weit evaluate` scores it: Fréchet
distance to real test images in the features of weit's judge classifier (tasks/fid.py; NOT
Inception-FID, comparable only under the same judge sha256, recorded) and the judge's class accuracy
of the conditional samples; the test denoising loss comes from finetune's own per-epoch metrics.
(The benchmark calls the functions `weit evaluate` calls — sample_images, load_judge, FrechetScorer,
class_accuracy — rather than `evaluate` itself, which would recompute the 10 000-image test loss
finetune already recorded.) finetune evaluates once per epoch, so an epoch is made E steps long:
`--train-subset` = E × batch images (the same seeded subset for every method). After the last step,
`weit sample` draws one grid per method and size (seed 0's run).

The claim under test (issue 10): weit reaches the FID that random init reaches at the end in at most a
fifth of the steps, and ends better. `claims` in the JSON says, per size, the first step at which
each method's mean FID is at or below random's final mean.

Every stage's result is cached in the work folder under a digest of its settings, so an interrupted
run continues where it stopped; --fresh starts over. Outputs: docs/generation/generation-<budget>.json
(every number, the settings, the exact command), .png (FID and class accuracy against steps) and
grids-<budget>/<size>-<method>.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

from _stages import cached

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/dit-fashion.yaml"
FINETUNE_DATA = "fashion-mnist"  # the pretraining data
METHODS = ("random", "weight-selection", "weit", "weit+fit")  # weight-selection is dense-grown beyond the range
# The published tiny/small/medium numbers were made with the recipe's earlier 32 templates per type;
# pinned, so that their commands still reproduce them (the recipe ships 256 since issue 19).
COUNT_32 = "templates.count=32"
SANDWICH = "nested.sampling=sandwich"  # likewise: the recipe trains one size per step since issue 19
NO_EVAL = ["train.eval_every=0", "train.checkpoint_every=0"]

BUDGETS = {
    # ≤ 3 min on the shared 2-core machine: a tiny nested range (depths 1-2, widths 16-32), 16
    # finetuning steps scored at 0 and 16 only; beyond the range in depth only (3×16: identity blocks,
    # the cheapest growth to run; small/full grow depth and width). finetune's own per-epoch test
    # loss (10 000 images) is most of the time. The numbers only show that every stage runs; no claim.
    "tiny": dict(
        overrides=["nested.depths=[1,2]", "nested.widths=[16,32]", "train.steps=20", "train.warmup_steps=2",
                   "data.train_subset=1280", COUNT_32, SANDWICH, *NO_EVAL],
        targets=[(1, 16), (2, 32), (3, 16)], steps=16, every=16, fit_steps=10, samples=100, sample_steps=10,
        grid_n=20, seeds=3, lr=5e-4, warmup_steps=0, val_fraction=0.01,
    ),
    # The recipe's nested range (depths 2-4, widths 32-64), 2000 pretraining steps, 2000 finetuning
    # steps scored every 200 with 1000 samples × 25 DDIM steps. Estimated from the tiny run's per-step
    # times: ~1 h of pretraining (bundle + dense) and ~5-7 h of finetuning and sampling on one quiet
    # CPU thread (--threads 4 on a quiet machine: roughly half).
    "small": dict(
        overrides=["train.steps=2000", "train.warmup_steps=100", COUNT_32, SANDWICH, *NO_EVAL],
        targets=[(2, 32), (3, 48), (6, 96)], steps=2000, every=200, fit_steps=200, samples=1000, sample_steps=25,
        grid_n=40, seeds=3, lr=5e-4, warmup_steps=50, val_fraction=0.01,
    ),
    # What fits a 2-core CPU machine in about 1.5 h (two processes, one thread each, split by method):
    # the recipe's nested range (depths 2-4, widths 32-64), 2000 pretraining steps; targets 2×32 and
    # 3×48 inside, 6×64 beyond in depth (so that dense-grown, identity blocks, is exactly the dense DiT:
    # a width that is not a whole multiple cannot be tiled losslessly); 1000 finetuning steps scored
    # every 100 with 500 samples × 20 DDIM steps (the judge's features are 128-dimensional).
    "medium": dict(
        overrides=["train.steps=2000", "train.warmup_steps=100", COUNT_32, SANDWICH, *NO_EVAL],
        targets=[(2, 32), (3, 48), (6, 64)], steps=1000, every=100, fit_steps=200, samples=500, sample_steps=20,
        grid_n=40, seeds=3, lr=5e-4, warmup_steps=50, val_fraction=0.01,
    ),
    # The budget at which the shipped recipe's largest size draws garments (issue 19): the recipe as
    # shipped (256 templates, one size per step) for 17.1 training TFLOPs — what 4000 steps of the
    # largest size alone cost, where 4×64 alone reached judge FID 26.9 ± 4.1 and 83.3 ± 3.8 % class
    # accuracy at guidance 2 (docs/generation/dit-levers-alone4000.md); about 26 min of one CPU
    # thread per pretraining. 1000 finetuning steps scored every 200, guidance 2 as `weit sample`
    # ships. Estimated ~8-10 h on 2 cores for every method, size and seed: not yet run in full
    # (--step0-only: the initialisations themselves, ~1.5 h). With the EMA of the weights (decay
    # 0.999, for the dense DiT too), as the bundles scored in docs/generation/garments-nested-scores.json
    # were trained.
    "garments": dict(
        overrides=["train.steps=8731", "train.warmup_steps=40", "train.ema.decay=0.999", *NO_EVAL],
        targets=[(2, 32), (3, 48), (6, 64)], steps=1000, every=200, fit_steps=200, samples=300, sample_steps=20,
        grid_n=40, seeds=3, lr=5e-4, warmup_steps=50, val_fraction=0.01, guidance=2.0,
    ),
    # One GPU (patch 2: 196 tokens, wider range): 20k pretraining steps, 10k finetuning steps scored
    # every 400 (an epoch is `every` × batch images, ≤ the 54 000 of the training split) with 2000
    # samples × 50 DDIM steps; estimated 3-5 h on one H100/H200 (finetuning dominates: 36 runs × 10k steps).
    "full": dict(
        overrides=["model.patch_size=2", "nested.depths=[4,6,8]", "nested.widths=[128,192,256]", "templates.count=64",
                   "data.batch_size=128", "train.steps=20000", "train.warmup_steps=1000", *NO_EVAL],
        targets=[(4, 128), (6, 192), (12, 384)], steps=10000, every=400, fit_steps=500, samples=2000, sample_steps=50,
        grid_n=40, seeds=3, lr=3e-4, warmup_steps=500, val_fraction=0.01,
    ),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="tiny")
    ap.add_argument("--work", type=Path, help="Cache folder (default runs/generation-<budget>).")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "generation", help="Where the JSON, plot and grids go.")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"Comma-separated, of {', '.join(METHODS)}, weit-identity, weit-interp, weit+fit-interp and weit-teacher.")
    ap.add_argument("--targets", help="Comma-separated DEPTHxWIDTH, a subset of the budget's targets (default: all of them).")
    ap.add_argument("--seeds", type=int, help="Override the budget's number of finetuning seeds.")
    ap.add_argument("--guidance", type=float, help="Classifier-free guidance when scoring and for the grids (1: none; default: the budget's).")
    ap.add_argument("--also-guidance", type=float,
                    help="Score each run's last model (the initialisation itself with --step0-only) at this guidance too: one more column.")
    ap.add_argument("--finetune-data", default=FINETUNE_DATA,
                    help="Finetune, fit and score on this data instead (transfer: e.g. mnist5k); the class table is kept, class i starts "
                         "from the pretraining data's class i. Scored by this data's judge against its test images.")
    ap.add_argument("--pretrain-seeds", action="store_true",
                    help="Seed i's runs start from a bundle and a dense DiT pretrained with seed i (default: one pretraining, seed 0).")
    ap.add_argument("--step0-only", action="store_true",
                    help="Score each initialisation at step 0 only (weit+fit after its fit): no finetuning.")
    ap.add_argument("--tag", default="", help="Names the outputs: generation-<budget>-<tag>.")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared: 1 by default).")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--fresh", action="store_true", help="Discard cached stages.")
    ap.add_argument("--pretrain-only", action="store_true",
                    help="Stop after the bundle and the dense DiT (then run the methods in parallel processes: --methods a,b).")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    cfg = dict(BUDGETS[args.budget])
    if args.seeds:
        cfg["seeds"] = args.seeds
    if args.guidance is None:
        args.guidance = cfg.get("guidance", 1.0)
    if args.targets:  # a run's cache key names its size: the subsets' runs are the full run's
        wanted = [tuple(int(v) for v in t.split("x")) for t in args.targets.split(",")]
        if not set(wanted) <= {tuple(t) for t in cfg["targets"]}:
            ap.error(f"--targets: the {args.budget} budget's targets are " + ", ".join(f"{d}x{w}" for d, w in cfg["targets"]))
        cfg["targets"] = [t for t in cfg["targets"] if tuple(t) in wanted]
    work = args.work or ROOT / "runs" / f"generation-{args.budget}"
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bench = Bench(work, cfg, args)
    results = bench.run()
    results["total_s"] = round(time.perf_counter() - t0, 1)  # this invocation (cached stages cost nothing)
    stages = [*(p[k] for p in results["pretrain"] for k in ("bundle", "dense")), *(s for r in results["runs"] for s in r["seeds"])]
    results["compute_s"] = round(sum(st.get("stage_s", 0.0) for st in stages), 1)  # every stage, cached or not
    args.docs.mkdir(parents=True, exist_ok=True)
    name = f"generation-{args.budget}{args.tag and '-' + args.tag}"
    grids = args.docs / f"grids-{args.budget}{args.tag and '-' + args.tag}"
    if grids.exists():
        shutil.rmtree(grids)
    grids.mkdir()
    for g in results["grids"]:
        dst = grids / Path(g["path"]).name
        shutil.copyfile(g["path"], dst)
        g["path"] = str(dst.relative_to(ROOT)) if dst.is_relative_to(ROOT) else str(dst)
    (args.docs / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.docs / f"{name}.png")
    (args.docs / f"{name}.md").write_text(markdown(results) + "\n")
    print(summary(results))
    print(f"wrote {args.docs / name}.{{json,png}} and {grids}/ in {results['total_s'] / 60:.1f} min")
    return 0


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


class Bench:
    def __init__(self, work: Path, cfg: dict, args):
        self.work, self.cfg, self.args = work, cfg, args

    def cached(self, key: Path, fn):
        return cached(self.work, key, fn)

    # ------------------------------------------------------------------------------------ pretraining
    def run(self) -> dict:
        from weit_cli import recipe as rcp

        cfg, a = self.cfg, self.args
        self.recipe = recipe = rcp.load_recipe(ROOT / RECIPE, cfg["overrides"])
        pretrain_seeds = range(cfg["seeds"]) if a.pretrain_seeds else [None]
        self.pretrained = {s: self.pretrain(s) for s in pretrain_seeds}
        if a.pretrain_only:
            raise SystemExit("pretrained: " + ", ".join(f"{p['bundle']['path']} and {p['dense']['path']}" for p in self.pretrained.values()))
        self.largest = tuple(recipe.largest())
        first = next(iter(self.pretrained.values()))
        # Finetuning runs are keyed by everything that shapes them besides the pretraining.
        shaping = {k: cfg[k] for k in ("steps", "every", "fit_steps", "samples", "sample_steps", "lr", "warmup_steps", "val_fraction")}
        shaping.update(pretrain=first["pre"].name, dense=first["dense"]["path"], guidance=a.guidance, device=a.device,
                       sampler="ddim, clipped x0, eps re-derived")  # runs scored by the earlier sampler are not reused
        if a.pretrain_seeds or a.step0_only:  # keys of the runs made before these options existed stay as they were
            shaping.update(pretrain_seeds=a.pretrain_seeds, step0_only=a.step0_only)
        if a.finetune_data != FINETUNE_DATA:
            shaping.update(finetune_data=a.finetune_data)
        self.epoch_steps = self.epoch_length()
        self.runs = self.work / f"runs-{digest(shaping)}"
        (self.runs / "models").mkdir(parents=True, exist_ok=True)
        self.scorer = None
        rows, grids = [], []
        for depth, width in [tuple(t) for t in cfg["targets"]]:
            inside = depth <= self.largest[0] and width <= self.largest[1]
            for method in a.methods.split(","):
                label = "dense-grown" if method == "weight-selection" and not inside else method
                per_seed = []
                for seed in range(cfg["seeds"]):
                    key = self.runs / f"{depth}x{width}-{label}-seed{seed}"
                    rec = self.cached(key, lambda: self.one(depth, width, label, seed))
                    if rec.get("real", "first") != self.real_rule():  # scored against other real images: score again
                        rec = self.cached(key.with_name(f"{key.name}-real-{self.real_rule()}"), lambda: self.rescore(rec, depth, width, label, seed))
                    per_seed.append(rec)
                if a.also_guidance is not None:
                    g = a.also_guidance
                    for seed, rec in enumerate(per_seed):
                        rec[f"guidance_{g:g}"] = self.cached(self.runs / f"{depth}x{width}-{label}-seed{seed}-guidance{g:g}",
                                                             lambda: self.score(Path(rec["final_model"]), guidance=g))
                rows.append(pool(depth, width, "inside" if inside else "beyond", label, per_seed))
                grids.append(self.cached(self.runs / f"grid-{depth}x{width}-{label}", lambda: self.grid(depth, width, label)))
                print(f"{depth}x{width} {label:16s} FID " + " → ".join(f"{m:.1f}" for m in rows[-1]["fid_mean"]), flush=True)
        floor = self.cached(self.runs / "real-floor", self.real_floor)
        return {
            "budget": a.budget,
            "command": "benchmarks/generation.py " + " ".join(sys.argv[1:]),
            "note": "tiny-budget numbers only show that the pipeline runs; they support no claim" if a.budget == "tiny" else "",
            "settings": {
                "recipe": RECIPE, "recipe_overrides": cfg["overrides"], "recipe_sha256": rcp.digest(recipe),
                "nested": {"depths": recipe.nested.depths, "widths": recipe.nested.widths}, "largest": self.largest,
                "targets": cfg["targets"], "finetune": {
                    "data": a.finetune_data, "steps": cfg["steps"], "scored_every": cfg["every"], "epoch_steps": self.epoch_steps,
                    "train_subset": self.epoch_steps * recipe.data.batch_size,
                    "lr": cfg["lr"], "warmup_steps": cfg["warmup_steps"], "schedule": "cosine", "batch_size": recipe.data.batch_size,
                    "weight_decay": recipe.train.weight_decay, "grad_clip": recipe.train.grad_clip, "val_fraction": cfg["val_fraction"],
                    "seeds": list(range(cfg["seeds"]))},
                "fit": {"steps": cfg["fit_steps"], "lr": 1e-3, "batch_size": 64, "seed": "the run's"},
                "scoring": {"samples": cfg["samples"], "ddim_steps": cfg["sample_steps"], "guidance": a.guidance,
                            "also_guidance": a.also_guidance, "data": a.finetune_data, "sample_seed": 0,
                            "real": f"the first {cfg['samples']} test images" if self.real_rule() == "first"
                            else f"{cfg['samples']} test images, every class in turn (tasks/fid.in_turn)", "labels": "every class in turn"},
                "threads": a.threads, "device": a.device, "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
            },
            "judge": self.judge_info(),
            "real_floor": floor,
            "pretrain": [{"seed": s, **{k: v for k, v in p.items() if k != "pre"}} for s, p in self.pretrained.items()],
            "pretrain_seeds": a.pretrain_seeds, "step0_only": a.step0_only,
            "runs": rows,
            "claims": claims(rows),
            "grids": grids,
        }

    def pretrain(self, seed: int | None) -> dict:
        """The bundle and the dense DiT of equal compute, pretrained with `seed` (None: the recipe's)."""
        from weit_cli import recipe as rcp

        overrides = [*self.cfg["overrides"], *([] if seed is None else [f"seed={seed}"])]
        recipe = rcp.load_recipe(ROOT / RECIPE, overrides)
        pre = self.work / f"pretrain-{rcp.digest(recipe)[:10]}"
        pre.mkdir(exist_ok=True)
        bundle = self.cached(pre / "bundle", lambda: self.pretrain_bundle(pre, overrides))
        compute = self.cached(pre / "compute", lambda: self.equal_compute(recipe, bundle))
        dense = self.cached(pre / f"dense-{compute['dense_steps']}", lambda: self.pretrain_dense(pre, recipe, compute["dense_steps"]))
        out = {"pre": pre, "bundle": bundle, "dense": dense, "compute": compute}
        if any(m.startswith("weit-teacher") for m in self.args.methods.split(",")):  # the teacher path at equal compute
            half = math.ceil(compute["dense_steps"] / 2)
            teacher = self.cached(pre / f"dense-{half}", lambda: self.pretrain_dense(pre, recipe, half))
            out["teacher_half"] = self.cached(pre / f"teacher-half-{half}",
                                              lambda: self.pretrain_teacher_half(pre, recipe, overrides, compute, teacher, half))
        return out

    def of(self, seed: int) -> tuple[Path, Path, Path]:
        """(pretraining folder, bundle, dense DiT) that finetuning seed `seed` starts from."""
        p = self.pretrained[seed if self.args.pretrain_seeds else None]
        return p["pre"], Path(p["bundle"]["path"]), Path(p["dense"]["path"])

    def pretrain_bundle(self, pre: Path, overrides: list[str]) -> dict:
        from weit_cli.commands.materialize import materialize
        from weit_cli.commands.pretrain import pretrain

        out = pre / "bundle.safetensors"
        r = pretrain(ROOT / RECIPE, out, overrides=overrides, force=True, device=self.args.device)
        materialize(out, pre / "bundle-largest", force=True)  # the dense model's architecture, and its FID at step 0
        return {"path": str(out), "steps": r["steps"], "seconds": r["wall_s"], "val": r.get("val"),
                "train_flops": r.get("train_flops"), "size_steps": r.get("size_steps")}

    def pretrain_teacher_half(self, pre: Path, recipe, overrides: list[str], compute: dict, teacher: dict, half: int) -> dict:
        """The teacher path inside the same budget (as benchmarks/quality.py's `teacher-half`): a dense
        DiT of the largest size for half the bundle's model FLOPs (`half` steps), then `weit pretrain
        --teacher` of it (templates from its SVD, every size's loss half the teacher's noise prediction)
        for as many steps as the other half buys: a step costs the sizes' mean model FLOPs (one size per
        step, drawn as the bundle's were) plus one forward of the teacher. Warm-up scaled with the steps."""
        from weit_cli.commands.materialize import materialize
        from weit_cli.commands.pretrain import pretrain

        t_fwd = dit_flops(recipe, *recipe.largest(), backward=False)
        mean_step = compute["bundle_flops"] / compute["bundle_steps"]
        left = compute["bundle_flops"] - half * compute["dense_flops_per_step"]
        steps = int(left // (mean_step + t_fwd))
        warm = round(recipe.train.warmup_steps * steps / recipe.train.steps)
        ov = [*overrides, f"teacher.source={teacher['path']}", f"train.steps={steps}", f"train.warmup_steps={warm}"]
        folder = pre / f"teacher-half-{half}"
        folder.mkdir(exist_ok=True)
        out = folder / "bundle.safetensors"
        r = pretrain(ROOT / RECIPE, out, overrides=ov, force=True, device=self.args.device)
        materialize(out, folder / "bundle-largest", force=True)
        spent = sum(n * compute["flops_per_step_by_size"][k] for k, n in r["size_steps"].items()) + steps * t_fwd
        return {"path": str(out), "steps": steps, "warmup_steps": warm, "seconds": r["wall_s"], "val": r.get("val"),
                "train_flops": r.get("train_flops"), "teacher_flops": r.get("teacher_flops"), "size_steps": r.get("size_steps"),
                "teacher": {"path": teacher["path"], "steps": half, "seconds": teacher["seconds"], "test_loss": teacher["test_loss"]},
                "teacher_forward_flops": t_fwd, "model_flops": {"teacher_training": half * compute["dense_flops_per_step"],
                                                                 "nested_with_teacher_forwards": spent,
                                                                 "budget": compute["bundle_flops"]}}

    def equal_compute(self, recipe, bundle: dict) -> dict:
        """The dense DiT's step count for the bundle's training FLOPs (see the module doc)."""
        from weit_cli.training.nested import sample_sizes

        ns = recipe.nested
        per_size: dict[str, int] = {}
        total = 0
        if ns.sampling == "sandwich" and not ns.shrink_start:  # as the published budgets were counted
            rng = random.Random(recipe.seed)  # pretrain's size generator, replayed
            draws = [f"{d}x{w}" for _ in range(recipe.train.steps) for d, w in sample_sizes(rng, recipe.depth_options(), ns.widths, ns.sandwich)]
            counts = {k: draws.count(k) for k in dict.fromkeys(draws)}
        else:  # any schedule: the sizes pretrain reports it trained (its `size_steps`)
            counts = bundle["size_steps"]
        for k, n in counts.items():
            per_size[k] = dit_flops(recipe, *map(int, k.split("x")))
            total += n * per_size[k]
        big = dit_flops(recipe, *recipe.largest())
        return {"method": "model FLOPs (forward + backward, FlopCounterMode) of every size of every step, "
                          "pretrain's size draws; composition excluded",
                "flops_per_step_by_size": per_size, "bundle_flops": total, "dense_flops_per_step": big,
                "dense_steps": math.ceil(total / big), "bundle_steps": recipe.train.steps}

    def pretrain_dense(self, pre: Path, recipe, steps: int) -> dict:
        """The dense DiT of the largest size, diffusers' init, `steps` steps with the bundle's
        optimiser settings. finetune counts in epochs: the subset is sized so epochs × batches = steps."""
        from weit_cli.commands.finetune import finetune

        tr, bs = recipe.train, recipe.data.batch_size
        n_train = 54000 if recipe.data.train_subset is None else recipe.data.train_subset
        epochs = math.ceil(steps * bs / n_train)
        per_epoch = math.ceil(steps / epochs)
        epochs = math.ceil(steps / per_epoch)
        out = pre / f"dense-{steps}"
        r = finetune(
            pre / "bundle-largest", out, data=recipe.data.source, epochs=epochs, init="random", lr=tr.lr,
            warmup=tr.warmup_steps / per_epoch, schedule="cosine", min_lr_ratio=tr.min_lr_ratio, batch_size=bs,
            weight_decay=tr.weight_decay, grad_clip=tr.grad_clip, train_subset=per_epoch * bs, data_seed=recipe.seed,
            val_fraction=self.cfg["val_fraction"], seed=recipe.seed, force=True, device=self.args.device,
            ema=tr.ema.decay if tr.ema else 0.0,  # the bundle's EMA, the same for the dense DiT (finetune's warm-up power is the recipe's 0.75)
        )
        return {"path": str(out / "last"), "steps": r["steps"], "epochs": epochs, "seconds": r["wall_s"],
                "test_loss": r["final"].get("test_loss"), "data": r["data"]}

    def epoch_length(self) -> int:
        """Finetuning steps per epoch (finetune scores the test loss and the benchmark keeps a model once
        per epoch): the scoring interval, or on a training split smaller than that many batches the
        largest divisor of it that fits (mnist5k's 3960 images: 50 steps, scored every 4th epoch)."""
        from weit_cli.data.images import load_data

        every, bs = self.cfg["every"], self.recipe.data.batch_size
        if self.args.finetune_data == FINETUNE_DATA:
            return every
        m = self.recipe.model
        n = len(load_data(self.args.finetune_data, img_size=m.sample_size, in_chans=m.in_channels, seed=0,
                          val_fraction=self.cfg["val_fraction"]).train)
        fits = [k for k in range(1, every + 1) if every % k == 0 and k * bs <= n]
        if not fits:
            raise SystemExit(f"{self.args.finetune_data}: {n} training images, fewer than one batch of {bs}")
        return max(fits)

    # ------------------------------------------------------------------------------------ one run
    def init_model(self, depth: int, width: int, label: str, seed: int) -> tuple[Path, str, Path | None, dict]:
        """(MODEL for finetune, --init, --from, extra record) of one method."""
        from weit_cli.arch._registry import get_adapter
        from weit_cli.commands.materialize import materialize

        pre, bundle, dense = self.of(seed)
        models = pre / "models"
        models.mkdir(exist_ok=True)

        def materialized(out: Path, source: Path = bundle, **rules) -> Path:
            """`materialize` of the bundle at this size into `out`, made once under the stage lock
            (shared by every method and by parallel processes)."""
            def make() -> dict:
                materialize(source, out, depth=depth, width=width, force=True, **rules)
                return {"path": str(out)}

            self.cached(out, make)
            return out

        plain = materialized(models / f"weit-{depth}x{width}")  # beyond the range its weights are the earlier default's
        if label == "random":  # (interp): random and weight selection take only its architecture
            return plain, "random", None, {}
        if label == "weight-selection":
            return plain, "weight-selection", dense, {}
        grow = get_adapter(self.recipe.model.family).grow_depth_rule
        inside = depth <= self.largest[0]
        if label == "weit":  # the default (`auto`): beyond the range the family's growth rule, named by it
            return (plain if inside else materialized(models / f"weit-{grow}-{depth}x{width}", depth_rule=grow)), "weit", None, {}
        if label in ("weit-identity", "weit-interp"):
            rule = label.removeprefix("weit-")
            return materialized(models / f"weit-{rule}-{depth}x{width}", depth_rule=rule), "weit", None, {}
        if label == "weit-teacher":  # beyond the range grown by identity blocks, as weit-identity
            taught = Path(self.pretrained[seed if self.args.pretrain_seeds else None]["teacher_half"]["path"])
            return materialized(models / f"weit-teacher-{depth}x{width}", taught, depth_rule="identity"), "weit", None, {}
        if label == "dense-grown":
            from weit_cli.commands.extract import extract_templates

            grown = models / f"dense-grown-{depth}x{width}"

            def grow() -> dict:
                p = self.recipe.model.head_dim
                full = models / "dense-full-rank.safetensors"
                r = extract_templates(dense, full, template_size=p, num_templates=p * p, force=True)
                materialize(full, grown, depth=depth, width=width, depth_rule="identity", force=True)
                return {"relative_error": r.get("relative_error")}

            return grown, "weit", None, {k: v for k, v in self.cached(grown, grow).items() if k != "stage_s"}
        if label in ("weit+fit", "weit+fit-interp"):
            from weit_cli.commands.fit_scalers import fit_scalers

            name = label.replace("+", "-")
            rule = {"depth_rule": "interp"} if label.endswith("-interp") else {}
            scalers = self.runs / "models" / f"scalers-{name}-{depth}x{width}-seed{seed}.safetensors"
            fit = fit_scalers(bundle, scalers, data=self.args.finetune_data, depth=depth, width=width, steps=self.cfg["fit_steps"],
                              lr=1e-3, train_subset=self.epoch_steps * self.recipe.data.batch_size, seed=seed,
                              device=self.args.device, force=True, **rule)
            fitted = self.runs / "models" / f"{name}-{depth}x{width}-seed{seed}"
            materialize(bundle, fitted, depth=depth, width=width, scalers=scalers, force=True)
            return fitted, "weit", None, {"fit": {k: fit.get(k) for k in ("loss_first", "loss_last", "fit_seconds", "steps")}}
        raise SystemExit(f"unknown method {label}")

    def step0(self, model: Path, init: str, source: Path | None, seed: int, out: Path) -> Path:
        """The weights finetune starts from, as a folder (finetune's own initial_state, same seed)."""
        if init == "weit":
            return model
        import torch

        from weit_cli.commands.finetune import initial_state, read_model
        from weit_cli.core.bundle import Bundle
        from weit_cli.io.export import write_model

        adapter, arch, _ = read_model(model, need_weights=False)
        state, origin = initial_state(adapter, arch, init, None, source, seed)
        write_model(Bundle(adapter, arch, {}, {}, state), out, torch.float32, {"command": "benchmarks/generation.py step 0", **origin}, force=True)
        return out

    def one(self, depth: int, width: int, label: str, seed: int) -> dict:
        from weit_cli.commands.finetune import finetune

        cfg, bs = self.cfg, self.recipe.data.batch_size
        t = time.perf_counter()
        model, init, source, extra = self.init_model(depth, width, label, seed)
        init_s = time.perf_counter() - t
        run = self.runs / f"{depth}x{width}-{label}-seed{seed}"
        snaps = run.with_name(run.name + "-snapshots")
        if snaps.exists():
            shutil.rmtree(snaps)
        snaps.mkdir()
        snapshots = [self.step0(model, init, source, seed, snaps / "step-0")]
        seen: set[int] = set()
        per_score = cfg["every"] // self.epoch_steps  # epochs between scored models

        def keep_last(_info=None) -> None:
            """After each epoch finetune replaces last/: copy each epoch's once (the epoch is read from
            the model's provenance; a folder's inode is no identity, the file system reuses it)."""
            from weit_cli.commands.finetune import epoch_of

            last = run / "last"
            epoch = epoch_of(last)
            if epoch is not None and epoch not in seen and epoch % per_score == 0:
                seen.add(epoch)
                dst = snaps / f"epoch-{epoch}"
                shutil.copytree(last, dst)
                snapshots.append(dst)

        if self.args.step0_only:
            return self.only_step0(run, snaps, snapshots[0], label, depth, width, seed, init_s, extra)
        scored, epochs = cfg["steps"] // cfg["every"], cfg["steps"] // self.epoch_steps
        r = finetune(
            model, run, data=self.args.finetune_data, epochs=epochs, init=init, source=source, lr=cfg["lr"],
            warmup=cfg["warmup_steps"] / self.epoch_steps, schedule="cosine", batch_size=bs, weight_decay=self.recipe.train.weight_decay,
            grad_clip=self.recipe.train.grad_clip, train_subset=self.epoch_steps * bs, val_fraction=cfg["val_fraction"],
            seed=seed, force=True, device=self.args.device, on_step=keep_last,
        )
        keep_last()
        if len(snapshots) != scored + 1:
            raise SystemExit(f"{run}: {len(snapshots)} snapshots for {scored} scored epochs")
        t = time.perf_counter()
        scores = [self.score(s) for s in snapshots]
        score_s = time.perf_counter() - t
        shutil.copytree(snapshots[-1], run / "final", dirs_exist_ok=True)
        shutil.rmtree(snaps)
        return {
            "size": [depth, width], "method": label, "seed": seed, "steps": [i * cfg["every"] for i in range(scored + 1)],
            "fid": [s["fid_judge"] for s in scores], "class_accuracy": [s["class_accuracy"] for s in scores],
            "test_loss": [r["test_loss_by_epoch"][0], *r["test_loss_by_epoch"][per_score::per_score]], "init_seconds": round(init_s, 2), "finetune_seconds": r["wall_s"],
            "score_seconds": round(score_s, 2), "final_model": str(run / "final"), "real": self.real_rule(), **extra,
        }

    def only_step0(self, run: Path, snaps: Path, start: Path, label: str, depth: int, width: int, seed: int, init_s: float, extra: dict) -> dict:
        t = time.perf_counter()
        score = self.score(start)
        shutil.copytree(start, run / "final", dirs_exist_ok=True)
        shutil.rmtree(snaps)
        return {"size": [depth, width], "method": label, "seed": seed, "steps": [0], "fid": [score["fid_judge"]],
                "class_accuracy": [score["class_accuracy"]], "test_loss": [None], "init_seconds": round(init_s, 2),
                "finetune_seconds": 0.0, "score_seconds": round(time.perf_counter() - t, 2), "final_model": str(run / "final"),
                "real": self.real_rule(), **extra}

    def rescore(self, rec: dict, depth: int, width: int, label: str, seed: int) -> dict:
        """A cached run scored against other real images than the current rule takes: its step 0 (the
        initialisation, made again) and its last model scored again; the steps between are gone (the
        snapshots are not kept), so the record keeps those two, and the test losses and class
        accuracies of every step under `stale_`. (Made for the first transfer runs, which compared
        their samples with mnist5k's first test images: digits 0-2 only.)"""
        model, init, source, _ = self.init_model(depth, width, label, seed)
        tmp = self.runs / f"{depth}x{width}-{label}-seed{seed}-rescore"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            first, last = self.score(self.step0(model, init, source, seed, tmp / "step-0")), self.score(Path(rec["final_model"]))
        finally:
            shutil.rmtree(tmp)
        out = {k: v for k, v in rec.items() if k not in ("steps", "fid", "class_accuracy", "test_loss", "stage_s")}
        return {**out, "steps": [rec["steps"][0], rec["steps"][-1]], "fid": [first["fid_judge"], last["fid_judge"]],
                "class_accuracy": [first["class_accuracy"], last["class_accuracy"]], "test_loss": [rec["test_loss"][0], rec["test_loss"][-1]],
                "real": self.real_rule(), "stale_steps": rec["steps"], "stale_class_accuracy": rec["class_accuracy"], "stale_test_loss": rec["test_loss"],
                "stale_fid_against_first_test_images": rec["fid"]}

    def score(self, model: Path, guidance: float | None = None) -> dict:
        """What `weit evaluate` reports for a generator, minus the test loss (finetune has it)."""
        from weit_cli.commands.sample import sample_images
        from weit_cli.tasks.fid import class_accuracy

        cfg = self.cfg
        self.load_scorer()
        g = self.args.guidance if guidance is None else guidance
        fake, labels, _ = sample_images(model, n=cfg["samples"], steps=cfg["sample_steps"], guidance=g,
                                        seed=0, device=self.args.device, command="evaluate")
        return {"fid_judge": self.scorer.score(fake), "class_accuracy": class_accuracy(self.judge.net, fake, labels)}

    def load_scorer(self) -> None:
        if self.scorer is not None:
            return
        from weit_cli.data.images import load_data
        from weit_cli.tasks.fid import FrechetScorer, load_judge

        m = self.recipe.model
        self.judge = load_judge(self.args.finetune_data, img_size=m.sample_size, in_chans=m.in_channels)
        self.data = load_data(self.args.finetune_data, img_size=m.sample_size, in_chans=m.in_channels, seed=0)
        self.scorer = FrechetScorer(self.judge, self.data.test.tensors[0][self.real_images()])

    def real_images(self):
        """Which test images the samples are compared with: every class in turn, as `weit evaluate`
        takes them (tasks/fid.in_turn); on Fashion-MNIST the first ones, as the published tables were
        scored (its official test split is in mixed order: 24-39 images of each class in the first 300)."""
        from weit_cli.tasks.fid import in_turn

        n = self.cfg["samples"]
        return slice(0, n) if self.args.finetune_data == FINETUNE_DATA else in_turn(self.data.test.tensors[1], n)

    def real_rule(self) -> str:
        return "first" if self.args.finetune_data == FINETUNE_DATA else "in_turn"

    def real_floor(self) -> dict:
        """The same score for real images: `samples` training images (every class in turn) in place of samples
        (what a perfect generator scores with this many images), and the judge's accuracy on them;
        beside it the ceilings `weit evaluate` reports (blank images, Gaussian noise; tasks/fid.py)."""
        from weit_cli.tasks.fid import judge_references

        self.load_scorer()
        n = self.cfg["samples"]
        refs = judge_references(self.judge, self.data.test.tensors[0][self.real_images()], *self.data.train.tensors[:2])
        return {**refs["real_train"], "what": f"{n} training images, every class in turn, scored as if they were samples",
                "ceilings": {k: refs[k] for k in ("blank", "noise")}}

    def judge_info(self) -> dict:
        from weit_cli.tasks.fid import NOTE, load_judge

        m = self.recipe.model
        j = load_judge(self.args.finetune_data, img_size=m.sample_size, in_chans=m.in_channels)
        return {"sha256": j.sha256, "test_accuracy": j.test_accuracy, "note": NOTE}

    def grid(self, depth: int, width: int, label: str) -> dict:
        """`weit sample` of seed 0's final model: every class in turn."""
        from weit_cli.commands.sample import sample_grid

        model = self.runs / f"{depth}x{width}-{label}-seed0" / "final"
        out = self.runs / f"{depth}x{width}-{label.replace('+', '-')}.png"
        r = sample_grid(model, out, n=self.cfg["grid_n"], steps=self.cfg["sample_steps"], guidance=self.args.guidance,
                        seed=0, device=self.args.device, force=True)
        return {"size": [depth, width], "method": label, "path": str(out), "sha256": r["sha256"],
                "command": f"weit sample {model} -n {self.cfg['grid_n']} --steps {self.cfg['sample_steps']} --guidance {self.args.guidance} --seed 0 -o {out.name}"}


def dit_flops(recipe, depth: int, width: int, *, backward: bool = True) -> int:
    """Model FLOPs of one batch through the dense DiT of this size (torch's FlopCounterMode): forward
    and backward of a training step, or the forward alone (a frozen teacher's)."""
    import contextlib

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from weit_cli.arch._registry import get_adapter

    m, bs = recipe.model, recipe.data.batch_size
    adapter = get_adapter(m.family)
    torch.manual_seed(0)
    fwd = adapter.task_forward(adapter.build(adapter.arch_for_recipe(m, depth=depth, width=width, num_classes=10)))
    x = torch.randn(bs, m.in_channels, m.sample_size, m.sample_size)
    t, y = torch.randint(0, 1000, (bs,)), torch.randint(0, 10, (bs,))
    with contextlib.nullcontext() if backward else torch.no_grad(), FlopCounterMode(display=False) as fc:
        out = fwd(x, t, y)
        if backward:
            out.float().pow(2).mean().backward()
    return int(fc.get_total_flops())


def pool(depth: int, width: int, where: str, label: str, per_seed: list[dict]) -> dict:
    def ms(key):
        cols = [[v for v in c if v is not None] for c in zip(*(s[key] for s in per_seed))]
        return ([statistics.mean(c) if c else None for c in cols],
                [(statistics.stdev(c) if len(c) > 1 else 0.0) if c else None for c in cols])

    fid_m, fid_s = ms("fid")
    acc_m, acc_s = ms("class_accuracy")
    loss_m, loss_s = ms("test_loss")
    also = {}  # the last model at --also-guidance: {"guidance_1": {"fid_mean": …, …}}
    for key in (k for k in per_seed[0] if k.startswith("guidance_")):
        for what, name in (("fid_judge", "fid"), ("class_accuracy", "class_accuracy")):
            vals = [s[key][what] for s in per_seed]
            also.setdefault(key, {}).update({f"{name}_mean": statistics.mean(vals), f"{name}_std": statistics.stdev(vals) if len(vals) > 1 else 0.0})
    return {"size": [depth, width], "where": where, "method": label, "steps": per_seed[0]["steps"],
            "fid_mean": fid_m, "fid_std": fid_s, "class_accuracy_mean": acc_m, "class_accuracy_std": acc_s,
            "test_loss_mean": loss_m, "test_loss_std": loss_s, **also, "seeds": per_seed}


def claims(rows: list[dict]) -> list[dict]:
    """Per size: random's final mean FID, and the first step at which each method's mean FID is at or
    below it (None: never), as a fraction of the steps; and whether each method ends below random."""
    out = []
    for size in dict.fromkeys(tuple(r["size"]) for r in rows):
        rs = [r for r in rows if tuple(r["size"]) == size]
        rand = next((r for r in rs if r["method"] == "random"), None)
        if rand is None:
            continue
        target, total = rand["fid_mean"][-1], rand["steps"][-1]
        for r in rs:
            hit = next((s for s, f in zip(r["steps"], r["fid_mean"]) if f <= target), None)
            out.append({"size": list(size), "method": r["method"], "random_final_fid": target,
                        "first_step_at_random_final": hit, "fraction_of_steps": None if hit is None or not total else hit / total,
                        "final_fid": r["fid_mean"][-1], "ends_better_than_random": r["fid_mean"][-1] < target})
    return out


def summary(res: dict) -> str:
    lines = [f"budget {res['budget']}: {res['command']}  (judge {res['judge']['sha256'][:12]})", res["note"]]
    for r in res["runs"]:
        lines.append(f"{r['size'][0]}x{r['size'][1]} {r['where']:6s} {r['method']:16s} FID "
                     + " → ".join(f"{m:.1f}±{s:.1f}" for m, s in zip(r["fid_mean"], r["fid_std"]))
                     + "  acc " + " → ".join(f"{100 * m:.0f}%" for m in r["class_accuracy_mean"]))
    return "\n".join(lines)


def markdown(res: dict) -> str:
    """The docs table: judge FID (mean ± sd over seeds) at step 0, at a fifth of the steps and at the
    end; class accuracy and test loss at the end; the first step at random's final FID."""
    steps = res["runs"][0]["steps"]
    g = res["settings"]["scoring"].get("also_guidance")
    key, also_head = (f"guidance_{g:g}", f" FID / class acc. step {steps[-1]}, guidance {g:g} |") if g is not None else (None, "")

    def also(r: dict) -> str:
        if key is None:
            return ""
        a = r[key]
        return f" {a['fid_mean']:.1f} ± {a['fid_std']:.1f} / {100 * a['class_accuracy_mean']:.1f} % |"

    if len(steps) == 1:  # --step0-only: the initialisations themselves
        lines = ["| size | | method | judge FID step 0 | class acc. step 0 |" + also_head, "|" + "---|" * (5 + bool(key))]
        lines += [f"| {r['size'][0]}×{r['size'][1]} | {r['where']} | {r['method']} | {r['fid_mean'][0]:.1f} ± {r['fid_std'][0]:.1f} "
                  f"| {100 * r['class_accuracy_mean'][0]:.1f} ± {100 * r['class_accuracy_std'][0]:.1f} % |" + also(r) for r in res["runs"]]
        return "\n".join(lines + _scale_lines(res))
    fifth = min(steps, key=lambda s: abs(s - steps[-1] / 5))
    i = steps.index(fifth)
    mid = 0 < i < len(steps) - 1  # runs scored again keep their first and last step only
    at = {(tuple(c["size"]), c["method"]): c for c in res["claims"]}
    head = (f"| size | | method | FID step 0 | {f'FID step {fifth} | ' if mid else ''}FID step {steps[-1]} | class acc. step {steps[-1]} "
            f"| test loss step {steps[-1]} | first step ≤ random's final FID |" + also_head)
    lines = [head, "|" + "---|" * (7 + mid + bool(key))]
    for r in res["runs"]:
        c = at.get((tuple(r["size"]), r["method"]), {})
        hit = c.get("first_step_at_random_final")
        lines.append(
            f"| {r['size'][0]}×{r['size'][1]} | {r['where']} | {r['method']} | {r['fid_mean'][0]:.1f} ± {r['fid_std'][0]:.1f} "
            + (f"| {r['fid_mean'][i]:.1f} ± {r['fid_std'][i]:.1f} " if mid else "") + f"| {r['fid_mean'][-1]:.1f} ± {r['fid_std'][-1]:.1f} "
            f"| {100 * r['class_accuracy_mean'][-1]:.1f} ± {100 * r['class_accuracy_std'][-1]:.1f} % "
            + (f"| {r['test_loss_mean'][-1]:.4f} ± {r['test_loss_std'][-1]:.4f} " if r["test_loss_mean"][-1] is not None else "| – ")
            + f"| {'–' if not c else 'never' if hit is None else hit} |" + also(r))  # –: no random run to compare with
    return "\n".join(lines + _scale_lines(res))


def _scale_lines(res: dict) -> list[str]:
    """The judge's floor (real images) and ceilings (blank, noise) at this sample count."""
    f, lines = res.get("real_floor"), []
    if f:
        lines.append(f"\nThe floor, {f['what']}: FID {f['fid_judge']:.1f}, class accuracy {100 * f['class_accuracy']:.1f} %.")
        for k, what in (("blank", "blank images"), ("noise", "Gaussian noise")):
            if k in f.get("ceilings", {}):
                c = f["ceilings"][k]
                lines.append(f"Ceiling, {what} scored the same way: FID {c['fid_judge']:.1f}, class accuracy {100 * c['class_accuracy']:.1f} %.")
    return lines


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(tuple(r["size"]) for r in res["runs"]))
    fig, axes = plt.subplots(2, len(sizes), figsize=(4.2 * len(sizes), 6.4), squeeze=False)
    styles = {"random": "C7", "weight-selection": "C0", "dense-grown": "C0", "weit": "C3", "weit+fit": "C1"}
    for j, size in enumerate(sizes):
        for r in res["runs"]:
            if tuple(r["size"]) != size:
                continue
            for i, (key, scale) in enumerate((("fid", 1.0), ("class_accuracy", 100.0))):
                m = [scale * v for v in r[f"{key}_mean"]]
                s = [scale * v for v in r[f"{key}_std"]]
                ax = axes[i][j]
                ax.plot(r["steps"], m, marker="o", ms=3, label=r["method"], color=styles.get(r["method"]))
                ax.fill_between(r["steps"], [a - e for a, e in zip(m, s)], [a + e for a, e in zip(m, s)], alpha=0.15, color=styles.get(r["method"]))
        if res.get("real_floor"):
            axes[0][j].axhline(res["real_floor"]["fid_judge"], color="k", ls=":", lw=1, label="real images")
            axes[1][j].axhline(100 * res["real_floor"]["class_accuracy"], color="k", ls=":", lw=1, label="real images")
        where = next(r["where"] for r in res["runs"] if tuple(r["size"]) == size)
        axes[0][j].set_title(f"depth {size[0]}, width {size[1]} ({where})", fontsize=9)
        axes[0][j].set_ylabel("judge FID (mean ± std, 3 seeds; log)")
        axes[0][j].set_yscale("log")  # random init starts an order of magnitude above the rest
        axes[1][j].set_ylabel("class accuracy of samples (%)")
        for i in range(2):
            axes[i][j].set_xlabel("finetuning steps")
            axes[i][j].grid(alpha=0.3)
            axes[i][j].legend(fontsize=7)
    data = res["settings"]["finetune"].get("data", FINETUNE_DATA)
    on = "Fashion-MNIST" if data == FINETUNE_DATA else f"Fashion-MNIST → {data}"
    title = f"DiT on {on}, budget {res['budget']} (judge {res['judge']['sha256'][:8]}, not Inception-FID)"
    if res["note"]:
        title += f"\n{res['note']}"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
