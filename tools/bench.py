"""
Speed benchmarks, each a ratio against what people would otherwise use, measured in the same run
on the same machine. The figures and their readings: docs/scale.md and docs/results.md.

    python tools/bench.py train      # training step, ours vs open_clip: samples/s, memory, MFU
    python tools/bench.py memory     # CUDA: largest batch per GPU, with and without checkpointing
    OMP_NUM_THREADS=1 python tools/bench.py loader   # samples/s per core: data.py vs webdataset
    python tools/bench.py e2e        # CUDA: training from JPEG shards vs in-memory batches
    python tools/bench.py run        # train.py itself for two time steps, under torchrun
    python tools/bench.py table OUT  # the figures tools/gpu_bench.sh left in OUT, as one table

On CUDA the training step runs at ViT-B-16 and ViT-B-32, 256 pairs per GPU, in bf16 autocast with
torch.compile and fused AdamW; on a CPU every command runs at the tiny preset in seconds (memory
and e2e say they need a GPU). Each speed trick is a flag (flag_defaults), so its gain is measured
by turning it off:
    python tools/bench.py train --compile=0 --fused_adamw=0 --flash=0 --grad_checkpointing=1
The baselines are test-only packages (pip install -r requirements-test.txt). open_clip gets its
trainer's best settings (bf16 autocast, torch.compile, ClipLoss with local loss and gather with
grad) and the same optimizer flags as ours.
"""
import gc
import io
import itertools
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project's modules
import data  # noqa: E402
import files  # noqa: E402
import shards  # noqa: E402
import synthetic  # noqa: E402
from settings import parse_flags  # noqa: E402
from model import CLIP, clip_loss, make_config  # noqa: E402
from text import Tokenizer

# dense bf16 peaks from NVIDIA's datasheets; the first key in the device's name wins (PCIe first)
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device: torch.device) -> float | None:
    """The device's peak bf16 FLOP/s, or None on a CPU or a GPU not in the table (MFU: n/a)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def device_name(device: torch.device) -> str:
    return (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu, {torch.get_num_threads()} threads")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- training step
def build_ours(cfg, device, args):
    """(model, forward_loss(images, tokens) -> loss, optimizer, after_step), as train.py trains."""
    with device:  # initialised where it runs: seconds faster for ViT-B on a GPU
        model = CLIP(cfg)
    model.set_grad_checkpointing(args.grad_checkpointing)
    optimizer = model.configure_optimizer(lr=5e-4, fused=args.fused_adamw)
    return (model, lambda images, tokens: clip_loss(**model(images, tokens)), optimizer,
            model.clamp_logit_scale_)


def build_openclip(cfg, device, args):
    """As build_ours, for open_clip's CLIP at cfg's shapes (its own for ViT-B-16 and ViT-B-32),
    its ClipLoss, and AdamW with its trainer's weight-decay split (open_clip_train/main.py)."""
    import open_clip
    from open_clip.loss import ClipLoss
    with device:
        model = open_clip.CLIP(
            embed_dim=cfg.embed_dim, quick_gelu=cfg.quick_gelu,
            vision_cfg=dict(image_size=cfg.image_px, patch_size=cfg.patch_px,
                            width=cfg.vision_width, layers=cfg.vision_layers,
                            head_width=cfg.vision_width // cfg.vision_heads,
                            mlp_ratio=cfg.mlp_ratio),
            text_cfg=dict(context_length=cfg.context_tokens, vocab_size=cfg.vocab_size,
                          width=cfg.text_width, heads=cfg.text_heads, layers=cfg.text_layers,
                          mlp_ratio=cfg.mlp_ratio))
    model.set_grad_checkpointing(args.grad_checkpointing)
    loss = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True)  # as on N GPUs
    no_decay = {n for n, p in model.named_parameters()
                if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n}
    groups = [{"params": [p for n, p in model.named_parameters() if n in no_decay],
               "weight_decay": 0.0},
              {"params": [p for n, p in model.named_parameters() if n not in no_decay],
               "weight_decay": 0.2}]
    optimizer = torch.optim.AdamW(groups, lr=5e-4, betas=(0.9, 0.98), eps=1e-6,
                                  fused=args.fused_adamw)

    def clamp():  # as its trainer does after every step
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
    return model, lambda images, tokens: loss(*model(images, tokens)), optimizer, clamp


