"""Tests for data.py and shards.py: tar grouping, rank x worker splitting, mix proportions, replay-buffer hashing, the
tokenizer and the synthetic benchmark. Hermetic and CPU-only: every test builds its own tiny shards.

    python -m pytest -q tests/test_data.py
"""
import json
import os
import pickle
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image, UnidentifiedImageError

import data
import evaluate
import files
import shards
import synthetic
from benchmark import tasks_of
from conftest import all_files, png_bytes, train_in_process, write_tar
from model import CLIP, make_config
from text import clean_text, Tokenizer

CAPTIONS = ["a red circle at top left and a blue star at bottom right", "green square in the top right",
            "a white moon next to a pink heart", "yellow cross, cyan bar, purple dots"] * 8


def write_shard(path, prefix, n, px=8):
    """A shard of n image-caption samples with keys PREFIX_000000..."""
    members = []
    for i in range(n):
        key = f"{prefix}_{i:06d}"
        members += [(f"{key}.png", png_bytes(i % 256, px)), (f"{key}.txt", CAPTIONS[i % len(CAPTIONS)].encode())]
    write_tar(path, members)
    return str(path), n


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(CAPTIONS, vocab_size=300)


def make_stream(parts, tokenizer, budget_samples, global_batch=8, rank=0, world_size=1, shuffle_buffer=16, seed=0):
    return data.TrainStream(parts, budget_samples, global_batch, rank, world_size, seed=seed, time_step=0, image_px=8,
                            tokenizer=tokenizer, context_tokens=16, shuffle_buffer=shuffle_buffer)


# -----------------------------------------------------------------------------

def test_iter_tar_groups_consecutive_members_by_key(tmp_path):
    path = tmp_path / "shard.tar"
    write_tar(path, [("a.b/000.jpg", b"i0"), ("a.b/000.txt", b"t0"), ("a.b/000.json", b"{}"),
                     ("a.b/001.TXT", b"t1"), ("x/y.seg.txt", b"s"), ("x/y.jpg", b"i"),
                     ("k1.txt", b"1"), ("k2.txt", b"2"), ("k1.jpg", b"3"), ("noext", b"?"), ("x/.hidden", b"?")])
    got = list(shards.iter_tar(str(path)))
    assert got == [("a.b/000", {"jpg": b"i0", "txt": b"t0", "json": b"{}"}), ("a.b/001", {"txt": b"t1"}),
                   ("x/y", {"seg.txt": b"s", "jpg": b"i"}),
                   ("k1", {"txt": b"1"}), ("k2", {"txt": b"2"}), ("k1", {"jpg": b"3"})]  # consecutive only


def test_iter_tar_names_the_bad_shard(tmp_path):
    path = tmp_path / "bad.tar"
    path.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(RuntimeError, match="bad.tar"):
        list(shards.iter_tar(str(path)))


def test_every_rank_gets_the_same_batch_count(tmp_path, tokenizer):
    shards = [write_shard(tmp_path / f"{i}.tar", f"s{i}", n) for i, n in enumerate([3, 17, 1, 9])]  # uneven
    global_batch, world_size, n_batches = 8, 2, 7
    budget = n_batches * global_batch + 5  # the remainder is dropped, the same on every rank
    for rank in range(world_size):
        stream = make_stream([data.Part("2020", shards)], tokenizer, budget, global_batch, rank, world_size)
        per_worker = [sum(1 for _ in stream.batches(w, 3)) for w in range(3)]
        assert per_worker == [3, 2, 2] and len(stream) == n_batches
    loader = data.train_loader(stream, num_workers=2)  # real worker processes find their id by get_worker_info
    batches = list(loader)
    assert len(batches) == n_batches
    for images, tokens, _ in batches:
        assert images.shape == (global_batch // world_size, 3, 8, 8) and tokens.shape == (4, 16)


def test_batch_not_divisible_by_world_is_an_error(tmp_path, tokenizer):
    shards = [write_shard(tmp_path / "0.tar", "s", 4)]
    with pytest.raises(ValueError, match="divisible"):
        make_stream([data.Part("2020", shards)], tokenizer, 100, global_batch=10, world_size=4)


def test_stream_is_reproducible_and_differs_per_rank(tmp_path, tokenizer):
    shards = [write_shard(tmp_path / f"{i}.tar", f"s{i}", 20) for i in range(3)]
    first = [next(iter(make_stream([data.Part("y", shards)], tokenizer, 64, rank=r, world_size=2)))[0]
             for r in (0, 0, 1)]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])


