"""Replay buffers: sizes and nesting at every step; the table of strategies; LwF's and patching's parts; and two
strategies added from this file alone (as a forker would), trained through train.main."""
import inspect
import json
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import synthetic
import train
from conftest import REPO, builtin_tiny_model, train_in_process
from data import Part, keep_sample
from model import CLIP, make_config
from settings import Setting, numbers
from strategies import (SETTINGS, STRATEGIES, Strategy, TimeStep, distillation_loss, equal_buffer, exp_buffer,
                        get_strategy, interpolate, new_only, step_parts)


def at(t):
    """A strategy's view of step t, as much of it as a replay rule of this file reads."""
    return TimeStep(t, [], [], None, None, None)


@pytest.mark.parametrize("replay", [exp_buffer, equal_buffer])
def test_buffer_sizes_and_nesting(replay):
    for t in range(1, 12):
        now, before = replay(at(t)), replay(at(t - 1))
        assert now[t] == 1.0                                          # all new data
        assert sum(f for s, f in now.items() if s < t) <= 2.0 + 1e-9  # at most 2D of old data
        assert all(0 < f <= 1.0 for f in now.values())
        for s in range(t):                                            # a buffer only ever shrinks
            assert now[s] <= before[s]


def test_exp_and_equal_fractions():
    assert exp_buffer(at(4)) == {3: 1.0, 2: 0.5, 1: 0.25, 0: 0.125, 4: 1.0}
    assert equal_buffer(at(1)) == {0: 1.0, 1: 1.0}
    assert equal_buffer(at(4)) == {0: 0.5, 1: 0.5, 2: 0.5, 3: 0.5, 4: 1.0}


def test_kept_samples_stay_nested_through_time():
    keys = [f"2019_{i:07d}" for i in range(3000)]
    kept_before = set(keys)
    for t in range(1, 8):
        fraction = exp_buffer(at(t))[0]
        kept = {k for k in keys if keep_sample(k, fraction, seed=0)}
        assert kept <= kept_before                                     # dropped once, never back
        assert abs(len(kept) / len(keys) - fraction) < 0.04
        kept_before = kept


def test_step_parts_and_budgets():
    steps = [[Part(str(2018 + s), [(f"{s}.tar", 100)])] for s in range(4)]
    config = SimpleNamespace(new_data_fraction=0.0)
    at = lambda t: TimeStep(t, [], steps, config, None, None)  # noqa: E731
    parts = step_parts(STRATEGIES["cumulative-exp"], at(3))
    assert [(p.name, p.keep_fraction) for p in parts] == [("2018", 0.25), ("2019", 0.5), ("2020", 1.0), ("2021", 1.0)]
    assert [p.name for p in step_parts(STRATEGIES["sequential"], at(2))] == ["2020"]
    assert [STRATEGIES["oracle"].budget_units(t) for t in range(4)] == [1, 2, 3, 4]
    assert all(STRATEGIES[n].budget_units(3) == 1 for n in STRATEGIES if n != "oracle")
    assert not STRATEGIES["restart"].warm_start and STRATEGIES["sequential"].warm_start
    with pytest.raises(SystemExit, match="unknown strategy 'nope'.*sequential"):
        get_strategy("nope")


def test_distillation_is_zero_for_identical_models_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    img, txt = F.normalize(torch.randn(16, 8, generator=g), dim=-1), F.normalize(torch.randn(16, 8, generator=g), dim=-1)
    scale = torch.tensor(14.3)
    out = lambda img: {"image_features": img, "text_features": txt, "logit_scale": scale}  # noqa: E731
    assert distillation_loss(out(img), out(img)).abs() < 1e-6
    other = F.normalize(img + 0.5 * torch.randn(16, 8, generator=g), dim=-1)
    assert distillation_loss(out(other), out(img)) > 1e-3


def test_interpolate_endpoints_and_midpoint():
    torch.manual_seed(0)
    prev = CLIP(make_config("tiny", vocab_size=64)).state_dict()
    torch.manual_seed(1)
    ft = CLIP(make_config("tiny", vocab_size=64)).state_dict()
    at0, at1, half = interpolate(prev, ft, 0.0), interpolate(prev, ft, 1.0), interpolate(prev, ft, 0.5)
    assert all(torch.equal(at0[k], prev[k]) for k in prev)
    assert all(torch.equal(at1[k], ft[k]) for k in ft)
    assert all(torch.allclose(half[k], (prev[k] + ft[k]) / 2) for k in ft)


