"""`make demo`: pretrain a small nested ViT family on Fashion-MNIST, materialize three sizes, and
evaluate each on the official test split with no further training.

Everything goes through the real command line (`weit pretrain`, `weit materialize`); the models are
loaded back with plain timm. Outputs land in demo-out/ (git-ignored) and are replaced on every run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "demo-out"
RECIPE = ROOT / "recipes" / "vit-fashion-small.yaml"
# (depth, width, what it shows); the recipe trains depths 1-3 and widths 32-96.
SIZES = [
    (2, 64, "in range: a prefix of the trained family"),
    (3, 96, "the largest trained size"),
    (4, 192, "deeper and wider than anything trained (interp depth, tiled width)"),
]


def weit(*args: str) -> None:
    cmd = [sys.executable, "-m", "weit_cli.cli", *args]
    print("$ weit " + " ".join(str(a) for a in args), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        sys.exit(proc.returncode)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    OUT.mkdir(exist_ok=True)
    bundle = OUT / "bundle.safetensors"
    t0 = time.perf_counter()
    weit("pretrain", str(RECIPE.relative_to(ROOT)), "-o", str(bundle.relative_to(ROOT)), "--force")
    t_pretrain = time.perf_counter() - t0
    folders = []
    for depth, width, _ in SIZES:
        folder = OUT / f"vit-d{depth}-w{width}"
        weit("materialize", str(bundle.relative_to(ROOT)), "--depth", str(depth), "--width", str(width),
             "-o", str(folder.relative_to(ROOT)), "--force")
        folders.append(folder)

    import timm
    import torch
    from rich.console import Console
    from rich.table import Table

    sys.path.insert(0, str(ROOT))
    from weit_cli.data import load_data
    from weit_cli.recipe import load_recipe
    from weit_cli.train import evaluate

    recipe = load_recipe(RECIPE)
    data = load_data(recipe.data.source, img_size=recipe.model.img_size, in_chans=recipe.model.in_chans, seed=recipe.seed,
                     val_fraction=recipe.data.val_fraction)
    table = Table(title=f"Fashion-MNIST test split ({len(data.test)} images), no training after pretrain", title_justify="left")
    for col in ("depth", "width", "heads", "parameters", "test accuracy", "size"):
        table.add_column(col, justify="right" if col != "size" else "left")
    for (depth, width, what), folder in zip(SIZES, folders):
        model = timm.create_model(f"local-dir:{folder}", pretrained=True)
        acc = evaluate(model, data.test, batch_size=500, device="cpu").accuracy
        params = sum(p.numel() for p in model.parameters())
        table.add_row(str(depth), str(width), str(model.blocks[0].attn.num_heads), f"{params:,}", f"{100 * acc:.2f}%", what)
    console = Console()
    console.print(table)
    console.print(f"chance is 10%; pretraining took {t_pretrain:.0f}s with {torch.get_num_threads()} threads; "
                  f"bundle, resolved recipe and timm folders are in {OUT.relative_to(ROOT)}/")


if __name__ == "__main__":
    main()
