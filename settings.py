"""
The --key=value command line of train.py, evaluate.py and the tools, and the settings that
strategies and schedules declare beside the code that reads them.

    parse_flags(["--lr=1e-3"], {"lr": 5e-4, "seed": 0})   # {"lr": 0.001, "seed": 0}

A strategy's or a schedule's setting is declared with its default, a one-line help and its check:
    SETTINGS["lwf_weight"] = Setting(1.0, "lwf: weight of the term", lambda w: w >= 0, "0 or more")
train.py reads it as cfg.lwf_weight, like its own config, and checks it before any compute.
"""
import importlib.util
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable

MAX_SEED = 2 ** 63 - 1  # torch.manual_seed takes below 2^64, and each step adds its index to it


@dataclass(frozen=True)
class Setting:
    default: Any                                   # its type is the setting's type
    help: str                                      # one line, shown by --help
    check: Callable[[Any], bool] = lambda v: True  # False for a value that cannot work
    use: str = ""                                  # what to use instead, said when check fails
    resolve: Callable[[Any, int], Any] | None = None  # its meaning in a run of n steps, if n counts


def check(settings: dict[str, Setting], cfg: SimpleNamespace) -> None:
    """Refuse, in one line, the first value that its Setting's check says cannot work."""
    for key, setting in settings.items():
        value = getattr(cfg, key)
        if not setting.check(value):
            raise SystemExit(f"error: --{key}={value} is not valid"
                             + (f"; use {setting.use}" if setting.use else "; see --help"))


def parse_flags(argv: list[str], defaults: dict, helps: dict[str, str] | None = None) -> dict:
    """--key=value overrides of defaults, each read as its default's type (bool: true/false/1/0;
    numbers may hold _; a list: each --key=value adds one). An unknown key or a value of the wrong
    type is a one-line error; --help lists the keys with their defaults and helps."""
    flags = dict(defaults)
    for arg in argv:
        if arg in ("--help", "-h"):
            print("\n".join(f"--{k}={v}".ljust(36) + f"  {(helps or {}).get(k, '')}".rstrip()
                            for k, v in defaults.items()))
            raise SystemExit(0)
        key, sep, value = arg[2:].partition("=")
        if not arg.startswith("--") or not sep:
            raise SystemExit(f"error: bad argument '{arg}': use --key=value; "
                             f"keys: {', '.join(defaults)}")
        if key not in flags:
            raise SystemExit(f"error: unknown config key '{key}'; "
                             f"valid keys: {', '.join(defaults)}")
        kind = type(defaults[key])
        try:
            if kind is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                flags[key] = value.lower() in ("true", "1")
            elif kind is list:
                flags[key] = [*flags[key], value]
            else:
                flags[key] = kind(value.replace("_", "")) if kind in (int, float) else value
        except ValueError:
            raise SystemExit(f"error: --{key}={value} is not a {kind.__name__} "
                             f"(default: {defaults[key]!r})")
    return flags


def import_files(paths: list[str], flag: str = "--module") -> None:
    """Import each file (as a module, not as __main__: it trains nothing), so that the rows it adds
    to the project's tables (strategies, schedules, losses, summary numbers) are known here."""
    for path in paths:
        if not os.path.isfile(path):
            raise SystemExit(f"error: {flag}={path}: no such file; pass a file that adds rows to "
                             f"the project's tables, e.g. examples/ewc.py")
        name = "module_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
        spec = importlib.util.spec_from_file_location(name, path)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
