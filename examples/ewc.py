"""
EWC (Kirkpatrick et al. 2017) as a strategy of its own, added from this file alone: the worked
exercise of the recipe at the top of strategies.py. From the second step on, it pulls the weights
that mattered for earlier steps back towards the previous model, training on the new data with the
contrastive loss plus

    ewc_weight / 2 * sum_i F_i (w_i - w_previous_i)^2

where F is the previous model's diagonal Fisher information. It is estimated at the start of each
step on ewc_batches batches of the step before's data, and added to the Fisher of earlier steps
decayed by ewc_decay (online EWC, Schwarz et al. 2018). That sum is the strategy's state: train.py
saves it with every step and hands it back at the next.

    python examples/ewc.py --steps=2018,2019,2020     # as train.py, with --strategy=ewc
    python tools/compare.py --module=examples/ewc.py --strategies=sequential,ewc
"""
import itertools
import math
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project
import data  # noqa: E402
import strategies  # noqa: E402
import train  # noqa: E402
from model import CLIP, autocast, clip_loss  # noqa: E402
from settings import Setting  # noqa: E402

strategies.SETTINGS["ewc_weight"] = Setting(1e3, "ewc: the penalty's weight, lambda",
                                            lambda w: 0 <= w < math.inf, "0 or more")
strategies.SETTINGS["ewc_batches"] = Setting(8, "ewc: batches of the step before's data for F",
                                             lambda n: n >= 1, "1 or more")
strategies.SETTINGS["ewc_decay"] = Setting(1.0, "ewc: the share of earlier steps' F kept",
                                           lambda g: 0 <= g <= 1, "a fraction, 0 to 1")


def fisher(model: CLIP, step: strategies.TimeStep) -> dict:
    """The start-of-step action: the previous model's diagonal Fisher, the squared gradient of the
    contrastive loss averaged over ewc_batches batches of the step before's data, plus ewc_decay x
    the Fisher kept from earlier steps. The gradient is squared per micro-batch (the loss does not
    split into per-sample terms), each process takes its share of every batch, and the sum goes
    to all of them, so the state is the same on every process."""
    cfg = step.config
    previous = CLIP(model.cfg).to(step.device)
    previous.load_state_dict(step.previous)
    source = max(step.t - 1, 0)  # with --init, the first step has no step before: its own data
    stream = step.stream(step.step_data[source], cfg.batch_size)  # this process's share
    new = {k: torch.zeros_like(p) for k, p in previous.named_parameters()}
    micro_batches = cfg.ewc_batches * cfg.accum_steps * step.world.size  # each at training's memory
    for images, tokens, _ in itertools.islice(stream.batches(0, 1), cfg.ewc_batches):
        if images is None:
            raise SystemExit(f"error: ewc: too much bad data in step {source + 1}'s shards")
        images, tokens = data.normalize_images(images.to(step.device)), tokens.to(step.device)
        for x, y in zip(images.chunk(cfg.accum_steps), tokens.chunk(cfg.accum_steps)):
            previous.zero_grad(set_to_none=True)
            with autocast(step.device, cfg.precision):
                loss = clip_loss(**previous(x, y))
            loss.backward()
            for k, p in previous.named_parameters():
                new[k] += p.grad.float() ** 2 / micro_batches
    if step.distributed:
        for f in new.values():
            dist.all_reduce(f)
    kept = step.state.get("fisher", {})
    total = {k: cfg.ewc_decay * kept[k].to(step.device) + f if k in kept else f
             for k, f in new.items()}
    flops = cfg.ewc_batches * cfg.batch_size * 3 * previous.flops_per_pair()  # of all processes
    mean = sum(float(f.sum()) for f in new.values()) / previous.num_params()
    return {"flops": flops, "fisher_mean": mean, "state": {"fisher": total}}


class Penalty:
    """The batch loss: ewc_weight / 2 x sum F (w - w_previous)^2 over the parameters. It reads the
    weights directly; train.py calls it once a batch, so its gradient is one batch's at any
    accum_steps."""

    def __init__(self, model: CLIP, step: strategies.TimeStep):
        self.params = dict(model.named_parameters())
        self.previous = {k: step.previous[k].to(step.device) for k in self.params}
        self.fisher = {k: step.state["fisher"][k].to(step.device) for k in self.params}
        self.weight = step.config.ewc_weight
        # a subtraction, a square, a product and a sum per weight, and about as much backward, on
        # each process once a batch
        self.flops_per_sample = 8 * model.num_params() * step.world.size / step.config.batch_size

    def __call__(self, batch: dict, out: dict) -> torch.Tensor:
        return self.weight / 2 * sum((self.fisher[k] * (p - self.previous[k]) ** 2).sum()
                                     for k, p in self.params.items())


strategies.STRATEGIES["ewc"] = strategies.Strategy("ewc", True, strategies.new_only,
                                                   start_of_step=fisher, batch_loss=Penalty)

if __name__ == "__main__":
    train.run(["--strategy=ewc", *sys.argv[1:]])  # a --strategy given here comes later and wins
