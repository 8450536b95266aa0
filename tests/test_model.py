"""The CLIP model and loss: pooling, causality, init, the optimizer split, FLOPs and parameter counts against
independent references, the 2-process loss against the 1-process loss, and a checkpoint round trip."""
import io
import math
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.flop_counter import FlopCounterMode

from conftest import ENV, REPO
from model import CLIP, PRESETS, CLIPConfig, clip_loss, make_config

# a model small enough to be instant; the eot id is deliberately not the largest id (OpenCLIP's argmax would fail)
SMALL = dict(vision_width=32, vision_layers=2, vision_heads=2, text_width=32, text_layers=2, text_heads=2,
             context_tokens=16, vocab_size=64, embed_dim=16, eot_token_id=2)


def small_model(seed=0, **overrides) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(make_config("tiny", **{**SMALL, **overrides})).eval()


def random_batch(cfg: CLIPConfig, batch: int, seed=0, eot_pos=None):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, cfg.image_px, cfg.image_px, generator=g)
    tokens = torch.randint(3, cfg.vocab_size, (batch, cfg.context_tokens), generator=g)  # 0..2 are special
    eot_pos = torch.randint(1, cfg.context_tokens, (batch,), generator=g) if eot_pos is None else eot_pos
    tokens[torch.arange(batch), eot_pos] = cfg.eot_token_id
    return images, tokens, eot_pos


def test_make_config():
    assert make_config("tiny") == CLIPConfig()
    assert make_config("ViT-B-16", vocab_size=1000).vocab_size == 1000
    with pytest.raises(ValueError, match="unknown model preset 'ViT-H'.*tiny.*ViT-B-16"):
        make_config("ViT-H")
    with pytest.raises(ValueError, match="not a multiple of patch_px"):
        CLIPConfig(image_px=30, patch_px=8)


def test_text_pools_at_first_eot():
    model = small_model()
    cfg = model.cfg
    eot_pos = torch.tensor([3, 7, 15])
    _, tokens, _ = random_batch(cfg, 3, eot_pos=eot_pos)
    with torch.no_grad():
        out = model.encode_text(tokens)
        after = tokens.clone()  # change everything after the first eot (the padding), a second eot included
        for i, p in enumerate(eot_pos.tolist()):
            after[i, p + 1:] = torch.randint(3, cfg.vocab_size, (cfg.context_tokens - p - 1,))
            after[i, p + 1:p + 2] = cfg.eot_token_id
        torch.testing.assert_close(model.encode_text(after), out, rtol=0, atol=1e-6)
        before = tokens.clone()  # one token just before the eot
        before[torch.arange(3), eot_pos - 1] = (tokens[torch.arange(3), eot_pos - 1] - 3 + 1) % (cfg.vocab_size - 3) + 3
        assert ((model.encode_text(before) - out).abs().amax(dim=1) > 1e-4).all()
        # the pooled feature is the projected hidden state at the eot
        hidden = model.text_hidden_states(tokens)[torch.arange(3), eot_pos]
        torch.testing.assert_close(out, model.text_proj(hidden))
        # no eot at all (a truncated caption): pools at the last position
        no_eot = torch.randint(3, cfg.vocab_size, (1, cfg.context_tokens))
        torch.testing.assert_close(model.encode_text(no_eot), model.text_proj(model.text_hidden_states(no_eot)[:, -1]))


def test_text_attention_is_causal():
    model = small_model()
    _, tokens, _ = random_batch(model.cfg, 2)
    with torch.no_grad():
        hidden = model.text_hidden_states(tokens)
        for p in (0, 5, 14):
            changed = tokens.clone()
            changed[:, p + 1:] = (changed[:, p + 1:] + 1 - 3) % (model.cfg.vocab_size - 3) + 3
            new = model.text_hidden_states(changed)
            torch.testing.assert_close(new[:, :p + 1], hidden[:, :p + 1], rtol=0, atol=1e-6)
            assert ((new[:, p + 1:] - hidden[:, p + 1:]).abs().amax(dim=-1) > 1e-4).all()


