"""Retrieval metrics against a brute-force reference, the evaluation-matrix summary, what
evaluate.py takes from a run folder (no commands) and gives back (no smaller matrix), and tasks that
cannot be scored: marked, and the run goes on."""
import json
import os
import re
import shutil
from dataclasses import asdict

import pytest
import torch

import checkpoints
import evaluate
import files
import report
import score
import shards
import synthetic
from benchmark import tasks_of
from conftest import train_in_process
from evaluate import recall_any_at_k, recall_at_k, summarize
from model import CLIP, make_config
from text import Tokenizer


def brute_force_recall(queries, gallery, k):
    """Sort the whole gallery for each query, placing the true match AFTER every item tied with it."""
    hits = 0
    for i, q in enumerate(queries):
        scores = (gallery @ q).tolist()
        order = sorted(range(len(gallery)), key=lambda j: (-scores[j], j == i))
        hits += order.index(i) < k
    return hits / len(queries)


def test_recall_matches_brute_force_with_ties():
    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        n, d = 37, 4
        # few distinct integer values make many exact ties in the scores
        queries = torch.randint(-1, 2, (n, d), generator=g).float()
        gallery = torch.randint(-1, 2, (n, d), generator=g).float()
        gallery[::3] = queries[::3]  # some true matches are perfect
        got = recall_at_k(queries, gallery, ks=(1, 5, 10), chunk_queries=7)  # chunks not dividing n
        for k in (1, 5, 10):
            assert abs(got[k] - brute_force_recall(queries, gallery, k)) < 1e-12, (trial, k)


def test_recall_perfect_and_collapsed():
    eye = torch.eye(20)
    assert recall_at_k(eye, eye, ks=(1,))[1] == 1.0
    same = torch.ones(20, 8)  # every score tied: a collapsed model retrieves nothing
    assert recall_at_k(same, same, ks=(1, 5, 10)) == {1: 0.0, 5: 0.0, 10: 0.0}
    broken = torch.full((20, 8), float("nan"))  # features gone non-finite retrieve nothing either
    assert recall_at_k(broken, eye[:, :8], ks=(1,))[1] == 0.0
    assert recall_any_at_k(broken, eye[:, :8], torch.arange(20), ks=(1,))[1] == 0.0


