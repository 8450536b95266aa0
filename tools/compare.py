"""
Run several TiC strategies on one benchmark and write the paper's Table 2 for it, with pictures.

    python tools/compare.py                                  # every strategy, seed 0, built-in data
    python tools/compare.py --strategies=sequential,cumulative-all,oracle --seeds=0,1
    python tools/compare.py --seeds=0,1 --table_only=true    # tabulate the finished runs only
    python tools/compare.py --nproc=8 --data_root=/data/tic-datacomp --model=ViT-B-16  # torchrun
    python tools/compare.py --strategies=sequential,cumulative-all --schedules=cosine,cosine-ar
    python tools/compare.py --strategies=cumulative-all --sweep=new_data_fraction=0.25,0.5
    python tools/compare.py --rows=ema,ema-from-merge,cumulative-all+const-cooldown
    python tools/compare.py --module=examples/ewc.py --strategies=sequential,ewc  # your own file
    python tools/compare.py --module=examples/agem.py --module=examples/memory.py \
        --strategies=sequential,agem,memory                   # rows from several files

A row is a strategy, with a schedule (lr_schedule) and settings if given: the grid --strategies x
--schedules x the values of --sweep=KEY=V1,V2,..., then the rows --rows names. Its name,
STRATEGY[+SCHEDULE][+KEY=VALUE] (e.g. cumulative-all+cosine+new_data_fraction=0.25), names its
run folder OUT/seedS/ROW (OUT: --out, default runs/compare). A finished run is reused, not
retrained, when the command runs again. Every other --key=value goes to train.py unchanged. With
--module=FILE, a file that registers strategies, schedules, losses or summary numbers and runs
train.py's main (as examples/ewc.py does), every run goes through that file instead of train.py;
with several, through the last, the others imported first (tools/with_modules.py).

As the paper's "every method starts from the same step-1 model", the first time step is trained
once per seed for all rows whose first steps are equal (first_step) and copied to the others.

Writes OUT/table.md and table.json (per row, mean over seeds: compute in samples and FLOPs, also
relative to oracle; every summary number, evaluate.SUMMARIES: ID, backward and forward transfer,
forgetting and any a --module adds; the final model's mean R@1 over all tasks),
OUT/compute_vs_retrieval.png, a heatmap of each row's matrix (mean over seeds, heatmap_ROW.png)
and all of them on one sheet (heatmaps.png).
"""
import os
import re
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project's modules
import pictures  # noqa: E402
import schedules  # noqa: E402
import strategies  # noqa: E402
from checkpoints import refuse_damaged  # noqa: E402
from checkpoints import step_checkpoint, step_checkpoints  # noqa: E402
from evaluate import SUMMARIES, summarize  # noqa: E402
from report import read_matrix, summary_name  # noqa: E402
from settings import MAX_SEED, import_files, parse_flags  # noqa: E402
from files import write_json  # noqa: E402

OPTIONS = {  # compare.py's own keys; the rest go to train.py
    "strategies": "", "schedules": "", "sweep": "", "rows": "", "seeds": "0", "out": "runs/compare",
    "nproc": 1, "table_only": False, "module": []}
DEFAULT_SCHEDULE = "cosine"  # train.py's lr_schedule, given to a row that names none (a --module
                             # file may set another default)


def load_modules(paths: list[str]) -> list[str]:
    """The program every run goes through: train.py; the file, for one --module; for several,
    tools/with_modules.py running the last with the others imported first. Each file is imported
    here too (not as __main__, so it trains nothing), so that the rows it registers resolve."""
    import_files(paths)
    if not paths:
        return [os.path.join(ROOT, "train.py")]
    if len(paths) == 1:
        return [os.path.abspath(paths[0])]
    return [os.path.join(ROOT, "tools", "with_modules.py"),
            ",".join(os.path.abspath(p) for p in paths)]


def parse_seeds(text: str) -> list[int]:
    """--seeds=0,1 as [0, 1]: distinct seeds from 0 to MAX_SEED, or a one-line error."""
    seeds = [int(s) if re.fullmatch(r"[0-9]+", s) else -1 for s in text.split(",")]
    if not all(0 <= s <= MAX_SEED for s in seeds) or len(set(seeds)) < len(seeds):
        raise SystemExit(f"error: --seeds={text}: use distinct seeds from 0 to {MAX_SEED}, "
                         f"separated by commas, e.g. --seeds=0,1")
    return seeds


