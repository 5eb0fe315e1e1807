"""`weit pretrain` under torchrun: 2 CPU processes (gloo) end with identical templates."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from conftest import torchrun

from weit_cli.io.files import load_weit

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn (digits) not installed")

RECIPE = """\
# weit pretrain ddp.yaml -o bundle.safetensors
model: {img_size: 8, patch_size: 2, in_chans: 1, head_dim: 16}
templates: {count: 8}
nested: {depths: [1, 2], widths: [16, 32], sandwich: 1}
data: {source: digits, batch_size: 32}
train: {steps: 3, warmup_steps: 1, eval_every: 0, checkpoint_every: 2}
"""


def test_two_process_ddp_gives_identical_templates(tmp_path):
    recipe = tmp_path / "ddp.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "bundle.safetensors"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = torchrun(["-m", "weit_cli.cli", "pretrain", str(recipe), "-o", str(out), "--json"], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, "only rank 0 reports"
    r = json.loads(lines[0])
    assert r["world_size"] == 2
    digests = r["templates_sha256_by_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    tensors, meta = load_weit(out, "weit.templates")
    assert json.loads(meta["provenance"])["world_size"] == 2
    # Training moved the parameters away from their (seeded) start.
    from weit_cli.recipe import load_recipe
    from weit_cli.training.nested import initial_bundle

    start = initial_bundle(load_recipe(recipe), 10).to_tensors()
    assert not torch.equal(start["templates.qkv"], tensors["templates.qkv"])
