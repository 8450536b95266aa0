"""
Zero-shot retrieval and classification on each time step's tasks, and TiC-CLIP's evaluation
matrix. train.py calls evaluate_step after every step; tools/score.py scores a run's checkpoints
again, or an existing CLIP.

A time step's task is its held-out pairs (benchmark.py reads them), scored by image->text and
text->image recall@1/5/10 and their mean R@1, the main metric, with the gallery size (recall falls
as it grows). Scores go a chunk of queries at a time, never gallery x gallery. Where the benchmark
has labelled images (as TiC-DataCompNet), a task also reports zero-shot top-1/top-5 accuracy.

The evaluation matrix E[i][j] is the model after step i on the task of step j, summarised as in
the paper by three means (ID over i = j, backward transfer over i > j: old tasks, what is
remembered; forward transfer over i < j: future tasks, how far it generalises) and by forgetting,
each a row of SUMMARIES. A task that cannot be scored after a step (its data unreadable) is
recorded as not scored: n/a in the matrix, left out of the means, scored again on a rerun.
report.py prints and keeps it, pictures.py draws it.
"""
import math

import torch
import torch.nn.functional as F

from benchmark import StaticTask, Task
from data import eval_batches, normalize_images
from faults import NotScored, unscored_noted
from model import autocast

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
    return {**recalls(recall_at_k(img, txt), recall_at_k(txt, img)), "gallery": len(img)}


def recalls(i2t: dict[int, float], t2i: dict[int, float]) -> dict[str, float]:
    """Image->text, text->image and mean recall@k, in %, by name (RETRIEVAL_METRICS)."""
    return {**{f"i2t_R@{k}": 100 * v for k, v in i2t.items()},
            **{f"t2i_R@{k}": 100 * v for k, v in t2i.items()},
            **{f"mean_R@{k}": 100 * (i2t[k] + t2i[k]) / 2 for k in i2t}}


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
    return {**recalls(recall_any_at_k(img, txt, owner), recall_at_k(txt, img, match=owner)),
            "gallery": len(img), "captions": len(txt)}


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
            with unscored_noted(row[name], name, kind):  # too much of it unreadable: n/a, and on
                row[name].update(measure())
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


