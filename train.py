"""
Train a CLIP through time, TiC-CLIP style. For each time step: ask the strategy for the step's start
model, data and budget, train, let the strategy act on the trained model, save a checkpoint, and
evaluate on every time step's task.

On a laptop CPU, on the built-in synthetic benchmark (made in data/tic-synth on first use):
    torchrun --standalone --nproc_per_node=1 train.py
    python train.py --strategy=sequential            # plain python works too (one process)
On one node with 8 GPUs, on real TiC-DataComp shards:
    torchrun --standalone --nproc_per_node=8 train.py --data_root=/data/tic-datacomp \\
        --steps=2014-2016,2017,2018,2019,2020,2021,2022 --model=ViT-B-16 \\
        --budget_samples=18432000 --batch_size=4096 --lr=5e-4 --warmup_iters=500 \\
        --tokenizer=clip-tokenizer.json
On 2 nodes: the same with --nnodes=2 --node_rank=0|1 --rdzv_endpoint=HOST:PORT, not --standalone.

Config: the typed values below, and the settings strategies and schedules declare, overridden as
--key=value (python train.py --help lists them all). The run folder (out_dir) holds tokenizer.json,
a checkpoint per step (stepNN.pt, with the full config), log.jsonl, eval_matrix.json and its
picture, and run.json (what defines the run). Rerunning a command skips the steps whose checkpoint
exists and resumes a step exactly where it stopped (survive.py); a rerun with settings that would
change the run's numbers is refused. Bad settings are one line before any compute; an unexpected
error is one line too, its traceback in RUN/error-rankN.log.
Follows nanoGPT's train.py for shape, open_clip for the CLIP details, DataComp for the
hyperparameters.
"""
import json
import math
import os
import re
import signal
import sys
import time
from dataclasses import asdict
from types import SimpleNamespace

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import evaluate
import pictures
import schedules
import shards
import strategies
import survive
import synthetic
from checkpoints import check_tokenizer, is_checkpoint_file, load_checkpoint, parse_heads
from model import (CLIP, LOSSES, PRECISIONS, PRESETS, CLIPConfig, check_device,
                   forward_backward, make_config)
from settings import MAX_SEED, parse_flags
from world import World, failure, refusal, start_world

# ----------------------------------------------------------------------------- config
# The defaults: the run reads them as cfg.KEY (parse_config), never as these globals.
_globals_before_config = set(globals())
# data and run
data_root = "data/tic-synth"   # TiC layout: train/YEAR/*.tar and sizes.json, eval/retrieval/YEAR/
steps = ""                     # time steps as year groups, e.g. "2014-2016,2017"; "": one a year
out_dir = ""                   # the run folder; "": runs/STRATEGY
tokenizer = ""                 # a tokenizer.json; "": train a BPE on the first step's captions
vocab_size = 1024              # of the BPE trained when tokenizer is ""
tokenizer_samples = 100_000    # first-step captions that train that BPE
static = ""                    # static tasks, NAME=PATH,... in clip_benchmark's format
shard_cmd = ""                 # stream shards from this command, e.g. "aws s3 cp s3://b/{path} -"
# strategy and model
strategy = "cumulative-all"    # one of strategies.STRATEGIES (its settings: strategies.SETTINGS)
model = "tiny"                 # one of model.PRESETS
loss = "clip"                  # one of model.LOSSES (a file may add one: examples/siglip.py)
init = ""                      # start from this CLIP (OpenAI, OpenCLIP, a stepNN.pt), its shape
quick_gelu = "auto"            # --init's activation: auto (as its file says), true or false
heads = "auto"                 # --init's attention heads: auto (as its files say), or IMAGE,TEXT
# budget and optimisation (DataComp's values; lr and warmup scaled for the tiny CPU run)
budget_samples = 56_000        # C: samples seen per time step (7 epochs of a synthetic year)
batch_size = 64                # global, over all processes
accum_steps = 1                # micro-batches per process's batch: same gradients, less memory
lr = 5e-4                      # peak learning rate
lr_schedule = "cosine"         # the rate through time: one of schedules.SCHEDULES
warmup_iters = 20              # linear warmup of the first step (DataComp medium: 500)
warmup_iters_later = 20        # warmup of the later steps that start a new optimizer
weight_decay = 0.2
beta1 = 0.9
beta2 = 0.98
eps = 1e-6
# system
seed = 0
workers = 1                    # DataLoader processes per training process
device = "cuda" if torch.cuda.is_available() else "cpu"
compile = torch.cuda.is_available()  # torch.compile the model (on by default on CUDA)
precision = "bf16" if torch.cuda.is_available() else "fp32"  # bf16 autocast, or fp32
grad_checkpointing = False     # recompute activations in backward: a larger batch fits per GPU
log_interval = 10              # iterations between log lines
eval_batch = 256               # pairs per evaluation batch
# surviving kills and bad data
ckpt_interval_samples = 5_000  # a resume checkpoint every this many samples (0: on SIGTERM only)
keep_checkpoints = 2           # resume checkpoints kept (an older one is used if the newest is bad)
max_bad_fraction = 0.05        # stop once this share of the samples read is bad
max_nonfinite_in_row = 5       # stop after this many non-finite losses in a row (each skipped)
max_image_pixels = 4096 * 4096  # a larger decoded image is skipped as corrupt
DEFAULTS = {k: v for k, v in globals().items()
            if k not in _globals_before_config and k != "_globals_before_config"}
