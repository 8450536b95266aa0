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

Settings: SETTINGS below and those strategies and schedules declare, each --key=value (python
train.py --help lists them). The run folder (out_dir) holds tokenizer.json, stepNN.pt per step,
log.jsonl, eval_matrix.json and its picture, run.json. A rerun goes on exactly where the command
stopped (survive.py); a bad setting is one line before any compute (checks.py). Follows nanoGPT's
train.py for shape, open_clip for the CLIP details, DataComp for the hyperparameters.
"""
import os
import sys
from types import SimpleNamespace

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import benchmark
import checks
import data
import evaluate
import report
import schedules
import shards
import strategies
import survive
import synthetic
from checkpoints import cpu_copy, load_initial, step_checkpoint
from model import CLIP, LOSSES, forward_backward, make_config
from settings import MAX_SEED, Setting, at_least, between, parse_settings
from text import Tokenizer
from world import World, failure, refusal, start_world, workers_stopped

# ----------------------------------------------------------------------------- config
GPU = torch.cuda.is_available()
SETTINGS = {  # read as cfg.KEY; DataComp's values, lr and warmups scaled for the tiny CPU run
    # data and run
    "data_root": Setting(synthetic.ROOT, "TiC layout: train/YEAR/*.tar, sizes.json, eval/"),
    "steps": Setting("", "time steps as year groups, e.g. 2014-2016,2017; empty: one a year"),
    "out_dir": Setting("", "the run folder; empty: runs/STRATEGY"),
    "tokenizer": Setting("", "a tokenizer.json; empty: a BPE trained on the first step's captions"),
    "vocab_size": Setting(1024, "of that BPE (256 bytes, 3 specials)", *between(259, 2 ** 18)),
    "tokenizer_samples": Setting(100_000, "first-step captions that train it", *at_least(1)),
    "static": Setting("", "static tasks, NAME=PATH,... in clip_benchmark's format"),
    "shard_cmd": Setting("", "stream shards from a command, e.g. aws s3 cp s3://b/{path} -",
                         lambda c: not c or "{path}" in c, "a command with {path} in it"),
    # strategy, model and loss
    "strategy": Setting("cumulative-all", "one of strategies.STRATEGIES"),
    "model": Setting("tiny", "one of model.PRESETS"),
    "loss": Setting("clip", "one of model.LOSSES (a file may add one: examples/siglip.py)"),
    "init": Setting("", "start from this CLIP (OpenAI, OpenCLIP, a stepNN.pt), its shape"),
    "quick_gelu": Setting("auto", "--init's activation: auto (as its file says), true or false",
                          lambda v: v in ("auto", "true", "false"), "auto, true or false"),
    "heads": Setting("auto", "--init's attention heads: auto (as its files say), or IMAGE,TEXT"),
    # budget and optimisation
    "budget_samples": Setting(56_000, "C: samples per time step (7 epochs of a synthetic year)"),
    "batch_size": Setting(64, "global, over all processes", *at_least(1)),
    "accum_steps": Setting(1, "micro-batches a process's batch: same gradients, less memory",
                           *at_least(1)),
    "lr": Setting(5e-4, "peak learning rate", *at_least(0)),
    "lr_schedule": Setting("cosine", "the rate through time: one of schedules.SCHEDULES"),
    "warmup_iters": Setting(20, "warmup of the first step (DataComp medium: 500)", *at_least(0)),
    "warmup_iters_later": Setting(20, "warmup of later steps with a new optimizer", *at_least(0)),
    "weight_decay": Setting(0.2, "AdamW's", *at_least(0)),
    "beta1": Setting(0.9, "AdamW's", *between(0, 1, below_hi=True)),
    "beta2": Setting(0.98, "AdamW's", *between(0, 1, below_hi=True)),
    "eps": Setting(1e-6, "AdamW's", lambda e: 0 < e < 1, "above 0, below 1"),
    # system
    "seed": Setting(0, "of the model's init and the data's order", *between(0, MAX_SEED)),
    "workers": Setting(1, "DataLoader processes per training process", *at_least(0)),
    "device": Setting("cuda" if GPU else "cpu", "cpu or cuda"),
    "compile": Setting(GPU, "torch.compile the model (on by default on CUDA)"),
    "precision": Setting("bf16" if GPU else "fp32", "bf16 autocast, or fp32"),
    "grad_checkpointing": Setting(False, "recompute activations in backward: larger batches fit"),
    "log_interval": Setting(10, "iterations between log lines", *at_least(1)),
    "eval_batch": Setting(256, "pairs per evaluation batch", *at_least(1)),
    # surviving kills and bad data
    "ckpt_interval_samples": Setting(5_000, "a resume checkpoint every this many samples (0: on "
                                     "SIGTERM only)", *at_least(0)),
    "keep_checkpoints": Setting(2, "resume checkpoints kept (the older if the newest is bad)",
                                *at_least(1)),
    "max_bad_fraction": Setting(0.05, "stop once this share of the samples read is bad",
                                *between(0, 1)),
    "max_nonfinite_in_row": Setting(5, "stop after this many non-finite losses in a row",
                                    *at_least(1)),
    "max_image_pixels": Setting(4096 * 4096, "a larger decoded image is skipped as corrupt"),
}


def check_config(cfg: SimpleNamespace) -> None:
    """Refuse, before any compute, a setting that cannot work (checks.py)."""
    checks.check_config(cfg, SETTINGS, strategies.SETTINGS, schedules.SETTINGS)


def parse_config(argv: list[str]) -> SimpleNamespace:
    """SETTINGS and the strategies' and schedules' settings with --key=value overrides. data_root
    is made absolute, so that a run's checkpoints find their data from any folder."""
    cfg = parse_settings(argv, SETTINGS, strategies.SETTINGS, schedules.SETTINGS)
    cfg.data_root = os.path.abspath(cfg.data_root)
    return cfg


