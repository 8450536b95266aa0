"""
Reading and writing CLIP weights: this project's step checkpoints (RUN/stepNN.pt), OpenCLIP's and
OpenAI's (state dicts, .safetensors, OpenAI's TorchScript archives, read without running any of
their code), and a model handed back to OpenCLIP (to_openclip, tools/export.py).

    from checkpoints import load_checkpoint
    model, record = load_checkpoint("runs/cumulative-all/step05.pt")   # or OpenAI's ViT-B-32.pt

OpenCLIP keeps OpenAI's parameter names, and model.CLIP keeps OpenCLIP's layout, so one key map
(openclip_key_map) reads both, name by name. What weights do not show (the activation, the
attention heads, the text pooling and mask) comes from an open_clip_config.json beside them, read
field by field as open_clip reads it (a field our CLIP cannot follow is refused, naming it), else
from open_clip's model of the same widths, with a line saying what was assumed. An exported folder
reads back as the checkpoint it came from.
"""
import json
import math
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from dataclasses import fields
from types import SimpleNamespace

import torch

import data
from model import CLIP, LOSSES, CLIPConfig


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
                    model_cfg: dict | None = None, source: str = "the model config") -> CLIPConfig:
    """The CLIPConfig of an OpenCLIP or OpenAI ViT state dict, read from its shapes. What weights
    do not show is passed: quick_gelu (OpenAI's models and OpenCLIP's -quickgelu ones), and heads,
    the attention heads (image, text). heads None takes those model_cfg names (an
    open_clip_config.json's model config), else OPENCLIP_HEADS' of the same widths, else 64-wide.
    model_cfg's text pooling, end-of-text id and causal mask are read; a setting our CLIP lacks,
    or a shape other than the weights', is refused naming the field (source names the file)."""
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
    text = text or {}
    pool = text.get("pool_type", "argmax")
    # argmax pools at the largest id: CLIP's <|endoftext|>, its last; eos at eos_id (default 2)
    eot_token_id = text.get("eos_id", 2) if pool == "eos" else vocab_size - 1
    cfg = CLIPConfig(image_px=grid * patch_px, patch_px=patch_px, vision_width=vision_width,
                     vision_layers=layers("visual.transformer.resblocks"), vision_heads=heads[0],
                     text_width=text_width, text_layers=layers("transformer.resblocks"),
                     text_heads=heads[1],
                     context_tokens=sd["positional_embedding"].shape[0], vocab_size=vocab_size,
                     embed_dim=sd["text_projection"].shape[1], mlp_ratio=mlp_ratios.pop(),
                     quick_gelu=quick_gelu, eot_token_id=eot_token_id, init_logit_bias=bias,
                     text_pool="last" if pool == "last" else "eot",
                     text_causal=not text.get("no_causal_mask", False))
    check_openclip_model_cfg(model_cfg or {}, cfg, source)
    return cfg


# What an open_clip model config may say, field by field ("text_cfg.pool_type": text_cfg's
# pool_type). Read: the activation, the heads, the text pooling and mask. Shapes: read from the
# weights, and the config's must agree (our CLIPConfig's name for each).
_READ = {"quick_gelu", "vision_cfg.head_width", "text_cfg.heads", "text_cfg.pool_type",
         "text_cfg.eos_id", "text_cfg.no_causal_mask"}
_SHAPES = {"embed_dim": "embed_dim", "vision_cfg.image_size": "image_px",
           "vision_cfg.patch_size": "patch_px", "vision_cfg.width": "vision_width",
           "vision_cfg.layers": "vision_layers", "text_cfg.width": "text_width",
           "text_cfg.layers": "text_layers", "text_cfg.context_length": "context_tokens",
           "text_cfg.vocab_size": "vocab_size"}
# Settings our CLIP does not have: accepted only at the values where open_clip computes as it does
_BLOCK = {"ls_init_value": (None,), "act_kwargs": (None, {}), "norm_kwargs": (None, {}),
          "block_type": (None, "default"),
          **dict.fromkeys(("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner",
                           "scale_attn", "scale_fc"), (False,))}
