"""
The built-in synthetic time-continual benchmark: 32 px images of two coloured shapes with
captions, with real drift through time, written in the TiC-DataComp layout (train.py reads it as
it reads real TiC data).

    python synthetic.py data/tic-synth     # write it (~10 s); train.py does it on first use

Shapes come in three groups: stable (the same every year), fading (common at first, gone in the
last three years: training only on new data forgets them) and emerging (unseen before their debut
year: a model trained on earlier years cannot know them). Captions name colour, shape and
quadrant of both objects, so recall@1 on a year's 1,000 held-out pairs means something (chance
0.1%). Per year it also writes labelled single-shape images for zero-shot classification.
Deterministic from the seed; benchmark.json records the whole schedule.
"""
import io
import json
import math
import os
import shutil
import sys
import tarfile
import time
from functools import lru_cache

import numpy as np
from PIL import Image

from files import stale_temporary
from shards import add_member

ROOT = "data/tic-synth"  # where train.py makes it when --data_root is left as is
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235),
           "yellow": (235, 220, 40), "purple": (150, 60, 210), "pink": (245, 130, 195),
           "white": (235, 235, 235), "cyan": (40, 215, 220)}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # q: row q // 2, column q % 2
STABLE = ("circle", "square", "triangle", "cross", "diamond", "bar")  # weight 1 every year
FADING = ("ring", "frame", "x", "pillar", "checker")  # common at first, gone in the last 3 years
EMERGING = ("star", "heart", "arrow", "moon", "dots")  # unseen before their debut year, then common
SHAPES = STABLE + FADING + EMERGING
TEMPLATES = ("a {c0} {s0} at {p0} and a {c1} {s1} at {p1}",
             "{c0} {s0} in the {p0}, {c1} {s1} in the {p1}",
             "a {p0} {c0} {s0} next to a {p1} {c1} {s1}")
CLASS_TEMPLATES = ("a {}", "a picture of a {}", "a drawing of a {}")  # zero-shot; classes: SHAPES


def debut_year_index(shape: str, n_years: int) -> int:
    """Emerging shapes debut one after another, spread over year indices 1 .. n_years-1."""
    return 1 + EMERGING.index(shape) * (n_years - 1) // len(EMERGING)


def shape_weight(shape: str, i: int, n_years: int) -> float:
    """Relative frequency of a shape in year index i (the drift schedule, in benchmark.json)."""
    if shape in STABLE:
        return 1.0
    if shape in FADING:  # 3, 0.75, 0, 0, 0 over 5 years: sequential forgets them in the last three
        return 3.0 * max(0.0, 1 - i / max(1, n_years - 3)) ** 2
    return 3.0 if n_years > 1 and i >= debut_year_index(shape, n_years) else 0.0  # emerging


@lru_cache(maxsize=None)
def shape_alpha(shape: str, size_px: int) -> np.ndarray:
    """Anti-aliased mask [size_px, size_px] in [0, 1]: the shape is drawn on coordinates x, y in
    [-1, 1] (y down) at 4x resolution and averaged, so shapes stay recognisable at 11-14 px."""
    n = 4 * size_px
    u = (np.arange(n) + 0.5) / n * 2 - 1
    y, x = np.meshgrid(u, u, indexing="ij")
    r, box = np.hypot(x, y), np.maximum(abs(x), abs(y))

    def polygon(*pts):  # even-odd rule: inside iff a ray to the right crosses the edges oddly often
        inside = np.zeros_like(x, dtype=bool)
        for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]):
            crosses = (y0 > y) != (y1 > y)
            inside ^= crosses & (x < x0 + (y - y0) * (x1 - x0) / (y1 - y0 + 1e-12))
        return inside

    star = [(0.95 * (1 if k % 2 == 0 else 0.42) * math.sin(k * math.pi / 5),
             -0.95 * (1 if k % 2 == 0 else 0.42) * math.cos(k * math.pi / 5) + 0.08)
            for k in range(10)]
    mask = {
        "circle": r <= 0.95,
        "ring": (r <= 0.95) & (r >= 0.5),
        "square": box <= 0.8,
        "frame": (box <= 0.92) & (box >= 0.5),
        "triangle": polygon((0, -0.95), (0.95, 0.8), (-0.95, 0.8)),
        "cross": ((abs(x) <= 0.3) | (abs(y) <= 0.3)) & (box <= 0.95),
        "x": ((abs(x - y) <= 0.4) | (abs(x + y) <= 0.4)) & (box <= 0.95),
        "diamond": abs(x) + abs(y) <= 0.95,
        "bar": (abs(y) <= 0.32) & (abs(x) <= 0.95),
        "pillar": (abs(x) <= 0.32) & (abs(y) <= 0.95),
        "checker": (((np.floor((x + 1) * 2) + np.floor((y + 1) * 2)) % 2 == 0)
                    & (box < 1)),  # 4 x 4 cells
        "star": polygon(*star),
        "heart": (np.hypot(x - 0.45, y + 0.4) <= 0.5) | (np.hypot(x + 0.45, y + 0.4) <= 0.5)
        | polygon((-0.93, -0.2), (0.93, -0.2), (0, 0.95)),
        "arrow": polygon((-0.95, -0.25), (0.1, -0.25), (0.1, -0.8), (0.95, 0), (0.1, 0.8),
                         (0.1, 0.25), (-0.95, 0.25)),
        "moon": (r <= 0.95) & (np.hypot(x - 0.45, y + 0.15) > 0.75),
        "dots": np.hypot(abs(x) - 0.5, abs(y) - 0.5) <= 0.36,  # 2 x 2 dots
    }[shape]
    return mask.reshape(size_px, 4, size_px, 4).mean(axis=(1, 3)).astype(np.float32)


