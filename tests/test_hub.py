"""Models named by their hub id (`hf-hub:ORG/NAME[@REVISION][/SUBFOLDER]`), read offline from a cache in
the layout huggingface_hub writes (models--ORG--NAME/{blobs,refs,snapshots}), for each family."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import TINY_VIT_ARGS, make_tiny_vit, save_timm_dir
from conftest import weit as cli

from weit_cli.io.bundle_file import load_bundle
from weit_cli.errors import InputError
from weit_cli.io import hub
from weit_cli.io.files import checkpoint_sha256, load_weit

weit = partial(cli, expect=None)
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


def publish(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT, refs: tuple[str, ...] = ("main",), under: str = "") -> Path:
    """Lay `folder`'s files into `cache` as huggingface_hub does after a download: content-addressed
    blobs, a snapshot of relative symlinks per commit (files under `under/` for a pipeline's
    subfolder), and refs naming the commit. Returns the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    for src in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = src.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        dest = snap / under / src.relative_to(folder)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(os.path.relpath(blob, dest.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache, offline (as in CI: nothing may download)."""
    from huggingface_hub import constants

    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return root


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory) -> Path:
    """A tiny timm ViT saved as timm pushes it to the hub (config.json + model.safetensors)."""
    return save_timm_dir(make_tiny_vit(0), tmp_path_factory.mktemp("vit") / "m", TINY_VIT_ARGS)


def js(r) -> dict:
    return json.loads(r.stdout)


# ------------------------------------------------------------------------------------- the spelling
@pytest.mark.parametrize("text, want", [
    ("hf-hub:timm/vit_small_patch16_224.augreg_in21k", ("timm/vit_small_patch16_224.augreg_in21k", None, None)),
    ("hf-hub:org/name@v1.0", ("org/name", "v1.0", None)),
    ("hf-hub:facebook/DiT-XL-2-256/transformer", ("facebook/DiT-XL-2-256", None, "transformer")),
    (f"hf-hub:org/pipe@{COMMIT}/unet/sub", ("org/pipe", COMMIT, "unet/sub")),
])
def test_hub_ids_parse(text, want):
    h = hub.parse(text)
    assert (h.repo_id, h.revision, h.subfolder) == want and str(h) == text


@pytest.mark.parametrize("text", ["hf-hub:", "hf-hub:name-only", "hf-hub:org/name@", "hf-hub:org/../x", "hf-hub:org/name/../../etc"])
def test_malformed_hub_ids_are_one_line_errors(text):
    with pytest.raises(InputError, match="spell it hf-hub:ORG/NAME"):
        hub.parse(text)


def test_local_paths_pass_through_unresolved(tmp_path):
    assert hub.resolve(tmp_path / "m") == (tmp_path / "m", None)


# ------------------------------------------------------------------------------------- the families
def test_extract_a_timm_vit_by_hub_id_offline(cache, vit_folder, tmp_path):
    publish(cache, "timm/tiny-vit", vit_folder)
    out = tmp_path / "hub.safetensors"
    r = js(weit("extract-templates", "hf-hub:timm/tiny-vit", "-o", out, "--json"))
    assert r["source"] == {"source": "hf-hub:timm/tiny-vit", "repo_id": "timm/tiny-vit", "revision": COMMIT}
    prov = json.loads(load_weit(out, "weit.templates")[1]["provenance"])
    assert prov["source"] == r["source"] and prov["source_sha256"] == checkpoint_sha256(vit_folder)
    # The same bundle as from the folder itself: the hub is only a way to find the files.
    local = tmp_path / "local.safetensors"
    weit("extract-templates", vit_folder, "-o", local, "--json")
    a, b = load_bundle(out)[0], load_bundle(local)[0]
    assert a.arch == b.arch and all(torch.equal(a.templates[t], b.templates[t]) for t in a.templates)


def test_a_revision_names_a_tag_or_a_commit(cache, vit_folder, tmp_path):
    publish(cache, "org/vit", vit_folder, commit=COMMIT, refs=("main", "v1"))
    other = tmp_path / "other"
    save_timm_dir(make_tiny_vit(1), other, TINY_VIT_ARGS)
    publish(cache, "org/vit", other, commit=OTHER, refs=())
    for rev, commit, folder in (("v1", COMMIT, vit_folder), (OTHER, OTHER, other)):
        out = tmp_path / f"{rev}.safetensors"
        r = js(weit("extract-templates", f"hf-hub:org/vit@{rev}", "-o", out, "--json"))
        assert r["source"]["revision"] == commit
        prov = json.loads(load_weit(out, "weit.templates")[1]["provenance"])
        assert prov["source_sha256"] == checkpoint_sha256(folder)


def test_a_diffusers_dit_in_a_pipeline_subfolder(cache, tmp_path):
    from test_dit import make_tiny_dit

    pipe = tmp_path / "pipe"
    make_tiny_dit(0).save_pretrained(str(pipe / "transformer"))
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"]}))
    publish(cache, "org/tiny-dit-pipe", pipe)
    out = tmp_path / "dit.safetensors"
    r = js(weit("extract-templates", "hf-hub:org/tiny-dit-pipe/transformer", "-o", out, "--json"))
    assert r["architecture"]["family"] == "dit" and r["source"]["subfolder"] == "transformer"
    assert json.loads(load_weit(out, "weit.templates")[1]["provenance"])["source"]["revision"] == COMMIT
    # The repository's root is a pipeline, not a model: one line, nothing written.
    bad = weit("extract-templates", "hf-hub:org/tiny-dit-pipe", "-o", tmp_path / "x.safetensors")
    assert bad.exit_code == 3 and "safetensors" in bad.stderr and not (tmp_path / "x.safetensors").exists()


def test_a_transformers_decision_transformer(cache, tmp_path):
    from test_control_task import tiny_dt

    folder = tmp_path / "dt"
    tiny_dt(0).save_pretrained(str(folder))
    publish(cache, "org/tiny-dt", folder)
    out = tmp_path / "dt.safetensors"
    r = js(weit("extract-templates", "hf-hub:org/tiny-dt", "-o", out, "--json"))
    assert r["architecture"]["family"] == "decision-transformer" and r["source"]["repo_id"] == "org/tiny-dt"


def test_finetune_selects_from_a_hub_model(cache, tmp_path):
    """--from by hub id (weight selection from a cached dense ViT), recorded in args.json and the result."""
    from test_finetune import LARGE, SMALL

    from weit_cli.arch._registry import get_adapter
    from weit_cli.core.bundle import Bundle
    from weit_cli.io.export import write_model

    ad = get_adapter("vit")
    for name, arch in (("small", SMALL), ("large", LARGE)):
        torch.manual_seed(1)
        write_model(Bundle(ad, arch, {}, {}, ad.build(arch).state_dict()), tmp_path / name, torch.float32, {"command": "test"}, force=False)
    publish(cache, "org/large", tmp_path / "large")
    run = tmp_path / "run"
    r = weit("finetune", tmp_path / "small", "--data", "digits", "--epochs", "1", "--train-subset", "64", "--batch-size", "32",
             "--init", "weight-selection", "--from", "hf-hub:org/large", "-o", run, "--json")
    assert r.exit_code == 0, r.stdout
    res = js(r)
    assert res["init"]["hub"]["from"]["revision"] == COMMIT
    assert res["init"]["source_sha256"] == checkpoint_sha256(tmp_path / "large")
    assert json.loads((run / "args.json").read_text())["hub"]["from"]["repo_id"] == "org/large"


# ------------------------------------------------------------------------------------- refusals
def test_a_model_missing_from_the_cache_says_how_to_fetch_it(cache, tmp_path):
    out = tmp_path / "b.safetensors"
    r = weit("extract-templates", "hf-hub:timm/not-cached", "-o", out)
    assert r.exit_code == 3 and not out.exists()
    line = r.stderr.strip()
    assert "\n" not in line and "not in the Hugging Face cache" in line and "hf download timm/not-cached" in line
    j = js(weit("extract-templates", "hf-hub:timm/not-cached@v2", "-o", out, "--json"))
    assert j["exit_code"] == 3 and "--revision v2" in j["hint"]


def test_pickled_weights_on_the_hub_are_refused(cache, tmp_path, vit_folder):
    folder = tmp_path / "pickled"
    shutil.copytree(vit_folder, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    publish(cache, "org/pickled", folder)
    r = weit("extract-templates", "hf-hub:org/pickled", "-o", tmp_path / "b.safetensors")
    assert r.exit_code == 3 and "never unpickles" in r.stderr and not (tmp_path / "b.safetensors").exists()


def test_teacher_by_hub_id_is_recorded(cache, tmp_path):
    from test_teacher import TINY, _teacher

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY)
    teacher = _teacher(recipe, tmp_path / "teacher")
    publish(cache, "org/teacher", teacher)
    out = tmp_path / "bundle.safetensors"
    r = weit("pretrain", recipe, "-o", out, "--teacher", "hf-hub:org/teacher", "--set", "train.steps=1", "--json")
    assert r.exit_code == 0, r.stdout
    res = js(r)
    assert res["teacher"]["source"] == "hf-hub:org/teacher" and res["teacher"]["revision"] == COMMIT
    prov = json.loads(load_weit(out, "weit.templates")[1]["provenance"])
    assert prov["teacher_source"]["repo_id"] == "org/teacher" and prov["teacher_sha256"] == checkpoint_sha256(teacher)


def test_inspect_a_hub_model(cache, vit_folder):
    publish(cache, "timm/tiny-vit", vit_folder)
    r = js(weit("inspect", "hf-hub:timm/tiny-vit", "--json"))
    assert r["kind"] == "dense" and r["architecture"]["family"] and r["source"]["revision"] == COMMIT
    assert r["params"]["dense"] == js(weit("inspect", vit_folder, "--json"))["params"]["dense"]


def test_sample_a_hub_dit(cache, tmp_path):
    """A diffusers DiT by hub id (its folder as weit writes it: config.json, weights, scheduler_config.json)."""
    from test_dit import make_tiny_dit

    folder = tmp_path / "dit"
    make_tiny_dit(0).save_pretrained(str(folder))
    bundle = tmp_path / "b.safetensors"
    weit("extract-templates", folder, "-o", bundle, "--json")
    model = tmp_path / "m"
    weit("materialize", bundle, "-o", model, "--json")
    publish(cache, "org/dit", model)
    a = js(weit("sample", "hf-hub:org/dit", "-o", tmp_path / "a.png", "-n", "3", "--steps", "2", "--json"))
    b = js(weit("sample", model, "-o", tmp_path / "b.png", "-n", "3", "--steps", "2", "--json"))
    assert a["source"]["revision"] == COMMIT and a["sha256"] == b["sha256"], "the hub copy samples the same bytes"
