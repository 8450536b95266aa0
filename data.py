"""
The data of time-continual CLIP training: each time step's training stream (shards in, batches
out, replay buffers chosen by hash, every rank the same number of batches, an exact position to
resume from) and the evaluation batches. The images' transforms are here; reading shards and their
samples is shards.py's, captions to tokens text.py's, counting bad data faults.py's. Follows the
webdataset conventions that OpenCLIP reads (resampled shards, a shuffle buffer, equal batches per
rank), written from scratch without the webdataset package.
"""
import functools
import hashlib
import heapq
import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

import shards
from faults import EvalReading, FaultLog, WorkerCounts, read_shard
from text import Tokenizer
from world import loader_worker_init

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's per-channel image statistics
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# -----------------------------------------------------------------------------
# Selecting samples by hash

VALIDATION_FRACTION = 0.02  # of each year's training pairs: never trained on, to tune patching
VALIDATION_SEED = 2 ** 31 - 1  # no replay buffer's seed: the two selections are independent


def is_validation(key: str) -> bool:
    """Is this training pair in the validation split, which no strategy trains on? (keep_sample)"""
    return keep_sample(key, VALIDATION_FRACTION, VALIDATION_SEED)


def keep_sample(key: str, fraction: float, seed: int | str) -> bool:
    """Is this sample in the replay buffer of this fraction? A hash of (seed, key) as u in [0, 1),
    kept iff u < fraction: the same on every process and run, and a smaller buffer is a subset of
    a larger one (how strategies use it: strategies.py)."""
    return sample_hash(key, seed) < fraction


