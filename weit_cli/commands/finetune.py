"""`finetune`: ordinary training of a dense model of any family — no constraint — with a choice of
initialisation.

MODEL is a materialized model (the family's folder, or a bare .safetensors whose metadata holds its
architecture), any checkpoint weit can read, or a hub id. It fixes the architecture and, with
`--init weit` (the default), the starting weights. The baselines start the same architecture
elsewhere: `--init random` (the family's own initialisation) and `--init weight-selection --from
DENSE` (a subset of a larger dense checkpoint, core/selection.py). All three then run through this
same loop, in stages: `_setup` (model, task, data, head plan), `_build`, `_loop` (with `_Record`, the
epoch hooks), `_start` (resume or a new run folder), then the summary.

A run folder holds:
    args.json           the resolved options (a resumed run must match them)
    metrics.json        one record per epoch (0 = before training): train loss, val/test accuracy, time
    last/, best/        the family's folders (config.json + weights), written atomically
    state.safetensors   (+ .json) weights, optimizer and RNG states after the last finished epoch
Under torchrun every rank trains on its shard of each batch (DDP); rank 0 evaluates and writes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from weit_cli.errors import InputError, OutputError, WeitError
from weit_cli.io.files import checkpoint_sha256
from weit_cli.options import FINETUNE, SEED, FinetuneRun, check

STATE = "state.safetensors"
#: Options that define a run; `--resume` refuses to continue a run made with other values.
RUN_KEYS = (
    "model_sha256", "init", "source_sha256", "data", "epochs", "lr", "warmup", "schedule", "min_lr_ratio",
    "batch_size", "weight_decay", "grad_clip", "label_smoothing", "train_subset", "data_seed", "val_fraction",
    "reset_head", "seed", "world_size", "ema",
)
EMA_WARMUP_POWER = 0.75  # --ema's warm-up: decay at update k = min(--ema, 1 - (1 + k)^-0.75) (training/loop.make_ema)


def finetune(
    model: Path,
    out_dir: Path,
    *,
    data: str,
    epochs: int,
    init: str = FINETUNE.init,
    source: Path | None = None,
    lr: float = FINETUNE.lr,
    warmup: float = FINETUNE.warmup,
    schedule: str = FINETUNE.schedule,
    min_lr_ratio: float = FINETUNE.min_lr_ratio,
    batch_size: int = FINETUNE.batch_size,
    weight_decay: float = FINETUNE.weight_decay,
    grad_clip: float = FINETUNE.grad_clip,
    label_smoothing: float = FINETUNE.label_smoothing,
    train_subset: float | int | None = None,
    data_seed: int = SEED,
    val_fraction: float = 0.1,
    reset_head: bool = False,
    seed: int = SEED,
    resume: bool = False,
    force: bool = False,
    device: str | None = None,
    eval_batch_size: int = 256,
    on_step: Callable[[Any], None] | None = None,
    ema: float = FINETUNE.ema,
) -> dict[str, Any]:
    """Train MODEL's architecture on `data` for `epochs`; returns a summary. Every rank calls this."""
    from weit_cli.training.dist import cleanup_distributed, setup_distributed

    from weit_cli.io.hub import resolve as resolve_source

    out_dir = Path(out_dir)
    _check_options(
        init, source, epochs=epochs, lr=lr, warmup=warmup, schedule=schedule, min_lr_ratio=min_lr_ratio, batch_size=batch_size,
        weight_decay=weight_decay, grad_clip=grad_clip, label_smoothing=label_smoothing, ema=ema, seed=seed, data_seed=data_seed,
    )
    model, model_hub = resolve_source(model)  # a hub id (hf-hub:ORG/NAME) as its cached folder
    source, source_hub = resolve_source(source) if source is not None else (None, None)
    for what, path in (("MODEL", model), ("--from", source)):
        if path is not None and not Path(path).exists():
            raise InputError(f"{what} {path} does not exist", "check the path")
    hub = {k: v for k, v in (("model", model_hub), ("from", source_hub)) if v is not None}
    _check_run_dir(out_dir, resume, force)
    options = dict(
        model=model, out_dir=out_dir, data=data, epochs=epochs, init=init, source=source, lr=lr, warmup=warmup,
        schedule=schedule, min_lr_ratio=min_lr_ratio, batch_size=batch_size, weight_decay=weight_decay,
        grad_clip=grad_clip, label_smoothing=label_smoothing, train_subset=train_subset, data_seed=data_seed,
        val_fraction=val_fraction, reset_head=reset_head, seed=seed, resume=resume, eval_batch_size=eval_batch_size,
        on_step=on_step, hub=hub, ema=ema,
    )
    dist = setup_distributed(device)
    try:
        return _run(dist=dist, **options)
    except OutputError as e:  # a full disk, a folder gone read-only
        if dist[0] != 0:
            raise
        raise _after_failed_write(e, out_dir, resume) from None
    finally:
        cleanup_distributed()


