"""
The continual-learning strategies of TiC-CLIP, the paper's eight and two that merge models across
time, as one table (STRATEGIES). At every time step t, train.py asks the run's strategy these
questions, and never tests its name:

  warm_start       which model does step t start from? the continue point, else a fresh one
  replay(step)     which data? {step s <= t: the fraction of step s's data in the replay buffer}
  budget_units(t)  how many samples? budget_units(t) x C, C = budget_samples
  start_of_step    anything before training? (model, step) -> report (e.g. a Fisher estimate);
                   it reads the start model and must leave it as it is
  batch_loss       anything added to the loss? (model, step) -> loss(batch, out), a term on every
                   batch (LwF); batch: {"images", "tokens"}, out: the model's named outputs
  before_update    anything done to the gradients? (model, step) -> update(model), called after
                   each backward pass, before the optimizer step (A-GEM's projection)
  end_of_step      anything after training? (model, step) -> report; it may change the model
                   into the one deployed (patching's interpolation, ema's merge)

The models of a step, called so here, in train.py and in the README:
  initial          the model the run began with (--init), or none: random init
  anchor           the run's first model: the initial one, else what step 1 deployed
  previous         the model step t-1 deployed (at the first step: the initial model, if any)
  start            the model step t trains from: the continue point, else initial or random
  trained          the model when step t's training ends
  deployed         what step t hands out (evaluated, saved): trained, after the end-of-step action
  continue point   what the next warm start goes on from: weights, and the optimizer where the
                   schedule carries it (schedules.py)

The hooks relate the model to the previous one, so they run from the second step on (from the
first with --init). What they can rely on (TimeStep has the rest: the models, the data, settings):
  - a batch loss is called once a batch, with the whole batch's outputs (this process's share
    under DDP), whatever accum_steps is: its gradient is one batch's, through the outputs and
    the weights alike;
  - the step's clock and its own data: step.iteration is the iteration under way, and
    step.draw(parts, name) gives batches of any data (a list of data.Part, e.g. earlier steps'
    step.step_data[s]) at that iteration: the same after a kill and a resume, split over the
    processes as training's, its bad samples and samples read counted with the step's;
    step.gradient(model, batch) is the run's loss's gradient on such a batch, in accum_steps
    micro-batches, averaged over the processes;
  - compute is declared: a batch loss's or an update's flops_per_sample, a report's "flops" (paid
    once a step, by all processes together; "samples_read" too, if it reads data); train.py adds
    them to the FLOPs ledger, and a missing one is an error, not a zero;
  - state across steps: a report's "state" (a dict of tensors, numbers, strings and containers)
    becomes step.state, on the CPU; it is saved in stepNN.pt and handed back at the next step,
    also after a kill, a resume or a grown run (a resumed step reuses its start_of_step report,
    kept in RUN/resume). It must be the same on every process: a resumed step hands all of them
    rank 0's;
  - every process must end a step with the same weights: a hook that changes gradients or
    weights from data of its own process alone must all-reduce them (step.gradient does); at
    every save the weights of all processes are compared, and a difference is a one-line error;
  - settings: SETTINGS[KEY] = Setting(default, help, check, use) is train.py's --KEY=VALUE, read
    as step.config.KEY and checked with the others before any compute.

Every extension point is a table row: a strategy (strategies.STRATEGIES, its settings in
strategies.SETTINGS), a schedule (schedules.SCHEDULES, schedules.SETTINGS), a loss (model.LOSSES),
a summary number of the evaluation matrix (evaluate.SUMMARIES). Nothing else is changed from
outside. To add a row, write what differs, from a file of your own as examples/ does
(docs/extending.md walks through them), touching no file here; tools/compare.py --module=FILE
compares it:
    import math, sys, strategies, train
    from settings import Setting, numbers
    strategies.SETTINGS["ewc_weight"] = Setting(1e3, "ewc: the penalty's weight, lambda",
                                                lambda w: 0 <= w < math.inf, "0 or more")
    strategies.STRATEGIES["ewc"] = strategies.Strategy("ewc", True, strategies.new_only,
                                                       start_of_step=fisher, batch_loss=Penalty)
    train.run(["--strategy=ewc", *sys.argv[1:]])    # python my_file.py --steps=2018,2019

Replay buffers are never materialised: a sample of step s is in the buffer at step t iff its hash
is below the fraction (data.keep_sample): no index file at any scale, the same on every rank, and
nested as buffers shrink. data.smallest_hashes gives the fraction that keeps exactly k samples.
"""
import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F

