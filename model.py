"""
CLIP (Radford et al. 2021) as TiC-CLIP trains it: a ViT image tower, a causal Transformer text
tower, a learned temperature, and the symmetric contrastive loss, on one GPU or gathered over N.

    from model import CLIP, clip_loss, make_config
    model = CLIP(make_config("tiny"))                 # or "ViT-B-16", as in the paper
    image_features, text_features, scale = model(images, tokens)  # [B,3,H,W], [B,T] token ids
    loss = clip_loss(image_features, text_features, scale, rank, world_size)

Follows OpenCLIP (mlfoundations/open_clip) for the CLIP details: its shapes and initialisation,
pooling at the end-of-text token, the logit scale from 1/0.07 clamped at 100, and the local loss
with gathered features. The image tower is timm's VisionTransformer set up as CLIP's; the text
tower is written out here, nanoGPT style, in OpenCLIP's parameter layout, so that OpenCLIP and
OpenAI checkpoints load onto it name by name (load_checkpoint).
"""
import json
import math
import os
import pickle
import zipfile
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from timm.models.vision_transformer import VisionTransformer


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

    def __post_init__(self):
        if self.image_px % self.patch_px:
            raise ValueError(f"image_px={self.image_px} is not a multiple of "
                             f"patch_px={self.patch_px}")
        for tower in ("vision", "text"):
            width, heads = getattr(self, f"{tower}_width"), getattr(self, f"{tower}_heads")
            if width % heads:
                raise ValueError(f"{tower}_width={width} is not a multiple of "
                                 f"{tower}_heads={heads}")


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

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)  # q, k, v stacked, as OpenCLIP's in_proj_weight
        self.out_proj = nn.Linear(width, width)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.in_proj(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        # causal, as CLIP: the padding after end-of-text cannot change the pooled feature
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
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

    def __init__(self, width: int, heads: int, hidden: int, act: type[nn.Module]):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
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
        # nn.LayerNorm for OpenCLIP's eps 1e-5 (timm's is 1e-6); num_classes=0: no head
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
        self.text_blocks = nn.ModuleList(Block(cfg.text_width, cfg.text_heads, hidden, act)
                                         for _ in range(cfg.text_layers))
        self.ln_final = nn.LayerNorm(cfg.text_width)
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)
        # the softmax temperature, learned in log space so it stays positive
        self.logit_scale = nn.Parameter(torch.empty(()))
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
        # temperature 0.07, as CLIP
        self.logit_scale.fill_(math.log(1 / 0.07))

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
        end-of-text token, or at the last token of a caption cut before it."""
        x = self.text_hidden_states(tokens)
        # not OpenCLIP's argmax, which needs eot to be the largest id
        is_eot = tokens == self.cfg.eot_token_id
        eot_pos = torch.where(is_eot.any(dim=1), is_eot.int().argmax(dim=1), tokens.shape[1] - 1)
        return self.text_proj(x[torch.arange(x.shape[0], device=x.device), eot_pos])

    def forward(self, images: torch.Tensor,
                tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image features, text features), each L2-normalised [B, embed_dim], and the scale
        exp(logit_scale)."""
        image_features = F.normalize(self.encode_image(images), dim=-1)
        text_features = F.normalize(self.encode_text(tokens), dim=-1)
        return image_features, text_features, self.logit_scale.exp()

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
        all_images = torch.cat(dist_nn.all_gather(image_features))
        all_texts = torch.cat(dist_nn.all_gather(text_features))
    else:
        all_images, all_texts = image_features, text_features
    logits_per_image = logit_scale * image_features @ all_texts.T   # [local, global]
    logits_per_text = logit_scale * text_features @ all_images.T    # [local, global]
    local = image_features.shape[0]
    labels = torch.arange(local, device=image_features.device) + rank * local  # our global rows
    return (F.cross_entropy(logits_per_image, labels)
            + F.cross_entropy(logits_per_text, labels)) / 2


