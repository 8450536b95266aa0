"""
LwF on replayed data, a strategy from this file alone: training on new data only, as sequential,
plus lwf's distillation term (strategies.distillation_loss) to the frozen previous model, on a
batch of the earlier steps' data drawn at every iteration rather than on the new batch. The new
data teaches; the old data, seen only through the previous model's similarities, holds the model
where the old years are. The replayed batch is drawn at the step's own position (step.draw), so a
killed and resumed run trains on the same batches.

    python examples/replay_distill.py --steps=2018,2019,2020
    python tools/compare.py --module=examples/replay_distill.py --strategies=lwf,replay-distill
"""
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project
import strategies  # noqa: E402
import train  # noqa: E402
from model import CLIP  # noqa: E402
from settings import Setting  # noqa: E402

strategies.SETTINGS["replay_distill_weight"] = Setting(
    1.0, "replay-distill: weight of the distillation term on replayed data",
    lambda w: 0 <= w < math.inf, "0 or more")


class ReplayDistillation:
    """The batch loss. Its compute per sample trained, with one replayed sample for each: the
    teacher's forward pass and the student's forward and backward passes of the replayed batch."""

    def __init__(self, model: CLIP, step: strategies.TimeStep):
        self.student = model
        self.teacher = CLIP(model.cfg)
        self.teacher.load_state_dict(step.previous)
        self.teacher.to(step.device).eval().requires_grad_(False)
        earlier = [part for s in range(step.t) for part in step.step_data[s]]
        self.replay = step.draw(earlier, "replay-distill") if earlier else None
        self.weight = step.config.replay_distill_weight
        self.flops_per_sample = 4 * model.flops_per_pair() if earlier else 0

    def __call__(self, batch: dict, out: dict) -> torch.Tensor:
        if self.replay is None:  # no earlier step (--init's first step): nothing to replay
            return torch.zeros((), device=out["logit_scale"].device)
        old = self.replay.batch()
        with torch.no_grad():
            teacher_out = self.teacher(old["images"], old["tokens"])
        student_out = self.student(old["images"], old["tokens"])
        return self.weight * strategies.distillation_loss(student_out, teacher_out)


strategies.STRATEGIES["replay-distill"] = strategies.Strategy(
    "replay-distill", True, strategies.new_only, batch_loss=ReplayDistillation)

if __name__ == "__main__":
    train.run(["--strategy=replay-distill", *sys.argv[1:]])
