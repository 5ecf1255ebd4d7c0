"""Experience kept on the GPU, so that training batches are gathered there.

Without it, every training step gathers ``B x T`` uint8 frames on the host (12.6 MB for
the ``gpu`` profile's 16 x 64 windows), copies them into pinned memory and sends them:
host work of the same order as a whole STORM step on a fast GPU. With it, the frames of
the training split are uploaded once (1.2 GB for the ``gpu`` profile's 100k frames) and
each step sends only the ``B`` window starts; rows are indexed and converted to float on
the device.

The host still draws the window starts, from the same CPU generator as before, so the
batches (and a resumed run) are the same on either path. :func:`room_on_device` decides
whether the frames fit; when they do not, ``TrajectoryData.sample`` keeps the host path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .types import Batch

GiB = 1024**3
HEADROOM_BYTES = 2 * GiB
"""Device memory always left free for training (weights, activations, optimizer state)."""
HEADROOM_FRACTION = 0.25
"""...or this share of the device's memory, if that is more."""


def room_on_device(nbytes: int, device: torch.device) -> tuple[bool, str]:
    """Whether ``nbytes`` of experience fit on the CUDA ``device`` with the headroom left
    for training, and one line saying which path ``TrajectoryData.sample`` takes.

    Free memory is read with ``torch.cuda.mem_get_info`` (the driver's view, so other
    processes on the GPU count). The headroom is ``HEADROOM_BYTES`` or
    ``HEADROOM_FRACTION`` of the device, whichever is more.
    """
    free, total = torch.cuda.mem_get_info(device)
    headroom = max(HEADROOM_BYTES, int(HEADROOM_FRACTION * total))
    need = f"{nbytes / GiB:.2f} GB of training frames"
    have = f"{free / GiB:.1f} GB free on {device}, {headroom / GiB:.1f} GB kept for training"
    if nbytes + headroom <= free:
        return True, f"data: {need} kept on {device} ({have}); batches are gathered there"
    return False, (
        f"data: {need} do not fit ({have}); batches are gathered on the host and sent pinned"
    )


class DeviceExperience:
    """A split's arrays on one device, and batches gathered from them there.

    Args:
        arrays: ``obs`` uint8 ``[N, 3, S, S]``, ``action`` int64, ``reward`` and ``cont``
            float32 ``[N]`` (CPU tensors; copied to ``device`` once).
        device: where they are kept (CUDA in training; any device works, CPU in tests).

    Shapes:
        gather: starts ``[B]`` int64 (CPU) -> Batch of ``[B, T, ...]`` on ``device``.
    """

    def __init__(self, arrays: dict[str, Tensor], device: torch.device) -> None:
        self.device = device
        self.arrays = {k: v.to(device) for k, v in arrays.items()}
        self.nbytes = sum(v.numel() * v.element_size() for v in self.arrays.values())
        self._offsets: dict[int, Tensor] = {}  # T -> arange(T) on the device

    @staticmethod
    def size_of(arrays: dict[str, Tensor]) -> int:
        """Bytes that :class:`DeviceExperience` would take on a device."""
        return sum(v.numel() * v.element_size() for v in arrays.values())

    def gather(self, starts: Tensor, length: int) -> Batch:
        """The windows ``starts[i] .. starts[i] + length - 1``, indexed on the device.

        Only the ``B`` starts cross to the device (pinned, non-blocking: the host does
        not wait for the GPU). Frames become float32 in [0, 1] there.
        """
        if self.device.type == "cuda":
            starts = starts.pin_memory()
        starts = starts.to(self.device, non_blocking=True)
        if length not in self._offsets:
            self._offsets[length] = torch.arange(length, device=self.device)
        rows = starts[:, None] + self._offsets[length]  # [B, T]
        parts = {k: v[rows] for k, v in self.arrays.items()}  # uint8 obs [B, T, 3, S, S]
        obs = parts.pop("obs").float().div_(255.0)
        return Batch(obs=obs, **parts)