SYNTH_ROOT = "data/tic-synth"  # where the built-in benchmark is made when data_root is left as is
MAX_VOCAB = 262_144  # a BPE's largest vocab_size: 2^18, as the largest in use (Gemma's 256k)


def parse_config(argv: list[str]) -> SimpleNamespace:
    """The config above and the strategies' and schedules' settings, with --key=value overrides,
    each of its default's type. data_root is made absolute, so that a run's checkpoints find their
    data from any folder (evaluate.py --run)."""
    declared = {**strategies.SETTINGS, **schedules.SETTINGS}
    clash = (DEFAULTS.keys() | schedules.SETTINGS.keys()) & strategies.SETTINGS.keys() \
        or DEFAULTS.keys() & schedules.SETTINGS.keys()
    if clash:
        raise SystemExit(f"error: a strategy's or schedule's setting has the name of another "
                         f"setting: {', '.join(sorted(clash))}; rename it")
    helps = {**config_help(), **{key: s.help for key, s in declared.items()}}
    defaults = {**DEFAULTS, **{key: s.default for key, s in declared.items()}}
    cfg = SimpleNamespace(**parse_flags(argv, defaults, helps))
    cfg.data_root = os.path.abspath(cfg.data_root)
    return cfg


def config_help() -> dict[str, str]:
    """The comment beside each value of the config above, as its --help line."""
    with open(__file__) as f:
        source = f.read()
    block = source.split("\nDEFAULTS = ")[0].split("_globals_before_config = set(globals())")[1]
    return {m[1]: m[2] for m in re.finditer(r"^(\w+) += .*?  # (.*)$", block, re.MULTILINE)}


def run_folder(cfg: SimpleNamespace) -> str:
    return cfg.out_dir or os.path.join("runs", cfg.strategy)


def tokenizer_beside(init: str) -> str:
    """The tokenizer.json beside --init's file (a stepNN.pt's run has one), or ""."""
    return os.path.join(os.path.dirname(init), "tokenizer.json") if init else ""


def check_config(cfg: SimpleNamespace) -> None:
    """Refuse, before any compute, a value that parses but cannot work."""
    if cfg.model not in PRESETS:
        raise SystemExit(f"error: unknown model '{cfg.model}'; choose one of: {', '.join(PRESETS)}")
    if cfg.loss not in LOSSES:
        raise SystemExit(f"error: unknown loss '{cfg.loss}'; choose one of: {', '.join(LOSSES)}")
    if cfg.precision not in PRECISIONS:
        raise SystemExit(f"error: unknown precision '{cfg.precision}'; "
                         f"choose one of: {', '.join(PRECISIONS)}")
    strategies.check_settings(cfg)
    schedules.check_schedule(cfg)
    least = {"batch_size": 1, "accum_steps": 1, "budget_samples": cfg.batch_size, "log_interval": 1,
             "workers": 0, "ckpt_interval_samples": 0, "keep_checkpoints": 1,
             "max_nonfinite_in_row": 1, "seed": 0, "warmup_iters": 0, "warmup_iters_later": 0,
             "eval_batch": 1, "tokenizer_samples": 1,
             "vocab_size": 259,  # a byte-level BPE: 256 bytes, 3 specials
             "max_image_pixels": make_config(cfg.model).image_px ** 2}  # the model's input image
    for key, n in least.items():
        if getattr(cfg, key) < n:
            raise SystemExit(f"error: --{key}={getattr(cfg, key)} is too small; use at least {n}")
    most = {"seed": MAX_SEED, "vocab_size": MAX_VOCAB}
    for key, n in most.items():
        if getattr(cfg, key) > n:
            raise SystemExit(f"error: --{key}={getattr(cfg, key)} is too large; use at most {n}")
    ranges = {"lr": (0 <= cfg.lr < math.inf, "a rate of 0 or more"),
              "eps": (0 < cfg.eps < 1, "above 0, below 1"),
              "weight_decay": (0 <= cfg.weight_decay < math.inf, "0 or more"),
              "beta1": (0 <= cfg.beta1 < 1, "0 or more, below 1"),
              "beta2": (0 <= cfg.beta2 < 1, "0 or more, below 1"),
              "max_bad_fraction": (0 <= cfg.max_bad_fraction <= 1, "a fraction, 0 to 1")}
    for key, (ok, use) in ranges.items():  # nan fails every comparison, so it is refused too
        if not ok:
            raise SystemExit(f"error: --{key}={getattr(cfg, key)} is out of range; use {use}")
    if cfg.quick_gelu not in ("auto", "true", "false"):
        raise SystemExit(f"error: --quick_gelu={cfg.quick_gelu}: use auto, true (OpenAI's models) "
                         f"or false")
    parse_heads(cfg.heads)  # a one-line error if it is neither auto nor IMAGE,TEXT
    if cfg.init and not os.path.isfile(cfg.init):
        raise SystemExit(f"error: --init={cfg.init}: no such file; pass an OpenAI or OpenCLIP "
                         f"CLIP, or a stepNN.pt")
    if cfg.init and not is_checkpoint_file(cfg.init):
        raise SystemExit(f"error: --init={cfg.init}: not a checkpoint (a torch.save or TorchScript "
                         f"zip, whole, or a .safetensors file); pass an OpenAI or OpenCLIP CLIP, "
                         f"or a stepNN.pt")
    beside_init = tokenizer_beside(cfg.init)
    if cfg.init and not (cfg.tokenizer or os.path.isfile(beside_init)):
        raise SystemExit("error: --init needs the tokenizer its model was trained with: for "
                         "OpenAI's and OpenCLIP's, --tokenizer=clip-tokenizer.json (made by python "
                         "tools/prepare.py clip-tokenizer)")
    if cfg.tokenizer and not os.path.isfile(cfg.tokenizer):
        raise SystemExit(f"error: --tokenizer={cfg.tokenizer}: no such file; pass a tokenizer.json,"
                         f" or leave --tokenizer empty to train one on the first step's captions")
    if cfg.tokenizer or cfg.init:
        data.Tokenizer.load(cfg.tokenizer or beside_init)  # refused now, not after counting data
    evaluate.static_tasks(cfg.data_root, cfg.static)  # the same: each --static path must be a task
    if 0 < cfg.ckpt_interval_samples < cfg.batch_size:
        raise SystemExit(f"error: --ckpt_interval_samples={cfg.ckpt_interval_samples} is less than "
                         f"one batch ({cfg.batch_size}); use 0 (only on SIGTERM) or at least "
                         f"{cfg.batch_size}")
    if cfg.shard_cmd and "{path}" not in cfg.shard_cmd:
        raise SystemExit(f"error: --shard_cmd={cfg.shard_cmd!r} has no {{path}} for the shard's "
                         f"path under data_root")
    check_device(cfg.device)