def test_mix_follows_buffered_part_sizes_and_filters_replay(tmp_path, tokenizer):
    new = data.Part("2021", [write_shard(tmp_path / f"new{i}.tar", f"new{i}", 20) for i in range(3)])
    old = data.Part("2020", [write_shard(tmp_path / f"old{i}.tar", f"old{i}", 20) for i in range(2)], keep_fraction=0.5)
    assert new.n_samples == 60 and old.n_samples == 20
    stream = make_stream([new, old], tokenizer, budget_samples=2400)
    old_kept = sum(data.keep_sample(k, 0.5, seed=0) for p, _ in old.shards for k, _ in shards.iter_tar(p))
    expected = 60 / (60 + old_kept)  # ~0.75; weighting the shard draw by size as well would give ~0.85
    n_draws, counts = 8000, {"new": 0, "old": 0}
    samples = stream.samples(np.random.default_rng(0))  # the raw draw under the batches: keys say the source
    for _ in range(n_draws):
        _, key, _ = next(samples)
        counts[key[:3]] += 1
        if key.startswith("old"):
            assert data.keep_sample(key, 0.5, seed=0)  # only the replay buffer's samples
    # shards come whole (10-20 samples), so ~500 shard draws: standard deviation of the share ~0.015
    assert abs(counts["new"] / n_draws - expected) < 0.05, (counts, expected)


def test_keep_sample_nested_proportional_and_process_independent():
    keys = [f"2019_{i:07d}" for i in range(20000)]
    kept = {f: {k for k in keys if data.keep_sample(k, f, seed=3)} for f in (0.1, 0.3, 0.7)}
    assert kept[0.1] <= kept[0.3] <= kept[0.7]  # a shrinking buffer only drops samples
    for f, s in kept.items():
        assert abs(len(s) / len(keys) - f) < 0.015
    assert kept[0.3] != {k for k in keys if data.keep_sample(k, 0.3, seed=4)}  # the seed matters
    # another interpreter with another string-hash seed must keep exactly the same samples
    code = ("import sys; sys.path.insert(0, '.'); import data; "
            "print(sum(data.keep_sample(f'2019_{i:07d}', 0.3, 3) << (i % 60) for i in range(2000)))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(data.__file__), env=env,
                         capture_output=True, text=True, check=True).stdout
    assert int(out) == sum(data.keep_sample(f"2019_{i:07d}", 0.3, 3) << (i % 60) for i in range(2000))


def test_tokenizer_rows_end_with_eot_and_round_trip(tmp_path, tokenizer):
    ctx = 12
    texts = ["a red circle", "a red circle at top left and a blue star at bottom right " * 3]
    tokens = tokenizer(texts, ctx)
    assert tokens.shape == (2, ctx) and (tokens[:, 0] == tokenizer.sot_id).all()
    n_short = len(tokenizer.tok.encode("a red circle", add_special_tokens=False).ids)
    assert 0 < n_short < ctx - 2
    assert tokens[0, n_short + 1] == tokenizer.eot_id and (tokens[0, n_short + 2:] == tokenizer.pad_id).all()
    assert tokens[1, -1] == tokenizer.eot_id  # over-long text is cut, but still ends with eot
    assert (tokens == tokenizer.eot_id).sum(1).tolist() == [1, 1]
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded = Tokenizer.load(str(tmp_path / "tokenizer.json"))
    assert torch.equal(loaded(texts, ctx), tokens) and loaded.vocab_size == tokenizer.vocab_size <= 300
    assert torch.equal(pickle.loads(pickle.dumps(tokenizer))(texts, ctx), tokens)  # as DataLoader workers get it
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SystemExit, match="bad.json"):
        Tokenizer.load(str(tmp_path / "bad.json"))


