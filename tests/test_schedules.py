"""Learning-rate schedules through time (schedules.py): each one's rate curve over a few steps, checked against its
formula written out here; a run that carries its optimizer goes on from the trunk (or the cooled branch), and a
run stopped mid-cooldown resumes bit for bit. Merging across time (the ema strategies) and fixed-ratio replay
(new_data_fraction) are tested here too: they are the other axes of the same comparison."""
import math
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import data
import report
import schedules
import strategies
import train
from conftest import load, same, train_in_process, train_stopped
from checkpoints import load_checkpoint
from test_data import make_stream, tokenizer, write_shard  # noqa: F401 (tokenizer is a fixture)

LR = 1.0


def config(kind, **changes):
    return SimpleNamespace(**{"lr": LR, "lr_schedule": kind, "warmup_iters": 10, "warmup_iters_later": 5,
                              "lr_min_fraction": 0.1, "ar_horizon": 0, "cooldown_fraction": 0.2,
                              "rsqrt_timescale": 0, "budget_samples": 100 * 32, "batch_size": 32, **changes})


def curve(kind, steps=4, n_iters=100, carried=True, **changes):
    """The rates of every iteration of every step, with the optimizer carried between steps or made anew."""
    cfg, rates, before = config(kind, **changes), [], None
    for t in range(steps):
        schedule = schedules.step_schedule(cfg, t, steps, n_iters, before)
        rates.append([schedule.lr(i) for i in range(n_iters)])
        before = (before or 0) + schedule.cooldown_start if carried else None
    return rates


def test_cosine_warms_up_and_decays_to_zero_in_every_step():
    first, second = curve("cosine", steps=2, carried=False)
    assert first[0] == pytest.approx(0.1) and first[9] == 1.0  # 10 warmup iterations at the first step
    assert second[0] == pytest.approx(0.2) and second[4] == 1.0  # 5 at the later ones
    for rates, warmup in ((first, 10), (second, 5)):
        assert all(a >= b for a, b in zip(rates[9:], rates[10:])) and rates[-1] < 0.01
        i = 50
        assert rates[i] == pytest.approx(0.5 * (1 + math.cos(math.pi * (i - warmup) / (100 - warmup))))


def test_cosine_ar_peaks_follow_one_cosine_over_the_steps_with_a_floor():
    rates = curve("cosine-ar", steps=4, carried=False)
    expected = [max(0.5 * (1 + math.cos(math.pi * t / 4)), 0.1) for t in range(4)]
    assert [max(r) for r in rates] == pytest.approx(expected)
    assert expected[0] == 1.0 and 0.1 < expected[3] < expected[2] < expected[1] < 1
    assert [max(r) for r in curve("cosine-ar", steps=4, carried=False, ar_horizon=2)][2:] == pytest.approx([0.1] * 2)
    assert all(r[-1] < 0.01 * max(r) for r in rates)  # each step still decays to ~0


