"""The config parser, the step grouping, and short end-to-end runs of train.py (schedules: test_schedules.py)."""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP

import evaluate
import pictures
import score
import shards
import strategies
import train
from conftest import run_train, train_in_process, train_refused
from checkpoints import load_checkpoint
from model import CLIP, clip_loss, forward_backward, make_config
from benchmark import tasks_of
from text import Tokenizer


def test_config_overrides_and_errors():
    cfg = train.parse_config(["--lr=1e-3", "--compile=false", "--strategy=sequential", "--budget_samples=1_000"])
    assert cfg.lr == 1e-3 and cfg.compile is False and cfg.strategy == "sequential"
    assert cfg.budget_samples == 1000 and isinstance(cfg.budget_samples, int)
    assert train.parse_config([]).lr == train.SETTINGS["lr"].default  # parsing never changes the defaults
    assert train.parse_config(["--lwf_weight=0.5"]).lwf_weight == 0.5  # a strategy's setting, declared with it
    assert train.parse_config(["--data_root=rel/data"]).data_root == os.path.abspath("rel/data")  # for evaluate --run
    with pytest.raises(SystemExit, match="unknown config key 'lrr'.*valid keys:.*batch_size"):
        train.parse_config(["--lrr=1"])
    with pytest.raises(SystemExit, match="--batch_size=big is not a int"):
        train.parse_config(["--batch_size=big"])
    with pytest.raises(SystemExit, match="is not a bool"):
        train.parse_config(["--compile=maybe"])
    with pytest.raises(SystemExit, match="bad argument"):
        train.parse_config(["lr=1"])


def test_parse_steps(tmp_path):
    for year in ["2014", "2015", "2016", "2017", "201801", "201802"]:
        os.makedirs(tmp_path / "train" / year)
    root = str(tmp_path)
    assert shards.parse_steps(root, "") == [["2014"], ["2015"], ["2016"], ["2017"], ["201801"], ["201802"]]
    assert shards.parse_steps(root, "2014-2016,2017,2018") == [["2014", "2015", "2016"], ["2017"], ["201801", "201802"]]
    assert shards.parse_steps(root, "201801,201802") == [["201801"], ["201802"]]
    with pytest.raises(SystemExit, match="step '2019' names no year folder"):
        shards.parse_steps(root, "2017,2019")


def tiny_args(root, run, strategy="sequential"):
    return [f"--data_root={root}", f"--out_dir={run}", f"--strategy={strategy}", "--budget_samples=256",
            "--batch_size=32", "--vocab_size=300", "--log_interval=4", "--workers=0", "--warmup_iters=2",
            "--warmup_iters_later=2", "--eval_batch=64"]


@pytest.mark.slow
def test_end_to_end_two_steps_writes_matrix_and_resumes(tmp_path, two_years):
    root, run = two_years, str(tmp_path / "run")
    out = run_train(tiny_args(root, run))
    assert "evaluation matrix" in out
    result = json.load(open(os.path.join(run, "eval_matrix.json")))
    assert result["steps"] == ["2018", "2019"] and result["tasks"] == ["2018", "2019"]
    assert len(result["matrix"]) == 2 and all(len(r) == 2 for r in result["matrix"])
    assert all(0 <= v <= 100 for r in result["matrix"] for v in r)
    assert result["results"]["2019"]["2018"]["gallery"] == 64
    assert len(result["classification"]["matrix"]) == 2 and result["results"]["2019"]["2018"]["class_samples"] == 32
    with Image.open(os.path.join(run, "eval_matrix.png")) as picture:  # what it shows: test_pictures.py
        assert picture.format == "PNG" and picture.tobytes() == pictures.run_picture(result, run).tobytes()
    assert sorted(f for f in os.listdir(run) if f.endswith(".pt")) == ["step01.pt", "step02.pt"]
    ckpt = torch.load(os.path.join(run, "step02.pt"), weights_only=True)
    assert ckpt["samples_seen"] == 256 and ckpt["config"]["strategy"] == "sequential"
    # checkpoint round trip: the saved model reproduces the evaluation that was logged
    model, record = load_checkpoint(os.path.join(run, "step02.pt"))
    assert record["step_name"] == "2019" and "model" not in record
    tok = Tokenizer.load(os.path.join(run, "tokenizer.json"))
    row = evaluate.evaluate_step(model, tasks_of(root, [["2018"], ["2019"]]), tok, torch.device("cpu"))
    assert row["2018"]["mean_R@1"] == pytest.approx(result["results"]["2019"]["2018"]["mean_R@1"])
    # a finished run rerun does nothing but report
    mtime = os.path.getmtime(os.path.join(run, "step02.pt"))
    again = run_train(tiny_args(root, run))
    assert again.count("done already") == 2 and "evaluation matrix" in again
    assert os.path.getmtime(os.path.join(run, "step02.pt")) == mtime  # not retrained, not rewritten


