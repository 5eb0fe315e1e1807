"""Training compute, counted: floating-point operations of one optimiser step's forward and backward,
measured with torch's `FlopCounterMode` (matrix products, convolutions and attention; elementwise work
is not counted, as usual), for the benchmarks that compare methods at equal compute.

A sandwich step of `weit pretrain` costs the sum over the sizes it draws (each through the
composition of its weights from the templates, which is counted too); the sequence of sizes is
replayed with the recipe's seed, so the total is exact for the run, not an average."""

from __future__ import annotations

from functools import cache

import torch
import torch.nn.functional as F


def counted(fn) -> int:
    """FLOPs of `fn()` (a loss) and its backward."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn().backward()
    return int(fc.get_total_flops())


def _batch(recipe, batch_size: int):
    m = recipe.model
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, m.in_chans, m.img_size, m.img_size, generator=g), torch.randint(0, 10, (batch_size,), generator=g)


@cache
def _size_flops(recipe_json: str, num_classes: int, batch_size: int) -> dict:
    import json

    from weit_cli.recipe import validate
    from weit_cli.tasks._registry import task_for
    from weit_cli.training.nested import NestedModel, SandwichLoss, initial_bundle

    recipe = validate(json.loads(recipe_json), "flops")
    net = NestedModel(initial_bundle(recipe, num_classes))
    task = task_for(recipe.adapter)
    batch = _batch(recipe, batch_size)
    loss = SandwichLoss(net, task, 0.0, 1.0)
    sizes = recipe.size_grid()
    return {(d, w): counted(lambda d=d, w=w: loss(batch, [(d, w)])[0]) for d, w in sizes}


def pretrain_flops(recipe, num_classes: int = 10) -> dict:
    """Training FLOPs of `weit pretrain` with `recipe` (steps × the sizes each step draws, replayed by
    the product's own schedule, `nested.step_sizes`), plus the teacher's forward passes when the recipe
    distils from one."""
    import json

    from weit_cli.recipe import to_plain
    from weit_cli.training.nested import largest_arch, train_flops

    plain = to_plain(recipe)
    for k in ("teacher", "train", "seed"):  # none of them changes a size's cost: one count per shape
        plain.pop(k, None)
    per_size = _size_flops(json.dumps(plain, sort_keys=True), num_classes, recipe.data.batch_size)
    total = train_flops(recipe, per_size)["train_flops"]
    out = {"flops": total, "steps": recipe.train.steps, "largest_step_flops": per_size[recipe.largest()]}
    if recipe.teacher is not None and recipe.teacher.weight > 0:
        adapter, arch = largest_arch(recipe, num_classes)
        model = adapter.build(arch)
        x, _ = _batch(recipe, recipe.data.batch_size)
        from torch.utils.flop_counter import FlopCounterMode

        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(x)
        out["teacher_flops"] = int(fc.get_total_flops()) * recipe.train.steps
        out["flops"] += out["teacher_flops"]
    return out


def dense_step_flops(adapter, arch, recipe, batch_size: int) -> int:
    """FLOPs of one training step of the dense model `arch` (forward, cross-entropy, backward)."""
    model = adapter.build(arch)
    x, y = _batch(recipe, batch_size)
    return counted(lambda: F.cross_entropy(model(x), y))
