"""The control task through the Task seam: fixed windows, the staged loop, the exported folder's
control config, and rollout evaluation of a folder (tiny models, 300 cached random Hopper steps)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")
pytest.importorskip("transformers")

from conftest import predict_actions  # noqa: E402

from weit_cli.arch._registry import get_adapter  # noqa: E402
from weit_cli.data import control as C  # noqa: E402
from weit_cli.errors import InputError, OutputError, WeitError  # noqa: E402
from weit_cli.tasks import control as T  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAMILY = "decision-transformer"
TINY_BUDGET = C.Budget(ppo_steps=0, steps_per_quality=300)
K = 5


def one_line(err: WeitError, *words: str) -> None:
    text = str(err)
    assert "\n" not in text and err.hint and "\n" not in err.hint, text
    for w in words:
        assert w in text, (w, text)


def section(**changes):
    fields = dict(family=FAMILY, state_dim=11, act_dim=3, context=K, head_dim=16)
    return get_adapter(FAMILY).model_section(**{**fields, **changes})


def task(**changes) -> T.Control:
    return T.Control(**{"budget": TINY_BUDGET, "max_windows": 64, **changes})


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """A private cache for the module: the tiny built-in data is generated once (about a second)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WEIT_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def splits() -> T.ControlSplits:
    return task().load_data("Hopper-v5:random", section(), seed=0, val_fraction=0.2)


def tiny_model(seed: int = 0, **changes):
    adapter = get_adapter(FAMILY)
    torch.manual_seed(seed)
    return adapter.build(adapter.arch_for_recipe(section(**changes), depth=1, width=32))


@pytest.fixture(scope="module")
def exported(splits, tmp_path_factory) -> Path:
    """A tiny DT written by weit's own exporter (full-rank bundle → folder) with its control config."""
    from weit_cli.core.extract import from_dense
    from weit_cli.io.export import write_model

    adapter = get_adapter(FAMILY)
    arch = adapter.arch_for_recipe(section(), depth=1, width=32)
    torch.manual_seed(3)
    state = {k: v.detach() for k, v in adapter.build(arch).state_dict().items()}
    bundle, _ = from_dense(adapter, arch, state, 16, 256)
    out = tmp_path_factory.mktemp("export") / "dt"
    write_model(bundle, out, torch.float32, {"command": "test"}, force=False)
    T.save_control_config(out, splits.config)
    return out


# ------------------------------------------------------------------------------------------ data
def test_splits_hold_fixed_windows_of_disjoint_episodes(splits):
    assert T.Control.name == "control" and T.Control.metric_name == "action_mse" and not T.Control.higher_is_better
    states, actions, rtg, steps, mask = splits.train.tensors
    assert states.shape == (64, K, 11) and actions.shape == (64, K, 3) and rtg.shape == (64, K, 1)
    assert steps.dtype == torch.int64 and mask.shape == (64, K) and (mask.sum(1) >= 1).all()
    assert len(splits.val) > 0 and splits.test is None
    assert "training episodes" in splits.description and "validation episodes" in splits.description
    # the same seed gives the same windows; another seed other windows
    again = task().load_data("Hopper-v5:random", section(), seed=0, val_fraction=0.2)
    other = task().load_data("Hopper-v5:random", section(), seed=1, val_fraction=0.2)
    for a, b in zip(splits.train.tensors + splits.val.tensors, again.train.tensors + again.val.tensors):
        assert torch.equal(a, b)
    assert not torch.equal(splits.train.tensors[0], other.train.tensors[0])
    # episodes are split, not steps: the two sets partition the episodes
    train, val = T.split_episodes(12, val_fraction=0.25, train_subset=None, seed=4)
    assert sorted(train.tolist() + val.tolist()) == list(range(12)) and len(val) == 3
    assert len(T.split_episodes(12, val_fraction=0.25, train_subset=0.5, seed=4)[0]) == 5
    assert len(T.split_episodes(12, val_fraction=0.25, train_subset=2, seed=4)[0]) == 2


def test_state_statistics_are_the_training_episodes(splits):
    data = C.load_control_data("Hopper-v5:random", budget=TINY_BUDGET)
    bounds = T.episode_bounds(data.terminals, data.timeouts)
    train, _ = T.split_episodes(len(bounds), val_fraction=0.2, train_subset=None, seed=0)
    rows = np.concatenate([np.arange(s, e) for s, e in bounds[train]])
    mean, std = T.state_stats(data.observations[rows])
    assert splits.state_mean.tolist() == mean.tolist() and splits.state_std.tolist() == std.tolist()
    best = max(float(data.rewards[s:e].astype(np.float64).sum()) for s, e in bounds[train])
    assert splits.config["target_return"] == pytest.approx(best, rel=1e-5)
    assert splits.config["context"] == K and splits.config["env_id"] == "Hopper-v5"


