"""The worked exercise: a strategy (examples/ewc.py) and a schedule (examples/wsd.py), each added from a file of
its own, touching no project file. Each trains, keeps what it claims, resumes bitwise after a stop or a kill,
and gets a row of a comparison."""
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

import schedules
import strategies
import survive
import train
from conftest import ENV, REPO, import_file, load, same, tables_kept, train_in_process, train_stopped
from test_resilience import kill_mid_step
from test_train import loss_and_grads, random_pairs, tiny_clip

EXAMPLES = os.path.join(REPO, "examples")
TINY = ["--budget_samples=128", "--batch_size=32", "--vocab_size=300", "--workers=0", "--log_interval=2",
        "--eval_batch=64", "--warmup_iters=1", "--warmup_iters_later=1"]
EWC = [*TINY, "--ewc_batches=2"]


@pytest.fixture
def example():
    """load(name): run examples/NAME.py as a module (it registers its rows, trains nothing); the tables it
    changed are put back afterwards."""
    with tables_kept(strategies.STRATEGIES, strategies.SETTINGS, schedules.SCHEDULES, schedules.SETTINGS):
        yield lambda name: import_file(os.path.join(EXAMPLES, f"{name}.py"))


def recording(monkeypatch, name, hook):
    """Wrap a registered strategy's hook: the calls it gets, as (t, a copy of step.state)."""
    calls, row = [], strategies.STRATEGIES[name]
    inner = getattr(row, hook)

    def wrapped(model, step):
        calls.append((step.t, {k: v for k, v in step.state.items()}))
        return inner(model, step)
    monkeypatch.setitem(strategies.STRATEGIES, name, dataclasses.replace(row, **{hook: wrapped}))
    return calls


# ----------------------------------------------------------------------------- ewc: a strategy from a file
def test_ewc_penalty_is_zero_at_the_previous_weights_and_its_gradient_is_one_batchs(example):
    ewc = example("ewc")
    model = tiny_clip()
    fisher = {k: torch.rand_like(p) for k, p in model.named_parameters()}
    step = strategies.TimeStep(1, ["a", "b"], [], train.parse_config(["--ewc_weight=300"]), None,
                               train.World(0, 1, False, torch.device("cpu")),
                               previous={k: v.clone() for k, v in model.state_dict().items()}, state={"fisher": fisher})
    penalty = ewc.Penalty(model, step)
    at_previous = penalty(None, None)
    at_previous.backward()
    assert at_previous.item() == 0 and all(float(p.grad.abs().max()) == 0 for p in model.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    moved = penalty(None, None).item()
    expected = 300 / 2 * sum(float((fisher[k] * (p.detach() - step.previous[k]) ** 2).sum())
                             for k, p in model.named_parameters())
    assert moved == pytest.approx(expected, rel=1e-5) and moved > 0
    one = train.World(0, 1, False, torch.device("cpu"))
    images, tokens = random_pairs(16)
    _, whole = loss_and_grads(model, model, images, tokens, 1, one, penalty)
    for k in (2, 4):
        _, grads = loss_and_grads(model, model, images, tokens, k, one, penalty)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, whole[name], rtol=1e-4, atol=1e-6, msg=f"{k} {name}")