def _render_samples(rng: np.random.Generator, n: int, shape_p: np.ndarray, image_px: int,
                    objects: int = 2):
    """(images uint8 [n, px, px, 3], captions, shape names, (colour, shape, position) of each
    object in caption order), drawn from the year's shape frequencies shape_p: two objects per
    image (image-caption pairs) or one (the classification split, class = its shape)."""
    half = image_px // 2
    shapes = rng.choice(len(SHAPES), size=(n, objects), p=shape_p)
    colours = rng.integers(len(COLOURS), size=(n, objects))
    q0 = rng.integers(4, size=n)
    # the objects of an image in distinct quadrants
    quads = np.stack([q0, (q0 + rng.integers(1, 4, size=n)) % 4], axis=1)[:, :objects]
    sizes_px = np.maximum(3, np.round(rng.integers(11, 15, size=(n, objects))
                                      * image_px / 32)).astype(int)
    jitter_px = np.round(rng.integers(-2, 3, size=(n, objects, 2)) * image_px / 32).astype(int)
    colour_jitter = rng.integers(-20, 21, size=(n, objects, 3))
    templates, swap = rng.integers(len(TEMPLATES), size=n), rng.random(n) < 0.5
    # dark background, a tint plus 4-level grey noise: small in PNG, but no two images alike
    images = (rng.integers(0, 40, size=(n, 1, 1, 3))
              + 7 * rng.integers(0, 4, size=(n, image_px, image_px, 1)))
    images = images.astype(np.float32)
    rgb = np.clip(np.array(list(COLOURS.values()))[colours] + colour_jitter,
                  0, 255).astype(np.float32)
    colour_names = list(COLOURS)
    captions, objects_named = [], []
    for k in range(n):
        words = []
        for j in range(objects):
            q, s = int(quads[k, j]), int(sizes_px[k, j])
            top, left = (q // 2) * half, (q % 2) * half
            # stay in the quadrant
            y = min(max(top + (half - s) // 2 + int(jitter_px[k, j, 0]), top), top + half - s)
            x = min(max(left + (half - s) // 2 + int(jitter_px[k, j, 1]), left), left + half - s)
            alpha = shape_alpha(SHAPES[shapes[k, j]], s)[:, :, None]
            patch = images[k, y:y + s, x:x + s]
            images[k, y:y + s, x:x + s] = patch * (1 - alpha) + rgb[k, j] * alpha
            words.append((colour_names[colours[k, j]], SHAPES[shapes[k, j]], POSITIONS[q]))
        if objects == 1:
            captions.append("a {} {} at {}".format(*words[0]))
            objects_named.append(words)
            continue
        if swap[k]:  # the caption names the objects in random order
            words.reverse()
        objects_named.append(words)
        (c0, s0, p0), (c1, s1, p1) = words
        captions.append(TEMPLATES[templates[k]].format(c0=c0, s0=s0, p0=p0, c1=c1, s1=s1, p1=p1))
    names = [[SHAPES[i] for i in row] for row in shapes]
    return np.round(images).clip(0, 255).astype(np.uint8), captions, names, objects_named


def _write_year(folder: str, rng: np.random.Generator, year: int, first_index: int, n_samples: int,
                shape_p: np.ndarray, image_px: int, samples_per_shard: int,
                classification: bool = False) -> None:
    """Image-caption pairs (KEY.json, KEY.png, KEY.txt), or single-shape images with their class
    id (KEY.json, KEY.png, KEY.cls) for classification."""
    os.makedirs(folder)
    sizes = {}
    for shard, start in enumerate(range(0, n_samples, samples_per_shard)):
        n = min(samples_per_shard, n_samples - start)
        images, captions, pairs, _ = _render_samples(rng, n, shape_p, image_px,
                                                     1 if classification else 2)
        name = f"{shard:06d}.tar"
        with tarfile.open(os.path.join(folder, name), "w", format=tarfile.USTAR_FORMAT) as tf:
            for k in range(n):
                key = f"{year}_{first_index + start + k:07d}"
                png = io.BytesIO()
                # compress_level=1 is fast, and these tiny images barely compress more
                Image.fromarray(images[k]).save(png, format="PNG", compress_level=1)
                meta = {"uid": key, "year": year, "shapes": pairs[k]}
                if classification:
                    meta["cls"] = SHAPES.index(pairs[k][0])
                add_member(tf, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
                add_member(tf, f"{key}.png", png.getvalue())
                if classification:
                    add_member(tf, f"{key}.cls", str(meta["cls"]).encode())
                else:
                    add_member(tf, f"{key}.txt", captions[k].encode())
        sizes[name] = n
    with open(os.path.join(folder, "sizes.json"), "w") as f:
        json.dump(sizes, f, indent=1)


def make_synthetic_benchmark(root: str, seed: int = 0, years=(2018, 2019, 2020, 2021, 2022),
                             train_samples_per_year: int = 8000, eval_samples_per_year: int = 1000,
                             image_px: int = 32, samples_per_shard: int = 1000,
                             classification_samples_per_year: int = 500,
                             static_samples: int = 500) -> None:
    """Write the synthetic time-continual benchmark to root (train/YEAR, eval/retrieval/YEAR,
    eval/classification/YEAR with classnames.txt and templates.txt, static/shapes and
    static/shape-pairs, benchmark.json). Deterministic from seed; built in a temporary folder beside
    root and renamed, so root is whole or absent. A root already there is reused if its
    benchmark.json matches, else refused."""
    t0 = time.time()
    years = [int(y) for y in years]
    params = dict(seed=seed, years=years, train_samples_per_year=train_samples_per_year,
                  eval_samples_per_year=eval_samples_per_year, image_px=image_px,
                  samples_per_shard=samples_per_shard,
                  classification_samples_per_year=classification_samples_per_year,
                  static_samples=static_samples)
    T = len(years)
    weights = {str(y): {s: shape_weight(s, i, T) for s in SHAPES} for i, y in enumerate(years)}
    meta = {"params": params, "chance_recall_at_1": 1 / eval_samples_per_year,
            "shape_weights": weights,
            "groups": {"stable": STABLE, "fading": FADING, "emerging": EMERGING},
            "debut_year": {s: years[debut_year_index(s, T)] for s in EMERGING if T > 1},
            "colours": list(COLOURS), "positions": POSITIONS, "templates": TEMPLATES,
            "classnames": SHAPES, "class_templates": CLASS_TEMPLATES,
            "static": {"shapes": "classification of one stable shape, uniform over them",
                       "shape-pairs": "retrieval of two stable shapes, each image with its "
                                      "three captions"}}
    meta = json.loads(json.dumps(meta))  # tuples -> lists, as they read back from the file
    root = os.path.normpath(root)
    remove_stale_copies(root)
    if os.path.exists(root):
        return _check_existing_benchmark(root, meta)
    tmp = f"{root}.tmp{os.getpid()}"  # same parent folder, so the final os.rename is atomic
    shutil.rmtree(tmp, ignore_errors=True)
    for i, year in enumerate(years):
        p = np.array(list(weights[str(year)].values()))
        # an RNG per (seed, year, split): held-out pairs never coincide with training pairs,
        # and one year's sample count leaves the other years alone
        _write_year(os.path.join(tmp, "train", str(year)), np.random.default_rng([seed, year, 0]),
                    year, 0, train_samples_per_year, p / p.sum(), image_px, samples_per_shard)
        _write_year(os.path.join(tmp, "eval", "retrieval", str(year)),
                    np.random.default_rng([seed, year, 1]), year, train_samples_per_year,
                    eval_samples_per_year, p / p.sum(), image_px, samples_per_shard)
    _write_classification(os.path.join(tmp, "eval", "classification"), meta)
    _write_static(os.path.join(tmp, "static"), seed, static_samples, image_px)
    with open(os.path.join(tmp, "benchmark.json"), "w") as f:
        json.dump(meta, f, indent=1)
    try:
        os.rename(tmp, root)
    except OSError:  # another process (another rank) finished first: keep its copy if it matches
        shutil.rmtree(tmp, ignore_errors=True)
        return _check_existing_benchmark(root, meta)
    n = T * (train_samples_per_year + eval_samples_per_year + classification_samples_per_year)
    print(f"wrote synthetic benchmark to {root}: {T} years x ({train_samples_per_year} train + "
          f"{eval_samples_per_year} retrieval + {classification_samples_per_year} classification) "
          f"= {n} samples at {image_px}px in {time.time() - t0:.1f}s; retrieval recall@1 chance "
          f"level {1 / eval_samples_per_year:.4f}")


def remove_stale_copies(root: str) -> None:
    """Remove the ROOT.tmpPID folders beside root that a killed writer (process PID, gone) left."""
    parent, stem = os.path.split(root)
    for name in os.listdir(parent or ".") if os.path.isdir(parent or ".") else []:
        path = os.path.join(parent, name)
        if os.path.isdir(path) and stale_temporary(name, stem):
            shutil.rmtree(path, ignore_errors=True)
            print(f"{path}: removed, a benchmark that a killed process left half-written")


def _write_classification(folder: str, meta: dict) -> None:
    """The classification split: per year, single-shape images drawn from that year's shape
    frequencies, labelled with the shape's index in SHAPES (all 16 shapes are classes every year),
    and the class names and prompts."""
    params = meta["params"]
    if not params["classification_samples_per_year"]:
        return
    # keys unique over the splits
    first_index = params["train_samples_per_year"] + params["eval_samples_per_year"]
    for year in params["years"]:
        p = np.array(list(meta["shape_weights"][str(year)].values()))
        _write_year(os.path.join(folder, str(year)),
                    np.random.default_rng([params["seed"], year, 2]), year, first_index,
                    params["classification_samples_per_year"], p / p.sum(), params["image_px"],
                    params["samples_per_shard"], classification=True)
    for name, lines in (("classnames.txt", meta["classnames"]),
                        ("templates.txt", meta["class_templates"])):
        with open(os.path.join(folder, name), "w") as f:
            f.write("\n".join(lines) + "\n")


def _write_static(folder: str, seed: int, n: int, image_px: int) -> None:
    """Two static tasks in clip_benchmark's webdataset format (evaluate.StaticTask), drawn from
    the stable shapes alone, the same in every year: shapes/ (classify one shape) and shape-pairs/
    (retrieve images of two shapes, each with its caption in all three templates, one a line)."""
    if not n:
        return
    p = np.array([float(s in STABLE) for s in SHAPES])
    for name, objects, rng in (("shapes", 1, np.random.default_rng([seed, 0, 3])),
                               ("shape-pairs", 2, np.random.default_rng([seed, 0, 4]))):
        os.makedirs(os.path.join(folder, name, "test"))
        images, _, _, objects_named = _render_samples(rng, n, p / p.sum(), image_px, objects)
        with tarfile.open(os.path.join(folder, name, "test", "0.tar"), "w",
                          format=tarfile.USTAR_FORMAT) as tf:
            for k in range(n):
                png = io.BytesIO()
                Image.fromarray(images[k]).save(png, format="PNG", compress_level=1)
                add_member(tf, f"{name}_{k:07d}.png", png.getvalue())
                if objects == 1:
                    add_member(tf, f"{name}_{k:07d}.cls",
                               str(STABLE.index(objects_named[k][0][1])).encode())
                else:
                    (c0, s0, p0), (c1, s1, p1) = objects_named[k]
                    text = "\n".join(t.format(c0=c0, s0=s0, p0=p0, c1=c1, s1=s1, p1=p1)
                                     for t in TEMPLATES)
                    add_member(tf, f"{name}_{k:07d}.txt", text.encode())
        files = {"test/nshards.txt": "1",
                 "dataset_type.txt": "classification" if objects == 1 else "retrieval"}
        if objects == 1:
            files.update({"classnames.txt": "\n".join(STABLE),
                          "zeroshot_classification_templates.txt": "\n".join(
                              t.replace("{}", "{c}") for t in CLASS_TEMPLATES)})
        for path, text in files.items():
            with open(os.path.join(folder, name, path), "w") as f:
                f.write(text + "\n")


def _check_existing_benchmark(root: str, meta: dict) -> None:
    path = os.path.join(root, "benchmark.json")
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        raise SystemExit(f"{root} exists but has no readable benchmark.json; delete it or pick "
                         f"another root")
    if old == meta:
        print(f"synthetic benchmark already at {root} with the same parameters; reusing it")
        return
    differ = [f"{k}={old.get('params', {}).get(k)!r} (asked {v!r})"
              for k, v in meta["params"].items()
              if old.get("params", {}).get(k) != v] or ["made by another version of synthetic.py"]
    raise SystemExit(f"{root} holds a different synthetic benchmark: {', '.join(differ)}; "
                     f"delete {root} or pick another root")


if __name__ == "__main__":
    make_synthetic_benchmark(sys.argv[1] if len(sys.argv) > 1 else ROOT)