IMPLEMENTATIONS = {"ours": build_ours, "open_clip": build_openclip}


def make_step(build, cfg, device, args):
    """step(images, tokens) -> loss: the loader's uint8 images normalised on the device, as
    train.py does, then one optimizer step, with no host synchronisation in it."""
    model, forward_loss, optimizer, after_step = build(cfg, device, args)
    forward_loss = torch.compile(forward_loss) if args.compile else forward_loss
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else nullcontext())

    def step(images, tokens):
        images = data.normalize_images(images)
        with autocast:
            loss = forward_loss(images, tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        after_step()
        return loss
    return step


def run_steps(step, batches, warmup: int, device: torch.device) -> dict:
    """Take warmup steps (compilation, allocator), then time the rest of batches: samples/s, step
    and loader ms (waiting for the next batch; 0 in memory), the last loss, peak memory (CUDA)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batches = iter(batches)
    for images, tokens, *_ in itertools.islice(batches, warmup):  # data.py's carry fault counts
        step(images.to(device, non_blocking=True), tokens.to(device, non_blocking=True))
    sync(device)
    t0, wait_s, n_steps, n_samples, loss = time.perf_counter(), 0.0, 0, 0, None
    while True:
        t = time.perf_counter()
        batch = next(batches, None)
        wait_s += time.perf_counter() - t
        if batch is None:
            break
        loss = step(batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True))
        n_steps, n_samples = n_steps + 1, n_samples + len(batch[0])
    sync(device)
    elapsed = time.perf_counter() - t0
    return {"samples_per_s": n_samples / elapsed, "step_ms": 1e3 * elapsed / n_steps,
            "loader_ms_per_step": 1e3 * wait_s / n_steps,
            "loss": loss.item(),  # after timing: .item() syncs the host
            "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2 ** 30
                                if device.type == "cuda" else None)}


def fixed_batch(cfg, batch: int, device: torch.device):
    """Random uint8 images, as the loader sends them, and tokens of the model's shapes, made once
    and kept on the device."""
    g = torch.Generator().manual_seed(0)
    shape = (batch, 3, cfg.image_px, cfg.image_px)
    images = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    tokens = torch.randint(3, cfg.vocab_size - 1, (batch, cfg.context_tokens), generator=g)
    tokens[:, -1] = cfg.eot_token_id
    return images.to(device), tokens.to(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def train_step(cfg, implementation: str, args, device: torch.device) -> dict:
    """Samples/s, step time, peak memory and MFU of one implementation on in-memory batches."""
    torch.manual_seed(0)
    step = make_step(IMPLEMENTATIONS[implementation], cfg, device, args)
    images, tokens = fixed_batch(cfg, args.batch_size, device)
    with nullcontext() if args.flash else sdpa_kernel(SDPBackend.MATH):  # flash=0: math kernel
        result = run_steps(step, itertools.repeat((images, tokens), args.warmup + args.steps),
                           args.warmup, device)
        if args.profile:
            profile_step(step, images, tokens, device)
    del step
    free_memory(device)
    with torch.device("meta"):  # FLOPs from the shapes alone: open_clip's model has the same shapes
        flops = CLIP(cfg).flops_per_pair()
    peak = peak_flops(device)
    # a training step costs 3 forwards: the forward, and 2x for the backward
    result["mfu"] = 3 * flops * result["samples_per_s"] / peak if peak else None
    return result


def profile_step(step, images, tokens, device: torch.device, rows: int = 25) -> None:
    """Print the operators that take the most device (or CPU) time in one more step."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step(images, tokens)
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70))


