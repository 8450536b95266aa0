"""Retrieval metrics against a brute-force reference, the evaluation-matrix summary, and what
evaluate.py takes from a run folder (no commands) and gives back (no smaller matrix)."""
import json
import os
from dataclasses import asdict

import pytest
import torch

import data
import evaluate
import shards
import synthetic
from evaluate import recall_any_at_k, recall_at_k, summarize
from model import CLIP, make_config


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
    tok = data.Tokenizer.train(["a red circle", "a blue square at the top"] * 8, vocab_size=300)
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
        evaluate.main([f"--run={run}", "--device=cpu"])
    assert "streamed its shards with --shard_cmd='touch" in str(e.value)
    assert "pass --shard_cmd yourself" in str(e.value) and "\n" not in str(e.value)
    assert not ran.exists() and not os.path.exists(os.path.join(run, "eval_matrix.json"))
    evaluate.main([f"--run={run}", "--device=cpu", f"--shard_cmd=cat {one_year}/{{path}}"])
    assert not ran.exists()
    result = json.load(open(os.path.join(run, "eval_matrix.json")))
    assert result["results"]["2020"]["2020"]["gallery"] == 8


def test_a_failing_shard_cmds_stderr_is_in_evaluation_errors_and_tokenizer_warnings(one_year,
                                                                                    capsys):
    failing = "echo no such bucket: {path} >&2; exit 3"
    task = evaluate.tasks_of(one_year, [["2020"]], failing)["2020"]
    torch.manual_seed(0)
    model = CLIP(make_config("tiny", vocab_size=300))
    tok = data.Tokenizer.train(["a red circle"] * 8, vocab_size=300)
    said = "the command failed.*exit status 3: no such bucket: eval/retrieval/2020"
    with pytest.raises(SystemExit, match=said):
        evaluate.retrieval(model, task.retrieval, tok, torch.device("cpu"))
    assert list(data.first_captions(one_year, ["2020"], 4, failing)) == []
    assert "exit status 3: no such bucket: train/2020" in capsys.readouterr().err


# ------------------------------------------------------------------- a run never shrinks
def test_a_matrix_is_not_read_back_for_fewer_of_its_steps(tmp_path):
    names = ["2018", "2019", "2020"]
    rows = {step: {task: {"mean_R@1": 10.0 * i + j} for j, task in enumerate(names)}
            for i, step in enumerate(names)}
    path = str(tmp_path / "eval_matrix.json")
    shards.write_json(path, evaluate.eval_matrix(rows, names))
    assert evaluate.read_results(path, names)[0] == rows
    assert evaluate.read_results(path, names + ["2021"])[0] == rows  # a run grown by a step
    with pytest.raises(SystemExit, match="steps 2018, 2019, 2020, and only its first 2 are named"):
        evaluate.read_results(path, names[:2])
