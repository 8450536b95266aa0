"""Existing CLIP models: OpenCLIP and OpenAI state dicts load into our model and give open_clip's embeddings;
attention heads of any width load right; TorchScript archives are read without running anything in them;
our CLIP tokenizer gives open_clip's token ids, also on 300 varied captions (mojibake, HTML escaped several times,
surrogates, ...); our image preprocessing is open_clip's for every image mode; evaluate.py --checkpoint scores a
model as open_clip would.

Needs open-clip-torch (test-only: pip install -r requirements-test.txt), for random-weight models and
CLIP's vocabulary file that ships inside it; no pretrained weights are downloaded. Nothing here skips.

    python -m pytest -q tests/test_openclip.py
"""
import html
import json
import os
import pickle
import random
import subprocess
import sys
import zipfile

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import evaluate
import pictures
import prepare
import score
import shards
import synthetic
import text
from checkpoints import load_checkpoint, load_openclip_state_dict, openclip_config, read_torchscript
from conftest import REPO, train_in_process
from model import make_config
from text import Tokenizer


def openclip_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return open_clip.create_model(name, pretrained=None).eval()


def tiny_openclip(quick_gelu: bool = False, seed: int = 0):
    """A small OpenCLIP ViT with CLIP's vocabulary (heads = width / 64, as OpenCLIP's configs): instant to run."""
    torch.manual_seed(seed)
    return open_clip.CLIP(embed_dim=64, vision_cfg=dict(image_size=32, patch_size=8, width=128, layers=2),
                          text_cfg=dict(context_length=16, vocab_size=49408, width=128, heads=2, layers=2),
                          quick_gelu=quick_gelu).eval()


def assert_same_embeddings(theirs, ours, image_px, context_tokens, batch=2):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, image_px, image_px, generator=g)
    tokens = open_clip.tokenize(["a photo of a cat", "Two dogs playing in the snow, 2021!"][:batch], context_tokens)
    with torch.no_grad():
        diff_image = (theirs.encode_image(images) - ours.encode_image(images)).abs().max().item()
        diff_text = (theirs.encode_text(tokens) - ours.encode_text(tokens)).abs().max().item()
        scale = ours.encode_image(images).abs().max().item()
    assert scale > 0.1  # a real signal, not two zeros
    assert diff_image < 1e-5 and diff_text < 1e-5, (diff_image, diff_text)
    assert torch.equal(theirs.logit_scale, ours.logit_scale)
    return images


# ----------------------------------------------------------------------------- the model
@pytest.mark.parametrize("name, quick_gelu, preset", [("ViT-B-32", False, "ViT-B-32"),
                                                       ("ViT-B-32-quickgelu", True, "ViT-B-32"),  # OpenAI's
                                                       ("ViT-S-16", False, "ViT-S-16"),
                                                       ("ViT-B-16", False, "ViT-B-16")])
def test_openclip_state_dict_gives_the_same_embeddings(name, quick_gelu, preset):
    theirs = openclip_model(name)
    state_dict = theirs.state_dict()
    cfg = openclip_config(state_dict, quick_gelu)
    assert cfg == make_config(preset, quick_gelu=quick_gelu)  # the shapes read back are our preset's
    if quick_gelu:  # OpenAI's TorchScript state dicts also hold these ints
        state_dict = {**state_dict, "input_resolution": torch.tensor(224), "context_length": torch.tensor(77),
                      "vocab_size": torch.tensor(49408)}
    ours = load_openclip_state_dict(state_dict, cfg)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in ours.parameters())
    images = assert_same_embeddings(theirs, ours, 224, 77)
    if preset == "ViT-S-16":  # the activation matters: the other one gives other embeddings
        other = load_openclip_state_dict(state_dict, openclip_config(state_dict, not quick_gelu))
        with torch.no_grad():
            assert (other.encode_image(images) - theirs.encode_image(images)).abs().max() > 1e-3


