"""Instructors grading a student's own P03 model and data (the outside-model issue).

A realistic stand-in for the student's code lives in ``tests/student_p03/p03_model.py``:
its own class, names, sizes, channels-last frames in [-0.5, 0.5], one-hot actions and
DreamerV3's action convention. It is trained for a few steps, saved with a plain
``torch.save(model.state_dict())``, and graded end to end through the CLI and through the
notebook's own Section 4 cells.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from storm_lib import __main__ as cli
from storm_lib.atari import collect
from storm_lib.checkpoint import CheckpointError
from storm_lib.data import DataError, TrajectoryData
from storm_lib.evaluate import action_sensitivity, ignores_actions, rollout_psnr
from storm_lib.importing import import_data
from storm_lib.outside import OutsideModel, OutsideModelError, load_outside_model

ROOT = Path(__file__).resolve().parents[1]
STUDENT = ROOT / "tests" / "student_p03" / "p03_model.py"
NOTEBOOK = ROOT / "p04_transformer_backbone.ipynb"
sys.path.insert(0, str(STUDENT.parent))
import p03_model  # noqa: E402  (the student's file, as an instructor would import it)


def dreamer_layout(data: TrajectoryData) -> dict[str, np.ndarray]:
    """``data`` as a DreamerV3 replay stores it: HWC images, one-hot actions and rewards
    that *led to* each frame, ``is_first`` / ``is_terminal``; one extra last frame per
    episode stands for the frame the last action led to (here: a copy)."""
    rows: dict[str, list] = {
        k: [] for k in ("image", "action", "reward", "is_first", "is_terminal")
    }
    for ep in data.episode_ids:
        idx = np.flatnonzero(data.episode == ep)
        frames = np.concatenate([data.obs[idx], data.obs[idx[-1:]]]).transpose(0, 2, 3, 1)
        hot = np.eye(data.action_dim, dtype=np.float32)
        prev = np.concatenate([np.zeros((1, data.action_dim), np.float32), hot[data.action[idx]]])
        rows["image"].append(frames)
        rows["action"].append(prev)
        rows["reward"].append(np.concatenate([[0.0], data.reward[idx]]))
        rows["is_first"].append(np.eye(1, len(idx) + 1, 0, dtype=bool)[0])
        rows["is_terminal"].append(np.concatenate([[False], data.cont[idx] == 0]))
    return {k: np.concatenate(v) for k, v in rows.items()}


@pytest.fixture(scope="module")
def boxing(tmp_path_factory: pytest.TempPathFactory) -> TrajectoryData:
    path = tmp_path_factory.mktemp("boxing") / "b.npz"
    return TrajectoryData.load(collect("ALE/Boxing-v5", 240, 0, path, max_episode_steps=60,
                                       progress=False))  # fmt: skip


@pytest.fixture(scope="module")
def student(boxing: TrajectoryData, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The student's P03 artefacts: their replay file and their weights after a few steps."""
    folder = tmp_path_factory.mktemp("student")
    replay = folder / "replay.npz"
    np.savez_compressed(replay, **dreamer_layout(boxing))
    torch.manual_seed(0)
    model = p03_model.StudentRSSM(action_dim=boxing.action_dim)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rows = torch.arange(12)
    obs = torch.from_numpy(boxing.obs[rows]).float().div(255).sub(0.5).permute(0, 2, 3, 1)
    prev = F.one_hot(torch.from_numpy(boxing.action[rows]), boxing.action_dim).float()
    for _ in range(3):
        model.train_step(obs[None], prev[None], opt)
    weights = folder / "p03.pt"
    torch.save(model.state_dict(), weights)
    return {"replay": replay, "weights": weights}