def row_names(opts: dict) -> list[str]:
    """The rows to run, in order: the grid, then --rows; every strategy when neither is given."""
    names = opts["strategies"] or ("" if opts["rows"] else ",".join(strategies.STRATEGIES))
    scheds = opts["schedules"].split(",") if opts["schedules"] else [""]
    key, _, values = opts["sweep"].partition("=")
    if opts["sweep"] and not (key and values):
        raise SystemExit(f"error: --sweep={opts['sweep']}: use --sweep=KEY=V1,V2,..., "
                         f"e.g. new_data_fraction=0.25,0.5")
    swept = [f"{key}={v}" for v in values.split(",")] if opts["sweep"] else [""]
    grid = ["+".join(p for p in (name, sched, setting) if p) for name in names.split(",") if name
            for sched in scheds for setting in swept]
    return list(dict.fromkeys(grid + (opts["rows"].split(",") if opts["rows"] else [])))


def row_args(row: str) -> list[str]:
    """train.py's arguments for a row: --strategy=STRATEGY, --lr_schedule=SCHEDULE, --KEY=VALUE.
    Raises SystemExit for an unknown strategy or schedule; train.py checks the settings."""
    name, *rest = row.split("+")
    strategies.get_strategy(name)
    for part in rest:
        if "=" not in part and part not in schedules.SCHEDULES:  # a forker's rows too (--module)
            raise SystemExit(f"error: row {row}: unknown lr_schedule '{part}'; choose one of: "
                             f"{', '.join(schedules.SCHEDULES)}, or write a setting as KEY=VALUE")
    return [f"--strategy={name}"] + [f"--{part}" if "=" in part else f"--lr_schedule={part}"
                                      for part in rest]


def first_step(row: str, train_args: list[str]) -> tuple:
    """What a row's first step is made of; rows with equal ones share one step01.pt: the strategy's
    data and budget at step 1 (replay asked with a step of t = 0 holding no data, the strategy
    settings' defaults and the row's), and its hooks where --init gives a model before step 1; the
    schedule's rates (schedule_first_step); the row's settings, except new_data_fraction where the
    first step replays nothing."""
    args = dict(arg[2:].partition("=")[::2]
                for arg in train_args + row_args(row))  # the last value of a key wins
    strategy = strategies.get_strategy(args["strategy"])
    config = {k: s.default for k, s in strategies.SETTINGS.items()}
    config.update({k: type(config[k])(v) for k, v in args.items() if k in config})
    replay = strategy.replay(strategies.TimeStep(0, [], [], SimpleNamespace(**config), None, None))
    hooks = (strategy.start_of_step, strategy.batch_loss, strategy.before_update,
             strategy.end_of_step, strategy.continue_from_deployed) if args.get("init") else ()
    schedule = args.get("lr_schedule", DEFAULT_SCHEDULE)
    settings = [part for part in row.split("+")[1:] if "=" in part
                and not (part.startswith("new_data_fraction=") and set(replay) == {0})]
    return ((tuple(sorted(replay.items())), strategy.budget_units(0), *hooks),
            schedule_first_step(schedule, args), tuple(sorted(settings)))


def schedule_first_step(name: str, args: dict) -> tuple:
    """A schedule's first step as its rates show it, at the row's settings: whether it carries its
    optimizer, its cooled branch, and its rate at each iteration of a step of 100 (warmup 10, peak
    1). Rows whose first steps train alike give the same (cosine-ar's is cosine's)."""
    config = {k: s.default for k, s in schedules.SETTINGS.items()}
    config.update({k: type(config[k])(v) for k, v in args.items() if k in config})
    cfg = SimpleNamespace(**config, lr=1.0, warmup_iters=10, budget_samples=100, batch_size=1,
                          lr_schedule=name)
    step = schedules.step_schedule(cfg, 0, 2, 100, None)
    return (step.row.carries_optimizer, step.cooldown,
            tuple(round(step.lr(i), 12) for i in range(100)))


