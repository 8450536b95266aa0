"""
Surviving kills, bad numbers and reruns: what lets a long run on preemptible nodes stop and go on
exactly, and a rerun of a command go on where it stopped. train.py's loop calls it in a line at
each place; docs/faults.md lists every case.

- The run folder is made, locked (a second process on it is refused) and cleared of what a kill
  left half-written (open_run_folder). RUN/run.json says what its numbers depend on, and a rerun
  that differs is refused in one line (check_run_definition).
- Exact resume. StepProgress is a step in progress beyond its model and optimizer (iteration, time
  trained, non-finite losses, the trunk of a schedule that carries its optimizer), saved with them,
  the fault counts and the RNG states in RUN/resume/stepNN-IIIIIII.pt every ckpt_interval_samples
  and at SIGTERM (world.py). A rerun of the same command loads the newest, and the loader remakes
  the data from that batch on (data.TrainStream), so the run goes on bitwise where it stopped.
  What a strategy's start-of-step action left is kept beside them (RUN/resume/stepNN-start.pt), so
  a resumed step does not do it again. A finished step is RUN/stepNN.pt (save_step, load_step).
- A non-finite loss skips its update and stops the run after max_nonfinite_in_row in a row; bad
  data is counted in faults.py.
- Every checkpoint is verified before it is read (checkpoints.verify_checkpoint): a damaged resume
  checkpoint is set aside and the one before is used. A checkpoint of another run (another model
  shape, other time steps) is refused in one line.

`world` below is a world.World: rank, size, device, master, gather.
"""
import fcntl
import hashlib
import itertools
import json
import os
import re
import socket
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

import torch
import torch.distributed as dist

import files
import report
import schedules
import shards
from checkpoints import (config_differences, cpu_copy, load_checkpoint, read_verified,
                         step_checkpoint, step_checkpoints)
from faults import check_bad
from model import CLIP, CLIPConfig


# ----------------------------------------------------------------------------- the run folder
def run_folder(cfg: SimpleNamespace) -> str:
    return cfg.out_dir or os.path.join("runs", cfg.strategy)


def open_run_folder(cfg: SimpleNamespace, world) -> str:
    """The run folder (--out_dir, else runs/STRATEGY): made if it is new, checked writable, locked
    (a second run there is refused), and cleared of the temporary files killed processes left
    (files.write_atomic). Rank 0 does it; every rank returns its path."""
    run_dir = run_folder(cfg)
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
        files.write_atomic(probe, lambda f: None)  # a WriteError line if it is not
        os.remove(probe)
        lock_run_folder(run_dir)  # a second run in this folder is refused
        for folder in (run_dir, os.path.join(run_dir, "resume")):
            removed = files.remove_stale_temporaries(folder)
            if removed:
                print(f"{folder}: removed {len(removed)} temporary file(s) that killed processes "
                      f"left ({', '.join(removed[:3])}{', ...' if len(removed) > 3 else ''})")
    world.barrier()
    return run_dir


# ----------------------------------------------------------------------------- a finished step
def save_step(path: str, model: CLIP, deployed: dict, step, record: dict) -> None:
    """RUN/stepNN.pt: the deployed model (model's weights, on the CPU) and the step's record,
    written by rank 0 with a line giving its size, once every process holds the same weights; the
    step's resume checkpoints go."""
    world = step.world
    world.check_same_weights(model, f"step {step.t + 1} ({step.step_names[step.t]}), at its end")
    if world.master:  # deployed may also be the continue point's model: torch.save stores it once
        ckpt = {"model": deployed, "model_config": asdict(model.cfg), "config": vars(step.config),
                **record}
        files.write_atomic(path, lambda f: torch.save(ckpt, f))
        StepProgress.clear(os.path.dirname(path), step.t)
        kept = report.tensor_bytes(record["state"])
        print(f"saved {path}: {os.path.getsize(path) / 1e6:.1f} MB"
              + (f", of which the strategy's state {kept / 1e6:.1f} MB" if kept else ""))


