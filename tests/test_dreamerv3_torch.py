"""Grading a student whose P03 is NM512/dreamerv3-torch (issue 27).

``tests/dreamerv3_standin/`` is a checkout written here with that code base's interface:
its file and module names, ``configs.yaml`` blocks, state-dict names and shapes, dict
encoder, ``[B, T, F]`` decoder of distributions, ``obs_step``/``img_step(sample=)``, its
replay directory and the nesting and prefixes of ``latest.pt``. The student trains it with
their own sizes for two steps of its own ``_train`` on real Boxing frames, and saves as
``dreamer.py`` does; the instructor grades it with the README's three-line loader.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from storm_lib import __main__ as cli
from storm_lib.checkpoint import CheckpointError
from storm_lib.data import TrajectoryData
from storm_lib.evaluate import rollout_psnr
from storm_lib.outside import (
    DreamerAdapter,
    OutsideModel,
    OutsideModelError,
    dreamerv3_torch,
    load_outside_model,
    unwrap_weights,
)
from storm_lib.presets import build_world_model, checkout_on_path, config_from_checkout, read_yaml
from storm_lib.report import gap_decomposition

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dreamer_replay import STANDIN, dreamer_episodes

ROOT = Path(__file__).resolve().parents[1]
SIZES = dict(dyn_deter=32, dyn_hidden=32, units=32, encoder={"cnn_depth": 4},
             decoder={"cnn_depth": 4})  # fmt: skip
"""The student's own flags (``dreamer.py --dyn_deter 32 ...``); configs.yaml says 512s."""
LOADER = """
from storm_lib.outside import dreamerv3_torch
def load(weights, device):
    return dreamerv3_torch({checkout!r}, weights, device, configs=["atari100k"])
"""


def train_student(root: Path, episodes: dict, logdir: Path, **flags) -> Path:
    """The student's run: build their agent with their flags, two steps of their own
    ``_train``, then ``latest.pt`` as dreamer.py writes it."""
    with checkout_on_path(root):
        import dreamer
        import tools

        tools.save_episodes(logdir / "train_eps", episodes)
        config = dreamer.make_config(["atari100k"], device="cpu", num_actions=18, **flags)
        torch.manual_seed(0)
        agent = dreamer.Dreamer(config)
        ep = next(iter(episodes.values()))
        batch = {k: np.stack([v[:16], v[16:32]]) for k, v in ep.items()}
        for _ in range(2):
            agent._wm._train(batch)
        return dreamer.save_latest(agent, logdir)


@pytest.fixture(scope="module")
def boxing(boxing_file: Path) -> TrajectoryData:
    return TrajectoryData.load(boxing_file)


