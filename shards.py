"""
Shards: the TiC layout (year folders, time steps, sizes.json), and webdataset tar shards read from
a file or from a command's stdout, written member by member. data.py builds the training stream and
the evaluation batches on it; synthetic.py and tools/prepare.py write shards with it. Follows
webdataset's conventions (a sample's members grouped by key in a tar, "pipe:COMMAND" paths),
written from scratch.

Layout (as TiC-DataComp): ROOT/train/YEAR/*.tar with ROOT/train/YEAR/sizes.json (shard name ->
samples; counted from the shards and saved on first use if missing), held-out pairs in
ROOT/eval/retrieval/YEAR/*.tar, and labelled images in ROOT/eval/classification/YEAR/*.tar with
classnames.txt and templates.txt beside the year folders. YEAR is YYYY or YYYYMM. Inside a tar the
members of one sample share a key and sit next to each other: KEY.png (or jpg/jpeg/webp), KEY.txt
(caption; else the json's "caption"), KEY.json (uid, year), KEY.cls (class id; else the json's
"cls").
"""
import io
import json
import os
import re
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import BinaryIO, Iterator

from PIL import Image

from files import WriteError, write_json
from text import fix_surrogates  # CLIP's caption cleaning mends them


# -----------------------------------------------------------------------------
# Writing shards

def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    """Write one member (a sample's image, caption, json) into a tar being written."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed: same seed, same bytes
    tf.addfile(info, io.BytesIO(data))


# -----------------------------------------------------------------------------
# The TiC layout and time steps

SPLITS = {"train": ("train",), "retrieval": ("eval", "retrieval"),
          "classification": ("eval", "classification"),
          # TiC-DataCompNet as ml-tic-clip ships it: names and prompts per year
          "datacompnet": ("eval", "datacompnet")}


def _split_dir(root: str, split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    return os.path.join(root, *SPLITS[split])


def years_in(root: str, split: str = "train") -> list[str]:
    """Sorted year (YYYY or YYYYMM) folder names under ROOT/train, ROOT/eval/retrieval or
    ROOT/eval/classification."""
    folder = _split_dir(root, split)
    if not os.path.isdir(folder):
        raise SystemExit(f"{folder}: no such folder; point the data root at a TiC layout "
                         f"(ROOT/train/YEAR/*.tar) or write the synthetic one with "
                         f"`python synthetic.py {root}`")
    years = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if not years:
        raise SystemExit(f"{folder}: holds no year folders; expected {folder}/YEAR/*.tar with a "
                         f"sizes.json")
    return years


def parse_steps(root: str, spec: str, split: str = "train") -> list[list[str]]:
    """Year folders of each time step: '2014-2016,2017' -> [['2014', '2015', '2016'], ['2017']];
    '': one step per year. A step is a year (YYYY: its folder and its month folders YYYYMM), a
    month (YYYYMM), or a range of them, ends included; a shorter prefix ('202') is refused."""
    years = years_in(root, split)
    if not spec:
        return [[y] for y in years]
    groups = []
    for group in spec.split(","):
        first, _, last = group.strip().partition("-")
        last = last or first
        if not all(end.isdigit() and len(end) in (4, 6) for end in (first, last)):
            raise SystemExit(f"error: --steps={spec}: '{group}' is not a year (2019), a month "
                             f"(201905) or a range of them (2014-2016); separate the steps by "
                             f"commas, e.g. --steps=2014-2016,2017,2018")
        chosen = [y for y in years if y[:len(first)] >= first and y[:len(last)] <= last]
        if not chosen:
            raise SystemExit(f"error: step '{group}' names no year folder under "
                             f"{_split_dir(root, split)} (found: {', '.join(years)}); fix --steps")
        again = next((y for y in chosen for earlier in groups if y in earlier), None)
        if again:
            raise SystemExit(f"error: --steps={spec}: {again} is in two steps; a year's data "
                             f"belongs to one step")
        groups.append(chosen)
    return groups


def step_name(years: list[str]) -> str:
    """A time step's name: its year, or its first and last year ('2014-2016')."""
    return years[0] if len(years) == 1 else f"{years[0]}-{years[-1]}"