# ------------------------------------------------------------------ end to end
def test_cli_grades_a_student_model_on_the_student_data(
    student: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STORM_PROFILE", "smoke")
    data = "data/p03.npz"
    assert cli.main(["import-data", str(student["replay"]), "--env", "ALE/Boxing-v5",
                     "--out", data]) == 0  # fmt: skip
    assert "DreamerV3), shifted" in capsys.readouterr().out
    assert cli.main(["train", "--model", "storm", "--data", data, "--data-as-is",
                     "--steps", "2"]) == 0  # fmt: skip
    code = f"{STUDENT}:load"
    argv = ["evaluate", "--storm", "checkpoints/storm_smoke.pt", "--rssm",
            str(student["weights"]), "--rssm-code", code, "--data", data]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "their code ran" in out and "argmax latents" in out
    assert "p03_model ceiling" in out  # labelled by the loader file's stem (no --rssm-name)
    assert (tmp_path / "figures" / "psnr_vs_horizon.png").exists()
    assert (tmp_path / "figures" / "action_sensitivity.png").exists()


def section4_cells() -> list[str]:
    """The notebook's own Section 4 cells, from the PSNR cell to the diagnostics, without
    the cells that play inside STORM's imagination (STORM only; they run the emulator)."""
    cells = [c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code"]
    start = next(i for i, s in enumerate(cells) if s.startswith("section4_start"))
    end = next(i for i, s in enumerate(cells) if "dg.teacher_forcing_gap" in s)
    play = ("ImaginedGame", "scripted_demo")
    return [s for s in cells[start : end + 1] if not any(name in s for name in play)]


def test_notebook_section4_cells_grade_a_student_model(
    student: dict[str, Path], boxing: TrajectoryData, tmp_path: Path
) -> None:
    nbclient = pytest.importorskip("nbclient")
    setup = textwrap.dedent(f"""
        import time
        import torch
        from IPython.display import HTML, display
        from storm_lib import build_world_model, diagnostics as dg, evaluate as ev
        from storm_lib import get_profile, plots, report
        from storm_lib.data import TrajectoryData
        from storm_lib.outside import load_outside_model
        config = get_profile("smoke")
        config.eval.count = 8
        device = torch.device("cpu")
        P03_NAME = "RSSM"  # the notebook's label for the student's model
        val_data = TrajectoryData.load({str(boxing.path)!r})
        storm = build_world_model("storm", config, val_data.action_dim, device).eval()
        rssm = load_outside_model({f"{STUDENT}:load"!r}, {str(student["weights"])!r}, device,
                                  action_dim=val_data.action_dim)
    """)
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(s) for s in (setup, *section4_cells())]
    )
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()  # fmt: skip
    text = json.dumps([o.get("text", "") for c in nb.cells for o in c.outputs])
    assert "RSSM: its model has no predict_one_step" in text  # skipped in one sentence
    assert "STORM: teacher-forced one-step PSNR" in text
    # its img_step takes no sample flag: no prior-sampling effect is claimed for it
    assert "RSSM: at step 1 its rollout is" in text
    assert "it takes no mode, so this model samples in both modes (or in neither)" in text
    assert "sampling the prior moves it" not in text.split("RSSM: at step 1")[1]


# ------------------------------------------------------------------ bad student code
BAD = {
    "wrong shape": ("return torch.zeros(b, h, 3, 32, 32)", r"shape \(2, 10, 3, 32, 32\)"),
    "wrong dtype": ("return torch.zeros(b, h, 3, 64, 64, dtype=torch.long)", "dtype torch.int64"),
    "wrong device": ("return torch.zeros(b, h, 3, 64, 64, device='meta')", "on meta"),
    "non-finite": ("return torch.full((b, h, 3, 64, 64), float('nan'))", "non-finite"),
    "out of range": ("return torch.full((b, h, 3, 64, 64), -0.5)", r"values in \[-0.5, -0.5\]"),
    "not a tensor": ("return [0.0]", "returned a list, not a tensor"),
    "raises": ("raise ValueError('boom in imagine')", "raised ValueError: boom in imagine"),
}