# ----------------------------------------------------------------------------- OpenCLIP and OpenAI
# OpenCLIP keeps OpenAI's parameter names, so one key map reads both. A residual block's keys, as
# (OpenCLIP's name, our text tower's name, timm's name in our image tower):
_BLOCK_KEYS = [
    ("ln_1.weight", "ln_1.weight", "norm1.weight"),
    ("ln_1.bias", "ln_1.bias", "norm1.bias"),
    ("attn.in_proj_weight", "attn.in_proj.weight", "attn.qkv.weight"),  # q, k, v in one order
    ("attn.in_proj_bias", "attn.in_proj.bias", "attn.qkv.bias"),
    ("attn.out_proj.weight", "attn.out_proj.weight", "attn.proj.weight"),
    ("attn.out_proj.bias", "attn.out_proj.bias", "attn.proj.bias"),
    ("ln_2.weight", "ln_2.weight", "norm2.weight"),
    ("ln_2.bias", "ln_2.bias", "norm2.bias"),
    ("mlp.c_fc.weight", "mlp.c_fc.weight", "mlp.fc1.weight"),
    ("mlp.c_fc.bias", "mlp.c_fc.bias", "mlp.fc1.bias"),
    ("mlp.c_proj.weight", "mlp.c_proj.weight", "mlp.fc2.weight"),
    ("mlp.c_proj.bias", "mlp.c_proj.bias", "mlp.fc2.bias"),
]
_TRANSPOSED = {"visual_proj.weight", "text_proj.weight"}  # OpenCLIP: x @ proj; nn.Linear: proj.T
_LEADING_DIMS = {"visual.cls_token": 2, "visual.pos_embed": 1}  # timm keeps [1, 1, W] and [1, N, W]
_NOT_WEIGHTS = {"input_resolution", "context_length", "vocab_size"}  # ints in OpenAI's archives


def openclip_key_map(cfg: CLIPConfig) -> dict[str, str]:
    """Our parameter name -> the OpenCLIP / OpenAI CLIP state-dict key it is read from, every key
    spelled out."""
    keys = {"visual.cls_token": "visual.class_embedding",
            "visual.pos_embed": "visual.positional_embedding",
            "visual.patch_embed.proj.weight": "visual.conv1.weight",  # CLIP's patch conv: no bias
            "visual.norm_pre.weight": "visual.ln_pre.weight",
            "visual.norm_pre.bias": "visual.ln_pre.bias",
            "visual.norm.weight": "visual.ln_post.weight",
            "visual.norm.bias": "visual.ln_post.bias",
            "visual_proj.weight": "visual.proj", "token_embedding.weight": "token_embedding.weight",
            "positional_embedding": "positional_embedding", "ln_final.weight": "ln_final.weight",
            "ln_final.bias": "ln_final.bias", "text_proj.weight": "text_projection",
            "logit_scale": "logit_scale"}
    for i in range(cfg.vision_layers):
        keys.update({f"visual.blocks.{i}.{timm}": f"visual.transformer.resblocks.{i}.{theirs}"
                     for theirs, _, timm in _BLOCK_KEYS})
    for i in range(cfg.text_layers):
        keys.update({f"text_blocks.{i}.{ours}": f"transformer.resblocks.{i}.{theirs}"
                     for theirs, ours, _ in _BLOCK_KEYS})
    return keys


# Attention heads (image, text) of open_clip's ViT CLIPs by their widths (image, text): heads
# 64 wide, but in the image towers of ViT-H (80 wide), ViT-g (88), ViT-bigG (104), ViT-e (112)
OPENCLIP_HEADS = {(384, 256): (6, 4), (384, 384): (6, 6), (512, 384): (8, 6),  # ViT-S, ViT-M
                  (512, 512): (8, 8), (768, 512): (12, 8), (896, 640): (14, 10),  # ViT-M, B, B-plus
                  (1024, 768): (16, 12), (1280, 1024): (16, 16), (1408, 1024): (16, 16),  # L, H, g
                  (1664, 1280): (16, 20), (1792, 1280): (16, 20)}  # ViT-bigG, ViT-e


