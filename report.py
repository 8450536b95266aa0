"""
What a run says: its lines on stdout (rank 0), its log (RUN/log.jsonl, a JSON record per log
interval and per step), and its evaluation matrix, printed, drawn (pictures.py) and kept in
RUN/eval_matrix.json, which a rerun reads back to go on where it stopped. train.py calls each in a
line; tools/score.py and tools/compare.py read the files.
"""
import json
import os
import time
from dataclasses import asdict
from types import SimpleNamespace

import torch

import files
import pictures
from evaluate import METRIC, SUMMARIES, TASK_KINDS, static_number
from faults import fault_summary


# ----------------------------------------------------------------------------- lines and log
def run_log(run_dir: str, world):
    """log(record): one JSON line appended to RUN/log.jsonl by rank 0 (a failed write names it)."""
    path = os.path.join(run_dir, "log.jsonl")

    def log(record: dict) -> None:
        if world.master:
            files.append_line(path, json.dumps(record))
    return log


def announce_run(run_dir: str, cfg: SimpleNamespace, model_cfg, names: list[str],
                 world, log) -> None:
    """The run's first line, and its config in the log (rank 0)."""
    if world.master:
        print(f"run {run_dir}: strategy {cfg.strategy}, model {cfg.model}, {len(names)} steps "
              f"({', '.join(names)}), {world.size} process(es) on {world.device.type}, "
              f"global batch {cfg.batch_size}")
        log({"event": "config", "config": vars(cfg), "model_config": asdict(model_cfg)})


def report_run(run_dir: str, result: dict) -> None:
    """The run's evaluation matrix, printed and drawn (RUN/eval_matrix.png)."""
    print(format_matrix(result))
    pictures.write_eval_matrix(run_dir, result)
    print(f"checkpoints, log.jsonl, eval_matrix.json and eval_matrix.png in {run_dir}")


def report_step(step, record: dict, row: dict, log) -> None:
    """The step's line: samples, time, compute, R@1 per task, and what it skipped (rank 0)."""
    faults, nonfinite = record["faults"], record["nonfinite"]
    number = lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731 (n/a: not scored)
    cells = " ".join(f"{task} {number(m.get(METRIC))}" for task, m in row.items()
                     if task in step.step_names)
    static = " ".join(f"{task} {number(static_number(m))}" for task, m in row.items()
                      if task not in step.step_names)
    health = "".join([f"; skipped {faults['bad_samples']} of {faults['samples']} samples read "
                      f"({fault_summary(faults)})" if faults.get("bad_samples") else "",
                      f"; {nonfinite} non-finite losses (updates skipped)" if nonfinite else ""])
    print(f"step {step.t + 1}/{len(step.step_names)} ({record['step_name']}): "
          f"{record['samples_seen']} samples ({record['samples_read']} read) in "
          f"{record['train_s']:.0f}s, "
          f"{record['flops']:.3g} FLOPs; {METRIC} per task: {cells}"
          f"{'; static tasks: ' + static if static else ''}{health}")
    logged = ("samples_seen", "samples_read", "flops", "train_s", "start_of_step", "end_of_step",
              "faults", "nonfinite")
    log({"event": "step_end", "time_step": step.t + 1, "step": record["step_name"],
         **{k: record[k] for k in logged}, "eval": row})


