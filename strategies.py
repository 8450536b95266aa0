"""
The continual-learning strategies of TiC-CLIP: the paper's eight and two that merge models across time, as one
table, and everything that makes each one different. At every time step t, train.py asks the strategy five
questions and nothing else (it never tests a strategy's name):

  1. which model does step t start from?   warm_start: the one step t-1 left (continue_point), or a random init;
  2. which data does step t train on?      replay(t): {step s <= t: fraction of s's data kept in the buffer};
  3. how many samples may it see?          budget_steps(t) x C, C = budget_samples per step;
  4. is anything added to the loss?        batch_loss(model, step): a term on every batch (LwF's distillation);
  5. is anything done after training?     end_of_step(model, step): an action on the trained model that makes
                                           the model deployed (patching's interpolation, ema's merge).
Questions 4 and 5 relate the model to the one before it, so they are asked from the second step on (from the
first, when the run begins from an existing model, --init: it is the one before). Both report the compute they
add (flops_per_sample, "flops"), so the FLOPs ledger counts it. Two settings cut across every strategy: the
learning-rate schedule through time (train.py's lr_schedule, schedules.py), and the share of each step's samples
drawn from its new data (new_data_fraction, step_parts; by default in proportion to sizes).

    python train.py --strategy=sequential        # any name of STRATEGIES

To add a strategy: write what differs (a replay rule, a batch loss, an end-of-step action) and add a row to
STRATEGIES below; a setting it reads goes into SETTINGS beside its code (and a check into check_settings), and
becomes a --key=value setting of train.py like any other, read as step.config.KEY. Or, without touching this
file, register it from a script of your own that then runs train.py's main, e.g. training on the last two
steps only (tests/test_strategies.py does this; tools/compare.py runs train.py afresh, so it needs the row here):
    import sys, strategies, train
    last_two = lambda t: {s: 1.0 for s in range(max(0, t - 1), t + 1)}
    strategies.STRATEGIES["recent"] = strategies.Strategy("recent", True, last_two)
    train.main(sys.argv[1:])                      # python my_strategy.py --strategy=recent

Replay buffers are never materialised: a sample of step s is in the buffer at step t iff
keep_sample(key, fraction, seed) holds, a hash of its key compared with the fraction (data.py). So the
selection needs no index file at any scale, is identical on every rank, and buffers stay nested as they
shrink: a sample dropped once never comes back, because its hash stays above every smaller fraction.
"""
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

import evaluate
from data import Part, Tokenizer
from model import CLIP

SETTINGS = {}  # --key=value settings of train.py that strategies read (as step.config.KEY); declared with their code


# ----------------------------------------------------------------------------- which data, per step
# t counts time steps from 0; each function returns {step index: fraction of that step's data kept}.
def new_only(t: int) -> dict[int, float]:
    return {t: 1.0}


def everything(t: int) -> dict[int, float]:
    return {s: 1.0 for s in range(t + 1)}


def exp_buffer(t: int) -> dict[int, float]:
    # all of t-1, half of t-2, a quarter of t-3, ...: at most 2D of old data for D = one step's data
    return {**{s: 0.5 ** (t - 1 - s) for s in range(t)}, t: 1.0}


def equal_buffer(t: int) -> dict[int, float]:
    # 2D of old data split equally over the t past steps, at most all (D) of any one
    return {**{s: min(1.0, 2.0 / t) for s in range(t)}, t: 1.0}


# ----------------------------------------------------------------------------- the interface
@dataclass
class TimeStep:
    """What train.py tells a strategy about the time step it acts on."""
    t: int                         # this step's index, from 0
    step_names: list[str]          # every step's name, e.g. ["2018", "2019", "2020"]
    step_data: list[list[Part]]    # every step's training data, one Part per year, all of it (keep_fraction 1)
    previous: dict | None          # state dict of the model the step before deployed (None at the first step)
    config: SimpleNamespace        # the run's settings: train.py's config and SETTINGS
    tokenizer: Tokenizer
    device: torch.device
    master: bool                   # rank 0, or the only process: the one that evaluates and writes
    distributed: bool              # under torchrun: every rank must end the step with the same weights
    initial: dict | None = None    # state dict of the model the run began with (--init), or None: random init
    trunk: dict | None = None      # what a warm start continues from (continue_point): {"model": state dict,
                                   # "optimizer": its state where the schedule carries it, else None, "iterations"}