# ----------------------------------------------------------------------------- data, tokenizer
def load_benchmark(cfg: SimpleNamespace,
                   world: World) -> tuple[list[list[str]], list[list[data.Part]], dict]:
    """Each time step's year folders, its training data (a Part per year), and the evaluation
    tasks by name: every step's, then the static ones. The built-in benchmark is made on first
    use. Rank 0 goes first: the others read what it wrote, and only it says what is wrong."""
    if not world.master:
        world.barrier()
    if world.master and cfg.data_root == os.path.abspath(SYNTH_ROOT):
        synthetic.make_synthetic_benchmark(cfg.data_root)
    if not os.path.isdir(os.path.join(cfg.data_root, "train")):
        raise SystemExit(f"error: no {cfg.data_root}/train folder; point --data_root at a TiC "
                         f"layout (train/YEAR/*.tar with sizes.json) or leave it at {SYNTH_ROOT} "
                         f"for the built-in benchmark")
    step_years = shards.parse_steps(cfg.data_root, cfg.steps)
    shards.check_sizes(cfg.data_root, [y for ys in step_years for y in ys])  # before any counting
    step_data = [[data.Part(y, shards.year_shards(cfg.data_root, y, shard_cmd=cfg.shard_cmd))
                  for y in ys] for ys in step_years]
    tasks = evaluate.tasks_of(cfg.data_root, step_years, cfg.shard_cmd)
    static = evaluate.static_tasks(cfg.data_root, cfg.static)
    if tasks.keys() & static.keys():
        raise SystemExit(f"error: a static task is named as a time step "
                         f"({', '.join(tasks.keys() & static.keys())}); rename it in --static or "
                         f"in {cfg.data_root}/static")
    if world.master:
        world.barrier()
    return step_years, step_data, {**tasks, **static}


def load_tokenizer(run_dir: str, cfg: SimpleNamespace, first_years: list[str],
                   world: World) -> data.Tokenizer:
    """RUN/tokenizer.json, fixed for the whole run as CLIP's vocabulary is; made on first use from
    --tokenizer, or trained on the first step's captions."""
    path = os.path.join(run_dir, "tokenizer.json")
    given = cfg.tokenizer or tokenizer_beside(cfg.init)  # a stepNN.pt as --init: its run's
    if world.master and not os.path.exists(path) and given:
        data.Tokenizer.load(given).save(path)
    elif world.master and not os.path.exists(path):
        captions = data.first_captions(cfg.data_root, first_years, cfg.tokenizer_samples,
                                       cfg.shard_cmd)
        data.Tokenizer.train(captions, cfg.vocab_size).save(path)
    world.barrier()
    return data.Tokenizer.load(path)


