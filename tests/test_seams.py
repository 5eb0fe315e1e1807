"""The seams between the CLI, the tasks and the families: the CLI renders any task's metric from the
result's description (never from the task's or the metric's name), commands ask a task what it can
do, and a weightless model folder is read by its family's adapter."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import weit_cli
from weit_cli import cli_render
from weit_cli.tasks.base import Metric, Task

PACKAGE = Path(weit_cli.__file__).parent


class Captioning(Task):
    """A task the CLI has never heard of, with a metric of its own."""

    name = "captioning"
    metric = Metric("bleu", "BLEU score", higher_is_better=True, percent=True, short="BLEU")
    examples = "captions"

    def load_data(self, *a, **k): raise NotImplementedError
    def outputs(self, forward, batch): raise NotImplementedError
    def loss(self, outputs, batch): raise NotImplementedError
    def distill_loss(self, *a): raise NotImplementedError
    def evaluate(self, *a, **k): raise NotImplementedError


def _shown(render, r: dict[str, Any], capsys) -> str:
    render(r)
    return capsys.readouterr().out


def test_a_new_tasks_metric_is_described_and_derived():
    m = Captioning.metric
    assert (Captioning.metric_key, Captioning.metric_name, Captioning.higher_is_better) == ("bleu", "BLEU score", True)
    assert m.format(0.5) == "50.00%" and m.format(None) == "–" and Metric("x", "x").format(0.5) == "0.5000"
    assert m.entries("val_{}_after", 0.1) == {"val_bleu_after": 0.1, "val_metric_after": 0.1}
    assert Metric.from_dict(json.loads(json.dumps(m.to_dict()))) == m

    class Legacy(Task):  # a task written before `metric`: its legacy attributes make one
        name, metric_key, metric_name, higher_is_better = "legacy", "mse", "mean squared error", False

    assert Legacy.metric == Metric("mse", "mean squared error", higher_is_better=False)
    assert not (Captioning.samples or Captioning.rollouts)


def test_the_cli_renders_a_metric_it_does_not_know(capsys):
    m = Captioning.metric
    info = {"metric_info": m.to_dict()}
    fit = {"output": "s.safetensors", "description": "a captioner", "trained": ["scalers"], "params": 10, "steps": 3,
           "fit_seconds": 0.5, "loss_first": 2.0, "loss_last": 1.0, **m.entries("val_{}_before", 0.25),
           **m.entries("val_{}_after", 0.5), "val_count": 7, "val_examples": "captions", "bundle_sha256": "b",
           "size_options": ["--depth", "1"], "architecture": {}, **info}
    out = _shown(cli_render.fit_scalers, fit, capsys)
    assert "val BLEU score" in out and "0.2500 → 0.5000 (7 captions)" in out

    rec = {"epoch": 1, **m.entries("val_{}", 0.5), **m.entries("test_{}", 0.25)}
    ft = {"output": "run", "description": "a captioner", "init": {"init": "weit"}, "new_head": False, "epochs": 1, "steps": 2,
          "world_size": 1, "device": "cpu", "final": rec, "best": rec, **m.entries("test_{}_by_epoch", [None, 0.25]),
          "files": ["run/metrics.json"], **info}
    out = _shown(cli_render.finetune, ft, capsys)
    assert "test bleu by epoch" in out and "val 50.00%, test 25.00%" in out and "epoch 1: val 50.00%" in out

    pre = {"output": "b.safetensors", "recipe": "b.recipe.yaml", "steps": 3, "nested": {"depths": [1], "widths": [8]},
           "val": {"val_metric_largest": 0.75, "val_metric_smallest": 0.5}, "params": {"total": 5}, "device": "cpu",
           "world_size": 1, "wall_s": 1.0, **info}
    out = _shown(cli_render.pretrain, pre, capsys)
    assert "val BLEU largest" in out and "75.00%" in out and "val BLEU smallest" in out

    ev = {"description": "a captioner", "split": "test (9 captions)", **m.entries("test_{}", 0.125), "test_loss": 3.0, **info}
    out = _shown(cli_render.evaluate, ev, capsys)
    assert "test bleu" in out and "0.1250" in out and "test loss" in out and "3.0000" in out


def test_the_renderer_names_no_task_and_no_metric():
    """cli_render reads `metric_info` and role keys; it must not sniff for a task's or a metric's name."""
    from weit_cli.tasks._registry import _tasks

    # every result has a loss (`loss_first`, `test_loss`): a metric that *is* the loss is no task's secret
    names = ({t.name for t in _tasks().values()} | {t.metric.name for t in _tasks().values()}) - {"loss"}
    for module in ("cli.py", "cli_render.py", "cli_runtime.py"):
        source = (PACKAGE / module).read_text()
        found = [n for n in sorted(names) if re.search(rf"""["'_]{re.escape(n)}["'_]""", source)]
        assert not found, f"{module} names {found}"


def test_commands_ask_the_task_not_its_name():
    for module in ("commands/evaluate.py", "commands/sample.py"):
        source = (PACKAGE / module).read_text()
        assert not re.search(r"adapter\.task\s*[!=]=", source), module
    from weit_cli.tasks.classification import Classification
    from weit_cli.tasks.control import Control
    from weit_cli.tasks.generation import Generation

    assert [(t.samples, t.rollouts) for t in (Classification, Generation, Control)] == [(False, False), (True, False), (False, True)]


def test_a_weightless_folder_is_read_by_its_family(tiny_vit_dir, tmp_path, monkeypatch):
    """finetune (--init random / weight-selection) reads a folder with config.json and no weights through
    `Adapter.arch_from_config`, and commands/finetune.py knows no library."""
    from weit_cli.arch import _timm
    from weit_cli.commands.finetune import read_model
    from weit_cli.io.dense import read_dense

    folder = tmp_path / "cfg"
    folder.mkdir()
    shutil.copy(Path(tiny_vit_dir) / "config.json", folder / "config.json")
    asked = []
    original = _timm.TimmFamily.arch_from_config

    def spy(self, config, where):
        asked.append((self.family, Path(where).name))
        return original(self, config, where)

    monkeypatch.setattr(_timm.TimmFamily, "arch_from_config", spy)
    adapter, arch, weights = read_model(folder, need_weights=False)
    dense = read_dense(tiny_vit_dir)
    assert weights is None and asked and asked[-1][1] == "config.json"
    assert adapter.family == dense.adapter.family and arch == dense.arch
    assert "timm" not in (PACKAGE / "commands" / "finetune.py").read_text()


def test_a_config_no_family_reads_is_refused_in_one_line(tmp_path):
    from weit_cli.commands.finetune import read_model
    from weit_cli.errors import InputError

    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "something-else"}))
    with pytest.raises(InputError, match="has no usable 'architecture' and 'model_args'"):
        read_model(folder, need_weights=False)


def test_the_control_task_calls_what_its_family_gives_it():
    """tasks/control.py knows no library's forward: the window's five tensors go to whatever it is
    given, and the family's `task_forward` turns its module into that."""
    source = (PACKAGE / "tasks" / "control.py").read_text()
    assert "model_inputs" not in source and "action_output" not in source
    from weit_cli.tasks.control import Control

    batch = tuple(torch.zeros(2, 3, n) for n in (4, 2, 1)) + (torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3))
    got = Control().outputs(lambda s, a, r, t, m: a + 1.0, batch)
    assert torch.equal(got, torch.ones(2, 3, 2))