@dataclass(frozen=True)
class Strategy:
    name: str
    warm_start: bool                                  # start from the model after step t-1 (else random init)
    replay: Callable[[int], dict[int, float]]         # t -> {step: fraction of its data trained on}
    budget_steps: Callable[[int], int] = lambda t: 1  # the step's budget in units of C
    batch_loss: Callable | None = None   # (model, step) -> loss_fn(images, tokens, image_f, text_f, scale), with
                                         # loss_fn.flops_per_sample: a term added to every batch's loss
    end_of_step: Callable | None = None  # (model, step) -> {what it did, "flops": compute}: may change model
    continue_from_deployed: bool = True  # after an end-of-step action: the next step starts from the model it
                                         # made (patching), or from the model as trained (False: ema)

    def first_step(self, from_initial: bool = False) -> tuple:
        """What the first step is made of. Every strategy starts it from the same model (random init, or the
        initial model of --init), so data and budget decide it, and, from an initial model, the batch loss and the
        end-of-step action, which then have a model before them: strategies whose first steps are equal train
        the same step-1 model (tools/compare.py trains it once for all of them)."""
        hooks = (self.batch_loss, self.end_of_step, self.continue_from_deployed) if from_initial else ()
        return tuple(sorted(self.replay(0).items())), self.budget_steps(0), *hooks


# ----------------------------------------------------------------------------- lwf
SETTINGS["lwf_weight"] = 1.0  # weight of lwf's distillation term


def distillation_loss(student_img, student_txt, student_scale, teacher_img, teacher_txt, teacher_scale):
    """LwF's extra term: KL(teacher || student) between the image->text and the text->image similarity
    distributions of the batch, averaged over both directions. Zero when student equals teacher."""
    s_logits = student_scale * student_img @ student_txt.t()
    t_logits = teacher_scale * teacher_img @ teacher_txt.t()
    kl_i2t = F.kl_div(F.log_softmax(s_logits, 1), F.log_softmax(t_logits, 1), log_target=True, reduction="batchmean")
    kl_t2i = F.kl_div(F.log_softmax(s_logits.t(), 1), F.log_softmax(t_logits.t(), 1), log_target=True,
                      reduction="batchmean")
    return (kl_i2t + kl_t2i) / 2


class Distillation:
    """LwF's batch loss: lwf_weight x distillation_loss to the frozen model of the step before, whose forward
    pass on every batch is the compute it adds."""

    def __init__(self, model: CLIP, step: TimeStep):
        self.teacher = CLIP(model.cfg)  # its random init is overwritten, but drawn after the student's, as always
        self.teacher.load_state_dict(step.previous)
        self.teacher.to(step.device).eval().requires_grad_(False)
        self.weight = step.config.lwf_weight
        self.flops_per_sample = self.teacher.flops_per_pair()
        self.images, self.teacher_out = None, None

    def __call__(self, images, tokens, image_features, text_features, scale):
        if images is not self.images:  # once a batch, also when gradient accumulation asks once a micro-batch
            with torch.no_grad():
                self.images, self.teacher_out = images, self.teacher(images, tokens)
        return self.weight * distillation_loss(image_features, text_features, scale, *self.teacher_out)


# ----------------------------------------------------------------------------- patching
SETTINGS["patch_alphas"] = "0,0.25,0.5,0.75,1"  # coefficients tried, theta = (1-a) theta_prev + a theta_finetuned
SETTINGS["validation_samples"] = 1000           # validation pairs per past step used to choose the coefficient


@torch.no_grad()
def interpolate(previous: dict, finetuned: dict, alpha: float) -> dict:
    """Patching: theta = (1 - alpha) theta_previous + alpha theta_finetuned, parameter by parameter."""
    return {k: torch.lerp(previous[k].float(), finetuned[k].float(), alpha).to(finetuned[k].dtype)
            if finetuned[k].is_floating_point() else finetuned[k] for k in finetuned}


