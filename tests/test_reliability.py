"""Reliability (issue 10): hostile and broken files, early mismatch errors, determinism.

Already covered elsewhere and not repeated here: resume equals continuing, Ctrl-C saves
the last step, a non-finite loss keeps the last good checkpoint, action-count and
max_length mismatches (test_train.py); SIGKILL mid-write (test_checkpoint.py).

Every broken or hostile file must end in OUR error type (``CheckpointError`` for the three
checkpoint loaders, ``DataError`` for ``TrajectoryData.load``) with a message naming the
file, never another exception type, never a hang, and with no side effect: the folder
holds the same files with the same bytes afterwards and no pickled code ran.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storm_lib import build_world_model, get_profile, load_checkpoint
from storm_lib.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from storm_lib.config import Config
from storm_lib.data import KEYS, DataError, TrajectoryData
from storm_lib.evaluate import rollout_psnr
from storm_lib.p03 import load_rssm_checkpoint
from storm_lib.train import TrainingError, fit

ACTIONS = 3
LOAD_TIMEOUT = 20.0  # seconds; one load of these tiny files takes milliseconds
# Fixed examples (derandomize) so that CI is stable; no example database in the repo.
FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def tiny_config() -> Config:
    """The smallest sensible sizes: checkpoints of ~60 KB, 16-pixel frames."""
    config = get_profile("smoke")
    config.vae = dataclasses.replace(
        config.vae, stem_channels=2, stages=4, categoricals=4, classes=4
    )
    config.transformer = dataclasses.replace(config.transformer, width=8, heads=1, layers=1)
    config.rssm = dataclasses.replace(config.rssm, deter=8, hidden=8)
    config.heads = dataclasses.replace(config.heads, reward_bins=5)
    config.data = dataclasses.replace(config.data, image_size=16)
    return config


def tiny_data(frames: int = 20, size: int = 16, episode_length: int = 10) -> TrajectoryData:
    rng = np.random.default_rng(0)
    return TrajectoryData.from_arrays(
        obs=rng.integers(0, 256, (frames, 3, size, size), dtype=np.uint8),
        action=rng.integers(0, ACTIONS, frames).astype(np.int64),
        reward=rng.choice([0.0, 1.0], frames).astype(np.float32),
        cont=np.ones(frames, np.float32),
        episode=(np.arange(frames) // episode_length).astype(np.int32),
        meta={"action_dim": ACTIONS},
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real STORM checkpoint, RSSM checkpoint and data file of the tiny sizes."""
    folder = tmp_path_factory.mktemp("originals")
    torch.manual_seed(0)
    out = {"data.npz": tiny_data().save(folder / "data.npz")}
    for kind in ("storm", "rssm"):
        model = build_world_model(kind, tiny_config(), ACTIONS, "cpu")
        out[f"{kind}.pt"] = save_checkpoint(folder / f"{kind}.pt", model, step=3)
    return out


# name -> (loader, the error it must raise, the real file of its kind)
LOADERS: dict[str, tuple[Callable[[Path], Any], type[Exception], str]] = {
    "load_checkpoint": (lambda p: load_checkpoint(p, "cpu"), CheckpointError, "storm.pt"),
    "read_checkpoint": (lambda p: read_checkpoint(p, "cpu"), CheckpointError, "storm.pt"),
    "load_rssm_checkpoint": (  # K is given: a bare state dict's shapes only tell K * V
        lambda p: load_rssm_checkpoint(p, "cpu", categoricals=tiny_config().vae.categoricals),
        CheckpointError,
        "rssm.pt",
    ),
    "TrajectoryData.load": (TrajectoryData.load, DataError, "data.npz"),
}


class Hang(BaseException):
    """Not an Exception, so that no loader's ``except Exception`` can swallow it."""