def test_unmatched_keys_and_shapes_are_listed_both_ways():
    state_dict = tiny_openclip().state_dict()
    cfg = openclip_config(state_dict, False)
    broken = {k: v for k, v in state_dict.items() if k != "visual.ln_post.bias"}
    broken["visual.extra.weight"] = torch.zeros(3)
    broken["ln_final.weight"] = torch.ones(7)
    with pytest.raises(SystemExit) as e:
        load_openclip_state_dict(broken, cfg)
    message = str(e.value)
    assert "checkpoint keys we do not use (1): visual.extra.weight" in message
    assert "keys our model needs but the checkpoint lacks (1): visual.ln_post.bias" in message
    assert "ln_final.weight (7,) -> ln_final.weight (128,)" in message
    with pytest.raises(SystemExit, match="not a ViT CLIP state dict"):
        openclip_config({"visual.layer1.0.conv1.weight": torch.zeros(1)}, False)  # a ResNet CLIP


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")  # from tracing OpenAI-style
def test_checkpoint_files_of_every_kind(tmp_path):
    theirs = tiny_openclip(quick_gelu=True)
    state_dict = theirs.state_dict()
    training = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state_dict.items()}}  # OpenCLIP's training
    torch.save(state_dict, tmp_path / "plain.pt")
    torch.save(training, tmp_path / "epoch_3.pt")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state_dict.items() if k != "attn_mask"}, str(tmp_path / "m.safetensors"))
    for path in ("plain.pt", "epoch_3.pt", "m.safetensors"):
        assert_same_embeddings(theirs, load_checkpoint(str(tmp_path / path), quick_gelu=True)[0], 32, 16)
    # OpenAI ships TorchScript archives: QuickGELU is then the default
    traced = torch.jit.trace(theirs, (torch.zeros(1, 3, 32, 32), open_clip.tokenize(["a"], 16)), check_trace=False)
    traced.save(str(tmp_path / "openai.pt"))
    ours, record = load_checkpoint(str(tmp_path / "openai.pt"))
    assert ours.cfg.quick_gelu
    assert_same_embeddings(theirs, ours, 32, 16)
    with pytest.raises(SystemExit, match="no such checkpoint"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(SystemExit, match="junk.pt: not a readable torch checkpoint"):
        load_checkpoint(str(tmp_path / "junk.pt"))


def openclip_with_heads(vision_width: int, head_width: int, text_width: int, text_heads: int,
                        layers: int = 2, image_px: int = 32, patch_px: int = 8, **text_settings):
    """A random open_clip ViT CLIP with image heads head_width wide and text_heads text heads (and
    text_settings in its text_cfg: pool_type, ...), and its model config as an
    open_clip_config.json holds it."""
    torch.manual_seed(0)
    vision = dict(image_size=image_px, patch_size=patch_px, width=vision_width,
                  head_width=head_width, layers=layers)
    text = dict(context_length=16, vocab_size=49408, width=text_width, heads=text_heads,
                layers=layers, **text_settings)
    model_cfg = {"embed_dim": 64, "vision_cfg": vision, "text_cfg": text}
    return open_clip.CLIP(**model_cfg).eval(), model_cfg


@pytest.mark.parametrize("head_width, width", [(32, 128), (80, 320)])  # guessed: 2 and 5 heads
def test_heads_other_than_64_wide_come_from_the_config_beside_or_the_setting_or_a_stated_guess(
        tmp_path, capsys, head_width, width):
    import export
    heads = (width // head_width, width // head_width)
    theirs, model_cfg = openclip_with_heads(width, head_width, width, heads[1])
    path = _saved(tmp_path, theirs)
    guessed, _ = load_checkpoint(path)  # no config beside, no open_clip model of these widths
    note = capsys.readouterr().out
    assert f"64 wide (no open_clip model has its widths, {width} image, {width} text)" in note
    assert "pass --heads=IMAGE,TEXT" in note
    assert (guessed.cfg.vision_heads, guessed.cfg.text_heads) != heads
    with torch.no_grad():  # the guess is wrong here, which the line says may be
        images = torch.randn(2, 3, 32, 32)
        assert (guessed.encode_image(images) - theirs.encode_image(images)).abs().max() > 1e-3
    assert_same_embeddings(theirs, load_checkpoint(path, heads=heads)[0], 32, 16)  # --heads
    with pytest.raises(SystemExit, match="7 attention heads do not divide the image tower's width"):
        load_checkpoint(path, heads=(7, 1))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    assert_same_embeddings(theirs, load_checkpoint(path)[0], 32, 16)  # the config beside names them
    assert "attention heads" not in capsys.readouterr().out
    export.main([path, f"--out={tmp_path / 'exported'}"])  # and export writes them back
    written = json.load(open(tmp_path / "exported" / "open_clip_config.json"))["model_cfg"]
    assert written["vision_cfg"]["head_width"] == head_width
    assert written["text_cfg"]["heads"] == heads[1]
    exported = open_clip.create_model(f"local-dir:{tmp_path / 'exported'}").eval()
    assert_same_embeddings(theirs, exported, 32, 16)


def test_an_open_clip_shape_with_80_wide_image_heads_is_known_by_its_widths(tmp_path, capsys):
    theirs, _ = openclip_with_heads(1280, 80, 1024, 16, layers=1, image_px=28, patch_px=14)  # ViT-H
    ours, _ = load_checkpoint(_saved(tmp_path, theirs))
    assert (ours.cfg.vision_heads, ours.cfg.text_heads) == (16, 16)
    assert ("assuming 16 image and 16 text heads, those of open_clip's model of its widths "
            "(1280 image, 1024 text)") in capsys.readouterr().out  # assumed, so said
    assert_same_embeddings(theirs, ours, 28, 16)


def test_vit_b_widths_with_32_wide_heads_and_no_config_name_the_heads_assumed(tmp_path, capsys):
    import export
    theirs, _ = openclip_with_heads(768, 32, 512, 16, layers=1, patch_px=16)  # 24 and 16 heads
    path = _saved(tmp_path, theirs)
    guessed, _ = load_checkpoint(path)  # widths open_clip's ViT-B has, with 12 and 8 heads
    note = capsys.readouterr().out
    assert "no open_clip_config.json beside it says its attention heads" in note
    assert "assuming 12 image and 8 text heads" in note and "pass --heads=IMAGE,TEXT" in note
    with torch.no_grad():  # the assumption is wrong here, which the note says it may be
        tokens = open_clip.tokenize(["a photo of a cat"], 16)
        assert (guessed.encode_text(tokens) - theirs.encode_text(tokens)).abs().max() > 1e-3
    assert_same_embeddings(theirs, load_checkpoint(path, heads=(24, 16))[0], 32, 16)
    export.main([path, f"--out={tmp_path / 'exported'}", "--heads=24,16"])  # what was loaded
    written = json.load(open(tmp_path / "exported" / "open_clip_config.json"))["model_cfg"]
    assert (written["vision_cfg"]["head_width"], written["text_cfg"]["heads"]) == (32, 16)
    assert_same_embeddings(theirs, open_clip.create_model(f"local-dir:{tmp_path / 'exported'}"),
                           32, 16)


def test_the_heads_setting_is_checked(tmp_path):
    import train
    with pytest.raises(SystemExit, match="--heads=16: use auto, or the attention heads of the"):
        train.check_config(train.parse_config(["--heads=16"]))
    with pytest.raises(SystemExit, match="--heads=0,8: use auto"):
        score.main([f"--checkpoint={tmp_path}", "--tokenizer=t", "--data_root=d", "--heads=0,8"])


@pytest.mark.parametrize("text_settings", [dict(pool_type="last", no_causal_mask=True),  # CLIPA's
                                           dict(pool_type="eos", eos_id=1),  # the -worldwide ones'
                                           dict(pool_type="last"), dict(no_causal_mask=True)])
def test_text_pooling_eos_id_and_causal_mask_are_read_from_the_config_beside(tmp_path,
                                                                            text_settings):
    import export
    theirs, model_cfg = openclip_with_heads(128, 64, 128, 2, **text_settings)
    path = _saved(tmp_path, theirs)
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    ours, _ = load_checkpoint(path)
    tokens = torch.randint(3, 49406, (3, 16), generator=torch.Generator().manual_seed(1))
    eot = text_settings.get("eos_id", 49407)  # as a tokenizer makes them: end-of-text, padding
    tokens[:, 0], tokens[:, 7], tokens[:, 8:] = 49406, eot, 0
    sd = theirs.state_dict()
    unread = load_openclip_state_dict(sd, openclip_config(sd, False))  # the settings left unread
    with torch.no_grad():
        assert (unread.encode_text(tokens) - theirs.encode_text(tokens)).abs().max() > 1e-3
        assert (ours.encode_text(tokens) - theirs.encode_text(tokens)).abs().max() < 1e-5
    export.main([path, f"--out={tmp_path / 'exported'}"])  # written back as read
    exported = open_clip.create_model(f"local-dir:{tmp_path / 'exported'}").eval()
    with torch.no_grad():
        assert (exported.encode_text(tokens) - theirs.encode_text(tokens)).abs().max() < 1e-5


@pytest.mark.parametrize("section, setting, refusal", [
    ("text_cfg", {"pool_type": "first"}, 'text_cfg.pool_type="first": this project\'s CLIP'),
    ("vision_cfg", {"pool_type": "avg"}, 'vision_cfg.pool_type="avg": this project\'s CLIP'),
    ("text_cfg", {"act_kwargs": {"approximate": "tanh"}}, 'text_cfg.act_kwargs={"approximate"'),
    ("text_cfg", {"norm_kwargs": {"eps": 1e-6}}, 'text_cfg.norm_kwargs={"eps": 1e-06}'),
    ("vision_cfg", {"width": 768}, "vision_cfg.width=768, but the weights beside it have 128"),
    ("text_cfg", {"rope": True}, "text_cfg.rope=true is a setting this loader does not know"),
    ("preprocess_cfg", {"mean": [0.5] * 3}, "preprocess_cfg.mean=[0.5, 0.5, 0.5]: evaluate.py")])
def test_a_config_setting_our_clip_cannot_follow_is_refused_in_a_line_naming_it(
        tmp_path, section, setting, refusal):
    theirs, model_cfg = openclip_with_heads(128, 64, 128, 2, layers=1)
    config = {"model_cfg": model_cfg, "preprocess_cfg": {}}
    (config if section == "preprocess_cfg" else model_cfg)[section].update(setting)
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as refused:
        load_checkpoint(_saved(tmp_path, theirs))
    assert str(refused.value).startswith(f"error: {tmp_path / 'open_clip_config.json'}: {refusal}")
    assert "\n" not in str(refused.value)


# ------------------------------------------------------------------- archives that would run code
class BuffersOfEveryKind(torch.nn.Module):
    """float16 and int64 tensors, a bias-less Linear, and a buffer that is a strided view."""
    ints: list[int]  # a typed list, which TorchScript pickles through a helper

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 4, bias=False).half()
        self.register_buffer("table", torch.arange(12).view(3, 4))
        self.register_buffer("column", self.table.t()[1:])  # an offset into a shared storage
        self.ints = [1, 2]

    def forward(self, x):
        return self.linear(x) + self.column.sum()


class WritesAFile(torch.nn.Module):
    """A module whose __setstate__, which torch.jit.load runs, maps a file it names, creating it."""

    def __init__(self, path: str):
        super().__init__()
        self.path, self.mapped = path, torch.zeros(1)

    def forward(self, x):
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return self.path, self.training

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.path, self.training = state
        self.mapped = torch.from_file(self.path, shared=True, size=16)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
def test_a_torchscript_archive_gives_jit_loads_weights_without_running_it(tmp_path, monkeypatch):
    theirs = tiny_openclip(quick_gelu=True)
    traced = torch.jit.trace(theirs, (torch.zeros(1, 3, 32, 32), open_clip.tokenize(["a"], 16)),
                             check_trace=False)
    traced.save(str(tmp_path / "openai.pt"))
    torch.jit.script(BuffersOfEveryKind()).save(str(tmp_path / "kinds.pt"))
    jit = {name: torch.jit.load(str(tmp_path / name)).state_dict()
           for name in ("openai.pt", "kinds.pt")}
    for name, expected in jit.items():
        got = read_torchscript(str(tmp_path / name))
        assert list(got) == list(expected)
        assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in expected.items())
    monkeypatch.setattr(torch.jit, "load", None)  # the loader must not need it
    ours, _ = load_checkpoint(str(tmp_path / "openai.pt"))
    before = load_openclip_state_dict(jit["openai.pt"], ours.cfg)  # as the torch.jit.load path gave
    assert all(torch.equal(v, before.state_dict()[k]) for k, v in ours.state_dict().items())


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script's: the archive is the point
def test_an_archive_made_to_write_a_file_writes_nothing_and_is_refused_in_a_line(tmp_path,
                                                                                  clip_tokenizer):
    written = tmp_path / "written"
    torch.jit.script(WritesAFile(str(written))).save(str(tmp_path / "evil.pt"))
    clip_tokenizer.save(str(tmp_path / "tok.json"))
    root = str(tmp_path / "bench")
    synthetic.make_synthetic_benchmark(root, years=(2020,), train_samples_per_year=4,
                                       eval_samples_per_year=4, classification_samples_per_year=0,
                                       samples_per_shard=4, static_samples=4)
    with pytest.raises(SystemExit) as evaluated:
        score.main([f"--checkpoint={tmp_path}/evil.pt", f"--tokenizer={tmp_path}/tok.json",
                       f"--data_root={root}", "--device=cpu"])
    with pytest.raises(SystemExit) as trained:
        train_in_process([f"--data_root={root}", f"--out_dir={tmp_path}/run", "--workers=0",
                          f"--init={tmp_path}/evil.pt", f"--tokenizer={tmp_path}/tok.json"])
    assert not written.exists()
    for refusal in (evaluated, trained):
        assert "evil.pt: refused: this TorchScript archive needs __torch__" in str(refusal.value)
        assert "WritesAFile.__setstate__ to be rebuilt" in str(refusal.value)
        assert "\n" not in str(refusal.value)
    # a pickle that calls a function of its own choosing is refused by name, before the call
    class Touch:
        def __reduce__(self):
            return os.system, (f"touch {written}",)
    with zipfile.ZipFile(tmp_path / "calls.pt", "w") as archive:
        archive.writestr("calls/data.pkl", pickle.dumps(Touch(), protocol=2))
        archive.writestr("calls/constants.pkl", pickle.dumps((), protocol=2))
    with pytest.raises(SystemExit, match=r"calls.pt: refused: .* archive needs (posix|os)\.system"):
        load_checkpoint(str(tmp_path / "calls.pt"))
    assert not written.exists()


