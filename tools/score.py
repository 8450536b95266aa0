"""
Score models on every time step's tasks, as train.py does after each step: a run's step checkpoints
again (a grown run's new tasks, another device or precision), or an existing CLIP (OpenAI's or
OpenCLIP's), which shows the paper's first finding: its retrieval falls on later years.

    python tools/score.py --run=runs/cumulative-all      # rewrites its eval_matrix.json and picture
    python tools/score.py --run=runs/agem --module=examples/agem.py   # with a file's rows
    python tools/score.py --checkpoint=ViT-B-32.pt --tokenizer=clip-tokenizer.json \
        --data_root=/data/tic-datacomp --steps=2014-2016,2017,2018,2019,2020,2021,2022

Every setting is checked before any model is read; a run folder's shard command is never run
(pass --shard_cmd yourself).
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project
import evaluate  # noqa: E402
import files  # noqa: E402
import pictures  # noqa: E402
import report  # noqa: E402
import shards  # noqa: E402
from checkpoints import (check_tokenizer, is_checkpoint_file, load_checkpoint,  # noqa: E402
                         parse_heads, refuse_damaged, step_checkpoints)
from model import PRECISIONS  # noqa: E402
from settings import import_files, parse_flags  # noqa: E402
from benchmark import static_tasks, tasks_of  # noqa: E402
from text import Tokenizer  # noqa: E402
from world import check_device  # noqa: E402

CHECKPOINT_USAGE = ("usage: python tools/score.py --checkpoint=FILE "
                    "--tokenizer=clip-tokenizer.json "
                    "--data_root=ROOT [--steps=2014-2016,2017,...] [--quick_gelu=auto|true|false] "
                    "[--device=cpu|cuda] [--out=FILE.json] [--precision=bf16|fp32] "
                    "[--shard_cmd='aws s3 cp s3://bucket/tic/{path} -'] "
                    "[--static=NAME=PATH,...] [--heads=auto|IMAGE,TEXT]")
FLAGS = {"run": "", "checkpoint": "", "tokenizer": "", "data_root": "", "steps": "",
         "quick_gelu": "auto",
         "heads": "auto",  # attention heads (image, text): auto (see load_checkpoint) or e.g. 16,16
         "device": "cuda" if torch.cuda.is_available() else "cpu", "out": "",
         "precision": "",  # "": bf16 on CUDA, fp32 elsewhere
         "shard_cmd": "",  # stream the shards through this command; never taken from a run
         "max_bad_fraction": 0.05,  # a task with more of its samples unreadable is not scored
         "static": "",  # static tasks NAME=PATH,... besides data_root/static/ (--run: the run's)
         "module": ""}  # files whose rows (e.g. a summary number) the run used, FILE,FILE,...


def evaluate_checkpoint(args: dict) -> dict[str, dict]:
    """An existing model (OpenAI's or OpenCLIP's CLIP, or a step checkpoint of a run) on every
    time step's tasks."""
    if args["run"] or not (args["checkpoint"] and args["tokenizer"] and args["data_root"]):
        raise SystemExit(CHECKPOINT_USAGE)
    if args["quick_gelu"] not in ("auto", "true", "false"):
        raise SystemExit(f"--quick_gelu={args['quick_gelu']}: use auto (OpenAI's archives: "
                         f"true), true or false")
    quick_gelu = {"auto": None, "true": True, "false": False}[args["quick_gelu"]]
    device = torch.device(args["device"])
    heads = parse_heads(args["heads"])
    model = load_checkpoint(args["checkpoint"], quick_gelu, heads)[0].to(device)
    tokenizer = Tokenizer.load(args["tokenizer"])
    cfg = model.cfg
    check_tokenizer(cfg, tokenizer, args["tokenizer"], args["checkpoint"])
    step_years = shards.parse_steps(args["data_root"], args["steps"], split="retrieval")
    tasks = {**tasks_of(args["data_root"], step_years, args["shard_cmd"]),
             **static_tasks(args["data_root"], args["static"])}
    print(f"{args['checkpoint']}: ViT {cfg.vision_layers}x{cfg.vision_width} at {cfg.image_px}px, "
          f"patch {cfg.patch_px}; text {cfg.text_layers}x{cfg.text_width}; "
          f"{'QuickGELU' if cfg.quick_gelu else 'GELU'}; "
          f"{model.num_params() / 1e6:.1f}M parameters; {len(tasks)} tasks")
    t0 = time.time()
    row = evaluate.evaluate_step(model, tasks, tokenizer, device,
                                 precision=args["precision"] or None,
                                 max_bad_fraction=args["max_bad_fraction"])
    print(report.format_row(row))
    print(f"evaluated in {time.time() - t0:.0f}s")
    if args["out"]:
        files.write_json(args["out"], {"checkpoint": args["checkpoint"], "steps": step_years,
                                        "results": row})
    return row


