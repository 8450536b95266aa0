"""
Run several TiC strategies on the same benchmark and write the paper's Table 2 for it, with pictures.

    python tools/compare.py                                   # every strategy, seed 0, built-in benchmark
    python tools/compare.py --strategies=sequential,cumulative-all,oracle --seeds=0,1 --budget_samples=8000
    python tools/compare.py --nproc=8 --data_root=/data/tic-datacomp --model=ViT-B-16 ...   # every run via torchrun
    python tools/compare.py --seeds=0,1 --table_only=true     # tabulate the finished runs only, whatever their seeds
    python tools/compare.py --strategies=sequential,cumulative-all --schedules=cosine,cosine-ar,const-cooldown
    python tools/compare.py --strategies=cumulative-all --sweep=new_data_fraction=0.25,0.5 --rows=ema,ema-from-merge
    python tools/compare.py --module=examples/ewc.py --strategies=sequential,ewc   # a strategy of your own file

A row of the comparison is a strategy, with a schedule (lr_schedule) and other settings if given: the grid of
--strategies x --schedules x the values of --sweep=KEY=V1,V2,..., then the rows that --rows lists by name. A
row's name says what it is, STRATEGY[+SCHEDULE][+KEY=VALUE], e.g. cumulative-all+cosine-ar or
cumulative-all+cosine+new_data_fraction=0.25, and names its run folder. Every other --key=value goes to train.py
unchanged. With --module=FILE, a file that registers strategies or schedules and then runs train.py's main (as
examples/ewc.py does), every run goes through that file instead of train.py, so its rows can be compared. Runs live in OUT/seedS/ROW (OUT = --out, default runs/compare); a finished run is reused, not
retrained, when the command is run again. As the paper's "every method starts from the same step-1 model", the
first time step is trained once per seed for all rows whose first steps are the same (first_step: the same data,
budget and schedule, and the same settings) and copied to the others; a row with a first step of its own trains
it. Writes OUT/table.md and table.json (per row: compute in samples and FLOPs, also relative to oracle; ID,
backward and forward transfer; the final model's mean R@1 over all tasks; the mean over seeds),
OUT/compute_vs_retrieval.png, one heatmap of the evaluation matrix per row (mean over seeds, heatmap_ROW.png)
and all of them on one sheet (heatmaps.png).
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project's modules
import pictures  # noqa: E402
import schedules  # noqa: E402
import strategies  # noqa: E402
from evaluate import step_checkpoint, step_checkpoints, summarize  # noqa: E402
from settings import parse_flags  # noqa: E402
from shards import write_json  # noqa: E402

OPTIONS = {"strategies": "", "schedules": "", "sweep": "", "rows": "", "seeds": "0", "out": "runs/compare",
           "nproc": 1, "table_only": False, "module": ""}  # compare.py's own keys; the rest go to train.py


def load_module(path: str) -> str:
    """Import a file that registers strategies or schedules (not as __main__, so it trains nothing), so that
    their rows resolve here; the program every run goes through: that file, or train.py."""
    if not path:
        return os.path.join(ROOT, "train.py")
    if not os.path.isfile(path):
        raise SystemExit(f"error: --module={path}: no such file; pass a file that registers a strategy or a "
                         f"schedule and runs train.py's main, e.g. examples/ewc.py")
    spec = importlib.util.spec_from_file_location("compared_module", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    return os.path.abspath(path)


def row_names(opts: dict) -> list[str]:
    """The rows to run, in order: the grid, then --rows; every strategy when neither is given."""
    names = opts["strategies"] or ("" if opts["rows"] else ",".join(strategies.STRATEGIES))
    scheds = opts["schedules"].split(",") if opts["schedules"] else [""]
    key, _, values = opts["sweep"].partition("=")
    if opts["sweep"] and not (key and values):
        raise SystemExit(f"error: --sweep={opts['sweep']}: use --sweep=KEY=V1,V2,..., e.g. new_data_fraction=0.25,0.5")
    swept = [f"{key}={v}" for v in values.split(",")] if opts["sweep"] else [""]
    grid = ["+".join(p for p in (name, sched, setting) if p) for name in names.split(",") if name
            for sched in scheds for setting in swept]
    return list(dict.fromkeys(grid + (opts["rows"].split(",") if opts["rows"] else [])))


def row_args(row: str) -> list[str]:
    """train.py's arguments for a row: --strategy=STRATEGY, --lr_schedule=SCHEDULE, --KEY=VALUE. The strategy and
    the schedule are checked here, before anything runs; train.py checks the rest."""
    name, *rest = row.split("+")
    strategies.get_strategy(name)
    for part in rest:
        if "=" not in part and part not in schedules.SCHEDULES:  # a forker's rows too (--module)
            raise SystemExit(f"error: row {row}: unknown lr_schedule '{part}'; choose one of: "
                             f"{', '.join(schedules.SCHEDULES)}, or write a setting as KEY=VALUE")
    return [f"--strategy={name}"] + [f"--{part}" if "=" in part else f"--lr_schedule={part}" for part in rest]


def first_step(row: str, train_args: list[str]) -> tuple:
    """What the first step of a row's run is made of: rows with equal ones train the same step01.pt. The strategy's
    first step (Strategy.first_step), the schedule's (Schedule.first_step_as: cosine-ar's first step is cosine's),
    and the row's settings, except new_data_fraction where the first step replays nothing."""
    args = dict(arg[2:].partition("=")[::2] for arg in train_args + row_args(row))  # the last value of a key wins
    strategy = strategies.get_strategy(args["strategy"])
    schedule = args.get("lr_schedule", "cosine")
    settings = [part for part in row.split("+")[1:] if "=" in part
                and not (part.startswith("new_data_fraction=") and set(strategy.replay(0)) == {0})]
    return (strategy.first_step(from_initial=bool(args.get("init"))),
            schedules.get_schedule(schedule).first_step_as or schedule, tuple(sorted(settings)))