# ----------------------------------------------------------------------------- image preprocessing
def images_of_every_mode(W: int, H: int, seed: int = 0) -> dict[str, Image.Image]:
    """Random W x H images in every mode that JPEG, PNG and WebP decode to, and PA."""
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
    alpha = Image.fromarray(rng.integers(0, 256, (H, W), dtype=np.uint8))
    rgba, la = rgb.convert("RGBA"), rgb.convert("LA")
    rgba.putalpha(alpha)
    la.putalpha(alpha)
    return {"RGB": rgb, "P": rgb.quantize(64), "PA": rgb.quantize(64).convert("PA"), "RGBA": rgba, "LA": la,
            "L": rgb.convert("L"), "CMYK": rgb.convert("CMYK"), "1": rgb.convert("1"),
            "I;16": Image.fromarray(rng.integers(0, 2 ** 16, (H, W)).astype(np.uint16))}


def test_eval_preprocessing_is_open_clips_for_every_image_mode():
    """open_clip resizes in the image's mode and converts to RGB after: Pillow resizes a palette image by its nearest
    pixel and premultiplies alpha. (Pillow drops a PA image's palette as it resizes: black, for both.)"""
    px = 224
    ours, theirs = data.ImageTransform(px, train=False), open_clip.image_transform(px, is_train=False)
    converted_first = {}  # the largest difference, where RGB came first (as before)
    for W, H in [(97, 61), (61, 97), (px, px)]:
        for mode, img in images_of_every_mode(W, H).items():
            assert img.mode == mode
            diff = (data.normalize_images(ours(img)) - theirs(img)).abs().max().item()
            assert diff < 1e-5, (mode, W, H, diff)
            before = (data.normalize_images(ours(img.convert("RGB"))) - theirs(img)).abs().max()
            converted_first[mode] = max(converted_first.get(mode, 0.0), before.item())
    said = {"P": 2.8, "RGBA": 3.7, "LA": 3.5, "I;16": 3.8}  # docs/data.md's "Before, ..."
    assert {mode: round(converted_first[mode], 1) for mode in said} == said