def prepare_run_dir(run_dir: str, world: World) -> None:
    """Make the run folder if it is new, check it is writable, lock it (a second run is refused),
    and remove the temporary files that killed processes left in it (shards.write_atomic)."""
    if world.master:
        if os.path.exists(run_dir) and not os.path.isdir(run_dir):
            raise SystemExit(f"error: --out_dir={run_dir} is a file, not a folder; "
                             f"pick another --out_dir")
        try:
            os.makedirs(run_dir, exist_ok=True)
        except OSError as e:
            raise SystemExit(f"error: cannot make the run folder {run_dir}: {e.strerror}; "
                             f"pick another --out_dir")
        probe = os.path.join(run_dir, ".writable")
        shards.write_atomic(probe, lambda f: None)  # a WriteError line if it is not
        os.remove(probe)
        survive.lock_run_folder(run_dir)  # a second run in this folder is refused
        for folder in (run_dir, os.path.join(run_dir, "resume")):
            removed = shards.remove_stale_temporaries(folder)
            if removed:
                print(f"{folder}: removed {len(removed)} temporary file(s) that killed processes "
                      f"left ({', '.join(removed[:3])}{', ...' if len(removed) > 3 else ''})")
    world.barrier()


def load_initial(cfg: SimpleNamespace, tokenizer: data.Tokenizer, world: World) -> CLIP | None:
    """The initial model (--init), or None. Its shape, activation, context length and end-of-text
    id come from the file; --model is ignored, with a line saying so."""
    if not cfg.init:
        return None
    quick_gelu = {"auto": None, "true": True, "false": False}[cfg.quick_gelu]
    model, _ = load_checkpoint(cfg.init, quick_gelu, parse_heads(cfg.heads))
    shape = model.cfg
    check_tokenizer(shape, tokenizer, "the run's tokenizer.json", f"--init={cfg.init}")
    if cfg.max_image_pixels < shape.image_px ** 2:  # check_config knew only --model's size
        raise SystemExit(f"error: --max_image_pixels={cfg.max_image_pixels} is too small for "
                         f"--init's {shape.image_px} px images; use at least {shape.image_px ** 2}")
    if (LOSSES[cfg.loss].init_logit_bias is None) != (shape.init_logit_bias is None):
        has = "has a logit bias" if shape.init_logit_bias is not None else "has no logit bias"
        raise SystemExit(f"error: --init's model {has}, which --loss={cfg.loss} does not fit; "
                         f"pass the loss it was trained with")
    if world.master:
        print(f"init {cfg.init}: ViT {shape.vision_layers}x{shape.vision_width} at "
              f"{shape.image_px} px, patch {shape.patch_px}; text {shape.text_layers}x"
              f"{shape.text_width}, {shape.context_tokens} tokens; "
              f"{'QuickGELU' if shape.quick_gelu else 'GELU'} (--model is ignored: the shape is "
              f"the file's)")
    return model


def run_log(run_dir: str, world: World):
    """log(record): one JSON line appended to RUN/log.jsonl by rank 0 (a failed write names it)."""
    path = os.path.join(run_dir, "log.jsonl")

    def log(record: dict) -> None:
        if world.master:
            shards.append_line(path, json.dumps(record))
    return log


# ----------------------------------------------------------------------------- one time step
def start_model(strategy: strategies.Strategy, step: strategies.TimeStep,
                model_cfg: CLIPConfig) -> CLIP:
    """The start model: the continue point, if the strategy warm-starts and there is one; else the
    initial model, or a random init."""
    torch.manual_seed(step.config.seed + step.t)
    model = CLIP(model_cfg)
    if strategy.warm_start and step.continue_point is not None:
        model.load_state_dict(step.continue_point["model"])  # the optimizer: train_step
    elif step.initial is not None:  # restart and oracle start again from the initial model
        model.load_state_dict(step.initial)
    model.to(step.device)
    model.set_grad_checkpointing(step.config.grad_checkpointing)
    return model


def begin_step(strategy: strategies.Strategy, model: CLIP, step: strategies.TimeStep,
               run_dir: str, world: World) -> dict:
    """The strategy's start-of-step action on the start model, done once a step: its report, its
    state and the RNG state it left are kept in RUN/resume until the step ends, and a resumed
    step takes them from there."""
    path = survive.start_checkpoint(run_dir, step.t)
    kept = survive.load_start(path, step.config, world)
    world.barrier()  # every rank has looked before rank 0 writes it
    if kept:
        torch.set_rng_state(kept["rng_cpu"])
        if world.device.type == "cuda" and kept["rng_cuda"] is not None:
            torch.cuda.set_rng_state(kept["rng_cuda"], world.device)
        step.state = kept["state"]
        return kept["report"]
    report = strategies.act(strategy, "start_of_step", model, step)
    step.state = cpu_copy(step.state)
    if world.master:
        cuda = world.device.type == "cuda"
        kept = {"report": report, "state": step.state, "config": vars(step.config),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(world.device) if cuda else None}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shards.write_atomic(path, lambda f: torch.save(kept, f))
    return report


