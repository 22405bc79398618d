"""Options dataclasses from YAML configs and keyword arguments (CLI flags and YAML keys share names), and their
validation: every value is checked against its field's type and range before any data is read, so a bad value
is one line naming the option (or the config file and key) instead of a traceback deep inside a run.

Each field declares itself once with `option`: its help, the `GROUPS` section of ``--help`` it is listed in and
its choices; `nakt.cli` builds every verb's flags from these fields, `check_options` checks the choices.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from nakt.errors import NaktError
from nakt.io.images import orientation_code

__all__ = ["COMMON", "GROUPS", "OptionError", "at_least", "between", "check_device", "check_options",
           "check_orientation", "gather_values", "make_options", "one_of", "option", "option_info",
           "read_yaml_mapping"]

T = TypeVar("T")

Check = Callable[[object], "str | None"]

# the sections of a verb's --help, in this order: each option names one as its `group`
GROUPS = {"model": "model", "data": "data", "teachers": "teachers and fusion", "schedule": "training schedule",
          "classification": "classification only", "segmentation": "segmentation only",
          "performance": "performance and device", "output": "output and run control"}
# fields that mean the same in every verb that has them: a field of this name declared without `option` (or
# without help) takes its group and help from here; ``config`` is the --config flag every verb but demo has
COMMON = {
    "cases": {"group": "data", "help": "case list: text file, JSON list, or splits.json:KEY"},
    "channels": {"group": "data", "help": "file-name globs of the modality files in case folders, in order"},
    "mask_file": {"group": "data", "help": "glob of the mask file inside case folders (e.g. 'OTMultiClass*')"},
    "device": {"group": "performance", "help": "cpu, cuda, cuda:N, or auto: a GPU when there is one"},
    "trust_checkpoint": {"group": "model", "help": "let pickled checkpoints (nnU-Net's) load types beyond nakt's "
                         "allow-list: only for files you trust, since unpickling can run code"},
    "progress": {"group": "output", "help": "no progress bars"},
    "config": {"group": "output", "help": "YAML file with the same keys as the flags (flags given win)"},
}


def option(default=dataclasses.MISSING, help: str = "", *, group: str | None = None,
           choices: tuple[str, ...] | None = None, repeat: bool = False, cli: bool = True,
           default_factory=dataclasses.MISSING) -> dataclasses.Field:
    """A dataclass field with what ``--help`` shows about it: `help` (for a bool that defaults to True, the help
    of its ``--no-<name>`` flag), `group` (a key of `GROUPS`), and the `choices` a value must be one of (argparse
    offers them, `check_options` checks them). `repeat`: a list given by repeating the flag (``--teacher A
    --teacher B``) instead of ``--flag A B``. ``cli=False`` keeps a field off the command line (YAML and Python
    only). No default: a required option. A field named in `COMMON` may leave out the help and group."""
    if group is not None and group not in GROUPS:
        raise ValueError(f"option group {group!r} is not one of {', '.join(GROUPS)}")
    metadata = {"help": help, "group": group, "choices": choices, "repeat": repeat, "cli": cli}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def option_info(cls: type, name: str) -> dict:
    """What `option` declared about the field `name` of the options class `cls` (or of the nearest base class
    that declared it, when a subclass only changes its default), completed from `COMMON`."""
    info = {"help": "", "group": None, "choices": None, "repeat": False, "cli": True}
    declared = [vars(k)["__dataclass_fields__"][name].metadata for k in reversed(cls.__mro__)
                if name in vars(k).get("__dataclass_fields__", {})]
    for metadata in [COMMON.get(name, {}), *declared]:
        info.update({k: v for k, v in metadata.items() if v not in (None, "")})
    return info


class OptionError(NaktError):
    """A bad option value; `option` is the field name, so a config file's key can be named instead of a flag."""

    def __init__(self, option: str, problem: str, hint: str | None = None):
        self.option = option
        super().__init__(None, f"--{option.replace('_', '-')}: {problem}", hint)
        self.problem = problem


def at_least(low: float, *, exclusive: bool = False) -> Check:
    """A check: every number (or each item of a list) is >= `low` (> with `exclusive`)."""
    word = "greater than" if exclusive else "at least"

    def check(value):
        bad = [v for v in _items(value) if (v <= low if exclusive else v < low)]
        return f"must be {word} {low:g}, got {bad[0]:g}" if bad else None

    return check


def between(low: float, high: float, *, high_open: bool = False, low_open: bool = False) -> Check:
    """A check: every number lies in [low, high] (open ends as asked)."""
    text = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def check(value):
        for v in _items(value):
            if v < low or v > high or (low_open and v == low) or (high_open and v == high):
                return f"must be in {text}, got {v:g}"
        return None

    return check


def one_of(*valid: str) -> Check:
    """A check: the value is one of `valid` (with a "did you mean")."""

    def check(value):
        if value in valid:
            return None
        import difflib

        close = difflib.get_close_matches(str(value), valid, n=1)
        guess = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown value {value!r} ({guess}valid: {', '.join(valid)})"

    return check


