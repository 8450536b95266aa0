"""
CLIP (Radford et al. 2021) as TiC-CLIP trains it: a ViT image tower, a causal Transformer text
tower, a learned temperature, and the symmetric contrastive loss, on one GPU or gathered over N.

    from model import CLIP, clip_loss, make_config
    model = CLIP(make_config("tiny"))                 # or "ViT-B-16", as in the paper
    out = model(images, tokens)       # [B,3,H,W], [B,T] token ids -> named outputs
    loss = clip_loss(**out, rank=rank, world_size=world_size)

The loss is a row of LOSSES (clip_loss; SigLIP's is added from examples/siglip.py), and
forward_backward gives a batch's gradients in micro-batches at the memory of one (gradient caching).

Follows OpenCLIP (mlfoundations/open_clip) for the CLIP details: its shapes and initialisation,
pooling at the end-of-text token, the logit scale from 1/0.07 clamped at 100, and the local loss
with gathered features. The image tower is timm's VisionTransformer set up as CLIP's; the text
tower is written out here, nanoGPT style, in OpenCLIP's parameter layout, so that OpenCLIP and
OpenAI checkpoints load onto it name by name (checkpoints.py).
"""
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from world import gather_with_grad


@dataclass
class CLIPConfig:
    # image tower (a ViT)
    image_px: int = 32              # input images are image_px x image_px
    patch_px: int = 8               # each patch token covers patch_px x patch_px pixels
    vision_width: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    # text tower (a causal Transformer)
    text_width: int = 128
    text_layers: int = 3
    text_heads: int = 4
    context_tokens: int = 24        # per caption, with end-of-text and padding (synthetic: <= 23)
    vocab_size: int = 1024
    # shared
    embed_dim: int = 128            # the joint image-text embedding
    mlp_ratio: float = 4.0          # MLP hidden width = mlp_ratio x width, in both towers
    quick_gelu: bool = False        # OpenAI's checkpoints use QuickGELU, OpenCLIP's GELU
    eot_token_id: int = 2           # the text tower pools at the first position holding this id
    text_pool: str = "eot"          # or "last": the last position (open_clip's pool_type "last")
    text_causal: bool = True        # False: no causal mask (open_clip's no_causal_mask)
    # the loss's learned scalars (a row of LOSSES sets them): the logit scale, in log space, and a
    # bias added to the logits (SigLIP's; None: the model has none), as open_clip's CLIP has them
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None

    def __post_init__(self):
        if self.image_px % self.patch_px:
            raise ValueError(f"image_px={self.image_px} is not a multiple of "
                             f"patch_px={self.patch_px}")
        for tower in ("vision", "text"):
            width, heads = getattr(self, f"{tower}_width"), getattr(self, f"{tower}_heads")
            if width % heads:
                raise ValueError(f"{tower}_width={width} is not a multiple of "
                                 f"{tower}_heads={heads}")
        if self.text_pool not in ("eot", "last"):
            raise ValueError(f"text_pool={self.text_pool!r}: use eot or last")


_VIT_B = dict(image_px=224, vision_width=768, vision_layers=12, vision_heads=12, text_width=512,
              text_layers=12, text_heads=8, context_tokens=77, vocab_size=49408, embed_dim=512,
              eot_token_id=49407)
PRESETS: dict[str, dict] = {
    # the CLIPConfig defaults: learns the 32 px synthetic benchmark on a laptop CPU in minutes
    "tiny": {},
    # OpenCLIP's shapes; 49407 is <|endoftext|> in CLIP's BPE vocabulary
    "ViT-S-16": dict(image_px=224, patch_px=16, vision_width=384, vision_layers=12, vision_heads=6,
                     text_width=384, text_layers=12, text_heads=6, context_tokens=77,
                     vocab_size=49408, embed_dim=384, eot_token_id=49407),
    "ViT-B-32": dict(_VIT_B, patch_px=32),  # the released TiC code's, at DataComp medium scale
    "ViT-B-16": dict(_VIT_B, patch_px=16),  # the paper's: 149.6M parameters, ~41 GFLOPs a pair
}


