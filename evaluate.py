"""
Per-time-step zero-shot retrieval and the evaluation matrix of TiC-CLIP.

    python evaluate.py --run=runs/cumulative-all         # re-evaluate every step checkpoint of a run

For each task (the held-out pairs of one time step, ROOT/eval/retrieval/YEAR/*.tar) we embed the images
and captions and report image->text and text->image recall@1/5/10 and their mean R@1, the main metric,
together with the gallery size (recall falls as the gallery grows). Scores are computed in chunks of
queries, so a 100k gallery needs one chunk x gallery block of memory at a time, never gallery x gallery.

The evaluation matrix E[i][j] is the model after step i on the task of step j. Its summary, as in the
paper: in-distribution (ID) = mean of the diagonal, backward transfer = mean over i > j (old tasks, how
much is remembered), forward transfer = mean over i < j (future tasks, how well it generalises ahead).
train.py calls evaluate_step after every step; this file also runs standalone on a run's checkpoints.
"""
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from data import Tokenizer, eval_batches

METRIC = "mean_R@1"  # the number that goes into the evaluation matrix


# ----------------------------------------------------------------------------- retrieval
def recall_at_k(queries, gallery, ks=(1, 5, 10), chunk_queries=1024) -> dict[int, float]:
    """Recall@k where query i's one true match is gallery item i (features L2-normalised).

    Ties are counted against the model: query i is a hit at k iff fewer than k OTHER gallery items score at
    least as high as item i. (A model whose features all collapse to one vector then scores 0, not 100.)
    """
    hits = {k: 0 for k in ks}
    for start in range(0, len(queries), chunk_queries):
        scores = queries[start:start + chunk_queries] @ gallery.t()           # [chunk, gallery]
        rows = torch.arange(len(scores), device=scores.device)
        true_score = scores[rows, rows + start]
        # how many items score >= the true match, the true match itself excluded
        rank = (scores >= true_score[:, None]).sum(1) - 1
        for k in ks:
            hits[k] += int((rank < k).sum())
    return {k: hits[k] / len(queries) for k in ks}


@torch.no_grad()
def embed_pairs(model, shards, tokenizer, device, batch_samples=256):
    """L2-normalised (image features, text features) of a task's pairs, in shard order."""
    cfg = model.cfg
    images, texts = [], []
    for x, captions, _ in eval_batches(shards, cfg.image_px, batch_samples):
        tokens = tokenizer(captions, cfg.context_tokens).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            images.append(F.normalize(model.encode_image(x.to(device)).float(), dim=-1))
            texts.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    return torch.cat(images), torch.cat(texts)


def retrieval(model, shards, tokenizer, device, batch_samples=256) -> dict:
    img, txt = embed_pairs(model, shards, tokenizer, device, batch_samples)
    i2t, t2i = recall_at_k(img, txt), recall_at_k(txt, img)
    out = {f"i2t_R@{k}": 100 * v for k, v in i2t.items()}
    out.update({f"t2i_R@{k}": 100 * v for k, v in t2i.items()})
    out.update({f"mean_R@{k}": 100 * (i2t[k] + t2i[k]) / 2 for k in i2t})
    out["gallery"] = len(img)
    return out


def evaluate_step(model, tasks: dict[str, list], tokenizer, device, batch_samples=256) -> dict[str, dict]:
    """One row of the evaluation matrix: {task name: metrics} for the model as it is now."""
    was_training = model.training
    model.eval()
    row = {name: retrieval(model, shards, tokenizer, device, batch_samples) for name, shards in tasks.items()}
    model.train(was_training)
    return row


# ----------------------------------------------------------------------------- the matrix
def summarize(matrix: list[list[float]]) -> dict[str, float | None]:
    """ID, backward and forward transfer of E[i][j] (row i = model after step i, column j = task of step j).
    A transfer with no entries (e.g. forward transfer of a 1-step run) is None."""
    def mean(xs):
        return sum(xs) / len(xs) if xs else None
    cells = [(i, j, v) for i, row in enumerate(matrix) for j, v in enumerate(row) if v is not None]
    return {"id": mean([v for i, j, v in cells if i == j]),
            "backward_transfer": mean([v for i, j, v in cells if i > j]),
            "forward_transfer": mean([v for i, j, v in cells if i < j])}


def eval_matrix(rows: dict[str, dict[str, dict]], task_names: list[str], metric=METRIC) -> dict:
    """Assemble E from per-step rows {step name: {task name: metrics}} (steps in order)."""
    matrix = [[rows[step][task][metric] for task in task_names] for step in rows]
    return {"metric": metric, "steps": list(rows), "tasks": task_names, "matrix": matrix,
            "summary": summarize(matrix), "results": rows}


def format_matrix(result: dict) -> str:
    tasks, width = result["tasks"], max(8, *(len(t) + 1 for t in result["tasks"]))
    lines = [f"evaluation matrix: {result['metric']} (%), row = model after step, column = task"]
    lines.append(" " * 12 + "".join(f"{t:>{width}}" for t in tasks))
    for step, row in zip(result["steps"], result["matrix"]):
        lines.append(f"{'after ' + step:<12}" + "".join(f"{v:>{width}.2f}" for v in row))
    s = result["summary"]
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"
    lines.append(f"ID {fmt(s['id'])} | backward transfer {fmt(s['backward_transfer'])} | "
                 f"forward transfer {fmt(s['forward_transfer'])}")
    gallery = {t: result["results"][result["steps"][-1]][t]["gallery"] for t in tasks}
    lines.append("gallery (pairs per task): " + ", ".join(f"{t} {n}" for t, n in gallery.items())
                 + f"; chance R@1 = {100 / min(gallery.values()):.2f}% at most")
    return "\n".join(lines)


def write_json(path: str, obj) -> None:
    """Atomic: a reader sees the old file or the new one, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- standalone
def main(argv):
    import train  # for the run's config, checkpoints and tasks
    args = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    if set(args) - {"run", "device"} or "run" not in args:
        raise SystemExit("usage: python evaluate.py --run=RUN_DIR [--device=cpu|cuda]")
    run = args["run"]
    device = torch.device(args.get("device", "cuda" if torch.cuda.is_available() else "cpu"))
    checkpoints = train.step_checkpoints(run)
    if not checkpoints:
        raise SystemExit(f"error: no step checkpoints (step*.pt) in {run}; train first with train.py --out_dir={run}")
    tokenizer = Tokenizer.load(os.path.join(run, "tokenizer.json"))
    rows = {}
    for path in checkpoints:
        t0 = time.time()
        model, ckpt = train.load_model(path, device)
        tasks = train.eval_tasks(ckpt["config"]["data_root"], ckpt["steps"])
        rows[ckpt["step_name"]] = evaluate_step(model, tasks, tokenizer, device)
        print(f"evaluated {path} in {time.time() - t0:.1f}s")
    result = eval_matrix(rows, list(tasks))
    write_json(os.path.join(run, "eval_matrix.json"), result)
    print(format_matrix(result))


if __name__ == "__main__":
    main(sys.argv[1:])