import checks
import evaluate
from data import Part, Tokenizer, TrainStream, on_device, smallest_hashes
from faults import check_bad
from model import CLIP, LOSSES, CLIPConfig, forward_backward
from settings import Setting, numbers

SETTINGS = {}  # train.py's settings that strategies read as step.config.KEY, beside their code


# ----------------------------------------------------------------------------- which data, per step
# each returns {step index s <= step.t: fraction of step s's data kept}
def new_only(step) -> dict[int, float]:
    return {step.t: 1.0}


def everything(step) -> dict[int, float]:
    return {s: 1.0 for s in range(step.t + 1)}


def exp_buffer(step) -> dict[int, float]:
    # all of t-1, half of t-2, a quarter of t-3, ...: at most 2D of old data, D = one step's data
    t = step.t
    return {**{s: 0.5 ** (t - 1 - s) for s in range(t)}, t: 1.0}


def equal_buffer(step) -> dict[int, float]:
    # 2D of old data split equally over the t past steps, at most all (D) of any one
    t = step.t
    return {**{s: min(1.0, 2.0 / t) for s in range(t)}, t: 1.0}


# ----------------------------------------------------------------------------- the interface
@dataclass
class TimeStep:
    """What train.py tells a strategy about the time step it acts on, and the calls it may make."""
    t: int                       # this step's index, from 0
    step_names: list[str]        # every step's name, e.g. ["2018", "2019", "2020"]
    step_data: list[list[Part]]  # every step's training data, a Part per year, all of it
    config: SimpleNamespace      # the run's settings: train.py's and the SETTINGS
    tokenizer: Tokenizer
    world: object                # world.World: rank, size, device, master, distributed
    model_config: CLIPConfig | None = None  # the run's model shape
    initial: dict | None = None   # the initial model's state dict; None: random init
    previous: dict | None = None  # the previous model's state dict; None: none yet
    anchor: dict | None = None    # the run's first model: initial, else step 1's deployed one
    continue_point: dict | None = None  # {"model", "optimizer" (or None), "iterations"}
    state: dict = field(default_factory=dict)  # what the hooks kept from earlier steps ("state")
    iteration: int = 0           # the training iteration under way, from 0
    faults: Counter = field(default_factory=Counter)  # this process's bad data and samples read

    @property
    def device(self) -> torch.device:
        return self.world.device

    @property
    def master(self) -> bool:  # rank 0, or the only process: the one that evaluates and writes
        return self.world.master

    @property
    def distributed(self) -> bool:  # under torchrun: every rank must end with the same weights
        return self.world.distributed

    def draw(self, parts: list[Part], name: str, batch_size: int | None = None) -> "Draw":
        """Batches of parts (any steps' data, e.g. step_data[s], with keep fractions as replay's)
        at the step's own position: Draw.batch() is the batch of step.iteration. name tells one
        draw's batches from another's; batch_size is global, as --batch_size (its default)."""
        return Draw(self, parts, name, batch_size or self.config.batch_size)

    def smallest_hashes(self, parts: list[Part], k: int) -> tuple[list[float], int]:
        """The k smallest sample hashes of the parts' samples that could be trained on, in order
        (data.smallest_hashes): as a keep fraction, hashes[j] keeps exactly j of them. And the
        samples read for it: every shard once; report them as "samples_read"."""
        hashes, faults = smallest_hashes(self.stream(parts, self.config.batch_size), k)
        return hashes, faults["samples"]

    def stream(self, parts: list[Part], batch_size: int, stream: int = 0) -> TrainStream:
        """A training stream of parts at the run's settings, this process's share (see Draw)."""
        cfg, shape, world = self.config, self.model_config, self.world
        return TrainStream(parts, 2 ** 62, batch_size, world.rank, world.size, cfg.seed, self.t,
                           shape.image_px, self.tokenizer, shape.context_tokens,
                           keep_seed=cfg.seed, max_bad_fraction=cfg.max_bad_fraction,
                           max_image_pixels=cfg.max_image_pixels, stream=stream)

    def gradient(self, model: CLIP, batch: dict) -> dict[str, torch.Tensor]:
        """The gradient of the run's loss on batch ({"images", "tokens"}, e.g. a draw's), by
        parameter name, taken in accum_steps micro-batches as training's and averaged over the
        processes (an all-reduce), so it is the same on every process; model's .grad is left as it
        was. Costs a forward and a backward pass: 3 forward passes a sample."""
        params = dict(model.named_parameters())
        kept = {k: p.grad for k, p in params.items()}
        for p in params.values():
            p.grad = None
        loss, world = LOSSES[self.config.loss], self.world
        forward_backward(model, batch["images"], batch["tokens"],
                         lambda out: loss.fn(**out, rank=world.rank, world_size=world.size),
                         self.config.accum_steps, self.config.precision)
        grads = {k: p.grad if p.grad is not None else torch.zeros_like(p)
                 for k, p in params.items()}
        for k, p in params.items():
            p.grad = kept[k]
        return world.mean_over_processes(grads)


