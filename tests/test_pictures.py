"""The picture of a run's evaluation matrix: written as a valid PNG, grown by the initial row, the
static tasks and the classification matrix, its regions told apart by colour alone."""
import numpy as np
from PIL import Image, ImageColor

import evaluate
import pictures

STEPS = ["2018", "2019", "2020"]


def a_result(initial=False, static=0, classification=False, value=None) -> dict:
    """eval_matrix of made-up rows: cell (i, j) is value, or 10 i + j; static: how many static
    tasks (static0, static1, ...)."""
    def metrics(i, j):
        v = 10.0 * i + j if value is None else value
        return {"mean_R@1": v, "gallery": 64,
                **({"top1": v / 2, "class_samples": 8, "classes": 4} if classification else {})}

    def row(i):
        return {**{t: metrics(i, j) for j, t in enumerate(STEPS)},
                **{f"static{k}": {"top1": 50.0 + i + k} for k in range(static)}}
    return evaluate.eval_matrix({s: row(i) for i, s in enumerate(STEPS)}, STEPS,
                                row(-1) if initial else None)


def read_png(path) -> Image.Image:
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"  # the PNG signature
    with Image.open(path) as image:
        image.verify()  # the chunks and their checksums
    image = Image.open(path)
    assert image.format == "PNG"
    return image.convert("RGB")


def test_the_picture_is_a_png_grown_by_the_initial_row_static_tasks_and_classification(tmp_path):
    sizes = {}
    for name, kw in {"plain": {}, "initial": {"initial": True}, "static": {"static": 6},
                     "both": {"initial": True, "static": 6},
                     "classification": {"classification": True}}.items():
        run = tmp_path / name
        run.mkdir()
        pictures.write_eval_matrix(str(run), a_result(**kw))
        sizes[name] = read_png(run / "eval_matrix.png").size
        assert sorted(p.name for p in run.iterdir()) == ["eval_matrix.png"]  # no temporary left
    plain_h, legend_line = sizes["plain"][1], 18
    assert sizes["initial"][1] > plain_h + legend_line + pictures.CELL_H  # a row, not just a line
    assert sizes["static"][0] > 9 * pictures.CELL_W  # 3 + 6 columns
    assert sizes["both"][0] == sizes["static"][0]
    assert sizes["both"][1] - sizes["static"][1] == sizes["initial"][1] - plain_h
    assert sizes["classification"][1] > 1.8 * plain_h  # a second matrix below the first


def cell_boxes(image: Image.Image, fill) -> tuple[list, list]:
    """The [start, end) x and y ranges of the cells filled with colour fill."""
    mask = (np.asarray(image) == fill).all(axis=-1)

    def runs(hit):
        edges = np.flatnonzero(np.diff(np.concatenate([[0], hit.astype(int), [0]])))
        return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]
    return runs(mask.any(axis=0)), runs(mask.any(axis=1))


def test_the_diagonal_below_and_above_are_told_apart_where_their_values_are_the_same():
    image = pictures.run_picture(a_result(value=40.0), "the same value everywhere")
    xs, ys = cell_boxes(image, pictures.value_colour(40.0, 40.0, 40.0))
    assert len(xs) == len(ys) == 3  # the 3 x 3 cells, of one colour inside
    px = image.load()
    frame = {(i, j): px[xs[j][0] - 1, ys[i][0] + 5] for i in range(3) for j in range(3)}  # beside
    assert {px[x + 2, y + 2] for x, _ in xs for y, _ in ys} == {(142, 165, 215)}  # one fill
    assert {frame[i, i] for i in range(3)} == {ImageColor.getrgb(pictures.REGIONS["id"][1])}
    below = {frame[i, j] for i, j in frame if i > j}
    above = {frame[i, j] for i, j in frame if i < j}
    assert below == {ImageColor.getrgb(pictures.REGIONS["backward_transfer"][1])}
    assert above == {ImageColor.getrgb(pictures.REGIONS["forward_transfer"][1])}
    assert len(below | above | {frame[0, 0]}) == 3


def test_the_legend_states_summarize_s_means():
    result = a_result()  # cell (i, j) = 10 i + j
    s = result["summary"]
    assert (s["id"], s["backward_transfer"], s["forward_transfer"]) == (11, 17, 5)
    legend = pictures.legend_lines(s, initial=False, static=None)
    lines = [text for _, text in legend]
    assert [line.split(":")[0] for line in lines] == ["ID 11.00", "backward transfer 17.00",
                                                      "forward transfer 5.00", "forgetting -10.00"]
    assert legend[-1][0] is None  # a number of no region of cells: no frame
    s["my_number"] = 1.5  # a summary row a file added is stated too
    assert pictures.legend_lines(s, initial=False, static=None)[-1][1] == "my number 1.50"
    static = a_result(static=2)["static"]  # the last row's: 52 and 53
    assert pictures.legend_lines(s, True, static)[-1][1].endswith("after the last step 52.50")