def test_patchings_search_and_a_merge_cost_what_the_pages_say():
    """docs/results.md and docs/schedules.md count, on the built-in benchmark at the defaults (its
    tiny model), patching's search: each year's validation pairs (data.is_validation of its 8,000
    keys), those of the steps so far embedded once per coefficient at steps 2 to 5; and a merge: a
    multiply-add per weight."""
    model, cfg = builtin_tiny_model(), train.parse_config([])
    made = {k: v.default for k, v in
            inspect.signature(synthetic.make_synthetic_benchmark).parameters.items()}
    validation = [min(cfg.validation_samples, sum(data.is_validation(f"{year}_{i:07d}")
                                                  for i in range(made["train_samples_per_year"])))
                  for year in made["years"]]
    alphas = len(numbers(cfg.patch_alphas))
    pairs = alphas * sum(sum(validation[:t + 1]) for t in range(1, len(validation)))
    f = model.flops_per_pair()
    step = cfg.budget_samples // cfg.batch_size * cfg.batch_size * 3 * f
    trained, patching = len(validation) * step, len(validation) * step + pairs * f

    def e(x):  # 2.6e6
        return re.sub(r"e\+0*", "e", f"{x:.1e}")
    results, schedules = (" ".join(open(os.path.join(REPO, "docs", page)).read().split())
                          for page in ("results.md", "schedules.md"))
    more, oracle = 100 * (patching / trained - 1), 3 * trained  # oracle: 1 + 2 + ... + 5 steps
    assert (f"patching's FLOPs are {patching:.2e} at these settings (+{more:.1f}%: the four "
            f"searches embed {pairs:,} validation pairs in all, {alphas} coefficients each time), "
            f"{patching / oracle:.2f}x oracle") in results
    merge = 2 * model.num_params()
    assert f"Every row costs the same {trained:.2e} FLOPs (the merges' {e(merge)} a step" in results
    assert f"({e(merge)} against {e(step)} for a step of the tiny model" in schedules


# ----------------------------------------------------------------------------- a strategy added from outside
TINY = ["--budget_samples=64", "--batch_size=32", "--vocab_size=300", "--workers=0", "--log_interval=100",
        "--eval_batch=64", "--warmup_iters=1", "--warmup_iters_later=1"]


def logged(run_dir, event):
    return [r for r in map(json.loads, open(os.path.join(run_dir, "log.jsonl"))) if r["event"] == event]


def test_a_strategy_defined_here_trains_on_the_last_two_steps(tmp_path, three_years, monkeypatch):
    recent = Strategy("cumulative-recent", True, lambda step: {s: 1.0 for s in range(max(0, step.t - 1), step.t + 1)})
    monkeypatch.setitem(STRATEGIES, recent.name, recent)
    run_dir = str(tmp_path / "run")
    train_in_process([f"--data_root={three_years}", f"--out_dir={run_dir}", "--strategy=cumulative-recent", *TINY])
    assert [list(r["mix"]) for r in logged(run_dir, "step_start")] == [["2018"], ["2018", "2019"], ["2019", "2020"]]
    assert [r["step"] for r in logged(run_dir, "step_end")] == ["2018", "2019", "2020"]


def test_a_strategy_defined_here_merges_at_the_end_of_each_step(tmp_path, two_years, monkeypatch):
    """An EMA of past models as the end-of-step action, with a setting of its own: what it leaves is what is saved,
    evaluated and warm-started from, and the compute it reports is counted."""
    calls = []

    def ema_merge(model, step):
        keep = step.config.ema_keep
        finetuned = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict({k: keep * step.previous[k] + (1 - keep) * v for k, v in finetuned.items()})
        calls.append((step.t, step.previous, finetuned))
        return {"ema_keep": keep, "flops": 7}

    monkeypatch.setitem(SETTINGS, "ema_keep", Setting(0.5, "my-ema: the previous model's weight"))
    monkeypatch.setitem(STRATEGIES, "my-ema", Strategy("my-ema", True, new_only, end_of_step=ema_merge))
    run_dir = str(tmp_path / "run")
    train_in_process([f"--data_root={two_years}", f"--out_dir={run_dir}", "--strategy=my-ema", "--ema_keep=0.25",
                      *TINY])
    step1, step2 = (torch.load(f"{run_dir}/step0{i}.pt", weights_only=True) for i in (1, 2))
    assert [t for t, _, _ in calls] == [1]  # asked from the second step on: at the first there is nothing to merge
    _, previous, finetuned = calls[0]
    assert all(torch.equal(previous[k], step1["model"][k]) for k in previous)
    assert all(torch.equal(step2["model"][k], 0.25 * previous[k] + 0.75 * finetuned[k]) for k in previous)
    assert step2["end_of_step"] == {"ema_keep": 0.25, "flops": 7} and step1["end_of_step"] == {}
    assert step2["flops"] == step1["flops"] + 7 and step2["config"]["ema_keep"] == 0.25