def sample_hash(key: str, seed: int | str) -> float:
    """u in [0, 1) of a sample: a hash of (seed, key), as keep_sample compares it."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2 ** 64


# -----------------------------------------------------------------------------
# Images

class ImageTransform:
    """PIL image -> uint8 tensor [3, px, px], as OpenCLIP: train = random resized crop
    (scale 0.9-1, ratio 3/4-4/3) with bicubic resize; eval = bicubic resize of the short
    side + centre crop (open_clip's preprocess). Both resize in the image's own mode and convert
    to RGB after, as open_clip does: Pillow resizes a palette image by its nearest pixel and one
    with alpha premultiplied. The model takes normalize_images of a batch of them."""

    def __init__(self, image_px: int, train: bool):
        self.image_px, self.train = image_px, train

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        W, H = img.size
        px = self.image_px
        if self.train:
            rng = rng if rng is not None else np.random.default_rng()  # the stream passes its own
            img = img.resize((px, px), Image.BICUBIC, box=self.crop_box(W, H, rng))
        else:
            # torchvision's Resize(px): the short side px, the long one int(px * long / short)
            w, h = (px, int(px * H / W)) if W <= H else (int(px * W / H), px)
            if (w, h) != (W, H):
                img = img.resize((w, h), Image.BICUBIC)
            top, left = int(round((h - px) / 2)), int(round((w - px) / 2))
            img = img.crop((left, top, left + px, top + px))
        img = img.convert("RGB")
        return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()

    @staticmethod
    def crop_box(W: int, H: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """The training crop (left, top, right, bottom) of a W x H image, drawn from rng as
        torchvision's RandomResizedCrop draws it: 10 tries, then the whole image."""
        for _ in range(10):
            area = H * W * rng.uniform(0.9, 1.0)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= W and 0 < h <= H:
                top, left = rng.integers(0, H - h + 1), rng.integers(0, W - w + 1)
                return left, top, left + w, top + h
        return 0, 0, W, H


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [..., 3, px, px] (ImageTransform's, batched) -> the float32 input the model
    takes, (x - mean) / std with CLIP's per-channel statistics, on the images' device. Call it
    after the copy to the device: uint8 is a quarter of float32's bytes. Raises TypeError for
    images of any other dtype."""
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize_images: got {images.dtype} images; pass the loader's uint8 "
                        f"pixels (a float batch goes to the model as it is)")
    mean, std = _pixel_stats(images.device)
    return images.float().sub_(mean).div_(std)  # in place on the new float tensor: one allocation


def on_device(images: torch.Tensor, tokens: torch.Tensor, device: torch.device) -> dict:
    """A loader's batch on the device, as the model takes it: {"images": normalize_images of
    them, "tokens"}. The copy is of uint8 pixels: a quarter of float32's bytes."""
    images = images.to(device, non_blocking=True)
    tokens = tokens.to(device, non_blocking=True)
    return {"images": normalize_images(images), "tokens": tokens}


@functools.cache
def _pixel_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's mean and std in 0-255 pixel units, [3, 1, 1] on device; cached, as a copy to a GPU
    at every batch would make the host wait for the GPU."""
    return tuple((torch.tensor(v).view(3, 1, 1) * 255).to(device) for v in (CLIP_MEAN, CLIP_STD))


# -----------------------------------------------------------------------------
# The training stream and evaluation batches

@dataclass
class Part:
    """One year's training data as a strategy sees it; keep_fraction < 1: a replay buffer."""
    name: str  # e.g. "2019"
    shards: list  # [(path, samples)]
    keep_fraction: float = 1.0  # keep a sample iff keep_sample(key, keep_fraction, seed)
    share: float | None = None  # of the samples trained on; None: in proportion to n_samples

    @property
    def n_samples(self) -> float:
        return sum(n for _, n in self.shards) * self.keep_fraction  # expected samples


class TrainStream(IterableDataset):
    """Endless resampled shards cut to a budget: this rank yields exactly
    budget_samples // global_batch local batches (uint8 images [b, 3, px, px] for
    normalize_images, tokens [b, ctx], faults), spread over its DataLoader workers, so every rank
    takes the same number of steps. Shards are drawn with replacement, so the mix of parts follows
    their sizes after replay-buffer filtering, or the shares that parts carry (Part.share).

    Exact resume: a worker makes its batches in chunks of chunk_samples, and each chunk draws its
    shards and fills its shuffle buffer from its own RNG, seeded by (seed, time_step, rank, worker,
    chunk): the batches from any point on depend on that point only. With start_batch=k the loader
    yields batches k, k+1, ... exactly as an uninterrupted run does, remaking (not training on) at
    most one chunk per worker. Bad data is skipped and counted (faults.py): each batch comes with
    the counts since the one before; a worker past max_bad_fraction yields (None, None, faults)."""

    def __init__(self, parts: list[Part], budget_samples: int, global_batch: int, rank: int,
                 world_size: int, seed: int, time_step: int, image_px: int, tokenizer: Tokenizer,
                 context_tokens: int, shuffle_buffer: int = 1000, keep_seed: int = 0,
                 start_batch: int = 0, chunk_samples: int = 100_000,
                 max_bad_fraction: float = 1.0, max_image_pixels: int = shards.MAX_IMAGE_PIXELS,
                 stream: int = 0):
        if global_batch % world_size:
            raise ValueError(f"global_batch {global_batch} is not divisible by world_size "
                             f"{world_size}; pick a multiple of {world_size}")
        # a drawn shard is read whole, so a uniform draw already follows the shards' sizes
        # (a draw weighted by size too would count it twice: share ~ size**2)
        self.shards = [(path, n, p.keep_fraction) for p in parts for path, n in p.shards
                       if n * p.keep_fraction > 0]
        if not self.shards:
            raise ValueError(f"no samples to train on in parts {[p.name for p in parts]}")
        # parts with shares (new_data_fraction): draw a shard with p ~ share / its part's samples
        self.draw_p = None
        if all(p.share is not None for p in parts):
            weights = np.array([p.share / p.n_samples for p in parts for path, n in p.shards
                                if n * p.keep_fraction > 0])
            self.draw_p = weights / weights.sum()
        self.local_batch = global_batch // world_size
        self.n_batches = budget_samples // global_batch
        self.rank, self.seed, self.time_step, self.stream = rank, seed, time_step, stream
        self.transform = ImageTransform(image_px, train=True)
        self.draft_px = image_px  # decode big JPEGs at reduced scale (None: full size); see _decode
        self.max_image_pixels = max_image_pixels
        self.tokenizer, self.context_tokens = tokenizer, context_tokens
        self.shuffle_buffer, self.keep_seed = shuffle_buffer, keep_seed
        self.start_batch, self.chunk_samples, self.max_bad_fraction = (start_batch, chunk_samples,
                                                                       max_bad_fraction)
        self.min_read = max(100, 50 * max(n for _, n, _ in self.shards))  # see too_much_bad
        self.log = FaultLog()  # what this process skipped, said once per shard and sample

    def __len__(self):
        return self.n_batches - self.start_batch

    def __iter__(self):
        info = get_worker_info()  # None in the main process (num_workers=0)
        return self.batches(info.id, info.num_workers) if info else self.batches(0, 1)

    def samples(self, rng: np.random.Generator, faults: Counter | None = None,
                too_bad=lambda: False) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        """Endless (shard, key, raw sample) from shards drawn with replacement (read_shard). Ends
        when too_bad()."""
        faults = Counter() if faults is None else faults
        empty_shards = 0
        while not too_bad():
            drawn = (rng.integers(len(self.shards)) if self.draw_p is None else
                     rng.choice(len(self.shards), p=self.draw_p))
            path, listed, keep_fraction = self.shards[drawn]
            found = False
            for key, sample in self.read_shard(path, listed, keep_fraction, faults):
                found = True
                yield path, key, sample
            empty_shards = 0 if found else empty_shards + 1
            if empty_shards > 1000:  # rather than spin forever on shards that hold nothing usable
                raise RuntimeError(f"1000 shards in a row gave no samples (last {path}); "
                                   f"check the data")

    def read_shard(self, path: str, listed: int, keep_fraction: float,
                   faults: Counter) -> Iterator[tuple[str, dict[str, bytes]]]:
        """(key, raw sample) of one shard's samples to train on: validation pairs and those outside
        the replay buffer (keep_fraction) left out; bad ones skipped and counted (faults.py)."""
        def wanted(key: str) -> bool:
            return not is_validation(key) and (
                keep_fraction >= 1 or keep_sample(key, keep_fraction, self.keep_seed))
        return read_shard(path, listed, wanted, faults, self.log)

    def chunk(self, rng: np.random.Generator, n_batches: int, faults: Counter, too_bad):
        """n_batches (images, tokens) through a fresh shuffle buffer filled from shards drawn by
        rng; None and stop once too_bad()."""
        buffer, images, captions, taken = [], [], [], []  # taken: (shard, key) of each
        samples = self.samples(rng, faults, too_bad)
        while n_batches > 0:
            # shuffle buffer: hold raw samples (small) and decode only the one drawn out
            while len(buffer) < max(1, self.shuffle_buffer):
                drawn = next(samples, None)
                if drawn is None:
                    yield None
                    return
                buffer.append(drawn)
            i = rng.integers(len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            path, key, sample = buffer.pop()
            try:
                img, text = shards.decode(sample, draft_px=self.draft_px,
                                          max_pixels=self.max_image_pixels)
                images.append(self.transform(img, rng))
            except Exception as e:
                self.log.skip(faults, "corrupt_image", path, f"sample {key}", why=f" ({e})")
                continue
            captions.append(text)
            taken.append((path, key))
            if len(images) == self.local_batch:
                tokens, kept = self.log.tokenize(self.tokenizer, captions, self.context_tokens,
                                                 taken, faults)
                if len(kept) < len(images):  # a caption it refuses: its sample counted, draw more
                    images, captions, taken = ([x[i] for i in kept]
                                               for x in (images, captions, taken))
                    continue
                yield torch.stack(images), tokens
                images, captions, taken, n_batches = [], [], [], n_batches - 1

    def batches(self, worker: int,
                num_workers: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
        """The batches of one DataLoader worker, from start_batch on: its share is
        n_batches // num_workers, plus one for the first few."""
        # the loader takes batches from its workers in turn, from worker 0: batch i is role
        # i % num_workers's; on resume, worker 0 plays the role that makes batch start_batch
        role = (worker + self.start_batch) % num_workers
        n = self.n_batches // num_workers + (role < self.n_batches % num_workers)
        # this role's batches trained on before
        done = (self.start_batch - role + num_workers - 1) // num_workers
        per_chunk = max(1, self.chunk_samples // self.local_batch)
        counts = WorkerCounts(self.max_bad_fraction, self.min_read)  # this worker's bad data
        for chunk in range(done // per_chunk, -(-n // per_chunk) if done < n else 0):
            # chunk 0's seed has no index: a step of one chunk draws one plain stream per worker;
            # a strategy's own stream (stream > 0) has six numbers, training's at most five
            rng = np.random.default_rng([self.seed, self.time_step, self.rank, role]
                                        + ([chunk, self.stream] if self.stream else
                                           [chunk] * (chunk > 0)))
            first = chunk * per_chunk
            chunk_batches = self.chunk(rng, min(per_chunk, n - first), counts.new, counts.too_bad)
            for i, batch in enumerate(chunk_batches, first):
                if batch is None:  # too much bad data: the main process stops the run
                    yield None, None, counts.sent()
                    return
                sent = counts.sent()  # the counts since the batch before go with this one
                if i >= done:  # the batches before start_batch are remade, not yielded
                    yield *batch, sent


def smallest_hashes(stream: TrainStream, k: int) -> tuple[list[float], Counter]:
    """The k smallest sample hashes (sample_hash with the stream's keep_seed) of the samples its
    shards hold that could be trained on, in order, each shard read once; and the faults of that
    read, with the samples read. As a keep fraction, hashes[j] keeps exactly the j smallest: a
    replay buffer of exactly j samples, nested as j shrinks."""
    faults, hashes = Counter(), []
    for path, listed, _ in stream.shards:
        hashes += [sample_hash(key, stream.keep_seed)
                   for key, _ in stream.read_shard(path, listed, 1.0, faults)]
        hashes = heapq.nsmallest(k, hashes)
    return hashes, faults


def train_loader(stream: TrainStream, num_workers: int) -> DataLoader:
    """Batches come whole from the stream (batch_size=None); workers start afresh each time step."""
    return DataLoader(stream, batch_size=None, num_workers=num_workers, persistent_workers=False,
                      pin_memory=torch.cuda.is_available(), worker_init_fn=loader_worker_init)


def eval_batches(shard_list: list, image_px: int, batch_samples: int, validation_only: bool = False,
                 max_samples: int | None = None, target: str = "caption",
                 max_bad_fraction: float = 0.05, max_image_pixels: int = shards.MAX_IMAGE_PIXELS,
                 ) -> Iterator[tuple[torch.Tensor, list, list[str]]]:
    """Held-out samples in shard order: (uint8 images [b, 3, px, px] for normalize_images,
    captions, keys), or class ids instead of captions for target="class", lists of captions for
    "captions"; deterministic, one process. shard_list: [(path, samples listed, or None where no
    count is listed)]. validation_only: only the training pairs of the validation split, at most
    max_samples of them. What cannot be scored is skipped, counted and said in one line at the end;
    past max_bad_fraction the task is not scored (faults.EvalReading): a smaller gallery scores
    higher, so it must be noticed."""
    transform, batch = ImageTransform(image_px, train=False), []
    reading = EvalReading(shard_list, is_validation if validation_only else None, max_samples)
    for path, key, sample in reading.samples():
        try:
            decoded = shards.decode(sample, target, max_pixels=max_image_pixels)
        except Exception as e:
            reading.skip("corrupt_image", f"{path}: sample {key} ({e})")
            continue
        if decoded is None:
            missing = "image" if shards.image_ext(sample) is None else target.removesuffix("s")
            reading.skip(f"missing_{missing}", f"{path}: sample {key}")
            continue
        batch.append((transform(decoded[0]), decoded[1], key))
        if len(batch) == batch_samples:
            yield torch.stack([b[0] for b in batch]), [b[1] for b in batch], [b[2] for b in batch]
            batch = []
    if batch:
        yield torch.stack([b[0] for b in batch]), [b[1] for b in batch], [b[2] for b in batch]
    reading.finish(max_bad_fraction)
