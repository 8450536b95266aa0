"""
Zero-shot retrieval and classification on each time step's tasks, and TiC-CLIP's evaluation
matrix. train.py calls evaluate_step after every step; this file also runs on its own:

    python evaluate.py --run=runs/cumulative-all     # re-evaluate every step checkpoint of a run
    python evaluate.py --run=runs/agem --module=examples/agem.py   # with a file's rows (summaries)
    python evaluate.py --checkpoint=ViT-B-32.pt --tokenizer=clip-tokenizer.json \
        --data_root=/data/tic-datacomp --steps=2014-2016,2017,2018,2019,2020,2021,2022

A time step's task is its held-out pairs (ROOT/eval/retrieval/YEAR/*.tar), scored by image->text
and text->image recall@1/5/10 and their mean R@1, the main metric, with the gallery size (recall
falls as it grows). Scores go a chunk of queries at a time, never gallery x gallery. Where the
benchmark has labelled images (ROOT/eval/classification/YEAR, as TiC-DataCompNet), a task also
reports zero-shot top-1/top-5 accuracy.

The evaluation matrix E[i][j] is the model after step i on the task of step j, summarised as in
the paper by three means: ID over i = j, backward transfer over i > j (old tasks: what is
remembered), forward transfer over i < j (future tasks: how far it generalises). A task that
cannot be scored after a step (its data unreadable) is said in a line and recorded as not scored:
n/a in the matrix, left out of the means, scored again on a rerun. pictures.py draws it. This
file also names a run's checkpoints (step_checkpoint).
"""
import glob
import json
import math
import os
import re
import string
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import pictures
import shards
from data import NotScored, Tokenizer, eval_batches, normalize_images
from checkpoints import (check_tokenizer, is_checkpoint_file, load_checkpoint, parse_heads,
                         refuse_damaged)
from model import PRECISIONS, autocast, check_device
from settings import import_files, parse_flags

METRIC = "mean_R@1"  # the number that goes into the evaluation matrix
RETRIEVAL_METRICS = tuple(f"{d}_R@{k}" for d in ("mean", "i2t", "t2i") for k in (1, 5, 10))


# ----------------------------------------------------------------------------- retrieval
def recall_at_k(queries, gallery, ks=(1, 5, 10), chunk_queries=1024,
                match=None) -> dict[int, float]:
    """Recall@k where query i's one true match is gallery item match[i], by default item i
    (features L2-normalised).

    Ties are counted against the model: query i is a hit at k iff fewer than k OTHER gallery items
    score at least as high as its match. (A model whose features all collapse to one vector then
    scores 0, not 100.)
    """
    hits = {k: 0 for k in ks}
    for start in range(0, len(queries), chunk_queries):
        scores = queries[start:start + chunk_queries] @ gallery.t()           # [chunk, gallery]
        rows = torch.arange(len(scores), device=scores.device)
        true_score = scores[rows, rows + start if match is None
                            else match[start:start + len(scores)]]
        # items scoring at least the true match, itself excluded; "not below" counts a nan too,
        # so features gone non-finite retrieve nothing
        rank = (~(scores < true_score[:, None])).sum(1) - 1
        for k in ks:
            hits[k] += int((rank < k).sum())
    return {k: hits[k] / len(queries) for k in ks}


def recall_any_at_k(queries, gallery, owner, ks=(1, 5, 10), chunk_queries=1024) -> dict[int, float]:
    """Recall@k where query i has several true matches, the gallery items j with owner[j] == i
    (an image and its captions): a hit at k iff fewer than k items that are not its matches score
    at least as high as its best match, DataComp's image->text retrieval. Ties count against the
    model, as in recall_at_k."""
    hits = {k: 0 for k in ks}
    for start in range(0, len(queries), chunk_queries):
        scores = queries[start:start + chunk_queries] @ gallery.t()           # [chunk, gallery]
        true = owner[None, :] == torch.arange(start, start + len(scores),
                                              device=scores.device)[:, None]
        best = scores.masked_fill(~true, -math.inf).max(1).values
        rank = (~(scores < best[:, None]) & ~true).sum(1)
        for k in ks:
            hits[k] += int((rank < k).sum())
    return {k: hits[k] / len(queries) for k in ks}


@torch.no_grad()
def embed_pairs(model, shards, tokenizer, device, batch_samples=256, precision=None, **read):
    """L2-normalised (image features, text features) of a task's pairs, in shard order.
    precision: bf16 or fp32 (None: bf16 on CUDA, fp32 elsewhere). read: eval_batches' options:
    max_bad_fraction, and validation_only and max_samples to embed the validation split instead."""
    cfg = model.cfg
    images, texts = ([torch.zeros(0, cfg.embed_dim, device=device)],
                     [torch.zeros(0, cfg.embed_dim, device=device)])
    for x, captions, _ in eval_batches(shards, cfg.image_px, batch_samples, **read):
        x = normalize_images(x.to(device))
        tokens = tokenizer(captions, cfg.context_tokens).to(device)
        with autocast(device, precision):
            images.append(F.normalize(model.encode_image(x).float(), dim=-1))
            texts.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    return torch.cat(images), torch.cat(texts)


