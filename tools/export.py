"""
Hand a model back to OpenCLIP: a run's step checkpoint (or any CLIP this project loads) as a folder
that open_clip builds and loads with strict=True, with the run's tokenizer beside it.

    python tools/export.py runs/cumulative-all/step05.pt --out=exported
    python -c "import open_clip; open_clip.create_model_and_transforms('local-dir:exported')"

The folder holds open_clip_config.json (every shape, so shapes open_clip has no name for load too,
and the preprocessing), open_clip_pytorch_model.bin (the weights, by OpenCLIP's names) and, where
the run has one, tokenizer.json for Tokenizer. With CLIP's vocabulary, open_clip's own
tokenizer gives the same ids (tests/test_openclip.py checks it); a run's own vocabulary is read by
Tokenizer only, and export says so. The folder loads back here too (load_checkpoint,
evaluate.py --checkpoint, train.py --init) as the run's own checkpoint.
"""
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the project root
import data  # noqa: E402
import files  # noqa: E402
from checkpoints import load_checkpoint, parse_heads, to_openclip  # noqa: E402
from settings import parse_flags  # noqa: E402
from text import Tokenizer


def export(checkpoint: str, out: str, quick_gelu: bool | None = None,
           heads: tuple[int, int] | None = None) -> None:
    """Write checkpoint as an OpenCLIP folder at out (made if new). quick_gelu and heads: as
    checkpoints.load_checkpoint's, None to read them from the file."""
    model, _ = load_checkpoint(checkpoint, quick_gelu, heads)
    state_dict, model_cfg = to_openclip(model)
    tokenizer = os.path.join(os.path.dirname(checkpoint), "tokenizer.json")
    tokenize = (how_to_tokenize(Tokenizer.load(tokenizer), out, model.cfg.context_tokens)
                if os.path.exists(tokenizer) else None)  # read before anything is written
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"error: --out={out} is a file; pass a folder (made if new)")
    os.makedirs(out, exist_ok=True)
    preprocess = {"size": model.cfg.image_px, "mean": list(data.CLIP_MEAN),
                  "std": list(data.CLIP_STD), "interpolation": "bicubic",
                  "resize_mode": "shortest"}  # as data.ImageTransform evaluates
    files.write_json(os.path.join(out, "open_clip_config.json"),
                      {"model_cfg": model_cfg, "preprocess_cfg": preprocess})
    files.write_atomic(os.path.join(out, "open_clip_pytorch_model.bin"),
                        lambda f: torch.save(state_dict, f))
    if tokenize:
        shutil.copyfile(tokenizer, os.path.join(out, "tokenizer.json"))
    print(f"wrote {out}: open_clip_config.json, open_clip_pytorch_model.bin"
          f"{', tokenizer.json' if tokenize else ''}; load it with "
          f"open_clip.create_model_and_transforms('local-dir:{out}')")
    if tokenize:
        print(tokenize)


def how_to_tokenize(tokenizer: Tokenizer, out: str, context_tokens: int) -> str:
    """The line that says how to tokenize for an exported model: open_clip's own tokenizer where
    the run used CLIP's (tools/prepare.py clip-tokenizer: open_clip's ids, tested), else ours."""
    if (tokenizer.vocab_size, tokenizer.sot_id, tokenizer.eot_id) == (49408, 49406, 49407):
        return f"tokenize with open_clip.get_tokenizer('local-dir:{out}'): CLIP's vocabulary"
    return (f"tokenize with this project's Tokenizer.load('{out}/tokenizer.json')(texts, "
            f"{context_tokens}): the run's own vocabulary, which open_clip.get_tokenizer does "
            f"not read (it would give CLIP's ids)")


USAGE = ("usage: python tools/export.py CHECKPOINT --out=FOLDER [--quick_gelu=auto|true|false] "
         "[--heads=auto|IMAGE,TEXT]")


def main(argv: list[str]) -> None:
    if not argv or argv[0].startswith("--"):
        raise SystemExit(USAGE)
    opts = parse_flags(argv[1:], {"out": "", "quick_gelu": "auto", "heads": "auto"})
    if not opts["out"] or opts["quick_gelu"] not in ("auto", "true", "false"):
        raise SystemExit(USAGE)
    export(argv[0], opts["out"], {"auto": None, "true": True, "false": False}[opts["quick_gelu"]],
           parse_heads(opts["heads"]))


if __name__ == "__main__":
    main(sys.argv[1:])
