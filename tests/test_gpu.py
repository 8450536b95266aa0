"""The CUDA paths, skipped without a GPU: a bf16 autocast training step, the compiled model, the fused AdamW
step that skips a non-finite update without a host sync, and evaluation on the GPU; the loader's
uint8 images normalised on the GPU; a run that carries fused AdamW across steps and resumes exactly.

    python -m pytest -q tests/test_gpu.py      # on a machine with a CUDA GPU
"""
import os

import pytest
import torch
import torch.nn.functional as F

import data
import evaluate
import shards
import survive
import synthetic
import world
from benchmark import tasks_of
from conftest import train_in_process
from model import CLIP, clip_loss, make_config
from text import Tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
# deterministic cuBLAS for the resume test below; read at cuBLAS's first use: set before any test
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


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
        fp32 = clip_loss(**model(images, tokens))
    optimizer = model.configure_optimizer(lr=1e-3)
    assert optimizer.defaults["fused"]  # on CUDA the update is one kernel
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = clip_loss(**model(images, tokens))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and abs(loss.item() - fp32.item()) < 0.05 * fp32.item()
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_compiled_model_gives_the_eager_features_and_gradients():
    model = tiny_model().to(CUDA)
    compiled = torch.compile(model)
    images, tokens = (x.to(CUDA) for x in batch())
    eager_loss = clip_loss(**model(images, tokens))
    eager_loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled_loss = clip_loss(**compiled(images, tokens))
    compiled_loss.backward()
    assert compiled_loss.item() == pytest.approx(eager_loss.item(), rel=1e-4)
    for name, p in model.named_parameters():  # the compiled module trains the same parameters
        assert torch.allclose(p.grad, eager_grads[name], rtol=1e-3, atol=1e-5), name


