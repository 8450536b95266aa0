"""
Bad data, counted: what the training stream and evaluation skip, and when they stop. A sample that
cannot be read (a name not in UTF-8, no image or caption, a repeated key, a corrupt image), a shard
cut short or not a tar: each is skipped, counted by kind (FAULTS) and logged in one line with its
shard and key, never trained on or scored. Past max_bad_fraction of the samples read a training run
stops in one line, and an evaluation task is not scored (NotScored) rather than scored on a smaller
gallery. data.py reads shards through read_shard and EvalReading; docs/faults.md lists each case.
"""
import sys
from collections import Counter
from contextlib import contextmanager
from typing import Callable, Iterator

import shards

FAULTS = ("corrupt_image", "corrupt_sample", "missing_image", "missing_caption", "duplicate_key",
          "truncated_tar", "empty_shard")  # corrupt_sample: a name not in UTF-8, or another error


class FaultLog:
    """One process's log of bad data: each skip counted, and said once per shard and sample."""

    def __init__(self):
        self.logged = set()  # (shard, what, fault) said here: a shard drawn again is no news

    def skip(self, faults: Counter, fault: str, path: str, what: str, lost: int = 1,
             why: str = "") -> None:
        """Count a fault in faults (lost: the samples it cost, also counted as bad_samples)."""
        faults[fault] += 1
        faults["bad_samples"] += lost
        if (path, what, fault) not in self.logged:
            self.logged.add((path, what, fault))
            print(f"warning: {path}: skipped {what}: {fault.replace('_', ' ')}{why}",
                  file=sys.stderr)

    def tokenize(self, tokenizer, captions: list[str], context_tokens: int,
                 taken: list[tuple[str, str]], faults: Counter) -> tuple:
        """(tokens, the indices of all captions) where the tokenizer takes them all, else (None,
        the indices of those it takes), each it refuses skipped as a corrupt_sample of its
        (shard, key) in taken."""
        try:
            return tokenizer(captions, context_tokens), list(range(len(captions)))
        except ValueError:  # one at a time, to find the ones refused
            kept = []
            for i, (text, (path, key)) in enumerate(zip(captions, taken)):
                try:
                    tokenizer([text], context_tokens)
                    kept.append(i)
                except ValueError as e:
                    self.skip(faults, "corrupt_sample", path, f"sample {key}", why=f" ({e})")
            if len(kept) == len(captions):  # refused together, taken alone: not a caption's fault
                raise
            return None, kept

    def once(self, path: str, line: str) -> None:
        if (path, "", line) not in self.logged:
            self.logged.add((path, "", line))
            print(f"warning: {path}: {line}", file=sys.stderr)


