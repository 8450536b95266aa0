"""
The processes of a run: one under plain python, or torchrun's ranks (RANK, WORLD_SIZE, LOCAL_RANK),
each on its device, with DDP's process group for their collectives; its DataLoader workers; and how
they stop and end. SIGTERM (a cluster's preemption notice) sets a flag that every rank reads at the
same log interval, to save and stop together; a rank whose torchrun died stops as on SIGTERM; an
error is one line on stderr, said by the process that met it, its traceback in
RUN/error-rankN.log. train.py calls start_world once and ends its run with refusal or failure.
"""
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from types import SimpleNamespace

import torch
import torch.distributed as dist

LAUNCHER_GONE_GRACE_S = 30  # a rank whose torchrun died has this long to save and stop


@dataclass
class World:
    """The processes of this run, as one of them sees them."""
    rank: int
    size: int
    distributed: bool     # started by torchrun (DDP, collectives), even with one process
    device: torch.device  # this process's device
    own_group: bool = True  # False: the process group was started before the run, and outlives it

    @property
    def master(self) -> bool:  # rank 0: the one that prints, evaluates and writes
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather(self, obj) -> list:
        """obj from every rank, in rank order: small things, once per log interval at most."""
        if not self.distributed:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def check_same_weights(self, model: torch.nn.Module, where: str) -> None:
        """Refuse, in one line (rank 0's), weights that differ between the processes: DDP keeps
        them equal, so a difference is a hook that changed one process's gradients or weights
        from its own data without an all-reduce. Compares a checksum of every parameter."""
        if not self.distributed:
            return
        with torch.no_grad():
            sums = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()])
                                for p in model.parameters()]).flatten()
        gathered = [torch.empty_like(sums) for _ in range(self.size)]
        dist.all_gather(gathered, sums)
        differ = [r for r in range(1, self.size) if not torch.equal(gathered[r], gathered[0])]
        if differ:
            raise SystemExit(f"error: {where}: the processes hold different weights (rank "
                             f"{differ[0]} differs from rank 0): a strategy's hook changed "
                             f"gradients or weights from one process's data without an "
                             f"all-reduce; see 'the same weights' in strategies.py's recipe"
                             if self.master else 1)

    def mean_over_processes(self, tensors: dict) -> dict:
        """{name: the tensor's mean over the processes}, in one all-reduce; tensors as they are
        with one process."""
        if not self.distributed:
            return tensors
        flat = torch.cat([t.flatten() for t in tensors.values()])
        dist.all_reduce(flat)
        flat /= self.size
        parts = flat.split([t.numel() for t in tensors.values()])
        return {k: part.view_as(t) for (k, t), part in zip(tensors.items(), parts)}

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Rank 0's tensor, in place on every process."""
        if self.distributed:
            dist.broadcast(tensor, 0)

    def stop_requested(self) -> bool:
        """SIGTERM on any rank: every rank stops at the same iteration (one all-gather)."""
        return any(self.gather(sigterm))

    def finish(self) -> None:
        if self.distributed and self.own_group:
            dist.destroy_process_group()


