"""Real TiC data: counting shards without sizes.json, the image and caption variants of real shards, tools/prepare.py
split (every sample exactly once, a seeded held-out split), the classification split of the synthetic benchmark,
zero-shot classification against a brute-force reference, and the evaluation matrix of both kinds of task.

    python -m pytest -q tests/test_realdata.py
"""
import io
import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timezone

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import evaluate
import prepare
import report
import shards
import synthetic
from benchmark import read_lines, static_task, static_tasks, step_tasks, tasks_of
from conftest import REPO, all_files, write_tar
from model import CLIP, make_config
from text import Tokenizer


def image_bytes(fmt: str, value: int = 100, px: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (px, px), (value, 255 - value, 0)).save(buf, format=fmt)
    return buf.getvalue()


# ----------------------------------------------------------------------------- reading real shards
def test_year_shards_counts_once_and_caches_sizes(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "train" / "201505"
    folder.mkdir(parents=True)
    for name, n in (("b.tar", 3), ("a.tar", 5)):
        write_tar(folder / name, [(f"{name[0]}{i}.{ext}", b"x") for i in range(n) for ext in ("jpg", "txt")])
    listed = shards.year_shards(str(tmp_path), "201505")
    assert listed == [(str(folder / "a.tar"), 5), (str(folder / "b.tar"), 3)]
    assert json.load(open(folder / "sizes.json")) == {"a.tar": 5, "b.tar": 3}
    assert sorted(os.listdir(folder)) == ["a.tar", "b.tar", "sizes.json"]  # no temporary file left
    assert "counted 8 samples in 2 shards" in capsys.readouterr().out
    monkeypatch.setattr(shards, "iter_tar", lambda path: pytest.fail("read a shard although sizes.json exists"))
    assert shards.year_shards(str(tmp_path), "201505") == listed
    (tmp_path / "train" / "2016").mkdir()
    with pytest.raises(SystemExit, match="2016: holds no .tar shards"):
        shards.year_shards(str(tmp_path), "2016")


def test_counting_a_truncated_shard_warns_and_saves_nothing(tmp_path, capsys):
    folder = tmp_path / "train" / "2017"
    folder.mkdir(parents=True)
    members = [(f"k{i}.{ext}", b"x") for i in range(4) for ext in ("jpg", "txt")]  # 1 kB per member
    write_tar(folder / "a.tar", members)
    whole = open(write_tar(folder / "b.tar", members), "rb").read()
    (folder / "b.tar").write_bytes(whole[:2 * 2048 + 700])  # two whole samples, then the break
    listed = shards.year_shards(str(tmp_path), "2017")  # no traceback: the readable samples are counted
    assert listed == [(str(folder / "a.tar"), 4), (str(folder / "b.tar"), 2)]
    out, err = capsys.readouterr()
    assert "b.tar: unreadable tar shard" in err and "counted the 2 samples before the break" in err
    assert "sizes.json not saved because of 1 broken shard(s) (b.tar)" in out
    assert sorted(os.listdir(folder)) == ["a.tar", "b.tar"]  # nothing saved, no temporary file: counted again later


def test_image_kinds_json_captions_and_class_ids(tmp_path, capsys):
    path = tmp_path / "0.tar"
    write_tar(path, [("k0.jpg", image_bytes("JPEG")), ("k0.txt", b" from txt \n"),
                     ("k1.jpeg", image_bytes("JPEG")), ("k1.json", b'{"caption": "from json", "cls": 3}'),
                     ("k2.webp", image_bytes("WEBP")), ("k2.json", b'{"caption": "webp", "cls": 1}'), ("k2.cls", b"2"),
                     ("k3.png", image_bytes("PNG")), ("k3.json", b'{"uid": "no caption"}'),  # skipped
                     ("k4.json", b'{"caption": "no image"}')])  # skipped
    batches = list(data.eval_batches([(str(path), 5)], 8, 10, max_bad_fraction=0.5))
    assert batches[0][1:] == (["from txt", "from json", "webp"], ["k0", "k1", "k2"])
    assert "2 of 5 samples listed could not be scored (missing_caption 1, missing_image 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="over --max_bad_fraction=0.05, so the task is not scored"):
        list(data.eval_batches([(str(path), 5)], 8, 10))  # a gallery shrunk by 40% would score higher: refused
    images, labels, keys = next(data.eval_batches([(str(path), 5)], 8, 10, target="class"))
    assert labels == [3, 2] and keys == ["k1", "k2"]  # the .cls member wins over the json's
    assert images.shape == (2, 3, 8, 8)


# ----------------------------------------------------------------------------- tools/prepare.py split
@pytest.mark.parametrize("value, expected", [
    (2014, (2014, None)), ("2016", (2016, None)), (1400000000, (2014, 5)), ("1400000000", (2014, 5)),
    (1400000000123, (2014, 5)), (1.4e9, (2014, 5)), ("2012-04-14 13:08:06.0", (2012, 4)),
    ("2019-11-02T00:00:00Z", (2019, 11)),
    ("2020/1/5", (2020, 1)), (None, None), ("yesterday", None), (True, None)])
def test_parse_time(value, expected):
    assert prepare.parse_time(value) == expected


def source_shards(folder, n_shards=3, per_shard=40):
    """Timestamped shards as img2dataset writes them, times in the formats real sources use."""
    folder.mkdir()
    samples = {}
    formats = [lambda y: {"year": y}, lambda y: {"timestamp": (y - 1970) * 31557600 + 86400 * 40},
               lambda y: {"created_utc": float((y - 1970) * 31557600 + 86400 * 200)},
               lambda y: {"date_taken": f"{y}-07-01 10:00:00.0"}]
    for s in range(n_shards):
        members = []
        for i in range(per_shard):
            key, year = f"{s:05d}{i:04d}", 2014 + (s * per_shard + i) % 3
            meta = {"key": key, "caption": f"caption {key}", **formats[i % 4](year)}
            sample = {"jpg": image_bytes("JPEG", i), "json": json.dumps(meta).encode(),
                      "txt": f"caption {key}".encode()}
            members += [(f"{key}.{ext}", payload) for ext, payload in sample.items()]
            samples[key] = (year, sample)
        write_tar(folder / f"{s:05d}.tar", members)
    return samples


def read_layout(root):
    """{key: (split, folder, sample)} of every sample under root, checking each sizes.json on the way."""
    found = {}
    for split in ("train", "retrieval"):
        for year in shards.years_in(root, split):
            for path, n in shards.year_shards(root, year, split):
                samples = list(shards.iter_tar(path))
                assert len(samples) == n
                for key, sample in samples:
                    assert key not in found, f"{key} written twice"
                    found[key] = (split, year, sample)
    return found


def test_split_writes_every_sample_once_with_a_seeded_held_out_split(tmp_path, capsys):
    samples = source_shards(tmp_path / "src")
    dst = str(tmp_path / "tic")
    counts = prepare.split(str(tmp_path / "src"), dst, eval_fraction=0.2, seed=0, samples_per_shard=7)
    assert f"read {len(samples)} samples from 3 shards" in capsys.readouterr().out
    found = read_layout(dst)
    assert set(found) == set(samples)  # nothing dropped, nothing added (and nothing twice: read_layout)
    for key, (split, year, sample) in found.items():
        assert year == str(samples[key][0]) and sample == samples[key][1]  # right year, bytes unchanged
        assert (split == "retrieval") == data.keep_sample(key, 0.2, "heldout0")
    held_out = sum(counts["retrieval"].values())
    assert 0.1 < held_out / len(samples) < 0.3 and sum(counts["train"].values()) + held_out == len(samples)
    # the same seed gives the same files; another seed another held-out set
    prepare.split(str(tmp_path / "src" / "*.tar"), str(tmp_path / "again"), eval_fraction=0.2, samples_per_shard=7)
    assert all_files(str(tmp_path / "again")) == all_files(dst)
    prepare.split(str(tmp_path / "src"), str(tmp_path / "seed1"), eval_fraction=0.2, seed=1, samples_per_shard=7)
    other = read_layout(str(tmp_path / "seed1"))
    assert {k for k, v in other.items() if v[0] == "retrieval"} != {k for k, v in found.items() if v[0] == "retrieval"}
    with pytest.raises(SystemExit, match="exists already"):
        prepare.split(str(tmp_path / "src"), dst)


def test_split_by_month_and_errors_leave_nothing_behind(tmp_path):
    src, out = tmp_path / "src", str(tmp_path / "out")
    source_shards(src, n_shards=1, per_shard=8)
    with pytest.raises(SystemExit, match="sample 000000000 has no month in its json"):  # a bare year has no month
        prepare.split(str(src), out, by="month", on_missing_time="error")
    write_tar(src / "00001.tar", [("undated.jpg", b"x"), ("undated.json", b'{"caption": "?"}')])
    with pytest.raises(SystemExit, match=r"00001.tar: sample undated has no year in its json.*--time_field"):
        prepare.split(str(src), out, on_missing_time="error")
    assert sorted(os.listdir(tmp_path)) == ["src"]  # no output, no temporary folder, no key store
    shutil.rmtree(src)
    src.mkdir()
    times = [1388534400 + 40 * 86400 * i for i in range(12)]  # from 2014-01-01, every 40 days
    write_tar(src / "0.tar", [(f"m{i}.json", json.dumps({"date_uploaded": t}).encode()) for i, t in enumerate(times)])
    counts = prepare.split(str(src), out, by="month", eval_fraction=0)
    months = sorted({datetime.fromtimestamp(t, timezone.utc).strftime("%Y%m") for t in times})
    assert counts["retrieval"] == {} and sum(counts["train"].values()) == 12 and shards.years_in(out) == months
    with pytest.raises(SystemExit, match="none of the 12 samples has a usable year"):
        prepare.split(str(src), str(tmp_path / "none"), time_field="year")


def test_split_skips_and_counts_undated_samples_and_repeated_keys(tmp_path, capsys):
    src, out = tmp_path / "src", str(tmp_path / "out")
    src.mkdir()
    dated = lambda key, meta: [(f"{key}.jpg", b"x"), (f"{key}.json", json.dumps(meta).encode())]  # noqa: E731
    write_tar(src / "a.tar", [*dated("k1", {"year": 2015}), *dated("k2", {"caption": "no time"}),
                              *dated("k3", {"year": 2015, "timestamp": 1430000000}),  # the year has no month
                              *dated("k4", {"year": 2016})])
    write_tar(src / "b.tar", [*dated("k1", {"year": 2015, "n": 2}), *dated("k4", {"year": 2017})])
    counts = prepare.split(str(src), out, eval_fraction=0)
    assert counts["skipped"] == {"no_time": 1, "duplicate_key": 1}  # k2; k1 again in 2015 (k4 in 2017 is new there)
    assert counts["train"] == {"2015": 2, "2016": 1, "2017": 1}
    first_k1 = [s for p, _ in shards.year_shards(out, "2015") for k, s in shards.iter_tar(p) if k == "k1"]
    assert [json.loads(s["json"]) for s in first_k1] == [{"year": 2015}]  # the first kept
    printed = capsys.readouterr().out
    assert "skipped 1 samples without a usable year" in printed and "a.tar: sample k2" in printed
    assert "skipped 1 samples whose key their time folder held already" in printed and "b.tar: sample k1" in printed
    write_tar(src / "c.tar", [*dated("../../evil", {"year": 2015}), *dated("/abs/key", {"year": 2015})])
    unsafe = prepare.split(str(src), str(tmp_path / "safe"), eval_fraction=0)
    assert unsafe["skipped"]["unsafe_name"] == 2 and unsafe["train"] == counts["train"]  # names kept out, not copied
    os.remove(src / "c.tar")
    (src / "d.tar").write_bytes(open(src / "a.tar", "rb").read()[:3000])  # a download cut short: the rest goes on
    cut = prepare.split(str(src), str(tmp_path / "cut"), eval_fraction=0)
    assert cut["train"] == counts["train"] and "1 source shard(s) broke off (d.tar)" in capsys.readouterr().out
    os.remove(src / "d.tar")
    by_month = prepare.split(str(src), str(tmp_path / "months"), by="month", eval_fraction=0)
    assert by_month["train"] == {"201504": 1} and by_month["skipped"] == {"no_time": 5}  # k3's month: its timestamp


def test_split_command_line(tmp_path):
    source_shards(tmp_path / "src", n_shards=2, per_shard=10)
    cmd = [sys.executable, "tools/prepare.py", "split", f"--src={tmp_path / 'src'}", f"--dst={tmp_path / 'tic'}",
           "--eval_fraction=0.1", "--seed=3"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "read 20 samples from 2 shards" in out.stdout and "wrote 20 = " in out.stdout
    bad = subprocess.run([sys.executable, "tools/prepare.py", "split", "--sorce=x"], cwd=REPO, capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "unknown config key 'sorce'" in bad.stderr and "src" in bad.stderr


# ----------------------------------------------------------------------------- the synthetic classification split
SMALL = dict(seed=2, years=(2018, 2019, 2020), train_samples_per_year=8, eval_samples_per_year=8,
             classification_samples_per_year=300, samples_per_shard=100)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bench") / "synth")
    synthetic.make_synthetic_benchmark(root, **SMALL)
    return root


def test_classification_split_follows_each_years_shapes(bench):
    folder = os.path.join(bench, "eval", "classification")
    assert read_lines(os.path.join(folder, "classnames.txt")) == list(synthetic.SHAPES)
    assert read_lines(os.path.join(folder, "templates.txt")) == list(synthetic.CLASS_TEMPLATES)
    meta = json.load(open(os.path.join(bench, "benchmark.json")))
    for year in shards.years_in(bench, "classification"):
        classes = []
        for path, n in shards.year_shards(bench, year, "classification"):
            samples = list(shards.iter_tar(path))
            assert len(samples) == n and all(set(s) == {"json", "png", "cls"} for _, s in samples)
            classes += [shards.class_id(s) for _, s in samples]
            assert all(json.loads(s["json"])["cls"] == shards.class_id(s) for _, s in samples)
        seen = {synthetic.SHAPES[c] for c in classes}
        assert len(classes) == 300 and seen == {s for s, w in meta["shape_weights"][year].items() if w > 0}


def test_a_benchmark_of_another_version_is_refused_in_one_line(bench, tmp_path):
    old = str(tmp_path / "old")
    shutil.copytree(bench, old)
    meta = json.load(open(os.path.join(old, "benchmark.json")))
    del meta["classnames"], meta["class_templates"], meta["params"]["classification_samples_per_year"]
    json.dump(meta, open(os.path.join(old, "benchmark.json"), "w"), indent=1)  # as written before the split existed
    with pytest.raises(SystemExit, match=f"{old} holds a different synthetic benchmark.*delete {old}"):
        synthetic.make_synthetic_benchmark(old, **SMALL)


# ----------------------------------------------------------------------------- zero-shot classification
@pytest.fixture(scope="module")
def model_and_tokenizer():
    tok = Tokenizer.train(["a red circle at top left and a blue star", "a picture of a moon"] * 4, vocab_size=300)
    torch.manual_seed(0)
    cfg = make_config("tiny", vocab_size=tok.vocab_size, eot_token_id=tok.eot_id, vision_layers=1, text_layers=1)
    return CLIP(cfg).eval(), tok


def test_classifier_and_accuracy_match_a_brute_force_reference(bench, model_and_tokenizer):
    model, tok = model_and_tokenizer
    names, templates = list(synthetic.SHAPES), list(synthetic.CLASS_TEMPLATES)
    classifier = evaluate.zero_shot_classifier(model, names, templates, tok, torch.device("cpu"), batch_samples=7)
    with torch.no_grad():
        for c, name in enumerate(names):  # one class at a time, the definition spelled out
            tokens = tok([t.format(name) for t in templates], model.cfg.context_tokens)
            prompts = F.normalize(model.encode_text(tokens), dim=-1)
            mean = prompts.mean(0)
            torch.testing.assert_close(classifier[:, c], mean / mean.norm(), rtol=0, atol=1e-5)
        listed = shards.year_shards(bench, "2020", "classification")
        got = evaluate.classification(model, listed, classifier, torch.device("cpu"), batch_samples=64)
        decoded = [shards.decode(sample, "class") for path, _ in listed for _, sample in shards.iter_tar(path)]
        images = torch.stack([data.ImageTransform(32, False)(image) for image, _ in decoded])
        images = data.normalize_images(images)
        all_scores = F.normalize(model.encode_image(images), dim=-1) @ classifier
        hits1 = hits5 = 0
        for scores, (_, label) in zip(all_scores, decoded):
            rank = int((scores > scores[label]).sum())  # classes scoring strictly higher than the true one
            hits1, hits5 = hits1 + (rank == 0), hits5 + (rank < 5)
    assert got["class_samples"] == 300 and got["classes"] == 16
    assert got["top1"] == pytest.approx(100 * hits1 / 300) and got["top5"] == pytest.approx(100 * hits5 / 300)
    assert got["top1"] <= got["top5"]


def test_evaluation_rows_and_matrix_hold_both_kinds(bench, model_and_tokenizer, tmp_path):
    model, tok = model_and_tokenizer
    tasks = {y: step_tasks(bench, [y]) for y in ("2018", "2019")}
    row = evaluate.evaluate_step(model, tasks, tok, torch.device("cpu"), batch_samples=128)
    assert set(row["2018"]) >= {"mean_R@1", "gallery", "top1", "top5", "class_samples"}
    # a root without classification data: retrieval only
    no_cls = str(tmp_path / "no_cls")
    shutil.copytree(bench, no_cls, ignore=shutil.ignore_patterns("classification"))
    assert step_tasks(no_cls, ["2018"]).classification is None
    rows = {"2018": row, "2019": {"2018": dict(row["2018"]), "2019": {k: v for k, v in row["2019"].items()
                                                                       if k in ("mean_R@1", "gallery")}}}
    result = evaluate.eval_matrix(rows, ["2018", "2019"])
    assert result["matrix"] == result["retrieval"]["matrix"] and result["summary"] == result["retrieval"]["summary"]
    cls = result["classification"]
    assert cls["metric"] == "top1" and cls["matrix"][1][1] is None  # that task had no classification
    assert cls["summary"]["id"] == row["2018"]["top1"] and cls["summary"]["forward_transfer"] == row["2019"]["top1"]
    text = report.format_matrix(result)
    assert "retrieval evaluation matrix" in text and "classification evaluation matrix: top1" in text
    assert "n/a" in text and "16 classes" in text


# ----------------------------------------------------------------------------- static tasks, TiC's own eval layout
def write_wds_task(folder, kind, samples, classnames=None):
    """A task in clip_benchmark's webdataset format: test/0.tar and test/nshards.txt, dataset_type.txt, and for
    classification classnames.txt and zeroshot_classification_templates.txt ({c} for the class name)."""
    (folder / "test").mkdir(parents=True)
    label = (lambda i, y: (f"s{i}.cls", str(y).encode())) if kind == "classification" else \
        (lambda i, y: (f"s{i}.txt", "\n".join(y).encode()))
    write_tar(folder / "test" / "0.tar", [m for i, (img, y) in enumerate(samples) for m in ((f"s{i}.png", img),
                                                                                           label(i, y))])
    (folder / "test" / "nshards.txt").write_text("1\n")
    (folder / "dataset_type.txt").write_text(kind + "\n")
    if classnames:
        (folder / "classnames.txt").write_text("\n".join(classnames))
        (folder / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na {c}")


def test_static_tasks_score_as_computed_directly(tmp_path, model_and_tokenizer):
    model, tok = model_and_tokenizer
    cpu, images = torch.device("cpu"), [image_bytes("PNG", v) for v in range(0, 250, 25)]  # 10 greys
    classes = ["red circle", "blue moon", "white star"]
    write_wds_task(tmp_path / "cls", "classification", [(im, i % 3) for i, im in enumerate(images)], classes)
    captions = [[f"a picture number {i} of {j} {w}" for j, w in enumerate(["red", "blue", "white", "moon", "star"])]
                for i in range(len(images))]
    write_wds_task(tmp_path / "ret", "retrieval", list(zip(images, captions)))
    tasks = static_tasks(str(tmp_path / "no_root"), f"cls={tmp_path / 'cls'},ret={tmp_path / 'ret'}")
    assert tasks["cls"].templates == ["a photo of a {}.", "a {}"] and tasks["ret"].kind == "retrieval"
    row = evaluate.evaluate_step(model, tasks, tok, cpu, batch_samples=4)
    with torch.no_grad():  # the same numbers, computed directly
        pixels = torch.stack([data.ImageTransform(32, False)(Image.open(io.BytesIO(im))) for im in images])
        pixels = data.normalize_images(pixels)
        img = F.normalize(model.encode_image(pixels), dim=-1)
        classifier = evaluate.zero_shot_classifier(model, classes, ["a photo of a {}.", "a {}"], tok, cpu)
        predicted, labels = (img @ classifier).argmax(1), torch.arange(10) % 3
        per_class = [(predicted[labels == c] == c).float().mean().item() for c in range(3)]
        flat = [c for cs in captions for c in cs]
        txt = F.normalize(model.encode_text(tok(flat, model.cfg.context_tokens)), dim=-1)
        owner, scores = [j // 5 for j in range(len(flat))], img @ txt.t()
    i2t = sum(sum(float(scores[i, j]) >= max(float(scores[i, m]) for m in range(50) if owner[m] == i)
                  for j in range(50) if owner[j] != i) < 1 for i in range(10)) / 10
    t2i = sum(sum(float(scores[m, j]) >= float(scores[owner[j], j]) for m in range(10) if m != owner[j]) < 1
              for j in range(50)) / 50
    assert row["cls"]["top1"] == pytest.approx(100 * (predicted == labels).float().mean().item())
    assert row["cls"]["mean_per_class_recall"] == pytest.approx(100 * sum(per_class) / 3)
    assert row["ret"]["i2t_R@1"] == pytest.approx(100 * i2t) and row["ret"]["t2i_R@1"] == pytest.approx(100 * t2i)
    assert row["ret"]["mean_R@1"] == pytest.approx(50 * (i2t + t2i)) and row["ret"]["captions"] == 50
    result = evaluate.eval_matrix({"2018": {"2018": {"mean_R@1": 1.0, "gallery": 1}, **row}}, ["2018"])
    assert result["matrix"] == [[1.0]] and result["static"]["tasks"] == ["cls", "ret"]  # static: outside E
    assert result["static"]["numbers"] == [[row["cls"]["top1"], row["ret"]["mean_R@1"]]]
    assert result["static"]["final_mean"] == pytest.approx((row["cls"]["top1"] + row["ret"]["mean_R@1"]) / 2)
    assert "static tasks: top-1 (classification) or mean R@1 (retrieval)" in report.format_matrix(result)
    (tmp_path / "multi").mkdir()
    (tmp_path / "multi" / "test").mkdir()
    (tmp_path / "multi" / "test" / "nshards.txt").write_text("0")
    (tmp_path / "multi" / "dataset_type.txt").write_text("multilabel")
    with pytest.raises(SystemExit, match="'multilabel' tasks are not scored here"):
        static_task(str(tmp_path / "multi"))


def test_tic_datacompnet_as_released_and_an_unknown_eval_folder(tmp_path, capsys):
    root = tmp_path / "tic"
    for split in ("retrieval", "datacompnet"):  # year folders as ml-tic-clip's convert_wds.sh leaves them
        folder = root / "eval" / split / "2016"
        folder.mkdir(parents=True)
        write_tar(folder / "0.tar", [m for i in range(3) for m in (
            (f"k{i}.jpg", image_bytes("JPEG")), (f"k{i}.txt", b"a caption") if split == "retrieval" else
            (f"k{i}.cls", str(i % 2).encode()))])
        (folder / "nshards.txt").write_text("1")
        (folder / "count.txt").write_text("3")
        (folder / "0.json").write_text("{}")
    (root / "eval" / "datacompnet" / "2016" / "classnames.txt").write_text("cat\ndog")
    (root / "eval" / "datacompnet" / "2016" / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.")
    (root / "eval" / "imagenet").mkdir()
    tasks = tasks_of(str(root), [["2016"]])
    assert "eval/imagenet: not an evaluation folder this program reads" in capsys.readouterr().err
    task = tasks["2016"]
    assert [n for _, n in task.classification] == [3] and task.classnames == ["cat", "dog"]
    assert task.templates == ["a photo of a {}."] and [n for _, n in task.retrieval] == [3]
