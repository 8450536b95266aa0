"""
Reading and writing CLIP weights: this project's step checkpoints (RUN/stepNN.pt), OpenCLIP's and
OpenAI's (state dicts, .safetensors, OpenAI's TorchScript archives, read without running any of
their code), and a model handed back to OpenCLIP (to_openclip, tools/export.py).

    from checkpoints import load_checkpoint
    model, record = load_checkpoint("runs/cumulative-all/step05.pt")   # or OpenAI's ViT-B-32.pt

OpenCLIP keeps OpenAI's parameter names, and model.CLIP keeps OpenCLIP's layout, so one key map
(openclip_key_map) reads both, name by name. What weights do not show (the activation, the
attention heads) comes from the file's neighbours where they say it, else from open_clip's model of
the same widths, with a line saying what was assumed.
"""
import json
import math
import os
import pickle
import zipfile
from collections import OrderedDict

import torch

from model import CLIP, CLIPConfig


# ----------------------------------------------------------------------------- OpenCLIP and OpenAI
# OpenCLIP keeps OpenAI's parameter names, so one key map reads both. A residual block's keys, as
# (OpenCLIP's name, our text tower's name, timm's name in our image tower):
_BLOCK_KEYS = [
    ("ln_1.weight", "ln_1.weight", "norm1.weight"),
    ("ln_1.bias", "ln_1.bias", "norm1.bias"),
    ("attn.in_proj_weight", "attn.in_proj.weight", "attn.qkv.weight"),  # q, k, v in one order
    ("attn.in_proj_bias", "attn.in_proj.bias", "attn.qkv.bias"),
    ("attn.out_proj.weight", "attn.out_proj.weight", "attn.proj.weight"),
    ("attn.out_proj.bias", "attn.out_proj.bias", "attn.proj.bias"),
    ("ln_2.weight", "ln_2.weight", "norm2.weight"),
    ("ln_2.bias", "ln_2.bias", "norm2.bias"),
    ("mlp.c_fc.weight", "mlp.c_fc.weight", "mlp.fc1.weight"),
    ("mlp.c_fc.bias", "mlp.c_fc.bias", "mlp.fc1.bias"),
    ("mlp.c_proj.weight", "mlp.c_proj.weight", "mlp.fc2.weight"),
    ("mlp.c_proj.bias", "mlp.c_proj.bias", "mlp.fc2.bias"),
]
_TRANSPOSED = {"visual_proj.weight", "text_proj.weight"}  # OpenCLIP: x @ proj; nn.Linear: proj.T
_LEADING_DIMS = {"visual.cls_token": 2, "visual.pos_embed": 1}  # timm keeps [1, 1, W] and [1, N, W]
_NOT_WEIGHTS = {"input_resolution", "context_length", "vocab_size"}  # ints in OpenAI's archives


def openclip_key_map(cfg: CLIPConfig) -> dict[str, str]:
    """Our parameter name -> the OpenCLIP / OpenAI CLIP state-dict key it is read from, every key
    spelled out."""
    keys = {"visual.cls_token": "visual.class_embedding",
            "visual.pos_embed": "visual.positional_embedding",
            "visual.patch_embed.proj.weight": "visual.conv1.weight",  # CLIP's patch conv: no bias
            "visual.norm_pre.weight": "visual.ln_pre.weight",
            "visual.norm_pre.bias": "visual.ln_pre.bias",
            "visual.norm.weight": "visual.ln_post.weight",
            "visual.norm.bias": "visual.ln_post.bias",
            "visual_proj.weight": "visual.proj", "token_embedding.weight": "token_embedding.weight",
            "positional_embedding": "positional_embedding", "ln_final.weight": "ln_final.weight",
            "ln_final.bias": "ln_final.bias", "text_proj.weight": "text_projection",
            "logit_scale": "logit_scale"}
    for i in range(cfg.vision_layers):
        keys.update({f"visual.blocks.{i}.{timm}": f"visual.transformer.resblocks.{i}.{theirs}"
                     for theirs, _, timm in _BLOCK_KEYS})
    for i in range(cfg.text_layers):
        keys.update({f"text_blocks.{i}.{ours}": f"transformer.resblocks.{i}.{theirs}"
                     for theirs, ours, _ in _BLOCK_KEYS})
    if cfg.init_logit_bias is not None:  # SigLIP's learned bias
        keys["logit_bias"] = "logit_bias"
    return keys