def parse_heads(spec: str) -> tuple[int, int] | None:
    """The --heads setting: "auto" (None; see openclip_config) or IMAGE,TEXT, e.g. "16,16"."""
    if spec == "auto":
        return None
    image, _, text = spec.partition(",")
    if not (image.isdigit() and text.isdigit() and int(image) > 0 and int(text) > 0):
        raise SystemExit(f"error: --heads={spec}: use auto, or the attention heads of the image "
                         f"and the text tower, e.g. --heads=16,16 (ViT-H-14)")
    return int(image), int(text)


def openclip_config(state_dict: dict, quick_gelu: bool, heads: tuple[int, int] | None = None,
                    model_cfg: dict | None = None) -> CLIPConfig:
    """The CLIPConfig of an OpenCLIP or OpenAI ViT state dict, read from its shapes. What weights
    do not show is passed: quick_gelu (OpenAI's models and OpenCLIP's -quickgelu ones), and heads,
    the attention heads (image, text). heads None takes those model_cfg names (an
    open_clip_config.json's model config), else OPENCLIP_HEADS' of the same widths, else 64-wide."""
    sd = state_dict
    need = ["visual.conv1.weight", "visual.positional_embedding", "visual.proj", "text_projection",
            "positional_embedding", "token_embedding.weight", "ln_final.weight"]
    if any(k not in sd for k in need):
        raise SystemExit(f"not a ViT CLIP state dict (no {next(k for k in need if k not in sd)}); "
                         f"only OpenCLIP/OpenAI ViT models load (ResNet image towers and Hugging "
                         f"Face text towers do not)")
    vision_width, _, patch_px, _ = sd["visual.conv1.weight"].shape
    grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
    text_width = sd["ln_final.weight"].shape[0]

    def layers(prefix):
        return len({k.split(".")[len(prefix.split("."))] for k in sd if k.startswith(prefix + ".")})

    mlp_ratios = {sd[f"{p}resblocks.0.mlp.c_fc.weight"].shape[0] / w for p, w in
                  (("visual.transformer.", vision_width), ("transformer.", text_width))}
    if len(mlp_ratios) != 1:
        raise SystemExit(f"the image and text MLPs have different width ratios "
                         f"{sorted(mlp_ratios)}; CLIPConfig has one")
    vocab_size = sd["token_embedding.weight"].shape[0]
    vision, text = (model_cfg or {}).get("vision_cfg"), (model_cfg or {}).get("text_cfg")
    if not heads and vision is not None and text is not None:  # open_clip's defaults where unsaid
        heads = vision_width // vision.get("head_width", 64), text.get("heads", 8)
    heads = heads or OPENCLIP_HEADS.get((vision_width, text_width),
                                        (max(1, vision_width // 64), max(1, text_width // 64)))
    for tower, width, n in (("image", vision_width, heads[0]), ("text", text_width, heads[1])):
        if width % n:
            raise SystemExit(f"{n} attention heads do not divide the {tower} tower's width "
                             f"{width}; pass --heads=IMAGE,TEXT that divide {vision_width} and "
                             f"{text_width}")
    return CLIPConfig(image_px=grid * patch_px, patch_px=patch_px, vision_width=vision_width,
                      vision_layers=layers("visual.transformer.resblocks"), vision_heads=heads[0],
                      text_width=text_width, text_layers=layers("transformer.resblocks"),
                      text_heads=heads[1],
                      context_tokens=sd["positional_embedding"].shape[0], vocab_size=vocab_size,
                      embed_dim=sd["text_projection"].shape[1], mlp_ratio=mlp_ratios.pop(),
                      quick_gelu=quick_gelu,
                      eot_token_id=vocab_size - 1)  # <|endoftext|>, CLIP's last id


def load_openclip_state_dict(state_dict: dict, cfg: CLIPConfig) -> CLIP:
    """Our CLIP holding the weights of an OpenCLIP or OpenAI CLIP ViT state dict, in eval mode
    (cfg: openclip_config(state_dict, quick_gelu) or a preset such as make_config("ViT-B-32",
    quick_gelu=True)). Every key must be matched both ways and every shape must agree; otherwise
    the error lists what is left over. Weights become float32."""
    # the causal mask is rebuilt, not loaded (some OpenCLIP versions saved it as a buffer)
    state_dict = {k: v for k, v in state_dict.items()
                  if k not in _NOT_WEIGHTS and not k.endswith("attn_mask")}
    with torch.device("meta"):  # shapes only: every parameter is overwritten below
        model = CLIP(cfg)
    key_map = openclip_key_map(cfg)
    ours = model.state_dict()
    missing = sorted(theirs for theirs in key_map.values() if theirs not in state_dict)
    unused = sorted(set(state_dict) - set(key_map.values()))
    unmapped = sorted(set(ours) - set(key_map))  # the map forgot them (timm changed, say)
    converted, wrong_shape = {}, []
    for name, theirs in key_map.items():
        if name not in ours or theirs not in state_dict:
            continue
        value = state_dict[theirs]
        value = value.t() if name in _TRANSPOSED else value
        value = value[(None,) * _LEADING_DIMS.get(name, 0)]
        if value.shape != ours[name].shape:
            wrong_shape.append(f"{theirs} {tuple(state_dict[theirs].shape)} -> "
                               f"{name} {tuple(ours[name].shape)}")
        # a copy: the model must not share memory with the caller's state dict (OpenAI's is float16)
        converted[name] = value.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    problems = [f"{what} ({len(keys)}): {', '.join(keys[:12])}{' ...' if len(keys) > 12 else ''}"
                for what, keys in [("checkpoint keys we do not use", unused),
                                   ("keys our model needs but the checkpoint lacks", missing),
                                   ("our parameters with no checkpoint key", unmapped),
                                   ("shapes that differ", wrong_shape)] if keys]
    if problems:
        raise SystemExit("cannot load the CLIP state dict: " + "; ".join(problems)
                         + "; check the model shape (a ViT-B-32/B-16/S-16 OpenCLIP or OpenAI "
                           "checkpoint)")
    model.load_state_dict(converted, assign=True)
    return model.eval()


class _ScriptObject:
    """A module (or other object) of a TorchScript archive, as the attributes its pickle gives:
    its class's code, which torch.jit.load would compile and run, is never looked at."""
    attributes: dict = {}  # until the pickle's BUILD gives this object its own

    def __setstate__(self, state):
        if not isinstance(state, dict):  # a __getstate__ of its own: only its __setstate__ knows it
            raise _NotPlainData(f"{type(self).__name__}.__setstate__")
        self.attributes = state


class _NotPlainData(Exception):
    """What an archive's pickle needs beyond tensors, storages, containers and modules."""


_STORAGE_DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16,
                   "BFloat16Storage": torch.bfloat16, "DoubleStorage": torch.float64,
                   "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8,
                   "ByteStorage": torch.uint8, "BoolStorage": torch.bool}


class _ArchiveUnpickler(pickle.Unpickler):
    """Reads a TorchScript archive's data.pkl. A pickle reaches every function it calls through
    find_class, so answering only with tensor rebuilds, storage dtypes, containers and
    _ScriptObject classes lets nothing else run. Storages are read from ARCHIVE/data/ as bytes."""

    def __init__(self, archive: zipfile.ZipFile, folder: str):
        super().__init__(archive.open(f"{folder}/data.pkl"))
        self.archive, self.folder, self.classes, self.storages = archive, folder, {}, {}

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):  # a module's TorchScript class
            qualname = f"{module}.{name}"
            return self.classes.setdefault(qualname, type(qualname, (_ScriptObject,), {}))
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]  # a tag of a storage's elements, never called
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda flat, offset, size, stride, *_: flat.as_strided(size, stride, offset)
        if (module, name) == ("collections", "OrderedDict"):  # a tensor's backward hooks: none
            return OrderedDict
        if module == "torch.jit._pickle" and name.startswith(("build_", "restore_type_tag")):
            return lambda value, *type_tag: value  # a typed list or dict: the value, untyped
        raise _NotPlainData(f"{module}.{name}")

    def persistent_load(self, saved_id):
        kind, dtype, key, *_ = saved_id  # ("storage", dtype, key, device, elements)
        if kind != "storage" or not isinstance(dtype, torch.dtype) or not isinstance(key, str):
            raise _NotPlainData("a persistent id that is not a storage")
        if key not in self.storages:  # one flat tensor per storage; its tensors are views of it
            data = bytearray(self.archive.read(f"{self.folder}/data/{key}"))
            self.storages[key] = (torch.frombuffer(data, dtype=dtype) if data
                                  else torch.empty(0, dtype=dtype))
        return self.storages[key]


