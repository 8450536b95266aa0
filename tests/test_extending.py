"""Methods past the paper, each from a file of its own in examples/ (docs/extending.md): A-GEM (a gradient hook
and a draw of old data), LwF on replayed data (a batch loss that draws its own batches), a memory capped at M
samples (replay that sees the run), WiSE-FT (the anchor) and SigLIP (a loss). For each: a SIGKILLed run reruns
bitwise, accum_steps 1 and 2 agree to rounding, the FLOPs ledger is a hand count, and two processes end with the
same weights. And the examples touch no project module but its documented tables."""
import ast
import glob
import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter

import pytest
import torch

import data
import evaluate
import model as model_module
import schedules
import strategies
import synthetic
import train
from checkpoints import load_checkpoint, to_openclip
from conftest import ENV, REPO, import_file, load, same, tables_kept, train_in_process
from test_resilience import kill_mid_step

EXAMPLES = os.path.join(REPO, "examples")
TINY = ["--budget_samples=256", "--batch_size=32", "--vocab_size=300", "--workers=0", "--log_interval=2",
        "--eval_batch=64", "--warmup_iters=1", "--warmup_iters_later=1", "--ckpt_interval_samples=64"]
ROWS = {  # example file: the arguments that run it
    "agem": ["--strategy=agem"],
    "replay_distill": ["--strategy=replay-distill"],
    "memory": ["--strategy=memory", "--memory_samples=100"],
    "wiseft": ["--strategy=wiseft", "--wiseft_alpha=0.3"],
    "siglip": ["--loss=siglip", "--strategy=cumulative-all"],
}
TABLES = [strategies.STRATEGIES, strategies.SETTINGS, schedules.SCHEDULES, schedules.SETTINGS, model_module.LOSSES,
          evaluate.SUMMARIES]


@pytest.fixture(scope="module", autouse=True)
def examples():
    """Every example's rows registered for this file's tests; the tables as they were afterwards."""
    with tables_kept(*TABLES):
        yield {name: import_file(os.path.join(EXAMPLES, f"{name}.py")) for name in ROWS}


@pytest.fixture(scope="module")
def references(two_years, tmp_path_factory):
    """{example: an uninterrupted one-process run of it, 2 steps of 8 iterations}."""
    runs = {}
    for name, args in ROWS.items():
        runs[name] = str(tmp_path_factory.mktemp(name) / "run")
        train_in_process([f"--data_root={two_years}", f"--out_dir={runs[name]}", *TINY, *args])
    return runs


# ----------------------------------------------------------------------------- the documented tables only
def documented_tables() -> set[tuple[str, str]]:
    """(module, TABLE) of every extension point the recipe at the top of strategies.py lists."""
    recipe = strategies.__doc__.split("Every extension point is a table row")[1].split("\n\n")[0]
    return set(re.findall(r"\b([a-z]+)\.([A-Z]+)\b", recipe))


