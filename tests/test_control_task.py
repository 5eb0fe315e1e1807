"""The control task's pure functions: episodes, returns-to-go, context windows, loss, rollouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")
transformers = pytest.importorskip("transformers")

from conftest import predict_actions  # noqa: E402

from weit_cli.arch._registry import get_adapter  # noqa: E402
from weit_cli.data import control as C  # noqa: E402
from weit_cli.errors import WeitError  # noqa: E402
from weit_cli.tasks import control as T  # noqa: E402


def synthetic(lengths: list[int], last_flag: bool = True) -> C.OfflineData:
    """Hopper-shaped data whose values say where they come from: observation[i] = i, reward 1."""
    n = sum(lengths)
    ends = np.cumsum(lengths) - 1
    terminals = np.zeros(n, bool)
    terminals[ends[:-1]] = True
    timeouts = np.zeros(n, bool)
    timeouts[ends[-1]] = last_flag
    arrays = {
        "observations": np.repeat(np.arange(n, dtype=np.float32)[:, None], 11, axis=1),
        "actions": np.repeat(np.arange(n, dtype=np.float32)[:, None], 3, axis=1) / n,
        "rewards": np.ones(n, np.float32),
        "terminals": terminals,
        "timeouts": timeouts,
    }
    return C.validate(arrays, "Hopper-v5", "synthetic")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> C.OfflineData:
    """Hopper-v5's built-in random data, 300 steps, generated into a private cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WEIT_CACHE", str(tmp_path_factory.mktemp("cache")))
        return C.load_control_data("Hopper-v5:random", seed=0, budget=C.Budget(ppo_steps=0, steps_per_quality=300))


def tiny_dt(seed: int = 0, context: int = 5):
    from transformers import DecisionTransformerConfig, DecisionTransformerModel

    torch.manual_seed(seed)
    cfg = DecisionTransformerConfig(state_dim=11, act_dim=3, hidden_size=32, n_layer=1, n_head=1, n_inner=64, max_ep_len=1000, n_positions=3 * context)
    return DecisionTransformerModel(cfg).eval()


# ------------------------------------------------------------------------------------- episodes
def test_episode_bounds_returns_and_timesteps():
    d = synthetic([3, 4, 2], last_flag=False)  # the end of the data closes the last episode
    bounds = T.episode_bounds(d.terminals, d.timeouts)
    assert bounds.tolist() == [[0, 3], [3, 7], [7, 9]]
    rewards = np.array([1, 2, 3, 1, 1, 1, 1, 5, 5], np.float32)
    assert T.returns_to_go(rewards, bounds).tolist() == [6, 5, 3, 4, 3, 2, 1, 10, 5]
    assert T.episode_timesteps(bounds, 9).tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1]
    assert T.episode_bounds(np.zeros(0, bool), np.zeros(0, bool)).shape == (0, 2)


def test_state_stats(tiny):
    mean, std = T.state_stats(tiny.observations)
    assert mean.dtype == std.dtype == np.float32 and mean.shape == (11,)
    np.testing.assert_allclose(mean, tiny.observations.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std, tiny.observations.std(0) + 1e-6, rtol=1e-4)
    _, const = T.state_stats(np.ones((5, 2), np.float32))
    assert (const > 0).all(), "a constant feature must not divide by zero"