# Attention heads (image, text) of open_clip's ViT CLIPs by their widths (image, text): heads
# 64 wide, but in the image towers of ViT-H (80 wide), ViT-g (88), ViT-bigG (104), ViT-e (112)
OPENCLIP_HEADS = {(384, 256): (6, 4), (384, 384): (6, 6), (512, 384): (8, 6),  # ViT-S, ViT-M
                  (512, 512): (8, 8), (768, 512): (12, 8), (896, 640): (14, 10),  # ViT-M, B, B-plus
                  (1024, 768): (16, 12), (1280, 1024): (16, 16), (1408, 1024): (16, 16),  # L, H, g
                  (1664, 1280): (16, 20), (1792, 1280): (16, 20)}  # ViT-bigG, ViT-e


def parse_heads(spec: str) -> tuple[int, int] | None:
    """The --heads setting: "auto" (None; see openclip_config) or IMAGE,TEXT, e.g. "16,16"."""
    if spec == "auto":
        return None
    image, _, text = spec.partition(",")
    if not (image.isdigit() and text.isdigit() and int(image) > 0 and int(text) > 0):
        raise SystemExit(f"error: --heads={spec}: use auto, or the attention heads of the image "
                         f"and the text tower, e.g. --heads=16,16 (ViT-H-14)")
    return int(image), int(text)


