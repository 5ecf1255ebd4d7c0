"""Atari collection and TrajectoryData: layout, determinism, windows, split, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import ale_py
import gymnasium
import numpy as np
import pytest
import torch
from PIL import Image

from storm_lib.atari import collect
from storm_lib.data import DataError, TrajectoryData

BOXING = "ALE/Boxing-v5"
gymnasium.register_envs(ale_py)


def test_collected_file_layout_and_meta(boxing_file: Path):
    with np.load(boxing_file, allow_pickle=False) as npz:
        assert set(npz.files) == {"obs", "action", "reward", "cont", "episode", "meta"}
        assert npz["meta"].dtype.kind == "U" and npz["meta"].ndim == 0
        dtypes = {k: npz[k].dtype for k in npz.files if k != "meta"}
    assert dtypes == {
        "obs": np.uint8,
        "action": np.int64,
        "reward": np.float32,
        "cont": np.float32,
        "episode": np.int32,
    }
    data = TrajectoryData.load(boxing_file)
    assert data.obs.shape == (400, 3, 64, 64) and len(data) == data.num_steps == 400
    assert data.obs.std() > 10  # real frames, not a blank screen
    assert np.array_equal(data.episode, np.repeat(np.arange(4), 100))  # truncated at 100
    assert data.num_episodes == 4 and list(data.episode_ids) == [0, 1, 2, 3]
    assert np.all(data.cont == 1.0)  # Boxing has no lives and lasts ~2 minutes
    assert data.action.min() >= 0 and data.action.max() < data.action_dim == 18
    assert len(np.unique(data.action)) == 18  # uniform random policy over the minimal set
    assert set(np.unique(data.reward)) <= {-2.0, -1.0, 0.0, 1.0, 2.0}
    meta = data.meta
    assert meta["env_id"] == data.env_id == BOXING and meta["seed"] == 0
    assert meta["steps"] == 400 and meta["policy"] == "uniform random"
    assert meta["action_meanings"][:2] == ["NOOP", "FIRE"] == data.action_meanings[:2]
    assert (meta["image_size"], meta["frameskip"], meta["sticky_prob"]) == (64, 4, 0.25)
    assert meta["max_episode_steps"] == 100 and meta["format"] == "storm_lib.data/1"
    assert set(meta["versions"]) == {"gymnasium", "ale_py", "numpy"}
    assert data.path == boxing_file and data.image_size == 64


def _reference(env_id: str, steps: int, seed: int, max_episode_steps: int) -> dict:
    """The same preprocessing through gymnasium's public step() and PIL, slowly."""
    env = gymnasium.make(env_id, frameskip=1, repeat_action_probability=0.25)
    frame, _ = env.reset(seed=seed)
    actions = np.random.default_rng(seed).integers(0, env.action_space.n, size=steps)
    out = {k: [] for k in ("obs", "reward", "cont", "episode")}
    episode, length, lives = 0, 0, env.unwrapped.ale.lives()
    for t in range(steps):
        out["obs"].append(np.asarray(Image.fromarray(frame).resize((64, 64), Image.BILINEAR)))
        reward, prev = 0.0, frame
        for k in range(4):
            frame, r, term, _, info = env.step(actions[t])
            reward += r
            prev = frame if k == 2 else prev
            if term:
                break
        lost = info["lives"] < lives
        lives, length = info["lives"], length + 1
        out["reward"].append(reward)
        out["cont"].append(0.0 if term or lost else 1.0)
        out["episode"].append(episode)
        if term or length == max_episode_steps:
            frame, _ = env.reset()
            episode, length, lives = episode + 1, 0, env.unwrapped.ale.lives()
        else:
            frame = np.maximum(prev, frame)
    env.close()
    out = {k: np.array(v) for k, v in out.items()}
    out["obs"] = out["obs"].transpose(0, 3, 1, 2)
    return dict(out, action=actions)