def read_torchscript(path: str) -> dict[str, torch.Tensor]:
    """Every tensor the modules of a TorchScript archive hold, by dotted name: the keys of
    torch.jit.load(path).state_dict(), and any other tensor attribute (a causal mask). OpenAI's
    CLIPs are such archives, and torch.jit.load runs the code inside one (its __setstate__
    methods); here nothing in the file is run, and an archive that needs more than tensors, plain
    containers and modules' attributes to be rebuilt is refused in one line."""

    def tensors(obj: _ScriptObject, prefix: str, seen: set) -> dict[str, torch.Tensor]:
        seen.add(id(obj))  # a pickle can make an object its own attribute: each is walked once
        found = {}
        for name, value in obj.attributes.items():
            if isinstance(value, torch.Tensor):
                found[f"{prefix}{name}"] = value
            elif isinstance(value, _ScriptObject) and id(value) not in seen:
                found.update(tensors(value, f"{prefix}{name}.", seen))
        return found

    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        try:
            if not pickles:
                raise ValueError("no data.pkl")
            root = _ArchiveUnpickler(archive, pickles[0].removesuffix("/data.pkl")).load()
            if not isinstance(root, _ScriptObject):
                raise ValueError(f"it holds a {type(root).__name__}, not a module")
            return tensors(root, "", set())
        except _NotPlainData as e:
            raise SystemExit(f"{path}: refused: this TorchScript archive needs {e} to be "
                             f"rebuilt, and no code a file names is run (only tensors, containers "
                             f"and modules' attributes are read); pass its weights as a state dict "
                             f"(torch.save's .pt, or .safetensors)") from None
        except Exception as e:
            raise SystemExit(f"{path}: not a readable TorchScript archive ({type(e).__name__}: "
                             f"{e}); pass an OpenAI or OpenCLIP CLIP (an archive, a state dict or "
                             f".safetensors)") from None


