"""The `dit` family (issue 10): diffusers' DiTTransformer2DModel through extract-templates,
materialize (a folder `from_pretrained` loads unchanged, or a bare .safetensors) and inspect; lossless
growth on the denoiser's output; whole heads on shrinking; bad inputs; determinism. Tiny models."""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import weit

from weit_cli.arch._registry import detect_family, get_adapter
from weit_cli.arch.dit import DiTArch
from weit_cli.core.bundle import Bundle
from weit_cli.core.extract import from_dense
from weit_cli.core.resize import resize
from weit_cli.core.selection import weight_selection
from weit_cli.errors import EXIT_INPUT, EXIT_USAGE, WeitError
from weit_cli.io.files import load_dense, read_header

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# 2 blocks × width 16 (2 heads of 8): full rank at the default template size 8 is 64 templates.
TINY = dict(num_attention_heads=2, attention_head_dim=8, in_channels=1, num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=3)
ARCH = DiTArch(sample_size=8, patch_size=2, in_channels=1, out_channels=1, num_classes=3, depth=2, width=16, num_heads=2)
FULL = 64
ad = get_adapter("dit")


def make_tiny_dit(seed: int = 0, **overrides):
    """A tiny DiT (eval mode) with every parameter random: diffusers starts biases at zero, which
    would hide a resizing bug in exactly the tensors the rules must get right."""
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(**{**TINY, **overrides})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def denoise(model, batch) -> torch.Tensor:
    x, t, y = batch
    with torch.no_grad():
        return model(x, timestep=t, class_labels=y).sample


def load(folder: Path):
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel.from_pretrained(str(folder)).eval()


def model_of(bundle: Bundle):
    m = ad.build(bundle.arch).eval()
    m.load_state_dict(bundle.state_dict(), strict=True)
    return m


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory) -> Path:
    """A diffusers folder (save_pretrained) of `make_tiny_dit(0)`. Do not modify."""
    folder = tmp_path_factory.mktemp("dense") / "tiny_dit"
    make_tiny_dit(0).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(7)
    return torch.randn(3, 1, 8, 8, generator=g), torch.tensor([1, 250, 999]), torch.tensor([0, 2, 1])


