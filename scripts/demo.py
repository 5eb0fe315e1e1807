"""`make demo`: pretrain a small nested ViT family on Fashion-MNIST, materialize three sizes, and
evaluate each on held-out data with no further training.

Everything goes through the real command line (`weit pretrain`, `weit materialize`); the models are
loaded back with plain timm (`local-dir:`). Outputs land in demo-out/ (git-ignored) and are replaced
on every run.

The same script produces the figures in docs/benchmarks.md for any recipe:

    python scripts/demo.py --recipe recipes/vit-fashion.yaml --out runs/vit-fashion --grid --json runs/vit-fashion.json

`--grid` materializes every (depth, width) pair of the nested grid (those off `nested.sizes` marked
as not trained) plus one size beyond the trained range and reports validation and test accuracy of each.

Then the generation part (`--dit-steps 0` skips it): the shipped DiT recipe (recipes/dit-fashion.yaml)
cut to its largest size alone and to `--dit-steps` steps, materialized as a diffusers folder, and a
sample grid of every class (`weit sample`, guidance as shipped) in demo-out/dit-grid.png. At the
demo's 800 steps the samples are the classes' shapes in noise (the judge names about 40 % of them);
docs/benchmarks.md ("A budget at which samples are garments") gives the budget at which a person
names them: 4000 steps, 83 %.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THREADS = 1
DIT_STEPS = 800  # 3-6 min of one CPU thread: shapes, not yet garments


def weit(*args: str) -> float:
    """Run one weit command (progress shows live); returns its wall time."""
    cmd = [sys.executable, "-m", "weit_cli.cli", *args]
    print("$ weit " + " ".join(str(a) for a in args), flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(THREADS)})
    if proc.returncode:
        sys.exit(proc.returncode)
    return time.perf_counter() - t


def rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def main() -> None:
    ap = argparse.ArgumentParser(description="Pretrain a recipe, materialize sizes, evaluate them (no further training).")
    ap.add_argument("--recipe", default="recipes/vit-fashion-small.yaml")
    ap.add_argument("--out", default="demo-out", help="output folder (replaced files are overwritten)")
    ap.add_argument("--grid", action="store_true", help="every size of the nested grid (+ one beyond) instead of three")
    ap.add_argument("--skip-pretrain", action="store_true", help="reuse OUT/bundle.safetensors")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override for pretrain")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the results as JSON here")
    ap.add_argument("--dit-recipe", default="recipes/dit-fashion.yaml", help="the generation part's recipe")
    ap.add_argument("--dit-steps", type=int, default=DIT_STEPS, help="its pretraining steps (0: no generation part)")
    # One thread by default: on a busy 2-core machine two torch threads per process were 5× slower
    # than one (OpenMP threads waiting on each other); on an idle machine 2 gains little at this size.
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")),
                    help="torch threads for training and evaluation (default: $OMP_NUM_THREADS or 1)")
    args = ap.parse_args()
    global THREADS
    THREADS = args.threads

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    from weit_cli.recipe import load_recipe

    recipe_path = ROOT / args.recipe if not Path(args.recipe).is_absolute() else Path(args.recipe)
    recipe = load_recipe(recipe_path, args.overrides)
    out = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = out / "bundle.safetensors"

    t_pretrain = None
    if not args.skip_pretrain:
        sets = [x for o in args.overrides for x in ("--set", o)]
        t_pretrain = weit("pretrain", rel(recipe_path), "-o", rel(bundle), "--force", *sets)

    depths, widths = recipe.nested.depths, recipe.nested.widths
    beyond = (max(depths) + 1, 2 * max(widths), "beyond the trained range (interp depth, tiled width)")
    if args.grid:
        trained = recipe.size_grid()
        sizes = [(d, w, "trained" if (d, w) in trained else "in range, not trained (nested.sizes)")
                 for d in depths for w in widths] + [beyond]
    else:
        mid_d, mid_w = depths[(len(depths) - 1) // 2], widths[(len(widths) - 1) // 2]
        sizes = [(mid_d, mid_w, "in range (a prefix)"),
                 (max(depths), max(widths), "largest trained"), beyond]
    folders = []
    for depth, width, _ in sizes:
        folder = out / f"vit-d{depth}-w{width}"
        weit("materialize", rel(bundle), "--depth", str(depth), "--width", str(width), "-o", rel(folder), "--force")
        folders.append(folder)

    import timm
    import torch
    from rich.console import Console

    torch.set_num_threads(THREADS)
    from rich.table import Table

    from weit_cli.cli_render import print_table
    from weit_cli.data.images import load_data
    from weit_cli.tasks.classification import evaluate

    data = load_data(recipe.data.source, img_size=recipe.model.img_size, in_chans=recipe.model.in_chans,
                     seed=recipe.seed, val_fraction=recipe.data.val_fraction)
    table = Table(title=f"{recipe.data.source}: accuracy with no training after pretrain (chance {100 / data.num_classes:.0f}%)",
                  title_justify="left")
    for col in ("depth", "width", "heads", "parameters", f"val ({len(data.val)})", f"test ({len(data.test)})", "size"):
        table.add_column(col, justify="left" if col == "size" else "right")
    rows = []
    for (depth, width, what), folder in zip(sizes, folders):
        model = timm.create_model(f"local-dir:{folder}", pretrained=True)
        val = evaluate(model, data.val, batch_size=500, device="cpu").accuracy
        test = evaluate(model, data.test, batch_size=500, device="cpu").accuracy
        params = sum(p.numel() for p in model.parameters())
        heads = model.blocks[0].attn.num_heads
        rows.append({"depth": depth, "width": width, "heads": heads, "params": params, "val_acc": val, "test_acc": test, "note": what})
        table.add_row(str(depth), str(width), str(heads), f"{params:,}", f"{100 * val:.2f}%", f"{100 * test:.2f}%", what)
    console = Console()
    print_table(table)  # whole, also when piped (`make demo | tee`, CI logs)
    if t_pretrain is not None:
        console.print(f"pretrain wall time {t_pretrain:.0f}s ({torch.get_num_threads()} threads in this process); "
                      f"files in {rel(out)}/", soft_wrap=True)
    generation = generation_part(args, out) if args.dit_steps > 0 else None
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({
            "recipe": rel(recipe_path), "overrides": args.overrides, "data": data.description,
            "pretrain_wall_s": t_pretrain, "sizes": rows, "generation": generation,
        }, indent=2) + "\n")


def generation_part(args, out: Path) -> dict:
    """The DiT recipe at the demo's budget: pretrain, materialize the largest size, draw a grid."""
    from weit_cli.options import SAMPLE
    from weit_cli.recipe import load_recipe

    recipe_path = ROOT / args.dit_recipe
    recipe = load_recipe(recipe_path)
    warmup = min(recipe.train.warmup_steps, args.dit_steps // 10)
    # the largest size alone: at a demo's budget the nested draws would leave it a ninth of the steps
    largest = [f"nested.depths=[{max(recipe.nested.depths)}]", f"nested.widths=[{max(recipe.nested.widths)}]"]
    sets = [*largest, f"train.steps={args.dit_steps}", f"train.warmup_steps={warmup}", "train.eval_every=0", "train.checkpoint_every=0"]
    bundle, folder, grid = out / "dit-bundle.safetensors", out / "dit", out / "dit-grid.png"
    t = weit("pretrain", rel(recipe_path), "-o", rel(bundle), "--force", *[x for o in sets for x in ("--set", o)])
    weit("materialize", rel(bundle), "-o", rel(folder), "--force")  # the largest size
    weit("sample", rel(folder), "-n", "40", "--steps", "20", "--seed", "0", "-o", rel(grid), "--force")
    print(f"generation: {args.dit_steps} pretraining steps in {t:.0f}s; samples of every class (guidance {SAMPLE.guidance:g}) "
          f"in {rel(grid)}; score them with: weit evaluate {rel(folder)} --data fashion-mnist", flush=True)
    return {"recipe": args.dit_recipe, "overrides": sets, "pretrain_wall_s": t, "model": rel(folder), "grid": rel(grid)}


if __name__ == "__main__":
    main()