def test_eval_resize_rounds_the_long_side_as_torchvision():
    px, sides = 224, (45, 49, 99, 223, 225, 277, 301, 554)
    sizes = [(W, H) for W in sides for H in sides]
    # the grid holds sizes where int(long * (px / short)) is one less than torchvision's int(px * long / short)
    assert sum(int(max(s) * (px / min(s))) != int(px * max(s) / min(s)) for s in sizes) == 4
    assert int(554 * (px / 277)) == int(px * 554 / 277) - 1  # docs/data.md's example, 277x554
    # and the share of the sizes up to 1024x2048 it made a pixel short, at 32 and 224 px (%)
    W, H = np.meshgrid(np.arange(1.0, 1025), np.arange(1.0, 2049), indexing="ij")
    short, long = np.minimum(W, H), np.maximum(W, H)
    shares = {p: 100 * (np.floor(long * (p / short)) != np.floor(p * long / short)).mean()
              for p in (32, 224)}
    assert {p: round(share, 2) for p, share in shares.items()} == {32: 0.02, 224: 0.07}
    ours, theirs = data.ImageTransform(px, train=False), open_clip.image_transform(px, is_train=False)
    rng = np.random.default_rng(0)
    for W, H in sizes:
        img = Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
        diff = (data.normalize_images(ours(img)) - theirs(img)).abs().max().item()
        assert diff < 1e-5, (W, H, diff)


def test_training_crop_converts_to_rgb_where_open_clip_does(monkeypatch):
    """Given the same crop box, open_clip crops, resizes and then converts to RGB. Pillow resizes palette and bilevel
    images by their nearest pixel, so their crops are open_clip's; other modes resize bicubic over the box (the
    pixels beyond its edges too) where open_clip crops first, except for a box that is the whole image: an image too
    long for any crop of 0.9-1 of its area at ratio 3/4-4/3. There every mode is open_clip's."""
    from torchvision.transforms import RandomResizedCrop
    px = 32
    ours, theirs = data.ImageTransform(px, train=True), open_clip.image_transform(px, is_train=True)
    cases = [(img, seed) for seed in range(3) for mode, img in images_of_every_mode(70, 64).items()
             if mode in ("P", "1")]
    cases += [(img, 0) for img in images_of_every_mode(97, 61).values()]
    for img, seed in cases:
        left, top, right, bottom = box = ours.crop_box(*img.size, np.random.default_rng(seed))
        assert box == (0, 0, 97, 61) if img.size == (97, 61) else box != (0, 0, 70, 64)
        monkeypatch.setattr(RandomResizedCrop, "get_params",
                            staticmethod(lambda *_, box=box: (box[1], box[0], box[3] - box[1], box[2] - box[0])))
        diff = (data.normalize_images(ours(img, np.random.default_rng(seed))) - theirs(img)).abs().max().item()
        assert diff < 1e-5, (img.mode, img.size, box, diff)


