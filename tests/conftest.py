"""Shared fixtures: tiny timm ViTs on CPU, offline, one thread.

Sections are independent; add new fixtures in their own section with a one-line docstring.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

import json
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

# ---------------------------------------------------------------------------------------------- tiny ViTs
TIMM_VIT = "vit_base_patch16_224"  # any timm ViT name: the model_args below override every size
TINY_VIT_ARGS = dict(img_size=16, patch_size=8, in_chans=3, num_classes=5, embed_dim=32, depth=2, num_heads=4)
TINY_HEAD_DIM = 8  # = default template size p; full rank is p·p = 64 templates


def make_tiny_vit(seed: int = 0, **overrides):
    """A tiny timm ViT (eval mode) with *every* parameter random.

    timm starts biases at zero and LayerNorms at one, which would hide resizing bugs in exactly the
    tensors a width or depth rule must treat correctly, so everything is redrawn from `seed`."""
    import timm

    args = {**TINY_VIT_ARGS, **overrides}
    return randomize(timm.create_model(TIMM_VIT, pretrained=False, **args), seed, norm="norm")


def randomize(model, seed: int, norm: str):
    """Redraw every parameter from `seed` (eval mode): norm scales (names containing `norm`, ending
    in `weight`) around 1, everything else around 0 with std 0.2."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if norm in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def save_timm_dir(model, folder: Path, model_args: dict) -> Path:
    """Save the way timm itself does (config.json + model.safetensors, loadable via local-dir:)."""
    from timm.models._hub import save_for_hf

    folder.mkdir(parents=True, exist_ok=True)
    save_for_hf(model, str(folder), model_args=model_args, safe_serialization=True)
    return folder


@pytest.fixture
def tiny_vit_factory():
    """`make(seed=0, **timm_model_args)` → a tiny random timm ViT; defaults in TINY_VIT_ARGS."""
    return make_tiny_vit


@pytest.fixture
def tiny_vit():
    """The model saved in `tiny_vit_dir` (seed 0, TINY_VIT_ARGS), fresh per test."""
    return make_tiny_vit(0)


@pytest.fixture
def vit_input():
    """A fixed batch of two images for TINY_VIT_ARGS."""
    g = torch.Generator().manual_seed(1234)
    return torch.randn(2, TINY_VIT_ARGS["in_chans"], TINY_VIT_ARGS["img_size"], TINY_VIT_ARGS["img_size"], generator=g)


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory) -> Path:
    """A timm checkpoint folder (config.json + model.safetensors) of `tiny_vit`. Do not modify."""
    return save_timm_dir(make_tiny_vit(0), tmp_path_factory.mktemp("dense") / "tiny_vit", TINY_VIT_ARGS)