def test_image_transform_shape_and_normalisation():
    img = Image.new("RGBA", (40, 24), (255, 0, 128, 255))  # not RGB, not square
    for train in (False, True):
        x = data.ImageTransform(16, train)(img)
        assert x.shape == (3, 16, 16) and x.dtype == torch.uint8
        expected = (torch.tensor([255, 0, 128]) / 255 - torch.tensor(data.CLIP_MEAN)) / torch.tensor(data.CLIP_STD)
        assert torch.allclose(data.normalize_images(x).mean((1, 2)), expected, atol=1e-3)
    with pytest.raises(TypeError, match="got torch.float32 images; pass the loader's uint8 pixels"):
        data.normalize_images(data.normalize_images(x))  # twice would feed the model wrong inputs


# -----------------------------------------------------------------------------
# The synthetic benchmark

SMALL = dict(seed=1, years=(2018, 2019, 2020, 2021, 2022), train_samples_per_year=100, eval_samples_per_year=30,
             image_px=32, samples_per_shard=40)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bench") / "synth")
    synthetic.make_synthetic_benchmark(root, **SMALL)
    return root


def test_benchmark_is_deterministic_and_reused(bench, tmp_path):
    again = str(tmp_path / "again")
    synthetic.make_synthetic_benchmark(again, **SMALL)
    assert all_files(again) == all_files(bench)
    mtime = os.path.getmtime(os.path.join(again, "benchmark.json"))
    synthetic.make_synthetic_benchmark(again, **SMALL)  # same parameters: leave it alone
    assert os.path.getmtime(os.path.join(again, "benchmark.json")) == mtime
    with pytest.raises(SystemExit, match="image_px"):
        synthetic.make_synthetic_benchmark(again, **dict(SMALL, image_px=16))
    assert sorted(os.listdir(tmp_path)) == ["again"]  # no temporary folders left behind


def test_benchmark_sizes_match_and_eval_is_held_out(bench):
    assert shards.years_in(bench) == shards.years_in(bench, "retrieval") == [str(y) for y in SMALL["years"]]
    train_keys, eval_keys = set(), set()
    for year in shards.years_in(bench):
        for split, keys in (("train", train_keys), ("retrieval", eval_keys)):
            listed = shards.year_shards(bench, year, split)
            for path, n in listed:
                samples = list(shards.iter_tar(path))
                assert len(samples) == n and all(set(s) == {"png", "txt", "json"} for _, s in samples)
                assert all(json.loads(s["json"])["year"] == int(year) for _, s in samples)
                keys.update(k for k, _ in samples)
            assert sum(n for _, n in listed) == SMALL["train_samples_per_year" if split == "train" else
                                                        "eval_samples_per_year"]
    assert len(train_keys) == 5 * 100 and len(eval_keys) == 5 * 30 and not train_keys & eval_keys


def test_benchmark_drift_schedule(bench):
    meta = json.load(open(os.path.join(bench, "benchmark.json")))
    assert meta["chance_recall_at_1"] == 1 / 30
    debut = meta["debut_year"]
    assert sorted(debut) == sorted(synthetic.EMERGING) and min(debut.values()) == 2019 and max(debut.values()) == 2022
    seen = {}  # year -> shapes named in its training captions
    for year in shards.years_in(bench):
        words = set()
        for path, _ in shards.year_shards(bench, year):
            for _, s in shards.iter_tar(path):
                words.update(s["txt"].decode().replace(",", " ").split())
        seen[int(year)] = words & set(synthetic.SHAPES)
    for shape, year in debut.items():
        assert all(shape not in seen[y] for y in seen if y < year), shape  # unknowable before its debut
    assert set(synthetic.FADING) <= seen[2018] and not set(synthetic.FADING) & (seen[2020] | seen[2021] | seen[2022])
    fading = [meta["shape_weights"][str(y)]["ring"] for y in range(2018, 2023)]
    assert fading == [3, 0.75, 0, 0, 0]  # fades out, then stays gone for three years
    assert all(meta["shape_weights"][str(year)][shape] == (3 if year >= debut[shape] else 0)
               for shape in synthetic.EMERGING for year in SMALL["years"])  # absent, then 3x
    assert set(synthetic.STABLE) <= seen[2018] and set(synthetic.STABLE) <= seen[2022]
    assert set(synthetic.EMERGING) <= seen[2022]