def openclip_config(state_dict: dict, quick_gelu: bool, heads: tuple[int, int] | None = None,
                    model_cfg: dict | None = None) -> CLIPConfig:
    """The CLIPConfig of an OpenCLIP or OpenAI ViT state dict, read from its shapes. What weights
    do not show is passed: quick_gelu (OpenAI's models and OpenCLIP's -quickgelu ones), and heads,
    the attention heads (image, text). heads None takes those model_cfg names (an
    open_clip_config.json's model config), else OPENCLIP_HEADS' of the same widths, else 64-wide."""
    sd = state_dict
    need = ["visual.conv1.weight", "visual.positional_embedding", "visual.proj", "text_projection",
            "positional_embedding", "token_embedding.weight", "ln_final.weight"]
    if any(k not in sd for k in need):
        raise SystemExit(f"not a ViT CLIP state dict (no {next(k for k in need if k not in sd)}); "
                         f"only OpenCLIP/OpenAI ViT models load (ResNet image towers and Hugging "
                         f"Face text towers do not)")
    vision_width, _, patch_px, _ = sd["visual.conv1.weight"].shape
    grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
    text_width = sd["ln_final.weight"].shape[0]

    def layers(prefix):
        return len({k.split(".")[len(prefix.split("."))] for k in sd if k.startswith(prefix + ".")})

    mlp_ratios = {sd[f"{p}resblocks.0.mlp.c_fc.weight"].shape[0] / w for p, w in
                  (("visual.transformer.", vision_width), ("transformer.", text_width))}
    if len(mlp_ratios) != 1:
        raise SystemExit(f"the image and text MLPs have different width ratios "
                         f"{sorted(mlp_ratios)}; CLIPConfig has one")
    vocab_size = sd["token_embedding.weight"].shape[0]
    bias = (model_cfg or {}).get("init_logit_bias", float(sd["logit_bias"])) \
        if "logit_bias" in sd else None  # a SigLIP model's
    vision, text = (model_cfg or {}).get("vision_cfg"), (model_cfg or {}).get("text_cfg")
    if not heads and vision is not None and text is not None:  # open_clip's defaults where unsaid
        heads = vision_width // vision.get("head_width", 64), text.get("heads", 8)
    heads = heads or OPENCLIP_HEADS.get((vision_width, text_width),
                                        (max(1, vision_width // 64), max(1, text_width // 64)))
    for tower, width, n in (("image", vision_width, heads[0]), ("text", text_width, heads[1])):
        if width % n:
            raise SystemExit(f"{n} attention heads do not divide the {tower} tower's width "
                             f"{width}; pass --heads=IMAGE,TEXT that divide {vision_width} and "
                             f"{text_width}")
    return CLIPConfig(image_px=grid * patch_px, patch_px=patch_px, vision_width=vision_width,
                      vision_layers=layers("visual.transformer.resblocks"), vision_heads=heads[0],
                      text_width=text_width, text_layers=layers("transformer.resblocks"),
                      text_heads=heads[1],
                      context_tokens=sd["positional_embedding"].shape[0], vocab_size=vocab_size,
                      embed_dim=sd["text_projection"].shape[1], mlp_ratio=mlp_ratios.pop(),
                      quick_gelu=quick_gelu, init_logit_bias=bias,
                      eot_token_id=vocab_size - 1)  # <|endoftext|>, CLIP's last id


def load_openclip_state_dict(state_dict: dict, cfg: CLIPConfig) -> CLIP:
    """Our CLIP holding the weights of an OpenCLIP or OpenAI CLIP ViT state dict, in eval mode
    (cfg: openclip_config(state_dict, quick_gelu) or a preset such as make_config("ViT-B-32",
    quick_gelu=True)). Every key must be matched both ways and every shape must agree; otherwise
    the error lists what is left over. Weights become float32."""
    # the causal mask is rebuilt, not loaded (some OpenCLIP versions saved it as a buffer)
    state_dict = {k: v for k, v in state_dict.items()
                  if k not in _NOT_WEIGHTS and not k.endswith("attn_mask")}
    with torch.device("meta"):  # shapes only: every parameter is overwritten below
        model = CLIP(cfg)
    key_map = openclip_key_map(cfg)
    ours = model.state_dict()
    missing = sorted(theirs for theirs in key_map.values() if theirs not in state_dict)
    unused = sorted(set(state_dict) - set(key_map.values()))
    unmapped = sorted(set(ours) - set(key_map))  # the map forgot them (timm changed, say)
    converted, wrong_shape = {}, []
    for name, theirs in key_map.items():
        if name not in ours or theirs not in state_dict:
            continue
        value = state_dict[theirs]
        value = value.t() if name in _TRANSPOSED else value
        value = value[(None,) * _LEADING_DIMS.get(name, 0)]
        if value.shape != ours[name].shape:
            wrong_shape.append(f"{theirs} {tuple(state_dict[theirs].shape)} -> "
                               f"{name} {tuple(ours[name].shape)}")
        # a copy: the model must not share memory with the caller's state dict (OpenAI's is float16)
        converted[name] = value.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    problems = [f"{what} ({len(keys)}): {', '.join(keys[:12])}{' ...' if len(keys) > 12 else ''}"
                for what, keys in [("checkpoint keys we do not use", unused),
                                   ("keys our model needs but the checkpoint lacks", missing),
                                   ("our parameters with no checkpoint key", unmapped),
                                   ("shapes that differ", wrong_shape)] if keys]
    if problems:
        raise SystemExit("cannot load the CLIP state dict: " + "; ".join(problems)
                         + "; check the model shape (a ViT-B-32/B-16/S-16 OpenCLIP or OpenAI "
                           "checkpoint)")
    model.load_state_dict(converted, assign=True)
    return model.eval()


class _ScriptObject:
    """A module (or other object) of a TorchScript archive, as the attributes its pickle gives:
    its class's code, which torch.jit.load would compile and run, is never looked at."""
    attributes: dict = {}  # until the pickle's BUILD gives this object its own

    def __setstate__(self, state):
        if not isinstance(state, dict):  # a __getstate__ of its own: only its __setstate__ knows it
            raise _NotPlainData(f"{type(self).__name__}.__setstate__")
        self.attributes = state


class _NotPlainData(Exception):
    """What an archive's pickle needs beyond tensors, storages, containers and modules."""


_STORAGE_DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16,
                   "BFloat16Storage": torch.bfloat16, "DoubleStorage": torch.float64,
                   "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8,
                   "ByteStorage": torch.uint8, "BoolStorage": torch.bool}


class _ArchiveUnpickler(pickle.Unpickler):
    """Reads a TorchScript archive's data.pkl. A pickle reaches every function it calls through
    find_class, so answering only with tensor rebuilds, storage dtypes, containers and
    _ScriptObject classes lets nothing else run. Storages are read from ARCHIVE/data/ as bytes."""

    def __init__(self, archive: zipfile.ZipFile, folder: str):
        super().__init__(archive.open(f"{folder}/data.pkl"))
        self.archive, self.folder, self.classes, self.storages = archive, folder, {}, {}

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):  # a module's TorchScript class
            qualname = f"{module}.{name}"
            return self.classes.setdefault(qualname, type(qualname, (_ScriptObject,), {}))
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]  # a tag of a storage's elements, never called
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda flat, offset, size, stride, *_: flat.as_strided(size, stride, offset)
        if (module, name) == ("collections", "OrderedDict"):  # a tensor's backward hooks: none
            return OrderedDict
        if module == "torch.jit._pickle" and name.startswith(("build_", "restore_type_tag")):
            return lambda value, *type_tag: value  # a typed list or dict: the value, untyped
        raise _NotPlainData(f"{module}.{name}")

    def persistent_load(self, saved_id):
        kind, dtype, key, *_ = saved_id  # ("storage", dtype, key, device, elements)
        if kind != "storage" or not isinstance(dtype, torch.dtype) or not isinstance(key, str):
            raise _NotPlainData("a persistent id that is not a storage")
        if key not in self.storages:  # one flat tensor per storage; its tensors are views of it
            data = bytearray(self.archive.read(f"{self.folder}/data/{key}"))
            self.storages[key] = (torch.frombuffer(data, dtype=dtype) if data
                                  else torch.empty(0, dtype=dtype))
        return self.storages[key]


