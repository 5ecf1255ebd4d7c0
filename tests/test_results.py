"""The results file: what it holds is what was measured, it validates and round-trips,
unknown formats are refused, foreign files are never overwritten, and the printed tables
come from the same numbers as the file."""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from storm_lib import results as res
from storm_lib.atari import TwinFutures
from storm_lib.checkpoint import save_checkpoint
from storm_lib.config import get_profile
from storm_lib.diagnostics import token_statistics
from storm_lib.evaluate import MODES, action_sensitivity, psnr_table, rollout_psnr
from storm_lib.models import build_world_model
from storm_lib.report import gap_numbers
from storm_lib.results_schema import SCHEMA, schema_problems
from storm_lib.train import History
from storm_lib.types import Batch

SMOKE = get_profile("smoke")
FINGERPRINT = {"env_id": "ALE/Boxing-v5", "steps": 600, "seed": 0, "image_size": 64,
               "action_meanings": ["NOOP", "FIRE", "UP"], "sha256": "ab" * 32}  # fmt: skip


def _windows(count: int = 5, length: int = 7) -> Batch:
    g = torch.Generator().manual_seed(0)
    s = SMOKE.data.image_size
    return Batch(
        obs=torch.rand(count, length, 3, s, s, generator=g),
        action=torch.randint(0, 3, (count, length), generator=g),
        reward=torch.zeros(count, length),
        cont=torch.ones(count, length),
    )


