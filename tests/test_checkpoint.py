"""Checkpoints: round trip, atomic writes, and every kind of bad file."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from storm_lib import CheckpointError, build_world_model, get_profile, load_checkpoint
from storm_lib.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def storm():
    torch.manual_seed(0)
    return build_world_model("storm", get_profile("smoke"), 5, "cpu").eval()


def rollout(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = torch.rand(2, 4, 3, 64, 64, generator=g)
    act = torch.randint(0, 5, (2, 4), generator=g)
    return model.imagine(obs, act, torch.randint(0, 5, (2, 2), generator=g), mode="mode").obs


def test_round_trip_gives_identical_outputs(storm, tmp_path):
    path = save_checkpoint(tmp_path / "s.pt", storm, step=7)
    loaded = load_checkpoint(path, "cpu")
    assert type(loaded) is type(storm) and loaded.action_dim == 5
    assert torch.equal(rollout(storm), rollout(loaded))
    for (k, a), (_, b) in zip(storm.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"format": "storm_lib/1", "x": Evil()}))
    with pytest.raises(CheckpointError, match=r"evil\.pt"):
        load_checkpoint(path, "cpu")
    torch.save({"format": "storm_lib/1", "state_dict": Evil()}, tmp_path / "evil2.pt")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil2.pt", "cpu")
    assert not marker.exists()


@pytest.mark.parametrize(
    "content",
    [b"", b"not a checkpoint at all", os.urandom(4096)],
    ids=["empty", "text", "random"],
)
def test_garbage_files(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"bad\.pt"):
        load_checkpoint(path, "cpu")


def test_truncated_and_missing(storm, tmp_path):
    path = save_checkpoint(tmp_path / "s.pt", storm)
    data = path.read_bytes()
    for cut in (10, len(data) // 3, len(data) - 100):
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        with pytest.raises(CheckpointError):
            load_checkpoint(tmp_path / "cut.pt", "cpu")
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "missing.pt", "cpu")


def test_foreign_and_mismatched(storm, tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a storm_lib checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt", "cpu")
    path = save_checkpoint(tmp_path / "s.pt", storm)
    with pytest.raises(CheckpointError, match="expected RSSM"):
        load_checkpoint(path, "cpu", kind="rssm")
    with pytest.raises(CheckpointError, match="5 actions but the data has 9"):
        load_checkpoint(path, "cpu", action_dim=9)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"].pop(next(iter(payload["state_dict"])))
    payload["state_dict"]["extra.weight"] = torch.zeros(1)
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match=r"missing keys(.|\n)*unexpected keys: extra.weight"):
        load_checkpoint(tmp_path / "edited.pt", "cpu")


def test_non_finite_weights_are_not_saved(storm, tmp_path):
    path = save_checkpoint(tmp_path / "s.pt", storm, step=1)
    before = path.read_bytes()
    broken = build_world_model("storm", get_profile("smoke"), 5, "cpu")
    with torch.no_grad():
        next(broken.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        save_checkpoint(path, broken, step=2)
    assert path.read_bytes() == before


def test_killed_writer_leaves_previous_checkpoint_intact(storm, tmp_path):
    path = save_checkpoint(tmp_path / "s.pt", storm, step=1)
    before = path.read_bytes()
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        import storm_lib.checkpoint as ck
        from storm_lib import build_world_model, get_profile
        model = build_world_model("storm", get_profile("smoke"), 5, "cpu")
        real_save = torch.save
        def dying_save(obj, f):
            real_save(obj, f)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # dies mid-write, before the rename
        ck.torch.save = dying_save
        ck.save_checkpoint({str(path)!r}, model, step=2)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert path.read_bytes() == before
    assert load_checkpoint(path, "cpu").action_dim == 5


def test_checkpoints_from_before_the_prior_rename_still_load(storm, tmp_path):
    """STORM's prior head was the module ``dynamics``; such files load as ``prior``."""
    path = save_checkpoint(tmp_path / "old.pt", storm)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"] = {
        k.replace("prior.", "dynamics.", 1) if k.startswith("prior.") else k: v
        for k, v in payload["state_dict"].items()
    }
    assert any(k.startswith("dynamics.") for k in payload["state_dict"])
    torch.save(payload, path)
    back = load_checkpoint(path, "cpu", kind="storm")
    torch.testing.assert_close(rollout(back), rollout(storm))
