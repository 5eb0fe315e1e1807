"""Answers without torch (issue 20): the family registry, `weit list-archs`, `--help` and `weit inspect`
of a bundle or scalers file import no torch and read no tensor (the header says it all); `inspect
--check` reads and checks every tensor, as materialize and fit-scalers do before they use them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import weit

from weit_cli.core.resize import plan_target, resize
from weit_cli.io.bundle_file import load_bundle, templates_record
from weit_cli.errors import EXIT_INPUT
from weit_cli.io.files import KIND_SCALERS, base_metadata, load_safetensors, save_tensors

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
#: Runs the CLI in a fresh interpreter and reports, at exit, the heavy modules it imported.
PROBE = (
    "import atexit, sys\n"
    "atexit.register(lambda: print('IMPORTED', [m for m in ('torch', 'timm', 'diffusers', 'transformers') if m in sys.modules], file=sys.stderr))\n"
    "from weit_cli.cli import app\n"
    "sys.argv = ['weit', *sys.argv[1:]]\n"
    "app()\n"
)


def _probe(*args) -> tuple[subprocess.CompletedProcess, list[str]]:
    r = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    line = [l for l in r.stderr.splitlines() if l.startswith("IMPORTED")]
    assert line, r.stderr
    return r, eval(line[-1].removeprefix("IMPORTED "))


@pytest.fixture
def scalers(tiny_bundle, tmp_path) -> Path:
    b, bsha = load_bundle(tiny_bundle)
    sized = resize(b, plan_target(b, depth=1))
    tensors = {f"scalers.{k}": v for k, v in sized.scalers.items()} | {f"small.{k}": v for k, v in sized.small.items()}
    meta = base_metadata(KIND_SCALERS, architecture=sized.arch.to_dict(), bundle_sha256=bsha,
                         templates=templates_record(b.templates), provenance={"command": "fit-scalers"})
    save_tensors(tmp_path / "s.safetensors", tensors, meta)
    return tmp_path / "s.safetensors"


def test_registry_and_inspect_import_no_torch(tiny_bundle, scalers):
    code = (
        "import sys\n"
        "from weit_cli.arch._registry import list_families\n"
        "from weit_cli.commands.inspect import inspect\n"
        "assert list_families()\n"
        f"r = inspect({str(tiny_bundle)!r}); s = inspect({str(scalers)!r})\n"
        "assert r['kind'] == 'weit.templates' and s['kind'] == 'weit.scalers', (r, s)\n"
        "print([m for m in ('torch', 'timm', 'diffusers', 'transformers', 'safetensors') if m in sys.modules])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.parametrize("args", [["list-archs"], ["--help"], ["inspect", "--help"], ["inspect", "BUNDLE", "--json"], ["inspect", "SCALERS", "--full"]])
def test_cli_answers_without_torch(args, tiny_bundle, scalers):
    args = [{"BUNDLE": tiny_bundle, "SCALERS": scalers}.get(a, a) for a in args]
    r, imported = _probe(*args)
    assert r.returncode == 0, r.stderr
    assert imported == [], imported


def test_inspect_from_the_header_equals_the_full_read(tiny_bundle, scalers):
    """Every field of the header answer is what reading the tensors gives; --check adds its verdict."""
    for path in (tiny_bundle, scalers):
        quick = json.loads(weit("inspect", path, "--json").stdout)
        full = json.loads(weit("inspect", path, "--json", "--check").stdout)
        assert full.pop("check").startswith("passed: ")
        assert quick == full
    b, _ = load_bundle(tiny_bundle)
    info = json.loads(weit("inspect", tiny_bundle, "--json").stdout)
    assert info["params"] == b.param_counts()
    assert info["templates"] == {t: list(v.shape) for t, v in b.templates.items()}


def test_damaged_values_need_check_damaged_layout_does_not(tiny_bundle, tmp_path):
    tensors, meta = load_safetensors(tiny_bundle)
    nan = dict(tensors)
    key = next(k for k in nan if k.startswith("scalers."))
    nan[key] = torch.full_like(nan[key], float("nan"))
    save_tensors(tmp_path / "nan.safetensors", nan, meta)
    assert weit("inspect", tmp_path / "nan.safetensors").exit_code == 0  # the header is sound
    r = weit("inspect", tmp_path / "nan.safetensors", "--check", "--json", expect=EXIT_INPUT)
    assert "non-finite" in json.loads(r.stdout)["error"]
    # A missing or mis-shaped tensor shows in the header: plain inspect refuses it.
    short = {k: v for k, v in tensors.items() if k != key}
    save_tensors(tmp_path / "short.safetensors", short, meta)
    r = weit("inspect", tmp_path / "short.safetensors", "--json", expect=EXIT_INPUT)
    assert f"missing {key}" in json.loads(r.stdout)["error"]
    wide = dict(tensors, **{key: torch.zeros(*tensors[key].shape[:-1], tensors[key].shape[-1] + 1)})
    save_tensors(tmp_path / "wide.safetensors", wide, meta)
    r = weit("inspect", tmp_path / "wide.safetensors", "--json", expect=EXIT_INPUT)
    assert "wrong shape" in json.loads(r.stdout)["error"]


@pytest.mark.parametrize("args", [
    ["materialize", "missing.safetensors", "-o", "OUT"],
    ["materialize", "BUNDLE", "-o", "OUT", "--dtype", "float8"],
    ["materialize", "BUNDLE", "-o", "OUT", "--depth-rule", "nope"],
    ["fit-scalers", "BUNDLE", "--data", "digits", "-o", "OUT", "--steps", "0"],
    ["inspect", "missing.safetensors"],
])
def test_argument_errors_before_torch(args, tiny_bundle, tmp_path):
    """A missing file or an out-of-range option is answered (one line, exit code) before torch is imported."""
    args = [{"BUNDLE": tiny_bundle, "OUT": tmp_path / "out.safetensors"}.get(a, a) for a in args]
    r, imported = _probe(*args)
    assert r.returncode in (2, 3), r.stderr
    assert [l for l in r.stderr.splitlines() if l.startswith("error:")], r.stderr
    assert imported == [], imported