def read_torchscript(path: str) -> dict[str, torch.Tensor]:
    """Every tensor the modules of a TorchScript archive hold, by dotted name: the keys of
    torch.jit.load(path).state_dict(), and any other tensor attribute (a causal mask). OpenAI's
    CLIPs are such archives, and torch.jit.load runs the code inside one (its __setstate__
    methods); here nothing in the file is run, and an archive that needs more than tensors, plain
    containers and modules' attributes to be rebuilt is refused in one line."""

    def tensors(obj: _ScriptObject, prefix: str, seen: set) -> dict[str, torch.Tensor]:
        seen.add(id(obj))  # a pickle can make an object its own attribute: each is walked once
        found = {}
        for name, value in obj.attributes.items():
            if isinstance(value, torch.Tensor):
                found[f"{prefix}{name}"] = value
            elif isinstance(value, _ScriptObject) and id(value) not in seen:
                found.update(tensors(value, f"{prefix}{name}.", seen))
        return found

    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        try:
            if not pickles:
                raise ValueError("no data.pkl")
            root = _ArchiveUnpickler(archive, pickles[0].removesuffix("/data.pkl")).load()
            if not isinstance(root, _ScriptObject):
                raise ValueError(f"it holds a {type(root).__name__}, not a module")
            return tensors(root, "", set())
        except _NotPlainData as e:
            raise SystemExit(f"{path}: refused: this TorchScript archive needs {e} to be "
                             f"rebuilt, and no code a file names is run (only tensors, containers "
                             f"and modules' attributes are read); pass its weights as a state dict "
                             f"(torch.save's .pt, or .safetensors)") from None
        except Exception as e:
            raise SystemExit(f"{path}: not a readable TorchScript archive ({type(e).__name__}: "
                             f"{e}); pass an OpenAI or OpenCLIP CLIP (an archive, a state dict or "
                             f".safetensors)") from None


def is_checkpoint_file(path: str) -> bool:
    """Does path hold what load_checkpoint reads, judged from its first and last bytes: a
    whole zip (torch.save's format, OpenAI's TorchScript), torch.save's old pickle, safetensors?"""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        head = f.read(16)
    if path.endswith(".safetensors"):
        return head[8:9] == b"{"  # an 8-byte header length, then the JSON header
    return head.startswith(b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19")  # torch.save's magic number


def _is_torchscript(path: str) -> bool:
    """Whether path is a TorchScript archive: a zip holding constants.pkl (torch.save's do not).
    Nothing is unpickled."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.endswith("/constants.pkl") for name in z.namelist())


def load_checkpoint(path: str, quick_gelu: bool | None = None,
                    heads: tuple[int, int] | None = None) -> tuple[CLIP, dict]:
    """(model, the rest of the file) of one of train.py's checkpoints (stepNN.pt; the rest is its
    record: config, steps, samples seen, ...) or of an existing CLIP (the rest is {}): OpenAI's
    TorchScript archive (ViT-B-32.pt ...), an OpenCLIP state dict (.bin, .pt or .safetensors) or
    OpenCLIP training checkpoint ({"state_dict": ...}, DDP's "module." prefix too). The model
    comes in eval mode, on the CPU; this is the one way the project reads a model from a file.

    Two things weights do not show; None takes each from the file, with a printed note where it
    must assume. quick_gelu: True for OpenAI's archives, else what an open_clip_config.json beside
    the weights says, else GELU, as OpenCLIP's models. heads (image, text): what such a file says,
    else those of open_clip's model of the same widths, else 64-wide heads."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such checkpoint file; pass --checkpoint=FILE (an OpenCLIP or "
                         f"OpenAI CLIP)")
    if _is_torchscript(path):
        state_dict = read_torchscript(path)  # OpenAI's releases are TorchScript: read, never run
        quick_gelu = True if quick_gelu is None else quick_gelu
    elif path.endswith(".safetensors"):
        from safetensors.torch import load_file  # installed with timm
        state_dict = load_file(path)
    else:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise SystemExit(f"{path}: not a readable torch checkpoint "
                             f"({str(e).splitlines()[0]}); pass an OpenCLIP/OpenAI CLIP state dict "
                             f"or a train.py step checkpoint (a damaged RUN/stepNN.pt: delete it, "
                             f"and rerun to train that step again)")
    if "model_config" in state_dict and "model" in state_dict:  # one of ours
        with torch.device("meta"):  # shapes only: every parameter is overwritten below
            model = CLIP(CLIPConfig(**state_dict["model_config"]))
        model.load_state_dict(state_dict["model"], assign=True)
        return model.eval(), {k: v for k, v in state_dict.items() if k != "model"}
    state_dict = state_dict.get("state_dict", state_dict)
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    beside = _openclip_config_beside(path)
    if quick_gelu is None:
        quick_gelu = beside.get("quick_gelu")
    if quick_gelu is None:
        print(f"note: {path} does not say which activation its model uses; assuming GELU, as "
              f"OpenCLIP's models; for OpenAI's weights (or an OpenCLIP -quickgelu model) pass "
              f"--quick_gelu=true")
    cfg = openclip_config(state_dict, bool(quick_gelu), heads, beside)
    said = heads or "vision_cfg" in beside and "text_cfg" in beside
    if not said and (cfg.vision_width, cfg.text_width) not in OPENCLIP_HEADS:
        print(f"note: {path}: no open_clip_config.json beside it, and no open_clip model of "
              f"its widths ({cfg.vision_width} image, {cfg.text_width} text), says its attention "
              f"heads; assuming {cfg.vision_heads} image and {cfg.text_heads} text heads; if it "
              f"has others, pass --heads=IMAGE,TEXT")
    return load_openclip_state_dict(state_dict, cfg), {}