def test_const_cooldown_warms_up_once_holds_then_cools_on_the_last_fifth():
    rates = curve("const-cooldown", steps=3)
    assert rates[0][:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    for t, r in enumerate(rates):
        start = 0 if t else 10  # the later steps carry the optimizer: no warmup
        assert r[start:80] == [LR] * (80 - start)
        assert r[80:] == pytest.approx([1 - math.sqrt(k / 20) for k in range(20)])  # 20 = 0.2 x 100 iterations
        assert r[-1] < 0.25
    # a strategy that starts every step afresh (restart) warms up every step
    assert curve("const-cooldown", steps=2, carried=False)[1][0] == pytest.approx(0.2)


def test_rsqrt_decays_with_the_global_iteration_and_cools_from_the_trunk_rate():
    rates = curve("rsqrt", steps=3)  # T = one step's iterations = 100; the trunk goes on 80 iterations a step
    assert rates[0][10:80] == [LR] * 70  # the global iteration is below T all through the first step's trunk
    for t, r in enumerate(rates):
        before = 80 * t
        assert r[40] == pytest.approx(min(1, math.sqrt(100 / (before + 41))))
        trunk_rate = min(1, math.sqrt(100 / (before + 81)))
        assert r[80:] == pytest.approx([trunk_rate * (1 - math.sqrt(k / 20)) for k in range(20)])
    assert rates[2][0] < rates[1][79] < rates[1][0] == rates[0][79] == LR  # the trunk goes on where it was


def test_schedule_settings_are_checked():
    for bad in (["--lr_schedule=linear"], ["--cooldown_fraction=1"], ["--continue_from=last"], ["--ar_horizon=-1"],
                ["--lr_min_fraction=2"], ["--new_data_fraction=1.5"], ["--ema_weight=-0.1"]):
        with pytest.raises(SystemExit, match="error: --|unknown lr_schedule"):
            train.check_config(train.parse_config(bad))


def test_a_schedule_row_is_checked_before_any_compute(monkeypatch):
    """What the row cannot express is an error at start-up, not a cooldown of length 0 or another row's formula."""
    branch_only = schedules.Schedule("branch-only", schedules.constant, cooldown=schedules.sqrt_cooldown)
    monkeypatch.setitem(schedules.SCHEDULES, "branch-only", branch_only)
    with pytest.raises(SystemExit, match="schedule branch-only has a cooled branch but a new optimizer each step"):
        train.check_config(train.parse_config(["--lr_schedule=branch-only"]))
    with pytest.raises(SystemExit, match="unknown lr_schedule 'linear'"):
        schedules.step_schedule(config("linear"), 0, 1, 100, None)  # no row, so no formula to fall into


def test_a_grown_cosine_ar_run_says_its_horizon_moved(three_years, tmp_path, capsys):
    run = str(tmp_path / "run")
    args = [f"--data_root={three_years}", f"--out_dir={run}", "--lr_schedule=cosine-ar", "--budget_samples=64",
            "--batch_size=32", "--vocab_size=300", "--workers=0", "--eval_batch=64"]
    train_in_process([*args, "--steps=2018,2019"])  # H = 2
    assert "horizon" not in capsys.readouterr().out
    kept = str(tmp_path / "kept")
    shutil.copytree(run, kept)
    train_in_process([*args, "--steps=2018,2019,2020"])  # grown: H = 3 for step 3
    assert capsys.readouterr().out.count("cosine-ar's horizon was 2 steps when step 1 was trained and is 3 now") == 1
    train_in_process([*args, f"--out_dir={kept}", "--steps=2018,2019,2020", "--ar_horizon=2"])  # the old one kept
    assert "horizon" not in capsys.readouterr().out  # nothing to say, nothing refused: H = 2 is what 0 meant
    with pytest.raises(SystemExit, match=r"holds a run of --ar_horizon=0 \(not 2\)"):  # step 3 had H = 3
        train_in_process([*args, "--steps=2018,2019,2020", "--ar_horizon=2"])
    trained = {"lr_schedule": "cosine-ar", "ar_horizon": 0}
    assert schedules.horizon_note(config("cosine-ar"), trained, 5, 5) is None
    assert schedules.horizon_note(config("cosine-ar", ar_horizon=7), {**trained, "ar_horizon": 7}, 5, 6) is None
    assert schedules.horizon_note(config("cosine-ar"), {**trained, "lr_schedule": "cosine"}, 5, 6) is None
    assert schedules.SCHEDULES["cosine"].grown_note is None


# ----------------------------------------------------------------------------- runs that carry the optimizer
# 16 iterations a step; a 50% cooldown branches off at iteration 8; a resume checkpoint every 2 iterations
TINY = ["--budget_samples=512", "--batch_size=32", "--vocab_size=300", "--workers=0", "--log_interval=4",
        "--eval_batch=64", "--warmup_iters=2", "--warmup_iters_later=2", "--cooldown_fraction=0.5",
        "--ckpt_interval_samples=64"]


def starts_of(monkeypatch):
    """The weights each trained step starts from, as train.start_model made them."""
    starts = []

    def recording(strategy, step):
        model = start_model(strategy, step)
        starts.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model

    start_model = train.start_model
    monkeypatch.setattr(train, "start_model", recording)
    return starts


@pytest.mark.parametrize("continue_from", ["trunk", "cooled"])
def test_const_cooldown_deploys_the_cooled_branch_and_goes_on_from_the_trunk(two_years, tmp_path, monkeypatch,
                                                                           continue_from):
    starts = starts_of(monkeypatch)
    run = str(tmp_path / "run")
    train_in_process([f"--data_root={two_years}", f"--out_dir={run}", "--strategy=sequential",
                      "--lr_schedule=const-cooldown", f"--continue_from={continue_from}", *TINY])
    first, second = load(run, 1), load(run, 2)
    trunk = first["continue_point"]  # what the second step goes on from: the trunk, or the cooled branch, deployed
    assert same(trunk["model"], first["model"]) == (continue_from == "cooled")
    assert same(starts[1], trunk["model"])
    # the optimizer carries over: AdamW's own step count goes on from the first step's
    steps_done = {"trunk": (8, 16), "cooled": (16, 32)}[continue_from]
    assert (trunk["iterations"], second["continue_point"]["iterations"]) == steps_done
    assert int(second["continue_point"]["optimizer"]["state"][0]["step"]) == steps_done[1]
    if continue_from == "trunk":  # docs/schedules.md: about 4x the deployed weights (with the
        weights = report.tensor_bytes(first["model"])  # trunk's weights and two AdamW moments)
        assert round(os.path.getsize(os.path.join(run, "step01.pt")) / weights, 1) == 4.0


def test_cosine_keeps_no_trunk_and_goes_on_from_the_deployed_model(two_years, tmp_path, monkeypatch):
    starts = starts_of(monkeypatch)
    run = str(tmp_path / "run")
    cosine = [arg for arg in TINY if not arg.startswith("--cooldown_fraction=")]  # cosine has no cooldown
    train_in_process([f"--data_root={two_years}", f"--out_dir={run}", "--strategy=sequential", *cosine])
    continue_point = load(run, 1)["continue_point"]  # the deployed weights, no optimizer: none carried
    assert continue_point["optimizer"] is None and same(continue_point["model"], load(run, 1)["model"])
    assert same(starts[1], load(run, 1)["model"])


def test_a_strategy_that_starts_afresh_keeps_no_trunk_under_a_carried_schedule(two_years, tmp_path):
    run = str(tmp_path / "run")
    train_in_process([f"--data_root={two_years}", f"--out_dir={run}", "--strategy=restart",
                      "--lr_schedule=const-cooldown", *TINY])
    assert load(run, 1)["continue_point"] is None and load(run, 2)["continue_point"] is None


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["const-cooldown", "rsqrt"])
def test_a_run_stopped_mid_cooldown_resumes_bitwise(two_years, tmp_path, kind):
    """Stopped at iteration 12 of the first step (inside the cooldown, which began at 8): the trunk kept in the
    resume checkpoint is the one the second step goes on from, so both steps end bit for bit as an unstopped run."""
    args = [f"--data_root={two_years}", "--strategy=cumulative-all", f"--lr_schedule={kind}", *TINY]
    reference, stopped = str(tmp_path / "reference"), str(tmp_path / "stopped")
    train_in_process([f"--out_dir={reference}", *args])
    train_stopped(args, stopped, "step01-0000010.pt")  # the check at iteration 12 stops it
    assert not os.path.exists(os.path.join(stopped, "step01.pt"))
    resume = torch.load(os.path.join(stopped, "resume", "step01-0000012.pt"), weights_only=True)
    assert resume["trunk"]["iterations"] == 8
    train_in_process([f"--out_dir={stopped}", *args])
    for step in (1, 2):
        a, b = load(reference, step), load(stopped, step)
        assert same(a["model"], b["model"]) and same(a["continue_point"]["model"], b["continue_point"]["model"]), f"step {step}"