def year_shards(root: str, year: str, split: str = "train",
                shard_cmd: str = "") -> list[tuple[str, int]]:
    """[(shard path, samples)] of one year, from its sizes.json; without one, the shards are read
    once to count their samples and the counts are saved as sizes.json beside them. With a
    shard_cmd the shards are streamed (stream_path) and sizes.json, required then, is their list:
    ROOT holds only the sizes.json files."""
    folder = os.path.join(_split_dir(root, split), str(year))
    sizes_path = os.path.join(folder, "sizes.json")
    if not os.path.isdir(folder):
        raise SystemExit(f"{folder}: no such folder; check the data root and year "
                         f"(have: {years_in(root, split)})")
    if not os.path.exists(sizes_path) and shard_cmd:
        raise SystemExit(f"{sizes_path}: missing; streamed shards (--shard_cmd) are listed by the "
                         f"sizes.json of each year folder (shard name -> samples), which is never "
                         f"counted remotely")
    if not os.path.exists(sizes_path):
        sizes = count_samples(folder)
    else:
        sizes = read_sizes(sizes_path)
    unlisted = ([] if shard_cmd else
                sorted(f for f in os.listdir(folder) if f.endswith(".tar") and f not in sizes))
    if unlisted:  # copied in after sizes.json was written: counted now, or never read
        sizes.update(count_samples(folder, unlisted))
        print(f"{folder}: {len(unlisted)} shard(s) not in sizes.json ({', '.join(unlisted[:3])}"
              f"{', ...' if len(unlisted) > 3 else ''}): counted and added")
    shards = [(os.path.join(folder, name), n) for name, n in sorted(sizes.items())]
    if not shards:
        raise SystemExit(f"{sizes_path}: lists no shards; add the year's tars to it or drop the "
                         f"year")
    if shard_cmd:
        return [(stream_path(shard_cmd, os.path.relpath(path, root)), n) for path, n in shards]
    missing = [p for p, _ in shards if not os.path.exists(p)]
    if missing:
        raise SystemExit(f"{missing[0]}: listed in {sizes_path} but missing ({len(missing)} in "
                         f"all); re-download the shards or fix sizes.json")
    return shards


def check_sizes(root: str, years: list[str]) -> None:
    """Read every sizes.json of these years, training and evaluation folders alike, so that a bad
    one is refused before any shard is counted (year_shards counts a year without one)."""
    for year in years:
        for split in SPLITS:
            path = os.path.join(_split_dir(root, split), year, "sizes.json")
            if os.path.exists(path):
                read_sizes(path)


MAX_SHARD_SAMPLES = 10 ** 9  # a count this large is a typo or damage (TiC's shards hold 10,000)


def read_sizes(path: str) -> dict[str, int]:
    """A sizes.json: {shard name: samples}, counts from 0 to below MAX_SHARD_SAMPLES, not all 0."""
    if not os.path.isfile(path):  # a FIFO would wait for a writer forever
        raise SystemExit(f"{path}: not a regular file; delete it to have the shards counted again")
    try:
        with open(path) as f:
            sizes = json.load(f)
    except (ValueError, RecursionError) as e:
        raise SystemExit(f"{path}: not valid JSON ({e}); delete it to have the shards counted "
                         f"again")
    counts = range(MAX_SHARD_SAMPLES)  # the counts a shard may have
    bad = (next((k for k, n in sizes.items() if type(n) is not int or n not in counts), None)
           if isinstance(sizes, dict) else "")
    if bad is not None:
        what = f"the count of {bad} is {sizes[bad]!r}" if bad else "it is not an object"
        raise SystemExit(f"{path}: {what}; it should map shard names to sample counts (0 to "
                         f"{MAX_SHARD_SAMPLES - 1}), e.g. {{\"000000.tar\": 10000}}; fix it, or "
                         f"delete it to have the shards counted again")
    if sizes and not any(sizes.values()):
        raise SystemExit(f"{path}: every shard is listed with 0 samples; delete it to have the "
                         f"shards counted again")
    return sizes


