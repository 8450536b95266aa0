"""
The continual-learning strategies of TiC-CLIP, the paper's eight and two that merge models across
time, as one table (STRATEGIES). At every time step t, train.py asks the run's strategy these
questions, and never tests its name:

  warm_start       which model does step t start from? the continue point, else a fresh one
  replay(t)        which data? {step s <= t: the fraction of step s's data in the replay buffer}
  budget_units(t)  how many samples? budget_units(t) x C, C = budget_samples
  start_of_step    anything before training? (model, step) -> report (e.g. a Fisher estimate);
                   it reads the start model and must leave it as it is
  batch_loss       anything added to the loss? (model, step) -> a term on every batch (LwF)
  end_of_step      anything after training? (model, step) -> report; it may change the model
                   into the one deployed (patching's interpolation, ema's merge)

The models of a step, called so here, in train.py and in the README:
  initial          the model the run began with (--init), or none: random init
  previous         the model step t-1 deployed (at the first step: the initial model, if any)
  start            the model step t trains from: the continue point, else initial or random
  trained          the model when step t's training ends
  deployed         what step t hands out (evaluated, saved): trained, after the end-of-step action
  continue point   what the next warm start goes on from: weights, and the optimizer where the
                   schedule carries it (schedules.py)

The three hooks relate the model to the previous one, so they run from the second step on (from
the first with --init). What they can rely on:
  - a batch loss is called once a batch, with the whole batch's features (this process's share
    under DDP), whatever accum_steps is: its gradient is one batch's, through the features and
    the weights alike;
  - compute is declared: a batch loss's flops_per_sample, a report's "flops" (paid once a step,
    by all processes together); train.py adds both to the FLOPs ledger, and a missing one is an
    error, not a zero;
  - state across steps: a report's "state" (a dict of tensors, numbers, strings and containers)
    becomes step.state, on the CPU; it is saved in stepNN.pt and handed back at the next step,
    also after a kill, a resume or a grown run (a resumed step reuses its start_of_step report,
    kept in RUN/resume). It must be the same on every process: a resumed step hands all of them
    rank 0's;
  - settings: SETTINGS[KEY] = Setting(default, help, check, use) is train.py's --KEY=VALUE, read
    as step.config.KEY and checked with the others before any compute.

To add a strategy, write what differs and add a row to STRATEGIES. From a file of your own, as
examples/ewc.py does, touching no file here (tools/compare.py --module=FILE compares it):
    import math, sys, strategies, train
    from settings import Setting
    strategies.SETTINGS["ewc_weight"] = Setting(1e3, "ewc: the penalty's weight, lambda",
                                                lambda w: 0 <= w < math.inf, "0 or more")
    strategies.STRATEGIES["ewc"] = strategies.Strategy("ewc", True, strategies.new_only,
                                                       start_of_step=fisher, batch_loss=Penalty)
    train.run(["--strategy=ewc", *sys.argv[1:]])    # python my_file.py --steps=2018,2019

Replay buffers are never materialised: a sample of step s is in the buffer at step t iff
data.keep_sample(key, fraction, seed) holds, a hash of its key compared with the fraction. So the
selection needs no index file at any scale, is the same on every rank, and buffers stay nested as
they shrink: a sample dropped once never comes back, as its hash stays above every smaller
fraction.
"""
import json
import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

import evaluate
import settings
from data import Part, Tokenizer
from model import CLIP
from settings import Setting

SETTINGS = {}  # train.py's settings that strategies read as step.config.KEY, beside their code


# ----------------------------------------------------------------------------- which data, per step
# t counts time steps from 0; each returns {step index: fraction of that step's data kept}.
def new_only(t: int) -> dict[int, float]:
    return {t: 1.0}


def everything(t: int) -> dict[int, float]:
    return {s: 1.0 for s in range(t + 1)}


def exp_buffer(t: int) -> dict[int, float]:
    # all of t-1, half of t-2, a quarter of t-3, ...: at most 2D of old data, D = one step's data
    return {**{s: 0.5 ** (t - 1 - s) for s in range(t)}, t: 1.0}


def equal_buffer(t: int) -> dict[int, float]:
    # 2D of old data split equally over the t past steps, at most all (D) of any one
    return {**{s: min(1.0, 2.0 / t) for s in range(t)}, t: 1.0}


