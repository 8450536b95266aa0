"""Bad input is refused before any compute, in one line that names the thing and the fix, with no traceback."""
import json
import os
import re
import shutil
import subprocess
import tracemalloc

import pytest
import torch

import shards
from benchmark import static_tasks, tasks_of
from conftest import ENV, REPO, train_command, train_refused
from text import Tokenizer

TINY = ["--budget_samples=64", "--batch_size=32", "--vocab_size=300", "--workers=0", "--log_interval=100",
        "--eval_batch=64"]


def test_missing_data_root(tmp_path):
    line = train_refused([f"--data_root={tmp_path}/nowhere", f"--out_dir={tmp_path}/run"])
    assert f"{tmp_path}/nowhere/train" in line and "--data_root" in line


def test_year_without_shards(tmp_path, two_years):
    root = tmp_path / "d"
    os.makedirs(root / "train" / "2018")
    (root / "train" / "2018" / "sizes.json").write_text("{}")
    line = train_refused([f"--data_root={root}", f"--out_dir={tmp_path}/run"])
    assert "2018/sizes.json" in line and "lists no shards" in line


def test_steps_naming_absent_years(tmp_path, two_years):
    line = train_refused([f"--data_root={two_years}", "--steps=2018,2020", f"--out_dir={tmp_path}/run"])
    assert "step '2020' names no year folder" in line and "found: 2018, 2019" in line


def test_unknown_strategy_and_key_and_type(tmp_path, two_years):
    assert "unknown strategy 'sequentail'" in train_refused([f"--data_root={two_years}", "--strategy=sequentail"])
    assert "unknown config key 'budget'" in train_refused(["--budget=10"])
    assert "--lr=fast is not a float" in train_refused(["--lr=fast"])


def test_tokenizer_that_does_not_parse(tmp_path, two_years):
    bad = tmp_path / "tok.json"
    bad.write_text("{not json")
    line = train_refused([f"--data_root={two_years}", f"--tokenizer={bad}", f"--out_dir={tmp_path}/run"])
    assert str(bad) in line and "tokenizer.json" in line


def test_batch_not_dividing_over_processes(tmp_path):
    env = {"RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29561"}
    assert "batch_size=32 does not divide over 3 processes" in train_refused(["--batch_size=32"], env)


