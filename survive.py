"""
Surviving kills and bad data: what lets a long run on preemptible nodes stop and go on exactly,
and stop with a clear error when its data or its losses go bad. train.py's loop calls it in a line
or two at each place; docs/faults.md lists every case.

- SIGTERM (a cluster's preemption notice) sets a flag; every rank stops at the same log interval,
  after saving.
- Exact resume. StepState is a step in progress beyond its model and optimizer (iteration, time
  trained, skipped data, non-finite losses, the trunk of a schedule that carries its optimizer),
  saved with them and the RNG states in RUN/resume/stepNN-IIIIIII.pt every ckpt_interval_samples.
  A rerun of the same command loads the newest, and the loader remakes the data from that batch
  on (data.TrainStream), so the run goes on bitwise where it stopped. What a strategy's
  start-of-step action left is kept beside them (RUN/resume/stepNN-start.pt), so a resumed step
  does not do it again.
- Bad data (corrupt images, broken shards) is counted per rank and stops the run past
  max_bad_fraction; a non-finite loss skips its update and stops the run after
  max_nonfinite_in_row in a row.
- A checkpoint from another run (another model shape, other time steps) is refused in one line.

`world` below is a world.World: rank, size, device, master, gather.
"""
import os
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

import torch
import torch.distributed as dist

import data
import evaluate
import shards
from model import CLIP, CLIPConfig, config_differences


# ----------------------------------------------------------------------------- stopping when asked
sigterm = False  # set by a preemption notice; acted on at the next log interval


def on_sigterm(signum, frame) -> None:
    global sigterm
    sigterm = True


def stop_requested(world) -> bool:
    return any(world.gather(sigterm))  # SIGTERM on any rank: every rank stops at the same iteration


# ----------------------------------------------------------------------------- a step in progress
def resume_checkpoint(run_dir: str, t: int, iteration: int | None = None) -> str:
    """RUN/resume/stepNN-IIIIIII.pt: time step t's checkpoint at iteration IIIIIII, named after the
    RUN/stepNN.pt it leads to; with no iteration, the prefix that all of step t's share."""
    stem = os.path.basename(evaluate.step_checkpoint(run_dir, t)).removesuffix(".pt")
    return os.path.join(run_dir, "resume",
                        f"{stem}-" + ("" if iteration is None else f"{iteration:07d}.pt"))


def resume_checkpoints(run_dir: str, t: int) -> list[str]:
    """Step t's resume checkpoints, newest first."""
    folder, start = os.path.join(run_dir, "resume"), resume_checkpoint(run_dir, t)
    paths = [os.path.join(folder, f) for f in os.listdir(folder)] if os.path.isdir(folder) else []
    return sorted((p for p in paths if re.fullmatch(re.escape(start) + r"\d+\.pt", p)),
                  reverse=True)


def start_checkpoint(run_dir: str, t: int) -> str:
    """RUN/resume/stepNN-start.pt: what step t's start-of-step action left (train.py's
    begin_step), kept until the step ends so that a resumed step does not do it again."""
    return resume_checkpoint(run_dir, t) + "start.pt"


def load_start(path: str, cfg: SimpleNamespace, world) -> dict | None:
    """What an earlier run of this step kept at path (start_checkpoint), or None if there is none or
    it does not load; a line names the settings that changed since."""
    if not os.path.exists(path):
        return None
    try:
        kept = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # damaged after it was written: the action is done again
        if world.master:
            print(f"warning: {path} does not load ({e}); doing the start of the step again",
                  file=sys.stderr)
        return None
    note_changes(kept["config"], cfg, world)
    return kept


def note_changes(old: dict, cfg: SimpleNamespace, world) -> None:
    """A line naming the settings that changed since a checkpoint was written (rank 0)."""
    changed = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in vars(cfg).items() if old.get(k) != v]
    if world.master and changed:
        print(f"note: the config changed since that checkpoint: {', '.join(changed)}")


