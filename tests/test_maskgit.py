"""MaskGIT dynamics prior (storm_lib.models.maskgit) and token perplexity (GIT-STORM)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from storm_lib.checkpoint import load_checkpoint, save_checkpoint
from storm_lib.config import Config, MaskGITConfig, get_profile
from storm_lib.diagnostics import perplexity, token_perplexity
from storm_lib.models.maskgit import MaskGITPrior, cosine_mask, random_partition
from storm_lib.models.storm import STORMWorldModel
from storm_lib.types import Batch

A, K, V, D = 5, 8, 6, 16  # actions; head-only tests use a small K x V


def head(draft: int = 1, revise: int = 1, repeats: int = 1, seed: int = 0) -> MaskGITPrior:
    torch.manual_seed(seed)
    cfg = MaskGITConfig(
        layers=1, width=16, heads=2, draft_rounds=draft, revise_rounds=revise,
        revise_repeats=repeats,
    )  # fmt: skip
    return MaskGITPrior(D, K, V, 0.01, cfg)


def model_config(draft: int = 1, revise: int = 1, layout: str = "fused") -> Config:
    cfg = get_profile("smoke")
    cfg.heads.dynamics_head = "maskgit"
    cfg.maskgit.draft_rounds, cfg.maskgit.revise_rounds = draft, revise
    cfg.transformer.max_length = 12
    cfg.transformer.token_layout = layout
    return cfg


def make_batch(b: int = 2, t: int = 8, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        obs=torch.rand(b, t, 3, 64, 64, generator=g),
        action=torch.randint(0, A, (b, t), generator=g),
        reward=torch.randn(b, t, generator=g),
        cont=torch.ones(b, t),
    )


def test_cosine_mask_schedule() -> None:
    torch.manual_seed(0)
    mask = cosine_mask((20_000, 32))
    count = mask.sum(-1).float()
    assert count.min() >= 1 and count.max() == 32
    # E[ceil(32 cos(pi r / 2))] / 32 is about 2/pi + 1/64 for r ~ U[0, 1)
    assert abs(count.mean().item() / 32 - (2 / math.pi + 1 / 64)) < 0.01
    assert abs((count == 32).float().mean().item() - 2 / math.pi * math.acos(31 / 32)) < 0.01


def test_random_partition_is_a_partition() -> None:
    torch.manual_seed(0)
    groups = random_partition(50, 32, 3)
    assert groups.shape == (50, 32) and groups.min() == 0 and groups.max() == 2
    sizes = torch.stack([(groups == i).sum(-1) for i in range(3)], -1)
    assert ((sizes == 10) | (sizes == 11)).all() and (sizes.sum(-1) == 32).all()
    assert (groups[0] != groups[1]).any()  # random, not a fixed split
    with pytest.raises(ValueError, match="sets"):
        random_partition(2, 4, 5)


def test_only_masked_positions_enter_the_loss() -> None:
    net = head()
    h = torch.randn(2, 3, D)
    post = torch.randn(2, 3, K, V).log_softmax(-1).requires_grad_()
    z = F.one_hot(torch.randint(0, V, (2, 3, K)), V).float()
    mask = torch.zeros(2, 3, K, dtype=torch.bool)
    mask[..., :3] = True
    mask[0, 0, 5] = True  # frames with different numbers of masked positions
    out = net.losses(h, post, z, free_bits=0.0, mask=mask)
    out.rep.backward()
    grad = post.grad.abs().sum(-1)  # [2, 3, K]
    assert (grad[~mask] == 0).all() and (grad[mask] > 0).all()
    # the posterior at unmasked positions does not change any term
    other = post.detach().clone()
    other[~mask] = torch.randn(int((~mask).sum()), V).log_softmax(-1)
    again = net.losses(h, other, z, free_bits=0.0, mask=mask)
    for a, b in zip(out, again, strict=True):
        torch.testing.assert_close(a.detach(), b.detach())
    # token_nll: K x the mean over masked positions of -log prior(z), per frame
    tokens = z.argmax(-1).masked_fill(mask, V)
    prior = net.log_probs(h.reshape(-1, D), tokens.reshape(-1, K)).reshape(2, 3, K, V)
    nll = -(z * prior).sum(-1)
    want = torch.stack([K * nll[i, j][mask[i, j]].mean() for i in range(2) for j in range(3)])
    torch.testing.assert_close(out.token_nll, want.mean())
    # with every position masked the number differs (the mask really is used)
    full = net.losses(h, post, z, free_bits=0.0, mask=torch.ones_like(mask))
    assert abs(full.token_nll.item() - out.token_nll.item()) > 1e-4


def test_decoding_fills_every_position_and_respects_the_partition() -> None:
    net = head().eval()
    seen: list[torch.Tensor] = []
    original = net.log_probs

    def spy(h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        seen.append(tokens.clone())
        return original(h, tokens)

    net.log_probs = spy  # type: ignore[method-assign]
    h = torch.randn(4, D)
    torch.manual_seed(1)
    groups = random_partition(4, K, 3)
    empty = torch.full((4, K), V)
    with torch.no_grad():
        drafted = net.fill(h, empty, groups, "sample")
    assert len(seen) == 3
    assert (drafted != V).all() and drafted.max() < V  # every position filled with a class
    for i, inp in enumerate(seen):  # pass i: set i and the sets not yet drawn are masked
        assert torch.equal(inp == V, groups >= i)
    seen.clear()
    groups = random_partition(4, K, 2)
    with torch.no_grad():
        revised = net.fill(h, drafted, groups, "sample")
    assert torch.equal(seen[0] == V, groups == 0) and torch.equal(seen[1] == V, groups == 1)
    keep = groups == 1
    assert torch.equal(seen[1][~keep], revised[~keep])  # pass 1 changes only set 1
    assert torch.equal(seen[0][keep], drafted[keep])  # pass 0 left set 1 alone
    # Algorithm 1 runs draft_rounds + revise_repeats * revise_rounds passes
    seen.clear()
    net.cfg = MaskGITConfig(layers=1, width=16, heads=2, draft_rounds=4, revise_rounds=2)
    with torch.no_grad():
        z = net.sample(torch.randn(3, 2, D))
    assert len(seen) == 4 + 2 and z.shape == (3, 2, K, V)
    assert (z.sum(-1) == 1).all() and ((z == 0) | (z == 1)).all()


def test_shapes_and_determinism_under_seed() -> None:
    torch.manual_seed(0)
    model = STORMWorldModel(model_config(draft=2, revise=2), A)
    assert isinstance(model.prior, MaskGITPrior)
    batch = make_batch()
    torch.manual_seed(3)
    total, metrics = model.loss(batch)
    assert total.shape == () and total.requires_grad
    assert {"loss/dyn", "loss/rep", "kl/dyn_raw", "token_nll"} <= set(metrics)
    total.backward()
    assert model.prior.codebook.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.transformer.parameters())  # via h_t
    assert model.embed.net[0].weight.grad.abs().sum() > 0
    assert model.vae.encoder.to_logits.weight.grad.abs().sum() > 0
    torch.manual_seed(3)
    _, again = model.loss(batch)
    assert all(torch.equal(again[k], metrics[k]) for k in metrics)
    args = (batch.obs[:, :3], batch.action[:, :3], batch.action[:, 3:7])
    rolls = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        rolls.append(model.imagine(*args))
    assert rolls[0].obs.shape == (2, 5, 3, 64, 64) and rolls[0].reward.shape == (2, 5)
    assert torch.equal(rolls[0].obs, rolls[1].obs)
    assert (rolls[0].obs - rolls[2].obs).abs().max() > 1e-3
    assert model.token_nll_per_step(batch.obs, batch.action).shape == (2, 7)
    assert model.predict_one_step(batch.obs, batch.action).shape == (2, 7, 3, 64, 64)


@pytest.mark.parametrize("layout", ["fused", "interleaved"])
@pytest.mark.parametrize("mode", ["mode", "sample"])
def test_cached_imagination_equals_full_forward(layout: str, mode: str) -> None:
    torch.manual_seed(0)
    model = STORMWorldModel(model_config(draft=2, revise=2, layout=layout), A).eval()
    batch = make_batch(b=3, t=12)
    args = (batch.obs[:, :4], batch.action[:, :4], batch.action[:, 4:11])
    torch.manual_seed(7)
    fast = model.imagine(*args, mode=mode)
    torch.manual_seed(7)
    slow = model.imagine(*args, mode=mode, use_cache=False)
    for a, b in ((fast.obs, slow.obs), (fast.reward, slow.reward), (fast.cont, slow.cont)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_perplexity_of_known_distributions() -> None:
    assert perplexity(K * math.log(V), K) == pytest.approx(V)
    assert perplexity([K * math.log(2.0)] * 3, K) == pytest.approx(2.0)
    batch = make_batch(b=3, t=6)
    for kind in ("mlp", "maskgit"):
        cfg = model_config()
        cfg.heads.dynamics_head = kind
        model = STORMWorldModel(cfg, A)
        out = token_perplexity(model, batch, length=6)
        assert out["perplexity"] > 1.0 and out["windows"] == 3
        with torch.no_grad():  # a prior with constant logits is uniform over V
            if kind == "mlp":
                model.prior.linear.weight.zero_()
                model.prior.linear.bias.zero_()
            else:
                model.prior.codebook.weight.zero_()
        out = token_perplexity(model, batch, length=6)
        assert out["perplexity"] == pytest.approx(model.classes, rel=1e-4)
        assert out["token_nll"] == pytest.approx(
            model.categoricals * math.log(model.classes), rel=1e-4
        )
    with pytest.raises(ValueError, match="not measurable"):
        token_perplexity(model, batch, length=7)


def test_old_configs_load_and_maskgit_checkpoints_round_trip(tmp_path) -> None:
    raw = get_profile("smoke").to_dict()
    del raw["maskgit"], raw["heads"]["dynamics_head"], raw["eval"]["compare_priors"]
    old = Config.from_dict(raw)  # a checkpoint written before the MaskGIT head existed
    assert old.heads.dynamics_head == "mlp" and old.maskgit == MaskGITConfig()
    torch.manual_seed(0)
    model = STORMWorldModel(model_config(), A)
    path = tmp_path / "maskgit.pt"
    save_checkpoint(path, model)
    back = load_checkpoint(path, "cpu")
    assert isinstance(back.prior, MaskGITPrior)
    batch = make_batch()
    torch.testing.assert_close(
        back.token_nll_per_step(batch.obs, batch.action),
        model.token_nll_per_step(batch.obs, batch.action),
    )
    # an MLP-prior run is the same run whatever the (unused) MaskGIT sizes
    from storm_lib.workflow import _training_fields

    changed = Config.from_dict(raw)
    changed.maskgit.layers = 2
    assert _training_fields(changed) == _training_fields(old)
    changed.heads.dynamics_head = "maskgit"
    assert _training_fields(changed) != _training_fields(old)
    with pytest.raises(ValueError, match="dynamics_head"):
        cfg = get_profile("smoke")
        cfg.heads.dynamics_head = "gru"  # type: ignore[assignment]
        STORMWorldModel(cfg, A)


def test_maskgit_head_uses_the_unmasked_tokens() -> None:
    """Frames whose K tokens all share one random class: the all-masked prior can only be
    uniform, but given one unmasked token the head should predict the rest."""
    net = head()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    h = torch.zeros(64, 1, D)
    for _ in range(100):
        z = F.one_hot(torch.randint(0, V, (64, 1)).expand(64, K), V).float()[:, None]
        opt.zero_grad()
        tokens = z.argmax(-1).masked_fill(cosine_mask((64, 1, K)), V)
        prior = net.log_probs(h.reshape(-1, D), tokens.reshape(-1, K))
        loss = -(z.reshape(-1, K, V) * prior).sum(-1).mean()
        loss.backward()
        opt.step()
    z = F.one_hot(torch.randint(0, V, (64,)).expand(K, 64).t(), V).float()
    one_left = torch.ones(64, K, dtype=torch.bool)
    one_left[:, 0] = False
    with torch.no_grad():
        nll_all = -(z * net(h[:, 0])).sum(-1).mean()
        nll_one = -(z * net.log_probs(h[:, 0], z.argmax(-1).masked_fill(one_left, V))).sum(-1)
    assert nll_all > 0.9 * math.log(V)
    assert nll_one.mean() < 0.3 * math.log(V)


def test_prior_comparison_table_plot_and_cli() -> None:
    import numpy as np
    from matplotlib.figure import Figure

    from storm_lib.__main__ import build_parser
    from storm_lib.compare import PriorComparison
    from storm_lib.evaluate import RolloutPSNR, StepStats
    from storm_lib.plots import plot_prior_comparison

    stats = StepStats.from_values(np.full((4, 3), 20.0) + np.arange(4)[:, None])
    names = ("MLP prior", "MaskGIT prior")
    per_model = dict.fromkeys(names, stats)
    result = RolloutPSNR(per_model, per_model, {"copy-last": stats}, {}, 8, 3, 0, "sample")
    keys = ("perplexity", "token_nll", "val_token_nll", "ms_train_step",
            "ms_train_step_history", "ms_rollout", "steps", "params_prior")  # fmt: skip
    metrics = {n: dict.fromkeys(keys, float(i + 1)) for i, n in enumerate(names)}
    comparison = PriorComparison(psnr=result, metrics=metrics, profile="smoke")
    text = comparison.table()
    assert "MaskGIT prior" in text and "perplexity" in text and "21.50" in text
    assert isinstance(plot_prior_comparison(comparison), Figure)
    args = build_parser().parse_args(
        ["compare-priors", "--profile", "smoke", "--mlp", "a.pt", "--maskgit", "b.pt"]
    )
    assert (args.mlp, args.maskgit, args.out) == ("a.pt", "b.pt", "figures")
    args = build_parser().parse_args(["train", "--model", "storm", "--dynamics-head", "maskgit"])
    assert args.dynamics_head == "maskgit"
