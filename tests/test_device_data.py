"""Training frames kept on the device (storm_lib.device_data), checked on a CPU: the
device path's batches equal the host path's, and the host path is kept when the frames
do not fit. ``tests/test_cuda.py`` repeats the first check on a real GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from storm_lib import data as data_module
from storm_lib import device_data
from storm_lib.data import TrajectoryData
from storm_lib.device_data import DeviceExperience, GiB, room_on_device

CUDA = torch.device("cuda")  # only a name here: no test below touches a GPU


def experience() -> TrajectoryData:
    rng = np.random.default_rng(0)
    n = 90
    return TrajectoryData.from_arrays(
        obs=rng.integers(0, 256, (n, 3, 64, 64), dtype=np.uint8),
        action=rng.integers(0, 4, n).astype(np.int64),
        reward=rng.normal(size=n).astype(np.float32),
        cont=(rng.random(n) > 0.1).astype(np.float32),
        episode=np.repeat(np.arange(3), 30).astype(np.int32),
    )


def free_memory(monkeypatch: pytest.MonkeyPatch, free_gib: float, total_gib: float) -> None:
    monkeypatch.setattr(
        torch.cuda, "mem_get_info", lambda device=None: (int(free_gib * GiB), int(total_gib * GiB))
    )


def test_device_batches_equal_host_batches(monkeypatch, capsys) -> None:
    """The device path (with the CPU standing in for the GPU) draws the same starts from
    the generator and gathers the same windows; the host gathers nothing."""
    data = experience()
    host = [data.sample(5, 8, g) for g in [torch.Generator().manual_seed(3)] for _ in range(4)]
    free_memory(monkeypatch, 70, 80)
    made: list[DeviceExperience] = []

    class OnCPU(DeviceExperience):
        def __init__(self, arrays, device):  # type: ignore[no-untyped-def]
            assert device == CUDA
            super().__init__(arrays, torch.device("cpu"))
            made.append(self)

    monkeypatch.setattr(data_module, "DeviceExperience", OnCPU)
    monkeypatch.setattr(TrajectoryData, "_gather", lambda *a: pytest.fail("gathered on the host"))
    g = torch.Generator().manual_seed(3)
    kept = [data.sample(5, 8, g, device="cuda") for _ in range(4)]
    assert len(made) == 1  # uploaded once, then reused
    for a, b in zip(host, kept, strict=True):
        for name in ("obs", "action", "reward", "cont"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and torch.equal(x, y), name
    line = capsys.readouterr().out
    assert line.count("data:") == 1 and "kept on cuda" in line and "gathered there" in line


def test_host_path_when_the_frames_do_not_fit(monkeypatch, capsys) -> None:
    data = experience()
    free_memory(monkeypatch, 1.5, 16)  # less than the 4 GiB headroom of a 16 GiB GPU
    assert data.device_copy(CUDA) is None and data.device_copy(CUDA) is None
    line = capsys.readouterr().out
    assert line.count("data:") == 1 and "do not fit" in line and "on the host" in line
    routed: list[torch.device] = []
    monkeypatch.setattr(TrajectoryData, "_gather", lambda self, s, n, device: routed.append(device))
    data.sample(2, 8, torch.Generator().manual_seed(0), device="cuda")
    assert routed == [CUDA]  # today's path: gathered on the host, sent pinned


def test_room_on_device_keeps_headroom(monkeypatch) -> None:
    free_memory(monkeypatch, 14.5, 15)  # a T4: 3.75 GiB kept (a quarter of 15)
    assert room_on_device(int(1.2 * GiB), CUDA)[0]
    assert not room_on_device(11 * GiB, CUDA)[0]
    free_memory(monkeypatch, 3.5, 4)  # a small GPU: the 2 GiB floor applies
    assert room_on_device(int(1.4 * GiB), CUDA)[0] and not room_on_device(2 * GiB, CUDA)[0]
    assert GiB <= device_data.HEADROOM_BYTES


def test_gather_matches_the_host_gather() -> None:
    data = experience()
    starts = torch.tensor([0, 7, 31, 60])
    kept = DeviceExperience(data._tensors, torch.device("cpu"))
    a, b = data._gather(starts, 10, None), kept.gather(starts, 10)
    assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("obs", "action", "cont"))
    assert kept.nbytes == DeviceExperience.size_of(data._tensors) == data.obs.nbytes + 90 * 16
    data.drop_device_copies()