@contextlib.contextmanager
def no_hang(seconds: float = LOAD_TIMEOUT) -> Iterator[None]:
    def alarm(signum: int, frame: Any) -> None:
        raise Hang(f"still loading after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def attempt(name: str, path: Path, *, may_load: bool = False) -> Any:
    """Load ``path`` with loader ``name``: return our error after checking its message (or,
    if ``may_load``, the loaded object); any other exception propagates and fails the test.
    """
    loader, error, _ = LOADERS[name]
    before = snapshot(path.parent)
    try:
        with no_hang():
            result = loader(path)
    except error as exc:
        result = exc
        assert str(exc).strip() and str(path) in str(exc), str(exc)
    else:
        assert may_load, f"{name} loaded a broken file {path} without error"
    assert snapshot(path.parent) == before, "the loader added, removed or changed files"
    return result


def assert_usable(name: str, result: Any, files: dict[str, Path]) -> None:
    """What a damaged file that still loads must give: a working object of the right kind."""
    if name == "TrajectoryData.load":  # CRC-checked: the same content or an error
        original = TrajectoryData.load(files["data.npz"])
        for key in KEYS:
            np.testing.assert_array_equal(getattr(result, key), getattr(original, key))
        assert result.eval_windows(1, 2, seed=0).obs.shape == (1, 2, 3, 16, 16)
    elif name == "read_checkpoint":
        assert isinstance(result["config"], Config) and isinstance(result["state_dict"], dict)
    else:  # torch's zip reader has no CRC check: a flip inside a weight loads silently
        assert not result.training
        floats = [t for t in result.state_dict().values() if t.is_floating_point()]
        assert all(t.isfinite().all() for t in floats), "non-finite weights were loaded"
        size = result.config.data.image_size
        assert result.reconstruct(torch.zeros(1, 2, 3, size, size)).shape == (1, 2, 3, size, size)


@contextlib.contextmanager
def fresh_file(content: bytes, suffix: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"broken{suffix}"
        path.write_bytes(content)
        yield path


MAGIC = [b"", b"PK\x03\x04", b"\x80\x02", b"\x93NUMPY\x01\x00", b"\x80\x02\x8a\x0alp\xfc\x9cF"]


@pytest.mark.parametrize("name", list(LOADERS))
@FUZZ
@given(prefix=st.sampled_from(MAGIC), body=st.binary(max_size=2048))
def test_random_bytes(name: str, prefix: bytes, body: bytes) -> None:
    """Random bytes, some behind the magic numbers of zip, pickle, .npy, legacy torch."""
    with fresh_file(prefix + body, ".bin") as path:
        attempt(name, path)


def test_data_file_truncated_at_every_length(files: dict[str, Path], tmp_path: Path) -> None:
    raw = files["data.npz"].read_bytes()
    path = tmp_path / "cut.npz"
    path.write_bytes(raw)
    for length in range(len(raw) - 1, -1, -1):  # every strict prefix, shrinking in place
        os.truncate(path, length)
        attempt("TrajectoryData.load", path)


# The tiny checkpoint is ~60 KB (pickled dict ~14 KB, 90 tensor records, central directory
# ~6 KB); every length would take ~10 s per loader here (mostly file-system time), so every
# length is tried only in the first and last EDGE bytes (magic, zip local header, start of
# the pickle; central directory and end record), and hypothesis samples the lengths between.
EDGE = 2048


@pytest.mark.parametrize("name", [n for n in LOADERS if n != "TrajectoryData.load"])
def test_checkpoint_truncated_at_edge_lengths(name: str, files: dict, tmp_path: Path) -> None:
    raw = files[LOADERS[name][2]].read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(raw)
    for length in [*range(len(raw) - 1, len(raw) - EDGE, -1), *range(EDGE, -1, -1)]:
        os.truncate(path, length)
        attempt(name, path)


@pytest.mark.parametrize("name", [n for n in LOADERS if n != "TrajectoryData.load"])
@FUZZ
@given(fraction=st.floats(0.0, 1.0, exclude_max=True))
def test_checkpoint_truncated_in_the_middle(name: str, fraction: float, files: dict) -> None:
    raw = files[LOADERS[name][2]].read_bytes()
    with fresh_file(raw[: int(fraction * len(raw))], ".pt") as path:
        attempt(name, path)


@pytest.mark.parametrize("name", list(LOADERS))
@FUZZ
@given(
    flips=st.lists(st.tuples(st.integers(0, 2**31), st.integers(1, 255)), min_size=1, max_size=4)
)
def test_flipped_bytes(name: str, flips: list[tuple[int, int]], files: dict) -> None:
    """Flipped bytes give our error, or (flip inside a weight, a zip time stamp, ...)
    a file that still loads: then the object must be usable (see ``assert_usable``)."""
    source = files[LOADERS[name][2]]
    raw = bytearray(source.read_bytes())
    for position, mask in flips:
        raw[position % len(raw)] ^= mask
    with fresh_file(bytes(raw), source.suffix) as path:
        result = attempt(name, path, may_load=True)
    if not isinstance(result, Exception):
        assert_usable(name, result, files)


def test_non_finite_weights_in_a_file_are_refused(files: dict[str, Path], tmp_path: Path) -> None:
    """save_checkpoint never writes NaN/inf, so such a file is damaged or foreign."""
    for kind, loader in (("storm", "load_checkpoint"), ("rssm", "load_rssm_checkpoint")):
        payload = torch.load(files[f"{kind}.pt"], weights_only=True)
        first = next(k for k, v in payload["state_dict"].items() if v.is_floating_point())
        payload["state_dict"][first].view(-1)[0] = float("inf")
        path = tmp_path / f"inf_{kind}.pt"
        for content in (payload, payload["state_dict"]):  # P03 also takes bare state dicts
            torch.save(content, path)
            error = attempt(loader, path)
            assert re.search(rf"non-finite.* in {first}\b", str(error)), error
            if kind == "storm":
                break


@pytest.mark.parametrize(
    ("entry", "value"), [("state_dict", None), ("history", [1]), ("optimizer", "x")]
)
def test_damaged_entries_are_refused(entry: str, value: Any, files: dict, tmp_path: Path) -> None:
    """Found by fuzzing: a flip inside the key "state_dict" escaped as a KeyError."""
    for kind in ("storm", "rssm"):
        payload = torch.load(files[f"{kind}.pt"], weights_only=True)
        if value is None:
            del payload[entry]
        else:
            payload[entry] = value
        path = tmp_path / f"{kind}.pt"
        torch.save(payload, path)
        for name, (_, _, source) in LOADERS.items():
            if source == f"{kind}.pt":
                error = attempt(name, path)
                assert isinstance(error, CheckpointError) and entry in str(error), error


WRONG_KIND = [
    ("load_checkpoint", "data.npz"),
    ("read_checkpoint", "data.npz"),
    ("load_rssm_checkpoint", "data.npz"),
    ("load_rssm_checkpoint", "storm.pt"),
    ("TrajectoryData.load", "storm.pt"),
    ("TrajectoryData.load", "rssm.pt"),
    ("TrajectoryData.load", "array.npy"),
    ("load_checkpoint", "array.npy"),
]


@pytest.mark.parametrize(("name", "source"), WRONG_KIND)
def test_valid_file_of_the_wrong_kind(name: str, source: str, files: dict, tmp_path: Path) -> None:
    path = tmp_path / source
    if source == "array.npy":
        np.save(path, tiny_data().obs)
    else:
        path.write_bytes(files[source].read_bytes())
    attempt(name, path)


class Evil:
    """Unpickling it would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def write_evil(style: str, path: Path, marker: Path) -> None:
    evil = Evil(marker)
    if style == "pickle":
        path.write_bytes(pickle.dumps({"format": "storm_lib/1", "state_dict": evil}, protocol=2))
    elif style == "torch.save":
        torch.save({"format": "storm_lib/1", "model": "rssm", "state_dict": evil}, path)
    elif style == "npz object array":
        arrays = {k: getattr(tiny_data(), k) for k in ("obs", "action", "reward", "cont")}
        with path.open("wb") as f:  # np.savez would add ".npz" to a str path
            np.savez(f, **arrays, episode=np.array([evil] * 20, dtype=object), meta="{}")
    else:  # a bare .npy holding an object array
        np.save(path, np.array([evil], dtype=object), allow_pickle=True)


@pytest.mark.parametrize("style", ["pickle", "torch.save", "npz object array", "npy object"])
@pytest.mark.parametrize("name", list(LOADERS))
def test_pickled_code_never_runs(name: str, style: str, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.bin"
    write_evil(style, path, marker)
    attempt(name, path)
    assert not marker.exists()


def write_members(path: Path, reward_edit: tuple[bytes, bytes] | None = None) -> Path:
    """The tiny data as an uncompressed .npz written member by member (no zip64 fields);
    ``reward_edit`` replaces text in the reward header, keeping the header length."""
    data = tiny_data()
    arrays = {k: getattr(data, k) for k in KEYS}
    arrays["meta"] = np.array(json.dumps(data.meta))
    with zipfile.ZipFile(path, "w") as archive:
        for key, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, array, version=(1, 0))
            raw = buffer.getvalue()
            if key == "reward" and reward_edit:  # a longer text eats padding spaces
                old, new = reward_edit
                raw = raw.replace(old + b" " * max(len(new) - len(old), 0), new, 1)
                assert new in raw
            archive.writestr(f"{key}.npy", raw)
    return path


HOSTILE_HEADERS = {  # reward.npy header text -> replacement
    "memory": (b"(20,), }", b"(100000000000000,), }"),  # claims 10^14 rewards
    "corrupt": (b"(20,), }", b"(20, , }"),  # unbalanced: numpy raises tokenize.TokenError
}


@pytest.mark.parametrize("expect", list(HOSTILE_HEADERS))
def test_data_file_with_hostile_npy_header(expect: str, tmp_path: Path) -> None:
    """Found by fuzzing: these escaped as MemoryError and tokenize.TokenError."""
    path = write_members(tmp_path / "hostile.npz", HOSTILE_HEADERS[expect])
    error = attempt("TrajectoryData.load", path)
    assert isinstance(error, DataError) and expect in str(error), error


def test_corrupt_frames_behind_a_damaged_zip_size_are_refused(tmp_path: Path) -> None:
    """Found by fuzzing: zipfile checks a member's CRC-32 only on reaching its end, and
    ``np.load`` stops at the array's last byte, so with the sizes in the zip directory
    enlarged too, a flipped pixel loaded silently. TrajectoryData.load must refuse it."""
    path = write_members(tmp_path / "data.npz")
    with zipfile.ZipFile(path) as archive:
        info, directory = archive.getinfo("obs.npy"), archive.start_dir  # obs: 1st entry
    raw = bytearray(path.read_bytes())
    raw[info.header_offset + 30 + len(info.filename) + 128 + 5] ^= 1  # one pixel
    for offset in (20, 24):  # compressed and uncompressed size in the central directory
        raw[directory + offset : directory + offset + 4] = (info.file_size + 64).to_bytes(
            4, "little"
        )
    path.write_bytes(raw)
    error = attempt("TrajectoryData.load", path)
    assert isinstance(error, DataError) and "CRC" in str(error), error


def spy_on_loss(model: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record every ``model.loss`` call made in training mode (a would-be gradient step)."""
    calls: list[int] = []
    real = model.loss

    def loss(batch: Any) -> Any:
        if model.training:
            calls.append(1)
        return real(batch)

    monkeypatch.setattr(model, "loss", loss)
    return calls


def refuse_before_training(model: Any, train: Any, val: Any, folder: Path, monkeypatch) -> str:
    """Run ``fit`` expecting a refusal: no step, no file, the weights untouched."""
    config = get_profile("smoke")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = spy_on_loss(model, monkeypatch)
    with pytest.raises((TrainingError, DataError)) as err:
        fit(
            model,
            train,
            val,
            steps=2,
            config=config.train,
            device="cpu",
            checkpoint_path=folder / "never.pt",
            progress=False,
        )
    assert calls == [] and list(folder.iterdir()) == []
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    return str(err.value)


def test_image_size_mismatch_is_refused_before_training(tmp_path, monkeypatch) -> None:
    model = build_world_model("storm", get_profile("smoke"), ACTIONS, "cpu")  # 64 px
    train, val = tiny_data(frames=60, size=32, episode_length=30).split(0.5)
    message = refuse_before_training(model, train, val, tmp_path, monkeypatch)
    assert "32px" in message and "64px" in message


def test_empty_dataset_is_a_data_error() -> None:
    data = tiny_data()
    with pytest.raises(DataError, match="N >= 1"):
        TrajectoryData.from_arrays(**{k: getattr(data, k)[:0] for k in KEYS})


@pytest.mark.parametrize("short", ["training", "validation"])
def test_episodes_shorter_than_the_window(short: str, tmp_path, monkeypatch) -> None:
    seq_len = get_profile("smoke").train.seq_len  # 20
    short_data = tiny_data(frames=40, size=64, episode_length=seq_len // 2)
    long_data = tiny_data(frames=2 * seq_len, size=64, episode_length=seq_len)
    train, val = (short_data, long_data) if short == "training" else (long_data, short_data)
    model = build_world_model("storm", get_profile("smoke"), ACTIONS, "cpu")
    message = refuse_before_training(model, train, val, tmp_path, monkeypatch)
    assert short in message and f"{seq_len // 2} steps" in message and str(seq_len) in message


def test_context_plus_horizon_beyond_max_length() -> None:
    config = tiny_config()
    config.transformer.max_length = 8
    model = build_world_model("storm", config, ACTIONS, "cpu")
    obs, act = torch.zeros(1, 4, 3, 16, 16), torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="max_length=8"):  # C 4 + H 6 - 1 = 9 steps
        model.imagine(obs, act, torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="needs 9 time steps but its max_length is 8"):
        rollout_psnr({"storm": model}, tiny_data(), context=4, horizon=6, count=2, progress=False)


# One run: collect real Boxing frames, train STORM (smoke profile) for 20 steps, score
# rollouts. One thread: a fixed thread count is what bitwise CPU determinism needs, and on
# a shared 2-core machine two OpenMP threads each are ~40x slower than one.
RUN = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    from storm_lib import build_world_model, get_profile
    from storm_lib.atari import collect
    from storm_lib.data import TrajectoryData
    from storm_lib.evaluate import rollout_psnr
    from storm_lib.train import fit
    from storm_lib.utils import seed_everything

    config = get_profile("smoke")
    path = collect("ALE/Boxing-v5", 120, config.data.seed, sys.argv[1], progress=False,
                   image_size=config.data.image_size, max_episode_steps=40)
    train, val = TrajectoryData.load(path).split(config.data.val_fraction, config.data.seed)
    seed_everything(config.train.seed)
    model = build_world_model("storm", config, train.action_dim, "cpu")
    history = fit(model, train, val, steps=20, config=config.train, device="cpu",
                  progress=False, log_every=1)
    result = rollout_psnr({"storm": model}, val, context=config.eval.context,
                          horizon=config.eval.horizon, count=config.eval.count,
                          seed=config.eval.seed, device="cpu", progress=False)
    print(json.dumps({"losses": [r["loss/total"] for r in history.train],
                      "psnr": result.models["storm"].values.tolist(), "table": result.table()}))
    """
)


def test_same_seed_same_data_losses_and_scores_across_processes(tmp_path: Path) -> None:
    paths = [tmp_path / "a.npz", tmp_path / "b.npz"]
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", RUN, str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for path in paths
    ]
    outputs = []
    for run in runs:
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr[-2000:]
        outputs.append(json.loads(stdout.strip().splitlines()[-1]))
    first, second = outputs
    with np.load(paths[0], allow_pickle=False) as a, np.load(paths[1], allow_pickle=False) as b:
        assert a.files == b.files
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert len(first["losses"]) == 20
    assert first["losses"] == second["losses"]  # bitwise: same seed, same thread count
    assert first["psnr"] == second["psnr"] and first["table"] == second["table"]
