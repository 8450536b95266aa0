"""
Learning-rate schedules through time: the rate of every iteration of every time step, one row of
SCHEDULES per train.py lr_schedule, usable with every strategy. With peak = the step's peak rate,
W = its warmup iterations, i = the iteration within the step (from 0), n = the step's iterations,
t = the time step (from 0):

  cosine          the paper's: each step warms up again and decays by cosine to 0, with a new
                  optimizer.
                      lr(i) = peak (i + 1) / W                                   for i < W
                      lr(i) = peak 0.5 (1 + cos(pi (i - W) / (n - W)))           after
  cosine-ar       TiC-LM's "autoregressive" meta-schedule: as cosine, but step t's peak follows
                  one cosine over H = ar_horizon steps (0: the run's number of steps; set it when
                  a run will grow, so that its steps' peaks stay as they were), with a floor:
                      peak_t = max(lr 0.5 (1 + cos(pi min(t, H) / H)), lr_min_fraction lr)
  const-cooldown  the "infinite" schedule (Ibrahim et al. 2024, Hagele et al. 2024): one warmup,
                  then a constant rate; the last cooldown_fraction of each step's iterations (c of
                  them, from i0 = n - c, inside the budget) decay on a cooled branch:
                      lr(i) = peak (1 - sqrt((i - i0) / c))                       for i >= i0
  rsqrt           one warmup, then the inverse square root of the global iteration g (counted
                  across steps), T = rsqrt_timescale (0: budget_samples // batch_size), and the
                  same cooled branch, from the rate the trunk had at i0:
                      lr(g) = peak min(1, sqrt(T / (g + 1)))                     after the warmup

The trunk and the cooled branch. The last two carry one optimizer through the run
(carries_optimizer): its state goes from step to step. Each step's cooled branch is deployed
(evaluated, saved, handed to the end-of-step action), while the next step goes on from the trunk,
the weights and AdamW state at i0 (continue_from=trunk), or from the cooled branch
(continue_from=cooled). A step warms up (W > 0) only when its optimizer is new: at the first
step, or every step of a strategy that does not warm-start.

To add a schedule, write its rate after the warmup and add a row to SCHEDULES; a setting it reads
goes into SETTINGS with its check, and its name into the row's reads (a setting that no row reads
is not checked; one set under a row that does not read it is refused). From a file of your own,
as examples/wsd.py does:
    import sys, schedules, train
    linear = lambda p: 1 - p                  # the cooled branch's factor at progress p through it
    schedules.SCHEDULES["wsd"] = schedules.Schedule("wsd", schedules.constant,
                                                    carries_optimizer=True, cooldown=linear)
    train.run(["--lr_schedule=wsd", *sys.argv[1:]])
"""
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import settings
from settings import Setting

SETTINGS = {  # train.py's settings that schedules read (cfg.KEY), checked before any compute
    "lr_min_fraction": Setting(0.1, "cosine-ar: a step's peak is at least this share of lr",
                               lambda f: 0 <= f <= 1, "a fraction, 0 to 1"),
    "ar_horizon": Setting(0, "cosine-ar: steps its outer cosine spans (0: the run's steps)",
                          lambda h: h >= 0, "0 (the run's number of steps) or more",
                          resolve=lambda h, n_steps: h or n_steps),
    "cooldown_fraction": Setting(0.2, "cooled branch: its share of each step's iterations",
                                 lambda f: 0 <= f < 1, "a fraction, 0 or more, below 1"),
    "continue_from": Setting("trunk", "cooled branch: the next step goes on from the trunk "
                             "or from the cooled branch", lambda c: c in ("trunk", "cooled"),
                             "trunk (the weights before the cooldown) or cooled (the branch)"),
    "rsqrt_timescale": Setting(0, "rsqrt: iterations at the peak before 1/sqrt (0: one step's)",
                               lambda n: n >= 0, "0 (one step's iterations) or more"),
}


@dataclass(frozen=True)
class StepSchedule:
    """The learning rate of each iteration of one time step."""
    row: "Schedule"          # the schedule's row of SCHEDULES
    peak: float              # the step's peak rate
    warmup: int              # iterations of linear warmup (0 when the optimizer carries over)
    n_iters: int             # the step's iterations
    cooldown: int            # iterations of the cooled branch at the step's end (0: none)
    before: int              # iterations the carried optimizer did in earlier steps
    config: SimpleNamespace  # the run's settings, for a rate that reads its own

    @property
    def cooldown_start(self) -> int:
        """i0, the iteration where the branch leaves the trunk; n_iters when there is none."""
        return self.n_iters - self.cooldown

    def lr(self, i: int) -> float:
        i0 = self.cooldown_start
        if i < i0:
            return self.trunk_lr(i)
        return self.trunk_lr(i0) * self.row.cooldown((i - i0) / self.cooldown)

    def trunk_lr(self, i: int) -> float:
        """The rate of the trunk (no cooldown) at iteration i of the step."""
        if i < self.warmup:
            return self.peak * (i + 1) / self.warmup
        return self.row.rate(self, i)


# ----------------------------------------------------------------------------- the rates
def cosine(s: StepSchedule, i: int) -> float:
    progress = (i - s.warmup) / max(1, s.n_iters - s.warmup)
    return s.peak * 0.5 * (1 + math.cos(math.pi * progress))


