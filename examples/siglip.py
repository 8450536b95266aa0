"""
SigLIP's sigmoid loss (Zhai et al. 2023) as a loss from this file alone: every image-text pair of
the batch is a binary question, match or not, with a learned temperature t and bias b:

    loss = -1/B sum_i sum_j log sigmoid(z_ij (t x_i . y_j + b)),   z_ij = 1 if i = j else -1

Its row of model.LOSSES gives the model a learned logit_bias (init -10, scale log 10, as SigLIP's);
the contrastive loss is clip's row. Under torchrun each process takes its images against every
process's texts (gathered with their gradients), so the loss averaged over processes is the one of
the whole batch; with --accum_steps gradient caching passes the bias's gradient back as the
scale's (model.forward_backward). Every strategy works with it; export writes the bias as
open_clip's (init_logit_bias).

    python examples/siglip.py --steps=2018,2019,2020      # as train.py, with --loss=siglip
    python tools/compare.py --module=examples/siglip.py --strategies=sequential,cumulative-all
"""
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project
import model  # noqa: E402
import train  # noqa: E402
from world import gather_with_grad  # noqa: E402


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: torch.Tensor, rank: int = 0,
                world_size: int = 1) -> torch.Tensor:
    """The sigmoid loss of this process's images against all texts, over this process's batch."""
    texts = gather_with_grad(text_features) if world_size > 1 else text_features
    logits = (logit_scale * image_features @ texts.T + logit_bias).float()  # [local, global]
    local = image_features.shape[0]
    rows = torch.arange(local, device=logits.device)
    signs = -torch.ones_like(logits)
    signs[rows, rows + rank * local] = 1  # each image's own caption, in the gathered columns
    return -F.logsigmoid(signs * logits).sum() / local


model.LOSSES["siglip"] = model.Loss(siglip_loss, init_logit_scale=math.log(10),
                                    init_logit_bias=-10.0)

if __name__ == "__main__":
    train.run(["--loss=siglip", *sys.argv[1:]])  # a --loss given here comes later and wins
