"""Configuration: one dataclass per component, and the named profiles.

Every number a module would otherwise hard-code lives here as a documented field.
``get_profile(name)`` returns a :class:`Config`; ``"auto"`` picks ``"gpu"`` when CUDA
is present and ``"cpu"`` otherwise. With no name given, the ``STORM_PROFILE``
environment variable chooses (default ``auto``).

Dimension glossary used across the library: B batch, T time, C context, H horizon,
K categoricals, V classes per categorical, D width, A actions.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

PROFILES = ("smoke", "cpu", "gpu", "paper")


@dataclass
class DataConfig:
    """Atari data collection and windowing."""

    env_id: str = "ALE/Boxing-v5"
    """Any ALE id; Boxing has large moving sprites that PSNR can see."""
    steps: int = 30_000
    """Agent steps (each = ``frameskip`` emulator frames) collected with a random policy."""
    seed: int = 0
    """Seed of the environment and of the random policy."""
    image_size: int = 64
    """Frames are resized to ``image_size x image_size`` RGB."""
    frameskip: int = 4
    """Emulator frames per agent step; the last two are max-pooled (paper table 10)."""
    sticky_prob: float = 0.25
    """Probability of repeating the previous action (the ALE v5 default)."""
    max_episode_steps: int = 27_000
    """Agent steps after which an episode is truncated (108k emulator frames)."""
    val_fraction: float = 0.1
    """Share of whole episodes held out for validation and evaluation."""


@dataclass
class VAEConfig:
    """Categorical VAE (paper tables 3 and 4)."""

    stem_channels: int = 32
    """Channels of the first conv; each further stage doubles them (paper: 32)."""
    stages: int = 4
    """Stride-2 conv stages; 64 px / 2**4 = a 4x4 final feature map."""
    categoricals: int = 32
    """K: categorical variables per frame."""
    classes: int = 32
    """V: classes per categorical variable."""
    unimix: float = 0.01
    """Share of the uniform distribution mixed into every categorical (1%)."""
    batch_norm: bool = True
    """BatchNorm after each conv, as in the paper's tables 3-4."""


@dataclass
class TransformerConfig:
    """Action mixer and causal Transformer (paper tables 5-8)."""

    width: int = 512
    """D: token and hidden width (paper: 512)."""
    layers: int = 2
    """Transformer blocks (paper: 2)."""
    heads: int = 8
    """Attention heads (paper: 8)."""
    dropout: float = 0.1
    """Dropout after attention and FFN projections (paper: 0.1)."""
    ffn_mult: int = 2
    """FFN hidden width = ffn_mult * D (paper table 7: 2D)."""
    max_length: int = 64
    """Positions in the learned positional table, in time steps; also the KV cache size."""
    token_layout: Literal["fused", "interleaved"] = "fused"
    """``fused``: one token per step, mix(z_t, a_t) (STORM). ``interleaved``: z_t and
    a_t are separate tokens (the P04 text); the next latent is read at the action token."""


@dataclass
class HeadsConfig:
    """Reward, continuation and dynamics heads (paper table 9) and reward bins."""

    mlp_layers: int = 3
    """Linear layers of the reward and continuation MLPs (paper: 3, hidden D)."""
    reward_bins: int = 255
    """Buckets of the symlog two-hot reward distribution."""
    reward_low: float = -20.0
    """Lowest bin, in symlog space."""
    reward_high: float = 20.0
    """Highest bin, in symlog space."""
    dynamics_head: Literal["mlp", "maskgit"] = "mlp"
    """Prior over ``z_{t+1}`` given ``h_t``: ``mlp`` (STORM: one Linear to K x V logits)
    or ``maskgit`` (GIT-STORM: a bidirectional Transformer over the K masked tokens,
    sized by :class:`MaskGITConfig`)."""


@dataclass
class MaskGITConfig:
    """MaskGIT dynamics prior of GIT-STORM (the GIT-STORM paper, section 3.2 and table 8).

    Used only when ``heads.dynamics_head == "maskgit"``.
    """

    layers: int = 4
    """Bidirectional Transformer blocks (paper: 4)."""
    width: int = 128
    """Width of the token embeddings and of the blocks (paper: 128)."""
    heads: int = 8
    """Attention heads (paper: 8)."""
    dropout: float = 0.0
    """Dropout inside the blocks (paper: 0.0)."""
    ffn_mult: int = 4
    """FFN hidden width = ffn_mult * width (not in the paper; the BERT/MaskGIT default 4)."""
    draft_rounds: int = 1
    """T_draft: sets of the draft partition, i.e. decoding passes that fill the K tokens
    from all-masked (paper: 1)."""
    revise_rounds: int = 1
    """T_revise: sets of each revise partition (paper: 1)."""
    revise_repeats: int = 1
    """Gamma (the paper's M, "Repetitions"): how many times the revise phase runs (1)."""


