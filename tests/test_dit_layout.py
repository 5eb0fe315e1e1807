"""The facts docs/dit-layout.md states about diffusers' DiTTransformer2DModel, checked on a tiny one, so
that a diffusers upgrade that changes them fails here rather than in the dit family."""

from __future__ import annotations

import copy
import json

import torch

CFG = dict(sample_size=28, patch_size=4, in_channels=1, num_layers=2, num_attention_heads=2, attention_head_dim=16, num_embeds_ada_norm=10, norm_type="ada_norm_zero")
D, C = 32, 10

BLOCK = {  # per block, D = 32, 10 classes
    "norm1.emb.timestep_embedder.linear_1.weight": (D, 256),
    "norm1.emb.timestep_embedder.linear_1.bias": (D,),
    "norm1.emb.timestep_embedder.linear_2.weight": (D, D),
    "norm1.emb.timestep_embedder.linear_2.bias": (D,),
    "norm1.emb.class_embedder.embedding_table.weight": (C + 1, D),
    "norm1.linear.weight": (6 * D, D),
    "norm1.linear.bias": (6 * D,),
    **{f"attn1.{n}.{w}": (D, D) if w == "weight" else (D,) for n in ("to_q", "to_k", "to_v", "to_out.0") for w in ("weight", "bias")},
    "ff.net.0.proj.weight": (4 * D, D),
    "ff.net.0.proj.bias": (4 * D,),
    "ff.net.2.weight": (D, 4 * D),
    "ff.net.2.bias": (D,),
}
GLOBAL = {
    "pos_embed.proj.weight": (D, 1, 4, 4),
    "pos_embed.proj.bias": (D,),
    "proj_out_1.weight": (2 * D, D),
    "proj_out_1.bias": (2 * D,),
    "proj_out_2.weight": (16, D),
    "proj_out_2.bias": (16,),
}


def make(**kw):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(**{**CFG, **kw}).eval()


def inputs(n=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 28, 28, generator=g), torch.tensor([0, 500, 999])[:n], torch.tensor([1, 5, 10])[:n]


def run(m, x, t, y):
    with torch.no_grad():
        return m(x, timestep=t, class_labels=y).sample


def test_state_dict_keys_shapes_and_the_one_buffer():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    m = make()
    want = dict(GLOBAL) | {f"transformer_blocks.{i}.{k}": v for i in range(2) for k, v in BLOCK.items()}
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == want
    assert set(dict(m.named_parameters())) == set(want)
    buffers = dict(m.named_buffers())
    assert list(buffers) == ["pos_embed.pos_embed"] and "pos_embed.pos_embed" not in m.state_dict()  # non-persistent
    assert torch.equal(buffers["pos_embed.pos_embed"][0], get_2d_sincos_pos_embed(D, 7, base_size=7, output_type="pt").float())
    assert sum(p.numel() for p in m.parameters()) == 60272
    # no affine LayerNorm anywhere; diffusers' init does not zero adaLN or the output layer
    assert not any("norm" in k and k.endswith(("norm.weight", "norm3.weight", "norm_out.weight")) for k in want)
    assert m.transformer_blocks[0].norm1.linear.weight.abs().max() > 0 and m.proj_out_2.weight.abs().max() > 0


def test_zeroed_gates_or_zeroed_branch_outputs_make_a_block_the_identity():
    m, x, t, y = make(), *inputs()
    one = make(num_layers=1)
    one.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("transformer_blocks.1.")})
    ref = run(one, x, t, y)
    gates = copy.deepcopy(m)
    with torch.no_grad():
        lin = gates.transformer_blocks[1].norm1.linear
        for chunk in (2, 5):  # shift_msa, scale_msa, GATE_MSA, shift_mlp, scale_mlp, GATE_MLP
            lin.weight[chunk * D : (chunk + 1) * D] = 0
            lin.bias[chunk * D : (chunk + 1) * D] = 0
    assert torch.equal(run(gates, x, t, y), ref)
    outs = copy.deepcopy(m)
    with torch.no_grad():
        for lin in (outs.transformer_blocks[1].attn1.to_out[0], outs.transformer_blocks[1].ff.net[2]):
            lin.weight.zero_()
            lin.bias.zero_()
    assert torch.equal(run(outs, x, t, y), ref)