class Draw:
    """A strategy's own batches (TimeStep.draw): batch() is the batch of the step's iteration, from
    a training stream of the parts seeded apart from training's. The stream is remade at that
    iteration when it is not the one after the last (a resumed step), so the batches are those of
    an uninterrupted run (data.TrainStream's exact resume)."""

    def __init__(self, step: TimeStep, parts: list[Part], name: str, batch_size: int):
        stream = 1 + int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "big")
        self.step, self.name, self.batches, self.next = step, name, None, None
        self.stream = step.stream(parts, batch_size, stream)

    def batch(self) -> dict[str, torch.Tensor]:
        """{"images", "tokens"} on the device, this process's share of the global batch."""
        i = self.step.iteration
        if self.next != i:
            self.stream.start_batch = i
            self.batches = self.stream.batches(0, 1)
        images, tokens, faults = next(self.batches)
        self.next = i + 1
        self.step.faults.update(faults)  # with the step's: reported, saved, checked
        check_bad(self.step.faults, images is None, self.stream.min_read,
                  self.step.config.max_bad_fraction, f"step {self.step.t + 1} ({self.name})")
        return on_device(images, tokens, self.step.device)


@dataclass(frozen=True)
class Strategy:
    name: str
    warm_start: bool                        # start from the continue point, else initial/random
    replay: Callable[[TimeStep], dict]      # step -> {s: fraction of step s's data trained on}
    budget_units: Callable[[int], int] = lambda t: 1  # the step's budget in units of C
    start_of_step: Callable | None = None  # (start model, step) -> report {"flops", "state"?, ...}
    batch_loss: Callable | None = None     # (model, step) -> loss(batch, out), .flops_per_sample
    before_update: Callable | None = None  # (model, step) -> update(model), .flops_per_sample
    end_of_step: Callable | None = None    # (trained model, step) -> report; may change the model
    continue_from_deployed: bool = True    # after an end-of-step action, go on from the model it
                                           # made (patching), or from the trained one (False: ema)


def act(strategy: Strategy, hook: str, model: CLIP, step: TimeStep) -> dict:
    """Run the strategy's start_of_step or end_of_step on model. Its "state" becomes step.state;
    the rest of its report is returned, checked to declare its compute and to be loggable."""
    report = checks.check_report(strategy.name, hook, getattr(strategy, hook)(model, step))
    step.state = report.pop("state", step.state)
    return report


def make_hook(strategy: Strategy, hook: str, model: CLIP, step: TimeStep):
    """The strategy's batch_loss or before_update for this step, checked to declare its compute
    per sample."""
    return checks.check_per_sample(strategy.name, hook, getattr(strategy, hook)(model, step))


# ----------------------------------------------------------------------------- lwf
SETTINGS["lwf_weight"] = Setting(1.0, "lwf: weight of the distillation term",
                                 lambda w: 0 <= w < math.inf, "0 or more")


def distillation_loss(student: dict, teacher: dict) -> torch.Tensor:
    """LwF's term: KL(teacher || student) between the batch's image->text and text->image
    similarity distributions (of CLIP.forward's outputs), averaged over both directions. Zero when
    student equals teacher."""
    s_logits = student["logit_scale"] * student["image_features"] @ student["text_features"].t()
    t_logits = teacher["logit_scale"] * teacher["image_features"] @ teacher["text_features"].t()
    kl_i2t = F.kl_div(F.log_softmax(s_logits, 1), F.log_softmax(t_logits, 1), log_target=True,
                      reduction="batchmean")
    kl_t2i = F.kl_div(F.log_softmax(s_logits.t(), 1), F.log_softmax(t_logits.t(), 1),
                      log_target=True, reduction="batchmean")
    return (kl_i2t + kl_t2i) / 2