@pytest.mark.slow
def test_two_process_gloo_run_same_protocol(tmp_path, two_years):
    run = str(tmp_path / "run")
    out = run_train(tiny_args(two_years, run, strategy="cumulative-all"), nproc=2)
    assert "2 process(es) on cpu, global batch 32" in out
    result = json.load(open(os.path.join(run, "eval_matrix.json")))
    assert len(result["matrix"]) == 2
    ckpt = torch.load(os.path.join(run, "step02.pt"), weights_only=True)
    assert ckpt["samples_seen"] == 256  # the same global budget as one process: 8 iterations of 32


@pytest.mark.slow
def test_a_finished_run_grows_by_a_year_without_retraining(tmp_path, three_years):
    run = str(tmp_path / "run")
    run_train([*tiny_args(three_years, run), "--steps=2018,2019"])
    first = json.load(open(os.path.join(run, "eval_matrix.json")))
    mtimes = [os.path.getmtime(os.path.join(run, f"step0{i}.pt")) for i in (1, 2)]
    out = run_train([*tiny_args(three_years, run), "--steps=2018,2019,2020"])
    assert out.count("done already") == 2 and "step 3/3 (2020): warm start" in out
    assert [os.path.getmtime(os.path.join(run, f"step0{i}.pt")) for i in (1, 2)] == mtimes  # nothing retrained
    grown = json.load(open(os.path.join(run, "eval_matrix.json")))
    assert grown["steps"] == grown["tasks"] == ["2018", "2019", "2020"]
    assert len(grown["matrix"]) == 3 and all(len(row) == 3 and None not in row for row in grown["matrix"])
    assert [row[:2] for row in grown["matrix"][:2]] == first["matrix"]  # the old cells stay as they were
    # the new column of an old row is that old model on the new year's task
    tok = Tokenizer.load(os.path.join(run, "tokenizer.json"))
    model, _ = load_checkpoint(os.path.join(run, "step01.pt"))
    new_cell = evaluate.evaluate_step(model, tasks_of(three_years, [["2020"]]), tok, torch.device("cpu"))
    assert grown["matrix"][0][2] == pytest.approx(new_cell["2020"]["mean_R@1"])
    # evaluate.py --run gives the same matrix for the grown run, and draws it
    os.remove(os.path.join(run, "eval_matrix.png"))
    score.main([f"--run={run}", "--device=cpu"])
    assert json.load(open(os.path.join(run, "eval_matrix.json")))["matrix"] == grown["matrix"]
    assert Image.open(os.path.join(run, "eval_matrix.png")).format == "PNG"
    # steps that do not begin with the run's steps cannot be matched to its checkpoints by position
    line = train_refused([*tiny_args(three_years, run), "--steps=2019,2020"])
    assert "run.json belongs to a run of the steps 2018,2019,2020, which do not begin --steps=2019,2020" in line
    # nor can fewer steps: the third year's column would be read back as a static task, rewritten 2x2
    before = open(os.path.join(run, "eval_matrix.json")).read()
    line = train_refused([*tiny_args(three_years, run), "--steps=2018,2019"])
    assert "only its first 2 are named; a run grows by steps added at its end and never shrinks" in line
    assert open(os.path.join(run, "eval_matrix.json")).read() == before


