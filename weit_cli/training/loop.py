"""One staged training loop for pretrain, fit-scalers, distillation and finetune.

    setup (the command) → loss step → evaluate → checkpoint/resume → write (the command)

A command builds its model, optimizer and batch stream, then hands the loop its stages: the loss of
one batch (`loss_step`, where the command's Task computes it), an evaluation every N steps
(`evaluate`, step-based runs) or at the end of each epoch (`end_epoch`, epoch-based runs), the
JSON-able state its resume needs (`state`), and what it writes after each epoch's checkpoint
(`write_epoch`). The loop owns everything in between, in one fixed order that the byte-identical
golden test depends on:

    lr(step) set → batch drawn and moved → loss under autocast → zero_grad → backward → clip → step
    → a non-finite loss refused → evaluate → progress → checkpoint (rank 0) → barrier

Resume is exact: a checkpoint holds the tensors, the optimizer, every RNG state and the position in
the batch stream; the command's own state (an RNG of its own, metrics so far) rides along. Under
torchrun every rank runs the loop; rank 0 writes checkpoints and reports progress.

Two options of a step: an exponential moving average of the trainable tensors (`ema`, diffusers'
`EMAModel`, stepped after every optimiser step; its shadow tensors and step count ride in the
checkpoint), and, under torchrun, a generator for the task's per-step draws (`noise`: diffusion's
noise and timesteps) that the loop reseeds from (seed, rank, step) before every step, so that each
process draws its own and a resumed run draws what it would have. A single process passes none
(`rank_generator`) and keeps drawing from the global generator, as before. Ctrl-C (and
SIGTERM, which the CLI turns into it) becomes a one-line error naming the checkpoint that is kept.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from weit_cli.errors import EXIT_INTERRUPTED, InputError, WeitError
from weit_cli.io.checkpoint import (
    checkpoint_exists,
    checkpoint_paths,
    load_checkpoint,
    save_checkpoint,
)
from weit_cli.training import optim
from weit_cli.training.batches import Batches
from weit_cli.training.dist import barrier, device_autocast, mean_over_ranks
from weit_cli.training.optim import set_lr
from weit_cli.training.progress import StepCallback, StepInfo, Throughput

Batch = tuple[Tensor, ...]


@dataclass(frozen=True)
class Plan:
    """How long to train, at which learning rate, and when to evaluate and checkpoint."""

    total_steps: int
    lr: Callable[[int], float]  # the learning rate of 0-based step
    grad_clip: float  # global gradient-norm clip (≤ 0: off)
    steps_per_epoch: int = 0  # > 0: epoch-based; `end_epoch`, a checkpoint and `write_epoch` after every epoch
    eval_every: int = 0  # step-based: `evaluate` every N steps, not after the last (the command's final one is)
    checkpoint_every: int = 0  # step-based: a checkpoint every N steps, not after the last
    diverged: str = "training diverged at step {step} (loss {loss})"  # a non-finite loss; 1-based step
    diverged_hint: str = "lower the learning rate"


def rank_generator(world_size: int) -> torch.Generator | None:
    """The per-process generator of a task's per-step draws under torchrun; None for one process
    (the global generator, whose state checkpoints save: a single process draws as before)."""
    return torch.Generator() if world_size > 1 else None


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of `rank`'s draws at 0-based `step` (distinct per rank and step; no state to resume)."""
    return (int(seed) * 1_000_003 + int(rank) * 998_244_353 + int(step) * 7919 + 271_828) % (2**63 - 1)


def make_ema(params: dict[str, Tensor], decay: float, warmup_power: float = 0.0):
    """diffusers' `EMAModel` over `params` (None when `decay` is 0). Its decay at update k is
    min(decay, 1 − (1 + k)^−warmup_power) (diffusers' `use_ema_warmup`), or with `warmup_power` 0
    min(decay, (1 + k)/(10 + k)), diffusers' default; k counts from 0 at the first update."""
    if not decay:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(list(params.values()), decay=decay, use_ema_warmup=warmup_power > 0, power=warmup_power or 2 / 3)


def check_resume(checkpoint: Path, resume: bool, force: bool) -> None:
    """Before any work: --resume needs a checkpoint, and a leftover one needs --resume or --force."""
    if resume and not checkpoint_exists(checkpoint):
        raise InputError(f"--resume: no checkpoint {checkpoint} to continue", "run without --resume to start afresh")
    if not resume and not force and checkpoint_exists(checkpoint):
        raise InputError(
            f"a checkpoint of an unfinished run exists: {checkpoint}",
            "pass --resume to continue it, or --force to start over",
        )