_FIXED = {"custom_text": (False,), "nonscalar_logit_scale": (False,), "multimodal_cfg": (None,),
          **{f"{tower}.{k}": v for tower in ("vision_cfg", "text_cfg") for k, v in _BLOCK.items()},
          "vision_cfg.timm_model_name": (None,), "vision_cfg.attentional_pool": (False,),
          "vision_cfg.no_ln_pre": (False,), "vision_cfg.pos_embed_type": ("learnable",),
          "vision_cfg.final_ln_after_pool": (False,), "vision_cfg.pool_type": ("tok",),
          "vision_cfg.global_average_pool": (False,), "vision_cfg.input_patchnorm": (False,),  # old
          "text_cfg.hf_model_name": (None,), "text_cfg.embed_cls": (False,),
          "text_cfg.proj_bias": (False,), "text_cfg.proj_type": ("linear",),
          "text_cfg.final_ln_after_pool": (False,), "text_cfg.pool_type": ("argmax", "eos", "last")}
# Settings that change no embedding: the weights say it, it starts or regularises training, it
# tokenizes, or it belongs to a tower kind refused above (timm's, Hugging Face's, a pooler's)
_IGNORED = {"init_logit_scale", "init_logit_bias", "cast_dtype", "output_dict",
            "vision_cfg.mlp_ratio", "text_cfg.mlp_ratio", "vision_cfg.patch_dropout",
            "vision_cfg.output_tokens", "text_cfg.output_tokens", "text_cfg.pad_id",
            "text_cfg.hf_tokenizer_name", "text_cfg.tokenizer_kwargs", "text_cfg.tokenizer_mode",
            "vision_cfg.attn_pooler_queries", "vision_cfg.attn_pooler_heads",
            "vision_cfg.n_queries",
            *(f"vision_cfg.timm_{k}" for k in ("model_pretrained", "pool", "proj", "proj_bias",
                                               "drop", "drop_path")),
            *(f"text_cfg.hf_{k}" for k in ("model_pretrained", "proj_type", "pooler_type"))}


def check_openclip_model_cfg(model_cfg: dict, cfg: CLIPConfig, source: str) -> None:
    """Refuse, in one line naming the field, an open_clip model config (an open_clip_config.json's
    model_cfg) that says what our CLIP of cfg does not compute: a setting it lacks (_FIXED), a
    shape other than the weights' (_SHAPES), or a field this table does not know."""
    fields = {k: v for k, v in model_cfg.items() if k not in ("vision_cfg", "text_cfg")}
    for tower in ("vision_cfg", "text_cfg"):
        fields.update({f"{tower}.{k}": v for k, v in (model_cfg.get(tower) or {}).items()})
    for name, value in fields.items():
        said = json.dumps(value)
        said = said if len(said) <= 60 else said[:57] + "..."  # a nested config: its start
        if name in _FIXED and value not in _FIXED[name]:
            raise SystemExit(f"error: {source}: {name}={said}: this project's CLIP computes only "
                             f"{' or '.join(json.dumps(v) for v in _FIXED[name])} there; use "
                             f"open_clip for this model")
        ours = getattr(cfg, _SHAPES[name]) if name in _SHAPES else None
        if name in _SHAPES and value not in (ours, [ours, ours]):
            raise SystemExit(f"error: {source}: {name}={said}, but the weights beside it have "
                             f"{ours}: it is another model's config; put this model's there")
        if name not in _READ | _SHAPES.keys() | _FIXED.keys() | _IGNORED:
            raise SystemExit(f"error: {source}: {name}={said} is a setting this loader does not "
                             f"know (it may change the model); use open_clip for this model, or "
                             f"remove it if it changes nothing")


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


class DamagedCheckpoint(Exception):
    """A checkpoint whose bytes are not those that were written (verify_checkpoint says why)."""


def verify_checkpoint(path: str) -> None:
    """Raise DamagedCheckpoint unless path is a regular file holding a whole zip (torch.save's
    format, OpenAI's TorchScript) whose every record matches the CRC-32 written with it. torch.load
    checks none: a flipped bit in a tensor loads as another number. Reads the file once (its cost:
    docs/faults.md)."""
    if not os.path.isfile(path):  # never opened: a FIFO would wait for a writer forever
        raise DamagedCheckpoint("a folder, not a file" if os.path.isdir(path)
                                else "not a regular file")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # every record read, its CRC-32 and header checked
    except OSError as e:
        raise DamagedCheckpoint(f"unreadable: {e.strerror or e}") from None
    except Exception as e:  # a zip that a flipped byte broke: its end, its directory, a header
        raise DamagedCheckpoint(f"not a whole zip: {e}") from None
    if bad is not None:
        raise DamagedCheckpoint(f"its record {bad} fails its CRC-32 check")


