"""The generation task's pieces on a tiny diffusers DiT: the DDPM loss, DDIM sampling with and without
guidance, PNG grids and the scheduler config beside a model folder."""

from __future__ import annotations

import json

import pytest
import torch

from weit_cli.errors import OutputError, WeitError
from weit_cli.arch.dit import DiTDenoiser
from weit_cli.tasks import diffusion as dif

NUM_CLASSES = 4
SHAPE = (1, 16, 16)


def tiny_dit(seed: int = 0, **overrides):
    """A tiny DiT (16 px, patch 4: 16 tokens; width 32, 2 blocks) with every weight drawn from `seed`.

    diffusers starts no gate at zero, but redraw anyway so that a test never passes because a weight
    happens to be zero."""
    from diffusers import DiTTransformer2DModel

    args = dict(sample_size=16, patch_size=4, in_channels=1, num_layers=2, num_attention_heads=2, attention_head_dim=16, num_embeds_ada_norm=NUM_CLASSES)
    model = DiTTransformer2DModel(**{**args, **overrides})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def toy_images(n: int = 32, seed: int = 0):
    """Class-dependent blobs in [-1, 1]: something a model can learn in a few steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % NUM_CLASSES
    x = -torch.ones(n, *SHAPE)
    for i in range(n):
        r = int(y[i]) * 4
        x[i, 0, r : r + 4, :] = 1.0
    return (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1), y


def _diffusion_loss(denoiser, x0, y, scheduler, generator, *, num_classes: int, label_dropout: float = 0.1):
    """DDPM's simple loss on `noised`'s draws (what `Generation.prepare` + `loss` compute in training)."""
    x_t, t, y, noise = dif.noised(x0, y, scheduler, generator, num_classes=num_classes, label_dropout=label_dropout)
    return torch.nn.functional.mse_loss(denoiser(x_t, t, y).float(), noise.float())


def _save_scheduler_config(scheduler, folder):
    """`scheduler_config.json` written by weit's atomic writer, as diffusers' `save_config` would."""
    from weit_cli.io.files import atomic_file

    with atomic_file(folder / dif.SCHEDULER_FILE) as tmp:
        scheduler.to_json_file(tmp)


# ---------------------------------------------------------------------------------------------- loss
def test_loss_is_seeded_finite_and_falls_with_training():
    den = DiTDenoiser(tiny_dit())
    sch = dif.train_scheduler()
    x, y = toy_images()

    def probe():  # the same timesteps, noise and drops every time: a fair before/after comparison
        with torch.no_grad():
            return float(_diffusion_loss(den, x, y, sch, torch.Generator().manual_seed(123), num_classes=NUM_CLASSES))

    before = probe()
    assert before == probe() and torch.isfinite(torch.tensor(before))
    den.train()
    opt = torch.optim.Adam(den.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(25):
        loss = _diffusion_loss(den, x, y, sch, g, num_classes=NUM_CLASSES)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    den.eval()
    assert probe() < 0.7 * before


def test_label_dropout_uses_the_null_row_and_the_generator():
    y = torch.arange(1000) % NUM_CLASSES
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert torch.equal(dif.drop_labels(y, NUM_CLASSES, 0.0, g()), y)
    assert (dif.drop_labels(y, NUM_CLASSES, 1.0, g()) == NUM_CLASSES).all()
    a, b = dif.drop_labels(y, NUM_CLASSES, 0.1, g()), dif.drop_labels(y, NUM_CLASSES, 0.1, g())
    assert torch.equal(a, b)
    dropped = a == NUM_CLASSES
    assert 50 < int(dropped.sum()) < 150 and torch.equal(a[~dropped], y[~dropped])
    # The null label indexes the extra row diffusers gives every block's class table.
    model = tiny_dit()
    assert model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings == dif.null_class(NUM_CLASSES) + 1
    with pytest.raises(WeitError):
        dif.drop_labels(y, NUM_CLASSES, 1.5, g())


def test_labels_out_of_range_are_refused():
    den = DiTDenoiser(tiny_dit())
    x, _ = toy_images(4)
    with pytest.raises(WeitError, match="0..4"):
        _diffusion_loss(den, x, torch.tensor([0, 1, 2, 5]), dif.train_scheduler(), torch.Generator(), num_classes=NUM_CLASSES)


def test_adapter_turns_off_diffusers_unseeded_label_dropout():
    den = DiTDenoiser(tiny_dit()).train()
    x, y = toy_images(64)
    t = torch.full((64,), 500)
    torch.manual_seed(0)
    a = den(x, t, y)
    torch.manual_seed(1)  # diffusers would drop other labels, in each block independently
    assert torch.equal(a, den(x, t, y))


def test_adapter_keeps_the_eps_half_of_a_learned_sigma_output():
    model = tiny_dit(out_channels=2)
    x, y = toy_images(3)
    t = torch.tensor([1, 10, 100])
    full = model(x, timestep=t, class_labels=y).sample
    assert full.shape[1] == 2
    assert torch.equal(DiTDenoiser(model)(x, t, y), full[:, :1])


# ---------------------------------------------------------------------------------------------- sampling
def _sample(den, labels, **kw):
    return dif.sample(den, labels, shape=SHAPE, num_classes=NUM_CLASSES, steps=kw.pop("steps", 4), **kw)


def test_sampling_is_seeded_and_independent_of_the_batch_size():
    den = DiTDenoiser(tiny_dit())
    labels = torch.arange(6) % NUM_CLASSES
    a = _sample(den, labels, seed=7, batch_size=6)
    assert a.shape == (6, *SHAPE) and a.dtype == torch.float32 and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, _sample(den, labels, seed=7, batch_size=6))
    torch.testing.assert_close(a, _sample(den, labels, seed=7, batch_size=4), atol=1e-4, rtol=0)  # batched matmuls round differently
    assert not torch.allclose(a, _sample(den, labels, seed=8, batch_size=6))
    # image 0 depends on its own noise and label only
    torch.testing.assert_close(a[:1], _sample(den, labels[:1], seed=7), atol=1e-4, rtol=0)


def test_ddim_step_is_the_consistent_clipped_update():
    """Each step is guided-diffusion's DDIM (η = 0), written out here from the noise schedule alone:
    x0 = clip((x − √(1−ᾱ_t) ε) / √ᾱ_t), ε' = (x − √ᾱ_t x0) / √(1−ᾱ_t), x ← √ᾱ_prev x0 + √(1−ᾱ_prev) ε'.
    The ε is large enough that x0 is clipped, where diffusers' default (the unclipped ε kept) differs."""
    eps_of = lambda x, t, y: 0.3 * x + 0.5  # noqa: E731 (a fixed, input-dependent 'denoiser')
    labels = torch.arange(3)
    steps = 5
    got = dif.sample(eps_of, labels, shape=SHAPE, num_classes=NUM_CLASSES, steps=steps, seed=3)

    cfg = dif.SCHEDULER
    betas = torch.linspace(cfg["beta_start"], cfg["beta_end"], cfg["num_train_timesteps"], dtype=torch.float64)
    abar = torch.cumprod(1.0 - betas, 0)
    ts = [round(cfg["num_train_timesteps"] - i * cfg["num_train_timesteps"] / steps) - 1 for i in range(steps)]  # trailing: 999, 799, …
    x = torch.randn((3, *SHAPE), generator=torch.Generator().manual_seed(3)).double()
    clipped = False
    for i, t in enumerate(ts):
        a = abar[t]
        a_prev = abar[ts[i + 1]] if i + 1 < steps else torch.tensor(1.0, dtype=torch.float64)  # set_alpha_to_one
        eps = eps_of(x, t, labels)
        raw = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x0 = raw.clamp(-1, 1)
        clipped |= not torch.equal(raw, x0)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    assert clipped
    torch.testing.assert_close(got, x.clamp(-1, 1).float(), atol=1e-4, rtol=1e-4)


