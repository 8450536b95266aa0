"""
Train a CLIP through time, TiC-CLIP style: for each time step, ask the strategy for the step's data and
starting model, train for the step's sample budget, save a checkpoint, evaluate on every time step.

On a laptop CPU, on the built-in synthetic benchmark (generated into data/tic-synth on first use):
    torchrun --standalone --nproc_per_node=1 train.py
    python train.py --strategy=sequential            # plain python works too (one process)
On one node with 8 GPUs, on real TiC-DataComp shards:
    torchrun --standalone --nproc_per_node=8 train.py --data_root=/data/tic-datacomp \
        --steps=2014-2016,2017,2018,2019,2020,2021,2022 --model=ViT-B-16 --budget_samples=18432000 \
        --batch_size=4096 --lr=5e-4 --warmup_iters=500 --tokenizer=clip-tokenizer.json
On 2 nodes: the same with --nnodes=2 --node_rank=0|1 --rdzv_endpoint=HOST:PORT instead of --standalone.

Config: the typed values below, overridden as --key=value (unknown keys and wrong types are errors).
The run directory (out_dir) holds tokenizer.json, one checkpoint per step (stepNN.pt, with the full
config), log.jsonl and eval_matrix.json. Rerunning a command skips the steps whose checkpoint exists and
continues a step from its newest checkpoint in resume/ (kept every ckpt_interval_samples and on SIGTERM),
exactly where it stopped: same weights as a run never stopped. Corrupt or missing data is skipped, counted
and reported; non-finite losses skip their update.
Follows nanoGPT's train.py for shape, open_clip for the CLIP details, DataComp for the hyperparameters.
"""
import json
import math
import os
import signal
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import synthetic
import evaluate
import strategies
from model import CLIP, PRESETS, CLIPConfig, clip_loss, make_config

# ----------------------------------------------------------------------------- config
_globals_before_config = set(globals())
# data and run
data_root = "data/tic-synth"   # TiC layout: train/YEAR/*.tar + sizes.json, eval/retrieval/YEAR/*.tar
steps = ""                     # time steps as year groups, e.g. "2014-2016,2017,2018"; "" = one step per year
out_dir = ""                   # run directory; "" = runs/STRATEGY
tokenizer = ""                 # a tokenizer.json; "" = train a byte-level BPE on the first step's captions
vocab_size = 1024              # of the BPE trained when tokenizer = ""
tokenizer_samples = 100_000    # captions of the first step used to train that BPE
# strategy and model
strategy = "cumulative-all"    # one of strategies.STRATEGIES
model = "tiny"                 # one of model.PRESETS
lwf_weight = 1.0               # weight of lwf's distillation term
patch_alphas = "0,0.25,0.5,0.75,1"  # patching: coefficients tried, theta = (1-a) theta_prev + a theta_finetuned
validation_samples = 1000      # patching: validation pairs per past step used to choose the coefficient
# budget and optimisation (DataComp's values; lr and warmup scaled for the tiny CPU run)
budget_samples = 56_000        # C: samples seen per time step (oracle: t x C at step t); 7 epochs of a synthetic year
batch_size = 64                # global, over all processes
lr = 5e-4                      # peak learning rate, restarted at every step
# (tiny on 2018, mean R@1 after 40k samples, seeds 0-2: 52.9/45.1/56.0 at batch 64 and lr 5e-4, the defaults;
# 49.7/38.3/53.4 at batch 128 and lr 1e-3; smaller batches learn more per sample on this benchmark)
warmup_iters = 20              # linear warmup of the first step (DataComp medium: 500)
warmup_iters_later = 20        # warmup of the later steps
weight_decay = 0.2
beta1 = 0.9
beta2 = 0.98
eps = 1e-6
# system
seed = 0
workers = 1                    # DataLoader processes per training process
device = "cuda" if torch.cuda.is_available() else "cpu"
compile = torch.cuda.is_available()   # torch.compile the model (on by default on CUDA)
grad_checkpointing = False     # recompute activations in backward: more compute, a larger batch fits per GPU
log_interval = 10              # iterations between log lines
eval_batch = 256               # pairs per evaluation batch
# surviving kills and bad data
ckpt_interval_samples = 5_000  # a resume checkpoint every this many samples within a step (0: none; SIGTERM saves one)
keep_checkpoints = 2           # resume checkpoints kept (an older one is used if the newest does not load)
max_bad_fraction = 0.05        # stop once a step's skipped samples (corrupt, missing, broken shards) pass this x budget
max_nonfinite_in_row = 5       # stop after this many non-finite losses in a row (each one's update is skipped)
CONFIG_KEYS = [k for k in globals() if k not in _globals_before_config and k != "_globals_before_config"]
DEFAULTS = {k: globals()[k] for k in CONFIG_KEYS}
SYNTH_ROOT = "data/tic-synth"  # where the built-in benchmark is generated when data_root is left as is