def launch(program: str, train_args: list[str], nproc: int) -> bool:
    """Run program (train.py, or --module's file) with these arguments in a process of its own (torchrun for
    nproc > 1); True if it succeeded."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    cmd = launcher + [program, *train_args]
    print(" ".join(cmd), flush=True)
    return subprocess.run(cmd).returncode == 0


def run_row(row: str, seed: int, run_dir: str, shared_first: str | None, nproc: int, train_args: list,
            program: str):
    """Train (or finish) one run; copy in the first step that another row trained, when it shares it."""
    os.makedirs(run_dir, exist_ok=True)
    if shared_first and not os.path.exists(step_checkpoint(run_dir, 0)):
        for source, target in [(os.path.join(shared_first, "tokenizer.json"), os.path.join(run_dir, "tokenizer.json")),
                               (step_checkpoint(shared_first, 0), step_checkpoint(run_dir, 0))]:
            shutil.copyfile(source, target)
    strategy, *settings = row_args(row)
    if not launch(program, [strategy, f"--seed={seed}", f"--out_dir={run_dir}", *train_args, *settings], nproc):
        raise SystemExit(f"error: the {row} run (seed {seed}) failed; see its output above, fix it and rerun "
                         f"this command: finished runs are kept")


def finished(run_dir: str) -> bool:
    """A run whose evaluation matrix has a row for every time step."""
    path = os.path.join(run_dir, "eval_matrix.json")
    if not os.path.exists(path):
        return False
    result = json.load(open(path))
    return len(result["steps"]) == len(result["tasks"])


def run_record(run_dir: str) -> dict:
    """Compute and evaluation summary of a finished run, from its checkpoints and eval_matrix.json."""
    ckpts = [torch.load(path, map_location="cpu", weights_only=True) for path in step_checkpoints(run_dir)]
    result = json.load(open(os.path.join(run_dir, "eval_matrix.json")))
    final_row = result["matrix"][-1]
    static = result.get("static") or {"tasks": [], "numbers": [[]], "final_mean": None}
    return {"samples": sum(c["samples_seen"] for c in ckpts), "flops": sum(c["flops"] for c in ckpts),
            **result["summary"], "final_mean": sum(final_row) / len(final_row), "matrix": result["matrix"],
            "tasks": result["tasks"], "static_mean": static["final_mean"],
            **{f"static:{t}": v for t, v in zip(static["tasks"], static["numbers"][-1])}}


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def make_table(records: dict[str, list[dict]]) -> tuple[list[dict], str]:
    """Mean over seeds per strategy, compute relative to oracle where oracle was run; the static tasks of the
    final model, and their mean, where the runs had static tasks (the paper's Table 2)."""
    static = list(dict.fromkeys(k for recs in records.values() for r in recs for k in r if k.startswith("static:")))
    keys = ["samples", "flops", "id", "backward_transfer", "forward_transfer", "final_mean",
            *(static + ["static_mean"] if static else [])]
    rows = [{"strategy": name, "seeds": len(recs), **{k: mean([r.get(k) for r in recs]) for k in keys},
             "per_seed": {k: [r.get(k) for r in recs] for k in keys[2:]}} for name, recs in records.items()]
    oracle = next((r for r in rows if r["strategy"] == "oracle"), None)

    def fmt(r, key):  # the mean, and the spread over seeds (half the range) where there are several
        values = [v for v in r["per_seed"][key] if v is not None]
        if not values:
            return "n/a"
        spread = (max(values) - min(values)) / 2
        return f"{r[key]:.2f}" + (f" ± {spread:.2f}" if len(values) > 1 else "")
    extra = [k.removeprefix("static:") for k in static] + ["static mean"] if static else []
    lines = ["| strategy | seeds | samples | FLOPs | compute vs oracle | ID | backward | forward | final model, all "
             "tasks |" + "".join(f" {name} |" for name in extra),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(extra)]
    for r in rows:
        r["relative_compute"] = r["flops"] / oracle["flops"] if oracle else None
        relative = "n/a" if oracle is None else f"{r['relative_compute']:.2f}x"
        lines.append(f"| {r['strategy']} | {r['seeds']} | {r['samples']:,.0f} | {r['flops']:.3g} | {relative} | "
                     f"{fmt(r, 'id')} | {fmt(r, 'backward_transfer')} | {fmt(r, 'forward_transfer')} | "
                     f"{fmt(r, 'final_mean')} |" + "".join(f" {fmt(r, k)} |" for k in keys[6:]))
    return rows, "\n".join(lines)


def main(argv):
    own = [arg for arg in argv if arg[2:].split("=", 1)[0] in OPTIONS]
    opts = parse_flags(own, OPTIONS)
    train_args = [arg for arg in argv if arg not in own]  # train.py checks these
    program = load_module(opts["module"])
    names = row_names(opts)
    firsts = {name: first_step(name, train_args) for name in names}  # checks each strategy and schedule
    seeds, out = [int(s) for s in opts["seeds"].split(",")], opts["out"]
    records = {name: [] for name in names}
    for seed in seeds:
        trained_first = {}  # first_step -> the run that trained that first step, for this seed
        for name in names:
            run_dir = os.path.join(out, f"seed{seed}", name)
            if opts["table_only"]:  # tabulate the finished runs, train nothing
                if finished(run_dir):
                    records[name].append(run_record(run_dir))
                continue
            run_row(name, seed, run_dir, trained_first.get(firsts[name]), opts["nproc"], train_args, program)
            trained_first.setdefault(firsts[name], run_dir)
            records[name].append(run_record(run_dir))
    records = {name: recs for name, recs in records.items() if recs}
    if not records:
        raise SystemExit(f"error: no finished runs under {out} for these rows and seeds; run without --table_only")
    names = list(records)
    rows, table = make_table(records)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")
    write_json(os.path.join(out, "table.json"), {"rows": rows, "seeds": seeds, "train_args": train_args})
    pictures.save(pictures.compute_plot(rows), os.path.join(out, "compute_vs_retrieval.png"))
    # the evaluation matrix of each strategy, averaged over its seeds, on one colour scale for all strategies
    matrices = {name: [[mean(cells) for cells in zip(*seed_rows)] for seed_rows in zip(*(r["matrix"] for r in recs))]
                for name, recs in records.items()}
    cells = [v for m in matrices.values() for row in m for v in row]
    lo, hi = min(cells), max(cells)
    heatmaps = []
    for name in names:
        seeds_run = len(records[name])
        title = f"{name}: mean R@1 (%)" + (f", mean of {seeds_run} seeds" if seeds_run > 1 else "")
        matrix, tasks = matrices[name], records[name][0]["tasks"]
        summary = summarize(matrix)  # of the mean matrix: the table's means over seeds
        heatmaps.append(pictures.draw_matrix(title, matrix, tasks, summary, lo=lo, hi=hi))
        pictures.save(heatmaps[-1], os.path.join(out, f"heatmap_{name}.png"))
    pictures.save(pictures.sheet(heatmaps), os.path.join(out, "heatmaps.png"))
    print(table)
    print(f"table.md, table.json and PNGs in {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