def retrieval(model, shards, tokenizer, device, batch_samples=256, precision=None, **read) -> dict:
    img, txt = embed_pairs(model, shards, tokenizer, device, batch_samples, precision, **read)
    if not len(img):
        raise NotScored(f"error: {shards[0][0]} ...: no pairs to score (validation pairs: the 2% "
                        f"of training pairs data.is_validation picks; shards too small to hold "
                        f"any?)")
    i2t, t2i = recall_at_k(img, txt), recall_at_k(txt, img)
    out = {f"i2t_R@{k}": 100 * v for k, v in i2t.items()}
    out.update({f"t2i_R@{k}": 100 * v for k, v in t2i.items()})
    out.update({f"mean_R@{k}": 100 * (i2t[k] + t2i[k]) / 2 for k in i2t})
    out["gallery"] = len(img)
    return out


# ----------------------------------------------------------------------------- classification
@torch.no_grad()
def zero_shot_classifier(model, classnames, templates, tokenizer, device, batch_samples=256,
                         precision=None) -> torch.Tensor:
    """[embed_dim, classes]: per class, the mean of the L2-normalised text embeddings of its
    prompts (each template with the class name in place of "{}"), renormalised, as CLIP's zero-shot
    classifier."""
    prompts = [t.format(name) for name in classnames for t in templates]
    embeddings = []
    for start in range(0, len(prompts), batch_samples):
        tokens = tokenizer(prompts[start:start + batch_samples],
                           model.cfg.context_tokens).to(device)
        with autocast(device, precision):
            embeddings.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    per_class = torch.cat(embeddings).view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1).t()


@torch.no_grad()
def classification(model, shards, classifier, device, batch_samples=256, precision=None,
                   **read) -> dict:
    """Zero-shot top-1 and top-5 accuracy (%) of the labelled images in shards, and their mean
    recall per class; classifier from zero_shot_classifier."""
    n_classes, hits1, hits5, n = classifier.shape[1], 0, 0, 0
    class_hits, class_count = torch.zeros(n_classes), torch.zeros(n_classes)  # per-class recall
    for x, labels, keys in eval_batches(shards, model.cfg.image_px, batch_samples, target="class",
                                        **read):
        labels = torch.tensor(labels)
        if labels.max() >= n_classes or labels.min() < 0:
            bad = keys[int(((labels >= n_classes) | (labels < 0)).nonzero()[0])]
            raise NotScored(f"error: sample {bad}: class id out of range for {n_classes} class "
                            f"names; fix classnames.txt")
        x = normalize_images(x.to(device))
        with autocast(device, precision):
            image_features = F.normalize(model.encode_image(x).float(), dim=-1)
        top = (image_features @ classifier).topk(min(5, n_classes), dim=1).indices.cpu()
        hits1 += int((top[:, 0] == labels).sum())
        hits5 += int((top == labels[:, None]).any(dim=1).sum())
        n += len(labels)
        class_hits.index_add_(0, labels, (top[:, 0] == labels).float())
        class_count.index_add_(0, labels, torch.ones(len(labels)))
    if n == 0:
        raise NotScored(f"error: {shards[0][0]}: no images with a class id (.cls member or json "
                        f"\"cls\") in this task")
    per_class = class_hits[class_count > 0] / class_count[class_count > 0]  # the task's classes
    return {"top1": 100 * hits1 / n, "top5": 100 * hits5 / n,
            "mean_per_class_recall": 100 * per_class.mean().item(), "class_samples": n,
            "classes": n_classes}


# ----------------------------------------------------------------------------- a time step's tasks
@dataclass
class Task:
    """The evaluation data of one time step."""
    retrieval: list                          # [(shard, samples)] of held-out image-caption pairs
    classification: list | None = None       # [(shard, samples)] of labelled images, if any
    classnames: list[str] | None = None      # class id i is classnames[i]
    templates: list[str] | None = None       # prompts with "{}" for the class name


def step_tasks(root: str, years: list[str], shard_cmd: str = "") -> Task:
    """A time step's tasks: retrieval on its years' held-out pairs (ROOT/eval/retrieval/YEAR), and
    classification where ROOT/eval/classification/YEAR exists, with classnames.txt and
    templates.txt beside the year folders, or ROOT/eval/datacompnet/YEAR, with them inside each
    year folder (TiC-DataCompNet as ml-tic-clip ships it). shard_cmd: see shards.year_shards."""
    task = Task([s for y in years for s in shards.year_shards(root, y, "retrieval", shard_cmd)])
    for split in ("classification", "datacompnet"):
        folder = os.path.join(root, *shards.SPLITS[split])
        labelled = [y for y in years if os.path.isdir(os.path.join(folder, y))]
        if labelled:
            names_at = folder if split == "classification" else os.path.join(folder, labelled[0])
            task.classification = [s for y in labelled
                                   for s in shards.year_shards(root, y, split, shard_cmd)]
            task.classnames = read_lines(os.path.join(names_at, "classnames.txt"))
            task.templates = read_templates(names_at)
            break
    return task