# ----------------------------------------------------------------------------- the interface
@dataclass
class TimeStep:
    """What train.py tells a strategy about the time step it acts on."""
    t: int                       # this step's index, from 0
    step_names: list[str]        # every step's name, e.g. ["2018", "2019", "2020"]
    step_data: list[list[Part]]  # every step's training data, a Part per year, all of it
    config: SimpleNamespace      # the run's settings: train.py's and the SETTINGS
    tokenizer: Tokenizer
    device: torch.device
    master: bool                 # rank 0, or the only process: the one that evaluates and writes
    distributed: bool            # under torchrun: every rank must end with the same weights
    initial: dict | None = None   # the initial model's state dict; None: random init
    previous: dict | None = None  # the previous model's state dict; None: none yet
    continue_point: dict | None = None  # {"model", "optimizer" (or None), "iterations"}
    state: dict = field(default_factory=dict)  # what the hooks kept from earlier steps ("state")


@dataclass(frozen=True)
class Strategy:
    name: str
    warm_start: bool                           # start from the continue point, else initial/random
    replay: Callable[[int], dict[int, float]]  # t -> {step: fraction of its data trained on}
    budget_units: Callable[[int], int] = lambda t: 1  # the step's budget in units of C
    start_of_step: Callable | None = None  # (start model, step) -> report {"flops", "state"?, ...}
    batch_loss: Callable | None = None     # (model, step) -> loss_fn(images, tokens, image_f,
                                           # text_f, scale), with loss_fn.flops_per_sample
    end_of_step: Callable | None = None    # (trained model, step) -> report; may change the model
    continue_from_deployed: bool = True    # after an end-of-step action, go on from the model it
                                           # made (patching), or from the trained one (False: ema)

    def first_step(self, from_initial: bool = False) -> tuple:
        """What the first step is made of: strategies with equal ones train the same step-1 model
        (tools/compare.py trains it once for all). Every strategy starts it from the same model,
        so data and budget decide it, and the hooks too where --init gives a model before it."""
        hooks = (self.start_of_step, self.batch_loss, self.end_of_step,
                 self.continue_from_deployed) if from_initial else ()
        return tuple(sorted(self.replay(0).items())), self.budget_units(0), *hooks


def check_strategy(strategy: Strategy, n_steps: int) -> None:
    """Refuse, at start-up, a row whose data or budget at a step of the run the loop cannot use."""
    for t in range(n_steps):
        replay, units = strategy.replay(t), strategy.budget_units(t)
        if not isinstance(replay, dict) or t not in replay or not all(
                isinstance(s, int) and 0 <= s <= t and 0 < f <= 1 for s, f in replay.items()):
            raise SystemExit(f"error: strategy {strategy.name}: replay({t}) = {replay!r}; return "
                             f"{{step s <= {t}: fraction of its data, above 0, at most 1}}, "
                             f"step {t} (the new data) included")
        if not isinstance(units, int) or units < 1:
            raise SystemExit(f"error: strategy {strategy.name}: budget_units({t}) = {units!r}; "
                             f"return a whole number of budgets C, 1 or more")


def act(strategy: Strategy, hook: str, model: CLIP, step: TimeStep) -> dict:
    """Run the strategy's start_of_step or end_of_step on model. Its "state" becomes step.state;
    the rest of its report is returned, checked to declare its compute and to be loggable."""
    report = getattr(strategy, hook)(model, step)
    flops = report.get("flops") if isinstance(report, dict) else None
    if not isinstance(flops, (int, float)) or not 0 <= flops < math.inf:
        raise SystemExit(f"error: strategy {strategy.name}: {hook} returned {str(report)[:80]}; "
                         f"return a dict with 'flops', the compute it spent (0 if none), and any "
                         f"other numbers to report")
    if "state" in report:
        if not isinstance(report["state"], dict) or not plain(report["state"]):
            raise SystemExit(f"error: strategy {strategy.name}: {hook}'s 'state' is not a dict of "
                             f"tensors, numbers, strings and containers, so it could not be read "
                             f"back from stepNN.pt; convert what else it holds (a numpy array: "
                             f"torch.from_numpy)")
        step.state = report["state"]
    report = {k: v for k, v in report.items() if k != "state"}
    try:
        json.dumps(report)
    except TypeError:
        raise SystemExit(f"error: strategy {strategy.name}: {hook}'s report {str(report)[:80]} "
                         f"is logged as JSON; return numbers and strings there, and keep tensors "
                         f"in 'state'") from None
    return report