def test_missing_year_folder_is_a_clear_error(bench):
    with pytest.raises(SystemExit, match="2030"):
        shards.year_shards(bench, "2030")


def test_eval_batches_in_order(bench):
    listed = shards.year_shards(bench, "2019", "retrieval")
    batches = list(data.eval_batches(listed, image_px=32, batch_samples=8))
    keys = [k for _, _, ks in batches for k in ks]
    assert keys == [f"2019_{100 + i:07d}" for i in range(30)] and [len(b[2]) for b in batches] == [8, 8, 8, 6]
    assert batches[0][0].shape == (8, 3, 32, 32) and all(isinstance(c, str) and c for c in batches[0][1])


# ----------------------------------------------------------------------------- streamed shards (shard_cmd)
def test_streamed_shards_read_as_local_ones_and_a_failing_command_is_a_counted_fault(two_years, tokenizer, capfd,
                                                                                     tmp_path):
    local = shards.year_shards(two_years, "2018")
    streamed = shards.year_shards(two_years, "2018", shard_cmd=f"cat {two_years}/{{path}}")
    assert [n for _, n in streamed] == [n for _, n in local] and streamed[0][0].startswith("pipe:cat ")
    make = lambda shards: data.TrainStream([data.Part("2018", shards)], 8 * 12, 8, 0, 1, seed=0,  # noqa: E731
                                           time_step=0, image_px=32, tokenizer=tokenizer, context_tokens=16,
                                           shuffle_buffer=16, max_bad_fraction=100)
    for a, b in zip(make(local).batches(0, 1), make(streamed).batches(0, 1), strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    eval_keys = lambda shards: [k for *_, ks in data.eval_batches(shards, 32, 16) for k in ks]  # noqa: E731
    assert eval_keys(shards.year_shards(two_years, "2019", "retrieval", f"cat {two_years}/{{path}}")) == \
        eval_keys(shards.year_shards(two_years, "2019", "retrieval"))
    # a command that fails halfway through a shard: the rest of the shard is a counted truncated_tar, with its stderr
    cut = f"head -c 30000 {two_years}/{{path}}; echo gone >&2; exit 3"
    failing = shards.year_shards(two_years, "2018", shard_cmd=cut)
    faults = sum((Counter(f) for *_, f in make(failing).batches(0, 1)), Counter())
    assert faults["truncated_tar"] > 0 and faults["bad_samples"] > faults["truncated_tar"]
    assert "exit status 3: gone" in capfd.readouterr().err
    unlisted = tmp_path / "train" / "2018"
    unlisted.mkdir(parents=True)
    write_shard(unlisted / "0.tar", "s", 2)
    with pytest.raises(SystemExit, match="sizes.json: missing; streamed shards"):  # never counted remotely
        shards.year_shards(str(tmp_path), "2018", shard_cmd="cat {path}")


# ----------------------------------------------------------------------------- damage that tarfile alone misses
def test_every_cut_that_loses_a_sample_is_reported(tmp_path, tokenizer, two_years, capfd):
    """Python's tarfile takes a header cut short for the end of the archive; the reader checks the end itself, and
    the training stream and evaluation check what they read against the listed count."""
    path, listed = shards.year_shards(two_years, "2018")[0]
    whole = open(path, "rb").read()
    last_member_end = max(i for i in range(0, len(whole), 512) if any(whole[i:i + 512])) + 512
    for offset in sorted(np.random.default_rng(0).choice(len(whole), 20, replace=False)):
        cut = tmp_path / f"cut{offset}.tar"
        cut.write_bytes(whole[:offset])
        stream = data.TrainStream([data.Part("2018", [(str(cut), listed)])], 8, 8, 0, 1, seed=0, time_step=0,
                                  image_px=32, tokenizer=tokenizer, context_tokens=16)
        faults, draws = Counter(), iter([False, True])  # one pass over the shard
        read = list(stream.samples(np.random.default_rng(0), faults, too_bad=lambda: next(draws)))
        if offset < last_member_end:  # a sample (or part of one) is lost: reported, in training and evaluation
            assert len(read) < listed and faults["truncated_tar"] + faults["empty_shard"] > 0, offset
            assert faults["samples"] >= listed  # what was lost counts as read, so the bad share stays honest
            with pytest.raises(SystemExit, match="could not be scored"):
                list(data.eval_batches([(str(cut), listed)], 32, 16, max_bad_fraction=0))
        else:  # a cut in the trailing blocks of zeros loses nothing
            assert len(read) == listed and not faults["truncated_tar"]


def test_sizes_json_and_the_shards_on_disk_agree(tmp_path, tokenizer, capsys):
    folder = tmp_path / "train" / "2018"
    folder.mkdir(parents=True)
    write_shard(folder / "a.tar", "a", 3)
    (folder / "sizes.json").write_text('{"a.tar": 3}')
    write_shard(folder / "b.tar", "b", 2)  # copied in after sizes.json was written
    assert shards.year_shards(str(tmp_path), "2018") == [(str(folder / "a.tar"), 3), (str(folder / "b.tar"), 2)]
    assert "1 shard(s) not in sizes.json (b.tar): counted and added" in capsys.readouterr().out
    assert json.load(open(folder / "sizes.json")) == {"a.tar": 3, "b.tar": 2}
    # a count below what the shard holds loses nothing, but the mix of years follows it: said once
    stream = data.TrainStream([data.Part("2018", [(str(folder / "a.tar"), 2)])], 8, 8, 0, 1, seed=0, time_step=0,
                              image_px=8, tokenizer=tokenizer, context_tokens=16)
    draws = iter([False, False, True])
    assert len(list(stream.samples(np.random.default_rng(0), too_bad=lambda: next(draws)))) == 6
    assert capsys.readouterr().err.count("a.tar: holds 3 samples, sizes.json lists 2") == 1


def test_caps_on_captions_members_and_pixels(tmp_path, monkeypatch):
    long = "x" * 1_000_000  # one 1 MB word: BPE training on it would not end
    assert shards.caption({"txt": long.encode()}) == "x" * shards.MAX_CAPTION_CHARS
    assert shards.caption({"txt": b"  \n "}) is None and shards.caption({"json": b'{"caption": ""}'}) is None
    lone = shards.caption({"json": b'{"caption": "a \\ud800 b"}'})  # a lone surrogate: no text codec takes it
    assert lone == "a \ufffd b" and Tokenizer.train(["a b"] * 4, 300)([lone], 8).shape == (1, 8)  # as ftfy
    monkeypatch.setattr(shards, "MAX_MEMBER_BYTES", 50)
    write_tar(tmp_path / "big.tar", [("k.png", png_bytes(1, px=64)), ("k.txt", b"fine")])  # the PNG is > 50 B
    assert [set(s) for _, s in shards.iter_tar(str(tmp_path / "big.tar"))] == [{"txt"}]  # not read: missing image
    sample = {"png": png_bytes(1, px=200), "txt": b"a big image"}
    assert shards.decode(sample)[0].size == (200, 200)
    with pytest.raises(ValueError, match="200x200 pixels, over the cap of 10000"):
        shards.decode(sample, max_pixels=10_000)


def test_a_caption_the_tokenizer_cannot_encode_is_a_counted_bad_sample(tmp_path, capfd):
    """A byte-level BPE encodes any text; a word-level tokenizer.json without an unknown token refuses a word it lacks.
    The tokenizer names the text; the training stream skips and counts its sample."""
    import tokenizers
    vocab = {"<pad>": 0, "<start_of_text>": 1, "<end_of_text>": 2, "fine": 3}
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab))
    word_level.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = Tokenizer(word_level)
    with pytest.raises(ValueError, match="the tokenizer cannot encode 'oops'"):
        tokenizer(["fine", "oops"], 8)
    members = [m for i in range(4) for m in [(f"k{i}.png", png_bytes(i)), (f"k{i}.txt", b"oops" if i == 1 else b"fine")]]
    path = write_tar(tmp_path / "0.tar", members)
    stream = data.TrainStream([data.Part("2018", [(path, 4)])], 2 * 8, 2, 0, 1, seed=0, time_step=0, image_px=8,
                              tokenizer=tokenizer, context_tokens=8, shuffle_buffer=4)
    batches = list(stream.batches(0, 1))
    assert len(batches) == 8 and all(torch.equal(t, tokenizer(["fine", "fine"], 8)) for _, t, _ in batches)
    assert sum(f.get("corrupt_sample", 0) for *_, f in batches) >= 1
    assert "skipped sample k1: corrupt sample (the tokenizer cannot encode 'oops'" in capfd.readouterr().err


