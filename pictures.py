"""
The pictures, drawn with Pillow alone: a run's evaluation matrix (RUN/eval_matrix.png, written by
train.py at the end of a run and by evaluate.py --run), and tools/compare.py's heatmaps, its
compute plot and its sheet of heatmaps.

A matrix picture frames each cell in the colour of the summary number it counts in
(evaluate.summarize): the diagonal (ID), the cells below it (backward transfer: old tasks) and
those above it (forward transfer: future tasks), with the three means in the legend. The initial
model's row (--init) and the static tasks' columns are drawn apart, framed in grey: they count in
none of the three.
"""
import os

from PIL import Image, ImageDraw, ImageFont

import files

FONT = ImageFont.load_default()
CELL_W, CELL_H, APART = 64, 40, 14  # px: the narrowest cell, a cell's height, a gap that sets apart
REGIONS = {  # summarize's key: its name, frame colour (Okabe-Ito: colour-blind safe), its cells
    "id": ("ID", "#000000", "of the diagonal, each model on its own step's task"),
    "backward_transfer": ("backward transfer", "#D55E00",
                          "below the diagonal, old tasks (what is remembered)"),
    "forward_transfer": ("forward transfer", "#009E73",
                         "above the diagonal, future tasks (how far it generalises)")}
APART_FRAME = "#A0A0A0"  # the cells in no mean: the initial row, the static tasks


def save(image: Image.Image, path: str) -> None:
    """Write image as a PNG at path, atomically (files.write_atomic)."""
    files.write_atomic(path, lambda f: image.save(f, format="PNG"))


def text_px(text: str) -> int:
    return int(FONT.getlength(text)) + 1