def bench_train(args, device) -> dict:
    results = {}
    for name in args.model.split(","):
        cfg = make_config(name)
        print(f"train step: {name}, {args.batch_size} pairs per device on {device.type} "
              f"({device_name(device)}), {'bf16 autocast' if device.type == 'cuda' else 'fp32'}, "
              f"compile {args.compile:d}, fused AdamW {args.fused_adamw:d}, flash SDPA "
              f"{args.flash:d}, grad checkpointing {args.grad_checkpointing:d}, "
              f"{args.steps} steps timed after {args.warmup}")
        rows = {impl: train_step(cfg, impl, args, device)
                for impl in (["ours", "open_clip"] if args.openclip else ["ours"])}
        print(f"  {'':10} {'samples/s':>10} {'step ms':>9} {'peak GiB':>9} {'MFU':>7} {'loss':>7}")
        for impl, r in rows.items():
            mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "n/a"
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            print(f"  {impl:10} {r['samples_per_s']:10.1f} {r['step_ms']:9.1f} {mem:>9} {mfu:>7} "
                  f"{r['loss']:7.3f}")
        if "open_clip" in rows:
            rows["ratio"] = rows["ours"]["samples_per_s"] / rows["open_clip"]["samples_per_s"]
            print(f"  ours / open_clip: {rows['ratio']:.2f}x samples/s")
        results[name] = rows
    return results


# ----------------------------------------------------------------------------- memory
def fits(cfg, batch: int, args, device: torch.device) -> bool:
    """Whether two eager training steps at this batch per GPU run without running out of memory."""
    try:
        step = make_step(build_ours, cfg, device,
                         SimpleNamespace(**{**vars(args), "compile": False}))  # no recompiling
        images, tokens = fixed_batch(cfg, batch, device)
        for _ in range(2):
            step(images, tokens)
        sync(device)
        return True
    except RuntimeError as e:  # OutOfMemoryError, or a CUDA library short of workspace
        if not isinstance(e, torch.cuda.OutOfMemoryError) and "ALLOC_FAILED" not in str(e):
            raise
        return False
    finally:
        step = images = tokens = None
        free_memory(device)


def largest_batch(cfg, args, device: torch.device, granularity: int = 32) -> int:
    """Double the batch until it does not fit, then bisect to a multiple of granularity."""
    fit, fail = 0, granularity
    while fits(cfg, fail, args, device):
        fit, fail = fail, 2 * fail
    while fail - fit > granularity:
        middle = (fit + fail) // 2 // granularity * granularity
        fit, fail = (middle, fail) if fits(cfg, middle, args, device) else (fit, middle)
    return fit


def bench_memory(args, device) -> dict:
    if device.type != "cuda":
        print("memory: needs a CUDA GPU (it searches for the batch that runs out of GPU memory); "
              "skipped on CPU")
        return {}
    name = args.model.split(",")[0]
    total_gib = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
    results = {}
    for checkpointing in (False, True):
        run_args = SimpleNamespace(**{**vars(args), "grad_checkpointing": checkpointing})
        results[f"grad_checkpointing={checkpointing:d}"] = batch = largest_batch(
            make_config(name), run_args, device)
        print(f"memory: {name} on {device_name(device)} ({total_gib:.0f} GiB), bf16 autocast, "
              f"eager, fused AdamW {args.fused_adamw:d}: grad checkpointing {checkpointing:d}: "
              f"largest batch per GPU {batch} (to 32), the largest micro-batch with "
              f"--accum_steps; the paper's global batch of {args.global_batch}: "
              + ", ".join(f"{gpus} GPU(s) "
                          f"accum_steps={accum_steps_needed(args.global_batch, gpus, batch)}"
                          for gpus in (1, 4, 8)))
    return results


def accum_steps_needed(global_batch: int, gpus: int, micro_batch: int) -> int | None:
    """The fewest micro-batches per GPU that take global_batch on gpus with at most micro_batch
    pairs at a time (they must divide each GPU's share evenly); None if none does."""
    local = global_batch // gpus
    return next((k for k in range(1, local + 1) if local % k == 0 and local // k <= micro_batch),
                None)


# ----------------------------------------------------------------------------- loader
def synthetic_jpeg(rng: np.random.Generator, width: int, height: int, noise: np.ndarray) -> bytes:
    """A photo-sized JPEG: a smooth random picture plus fine texture, ~2 bits per pixel at quality
    95 (img2dataset's default, with which DataComp's shards were written)."""
    low = rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
    picture = np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC),
                         dtype=np.int16)
    out = io.BytesIO()
    Image.fromarray((picture + noise).clip(0, 255).astype(np.uint8)).save(
        out, format="JPEG", quality=95)
    return out.getvalue()


