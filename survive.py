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
- Every checkpoint is verified before it is read (checkpoints.verify_checkpoint): a damaged resume
  checkpoint is set aside and the one before is used.
- A run folder answers for one command: RUN/run.json says what its numbers depend on, and a rerun
  that differs is refused in one line; a second process on a folder in use is refused too.

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

import data
import evaluate
import schedules
import shards
import strategies
from checkpoints import read_verified
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


def run_definition(cfg: SimpleNamespace, step_years: list[list[str]],
                   step_data: list[list[data.Part]]) -> dict:
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
                         step_data: list[list[data.Part]], world) -> None:
    """Refuse, in one line naming what differs, a command whose numbers would differ from those
    its run folder holds, as RUN/run.json (run_definition) says: its steps must begin with the
    run's (check_steps), and its settings, files and data be the same. A setting may change its
    value where its Setting's resolve says it means the same for the steps trained (ar_horizon).
    run.json is written on first use, and again when the run grows by steps (rank 0)."""
    if not world.master:
        return
    path, now = os.path.join(run_dir, "run.json"), run_definition(cfg, step_years, step_data)
    if not os.path.exists(path):
        shards.write_json(path, now)
        return
    try:
        with open(path) as f:
            was = json.load(f)
        check_steps(was, path, step_years)
        differ = changes(was, now, len(was["steps"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: {path} is damaged ({type(e).__name__}: {e}); delete it to "
                         f"have it written again from this command") from None
    if differ:
        raise SystemExit(f"error: {run_dir} holds a run of {', '.join(differ)}, as its run.json "
                         f"says; rerun with those, or use a new --out_dir")
    if len(step_years) > len(was["steps"]):  # grown: the new steps' data and settings join it
        shards.write_json(path, {**now, "settings": {**was["settings"], **now["settings"]}})


def changes(was: dict, now: dict, steps_then: int) -> list[str]:
    """What differs between two run definitions, each as "--key=old (not new)"."""
    declared = {**strategies.SETTINGS, **schedules.SETTINGS}
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