def student_file(tmp_path: Path, body: str, loader: str = "return M()") -> str:
    path = tmp_path / "bad_p03.py"
    path.write_text(
        textwrap.dedent(f"""
        import torch
        class M:
            def imagine(self, context_obs, context_actions, future_actions):
                b, h = context_obs.shape[0], future_actions.shape[1] + 1
                {body}
        def load(weights, device):
            {loader}
    """)
    )
    return f"{path}:load"


@pytest.fixture()
def weights(tmp_path: Path) -> Path:
    torch.save({"w": torch.zeros(1)}, tmp_path / "w.pt")
    return tmp_path / "w.pt"


@pytest.mark.parametrize("case", BAD)
def test_every_bad_output_is_an_error_naming_the_file_and_function(
    case: str, tmp_path: Path, weights: Path
) -> None:
    body, expect = BAD[case]
    model = load_outside_model(student_file(tmp_path, body), weights, "cpu", action_dim=3)
    obs = torch.rand(2, 4, 3, 64, 64)
    with pytest.raises(OutsideModelError, match=expect) as info:
        model.imagine(obs, torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 9, dtype=torch.long))
    assert f"{tmp_path / 'bad_p03.py'}:load: its model's imagine()" in str(info.value)
    if case == "raises":
        assert isinstance(info.value.__cause__, ValueError)  # the student's traceback is kept


def test_a_model_that_ignores_actions_is_a_warning_not_an_error(
    tmp_path: Path, weights: Path, boxing: TrajectoryData
) -> None:
    body = "return context_obs[:, -1:].expand(b, h, 3, 64, 64).clone()"
    model = load_outside_model(student_file(tmp_path, body), weights, "cpu", action_dim=18)
    sens = action_sensitivity({"m": model}, boxing, count=8, progress=False)
    assert ignores_actions(sens["m"])
    result = rollout_psnr({"m": model}, boxing, count=8, progress=False)
    assert "m" not in result.ceilings and "m ceiling" not in result.table()  # no reconstruct


@pytest.mark.parametrize(
    "code, loader, expect",
    [
        ("missing.py:load", "return M()", "no such file"),
        ("FILE:build", "return M()", r"has no function 'build' \(it has \['M', 'load'\]\)"),
        ("FILE", "return M()", "path/to/file.py:function"),
        ("FILE:load", "raise RuntimeError('wrong sizes')", r"load\(weights, device\) raised"),
        ("FILE:load", "return object()", "has no imagine"),
    ],
)
def test_loader_errors_are_readable(
    code: str, loader: str, expect: str, tmp_path: Path, weights: Path
) -> None:
    path = student_file(tmp_path, "return None", loader).rpartition(":")[0]
    with pytest.raises(OutsideModelError, match=expect):
        load_outside_model(code.replace("FILE", path), weights, "cpu", action_dim=3)


def test_pickled_whole_model_is_refused_with_the_state_dict_advice(tmp_path: Path) -> None:
    torch.save(p03_model.StudentRSSM(), tmp_path / "whole.pt")
    with pytest.raises(CheckpointError, match=r"torch\.save\(model\.state_dict\(\), path\)"):
        load_outside_model(f"{STUDENT}:load", tmp_path / "whole.pt", "cpu", action_dim=18)


def test_diagnostics_need_what_the_protocol_gives() -> None:
    model = OutsideModel(p03_model.load(p03_model.StudentRSSM().state_dict(), "cpu"),
                         source="p03_model.py:load", action_dim=18)  # fmt: skip
    assert callable(getattr(model, "reconstruct", None))
    assert not hasattr(model, "predict_one_step") and not hasattr(model, "token_nll_per_step")


