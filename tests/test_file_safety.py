"""Never lose a user's file, never grade the wrong model (the data-safety issue).

Every case that once destroyed or silently replaced a user's file asserts that the file
is byte-identical afterwards. Data-loss cases come first, then silent substitution on
the grading path, then exit codes and messages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from storm_lib import __main__ as cli
from storm_lib import build_world_model, get_profile
from storm_lib.atari import collect
from storm_lib.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from storm_lib.data import FORMAT, DataError, TrajectoryData, write_npz
from storm_lib.files import FileBusyError, exclusive_lock
from storm_lib.models.rssm import RSSMWorldModel
from storm_lib.p03 import load_rssm_checkpoint
from storm_lib.train import fit
from storm_lib.workflow import (
    check_trained_on,
    data_settings,
    ensure_data,
    evaluate_checkpoints,
    load_p03,
    train_or_load,
)

SMOKE = get_profile("smoke")
SMOKE_FILE = "data/boxing_600_seed0.npz"  # where the smoke profile looks for its data


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke profile's real Boxing collection (600 steps), collected once."""
    path = tmp_path_factory.mktemp("smoke") / "boxing_600_seed0.npz"
    return collect(path=path, progress=False, **data_settings(SMOKE))  # type: ignore[arg-type]


@contextlib.contextmanager
def unchanged(*paths: Path) -> Iterator[None]:
    """Assert that every file in ``paths`` has the same bytes afterwards, whatever happens."""
    before = {p: p.read_bytes() for p in paths}
    try:
        yield
    finally:
        for p, content in before.items():
            assert p.read_bytes() == content, f"{p} was changed"


