"""Where does accuracy go under the constraint? One variant per call, on the small recipe.

    python benchmarks/pretrain_ablation.py dense                      # plain timm ViT at the largest size
    python benchmarks/pretrain_ablation.py single nested.depths=[3] nested.widths=[96]
    python benchmarks/pretrain_ablation.py nested                     # the recipe as shipped
    python benchmarks/pretrain_ablation.py nested-n128 templates.count=128

Every variant trains with the same data, seed, batch, steps, optimiser and schedule (the recipe's),
then reports validation accuracy (the seeded 10% of the Fashion-MNIST training set) of every trained
size with no further training. `dense` trains an ordinary timm ViT of the largest size alone, with
the same training utilities; the others run `weit pretrain`'s library function. One thread.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from weit_cli.commands.pretrain import pretrain
from weit_cli.io.bundle_file import load_bundle
from weit_cli.data.images import load_data
from weit_cli.recipe import load_recipe
from weit_cli.tasks.classification import evaluate
from weit_cli.training.batches import Batches
from weit_cli.training.nested import NestedModel, largest_arch
from weit_cli.training.optim import adamw, clip_grad, lr_at, set_lr

RECIPE = ROOT / "recipes" / "vit-fashion-small.yaml"


def main() -> None:
    torch.set_num_threads(1)
    name, sets = sys.argv[1], sys.argv[2:]
    rec = load_recipe(RECIPE, sets)
    data = load_data(rec.data.source, img_size=rec.model.img_size, in_chans=rec.model.in_chans, seed=rec.seed,
                     val_fraction=rec.data.val_fraction)
    t = time.time()
    if name == "dense":
        adapter, arch = largest_arch(rec, data.num_classes)
        torch.manual_seed(rec.seed)
        model = adapter.build(arch)
        tr = rec.train
        opt = adamw(dict(model.named_parameters()), lr=tr.lr, weight_decay=tr.weight_decay, no_decay_keys=adapter.no_decay, betas=tuple(tr.betas))
        batches = Batches(data.train, rec.data.batch_size, seed=rec.seed)
        for step in range(tr.steps):
            set_lr(opt, lr_at(step, base_lr=tr.lr, total_steps=tr.steps, warmup_steps=tr.warmup_steps, min_lr_ratio=tr.min_lr_ratio))
            x, y = batches.next()
            loss = F.cross_entropy(model(x), y, label_smoothing=tr.label_smoothing)
            opt.zero_grad()
            loss.backward()
            clip_grad(model.parameters(), tr.grad_clip)
            opt.step()
        val = {f"{arch.depth}x{arch.width}": round(evaluate(model, data.val).accuracy, 4)}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "bundle.safetensors"
            pretrain(RECIPE, out, overrides=sets)
            bundle, _ = load_bundle(out)
        net = NestedModel(bundle)
        val = {f"{d}x{w}": round(evaluate(net.frozen(d, w), data.val).accuracy, 4)
               for d in rec.nested.depths for w in rec.nested.widths}
    print(json.dumps({"name": name, "sets": sets, "wall_s": round(time.time() - t), "val": val}), flush=True)


if __name__ == "__main__":
    main()