@pytest.fixture(scope="session")
def tiny_vit_file(tmp_path_factory) -> Path:
    """`tiny_vit` as a bare safetensors state dict without metadata (needs --num-heads 4). Do not modify."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("dense_file") / "tiny_vit.safetensors"
    save_file(make_tiny_vit(0).state_dict(), str(path))
    return path


@pytest.fixture(scope="session")
def tiny_bundle(tiny_vit_dir, tmp_path_factory) -> Path:
    """A full-rank (exact) template bundle extracted from `tiny_vit_dir`. Do not modify."""
    from weit_cli.commands.extract import extract_templates

    path = tmp_path_factory.mktemp("bundle") / "tiny.safetensors"
    extract_templates(tiny_vit_dir, path, num_templates=TINY_HEAD_DIM**2)
    return path


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------------------------------------- tiny ResNets
TINY_RESNET_ARGS = {
    # stage-1 output = stem output (8): no projection shortcut, the stem is tied to stage 1
    "basic": dict(layers=[2, 2, 2, 2], channels=[8, 16, 16, 32], stem_type="deep", stem_width=4),
    # bottleneck outputs 32..64 ≠ stem 16: every stage projects; avg-pool shortcuts as in resnet50d
    "bottleneck": dict(layers=[2, 2, 2, 2], channels=[8, 8, 16, 16], stem_type="deep", stem_width=8, avg_down=True),
}
TINY_RESNET_COMMON = dict(in_chans=3, num_classes=5)
TINY_RESNET_IMG = 16
TINY_RESNET_P = 8  # template size; full rank: 8·8·9 = 576 (3×3) and 64 (1×1) templates


def make_tiny_resnet(block: str = "basic", seed: int = 0, **overrides):
    """A tiny timm ResNet (eval mode) with every parameter and BatchNorm statistic random.

    timm zero-initialises the last BatchNorm of every block (the residual branch would be empty) and
    starts statistics at 0/1, which would hide resizing bugs; convs are drawn at He scale so logits
    stay O(1)."""
    import timm

    args = {**TINY_RESNET_ARGS[block], **TINY_RESNET_COMMON, **overrides}
    model = timm.create_model("resnet18" if block == "basic" else "resnet50", pretrained=False, **args)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                t.fill_(7)
            elif t.dim() == 4:
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / t[0].numel()) ** 0.5)
            elif name.endswith(("running_var",)) or (t.dim() == 1 and name.endswith("weight") and not name.startswith("fc")):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            else:
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
    return model.eval()


def tiny_resnet_args(block: str) -> dict:
    return {**TINY_RESNET_ARGS[block], **TINY_RESNET_COMMON}


@pytest.fixture
def resnet_input():
    """A fixed batch of four images for the tiny ResNets."""
    g = torch.Generator().manual_seed(4321)
    return torch.randn(4, TINY_RESNET_COMMON["in_chans"], TINY_RESNET_IMG, TINY_RESNET_IMG, generator=g)


def weit(*args, expect: int | None = 0, cwd: Path | None = None):
    """Run the CLI in-process (in `cwd` if given); a crash (anything but a clean exit) fails the test,
    and so does an exit code other than `expect` (None: any). `returncode` mirrors `exit_code`, so a
    test can treat the result like a subprocess's."""
    from typer.testing import CliRunner

    from weit_cli.cli import app

    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        r = CliRunner().invoke(app, [str(a) for a in args])
    finally:
        os.chdir(old)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    if expect is not None:
        assert r.exit_code == expect, (r.exit_code, r.stdout, r.stderr)
    r.returncode = r.exit_code
    return r


def assert_keyed_by_role(result: dict, metric: str, *patterns: str) -> None:
    """A command's result names its task's metric (`metric_info`) and gives each score under its role
    key and under the deprecated metric-named alias: `assert_keyed_by_role(r, "acc", "val_{}_after")`
    checks r["val_metric_after"] == r["val_acc_after"]."""
    assert result["metric_info"]["name"] == metric, result.get("metric_info")
    assert {"label", "higher_is_better", "percent"} <= set(result["metric_info"])
    for p in patterns:
        assert p.format("metric") in result and result[p.format("metric")] == result[p.format(metric)], p


def predict_actions(model, windows):
    """The reference for the control task's call: the actions transformers' DecisionTransformerModel
    predicts for each window position, called by keyword as its documentation shows."""
    out = model(
        states=windows.states,
        actions=windows.actions,
        returns_to_go=windows.returns_to_go,
        timesteps=windows.timesteps,
        attention_mask=windows.attention_mask,
        return_dict=True,
    )
    return out.action_preds


# ---------------------------------------------------------------------------------------------- torchrun
def torchrun(args: list[str], env: dict[str, str], timeout: int = 240):
    """`python -m torch.distributed.run --standalone --nproc-per-node 2 ARGS` in its own process group,
    so that a hang cannot leave orphaned workers behind; fails the test after `timeout` seconds."""
    import signal
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True) as p:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            pytest.fail(f"torchrun did not finish in {timeout} s")
    return subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr)