def check_device(value) -> str | None:
    """A check: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` that exists on this machine."""
    import torch

    if value in ("auto", "cpu"):
        return None
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        return f"unknown device {value!r} (valid: auto, cpu, cuda, cuda:N)"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"{value!r} asked for, but no CUDA GPU is visible here (use cpu or auto)"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"{value!r} asked for, but this machine has {torch.cuda.device_count()} GPU(s)"
        return None
    if device.type != "cpu":
        return f"unsupported device {value!r} (valid: auto, cpu, cuda, cuda:N)"
    return None


def check_orientation(value) -> str | None:
    """A check: ``none`` or a nibabel axis code (RAS, LPS, ...)."""
    try:
        orientation_code(value)
    except NaktError as exc:
        return f"{exc.problem} ({exc.hint})"
    return None


def _items(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _type_problem(value, hint) -> tuple[object, str | None]:
    """Check `value` against a type hint; returns (the value, coerced where harmless, problem or None).

    Harmless coercions: an int where a float is wanted, a `Path` where a string is, and a single value where
    a list is (YAML ``size: 64`` means ``size: [64]``, as ``--size 64`` does).
    """
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return value, None
        (inner,) = [a for a in args if a is not type(None)]
        return _type_problem(value, inner)
    if origin is list:
        (item,) = typing.get_args(hint) or (object,)
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        checked = [_type_problem(v, item) for v in items]
        problems = [p for _, p in checked if p]
        return [v for v, _ in checked], (problems[0] if problems else None)
    if hint is bool:
        return value, None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return value, None if ok else f"must be a whole number, got {value!r}"
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value), None
        return value, f"must be a number, got {value!r}"
    if hint is str:
        if isinstance(value, Path):
            return str(value), None
        return value, None if isinstance(value, str) else f"must be a string, got {value!r}"
    if hint is dict:
        return value, None if isinstance(value, dict) else f"must be a mapping, got {value!r}"
    return value, None


def check_options(opts, checks: dict[str, Check]) -> None:
    """Validate a dataclass instance in place: each field against its type hint (coercing harmless cases), then
    its `option` choices and the `checks` of the fields that are set. Raises `OptionError` naming the first bad
    option."""
    hints = typing.get_type_hints(type(opts))
    choices = {}
    for f in dataclasses.fields(opts):
        value, problem = _type_problem(getattr(opts, f.name), hints.get(f.name, object))
        if problem:
            raise OptionError(f.name, problem)
        setattr(opts, f.name, value)
        valid = option_info(type(opts), f.name)["choices"]
        if valid:
            choices[f.name] = one_of(*valid)
    for name, check in {**choices, **checks}.items():
        value = getattr(opts, name)
        problem = check(value) if value is not None else None
        if problem:
            raise OptionError(name, problem)


def read_yaml_mapping(path: Path, what: str, shape: str) -> dict:
    """A YAML file holding one mapping; a missing file, bad YAML or another shape is one line naming `path`
    (`what`: "config file"; `shape`: what the mapping should be)."""
    import yaml

    if not path.is_file():
        raise NaktError(path, f"{what} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise NaktError(path, f"invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise NaktError(path, shape)
    return data


def gather_values(cls: type, config: str | Path | None = None, **given) -> tuple[dict, set[str]]:
    """The option values for `cls`: a YAML file's keys overridden by `given` values that are not None.

    Returns ``(values, keys that came from the file)``. Unknown keys are an error naming the file and the valid
    keys.
    """
    valid = {f.name for f in dataclasses.fields(cls)}
    values: dict = {}
    if config is not None:
        path = Path(config)
        values = read_yaml_mapping(path, "config file", "a config is a mapping of option: value")
        values = {str(k).replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise NaktError(path, f"unknown key {unknown[0]!r}", f"valid: {', '.join(sorted(valid))}")
    from_file = {k for k in values if given.get(k) is None}
    unknown = sorted(set(given) - valid)
    if unknown:
        raise TypeError(f"{cls.__name__} has no option {unknown[0]!r}")
    values.update({k: v for k, v in given.items() if v is not None})
    return values, from_file


def make_options(cls: type[T], config: str | Path | None = None, **given) -> T:
    """Build `cls` from a YAML file's keys, overridden by `given` values that are not None (`gather_values`).

    A missing required option, or a bad value, is one line; a bad value from the file names the file and key.
    """
    values, from_file = gather_values(cls, config, **given)
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in values]
    if missing:
        raise NaktError(config, f"missing option {missing[0]!r}", f"give --{missing[0].replace('_', '-')}")
    try:
        return cls(**values)
    except OptionError as exc:
        if exc.option in from_file:
            raise NaktError(config, f"{exc.option}: {exc.problem}", exc.hint) from None
        raise