# ----------------------------------------------------------------------------- merging across time
@pytest.mark.parametrize("name", ["ema", "ema-from-merge"])
def test_ema_deploys_the_merge_of_the_unmerged_models(three_years, tmp_path, monkeypatch, capsys, name):
    starts = starts_of(monkeypatch)
    run, w = str(tmp_path / "run"), 0.3
    train_in_process([f"--data_root={three_years}", f"--out_dir={run}", f"--strategy={name}", f"--ema_weight={w}",
                      "--new_data_fraction=0.5", "--budget_samples=64", "--batch_size=32", "--vocab_size=300", "--workers=0",
                      "--log_interval=100", "--eval_batch=64", "--warmup_iters=1", "--warmup_iters_later=1"])
    assert capsys.readouterr().out.count("new_data_fraction has no effect: nothing is replayed") == 2  # steps 2, 3
    ckpts = [load(run, s) for s in (1, 2, 3)]
    trained = [ckpt["continue_point"]["model"] if name == "ema" else None for ckpt in ckpts]
    if name == "ema":  # it goes on from the trained model, so that is what its record keeps
        assert same(trained[0], ckpts[0]["model"])  # nothing to merge with at the first step
        m1, m2, m3 = ckpts[0]["model"], trained[1], trained[2]
        deployed = ckpts[2]["model"]
        for k in deployed:
            if deployed[k].is_floating_point():
                expected = w * w * m1[k] + w * (1 - w) * m2[k] + (1 - w) * m3[k]
                assert torch.allclose(deployed[k], expected, atol=1e-6, rtol=1e-5), k
        assert not same(trained[1], ckpts[1]["model"])
    # ema goes on training from the unmerged model; ema-from-merge from the merge
    assert same(starts[2], ckpts[1]["continue_point"]["model"])
    assert same(starts[2], ckpts[1]["model"]) == (name == "ema-from-merge")
    if name == "ema":  # docs/schedules.md: the unmerged model beside the deployed one, 2x the size
        size = os.path.getsize(os.path.join(run, "step02.pt"))
        assert round(size / report.tensor_bytes(ckpts[1]["model"]), 1) == 2.0
    n_params = sum(p.numel() for p in load_checkpoint(os.path.join(run, "step01.pt"))[0].parameters())
    assert ckpts[2]["end_of_step"] == {"ema_weight": w, "flops": 2 * n_params}  # a multiply-add per parameter