def train_step(model: CLIP, parts: list[data.Part], budget: int, batch_loss, before_update,
               step: strategies.TimeStep, world: World, run_dir: str,
               log) -> survive.StepState | None:
    """Train model on parts for budget samples at the rates of the step's schedule, with a new
    optimizer or the continue point's, from the newest resume checkpoint if an earlier run left
    one; the strategy's batch_loss and before_update (or None) on every batch. Returns the step's
    progress (with the trunk and the optimizer where the schedule carries it), or None if SIGTERM
    stopped the step (saved)."""
    cfg, t, where = step.config, step.t, f"step {step.t + 1} ({step.step_names[step.t]})"
    n_iters = budget // cfg.batch_size
    optimizer = model.configure_optimizer(cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)
    before = None  # the iterations of the optimizer this step goes on with; None: a new one
    if step.continue_point is not None and step.continue_point["optimizer"] is not None:
        optimizer.load_state_dict(cpu_copy(step.continue_point["optimizer"]))  # updated in place
        before = step.continue_point["iterations"]
    schedule = schedules.step_schedule(cfg, t, len(step.step_names), n_iters, before)
    carries = schedule.row.carries_optimizer
    progress = survive.StepState.resume(run_dir, t, model, optimizer, cfg, world, step.faults)
    if progress.iteration:
        print(f"rank {world.rank}: {where}: resuming at sample "
              f"{progress.iteration * cfg.batch_size} of {n_iters * cfg.batch_size} from "
              f"{progress.path}")
        log({"event": "resume", "time_step": t + 1, "samples": progress.iteration * cfg.batch_size,
             "checkpoint": progress.path})
    train_model = torch.compile(model) if cfg.compile else model
    if world.distributed:
        device_ids = [world.device] if world.device.type == "cuda" else None
        train_model = DDP(train_model, device_ids=device_ids)
    stream = data.TrainStream(parts, budget, cfg.batch_size, world.rank, world.size, cfg.seed, t,
                              model.cfg.image_px, step.tokenizer, model.cfg.context_tokens,
                              keep_seed=cfg.seed, start_batch=progress.iteration,
                              max_bad_fraction=cfg.max_bad_fraction,
                              max_image_pixels=cfg.max_image_pixels)
    ckpt_every = cfg.ckpt_interval_samples // cfg.batch_size  # iterations between them; 0: none
    run_loss = LOSSES[cfg.loss].fn

    def total_loss(batch: dict, out: dict) -> torch.Tensor:  # the run's loss, the strategy's term
        loss = run_loss(**out, rank=world.rank, world_size=world.size)
        return loss if batch_loss is None else loss + batch_loss(batch, out)
    t_log, it_log = time.time(), progress.iteration
    with data.workers_stopped():  # however the loop ends, no loader worker outlives it
        loader = data.train_loader(stream, cfg.workers)
        for it, (images, tokens, faults) in enumerate(loader, progress.iteration):
            progress.count_faults(faults, images is None, stream.min_read, cfg, where)
            step.iteration = it  # the strategy's clock: its own batches (TimeStep.draw) follow it
            if carries and it == schedule.cooldown_start:  # the branch leaves the trunk: keep it
                progress.trunk = {"model": cpu_copy(model.state_dict()),
                               "optimizer": cpu_copy(optimizer.state_dict()),
                               "iterations": (before or 0) + it}
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr(it)
            images = images.to(world.device, non_blocking=True)
            tokens = tokens.to(world.device, non_blocking=True)
            images = data.normalize_images(images)  # after the copy: uint8 is 1/4 of the bytes
            batch = {"images": images, "tokens": tokens}
            optimizer.zero_grad(set_to_none=True)
            loss = forward_backward(train_model, images, tokens, lambda out: total_loss(batch, out),
                                    cfg.accum_steps, cfg.precision)
            if before_update is not None:  # e.g. A-GEM's projection of the gradients
                before_update(model)
            progress.optimizer_step(model, optimizer)  # skipped, and counted, if not finite
            model.clamp_logit_scale_()
            progress.iteration = it + 1
            log_due = progress.iteration % cfg.log_interval == 0 or progress.iteration == n_iters
            ckpt_due = ckpt_every > 0 and progress.iteration % ckpt_every == 0 \
                and progress.iteration < n_iters
            if not (log_due or ckpt_due):
                continue
            # once per log interval: read the device's counters, log, save, stop if asked
            progress.check_nonfinite(run_dir, t, cfg, where)
            stop = survive.stop_requested(world)
            if world.master and log_due:
                now = time.time()  # .item() syncs with the device: only once per log interval
                samples_per_s = (progress.iteration - it_log) * cfg.batch_size / (now - t_log)
                record = {"samples": progress.iteration * cfg.batch_size, "loss": loss.item(),
                          "lr": schedule.lr(it), "logit_scale": model.logit_scale.exp().item()}
                eta_s = (n_iters - progress.iteration) * cfg.batch_size / samples_per_s
                print(f"step {t + 1}/{len(step.step_names)} ({step.step_names[t]}) | "
                      f"{record['samples']}/{n_iters * cfg.batch_size} samples | "
                      f"loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                      f"logit scale {record['logit_scale']:.1f} | {samples_per_s:.0f} samples/s | "
                      f"eta {eta_s:.0f}s")
                log({"event": "train", "time_step": t + 1, **record,
                     "samples_per_s": samples_per_s})
                t_log, it_log = now, progress.iteration
            if ckpt_due or stop:
                saved = progress.save(run_dir, t, model, optimizer, cfg, world)
            if stop:
                if world.master:
                    print(f"SIGTERM: saved {saved} at sample "
                          f"{progress.iteration * cfg.batch_size} of step {t + 1}; rerun the "
                          f"same command to continue")
                return None
    if carries:
        progress.end = {"optimizer": cpu_copy(optimizer.state_dict()),
                     "iterations": (before or 0) + n_iters}
    return progress


