"""The README and the docs/ pages say true things. Every command in their bash blocks runs as
written, every link between them resolves, the README stays a front page, and each install command
installs what its programs import.

Short commands run for real, in a temporary folder: tools/prepare.py clip-tokenizer, tools/export.py
(on a tiny checkpoint standing in for a run's) and python -c. Long ones (training, comparisons,
benchmarks) are checked as their program checks them before any compute. For train.py: the config
parses, passes check_config, and the batch divides over the processes. For compare.py: every row
resolves, and every run it would launch passes train.py's checks. A command that no check knows
fails: add its check here."""
import ast
import contextlib
import functools
import importlib.metadata
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

import score
from conftest import ENV, REPO
from text import Tokenizer

PAGES = ["README.md"] + sorted(os.path.join("docs", f)
                               for f in os.listdir(os.path.join(REPO, "docs")) if f.endswith(".md"))


def bash_commands(page: str) -> list[tuple[str, int, list[str]]]:
    """(page, line, argv) of every command in the page's ```bash blocks. Continued lines are joined,
    `&&` chains split and comments dropped; `...` (arguments left to the reader) is dropped and the
    brackets of [optional] arguments are removed."""
    found, fence, command, first = [], None, "", 0
    for number, line in enumerate(open(os.path.join(REPO, page)).read().splitlines(), 1):
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None  # its language; None outside
            continue
        if fence != "bash" or not (command or line.strip()):
            continue
        command, first = command + line, first or number
        if command.endswith("\\"):
            command = command[:-1]
            continue
        words = [w.removeprefix("[").removesuffix("]") for w in shlex.split(command, comments=True)]
        while words:
            end = words.index("&&") if "&&" in words else len(words)
            found.append((page, first, [w for w in words[:end] if w != "..."]))
            words = words[end + 1:]
        command, first = "", 0
    return found


COMMANDS = [c for page in PAGES for c in bash_commands(page)]


# ----------------------------------------------------------------------------- a check per program
def refused(fn, *args):
    """fn(*args)'s result, or the test fails with the one-line refusal it raised."""
    try:
        return fn(*args)
    except SystemExit as e:
        pytest.fail(f"refused: {e}")


def check_train(args: list[str], processes: int) -> None:
    """train.py's checks before any compute pass, and the batch divides over the processes."""
    import train
    cfg = refused(train.parse_config, args)
    stand_in_files(cfg)
    refused(train.check_config, cfg)
    assert cfg.batch_size % (processes * cfg.accum_steps) == 0, f"{processes} processes"


def stand_in_files(cfg) -> None:
    """The reader's own files, which check_config reads, made here where they are missing: a model
    for --init, a tokenizer for --tokenizer, a retrieval task of one (empty) shard for each --static path."""
    if cfg.init and not os.path.exists(cfg.init):
        torch.save({}, cfg.init)
    if cfg.tokenizer and not os.path.exists(cfg.tokenizer):
        Tokenizer.train(["a stand-in caption"], 300).save(cfg.tokenizer)
    task = os.path.abspath("static-stand-in")
    os.makedirs(os.path.join(task, "test"), exist_ok=True)
    open(os.path.join(task, "test", "nshards.txt"), "w").write("1")
    open(os.path.join(task, "test", "0.tar"), "w").close()  # a file, as nshards.txt must list
    open(os.path.join(task, "dataset_type.txt"), "w").write("retrieval")
    items = [item.partition("=") for item in cfg.static.split(",") if item]
    cfg.static = ",".join(name + sep + (path if os.path.exists(path) or not path else task)
                          for name, sep, path in items)


@contextlib.contextmanager
def registered(paths: str | list[str] | None):
    """Files of examples/ run as modules (their rows registered) while the block runs; the tables
    are put back afterwards."""
    import evaluate
    import model
    import schedules
    import strategies
    tables = [strategies.STRATEGIES, strategies.SETTINGS, schedules.SCHEDULES, schedules.SETTINGS,
              model.LOSSES, evaluate.SUMMARIES]
    saved = [dict(table) for table in tables]
    try:
        for path in [paths] if isinstance(paths, str) else paths or []:
            spec = importlib.util.spec_from_file_location("readme_example", os.path.join(REPO, path))
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
        yield
    finally:
        for table, before in zip(tables, saved):
            table.clear()
            table.update(before)


def check_compare(args: list[str]) -> None:
    """Every row resolves, and every run that compare.main would launch passes train.py's checks."""
    import compare
    own = [arg for arg in args if arg[2:].split("=", 1)[0] in compare.OPTIONS]
    opts = refused(compare.parse_flags, own, compare.OPTIONS)
    with registered(opts["module"]):
        check_compare_rows(opts, [arg for arg in args if arg not in own])