def test_fused_adamw_skips_a_nonfinite_step_exactly_and_counts_it():
    model = tiny_model().to(CUDA)
    optimizer = model.configure_optimizer(lr=1e-3)
    state = survive.StepProgress().on(CUDA)
    images, tokens = (x.to(CUDA) for x in batch())
    clip_loss(**model(images, tokens)).backward()
    state.optimizer_step(model, optimizer)  # a good step first, so AdamW has moments to keep
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()}
    optimizer.zero_grad(set_to_none=True)
    (clip_loss(**model(images, tokens)) * float("nan")).backward()
    state.optimizer_step(model, optimizer)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())  # no update
    for p in model.parameters():  # nor any change to Adam's moments and step count
        assert all(torch.equal(moments[id(p)][k], v) for k, v in optimizer.state[p].items())
    assert int(state.nonfinite) == 1 and int(state.in_row) == 1
    optimizer.zero_grad(set_to_none=True)
    clip_loss(**model(images, tokens)).backward()
    state.optimizer_step(model, optimizer)
    assert int(state.in_row) == 0 and any(not torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_evaluation_on_the_gpu_agrees_with_the_cpu(tmp_path):
    root = str(tmp_path / "bench")
    synthetic.make_synthetic_benchmark(root, years=(2018,), train_samples_per_year=64, eval_samples_per_year=64,
                                       classification_samples_per_year=64, samples_per_shard=64, static_samples=64)
    tok = Tokenizer.train(shards.first_captions(root, ["2018"], 64), vocab_size=300)
    torch.manual_seed(0)
    model = CLIP(make_config("tiny", vocab_size=tok.vocab_size, eot_token_id=tok.eot_id))
    tasks = tasks_of(root, [["2018"]])
    on_cpu = evaluate.evaluate_step(model, tasks, tok, torch.device("cpu"))["2018"]
    on_gpu = evaluate.evaluate_step(model.to(CUDA), tasks, tok, CUDA)["2018"]  # bf16 autocast
    assert on_gpu["gallery"] == on_cpu["gallery"] == 64 and on_gpu["class_samples"] == 64
    pairs = tasks["2018"].retrieval
    img_cpu, txt_cpu = evaluate.embed_pairs(model.cpu(), pairs, tok, torch.device("cpu"))
    img_gpu, txt_gpu = evaluate.embed_pairs(model.to(CUDA), pairs, tok, CUDA)
    assert F.cosine_similarity(img_cpu, img_gpu.cpu()).min() > 0.99
    assert F.cosine_similarity(txt_cpu, txt_gpu.cpu()).min() > 0.99


def test_uint8_batches_normalised_on_the_gpu_are_the_cpu_floats(two_years):
    """The loader's pinned uint8 batches, copied without blocking and normalised on the GPU (as
    train.py does), and evaluation batches (as evaluate.py does): bit for bit the CPU's floats."""
    tok = Tokenizer.train(shards.first_captions(two_years, ["2018"], 64), vocab_size=300)
    part = data.Part("2018", shards.year_shards(two_years, "2018"))
    stream = data.TrainStream([part], 64, 32, 0, 1, seed=0, time_step=0, image_px=24, tokenizer=tok,
                              context_tokens=16)
    batches = [images for images, _, _ in data.train_loader(stream, num_workers=1)]
    held_out = shards.year_shards(two_years, "2018", "retrieval")
    batches += [x for x, *_ in data.eval_batches(held_out, 40, 32)]
    assert len(batches) == 2 + 2 and batches[0].is_pinned()  # the loader pins its batches on CUDA
    for images in batches:
        on_gpu = data.normalize_images(images.to(CUDA, non_blocking=True))
        assert images.dtype == torch.uint8 and on_gpu.device.type == "cuda"
        assert torch.equal(on_gpu.cpu(), data.normalize_images(images))


@pytest.fixture
def deterministic_kernels():
    """Deterministic CUDA kernels for one test (cuDNN's convolutions, flash attention's backward,
    embedding gradients): by default they sum with atomics in an order that differs run to run."""
    mode, warn_only = torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(mode, warn_only=warn_only)


# 16 iterations a step; a 50% cooldown branches off at iteration 8; a resume checkpoint every 2
CARRIED = ["--strategy=cumulative-all", "--lr_schedule=const-cooldown", "--budget_samples=512",
           "--batch_size=32", "--vocab_size=300", "--workers=0", "--log_interval=4",
           "--eval_batch=64", "--warmup_iters=2", "--warmup_iters_later=2",
           "--cooldown_fraction=0.5", "--ckpt_interval_samples=64", "--device=cuda"]


def test_const_cooldown_carries_fused_adamw_and_resumes_bitwise_on_the_gpu(
        two_years, tmp_path, monkeypatch, deterministic_kernels):
    """Two tiny const-cooldown steps on the GPU. Fused AdamW's state, saved on the CPU (the trunk,
    resume checkpoints), is loaded again onto the GPU by the second step and by the resumed run; a
    run stopped at iteration 12, inside the cooldown that began at 8, ends both steps bit for bit as
    one never stopped (tests/test_schedules.py: the same on the CPU)."""
    def load(run, step):
        return torch.load(os.path.join(run, f"step{step:02d}.pt"), weights_only=True)

    def same(a, b):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    args = [f"--data_root={two_years}", *CARRIED]
    reference, stopped = str(tmp_path / "reference"), str(tmp_path / "stopped")
    train_in_process([f"--out_dir={reference}", *args])
    first, second = load(reference, 1), load(reference, 2)
    assert first["continue_point"]["optimizer"]["param_groups"][0]["fused"]
    # the second step went on with the first step's trunk optimizer: AdamW's step count is 8 + 8
    assert (first["continue_point"]["iterations"], second["continue_point"]["iterations"]) == (8, 16)
    assert int(second["continue_point"]["optimizer"]["state"][0]["step"]) == 16
    # as SIGTERM would: the check at iteration 12 asks to stop, once iteration 10 is saved
    ten = os.path.join(stopped, "resume", "step01-0000010.pt")
    monkeypatch.setattr(world.World, "stop_requested", lambda self: os.path.exists(ten))
    train_in_process([f"--out_dir={stopped}", *args])
    assert not os.path.exists(os.path.join(stopped, "step01.pt"))
    resume = torch.load(os.path.join(stopped, "resume", "step01-0000012.pt"), weights_only=True)
    assert resume["trunk"]["iterations"] == 8 and resume["optimizer"]["param_groups"][0]["fused"]
    monkeypatch.undo()
    train_in_process([f"--out_dir={stopped}", *args])
    for step in (1, 2):
        a, b = load(reference, step), load(stopped, step)
        assert same(a["model"], b["model"]), f"step {step}"
        assert same(a["continue_point"]["model"], b["continue_point"]["model"]), f"step {step}"
        assert same(a["continue_point"]["optimizer"]["state"][0], b["continue_point"]["optimizer"]["state"][0])