def test_forward_shapes_normalisation_and_logit_scale():
    model = small_model()
    images, tokens, _ = random_batch(model.cfg, 5)
    out = model(images, tokens)
    image_features, text_features, scale = out["image_features"], out["text_features"], out["logit_scale"]
    assert list(out) == ["image_features", "text_features", "logit_scale"]  # no bias: CLIP's loss has none
    assert image_features.shape == text_features.shape == (5, model.cfg.embed_dim)
    torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(text_features.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(scale, torch.tensor(1 / 0.07))
    assert model.encode_image(images).norm(dim=-1).sub(1).abs().max() > 1e-3  # encode_* do not normalise
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(math.log(100))
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == 0.0


def test_init_weights_stds():
    torch.manual_seed(0)
    model = CLIP(make_config("tiny", text_width=256, text_layers=4))
    width, layers = 256, 4
    block = model.text_blocks[0]
    checks = {model.token_embedding.weight: 0.02, model.positional_embedding: 0.01,
              block.attn.in_proj.weight: width ** -0.5, block.attn.out_proj.weight: width ** -0.5 * (2 * layers) ** -0.5,
              block.mlp.c_fc.weight: (2 * width) ** -0.5, block.mlp.c_proj.weight: width ** -0.5 * (2 * layers) ** -0.5,
              model.text_proj.weight: width ** -0.5, model.visual_proj.weight: model.cfg.vision_width ** -0.5}
    for p, std in checks.items():
        assert p.std().item() == pytest.approx(std, rel=0.05)
    assert block.attn.in_proj.bias.abs().max() == 0 and block.ln_1.weight.eq(1).all()
    # the image tower as OpenCLIP's ViT: class token and positions N(0, width^-0.5), q,k,v Xavier-uniform,
    # the other Linears PyTorch's default (uniform, std 1/sqrt(3 fan_in)), not timm's trunc-normal 0.02
    vision, vb = model.cfg.vision_width, model.visual.blocks[0]
    checks = {model.visual.pos_embed: vision ** -0.5, vb.attn.qkv.weight: (2 / (4 * vision)) ** 0.5,
              vb.mlp.fc1.weight: (3 * vision) ** -0.5, vb.mlp.fc2.weight: (3 * 4 * vision) ** -0.5}
    for p, std in checks.items():
        assert p.std().item() == pytest.approx(std, rel=0.1)
    assert model.visual.cls_token.abs().max() > 0.05 and vb.attn.qkv.bias.abs().max() == 0


def test_optimizer_groups():
    model = small_model()
    opt = model.configure_optimizer(lr=1e-3)
    name_of = {id(p): n for n, p in model.named_parameters()}
    groups = {g["weight_decay"]: [name_of[id(p)] for p in g["params"]] for g in opt.param_groups}
    assert set(groups) == {0.2, 0.0}
    decay, no_decay = groups[0.2], groups[0.0]
    assert sorted(decay + no_decay) == sorted(name_of.values())  # every parameter in exactly one group
    embeddings = {"token_embedding.weight", "positional_embedding", "visual.cls_token", "visual.pos_embed", "logit_scale"}
    expected_no_decay = {n for n in name_of.values()
                         if n.endswith(".bias") or ".norm" in n or "ln_" in n or n in embeddings}
    assert set(no_decay) == expected_no_decay
    assert {"visual.patch_embed.proj.weight", "visual_proj.weight", "text_proj.weight",
            "text_blocks.0.attn.in_proj.weight", "visual.blocks.0.mlp.fc1.weight"} <= set(decay)
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6 and not opt.defaults["fused"]


def test_flops_match_an_independent_count():
    model = CLIP(make_config("tiny"))  # the real tiny shape: patch conv, both towers
    images, tokens, _ = random_batch(model.cfg, 2)
    # the math kernel runs attention as matmuls the counter sees (CPU's fused kernel is not counted)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(images, tokens)
    measured = counter.get_total_flops() / 2
    assert model.flops_per_pair() == pytest.approx(measured, rel=0.01)


def test_preset_sizes():
    with torch.device("meta"):  # shapes only: no memory, no init time
        models = {name: CLIP(make_config(name)) for name in PRESETS}
    # OpenCLIP's published counts (model_profile.csv): params and GFLOPs per image-text pair
    assert models["ViT-B-16"].num_params() == pytest.approx(149.62e6, rel=0.01)
    assert models["ViT-B-32"].num_params() == pytest.approx(151.28e6, rel=0.01)
    assert models["ViT-B-16"].flops_per_pair() == pytest.approx(41.09e9, rel=0.02)
    assert models["ViT-B-32"].flops_per_pair() == pytest.approx(14.78e9, rel=0.02)
    b16 = models["ViT-B-16"]  # as the README gives them: 149.6M parameters, 41.1 GFLOPs per pair
    assert (round(b16.num_params() / 1e6, 1), round(b16.flops_per_pair() / 1e9, 1)) == (149.6, 41.1)
    assert 40e6 < models["ViT-S-16"].num_params() < models["ViT-B-16"].num_params()
    assert models["tiny"].num_params() < 3e6


def _ddp_worker(rank: int, world_size: int, tmp: str, images, tokens):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world_size)
    model = small_model().train()
    ddp_model = DDP(model)
    local = images.shape[0] // world_size
    part = slice(rank * local, (rank + 1) * local)
    loss = clip_loss(**ddp_model(images[part], tokens[part]), rank=rank, world_size=world_size)
    loss.backward()  # DDP all-reduces (averages) the gradients here
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.save({"loss": loss.detach(), "grads": grads}, f"{tmp}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_process_loss_equals_one_process_loss(tmp_path):
    world_size, batch = 2, 8
    model = small_model().train()
    images, tokens, _ = random_batch(model.cfg, batch, seed=1)
    mp.spawn(_ddp_worker, args=(world_size, str(tmp_path), images, tokens), nprocs=world_size, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]

    loss = clip_loss(**model(images, tokens))  # one process, the whole global batch
    loss.backward()
    mean_loss = sum(r["loss"] for r in results) / world_size
    torch.testing.assert_close(mean_loss, loss.detach(), rtol=0, atol=1e-5)
    for name, p in model.named_parameters():
        for r in results:
            torch.testing.assert_close(r["grads"][name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_state_dict_round_trip():
    model = small_model(seed=0)
    images, tokens, _ = random_batch(model.cfg, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "config": model.cfg.__dict__}, buffer)
    buffer.seek(0)
    ckpt = torch.load(buffer)
    restored = small_model(seed=1)  # different random init, then overwritten
    restored.load_state_dict(ckpt["model"])
    assert CLIPConfig(**ckpt["config"]) == model.cfg
    with torch.no_grad():
        a, b = model(images, tokens), restored(images, tokens)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_timm_is_imported_only_when_a_model_is_built():
    """A refused command line answers without waiting the 2 s timm takes to import (it brings
    torchvision and dynamo): model.py imports it in CLIP's constructor."""
    code = ("import sys, train; before = 'timm' in sys.modules; train.CLIP(train.make_config('tiny')); "
            "print(before, 'timm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.split() == ["False", "True"], out.stderr[-2000:]
