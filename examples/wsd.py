"""
A warmup-stable-decay schedule with a linear cooldown, added from this file alone: the worked
exercise of the recipe at the top of schedules.py. One warmup, then a constant rate; the last
cooldown_fraction of each step's iterations decay linearly to 0 on a cooled branch, which is
deployed, while the next step goes on from the trunk with the optimizer carried over. It is
const-cooldown with another cooldown: that one decays as 1 - sqrt.

    python examples/wsd.py --steps=2018,2019,2020     # as train.py, with --lr_schedule=wsd
    python tools/compare.py --module=examples/wsd.py --strategies=sequential \
        --schedules=const-cooldown,wsd
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project
import schedules  # noqa: E402
import train  # noqa: E402


def linear(progress: float) -> float:
    """The cooled branch's factor on the trunk's rate at progress 0 <= p < 1 through it."""
    return 1 - progress


schedules.SCHEDULES["wsd"] = schedules.Schedule("wsd", schedules.constant, carries_optimizer=True,
                                                cooldown=linear)

if __name__ == "__main__":
    train.run(["--lr_schedule=wsd", *sys.argv[1:]])  # a --lr_schedule given here wins