def write_jpeg_shards(folder: str, n_samples: int, width: int, height: int,
                      samples_per_shard: int = 100,
                      seed: int = 0) -> tuple[list[tuple[str, int]], list[str]]:
    """Webdataset shards of KEY.jpg + KEY.txt in folder: ([(path, samples)], captions)."""
    rng = np.random.default_rng(seed)
    noise = [rng.integers(-3, 4, (height, width, 3), dtype=np.int16)
             for _ in range(4)]  # 4 textures, reused
    written, captions = [], []
    for shard, start in enumerate(range(0, n_samples, samples_per_shard)):
        path, n = (os.path.join(folder, f"{shard:06d}.tar"),
                   min(samples_per_shard, n_samples - start))
        with tarfile.open(path, "w") as tf:
            for i in range(start, start + n):
                colour, shape = rng.choice(list(synthetic.COLOURS)), rng.choice(synthetic.SHAPES)
                captions.append(f"a photo of a {colour} {shape}, number {i}")
                shards.add_member(tf, f"{i:07d}.jpg",
                                  synthetic_jpeg(rng, width, height, noise[i % len(noise)]))
                shards.add_member(tf, f"{i:07d}.txt", captions[-1].encode())
        written.append((path, n))
    return written, captions


def ours_loader(shards, tok, args, draft: bool = True):
    """data.py's training stream, as train.py uses it (shuffle buffer, resampled shards, per-batch
    tokens); draft=False decodes every JPEG at full size."""
    stream = data.TrainStream([data.Part("bench", shards)], args.loader_batches * args.loader_batch,
                              args.loader_batch, 0, 1, seed=0, time_step=0, image_px=args.image_px,
                              tokenizer=tok, context_tokens=77,
                              shuffle_buffer=args.loader_batch * 4)
    if not draft:
        stream.draft_px = None
    return data.train_loader(stream, args.workers)


def webdataset_loader(shards, tok, args, transform):
    """webdataset's pipeline as open_clip builds it (resampled shards, shuffle, decode to RGB PIL
    images, transform in a map, batches), with our shuffle buffer and per-batch tokenizer."""
    import webdataset as wds
    pipeline = wds.DataPipeline(
        wds.ResampledShards([path for path, _ in shards]), wds.tarfile_to_samples(),
        wds.shuffle(args.loader_batch * 4), wds.decode("pilrgb"), wds.to_tuple("jpg", "txt"),
        wds.map_tuple(transform, str.strip),
        wds.batched(args.loader_batch, partial=False,
                    collation_fn=lambda s: (torch.stack([x for x, _ in s]),
                                            tok([t for _, t in s], 77))),
    ).with_epoch(nbatches=args.loader_batches)
    return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=args.workers)


def same_transform(args):
    transform, rng = data.ImageTransform(args.image_px, train=True), np.random.default_rng(0)
    return lambda img: transform(img, rng)


def openclip_transform(args):
    import open_clip
    return open_clip.image_transform(args.image_px, is_train=True)  # torchvision's, on PIL images


LOADERS = {  # name -> loader(shards, tokenizer, args)
    "data.py": ours_loader,
    "data.py without draft": lambda shards, tok, args: ours_loader(shards, tok, args, draft=False),
    "webdataset + the same transform":
        lambda shards, tok, args: webdataset_loader(shards, tok, args, same_transform(args)),
    "webdataset + open_clip's transform":
        lambda shards, tok, args: webdataset_loader(shards, tok, args, openclip_transform(args)),
}


def loader_samples_per_s(loader) -> float:
    """Samples/s after the first batch, which starts the worker and fills the shuffle buffer."""
    batches = iter(loader)
    next(batches)
    t0, n = time.perf_counter(), 0
    for images, *_ in batches:
        n += len(images)
    return n / (time.perf_counter() - t0)


