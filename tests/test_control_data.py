"""Offline-RL data for the control task: the built-in source, users' files, validation, references."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gymnasium")
pytest.importorskip("h5py")

from weit_cli.data import builtin as B  # noqa: E402
from weit_cli.data import control as C  # noqa: E402
from weit_cli.errors import InputError, WeitError  # noqa: E402


TINY = C.Budget(ppo_steps=0, steps_per_quality=300)  # random quality only: a few hundred env steps


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("WEIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> C.OfflineData:
    """Hopper-v5's built-in random data, 300 steps, generated into a private cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WEIT_CACHE", str(tmp_path_factory.mktemp("cache")))
        return C.load_control_data("Hopper-v5:random", seed=0, budget=TINY)


def save_npz(path: Path, arrays: dict) -> Path:
    np.savez(path, **arrays)
    return path


def check_one_line(err: WeitError, *words: str) -> None:
    text = str(err)
    assert "\n" not in text and err.hint, text
    for w in words:
        assert w in text, (w, text)


# -------------------------------------------------------------------------------- environments
def test_environment_table_matches_gymnasium():
    for env_id, e in C.ENVIRONMENTS.items():
        env = C.make_env(env_id)
        try:
            assert env.observation_space.shape == (e.obs_dim,)
            assert env.action_space.shape == (e.act_dim,)
            assert np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)
            assert env.spec.max_episode_steps == e.max_episode_steps
            assert env.render_mode is None
        finally:
            env.close()


def test_reference_returns_are_d4rl_v2():
    refs = {k: (e.r_random, e.r_expert) for k, e in C.ENVIRONMENTS.items()}
    assert refs["HalfCheetah-v5"] == (-280.178953, 12135.0)
    assert refs["Hopper-v5"] == (-20.272305, 3234.3)
    assert "D4RL" in C.ENVIRONMENTS["Hopper-v5"].reference and "v5" in C.ENVIRONMENTS["Hopper-v5"].reference


def test_normalized_score_formula():
    e = C.env_info("Hopper-v5")
    assert C.normalized_score("Hopper-v5", e.r_random) == 0.0
    assert C.normalized_score("Hopper-v5", e.r_expert) == pytest.approx(100.0)
    assert C.normalized_score("Hopper-v5", (e.r_random + e.r_expert) / 2) == pytest.approx(50.0)
    assert C.normalized_score("HalfCheetah-v5", 1000.0) == pytest.approx(100 * (1000 + 280.178953) / (12135.0 + 280.178953))


def test_unknown_environment_is_one_line():
    with pytest.raises(WeitError) as e:
        C.env_info("Hoper-v5")
    check_one_line(e.value, "Hoper-v5", "Hopper-v5")
    with pytest.raises(WeitError) as e:
        C.load_control_data("CartPole-v1")
    check_one_line(e.value, "CartPole-v1")


# ------------------------------------------------------------------------------------ built-in
def test_builtin_layout_and_dtypes(tiny):
    a = tiny.arrays()
    assert set(a) == {"observations", "actions", "rewards", "terminals", "timeouts"}
    assert a["observations"].shape == (300, 11) and a["observations"].dtype == np.float32
    assert a["actions"].shape == (300, 3) and a["actions"].dtype == np.float32
    assert a["rewards"].shape == (300,) and a["rewards"].dtype == np.float32
    assert a["terminals"].dtype == bool and a["timeouts"].dtype == bool
    assert np.abs(a["actions"]).max() <= 1.0
    assert a["terminals"].any(), "random hopping falls within 300 steps"
    assert a["terminals"][-1] or a["timeouts"][-1], "the cut at the end of the recording is a timeout"
    assert tiny.env_id == "Hopper-v5" and "random" in tiny.description
    assert tiny.info["qualities"]["random"]["steps"] == 300