@pytest.mark.parametrize("env_id", [BOXING, "ALE/Breakout-v5"])
def test_collect_matches_gymnasium_reference(tmp_path, env_id):
    # 300 steps cross a resize chunk (256); Breakout exercises lives and game over.
    path = collect(env_id, 300, 3, tmp_path / "d.npz", max_episode_steps=70, progress=False)
    data = TrajectoryData.load(path)
    ref = _reference(env_id, 300, 3, 70)
    for key in ("action", "reward", "cont", "episode"):
        np.testing.assert_array_equal(getattr(data, key), ref[key], err_msg=key)
    diff = np.abs(data.obs.astype(int) - ref["obs"].astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01  # torch antialias vs PIL bilinear


def test_life_loss_sets_cont_but_episode_goes_on(tmp_path):
    path = collect("ALE/Breakout-v5", 300, 0, tmp_path / "b.npz", progress=False)
    data = TrajectoryData.load(path)
    lost = np.flatnonzero(data.cont[:-1] == 0.0)
    assert len(lost) >= 2
    # at least one life loss mid-episode: the next row belongs to the same episode
    assert np.any(data.episode[lost + 1] == data.episode[lost])


def test_same_seed_same_data_different_seed_differs(tmp_path):
    runs = [
        TrajectoryData.load(collect(BOXING, 150, s, tmp_path / f"{i}.npz", progress=False))
        for i, s in enumerate((5, 5, 6))
    ]
    for key in ("obs", "action", "reward", "cont", "episode"):
        np.testing.assert_array_equal(getattr(runs[0], key), getattr(runs[1], key))
    assert not np.array_equal(runs[0].action, runs[2].action)
    assert not np.array_equal(runs[0].obs, runs[2].obs)


def indexed(lengths=(5, 12, 3, 20, 8), action_dim: int = 7, size: int = 8) -> TrajectoryData:
    """Synthetic data whose frames encode their own row and episode."""
    n = sum(lengths)
    rows = np.arange(n)
    episode = np.repeat(np.arange(len(lengths)), lengths).astype(np.int32)
    obs = np.zeros((n, 3, size, size), np.uint8)
    obs[:, 0] = (rows % 256)[:, None, None]
    obs[:, 1] = (rows // 256)[:, None, None]
    obs[:, 2] = episode[:, None, None]
    return TrajectoryData.from_arrays(
        obs, rows % action_dim, rows.astype(np.float32), np.ones(n, np.float32), episode
    )


def rows_of(batch) -> np.ndarray:
    """[B, T] row indices decoded from the frames of an ``indexed`` batch."""
    pixels = (batch.obs[:, :, :, 0, 0] * 255).round().long().numpy()  # [B, T, 3]
    return pixels[..., 0] + 256 * pixels[..., 1]


def test_sampled_windows_stay_inside_episodes_and_cover_all_starts():
    data = indexed()
    batch = data.sample(2000, 5, torch.Generator().manual_seed(0))
    assert batch.obs.shape == (2000, 5, 3, 8, 8) and batch.obs.dtype == torch.float32
    assert batch.action.dtype == torch.int64 and batch.cont.dtype == torch.float32
    rows = rows_of(batch)
    assert np.all(np.diff(rows, axis=1) == 1)  # consecutive rows
    episodes = data.episode[rows]
    assert np.all(episodes == episodes[:, :1])  # never across a boundary
    np.testing.assert_array_equal(batch.reward.numpy(), rows)  # aligned with the frames
    np.testing.assert_array_equal(batch.action.numpy(), rows % 7)
    expected = {s for s in range(len(data) - 4) if data.episode[s] == data.episode[s + 4]}
    assert set(rows[:, 0]) == expected  # uniform over every valid start, none invalid
    assert 2 not in set(episodes[:, 0])  # the 3-step episode is too short for a window of 5


def test_sample_is_reproducible_from_the_generator():
    data = indexed()
    a = data.sample(16, 4, torch.Generator().manual_seed(3))
    b = data.sample(16, 4, torch.Generator().manual_seed(3))
    assert torch.equal(a.obs, b.obs) and torch.equal(a.action, b.action)


def test_split_by_whole_episodes():
    data = indexed(lengths=tuple(range(3, 13)))
    train, val = data.split(0.3, seed=1)
    assert (train.num_episodes, val.num_episodes) == (7, 3)
    assert not set(train.episode_ids) & set(val.episode_ids)
    assert set(train.episode_ids) | set(val.episode_ids) == set(data.episode_ids)
    assert len(train) + len(val) == len(data)
    lengths = dict(zip(data.episode_ids, data.episode_lengths, strict=True))
    for part in (train, val):  # whole episodes, rows intact
        for e, n in zip(part.episode_ids, part.episode_lengths, strict=True):
            assert lengths[e] == n
        assert np.all(part.reward == rows_of_obs(part))
    again = data.split(0.3, seed=1)
    assert list(again[1].episode_ids) == list(val.episode_ids)
    assert data.split(0.01, seed=1)[1].num_episodes == 1  # at least one each side
    assert data.split(0.99, seed=1)[0].num_episodes == 1
    others = {tuple(data.split(0.3, seed=s)[1].episode_ids) for s in range(5)}
    assert len(others) > 1  # the seed matters


def rows_of_obs(data: TrajectoryData) -> np.ndarray:
    pixels = data.obs[:, :2, 0, 0].astype(np.float32)
    return pixels[:, 0] + 256 * pixels[:, 1]


def test_split_needs_two_episodes():
    with pytest.raises(DataError, match="episode"):
        indexed(lengths=(10,)).split(0.5)


def test_eval_windows_fixed_and_independent_of_global_rng():
    data = indexed()
    torch.manual_seed(0)
    a = data.eval_windows(10, 4, seed=7)
    torch.manual_seed(123)
    torch.rand(5)
    b = data.eval_windows(10, 4, seed=7)
    assert torch.equal(a.obs, b.obs) and a.obs.device.type == "cpu"
    assert len(set(rows_of(a)[:, 0])) == 10  # distinct windows
    assert not torch.equal(a.obs, data.eval_windows(10, 4, seed=8).obs)
    everything = data.eval_windows(1000, 10, seed=0)  # only 3 + 11 = 14 valid starts
    assert len(everything) == 14 and len(set(rows_of(everything)[:, 0])) == 14


def test_save_load_round_trip(tmp_path):
    data = indexed()
    back = TrajectoryData.load(data.save(tmp_path / "x.npz"))
    np.testing.assert_array_equal(back.obs, data.obs)
    assert back.meta == data.meta and back.action_dim == 7 and back.env_id == "synthetic"


def _rewrite(src: Path, dst: Path, **changes) -> Path:
    with np.load(src, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays.update(changes)
    np.savez(dst, **{k: v for k, v in arrays.items() if v is not None})
    return dst


BAD_FILES = {
    "missing arrays": dict(cont=None),
    "dtype": dict(obs=np.zeros((400, 3, 64, 64), np.float32)),
    "must be uint8": dict(obs=np.zeros((400, 64, 64, 3), np.uint8)),
    "length": dict(reward=np.zeros(399, np.float32)),
    "JSON": dict(meta=np.array("{not json")),
    r"outside \[0, 18\)": dict(action=np.full(400, 18, np.int64)),
    "contiguous": dict(episode=np.tile(np.arange(4, dtype=np.int32), 100)),
    "corrupt": dict(meta=np.array([{"a": 1}], dtype=object)),  # pickled: refused
}


@pytest.mark.parametrize("message", list(BAD_FILES))
def test_bad_file_is_a_data_error_naming_it(boxing_file, tmp_path, message):
    path = tmp_path / "bad.npz"
    if message == "corrupt":
        with np.load(boxing_file, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        np.savez(path, **dict(arrays, **BAD_FILES[message]), allow_pickle=True)
    else:
        _rewrite(boxing_file, path, **BAD_FILES[message])
    with pytest.raises(DataError, match=message) as err:
        TrajectoryData.load(path)
    assert str(path) in str(err.value)


def test_missing_and_truncated_files(boxing_file, tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        TrajectoryData.load(tmp_path / "absent.npz")
    raw = boxing_file.read_bytes()
    for cut in (len(raw) // 2, 100):
        half = tmp_path / f"cut{cut}.npz"
        half.write_bytes(raw[:cut])
        with pytest.raises(DataError, match="truncated or corrupt") as err:
            TrajectoryData.load(half)
        assert str(half) in str(err.value)


def test_bad_arrays_and_requests():
    n = 10
    good = dict(
        obs=np.zeros((n, 3, 8, 8), np.uint8),
        action=np.zeros(n, np.int64),
        reward=np.zeros(n, np.float32),
        cont=np.ones(n, np.float32),
        episode=np.zeros(n, np.int32),
    )
    for key, value in [("obs", good["obs"].astype(np.float32)), ("action", np.zeros(n))]:
        with pytest.raises(DataError, match="dtype"):
            TrajectoryData.from_arrays(**dict(good, **{key: value}))
    with pytest.raises(DataError, match=r"\[N, 3, S, S\]"):
        TrajectoryData.from_arrays(**dict(good, obs=np.zeros((n, 8, 8, 3), np.uint8)))
    with pytest.raises(DataError, match="length"):
        TrajectoryData.from_arrays(**dict(good, cont=np.ones(n + 1, np.float32)))
    data = TrajectoryData.from_arrays(**good)
    with pytest.raises(DataError, match="longest episode has 10 steps, asked for 11"):
        data.sample(2, 11, torch.Generator())
    with pytest.raises(DataError, match="shorter than the window"):
        data.eval_windows(2, 11, seed=0)


def test_unknown_env_id(tmp_path):
    with pytest.raises(DataError, match="unknown env id 'ALE/NoSuchGame-v5'"):
        collect("ALE/NoSuchGame-v5", 10, 0, tmp_path / "x.npz", progress=False)
    assert not list(tmp_path.iterdir())  # nothing written


def test_meta_is_json_not_pickle(boxing_file):
    with np.load(boxing_file, allow_pickle=False) as npz:
        assert json.loads(str(npz["meta"]))["action_dim"] == 18


def test_twin_futures_differ_only_through_sticky_actions() -> None:
    from storm_lib.atari import twin_futures

    still = twin_futures(count=3, horizon=4, sticky_prob=0.0)
    assert still.psnr.shape == (3, 4) and (still.psnr == still.cap).all()
    assert (still.identical == 1.0).all()
    sticky = twin_futures(count=12, horizon=4, sticky_prob=0.25)
    assert (sticky.psnr < sticky.cap).any()  # some twins part ways
    assert np.isfinite(sticky.copy_last).all() and (sticky.copy_last < sticky.cap).any()
