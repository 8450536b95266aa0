"""
A-GEM (Chaudhry et al. 2019) as a strategy from this file alone: gradient surgery before every
update. From the second step on, the gradient g of each batch of new data is compared with a
reference gradient g_ref, the run's loss's gradient on a batch of the earlier steps' data drawn at
the same iteration (step.draw: all of their data; examples/memory.py caps it). Where they conflict
(g . g_ref < 0), g is projected so that, to first order, the update no longer raises the loss on
the old data:

    g <- g - min(0, g . g_ref) / (g_ref . g_ref) g_ref

step.gradient averages g_ref over the processes, so the update is the same on every one.

    python examples/agem.py --steps=2018,2019,2020     # as train.py, with --strategy=agem
    python tools/compare.py --module=examples/agem.py --strategies=sequential,agem
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project
import strategies  # noqa: E402
import train  # noqa: E402


class Projection:
    """The update: A-GEM's projection. Its compute is a forward and a backward pass of the earlier
    steps' batch, as large as the new one: 3 forward passes per sample trained."""

    def __init__(self, model, step: strategies.TimeStep):
        earlier = [part for s in range(step.t) for part in step.step_data[s]]
        self.memory = step.draw(earlier, "agem") if earlier else None  # none before step 1 (--init)
        self.step = step
        self.flops_per_sample = 3 * model.flops_per_pair() if earlier else 0

    @torch.no_grad()
    def __call__(self, model) -> None:
        if self.memory is None:
            return
        with torch.enable_grad():
            reference = self.step.gradient(model, self.memory.batch())
        params = dict(model.named_parameters())
        dot = sum((p.grad * reference[k]).sum() for k, p in params.items())
        norm = sum((r * r).sum() for r in reference.values())
        coefficient = dot.clamp(max=0) / norm.clamp(min=1e-30)  # 0 where they agree: no host sync
        for k, p in params.items():
            p.grad -= coefficient * reference[k]


strategies.STRATEGIES["agem"] = strategies.Strategy("agem", True, strategies.new_only,
                                                    before_update=Projection)

if __name__ == "__main__":
    train.run(["--strategy=agem", *sys.argv[1:]])  # a --strategy given here comes later and wins