def test_the_output_layer_is_conditioned_by_block_0s_embedder():
    m, x, t, y = make(), *inputs()
    with torch.no_grad():
        m.transformer_blocks[0].norm1.linear.weight.zero_()  # block 0 itself is now the identity…
        m.transformer_blocks[0].norm1.linear.bias.zero_()
        before = run(m, x, t, y)
        m.transformer_blocks[0].norm1.emb.timestep_embedder.linear_2.bias.add_(1.0)
        assert not torch.allclose(run(m, x, t, y), before)  # …yet its embedder still feeds proj_out_1
        m.transformer_blocks[1].norm1.emb.timestep_embedder.linear_2.bias.add_(1.0)
        assert not torch.allclose(run(m, x, t, y), before)


def test_width_tiling_keeps_layernorm_but_not_the_sincos_position_embedding():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    h = torch.randn(5, D)
    ln = lambda w: torch.nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)  # noqa: E731
    torch.testing.assert_close(ln(2 * D)(h.repeat(1, 2)), ln(D)(h).repeat(1, 2), atol=1e-6, rtol=0)
    pe, pe2 = (get_2d_sincos_pos_embed(w, 7, base_size=7, output_type="pt").float() for w in (D, 2 * D))
    assert (pe2 - pe.repeat(1, 2)).abs().max() > 1.0  # the 2D-wide model's table is not the tiled one
    assert torch.equal(pe2[:, ::2], pe)  # it holds the D-wide table in its even channels


def test_label_dropout_in_train_mode_draws_once_per_embedder():
    from diffusers.models.embeddings import LabelEmbedding

    m = make().train()
    drops = []
    orig = LabelEmbedding.token_drop

    def record(self, labels, force_drop_ids=None):
        out = orig(self, labels, force_drop_ids)
        drops.append(out == self.num_classes)
        return out

    LabelEmbedding.token_drop = record
    try:
        torch.manual_seed(3)
        with torch.no_grad():
            m(torch.randn(200, 1, 28, 28), timestep=torch.full((200,), 10), class_labels=torch.arange(200) % C)
    finally:
        LabelEmbedding.token_drop = orig
    assert len(drops) == 3  # block 0, block 1, and block 0's embedder again for the output layer
    assert not torch.equal(drops[0], drops[1])


def test_from_pretrained_loads_a_minimal_config_and_weits_own_safetensors(tmp_path):
    from diffusers import DiTTransformer2DModel

    from weit_cli.io.files import write_safetensors

    m, x, t, y = make(), *inputs()
    folder = tmp_path / "dit"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({k: v for k, v in CFG.items() if k != "norm_type"}))
    specs = [(k, tuple(v.shape), v.dtype, (lambda v=v: v)) for k, v in sorted(m.state_dict().items())]
    write_safetensors(folder / "diffusion_pytorch_model.safetensors", specs, {"weit_format": "1", "kind": "weit.dense"})
    loaded = DiTTransformer2DModel.from_pretrained(folder, low_cpu_mem_usage=False).eval()
    assert torch.equal(run(loaded, x, t, y), run(m, x, t, y))


def test_from_pretrained_checks_neither_the_class_name_nor_missing_keys(tmp_path):
    """What weit has to check itself before handing a folder to diffusers."""
    from diffusers import DiTTransformer2DModel
    from safetensors.torch import save_file

    m = make()
    folder = tmp_path / "dit"
    m.save_pretrained(folder)
    conf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**conf, "_class_name": "UNet2DModel"}))
    DiTTransformer2DModel.from_pretrained(folder, low_cpu_mem_usage=False)  # no error
    sd = {k: v for k, v in m.state_dict().items() if k != "proj_out_2.bias"}
    save_file(sd, folder / "diffusion_pytorch_model.safetensors")
    DiTTransformer2DModel.from_pretrained(folder, low_cpu_mem_usage=False)  # a logged warning only
