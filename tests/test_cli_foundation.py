"""extract-templates, materialize and inspect through the real CLI: files timm loads, identical bytes
for identical inputs, one-line errors with documented exit codes, and --json."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import weit

from weit_cli.errors import EXIT_INPUT, EXIT_OUTPUT, EXIT_USAGE
from weit_cli.io.files import read_header, sha256

TIMM_VIT = "vit_base_patch16_224"


def one_json(text: str) -> dict:
    """stdout must be exactly one JSON object on one line."""
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    obj = json.loads(lines[0])
    assert isinstance(obj, dict)
    return obj


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@torch.no_grad()
def in_memory_logits(bundle_path: Path, x, depth_rule="auto", width_rule="tile", **sizes):
    """What the files should hold: the bundle resized and composed in memory."""
    from weit_cli.core.resize import plan_target, resize
    from weit_cli.io.bundle_file import load_bundle

    bundle, _ = load_bundle(bundle_path)
    target = plan_target(bundle, **sizes)
    sized = resize(bundle, target, depth_rule, width_rule)
    model = bundle.adapter.build(target)
    model.load_state_dict(sized.state_dict(), strict=True)
    return model.eval()(x)


# ---------------------------------------------------------------------------------------------- success
def test_extract_inspect_materialize_and_load_in_timm(tiny_vit_dir, tiny_vit, vit_input, tmp_path):
    import timm

    bundle = tmp_path / "tiny.safetensors"
    r = one_json(weit("extract-templates", tiny_vit_dir, "-o", bundle, "-n", 64, "--json").stdout)
    assert r["output"] == str(bundle) and max(r["relative_error"].values()) < 1e-6
    assert r["templates"] == {t: [64, 8, 8] for t in ("qkv", "proj", "fc1", "fc2")}
    assert r["architecture"]["img_size"] == 16  # timm's config.json writes [16, 16]
    assert (bundle.stat().st_mode & 0o777) == 0o666 & ~umask()

    meta = read_header(bundle)["__metadata__"]
    assert (meta["weit_format"], meta["kind"], meta["kron_order"]) == ("1", "weit.templates", "scaler_outer")
    info = one_json(weit("inspect", bundle, "--json").stdout)
    assert info["kind"] == "weit.templates" and info["sha256"] == sha256(bundle)
    assert info["architecture"]["depth"] == 2 and info["architecture"]["num_heads"] == 4
    prov = info["provenance"]
    assert prov["command"] == "extract-templates" and prov["num_templates"] == 64
    assert prov["source_sha256"] == sha256(tiny_vit_dir / "model.safetensors")
    assert str(tmp_path) not in json.dumps(info["provenance"])  # no paths: bytes independent of -o

    # 2× width, 2× depth (identity), as a folder and as a bare file
    opts = ["--width", 64, "--depth", 4, "--depth-rule", "identity"]
    folder, bare = tmp_path / "wide", tmp_path / "wide.safetensors"
    r = one_json(weit("materialize", bundle, "-o", folder, *opts, "--json").stdout)
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    assert (folder.stat().st_mode & 0o777) == 0o777 & ~umask()
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == TIMM_VIT and config["num_classes"] == 5
    assert config["model_args"]["embed_dim"] == 64 and config["model_args"]["depth"] == 4
    rb = one_json(weit("materialize", bundle, "-o", bare, *opts, "--json").stdout)
    assert rb["files"] == [str(bare)] and rb["timm"] == config["model_args"]
    assert r["export"] == {"format": "timm", "architecture": TIMM_VIT, "model_args": config["model_args"],
                           "load": f"timm.create_model('local-dir:{folder}', pretrained=True)"}
    assert rb["export"]["format"] == "safetensors" and rb["export"]["load"].startswith(f"timm.create_model('{TIMM_VIT}', checkpoint_path='{bare}'")
    assert sorted(os.listdir(tmp_path)) == ["tiny.safetensors", "wide", "wide.safetensors"]  # no temp files

    expected = in_memory_logits(bundle, vit_input, "identity", depth=4, width=64)
    with torch.no_grad():
        from_dir = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()(vit_input)
        from_file = timm.create_model(TIMM_VIT, checkpoint_path=str(bare), **rb["timm"]).eval()(vit_input)
        source = tiny_vit(vit_input)
    assert torch.equal(from_dir, expected) and torch.equal(from_file, expected)
    torch.testing.assert_close(expected, source, rtol=1e-5, atol=1e-5)  # lossless growth

    info = one_json(weit("inspect", folder, "--json").stdout)
    assert info["kind"] == "dense" and info["architecture"]["width"] == 64 and info["architecture"]["depth"] == 4


@pytest.mark.parametrize("opts", [["--width", 96], ["--width", 16, "--num-classes", 7], ["--depth", 3, "--depth-rule", "stack"]])
def test_materialized_files_match_the_in_memory_composition(tiny_bundle, vit_input, tmp_path, opts):
    import timm

    r = one_json(weit("materialize", tiny_bundle, "-o", tmp_path / "m", *opts, "--json").stdout)
    pairs = dict(zip(opts[::2], opts[1::2]))
    sizes = {k.removeprefix("--").replace("-", "_"): v for k, v in pairs.items() if k != "--depth-rule"}
    expected = in_memory_logits(tiny_bundle, vit_input, pairs.get("--depth-rule", "auto"), **sizes)
    with torch.no_grad():
        got = timm.create_model(f"local-dir:{tmp_path / 'm'}", pretrained=True).eval()(vit_input)
    assert torch.equal(got, expected)
    assert r["architecture"]["num_classes"] == pairs.get("--num-classes", 5)


def test_same_inputs_give_identical_bytes(tiny_vit_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for d in (a, b):
        weit("extract-templates", tiny_vit_dir, "-o", d / f"bundle-{d.name}.safetensors", "-n", 20)
    assert (a / "bundle-a.safetensors").read_bytes() == (b / "bundle-b.safetensors").read_bytes()
    for d in (a, b):
        src = d / f"bundle-{d.name}.safetensors"
        weit("materialize", src, "-o", d / "model", "--width", 48, "--depth", 3)
        weit("materialize", src, "-o", d / "model.safetensors", "--width", 48, "--depth", 3)
    for name in ("model/model.safetensors", "model/config.json", "model.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # the bare file and the folder's weights are the same bytes too (provenance holds no paths)
    assert (a / "model.safetensors").read_bytes() == (a / "model/model.safetensors").read_bytes()
    # --force replaces an output with the same bytes
    before = (a / "model.safetensors").read_bytes()
    weit("materialize", a / "bundle-a.safetensors", "-o", a / "model.safetensors", "--width", 48, "--depth", 3, "--force")
    assert (a / "model.safetensors").read_bytes() == before


def test_bare_checkpoint_without_config_needs_num_heads(tiny_vit_file, tiny_bundle, tmp_path):
    from safetensors.torch import load_file

    r = weit("extract-templates", tiny_vit_file, "-o", tmp_path / "b.safetensors", "-n", 64, expect=EXIT_INPUT)
    assert "cannot tell the number of heads" in r.stderr and "--num-heads" in r.stderr
    weit("extract-templates", tiny_vit_file, "-o", tmp_path / "b.safetensors", "-n", 64, "--num-heads", 4)
    got, ref = load_file(str(tmp_path / "b.safetensors")), load_file(str(tiny_bundle))
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_widths_follow_the_bundles_template_size(tiny_vit_dir, tmp_path):
    bundle = tmp_path / "p16.safetensors"
    weit("extract-templates", tiny_vit_dir, "-o", bundle, "--template-size", 16, "-n", 256)
    r = weit("materialize", bundle, "-o", tmp_path / "m", "--width", 40, expect=EXIT_USAGE)
    assert "not a multiple of 16" in r.stderr and "32, 48" in r.stderr
    weit("materialize", bundle, "-o", tmp_path / "m", "--width", 48)


# ---------------------------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def bad_files(tiny_bundle, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    data = tiny_bundle.read_bytes()
    files = {
        "truncated": data[: len(data) // 2],
        "random": random.Random(0).randbytes(4096),
        "empty": b"",
    }
    for name, content in files.items():
        (d / f"{name}.safetensors").write_bytes(content)
    return {name: d / f"{name}.safetensors" for name in files}


# (name, argv builder, exit code, text the one-line message must contain)
ERRORS = [
    ("width not a multiple", lambda f: ["materialize", f["bundle"], "-o", f["out"] / "m", "--width", 20], EXIT_USAGE,
     "nearest valid widths: 16, 24"),
    ("depth 0", lambda f: ["materialize", f["bundle"], "-o", f["out"] / "m", "--depth", 0], EXIT_USAGE, "at least 1"),
    ("negative depth", lambda f: ["materialize", f["bundle"], "-o", f["out"] / "m", "--depth", -3], EXIT_USAGE, "at least 1"),
    ("dense model as bundle", lambda f: ["materialize", f["dense"], "-o", f["out"] / "m"], EXIT_INPUT,
     "expected a template bundle"),
    ("bundle as checkpoint", lambda f: ["extract-templates", f["bundle"], "-o", f["out"] / "b.safetensors"], EXIT_INPUT,
     "not a dense checkpoint"),
    *[(f"{kind} bundle", lambda f, kind=kind: ["materialize", f[kind], "-o", f["out"] / "m.safetensors"], EXIT_INPUT,
       str(kind == "truncated" and "truncated" or "safetensors")) for kind in ("truncated", "random", "empty")],
    *[(f"{kind} checkpoint", lambda f, kind=kind: ["extract-templates", f[kind], "-o", f["out"] / "b.safetensors"],
       EXIT_INPUT, "safetensors") for kind in ("truncated", "random", "empty")],
    ("inspect random bytes", lambda f: ["inspect", f["random"]], EXIT_INPUT, "not a valid safetensors file"),
    ("missing bundle", lambda f: ["materialize", f["out"] / "nope.safetensors", "-o", f["out"] / "m"], EXIT_INPUT,
     "does not exist"),
    ("missing checkpoint", lambda f: ["extract-templates", f["out"] / "nope", "-o", f["out"] / "b.safetensors"],
     EXIT_INPUT, "does not exist"),
    ("existing file output", lambda f: ["materialize", f["bundle"], "-o", f["out"] / "taken.safetensors"], EXIT_OUTPUT,
     "already exists"),
    ("existing folder output", lambda f: ["materialize", f["bundle"], "-o", f["out"] / "taken"], EXIT_OUTPUT,
     "already exists"),
    ("existing bundle output", lambda f: ["extract-templates", f["dense"], "-o", f["out"] / "taken.safetensors"],
     EXIT_OUTPUT, "already exists"),
    ("missing output folder", lambda f: ["materialize", f["bundle"], "-o", f["out"] / "no" / "m"], EXIT_OUTPUT,
     "does not exist"),
]


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
@pytest.mark.parametrize("name,argv,code,text", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_are_one_line_with_exit_code_and_leave_nothing(
    name, argv, code, text, as_json, tiny_bundle, tiny_vit_file, bad_files, tmp_path
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "taken.safetensors").write_bytes(b"keep me")
    (out / "taken").mkdir()
    (out / "taken" / "model.safetensors").write_bytes(b"keep me too")
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    args = argv({"bundle": tiny_bundle, "dense": tiny_vit_file, "out": out, **bad_files}) + (["--json"] if as_json else [])

    r = weit(*args, expect=code)
    if as_json:
        obj = one_json(r.stdout)
        assert obj["exit_code"] == code and text in obj["error"] + " " + obj["hint"] and obj["hint"]
        assert r.stderr == ""
    else:
        assert r.stdout == ""
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        assert text in lines[0] and " — " in lines[0]  # message — hint
    assert "Traceback" not in r.stdout + r.stderr
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before  # nothing new, no temp files
    assert (out / "taken.safetensors").read_bytes() == b"keep me"
    assert (out / "taken" / "model.safetensors").read_bytes() == b"keep me too"


def test_installed_entry_point_json(tiny_bundle, tmp_path):
    """The real `weit` executable: one JSON object on stdout for success and for an error."""
    exe = Path(sys.executable).with_name("weit")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "weit_cli.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run([*cmd, "materialize", str(tiny_bundle), "-o", str(tmp_path / "m.safetensors"), "--json"],
                        capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert one_json(ok.stdout)["files"] == [str(tmp_path / "m.safetensors")]
    bad = subprocess.run([*cmd, "materialize", str(tiny_bundle), "-o", str(tmp_path / "n"), "--width", "20", "--json"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == EXIT_USAGE and one_json(bad.stdout)["exit_code"] == EXIT_USAGE
    assert "Traceback" not in bad.stderr and not (tmp_path / "n").exists()
    # click's own usage errors (here: no -o) honour --json too
    usage = subprocess.run([*cmd, "materialize", str(tiny_bundle), "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert usage.returncode == EXIT_USAGE and usage.stderr == ""
    assert one_json(usage.stdout) == {"error": "Missing option '-o' / '--output'.", "hint": "see --help", "exit_code": EXIT_USAGE}


def test_bfloat16_output_is_the_composition_cast(tiny_bundle, tmp_path):
    from safetensors.torch import load_file

    from weit_cli.io.bundle_file import load_bundle

    weit("materialize", tiny_bundle, "-o", tmp_path / "half.safetensors", "--dtype", "bfloat16")
    got = load_file(str(tmp_path / "half.safetensors"))
    ref, _ = load_bundle(tiny_bundle)
    with torch.no_grad():
        ref = ref.state_dict()
    assert got.keys() == ref.keys()
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], ref[k].to(torch.bfloat16)) for k in ref)


def test_materialize_restores_the_callers_thread_count(tiny_bundle, tmp_path):
    from weit_cli.commands.materialize import materialize

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        materialize(tiny_bundle, tmp_path / "m.safetensors", width=64)  # composes on one thread inside
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_extract_warns_when_the_templates_reconstruct_poorly(tiny_vit_dir, tmp_path):
    """Random weights (like real trained ones, docs/method.md §3) are far from any 2-template
    Kronecker sum: the output says so, in the table and in --json, with the hint to add --data."""
    r = weit("extract-templates", tiny_vit_dir, "-n", "2", "-o", tmp_path / "few.safetensors", "--json")
    res = json.loads(r.stdout)
    assert max(res["relative_error"].values()) > 0.5
    (warning,) = res["warnings"]
    assert "--data" in warning and "reconstruct the checkpoint poorly" in warning
    r = weit("extract-templates", tiny_vit_dir, "-n", "2", "-o", tmp_path / "few2.safetensors")
    assert "warning:" in r.stderr and "--data" in r.stderr
    # Full rank reconstructs exactly: no warning.
    r = weit("extract-templates", tiny_vit_dir, "-n", "64", "-o", tmp_path / "full.safetensors", "--json")
    assert "warnings" not in json.loads(r.stdout)


def test_interp_on_a_shallower_target_warns(tiny_bundle, tmp_path):
    """`--depth-rule interp` for fewer blocks keeps spread-out blocks, not the prefix a nested bundle
    trains as its smaller depths (docs/benchmarks.md: 3×48 DiT FID 354 against 50): the output says
    so, in --json and on stderr; the default and growing do not warn."""
    r = weit("materialize", tiny_bundle, "--depth", 1, "--depth-rule", "interp", "-o", tmp_path / "a", "--json")
    (warning,) = json.loads(r.stdout)["warnings"]
    assert "prefix" in warning and "auto" in warning
    r = weit("materialize", tiny_bundle, "--depth", 1, "--depth-rule", "interp", "-o", tmp_path / "b")
    assert "warning:" in r.stderr and "interp" in r.stderr
    for opts, name in ((["--depth", 1], "c"), (["--depth", 3, "--depth-rule", "interp"], "d")):
        assert "warnings" not in json.loads(weit("materialize", tiny_bundle, *opts, "-o", tmp_path / name, "--json").stdout)
