"""
WiSE-FT (Wortsman et al. 2022) through time, a strategy from this file alone: each step trains on
its new data from the trained model of the step before, as sequential does, and deploys the
weight-space ensemble of the run's first model (the anchor: --init's, else what step 1 deployed)
and the trained one,

    deployed = (1 - wiseft_alpha) anchor + wiseft_alpha trained

The next step goes on from the trained model, not from the ensemble.

    python examples/wiseft.py --steps=2018,2019,2020 --wiseft_alpha=0.5
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project
import strategies  # noqa: E402
import train  # noqa: E402
from settings import Setting  # noqa: E402

strategies.SETTINGS["wiseft_alpha"] = Setting(0.5, "wiseft: the trained model's weight, a",
                                              lambda a: 0 <= a <= 1, "a weight from 0 to 1")


def ensemble(model, step: strategies.TimeStep) -> dict:
    """The end-of-step action: set model to the ensemble; a multiply-add per parameter."""
    anchor = {k: v.to(step.device) for k, v in step.anchor.items()}
    model.load_state_dict(strategies.interpolate(anchor, model.state_dict(),
                                                 step.config.wiseft_alpha))
    return {"wiseft_alpha": step.config.wiseft_alpha,
            "flops": 2 * sum(p.numel() for p in model.parameters())}


strategies.STRATEGIES["wiseft"] = strategies.Strategy("wiseft", True, strategies.new_only,
                                                      end_of_step=ensemble,
                                                      continue_from_deployed=False)

if __name__ == "__main__":
    train.run(["--strategy=wiseft", *sys.argv[1:]])