def bench_loader(args, device) -> dict:
    results = {}
    for source in args.source_px.split(","):
        width, height = (int(v) for v in source.split("x"))
        with tempfile.TemporaryDirectory() as folder:
            shards, captions = write_jpeg_shards(folder, args.loader_samples, width, height)
            kb = sum(os.path.getsize(p) for p, _ in shards) / args.loader_samples / 1e3
            tok = Tokenizer.train(captions, vocab_size=1024)
            best = {name: 0.0 for name in LOADERS}
            for _ in range(args.repeats):  # interleaved, best of: other load only slows a run
                for name, make_loader in LOADERS.items():
                    best[name] = max(best[name],
                                     loader_samples_per_s(make_loader(shards, tok, args)))
        print(f"loader: {args.loader_samples} JPEGs of {width}x{height} px (~{kb:.0f} kB) -> "
              f"{args.image_px} px train augmentation, {args.workers} worker, "
              f"{args.loader_batch}-sample batches, best of {args.repeats}")
        for name, samples_per_s in best.items():
            print(f"  {name:36} {samples_per_s:8.1f} samples/s per core")
        ratio = best["data.py"] / best["webdataset + the same transform"]
        print(f"  data.py / webdataset + the same transform: {ratio:.2f}x; "
              f"/ webdataset + open_clip's transform: "
              f"{best['data.py'] / best[list(LOADERS)[-1]]:.2f}x; draft mode: "
              f"{best['data.py'] / best['data.py without draft']:.2f}x")
        results[source] = {**best, "ratio": ratio}
    return results


# ----------------------------------------------------------------------------- end to end
def end_to_end(args, device) -> dict:
    """Train from data.py's loader over generated JPEG shards and from in-memory batches of the
    same shapes: both results and their ratio."""
    name = args.model.split(",")[0]
    width, height = (int(v) for v in args.source_px.split(",")[0].split("x"))
    with tempfile.TemporaryDirectory() as folder:
        shards, captions = write_jpeg_shards(folder, args.e2e_images, width, height)
        tok = Tokenizer.train(captions, vocab_size=1024)
        cfg = make_config(name, eot_token_id=tok.eot_id)  # our ids fit the preset's vocabulary
        in_memory = train_step(cfg, "ours", args, device)
        warmup = max(args.warmup, 2 * args.workers)  # also drain the 2 batches a worker prefetches
        stream = data.TrainStream([data.Part("bench", shards)],
                                  (warmup + args.e2e_steps) * args.batch_size, args.batch_size,
                                  0, 1, seed=0, time_step=0, image_px=cfg.image_px, tokenizer=tok,
                                  context_tokens=cfg.context_tokens)
        torch.manual_seed(0)
        step = make_step(build_ours, cfg, device, args)
        with nullcontext() if args.flash else sdpa_kernel(SDPBackend.MATH):
            from_shards = run_steps(step, data.train_loader(stream, args.workers), warmup, device)
    ratio = from_shards["samples_per_s"] / in_memory["samples_per_s"]
    print(f"e2e: {name}, {args.batch_size} pairs per device on {device_name(device)}, "
          f"{args.workers} loader workers, {width}x{height} px JPEGs: "
          f"in memory {in_memory['samples_per_s']:.1f} samples/s; from shards "
          f"{from_shards['samples_per_s']:.1f} samples/s ({100 * ratio:.0f}%), waiting "
          f"{from_shards['loader_ms_per_step']:.1f} ms per step of {from_shards['step_ms']:.1f} ms "
          f"for the loader")
    return {"in_memory": in_memory, "from_shards": from_shards, "ratio": ratio}


def bench_e2e(args, device) -> dict:
    if device.type != "cuda":
        print("e2e: needs a CUDA GPU (it asks whether the loader keeps a GPU fed); skipped on CPU")
        return {}
    return end_to_end(args, device)