@pytest.fixture(scope="module")
def student(boxing: TrajectoryData, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """What the student hands in: checkout, logdir (train_eps/, latest.pt)."""
    folder = tmp_path_factory.mktemp("student")
    checkout = folder / "dreamerv3-torch"
    shutil.copytree(STANDIN, checkout)
    latest = train_student(checkout, dreamer_episodes(boxing), folder / "logdir", **SIZES)
    loader = folder / "grade_student.py"
    loader.write_text(LOADER.format(checkout=str(checkout)))
    return {"checkout": checkout, "logdir": folder / "logdir", "latest": latest,
            "loader": loader}  # fmt: skip


def windows(n: int = 3, context: int = 8, horizon: int = 10) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    obs = torch.rand(n, context, 3, 64, 64, generator=g)
    act = torch.randint(0, 18, (n, context), generator=g)
    return obs, act, torch.randint(0, 18, (n, horizon - 1), generator=g)


# ------------------------------------------------------------------ weights
def test_unwrap_weights_takes_every_way_students_save(student: dict[str, Path], capsys) -> None:
    latest = torch.load(student["latest"], weights_only=True)
    agent = latest["agent_state_dict"]
    assert any(k.startswith("_wm._orig_mod.") for k in agent)  # compile: True, as by default
    assert any(k.startswith("_task_behavior._orig_mod._world_model.") for k in agent)
    wm = {k.removeprefix("_wm._orig_mod."): v for k, v in agent.items() if k.startswith("_wm.")}
    for saved in (latest, agent, {f"_orig_mod.{k}": v for k, v in wm.items()}, wm):
        got = unwrap_weights(saved)
        assert got.keys() == wm.keys() and all(torch.equal(got[k], wm[k]) for k in wm)
    got = unwrap_weights(latest)
    assert got.dropped == {"_task_behavior": got.dropped["_task_behavior"],
                           "_expl_behavior": got.dropped["_expl_behavior"]}  # fmt: skip
    assert sum(got.dropped.values()) == len(agent) - len(wm)
    said = capsys.readouterr().out
    assert "took 'agent_state_dict' (beside ['optims_state_dict'])" in said
    assert "stripped torch.compile's '_orig_mod.'" in said and "_expl_behavior (" in said
    with pytest.raises(CheckpointError, match="not a state dict"):
        unwrap_weights({"agent_state_dict": {"_wm.x": [1, 2]}})


# ------------------------------------------------------------------ the preset
def test_three_line_loader_builds_the_students_model_from_their_checkout(
    student: dict[str, Path], capsys
) -> None:
    before = (list(sys.path), {n: sys.modules.get(n) for n in ("models", "networks", "tools")})
    model = load_outside_model(f"{student['loader']}:load", student["latest"], "cpu",
                               action_dim=18)  # fmt: skip
    said = capsys.readouterr().out
    assert (list(sys.path), {n: sys.modules.get(n) for n in before[1]}) == before  # clean
    assert "dyn_deter=32 (configs: 512)" in said and "encoder.cnn_depth=4 (configs: 32)" in said
    assert "num_actions=18" in said
    adapter = model.model
    assert adapter.config.device == "cpu" and adapter.config.dyn_deter == 32
    assert adapter.config.model_lr == 1e-4  # configs.yaml's 1e-4 read as YAML 1.2 (a float)
    assert model.device == torch.device("cpu") and model.follows_mode
    assert model.check_pairing() == ["18 actions", "64 px frames"]
    obs, act, future = windows()
    kept = obs.clone()
    with torch.inference_mode():
        runs = []
        for seed in (1, 2):  # argmax rows must not depend on the RNG
            torch.manual_seed(seed)
            runs += [model.imagine(obs, act, future, mode="mode").obs,
                     model.imagine(obs, act, future, mode="sample").obs]  # fmt: skip
        recon = model.reconstruct(obs, act, mode="mode")
    assert torch.equal(obs, kept)  # its encoder shifts its input in place: not ours
    assert torch.equal(runs[0], runs[2]) and not torch.equal(runs[1], runs[3])
    assert runs[0].shape == (3, 10, 3, 64, 64) and recon.shape == obs.shape
    assert float(runs[0].min()) >= 0.0 and float(runs[0].max()) <= 1.0
    assert model.clip_stats is adapter.clip_stats and model.clip_stats.values > 0
    assert "decoded pixel values to [0, 1]; the raw frames spanned" in str(model.clip_stats)


def test_the_students_own_sizes_are_taken_checked_or_asked_for(
    student: dict[str, Path], boxing: TrajectoryData, tmp_path: Path
) -> None:
    weights = torch.load(student["latest"], weights_only=True)
    ok = dreamerv3_torch(student["checkout"], weights, "cpu", ["atari100k"], quiet=True, **SIZES)
    assert ok.world_model.dynamics._deter == 32
    said = r"dyn_deter=64 was given, but the weights have dyn_deter=32 \(dynamics\._cell\.layers"
    with pytest.raises(OutsideModelError, match=said + r"\.GRU_linear\.weight \[96, "):
        dreamerv3_torch(student["checkout"], weights, "cpu", quiet=True, dyn_deter=64)
    with pytest.raises(OutsideModelError, match=r"dyn_detr= names no setting .*dyn_deter"):
        dreamerv3_torch(student["checkout"], weights, "cpu", quiet=True, dyn_detr=32)
    with pytest.raises(OutsideModelError, match=r"no block \['atari'\] \(it has \['atari100k"):
        dreamerv3_torch(student["checkout"], weights, "cpu", ["atari"], quiet=True)
    # a student who also changed the latent: 8 x 6 instead of 32 x 32
    episodes = dict([next(iter(dreamer_episodes(boxing).items()))])
    latest = train_student(student["checkout"], episodes, tmp_path / "logdir", dyn_stoch=8,
                           dyn_discrete=6, **SIZES)  # fmt: skip
    weights = torch.load(latest, weights_only=True)
    with pytest.raises(OutsideModelError, match=r"dyn_stoch x dyn_discrete = 48 .* give both"):
        dreamerv3_torch(student["checkout"], weights, "cpu", quiet=True)
    fine = dreamerv3_torch(student["checkout"], weights, "cpu", quiet=True, dyn_stoch=8,
                           dyn_discrete=6)  # fmt: skip
    obs, act, future = windows(1)
    assert fine.imagine(obs, act, future, mode="mode").shape == (1, 10, 3, 64, 64)


def test_checkout_problems_are_readable_and_leave_sys_modules_alone(
    student: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = torch.load(student["latest"], weights_only=True)
    lacks = r"\['models\.py', 'networks\.py', 'tools\.py', 'configs\.yaml'\]"
    with pytest.raises(
        OutsideModelError, match=r"not a dreamerv3-torch checkout: it lacks " + lacks
    ):
        dreamerv3_torch(tmp_path, weights, "cpu")
    broken = tmp_path / "broken"
    shutil.copytree(student["checkout"], broken)
    tools = broken / "tools.py"
    code = tools.read_text().replace("import io\n", "import io\nimport tensorboard_not_here\n")
    tools.write_text(code)  # as the original's tensorboard import, where it is not installed
    theirs = type(sys)("tools")  # another project's module of the same name, already imported
    monkeypatch.setitem(sys.modules, "tools", theirs)
    missing = r"ModuleNotFoundError: No module named 'tensorboard_not_here'. The student's checkout"
    with pytest.raises(OutsideModelError, match=missing + r" runs with its own dependencies"):
        dreamerv3_torch(broken, weights, "cpu", quiet=True)
    assert sys.modules["tools"] is theirs and "models" not in sys.modules
    assert str(broken) not in sys.path
    model = dreamerv3_torch(student["checkout"], weights, "cpu", quiet=True)  # theirs set aside
    assert sys.modules["tools"] is theirs and model.world_model is not None
    with pytest.raises(CheckpointError, match=r"its WorldModel: the weights do not fit the model"):
        dreamerv3_torch(student["checkout"], {"_wm.x": torch.zeros(1)}, "cpu", num_actions=18)


@pytest.mark.parametrize("ruamel", ["if installed", "blocked"])
def test_configs_yaml_numbers_read_as_yaml_12(
    ruamel: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if ruamel == "blocked":  # PyYAML, which reads 1e-4 as a string unless taught otherwise
        monkeypatch.setitem(sys.modules, "ruamel.yaml", None)
    (tmp_path / "c.yaml").write_text("a: {lr: 1e-4, steps: 4e5, eps: 1.0e-8, n: 10, s: '1e3'}\n")
    got = read_yaml(tmp_path / "c.yaml")["a"]
    assert got == {"lr": 1e-4, "steps": 4e5, "eps": 1e-8, "n": 10, "s": "1e3"}
    assert isinstance(got["n"], int) and isinstance(got["steps"], float)


# ------------------------------------------------------------------ the adapter
def test_adapter_errors_name_the_hook_and_what_it_was_given(student: dict[str, Path]) -> None:
    wm = dreamerv3_torch(student["checkout"], torch.load(student["latest"], weights_only=True),
                         "cpu", quiet=True).world_model  # fmt: skip
    dyn, decoder = wm.dynamics, wm.heads["decoder"]
    hooks = dict(encode=wm.encoder, observe=dyn.observe, img_step=dyn.img_step,
                 action_dim=18, channels_last=True)  # fmt: skip
    obs, act, future = windows(2)

    def rollout(**changes) -> None:
        adapter = DreamerAdapter(
            **{"decode": lambda s: decoder(dyn.get_feat(s)), **hooks, **changes}
        )
        OutsideModel(adapter, source="grade.py:load", action_dim=18).imagine(obs, act, future)

    with pytest.raises(OutsideModelError, match=r"its encode hook raised TypeError.*given "
                       r"\[2, 8, 64, 64, 3\] float32 \(an encoder that takes a dict"):  # fmt: skip
        rollout()  # the dict encoder handed a tensor, as the issue found
    encode = {"encode": lambda x: wm.encoder({"image": x})}
    state = r"\{'stoch': \[2, 32, 32\] float32, 'deter': \[2, 32\] float32"
    with pytest.raises(
        OutsideModelError, match=r"its decode hook raised RuntimeError.*given " + state
    ):
        rollout(**encode)  # [B, F] features for a [B, T, F] decoder
    with pytest.raises(OutsideModelError, match=r"decode hook returned \{'image': MSEDist\}"):
        rollout(**encode, decode=lambda s: decoder(dyn.get_feat(s)[:, None]))
    mean = {"decode": lambda s: 3 * decoder(dyn.get_feat(s)[:, None])["image"].mode()[:, 0]}
    with pytest.raises(OutsideModelError, match=r"values in \[.*expected \[0, 1\]. An unbounded "
                       r"decoder .* needs DreamerAdapter\(clip=True\)"):  # fmt: skip
        rollout(**encode, **mean)
    rollout(**encode, **mean, clip=True)  # clipped and counted instead


class Sampler:
    """A tiny RSSM whose prior samples unless told ``sample=False``."""

    def __init__(self, flag: bool) -> None:
        self.calls: list[bool] = []
        if not flag:
            self.img_step = lambda state, action: self._step(state, True)

    def img_step(self, state, action, sample=True):
        return self._step(state, sample)

    def _step(self, state, sample):
        self.calls.append(sample)
        return state + (torch.rand_like(state) if sample else 0.5)

    def adapter(self) -> DreamerAdapter:
        return DreamerAdapter(
            encode=lambda x: x.mean((-1, -2, -3))[..., None],
            observe=lambda embed, prev_action, is_first: embed,
            img_step=self.img_step,
            decode=lambda s: (s % 1)[:, :, None, None].expand(-1, 3, 64, 64),
            action_dim=18,
        )


@pytest.mark.parametrize("flag", [True, False])
def test_the_mode_reaches_img_step_or_the_report_says_it_could_not(flag: bool, boxing) -> None:
    sampler = Sampler(flag)
    model = OutsideModel(sampler.adapter(), source="grade.py:load", action_dim=18)
    assert model.follows_mode is flag
    results = {mode: rollout_psnr({"alice": model}, boxing, mode=mode, count=4, progress=False)
               for mode in ("mode", "sample")}  # fmt: skip
    assert sampler.calls and set(sampler.calls) == ({False, True} if flag else {True})
    table, gap = results["mode"].table(), gap_decomposition(results, "alice")
    said = "alice takes no mode, so this model samples in both modes (or in neither)"
    assert (said in table) is not flag and results["mode"].mode_ignored == (
        () if flag else ("alice",)
    )
    if not flag:  # its ceiling and rollout: no "sampling the prior moves it by +0.0 dB"
        assert "this model samples in both modes" in gap and "moves it by" not in gap


# ------------------------------------------------------------------ end to end
def argmax_rows(text: str, name: str) -> list[str]:
    """``name``'s rows of the argmax table in ``evaluate``'s output."""
    table = text.split("argmax latents")[1].split("\n\n")[0]
    return [line for line in table.splitlines() if line.startswith(name)]


@pytest.mark.slow  # over 10 s on a busy 2-core CPU; runs in CI all the same
def test_cli_import_train_evaluate_with_the_three_line_loader(
    student: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    train_eps = student["logdir"] / "train_eps"
    assert cli.main(["import-data", str(train_eps), "--env", "ALE/Boxing-v5",
                     "--out", "data/student.npz"]) == 0  # fmt: skip
    assert "from 4 file(s)" in capsys.readouterr().out
    assert cli.main(["train", "--model", "storm", "--profile", "smoke", "--data",
                     "data/student.npz", "--data-as-is"]) == 0  # fmt: skip
    capsys.readouterr()
    argv = ["evaluate", "--storm", "checkpoints/storm_smoke.pt", "--data", "data/student.npz",
            "--rssm", str(student["latest"]), "--rssm-code", f"{student['loader']}:load",
            "--rssm-name", "alice", "--profile", "smoke"]  # fmt: skip
    outs = []
    for _ in range(2):
        assert cli.main(argv) == 0, capsys.readouterr().err
        outs.append(capsys.readouterr().out)
    rows = argmax_rows(outs[0], "alice")
    assert len(rows) == 2 and rows == argmax_rows(outs[1], "alice")  # rollout and ceiling
    text = outs[0]
    assert "Loaded the student's model 'alice'" in text and "alice ceiling" in text
    assert "alice: its model has 18 actions and 64 px frames, as the data" in text
    assert "records no training data" in text  # latest.pt has no fingerprint to check
    assert "alice: clip=True clipped" in text and "RSSM" not in text.split("Loaded")[1]
    assert "this model samples in both modes" not in text  # the mode reached its img_step
    assert (tmp_path / "figures" / "psnr_vs_horizon.png").exists()


def readme_recipe() -> tuple[str, list[list[str]]]:
    """The loader and the commands of the README's "Grading a dreamerv3-torch student"."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Grading a dreamerv3-torch student")[1].split("\n## ")[0]
    loader = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("python -m storm_lib "):
                commands.append(shlex.split(line)[3:])
    return loader, commands


@pytest.mark.slow  # over 10 s on a busy 2-core CPU; runs in CI all the same
def test_readme_recipe_runs_as_written(
    student: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    loader, commands = readme_recipe()
    assert "dreamerv3_torch(" in loader and [c[0] for c in commands] == [
        "import-data", "train", "evaluate"]  # fmt: skip
    monkeypatch.chdir(tmp_path)  # a fresh directory with what the student handed in
    shutil.copytree(student["checkout"], tmp_path / "student" / "dreamerv3-torch")
    shutil.copytree(student["logdir"], tmp_path / "student" / "logdir")
    Path(re.search(r"--rssm-code (\S+?):load", " ".join(map(shlex.join, commands))).group(1)
         ).write_text(textwrap.dedent(loader))  # fmt: skip
    for argv in commands:
        argv = [{"cpu": "smoke", "checkpoints/storm_cpu.pt": "checkpoints/storm_smoke.pt"}.get(a, a)
                for a in argv]  # fmt: skip
        assert cli.main(argv) == 0, (argv, capsys.readouterr().err)
    assert "alice ceiling" in capsys.readouterr().out


@pytest.mark.skipif(
    not os.environ.get("DREAMERV3_TORCH"),
    reason="set DREAMERV3_TORCH to a clone of NM512/dreamerv3-torch to check the stand-in",
)
def test_the_standin_has_a_real_checkouts_names_and_shapes(
    boxing: TrajectoryData, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    real = Path(os.environ["DREAMERV3_TORCH"])
    if importlib.util.find_spec("tensorboard") is None:  # their tools.py imports it (Logger)
        stub = type(sys)("torch.utils.tensorboard")
        stub.SummaryWriter = object
        monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", stub)
    flags = dict(SIZES, device="cpu", num_actions=18, dyn_stoch=8, dyn_discrete=6)
    built = {}
    for root in (real, STANDIN):
        raw = config_from_checkout(root, ["atari100k"], flags)
        config = argparse.Namespace(**{k: tuple(v) if isinstance(v, list) else v
                                       for k, v in raw.items()})  # fmt: skip
        with checkout_on_path(root) as models:
            torch.manual_seed(0)
            built[root] = build_world_model(models, config)
    shapes = {r: {k: v.shape for k, v in m.state_dict().items()} for r, m in built.items()}
    assert shapes[real] == shapes[STANDIN]
    ep = next(iter(dreamer_episodes(boxing).values()))
    for _ in range(2):  # their own training step
        built[real]._train({k: np.stack([v[:16], v[16:32]]) for k, v in ep.items()})
    saved = {"agent_state_dict": {f"_wm._orig_mod.{k}": v for k, v in
                                  built[real].state_dict().items()}}  # fmt: skip
    model = dreamerv3_torch(real, saved, "cpu", ["atari100k"], dyn_stoch=8, dyn_discrete=6)
    assert "dyn_deter=32 (configs: 512)" in capsys.readouterr().out
    obs, act, future = windows(2)
    with torch.inference_mode():
        runs = [model.imagine(obs, act, future, mode=m) for m in ("mode", "mode", "sample")]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