def constant(s: StepSchedule, i: int) -> float:
    return s.peak


def rsqrt(s: StepSchedule, i: int) -> float:
    timescale = s.config.rsqrt_timescale or s.config.budget_samples // s.config.batch_size
    return s.peak * min(1.0, math.sqrt(timescale / (s.before + i + 1)))


def sqrt_cooldown(progress: float) -> float:
    return 1 - math.sqrt(progress)


# ----------------------------------------------------------------------------- the peaks
def constant_peak(cfg: SimpleNamespace, t: int, n_steps: int) -> float:
    return cfg.lr


def ar_peak(cfg: SimpleNamespace, t: int, n_steps: int) -> float:
    horizon = cfg.ar_horizon or n_steps
    return max(cfg.lr * 0.5 * (1 + math.cos(math.pi * min(t, horizon) / horizon)),
               cfg.lr_min_fraction * cfg.lr)


def horizon_note(cfg: SimpleNamespace, trained: dict, steps_then: int,
                 steps_now: int) -> str | None:
    """cosine-ar's line for a run grown since its first step was trained (trained: that step's
    config) with another horizon: with ar_horizon = 0 the horizon is the run's number of steps, so
    the steps still to train follow a longer cosine than those before them."""
    then, now = trained.get("ar_horizon", 0) or steps_then, cfg.ar_horizon or steps_now
    if trained.get("lr_schedule") != cfg.lr_schedule or then == now:
        return None
    return (f"note: cosine-ar's horizon was {then} steps when step 1 was trained and is {now} now: "
            f"the steps still to train follow the new outer cosine; rerun with "
            f"--ar_horizon={then} to keep the old one")


# ----------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Schedule:
    name: str
    rate: Callable[[StepSchedule, int], float]  # the trunk's rate at iteration i, after the warmup
    carries_optimizer: bool = False  # one optimizer for the run (else a new one, warmed up, a step)
    cooldown: Callable[[float], float] | None = None  # a cooled branch each step: its factor on the
                                                      # trunk's rate at progress 0 <= p < 1
    peak: Callable[[SimpleNamespace, int, int], float] = constant_peak  # (cfg, t, n_steps) -> peak
    grown_note: Callable | None = None  # (cfg, step 1's cfg, steps then, now) -> a line, or None
    reads: tuple[str, ...] = ()         # the SETTINGS its rate and peak read (with a cooled branch,
                                        # COOLED_BRANCH's too)


COOLED_BRANCH = ("cooldown_fraction", "continue_from")  # what every cooled branch reads


SCHEDULES = {s.name: s for s in [
    #        name              rate      one optimizer           cooled branch
    Schedule("cosine",         cosine),
    Schedule("cosine-ar",      cosine,   peak=ar_peak,
             grown_note=horizon_note, reads=("lr_min_fraction", "ar_horizon")),
    Schedule("const-cooldown", constant, carries_optimizer=True, cooldown=sqrt_cooldown),
    Schedule("rsqrt",          rsqrt,    carries_optimizer=True, cooldown=sqrt_cooldown,
             reads=("rsqrt_timescale",)),
]}


def get_schedule(name: str) -> Schedule:
    if name not in SCHEDULES:
        raise SystemExit(f"error: unknown lr_schedule '{name}'; "
                         f"choose one of: {', '.join(SCHEDULES)}")
    return SCHEDULES[name]


def step_schedule(cfg: SimpleNamespace, t: int, n_steps: int, n_iters: int,
                  before: int | None) -> StepSchedule:
    """Time step t's schedule (of n_steps), n_iters long. before: the iterations the optimizer it
    goes on with did in earlier steps; None for a new optimizer."""
    row = get_schedule(cfg.lr_schedule)
    warmup = 0 if before is not None else cfg.warmup_iters if t == 0 else cfg.warmup_iters_later
    cooldown = round(cfg.cooldown_fraction * n_iters) if row.cooldown else 0
    return StepSchedule(row, row.peak(cfg, t, n_steps), warmup, n_iters, cooldown, before or 0, cfg)


def check_schedule(cfg: SimpleNamespace) -> None:
    """Refuse, before any compute, a row that asks for what the loop cannot do, an unknown
    lr_schedule, a schedule setting that cannot work, or one set (not left at its default) under
    a schedule that does not read it."""
    for row in SCHEDULES.values():
        if row.cooldown and not row.carries_optimizer:
            raise SystemExit(f"error: schedule {row.name} has a cooled branch but a new optimizer "
                             f"each step, so the trunk it branches from cannot go on; give it "
                             f"carries_optimizer=True")
    get_schedule(cfg.lr_schedule)
    settings.check(SETTINGS, cfg)
    for key, setting in SETTINGS.items():
        readers = [row.name for row in SCHEDULES.values() if key in settings_read(row)]
        value = getattr(cfg, key)
        if readers and cfg.lr_schedule not in readers and value != setting.default:
            raise SystemExit(f"error: --{key}={value} does nothing under --lr_schedule="
                             f"{cfg.lr_schedule}; drop it, or choose a schedule that reads it: "
                             f"{', '.join(readers)}")


def settings_read(row: Schedule) -> tuple[str, ...]:
    """The SETTINGS a row reads: its own, and a cooled branch's."""
    return row.reads + (COOLED_BRANCH if row.cooldown else ())