def cpu_copy(obj):
    """A copy of a state dict (a model's, an optimizer's) in CPU memory, apart from the live one."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


def next_continue_point(strategy: strategies.Strategy, cfg: SimpleNamespace,
                        progress: survive.StepState, trained: dict, deployed: dict) -> dict | None:
    """The continue point where the schedule carries its optimizer ({"model", "optimizer",
    "iterations"}): the trunk where the cooled branch began (continue_from=trunk); the branch's end
    (continue_from=cooled, or no branch); or, for a strategy that goes on from the model its
    end-of-step action made (patching, ema-from-merge), that model with the branch's optimizer.
    None otherwise, and for a strategy that starts every step afresh (restart, oracle)."""
    if progress.end is None or not strategy.warm_start:
        return None
    if trained is not deployed and strategy.continue_from_deployed:
        return {**progress.end, "model": deployed}
    if progress.trunk is not None and cfg.continue_from == "trunk":
        return progress.trunk
    return {**progress.end, "model": trained}


def announce_step(step: strategies.TimeStep, strategy: strategies.Strategy,
                  parts: list[data.Part], budget: int, log) -> None:
    """The step's first line: its start, budget and data mix (rank 0)."""
    if not step.master:
        return
    n_iters, batch = budget // step.config.batch_size, step.config.batch_size
    mix = ", ".join(f"{p.name} {p.n_samples:.0f}"
                    + (f" ({100 * p.keep_fraction:.0f}%)" if p.keep_fraction < 1 else "")
                    + (f" [{100 * p.share:.0f}% of samples]" if p.share is not None else "")
                    for p in parts)
    start = "warm start" if step.continue_point is not None and step.t > 0 else \
        "the initial model" if step.initial is not None else "random init"
    if step.continue_point is not None and step.continue_point["optimizer"] is not None:
        start += (f" with the optimizer carried over "
                  f"({step.continue_point['iterations']} iterations)")
    if step.config.new_data_fraction and step.t > 0 and all(p.share is None for p in parts):
        mix += " (new_data_fraction has no effect: nothing is replayed)"
    print(f"step {step.t + 1}/{len(step.step_names)} ({step.step_names[step.t]}): {start}, "
          f"budget {n_iters * batch} samples ({n_iters} iters), data: {mix}")
    log({"event": "step_start", "time_step": step.t + 1, "step": step.step_names[step.t],
         "mix": {p.name: p.n_samples for p in parts}, "budget_samples": n_iters * batch})


def score(model: CLIP, row: dict | None, tasks: dict, tokenizer: data.Tokenizer,
          cfg: SimpleNamespace, world: World) -> dict:
    """A row of the evaluation matrix: row (measured earlier) completed with the tasks it lacks or
    could not score then, all of them for a new row. Rank 0 evaluates; the other ranks return row
    as it is."""
    row = dict(row or {})
    todo = {task_name: task for task_name, task in tasks.items()
            if not evaluate.scored(row.get(task_name))}
    if world.master and todo:
        row.update(evaluate.evaluate_step(model, todo, tokenizer, world.device, cfg.eval_batch,
                                          cfg.precision, max_bad_fraction=cfg.max_bad_fraction,
                                          max_image_pixels=cfg.max_image_pixels))
    return row


def save_step(path: str, model: CLIP, deployed: dict, step: strategies.TimeStep, record: dict,
              world: World) -> None:
    """RUN/stepNN.pt: the deployed model (model's weights, on the CPU) and the step's record,
    written by rank 0 with a line giving its size, once every process holds the same weights; the
    step's resume checkpoints go."""
    world.check_same_weights(model, f"step {step.t + 1} ({step.step_names[step.t]}), at its end")
    if world.master:  # deployed may also be the trunk's model: torch.save stores it once
        ckpt = {"model": deployed, "model_config": asdict(model.cfg), "config": vars(step.config),
                **record}
        shards.write_atomic(path, lambda f: torch.save(ckpt, f))
        survive.StepState.clear(os.path.dirname(path), step.t)
        kept = tensor_bytes(record["state"])
        print(f"saved {path}: {os.path.getsize(path) / 1e6:.1f} MB"
              + (f", of which the strategy's state {kept / 1e6:.1f} MB" if kept else ""))