# -------------------------------------------------------------------------------------- windows
def test_windows_shapes_padding_and_masks():
    lengths = [3, 10, 6]
    d = synthetic(lengths)
    cs = T.prepare(d, rtg_scale=10.0)
    K, B = 5, 400
    w = T.sample_windows(cs, B, K, torch.Generator().manual_seed(0))
    assert w.states.shape == (B, K, 11) and w.actions.shape == (B, K, 3)
    assert w.returns_to_go.shape == (B, K, 1) and w.timesteps.shape == (B, K) and w.attention_mask.shape == (B, K)
    assert w.timesteps.dtype == torch.int64
    bounds = T.episode_bounds(d.terminals, d.timeouts)
    raw = cs.states * torch.from_numpy(cs.state_std) + torch.from_numpy(cs.state_mean)
    starts = []
    for b in range(B):
        m = w.attention_mask[b]
        real = int(m.sum())
        assert real >= 1 and m.tolist() == [0.0] * (K - real) + [1.0] * real  # left padding
        pad = K - real
        assert (w.states[b, :pad] == 0).all() and (w.actions[b, :pad] == T.ACTION_PAD).all()
        assert (w.returns_to_go[b, :pad] == 0).all() and (w.timesteps[b, :pad] == 0).all()
        # the real part is one contiguous slice of one episode, cut only by the episode's end
        idx = (raw[:, 0][None] - (w.states[b, pad:, 0] * cs.state_std[0] + cs.state_mean[0])[:, None]).abs().argmin(1)
        assert (idx.diff() == 1).all()
        first = int(idx[0])
        ep = int(np.searchsorted(bounds[:, 1], first, side="right"))
        s, e = bounds[ep]
        assert int(idx[-1]) < e and (real == K or int(idx[-1]) == e - 1)
        assert w.timesteps[b, pad:].tolist() == list(range(first - s, first - s + real))
        # returns-to-go: rewards are 1, so R_t = steps left in the episode, divided by the scale
        torch.testing.assert_close(w.returns_to_go[b, pad:, 0], (e - idx).float() / 10.0)
        torch.testing.assert_close(w.actions[b, pad:], cs.actions[idx])
        starts.append(ep)
    # episodes are drawn in proportion to their length
    share = np.bincount(starts, minlength=3) / B
    np.testing.assert_allclose(share, np.array(lengths) / sum(lengths), atol=0.08)


def test_windows_are_seeded(tiny):
    cs = T.prepare(tiny)
    a = T.sample_windows(cs, 8, 20, torch.Generator().manual_seed(5))
    b = T.sample_windows(cs, 8, 20, torch.Generator().manual_seed(5))
    c = T.sample_windows(cs, 8, 20, torch.Generator().manual_seed(6))
    for x, y in zip(vars(a).values(), vars(b).values()):
        assert torch.equal(x, y)
    assert not torch.equal(a.states, c.states)
    assert cs.returns_to_go.abs().max() < 1, "random Hopper returns are far below the 1000 scale"
    with pytest.raises(WeitError):
        T.sample_windows(cs, 0, 20, torch.Generator())


def test_action_loss_ignores_masked_positions():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 6, 3, generator=g), torch.randn(4, 6, 3, generator=g)
    mask = torch.ones(4, 6)
    mask[:, :2] = 0
    loss = T.action_loss(pred, target, mask)
    torch.testing.assert_close(loss, ((pred - target)[:, 2:] ** 2).mean())
    moved = pred.clone()
    moved[:, :2] += 100
    torch.testing.assert_close(T.action_loss(moved, target, mask), loss)