def test_same_seed_same_bytes_and_cache_reuse(tmp_path, monkeypatch):
    folders = []
    for run in ("a", "b"):
        monkeypatch.setenv("WEIT_CACHE", str(tmp_path / run))
        folders.append(C.generate("Hopper-v5", seed=3, budget=TINY))
    assert folders[0].name == folders[1].name  # the key: environment, seed, budget, data version
    assert digests(folders[0]) == digests(folders[1])
    assert set(digests(folders[0])) == {"info.json", "random.safetensors"}
    # a second call reuses the cache instead of regenerating
    monkeypatch.setattr(B, "_generate_into", lambda *a: pytest.fail("regenerated a cached dataset"))
    assert C.generate("Hopper-v5", seed=3, budget=TINY) == folders[1]
    # another seed is another key and other data
    monkeypatch.undo()
    monkeypatch.setenv("WEIT_CACHE", str(tmp_path / "a"))
    other = C.generate("Hopper-v5", seed=4, budget=TINY)
    assert other != folders[0]
    assert digests(other)["random.safetensors"] != digests(folders[0])["random.safetensors"]


def test_failed_generation_writes_nothing(cache, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(B, "record", boom)
    with pytest.raises(RuntimeError):
        C.generate("Hopper-v5", seed=0, budget=TINY)
    assert list((cache / "control").iterdir()) == []
    with pytest.raises(WeitError):
        C.generate("Hopper-v5", seed=0, budget=C.Budget(steps_per_quality=0))


def test_missing_quality_is_one_line(cache):
    with pytest.raises(WeitError) as e:
        C.load_control_data("Hopper-v5:expert", budget=TINY)
    check_one_line(e.value, "expert")
    with pytest.raises(WeitError) as e:
        C.load_control_data("Hopper-v5:best", budget=TINY)
    check_one_line(e.value, "best")


@pytest.mark.slow
def test_ppo_generation_reproducible(tmp_path, monkeypatch):
    """A tiny PPO run: every quality, policies as safetensors that rebuild, same bytes twice."""
    budget = C.Budget(ppo_steps=1024, checkpoints=2, steps_per_quality=200, eval_episodes=1)
    folders = []
    for run in ("a", "b"):
        monkeypatch.setenv("WEIT_CACHE", str(tmp_path / run))
        folders.append(C.generate("Hopper-v5", seed=0, budget=budget))
    assert digests(folders[0]) == digests(folders[1])
    info = json.loads((folders[0] / "info.json").read_text())
    assert set(info["qualities"]) == set(C.QUALITIES)
    assert info["qualities"]["replay"]["steps"] == 1024
    assert not list(folders[0].glob("*.zip"))
    for ckpt in info["checkpoints"]:
        policy = C.load_policy(folders[0] / ckpt["file"], "Hopper-v5")
        assert policy.action_net.out_features == 3
    data = C.read_builtin(folders[0])
    assert len(data) == 3 * 200 + 1024


# ----------------------------------------------------------------------------------- users' files
def test_npz_and_hdf5_round_trip(tiny, tmp_path):
    import h5py

    a = tiny.arrays()
    npz = C.load_control_data(save_npz(tmp_path / "d.npz", a), env_id="Hopper-v5")
    with h5py.File(tmp_path / "d.hdf5", "w") as f:
        for k, v in a.items():
            f.create_dataset(k, data=v)
    h5 = C.load_control_data(tmp_path / "d.hdf5", env_id="Hopper-v5")
    for k in C.KEYS:
        np.testing.assert_array_equal(npz.arrays()[k], a[k])
        np.testing.assert_array_equal(h5.arrays()[k], a[k])
    # float64 observations, (N, 1) rewards and 0/1 flags are converted, timeouts may be absent
    loose = {**a, "observations": a["observations"].astype(np.float64), "rewards": a["rewards"][:, None], "terminals": a["terminals"].astype(np.int8)}
    del loose["timeouts"]
    d = C.load_control_data(save_npz(tmp_path / "loose.npz", loose), env_id="Hopper-v5")
    assert d.observations.dtype == np.float32 and d.rewards.shape == (300,) and d.terminals.dtype == bool
    assert not d.timeouts.any()


def write_minari(folder: Path, data: C.OfflineData, env_id: str = "Hopper-v5") -> Path:
    """A dataset in Minari's on-disk layout (hdf5 storage): data/metadata.json + data/main_data.hdf5
    with one episode_<i> group per episode, observations holding one more row than the steps."""
    import h5py

    (folder / "data").mkdir(parents=True)
    meta = {"data_format": "hdf5", "total_episodes": 0, "env_spec": json.dumps({"id": env_id, "max_episode_steps": 1000})}
    ends = np.flatnonzero(data.terminals | data.timeouts) + 1
    starts = np.concatenate([[0], ends[:-1]])
    with h5py.File(folder / "data" / "main_data.hdf5", "w") as f:
        for i, (s, e) in enumerate(zip(starts, ends)):
            g = f.create_group(f"episode_{i}")
            g.attrs["id"], g.attrs["total_steps"] = i, e - s
            g.create_dataset("observations", data=np.concatenate([data.observations[s:e], data.observations[e - 1 : e] + 1]))
            g.create_dataset("actions", data=data.actions[s:e])
            g.create_dataset("rewards", data=data.rewards[s:e].astype(np.float64))
            g.create_dataset("terminations", data=data.terminals[s:e])
            g.create_dataset("truncations", data=data.timeouts[s:e])
    meta["total_episodes"] = len(ends)
    (folder / "data" / "metadata.json").write_text(json.dumps(meta))
    return folder


def test_minari_dataset_on_disk(tiny, tmp_path):
    folder = write_minari(tmp_path / "hopper-random-v0", tiny)
    for source in (folder, folder / "data" / "main_data.hdf5"):
        d = C.load_control_data(source)  # the environment comes from Minari's metadata
        assert d.env_id == "Hopper-v5" and "Minari" in d.description
        for k in C.KEYS:
            np.testing.assert_array_equal(d.arrays()[k], tiny.arrays()[k])
    with pytest.raises(InputError) as e:
        C.load_control_data(folder, env_id="HalfCheetah-v5")
    check_one_line(e.value, "Hopper-v5", "HalfCheetah-v5")


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda a: a.pop("rewards"), ["'rewards'"]),
        (lambda a: (a.pop("actions"), a.pop("terminals")), ["'actions'", "'terminals'"]),
        (lambda a: a.update(actions=a["actions"][:-1]), ["different lengths", "actions 299"]),
        (lambda a: a["rewards"].__setitem__(7, np.nan), ["rewards", "NaN", "step 7"]),
        (lambda a: a["observations"].__setitem__((5, 2), np.inf), ["observations", "Inf", "step 5"]),
        (lambda a: a.update(observations=a["observations"][:, :10]), ["observations", "(300, 10)", "(N, 11)"]),
        (lambda a: a.update(actions=np.zeros((300, 6), np.float32)), ["actions", "(N, 3)"]),
        (lambda a: a.update(terminals=np.full(300, 2)), ["terminals", "0/1"]),
        (lambda a: a.update(rewards=np.array(["x"] * 300)), ["rewards", "not numeric"]),
    ],
)
def test_bad_dataset_is_one_line_error(tiny, tmp_path, change, words):
    a = {k: v.copy() for k, v in tiny.arrays().items()}
    change(a)
    path = save_npz(tmp_path / "bad.npz", a)
    with pytest.raises(InputError) as e:
        C.load_control_data(path, env_id="Hopper-v5")
    check_one_line(e.value, str(path), *words)