def test_guidance_scale_one_is_no_guidance():
    den = DiTDenoiser(tiny_dit())
    labels = torch.arange(4)
    assert torch.equal(_sample(den, labels, guidance_scale=1.0), _sample(den, labels))
    assert not torch.allclose(_sample(den, labels, guidance_scale=4.0), _sample(den, labels))
    x, _ = toy_images(4)
    t = torch.tensor([999, 500, 20, 0])
    with torch.no_grad():
        torch.testing.assert_close(dif.guided(den, 1.0, NUM_CLASSES)(x, t, labels), den(x, t, labels), atol=1e-5, rtol=0)
        null = torch.full_like(labels, NUM_CLASSES)
        torch.testing.assert_close(dif.guided(den, 0.0, NUM_CLASSES)(x, t, labels), den(x, t, null), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kw", [dict(steps=0), dict(guidance_scale=-1.0), dict(guidance_scale=float("nan")), dict(batch_size=0), dict(steps=1001)])
def test_bad_sampling_options_are_one_line_errors(kw):
    with pytest.raises(WeitError):
        _sample(DiTDenoiser(tiny_dit()), torch.arange(2), **kw)


# ---------------------------------------------------------------------------------------------- pictures
def test_png_grid_same_samples_same_bytes(tmp_path):
    from PIL import Image

    den = DiTDenoiser(tiny_dit())
    paths = []
    for i in range(2):
        s = _sample(den, torch.arange(5) % NUM_CLASSES, seed=3)
        paths.append(tmp_path / f"g{i}.png")
        dif.save_grid(s, paths[-1])
    assert paths[0].read_bytes() == paths[1].read_bytes()
    with Image.open(paths[0]) as im:
        assert im.mode == "L" and im.size == (3 * 16 + 4 * 2, 2 * 16 + 3 * 2)  # ⌈√5⌉ = 3 per row, 2-px padding
    with pytest.raises(OutputError):
        dif.save_grid(s, paths[0])
    dif.save_grid(-s, paths[0], force=True)
    assert paths[0].read_bytes() != paths[1].read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g0.png", "g1.png"]  # no temp file left
    rgb = tmp_path / "rgb.png"
    dif.save_grid(torch.zeros(2, 3, 8, 8), rgb, nrow=1)
    with Image.open(rgb) as im:
        assert im.mode == "RGB" and im.size == (8 + 4, 2 * 8 + 6) and im.getpixel((5, 5)) == (128, 128, 128)


# ---------------------------------------------------------------------------------------------- scheduler
def test_scheduler_config_beside_a_model_folder(tmp_path):
    from diffusers import DDIMScheduler, DDPMScheduler, DiTTransformer2DModel

    model = tiny_dit()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    sch = dif.train_scheduler()
    _save_scheduler_config(sch, folder)
    sch.save_config(tmp_path / "ref")
    assert (folder / dif.SCHEDULER_FILE).read_bytes() == (tmp_path / "ref" / dif.SCHEDULER_FILE).read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json"]
    # diffusers reads both files from the one folder
    ddim = DDIMScheduler.from_pretrained(folder)
    assert torch.equal(ddim.alphas_cumprod, sch.alphas_cumprod) and ddim.config.timestep_spacing == "trailing"
    assert DDPMScheduler.from_pretrained(folder).config.num_train_timesteps == 1000
    loaded = DiTTransformer2DModel.from_pretrained(folder, low_cpu_mem_usage=False).eval()
    x, y = toy_images(2)
    t = torch.tensor([3, 300])
    assert torch.equal(loaded(x, timestep=t, class_labels=y).sample, model(x, timestep=t, class_labels=y).sample)
    # and weit samples from what is on disk
    conf = dif.load_scheduler_config(folder)
    assert conf["beta_schedule"] == "linear"
    assert torch.equal(_sample(DiTDenoiser(loaded), y, scheduler_config=conf), _sample(DiTDenoiser(model), y))


def test_missing_or_foreign_scheduler_config_is_an_input_error(tmp_path):
    from weit_cli.errors import InputError

    with pytest.raises(InputError, match="no scheduler_config.json"):
        dif.load_scheduler_config(tmp_path)
    (tmp_path / dif.SCHEDULER_FILE).write_text("[1, 2]")
    with pytest.raises(InputError, match="not a JSON object"):
        dif.load_scheduler_config(tmp_path)
    (tmp_path / dif.SCHEDULER_FILE).write_text(json.dumps({"prediction_type": "v_prediction"}))
    with pytest.raises(InputError, match="v_prediction"):
        dif.load_scheduler_config(tmp_path)