# ----------------------------------------------------------------------------- fixed-ratio replay
def test_new_data_fraction_sets_the_share_of_new_samples(tmp_path, tokenizer):  # noqa: F811
    step_data = [[data.Part(str(2018 + s), [write_shard(tmp_path / f"{s}_{i}.tar", f"y{s}_{i}", 10)
                                            for i in range(4 if s < 2 else 1)])] for s in range(3)]
    everything = strategies.STRATEGIES["cumulative-all"]
    at = lambda t, fraction=0.0: strategies.TimeStep(t, [], step_data,  # noqa: E731
                                                     SimpleNamespace(new_data_fraction=fraction), None, None)
    default = strategies.step_parts(everything, at(2))
    assert [p.share for p in default] == [None] * 3  # the default draws as before: in proportion to sizes
    assert strategies.step_parts(everything, at(0, 0.5))[0].share is None  # nothing to replay at step 1
    parts = strategies.step_parts(everything, at(2, 0.5))
    assert [p.share for p in parts] == pytest.approx([0.25, 0.25, 0.5])  # the old years in proportion to sizes
    stream = make_stream(parts, tokenizer, budget_samples=32)
    samples = stream.samples(np.random.default_rng(0))
    new = sum(next(samples)[1].startswith("y2_") for _ in range(30000))
    assert abs(new / 30000 - 0.5) < 0.03  # proportional would give 10 / 90; shards of 10: sd of the share ~0.01