def test_the_examples_change_the_project_only_through_its_documented_tables():
    tables = documented_tables()
    assert tables == {("strategies", "STRATEGIES"), ("strategies", "SETTINGS"), ("schedules", "SCHEDULES"),
                      ("schedules", "SETTINGS"), ("model", "LOSSES"), ("evaluate", "SUMMARIES")}
    project = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "*.py"))}
    for path in sorted(glob.glob(os.path.join(EXAMPLES, "*.py"))):
        tree = ast.parse(open(path).read())
        modules = {alias.asname or alias.name: alias.name for node in ast.walk(tree)
                   if isinstance(node, ast.Import) for alias in node.names if alias.name in project}
        imported = {alias.asname or alias.name: (node.module, alias.name) for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module in project for alias in node.names}

        def project_value(node):  # (module, name) a Name or module.NAME stands for, if the project's
            if isinstance(node, ast.Name):
                return imported.get(node.id)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
                return modules[node.value.id], node.attr
            return None

        def rooted(node):  # a chain of attributes and items that starts at something of the project's
            while isinstance(node, (ast.Attribute, ast.Subscript)):
                node = node.value
            return isinstance(node, ast.Name) and (node.id in modules or node.id in imported)

        for node in ast.walk(tree):
            targets = (node.targets if isinstance(node, (ast.Assign, ast.Delete)) else
                       [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
            for target in targets:
                if isinstance(target, ast.Subscript) and project_value(target.value):  # a row of a table
                    assert project_value(target.value) in tables, f"{path}: {ast.unparse(target)}"
                else:  # nothing else the project owns, however deep: no attribute, no item of a row
                    assert not (isinstance(target, (ast.Attribute, ast.Subscript)) and rooted(target)), \
                        f"{path}: {ast.unparse(target)}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr":
                assert not project_value(node.args[0]) and not (
                    isinstance(node.args[0], ast.Name) and node.args[0].id in modules), path


# ----------------------------------------------------------------------------- each example
def flops_per_pair():
    return model_module.CLIP(model_module.make_config("tiny", vocab_size=300)).flops_per_pair()


def hand_count(name: str, record: dict) -> int:
    """Step 2's FLOPs: 256 samples trained at 3 forward passes each, plus what the example adds."""
    f, n_params = flops_per_pair(), sum(p.numel() for p in model_module.CLIP(
        model_module.make_config("tiny", vocab_size=300, init_logit_bias=-10.0 if name == "siglip" else None))
        .parameters())
    extra = {"agem": 256 * 3 * f,            # each batch's twin from 2018, forward and backward
             "replay_distill": 256 * 4 * f,  # the teacher's forward and the student's forward and backward
             "wiseft": 2 * n_params}.get(name, 0)  # the ensemble: a multiply-add per parameter
    return 256 * 3 * f + extra


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ROWS))
def test_accum_steps_1_and_2_agree_and_the_flops_are_a_hand_count(name, references, two_years, tmp_path):
    run = str(tmp_path / "accum2")
    train_in_process([f"--data_root={two_years}", f"--out_dir={run}", *TINY, *ROWS[name], "--accum_steps=2"])
    for step in (1, 2):
        a, b = load(references[name], step), load(run, step)
        assert a["flops"] == b["flops"] and a["samples_read"] == b["samples_read"]
        for k in a["model"]:
            torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-3, atol=2e-5, msg=f"{step} {k}")
    second = load(references[name], 2)
    assert second["flops"] == hand_count(name, second)
    assert second["samples_read"] >= second["faults"]["samples"] >= 256
    if name == "memory":  # its start of step read 2018's shards once, all 256 samples of them
        assert second["start_of_step"]["samples_read"] == 256
        assert second["samples_read"] == second["faults"]["samples"] + 256


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ROWS))
def test_killed_mid_step_and_rerun_is_bitwise_the_unkilled_run(name, references, two_years, tmp_path):
    run = str(tmp_path / "killed")
    args = [f"--data_root={two_years}", f"--out_dir={run}", *TINY, *ROWS[name]]
    rc, _, _ = kill_mid_step(None, run, signal.SIGKILL,
                             command=[sys.executable, os.path.join(EXAMPLES, f"{name}.py"), *args])
    assert rc == -signal.SIGKILL
    train_in_process(args)
    for step in (1, 2):
        a, b = load(references[name], step), load(run, step)
        assert same(a["model"], b["model"]) and a["flops"] == b["flops"], f"step {step}"
        assert a["samples_read"] == b["samples_read"]  # the draws' reads, counted once whatever the kill
        assert json.dumps(a["state"], default=str) == json.dumps(b["state"], default=str)


EVERY_ROW = """
import importlib.util, sys
import torch.distributed as dist
sys.path.insert(0, {repo!r})
import train
dist.init_process_group("gloo")  # started here, the process group outlives each run (world.World.own_group)
for name, args in {rows!r}.items():  # every example's row, one run after another in these processes
    spec = importlib.util.spec_from_file_location("example_" + name, {examples!r} + "/" + name + ".py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    train.run([*sys.argv[1:-1], "--out_dir=" + sys.argv[-1] + "/" + name, *args])  # argv[-1]: the folder
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_processes_end_with_the_same_weights(two_years, tmp_path):
    """Under torchrun every save compares the processes' weights (a difference is refused): each example's run
    finishes. (One torchrun for the five: the process group outlives a run.)"""
    program = tmp_path / "every_row.py"
    program.write_text(EVERY_ROW.format(repo=REPO, rows=ROWS, examples=EXAMPLES))
    args = [f"--data_root={two_years}", *TINY, "--budget_samples=64", str(tmp_path)]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(program), *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ROWS:
        assert os.path.exists(tmp_path / name / "step02.pt"), name


FORGETFUL = """
import os, sys
sys.path.insert(0, {repo!r})
import strategies, train
from model import LOSSES, forward_backward


