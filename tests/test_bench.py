"""tools/bench.py's CPU paths at the tiny size: the training-step comparison with open_clip, the loader comparison with
webdataset, the end-to-end path, and the speed tricks it measures (draft-mode JPEG decoding, gradient
checkpointing), each checked for not changing what the model sees or learns.

Needs the benchmark-only packages: pip install -r requirements-test.txt

    python -m pytest -q tests/test_bench.py
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import bench
import data
from model import CLIP, clip_loss, make_config
from text import Tokenizer
import shards

TINY_TRAIN = ["--model=tiny", "--batch_size=16", "--steps=2", "--warmup=1", "--compile=0"]


@pytest.fixture(autouse=True)
def one_thread():
    """One CPU thread: tiny models gain nothing from more, and lose a lot when the machine's other cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_train_step_runs_ours_and_openclip_and_prints_the_ratio(capsys):
    results = bench.main(["train", *TINY_TRAIN, "--fused_adamw=0"])["tiny"]
    out = capsys.readouterr().out
    assert "ours / open_clip:" in out and "samples/s" in out
    assert results["ratio"] > 0 and np.isfinite(results["ratio"])
    for impl in ("ours", "open_clip"):
        r = results[impl]
        assert r["samples_per_s"] > 0 and np.isfinite(r["loss"])
        assert r["peak_memory_gib"] is None and r["mfu"] is None  # n/a on a CPU: no peak FLOP/s to divide by


def test_every_speed_flag_runs():
    results = bench.main(["train", *TINY_TRAIN, "--fused_adamw=1", "--flash=0", "--grad_checkpointing=1"])["tiny"]
    assert results["ours"]["samples_per_s"] > 0 and results["open_clip"]["samples_per_s"] > 0


@pytest.mark.parametrize("name", ["tiny", "ViT-B-16", "ViT-B-32"])
def test_openclip_baseline_has_our_shapes(name):
    """Same parameter count, so the FLOPs per pair (and MFU) computed from our model hold for open_clip's."""
    cfg = make_config(name)
    args = SimpleNamespace(grad_checkpointing=False, fused_adamw=False)
    meta = torch.device("meta")  # shapes only: instant even for ViT-B
    theirs = bench.build_openclip(cfg, meta, args)[0]
    with meta:
        ours = CLIP(cfg)
    assert sum(p.numel() for p in theirs.parameters()) == ours.num_params()