def _history(offset: float) -> History:
    val = [{"step": s, "time": 0.5 * s, "loss/total": 9 - s + offset, "token_nll": 3.0 + offset}
           for s in (2, 4, 6)]  # fmt: skip
    return History(train=[{"step": 6, "time": 3.0, "loss/total": 1.0}], val=val)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every object the notebook has when it writes its results, from real (untrained)
    smoke models on synthetic windows."""
    torch.manual_seed(0)
    models = {"STORM": build_world_model("storm", SMOKE, 3, "cpu"),
              "RSSM": build_world_model("rssm", SMOKE, 3, "cpu")}  # fmt: skip
    windows = _windows()
    protocol = dict(context=4, horizon=3, progress=False)
    results = {m: rollout_psnr(models, windows, mode=m, **protocol) for m in MODES}
    ckpt = tmp_path_factory.mktemp("ckpt") / "storm_smoke.pt"
    save_checkpoint(ckpt, models["STORM"], step=6, total_steps=6, data=FINGERPRINT)
    timing = {"kind": "storm", "mode": "train", "part": "model", "lengths": [8, 16],
              "ms_per_step": [1.5, 2.5], "ms_per_frame": [0.1, 0.1], "batch_size": 2,
              "device": "cpu", "train_length": 20}  # fmt: skip
    rng = np.random.default_rng(0)
    return dict(
        results=results,
        histories={"STORM": _history(0.0), "RSSM": _history(1.0)},
        sensitivity=action_sensitivity(models, windows, **protocol),
        tokens={"STORM": token_statistics(models["STORM"], windows)},
        fvd={"fvd": {"STORM": 120.5, "RSSM": 150.25}, "clips": 5, "frames": 7, "seconds": 2.0},
        twins=TwinFutures(rng.uniform(20, 100, (4, 3)), rng.uniform(20, 30, (4, 3)), cap=100.0),
        timings={"STORM": timing, "RSSM": {**timing, "kind": "rssm"}},
        sequence_timings={"STORM": {**timing, "part": "sequence"}},
        checkpoints={"STORM": ckpt},
        config=SMOKE,
        device="cpu",
        label="smoke test run",
    )


def test_written_file_validates_against_the_schema_and_round_trips(run, tmp_path: Path) -> None:
    doc = res.build_results(**run)
    path = res.write(tmp_path / "results" / "smoke.json", doc)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text  # plain JSON for any reader
    assert not list(schema_problems(json.loads(text), SCHEMA))
    assert res.load(path) == doc
    json.dumps(SCHEMA)  # the schema is itself JSON (for P05 or a jsonschema user)


def test_the_file_holds_what_was_measured(run) -> None:
    doc = res.build_results(**run)
    results, ckpt = run["results"], run["checkpoints"]["STORM"]
    storm, rssm = doc["models"]["STORM"], doc["models"]["RSSM"]
    for mode in MODES:
        assert storm["psnr"][mode]["mean"] == results[mode].models["STORM"].mean.tolist()
        hw = results[mode].ceilings["RSSM"].half_width.tolist()
        assert rssm["ceiling"][mode]["half_width"] == hw
        assert storm["posterior_entropy"][mode] == results[mode].entropy["STORM"]
    assert doc["protocol"] == {"context": 4, "horizon": 3, "count": 5, "seed": 1234,
                               "modes": ["mode", "sample"]}  # fmt: skip
    gap = storm["gap_decomposition"]
    assert {k: gap[k] for k in gap if k != "text"} == gap_numbers(results, "STORM")
    assert gap["text"].startswith("STORM: at step 1")
    between = run["sensitivity"]["RSSM"].between.mean.tolist()
    assert rssm["action_sensitivity"]["between"]["mean"] == between
    assert (storm["fvd"], rssm["fvd"], doc["fvd"]["clips"]) == (120.5, 150.25, 5)
    assert storm["clip_count"] is None  # not known for our own models
    assert storm["tokens"] == run["tokens"]["STORM"].to_dict() and rssm["tokens"] is None
    assert storm["takes_mode"] and rssm["takes_mode"]
    assert rssm["validation"]["metrics"]["token_nll"] == [4.0, 4.0, 4.0]
    assert storm["validation"]["step"] == [2, 4, 6] and storm["validation"]["time"][-1] == 3.0
    assert storm["train_ms_per_step"] == pytest.approx(500.0)
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert storm["checkpoint"] == {"path": str(ckpt), "sha256": sha, "kind": "storm", "step": 6,
                                   "total_steps": 6, "profile": "smoke"}  # fmt: skip
    assert storm["training_data"] == FINGERPRINT and storm["kind"] == "storm"
    assert rssm["checkpoint"] is None and rssm["training_data"] is None
    assert doc["baselines"]["copy-last"] == results["mode"].copy_last.to_dict()
    assert doc["twin_futures"]["identical"] == run["twins"].identical.tolist()
    assert doc["step_time_vs_length"]["sequence"]["STORM"]["part"] == "sequence"
    r = doc["run"]
    assert r["label"] == "smoke test run" and r["profile"] == "smoke" and r["device"] == "cpu"
    assert r["config"]["train"]["steps"] == SMOKE.train.steps
    assert r["versions"]["torch"] == torch.__version__ and r["precision"]["evaluation"] == "fp32"
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=Path(res.__file__).parent)  # fmt: skip
    assert r["git"]["commit"] == (head.stdout.strip() if head.returncode == 0 else None)


def test_printed_tables_are_made_from_the_numbers_in_the_file(run, tmp_path: Path) -> None:
    path = res.write(tmp_path / "r.json", res.build_results(**run))
    loaded = res.load(path)
    for mode in MODES:
        summary = res.psnr_summary(loaded, mode)
        for steps in ((1, 3, 5, 10), (1, 2, 3)):
            assert psnr_table(summary, steps) == run["results"][mode].table(steps)


def test_a_run_with_only_the_rollouts_writes_nulls(run, tmp_path: Path) -> None:
    doc = res.build_results(run["results"], command="evaluate")
    storm = doc["models"]["STORM"]
    assert storm["fvd"] is None and storm["validation"] is None and storm["checkpoint"] is None
    assert doc["twin_futures"] is None and doc["step_time_vs_length"] is None
    assert doc["run"]["config"] is None and doc["run"]["duration_s"] is None
    assert res.load(res.write(tmp_path / "r.json", doc)) == doc


def test_modes_scored_on_other_windows_are_refused(run) -> None:
    other = dict(run["results"])
    other["sample"] = copy.deepcopy(other["sample"])
    other["sample"].seed += 1
    with pytest.raises(ValueError, match="same windows"):
        res.build_results(other)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"format": "storm_lib-results/2"}', "newer storm_lib"),
        ('{"format": "storm_lib-results/x"}', "unknown version"),
        ('{"format": "storm_lib/1"}', "not a storm_lib results file"),
        ('{"mean": [1, 2]}', "not a storm_lib results file"),
        ("[1, 2]", "not a storm_lib results file"),
        ("not json", "not a JSON results file"),
        ('{"format": "storm_lib-results/1", "x": NaN}', "not a JSON results file"),
    ],
)
def test_unknown_formats_are_refused(content: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text(content)
    with pytest.raises(res.ResultsError, match=message) as err:
        res.load(path)
    assert str(path) in str(err.value)


def test_a_broken_entry_is_named(run, tmp_path: Path) -> None:
    doc = res.build_results(**run)
    del doc["models"]["STORM"]["psnr"]["sample"]
    doc["models"]["RSSM"]["psnr"]["mode"]["mean"][0] = "high"
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(res.ResultsError) as err:
        res.load(path)
    assert "models.STORM.psnr: missing 'sample'" in str(err.value)
    assert "models.RSSM.psnr.mode.mean[0]: expected number, found str" in str(err.value)
    doc = res.build_results(**run)
    doc["baselines"]["copy-last"]["mean"].append(1.0)  # fits the schema, not the protocol
    with pytest.raises(res.ResultsError, match=r"baselines\.copy-last: 4 steps, but protocol"):
        res.validate(doc)


def test_an_invalid_document_is_never_written(run, tmp_path: Path) -> None:
    doc = res.build_results(**run)
    doc["models"]["STORM"]["fvd"] = float("nan")
    with pytest.raises(res.ResultsError, match=r"models.STORM.fvd: .*NaN"):
        res.write(tmp_path / "r.json", doc)
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("foreign", ['{"format": "p05-dashboard/1"}', "[]", "\x00binary"])
def test_a_foreign_file_is_never_overwritten(run, foreign, overwrite, tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text(foreign)
    with pytest.raises(res.ResultsError, match="is never overwritten"):
        res.write(path, res.build_results(**run), overwrite=overwrite)
    assert path.read_text() == foreign


def test_our_results_file_is_replaced_only_when_asked(run, tmp_path: Path) -> None:
    path = res.write(tmp_path / "r.json", res.build_results(run["results"], label="first"))
    before = path.read_bytes()
    with pytest.raises(res.ResultsError, match="already holds storm_lib results"):
        res.write(path, res.build_results(**run))
    assert path.read_bytes() == before
    res.write(path, res.build_results(**run), overwrite=True)
    assert res.load(path)["run"]["label"] == "smoke test run"
    with pytest.raises(res.ResultsError, match="is a folder"):
        res.write(tmp_path, res.build_results(**run), overwrite=True)


# ------------------------------------------------------------------ the command line
def _cli(*argv: str) -> int:
    from storm_lib import __main__ as cli

    return cli.main([str(a) for a in argv])


def test_evaluate_json_writes_what_it_prints(boxing_file, tmp_path, monkeypatch, capsys) -> None:
    from storm_lib.data import TrajectoryData

    monkeypatch.chdir(tmp_path)
    data = TrajectoryData.load(boxing_file)
    torch.manual_seed(0)
    model = build_world_model("storm", SMOKE, data.action_dim, "cpu")
    save_checkpoint("storm.pt", model, step=6, total_steps=6, data=data.fingerprint)
    argv = ["evaluate", "--storm", "storm.pt", "--data", boxing_file, "--profile", "smoke",
            "--device", "cpu", "--out", "figs", "--json", "out/run.json"]  # fmt: skip
    assert _cli(*argv) == 0
    printed = capsys.readouterr().out
    doc = res.load("out/run.json")
    for mode in MODES:  # the tables the run printed are the file's numbers
        assert psnr_table(res.psnr_summary(doc, mode)) in printed
    storm = doc["models"]["STORM"]
    assert doc["run"]["command"] == "evaluate" and storm["training_data"] == data.fingerprint
    assert (
        storm["checkpoint"]["sha256"] == hashlib.sha256(Path("storm.pt").read_bytes()).hexdigest()
    )
    assert storm["action_sensitivity"] is not None and storm["fvd"] is None  # no --fvd asked
    before = Path("out/run.json").read_bytes()
    assert _cli(*argv) == 1  # ours, but --force was not given
    assert "already holds storm_lib results" in capsys.readouterr().err
    assert Path("out/run.json").read_bytes() == before  # (--force: write(overwrite=True))


def test_evaluate_refuses_a_foreign_json_before_evaluating(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    Path("mine.json").write_text('{"my": "notes"}')
    code = _cli("evaluate", "--storm", "missing.pt", "--data", "missing.npz", "--json",
                "mine.json", "--force")  # fmt: skip
    assert code == 1 and "is never overwritten" in capsys.readouterr().err
    assert Path("mine.json").read_text() == '{"my": "notes"}'


def test_compare_results_draws_every_model_of_every_run(run, tmp_path, capsys) -> None:
    a = res.write(tmp_path / "a.json", res.build_results(**run))
    b = res.write(tmp_path / "b.json", res.build_results(**run))  # the same label twice
    out = tmp_path / "cmp.png"
    assert _cli("compare-results", a, b, "--out", out, "--mode", "sample") == 0
    assert out.read_bytes().startswith(b"\x89PNG")
    lines = capsys.readouterr().out.splitlines()
    labels = [line.split(":")[0] for line in lines if " / " in line]
    assert labels == ["smoke test run / STORM", "smoke test run / RSSM",
                      f"smoke test run ({b}) / STORM", f"smoke test run ({b}) / RSSM"]  # fmt: skip
    mean = run["results"]["sample"].models["STORM"].mean
    assert f"{mean[0]:.2f} ± " in lines[0] and f"{mean[-1]:.2f} ± " in lines[0]
    assert _cli("compare-results", a, "--out", out) == 0  # our own figure is replaced


@pytest.mark.parametrize("target", ["a.json", "notes.png", "fig.txt"])
def test_compare_results_never_writes_over_an_input_or_a_foreign_file(
    run, target, tmp_path, capsys
) -> None:
    a = res.write(tmp_path / "a.json", res.build_results(**run))
    (tmp_path / "notes.png").write_text("my notes, not a picture")
    out = tmp_path / target
    before = out.read_bytes() if out.exists() else None
    assert _cli("compare-results", a, "--out", out) == 1
    assert capsys.readouterr().err.startswith("error: ")
    assert (out.read_bytes() if out.exists() else None) == before


def test_the_cpu_is_named_by_its_model(tmp_path: Path) -> None:
    from storm_lib.utils import cpu_flags, cpu_name

    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC 9R14 96-Core\nflags\t\t: fpu avx512_bf16\n"
    )
    assert cpu_name(info) == "AMD EPYC 9R14 96-Core" and cpu_flags(info) == {"fpu", "avx512_bf16"}
    assert cpu_name(tmp_path / "missing") and cpu_flags(tmp_path / "missing") == set()


def test_a_huge_file_is_neither_read_nor_overwritten(run, tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    with path.open("wb") as f:  # sparse: costs no disk
        f.truncate(res.MAX_BYTES + 1)
    with pytest.raises(res.ResultsError, match="not a results file"):
        res.load(path)
    with pytest.raises(res.ResultsError, match="is never overwritten"):
        res.write(path, res.build_results(run["results"]), overwrite=True)
    assert path.stat().st_size == res.MAX_BYTES + 1


@pytest.mark.parametrize(("capability", "autocast"), [((9, 0), "bf16"), ((7, 5), "fp16")])
def test_a_gpu_run_records_its_gpu_and_autocast(monkeypatch, capability, autocast) -> None:
    # A stand-in CUDA device: only the queries the run record makes.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    record = res.run_record(config=SMOKE, device="cuda:0")
    assert record["device"] == "cuda:0" and record["device_name"] == "NVIDIA H200"
    assert record["label"] == "smoke (NVIDIA H200)"
    assert record["precision"]["training_autocast"] == autocast
    assert "compute capability" in record["precision"]["description"]