def tasks_of(root: str, step_years: list[list[str]], shard_cmd: str = "") -> dict[str, Task]:
    """{step name: its tasks} for every time step (step_years: shards.parse_steps). An eval folder
    of another kind is named in a warning, never passed over in silence."""
    eval_dir = os.path.join(root, "eval")
    for other in sorted(set(os.listdir(eval_dir) if os.path.isdir(eval_dir) else [])
                        - {"retrieval", "classification", "datacompnet"}):
        print(f"warning: {eval_dir}/{other}: not an evaluation folder this program reads "
              f"(retrieval, classification, datacompnet); skipped", file=sys.stderr)
    return {shards.step_name(ys): step_tasks(root, ys, shard_cmd) for ys in step_years}


def read_lines(path: str) -> list[str]:
    """The lines of a classnames.txt or templates.txt that hold text; at least one."""
    if not os.path.exists(path):
        raise SystemExit(f"{path}: missing; classification needs classnames.txt (class id i = "
                         f"line i, from 0) and templates.txt (prompts such as 'a photo of a "
                         f"{{}}.'), one per line")
    with open(path) as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise SystemExit(f"error: {path}: empty; write one class name or prompt template a line")
    return lines


def read_templates(folder: str) -> list[str]:
    """The prompt templates in folder, with "{}" for the class name: templates.txt, or
    clip_benchmark's zeroshot_classification_templates.txt, whose templates hold "{c}". Each must
    format with one class name: exactly one {} (other braces doubled)."""
    path = os.path.join(folder, "templates.txt")
    if not os.path.exists(path) and os.path.exists(
            os.path.join(folder, "zeroshot_classification_templates.txt")):
        path = os.path.join(folder, "zeroshot_classification_templates.txt")
    templates = [t.replace("{c}", "{}") for t in read_lines(path)]
    bad = next((t for t in templates if replacement_fields(t) != [("", "", None)]), None)
    if bad is not None:
        raise SystemExit(f"error: {path}: the prompt template {bad!r} needs exactly one {{}} (or "
                         f"{{c}}) for the class name, and any other brace doubled ({{{{, }}}}); "
                         f"fix it")
    return templates


def replacement_fields(template: str) -> list[tuple] | None:
    """The (name, format spec, conversion) of each {...} in template; None if it does not parse."""
    try:
        return [field[1:] for field in string.Formatter().parse(template) if field[1] is not None]
    except ValueError:  # a lone { or }
        return None


# ----------------------------------------------------------------------------- static tasks
@dataclass
class StaticTask:
    """A task outside time (ImageNet, its shifts, Flickr30k, the DataComp suite), scored after
    every step as the paper's Table 2 reports them. clip_benchmark's webdataset format:
    PATH/test/0.tar ... N-1.tar listed by PATH/test/nshards.txt, and beside test/
    dataset_type.txt (retrieval or classification; missing: classification), classnames.txt and
    zeroshot_classification_templates.txt. A retrieval sample's .txt holds its captions, one a
    line. A static task's number is top-1 (classification) or mean R@1 (retrieval)."""
    kind: str
    shards: list                           # [(shard, None)]: the format lists no count per shard
    classnames: list[str] | None = None
    templates: list[str] | None = None     # with "{}" for the class name


def static_task(path: str) -> StaticTask:
    nshards = os.path.join(path, "test", "nshards.txt")
    if not os.path.exists(nshards):
        raise SystemExit(f"{path}: no test/nshards.txt, so not a task in clip_benchmark's "
                         f"webdataset format (test/0.tar ... with nshards.txt, dataset_type.txt, "
                         f"classnames.txt beside test/)")
    kind_path = os.path.join(path, "dataset_type.txt")
    kind = open(kind_path).read().strip().lower() if os.path.exists(kind_path) else "classification"
    if kind not in ("classification", "retrieval"):
        raise SystemExit(f"{kind_path}: {kind!r} tasks are not scored here; classification and "
                         f"retrieval are")
    shards = [(shard, None) for shard in static_shards(nshards)]
    if kind == "retrieval":
        return StaticTask(kind, shards)
    return StaticTask(kind, shards, read_lines(os.path.join(path, "classnames.txt")),
                      read_templates(path))