def tensor_bytes(obj) -> int:
    """The bytes of the tensors in obj, a tensor or dicts and lists of them."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def load_step(path: str, step: strategies.TimeStep, model_cfg: CLIPConfig,
              step_years: list[list[str]], world: World) -> tuple[CLIP, dict]:
    """The model (on the device) and record of a step an earlier run of this command finished,
    checked to belong to this run; the step's resume checkpoints go (a kill between stepNN.pt
    and their removal leaves them). A grown run says where that moved its schedule."""
    model, record = load_checkpoint(path)
    survive.check_shape(record, path, model_cfg, step.config.model)
    survive.check_steps(record, path, step_years)
    if world.master:
        survive.StepState.clear(os.path.dirname(path), step.t)
        print(f"step {step.t + 1}/{len(step.step_names)} ({step.step_names[step.t]}): "
              f"done already ({path})")
        grown_note = schedules.get_schedule(step.config.lr_schedule).grown_note
        note = step.t == 0 and grown_note and grown_note(
            step.config, record["config"], len(record["steps"]), len(step_years))  # from step 1's
        if note:
            print(note)
    return model.to(world.device), record


def announce_run(run_dir: str, cfg: SimpleNamespace, model_cfg: CLIPConfig, names: list[str],
                 world: World, log) -> None:
    """The run's first line, and its config in the log (rank 0)."""
    if world.master:
        print(f"run {run_dir}: strategy {cfg.strategy}, model {cfg.model}, {len(names)} steps "
              f"({', '.join(names)}), {world.size} process(es) on {world.device.type}, "
              f"global batch {cfg.batch_size}")
        log({"event": "config", "config": vars(cfg), "model_config": asdict(model_cfg)})


def report_run(run_dir: str, result: dict) -> None:
    """The run's evaluation matrix, printed and drawn (RUN/eval_matrix.png)."""
    print(evaluate.format_matrix(result))
    pictures.write_eval_matrix(run_dir, result)
    print(f"checkpoints, log.jsonl, eval_matrix.json and eval_matrix.png in {run_dir}")


def report_step(step: strategies.TimeStep, record: dict, row: dict, log) -> None:
    """The step's line: samples, time, compute, R@1 per task, and what it skipped (rank 0)."""
    faults, nonfinite = record["faults"], record["nonfinite"]
    number = lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731 (n/a: not scored)
    cells = " ".join(f"{task} {number(m.get(evaluate.METRIC))}" for task, m in row.items()
                     if task in step.step_names)
    static = " ".join(f"{task} {number(evaluate.static_number(m))}" for task, m in row.items()
                      if task not in step.step_names)
    health = "".join([f"; skipped {faults['bad_samples']} of {faults['samples']} samples read "
                      f"({survive.fault_summary(faults)})" if faults.get("bad_samples") else "",
                      f"; {nonfinite} non-finite losses (updates skipped)" if nonfinite else ""])
    print(f"step {step.t + 1}/{len(step.step_names)} ({record['step_name']}): "
          f"{record['samples_seen']} samples ({record['samples_read']} read) in "
          f"{record['train_s']:.0f}s, "
          f"{record['flops']:.3g} FLOPs; {evaluate.METRIC} per task: {cells}"
          f"{'; static tasks: ' + static if static else ''}{health}")
    logged = ("samples_seen", "samples_read", "flops", "train_s", "start_of_step", "end_of_step",
              "faults", "nonfinite")
    log({"event": "step_end", "time_step": step.t + 1, "step": record["step_name"],
         **{k: record[k] for k in logged}, "eval": row})