def check_compare_rows(opts: dict, train_args: list[str]) -> None:
    import compare
    for row in refused(compare.row_names, opts):
        refused(compare.first_step, row, train_args)
        strategy, *settings = compare.row_args(row)
        for seed in opts["seeds"].split(","):
            run_dir = os.path.join(opts["out"], f"seed{int(seed)}", row)
            run_args = [strategy, f"--seed={seed}", f"--out_dir={run_dir}", *train_args, *settings]
            check_train(run_args, opts["nproc"])


def check_evaluate(args: list[str]) -> None:
    """The flags parse and name a use of tools/score.py: --run, or --checkpoint with its inputs."""
    flags = refused(score.parse_flags, args, score.FLAGS)
    if flags["checkpoint"]:
        assert flags["tokenizer"] and flags["data_root"] and not flags["run"], args
    else:
        assert flags["run"], args


def check_pytest(args: list[str]) -> None:
    """The markers of a -m expression are declared in pytest.ini."""
    declared = re.findall(r"^\s+(\w+):", open(os.path.join(REPO, "pytest.ini")).read(), re.M)
    for expression in [args[i + 1] for i, a in enumerate(args) if a == "-m"]:
        for word in re.findall(r"\w+", expression):
            assert word in ("and", "or", "not", *declared), f"marker {word} is not in pytest.ini"


RAN = set()  # the commands run so far, in the folder