@pytest.mark.slow
def test_checkpoint_of_another_model_shape(tmp_path, two_years):
    run = tmp_path / "run"
    ok = subprocess.run(train_command([f"--data_root={two_years}", "--steps=2018", f"--out_dir={run}", *TINY]),
                        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    line = train_refused([f"--data_root={two_years}", "--steps=2018", f"--out_dir={run}", "--model=ViT-S-16", *TINY])
    assert "holds a run of --model=tiny (not ViT-S-16), as its run.json says" in line
    os.remove(run / "run.json")  # without it, the checkpoint's own shape still refuses
    line = train_refused([f"--data_root={two_years}", "--steps=2018", f"--out_dir={run}", "--model=ViT-S-16", *TINY])
    assert "step01.pt" in line and "--model=tiny" in line


def test_unknown_model(tmp_path, two_years):
    line = train_refused([f"--data_root={two_years}", "--model=ViT-Z-99", f"--out_dir={tmp_path}/run"])
    assert "unknown model 'ViT-Z-99'" in line and "ViT-B-16" in line
    assert not os.path.exists(tmp_path / "run")  # refused before anything was written or computed


@pytest.mark.parametrize("arg, message", [
    ("--budget_samples=16", "--budget_samples=16 is too small; use at least 32"),
    ("--max_bad_fraction=2", "--max_bad_fraction=2.0 is not valid; use from 0 to 1"),
    ("--keep_checkpoints=0", "--keep_checkpoints=0 is not valid; use 1 or more"),
    ("--patch_alphas=0,half", "--patch_alphas=0,half is not valid; use a list of numbers"),
    ("--patch_alphas=0,nan", "--patch_alphas=0,nan is not valid; use a list of numbers"),
    ("--validation_samples=0", "--validation_samples=0 is not valid; use at least 1"),
    ("--lr=-1", "--lr=-1.0 is not valid; use 0 or more"), ("--lr=nan", "--lr=nan is not valid"),
    ("--beta2=1", "--beta2=1.0 is not valid; use 0 or more, below 1"), ("--seed=-1", "--seed=-1 is not valid"),
    ("--vocab_size=100", "--vocab_size=100 is not valid; use from 259"), ("--device=tpu9", "--device=tpu9 is not a device"),
    ("--accum_steps=0", "--accum_steps=0 is not valid; use 1 or more"),
    ("--ckpt_interval_samples=16", "--ckpt_interval_samples=16 is less than one batch (32)"),
    (f"--seed={2 ** 64}", f"--seed={2 ** 64} is not valid; use from 0 to {2 ** 63 - 1}"),
    ("--vocab_size=100000000", "--vocab_size=100000000 is not valid; use from 259 to 262144"),
    ("--max_image_pixels=1", "--max_image_pixels=1 is too small; use at least 1024"),  # tiny: 32 x 32 px
    ("--model=ViT-B-16 --max_image_pixels=1024", "--max_image_pixels=1024 is too small; use at least 50176"),
    ("--patch_alphas=2", "--patch_alphas=2 is not valid; use a list of numbers from 0 to 1"),
    ("--patch_alphas=0,-0.5", "--patch_alphas=0,-0.5 is not valid; use a list of numbers from 0 to 1")])
def test_values_that_cannot_work(arg, message):
    import train
    with pytest.raises(SystemExit, match=re.escape(message)):
        train.check_config(train.parse_config(["--batch_size=32", *arg.split()]))


@pytest.mark.parametrize("args, readers", [
    ("--cooldown_fraction=0.3", "const-cooldown, rsqrt"), ("--continue_from=cooled", "const-cooldown, rsqrt"),
    ("--lr_schedule=cosine-ar --cooldown_fraction=0.5", "const-cooldown, rsqrt"),
    ("--ar_horizon=3", "cosine-ar"), ("--lr_min_fraction=0.5", "cosine-ar"),
    ("--lr_schedule=const-cooldown --rsqrt_timescale=100", "rsqrt")])
def test_a_schedule_setting_is_refused_where_it_does_nothing_and_taken_where_it_is_read(args, readers):
    import train
    *schedule, setting = args.split()  # the schedule, if not the default cosine
    said = f"does nothing under {(schedule or ['--lr_schedule=cosine'])[0]}; drop it, or choose a schedule that " \
           f"reads it: {readers}"
    with pytest.raises(SystemExit, match=re.escape(f"error: {setting} {said}")):
        train.check_config(train.parse_config([*schedule, setting]))
    for reader in readers.split(", "):
        train.check_config(train.parse_config([f"--lr_schedule={reader}", setting]))
    key = setting[2:].split("=")[0]
    default = getattr(train.parse_config([]), key)
    train.check_config(train.parse_config([*schedule, f"--{key}={default}"]))  # the default, said aloud


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CPU-only machine's answer")
def test_cuda_on_a_machine_without_a_gpu(tmp_path, two_years):
    line = train_refused([f"--data_root={two_years}", "--device=cuda", f"--out_dir={tmp_path}/run"])
    assert "--device=cuda cannot be used here (no GPU is visible)" in line


@pytest.mark.parametrize("steps, message", [("2018,2018", "2018 is in two steps"), (",2018", "'' is not a year"),
                                            ("-2019", "'-2019' is not a year"),
                                            ("2018-2019,2019", "2019 is in two steps"),
                                            ("2018,201", "'201' is not a year"),  # not 2019's prefix
                                            ("2", "'2' is not a year"), ("20189", "'20189' is not")])
def test_steps_that_do_not_name_distinct_years(two_years, steps, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        shards.parse_steps(two_years, steps)


def test_steps_name_years_and_months_of_a_month_layout(tmp_path):
    for month in ("201811", "201812", "201901", "201902", "2020"):
        os.makedirs(tmp_path / "train" / month)
    assert shards.parse_steps(str(tmp_path), "2018,201901-201902,2020") == [
        ["201811", "201812"], ["201901", "201902"], ["2020"]]
    assert shards.parse_steps(str(tmp_path), "201812-2019") == [["201812", "201901", "201902"]]
    with pytest.raises(SystemExit, match="'20' is not a year"):
        shards.parse_steps(str(tmp_path), "20")


@pytest.mark.parametrize("sizes, message", [('{"0.tar": "10"}', "the count of 0.tar is '10'"),
                                            ('{"0.tar": [10]}', "the count of 0.tar is [10]"),
                                            ('{"0.tar": -1}', "the count of 0.tar is -1"),
                                            ('{"0.tar": 1000000000}',
                                             "the count of 0.tar is 1000000000;"),  # 10^9: too many
                                            ('{"0.tar": 1e20}', "the count of 0.tar is 1e+20"),
                                            ('{"0.tar": 100000000000000000000}',
                                             "the count of 0.tar is 100000000000000000000"),
                                            ('{"0.tar": 0, "1.tar": 0}', "every shard is listed with 0 samples"),
                                            ('["0.tar"]', "it is not an object")])
def test_a_malformed_sizes_json(tmp_path, sizes, message):
    folder = tmp_path / "d" / "train" / "2018"
    folder.mkdir(parents=True)
    (folder / "sizes.json").write_text(sizes)
    with pytest.raises(SystemExit, match=re.escape(f"{folder}/sizes.json: {message}")):
        shards.year_shards(str(tmp_path / "d"), "2018")


def test_an_out_dir_that_cannot_be_one(tmp_path, two_years):
    (tmp_path / "a_file").write_text("")
    assert "is a file, not a folder" in train_refused([f"--data_root={two_years}", f"--out_dir={tmp_path}/a_file"])
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # root may write anywhere: nothing to refuse
        pytest.skip("running as root")
    assert "could not write" in train_refused([f"--data_root={two_years}", f"--out_dir={locked}"])


@pytest.mark.parametrize("arg, message", [
    ("--tokenizer=/nonexistent", "error: --tokenizer=/nonexistent: no such file"),
    ("--tokenizer=TEXT", "TEXT: not a readable tokenizer.json"),
    ("--static=x=/nonexistent", "/nonexistent: no test/nshards.txt"),
    ("--init=TEXT", "error: --init=TEXT: not a checkpoint"),
    ("--steps=2018,2019", "2019/sizes.json: the count of 000000.tar is 100000000000000000000")])
def test_settings_are_refused_before_any_shard_is_counted(tmp_path, two_years, arg, message):
    root = tmp_path / "data"
    shutil.copytree(two_years, root)
    for sizes in root.glob("*/**/2018/sizes.json"):  # 2018 would be counted, and these written
        sizes.unlink()
    (root / "train" / "2019" / "sizes.json").write_text('{"000000.tar": 100000000000000000000}')
    text = tmp_path / "text.txt"
    text.write_text("not a checkpoint, not a tokenizer")
    arg, message = arg.replace("TEXT", str(text)), message.replace("TEXT", str(text))
    line = train_refused([f"--data_root={root}", "--steps=2018", arg, f"--out_dir={tmp_path}/run"])
    assert message in line
    assert not list(root.glob("*/**/2018/sizes.json"))  # no shard was counted


TORCHRUN_LOG = re.compile(r"[DIWE]\d{4} ")  # torchrun's own log lines: level, then the date


@pytest.mark.slow
@pytest.mark.parametrize("arg", ["--tokenizer=/nonexistent", "--steps=2019"])
def test_a_failure_under_torchrun_is_one_line_from_all_processes(tmp_path, two_years, arg):
    # found before the processes meet (each refuses it), and after (rank 0 reads sizes.json first)
    root = tmp_path / "data"
    shutil.copytree(two_years, root)
    (root / "train" / "2019" / "sizes.json").write_text('{"000000.tar": "64"}')
    args = [f"--data_root={root}", f"--out_dir={tmp_path}/run", arg]
    out = subprocess.run(train_command(args, nproc=2), cwd=REPO, env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode != 0
    ours = out.stderr.split("Traceback (most recent call last)")[0]  # then torchrun's report
    ours = [line for line in ours.splitlines() if line.strip() and not TORCHRUN_LOG.match(line)]
    message = "no such file" if "tokenizer" in arg else "the count of 000000.tar is '64'"
    assert len(ours) == 1 and message in ours[0], out.stderr
    assert "Connection closed" not in out.stderr


def test_a_shard_name_that_would_run_a_command_is_refused_before_any_compute(tmp_path, two_years):
    root = tmp_path / "d"
    shutil.copytree(two_years, root)
    sizes_path, ran = root / "train" / "2019" / "sizes.json", tmp_path / "X"
    sizes = json.loads(sizes_path.read_text())
    first = next(iter(sizes))
    sizes[f"$(touch {ran}){first}"] = sizes.pop(first)
    sizes_path.write_text(json.dumps(sizes))
    line = train_refused([f"--data_root={root}", f"--shard_cmd=cat \"{root}/{{path}}\"", f"--out_dir={tmp_path}/run",
                          *TINY])
    assert "$(touch" in line and "rename it in sizes.json" in line and not ran.exists()


# ----------------------------------------------------------------------------- evaluation data, read before training
def eval_files(two_years, root, file, text):
    """A copy of two_years' evaluation data (none of its training data) with file written as text."""
    for part in ("eval", "static"):
        shutil.copytree(os.path.join(two_years, part), root / part)
    if file.endswith("/0.tar"):
        (root / file).unlink()
        (root / file).mkdir()  # a folder where the shard should be
    else:
        (root / file).write_text(text)


TEMPLATES, CLASSNAMES = "eval/classification/templates.txt", "eval/classification/classnames.txt"
NSHARDS = "static/shapes/test/nshards.txt"


@pytest.mark.parametrize("file, text, message", [
    (TEMPLATES, "a {}\na {} of {}\n", "the prompt template 'a {} of {}' needs exactly one {}"),
    (TEMPLATES, "a {0}", "'a {0}' needs exactly one {}"), (TEMPLATES, "a {name}", "'a {name}' needs"),
    (TEMPLATES, "a {} {", "'a {} {' needs"), (TEMPLATES, "a photo", "'a photo' needs"),
    (TEMPLATES, "\n\n", "templates.txt: empty"), (CLASSNAMES, "", "classnames.txt: empty"),
    (NSHARDS, "abc", "nshards.txt: holds 'abc', not a number of shards"),
    (NSHARDS, "0", "nshards.txt: holds '0', not a number of shards"),
    (NSHARDS, "3000000", "test/1.tar: listed by ROOT/static/shapes/test/nshards.txt (3000000 shards) but missing "
                         "(2999999 in all)"),
    ("static/shapes/test/0.tar", "", "test/0.tar: listed by ROOT/static/shapes/test/nshards.txt but not a file")])
def test_evaluation_data_that_cannot_be_scored_is_refused_where_it_is_read(tmp_path, two_years, file, text,
                                                                            message):
    root = tmp_path / "data"
    eval_files(two_years, root, file, text)
    read = static_tasks if file.startswith("static") else tasks_of
    with pytest.raises(SystemExit, match=re.escape(message.replace("ROOT", str(root)))):
        read(str(root), "") if read is static_tasks else read(str(root), [["2018"]])


def test_a_long_nshards_txt_is_refused_at_once(tmp_path, two_years):
    root = tmp_path / "data"
    eval_files(two_years, root, NSHARDS, "300000")
    tracemalloc.start()
    with pytest.raises(SystemExit, match="missing"):
        static_tasks(str(root), "")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1e6, peak  # no list of 300,000 paths before the refusal


def test_a_prompt_template_that_cannot_format_is_refused_before_training(tmp_path, two_years):
    root = tmp_path / "data"
    shutil.copytree(two_years, root)
    (root / TEMPLATES).write_text("a {}\na {} of {}\n")
    line = train_refused([f"--data_root={root}", f"--out_dir={tmp_path}/run", *TINY])
    assert f"{root}/{TEMPLATES}: the prompt template 'a {{}} of {{}}' needs exactly one {{}}" in line
    assert not os.path.exists(tmp_path / "run" / "step01.pt")


def test_max_image_pixels_below_the_image_of_an_init_model_is_refused(tmp_path):
    from dataclasses import asdict
    from types import SimpleNamespace
    import train
    from model import CLIP, make_config
    tok = Tokenizer.train(["a red circle"] * 8, vocab_size=300)
    model = CLIP(make_config("tiny", image_px=64, vocab_size=tok.vocab_size, eot_token_id=tok.eot_id))
    init = str(tmp_path / "step01.pt")
    torch.save({"model": model.state_dict(), "model_config": asdict(model.cfg)}, init)
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = train.parse_config([f"--init={init}", "--max_image_pixels=1024"])
    train.check_config(cfg)  # enough for --model=tiny's 32 px
    with pytest.raises(SystemExit, match=re.escape("--max_image_pixels=1024 is too small for --init's 64 px "
                                                   "images; use at least 4096")):
        train.load_initial(cfg, tok, SimpleNamespace(master=True))