# ----------------------------------------------------------------------------- the tokenizer
CAPTIONS = [
    "A photo of a cat.", "  Two   dogs\tplaying\n in the   snow!!!  ", "It's 2021: what's 3.14 + 42?",
    "don't won't I'll we've they're I'm he'd", "DON'T SHOUT", "Café naïve Zürich résumé", "e\u0301cole (decomposed)",
    "東京タワー at night", "नमस्ते दुनिया", "مرحبا بالعالم", "ΟΔΥΣΣΕΥΣ σοφός", "İstanbul",
    "🐱🐶 emoji party 🎉🎉 👍🏽",
    "ＬＯＵＤ　ＮＯＩＳＥＳ", "ﬂuﬃest ﬁsh", "“curly” ‘quotes’ ʼn",
    "AT&amp;T &lt;3 &quot;quoted&quot; &amp;amp;",
    "\x00\x07control\x7f chars\u200b", "hello-world_foo/bar\\baz @user #hashtag", "12345678901234567890",
    "price: $1,299.99 (50% off!)", "e-mail: someone@example.com; url: https://example.com/a?b=c",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "!!!!!!!!!!????....", "a<start_of_text>b<end_of_text>", "",
    "   ", "x" * 300, "word " * 100, "The quick brown fox jumps over the lazy dog " * 8,
    "naïve\u00a0nbsp\u2003em space",
    "tab\tnew\nline\r\ncarriage", "Ǆemal Ĳssel", "½ ¼ ² ³ ™ © ®", "ÆØÅ æøå ß", "a photo of a {}.",
]


@pytest.fixture(scope="module")
def clip_tokenizer():
    return Tokenizer(prepare.clip_tokenizer(prepare.default_bpe()))


def test_clip_tokenizer_gives_open_clips_ids(clip_tokenizer):
    assert clip_tokenizer.vocab_size == 49408 and (clip_tokenizer.sot_id, clip_tokenizer.eot_id) == (49406, 49407)
    for context in (77, 16):  # 16: many captions are cut, keeping eot last
        expected = open_clip.tokenize(CAPTIONS, context_length=context)
        got = clip_tokenizer(CAPTIONS, context)
        bad = [c for c, a, b in zip(CAPTIONS, expected, got) if not torch.equal(a, b)]
        assert not bad, bad
    assert (got[:, -1] == 49407).sum() > 5  # truncation happened


def test_char_fixes_are_ftfys():
    import ftfy.chardata as chardata  # installed with open_clip
    from ftfy.fixes import fix_c1_controls
    quotes = {ord(c): "'" for c in "\u02bc\u2018\u2019\u201a\u201b"} | {ord(c): '"' for c in "\u201c\u201d\u201e\u201f"}
    c1 = {i: fix_c1_controls(chr(i)).translate(quotes) for i in range(0x80, 0xA0) if fix_c1_controls(chr(i)) != chr(i)}
    theirs = {**chardata.WIDTH_MAP, **chardata.CONTROL_CHARS, **quotes,
              **{k: v.translate(quotes) for k, v in chardata.LIGATURES.items()}, **c1}
    assert len(c1) == 27 and text.CHAR_FIXES == theirs  # Windows-1252 leaves 5 of the 32 undefined


