"""
Data for time-continual CLIP training: the samples of TiC tar shards (shards.py reads them), the
image transforms, a BPE tokenizer, the replay and validation selections, the training stream that
gives every rank the same number of batches, and the evaluation batches. synthetic.py writes the
built-in benchmark's shards; tools/prepare.py makes the layout from timestamped shards. Follows the
webdataset conventions that OpenCLIP reads (resampled shards, a shuffle buffer, equal batches per
rank), written from scratch without the webdataset package.
"""
import functools
import hashlib
import heapq
import io
import json
import math
import multiprocessing
import os
import signal
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

import shards
from cleaning import clean_text, fix_surrogates  # CLIP's caption cleaning, without ftfy

# tokenizers' thread pool warns at every DataLoader fork; one caption batch gains nothing from it
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import tokenizers  # noqa: E402

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's per-channel image statistics
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")  # all Pillow may decode: not EPS (Ghostscript), ...

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
# Images and text

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


@functools.cache
def _pixel_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's mean and std in 0-255 pixel units, [3, 1, 1] on device; cached, as a copy to a GPU
    at every batch would make the host wait for the GPU."""
    return tuple((torch.tensor(v).view(3, 1, 1) * 255).to(device) for v in (CLIP_MEAN, CLIP_STD))


class Tokenizer:
    """Byte-level BPE from the `tokenizers` package, trained on the captions, or a loaded
    tokenizer.json (such as CLIP's, made by `python tools/prepare.py clip-tokenizer`). Captions are
    cleaned first, as CLIP does (cleaning.clean_text). Rows are [sot] + tokens + [eot] + padding,
    so a text model can pool at the eot position."""

    def __init__(self, tok: tokenizers.Tokenizer):
        self.tok = tok
        vocab = tok.get_vocab()
        self.sot_id = vocab.get("<start_of_text>", vocab.get("<|startoftext|>"))
        self.eot_id = vocab.get("<end_of_text>", vocab.get("<|endoftext|>"))
        if self.sot_id is None or self.eot_id is None:
            raise SystemExit("tokenizer has no <start_of_text>/<end_of_text> (or CLIP's "
                             "<|startoftext|>/<|endoftext|>) tokens; train one with "
                             "Tokenizer.train")
        self.pad_id = 0
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def train(cls, captions: Iterable[str], vocab_size: int = 1024) -> "Tokenizer":
        tok = tokenizers.Tokenizer(tokenizers.models.BPE())
        tok.normalizer = tokenizers.normalizers.Lowercase()
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size, show_progress=False,
            special_tokens=["<pad>", "<start_of_text>", "<end_of_text>"],  # ids 0, 1, 2
            # all 256 bytes, so any text encodes
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(captions, trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        try:
            return cls(tokenizers.Tokenizer.from_file(path))
        except Exception as e:  # tokenizers raises a bare Exception, missing file or malformed
            raise SystemExit(f"{path}: not a readable tokenizer.json ({e}); "
                             f"point at the run's tokenizer.json")

    def save(self, path: str) -> None:
        shards.write_atomic(path, lambda f: f.write(self.tok.to_str(pretty=True).encode()))

    def __getstate__(self):  # pickle as JSON text, so DataLoader workers get a copy
        return self.tok.to_str()

    def __setstate__(self, state):
        self.__init__(tokenizers.Tokenizer.from_str(state))

    def __call__(self, texts: list[str], context_tokens: int) -> torch.Tensor:
        """LongTensor [len(texts), context_tokens]; over-long text is cut so the row still ends
        with eot. Any str encodes with a byte-level BPE (clean_text mends surrogates); a
        tokenizer.json that refuses a text (a word-level one without an unknown token) raises
        ValueError naming it."""
        rows = torch.full((len(texts), context_tokens), self.pad_id, dtype=torch.long)
        texts = [clean_text(t) for t in texts]
        try:
            encoded = self.tok.encode_batch(texts, add_special_tokens=False)
        except Exception:  # tokenizers raises a bare Exception: find the text it refuses
            for text in texts:
                try:
                    self.tok.encode(text, add_special_tokens=False)
                except Exception as e:
                    raise ValueError(f"the tokenizer cannot encode {text[:80]!r} ({e})") from None
            raise
        for row, enc in zip(rows, encoded):
            ids = [self.sot_id] + enc.ids[:context_tokens - 2] + [self.eot_id]
            row[:len(ids)] = torch.tensor(ids)
        return rows


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


def sample_json(sample: dict[str, bytes]) -> dict:
    """The sample's json member as a dict ({} when it has none or it does not parse)."""
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except (ValueError, RecursionError):  # broken, or nested too deep to parse: as if none
        return {}
    return meta if isinstance(meta, dict) else {}


MAX_CAPTION_CHARS = 1000  # CLIP reads 77 tokens; more only costs (BPE is quadratic in a word)


def caption(sample: dict[str, bytes]) -> str | None:
    """The caption: the .txt member, else the json's "caption" (TiC-YFCC and TiC-RedCaps shards
    hold only json); None if neither holds any text. Cut to MAX_CAPTION_CHARS."""
    text = (sample["txt"].decode("utf-8", errors="replace") if "txt" in sample
            else sample_json(sample).get("caption"))
    if not isinstance(text, str):
        return None
    # a json may hold surrogates, which no text codec takes: mended as CLIP's cleaning does
    text = fix_surrogates(text)[:MAX_CAPTION_CHARS].strip()
    return text or None


def first_captions(root: str, years: list[str], n_captions: int,
                   shard_cmd: str = "") -> Iterator[str]:
    """The first n_captions captions of these years' training shards, in order (to train a
    tokenizer on)."""
    seen = 0
    for shard, _ in (s for year in years
                     for s in shards.year_shards(root, year, shard_cmd=shard_cmd)):
        try:
            for _, sample in shards.iter_tar(shard):
                if seen >= n_captions:
                    return
                text = caption(sample)
                if text is not None:
                    seen += 1
                    yield text
        except shards.ShardError as e:  # counted and reported by the training stream
            print(f"warning: {e} ({e.__cause__})", file=sys.stderr)  # the cause: a command's stderr


def captions(sample: dict[str, bytes]) -> list[str] | None:
    """Every caption of a retrieval sample with several (clip_benchmark's format: the .txt, one
    per line)."""
    if "txt" not in sample:
        return None
    lines = [caption({"txt": line.encode()})
             for line in sample["txt"].decode("utf-8", errors="replace").splitlines()]
    return [line for line in lines if line] or None


def class_id(sample: dict[str, bytes]) -> int | None:
    """The class id of a classification sample: the .cls member, else the json's "cls" field."""
    value = sample["cls"].decode().strip() if "cls" in sample else sample_json(sample).get("cls")
    return None if value is None else int(value)


MAX_IMAGE_PIXELS = 4096 * 4096  # default cap on decoded pixels; PIL refuses only a bomb's 89M


def _decode(sample: dict[str, bytes], target: str = "caption", draft_px: int | None = None,
            max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[Image.Image, str | int] | None:
    """(image, caption) of a sample, or for target="class" (image, class id), or for
    target="captions" (image, [caption, ...]); None if either is missing.
    draft_px: a JPEG at least twice that on both sides is decoded at 1/2, 1/4 or 1/8 scale, never
    below it. An image of more than max_pixels (after that scaling) raises ValueError before it is
    decoded."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    label = {"caption": caption, "class": class_id, "captions": captions}[target](sample)
    if ext is None or label is None:
        return None
    img = Image.open(io.BytesIO(sample[ext]), formats=IMAGE_FORMATS)  # else a counted bad image
    if draft_px:  # libjpeg's scaled IDCT (docs/results.md, Performance); a no-op for PNGs
        img.draft("RGB", (draft_px, draft_px))
    if img.width * img.height > max_pixels:
        raise ValueError(f"{img.width}x{img.height} pixels, over the cap of {max_pixels} "
                         f"(--max_image_pixels)")
    img.load()  # decode now, so a corrupt image fails here and not inside the transform
    return img, label


def check_key(key: str) -> None:
    """Raise ValueError for a sample whose name in the tar is not UTF-8: tarfile keeps those bytes
    as lone surrogates, which no hash (keep_sample) or text encoding takes."""
    try:
        key.encode()
    except UnicodeEncodeError:
        raise ValueError("its name in the tar is not UTF-8") from None


FAULTS = ("corrupt_image", "corrupt_sample", "missing_image", "missing_caption", "duplicate_key",
          "truncated_tar", "empty_shard")  # corrupt_sample: a name not in UTF-8, or another error


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
    most one chunk per worker.

    Bad data is skipped, counted and logged (one line with shard and key), never trained on. Each
    batch comes with faults (workers are separate processes): the FAULTS counts since the previous
    batch, plus "samples" (read, or lost in a broken shard) and "bad_samples". A worker whose bad
    samples pass max_bad_fraction of those it has read (too_much_bad) yields (None, None, faults)
    and stops, so broken data ends the run rather than spin forever."""

    def __init__(self, parts: list[Part], budget_samples: int, global_batch: int, rank: int,
                 world_size: int, seed: int, time_step: int, image_px: int, tokenizer: Tokenizer,
                 context_tokens: int, shuffle_buffer: int = 1000, keep_seed: int = 0,
                 start_batch: int = 0, chunk_samples: int = 100_000,
                 max_bad_fraction: float = 1.0, max_image_pixels: int = MAX_IMAGE_PIXELS,
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
        self.logged = set()  # (shard, key, fault) logged here: a shard drawn again is no news

    def __len__(self):
        return self.n_batches - self.start_batch

    def __iter__(self):
        info = get_worker_info()  # None in the main process (num_workers=0)
        return self.batches(info.id, info.num_workers) if info else self.batches(0, 1)

    def skip(self, faults: Counter, fault: str, path: str, what: str, lost: int = 1,
             why: str = "") -> None:
        """Count a fault (lost: the samples it cost) and log it, once per shard and sample in this
        process."""
        faults[fault] += 1
        faults["bad_samples"] += lost
        if (path, what, fault) not in self.logged:
            self.logged.add((path, what, fault))
            print(f"warning: {path}: skipped {what}: {fault.replace('_', ' ')}{why}",
                  file=sys.stderr)

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
        the replay buffer (keep_fraction) filtered out; a broken shard, samples without image or
        caption or with a repeated key skipped and counted."""
        keys, key = set(), None
        try:
            for key, sample in shards.iter_tar(path):
                faults["samples"] += 1
                why, repeated = "", key in keys
                keys.add(key)
                try:  # an error reading one sample skips that sample, never ends the run
                    check_key(key)
                    fault = ("duplicate_key" if repeated else
                             "missing_image" if not any(e in sample for e in IMAGE_EXTS) else
                             "missing_caption" if caption(sample) is None else None)
                    wanted = not fault and not is_validation(key) and (
                        keep_fraction >= 1 or keep_sample(key, keep_fraction, self.keep_seed))
                except Exception as e:
                    fault, why = "corrupt_sample", f" ({e})"
                if fault:
                    self.skip(faults, fault, path, f"sample {key}", why=why)
                elif wanted:
                    yield key, sample
        except shards.ShardError as e:  # truncated, or not a tar: keep what came before
            lost = max(1, listed - len(keys))
            faults["samples"] += lost
            where = f"the rest of the shard after sample {key}" if key else "the shard"
            self.skip(faults, "truncated_tar", path, f"{where} (~{lost} samples)", lost,
                      f" ({e.__cause__})")
        else:
            if not keys:
                faults["samples"] += max(1, listed)
                self.skip(faults, "empty_shard", path, f"the shard ({listed} samples listed)",
                          max(1, listed))
            elif len(keys) < listed:  # a tar cut at a member's end reads as whole
                faults["samples"] += listed - len(keys)
                self.skip(faults, "truncated_tar", path,
                          f"{listed - len(keys)} samples: it holds {len(keys)} of the "
                          f"{listed} that sizes.json lists", listed - len(keys))
            elif len(keys) > listed and (path, "", "surplus") not in self.logged:
                self.logged.add((path, "", "surplus"))
                print(f"warning: {path}: holds {len(keys)} samples, sizes.json lists {listed}; "
                      f"fix sizes.json (the mix of years follows it)", file=sys.stderr)

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
                img, text = _decode(sample, draft_px=self.draft_px,
                                    max_pixels=self.max_image_pixels)
                images.append(self.transform(img, rng))
            except Exception as e:
                self.skip(faults, "corrupt_image", path, f"sample {key}", why=f" ({e})")
                continue
            captions.append(text)
            taken.append((path, key))
            if len(images) == self.local_batch:
                try:
                    tokens = self.tokenizer(captions, self.context_tokens)
                except ValueError:  # a caption the tokenizer refuses: count its sample, draw more
                    kept = [i for i, (text, (path, key)) in enumerate(zip(captions, taken))
                            if self.encodes(text, faults, path, key)]
                    images, captions, taken = ([x[i] for i in kept]
                                               for x in (images, captions, taken))
                    continue
                yield torch.stack(images), tokens
                images, captions, taken, n_batches = [], [], [], n_batches - 1

    def encodes(self, text: str, faults: Counter, path: str, key: str) -> bool:
        """Can the tokenizer encode this caption? If not, its sample is skipped and counted."""
        try:
            self.tokenizer([text], self.context_tokens)
            return True
        except ValueError as e:
            self.skip(faults, "corrupt_sample", path, f"sample {key}", why=f" ({e})")
            return False

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
        faults, bad, read = Counter(), 0, 0  # faults since the last batch; bad, read: before it
        too_bad = lambda: too_much_bad(bad + faults["bad_samples"],  # noqa: E731
                                       read + faults["samples"],
                                       self.max_bad_fraction, self.min_read)
        for chunk in range(done // per_chunk, -(-n // per_chunk) if done < n else 0):
            # chunk 0's seed has no index: a step of one chunk draws one plain stream per worker;
            # a strategy's own stream (stream > 0) has six numbers, training's at most five
            rng = np.random.default_rng([self.seed, self.time_step, self.rank, role]
                                        + ([chunk, self.stream] if self.stream else
                                           [chunk] * (chunk > 0)))
            first = chunk * per_chunk
            for i, batch in enumerate(self.chunk(rng, min(per_chunk, n - first), faults, too_bad),
                                      first):
                if batch is None:
                    yield None, None, dict(faults)
                    return
                if i >= done:  # the batches before start_batch are remade, not yielded
                    yield *batch, dict(faults)
                bad, read = bad + faults["bad_samples"], read + faults["samples"]
                faults.clear()


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


def too_much_bad(bad: int, read: int, max_bad_fraction: float, min_read: int) -> bool:
    """More than max_bad_fraction of the samples read are bad, once min_read have been read: the
    share of a few samples says little, and one broken shard must not stop a run that reads
    thousands of good ones (a training stream judges after 50 times its largest shard)."""
    return read >= min_read and bad > max_bad_fraction * read


def train_loader(stream: TrainStream, num_workers: int) -> DataLoader:
    """Batches come whole from the stream (batch_size=None); workers start afresh each time step."""
    return DataLoader(stream, batch_size=None, num_workers=num_workers, persistent_workers=False,
                      pin_memory=torch.cuda.is_available(), worker_init_fn=_ignore_sigterm)


def _ignore_sigterm(worker: int) -> None:
    # a cluster's SIGTERM reaches every process: workers go on until the main process has saved
    # and stops them (or dies: then they exit by themselves)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextmanager
def workers_stopped():
    """However the batches' loop ends (an exception in a worker, an error in the main process), no
    DataLoader worker outlives it: workers ignore SIGTERM, so one left alive would hold the process
    at its exit forever. They are killed: they hold nothing worth saving."""
    try:
        yield
    finally:
        for worker in multiprocessing.active_children():
            worker.kill()
            worker.join()


class NotScored(SystemExit):
    """An evaluation task that cannot be scored (too much of its data unreadable, nothing in it to
    score), said in one line; evaluate.evaluate_step records it as not scored and goes on."""


def eval_batches(shard_list: list, image_px: int, batch_samples: int, validation_only: bool = False,
                 max_samples: int | None = None, target: str = "caption",
                 max_bad_fraction: float = 0.05, max_image_pixels: int = MAX_IMAGE_PIXELS,
                 ) -> Iterator[tuple[torch.Tensor, list, list[str]]]:
    """Held-out samples in shard order: (uint8 images [b, 3, px, px] for normalize_images,
    captions, keys), or class ids instead of captions for target="class", lists of captions for
    "captions"; deterministic, one process. shard_list: [(path, samples listed, or None where no
    count is listed)].
    validation_only: only the training pairs of the validation split, at most max_samples of them.
    What cannot be scored (a corrupt or missing image, a missing caption or class, a sample name
    not in UTF-8, samples missing from a shard against its listed count) is skipped, counted and
    reported in one line at the end; past max_bad_fraction of the samples listed the task is not
    scored at all (NotScored): a smaller gallery scores higher, so it must be noticed."""
    transform = ImageTransform(image_px, train=False)
    images, captions, keys = [], [], []
    seen, listed_total, skipped, first = 0, 0, Counter(), {}
    for path, listed in shard_list:
        if max_samples is not None and seen >= max_samples:
            break
        read, whole = 0, not validation_only and max_samples is None  # whole: read to its end
        try:
            for key, sample in shards.iter_tar(path):
                read += 1
                try:
                    check_key(key)
                    bad_name = None
                except ValueError as e:
                    bad_name = ("corrupt_sample", f" ({e})")
                if validation_only and (bad_name or not is_validation(key)):
                    continue  # a bad name in a training shard is the training stream's to count
                if max_samples is not None and seen >= max_samples:
                    break
                seen += 1
                try:
                    decoded = _decode(sample, target, max_pixels=max_image_pixels)
                except Exception as e:
                    decoded, problem = None, ("corrupt_image", f" ({e})")
                else:
                    missing = ("image" if not any(ext in sample for ext in IMAGE_EXTS)
                               else target.removesuffix("s"))
                    problem = None if decoded else (f"missing_{missing}", "")
                problem = bad_name or problem
                if problem:
                    skipped[problem[0]] += 1
                    first.setdefault(problem[0], f"{path}: sample {key}{problem[1]}")
                    continue
                images.append(transform(decoded[0]))
                captions.append(decoded[1])
                keys.append(key)
                if len(keys) == batch_samples:
                    yield torch.stack(images), captions, keys
                    images, captions, keys = [], [], []
        except shards.ShardError as e:
            if listed is None:  # clip_benchmark's format lists no count per shard
                raise NotScored(f"error: {e} ({e.__cause__}); the task lists no sample count per "
                                f"shard, so what is lost cannot be counted: not scored") from None
            skipped["truncated_tar"] += max(1, listed - read)
            first.setdefault("truncated_tar", f"{e} ({e.__cause__})")  # a command's stderr, too
        else:
            if whole and listed is not None and read < listed:
                skipped["truncated_tar"] += listed - read
                first.setdefault("truncated_tar",
                                 f"{path}: holds {read} of the {listed} samples sizes.json lists")
        listed_total += read if listed is None else listed
    if keys:
        yield torch.stack(images), captions, keys
    if skipped:  # a share of the samples listed, or of those the split (or max_samples) took
        whole_task = not validation_only and max_samples is None
        n, total = sum(skipped.values()), listed_total if whole_task else seen
        what = ", ".join(f"{kind} {count}" for kind, count in skipped.items())
        line = (f"{n} of {total} samples {'listed' if whole_task else 'looked at'} could not be "
                f"scored ({what}); the first: " + "; ".join(first.values()))
        if n > max_bad_fraction * total:
            raise NotScored(f"error: {line}; over --max_bad_fraction={max_bad_fraction}, "
                            f"so the task is not scored; fix or re-download those shards")
        print(f"warning: {line}", file=sys.stderr)
