"""``import-data`` on replays as dreamerv3-torch writes them: a directory with one ``.npz``
per episode (issue 27), a glob, several files; and the errors around them."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

from storm_lib import __main__ as cli
from storm_lib.data import DataError, TrajectoryData
from storm_lib.importing import import_data

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dreamer_replay import write_replay


@pytest.fixture(scope="module")
def boxing(boxing_file: Path) -> TrajectoryData:
    return TrajectoryData.load(boxing_file)


@pytest.fixture(scope="module")
def replay(boxing: TrajectoryData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("logdir") / "train_eps"
    assert len(write_replay(folder, boxing)) == boxing.num_episodes == 4
    return folder


def without_last_steps(data: TrajectoryData) -> np.ndarray:
    """Rows of ``data`` but each episode's last: its action leads to a frame never saved."""
    ends = np.flatnonzero(np.diff(data.episode, append=-1))
    return np.setdiff1d(np.arange(len(data)), ends)


def test_a_replay_directory_imports_as_its_episodes(boxing, replay, tmp_path) -> None:
    got = TrajectoryData.load(import_data(replay, tmp_path / "p03.npz", env_id="ALE/Boxing-v5"))
    rows = without_last_steps(boxing)
    np.testing.assert_array_equal(got.obs, boxing.obs[rows])
    np.testing.assert_array_equal(got.action, boxing.action[rows])
    np.testing.assert_array_equal(got.reward, boxing.reward[rows])
    # the episodes end on a time limit: discount 0 there, but no terminal state
    np.testing.assert_array_equal(got.cont, boxing.cont[rows])
    assert got.num_episodes == 4 and got.action_dim == 18
    origin = got.meta["imported_from"]
    files = sorted(replay.glob("*.npz"))
    assert origin["files"] == [
        {"path": str(f), "sha256": hashlib.sha256(f.read_bytes()).hexdigest()} for f in files
    ]
    assert origin["keys"]["terminal"] == "is_terminal" and "cont" not in origin["keys"]


def test_globs_and_several_files_through_the_cli(boxing, replay, tmp_path, capsys) -> None:
    files = sorted(replay.glob("*.npz"))
    argv = ["import-data", str(files[0]), str(files[2]), "--env", "ALE/Boxing-v5", "--out"]
    assert cli.main([*argv, str(tmp_path / "two.npz")]) == 0
    assert "from 2 file(s)" in capsys.readouterr().out
    two = TrajectoryData.load(tmp_path / "two.npz")
    assert two.num_episodes == 2 and len(two) == 2 * 99
    pattern = str(replay / "*ep[12]-*.npz")  # quoted, so the CLI expands it
    assert cli.main(["import-data", pattern, "--env", "e", "--out", str(tmp_path / "g.npz")]) == 0
    got = TrajectoryData.load(tmp_path / "g.npz")
    assert [f["path"] for f in got.meta["imported_from"]["files"]] == [str(f) for f in files[1:3]]


def test_errors_say_what_is_a_directory_and_what_to_do(replay, tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"empty is a directory with no \.npz files in it"):
        import_data(empty, tmp_path / "x.npz", env_id="e")
    with pytest.raises(DataError, match=r"out is a directory; give the new file's name"):
        (tmp_path / "out").mkdir()
        import_data(replay, tmp_path / "out", env_id="e")
    with pytest.raises(DataError, match="no file matches this pattern"):
        import_data(str(tmp_path / "nothing*.npz"), tmp_path / "x.npz", env_id="e")
    with pytest.raises(DataError, match=r"missing\.npz: no such file or directory"):
        import_data(tmp_path / "missing.npz", tmp_path / "x.npz", env_id="e")
    first = sorted(replay.glob("*.npz"))[0]
    before = first.read_bytes()
    with pytest.raises(DataError, match="is one of the sources"):
        import_data(first, first, env_id="e", overwrite=True)
    assert first.read_bytes() == before


def test_one_episode_cannot_be_split_and_the_error_says_what_to_do(replay, tmp_path) -> None:
    one = sorted(replay.glob("*.npz"))[0]
    data = TrajectoryData.load(import_data(one, tmp_path / "one.npz", env_id="ALE/Boxing-v5"))
    advice = r"import more episodes \(import-data takes several files, a directory"
    with pytest.raises(DataError, match=r"cannot split 1 episode\(s\).* at least 2\. .*" + advice):
        data.split(0.1)