def test_selected_episodes_keep_their_ends():
    obs = np.zeros((7, 11), np.float32)
    data = C.OfflineData(obs, np.zeros((7, 3), np.float32), np.ones(7, np.float32),
                         np.array([0, 0, 1, 0, 0, 0, 0], bool), np.zeros(7, bool), "Hopper-v5")
    bounds = T.episode_bounds(data.terminals, data.timeouts)  # [0, 3), [3, 7): the last unflagged
    picked = T.select_episodes(data, bounds, np.array([1, 0]))
    assert T.episode_bounds(picked.terminals, picked.timeouts).tolist() == [[0, 4], [4, 7]]


def test_file_sources_name_their_environment(tmp_path):
    data = C.load_control_data("Hopper-v5:random", budget=TINY_BUDGET)
    path = tmp_path / "hopper.npz"
    np.savez(path, **data.arrays())
    a = task().load_data(f"Hopper-v5:{path}", section(), seed=0)
    b = task(env_id="Hopper-v5").load_data(str(path), section(), seed=0)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    with pytest.raises(WeitError) as e:
        task().load_data(str(path), section(), seed=0)
    one_line(e.value, "does not say which environment")
    assert f"--data HalfCheetah-v5:{path}" in e.value.hint, "the hint shows the syntax, not only the names"


# ------------------------------------------------------------------------------------------ the model
def test_outputs_reduce_what_the_model_returns(splits):
    model = tiny_model().eval()
    batch = tuple(t[:4] for t in splits.train.tensors)
    c = task()
    torch.set_grad_enabled(False)
    try:
        _check_outputs(c, model, batch)
    finally:
        torch.set_grad_enabled(True)


def _check_outputs(c, model, batch):
    call = get_adapter(FAMILY).task_forward  # the family's call convention, not the task's
    got = c.outputs(call(model), batch)  # a ModelOutput
    assert got.shape == (4, K, 3) and got.dtype == torch.float32
    torch.testing.assert_close(got, predict_actions(model, T.Windows(*batch)))
    torch.testing.assert_close(c.outputs(call(lambda *x: model(*x).action_preds), batch), got)  # a tensor
    torch.testing.assert_close(c.outputs(call(lambda *x: {"action_preds": model(*x).action_preds}), batch), got)
    with pytest.raises(WeitError) as e:
        c.outputs(call(lambda *x: model(*x, return_dict=False)), batch)
    one_line(e.value, "tuple", "action_preds")
    # distillation: zero against itself, blind to padded positions
    mask = batch[4]
    assert float(c.distill_loss(got, got, batch, 1.0)) == 0.0
    moved = got + 100.0 * (mask == 0)[..., None]
    torch.testing.assert_close(c.distill_loss(moved, got + 0.1, batch, 2.0), torch.tensor(0.01))


def test_a_tiny_dt_trains_through_the_loop(splits):
    from weit_cli.training.batches import Batches
    from weit_cli.training.loop import Loop, Plan

    c = task()
    model = tiny_model(seed=1)
    fwd = get_adapter(FAMILY).task_forward(model)
    before = c.evaluate(fwd, splits.train)
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(params.values(), lr=3e-3, weight_decay=0.0)
    model.train()
    loop = Loop(Plan(total_steps=40, lr=lambda s: 3e-3, grad_clip=1.0), optimizer=opt, params=params,
                batches=Batches(splits.train, 16, seed=0), device=torch.device("cpu"),
                loss_step=lambda b: c.train_loss(fwd, b))
    loop.run()
    assert len(loop.losses) == 40 and all(math.isfinite(x) for x in loop.losses)
    assert np.mean(loop.losses[-5:]) < 0.8 * np.mean(loop.losses[:5])
    after = c.evaluate(fwd, splits.train)
    assert after.metric < 0.8 * before.metric and after.loss == after.metric and after.count == 64
    assert model.training, "evaluate gives a module back in the mode it found it in"
    val = c.evaluate(fwd, splits.val, batch_size=7)
    assert math.isfinite(val.metric) and val.count == len(splits.val)
    assert val.metric == pytest.approx(c.evaluate(fwd, splits.val, batch_size=1000).metric, rel=1e-6)


# ------------------------------------------------------------------------------------------ export
def test_state_normalisation_round_trips_through_the_exported_folder(splits, exported):
    from transformers import DecisionTransformerModel

    config = T.load_control_config(exported)
    assert config == json.loads(json.dumps(splits.config))
    assert np.array_equal(np.asarray(config["state_mean"], np.float32), splits.state_mean)
    assert np.array_equal(np.asarray(config["state_std"], np.float32), splits.state_std)
    # usable without weit: transformers loads the folder, the JSON holds the statistics
    plain = DecisionTransformerModel.from_pretrained(exported).eval()
    module, arch, cfg = T.load_control_model(exported)
    policy = T.ContextPolicy(module, cfg)
    g = torch.Generator().manual_seed(0)
    states = torch.randn(1, 3, 11, generator=g)
    actions, rtg, steps, ones = torch.zeros(1, 3, 3), torch.full((1, 3, 1), 500.0), torch.arange(3)[None], torch.ones(1, 3)
    got = policy(states, actions, rtg, steps, ones)
    mean, std = torch.tensor(config["state_mean"]), torch.tensor(config["state_std"])
    pad = K - 3
    w = T.Windows(
        torch.cat([torch.zeros(1, pad, 11), (states - mean) / std], 1), torch.zeros(1, K, 3),
        torch.cat([torch.zeros(1, pad, 1), rtg / config["rtg_scale"]], 1),
        torch.cat([torch.zeros(1, pad, dtype=torch.long), steps], 1), torch.tensor([[0.0] * pad + [1.0] * 3]),
    )
    torch.testing.assert_close(got, predict_actions(plain, w)[0, -1])


