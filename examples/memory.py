"""
Experience replay from a memory of at most memory_samples pairs, a strategy from this file alone:
each step trains on its new data and on a memory of the earlier steps' data capped at M pairs in
all, split equally over the earlier steps (M // t each, the first M % t one more). Exactly: a step
keeps its k samples of lowest hash (data.smallest_hashes, the hash that replay buffers use), so
the memory stays nested as k shrinks (a sample dropped never returns) and is the same on every
process. Each step's lowest M + 1 hashes are read once, when the step after it starts (the samples
read are in that step's record), and kept in the strategy's state, so a resumed or grown run does
not read them again.

    python examples/memory.py --steps=2018,2019,2020 --memory_samples=2000
    python tools/compare.py --module=examples/memory.py --strategies=cumulative-all,memory
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project
import strategies  # noqa: E402
import train  # noqa: E402
from settings import Setting  # noqa: E402

strategies.SETTINGS["memory_samples"] = Setting(2000, "memory: pairs of earlier steps kept, M",
                                                lambda m: m >= 1, "1 or more")


def quotas(m: int, t: int) -> list[int]:
    """M split over the t earlier steps: M // t each, the first M % t one more."""
    return [m // t + (s < m % t) for s in range(t)]


def fill(model, step: strategies.TimeStep) -> dict:
    """The start-of-step action: the lowest hashes of the step that just ended (read now), and each
    earlier step's keep fraction: its (k+1)-th lowest hash, which keeps its k lowest."""
    m, kept, read = step.config.memory_samples, dict(step.state.get("hashes", {})), 0
    for s in range(step.t):
        if s not in kept:
            hashes, n = step.smallest_hashes(step.step_data[s], m + 1)
            kept[s], read = torch.tensor(hashes, dtype=torch.float64), read + n
    fractions = {s: float(kept[s][k]) if k < len(kept[s]) else 1.0
                 for s, k in enumerate(quotas(m, step.t))}
    return {"flops": 0, "samples_read": read, "state": {"hashes": kept, "memory": fractions}}


def memory_replay(step: strategies.TimeStep) -> dict[int, float]:
    """The new data, all of it, and the memory."""
    return {**step.state.get("memory", {}), step.t: 1.0}


strategies.STRATEGIES["memory"] = strategies.Strategy("memory", True, memory_replay,
                                                      start_of_step=fill)

if __name__ == "__main__":
    train.run(["--strategy=memory", *sys.argv[1:]])