class OwnGradient:
    \"\"\"A-GEM's reference gradient taken by hand, without the all-reduce step.gradient does.\"\"\"
    flops_per_sample = 0

    def __init__(self, model, step):
        self.step, self.memory = step, step.draw(step.step_data[0], "forgetful")

    def __call__(self, model):
        batch, kept = self.memory.batch(), [p.grad.clone() for p in model.parameters()]
        forward_backward(model, batch["images"], batch["tokens"], lambda out: LOSSES["clip"].fn(**out))
        for p, g in zip(model.parameters(), kept):
            p.grad = g + 0.1 * p.grad  # this process's batch alone


strategies.STRATEGIES["forgetful"] = strategies.Strategy("forgetful", True, strategies.new_only,
                                                         before_update=OwnGradient)
if __name__ == "__main__":
    train.run(["--strategy=forgetful", *sys.argv[1:]])
"""


@pytest.mark.slow
def test_a_hook_that_forgets_its_all_reduce_is_refused_at_the_first_save(two_years, tmp_path):
    program = tmp_path / "forgetful.py"
    program.write_text(FORGETFUL.format(repo=REPO))
    args = [f"--data_root={two_years}", f"--out_dir={tmp_path}/run", *TINY]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(program), *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode != 0
    ours = [line for line in out.stderr.split("Traceback (most recent call last)")[0].splitlines()
            if line.strip() and not re.match(r"[DIWE]\d{4} ", line)]
    assert len(ours) == 1, out.stderr
    assert ours[0].startswith("error: step 2, sample 64: the processes hold different weights (rank 1 differs from "
                              "rank 0)"), ours[0]
    assert not os.path.exists(tmp_path / "run" / "resume" / "step02-0000002.pt")  # nothing saved from it


# ----------------------------------------------------------------------------- the capped memory
@pytest.mark.slow
def test_the_memory_holds_exactly_m_samples_nested_as_its_shares_shrink(examples, tmp_path):
    """On the built-in benchmark (5 years of 8,000 pairs): at every step, exactly M of the earlier years' trainable
    pairs pass the memory's keep fractions, each earlier year its equal share, and a pair dropped never returns."""
    root = str(tmp_path / "tic-synth")
    synthetic.make_synthetic_benchmark(root)
    cfg = train.parse_config([f"--data_root={root}", "--memory_samples=200"])
    step_data = [[data.Part(y, train.shards.year_shards(root, y))] for y in ("2018", "2019", "2020", "2021", "2022")]
    world, shape = train.World(0, 1, False, torch.device("cpu")), model_module.make_config("tiny")
    hashes = {}  # every trainable pair's hash, per year: what the memory selects from
    for s, parts in enumerate(step_data):
        stream = strategies.TimeStep(s, [], step_data, cfg, None, world, shape).stream(parts, 32)
        hashes[s] = [data.sample_hash(key, cfg.seed) for path, n, fraction in stream.shards
                     for key, _ in stream.read_shard(path, n, fraction, Counter())]
    for m in (2000, 200):
        cfg.memory_samples, state, kept_before = m, {}, {}
        for t in range(1, 5):
            step = strategies.TimeStep(t, [], step_data, cfg, None, world, shape, state=state)
            report = strategies.act(strategies.STRATEGIES["memory"], "start_of_step", None, step)
            state = step.state
            assert report["samples_read"] == 8000  # the year that just ended, once
            replay = strategies.STRATEGIES["memory"].replay(step)
            kept = {s: {i for i, h in enumerate(hashes[s]) if h < replay[s]} for s in range(t)}
            assert [len(kept[s]) for s in range(t)] == examples["memory"].quotas(m, t)
            assert sum(len(k) for k in kept.values()) == m
            assert all(kept[s] <= kept_before.get(s, kept[s]) for s in range(t))  # nested as shares shrink
            kept_before = kept


# ----------------------------------------------------------------------------- the anchor and the loss
def test_wiseft_deploys_the_ensemble_with_the_first_model_and_goes_on_from_the_trained_one(references):
    run = references["wiseft"]
    first, second = load(run, 1), load(run, 2)
    anchor = first["model"]  # no --init: the anchor is what step 1 deployed
    trained = second["continue_point"]["model"]  # what the next step goes on from
    ensemble = strategies.interpolate(anchor, trained, 0.3)
    assert same(second["model"], ensemble) and not same(trained, second["model"])
    assert second["end_of_step"] == {"wiseft_alpha": 0.3,
                                     "flops": sum(v.numel() for k, v in anchor.items()) * 2}