def test_the_tie_example_in_docs_data_md():
    """docs/data.md's example of ties, made here: 30 random pairs (16-d features, each caption its
    image plus noise 0.2), the first caption a copy of the second, scored with ties against the
    model and by clip_benchmark's rule (a hit iff torch.topk's k hold the match)."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(2)
    images = F.normalize(torch.randn(30, 16, generator=g), dim=-1)
    texts = F.normalize(images + 0.2 * torch.randn(30, 16, generator=g), dim=-1)
    texts[0] = texts[1]
    assert torch.equal((images @ texts.T)[:, 0], (images @ texts.T)[:, 1])  # exact ties

    def topk_rule(queries, gallery):
        top = torch.topk(queries @ gallery.T, 1, dim=1).indices[:, 0]
        return 100 * (top == torch.arange(len(queries))).double().mean().item()

    ours = [100 * recall_at_k(a, b, ks=(1,))[1] for a, b in ((images, texts), (texts, images))]
    theirs = [topk_rule(images, texts), topk_rule(texts, images)]
    assert ours[0] < theirs[0] and ours[1] == theirs[1]  # the tie is image->text's only
    said = (f"mean R@1 is {sum(ours) / 2:.2f} here and {sum(theirs) / 2:.2f} by clip_benchmark's "
            f"rule (image->text {ours[0]:.2f} vs {theirs[0]:.2f}")
    page = open(os.path.join(os.path.dirname(__file__), "..", "docs", "data.md")).read()
    page = " ".join(page.split())  # the sentence, whatever its line breaks
    assert said in page and "test_the_tie_example_in_docs_data_md" in page


def test_summary_of_matrix():
    E = [[10.0, 1.0, 2.0],
         [8.0, 12.0, 3.0],
         [6.0, 7.0, 14.0]]
    s = summarize(E)
    assert s["id"] == 12.0
    assert s["backward_transfer"] == (8.0 + 6.0 + 7.0) / 3
    assert s["forward_transfer"] == (1.0 + 2.0 + 3.0) / 3
    assert s["forgetting"] == ((10.0 - 6.0) + (12.0 - 7.0)) / 2  # the best before the last step, minus the last
    assert summarize([[5.0]]) == {"id": 5.0, "backward_transfer": None, "forward_transfer": None, "forgetting": None}
    # an old task learned better later (positive transfer) is negative forgetting; an unmeasured cell is skipped
    assert summarize([[1.0, None], [3.0, 4.0]])["forgetting"] == 1.0 - 3.0
    assert summarize([[None, 2.0], [3.0, 4.0]])["forgetting"] is None


def test_any_caption_recall_against_brute_force_with_the_third_of_five_captions_matching():
    images = torch.eye(4)[:3]  # 3 images, 5 captions each: caption j belongs to image j // 5
    owner = torch.arange(15) // 5
    captions = torch.full((15, 4), 0.0)
    captions[:, 3] = 1.0  # every caption points away from every image ...
    captions[2] = images[0]  # ... but image 0's third caption is image 0 itself
    captions[10] = 0.5 * images[1] + images[2]  # image 2's first caption: closer to image 2 than to image 1
    i2t = recall_any_at_k(images, captions, owner, ks=(1, 5))
    assert i2t[1] == 2 / 3  # image 0 by its 3rd caption, image 2 by its 1st; image 1's captions all tie at 0: a miss
    t2i = recall_at_k(captions, images, ks=(1,), match=owner)
    assert t2i[1] == 2 / 15  # per caption: only caption 2 (image 0) and caption 10 (image 2) find their image
    g = torch.Generator().manual_seed(0)  # and against a brute force over random, tied scores
    q, gallery = torch.randint(-1, 2, (9, 3), generator=g).float(), torch.randint(-1, 2, (30, 3), generator=g).float()
    own = torch.randint(0, 9, (30,), generator=g)
    for k in (1, 5):
        hits = sum(sum(1 for j in range(30) if own[j] != i and gallery[j] @ q[i] >= max(
            (gallery[m] @ q[i] for m in range(30) if own[m] == i), default=float("inf"))) < k for i in range(9)
                   if (own == i).any())
        assert recall_any_at_k(q, gallery, own, ks=(k,), chunk_queries=4)[k] == hits / 9


# ------------------------------------------------------------------- what a run folder can ask for
@pytest.fixture(scope="module")
def one_year(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("one_year") / "data")
    synthetic.make_synthetic_benchmark(root, years=(2020,), train_samples_per_year=8,
                                       eval_samples_per_year=8, samples_per_shard=4,
                                       classification_samples_per_year=0, static_samples=4)
    return root


def random_run(folder, root: str, shard_cmd: str) -> str:
    """RUN/step01.pt of a random tiny model whose config says its shards streamed by shard_cmd."""
    tok = Tokenizer.train(["a red circle", "a blue square at the top"] * 8, vocab_size=300)
    run = folder / "run"
    run.mkdir()
    tok.save(str(run / "tokenizer.json"))
    torch.manual_seed(0)
    model = CLIP(make_config("tiny", vocab_size=tok.vocab_size, eot_token_id=tok.eot_id))
    config = {"data_root": root, "shard_cmd": shard_cmd, "static": ""}
    torch.save({"model": model.state_dict(), "model_config": asdict(model.cfg), "config": config,
                "steps": [["2020"]], "step_name": "2020"}, run / "step01.pt")
    return str(run)


def test_evaluate_run_never_runs_the_command_a_run_folder_holds(tmp_path, one_year):
    ran = tmp_path / "ran"
    run = random_run(tmp_path, one_year, f"touch {ran}; cat {one_year}/{{path}}")
    with pytest.raises(SystemExit) as e:
        score.main([f"--run={run}", "--device=cpu"])
    assert "streamed its shards with --shard_cmd='touch" in str(e.value)
    assert "pass --shard_cmd yourself" in str(e.value) and "\n" not in str(e.value)
    assert not ran.exists() and not os.path.exists(os.path.join(run, "eval_matrix.json"))
    score.main([f"--run={run}", "--device=cpu", f"--shard_cmd=cat {one_year}/{{path}}"])
    assert not ran.exists()
    result = json.load(open(os.path.join(run, "eval_matrix.json")))
    assert result["results"]["2020"]["2020"]["gallery"] == 8


def test_a_failing_shard_cmds_stderr_is_in_evaluation_errors_and_tokenizer_warnings(one_year,
                                                                                    capsys):
    failing = "echo no such bucket: {path} >&2; exit 3"
    task = tasks_of(one_year, [["2020"]], failing)["2020"]
    torch.manual_seed(0)
    model = CLIP(make_config("tiny", vocab_size=300))
    tok = Tokenizer.train(["a red circle"] * 8, vocab_size=300)
    said = "the command failed.*exit status 3: no such bucket: eval/retrieval/2020"
    with pytest.raises(SystemExit, match=said):
        evaluate.retrieval(model, task.retrieval, tok, torch.device("cpu"))
    assert list(shards.first_captions(one_year, ["2020"], 4, failing)) == []
    assert "exit status 3: no such bucket: train/2020" in capsys.readouterr().err


# ------------------------------------------------------------------- a run never shrinks
def test_a_matrix_is_not_read_back_for_fewer_of_its_steps(tmp_path):
    names = ["2018", "2019", "2020"]
    rows = {step: {task: {"mean_R@1": 10.0 * i + j} for j, task in enumerate(names)}
            for i, step in enumerate(names)}
    path = str(tmp_path / "eval_matrix.json")
    files.write_json(path, evaluate.eval_matrix(rows, names))
    assert report.read_results(path, names)[0] == rows
    assert report.read_results(path, names + ["2021"])[0] == rows  # a run grown by a step
    with pytest.raises(SystemExit, match="steps 2018, 2019, 2020, and only its first 2 are named"):
        report.read_results(path, names[:2])


# ------------------------------------------------------------------- evaluation data that cannot be scored
TINY = ["--budget_samples=64", "--batch_size=32", "--vocab_size=300", "--workers=0", "--log_interval=100",
        "--eval_batch=64"]


def test_a_task_that_cannot_be_scored_is_marked_and_the_run_finishes(tmp_path, two_years, capsys):
    root = tmp_path / "data"
    shutil.copytree(two_years, root)
    shard = root / "static" / "shapes" / "test" / "0.tar"
    whole = shard.read_bytes()
    shard.write_bytes(whole[:len(whole) // 2])  # cut short, and the format lists no count to judge the loss by
    sizes_path = root / "eval" / "retrieval" / "2019" / "sizes.json"
    sizes = sizes_path.read_text()
    sizes_path.write_text(json.dumps({k: 10 * n for k, n in json.loads(sizes).items()}))  # a lie: 9 in 10 missing
    run = tmp_path / "run"
    args = [f"--data_root={root}", f"--out_dir={run}", *TINY]
    train_in_process(args)
    out, err = capsys.readouterr()
    assert "warning: task 2019 (retrieval) not scored: 576 of 640 samples listed could not be scored" in err
    assert "warning: task shapes (classification) not scored: " in err and "breaks off after" in err
    result = json.loads((run / "eval_matrix.json").read_text())
    assert [row[1] for row in result["matrix"]] == [None, None] and None not in result["matrix"][1][:1]
    assert result["summary"]["id"] == result["matrix"][0][0]  # the mean of the diagonal's cells scored
    assert None not in result["classification"]["matrix"][1]  # 2019's classification was scored
    assert [row[1] for row in result["static"]["numbers"]] == [None, None]
    assert result["static"]["tasks"] == ["shape-pairs", "shapes"] and None not in result["static"]["numbers"][1][:1]
    assert [cell[:3] for cell in result["not_scored"]] == [
        ["2018", "2019", "retrieval"], ["2018", "shapes", "classification"],
        ["2019", "2019", "retrieval"], ["2019", "shapes", "classification"]]
    assert "not scored (n/a above; ID and the transfers are means of the other cells): 2019 (retrieval) after " \
           "2018, shapes (classification) after 2018," in out
    # the data fixed, a rerun scores those cells and trains nothing
    shard.write_bytes(whole)
    sizes_path.write_text(sizes)
    train_in_process(args)
    result = json.loads((run / "eval_matrix.json").read_text())
    assert "not_scored" not in result and None not in result["matrix"][0] + result["matrix"][1]
    assert capsys.readouterr().out.count("done already") == 2  # no step trained again


@pytest.mark.parametrize("arg, message", [
    ("--device=tpu", "error: --device=tpu is not a device"),
    pytest.param("--device=cuda", "error: --device=cuda cannot be used here (no GPU is visible)",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only machine's answer")),
    ("--max_bad_fraction=nan", "error: --max_bad_fraction=nan is out of range; use a fraction, 0 to 1"),
    ("--max_bad_fraction=-1", "error: --max_bad_fraction=-1.0 is out of range"),
    ("--out=TMP/nowhere/r.json", "error: cannot write TMP/nowhere/r.json: no folder TMP/nowhere"),
    ("--out=TMP", "error: cannot write TMP: it is a folder"),
    ("--out=TMP/locked/r.json", "error: could not write TMP/locked/r.json: Permission denied")])
def test_evaluate_refuses_a_flag_before_reading_a_model(tmp_path, arg, message):
    (tmp_path / "locked").mkdir(mode=0o500)
    if "locked" in arg and os.access(tmp_path / "locked", os.W_OK):
        pytest.skip("running as root")
    arg, message = arg.replace("TMP", str(tmp_path)), message.replace("TMP", str(tmp_path))
    with pytest.raises(SystemExit, match=re.escape(message)):  # not "no such checkpoint file"
        score.main([f"--checkpoint={tmp_path}/none.pt", f"--tokenizer={tmp_path}/none.json",
                       f"--data_root={tmp_path}", arg])
    assert os.listdir(tmp_path) == ["locked"]  # no probe left behind


def test_evaluate_run_refuses_a_damaged_checkpoint_before_any_compute(tmp_path, one_year):
    run = random_run(tmp_path, one_year, "")
    whole = open(os.path.join(run, "step01.pt"), "rb").read()
    with open(os.path.join(run, "step02.pt"), "wb") as f:
        f.write(whole[:len(whole) // 2])  # a kill mid-copy
    with pytest.raises(SystemExit, match=re.escape(f"error: {run}/step02.pt: damaged (not a whole checkpoint); "
                                                   f"delete it")):
        score.main([f"--run={run}", "--device=cpu"])
    torch.save({"model": {}}, os.path.join(run, "step02.pt"))
    with pytest.raises(SystemExit, match=re.escape(f"error: {run}/step02.pt: not a step checkpoint of train.py")):
        score.main([f"--run={run}", "--device=cpu"])
    assert not os.path.exists(os.path.join(run, "eval_matrix.json"))


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"), ("[]", "not an evaluation matrix"),
    ('{"tasks": ["2018"], "steps": ["2018"], "results": {"2018": 5}, "matrix": [[1]], "summary": {}}',
     "not an evaluation matrix"),
    ('{"tasks": ["2018"], "steps": ["2018"], "results": {"2018": {"2018": {"mean_R@1": "high"}}}, '
     '"matrix": [[1]], "summary": {}}', "not an evaluation matrix")])
def test_a_malformed_eval_matrix_json_is_refused_in_one_line(tmp_path, one_year, monkeypatch, text, message):
    import compare
    path = tmp_path / "eval_matrix.json"
    path.write_text(text)
    said = re.escape(f"error: {path}: {message}") + ".*delete it: rerunning the run's command scores"
    with pytest.raises(SystemExit, match=said):
        report.read_results(str(path), ["2018"])
    with pytest.raises(SystemExit, match=said):
        compare.finished(str(tmp_path))
    run = random_run(tmp_path, one_year, "")
    shutil.copy(path, os.path.join(run, "eval_matrix.json"))
    monkeypatch.setattr(evaluate, "evaluate_step", lambda *a, **k: pytest.fail("a model was evaluated first"))
    with pytest.raises(SystemExit, match=said.replace(re.escape(str(path)), re.escape(f"{run}/eval_matrix.json"))):
        score.main([f"--run={run}", "--device=cpu"])


def test_a_run_with_cells_not_scored_is_tabulated_and_drawn_without_them(tmp_path):
    import compare
    run = tmp_path / "seed0" / "sequential"
    run.mkdir(parents=True)
    for t in (0, 1):
        torch.save({"samples_seen": 64, "flops": 1e9}, checkpoints.step_checkpoint(str(run), t))
    missed = {"not_scored": {"retrieval": "cut short"}}
    rows = {"2018": {"2018": {"mean_R@1": 10.0, "gallery": 8}, "2019": missed},
            "2019": {"2018": {"mean_R@1": 8.0, "gallery": 8}, "2019": missed}}
    result = evaluate.eval_matrix(rows, ["2018", "2019"])
    files.write_json(str(run / "eval_matrix.json"), result)
    assert "2019 (retrieval) after 2018, 2019 (retrieval) after 2019;" in report.format_matrix(result)
    record = compare.run_record(str(run))
    assert record["final_mean"] == 8.0 and record["not_scored"] == 2 and record["id"] == 10.0
    compare.main(["--strategies=sequential", f"--out={tmp_path}", "--table_only=true"])
    table = (tmp_path / "table.md").read_text()
    assert "cells not scored, left out of the means (eval_matrix.json says why): sequential 2" in table
    assert (tmp_path / "heatmap_sequential.png").exists()


@pytest.mark.parametrize("arg, message", [
    ("--seeds=a", "error: --seeds=a: use distinct seeds from 0 to"), ("--seeds=0,0", "--seeds=0,0: use distinct"),
    ("--seeds=0,-1", "--seeds=0,-1: use"), (f"--seeds={2 ** 63}", f"--seeds={2 ** 63}: use"),
    ("--nproc=0", "error: --nproc=0 is too small; use at least 1")])
def test_compare_refuses_a_bad_option_before_any_run(tmp_path, arg, message):
    import compare
    with pytest.raises(SystemExit, match=re.escape(message)):  # not "no finished runs"
        compare.main([arg, "--strategies=sequential", f"--out={tmp_path}", "--table_only=true"])
