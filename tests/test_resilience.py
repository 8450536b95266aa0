"""Surviving kills, bad data and numerical faults: a run killed mid-step (SIGKILL, or SIGTERM that saves first)
and rerun ends with bitwise the same weights as a run never stopped, on one process and on two (gloo);
corrupt or missing data is skipped, counted and reported, or stops the run past max_bad_fraction; a
non-finite loss skips its update exactly, and several in a row stop the run. Hermetic and CPU-only.

    python -m pytest -q tests/test_resilience.py
"""
import glob
import itertools
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zipfile

import pytest
import torch

import checkpoints
import data
import model
import score
import shards
import survive
import synthetic
import train
from conftest import (ENV, REPO, all_files, png_bytes, run_train, train_command, train_in_process, train_refused,
                      train_stopped, write_tar)
from faults import FAULTS
from text import Tokenizer

# 8 iterations per step, a resume checkpoint every 2
TINY = ["--strategy=sequential", "--budget_samples=256", "--batch_size=32", "--vocab_size=300", "--log_interval=4",
        "--warmup_iters=2", "--warmup_iters_later=2", "--eval_batch=64", "--ckpt_interval_samples=64"]


def descendants(pid):
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    return [p for c in children for p in [int(c), *descendants(int(c))]]


def kill_mid_step(args, run_dir, sig, nproc=None, command=None):
    """Start the run (train.py with args, or command); once step 2 has a resume checkpoint, send sig to all its
    processes (torchrun starts each worker in a session of its own, so the process group alone would miss them)."""
    proc = subprocess.Popen(command or train_command(args, nproc), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while not glob.glob(os.path.join(run_dir, "resume", "step02-[0-9]*.pt")):  # a resume checkpoint
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.005)
    for pid in [proc.pid, *descendants(proc.pid)]:
        os.kill(pid, sig)
    out, err = proc.communicate(timeout=120)
    assert not os.path.exists(os.path.join(run_dir, "step02.pt")), "the kill came after the step ended"
    return proc.returncode, out, err


def weights(run_dir, step=2):
    return torch.load(os.path.join(run_dir, f"step{step:02d}.pt"), weights_only=True)["model"]


def assert_same_weights(run_a, run_b):
    for step in (1, 2):
        a, b = weights(run_a, step), weights(run_b, step)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"step {step} differs"


@pytest.fixture(scope="module")
def reference(two_years, tmp_path_factory):
    """An uninterrupted one-process run: what every killed and resumed run must reproduce bit for bit."""
    run_dir = str(tmp_path_factory.mktemp("ref") / "run")
    run_train([f"--data_root={two_years}", f"--out_dir={run_dir}", "--workers=0", *TINY])
    return run_dir


# ----------------------------------------------------------------------------- exact resume