def test_siglip_trains_exports_and_loads_back(references, tmp_path):
    ckpt = os.path.join(references["siglip"], "step02.pt")
    model, record = load_checkpoint(ckpt)
    assert record["config"]["loss"] == "siglip" and model.logit_bias is not None
    assert float(model.logit_bias.detach()) != -10.0  # it learned
    state_dict, config = to_openclip(model)
    assert config["init_logit_bias"] == -10.0 and torch.equal(state_dict["logit_bias"], model.logit_bias.detach())
    import open_clip
    theirs = open_clip.CLIP(**config)
    theirs.load_state_dict(state_dict, strict=True)
    assert torch.equal(theirs.logit_bias.detach(), model.logit_bias.detach())


# ----------------------------------------------------------------------------- none silently wrong
@pytest.mark.slow
def test_compare_gives_rows_from_several_files(two_years, tmp_path):
    import compare
    out = str(tmp_path / "compare")
    rows = ("sequential", "ewc", "agem", "memory")
    compare.main([*(f"--module={EXAMPLES}/{name}.py" for name in ("ewc", "agem", "memory")),
                  f"--strategies={','.join(rows)}", f"--out={out}", f"--data_root={two_years}", *TINY,
                  "--budget_samples=64", "--memory_samples=50", "--ewc_batches=2"])
    table = open(os.path.join(out, "table.md")).read()
    assert all(f"| {row} | 1 |" in table for row in rows) and "| forgetting |" in table
    runs = {row: os.path.join(out, "seed0", row) for row in rows}
    assert load(runs["agem"], 2)["flops"] == 2 * load(runs["sequential"], 2)["flops"]  # each batch's twin
    ewc, sequential = load(runs["ewc"], 2), load(runs["sequential"], 2)
    assert ewc["strategy"] == "ewc" and ewc["start_of_step"]["flops"] > 0 and ewc["flops"] > sequential["flops"]
    assert load(runs["memory"], 2)["start_of_step"]["samples_read"] == 256  # 2018's shards, read once
    assert same(load(runs["ewc"], 1)["model"], load(runs["memory"], 1)["model"])  # the shared first step


FORGETTING_AT_LAST = """
import evaluate
evaluate.SUMMARIES["last_row_mean"] = lambda matrix: sum(matrix[-1]) / len(matrix[-1])
"""


def test_a_summary_number_a_file_adds_is_kept_when_a_run_is_scored_again(references, two_years, tmp_path, capsys):
    import score
    module = tmp_path / "last_row_mean.py"
    module.write_text(FORGETTING_AT_LAST)
    run = references["wiseft"]
    score.main([f"--run={run}", "--device=cpu", f"--module={module}"])
    result = json.load(open(os.path.join(run, "eval_matrix.json")))
    assert result["summary"]["last_row_mean"] == pytest.approx(sum(result["matrix"][-1]) / 2)
    assert "last row mean" in capsys.readouterr().out  # printed with the others
    evaluate.SUMMARIES.pop("last_row_mean")
    lost = "has the summary number.s. last_row_mean, which no loaded file computes; load the file"
    with pytest.raises(SystemExit, match=lost):
        score.main([f"--run={run}", "--device=cpu"])  # rather than drop it from the file
    with pytest.raises(SystemExit, match=lost):  # a rerun of the run's command without the file, too
        train_in_process([f"--data_root={two_years}", f"--out_dir={run}", *TINY, *ROWS["wiseft"]])


def test_a_field_added_to_the_model_config_refuses_no_earlier_run_and_a_changed_one_is_named(references):
    import survive
    record = load(references["agem"], 1)
    shape = model_module.CLIPConfig(**record["model_config"])
    written_before = {k: v for k, v in record["model_config"].items() if k not in ("init_logit_scale", "text_pool")}
    survive.check_shape({**record, "model_config": written_before}, "step01.pt", shape, "tiny")  # defaults: no error
    other = {**record["model_config"], "text_layers": 2}
    with pytest.raises(SystemExit, match=r"step01.pt holds a model of another shape .*text_layers 2 -> 3 "):
        survive.check_shape({**record, "model_config": other}, "step01.pt", shape, "tiny")


def test_export_refuses_a_parameter_openclip_has_no_name_for():
    clip = model_module.CLIP(model_module.make_config("tiny"))
    clip.register_parameter("my_temperature", torch.nn.Parameter(torch.ones(())))
    with pytest.raises(SystemExit, match="cannot export: OpenCLIP has no name for the parameter.s. my_temperature"):
        to_openclip(clip)


def test_patchings_selection_metric_is_a_setting_checked_before_any_compute():
    train.check_config(train.parse_config(["--patch_metric=i2t_R@5"]))
    with pytest.raises(SystemExit, match="--patch_metric=top1 is not valid; use one of mean_R@1"):
        train.check_config(train.parse_config(["--patch_metric=top1"]))
