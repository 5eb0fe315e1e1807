"""The decision-transformer family (issue 11): transformers' DecisionTransformerModel through
extract-templates, materialize and inspect. Predicted actions are the function that must survive
extraction, lossless growth and export; tiny models, CPU, offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import randomize, weit

from weit_cli.errors import EXIT_INPUT, EXIT_USAGE

transformers = pytest.importorskip("transformers")
from transformers import DecisionTransformerConfig, DecisionTransformerModel  # noqa: E402

FAMILY = "decision-transformer"
TINY = dict(state_dim=5, act_dim=3, hidden_size=32, n_layer=2, n_head=4, max_ep_len=40, n_positions=30, bos_token_id=None, eos_token_id=None)
HEAD_DIM = 8  # default template size; full rank 64
FULL = HEAD_DIM**2


def make_tiny_dt(seed: int = 0, **overrides) -> DecisionTransformerModel:
    """A tiny DT (eval mode) with every parameter random: transformers starts biases at zero and
    LayerNorms at one, which would hide resizing bugs in exactly the tensors resizing must get right."""
    return randomize(DecisionTransformerModel(DecisionTransformerConfig(**{**TINY, **overrides})), seed, norm="ln")


@pytest.fixture(scope="module")
def dt_dir(tmp_path_factory) -> Path:
    """`make_tiny_dt(0)` as transformers saves it (config.json with n_inner null, model.safetensors)."""
    folder = tmp_path_factory.mktemp("dt") / "tiny_dt"
    make_tiny_dt(0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dt_bundle(dt_dir, tmp_path_factory) -> Path:
    """A full-rank (exact) bundle of `dt_dir`, written by the CLI."""
    out = tmp_path_factory.mktemp("dt_bundle") / "dt.safetensors"
    r = weit("extract-templates", dt_dir, "-o", out, "-n", FULL, "--json")
    result = json.loads(r.stdout)
    assert result["architecture"]["family"] == FAMILY
    assert max(result["relative_error"].values()) < 1e-6
    return out


def episode_batch(state_dim=5, act_dim=3, max_ep_len=40, seed=7) -> dict[str, torch.Tensor]:
    """Two 6-step windows; the first left-padded by 2 steps, as a DT evaluation batch is."""
    g = torch.Generator().manual_seed(seed)
    b, t = 2, 6
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, :2] = 0
    return dict(
        states=torch.randn(b, t, state_dim, generator=g),
        actions=torch.rand(b, t, act_dim, generator=g) * 2 - 1,
        rewards=torch.randn(b, t, 1, generator=g),
        returns_to_go=torch.randn(b, t, 1, generator=g) * 3,
        timesteps=torch.randint(0, max_ep_len, (b, t), generator=g),
        attention_mask=mask,
    )


@torch.no_grad()
def action_preds(model, batch) -> torch.Tensor:
    return model.eval()(**batch).action_preds


def materialize(bundle: Path, out: Path, *args) -> DecisionTransformerModel:
    weit("materialize", bundle, "-o", out, *args)
    return DecisionTransformerModel.from_pretrained(out)


# ---------------------------------------------------------------------------------------------- extraction and export
def test_full_rank_extraction_and_export_predict_the_same_actions(dt_dir, dt_bundle, tmp_path):
    source = DecisionTransformerModel.from_pretrained(dt_dir)
    batch = episode_batch()
    out = tmp_path / "same"
    model = materialize(dt_bundle, out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "decision_transformer" and cfg["architectures"] == ["DecisionTransformerModel"]
    assert "transformers_version" not in cfg  # same bytes whichever transformers wrote them
    for k in ("state_dim", "act_dim", "hidden_size", "n_layer", "n_head", "max_ep_len", "n_positions", "activation_function"):
        assert getattr(model.config, k) == getattr(source.config, k), k
    assert model.config.n_inner == 4 * TINY["hidden_size"]
    torch.testing.assert_close(action_preds(model, batch), action_preds(source, batch), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        a, b = model(**batch), source(**batch)
    torch.testing.assert_close(a.state_preds, b.state_preds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.return_preds, b.return_preds, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("depth,width", [(1, 16), (3, 24), (4, 64)])
def test_materialized_sizes_load_with_from_pretrained(dt_bundle, tmp_path, depth, width):
    out = tmp_path / "m"
    r = weit("materialize", dt_bundle, "-o", out, "--depth", depth, "--width", width, "--depth-rule", "interp", "--json")
    result = json.loads(r.stdout)
    model = DecisionTransformerModel.from_pretrained(out)
    assert (model.config.n_layer, model.config.hidden_size, model.config.n_head) == (depth, width, width // HEAD_DIM)
    assert result["params"] == sum(p.numel() for p in model.state_dict().values())
    assert result["export"]["format"] == "transformers" and "from_pretrained" in result["export"]["load"]
    preds = action_preds(model, episode_batch())
    assert preds.shape == (2, 6, TINY["act_dim"]) and preds.abs().max() <= 1  # tanh-squashed


def test_bare_safetensors_holds_the_config_and_extracts_again(dt_dir, dt_bundle, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "dt.safetensors"
    result = json.loads(weit("materialize", dt_bundle, "-o", out, "--json").stdout)
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["config"]) == result["export"]["config"]
    # the load instruction the command prints, run as printed
    scope = {"json": json, "safetensors": __import__("safetensors.torch"), "transformers": transformers}
    exec(result["export"]["load"], scope)
    model = scope["m"]
    batch = episode_batch()
    torch.testing.assert_close(action_preds(model, batch), action_preds(DecisionTransformerModel.from_pretrained(dt_dir), batch), atol=1e-5, rtol=1e-5)
    # The header's config says the head count, so the bare file extracts without --num-heads.
    again = tmp_path / "again.safetensors"
    r = weit("extract-templates", out, "-o", again, "-n", FULL, "--json")
    assert json.loads(r.stdout)["architecture"]["num_heads"] == TINY["n_head"]


# ---------------------------------------------------------------------------------------------- lossless growth
def test_tiled_width_growth_keeps_the_actions(dt_dir, dt_bundle, tmp_path):
    batch = episode_batch()
    want = action_preds(DecisionTransformerModel.from_pretrained(dt_dir), batch)
    model = materialize(dt_bundle, tmp_path / "wide", "--width", 64)
    assert model.config.n_head == 8 and model.config.n_inner == 256
    torch.testing.assert_close(action_preds(model, batch), want, atol=1e-5, rtol=1e-5)


def test_identity_depth_growth_keeps_the_actions(dt_dir, dt_bundle, tmp_path):
    batch = episode_batch()
    want = action_preds(DecisionTransformerModel.from_pretrained(dt_dir), batch)
    model = materialize(dt_bundle, tmp_path / "deep", "--depth", 5, "--depth-rule", "identity")
    assert model.config.n_layer == 5
    torch.testing.assert_close(action_preds(model, batch), want, atol=1e-5, rtol=1e-5)


def test_identity_depth_and_tiled_width_together_keep_the_actions(dt_dir, dt_bundle, tmp_path):
    batch = episode_batch()
    want = action_preds(DecisionTransformerModel.from_pretrained(dt_dir), batch)
    model = materialize(dt_bundle, tmp_path / "both", "--depth", 4, "--width", 96, "--depth-rule", "identity")
    torch.testing.assert_close(action_preds(model, batch), want, atol=1e-5, rtol=1e-5)


def test_growth_without_division_or_identity_changes_the_actions(dt_dir, dt_bundle, tmp_path):
    """The lossless tests above are not vacuous: the same growth by other rules changes the function."""
    batch = episode_batch()
    want = action_preds(DecisionTransformerModel.from_pretrained(dt_dir), batch)
    nodiv = materialize(dt_bundle, tmp_path / "nodiv", "--width", 64, "--width-rule", "tile-nodiv")
    stack = materialize(dt_bundle, tmp_path / "stack", "--depth", 4, "--depth-rule", "stack")
    assert (action_preds(nodiv, batch) - want).abs().max() > 1e-3
    assert (action_preds(stack, batch) - want).abs().max() > 1e-3


def test_prefix_width_shrink_keeps_whole_heads(dt_dir, dt_bundle, tmp_path):
    """Width 32 → 16: the first two of four heads, each with its q, k and v columns (Conv1D: (in, out))."""
    from safetensors.torch import load_file

    src = load_file(str(dt_dir / "model.safetensors"))
    materialize(dt_bundle, tmp_path / "narrow", "--width", 16)
    dst = load_file(str(tmp_path / "narrow" / "model.safetensors"))
    cols = torch.cat([torch.arange(16) + r * 32 for r in range(3)])
    for layer in range(2):
        key = f"encoder.h.{layer}.attn.c_attn"
        torch.testing.assert_close(dst[f"{key}.weight"], src[f"{key}.weight"][:16, cols], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dst[f"{key}.bias"], src[f"{key}.bias"][cols])
        proj = f"encoder.h.{layer}.attn.c_proj.weight"
        torch.testing.assert_close(dst[proj], src[proj][:16, :16], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dst["embed_timestep.weight"], src["embed_timestep.weight"][:, :16])


# ---------------------------------------------------------------------------------------------- the adapter itself
def test_param_count_and_template_types_match_the_module():
    from weit_cli.arch import get_adapter

    ad = get_adapter(FAMILY)
    for overrides in ({}, dict(n_layer=3, hidden_size=48, n_head=6, n_inner=96), dict(action_tanh=False, n_positions=1)):
        model = make_tiny_dt(1, **overrides)
        state = model.state_dict()
        arch = ad.infer_arch(state, {"config": model.config.to_dict()})
        assert ad.param_count(arch) == sum(v.numel() for v in state.values())
        assert ad.param_count(arch) == sum(v.numel() for v in ad.build(arch).state_dict().values())
        templated = {k for k in state if ad.template_type_of(k, arch)}
        assert templated == {k for k in state if k.startswith("encoder.h.") and k.endswith("weight") and ".ln_" not in k}
        for k, v in state.items():  # every tensor's axes fit its shape
            sizes = ad.sizes(arch)
            for ax in ad.axes(k, arch):
                assert v.shape[ax.dim] == ax.runs * sizes[ax.name], k


def test_weight_selection_keeps_whole_heads_and_loads(dt_dir):
    from safetensors.torch import load_file

    from weit_cli.arch import get_adapter
    from weit_cli.core.selection import random_init, weight_selection

    ad = get_adapter(FAMILY)
    src = load_file(str(dt_dir / "model.safetensors"))
    src_arch = ad.infer_arch(src, {"config": json.loads((dt_dir / "config.json").read_text())})
    dst_arch = ad.target_arch(src_arch, depth=1, width=16)
    out = weight_selection(src, src_arch, dst_arch, random_init(ad, dst_arch, 0))
    q = src["encoder.h.0.attn.c_attn.weight"]
    heads = torch.tensor([0, 2])  # 2 of 4 heads, evenly spaced
    cols = torch.cat([(heads[:, None] * HEAD_DIM + torch.arange(HEAD_DIM)).reshape(-1) + r * 32 for r in range(3)])
    rows = torch.arange(16) * 2  # evenly spaced embedding channels
    torch.testing.assert_close(out["encoder.h.0.attn.c_attn.weight"], q[rows][:, cols])
    model = ad.build(dst_arch)
    model.load_state_dict(out)
    assert action_preds(model, episode_batch()).shape == (2, 6, 3)
    with pytest.raises(Exception, match="only initialises smaller"):
        weight_selection(src, src_arch, ad.target_arch(src_arch, width=64), random_init(ad, ad.target_arch(src_arch, width=64), 0))


def test_same_seed_same_bytes(dt_dir, dt_bundle, tmp_path):
    from weit_cli.arch import get_adapter
    from weit_cli.core.selection import random_init

    for name in ("a", "b"):
        weit("extract-templates", dt_dir, "-o", tmp_path / f"{name}.safetensors", "-n", 16)
        weit("materialize", tmp_path / f"{name}.safetensors", "-o", tmp_path / name, "--width", 48, "--depth", 3)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    ad = get_adapter(FAMILY)
    arch = ad.arch_from_dict(json.loads(json.dumps(ad.target_arch(ad.infer_arch(
        make_tiny_dt().state_dict(), {"config": {"n_head": 4}})).to_dict())))
    one, two = random_init(ad, arch, 3), random_init(ad, arch, 3)
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_inspect_reads_folders_bundles_and_bare_files(dt_dir, dt_bundle, tmp_path):
    dense = json.loads(weit("inspect", dt_dir, "--json").stdout)
    assert dense["architecture"]["family"] == FAMILY and dense["architecture"]["num_heads"] == 4
    assert dense["description"].startswith("Decision Transformer depth 2, width 32, 4 heads")
    bundle = json.loads(weit("inspect", dt_bundle, "--json").stdout)
    assert set(bundle["templates"]) == {"c_attn", "attn_proj", "c_fc", "mlp_proj"}
    assert bundle["templates"]["c_attn"] == [FULL, HEAD_DIM, HEAD_DIM]
    weit("materialize", dt_bundle, "-o", tmp_path / "m.safetensors")
    bare = json.loads(weit("inspect", tmp_path / "m.safetensors", "--json").stdout)
    assert bare["architecture"] == dense["architecture"]


def test_recipe_model_section_validates_and_sizes_the_largest_model():
    from weit_cli import recipe as rcp
    from weit_cli.arch import get_adapter

    raw = {
        "model": {"family": FAMILY, "state_dim": 17, "act_dim": 6, "context": 20, "head_dim": 16},
        "nested": {"depths": [2, 3], "widths": [32, 64]},
    }
    r = rcp.validate(raw)
    ad = get_adapter(FAMILY)
    arch = ad.arch_for_recipe(r.model, depth=3, width=64, num_classes=0)
    assert (arch.num_heads, arch.n_positions, arch.inner, arch.state_dim) == (4, 60, 256, 17)
    with pytest.raises(Exception, match="head_dim"):
        rcp.validate({**raw, "nested": {"depths": [2], "widths": [40]}})
    with pytest.raises(Exception, match="state_dim"):
        rcp.validate({**raw, "model": {"family": FAMILY, "act_dim": 6}})


# ---------------------------------------------------------------------------------------------- bad inputs
def _bad(tmp_path, *args, code: int, says: str):
    out = tmp_path / "out"
    r = weit(*args, "-o", out, expect=code)
    text = r.stderr if r.stderr else r.stdout
    assert says in text, text
    assert len([line for line in r.stderr.splitlines() if line.strip()]) <= 2, r.stderr  # message + hint, no traceback
    assert not out.exists() and not list(tmp_path.glob("*.tmp*"))


def test_a_folder_of_another_model_class_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2Model

    GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=10, n_positions=8)).save_pretrained(tmp_path / "gpt2")
    _bad(tmp_path, "extract-templates", tmp_path / "gpt2", code=EXIT_INPUT, says="match no supported architecture")


@pytest.mark.parametrize(
    "edit,says",
    [
        ({"model_type": "gpt2"}, "model_type 'decision_transformer'"),
        ({"hidden_size": 64}, "hidden_size 64 (weights: 32)"),
        ({"n_inner": 100}, "n_inner 100 (weights: 128)"),
        ({"n_head": 5}, "do not divide width 32"),
        ({"scale_attn_by_inverse_layer_idx": True}, "layer index"),
        ({"activation_function": "swish-ish"}, "not supported"),
    ],
)
def test_a_config_that_does_not_match_the_weights_is_refused(dt_dir, tmp_path, edit, says):
    folder = tmp_path / "edited"
    shutil.copytree(dt_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **edit}))
    _bad(tmp_path, "extract-templates", folder, code=EXIT_INPUT, says=says)


def test_bare_weights_without_a_config_need_the_head_count(dt_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(dt_dir / "model.safetensors")), str(tmp_path / "bare.safetensors"))
    _bad(tmp_path, "extract-templates", tmp_path / "bare.safetensors", code=EXIT_INPUT, says="--num-heads")
    weit("extract-templates", tmp_path / "bare.safetensors", "-o", tmp_path / "ok.safetensors", "--num-heads", 4)


def test_a_corrupt_weights_file_is_refused(dt_dir, tmp_path):
    folder = tmp_path / "corrupt"
    shutil.copytree(dt_dir, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    r = weit("extract-templates", folder, "-o", tmp_path / "out", expect=EXIT_INPUT)
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args,says",
    [
        (("--width", 20), "nearest valid widths: 16, 24"),
        (("--depth", 0), "depth must be at least 1"),
        (("--num-classes", 3), "no classes"),
        (("--num-heads", 3), "head_dim"),
        (("--width", 8 * 10**6), "parameters"),
        (("--mlp-ratio", 0.1), "template size"),
    ],
)
def test_impossible_sizes_are_refused(dt_bundle, tmp_path, args, says):
    _bad(tmp_path, "materialize", dt_bundle, *args, code=EXIT_USAGE, says=says)


def test_old_causal_mask_buffers_are_skipped_as_transformers_does(dt_dir, dt_bundle, tmp_path):
    """transformers before 4.2x saved GPT-2's `attn.bias` and `attn.masked_bias` buffers (the Hub's DT
    checkpoints hold them, as pytorch_model.bin); from_pretrained skips them, and so does weit."""
    from safetensors.torch import load_file

    state = load_file(str(dt_dir / "model.safetensors"))
    for layer in range(TINY["n_layer"]):
        state[f"encoder.h.{layer}.attn.bias"] = torch.tril(torch.ones(30, 30, dtype=torch.bool)).view(1, 1, 30, 30)
        state[f"encoder.h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    old = tmp_path / "old"
    old.mkdir()
    torch.save(state, old / "pytorch_model.bin")
    shutil.copy(dt_dir / "config.json", old / "config.json")
    assert json.loads(weit("inspect", old, "--json").stdout)["architecture"]["depth"] == 2
    weit("extract-templates", old, "-o", tmp_path / "old.safetensors", "-n", FULL)
    got, want = load_file(str(tmp_path / "old.safetensors")), load_file(str(dt_bundle))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)  # the provenance differs