def test_the_built_in_benchmarks_captions_clean_to_their_lower_case():
    """A guard: CLIP's cleaning leaves plain ASCII without "&" as it is, so these captions tokenize as they always
    did."""
    colours, shapes, places = list(synthetic.COLOURS), synthetic.SHAPES, synthetic.POSITIONS
    captions = [t.format(c0=c0, s0=s0, p0=p0, c1=c1, s1=s1, p1=p1) for t in synthetic.TEMPLATES
                for c0, c1 in zip(colours, colours[1:]) for s0, s1 in zip(shapes[::2], shapes[1::2])
                for p0, p1 in zip(places, places[::-1])]
    captions += [t.format(s) for t in synthetic.CLASS_TEMPLATES for s in synthetic.SHAPES]
    assert len(captions) > 500 and all(clean_text(c) == c.lower() for c in captions)


def test_only_jpeg_png_and_webp_are_decoded_so_a_shard_runs_no_program(tmp_path, tokenizer, monkeypatch, capfd):
    """Pillow opens every format it knows: an EPS image is handed to Ghostscript. A member holding anything but
    JPEG, PNG or WebP is a counted bad image, in training and evaluation, and no program runs."""
    ran = tmp_path / "gs-ran"
    fake_gs = tmp_path / "bin" / "gs"
    fake_gs.parent.mkdir()
    fake_gs.write_text(f"#!/bin/sh\ntouch {ran}\nexit 1\n")
    fake_gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_gs.parent}:{os.environ['PATH']}")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"
    members = [("k0.png", eps), ("k0.txt", b"eps posing as png")]
    members += [m for i in range(1, 4) for m in [(f"k{i}.png", png_bytes(i)), (f"k{i}.txt", b"fine")]]
    path = write_tar(tmp_path / "0.tar", members)
    with pytest.raises(UnidentifiedImageError):  # not even identified
        shards.decode({"png": eps, "txt": b"x"})
    stream = data.TrainStream([data.Part("2018", [(path, 4)])], 8, 8, 0, 1, seed=0, time_step=0, image_px=8,
                              tokenizer=tokenizer, context_tokens=16, shuffle_buffer=4, max_bad_fraction=1)
    faults = next(stream.batches(0, 1))[2]
    assert faults["corrupt_image"] >= 1
    keys = [k for *_, ks in data.eval_batches([(path, 4)], 8, 16, max_bad_fraction=0.5) for k in ks]
    assert keys == ["k1", "k2", "k3"] and "corrupt_image 1" in capfd.readouterr().err
    assert not ran.exists()


