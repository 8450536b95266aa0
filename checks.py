"""
Every check of a run's settings and rows before any compute, so that a value that parses but
cannot work, or a row that asks what the loop cannot do, is one line and not an error hours in:
each Setting's own check (settings.py), the names each table knows, the values that depend on
another setting or on a file; and what a strategy's row returns (its data, budget, reports,
hooks), where strategies.py calls them.
"""
import json
import math
import os
from types import SimpleNamespace

import torch

import benchmark
import schedules
import settings
from checkpoints import is_checkpoint_file, parse_heads
from model import LOSSES, PRECISIONS, PRESETS, make_config
from text import Tokenizer
from world import check_device


def check_config(cfg: SimpleNamespace, *tables: dict) -> None:
    """Refuse, in one line, a setting of the tables (train.py's, the strategies', the schedules')
    that cannot work, a name no table row has, or a file that cannot be read."""
    for name, table in (("model", PRESETS), ("loss", LOSSES), ("precision", PRECISIONS)):
        if getattr(cfg, name) not in table:
            raise SystemExit(f"error: unknown {name} '{getattr(cfg, name)}'; "
                             f"choose one of: {', '.join(table)}")
    schedules.check_schedule(cfg)
    for table in tables:
        settings.check(table, cfg)
    least = {"budget_samples": cfg.batch_size,  # one batch
             "max_image_pixels": make_config(cfg.model).image_px ** 2}  # the model's input image
    for key, n in least.items():
        if getattr(cfg, key) < n:
            raise SystemExit(f"error: --{key}={getattr(cfg, key)} is too small; use at least {n}")
    if 0 < cfg.ckpt_interval_samples < cfg.batch_size:
        raise SystemExit(f"error: --ckpt_interval_samples={cfg.ckpt_interval_samples} is less than "
                         f"one batch ({cfg.batch_size}); use 0 (only on SIGTERM) or at least "
                         f"{cfg.batch_size}")
    parse_heads(cfg.heads)  # a one-line error if it is neither auto nor IMAGE,TEXT
    check_files(cfg)
    check_device(cfg.device)


def check_files(cfg: SimpleNamespace) -> None:
    """--init, --tokenizer and --static read now, not after the data are counted."""
    if cfg.init and not os.path.isfile(cfg.init):
        raise SystemExit(f"error: --init={cfg.init}: no such file; pass an OpenAI or OpenCLIP "
                         f"CLIP, or a stepNN.pt")
    if cfg.init and not is_checkpoint_file(cfg.init):
        raise SystemExit(f"error: --init={cfg.init}: not a checkpoint (a torch.save or TorchScript "
                         f"zip, whole, or a .safetensors file); pass an OpenAI or OpenCLIP CLIP, "
                         f"or a stepNN.pt")
    beside_init = benchmark.tokenizer_beside(cfg.init)
    if cfg.init and not (cfg.tokenizer or os.path.isfile(beside_init)):
        raise SystemExit("error: --init needs the tokenizer its model was trained with: for "
                         "OpenAI's and OpenCLIP's, --tokenizer=clip-tokenizer.json (made by python "
                         "tools/prepare.py clip-tokenizer)")
    if cfg.tokenizer and not os.path.isfile(cfg.tokenizer):
        raise SystemExit(f"error: --tokenizer={cfg.tokenizer}: no such file; pass a tokenizer.json,"
                         f" or leave --tokenizer empty to train one on the first step's captions")
    if cfg.tokenizer or cfg.init:
        Tokenizer.load(cfg.tokenizer or beside_init)
    benchmark.static_tasks(cfg.data_root, cfg.static)  # each --static path must be a task


def check_budget(name: str, units: list) -> None:
    """A strategy's budget_units of each step: a whole number of budgets C, 1 or more."""
    for t, n in enumerate(units):
        if not isinstance(n, int) or n < 1:
            raise SystemExit(f"error: strategy {name}: budget_units({t}) = {n!r}; return a whole "
                             f"number of budgets C, 1 or more")


def check_replay(name: str, t: int, replay) -> dict:
    """A strategy's replay at step t: {step s <= t: a fraction above 0, at most 1}, t included."""
    if not isinstance(replay, dict) or t not in replay or not all(
            type(s) is int and 0 <= s <= t and 0 < f <= 1 for s, f in replay.items()):
        raise SystemExit(f"error: strategy {name}: replay at step {t} = {replay!r}; return "
                         f"{{step s <= {t}: fraction of its data, above 0, at most 1}}, step {t} "
                         f"(the new data) included")
    return replay


def check_report(name: str, hook: str, report) -> dict:
    """A start_of_step's or end_of_step's report: a dict declaring its compute ("flops"), with a
    "state" (if any) that stepNN.pt can hold and read back, and the rest loggable as JSON."""
    flops = report.get("flops") if isinstance(report, dict) else None
    if not isinstance(flops, (int, float)) or not 0 <= flops < math.inf:
        raise SystemExit(f"error: strategy {name}: {hook} returned {str(report)[:80]}; return a "
                         f"dict with 'flops', the compute it spent (0 if none), and any other "
                         f"numbers to report")
    if "state" in report and not (isinstance(report["state"], dict) and plain(report["state"])):
        raise SystemExit(f"error: strategy {name}: {hook}'s 'state' is not a dict of tensors, "
                         f"numbers, strings and containers, so it could not be read back from "
                         f"stepNN.pt; convert what else it holds (a numpy array: torch.from_numpy)")
    rest = {k: v for k, v in report.items() if k != "state"}
    try:
        json.dumps(rest)
    except TypeError:
        raise SystemExit(f"error: strategy {name}: {hook}'s report {str(rest)[:80]} is logged as "
                         f"JSON; return numbers and strings there, and keep tensors in 'state'"
                         ) from None
    return dict(report)


def plain(obj) -> bool:
    """Does obj hold only what torch.load(weights_only=True) reads back: tensors, numbers, strings,
    None, and dicts, lists and tuples of them?"""
    if isinstance(obj, dict):
        return all(plain(k) and plain(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(plain(v) for v in obj)
    return obj is None or isinstance(obj, torch.Tensor) or type(obj) in (int, float, bool, str)


def check_per_sample(name: str, hook: str, made):
    """A batch_loss or before_update, made for a step: it declares flops_per_sample."""
    flops = getattr(made, "flops_per_sample", None)
    if not isinstance(flops, (int, float)) or not 0 <= flops < math.inf:
        raise SystemExit(f"error: strategy {name}: its {hook} has no flops_per_sample; set it to "
                         f"the compute it adds per sample (0 if none), e.g. a teacher's forward "
                         f"pass")
    return made