def parse_config(argv: list[str]) -> dict:
    """--key=value overrides of the config globals above, converted to each default's type."""
    cfg = dict(DEFAULTS)
    for arg in argv:
        key, sep, value = arg[2:].partition("=")
        if not arg.startswith("--") or not sep:
            raise SystemExit(f"error: bad argument '{arg}': use --key=value; keys: {', '.join(CONFIG_KEYS)}")
        if key not in cfg:
            raise SystemExit(f"error: unknown config key '{key}'; valid keys: {', '.join(CONFIG_KEYS)}")
        kind = type(cfg[key])
        try:
            if kind is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                cfg[key] = value.lower() in ("true", "1")
            else:
                cfg[key] = kind(value.replace("_", "")) if kind in (int, float) else value
        except ValueError:
            raise SystemExit(f"error: --{key}={value} is not a {kind.__name__} (default: {cfg[key]!r})")
    return cfg


def check_config(cfg: dict) -> None:
    """Values that parse but cannot work, refused before any compute is spent."""
    if cfg["model"] not in PRESETS:
        raise SystemExit(f"error: unknown model '{cfg['model']}'; choose one of: {', '.join(PRESETS)}")
    try:
        [float(a) for a in cfg["patch_alphas"].split(",")]
    except ValueError:
        raise SystemExit(f"error: --patch_alphas={cfg['patch_alphas']} is not a list of numbers; e.g. 0,0.5,1")
    least = {"batch_size": 1, "budget_samples": cfg["batch_size"], "log_interval": 1, "workers": 0,
             "ckpt_interval_samples": 0, "keep_checkpoints": 1, "max_nonfinite_in_row": 1}
    for key, n in least.items():
        if cfg[key] < n:
            raise SystemExit(f"error: --{key}={cfg[key]} is too small; use at least {n}")
    if not 0 <= cfg["max_bad_fraction"] <= 1:
        raise SystemExit(f"error: --max_bad_fraction={cfg['max_bad_fraction']} is not a fraction; use 0 to 1")


# ----------------------------------------------------------------------------- data and checkpoints
def parse_steps(root: str, spec: str, split: str = "train") -> list[list[str]]:
    """Year folders of each time step: '2014-2016,2017' -> [['2014', '2015', '2016'], ['2017']]."""
    years = data.years_in(root, split)
    if not spec:
        return [[y] for y in years]
    groups = []
    for group in spec.split(","):
        first, _, last = group.strip().partition("-")
        last = last or first
        chosen = [y for y in years if first <= y[:len(first)] <= last]  # YYYY or YYYYMM folders
        if not chosen:
            folder = os.path.join(root, *data.SPLITS[split])
            raise SystemExit(f"error: step '{group}' names no year folder under {folder} "
                             f"(found: {', '.join(years)}); fix --steps")
        groups.append(chosen)
    return groups


def step_name(years: list[str]) -> str:
    return years[0] if len(years) == 1 else f"{years[0]}-{years[-1]}"


def eval_tasks(root: str, step_years: list[list[str]]) -> dict[str, evaluate.Task]:
    """The tasks of each time step: retrieval on the held-out pairs of its years, and classification if any."""
    return {step_name(ys): evaluate.step_tasks(root, ys) for ys in step_years}