def test_a_shard_name_that_reaches_a_command_cannot_run_one(tmp_path):
    """shlex.quote breaks inside quotes the user put around {path}: names that reach --shard_cmd must be plain."""
    folder = tmp_path / "train" / "2018"
    folder.mkdir(parents=True)
    ran = tmp_path / "X"
    (folder / "sizes.json").write_text(json.dumps({f"$(touch {ran}).tar": 4}))
    with pytest.raises(SystemExit, match=r"may hold only letters, digits .*rename it in sizes.json"):
        shards.year_shards(str(tmp_path), "2018", shard_cmd=f'cat "{tmp_path}/{{path}}"')
    (folder / "sizes.json").write_text(json.dumps({"shard-000_1.tar": 4}))
    assert shards.year_shards(str(tmp_path), "2018", shard_cmd='cat "/d/{path}"') == [
        ('pipe:cat "/d/train/2018/shard-000_1.tar"', 4)]
    assert not ran.exists()


def test_write_failures_leave_no_temporary_file_and_stale_ones_are_cleared(tmp_path):
    target = tmp_path / "missing" / "file.json"  # the folder is not there: the write fails
    with pytest.raises(files.WriteError, match=f"could not write {target}: No such file or directory"):
        files.write_json(str(target), {"a": 1})
    files.write_json(str(tmp_path / "ok.json"), {"a": 1})
    (tmp_path / "step02.pt.tmp999999999").write_bytes(b"a kill left me")  # no such process: stale
    (tmp_path / f"step03.pt.tmp{os.getpid()}").write_bytes(b"still being written")  # this process is alive
    assert files.remove_stale_temporaries(str(tmp_path)) == ["step02.pt.tmp999999999"]
    assert sorted(os.listdir(tmp_path)) == ["ok.json", f"step03.pt.tmp{os.getpid()}"]