# ----------------------------------------------------------------------------- what a forker can rely on
def counting(model, step):
    """An end-of-step action that keeps state: how many times it ran, and a tensor that grows each time."""
    n = step.state.get("n", 0) + 1
    return {"flops": 5, "n": n, "state": {"n": n, "ones": torch.ones(1000 * n)}}


def test_a_strategys_state_is_saved_with_each_step_and_handed_back(tmp_path, three_years, monkeypatch, capsys):
    monkeypatch.setitem(STRATEGIES, "counting", Strategy("counting", True, new_only, end_of_step=counting))
    run_dir = str(tmp_path / "run")
    train_in_process([f"--data_root={three_years}", f"--out_dir={run_dir}", "--strategy=counting", *TINY])
    ckpts = [torch.load(f"{run_dir}/step0{i}.pt", weights_only=True) for i in (1, 2, 3)]
    assert [c["state"].get("n") for c in ckpts] == [None, 1, 2]  # from the second step on, handed back each time
    assert [c["end_of_step"] for c in ckpts] == [{}, {"flops": 5, "n": 1}, {"flops": 5, "n": 2}]
    assert torch.equal(ckpts[2]["state"]["ones"], torch.ones(2000))
    out = capsys.readouterr().out  # the checkpoint's size line counts the state's tensors
    assert "step02.pt: " in out and "of which the strategy's state 0.0 MB" in out  # 4000 bytes


@pytest.mark.parametrize("row, message", [
    (dict(end_of_step=lambda model, step: {"patched": True}), "end_of_step returned {'patched': True}; return a "
                                                               "dict with 'flops'"),
    (dict(start_of_step=lambda model, step: {"flops": 1, "state": [1]}), "start_of_step's 'state' is not a dict"),
    (dict(end_of_step=lambda model, step: {"flops": 0, "w": torch.ones(1)}), "keep tensors in 'state'"),
    (dict(end_of_step=lambda model, step: {"flops": 0, "state": {"w": np.ones(2)}}),
     "could not be read back from stepNN.pt"),
    (dict(batch_loss=lambda model, step: (lambda *batch: 0.0)), "its batch_loss has no flops_per_sample"),
    (dict(before_update=lambda model, step: (lambda model: None)), "its before_update has no flops_per_sample")])
def test_a_hook_that_declares_no_compute_or_keeps_what_cannot_be_saved_is_an_error(tmp_path, two_years, monkeypatch,
                                                                                    row, message):
    monkeypatch.setitem(STRATEGIES, "mine", Strategy("mine", True, new_only, **row))
    with pytest.raises(SystemExit, match=re.escape(message)):
        train_in_process([f"--data_root={two_years}", f"--out_dir={tmp_path}/run", "--strategy=mine", *TINY])


@pytest.mark.parametrize("row, message", [
    (dict(replay=lambda step: {step.t - 1: 1.0}), "replay at step 0 = {-1: 1.0}"),
    (dict(replay=lambda step: {step.t: 2.0}), "replay at step 0 = {0: 2.0}"),
    (dict(replay=new_only, budget_units=lambda t: 0.5), "budget_units(0) = 0.5")])
def test_a_row_that_cannot_be_trained_is_refused_before_any_compute(tmp_path, two_years, monkeypatch, row, message):
    monkeypatch.setitem(STRATEGIES, "mine", Strategy("mine", True, **row))
    with pytest.raises(SystemExit, match=re.escape(f"error: strategy mine: {message}")):
        train_in_process([f"--data_root={two_years}", f"--out_dir={tmp_path}/run", "--strategy=mine", *TINY])
    assert not os.path.exists(tmp_path / "run" / "tokenizer.json")


def test_an_action_that_only_keeps_state_leaves_the_run_as_it_was(tmp_path, three_years, monkeypatch):
    """Under a schedule with a cooled branch, an end-of-step action that changes no weight must not
    move the continue point from the trunk to the branch's end: the run is sequential's, bit for bit."""
    monkeypatch.setitem(STRATEGIES, "counting", Strategy("counting", True, new_only, end_of_step=counting))
    runs = {name: str(tmp_path / name) for name in ("sequential", "counting")}
    for name, run_dir in runs.items():
        train_in_process([f"--data_root={three_years}", f"--out_dir={run_dir}", f"--strategy={name}",
                          "--lr_schedule=const-cooldown", "--cooldown_fraction=0.5", *TINY])
    for t in (1, 2, 3):
        a, b = (torch.load(f"{runs[name]}/step0{t}.pt", weights_only=True) for name in runs)
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        cp_a, cp_b = a["continue_point"], b["continue_point"]
        assert cp_a["iterations"] == cp_b["iterations"]
        assert all(torch.equal(cp_a["model"][k], cp_b["model"][k]) for k in cp_a["model"])