def _after_failed_write(e: OutputError, out_dir: Path, resume: bool) -> OutputError:
    """What a failed write (a full disk) leaves. Before the first epoch's checkpoint there is nothing
    to continue from, so a fresh run removes its folder: the same command runs again once there is
    space, with no --force. After it, the folder stays and --resume continues from the last epoch
    saved (the checkpoint is written atomically first, so it is always whole)."""
    if (out_dir / STATE).is_file():
        return OutputError(e.message, "free some space, then continue with the same command plus --resume")
    partial = out_dir.is_dir() and all(
        p.name in ("args.json", "metrics.json") or p.name.endswith((".tmp", ".old")) for p in out_dir.iterdir()
    )
    if partial and not resume:
        shutil.rmtree(out_dir, ignore_errors=True)
        return OutputError(e.message, "nothing was kept (no epoch finished); free some space and run it again")
    return e


def _check_options(init: str, source, **values) -> None:
    """The options' ranges and choices (options.FinetuneRun), then --from, which only --init
    weight-selection takes."""
    check(FinetuneRun, init=init, **values)
    if init == "weight-selection" and source is None:
        raise WeitError("--init weight-selection needs --from DENSE_CHECKPOINT", "pass the larger dense model to select from")
    if init != "weight-selection" and source is not None:
        raise WeitError(f"--from is only used by --init weight-selection (got --init {init})", "drop --from or change --init")


def _check_run_dir(out_dir: Path, resume: bool, force: bool) -> None:
    if resume:
        if not (out_dir / "args.json").is_file() or not (out_dir / STATE).is_file():
            raise InputError(
                f"--resume: {out_dir} holds no resumable finetune run (none started, already finished, or stopped before its first epoch ended)",
                "start it (again) without --resume, with --force if the folder exists",
            )
        if not os.access(out_dir, os.W_OK):
            raise OutputError(f"run folder {out_dir} is not writable", "make it writable to continue the run there")
        return
    parent = out_dir.parent if str(out_dir.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output folder {parent} does not exist", f"create it first: mkdir -p {parent}")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output folder {parent} is not writable", "choose another -o")
    if out_dir.exists():
        if not force:
            raise OutputError(f"{out_dir} already exists", "pass --resume to continue it, --force to start over, or choose another -o")
        if not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / "args.json").is_file()):
            raise OutputError(f"{out_dir} is not a finetune run folder; --force will not delete it", "choose another -o")