def test_grad_checkpointing_keeps_loss_and_gradients_and_saves_memory():
    cfg = make_config("tiny")
    images, tokens = bench.fixed_batch(cfg, 8, torch.device("cpu"))
    images = data.normalize_images(images)  # the model's input, as bench's step makes it
    grads, saved_bytes = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = CLIP(cfg)
        model.set_grad_checkpointing(checkpointing)
        saved = []  # what autograd keeps for backward outside the checkpointed blocks
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            loss = clip_loss(**model(images, tokens))
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        saved_bytes.append(sum(saved))
    assert saved_bytes[1] < 0.5 * saved_bytes[0]  # both towers keep only each block's input
    assert torch.equal(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_memory_and_e2e_say_they_need_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: these run for real")
    assert bench.main(["memory"]) == {} and bench.main(["e2e"]) == {}
    assert capsys.readouterr().out.count("needs a CUDA GPU") == 2


def test_largest_batch_search_finds_the_boundary(monkeypatch):
    monkeypatch.setattr(bench, "fits", lambda cfg, batch, args, device: batch <= 1000)
    assert bench.largest_batch(None, None, None, granularity=32) == 992


def test_peak_flops_table(monkeypatch):
    assert bench.peak_flops(torch.device("cpu")) is None
    for name, flops in [("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12),
                        ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA GeForce RTX 4090", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert bench.peak_flops(torch.device("cuda")) == flops


def test_loader_benchmark_runs_every_loader(capsys):
    pytest.importorskip("webdataset", reason="pip install -r requirements-test.txt")
    results = bench.main(["loader", "--source_px=256x192", "--image_px=64", "--loader_samples=48",
                          "--loader_batch=8", "--loader_batches=4", "--repeats=1"])["256x192"]
    assert set(bench.LOADERS) <= set(results)
    assert all(results[name] > 0 for name in bench.LOADERS) and results["ratio"] > 0
    assert "data.py / webdataset + the same transform" in capsys.readouterr().out


def test_loaders_give_batches_of_the_same_shape(tmp_path):
    pytest.importorskip("webdataset", reason="pip install -r requirements-test.txt")
    args = bench.parse_args(["loader", "--image_px=32", "--loader_batch=4", "--loader_batches=2", "--workers=0"])
    shards, captions = bench.write_jpeg_shards(str(tmp_path), 16, 96, 64, samples_per_shard=8)
    tok = Tokenizer.train(captions, vocab_size=300)
    for name, make_loader in bench.LOADERS.items():
        batches = list(make_loader(shards, tok, args))
        assert len(batches) == 2, name
        images, tokens, *_ = batches[0]  # data.py's batches also carry fault counts
        assert images.shape == (4, 3, 32, 32), name
        # ours send uint8, normalised on the device; open_clip's transform normalises in the worker
        assert images.dtype == (torch.float32 if "open_clip" in name else torch.uint8), name
        assert tokens.shape == (4, 77) and (tokens == tok.eot_id).sum() == 4, name


def decode_both_ways(width: int, height: int, image_px: int = 224):
    rng = np.random.default_rng(0)
    jpeg = bench.synthetic_jpeg(rng, width, height, rng.integers(-3, 4, (height, width, 3), dtype=np.int16))
    sample = {"jpg": jpeg, "txt": b"a photo"}
    full, drafted = shards.decode(sample)[0], shards.decode(sample, draft_px=image_px)[0]
    transform = data.ImageTransform(image_px, train=False)  # deterministic: the same crop of the same picture
    diff = (transform(full).float() - transform(drafted).float()).abs()  # in grey levels of 0-255
    return drafted.size, diff


def test_draft_decode_sees_nearly_the_same_image():
    size, diff = decode_both_ways(1024, 768)
    assert size == (512, 384)  # decoded at half scale, still above 224 on both sides
    assert diff.mean() < 1.0 and diff.max() < 8  # JPEG's own error at quality 95 is about one grey level
    assert (round(diff.mean().item(), 1), diff.max().item()) == (0.3, 2)  # docs/results.md


def test_draft_decode_is_a_no_op_below_twice_the_input_size():
    size, diff = decode_both_ways(512, 384)  # DataComp-sized: 384 < 2 x 224
    assert size == (512, 384) and diff.max() == 0


def test_image_transform_normalises_as_the_numpy_formula():
    """The transform's pixels, laid out [3, H, W], and normalize_images gives exactly the floats of
    (x - mean) / std in float32."""
    pixels = np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    x = data.ImageTransform(48, train=False)(Image.fromarray(pixels))  # 48 px already: no resize, no crop
    assert x.dtype == torch.uint8 and torch.equal(x, torch.from_numpy(pixels).permute(2, 0, 1))
    x = data.normalize_images(x)
    mean, std = (np.array(v, np.float32) * 255 for v in (data.CLIP_MEAN, data.CLIP_STD))
    ref = ((pixels.astype(np.float32) - mean) / std).transpose(2, 0, 1)
    assert x.is_contiguous() and torch.equal(x, torch.from_numpy(ref.copy()))


def test_end_to_end_path_runs_on_cpu():
    """The GPU-only e2e benchmark's code, at the tiny size on a CPU: trains from JPEG shards via data.py."""
    args = bench.parse_args(["e2e", *TINY_TRAIN, "--fused_adamw=0", "--source_px=64x48", "--e2e_images=48",
                             "--e2e_steps=3", "--workers=1"])
    r = bench.end_to_end(args, torch.device("cpu"))
    assert r["in_memory"]["samples_per_s"] > 0 and r["from_shards"]["samples_per_s"] > 0
    assert r["from_shards"]["loader_ms_per_step"] >= 0 and r["ratio"] > 0


@pytest.mark.slow
def test_train_py_run_on_jpeg_shards_reports_both_steps(capsys):
    """The GPU figure of train.py's own path, at the tiny size on a CPU: torchrun, one process, two time steps."""
    r = bench.main(["run", "--model=tiny", "--batch_size=16", "--run_steps=4", "--run_images=64", "--compile=0",
                    "--workers=1"])
    assert [s["samples"] for s in r["steps"]] == [64, 64] and all(s["samples_per_s"] > 0 for s in r["steps"])
    assert r["last_interval_samples_per_s"] > 0 and "run: tiny, train.py under torchrun" in capsys.readouterr().out


def test_accumulation_steps_needed_for_a_global_batch():
    assert [bench.accum_steps_needed(4096, gpus, 928) for gpus in (1, 4, 8)] == [8, 2, 1]
    assert bench.accum_steps_needed(4096, 1, 4768) == 1 and bench.accum_steps_needed(96, 1, 40) == 3