def step_checkpoints(run: str) -> list[str]:
    if not os.path.isdir(run):
        return []
    return [os.path.join(run, f) for f in sorted(os.listdir(run)) if f.startswith("step") and f.endswith(".pt")]


def save_checkpoint(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # atomic: a kill leaves the old checkpoint or the new one, never half of one


def load_model(path: str, device) -> tuple[CLIP, dict]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = CLIP(CLIPConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device), ckpt


def check_shape(ckpt: dict, path: str, model_cfg: CLIPConfig) -> None:
    if ckpt["model_config"] != asdict(model_cfg):
        raise SystemExit(f"error: {path} holds a model of another shape than --model={model} with this tokenizer; "
                         f"rerun with the model it was trained with (--model={ckpt['config']['model']}) "
                         f"or use a new --out_dir")


# ----------------------------------------------------------------------------- resume within a step
def resume_checkpoints(run: str, t: int) -> list[str]:
    """Step t's mid-step checkpoints, RUN/resume/stepNN-ITERATION.pt, newest first."""
    folder = os.path.join(run, "resume")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted((os.path.join(folder, f) for f in names if f.startswith(f"step{t + 1:02d}-") and f.endswith(".pt")),
                  reverse=True)


def save_resume_checkpoint(run: str, t: int, it: int, state: dict) -> str:
    path = os.path.join(run, "resume", f"step{t + 1:02d}-{it:07d}.pt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_checkpoint(path, state)
    for old in resume_checkpoints(run, t)[keep_checkpoints:]:
        os.remove(old)
    return path


def clear_resume_checkpoints(run: str, t: int) -> None:
    """Once stepNN.pt is written: its resume checkpoints, and any temporary file a kill left half-written."""
    folder = os.path.join(run, "resume")
    for f in os.listdir(folder) if os.path.isdir(folder) else []:
        if f.startswith(f"step{t + 1:02d}-"):
            os.remove(os.path.join(folder, f))


def load_resume_checkpoint(run: str, t: int, master: bool, distributed: bool) -> tuple[dict | None, str | None]:
    """The newest of step t's resume checkpoints that loads; rank 0 chooses, so every rank resumes from it."""
    state, path = None, None
    if master:
        for path in resume_checkpoints(run, t):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                break
            except Exception as e:  # damaged after it was written: fall back to the one before
                print(f"warning: {path} does not load ({e}); trying the one before", file=sys.stderr)
        path = path if state else None
    if distributed:
        chosen = [path]
        dist.broadcast_object_list(chosen, 0)
        path = chosen[0]
        state = torch.load(path, map_location="cpu", weights_only=True) if path and not master else state
    return state, path


def fault_summary(faults: dict) -> str:
    return ", ".join(f"{kind} {faults[kind]}" for kind in data.FAULTS if faults.get(kind)) or "none"


sigterm = False  # set when the cluster asks the run to stop (preemption); acted on at the next log interval


def on_sigterm(signum, frame) -> None:
    global sigterm
    sigterm = True


def gather(obj, distributed: bool) -> list:
    """obj from every rank, in rank order: small things (a flag, fault counts), once per log interval at most."""
    if not distributed:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def train_tokenizer(step_years: list[str], root: str, n_captions: int) -> data.Tokenizer:
    def captions():
        seen = 0
        for year in step_years:
            for shard, _ in data.year_shards(root, year):
                try:
                    for _, sample in data.iter_tar(shard):
                        text = data.caption(sample)  # the .txt, or the json's caption (TiC-YFCC, TiC-RedCaps)
                        if text is not None and seen < n_captions:
                            seen += 1
                            yield text
                except data.ShardError as e:  # counted and reported by the training stream
                    print(f"warning: {e}", file=sys.stderr)
    return data.Tokenizer.train(captions(), vocab_size)


def lr_at(it: int, n_iters: int, warmup: int, lr_peak: float) -> float:
    """Linear warmup, then cosine decay to 0 over the rest of the step."""
    if it < warmup:
        return lr_peak * (it + 1) / warmup
    progress = (it - warmup) / max(1, n_iters - warmup)
    return lr_peak * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def choose_patch(model: CLIP, previous: dict, step_years: list[list[str]], tok, dev, master: bool,
                 distributed: bool) -> float:
    """Patching: set model to (1-a) previous + a model for the a of patch_alphas with the best mean R@1 on the
    validation pairs of the steps seen so far (data.is_validation: never trained on, apart from the evaluation
    sets). Rank 0 chooses and broadcasts a, so every rank holds the same weights."""
    finetuned = {k: v.detach().clone() for k, v in model.state_dict().items()}
    previous = {k: v.to(dev) for k, v in previous.items()}
    alphas = [float(a) for a in patch_alphas.split(",")]
    scores = torch.zeros(len(alphas), device=dev)
    if master:
        tasks = {step_name(ys): evaluate.Task([s for y in ys for s in data.year_shards(data_root, y)])
                 for ys in step_years}
        for i, a in enumerate(alphas):
            model.load_state_dict(strategies.interpolate(previous, finetuned, a))
            row = evaluate.evaluate_step(model, tasks, tok, dev, eval_batch, validation_only=True,
                                         max_samples=validation_samples)
            scores[i] = sum(r[evaluate.METRIC] for r in row.values()) / len(row)
        print("patching: validation mean R@1 by coefficient: "
              + ", ".join(f"{a:g} {float(v):.2f}" for a, v in zip(alphas, scores)))
    if distributed:
        dist.broadcast(scores, 0)
    best = alphas[int(scores.argmax())]
    model.load_state_dict(strategies.interpolate(previous, finetuned, best))
    return best


# ----------------------------------------------------------------------------- the continual loop
def main(argv):
    cfg = parse_config(argv)
    check_config(cfg)
    globals().update(cfg)
    signal.signal(signal.SIGTERM, on_sigterm)  # save and exit at the next log interval, rather than die mid-step
    run_dir = out_dir or os.path.join("runs", strategy)
    strat = strategies.get_strategy(strategy)

    distributed = "RANK" in os.environ  # set by torchrun
    if batch_size % int(os.environ.get("WORLD_SIZE", 1)):  # checked before any process waits for the others
        raise SystemExit(f"error: batch_size={batch_size} does not divide over {os.environ['WORLD_SIZE']} processes; "
                         f"use a multiple of {os.environ['WORLD_SIZE']}")
    if distributed:
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        rank, world_size, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])
    else:
        rank, world_size, local_rank = 0, 1, 0
    master = rank == 0
    dev = torch.device(f"cuda:{local_rank}" if device == "cuda" else device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    barrier = dist.barrier if distributed else (lambda: None)

    # the data: generate the built-in benchmark on first use, then resolve the steps' shards
    if master and data_root == SYNTH_ROOT:
        synthetic.make_synthetic_benchmark(SYNTH_ROOT)
    barrier()
    if not os.path.isdir(os.path.join(data_root, "train")):
        raise SystemExit(f"error: no {data_root}/train folder; point --data_root at a TiC layout "
                         f"(train/YEAR/*.tar with sizes.json) or leave it at {SYNTH_ROOT} for the built-in benchmark")
    step_years = parse_steps(data_root, steps)
    step_data = [[data.Part(y, data.year_shards(data_root, y)) for y in ys] for ys in step_years]
    tasks = eval_tasks(data_root, step_years)
    names = [step_name(ys) for ys in step_years]

    # the tokenizer is fixed for the whole run, as CLIP's vocabulary is
    os.makedirs(run_dir, exist_ok=True)
    tok_path = os.path.join(run_dir, "tokenizer.json")
    if master and not os.path.exists(tok_path):
        tok = data.Tokenizer.load(tokenizer) if tokenizer else train_tokenizer(step_years[0], data_root, tokenizer_samples)
        tok.save(tok_path)
    barrier()
    tok = data.Tokenizer.load(tok_path)
    model_cfg = make_config(model, vocab_size=tok.vocab_size, eot_token_id=tok.eot_id)
    log_path = os.path.join(run_dir, "log.jsonl")

    def log(record: dict) -> None:
        if master:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    if master:
        print(f"run {run_dir}: strategy {strategy}, model {model}, {len(names)} steps ({', '.join(names)}), "
              f"{world_size} process(es) on {dev.type}, global batch {batch_size}")
        log({"event": "config", "config": cfg, "model_config": asdict(model_cfg)})

    matrix_path = os.path.join(run_dir, "eval_matrix.json")
    rows = json.load(open(matrix_path))["results"] if os.path.exists(matrix_path) else {}
    previous = None  # state dict of the model after the previous step (warm start, lwf's teacher)
    for t, name in enumerate(names):
        ckpt_path = os.path.join(run_dir, f"step{t + 1:02d}.pt")
        if os.path.exists(ckpt_path):  # done in an earlier run of this command
            model_now, done = load_model(ckpt_path, dev)
            check_shape(done, ckpt_path, model_cfg)
            previous = model_now.state_dict()
            if master and name not in rows:
                rows[name] = evaluate.evaluate_step(model_now, tasks, tok, dev, eval_batch)
                evaluate.write_json(matrix_path, evaluate.eval_matrix(rows, list(tasks)))
            if master:
                clear_resume_checkpoints(run_dir, t)  # left if a kill came between stepNN.pt and their removal
                print(f"step {t + 1}/{len(names)} ({name}): done already ({ckpt_path})")
            continue
        if any(gather(sigterm, distributed)):
            if master:
                print(f"SIGTERM: stopped before step {t + 1}; rerun the same command to continue")
            break

        # --- what the strategy asks for: the starting model, the data, the budget
        torch.manual_seed(seed + t)
        raw_model = CLIP(model_cfg)
        if strat.warm_start and previous is not None:
            raw_model.load_state_dict(previous)  # weights and logit scale; optimizer and schedule restart
        raw_model.to(dev)
        raw_model.set_grad_checkpointing(grad_checkpointing)
        teacher = None
        if strat.distill and previous is not None:
            teacher = CLIP(model_cfg)
            teacher.load_state_dict(previous)
            teacher.to(dev).eval().requires_grad_(False)
        parts = strategies.step_parts(strat, t, step_data)
        budget = budget_samples * strat.budget_steps(t)
        n_iters = budget // batch_size
        if master:
            mix = ", ".join(f"{p.name} {p.n_samples:.0f}" + (f" ({100 * p.keep_fraction:.0f}%)" if p.keep_fraction < 1
                                                              else "") for p in parts)
            print(f"step {t + 1}/{len(names)} ({name}): {'warm start' if strat.warm_start and t else 'random init'}, "
                  f"budget {n_iters * batch_size} samples ({n_iters} iters), data: {mix}")
            log({"event": "step_start", "time_step": t + 1, "step": name,
                 "mix": {p.name: p.n_samples for p in parts}, "budget_samples": n_iters * batch_size})

        optimizer = raw_model.configure_optimizer(lr, weight_decay, (beta1, beta2), eps)
        # --- resume mid-step from the newest checkpoint an earlier run of this command left
        state, state_path = load_resume_checkpoint(run_dir, t, master, distributed)
        it0, faults, nonfinite, in_row, train_s = 0, Counter(), 0, 0, 0.0
        if state:
            check_shape(state, state_path, model_cfg)
            raw_model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng_cpu"])
            if dev.type == "cuda" and state["rng_cuda"] is not None:
                torch.cuda.set_rng_state(state["rng_cuda"], dev)
            it0, nonfinite, in_row, train_s = (state[k] for k in ("iteration", "nonfinite", "nonfinite_in_row",
                                                                  "train_s"))
            faults = Counter(state["faults"][rank] if rank < len(state["faults"]) else {})  # each rank its own
            print(f"rank {rank}: step {t + 1} ({name}): resuming at sample {it0 * batch_size} of "
                  f"{n_iters * batch_size} from {state_path}")
            changed = [f"{k} {state['config'].get(k)!r} -> {v!r}" for k, v in cfg.items()
                       if state["config"].get(k) != v]
            if master and changed:
                print(f"note: the config changed since that checkpoint: {', '.join(changed)}")
            log({"event": "resume", "time_step": t + 1, "samples": it0 * batch_size, "checkpoint": state_path})
        train_model = torch.compile(raw_model) if compile else raw_model
        if distributed:
            train_model = DDP(train_model, device_ids=[local_rank] if dev.type == "cuda" else None)
        stream = data.TrainStream(parts, budget, batch_size, rank, world_size, seed, t, model_cfg.image_px, tok,
                                  model_cfg.context_tokens, keep_seed=seed, start_batch=it0,
                                  max_bad_fraction=max_bad_fraction)
        loader = data.train_loader(stream, workers)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()
        warmup = warmup_iters if t == 0 else warmup_iters_later
        ckpt_every = ckpt_interval_samples // batch_size  # iterations between resume checkpoints; 0: none
        # non-finite losses are counted on the device and read once per log interval: no host sync per step
        nonfinite_t, in_row_t = torch.tensor(nonfinite, device=dev), torch.tensor(in_row, device=dev)
        worst_row = in_row_t.clone()

        t_start = t_log = time.time()
        it_log = it0
        for it, (images, tokens, new_faults) in enumerate(loader, it0):
            faults.update(new_faults)  # counted in the loader's workers, added up here
            if images is None or faults["bad_samples"] > max_bad_fraction * budget / world_size:
                raise SystemExit(f"error: step {t + 1} ({name}): {faults['bad_samples']} of {faults['samples']} "
                                 f"samples read were bad ({fault_summary(faults)}), over --max_bad_fraction="
                                 f"{max_bad_fraction} of the step's budget; fix or drop the shards named above")
            for group in optimizer.param_groups:
                group["lr"] = lr_at(it, n_iters, warmup, lr)
            images, tokens = images.to(dev, non_blocking=True), tokens.to(dev, non_blocking=True)
            with autocast:
                img, txt, scale = train_model(images, tokens)
                loss = clip_loss(img, txt, scale, rank, world_size)
                if teacher is not None:
                    with torch.no_grad():
                        t_img, t_txt, t_scale = teacher(images, tokens)
                    loss = loss + lwf_weight * strategies.distillation_loss(img, txt, scale, t_img, t_txt, t_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # a non-finite loss (or gradient) skips the update: the same on every rank, as gradients are all-reduced
            grads = [p.grad for p in raw_model.parameters() if p.grad is not None]
            bad = ~torch.isfinite(torch.nn.utils.get_total_norm(grads))
            if optimizer.defaults["fused"]:
                optimizer.found_inf = bad.float()  # the fused kernel skips the whole update where 1: no host sync
                optimizer.step()
            elif not bad:  # the unfused optimizer (CPU): reading bad syncs with the device, free on CPU
                optimizer.step()
            raw_model.clamp_logit_scale_()
            nonfinite_t += bad
            in_row_t = (in_row_t + 1) * bad
            worst_row = torch.maximum(worst_row, in_row_t)
            done = it + 1
            ckpt_due = ckpt_every > 0 and done % ckpt_every == 0 and done < n_iters
            if not (done % log_interval == 0 or done == n_iters or ckpt_due):
                continue
            # --- once per log interval (and checkpoint): read the device's counters, log, save, stop if asked
            if int(worst_row) >= max_nonfinite_in_row:
                last = next(iter(resume_checkpoints(run_dir, t) + step_checkpoints(run_dir)[::-1]), "none")
                raise SystemExit(f"error: step {t + 1} ({name}): {int(worst_row)} non-finite losses in a row by "
                                 f"sample {done * batch_size}; stopped with the last good checkpoint ({last}) "
                                 f"intact; lower --lr or check the data, then rerun")
            worst_row = in_row_t.clone()
            stop = any(gather(sigterm, distributed))  # SIGTERM on any rank: every rank saves and stops here
            if master and (done % log_interval == 0 or done == n_iters):
                now = time.time()  # .item() syncs with the device: only once per log interval
                seen = (it + 1) * batch_size
                samples_per_s = (it + 1 - it_log) * batch_size / (now - t_log)
                eta_s = (n_iters - it - 1) * batch_size / samples_per_s
                print(f"step {t + 1}/{len(names)} ({name}) | {seen}/{n_iters * batch_size} samples | "
                      f"loss {loss.item():.4f} | lr {lr_at(it, n_iters, warmup, lr):.2e} | "
                      f"logit scale {raw_model.logit_scale.exp().item():.1f} | {samples_per_s:.0f} samples/s | "
                      f"eta {eta_s:.0f}s")
                log({"event": "train", "time_step": t + 1, "samples": seen, "loss": loss.item(),
                     "lr": lr_at(it, n_iters, warmup, lr), "logit_scale": raw_model.logit_scale.exp().item(),
                     "samples_per_s": samples_per_s})
                t_log, it_log = now, it + 1
            if ckpt_due or stop:
                all_faults = gather(dict(faults), distributed)  # each rank resumes with its own counts
                if master:
                    saved = save_resume_checkpoint(run_dir, t, done, {
                        "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                        "model_config": asdict(model_cfg), "config": cfg, "time_step": t + 1, "iteration": done,
                        "samples_seen": done * batch_size, "faults": all_faults, "nonfinite": int(nonfinite_t),
                        "nonfinite_in_row": int(in_row_t), "train_s": train_s + time.time() - t_start,
                        "rng_cpu": torch.get_rng_state(),
                        "rng_cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None})
            if stop:
                if master:
                    print(f"SIGTERM: saved {saved} at sample {done * batch_size} of step {t + 1}; rerun the same "
                          f"command to continue")
                barrier()
                if distributed:
                    dist.destroy_process_group()
                return
        seen = n_iters * batch_size
        train_s += time.time() - t_start
        total = sum((Counter(f) for f in gather(dict(faults), distributed)), Counter())
        nonfinite = int(nonfinite_t)

        # --- patching: interpolate with the previous (patched) model, the coefficient chosen on validation
        alpha = None
        if strat.patch and previous is not None:
            alpha = choose_patch(raw_model, previous, step_years[:t + 1], tok, dev, master, distributed)

        # --- checkpoint, then evaluate on every step's task
        previous = {k: v.detach().cpu().clone() for k, v in raw_model.state_dict().items()}
        flops = seen * 3 * raw_model.flops_per_pair() + (seen * raw_model.flops_per_pair() if teacher else 0)
        if master:
            save_checkpoint(ckpt_path, {"model": previous, "model_config": asdict(model_cfg), "config": cfg,
                                        "steps": step_years, "time_step": t + 1, "step_name": name,
                                        "samples_seen": seen, "flops": flops, "strategy": strategy,
                                        "patch_alpha": alpha})
            clear_resume_checkpoints(run_dir, t)
            rows[name] = evaluate.evaluate_step(raw_model, tasks, tok, dev, eval_batch)
            result = evaluate.eval_matrix(rows, list(tasks))
            evaluate.write_json(matrix_path, result)
            cells = " ".join(f"{task} {m[evaluate.METRIC]:.1f}" for task, m in rows[name].items())
            health = "".join([f"; skipped {total['bad_samples']} of {total['samples']} samples read "
                              f"({fault_summary(total)})" if total["bad_samples"] else "",
                              f"; {nonfinite} non-finite losses (updates skipped)" if nonfinite else ""])
            print(f"step {t + 1}/{len(names)} ({name}): {seen} samples in {train_s:.0f}s, {flops:.3g} FLOPs; "
                  f"{evaluate.METRIC} per task: {cells}{health}")
            log({"event": "step_end", "time_step": t + 1, "step": name, "samples_seen": seen, "flops": flops,
                 "train_s": train_s, "patch_alpha": alpha, "eval": rows[name], "faults": dict(total),
                 "nonfinite": nonfinite})
        barrier()

    if master:
        print(evaluate.format_matrix(evaluate.eval_matrix(rows, list(tasks))))
        print(f"checkpoints, log.jsonl and eval_matrix.json in {run_dir}")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