def read_record(path: str) -> dict:
    """The record (config, steps, ...) of a run's step checkpoint, once its CRCs are checked, its
    weights left on disk."""
    refuse_damaged(path)
    try:
        record = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # whatever torch.load says of a damaged file
        raise SystemExit(f"error: {path}: not a readable step checkpoint "
                         f"({str(e).splitlines()[0]}); delete it and rerun the run's training "
                         f"command to train that step again") from None
    if not (isinstance(record, dict) and {"config", "steps", "step_name"} <= record.keys()):
        raise SystemExit(f"error: {path}: not a step checkpoint of train.py (no config, steps and "
                         f"step_name); move it out of the run folder")
    return record


def main(argv):
    args = parse_flags(argv, FLAGS)
    if args["precision"] not in ("", *PRECISIONS):
        raise SystemExit(f"--precision={args['precision']}: use {' or '.join(PRECISIONS)}")
    check_device(args["device"])
    if not 0 <= args["max_bad_fraction"] <= 1:  # nan fails it too
        raise SystemExit(f"error: --max_bad_fraction={args['max_bad_fraction']} is out of range; "
                         f"use a fraction, 0 to 1")
    if args["out"]:
        files.check_writable(args["out"])
    if args["checkpoint"]:
        return evaluate_checkpoint(args)
    run_flags = ("run", "device", "precision", "max_bad_fraction", "shard_cmd", "module")
    if not args["run"] or any(args[k] != FLAGS[k] for k in FLAGS if k not in run_flags):
        raise SystemExit("usage: python tools/score.py --run=RUN_DIR [--device=cpu|cuda] "
                         "[--precision=bf16|fp32] [--shard_cmd=COMMAND] [--module=FILE,...]\n"
                         "   or: " + CHECKPOINT_USAGE[7:])
    import_files([p for p in args["module"].split(",") if p])
    run, device = args["run"], torch.device(args["device"])
    report.check_summaries(os.path.join(run, "eval_matrix.json"))
    checkpoints = step_checkpoints(run)
    if not checkpoints:
        raise SystemExit(f"error: no step checkpoints (step*.pt) in {run}; train first with "
                         f"train.py --out_dir={run}")
    damaged = next((path for path in checkpoints if not is_checkpoint_file(path)), None)
    if damaged:  # cut short: refused now, not after the checkpoints before it are evaluated
        raise SystemExit(f"error: {damaged}: damaged (not a whole checkpoint); delete it and "
                         f"rerun the run's training command to train that step again")
    files.check_writable(os.path.join(run, "eval_matrix.json"))
    tokenizer = Tokenizer.load(os.path.join(run, "tokenizer.json"))
    # every model on the newest checkpoint's tasks: a grown run gets a new column in every row
    last = read_record(checkpoints[-1])
    config = last["config"]
    if config.get("shard_cmd") and not args["shard_cmd"]:  # a command from a file is never run
        raise SystemExit(f"error: {run} streamed its shards with --shard_cmd="
                         f"{config['shard_cmd']!r}; a run folder's commands are not run: pass "
                         f"--shard_cmd yourself (that one, once read and trusted, or your own)")
    tasks = {**tasks_of(config["data_root"], last["steps"], args["shard_cmd"]),
             **static_tasks(config["data_root"], config.get("static", ""))}
    names = [shards.step_name(ys) for ys in last["steps"]]
    _, initial = report.read_results(os.path.join(run, "eval_matrix.json"), names)  # --init's row
    rows = {}
    for path in checkpoints:
        t0 = time.time()
        model, record = load_checkpoint(path)
        rows[record["step_name"]] = evaluate.evaluate_step(
            model.to(device), tasks, tokenizer, device, precision=args["precision"] or None,
            max_bad_fraction=args["max_bad_fraction"])
        print(f"evaluated {path} in {time.time() - t0:.1f}s")
    result = evaluate.eval_matrix(rows, names, initial)
    report.write_matrix(os.path.join(run, "eval_matrix.json"), result)
    pictures.write_eval_matrix(run, result)
    print(report.format_matrix(result))


if __name__ == "__main__":
    main(sys.argv[1:])