@pytest.mark.slow
def test_sigkill_mid_step_then_rerun_is_bitwise_an_uninterrupted_run(two_years, reference, tmp_path):
    run_dir = str(tmp_path / "run")
    args = [f"--data_root={two_years}", f"--out_dir={run_dir}", "--workers=0", *TINY]
    rc, _, _ = kill_mid_step(args, run_dir, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    # a kill during a checkpoint write leaves a temporary file; a checkpoint damaged later does not load
    resume = os.path.join(run_dir, "resume")
    open(os.path.join(resume, "step02-0000099.pt.tmp4242"), "wb").write(b"half a checkpoint")
    open(os.path.join(resume, "step02-0000007.pt"), "wb").write(b"bit rot")  # newest by name: skipped with a warning
    out = subprocess.run(train_command(args), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step02-0000007.pt does not load" in out.stderr
    samples = int(out.stdout.split("resuming at sample ")[1].split()[0])
    assert 0 < samples < 256 and "step 1/2 (2018): done already" in out.stdout
    assert_same_weights(run_dir, reference)
    assert os.listdir(resume) == []  # the step's resume checkpoints (and the stray files) are gone once it ends


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly_then_rerun_is_bitwise_the_same(two_years, reference, tmp_path):
    run_dir = str(tmp_path / "run")
    # workers=1: the DataLoader worker gets the SIGTERM too (sent to the group) and must outlive the save
    args = [f"--data_root={two_years}", f"--out_dir={run_dir}", "--workers=1", *TINY]
    rc, out, err = kill_mid_step(args, run_dir, signal.SIGTERM)
    assert rc == 0, err[-3000:]
    saved = out.split("SIGTERM: saved ")[1].split()[0]
    assert os.path.exists(saved) and "rerun the same command" in out
    again = run_train(args)
    assert f"from {saved}" in again  # the checkpoint SIGTERM wrote is the one resumed from
    assert_same_weights(run_dir, reference)


@pytest.mark.slow
def test_two_process_kill_mid_step_resumes_both_ranks_from_one_checkpoint(two_years, tmp_path):
    ref, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
    args = [f"--data_root={two_years}", "--workers=0", *TINY]
    run_train([f"--out_dir={ref}", *args], nproc=2)
    rc, _, _ = kill_mid_step([f"--out_dir={run_dir}", *args], run_dir, signal.SIGKILL, nproc=2)
    assert rc != 0
    out = run_train([f"--out_dir={run_dir}", *args], nproc=2)
    resumed = sorted(line.split(": ", 1)[1] for line in out.splitlines() if "resuming at sample" in line)
    assert len(resumed) == 2 and resumed[0] == resumed[1], out  # rank 0 and rank 1: the same sample, the same file
    assert_same_weights(run_dir, ref)


# ----------------------------------------------------------------------------- the loader's position


def good_shard(path, prefix, n):
    members = [m for i in range(n) for m in ((f"{prefix}_{i:04d}.png", png_bytes(4 * i % 100)),
                                             (f"{prefix}_{i:04d}.txt", b"a good caption"))]
    return write_tar(path, members), n


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(["a good caption", "a bad caption"] * 20, vocab_size=280)


def in_loader_order(stream, workers):
    """What a DataLoader with this many workers yields: one batch from each worker in turn."""
    per_worker = [stream.batches(w, workers) for w in range(workers)]
    return [b for group in itertools.zip_longest(*per_worker) for b in group if b is not None]


def test_stream_from_any_batch_is_the_tail_of_the_whole_stream(tmp_path, tokenizer):
    part = data.Part("2020", [good_shard(tmp_path / f"{i}.tar", f"s{i}", 10 + 3 * i) for i in range(4)])
    make = lambda start: data.TrainStream([part], 8 * 13, 8, 0, 1, seed=1, time_step=2, image_px=8,  # noqa: E731
                                          tokenizer=tokenizer, context_tokens=8, shuffle_buffer=12,
                                          start_batch=start, chunk_samples=24)  # 3 batches a chunk
    for workers in (1, 2):
        whole = in_loader_order(make(0), workers)
        assert len(whole) == 13
        for start in (1, 3, 4, 8, 12, 13):
            tail = in_loader_order(make(start), workers)
            assert len(tail) == 13 - start
            assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(tail, whole[start:]))
    # the real DataLoader takes its workers in turn as assumed above, also when resuming mid-way
    tail = [b[0] for b in data.train_loader(make(5), num_workers=2)]
    assert all(torch.equal(a, b[0]) for a, b in zip(tail, in_loader_order(make(0), 2)[5:], strict=True))


# ----------------------------------------------------------------------------- faults in data

def bad_shards(folder):
    """One shard per fault, each (but the empty one) also holding good samples so a batch can fill."""
    ok = lambda i: [(f"ok{i}.png", png_bytes(10)), (f"ok{i}.txt", b"a good caption")]  # noqa: E731
    tar = lambda name, members: (write_tar(os.path.join(folder, name), members), 4)  # noqa: E731
    whole = open(write_tar(os.path.join(folder, "full.tar"), [m for i in range(4) for m in ok(f"t{i}")]), "rb").read()
    os.remove(os.path.join(folder, "full.tar"))
    with open(os.path.join(folder, "truncated.tar"), "wb") as f:
        f.write(whole[:2 * 2048 + 700])  # two samples (two 1 kB members each), then the break
    return [
        tar("corrupt.tar", [*ok("c"), ("bad_c.png", b"\x89PNG not really"), ("bad_c.txt", b"a bad caption")]),
        tar("nocaption.tar", [*ok("n"), ("bad_n.png", png_bytes(255)), ("bad_n.json", b"{}")]),  # white: easy to spot
        tar("noimage.tar", [*ok("i"), ("bad_i.txt", b"a bad caption")]),
        tar("badname.tar", [*ok("b"), ("bad_b\udcff.png", png_bytes(255)),  # a name's byte 0xff
                            ("bad_b\udcff.txt", b"a bad caption")]),
        tar("duplicate.tar", [*ok("d"), ("ok_d.png", png_bytes(10)), ("ok_d.txt", b"a good caption"),
                              ("ok_d.png", png_bytes(20)), ("ok_d.txt", b"a bad caption")]),
        tar("empty.tar", []),
        (os.path.join(folder, "truncated.tar"), 4),
    ]


FAULT_SHARDS = {"corrupt_image": "corrupt.tar", "missing_caption": "nocaption.tar", "missing_image": "noimage.tar",
                "duplicate_key": "duplicate.tar", "empty_shard": "empty.tar",
                "truncated_tar": "truncated.tar", "corrupt_sample": "badname.tar"}


def test_loader_skips_counts_and_logs_every_fault_in_workers_too(tmp_path, tokenizer, capfd):
    part = data.Part("2020", bad_shards(tmp_path) + [good_shard(tmp_path / f"{i}.tar", f"g{i}", 16) for i in (0, 1)])
    make = lambda: data.TrainStream([part], 8 * 40, 8, 0, 1, seed=0, time_step=0, image_px=8,  # noqa: E731
                                    tokenizer=tokenizer, context_tokens=8, shuffle_buffer=4)
    batches = list(make().batches(0, 1))
    faults = sum((data.Counter(f) for *_, f in batches), data.Counter())
    assert all(faults[kind] > 0 for kind in FAULTS), faults
    bad_token = tokenizer.tok.encode("bad").ids[0]
    for images, tokens, _ in batches:  # nothing bad is trained on: no bad caption, no white image
        assert images.shape == (8, 3, 8, 8) and not (tokens == bad_token).any()
        assert images.amax() < 255  # uint8 pixels: the good ones are dark greys
    err = capfd.readouterr().err
    for kind, shard in FAULT_SHARDS.items():  # one line naming the shard (and the sample) per fault
        assert any(shard in line and kind.replace("_", " ") in line for line in err.splitlines()), (kind, err)
    assert "sample bad_c: corrupt image" in err and "sample ok_d: duplicate key" in err
    said = "corrupt sample (its name in the tar is not UTF-8)"
    assert any("sample bad_b" in line and said in line for line in err.splitlines())
    # a worker process counts the same, and its counts reach the main process with the batches
    from_worker = sum((data.Counter(f) for *_, f in data.train_loader(make(), num_workers=1)), data.Counter())
    assert from_worker == faults


def test_a_bad_name_or_a_json_nested_too_deep_is_a_counted_bad_sample(tmp_path, tokenizer):
    deep = b"[" * 100_000 + b"]" * 100_000  # valid JSON, nested deeper than Python's parser goes
    folder = tmp_path / "train" / "2020"
    folder.mkdir(parents=True)
    bad = write_tar(folder / "bad.tar", [
        ("deep.png", png_bytes(255)), ("deep.json", deep),  # its only caption would be in the json
        ("bad\udcff.png", png_bytes(255)), ("bad\udcff.txt", b"a bad caption"),  # a byte 0xff
        ("ok.png", png_bytes(10)), ("ok.txt", b"a good caption")])
    (folder / "sizes.json").write_text('{"bad.tar": 3}')
    part = data.Part("2020", [(bad, 3), good_shard(tmp_path / "good.tar", "g", 16)])
    stream = data.TrainStream([part], 8 * 4, 8, 0, 1, seed=0, time_step=0, image_px=8,
                              tokenizer=tokenizer, context_tokens=8, shuffle_buffer=4)
    faults = sum((data.Counter(f) for *_, f in stream.batches(0, 1)), data.Counter())
    assert faults["corrupt_sample"] > 0 and faults["missing_caption"] > 0, faults
    # the tokenizer's captions and the evaluation read the same shard to its end
    captions = list(shards.first_captions(str(tmp_path), ["2020"], 10))
    assert captions == ["a bad caption", "a good caption"]
    scored = r"2 of 3 samples listed could not be scored \(missing_caption 1, corrupt_sample 1\)"
    with pytest.raises(SystemExit, match=scored):
        list(data.eval_batches([(bad, 3)], 8, 4))
    list(data.eval_batches([(bad, 3)], 8, 4, validation_only=True, max_bad_fraction=1))


@pytest.fixture(scope="module")
def bad_bench(tmp_path_factory):
    """A one-year benchmark whose training folder also holds one shard of each fault."""
    root = str(tmp_path_factory.mktemp("bad") / "data")
    synthetic.make_synthetic_benchmark(root, years=(2018,), train_samples_per_year=128, eval_samples_per_year=32,
                                  samples_per_shard=32, classification_samples_per_year=0, static_samples=32)
    folder = os.path.join(root, "train", "2018")
    sizes = json.load(open(os.path.join(folder, "sizes.json")))
    sizes.update({os.path.basename(path): n for path, n in bad_shards(folder)})
    json.dump(sizes, open(os.path.join(folder, "sizes.json"), "w"))
    return root


@pytest.mark.slow
def test_step_reports_fault_counts_in_its_line_and_the_log(bad_bench, tmp_path):
    run_dir = str(tmp_path / "run")
    out = run_train([f"--data_root={bad_bench}", f"--out_dir={run_dir}", "--workers=1", *TINY, "--budget_samples=128",
               "--max_bad_fraction=1"])
    assert "step 1/1 (2018): 128 samples" in out and "; skipped " in out and "corrupt_image" in out
    end = [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))][-1]
    assert end["event"] == "step_end" and all(end["faults"][kind] > 0 for kind in FAULTS), end["faults"]
    assert 0 < end["faults"]["bad_samples"] < end["faults"]["samples"] and end["nonfinite"] == 0