class Distillation:
    """LwF's batch loss: lwf_weight x distillation_loss to the frozen previous model, whose
    forward pass on every batch is the compute it adds."""

    def __init__(self, model: CLIP, step: TimeStep):
        self.teacher = CLIP(model.cfg)  # its random init is overwritten, drawn after the student's
        self.teacher.load_state_dict(step.previous)
        self.teacher.to(step.device).eval().requires_grad_(False)
        self.weight = step.config.lwf_weight
        self.flops_per_sample = self.teacher.flops_per_pair()

    def __call__(self, batch: dict, out: dict) -> torch.Tensor:
        with torch.no_grad():
            teacher_out = self.teacher(batch["images"], batch["tokens"])
        return self.weight * distillation_loss(out, teacher_out)


# ----------------------------------------------------------------------------- patching
SETTINGS["patch_alphas"] = Setting("0,0.25,0.5,0.75,1",
                                   "patching: coefficients a tried, (1-a) previous + a trained",
                                   lambda text: all(0 <= a <= 1 for a in numbers(text)),
                                   "a list of numbers from 0 to 1, e.g. 0,0.5,1")
SETTINGS["patch_metric"] = Setting("mean_R@1", "patching: the validation metric a is chosen by",
                                   lambda m: m in evaluate.RETRIEVAL_METRICS,
                                   f"one of {', '.join(evaluate.RETRIEVAL_METRICS)}")
SETTINGS["validation_samples"] = Setting(1000, "patching: validation pairs per past step",
                                         lambda n: n >= 1, "at least 1")


@torch.no_grad()
def interpolate(previous: dict, trained: dict, alpha: float) -> dict:
    """(1 - alpha) previous + alpha trained, parameter by parameter."""
    return {k: torch.lerp(previous[k].float(), trained[k].float(), alpha).to(trained[k].dtype)
            if trained[k].is_floating_point() else trained[k] for k in trained}


@torch.no_grad()
def patch(model: CLIP, step: TimeStep) -> dict:
    """Patching's end of step: set model to (1-a) previous + a trained, for the a of patch_alphas
    with the best patch_metric (mean R@1) on the validation pairs of the steps so far
    (data.is_validation: training pairs no strategy trains on). Rank 0 chooses a and broadcasts
    it. The search costs a forward pass per validation pair and coefficient."""
    trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    previous = {k: v.to(step.device) for k, v in step.previous.items()}
    alphas = numbers(step.config.patch_alphas)
    scores = torch.zeros(len(alphas), device=step.device)
    pairs = 0  # validation pairs embedded, over all coefficients
    if step.master:
        tasks = {step.step_names[s]: evaluate.Task([shard for part in step.step_data[s]
                                                    for shard in part.shards])
                 for s in range(step.t + 1)}  # the steps trained on so far
        for i, a in enumerate(alphas):
            model.load_state_dict(interpolate(previous, trained, a))
            row = evaluate.evaluate_step(model, tasks, step.tokenizer, step.device,
                                         step.config.eval_batch, step.config.precision,
                                         validation_only=True,
                                         max_samples=step.config.validation_samples,
                                         max_bad_fraction=step.config.max_bad_fraction,
                                         max_image_pixels=step.config.max_image_pixels)
            scores[i] = sum(r[step.config.patch_metric] for r in row.values()) / len(row)
            pairs += sum(r["gallery"] for r in row.values())
        print(f"patching: validation {step.config.patch_metric.replace('_', ' ')} by coefficient: "
              + ", ".join(f"{a:g} {float(v):.2f}" for a, v in zip(alphas, scores)))
    step.world.broadcast(scores)  # rank 0's, to every process
    best = alphas[int(scores.argmax())]
    model.load_state_dict(interpolate(previous, trained, best))
    return {"patch_alpha": best, "flops": pairs * model.flops_per_pair()}


# ----------------------------------------------------------------------------- merging across time
SETTINGS["ema_weight"] = Setting(0.5, "ema: w of merge_t = w merge_(t-1) + (1 - w) trained_t",
                                 lambda w: 0 <= w <= 1, "a weight from 0 to 1")


@torch.no_grad()
def merge(model: CLIP, step: TimeStep) -> dict:
    """The ema strategies' end of step: set model to w previous + (1 - w) trained, where previous
    is the merge the step before deployed. ema goes on from the trained model, so its merge is an
    average over its own trajectory; ema-from-merge goes on from the merge. The cost, a multiply-add
    per parameter, is counted though negligible."""
    trained = model.state_dict()
    previous = {k: v.to(step.device) for k, v in step.previous.items()}
    model.load_state_dict(interpolate(previous, trained, 1 - step.config.ema_weight))
    return {"ema_weight": step.config.ema_weight,
            "flops": 2 * sum(p.numel() for p in model.parameters())}