def count_samples(folder: str, names: list[str] | None = None) -> dict[str, int]:
    """{shard name: samples} of every *.tar in folder (or of those names), by reading them; saved
    in folder/sizes.json beside the counts already there (all processes of a run may count at
    once: each writes its own temporary file, all with the same counts). A shard that does not end
    as a tar should is reported with the samples read before the break; then sizes.json is not
    saved, so the folder is counted again once the shard is fixed."""
    names = names or sorted(f for f in os.listdir(folder) if f.endswith(".tar"))
    if not names:
        raise SystemExit(f"{folder}: holds no .tar shards and no sizes.json; put the year's "
                         f"webdataset shards there")
    t0 = time.time()
    sizes, broken = {}, []
    for name in names:
        sizes[name] = 0
        try:
            for _ in iter_tar(os.path.join(folder, name)):
                sizes[name] += 1
        except ShardError as e:
            broken.append(name)
            print(f"warning: {e}; counted the {sizes[name]} samples before the break",
                  file=sys.stderr)
    if broken:
        saved = (f"sizes.json not saved because of {len(broken)} broken shard(s) "
                 f"({', '.join(broken[:3])})")
    else:
        sizes_path = os.path.join(folder, "sizes.json")
        try:
            write_json(sizes_path, {**(read_sizes(sizes_path) if os.path.exists(sizes_path)
                                       else {}), **sizes})
            saved = "saved in sizes.json"
        except WriteError as e:  # a read-only copy of the data: count again next time
            saved = f"could not save sizes.json ({e.__cause__.strerror})"
    print(f"{folder}: counted {sum(sizes.values())} samples in {len(names)} shards in "
          f"{time.time() - t0:.1f}s; {saved}")
    return sizes


# -----------------------------------------------------------------------------
# Reading tar shards

class ShardError(RuntimeError):
    """A tar shard that cannot be read to its end (truncated, or not a tar)."""


PLAIN_PATH = re.compile(r"[A-Za-z0-9_.+=@%,-]+(/[A-Za-z0-9_.+=@%,-]+)*")  # nothing a shell acts on


def stream_path(shard_cmd: str, relative_path: str) -> str:
    """The path of a streamed shard: "pipe:" and the shell command that writes it to stdout
    (webdataset's form), with {path} in shard_cmd (e.g. "aws s3 cp s3://bucket/tic/{path} -")
    replaced by the shard's path relative to the data root. That path must be plain (PLAIN_PATH):
    quoting cannot make a name safe inside quotes the user wrote around {path}."""
    if not PLAIN_PATH.fullmatch(relative_path) or relative_path.startswith("-"):
        raise SystemExit(f"error: shard {relative_path!r}: with --shard_cmd, shard and year names "
                         f"reach a shell command, so they may hold only letters, digits and "
                         f"_ . + = @ % , - (and / between folders); rename it in sizes.json")
    return "pipe:" + shard_cmd.replace("{path}", relative_path)


class ShardStream:
    """The stdout of a "pipe:" path's command, read as the shard. check() raises a ShardError,
    with the command's stderr, if the command failed; close() kills a command whose output was not
    read to its end."""

    def __init__(self, path: str):
        self.path, self.stderr = path, tempfile.TemporaryFile()  # a file: stderr can never block
        self.proc = subprocess.Popen(path[len("pipe:"):], shell=True, stdout=subprocess.PIPE,
                                     stderr=self.stderr,
                                     start_new_session=True)  # so close() ends all it started

    def check(self, wait_s: float, running_is_failure: bool) -> None:
        try:
            code = self.proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            if not running_is_failure:
                return
            code = f"none: still running {wait_s:.0f}s after its tar ended"
        if code != 0:
            self.stderr.seek(0)
            said = self.stderr.read().decode(errors="replace").strip().splitlines()[-3:]
            raise ShardError(f"{self.path}: the command failed; run it by hand to see why") from (
                RuntimeError(f"exit status {code}" + (f": {' | '.join(said)}" if said else "")))

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc.stdout.close()
        self.stderr.close()


MAX_MEMBER_BYTES = 64 << 20  # a larger image or caption is no training sample: skipped unread
_oversized = set()  # (shard, member) already reported by this process


class LastRead:
    """A tar's byte stream that keeps the last block read from it. Python's tarfile takes a header
    cut short, or garbage, for the end of the archive and stops without a word; a tar that really
    ends, ends in a block of zeros, and that block is the last one read (None: nothing read after
    opening, which tarfile checks itself)."""

    def __init__(self, f):
        self.f, self.last = f, None

    def read(self, *size):
        self.last = self.f.read(*size)
        return self.last

    def __getattr__(self, name):
        return getattr(self.f, name)