# ---------------------------------------------------------------------------------------------- the model
def read_model(path: Path, need_weights: bool) -> tuple[Any, Any, dict[str, Tensor] | None]:
    """(adapter, architecture, weights) of MODEL. A folder with only its library's config.json is
    enough when the weights are not used (`--init random` / `weight-selection`): its family reads it
    (`Adapter.arch_from_config`)."""
    from weit_cli.arch._registry import arch_from_config
    from weit_cli.io.dense import read_dense
    from weit_cli.io.files import weights_file

    path = Path(path)
    cfg = path / "config.json"
    weightless = path.is_dir() and cfg.is_file() and weights_file(path) is None
    if weightless:
        if need_weights:
            raise InputError(f"{path} holds a config.json but no weights", "--init weit needs a materialized model; or use --init random")
        (adapter, arch), weights = arch_from_config(cfg), None
    else:
        dense = read_dense(path)
        adapter, arch = dense.adapter, dense.arch
        weights = dense.state  # the weights, less the keys the family's library skips on load
    if weights is not None:
        from weit_cli.core.checks import check_state

        check_state(adapter, arch, weights)
        weights = {k: (v.float() if v.is_floating_point() else v) for k, v in weights.items()}
    return adapter, arch, weights


def initial_state(adapter, arch, init: str, weights, source: Path | None, seed: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The starting weights for `init` and a record of where they came from."""
    from weit_cli.core.selection import random_init, weight_selection

    if init == "weit":
        return {k: v.clone() for k, v in weights.items()}, {"init": "weit"}
    fresh = random_init(adapter, arch, seed)
    if init == "random":
        return fresh, {"init": "random", "seed": seed}
    src_adapter, src_arch, src_state = read_model(source, need_weights=True)
    if src_adapter.family != adapter.family:
        raise InputError(f"--from {source} is a {src_adapter.family}, MODEL is a {adapter.family}", "select from a model of the same family")
    state = weight_selection(src_state, src_arch, arch, fresh)
    return state, {"init": "weight-selection", "source": src_adapter.describe(src_arch), "source_sha256": checkpoint_sha256(source)}


# ---------------------------------------------------------------------------------------------- the loop
def _run(*, model, out_dir, data, epochs, init, source, lr, warmup, schedule, min_lr_ratio, batch_size, weight_decay,
         grad_clip, label_smoothing, train_subset, data_seed, val_fraction, reset_head, seed, resume, eval_batch_size,
         on_step, dist, hub=None, ema=0.0) -> dict[str, Any]:
    from weit_cli.training.dist import barrier

    rank, world, dev = dist
    t_begin = time.perf_counter()
    if batch_size % world:
        raise WeitError(f"--batch-size {batch_size} does not split over {world} processes", f"use a multiple of {world}")
    setup = _setup(model, data, init, label_smoothing, data_seed, val_fraction, train_subset, reset_head, seed)
    adapter, arch, task, splits, new_head = setup.adapter, setup.arch, setup.task, setup.splits, setup.new_head
    args = {
        "model": str(model), "model_sha256": checkpoint_sha256(model), "init": init, "source": str(source) if source else None,
        "source_sha256": checkpoint_sha256(source) if source else None, "data": data, "data_description": splits.description,
        "epochs": epochs, "lr": lr, "warmup": warmup, "schedule": schedule, "min_lr_ratio": min_lr_ratio,
        "batch_size": batch_size, "weight_decay": weight_decay, "grad_clip": grad_clip, "label_smoothing": label_smoothing,
        "train_subset": train_subset, "data_seed": data_seed, "val_fraction": val_fraction, "reset_head": reset_head,
        "seed": seed, "world_size": world, "architecture": arch.to_dict(), "new_head": new_head,
        **({"hub": hub} if hub else {}),  # hub ids and the commits they resolved to
        **({"ema": ema} if ema else {}),  # only when set: args.json of a run without it stays as it was
    }
    state0, origin = initial_state(adapter, arch, init, setup.weights, source, seed)
    if hub:
        origin["hub"] = hub
    if ema:  # last/ and best/ hold the EMA weights
        origin = {**origin, "weights": "ema", "ema_decay": ema, "ema_warmup_power": EMA_WARMUP_POWER}
    if new_head and init == "weight-selection":
        state0.update({k: v for k, v in _fresh(adapter, arch, seed).items() if k in adapter.classifier})
    net, train_mod = _build(adapter, arch, state0, seed, dev, world)
    loop, record = _loop(setup, net, train_mod, out_dir, args, origin, dist, epochs=epochs, lr=lr, warmup=warmup,
                         schedule=schedule, min_lr_ratio=min_lr_ratio, batch_size=batch_size, weight_decay=weight_decay,
                         grad_clip=grad_clip, seed=seed, eval_batch_size=eval_batch_size, on_step=on_step, ema=ema)
    start_epoch = _start(loop, record, out_dir, args, resume, rank)
    loop.run()
    if rank == 0:  # finished: the resumable state is no longer needed (last/ holds the weights)
        loop.discard_checkpoint()
    barrier()
    metric = task.metric
    return {
        "command": "finetune",
        "output": str(out_dir),
        "init": origin,
        "architecture": arch.to_dict(),
        "description": adapter.describe(arch),
        "new_head": new_head,
        "epochs": epochs,
        "steps": loop.plan.total_steps,
        "resumed_from_epoch": start_epoch if resume else None,
        "final": record.metrics[-1] if record.metrics else {},
        "best": record.best,
        "metric": task.metric_name,  # legacy string; `metric_info` describes the metric
        "metric_info": metric.to_dict(),
        **metric.entries("test_{}_by_epoch", [m.get(f"test_{metric.name}") for m in record.metrics]),
        "data": splits.description,
        "device": str(dev),
        "world_size": world,
        "wall_s": round(time.perf_counter() - t_begin, 2),
        "files": [str(out_dir / n) for n in ("metrics.json", "last", "best", "args.json")],
    }


@dataclass
class _Setup:
    """MODEL read and the data loaded for its task, with the head plan."""

    adapter: Any
    arch: Any  # with the data's classes when the classifier is new
    weights: dict[str, Tensor] | None  # MODEL's weights (for --init weit), a new classifier's included
    task: Any
    splits: Any
    new_head: bool
    files: dict[str, Any]  # the task's companion files, written beside last/ and best/


def _setup(model, data, init, label_smoothing, data_seed, val_fraction, train_subset, reset_head, seed) -> _Setup:
    from weit_cli.tasks._registry import task_for

    adapter, arch, weights = read_model(model, need_weights=init == "weit")
    task = task_for(adapter, label_smoothing=label_smoothing)
    task.adopt(task.companions_of(model))  # data prepared as MODEL was trained on (its control_config.json)
    splits = task.load_data(data, arch, seed=data_seed, val_fraction=val_fraction, train_subset=train_subset)
    classes = task.classes(splits)
    if classes is None and reset_head:
        raise WeitError(f"--reset-head replaces a classifier; a {adapter.family} has none", "leave --reset-head out")
    new_head = reset_head or (classes is not None and classes != arch.num_classes)
    # Written beside last/ and best/ (the control task's state statistics); passed only when there
    # are any, so `_write_model`'s call is the same as before for the other tasks.
    files = task.companion_files(splits)
    if new_head and not adapter.classifier:
        raise WeitError(
            f"this model's {arch.num_classes} classes are part of every block and cannot be replaced (the data has {classes})",
            "finetune on data with the model's classes, without --reset-head",
        )
    if new_head:
        arch = replace(arch, num_classes=classes)
        if weights is not None:
            weights = {k: v for k, v in weights.items() if k not in adapter.classifier}
            weights.update({k: v for k, v in _fresh(adapter, arch, seed).items() if k in adapter.classifier})
    return _Setup(adapter, arch, weights, task, splits, new_head, files)


def _build(adapter, arch, state0: dict[str, Tensor], seed: int, dev, world: int) -> tuple[nn.Module, nn.Module]:
    """(the model with its starting weights on `dev`, in training mode; what the loop calls: the
    task's call signature (the model itself for a classifier), wrapped in DDP under torchrun)."""
    from weit_cli.training.dist import seed_everything

    seed_everything(seed)
    net = adapter.build(arch)
    with torch.no_grad():
        net.load_state_dict(state0, strict=True)
    net.to(dev).train()
    train_mod: nn.Module = adapter.task_forward(net)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_mod = DistributedDataParallel(train_mod, device_ids=[dev.index] if dev.type == "cuda" else None)
    return net, train_mod


class _Record:
    """The run's record across epochs (metrics per epoch, the best, wall time) and the loop's epoch
    hooks that keep it: rank 0 evaluates and writes last/, best/ and metrics.json."""

    def __init__(self, setup: _Setup, net: nn.Module, out_dir: Path, args, origin, rank: int, dev, eval_batch_size: int, per_epoch: int):
        self.setup, self.net, self.out_dir, self.args, self.origin = setup, net, out_dir, args, origin
        self.rank, self.dev, self.eval_batch_size, self.per_epoch = rank, dev, eval_batch_size, per_epoch
        self.key = setup.task.metric_key  # val_acc / test_acc, or val_loss / test_loss
        self.scored = setup.adapter.task_forward(net)
        self.with_files = {"files": setup.files} if setup.files else {}
        self.metrics: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.wall, self.finished, self.improved = 0.0, 0, False
        self.loop = None  # set by _loop: its `ema_weights()` swaps in the EMA weights (--ema) to score and write

    def ema_weights(self):
        from contextlib import nullcontext

        return self.loop.ema_weights() if self.loop is not None else nullcontext()

    def better(self, a: float, b: float) -> bool:
        return a > b if self.setup.task.higher_is_better else a < b

    def evaluate_all(self, epoch: int, train_loss: float | None) -> dict[str, Any]:
        with self.ema_weights():  # with --ema, the EMA weights are scored (and written: write_epoch)
            return self._scores(epoch, train_loss)

    def _scores(self, epoch: int, train_loss: float | None) -> dict[str, Any]:
        task, splits, key = self.setup.task, self.setup.splits, self.key
        val = task.evaluate(self.scored, splits.val, self.eval_batch_size, self.dev) if len(splits.val) else None
        test = task.evaluate(self.scored, splits.test, self.eval_batch_size, self.dev) if splits.test is not None and len(splits.test) else None
        return {
            "epoch": epoch, "step": epoch * self.per_epoch, "train_loss": train_loss,
            f"val_{key}": val.metric if val else None, "val_loss": val.loss if val else None,
            f"test_{key}": test.metric if test else None, "test_loss": test.loss if test else None,
            "val_metric": val.metric if val else None, "test_metric": test.metric if test else None,
        }

    def end_epoch(self, epoch: int, train_loss: float, lr_now: float, seconds: float) -> dict[str, float]:
        key = self.key
        self.finished = epoch
        if self.rank != 0:
            self.wall += seconds
            return {}
        t1 = time.perf_counter()
        rec = self.evaluate_all(epoch, train_loss)
        self.wall += seconds + (time.perf_counter() - t1)
        rec.update(lr=lr_now, train_s=round(seconds, 3), wall_s=round(self.wall, 3))
        self.metrics.append(rec)
        self.improved = rec[f"val_{key}"] is not None and (self.best is None or self.better(rec[f"val_{key}"], self.best[f"val_{key}"]))
        if self.improved:
            self.best = {"epoch": epoch, f"val_{key}": rec[f"val_{key}"], f"test_{key}": rec[f"test_{key}"],
                         "val_metric": rec[f"val_{key}"], "test_metric": rec[f"test_{key}"]}
        return {k: rec[k] for k in (f"val_{key}", f"test_{key}") if rec[k] is not None}

    def write_epoch(self, epoch: int) -> None:  # after the epoch's checkpoint (the loop's order, for --resume)
        adapter, arch = self.setup.adapter, self.setup.arch
        with self.ema_weights():
            cpu = {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
        _write_model(adapter, arch, cpu, self.out_dir / "last", {**self.origin, "epoch": epoch}, **self.with_files)
        if self.improved:
            _write_model(adapter, arch, cpu, self.out_dir / "best", {**self.origin, "epoch": epoch}, **self.with_files)
        _write_json(self.out_dir / "metrics.json", _metrics_doc(self.args, self.origin, self.metrics, self.best))

    def state(self) -> dict[str, Any]:
        return {"epoch": self.finished, "metrics": self.metrics, "best": self.best, "wall_s": self.wall}


def _loop(setup: _Setup, net, train_mod, out_dir: Path, args, origin, dist, *, epochs, lr, warmup, schedule, min_lr_ratio,
          batch_size, weight_decay, grad_clip, seed, eval_batch_size, on_step, ema=0.0):
    """(the training loop, the record its epoch hooks keep): AdamW, each rank's shard of each batch, the schedule."""
    from weit_cli.training.batches import Batches
    from weit_cli.training.loop import Loop, Plan, make_ema, rank_generator
    from weit_cli.training.optim import adamw

    rank, world, dev = dist
    named = dict(net.named_parameters())
    opt = adamw(named, lr=lr, weight_decay=weight_decay, no_decay_keys=setup.adapter.no_decay)
    batches = Batches(setup.splits.train, batch_size // world, seed=seed, rank=rank, world_size=world)
    per_epoch = batches.batches_per_epoch
    total = epochs * per_epoch
    warm = round(warmup * per_epoch)
    record = _Record(setup, net, out_dir, args, origin, rank, dev, eval_batch_size, per_epoch)
    task = setup.task
    plan = Plan(
        total, lambda step: _lr(step, lr, total, warm, schedule, min_lr_ratio), grad_clip, steps_per_epoch=per_epoch,
        diverged_hint="lower --lr or add --warmup",
    )
    loop = Loop(
        plan, optimizer=opt, params=named, batches=batches, device=dev,
        loss_step=lambda batch: task.train_loss(train_mod, task.prepare(batch)),
        end_epoch=record.end_epoch, write_epoch=record.write_epoch, checkpoint=out_dir / STATE, tensors=net.state_dict,
        state=record.state, on_step=on_step, rank=rank, world_size=world, ema=make_ema(named, ema, EMA_WARMUP_POWER),
        noise=rank_generator(world) if hasattr(task, "generator") else None,
    )
    if loop.noise is not None:
        task.generator = loop.noise  # under torchrun: this process's own diffusion noise (training/loop.py)
    record.loop = loop
    return loop, record


def _start(loop, record: _Record, out_dir: Path, args: dict[str, Any], resume: bool, rank: int) -> int:
    """Continue the run in `out_dir` (--resume: the same options, from the last finished epoch) or
    create its folder and record epoch 0 (before training); returns the epoch it starts from."""
    from weit_cli.training.dist import barrier
    from weit_cli.training.resume import check_same_run

    start_epoch = 0
    if resume:
        def other_options(diff: list[str], old) -> InputError:
            return InputError(
                f"--resume: {out_dir} was started with other options ({', '.join(f'{k} {old.get(k)!r}→{args.get(k)!r}' for k in diff[:3])})",
                "resume with the same options, or start over with --force",
            )

        check_same_run(json.loads((out_dir / "args.json").read_text()), args, RUN_KEYS, other_options)
        st = loop.resume()
        record.metrics, record.best, start_epoch, record.wall = st["metrics"], st["best"], int(st["epoch"]), float(st["wall_s"])
        if rank == 0:
            s = record.setup
            with record.ema_weights():  # --ema: last/ and best/ hold the EMA weights, as the epoch wrote them
                _complete_run_folder(out_dir, s.adapter, s.arch, record.net, record.origin, args, record.metrics, record.best, start_epoch, record.with_files)
    elif rank == 0:
        try:
            if out_dir.exists():
                shutil.rmtree(out_dir)
            out_dir.mkdir()
        except OSError as e:
            raise OutputError(f"cannot create the run folder {out_dir}: {e.strerror}", "check free disk space and permissions") from None
        _write_json(out_dir / "args.json", args)
    barrier()

    if not resume:
        t0 = time.perf_counter()
        if rank == 0:
            rec = record.evaluate_all(0, None)
            record.wall += time.perf_counter() - t0
            record.metrics = [{**rec, "lr": 0.0, "train_s": 0.0, "wall_s": round(record.wall, 3)}]
            _write_json(out_dir / "metrics.json", _metrics_doc(args, record.origin, record.metrics, record.best))
        barrier()
    return start_epoch


def epoch_of(folder: Path) -> int | None:
    """The epoch a run folder's last/ or best/ model was written after (its provenance), whatever the
    family's weights file is called; None when there is no readable model there."""
    from weit_cli.io.files import read_header, weights_file

    found = weights_file(Path(folder)) if Path(folder).is_dir() else None
    if found is None:
        return None
    try:
        return json.loads((read_header(found).get("__metadata__") or {})["provenance"]).get("epoch")
    except (WeitError, KeyError, ValueError, AttributeError):
        return None


def _complete_run_folder(out_dir: Path, adapter, arch, net: nn.Module, origin, args, metrics, best, epoch: int, with_files: dict | None = None) -> None:
    """On --resume: an epoch writes its checkpoint first, then last/, best/ and metrics.json; a kill in
    between leaves those one epoch behind. Write them again from the checkpoint (the very bytes the
    epoch would have written), and remove temp files a killed writer left."""
    from weit_cli.io.files import remove_stale_temps

    for name in (STATE, STATE + ".json", "args.json", "metrics.json", "last", "best"):
        remove_stale_temps(out_dir / name)
    with_files = with_files or {}
    cpu = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    if epoch_of(out_dir / "last") != epoch:
        _write_model(adapter, arch, cpu, out_dir / "last", {**origin, "epoch": epoch}, **with_files)
    if best is not None and best["epoch"] == epoch and epoch_of(out_dir / "best") != epoch:
        _write_model(adapter, arch, cpu, out_dir / "best", {**origin, "epoch": epoch}, **with_files)
    _write_json(out_dir / "metrics.json", _metrics_doc(args, origin, metrics, best))


def _fresh(adapter, arch, seed: int) -> dict[str, Tensor]:
    from weit_cli.core.selection import random_init

    return random_init(adapter, arch, seed)


def _floor(schedule: str, min_lr_ratio: float) -> float:
    return 1.0 if schedule == "constant" else min_lr_ratio


def _lr(step: int, lr: float, total: int, warm: int, schedule: str, min_lr_ratio: float) -> float:
    from weit_cli.training.optim import lr_at

    return lr_at(step, base_lr=lr, total_steps=total, warmup_steps=warm, min_lr_ratio=_floor(schedule, min_lr_ratio))


def _metrics_doc(args: dict[str, Any], origin: dict[str, Any], metrics: list[dict[str, Any]], best) -> dict[str, Any]:
    return {"init": origin, "options": {k: args[k] for k in RUN_KEYS if k in args}, "data": args["data_description"], "best": best, "epochs": metrics}


def _write_json(path: Path, obj: Any) -> None:
    from weit_cli.io.files import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _write_model(adapter, arch, state: dict[str, Tensor], out: Path, provenance: dict[str, Any], files=None) -> None:
    """The family's folder, written like `materialize` writes (atomically, replacing the old one),
    with the task's companion `files` of the finetuning data."""
    from weit_cli.core.bundle import COMPANIONS, Bundle
    from weit_cli.io.export import write_model

    extra = {COMPANIONS: files} if files else {}
    dense = Bundle(adapter, arch, {}, {}, state, extra)  # a bundle with no templates: every tensor is 'small'
    write_model(dense, out, torch.float32, {"command": "finetune", **provenance}, force=True)
