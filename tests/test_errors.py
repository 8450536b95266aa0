"""Bad input is refused before any compute, in one line that names the thing and the fix, with no traceback."""
import os
import subprocess

import pytest

from conftest import ENV, REPO, train_command, train_refused

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
    assert "step01.pt" in line and "--model=tiny" in line


def test_unknown_model(tmp_path, two_years):
    line = train_refused([f"--data_root={two_years}", "--model=ViT-Z-99", f"--out_dir={tmp_path}/run"])
    assert "unknown model 'ViT-Z-99'" in line and "ViT-B-16" in line
    assert not os.path.exists(tmp_path / "run")  # refused before anything was written or computed


@pytest.mark.parametrize("arg, message", [("--budget_samples=16", "--budget_samples=16 is too small; use at least 32"),
                                          ("--max_bad_fraction=2", "is not a fraction"),
                                          ("--keep_checkpoints=0", "--keep_checkpoints=0 is too small"),
                                          ("--patch_alphas=0,half", "--patch_alphas=0,half is not a list of numbers")])
def test_values_that_cannot_work(arg, message):
    import train
    with pytest.raises(SystemExit, match=message):
        train.check_config(train.parse_config(["--batch_size=32", arg]))