# ----------------------------------------------------------------------------- the continual loop
def main(argv):
    cfg = parse_config(argv)
    check_config(cfg)
    strategy = strategies.get_strategy(cfg.strategy)
    world = start_world(cfg)
    signal.signal(signal.SIGTERM, survive.on_sigterm)  # save, then exit at the next log interval
    run_dir = run_folder(cfg)
    prepare_run_dir(run_dir, world)
    step_years, step_data, tasks = load_benchmark(cfg, world)
    names = [shards.step_name(ys) for ys in step_years]
    strategies.check_strategy(strategy, names, step_data, cfg)
    survive.check_run_definition(run_dir, cfg, step_years, step_data, world)  # RUN/run.json
    tokenizer = load_tokenizer(run_dir, cfg, step_years[0], world)
    initial = load_initial(cfg, tokenizer, world)  # the initial model (--init), or None
    run_loss = LOSSES[cfg.loss]  # the model learns the scalars it reads
    model_cfg = initial.cfg if initial else make_config(
        cfg.model, vocab_size=tokenizer.vocab_size, eot_token_id=tokenizer.eot_id,
        init_logit_scale=run_loss.init_logit_scale, init_logit_bias=run_loss.init_logit_bias)
    log = run_log(run_dir, world)
    announce_run(run_dir, cfg, model_cfg, names, world, log)
    matrix_path = os.path.join(run_dir, "eval_matrix.json")
    rows, initial_row = evaluate.read_results(matrix_path, names)  # what an earlier run measured
    if initial:  # measured first: a row of its own, outside ID and the transfers
        initial_row = score(initial.to(world.device), initial_row, tasks, tokenizer, cfg, world)
        initial = {k: v.detach().cpu() for k, v in initial.cpu().state_dict().items()}  # weights
    previous = initial  # lwf's teacher, patching's and ema's partner
    anchor = initial  # the run's first model: the initial one, else step 1's deployed one
    continue_point = strategies.continue_point(strategy, {}, initial) if initial else None
    strategy_state = {}  # what the strategy's hooks keep across steps
    for t, name in enumerate(names):
        step = strategies.TimeStep(t, names, step_data, cfg, tokenizer, world, model_cfg, initial,
                                   previous, anchor,
                                   continue_point if strategy.warm_start else None, strategy_state)
        path = evaluate.step_checkpoint(run_dir, t)
        done = os.path.exists(path)
        if done:  # in an earlier run of this command
            model, record = load_step(path, step, model_cfg, step_years, world)
            deployed = cpu_copy(model.state_dict())
        elif survive.stop_requested(world):
            if world.master:
                print(f"SIGTERM: stopped before step {t + 1}; rerun the same command to continue")
            break
        else:
            # 1. ask the strategy: the start model, the data, the budget, its hooks
            model = start_model(strategy, step, model_cfg)
            hooks = previous is not None  # the hooks relate the model to the previous one
            begun = begin_step(strategy, model, step, run_dir, world) \
                if hooks and strategy.start_of_step else {}
            batch_loss, before_update = (strategies.make_hook(strategy, hook, model, step)
                                         if hooks and getattr(strategy, hook) else None
                                         for hook in ("batch_loss", "before_update"))
            parts = strategies.step_parts(strategy, step)
            budget = cfg.budget_samples * strategy.budget_units(t)
            announce_step(step, strategy, parts, budget, log)
            # 2. train the step
            progress = train_step(model, parts, budget, batch_loss, before_update, step, world,
                                  run_dir, log)
            if progress is None:  # stopped by SIGTERM, saved: a rerun continues from there
                world.barrier()
                world.finish()
                return
            summary = progress.summary(world)  # time, faults of every rank, non-finite losses
            # 3. the end-of-step action (patching's interpolation, ema's merge): the deployed model
            acts = hooks and strategy.end_of_step is not None
            trained = cpu_copy(model.state_dict())
            action = strategies.act(strategy, "end_of_step", model, step) if acts else {}
            deployed = cpu_copy(model.state_dict()) if acts else trained
            if acts and all(torch.equal(trained[k], deployed[k]) for k in trained):
                deployed = trained  # an action that left the weights as trained (patching's a = 1)
            # 4. the checkpoint, with the step's compute: training costs 3 forward passes a pair
            seen = budget // cfg.batch_size * cfg.batch_size
            per_sample = 3 * model.flops_per_pair() + sum(hook.flops_per_sample for hook in
                                                          (batch_loss, before_update) if hook)
            flops = seen * per_sample + begun.get("flops", 0) + action.get("flops", 0)
            read = summary["faults"].get("samples", 0) + sum(report.get("samples_read", 0)
                                                             for report in (begun, action))
            record = {"steps": step_years, "time_step": t + 1, "step_name": name,
                      "samples_seen": seen, "samples_read": read, "flops": flops,
                      "strategy": cfg.strategy,
                      "start_of_step": begun, "end_of_step": action, **summary,
                      **({"trained": trained} if deployed is not trained else {}),  # ema's
                      "continue_point": next_continue_point(strategy, cfg, progress, trained,
                                                            deployed),
                      "state": cpu_copy(step.state)}
            save_step(path, model, deployed, step, record, world)
        previous = deployed
        anchor = deployed if anchor is None else anchor
        continue_point = strategies.continue_point(strategy, record, previous)
        strategy_state = record.get("state", {})
        # 5. evaluate on every step's task (a step done earlier: on the tasks a grown run added)
        rows[name] = score(model, rows.get(name) if done else None, tasks, tokenizer, cfg, world)
        if world.master:
            shards.write_json(matrix_path, evaluate.eval_matrix(rows, names, initial_row))
        if not done:
            if world.master:
                report_step(step, record, rows[name], log)
            world.barrier()
    if world.master and rows:  # none yet if SIGTERM came before the first step ended
        report_run(run_dir, evaluate.eval_matrix(rows, names, initial_row))
    world.finish()


def run(argv: list[str]) -> None:
    """The command line: main, ended by an error in one line on stderr and a non-zero exit, said
    once of all the processes (world.py); torchrun adds a report of its own."""
    try:
        main(argv)
    except SystemExit as e:  # the one-line refusals of bad input
        raise refusal(e) from None
    except Exception as e:
        raise failure(e, "train.py", argv, run_folder(parse_config(argv))) from None


if __name__ == "__main__":
    run(sys.argv[1:])