def load_step(path: str, step, model_cfg: CLIPConfig) -> tuple[CLIP, dict, dict]:
    """The model (on the device), its weights on the CPU and the record of a step an earlier run of
    this command finished, checked to belong to this run; the step's resume checkpoints go (a kill
    between stepNN.pt and their removal leaves them). A grown run says where that moved its
    schedule."""
    model, record = load_checkpoint(path)
    step_years = [[p.name for p in parts] for parts in step.step_data]
    check_shape(record, path, model_cfg, step.config.model)
    check_steps(record, path, step_years)
    if step.master:
        StepProgress.clear(os.path.dirname(path), step.t)
        print(f"step {step.t + 1}/{len(step.step_names)} ({step.step_names[step.t]}): "
              f"done already ({path})")
        grown_note = schedules.get_schedule(step.config.lr_schedule).grown_note
        note = step.t == 0 and grown_note and grown_note(
            step.config, record["config"], len(record["steps"]), len(step_years))  # from step 1's
        if note:
            print(note)
    return model.to(step.device), cpu_copy(model.state_dict()), record


# ----------------------------------------------------------------------------- a step in progress
def resume_checkpoint(run_dir: str, t: int, iteration: int | None = None) -> str:
    """RUN/resume/stepNN-IIIIIII.pt: time step t's checkpoint at iteration IIIIIII, named after the
    RUN/stepNN.pt it leads to; with no iteration, the prefix that all of step t's share."""
    stem = os.path.basename(step_checkpoint(run_dir, t)).removesuffix(".pt")
    return os.path.join(run_dir, "resume",
                        f"{stem}-" + ("" if iteration is None else f"{iteration:07d}.pt"))


def resume_checkpoints(run_dir: str, t: int) -> list[str]:
    """Step t's resume checkpoints, newest first."""
    folder, start = os.path.join(run_dir, "resume"), resume_checkpoint(run_dir, t)
    paths = [os.path.join(folder, f) for f in os.listdir(folder)] if os.path.isdir(folder) else []
    return sorted((p for p in paths if re.fullmatch(re.escape(start) + r"\d+\.pt", p)),
                  reverse=True)


def start_checkpoint(run_dir: str, t: int) -> str:
    """RUN/resume/stepNN-start.pt: what step t's start-of-step action left (start_of_step), kept
    until the step ends so that a resumed step does not do it again."""
    return resume_checkpoint(run_dir, t) + "start.pt"


def start_of_step(action, step, run_dir: str) -> dict:
    """The strategy's start-of-step action (action(): its report), done once a step: its report,
    the strategy's state and the RNG state it left are kept in RUN/resume until the step ends, and
    a resumed step takes them from there instead of doing it again."""
    world, path = step.world, start_checkpoint(run_dir, step.t)
    kept = load_start(path, step.config, world)
    world.barrier()  # every rank has looked before rank 0 writes it
    if kept:
        torch.set_rng_state(kept["rng_cpu"])
        if world.device.type == "cuda" and kept["rng_cuda"] is not None:
            torch.cuda.set_rng_state(kept["rng_cuda"], world.device)
        step.state = kept["state"]
        return kept["report"]
    report_ = action()
    step.state = cpu_copy(step.state)
    if world.master:
        cuda = world.device.type == "cuda"
        kept = {"report": report_, "state": step.state, "config": vars(step.config),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(world.device) if cuda else None}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        files.write_atomic(path, lambda f: torch.save(kept, f))
    return report_


def load_start(path: str, cfg: SimpleNamespace, world) -> dict | None:
    """What an earlier run of this step kept at path (start_checkpoint), or None if there is none or
    it does not load; a line names the settings that changed since."""
    if not os.path.lexists(path):
        return None
    try:
        kept = read_verified(path)
    except Exception as e:  # damaged after it was written: the action is done again
        if world.master:
            print(f"warning: {path} does not load ({e}); {set_aside(path)}doing the start of the "
                  f"step again", file=sys.stderr)
        return None
    note_changes(kept["config"], cfg, world)
    return kept