@dataclass
class LossConfig:
    """World-model loss weights (paper eq. 3-5); shared by STORM and the RSSM."""

    dyn_scale: float = 0.5
    """beta_1, weight of the dynamics KL."""
    rep_scale: float = 0.1
    """beta_2, weight of the representation KL."""
    free_bits: float = 1.0
    """KL terms are max(free_bits, batch-mean KL) in nats (STORM's clamp)."""


@dataclass
class RSSMConfig:
    """DreamerV3-style RSSM baseline (P03)."""

    deter: int = 512
    """Width of the GRU deterministic state."""
    hidden: int = 512
    """Width of the MLPs around the GRU and of the reward/continuation heads."""


@dataclass
class TrainConfig:
    """The one training loop, for either world model."""

    steps: int = 100_000
    """Gradient steps."""
    batch_size: int = 16
    """B1: windows per batch (paper: 16)."""
    seq_len: int = 64
    """T: steps per window (paper: 64). Keep >= context + horizon of evaluation."""
    lr: float = 1e-4
    """Adam learning rate (paper: 1e-4); the peak of ``lr_schedule``."""
    warmup_steps: int = 0
    """Steps of linear warm-up from ``lr / warmup_steps`` to ``lr`` (0: none; paper: none)."""
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Decay after warm-up over the rest of the run: ``constant`` keeps ``lr`` (paper);
    ``cosine`` and ``linear`` end at ``lr * final_lr_fraction`` at the last step."""
    final_lr_fraction: float = 0.1
    """The decayed lr at the last step, as a share of ``lr`` (``cosine``/``linear`` only)."""
    grad_clip: float = 1000.0
    """Max global gradient norm (paper: 1000)."""
    eval_every: int = 500
    """Validation every this many steps (and at the end)."""
    val_batches: int = 4
    """Fixed validation windows = val_batches * batch_size."""
    checkpoint_every: int = 1000
    """Periodic checkpoint interval in steps (0: only the final one)."""
    seed: int = 0
    """Seed of initialisation and batch sampling."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Autocast policy of ``fit()``: ``auto`` = bf16 on CUDA compute capability >= 8.0,
    fp16 with a GradScaler below it (T4, V100), fp32 on CPU (``utils.autocast_dtype``)."""
    compile: bool = False
    """Run ``model.loss`` through ``torch.compile`` in ``fit()`` (needs a C++ compiler).
    Off by default: on a 2-core CPU compiling takes minutes and the steps are no faster
    (README, "Benchmarks")."""
    deterministic: bool = False
    """Deterministic mode on CUDA (``utils.configure_device``): cuDNN autotuning off,
    ``torch.use_deterministic_algorithms(True)`` and ``CUBLAS_WORKSPACE_CONFIG=:4096:8``,
    so a run (and a resumed one) repeats bit for bit, at some speed. Off by default; a
    CPU run repeats bit for bit either way (at the same thread count). How a run is
    computed, not what: checkpoints resume across this switch."""
    cuda_graphs: bool = True
    """On CUDA, ``fit()`` captures the forward and backward of its fixed-shape training step
    as one CUDA graph and replays it every step (``storm_lib.graphs``); clipping and Adam
    stay eager. On by default because both models, the RSSM's per-step GRU loop most,
    launch thousands of small kernels per step, which a graph replays for the cost of
    one launch. It is checked against the eager step once at start-up, and any failure
    there runs the plain step instead (said once). Ignored on CPU and with ``compile``."""


@dataclass
class EvalConfig:
    """The evaluation protocol of Section 4."""

    context: int = 8
    """C: real frames given before imagining."""
    horizon: int = 10
    """H: imagined frames scored against the real ones."""
    count: int = 256
    """Held-out windows scored (the same for every model)."""
    seed: int = 1234
    """Seed that fixes the evaluation windows and the sampling noise."""
    batch_size: int = 64
    """Windows per forward pass during evaluation."""
    psnr_cap: float = 100.0
    """PSNR given to a frame identical to its target (instead of inf)."""
    sliding_windows: tuple[int, ...] = (20, 50)
    """Context lengths of the sliding-window token-loss diagnostic."""
    compare_priors: bool = True
    """Whether the notebook runs its appendix (MLP prior vs MaskGIT prior, trained on the
    same data for the same steps); when off it prints the CLI command instead."""
    fvd_count: int = 256
    """Clips (held-out windows of C + H frames) per FVD; 0 skips FVD. The I3D costs about
    0.7 s per 18-frame clip on a 2-core CPU, and 3 clip sets are embedded (real + 2 models)."""


@dataclass
class Config:
    """All components of one profile."""

    name: str = "paper"
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    maskgit: MaskGITConfig = field(default_factory=MaskGITConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    rssm: RSSMConfig = field(default_factory=RSSMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (ints, floats, strings, lists) for checkpoints."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Config:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        if not isinstance(raw, dict):
            raise ValueError(f"config must be a dict, got {type(raw).__name__}")
        parts: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in raw:
                continue
            value = raw[f.name]
            if f.name == "name":
                parts["name"] = str(value)
                continue
            sub_cls = type(getattr(cls(), f.name))
            known = {g.name for g in dataclasses.fields(sub_cls)}
            if not isinstance(value, dict) or set(value) - known:
                extra = set(value) - known if isinstance(value, dict) else value
                raise ValueError(f"config section {f.name!r} has unknown entries: {extra}")
            if "sliding_windows" in value:
                value = {**value, "sliding_windows": tuple(value["sliding_windows"])}
            parts[f.name] = sub_cls(**value)
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"config has unknown sections: {sorted(unknown)}")
        return cls(**parts)


def _smoke() -> Config:
    """Seconds on a CPU: tiny networks, a few hundred frames. For CI only."""
    c = Config(name="smoke")
    c.data.steps = 600
    c.data.max_episode_steps = 200
    c.data.val_fraction = 0.34
    c.vae.stem_channels = 8
    c.transformer = TransformerConfig(width=32, layers=1, heads=2, max_length=64)
    c.rssm = RSSMConfig(deter=32, hidden=32)
    c.train = TrainConfig(
        steps=6,
        batch_size=4,
        seq_len=20,
        lr=1e-3,
        eval_every=3,
        val_batches=1,
        checkpoint_every=0,
    )
    c.maskgit = MaskGITConfig(layers=1, width=32, heads=2)
    c.eval = EvalConfig(count=8, batch_size=8, fvd_count=4)
    return c


def _cpu() -> Config:
    """The committed notebook run on a 2-core CPU.

    Training compute: 880k frame passes per model (5500 steps of 8 windows x 20 steps),
    under the course's 960k. Within that budget the quality study
    (``bench/quality_study.py``, ``docs/quality_study.md``) found more, smaller steps
    better than fewer, larger ones, a warm-up with cosine decay from 2e-3 (the paper's
    constant 1e-4 assumes ~100k steps), and more steps better than the paper's 32-channel
    VAE stem at equal wall clock. Where the CPU has native bf16, ``precision="auto"``
    trains in bf16 autocast, which trains as well as fp32 (``docs/precision.md``); 5500
    steps rather than 4500 spend that saving while keeping the notebook no slower than the
    4500-step fp32 run on CPUs where the RSSM gains least from bf16.
    """
    c = Config(name="cpu")
    c.data.steps = 30_000
    c.vae.stem_channels = 16
    c.transformer = TransformerConfig(width=128, layers=2, heads=4, max_length=64)
    c.rssm = RSSMConfig(deter=256, hidden=256)
    c.train = TrainConfig(
        steps=5500,
        batch_size=8,
        seq_len=20,
        lr=2e-3,
        warmup_steps=200,
        lr_schedule="cosine",
        final_lr_fraction=0.05,
        eval_every=200,
        val_batches=4,
        checkpoint_every=1000,
    )
    c.eval = EvalConfig(count=256, fvd_count=64, compare_priors=False)
    return c


def _gpu() -> Config:
    """One consumer GPU in about an hour: the P04 Transformer size, paper VAE."""
    c = Config(name="gpu")
    c.data.steps = 100_000
    c.transformer = TransformerConfig(width=128, layers=2, heads=4, max_length=64)
    c.rssm = RSSMConfig(deter=512, hidden=512)
    c.train = TrainConfig(steps=20_000, lr=3e-4, eval_every=500, checkpoint_every=2000)
    c.eval = EvalConfig(count=512, compare_priors=False)  # the appendix: COMPARE_PRIORS=1
    return c


def _paper() -> Config:
    """STORM's own sizes (appendix tables 3-10). For GPUs."""
    return Config(name="paper")


_BUILDERS = {"smoke": _smoke, "cpu": _cpu, "gpu": _gpu, "paper": _paper}


def resolve_profile_name(name: str | None = None) -> str:
    """The profile to use: ``name``, else ``STORM_PROFILE``, else ``auto``; ``auto`` resolved."""
    chosen = name or os.environ.get("STORM_PROFILE") or "auto"
    chosen = chosen.strip().lower()
    if chosen == "auto":
        chosen = "gpu" if torch.cuda.is_available() else "cpu"
    if chosen not in _BUILDERS:
        raise ValueError(f"unknown profile {chosen!r}; choose one of {', '.join(PROFILES)} or auto")
    return chosen


def get_profile(name: str | None = None) -> Config:
    """A fresh :class:`Config` for ``name`` (smoke, cpu, gpu, paper, auto).

    With ``name=None`` the ``STORM_PROFILE`` environment variable decides.
    """
    return _BUILDERS[resolve_profile_name(name)]()
