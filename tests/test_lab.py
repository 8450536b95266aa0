"""The lab's worked exercise (docs/lab.md): examples/l2.py, an L2 pull to the previous model, added
from a file of its own. Its penalty is the formula, zero with zero gradient at the previous weights,
one batch's gradient at any accum_steps; a run's FLOPs are a hand count; it holds the model nearer
the previous one; two processes end with the same weights."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import model as model_module
import strategies
import train
from conftest import ENV, REPO, train_in_process
from test_train import loss_and_grads, random_pairs, tiny_clip
from world import World

L2 = os.path.join(REPO, "examples", "l2.py")
TINY = ["--budget_samples=256", "--batch_size=32", "--vocab_size=300", "--workers=0",
        "--log_interval=2", "--eval_batch=64", "--warmup_iters=1", "--warmup_iters_later=1"]
ONE = World(0, 1, False, torch.device("cpu"))


@pytest.fixture(scope="module")
def l2():
    """examples/l2.py run as a module (its rows registered); the tables as they were afterwards."""
    tables = [strategies.STRATEGIES, strategies.SETTINGS]
    saved = [dict(table) for table in tables]
    spec = importlib.util.spec_from_file_location("example_l2", L2)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    for table, before in zip(tables, saved):
        table.clear()
        table.update(before)


def load(run_dir, step):
    return torch.load(os.path.join(run_dir, f"step{step:02d}.pt"), weights_only=True)


def test_the_pull_is_the_formula_zero_at_the_previous_weights_and_one_batchs_gradient(l2):
    model = tiny_clip()
    previous = {k: v.clone() for k, v in model.state_dict().items()}
    step = strategies.TimeStep(1, ["a", "b"], [], train.parse_config(["--l2_weight=30"]), None, ONE,
                               previous=previous)
    pull = l2.Pull(model, step)
    at_previous = pull(None, None)
    at_previous.backward()
    assert at_previous.item() == 0
    assert all(float(p.grad.abs().max()) == 0 for p in model.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    by_hand = 30 / 2 * sum(float(((p.detach() - previous[k]) ** 2).sum())
                           for k, p in model.named_parameters())
    moved = pull(None, None).item()
    assert moved > 0 and moved == pytest.approx(by_hand, rel=1e-5)
    images, tokens = random_pairs(16)
    _, whole = loss_and_grads(model, model, images, tokens, 1, ONE, pull)
    _, split = loss_and_grads(model, model, images, tokens, 2, ONE, pull)
    for name, grad in split.items():
        torch.testing.assert_close(grad, whole[name], rtol=1e-4, atol=1e-6, msg=name)
    # the pull's own share of the gradient: l2_weight (w - w_previous), counted once, not twice
    _, plain = loss_and_grads(model, model, images, tokens, 2, ONE)
    for name, p in model.named_parameters():
        torch.testing.assert_close(split[name] - plain[name], 30 * (p.detach() - previous[name]),
                                   rtol=1e-3, atol=1e-6, msg=name)


def test_its_setting_is_checked_before_any_compute(l2):
    with pytest.raises(SystemExit, match=r"--l2_weight=-1.0 is not valid; use 0 or more"):
        train.check_config(train.parse_config(["--l2_weight=-1"]))


@pytest.mark.slow
def test_a_two_step_runs_flops_are_a_hand_count_and_it_stays_nearer_the_previous_model(
        l2, two_years, tmp_path):
    runs = {name: str(tmp_path / name) for name in ("l2", "sequential")}
    for name, args in (("l2", ["--strategy=l2", "--l2_weight=100"]), ("sequential", [])):
        train_in_process([f"--data_root={two_years}", f"--out_dir={runs[name]}", *TINY, *args])
    first, second = load(runs["l2"], 1), load(runs["l2"], 2)
    shape = model_module.make_config("tiny", vocab_size=300)
    f = model_module.CLIP(shape).flops_per_pair()
    n_params = model_module.CLIP(shape).num_params()
    assert first["flops"] == 256 * 3 * f  # no hook at the first step: nothing before it to pull to
    # 8 batches, each paying 6 FLOPs a weight once, besides 3 forward passes a sample trained
    assert second["flops"] == pytest.approx(256 * 3 * f + 8 * 6 * n_params, rel=1e-12)
    sequential = load(runs["sequential"], 2)
    shared = load(runs["sequential"], 1)["model"]
    assert all(torch.equal(first["model"][k], v) for k, v in shared.items())  # the same step 1

    def moved(record):  # how far step 2 went from step 1's deployed model
        return sum(float(((record["model"][k] - v) ** 2).sum()) for k, v in shared.items())
    assert moved(second) < 0.5 * moved(sequential)


@pytest.mark.slow
def test_two_processes_end_with_the_same_weights(tmp_path, two_years):
    """Under torchrun every save compares the processes' weights (a difference is refused)."""
    run = tmp_path / "run"
    args = [f"--data_root={two_years}", f"--out_dir={run}", *TINY, "--budget_samples=64",
            "--accum_steps=2"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out = subprocess.run([*torchrun, L2, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and os.path.exists(run / "step02.pt"), out.stderr[-3000:]

