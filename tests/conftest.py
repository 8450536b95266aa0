"""Shared by the test files: the project's modules and tools/ on the import path, the helpers that write tiny
shards and run train.py, the two-year synthetic benchmark that most end-to-end tests train on,
and the tiny model of a run on the built-in benchmark, whose counts the pages give."""
import contextlib
import functools
import importlib.util
import inspect
import io
import os
import signal
import subprocess
import sys
import tarfile

import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tools")]
import synthetic  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models gain nothing from threads, and lose on a busy machine


def write_tar(path, members) -> str:
    """members: [(name, bytes)] in order; returns the tar's path."""
    with tarfile.open(path, "w") as tf:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return str(path)


def png_bytes(value: int, px: int = 8) -> bytes:
    """A grey px x px PNG."""
    buf = io.BytesIO()
    Image.new("RGB", (px, px), (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


def all_files(root) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(root) for f in files}


def import_file(path: str):
    """A Python file run as a module, not as __main__: an example registers its rows and trains
    nothing."""
    spec = importlib.util.spec_from_file_location("example_" + os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def tables_kept(*tables: dict):
    """Each table as it was before the block, once it ends: the rows a test's files registered go."""
    saved = [dict(table) for table in tables]
    yield
    for table, before in zip(tables, saved):
        table.clear()
        table.update(before)


def load(run_dir, step) -> dict:
    """RUN/stepNN.pt, as saved."""
    import torch
    return torch.load(os.path.join(run_dir, f"step{step:02d}.pt"), weights_only=True)


def same(a: dict, b: dict) -> bool:
    """Two state dicts equal bit for bit."""
    import torch
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def train_command(args: list[str], nproc: int | None = None) -> list[str]:
    launcher = [sys.executable] if not nproc else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   f"--nproc_per_node={nproc}"]
    return launcher + [os.path.join(REPO, "train.py"), *args]


def run_train(args: list[str], nproc: int | None = None) -> str:
    """train.py in a process of its own (torchrun for nproc); its stdout, once it has succeeded."""
    out = subprocess.run(train_command(args, nproc), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def train_in_process(args: list[str]) -> None:
    """train.main in this process (so a strategy registered by a test is seen), on the CPU, uncompiled, on one
    thread as the subprocesses of ENV: a run here and there gives the same bits."""
    import torch
    import train
    previous_handler, threads = signal.getsignal(signal.SIGTERM), torch.get_num_threads()  # main installs its own
    torch.set_num_threads(1)
    try:
        train.main(["--device=cpu", "--compile=false", *args])
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        torch.set_num_threads(threads)


def train_stopped(args: list[str], run_dir: str, once_saved: str) -> None:
    """train_in_process, stopped as SIGTERM would stop it: at the first check after the resume
    checkpoint RUN/resume/once_saved exists (the check comes at the next log interval)."""
    import pytest
    import world
    with pytest.MonkeyPatch.context() as patch:
        saved = os.path.join(run_dir, "resume", once_saved)
        patch.setattr(world.World, "stop_requested", lambda self: os.path.exists(saved))
        train_in_process([f"--out_dir={run_dir}", *args])


def train_refused(args: list[str], env: dict | None = None) -> str:
    """train.py's one-line refusal of args (asserted: a non-zero exit, no traceback, one line on stderr)."""
    out = subprocess.run(train_command(args), cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**ENV, **(env or {})})
    assert out.returncode != 0, out.stdout
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    return lines[0]


@pytest.fixture(scope="session")
def two_years(tmp_path_factory) -> str:
    """A synthetic benchmark of 2018 and 2019: 256 training and 64 held-out pairs a year and 32 labelled images,
    shards of 64; 64 images in each static task (500 would make evaluation most of a test's time)."""
    root = str(tmp_path_factory.mktemp("two_years") / "data")
    synthetic.make_synthetic_benchmark(root, years=(2018, 2019), train_samples_per_year=256, eval_samples_per_year=64,
                                       samples_per_shard=64, classification_samples_per_year=32,
                                       static_samples=64)
    return root


@pytest.fixture(scope="session")
def three_years(tmp_path_factory) -> str:
    """A synthetic benchmark of 2018, 2019 and 2020: 128 training and 32 held-out pairs a year, shards of 64;
    32 images in each static task."""
    root = str(tmp_path_factory.mktemp("three_years") / "data")
    synthetic.make_synthetic_benchmark(root, years=(2018, 2019, 2020), train_samples_per_year=128,
                                       eval_samples_per_year=32, samples_per_shard=64,
                                       classification_samples_per_year=0, static_samples=32)
    return root


@functools.cache
def builtin_tiny_model():
    """The tiny CLIP of a run on the built-in benchmark at the defaults, on the meta device (shapes
    only, for the pages' counts of weights and FLOPs). Its vocabulary is the tokenizer's that
    train.py trains on the first year's captions: 2018's, drawn here as make_synthetic_benchmark
    draws them, a shard at a time."""
    import numpy as np
    import torch
    import train
    from model import CLIP, make_config
    from text import Tokenizer
    made = {k: v.default for k, v in
            inspect.signature(synthetic.make_synthetic_benchmark).parameters.items()}
    years, n, per_shard = made["years"], made["train_samples_per_year"], made["samples_per_shard"]
    p = np.array([synthetic.shape_weight(s, 0, len(years)) for s in synthetic.SHAPES])
    rng = np.random.default_rng([made["seed"], years[0], 0])  # the first year's training pairs
    captions = []
    for start in range(0, n, per_shard):
        shard = synthetic._render_samples(rng, min(per_shard, n - start), p / p.sum(),
                                          made["image_px"])
        captions += shard[1]
    tokenizer = Tokenizer.train(captions[:train.SETTINGS["tokenizer_samples"].default],
                                train.SETTINGS["vocab_size"].default)
    with torch.device("meta"):
        return CLIP(make_config("tiny", vocab_size=tokenizer.vocab_size,
                                eot_token_id=tokenizer.eot_id))