class Loop:
    """The training steps of one run; see the module doc for the stages and their order."""

    def __init__(
        self,
        plan: Plan,
        *,
        optimizer: torch.optim.Optimizer,
        params: dict[str, Tensor],
        batches: Batches,
        device: torch.device,
        loss_step: Callable[[Batch], Tensor],
        evaluate: Callable[[int], dict[str, float]] | None = None,
        end_epoch: Callable[[int, float, float, float], dict[str, float]] | None = None,
        write_epoch: Callable[[int], None] | None = None,
        checkpoint: Path | None = None,
        tensors: Callable[[], dict[str, Tensor]] | None = None,
        state: Callable[[], dict[str, Any]] | None = None,
        on_step: StepCallback | None = None,
        rank: int = 0,
        world_size: int = 1,
        ema=None,
        noise: torch.Generator | None = None,
    ):
        """`params` are clipped (the trainable tensors); `tensors()` is what a checkpoint holds and a
        resume restores in place (default: `params`). `end_epoch(epoch, train_loss, lr, seconds)`
        runs on every rank and returns the metrics to show; `write_epoch(epoch)` runs on rank 0 after
        the epoch's checkpoint. `ema`: an EMAModel over `params` (`make_ema`); `noise`: the task's
        generator under torchrun (`rank_generator`), reseeded by `step_seed` before every step."""
        self.plan, self.optimizer, self.params, self.batches, self.device = plan, optimizer, params, batches, device
        self.loss_step, self.evaluate, self.end_epoch, self.write_epoch = loss_step, evaluate, end_epoch, write_epoch
        self.checkpoint, self.state = checkpoint, state
        self.tensors = tensors if tensors is not None else (lambda: params)
        self.on_step, self.rank, self.world_size = on_step, rank, world_size
        self.ema, self.noise = ema, noise
        self.start = 0
        self.resumed = False
        self.losses: list[float] = []  # every step's loss in this process
        self.seconds = 0.0  # time spent in `run`

    # ------------------------------------------------------------------------------------------ resume
    def resume(self, check: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Restore the checkpoint: optimizer and RNG states, the tensors (in place), the batch position.
        `check(state)` refuses a checkpoint of another run first. Returns the command's state."""
        params, state = load_checkpoint(self.checkpoint, optimizer=self.optimizer)
        if check is not None:
            check(state)
        target = {**self.tensors(), **self._ema_tensors()}
        if set(params) != set(target):
            raise InputError(f"{self.checkpoint} does not hold this model's parameters", "start over with --force")
        with torch.no_grad():
            for k, v in params.items():
                target[k].copy_(v.to(target[k].device))
        self.batches.load_state(state["data"])
        if self.ema is not None:
            self.ema.optimization_step = int(state["ema_step"])
        self.start = int(state["step"]) if "step" in state else int(state["epoch"]) * self.plan.steps_per_epoch
        self.resumed = True
        return state

    def save(self, done: int) -> None:
        save_checkpoint(
            self.checkpoint, params={**self.tensors(), **self._ema_tensors()}, optimizer=self.optimizer,
            state={"step": done, "data": self.batches.state(), **self._ema_state(), **(self.state() if self.state else {})},
        )

    def _ema_tensors(self) -> dict[str, Tensor]:
        """The EMA's shadow tensors as a checkpoint holds them (live: a resume copies into them)."""
        if self.ema is None:
            return {}
        return {f"ema.{k}": v for k, v in zip(self.params, self.ema.shadow_params)}

    def _ema_state(self) -> dict[str, Any]:
        return {} if self.ema is None else {"ema_step": self.ema.optimization_step}

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """The EMA weights in the trained tensors for the block (evaluating, writing), then the last
        weights back, so that training and its checkpoint go on from them; nothing without an EMA."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.params.values())
        self.ema.copy_to(self.params.values())
        try:
            yield
        finally:
            self.ema.restore(self.params.values())

    def use_ema(self) -> dict[str, Any] | None:
        """Put the EMA weights into the trained tensors (after `run`, before the final evaluation and
        writing); returns what provenance records of them, or None without an EMA."""
        if self.ema is None:
            return None
        self.ema.copy_to(self.params.values())
        return {"weights": "ema", "ema_decay": self.ema.decay, "ema_warmup_power": self.ema.power if self.ema.use_ema_warmup else 0.0,
                "ema_updates": self.ema.optimization_step, "ema_last_decay": self.ema.cur_decay_value}

    def discard_checkpoint(self) -> None:
        """The run is written: its resumable state is no longer needed (call on rank 0)."""
        if self.checkpoint is not None:
            for p in checkpoint_paths(self.checkpoint):
                p.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------ the steps
    def run(self) -> None:
        plan, total, per_epoch = self.plan, self.plan.total_steps, self.plan.steps_per_epoch
        clock = Throughput(self.start, total)
        self._last_ckpt = self.start if self.resumed else None  # step-based: the step of the kept checkpoint
        self._saved_epoch = self.start // per_epoch if per_epoch else 0  # epoch-based: the last finished epoch
        self._step = self.start
        loss_sum, n, t_epoch = torch.zeros((), dtype=torch.float64), 0, time.perf_counter()
        t0 = time.perf_counter()
        try:
            for step in range(self.start, total):
                self._step = step
                epoch = step // per_epoch + 1 if per_epoch else self.batches.epoch
                if per_epoch and step % per_epoch == 0:
                    loss_sum, n, t_epoch = torch.zeros((), dtype=torch.float64), 0, time.perf_counter()
                lr = plan.lr(step)
                set_lr(self.optimizer, lr)
                if self.noise is not None:
                    self.noise.manual_seed(step_seed(self.batches.seed, self.rank, step))
                batch = tuple(t.to(self.device, non_blocking=True) for t in self.batches.next())
                with device_autocast(self.device):
                    loss = self.loss_step(batch)
                value = optim.optimizer_step(self.optimizer, loss, self.params.values(), max_norm=plan.grad_clip)
                if not math.isfinite(value):
                    raise WeitError(plan.diverged.format(step=step + 1, loss=value), plan.diverged_hint)
                if self.ema is not None:
                    self.ema.step(self.params.values())
                self.losses.append(value)
                done = step + 1
                metrics: dict[str, float] = {}
                if plan.eval_every and done % plan.eval_every == 0 and done < total and self.evaluate is not None:
                    metrics = self.evaluate(done)
                if self.on_step is not None and self.rank == 0:
                    sps, eta = clock(done)
                    self.on_step(StepInfo(done, total, value, lr, sps, eta, epoch if per_epoch else self.batches.epoch, metrics))
                if per_epoch:
                    loss_sum += value
                    n += 1
                    if done % per_epoch == 0:
                        self._finish_epoch(epoch, done, loss_sum, n, lr, time.perf_counter() - t_epoch, clock)
                elif self.checkpoint is not None and plan.checkpoint_every and done % plan.checkpoint_every == 0 and done < total:
                    if self.rank == 0:
                        self.save(done)
                    barrier()
                    self._last_ckpt = done
        except KeyboardInterrupt:
            err = self._interrupted()
            if err is None:
                raise
            raise err from None
        finally:
            self.seconds += time.perf_counter() - t0

    def _finish_epoch(self, epoch: int, done: int, loss_sum: Tensor, n: int, lr: float, seconds: float, clock) -> None:
        # Order matters for --resume: the resumable state first, then what it describes.
        train_loss = mean_over_ranks(loss_sum / max(1, n), self.world_size)
        shown = self.end_epoch(epoch, train_loss, lr, seconds) if self.end_epoch is not None else {}
        if self.rank == 0:
            if self.checkpoint is not None:
                self.save(done)
            if self.write_epoch is not None:
                self.write_epoch(epoch)
            if self.on_step is not None:
                sps, eta = clock(done)
                self.on_step(StepInfo(done, self.plan.total_steps, train_loss, lr, sps, eta, epoch, shown))
        barrier()
        self._saved_epoch = epoch

    def _interrupted(self) -> WeitError | None:
        """The one-line message of Ctrl-C / SIGTERM; None without checkpoints (nothing was kept)."""
        if self.checkpoint is None:
            return None
        if self.plan.steps_per_epoch:
            saved, epochs = self._saved_epoch, self.plan.total_steps // self.plan.steps_per_epoch
            return WeitError(
                f"interrupted in epoch {saved + 1} of {epochs}",
                f"continue with the same command plus --resume (from epoch {saved})" if saved else "start again",
                EXIT_INTERRUPTED,
            )
        last = self._last_ckpt
        where = f"the checkpoint at step {last} is kept" if last else "no checkpoint was written yet"
        return WeitError(
            f"interrupted at step {self._step + 1} of {self.plan.total_steps}; {where}",
            "continue with the same command plus --resume" if last else "start again",
            EXIT_INTERRUPTED,
        )