def test_bad_files_are_one_line_errors(tiny, tmp_path):
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, **{**tiny.arrays(), "rewards": np.array([object()] * 300, dtype=object)})
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"not a zip")
    txt = tmp_path / "d.csv"
    txt.write_text("1,2\n")
    empty = save_npz(tmp_path / "empty.npz", {k: v[:0] for k, v in tiny.arrays().items()})
    cases = [
        (pickled, InputError, ["pickle"]),
        (corrupt, InputError, ["could not be read"]),
        (txt, InputError, [".npz"]),
        (empty, InputError, ["no steps"]),
        (tmp_path / "missing.npz", InputError, ["does not exist"]),
        (tmp_path, InputError, ["main_data.hdf5"]),
    ]
    for path, kind, words in cases:
        with pytest.raises(kind) as e:
            C.load_control_data(path, env_id="Hopper-v5")
        check_one_line(e.value, *words)
    with pytest.raises(WeitError) as e:  # a plain file does not say its environment
        C.load_control_data(save_npz(tmp_path / "ok.npz", tiny.arrays()))
    check_one_line(e.value, "environment")
    with pytest.raises(WeitError) as e:
        C.load_control_data(tmp_path / "ok.npz", env_id="Hopper-v9")
    check_one_line(e.value, "Hopper-v9")