# ------------------------------------------------------------------ uint8 from the workers
def normalised_in_the_worker(pixels: torch.Tensor) -> torch.Tensor:
    """What the workers sent before they sent uint8: each image's (x - mean) / std in float32."""
    mean, std = (np.array(v, np.float32).reshape(3, 1, 1) * 255
                 for v in (data.CLIP_MEAN, data.CLIP_STD))
    return torch.from_numpy((pixels.numpy().astype(np.float32) - mean) / std)


class TransformBefore(data.ImageTransform):
    """The image transform as it was: the same crop and resize, normalised in the worker."""

    def __call__(self, img, rng=None):
        return normalised_in_the_worker(super().__call__(img, rng))


def test_the_model_trains_on_the_floats_the_workers_sent_before(two_years, tmp_path, monkeypatch):
    """train.py normalises the loader's uint8 batch on the device: bit for bit the float batch that
    the workers made before, so every number of a run stays."""
    seen, streams = [], []
    forward, train_loader = CLIP.forward, data.train_loader

    def recording_forward(model, images, tokens):
        if model.training:  # the trained model's input; evaluation runs in eval mode
            seen.append(images.clone())
        return forward(model, images, tokens)

    def recording_loader(stream, num_workers):
        streams.append(stream)
        return train_loader(stream, num_workers)

    monkeypatch.setattr(CLIP, "forward", recording_forward)
    monkeypatch.setattr(data, "train_loader", recording_loader)
    train_in_process([f"--data_root={two_years}", f"--out_dir={tmp_path / 'run'}", "--steps=2018",
                      "--strategy=sequential", "--budget_samples=96", "--batch_size=32",
                      "--vocab_size=300", "--workers=1", "--eval_batch=64"])
    stream = streams[0]
    stream.transform = TransformBefore(stream.transform.image_px, train=True)
    before = [images for images, _, _ in stream.batches(0, 1)]
    assert len(seen) == len(before) == 3 and all(x.dtype == torch.float32 for x in seen)
    assert all(torch.equal(x, y) for x, y in zip(seen, before))


def test_evaluation_embeds_the_floats_the_workers_sent_before(two_years, monkeypatch):
    """evaluate.py normalises eval_batches' uint8 batches on the device: the model's image input,
    for retrieval and for classification, is bit for bit what it was."""
    tok = Tokenizer.train(shards.first_captions(two_years, ["2018"], 64), vocab_size=300)
    torch.manual_seed(0)
    model = CLIP(make_config("tiny", vocab_size=tok.vocab_size, eot_token_id=tok.eot_id))
    seen, encode_image = [], CLIP.encode_image

    def recording_encode_image(model, images):
        seen.append(images.clone())
        return encode_image(model, images)

    monkeypatch.setattr(CLIP, "encode_image", recording_encode_image)
    task = tasks_of(two_years, [["2018"]])["2018"]
    row = evaluate.evaluate_step(model, {"2018": task}, tok, torch.device("cpu"), batch_samples=24)
    assert row["2018"]["gallery"] == 64 and row["2018"]["class_samples"] == 32
    monkeypatch.setattr(data, "ImageTransform", TransformBefore)
    before = [x for x, *_ in data.eval_batches(task.retrieval, 32, 24)]
    before += [x for x, *_ in data.eval_batches(task.classification, 32, 24, target="class")]
    assert len(seen) == len(before) == 3 + 2  # 64 pairs, then 32 labelled images, in batches of 24
    assert all(torch.equal(x, y) for x, y in zip(seen, before))
