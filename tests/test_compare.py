"""tools/compare.py end to end on a tiny benchmark: every strategy family runs, compute is accounted, reruns reuse,
and the first step is shared exactly between the strategies whose first steps are the same."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import compare
import strategies
import synthetic
from compare import make_table
from conftest import ENV, REPO, train_in_process


def test_table_relative_compute_and_means():
    rec = lambda flops, id_, **more: {"samples": flops / 10, "flops": flops, "id": id_, "backward_transfer": 1.0,
                                      "forward_transfer": None, "forgetting": 0.5, "final_mean": 2.0, **more}
    rows, table = make_table({"sequential": [rec(100, 10.0), rec(100, 20.0)],
                              "oracle": [rec(300, 30.0, summary_names=["id", "my_number"], my_number=7.0)]})
    seq = rows[0]
    assert seq["id"] == 15.0 and seq["seeds"] == 2 and seq["forward_transfer"] is None
    assert seq["relative_compute"] == pytest.approx(1 / 3)
    # every summary number a column, a file's own too (evaluate.SUMMARIES, then those the runs name)
    assert "| ID | backward | forward | forgetting | my number | final model, all tasks |" in table
    assert "| sequential | 2 | 10 | 100 | 0.33x | 15.00 ± 5.00 | 1.00 ± 0.00 | n/a | 0.50 ± 0.00 | n/a | 2.00 ± 0.00 |" \
        in table
    assert "| oracle | 1 | 30 | 300 | 1.00x | 30.00 | 1.00 | n/a | 0.50 | 7.00 | 2.00 |" in table


@pytest.mark.slow
def test_compare_runs_lwf_patching_oracle_and_reuses(tmp_path):
    root, out = str(tmp_path / "bench"), str(tmp_path / "cmp")
    synthetic.make_synthetic_benchmark(root, years=(2018, 2019, 2020), train_samples_per_year=512,
                                  eval_samples_per_year=64, samples_per_shard=128, static_samples=32,
                                  classification_samples_per_year=32)
    cmd = [sys.executable, "tools/compare.py", "--strategies=sequential,lwf,patching,oracle", f"--out={out}",
           f"--data_root={root}", "--budget_samples=128", "--batch_size=32", "--vocab_size=300", "--workers=0",
           "--warmup_iters=1", "--warmup_iters_later=1", "--log_interval=100", "--eval_batch=64",
           "--validation_samples=32"]
    env = ENV
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "patching: validation mean R@1 by coefficient" in first.stdout
    table = json.load(open(os.path.join(out, "table.json")))
    rows = {r["strategy"]: r for r in table["rows"]}
    # oracle sees 1 + 2 + 3 budgets against 3 for the others; lwf adds a teacher forward on steps 2 and 3
    assert rows["oracle"]["samples"] == 6 * 128 and rows["sequential"]["samples"] == 3 * 128
    assert rows["oracle"]["relative_compute"] == 1.0
    assert rows["sequential"]["relative_compute"] == pytest.approx(0.5)
    # 3F a pair, then 3F + 1F for the teacher
    assert rows["lwf"]["flops"] == pytest.approx(rows["sequential"]["flops"] * (3 + 2 * 4) / 9)
    # patching adds its coefficient search: a forward pass per validation pair (of 2% of 512 a year) and coefficient
    ckpts = [torch.load(os.path.join(out, "seed0", "patching", f"step0{t}.pt"), weights_only=True) for t in (1, 2, 3)]
    per_step = rows["sequential"]["flops"] / 3 / (3 * 128)  # F, the forward FLOPs of one pair
    searched = [c["end_of_step"].get("flops", 0) / per_step for c in ckpts]
    assert searched[0] == 0 and 0 < searched[1] < searched[2] <= 5 * 3 * 32  # 5 coefficients, at most 32 per step
    assert rows["patching"]["flops"] == pytest.approx(rows["sequential"]["flops"] + sum(searched) * per_step)
    # the first step is shared: the same weights in every run
    first_steps = [torch.load(os.path.join(out, "seed0", s, "step01.pt"), weights_only=True)["model"]
                   for s in ("sequential", "lwf", "patching", "oracle")]
    assert all(torch.equal(first_steps[0][k], other[k]) for other in first_steps[1:] for k in first_steps[0])
    alphas = [c["end_of_step"].get("patch_alpha") for c in ckpts]
    assert alphas[0] is None and all(a in (0.0, 0.25, 0.5, 0.75, 1.0) for a in alphas[1:])
    for name in ("compute_vs_retrieval.png", "heatmap_oracle.png", "table.md"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    assert Image.open(os.path.join(out, "heatmap_lwf.png")).size[0] > 100
    one = Image.open(os.path.join(out, "heatmap_lwf.png")).size
    assert Image.open(os.path.join(out, "heatmaps.png")).size == (4 * one[0], one[1])  # the four side by side
    # rerun: nothing is retrained
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("done already") == 4 * 3 and "random init" not in again.stdout
    # tabulating only: seed 1 was never run, so the table holds seed 0 alone and nothing trains
    only = subprocess.run([sys.executable, "tools/compare.py", "--strategies=sequential,oracle", "--seeds=0,1",
                           f"--out={out}", "--table_only=true"], cwd=REPO, env=env, capture_output=True, text=True)
    assert only.returncode == 0 and "train.py" not in only.stdout, only.stderr
    assert [r["seeds"] for r in json.load(open(os.path.join(out, "table.json")))["rows"]] == [1, 1]


def test_every_paper_strategy_has_the_same_first_step():
    assert len({compare.first_step(name, []) for name in strategies.STRATEGIES}) == 1
    # from an existing model (--init), lwf distills from it and patching interpolates with it at the first step
    firsts = {name: compare.first_step(name, ["--init=x.pt"]) for name in strategies.STRATEGIES}
    assert {name for name, first in firsts.items() if first == firsts["sequential"]} == \
        {"sequential", "cumulative-all", "cumulative-exp", "cumulative-equal", "restart", "oracle"}
    assert len({firsts["sequential"], firsts["lwf"], firsts["patching"]}) == 3
    assert firsts["ema"] != firsts["ema-from-merge"]  # the same merge, but the next step goes on from another model


def test_first_step_is_shared_only_where_it_is_the_same(tmp_path, two_years, monkeypatch):
    """A strategy whose first step has another budget trains its own; the others get one step01.pt between them."""
    monkeypatch.setitem(strategies.STRATEGIES, "double-first", strategies.Strategy(
        "double-first", True, strategies.new_only, budget_units=lambda t: 2 if t == 0 else 1))
    launched = []

    def launch(program, train_args, nproc):  # train.py in this process, where the test's strategy is registered
        launched.append(train_args[0])
        train_in_process(train_args)
        return True

    monkeypatch.setattr(compare, "launch", launch)
    out = str(tmp_path / "cmp")
    compare.main(["--strategies=sequential,double-first,cumulative-all", f"--out={out}", f"--data_root={two_years}",
                  "--budget_samples=64", "--batch_size=32", "--vocab_size=300", "--workers=0", "--log_interval=100",
                  "--eval_batch=64", "--warmup_iters=1", "--warmup_iters_later=1"])
    assert launched == ["--strategy=sequential", "--strategy=double-first", "--strategy=cumulative-all"]
    first = {name: torch.load(os.path.join(out, "seed0", name, "step01.pt"), weights_only=True)
             for name in ("sequential", "double-first", "cumulative-all")}
    assert first["double-first"]["samples_seen"] == 128 and first["sequential"]["samples_seen"] == 64
    assert first["double-first"]["strategy"] == "double-first"  # trained by its own run, not copied
    assert first["cumulative-all"]["strategy"] == "sequential"  # copied from sequential's run, not retrained
    same = lambda a, b: all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # noqa: E731
    assert same(first["sequential"], first["cumulative-all"]) and not same(first["sequential"], first["double-first"])


def test_a_grid_of_strategies_schedules_and_settings_names_its_rows_and_shares_equal_first_steps(
        tmp_path, two_years, monkeypatch):
    launched = []

    def launch(program, train_args, nproc):
        launched.append([a for a in train_args if not a.startswith(("--seed=", "--out_dir="))][:1]
                        + [a for a in train_args if a.startswith(("--lr_schedule=", "--new_data_fraction="))])
        train_in_process(train_args)
        return True

    monkeypatch.setattr(compare, "launch", launch)
    out = str(tmp_path / "cmp")
    compare.main(["--strategies=sequential,cumulative-all", "--schedules=cosine,const-cooldown",
                  "--rows=cumulative-all+cosine+new_data_fraction=0.5", f"--out={out}", f"--data_root={two_years}",
                  "--budget_samples=64", "--batch_size=32", "--vocab_size=300", "--workers=0", "--log_interval=100",
                  "--eval_batch=64", "--warmup_iters=1", "--warmup_iters_later=1"])
    rows = ["sequential+cosine", "sequential+const-cooldown", "cumulative-all+cosine", "cumulative-all+const-cooldown",
            "cumulative-all+cosine+new_data_fraction=0.5"]
    assert [r["strategy"] for r in json.load(open(os.path.join(out, "table.json")))["rows"]] == rows
    assert launched[1] == ["--strategy=sequential", "--lr_schedule=const-cooldown"]
    assert launched[4] == ["--strategy=cumulative-all", "--lr_schedule=cosine", "--new_data_fraction=0.5"]
    first = {row: torch.load(os.path.join(out, "seed0", row, "step01.pt"), weights_only=True) for row in rows}
    trained_by = {row: (first[row]["strategy"], first[row]["config"]["lr_schedule"]) for row in rows}
    # one first step per schedule: the replay ratio changes nothing where there is nothing to replay
    assert trained_by == {row: ("sequential", row.split("+")[1]) for row in rows}
    assert first["cumulative-all+const-cooldown"]["continue_point"]["optimizer"] is not None
    assert first["sequential+cosine"]["continue_point"]["optimizer"] is None
    for row in rows:
        assert os.path.getsize(os.path.join(out, f"heatmap_{row}.png")) > 0
    with pytest.raises(SystemExit, match="unknown lr_schedule 'cosin'"):  # checked before anything runs
        compare.main(["--strategies=sequential", "--schedules=cosin", f"--out={out}"])


def test_a_module_that_trains_nothing_is_one_line_not_a_traceback(two_years, tmp_path):
    registers_only = tmp_path / "rows.py"  # registers a row, but runs no train.run under __main__
    registers_only.write_text(f"import sys\nsys.path.insert(0, {REPO!r})\nimport strategies\n"
                              "strategies.STRATEGIES['mine'] = strategies.Strategy('mine', True, strategies.new_only)\n")
    out = subprocess.run([sys.executable, "tools/compare.py", f"--module={registers_only}", "--strategies=mine",
                          f"--out={tmp_path}/cmp", f"--data_root={two_years}"], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert "does rows.py run train.py's main (train.run) under __main__?" in out.stderr.strip().splitlines()[-1]