def run_here(argv: list[str], folder) -> None:
    """The command, run as written in folder, a project script by its path in the project. A command
    that several pages show runs once."""
    if shlex.join(argv) in RAN:
        return
    RAN.add(shlex.join(argv))
    script = os.path.join(REPO, argv[1])
    argv = [sys.executable, *([script] if os.path.isfile(script) else argv[1:2]), *argv[2:]]
    out = subprocess.run(argv, cwd=folder, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


def check(argv: list[str], folder) -> None:
    """Run or check one command, by its program."""
    argv = without_environment(argv)
    program, args = argv[:2], argv[2:]
    if program == ["pip", "install"]:
        files = [argv[i + 1] for i, a in enumerate(argv) if a == "-r"]
        assert files and all(os.path.isfile(os.path.join(REPO, f)) for f in files), argv
    elif argv[0] == "torchrun":
        at = argv.index("train.py")
        launcher = dict(a[2:].partition("=")[::2] for a in argv[1:at])
        processes = int(launcher.get("nproc_per_node", 1)) * int(launcher.get("nnodes", 1))
        check_train(argv[at + 1:], processes)
    elif program == ["python", "train.py"]:
        check_train(args, 1)
    elif argv[0] == "python" and argv[1].startswith("examples/"):  # train.py, with the file's rows
        with registered(argv[1]):
            check_train(args, 1)
    elif program == ["python", "tools/compare.py"]:
        check_compare(args)
    elif program == ["python", "tools/score.py"]:
        check_evaluate(args)
    elif program == ["python", "tools/bench.py"]:
        import bench
        refused(bench.parse_args, args)
    elif program == ["python", "tools/prepare.py"] and args[:1] == ["split"]:
        import prepare
        opts = refused(prepare.parse_flags, args[1:], prepare.COMMANDS["split"])
        assert opts["src"] and opts["dst"], argv
    elif runs_slowly(argv):
        run_here(argv, folder)
    elif argv[:3] == ["python", "-m", "pytest"]:
        check_pytest(argv[3:])
    elif argv[0] == "bash" and argv[1].startswith("tools/"):
        assert subprocess.run(["bash", "-n", os.path.join(REPO, argv[1])]).returncode == 0, argv
    else:
        pytest.fail(f"no check knows {shlex.join(argv)}; add one to tests/test_readme.py")


def without_environment(argv: list[str]) -> list[str]:
    """argv without its environment prefix, e.g. OMP_NUM_THREADS=1."""
    while re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
        argv = argv[1:]
    return argv


def runs_slowly(argv: list[str]) -> bool:
    """Run for real, in a process of its own: a few seconds each."""
    argv = without_environment(argv)
    short = (["python", "tools/export.py"], ["python", "-c"], ["python", "tools/prepare.py"])
    return argv[:2] in short and argv[2:3] != ["split"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Where the commands run. A tiny random CLIP stands in for a run's last checkpoint, at
    runs/cumulative-all/step05.pt."""
    from model import CLIP, make_config
    here = tmp_path_factory.mktemp("readme")
    run = here / "runs" / "cumulative-all"
    run.mkdir(parents=True)
    torch.manual_seed(0)
    model = CLIP(make_config("tiny", vocab_size=300, eot_token_id=2))
    torch.save({"model": model.state_dict(), "model_config": asdict(model.cfg)}, run / "step05.pt")
    return here


@pytest.mark.parametrize("page, line, argv", [
    pytest.param(*c, id=f"{c[0]}:{c[1]}", marks=[pytest.mark.slow] if runs_slowly(c[2]) else [])
    for c in COMMANDS])
def test_every_command_runs_as_written(page, line, argv, folder, monkeypatch):
    monkeypatch.chdir(folder)  # whatever a command writes lands in the temporary folder
    check(argv, folder)


# ----------------------------------------------------------------------------- pages and installs
def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: str) -> set[str]:
    """The anchors of a page's headings, outside code blocks (a repeated heading's: -1, -2, ...)."""
    found, fence = [], False
    for line in open(os.path.join(REPO, page)).read().splitlines():
        fence = fence != line.startswith("```")
        if not fence and re.match(r"#{1,6} ", line):
            name = slug(line.lstrip("#"))
            found.append(name if name not in found else f"{name}-{found.count(name)}")
    return set(found)


@pytest.mark.parametrize("page", PAGES)
def test_every_link_and_picture_is_there(page):
    text = re.sub(r"```.*?```", "", open(os.path.join(REPO, page)).read(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):  # https: and the like, outside the project
            continue
        path, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        assert os.path.exists(os.path.join(REPO, linked)), f"{page}: {target}: no such file"
        if anchor:
            assert anchor in anchors(linked), f"{page}: {target}: no such heading in {linked}"


def test_the_readme_is_a_front_page():
    assert os.path.getsize(os.path.join(REPO, "README.md")) <= 20 * 1024, "move reference to docs/"


def distribution(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(path: str) -> set[str]:
    lines = open(os.path.join(REPO, path)).read().splitlines()
    names = [re.split(r"[\s=<>!~;\[#(]", line.strip())[0] for line in lines]
    return {distribution(name) for name in names if name}


OWNERS = functools.cache(importlib.metadata.packages_distributions)  # module -> its distributions
OURS = {os.path.splitext(f)[0] for folder in (".", "tools", "tests")
        for f in os.listdir(os.path.join(REPO, folder))}


def third_party_imports(path: str, module_level: bool) -> set[str]:
    """The distributions of a file's imports (the module-level ones, or all), outside the standard
    library and this project."""
    tree = ast.parse(open(os.path.join(REPO, path)).read())
    nodes = tree.body if module_level else list(ast.walk(tree))
    modules = {alias.name for node in nodes if isinstance(node, ast.Import) for alias in node.names}
    modules |= {n.module for n in nodes if isinstance(n, ast.ImportFrom) and n.level == 0}
    tops = {m.split(".")[0] for m in modules} - OURS
    return {distribution(OWNERS()[m][0]) for m in tops if m not in sys.stdlib_module_names}


def python_files(folder: str) -> list[str]:
    names = os.listdir(os.path.join(REPO, folder))
    return [os.path.join(folder, f) for f in names if f.endswith(".py")]


def test_each_install_command_installs_what_its_programs_import():
    program, tests = python_files(".") + python_files("tools"), python_files("tests")
    trainer = requirement_names("requirements.txt")
    test_only = requirement_names("requirements-test.txt")
    assert "pytest" not in trainer and "pytest" in test_only
    for path in program:  # what a program imports on loading, the trainer's own list installs
        assert third_party_imports(path, module_level=True) <= trainer, path
    listed = trainer | test_only
    brought = {distribution(re.split(r"[\s=<>!~;\[(]", r)[0]) for d in listed
               for r in importlib.metadata.requires(d) or [] if "extra ==" not in r}
    for path in program + tests:  # the rest (a baseline, a test): the two lists, or what they bring
        assert third_party_imports(path, module_level=False) <= listed | brought, path
    installs = [[a for a in argv[2:] if a != "-r"] for page, _, argv in COMMANDS
                if page == "README.md" and argv[:2] == ["pip", "install"]]
    assert ["requirements.txt"] in installs  # install and run
    assert ["requirements.txt", "requirements-test.txt"] in installs  # install and test
    ci = open(os.path.join(REPO, ".ci", "run")).read()
    assert "-r requirements.txt -r requirements-test.txt" in ci


# ----------------------------------------------------------------------------- names in the pages
PROJECT = sorted(f[:-3] for f in os.listdir(REPO) if f.endswith(".py"))
CODE = re.compile(r"`([^`\s]+)`")
FILE_KINDS = {"json", "jsonl", "txt", "tar", "pt", "png", "md", "bin", "safetensors"}  # benchmark.json


def named_in(page: str) -> list[tuple[int, str, str | None]]:
    """(line, name, the module it is named in or None) of what a page names in code: a file
    (`train.py`, `tools/compare.py`), a module's name (`strategies.continue_point`,
    `survive.StepProgress.keep_trunk`), and the names a table row gives after a file
    ("`train.py`: `start_model`, `train_step`; `schedules.py`"), each in that file."""
    found = []
    for number, line in enumerate(open(os.path.join(REPO, page)).read().splitlines(), 1):
        module = None  # the file the names that follow are in, in this line
        for match in CODE.finditer(line):
            code, after = match[1], line[match.end():match.end() + 1]
            if re.fullmatch(r"(tools/|examples/|tests/)?\w+\.py", code):
                if line[:match.start()].endswith("Write "):
                    continue  # a file the page asks its reader to write
                found.append((number, code, None))
                module = code[:-3] if "/" not in code and after == ":" else None
            elif re.fullmatch(r"[A-Za-z_]\w*(\.\w+)+", code) and code.split(".")[0] in PROJECT \
                    and code.rsplit(".", 1)[1] not in FILE_KINDS:
                found.append((number, code, None))
            elif module and re.fullmatch(r"[A-Za-z_]\w*(\.\w+)*", code):
                found.append((number, code, module))
            if ";" in line[match.end():match.end() + 2] or "|" in after:
                module = None
    return found


def exists(module_name: str, dotted: str) -> bool:
    """Is dotted (a name, or a name's attribute) in the module: a function, class, constant, a
    dataclass field, or a setting of train.py's SETTINGS?"""
    import dataclasses
    import importlib
    obj = importlib.import_module(module_name)
    for part in dotted.split("."):
        if dataclasses.is_dataclass(obj) and part in {f.name for f in dataclasses.fields(obj)}:
            return True
        if module_name == "train" and obj is importlib.import_module("train") \
                and part in obj.SETTINGS:
            return True
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


@pytest.mark.parametrize("page", PAGES)
def test_every_file_and_name_a_page_gives_is_in_the_code(page):
    """A renamed function, a moved file or a name that never was: the page says so at once."""
    missing = []
    for number, name, module in named_in(page):
        if name.endswith(".py"):  # a bare file name may be an example's or a tool's
            if not any(os.path.isfile(os.path.join(REPO, folder, name))
                       for folder in ("", "examples", "tools")):
                missing.append(f"{page}:{number}: {name}")
        elif module is None:
            first, rest = name.split(".", 1)
            if not exists(first, rest):
                missing.append(f"{page}:{number}: {name}")
        elif not exists(module, name) and name not in ("main",):
            missing.append(f"{page}:{number}: {module}.{name}")
    assert not missing, "names the code does not have:\n" + "\n".join(missing)


# ----------------------------------------------------------------------------- cited tests, counts
def defined_in_tests() -> dict[str, set[str]]:
    """{tests/FILE.py: the functions and classes it defines, at any depth}."""
    found = {}
    for path in python_files("tests"):
        tree = ast.parse(open(os.path.join(REPO, path)).read())
        found[path] = {node.name for node in ast.walk(tree)
                       if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    return found


@pytest.mark.parametrize("page", PAGES)
def test_every_test_a_page_cites_is_in_the_tests(page):
    """A number a page says a test makes or checks (`tests/test_x.py::test_name`, or a bare
    `test_name`) loses its source when the test is renamed: the page says so at once."""
    defined, missing = defined_in_tests(), []
    for number, line in enumerate(open(os.path.join(REPO, page)).read().splitlines(), 1):
        for path, name in re.findall(r"`(tests/\w+\.py)::(\w+)`", line):
            if name not in defined.get(path, set()):
                missing.append(f"{page}:{number}: {path}::{name}")
        for name in re.findall(r"`(test_\w+)`", line):
            if not any(name in names for names in defined.values()):
                missing.append(f"{page}:{number}: {name}")
    assert not missing, "tests the pages cite that tests/ does not have:\n" + "\n".join(missing)


def test_the_reading_guide_gives_the_first_four_files_length():
    """The README's "about N lines" of the four files to read first: theirs, to the hundred."""
    readme = " ".join(open(os.path.join(REPO, "README.md")).read().split())
    said = re.search(r"read the first four whole \(about ([\d,]+) lines", readme)[1]
    first = re.findall(r" [1-4]\. `(\w+\.py)`", readme)
    assert first == ["strategies.py", "train.py", "model.py", "data.py"]
    lines = sum(len(open(os.path.join(REPO, f)).read().splitlines()) for f in first)
    assert round(lines, -2) == int(said.replace(",", "")), f"{lines} lines"
