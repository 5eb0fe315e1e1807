"""Every command × every kind of bad file (issue 5): one line on stderr naming the problem with a
hint, the documented exit code, no traceback, nothing written. With --json: exactly one JSON object
on stdout with an `error` field."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import weit as cli
from safetensors.torch import save_file

from weit_cli.arch._registry import get_adapter
from weit_cli.arch.vit import ViTArch
from weit_cli.core.extract import from_dense
from weit_cli.errors import EXIT_INPUT, EXIT_OUTPUT, EXIT_USAGE
from weit_cli.io.bundle_file import bundle_metadata, save_bundle
from weit_cli.io.files import save_tensors

weit = partial(cli, expect=None)  # exit codes are what these tests check


def weit_process(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "weit_cli.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    ad = get_adapter("vit")
    arch = ViTArch(img_size=16, patch_size=4, in_chans=1, num_classes=3, depth=2, width=32, num_heads=2)
    dense = ad.build(arch).state_dict()
    save_file(dense, str(d / "dense.safetensors"))
    b, _ = from_dense(ad, arch, dense, None, 4)
    save_bundle(d / "bundle.safetensors", b)
    (d / "empty.safetensors").write_bytes(b"")
    (d / "random.safetensors").write_bytes(os.urandom(4096))
    (d / "json.safetensors").write_text(json.dumps({"a": 1}))
    (d / "huge.safetensors").write_bytes(struct.pack("<Q", 2**60) + b"{}")
    good = (d / "bundle.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    nan = dict(dense)
    nan["blocks.0.attn.qkv.weight"] = torch.full_like(nan["blocks.0.attn.qkv.weight"], float("nan"))
    save_file(nan, str(d / "nan_dense.safetensors"))
    t = b.to_tensors()
    t["templates.qkv"] = t["templates.qkv"].clone()
    t["templates.qkv"][0, 0, 0] = float("inf")
    save_tensors(d / "inf_bundle.safetensors", t, bundle_metadata(b))
    torch.save({"w": torch.zeros(2)}, d / "not_a_model.pt")
    (d / "pickle.pt").write_bytes(b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00K\x01.")
    return {p.stem: p for p in d.iterdir()}


BAD_BUNDLES = ["empty", "random", "json", "huge", "truncated", "inf_bundle", "dense", "missing"]
BAD_CHECKPOINTS = ["empty", "random", "json", "huge", "truncated", "nan_dense", "bundle", "missing", "not_a_model", "pickle"]


def _path(files, name):
    return files[name] if name in files else files["bundle"].parent / "does-not-exist.safetensors"


def _assert_clean_failure(r, code, out_dir: Path):
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "—" in lines[0], r.stderr
    assert os.listdir(out_dir) == []


@pytest.mark.parametrize("name", BAD_BUNDLES)
def test_materialize_bad_bundle(files, tmp_path, name):
    r = weit("materialize", str(_path(files, name)), "-o", str(tmp_path / "m"), cwd=tmp_path)
    _assert_clean_failure(r, EXIT_INPUT, tmp_path)


@pytest.mark.parametrize("name", BAD_BUNDLES)
def test_inspect_bad_file(files, tmp_path, name):
    if name == "dense":  # a dense model is a valid thing to inspect
        pytest.skip("inspect reads dense checkpoints")
    check = []
    if name == "inf_bundle":  # inspect answers from the header; the values are read with --check (issue 20)
        assert weit("inspect", str(_path(files, name)), cwd=tmp_path).returncode == 0
        check = ["--check"]
    r = weit("inspect", str(_path(files, name)), *check, cwd=tmp_path)
    _assert_clean_failure(r, EXIT_INPUT, tmp_path)


@pytest.mark.parametrize("name", BAD_CHECKPOINTS)
def test_extract_bad_checkpoint(files, tmp_path, name):
    r = weit("extract-templates", str(_path(files, name)), "-o", str(tmp_path / "b.safetensors"), cwd=tmp_path)
    _assert_clean_failure(r, EXIT_INPUT, tmp_path)


@pytest.mark.parametrize(
    "sizes",
    [["--depth", "0"], ["--depth", "-3"], ["--width", "0"], ["--width", "-32"], ["--width", "33"],
     ["--width", "10000000"], ["--depth", "100000", "--width", "4096"], ["--num-heads", "3"],
     ["--mlp-ratio", "0.3"], ["--depth-rule", "sideways"], ["--width-rule", "stretch"], ["--dtype", "int3"],
     ["--num-classes", "-1"]],
)
def test_materialize_impossible_sizes(files, tmp_path, sizes):
    r = weit("materialize", str(files["bundle"]), *sizes, "-o", str(tmp_path / "m"), cwd=tmp_path)
    _assert_clean_failure(r, EXIT_USAGE, tmp_path)


def test_json_errors_are_one_object(files, tmp_path):
    r = weit_process("materialize", str(files["random"]), "-o", str(tmp_path / "m"), "--json", cwd=tmp_path)
    assert r.returncode == EXIT_INPUT
    obj = json.loads(r.stdout)  # exactly one JSON document
    assert set(obj) == {"error", "hint", "exit_code"} and obj["exit_code"] == EXIT_INPUT
    assert "Traceback" not in r.stderr


def test_existing_output_needs_force(files, tmp_path):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"keep me")
    r = weit("materialize", str(files["bundle"]), "-o", str(out), cwd=tmp_path)
    assert r.returncode == EXIT_OUTPUT and "--force" in r.stderr
    assert out.read_bytes() == b"keep me"
    r = weit("materialize", str(files["bundle"]), "-o", str(out), "--force", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 1000