# ----------------------------------------------------------------------------- one time step
def start_model(strategy: strategies.Strategy, step: strategies.TimeStep) -> CLIP:
    """The start model: the continue point, if the strategy warm-starts and there is one; else the
    initial model, or a random init."""
    torch.manual_seed(step.config.seed + step.t)
    model = CLIP(step.model_config)
    if strategy.warm_start and step.continue_point is not None:
        model.load_state_dict(step.continue_point["model"])  # its optimizer: optimizer_of
    elif step.initial is not None:  # restart and oracle start again from the initial model
        model.load_state_dict(step.initial)
    model.to(step.device)
    model.set_grad_checkpointing(step.config.grad_checkpointing)
    return model


def optimizer_of(model: CLIP, step: strategies.TimeStep) -> tuple[torch.optim.AdamW, int | None]:
    """AdamW for model: a new one, or the continue point's where the schedule carries it; and the
    iterations that one did in earlier steps (None: new)."""
    cfg, carried = step.config, step.continue_point
    optimizer = model.configure_optimizer(cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)
    if carried is None or carried["optimizer"] is None:
        return optimizer, None
    optimizer.load_state_dict(cpu_copy(carried["optimizer"]))  # a copy: it is updated in place
    return optimizer, carried["iterations"]


def train_step(model: CLIP, parts: list[data.Part], budget: int, hooks: dict,
               step: strategies.TimeStep, run_dir: str, log) -> survive.StepProgress | None:
    """Train model on parts for budget samples at the rates of the step's schedule, from the
    newest resume checkpoint if an earlier run left one, with the strategy's hooks (batch_loss,
    before_update, or None) on every batch. Returns the step's progress (with what the schedule
    carries to the next step), or None if SIGTERM stopped the step (saved)."""
    cfg, world, n_iters = step.config, step.world, budget // step.config.batch_size
    optimizer, before = optimizer_of(model, step)
    schedule = schedules.step_schedule(cfg, step.t, len(step.step_names), n_iters, before)
    progress = survive.StepProgress.resume(run_dir, step, model, optimizer, n_iters, log)
    train_model = torch.compile(model) if cfg.compile else model
    if world.distributed:
        train_model = DDP(train_model,
                          device_ids=[world.device] if world.device.type == "cuda" else None)
    stream = data.TrainStream(parts, budget, cfg.batch_size, world.rank, world.size, cfg.seed,
                              step.t, model.cfg.image_px, step.tokenizer, model.cfg.context_tokens,
                              keep_seed=cfg.seed, start_batch=progress.iteration,
                              max_bad_fraction=cfg.max_bad_fraction,
                              max_image_pixels=cfg.max_image_pixels)
    run_loss, batch_loss, before_update = LOSSES[cfg.loss].fn, *hooks.values()

    def loss_of(batch: dict, out: dict) -> torch.Tensor:  # the run's loss and the strategy's term
        loss = run_loss(**out, rank=world.rank, world_size=world.size)
        return loss if batch_loss is None else loss + batch_loss(batch, out)
    with workers_stopped():  # however the loop ends, no loader worker outlives it
        loader = data.train_loader(stream, cfg.workers)
        for it, (images, tokens, faults) in enumerate(loader, progress.iteration):
            step.iteration = it  # the strategy's clock: its own batches (TimeStep.draw) follow it
            progress.count_faults(faults, images is None, stream.min_read)
            progress.keep_trunk(it, schedule, model, optimizer)  # where the cooled branch leaves
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr(it)
            batch = data.on_device(images, tokens, world.device)  # {"images", "tokens"}
            optimizer.zero_grad(set_to_none=True)
            loss = forward_backward(train_model, batch["images"], batch["tokens"],
                                    lambda out: loss_of(batch, out), cfg.accum_steps,
                                    cfg.precision)
            if before_update is not None:  # e.g. A-GEM's projection of the gradients
                before_update(model)
            progress.optimizer_step(model, optimizer)  # skipped, and counted, if not finite
            model.clamp_logit_scale_()
            if progress.after_update(it, loss, schedule.lr(it), model, optimizer):  # log, save
                return None  # SIGTERM: saved; a rerun goes on from here
    return progress.finish(schedule, optimizer)


