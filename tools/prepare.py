"""
Prepare real data for TiC training, once: split timestamped webdataset shards into the TiC layout,
and write CLIP's BPE vocabulary as a tokenizer.json. See docs/data.md.

    python tools/prepare.py split --src='/data/redcaps/*.tar' --dst=/data/tic-redcaps
        [--eval_fraction=0.01 --seed=0 --time_field=NAME --by=year|month
         --samples_per_shard=10000 --on_missing_time=skip|error]
    python tools/prepare.py clip-tokenizer --out=clip-tokenizer.json [--bpe=PATH]

split files each sample, unchanged, by the time in its json (where img2dataset puts the source's
extra columns) into DST/train/YEAR/ or the held-out DST/eval/retrieval/YEAR/; split() says how.

clip-tokenizer writes CLIP's tokenizer (OpenAI's vocabulary, as open_clip's SimpleTokenizer) for
the `tokenizers` package; Tokenizer adds CLIP's text cleaning (clean_text). --bpe defaults to
the merges file inside the open-clip-torch package, where it is installed.
"""
import glob
import gzip
import importlib.util
import json
import os
import re
import shutil
import sqlite3
import sys
import tarfile
import time
from collections import Counter
from datetime import datetime, timezone

import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project root
import data  # noqa: E402
import shards  # noqa: E402
from settings import parse_flags  # noqa: E402
from text import Tokenizer  # noqa: E402

TIME_FIELDS = ("year", "timestamp", "created_utc", "date_uploaded", "date_taken")  # in this order


# ----------------------------------------------------------------------------- split
def parse_time(value) -> tuple[int, int | None] | None:
    """(year, month or None) of a json time value, or None: a year (2014), unix seconds
    (1400000000, also as a string), unix milliseconds (numbers above 1e11, year 5138 in seconds),
    or an ISO date ("2014-05-13 08:00:00")."""
    if (isinstance(value, str) and re.fullmatch(r"\s*\d+(\.\d*)?\s*", value)
            and len(value.strip()) > 4):
        value = float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if 1000 <= value <= 9999:
            return int(value), None
        seconds = value / 1000 if value > 1e11 else value
        when = datetime.fromtimestamp(seconds, timezone.utc)
        return when.year, when.month
    if isinstance(value, str):
        m = re.match(r"\s*(\d{4})(?:[-/](\d{1,2}))?", value)
        if m:
            return int(m[1]), int(m[2]) if m[2] else None
    return None


def time_folder(meta: dict, time_field: str, by: str) -> str | None:
    """The folder name (YYYY, or YYYYMM by month) of a sample from its json: from time_field, else
    the first of TIME_FIELDS that holds a year (by month: a month); None when none does."""
    for field in [time_field] if time_field else TIME_FIELDS:
        year, month = parse_time(meta.get(field)) or (None, None)
        if year is not None and by == "year":
            return f"{year:04d}"
        if month is not None:
            return f"{year:04d}{month:02d}"
    return None


class KeySet:
    """The keys written to each output folder so far, in an SQLite file at path, so that billions
    of keys need no memory. add() says whether the key is new to that folder."""

    def __init__(self, path: str):
        self.db = sqlite3.connect(path)
        self.db.execute("CREATE TABLE keys (folder TEXT, key TEXT, PRIMARY KEY (folder, key)) "
                        "WITHOUT ROWID")
        self.pending = 0

    def add(self, folder: str, key: str) -> bool:
        new = self.db.execute("INSERT OR IGNORE INTO keys VALUES (?, ?)",
                              (folder, key)).rowcount == 1
        self.pending += 1
        if self.pending == 100_000:  # a transaction per key is slow in SQLite; commit in batches
            self.db.commit()
            self.pending = 0
        return new

    def close(self) -> None:
        self.db.close()