def open_shard(path: str) -> BinaryIO:
    """A local shard, opened for reading without waiting: where a shard should be, a FIFO (which
    open() would wait on for a writer forever, deaf to SIGTERM), a socket, a device or a folder is a
    ShardError."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)  # a FIFO opens, writer or not
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else "a device"
        raise ShardError(f"{path}: {kind}, not a tar file; put the shard there or drop it from "
                         f"sizes.json") from RuntimeError(f"{kind}, not a file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def iter_tar(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream one tar, grouping consecutive members by key: "dir.v2/000.seg.txt" has key
    "dir.v2/000" and extension "seg.txt". Yields (key, {ext: bytes}); reads sequentially, so it
    works on pipes too: a path "pipe:COMMAND" reads COMMAND's stdout. Raises ShardError for a tar
    that breaks off, a command that fails, or a path that is not a file (open_shard)."""
    key, sample, n, file = None, {}, 0, None
    stream = ShardStream(path) if path.startswith("pipe:") else None
    try:
        file = stream.proc.stdout if stream else open_shard(path)
        with tarfile.open(fileobj=file, mode="r|*") as tf:
            tf.fileobj = reads = LastRead(tf.fileobj)
            for member in tf:
                tf.members = []  # tarfile keeps every member read: forget them, keep memory flat
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                dot = base.find(".")
                if dot <= 0:  # no extension, or a hidden file: not part of a sample
                    continue
                this_key, ext = (f"{folder}/{base[:dot]}" if folder else base[:dot],
                                 base[dot + 1:].lower())
                if member.size > MAX_MEMBER_BYTES:  # not read: its sample lacks it, so is skipped
                    if (path, member.name) not in _oversized:  # once, however often it is drawn
                        _oversized.add((path, member.name))
                        print(f"warning: {path}: member {member.name} of {member.size} bytes "
                              f"skipped, over the {MAX_MEMBER_BYTES >> 20} MB a sample's part may "
                              f"hold", file=sys.stderr)
                    continue
                # a repeated member starts a new sample (a duplicate key) rather than overwrite one
                if (this_key != key or ext in sample) and sample:
                    yield key, sample
                    sample, n = {}, n + 1
                key = this_key
                sample[ext] = tf.extractfile(member).read()
            if reads.last is not None and reads.last != bytes(tarfile.BLOCKSIZE):
                if stream:  # a command that failed is the cause to report
                    stream.check(wait_s=5, running_is_failure=False)
                raise ShardError(f"{path}: breaks off after {n} samples, without the blocks of "
                                 f"zeros that end a tar; re-download or regenerate it") from (
                    RuntimeError("no end-of-archive marker"))
        if stream:  # the tar ended, so must the command (before the last sample: it may be cut)
            stream.check(wait_s=60, running_is_failure=True)
    except (tarfile.TarError, EOFError, OSError) as e:
        if stream:  # a command that failed is the cause to report
            stream.check(wait_s=5, running_is_failure=False)
        raise ShardError(f"{path}: unreadable tar shard ({e}); re-download or regenerate it") from e
    finally:
        if stream:
            stream.close()  # kills the command if the reader stopped early
        elif file:
            file.close()
    if sample:
        yield key, sample


# -----------------------------------------------------------------------------
# A sample's members: its image, caption(s), class id

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")  # all Pillow may decode: not EPS (Ghostscript), ...


def image_ext(sample: dict[str, bytes]) -> str | None:
    """The member that holds the sample's image (png, jpg, jpeg or webp), or None."""
    return next((e for e in IMAGE_EXTS if e in sample), None)


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
                     for s in year_shards(root, year, shard_cmd=shard_cmd)):
        try:
            for _, sample in iter_tar(shard):
                if seen >= n_captions:
                    return
                text = caption(sample)
                if text is not None:
                    seen += 1
                    yield text
        except ShardError as e:  # counted and reported by the training stream
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


def decode(sample: dict[str, bytes], target: str = "caption", draft_px: int | None = None,
            max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[Image.Image, str | int] | None:
    """(image, caption) of a sample, or for target="class" (image, class id), or for
    target="captions" (image, [caption, ...]); None if either is missing.
    draft_px: a JPEG at least twice that on both sides is decoded at 1/2, 1/4 or 1/8 scale, never
    below it. An image of more than max_pixels (after that scaling) raises ValueError before it is
    decoded."""
    ext = image_ext(sample)
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
