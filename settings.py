"""
The --key=value command line of train.py and the tools, and the settings: train.py's, and those
that strategies and schedules declare beside the code that reads them, each with its default (its
type), a one-line help (--help lists them) and its check:

    SETTINGS["lwf_weight"] = Setting(1.0, "lwf: weight of the term", *at_least(0))
    cfg = parse_settings(["--lwf_weight=0.5"], SETTINGS)    # cfg.lwf_weight == 0.5
    check(SETTINGS, cfg)                                     # one line where a value cannot work
"""
import importlib.util
import math
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


def at_least(n) -> tuple[Callable, str]:
    """A Setting's check and use for a number of n or more, finite (nan fails it too)."""
    return (lambda v: n <= v < math.inf), f"{n} or more"


def between(lo, hi, below_hi: bool = False) -> tuple[Callable, str]:
    """A Setting's check and use for a number from lo to hi (below hi, with below_hi)."""
    if below_hi:
        return (lambda v: lo <= v < hi), f"{lo} or more, below {hi}"
    return (lambda v: lo <= v <= hi), f"from {lo} to {hi}"


def parse_settings(argv: list[str], *tables: dict[str, Setting]) -> SimpleNamespace:
    """The settings of every table (train.py's, the strategies', the schedules') with --key=value
    overrides, each read as its default's type; --help lists them with their helps. A name two
    tables declare is a one-line error."""
    merged = {}
    for table in tables:
        clash = merged.keys() & table.keys()
        if clash:
            raise SystemExit(f"error: a strategy's or schedule's setting has the name of another "
                             f"setting: {', '.join(sorted(clash))}; rename it")
        merged.update(table)
    return SimpleNamespace(**parse_flags(argv, {k: s.default for k, s in merged.items()},
                                         {k: s.help for k, s in merged.items()}))


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


def numbers(text: str) -> list[float]:
    """"0,0.5,1" -> [0.0, 0.5, 1.0]; [nan] where it is not a list of finite numbers."""
    try:
        values = [float(a) for a in text.split(",")]
    except ValueError:
        return [math.nan]
    return values if all(math.isfinite(a) for a in values) else [math.nan]