@pytest.mark.slow
def test_too_much_bad_data_stops_with_one_clear_line(bad_bench, tmp_path):
    # judged as a share of the samples read, once 50 x the largest shard (32) have been read: about 8% are bad here
    args = [f"--data_root={bad_bench}", f"--out_dir={tmp_path}/run", "--workers=0", *TINY, "--budget_samples=2048",
            "--max_bad_fraction=0.01"]
    out = subprocess.run(train_command(args), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: step 1 (2018): ") and "--max_bad_fraction=0.01" in last, out.stderr
    bad, read = (int(x) for x in last.split(": ")[2].split(" samples read")[0].split(" of "))
    assert read >= 1600 and bad > 0.01 * read
    assert not os.path.exists(f"{tmp_path}/run/step01.pt")
    # at a budget whose reads stay under that minimum, the same data does not stop the run
    run_train([f"--data_root={bad_bench}", f"--out_dir={tmp_path}/small", "--workers=0", *TINY, "--budget_samples=64",
               "--max_bad_fraction=0.01"])


# ----------------------------------------------------------------------------- failures that must not hang
PLANTED = """
import sys
sys.path.insert(0, {repo!r})
import data, train
make_chunk = data.TrainStream.chunk


def failing_chunk(self, *args):  # the loader worker of one rank raises after its first batch
    batches = make_chunk(self, *args)
    if self.rank == {rank}:
        yield next(batches)
        raise RuntimeError("a fault planted in a loader worker")
    yield from batches


data.TrainStream.chunk = failing_chunk
train.run(sys.argv[1:])
"""


@pytest.mark.parametrize("nproc", [1, 2])
def test_an_exception_in_a_loader_worker_ends_the_run_in_seconds_with_one_line(two_years, tmp_path, nproc):
    rank = nproc - 1  # with two processes, only rank 1's worker fails: rank 0 must not wait for it forever
    script = tmp_path / "planted.py"
    script.write_text(PLANTED.format(repo=REPO, rank=rank))
    launcher = [sys.executable] + ([] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone",
                                                          f"--nproc_per_node={nproc}"])
    run_dir = tmp_path / "run"
    t0 = time.time()
    out = subprocess.run([*launcher, str(script), f"--data_root={two_years}", f"--out_dir={run_dir}", "--workers=1",
                          *TINY], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and time.time() - t0 < 60, out.stderr[-2000:]
    line = f"error in a DataLoader worker: RuntimeError: a fault planted in a loader worker (traceback in {run_dir}"
    assert line in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr.split(line)[0][-500:]  # the line stands alone; the traceback is in the log
    assert "a fault planted" in (run_dir / f"error-rank{rank}.log").read_text()
    assert "Connection closed" not in out.stderr  # the rank that waited for it says nothing


def test_a_fifo_socket_device_or_folder_for_a_shard_is_a_bad_shard(tmp_path, monkeypatch):
    # open() waits on a FIFO for a writer forever, deaf to SIGTERM: read in a process of its own
    monkeypatch.chdir(tmp_path)  # a socket is bound by its name here: a path has at most 107 bytes
    os.mkfifo("fifo.tar")
    os.symlink("/dev/zero", "device.tar")
    os.mkdir("folder.tar")
    read = ("import sys; sys.path.insert(0, sys.argv[1]); import shards\n"
            "for name in sys.argv[2:]:\n"
            "    try:\n        print(name, len(list(shards.iter_tar(name))), 'samples')\n"
            "    except shards.ShardError as e:\n        print(e)")
    names = ["fifo.tar", "sock.tar", "device.tar", "folder.tar"]
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("sock.tar")
        out = subprocess.run([sys.executable, "-c", read, REPO, *names], env=ENV,
                             capture_output=True, text=True, timeout=60)
    lines = out.stdout.splitlines()
    fix = "not a tar file; put the shard there or drop it from sizes.json"
    assert lines[0] == f"fifo.tar: a FIFO, {fix}", out.stdout + out.stderr
    assert lines[1].startswith("sock.tar: unreadable tar shard")  # open() refuses a socket
    assert lines[2:] == [f"device.tar: a device, {fix}", f"folder.tar: a folder, {fix}"]


@pytest.mark.slow
def test_a_run_with_a_fifo_among_its_shards_listed_or_not_ends(two_years, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(os.path.join(two_years, "train", "2018"), root / "train" / "2018")
    shutil.copytree(os.path.join(two_years, "eval"), root / "eval")
    folder = root / "train" / "2018"
    sizes = json.loads((folder / "sizes.json").read_text())
    (folder / "sizes.json").write_text(json.dumps({**sizes, "listed.tar": 64}))
    os.mkfifo(folder / "listed.tar")  # read by the tokenizer's training, and by the loader if drawn
    os.mkfifo(folder / "unlisted.tar")  # counted on first use, as a shard added after sizes.json
    args = [f"--data_root={root}", f"--out_dir={tmp_path}/run", "--workers=0", *TINY]
    out = subprocess.run(train_command(args), cwd=REPO, env=ENV, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "unlisted.tar: a FIFO, not a tar file" in out.stderr
    assert "/listed.tar: a FIFO, not a tar file" in out.stderr
    assert "step 1/1 (2018): 256 samples" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_ranks_whose_torchrun_is_killed_or_stopped_save_and_exit(two_years, tmp_path, sig):
    run_dir = str(tmp_path / "run")
    args = [f"--data_root={two_years}", f"--out_dir={run_dir}", "--workers=0", *TINY,
            "--budget_samples=32000"]  # 1000 iterations a step: minutes, if the ranks went on
    proc = subprocess.Popen(train_command(args, nproc=2), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while not glob.glob(os.path.join(run_dir, "resume", "step01-*.pt")):  # training has begun
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    ranks = descendants(proc.pid)
    os.kill(proc.pid, sig)  # torchrun alone: SIGKILL leaves its ranks running; SIGTERM it passes on
    try:
        out, err = proc.communicate(timeout=60)  # returns once no rank holds the pipes
    except subprocess.TimeoutExpired:
        for pid in ranks:
            os.kill(pid, signal.SIGKILL)
        pytest.fail("the ranks outlived their torchrun by 60 s")
    assert os.path.exists(out.split("SIGTERM: saved ")[1].split()[0])  # the rerun continues from it
    if sig == signal.SIGKILL:
        assert "is gone: the run stops as on SIGTERM" in err, err[-2000:]
    else:  # torchrun passes SIGTERM on, then re-raises it: exit 1 (docs/faults.md)
        assert proc.returncode == 1 and "SignalException" in err


APPEND_TO_A_FULL_DISK = """
import resource, signal, sys
sys.path.insert(0, sys.argv[1])
import torch, report, train
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (40, 40))  # room for 20 more bytes: part of the line
log = report.run_log(sys.argv[2], train.World(0, 1, False, torch.device("cpu")))
log({"event": "train", "loss": 1.0})
"""


def test_a_failed_append_to_the_log_names_it_and_leaves_no_half_line(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"event": "config"}\n')  # 20 bytes
    out = subprocess.run([sys.executable, "-c", APPEND_TO_A_FULL_DISK, REPO, str(tmp_path)],
                         env=ENV, capture_output=True, text=True, timeout=120)
    assert out.stderr.strip() == f"error: could not write {log}: File too large; free some space " \
                                 f"or fix the folder's permissions, then rerun"
    assert log.read_text() == '{"event": "config"}\n'


# ----------------------------------------------------------------------------- numerical faults

def test_nonfinite_loss_skips_its_update_and_a_run_of_them_stops(two_years, tmp_path, monkeypatch):
    real_loss, calls = model.clip_loss, itertools.count()
    poisoned = {3, 5, 6, 7}  # iterations (of 8) whose loss is NaN: one alone, then three in a row

    def clip_loss(*args, **kwargs):
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if next(calls) in poisoned else loss

    monkeypatch.setitem(model.LOSSES, "clip", model.Loss(clip_loss))
    run_dir = str(tmp_path / "run")
    args = [f"--data_root={two_years}", f"--out_dir={run_dir}", "--steps=2018", "--workers=0", *TINY,
            "--ckpt_interval_samples=32", "--keep_checkpoints=10", "--max_nonfinite_in_row=3"]
    with pytest.raises(SystemExit, match=r"3 non-finite losses in a row by sample 256; .*step01-0000007.pt"):
        train_in_process(args)
    assert not os.path.exists(os.path.join(run_dir, "step01.pt"))
    ckpt = {it: torch.load(os.path.join(run_dir, "resume", f"step01-{it:07d}.pt"), weights_only=True)
            for it in range(1, 8)}
    same = lambda a, b: all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # noqa: E731
    assert same(ckpt[3], ckpt[4]) and not same(ckpt[4], ckpt[5])  # iteration 3 (NaN) left weights untouched
    assert ckpt[3]["optimizer"]["state"][0]["step"] == ckpt[4]["optimizer"]["state"][0]["step"] == 3  # and Adam
    assert ckpt[7]["nonfinite"] == 3 and ckpt[7]["nonfinite_in_row"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt[7]["model"].values())  # the last good checkpoint, intact


def test_a_damaged_or_outdated_start_of_step_file_is_said(tmp_path, capsys):
    """RUN/resume/stepNN-start.pt (a strategy's start-of-step action, kept for a resumed step): a
    damaged one is done again, with a warning; one written under other settings says which."""
    world, cfg = train.World(0, 1, False, torch.device("cpu")), train.parse_config(["--lr=1e-3"])
    path = str(tmp_path / "step02-start.pt")
    open(path, "wb").write(b"half a file")
    assert survive.load_start(path, cfg, world) is None
    assert "does not load" in capsys.readouterr().err
    torch.save({"report": {"flops": 1}, "state": {}, "config": {**vars(cfg), "lr": 5e-4}}, path)
    assert survive.load_start(path, cfg, world)["report"] == {"flops": 1}
    assert "note: the config changed since that checkpoint: lr 0.0005 -> 0.001" in capsys.readouterr().out
    assert survive.load_start(str(tmp_path / "none.pt"), cfg, world) is None


def test_a_benchmark_a_kill_left_half_written_is_removed_by_the_next_run(tmp_path, capsys):
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)  # a process that is gone
    alive = os.getppid()  # another writer, still at work
    for name in (f"tic-synth.tmp{dead}", f"tic-synth.tmp{alive}", f"other.tmp{dead}"):
        (tmp_path / name / "train").mkdir(parents=True)
    synthetic.make_synthetic_benchmark(str(tmp_path / "tic-synth"), years=(2018,), train_samples_per_year=8,
                                       eval_samples_per_year=8, samples_per_shard=8,
                                       classification_samples_per_year=0, static_samples=4)
    assert sorted(os.listdir(tmp_path)) == sorted(["tic-synth", f"tic-synth.tmp{alive}", f"other.tmp{dead}"])
    said = capsys.readouterr().out
    assert f"tic-synth.tmp{dead}: removed, a benchmark that a killed process left half-written" in said


# ----------------------------------------------------------------------------- damaged checkpoints
def flip_a_tensor_byte(path):
    """Flip a bit in the middle of the largest tensor of a torch.save file, as bit rot would; its record's name."""
    with zipfile.ZipFile(path) as archive:
        record = max((r for r in archive.infolist() if "/data/" in r.filename), key=lambda r: r.file_size)
    with open(path, "r+b") as f:
        f.seek(record.header_offset + 26)  # a local header: 30 bytes, then its name and extra field
        name_bytes, extra_bytes = struct.unpack("<HH", f.read(4))
        f.seek(record.header_offset + 30 + name_bytes + extra_bytes + record.file_size // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x10]))
    return record.filename


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # a flipped protocol byte, read by torch.load
def test_a_flipped_byte_anywhere_in_a_checkpoint_is_noticed_or_changes_nothing(tmp_path):
    path, saved = tmp_path / "small.pt", {"weights": torch.arange(64, dtype=torch.float32), "iteration": 7}
    torch.save(saved, path)
    whole = path.read_bytes()
    same = lambda got: got.keys() == saved.keys() and torch.equal(got["weights"], saved["weights"]) \
        and got["iteration"] == 7  # noqa: E731
    noticed, silent_in_torch_load = 0, 0
    for i in range(len(whole)):
        path.write_bytes(whole[:i] + bytes([whole[i] ^ 0x01]) + whole[i + 1:])
        try:
            silent_in_torch_load += not same(torch.load(path, weights_only=True))
        except Exception:
            pass  # an error is loud: only another number read in silence is a fault
        try:
            got = checkpoints.read_verified(str(path))
        except checkpoints.DamagedCheckpoint:
            noticed += 1
            continue
        except Exception:
            continue  # torch.load's own error, after the CRCs passed: loud too
        assert same(got), f"a flipped byte at {i} of {len(whole)} loaded as other values"
    assert silent_in_torch_load >= 64 * 4 and noticed > len(whole) // 2  # every byte of the tensor, at least


@pytest.mark.slow
def test_damaged_resume_checkpoints_are_passed_over_and_the_run_ends_bitwise(two_years, tmp_path, capsys):
    args = [f"--data_root={two_years}", "--workers=0", *TINY]  # a resume checkpoint every 2 iterations, 2 kept
    reference, run = str(tmp_path / "reference"), str(tmp_path / "run")
    train_in_process([f"--out_dir={reference}", *args])
    train_stopped(args, run, "step02-0000002.pt")  # stopped at step 2's iteration 4
    resume = os.path.join(run, "resume")
    assert sorted(os.listdir(resume)) == ["step02-0000002.pt", "step02-0000004.pt"]
    record = flip_a_tensor_byte(os.path.join(resume, "step02-0000004.pt"))
    os.mkdir(os.path.join(resume, "step02-0000006.pt"))  # a folder where the newest should be
    capsys.readouterr()
    train_in_process([f"--out_dir={run}", *args])
    out, err = capsys.readouterr()
    assert "step02-0000006.pt does not load (a folder, not a file); set aside as step02-0000006.pt.damaged" in err
    assert f"step02-0000004.pt does not load (its record {record} fails its CRC-32 check); set aside" in err
    assert f"resuming at sample 64 of 256 from {resume}/step02-0000002.pt" in out
    assert_same_weights(run, reference)
    assert os.listdir(resume) == ["step02-0000006.pt.damaged"]  # the folder is left; the files went with the step
    train_in_process([f"--out_dir={run}", *args])  # and blocks no rerun
    assert capsys.readouterr().out.count("done already") == 2


def test_a_start_of_step_file_with_a_flipped_byte_or_a_folder_in_its_place_is_done_again(tmp_path, capsys):
    world, cfg = train.World(0, 1, False, torch.device("cpu")), train.parse_config([])
    path = str(tmp_path / "step02-start.pt")
    torch.save({"report": {"flops": 1}, "state": {"fisher": torch.ones(256)}, "config": vars(cfg)}, path)
    record = flip_a_tensor_byte(path)
    assert survive.load_start(path, cfg, world) is None
    assert f"does not load (its record {record} fails its CRC-32 check); set aside as step02-start.pt.damaged; " \
           f"doing the start of the step again" in capsys.readouterr().err
    os.mkdir(path)
    assert survive.load_start(path, cfg, world) is None
    assert "does not load (a folder, not a file); set aside as step02-start.pt.damaged1" in capsys.readouterr().err
    assert not os.path.exists(path)  # out of the way of the one that the step writes again


@pytest.fixture(scope="module")
def finished(two_years, tmp_path_factory):
    """A finished two-step run (in this process) and its arguments; a test copies it before changing it."""
    run_dir = str(tmp_path_factory.mktemp("finished") / "run")
    args = [f"--data_root={two_years}", "--workers=0", *TINY]
    train_in_process([f"--out_dir={run_dir}", *args])
    return run_dir, args


@pytest.mark.slow
def test_a_damaged_step_checkpoint_is_one_line_for_every_reader(finished, two_years, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(finished[0], run)
    path = os.path.join(run, "step02.pt")
    record = flip_a_tensor_byte(path)
    said = (f"error: {path} is damaged (its record {record} fails its CRC-32 check); delete it and rerun the "
            f"training command to train that step again")
    assert train_refused([f"--out_dir={run}", *finished[1]]) == said  # a rerun that loads its finished steps
    readers = {"evaluate.py --run": lambda: score.main([f"--run={run}", "--device=cpu"]),
               "evaluate.py --checkpoint": lambda: score.main([f"--checkpoint={path}", "--device=cpu",
                                                                  f"--tokenizer={run}/tokenizer.json",
                                                                  f"--data_root={two_years}"]),
               "train.py --init": lambda: train_in_process([f"--init={path}", f"--out_dir={tmp_path}/grown",
                                                            *finished[1]])}
    for reader, read in readers.items():
        with pytest.raises(SystemExit) as refused:
            read()
        assert refused.value.code == said, reader
    assert not os.path.exists(os.path.join(tmp_path, "grown", "step01.pt"))


# ----------------------------------------------------------------------------- a run folder, one command
@pytest.mark.slow
def test_a_rerun_with_settings_that_change_numbers_is_refused_and_free_ones_are_not(finished, two_years, tmp_path,
                                                                                     capsys):
    run, args = str(tmp_path / "run"), finished[1]
    shutil.copytree(finished[0], run)
    before = all_files(run)
    line = train_refused([f"--out_dir={run}", *args, "--strategy=lwf"])  # it said "done already", as lwf's
    assert line == (f"error: {run} holds a run of --strategy=sequential (not lwf), as its run.json says; rerun "
                    f"with those, or use a new --out_dir")
    with pytest.raises(SystemExit, match=r"holds a run of --budget_samples=256 \(not 512\), --seed=0 \(not 1\), as"):
        train_in_process([f"--out_dir={run}", *args, "--budget_samples=512", "--seed=1"])
    data_copy = str(tmp_path / "data")  # the same data elsewhere is the run's; one more sample is not
    shutil.copytree(two_years, data_copy)
    extra = write_tar(os.path.join(data_copy, "train", "2019", "extra.tar"), [("x.png", png_bytes(9)),
                                                                               ("x.txt", b"one more")])
    with pytest.raises(SystemExit, match=r"holds a run of 2019 data of 256 samples in 4 shards \(not 257 in 5\)"):
        train_in_process([f"--out_dir={run}", *args, f"--data_root={data_copy}"])
    assert {k: v for k, v in all_files(run).items() if k != ".lock"} == \
        {k: v for k, v in before.items() if k != ".lock"}  # nothing written
    os.remove(extra)
    sizes = os.path.join(data_copy, "train", "2019", "sizes.json")
    json.dump({k: n for k, n in json.load(open(sizes)).items() if k != "extra.tar"}, open(sizes, "w"))
    capsys.readouterr()
    train_in_process([f"--out_dir={run}", *args, f"--data_root={data_copy}", "--workers=1", "--log_interval=2",
                      "--eval_batch=32", "--keep_checkpoints=3", "--ckpt_interval_samples=0", "--max_bad_fraction=1"])
    assert capsys.readouterr().out.count("done already") == 2


HOLD = """import fcntl, os, sys, time
fd = os.open(os.path.join(sys.argv[1], ".lock"), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)  # as survive.lock_run_folder takes it for a run
os.write(fd, f"process {os.getpid()} on somewhere".encode())
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_run_in_a_folder_in_use_is_refused_and_a_killed_run_leaves_no_lock(two_years, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        line = train_refused([f"--data_root={two_years}", f"--out_dir={run}", *TINY])
    finally:
        holder.kill()  # SIGKILL: nothing of its own lets go of the lock
        holder.wait()
    assert line == (f"error: {run} is in use by another run (process {holder.pid} on somewhere); wait for it "
                    f"to end or stop it, then rerun, or pick another --out_dir")
    assert os.listdir(run) == [".lock"]  # nothing else written
    survive.lock_run_folder(str(run))  # the kernel let go of the killed run's lock
    assert open(run / ".lock").read() == f"process {os.getpid()} on {socket.gethostname()}"