def is_checkpoint_file(path: str) -> bool:
    """Does path hold what model.load_checkpoint reads, judged from its first and last bytes: a
    whole zip (torch.save's format, OpenAI's TorchScript), torch.save's old pickle, safetensors?"""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        head = f.read(16)
    if path.endswith(".safetensors"):
        return head[8:9] == b"{"  # an 8-byte header length, then the JSON header
    return head.startswith(b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19")  # torch.save's magic number


def _is_torchscript(path: str) -> bool:
    """Whether path is a TorchScript archive: a zip holding constants.pkl (torch.save's do not).
    Nothing is unpickled."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.endswith("/constants.pkl") for name in z.namelist())


def load_checkpoint(path: str, quick_gelu: bool | None = None,
                    heads: tuple[int, int] | None = None) -> tuple[CLIP, dict]:
    """(model, the rest of the file) of one of train.py's checkpoints (stepNN.pt; the rest is its
    record: config, steps, samples seen, ...) or of an existing CLIP (the rest is {}): OpenAI's
    TorchScript archive (ViT-B-32.pt ...), an OpenCLIP state dict (.bin, .pt or .safetensors) or
    OpenCLIP training checkpoint ({"state_dict": ...}, DDP's "module." prefix too). The model
    comes in eval mode, on the CPU; this is the one way the project reads a model from a file.

    Two things weights do not show; None takes each from the file, with a printed note where it
    must assume. quick_gelu: True for OpenAI's archives, else what an open_clip_config.json beside
    the weights says, else GELU, as OpenCLIP's models. heads (image, text): what such a file says,
    else those of open_clip's model of the same widths, else 64-wide heads."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such checkpoint file; pass --checkpoint=FILE (an OpenCLIP or "
                         f"OpenAI CLIP)")
    if _is_torchscript(path):
        state_dict = read_torchscript(path)  # OpenAI's releases are TorchScript: read, never run
        quick_gelu = True if quick_gelu is None else quick_gelu
    elif path.endswith(".safetensors"):
        from safetensors.torch import load_file  # installed with timm
        state_dict = load_file(path)
    else:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise SystemExit(f"{path}: not a readable torch checkpoint "
                             f"({str(e).splitlines()[0]}); pass an OpenCLIP/OpenAI CLIP state dict "
                             f"or a train.py step checkpoint (a damaged RUN/stepNN.pt: delete it, "
                             f"and rerun to train that step again)")
    if "model_config" in state_dict and "model" in state_dict:  # one of ours
        with torch.device("meta"):  # shapes only: every parameter is overwritten below
            model = CLIP(CLIPConfig(**state_dict["model_config"]))
        model.load_state_dict(state_dict["model"], assign=True)
        return model.eval(), {k: v for k, v in state_dict.items() if k != "model"}
    state_dict = state_dict.get("state_dict", state_dict)
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    beside = _openclip_config_beside(path)
    if quick_gelu is None:
        quick_gelu = beside.get("quick_gelu")
    if quick_gelu is None:
        print(f"note: {path} does not say which activation its model uses; assuming GELU, as "
              f"OpenCLIP's models; for OpenAI's weights (or an OpenCLIP -quickgelu model) pass "
              f"--quick_gelu=true")
    cfg = openclip_config(state_dict, bool(quick_gelu), heads, beside)
    said = heads or "vision_cfg" in beside and "text_cfg" in beside
    if not said and (cfg.vision_width, cfg.text_width) not in OPENCLIP_HEADS:
        print(f"note: {path}: no open_clip_config.json beside it, and no open_clip model of "
              f"its widths ({cfg.vision_width} image, {cfg.text_width} text), says its attention "
              f"heads; assuming {cfg.vision_heads} image and {cfg.text_heads} text heads; if it "
              f"has others, pass --heads=IMAGE,TEXT")
    return load_openclip_state_dict(state_dict, cfg), {}