# ----------------------------------------------------------------------------- train.py itself
def write_jpeg_benchmark(root: str, years, train_samples: int, eval_samples: int, px: int) -> None:
    """A TiC layout of generated px x px JPEGs: root/train/YEAR and root/eval/retrieval/YEAR,
    each with a sizes.json."""
    for i, year in enumerate(years):
        for j, (split, n) in enumerate((("train", train_samples), ("retrieval", eval_samples))):
            folder = os.path.join(root, *shards.SPLITS[split], str(year))
            os.makedirs(folder)
            written, _ = write_jpeg_shards(folder, n, px, px, seed=2 * i + j)
            files.write_json(os.path.join(folder, "sizes.json"),
                              {os.path.basename(p): k for p, k in written})


def bench_run(args, device) -> dict:
    """train.py itself for two time steps on generated JPEG shards at the model's input size,
    under torchrun with one process: a real run's path (compile warm-up, the DDP wrapper, resume
    and step checkpoints, evaluation), timed from its log."""
    name = args.model.split(",")[0]
    px = make_config(name).image_px
    with tempfile.TemporaryDirectory() as folder:
        root, run = os.path.join(folder, "data"), os.path.join(folder, "run")
        write_jpeg_benchmark(root, (2018, 2019), args.run_images, args.run_images // 4, px)
        budget = args.run_steps * args.batch_size
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               os.path.join(ROOT, "train.py"), f"--data_root={root}", f"--out_dir={run}",
               f"--model={name}", "--strategy=sequential", f"--budget_samples={budget}",
               f"--batch_size={args.batch_size}", f"--compile={args.compile}",
               f"--device={args.device}", f"--workers={args.workers}",
               f"--log_interval={max(1, args.run_steps // 4)}",
               f"--ckpt_interval_samples={budget // 2}", "--warmup_iters=2",
               "--warmup_iters_later=2", f"--eval_batch={args.batch_size}"]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        wall_s = time.perf_counter() - t0
        if out.returncode != 0:
            raise SystemExit(f"run: train.py failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
        log = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
    steps = [{"samples": r["samples_seen"], "train_s": r["train_s"],
              "samples_per_s": r["samples_seen"] / r["train_s"]}
             for r in log if r["event"] == "step_end"]
    last = [r["samples_per_s"] for r in log if r["event"] == "train" and r["time_step"] == 2][-1]
    print(f"run: {name}, train.py under torchrun (1 process, DDP), compile {args.compile:d}, "
          f"2 steps of {budget} samples from {px} px JPEGs, {args.workers} loader workers: "
          f"step 1 {steps[0]['samples_per_s']:.1f} samples/s (compile included), "
          f"step 2 {steps[1]['samples_per_s']:.1f}, its last log interval {last:.1f} samples/s; "
          f"the whole command {wall_s:.0f}s (evaluation and checkpoints included)")
    return {"steps": steps, "last_interval_samples_per_s": last, "wall_s": wall_s}


BENCHMARKS = {"train": bench_train, "memory": bench_memory, "loader": bench_loader,
              "e2e": bench_e2e, "run": bench_run}


def table(folder: str) -> str:
    """One table of the figures tools/gpu_bench.sh leaves in folder (NAME.json, one a benchmark)."""
    def load(name):
        path = os.path.join(folder, f"{name}.json")
        return json.load(open(path)) if os.path.exists(path) else None
    lines = [f"{'figure':58} {'ours':>10} {'open_clip':>10} {'ratio':>7} {'MFU':>6}"]
    for name in ("train_b16", "train_b32"):
        for model, r in ((load(name) or {}).get("results") or {}).items():
            mfu = f"{100 * r['ours']['mfu']:.1f}%" if r["ours"]["mfu"] else "n/a"
            lines.append(f"{model + ' train step, samples/s per GPU':58} "
                         f"{r['ours']['samples_per_s']:10.1f} "
                         f"{r['open_clip']['samples_per_s']:10.1f} {r['ratio']:6.2f}x {mfu:>6}")
    memory = (load("memory") or {}).get("results")
    if memory:
        lines.append(f"{'largest batch per GPU, without / with grad checkpointing':58} "
                     f"{memory['grad_checkpointing=0']:>5} / {memory['grad_checkpointing=1']}")
    e2e = (load("e2e") or {}).get("results")
    if e2e:
        lines.append(f"{'end to end from JPEG shards, samples/s (% of in-memory)':58} "
                     f"{e2e['from_shards']['samples_per_s']:10.1f} ({100 * e2e['ratio']:.0f}%)")
    run = (load("run") or {}).get("results")
    if run:
        lines.append(f"{'train.py, 2 steps: step 2 samples/s, its last interval':58} "
                     f"{run['steps'][1]['samples_per_s']:10.1f} "
                     f"{run['last_interval_samples_per_s']:10.1f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line
def flag_defaults() -> dict:
    """Every --key=value of bench.py and its default: paper-scale on CUDA, tiny on a CPU."""
    cuda = torch.cuda.is_available()
    return {
        "device": "cuda" if cuda else "cpu",
        "model": "ViT-B-16,ViT-B-32" if cuda else "tiny",  # model.PRESETS; memory, e2e: the first
        "batch_size": 256 if cuda else 64,   # pairs per device per step
        "steps": 20 if cuda else 5,          # timed training steps
        "warmup": 5 if cuda else 2,          # untimed steps first (compilation)
        "compile": cuda,                     # torch.compile the forward and the loss
        "fused_adamw": cuda,                 # AdamW's update as one kernel
        "flash": True,                       # let SDPA use flash attention; 0: math kernel only
        "grad_checkpointing": False,         # recompute activations in backward
        "openclip": True,                    # train: also measure open_clip
        "profile": False,                    # train: then profile a step, print the top operators
        "source_px": "512x384,1024x768",     # WxH of the JPEGs written (loader; e2e: the first);
                                             # DataComp's are at most 512 px on the long side
        "image_px": 224,                     # loader: the model's input size
        "loader_samples": 400,               # loader: JPEGs written to the shards
        "loader_batch": 32,                  # loader: samples per batch
        "loader_batches": 12,                # loader: batches read per measurement
        "repeats": 2,                        # loader: measurements per loader, the best kept
        "workers": -1,                       # DataLoader workers; -1: loader 1, else cores - 1
        "e2e_steps": 100,                    # e2e: timed steps on the loader's batches
        "e2e_images": 2048,                  # e2e: JPEGs written (the loader cycles over them)
        "run_steps": 40 if cuda else 4,      # run: iterations of each of train.py's two time steps
        "run_images": 1024 if cuda else 64,  # run: training JPEGs per year (1/4 as many held out)
        "global_batch": 4096,                # memory: global batch to reach (DataComp medium's)
        "threads": 0 if cuda else 1,         # CPU threads, 0: torch's default; 1 gives a per-core
                                             # figure, the least disturbed by other load
        "json": "",                          # also write the results to this JSON file
    }


def parse_args(argv: list[str]) -> SimpleNamespace:
    """python tools/bench.py BENCHMARK --key=value ..."""
    if not argv or argv[0] not in BENCHMARKS:
        raise SystemExit(f"usage: python tools/bench.py {'|'.join(BENCHMARKS)} --key=value ...; "
                         f"keys: {', '.join(flag_defaults())}\n"
                         f"   or: python tools/bench.py table FOLDER (gpu_bench.sh's)")
    args = SimpleNamespace(benchmark=argv[0], **parse_flags(argv[1:], flag_defaults()))
    if args.workers < 0:
        args.workers = 1 if args.benchmark == "loader" else max(1, (os.cpu_count() or 2) - 1)
    return args


def main(argv: list[str]) -> dict:
    if argv[:1] == ["table"] and len(argv) == 2:
        print(table(argv[1]))
        return {}
    args = parse_args(argv)
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as train.py and open_clip's trainer
        torch.backends.cudnn.allow_tf32 = True
    results = BENCHMARKS[args.benchmark](args, device)
    if args.json:
        files.write_json(args.json, {"benchmark": args.benchmark, "args": vars(args),
                                      "device": device_name(device), "results": results})
    torch.set_num_threads(threads)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