def plain(obj) -> bool:
    """Does obj hold only what torch.load(weights_only=True) reads back: tensors, numbers, strings,
    None, and dicts, lists and tuples of them?"""
    if isinstance(obj, dict):
        return all(plain(k) and plain(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(plain(v) for v in obj)
    return obj is None or isinstance(obj, torch.Tensor) or type(obj) in (int, float, bool, str)


def make_batch_loss(strategy: Strategy, model: CLIP, step: TimeStep):
    """The strategy's batch loss for this step, checked to declare its compute per sample."""
    loss_fn = strategy.batch_loss(model, step)
    flops = getattr(loss_fn, "flops_per_sample", None)
    if not isinstance(flops, (int, float)) or not 0 <= flops < math.inf:
        raise SystemExit(f"error: strategy {strategy.name}: its batch loss has no "
                         f"flops_per_sample; set it to the compute it adds per sample (0 if none), "
                         f"e.g. a teacher's forward pass")
    return loss_fn


# ----------------------------------------------------------------------------- lwf
SETTINGS["lwf_weight"] = Setting(1.0, "lwf: weight of the distillation term",
                                 lambda w: 0 <= w < math.inf, "0 or more")


def distillation_loss(student_img, student_txt, student_scale, teacher_img, teacher_txt,
                      teacher_scale):
    """LwF's term: KL(teacher || student) between the batch's image->text and text->image
    similarity distributions, averaged over both directions. Zero when student equals teacher."""
    s_logits = student_scale * student_img @ student_txt.t()
    t_logits = teacher_scale * teacher_img @ teacher_txt.t()
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

    def __call__(self, images, tokens, image_features, text_features, scale):
        with torch.no_grad():
            teacher_out = self.teacher(images, tokens)
        return self.weight * distillation_loss(image_features, text_features, scale, *teacher_out)


# ----------------------------------------------------------------------------- patching
def numbers(text: str) -> list[float]:
    """"0,0.5,1" -> [0.0, 0.5, 1.0]; [nan] where it is not a list of finite numbers."""
    try:
        values = [float(a) for a in text.split(",")]
    except ValueError:
        return [math.nan]
    return values if all(math.isfinite(a) for a in values) else [math.nan]


SETTINGS["patch_alphas"] = Setting("0,0.25,0.5,0.75,1",
                                   "patching: coefficients a tried, (1-a) previous + a trained",
                                   lambda text: all(0 <= a <= 1 for a in numbers(text)),
                                   "a list of numbers from 0 to 1, e.g. 0,0.5,1")
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
    with the best mean R@1 on the validation pairs of the steps so far (data.is_validation:
    training pairs no strategy trains on). Rank 0 chooses a and broadcasts it. The search costs a
    forward pass per validation pair and coefficient."""
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
            scores[i] = sum(r[evaluate.METRIC] for r in row.values()) / len(row)
            pairs += sum(r["gallery"] for r in row.values())
        print("patching: validation mean R@1 by coefficient: "
              + ", ".join(f"{a:g} {float(v):.2f}" for a, v in zip(alphas, scores)))
    if step.distributed:
        dist.broadcast(scores, 0)
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
def continue_point(strategy: Strategy, record: dict, deployed: dict) -> dict:
    """What a warm start after this step goes on from: {"model", "optimizer", "iterations"}. A
    schedule that carries its optimizer wrote it as record["continue_point"]
    (train.next_continue_point); else the weights alone: the deployed model, or the trained one
    (record["trained"]) for a strategy that goes on from it after its end-of-step action (ema)."""
    if record.get("continue_point"):
        return record["continue_point"]
    trained = record.get("trained")
    weights = deployed if trained is None or strategy.continue_from_deployed else trained
    return {"model": weights, "optimizer": None, "iterations": None}


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


def check_settings(config: SimpleNamespace) -> None:
    """The chosen strategy and every strategy setting, refused before any compute if they cannot
    work."""
    get_strategy(config.strategy)
    settings.check(SETTINGS, config)


SETTINGS["new_data_fraction"] = Setting(0.0, "share of each step's samples from its new data "
                                        "(0: in proportion to sizes)", lambda f: 0 <= f <= 1,
                                        "0 (in proportion to sizes) or a share above 0, at most 1")


def step_parts(strategy: Strategy, t: int, step_data: list[list[Part]],
               new_data_fraction: float = 0.0) -> list[Part]:
    """The parts (a Part per year) that step t trains on, each with its replay-buffer fraction;
    step_data[s] holds step s's Parts, all of their data. Shards are drawn in proportion to the
    parts' buffered sizes, unless new_data_fraction > 0 fixes the share of samples from step t's
    own data (TiC-LM's fixed-ratio replay; Part.share): step t's parts share it, the replayed parts
    the rest, each in proportion to its size."""
    parts = [(s, Part(p.name, p.shards, keep_fraction=fraction))
             for s, fraction in sorted(strategy.replay(t).items()) for p in step_data[s]]
    new, old = [p for s, p in parts if s == t], [p for s, p in parts if s != t]
    totals = [sum(p.n_samples for p in group) for group in (new, old)]
    if new_data_fraction and all(totals):  # with nothing to replay (or nothing new), all of it
        shares = [(new, totals[0], new_data_fraction), (old, totals[1], 1 - new_data_fraction)]
        for group, total, share in shares:
            for p in group:
                p.share = share * p.n_samples / total
    return [p for _, p in parts]
