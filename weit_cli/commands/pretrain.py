"""Constraint-based pretraining (README "Commands"; figures in docs/benchmarks.md "Pretraining"): train templates, scalers and small parameters so that every
nested size composes into a good timm model.

Every step trains the largest size, the smallest and `nested.sandwich` random sizes in between. Each
size is a prefix of the largest, cut by `core/resize.resize(…, "prefix", "tile")` — the same differentiable
code `weit materialize` runs — and its logits come from the real timm module of that size called with
the composed weights (`torch.func.functional_call`). What is trained is therefore exactly what
`materialize` writes out.

BatchNorm: running statistics are buffers, not trained. Every size normalises with its own
batch statistics during training, on throw-away copies of the stored statistics, so no size's
forward disturbs them (and a resumed run needs none in its checkpoint). After the last step the
largest size's statistics are re-estimated over `model.bn_calibration_batches` training batches
(`calibrate.recalibrate_bn`) and stored in the bundle; each validated size is recalibrated the same
way on a copy first. A smaller size materialized from the bundle gets a prefix of the largest's
statistics, which do not describe its activations: `fit-scalers` recalibrates them for its size, and
`materialize --calibrate DATA` does so for those who skip fitting.
"""

from __future__ import annotations

import hashlib
import random
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weit_cli import recipe as rcp
from weit_cli.core.bundle import COMPANIONS, Bundle
from weit_cli.errors import InputError, WeitError
from weit_cli.io.bundle_file import save_bundle
from weit_cli.io.checkpoint import checkpoint_for, checkpoint_paths
from weit_cli.io.files import (
    atomic_file,
    check_output,
    remove_stale_temps,
)
from weit_cli.tasks._registry import task_for
from weit_cli.tasks.base import Task
from weit_cli.training.batches import Batches
from weit_cli.training.calibrate import recalibrate_bn
from weit_cli.training.dist import barrier, cleanup_distributed, setup_distributed
from weit_cli.training.loop import Loop, Plan, check_resume, make_ema, rank_generator
from weit_cli.training.nested import (
    NestedModel,
    SandwichLoss,
    count_forward_flops,
    count_size_flops,
    initial_bundle,
    size_grid,
    size_weights,
    step_sizes,
    train_flops,
)
from weit_cli.training.optim import adamw, lr_at
from weit_cli.training.progress import StepCallback
from weit_cli.training.resume import same_run


def pretrain(
    recipe_path: Path,
    output: Path,
    *,
    data: str | None = None,
    teacher: str | Path | None = None,
    overrides: list[str] | None = None,
    resume: bool = False,
    force: bool = False,
    device: str | None = None,
    callback: StepCallback | None = None,
    command: str = "weit pretrain",
) -> dict[str, Any]:
    """Run `weit pretrain`; returns a summary. Under torchrun every rank calls this; rank 0 writes."""
    overrides = list(overrides or [])
    if data is not None:
        overrides.append(f"data.source={data}")
    if teacher is not None:
        overrides.append(f"teacher.source={teacher}")
    recipe = rcp.load_recipe(recipe_path, overrides)
    task = task_for(recipe.adapter, label_smoothing=recipe.train.label_smoothing, label_dropout=recipe.train.label_dropout)  # refuses options of another task
    if data is not None:
        recipe.data.source = data  # keep the string exactly (a YAML parse could turn '1' into a number)
    if teacher is not None:
        recipe.teacher.source = str(teacher)
    output = Path(output)
    recipe_out = rcp.recipe_path_for(output)
    ckpt = checkpoint_for(output)
    # A resumed run may replace what it wrote itself: killed after writing the bundle, before
    # removing its checkpoint, it has an output (and still a checkpoint, checked below).
    check_output(output, force or resume)
    check_output(recipe_out, force or resume)
    check_resume(ckpt, resume, force)

    dist_info = setup_distributed(device)
    try:
        return _run(recipe, task, output, recipe_out, ckpt, resume, dist_info, callback, command)
    finally:
        cleanup_distributed()