def set_aside(path: str) -> str:
    """Rename a damaged resume checkpoint (or whatever stands where one should) to PATH.damaged,
    so that no rerun reads it again and the next one can be written there; removed, if a file,
    with the step's other resume checkpoints. Returns the words that say so."""
    aside = next(f"{path}.damaged{n or ''}" for n in itertools.count()
                 if not os.path.lexists(f"{path}.damaged{n or ''}"))  # set aside before: kept
    try:
        os.replace(path, aside)
    except OSError as e:
        return f"could not set it aside ({e.strerror}); "
    return f"set aside as {os.path.basename(aside)}; "


def note_changes(old: dict, cfg: SimpleNamespace, world) -> None:
    """A line naming the settings that changed since a checkpoint was written (rank 0)."""
    changed = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in vars(cfg).items() if old.get(k) != v]
    if world.master and changed:
        print(f"note: the config changed since that checkpoint: {', '.join(changed)}")


@dataclass
class StepProgress:
    """A step in progress, beyond its model and optimizer: where it is, how long it has trained,
    the non-finite losses it met, the trunk where its cooled branch began (schedules.py), and, once
    it ends, what it carries to the next step. Saved with them and the step's fault counts in
    resume checkpoints (see the module docstring); once per log interval (after_update) it checks
    the counts, logs, saves and stops where asked, so broken data, a diverging run or a preemption
    stops with a clear line."""
    run_dir: str = ""
    step: object = None       # strategies.TimeStep: the step's settings, processes, fault counts
    n_iters: int = 0          # the step's iterations
    log: object = None        # report.run_log's log(record)
    iteration: int = 0        # optimizer steps done
    train_s: float = 0.0      # seconds trained by earlier processes (a resumed step)
    nonfinite: torch.Tensor | int = 0  # non-finite losses so far; on the device: no sync a step
    in_row: torch.Tensor | int = 0     # ... and in a row; both read once per log interval
    worst_row: torch.Tensor | int = 0  # the longest run of non-finite losses since the last check
    path: str | None = None   # the resume checkpoint it was loaded from
    trunk: dict | None = None  # model and optimizer where the cooled branch left the trunk
    carried: dict | None = None  # at the end: {"optimizer", "iterations", "trunk"} or None
    interval: object = None   # report.IntervalLog: the line and record of each log interval
    started: float = field(default_factory=time.time)

    @classmethod
    def resume(cls, run_dir: str, step, model: CLIP, optimizer, n_iters: int,
               log) -> "StepProgress":
        """The progress of the newest of the step's resume checkpoints that loads (rank 0 chooses,
        so every rank resumes from the same one), with its weights, optimizer, RNG and fault
        counts (step.faults, each rank its own) put back, said in a line; from the start if
        none."""
        world, cfg, t = step.world, step.config, step.t
        ckpt, path = None, None
        if world.master:
            for path in resume_checkpoints(run_dir, t):
                try:
                    ckpt = read_verified(path)
                    break
                except Exception as e:  # damaged after it was written: fall back to the one before
                    print(f"warning: {path} does not load ({e}); {set_aside(path)}trying the one "
                          f"before", file=sys.stderr)
            path = path if ckpt else None
        if world.distributed:
            chosen = [path]
            dist.broadcast_object_list(chosen, 0)
            path = chosen[0]
            ckpt = read_verified(path) if path and not world.master else ckpt
        progress = cls(run_dir, step, n_iters, log)
        if ckpt:
            check_shape(ckpt, path, model.cfg, cfg.model)
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            torch.set_rng_state(ckpt["rng_cpu"])
            if world.device.type == "cuda" and ckpt["rng_cuda"] is not None:
                torch.cuda.set_rng_state(ckpt["rng_cuda"], world.device)
            step.faults.clear()
            step.faults.update(ckpt["faults"][world.rank]  # each rank its own
                               if world.rank < len(ckpt["faults"]) else {})
            note_changes(ckpt["config"], cfg, world)
            progress = cls(run_dir, step, n_iters, log, ckpt["iteration"], ckpt["train_s"],
                           ckpt["nonfinite"], ckpt["nonfinite_in_row"], path=path,
                           trunk=ckpt.get("trunk"))
            print(f"rank {world.rank}: {progress.where}: resuming at sample "
                  f"{progress.iteration * cfg.batch_size} of {n_iters * cfg.batch_size} from "
                  f"{path}")
            log({"event": "resume", "time_step": t + 1,
                 "samples": progress.iteration * cfg.batch_size, "checkpoint": path})
        progress.interval = report.IntervalLog(step, n_iters, progress.iteration, log)
        return progress.on(world.device)

    def on(self, device: torch.device) -> "StepProgress":
        """Its non-finite counts on the device, where they are counted without a sync a step."""
        self.nonfinite = torch.tensor(self.nonfinite, device=device)
        self.in_row = torch.tensor(self.in_row, device=device)
        self.worst_row = self.in_row.clone()
        return self

    @property
    def where(self) -> str:
        return f"step {self.step.t + 1} ({self.step.step_names[self.step.t]})"

    def count_faults(self, new_faults: dict, gave_up: bool, min_read: int) -> None:
        """Add the faults that came with a batch (counted in the loader's workers) to the step's;
        SystemExit past max_bad_fraction of the samples read, or where a worker gave up."""
        self.step.faults.update(new_faults)
        check_bad(self.step.faults, gave_up, min_read, self.step.config.max_bad_fraction,
                  self.where)

    def keep_trunk(self, it: int, schedule, model: CLIP, optimizer) -> None:
        """Where the cooled branch leaves the trunk (a schedule that carries its optimizer), keep
        the trunk: its model, its optimizer and the iterations that optimizer has done."""
        if schedule.row.carries_optimizer and it == schedule.cooldown_start:
            self.trunk = {"model": cpu_copy(model.state_dict()),
                          "optimizer": cpu_copy(optimizer.state_dict()),
                          "iterations": schedule.before + it}

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

    def after_update(self, it: int, loss: torch.Tensor, lr: float, model: CLIP,
                     optimizer) -> bool:
        """The end of iteration it: once per log interval read the device's counters, log, save a
        resume checkpoint when one is due, and stop if asked (SIGTERM on any rank: True, saved)."""
        cfg, world = self.step.config, self.step.world
        self.iteration = it + 1
        ckpt_every = cfg.ckpt_interval_samples // cfg.batch_size  # iterations between; 0: none
        log_due = self.iteration % cfg.log_interval == 0 or self.iteration == self.n_iters
        ckpt_due = ckpt_every > 0 and self.iteration % ckpt_every == 0 \
            and self.iteration < self.n_iters
        if not (log_due or ckpt_due):
            return False
        self.check_nonfinite()
        stop = world.stop_requested()
        if log_due:
            self.interval(self.iteration, loss, lr, model)
        if ckpt_due or stop:
            saved = self.save(model, optimizer)
        if stop and world.master:
            print(f"SIGTERM: saved {saved} at sample {self.iteration * cfg.batch_size} of step "
                  f"{self.step.t + 1}; rerun the same command to continue")
        return stop

    def check_nonfinite(self) -> None:
        cfg = self.step.config
        if int(self.worst_row) >= cfg.max_nonfinite_in_row:
            last = next(iter(resume_checkpoints(self.run_dir, self.step.t)
                             + step_checkpoints(self.run_dir)[::-1]), "none")
            raise SystemExit(f"error: {self.where}: {int(self.worst_row)} non-finite losses in a "
                             f"row by sample {self.iteration * cfg.batch_size}; stopped with the "
                             f"last good checkpoint ({last}) intact; lower --lr or check the "
                             f"data, then rerun")
        self.worst_row = self.in_row.clone()

    def finish(self, schedule, optimizer) -> "StepProgress":
        """The step's end: what a schedule that carries its optimizer hands on (the optimizer, the
        iterations it has done, the trunk)."""
        if schedule.row.carries_optimizer:
            self.carried = {"optimizer": cpu_copy(optimizer.state_dict()),
                            "iterations": schedule.before + self.n_iters, "trunk": self.trunk}
        return self

    def seconds(self) -> float:
        return self.train_s + time.time() - self.started

    def summary(self) -> dict:
        """What the finished step reports and records: its training time, the faults of all ranks,
        its non-finite losses."""
        faults = sum((Counter(f) for f in self.step.world.gather(dict(self.step.faults))),
                     Counter())
        return {"train_s": self.seconds(), "faults": dict(faults), "nonfinite": int(self.nonfinite)}

    def save(self, model: CLIP, optimizer) -> str | None:
        """Write RUN/resume/stepNN-ITERATION.pt, once every process holds the same weights, and
        return its path (rank 0 writes it and keeps the newest keep_checkpoints; the other ranks
        send their fault counts and return None)."""
        cfg, world, t = self.step.config, self.step.world, self.step.t
        world.check_same_weights(model, f"step {t + 1}, sample {self.iteration * cfg.batch_size}")
        all_faults = world.gather(dict(self.step.faults))  # each rank resumes with its own counts
        if not world.master:
            return None
        path = resume_checkpoint(self.run_dir, t, self.iteration)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "model_config": asdict(model.cfg), "config": vars(cfg), "time_step": t + 1,
                "iteration": self.iteration, "samples_seen": self.iteration * cfg.batch_size,
                "faults": all_faults, "nonfinite": int(self.nonfinite),
                "nonfinite_in_row": int(self.in_row), "train_s": self.seconds(),
                "trunk": self.trunk, "rng_cpu": torch.get_rng_state(),
                "rng_cuda": (torch.cuda.get_rng_state(world.device)
                             if world.device.type == "cuda" else None)}
        files.write_atomic(path, lambda f: torch.save(ckpt, f))
        for old in resume_checkpoints(self.run_dir, t)[cfg.keep_checkpoints:]:
            if not os.path.isdir(old):  # a folder of that name is not ours to remove
                os.remove(old)
        return path

    @staticmethod
    def clear(run_dir: str, t: int) -> None:
        """Remove step t's resume checkpoints, and any temporary file a kill left half-written, once
        stepNN.pt is written."""
        folder, start = os.path.join(run_dir, "resume"), resume_checkpoint(run_dir, t)
        for path in ([os.path.join(folder, f) for f in os.listdir(folder)]
                     if os.path.isdir(folder) else []):
            if path.startswith(start) and not os.path.isdir(path):  # a folder is not ours
                os.remove(path)


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
    the fields that differ (checkpoints.config_differences)."""
    differ = config_differences(record["model_config"], model_cfg)
    if differ:
        was = record["config"]
        raise SystemExit(f"error: {path} holds a model of another shape than this run's "
                         f"(--model={model_name} with this tokenizer, or --init's): "
                         f"{'; '.join(differ[:4])} (saved -> this run); rerun as it was trained "
                         f"(--model={was['model']}"
                         f"{', --loss=' + was['loss'] if 'loss' in was else ''}"
                         f"{', --init=' + was['init'] if was.get('init') else ''}) or use a new "
                         f"--out_dir")


# ----------------------------------------------------------------------- a run folder, one command
def lock_run_folder(run_dir: str) -> None:
    """Hold RUN/.lock for as long as this process lives, or refuse in one line where another
    process holds it: two runs in one folder would resume from each other's checkpoints and log
    every step twice. An flock, which the kernel lets go of when its process ends, SIGKILL
    included, so a killed run leaves none behind. Rank 0 takes it (docs/faults.md: many nodes)."""
    path = os.path.join(run_dir, ".lock")
    if os.path.realpath(path) in _locks:  # an earlier main in this process (a test): still held
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise SystemExit(f"error: cannot open {path}: {e.strerror}; delete it, or pick another "
                         f"--out_dir") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise SystemExit(f"error: {run_dir} is in use by another run ({holder}); wait for it to "
                         f"end or stop it, then rerun, or pick another --out_dir") from None
    except OSError as e:  # a file system that does not lock (Lustre mounted without flock)
        os.close(fd)
        print(f"warning: {path}: cannot be locked here ({e.strerror}); a second run in "
              f"{run_dir} would not be refused", file=sys.stderr)
        return
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()} on {socket.gethostname()}".encode())  # named to the next
    _locks[os.path.realpath(path)] = fd


_locks = {}  # RUN/.lock files this process holds: {real path: its descriptor}, open until exit

# settings a rerun may change: how the run is done, not what it is (docs/faults.md)
FREE_SETTINGS = {
    "out_dir": "the folder itself",
    "data_root": "where the data is: the data itself (each year's shards, samples) is compared",
    "steps": "compared as the years of each step: a run grows by steps added at its end",
    "shard_cmd": "how the shards are read, not which",
    "static": "tasks outside time, scored for every row that lacks them",
    "device": "the same arithmetic, rounded as that device rounds",
    "compile": "the same arithmetic, rounded as the compiled kernels round",
    "accum_steps": "the same gradients, up to rounding",
    "grad_checkpointing": "the same activations, computed again",
    "eval_batch": "the same scores, up to rounding",
    "workers": "a resumed step draws other batches (as with another number of processes)",
    "log_interval": "when lines are logged and SIGTERM is acted on",
    "ckpt_interval_samples": "how often a step in progress is saved",
    "keep_checkpoints": "how many of those are kept",
    "max_bad_fraction": "when bad data stops the run",
    "max_nonfinite_in_row": "when non-finite losses stop the run",
}
FILES = ("init", "tokenizer")  # compared by their bytes, wherever they are now


def run_definition(cfg: SimpleNamespace, step_years: list[list[str]], step_data: list) -> dict:
    """What a run's numbers depend on, as RUN/run.json keeps it: the settings outside
    FREE_SETTINGS, --init's and --tokenizer's files (path and sha256), the years of each step and
    each year's training data (shards, samples)."""
    return {"settings": {k: v for k, v in vars(cfg).items()
                         if k not in FREE_SETTINGS and k not in FILES},
            "files": {k: [getattr(cfg, k), file_sha256(getattr(cfg, k))] if getattr(cfg, k)
                      else None for k in FILES},
            "steps": step_years,
            "data": {p.name: [len(p.shards), sum(n for _, n in p.shards)]
                     for parts in step_data for p in parts}}


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_run_definition(run_dir: str, cfg: SimpleNamespace, step_years: list[list[str]],
                         step_data: list, declared: dict, world) -> None:
    """Refuse, in one line naming what differs, a command whose numbers would differ from those
    its run folder holds, as RUN/run.json (run_definition) says: its steps must begin with the
    run's (check_steps), and its settings, files and data be the same. A setting may change its
    value where its Setting's resolve says it means the same for the steps trained (ar_horizon).
    run.json is written on first use, and again when the run grows by steps (rank 0)."""
    if not world.master:
        return
    path, now = os.path.join(run_dir, "run.json"), run_definition(cfg, step_years, step_data)
    if not os.path.exists(path):
        files.write_json(path, now)
        return
    try:
        with open(path) as f:
            was = json.load(f)
        check_steps(was, path, step_years)
        differ = changes(was, now, len(was["steps"]), declared)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: {path} is damaged ({type(e).__name__}: {e}); delete it to "
                         f"have it written again from this command") from None
    if differ:
        raise SystemExit(f"error: {run_dir} holds a run of {', '.join(differ)}, as its run.json "
                         f"says; rerun with those, or use a new --out_dir")
    if len(step_years) > len(was["steps"]):  # grown: the new steps' data and settings join it
        files.write_json(path, {**now, "settings": {**was["settings"], **now["settings"]}})


def changes(was: dict, now: dict, steps_then: int, declared: dict) -> list[str]:
    """What differs between two run definitions, each as "--key=old (not new)"; declared: the
    settings' Settings, whose resolve says where two values mean the same."""
    differ = []
    for key, old in was["settings"].items():
        new = now["settings"].get(key, old)  # a setting this program lacks: a file's, not loaded
        resolve = getattr(declared.get(key), "resolve", None)
        if old != new and not (resolve and resolve(old, steps_then) == resolve(new, steps_then)):
            differ.append(f"--{key}={old} (not {new})")
    for key in FILES:
        old, new = was["files"][key], now["files"][key]
        if (old and old[1]) != (new and new[1]):
            said = [f"{f[0]} (sha256 {f[1][:12]})" if f else '""' for f in (old, new)]
            differ.append(f"--{key}={said[0]} (not {said[1]})")
    for year, old in was["data"].items():
        new = now["data"].get(year, old)
        if new != old:
            differ.append(f"{year} data of {old[1]} samples in {old[0]} shards (not {new[1]} in "
                          f"{new[0]})")
    return differ