def static_shards(nshards: str) -> list[str]:
    """The shards 0.tar ... N-1.tar beside nshards.txt, which holds N: each checked to be a file,
    and the count to be at most the files there, before a list of N is made."""
    with open(nshards) as f:
        text = f.read(100).strip()
    if not re.fullmatch(r"[0-9]+", text) or int(text) == 0:
        raise SystemExit(f"error: {nshards}: holds {text!r}, not a number of shards; write the "
                         f"count of the task's shards (0.tar ... N-1.tar beside it), 1 or more")
    test, n = os.path.dirname(nshards), int(text)
    present = set(os.listdir(test))
    missing = next((i for i in range(n) if f"{i}.tar" not in present), None)  # 0.tar on: soon
    if missing is not None:
        listed = sum(1 for name in present if re.fullmatch(r"(0|[1-9][0-9]*)\.tar", name)
                     and int(name[:-4]) < n)
        raise SystemExit(f"error: {test}/{missing}.tar: listed by {nshards} ({n} shards) but "
                         f"missing ({n - listed} in all); re-download the task or fix nshards.txt")
    paths = [os.path.join(test, f"{i}.tar") for i in range(n)]
    not_file = next((p for p in paths if not os.path.isfile(p)), None)
    if not_file:
        raise SystemExit(f"error: {not_file}: listed by {nshards} but not a file (a folder, FIFO "
                         f"or device); put the shard there or fix nshards.txt")
    return paths


def static_tasks(root: str, spec: str) -> dict[str, StaticTask]:
    """The static tasks of a run: each folder of ROOT/static/ by its name, then --static's
    NAME=PATH,... ."""
    paths = {os.path.basename(p): p for p in sorted(glob.glob(os.path.join(root, "static", "*")))
             if os.path.isdir(p)}
    for item in filter(None, spec.split(",")):
        name, sep, path = item.partition("=")
        if not (sep and name and path):
            raise SystemExit(f"error: --static={spec}: '{item}' is not NAME=PATH, e.g. "
                             f"imagenet=/data/wds_imagenet1k")
        paths[name] = path
    return {name: static_task(path) for name, path in paths.items()}


def multi_caption_retrieval(model, shards, tokenizer, device, batch_samples=256, precision=None,
                            **read) -> dict:
    """Retrieval where an image has several captions (Flickr30k, COCO), scored as DataComp does:
    image->text is a hit if any of the image's captions is in the top k, text->image is per
    caption; mean_R@k of the two."""
    cfg, images, texts, owner, n_images = model.cfg, [], [], [], 0  # owner[j]: caption j's image
    for x, caption_lists, _ in eval_batches(shards, cfg.image_px, batch_samples, target="captions",
                                            **read):
        flat = [c for lst in caption_lists for c in lst]
        owner += [n_images + i for i, lst in enumerate(caption_lists) for _ in lst]
        n_images += len(caption_lists)
        x = normalize_images(x.to(device))
        with torch.no_grad(), autocast(device, precision):
            images.append(F.normalize(model.encode_image(x).float(), dim=-1))
            for start in range(0, len(flat), batch_samples):
                tokens = tokenizer(flat[start:start + batch_samples], cfg.context_tokens).to(device)
                texts.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    if not images:
        raise NotScored(f"error: {shards[0][0]} ...: no images with captions to score")
    img, txt, owner = torch.cat(images), torch.cat(texts), torch.tensor(owner, device=device)
    i2t, t2i = recall_any_at_k(img, txt, owner), recall_at_k(txt, img, match=owner)
    return {**{f"i2t_R@{k}": 100 * v for k, v in i2t.items()},
            **{f"t2i_R@{k}": 100 * v for k, v in t2i.items()},
            **{f"mean_R@{k}": 100 * (i2t[k] + t2i[k]) / 2 for k in i2t}, "gallery": len(img),
            "captions": len(txt)}


def evaluate_step(model, tasks: dict[str, Task | StaticTask], tokenizer, device, batch_samples=256,
                  precision=None, **read) -> dict[str, dict]:
    """One row of the evaluation matrix: {task name: metrics} for the model as it is now:
    retrieval recalls, and zero-shot top-1/top-5 and mean recall per class for a task with
    classification data; a static task's metrics beside them. A kind of task that cannot be
    scored (NotScored) is said in a line and kept as metrics["not_scored"][kind] = why, without
    its numbers (n/a in the matrix), and the row goes on. precision, read: see embed_pairs."""
    was_training = model.training
    model.eval()
    row, classifiers = {}, {}

    def classify(shards, classnames, templates) -> dict:
        labels = (tuple(classnames), tuple(templates))  # one classifier for the tasks sharing them
        if labels not in classifiers:
            classifiers[labels] = zero_shot_classifier(model, *labels, tokenizer, device,
                                                       batch_samples, precision)
        return classification(model, shards, classifiers[labels], device, batch_samples, precision,
                              **read)

    for name, task in tasks.items():
        if isinstance(task, StaticTask) and task.kind == "retrieval":
            kinds = {"retrieval": lambda: multi_caption_retrieval(
                model, task.shards, tokenizer, device, batch_samples, precision, **read)}
        elif isinstance(task, StaticTask):
            kinds = {"classification": lambda: classify(task.shards, task.classnames,
                                                         task.templates)}
        else:
            kinds = {"retrieval": lambda: retrieval(model, task.retrieval, tokenizer, device,
                                                    batch_samples, precision, **read)}
            if task.classification:
                kinds["classification"] = lambda: classify(task.classification, task.classnames,
                                                           task.templates)
        row[name] = {}
        for kind, measure in kinds.items():
            try:
                row[name].update(measure())
            except NotScored as e:
                why = str(e.code).removeprefix("error: ")
                row[name].setdefault("not_scored", {})[kind] = why
                print(f"warning: task {name} ({kind}) not scored: {why}", file=sys.stderr)
    model.train(was_training)
    return row


