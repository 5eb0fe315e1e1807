"""Time one pretraining step of the constrained model against the ordinary dense model.

Same process, same batch, same optimiser (AdamW), same architecture, same loss (the recipe family's
task: cross-entropy for classifiers, the ε-prediction diffusion loss for DiTs, with the noise and
timesteps drawn once so every variant denoises the same input): the dense model is the family's own
module (timm ViT/ResNet, diffusers DiTTransformer2DModel) at the recipe's largest size; the constrained step composes its weights from templates and scalers
(`core/resize.resize` + `functional_call`, exactly what `weit pretrain` runs) and back-propagates into
them. Rounds alternate between the variants and the median is reported, so load from other
processes on a shared machine hits both alike. The full sandwich step (largest + smallest + k
in-between sizes) is timed too and compared with the dense steps of the same sizes.

    python benchmarks/pretrain_step.py --recipe recipes/vit-fashion.yaml --threads 1
    python benchmarks/pretrain_step.py --recipe recipes/dit-fashion.yaml --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from weit_cli.recipe import load_recipe
from weit_cli.tasks._registry import task_for  # noqa: E402
from weit_cli.training.dist import device_autocast
from weit_cli.training.nested import (
    NestedModel,
    SandwichLoss,
    initial_bundle,
    sample_sizes,
)
from weit_cli.training.optim import adamw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/vit-fashion.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override key.sub=value")
    ap.add_argument("--batch", type=int, default=None, help="default: the recipe's batch size")
    ap.add_argument("--rounds", type=int, default=7, help="alternating timing rounds")
    ap.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the results here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    recipe = load_recipe(args.recipe, args.overrides)
    batch = args.batch or recipe.data.batch_size
    ns = recipe.nested
    bundle = initial_bundle(recipe, 10)
    net = NestedModel(bundle).to(dev)
    adapter = bundle.adapter
    task = task_for(adapter)
    task.num_classes = 10  # what load_data would set (the generation task's null class is this index)
    loss_mod = SandwichLoss(net, task, ns.distill, ns.distill_temperature)
    opt = adamw(net.named_tensors(), lr=1e-4, weight_decay=0.05, no_decay_keys=bundle.adapter.no_decay)
    g = torch.Generator().manual_seed(0)
    m = recipe.model
    if task.name == "control":  # K-step windows: (states, actions, returns-to-go, timesteps, mask)
        k = m.context
        raw = (
            torch.randn(batch, k, m.state_dim, generator=g), torch.rand(batch, k, m.act_dim, generator=g) * 2 - 1,
            torch.randn(batch, k, 1, generator=g), torch.randint(0, m.max_ep_len, (batch, k), generator=g),
            torch.ones(batch, k),
        )
    else:  # ViT/ResNet recipes name them img_size/in_chans, DiT ones sample_size/in_channels
        img, chans = getattr(m, "img_size", None) or m.sample_size, getattr(m, "in_chans", None) or m.in_channels
        raw = (torch.randn(batch, chans, img, img, generator=g), torch.randint(0, 10, (batch,), generator=g))
    torch.manual_seed(0)
    batch_in = tuple(t.to(dev) for t in task.prepare(raw))  # diffusion: (x_t, t, y, ε), drawn once

    largest = (max(ns.depths), max(ns.widths))
    dense_models, dense_opts = {}, {}

    def dense_step(size):
        if size not in dense_models:
            torch.manual_seed(0)
            dense_models[size] = bundle.adapter.build(net.target(*size)).to(dev)
            dense_opts[size] = adamw(dict(dense_models[size].named_parameters()), lr=1e-4, weight_decay=0.05, no_decay_keys=bundle.adapter.no_decay)
        model, o = dense_models[size], dense_opts[size]
        with device_autocast(dev):
            loss = task.train_loss(adapter.task_forward(model), batch_in)
        o.zero_grad(set_to_none=True)
        loss.backward()
        o.step()

    def constrained_step(sizes):
        with device_autocast(dev):
            loss, _ = loss_mod(batch_in, sizes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rng = random.Random(0)
    sandwiches = [sample_sizes(rng, ns.depths, ns.widths, ns.sandwich) for _ in range(args.rounds * args.steps)]
    variants = {
        "dense": lambda i: dense_step(largest),
        "constrained": lambda i: constrained_step([largest]),
        "sandwich": lambda i: constrained_step(sandwiches[i]),
        "dense_same_sizes": lambda i: [dense_step(s) for s in sandwiches[i]],
    }
    for f in variants.values():  # warm-up: build modules, allocate optimiser state
        f(0)
        f(0)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.rounds):
        for name, f in variants.items():
            for s in range(args.steps):
                i = r * args.steps + s
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                f(i)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    # The sandwich's sizes differ per step, so compare it pairwise with the same steps' dense sizes.
    ratio_sandwich = statistics.median(a / b for a, b in zip(times["sandwich"], times["dense_same_sizes"]))
    result = {
        "recipe": args.recipe,
        "family": adapter.family,
        "task": task.name,
        "overrides": args.overrides,
        "largest": {"depth": largest[0], "width": largest[1]},
        "templates": {t: list(v.shape) for t, v in bundle.templates.items()},
        "batch": batch,
        "device": str(dev),
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "median_ms": {k: round(v * 1000, 1) for k, v in med.items()},
        "constrained_over_dense": round(med["constrained"] / med["dense"], 3),
        "sandwich_over_dense_same_sizes": round(ratio_sandwich, 3),
        "sizes_per_sandwich_step": 2 + ns.sandwich,
    }
    print(json.dumps(result, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