@pytest.fixture(scope="module")
def full_bundle(dit_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "dit.safetensors"
    weit("extract-templates", dit_dir, "-o", out, "--num-templates", FULL)
    return out


def _bundle(seed: int = 0, **overrides) -> tuple[Bundle, torch.nn.Module]:
    model = make_tiny_dit(seed, **overrides)
    arch = ad.infer_arch(model.state_dict(), dict(model.config))
    b, errors = from_dense(ad, arch, model.state_dict(), None, FULL)
    assert max(errors.values()) < 1e-5
    return b, model


# ============================================================================ reading diffusers folders
def test_a_diffusers_folder_is_read_as_a_dit(dit_dir):
    state, hints = load_dense(dit_dir)
    adapter = detect_family(state.keys())
    assert adapter.family == "dit" and hints["_class_name"] == "DiTTransformer2DModel"
    arch = adapter.infer_arch(state, hints)
    assert arch == ARCH and arch.head_dim == 8 and arch.hidden == 64
    assert ad.param_count(arch) == sum(v.numel() for v in state.values())
    assert "pos_embed.pos_embed" not in state  # the sin-cos position code is a buffer diffusers recomputes
    types = {ad.template_type_of(k) for k in state} - {None}
    assert types == {"qkv", "proj", "fc1", "fc2", "ada", "temb"}
    assert ad.template_type_of("transformer_blocks.0.norm1.emb.timestep_embedder.linear_1.weight") is None
    assert ad.template_type_of("proj_out_1.weight") is None


def test_param_count_matches_diffusers_at_other_sizes():
    for overrides in ({"num_layers": 3, "num_attention_heads": 3, "patch_size": 4}, {"in_channels": 3, "out_channels": 6, "num_embeds_ada_norm": 7}):
        m = make_tiny_dit(0, **overrides)
        arch = ad.infer_arch(m.state_dict(), dict(m.config))
        assert ad.param_count(arch) == sum(p.numel() for p in m.parameters())
        rebuilt = ad.build(arch).state_dict()
        assert {k: v.shape for k, v in rebuilt.items()} == {k: v.shape for k, v in m.state_dict().items()}


def test_inspect_reads_a_diffusers_folder(dit_dir, full_bundle):
    r = json.loads(weit("inspect", dit_dir, "--json").stdout)
    assert r["kind"] == "dense" and r["architecture"] == ARCH.to_dict() and r["description"].startswith("DiT depth 2, width 16")
    r = json.loads(weit("inspect", full_bundle, "--json").stdout)
    assert r["architecture"]["family"] == "dit" and set(r["templates"]) == {"qkv", "proj", "fc1", "fc2", "ada", "temb"}


# ============================================================================ extraction and export
def test_full_rank_extraction_reproduces_the_denoiser(dit_dir, full_bundle, batch, tmp_path):
    r = json.loads(weit("materialize", full_bundle, "-o", tmp_path / "m", "--json").stdout)
    assert r["export"]["format"] == "diffusers" and r["export"]["load"].endswith(f".from_pretrained('{tmp_path / 'm'}')")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json"]
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["_class_name"] == "DiTTransformer2DModel" and cfg["_diffusers_version"]
    want = denoise(load(dit_dir), batch)
    got = denoise(load(tmp_path / "m"), batch)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()


@pytest.mark.parametrize("depth,width", [(1, 8), (3, 16), (2, 32), (4, 24)])
def test_materialized_sizes_load_with_from_pretrained(full_bundle, batch, tmp_path, depth, width):
    weit("materialize", full_bundle, "-o", tmp_path / "m", "--depth", depth, "--width", width)
    m = load(tmp_path / "m")
    assert m.config.num_layers == depth and m.config.num_attention_heads * m.config.attention_head_dim == width
    assert m.config.attention_head_dim == 8 and m.config.num_embeds_ada_norm == 3
    out = denoise(m, batch)
    assert out.shape == batch[0].shape and torch.isfinite(out).all()


def test_bare_safetensors_carries_the_config(full_bundle, batch, tmp_path):
    from diffusers import DiTTransformer2DModel

    out = tmp_path / "m.safetensors"
    r = json.loads(weit("materialize", full_bundle, "-o", out, "--width", 32, "--json").stdout)
    assert r["export"]["format"] == "safetensors" and r["export"]["class_name"] == "DiTTransformer2DModel"
    cfg = json.loads(read_header(out)["__metadata__"]["config"])
    m = DiTTransformer2DModel.from_config(cfg).eval()
    state, hints = load_dense(out)
    m.load_state_dict(state, strict=True)
    assert ad.infer_arch(state, hints) == DiTArch(**{**ARCH.to_dict(), "width": 32, "num_heads": 4})
    assert torch.isfinite(denoise(m, batch)).all()


def test_same_inputs_give_the_same_bytes(dit_dir, full_bundle, tmp_path):
    for name in ("a", "b"):
        weit("extract-templates", dit_dir, "-o", tmp_path / f"{name}.safetensors", "--num-templates", 5, "--seed", 3)
        weit("materialize", full_bundle, "-o", tmp_path / name, "--depth", 3, "--width", 24, "--depth-rule", "identity", "--seed", 3)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    for f in ("config.json", "diffusion_pytorch_model.safetensors"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


# ============================================================================ lossless growth
def _tiled_position_code(source, grown) -> None:
    """Put the source's sin-cos position code, tiled, into the grown model's buffer: the one input
    the weights cannot carry (diffusers recomputes it from the width)."""
    src = source.pos_embed.pos_embed
    reps = grown.pos_embed.pos_embed.shape[-1] // src.shape[-1]
    grown.pos_embed.pos_embed.copy_(src.repeat(1, 1, reps))


@pytest.mark.parametrize("factor", [2, 3])
def test_tiled_width_growth_keeps_the_denoiser_output(batch, factor):
    b, model = _bundle()
    grown = model_of(resize(b, ad.target_arch(b.arch, width=16 * factor)))
    assert grown.config.attention_head_dim == 8 and grown.config.num_attention_heads == 2 * factor
    want = denoise(model, batch)
    # diffusers' position code of the new width is not a tiling of the old one …
    assert not torch.allclose(denoise(grown, batch), want, atol=1e-3)
    # … and it is the only difference.
    _tiled_position_code(model, grown)
    assert torch.allclose(denoise(grown, batch), want, atol=1e-5, rtol=1e-5)


def test_identity_depth_growth_keeps_the_denoiser_output_end_to_end(full_bundle, dit_dir, batch, tmp_path):
    weit("materialize", full_bundle, "-o", tmp_path / "m", "--depth", 5, "--depth-rule", "identity")
    m = load(tmp_path / "m")
    assert m.config.num_layers == 5
    assert torch.allclose(denoise(m, batch), denoise(load(dit_dir), batch), atol=1e-4, rtol=1e-4)


def test_default_depth_rule_grows_a_dit_by_identity_blocks(full_bundle, dit_dir, batch, tmp_path):
    """`auto` grows DiTs by identity blocks (interpolated blocks drew noise beyond the range,
    docs/benchmarks.md): the grown DiT computes the bundle's, unlike `--depth-rule interp`."""
    weit("materialize", full_bundle, "-o", tmp_path / "auto", "--depth", 5)
    auto = load(tmp_path / "auto")
    assert torch.allclose(denoise(auto, batch), denoise(load(dit_dir), batch), atol=1e-4, rtol=1e-4)
    weit("materialize", full_bundle, "-o", tmp_path / "interp", "--depth", 5, "--depth-rule", "interp")
    assert not torch.allclose(denoise(load(tmp_path / "interp"), batch), denoise(auto, batch), atol=1e-3)
    b, _ = _bundle()
    auto, identity = (resize(b, ad.target_arch(b.arch, depth=4), *rule).state_dict() for rule in ((), ("identity",)))
    assert auto.keys() == identity.keys() and all(torch.equal(v, identity[k]) for k, v in auto.items())


def test_other_families_still_grow_by_interpolation():
    from weit_cli.arch._registry import get_adapter

    assert {f: get_adapter(f).grow_depth_rule for f in ("vit", "resnet", "decision-transformer", "dit")} == {
        "vit": "interp", "resnet": "interp", "decision-transformer": "interp", "dit": "identity"}


def test_added_blocks_zero_only_their_gates():
    b, _ = _bundle()
    grown = resize(b, ad.target_arch(b.arch, depth=4), "identity")
    src, new = b.state_dict(), grown.state_dict()
    d = 16
    for j, copy in ((1, 0), (3, 1)):  # identity plan for 2 → 4: blocks 1 and 3 are added after their copies
        w, bias = new[f"transformer_blocks.{j}.norm1.linear.weight"], new[f"transformer_blocks.{j}.norm1.linear.bias"]
        sw, sb = src[f"transformer_blocks.{copy}.norm1.linear.weight"], src[f"transformer_blocks.{copy}.norm1.linear.bias"]
        for chunk in range(6):
            rows = slice(chunk * d, (chunk + 1) * d)
            if chunk in (2, 5):  # gate_msa, gate_mlp
                assert not w[rows].any() and not bias[rows].any()
            else:  # shift and scale as in the copied block
                assert torch.allclose(w[rows], sw[rows], atol=1e-5) and torch.equal(bias[rows], sb[rows])
        assert torch.allclose(new[f"transformer_blocks.{j}.attn1.to_q.weight"], src[f"transformer_blocks.{copy}.attn1.to_q.weight"], atol=1e-5)


def test_identity_depth_and_tiled_width_together(batch):
    b, model = _bundle(seed=1)
    grown = model_of(resize(b, ad.target_arch(b.arch, depth=3, width=32), "identity"))
    _tiled_position_code(model, grown)
    assert torch.allclose(denoise(grown, batch), denoise(model, batch), atol=1e-5, rtol=1e-5)


# ============================================================================ shrinking and selection
def test_prefix_width_shrink_keeps_whole_heads():
    b, _ = _bundle(num_attention_heads=4)  # width 32, 4 heads of 8
    small = resize(b, ad.target_arch(b.arch, width=16))
    assert small.arch.num_heads == 2 and small.arch.head_dim == 8
    src, dst = b.state_dict(), small.state_dict()
    for name in ("to_q", "to_k", "to_v"):
        k = f"transformer_blocks.0.attn1.{name}.weight"
        assert torch.allclose(dst[k], src[k][:16, :16], atol=1e-5)  # heads 0 and 1, whole
    k = "transformer_blocks.1.norm1.linear.weight"
    assert torch.allclose(dst[k], torch.cat([src[k][r * 32 : r * 32 + 16, :16] for r in range(6)]), atol=1e-5)
    assert torch.equal(dst["proj_out_1.bias"], torch.cat([src["proj_out_1.bias"][:16], src["proj_out_1.bias"][32:48]]))
    assert model_of(small)  # loads strictly


def test_weight_selection_keeps_heads_runs_and_the_position_code():
    model = make_tiny_dit(0, num_attention_heads=4, num_layers=3)  # width 32
    src_arch = ad.infer_arch(model.state_dict(), dict(model.config))
    dst_arch = ad.target_arch(src_arch, depth=2, width=16)
    fresh = ad.build(dst_arch).state_dict()
    out = weight_selection(model.state_dict(), src_arch, dst_arch, fresh)
    src = model.state_dict()
    assert set(out) == set(fresh) and all(out[k].shape == fresh[k].shape for k in fresh)
    heads = torch.cat([torch.arange(0, 8), torch.arange(16, 24)])  # heads 0 and 2 of 4, whole
    even = torch.arange(0, 32, 2)
    assert torch.equal(out["transformer_blocks.1.attn1.to_k.weight"], src["transformer_blocks.1.attn1.to_k.weight"][heads][:, even])
    rows = torch.cat([even + r * 32 for r in range(6)])
    assert torch.equal(out["transformer_blocks.0.norm1.linear.bias"], src["transformer_blocks.0.norm1.linear.bias"][rows])
    # every second channel of the wider sin-cos code is the narrower code: selection keeps it consistent
    assert torch.allclose(ad.build(dst_arch).pos_embed.pos_embed, model.pos_embed.pos_embed[..., even], atol=1e-6)
    with pytest.raises(WeitError, match="only initialises smaller"):
        ad.selection_indices(dst_arch, src_arch)


# ============================================================================ refusals
def test_impossible_sizes_are_refused_with_nothing_written(full_bundle, tmp_path):
    out = tmp_path / "m"
    for args, words in (
        (["--width", 12], "nearest valid widths: 8, 16"),
        (["--depth", 0], "depth must be at least 1"),
        (["--num-classes", 5], "class embeddings"),
        (["--mlp-ratio", 2], "MLP ratio"),
        (["--num-heads", 3], "head_dim"),
        (["--width", 10**7], "parameters"),
    ):
        r = weit("materialize", full_bundle, "-o", out, *args, expect=EXIT_USAGE)
        assert words in r.stderr and len(r.stderr.strip().splitlines()) <= 2, r.stderr
        assert not out.exists() and not list(tmp_path.iterdir())


def _copy_dir(src: Path, dst: Path, config: dict | None = None) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    if config is not None:
        cfg = json.loads((src / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, **config}))
    return dst


@pytest.mark.parametrize(
    "config,words",
    [
        ({"_class_name": "Transformer2DModel"}, "not a DiTTransformer2DModel"),
        ({"num_layers": 3}, "num_layers 3 (weights: 2)"),
        ({"num_attention_heads": 4}, "num_attention_heads × attention_head_dim 4×8"),
        ({"num_embeds_ada_norm": 10}, "num_embeds_ada_norm 10 (weights: 3)"),
        ({"norm_type": "ada_norm_single"}, "norm_type='ada_norm_single'"),
        ({"activation_fn": "geglu"}, "activation_fn='geglu'"),
        ({"sample_size": 7}, "not a multiple of the patch size"),
    ],
)
def test_a_mismatched_or_foreign_config_is_refused(dit_dir, tmp_path, config, words):
    bad = _copy_dir(dit_dir, tmp_path / "bad", config)
    out = tmp_path / "b.safetensors"
    r = weit("extract-templates", bad, "-o", out, expect=EXIT_INPUT)
    assert words in r.stderr and len(r.stderr.strip().splitlines()) <= 2, r.stderr
    assert not out.exists()


def test_a_diffusers_model_of_another_class_is_refused(tmp_path):
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    unet.save_pretrained(str(tmp_path / "unet"))
    r = weit("extract-templates", tmp_path / "unet", "-o", tmp_path / "b.safetensors", expect=EXIT_INPUT)
    assert "match no supported architecture" in r.stderr and not (tmp_path / "b.safetensors").exists()


def test_weights_without_config_need_the_sizes(dit_dir, tmp_path):
    bare = tmp_path / "w.safetensors"
    bare.write_bytes((dit_dir / "diffusion_pytorch_model.safetensors").read_bytes())
    out = tmp_path / "b.safetensors"
    r = weit("extract-templates", bare, "-o", out, expect=EXIT_INPUT)
    assert "sample size" in r.stderr and "--img-size" in r.stderr and not out.exists()
    r = weit("extract-templates", bare, "-o", out, "--img-size", 8, expect=EXIT_INPUT)
    assert "number of heads" in r.stderr and not out.exists()
    weit("extract-templates", bare, "-o", out, "--img-size", 8, "--num-heads", 2)
    assert json.loads(read_header(out)["__metadata__"]["architecture"])["width"] == 16


def test_a_corrupt_weights_file_is_refused(dit_dir, tmp_path):
    bad = _copy_dir(dit_dir, tmp_path / "bad")
    w = bad / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    for cmd in (partial(weit, "extract-templates", bad, "-o", tmp_path / "b.safetensors"), partial(weit, "inspect", bad)):
        r = cmd(expect=EXIT_INPUT)
        assert "truncated" in r.stderr and len(r.stderr.strip().splitlines()) <= 2, r.stderr
    assert not (tmp_path / "b.safetensors").exists()


# ============================================================================ recipes
def test_a_dit_recipe_section_validates_and_builds(tmp_path):
    from weit_cli.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("model: {family: dit, sample_size: 8, patch_size: 2, head_dim: 8}\nnested: {depths: [1, 2], widths: [16, 32]}\n")
    r = load_recipe(path)
    assert r.template_size == 8 and set(r.template_counts()) == {"qkv", "proj", "fc1", "fc2", "ada", "temb"}
    arch = ad.arch_for_recipe(r.model, depth=2, width=32, num_classes=3)
    assert ad.param_count(arch) == sum(p.numel() for p in ad.build(arch).parameters())
    for body, words in (
        ("model: {family: dit, sample_size: 8, patch_size: 3}\nnested: {depths: [1], widths: [64]}\n", "does not divide"),
        ("model: {family: dit, head_dim: 6}\nnested: {depths: [1], widths: [18]}\n", "multiples of 12"),
    ):
        path.write_text(body)
        with pytest.raises(Exception, match=words):
            load_recipe(path)


def test_training_commands_refuse_data_of_other_classes(dit_dir, full_bundle, tmp_path):
    """A DiT's class tables live in every block: the training commands refuse data with another class
    count before any training, in one line, and write nothing (tests/test_generation_pipeline.py
    runs every command on matching data)."""
    weit("materialize", full_bundle, "-o", tmp_path / "m")
    for args in (
        ("fit-scalers", full_bundle, "--data", "digits", "-o", tmp_path / "s.safetensors"),
        ("extract-templates", dit_dir, "--data", "digits", "-o", tmp_path / "b.safetensors"),
        ("finetune", tmp_path / "m", "--data", "digits", "--epochs", 1, "-o", tmp_path / "f"),
    ):
        r = weit(*args, expect=None)
        assert r.exit_code != 0 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "10" in r.stderr and "3" in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