def read_shard(path: str, listed: int, wanted: Callable[[str], bool], faults: Counter,
               log: FaultLog) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, raw sample) of a training shard's samples that can be trained on and that wanted(key)
    keeps; every sample read counted in faults["samples"], the bad ones skipped (log.skip), and a
    shard cut short counted as the samples it lost against listed (its sizes.json count)."""
    keys, key = set(), None
    try:
        for key, sample in shards.iter_tar(path):
            faults["samples"] += 1
            why, repeated = "", key in keys
            keys.add(key)
            try:  # an error reading one sample skips that sample, never ends the run
                shards.check_key(key)
                fault = ("duplicate_key" if repeated else
                         "missing_image" if shards.image_ext(sample) is None else
                         "missing_caption" if shards.caption(sample) is None else None)
                keep = not fault and wanted(key)
            except Exception as e:
                fault, why = "corrupt_sample", f" ({e})"
            if fault:
                log.skip(faults, fault, path, f"sample {key}", why=why)
            elif keep:
                yield key, sample
    except shards.ShardError as e:  # truncated, or not a tar: keep what came before
        lost = max(1, listed - len(keys))
        faults["samples"] += lost
        where = f"the rest of the shard after sample {key}" if key else "the shard"
        log.skip(faults, "truncated_tar", path, f"{where} (~{lost} samples)", lost,
                 f" ({e.__cause__})")
        return
    if not keys:
        faults["samples"] += max(1, listed)
        log.skip(faults, "empty_shard", path, f"the shard ({listed} samples listed)",
                 max(1, listed))
    elif len(keys) < listed:  # a tar cut at a member's end reads as whole
        faults["samples"] += listed - len(keys)
        log.skip(faults, "truncated_tar", path, f"{listed - len(keys)} samples: it holds "
                 f"{len(keys)} of the {listed} that sizes.json lists", listed - len(keys))
    elif len(keys) > listed:
        log.once(path, f"holds {len(keys)} samples, sizes.json lists {listed}; fix sizes.json "
                       f"(the mix of years follows it)")


def too_much_bad(bad: int, read: int, max_bad_fraction: float, min_read: int) -> bool:
    """More than max_bad_fraction of the samples read are bad, once min_read have been read: the
    share of a few samples says little, and one broken shard must not stop a run that reads
    thousands of good ones (a training stream judges after 50 times its largest shard)."""
    return read >= min_read and bad > max_bad_fraction * read


class WorkerCounts:
    """A loader worker's counts of bad data: new, since the last batch it sent (with which they
    go), and in all, to stop once too_bad."""

    def __init__(self, max_bad_fraction: float, min_read: int):
        self.new, self.bad, self.read = Counter(), 0, 0
        self.max_bad_fraction, self.min_read = max_bad_fraction, min_read

    def too_bad(self) -> bool:
        return too_much_bad(self.bad + self.new["bad_samples"], self.read + self.new["samples"],
                            self.max_bad_fraction, self.min_read)

    def sent(self) -> dict:
        """The new counts, as sent with a batch; from now on they count in all."""
        sent = dict(self.new)
        self.bad, self.read = self.bad + self.new["bad_samples"], self.read + self.new["samples"]
        self.new.clear()
        return sent


def check_bad(faults: Counter, gave_up: bool, min_read: int, max_bad_fraction: float,
              where: str) -> None:
    """SystemExit where a step's bad samples pass max_bad_fraction of those read (too_much_bad), or
    where a loader worker gave up (it sends no batch then)."""
    bad, read = faults["bad_samples"], faults["samples"]
    if gave_up or too_much_bad(bad, read, max_bad_fraction, min_read):
        raise SystemExit(f"error: {where}: {bad} of {read} samples read were bad "
                         f"({fault_summary(faults)}), over --max_bad_fraction="
                         f"{max_bad_fraction}; fix or drop the shards named above")


def fault_summary(faults: dict) -> str:
    return ", ".join(f"{kind} {faults[kind]}" for kind in FAULTS if faults.get(kind)) or "none"


class NotScored(SystemExit):
    """An evaluation task that cannot be scored (too much of its data unreadable, nothing in it to
    score), said in one line; evaluate.evaluate_step records it as not scored and goes on."""


@contextmanager
def unscored_noted(metrics: dict, task: str, kind: str):
    """Where scoring a task's kind raises NotScored: metrics["not_scored"][kind] = why, a line
    said, and evaluation goes on (the cell is n/a; a rerun scores it once the data is fixed)."""
    try:
        yield
    except NotScored as e:
        why = str(e.code).removeprefix("error: ")
        metrics.setdefault("not_scored", {})[kind] = why
        print(f"warning: task {task} ({kind}) not scored: {why}", file=sys.stderr)


class EvalReading:
    """An evaluation task's samples in shard order, and what could not be scored: a sample name not
    in UTF-8, samples missing from a shard against its listed count (counted here), a corrupt or
    missing image, caption or class (counted by the caller, skip). shard_list: [(path, samples
    listed, or None where none is listed)]. select(key): the samples to look at (the validation
    split), at most max_samples of them; None: all, read to each shard's end."""

    def __init__(self, shard_list: list, select: Callable[[str], bool] | None = None,
                 max_samples: int | None = None):
        self.shard_list, self.select, self.max_samples = shard_list, select, max_samples
        self.seen, self.listed, self.skipped, self.first = 0, 0, Counter(), {}

    def samples(self) -> Iterator[tuple[str, str, dict[str, bytes]]]:
        whole = self.select is None and self.max_samples is None  # read each shard to its end
        for path, listed in self.shard_list:
            if self.max_samples is not None and self.seen >= self.max_samples:
                break
            read = 0
            try:
                for key, sample in shards.iter_tar(path):
                    read += 1
                    try:
                        shards.check_key(key)
                        bad_name = None
                    except ValueError as e:
                        bad_name = e
                    if self.select and (bad_name or not self.select(key)):
                        continue  # a bad name in a training shard is the training stream's
                    if self.max_samples is not None and self.seen >= self.max_samples:
                        break
                    self.seen += 1
                    if bad_name:
                        self.skip("corrupt_sample", f"{path}: sample {key} ({bad_name})")
                    else:
                        yield path, key, sample
            except shards.ShardError as e:
                if listed is None:  # clip_benchmark's format lists no count per shard
                    raise NotScored(f"error: {e} ({e.__cause__}); the task lists no sample count "
                                    f"per shard, so what is lost cannot be counted: not "
                                    f"scored") from None
                self.skip("truncated_tar", f"{e} ({e.__cause__})", max(1, listed - read))
            else:
                if whole and listed is not None and read < listed:
                    self.skip("truncated_tar", f"{path}: holds {read} of the {listed} samples "
                                               f"sizes.json lists", listed - read)
            self.listed += read if listed is None else listed

    def skip(self, kind: str, where: str, n: int = 1) -> None:
        self.skipped[kind] += n
        self.first.setdefault(kind, where)

    def finish(self, max_bad_fraction: float) -> None:
        """One line for what was skipped: a warning, or NotScored past max_bad_fraction of the
        samples listed (or of those the split or max_samples took)."""
        if not self.skipped:
            return
        whole = self.select is None and self.max_samples is None
        n, total = sum(self.skipped.values()), self.listed if whole else self.seen
        what = ", ".join(f"{kind} {count}" for kind, count in self.skipped.items())
        line = (f"{n} of {total} samples {'listed' if whole else 'looked at'} could not be "
                f"scored ({what}); the first: " + "; ".join(self.first.values()))
        if n > max_bad_fraction * total:
            raise NotScored(f"error: {line}; over --max_bad_fraction={max_bad_fraction}, "
                            f"so the task is not scored; fix or re-download those shards")
        print(f"warning: {line}", file=sys.stderr)