def time_step(strategy: strategies.Strategy, step: strategies.TimeStep, run_dir: str,
              log) -> tuple[CLIP, dict, dict] | None:
    """One time step as the paper runs it: the strategy's start model, data and budget; training;
    the end-of-step action; the checkpoint RUN/stepNN.pt. Returns the model, its deployed weights
    (on the CPU) and the step's record, or None if SIGTERM stopped the step (saved)."""
    cfg, t = step.config, step.t
    # 1. ask the strategy: the start model, its hooks, the data, the budget
    model = start_model(strategy, step)
    hooked = step.previous is not None  # the hooks relate the model to the previous one
    start_report = survive.start_of_step(
        lambda: strategies.act(strategy, "start_of_step", model, step), step, run_dir) \
        if hooked and strategy.start_of_step else {}
    hooks = {hook: strategies.make_hook(strategy, hook, model, step)
             if hooked and getattr(strategy, hook) else None
             for hook in ("batch_loss", "before_update")}
    parts = strategies.step_parts(strategy, step)
    budget = cfg.budget_samples * strategy.budget_units(t)
    report.announce_step(step, parts, budget, log)
    # 2. train
    progress = train_step(model, parts, budget, hooks, step, run_dir, log)
    if progress is None:
        return None
    # 3. the end-of-step action (patching's interpolation, ema's merge): the deployed model
    trained = cpu_copy(model.state_dict())
    acts = hooked and strategy.end_of_step is not None
    end_report = strategies.act(strategy, "end_of_step", model, step) if acts else {}
    deployed = cpu_copy(model.state_dict()) if acts else trained
    if acts and all(torch.equal(trained[k], deployed[k]) for k in trained):
        deployed = trained  # an action that left the weights as trained (patching's a = 1)
    # 4. the checkpoint, with the step's compute: training costs 3 forward passes a pair
    seen, summary = budget // cfg.batch_size * cfg.batch_size, progress.summary()
    per_sample = 3 * model.flops_per_pair() + sum(h.flops_per_sample for h in hooks.values() if h)
    flops = seen * per_sample + start_report.get("flops", 0) + end_report.get("flops", 0)
    record = {"steps": [[p.name for p in ps] for ps in step.step_data], "time_step": t + 1,
              "step_name": step.step_names[t], "samples_seen": seen, "flops": flops,
              "samples_read": summary["faults"].get("samples", 0)
              + sum(r.get("samples_read", 0) for r in (start_report, end_report)),
              "strategy": cfg.strategy, "start_of_step": start_report, "end_of_step": end_report,
              **summary,
              "continue_point": strategies.continue_point(strategy, trained, deployed,
                                                          progress.carried, cfg),
              "state": cpu_copy(step.state)}
    survive.save_step(step_checkpoint(run_dir, t), model, deployed, step, record)
    return model, deployed, record


