"""The staged training loop (training/loop.py) and the Task seam (tasks/base.py), on a toy task that
is not classification — regression with MSE, scored by its error — so the loop is seen to need nothing
from classification: exact resume across an epoch boundary (dropout draws included), the evaluate
and end-of-epoch stages, interrupt messages, and the non-finite-loss refusal."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from weit_cli.errors import EXIT_INTERRUPTED, WeitError
from weit_cli.tasks.base import Task
from weit_cli.training.batches import Batches
from weit_cli.training.loop import Loop, Plan
from weit_cli.training.optim import adamw, lr_at


class Regression(Task):
    name = "regression"
    metric_name = "mse"
    higher_is_better = False

    def load_data(self, source, arch, *, seed=0, val_fraction=0.1, train_subset=None):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(64, arch.dim, generator=g)
        y = x.sum(1, keepdim=True).sin()
        return SimpleNamespace(train=TensorDataset(x[:48], y[:48]), val=TensorDataset(x[48:], y[48:]), test=None,
                               description=f"{source}: 48 train, 16 val")

    def outputs(self, forward, batch):
        return forward(batch[0])

    def loss(self, outputs, batch):
        return nn.functional.mse_loss(outputs, batch[1])

    def distill_loss(self, outputs, teacher_outputs, batch, temperature):
        return nn.functional.mse_loss(outputs, teacher_outputs)

    @torch.no_grad()
    def evaluate(self, forward, dataset, batch_size=256, device=None):
        forward.eval()
        try:
            err = float(self.loss(forward(dataset.tensors[0]), dataset.tensors))
        finally:
            forward.train()
        return SimpleNamespace(metric=err, loss=err, count=len(dataset))


def _train(ckpt, *, per_epoch=0, stop_at=None, resume=False):
    """12 steps of 8 of 48 examples (two epochs of the data); KeyboardInterrupt in the stop_at-th loss step."""
    torch.manual_seed(0)
    task = Regression()
    splits = task.load_data("toy", SimpleNamespace(dim=4))
    model = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.Linear(16, 1))  # dropout: RNG draws every step
    named = dict(model.named_parameters())
    opt = adamw(named, lr=1e-2, weight_decay=0.01, no_decay_keys=())
    calls, seen, epochs = [0], [], []

    def loss_step(batch):
        calls[0] += 1
        if calls[0] == stop_at:
            raise KeyboardInterrupt
        return task.train_loss(model, task.prepare(batch))

    def end_epoch(epoch, train_loss, lr, seconds):
        epochs.append((epoch, train_loss))
        return {"val_mse": task.evaluate(model, splits.val).metric}

    plan = Plan(12, lambda s: lr_at(s, base_lr=1e-2, total_steps=12, warmup_steps=2), 1.0, steps_per_epoch=per_epoch,
                eval_every=0 if per_epoch else 4, checkpoint_every=4)
    loop = Loop(plan, optimizer=opt, params=named, batches=Batches(splits.train, 8, seed=0), device=torch.device("cpu"),
                loss_step=loss_step, evaluate=lambda done: {"val_mse": task.evaluate(model, splits.val).metric},
                end_epoch=end_epoch if per_epoch else None, checkpoint=ckpt, tensors=model.state_dict, on_step=seen.append)
    if resume:
        loop.resume()
    loop.run()
    return model.state_dict(), seen, epochs, loop


def _same(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_step_based_interrupt_and_resume_is_exact(tmp_path):
    ref, seen, _, loop = _train(tmp_path / "ref.ckpt.safetensors")
    assert [i.step for i in seen] == list(range(1, 13)) and len(loop.losses) == 12
    assert [sorted(i.metrics) for i in seen if i.metrics] == [["val_mse"], ["val_mse"]]  # steps 4 and 8, not 12
    assert [i.step for i in seen if i.metrics] == [4, 8]
    ckpt = tmp_path / "run.ckpt.safetensors"
    with pytest.raises(WeitError) as e:
        _train(ckpt, stop_at=7)
    assert e.value.exit_code == EXIT_INTERRUPTED
    assert e.value.message == "interrupted at step 7 of 12; the checkpoint at step 4 is kept"
    assert "--resume" in e.value.hint
    got, seen, _, loop = _train(ckpt, resume=True)
    assert loop.start == 4 and [i.step for i in seen] == list(range(5, 13))
    _same(got, ref)


def test_epoch_based_stages_and_resume(tmp_path):
    ref, seen, epochs, loop = _train(tmp_path / "ref.safetensors", per_epoch=6)
    assert [e for e, _ in epochs] == [1, 2]
    assert epochs[0][1] == pytest.approx(sum(loop.losses[:6]) / 6) and epochs[1][1] == pytest.approx(sum(loop.losses[6:]) / 6)
    shown = [i for i in seen if i.metrics]
    assert [(i.step, i.epoch, i.loss) for i in shown] == [(6, 1, epochs[0][1]), (12, 2, epochs[1][1])]
    assert (tmp_path / "ref.safetensors").is_file()  # every epoch checkpoints, the last one too
    loop.discard_checkpoint()
    assert list(tmp_path.iterdir()) == []
    ckpt = tmp_path / "state.safetensors"
    with pytest.raises(WeitError) as e:
        _train(ckpt, per_epoch=6, stop_at=9)
    assert (e.value.message, e.value.hint) == ("interrupted in epoch 2 of 2", "continue with the same command plus --resume (from epoch 1)")
    got, _, epochs, loop = _train(ckpt, per_epoch=6, resume=True)
    assert loop.start == 6 and [e for e, _ in epochs] == [2]
    _same(got, ref)


def test_without_a_checkpoint_an_interrupt_stays_an_interrupt(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _train(None, stop_at=3)


def test_a_non_finite_loss_is_refused_with_the_plan_s_words():
    param = nn.Parameter(torch.ones(2))
    plan = Plan(3, lambda s: 0.1, 1.0, diverged="the loss became {loss} at step {step}", diverged_hint="lower --lr")
    ds = TensorDataset(torch.zeros(4, 1))
    loop = Loop(plan, optimizer=adamw({"p": param}, lr=0.1, weight_decay=0.0, no_decay_keys=()), params={"p": param}, batches=Batches(ds, 2, seed=0),
                device=torch.device("cpu"), loss_step=lambda batch: param.sum() * float("nan"))
    with pytest.raises(WeitError) as e:
        loop.run()
    assert (e.value.message, e.value.hint) == ("the loss became nan at step 1", "lower --lr")


def test_one_resume_guard_for_the_three_commands():
    """training/resume.py: fit-scalers' options sha, pretrain's recipe and teacher sha and finetune's
    args.json are compared key by key; the command words the refusal from the keys and the record."""
    from weit_cli.errors import InputError
    from weit_cli.training.resume import check_same_run, differing, fingerprint, same_run

    assert fingerprint({"a": 1, "b": [2, 3]}) == fingerprint({"b": [2, 3], "a": 1}) != fingerprint({"a": 1, "b": [3, 2]})
    assert differing({"lr": 1e-3, "seed": 0}, {"lr": 2e-3, "seed": 0, "ema": None}, ["lr", "seed", "ema"]) == ["lr"]

    def refuse(diff, recorded):
        return InputError(f"other {diff} (was {recorded.get(diff[0])!r})", "start over with --force")

    check_same_run({"seed": 0}, {"seed": 0, "extra": 1}, ["seed"], refuse)  # only the keys named count
    with pytest.raises(InputError, match=r"other \['seed'\] \(was 0\)"):
        check_same_run({"seed": 0}, {"seed": 1}, ["seed"], refuse)
    guard = same_run({"recipe_sha256": "abc", "teacher_sha256": None}, refuse)
    guard({"recipe_sha256": "abc", "step": 3})  # a checkpoint without a teacher: None, the same
    with pytest.raises(InputError, match=r"other \['teacher_sha256'\]"):
        guard({"recipe_sha256": "abc", "teacher_sha256": "def"})