def make_config(name: str, **overrides) -> CLIPConfig:
    """The preset called name, with some fields replaced (e.g. vocab_size, to fit the tokenizer)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return CLIPConfig(**{**PRESETS[name], **overrides})


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


# ----------------------------------------------------------------------------- text tower

class CausalSelfAttention(nn.Module):

    def __init__(self, width: int, heads: int, causal: bool = True):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.in_proj = nn.Linear(width, 3 * width)  # q, k, v stacked, as OpenCLIP's in_proj_weight
        self.out_proj = nn.Linear(width, width)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.in_proj(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        # causal, as CLIP (text_causal): the padding after end-of-text cannot change the pooled one
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):

    def __init__(self, width: int, hidden: int, act: type[nn.Module]):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.act = act()
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LN residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, hidden: int, act: type[nn.Module],
                 causal: bool = True):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, causal)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, hidden, act)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


# ----------------------------------------------------------------------------- CLIP

class CLIP(nn.Module):

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        act = QuickGELU if cfg.quick_gelu else nn.GELU
        # image tower: timm's ViT as CLIP's: pre_norm is ln_pre (no patch bias), final_norm ln_post
        # nn.LayerNorm for OpenCLIP's eps 1e-5 (timm's is 1e-6); num_classes=0: no head. Imported
        # here: timm takes 2 s to import, which a refused command line need not wait for
        from timm.models.vision_transformer import VisionTransformer
        self.visual = VisionTransformer(
            img_size=cfg.image_px, patch_size=cfg.patch_px, embed_dim=cfg.vision_width,
            depth=cfg.vision_layers, num_heads=cfg.vision_heads, mlp_ratio=cfg.mlp_ratio,
            class_token=True, global_pool="token", pre_norm=True, final_norm=True, num_classes=0,
            norm_layer=nn.LayerNorm, act_layer=act)
        self.visual_proj = nn.Linear(cfg.vision_width, cfg.embed_dim, bias=False)
        # text tower
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_tokens, cfg.text_width))
        hidden = int(cfg.text_width * cfg.mlp_ratio)
        self.text_blocks = nn.ModuleList(Block(cfg.text_width, cfg.text_heads, hidden, act,
                                               cfg.text_causal) for _ in range(cfg.text_layers))
        self.ln_final = nn.LayerNorm(cfg.text_width)
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)
        # the softmax temperature, learned in log space so it stays positive
        self.logit_scale = nn.Parameter(torch.empty(()))
        self.logit_bias = nn.Parameter(torch.empty(())) if cfg.init_logit_bias is not None else None
        self.grad_checkpointing = False  # see set_grad_checkpointing
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """How every parameter starts: OpenCLIP's initialisation, in both towers."""
        cfg = self.cfg
        # vision as OpenCLIP's ViT: class token and positions N(0, width^-0.5), not timm's 0.02,
        # so quadrants differ from the start (docs/results.md, "Why the defaults are what they are")
        for m in self.visual.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm)):
                m.reset_parameters()
        for block in self.visual.blocks:
            nn.init.xavier_uniform_(block.attn.qkv.weight)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.zeros_(block.attn.proj.bias)
        nn.init.normal_(self.visual.cls_token, std=cfg.vision_width ** -0.5)
        nn.init.normal_(self.visual.pos_embed, std=cfg.vision_width ** -0.5)
        nn.init.normal_(self.visual_proj.weight, std=cfg.vision_width ** -0.5)
        # text: weights by fan-in; the residual projections shrunk by (2 x layers)^-0.5 (GPT-2's)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = cfg.text_width, cfg.text_layers
        attn_std, fc_std, proj_std = (width ** -0.5, (2 * width) ** -0.5,
                                      width ** -0.5 * (2 * layers) ** -0.5)
        for block in self.text_blocks:
            nn.init.normal_(block.attn.in_proj.weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
            for linear in (block.attn.in_proj, block.attn.out_proj, block.mlp.c_fc,
                           block.mlp.c_proj):
                nn.init.zeros_(linear.bias)
        for ln in [self.ln_final, *(m for b in self.text_blocks for m in (b.ln_1, b.ln_2))]:
            ln.reset_parameters()  # weight 1, bias 0
        nn.init.normal_(self.text_proj.weight, std=width ** -0.5)
        # temperature 0.07, as CLIP (the default init_logit_scale)
        self.logit_scale.fill_(cfg.init_logit_scale)
        if self.logit_bias is not None:
            self.logit_bias.fill_(cfg.init_logit_bias)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, image_px, image_px] -> [B, embed_dim], not normalised."""
        return self.visual_proj(self.visual(images))  # timm gives the normed class token

    def text_hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids, T <= context_tokens -> [B, T, text_width] after the final LayerNorm."""
        x = self.token_embedding(tokens) + self.positional_embedding[:tokens.shape[1]]
        for block in self.text_blocks:
            x = (checkpoint(block, x, use_reentrant=False)
                 if self.grad_checkpointing and self.training else block(x))
        return self.ln_final(x)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids -> [B, embed_dim], not normalised: the hidden state at the first
        end-of-text token, or at the last token of a caption cut before it (text_pool "last":
        always at the last token)."""
        x = self.text_hidden_states(tokens)
        if self.cfg.text_pool == "last":
            return self.text_proj(x[:, -1])
        # not OpenCLIP's argmax, which needs eot to be the largest id
        is_eot = tokens == self.cfg.eot_token_id
        eot_pos = torch.where(is_eot.any(dim=1), is_eot.int().argmax(dim=1), tokens.shape[1] - 1)
        return self.text_proj(x[torch.arange(x.shape[0], device=x.device), eot_pos])

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """The named outputs a loss reads: image_features and text_features, each L2-normalised
        [B, embed_dim], the scale exp(logit_scale), and logit_bias where the model has one."""
        out = {"image_features": F.normalize(self.encode_image(images), dim=-1),
               "text_features": F.normalize(self.encode_text(tokens), dim=-1),
               "logit_scale": self.logit_scale.exp()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing in both towers: each block is recomputed in the backward pass,
        one more forward of compute for a larger batch per GPU (tools/bench.py memory)."""
        self.grad_checkpointing = enable
        self.visual.set_grad_checkpointing(enable)  # timm's switch for the image tower

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_pair(self) -> int:
        """Forward FLOPs (2 x multiply-adds) of one image and one caption: the matmuls and the
        patch conv.

        A transformer layer on n tokens of width w with MLP hidden width h costs
            2n(3w^2 + w^2)   q,k,v and output projections
          + 2n(2wh)          the MLP's two Linears
          + 2(2n^2 w)        scores q k^T and their weighted sum of v (all heads together)
        The image tower adds its patch conv 2 n_patches (3 p^2) w over n = n_patches + 1 tokens;
        each tower adds its projection 2 w embed_dim on the pooled token. The text tower runs on all
        context_tokens with the full n^2 attention (the causal mask saves no work in the math
        kernel; flash kernels skip about half of it). Embedding lookups, norms, activations, softmax
        and the loss are left out, as in OpenCLIP's profile. For ViT-B-16 at 224 px:
        35.1G image + 6.0G text = 41.1 GFLOPs.
        """
        cfg = self.cfg

        def tower(n_tokens: int, width: int, layers: int) -> int:
            hidden = int(width * cfg.mlp_ratio)
            per_layer = (2 * n_tokens * (4 * width * width + 2 * width * hidden)
                         + 4 * n_tokens * n_tokens * width)
            return layers * per_layer + 2 * width * cfg.embed_dim

        n_patches = (cfg.image_px // cfg.patch_px) ** 2
        patch_embed = 2 * n_patches * 3 * cfg.patch_px ** 2 * cfg.vision_width
        image = patch_embed + tower(n_patches + 1, cfg.vision_width, cfg.vision_layers)
        text = tower(cfg.context_tokens, cfg.text_width, cfg.text_layers)
        return image + text

    def configure_optimizer(self, lr: float, weight_decay: float = 0.2, betas=(0.9, 0.98),
                            eps: float = 1e-6, fused: bool | None = None) -> torch.optim.AdamW:
        """AdamW with weight decay on the weight matrices of Linear and conv layers only.

        Biases, norms, the embeddings (token, positional, class token, ViT pos_embed) and the logit
        scale are not decayed: pulling them to zero does not regularise, it only shifts them
        (DataComp's recipe).
        """
        decayed = {f"{name}.weight" for name, m in self.named_modules()
                   if isinstance(m, (nn.Linear, nn.Conv2d))}
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        decay = [p for n, p in params.items() if n in decayed and p.dim() >= 2]
        no_decay = [p for n, p in params.items() if not (n in decayed and p.dim() >= 2)]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        if fused is None:
            fused = all(p.is_cuda for p in params.values())  # one kernel an update; CUDA only
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the scale to [1, 100] (CLIP's cap: the temperature must not collapse); call after
        every optimizer step."""
        self.logit_scale.clamp_(0, math.log(100))


def autocast(device: torch.device, precision: str | None = None):
    """The context a forward pass runs in: bf16 autocast for precision "bf16", nothing for "fp32";
    None chooses bf16 on CUDA, fp32 elsewhere. Weights, gradients and optimizer state stay fp32."""
    precision = precision or ("bf16" if device.type == "cuda" else "fp32")
    return (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
            else nullcontext())


PRECISIONS = ("bf16", "fp32")


# ----------------------------------------------------------------------------- loss

def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
              rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Symmetric cross-entropy over image-text similarities; pair i is the positive of row i.

    With world_size > 1 each process gathers every process's features WITH their gradients and
    computes only its own rows: its images against all texts and its texts against all images,
    [local, global] logits instead of [global, global], so memory grows linearly with the global
    batch. All processes must have the same local batch. The gradient of each gathered feature
    flows back to the process that made it, so after DDP averages the gradients over processes they
    equal those of the single-process loss on the global batch, as does the loss averaged over
    processes.
    """
    if world_size > 1:
        all_images, all_texts = gather_with_grad(image_features), gather_with_grad(text_features)
    else:
        all_images, all_texts = image_features, text_features
    logits_per_image = logit_scale * image_features @ all_texts.T   # [local, global]
    logits_per_text = logit_scale * text_features @ all_images.T    # [local, global]
    local = image_features.shape[0]
    labels = torch.arange(local, device=image_features.device) + rank * local  # our global rows
    return (F.cross_entropy(logits_per_image, labels)
            + F.cross_entropy(logits_per_text, labels)) / 2


@dataclass(frozen=True)
class Loss:
    """A training loss, a row of LOSSES: fn(**outputs, rank=, world_size=) -> a scalar, where
    outputs are CLIP.forward's by name, and the initial values of the learned scalars it reads
    (CLIPConfig.init_logit_scale and init_logit_bias; a bias of None: the model has none)."""
    fn: Callable[..., torch.Tensor]
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None


LOSSES = {"clip": Loss(clip_loss)}  # train.py's --loss; examples/siglip.py adds "siglip"


def forward_backward(model, images: torch.Tensor, tokens: torch.Tensor,
                     loss_of: Callable[[dict], torch.Tensor], accum_steps: int = 1,
                     precision: str | None = None) -> torch.Tensor:
    """The loss of a batch, loss_of(outputs) of the model's named outputs on it; its gradients are
    added to the parameters' .grad. model may be wrapped (torch.compile, DDP).

    Gradient caching (Gao et al. 2021): with accum_steps = k the batch goes through in k
    micro-batches, at the memory of one, to the same loss and gradients up to rounding. Embed every
    micro-batch without gradients; take the whole batch's loss once on those outputs, which gives
    its gradient with respect to each per-sample output (the features) and each scalar one (the
    logit scale, a bias), and to the weights, for a loss that reads them; then embed each
    micro-batch again with gradients, and pass its outputs' gradients back through the model. Under
    DDP only the last pass all-reduces, and the scalars' gradients go back once, with it."""
    device = images.device
    if accum_steps == 1:
        with autocast(device, precision):
            loss = loss_of(model(images, tokens))
        loss.backward()
        return loss
    micro = list(zip(images.chunk(accum_steps), tokens.chunk(accum_steps)))
    with torch.no_grad(), autocast(device, precision):
        stored = [model(x, y) for x, y in micro]
    # per-sample outputs are joined over the micro-batches; a scalar is the same in each
    cached = {k: (v.detach() if v.dim() == 0 else torch.cat([out[k] for out in stored]))
              .requires_grad_() for k, v in stored[0].items()}
    with autocast(device, precision):
        loss = loss_of(cached)
    loss.backward()  # into the outputs' .grad, and weights a loss reads directly
    used = [k for k, v in cached.items() if v.grad is not None]
    grads = {k: cached[k].grad.chunk(accum_steps) for k in used if cached[k].dim() > 0}
    for j, (x, y) in enumerate(micro):
        last = j == accum_steps - 1
        with nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            with autocast(device, precision):
                out = model(x, y)
            keys = [k for k in used if k in grads or last]  # a scalar's gradient goes back once
            torch.autograd.backward([out[k] for k in keys],
                                    [grads[k][j] if k in grads else cached[k].grad for k in keys])
    return loss.detach()
