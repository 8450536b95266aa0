"""The CUDA paths, skipped without a GPU: a bf16 autocast training step, the compiled model, the fused AdamW
step that skips a non-finite update without a host sync, and evaluation on the GPU.

    python -m pytest -q tests/test_gpu.py      # on a machine with a CUDA GPU
"""
import pytest
import torch
import torch.nn.functional as F

import data
import evaluate
import survive
import synthetic
from model import CLIP, clip_loss, make_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def tiny_model(seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(make_config("tiny", vocab_size=64, eot_token_id=2))


def batch(n: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    tokens = torch.randint(3, 64, (n, 24), generator=g)
    tokens[:, 10] = 2  # end of text
    return images, tokens


def test_bf16_autocast_step_matches_fp32_and_keeps_fp32_weights():
    model = tiny_model().to(CUDA)
    images, tokens = (x.to(CUDA) for x in batch())
    with torch.no_grad():
        fp32 = clip_loss(*model(images, tokens))
    optimizer = model.configure_optimizer(lr=1e-3)
    assert optimizer.defaults["fused"]  # on CUDA the update is one kernel
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = clip_loss(*model(images, tokens))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and abs(loss.item() - fp32.item()) < 0.05 * fp32.item()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_compiled_model_gives_the_eager_features_and_gradients():
    model = tiny_model().to(CUDA)
    compiled = torch.compile(model)
    images, tokens = (x.to(CUDA) for x in batch())
    eager_loss = clip_loss(*model(images, tokens))
    eager_loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled_loss = clip_loss(*compiled(images, tokens))
    compiled_loss.backward()
    assert compiled_loss.item() == pytest.approx(eager_loss.item(), rel=1e-4)
    for name, p in model.named_parameters():  # the compiled module trains the same parameters
        assert torch.allclose(p.grad, eager_grads[name], rtol=1e-3, atol=1e-5), name


def test_fused_adamw_skips_a_nonfinite_step_exactly_and_counts_it():
    model = tiny_model().to(CUDA)
    optimizer = model.configure_optimizer(lr=1e-3)
    state = survive.StepState().on(CUDA)
    images, tokens = (x.to(CUDA) for x in batch())
    clip_loss(*model(images, tokens)).backward()
    state.optimizer_step(model, optimizer)  # a good step first, so AdamW has moments to keep
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()}
    optimizer.zero_grad(set_to_none=True)
    (clip_loss(*model(images, tokens)) * float("nan")).backward()
    state.optimizer_step(model, optimizer)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # no update
    for p in model.parameters():  # nor any change to Adam's moments and step count
        assert all(torch.equal(moments[id(p)][k], v) for k, v in optimizer.state[p].items())
    assert int(state.nonfinite) == 1 and int(state.in_row) == 1
    optimizer.zero_grad(set_to_none=True)
    clip_loss(*model(images, tokens)).backward()
    state.optimizer_step(model, optimizer)
    assert int(state.in_row) == 0 and any(not torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_evaluation_on_the_gpu_agrees_with_the_cpu(tmp_path):
    root = str(tmp_path / "bench")
    synthetic.make_synthetic_benchmark(root, years=(2018,), train_samples_per_year=64, eval_samples_per_year=64,
                                       classification_samples_per_year=64, samples_per_shard=64)
    tok = data.Tokenizer.train(data.first_captions(root, ["2018"], 64), vocab_size=300)
    torch.manual_seed(0)
    model = CLIP(make_config("tiny", vocab_size=tok.vocab_size, eot_token_id=tok.eot_id))
    tasks = evaluate.tasks_of(root, [["2018"]])
    on_cpu = evaluate.evaluate_step(model, tasks, tok, torch.device("cpu"))["2018"]
    on_gpu = evaluate.evaluate_step(model.to(CUDA), tasks, tok, CUDA)["2018"]  # bf16 autocast
    assert on_gpu["gallery"] == on_cpu["gallery"] == 64 and on_gpu["class_samples"] == 64
    shards = tasks["2018"].retrieval
    img_cpu, txt_cpu = evaluate.embed_pairs(model.cpu(), shards, tok, torch.device("cpu"))
    img_gpu, txt_gpu = evaluate.embed_pairs(model.to(CUDA), shards, tok, CUDA)
    assert F.cosine_similarity(img_cpu, img_gpu.cpu()).min() > 0.99
    assert F.cosine_similarity(txt_cpu, txt_gpu.cpu()).min() > 0.99