def read_verified(path: str) -> dict:
    """torch.load of one of this project's checkpoints (weights only, on the CPU) once
    verify_checkpoint has passed it; raises DamagedCheckpoint."""
    verify_checkpoint(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def refuse_damaged(path: str) -> None:
    """SystemExit, in one line saying what to do, where a zip checkpoint fails verify_checkpoint:
    a run's RUN/stepNN.pt is trained again once deleted; any other file is copied again."""
    try:
        verify_checkpoint(path)
    except DamagedCheckpoint as e:
        fix = ("delete it and rerun the training command to train that step again"
               if re.fullmatch(r"step\d+\.pt", os.path.basename(path))
               else "copy it again from where it came from")
        raise SystemExit(f"error: {path} is damaged ({e}); {fix}") from None


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
    comes in eval mode, on the CPU; this is the one way the project reads a model from a file. A
    zip's CRCs are checked first: a damaged one is refused in one line (refuse_damaged).

    Two settings weights do not show; None takes each from the file, with a printed note where
    it must assume. quick_gelu: True for OpenAI's archives, else what an open_clip_config.json
    beside the weights says (open_clip's false where it is silent), else GELU, as OpenCLIP's
    models. heads (image, text): what such a file says, else those of open_clip's model of the
    same widths, else 64-wide heads. The text pooling, end-of-text id and causal mask come from
    such a file, else are CLIP's (argmax: the largest id); a setting in it that our CLIP cannot
    follow is refused in one line (check_openclip_model_cfg)."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such checkpoint file; pass --checkpoint=FILE (an OpenCLIP or "
                         f"OpenAI CLIP)")
    if zipfile.is_zipfile(path):  # torch.save's format and TorchScript's carry CRCs: checked
        refuse_damaged(path)
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
    config_path, model_cfg, preprocess = _openclip_config_beside(path)
    if quick_gelu is None and config_path:  # open_clip reads a quick_gelu it lacks as false
        quick_gelu = model_cfg.get("quick_gelu", False)
    if quick_gelu is None:
        print(f"note: {path} does not say which activation its model uses; assuming GELU, as "
              f"OpenCLIP's models; for OpenAI's weights (or an OpenCLIP -quickgelu model) pass "
              f"--quick_gelu=true")
    cfg = openclip_config(state_dict, bool(quick_gelu), heads, model_cfg, config_path or path)
    _check_preprocess(preprocess, cfg, config_path)
    if not (heads or "vision_cfg" in model_cfg and "text_cfg" in model_cfg):
        widths = f"{cfg.vision_width} image, {cfg.text_width} text"
        print(f"note: {path}: no open_clip_config.json beside it says its attention heads; "
              f"assuming {cfg.vision_heads} image and {cfg.text_heads} text heads, "
              + (f"those of open_clip's model of its widths ({widths})"
                 if (cfg.vision_width, cfg.text_width) in OPENCLIP_HEADS
                 else f"64 wide (no open_clip model has its widths, {widths})")
              + "; if it has others, pass --heads=IMAGE,TEXT")
    return load_openclip_state_dict(state_dict, cfg), {}


def _openclip_config_beside(path: str) -> tuple[str | None, dict, dict]:
    """(its path, the open_clip model config, the preprocessing config) of an
    open_clip_config.json beside the weights (Hugging Face's layout, or export's); (None, {}, {})
    where there is none."""
    config_path = os.path.join(os.path.dirname(path), "open_clip_config.json")
    if not os.path.exists(config_path):
        return None, {}, {}
    try:
        with open(config_path) as f:
            config = json.load(f)
    except ValueError as e:
        raise SystemExit(f"error: {config_path}: not readable JSON ({e}); fix or remove it "
                         f"(it says the model's settings that weights do not show)") from None
    return config_path, config.get("model_cfg", config), config.get("preprocess_cfg") or {}


def _check_preprocess(preprocess: dict, cfg: CLIPConfig, source: str) -> None:
    """Refuse, naming the field, an open_clip_config.json's preprocess_cfg other than the one
    evaluate.py applies (data.ImageTransform and normalize_images, as open_clip's defaults)."""
    expected = {"size": (cfg.image_px, [cfg.image_px] * 2), "mode": ("RGB",),
                "mean": (list(data.CLIP_MEAN),), "std": (list(data.CLIP_STD),),
                "interpolation": ("bicubic",), "resize_mode": ("shortest",)}
    for name, value in preprocess.items():
        said = f"error: {source}: preprocess_cfg.{name}={json.dumps(value)}"
        if name == "fill_color":  # pads only under the resize modes refused here
            continue
        if name not in expected:
            raise SystemExit(f"{said} is a setting evaluate.py does not know; use open_clip for "
                             f"this model, or remove it if it changes nothing")
        close = (name in ("mean", "std") and isinstance(value, list) and len(value) == 3
                 and all(abs(a - b) < 1e-6 for a, b in zip(value, expected[name][0])))
        if not close and value not in expected[name]:
            raise SystemExit(f"{said}: evaluate.py prepares images only as "
                             f"{' or '.join(json.dumps(v) for v in expected[name])}; use "
                             f"open_clip for this model")


def check_tokenizer(cfg: CLIPConfig, tokenizer, tokenizer_path: str,
                    model_path: str) -> None:
    """Refuse, in one line, a tokenizer whose ids the model of cfg cannot read: more ids than it
    embeds, or, where it pools at end-of-text, another end-of-text id."""
    pools = (f"pools at end-of-text {cfg.eot_token_id}" if cfg.text_pool == "eot"
             else f"pools at the {cfg.text_pool} token")
    if tokenizer.vocab_size <= cfg.vocab_size and (cfg.text_pool != "eot"
                                                   or tokenizer.eot_id == cfg.eot_token_id):
        return
    raise SystemExit(f"error: {tokenizer_path}: {tokenizer.vocab_size} ids with end-of-text "
                     f"{tokenizer.eot_id}, but {model_path} embeds {cfg.vocab_size} ids and "
                     f"{pools}; pass the tokenizer it was trained with (CLIP's: python "
                     f"tools/prepare.py clip-tokenizer), or, if this is it, put the model's "
                     f"open_clip_config.json (its pool_type and eos_id) beside the weights")


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
    text_pool = (dict(pool_type="last") if cfg.text_pool == "last"
                 else dict(pool_type="argmax") if cfg.eot_token_id == cfg.vocab_size - 1
                 else dict(pool_type="eos", eos_id=cfg.eot_token_id))
    text_pool.update({} if cfg.text_causal else {"no_causal_mask": True})
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


def config_differences(saved: dict, cfg: CLIPConfig) -> list[str]:
    """The fields in which a saved model config (a checkpoint's) differs from cfg, as "field saved
    -> now"; a field the saved config lacks (written before the field was added) has its default."""
    return [f"{f.name} {saved.get(f.name, f.default)!r} -> {getattr(cfg, f.name)!r}"
            for f in fields(CLIPConfig) if saved.get(f.name, f.default) != getattr(cfg, f.name)]


# ----------------------------------------------------------------------------- a run's steps
def step_checkpoint(run: str, t: int) -> str:
    """RUN/stepNN.pt: the model after time step t (t from 0, NN from 01), as train.py writes it."""
    return os.path.join(run, f"step{t + 1:02d}.pt")


def step_checkpoints(run: str) -> list[str]:
    """A run's step checkpoints, in step order."""
    names = sorted(os.listdir(run)) if os.path.isdir(run) else []
    return [os.path.join(run, f) for f in names if re.fullmatch(r"step\d+\.pt", f)]


def cpu_copy(obj):
    """A copy of a state dict (a model's, an optimizer's) in CPU memory, apart from the live one."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


def load_initial(cfg: SimpleNamespace, tokenizer, world) -> CLIP | None:
    """The initial model (--init), or None. Its shape, activation, context length and end-of-text
    id come from the file; --model is ignored, with a line saying so."""
    if not cfg.init:
        return None
    quick_gelu = {"auto": None, "true": True, "false": False}[cfg.quick_gelu]
    model, _ = load_checkpoint(cfg.init, quick_gelu, parse_heads(cfg.heads))
    shape = model.cfg
    check_tokenizer(shape, tokenizer, "the run's tokenizer.json", f"--init={cfg.init}")
    if cfg.max_image_pixels < shape.image_px ** 2:  # check_config knew only --model's size
        raise SystemExit(f"error: --max_image_pixels={cfg.max_image_pixels} is too small for "
                         f"--init's {shape.image_px} px images; use at least {shape.image_px ** 2}")
    if (LOSSES[cfg.loss].init_logit_bias is None) != (shape.init_logit_bias is None):
        has = "has a logit bias" if shape.init_logit_bias is not None else "has no logit bias"
        raise SystemExit(f"error: --init's model {has}, which --loss={cfg.loss} does not fit; "
                         f"pass the loss it was trained with")
    if world.master:
        print(f"init {cfg.init}: ViT {shape.vision_layers}x{shape.vision_width} at "
              f"{shape.image_px} px, patch {shape.patch_px}; text {shape.text_layers}x"
              f"{shape.text_width}, {shape.context_tokens} tokens; "
              f"{'QuickGELU' if shape.quick_gelu else 'GELU'} (--model is ignored: the shape is "
              f"the file's)")
    return model