# ------------------------------------------------------------------ import-data
def layouts(data: TrajectoryData) -> dict[str, dict[str, np.ndarray]]:
    """``data`` written in each supported layout."""
    n, a = len(data), data.action_dim
    hot = np.eye(a, dtype=np.float32)[data.action]
    done = np.zeros(n, bool)
    done[np.flatnonzero(np.diff(data.episode))] = True
    done[-1] = True
    hwc = data.obs.transpose(0, 2, 3, 1)
    e = data.num_episodes
    sources = {
        "HWC uint8, indices, done": dict(
            obs=hwc, action=data.action, reward=data.reward, done=done
        ),
        "CHW float [0,1], one-hot, terminal": dict(
            observations=data.obs / 255.0, actions=hot, rewards=data.reward, terminal=done
        ),
        "float [-0.5,0.5], episode ids": dict(
            image=data.obs / 255.0 - 0.5, actions=data.action, episode=data.episode
        ),
        "[E, T] episodes": dict(
            obs=data.obs.reshape(e, n // e, *data.obs.shape[1:]),
            action=data.action.reshape(e, -1),
            reward=data.reward.reshape(e, -1),
        ),
        "DreamerV3 replay": dreamer_layout(data),
    }
    assert tuple(sources) == LAYOUTS
    return sources


LAYOUTS = (
    "HWC uint8, indices, done",
    "CHW float [0,1], one-hot, terminal",
    "float [-0.5,0.5], episode ids",
    "[E, T] episodes",
    "DreamerV3 replay",
)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_import_data_round_trips_each_layout(layout: str, boxing: TrajectoryData, tmp_path) -> None:
    src = tmp_path / "src.npz"
    np.savez(src, **layouts(boxing)[layout])
    out = import_data(src, tmp_path / "out.npz", env_id="ALE/Boxing-v5")
    got = TrajectoryData.load(out)
    np.testing.assert_array_equal(got.obs, boxing.obs)  # exact: uint8 -> float -> uint8
    np.testing.assert_array_equal(got.action, boxing.action)
    if "episode ids" not in layout:  # the one layout stored without rewards
        np.testing.assert_array_equal(got.reward, boxing.reward)
    assert got.num_episodes == boxing.num_episodes and got.env_id == "ALE/Boxing-v5"
    assert got.meta["imported_from"]["path"] == str(src)


def test_import_data_resizes_and_refuses_what_it_cannot_map(tmp_path: Path) -> None:
    src = tmp_path / "big.npz"
    frames = np.full((6, 96, 96, 3), 200, np.uint8)
    np.savez(src, obs=frames, action=np.arange(6) % 3, done=np.eye(1, 6, 2, dtype=bool)[0])
    got = TrajectoryData.load(import_data(src, tmp_path / "o.npz", env_id="ALE/Pong-v5"))
    assert got.obs.shape == (6, 3, 64, 64) and np.all(got.obs == 200)
    assert "resized to 64x64 with antialiased bilinear" in got.meta["imported_from"]["frames"]
    assert got.num_episodes == 2
    np.savez(tmp_path / "odd.npz", pixels=frames, act=np.zeros(6))
    with pytest.raises(DataError, match=r"no obs array .*keys found: \['act \(6,\)', 'pixels"):
        import_data(tmp_path / "odd.npz", tmp_path / "x.npz", env_id="e")
    np.savez(tmp_path / "hot.npz", obs=frames, action=np.full((6, 3), 0.5))
    with pytest.raises(DataError, match="not one-hot"):
        import_data(tmp_path / "hot.npz", tmp_path / "x.npz", env_id="e")
    np.savez(tmp_path / "short.npz", obs=frames, action=np.zeros(5, np.int64))
    with pytest.raises(DataError, match="'action' has 5 rows, frames have 6"):
        import_data(tmp_path / "short.npz", tmp_path / "x.npz", env_id="e")
    theirs = tmp_path / "theirs.npz"
    np.savez(theirs, anything=np.zeros(3))
    before = theirs.read_bytes()
    for force in (False, True):
        with pytest.raises(DataError, match="never overwritten"):
            import_data(src, theirs, env_id="e", overwrite=force)
    assert theirs.read_bytes() == before