def varied_captions() -> list[str]:
    """300 captions as web data holds them, built deterministically: plain ones, and the damage CLIP's cleaning
    repairs (mojibake, HTML escaped several times, C1 controls, ANSI escapes, surrogates), with emoji, CJK,
    accents and other scripts."""
    rng = random.Random(30)
    subjects = ["a dog", "Two cats", "an old man", "the Eiffel Tower", "A red car", "my kids", "a bowl of ramen",
                "Street art", "the team", "A wooden table", "sunflowers", "an iPhone 12", "the U.S. Open",
                "a 3D-printed vase", "Grandma's kitchen"]
    verbs = ["sitting on", "in front of", "next to", "running through", "painted on", "for sale at", "at", "under",
             "waiting for", "covered in"]
    places = ["the beach", "a snowy street", "Times Square", "the kitchen table", "sunset", "the rain",
              "Paris, France", "a farmers' market", "the 2019 World Cup", "a window"]
    tails = ["", ".", "!", " #travel #photo", " (stock photo)", " - 4K wallpaper", " | Getty Images", " on Instagram",
             " 😍", ", 1920x1080", " ...", " @user"]
    plain = []
    while len(plain) < 143:
        text = " ".join(rng.choice(words) for words in (subjects, verbs, places)) + rng.choice(tails)
        plain += [text] if text not in plain else []
    plain += ["It's 2021: what's 3.14 + 42?", "don't won't I'll we've they're I'm he'd", "price: $1,299.99 (50% off!)",
              "e-mail me@example.com, https://example.com/a?b=c", "hello-world_foo/bar\\baz", "#tbt #nofilter #sunset",
              "SALE!!! 70% OFF!!!", "", "   ", "x" * 300, "word " * 100, "a photo of a {}.", "<b>bold</b> & <i>it</i>",
              "1 < 2 and 3 > 2", "AT&T and H&M, R&D", "tab\tnew\nline\r\ncarriage", "a<start_of_text>b<end_of_text>"]
    accents = ["Café naïve Zürich résumé", "crème brûlée à la carte", "Straße über Köln", "niño año señor, ¿qué?",
               "São João coração", "Łódź żółć źdźbło", "Příliš žluťoučký", "İstanbul'da güzel şişe",
               "Tiếng Việt có dấu", "Þórsmörk ævintýri", "e\u0301cole de\u0301compose\u0301e", "ÆØÅ æøå ß",
               "FRANÇAIS ÉTÉ À L'ÉCOLE", "Ångström Ørsted", "Dvořák's Šárka", "Ελληνικά ΟΔΥΣΣΕΥΣ σοφός",
               "Привет, мир! Москва 2020", "Київ і Львів", "«Пример» — тест", "Mañana en Málaga", "Ærøskøbing havn",
               "Dziękuję bardzo"]
    scripts = ["東京タワー at night", "北京烤鸭 Peking duck", "서울의 밤 풍경", "ひらがなとカタカナ", "नमस्ते दुनिया",
               "مرحبا بالعالم", "שלום עולם", "สวัสดีชาวโลก", "გამარჯობა", "Բարեւ աշխարհ", "வணக்கம் உலகம்",
               "ᚠᚢᚦᚨᚱᚲ runes", "𝔉𝔯𝔞𝔨𝔱𝔲𝔯 math letters", "中文，标点。", "日本語の「引用」です",
               "Ιαπωνία και Κίνα 2022", "ภาษาไทย ๑๒๓", "كتاب ٣ جديد"]
    emoji = ["🐱🐶 emoji party 🎉🎉", "👍🏽 thumbs up", "👨‍👩‍👧‍👦 family", "🇫🇷🇯🇵 flags", "1️⃣ keycap", "❤️ love ☀️",
             "🏴󠁧󠁢󠁷󠁬󠁳󠁿 Wales", "🤷‍♀️ shrug", "😀😃😄😁", "🎂 happy birthday 🎈", "☕️ coffee time", "🧑🏿‍🚀 astronaut"]
    width = ["ＬＯＵＤ　ＮＯＩＳＥＳ", "ﬂuﬃest ﬁsh", "“curly” ‘quotes’ ʼn", "Ǆemal Ĳssel", "ﾊﾝｶｸ ｶﾀｶﾅ", "½ ¼ ² ³ ™ © ®",
             "naïve\u00a0nbsp\u2003em space", "zero\u200bwidth", "\ufeffbyte order mark", "left\u200fright\u202emarks",
             "\x00\x07control\x7f chars", "line\u2028sep\u2029para", "soft\u00adhyphen", "Ligature Ǳ and ǉ"]
    # UTF-8 read as Windows-1252 or Latin-1 (once or twice, a byte lost, a no-break space made a space),
    # as Windows-1251, as Mac Roman
    words = ["café", "naïve résumé", "Zürich", "São Paulo", "it’s “quoted”", "€100 — cheap", "東京", "😀 smile",
             "Привет", "señor", "Ελλάδα", "crème brûlée", "…and more", "déjà vu", "Ñandú"]
    misread = lambda text, codec: "".join(  # noqa: E731  as a browser does: an undefined byte as is
        bytes([b]).decode(codec, errors="ignore") or chr(b) for b in text.encode())
    mojibake = [misread(w, "cp1252") for w in words[:10]]
    mojibake += [words[4].encode().decode("cp1252", errors="replace")]  # "â€\ufffd"
    mojibake += [w.encode().decode("latin-1") for w in words[10:13]]
    mojibake += [misread(misread(w, "cp1252"), "cp1252") for w in words[13:15]]
    mojibake += [misread("Привет мир", "cp1251"), misread("It’s", "mac_roman"), misread("naïve", "cp1252") + " and 東京",
                 "the Ã©lite and Ã¼ber", misread("voilà le travail", "cp1252").replace("\xa0", " "), "Ã  la mode",
                 misread("日本語", "cp1252"), misread("₹500 only", "cp1252"), "Crème fraîche".encode().decode("latin-1"),
                 "Â£5 fee"]
    escaped = []
    for text, times in [("Tom & Jerry", 2), ("AT&T <3 “quotes”", 3), ("fish & chips", 4), ("café & crème", 2),
                        ("a < b > c", 2), ("Q&A: it's", 3), ("5 € & 3 £", 2), ("R&D", 5), ("Ben & Jerry's", 2),
                        ("<3 x", 1), ("naïve &c", 3)]:
        for _ in range(times):
            text = html.escape(text)
        escaped.append(text)
    escaped += ["it&amp;#39;s", "&amp;quot;hi&amp;quot;", "caf&amp;eacute;", "&#8220;x&#8221;", "P&EACUTE;REZ",
                "&amp;lt;b&amp;gt; <b>", "&amp;amp;\n&lt;i&gt;", "&ampx; &amp", "&amp;amp;#x1F600;"]
    c1 = ["\x93quoted\x94 text", "caf\xe9 \x96 bar", "it\x92s fine", "\x91single\x92", "wait\x85 what", "price \x80100",
          "brand\x99 name", "a\x81b undefined", "\x97dash\x97", "naïve \x93東京\x94", "\x84low quote\x93",
          "\x8a\x9e\x9f letters"]
    ansi = ["\x1b[31mred\x1b[0m text", "\x1b[1;32mbold green\x1b[0m", "plain \x1b[Kclear", "\x1b[38;5;208morange\x1b[m",
            "\x1b[4munder\x1b[24m line", "\x1b[0;31;47mwarn\x1b[0m: disk", "\x1b[2J\x1b[Hscreen", "ok \x1b[1m✓\x1b[22m"]
    surrogates = ["a\udcffb", "\ud83d\ude00 pair", "lone \ud800 high", "end \udfff", "\ude00\ud83d reversed",
                  "x\udcc3\udca9y escaped bytes", "\udbff\udfff max pair", "two \udc80\udc81 lows"]
    return plain + accents + scripts + emoji + width + mojibake + escaped + c1 + ansi + surrogates


def test_varied_captions_tokenize_as_open_clip(clip_tokenizer):
    """open_clip cleans every caption with ftfy.fix_text; text.py does it without ftfy. Where the two can differ
    (mojibake ftfy's heuristic reads otherwise) is in docs/data.md; on this set, nowhere."""
    texts = varied_captions()
    assert len(texts) == len(set(texts)) == 300
    expected = open_clip.tokenize(texts, context_length=77)
    got = clip_tokenizer(texts, 77)  # surrogates included: no exception
    bad = [t for t, a, b in zip(texts, expected, got) if not torch.equal(a, b)]
    assert not bad, bad  # the issue asks for 295 of 300


def test_class_names_and_templates_with_surrogates_or_controls_build_a_classifier(clip_tokenizer):
    from model import CLIP
    names, templates = ["cat\udcff", "\ud83d\ude00 dog", "bird\x93s"], ["a photo of a {}.", "\x1b[1m{}\x1b[0m\ud800"]
    prompts = [t.format(n) for n in names for t in templates]
    assert torch.equal(clip_tokenizer(prompts, 16), open_clip.tokenize(prompts, 16))
    torch.manual_seed(0)
    model = CLIP(make_config("tiny", vocab_size=clip_tokenizer.vocab_size, eot_token_id=clip_tokenizer.eot_id))
    classifier = evaluate.zero_shot_classifier(model, names, templates, clip_tokenizer, torch.device("cpu"))
    assert classifier.shape == (model.cfg.embed_dim, 3) and torch.isfinite(classifier).all()