@torch.no_grad()
def patch(model: CLIP, step: TimeStep) -> dict:
    """Patching's end of step: set model to (1-a) previous + a model for the a of patch_alphas with the best mean
    R@1 on the validation pairs of the steps seen so far (data.is_validation: training pairs no strategy trains
    on). Rank 0 chooses and broadcasts a, so every rank holds the same weights. The search costs one forward
    pass per validation pair and coefficient."""
    finetuned = {k: v.detach().clone() for k, v in model.state_dict().items()}
    previous = {k: v.to(step.device) for k, v in step.previous.items()}
    alphas = [float(a) for a in step.config.patch_alphas.split(",")]
    scores = torch.zeros(len(alphas), device=step.device)
    pairs = 0  # validation pairs embedded, over all coefficients
    if step.master:
        tasks = {step.step_names[s]: evaluate.Task([shard for part in step.step_data[s] for shard in part.shards])
                 for s in range(step.t + 1)}  # the steps trained on so far
        for i, a in enumerate(alphas):
            model.load_state_dict(interpolate(previous, finetuned, a))
            row = evaluate.evaluate_step(model, tasks, step.tokenizer, step.device, step.config.eval_batch,
                                         step.config.precision, validation_only=True,
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
    model.load_state_dict(interpolate(previous, finetuned, best))
    return {"patch_alpha": best, "flops": pairs * model.flops_per_pair()}


# ----------------------------------------------------------------------------- merging across time
SETTINGS["ema_weight"] = 0.5  # w of the ema strategies: merge_t = w merge_(t-1) + (1 - w) model_t


@torch.no_grad()
def merge(model: CLIP, step: TimeStep) -> dict:
    """The ema strategies' end of step: set model to the merge, w x the merge the step before deployed (step.previous)
    + (1 - w) x the model as trained, parameter by parameter, the same on every rank. ema goes on training from the
    unmerged model, so the merge is an average over its trajectory, kept beside it; ema-from-merge goes on from
    the merge. The cost is a multiply-add per parameter, counted though negligible."""
    trained = model.state_dict()
    previous = {k: v.to(step.device) for k, v in step.previous.items()}
    model.load_state_dict(interpolate(previous, trained, 1 - step.config.ema_weight))
    return {"ema_weight": step.config.ema_weight, "flops": 2 * sum(p.numel() for p in model.parameters())}


# ----------------------------------------------------------------------------- what the next step continues from
def continue_point(strategy: Strategy, record: dict, deployed: dict) -> dict:
    """What a warm start after this step continues from: {"model", "optimizer", "iterations"}. A schedule that
    carries its optimizer (schedules.CARRIES_OPTIMIZER) wrote it as record["trunk"] (train.py's next_trunk); else
    the weights alone: the deployed model, or, if the strategy's end-of-step action changed it and the strategy
    goes on from the model as trained (ema), that one (record["trained"])."""
    if record.get("trunk"):
        return record["trunk"]
    trained = record.get("trained")
    weights = deployed if trained is None or strategy.continue_from_deployed else trained
    return {"model": weights, "optimizer": None, "iterations": None}


def check_settings(config: SimpleNamespace) -> None:
    """Strategy settings that parse but cannot work, refused before any compute is spent."""
    try:
        alphas = [float(a) for a in config.patch_alphas.split(",")]
    except ValueError:
        alphas = [math.nan]
    if not all(math.isfinite(a) for a in alphas):
        raise SystemExit(f"error: --patch_alphas={config.patch_alphas} is not a list of numbers; e.g. 0,0.5,1")
    if config.validation_samples < 1:  # patching's search scores on them: with none there is nothing to choose by
        raise SystemExit(f"error: --validation_samples={config.validation_samples} is too small; use at least 1")
    if not 0 <= config.lwf_weight < math.inf:
        raise SystemExit(f"error: --lwf_weight={config.lwf_weight} is out of range; use 0 or more")
    if not 0 <= config.ema_weight <= 1:
        raise SystemExit(f"error: --ema_weight={config.ema_weight} is out of range; use a weight from 0 to 1")
    if not 0 <= config.new_data_fraction <= 1:
        raise SystemExit(f"error: --new_data_fraction={config.new_data_fraction} is out of range; use 0 (in "
                         f"proportion to sizes) or a share above 0, at most 1")


# ----------------------------------------------------------------------------- the table
STRATEGIES = {s.name: s for s in [
    #        name                warm   data           budget, extra loss, end of step
    Strategy("sequential",       True,  new_only),
    Strategy("cumulative-all",   True,  everything),
    Strategy("cumulative-exp",   True,  exp_buffer),
    Strategy("cumulative-equal", True,  equal_buffer),
    Strategy("restart",          False, everything),
    Strategy("oracle",           False, everything, budget_steps=lambda t: t + 1),
    Strategy("lwf",              True,  new_only, batch_loss=Distillation),
    Strategy("patching",         True,  new_only, end_of_step=patch),
    Strategy("ema",              True,  new_only, end_of_step=merge, continue_from_deployed=False),
    Strategy("ema-from-merge",   True,  new_only, end_of_step=merge),
]}


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise SystemExit(f"error: unknown strategy '{name}'; choose one of: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


SETTINGS["new_data_fraction"] = 0.0  # share of each step's samples from its new data (0: in proportion to sizes)


def step_parts(strategy: Strategy, t: int, step_data: list[list[Part]], new_data_fraction: float = 0.0) -> list[Part]:
    """The parts (one per year) that step t trains on, each with its replay-buffer fraction. step_data[s] holds the
    Parts (keep_fraction 1) of time step s. Shards are drawn in proportion to the parts' (buffered) sizes, unless
    new_data_fraction > 0 fixes the share of samples from step t's own data (TiC-LM's fixed-ratio replay): the
    parts of step t then share it in proportion to their sizes, the replayed parts the rest in proportion to
    theirs (Part.share)."""
    parts = [(s, Part(p.name, p.shards, keep_fraction=fraction))
             for s, fraction in sorted(strategy.replay(t).items()) for p in step_data[s]]
    new, old = [p for s, p in parts if s == t], [p for s, p in parts if s != t]
    totals = [sum(p.n_samples for p in group) for group in (new, old)]
    if new_data_fraction and all(totals):  # with nothing to replay (or nothing new), what there is is all of it
        for group, total, share in [(new, totals[0], new_data_fraction), (old, totals[1], 1 - new_data_fraction)]:
            for p in group:
                p.share = share * p.n_samples / total
    return [p for _, p in parts]