def format_mean(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"  # as evaluate.format_matrix prints the summary


def value_colour(v: float | None, lo: float, hi: float) -> tuple[int, int, int]:
    """White at lo to dark blue at hi; light grey for a cell not measured."""
    if v is None:
        return (235, 235, 235)
    u = min(max((v - lo) / (hi - lo), 0.0), 1.0) if hi > lo else 0.5
    return (int(255 - 225 * u), int(255 - 180 * u), int(255 - 80 * u))


def column_edges(x: int, names: list[str]) -> list[int]:
    """Each column's left edge from x on, then the last one's right edge; each fits its name."""
    edges = [x]
    for name in names:
        edges.append(edges[-1] + max(CELL_W, text_px(name) + 12))
    return edges


def legend_lines(summary: dict, initial: bool, static: dict | None) -> list[tuple[str, str]]:
    """(frame colour, text) of each line of a matrix's legend: the three means of summary, its
    other numbers (colour None: no frame, e.g. forgetting), then what the initial row and the
    static columns are, where they are drawn."""
    lines = [(colour, f"{name} {format_mean(summary.get(key))}: mean {where}")
             for key, (name, colour, where) in REGIONS.items()]
    lines += [(None, f"{key.replace('_', ' ')} {format_mean(value)}")
              for key, value in summary.items() if key not in REGIONS]
    if initial:
        lines.append((APART_FRAME, "initial: the model the run began with (above, apart), "
                                   "in no mean"))
    if static and static["tasks"]:
        lines.append((APART_FRAME, "static tasks: top-1 or mean R@1 (right, apart); their mean "
                                   f"after the last step {format_mean(static['final_mean'])}"))
    return lines


def draw_matrix(title: str, matrix: list[list], tasks: list[str], summary: dict,
                steps: list[str] | None = None, initial: list | None = None,
                static: dict | None = None, lo: float | None = None,
                hi: float | None = None) -> Image.Image:
    """E[i][j] as cells coloured by value, each value written: row i = the model after step
    steps[i] (default tasks[i]), column j = the task of step tasks[j]; a None cell is n/a. Each
    cell is framed by its region (the diagonal, below, above); the legend gives summary's means
    (evaluate.summarize of matrix). initial: the initial model's row, drawn above and apart.
    static: eval_matrix's result["static"], drawn as columns to the right and apart. The colour
    runs from white at lo to dark blue at hi (default: the range of the cells drawn; one range
    for several pictures compares them)."""
    steps = steps or tasks
    static = static or {"tasks": [], "numbers": [[] for _ in matrix], "initial": None}
    drawn = [*matrix, initial or [], *static["numbers"], static["initial"] or []]
    values = [v for row in drawn for v in row if v is not None]
    lo = min(values, default=0.0) if lo is None else lo
    hi = max(values, default=0.0) if hi is None else hi

    # the layout, in px: title and column names, the initial row, the matrix, the legend
    xs = column_edges(16 + max(text_px(f"after {s}") for s in [*steps, "initial"]), tasks)
    static_xs = column_edges(xs[-1] + APART, static["tasks"])
    top = 74
    matrix_top = top + (CELL_H + APART if initial else 0)
    legend = legend_lines(summary, bool(initial), static)
    legend_top = matrix_top + len(matrix) * CELL_H + 14
    width = max(static_xs[-1], 10 + text_px(title), *(34 + text_px(t) for _, t in legend)) + 12
    image = Image.new("RGB", (width, legend_top + 18 * len(legend) + 8), "white")
    d = ImageDraw.Draw(image)

    def centred(x0, x1, y, text, ink="black"):
        d.text(((x0 + x1 - text_px(text)) // 2, y), text, fill=ink, font=FONT)

    def row_of_cells(edges, y, values, frames):  # 3 px of white between cells, the frame inside
        for x0, x1, v, frame in zip(edges, edges[1:], values, frames):
            fill = value_colour(v, lo, hi)
            d.rectangle([x0, y, x1 - 3, y + CELL_H - 3], fill=fill, outline=frame, width=3)
            ink = "white" if sum(fill) < 480 else "black"  # white digits on the darker blues
            centred(x0, x1 - 3, y + CELL_H // 2 - 7, "n/a" if v is None else f"{v:.1f}", ink)

    d.text((10, 8), title, fill="black", font=FONT)
    d.text((10, 24), "row = model after step, column = task of step", fill="#555555", font=FONT)
    if static["tasks"]:
        d.text((static_xs[0], top - 30), "static tasks", fill="#555555", font=FONT)
    for edges, names in ((xs, tasks), (static_xs, static["tasks"])):
        for x0, x1, name in zip(edges, edges[1:], names):
            centred(x0, x1 - 3, top - 16, name)
    if initial:
        d.text((8, top + CELL_H // 2 - 7), "initial", fill="black", font=FONT)
        row_of_cells(xs, top, initial, [APART_FRAME] * len(tasks))
        row_of_cells(static_xs, top, static["initial"] or [], [APART_FRAME] * len(static["tasks"]))
    for i, (row, static_row) in enumerate(zip(matrix, static["numbers"])):
        y = matrix_top + i * CELL_H
        d.text((8, y + CELL_H // 2 - 7), f"after {steps[i]}", fill="black", font=FONT)
        regions = ["id" if i == j else "backward_transfer" if i > j else "forward_transfer"
                   for j in range(len(row))]
        row_of_cells(xs, y, row, [REGIONS[region][1] for region in regions])
        row_of_cells(static_xs, y, static_row, [APART_FRAME] * len(static_row))
    for k, (colour, text) in enumerate(legend):
        y = legend_top + 18 * k
        if colour:
            d.rectangle([10, y, 24, y + 12], fill="white", outline=colour, width=3)
        d.text((32, y + 1), text, fill="black", font=FONT)
    return image


def sheet(images: list[Image.Image], columns: int = 4) -> Image.Image:
    """The images on one sheet, columns per row, each in a cell of the largest one's size."""
    w, h = max(i.size[0] for i in images), max(i.size[1] for i in images)
    rows = -(-len(images) // columns)
    out = Image.new("RGB", (w * min(columns, len(images)), h * rows), "white")
    for k, image in enumerate(images):
        out.paste(image, ((k % columns) * w, (k // columns) * h))
    return out


def run_picture(result: dict, title: str) -> Image.Image:
    """The picture of a run's eval_matrix.json (evaluate.eval_matrix): its retrieval matrix, with
    the initial row and the static tasks where it has them, and below it its classification
    matrix where it has one."""
    panels = []
    for kind in ("retrieval", "classification"):  # evaluate.TASK_KINDS, in eval_matrix.json
        table = result.get(kind)
        if table:
            panels.append(draw_matrix(
                f"{title}: {kind} evaluation matrix, {table['metric']} (%)", table["matrix"],
                result["tasks"], table["summary"], result["steps"], table["initial"],
                result.get("static") if kind == "retrieval" else None))
    return sheet(panels, columns=1)


def write_eval_matrix(run_dir: str, result: dict) -> None:
    """RUN/eval_matrix.png: run_picture of result, beside eval_matrix.json."""
    save(run_picture(result, run_dir), os.path.join(run_dir, "eval_matrix.png"))


def compute_plot(rows: list[dict]) -> Image.Image:
    """Each of compare.py's rows: its final model's mean R@1 (all tasks) against its total FLOPs."""
    W, H, pad = 720, 480, 70
    img = Image.new("RGB", (W, H), "white")
    d, font = ImageDraw.Draw(img), FONT
    xs, ys = [r["flops"] for r in rows], [r["final_mean"] for r in rows]
    x_hi, y_lo, y_hi = max(xs) * 1.1, min(ys) - 2, max(ys) + 2
    px = lambda x: pad + (W - 2 * pad) * x / x_hi
    py = lambda y: H - pad - (H - 2 * pad) * (y - y_lo) / (y_hi - y_lo)
    d.line([(pad, pad), (pad, H - pad), (W - pad, H - pad)], fill="black")
    for i in range(5):
        y = y_lo + (y_hi - y_lo) * i / 4
        d.text((5, py(y) - 5), f"{y:.1f}", fill="black", font=font)
        x = x_hi * i / 4
        d.text((px(x) - 15, H - pad + 8), f"{x:.2g}", fill="black", font=font)
    d.text((W // 2 - 60, H - 30), "total training FLOPs", fill="black", font=font)
    d.text((5, 15), "final model: mean R@1 over all time steps (%)", fill="black", font=font)
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
               "#7f7f7f"]
    points = [(px(r["flops"]), py(r["final_mean"]), palette[i % len(palette)], r["strategy"])
              for i, r in enumerate(rows)]
    labels = []  # (x, y) of the labels drawn so far: close points get theirs stacked downwards
    for x, y, c, name in sorted(points, key=lambda p: p[1]):
        d.ellipse([x - 6, y - 6, x + 6, y + 6], fill=c)
        ly = max([y - 6] + [y0 + 13 for x0, y0 in labels if abs(x - x0) < 20])
        d.text((x + 9, ly), name, fill=c, font=font)
        labels.append((x, ly))
    return img
