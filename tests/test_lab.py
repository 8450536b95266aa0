"""The lab's worked exercise (docs/lab.md): examples/l2.py, an L2 pull to the previous model, added
from a file of its own. Its penalty is the formula, zero with zero gradient at the previous weights,
one batch's gradient at any accum_steps; a run's FLOPs are a hand count; it holds the model nearer
the previous one; two processes end with the same weights. And the solutions of the lab's other
exercises, read from docs/lab.md, keep to the documented tables and do what the lab says."""
import ast
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import model as model_module
import strategies
import train
from conftest import ENV, REPO, builtin_tiny_model, import_file, load, tables_kept, train_in_process
from test_train import loss_and_grads, random_pairs, tiny_clip
from world import World

L2 = os.path.join(REPO, "examples", "l2.py")
TINY = ["--budget_samples=256", "--batch_size=32", "--vocab_size=300", "--workers=0",
        "--log_interval=2", "--eval_batch=64", "--warmup_iters=1", "--warmup_iters_later=1"]
ONE = World(0, 1, False, torch.device("cpu"))


@pytest.fixture(scope="module")
def l2():
    """examples/l2.py run as a module (its rows registered); the tables as they were afterwards."""
    with tables_kept(strategies.STRATEGIES, strategies.SETTINGS):
        yield import_file(L2)


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


def lab_page() -> str:
    """docs/lab.md, its whitespace made single spaces (a sentence whatever its line breaks)."""
    return " ".join(open(os.path.join(REPO, "docs", "lab.md")).read().split())


def test_the_labs_hand_counts_are_the_lessons_tiny_model():
    """Q3, Q9 and Q12 count the lesson's compute by hand: 12,000 samples a step in whole batches of
    64, 3 forward passes a sample trained by the tiny model of the built-in benchmark; l2 adds 6
    FLOPs a weight once a batch at steps 2 and 3, A-GEM a reference batch of the same size."""
    model, batch = builtin_tiny_model(), 64
    weights, f = model.num_params(), model.flops_per_pair()
    step = 12_000 // batch * batch
    sequential, l2_adds = 3 * step * 3 * f, 2 * step // batch * 6 * weights

    def e(x, digits=2):  # 5.44e+12, 2.9e+9
        return re.sub(r"e\+0", "e+", f"{x:.{digits}e}")
    said = [f"12,000 // 64 = {step // batch} iterations of 64, {step:,} samples; 3 steps make "
            f"{3 * step:,}",
            f"Both runs see {3 * step:,} samples and spend {e(sequential)} FLOPs",
            f"l2's FLOPs are {e(sequential + l2_adds)} against sequential's {e(sequential)}",
            f"for the tiny model's {weights:,} parameters, about "
            f"{round(6 * weights / batch, -3):,.0f} a sample, against 3 forward passes of about "
            f"{3 * f / 1e6:.0f} million. Two steps of {step:,} samples add {e(l2_adds, 1)}.",
            f"Why is the compute {e(5 * step * 3 * f)}, and the same for both?",
            f"Step 1 costs {e(step * 3 * f)}, as sequential's",
            f"3 more forward passes a sample, {e(step * 6 * f)} a step"]
    page = lab_page()
    assert [s for s in said if s not in page] == []


def test_l2_py_is_as_long_as_the_lab_says():
    assert f"`examples/l2.py` does it in {len(open(L2).read().splitlines())} lines" in lab_page()


# ----------------------------------------------------------------------------- the lab's solutions
def solutions(folder) -> dict[str, str]:
    """The whole files of docs/lab.md's python blocks (those that run train.run), written to
    folder/examples/ under the name their command gives them: {strategy name: path}."""
    lab = open(os.path.join(REPO, "docs", "lab.md")).read()
    files = {}
    for block in re.findall(r"```python\n(.*?)```", lab, flags=re.S):
        name = re.search(r'train\.run\(\["--strategy=([\w-]+)"', block)
        if name:
            path = folder / "examples" / f"{name.group(1).replace('-', '_')}.py"
            path.parent.mkdir(exist_ok=True)
            path.write_text(block)
            files[name.group(1)] = str(path)
    return files


@pytest.fixture
def registered():
    """load(path): run a file as a module (its rows registered); the tables put back afterwards."""
    with tables_kept(strategies.STRATEGIES, strategies.SETTINGS):
        yield import_file


def test_the_labs_solutions_touch_only_the_documented_tables(tmp_path, monkeypatch):
    import test_extending
    files = solutions(tmp_path)
    assert set(files) == {"replay-last", "agem-memory"}
    monkeypatch.setattr(test_extending, "EXAMPLES", str(tmp_path / "examples"))
    test_extending.test_the_examples_change_the_project_only_through_its_documented_tables()