def announce_step(step, parts: list, budget: int, log) -> None:
    """The step's first line: its start, budget and data mix (rank 0)."""
    if not step.master:
        return
    n_iters, batch = budget // step.config.batch_size, step.config.batch_size
    mix = ", ".join(f"{p.name} {p.n_samples:.0f}"
                    + (f" ({100 * p.keep_fraction:.0f}%)" if p.keep_fraction < 1 else "")
                    + (f" [{100 * p.share:.0f}% of samples]" if p.share is not None else "")
                    for p in parts)
    start = "warm start" if step.continue_point is not None and step.t > 0 else \
        "the initial model" if step.initial is not None else "random init"
    if step.continue_point is not None and step.continue_point["optimizer"] is not None:
        start += (f" with the optimizer carried over "
                  f"({step.continue_point['iterations']} iterations)")
    if step.config.new_data_fraction and step.t > 0 and all(p.share is None for p in parts):
        mix += " (new_data_fraction has no effect: nothing is replayed)"
    print(f"step {step.t + 1}/{len(step.step_names)} ({step.step_names[step.t]}): {start}, "
          f"budget {n_iters * batch} samples ({n_iters} iters), data: {mix}")
    log({"event": "step_start", "time_step": step.t + 1, "step": step.step_names[step.t],
         "mix": {p.name: p.n_samples for p in parts}, "budget_samples": n_iters * batch})


class IntervalLog:
    """The line and the log record of each log interval of a step (rank 0): samples so far, loss,
    learning rate, logit scale, samples per second and the time left."""

    def __init__(self, step, n_iters: int, iteration: int, log):
        self.step, self.n_iters, self.log = step, n_iters, log
        self.t0, self.iteration0 = time.time(), iteration

    def __call__(self, iteration: int, loss: torch.Tensor, lr: float, model) -> None:
        if not self.step.master:
            return
        t, batch, now = self.step.t, self.step.config.batch_size, time.time()
        samples_per_s = (iteration - self.iteration0) * batch / (now - self.t0)
        # .item() syncs with the device: only once per log interval
        record = {"samples": iteration * batch, "loss": loss.item(), "lr": lr,
                  "logit_scale": model.logit_scale.exp().item()}
        eta_s = (self.n_iters - iteration) * batch / samples_per_s
        print(f"step {t + 1}/{len(self.step.step_names)} ({self.step.step_names[t]}) | "
              f"{record['samples']}/{self.n_iters * batch} samples | "
              f"loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
              f"logit scale {record['logit_scale']:.1f} | {samples_per_s:.0f} samples/s | "
              f"eta {eta_s:.0f}s")
        self.log({"event": "train", "time_step": t + 1, **record, "samples_per_s": samples_per_s})
        self.t0, self.iteration0 = now, iteration


def tensor_bytes(obj) -> int:
    """The bytes of the tensors in obj, a tensor or dicts and lists of them."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


# ----------------------------------------------------------------------------- the matrix
def summary_name(key: str) -> str:
    """A summary number's printed name: "ID", "backward transfer", ..."""
    return "ID" if key == "id" else key.replace("_", " ")


def write_matrix(path: str, result: dict) -> None:
    """RUN/eval_matrix.json: evaluate.eval_matrix's result, written atomically."""
    files.write_json(path, result)


def read_results(path: str, step_names: list[str]) -> tuple[dict, dict | None]:
    """(rows, initial row) of an eval_matrix.json, if there is one: the rows of these steps, in
    their order. A run grows by steps added at its end and never shrinks: a matrix of more steps
    than step_names, which begin them, is a one-line error, so that it is not rewritten smaller; so
    is one with a summary number no loaded file computes (check_summaries)."""
    result = read_matrix(path)
    if result is None:
        return {}, None
    check_summaries(path, result)
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


def check_summaries(path: str, result: dict | None = None) -> None:
    """Refuse to rewrite an eval_matrix.json (result, read from path if None) whose summary numbers
    include one that no row of SUMMARIES computes (a file of the run added it), rather than drop
    it."""
    result = read_matrix(path) if result is None else result
    lost = [k for k in (result or {}).get("summary", {}) if k not in SUMMARIES]
    if lost:
        raise SystemExit(f"error: {path} has the summary number(s) {', '.join(lost)}, which no "
                         f"loaded file computes; load the file that adds them, so that they are "
                         f"computed again: rerun through it (python FILE ...), or pass "
                         f"--module=FILE to tools/score.py")


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
