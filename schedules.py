"""
Learning-rate schedules through time: the rate of every iteration of every time step, set by lr_schedule (a
setting of train.py, usable with every strategy). With peak = lr, W = the step's warmup iterations, i = the
iteration within the step (from 0), n = the step's iterations, t = the time step (from 0):

  cosine          the paper's: each step warms up again and decays by cosine to 0, its optimizer made afresh.
                      lr(i) = peak (i + 1) / W                                   for i < W
                      lr(i) = peak 0.5 (1 + cos(pi (i - W) / (n - W)))           after
  cosine-ar       TiC-LM's "autoregressive" meta-schedule: as cosine, but step t's peak follows one cosine over
                  the whole sequence of H = ar_horizon steps (0: the run's number of steps; set it when a run
                  will grow, so that its steps' peaks stay as they were), floored, and at the floor past H:
                      peak_t = max(lr 0.5 (1 + cos(pi min(t, H) / H)), lr_min_fraction lr)
  const-cooldown  the "infinite" schedule (Ibrahim et al. 2024, Hagele et al. 2024): one warmup, then a constant
                  rate; the last cooldown_fraction of each step's iterations (c of them, from i0 = n - c, inside
                  the budget) decay on a branch:
                      lr(i) = peak (1 - sqrt((i - i0) / c))                       for i >= i0
  rsqrt           one warmup, then the inverse square root of the global iteration g (counted across steps by
                  the optimizer that carries over), with T = rsqrt_timescale (0: one step's iterations), and the
                  same cooldown branch, from the rate the trunk had at i0:
                      lr(g) = peak min(1, sqrt(T / (g + 1)))                     after the warmup

The last two keep one run going through time: their optimizer state carries from step to step, and each step's
cooled branch is what is deployed (evaluated, checkpointed, passed to the strategy's end-of-step action) while
the next step continues from the trunk, the weights and AdamW state at i0, before the cooldown
(continue_from=trunk), or from the cooled branch (continue_from=cooled). A step warms up (W > 0) only when its
optimizer is new: at the first step, or every step of a strategy that does not warm-start.
"""
import math
from dataclasses import dataclass
from types import SimpleNamespace

SCHEDULES = ("cosine", "cosine-ar", "const-cooldown", "rsqrt")
CARRIES_OPTIMIZER = ("const-cooldown", "rsqrt")  # one optimizer for the whole run; the others restart it every step
FIRST_STEP_AS = {"cosine-ar": "cosine"}  # schedules whose first step is another's at any setting (peak_0 = lr)


@dataclass(frozen=True)
class StepSchedule:
    """The learning rate of each iteration of one time step."""
    kind: str
    peak: float      # the step's peak rate
    warmup: int      # iterations of linear warmup at the step's start (0 when the optimizer carries over)
    n_iters: int     # the step's iterations
    cooldown: int    # iterations of the cooldown branch at the step's end (0: none)
    before: int = 0  # iterations the carried optimizer did in earlier steps (rsqrt's global count)
    timescale: int = 1  # rsqrt's T

    @property
    def cooldown_start(self) -> int:
        """i0, the iteration where the branch leaves the trunk; n_iters when there is no branch."""
        return self.n_iters - self.cooldown

    def lr(self, i: int) -> float:
        if self.kind in ("cosine", "cosine-ar"):
            if i < self.warmup:
                return self.peak * (i + 1) / self.warmup
            progress = (i - self.warmup) / max(1, self.n_iters - self.warmup)
            return self.peak * 0.5 * (1 + math.cos(math.pi * progress))
        i0 = self.cooldown_start
        trunk = self.trunk_lr(min(i, i0))
        return trunk if i < i0 else trunk * (1 - math.sqrt((i - i0) / self.cooldown))

    def trunk_lr(self, i: int) -> float:
        """The rate of the trunk (no cooldown) at iteration i of the step."""
        if i < self.warmup:
            return self.peak * (i + 1) / self.warmup
        if self.kind == "const-cooldown":
            return self.peak
        return self.peak * min(1.0, math.sqrt(self.timescale / (self.before + i + 1)))  # rsqrt


def step_schedule(cfg: SimpleNamespace, t: int, n_steps: int, n_iters: int, before: int | None) -> StepSchedule:
    """Time step t's schedule (of n_steps in the run), n_iters long; before: the iterations that the optimizer it
    continues did in earlier steps, None when it starts a new optimizer."""
    warmup = 0 if before is not None else cfg.warmup_iters if t == 0 else cfg.warmup_iters_later
    peak = cfg.lr
    if cfg.lr_schedule == "cosine-ar":
        horizon = cfg.ar_horizon or n_steps
        peak = max(cfg.lr * 0.5 * (1 + math.cos(math.pi * min(t, horizon) / horizon)), cfg.lr_min_fraction * cfg.lr)
    cooldown = round(cfg.cooldown_fraction * n_iters) if cfg.lr_schedule in CARRIES_OPTIMIZER else 0
    return StepSchedule(cfg.lr_schedule, peak, warmup, n_iters, cooldown, before or 0,
                        cfg.rsqrt_timescale or cfg.budget_samples // cfg.batch_size)


def horizon_note(cfg: SimpleNamespace, trained: dict, steps_then: int, steps_now: int) -> str | None:
    """A line for a run that has grown since its first step was trained under cosine-ar (trained: that step's
    config) with another horizon than now: ar_horizon = 0 takes the run's number of steps, so the peaks of the
    steps still to train follow a longer cosine than the steps before them did."""
    then, now = trained.get("ar_horizon", 0) or steps_then, cfg.ar_horizon or steps_now
    if cfg.lr_schedule != "cosine-ar" or trained.get("lr_schedule") != "cosine-ar" or then == now:
        return None
    return (f"note: cosine-ar's horizon was {then} steps when step 1 was trained and is {now} now: the steps still "
            f"to train follow the new outer cosine; rerun with --ar_horizon={then} to keep the old one")


def check_schedule(cfg: SimpleNamespace) -> None:
    """Schedule settings that parse but cannot work, refused before any compute is spent."""
    if cfg.lr_schedule not in SCHEDULES:
        raise SystemExit(f"error: unknown lr_schedule '{cfg.lr_schedule}'; choose one of: {', '.join(SCHEDULES)}")
    if cfg.continue_from not in ("trunk", "cooled"):
        raise SystemExit(f"error: --continue_from={cfg.continue_from}: use trunk (the weights before the cooldown) "
                         f"or cooled (the cooled branch)")
    ranges = {"cooldown_fraction": (0 <= cfg.cooldown_fraction < 1, "a fraction, 0 or more, below 1"),
              "lr_min_fraction": (0 <= cfg.lr_min_fraction <= 1, "a fraction, 0 to 1"),
              "ar_horizon": (cfg.ar_horizon >= 0, "0 (the run's number of steps) or more"),
              "rsqrt_timescale": (cfg.rsqrt_timescale >= 0, "0 (one step's iterations) or more")}
    for key, (ok, use) in ranges.items():
        if not ok:
            raise SystemExit(f"error: --{key}={getattr(cfg, key)} is out of range; use {use}")