def test_clip_tokenizer_command_writes_a_loadable_file(tmp_path, clip_tokenizer):
    out = tmp_path / "clip-tokenizer.json"
    run = subprocess.run([sys.executable, "tools/prepare.py", "clip-tokenizer", f"--out={out}"], cwd=REPO,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    loaded = Tokenizer.load(str(out))
    assert torch.equal(loaded(CAPTIONS, 77), clip_tokenizer(CAPTIONS, 77))
    assert sorted(os.listdir(tmp_path)) == ["clip-tokenizer.json"]  # no temporary file left


# ----------------------------------------------------------------------------- evaluate.py --checkpoint
def test_evaluate_checkpoint_scores_as_open_clip(tmp_path, clip_tokenizer, capsys):
    root = str(tmp_path / "bench")
    synthetic.make_synthetic_benchmark(root, years=(2020, 2021), train_samples_per_year=4, eval_samples_per_year=24,
                                  classification_samples_per_year=40, samples_per_shard=16, static_samples=24)
    theirs = tiny_openclip()
    torch.save(theirs.state_dict(), tmp_path / "model.pt")
    clip_tokenizer.save(str(tmp_path / "tok.json"))
    row = score.main([f"--checkpoint={tmp_path / 'model.pt'}", f"--tokenizer={tmp_path / 'tok.json'}",
                         f"--data_root={root}", "--steps=2020,2021", "--device=cpu", f"--out={tmp_path / 'r.json'}"])
    printed = capsys.readouterr().out
    assert "mean_R@1" in printed and "top1" in printed and (tmp_path / "r.json").exists()
    # the same numbers straight from open_clip: its tokenizer, its encoders, a brute-force argmax
    names = open(os.path.join(root, "eval", "classification", "classnames.txt")).read().split()
    templates = open(os.path.join(root, "eval", "classification", "templates.txt")).read().splitlines()
    with torch.no_grad():
        prompts = open_clip.tokenize([t.format(n) for n in names for t in templates], 16)
        prompts = F.normalize(theirs.encode_text(prompts), dim=-1)
        classifier = F.normalize(prompts.view(len(names), len(templates), -1).mean(1), dim=-1)
        for year in ("2020", "2021"):
            images, captions, _ = next(data.eval_batches(shards.year_shards(root, year, "retrieval"), 32, 1000))
            img = F.normalize(theirs.encode_image(data.normalize_images(images)), dim=-1)
            txt = F.normalize(theirs.encode_text(open_clip.tokenize(captions, 16)), dim=-1)
            i2t, t2i = evaluate.recall_at_k(img, txt, ks=(1,)), evaluate.recall_at_k(txt, img, ks=(1,))
            assert row[year]["mean_R@1"] == pytest.approx(100 * (i2t[1] + t2i[1]) / 2)
            images, labels, _ = next(data.eval_batches(shards.year_shards(root, year, "classification"), 32, 1000,
                                                       target="class"))
            images = data.normalize_images(images)
            predicted = (F.normalize(theirs.encode_image(images), dim=-1) @ classifier.t()).argmax(1)
            assert row[year]["top1"] == pytest.approx(100 * (predicted == torch.tensor(labels)).float().mean().item())
            assert row[year]["gallery"] == 24 and row[year]["class_samples"] == 40


# ----------------------------------------------------------------------------- --init, and back to open_clip
def test_an_unstated_activation_is_assumed_gelu_with_a_note_and_a_config_beside_settles_it(tmp_path, capsys):
    torch.save(tiny_openclip(quick_gelu=True).state_dict(), tmp_path / "model.pt")
    assert not load_checkpoint(str(tmp_path / "model.pt"))[0].cfg.quick_gelu
    note = capsys.readouterr().out
    assert "does not say which activation its model uses; assuming GELU" in note and "--quick_gelu=true" in note
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"quick_gelu": True}}))
    assert load_checkpoint(str(tmp_path / "model.pt"))[0].cfg.quick_gelu
    assert "does not say" not in capsys.readouterr().out
    _, model_cfg = openclip_with_heads(128, 64, 128, 2)  # a config silent on it: GELU, as open_clip
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    assert not load_checkpoint(str(tmp_path / "model.pt"))[0].cfg.quick_gelu
    assert "note:" not in capsys.readouterr().out


@pytest.mark.slow
def test_a_run_from_an_openclip_model_with_lr_0_keeps_it_and_scores_it_first(tmp_path, clip_tokenizer):
    root = str(tmp_path / "bench")
    synthetic.make_synthetic_benchmark(root, years=(2020, 2021), train_samples_per_year=64, eval_samples_per_year=24,
                                       classification_samples_per_year=0, samples_per_shard=32, static_samples=24)
    init = tmp_path / "init" / "model.pt"  # QuickGELU, as OpenAI's models, said by the config beside it
    init.parent.mkdir()
    torch.save(tiny_openclip(quick_gelu=True).state_dict(), init)
    (init.parent / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"quick_gelu": True}}))
    clip_tokenizer.save(str(tmp_path / "tok.json"))
    run = tmp_path / "run"
    train_in_process([f"--data_root={root}", f"--out_dir={run}", f"--init={init}", f"--tokenizer={tmp_path}/tok.json",
                      "--strategy=restart", "--lr=0", "--budget_samples=32", "--batch_size=16", "--workers=0",
                      "--eval_batch=32", "--log_interval=100", "--warmup_iters=1", "--warmup_iters_later=1"])
    initial, _ = load_checkpoint(str(init))
    assert initial.cfg.quick_gelu and initial.cfg.context_tokens == 16 and initial.cfg.vocab_size == 49408
    for step in (1, 2):  # at lr 0 nothing moves, and restart starts every step from the initial model
        weights = torch.load(run / f"step0{step}.pt", weights_only=True)["model"]
        assert all(torch.equal(weights[k], v) for k, v in initial.state_dict().items())
    result = json.load(open(run / "eval_matrix.json"))
    alone = score.main([f"--checkpoint={init}", f"--tokenizer={tmp_path}/tok.json", f"--data_root={root}",
                           "--device=cpu"])
    assert result["initial"] == alone  # the initial row is the model scored as evaluate.py scores it
    assert result["matrix"] == [[alone[t]["mean_R@1"] for t in ("2020", "2021")]] * 2  # and no step changed it
    assert result["summary"]["id"] == alone["2020"]["mean_R@1"] / 2 + alone["2021"]["mean_R@1"] / 2
    with Image.open(run / "eval_matrix.png") as picture:  # with the initial row: test_pictures.py
        assert picture.tobytes() == pictures.run_picture(result, str(run)).tobytes()