def _openclip_config_beside(path: str) -> dict:
    """The open_clip model config in an open_clip_config.json beside the weights (Hugging Face's
    layout, or export's); {} where there is none."""
    config_path = os.path.join(os.path.dirname(path), "open_clip_config.json")
    if not os.path.exists(config_path):
        return {}
    with open(config_path) as f:
        config = json.load(f)
    return config.get("model_cfg", config)


def to_openclip(model: CLIP) -> tuple[dict, dict]:
    """(OpenCLIP state dict, OpenCLIP model config) of our model: open_clip.CLIP(**config) loads
    the state dict with strict=True and gives the same embeddings. The config names every shape, so
    shapes open_clip has no name for (tiny, another vocabulary) load too."""
    cfg, ours = model.cfg, model.state_dict()
    state_dict = {}
    for name, theirs in openclip_key_map(cfg).items():
        value = ours[name].detach().cpu()
        value = value.t() if name in _TRANSPOSED else value
        state_dict[theirs] = value.reshape(value.shape[_LEADING_DIMS.get(name, 0):]).contiguous()
    # pool at end-of-text: argmax where it is the largest id, as in CLIP's vocabulary
    text_pool = (dict(pool_type="argmax") if cfg.eot_token_id == cfg.vocab_size - 1
                 else dict(pool_type="eos", eos_id=cfg.eot_token_id))
    config = {"embed_dim": cfg.embed_dim, "quick_gelu": cfg.quick_gelu,
              "vision_cfg": {"image_size": cfg.image_px, "patch_size": cfg.patch_px,
                             "width": cfg.vision_width, "layers": cfg.vision_layers,
                             "head_width": cfg.vision_width // cfg.vision_heads,
                             "mlp_ratio": cfg.mlp_ratio},
              "text_cfg": {"context_length": cfg.context_tokens, "vocab_size": cfg.vocab_size,
                           "width": cfg.text_width, "heads": cfg.text_heads,
                           "layers": cfg.text_layers, "mlp_ratio": cfg.mlp_ratio, **text_pool}}
    return state_dict, config