def test_ewc_counts_its_fisher_keeps_it_across_a_grown_run_and_checks_its_settings(example, monkeypatch,
                                                                                   three_years, tmp_path):
    ewc = example("ewc")
    calls = recording(monkeypatch, "ewc", "start_of_step")
    run = str(tmp_path / "run")
    args = [f"--data_root={three_years}", f"--out_dir={run}", "--strategy=ewc", "--ewc_decay=0.5", *EWC]
    train_in_process([*args, "--steps=2018,2019"])
    first, second = load(run, 1), load(run, 2)
    assert first["state"] == {} and first["start_of_step"] == {}  # nothing before step 1 to hold on to
    model = ewc.CLIP(ewc.train.make_config("tiny", vocab_size=300))
    fisher_flops = 2 * 32 * 3 * model.flops_per_pair()  # ewc_batches x batch_size pairs, forward and backward
    assert second["start_of_step"]["flops"] == fisher_flops
    penalty = 8 * model.num_params() / 32
    assert second["flops"] == 128 * (3 * model.flops_per_pair() + penalty) + fisher_flops
    assert second["flops"] == pytest.approx(first["flops"] * (1 + penalty / 3 / model.flops_per_pair())
                                            + fisher_flops)
    fisher = second["state"]["fisher"]
    assert fisher.keys() == dict(model.named_parameters()).keys() and all(f.min() >= 0 for f in fisher.values())
    assert sum(float(f.sum()) for f in fisher.values()) > 0
    # grown by a year: step 3's hook gets back step 2's state from its checkpoint, and decays it into the sum
    train_in_process([*args, "--steps=2018,2019,2020"])
    assert [t for t, _ in calls] == [1, 2]
    assert same(calls[1][1]["fisher"], fisher)
    third = load(run, 3)["state"]["fisher"]
    assert all(torch.all(third[k] >= 0.5 * fisher[k]) and not torch.equal(third[k], 0.5 * fisher[k]) for k in fisher)
    log = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
    assert [r["start_of_step"].get("flops") for r in log if r["event"] == "step_end"] == [None, fisher_flops,
                                                                                          fisher_flops]
    # its settings: declared with their checks, refused before any compute, listed by --help
    with pytest.raises(SystemExit, match=r"--ewc_weight=-1.0 is not valid; use 0 or more"):
        train.check_config(train.parse_config(["--ewc_weight=-1"]))