def test_dt_trains_on_windows(tiny):
    """A few steps of the DT objective lower the loss on a fixed batch (the pieces fit together)."""
    cs = T.prepare(tiny)
    model = tiny_dt(context=10).train()
    w = T.sample_windows(cs, 16, 10, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = T.action_loss(predict_actions(model, w), w.actions, w.attention_mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


# ------------------------------------------------------------------------------------- rollouts
def test_dt_policy_pads_like_a_full_window(tiny):
    """Left padding to the context gives the same action as the model on the masked window."""
    cs = T.prepare(tiny)
    model = tiny_dt(context=5)
    policy = dt_policy(model, cs, context=5)
    g = torch.Generator().manual_seed(1)
    states, actions = torch.randn(1, 3, 11, generator=g), torch.randn(1, 3, 3, generator=g)
    rtg, steps, mask = torch.full((1, 3, 1), 300.0), torch.arange(3)[None], torch.ones(1, 3)
    got = policy(states, actions, rtg, steps, mask)
    mean, std = torch.from_numpy(cs.state_mean), torch.from_numpy(cs.state_std)
    w = T.Windows(
        torch.cat([torch.zeros(1, 2, 11), (states - mean) / std], 1),
        torch.cat([torch.zeros(1, 2, 3), actions], 1),
        torch.cat([torch.zeros(1, 2, 1), rtg / T.RTG_SCALE], 1),
        torch.cat([torch.zeros(1, 2, dtype=torch.long), steps], 1),
        torch.tensor([[0, 0, 1, 1, 1.0]]),
    )
    torch.testing.assert_close(got, predict_actions(model, w)[0, -1])
    # a longer history keeps only the last `context` steps
    long = policy(torch.randn(1, 9, 11, generator=g), torch.randn(1, 9, 3, generator=g), torch.ones(1, 9, 1), torch.arange(9)[None], torch.ones(1, 9))
    assert long.shape == (3,)


def dt_policy(model, data, *, context: int) -> T.ContextPolicy:
    """transformers' DecisionTransformerModel as a rollout policy with the statistics of `data` (a
    prepared ControlSet), sizes read from `model.config`: refused if it does not fit the environment."""
    cfg = model.config
    T.check_fits(cfg.state_dim, cfg.act_dim, data.env_id)
    config = {
        "state_dim": int(cfg.state_dim), "act_dim": int(cfg.act_dim),
        "state_mean": [float(x) for x in data.state_mean], "state_std": [float(x) for x in data.state_std],
        "context": int(context), "rtg_scale": float(data.rtg_scale), "max_ep_len": int(cfg.max_ep_len),
    }
    forward = get_adapter("decision-transformer").task_forward(model)  # the family's call convention
    return T.ContextPolicy(forward, config, device=next(model.parameters()).device)


def test_model_that_does_not_fit_the_environment(tiny):
    from transformers import DecisionTransformerConfig, DecisionTransformerModel

    cheetah = DecisionTransformerModel(DecisionTransformerConfig(state_dim=17, act_dim=6, hidden_size=32, n_layer=1, n_head=1))
    with pytest.raises(WeitError) as e:
        dt_policy(cheetah, T.prepare(tiny), context=5)
    assert "\n" not in str(e.value) and "17 state features and 6 actions; Hopper-v5 has 11 and 3" in str(e.value)
    with pytest.raises(WeitError):
        T.check_fits(11, 3, "Hopper-v4")


def test_dt_rollout_is_reproducible(tiny):
    cs = T.prepare(tiny)
    policy = dt_policy(tiny_dt(context=5), cs, context=5)
    runs = [T.rollout("Hopper-v5", policy, target_return=3600.0, episodes=2, seed=7, max_steps=50) for _ in range(2)]
    a, b = runs
    assert a.returns == b.returns and a.lengths == b.lengths
    assert len(a.returns) == 2 and all(1 <= n <= 50 for n in a.lengths)
    assert a.returns[0] != a.returns[1], "episodes reset with different seeds"
    assert a.scores == [pytest.approx(C.normalized_score("Hopper-v5", r)) for r in a.returns]
    s = a.summary()
    assert s["mean_return"] == pytest.approx(np.mean(a.returns)) and s["std_return"] == pytest.approx(np.std(a.returns, ddof=1))
    assert s["mean_score"] == pytest.approx(np.mean(a.scores)) and a.wall_s > 0


def test_rollout_feeds_the_policy_history():
    """The policy sees raw states, a zero action in the last row, returns-to-go that fall by each
    reward, and timesteps 0..t."""
    seen = []

    def policy(states, actions, rtg, steps, mask):
        seen.append((states.clone(), actions.clone(), rtg.clone(), steps.clone(), mask.clone()))
        return torch.full((3,), 0.1)

    r = T.rollout("Hopper-v5", policy, target_return=100.0, episodes=1, seed=0, max_steps=4)
    assert r.lengths == [4] and len(seen) == 4
    states, actions, rtg, steps, mask = seen[-1]
    assert states.shape == (1, 4, 11) and steps.tolist() == [[0, 1, 2, 3]] and mask.sum() == 4
    assert (actions[0, :3] == 0.1).all() and (actions[0, 3] == 0).all()
    assert rtg[0, 0, 0] == 100.0 and (rtg[0, :, 0].diff() < 0).all()  # Hopper's healthy reward is +1 a step
    assert seen[1][2][0, -1, 0] == rtg[0, 1, 0], "history rows never change afterwards"
    with pytest.raises(WeitError):
        T.rollout("Hopper-v5", policy, target_return=1.0, episodes=0, seed=0)