def start_world(cfg: SimpleNamespace) -> World:
    """This process's view of the run's processes, their process group started (or the one its
    caller started, kept at the run's end); from now on SIGTERM asks the run to save and stop
    (World.stop_requested)."""
    signal.signal(signal.SIGTERM, on_sigterm)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.batch_size % world_size:  # checked before any process waits for the others
        raise SystemExit(f"error: batch_size={cfg.batch_size} does not divide over {world_size} "
                         f"processes; use a multiple of {world_size}")
    if cfg.batch_size // world_size % cfg.accum_steps:
        raise SystemExit(f"error: the {cfg.batch_size // world_size} pairs of each process's batch "
                         f"do not split into --accum_steps={cfg.accum_steps} micro-batches; use a "
                         f"batch_size that is a multiple of {world_size * cfg.accum_steps}")
    distributed = "RANK" in os.environ
    own_group = not (distributed and dist.is_initialized())  # else the caller's, used as it is
    if distributed and own_group:  # rank 0 alone evaluates while the others wait: > 10 min
        dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo",
                                timeout=timedelta(hours=2))
    rank, local_rank = (dist.get_rank(), int(os.environ["LOCAL_RANK"])) if distributed else (0, 0)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun, then this process's parent
        watch_launcher(local_rank)
    device = torch.device(f"cuda:{local_rank}" if cfg.device == "cuda" else cfg.device)
    world = World(rank, world_size, distributed, device, own_group)
    if world.device.type == "cuda":
        torch.cuda.set_device(world.device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return world


def watch_launcher(local_rank: int) -> None:
    """When torchrun dies alone (killed), its ranks live on, holding their GPUs: each then stops as
    on SIGTERM (saving at its next log interval), and ends itself LAUNCHER_GONE_GRACE_S later if it
    has not stopped by then. This, not the process-group timeout, bounds the wait; that timeout
    stays long, as rank 0 alone evaluates while the others wait."""
    launcher = os.getppid()

    def watch():
        while os.getppid() == launcher:  # an orphan passes to another parent (init, a subreaper)
            time.sleep(1)
        if local_rank == 0:
            print(f"torchrun (pid {launcher}) is gone: the run stops as on SIGTERM, within "
                  f"{LAUNCHER_GONE_GRACE_S}s", file=sys.stderr)
        on_sigterm(signal.SIGTERM, None)
        time.sleep(LAUNCHER_GONE_GRACE_S)
        os._exit(1)
    threading.Thread(target=watch, name="watch_launcher", daemon=True).start()


def refusal(e: SystemExit) -> SystemExit:
    """A one-line refusal of bad input, said once: before the processes meet, every one refuses
    the same settings and files, and local rank 0 of each node says it."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if isinstance(e.code, str) and local_rank > 0 and not dist.is_initialized():
        return SystemExit(1)
    return e


def failure(e: Exception, program: str, argv: list[str], run_dir: str) -> SystemExit:
    """An unexpected error (a bug, an exception in a DataLoader worker, a full disk) as one line
    and a non-zero exit; its traceback goes to RUN/error-rankN.log, named in the line. A rank whose
    collective failed because another rank exited says nothing: that one said why."""
    path = os.path.join(run_dir, f"error-rank{os.environ.get('RANK', 0)}.log")
    try:
        with open(path, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {program} {' '.join(argv)}\n"
                    f"{traceback.format_exc()}\n")
    except OSError:  # the run folder itself is the problem: the traceback goes to stderr
        traceback.print_exc()
        path = "above"
    if dist.is_initialized() and peer_exited(e):
        return SystemExit(1)
    lines = [line for line in str(e).splitlines() if line.strip()] or [""]
    what = lines[-1] if lines[-1].startswith(type(e).__name__) \
        else f"{type(e).__name__}: {lines[-1]}"
    where = " in a DataLoader worker" if "DataLoader worker" in lines[0] else ""
    return SystemExit(f"error{where}: {what} (traceback in {path})")


def peer_exited(e: Exception) -> bool:
    """Did a collective fail because another rank's process exited? (gloo's words for it; NCCL
    waits, and torchrun ends the waiting ranks once one has failed)"""
    return any(said in str(e) for said in ("Connection closed by peer", "Connection reset by peer"))


# ----------------------------------------------------------------------------- gathered features
class _GatherWithGrad(torch.autograd.Function):
    """All processes' x, concatenated; backward sends each process the gradient of its own x, summed
    over the processes that used it."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[local, ...] features of every process -> [global, ...], in rank order, with gradients: the
    gradient of a gathered copy flows back to the process that made it."""
    return _GatherWithGrad.apply(x)


# ----------------------------------------------------------------------------- stopping when asked
sigterm = False  # set by a preemption notice; acted on at the next log interval


def on_sigterm(signum, frame) -> None:
    global sigterm
    sigterm = True


def check_device(name: str) -> None:
    """Refuse in one line a --device that is not one, or that this machine lacks."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: --device={name} is not a device; use cpu or cuda") from None
    usable = device.type == "cpu" or device.type == "cuda" and torch.cuda.is_available()
    if not usable:
        here = "CUDA is" if torch.cuda.is_available() else "no GPU is"
        raise SystemExit(f"error: --device={name} cannot be used here ({here} visible); "
                         f"use --device=cpu or cuda")


# ----------------------------------------------------------------------------- loader workers
def loader_worker_init(worker: int) -> None:
    """A DataLoader worker ignores SIGTERM, which reaches every process of a node: it goes on until
    the main process has saved and stops it (or dies: then it exits by itself)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextmanager
def workers_stopped():
    """However the batches' loop ends (an exception in a worker, an error in the main process), no
    DataLoader worker outlives it: workers ignore SIGTERM, so one left alive would hold the process
    at its exit forever. They are killed: they hold nothing worth saving."""
    try:
        yield
    finally:
        for worker in multiprocessing.active_children():
            worker.kill()
            worker.join()
