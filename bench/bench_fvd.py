"""Seconds per clip of the FVD feature extractor (I3D at 224x224) on this machine.

Usage: ``python bench/bench_fvd.py [--frames 18] [--clips 16] [--batch-sizes 1 4 8]``.
Times ``storm_lib.fvd.i3d_features`` (resize + I3D forward) on random 64x64 clips, after
one warm-up batch. The model and its inputs are channels-last (``from_pretrained``), which
measured ~1.5-2x faster than channels-first on the 2-core CPU this was written on.
"""

from __future__ import annotations

import argparse

import torch

from storm_lib.fvd import I3D, i3d_features
from storm_lib.utils import median_ms, model_device


def _seconds_per_clip(model: I3D, clips: torch.Tensor, batch_size: int) -> float:
    i3d_features(model, clips[:batch_size], batch_size=batch_size, progress=False)  # warm-up
    ms = median_ms(  # the GPU synchronised around the timed call
        lambda: i3d_features(model, clips, batch_size=batch_size, progress=False),
        model_device(model), repeats=1, warmup=0,
    )  # fmt: skip
    return ms / 1000 / len(clips)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=18, help="frames per clip (C + H)")
    parser.add_argument("--clips", type=int, default=16, help="clips per timed run")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--device", default=None, help="default: CUDA when available")
    args = parser.parse_args()
    model = I3D.from_pretrained(device=args.device)
    clips = torch.rand(args.clips, args.frames, 3, 64, 64)
    device = model_device(model)
    print(f"I3D on {device} ({torch.get_num_threads()} threads), {args.frames}-frame clips")
    for batch_size in args.batch_sizes:
        print(f"batch {batch_size}: {_seconds_per_clip(model, clips, batch_size):.3f} s/clip")


if __name__ == "__main__":
    main()