# ----------------------------------------------------------------------------- the continue point
def continue_point(strategy: Strategy, trained: dict, deployed: dict, carried: dict | None,
                   config: SimpleNamespace) -> dict | None:
    """What the next step goes on from, the continue point: {"model", "optimizer", "iterations"}
    (optimizer and iterations None where the schedule starts a new optimizer each step). The one
    place this is decided:
      - none for a strategy that starts every step afresh (restart, oracle);
      - the model the end-of-step action made, for a strategy that goes on from it (patching,
        ema-from-merge: continue_from_deployed); else the trained model (ema);
      - where the schedule carries its optimizer (carried: {"optimizer", "iterations", "trunk"}),
        that optimizer with it; or the trunk where the cooled branch began, weights and optimizer
        (continue_from=trunk), when the next step goes on from the trained model."""
    if not strategy.warm_start:
        return None
    model = deployed if strategy.continue_from_deployed else trained
    if carried is None:
        return {"model": model, "optimizer": None, "iterations": None}
    if carried["trunk"] is not None and config.continue_from == "trunk" and model is trained:
        return carried["trunk"]
    return {"model": model, "optimizer": carried["optimizer"], "iterations": carried["iterations"]}


# ----------------------------------------------------------------------------- the table
STRATEGIES = {s.name: s for s in [
    #        name                warm   data          budget, hooks
    Strategy("sequential",       True,  new_only),
    Strategy("cumulative-all",   True,  everything),
    Strategy("cumulative-exp",   True,  exp_buffer),
    Strategy("cumulative-equal", True,  equal_buffer),
    Strategy("restart",          False, everything),
    Strategy("oracle",           False, everything, budget_units=lambda t: t + 1),
    Strategy("lwf",              True,  new_only, batch_loss=Distillation),
    Strategy("patching",         True,  new_only, end_of_step=patch),
    Strategy("ema",              True,  new_only, end_of_step=merge, continue_from_deployed=False),
    Strategy("ema-from-merge",   True,  new_only, end_of_step=merge),
]}


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise SystemExit(f"error: unknown strategy '{name}'; "
                         f"choose one of: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


SETTINGS["new_data_fraction"] = Setting(0.0, "share of each step's samples from its new data "
                                        "(0: in proportion to sizes)", lambda f: 0 <= f <= 1,
                                        "0 (in proportion to sizes) or a share above 0, at most 1")


def replay_of(strategy: Strategy, step: TimeStep) -> dict[int, float]:
    """The strategy's replay at step, checked to be what step_parts can use."""
    return checks.check_replay(strategy.name, step.t, strategy.replay(step))


def check_strategy(strategy: Strategy, step_names: list[str], step_data: list,
                   config: SimpleNamespace) -> None:
    """Refuse, at start-up, a row whose budget at a step of the run, or whose data at the first
    step, the loop cannot use (its data at a later step is checked then: replay_of)."""
    replay_of(strategy, TimeStep(0, step_names, step_data, config, None, None))
    checks.check_budget(strategy.name, [strategy.budget_units(t) for t in range(len(step_names))])


def step_parts(strategy: Strategy, step: TimeStep) -> list[Part]:
    """The parts (a Part per year) that the step trains on, each with its replay-buffer fraction;
    step.step_data[s] holds step s's Parts, all of their data. Shards are drawn in proportion to
    the parts' buffered sizes, unless new_data_fraction > 0 fixes the share of samples from step
    t's own data (TiC-LM's fixed-ratio replay; Part.share): step t's parts share it, the replayed
    parts the rest, each in proportion to its size."""
    t, new_data_fraction = step.t, step.config.new_data_fraction
    replay = replay_of(strategy, step)
    parts = [(s, Part(p.name, p.shards, keep_fraction=fraction))
             for s, fraction in sorted(replay.items()) for p in step.step_data[s]]
    new, old = [p for s, p in parts if s == t], [p for s, p in parts if s != t]
    totals = [sum(p.n_samples for p in group) for group in (new, old)]
    if new_data_fraction and all(totals):  # with nothing to replay (or nothing new), all of it
        shares = [(new, totals[0], new_data_fraction), (old, totals[1], 1 - new_data_fraction)]
        for group, total, share in shares:
            for p in group:
                p.share = share * p.n_samples / total
    return [p for _, p in parts]