def _openclip_config_beside(path: str) -> dict:
    """The open_clip model config in an open_clip_config.json beside the weights (Hugging Face's
    layout, or export's); {} where there is none."""
    config_path = os.path.join(os.path.dirname(path), "open_clip_config.json")
    if not os.path.exists(config_path):
        return {}
    with open(config_path) as f:
        config = json.load(f)
    return config.get("model_cfg", config)


def to_openclip(model: CLIP) -> tuple[dict, dict]:
    """(OpenCLIP state dict, OpenCLIP model config) of our model: open_clip.CLIP(**config) loads
    the state dict with strict=True and gives the same embeddings. The config names every shape, so
    shapes open_clip has no name for (tiny, another vocabulary) load too. A parameter with no
    OpenCLIP name (one a fork added) is refused in one line, not dropped."""
    cfg, ours = model.cfg, model.state_dict()
    key_map = openclip_key_map(cfg)
    unmapped = sorted(set(ours) - set(key_map))
    if unmapped:
        raise SystemExit(f"error: cannot export: OpenCLIP has no name for the parameter(s) "
                         f"{', '.join(unmapped[:5])}; add them to checkpoints.openclip_key_map "
                         f"(and open_clip's model config) or export without them")
    state_dict = {}
    for name, theirs in key_map.items():
        value = ours[name].detach().cpu()
        value = value.t() if name in _TRANSPOSED else value
        state_dict[theirs] = value.reshape(value.shape[_LEADING_DIMS.get(name, 0):]).contiguous()
    # pool at end-of-text: argmax where it is the largest id, as in CLIP's vocabulary
    text_pool = (dict(pool_type="argmax") if cfg.eot_token_id == cfg.vocab_size - 1
                 else dict(pool_type="eos", eos_id=cfg.eot_token_id))
    bias = {} if cfg.init_logit_bias is None else {"init_logit_bias": cfg.init_logit_bias}
    config = {"embed_dim": cfg.embed_dim, "quick_gelu": cfg.quick_gelu, **bias,
              "vision_cfg": {"image_size": cfg.image_px, "patch_size": cfg.patch_px,
                             "width": cfg.vision_width, "layers": cfg.vision_layers,
                             "head_width": cfg.vision_width // cfg.vision_heads,
                             "mlp_ratio": cfg.mlp_ratio},
              "text_cfg": {"context_length": cfg.context_tokens, "vocab_size": cfg.vocab_size,
                           "width": cfg.text_width, "heads": cfg.text_heads,
                           "layers": cfg.text_layers, "mlp_ratio": cfg.mlp_ratio, **text_pool}}
    return state_dict, config
