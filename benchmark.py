"""
A run's benchmark on disk (shards.py reads the layout): each time step's years and training data,
the run's tokenizer, and the evaluation tasks. A time step's task (Task): its held-out image-caption
pairs (ROOT/eval/retrieval/YEAR/*.tar) and, where the benchmark has them, labelled images with
class names and prompt templates (ROOT/eval/classification/YEAR, or TiC-DataCompNet's
ROOT/eval/datacompnet/YEAR). A static task (StaticTask): ImageNet, Flickr30k and the like, in
clip_benchmark's webdataset format. Each is checked where it is read, before any training: a
template that cannot format, an empty name list, a missing shard is one line. evaluate.py scores
them; the built-in benchmark is made on first use (synthetic.py).
"""
import glob
import os
import re
import string
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import shards
import synthetic
from data import Part
from text import Tokenizer


def load_benchmark(cfg: SimpleNamespace, world) -> tuple[list, list, dict]:
    """Each time step's year folders, its training data (a Part per year), and the evaluation
    tasks by name: every step's, then the static ones. The built-in benchmark is made on first
    use. Rank 0 goes first: the others read what it wrote, and only it says what is wrong."""
    if not world.master:
        world.barrier()
    if world.master and cfg.data_root == os.path.abspath(synthetic.ROOT):
        synthetic.make_synthetic_benchmark(cfg.data_root)
    if not os.path.isdir(os.path.join(cfg.data_root, "train")):
        raise SystemExit(f"error: no {cfg.data_root}/train folder; point --data_root at a TiC "
                         f"layout (train/YEAR/*.tar with sizes.json) or leave it at "
                         f"{synthetic.ROOT} for the built-in benchmark")
    step_years = shards.parse_steps(cfg.data_root, cfg.steps)
    shards.check_sizes(cfg.data_root, [y for ys in step_years for y in ys])  # before any counting
    step_data = [[Part(y, shards.year_shards(cfg.data_root, y, shard_cmd=cfg.shard_cmd))
                  for y in ys] for ys in step_years]
    tasks = tasks_of(cfg.data_root, step_years, cfg.shard_cmd)
    static = static_tasks(cfg.data_root, cfg.static)
    if tasks.keys() & static.keys():
        raise SystemExit(f"error: a static task is named as a time step "
                         f"({', '.join(tasks.keys() & static.keys())}); rename it in --static or "
                         f"in {cfg.data_root}/static")
    if world.master:
        world.barrier()
    return step_years, step_data, {**tasks, **static}


def load_tokenizer(run_dir: str, cfg: SimpleNamespace, first_years: list[str],
                   world) -> Tokenizer:
    """RUN/tokenizer.json, fixed for the whole run as CLIP's vocabulary is; made on first use from
    --tokenizer, or trained on the first step's captions."""
    path = os.path.join(run_dir, "tokenizer.json")
    given = cfg.tokenizer or tokenizer_beside(cfg.init)  # a stepNN.pt as --init: its run's
    if world.master and not os.path.exists(path) and given:
        Tokenizer.load(given).save(path)
    elif world.master and not os.path.exists(path):
        captions = shards.first_captions(cfg.data_root, first_years, cfg.tokenizer_samples,
                                         cfg.shard_cmd)
        Tokenizer.train(captions, cfg.vocab_size).save(path)
    world.barrier()
    return Tokenizer.load(path)


def tokenizer_beside(init: str) -> str:
    """The tokenizer.json beside --init's file (a stepNN.pt's run has one), or ""."""
    return os.path.join(os.path.dirname(init), "tokenizer.json") if init else ""


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