def score(model: CLIP, row: dict | None, tasks: dict, tokenizer: Tokenizer,
          cfg: SimpleNamespace, world: World) -> dict:
    """A row of the evaluation matrix: row (measured earlier) completed with the tasks it lacks or
    could not score then, all of them for a new row. Rank 0 evaluates; the other ranks return row
    as it is."""
    row = dict(row or {})
    todo = {name: task for name, task in tasks.items() if not evaluate.scored(row.get(name))}
    if world.master and todo:
        row.update(evaluate.evaluate_step(model, todo, tokenizer, world.device, cfg.eval_batch,
                                          cfg.precision, max_bad_fraction=cfg.max_bad_fraction,
                                          max_image_pixels=cfg.max_image_pixels))
    return row


# ----------------------------------------------------------------------------- the continual loop
def main(argv):
    cfg = parse_config(argv)
    strategy = strategies.get_strategy(cfg.strategy)
    check_config(cfg)
    world = start_world(cfg)  # one process, or torchrun's; SIGTERM saves and stops
    run_dir = survive.open_run_folder(cfg, world)  # made, locked, cleared of what kills left
    step_years, step_data, tasks = benchmark.load_benchmark(cfg, world)
    names = [shards.step_name(ys) for ys in step_years]
    strategies.check_strategy(strategy, names, step_data, cfg)
    survive.check_run_definition(run_dir, cfg, step_years, step_data,
                                 {**SETTINGS, **strategies.SETTINGS, **schedules.SETTINGS}, world)
    tokenizer = benchmark.load_tokenizer(run_dir, cfg, step_years[0], world)
    initial = load_initial(cfg, tokenizer, world)  # the initial model (--init), or None
    loss = LOSSES[cfg.loss]  # the model learns the scalars it reads
    model_cfg = initial.cfg if initial else make_config(
        cfg.model, vocab_size=tokenizer.vocab_size, eot_token_id=tokenizer.eot_id,
        init_logit_scale=loss.init_logit_scale, init_logit_bias=loss.init_logit_bias)
    log = report.run_log(run_dir, world)
    report.announce_run(run_dir, cfg, model_cfg, names, world, log)
    matrix_path = os.path.join(run_dir, "eval_matrix.json")
    rows, initial_row = report.read_results(matrix_path, names)  # what an earlier run measured
    if initial:  # measured first: a row of its own, outside ID and the transfers
        initial_row = score(initial.to(world.device), initial_row, tasks, tokenizer, cfg, world)
        initial = cpu_copy(initial.state_dict())
    previous = anchor = initial  # lwf's teacher, patching's partner; the run's first model
    continue_point = strategies.continue_point(strategy, initial, initial, None, cfg) \
        if initial else None
    state = {}  # what the strategy's hooks keep across steps
    for t, name in enumerate(names):
        step = strategies.TimeStep(t, names, step_data, cfg, tokenizer, world, model_cfg, initial,
                                   previous, anchor, continue_point, state)
        path = step_checkpoint(run_dir, t)
        done = os.path.exists(path)  # in an earlier run of this command
        if done:
            model, deployed, record = survive.load_step(path, step, model_cfg)
        elif world.stop_requested():
            if world.master:
                print(f"SIGTERM: stopped before step {t + 1}; rerun the same command to continue")
            break
        else:
            ended = time_step(strategy, step, run_dir, log)
            if ended is None:  # stopped by SIGTERM, saved: a rerun continues from there
                world.barrier()
                return world.finish()
            model, deployed, record = ended
        previous, continue_point, state = deployed, record["continue_point"], record["state"]
        anchor = deployed if anchor is None else anchor
        # 5. evaluate on every step's task (a step done earlier: on the tasks a grown run added)
        rows[name] = score(model, rows.get(name) if done else None, tasks, tokenizer, cfg, world)
        if world.master:
            report.write_matrix(matrix_path, evaluate.eval_matrix(rows, names, initial_row))
            if not done:
                report.report_step(step, record, rows[name], log)
        world.barrier()
    if world.master and rows:  # none yet if SIGTERM came before the first step ended
        report.report_run(run_dir, evaluate.eval_matrix(rows, names, initial_row))
    world.finish()


def run(argv: list[str]) -> None:
    """The command line: main, ended by an error in one line on stderr and a non-zero exit, said
    once of all the processes (world.py); torchrun adds a report of its own."""
    try:
        main(argv)
    except SystemExit as e:  # the one-line refusals of bad input
        raise refusal(e) from None
    except Exception as e:
        raise failure(e, "train.py", argv, survive.run_folder(parse_config(argv))) from None


if __name__ == "__main__":
    run(sys.argv[1:])