def test_replay_last_trains_on_the_step_before_and_its_own(tmp_path, registered):
    registered(solutions(tmp_path)["replay-last"])
    row, cfg = strategies.STRATEGIES["replay-last"], train.parse_config([])
    replay = [strategies.replay_of(row, strategies.TimeStep(t, [], [], cfg, None, ONE))
              for t in range(4)]
    assert replay == [{0: 1.0}, {0: 1.0, 1: 1.0}, {1: 1.0, 2: 1.0}, {2: 1.0, 3: 1.0}]


@pytest.mark.slow
def test_agem_with_a_capped_memory_runs_and_its_flops_are_a_hand_count(tmp_path, two_years,
                                                                       registered):
    for name in ("memory", "agem"):
        registered(os.path.join(REPO, "examples", f"{name}.py"))
    registered(solutions(tmp_path)["agem-memory"])
    run = str(tmp_path / "run")
    train_in_process([f"--data_root={two_years}", f"--out_dir={run}", *TINY,
                      "--strategy=agem-memory", "--memory_samples=100"])
    second = load(run, 2)
    f = model_module.CLIP(model_module.make_config("tiny", vocab_size=300)).flops_per_pair()
    assert second["flops"] == 256 * 3 * f + 256 * 3 * f  # each batch's twin from the memory
    assert second["start_of_step"]["samples_read"] == 256  # memory's fill read 2018 once
    kept = second["state"]["memory"]
    assert list(kept) == [0] and 0 < kept[0] < 1  # a share of 2018: 100 of its 256 pairs


def test_docs_extending_md_shows_l2_py_as_it_is():
    """The page's copy of examples/l2.py is the file, but for its docstrings."""
    def code(text):
        tree = ast.parse(text)
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            first = body[0] if isinstance(body, list) and body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                node.body = body[1:] or [ast.Pass()]
        return ast.dump(tree)
    page = open(os.path.join(REPO, "docs", "extending.md")).read()
    shown = next(b for b in re.findall(r"```python\n(.*?)```", page, flags=re.S)
                 if 'STRATEGIES["l2"]' in b)
    assert code(shown) == code(open(L2).read())


def summary_file(tmp_path):
    """docs/extending.md's summary number as a file; and a run folder whose eval_matrix.json holds
    it, as a run trained with that file writes it (no checkpoints: evaluate.py stops there)."""
    page = open(os.path.join(REPO, "docs", "extending.md")).read()
    block = next(b for b in re.findall(r"```python\n(.*?)```", page, flags=re.S) if "gem_bwt" in b)
    module = tmp_path / "my_summaries.py"
    module.write_text(f"import sys\nsys.path.insert(0, {REPO!r})\n" + block)
    run = tmp_path / "run"
    run.mkdir()
    written = {"metric": "mean_R@1", "steps": ["2018"], "tasks": ["2018"], "matrix": [[20.0]],
               "summary": {"id": 20.0, "gem_bwt": None},
               "results": {"2018": {"2018": {"mean_R@1": 20.0}}}}
    (run / "eval_matrix.json").write_text(json.dumps(written))
    return str(module), str(run)


def test_the_summary_number_of_docs_extending_md_is_gems_and_evaluate_keeps_it(tmp_path):
    import evaluate
    import score
    module, run = summary_file(tmp_path)
    saved = dict(evaluate.SUMMARIES)
    try:
        with pytest.raises(SystemExit, match="gem_bwt.*--module=FILE"):  # it would drop it
            score.main([f"--run={run}", "--device=cpu"])
        with pytest.raises(SystemExit, match="no step checkpoints"):  # past that check
            score.main([f"--run={run}", "--device=cpu", f"--module={module}"])
        gem_bwt = evaluate.SUMMARIES["gem_bwt"]
        matrix = [[20.0, 5.0, 1.0], [25.0, 30.0, None], [15.0, 28.0, 35.0]]
        assert gem_bwt(matrix) == pytest.approx(((15 - 20) + (28 - 30)) / 2)
        assert gem_bwt([[20.0]]) is None
    finally:
        evaluate.SUMMARIES.clear()
        evaluate.SUMMARIES.update(saved)


def test_score_py_from_the_command_line_keeps_a_files_summary_number(tmp_path):
    """tools/score.py runs as __main__ and imports evaluate: the file's `import evaluate` is that
    module, so the row it adds is the one used (evaluate.py as the program would load a second
    copy)."""
    module, run = summary_file(tmp_path)
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "score.py"), f"--run={run}",
                          "--device=cpu", f"--module={module}"], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert "no step checkpoints" in out.stderr, out.stderr