def test_precision_setting_reaches_training_and_evaluation(tmp_path, two_years):
    weights = {}
    for precision in ("fp32", "bf16"):  # bf16 autocast runs on a CPU too, slowly
        run = str(tmp_path / precision)
        train_in_process([*tiny_args(two_years, run), "--steps=2018", "--budget_samples=64",
                          f"--precision={precision}"])
        ckpt = torch.load(os.path.join(run, "step01.pt"), weights_only=True)
        assert ckpt["config"]["precision"] == precision and all(v.dtype == torch.float32 for v in ckpt["model"].values())
        weights[precision] = ckpt["model"]
    assert any(not torch.equal(weights["fp32"][k], weights["bf16"][k]) for k in weights["fp32"])
    model, _ = load_checkpoint(os.path.join(tmp_path, "fp32", "step01.pt"))
    tok = Tokenizer.load(os.path.join(tmp_path, "fp32", "tokenizer.json"))
    shards = tasks_of(two_years, [["2018"]])["2018"].retrieval
    cpu = torch.device("cpu")
    img32, _ = evaluate.embed_pairs(model, shards, tok, cpu, precision="fp32")
    img16, _ = evaluate.embed_pairs(model, shards, tok, cpu, precision="bf16")
    assert not torch.equal(img32, img16) and torch.nn.functional.cosine_similarity(img32, img16).min() > 0.99
    with pytest.raises(SystemExit, match="unknown precision 'fp16'"):
        train.check_config(train.parse_config(["--precision=fp16"]))


def test_a_run_on_streamed_shards_equals_one_on_local_shards(tmp_path, two_years):
    for name, extra in (("local", []), ("streamed", [f"--shard_cmd=cat {two_years}/{{path}}"])):
        train_in_process([*tiny_args(two_years, str(tmp_path / name)), "--steps=2018", "--budget_samples=64", *extra])
    local, streamed = (torch.load(tmp_path / name / "step01.pt", weights_only=True) for name in ("local", "streamed"))
    assert all(torch.equal(local["model"][k], streamed["model"][k]) for k in local["model"])
    matrices = [json.load(open(tmp_path / name / "eval_matrix.json"))["results"] for name in ("local", "streamed")]
    assert matrices[0] == matrices[1]
    with pytest.raises(SystemExit, match="--shard_cmd=cat x.tar is not valid; use a command with {path} in it"):
        train.check_config(train.parse_config(["--shard_cmd=cat x.tar"]))


# ----------------------------------------------------------------------------- gradient accumulation
def tiny_clip(seed=0):
    torch.manual_seed(seed)
    return CLIP(make_config("tiny", vocab_size=64, eot_token_id=2)).train()


def random_pairs(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 64, (n, 24), generator=g)
    tokens[:, 12] = 2  # end of text
    return torch.randn(n, 3, 32, 32, generator=g), tokens


def loss_and_grads(model, train_model, images, tokens, accum_steps, world, extra_loss=None, loss_fn=clip_loss):
    """The loss and gradients forward_backward gives, as train.py calls it: the run's loss and a strategy's term."""
    model.zero_grad(set_to_none=True)
    batch = {"images": images, "tokens": tokens}

    def loss_of(out):
        loss = loss_fn(**out, rank=world.rank, world_size=world.size)
        return loss if extra_loss is None else loss + extra_loss(batch, out)
    loss = forward_backward(train_model, images, tokens, loss_of, accum_steps, "fp32")
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


class WeightTerm:
    """A batch loss on the weights alone (as EWC's or an L2 pull to the previous model): 0.5 sum (w - w0)^2."""
    flops_per_sample = 0

    def __init__(self, model, scale=1.0):
        self.params = dict(model.named_parameters())
        self.anchor = {k: p.detach() + 0.01 * torch.randn_like(p) for k, p in self.params.items()}
        self.scale = scale

    def __call__(self, batch, out):
        return self.scale * 0.5 * sum(((p - self.anchor[k]) ** 2).sum() for k, p in self.params.items())


