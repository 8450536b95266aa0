"""
Check that a refactor moves no number: every strategy and schedule trained a few iterations a step,
and every step's weights, carried state, FLOPs and evaluation matrix hashed. Run it before a change,
then after, and compare:

    python tools/fingerprint.py --out=before.json                    # on the code before
    python tools/fingerprint.py --out=after.json --compare=before.json   # on the code after

Each configuration runs train.py (or an examples/ file) in a process of its own on a small synthetic
benchmark (3 years, 4 iterations a step, CPU, fp32, one worker), so only the command line and the
files a run writes are relied on. For each step it records the sha256 of the deployed weights
(RUN/stepNN.pt's "model", by parameter name), of every other tensor in that file (the continue
point, the trunk, a strategy's state: a set of hashes, so that a renamed key is no change), the
FLOPs and samples seen, and the run's evaluation matrices. --compare says which configuration and
step differ, and how; it exits 1 if any does. An added tensor is reported but is no difference;
a tensor that is gone is. --only=NAME,... runs some configurations (names as printed).
"""
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import synthetic  # noqa: E402
from settings import parse_flags  # noqa: E402

BASE = ["--budget_samples=128", "--batch_size=32", "--vocab_size=300", "--workers=0",
        "--log_interval=2", "--eval_batch=64", "--warmup_iters=1", "--warmup_iters_later=1",
        "--device=cpu", "--compile=false", "--precision=fp32", "--ckpt_interval_samples=0",
        "--validation_samples=16"]
STRATEGIES = ["sequential", "cumulative-all", "cumulative-exp", "cumulative-equal", "restart",
              "oracle", "lwf", "patching", "ema", "ema-from-merge"]
CONFIGS = {  # name: (program, arguments)
    **{s: ("train.py", [f"--strategy={s}"]) for s in STRATEGIES},
    **{f"{s}+{sched}": ("train.py", [f"--strategy={s}", f"--lr_schedule={sched}"])
       for s in ("sequential", "cumulative-all")
       for sched in ("cosine-ar", "const-cooldown", "rsqrt")},
    "sequential+const-cooldown+cooled": ("train.py", ["--strategy=sequential",
                                                      "--lr_schedule=const-cooldown",
                                                      "--continue_from=cooled"]),
    "patching+const-cooldown": ("train.py", ["--strategy=patching",
                                             "--lr_schedule=const-cooldown"]),
    "ema+rsqrt": ("train.py", ["--strategy=ema", "--lr_schedule=rsqrt"]),
    "ema-from-merge+const-cooldown": ("train.py", ["--strategy=ema-from-merge",
                                                   "--lr_schedule=const-cooldown"]),
    "restart+rsqrt": ("train.py", ["--strategy=restart", "--lr_schedule=rsqrt"]),
    "cumulative-all+new_data_fraction": ("train.py", ["--strategy=cumulative-all",
                                                      "--new_data_fraction=0.5"]),
    "lwf+accum2": ("train.py", ["--strategy=lwf", "--accum_steps=2"]),
    "cumulative-all+accum2": ("train.py", ["--strategy=cumulative-all", "--accum_steps=2"]),
    "ewc": ("examples/ewc.py", ["--ewc_batches=2"]),
    "sequential+wsd": ("examples/wsd.py", ["--strategy=sequential"]),
}


def tensor_hash(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode()
                          + t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors(v)]
    return []


def fingerprint_run(run_dir: str) -> dict:
    """The run's steps (weights, other tensors, FLOPs, samples) and matrices, as hashes and
    numbers."""
    steps = []
    names = [f for f in os.listdir(run_dir) if f.startswith("step") and f.endswith(".pt")]
    for name in sorted(names):
        ckpt = torch.load(os.path.join(run_dir, name), map_location="cpu", weights_only=True)
        deployed = ckpt.pop("model")
        steps.append({"deployed": hashlib.sha256("".join(
                          f"{k}:{tensor_hash(v)}" for k, v in sorted(deployed.items())).encode()
                      ).hexdigest()[:16],
                      "other_tensors": sorted({tensor_hash(t) for t in tensors(ckpt)}),
                      "flops": ckpt["flops"], "samples_seen": ckpt["samples_seen"]})
    with open(os.path.join(run_dir, "eval_matrix.json")) as f:
        result = json.load(f)
    matrices = {kind: result[kind]["matrix"] for kind in ("retrieval", "classification")
                if kind in result}
    matrices["retrieval"] = result["matrix"]
    return {"steps": steps, "matrices": matrices}


def compare(before: dict, after: dict) -> list[str]:
    """Lines saying where after differs from before; none if it does not."""
    problems = []
    for name, old in before.items():
        new = after.get(name)
        if new is None:
            continue
        if len(new["steps"]) != len(old["steps"]):
            problems.append(f"{name}: {len(old['steps'])} steps before, {len(new['steps'])} now")
        for i, (a, b) in enumerate(zip(old["steps"], new["steps"]), 1):
            for key in ("deployed", "flops", "samples_seen"):
                if a[key] != b[key]:
                    problems.append(f"{name} step {i}: {key} {a[key]} before, {b[key]} now")
            gone = set(a["other_tensors"]) - set(b["other_tensors"])
            if gone:
                problems.append(f"{name} step {i}: {len(gone)} of its other tensors are gone or "
                                f"changed (the continue point, trunk or state)")
            added = set(b["other_tensors"]) - set(a["other_tensors"])
            if added:
                print(f"note: {name} step {i}: {len(added)} tensor(s) added to the checkpoint")
        if new["matrices"] != old["matrices"]:
            problems.append(f"{name}: the evaluation matrices differ")
    return problems


def main(argv):
    opts = parse_flags(argv, {"out": "fingerprint.json", "compare": "", "only": "",
                              "data": ""})  # data: reuse a benchmark folder (made if absent)
    names = opts["only"].split(",") if opts["only"] else list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"error: --only: unknown {', '.join(unknown)}; choose from "
                         f"{', '.join(CONFIGS)}")
    started, results = time.time(), {}
    with tempfile.TemporaryDirectory() as tmp:
        data_root = opts["data"] or os.path.join(tmp, "data")
        synthetic.make_synthetic_benchmark(data_root, years=(2018, 2019, 2020),
                                           train_samples_per_year=256, eval_samples_per_year=64,
                                           samples_per_shard=64, classification_samples_per_year=32,
                                           static_samples=32)
        for name in names:
            program, args = CONFIGS[name]
            run_dir = os.path.join(tmp, "runs", name)
            cmd = [sys.executable, os.path.join(ROOT, program), *BASE, f"--data_root={data_root}",
                   f"--out_dir={run_dir}", *args]
            out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
            if out.returncode != 0:
                raise SystemExit(f"error: {name} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
            results[name] = fingerprint_run(run_dir)
            print(f"{name}: {len(results[name]['steps'])} steps, "
                  f"{results[name]['steps'][-1]['deployed']}", flush=True)
    with open(opts["out"], "w") as f:
        json.dump(results, f, indent=1)
    print(f"{len(results)} configurations in {time.time() - started:.0f}s; written to "
          f"{opts['out']}")
    if opts["compare"]:
        with open(opts["compare"]) as f:
            problems = compare(json.load(f), results)
        print("\n".join(problems) if problems else
              f"equal to {opts['compare']}: weights, carried tensors, FLOPs and matrices")
        if problems:
            raise SystemExit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