def synthetic_file(path: Path, *, n: int = 120, actions: int = 18, **meta: object) -> Path:
    """A small file in our format whose meta claims the smoke settings, overridden by ``meta``."""
    rng = np.random.default_rng(0)
    data = TrajectoryData.from_arrays(
        obs=rng.integers(0, 256, (n, 3, 64, 64), dtype=np.uint8),
        action=rng.integers(0, actions, n).astype(np.int64),
        reward=np.zeros(n, np.float32),
        cont=np.ones(n, np.float32),
        episode=np.repeat(np.arange(4), n // 4).astype(np.int32),
        meta={**data_settings(SMOKE), "action_dim": actions, **meta},
    )
    return data.save(path)


def run_cli(*argv: str) -> int:
    """``python -m storm_lib ...`` in this process (the cwd is the test's folder)."""
    return cli.main(list(argv))


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STORM_PROFILE", "smoke")
    return tmp_path


# ------------------------------------------------------------------ data loss: data files
def _p03_style(path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(
        path,
        observations=rng.integers(0, 256, (50, 64, 64, 3), dtype=np.uint8),
        actions=rng.integers(0, 18, 50),
        rewards=np.zeros(50, np.float32),
        dones=np.zeros(50, bool),
    )


def _nan_rewards(path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = dict(
        obs=rng.integers(0, 256, (40, 3, 64, 64), dtype=np.uint8),
        action=np.zeros(40, np.int64),
        reward=np.full(40, np.nan, np.float32),
        cont=np.ones(40, np.float32),
        episode=np.repeat(np.arange(2), 20).astype(np.int32),
    )
    write_npz(path, arrays, {**data_settings(SMOKE), "action_dim": 18, "format": FORMAT})


USER_DATA = {  # case -> (how to make the user's file, what the error must say)
    "p03-style npz": (_p03_style, "missing arrays"),
    "pong dataset": (lambda p: synthetic_file(p, env_id="ALE/Pong-v5", actions=6), "env_id"),
    "boxing 800 steps seed 3": (lambda p: synthetic_file(p, steps=800, seed=3), "seed"),
    "100k dataset": (lambda p: synthetic_file(p, steps=100_000), "steps: file 100000"),
    "nan rewards": (_nan_rewards, "rewards must be finite"),
}


@pytest.mark.parametrize("case", [*USER_DATA, "truncated"])
def test_train_data_that_does_not_fit_is_an_error_and_is_kept(
    case: str, smoke_data: Path, tmp_path: Path
) -> None:
    path = tmp_path / "theirs.npz"
    if case == "truncated":
        path.write_bytes(smoke_data.read_bytes()[:50_000])
        expect = "truncated or corrupt"
    else:
        make, expect = USER_DATA[case]
        make(path)
    with unchanged(path), pytest.raises(DataError, match=expect) as info:
        ensure_data(SMOKE, path, progress=False)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("command", ["train", "compare-priors"])
def test_cli_with_mismatched_data_exits_1_and_keeps_it(
    command: str, workdir: Path, capsys: pytest.CaptureFixture
) -> None:
    theirs = synthetic_file(workdir / "boxing_800.npz", steps=800, seed=3)
    args = ["--model", "storm"] if command == "train" else ["--mlp", "m.pt", "--maskgit", "g.pt"]
    with unchanged(theirs):
        assert run_cli(command, *args, "--data", str(theirs)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert "steps: file 800, profile 600" in err
    assert "data/boxing_600_seed0.npz" in err  # how to get matching data
    assert not (workdir / "checkpoints").exists()


def test_data_as_is_trains_on_a_valid_file_with_other_settings(tmp_path: Path) -> None:
    theirs = synthetic_file(tmp_path / "boxing_800.npz", steps=800, seed=3)
    with unchanged(theirs):
        train, val = ensure_data(SMOKE, theirs, progress=False, as_is=True)
    assert len(train) + len(val) == 120


def test_collect_never_replaces_a_foreign_file_even_when_forced(tmp_path: Path) -> None:
    path = tmp_path / "p03.npz"
    _p03_style(path)
    for force in (False, True):
        with unchanged(path), pytest.raises(DataError, match="never overwritten"):
            collect(path=path, progress=False, overwrite=force, **data_settings(SMOKE))


def test_collect_replaces_our_own_data_only_when_forced(smoke_data: Path, tmp_path: Path) -> None:
    path = shutil.copy(smoke_data, tmp_path / "ours.npz")
    settings = {**data_settings(SMOKE), "steps": 300}
    with unchanged(path), pytest.raises(DataError, match=r"steps 600 \(asked 300\)"):
        collect(path=path, progress=False, **settings)
    collect(path=path, progress=False, overwrite=True, **settings)
    assert len(TrajectoryData.load(path)) == 300


def test_collect_keeps_our_matching_data_without_collecting(
    smoke_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("storm_lib.atari._make_env", lambda *a: pytest.fail("collected"))
    with unchanged(smoke_data):
        assert collect(path=smoke_data, progress=False, **data_settings(SMOKE)) == smoke_data


# ------------------------------------------------------------ data loss: checkpoints
def tiny_split(env_id: str = "ALE/Boxing-v5", seed: int = 0, actions: int = 18):
    rng = np.random.default_rng(seed)
    n = 120
    data = TrajectoryData.from_arrays(
        obs=rng.integers(0, 256, (n, 3, 64, 64), dtype=np.uint8),
        action=rng.integers(0, actions, n).astype(np.int64),
        reward=rng.choice([0.0, 1.0], n).astype(np.float32),
        cont=np.ones(n, np.float32),
        episode=np.repeat(np.arange(4), 30).astype(np.int32),
        meta={"env_id": env_id, "action_dim": actions},
    )
    return data, *data.split(0.34, seed=0)


def tiny_config(steps: int = 2, **train: object):
    config = get_profile("smoke")
    train = {"eval_every": 100, **train}
    config.train = dataclasses.replace(config.train, steps=steps, **train)
    return config


def bare_state_dict(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(RSSMWorldModel(SMOKE, 18).state_dict(), path)
    return path


def test_bundled_rssm_never_trains_onto_the_p03_path(
    smoke_data: Path, workdir: Path, capsys: pytest.CaptureFixture
) -> None:
    (workdir / "data").mkdir()
    shutil.copy(smoke_data, workdir / SMOKE_FILE)
    theirs = bare_state_dict(workdir / "checkpoints" / "p03_rssm.pt")
    with unchanged(theirs):
        assert run_cli("train", "--model", "rssm", "--steps", "1") == 0
    assert "checkpoint: checkpoints/rssm_smoke.pt" in capsys.readouterr().out
    assert read_checkpoint(workdir / "checkpoints/rssm_smoke.pt", "cpu")["model"] == "rssm"


@pytest.mark.parametrize("force", [False, True])
def test_training_never_overwrites_a_foreign_file(force: bool, tmp_path: Path) -> None:
    _, train, val = tiny_split()
    theirs = bare_state_dict(tmp_path / "theirs.pt")
    with unchanged(theirs), pytest.raises(CheckpointError, match="never overwritten"):
        train_or_load("rssm", tiny_config(), train, val, theirs, retrain=force, progress=False)


def test_our_checkpoint_of_another_run_is_replaced_only_when_asked(tmp_path: Path) -> None:
    _, train, val = tiny_split()
    path = tmp_path / "storm.pt"
    train_or_load("storm", tiny_config(steps=1), train, val, path, progress=False)
    other = tiny_config(steps=1, lr=5e-4)
    with unchanged(path), pytest.raises(CheckpointError, match=r"other settings.*'train'"):
        train_or_load("storm", other, train, val, path, progress=False)
    train_or_load("storm", other, train, val, path, retrain=True, progress=False)
    assert read_checkpoint(path, "cpu")["config"].train.lr == 5e-4


def test_our_checkpoint_trained_on_other_data_is_not_reused(tmp_path: Path) -> None:
    _, train, val = tiny_split()
    path = tmp_path / "storm.pt"
    train_or_load("storm", tiny_config(steps=1), train, val, path, progress=False)
    _, train2, val2 = tiny_split(seed=1)
    with unchanged(path), pytest.raises(CheckpointError, match="other data"):
        train_or_load("storm", tiny_config(steps=1), train2, val2, path, progress=False)


def test_a_second_training_to_the_same_file_fails_at_once(tmp_path: Path) -> None:
    _, train, val = tiny_split()
    config = tiny_config()
    path = tmp_path / "storm.pt"
    train_or_load("storm", tiny_config(steps=1), train, val, path, progress=False)
    model = build_world_model("storm", config, 18, "cpu")
    with exclusive_lock(path), unchanged(path), pytest.raises(FileBusyError, match="another"):
        fit(model, train, val, steps=2, config=config.train, device="cpu",
            checkpoint_path=path, resume=True, progress=False)  # fmt: skip
    assert not list(tmp_path.glob(".*.lock"))  # released, and nothing left behind


# --------------------------------------------------- silent substitution on the grading path
def test_missing_p03_checkpoint_is_an_error_and_nothing_is_written(tmp_path: Path) -> None:
    typo = tmp_path / "p03_rsm.pt"
    with pytest.raises(CheckpointError, match=r"p03_rsm\.pt: no such P03 checkpoint"):
        load_p03(typo, "cpu")
    assert not typo.exists()


def test_p03_checkpoint_is_only_read(tmp_path: Path) -> None:
    ours = tmp_path / "rssm.pt"
    _, train, val = tiny_split()
    train_or_load("rssm", tiny_config(steps=1), train, val, ours, progress=False)
    for theirs in (ours, bare_state_dict(tmp_path / "bare.pt")):
        with unchanged(theirs):
            load_p03(theirs, "cpu", latent=(32, 32))


def test_partial_p03_is_refused_unless_asked_and_ours_is_resumed(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data, train, val = tiny_split()
    path = tmp_path / "rssm.pt"
    model = build_world_model("rssm", tiny_config(), 18, "cpu")
    _interrupt_at(model, 2)  # Ctrl-C in the notebook's RSSM cell, during step 2
    with pytest.raises(KeyboardInterrupt):
        fit(model, train, val, steps=3, config=tiny_config(steps=3).train, device="cpu",
            checkpoint_path=path, progress=False, log_every=1)  # fmt: skip
    with unchanged(path), pytest.raises(CheckpointError, match=r"partial run \(step 1 of 3\)"):
        load_p03(path, "cpu", data=data)
    load_p03(path, "cpu", data=data, allow_partial=True)
    assert "step 1 of 3 (partial)" in capsys.readouterr().out
    train_or_load("rssm", tiny_config(steps=3), train, val, path, progress=False)
    assert "Resuming it from step 1 to 3" in capsys.readouterr().out
    assert read_checkpoint(path, "cpu")["step"] == 3


def test_evaluation_refuses_another_game_with_the_same_action_count(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _, train, val = tiny_split("ALE/Boxing-v5")
    path = tmp_path / "storm.pt"
    train_or_load("storm", tiny_config(steps=1), train, val, path, progress=False)
    alien, _, _ = tiny_split("ALE/Alien-v5")
    payload = read_checkpoint(path, "cpu")
    with pytest.raises(DataError, match=r"env_id 'ALE/Boxing-v5'.*'ALE/Alien-v5'"):
        check_trained_on(payload, alien, path)
    alien_file = alien.save(tmp_path / "alien.npz")
    with pytest.raises(DataError, match="env_id"):
        evaluate_checkpoints(storm=path, rssm=None, data=alien_file, profile="smoke",
                             out=tmp_path / "figs", device="cpu")  # fmt: skip
    other_boxing, _, _ = tiny_split("ALE/Boxing-v5", seed=5)
    (warning,) = check_trained_on(payload, other_boxing, path)
    assert "another ALE/Boxing-v5 file" in warning


def test_ambiguous_latent_sizes_are_asked_for_not_guessed(tmp_path: Path) -> None:
    config = get_profile("smoke")
    config.vae.categoricals, config.vae.classes = 32, 16
    path = tmp_path / "k32_v16.pt"
    torch.save(RSSMWorldModel(config, 18).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"K x V = 512 outputs.*--rssm-latent"):
        load_rssm_checkpoint(path, "cpu")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_rssm_checkpoint(path, "cpu", categoricals=30)
    model = load_rssm_checkpoint(path, "cpu", categoricals=32)
    assert (model.config.vae.categoricals, model.config.vae.classes) == (32, 16)


# ------------------------------------------------------------------ exit codes, messages
def _interrupt_at(model: torch.nn.Module, call: int, *, real_signal: bool = False) -> None:
    """Make the ``call``-th training-mode ``loss`` run its forward pass (BatchNorm updates,
    RNG draws) and then be interrupted: by a raised KeyboardInterrupt, or by a real SIGINT
    (which fit holds until the step is over)."""
    real, calls = model.loss, {"n": 0}

    def loss(batch):  # type: ignore[no-untyped-def]
        out = real(batch)
        if model.training:
            calls["n"] += 1
            if calls["n"] == call:
                if real_signal:
                    os.kill(os.getpid(), signal.SIGINT)
                else:
                    raise KeyboardInterrupt
        return out

    model.loss = loss  # type: ignore[method-assign]


def _buffers_and_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("how", ["raised mid-step", "real SIGINT"])
def test_resume_after_ctrl_c_equals_an_uninterrupted_run_bit_for_bit(
    how: str, tmp_path: Path
) -> None:
    _, train, val = tiny_split()
    config = tiny_config(steps=5, eval_every=2)
    runs = {}
    for name in ("straight", "interrupted"):
        torch.manual_seed(0)
        model = build_world_model("storm", config, 18, "cpu")
        path = tmp_path / f"{name}.pt"
        if name == "interrupted":
            _interrupt_at(model, 3, real_signal=how == "real SIGINT")
            with pytest.raises(KeyboardInterrupt):
                fit(model, train, val, steps=5, config=config.train, device="cpu",
                    checkpoint_path=path, progress=False, log_every=1)  # fmt: skip
            saved = read_checkpoint(path, "cpu")["step"]
            assert saved == (3 if how == "real SIGINT" else 2)  # the last completed step
            torch.manual_seed(0)
            model = build_world_model("storm", config, 18, "cpu")
        history = fit(model, train, val, steps=5, config=config.train, device="cpu",
                      checkpoint_path=path, resume=True, progress=False, log_every=1)  # fmt: skip
        runs[name] = (history, _buffers_and_weights(model))
    (h1, s1), (h2, s2) = runs["straight"], runs["interrupted"]
    assert [r["loss/total"] for r in h1.train] == [r["loss/total"] for r in h2.train]
    assert [r["loss/total"] for r in h1.val] == [r["loss/total"] for r in h2.val]
    assert any("num_batches_tracked" in k for k in s1)  # BatchNorm buffers are compared too
    for key, value in s1.items():
        assert torch.equal(value, s2[key]), key


def test_ctrl_c_in_the_cli_saves_says_so_and_exits_130(
    smoke_data: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    (workdir / "data").mkdir()
    shutil.copy(smoke_data, workdir / SMOKE_FILE)
    from storm_lib.models.storm import STORMWorldModel

    real, calls = STORMWorldModel.loss, {"n": 0}

    def loss(self, batch):  # type: ignore[no-untyped-def]
        if self.training:
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(STORMWorldModel, "loss", loss)
    assert run_cli("train", "--model", "storm") == 130
    out = capsys.readouterr().out
    assert (
        "Interrupted at step 2 of 6 (saved to checkpoints/storm_smoke.pt; re-run to resume)" in out
    )
    assert "checkpoint:" not in out  # no success summary
    assert read_checkpoint(workdir / "checkpoints/storm_smoke.pt", "cpu")["step"] == 2


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--model", "storm", "--steps", "-5"],
        ["train", "--model", "storm", "--steps", "0"],
        ["evaluate", "--storm", "s.pt", "--data", "d.npz", "--count", "0"],
        ["collect", "--steps", "0"],
    ],
)
def test_invalid_numbers_are_argument_errors(argv: list[str], workdir: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        run_cli(*argv)
    assert info.value.code == 2 and "must be at least 1" in capsys.readouterr().err
    assert not (workdir / "checkpoints").exists()


def test_checkpoint_errors_print_one_paragraph_and_debug_shows_the_traceback(
    smoke_data: Path, workdir: Path, capsys: pytest.CaptureFixture
) -> None:
    (workdir / "junk.pt").write_bytes(b"junk")
    argv = ["evaluate", "--rssm", "junk.pt", "--data", str(smoke_data)]
    assert run_cli(*argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: junk.pt: not a readable checkpoint") and "Traceback" not in err
    assert run_cli(*argv, "--debug") == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a PyTorch without CUDA")
def test_cuda_device_without_cuda_is_a_readable_error(workdir: Path, capsys) -> None:
    synthetic_file(workdir / "d.npz")
    assert run_cli("train", "--model", "storm", "--data", "d.npz", "--device", "cuda") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: device 'cuda': this PyTorch sees no CUDA GPU")
    assert "Traceback" not in err


@pytest.mark.parametrize("failure", ["torch enforce fail", "ENOSPC"])
def test_full_disk_is_a_readable_oserror_and_keeps_the_old_file(
    failure: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = build_world_model("storm", SMOKE, 18, "cpu")
    path = save_checkpoint(tmp_path / "storm.pt", model, step=1)

    def full_disk(obj: object, f) -> None:  # type: ignore[no-untyped-def]
        f.write(b"\0" * 4096)
        if failure == "ENOSPC":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr("storm_lib.files.shutil.disk_usage", lambda p: SimpleNamespace(free=0))
    with unchanged(path), pytest.raises(OSError) as info:
        save_checkpoint(path, model, step=2)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert "no space left on the disk" in str(info.value) and "enforce" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["storm.pt"]  # no temp file left


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_honour_the_umask(umask: int, tmp_path: Path) -> None:
    previous = os.umask(umask)
    try:
        ckpt = save_checkpoint(tmp_path / "s.pt", build_world_model("storm", SMOKE, 18, "cpu"))
        data = synthetic_file(tmp_path / "d.npz")
    finally:
        os.umask(previous)
    for path in (ckpt, data):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_loading_says_what_a_checkpoint_is(tmp_path: Path, capsys) -> None:
    data, train, val = tiny_split()
    path = tmp_path / "storm.pt"
    train_or_load("storm", tiny_config(steps=1), train, val, path, progress=False)
    train_or_load("storm", tiny_config(steps=1), train, val, path, progress=False)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    sha = data.fingerprint["sha256"]
    assert line == (
        f"{path}: STORM, step 1 of 1, profile smoke, trained on ALE/Boxing-v5 "
        f"(120 steps, seed None, sha256 {sha})"
    )
    assert json.dumps(read_checkpoint(path, "cpu")["data"])  # plain, weights_only-loadable