@pytest.mark.parametrize("vocabulary", ["clip", "bpe"])
def test_an_exported_model_loads_into_open_clip_strictly_with_the_same_embeddings(
        tmp_path, vocabulary, capsys, clip_tokenizer):
    import export
    from dataclasses import asdict
    from model import CLIP
    if vocabulary == "clip":  # CLIP's vocabulary: open_clip pools at the largest id, end-of-text
        ours, _ = load_checkpoint(_saved(tmp_path, tiny_openclip(quick_gelu=True)), quick_gelu=True)
        tokenizer = clip_tokenizer
    else:  # a vocabulary of our own, end-of-text id 2: open_clip pools at that id ("eos")
        torch.manual_seed(0)
        ours = CLIP(make_config("tiny", vocab_size=300, eot_token_id=2)).eval()
        tokenizer = Tokenizer.train(CAPTIONS, 300)
    path = tmp_path / "run" / "step01.pt"
    path.parent.mkdir()
    torch.save({"model": ours.state_dict(), "model_config": asdict(ours.cfg)}, path)
    tokenizer.save(str(path.parent / "tokenizer.json"))
    capsys.readouterr()
    export.main([str(path), f"--out={tmp_path / 'exported'}"])
    said = capsys.readouterr().out.splitlines()[-1]  # how to tokenize for it
    theirs = open_clip.create_model(f"local-dir:{tmp_path / 'exported'}").eval()  # loads its weights strictly
    assert (tmp_path / "exported" / "tokenizer.json").exists()
    folder = tmp_path / "exported"
    if vocabulary == "clip":  # open_clip's tokenizer of the folder gives our ids
        assert said == (f"tokenize with open_clip.get_tokenizer('local-dir:{folder}'): "
                        f"CLIP's vocabulary")
        their_ids = open_clip.get_tokenizer(f"local-dir:{folder}")(CAPTIONS)
        assert torch.equal(their_ids, tokenizer(CAPTIONS, 16))
    else:  # it would give CLIP's ids, which this model cannot read: the line says what to use
        assert said.startswith(f"tokenize with this project's Tokenizer.load('{folder}/"
                               f"tokenizer.json')(texts, 24): the run's own vocabulary")
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, ours.cfg.image_px, ours.cfg.image_px, generator=g)
    tokens = torch.randint(3, ours.cfg.vocab_size - 1, (2, ours.cfg.context_tokens), generator=g)
    tokens[:, 9] = ours.cfg.eot_token_id
    with torch.no_grad():
        assert (theirs.encode_image(images) - ours.encode_image(images)).abs().max() < 1e-5
        assert (theirs.encode_text(tokens) - ours.encode_text(tokens)).abs().max() < 1e-5
    missing, unexpected = theirs.load_state_dict(torch.load(tmp_path / "exported" / "open_clip_pytorch_model.bin"))
    assert not missing and not unexpected


def test_a_run_exported_reads_back_as_the_run_itself(tmp_path, capsys, clip_tokenizer):
    import export
    import train
    from types import SimpleNamespace
    root = str(tmp_path / "bench")
    synthetic.make_synthetic_benchmark(root, years=(2020,), train_samples_per_year=64,
                                       eval_samples_per_year=24, samples_per_shard=64,
                                       classification_samples_per_year=16, static_samples=16)
    run, out = tmp_path / "run", tmp_path / "exported"
    train_in_process([f"--data_root={root}", f"--out_dir={run}", "--budget_samples=32",
                      "--batch_size=16", "--workers=0", "--eval_batch=32", "--log_interval=100",
                      "--warmup_iters=1"])  # a tiny run, its own BPE: end-of-text id 2
    export.main([str(run / "step01.pt"), f"--out={out}"])
    assert f"Tokenizer.load('{out}/tokenizer.json')" in capsys.readouterr().out
    trained, _ = load_checkpoint(str(run / "step01.pt"))
    exported, _ = load_checkpoint(str(out / "open_clip_pytorch_model.bin"))
    assert "note:" not in capsys.readouterr().out  # the config beside says everything
    assert exported.cfg == trained.cfg and trained.cfg.eot_token_id == 2
    tokenizer = Tokenizer.load(str(out / "tokenizer.json"))
    tokens = tokenizer(["a red circle at top left and a blue star at bottom right"] * 2, 24)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (exported.encode_text(tokens) - trained.encode_text(tokens)).abs().max() < 1e-5
        assert (exported.encode_image(images) - trained.encode_image(images)).abs().max() < 1e-5
    rows = [score.main([f"--checkpoint={checkpoint}", f"--tokenizer={out / 'tokenizer.json'}",
                           f"--data_root={root}", "--device=cpu"])
            for checkpoint in (run / "step01.pt", out / "open_clip_pytorch_model.bin")]
    assert rows[0] == rows[1] and rows[0]["2020"]["gallery"] == 24
    initial = train.load_initial(train.parse_config([f"--init={out / 'open_clip_pytorch_model.bin'}"]),
                                 tokenizer, SimpleNamespace(master=False))
    assert all(torch.equal(v, initial.state_dict()[k]) for k, v in trained.state_dict().items())
    clip_tokenizer.save(str(tmp_path / "clip.json"))  # another tokenizer: a true refusal
    with pytest.raises(SystemExit, match=r"clip.json: 49408 ids with end-of-text 49407, but .*"
                                         r"open_clip_pytorch_model.bin embeds \d+ ids and pools "
                                         r"at end-of-text 2; pass the tokenizer it was trained"):
        score.main([f"--checkpoint={out / 'open_clip_pytorch_model.bin'}",
                       f"--tokenizer={tmp_path / 'clip.json'}", f"--data_root={root}"])


def _saved(folder, openclip_model) -> str:
    torch.save(openclip_model.state_dict(), folder / "openclip.pt")
    return str(folder / "openclip.pt")
