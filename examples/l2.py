"""An L2 pull towards the previous model, a strategy from this file alone (docs/lab.md, exercise 1):
EWC with F = 1. It trains on the new data, as sequential does, adding to every batch's loss

    l2_weight / 2 * sum_i (w_i - w_previous_i)^2

    python examples/l2.py --steps=2018,2019,2020     # as train.py, with --strategy=l2
    python tools/compare.py --module=examples/l2.py --strategies=sequential,l2
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project
import strategies  # noqa: E402
import train  # noqa: E402
from settings import Setting  # noqa: E402

strategies.SETTINGS["l2_weight"] = Setting(0.01, "l2: the pull's weight, lambda",
                                           lambda w: 0 <= w < float("inf"), "0 or more")


class Pull:
    """The batch loss; it reads the weights, so its gradient is one batch's at any accum_steps. Its
    compute, on each process once a batch: a subtraction, a square and a sum a weight, twice."""

    def __init__(self, model, step: strategies.TimeStep):
        self.params = dict(model.named_parameters())
        self.previous = {k: step.previous[k].to(step.device) for k in self.params}
        self.weight = step.config.l2_weight
        self.flops_per_sample = 6 * model.num_params() * step.world.size / step.config.batch_size

    def __call__(self, batch: dict, out: dict):
        return self.weight / 2 * sum(((p - self.previous[k]) ** 2).sum()
                                     for k, p in self.params.items())


strategies.STRATEGIES["l2"] = strategies.Strategy("l2", True, strategies.new_only, batch_loss=Pull)

if __name__ == "__main__":
    train.run(["--strategy=l2", *sys.argv[1:]])  # a --strategy given here comes later and wins