def scored(metrics: dict | None) -> bool:
    """Whether a task's metrics in a row are all there: measured, and no kind of it not scored."""
    return metrics is not None and "not_scored" not in metrics


# ----------------------------------------------------------------------------- the matrix
def mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def cells(matrix: list[list[float | None]]) -> list[tuple[int, int, float]]:
    """(i, j, E[i][j]) of every cell measured."""
    return [(i, j, v) for i, row in enumerate(matrix) for j, v in enumerate(row) if v is not None]


def forgetting(matrix: list[list[float | None]]) -> float | None:
    """Mean over the tasks before the last step of how far the final model falls below the best
    model of the steps between learning the task and the last (Chaudhry et al. 2018): max over
    i in [j, T-2] of E[i][j], minus E[T-1][j]. Positive: forgotten."""
    final, drops = matrix[-1], []
    for j in range(len(matrix) - 1):
        earlier = [matrix[i][j] for i in range(j, len(matrix) - 1) if matrix[i][j] is not None]
        if earlier and final[j] is not None:
            drops.append(max(earlier) - final[j])
    return mean(drops)


# The summary numbers of an evaluation matrix E[i][j] (row i = model after step i, column j = task
# of step j), a row each: printed, in eval_matrix.json, tools/compare.py's table and the pictures'
# legends. A number with no cells (e.g. forward transfer of a 1-step run) is None. Add a row from a
# file of your own: evaluate.SUMMARIES["name"] = function(matrix) -> float or None.
SUMMARIES = {
    "id": lambda matrix: mean([v for i, j, v in cells(matrix) if i == j]),
    "backward_transfer": lambda matrix: mean([v for i, j, v in cells(matrix) if i > j]),
    "forward_transfer": lambda matrix: mean([v for i, j, v in cells(matrix) if i < j]),
    "forgetting": forgetting,
}


def summarize(matrix: list[list[float | None]]) -> dict[str, float | None]:
    """Every row of SUMMARIES on matrix."""
    return {name: number(matrix) for name, number in SUMMARIES.items()}


def summary_name(key: str) -> str:
    """A summary number's printed name: "ID", "backward transfer", ..."""
    return "ID" if key == "id" else key.replace("_", " ")


TASK_KINDS = {"retrieval": METRIC, "classification": "top1"}  # a kind of task: its matrix's number


def eval_matrix(rows: dict[str, dict[str, dict]], task_names: list[str],
                initial: dict | None = None, metric=METRIC) -> dict:
    """Assemble E from per-step rows {step name: {task name: metrics}}, steps in order.
    "matrix" and "summary" are retrieval's (metric). result[kind] = {metric, matrix, summary,
    initial} for each kind of TASK_KINDS measured; a cell is None where a task lacks that kind (a
    year without classification data) or is not measured yet (a grown run's old models on its new
    task). initial: the initial model's row (--init), kept apart from E and its summary, so E stays
    steps x tasks. result["static"]: the numbers (static_number) of the static tasks, those in rows
    but not in task_names, row by row, and the last row's mean, as the paper's Table 2 has it.
    result["not_scored"]: [step or "initial", task, kind, why] of each task not scored
    (evaluate_step); its cell is None, and ID and the transfers are means of the other cells."""
    cells = lambda row, kind_metric: [row.get(task, {}).get(kind_metric)  # noqa: E731
                                      for task in task_names]
    matrix = [cells(rows[step], metric) for step in rows]
    result = {"metric": metric, "steps": list(rows), "tasks": task_names, "matrix": matrix,
              "summary": summarize(matrix), "results": rows}
    if initial:
        result["initial"] = initial
    for kind, kind_metric in TASK_KINDS.items():
        kind_matrix = [cells(rows[step], kind_metric) for step in rows]
        if any(v is not None for row in kind_matrix for v in row):
            result[kind] = {"metric": kind_metric, "matrix": kind_matrix,
                            "summary": summarize(kind_matrix),
                            "initial": cells(initial, kind_metric) if initial else None}
    static = list(dict.fromkeys(t for row in rows.values() for t in row if t not in task_names))
    if static:
        numbers = [[static_number(rows[step].get(t)) for t in static] for step in rows]
        last = [v for v in numbers[-1] if v is not None]
        result["static"] = {"tasks": static, "numbers": numbers,
                            "final_mean": sum(last) / len(last) if last else None,
                            "initial": [static_number((initial or {}).get(t)) for t in static]
                            if initial else None}
    missed = [[step, task, kind, why] for step, row in [("initial", initial or {}), *rows.items()]
              for task, metrics in row.items()
              for kind, why in metrics.get("not_scored", {}).items()]
    if missed:
        result["not_scored"] = missed
    return result


def static_number(metrics: dict | None) -> float | None:
    """The one number of a static task, as the paper's Table 2: mean R@1 for retrieval, top-1 for
    classification."""
    return None if not metrics else metrics.get(METRIC, metrics.get("top1"))


