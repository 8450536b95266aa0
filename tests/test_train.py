"""The config parser, the step grouping, the schedule, and short end-to-end runs of train.py."""
import json
import os

import pytest
import torch

import data
import evaluate
import train
from conftest import run_train
from model import load_checkpoint


def test_config_overrides_and_errors():
    cfg = train.parse_config(["--lr=1e-3", "--compile=false", "--strategy=sequential", "--budget_samples=1_000"])
    assert cfg.lr == 1e-3 and cfg.compile is False and cfg.strategy == "sequential"
    assert cfg.budget_samples == 1000 and isinstance(cfg.budget_samples, int)
    assert train.parse_config([]).lr == train.DEFAULTS["lr"]  # parsing never changes the defaults
    assert train.parse_config(["--lwf_weight=0.5"]).lwf_weight == 0.5  # a strategy's setting, declared with it
    with pytest.raises(SystemExit, match="unknown config key 'lrr'.*valid keys:.*batch_size"):
        train.parse_config(["--lrr=1"])
    with pytest.raises(SystemExit, match="--batch_size=big is not a int"):
        train.parse_config(["--batch_size=big"])
    with pytest.raises(SystemExit, match="is not a bool"):
        train.parse_config(["--compile=maybe"])
    with pytest.raises(SystemExit, match="bad argument"):
        train.parse_config(["lr=1"])


def test_parse_steps(tmp_path):
    for year in ["2014", "2015", "2016", "2017", "201801", "201802"]:
        os.makedirs(tmp_path / "train" / year)
    root = str(tmp_path)
    assert data.parse_steps(root, "") == [["2014"], ["2015"], ["2016"], ["2017"], ["201801"], ["201802"]]
    assert data.parse_steps(root, "2014-2016,2017,2018") == [["2014", "2015", "2016"], ["2017"], ["201801", "201802"]]
    assert data.parse_steps(root, "201801,201802") == [["201801"], ["201802"]]
    with pytest.raises(SystemExit, match="step '2019' names no year folder"):
        data.parse_steps(root, "2017,2019")


def test_schedule_warmup_then_cosine_to_zero():
    lrs = [train.lr_at(i, 100, 10, 1.0) for i in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # monotone after warmup
    assert lrs[-1] < 0.01


def tiny_args(root, run, strategy="sequential"):
    return [f"--data_root={root}", f"--out_dir={run}", f"--strategy={strategy}", "--budget_samples=256",
            "--batch_size=32", "--vocab_size=300", "--log_interval=4", "--workers=0", "--warmup_iters=2",
            "--warmup_iters_later=2", "--eval_batch=64"]


@pytest.mark.slow
def test_end_to_end_two_steps_writes_matrix_and_resumes(tmp_path, two_years):
    root, run = two_years, str(tmp_path / "run")
    out = run_train(tiny_args(root, run))
    assert "evaluation matrix" in out
    result = json.load(open(os.path.join(run, "eval_matrix.json")))
    assert result["steps"] == ["2018", "2019"] and result["tasks"] == ["2018", "2019"]
    assert len(result["matrix"]) == 2 and all(len(r) == 2 for r in result["matrix"])
    assert all(0 <= v <= 100 for r in result["matrix"] for v in r)
    assert result["results"]["2019"]["2018"]["gallery"] == 64
    assert len(result["classification"]["matrix"]) == 2 and result["results"]["2019"]["2018"]["class_samples"] == 32
    assert sorted(f for f in os.listdir(run) if f.endswith(".pt")) == ["step01.pt", "step02.pt"]
    ckpt = torch.load(os.path.join(run, "step02.pt"), weights_only=True)
    assert ckpt["samples_seen"] == 256 and ckpt["config"]["strategy"] == "sequential"
    # checkpoint round trip: the saved model reproduces the evaluation that was logged
    model, record = load_checkpoint(os.path.join(run, "step02.pt"))
    assert record["step_name"] == "2019" and "model" not in record
    tok = data.Tokenizer.load(os.path.join(run, "tokenizer.json"))
    row = evaluate.evaluate_step(model, evaluate.tasks_of(root, [["2018"], ["2019"]]), tok, torch.device("cpu"))
    assert row["2018"]["mean_R@1"] == pytest.approx(result["results"]["2019"]["2018"]["mean_R@1"])
    # a finished run rerun does nothing but report
    mtime = os.path.getmtime(os.path.join(run, "step02.pt"))
    again = run_train(tiny_args(root, run))
    assert again.count("done already") == 2 and "evaluation matrix" in again
    assert os.path.getmtime(os.path.join(run, "step02.pt")) == mtime  # not retrained, not rewritten


@pytest.mark.slow
def test_two_process_gloo_run_same_protocol(tmp_path, two_years):
    run = str(tmp_path / "run")
    out = run_train(tiny_args(two_years, run, strategy="cumulative-all"), nproc=2)
    assert "2 process(es) on cpu, global batch 32" in out
    result = json.load(open(os.path.join(run, "eval_matrix.json")))
    assert len(result["matrix"]) == 2
    ckpt = torch.load(os.path.join(run, "step02.pt"), weights_only=True)
    assert ckpt["samples_seen"] == 256  # the same global budget as one process: 8 iterations of 32