class ShardWriter:
    """Samples into folder/000000.tar, 000001.tar, ..., at most samples_per_shard each; close()
    adds sizes.json and returns the samples written."""

    def __init__(self, folder: str, samples_per_shard: int):
        self.folder, self.samples_per_shard = folder, samples_per_shard
        self.sizes, self.tar = {}, None
        os.makedirs(folder)

    def write(self, key: str, sample: dict[str, bytes], source: str) -> None:
        if self.tar is None or self.sizes[self.name] == self.samples_per_shard:
            self.close_shard()
            self.name = f"{len(self.sizes):06d}.tar"
            self.tar = tarfile.open(os.path.join(self.folder, self.name), "w",
                                    format=tarfile.PAX_FORMAT)
            self.sizes[self.name] = 0
        for ext, payload in sample.items():
            shards.add_member(self.tar, f"{key}.{ext}", payload)
        self.sizes[self.name] += 1

    def close_shard(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None

    def close(self) -> int:
        self.close_shard()
        with open(os.path.join(self.folder, "sizes.json"), "w") as f:
            json.dump(self.sizes, f, indent=1)
        return sum(self.sizes.values())


def samples_of(paths: list[str], broken: list[str]):
    """(shard, key, sample) of every source shard in turn. A shard that breaks off gives the samples
    before the break and is named in broken and in a warning: one bad download stops nothing."""
    for path in paths:
        try:
            for key, sample in shards.iter_tar(path):
                yield path, key, sample
        except shards.ShardError as e:
            broken.append(os.path.basename(path))
            print(f"warning: {e}", file=sys.stderr)


def split(src: str, dst: str, eval_fraction: float = 0.01, seed: int = 0, time_field: str = "",
          by: str = "year", samples_per_shard: int = 10_000,
          on_missing_time: str = "skip") -> dict[str, dict[str, int]]:
    """Timestamped shards (a folder of .tar files, or a glob) -> the TiC layout at dst, built
    beside it and renamed at the end, so dst is whole or absent. Each sample goes to its time
    folder (time_folder) of train/, or of eval/retrieval/ when a hash of its key with the seed
    falls below eval_fraction, in shards of at most samples_per_shard with a sizes.json. Skipped
    and counted: a sample without a usable time (on_missing_time="error": stop at the first), one
    whose key its time folder holds already (the first is kept), one whose member names are
    absolute or hold "..". Prints the counts. Returns {"train": {folder: samples},
    "retrieval": {...}, "skipped": {"no_time": n, "duplicate_key": n, "unsafe_name": n}}."""
    if by not in ("year", "month"):
        raise SystemExit(f"--by={by}: use year (YYYY folders) or month (YYYYMM folders)")
    if on_missing_time not in ("skip", "error"):
        raise SystemExit(f"--on_missing_time={on_missing_time}: use skip (count and report them) "
                         f"or error")
    if not 0 <= eval_fraction < 1:
        raise SystemExit(f"--eval_fraction={eval_fraction}: use a fraction in [0, 1), e.g. 0.01")
    paths = sorted(glob.glob(os.path.join(src, "*.tar")) if os.path.isdir(src) else glob.glob(src))
    if not paths:
        raise SystemExit(f"{src}: no .tar shards found; pass --src=FOLDER or --src='GLOB' (quoted) "
                         f"of webdataset tars")
    dst = os.path.normpath(dst)
    if os.path.exists(dst):
        raise SystemExit(f"{dst}: exists already; pick a new --dst, or delete it to split again")
    tmp = f"{dst}.tmp{os.getpid()}"
    writers: dict[tuple[str, str], ShardWriter] = {}
    os.makedirs(os.path.dirname(tmp) or ".", exist_ok=True)
    keys = KeySet(f"{tmp}.keys")  # beside the output, not in it
    samples_in, skipped, first_skipped, broken, t0 = 0, Counter(), {}, [], time.time()
    try:
        for path, key, sample in samples_of(paths, broken):
            samples_in += 1
            folder = time_folder(shards.sample_json(sample), time_field, by)
            if folder is None and on_missing_time == "error":
                raise SystemExit(f"{path}: sample {key} has no {by} in its json (looked for "
                                 f"{time_field or ', '.join(TIME_FIELDS)}); "
                                 f"pass --time_field=NAME of its time")
            unsafe = key.startswith("/") or ".." in key.split("/")  # would escape where unpacked
            why = ("unsafe_name" if unsafe else "no_time" if folder is None else
                   None if keys.add(folder, key) else "duplicate_key")
            if why:
                skipped[why] += 1
                first_skipped.setdefault(why, f"{path}: sample {key}")
                continue
            # a hash of the key, not the shard order; its own seed keeps it apart from replay's
            split_name = ("retrieval" if data.keep_sample(key, eval_fraction, f"heldout{seed}")
                          else "train")
            if (split_name, folder) not in writers:
                writers[split_name, folder] = ShardWriter(
                    os.path.join(tmp, *shards.SPLITS[split_name], folder), samples_per_shard)
            writers[split_name, folder].write(key, sample, path)
        counts = {"train": {}, "retrieval": {}}
        for (split_name, folder), writer in sorted(writers.items()):
            counts[split_name][folder] = writer.close()
        samples_out = sum(n for c in counts.values() for n in c.values())
        if samples_out + sum(skipped.values()) != samples_in:  # cannot happen; silent loss is worse
            raise SystemExit(f"{dst}: read {samples_in} samples but wrote {samples_out} "
                             f"and skipped {sum(skipped.values())}; nothing was written")
        if not samples_out:
            raise SystemExit(f"{src}: none of the {samples_in} samples has a usable {by} "
                             f"(looked for {time_field or ', '.join(TIME_FIELDS)}); "
                             f"pass --time_field=NAME of its time")
        os.rename(tmp, dst)
    except BaseException:
        for writer in writers.values():
            writer.close_shard()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        keys.close()
        if os.path.exists(f"{tmp}.keys"):
            os.remove(f"{tmp}.keys")
    for folder in sorted(set(counts["train"]) | set(counts["retrieval"])):
        print(f"{folder}: {counts['train'].get(folder, 0)} train, "
              f"{counts['retrieval'].get(folder, 0)} held out")
    held_out = sum(counts["retrieval"].values())
    print(f"read {samples_in} samples from {len(paths)} shards in {time.time() - t0:.0f}s; "
          f"wrote {samples_out} = {samples_out - held_out} train + {held_out} held out "
          f"({100 * held_out / max(1, samples_out):.2f}%) to {dst}")
    reasons = {"no_time": f"without a usable {by} "
                          f"(looked for {time_field or ', '.join(TIME_FIELDS)})",
               "duplicate_key": "whose key their time folder held already (the first was kept)",
               "unsafe_name": "whose member names are absolute or hold '..' "
                              "(other tools may unpack them)"}
    for why, n in skipped.items():
        print(f"skipped {n} samples {reasons[why]}; the first: {first_skipped[why]}")
    if broken:
        print(f"{len(broken)} source shard(s) broke off "
              f"({', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''}): "
              f"the samples before each break were split, the rest is lost; "
              f"re-download them to split them whole")
    return {**counts, "skipped": dict(skipped)}


# ----------------------------------------------------------------------------- CLIP's tokenizer
def byte_characters() -> list[str]:
    """CLIP's (GPT-2's) stand-ins for the 256 bytes, in the order of CLIP's vocabulary: the
    printable bytes stand for themselves, the others follow as chr(256), chr(257), ..., so no byte
    becomes whitespace or a control character. The ByteLevel pre-tokenizer uses the same table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]


def clip_tokenizer(bpe_path: str) -> tokenizers.Tokenizer:
    """CLIP's BPE from its merges file (bpe_simple_vocab_16e6.txt.gz). Its vocabulary, in id
    order: the 256 byte characters, the same with "</w>" (end of word), the merged pair of each of
    the first 48,894 merges, then <start_of_text> = 49406 and <end_of_text> = 49407."""
    try:
        lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    except OSError as e:
        raise SystemExit(f"{bpe_path}: not a readable bpe_simple_vocab_16e6.txt.gz ({e}); "
                         f"pass --bpe=PATH to it")
    merges = [tuple(line.split())
              for line in lines[1:49152 - 256 - 2 + 1]]  # line 0 is a version header
    chars = byte_characters()
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    tok = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(vocab)}, merges,
                                          end_of_word_suffix="</w>"))
    # collapse whitespace as str.split() sees it to one space (clean_text has done the rest)
    whitespace = "".join(f"\\x{{{i:x}}}" for i in range(0x110000) if chr(i).isspace())
    tok.normalizer = normalizers.Sequence([normalizers.NFC(),
                                           normalizers.Replace(Regex(f"[{whitespace}]+"), " "),
                                           normalizers.Strip(), normalizers.Lowercase()])
    # CLIP's regex: contractions, letter runs, single digits, other runs; spaces are dropped
    split_re = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split_re), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace("</w>", " ")])
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=True)  # in text too
                            for t in ("<start_of_text>", "<end_of_text>")])
    assert tok.get_vocab_size() == 49408 and tok.token_to_id("<end_of_text>") == 49407
    return tok


def default_bpe() -> str | None:
    """The merges file inside the open-clip-torch package, or None where it is not installed."""
    spec = importlib.util.find_spec("open_clip")  # found, not imported
    path = spec and os.path.join(spec.submodule_search_locations[0], "bpe_simple_vocab_16e6.txt.gz")
    return path if path and os.path.exists(path) else None


# ----------------------------------------------------------------------------- command line
COMMANDS = {"split": dict(src="", dst="", eval_fraction=0.01, seed=0, time_field="", by="year",
                          samples_per_shard=10_000, on_missing_time="skip"),
            "clip-tokenizer": dict(bpe="", out="clip-tokenizer.json")}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: python tools/prepare.py {'|'.join(COMMANDS)} --key=value ...; "
                         f"see the docstring")
    opts = parse_flags(argv[1:], COMMANDS[argv[0]])
    if argv[0] == "split":
        if not opts["src"] or not opts["dst"]:
            raise SystemExit("usage: python tools/prepare.py split --src=FOLDER_OR_GLOB --dst=ROOT "
                             "[--eval_fraction=0.01]")
        split(**opts)
    else:
        bpe = opts["bpe"] or default_bpe()
        if not bpe:
            raise SystemExit("pass --bpe=PATH to CLIP's bpe_simple_vocab_16e6.txt.gz (it ships "
                             "in the open-clip-torch package and in github.com/openai/CLIP, "
                             "folder clip/)")
        Tokenizer(clip_tokenizer(bpe)).save(opts["out"])
        print(f"wrote CLIP's tokenizer (49408 ids, from {bpe}) to {opts['out']}; "
              f"train or evaluate with --tokenizer={opts['out']}")


if __name__ == "__main__":
    main(sys.argv[1:])