def launch(program: list[str], train_args: list[str], nproc: int) -> bool:
    """Run program (train.py, or --module's file) in a process of its own, under torchrun for
    nproc > 1; True if it succeeded."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    "--standalone", f"--nproc_per_node={nproc}"]
    cmd = launcher + [*program, *train_args]
    print(" ".join(cmd), flush=True)
    return subprocess.run(cmd).returncode == 0


def run_row(row: str, seed: int, run_dir: str, shared_first: str | None, nproc: int,
            train_args: list, program: list[str]):
    """Train (or finish) one run, first copying in the first step of shared_first, the run of
    another row with the same first step (None: train it here). Raises SystemExit if it fails."""
    os.makedirs(run_dir, exist_ok=True)
    if shared_first and not os.path.exists(step_checkpoint(run_dir, 0)):
        for source, target in [(os.path.join(shared_first, "tokenizer.json"),
                                os.path.join(run_dir, "tokenizer.json")),
                               (step_checkpoint(shared_first, 0), step_checkpoint(run_dir, 0))]:
            shutil.copyfile(source, target)
    strategy, *settings = row_args(row)
    if not any(arg.startswith("--lr_schedule=") for arg in train_args + settings):
        settings.append(f"--lr_schedule={DEFAULT_SCHEDULE}")  # the row's name says none
    if not launch(program, [strategy, f"--seed={seed}", f"--out_dir={run_dir}", *train_args,
                            *settings], nproc):
        raise SystemExit(f"error: the {row} run (seed {seed}) failed; see its output above, fix it "
                         f"and rerun this command: finished runs are kept")
    if not finished(run_dir):  # a --module file that registers rows but trains nothing
        raise SystemExit(f"error: the {row} run (seed {seed}) ended without scoring every step "
                         f"({run_dir}/eval_matrix.json); does {os.path.basename(program[-1])} run "
                         f"train.py's main (train.run) under __main__?")


def finished(run_dir: str) -> bool:
    """A run whose evaluation matrix has a row for every time step."""
    result = read_matrix(os.path.join(run_dir, "eval_matrix.json"))
    return result is not None and len(result["steps"]) == len(result["tasks"])


def run_record(run_dir: str) -> dict:
    """The compute and evaluation summary of a finished run, from its checkpoints and
    eval_matrix.json: what make_table averages. A cell not scored is left out of the means."""
    for path in step_checkpoints(run_dir):
        refuse_damaged(path)  # a damaged one is a line, not a traceback
    ckpts = [torch.load(path, map_location="cpu", weights_only=True)
             for path in step_checkpoints(run_dir)]
    result = read_matrix(os.path.join(run_dir, "eval_matrix.json"))
    static = result.get("static") or {"tasks": [], "numbers": [[]], "final_mean": None}
    return {"samples": sum(c["samples_seen"] for c in ckpts),
            "flops": sum(c["flops"] for c in ckpts), **result["summary"],
            "summary_names": list(result["summary"]),
            "final_mean": mean(result["matrix"][-1]), "matrix": result["matrix"],
            "not_scored": len(result.get("not_scored", [])),
            "tasks": result["tasks"], "static_mean": static["final_mean"],
            **{f"static:{t}": v for t, v in zip(static["tasks"], static["numbers"][-1])}}


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def make_table(records: dict[str, list[dict]]) -> tuple[list[dict], str]:
    """(rows, markdown) of the paper's Table 2 from {row name: its runs' records}: the mean over
    seeds, compute relative to oracle where oracle ran, and the final model's static tasks and
    their mean where the runs had them."""
    static = list(dict.fromkeys(k for recs in records.values() for r in recs for k in r
                                if k.startswith("static:")))
    summaries = list(dict.fromkeys([*SUMMARIES, *(k for recs in records.values() for r in recs
                                                   for k in r.get("summary_names", []))]))
    keys = ["samples", "flops", *summaries, "final_mean",
            *(static + ["static_mean"] if static else [])]
    rows = [{"strategy": name, "seeds": len(recs),
             **{k: mean([r.get(k) for r in recs]) for k in keys},
             "per_seed": {k: [r.get(k) for r in recs] for k in keys[2:]}}
            for name, recs in records.items()]
    oracle = next((r for r in rows if r["strategy"] == "oracle"), None)

    def fmt(r, key):  # the mean, ± half the range over seeds where there are several
        values = [v for v in r["per_seed"][key] if v is not None]
        if not values:
            return "n/a"
        spread = (max(values) - min(values)) / 2
        return f"{r[key]:.2f}" + (f" ± {spread:.2f}" if len(values) > 1 else "")
    names = [summary_name(k).removesuffix(" transfer") for k in summaries]
    extra = [k.removeprefix("static:") for k in static] + ["static mean"] if static else []
    lines = ["| strategy | seeds | samples | FLOPs | compute vs oracle |"
             + "".join(f" {name} |" for name in [*names, "final model, all tasks", *extra]),
             "|---|---:|---:|---:|---:|" + "---:|" * (len(names) + 1 + len(extra))]
    for r in rows:
        r["relative_compute"] = r["flops"] / oracle["flops"] if oracle else None
        relative = "n/a" if oracle is None else f"{r['relative_compute']:.2f}x"
        lines.append(f"| {r['strategy']} | {r['seeds']} | {r['samples']:,.0f} | {r['flops']:.3g} | "
                     f"{relative} |" + "".join(f" {fmt(r, k)} |" for k in keys[2:]))
    missed = {name: sum(r.get("not_scored", 0) for r in recs) for name, recs in records.items()}
    if any(missed.values()):
        lines.append("\ncells not scored, left out of the means (eval_matrix.json says why): "
                     + ", ".join(f"{name} {n}" for name, n in missed.items() if n))
    return rows, "\n".join(lines)


def main(argv):
    started = time.time()
    own = [arg for arg in argv if arg[2:].split("=", 1)[0] in OPTIONS]
    opts = parse_flags(own, OPTIONS)
    seeds, out = parse_seeds(opts["seeds"]), opts["out"]
    if opts["nproc"] < 1:
        raise SystemExit(f"error: --nproc={opts['nproc']} is too small; use at least 1 (the "
                         f"processes of each run)")
    train_args = [arg for arg in argv if arg not in own]  # train.py checks these
    program = load_modules(opts["module"])
    names = row_names(opts)
    firsts = {name: first_step(name, train_args) for name in names}  # checks every row first
    records = {name: [] for name in names}
    for seed in seeds:
        trained_first = {}  # first_step -> the run that trained that first step, for this seed
        for name in names:
            run_dir = os.path.join(out, f"seed{seed}", name)
            if opts["table_only"]:  # tabulate the finished runs, train nothing
                if finished(run_dir):
                    records[name].append(run_record(run_dir))
                continue
            run_row(name, seed, run_dir, trained_first.get(firsts[name]), opts["nproc"], train_args,
                    program)
            trained_first.setdefault(firsts[name], run_dir)
            records[name].append(run_record(run_dir))
    records = {name: recs for name, recs in records.items() if recs}
    if not records:
        raise SystemExit(f"error: no finished runs under {out} for these rows and seeds; "
                         f"run without --table_only")
    names = list(records)
    rows, table = make_table(records)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")
    write_json(os.path.join(out, "table.json"),
               {"rows": rows, "seeds": seeds, "train_args": train_args})
    pictures.save(pictures.compute_plot(rows), os.path.join(out, "compute_vs_retrieval.png"))
    matrices = {name: [[mean(cells) for cells in zip(*seed_rows)]
                       for seed_rows in zip(*(r["matrix"] for r in recs))]
                for name, recs in records.items()}  # each row's matrix, mean over its seeds
    cells = [v for m in matrices.values() for row in m for v in row if v is not None]
    lo, hi = min(cells, default=0), max(cells, default=100)  # one colour scale for all rows
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
    minutes, seconds = divmod(round(time.time() - started), 60)
    print(f"table.md, table.json and PNGs in {out}; this command took {minutes} min {seconds} s")


if __name__ == "__main__":
    main(sys.argv[1:])