def test_ewc_from_its_file_lists_its_settings_and_refuses_a_bad_one(tmp_path):
    command = [sys.executable, os.path.join(EXAMPLES, "ewc.py")]
    out = subprocess.run([*command, "--help"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--ewc_weight=1000.0" in out.stdout and "the penalty's weight" in out.stdout
    assert "--lwf_weight=1.0" in out.stdout and "--budget_samples=56000" in out.stdout  # the others too
    out = subprocess.run([*command, "--ewc_batches=0", f"--out_dir={tmp_path}/run"], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and out.stderr.strip() == "error: --ewc_batches=0 is not valid; use 1 or more"
    assert not os.path.exists(tmp_path / "run")  # refused before anything was written


@pytest.mark.slow
def test_ewc_stopped_mid_step_resumes_bitwise_without_estimating_again(example, monkeypatch, two_years, tmp_path):
    example("ewc")
    calls = recording(monkeypatch, "ewc", "start_of_step")
    args = [f"--data_root={two_years}", "--strategy=ewc", *EWC, "--ckpt_interval_samples=32"]
    reference, stopped = str(tmp_path / "reference"), str(tmp_path / "stopped")
    train_in_process([f"--out_dir={reference}", *args])
    train_stopped(args, stopped, "step02-0000001.pt")  # the check at step 2's iteration 2 stops it
    assert not os.path.exists(os.path.join(stopped, "step02.pt"))
    assert os.path.exists(survive.start_checkpoint(stopped, 1))
    calls.clear()
    train_in_process([f"--out_dir={stopped}", *args])
    assert calls == []  # the resumed step took the Fisher it had estimated from RUN/resume
    assert not os.listdir(os.path.join(stopped, "resume"))  # gone once the step ended
    for step in (1, 2):
        a, b = load(reference, step), load(stopped, step)
        assert same(a["model"], b["model"]), f"step {step}"
        assert a["start_of_step"] == b["start_of_step"] and a["flops"] == b["flops"]
    assert same(load(reference, 2)["state"]["fisher"], load(stopped, 2)["state"]["fisher"])


@pytest.mark.slow
def test_ewc_killed_mid_step_resumes_bitwise(two_years, tmp_path):
    """SIGKILL to python examples/ewc.py once step 2 has a resume checkpoint; the rerun ends as a run never
    killed."""
    program = [os.path.join(EXAMPLES, "ewc.py")]
    args = [f"--data_root={two_years}", *EWC, "--budget_samples=256", "--ckpt_interval_samples=64"]
    runs = {name: str(tmp_path / name) for name in ("reference", "killed")}
    command = lambda run: [sys.executable, *program, *args, f"--out_dir={run}"]  # noqa: E731
    assert subprocess.run(command(runs["reference"]), cwd=REPO, env=ENV, capture_output=True,
                          timeout=600).returncode == 0
    rc, _, _ = kill_mid_step(None, runs["killed"], signal.SIGKILL, command=command(runs["killed"]))
    assert rc == -signal.SIGKILL
    out = subprocess.run(command(runs["killed"]), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "resuming at sample" in out.stdout, out.stderr[-2000:]
    for step in (1, 2):
        a, b = load(runs["reference"], step), load(runs["killed"], step)
        assert same(a["model"], b["model"]) and a["flops"] == b["flops"], f"step {step}"
    assert same(load(runs["reference"], 2)["state"]["fisher"], load(runs["killed"], 2)["state"]["fisher"])


# ----------------------------------------------------------------------------- wsd: a schedule from a file
def test_wsd_warms_up_once_holds_then_falls_linearly_on_the_cooled_branch(example):
    example("wsd")
    cfg = train.parse_config(["--lr_schedule=wsd", "--lr=1", "--warmup_iters=10", "--cooldown_fraction=0.2"])
    train.check_config(cfg)
    before = None
    for t in range(3):
        s = schedules.step_schedule(cfg, t, 3, 100, before)
        rates = [s.lr(i) for i in range(100)]
        assert rates[:10] == ([(i + 1) / 10 for i in range(10)] if t == 0 else [1.0] * 10)  # one warmup
        assert rates[10:80] == [1.0] * 70
        assert rates[80:] == pytest.approx([1 - k / 20 for k in range(20)])  # linear, from the trunk's rate
        before = (before or 0) + s.cooldown_start
    assert not math.isclose(schedules.SCHEDULES["const-cooldown"].cooldown(0.5), 0.5)  # not const-cooldown's


@pytest.mark.slow
def test_wsd_stopped_mid_cooldown_resumes_bitwise(example, two_years, tmp_path):
    example("wsd")
    args = [f"--data_root={two_years}", "--strategy=sequential", "--lr_schedule=wsd", *TINY,
            "--budget_samples=256", "--cooldown_fraction=0.5", "--ckpt_interval_samples=64"]
    reference, stopped = str(tmp_path / "reference"), str(tmp_path / "stopped")
    train_in_process([f"--out_dir={reference}", *args])
    train_stopped(args, stopped, "step01-0000006.pt")  # at iteration 6 of 8: the branch began at 4
    train_in_process([f"--out_dir={stopped}", *args])
    for step in (1, 2):
        a, b = load(reference, step), load(stopped, step)
        assert same(a["model"], b["model"]) and same(a["continue_point"]["model"], b["continue_point"]["model"]), f"step {step}"
    assert load(reference, 1)["continue_point"]["iterations"] == 4


# ----------------------------------------------------------------------------- in a comparison
# (a comparison of rows from several files, ewc's among them: tests/test_extending.py)
def test_a_row_that_names_no_schedule_runs_the_default_even_under_a_file_with_its_own(example, tmp_path,
                                                                                       monkeypatch):
    import compare
    example("wsd")  # its file starts train.py with --lr_schedule=wsd
    launched = []
    monkeypatch.setattr(compare, "launch", lambda program, args, nproc: launched.append(args) or True)
    monkeypatch.setattr(compare, "finished", lambda run_dir: True)  # nothing trains here
    program = [os.path.join(EXAMPLES, "wsd.py")]
    compare.run_row("sequential", 0, str(tmp_path / "a"), None, 1, [], program)
    compare.run_row("sequential+wsd", 0, str(tmp_path / "b"), None, 1, [], program)
    assert "--lr_schedule=cosine" in launched[0] and launched[1][-1] == "--lr_schedule=wsd"
    assert compare.first_step("sequential", []) != compare.first_step("sequential+wsd", [])