def test_control_config_problems_are_one_line(splits, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    with pytest.raises(InputError) as e:
        T.load_control_config(folder)
    one_line(e.value, "control_config.json")
    for change, says in (
        ({"state_mean": [float("nan")] * 11}, "state_mean"),
        ({"state_std": [1.0] * 10}, "state_std"),
        ({"state_std": [0.0] * 11}, "positive"),
        ({"context": 0}, "context"),
        ({"rtg_scale": -1.0}, "rtg_scale"),
        ({"env_id": "Hopper-v1"}, "unknown environment"),
    ):
        with pytest.raises(WeitError) as e:
            T.save_control_config(folder, {**splits.config, **change})
        one_line(e.value, says)
        assert not (folder / T.CONFIG_FILE).exists(), "nothing is written on failure"
    (folder / T.CONFIG_FILE).write_text("{not json")
    with pytest.raises(InputError) as e:
        T.load_control_config(folder)
    one_line(e.value, "not valid JSON")
    with pytest.raises(OutputError):
        T.save_control_config(tmp_path / "missing", splits.config)


# ------------------------------------------------------------------------------------------ rollouts
def test_rollouts_of_a_folder_are_seeded_and_reproducible(exported):
    a = T.evaluate_rollouts(exported, "Hopper-v5", target_return=3600.0, episodes=2, seed=3, max_steps=25)
    b = T.evaluate_rollouts(exported, "Hopper-v5", target_return=3600.0, episodes=2, seed=3, max_steps=25)
    c = T.evaluate_rollouts(exported, "Hopper-v5", episodes=1, seed=4, max_steps=25)  # the config's target
    assert a.returns == b.returns and a.lengths == b.lengths and len(a.returns) == 2
    d = T.evaluate_rollouts(exported, "Hopper-v5", target_return=3600.0, episodes=1, seed=4, max_steps=25)
    assert d.returns == a.returns[1:], "episode i resets with seed + i"
    assert c.target_return == pytest.approx(T.load_control_config(exported)["target_return"])
    assert a.scores == [pytest.approx(C.normalized_score("Hopper-v5", r)) for r in a.returns]
    assert a.wall_s > 0 and all(1 <= n <= 25 for n in a.lengths)
    assert a.std_score == pytest.approx(np.std(a.scores, ddof=1))


def test_rollout_refusals_are_one_line(exported, splits, tmp_path):
    for env, says in (("Hopper-v1", "unknown environment"), ("HalfCheetah-v5", "11 state features and 3 actions; HalfCheetah-v5 has 17 and 6")):
        with pytest.raises(WeitError) as e:
            T.evaluate_rollouts(exported, env, episodes=1, max_steps=2)
        one_line(e.value, says)
    with pytest.raises(WeitError) as e:
        T.evaluate_rollouts(exported, "Hopper-v5", target_return=float("nan"), episodes=1)
    one_line(e.value, "target return")
    bare = tmp_path / "bare"
    tiny_model().save_pretrained(bare)
    with pytest.raises(InputError) as e:
        T.evaluate_rollouts(bare, "Hopper-v5", episodes=1)
    one_line(e.value, "control_config.json")
    with pytest.raises(InputError) as e:
        T.evaluate_rollouts(tmp_path / "nowhere", "Hopper-v5", episodes=1)
    one_line(e.value, "not a model folder")


def test_data_refusals_are_one_line(tmp_path):
    cases = [
        (lambda: task().load_data("Hopper-v5:random", section(state_dim=17, act_dim=6), seed=0), "17 state features and 6 actions"),
        (lambda: task().load_data("Hopper-v9", section(), seed=0), "unknown control data source"),
        (lambda: task().load_data("Hopper-v5:random", section(), seed=0, val_fraction=0.99), "too few"),
        (lambda: task().load_data("Hopper-v5:random", section(), seed=0, train_subset=1000), "train_subset"),
        (lambda: T.Control(context=0), "context"),
    ]
    for call, says in cases:
        with pytest.raises(WeitError) as e:
            call()
        one_line(e.value, says)


# ------------------------------------------------------------------------------------------ recipes
@pytest.mark.parametrize("name", ["dt-hopper.yaml", "dt-halfcheetah.yaml"])
def test_recipes_fit_their_environment(name):
    from weit_cli.recipe import load_recipe

    r = load_recipe(ROOT / "recipes" / name)
    env = C.env_info(r.data.source.partition(":")[0])
    assert (r.model.state_dim, r.model.act_dim) == (env.obs_dim, env.act_dim)
    arch = r.adapter.arch_for_recipe(r.model, depth=r.largest()[0], width=r.largest()[1])
    assert r.adapter.param_count(arch) < 5_000_000