class MixedTerm(WeightTerm):
    """A term through the weights and the features at once: the weight term times the features' mean."""

    def __call__(self, batch, out):
        return super().__call__(batch, out) * (1 + (out["image_features"] * out["text_features"]).sum(-1).mean())


def batch_losses(model):
    """A feature term (lwf's distillation), a weight term and a mix of both, each with its name."""
    torch.manual_seed(3)
    step = strategies.TimeStep(1, ["a", "b"], [], train.parse_config(["--lwf_weight=0.7"]), None,
                               train.World(0, 1, False, torch.device("cpu")), previous=tiny_clip(seed=5).state_dict())
    return {"none": None, "features (lwf)": strategies.Distillation(model, step), "weights": WeightTerm(model, 5.0),
            "both": MixedTerm(model, 0.05)}


def test_accumulated_micro_batches_give_the_gradients_of_the_whole_batch():
    """Whatever accum_steps is, a batch loss adds one batch's gradient: through the features, through the weights
    (a term on the weights alone got k times its gradient when it was called once per micro-batch), or both."""
    model, one = tiny_clip(), train.World(0, 1, False, torch.device("cpu"))
    images, tokens = random_pairs(16)
    for name, batch_loss in batch_losses(model).items():
        whole, whole_grads = loss_and_grads(model, model, images, tokens, 1, one, batch_loss)
        for k in (2, 4):
            loss, grads = loss_and_grads(model, model, images, tokens, k, one, batch_loss)
            assert loss.item() == pytest.approx(whole.item(), abs=1e-6), (name, k)
            for param, grad in grads.items():  # the logit scale's included: once, not k times
                torch.testing.assert_close(grad, whole_grads[param], rtol=1e-4, atol=1e-6, msg=f"{name} {k} {param}")


def test_a_batch_loss_is_called_once_a_batch_with_the_whole_batch():
    model, one = tiny_clip(), train.World(0, 1, False, torch.device("cpu"))
    images, tokens = random_pairs(16)
    calls = []
    record = lambda batch, out: calls.append((len(batch["images"]), len(out["image_features"]))) or 0.0  # noqa
    for k in (1, 2, 4):
        calls.clear()
        loss_and_grads(model, model, images, tokens, k, one, record)
        assert calls == [(16, 16)], k


def _accumulating_worker(rank, world_size, tmp, images, tokens, accum_steps):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous{accum_steps}", rank=rank,
                            world_size=world_size)
    model = tiny_clip()
    local = images.shape[0] // world_size
    part = slice(rank * local, (rank + 1) * local)
    world = train.World(rank, world_size, True, torch.device("cpu"))
    torch.manual_seed(7)  # the same anchor on every rank
    loss, grads = loss_and_grads(model, DDP(model), images[part], tokens[part], accum_steps, world,
                                 WeightTerm(model, 5.0))
    torch.save({"loss": loss, "grads": grads}, f"{tmp}/rank{rank}-accum{accum_steps}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_accumulation_under_two_process_ddp_gives_the_whole_batch_gradients(tmp_path):
    """With a batch loss on the weights too: each rank adds it once, and the all-reduce averages equal terms."""
    images, tokens = random_pairs(16)
    model = tiny_clip()
    torch.manual_seed(7)
    _, whole_grads = loss_and_grads(model, model, images, tokens, 1, train.World(0, 1, False, torch.device("cpu")),
                                    WeightTerm(model, 5.0))
    for k in (1, 4):  # 2 processes x 8 pairs, in 1 or 4 micro-batches each
        mp.spawn(_accumulating_worker, args=(2, str(tmp_path), images, tokens, k), nprocs=2, join=True)
        for rank in (0, 1):
            grads = torch.load(tmp_path / f"rank{rank}-accum{k}.pt")["grads"]
            for name, grad in grads.items():  # all-reduced once, after the last micro-batch: as one process
                torch.testing.assert_close(grad, whole_grads[name], rtol=1e-4, atol=1e-6, msg=name)