def _run(recipe, task: Task, output, recipe_out, ckpt, resume, dist_info, callback, command) -> dict[str, Any]:
    rank, world, dev = dist_info
    t_start = time.perf_counter()
    tr, ns = recipe.train, recipe.nested
    if recipe.data.batch_size % world:
        raise WeitError(
            f"batch size {recipe.data.batch_size} does not split over {world} processes",
            f"use a multiple of {world}: --set data.batch_size={recipe.data.batch_size // world * world or world}",
        )
    m = recipe.model
    splits = task.load_data(
        recipe.data.source, m, seed=recipe.seed, val_fraction=recipe.data.val_fraction, train_subset=recipe.data.train_subset,
    )
    teacher_state, teacher_sha, teacher_hub = _teacher(recipe, task.classes(splits)) if recipe.teacher is not None else (None, None, None)
    recipe_sha = rcp.digest(recipe)
    bundle = initial_bundle(recipe, task.classes(splits), teacher_state if recipe.teacher and recipe.teacher.init else None)
    files = task.companion_files(splits)
    if files:  # e.g. the control task's state statistics: written beside every materialized size
        bundle.extra[COMPANIONS] = files
    net = NestedModel(bundle).to(dev)
    calib = _calibration(recipe, splits, dev) if net.adapter.batchnorm else None
    teacher_fwd = _teacher_forward(net, teacher_state, dev) if teacher_state is not None else None
    del teacher_state
    distill, temperature = (recipe.teacher.weight, recipe.teacher.temperature) if recipe.teacher else (ns.distill, ns.distill_temperature)
    sandwich = SandwichLoss(net, task, distill, temperature, teacher=teacher_fwd)
    step_module = _distributed(sandwich, ns, world, dev)
    named = net.named_tensors()
    opt = _optimizer(named, net, tr)
    batches = Batches(splits.train, recipe.data.batch_size // world, seed=recipe.seed, rank=rank, world_size=world)
    size_rng = random.Random(recipe.seed)
    val_small = _head(splits.val, tr.eval_samples)
    largest, smallest = recipe.largest(), recipe.smallest()
    flops = _flops(recipe, task, net, splits.train, dev, world, teacher_fwd)
    weights = size_weights(recipe, flops["per_size"])

    warm = 0 if recipe.teacher else ns.distill_warmup_steps
    steps_done = [0]

    def loss_step(batch):
        if warm:  # the in-place distillation weight, ramped up over the first steps
            sandwich.distill = ns.distill * min(1.0, (steps_done[0] + 1) / warm)
        sizes = step_sizes(size_rng, recipe, steps_done[0], weights)
        steps_done[0] += 1
        loss, _ = step_module(task.prepare(batch), sizes)
        return loss

    plan = Plan(
        tr.steps, lambda step: lr_at(step, base_lr=tr.lr, total_steps=tr.steps, warmup_steps=tr.warmup_steps, min_lr_ratio=tr.min_lr_ratio),
        tr.grad_clip, eval_every=tr.eval_every, checkpoint_every=tr.checkpoint_every,
        diverged_hint="lower train.lr or raise train.warmup_steps",
    )
    loop = Loop(
        plan, optimizer=opt, params=named, batches=batches, device=dev, loss_step=loss_step,
        evaluate=lambda done: _validate(task, net, val_small, largest, smallest, dev, calib) if len(val_small) else {},
        checkpoint=ckpt, state=lambda: {"recipe_sha256": recipe_sha, "size_rng": _rng_json(size_rng), **({"teacher_sha256": teacher_sha} if teacher_sha else {})},
        on_step=callback, rank=rank, world_size=world,
        ema=make_ema(named, tr.ema.decay, tr.ema.warmup_power) if tr.ema else None, noise=_rank_noise(task, world),
    )
    if resume:
        _resume(loop, size_rng, (output, recipe_out, ckpt), rank, recipe_sha, teacher_sha)
        steps_done[0] = loop.start
    loop.run()
    val_raw = _validate(task, net, splits.val, largest, smallest, dev, calib, roles=True) if loop.ema is not None and len(splits.val) else None
    ema_info = loop.use_ema()  # the EMA weights are what is validated and written

    if calib is not None:
        net.calibrate_stats(calib)  # the bundle's BatchNorm statistics: the largest size's, re-estimated
    final = _validate(task, net, splits.val, largest, smallest, dev, calib, roles=True) if len(splits.val) else {}
    cpu = _on_cpu(net.bundle())
    digests = _gather(_digest(cpu), world)
    provenance = _provenance(recipe, command, recipe_sha, splits, world, dev, flops, (teacher_sha, teacher_hub), ema_info)
    if rank == 0:
        save_bundle(output, cpu, provenance, force=True)
        with atomic_file(recipe_out) as tmp:
            tmp.write_text(rcp.dump(recipe, command))
        loop.discard_checkpoint()
    barrier()
    return _summary(recipe, output, recipe_out, recipe_sha, resume, loop, flops, final, (val_raw, ema_info),
                    (teacher_sha, teacher_hub), cpu, splits, dev, world, digests, t_start, metric=task.metric)


def _calibration(recipe, splits, dev):
    """BatchNorm families: how the largest size's statistics are re-estimated on training batches."""
    return partial(
        recalibrate_bn, dataset=splits.train, batches=recipe.model.bn_calibration_batches,
        batch_size=min(recipe.data.batch_size, 256), seed=recipe.seed, device=dev,
    )


def _distributed(sandwich: SandwichLoss, ns, world: int, dev) -> nn.Module:
    """What a step calls: the sandwich loss, wrapped in DDP under torchrun."""
    if world == 1:
        return sandwich
    from torch.nn.parallel import DistributedDataParallel

    sandwich.touch_all = ns.sampling == "one-size"  # a small size leaves parameters unused
    return DistributedDataParallel(sandwich, device_ids=[dev.index] if dev.type == "cuda" else None)


def _teacher_forward(net: NestedModel, teacher_state: dict[str, torch.Tensor], dev):
    """The frozen teacher's task forward: the family's module of the largest size with its weights."""
    ad = net.adapter
    t_module = ad.build(net.arch)
    t_module.load_state_dict(teacher_state, strict=True)
    return ad.task_forward(t_module.to(dev).eval().requires_grad_(False))


def _optimizer(named: dict[str, torch.Tensor], net: NestedModel, tr):
    """AdamW over templates, scalers and small parameters, each part at its `train.lr_scales` multiple."""
    scales = tr.lr_scales
    return adamw(
        named, lr=tr.lr, weight_decay=tr.weight_decay, no_decay_keys=net.adapter.no_decay, betas=tuple(tr.betas),
        lr_scale=lambda name: getattr(scales, name.split(".", 1)[0]),  # templates. / scalers. / small.
    )


def _resume(loop, size_rng: random.Random, paths, rank: int, recipe_sha: str, teacher_sha: str | None) -> None:
    """Continue from the checkpoint: the same recipe and teacher, the size draws where they stopped."""
    output, recipe_out, ckpt = paths
    if rank == 0:  # what a killed writer left half-written (hidden temp files) goes first
        for p in (output, recipe_out, *checkpoint_paths(ckpt)):
            remove_stale_temps(p)

    def other_run(diff: list[str], recorded) -> InputError:  # the recipe first, as before
        if diff[0] == "recipe_sha256":
            return InputError(
                f"{ckpt} was written by another recipe (sha256 {str(recorded.get('recipe_sha256'))[:12]}…, now {recipe_sha[:12]}…)",
                "resume with the same recipe, overrides and --data, or start over with --force",
            )
        return InputError(f"{ckpt} was written with another teacher checkpoint", "resume with the same --teacher, or start over with --force")

    v, s, g = loop.resume(same_run({"recipe_sha256": recipe_sha, "teacher_sha256": teacher_sha}, other_run))["size_rng"]
    size_rng.setstate((v, tuple(s), g))


def _on_cpu(bundle: Bundle) -> Bundle:
    """The trained bundle as float32 CPU tensors (what is written and digested)."""
    def cpu(d):
        return {k: v.detach().float().cpu() for k, v in d.items()}

    return Bundle(bundle.adapter, bundle.arch, cpu(bundle.templates), cpu(bundle.scalers), cpu(bundle.small), dict(bundle.extra))


def _provenance(recipe, command, recipe_sha, splits, world, dev, flops, teacher, ema_info) -> dict[str, Any]:
    teacher_sha, teacher_hub = teacher
    provenance = {
        "command": command,
        "recipe_sha256": recipe_sha,
        "recipe": rcp.to_plain(recipe),
        "data": splits.description,
        "seed": recipe.seed,
        "steps": recipe.train.steps,
        "world_size": world,
        "device": dev.type,
        "train_flops": flops["train_flops"],
    }
    if recipe.teacher is not None:
        provenance["teacher_sha256"] = teacher_sha
        provenance["teacher_flops"] = flops["teacher_flops"]
        if teacher_hub is not None:
            provenance["teacher_source"] = teacher_hub
    if ema_info is not None:
        provenance["ema"] = ema_info
    return provenance


def _summary(recipe, output, recipe_out, recipe_sha, resume, loop, flops, final, ema, teacher, cpu: Bundle, splits, dev, world,
             digests, t_start, metric) -> dict[str, Any]:
    """What `weit pretrain` answers (--json: exactly this)."""
    (val_raw, ema_info), (teacher_sha, teacher_hub), ns = ema, teacher, recipe.nested
    return {
        "command": "pretrain",
        "output": str(output),
        "recipe": str(recipe_out),
        "recipe_sha256": recipe_sha,
        "steps": recipe.train.steps,
        "resumed_from": loop.start if resume else None,
        "train_flops": flops["train_flops"],
        "teacher_flops": flops["teacher_flops"] if recipe.teacher is not None else None,
        "size_steps": {_size_name(s): n for s, n in flops["size_steps"].items()},
        "final_loss": sum(loop.losses[-20:]) / max(1, len(loop.losses[-20:])) if loop.losses else None,
        "val": final,
        "metric_info": metric.to_dict(),
        **({"val_raw": val_raw, "ema": ema_info} if ema_info is not None else {}),
        "teacher": None if recipe.teacher is None else {
            "source": recipe.teacher.source, "sha256": teacher_sha, "weight": recipe.teacher.weight,
            **({"revision": teacher_hub["revision"]} if teacher_hub else {}),
        },
        "nested": {"depths": list(ns.depths), "widths": list(ns.widths)},
        "architecture": cpu.arch.to_dict(),
        "templates": {t: list(v.shape) for t, v in cpu.templates.items()},
        "params": cpu.param_counts(),
        "data": splits.description,
        "device": str(dev),
        "world_size": world,
        "templates_sha256_by_rank": digests,
        "wall_s": round(time.perf_counter() - t_start, 2),
    }


def _rank_noise(task: Task, world: int):
    """Under torchrun, the task's per-step draws come from a generator of this process that the loop
    reseeds from (seed, rank, step); alone, the global generator as before (training/loop.py)."""
    gen = rank_generator(world)
    if gen is not None and hasattr(task, "generator"):
        task.generator = gen
        return gen
    return None


def _flops(recipe, task: Task, net: NestedModel, train, dev, world: int, teacher_fwd) -> dict[str, Any]:
    """The run's training FLOPs (`nested.train_flops`), counted once per size on one batch of this rank."""
    n = min(recipe.data.batch_size // world, len(train) // world)
    batch = tuple(t[:n].to(dev) for t in train.tensors)
    per_size = count_size_flops(net, task, batch, size_grid(recipe))
    t_step = count_forward_flops(teacher_fwd, task, batch, dev) if teacher_fwd is not None and recipe.teacher.weight > 0 else 0
    return {**train_flops(recipe, per_size, t_step, world), "per_size": per_size}


def _size_name(size) -> str:
    d, w = size
    return f"{'-'.join(map(str, d)) if isinstance(d, tuple) else d}x{w}"


def _teacher(recipe, num_classes: int | None) -> tuple[dict[str, torch.Tensor], str, dict[str, Any] | None]:
    """The teacher's state dict, checked to be the recipe's family and largest size; its sha256; and
    for a hub id, the id and the commit it resolved to."""
    from weit_cli.arch._registry import detect_family
    from weit_cli.io.files import checkpoint_sha256, load_dense
    from weit_cli.io.hub import resolve as resolve_source
    from weit_cli.training.nested import largest_arch

    src, hub = resolve_source(recipe.teacher.source)
    state, hints = load_dense(src)
    adapter, want = largest_arch(recipe, num_classes)
    found = detect_family(state.keys())
    if found.family != adapter.family:
        raise InputError(f"teacher {src} is a {found.family} checkpoint, the recipe trains the {adapter.family} family",
                         f"use a {adapter.family} teacher, or a recipe of its family")
    state = adapter.loadable(state)
    arch = adapter.infer_arch(state, hints)
    if arch != want:
        import dataclasses

        diff = [f"{f.name} {getattr(arch, f.name)} (recipe: {getattr(want, f.name)})" for f in dataclasses.fields(arch)
                if getattr(arch, f.name) != getattr(want, f.name)]
        raise InputError(
            f"teacher {src} does not match the recipe's largest size: {', '.join(diff) or adapter.describe(arch)}",
            "make the recipe's largest nested size and model settings the teacher's (nested.depths, nested.widths, model.*)",
        )
    return {k: v.detach().float() if v.is_floating_point() else v for k, v in state.items()}, checkpoint_sha256(src), hub


def _validate(task: Task, net: NestedModel, ds, largest, smallest, dev, calibrate=None, roles: bool = False) -> dict[str, float]:
    """The validation metric and loss of the largest and smallest size (`val_acc_largest`, …); with
    `roles`, for results, also under role keys (`val_metric_largest`; the loop's progress lines keep
    the legacy names only)."""
    out = {}
    for name, (d, w) in (("largest", largest), ("smallest", smallest)):
        r = task.evaluate(net.frozen(d, w, calibrate), ds, batch_size=512, device=dev)
        out[f"val_{task.metric_key}_{name}"] = r.metric
        out[f"val_loss_{name}"] = r.loss
    if roles:
        out |= {f"val_metric_{name}": out[f"val_{task.metric_key}_{name}"] for name in ("largest", "smallest")}
    return out


def _head(ds, n: int):
    from torch.utils.data import TensorDataset

    return TensorDataset(*(t[:n] for t in ds.tensors))


def _rng_json(rng: random.Random) -> list:
    v, s, g = rng.getstate()
    return [v, list(s), g]


def _digest(b: Bundle) -> str:
    h = hashlib.sha256()
    for k, v in sorted(b.to_tensors().items()):
        h.update(k.encode())
        h.update(v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _gather(digest: str, world: int) -> list[str]:
    if world == 1:
        return [digest]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, digest)
    return out