@dataclass
class StepState:
    """A step in progress, beyond its model and optimizer: where it is, how long it has trained,
    the data it skipped and the non-finite losses it met. Saved with them in resume checkpoints
    (see the module docstring); checked once per log interval, so broken data or a diverging run
    stops with a clear error."""
    iteration: int = 0       # optimizer steps done
    train_s: float = 0.0     # seconds trained by earlier processes (a resumed step)
    faults: Counter = field(default_factory=Counter)  # this rank's skipped data (data.FAULTS kinds)
    nonfinite: torch.Tensor | int = 0  # non-finite losses so far; on the device: no sync a step
    in_row: torch.Tensor | int = 0     # ... and in a row; both read once per log interval
    worst_row: torch.Tensor | int = 0  # the longest run of non-finite losses since the last check
    path: str | None = None  # the resume checkpoint it was loaded from
    trunk: dict | None = None  # the trunk (schedules.py): model and optimizer where cooldown began
    end: dict | None = None    # ... and the optimizer at the step's end
    started: float = field(default_factory=time.time)

    @classmethod
    def resume(cls, run_dir: str, t: int, model: CLIP, optimizer, cfg: SimpleNamespace,
               world, faults: Counter) -> "StepState":
        """The state of the newest of step t's resume checkpoints that loads (rank 0 chooses, so
        every rank resumes from the same one), with its weights, optimizer and RNG put back; a
        fresh state if none. faults: the step's count of this process's bad data (TimeStep's),
        which the state keeps and a resumed step starts from its saved value."""
        ckpt, path = None, None
        if world.master:
            for path in resume_checkpoints(run_dir, t):
                try:
                    ckpt = torch.load(path, map_location="cpu", weights_only=True)
                    break
                except Exception as e:  # damaged after it was written: fall back to the one before
                    print(f"warning: {path} does not load ({e}); trying the one before",
                          file=sys.stderr)
            path = path if ckpt else None
        if world.distributed:
            chosen = [path]
            dist.broadcast_object_list(chosen, 0)
            path = chosen[0]
            ckpt = (torch.load(path, map_location="cpu", weights_only=True)
                    if path and not world.master else ckpt)
        if not ckpt:
            return cls(faults=faults).on(world.device)
        check_shape(ckpt, path, model.cfg, cfg.model)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng_cpu"])
        if world.device.type == "cuda" and ckpt["rng_cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], world.device)
        faults.clear()
        faults.update(ckpt["faults"][world.rank]  # each rank its own
                      if world.rank < len(ckpt["faults"]) else {})
        note_changes(ckpt["config"], cfg, world)
        state = cls(iteration=ckpt["iteration"], train_s=ckpt["train_s"], faults=faults,
                    nonfinite=ckpt["nonfinite"], in_row=ckpt["nonfinite_in_row"], path=path,
                    trunk=ckpt.get("trunk"))
        return state.on(world.device)

    def on(self, device: torch.device) -> "StepState":
        self.nonfinite = torch.tensor(self.nonfinite, device=device)
        self.in_row = torch.tensor(self.in_row, device=device)
        self.worst_row = self.in_row.clone()
        return self

    def count_faults(self, new_faults: dict, gave_up: bool, min_read: int, cfg: SimpleNamespace,
                     where: str) -> None:
        """Add the faults that came with a batch (counted in the loader's workers); SystemExit past
        max_bad_fraction of the samples read (data.too_much_bad), or where a loader worker gave up
        (it sends no batch then)."""
        self.faults.update(new_faults)
        bad, read = self.faults["bad_samples"], self.faults["samples"]
        if gave_up or data.too_much_bad(bad, read, cfg.max_bad_fraction, min_read):
            raise SystemExit(f"error: {where}: {bad} of {read} samples read were bad "
                             f"({fault_summary(self.faults)}), over --max_bad_fraction="
                             f"{cfg.max_bad_fraction}; fix or drop the shards named above")

    def optimizer_step(self, model: CLIP, optimizer) -> None:
        """optimizer.step(), skipped where the loss or a gradient is not finite (the same on every
        rank, as gradients are all-reduced), and counted."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        bad = ~torch.isfinite(torch.nn.utils.get_total_norm(grads))
        if optimizer.defaults["fused"]:
            optimizer.found_inf = bad.float()  # the fused kernel skips the update: no host sync
            optimizer.step()
        elif not bad:  # the unfused optimizer (CPU): reading bad syncs, which is free on CPU
            optimizer.step()
        self.nonfinite += bad
        self.in_row = (self.in_row + 1) * bad
        self.worst_row = torch.maximum(self.worst_row, self.in_row)

    def check_nonfinite(self, run_dir: str, t: int, cfg: SimpleNamespace, where: str) -> None:
        if int(self.worst_row) >= cfg.max_nonfinite_in_row:
            last = next(iter(resume_checkpoints(run_dir, t)
                             + evaluate.step_checkpoints(run_dir)[::-1]), "none")
            raise SystemExit(f"error: {where}: {int(self.worst_row)} non-finite losses in a row by "
                             f"sample {self.iteration * cfg.batch_size}; stopped with the last "
                             f"good checkpoint ({last}) intact; lower --lr or check the data, "
                             f"then rerun")
        self.worst_row = self.in_row.clone()

    def seconds(self) -> float:
        return self.train_s + time.time() - self.started

    def summary(self, world) -> dict:
        """What the finished step reports and records: its training time, the faults of all ranks,
        its non-finite losses."""
        faults = sum((Counter(f) for f in world.gather(dict(self.faults))), Counter())
        return {"train_s": self.seconds(), "faults": dict(faults), "nonfinite": int(self.nonfinite)}

    def save(self, run_dir: str, t: int, model: CLIP, optimizer, cfg: SimpleNamespace,
             world) -> str | None:
        """Write RUN/resume/stepNN-ITERATION.pt and return its path (rank 0 writes it and keeps the
        newest keep_checkpoints; the other ranks send their fault counts and return None)."""
        world.check_same_weights(model, f"step {t + 1}, sample {self.iteration * cfg.batch_size}")
        all_faults = world.gather(dict(self.faults))  # each rank resumes with its own counts
        if not world.master:
            return None
        path = resume_checkpoint(run_dir, t, self.iteration)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "model_config": asdict(model.cfg), "config": vars(cfg), "time_step": t + 1,
                "iteration": self.iteration, "samples_seen": self.iteration * cfg.batch_size,
                "faults": all_faults, "nonfinite": int(self.nonfinite),
                "nonfinite_in_row": int(self.in_row), "train_s": self.seconds(),
                "trunk": self.trunk, "rng_cpu": torch.get_rng_state(),
                "rng_cuda": (torch.cuda.get_rng_state(world.device)
                             if world.device.type == "cuda" else None)}
        shards.write_atomic(path, lambda f: torch.save(ckpt, f))
        for old in resume_checkpoints(run_dir, t)[cfg.keep_checkpoints:]:
            os.remove(old)
        return path

    @staticmethod
    def clear(run_dir: str, t: int) -> None:
        """Remove step t's resume checkpoints, and any temporary file a kill left half-written, once
        stepNN.pt is written."""
        folder, start = os.path.join(run_dir, "resume"), resume_checkpoint(run_dir, t)
        for path in ([os.path.join(folder, f) for f in os.listdir(folder)]
                     if os.path.isdir(folder) else []):
            if path.startswith(start):
                os.remove(path)


def fault_summary(faults: dict) -> str:
    return ", ".join(f"{kind} {faults[kind]}" for kind in data.FAULTS if faults.get(kind)) or "none"


# ----------------------------------------------------------------------- checkpoints of another run
def check_steps(record: dict, path: str, step_years: list[list[str]]) -> None:
    """Refuse a step checkpoint from a run whose steps do not begin this run's (or the other way
    round): a run grows only by steps added at its end, as checkpoints match steps by position."""
    old, n = record["steps"], min(len(record["steps"]), len(step_years))
    if old[:n] != step_years[:n]:
        name = lambda groups: ",".join(shards.step_name(ys) for ys in groups)  # noqa: E731
        raise SystemExit(f"error: {path} belongs to a run of the steps {name(old)}, which do not "
                         f"begin --steps={name(step_years)}; a run can only grow by steps added at "
                         f"the end; use a new --out_dir")


def check_shape(record: dict, path: str, model_cfg: CLIPConfig, model_name: str) -> None:
    """Refuse a checkpoint (a step's, a resume one) whose model is not of this run's shape, naming
    the fields that differ (model.config_differences)."""
    differ = config_differences(record["model_config"], model_cfg)
    if differ:
        was = record["config"]
        raise SystemExit(f"error: {path} holds a model of another shape than this run's "
                         f"(--model={model_name} with this tokenizer, or --init's): "
                         f"{'; '.join(differ[:4])} (saved -> this run); rerun as it was trained "
                         f"(--model={was['model']}{', --loss=' + was['loss'] if 'loss' in was else ''}"
                         f"{', --init=' + was['init'] if was.get('init') else ''}) or use a new "
                         f"--out_dir")