def read_results(path: str, step_names: list[str]) -> tuple[dict, dict | None]:
    """(rows, initial row) of an eval_matrix.json, if there is one: the rows of these steps, in
    their order. A run grows by steps added at its end and never shrinks: a matrix of more steps
    than step_names, which begin them, is a one-line error, so that it is not rewritten smaller."""
    result = read_matrix(path)
    if result is None:
        return {}, None
    if len(result["tasks"]) > len(step_names) and result["tasks"][:len(step_names)] == step_names:
        raise SystemExit(f"error: {path} is the matrix of the steps {', '.join(result['tasks'])}, "
                         f"and only its first {len(step_names)} are named; a run grows by steps "
                         f"added at its end and never shrinks: rerun with all of its steps, or "
                         f"pass another --out_dir")
    return ({name: result["results"][name] for name in step_names if name in result["results"]},
            result.get("initial"))


def read_matrix(path: str) -> dict | None:
    """An eval_matrix.json as eval_matrix wrote it, or None where there is none. One that does not
    parse, or lacks the parts that readers use, is a one-line error."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            result = json.load(f)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise SystemExit(f"error: {path}: not valid JSON ({e}); delete it: rerunning the run's "
                         f"command scores its finished steps again") from None
    if not is_matrix(result):
        raise SystemExit(f"error: {path}: not an evaluation matrix as this program writes it "
                         f"(tasks, steps, results, matrix, summary); delete it: rerunning the "
                         f"run's command scores its finished steps again")
    return result


def is_matrix(result) -> bool:
    """Whether result has the parts of eval_matrix's result that its readers use: the task and
    step names, rows of {task: metrics} with numbers (and the initial model's row), retrieval's
    matrix of numbers or None, and its summary."""
    def names(x):
        return isinstance(x, list) and all(isinstance(name, str) for name in x)

    def numbers(x):
        return isinstance(x, list) and all(v is None or type(v) in (int, float) for v in x)

    def row(x):
        return isinstance(x, dict) and all(isinstance(m, dict) and numbers(
            [m.get(kind_metric) for kind_metric in TASK_KINDS.values()]) for m in x.values())

    rows = result.get("results") if isinstance(result, dict) else None
    return (isinstance(rows, dict) and all(map(row, rows.values()))
            and names(result.get("tasks")) and names(result.get("steps"))
            and row(result.get("initial") or {}) and isinstance(result.get("summary"), dict)
            and isinstance(result.get("matrix"), list) and all(map(numbers, result["matrix"])))


def check_summaries(path: str) -> None:
    """Refuse to rewrite an eval_matrix.json whose summary numbers include one that no row of
    SUMMARIES computes (a file of the run added it), rather than drop it."""
    lost = [k for k in (read_matrix(path) or {}).get("summary", {}) if k not in SUMMARIES]
    if lost:
        raise SystemExit(f"error: {path} has the summary number(s) {', '.join(lost)}, which no "
                         f"loaded file computes; pass --module=FILE, the file that adds them, "
                         f"so that they are computed again")


def format_matrix(result: dict) -> str:
    """The matrix of each kind of task, with its summary and the size of its tasks."""
    tasks, width = result["tasks"], max(8, *(len(t) + 1 for t in result["tasks"]))
    fmt = lambda v, w=0: f"{'n/a':>{w}}" if v is None else f"{v:>{w}.2f}"
    last = result["results"][result["steps"][-1]]
    lines = []
    for kind in TASK_KINDS:
        table = result.get(kind)
        if table is None:
            continue
        lines.append(f"{kind} evaluation matrix: {table['metric']} (%), row = model after step, "
                     f"column = task")
        lines.append(" " * 12 + "".join(f"{t:>{width}}" for t in tasks))
        if table.get("initial"):  # the initial model: above the matrix, not in it
            lines.append(f"{'initial':<12}" + "".join(fmt(v, width) for v in table["initial"]))
        for step, row in zip(result["steps"], table["matrix"]):
            lines.append(f"{'after ' + step:<12}" + "".join(fmt(v, width) for v in row))
        lines.append(" | ".join(f"{summary_name(k)} {fmt(v)}" for k, v in table["summary"].items()))
        size = "gallery" if kind == "retrieval" else "class_samples"  # the last row's, per task
        sizes = {t: last[t][size] for t in tasks if size in last.get(t, {})}
        if kind == "retrieval" and sizes:  # none where the last row's tasks were not scored
            lines.append("gallery (pairs per task): "
                         + ", ".join(f"{t} {n}" for t, n in sizes.items())
                         + f"; chance R@1 = {100 / min(sizes.values()):.2f}% at most")
        elif sizes:
            classes = next(last[t]["classes"] for t in sizes)
            lines.append("images per task: " + ", ".join(f"{t} {n}" for t, n in sizes.items())
                         + f"; {classes} classes, chance top-1 = {100 / classes:.2f}%")
    static = result.get("static")
    if static:
        width = max(8, *(len(t) + 1 for t in static["tasks"]))
        lines.append("static tasks: top-1 (classification) or mean R@1 (retrieval) (%), "
                     "row = model after step")
        lines.append(" " * 12 + "".join(f"{t:>{width}}" for t in static["tasks"]))
        if static["initial"]:
            lines.append(f"{'initial':<12}" + "".join(fmt(v, width) for v in static["initial"]))
        lines += [f"{'after ' + step:<12}" + "".join(fmt(v, width) for v in row)
                  for step, row in zip(result["steps"], static["numbers"])]
        lines.append(f"mean of the static tasks after the last step: {fmt(static['final_mean'])}")
    if result.get("not_scored"):
        cells = [f"{task} ({kind}) " + ("of the initial model" if step == "initial" else
                                        f"after {step}")
                 for step, task, kind, _ in result["not_scored"]]
        lines.append(f"not scored (n/a above; ID and the transfers are means of the other cells): "
                     f"{', '.join(cells)}; why is in eval_matrix.json; fix the data and rerun to "
                     f"score them")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- a run's files, flags
def step_checkpoint(run: str, t: int) -> str:
    """RUN/stepNN.pt: the model after time step t (t from 0, NN from 01), as train.py writes it."""
    return os.path.join(run, f"step{t + 1:02d}.pt")


def step_checkpoints(run: str) -> list[str]:
    """A run's step checkpoints, in step order."""
    names = sorted(os.listdir(run)) if os.path.isdir(run) else []
    return [os.path.join(run, f) for f in names if re.fullmatch(r"step\d+\.pt", f)]


CHECKPOINT_USAGE = ("usage: python evaluate.py --checkpoint=FILE --tokenizer=clip-tokenizer.json "
                    "--data_root=ROOT [--steps=2014-2016,2017,...] [--quick_gelu=auto|true|false] "
                    "[--device=cpu|cuda] [--out=FILE.json] [--precision=bf16|fp32] "
                    "[--shard_cmd='aws s3 cp s3://bucket/tic/{path} -'] "
                    "[--static=NAME=PATH,...] [--heads=auto|IMAGE,TEXT]")
FLAGS = {"run": "", "checkpoint": "", "tokenizer": "", "data_root": "", "steps": "",
         "quick_gelu": "auto",
         "heads": "auto",  # attention heads (image, text): auto (see load_checkpoint) or e.g. 16,16
         "device": "cuda" if torch.cuda.is_available() else "cpu", "out": "",
         "precision": "",  # "": bf16 on CUDA, fp32 elsewhere
         "shard_cmd": "",  # stream the shards through this command; never taken from a run
         "max_bad_fraction": 0.05,  # a task with more of its samples unreadable is not scored
         "static": "",  # static tasks NAME=PATH,... besides data_root/static/ (--run: the run's)
         "module": ""}  # files whose rows (e.g. a summary number) the run used, FILE,FILE,...


def format_row(row: dict[str, dict]) -> str:
    """One model's results per task, a line each: retrieval (and classification where measured)."""
    lines = [f"{'task':<12}{'mean_R@1':>9}{'R@5':>7}{'R@10':>7}{'gallery':>9}"
             f"{'top1':>8}{'top5':>8}{'images':>8}"]
    for task, m in row.items():
        cls = f"{m['top1']:>8.2f}{m['top5']:>8.2f}{m['class_samples']:>8}" if "top1" in m else ""
        recalls = (f"{m['mean_R@1']:>9.2f}{m['mean_R@5']:>7.2f}{m['mean_R@10']:>7.2f}"
                   f"{m['gallery']:>9}" if "mean_R@1" in m
                   else " " * 32)  # a static classification task: no retrieval
        missed = "  not scored: " + ", ".join(m["not_scored"]) if "not_scored" in m else ""
        lines.append(f"{task:<12}{recalls}{cls}{missed}")
    return "\n".join(lines)


def evaluate_checkpoint(args: dict) -> dict[str, dict]:
    """An existing model (OpenAI's or OpenCLIP's CLIP, or a step checkpoint of a run) on every
    time step's tasks."""
    if args["run"] or not (args["checkpoint"] and args["tokenizer"] and args["data_root"]):
        raise SystemExit(CHECKPOINT_USAGE)
    if args["quick_gelu"] not in ("auto", "true", "false"):
        raise SystemExit(f"--quick_gelu={args['quick_gelu']}: use auto (OpenAI's archives: "
                         f"true), true or false")
    quick_gelu = {"auto": None, "true": True, "false": False}[args["quick_gelu"]]
    device = torch.device(args["device"])
    heads = parse_heads(args["heads"])
    model = load_checkpoint(args["checkpoint"], quick_gelu, heads)[0].to(device)
    tokenizer = Tokenizer.load(args["tokenizer"])
    cfg = model.cfg
    check_tokenizer(cfg, tokenizer, args["tokenizer"], args["checkpoint"])
    step_years = shards.parse_steps(args["data_root"], args["steps"], split="retrieval")
    tasks = {**tasks_of(args["data_root"], step_years, args["shard_cmd"]),
             **static_tasks(args["data_root"], args["static"])}
    print(f"{args['checkpoint']}: ViT {cfg.vision_layers}x{cfg.vision_width} at {cfg.image_px}px, "
          f"patch {cfg.patch_px}; text {cfg.text_layers}x{cfg.text_width}; "
          f"{'QuickGELU' if cfg.quick_gelu else 'GELU'}; "
          f"{model.num_params() / 1e6:.1f}M parameters; {len(tasks)} tasks")
    t0 = time.time()
    row = evaluate_step(model, tasks, tokenizer, device, precision=args["precision"] or None,
                        max_bad_fraction=args["max_bad_fraction"])
    print(format_row(row))
    print(f"evaluated in {time.time() - t0:.0f}s")
    if args["out"]:
        shards.write_json(args["out"], {"checkpoint": args["checkpoint"], "steps": step_years,
                                        "results": row})
    return row


def read_record(path: str) -> dict:
    """The record (config, steps, ...) of a run's step checkpoint, once its CRCs are checked, its
    weights left on disk."""
    refuse_damaged(path)
    try:
        record = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # whatever torch.load says of a damaged file
        raise SystemExit(f"error: {path}: not a readable step checkpoint "
                         f"({str(e).splitlines()[0]}); delete it and rerun the run's training "
                         f"command to train that step again") from None
    if not (isinstance(record, dict) and {"config", "steps", "step_name"} <= record.keys()):
        raise SystemExit(f"error: {path}: not a step checkpoint of train.py (no config, steps and "
                         f"step_name); move it out of the run folder")
    return record


def main(argv):
    args = parse_flags(argv, FLAGS)
    if args["precision"] not in ("", *PRECISIONS):
        raise SystemExit(f"--precision={args['precision']}: use {' or '.join(PRECISIONS)}")
    check_device(args["device"])
    if not 0 <= args["max_bad_fraction"] <= 1:  # nan fails it too
        raise SystemExit(f"error: --max_bad_fraction={args['max_bad_fraction']} is out of range; "
                         f"use a fraction, 0 to 1")
    if args["out"]:
        shards.check_writable(args["out"])
    if args["checkpoint"]:
        return evaluate_checkpoint(args)
    run_flags = ("run", "device", "precision", "max_bad_fraction", "shard_cmd", "module")
    if not args["run"] or any(args[k] != FLAGS[k] for k in FLAGS if k not in run_flags):
        raise SystemExit("usage: python evaluate.py --run=RUN_DIR [--device=cpu|cuda] "
                         "[--precision=bf16|fp32] [--shard_cmd=COMMAND] [--module=FILE,...]\n"
                         "   or: " + CHECKPOINT_USAGE[7:])
    import_files([p for p in args["module"].split(",") if p])
    run, device = args["run"], torch.device(args["device"])
    check_summaries(os.path.join(run, "eval_matrix.json"))
    checkpoints = step_checkpoints(run)
    if not checkpoints:
        raise SystemExit(f"error: no step checkpoints (step*.pt) in {run}; train first with "
                         f"train.py --out_dir={run}")
    damaged = next((path for path in checkpoints if not is_checkpoint_file(path)), None)
    if damaged:  # cut short: refused now, not after the checkpoints before it are evaluated
        raise SystemExit(f"error: {damaged}: damaged (not a whole checkpoint); delete it and "
                         f"rerun the run's training command to train that step again")
    shards.check_writable(os.path.join(run, "eval_matrix.json"))
    tokenizer = Tokenizer.load(os.path.join(run, "tokenizer.json"))
    # every model on the newest checkpoint's tasks: a grown run gets a new column in every row
    last = read_record(checkpoints[-1])
    config = last["config"]
    if config.get("shard_cmd") and not args["shard_cmd"]:  # a command from a file is never run
        raise SystemExit(f"error: {run} streamed its shards with --shard_cmd="
                         f"{config['shard_cmd']!r}; a run folder's commands are not run: pass "
                         f"--shard_cmd yourself (that one, once read and trusted, or your own)")
    tasks = {**tasks_of(config["data_root"], last["steps"], args["shard_cmd"]),
             **static_tasks(config["data_root"], config.get("static", ""))}
    names = [shards.step_name(ys) for ys in last["steps"]]
    _, initial = read_results(os.path.join(run, "eval_matrix.json"), names)  # --init's row, kept
    rows = {}
    for path in checkpoints:
        t0 = time.time()
        model, record = load_checkpoint(path)
        rows[record["step_name"]] = evaluate_step(model.to(device), tasks, tokenizer, device,
                                                  precision=args["precision"] or None,
                                                  max_bad_fraction=args["max_bad_fraction"])
        print(f"evaluated {path} in {time.time() - t0:.1f}s")
    result = eval_matrix(rows, names, initial)
    shards.write_json(os.path.join(run, "eval_matrix.json"), result)
    pictures.write_eval_matrix(run, result)
    print(format_matrix(result))


if __name__ == "__main__":
    main(sys.argv[1:])
