"""
The continual-learning strategies of TiC-CLIP, as one table.

At every time step t a strategy answers three questions (PROTOCOL.md, "Strategies"):
  1. which model does step t start from?   warm_start: the model after step t-1, or a fresh random init;
  2. which data does step t train on?      replay(t): {past step s: fraction of s's data kept in the buffer};
  3. how many samples may it see?          budget_steps(t) x C, C = budget_samples per step.

    python train.py --strategy=sequential        # any name of STRATEGIES

Replay buffers are never materialised: a sample of step s is in the buffer at step t iff
keep_sample(key, fraction, seed) holds, a hash of its key compared with the fraction (data.py). So the
selection needs no index file at any scale, is identical on every rank, and buffers stay nested as they
shrink: a sample dropped once never comes back, because its hash stays above every smaller fraction.
"""
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from data import Part


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


@dataclass(frozen=True)
class Strategy:
    name: str
    warm_start: bool                              # start from the previous step's model (else random init)
    replay: Callable[[int], dict[int, float]]     # step -> {step: fraction of its data kept}
    budget_steps: Callable[[int], int] = lambda t: 1  # the step's budget in units of C
    distill: bool = False                         # lwf: KL to the frozen previous model on every batch
    patch: bool = False                           # patching: interpolate with the previous model after the step


STRATEGIES = {s.name: s for s in [
    #        name                warm   data           budget
    Strategy("sequential",       True,  new_only),
    Strategy("cumulative-all",   True,  everything),
    Strategy("cumulative-exp",   True,  exp_buffer),
    Strategy("cumulative-equal", True,  equal_buffer),
    Strategy("restart",          False, everything),
    Strategy("oracle",           False, everything, budget_steps=lambda t: t + 1),
    Strategy("lwf",              True,  new_only, distill=True),
    Strategy("patching",         True,  new_only, patch=True),
]}


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise SystemExit(f"error: unknown strategy '{name}'; choose one of: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def step_parts(strategy: Strategy, t: int, step_data: list[list[Part]]) -> list[Part]:
    """The parts (one per year) that step t trains on, each with its replay-buffer fraction.
    step_data[s] holds the Parts (keep_fraction 1) of time step s."""
    return [Part(p.name, p.shards, keep_fraction=fraction)
            for s, fraction in sorted(strategy.replay(t).items()) for p in step_data[s]]


# ----------------------------------------------------------------------------- lwf and patching
def distillation_loss(student_img, student_txt, student_scale, teacher_img, teacher_txt, teacher_scale):
    """LwF's extra term: KL(teacher || student) between the image->text and the text->image similarity
    distributions of the batch, averaged over both directions. Zero when student equals teacher."""
    s_logits = student_scale * student_img @ student_txt.t()
    t_logits = teacher_scale * teacher_img @ teacher_txt.t()
    kl_i2t = F.kl_div(F.log_softmax(s_logits, 1), F.log_softmax(t_logits, 1), log_target=True, reduction="batchmean")
    kl_t2i = F.kl_div(F.log_softmax(s_logits.t(), 1), F.log_softmax(t_logits.t(), 1), log_target=True,
                      reduction="batchmean")
    return (kl_i2t + kl_t2i) / 2


@torch.no_grad()
def interpolate(previous: dict, finetuned: dict, alpha: float) -> dict:
    """Patching: theta = (1 - alpha) theta_previous + alpha theta_finetuned, parameter by parameter."""
    return {k: torch.lerp(previous[k].float(), finetuned[k].float(), alpha).to(finetuned[k].dtype)
            if finetuned[k].is_floating_point() else finetuned[k] for k in finetuned}
